//! Nexmark on Drizzle, against an oracle.
//!
//! The three streams come from the `nexmark` connector, bounded to a fixed
//! slice of the event sequence (its events lie in the past, so every one of
//! them exists at once; the bound's end moves the watermark past every
//! window). The same events, copied out of the streams with `COPY`, are
//! loaded into tables of the same names on a second, plain server: the
//! oracle runs each query's SQL verbatim as a batch query over them
//! (`TUMBLE`/`HOP` over a table give the same windows), except q11, whose
//! `SESSION` windows the oracle computes with window functions, and q12,
//! whose processing-time windows no batch run has: its counts per bidder
//! over all windows must be the oracle's counts per bidder.
//!
//! Each query in `benches/nexmark/` that Drizzle runs is checked:
//! * as a materialized view, whose rows must become exactly the oracle's;
//! * as a continuous `SELECT` (append-only results): its first rows, as
//!   many as the oracle has, must be exactly the oracle's; (q6, whose
//!   results change) its `insert`s less its `delete`s must become exactly
//!   the oracle's rows;
//!
//! on the embedded server and on one server with three worker processes.

use std::path::Path;
use std::time::Duration;

use drizzle_sql_tests::{rows, TestCluster, TestServer};
use futures::{SinkExt, StreamExt};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_drizzle"))
}

/// 300 s of event time at 100 events/s: 600 people, 1,800 auctions,
/// 27,600 bids, thirty 10-second windows.
const EVENTS: u64 = 30_000;
const OPTIONS: &str = ", events_per_second = '100', nexmark.event.num = '30000', \
                       base_time = '2024-01-01 00:00:00', partitions = '3'";

/// The queries checked row for row, and whether their results are
/// append-only (a continuous SELECT shows exactly the oracle's rows).
/// q12 (processing time) is checked by [`check_q12`]; q6's continuous
/// query by [`check_changes`].
const QUERIES: &[(&str, bool)] = &[
    ("q0", true),
    ("q1", true),
    ("q2", true),
    ("q3", true),
    ("q4", false),
    ("q5", true),
    ("q6", false),
    ("q7", true),
    ("q8", true),
    ("q9", false),
    ("q10", true),
    ("q11", true),
    ("q13", true),
    ("q14", true),
    ("q15", false),
    ("q16", false),
    ("q17", false),
    ("q18", false),
    ("q19", false),
    ("q20", true),
    ("q21", true),
    ("q22", true),
];

