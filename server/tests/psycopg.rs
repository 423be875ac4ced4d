//! psycopg 3 (Python) against the real server: parameters through the
//! extended protocol, binary results, SQLSTATE errors, server-side cursors.
//! `scripts/test.sh` installs psycopg.

use std::process::Command;

use drizzle_sql_tests::TestServer;

#[test]
fn psycopg_driver_works() {
    let server = TestServer::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_drizzle")),
        &["--workers", "2"],
    )
    .unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/psycopg_check.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(server.port.to_string())
        .output()
        .expect("python3 runs (scripts/test.sh installs psycopg)");
    assert!(
        out.status.success(),
        "psycopg check failed:\n{}\n{}\n--- server log ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
}
