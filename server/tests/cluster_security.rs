//! The cluster ports refuse anyone who cannot prove membership: real gRPC
//! and Arrow Flight clients without the cluster secret, or with another one,
//! try the attacks that used to work (register as a worker, read streams and
//! tables from the coordinator's data endpoint, fetch shuffle blocks, cancel
//! a query on a worker) while a
//! continuous query runs; the query's results stay exact.

use std::path::Path;
use std::time::Duration;

use drizzle_exec::cluster::{self, pb, ClusterSecret};
use drizzle_sql_tests::{rows, TestCluster, TestServer, TEST_CLUSTER_SECRET};
use tonic::Code;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_drizzle"))
}

/// Clients that lack the secret: none at all, and a wrong one.
fn outsiders() -> Vec<Option<ClusterSecret>> {
    vec![
        None,
        Some(ClusterSecret::new("not the secret of this cluster").unwrap()),
    ]
}

async fn try_register(address: &str, secret: Option<&ClusterSecret>) -> tonic::Status {
    let request = pb::RegisterRequest {
        protocol_version: cluster::PROTOCOL_VERSION,
        address: "127.0.0.1:9".into(),
        epoch: 7,
        task_slots: 1,
    };
    match secret {
        Some(s) => cluster::coordinator_client(address, s)
            .unwrap()
            .register(request)
            .await
            .unwrap_err(),
        None => pb::coordinator_client::CoordinatorClient::new(cluster::channel(address).unwrap())
            .register(request)
            .await
            .unwrap_err(),
    }
}

/// A stream with two rows and a table: what the attacks try to reach.
const SEED: &str = "CREATE STREAM s (k BIGINT, v BIGINT);
     CREATE TABLE t (k BIGINT, name TEXT);
     INSERT INTO t VALUES (1, 'one');
     INSERT INTO s VALUES (1, 10), (2, 20);";

#[test]
fn outsiders_cannot_join_read_fetch_or_cancel() {
    let cluster = TestCluster::start(bin(), 2, &[]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = cluster.server.client().await.unwrap();
        c.batch_execute(SEED).await.unwrap();
        // A continuous query runs on the workers while the attacks go on.
        let reader = cluster.server.client().await.unwrap();
        let query = tokio::spawn(async move {
            reader
                .simple_query("SELECT k, v FROM s WHERE v > 0 LIMIT 4")
                .await
                .map(|m| rows(&m))
        });
        let coordinator = cluster.server.cluster_address.clone();
        for outsider in outsiders() {
            let o = outsider.as_ref();
            // Register as a worker (to receive launches and forge results).
            let status = try_register(&coordinator, o).await;
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
            // Read a stream's log and a table through the coordinator's
            // data endpoint.
            let source = data_get(&coordinator, o, source_ticket(0)).await;
            let table = data_get(&coordinator, o, table_ticket(0)).await;
            assert_eq!(source.code(), Code::Unauthenticated, "{source:?}");
            assert_eq!(table.code(), Code::Unauthenticated, "{table:?}");
            for worker in &cluster.workers {
                // Cancel every query on a worker.
                let channel = cluster::channel(&worker.address).unwrap();
                let cancel = pb::CancelQueryRequest {
                    query: 0,
                    attempt: 0,
                };
                let status = match o {
                    Some(s) => cluster::worker_client(&worker.address, s)
                        .unwrap()
                        .cancel_query(cancel)
                        .await
                        .unwrap_err(),
                    None => pb::worker_client::WorkerClient::new(channel.clone())
                        .cancel_query(cancel)
                        .await
                        .unwrap_err(),
                };
                assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
                // Fetch shuffle blocks over Flight with a guessed ticket.
                let mut flight = match o {
                    Some(s) => cluster::flight_client(channel, s),
                    None => arrow_flight::FlightClient::new(channel),
                };
                let fetched = flight
                    .do_get(arrow_flight::Ticket::new(b"q1/b0/s0/m0/r0".to_vec()))
                    .await;
                let Err(err) = fetched else {
                    panic!("an outsider fetched from Flight");
                };
                assert!(
                    err.to_string().contains("not a member of this cluster"),
                    "{err}"
                );
            }
        }
        // The query was not disturbed: its rows arrive, exactly.
        c.batch_execute("INSERT INTO s VALUES (3, 30), (4, 40)")
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(60), query)
            .await
            .expect("the query ended")
            .unwrap()
            .unwrap();
        let mut got = got;
        got.sort();
        assert_eq!(got, vec!["1|10", "2|20", "3|30", "4|40"]);
        // No outsider was ever registered.
        let workers = drizzle_sql_tests::show(&c, "SHOW WORKERS").await.unwrap();
        assert_eq!(workers.len(), 2, "{workers:?}");
    });
}

