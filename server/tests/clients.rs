//! What Postgres clients and tools call on connect, through the real wire
//! protocol (tokio-postgres, simple and extended): the session and catalog
//! functions, the parameters they SHOW and SET, `statement_timeout`, and
//! `pg_cancel_backend` / `pg_terminate_backend`.

use std::path::Path;
use std::time::Duration;

use drizzle_sql_tests::{rows, show, TestServer};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_drizzle"))
}

fn code(e: &tokio_postgres::Error) -> Option<String> {
    e.code().map(|c| c.code().to_string())
}

async fn connect(server: &TestServer, user: &str) -> tokio_postgres::Client {
    let conn = format!(
        "host=127.0.0.1 port={} user={user} dbname=analytics application_name=clients-test",
        server.port
    );
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// One text value from a one-row, one-column query (simple protocol).
async fn one(c: &tokio_postgres::Client, sql: &str) -> String {
    let r = rows(
        &c.simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}")),
    );
    assert_eq!(r.len(), 1, "{sql}: {r:?}");
    r[0].clone()
}

#[test]
fn session_and_catalog_functions_answer_as_postgres() {
    let server = TestServer::start(bin(), &["--workers", "1"]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = connect(&server, "alice").await;
        // version() in Postgres's format, named `version`, qualified or not
        // (SQLAlchemy's first query), in both protocols.
        let v = one(&c, "SELECT pg_catalog.version()").await;
        assert!(v.starts_with("PostgreSQL 16.0 (Drizzle "), "{v}");
        let row = c.query_one("SELECT version()", &[]).await.unwrap();
        assert_eq!(row.columns()[0].name(), "version");
        assert_eq!(row.get::<_, String>(0), v);
        // The session's own facts.
        assert_eq!(
            one(
                &c,
                "SELECT current_user, session_user, current_database(), current_schema, \
                 current_catalog"
            )
            .await,
            "alice|alice|analytics|public|analytics"
        );
        let row = c
            .query_one("SELECT current_user, pg_backend_pid()", &[])
            .await
            .unwrap();
        assert_eq!(row.columns()[0].name(), "current_user");
        assert_eq!(row.get::<_, String>(0), "alice");
        assert!(row.get::<_, i64>(1) > 0);
        assert_eq!(one(&c, "SELECT current_schema()").await, "public");
        // Functions in FROM as Postgres reads them, format() and parse_ident().
        assert_eq!(
            rows(
                &c.simple_query("SELECT r * 10 FROM generate_series(1, 3) AS s(r) ORDER BY 1")
                    .await
                    .unwrap()
            ),
            vec!["10", "20", "30"]
        );
        assert_eq!(
            one(&c, "SELECT s[2] FROM string_to_array('a,b,c', ',') s").await,
            "b"
        );
        assert_eq!(
            one(&c, "SELECT format('%s.%I = %L', 'public', 'My T', 'it''s')").await,
            "public.\"My T\" = 'it''s'"
        );
        assert_eq!(
            one(&c, "SELECT (parse_ident('public.\"Bids\"'))[2]").await,
            "Bids"
        );
        assert_eq!(
            one(&c, "SELECT pg_catalog.current_schemas(true)").await,
            "{pg_catalog,public}"
        );
        // current_setting / set_config, and what SHOW then says.
        assert_eq!(
            one(&c, "SELECT current_setting('application_name')").await,
            "clients-test"
        );
        assert_eq!(
            one(&c, "SELECT set_config('work_mem', '64MB', false)").await,
            "64MB"
        );
        assert_eq!(one(&c, "SHOW work_mem").await, "64MB");
        assert_eq!(
            one(&c, "SELECT current_setting('no_such_thing', true) IS NULL").await,
            "t"
        );
        let err = c
            .simple_query("SELECT current_setting('no_such_thing')")
            .await
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("42704"));
        // Catalog functions.
        assert_eq!(
            one(
                &c,
                "SELECT format_type(23, -1), format_type(1043, 14), format_type(1114, NULL), \
                 pg_catalog.pg_get_userbyid(10) IS NOT NULL, quote_ident('Order'), \
                 quote_ident('plain'), pg_encoding_to_char(6), \
                 has_table_privilege('t', 'SELECT'), has_schema_privilege('public', 'USAGE'), \
                 pg_table_is_visible(16384), obj_description(16384, 'pg_class') IS NULL, \
                 pg_postmaster_start_time() <= now()"
            )
            .await,
            "integer|character varying(10)|timestamp without time zone|t|\"Order\"|plain|UTF8|t|t|t|t|t"
        );
        assert_eq!(
            one(
                &c,
                "SELECT array_upper(make_array(1, 2, 3), 1), array_lower(make_array(1, 2, 3), 1), \
                 to_regtype('integer'), to_regtype('hstore') IS NULL, pg_size_pretty(20480)"
            )
            .await,
            "3|1|23|t|20 kB"
        );
        // Parameters clients read at connect.
        for (name, want) in [
            ("server_version_num", "160000"),
            ("server_encoding", "UTF8"),
            ("client_encoding", "UTF8"),
            ("integer_datetimes", "on"),
            ("is_superuser", "on"),
            ("session_authorization", "alice"),
            ("max_identifier_length", "63"),
            ("transaction_isolation", "read committed"),
            ("standard_conforming_strings", "on"),
            ("DateStyle", "ISO, MDY"),
            ("TimeZone", "UTC"),
            ("row_security", "on"),
        ] {
            assert_eq!(one(&c, &format!("SHOW {name}")).await, want, "{name}");
        }
        assert_eq!(
            one(&c, "SHOW TRANSACTION ISOLATION LEVEL").await,
            "read committed"
        );
        let all = show(&c, "SHOW ALL").await.unwrap();
        for name in ["server_version", "statement_timeout", "batch_interval", "work_mem"] {
            assert!(all.iter().any(|r| r["name"] == name), "SHOW ALL lacks {name}");
        }
        // Statements tools send.
        c.batch_execute(
            "SET TIME ZONE 'UTC'; SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED; \
             SET xmloption = content; SET row_security = off; SET extra_float_digits = 3",
        )
        .await
        .unwrap();
        assert_eq!(one(&c, "SHOW row_security").await, "off");
        let err = c
            .simple_query("SET server_version = '9.6'")
            .await
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("55P02"));
        let err = c.simple_query("SET no_such_thing = 1").await.unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("42704"));
        // Statements Drizzle cannot serve get a SQLSTATE and a message
        // without internal structures.
        c.batch_execute("CREATE TABLE t (a INT, b TEXT)").await.unwrap();
        for sql in ["SELECT (t.a).x FROM t", "SELECT a.b.c.d FROM t"] {
            let err = c.simple_query(sql).await.unwrap_err();
            let db = err.as_db_error().expect("a server error");
            assert!(!db.code().code().is_empty());
            assert!(
                !db.message().contains("span") && !db.message().contains("Ident {"),
                "{sql}: {}",
                db.message()
            );
        }
        // Savepoints (SQLAlchemy with psycopg 3 uses them): ROLLBACK TO
        // makes a failed transaction block usable again.
        c.batch_execute("BEGIN; SAVEPOINT s1; RELEASE SAVEPOINT s1; SAVEPOINT s2")
            .await
            .unwrap();
        let err = c.simple_query("SELECT 1 / 0").await.unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("22012"));
        let err = c.simple_query("SELECT 1").await.unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("25P02"));
        c.batch_execute("ROLLBACK TO SAVEPOINT s2").await.unwrap();
        assert_eq!(one(&c, "SELECT 1").await, "1");
        c.batch_execute("COMMIT").await.unwrap();
        let err = c.simple_query("ROLLBACK TO s2").await.unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("25P01"));
        // RESET ALL keeps what describes the session.
        c.batch_execute("RESET ALL").await.unwrap();
        assert_eq!(one(&c, "SHOW work_mem").await, "4MB");
        assert_eq!(one(&c, "SHOW session_authorization").await, "alice");
    });
}

