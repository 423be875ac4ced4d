//! Virtual workers: the real coordinator driven by many simulated workers in
//! one process, to measure what coordinating costs beyond the machines at
//! hand (`drizzle bench sim`); [`drive_machine`] measures the coordinator's
//! decisions alone, its state machine driven without a network.
//!
//! A [`VirtualWorker`] speaks the cluster protocol like a `drizzle worker`:
//! it registers with the cluster secret, keeps an `Events` stream open with
//! its credential, heartbeats, and serves the `Worker` service on its own
//! loopback port. It runs no operator: every task completes at once with no
//! rows. In Drizzle mode it delivers the sink partitions it owns as soon as
//! a group is launched, its empty results in runs of a quarter group as a
//! worker behind its clock sends them (consumers would start on worker-to-worker
//! notices, which the coordinator never sees, so the simulation leaves them
//! out); in BSP and group-only modes its tasks report `MapDone` to the
//! coordinator and wait for `LaunchReduce`, stage after stage, as real
//! workers do. Every group is acknowledged with a `GroupReport`. What the
//! coordinator does for them is exactly what it does for real workers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use drizzle_planner::{StageGraph, StageInput, StageOutput};

use crate::cluster::{pb, ClusterSecret, PROTOCOL_VERSION};
use crate::error::{ExecError, Result};

/// What a virtual worker knows of a query it runs.
struct SimQuery {
    graph: StageGraph,
    attempt: u64,
    token: Vec<u8>,
    mode: i32,
    reduce_partitions: u32,
    /// Map partitions it owns, as (stage, partition).
    maps: Vec<(u32, u32)>,
    /// Reduce partitions it owns (of every shuffle stage).
    reduces: Vec<u32>,
}

struct Inner {
    id: AtomicU64,
    epoch: u64,
    address: String,
    events: mpsc::UnboundedSender<pb::WorkerEvent>,
    queries: Mutex<HashMap<u64, SimQuery>>,
    /// Launch messages received (groups and BSP reduce launches).
    launches: AtomicU64,
    /// This registration's credential: the coordinator's calls carry it.
    credential: Mutex<Option<String>>,
}

impl Inner {
    /// Only the coordinator this worker registered with may drive it (as a
    /// real worker checks); the cluster token is checked before this.
    fn check_coordinator<T>(&self, request: &Request<T>) -> std::result::Result<(), Status> {
        match self.credential.lock().as_deref() {
            Some(c) if crate::cluster::has_credential(request, c) => Ok(()),
            _ => Err(Status::permission_denied(
                "not the coordinator this worker registered with",
            )),
        }
    }

    fn id(&self) -> u32 {
        self.id.load(Ordering::Acquire) as u32
    }

    fn send(&self, event: pb::worker_event::Event) {
        let _ = self.events.send(pb::WorkerEvent { event: Some(event) });
    }

    fn output(&self, query: u64, batch: u64, partition: u32, attempt: u64) {
        self.send(pb::worker_event::Event::Output(pb::TaskOutput {
            query,
            batch,
            partition,
            attempt,
            ..Default::default()
        }));
    }

    /// A run of empty results `from..=to` of a sink partition, as a worker
    /// behind its clock sends them.
    fn empty_run(&self, query: u64, from: u64, to: u64, partition: u32, attempt: u64) {
        self.send(pb::worker_event::Event::Output(pb::TaskOutput {
            query,
            batch: to,
            partition,
            attempt,
            empty_from: (from < to).then_some(from),
            ..Default::default()
        }));
    }

    fn map_done(&self, q: &SimQuery, query: u64, batch: u64, stage: u32, map: u32) {
        self.send(pb::worker_event::Event::MapDone(pb::MapOutputReady {
            query,
            batch,
            stage,
            map,
            rows: vec![0; q.reduce_partitions as usize],
            watermark_us: None,
            location: self.address.clone(),
            worker: self.id(),
            attempt: q.attempt,
            token: q.token.clone(),
        }));
    }

    /// A task of `stage` finished: its rows go to the sink or, in BSP and
    /// group-only modes, its completion to the coordinator's barrier.
    fn finish(&self, q: &SimQuery, query: u64, batch: u64, stage: u32, partition: u32) {
        match q
            .graph
            .stage(drizzle_planner::graph::StageId(stage))
            .map(|s| &s.output)
        {
            Some(StageOutput::Sink(_)) => self.output(query, batch, partition, q.attempt),
            Some(StageOutput::Shuffle { .. }) if q.mode != pb::SchedulingMode::Drizzle as i32 => {
                self.map_done(q, query, batch, stage, partition);
            }
            _ => {}
        }
    }
}

