//! The extended query protocol with tokio-postgres: parameters, binary
//! results, prepared statements, suspended portals, and cursors that wait for
//! new rows.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drizzle_sql_tests::TestServer;
use tokio_postgres::SimpleQueryMessage;

#[test]
fn parameters_binary_results_portals_and_cursors() {
    let server = TestServer::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_drizzle")),
        &["--workers", "2"],
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = server.client().await.unwrap();
        client
            .batch_execute(
                "CREATE TABLE t (a SMALLINT, b INT, c BIGINT, d REAL, e DOUBLE PRECISION, f TEXT, g BOOLEAN, h TIMESTAMP); \
                 INSERT INTO t VALUES (1, 2, 3, 1.5, 2.25, 'x', true, '2024-01-01 00:00:10'); \
                 CREATE STREAM s (k BIGINT, v TEXT);",
            )
            .await
            .unwrap();

        // Binary results of every basic type.
        let row = client.query_one("SELECT a, b, c, d, e, f, g, h FROM t", &[]).await.unwrap();
        assert_eq!(row.get::<_, i16>(0), 1);
        assert_eq!(row.get::<_, i32>(1), 2);
        assert_eq!(row.get::<_, i64>(2), 3);
        assert_eq!(row.get::<_, f32>(3), 1.5);
        assert_eq!(row.get::<_, f64>(4), 2.25);
        assert_eq!(row.get::<_, &str>(5), "x");
        assert!(row.get::<_, bool>(6));
        let ts: SystemTime = row.get(7);
        assert_eq!(ts.duration_since(UNIX_EPOCH).unwrap(), Duration::from_secs(1_704_067_210));

        // Parameters, binary encoded by the driver.
        let row = client.query_one("SELECT $1::BIGINT + c, $2 || f FROM t", &[&39i64, &"y"]).await.unwrap();
        assert_eq!(row.get::<_, i64>(0), 42);
        assert_eq!(row.get::<_, &str>(1), "yx");
        let n = client.execute("INSERT INTO s VALUES ($1, $2), ($3, $4)", &[&1i64, &"one", &2i64, &"two"]).await.unwrap();
        assert_eq!(n, 2, "INSERT 0 2");

        // A prepared continuous query with a parameter, run twice.
        let stmt = client.prepare("SELECT k, upper(v) AS v FROM s WHERE k >= $1 LIMIT 2").await.unwrap();
        assert_eq!(stmt.columns()[1].name(), "v");
        for _ in 0..2 {
            let rows = client.query(&stmt, &[&1i64]).await.unwrap();
            let got: Vec<(i64, String)> = rows.iter().map(|r| (r.get(0), r.get::<_, String>(1))).collect();
            assert_eq!(got, vec![(1, "ONE".into()), (2, "TWO".into())]);
        }

        // Errors in the extended protocol carry their SQLSTATE.
        let err = client.query("SELECT nope FROM s", &[]).await.unwrap_err();
        assert_eq!(err.code().unwrap().code(), "42703");
        let err = client.query("SELECT k FROM s ORDER BY k", &[]).await.unwrap_err();
        assert_eq!(err.code().unwrap().code(), "0A000");

        // A portal with max_rows over a continuous query suspends and resumes.
        let tx = client.transaction().await.unwrap();
        let portal = tx.bind("SELECT k FROM s", &[]).await.unwrap();
        let first = tx.query_portal(&portal, 1).await.unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].get::<_, i64>(0), 1);
        let second = tx.query_portal(&portal, 1).await.unwrap();
        assert_eq!(second[0].get::<_, i64>(0), 2);
        tx.commit().await.unwrap();

        // Cursors: FETCH waits for rows that do not exist yet.
        client.batch_execute("BEGIN; DECLARE c CURSOR FOR SELECT k FROM s;").await.unwrap();
        assert_eq!(fetch(&client).await, vec!["1", "2"]);
        let writer = server.client().await.unwrap();
        let insert = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            writer.batch_execute("INSERT INTO s VALUES (3, 'three'), (4, 'four')").await.unwrap();
        });
        assert_eq!(fetch(&client).await, vec!["3", "4"], "FETCH waited for the new rows");
        insert.await.unwrap();
        client.batch_execute("CLOSE c; COMMIT;").await.unwrap();
        let err = client.batch_execute("DECLARE d CURSOR FOR SELECT 1").await.unwrap_err();
        assert_eq!(err.code().unwrap().code(), "25P01");

        // stream_start = 'latest' skips the rows already in the stream.
        let late = server.client().await.unwrap();
        late.batch_execute("SET stream_start = 'latest'").await.unwrap();
        let q = tokio::spawn(async move { late.query_one("SELECT k FROM s LIMIT 1", &[]).await.map(|r| r.get::<_, i64>(0)) });
        // Keep inserting until the query (which starts at the end) sees a new row.
        let writer = server.client().await.unwrap();
        let mut k = 100i64;
        while !q.is_finished() && k < 400 {
            writer.execute("INSERT INTO s VALUES ($1, 'new')", &[&k]).await.unwrap();
            k += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let got = q.await.unwrap().unwrap();
        assert!(got >= 100, "latest start must not see old rows, got {got}");

        // Upserts: after each micro-batch, only changed groups, with current values.
        client.batch_execute("CREATE STREAM u (g TEXT, x BIGINT); SET batch_interval = '10ms'").await.unwrap();
        let reader = server.client().await.unwrap();
        reader.batch_execute("SET batch_interval = '10ms'").await.unwrap();
        let stream = reader.copy_out("COPY (SELECT g, sum(x) FROM u GROUP BY g) TO STDOUT").await.unwrap();
        futures::pin_mut!(stream);
        use futures::StreamExt;
        for (stmt, line) in [
            ("INSERT INTO u VALUES ('a', 1), ('b', 10)", "a\t1\nb\t10\n"),
            ("INSERT INTO u VALUES ('a', 5)", "a\t6\n"),
            ("INSERT INTO u VALUES ('b', 1), ('c', 2)", "b\t11\nc\t2\n"),
        ] {
            client.batch_execute(stmt).await.unwrap();
            // One CopyData message per row, as Postgres sends them.
            let mut got = String::new();
            for _ in 0..line.lines().count() {
                let chunk = tokio::time::timeout(Duration::from_secs(20), stream.next()).await.unwrap().unwrap().unwrap();
                let text = String::from_utf8_lossy(&chunk).to_string();
                assert_eq!(text.matches('\n').count(), 1, "one row per message: {text:?}");
                got.push_str(&text);
            }
            assert_eq!(got, line);
        }
    });
}