#[test]
fn statement_timeout_ends_statements_with_57014() {
    let server = TestServer::start(bin(), &["--workers", "1"]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = server.client().await.unwrap();
        c.batch_execute("CREATE STREAM s (a BIGINT); INSERT INTO s VALUES (1)")
            .await
            .unwrap();
        assert_eq!(one(&c, "SHOW statement_timeout").await, "0");
        c.batch_execute("SET statement_timeout = 700")
            .await
            .unwrap();
        assert_eq!(one(&c, "SHOW statement_timeout").await, "700ms");
        // A continuous query that would run for ever, in both protocols and
        // through COPY TO STDOUT and a cursor.
        let started = std::time::Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(60), c.simple_query("SELECT a FROM s"))
            .await
            .expect("the statement must end")
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("57014"), "{err:?}");
        assert!(started.elapsed() >= Duration::from_millis(700));
        let err = tokio::time::timeout(Duration::from_secs(60), c.query("SELECT a FROM s", &[]))
            .await
            .expect("the statement must end")
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("57014"), "{err:?}");
        c.batch_execute("BEGIN; DECLARE cur CURSOR FOR SELECT a FROM s")
            .await
            .unwrap();
        let err = c.simple_query("FETCH 5 FROM cur").await.unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("57014"), "{err:?}");
        c.batch_execute("ROLLBACK").await.unwrap();
        // The session goes on; short statements are not affected.
        assert_eq!(one(&c, "SELECT 1 + 1").await, "2");
        assert_eq!(one(&c, "SELECT a FROM s LIMIT 1").await, "1");
        // 0 is no limit.
        c.batch_execute("SET statement_timeout = 0").await.unwrap();
        let reader = server.client().await.unwrap();
        reader
            .batch_execute("SET statement_timeout = '10min'")
            .await
            .unwrap();
        let q = tokio::spawn(async move {
            reader
                .simple_query("SELECT a FROM s LIMIT 2")
                .await
                .map(|m| rows(&m))
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        c.batch_execute("INSERT INTO s VALUES (2)").await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(60), q)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got, vec!["1", "2"]);
        let err = c
            .simple_query("SET statement_timeout = 'soon'")
            .await
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("22023"));
    });
}