#[test]
fn an_embedded_server_refuses_its_loopback_cluster_port_to_outsiders() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, "a secret only this server knows\n").unwrap();
    let arg = secret_file.display().to_string();
    let server =
        TestServer::start(bin(), &["--workers", "1", "--cluster-secret-file", &arg]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // The test harness's secret is not this server's.
        let known = ClusterSecret::new(TEST_CLUSTER_SECRET).unwrap();
        for outsider in [None, Some(known)] {
            let status = try_register(&server.cluster_address, outsider.as_ref()).await;
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        }
        // Its own worker works.
        let c = server.client().await.unwrap();
        c.batch_execute("CREATE STREAM s (a INT); INSERT INTO s VALUES (5)")
            .await
            .unwrap();
        let got = rows(&c.simple_query("SELECT a FROM s LIMIT 1").await.unwrap());
        assert_eq!(got, vec!["5"]);
    });
}

#[test]
fn a_worker_without_the_secret_does_not_start() {
    let out = std::process::Command::new(bin())
        .args(["worker", "--coordinator", "127.0.0.1:9", "--data-dir"])
        .arg(tempfile::tempdir().unwrap().path())
        .env_remove("DRIZZLE_CLUSTER_SECRET")
        .env_remove("DRIZZLE_CLUSTER_SECRET_FILE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cluster secret"), "{err}");
}

fn source_ticket(query: u64) -> pb::data_ticket::Kind {
    pb::data_ticket::Kind::Source(pb::ReadSourceRequest {
        query,
        ..Default::default()
    })
}

fn table_ticket(query: u64) -> pb::data_ticket::Kind {
    pb::data_ticket::Kind::Table(pb::ReadTableRequest {
        query,
        join: 0,
        held_version: None,
    })
}

/// Calls the coordinator's data endpoint (Arrow Flight `do_get`) with a
/// ticket, as `who`: the refusal.
async fn data_get(
    address: &str,
    who: Option<&ClusterSecret>,
    kind: pb::data_ticket::Kind,
) -> tonic::Status {
    use arrow_flight::flight_service_client::FlightServiceClient;
    use prost::Message;
    let ticket = arrow_flight::Ticket::new(pb::DataTicket { kind: Some(kind) }.encode_to_vec());
    let channel = cluster::channel(address).unwrap();
    let result = match who {
        Some(s) => FlightServiceClient::with_interceptor(channel, s.clone())
            .do_get(ticket)
            .await
            .map(|_| ()),
        None => FlightServiceClient::new(channel)
            .do_get(ticket)
            .await
            .map(|_| ()),
    };
    result.expect_err("the coordinator's data endpoint served a stranger")
}

/// Puts forged rows for `query` on the coordinator's data endpoint (Arrow
/// Flight `do_put`), as `who`: the refusal.
async fn forged_put(address: &str, who: &ClusterSecret, query: u64) -> tonic::Status {
    use arrow_flight::flight_service_client::FlightServiceClient;
    use prost::Message;
    let put = pb::DataPut {
        kind: Some(pb::data_put::Kind::Output(pb::TaskOutput {
            query,
            chunks: vec![pb::OutputChunk {
                window_end: None,
                ipc: Vec::new(),
                rows: 1,
            }],
            ..Default::default()
        })),
    };
    let batch = arrow::record_batch::RecordBatch::try_from_iter([(
        "k",
        std::sync::Arc::new(arrow::array::Int64Array::from(vec![666])) as arrow::array::ArrayRef,
    )])
    .unwrap();
    let data = arrow_flight::encode::FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(arrow_flight::FlightDescriptor::new_cmd(
            put.encode_to_vec(),
        )))
        .build(futures::stream::iter([Ok(batch)]));
    let data: Vec<arrow_flight::FlightData> =
        futures::TryStreamExt::try_collect(data).await.unwrap();
    let channel = cluster::channel(address).unwrap();
    let mut client = FlightServiceClient::with_interceptor(channel, who.clone());
    let result = async {
        let mut acks = client
            .do_put(futures::stream::iter(data))
            .await?
            .into_inner();
        while acks.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    }
    .await;
    result.expect_err("the coordinator took forged rows")
}

/// Asserts a call was refused with PERMISSION_DENIED.
fn denied<T>(result: Result<tonic::Response<T>, tonic::Status>) {
    match result {
        Ok(_) => panic!("the call was accepted"),
        Err(status) => assert_eq!(status.code(), Code::PermissionDenied, "{status:?}"),
    }
}

