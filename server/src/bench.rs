//! `drizzle bench ysb`: the YSB-lite workload on an embedded engine.
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

use arrow::array::AsArray;
use arrow::datatypes::TimestampMicrosecondType;

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
    let engine = Engine::open(
        &dir,
        cfg.workers,
        EngineConfig {
            batch_interval: cfg.batch_interval,
            group_size: cfg.group_size,
            parallelism: 0,
            ..EngineConfig::default()
        },
    )
    .await?;
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
        cfg.workers
    );
    for stmt in drizzle_planner::parse_statements(&setup)? {
        engine.execute(stmt, &mut settings, &[], "").await?;
    }
    let query = "SELECT a.campaign_id, e.window_start, count(*) AS views \
                 FROM TUMBLE(events, event_time, INTERVAL '10' SECOND) e JOIN ads a ON e.ad_id = a.ad_id \
                 WHERE e.event_type = 'view' GROUP BY a.campaign_id, e.window_start";
    let stmt = drizzle_planner::parse_statements(query)?.remove(0);
    let Outcome::Stream(mut handle) = engine.execute(stmt, &mut settings, &[], query).await? else {
        return Err(PgError::internal("the YSB query is not continuous"));
    };
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
                let end = starts.value(i) + 10_000_000;
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
    let mut batch_ms: Vec<f64> = status
        .recent_latencies_us
        .lock()
        .iter()
        .map(|&u| u as f64 / 1000.0)
        .collect();
    batch_ms.sort_by(f64::total_cmp);
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

/// The header matching [`run_ysb`]'s line.
pub fn header() -> &'static str {
    "| offered ev/s | batch  | processed ev/s | lag (s) | emit p50 | emit p99 | emit max | batch p50 | batch p99 | batches | windows | RSS (MB) |\n\
     |-------------:|-------:|---------------:|--------:|---------:|---------:|---------:|---------:|---------:|--------:|--------:|---------:|"
}
