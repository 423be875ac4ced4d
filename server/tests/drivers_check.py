"""Drivers read continuous queries to their end, and COPY and DDL behave as
drivers expect (hardening items 11, 12 and 15).

Usage: python3 drivers_check.py PORT JDBC_DIR|-

Four readers run at once over the same stream, each through a driver's own
batching: a psycopg 3 named cursor with its default itersize, an asyncpg
cursor with its default prefetch, psql with FETCH_COUNT, and JDBC with
setFetchSize (when JDBC_DIR holds the compiled JdbcFetch class). Four rows
are inserted, then, after longer than the old 5 s cursor timeout, two more:
each reader must get all six rows of its LIMIT 6 query, in order.
Exits non-zero with a message on failure.
"""
import asyncio
import os
import subprocess
import sys
import threading
import time

import asyncpg
import psycopg

port = int(sys.argv[1])
jdbc_dir = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None
dsn = f"host=127.0.0.1 port={port} user=drivers dbname=drizzle"
QUERY = "SELECT k FROM burst LIMIT 6"
WANT = [1, 2, 3, 4, 5, 6]
results = {}


def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)


with psycopg.connect(dsn, autocommit=True) as c:
    c.execute("CREATE STREAM burst (k BIGINT)")
    # psycopg 3 prepares a statement run often enough, then answers DDL with
    # DEALLOCATE ALL: the DDL must succeed and report success.
    for _ in range(6):
        c.execute("SELECT 1 + %s", (1,))
    c.execute("CREATE TABLE after_prepare (a BIGINT)")
    c.execute("INSERT INTO after_prepare VALUES (%s)", (1,))
    assert c.execute("SELECT count(*) FROM after_prepare").fetchone() == (1,)
    c.execute("DROP TABLE after_prepare")
    # COPY TO STDOUT: copy.rows() reads one row per CopyData message.
    c.execute("CREATE TABLE copy_src (a BIGINT, b TEXT)")
    c.execute("INSERT INTO copy_src VALUES (1, 'x'), (2, 'y'), (3, NULL)")
    with c.cursor() as cur:
        with cur.copy("COPY (SELECT a, b FROM copy_src ORDER BY a) TO STDOUT") as copy:
            got = list(copy.rows())
    assert got == [("1", "x"), ("2", "y"), ("3", None)], got
    # COPY FROM STDIN with psycopg's writer.
    with c.cursor() as cur:
        with cur.copy("COPY copy_src (a, b) FROM STDIN") as copy:
            copy.write_row((4, "z"))
            copy.write_row((5, None))
    assert c.execute("SELECT count(*) FROM copy_src").fetchone() == (5,)


def psycopg_reader():
    with psycopg.connect(dsn) as conn:
        with conn.cursor(name="live") as cur:  # default itersize (100)
            cur.execute(QUERY)
            results["psycopg named cursor"] = [r[0] for r in cur]


def asyncpg_reader():
    async def run():
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="drivers", database="drizzle")
        try:
            async with conn.transaction():
                # Default prefetch (50 rows per Execute).
                results["asyncpg cursor"] = [r["k"] async for r in conn.cursor(QUERY)]
        finally:
            await conn.close()

    asyncio.run(run())


def psql_reader():
    out = subprocess.run(
        ["psql", dsn, "-X", "-A", "-t", "-v", "FETCH_COUNT=4", "-c", QUERY],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if out.returncode != 0:
        results["psql FETCH_COUNT"] = out.stderr
    else:
        results["psql FETCH_COUNT"] = [int(x) for x in out.stdout.split()]


def jdbc_reader():
    cp = f"{jdbc_dir}:/usr/share/java/postgresql.jar"
    out = subprocess.run(
        ["java", "-cp", cp, "JdbcFetch", str(port), QUERY],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if out.returncode != 0:
        results["JDBC setFetchSize"] = out.stdout + out.stderr
    else:
        results["JDBC setFetchSize"] = [int(x) for x in out.stdout.split()]


readers = [psycopg_reader, asyncpg_reader, psql_reader]
if jdbc_dir:
    readers.append(jdbc_reader)
threads = [threading.Thread(target=r) for r in readers]
for t in threads:
    t.start()
with psycopg.connect(dsn, autocommit=True) as c:
    c.execute("INSERT INTO burst VALUES (1), (2), (3), (4)")
    # Every reader's query is running before the pause.
    deadline = time.time() + 60
    while True:
        running = [r for r in c.execute("SHOW QUERIES").fetchall() if "burst" in " ".join(map(str, r))]
        if len(running) >= len(readers):
            break
        if time.time() > deadline:
            fail(f"only {len(running)} of {len(readers)} readers started")
        time.sleep(0.05)
    # Longer than the old cursor_fetch_timeout: a short batch then would
    # have ended each reader at four rows.
    time.sleep(6)
    c.execute("INSERT INTO burst VALUES (5), (6)")
for t in threads:
    t.join(timeout=120)
    if t.is_alive():
        fail("a reader never finished")
for name, got in results.items():
    if got != WANT:
        fail(f"{name}: {got!r}, want {WANT}")
if len(results) != len(readers):
    fail(f"readers that reported: {sorted(results)}")
print("drivers ok:", ", ".join(sorted(results)))
