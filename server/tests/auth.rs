//! Authentication and TLS through real clients: tokio-postgres, psql and
//! psycopg 3 against SCRAM-SHA-256; psql and psycopg over TLS with a CA made
//! here by `openssl`; a server listening beyond loopback without a password
//! refuses to start.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use drizzle_sql_tests::{rows, TestServer};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_drizzle"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

async fn connect(
    port: u16,
    user: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let password = password.replace('\\', "\\\\").replace('\'', "\\'");
    let conn =
        format!("host=127.0.0.1 port={port} user={user} password='{password}' dbname=drizzle");
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn code(e: &tokio_postgres::Error) -> Option<String> {
    e.code().map(|c| c.code().to_string())
}

/// Runs psql with `conninfo` and `sql`; returns (success, stdout+stderr).
fn psql(conninfo: &str, sql: &str, password: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new("psql");
    cmd.args([conninfo, "-X", "-A", "-t", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null());
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    let out = cmd
        .output()
        .expect("psql runs (scripts/test.sh installs it)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Runs a Python snippet with psycopg 3; returns (success, output).
fn python(code: &str) -> (bool, String) {
    let out = Command::new("python3")
        .args(["-c", code])
        .stdin(Stdio::null())
        .output()
        .expect("python3 runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn scram_sha_256_with_tokio_postgres_psql_and_psycopg() {
    let dir = tempfile::tempdir().unwrap();
    let pw_file = dir.path().join("pw");
    std::fs::write(&pw_file, "top secret\n").unwrap();
    let pw_arg = pw_file.display().to_string();
    let mut server = TestServer::start(
        bin(),
        &[
            "--workers",
            "1",
            "--auth",
            "scram-sha-256",
            "--password-file",
            &pw_arg,
        ],
    )
    .unwrap();
    let port = server.port;
    let rt = runtime();
    rt.block_on(async {
        // The superuser logs in with its password.
        let admin = connect(port, "drizzle", "top secret").await.unwrap();
        assert_eq!(
            rows(&admin.simple_query("SELECT 1").await.unwrap()),
            vec!["1"]
        );
        // Wrong password, unknown user, empty password: 28P01.
        for (user, pw) in [("drizzle", "wrong"), ("nobody", "x"), ("drizzle", "")] {
            let Err(e) = connect(port, user, pw).await else {
                panic!("{user}/{pw} was let in");
            };
            assert_eq!(code(&e).as_deref(), Some("28P01"), "{user}/{pw}: {e:?}");
        }
        // Users made with SQL.
        admin
            .batch_execute(
                "CREATE USER alice WITH PASSWORD 'alice pw'; CREATE ROLE bob PASSWORD 'b'",
            )
            .await
            .unwrap();
        let alice = connect(port, "alice", "alice pw").await.unwrap();
        // bob is a ROLE: no LOGIN unless asked.
        let Err(e) = connect(port, "bob", "b").await else {
            panic!("a NOLOGIN role logged in");
        };
        assert_eq!(code(&e).as_deref(), Some("28P01"));
        // A non-superuser cannot manage roles, but may change its own password.
        for sql in [
            "CREATE USER mallory PASSWORD 'm'",
            "ALTER USER drizzle PASSWORD 'mine now'",
            "ALTER USER alice SUPERUSER",
            "DROP USER drizzle",
        ] {
            let e = alice.simple_query(sql).await.unwrap_err();
            assert_eq!(code(&e).as_deref(), Some("42501"), "{sql}: {e:?}");
        }
        alice
            .simple_query("ALTER USER alice WITH PASSWORD 'new alice pw'")
            .await
            .unwrap();
        assert!(connect(port, "alice", "alice pw").await.is_err());
        connect(port, "alice", "new alice pw").await.unwrap();
        // Errors a superuser can make.
        let e = admin.simple_query("CREATE USER alice").await.unwrap_err();
        assert_eq!(code(&e).as_deref(), Some("42710"));
        let e = admin.simple_query("DROP USER nobody").await.unwrap_err();
        assert_eq!(code(&e).as_deref(), Some("42704"));
        admin
            .simple_query("DROP USER IF EXISTS nobody")
            .await
            .unwrap();
        let e = admin.simple_query("DROP USER drizzle").await.unwrap_err();
        assert_eq!(code(&e).as_deref(), Some("55006"));
        let e = admin
            .simple_query("CREATE USER carol CREATEDB")
            .await
            .unwrap_err();
        assert_eq!(code(&e).as_deref(), Some("0A000"));
    });
    // psql: the password from PGPASSWORD; a wrong one is refused.
    let conninfo = |user: &str| format!("host=127.0.0.1 port={port} user={user} dbname=drizzle");
    let (ok, out) = psql(&conninfo("alice"), "SELECT 41 + 1", Some("new alice pw"));
    assert!(ok && out.trim() == "42", "{out}");
    let (ok, out) = psql(&conninfo("alice"), "SELECT 1", Some("nope"));
    assert!(
        !ok && out.contains("password authentication failed"),
        "{out}"
    );
    // psycopg 3.
    let (ok, out) = python(&format!(
        r#"
import psycopg
with psycopg.connect("host=127.0.0.1 port={port} user=alice password='new alice pw' dbname=drizzle") as c:
    assert c.execute("SELECT 7").fetchone() == (7,)
try:
    psycopg.connect("host=127.0.0.1 port={port} user=alice password=bad dbname=drizzle")
    raise SystemExit("a wrong password was accepted")
except psycopg.OperationalError as e:
    assert "password authentication failed" in str(e), e
print("ok")
"#
    ));
    assert!(ok && out.contains("ok"), "{out}");
    // Passwords are stored as SCRAM verifiers, never in clear; they survive a
    // restart, and DROP USER takes effect.
    let catalog = std::fs::read_to_string(server.data_dir.join("catalog.json")).unwrap();
    assert!(catalog.contains("SCRAM-SHA-256$4096:"), "{catalog}");
    for clear in ["top secret", "alice pw", "new alice pw"] {
        assert!(!catalog.contains(clear), "a password in clear: {clear}");
    }
    server.restart().unwrap();
    let port = server.port;
    rt.block_on(async {
        let admin = connect(port, "drizzle", "top secret").await.unwrap();
        connect(port, "alice", "new alice pw").await.unwrap();
        admin.simple_query("DROP USER alice").await.unwrap();
        assert!(connect(port, "alice", "new alice pw").await.is_err());
    });
}

/// Waits (bounded) for a process to exit; its stderr.
fn exits_with_error(mut cmd: Command) -> String {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success(), "the server started");
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return err;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_server_listening_beyond_loopback_needs_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(bin());
    cmd.args([
        "server",
        "--workers",
        "1",
        "--listen",
        "0.0.0.0:0",
        "--data-dir",
    ])
    .arg(dir.path())
    .env_remove("DRIZZLE_PASSWORD");
    let err = exits_with_error(cmd);
    assert!(
        err.contains("requires password authentication") && err.contains("DRIZZLE_PASSWORD"),
        "{err}"
    );
    // --auth scram-sha-256 on loopback without any password: refused too.
    let mut cmd = Command::new(bin());
    cmd.args([
        "server",
        "--workers",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--auth",
        "scram-sha-256",
        "--data-dir",
    ])
    .arg(dir.path())
    .env_remove("DRIZZLE_PASSWORD");
    let err = exits_with_error(cmd);
    assert!(err.contains("no superuser has a password"), "{err}");
}

/// A CA and a server certificate for localhost / 127.0.0.1, made by openssl.
fn make_certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .expect("openssl runs (scripts/test.sh installs it)");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=drizzle test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
}

#[test]
fn tls_with_psql_and_psycopg() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let cert = dir.path().join("server.pem").display().to_string();
    let key = dir.path().join("server.key").display().to_string();
    let ca = dir.path().join("ca.pem").display().to_string();
    let server = TestServer::start(
        bin(),
        &["--workers", "1", "--tls-cert", &cert, "--tls-key", &key],
    )
    .unwrap();
    let port = server.port;
    let base = format!("host=localhost port={port} user=u dbname=drizzle");
    // sslmode=require: encrypted.
    let (ok, out) = psql(&format!("{base} sslmode=require"), "SELECT 1", None);
    assert!(ok && out.trim() == "1", "{out}");
    // verify-full against the CA: the certificate and host name check out.
    let (ok, out) = psql(
        &format!("{base} sslmode=verify-full sslrootcert={ca}"),
        "SELECT 2",
        None,
    );
    assert!(ok && out.trim() == "2", "{out}");
    // ... and psql reports the TLS session.
    let mut cmd = Command::new("psql");
    let out = cmd
        .args([
            &format!("{base} sslmode=verify-full sslrootcert={ca}"),
            "-X",
            "-c",
            "\\conninfo",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SSL") || text.contains("TLS"), "{text}");
    // verify-full against another CA fails.
    let other = tempfile::tempdir().unwrap();
    make_certificates(other.path());
    let (ok, out) = psql(
        &format!(
            "{base} sslmode=verify-full sslrootcert={}",
            other.path().join("ca.pem").display()
        ),
        "SELECT 1",
        None,
    );
    assert!(!ok, "a certificate from another CA was accepted: {out}");
    // Plaintext still works without --tls-required.
    let (ok, out) = psql(&format!("{base} sslmode=disable"), "SELECT 3", None);
    assert!(ok && out.trim() == "3", "{out}");
    // psycopg 3 over TLS.
    let (ok, out) = python(&format!(
        r#"
import psycopg
with psycopg.connect("{base} sslmode=verify-full sslrootcert={ca}") as c:
    assert c.execute("SELECT 5").fetchone() == (5,)
    assert c.pgconn.ssl_in_use
print("ok")
"#
    ));
    assert!(ok && out.contains("ok"), "{out}");
    drop(server);

    // --tls-required refuses plaintext.
    let server = TestServer::start(
        bin(),
        &[
            "--workers",
            "1",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-required",
        ],
    )
    .unwrap();
    let base = format!("host=localhost port={} user=u dbname=drizzle", server.port);
    let (ok, out) = psql(&format!("{base} sslmode=disable"), "SELECT 1", None);
    assert!(!ok && out.contains("TLS connections only"), "{out}");
    let (ok, out) = psql(&format!("{base} sslmode=require"), "SELECT 4", None);
    assert!(ok && out.trim() == "4", "{out}");
    drop(server);

    // Without a certificate, SSLRequest is answered N.
    let server = TestServer::start(bin(), &["--workers", "1"]).unwrap();
    let base = format!("host=localhost port={} user=u dbname=drizzle", server.port);
    let (ok, _) = psql(&format!("{base} sslmode=require"), "SELECT 1", None);
    assert!(!ok, "sslmode=require without a server certificate");
    let (ok, out) = psql(&format!("{base} sslmode=prefer"), "SELECT 6", None);
    assert!(ok && out.trim() == "6", "{out}");
}
