"""asyncpg's COPY paths against a Drizzle server that holds a table
`items (id INT NOT NULL, name TEXT, price DOUBLE PRECISION, at TIMESTAMP)`:
copy_records_to_table (binary COPY FROM STDIN), copy_to_table (CSV, with
quoted options), copy_from_query and copy_from_table (text and binary).
Prints what it checked; exits non-zero on the first difference.
Usage: python3 asyncpg_copy_check.py PORT
"""

import asyncio
import datetime
import io
import sys

import asyncpg


def check(what, got, want):
    if got != want:
        print(f"FAIL {what}: got {got!r}, want {want!r}")
        sys.exit(1)
    print(f"ok {what}")


async def main(port):
    c = await asyncpg.connect(host="127.0.0.1", port=int(port), user="copier", database="drizzle")
    at = datetime.datetime(2024, 1, 2, 3, 4, 5, 600000)
    records = [(1, "ann", 1.5, at), (2, None, -2.25, None), (3, "tab\there", 0.0, at)]
    status = await c.copy_records_to_table("items", records=records)
    check("copy_records_to_table", status, "COPY 3")
    csv = io.BytesIO(b'4,"quoted, comma",9.5,2024-05-06 07:08:09\n5,,,\n')
    status = await c.copy_to_table("items", source=csv, format="csv", null="")
    check("copy_to_table csv", status, "COPY 2")
    rows = await c.fetch("SELECT id, name, price, at FROM items ORDER BY id")
    check(
        "rows",
        [tuple(r) for r in rows],
        [
            (1, "ann", 1.5, at),
            (2, None, -2.25, None),
            (3, "tab\there", 0.0, at),
            (4, "quoted, comma", 9.5, datetime.datetime(2024, 5, 6, 7, 8, 9)),
            (5, None, None, None),
        ],
    )
    out = io.BytesIO()
    await c.copy_from_query("SELECT id, name FROM items WHERE id <= 3 ORDER BY id", output=out)
    check("copy_from_query text", out.getvalue(), b"1\tann\n2\t\\N\n3\ttab\\there\n")
    out = io.BytesIO()
    await c.copy_from_query("SELECT id, name FROM items WHERE id <= 2 ORDER BY id", output=out, format="binary")
    data = out.getvalue()
    check("copy_from_query binary signature", data[:11], b"PGCOPY\n\xff\r\n\x00")
    check("copy_from_query binary trailer", data[-2:], b"\xff\xff")
    out = io.BytesIO()
    await c.copy_from_table("items", columns=["id"], output=out, format="csv")
    check("copy_from_table csv", sorted(out.getvalue().split()), [b"1", b"2", b"3", b"4", b"5"])
    # Binary out, binary back in: the same rows.
    await c.execute("CREATE TABLE items2 (id INT NOT NULL, name TEXT, price DOUBLE PRECISION, at TIMESTAMP)")
    out = io.BytesIO()
    await c.copy_from_query("SELECT id, name, price, at FROM items ORDER BY id", output=out, format="binary")
    out.seek(0)
    status = await c.copy_to_table("items2", source=out, format="binary")
    check("binary round trip", status, "COPY 5")
    a = await c.fetch("SELECT * FROM items ORDER BY id")
    b = await c.fetch("SELECT * FROM items2 ORDER BY id")
    check("binary round trip rows", [tuple(r) for r in b], [tuple(r) for r in a])
    # A bad binary stream is refused whole.
    try:
        await c.copy_to_table("items2", source=io.BytesIO(b"PGCOPY\n\xff\r\n\x00garbage"), format="binary")
        print("FAIL bad binary stream accepted")
        sys.exit(1)
    except asyncpg.PostgresError as e:
        check("bad binary stream", e.sqlstate, "22P04")
    check("nothing half-applied", await c.fetchval("SELECT count(*) FROM items2"), 5)
    await c.close()
    print("asyncpg COPY: all checks passed")


asyncio.run(main(sys.argv[1]))
