//! `drizzle bench ysb`, `drizzle bench sched`, `drizzle bench sim`,
//! `drizzle bench recovery`, `drizzle bench adaptive` and `drizzle bench
//! nexmark` ([`nexmark`]): benchmarks that print figures (never timed tests).
//!
//! ## The coordinator beyond this machine (`sim`)
//!
//! The real coordinator schedules a 1- to 4-stage query (`--stages`) over
//! `--remote-workers N` virtual workers ([`drizzle_exec::sim`]) that speak
//! the cluster protocol from a runtime of their own in this process and
//! complete every task at once. The line gives the coordinator threads' CPU
//! time per micro-batch (from `/proc`), the coordinator's own accounting
//! (planning and shipping launches, BSP barriers) and launches per batch.
//!
//! ## Adaptive group size under changing load
//!
//! A windowed aggregate (`count`, `sum` per key per 1-second window) over a
//! built-in stream on this process's coordinator and `remote_workers` worker
//! processes, with `group_size = 'auto'`. The benchmark appends to the
//! stream's log itself, every 10 ms, at a rate that changes by phases
//! (`--phases 10s@20000,10s@1000000,15s@20000`). Every 100 ms it samples the
//! group size, the share of wall time the coordinator spent coordinating
//! and the batch latency; the CSV holds the samples and the printed line
//! summarises each phase.
//!
//! ## Recovery timeline
//!
//! YSB-lite on this process's coordinator and `remote_workers` worker
//! processes; after `kill_after` one worker is killed with SIGKILL. Every
//! released micro-batch's (time, emit-minus-trigger latency, group size) goes
//! to a CSV; the line printed gives the steady-state batch latency (median of
//! the 3 s before the kill), the peak latency after the kill, and the time
//! from the kill until latency is back within 1.5x of steady state (the
//! first batch from which the median of the next 20 batches is).
//! `--recovery lost-work` (the default) re-runs only the dead worker's
//! partitions; `--recovery rollback` restarts every partition from the
//! checkpoint, for comparison.
//!
//! Both run the engine in this process; with `remote_workers > 0` it has no
//! in-process workers and the benchmark starts that many `drizzle worker`
//! processes (this same executable) on 127.0.0.1, so the cluster protocol,
//! Flight shuffles and the coordinator are all real.
//!
//! ## YSB-lite
//!
//! A `datagen` stream of ad events (`ad_id = n % 1000`, `event_type` one of
//! view/click/purchase, `event_time` = generation time, watermark = event
//! time) is joined to a 1,000-row table `ad_id → campaign_id = ad_id / 10`,
//! filtered to views and counted per campaign per 10-second tumbling window.
//! It prints one line of figures: offered rate, sustained throughput, source
//! lag at the end, window emit latency (emit time minus window end)
//! p50/p99/max, micro-batch latency (emit minus trigger) p50/p99 and peak RSS.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub mod nexmark;

use arrow::array::AsArray;
use arrow::datatypes::TimestampMicrosecondType;

use drizzle_exec::Scheduling;

use crate::engine::{Engine, EngineConfig, Outcome};
use crate::errors::PgError;

/// One benchmark run's settings.
#[derive(Debug, Clone)]
pub struct YsbConfig {
    /// Offered events per second.
    pub rate: f64,
    /// Run time after warm-up.
    pub duration: Duration,
    /// Micro-batch interval.
    pub batch_interval: Duration,
    /// Workers.
    pub workers: usize,
    /// Group size.
    pub group_size: u32,
    /// Worker processes to start (0 = in-process workers only).
    pub remote_workers: usize,
    /// Drizzle, group-only or BSP.
    pub scheduling: Scheduling,
    /// Tumbling window size in seconds (YSB: 10).
    pub window_seconds: u64,
}

/// Worker processes started for a benchmark; killed on drop.
struct RemoteWorkers(Vec<std::process::Child>);

/// Settings of `drizzle bench adaptive`.
#[derive(Debug, Clone)]
pub struct AdaptiveConfig {
    /// Input phases: (duration, rows per second).
    pub phases: Vec<(Duration, f64)>,
    /// Micro-batch interval.
    pub batch_interval: Duration,
    /// Worker processes.
    pub remote_workers: usize,
    /// Where the sampled timeline goes (CSV).
    pub timeline: std::path::PathBuf,
}

/// Parses `--phases`: comma-separated `<seconds>s@<rows per second>`.
pub fn parse_phases(text: &str) -> Result<Vec<(Duration, f64)>, String> {
    text.split(',')
        .map(|phase| {
            let (secs, rate) = phase
                .trim()
                .split_once('@')
                .ok_or_else(|| format!("'{phase}' is not <seconds>s@<rows per second>"))?;
            let secs: f64 = secs
                .trim_end_matches('s')
                .parse()
                .map_err(|_| format!("'{secs}' is not a number of seconds"))?;
            let rate: f64 = rate
                .parse()
                .map_err(|_| format!("'{rate}' is not a rate"))?;
            if !(secs > 0.0 && rate >= 0.0) {
                return Err(format!("'{phase}': need seconds > 0 and a rate >= 0"));
            }
            Ok((Duration::from_secs_f64(secs), rate))
        })
        .collect()
}

