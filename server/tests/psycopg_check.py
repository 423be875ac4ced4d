"""Drives a Drizzle server with psycopg 3 (extended protocol, server-side cursors).

Usage: python3 psycopg_check.py PORT. Exits non-zero with a message on failure.
"""
import sys
import threading
import time

import psycopg

port = int(sys.argv[1])
dsn = f"host=127.0.0.1 port={port} user=py dbname=drizzle"

with psycopg.connect(dsn, autocommit=True) as conn:
    conn.execute("CREATE STREAM py_s (k BIGINT, name TEXT, ts TIMESTAMP, WATERMARK FOR ts AS ts)")
    conn.execute("CREATE TABLE py_t (k BIGINT, label TEXT)")
    # Parameters go through the extended protocol (server-side binding).
    conn.execute("INSERT INTO py_t VALUES (%s, %s), (%s, %s)", (1, "one", 2, "two"))
    conn.execute(
        "INSERT INTO py_s VALUES (%s, %s, '2024-01-01 00:00:01'), (%s, %s, '2024-01-01 00:00:12')",
        (1, "a", 2, "b"),
    )
    rows = conn.execute("SELECT k, label FROM py_t WHERE k >= %s ORDER BY k", (1,)).fetchall()
    assert rows == [(1, "one"), (2, "two")], rows
    # A continuous query with a parameter, joined to the table.
    rows = conn.execute(
        "SELECT s.k, t.label FROM py_s s JOIN py_t t ON s.k = t.k WHERE s.k >= %s LIMIT 2", (1,)
    ).fetchall()
    assert rows == [(1, "one"), (2, "two")], rows
    # Binary results.
    with conn.cursor(binary=True) as cur:
        cur.execute("SELECT k, name FROM py_s LIMIT 1")
        assert cur.fetchone() == (1, "a")
    # Errors carry SQLSTATE.
    try:
        conn.execute("SELECT nope FROM py_s")
        raise AssertionError("expected an error")
    except psycopg.errors.UndefinedColumn:
        pass

# A server-side (named) cursor over a continuous query: DECLARE + FETCH.
with psycopg.connect(dsn) as conn:
    with conn.cursor(name="live") as cur:
        cur.execute("SELECT k FROM py_s")
        assert [r[0] for r in cur.fetchmany(2)] == [1, 2]

        def later():
            time.sleep(0.3)
            with psycopg.connect(dsn, autocommit=True) as other:
                other.execute("INSERT INTO py_s VALUES (3, 'c', '2024-01-01 00:00:20')")

        t = threading.Thread(target=later)
        t.start()
        assert [r[0] for r in cur.fetchmany(1)] == [3]
        t.join()
print("psycopg ok")