async fn fetch(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .simple_query("FETCH 2 FROM c")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect()
}

#[test]
fn cancel_query_and_late_rows_in_show_queries() {
    let server = TestServer::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_drizzle")),
        &["--workers", "2"],
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let admin = server.client().await.unwrap();
        admin
            .batch_execute(
                "CREATE STREAM w (ts TIMESTAMP, WATERMARK FOR ts AS ts); \
                 CREATE MATERIALIZED VIEW per_w AS SELECT window_start, count(*) AS n FROM TUMBLE(w, ts, INTERVAL '10' SECOND) GROUP BY window_start; \
                 INSERT INTO w VALUES ('2024-01-01 00:00:01'), ('2024-01-01 00:00:15'), ('2024-01-01 00:00:02'), ('2024-01-01 00:00:31');",
            )
            .await
            .unwrap();
        // The third row is behind the watermark (15s > 10s window end): dropped and counted.
        drizzle_sql_tests::eventually(Duration::from_secs(20), || async {
            Ok(show_queries(&admin).await.iter().any(|(_, q, late)| q.contains("per_w") && late == "1").then_some(()))
        })
        .await
        .expect("late_rows = 1 in SHOW QUERIES");

        // CANCEL QUERY from another session ends a running query with 57014.
        let victim = server.client().await.unwrap();
        let running = tokio::spawn(async move { victim.simple_query("SELECT ts FROM w WHERE ts > '2030-01-01'").await });
        let id = drizzle_sql_tests::eventually(Duration::from_secs(20), || async {
            Ok(show_queries(&admin).await.into_iter().find(|(_, q, _)| q.contains("2030")).map(|(id, _, _)| id))
        })
        .await
        .unwrap();
        admin.batch_execute(&format!("CANCEL QUERY {id}")).await.unwrap();
        let err = tokio::time::timeout(Duration::from_secs(20), running).await.unwrap().unwrap().unwrap_err();
        assert_eq!(err.code().unwrap().code(), "57014");
    });
}

/// (id, query, late_rows) of every running query.
async fn show_queries(client: &tokio_postgres::Client) -> Vec<(String, String, String)> {
    client
        .simple_query("SHOW QUERIES")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some((
                r.get(0).unwrap_or_default().to_string(),
                r.get(1).unwrap_or_default().to_string(),
                r.get(5).unwrap_or_default().to_string(),
            )),
            _ => None,
        })
        .collect()
}
