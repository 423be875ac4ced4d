//! A worker: the task runtime, its block store, its Arrow Flight endpoint and
//! its local scheduler. Runs inside `drizzle worker` or, for the embedded
//! server, inside `drizzle server` (same protocol, over loopback).
//!
//! ```text
//!  gRPC Worker service ──▶ inbox ──▶ task thread (Scheduler)
//!     LaunchGroup              │        map task (b, p) at its trigger time
//!     MapOutputReady (peers)   │        reduce task (b, r) once every map
//!     LaunchReduce (BSP)       │        partition's notice for b is in
//!                              ▼
//!  BlockStore ◀── map outputs; served to peers by Flight do_get, read
//!                 directly when the consumer is on this worker
//! ```
//!
//! # Invariants
//! * The task thread alone owns task state (source cursors, watermarks,
//!   keyed aggregate state); partitions stay here for the life of the query.
//! * In Drizzle mode a reduce task is pre-scheduled by the group's launch and
//!   becomes runnable from notices alone: no coordinator message between a
//!   map task finishing and its consumers starting.
//! * Runnable tasks run earliest batch first, consumers before producers of
//!   the same batch; a map partition runs its batches in order.
//! * The worker reports to the coordinator once per group (plus heartbeats
//!   and the final stage's results, which are data, keyed by batch).
//! * A map task reads the source range its batch's trigger time fixes
//!   ([`SourcePartition::available_at`](crate::source::SourcePartition::available_at)),
//!   so any batch can be re-run and reads the same rows.
//! * Checkpoint groups: after the group's last batch a map task records its
//!   position (in the group report) and a reduce task snapshots its keyed
//!   state, sent to the coordinator asynchronously (the task thread moves on).
//! * Every query is at one attempt of one *generation*. A launch of a newer
//!   attempt of the same generation (lost-work recovery) keeps every
//!   partition this worker holds, with its state, and its retained map
//!   outputs: it adds the partitions it adopts (restored from the named
//!   checkpoint), drops notices from producers that moved, skips batches a
//!   partition already ran, and announces its retained outputs again to
//!   every consumer. A launch of a newer generation replaces the query's
//!   state. Notices are accepted from the current generation and only from
//!   the worker that owns their map partition.
//! * Map outputs are kept until a checkpoint covers them when the query
//!   retains them for recovery (otherwise a block goes once it is read).
//! * A block that cannot be pulled from its producer (dead, cut off: 5 s) does
//!   not fail the query: the reduce task waits again, the producer's notices
//!   are forgotten, and the coordinator hears `FetchFailed`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use arrow_flight::flight_service_server::FlightServiceServer;
use datafusion::execution::TaskContext;
use drizzle_planner::{LookupJoinSpec, StreamInput, StreamingPlan};
use drizzle_shuffle::{
    BatchId, BlockFlightService, BlockId, BlockStore, MapPartition, QueryId, QueryToken,
    ReducePartition, StageId,
};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::checkpoint::StateObject;
use crate::cluster::pb::worker_server::{Worker as WorkerRpc, WorkerServer};
use crate::cluster::pb::{self, SchedulingMode};
use crate::cluster::{
    coordinator_client, from_ipc, rpc_error, to_ipc, MAX_MESSAGE_BYTES, PROTOCOL_VERSION,
};
use crate::error::{ExecError, Result};
use crate::ops::{
    apply_ops, partial_aggregate, AggregateFinalExec, JoinCache, StateSize, TableEvaluator,
    WindowAssignExec, WindowJoinExec,
};
use crate::source::{DatagenSource, MAX_BATCH_ROWS};

/// How to start a worker.
#[derive(Clone)]
pub struct WorkerConfig {
    /// The coordinator's cluster address (`host:port`).
    pub coordinator: String,
    /// Where to listen for the control service and Flight.
    pub listen: SocketAddr,
    /// The address peers and the coordinator use to reach this worker;
    /// defaults to the bound address.
    pub advertise: Option<String>,
    /// Turns a task's error into (SQLSTATE, message) for the client.
    pub classify: ErrorClassifier,
    /// Proof of membership on every cluster call, both ways.
    pub cluster_secret: crate::cluster::ClusterSecret,
}

/// Turns a task error into the (SQLSTATE, message) a client will see; the
/// binary provides it, so the code travels with a remote task's failure.
pub type ErrorClassifier = Arc<dyn Fn(ExecError) -> (String, String) + Send + Sync>;

/// Scheduling counters of one worker (also sent in heartbeats).
#[derive(Debug, Default)]
pub struct WorkerCounters {
    /// Launch messages received.
    pub launches_received: AtomicU64,
    /// `MapOutputReady` notices received (from peers or this worker).
    pub notices_received: AtomicU64,
    /// Notices sent.
    pub notices_sent: AtomicU64,
    /// Map tasks run.
    pub map_tasks_run: AtomicU64,
    /// Reduce tasks run.
    pub reduce_tasks_run: AtomicU64,
    /// Reduce tasks made runnable by notices alone.
    pub reduces_started_by_notices: AtomicU64,
    /// Reduce tasks launched by the coordinator (BSP).
    pub reduces_started_by_coordinator: AtomicU64,
    /// Blocks pulled from other workers over Flight.
    pub blocks_fetched_remote: AtomicU64,
    /// Blocks read from this worker's own store.
    pub blocks_read_local: AtomicU64,
    /// Reduce tasks that ran before an earlier batch of the same partition.
    pub out_of_order_reduces: AtomicU64,
    /// Coordinator messages other than launches received while a group ran.
    pub coordinator_messages_in_group: AtomicU64,
    /// Partitions taken over from a lost worker.
    pub partitions_adopted: AtomicU64,
    /// Blocks that could not be pulled from their producer.
    pub fetch_failures: AtomicU64,
}

impl WorkerCounters {
    fn to_proto(&self, store: &BlockStore) -> pb::WorkerCounters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (blocks, bytes) = store.usage();
        pb::WorkerCounters {
            launches_received: g(&self.launches_received),
            notices_received: g(&self.notices_received),
            notices_sent: g(&self.notices_sent),
            map_tasks_run: g(&self.map_tasks_run),
            reduce_tasks_run: g(&self.reduce_tasks_run),
            reduces_started_by_notices: g(&self.reduces_started_by_notices),
            reduces_started_by_coordinator: g(&self.reduces_started_by_coordinator),
            blocks_fetched_remote: g(&self.blocks_fetched_remote),
            blocks_read_local: g(&self.blocks_read_local),
            out_of_order_reduces: g(&self.out_of_order_reduces),
            blocks_held: blocks as u64,
            block_bytes_held: bytes as u64,
            coordinator_messages_in_group: g(&self.coordinator_messages_in_group),
            partitions_adopted: g(&self.partitions_adopted),
            fetch_failures: g(&self.fetch_failures),
        }
    }
}

enum Msg {
    Launch(Box<pb::LaunchGroupRequest>),
    Notice(pb::MapOutputReady),
    LaunchReduce(pb::LaunchReduceRequest),
    /// Cancel the query's attempts up to this one (0: all).
    Cancel(QueryId, u64),
    Shutdown,
}

/// What the worker's threads and RPC handlers share.
struct Shared {
    address: String,
    coordinator: pb::coordinator_client::CoordinatorClient<crate::cluster::ClusterChannel>,
    /// Attached to every call to the coordinator and to peers.
    secret: crate::cluster::ClusterSecret,
    counters: WorkerCounters,
    store: Arc<BlockStore>,
    inbox: Mutex<std_mpsc::Sender<Msg>>,
    handle: tokio::runtime::Handle,
    identity: Mutex<(u32, u64)>,
    tables_version: AtomicU64,
    peers: Mutex<HashMap<String, Channel>>,
    task_ctx: Arc<TaskContext>,
    classify: ErrorClassifier,
    /// The open Events stream to the coordinator.
    events: Mutex<Option<mpsc::UnboundedSender<pb::WorkerEvent>>>,
    /// The open Notices stream to each peer.
    notice_streams: Mutex<HashMap<String, mpsc::UnboundedSender<pb::MapOutputReady>>>,
    /// This registration's credential (known to this worker and the
    /// coordinator only): attached to calls to the coordinator, and required
    /// on the coordinator's launches and cancels.
    credential: crate::cluster::CredentialSlot,
}

