//! The scheduler's own behaviour on a real cluster: `drizzle server
//! --workers 0` and three `drizzle worker` processes on 127.0.0.1.
//!
//! * group scheduling: exactly one launch message per worker per group,
//!   counted on both ends, and never one per micro-batch;
//! * pre-scheduling: reduce tasks start from worker-to-worker notices, with
//!   no coordinator message inside a group (BSP is the contrast);
//! * a window join's reduce tasks wait for the notices of both shuffled
//!   inputs;
//! * batches complete in order; shuffle blocks cross workers over Flight;
//! * queries wait for a first worker, or fail clearly after the wait;
//! * the protocol version is checked at registration.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use drizzle_sql_tests::{eventually, show, TestCluster, TestServer, TestWorker};
use tokio_postgres::SimpleQueryMessage;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_drizzle"))
}

fn num(row: &HashMap<String, String>, col: &str) -> u64 {
    row.get(col)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("column {col} in {row:?}"))
}

/// Runs `check` against a fresh cluster of `workers` worker processes;
/// on failure, panics with the error and every process's log.
fn on_cluster<F, Fut>(workers: usize, server_args: &[&str], check: F)
where
    F: FnOnce(tokio_postgres::Client) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let cluster = TestCluster::start(bin(), workers, server_args).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let result = rt.block_on(async { check(cluster.server.client().await?).await });
    if let Err(e) = result {
        panic!("{e:#}\n{}", cluster.logs());
    }
}

/// DDL of a datagen stream `name (k BIGINT, ts TIMESTAMP)` with keys
/// 0..=max_key in sequence and a watermark on `ts`.
fn datagen(name: &str, rows_per_second: u32, partitions: u32, max_key: u32) -> String {
    format!(
        "CREATE STREAM {name} (k BIGINT, ts TIMESTAMP, WATERMARK FOR ts AS ts) \
         WITH (connector = 'datagen', rows_per_second = '{rows_per_second}', partitions = '{partitions}', \
               fields.k.kind = 'sequence', fields.k.min = '0', fields.k.max = '{max_key}')"
    )
}

/// Number of data rows in a simple-query reply.
fn row_count(messages: &[SimpleQueryMessage]) -> usize {
    messages
        .iter()
        .filter(|m| matches!(m, SimpleQueryMessage::Row(_)))
        .count()
}

fn setup() -> String {
    format!(
        "{}; SET batch_interval = '20ms'; SET group_size = 10; \
         CREATE MATERIALIZED VIEW per_key AS SELECT k, count(*) AS n FROM clicks GROUP BY k",
        datagen("clicks", 3000, 3, 9)
    )
}

#[test]
fn drizzle_mode_one_launch_per_worker_per_group_and_reduces_start_from_notices() {
    on_cluster(3, &[], |client| async move {
        client.batch_execute(&setup()).await?;
        // Several groups of 10 micro-batches.
        let q = eventually(Duration::from_secs(60), || async {
            let rows = show(&client, "SHOW QUERIES").await?;
            Ok(rows.into_iter().find(|r| num(r, "batches") >= 80))
        })
        .await?;
        assert_eq!(q["scheduling"], "drizzle");
        assert_eq!(q["group_size"], "10");
        // Coordinator side: one launch per worker per group, never per batch.
        let (groups, launches, batches) = eventually(Duration::from_secs(10), || async {
            let rows = show(&client, "SHOW QUERIES").await?;
            let r = &rows[0];
            let (g, l, b) = (num(r, "groups"), num(r, "launches"), num(r, "batches"));
            Ok((l == 3 * g).then_some((g, l, b)))
        })
        .await?;
        assert!(groups >= 8, "{groups} groups");
        assert!(
            groups <= batches / 10 + 2,
            "{groups} groups for {batches} batches: launches must be per group ({launches} launches)"
        );
        // Worker side, from heartbeats: every launch sent arrived as one
        // message; reduce tasks started from notices alone.
        let workers = eventually(Duration::from_secs(20), || async {
            let rows = show(&client, "SHOW WORKERS").await?;
            Ok((rows.len() == 3
                && rows.iter().all(|w| {
                    num(w, "reduce_tasks") > 20
                        && num(w, "launches_received") == num(w, "launches_sent")
                }))
            .then_some(rows))
        })
        .await?;
        for w in &workers {
            assert_started_by_notices(w);
            assert!(num(w, "reduces_started_by_notices") > 20, "{w:?}");
        }
        assert!(
            workers.iter().any(|w| num(w, "blocks_fetched_remote") > 0),
            "shuffle blocks crossed workers over Flight: {workers:?}"
        );
        assert!(workers.iter().any(|w| num(w, "blocks_read_local") > 0));
        // The view's contents are right: every key counted.
        let rows = client
            .simple_query("SELECT k, n FROM per_key ORDER BY k")
            .await?;
        let keys: Vec<String> = rows
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .collect();
        assert_eq!(keys, (0..10).map(|k| k.to_string()).collect::<Vec<_>>());
        Ok(())
    });
}

