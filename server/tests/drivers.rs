//! Real drivers against the real server: psycopg 3 (named cursors, COPY,
//! DEALLOCATE after DDL), asyncpg (cursors), psql (`FETCH_COUNT`) and JDBC
//! (`setFetchSize`) read continuous queries to their end. `scripts/test.sh`
//! installs psycopg, asyncpg, psql, a JDK and Debian's PostgreSQL JDBC driver.

use std::path::Path;
use std::process::Command;

use drizzle_sql_tests::TestServer;

#[test]
fn drivers_read_continuous_queries_to_the_end() {
    // JdbcFetch, compiled by the JDK's javac.
    let classes = drizzle_sql_tests::compile_java(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/java/JdbcFetch.java"
    )));
    let server = TestServer::start(
        Path::new(env!("CARGO_BIN_EXE_drizzle")),
        &["--workers", "2", "--batch-interval", "20ms"],
    )
    .unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/drivers_check.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(server.port.to_string())
        .arg(classes.path())
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "drivers check failed:\n{}\n{}\n--- server log ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("JDBC setFetchSize"), "{stdout}");
}
