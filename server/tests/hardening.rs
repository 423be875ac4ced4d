//! Hardening regressions through the real interface: object names never
//! reach the filesystem, deep statements and malformed messages never take
//! the server down, text encoding rules, DEALLOCATE / DISCARD, global
//! aggregates in views, and a data directory without its catalog.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drizzle_sql_tests::{eventually, rows, show, TestServer};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_drizzle"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// Every file under `dir` with its contents, skipping `skip`.
fn snapshot(dir: &Path, skip: &[&Path], out: &mut BTreeMap<PathBuf, Vec<u8>>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if skip.iter().any(|s| *s == path) {
            continue;
        }
        if path.is_dir() {
            out.insert(path.clone(), Vec::new());
            snapshot(&path, skip, out);
        } else {
            out.insert(path.clone(), std::fs::read(&path).unwrap());
        }
    }
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[test]
fn object_names_never_reach_the_filesystem() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let victim = root.path().join("victim");
    std::fs::create_dir_all(victim.join("tables")).unwrap();
    std::fs::write(victim.join("keep.txt"), b"precious").unwrap();
    std::fs::write(victim.join("tables").join("t"), b"also precious").unwrap();
    let log = data.with_extension("log");
    let mut before = BTreeMap::new();
    snapshot(root.path(), &[&data, &log], &mut before);

    let absolute = victim.display().to_string();
    let names = [
        "../victim".to_string(),
        "../../victim".to_string(),
        "../../../../../../tmp".to_string(),
        absolute.clone(),
        format!("{absolute}/tables"),
        "..".to_string(),
        ".".to_string(),
        "a b/c d".to_string(),
        "ünï côdé ☃".to_string(),
        "quo\"te".to_string(),
        "back\\slash".to_string(),
    ];
    let mut server = TestServer::start_in(bin(), &data, &["--workers", "1"]).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let c = server.client().await.unwrap();
        for (i, name) in names.iter().enumerate() {
            let t = quote(name);
            let s = quote(&format!("{name} s"));
            let v = quote(&format!("{name} v"));
            c.batch_execute(&format!(
                "CREATE TABLE {t} (a INT); INSERT INTO {t} VALUES ({i}), ({i});
                 CREATE STREAM {s} (a INT); INSERT INTO {s} VALUES ({i});
                 CREATE MATERIALIZED VIEW {v} AS SELECT a, count(*) AS n FROM {s} GROUP BY a;"
            ))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
            let got = rows(
                &c.simple_query(&format!("SELECT count(*) FROM {t}"))
                    .await
                    .unwrap(),
            );
            assert_eq!(got, vec!["2"], "{name}");
            let view = format!("SELECT a, n FROM {v}");
            let want = vec![format!("{i}|1")];
            eventually(Duration::from_secs(30), || async {
                Ok((rows(&c.simple_query(&view).await?) == want).then_some(()))
            })
            .await
            .unwrap_or_else(|e| panic!("view {name}: {e}"));
        }
    });
    // The names survive a restart, with their rows.
    server.restart().unwrap();
    rt.block_on(async {
        let c = server.client().await.unwrap();
        for (i, name) in names.iter().enumerate() {
            let t = quote(name);
            let got = rows(
                &c.simple_query(&format!("SELECT sum(a) FROM {t}"))
                    .await
                    .unwrap(),
            );
            assert_eq!(got, vec![(2 * i).to_string()], "{name} after restart");
        }
        for name in &names {
            let (t, s, v) = (
                quote(name),
                quote(&format!("{name} s")),
                quote(&format!("{name} v")),
            );
            c.batch_execute(&format!(
                "DROP MATERIALIZED VIEW {v}; DROP STREAM {s}; DROP TABLE {t};"
            ))
            .await
            .unwrap_or_else(|e| panic!("drop {name}: {e:?}"));
        }
        // A new object of a dropped name starts empty.
        c.batch_execute("CREATE TABLE \"../victim\" (a INT)")
            .await
            .unwrap();
        let got = rows(
            &c.simple_query("SELECT count(*) FROM \"../victim\"")
                .await
                .unwrap(),
        );
        assert_eq!(got, vec!["0"]);
    });
    let mut after = BTreeMap::new();
    snapshot(root.path(), &[&data, &log], &mut after);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "nothing outside the data directory appeared or went away"
    );
    assert_eq!(before, after, "nothing outside the data directory changed");
    // Inside it, no file or folder is named after an object.
    let mut inside = BTreeMap::new();
    snapshot(&data, &[], &mut inside);
    for path in inside.keys() {
        let rel = path.strip_prefix(&data).unwrap().display().to_string();
        assert!(
            !rel.contains("victim") && !rel.contains(' ') && rel.is_ascii(),
            "a path made from a name: {rel}"
        );
    }
}