fn nexmark_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../benches/nexmark")
        .join(format!("{name}.sql"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The query text without its comment lines.
fn query(name: &str) -> String {
    nexmark_file(name)
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The oracle's SQL for a query: the same SQL, except for q11, whose
/// `SESSION` windows exist only over a stream (they are per key of the
/// aggregation). Its oracle numbers each bidder's sessions with window
/// functions: a bid starts a session unless the bidder's previous bid is
/// less than 10 seconds before it.
fn oracle_sql(name: &str, sql: &str) -> String {
    match name {
        "q11" => "SELECT bidder, count(*) AS bid_count, min(date_time) AS starttime,
                     max(date_time) + INTERVAL '10' SECOND AS endtime
                  FROM (
                    SELECT bidder, date_time, sum(starts) OVER (PARTITION BY bidder ORDER BY date_time
                        ROWS UNBOUNDED PRECEDING) AS session
                    FROM (
                      SELECT bidder, date_time,
                        CASE WHEN lag(date_time) OVER (PARTITION BY bidder ORDER BY date_time)
                                  + INTERVAL '10' SECOND > date_time
                             THEN 0 ELSE 1 END AS starts
                      FROM bid
                    ) marked
                  ) numbered
                  GROUP BY bidder, session"
            .to_string(),
        _ => sql.to_string(),
    }
}

/// The streams' DDL with the slice's options (`bid` with a
/// processing-time column `p_time` when `proctime`).
fn stream_ddl(proctime: bool) -> String {
    nexmark_file("ddl").replace("{options}", OPTIONS).replace(
        "{proctime}",
        if proctime {
            " p_time TIMESTAMPTZ AS PROCTIME(),"
        } else {
            ""
        },
    )
}

/// The oracle's tables: the streams' columns, no watermark, no connector.
const TABLE_DDL: &str = "
CREATE TABLE person (id BIGINT, name VARCHAR, email_address VARCHAR, credit_card VARCHAR,
    city VARCHAR, state VARCHAR, date_time TIMESTAMP, extra VARCHAR);
CREATE TABLE auction (id BIGINT, item_name VARCHAR, description VARCHAR, initial_bid BIGINT,
    reserve BIGINT, date_time TIMESTAMP, expires TIMESTAMP, seller BIGINT, category BIGINT,
    extra VARCHAR);
CREATE TABLE bid (auction BIGINT, bidder BIGINT, price BIGINT, channel VARCHAR, url VARCHAR,
    date_time TIMESTAMP, extra VARCHAR);
";

/// q13's side input: keys 0 to 9,999, each with its number as text (as
/// Nexmark's generator makes it), on a server.
async fn side_input(client: &tokio_postgres::Client) -> anyhow::Result<()> {
    client
        .batch_execute("CREATE TABLE side_input (key BIGINT, value VARCHAR)")
        .await?;
    let sink = client.copy_in("COPY side_input FROM STDIN").await?;
    futures::pin_mut!(sink);
    let text: String = (0..10_000).map(|k| format!("{k}\t{k}\n")).collect();
    sink.send(bytes::Bytes::from(text)).await?;
    sink.finish().await?;
    Ok(())
}

/// Copies every event of the bounded streams into the oracle's tables.
async fn load_oracle(
    streams: &tokio_postgres::Client,
    oracle: &tokio_postgres::Client,
) -> anyhow::Result<()> {
    oracle.batch_execute(TABLE_DDL).await?;
    side_input(oracle).await?;
    side_input(streams).await?;
    oracle.batch_execute(&nexmark_file("functions")).await?;
    streams.batch_execute(&nexmark_file("functions")).await?;
    let cycles = EVENTS / 50;
    for (table, count) in [
        ("person", cycles),
        ("auction", cycles * 3),
        ("bid", cycles * 46),
    ] {
        let out = streams
            .copy_out(format!("COPY (SELECT * FROM {table} LIMIT {count}) TO STDOUT").as_str())
            .await?;
        futures::pin_mut!(out);
        let sink = oracle
            .copy_in(format!("COPY {table} FROM STDIN").as_str())
            .await?;
        futures::pin_mut!(sink);
        while let Some(chunk) = out.next().await {
            sink.send(chunk?).await?;
        }
        let loaded = sink.finish().await?;
        anyhow::ensure!(
            loaded == count,
            "{table}: {loaded} rows copied, {count} expected"
        );
    }
    Ok(())
}

async fn sorted(client: &tokio_postgres::Client, sql: &str) -> anyhow::Result<Vec<String>> {
    let mut r = rows(&client.simple_query(sql).await?);
    r.sort();
    Ok(r)
}

/// Where two sorted row lists first differ, for a failure message.
fn first_difference(got: &[String], want: &[String]) -> String {
    let i = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    format!(
        "{} rows, oracle {}; first difference at {i}: {:?} vs {:?}",
        got.len(),
        want.len(),
        got.get(i),
        want.get(i)
    )
}

/// Runs every query against `streams` and compares with `oracle`.
async fn check_all(
    streams: tokio_postgres::Client,
    oracle: tokio_postgres::Client,
) -> anyhow::Result<()> {
    streams.batch_execute(&stream_ddl(false)).await?;
    load_oracle(&streams, &oracle).await?;
    streams.batch_execute("SET batch_interval = '50ms'").await?;
    for (name, append) in QUERIES {
        let started = std::time::Instant::now();
        let sql = query(name);
        let want = sorted(&oracle, &oracle_sql(name, &sql)).await?;
        anyhow::ensure!(!want.is_empty(), "{name}: the oracle has no rows");
        streams
            .batch_execute(&format!("CREATE MATERIALIZED VIEW {name} AS {sql}"))
            .await
            .map_err(|e| anyhow::anyhow!("{name}: {e:?}"))?;
        // Polled until equal, within a bounded time.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let got = sorted(&streams, &format!("SELECT * FROM {name}")).await?;
            if got == want {
                break;
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!(
                    "{name}: the materialized view never matched the oracle: {}",
                    first_difference(&got, &want)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if *append {
            let got = sorted(&streams, &format!("{sql} LIMIT {}", want.len())).await?;
            anyhow::ensure!(
                got == want,
                "{name}: the continuous query differs from the oracle: {}",
                first_difference(&got, &want)
            );
        }
        if *name == "q6" {
            check_changes(&streams, name, &sql, &want).await?;
        }
        streams
            .batch_execute(&format!("DROP MATERIALIZED VIEW {name}"))
            .await?;
        eprintln!("{name}: matches the oracle ({:?})", started.elapsed());
    }
    check_q12(&streams, &oracle).await
}

/// A continuous query whose results change (an `OVER` over a top-N): its
/// rows end with `op`, `insert` or `delete`; applied in order to an empty
/// multiset they must become exactly the oracle's rows, never deleting a
/// row not there.
async fn check_changes(
    streams: &tokio_postgres::Client,
    name: &str,
    sql: &str,
    want: &[String],
) -> anyhow::Result<()> {
    let rows = streams
        .simple_query_raw(sql)
        .await
        .map_err(|e| anyhow::anyhow!("{name}: {e:?}"))?;
    futures::pin_mut!(rows);
    let mut held: std::collections::BTreeMap<String, i64> = Default::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got: Vec<String> = held
            .iter()
            .flat_map(|(r, c)| std::iter::repeat_n(r.clone(), *c as usize))
            .collect();
        if got == want {
            break;
        }
        let message = tokio::time::timeout_at(deadline, rows.next())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "{name}: the continuous query's changes never added up to the oracle's rows: {}",
                    first_difference(&got, want)
                )
            })?
            .ok_or_else(|| anyhow::anyhow!("{name}: the continuous query ended"))??;
        let tokio_postgres::SimpleQueryMessage::Row(row) = message else {
            continue;
        };
        let width = row.len();
        anyhow::ensure!(width >= 2, "{name}: a change without an op column");
        let values: Vec<&str> = (0..width - 1)
            .map(|i| row.get(i).unwrap_or("NULL"))
            .collect();
        let key = values.join("|");
        let count = held.entry(key.clone()).or_default();
        match row.get(width - 1) {
            Some("insert") => *count += 1,
            Some("delete") => *count -= 1,
            other => anyhow::bail!("{name}: op {other:?}"),
        }
        anyhow::ensure!(*count >= 0, "{name}: a delete of a row not shown: {key}");
        if *count == 0 {
            held.remove(&key);
        }
    }
    // The query runs until cancelled; the connection is free once it ends.
    streams
        .cancel_token()
        .cancel_query(tokio_postgres::NoTls)
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, rows.next()).await {
            Ok(Some(Ok(_))) => {}
            Ok(None | Some(Err(_))) => return Ok(()),
            Err(_) => anyhow::bail!("{name}: the continuous query did not end when cancelled"),
        }
    }
}