#[test]
fn pg_cancel_backend_and_pg_terminate_backend_reach_other_sessions() {
    let server = TestServer::start(bin(), &["--workers", "1"]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let admin = server.client().await.unwrap();
        admin
            .batch_execute("CREATE STREAM s (a BIGINT); CREATE USER bob WITH PASSWORD 'pw-of-bob'")
            .await
            .unwrap();
        let victim = server.client().await.unwrap();
        let pid: i64 = victim
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        // Cancel: the running statement ends with 57014, the session stays.
        let running = tokio::spawn(async move {
            let r = victim.simple_query("SELECT a FROM s").await;
            (victim, r)
        });
        drizzle_sql_tests::eventually(Duration::from_secs(30), || async {
            let q = show(&admin, "SHOW QUERIES").await?;
            Ok((!q.is_empty()).then_some(()))
        })
        .await
        .unwrap();
        // pg_stat_activity shows it running, and the asking session too.
        let activity = show(
            &admin,
            "SELECT pid, usename, datname, state, query, backend_type FROM pg_stat_activity",
        )
        .await
        .unwrap();
        let running_row = activity
            .iter()
            .find(|r| r["pid"] == pid.to_string())
            .unwrap_or_else(|| panic!("{activity:?}"));
        assert_eq!(running_row["state"], "active", "{running_row:?}");
        assert_eq!(running_row["query"], "SELECT a FROM s", "{running_row:?}");
        assert_eq!(running_row["usename"], "test", "{running_row:?}");
        assert_eq!(running_row["backend_type"], "client backend");
        assert!(
            activity
                .iter()
                .any(|r| r["query"].contains("pg_stat_activity") && r["state"] == "active"),
            "{activity:?}"
        );
        // Another role may not signal it.
        let bob = connect(&server, "bob").await;
        let err = bob
            .simple_query(&format!("SELECT pg_cancel_backend({pid})"))
            .await
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("42501"));
        assert_eq!(
            one(&admin, &format!("SELECT pg_cancel_backend({pid})")).await,
            "t"
        );
        let (victim, r) = tokio::time::timeout(Duration::from_secs(30), running)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(code(&r.unwrap_err()).as_deref(), Some("57014"));
        assert_eq!(one(&victim, "SELECT 7").await, "7");
        // No such backend: false.
        assert_eq!(one(&admin, "SELECT pg_cancel_backend(999999)").await, "f");
        // Terminate: 57P01 and the connection is closed.
        let running = tokio::spawn(async move { victim.simple_query("SELECT a FROM s").await });
        drizzle_sql_tests::eventually(Duration::from_secs(30), || async {
            let q = show(&admin, "SHOW QUERIES").await?;
            Ok((!q.is_empty()).then_some(()))
        })
        .await
        .unwrap();
        assert_eq!(
            one(&admin, &format!("SELECT pg_terminate_backend({pid})")).await,
            "t"
        );
        let err = tokio::time::timeout(Duration::from_secs(30), running)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("57P01"), "{err:?}");
    });
}

