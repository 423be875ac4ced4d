//! Fault tolerance and adaptation on a real cluster (`drizzle server
//! --workers 0` plus `drizzle worker` processes on 127.0.0.1), each case
//! compared row for row with an oracle: the same statements fed, at the
//! same time, to a server that suffers no failure.
//!
//! Running on the cluster: a windowed aggregate, a window join of two
//! streams, an upsert aggregate, a three-stage aggregate over windowed
//! aggregates and a six-stage window join of per-key sums with their
//! per-window maximum (broadcast to every partition), and an interval join
//! (checkpointed as deltas) as materialized views,
//! and in some cases a continuous `SELECT` and a `COPY ... TO STDOUT`
//! client. Faults: `kill -9`
//! of one worker (also while checkpoints are being written), two workers
//! lost one after the other, a worker frozen (SIGSTOP, a partition) and
//! thawed, a worker added mid-stream, a worker drained
//! with SIGTERM, `kill -9` of the server and a restart, and a parallelism
//! change. Every case checks: no result lost, none duplicated, windows in
//! batch order, and the mechanism that was meant to act did (recovery count,
//! attempts, drained exit, new worker used, restored checkpoint). Recovery
//! re-runs only the lost work by default: the kill cases check that just the
//! lost worker's share of partitions was restored, and that the survivors
//! adopted exactly those; one case runs the rollback mode.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use drizzle_sql_tests::{eventually, rows, show, TestCluster, TestServer};
use futures::StreamExt;
use tokio_postgres::Client;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_drizzle"))
}

/// Statements fed to each stream.
const STATEMENTS: usize = 60;
/// Rows per statement.
const ROWS: usize = 10;
/// Distinct keys.
const KEYS: usize = 5;
/// Rows the continuous SELECT and the COPY wait for (20 closed windows).
const SELECT_ROWS: usize = 100;

/// Scenarios take turns (see [`scenario`]).
static SCENARIOS: std::sync::Mutex<()> = std::sync::Mutex::new(());

const DDL: &str = "\
    SET batch_interval = '20ms'; \
    CREATE STREAM a (k BIGINT, v BIGINT, ts TIMESTAMP, WATERMARK FOR ts AS ts) WITH (partitions = 3); \
    CREATE STREAM b (k BIGINT, v BIGINT, ts TIMESTAMP, WATERMARK FOR ts AS ts) WITH (partitions = 3); \
    CREATE MATERIALIZED VIEW win AS SELECT window_start, k, count(*) AS n, sum(v) AS s \
        FROM TUMBLE(a, ts, INTERVAL '2' SECOND) GROUP BY window_start, k; \
    CREATE MATERIALIZED VIEW joined AS SELECT x.window_start, x.k, x.v AS av, y.v AS bv \
        FROM TUMBLE(a, ts, INTERVAL '2' SECOND) x JOIN TUMBLE(b, ts, INTERVAL '2' SECOND) y \
        ON x.k = y.k AND x.window_start = y.window_start; \
    CREATE MATERIALIZED VIEW totals AS SELECT k, count(*) AS n, sum(v) AS s FROM a GROUP BY k; \
    CREATE MATERIALIZED VIEW busiest AS SELECT ws, max(n) AS top, sum(s) AS s FROM ( \
        SELECT window_start AS ws, k, count(*) AS n, sum(v) AS s \
        FROM TUMBLE(a, ts, INTERVAL '2' SECOND) GROUP BY window_start, k) AS per_key \
        GROUP BY ws; \
    CREATE MATERIALIZED VIEW leaders AS SELECT c.ws, c.k, c.s FROM ( \
        SELECT window_start AS ws, k, sum(v) AS s \
        FROM TUMBLE(a, ts, INTERVAL '2' SECOND) GROUP BY window_start, k) AS c \
        JOIN (SELECT ws, max(s) AS top FROM ( \
            SELECT window_start AS ws, k, sum(v) AS s \
            FROM TUMBLE(a, ts, INTERVAL '2' SECOND) GROUP BY window_start, k) AS p \
            GROUP BY ws) AS m \
        ON c.ws = m.ws AND c.s = m.top; \
    CREATE MATERIALIZED VIEW near AS SELECT x.k, x.v AS av, y.v AS bv FROM a x JOIN b y \
        ON x.k = y.k AND x.ts BETWEEN y.ts - INTERVAL '1' SECOND AND y.ts";