/// Settings of `drizzle bench recovery` beyond YSB's.
#[derive(Debug, Clone)]
pub struct RecoveryConfig {
    /// The YSB-lite run (duration counts after the kill).
    pub ysb: YsbConfig,
    /// When to kill a worker.
    pub kill_after: Duration,
    /// Where to write the per-batch timeline (CSV).
    pub timeline: std::path::PathBuf,
    /// Lost-work recovery or rollback.
    pub recovery: drizzle_exec::Recovery,
}

/// The cluster secret of this benchmark run's engine and worker processes.
fn bench_secret() -> &'static str {
    static SECRET: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SECRET.get_or_init(|| {
        crate::auth::random_key()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    })
}

fn bench_cluster_secret() -> Result<drizzle_exec::cluster::ClusterSecret, PgError> {
    drizzle_exec::cluster::ClusterSecret::new(bench_secret()).map_err(PgError::from)
}

impl RemoteWorkers {
    /// Starts `n` `drizzle worker` processes registered with `coordinator`.
    fn start(n: usize, coordinator: &str, dir: &std::path::Path) -> Result<Self, PgError> {
        use std::io::BufRead;
        let exe = std::env::current_exe()
            .map_err(|e| PgError::internal(format!("cannot find the drizzle executable: {e}")))?;
        let mut children = RemoteWorkers(Vec::new());
        for i in 0..n {
            let mut child = std::process::Command::new(&exe)
                .args([
                    "worker",
                    "--coordinator",
                    coordinator,
                    "--listen",
                    "127.0.0.1:0",
                ])
                .arg("--data-dir")
                .arg(dir.join(format!("worker{i}")))
                .env("RUST_LOG", "warn")
                .env("DRIZZLE_CLUSTER_SECRET", bench_secret())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| PgError::internal(format!("cannot start a worker: {e}")))?;
            let stdout = child.stdout.take();
            children.0.push(child);
            // The worker prints its address once registered.
            let mut line = String::new();
            if let Some(out) = stdout {
                let mut reader = std::io::BufReader::new(out);
                let _ = reader.read_line(&mut line);
                std::thread::spawn(move || for _ in reader.lines() {});
            }
            if !line.starts_with("drizzle worker listening on") {
                return Err(PgError::internal(format!(
                    "worker {i} did not start: {line}"
                )));
            }
        }
        Ok(children)
    }
}