const OBJECTS: &str =
    "CREATE STREAM clicks (k BIGINT, url TEXT, ts TIMESTAMP) WITH (partitions = 2);
     CREATE TABLE users (id INT NOT NULL, name TEXT);
     CREATE MATERIALIZED VIEW per_key AS SELECT k, count(*) AS n FROM clicks GROUP BY k;";

/// Runs psql's meta-commands against the server; fails on any error.
fn psql(server: &TestServer, commands: &[&str]) -> String {
    let mut cmd = std::process::Command::new("psql");
    cmd.arg(format!(
        "host=127.0.0.1 port={} user=alice dbname=analytics",
        server.port
    ))
    .args(["-X", "-v", "ON_ERROR_STOP=1"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = cmd.output().expect("psql runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success() && !stderr.contains("ERROR"),
        "psql {commands:?} failed:\n{stdout}\n{stderr}"
    );
    stdout
}

#[test]
fn psql_lists_and_describes_streams_tables_and_views() {
    let server = TestServer::start(bin(), &["--workers", "1"]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = server.client().await.unwrap();
        c.batch_execute(OBJECTS).await.unwrap();
    });
    let out = psql(&server, &["\\l"]);
    assert!(out.contains("analytics") && out.contains("UTF8"), "{out}");
    let out = psql(&server, &["\\dn"]);
    assert!(out.contains("public"), "{out}");
    let out = psql(&server, &["\\dt"]);
    assert!(
        out.contains("clicks") && out.contains("users") && !out.contains("per_key"),
        "{out}"
    );
    let out = psql(&server, &["\\dm"]);
    assert!(
        out.contains("per_key") && out.contains("materialized view"),
        "{out}"
    );
    let out = psql(&server, &["\\d"]);
    for name in ["clicks", "users", "per_key"] {
        assert!(out.contains(name), "{out}");
    }
    let out = psql(&server, &["\\d users"]);
    assert!(out.contains("Table \"public.users\""), "{out}");
    assert!(
        out.contains("id     | integer |           | not null"),
        "{out}"
    );
    let out = psql(&server, &["\\d clicks"]);
    assert!(
        out.contains("ts     | timestamp without time zone"),
        "{out}"
    );
    let out = psql(&server, &["\\d per_key"]);
    assert!(
        out.contains("Materialized view \"public.per_key\""),
        "{out}"
    );
    assert!(out.contains("n      | bigint"), "{out}");
    let out = psql(&server, &["\\d+ users", "\\dt+", "\\du", "\\df", "\\dv"]);
    assert!(out.contains("Access method: heap"), "{out}");
    let out = psql(&server, &["\\conninfo"]);
    assert!(
        out.contains("database \"analytics\" as user \"alice\""),
        "{out}"
    );
}

#[test]
fn catalog_tables_reflect_the_live_catalog_with_stable_oids() {
    let mut server = TestServer::start(bin(), &["--workers", "1"]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let relations = "SELECT c.oid, n.nspname, c.relname, c.relkind, c.relnatts \
                     FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON c.relnamespace = n.oid \
                     ORDER BY c.oid";
    let before = rt.block_on(async {
        let c = connect(&server, "alice").await;
        c.batch_execute(OBJECTS).await.unwrap();
        let got = rows(&c.simple_query(relations).await.unwrap());
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[0].ends_with("|public|clicks|r|3"), "{got:?}");
        assert!(got[1].ends_with("|public|users|r|2"), "{got:?}");
        assert!(got[2].ends_with("|public|per_key|m|2"), "{got:?}");
        // Columns and their types, as JDBC's getColumns joins them.
        let cols = rows(
            &c.simple_query(
                "SELECT c.relname, a.attnum, a.attname, t.typname, \
                 pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull \
                 FROM pg_catalog.pg_attribute a \
                 JOIN pg_catalog.pg_class c ON a.attrelid = c.oid \
                 JOIN pg_catalog.pg_type t ON a.atttypid = t.oid \
                 WHERE a.attnum > 0 AND NOT a.attisdropped ORDER BY c.oid, a.attnum",
            )
            .await
            .unwrap(),
        );
        assert_eq!(
            cols,
            vec![
                "clicks|1|k|int8|bigint|f",
                "clicks|2|url|text|text|f",
                "clicks|3|ts|timestamp|timestamp without time zone|f",
                "users|1|id|int4|integer|t",
                "users|2|name|text|text|f",
                "per_key|1|k|int8|bigint|f",
                "per_key|2|n|int8|bigint|t",
            ]
        );
        // information_schema, as SQLAlchemy's and Metabase's inspectors read
        // it: as in Postgres, materialized views are not listed there.
        assert_eq!(
            rows(
                &c.simple_query(
                    "SELECT table_catalog, table_schema, table_name, table_type \
                     FROM information_schema.tables ORDER BY table_name"
                )
                .await
                .unwrap()
            ),
            vec![
                "analytics|public|clicks|BASE TABLE",
                "analytics|public|users|BASE TABLE",
            ]
        );
        assert_eq!(
            rows(
                &c.simple_query(
                    "SELECT column_name, ordinal_position, data_type, is_nullable, udt_name \
                     FROM information_schema.columns WHERE table_name = 'users' \
                     ORDER BY ordinal_position"
                )
                .await
                .unwrap()
            ),
            vec!["id|1|integer|NO|int4", "name|2|text|YES|text"]
        );
        assert_eq!(
            rows(
                &c.simple_query(
                    "SELECT schema_name FROM information_schema.schemata ORDER BY 1"
                )
                .await
                .unwrap()
            ),
            vec!["information_schema", "pg_catalog", "public"]
        );
        // Streams are told apart from tables.
        assert_eq!(
            rows(
                &c.simple_query(
                    "SELECT relname, kind, partitions FROM pg_catalog.drizzle_relations ORDER BY oid"
                )
                .await
                .unwrap()
            ),
            vec!["clicks|stream|2", "users|table|NULL", "per_key|materialized view|NULL"]
        );
        assert_eq!(
            one(&c, "SELECT datname FROM pg_database").await,
            "analytics"
        );
        assert_eq!(
            one(&c, "SELECT count(*) FROM pg_matviews WHERE matviewname = 'per_key'").await,
            "1"
        );
        // DBeaver's form: a column and its relation's wildcard; each
        // column comes once.
        let nsp = show(
            &c,
            "select n.oid,n.*,d.description from pg_catalog.pg_namespace n \
             left outer join pg_catalog.pg_description d on d.objoid=n.oid and d.objsubid=0 \
             and d.classoid='pg_namespace'::regclass order by nspname",
        )
        .await
        .unwrap();
        assert_eq!(nsp.len(), 3, "{nsp:?}");
        assert_eq!(nsp[2]["nspname"], "public");
        assert_eq!(nsp[2]["oid"], "2200");
        let stmt = c.prepare("SELECT u.id, u.* FROM users u").await.unwrap();
        let names: Vec<&str> = stmt.columns().iter().map(|c| c.name()).collect();
        assert_eq!(names, vec!["id", "name"]);
        // psycopg2's hstore probe finds nothing; the extended protocol
        // describes catalog queries too.
        let hstore = c
            .query("SELECT oid, typarray FROM pg_type WHERE typname = $1", &[&"hstore"])
            .await
            .unwrap();
        assert!(hstore.is_empty());
        let row = c
            .query_one(
                "SELECT setting FROM pg_settings WHERE name = $1",
                &[&"statement_timeout"],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "0");
        // A dropped relation is gone.
        c.batch_execute("DROP TABLE users").await.unwrap();
        assert_eq!(
            one(&c, "SELECT count(*) FROM pg_class WHERE relname = 'users'").await,
            "0"
        );
        rows(&c.simple_query(relations).await.unwrap())
    });
    // OIDs are the catalog's: the same after a restart.
    server.restart().unwrap();
    let after = rt.block_on(async {
        let c = connect(&server, "alice").await;
        rows(&c.simple_query(relations).await.unwrap())
    });
    assert_eq!(before, after);
}

#[test]
fn jdbc_metadata_lists_schemas_tables_and_columns() {
    let classes = drizzle_sql_tests::compile_java(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/java/JdbcMetadata.java"
    )));
    let server = TestServer::start(bin(), &["--workers", "1"]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = server.client().await.unwrap();
        c.batch_execute(OBJECTS).await.unwrap();
        c.batch_execute("INSERT INTO users VALUES (1, 'ann'), (2, 'bob')")
            .await
            .unwrap();
    });
    let out = std::process::Command::new("java")
        .arg("-cp")
        .arg(format!(
            "{}:{}",
            drizzle_sql_tests::JDBC_JAR,
            classes.path().display()
        ))
        .arg("JdbcMetadata")
        .arg(server.port.to_string())
        .output()
        .expect("java runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("product PostgreSQL 16.0 (Drizzle "),
        "{stdout}"
    );
    for want in [
        "schema public",
        "schema pg_catalog",
        "table clicks TABLE",
        "table users TABLE",
        "table per_key MATERIALIZED VIEW",
        "column users.id int4 1 NO",
        "column users.name text 2 YES",
        "row bob",
    ] {
        assert!(lines.contains(&want), "missing {want:?} in:\n{stdout}");
    }
}