#[test]
fn a_data_directory_without_its_catalog_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let mut server = TestServer::start_in(bin(), &data, &["--workers", "1"]).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let c = server.client().await.unwrap();
        c.batch_execute("CREATE STREAM s (a INT); INSERT INTO s VALUES (1), (2)")
            .await
            .unwrap();
    });
    server.kill9();
    std::fs::remove_file(data.join("catalog.json")).unwrap();
    let err = match server.restart() {
        Ok(()) => panic!("a server started over a data directory without its catalog"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("no catalog.json"), "{err}");
    // Moving the old files away (as the message says) lets a new server start,
    // and a new stream of the same name starts empty.
    std::fs::rename(data.join("streams"), root.path().join("old-streams")).unwrap();
    server.restart().unwrap();
    rt.block_on(async {
        let c = server.client().await.unwrap();
        c.batch_execute("CREATE STREAM s (a INT); INSERT INTO s VALUES (7)")
            .await
            .unwrap();
        let got = rows(&c.simple_query("SELECT a FROM s LIMIT 1").await.unwrap());
        assert_eq!(got, vec!["7"], "the old rows stay away");
    });
}

/// `expr op expr op ...` with `n` terms.
fn chain(term: &str, op: &str, n: usize) -> String {
    let mut s = String::with_capacity(n * (term.len() + op.len()));
    for i in 0..n {
        if i > 0 {
            s.push_str(op);
        }
        s.push_str(term);
    }
    s
}