impl Drop for RemoteWorkers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A query's recent micro-batch latencies (trigger to result), in ms, sorted.
fn recent_batch_ms(status: &drizzle_exec::QueryStatus) -> Vec<f64> {
    let mut batch_ms: Vec<f64> = status
        .recent_latencies_us
        .lock()
        .iter()
        .map(|&u| u as f64 / 1000.0)
        .collect();
    batch_ms.sort_by(f64::total_cmp);
    batch_ms
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Runs YSB-lite once and returns the report line.
pub async fn run_ysb(cfg: YsbConfig) -> Result<String, PgError> {
    let dir = std::env::temp_dir().join(format!("drizzle-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let in_process = if cfg.remote_workers > 0 {
        0
    } else {
        cfg.workers
    };
    let engine = Engine::open(
        &dir,
        in_process,
        EngineConfig {
            batch_interval: cfg.batch_interval,
            group_size: cfg.group_size,
            parallelism: 0,
            scheduling: cfg.scheduling,
            cluster_secret: bench_cluster_secret()?,
            ..EngineConfig::default()
        },
    )
    .await?;
    let _workers = RemoteWorkers::start(cfg.remote_workers, &engine.runtime.cluster_address, &dir)?;
    let mut handle = start_ysb(&engine, &cfg).await?;
    let window_us = cfg.window_seconds.max(1) as i64 * 1_000_000;
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let mut emit_latency_ms: Vec<f64> = Vec::new();
    let mut windows = 0u64;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let next = tokio::time::timeout(deadline - now, handle.next()).await;
        let Ok(Some(batch)) = next else { break };
        let batch = batch?;
        let wall_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        let starts = batch
            .rows
            .column(1)
            .as_primitive::<TimestampMicrosecondType>();
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..starts.len() {
            if seen.insert(starts.value(i)) {
                let end = starts.value(i) + window_us;
                emit_latency_ms.push((wall_us - end) as f64 / 1000.0);
                windows += 1;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let status = &handle.status;
    let processed = status.rows_in.load(Ordering::Relaxed);
    let offered = cfg.rate * elapsed;
    let lag_s = ((offered - processed as f64) / cfg.rate).max(0.0);
    let batch_ms = recent_batch_ms(status);
    emit_latency_ms.sort_by(f64::total_cmp);
    let batches = status.batches.load(Ordering::Relaxed);
    handle.cancel();
    engine.runtime.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(format!(
        "| {:>12.0} | {:>6} | {:>13.0} | {:>7.2} | {:>8.1} | {:>8.1} | {:>8.1} | {:>8.2} | {:>8.2} | {:>7} | {:>7} | {:>8.0} |",
        cfg.rate,
        format!("{}ms", cfg.batch_interval.as_millis()),
        processed as f64 / elapsed,
        lag_s,
        percentile(&emit_latency_ms, 0.5),
        percentile(&emit_latency_ms, 0.99),
        emit_latency_ms.last().copied().unwrap_or(f64::NAN),
        percentile(&batch_ms, 0.5),
        percentile(&batch_ms, 0.99),
        batches,
        windows,
        peak_rss_mb(),
    ))
}

/// `drizzle bench recovery`: see the module docs.
pub async fn run_recovery(cfg: RecoveryConfig) -> Result<String, PgError> {
    let ysb = &cfg.ysb;
    let dir = std::env::temp_dir().join(format!("drizzle-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let engine = Engine::open(
        &dir,
        0,
        EngineConfig {
            batch_interval: ysb.batch_interval,
            group_size: ysb.group_size,
            scheduling: ysb.scheduling,
            recovery: cfg.recovery,
            cluster_secret: bench_cluster_secret()?,
            ..EngineConfig::default()
        },
    )
    .await?;
    let mut workers = RemoteWorkers::start(
        ysb.remote_workers.max(2),
        &engine.runtime.cluster_address,
        &dir,
    )?;
    let mut handle = start_ysb(&engine, ysb).await?;
    let start = Instant::now();
    let kill_at = start + cfg.kill_after;
    let deadline = kill_at + ysb.duration;
    let mut killed: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if killed.is_none() && now >= kill_at {
            if let Some(victim) = workers.0.get_mut(1) {
                let _ = victim.kill();
                let _ = victim.wait();
            }
            killed = Some(Instant::now());
        }
        let wait = if killed.is_none() { kill_at } else { deadline };
        match tokio::time::timeout(wait.saturating_duration_since(now), handle.next()).await {
            Ok(Some(batch)) => {
                batch?;
            }
            Ok(None) => break,
            Err(_) => {}
        }
    }
    let status = std::sync::Arc::clone(&handle.status);
    // Read before the teardown, which stops the other workers too.
    let recoveries = status.recoveries.load(Ordering::Relaxed);
    let last_recovery = status.last_recovery.lock().clone().unwrap_or_default();
    handle.cancel();
    engine.runtime.shutdown();
    drop(workers);
    let _ = std::fs::remove_dir_all(&dir);
    let killed = killed.ok_or_else(|| PgError::internal("the run ended before the kill"))?;
    // (seconds since the kill, latency ms, group size), one per batch.
    let emits = status.recent_emits.lock().clone();
    let latencies = status.recent_latencies_us.lock().clone();
    let timeline: Vec<(f64, f64, u32)> = emits
        .iter()
        .zip(latencies.iter())
        .map(|((at, _, g), us)| {
            let t = if *at >= killed {
                at.duration_since(killed).as_secs_f64()
            } else {
                -killed.duration_since(*at).as_secs_f64()
            };
            (t, *us as f64 / 1000.0, *g)
        })
        .collect();
    let mut csv = String::from("seconds_since_kill,batch_latency_ms,group_size\n");
    for (t, l, g) in &timeline {
        csv.push_str(&format!("{t:.4},{l:.3},{g}\n"));
    }
    std::fs::write(&cfg.timeline, csv)
        .map_err(|e| PgError::internal(format!("cannot write {}: {e}", cfg.timeline.display())))?;
    let mut before: Vec<f64> = timeline
        .iter()
        .filter(|(t, _, _)| (-3.0..0.0).contains(t))
        .map(|(_, l, _)| *l)
        .collect();
    before.sort_by(f64::total_cmp);
    let steady = percentile(&before, 0.5);
    let after: Vec<&(f64, f64, u32)> = timeline.iter().filter(|(t, _, _)| *t >= 0.0).collect();
    let peak = after.iter().map(|(_, l, _)| *l).fold(0.0, f64::max);
    // Back to steady state: the first batch after the kill from which the
    // median of the next 20 batches is within 1.5x of steady state, after
    // the peak.
    let peak_at = after.iter().position(|(_, l, _)| *l == peak).unwrap_or(0);
    let recovered = (peak_at..after.len().saturating_sub(20)).find_map(|i| {
        let mut w: Vec<f64> = after[i..i + 20].iter().map(|(_, l, _)| *l).collect();
        w.sort_by(f64::total_cmp);
        (percentile(&w, 0.5) <= 1.5 * steady).then(|| after[i].0)
    });
    Ok(format!(
        "steady p50 {:.2} ms | peak after kill {:.1} ms | back within 1.5x after {} | recoveries {} ({}) | batches {} | timeline {}",
        steady,
        peak,
        recovered.map_or("never".to_string(), |s| format!("{s:.2} s")),
        recoveries,
        last_recovery,
        timeline.len(),
        cfg.timeline.display()
    ))
}

/// Creates YSB-lite's table and stream and starts its query.
async fn start_ysb(engine: &Engine, cfg: &YsbConfig) -> Result<drizzle_exec::QueryHandle, PgError> {
    // A partition per task slot of the registered workers.
    let parallel = cfg.workers.max(engine.runtime.slot_count());
    let mut settings = engine.default_settings();
    let ads: Vec<String> = (0..1000).map(|i| format!("({i}, {})", i / 10)).collect();
    let setup = format!(
        "CREATE TABLE ads (ad_id BIGINT, campaign_id BIGINT); \
         INSERT INTO ads VALUES {}; \
         CREATE STREAM events (user_id BIGINT, ad_id BIGINT, event_type TEXT, event_time TIMESTAMP, \
           WATERMARK FOR event_time AS event_time) WITH (connector = 'datagen', rows_per_second = '{}', partitions = '{}', \
           fields.ad_id.kind = 'sequence', fields.ad_id.min = '0', fields.ad_id.max = '999', \
           fields.event_type.values = 'view,click,purchase', fields.user_id.kind = 'random')",
        ads.join(", "),
        cfg.rate,
        parallel
    );
    for stmt in drizzle_planner::parse_statements(&setup)? {
        engine.execute(stmt, &mut settings, &[], "").await?;
    }
    let query = format!(
        "SELECT a.campaign_id, e.window_start, count(*) AS views \
         FROM TUMBLE(events, event_time, INTERVAL '{}' SECOND) e JOIN ads a ON e.ad_id = a.ad_id \
         WHERE e.event_type = 'view' GROUP BY a.campaign_id, e.window_start",
        cfg.window_seconds.max(1)
    );
    let query = query.as_str();
    let stmt = drizzle_planner::parse_statements(query)?.remove(0);
    let Outcome::Stream(handle) = engine.execute(stmt, &mut settings, &[], query).await? else {
        return Err(PgError::internal("the YSB query is not continuous"));
    };
    Ok(handle)
}

/// The header matching [`run_ysb`]'s line.
pub fn header() -> &'static str {
    "| offered ev/s | batch  | processed ev/s | lag (s) | emit p50 | emit p99 | emit max | batch p50 | batch p99 | batches | windows | RSS (MB) |\n\
     |-------------:|-------:|---------------:|--------:|---------:|---------:|---------:|---------:|---------:|--------:|--------:|---------:|"
}

/// One scheduling-overhead run's settings.
#[derive(Debug, Clone)]
pub struct SchedConfig {
    /// Worker processes.
    pub workers: usize,
    /// Drizzle, group-only or BSP.
    pub scheduling: Scheduling,
    /// Group size (BSP uses 1).
    pub group_size: u32,
    /// Measured seconds (after 2 s of warm-up).
    pub duration: Duration,
    /// Stages of the query: 1 (map only), 2 (`GROUP BY` over a shuffle),
    /// 3 or 4 (windowed aggregates over windowed aggregates, one more
    /// shuffle each).
    pub stages: u32,
}

/// The query of `stages` stages run by [`run_sched`]: a chain of shuffles.
pub fn sched_query(stages: u32) -> Result<&'static str, PgError> {
    Ok(match stages {
        1 => "SELECT k, ts FROM tiny WHERE k >= 0",
        2 => "SELECT k, count(*) FROM tiny GROUP BY k",
        3 => {
            "SELECT ws, max(n) FROM (SELECT k, count(*) AS n, window_start AS ws \
              FROM TUMBLE(tiny, ts, INTERVAL '1' SECOND) GROUP BY k, window_start) AS c GROUP BY ws"
        }
        4 => {
            "SELECT ws, count(*) FROM (SELECT ws, k % 10 AS g, max(n) AS m \
              FROM (SELECT k, count(*) AS n, window_start AS ws \
              FROM TUMBLE(tiny, ts, INTERVAL '1' SECOND) GROUP BY k, window_start) AS c \
              GROUP BY ws, k % 10) AS d GROUP BY ws"
        }
        other => {
            return Err(PgError::new(
                "22023",
                format!("--stages {other}: the scheduling benchmark has plans of 1 to 4 stages"),
            ))
        }
    })
}

/// Creates the `tiny` datagen stream (1,000 rows/s, one partition per
/// worker) and starts the [`sched_query`] of `stages` stages over it.
async fn start_tiny_query(
    engine: &Engine,
    partitions: usize,
    stages: u32,
) -> Result<drizzle_exec::QueryHandle, PgError> {
    let mut settings = engine.default_settings();
    let setup = format!(
        "CREATE STREAM tiny (k BIGINT, ts TIMESTAMP, WATERMARK FOR ts AS ts) WITH (connector = 'datagen', \
           rows_per_second = '1000', partitions = '{partitions}', fields.k.kind = 'sequence', fields.k.min = '0', \
           fields.k.max = '99')"
    );
    for stmt in drizzle_planner::parse_statements(&setup)? {
        engine.execute(stmt, &mut settings, &[], "").await?;
    }
    let query = sched_query(stages)?;
    let stmt = drizzle_planner::parse_statements(query)?.remove(0);
    match engine.execute(stmt, &mut settings, &[], query).await? {
        Outcome::Stream(handle) => Ok(handle),
        _ => Err(PgError::internal("the query is not continuous")),
    }
}

/// The scheduling micro-benchmark of the Drizzle paper: a query of 1 to 4
/// stages (a chain of shuffles, see [`sched_query`]) on tiny input,
/// micro-batches triggered back to back (10 µs interval), so the time per
/// micro-batch is the cost of scheduling and coordinating it. Returns the
/// report line.
pub async fn run_sched(cfg: SchedConfig) -> Result<String, PgError> {
    let dir = std::env::temp_dir().join(format!("drizzle-sched-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let engine = Engine::open(
        &dir,
        0,
        EngineConfig {
            // Far below any batch's cost: batches run back to back, so the
            // time per batch is what scheduling it costs.
            batch_interval: Duration::from_micros(10),
            group_size: cfg.group_size.max(1),
            parallelism: 0,
            scheduling: cfg.scheduling,
            cluster_secret: bench_cluster_secret()?,
            ..EngineConfig::default()
        },
    )
    .await?;
    let workers = RemoteWorkers::start(cfg.workers, &engine.runtime.cluster_address, &dir)?;
    let mut handle = start_tiny_query(&engine, cfg.workers, cfg.stages).await?;
    let warmup = Instant::now() + Duration::from_secs(2);
    let mut t0 = None;
    let deadline = warmup + cfg.duration;
    let status = std::sync::Arc::clone(&handle.status);
    let snapshot = || {
        (
            Instant::now(),
            status.batches.load(Ordering::Relaxed),
            status.coordination_us.load(Ordering::Relaxed),
            status.launches.load(Ordering::Relaxed),
        )
    };
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if t0.is_none() && now >= warmup {
            t0 = Some(snapshot());
        }
        match tokio::time::timeout(Duration::from_millis(50), handle.next()).await {
            Ok(Some(Ok(_))) | Err(_) => {}
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) => break,
        }
    }
    let (t1, b1, c1, l1) = snapshot();
    let (t0, b0, c0, l0) = t0.unwrap_or((t1, b1, c1, l1));
    handle.cancel();
    let batches = b1.saturating_sub(b0).max(1);
    let ms_per_batch = t1.duration_since(t0).as_secs_f64() * 1000.0 / batches as f64;
    let coord_us = c1.saturating_sub(c0) as f64 / batches as f64;
    let launches = l1.saturating_sub(l0) as f64 / batches as f64;
    engine.runtime.shutdown();
    drop(workers);
    let _ = std::fs::remove_dir_all(&dir);
    let group = match cfg.scheduling {
        Scheduling::Bsp => 1,
        _ => cfg.group_size,
    };
    Ok(format!(
        "| {:>6} | {:>7} | {:>10} | {:>5} | {:>11.3} | {:>9.0} | {:>17.1} | {:>18.3} |",
        cfg.stages,
        cfg.workers,
        cfg.scheduling.to_string(),
        group,
        ms_per_batch,
        1000.0 / ms_per_batch,
        coord_us,
        launches
    ))
}

/// Settings of `drizzle bench sim`.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Virtual workers.
    pub workers: usize,
    /// Drizzle, group-only or BSP.
    pub scheduling: Scheduling,
    /// Group size (BSP uses 1).
    pub group_size: u32,
    /// Measured seconds (after the warm-up).
    pub duration: Duration,
    /// Stages of the query ([`sched_query`]).
    pub stages: u32,
}

