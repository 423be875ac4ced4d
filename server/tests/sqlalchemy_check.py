"""SQLAlchemy 2 (with psycopg2 and with psycopg 3) and pandas against a
Drizzle server that holds a stream `clicks`, a table `users` (1 'ann',
2 'bob') and a materialized view `per_key`: connect, a text query with a
parameter, inspect() schemas, tables, materialized views and columns, and
pandas.read_sql through the engine. Prints what it checked; exits non-zero
on the first difference. Usage: python3 sqlalchemy_check.py PORT
"""

import sys

import pandas as pd
import sqlalchemy as sa


def check(what, got, want):
    if got != want:
        print(f"FAIL {what}: got {got!r}, want {want!r}")
        sys.exit(1)
    print(f"ok {what}")


port = sys.argv[1]
for driver in ["psycopg2", "psycopg"]:
    engine = sa.create_engine(f"postgresql+{driver}://sa@127.0.0.1:{port}/analytics")
    with engine.connect() as c:
        got = c.execute(sa.text("SELECT name FROM users WHERE id = :i"), {"i": 2}).scalar()
        check(f"{driver} text query", got, "bob")
    insp = sa.inspect(engine)
    check(f"{driver} schemas", sorted(insp.get_schema_names()), ["information_schema", "public"])
    check(f"{driver} tables", sorted(insp.get_table_names()), ["clicks", "users"])
    check(f"{driver} materialized views", sorted(insp.get_materialized_view_names()), ["per_key"])
    cols = [(c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns("users")]
    check(f"{driver} columns", cols, [("id", "INTEGER", False), ("name", "TEXT", True)])
    cols = [c["name"] for c in insp.get_columns("clicks")]
    check(f"{driver} stream columns", cols, ["k", "url", "ts"])
    df = pd.read_sql("SELECT id, name FROM users ORDER BY id", engine)
    check(f"{driver} pandas", df.to_dict("records"), [{"id": 1, "name": "ann"}, {"id": 2, "name": "bob"}])
    engine.dispose()
print("sqlalchemy and pandas: all checks passed")