/// A client that holds the cluster secret but whose registration is stale
/// (it registered, never heartbeated and was declared lost) counts for
/// nothing: its event stream (a forged Hello and forged rows for a running
/// query) is refused, it cannot read a stream, a table or a checkpoint, and
/// its heartbeats are answered "unknown". With the secret alone it cannot
/// cancel work on a worker (that takes the worker's own credential) nor
/// fetch shuffle blocks (that takes the query's token). The running query's
/// results stay exact.
#[test]
fn a_stale_registration_or_the_secret_alone_counts_for_nothing() {
    let cluster = TestCluster::start(bin(), 2, &["--worker-timeout", "3"]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = cluster.server.client().await.unwrap();
        c.batch_execute(SEED).await.unwrap();
        let coordinator = cluster.server.cluster_address.clone();
        let secret = ClusterSecret::new(TEST_CLUSTER_SECRET).unwrap();
        // Register with the secret at an address nobody serves.
        let registered = cluster::coordinator_client(&coordinator, &secret)
            .unwrap()
            .register(pb::RegisterRequest {
                protocol_version: cluster::PROTOCOL_VERSION,
                address: "127.0.0.1:9".into(),
                epoch: 7,
                task_slots: 1,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!registered.member_credential.is_empty());
        // No heartbeat: it is declared lost.
        drizzle_sql_tests::eventually(Duration::from_secs(60), || async {
            let workers = drizzle_sql_tests::show(&c, "SHOW WORKERS").await?;
            Ok((workers.len() == 2
                && workers
                    .iter()
                    .all(|w| !w.values().any(|v| v == "127.0.0.1:9")))
            .then_some(()))
        })
        .await
        .unwrap();
        // A continuous query runs on the real workers meanwhile.
        let reader = cluster.server.client().await.unwrap();
        let query = tokio::spawn(async move {
            reader
                .simple_query("SELECT k, v FROM s WHERE v > 0 LIMIT 4")
                .await
                .map(|m| rows(&m))
        });
        let running = drizzle_sql_tests::eventually(Duration::from_secs(30), || async {
            let q = drizzle_sql_tests::show(&c, "SHOW QUERIES").await?;
            Ok(q.into_iter()
                .find(|r| r["query"].contains("FROM s"))
                .and_then(|r| r["id"].parse::<u64>().ok()))
        })
        .await
        .unwrap();
        let stale = secret.with_credential(ClusterSecret::credential_slot(Some(
            &registered.member_credential,
        )));
        let mut as_stale = cluster::coordinator_client(&coordinator, &stale).unwrap();
        // Forged rows on an event stream under the stale registration.
        let forged = vec![
            pb::WorkerEvent {
                event: Some(pb::worker_event::Event::Hello(pb::Hello {
                    worker: registered.worker_id,
                    epoch: 7,
                })),
            },
            pb::WorkerEvent {
                event: Some(pb::worker_event::Event::Output(pb::TaskOutput {
                    query: running,
                    batch: 0,
                    partition: 0,
                    chunks: vec![pb::OutputChunk {
                        window_end: None,
                        ipc: b"forged".to_vec(),
                        rows: 0,
                    }],
                    ..Default::default()
                })),
            },
        ];
        denied(as_stale.events(futures::stream::iter(forged)).await);
        // Reads of a stream, a table and a checkpoint, and forged rows put
        // on the data endpoint.
        let state = pb::data_ticket::Kind::State(pb::LoadStateRequest {
            query: running,
            path: String::new(),
        });
        for ticket in [source_ticket(running), table_ticket(running), state] {
            let status = data_get(&coordinator, Some(&stale), ticket).await;
            assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        }
        let status = forged_put(&coordinator, &stale, running).await;
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        // Heartbeats of the stale registration are not known.
        let beat = as_stale
            .heartbeat(pb::HeartbeatRequest {
                protocol_version: cluster::PROTOCOL_VERSION,
                worker_id: registered.worker_id,
                epoch: 7,
                counters: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!beat.known);
        for worker in &cluster.workers {
            // Cancel with the secret, and with the stale credential: only
            // the worker's own credential (held by the coordinator) works.
            for who in [&secret, &stale] {
                denied(
                    cluster::worker_client(&worker.address, who)
                        .unwrap()
                        .cancel_query(pb::CancelQueryRequest {
                            query: running,
                            attempt: 0,
                        })
                        .await,
                );
            }
            // Fetch a block of the running query without its token.
            let channel = cluster::channel(&worker.address).unwrap();
            let mut flight = cluster::flight_client(channel, &secret);
            let id = drizzle_shuffle::BlockId {
                query: drizzle_shuffle::QueryId(running),
                batch: drizzle_shuffle::BatchId(0),
                stage: drizzle_shuffle::StageId(0),
                map: drizzle_shuffle::MapPartition(0),
                reduce: drizzle_shuffle::ReducePartition(0),
            };
            let guessed = id.to_ticket(&drizzle_shuffle::QueryToken([0; 16]));
            let Err(err) = flight.do_get(arrow_flight::Ticket::new(guessed)).await else {
                panic!("a block was served for a guessed ticket");
            };
            assert!(err.to_string().contains("token"), "{err}");
        }
        // The query was not disturbed: its rows arrive, exactly.
        c.batch_execute("INSERT INTO s VALUES (3, 30), (4, 40)")
            .await
            .unwrap();
        let mut got = tokio::time::timeout(Duration::from_secs(60), query)
            .await
            .expect("the query ended")
            .unwrap()
            .unwrap();
        got.sort();
        assert_eq!(got, vec!["1|10", "2|20", "3|30", "4|40"]);
    });
}