const WINDOWED: &str = "SELECT window_start, k, count(*) AS n, sum(v) AS s \
    FROM TUMBLE(a, ts, INTERVAL '2' SECOND) GROUP BY window_start, k";

/// Statement `i` of stream `stream`: ROWS rows at second `i`, in event-time
/// order (so no row is late, whatever the batching).
fn statement(stream: &str, i: usize) -> String {
    let offset = if stream == "b" { 1_000_000 } else { 0 };
    let rows: Vec<String> = (0..ROWS)
        .map(|j| {
            let n = i * ROWS + j;
            format!(
                "({}, {}, TIMESTAMP '2024-01-01 00:00:00' + INTERVAL '{} milliseconds')",
                n % KEYS,
                n + offset,
                i * 1000 + j * 10
            )
        })
        .collect();
    format!("INSERT INTO {stream} VALUES {}", rows.join(", "))
}

/// The final upsert totals, computed record at a time.
fn expected_totals() -> Vec<String> {
    let mut t: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    for n in 0..STATEMENTS * ROWS {
        let e = t.entry(n % KEYS).or_default();
        e.0 += 1;
        e.1 += n;
    }
    t.into_iter()
        .map(|(k, (c, s))| format!("{k}|{c}|{s}"))
        .collect()
}

/// Closed windows at the end: rows of the windowed view. Statement i lands
/// in partition i mod 3; the watermark is the minimum over the partitions,
/// the last row of statement STATEMENTS-3; 2 s windows ending by then close.
fn expected_window_rows() -> usize {
    let closed = (STATEMENTS - 3) / 2;
    closed * KEYS
}

/// Closed windows of the join at the end: each window holds 2·ROWS rows
/// per stream, 2·ROWS/KEYS per key, joined pairwise per key.
fn expected_join_rows() -> usize {
    let per_key = 2 * ROWS / KEYS;
    (STATEMENTS - 3) / 2 * KEYS * per_key * per_key
}

/// Pairs of the interval join (`near`) at the end, computed record at a
/// time: every pair is emitted once both rows are in, whatever the
/// watermark.
fn expected_near_rows() -> usize {
    // (key, time in ms) of statement i's rows, the same in both streams.
    let rows: Vec<(usize, usize)> = (0..STATEMENTS)
        .flat_map(|i| (0..ROWS).map(move |j| ((i * ROWS + j) % KEYS, i * 1000 + j * 10)))
        .collect();
    rows.iter()
        .map(|(ka, ta)| {
            rows.iter()
                .filter(|(kb, tb)| ka == kb && *ta <= *tb && *ta + 1000 >= *tb)
                .count()
        })
        .sum()
}

