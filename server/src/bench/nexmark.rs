//! `drizzle bench nexmark --query qN`: a Nexmark query over the `nexmark`
//! connector's three streams, on an embedded engine.
//!
//! Two modes:
//! * **Throughput** (`--rate 0`, the default): `--events N` events whose
//!   event times lie in the past (1 M events per second of event time), so
//!   the whole sequence is a backlog the query reads as fast as it can. The
//!   line gives events per second of wall time (all three types count, as
//!   Nexmark counts its source's events), events per CPU-second of the
//!   process (the per-core figure), CPU use, peak RSS and the query's state
//!   at the end.
//! * **Live** (`--rate R --seconds S`): events arrive at R per second of
//!   wall time (their event time is their arrival time). The line gives the
//!   processed rate, the lag at the end and the micro-batch latency
//!   (trigger to result) p50/p99: the time from a batch's last event to its
//!   results, which is when a window closed by that event is emitted.
//!
//! The queries are the files of `benches/nexmark/`, RisingWave's and Flink's
//! text with only the DDL changed.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::engine::{Engine, EngineConfig, Outcome};
use crate::errors::PgError;

use super::{bench_cluster_secret, peak_rss_mb, percentile, recent_batch_ms};

/// The query files, by name.
pub const QUERIES: &[(&str, &str)] = &[
    ("q0", include_str!("../../../benches/nexmark/q0.sql")),
    ("q1", include_str!("../../../benches/nexmark/q1.sql")),
    ("q2", include_str!("../../../benches/nexmark/q2.sql")),
    ("q3", include_str!("../../../benches/nexmark/q3.sql")),
    ("q4", include_str!("../../../benches/nexmark/q4.sql")),
    ("q5", include_str!("../../../benches/nexmark/q5.sql")),
    ("q6", include_str!("../../../benches/nexmark/q6.sql")),
    ("q7", include_str!("../../../benches/nexmark/q7.sql")),
    ("q8", include_str!("../../../benches/nexmark/q8.sql")),
    ("q9", include_str!("../../../benches/nexmark/q9.sql")),
    ("q10", include_str!("../../../benches/nexmark/q10.sql")),
    ("q11", include_str!("../../../benches/nexmark/q11.sql")),
    ("q12", include_str!("../../../benches/nexmark/q12.sql")),
    ("q13", include_str!("../../../benches/nexmark/q13.sql")),
    ("q14", include_str!("../../../benches/nexmark/q14.sql")),
    ("q15", include_str!("../../../benches/nexmark/q15.sql")),
    ("q16", include_str!("../../../benches/nexmark/q16.sql")),
    ("q17", include_str!("../../../benches/nexmark/q17.sql")),
    ("q18", include_str!("../../../benches/nexmark/q18.sql")),
    ("q19", include_str!("../../../benches/nexmark/q19.sql")),
    ("q20", include_str!("../../../benches/nexmark/q20.sql")),
    ("q21", include_str!("../../../benches/nexmark/q21.sql")),
    ("q22", include_str!("../../../benches/nexmark/q22.sql")),
];

const DDL: &str = include_str!("../../../benches/nexmark/ddl.sql");
const FUNCTIONS: &str = include_str!("../../../benches/nexmark/functions.sql");

/// Settings of `drizzle bench nexmark`.
#[derive(Debug, Clone)]
pub struct NexmarkConfig {
    /// The query's name (`q0` .. `q22`).
    pub query: String,
    /// Live events per second; 0 = throughput over a backlog.
    pub rate: f64,
    /// Throughput: events in the backlog.
    pub events: u64,
    /// Live: seconds to run.
    pub duration: Duration,
    /// Micro-batch interval.
    pub batch_interval: Duration,
    /// Group size.
    pub group_size: u32,
    /// In-process workers.
    pub workers: usize,
}

/// The streams' DDL for a query: `bid` has a processing-time column for
/// q12 (its windows are over processing time).
pub fn nexmark_ddl(query: &str, options: &str) -> String {
    let proctime = if query.eq_ignore_ascii_case("q12") {
        " p_time TIMESTAMPTZ AS PROCTIME(),"
    } else {
        ""
    };
    DDL.replace("{options}", options)
        .replace("{proctime}", proctime)
}