#[test]
fn bsp_mode_launches_every_batch_and_reduces_from_the_coordinator() {
    on_cluster(3, &["--scheduling", "bsp"], |client| async move {
        client.batch_execute(&setup()).await?;
        let q = eventually(Duration::from_secs(60), || async {
            let rows = show(&client, "SHOW QUERIES").await?;
            Ok(rows.into_iter().find(|r| num(r, "batches") >= 30))
        })
        .await?;
        assert_eq!(q["scheduling"], "bsp");
        assert_eq!(q["group_size"], "1");
        assert!(num(&q, "groups") >= num(&q, "batches"), "{q:?}");
        let workers = eventually(Duration::from_secs(20), || async {
            let rows = show(&client, "SHOW WORKERS").await?;
            Ok(
                (rows.len() == 3 && rows.iter().all(|w| num(w, "reduce_tasks") > 10))
                    .then_some(rows),
            )
        })
        .await?;
        for w in &workers {
            assert!(num(w, "reduces_started_by_coordinator") > 10, "{w:?}");
            assert_eq!(num(w, "reduces_started_by_notices"), 0, "{w:?}");
        }
        Ok(())
    });
}

/// A view over a three-stage plan: per-window counts per key (stage 1), then
/// the largest count per window (stage 2).
fn three_stage_setup() -> String {
    format!(
        "{}; SET batch_interval = '20ms'; SET group_size = 10; \
         CREATE MATERIALIZED VIEW busiest AS SELECT starttime, max(num) AS maxn FROM ( \
           SELECT k, count(*) AS num, window_start AS starttime \
           FROM TUMBLE(clicks, ts, INTERVAL '100' MILLISECOND) GROUP BY k, window_start \
         ) AS counts GROUP BY starttime",
        datagen("clicks", 3000, 3, 9)
    )
}

/// Rows of the `busiest` view (each window's largest count).
async fn busiest(client: &tokio_postgres::Client) -> anyhow::Result<Vec<u64>> {
    let rows = client.simple_query("SELECT maxn FROM busiest").await?;
    Ok(rows
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .collect())
}

/// A worker's counters in Drizzle mode (groups of 10): every shuffle
/// stage's tasks started from their inputs' notices, with no coordinator
/// message inside a group whatever the plan's depth, in batch order; one
/// launch covers a whole group of every stage's tasks.
fn assert_started_by_notices(w: &HashMap<String, String>) {
    assert_eq!(num(w, "reduces_started_by_coordinator"), 0, "{w:?}");
    assert_eq!(num(w, "coordinator_messages_in_group"), 0, "{w:?}");
    assert_eq!(num(w, "out_of_order_reduces"), 0, "{w:?}");
    assert!(
        num(w, "notices_received") >= num(w, "reduce_tasks"),
        "{w:?}"
    );
    assert!(
        num(w, "map_tasks") + num(w, "reduce_tasks") >= 10 * (num(w, "launches_received") - 2),
        "{w:?}"
    );
}