#[test]
fn deep_statements_are_refused_and_never_overflow_a_stack() {
    let server = TestServer::start(bin(), &["--workers", "1"]).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let bystander = server.client().await.unwrap();
        bystander
            .batch_execute("CREATE STREAM s (a BIGINT); INSERT INTO s VALUES (1), (2)")
            .await
            .unwrap();
        let c = server.client().await.unwrap();
        // 1,000 terms run and give the right answer.
        let sum = format!("SELECT {}", chain("1", "+", 1000));
        assert_eq!(rows(&c.simple_query(&sum).await.unwrap()), vec!["1000"]);
        let and = format!("SELECT {}", chain("true", " AND ", 1000));
        assert_eq!(rows(&c.simple_query(&and).await.unwrap()), vec!["t"]);
        let concat = format!("SELECT length({})", chain("'a'", " || ", 1000));
        assert_eq!(rows(&c.simple_query(&concat).await.unwrap()), vec!["1000"]);
        // ... in a continuous query too.
        let live = format!(
            "SELECT a FROM s WHERE {} > 0 LIMIT 2",
            chain("a", " + ", 1000)
        );
        assert_eq!(rows(&c.simple_query(&live).await.unwrap()), vec!["1", "2"]);
        // Deeper statements get 54001, on the same session, which goes on.
        for sql in [
            format!("SELECT {}", chain("1", "+", 10_000)),
            format!("SELECT {}", chain("1", "+", 50_000)),
            format!("SELECT {}", chain("true", " AND ", 10_000)),
            format!("SELECT {}", chain("'a'", " || ", 10_000)),
            format!("SELECT 1 WHERE {}", chain("1 = 1", " OR ", 50_000)),
            format!("SELECT {}1{}", "(".repeat(10_000), ")".repeat(10_000)),
            format!("SELECT a FROM s WHERE {}", chain("a = 1", " OR ", 50_000)),
        ] {
            let err = c.simple_query(&sql).await.unwrap_err();
            let code = err.code().map(|c| c.code().to_string());
            assert_eq!(code.as_deref(), Some("54001"), "{err:?}");
            assert_eq!(rows(&c.simple_query("SELECT 2").await.unwrap()), vec!["2"]);
        }
        // The extended protocol checks the same.
        let err = c
            .prepare(&format!("SELECT {}", chain("$1", "+", 50_000)))
            .await
            .unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("54001"), "{err:?}");
        assert_eq!(
            rows(&bystander.simple_query("SELECT 3").await.unwrap()),
            vec!["3"]
        );
    });
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn startup() -> Vec<u8> {
    let body = b"\x00\x03\x00\x00user\x00fuzz\x00database\x00drizzle\x00\x00";
    let mut v = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

/// Sends `bytes` after a start-up on a fresh connection; returns all the
/// server wrote until it closed or went quiet.
fn exchange(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut all = startup();
    all.extend_from_slice(bytes);
    let _ = s.write_all(&all);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    buf
}

/// SQLSTATEs in a byte stream of backend messages.
fn sqlstates(reply: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 5 <= reply.len() {
        let len = i32::from_be_bytes([reply[i + 1], reply[i + 2], reply[i + 3], reply[i + 4]]);
        let end = (i + 1 + len.max(4) as usize).min(reply.len());
        if reply[i] == b'E' {
            let body = &reply[i + 5..end];
            for field in body.split(|&b| b == 0) {
                if field.first() == Some(&b'C') {
                    out.push(String::from_utf8_lossy(&field[1..]).to_string());
                }
            }
        }
        i = end;
    }
    out
}

#[test]
fn malformed_messages_get_08p01_and_never_panic() {
    let server = TestServer::start(bin(), &["--workers", "1"]).unwrap();
    let rt = runtime();
    let bystander = rt.block_on(server.client()).unwrap();
    // A Bind that declares 5 parameters and sends none.
    let mut bind = b"\0\0".to_vec();
    bind.extend_from_slice(&0i16.to_be_bytes());
    bind.extend_from_slice(&5i16.to_be_bytes());
    let mut msgs = message(b'P', b"\0SELECT 1\0\0\0");
    msgs.extend(message(b'B', &bind));
    msgs.extend(message(b'S', b""));
    let reply = exchange(server.port, &msgs);
    assert_eq!(sqlstates(&reply), vec!["08P01"]);

    // A bounded, repeatable fuzz: 2,000 mutated message sequences.
    let mut execute = b"\0".to_vec();
    execute.extend_from_slice(&0i32.to_be_bytes());
    let mut bind_one = b"\0s\0".to_vec();
    bind_one.extend_from_slice(&0i16.to_be_bytes());
    bind_one.extend_from_slice(&1i16.to_be_bytes());
    bind_one.extend_from_slice(&1i32.to_be_bytes());
    bind_one.push(b'5');
    bind_one.extend_from_slice(&0i16.to_be_bytes());
    let mut parse = b"s\0SELECT $1::INT + 1\0".to_vec();
    parse.extend_from_slice(&1i16.to_be_bytes());
    parse.extend_from_slice(&23u32.to_be_bytes());
    let valid: Vec<u8> = [
        message(b'P', &parse),
        message(b'B', &bind_one),
        message(b'D', b"P\0"),
        message(b'E', &execute),
        message(b'C', b"Ss\0"),
        message(b'S', b""),
        message(b'Q', b"SELECT 1\0"),
    ]
    .concat();
    assert!(
        sqlstates(&exchange(server.port, &valid)).is_empty(),
        "the unmutated sequence is valid"
    );
    let mut x: u64 = 0xdead_beef_cafe_f00d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..2_000 {
        let mut m = valid.clone();
        for _ in 0..1 + next() % 3 {
            let i = next() as usize % m.len();
            match next() % 3 {
                0 => m[i] = next() as u8,
                1 => m.truncate(i.max(1)),
                _ => m[i] = 0xff,
            }
        }
        let reply = exchange(server.port, &m);
        for code in sqlstates(&reply) {
            assert!(
                ["08P01", "22021", "42601", "26000", "34000", "22P02", "42P18", "08000", "0A000"]
                    .contains(&code.as_str())
                    || code.starts_with("22")
                    || code.starts_with("42"),
                "unexpected SQLSTATE {code}"
            );
        }
    }
    assert_eq!(
        rows(&rt.block_on(bystander.simple_query("SELECT 1")).unwrap()),
        vec!["1"]
    );
    let log = server.log();
    assert!(!log.contains("panicked"), "a session panicked:\n{log}");
}

#[test]
fn text_must_be_valid_utf8_without_nul() {
    let server = TestServer::start(bin(), &["--workers", "1"]).unwrap();
    let rt = runtime();
    // Invalid UTF-8 in a Query: 22021, and the session goes on.
    let mut msgs = message(b'Q', b"SELECT 'caf\xe9'\0");
    msgs.extend(message(b'Q', b"SELECT 1\0"));
    msgs.extend(message(b'X', b""));
    let reply = exchange(server.port, &msgs);
    assert_eq!(sqlstates(&reply), vec!["22021"]);
    assert!(
        reply
            .windows(5)
            .any(|w| w == b"SELEC" || w == b"\0\0\0\x011"),
        "the next query ran"
    );
    // In a Parse too.
    let mut msgs = message(b'P', b"\0SELECT '\xff\xfe'\0\0\0");
    msgs.extend(message(b'S', b""));
    assert_eq!(sqlstates(&exchange(server.port, &msgs)), vec!["22021"]);
    rt.block_on(async {
        let c = server.client().await.unwrap();
        c.batch_execute("CREATE TABLE t (s TEXT); CREATE STREAM st (s TEXT)")
            .await
            .unwrap();
        // A NUL in a parameter.
        let err = c
            .execute("INSERT INTO t VALUES ($1)", &[&"a\0b"])
            .await
            .unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("22021"), "{err:?}");
        // In an escape string.
        let err = c
            .simple_query("INSERT INTO t VALUES (E'a\\x00b')")
            .await
            .unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("22021"), "{err:?}");
        // In COPY data.
        let sink = c.copy_in("COPY st FROM STDIN").await.unwrap();
        futures::pin_mut!(sink);
        use futures::SinkExt;
        sink.send(bytes::Bytes::from_static(b"ok\nn\0ul\n"))
            .await
            .unwrap();
        let err = sink.finish().await.unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("22021"), "{err:?}");
        // Nothing was half-applied.
        assert_eq!(
            rows(&c.simple_query("SELECT count(*) FROM t").await.unwrap()),
            vec!["0"]
        );
    });
}