/// CPU time (µs) of this process's threads whose name starts with
/// `prefix`, from `/proc/self/task/*/stat` (0 where that is unreadable).
fn threads_cpu_us(prefix: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    // Clock ticks per second: 100 on Linux everywhere that matters.
    const TICK_US: u64 = 10_000;
    let mut total = 0;
    for task in tasks.flatten() {
        let path = task.path();
        let named = std::fs::read_to_string(path.join("comm"))
            .is_ok_and(|c| c.trim_end().starts_with(prefix));
        if !named {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        // Fields after the command name (which may hold spaces): state is
        // field 3, utime 14, stime 15.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        total += (ticks(11) + ticks(12)) * TICK_US;
    }
    total
}

/// Name prefix of the coordinator's threads in `drizzle bench` (their CPU
/// time is what `bench sim` reports).
pub const COORDINATOR_THREADS: &str = "drizzle-coord";

/// `drizzle bench sim`: the real coordinator (this process's runtime,
/// threads named [`COORDINATOR_THREADS`]) schedules a query over `workers`
/// virtual workers ([`drizzle_exec::sim`], on a runtime of their own), one
/// source and one reduce partition per worker, micro-batches back to back.
/// Reports the coordinator threads' CPU time per micro-batch.
pub async fn run_sim(cfg: SimConfig) -> Result<String, PgError> {
    let dir = std::env::temp_dir().join(format!("drizzle-sim-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let secret = bench_cluster_secret()?;
    let engine = Engine::open(
        &dir,
        0,
        EngineConfig {
            batch_interval: Duration::from_micros(10),
            group_size: cfg.group_size.max(1),
            parallelism: 0,
            scheduling: cfg.scheduling,
            cluster_secret: secret.clone(),
            // Heartbeats of a thousand workers sharing two cores may lag.
            worker_timeout: Duration::from_secs(120),
            // Virtual workers hold no state: no checkpoint during the run.
            checkpoint_interval: Duration::from_secs(86_400),
            ..EngineConfig::default()
        },
    )
    .await?;
    let workers_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("vworker")
        .enable_all()
        .build()
        .map_err(|e| PgError::internal(format!("cannot start the virtual workers: {e}")))?;
    let address = engine.runtime.cluster_address.clone();
    let n = cfg.workers;
    let virtual_workers = workers_rt
        .spawn(async move {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(drizzle_exec::sim::VirtualWorker::start(&address, &secret).await?);
            }
            Ok::<_, drizzle_exec::ExecError>(v)
        })
        .await
        .map_err(|e| PgError::internal(e.to_string()))??;
    let mut handle = start_tiny_query(&engine, cfg.workers, cfg.stages).await?;
    let status = std::sync::Arc::clone(&handle.status);
    let snapshot = || {
        (
            Instant::now(),
            status.batches.load(Ordering::Relaxed),
            status.coordination_us.load(Ordering::Relaxed),
            status.launches.load(Ordering::Relaxed),
            threads_cpu_us(COORDINATOR_THREADS),
        )
    };
    // Warm up until batches flow (registration and the first launches of a
    // thousand workers take a while), then measure.
    let warmup = Instant::now() + Duration::from_secs(2);
    let mut t0 = None;
    let mut deadline = None;
    let give_up = Instant::now() + Duration::from_secs(120) + cfg.duration;
    loop {
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) || now >= give_up {
            break;
        }
        if t0.is_none() && now >= warmup && status.batches.load(Ordering::Relaxed) > 0 {
            t0 = Some(snapshot());
            deadline = Some(now + cfg.duration);
        }
        match tokio::time::timeout(Duration::from_millis(50), handle.next()).await {
            Ok(Some(Ok(_))) | Err(_) => {}
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) => break,
        }
    }
    let (t1, b1, c1, l1, cpu1) = snapshot();
    let (t0, b0, c0, l0, cpu0) = t0.unwrap_or((t1, b1, c1, l1, cpu1));
    handle.cancel();
    let batches = b1.saturating_sub(b0).max(1);
    let per_s = batches as f64 / t1.duration_since(t0).as_secs_f64().max(1e-9);
    let cpu_us = cpu1.saturating_sub(cpu0) as f64 / batches as f64;
    let coord_us = c1.saturating_sub(c0) as f64 / batches as f64;
    let launches = l1.saturating_sub(l0) as f64 / batches as f64;
    engine.runtime.shutdown();
    drop(virtual_workers);
    workers_rt.shutdown_background();
    let _ = std::fs::remove_dir_all(&dir);
    let group = match cfg.scheduling {
        Scheduling::Bsp => 1,
        _ => cfg.group_size,
    };
    Ok(format!(
        "| {:>6} | {:>7} | {:>10} | {:>5} | {:>9.0} | {:>16.1} | {:>17.1} | {:>18.3} |",
        cfg.stages,
        cfg.workers,
        cfg.scheduling.to_string(),
        group,
        per_s,
        cpu_us,
        coord_us,
        launches
    ))
}