/// Drizzle's invariants on a deep plan: one launch per worker per group, no
/// coordinator message inside a group, every shuffle-stage task started by
/// its inputs' notices; then `view` fills with closed windows (each count
/// at least 1).
async fn runs_on_notices_alone(
    client: &tokio_postgres::Client,
    setup: &str,
    view: &str,
) -> anyhow::Result<()> {
    client.batch_execute(setup).await?;
    let (groups, launches) = eventually(Duration::from_secs(60), || async {
        let rows = show(client, "SHOW QUERIES").await?;
        let r = &rows[0];
        let (g, l) = (num(r, "groups"), num(r, "launches"));
        Ok((num(r, "batches") >= 60 && l == 3 * g).then_some((g, l)))
    })
    .await?;
    assert!(groups >= 6, "{groups} groups, {launches} launches");
    let workers = eventually(Duration::from_secs(20), || async {
        let rows = show(client, "SHOW WORKERS").await?;
        Ok((rows.len() == 3
            && rows.iter().all(|w| {
                num(w, "reduce_tasks") > 40
                    && num(w, "launches_received") == num(w, "launches_sent")
            }))
        .then_some(rows))
    })
    .await?;
    for w in &workers {
        assert_started_by_notices(w);
    }
    let counts = eventually(Duration::from_secs(30), || async {
        let rows = client
            .simple_query(&format!("SELECT * FROM {view}"))
            .await?;
        let counts: Vec<u64> = rows
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(1).and_then(|v| v.parse().ok()),
                _ => None,
            })
            .collect();
        Ok((counts.len() >= 3).then_some(counts))
    })
    .await?;
    assert!(counts.iter().all(|&n| n >= 1), "{counts:?}");
    Ok(())
}

#[test]
fn a_three_stage_plan_runs_on_notices_alone_one_launch_per_worker_per_group() {
    on_cluster(3, &[], |client| async move {
        runs_on_notices_alone(&client, &three_stage_setup(), "busiest").await?;
        explain_analyze_covers_every_stage(&client, "busiest", 3).await
    });
}

/// `EXPLAIN ANALYZE view`: every stage's header has its tasks run (and a
/// stateful one its state and watermark lag), every operator its rows and
/// time, summed over the workers' reports.
async fn explain_analyze_covers_every_stage(
    client: &tokio_postgres::Client,
    view: &str,
    stages: usize,
) -> anyhow::Result<()> {
    let lines = eventually(Duration::from_secs(30), || async {
        let rows = client
            .simple_query(&format!("EXPLAIN ANALYZE {view}"))
            .await?;
        let lines: Vec<String> = rows
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .collect();
        // Every stage has run tasks and every final aggregate has had rows.
        let headers: Vec<&String> = lines.iter().filter(|l| l.contains("  Stage ")).collect();
        let ran = headers.len() == stages
            && headers
                .iter()
                .all(|h| !h.contains("tasks=0,") && !h.contains("tasks=0]"));
        let aggregated = lines
            .iter()
            .filter(|l| l.contains("AggregateFinalExec"))
            .all(|l| l.contains("rows in=") && !l.contains("rows in=0 "));
        Ok((ran && aggregated).then_some(lines))
    })
    .await?;
    let text = lines.join("\n");
    anyhow::ensure!(text.contains("watermark lag="), "{text}");
    anyhow::ensure!(text.contains("state="), "{text}");
    anyhow::ensure!(
        text.contains("StreamScanExec") && text.contains("[rows="),
        "{text}"
    );
    // A query text, an unknown id and an unknown view are refused clearly.
    for (sql, code) in [
        ("EXPLAIN ANALYZE SELECT 1", "0A000"),
        ("EXPLAIN ANALYZE 987654", "42704"),
        ("EXPLAIN ANALYZE no_such_view", "42P01"),
    ] {
        let err = client.simple_query(sql).await.err();
        let got = err
            .as_ref()
            .and_then(|e| e.code())
            .map(|c| c.code().to_string());
        anyhow::ensure!(got.as_deref() == Some(code), "{sql}: {err:?}");
    }
    Ok(())
}

/// Four stages: two sources, a window join, and a windowed count over it.
#[test]
fn a_four_stage_plan_runs_on_notices_alone_one_launch_per_worker_per_group() {
    on_cluster(3, &[], |client| async move {
        let setup = format!(
            "{}; {}; SET batch_interval = '20ms'; SET group_size = 10; \
             CREATE MATERIALIZED VIEW pairs_per_window AS \
               SELECT a.window_start, count(*) AS n \
               FROM TUMBLE(a, ts, INTERVAL '100' MILLISECOND) a \
               JOIN TUMBLE(b, ts, INTERVAL '100' MILLISECOND) b \
               ON a.k = b.k AND a.window_start = b.window_start GROUP BY a.window_start",
            datagen("a", 900, 3, 29),
            datagen("b", 600, 2, 29)
        );
        runs_on_notices_alone(&client, &setup, "pairs_per_window").await
    });
}