#[test]
fn deallocate_and_discard_all() {
    let server = TestServer::start(bin(), &["--workers", "1"]).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let c = server.client().await.unwrap();
        let stmt = c.prepare("SELECT 1").await.unwrap();
        // tokio-postgres names a client's statements s0, s1, ...
        c.simple_query("DEALLOCATE s0").await.unwrap();
        let err = c.query(&stmt, &[]).await.unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("26000"), "{err:?}");
        let err = c.simple_query("DEALLOCATE nope").await.unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("26000"), "{err:?}");
        let stmt = c.prepare("SELECT 2").await.unwrap();
        c.simple_query("DEALLOCATE PREPARE ALL").await.unwrap();
        assert!(c.query(&stmt, &[]).await.is_err());
        c.simple_query("SET batch_interval = '5ms'").await.unwrap();
        c.simple_query("DISCARD ALL").await.unwrap();
        let got = rows(&c.simple_query("SHOW batch_interval").await.unwrap());
        assert_ne!(got, vec!["5ms"], "DISCARD ALL reset the settings");
        c.simple_query("BEGIN").await.unwrap();
        let err = c.simple_query("DISCARD ALL").await.unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("25001"), "{err:?}");
        c.simple_query("ROLLBACK").await.unwrap();
    });
}

#[test]
fn a_view_of_a_global_aggregate_survives_kill_9() {
    let mut server = TestServer::start(bin(), &["--workers", "1"]).unwrap();
    let rt = runtime();
    let count = |server: &TestServer, want: &'static str| {
        rt.block_on(async {
            let c = server.client().await.unwrap();
            eventually(Duration::from_secs(30), || async {
                let got = rows(&c.simple_query("SELECT n, total FROM v").await?);
                Ok((got == vec![want.to_string()]).then_some(()))
            })
            .await
            .unwrap_or_else(|e| panic!("view never held {want}: {e}\n{}", server.log()));
        })
    };
    rt.block_on(async {
        let c = server.client().await.unwrap();
        c.batch_execute(
            "CREATE STREAM s (a BIGINT);
             CREATE MATERIALIZED VIEW v AS SELECT count(*) AS n, sum(a) AS total FROM s;
             INSERT INTO s VALUES (1), (2), (3);",
        )
        .await
        .unwrap();
    });
    count(&server, "3|6");
    rt.block_on(async {
        let c = server.client().await.unwrap();
        c.batch_execute("INSERT INTO s VALUES (4)").await.unwrap();
    });
    count(&server, "4|10");
    server.kill9();
    server.restart().unwrap();
    count(&server, "4|10");
    rt.block_on(async {
        let c = server.client().await.unwrap();
        c.batch_execute("INSERT INTO s VALUES (5)").await.unwrap();
        let views = show(&c, "SHOW MATERIALIZED VIEWS").await.unwrap();
        assert_eq!(views[0]["status"], "running", "{views:?}");
        assert_eq!(views[0]["error"], "", "{views:?}");
    });
    count(&server, "5|15");
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Waits (bounded) for the server process to exit; its exit code.
fn wait_exit(server: &mut TestServer, within: Duration) -> Option<i32> {
    match server.wait_exit(within) {
        Ok(status) => status.code(),
        Err(e) => panic!("{e}:\n{}", server.log()),
    }
}