/// `drizzle bench machine`: the coordinator's decisions alone, one
/// query's state machine over `workers` virtual workers with no network
/// ([`drizzle_exec::sim::drive_machine`]): 10,000 micro-batches (2,000 for
/// BSP, whose barriers grow with the square of the workers). Reports the
/// machine's time per micro-batch on one thread (its steps and the encoding
/// of every launch), launches and launch bytes per micro-batch.
pub fn run_machine(
    workers: usize,
    stages: u32,
    scheduling: Scheduling,
    group_size: u32,
) -> Result<String, PgError> {
    let batches = match scheduling {
        Scheduling::Bsp => 2_000,
        _ => 10_000,
    };
    let group = match scheduling {
        Scheduling::Bsp => 1,
        _ => group_size.max(1),
    };
    let f = drizzle_exec::sim::drive_machine(workers as u32, stages, scheduling, group, batches)?;
    let per = |x: f64| x / f.batches.max(1) as f64;
    Ok(format!(
        "| {:>6} | {:>7} | {:>10} | {:>5} | {:>7} | {:>14.2} | {:>16.3} | {:>18.1} |",
        stages,
        workers,
        scheduling.to_string(),
        group,
        f.batches,
        per(f.elapsed.as_secs_f64() * 1e6),
        per((f.launches + f.barrier_launches) as f64),
        per(f.bytes as f64) / 1024.0,
    ))
}