#[test]
fn sqlalchemy_and_pandas_inspect_and_read() {
    let server = TestServer::start(bin(), &["--workers", "1"]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = server.client().await.unwrap();
        c.batch_execute(OBJECTS).await.unwrap();
        c.batch_execute("INSERT INTO users VALUES (1, 'ann'), (2, 'bob')")
            .await
            .unwrap();
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sqlalchemy_check.py");
    run_python_check(&server, script);
}

#[test]
fn asyncpg_copy_in_and_out_text_csv_and_binary() {
    let server = TestServer::start(bin(), &["--workers", "1"]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = server.client().await.unwrap();
        c.batch_execute(
            "CREATE TABLE items (id INT NOT NULL, name TEXT, price DOUBLE PRECISION, at TIMESTAMP)",
        )
        .await
        .unwrap();
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/asyncpg_copy_check.py");
    run_python_check(&server, script);
}

/// Runs a Python client check against `server`; it must print "all
/// checks passed".
fn run_python_check(server: &TestServer, script: &str) {
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(server.port.to_string())
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && stdout.contains("all checks passed"),
        "{stdout}\n{}\n--- server log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
}

/// One catalog query a tool sends, from `tests/tool_queries/replay.sql`.
struct Replay {
    name: String,
    sql: String,
    expect: Vec<String>,
}

fn replays(oids: &[(&str, String)]) -> Vec<Replay> {
    let text = include_str!("tool_queries/replay.sql");
    let fill = |s: &str| {
        oids.iter().fold(s.to_string(), |s, (name, oid)| {
            s.replace(&format!("{{{name}}}"), oid)
        })
    };
    text.split("-- name: ")
        .skip(1)
        .map(|entry| {
            let (name, rest) = entry.split_once('\n').unwrap_or((entry, ""));
            let (expect, sql) = rest.split_once('\n').unwrap_or((rest, ""));
            Replay {
                name: name.trim().to_string(),
                sql: fill(sql.trim()),
                expect: fill(expect.trim_start_matches("-- expect:"))
                    .split_whitespace()
                    .map(str::to_string)
                    .collect(),
            }
        })
        .collect()
}

/// The catalog queries DBeaver, DataGrip, Metabase, Grafana, Superset
/// (SQLAlchemy 1.4 and 2.0) and pgjdbc send on connect and to list schemas,
/// tables and columns, verbatim from their sources (see
/// `tool_queries/README.md`), replayed with the simple protocol (values
/// checked) and the extended one (row counts checked), as the tools send
/// them.
#[test]
fn tool_catalog_queries_replay_with_expected_results() {
    let server = TestServer::start(bin(), &["--workers", "1"]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = format!(
            "host=127.0.0.1 port={} user=drizzle dbname=drizzle",
            server.port
        );
        let (c, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        c.batch_execute(
            "CREATE STREAM bids (auction BIGINT, price BIGINT, bidder VARCHAR, date_time TIMESTAMP, \
               WATERMARK FOR date_time AS date_time - INTERVAL '1' SECOND) WITH (partitions = 2); \
             CREATE TABLE people (id BIGINT, name VARCHAR); \
             CREATE MATERIALIZED VIEW bid_counts AS \
               SELECT auction, count(*) AS n FROM bids GROUP BY auction",
        )
        .await
        .unwrap();
        let mut oids = Vec::new();
        for name in ["bids", "people", "bid_counts"] {
            let oid = one(
                &c,
                &format!("SELECT oid FROM pg_catalog.pg_class WHERE relname = '{name}'"),
            )
            .await;
            oids.push((name, oid));
        }
        let mut failures = Vec::new();
        let all = replays(&oids);
        assert!(all.len() >= 90, "{} replays", all.len());
        for r in &all {
            let messages = match c.simple_query(&r.sql).await {
                Ok(m) => m,
                Err(e) => {
                    failures.push(format!("{}: {e}\n{}", r.name, r.sql));
                    continue;
                }
            };
            let cells: Vec<Vec<Option<String>>> = messages
                .iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                        (0..row.len())
                            .map(|i| row.get(i).map(str::to_string))
                            .collect(),
                    ),
                    _ => None,
                })
                .collect();
            let any_cell = |want: &dyn Fn(&str) -> bool| {
                cells
                    .iter()
                    .any(|row| row.iter().flatten().any(|v| want(v.as_str())))
            };
            for e in &r.expect {
                let (key, value) = e.split_once(['=', '>']).unwrap_or((e.as_str(), ""));
                let ok = match key {
                    "ok" => true,
                    "rows" if e.contains(">=") => {
                        cells.len() >= value.trim_start_matches('=').parse::<usize>().unwrap()
                    }
                    "rows" => cells.len() == value.parse::<usize>().unwrap(),
                    // Values are separated by commas; `+` is a space.
                    "has" => value
                        .split(',')
                        .all(|v| any_cell(&|c| c == v.replace('+', " "))),
                    "contains" => value
                        .split(',')
                        .all(|v| any_cell(&|c| c.contains(&v.replace('+', " ")))),
                    other => panic!("{}: unknown expectation {other}", r.name),
                };
                if !ok {
                    failures.push(format!(
                        "{}: expected {e}, got {} rows: {cells:?}",
                        r.name,
                        cells.len()
                    ));
                }
            }
            // The extended protocol (pgjdbc, pgx, psycopg send queries so):
            // the same statement prepares and returns as many rows.
            let single = !r.sql.trim_start().to_lowercase().starts_with("set ")
                && r.sql.lines().any(|l| !l.trim().is_empty() && !l.trim().starts_with("--"));
            if single {
                match c.query(r.sql.as_str(), &[]).await {
                    Ok(rows) if rows.len() == cells.len() => {}
                    Ok(rows) => failures.push(format!(
                        "{}: extended protocol gave {} rows, simple {}",
                        r.name,
                        rows.len(),
                        cells.len()
                    )),
                    Err(e) => failures.push(format!("{} (extended): {e}", r.name)),
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} replays failed:\n{}",
            failures.len(),
            all.len(),
            failures.join("\n\n")
        );
    });
}