#[test]
fn sigterm_shuts_down_gracefully_and_a_second_signal_exits_at_once() {
    let mut server = TestServer::start(bin(), &["--workers", "1"]).unwrap();
    let pid = server.pid().unwrap();
    let rt = runtime();
    let (streaming, idle) = rt.block_on(async {
        let c = server.client().await.unwrap();
        c.batch_execute("CREATE STREAM s (a BIGINT); INSERT INTO s VALUES (1), (2)")
            .await
            .unwrap();
        let streaming = server.client().await.unwrap();
        let idle = server.client().await.unwrap();
        (streaming, idle)
    });
    // A continuous query that would run for ever.
    let query = rt.spawn(async move { streaming.simple_query("SELECT a FROM s").await });
    rt.block_on(async {
        let c = server.client().await.unwrap();
        eventually(Duration::from_secs(30), || async {
            let q = show(&c, "SHOW QUERIES").await?;
            Ok((!q.is_empty()).then_some(()))
        })
        .await
        .unwrap();
    });
    signal(pid, "-TERM");
    let err = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(30), query).await })
        .expect("the query ended")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("57P01"), "{err:?}");
    assert_eq!(wait_exit(&mut server, Duration::from_secs(30)), Some(0));
    // The idle session was closed with the server.
    assert!(rt.block_on(idle.simple_query("SELECT 1")).is_err());
    let log = server.log();
    assert!(log.contains("drizzle server stopped"), "{log}");
    // Acknowledged rows are all there after a restart.
    server.restart().unwrap();
    let pid = server.pid().unwrap();
    rt.block_on(async {
        let c = server.client().await.unwrap();
        let got = rows(&c.simple_query("SELECT a FROM s LIMIT 2").await.unwrap());
        assert_eq!(got, vec!["1", "2"]);
        // A session stuck in COPY FROM STDIN holds the shutdown...
        let stuck = server.client().await.unwrap();
        let sink: tokio_postgres::CopyInSink<bytes::Bytes> =
            stuck.copy_in("COPY s FROM STDIN").await.unwrap();
        std::mem::forget(sink);
        std::mem::forget(stuck);
    });
    signal(pid, "-TERM");
    // ... until a second signal, which exits at once.
    rt.block_on(async {
        eventually(Duration::from_secs(30), || async {
            Ok(server.log().contains("shutting down").then_some(()))
        })
        .await
        .unwrap();
    });
    signal(pid, "-INT");
    assert_eq!(wait_exit(&mut server, Duration::from_secs(5)), Some(1));
    assert!(server.log().contains("again: exiting now"));
}

/// A corrupt frame in the middle of a stream's log: the server refuses to
/// start (naming the file and offset) instead of cutting acknowledged rows;
/// `drizzle repair` quarantines the frame and keeps every good one.
#[test]
fn a_corrupt_log_is_refused_then_repaired_without_losing_good_rows() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let mut server = TestServer::start_in(bin(), &data, &["--workers", "1"]).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let c = server.client().await.unwrap();
        c.batch_execute("CREATE STREAM s (a BIGINT)").await.unwrap();
        for i in 0..5 {
            c.batch_execute(&format!(
                "INSERT INTO s VALUES ({}), ({})",
                i * 10,
                i * 10 + 1
            ))
            .await
            .unwrap();
        }
    });
    server.kill9();
    let streams = data.join("streams");
    let dir = std::fs::read_dir(&streams)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let log = dir.join("p0.log");
    let mut bytes = std::fs::read(&log).unwrap();
    // 16 bytes overwritten in the middle of the file.
    let mid = bytes.len() / 2;
    bytes[mid..mid + 16].copy_from_slice(&[0x5a; 16]);
    std::fs::write(&log, &bytes).unwrap();
    let err = server.restart().unwrap_err().to_string();
    assert!(
        err.contains(&log.display().to_string()) && err.contains("drizzle repair"),
        "{err}"
    );
    assert_eq!(std::fs::read(&log).unwrap(), bytes, "nothing was cut");
    let out = std::process::Command::new(bin())
        .args(["repair", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.contains("moved to"),
        "{report}"
    );
    server.restart().unwrap();
    rt.block_on(async {
        let c = server.client().await.unwrap();
        let got = rows(&c.simple_query("SELECT a FROM s LIMIT 8").await.unwrap());
        // One statement's two rows were in the damaged frame; the other
        // eight are all there.
        assert_eq!(got.len(), 8, "{got:?}");
        let all: Vec<String> = (0..5)
            .flat_map(|i| [format!("{}", i * 10), format!("{}", i * 10 + 1)])
            .collect();
        assert!(got.iter().all(|r| all.contains(r)), "{got:?}");
    });
}

