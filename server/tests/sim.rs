//! The real coordinator driven by virtual workers in this process
//! (`drizzle_exec::sim`): dozens of workers without dozens of processes.
//! The coordinator, its gRPC endpoint and the cluster protocol are real;
//! the workers complete their tasks at once with no rows.
//!
//! * Drizzle mode on a three-stage plan: one launch per worker per group,
//!   counted by the coordinator and by the workers, never one per batch;
//! * BSP: every shuffle of every batch passes the coordinator's barrier, so
//!   launches grow with batches and stages;
//! * a lost worker (its process gone: its event stream ends) starts a new
//!   attempt on the survivors, and batches keep coming; the survivors keep
//!   their partitions and the lost worker's are spread over them (lost-work
//!   recovery's placement, checked without processes).

use std::sync::atomic::Ordering;
use std::time::Duration;

use drizzle_exec::sim::VirtualWorker;
use drizzle_exec::Scheduling;
use drizzle_server::engine::{Engine, EngineConfig, Outcome};

const SECRET: &str = "sim-test-cluster-secret-0123456789";

const THREE_STAGES: &str = "SELECT ws, max(n) FROM (SELECT k, count(*) AS n, window_start AS ws \
    FROM TUMBLE(tiny, ts, INTERVAL '1' SECOND) GROUP BY k, window_start) AS c GROUP BY ws";

/// Runs the three-stage query over `n` virtual workers until `until` holds
/// for its status (bounded), then hands the engine, workers and query to
/// `check`.
fn with_virtual_cluster(
    n: usize,
    scheduling: Scheduling,
    group_size: u32,
    check: impl AsyncFnOnce(&Engine, &mut Vec<VirtualWorker>, &mut drizzle_exec::QueryHandle),
) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let secret = drizzle_exec::cluster::ClusterSecret::new(SECRET).unwrap();
        let engine = Engine::open(
            dir.path(),
            0,
            EngineConfig {
                batch_interval: Duration::from_millis(2),
                group_size,
                scheduling,
                cluster_secret: secret.clone(),
                worker_timeout: Duration::from_secs(60),
                checkpoint_interval: Duration::from_secs(86_400),
                ..EngineConfig::default()
            },
        )
        .await
        .unwrap();
        let mut workers = Vec::new();
        for _ in 0..n {
            workers.push(
                VirtualWorker::start(&engine.runtime.cluster_address, &secret)
                    .await
                    .unwrap(),
            );
        }
        let mut settings = engine.default_settings();
        let setup = format!(
            "CREATE STREAM tiny (k BIGINT, ts TIMESTAMP, WATERMARK FOR ts AS ts) WITH (connector = 'datagen', \
               rows_per_second = '1000', partitions = '{n}', fields.k.kind = 'sequence', fields.k.min = '0', \
               fields.k.max = '99')"
        );
        for stmt in drizzle_planner::parse_statements(&setup).unwrap() {
            engine.execute(stmt, &mut settings, &[], "").await.unwrap();
        }
        let stmt = drizzle_planner::parse_statements(THREE_STAGES).unwrap().remove(0);
        let Outcome::Stream(mut handle) = engine
            .execute(stmt, &mut settings, &[], THREE_STAGES)
            .await
            .unwrap()
        else {
            panic!("not a continuous query");
        };
        check(&engine, &mut workers, &mut handle).await;
        handle.cancel();
        engine.runtime.shutdown();
    });
}

/// Waits (bounded) until the query's status satisfies `done`, reading its
/// (empty) batches meanwhile.
async fn run_until(
    handle: &mut drizzle_exec::QueryHandle,
    what: &str,
    done: impl Fn(&drizzle_exec::QueryStatus) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !done(&handle.status) {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        match tokio::time::timeout(Duration::from_millis(50), handle.next()).await {
            Ok(Some(Err(e))) => panic!("query failed: {e}"),
            Ok(None) => panic!("query ended"),
            _ => {}
        }
    }
}

#[test]
fn drizzle_mode_sends_one_launch_per_virtual_worker_per_group() {
    with_virtual_cluster(32, Scheduling::Drizzle, 10, async |_, workers, handle| {
        run_until(handle, "200 batches", |s| {
            s.batches.load(Ordering::Relaxed) >= 200
        })
        .await;
        // Stop launching, then count once the last group's launches landed
        // (the coordinator counts a group's launches after they were sent).
        handle.cancel();
        let s = std::sync::Arc::clone(&handle.status);
        let counts = || {
            (
                s.groups.load(Ordering::Relaxed),
                s.launches.load(Ordering::Relaxed),
                workers.iter().map(|w| w.launches()).sum::<u64>(),
            )
        };
        let mut last = counts();
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = counts();
            if now == last && now.1 == now.2 {
                break;
            }
            last = now;
        }
        let (groups, launches, received) = last;
        assert_eq!(
            launches,
            32 * groups,
            "{launches} launches for {groups} groups"
        );
        assert_eq!(received, launches, "every launch arrived once");
        assert!(
            groups * 10 <= s.batches.load(Ordering::Relaxed) + 20,
            "groups of 10 batches"
        );
    });
}