/// The header matching [`run_machine`]'s line.
pub fn machine_header() -> &'static str {
    "| stages | workers | scheduling | G     | batches | µs / batch     | launches / batch | launch KiB / batch |\n\
     |-------:|--------:|-----------:|------:|--------:|---------------:|-----------------:|-------------------:|"
}

/// The header matching [`run_sim`]'s line.
pub fn sim_header() -> &'static str {
    "| stages | workers | scheduling | G     | batches/s | coord. CPU µs / batch | coord. µs / batch | launches / batch   |\n\
     |-------:|--------:|-----------:|------:|----------:|-----------------:|------------------:|-------------------:|"
}

/// The header matching [`run_sched`]'s line.
pub fn sched_header() -> &'static str {
    "| stages | workers | scheduling | G     | ms / batch  | batches/s | coord. µs / batch | launches / batch   |\n\
     |-------:|--------:|-----------:|------:|------------:|----------:|------------------:|-------------------:|"
}

/// One 100 ms sample of `drizzle bench adaptive`.
struct Sample {
    at: f64,
    rate: f64,
    group_size: u32,
    coordination_share: f64,
    batch_p50_ms: f64,
    rows_per_s: f64,
}

/// `drizzle bench adaptive`: see the module docs.
pub async fn run_adaptive(cfg: AdaptiveConfig) -> Result<String, PgError> {
    use arrow::array::{Int64Array, TimestampMicrosecondArray};
    let dir = std::env::temp_dir().join(format!("drizzle-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let workers = cfg.remote_workers.max(1);
    let engine = Engine::open(
        &dir,
        0,
        EngineConfig {
            batch_interval: cfg.batch_interval,
            group_size: 0,
            cluster_secret: bench_cluster_secret()?,
            ..EngineConfig::default()
        },
    )
    .await?;
    let _workers = RemoteWorkers::start(workers, &engine.runtime.cluster_address, &dir)?;
    let mut settings = engine.default_settings();
    let setup = format!(
        "CREATE STREAM ev (k BIGINT, v BIGINT, ts TIMESTAMP, \
           WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) WITH (partitions = {workers})"
    );
    for stmt in drizzle_planner::parse_statements(&setup)? {
        engine.execute(stmt, &mut settings, &[], "").await?;
    }
    let query = "SELECT window_start, k, count(*) AS n, sum(v) AS s \
         FROM TUMBLE(ev, ts, INTERVAL '1' SECOND) GROUP BY window_start, k";
    let stmt = drizzle_planner::parse_statements(query)?.remove(0);
    let Outcome::Stream(mut handle) = engine.execute(stmt, &mut settings, &[], query).await? else {
        return Err(PgError::internal("the query is not continuous"));
    };
    let log = engine
        .catalog
        .stream_log("ev")
        .ok_or_else(|| PgError::internal("stream ev has no log"))?;
    let schema = std::sync::Arc::clone(log.schema());
    // The feeder: every 10 ms, the rows the current phase's rate asks for.
    let phases = cfg.phases.clone();
    let total: Duration = phases.iter().map(|(d, _)| *d).sum();
    let start = Instant::now();
    let rate_at = move |t: Duration| -> f64 {
        let mut end = Duration::ZERO;
        for (d, rate) in &phases {
            end += *d;
            if t < end {
                return *rate;
            }
        }
        0.0
    };
    let feeder = {
        let rate_at = rate_at.clone();
        tokio::task::spawn_blocking(move || -> Result<u64, PgError> {
            let tick = Duration::from_millis(10);
            let mut next = start;
            let mut n = 0i64;
            let mut owed = 0.0f64;
            while start.elapsed() < total {
                owed += rate_at(start.elapsed()) * tick.as_secs_f64();
                let rows = owed.floor() as i64;
                owed -= rows as f64;
                if rows > 0 {
                    let now_us = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_micros() as i64)
                        .unwrap_or(0);
                    let batch = arrow::record_batch::RecordBatch::try_new(
                        std::sync::Arc::clone(&schema),
                        vec![
                            std::sync::Arc::new(Int64Array::from_iter_values(
                                (n..n + rows).map(|i| i % 1000),
                            )),
                            std::sync::Arc::new(Int64Array::from_iter_values(n..n + rows)),
                            std::sync::Arc::new(TimestampMicrosecondArray::from_iter_values(
                                std::iter::repeat_n(now_us, rows as usize),
                            )),
                        ],
                    )
                    .map_err(|e| PgError::internal(format!("feeder batch: {e}")))?;
                    log.append(&batch)?;
                    n += rows;
                }
                next += tick;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            Ok(n as u64)
        })
    };
    let status = std::sync::Arc::clone(&handle.status);
    let mut samples: Vec<Sample> = Vec::new();
    let mut last = (Instant::now(), 0u64, 0u64, 0usize);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while start.elapsed() < total {
        tokio::select! {
            b = handle.next() => match b {
                Some(b) => { b?; }
                None => break,
            },
            _ = tick.tick() => {
                let now = Instant::now();
                let coord = status.coordination_us.load(Ordering::Relaxed);
                let rows = status.rows_in.load(Ordering::Relaxed);
                let latencies = status.recent_latencies_us.lock().clone();
                let mut recent: Vec<f64> = latencies
                    .iter()
                    .skip(last.3.min(latencies.len()))
                    .map(|&u| u as f64 / 1000.0)
                    .collect();
                recent.sort_by(f64::total_cmp);
                let wall_us = now.duration_since(last.0).as_secs_f64() * 1e6;
                samples.push(Sample {
                    at: start.elapsed().as_secs_f64(),
                    rate: rate_at(start.elapsed()),
                    group_size: status.group_size.load(Ordering::Relaxed),
                    coordination_share: (coord - last.1) as f64 / wall_us.max(1.0),
                    batch_p50_ms: percentile(&recent, 0.5),
                    rows_per_s: (rows.saturating_sub(last.2)) as f64 / (wall_us / 1e6).max(1e-6),
                });
                last = (now, coord, rows, latencies.len());
            }
        }
    }
    let fed = feeder
        .await
        .map_err(|e| PgError::internal(format!("feeder: {e}")))??;
    handle.cancel();
    engine.runtime.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    let mut csv = String::from(
        "seconds,offered_rows_per_s,group_size,coordination_share,batch_p50_ms,rows_in_per_s\n",
    );
    for s in &samples {
        csv.push_str(&format!(
            "{:.2},{:.0},{},{:.4},{:.3},{:.0}\n",
            s.at, s.rate, s.group_size, s.coordination_share, s.batch_p50_ms, s.rows_per_s
        ));
    }
    std::fs::write(&cfg.timeline, csv)
        .map_err(|e| PgError::internal(format!("cannot write {}: {e}", cfg.timeline.display())))?;
    // Per phase: the group size it settles at (median, and the largest),
    // the coordination share and the batch latency.
    let mut out = Vec::new();
    let mut from = 0.0;
    for (d, rate) in &cfg.phases {
        let to = from + d.as_secs_f64();
        let inside: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.at >= from && s.at < to)
            .collect();
        let mut g: Vec<f64> = inside.iter().map(|s| s.group_size as f64).collect();
        g.sort_by(f64::total_cmp);
        let mut share: Vec<f64> = inside.iter().map(|s| s.coordination_share).collect();
        share.sort_by(f64::total_cmp);
        let mut lat: Vec<f64> = inside
            .iter()
            .map(|s| s.batch_p50_ms)
            .filter(|l| l.is_finite())
            .collect();
        lat.sort_by(f64::total_cmp);
        out.push(format!(
            "{:.0}-{:.0} s @ {:.0} rows/s: G median {:.0} max {:.0}, coordination {:.1}%, batch p50 {:.2} ms",
            from,
            to,
            rate,
            percentile(&g, 0.5),
            g.last().copied().unwrap_or(f64::NAN),
            100.0 * percentile(&share, 0.5),
            percentile(&lat, 0.5),
        ));
        from = to;
    }
    Ok(format!(
        "{} | rows fed {fed} | timeline {}",
        out.join(" | "),
        cfg.timeline.display()
    ))
}