#[test]
fn bsp_puts_a_coordinator_barrier_at_every_shuffle_of_a_three_stage_plan() {
    on_cluster(3, &["--scheduling", "bsp"], |client| async move {
        client.batch_execute(&three_stage_setup()).await?;
        let workers = eventually(Duration::from_secs(60), || async {
            let rows = show(&client, "SHOW WORKERS").await?;
            Ok(
                (rows.len() == 3 && rows.iter().all(|w| num(w, "reduce_tasks") > 20))
                    .then_some(rows),
            )
        })
        .await?;
        for w in &workers {
            // Every task of both shuffle stages waited for the coordinator.
            assert_eq!(num(w, "reduces_started_by_notices"), 0, "{w:?}");
            assert!(
                num(w, "reduces_started_by_coordinator") >= num(w, "reduce_tasks"),
                "{w:?}"
            );
        }
        let maxima = eventually(Duration::from_secs(30), || async {
            let m = busiest(&client).await?;
            Ok((m.len() >= 2).then_some(m))
        })
        .await?;
        assert!(maxima.iter().all(|&n| n >= 1), "{maxima:?}");
        Ok(())
    });
}

#[test]
fn a_window_join_reads_both_shuffled_inputs_before_each_reduce() {
    on_cluster(3, &[], |client| async move {
        // Input 0 has 3 map partitions, input 1 has 2: every reduce task
        // needs 5 notices. One reduce partition per worker (the default
        // would be one per task slot), so each notice serves one task.
        client
            .batch_execute(&format!(
                "{}; {}; \
                 SET batch_interval = '20ms'; SET group_size = 10; SET parallelism = 3; \
                 CREATE MATERIALIZED VIEW pairs AS SELECT a.window_start, a.k, b.ts AS b_ts \
                   FROM TUMBLE(a, ts, INTERVAL '200' MILLISECOND) a \
                   JOIN TUMBLE(b, ts, INTERVAL '200' MILLISECOND) b \
                   ON a.k = b.k AND a.window_start = b.window_start",
                datagen("a", 900, 3, 29),
                datagen("b", 600, 2, 29)
            ))
            .await?;
        let workers = eventually(Duration::from_secs(60), || async {
            let rows = show(&client, "SHOW WORKERS").await?;
            Ok(
                (rows.len() == 3 && rows.iter().all(|w| num(w, "reduce_tasks") > 30))
                    .then_some(rows),
            )
        })
        .await?;
        for w in &workers {
            // One notice per map task of either input reaches each consumer
            // worker before the reduce task of that batch can run.
            assert!(
                num(w, "notices_received") >= 5 * num(w, "reduce_tasks"),
                "each reduce task waited for both inputs: {w:?}"
            );
            assert_eq!(num(w, "out_of_order_reduces"), 0, "{w:?}");
            assert_eq!(num(w, "reduces_started_by_coordinator"), 0, "{w:?}");
        }
        // Joined rows arrive: window bounds equal on both sides.
        let rows = eventually(Duration::from_secs(30), || async {
            let rows = client.simple_query("SELECT count(*) FROM pairs").await?;
            let n: u64 = rows
                .iter()
                .find_map(|m| match m {
                    SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
                    _ => None,
                })
                .unwrap_or(0);
            Ok((n > 0).then_some(n))
        })
        .await?;
        assert!(rows > 0);
        Ok(())
    });
}

#[test]
fn windows_arrive_in_batch_order_across_workers() {
    on_cluster(3, &[], |client| async move {
        client
            .batch_execute(&format!(
                "{}; SET batch_interval = '10ms'; SET group_size = 5",
                datagen("clicks", 2000, 3, 99)
            ))
            .await?;
        let rows = client
            .simple_query(
                "SELECT window_end, k, count(*) FROM TUMBLE(clicks, ts, INTERVAL '50' MILLISECOND) \
                 GROUP BY window_end, k LIMIT 600",
            )
            .await?;
        let ends: Vec<String> = rows
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .collect();
        assert_eq!(ends.len(), 600);
        let windows: std::collections::BTreeSet<&String> = ends.iter().collect();
        assert!(windows.len() >= 5, "rows span several windows");
        assert!(
            ends.windows(2).all(|w| w[0] <= w[1]),
            "closed windows are emitted in order"
        );
        Ok(())
    });
}