#[test]
fn bsp_passes_the_coordinator_barrier_at_every_shuffle_of_every_batch() {
    with_virtual_cluster(16, Scheduling::Bsp, 1, async |_, workers, handle| {
        run_until(handle, "50 batches", |s| {
            s.batches.load(Ordering::Relaxed) >= 50
        })
        .await;
        let batches = handle.status.batches.load(Ordering::Relaxed);
        // Per batch: a launch to each worker, then a reduce launch to each
        // for each of the two shuffles.
        let received: u64 = workers.iter().map(|w| w.launches()).sum();
        assert!(
            received >= batches * 16 * 3,
            "{received} launches for {batches} batches"
        );
    });
}

#[test]
fn a_lost_virtual_worker_starts_a_new_attempt_on_the_survivors() {
    with_virtual_cluster(8, Scheduling::Drizzle, 5, async |_, workers, handle| {
        run_until(handle, "50 batches", |s| {
            s.batches.load(Ordering::Relaxed) >= 50
        })
        .await;
        let before = handle.status.batches.load(Ordering::Relaxed);
        assert_eq!(handle.status.recoveries.load(Ordering::Relaxed), 0);
        let query = handle.id.0;
        let held: Vec<_> = workers.iter().map(|w| w.tasks(query).unwrap()).collect();
        // Its server and event stream end, as when a process dies.
        let lost = held[3].clone();
        drop(workers.remove(3));
        run_until(handle, "a recovery and 50 more batches", |s| {
            s.recoveries.load(Ordering::Relaxed) >= 1
                && s.batches.load(Ordering::Relaxed) >= before + 50
        })
        .await;
        let attempt = handle.status.attempt.load(Ordering::Relaxed);
        assert!(attempt >= 2);
        // Lost-work recovery: every survivor keeps its partitions, and the
        // lost worker's move to survivors, spread over more than one.
        let survivors: Vec<&drizzle_exec::sim::SimTasks> = held
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 3)
            .map(|(_, h)| h)
            .collect();
        let now: Vec<_> = workers.iter().map(|w| w.tasks(query).unwrap()).collect();
        let mut takers = 0;
        for (before, after) in survivors.iter().zip(&now) {
            assert_eq!(after.attempt, attempt, "launched with the new attempt");
            assert!(
                before.maps.iter().all(|m| after.maps.contains(m)),
                "kept its map partitions"
            );
            assert!(
                before.reduces.iter().all(|r| after.reduces.contains(r)),
                "kept its reduce partitions"
            );
            let took = lost.maps.iter().any(|m| after.maps.contains(m))
                || lost.reduces.iter().any(|r| after.reduces.contains(r));
            takers += usize::from(took);
        }
        let mut maps: Vec<(u32, u32)> = now.iter().flat_map(|t| t.maps.clone()).collect();
        let mut reduces: Vec<u32> = now.iter().flat_map(|t| t.reduces.clone()).collect();
        maps.sort();
        reduces.sort();
        let mut all_maps: Vec<(u32, u32)> = held.iter().flat_map(|t| t.maps.clone()).collect();
        let mut all_reduces: Vec<u32> = held.iter().flat_map(|t| t.reduces.clone()).collect();
        all_maps.sort();
        all_reduces.sort();
        assert_eq!(
            maps, all_maps,
            "every map partition runs once, on a survivor"
        );
        assert_eq!(
            reduces, all_reduces,
            "every reduce partition runs once, on a survivor"
        );
        assert!(
            takers >= 2,
            "the lost partitions went to {takers} survivor(s)"
        );
    });
}

#[test]
fn a_virtual_worker_takes_launches_only_from_its_coordinator() {
    with_virtual_cluster(2, Scheduling::Drizzle, 10, async |_, workers, handle| {
        run_until(handle, "10 batches", |s| {
            s.batches.load(Ordering::Relaxed) >= 10
        })
        .await;
        let address = workers[0].address().to_string();
        let launch = || drizzle_exec::cluster::pb::LaunchGroupRequest {
            query: handle.id.0,
            ..Default::default()
        };
        // Without the cluster token: unauthenticated.
        let wrong =
            drizzle_exec::cluster::ClusterSecret::new("another-secret-0123456789abcdef").unwrap();
        let mut stranger = drizzle_exec::cluster::worker_client(&address, &wrong).unwrap();
        let err = stranger.launch_group(launch()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
        // A member without the coordinator's credential: refused.
        let member = drizzle_exec::cluster::ClusterSecret::new(SECRET).unwrap();
        let mut peer = drizzle_exec::cluster::worker_client(&address, &member).unwrap();
        let err = peer.launch_group(launch()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    });
}