/// Integer `+`, `-` and `*` raise 22003 on overflow as in Postgres, in
/// projections, filters, group keys, aggregate arguments and constants of
/// finite queries, and in continuous queries on workers; in-range
/// arithmetic is unchanged.
#[test]
fn integer_expression_overflow_is_an_error_not_a_wrap() {
    let server = TestServer::start(bin(), &["--workers", "2"]).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let c = server.client().await.unwrap();
        c.batch_execute(
            "CREATE TABLE t (k BIGINT, a BIGINT, x INT);
             INSERT INTO t VALUES (1, 9223372036854775807, 2147483647), (2, -9223372036854775807, 7);
             CREATE STREAM s (k BIGINT, a BIGINT);",
        )
        .await
        .unwrap();
        let code = |e: tokio_postgres::Error| e.code().map(|c| c.code().to_string());
        for sql in [
            "SELECT a + 1 FROM t WHERE k = 1",
            "SELECT a - 2 FROM t WHERE k = 2",
            "SELECT a * 2 FROM t",
            "SELECT x + x FROM t WHERE k = 1",
            "SELECT k FROM t WHERE a + 1 > 0",
            "SELECT sum(a * 3) FROM t",
            "SELECT a + 1 AS b, count(*) FROM t GROUP BY a + 1",
            "SELECT 9223372036854775807 + 1",
            "SELECT 4611686018427387904 * 2",
            "SELECT -9223372036854775807 - 2",
        ] {
            let err = c.simple_query(sql).await.unwrap_err();
            assert_eq!(code(err).as_deref(), Some("22003"), "{sql}");
        }
        let got = rows(
            &c.simple_query("SELECT a - 1, x - 1, 9223372036854775806 + 1 FROM t WHERE k = 1")
                .await
                .unwrap(),
        );
        assert_eq!(
            got,
            vec!["9223372036854775806|2147483646|9223372036854775807"]
        );
        // A continuous query fails with the SQLSTATE (evaluated on a worker).
        c.batch_execute("INSERT INTO s VALUES (1, 5), (2, 9223372036854775807)")
            .await
            .unwrap();
        let err = c
            .simple_query("SELECT k, a + 1 AS b FROM s LIMIT 5")
            .await
            .unwrap_err();
        assert_eq!(code(err).as_deref(), Some("22003"));
        let err = c
            .simple_query("SELECT k, sum(a * 2) AS total FROM s GROUP BY k LIMIT 5")
            .await
            .unwrap_err();
        assert_eq!(code(err).as_deref(), Some("22003"));
        let got = rows(
            &c.simple_query("SELECT k, a + 1 AS b FROM s WHERE k = 1 LIMIT 1")
                .await
                .unwrap(),
        );
        assert_eq!(got, vec!["1|6"]);
    });
}

/// `sum` of integers raises 22003 on overflow as in Postgres, in finite and
/// in continuous queries (a continuous query fails with that SQLSTATE);
/// in-range sums are unchanged.
#[test]
fn integer_sum_overflow_is_an_error_not_a_wrap() {
    let server = TestServer::start(bin(), &["--workers", "2"]).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let c = server.client().await.unwrap();
        c.batch_execute(
            "CREATE TABLE t (k BIGINT, a BIGINT);
             INSERT INTO t VALUES (1, 9223372036854775807), (1, 1), (2, 5);
             CREATE STREAM s (k BIGINT, a BIGINT);",
        )
        .await
        .unwrap();
        let code = |e: tokio_postgres::Error| e.code().map(|c| c.code().to_string());
        for sql in ["SELECT sum(a) FROM t", "SELECT k, sum(a) FROM t GROUP BY k"] {
            let err = c.simple_query(sql).await.unwrap_err();
            assert_eq!(code(err).as_deref(), Some("22003"), "{sql}");
        }
        let got = rows(
            &c.simple_query("SELECT k, sum(a) FROM t WHERE k = 2 GROUP BY k")
                .await
                .unwrap(),
        );
        assert_eq!(got, vec!["2|5"]);
        // A continuous aggregate fails with the SQLSTATE.
        c.batch_execute("INSERT INTO s VALUES (1, 9223372036854775807), (1, 5)")
            .await
            .unwrap();
        let err = c
            .simple_query("SELECT k, sum(a) AS total FROM s GROUP BY k LIMIT 5")
            .await
            .unwrap_err();
        assert_eq!(code(err).as_deref(), Some("22003"));
        assert_eq!(
            rows(&c.simple_query("SELECT 1 + 1").await.unwrap()),
            vec!["2"]
        );
    });
}