fn num(row: &HashMap<String, String>, col: &str) -> u64 {
    row.get(col).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// A query's last recovery as (kind, partitions restored, partitions in
/// all), from SHOW QUERIES' `last_recovery` ("lost work: 2 of 6 ...").
fn last_recovery(q: &HashMap<String, String>) -> (String, u64, u64) {
    let text = q.get("last_recovery").cloned().unwrap_or_default();
    let (kind, rest) = text.split_once(": ").unwrap_or(("", ""));
    let words: Vec<&str> = rest.split(' ').collect();
    let at = |i: usize| words.get(i).and_then(|w| w.parse().ok()).unwrap_or(0);
    // "2 of 6 partitions ..." or "all 6 partitions ...".
    let (restored, total) = if words.first() == Some(&"all") {
        (at(1), at(1))
    } else {
        (at(0), at(2))
    };
    (kind.to_string(), restored, total)
}

/// Partitions the listed workers adopted from lost workers.
fn adopted(seen: &Observed) -> u64 {
    seen.workers
        .iter()
        .map(|w| num(w, "partitions_adopted"))
        .sum()
}

/// Lost-work recovery after `lost` of `workers` workers (each holding an
/// equal share of every query) restored exactly the lost share, and the
/// survivors adopted exactly those partitions, plus `ended` partitions of
/// queries that ended before SHOW QUERIES was read.
fn only_lost_work_was_recovered(seen: &Observed, workers: u64, lost: u64, ended: u64) {
    let mut restored = 0;
    for q in &seen.queries {
        let (kind, moved, total) = last_recovery(q);
        assert_eq!(kind, "lost work", "{q:?}");
        assert!(total > 0 && moved > 0, "{q:?}");
        assert!(moved < total, "survivors kept their partitions: {q:?}");
    }
    if seen.queries.iter().any(|q| num(q, "recoveries") != lost) {
        // Another worker missed its heartbeats on a loaded machine: a
        // further (also lost-work) recovery the shares below do not model.
        eprintln!("more recoveries than losses: {:?}", seen.queries);
        return;
    }
    for q in &seen.queries {
        let (_, _, total) = last_recovery(q);
        assert_eq!(
            num(q, "recovered_partitions") * workers,
            lost * total,
            "the lost workers' share of {total} partitions: {q:?}"
        );
        restored += num(q, "recovered_partitions");
    }
    let adopted = adopted(seen);
    assert_eq!(
        adopted,
        restored + ended,
        "partitions adopted by survivors: {:?}",
        seen.workers
    );
}

/// A view's contents, sorted.
async fn contents(client: &Client, view: &str) -> anyhow::Result<Vec<String>> {
    let mut r = rows(
        &client
            .simple_query(&format!("SELECT * FROM {view}"))
            .await?,
    );
    r.sort();
    Ok(r)
}

/// Checks a continuous result against the oracle's: windows arrived in
/// order, and the rows (ordered by window, then key) are the same.
fn same_stream(got: &[String], oracle: &[String], what: &str) {
    let starts: Vec<&str> = got
        .iter()
        .map(|r| r.split('|').next().unwrap_or(""))
        .collect();
    assert!(
        starts.windows(2).all(|w| w[0] <= w[1]),
        "{what}: windows out of batch order: {starts:?}"
    );
    let mut got = got.to_vec();
    got.sort();
    let mut oracle = oracle.to_vec();
    oracle.sort();
    assert_eq!(got.len(), SELECT_ROWS, "{what}: row count");
    assert_eq!(got, oracle, "{what}: differs from the oracle");
}

enum Fault {
    /// `kill -9` worker i.
    Kill(usize),
    /// SIGSTOP worker i (hung, as if cut off by a partition).
    Pause(usize),
    /// SIGCONT worker i (it comes back after it was declared lost).
    Resume(usize),
    /// SIGTERM worker i (drain).
    Drain(usize),
    /// Start one more worker.
    AddWorker,
    /// `kill -9` the server, then start it again.
    RestartServer,
    /// `ALTER MATERIALIZED VIEW ... SET parallelism = n` on every view.
    Parallelism(u32),
    /// Make checkpoint writes fail (the store's directory becomes a file;
    /// the checkpoints written so far are kept aside).
    BreakCheckpoints,
    /// Put the checkpoint directory back.
    RepairCheckpoints,
}

/// Every query's `recovery` mode (SHOW QUERIES) starts with `mode`.
async fn all_recover_by(admin: &Client, mode: &str) -> anyhow::Result<()> {
    eventually(Duration::from_secs(30), || async {
        let q = show(admin, "SHOW QUERIES").await?;
        Ok(q.iter()
            .all(|r| r["recovery"].starts_with(mode))
            .then_some(()))
    })
    .await
    .map_err(|e| e.context(format!("queries did not switch to {mode} recovery")))
}

/// Shuffle blocks held by all workers.
async fn blocks_held(admin: &Client) -> anyhow::Result<u64> {
    let w = show(admin, "SHOW WORKERS").await?;
    Ok(w.iter().map(|w| num(w, "blocks_held")).sum())
}

/// What a scenario observed, for case-specific checks.
struct Observed {
    queries: Vec<HashMap<String, String>>,
    workers: Vec<HashMap<String, String>>,
    /// Blocks the workers gained while checkpoints were broken.
    stalled_growth: Option<i64>,
    /// This scenario's turn, held until the test is done with its cluster.
    _turn: Option<std::sync::MutexGuard<'static, ()>>,
}

/// Runs the workload on a cluster of `workers` workers and on an oracle
/// server, applying each fault before statement `at`; then checks every
/// output against the oracle's.
fn scenario(
    workers: usize,
    server_args: &[&str],
    faults: Vec<(usize, Fault)>,
    clients: bool,
) -> (TestCluster, Observed) {
    // One scenario at a time: a cluster, its oracle and their 20 ms views
    // keep both cores of a CI machine busy, and two at once starve each
    // other's clocks (batches fall behind their trigger times by seconds).
    let turn = SCENARIOS.lock().unwrap_or_else(|e| e.into_inner());
    let mut args = vec!["--worker-timeout", "3"];
    if !server_args.contains(&"--checkpoint-interval-ms") {
        args.extend(["--checkpoint-interval-ms", "200"]);
    }
    args.extend_from_slice(server_args);
    let mut cluster = TestCluster::start(bin(), workers, &args).unwrap();
    let oracle = TestServer::start(bin(), &["--workers", "2"]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let result = rt.block_on(run(&mut cluster, &oracle, faults, clients));
    match result {
        Ok(mut observed) => {
            observed._turn = Some(turn);
            (cluster, observed)
        }
        Err(e) => panic!(
            "{e:#}\n{}\n--- oracle ---\n{}",
            cluster.logs(),
            oracle.log()
        ),
    }
}

async fn run(
    cluster: &mut TestCluster,
    oracle: &TestServer,
    mut faults: Vec<(usize, Fault)>,
    clients: bool,
) -> anyhow::Result<Observed> {
    let mut admin = cluster.server.client().await?;
    let oracle_admin = oracle.client().await?;
    admin.batch_execute(DDL).await?;
    oracle_admin.batch_execute(DDL).await?;
    // Continuous clients on both: a SELECT and a COPY TO STDOUT.
    let select = format!("{WINDOWED} LIMIT {SELECT_ROWS}");
    let copy = format!("COPY ({WINDOWED} LIMIT {SELECT_ROWS}) TO STDOUT");
    let mut runs = Vec::new();
    // One reduce partition per worker (the default is one per task slot),
    // as the adoption counts of the kill tests assume.
    let workers = cluster.workers.len();
    let settings = format!("SET batch_interval = '20ms'; SET parallelism = {workers}");
    if clients {
        for server in [&cluster.server, oracle] {
            let c = server.client().await?;
            c.batch_execute(&settings).await?;
            let q = select.clone();
            runs.push(tokio::spawn(async move {
                c.simple_query(&q).await.map(|m| rows(&m))
            }));
            let c = server.client().await?;
            c.batch_execute(&settings).await?;
            let q = copy.clone();
            runs.push(tokio::spawn(async move {
                let stream = c.copy_out(q.as_str()).await?;
                futures::pin_mut!(stream);
                let mut text = Vec::new();
                // The first error ends the copy (the stream repeats it).
                while let Some(chunk) = stream.next().await {
                    text.extend_from_slice(&chunk?);
                }
                Ok(String::from_utf8_lossy(&text)
                    .lines()
                    .map(|l| l.replace('\t', "|"))
                    .collect())
            }));
        }
        // Every query runs before the input starts.
        eventually(Duration::from_secs(30), || async {
            let q = show(&admin, "SHOW QUERIES").await?;
            Ok((q.len() >= 5).then_some(()))
        })
        .await?;
    }
    faults.sort_by_key(|(at, _)| *at);
    let mut faults = faults.into_iter().peekable();
    let mut server_restarted = false;
    let mut stalled_blocks: Option<u64> = None;
    let mut stalled_growth: Option<i64> = None;
    let checkpoints = cluster.server.data_dir.join("checkpoints");
    let aside = checkpoints.with_extension("aside");
    for i in 0..STATEMENTS {
        while faults.peek().is_some_and(|(at, _)| *at == i) {
            let Some((_, fault)) = faults.next() else {
                break;
            };
            // Faults strike once every query has a checkpoint to recover from
            // and is past an earlier recovery: until the checkpoint after a
            // recovery is written, a second loss rolls back (SHOW QUERIES:
            // "rollback (until the next checkpoint)"), which a loaded
            // machine makes more likely, but is not what the faults test.
            eventually(Duration::from_secs(30), || async {
                let q = show(&admin, "SHOW QUERIES").await?;
                Ok(q.iter()
                    .all(|r| {
                        !r["checkpoint_batch"].is_empty()
                            && !r["recovery"].starts_with("rollback (until")
                    })
                    .then_some(()))
            })
            .await?;
            eprintln!("fault before statement {i}");
            match fault {
                Fault::Kill(w) => cluster.workers[w].kill9(),
                Fault::Drain(w) => cluster.workers[w].sigterm()?,
                Fault::Pause(w) => {
                    let before = show(&admin, "SHOW WORKERS").await?.len();
                    cluster.workers[w].pause()?;
                    // Silent, not gone: only missed heartbeats tell.
                    eventually(Duration::from_secs(30), || async {
                        let n = show(&admin, "SHOW WORKERS").await?.len();
                        Ok((n < before).then_some(()))
                    })
                    .await?;
                    eprintln!("hung worker declared lost");
                }
                Fault::Resume(w) => {
                    let before = show(&admin, "SHOW WORKERS").await?.len();
                    cluster.workers[w].resume()?;
                    // Its registration was fenced: it comes back as a new worker.
                    eventually(Duration::from_secs(30), || async {
                        let n = show(&admin, "SHOW WORKERS").await?.len();
                        Ok((n > before).then_some(()))
                    })
                    .await?;
                    eprintln!("thawed worker registered again");
                }
                Fault::AddWorker => {
                    cluster.add_worker(bin())?;
                }
                Fault::RestartServer => {
                    cluster.server.restart()?;
                    eprintln!("server restarted");
                    server_restarted = true;
                    admin = cluster.server.client().await?;
                    // The views resumed from their checkpoints.
                    let q = eventually(Duration::from_secs(30), || async {
                        let q = show(&admin, "SHOW QUERIES").await?;
                        Ok((q.len() == 6).then_some(q))
                    })
                    .await?;
                    for r in &q {
                        anyhow::ensure!(
                            !r["checkpoint_batch"].is_empty(),
                            "view resumed without its checkpoint: {r:?}"
                        );
                    }
                }
                Fault::BreakCheckpoints => {
                    std::fs::rename(&checkpoints, &aside)?;
                    std::fs::write(&checkpoints, b"not a directory")?;
                    // Ten intervals without a checkpoint: retention stops.
                    all_recover_by(&admin, "rollback (checkpoints stalled)").await?;
                    eprintln!("checkpoints stalled; map outputs no longer retained");
                    stalled_blocks = Some(blocks_held(&admin).await?);
                }
                Fault::RepairCheckpoints => {
                    let now = blocks_held(&admin).await? as i64;
                    stalled_growth = stalled_blocks.map(|b| now - b as i64);
                    std::fs::remove_file(&checkpoints)?;
                    std::fs::rename(&aside, &checkpoints)?;
                    all_recover_by(&admin, "lost-work").await?;
                    eprintln!("checkpoints repaired; lost-work recovery again");
                }
                Fault::Parallelism(n) => {
                    for view in ["win", "joined", "totals", "busiest", "leaders", "near"] {
                        admin
                            .batch_execute(&format!(
                                "ALTER MATERIALIZED VIEW {view} SET parallelism = {n}"
                            ))
                            .await?;
                    }
                }
            }
        }
        for stream in ["a", "b"] {
            let stmt = statement(stream, i);
            admin.batch_execute(&stmt).await?;
            oracle_admin.batch_execute(&stmt).await?;
        }
        // The input arrives over time (a workload, not a wait).
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    eprintln!("input fed; waiting for the oracle");
    // The oracle reaches its final state...
    let totals = expected_totals();
    let window_rows = expected_window_rows();
    let final_oracle = eventually(Duration::from_secs(60), || async {
        let t = contents(&oracle_admin, "totals").await?;
        let w = contents(&oracle_admin, "win").await?;
        let j = contents(&oracle_admin, "joined").await?;
        let b = contents(&oracle_admin, "busiest").await?;
        let l = contents(&oracle_admin, "leaders").await?;
        let n = contents(&oracle_admin, "near").await?;
        let done = t == totals
            && w.len() == window_rows
            && j.len() == expected_join_rows()
            && b.len() == window_rows / KEYS
            && l.len() == window_rows / KEYS
            && n.len() == expected_near_rows();
        // Not there yet: say how far each view is (the timeout's message).
        anyhow::ensure!(
            done,
            "oracle views not final: totals {t:?} (want {totals:?}), win {}/{window_rows}, \
             joined {}/{}, busiest {}/{}, leaders {}/{}, near {}/{}",
            w.len(),
            j.len(),
            expected_join_rows(),
            b.len(),
            window_rows / KEYS,
            l.len(),
            window_rows / KEYS,
            n.len(),
            expected_near_rows()
        );
        Ok(Some((w, j, t, b, l, n)))
    })
    .await?;
    eprintln!("oracle final; waiting for the cluster");
    // ...and so does the cluster, with exactly the same contents (a
    // cluster that rebalanced or recovered may trail the oracle by a while
    // on a loaded machine: the bound is generous, the check exact).
    let got = eventually(Duration::from_secs(180), || async {
        let w = contents(&admin, "win").await?;
        let j = contents(&admin, "joined").await?;
        let t = contents(&admin, "totals").await?;
        let b = contents(&admin, "busiest").await?;
        let l = contents(&admin, "leaders").await?;
        let n = contents(&admin, "near").await?;
        let done = w.len() >= window_rows
            && t == totals
            && j.len() >= final_oracle.1.len()
            && b.len() >= final_oracle.3.len()
            && l.len() >= final_oracle.4.len()
            && n.len() >= final_oracle.5.len();
        anyhow::ensure!(
            done,
            "cluster views not final: totals {t:?} (want {totals:?}), win {}/{window_rows}, \
             joined {}/{}, busiest {}/{}, leaders {}/{}, near {}/{}",
            w.len(),
            j.len(),
            final_oracle.1.len(),
            b.len(),
            final_oracle.3.len(),
            l.len(),
            final_oracle.4.len(),
            n.len(),
            final_oracle.5.len()
        );
        Ok(Some((w, j, t, b, l, n)))
    })
    .await?;
    assert_eq!(got.0, final_oracle.0, "windowed aggregate view differs");
    assert_eq!(got.1, final_oracle.1, "window join view differs");
    assert_eq!(got.2, final_oracle.2, "upsert aggregate view differs");
    assert_eq!(got.3, final_oracle.3, "three-stage view differs");
    assert_eq!(
        got.4, final_oracle.4,
        "six-stage view with a broadcast join differs"
    );
    assert_eq!(
        got.5, final_oracle.5,
        "interval join view (checkpointed as deltas) differs"
    );
    eprintln!("views equal; collecting continuous clients");
    // Continuous clients: exactly the oracle's rows, once each, in order.
    let mut outputs = Vec::new();
    for run in runs {
        let out = tokio::time::timeout(Duration::from_secs(60), run).await??;
        outputs.push(out);
    }
    if clients {
        let mut outputs = outputs.into_iter();
        let mut next = || outputs.next().unwrap_or_else(|| Ok(Vec::new()));
        let (c_select, c_copy, o_select, o_copy) = (next(), next(), next(), next());
        let (o_select, o_copy) = (o_select?, o_copy?);
        if server_restarted {
            // Continuous queries die with the server: a clean error.
            anyhow::ensure!(c_select.is_err(), "SELECT survived a server crash?");
        } else {
            same_stream(&c_select?, &o_select, "continuous SELECT");
            same_stream(&c_copy?, &o_copy, "COPY TO STDOUT");
        }
    }
    // Map outputs are retained for recovery only until a checkpoint covers
    // them: with the input over and checkpoints going on, every worker lets
    // go of every block.
    let workers = eventually(Duration::from_secs(30), || async {
        let w = show(&admin, "SHOW WORKERS").await?;
        Ok(w.iter().all(|w| num(w, "blocks_held") == 0).then_some(w))
    })
    .await
    .map_err(|e| e.context("retained shuffle blocks were never released"))?;
    Ok(Observed {
        queries: show(&admin, "SHOW QUERIES").await?,
        workers,
        stalled_growth,
        _turn: None,
    })
}

#[test]
fn kill9_of_a_worker_mid_stream_loses_and_duplicates_nothing() {
    let (_cluster, seen) = scenario(3, &[], vec![(20, Fault::Kill(1))], true);
    for q in &seen.queries {
        assert!(num(q, "recoveries") >= 1, "every view recovered: {q:?}");
    }
    assert_eq!(seen.workers.len(), 2, "the dead worker is forgotten");
    // The continuous SELECT and COPY (windowed aggregates over `a`: 3 map
    // and 3 reduce partitions, 2 on the lost worker) ended at their LIMIT.
    only_lost_work_was_recovered(&seen, 3, 1, 2 * 2);
}

#[test]
fn kill9_of_a_worker_with_rollback_recovery() {
    // The other recovery mode: every partition restarts from the checkpoint.
    let (_cluster, seen) = scenario(
        3,
        &["--recovery", "rollback"],
        vec![(20, Fault::Kill(2))],
        true,
    );
    for q in &seen.queries {
        let (kind, moved, total) = last_recovery(q);
        assert_eq!(kind, "rollback", "{q:?}");
        assert!(total > 0 && moved == total, "{q:?}");
    }
    let adopted = adopted(&seen);
    assert_eq!(adopted, 0, "nothing adopted in a rollback");
}

#[test]
fn a_failing_checkpoint_store_stops_block_retention_until_it_recovers() {
    // Retained map outputs are released by checkpoints: when the store
    // fails, workers stop retaining (their memory stays bounded while the
    // input keeps coming) and a loss would roll back; once checkpoints are
    // back, lost-work recovery is too, and a kill recovers that way.
    let (_cluster, seen) = scenario(
        3,
        &[],
        vec![
            (10, Fault::BreakCheckpoints),
            (35, Fault::RepairCheckpoints),
            (45, Fault::Kill(1)),
        ],
        false,
    );
    let growth = seen.stalled_growth.expect("measured while stalled");
    // 25 statements fed per stream while stalled: retained, their blocks
    // would number in the hundreds; released once read, only those in
    // flight remain.
    assert!(
        growth < 30,
        "blocks grew by {growth} while checkpoints failed"
    );
    for q in &seen.queries {
        assert_eq!(last_recovery(q).0, "lost work", "{q:?}");
        assert_eq!(q["recovery"], "lost-work", "{q:?}");
    }
}

#[test]
fn kill9_of_a_worker_while_checkpoints_are_written() {
    // With a 1 ms interval every group boundary writes a checkpoint, so the
    // kill lands while state objects are in flight.
    let (_cluster, seen) = scenario(
        3,
        &["--checkpoint-interval-ms", "1"],
        vec![(25, Fault::Kill(0))],
        false,
    );
    for q in &seen.queries {
        assert!(num(q, "recoveries") >= 1, "{q:?}");
    }
}

#[test]
fn two_workers_lost_one_after_the_other() {
    let (_cluster, seen) = scenario(
        4,
        &[],
        vec![(15, Fault::Kill(1)), (35, Fault::Kill(2))],
        true,
    );
    for q in &seen.queries {
        assert!(num(q, "recoveries") >= 2, "two recoveries: {q:?}");
        let (kind, moved, total) = last_recovery(q);
        assert_eq!(kind, "lost work", "{q:?}");
        assert!(moved > 0 && moved < total, "{q:?}");
    }
    assert_eq!(seen.workers.len(), 2);
}

#[test]
fn a_hung_worker_is_declared_lost_and_fenced_when_it_comes_back() {
    // SIGSTOP keeps the worker's connections open with nobody answering (a
    // partition): only missed heartbeats or launch timeouts reveal it. After
    // SIGCONT its late messages belong to a fenced registration; it comes
    // back as a new worker.
    let (_cluster, seen) = scenario(
        3,
        &[],
        vec![(15, Fault::Pause(1)), (40, Fault::Resume(1))],
        true,
    );
    for q in &seen.queries {
        assert!(num(q, "recoveries") >= 1, "recovered: {q:?}");
        assert!(
            num(q, "recovered_partitions") > 0,
            "the hung worker's partitions were restored elsewhere: {q:?}"
        );
    }
    assert_eq!(seen.workers.len(), 3, "the thawed worker is back");
}

#[test]
fn a_worker_added_mid_stream_takes_partitions_at_a_boundary() {
    let (cluster, seen) = scenario(2, &[], vec![(20, Fault::AddWorker)], false);
    for q in &seen.queries {
        assert_eq!(num(q, "recoveries"), 0, "no failure recovery: {q:?}");
        assert!(num(q, "attempt") >= 2, "rebalanced: {q:?}");
    }
    let newest = cluster.workers[2].address.clone();
    let w = seen
        .workers
        .iter()
        .find(|w| w["address"] == newest)
        .expect("the new worker is registered");
    assert!(num(w, "map_tasks") > 0, "the new worker ran tasks: {w:?}");
}

#[test]
fn a_worker_drained_with_sigterm_hands_over_and_exits() {
    let (mut cluster, seen) = scenario(3, &[], vec![(20, Fault::Drain(2))], false);
    for q in &seen.queries {
        assert_eq!(num(q, "recoveries"), 0, "a drain needs no recovery: {q:?}");
        assert!(num(q, "attempt") >= 2, "rebalanced: {q:?}");
    }
    let status = cluster.workers[2]
        .wait_exit(Duration::from_secs(30))
        .unwrap();
    // Killed by the signal it would not be a success: the drain ran.
    assert!(status.success(), "drained worker exit: {status}");
    assert_eq!(seen.workers.len(), 2);
}

#[test]
fn kill9_of_the_server_resumes_views_from_checkpoints() {
    // The scenario checks that every view came back with its checkpoint
    // (SHOW QUERIES right after the restart) and that the running SELECT
    // and COPY got an error, not a silent end.
    let (_cluster, seen) = scenario(2, &[], vec![(20, Fault::RestartServer)], true);
    assert_eq!(seen.queries.len(), 6, "every view resumed");
}

#[test]
fn parallelism_changes_repartition_state_by_key() {
    let (_cluster, seen) = scenario(3, &[], vec![(20, Fault::Parallelism(5))], false);
    for q in &seen.queries {
        assert_eq!(num(q, "parallelism"), 5, "{q:?}");
        assert_eq!(num(q, "recoveries"), 0, "{q:?}");
    }
}