/// The query's text without comments.
fn query_text(name: &str) -> Result<String, PgError> {
    let (_, text) = QUERIES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .ok_or_else(|| PgError::new("22023", format!("no Nexmark query {name} (q0 .. q22)")))?;
    Ok(text
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Process CPU time (user + system), from `/proc/self/stat`.
fn process_cpu() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name's closing parenthesis; utime and
            // stime are the 14th and 15th fields of the line.
            let rest = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    // The kernel's USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// Runs one Nexmark query and returns its line.
pub async fn run_nexmark(cfg: NexmarkConfig) -> Result<String, PgError> {
    let sql = query_text(&cfg.query)?;
    let dir = std::env::temp_dir().join(format!("drizzle-nexmark-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let engine = Engine::open(
        &dir,
        cfg.workers,
        EngineConfig {
            batch_interval: cfg.batch_interval,
            group_size: cfg.group_size,
            parallelism: 0,
            cluster_secret: bench_cluster_secret()?,
            // The benchmark measures state (and RSS) rather than stopping
            // at the default 1 GiB budget.
            query_memory_limit: 0,
            ..EngineConfig::default()
        },
    )
    .await?;
    let partitions = cfg.workers.max(engine.runtime.slot_count()).max(1);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let throughput = cfg.rate <= 0.0;
    // Throughput: a backlog at 1 M events per second of event time, all in
    // the past. Live: the events arrive at the rate from now on.
    let (rate, base_ms, bound) = if throughput {
        let rate = 1_000_000.0;
        let span_ms = (cfg.events as f64 / rate * 1000.0).ceil() as i64;
        (
            rate,
            now_ms - span_ms - 1000,
            format!(", nexmark.event.num = '{}'", cfg.events),
        )
    } else {
        (cfg.rate, now_ms, String::new())
    };
    let base = arrow::array::TimestampMillisecondArray::from(vec![base_ms]);
    let base = arrow::util::display::array_value_to_string(&base, 0)
        .map_err(|e| PgError::internal(e.to_string()))?;
    let options = format!(
        ", events_per_second = '{rate}', base_time = '{base}', partitions = '{partitions}'{bound}"
    );
    let mut settings = engine.default_settings();
    // q13's side input: keys 0 to 9,999, each with its number as text.
    let side: Vec<String> = (0..10_000).map(|k| format!("({k}, '{k}')")).collect();
    let setup = format!(
        "{}; {FUNCTIONS}; CREATE TABLE side_input (key BIGINT, value VARCHAR); INSERT INTO side_input VALUES {}",
        nexmark_ddl(&cfg.query, &options),
        side.join(", ")
    );
    for stmt in drizzle_planner::parse_statements(&setup)? {
        engine.execute(stmt, &mut settings, &[], "").await?;
    }
    let stmt = drizzle_planner::parse_statements(&sql)?
        .into_iter()
        .next()
        .ok_or_else(|| PgError::internal("an empty Nexmark query"))?;
    let cpu_before = process_cpu();
    let start = Instant::now();
    let Outcome::Stream(mut handle) = engine.execute(stmt, &mut settings, &[], &sql).await? else {
        return Err(PgError::internal("the Nexmark query is not continuous"));
    };
    let mut rows_out = 0u64;
    let mut last_in = 0u64;
    let mut last_change = start;
    let deadline = start
        + if throughput {
            Duration::from_secs(600)
        } else {
            cfg.duration
        };
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let wait = Duration::from_millis(10).min(deadline - now);
        match tokio::time::timeout(wait, handle.next()).await {
            Ok(Some(batch)) => rows_out += batch?.rows.num_rows() as u64,
            Ok(None) => break,
            Err(_) => {}
        }
        let rows_in = handle.status.rows_in.load(Ordering::Relaxed);
        if rows_in != last_in {
            last_in = rows_in;
            last_change = Instant::now();
        } else if throughput && rows_in > 0 && last_change.elapsed() > Duration::from_secs(2) {
            // Every event read and nothing more for 2 s: the backlog is done.
            break;
        }
    }
    let cpu = process_cpu().saturating_sub(cpu_before);
    let status = &handle.status;
    let batch_ms = recent_batch_ms(status);
    let state_mb = status.state_bytes.load(Ordering::Relaxed) as f64 / 1e6;
    let state_keys = status.state_keys.load(Ordering::Relaxed);
    let line = if throughput {
        let wall = last_change.duration_since(start).as_secs_f64();
        let per_s = cfg.events as f64 / wall.max(1e-9);
        let cpu_s = cpu.as_secs_f64();
        format!(
            "| {:>4} | {:>11} | {:>13.0} | {:>15.0} | {:>6.2} | {:>10} | {:>8.1} | {:>9} | {:>8.0} |",
            cfg.query,
            cfg.events,
            per_s,
            cfg.events as f64 / cpu_s.max(1e-9),
            cpu_s / wall.max(1e-9),
            rows_out,
            state_mb,
            state_keys,
            peak_rss_mb(),
        )
    } else {
        let elapsed = start.elapsed().as_secs_f64();
        // Events of all types that existed by now, against those read (the
        // query reads only its streams' share of them).
        format!(
            "| {:>4} | {:>11.0} | {:>6} | {:>8.2} | {:>8.2} | {:>10} | {:>6.2} | {:>8.1} | {:>8.0} |",
            cfg.query,
            cfg.rate,
            format!("{}ms", cfg.batch_interval.as_millis()),
            percentile(&batch_ms, 0.5),
            percentile(&batch_ms, 0.99),
            rows_out,
            cpu.as_secs_f64() / elapsed.max(1e-9),
            state_mb,
            peak_rss_mb(),
        )
    };
    handle.cancel();
    engine.runtime.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(line)
}

/// The header of a throughput line.
pub fn throughput_header() -> &'static str {
    "| query | events | events/s | events/CPU-s | cores used | rows out | state (MB) | state keys | RSS (MB) |\n\
     |------|------------:|--------------:|----------------:|-------:|-----------:|---------:|----------:|---------:|"
}

/// The header of a live line.
pub fn live_header() -> &'static str {
    "| query | events/s | batch | batch p50 (ms) | batch p99 (ms) | rows out | cores used | state (MB) | RSS (MB) |\n\
     |------|------------:|-------:|---------:|---------:|-----------:|-------:|---------:|---------:|"
}