#[derive(Clone)]
struct Service(Arc<Inner>);

#[tonic::async_trait]
impl pb::worker_server::Worker for Service {
    async fn launch_group(
        &self,
        request: Request<pb::LaunchGroupRequest>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        self.0.check_coordinator(&request)?;
        let req = request.into_inner();
        let w = &self.0;
        w.launches.fetch_add(1, Ordering::Relaxed);
        let mut queries = w.queries.lock();
        if !req.plan.is_empty() || !queries.contains_key(&req.query) {
            let ctx = drizzle_planner::new_session_context().task_ctx();
            let graph = drizzle_planner::decode_graph(&req.plan, &ctx)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            queries.insert(
                req.query,
                SimQuery {
                    graph,
                    attempt: req.attempt,
                    token: req.query_token.clone(),
                    mode: req.mode,
                    reduce_partitions: req.reduce_partitions,
                    maps: Vec::new(),
                    reduces: Vec::new(),
                },
            );
        }
        let Some(q) = queries.get_mut(&req.query) else {
            return Ok(Response::new(pb::Ack {}));
        };
        q.attempt = req.attempt;
        q.mode = req.mode;
        q.reduce_partitions = req.reduce_partitions;
        q.maps = req
            .map_tasks
            .iter()
            .map(|m| (m.stage, m.partition))
            .collect();
        q.reduces = req.reduce_tasks.clone();
        let sink = q.graph.sink();
        let sink_reads_a_source = matches!(sink.input, StageInput::Source(_));
        let drizzle = req.mode == pb::SchedulingMode::Drizzle as i32;
        let mut tasks = 0;
        let (first, count) = req.batches.as_ref().map_or((0, 0), |r| (r.first, r.count));
        if drizzle && !sink_reads_a_source {
            // Every stage's tasks run on notices; only the sink's
            // partitions reach the coordinator. A virtual worker completes
            // a whole group at once, so it is behind its clock: it sends
            // its empty results in runs of a quarter group, as a real
            // worker behind its clock does (`EmptyRun`).
            let run = (count / 4).max(1);
            let end = first + count;
            for &r in &q.reduces {
                let mut from = first;
                while from < end {
                    let to = (from + run).min(end) - 1;
                    w.empty_run(req.query, from, to, r, q.attempt);
                    from = to + 1;
                }
                tasks += count;
            }
        } else {
            for (batch, _) in req.batches.iter().flat_map(pb::BatchRange::triggers) {
                for &(stage, p) in &q.maps {
                    w.finish(q, req.query, batch, stage, p);
                    tasks += 1;
                }
            }
        }
        w.send(pb::worker_event::Event::GroupReport(pb::GroupReport {
            query: req.query,
            group: req.group,
            worker: w.id(),
            epoch: w.epoch,
            attempt: req.attempt,
            tasks,
            ..Default::default()
        }));
        Ok(Response::new(pb::Ack {}))
    }

    async fn notices(
        &self,
        request: Request<tonic::Streaming<pb::MapOutputReady>>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        let mut notices = request.into_inner();
        while notices.message().await?.is_some() {}
        Ok(Response::new(pb::Ack {}))
    }

    async fn launch_reduce(
        &self,
        request: Request<pb::LaunchReduceRequest>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        self.0.check_coordinator(&request)?;
        let req = request.into_inner();
        let w = &self.0;
        w.launches.fetch_add(1, Ordering::Relaxed);
        let queries = w.queries.lock();
        let Some(q) = queries.get(&req.query) else {
            return Ok(Response::new(pb::Ack {}));
        };
        // The stage whose inputs the notices are.
        let consumer = req.notices.first().and_then(|n| {
            match q
                .graph
                .stage(drizzle_planner::graph::StageId(n.stage))
                .map(|s| &s.output)
            {
                Some(StageOutput::Shuffle { to, .. }) => Some(to.0),
                _ => None,
            }
        });
        if let Some(stage) = consumer {
            for &r in &q.reduces {
                w.finish(q, req.query, req.batch, stage, r);
            }
        }
        Ok(Response::new(pb::Ack {}))
    }

    async fn cancel_query(
        &self,
        request: Request<pb::CancelQueryRequest>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        self.0.check_coordinator(&request)?;
        self.0.queries.lock().remove(&request.into_inner().query);
        Ok(Response::new(pb::Ack {}))
    }

    async fn tables_changed(
        &self,
        request: Request<pb::TablesChangedRequest>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        self.0.check_coordinator(&request)?;
        Ok(Response::new(pb::Ack {}))
    }
}