/// Runs a `GROUP BY` over ever-new keys, which must fail with 53200;
/// returns the error's message.
async fn out_of_memory(c: &tokio_postgres::Client) -> String {
    let err = tokio::time::timeout(
        Duration::from_secs(180),
        c.simple_query("SELECT k, count(*) AS n FROM keys GROUP BY k"),
    )
    .await
    .expect("the query must fail, not run forever")
    .unwrap_err();
    let code = err.code().map(|c| c.code().to_string());
    assert_eq!(code.as_deref(), Some("53200"), "{err:?}");
    err.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default()
}

/// Item 17: keyed state has a budget. A `GROUP BY` over ever-new keys fails
/// with 53200 naming its operator once past `SET query_memory_limit`;
/// `SHOW QUERIES` shows each query's state bytes and keys; past the
/// server-wide budget the largest query fails while a small one goes on.
#[test]
fn query_state_has_a_memory_budget() {
    let server =
        TestServer::start(bin(), &["--workers", "2", "--server-memory-limit", "24MB"]).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let c = server.client().await.unwrap();
        c.batch_execute(
            "CREATE STREAM keys (k BIGINT) WITH (connector = 'datagen', \
               rows_per_second = '100000', partitions = '2', fields.k.kind = 'sequence');
             CREATE MATERIALIZED VIEW small AS SELECT k % 100 AS g, count(*) AS n FROM keys GROUP BY k % 100;",
        )
        .await
        .unwrap();
        let code = |e: &tokio_postgres::Error| e.code().map(|c| c.code().to_string());
        let setting = |m: Vec<tokio_postgres::SimpleQueryMessage>| rows(&m);
        assert_eq!(
            setting(c.simple_query("SHOW query_memory_limit").await.unwrap()),
            vec!["1GB"]
        );
        let bad = c
            .simple_query("SET query_memory_limit = 'lots'")
            .await
            .unwrap_err();
        assert_eq!(code(&bad).as_deref(), Some("22023"));
        c.batch_execute("SET query_memory_limit = '4MB'").await.unwrap();
        assert_eq!(
            setting(c.simple_query("SHOW query_memory_limit").await.unwrap()),
            vec!["4MB"]
        );

        // The view's state is shown: 100 keys, some bytes.
        let view = eventually(Duration::from_secs(60), || async {
            let rows = show(&c, "SHOW QUERIES").await?;
            Ok(rows.into_iter().find(|r| {
                r["query"].contains("small") && r["state_keys"] == "100" && r["state_bytes"] != "0"
            }))
        })
        .await
        .unwrap();
        assert_eq!(view["memory_limit"], "1GB", "{view:?}");

        // Ever-new keys under a 4 MB budget: 53200 naming the operator.
        let message = out_of_memory(&c).await;
        assert!(message.contains("query memory limit exceeded"), "{message}");
        assert!(message.contains("AggregateFinalExec"), "{message}");
        assert!(message.contains("4.0 MB"), "{message}");

        // Unlimited for this query, but the server's 24 MB budget stops it;
        // the small view keeps running.
        c.batch_execute("SET query_memory_limit = 'unlimited'").await.unwrap();
        let message = out_of_memory(&c).await;
        assert!(message.contains("server memory limit exceeded"), "{message}");
        let before = eventually(Duration::from_secs(10), || async {
            let rows = show(&c, "SHOW QUERIES").await?;
            Ok(rows.into_iter().find(|r| r["query"].contains("small")))
        })
        .await
        .unwrap();
        let batches = |r: &std::collections::HashMap<String, String>| r["batches"].parse::<u64>().unwrap();
        eventually(Duration::from_secs(30), || async {
            let rows = show(&c, "SHOW QUERIES").await?;
            Ok(rows
                .into_iter()
                .find(|r| r["query"].contains("small") && batches(r) > batches(&before) + 5))
        })
        .await
        .unwrap();
        let status = rows(
            &c.simple_query("SHOW MATERIALIZED VIEWS").await.unwrap(),
        );
        assert!(status.iter().any(|r| r.contains("small") && r.contains("running")), "{status:?}");
        c.batch_execute("RESET query_memory_limit").await.unwrap();
        assert_eq!(
            setting(c.simple_query("SHOW query_memory_limit").await.unwrap()),
            vec!["1GB"]
        );
    });
}

