//! `kill -9` during a stream of INSERTs: after a restart every acknowledged
//! row is there, and a materialized view has the contents of a run without
//! the crash.

use std::time::Duration;

use drizzle_sql_tests::{eventually, TestServer};
use tokio_postgres::SimpleQueryMessage;

fn rows(msgs: &[SimpleQueryMessage]) -> Vec<Vec<String>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

#[test]
fn acknowledged_rows_and_views_survive_kill_9() {
    let mut server = TestServer::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_drizzle")),
        &["--workers", "2"],
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let acked_count = rt.block_on(async {
        let client = server.client().await.unwrap();
        client
            .batch_execute(
                "CREATE STREAM ev (id BIGINT, k BIGINT); \
                 CREATE MATERIALIZED VIEW per_k AS SELECT k, count(*) AS n, sum(id) AS s FROM ev GROUP BY k",
            )
            .await
            .unwrap();
        // A writer that records what was acknowledged; the server dies under it.
        let writer = server.client().await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            for i in 0..100_000i64 {
                let sql = format!("INSERT INTO ev VALUES ({i}, {}), ({}, {})", i % 7, -i - 1, i % 7);
                match writer.simple_query(&sql).await {
                    Ok(_) => {
                        let _ = tx.send(i);
                    }
                    Err(_) => break,
                }
            }
        });
        // Let some inserts land, then crash.
        let mut acked = Vec::new();
        while acked.len() < 150 {
            match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await {
                Ok(Some(i)) => acked.push(i),
                _ => panic!("inserts stalled at {}", acked.len()),
            }
        }
        drop(task);
        acked.len() as i64
    });
    server.kill9();
    server.restart().unwrap();
    rt.block_on(async {
        let client = server.client().await.unwrap();
        // Count rows through a continuous query over the recovered log.
        let shown = rows(&client.simple_query("SHOW STREAMS").await.unwrap());
        let total: i64 = shown[0][5].parse().unwrap();
        assert!(
            total >= acked_count * 2,
            "rows after restart {total} < acknowledged {}",
            acked_count * 2
        );
        assert_eq!(total % 2, 0, "a statement was half applied");
        let ids = rows(
            &client
                .simple_query(&format!(
                    "SELECT id FROM ev WHERE id >= 0 LIMIT {}",
                    total / 2
                ))
                .await
                .unwrap(),
        );
        let mut ids: Vec<i64> = ids.iter().map(|r| r[0].parse().unwrap()).collect();
        ids.sort();
        for (expect, got) in ids.iter().enumerate() {
            assert_eq!(
                *got, expect as i64,
                "acknowledged rows are a gap-free prefix"
            );
        }
        let n = ids.len() as i64;
        // The view, rebuilt from the durable log, equals the aggregate of every row.
        let mut expected: Vec<Vec<String>> = (0..7)
            .filter(|k| (0..n).any(|i| i % 7 == *k))
            .map(|k| {
                let statements = (0..n).filter(|i| i % 7 == k).count() as i64;
                // Each statement adds i and -i-1: the sum is -1 per statement.
                vec![
                    k.to_string(),
                    (statements * 2).to_string(),
                    (-statements).to_string(),
                ]
            })
            .collect();
        expected.sort();
        eventually(Duration::from_secs(30), || async {
            let got = rows(
                &client
                    .simple_query("SELECT k, n, s FROM per_k ORDER BY k")
                    .await?,
            );
            Ok((got == expected).then_some(()))
        })
        .await
        .expect("view equals the aggregate of all recovered rows");
    });
}

/// A view over a view reads the first view's durable output log: after a
/// `kill -9` and a restart both resume, and the second equals the batch
/// query over the first (no row lost or counted twice), before and after
/// rows that arrive once the server is back.
#[test]
fn a_view_over_a_view_survives_kill_9() {
    let mut server = TestServer::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_drizzle")),
        &["--workers", "2"],
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let insert = |from: i64, to: i64| {
        (from..to)
            .map(|i| format!("({i}, {})", i % 9))
            .collect::<Vec<_>>()
            .join(", ")
    };
    rt.block_on(async {
        let client = server.client().await.unwrap();
        client
            .batch_execute(&format!(
                "CREATE STREAM ev (id BIGINT, k BIGINT); \
                 CREATE MATERIALIZED VIEW small AS SELECT id, k FROM ev WHERE k < 5; \
                 CREATE MATERIALIZED VIEW per_k AS SELECT k, count(*) AS n, sum(id) AS s FROM small GROUP BY k; \
                 INSERT INTO ev VALUES {}; INSERT INTO ev VALUES {}",
                insert(0, 500),
                insert(500, 1000)
            ))
            .await
            .unwrap();
        view_over_view_is(&client, 1000).await;
    });
    server.kill9();
    server.restart().unwrap();
    rt.block_on(async {
        let client = server.client().await.unwrap();
        view_over_view_is(&client, 1000).await;
        client
            .batch_execute(&format!("INSERT INTO ev VALUES {}", insert(1000, 1500)))
            .await
            .unwrap();
        view_over_view_is(&client, 1500).await;
    });
}

/// Every id below `n` went in: the second view counts and sums the ids
/// with k < 5 per k.
fn view_over_view_expected(n: i64) -> Vec<Vec<String>> {
    (0..5)
        .map(|k| {
            let ids: Vec<i64> = (0..n).filter(|i| i % 9 == k).collect();
            vec![
                k.to_string(),
                ids.len().to_string(),
                ids.iter().sum::<i64>().to_string(),
            ]
        })
        .collect()
}

async fn view_over_view_is(client: &tokio_postgres::Client, n: i64) {
    let want = view_over_view_expected(n);
    eventually(Duration::from_secs(30), || async {
        let got = rows(
            &client
                .simple_query("SELECT k, n, s FROM per_k ORDER BY k")
                .await?,
        );
        Ok((got == want).then_some(()))
    })
    .await
    .expect("the view over the view equals the aggregate of every row");
    // The oracle: the same query as a batch over the first view.
    let oracle = rows(
        &client
            .simple_query("SELECT k, count(*), sum(id) FROM small GROUP BY k ORDER BY k")
            .await
            .unwrap(),
    );
    assert_eq!(oracle, want, "the first view holds each row once");
}