#[test]
fn queries_wait_for_a_first_worker_or_fail_clearly() {
    let server = TestServer::start(
        bin(),
        &[
            "--workers",
            "0",
            "--cluster-listen",
            "127.0.0.1:0",
            "--worker-wait",
            "2",
        ],
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = server.client().await.unwrap();
        client
            .batch_execute("CREATE STREAM s (k BIGINT); INSERT INTO s VALUES (1), (2)")
            .await
            .unwrap();
        // No worker: a clear error after the wait.
        let err = client
            .simple_query("SELECT k FROM s LIMIT 2")
            .await
            .unwrap_err();
        let msg = err
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_default();
        assert!(msg.contains("no worker registered"), "{msg}");
        assert!(msg.contains("drizzle worker --coordinator"), "{msg}");
    });
    // A worker that registers while a query waits (default wait: 30 s) runs it.
    let server = TestServer::start(
        bin(),
        &["--workers", "0", "--cluster-listen", "127.0.0.1:0"],
    )
    .unwrap();
    rt.block_on(async {
        let client = server.client().await.unwrap();
        client
            .batch_execute("CREATE STREAM s (k BIGINT); INSERT INTO s VALUES (1), (2)")
            .await
            .unwrap();
        let query = tokio::spawn({
            let client = server.client().await.unwrap();
            async move { client.simple_query("SELECT k FROM s LIMIT 2").await }
        });
        eventually(Duration::from_secs(10), || async {
            let rows = show(&client, "SHOW QUERIES").await?;
            Ok((!rows.is_empty()).then_some(()))
        })
        .await
        .expect("the query waits for a worker");
        let dir = server.data_dir.with_extension("late-worker");
        let _worker = TestWorker::start(bin(), &server.cluster_address, &dir).unwrap();
        let rows = tokio::time::timeout(Duration::from_secs(20), query)
            .await
            .expect("query finished")
            .unwrap()
            .unwrap_or_else(|e| panic!("{e:?}\n{}", server.log()));
        let n = row_count(&rows);
        assert_eq!(n, 2);
    });
}