/// The tasks a virtual worker was launched with for a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimTasks {
    /// The attempt of its latest launch.
    pub attempt: u64,
    /// Map partitions, as (stage, partition).
    pub maps: Vec<(u32, u32)>,
    /// Reduce partitions (of every shuffle stage).
    pub reduces: Vec<u32>,
}

/// A simulated worker registered with a real coordinator.
pub struct VirtualWorker {
    inner: Arc<Inner>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl VirtualWorker {
    /// Serves the `Worker` service on a loopback port, registers with the
    /// coordinator at `coordinator` and starts heartbeating. Must be called
    /// inside a tokio runtime (the one the worker then runs on).
    pub async fn start(coordinator: &str, secret: &ClusterSecret) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| ExecError::io("127.0.0.1:0", e))?;
        let address = listener
            .local_addr()
            .map_err(|e| ExecError::io("127.0.0.1:0", e))?
            .to_string();
        let slot = ClusterSecret::credential_slot(None);
        let mut client = crate::cluster::coordinator_client(
            coordinator,
            &secret.with_credential(Arc::clone(&slot)),
        )?;
        let epoch = crate::worker::new_epoch();
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            id: AtomicU64::new(0),
            epoch,
            address: address.clone(),
            events: tx,
            queries: Mutex::new(HashMap::new()),
            launches: AtomicU64::new(0),
            credential: Mutex::new(None),
        });
        let (stop, stopped) = tokio::sync::watch::channel(false);
        // Calls without the cluster token are refused, as by a real worker.
        let service = tonic::service::interceptor::InterceptedService::new(
            pb::worker_server::WorkerServer::new(Service(Arc::clone(&inner)))
                .max_decoding_message_size(crate::cluster::MAX_MESSAGE_BYTES),
            secret.check(),
        );
        crate::cluster::spawn_server(
            crate::cluster::server_builder().add_service(service),
            listener,
            stopped.clone(),
            "virtual worker",
        );
        let resp = client
            .register(pb::RegisterRequest {
                protocol_version: PROTOCOL_VERSION,
                address,
                epoch,
                task_slots: 1,
            })
            .await
            .map_err(|s| crate::cluster::rpc_error("registering a virtual worker", s))?
            .into_inner();
        *slot.write() =
            tonic::metadata::MetadataValue::try_from(resp.member_credential.as_str()).ok();
        *inner.credential.lock() = Some(resp.member_credential.clone());
        inner.id.store(u64::from(resp.worker_id), Ordering::Release);
        inner.send(pb::worker_event::Event::Hello(pb::Hello {
            worker: resp.worker_id,
            epoch,
        }));
        let mut events = client.clone();
        tokio::spawn(async move {
            let _ = events
                .events(futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|m| (m, rx))
                }))
                .await;
        });
        let beat = Arc::clone(&inner);
        let mut beat_stop = stopped;
        let interval = Duration::from_millis(resp.heartbeat_interval_ms.max(100));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = beat_stop.changed() => return,
                }
                let req = pb::HeartbeatRequest {
                    protocol_version: PROTOCOL_VERSION,
                    worker_id: beat.id(),
                    epoch: beat.epoch,
                    counters: None,
                };
                let _ = client.heartbeat(req).await;
            }
        });
        Ok(Self { inner, stop })
    }

    /// Where its worker service listens.
    pub fn address(&self) -> &str {
        &self.inner.address
    }

    /// Launch messages received.
    pub fn launches(&self) -> u64 {
        self.inner.launches.load(Ordering::Relaxed)
    }

    /// What it runs of `query` as of its latest launch.
    pub fn tasks(&self, query: u64) -> Option<SimTasks> {
        self.inner.queries.lock().get(&query).map(|q| SimTasks {
            attempt: q.attempt,
            maps: q.maps.clone(),
            reduces: q.reduces.clone(),
        })
    }
}

impl Drop for VirtualWorker {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

pub use crate::coordinator::simulate::MachineFigures;

/// The coordinator's decisions alone, without a network: one query's state
/// machine driven over `workers` virtual workers (one source and one reduce
/// partition each, a chain of `stages` stages) for `batches` micro-batches,
/// every launch encoded as it would be sent (`drizzle bench machine`).
pub fn drive_machine(
    workers: u32,
    stages: u32,
    scheduling: crate::Scheduling,
    group_size: u32,
    batches: u64,
) -> Result<MachineFigures> {
    crate::coordinator::simulate::simulate(workers, stages, scheduling, group_size, batches)
}