/// Item 17: keyed-state checkpoints are incremental. After a full
/// checkpoint of 20,000 keys, checkpoints of a few changed keys are a small
/// fraction of it; a restart restores the view from the chain (full
/// snapshot plus deltas) with every count right.
#[test]
fn keyed_state_checkpoints_are_incremental() {
    let insert = |rows: &mut dyn Iterator<Item = (i64, i64)>| {
        let values: Vec<String> = rows.map(|(k, v)| format!("({k}, {v})")).collect();
        format!("INSERT INTO ev VALUES {}", values.join(", "))
    };
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start_in(bin(), dir.path(), &["--workers", "2"]).unwrap();
    let rt = runtime();
    let checkpoint_bytes = |rows: &[std::collections::HashMap<String, String>]| {
        rows.iter()
            .find(|r| r["query"].contains("per_key"))
            .and_then(|r| {
                Some((
                    r["checkpoint_batch"].parse::<u64>().ok()?,
                    r["checkpoint_bytes"].parse::<u64>().ok()?,
                ))
            })
    };
    let full = rt.block_on(async {
        let c = server.client().await.unwrap();
        c.batch_execute(
            "CREATE STREAM ev (k BIGINT, v BIGINT);
             CREATE MATERIALIZED VIEW per_key AS SELECT k, count(*) AS n, sum(v) AS total FROM ev GROUP BY k;",
        )
        .await
        .unwrap();
        c.batch_execute(&insert(&mut (1..=20000).map(|k| (k, k))))
            .await
            .unwrap();
        // A checkpoint that holds all 20,000 keys.
        let (batch, full) = eventually(Duration::from_secs(60), || async {
            let rows = show(&c, "SHOW QUERIES").await?;
            let q = rows.iter().find(|r| r["query"].contains("per_key")).cloned();
            Ok(q.and_then(|q| {
                (q["state_keys"] == "20000").then_some(())?;
                checkpoint_bytes(&rows).filter(|(_, b)| *b > 200_000)
            }))
        })
        .await
        .unwrap();
        // Ten changed keys: the next checkpoints hold the change, not the state.
        c.batch_execute(&insert(&mut (1..=10).map(|k| (k, 1))))
            .await
            .unwrap();
        // (Every 32nd checkpoint compacts the chain: look for a delta.)
        let small = eventually(Duration::from_secs(60), || async {
            let rows = show(&c, "SHOW QUERIES").await?;
            Ok(checkpoint_bytes(&rows).filter(|(b, bytes)| *b > batch + 2 && bytes * 20 < full))
        })
        .await;
        if let Ok((_, bytes)) = &small {
            eprintln!("checkpoint of 20,000 keys: {full} bytes; after 10 changed keys: {bytes} bytes");
        }
        assert!(
            small.is_ok(),
            "no checkpoint after 10 changed keys was under 5% of the {full} bytes of 20,000 keys: {:?}",
            checkpoint_bytes(&show(&c, "SHOW QUERIES").await.unwrap())
        );
        full
    });
    // More changes, then a crash: the view restarts from full + deltas.
    rt.block_on(async {
        let c = server.client().await.unwrap();
        c.batch_execute(&insert(&mut (5..=15).map(|k| (k, 2))))
            .await
            .unwrap();
        let mark = show(&c, "SHOW QUERIES").await.unwrap();
        let (after, _) = checkpoint_bytes(&mark).unwrap();
        eventually(Duration::from_secs(60), || async {
            let rows = show(&c, "SHOW QUERIES").await?;
            Ok(checkpoint_bytes(&rows).filter(|(b, _)| *b > after + 2))
        })
        .await
        .unwrap();
    });
    server.kill9();
    server.restart().unwrap();
    rt.block_on(async {
        let c = server.client().await.unwrap();
        // The oracle, computed from the three inserts: 20,000 keys; keys
        // 1-10 got one more row of 1, keys 5-15 one more of 2.
        let want = vec!["20000|20021|200010032|200010165".to_string()];
        let summary = "SELECT count(*), sum(n), sum(total), sum(n * k) FROM per_key";
        let got = eventually(Duration::from_secs(60), || async {
            let r = rows(&c.simple_query(summary).await?);
            Ok((r == want).then_some(r))
        })
        .await;
        assert!(
            got.is_ok(),
            "per_key after restart: {:?} (full checkpoint was {full} bytes)",
            rows(&c.simple_query(summary).await.unwrap())
        );
        let fine = rows(
            &c.simple_query(
                "SELECT k, n, total FROM per_key WHERE k IN (1, 5, 10, 11, 15, 16) ORDER BY k",
            )
            .await
            .unwrap(),
        );
        assert_eq!(
            fine,
            vec!["1|2|2", "5|3|8", "10|3|13", "11|2|13", "15|2|17", "16|1|16"]
        );
    });
}