impl Shared {
    /// Fails unless `request` comes from the coordinator this worker
    /// registered with. A launch can overtake the registration's response:
    /// until that arrives, wait for it (bounded).
    async fn check_coordinator<T>(&self, request: &Request<T>) -> std::result::Result<(), Status> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let known = self
                .credential
                .read()
                .as_ref()
                .and_then(|c| c.to_str().ok().map(str::to_string));
            if let Some(c) = known {
                return if crate::cluster::has_credential(request, &c) {
                    Ok(())
                } else {
                    Err(Status::permission_denied(
                        "only the coordinator this worker is registered with may do this",
                    ))
                };
            }
            if Instant::now() > deadline {
                return Err(Status::unavailable("this worker is not registered yet"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A stream of the messages sent into `rx`, for a client-streaming RPC.
fn stream_of<T: Send + 'static>(
    rx: mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
}

impl Shared {
    /// Reports to the coordinator on the long-lived Events stream (opened,
    /// or reopened after a failure, on demand).
    fn event(&self, event: pb::worker_event::Event) {
        let mut msg = pb::WorkerEvent { event: Some(event) };
        let mut slot = self.events.lock();
        if let Some(tx) = slot.as_ref() {
            match tx.send(msg) {
                Ok(()) => return,
                Err(mpsc::error::SendError(back)) => msg = back,
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        // A stream opens with whose it is: its end tells the coordinator.
        let (worker, epoch) = *self.identity.lock();
        let _ = tx.send(pb::WorkerEvent {
            event: Some(pb::worker_event::Event::Hello(pb::Hello { worker, epoch })),
        });
        let _ = tx.send(msg);
        *slot = Some(tx);
        let mut client = self.coordinator.clone();
        self.handle.spawn(async move {
            if let Err(s) = client.events(stream_of(rx)).await {
                tracing::warn!("event stream to the coordinator ended: {}", s.message());
            }
        });
    }

    /// Pushes a notice to a peer on its long-lived Notices stream.
    fn notify(&self, peer: &str, notice: pb::MapOutputReady) -> Result<()> {
        let mut streams = self.notice_streams.lock();
        let mut notice = notice;
        if let Some(tx) = streams.get(peer) {
            match tx.send(notice) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(back)) => notice = back,
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(notice);
        streams.insert(peer.to_string(), tx);
        let mut client = pb::worker_client::WorkerClient::with_interceptor(
            self.peer(peer)?,
            self.secret.clone(),
        );
        let peer = peer.to_string();
        self.handle.spawn(async move {
            if let Err(s) = client.notices(stream_of(rx)).await {
                tracing::warn!("notice stream to {peer} ended: {}", s.message());
            }
        });
        Ok(())
    }

    fn send(&self, msg: Msg) {
        let _ = self.inbox.lock().send(msg);
    }

    fn peer(&self, address: &str) -> Result<Channel> {
        let mut peers = self.peers.lock();
        if let Some(c) = peers.get(address) {
            return Ok(c.clone());
        }
        let c = crate::cluster::channel(address)?;
        peers.insert(address.to_string(), c.clone());
        Ok(c)
    }

    fn worker_id(&self) -> u32 {
        self.identity.lock().0
    }

    /// (Re)opens the Events stream under the current identity.
    fn open_events(&self) {
        self.events.lock().take();
        let (worker, epoch) = *self.identity.lock();
        self.event(pb::worker_event::Event::Hello(pb::Hello { worker, epoch }));
    }
}

/// A running worker.
pub struct WorkerHandle {
    /// The address peers reach it at.
    pub address: String,
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    stop: watch::Sender<bool>,
}

impl WorkerHandle {
    /// This worker's scheduling counters.
    pub fn counters(&self) -> pb::WorkerCounters {
        self.shared.counters.to_proto(&self.shared.store)
    }

    /// Stops serving and joins the task thread.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
        self.shared.send(Msg::Shutdown);
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }

    /// Resolves when the worker was told to stop.
    pub async fn stopped(&self) {
        crate::cluster::stopped(self.stop.subscribe()).await
    }

    /// Drains the worker (SIGTERM): asks the coordinator to move every query
    /// off it at the next group boundary (state travels through a
    /// checkpoint) and returns once the coordinator says none runs here.
    pub async fn drain(&self) -> Result<()> {
        let (worker_id, epoch) = *self.shared.identity.lock();
        let mut client = self.shared.coordinator.clone();
        client
            .drain(pb::DrainRequest { worker_id, epoch })
            .await
            .map_err(|s| rpc_error("draining", s))?;
        Ok(())
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct WorkerService {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl WorkerRpc for WorkerService {
    async fn launch_group(
        &self,
        request: Request<pb::LaunchGroupRequest>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        self.shared.check_coordinator(&request).await?;
        let req = request.into_inner();
        crate::cluster::check_version(req.protocol_version, "the coordinator")?;
        let epoch = self.shared.identity.lock().1;
        // Fencing: a launch for another incarnation of this address is stale.
        if req.epoch != epoch {
            return Err(Status::failed_precondition(format!(
                "launch for registration epoch {} reached a worker at epoch {epoch}",
                req.epoch
            )));
        }
        self.shared
            .tables_version
            .fetch_max(req.tables_version, Ordering::AcqRel);
        self.shared
            .counters
            .launches_received
            .fetch_add(1, Ordering::Relaxed);
        self.shared.send(Msg::Launch(Box::new(req)));
        Ok(Response::new(pb::Ack {}))
    }

    async fn notices(
        &self,
        request: Request<tonic::Streaming<pb::MapOutputReady>>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        let mut notices = request.into_inner();
        while let Some(notice) = notices.message().await? {
            self.shared.send(Msg::Notice(notice));
        }
        Ok(Response::new(pb::Ack {}))
    }

    async fn launch_reduce(
        &self,
        request: Request<pb::LaunchReduceRequest>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        self.shared.check_coordinator(&request).await?;
        self.shared.send(Msg::LaunchReduce(request.into_inner()));
        Ok(Response::new(pb::Ack {}))
    }

    async fn cancel_query(
        &self,
        request: Request<pb::CancelQueryRequest>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        self.shared.check_coordinator(&request).await?;
        let req = request.into_inner();
        self.shared
            .send(Msg::Cancel(QueryId(req.query), req.attempt));
        Ok(Response::new(pb::Ack {}))
    }

    async fn tables_changed(
        &self,
        request: Request<pb::TablesChangedRequest>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        self.shared.check_coordinator(&request).await?;
        self.shared
            .tables_version
            .fetch_max(request.into_inner().version, Ordering::AcqRel);
        Ok(Response::new(pb::Ack {}))
    }
}

/// Starts a worker: binds, serves, registers with the coordinator (retrying
/// until it answers) and heartbeats. Must be called inside a tokio runtime.
pub async fn start_worker(config: WorkerConfig) -> Result<Arc<WorkerHandle>> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| ExecError::io(config.listen.to_string(), e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| ExecError::io(config.listen.to_string(), e))?;
    let address = config
        .advertise
        .clone()
        .unwrap_or_else(|| bound.to_string());
    let (tx, rx) = std_mpsc::channel();
    let store = Arc::new(BlockStore::new());
    let credential = crate::cluster::ClusterSecret::credential_slot(None);
    let shared = Arc::new(Shared {
        address: address.clone(),
        coordinator: coordinator_client(
            &config.coordinator,
            &config
                .cluster_secret
                .with_credential(Arc::clone(&credential)),
        )?,
        credential,
        secret: config.cluster_secret.clone(),
        counters: WorkerCounters::default(),
        store: Arc::clone(&store),
        inbox: Mutex::new(tx),
        handle: tokio::runtime::Handle::current(),
        identity: Mutex::new((0, 0)),
        tables_version: AtomicU64::new(0),
        peers: Mutex::new(HashMap::new()),
        task_ctx: drizzle_planner::new_session_context().task_ctx(),
        classify: Arc::clone(&config.classify),
        events: Mutex::new(None),
        notice_streams: Mutex::new(HashMap::new()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    // Both services refuse calls without the cluster token.
    let service = tonic::service::interceptor::InterceptedService::new(
        WorkerServer::new(WorkerService {
            shared: Arc::clone(&shared),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES),
        config.cluster_secret.check(),
    );
    let flight = tonic::service::interceptor::InterceptedService::new(
        FlightServiceServer::new(BlockFlightService::new(Arc::clone(&store)))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        config.cluster_secret.check(),
    );
    let router = crate::cluster::server_builder()
        .add_service(service)
        .add_service(flight);
    crate::cluster::spawn_server(router, listener, stop_rx.clone(), "worker");
    let thread_shared = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name("drizzle-tasks".into())
        .stack_size(crate::THREAD_STACK_BYTES)
        .spawn(move || Scheduler::new(thread_shared).run(rx))
        .map_err(|e| ExecError::io("task thread", e))?;
    register(&shared).await?;
    tokio::spawn(heartbeat_loop(Arc::clone(&shared), stop_rx));
    tracing::info!(%address, coordinator = %config.coordinator, "worker registered");
    Ok(Arc::new(WorkerHandle {
        address,
        shared,
        thread: Mutex::new(Some(thread)),
        stop: stop_tx,
    }))
}

/// A fresh nonzero registration epoch: wall clock, process and a counter.
fn new_epoch() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let e = nanos ^ (u64::from(std::process::id()) << 40) ^ n.rotate_left(20);
    e.max(1)
}

/// Registers (again); retries while the coordinator is unreachable, fails
/// on a protocol mismatch.
async fn register(shared: &Shared) -> Result<()> {
    let mut delay = Duration::from_millis(50);
    loop {
        let mut client = shared.coordinator.clone();
        // The new incarnation is this worker's epoch before the coordinator
        // can place anything on it (a launch may overtake the response).
        let epoch = new_epoch();
        shared.identity.lock().1 = epoch;
        let req = pb::RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            address: shared.address.clone(),
            epoch,
        };
        match client.register(req).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                *shared.credential.write() =
                    tonic::metadata::MetadataValue::try_from(resp.member_credential.as_str()).ok();
                *shared.identity.lock() = (resp.worker_id, resp.epoch);
                shared
                    .tables_version
                    .fetch_max(resp.tables_version, Ordering::AcqRel);
                shared.open_events();
                return Ok(());
            }
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                return Err(rpc_error("the coordinator refused this worker", s));
            }
            Err(s) => {
                tracing::debug!("coordinator not reachable yet: {}", s.message());
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// How often a worker heartbeats.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);

async fn heartbeat_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        let (worker_id, epoch) = *shared.identity.lock();
        let req = pb::HeartbeatRequest {
            protocol_version: PROTOCOL_VERSION,
            worker_id,
            epoch,
            counters: Some(shared.counters.to_proto(&shared.store)),
        };
        let mut client = shared.coordinator.clone();
        match client.heartbeat(req).await {
            Ok(resp) if resp.get_ref().known => {}
            Ok(_) => {
                tracing::warn!("the coordinator does not know this worker; registering again");
                // A new worker: nothing of the old registration survives.
                shared.send(Msg::Cancel(QueryId(u64::MAX), 0));
                if let Err(e) = register(&shared).await {
                    tracing::error!("{e}");
                    return;
                }
            }
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                tracing::error!("heartbeat refused: {}", s.message());
                return;
            }
            Err(s) => tracing::warn!("heartbeat failed: {}", s.message()),
        }
    }
}

/// The finite side of lookup joins, fetched from the coordinator.
struct RemoteTables {
    shared: Arc<Shared>,
    query: QueryId,
}

impl TableEvaluator for RemoteTables {
    fn version(&self) -> u64 {
        self.shared.tables_version.load(Ordering::Acquire)
    }

    fn evaluate(&self, spec: &LookupJoinSpec) -> Result<Vec<RecordBatch>> {
        let mut client = self.shared.coordinator.clone();
        let req = pb::ReadTableRequest {
            query: self.query.0,
            join: spec.id,
        };
        let resp = self
            .shared
            .handle
            .block_on(async move { client.read_table(req).await })
            .map_err(|s| rpc_error("reading a lookup join's table", s))?
            .into_inner();
        self.shared
            .tables_version
            .fetch_max(resp.version, Ordering::AcqRel);
        from_ipc(resp.ipc)
    }
}

/// Where a map partition reads its rows.
enum TaskSource {
    /// Generated on the worker (row n is a pure function of n).
    Datagen(Arc<DatagenSource>, u32),
    /// A built-in stream's log, read from the coordinator by range:
    /// (input stage, partition).
    Log(u32, u32),
}

struct MapState {
    source: TaskSource,
    /// The last batch this partition ran (or its checkpoint covers).
    last_batch: Option<u64>,
    next_offset: u64,
    window: WindowAssignExec,
    joins: JoinCache,
}

struct ReduceState {
    agg: Option<AggregateFinalExec>,
    join: Option<WindowJoinExec>,
    joins: JoinCache,
    last_batch: Option<u64>,
}

impl ReduceState {
    fn size(&self) -> StateSize {
        let mut size = self.joins.size();
        if let Some(a) = &self.agg {
            size += a.state_size();
        }
        if let Some(j) = &self.join {
            size += j.state_size();
        }
        size
    }
}

/// `n` bytes for a message: `12.3 MB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} bytes")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[derive(Default)]
struct PendingReduce {
    /// Set by the group's launch (Drizzle) or the coordinator (BSP).
    launched: bool,
    trigger: Option<Instant>,
    notices: Vec<pb::MapOutputReady>,
}

impl PendingReduce {
    /// Adds a notice unless one for the same map partition is in (a notice
    /// repeated by a recovery describes the same, deterministic, blocks).
    fn add(&mut self, notice: pb::MapOutputReady) {
        if !self
            .notices
            .iter()
            .any(|n| n.stage == notice.stage && n.map == notice.map)
        {
            self.notices.push(notice);
        }
    }

    /// True when there is a notice from every map partition of every shuffle
    /// input (`inputs[s]` = map partitions of input stage `s`).
    fn has_all_inputs(&self, inputs: &[u32]) -> bool {
        inputs.iter().enumerate().all(|(stage, &partitions)| {
            let mut seen: Vec<u32> = self
                .notices
                .iter()
                .filter(|n| n.stage as usize == stage)
                .map(|n| n.map)
                .collect();
            seen.sort_unstable();
            seen.dedup();
            seen.len() as u32 >= partitions
        })
    }

    /// Runnable: launched and every input is in.
    fn runnable(&self, inputs: &[u32]) -> bool {
        self.launched && self.has_all_inputs(inputs)
    }
}

/// One query as this worker knows it.
struct WorkerQuery {
    plan: StreamingPlan,
    /// The stream inputs (map stages) and their window-assigned schemas.
    inputs: Vec<(StreamInput, Option<SchemaRef>)>,
    mode: SchedulingMode,
    /// Map partitions per shuffle input of the reduce stage.
    shuffle_inputs: Vec<u32>,
    reduce_partitions: u32,
    reduce_placement: Vec<String>,
    tables: RemoteTables,
    maps: BTreeMap<(u32, MapPartition), MapState>,
    reduces: BTreeMap<ReducePartition, ReduceState>,
    /// Map tasks waiting for their trigger time (instant, Unix µs).
    pending_maps: BTreeMap<(u64, u32, MapPartition), (Instant, i64)>,
    /// Reduce tasks pre-scheduled, with the notices received so far.
    pending_reduces: BTreeMap<(u64, ReducePartition), PendingReduce>,
    /// Per group: tasks left, source ranges read.
    groups: BTreeMap<u64, GroupProgress>,
    /// First batch of each group → group.
    group_starts: BTreeMap<u64, u64>,
    /// Group → (its last batch, checkpoint after it).
    group_ends: BTreeMap<u64, (u64, bool)>,
    /// The attempt this worker runs.
    attempt: u64,
    /// The attempt that started the query's generation: state, notices and
    /// map outputs of any attempt since are valid (lost-work recovery).
    generation: u64,
    /// Worker id owning each map partition (stages in order); empty: any.
    map_owners: Vec<u32>,
    /// Map outputs are kept until a checkpoint covers them.
    retain: bool,
    /// Notices of this worker's retained map outputs, by (batch, stage, map):
    /// sent again to the consumers when a recovery moves reduce partitions.
    produced: BTreeMap<(u64, u32, u32), pb::MapOutputReady>,
    rows_in: u64,
    late_rows: u64,
    /// The query's memory budget (bytes, 0: none).
    memory_limit: u64,
    /// Per group: the complete checkpoint its closing snapshot of keyed
    /// state may be a delta of (from that group's own launch, whatever
    /// order launches arrive in).
    delta_bases: BTreeMap<u64, Option<u64>>,
    /// The query's shuffle token: tickets and notices carry it.
    token: QueryToken,
}

impl WorkerQuery {
    /// The state this worker holds for the query: every reduce partition's
    /// keyed state and join rows, the lookup tables of every task, and
    /// `buffered` bytes of shuffle blocks.
    fn state_size(&self, buffered: usize) -> StateSize {
        let mut size = StateSize {
            bytes: buffered as u64,
            keys: 0,
        };
        for m in self.maps.values() {
            size += m.joins.size();
        }
        for r in self.reduces.values() {
            size += r.size();
        }
        size
    }

    /// Fails when the state outgrows the query's budget; `operator` names
    /// what just grew.
    fn check_budget(&self, operator: &str, buffered: usize) -> Result<StateSize> {
        let size = self.state_size(buffered);
        if self.memory_limit > 0 && size.bytes > self.memory_limit {
            return Err(ExecError::OutOfMemory {
                message: format!(
                    "query memory limit exceeded: {operator}: the query holds {} of state \
                     and shuffle buffers ({} keys or rows) on this worker, \
                     query_memory_limit is {}",
                    human_bytes(size.bytes),
                    size.keys,
                    human_bytes(self.memory_limit)
                ),
            });
        }
        Ok(size)
    }
    /// Whether a notice is valid here: from this generation, and from the
    /// worker that owns its map partition (a lost worker's late notices, and
    /// a fenced incarnation's, are not).
    fn accepts(&self, notice: &pb::MapOutputReady) -> bool {
        accepts_notice(
            notice,
            self.generation,
            &self.map_owners,
            &self.shuffle_inputs,
        )
    }

    /// The earliest runnable reduce task that is next in its partition.
    fn next_reduce(&self) -> Option<(&(u64, ReducePartition), &PendingReduce)> {
        let mut blocked: Vec<ReducePartition> = Vec::new();
        for (key, p) in &self.pending_reduces {
            let (b, r) = key;
            if blocked.contains(r) {
                continue;
            }
            let in_order = self
                .reduces
                .get(r)
                .and_then(|s| s.last_batch)
                .is_none_or(|last| *b == last + 1);
            if in_order && p.runnable(&self.shuffle_inputs) {
                return Some((key, p));
            }
            blocked.push(*r);
        }
        None
    }
}

#[derive(Default)]
struct GroupProgress {
    left: usize,
    tasks: u64,
    ranges: Vec<pb::SourceRange>,
    maps: Vec<pb::MapState>,
}

enum Task {
    Map(QueryId, u64, u32, MapPartition),
    Reduce(QueryId, u64, ReducePartition),
}

fn unix_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A Unix-µs trigger time on this worker's monotonic clock.
fn instant_of(trigger_unix_us: i64) -> Instant {
    let now = Instant::now();
    let delta = trigger_unix_us - unix_us();
    if delta > 0 {
        now + Duration::from_micros(delta as u64)
    } else {
        now
    }
}

/// The worker-local scheduler, on the task thread.
struct Scheduler {
    shared: Arc<Shared>,
    queries: HashMap<QueryId, WorkerQuery>,
    /// Notices for queries whose launch has not arrived yet.
    early: HashMap<QueryId, Vec<pb::MapOutputReady>>,
}

impl Scheduler {
    fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            queries: HashMap::new(),
            early: HashMap::new(),
        }
    }

    fn run(mut self, rx: std_mpsc::Receiver<Msg>) {
        // Lazily connecting channels need the runtime's context; `block_on`
        // calls below still run on this (non-runtime) thread.
        let handle = self.shared.handle.clone();
        let _context = handle.enter();
        loop {
            loop {
                match rx.try_recv() {
                    Ok(msg) => {
                        if !self.handle(msg) {
                            return;
                        }
                    }
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => return,
                }
            }
            let now = Instant::now();
            match self.next_task(now) {
                Ok(task) => self.run_task(task),
                Err(wait) => {
                    let msg = match wait {
                        Some(deadline) => {
                            match rx.recv_timeout(deadline.saturating_duration_since(now)) {
                                Ok(m) => Some(m),
                                Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                            }
                        }
                        None => match rx.recv() {
                            Ok(m) => Some(m),
                            Err(_) => return,
                        },
                    };
                    if let Some(msg) = msg {
                        if !self.handle(msg) {
                            return;
                        }
                    }
                }
            }
        }
    }

    fn in_group(&self) -> bool {
        self.queries
            .values()
            .any(|q| !q.pending_maps.is_empty() || !q.pending_reduces.is_empty())
    }

    /// Returns false on shutdown.
    fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Shutdown => return false,
            Msg::Cancel(QueryId(u64::MAX), _) => {
                for q in std::mem::take(&mut self.queries).into_keys() {
                    self.shared.store.drop_query(q);
                }
                self.early.clear();
            }
            Msg::Cancel(q, attempt) => {
                if self.in_group() {
                    self.shared
                        .counters
                        .coordinator_messages_in_group
                        .fetch_add(1, Ordering::Relaxed);
                }
                let newer = self
                    .queries
                    .get(&q)
                    .is_some_and(|wq| attempt != 0 && wq.attempt > attempt);
                if !newer {
                    self.queries.remove(&q);
                    self.early.remove(&q);
                    self.shared.store.drop_query(q);
                }
            }
            Msg::Launch(launch) => {
                let id = QueryId(launch.query);
                if let Err(e) = self.launch(*launch) {
                    self.fail(id, BatchId(0), e);
                }
            }
            Msg::Notice(notice) => {
                self.shared
                    .counters
                    .notices_received
                    .fetch_add(1, Ordering::Relaxed);
                self.add_notice(notice);
            }
            Msg::LaunchReduce(req) => {
                if self.in_group() {
                    self.shared
                        .counters
                        .coordinator_messages_in_group
                        .fetch_add(1, Ordering::Relaxed);
                }
                let Some(wq) = self.queries.get_mut(&QueryId(req.query)) else {
                    return true;
                };
                let reduces: Vec<ReducePartition> = wq.reduces.keys().copied().collect();
                for r in reduces {
                    let entry = wq.pending_reduces.entry((req.batch, r)).or_default();
                    entry.launched = true;
                    entry.trigger.get_or_insert_with(Instant::now);
                    entry.notices = req.notices.clone();
                    self.shared
                        .counters
                        .reduces_started_by_coordinator
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        true
    }

    fn add_notice(&mut self, notice: pb::MapOutputReady) {
        let qid = QueryId(notice.query);
        let Some(wq) = self
            .queries
            .get_mut(&qid)
            .filter(|wq| notice.attempt <= wq.attempt)
        else {
            // The launch of this group (or attempt) may still be on its way.
            let early = self.early.entry(qid).or_default();
            if early.len() < 1 << 16 {
                early.push(notice);
            }
            return;
        };
        if !wq.accepts(&notice) || !wq.token.matches(&notice.token) {
            // fenced: an older generation, not the partition's owner, or
            // not from a worker of this query
            return;
        }
        for (r, state) in &wq.reduces {
            if state.last_batch.is_some_and(|l| notice.batch <= l) {
                continue; // this partition is past that batch (a recovery's replay)
            }
            let entry = wq.pending_reduces.entry((notice.batch, *r)).or_default();
            let before = entry.runnable(&wq.shuffle_inputs);
            entry.add(notice.clone());
            if !before && entry.runnable(&wq.shuffle_inputs) {
                self.shared
                    .counters
                    .reduces_started_by_notices
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn launch(&mut self, req: pb::LaunchGroupRequest) -> Result<()> {
        let qid = QueryId(req.query);
        let mode = SchedulingMode::try_from(req.mode).unwrap_or(SchedulingMode::Drizzle);
        // The generation's first attempt: 0 from a coordinator that does not say.
        let generation = if req.generation == 0 {
            req.attempt
        } else {
            req.generation
        };
        let mut continued = false;
        match self.queries.get(&qid).map(|wq| wq.attempt) {
            Some(a) if a > req.attempt => return Ok(()), // stale
            Some(a) if a < req.attempt && a >= generation => {
                // Recovery of lost work: this worker keeps its partitions,
                // their state and its retained map outputs.
                continued = true;
            }
            Some(a) if a < req.attempt => {
                // A new generation (a rebalance, or a rollback): start over
                // from its checkpoint.
                self.queries.remove(&qid);
                self.shared.store.drop_query(qid);
            }
            _ => {}
        }
        // Partitions created by this launch are adopted from a lost worker
        // when the attempt continues a generation.
        let adopting = req.attempt > generation;
        let fresh = !self.queries.contains_key(&qid);
        if fresh {
            if req.plan.is_empty() {
                return Err(ExecError::Unavailable {
                    message: format!("launch of query {qid} arrived without its plan"),
                });
            }
            let plan = drizzle_planner::decode_plan(&req.plan, &self.shared.task_ctx)?;
            let inputs = plan
                .inputs()
                .into_iter()
                .map(|input| {
                    let schema = input
                        .window
                        .as_ref()
                        .map(|w| drizzle_planner::codec::input_schema(&input.stream, Some(w)));
                    (input, schema)
                })
                .collect();
            self.queries.insert(
                qid,
                WorkerQuery {
                    plan,
                    inputs,
                    mode,
                    shuffle_inputs: if req.shuffle_inputs.is_empty() {
                        vec![req.map_partitions]
                    } else {
                        req.shuffle_inputs.clone()
                    },
                    reduce_partitions: req.reduce_partitions,
                    reduce_placement: req.reduce_placement.clone(),
                    tables: RemoteTables {
                        shared: Arc::clone(&self.shared),
                        query: qid,
                    },
                    maps: BTreeMap::new(),
                    reduces: BTreeMap::new(),
                    pending_maps: BTreeMap::new(),
                    pending_reduces: BTreeMap::new(),
                    groups: BTreeMap::new(),
                    group_starts: BTreeMap::new(),
                    group_ends: BTreeMap::new(),
                    attempt: req.attempt,
                    generation,
                    map_owners: Vec::new(),
                    retain: false,
                    produced: BTreeMap::new(),
                    rows_in: 0,
                    late_rows: 0,
                    memory_limit: 0,
                    delta_bases: BTreeMap::new(),
                    token: QueryToken::default(),
                },
            );
        }
        let Some(wq) = self.queries.get_mut(&qid) else {
            return Ok(());
        };
        wq.generation = generation;
        wq.memory_limit = req.memory_limit;
        if let Some(token) = QueryToken::from_slice(&req.query_token) {
            wq.token = token;
            self.shared.store.set_token(qid, token);
        }
        if !req.map_owners.is_empty() {
            wq.map_owners = req.map_owners.clone();
        }
        if !req.reduce_placement.is_empty() {
            wq.reduce_placement = req.reduce_placement.clone();
        }
        wq.retain = req.retain_blocks;
        self.shared.store.retain(qid, req.retain_blocks);
        if let Some(covered) = req.covered_through {
            // A checkpoint covers these batches: no recovery reads them again.
            self.shared.store.drop_through(qid, covered);
            wq.produced = wq.produced.split_off(&(covered.saturating_add(1), 0, 0));
        }
        if continued {
            // The attempt's launch replaces every task not yet run; a lost
            // worker's notices are void (its partitions run elsewhere now).
            wq.attempt = req.attempt;
            wq.pending_maps.clear();
            wq.groups.clear();
            wq.group_starts.clear();
            wq.group_ends.clear();
            wq.delta_bases.clear();
            let owners = (
                wq.generation,
                wq.map_owners.clone(),
                wq.shuffle_inputs.clone(),
            );
            let reduces = &wq.reduces;
            wq.pending_reduces.retain(|(b, r), p| {
                p.notices
                    .retain(|n| accepts_notice(n, owners.0, &owners.1, &owners.2));
                reduces
                    .get(r)
                    .is_some_and(|s| s.last_batch.is_none_or(|l| *b > l))
            });
        }
        // A partition created here starts after the checkpoint it restores
        // from (or at the query's start).
        let restored_batch = req.restore.as_ref().map(|r| r.batch);
        let mut tasks = 0usize;
        let batches: Vec<(u64, (Instant, i64))> = req
            .batches
            .iter()
            .map(|b| (b.batch, (instant_of(b.trigger_unix_us), b.trigger_unix_us)))
            .collect();
        for spec in &req.map_tasks {
            let p = MapPartition(spec.partition);
            let key = (spec.stage, p);
            if !wq.maps.contains_key(&key) {
                let Some(start) = spec.start_offset else {
                    return Err(ExecError::invalid(format!(
                        "map partition {p} of stage {} arrived without its start",
                        spec.stage
                    )));
                };
                let Some((input, _)) = wq.inputs.get(spec.stage as usize) else {
                    return Err(ExecError::invalid(format!(
                        "map stage {} does not exist",
                        spec.stage
                    )));
                };
                let source = match input.stream.connector() {
                    Some("datagen") => TaskSource::Datagen(
                        Arc::new(DatagenSource::new(&input.stream)?),
                        spec.partition,
                    ),
                    _ => TaskSource::Log(spec.stage, spec.partition),
                };
                if adopting {
                    self.shared
                        .counters
                        .partitions_adopted
                        .fetch_add(1, Ordering::Relaxed);
                }
                wq.maps.insert(
                    key,
                    MapState {
                        source,
                        last_batch: restored_batch,
                        next_offset: start,
                        window: WindowAssignExec {
                            max_event_us: spec.max_event_us,
                        },
                        joins: JoinCache::default(),
                    },
                );
            }
            let last = wq.maps.get(&key).and_then(|m| m.last_batch);
            for (b, at) in &batches {
                if last.is_none_or(|l| *b > l) {
                    wq.pending_maps.insert((*b, spec.stage, p), *at);
                    tasks += 1;
                }
            }
        }
        for r in &req.reduce_tasks {
            let r = ReducePartition(*r);
            if !wq.reduces.contains_key(&r) {
                let mut state = ReduceState {
                    agg: wq.plan.aggregate.clone().map(AggregateFinalExec::new),
                    join: wq.plan.join.clone().map(WindowJoinExec::new),
                    joins: JoinCache::default(),
                    last_batch: None,
                };
                if adopting {
                    self.shared
                        .counters
                        .partitions_adopted
                        .fetch_add(1, Ordering::Relaxed);
                }
                if let Some(restore) = &req.restore {
                    restore_reduce(
                        &self.shared,
                        qid,
                        &wq.plan,
                        restore,
                        r,
                        wq.reduce_partitions,
                        &mut state,
                    )?;
                }
                wq.reduces.insert(r, state);
            }
            let last = wq.reduces.get(&r).and_then(|s| s.last_batch);
            for (b, (at, _)) in &batches {
                if last.is_some_and(|l| *b <= l) {
                    continue;
                }
                tasks += 1;
                let entry = wq.pending_reduces.entry((*b, r)).or_default();
                entry.trigger = Some(*at);
                if mode == SchedulingMode::Drizzle {
                    // Pre-scheduled: runnable once every notice is in.
                    entry.launched = true;
                    if entry.runnable(&wq.shuffle_inputs) {
                        self.shared
                            .counters
                            .reduces_started_by_notices
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if tasks > 0 {
            if let Some((first, _)) = batches.first() {
                wq.group_starts.insert(*first, req.group);
            }
            if let Some((last, _)) = batches.last() {
                wq.group_ends.insert(req.group, (*last, req.checkpoint));
                wq.delta_bases.insert(req.group, req.delta_base);
            }
            wq.groups.insert(
                req.group,
                GroupProgress {
                    left: tasks,
                    tasks: tasks as u64,
                    ranges: Vec::new(),
                    maps: Vec::new(),
                },
            );
        }
        if continued {
            // Reduce partitions restored elsewhere need this worker's map
            // outputs of every batch since the checkpoint: announce them again
            // to every consumer (a consumer past a batch ignores its notice).
            let mut targets = wq.reduce_placement.clone();
            targets.sort();
            targets.dedup();
            let again: Vec<pb::MapOutputReady> = wq
                .produced
                .values()
                .map(|n| pb::MapOutputReady {
                    attempt: req.attempt,
                    ..n.clone()
                })
                .collect();
            for n in again {
                for t in &targets {
                    self.send_notice(t, n.clone())?;
                }
            }
        }
        if let Some(early) = self.early.remove(&qid) {
            for n in early {
                // Older generations' notices are dropped by add_notice;
                // newer attempts' wait in `early` again.
                self.add_notice(n);
            }
        }
        Ok(())
    }

    /// Sends a notice to the consumer worker at `target` (this worker's own
    /// consumers get it directly).
    fn send_notice(&mut self, target: &str, notice: pb::MapOutputReady) -> Result<()> {
        self.shared
            .counters
            .notices_sent
            .fetch_add(1, Ordering::Relaxed);
        if target == self.shared.address {
            self.shared
                .counters
                .notices_received
                .fetch_add(1, Ordering::Relaxed);
            self.add_notice(notice);
            Ok(())
        } else {
            self.shared.notify(target, notice)
        }
    }

    /// The next runnable task, or how long to wait (None = until a message).
    fn next_task(&self, now: Instant) -> std::result::Result<Task, Option<Instant>> {
        let mut best: Option<(Instant, u8, Task)> = None;
        let mut wake: Option<Instant> = None;
        for (qid, wq) in &self.queries {
            // Ready consumers: launched, every input's notices in, and the
            // partition's previous batch done (notices of later batches can
            // overtake earlier ones on the network; reduce state must see
            // batches in order).
            if let Some(((b, r), p)) = wq.next_reduce() {
                let at = p.trigger.unwrap_or(now);
                if best.as_ref().is_none_or(|(t, k, _)| (at, 0) < (*t, *k)) {
                    best = Some((at, 0, Task::Reduce(*qid, *b, *r)));
                }
            }
            if let Some(((b, s, p), (at, _))) = wq.pending_maps.iter().next() {
                if *at <= now {
                    if best.as_ref().is_none_or(|(t, k, _)| (*at, 1) < (*t, *k)) {
                        best = Some((*at, 1, Task::Map(*qid, *b, *s, *p)));
                    }
                } else {
                    wake = Some(wake.map_or(*at, |w: Instant| w.min(*at)));
                }
            }
        }
        match best {
            Some((_, _, t)) => Ok(t),
            None => Err(wake),
        }
    }

    fn fail(&mut self, qid: QueryId, batch: BatchId, e: ExecError) {
        tracing::warn!(query = %qid, batch = batch.0, "task failed: {e}");
        let (code, message) = (self.shared.classify)(e);
        let output = pb::TaskOutput {
            query: qid.0,
            batch: batch.0,
            error: Some(message),
            error_code: code,
            attempt: self.queries.get(&qid).map_or(0, |wq| wq.attempt),
            ..Default::default()
        };
        self.shared.event(pb::worker_event::Event::Output(output));
        self.queries.remove(&qid);
        self.shared.store.drop_query(qid);
    }

    fn run_task(&mut self, task: Task) {
        let (qid, b) = match &task {
            Task::Map(q, b, _, _) | Task::Reduce(q, b, _) => (*q, *b),
        };
        // A panic in an operator fails the query, never the worker.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match task {
            Task::Map(q, b, s, p) => self.run_map(q, b, s, p),
            Task::Reduce(q, b, r) => self.run_reduce(q, b, r),
        }))
        .unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(query = %qid, batch = b, "task panicked: {message}");
            Err(ExecError::Unavailable {
                message: format!("a task of query {qid} failed internally: {message}"),
            })
        });
        if let Err(e) = result {
            self.fail(qid, BatchId(b), e);
            return;
        }
        let Some(wq) = self.queries.get_mut(&qid) else {
            return;
        };
        // Per-group report once all of this worker's tasks of the group are done.
        let group = group_of(&wq.group_starts, b);
        let Some(progress) = wq.groups.get_mut(&group) else {
            return;
        };
        progress.left = progress.left.saturating_sub(1);
        if progress.left > 0 {
            return;
        }
        let progress = wq.groups.remove(&group).unwrap_or_default();
        wq.group_starts.retain(|_, g| *g != group);
        wq.group_ends.remove(&group);
        wq.delta_bases.remove(&group);
        let report = pb::GroupReport {
            attempt: wq.attempt,
            maps: progress.maps,
            query: qid.0,
            group,
            worker: self.shared.worker_id(),
            epoch: self.shared.identity.lock().1,
            ranges: progress.ranges,
            rows_in: std::mem::take(&mut wq.rows_in),
            late_rows: std::mem::take(&mut wq.late_rows),
            tasks: progress.tasks,
        };
        self.shared
            .event(pb::worker_event::Event::GroupReport(report));
    }

    /// The rows of the batch triggered at `until_us`, from `from` on.
    fn read_source(
        shared: &Shared,
        qid: QueryId,
        source: &TaskSource,
        from: u64,
        until_us: i64,
    ) -> Result<(u64, Vec<RecordBatch>)> {
        match source {
            TaskSource::Datagen(g, p) => {
                let to = g
                    .available(*p, until_us)
                    .min(from.saturating_add(MAX_BATCH_ROWS))
                    .max(from);
                if to == from {
                    return Ok((to, Vec::new()));
                }
                Ok((to, vec![g.generate(*p, from, to)?]))
            }
            TaskSource::Log(stage, p) => {
                let mut client = shared.coordinator.clone();
                let req = pb::ReadSourceRequest {
                    query: qid.0,
                    stage: *stage,
                    partition: *p,
                    from,
                    max_rows: MAX_BATCH_ROWS,
                    until_unix_us: until_us,
                };
                let resp = shared
                    .handle
                    .block_on(async move { client.read_source(req).await })
                    .map_err(|s| rpc_error("reading the stream log", s))?
                    .into_inner();
                Ok((resp.to.max(from), from_ipc(resp.ipc)?))
            }
        }
    }

    fn run_map(&mut self, qid: QueryId, b: u64, stage: u32, p: MapPartition) -> Result<()> {
        self.shared
            .counters
            .map_tasks_run
            .fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(&self.shared);
        let Some(wq) = self.queries.get_mut(&qid) else {
            return Ok(());
        };
        let until = wq
            .pending_maps
            .remove(&(b, stage, p))
            .map_or_else(unix_us, |(_, t)| t);
        let Some(state) = wq.maps.get_mut(&(stage, p)) else {
            return Err(ExecError::invalid(format!(
                "map partition {p} of stage {stage} not on this worker"
            )));
        };
        let from = state.next_offset;
        let (to, pieces) = Self::read_source(&shared, qid, &state.source, from, until)?;
        state.next_offset = to;
        state.last_batch = Some(b);
        wq.rows_in += to - from;
        let plan = &wq.plan;
        let Some((input, window_schema)) = wq.inputs.get(stage as usize) else {
            return Err(ExecError::invalid(format!(
                "map stage {stage} does not exist"
            )));
        };
        let mut outputs = Vec::with_capacity(pieces.len());
        for piece in pieces {
            let mut batch = piece;
            if let (Some(spec), Some(schema)) = (&input.window, window_schema) {
                let assigned = state.window.assign(spec, schema, &batch)?;
                wq.late_rows += assigned.late;
                batch = assigned.batch;
            }
            let mut out = apply_ops(&input.map_ops, batch, &mut state.joins, &wq.tables)?;
            if let Some(agg) = &plan.aggregate {
                out = partial_aggregate(agg, &out)?;
            }
            if out.num_rows() > 0 {
                outputs.push(out);
            }
        }
        let watermark_us = input
            .window
            .as_ref()
            .and_then(|spec| state.window.watermark_us(spec));
        let group = group_of(&wq.group_starts, b);
        let checkpoint = wq.group_ends.get(&group) == Some(&(b, true));
        if let Some(progress) = wq.groups.get_mut(&group) {
            progress.ranges.push(pb::SourceRange {
                batch: b,
                partition: p.0,
                from,
                to,
                stage,
            });
            if checkpoint {
                progress.maps.push(pb::MapState {
                    batch: b,
                    stage,
                    partition: p.0,
                    next_offset: to,
                    max_event_us: state.window.max_event_us,
                });
            }
        }
        // What the shuffle hashes on.
        let by: Vec<ShuffleKey> = match shuffle_keys(plan, stage) {
            Some(by) => by,
            None => {
                // Map-only plan: this is the final stage.
                let schema = outputs
                    .first()
                    .map(|o| o.schema())
                    .unwrap_or_else(|| Arc::clone(&plan.output_schema));
                let batch = arrow::compute::concat_batches(&schema, &outputs)?;
                let out = apply_ops(&plan.post_ops, batch, &mut state.joins, &wq.tables)?;
                let chunks = vec![(None, out)];
                let (rows_in, late) = (
                    std::mem::take(&mut wq.rows_in),
                    std::mem::take(&mut wq.late_rows),
                );
                return self.deliver(qid, BatchId(b), p.0, chunks, rows_in, late);
            }
        };
        let parts_n = wq.reduce_partitions as usize;
        let mut per_reduce: Vec<Vec<RecordBatch>> = vec![Vec::new(); parts_n];
        for out in &outputs {
            let parts = route(out, &by, parts_n)?;
            for (r, part) in parts.into_iter().enumerate() {
                if part.num_rows() > 0 {
                    per_reduce[r].push(part);
                }
            }
        }
        let mut rows = vec![0u32; parts_n];
        for (r, parts) in per_reduce.iter().enumerate() {
            let Some(first) = parts.first() else {
                continue;
            };
            rows[r] = parts.iter().map(|b| b.num_rows() as u32).sum();
            let bytes = drizzle_shuffle::encode_block(&first.schema(), parts)?;
            let id = BlockId {
                query: qid,
                batch: BatchId(b),
                stage: StageId(stage),
                map: p,
                reduce: ReducePartition(r as u32),
            };
            self.shared.store.put(id, bytes);
        }
        let notice = pb::MapOutputReady {
            query: qid.0,
            batch: b,
            stage,
            map: p.0,
            rows,
            watermark_us,
            location: self.shared.address.clone(),
            worker: self.shared.worker_id(),
            attempt: wq.attempt,
            token: wq.token.0.to_vec(),
        };
        if wq.mode == SchedulingMode::Bsp {
            // BSP: the coordinator collects every map task's notice and
            // launches the reduce tasks itself.
            self.shared.event(pb::worker_event::Event::MapDone(notice));
            return Ok(());
        }
        if wq.retain {
            // Kept with the blocks, to announce again after a recovery.
            wq.produced.insert((b, stage, p.0), notice.clone());
        }
        // One notice per consumer worker, pushed directly (no coordinator).
        let mut targets = wq.reduce_placement.clone();
        targets.sort();
        targets.dedup();
        for t in targets {
            self.send_notice(&t, notice.clone())?;
        }
        Ok(())
    }

    fn fetch(
        &self,
        qid: QueryId,
        b: u64,
        r: ReducePartition,
        n: &pb::MapOutputReady,
    ) -> Result<Vec<RecordBatch>> {
        let id = BlockId {
            query: qid,
            batch: BatchId(b),
            stage: StageId(n.stage),
            map: MapPartition(n.map),
            reduce: r,
        };
        if n.location == self.shared.address {
            // Our own block: no network.
            self.shared
                .counters
                .blocks_read_local
                .fetch_add(1, Ordering::Relaxed);
            let bytes = self.shared.store.read(&id)?;
            return Ok(drizzle_shuffle::decode_block(&bytes)?);
        }
        self.shared
            .counters
            .blocks_fetched_remote
            .fetch_add(1, Ordering::Relaxed);
        let mut client =
            crate::cluster::flight_client(self.shared.peer(&n.location)?, &self.shared.secret);
        let location = n.location.clone();
        let token = self
            .queries
            .get(&qid)
            .map(|wq| wq.token)
            .unwrap_or_default();
        Ok(self.shared.handle.block_on(async move {
            // A producer cut off by a partition never answers: bound the wait.
            tokio::time::timeout(
                FETCH_TIMEOUT,
                drizzle_shuffle::fetch_block(&mut client, &location, id, &token),
            )
            .await
            .unwrap_or_else(|_| {
                Err(drizzle_shuffle::ShuffleError::Fetch {
                    block: id.to_string(),
                    location: location.clone(),
                    message: format!("no answer within {FETCH_TIMEOUT:?}"),
                })
            })
        })?)
    }

    /// A block of `failed`'s producer could not be pulled: the producer's
    /// outputs are lost. The task goes back to waiting, every notice of that
    /// producer is forgotten, and the coordinator hears of it: it re-runs
    /// the producer's partitions elsewhere, whose notices then come again.
    fn fetch_failed(
        &mut self,
        qid: QueryId,
        b: u64,
        r: ReducePartition,
        mut pending: PendingReduce,
        failed: &pb::MapOutputReady,
        e: ExecError,
    ) {
        tracing::warn!(query = %qid, batch = b, producer = failed.worker, location = %failed.location, "fetch failed: {e}");
        self.shared
            .counters
            .fetch_failures
            .fetch_add(1, Ordering::Relaxed);
        let Some(wq) = self.queries.get_mut(&qid) else {
            return;
        };
        pending.notices.retain(|n| n.worker != failed.worker);
        wq.pending_reduces.insert((b, r), pending);
        for p in wq.pending_reduces.values_mut() {
            p.notices.retain(|n| n.worker != failed.worker);
        }
        let event = pb::FetchFailed {
            query: qid.0,
            attempt: wq.attempt,
            batch: b,
            producer: failed.worker,
            location: failed.location.clone(),
            message: e.to_string(),
        };
        self.shared
            .event(pb::worker_event::Event::FetchFailed(event));
    }

    fn run_reduce(&mut self, qid: QueryId, b: u64, r: ReducePartition) -> Result<()> {
        let Some(wq) = self.queries.get_mut(&qid) else {
            return Ok(());
        };
        let mut pending = wq.pending_reduces.remove(&(b, r)).unwrap_or_default();
        pending.notices.sort_by_key(|n| (n.stage, n.map));
        let mut partials = Vec::new();
        let mut failed = None;
        for n in &pending.notices {
            if n.rows.get(r.0 as usize).copied().unwrap_or(0) == 0 {
                continue;
            }
            let stage = n.stage;
            match self.fetch(qid, b, r, n) {
                Ok(batches) => partials.extend(batches.into_iter().map(|b| (stage, b))),
                // Another worker's block: its producer is gone, not the query.
                Err(e) if n.location != self.shared.address => {
                    failed = Some((n.clone(), e));
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        if let Some((n, e)) = failed {
            self.fetch_failed(qid, b, r, pending, &n, e);
            return Ok(());
        }
        self.shared
            .counters
            .reduce_tasks_run
            .fetch_add(1, Ordering::Relaxed);
        let Some(wq) = self.queries.get_mut(&qid) else {
            return Ok(());
        };
        let Some(state) = wq.reduces.get_mut(&r) else {
            return Err(ExecError::invalid(format!(
                "reduce partition {r} not on this worker"
            )));
        };
        if state.last_batch.is_some_and(|l| l >= b) {
            self.shared
                .counters
                .out_of_order_reduces
                .fetch_add(1, Ordering::Relaxed);
        }
        state.last_batch = Some(b);
        let watermark = watermark_of(&pending.notices, wq.shuffle_inputs.len());
        let out = match (state.agg.as_mut(), state.join.as_mut()) {
            (Some(agg), _) => {
                let batches: Vec<RecordBatch> = partials.into_iter().map(|(_, b)| b).collect();
                agg.process(b, &batches, watermark)?
            }
            (None, Some(join)) => {
                let (left, right): (Vec<_>, Vec<_>) =
                    partials.into_iter().partition(|(stage, _)| *stage == 0);
                let left: Vec<RecordBatch> = left.into_iter().map(|(_, b)| b).collect();
                let right: Vec<RecordBatch> = right.into_iter().map(|(_, b)| b).collect();
                join.process(&left, &right, watermark)?
            }
            (None, None) => {
                return Err(ExecError::invalid(
                    "reduce task of a plan without aggregate or join",
                ))
            }
        };
        wq.late_rows += out.late;
        let operator = match (&state.agg, &state.join) {
            (Some(_), _) => format!("AggregateFinalExec (reduce partition {r})"),
            _ => format!("WindowJoinExec (reduce partition {r})"),
        };
        wq.check_budget(&operator, self.shared.store.query_bytes(qid))?;
        let Some(state) = wq.reduces.get_mut(&r) else {
            return Ok(());
        };
        let group = group_of(&wq.group_starts, b);
        if wq.group_ends.get(&group) == Some(&(b, true)) {
            // A checkpoint: snapshot on this thread, write asynchronously.
            let base = wq.delta_bases.get(&group).copied().flatten();
            let bytes = snapshot_reduce(state, base)?;
            let req = pb::SaveStateRequest {
                query: qid.0,
                attempt: wq.attempt,
                batch: b,
                partition: r.0,
                state: bytes,
            };
            let mut client = self.shared.coordinator.clone();
            self.shared.handle.spawn(async move {
                if let Err(s) = client.save_state(req).await {
                    tracing::warn!("saving checkpoint state failed: {}", s.message());
                }
            });
        }
        let mut chunks = Vec::with_capacity(out.chunks.len());
        for (w, batch) in out.chunks {
            chunks.push((
                w,
                apply_ops(&wq.plan.post_ops, batch, &mut state.joins, &wq.tables)?,
            ));
        }
        let late = std::mem::take(&mut wq.late_rows);
        self.deliver(qid, BatchId(b), r.0, chunks, 0, late)
    }

    /// Sends a final-stage task's output to the coordinator's collector.
    fn deliver(
        &self,
        qid: QueryId,
        b: BatchId,
        partition: u32,
        chunks: Vec<(Option<i64>, RecordBatch)>,
        rows_in: u64,
        late_rows: u64,
    ) -> Result<()> {
        let mut out = Vec::with_capacity(chunks.len());
        for (window_end, batch) in chunks {
            out.push(pb::OutputChunk {
                window_end,
                ipc: to_ipc(&batch.schema(), &[batch])?,
            });
        }
        // What a map-only query holds is its lookup tables.
        let state = match self.queries.get(&qid) {
            Some(wq) => wq.check_budget(
                "LookupJoinExec (lookup tables)",
                self.shared.store.query_bytes(qid),
            )?,
            None => StateSize::default(),
        };
        let output = pb::TaskOutput {
            query: qid.0,
            batch: b.0,
            partition,
            chunks: out,
            error: None,
            error_code: String::new(),
            rows_in,
            late_rows,
            attempt: self.queries.get(&qid).map_or(0, |wq| wq.attempt),
            state_bytes: state.bytes,
            state_keys: state.keys,
        };
        self.shared.event(pb::worker_event::Event::Output(output));
        let _ = qid;
        Ok(())
    }
}

/// How long pulling one block may take before its producer counts as lost.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `notice` is valid for a query at `generation` whose map
/// partitions are owned as `owners` says (worker ids, input stages in order,
/// `inputs[s]` partitions in stage `s`; empty: any owner).
fn accepts_notice(
    notice: &pb::MapOutputReady,
    generation: u64,
    owners: &[u32],
    inputs: &[u32],
) -> bool {
    if notice.attempt < generation {
        return false;
    }
    if owners.is_empty() {
        return true;
    }
    let before: u32 = inputs.iter().take(notice.stage as usize).sum();
    owners.get((before + notice.map) as usize) == Some(&notice.worker)
}

/// The watermark a reduce task may act on: per input, the minimum over the
/// map partitions that have seen rows; over inputs, the minimum, and none
/// until every input has one (a join must not close a window before the
/// other side has spoken).
fn watermark_of(notices: &[pb::MapOutputReady], inputs: usize) -> Option<i64> {
    let mut overall: Option<i64> = None;
    for stage in 0..inputs.max(1) {
        let w = notices
            .iter()
            .filter(|n| n.stage as usize == stage)
            .filter_map(|n| n.watermark_us)
            .min()?;
        overall = Some(overall.map_or(w, |o| o.min(w)));
    }
    overall
}

/// What a map stage's shuffle hashes on.
enum ShuffleKey {
    /// The first n columns (an aggregation's group columns).
    Columns(usize),
    /// One column (a window join without other keys: the window bound).
    Column(usize),
    /// An expression (a window join key).
    Expr(Arc<dyn datafusion::physical_expr::PhysicalExpr>),
}

/// What stage `stage`'s shuffle hashes on; `None` for a map-only plan.
fn shuffle_keys(plan: &StreamingPlan, stage: u32) -> Option<Vec<ShuffleKey>> {
    match (&plan.aggregate, &plan.join) {
        (Some(agg), _) => Some(vec![ShuffleKey::Columns(agg.group_exprs.len())]),
        (None, Some(j)) => {
            let (keys, window) = if stage == 0 {
                (&j.left_keys, j.left_window)
            } else {
                (&j.right_keys, j.right_window)
            };
            Some(if keys.is_empty() {
                vec![ShuffleKey::Column(window)]
            } else {
                keys.iter()
                    .map(|k| ShuffleKey::Expr(Arc::clone(k)))
                    .collect()
            })
        }
        (None, None) => None,
    }
}

/// Splits `batch` into `n` reduce partitions by the shuffle keys (no keys:
/// everything to partition 0). Map tasks and re-partitioned state restores
/// route rows the same way.
fn route(batch: &RecordBatch, by: &[ShuffleKey], n: usize) -> Result<Vec<RecordBatch>> {
    let mut keys = Vec::new();
    for k in by {
        match k {
            ShuffleKey::Columns(c) => keys.extend(batch.columns()[..*c].iter().cloned()),
            ShuffleKey::Column(i) => keys.push(Arc::clone(batch.column(*i))),
            ShuffleKey::Expr(e) => keys.push(e.evaluate(batch)?.into_array(batch.num_rows())?),
        }
    }
    if keys.is_empty() {
        let mut v = vec![batch.clone()];
        v.extend((1..n).map(|_| batch.slice(0, 0)));
        return Ok(v);
    }
    Ok(drizzle_shuffle::hash_partition(batch, &keys, n)?)
}

fn encode_section(batches: &[RecordBatch]) -> Result<Vec<u8>> {
    match batches.first() {
        Some(first) => Ok(drizzle_shuffle::encode_block(&first.schema(), batches)?.to_vec()),
        None => Ok(Vec::new()),
    }
}

fn decode_section(bytes: Vec<u8>) -> Result<Vec<RecordBatch>> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    Ok(drizzle_shuffle::decode_block(&bytes::Bytes::from(bytes))?)
}

/// A reduce partition's keyed state as a checkpoint object.
/// A reduce partition's checkpoint object: keyed state as a delta of
/// `delta_base` when there is one (the keys changed since), else in full;
/// a window join's held rows always in full.
fn snapshot_reduce(state: &mut ReduceState, delta_base: Option<u64>) -> Result<Vec<u8>> {
    let object = match (state.agg.as_mut(), state.join.as_ref()) {
        (Some(agg), _) => {
            let (closed_through, rows) = agg.snapshot(delta_base)?;
            StateObject {
                closed_through,
                delta_base,
                sections: vec![encode_section(&rows)?],
            }
        }
        (None, Some(join)) => {
            let (closed_through, left, right) = join.snapshot();
            StateObject {
                closed_through,
                delta_base: None,
                sections: vec![encode_section(&left)?, encode_section(&right)?],
            }
        }
        (None, None) => StateObject::default(),
    };
    object.encode()
}

/// Loads reduce partition `r`'s state from a checkpoint: its own object
/// when the partition count is unchanged, else every object's rows whose
/// key routes to `r` under the new count.
fn restore_reduce(
    shared: &Shared,
    qid: QueryId,
    plan: &StreamingPlan,
    restore: &pb::Restore,
    r: ReducePartition,
    partitions: u32,
    state: &mut ReduceState,
) -> Result<()> {
    let same = restore.reduce_partitions == partitions;
    // Keyed state: every object's layers (chain first), overlaid at the end.
    let mut layers: Vec<(Option<i64>, Vec<RecordBatch>)> = Vec::new();
    for st in restore
        .states
        .iter()
        .filter(|st| !same || st.partition == r.0)
    {
        for path in st.chain.iter().chain(std::iter::once(&st.path)) {
            let mut client = shared.coordinator.clone();
            let req = pb::LoadStateRequest {
                query: qid.0,
                path: path.clone(),
            };
            let bytes = shared
                .handle
                .block_on(async move { client.load_state(req).await })
                .map_err(|s| rpc_error("loading checkpoint state", s))?
                .into_inner()
                .state;
            let object = StateObject::decode(&bytes)?;
            let mut sections = object.sections.into_iter();
            let mut next = |stage: u32| -> Result<Vec<RecordBatch>> {
                let rows = decode_section(sections.next().unwrap_or_default())?;
                if same {
                    return Ok(rows);
                }
                let by = shuffle_keys(plan, stage).unwrap_or_default();
                let mut mine = Vec::with_capacity(rows.len());
                for batch in &rows {
                    let mut parts = route(batch, &by, partitions as usize)?;
                    if (r.0 as usize) < parts.len() {
                        mine.push(parts.swap_remove(r.0 as usize));
                    }
                }
                Ok(mine)
            };
            match (state.agg.as_mut(), state.join.as_mut()) {
                (Some(_), _) => layers.push((object.closed_through, next(0)?)),
                (None, Some(join)) => {
                    let left = next(0)?;
                    let right = next(1)?;
                    join.restore(object.closed_through, &left, &right)?
                }
                (None, None) => {}
            }
        }
    }
    if let Some(agg) = state.agg.as_mut() {
        let (closed_through, rows) = agg.overlay(layers)?;
        agg.restore(closed_through, &rows, restore.batch)?;
    }
    state.last_batch = Some(restore.batch);
    Ok(())
}

fn group_of(starts: &BTreeMap<u64, u64>, b: u64) -> u64 {
    starts
        .range(..=b)
        .next_back()
        .map(|(_, g)| *g)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(stage: u32, map: u32) -> pb::MapOutputReady {
        pb::MapOutputReady {
            query: 1,
            batch: 0,
            stage,
            map,
            ..Default::default()
        }
    }

    #[test]
    fn a_reduce_task_waits_for_every_partition_of_every_input() {
        // A join: input 0 has 3 map partitions, input 1 has 2.
        let inputs = [3, 2];
        let mut p = PendingReduce {
            launched: true,
            ..Default::default()
        };
        for m in 0..3 {
            p.notices.push(notice(0, m));
        }
        assert!(!p.runnable(&inputs), "the second input is missing");
        p.notices.push(notice(1, 0));
        p.notices.push(notice(1, 0));
        assert!(!p.runnable(&inputs), "a repeated notice counts once");
        p.notices.push(notice(1, 1));
        assert!(p.runnable(&inputs));
        p.launched = false;
        assert!(
            !p.runnable(&inputs),
            "not before the launch pre-scheduled it"
        );
    }

    #[test]
    fn a_join_acts_on_a_watermark_only_once_both_inputs_have_one() {
        let with = |stage, map, wm| pb::MapOutputReady {
            watermark_us: wm,
            ..notice(stage, map)
        };
        let left_only = [with(0, 0, Some(50)), with(0, 1, None)];
        assert_eq!(watermark_of(&left_only, 2), None);
        assert_eq!(watermark_of(&left_only, 1), Some(50));
        let both = [with(0, 0, Some(50)), with(1, 0, Some(30)), with(1, 1, None)];
        assert_eq!(watermark_of(&both, 2), Some(30));
    }

    #[test]
    fn notices_are_accepted_from_the_generation_and_the_partition_s_owner() {
        // A join: stage 0 has 2 partitions, stage 1 has 1; owners by worker id.
        let owners = [7, 8, 9];
        let inputs = [2, 1];
        let from = |stage, map, worker, attempt| pb::MapOutputReady {
            worker,
            attempt,
            ..notice(stage, map)
        };
        assert!(accepts_notice(&from(0, 1, 8, 3), 3, &owners, &inputs));
        assert!(accepts_notice(&from(1, 0, 9, 4), 3, &owners, &inputs));
        assert!(
            accepts_notice(&from(0, 0, 7, 3), 3, &owners, &inputs),
            "an older attempt of the same generation"
        );
        assert!(
            !accepts_notice(&from(0, 0, 7, 2), 3, &owners, &inputs),
            "an older generation"
        );
        assert!(
            !accepts_notice(&from(0, 1, 5, 3), 3, &owners, &inputs),
            "a lost worker that no longer owns the partition"
        );
        assert!(!accepts_notice(&from(1, 1, 9, 3), 3, &owners, &inputs));
        assert!(accepts_notice(&from(0, 0, 5, 3), 3, &[], &inputs));
    }

    #[test]
    fn a_repeated_notice_is_kept_once() {
        let mut p = PendingReduce::default();
        p.add(notice(0, 1));
        p.add(notice(0, 1));
        p.add(notice(1, 1));
        assert_eq!(p.notices.len(), 2, "one per (stage, map partition)");
    }

    #[test]
    fn notices_from_one_input_alone_never_start_a_two_input_task() {
        let p = PendingReduce {
            launched: true,
            notices: (0..10).map(|m| notice(0, m)).collect(),
            ..Default::default()
        };
        assert!(p.runnable(&[10]));
        assert!(!p.runnable(&[10, 1]));
    }
}