/// q12 counts bids per bidder per 10 seconds of processing time, which no
/// batch run can reproduce. What it must still be: windows 10 s long,
/// aligned, within the wall-clock time the query ran (not 2024's event
/// time), and per bidder the counts over all windows add up to the
/// oracle's count of the bidder's bids, every bid counted once. Checked
/// for the materialized view and for the continuous query.
async fn check_q12(
    streams: &tokio_postgres::Client,
    oracle: &tokio_postgres::Client,
) -> anyhow::Result<()> {
    streams
        .batch_execute(&format!(
            "DROP STREAM bid; {}",
            stream_ddl(true)
                .split_inclusive(';')
                .find(|s| s.contains("CREATE STREAM bid"))
                .unwrap_or_default()
        ))
        .await?;
    let sql = query("q12");
    let want = sorted(oracle, "SELECT bidder, count(*) FROM bid GROUP BY bidder").await?;
    anyhow::ensure!(!want.is_empty(), "q12: the oracle has no rows");
    let started = std::time::SystemTime::now();
    streams
        .batch_execute(&format!("CREATE MATERIALIZED VIEW q12 AS {sql}"))
        .await
        .map_err(|e| anyhow::anyhow!("q12: {e:?}"))?;
    let totals = "SELECT bidder, sum(bid_count) FROM q12 GROUP BY bidder";
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = sorted(streams, totals).await?;
        if got == want {
            break;
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "q12: the view's counts per bidder never matched the oracle's: {}",
                first_difference(&got, &want)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let since = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    };
    let (from_s, to_s) = (
        since(started) - 10,
        since(std::time::SystemTime::now()) + 10,
    );
    let bad = sorted(
        streams,
        &format!(
            "SELECT bidder, starttime, endtime FROM q12 \
             WHERE endtime - starttime <> INTERVAL '10' SECOND \
                OR extract(epoch FROM starttime)::BIGINT % 10 <> 0 \
                OR extract(epoch FROM starttime)::BIGINT < {from_s} \
                OR extract(epoch FROM endtime)::BIGINT > {to_s}"
        ),
    )
    .await?;
    anyhow::ensure!(
        bad.is_empty(),
        "q12: windows that are not 10 s of processing time between {from_s} and {to_s}: {bad:?}"
    );
    streams.batch_execute("DROP MATERIALIZED VIEW q12").await?;
    // The continuous query: rows until every bid is counted.
    let total: i64 = want
        .iter()
        .filter_map(|r| r.rsplit('|').next()?.parse::<i64>().ok())
        .sum();
    anyhow::ensure!(total > 0, "q12: no bids in {want:?}");
    let rows = streams
        .query_raw(sql.as_str(), std::iter::empty::<i64>())
        .await?;
    futures::pin_mut!(rows);
    let mut per_bidder: std::collections::BTreeMap<i64, i64> = Default::default();
    let mut counted = 0;
    while counted < total {
        let row = tokio::time::timeout_at(deadline.into(), rows.next())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "q12: the continuous query counted {counted} of {total} bids in time"
                )
            })?
            .ok_or_else(|| {
                anyhow::anyhow!("q12: the continuous query ended after {counted} bids")
            })??;
        let (bidder, n): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        *per_bidder.entry(bidder).or_default() += n;
        counted += n;
    }
    let mut got: Vec<String> = per_bidder.iter().map(|(b, n)| format!("{b}|{n}")).collect();
    got.sort();
    anyhow::ensure!(
        got == want,
        "q12: the continuous query's counts per bidder differ from the oracle's: {}",
        first_difference(&got, &want)
    );
    Ok(())
}

#[test]
fn nexmark_queries_match_the_oracle_on_the_embedded_server() {
    let server = TestServer::start(bin(), &[]).unwrap();
    let oracle = TestServer::start(bin(), &[]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let result =
        rt.block_on(async { check_all(server.client().await?, oracle.client().await?).await });
    if let Err(e) = result {
        panic!("{e:#}\n--- server log ---\n{}", server.log());
    }
}

#[test]
fn nexmark_queries_match_the_oracle_on_a_server_and_three_workers() {
    let cluster = TestCluster::start(bin(), 3, &[]).unwrap();
    let oracle = TestServer::start(bin(), &[]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let result = rt.block_on(async {
        check_all(cluster.server.client().await?, oracle.client().await?).await
    });
    if let Err(e) = result {
        panic!("{e:#}\n{}", cluster.logs());
    }
}
