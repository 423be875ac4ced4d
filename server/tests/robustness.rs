//! One bad client never takes the server or other sessions down.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use drizzle_sql_tests::TestServer;

#[test]
fn garbage_on_the_port_closes_only_that_connection() {
    let server = TestServer::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_drizzle")),
        &["--workers", "1"],
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bystander = rt.block_on(server.client()).unwrap();
    rt.block_on(bystander.batch_execute("CREATE STREAM s (a INT); INSERT INTO s VALUES (1)"))
        .unwrap();

    let send = |bytes: &[u8]| {
        let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(bytes);
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        buf
    };
    // Random bytes (a fixed pseudo-random sequence, so the test is repeatable).
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for round in 0..50 {
        let len = 1 + (round * 37) % 700;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        send(&bytes);
    }
    // A valid startup followed by a message claiming to be 2 GiB long.
    let mut startup = Vec::new();
    let body = b"\x00\x03\x00\x00user\x00x\x00\x00";
    startup.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    startup.extend_from_slice(body);
    let mut oversized = startup.clone();
    oversized.extend_from_slice(b"Q\x7f\xff\xff\xff");
    let reply = send(&oversized);
    assert!(
        String::from_utf8_lossy(&reply).contains("08P01"),
        "oversized message refused with 08P01"
    );
    // An unknown message type after startup.
    let mut unknown = startup.clone();
    unknown.extend_from_slice(b"!\x00\x00\x00\x04");
    send(&unknown);
    // A query message whose length lies about its body.
    let mut lying = startup;
    lying.extend_from_slice(b"Q\x00\x00\x00\x08SELEC");
    send(&lying);

    // The server and the other session are fine.
    let rows = rt
        .block_on(bystander.simple_query("SELECT a FROM s LIMIT 1"))
        .unwrap();
    assert!(rows
        .iter()
        .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("1"))));
    let fresh = rt.block_on(server.client()).unwrap();
    assert!(rt.block_on(fresh.simple_query("SHOW STREAMS")).is_ok());
}

#[test]
fn a_disconnected_client_stops_its_query() {
    let server = TestServer::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_drizzle")),
        &["--workers", "1"],
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let admin = server.client().await.unwrap();
        admin
            .batch_execute("CREATE STREAM d (a INT)")
            .await
            .unwrap();
        let (client, conn) = tokio_postgres::connect(&server.conn_str(), tokio_postgres::NoTls)
            .await
            .unwrap();
        let conn_task = tokio::spawn(conn);
        let query = tokio::spawn(async move { client.simple_query("SELECT a FROM d").await });
        drizzle_sql_tests::eventually(Duration::from_secs(20), || async {
            Ok((running(&admin).await? == 1).then_some(()))
        })
        .await
        .expect("query runs");
        // Drop the connection under the running query.
        query.abort();
        conn_task.abort();
        drizzle_sql_tests::eventually(Duration::from_secs(20), || async {
            Ok((running(&admin).await? == 0).then_some(()))
        })
        .await
        .expect("the query ends when its client goes away");
    });
}

async fn running(admin: &tokio_postgres::Client) -> Result<usize, tokio_postgres::Error> {
    let rows = admin.simple_query("SHOW QUERIES").await?;
    Ok(rows
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count())
}
