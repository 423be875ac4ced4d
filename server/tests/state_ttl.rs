//! `SET state_ttl` through the server: a view made with a TTL forgets a
//! group left idle longer than the TTL (a later row starts it over), and a
//! view made without one keeps it.

use std::time::{Duration, Instant};

use drizzle_sql_tests::{rows, TestServer};

async fn wait_for(client: &tokio_postgres::Client, sql: &str, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = rows(&client.simple_query(sql).await.unwrap());
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql}: {got:?}, waiting for {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn a_view_with_a_state_ttl_forgets_idle_groups() {
    let server =
        TestServer::start(std::path::Path::new(env!("CARGO_BIN_EXE_drizzle")), &[]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = server.client().await.unwrap();
        c.batch_execute(
            "SET batch_interval = '20ms';
             CREATE STREAM s (k BIGINT);
             CREATE MATERIALIZED VIEW kept AS SELECT k, count(*) AS n FROM s GROUP BY k;
             SET state_ttl = '200ms';
             CREATE MATERIALIZED VIEW forgetting AS SELECT k, count(*) AS n FROM s GROUP BY k;
             INSERT INTO s VALUES (1), (1);",
        )
        .await
        .unwrap();
        wait_for(&c, "SELECT * FROM kept", &["1|2"]).await;
        wait_for(&c, "SELECT * FROM forgetting", &["1|2"]).await;
        // The TTL is counted in micro-batches of 20 ms: after 1 s (50
        // batches, five times the TTL) the idle group is gone.
        tokio::time::sleep(Duration::from_secs(1)).await;
        c.batch_execute("INSERT INTO s VALUES (1)").await.unwrap();
        wait_for(&c, "SELECT * FROM kept", &["1|3"]).await;
        wait_for(&c, "SELECT * FROM forgetting", &["1|1"]).await;
    });
}
