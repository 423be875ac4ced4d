//! Drives the real `psql` binary against the real server: the README quick
//! start, live `COPY (SELECT ...) TO STDOUT` delivery, and Ctrl-C cancel.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use drizzle_sql_tests::{eventually, TestServer};

fn server() -> TestServer {
    TestServer::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_drizzle")),
        &["--workers", "2"],
    )
    .expect("server starts")
}

/// `psql` connected to the test server; `wrapper` runs it under another program (stdbuf).
fn psql_command(server: &TestServer, wrapper: &[&str]) -> Command {
    let port = server.port.to_string();
    let base = [
        "-X",
        "-q",
        "-h",
        "127.0.0.1",
        "-p",
        port.as_str(),
        "-U",
        "demo",
        "-d",
        "demo",
    ];
    let mut cmd = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg("psql");
            c
        }
        None => Command::new("psql"),
    };
    cmd.args(base);
    cmd
}

fn psql(server: &TestServer, args: &[&str]) -> std::process::Output {
    psql_command(server, &[])
        .args(args)
        .output()
        .expect("psql runs (scripts/test.sh installs postgresql-client)")
}

#[test]
fn readme_quick_start_through_psql() {
    let server = server();
    let script = r#"
CREATE STREAM clicks (user_id BIGINT, url TEXT, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '2' SECOND);
CREATE TABLE users (id BIGINT, name TEXT);
INSERT INTO users VALUES (1, 'ann'), (2, 'bob');
INSERT INTO clicks VALUES (1, '/home', '2024-01-01 00:00:01'), (2, '/cart', '2024-01-01 00:00:04'), (1, '/pay', '2024-01-01 00:00:13');
\pset format unaligned
SELECT u.name, c.url FROM clicks c JOIN users u ON c.user_id = u.id LIMIT 2;
CREATE MATERIALIZED VIEW clicks_per_user AS SELECT user_id, count(*) AS n FROM clicks GROUP BY user_id;
\copy clicks from stdin csv
2,/more,2024-01-01 00:00:30
\.
SELECT window_start, user_id, count(*) AS c FROM TUMBLE(clicks, ts, INTERVAL '10' SECOND) GROUP BY window_start, user_id LIMIT 3;
EXPLAIN SELECT window_start, count(*) FROM TUMBLE(clicks, ts, INTERVAL '10' SECOND) GROUP BY window_start;
"#;
    let out = psql(&server, &["-v", "ON_ERROR_STOP=1", "-c", script]);
    // psql -c runs the whole string as one simple query; use -f for meta-commands.
    let _ = out;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("quickstart.sql");
    std::fs::write(&file, script).unwrap();
    let out = psql(
        &server,
        &["-v", "ON_ERROR_STOP=1", "-f", file.to_str().unwrap()],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "psql failed: {stdout}\n{stderr}\n{}",
        server.log()
    );
    assert!(stdout.contains("ann|/home"), "{stdout}");
    assert!(stdout.contains("bob|/cart"), "{stdout}");
    assert!(stdout.contains("2024-01-01 00:00:00|1|1"), "{stdout}");
    assert!(stdout.contains("2024-01-01 00:00:00|2|1"), "{stdout}");
    assert!(stdout.contains("2024-01-01 00:00:10|1|1"), "{stdout}");
    assert!(stdout.contains("WindowAssignExec"), "{stdout}");
    assert!(stdout.contains("ShuffleWriteExec"), "{stdout}");

    // The view catches up with all four rows.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = server.client().await.unwrap();
        eventually(Duration::from_secs(20), || async {
            let rows = client
                .simple_query("SELECT user_id, n FROM clicks_per_user ORDER BY user_id")
                .await?;
            let got: Vec<String> = rows
                .iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => {
                        Some(format!("{}:{}", r.get(0)?, r.get(1)?))
                    }
                    _ => None,
                })
                .collect();
            Ok((got == ["1:2", "2:2"]).then_some(()))
        })
        .await
        .expect("view reaches 1:2, 2:2");
    });

    // A bad COPY names the line and ingests nothing.
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "3,/ok,2024-01-01 00:00:40\n4,/bad,not a time\n").unwrap();
    let out = psql(
        &server,
        &["-c", &format!("\\copy clicks from '{}' csv", bad.display())],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 2"), "{stderr}");
    let out = psql(&server, &["-A", "-t", "-c", "SHOW STREAMS"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("|log|1|4"), "still 4 rows: {shown}");

    // Errors come back with their SQLSTATE through psql.
    let out = psql(
        &server,
        &["-v", "VERBOSITY=verbose", "-c", "SELECT * FROM nowhere"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("42P01"), "{stderr}");
}

#[test]
fn copy_to_stdout_delivers_rows_live_and_ctrl_c_cancels() {
    let server = server();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(server.client()).unwrap();
    rt.block_on(
        client.batch_execute(
            "CREATE STREAM ticks (n BIGINT, sym TEXT); SET batch_interval = '10ms';",
        ),
    )
    .unwrap();
    // psql's stdout is line-buffered at a terminal but block-buffered on a pipe;
    // stdbuf gives the pipe a terminal's buffering.
    let mut child = psql_command(&server, &["stdbuf", "-oL"])
        .args([
            "-c",
            "COPY (SELECT n, upper(sym) FROM ticks WHERE n >= 0) TO STDOUT",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql runs");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // First rows are inserted and read back before later rows exist.
    rt.block_on(client.batch_execute("INSERT INTO ticks VALUES (1, 'a'), (2, 'b')"))
        .unwrap();
    let first = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("first row arrives while the query runs");
    let second = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("second row");
    assert_eq!((first.as_str(), second.as_str()), ("1\tA", "2\tB"));
    assert!(rx.try_recv().is_err(), "no row before it is inserted");
    rt.block_on(client.batch_execute("INSERT INTO ticks VALUES (3, 'c')"))
        .unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(20)).unwrap(), "3\tC");

    // Ctrl-C: psql sends a CancelRequest on a new connection.
    let listed = rt.block_on(eventually(Duration::from_secs(10), || async {
        let rows = client.simple_query("SHOW QUERIES").await?;
        Ok(rows.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(1).is_some_and(|q| q.contains("ticks")))).then_some(()))
    }));
    assert!(listed.is_ok(), "query listed in SHOW QUERIES");
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("canceling statement due to user request"),
        "psql said: {stderr}"
    );
    // The query is gone and the server still serves.
    rt.block_on(eventually(Duration::from_secs(10), || async {
        let rows = client.simple_query("SHOW QUERIES").await?;
        Ok((!rows
            .iter()
            .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))))
        .then_some(()))
    }))
    .expect("cancelled query freed");
}