#[test]
fn registration_checks_the_protocol_version() {
    let server = TestServer::start(
        bin(),
        &["--workers", "0", "--cluster-listen", "127.0.0.1:0"],
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let secret =
            drizzle_exec::cluster::ClusterSecret::new(drizzle_sql_tests::TEST_CLUSTER_SECRET)
                .unwrap();
        let mut client =
            drizzle_exec::cluster::coordinator_client(&server.cluster_address, &secret).unwrap();
        let err = client
            .register(drizzle_exec::cluster::pb::RegisterRequest {
                protocol_version: drizzle_exec::cluster::PROTOCOL_VERSION + 1,
                address: "127.0.0.1:1".into(),
                epoch: 1,
                task_slots: 1,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(
            err.message().contains("protocol version"),
            "{}",
            err.message()
        );
        let err = client
            .heartbeat(drizzle_exec::cluster::pb::HeartbeatRequest {
                protocol_version: 0,
                worker_id: 0,
                epoch: 0,
                counters: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        // An unknown worker with the right version is told to register.
        let resp = client
            .heartbeat(drizzle_exec::cluster::pb::HeartbeatRequest {
                protocol_version: drizzle_exec::cluster::PROTOCOL_VERSION,
                worker_id: 42,
                epoch: 7,
                counters: None,
            })
            .await
            .unwrap();
        assert!(!resp.get_ref().known);
    });
}

#[test]
fn auto_group_size_grows_when_coordination_dominates() {
    on_cluster(2, &[], |client| async move {
        client
            .batch_execute(&format!(
                "{}; SET batch_interval = '0.1ms'; \
                 CREATE MATERIALIZED VIEW c AS SELECT k, count(*) AS n FROM t GROUP BY k",
                datagen("t", 100, 2, 9)
            ))
            .await?;
        assert_eq!(
            client
                .simple_query("SHOW group_size")
                .await?
                .iter()
                .find_map(|m| match m {
                    SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                    _ => None,
                }),
            Some("auto".to_string()),
            "auto is the default"
        );
        // 0.1 ms batches: a launch round costs more than a few percent of a
        // one-batch group, so the group size must grow.
        let g = eventually(Duration::from_secs(30), || async {
            let rows = show(&client, "SHOW QUERIES").await?;
            Ok(rows
                .first()
                .map(|r| num(r, "group_size"))
                .filter(|g| *g >= 4))
        })
        .await?;
        assert!(g >= 4);
        println!("adaptive group size reached {g}");
        Ok(())
    });
}

/// `drizzle worker --slots 2` is one worker (one registration, one port)
/// that runs two tasks at once: the four partitions of a datagen query's
/// stages run on both slots (the peak of tasks running reaches 2, never
/// more), and the aggregate's results are exact.
#[test]
fn a_worker_process_runs_tasks_on_several_slots() {
    let server = TestServer::start(
        bin(),
        &["--workers", "0", "--cluster-listen", "127.0.0.1:0"],
    )
    .unwrap();
    let dir = server.data_dir.with_extension("slots");
    let mut child = std::process::Command::new(bin())
        .args([
            "worker",
            "--coordinator",
            &server.cluster_address,
            "--slots",
            "2",
        ])
        .arg("--data-dir")
        .arg(&dir)
        .env(
            "DRIZZLE_CLUSTER_SECRET",
            drizzle_sql_tests::TEST_CLUSTER_SECRET,
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let result = rt.block_on(async {
        let client = server.client().await?;
        eventually(Duration::from_secs(30), || async {
            Ok((show(&client, "SHOW WORKERS").await?.len() == 1).then_some(()))
        })
        .await?;
        client
            .batch_execute(
                "CREATE STREAM s (k BIGINT, v BIGINT) WITH (partitions = 4);
                 SET parallelism = 4;",
            )
            .await?;
        let mut values = Vec::new();
        for i in 0..400i64 {
            values.push(format!("({}, {i})", i % 10));
        }
        client
            .batch_execute(&format!("INSERT INTO s VALUES {}", values.join(", ")))
            .await?;
        // 4 map and 4 reduce partitions per batch, on one worker.
        let rows = client
            .simple_query("SELECT k, count(*) AS n, sum(v) AS total FROM s GROUP BY k LIMIT 10")
            .await?;
        let mut got = drizzle_sql_tests::rows(&rows);
        got.sort();
        let mut want: Vec<String> = (0..10i64)
            .map(|k| {
                let total: i64 = (0..400i64).filter(|i| i % 10 == k).sum();
                format!("{k}|40|{total}")
            })
            .collect();
        want.sort();
        // Upserts: the last version of each key is the batch result.
        let mut last = std::collections::BTreeMap::new();
        for row in got {
            let key = row.split('|').next().unwrap_or_default().to_string();
            last.insert(key, row);
        }
        let last: Vec<String> = last.into_values().collect();
        assert_eq!(last, want);
        // Counters travel in heartbeats: wait for one after the tasks.
        let workers = eventually(Duration::from_secs(10), || async {
            let w = show(&client, "SHOW WORKERS").await?;
            Ok(w.first()
                .is_some_and(|w| w["reduce_tasks"] != "0")
                .then_some(w))
        })
        .await?;
        assert_eq!(workers.len(), 1, "{workers:?}");
        assert_eq!(workers[0]["task_slots"], "2", "{workers:?}");
        let peak: u64 = workers[0]["peak_tasks_running"].parse()?;
        assert!((1..=2).contains(&peak), "{workers:?}");
        anyhow::Ok(peak)
    });
    let _ = child.kill();
    let _ = child.wait();
    let peak = result.unwrap();
    println!("peak tasks running on 2 slots: {peak}");
}

/// A lookup join re-reads its table when that table changes, and only then:
/// a view that applies a batch every 20 ms does not make it re-read (the
/// version is per relation; the coordinator answers "unchanged" for a join
/// whose relations did not change).
#[test]
fn a_lookup_join_rereads_its_table_when_the_table_changes() {
    on_cluster(3, &[], |client| async move {
        client.batch_execute(&setup()).await?;
        client
            .batch_execute(
                "CREATE TABLE dim (k BIGINT, label TEXT); \
                 INSERT INTO dim VALUES (1, 'one'); \
                 CREATE MATERIALIZED VIEW labelled AS SELECT c.k, d.label, count(*) AS n \
                   FROM clicks c JOIN dim d ON c.k = d.k GROUP BY c.k, d.label",
            )
            .await?;
        let labels = || async {
            let rows = client
                .simple_query("SELECT k, label FROM labelled ORDER BY k")
                .await?;
            Ok::<_, anyhow::Error>(
                rows.iter()
                    .filter_map(|m| match m {
                        SimpleQueryMessage::Row(r) => Some(format!(
                            "{} {}",
                            r.get(0).unwrap_or("NULL"),
                            r.get(1).unwrap_or("NULL")
                        )),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            )
        };
        eventually(Duration::from_secs(60), || async {
            Ok((labels().await? == ["1 one"]).then_some(()))
        })
        .await?;
        // `per_key` keeps changing all along; the join's table only now.
        client
            .batch_execute("INSERT INTO dim VALUES (2, 'two')")
            .await?;
        eventually(Duration::from_secs(60), || async {
            Ok((labels().await? == ["1 one", "2 two"]).then_some(()))
        })
        .await?;
        Ok(())
    });
}

/// Results larger than a task status carries travel on the data plane: the
/// final tasks put their rows on the coordinator's Flight endpoint (the
/// group report follows the puts), and every row arrives once, whole.
#[test]
fn large_results_are_put_over_flight_whole_and_once() {
    let cluster = TestCluster::start(bin(), 2, &[]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = cluster.server.client().await.unwrap();
        c.batch_execute("CREATE STREAM wide (k BIGINT, pad TEXT) WITH (partitions = 2)")
            .await
            .unwrap();
        // 20,000 rows of ~200 bytes: megabytes per task, far above the
        // direct-result size.
        const N: i64 = 20_000;
        c.batch_execute(&format!(
            "INSERT INTO wide SELECT k, repeat(md5(k::text), 6) FROM generate_series(1, {N}) AS t(k)"
        ))
        .await
        .unwrap();
        let got = c
            .simple_query(&format!("SELECT k, length(pad), pad FROM wide LIMIT {N}"))
            .await
            .unwrap();
        let rows = drizzle_sql_tests::rows(&got);
        assert_eq!(rows.len() as i64, N);
        let mut keys: Vec<i64> = rows
            .iter()
            .map(|r| {
                let mut f = r.split('|');
                let k: i64 = f.next().unwrap().parse().unwrap();
                assert_eq!(f.next(), Some("192"), "{r}");
                assert_eq!(f.next().map(str::len), Some(192), "{r}");
                k
            })
            .collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys, (1..=N).collect::<Vec<_>>());
    });
}

/// Workers behind their clock (0.2 ms micro-batches, groups of 40) send
/// their empty results in runs, not one message per batch, and nothing is
/// lost or counted twice: a datagen stream of one row per millisecond with
/// keys 0..9 in sequence puts exactly 2 rows of each key in every full
/// 20 ms window.
#[test]
fn empty_results_of_a_worker_behind_its_clock_go_in_runs_and_windows_stay_exact() {
    on_cluster(2, &[], |client| async move {
        client
            .batch_execute(
                "CREATE STREAM ticks (k BIGINT, ts TIMESTAMP, \
                   WATERMARK FOR ts AS ts - INTERVAL '100' MILLISECOND) \
                 WITH (connector = 'datagen', rows_per_second = '1000', partitions = '2', \
                       fields.k.kind = 'sequence', fields.k.min = '0', fields.k.max = '9'); \
                 SET batch_interval = '0.2ms'; SET group_size = 40",
            )
            .await?;
        let rows = tokio::time::timeout(
            Duration::from_secs(120),
            client.simple_query(
                "SELECT window_end, k, count(*) AS n FROM TUMBLE(ticks, ts, INTERVAL '20' MILLISECOND) \
                 GROUP BY window_end, k LIMIT 120",
            ),
        )
        .await??;
        let mut windows: std::collections::BTreeMap<String, Vec<(u64, u64)>> =
            std::collections::BTreeMap::new();
        for m in &rows {
            if let SimpleQueryMessage::Row(r) = m {
                let end = r.get(0).unwrap_or_default().to_string();
                let k: u64 = r.get(1).unwrap_or_default().parse()?;
                let n: u64 = r.get(2).unwrap_or_default().parse()?;
                windows.entry(end).or_default().push((k, n));
            }
        }
        assert!(windows.len() >= 10, "{} windows", windows.len());
        // The first window may start before the stream did; the last may be
        // cut by the LIMIT. Every one between is whole.
        let whole: Vec<_> = windows.iter().skip(1).take(windows.len() - 2).collect();
        for (end, keys) in &whole {
            let mut keys = keys.to_vec();
            keys.sort();
            let want: Vec<(u64, u64)> = (0..10).map(|k| (k, 2)).collect();
            assert_eq!(keys, want, "window ending {end}");
        }
        let workers = show(&client, "SHOW WORKERS").await?;
        let in_runs: u64 = workers
            .iter()
            .map(|w| num(w, "empty_results_in_runs"))
            .sum();
        assert!(in_runs > 0, "no empty result went in a run: {workers:?}");
        println!("{in_runs} empty results went in runs");
        Ok(())
    });
}
