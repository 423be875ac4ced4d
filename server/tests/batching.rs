//! Results do not depend on how rows fall into micro-batches: the same
//! input, arriving over time, gives the same windowed output at batch
//! intervals of 1 ms and 1 s, and both equal a record-at-a-time oracle.

use std::collections::BTreeMap;
use std::time::Duration;

use drizzle_sql_tests::{rows, TestServer};

const DELAY_S: i64 = 3;
const SIZE_S: i64 = 5;

/// Pseudo-random, out-of-order event times (seconds) and keys; repeatable.
fn input() -> Vec<(i64, i64, i64)> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..400)
        .map(|i| {
            let base = i as i64 / 4; // time moves forward about 1s per 4 rows
            let jitter = (next() % 9) as i64 - 6; // up to 6s out of order: some rows are late
            let k = (next() % 4) as i64;
            ((base + jitter).max(0), k, i as i64)
        })
        .collect()
}

/// The record-at-a-time answer: closed windows (start, key) → (count, sum of v), in close order.
fn oracle(rows: &[(i64, i64, i64)]) -> Vec<String> {
    let mut max: Option<i64> = None;
    let mut open: BTreeMap<(i64, i64), (i64, i64)> = BTreeMap::new();
    for &(t, k, v) in rows {
        let wm = max.map(|m| m - DELAY_S);
        let start = t.div_euclid(SIZE_S) * SIZE_S;
        if wm.is_none_or(|w| start + SIZE_S > w) {
            let e = open.entry((start, k)).or_default();
            e.0 += 1;
            e.1 += v;
        }
        max = Some(max.map_or(t, |m| m.max(t)));
    }
    let wm = max.unwrap_or(0) - DELAY_S;
    open.into_iter()
        .filter(|((s, _), _)| s + SIZE_S <= wm)
        .map(|((s, k), (c, sum))| format!("{s}|{k}|{c}|{sum}"))
        .collect()
}

/// The oracle of the three-stage query: each closed window's largest
/// per-key count.
fn oracle_of_maxima(rows: &[(i64, i64, i64)]) -> Vec<String> {
    let mut max: BTreeMap<i64, i64> = BTreeMap::new();
    for line in oracle(rows) {
        let f: Vec<i64> = line.split('|').map(|x| x.parse().unwrap()).collect();
        let m = max.entry(f[0]).or_default();
        *m = (*m).max(f[2]);
    }
    max.into_iter().map(|(s, m)| format!("{s}|{m}")).collect()
}

/// Runs `query` (its `LIMIT` is `{limit}`) at 1 ms and 1 s batch intervals
/// while the input arrives over time; each output must be in window order
/// and equal `expected` (sorted by its first two columns).
fn agree_at_1ms_and_1s(query: &str, expected: &[String]) {
    let server = TestServer::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_drizzle")),
        &["--workers", "2"],
    )
    .unwrap();
    let data = input();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let admin = server.client().await.unwrap();
        admin
            .batch_execute(&format!(
                "CREATE STREAM s (k BIGINT, v BIGINT, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '{DELAY_S}' SECOND)"
            ))
            .await
            .unwrap();
        let query = query.replace("{limit}", &expected.len().to_string());
        let mut runs = Vec::new();
        for interval in ["1ms", "1s"] {
            let client = server.client().await.unwrap();
            client.batch_execute(&format!("SET batch_interval = '{interval}'")).await.unwrap();
            let q = query.clone();
            runs.push(tokio::spawn(async move { client.simple_query(&q).await.map(|m| rows(&m)) }));
        }
        // Rows arrive over time, in 40 statements, while both queries run.
        for chunk in data.chunks(10) {
            let values: Vec<String> = chunk
                .iter()
                .map(|(t, k, v)| format!("({k}, {v}, TIMESTAMP '1970-01-01 00:00:00' + INTERVAL '{t} seconds')"))
                .collect();
            admin.batch_execute(&format!("INSERT INTO s VALUES {}", values.join(", "))).await.unwrap();
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        let mut outputs = Vec::new();
        for run in runs {
            let out = tokio::time::timeout(Duration::from_secs(60), run)
                .await
                .expect("query finishes")
                .unwrap()
                .expect("query succeeds");
            outputs.push(out);
        }
        for out in &outputs {
            // Windows are emitted in window order...
            let starts: Vec<i64> = out.iter().map(|r| r.split('|').next().unwrap().parse().unwrap()).collect();
            assert!(starts.windows(2).all(|w| w[0] <= w[1]), "windows out of order: {starts:?}");
            // ...with exactly the oracle's contents.
            let mut sorted = out.clone();
            sorted.sort_by_key(|r| {
                let f: Vec<i64> = r.split('|').map(|x| x.parse().unwrap()).collect();
                (f[0], f[1])
            });
            assert_eq!(sorted, expected);
        }
        let norm = |o: &Vec<String>| {
            let mut o = o.clone();
            o.sort();
            o
        };
        assert_eq!(norm(&outputs[0]), norm(&outputs[1]), "1ms and 1s batches differ");
    });
}

#[test]
fn one_millisecond_and_one_second_batches_agree_with_the_oracle() {
    let expected = oracle(&input());
    assert!(expected.len() > 50, "the input closes many windows");
    agree_at_1ms_and_1s(
        &format!(
            "SELECT CAST(extract(epoch FROM window_start) AS BIGINT) AS ws, k, count(*) AS c, sum(v) AS total \
             FROM TUMBLE(s, ts, INTERVAL '{SIZE_S}' SECOND) GROUP BY window_start, k LIMIT {{limit}}"
        ),
        &expected,
    );
}

/// A three-stage plan (counts per window and key, then each window's
/// largest): windows close at the same input row as record at a time, at
/// any batch interval.
#[test]
fn a_three_stage_plan_agrees_with_the_oracle_at_1ms_and_1s_batches() {
    let expected = oracle_of_maxima(&input());
    assert!(expected.len() > 15, "the input closes many windows");
    agree_at_1ms_and_1s(
        &format!(
            "SELECT CAST(extract(epoch FROM ws) AS BIGINT) AS start, max(c) AS busiest FROM ( \
               SELECT window_start AS ws, k, count(*) AS c \
               FROM TUMBLE(s, ts, INTERVAL '{SIZE_S}' SECOND) GROUP BY window_start, k) AS counts \
             GROUP BY ws LIMIT {{limit}}"
        ),
        &expected,
    );
}
