//! A worker: the task runtime, its block store, its Arrow Flight endpoint and
//! its local scheduler. Runs inside `drizzle worker` or, for the embedded
//! server, inside `drizzle server` (same protocol, over loopback).
//!
//! ```text
//!  gRPC Worker service ──▶ inbox ──▶ task thread (Scheduler)
//!     LaunchGroup              ▲        source-stage task (b, s, p) at its
//!     MapOutputReady (peers)   │        trigger time, once its read is in;
//!     LaunchReduce (BSP)       │        shuffle-stage task (b, s, r) once
//!  runtime: source reads ──────┤        every partition of every input
//!     (Source, ahead), block   │        stage of s announced b and its
//!     downloads (on notices)   │        remote blocks are downloaded
//!  task slots: Computed ───────┘              │ checks the partition's
//!                   ▲                         │ state out to a slot
//!                   └─────────────────────────┘
//!  BlockStore ◀── map outputs; served to peers by Flight do_get, read
//!                 directly when the consumer is on this worker
//!  outbox ──▶ coordinator: events, results (inline or Flight do_put)
//! ```
//!
//! Tasks run the query's [`StageGraph`] as shipped (`decode_graph`): each
//! runs its stage's steps (`operators::steps`). Reduce-side state, pending
//! tasks and their dependencies are keyed by (stage, partition); a reduce
//! partition `r` is partition `r` of every shuffle stage.
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
//!   ([`SourcePartition::available_at`](crate::sources::SourcePartition::available_at)),
//!   so any batch can be re-run and reads the same rows.
//! * The task thread never waits on the network for a task's inputs: a map
//!   partition's source read ([`Source`]) starts on
//!   the runtime ahead of its task, one at a time per partition and at most
//!   `READ_AHEAD_BATCHES` ahead, and the task runs once its rows are in; a
//!   remote shuffle block starts downloading when its notice arrives, and
//!   its consumer is runnable once every download is in. Finished reads and
//!   downloads come back to the task thread as messages.
//! * A task's rows are put over Flight (`outbox_loop`), several at once;
//!   the group report that covers them follows the puts' acks.
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

use arrow::record_batch::RecordBatch;
use arrow_flight::flight_service_server::FlightServiceServer;
use datafusion::execution::TaskContext;
use drizzle_planner::graph::StageId as GraphStage;
use drizzle_planner::{LookupJoinSpec, Partitioning, StageGraph, StageInput, StageOutput};
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
    coordinator_client, rpc_error, to_ipc, INPUT_STEP, MAX_MESSAGE_BYTES, PROTOCOL_VERSION,
};
use crate::error::{ExecError, Result};
use crate::operators::{
    run_steps, stateful_operator, steps, steps_watermark, ChainState, OperatorSnapshot, StateSize,
    StatefulOperator, Step, StepStats, TableEvaluator, WindowAssignExec,
};
use crate::sources::{open_generator, GeneratedPartition, Source, END_OF_INPUT_US, MAX_BATCH_ROWS};

mod scheduler;
mod service;
mod slots;
mod tasks;
#[allow(unused_imports)]
use self::scheduler::*;
pub(crate) use self::service::new_epoch;
#[allow(unused_imports)]
use self::service::*;
use self::slots::*;
#[allow(unused_imports)]
use self::tasks::*;

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
    /// Task slots: how many tasks run at once (0: one per core).
    pub slots: usize,
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
    /// Task slots.
    pub task_slots: AtomicU64,
    /// The most tasks on slots at once.
    pub peak_tasks_running: AtomicU64,
    /// Empty results sent in a run with later ones (see `TaskOutput.empty_from`).
    pub empty_results_in_runs: AtomicU64,
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
            task_slots: g(&self.task_slots),
            peak_tasks_running: g(&self.peak_tasks_running),
            empty_results_in_runs: g(&self.empty_results_in_runs),
        }
    }
}

enum Msg {
    Launch(Box<pb::LaunchGroupRequest>),
    Notice(pb::MapOutputReady),
    /// A map partition's source read finished (started ahead of its task).
    Read(Box<ReadDone>),
    /// A remote shuffle block finished downloading (started on its notice).
    Fetched(Box<FetchDone>),
    /// A task came back from its slot.
    Computed(Box<Computed>),
    LaunchReduce(pb::LaunchReduceRequest),
    /// Cancel the query's attempts up to this one (0: all).
    Cancel(QueryId, u64),
    /// A lookup table read in the background landed (or failed): tasks
    /// waiting for it may start.
    TableLoaded,
    /// A reduce partition's checkpoint state was loaded.
    Restored(Box<Restored>),
    Shutdown,
}

/// What the worker's threads and RPC handlers share.
struct Shared {
    address: String,
    coordinator: pb::coordinator_client::CoordinatorClient<crate::cluster::ClusterChannel>,
    /// The coordinator's data endpoint (Arrow Flight): source ranges,
    /// tables, state and results.
    data: crate::dataplane::DataClient,
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
    /// What goes to the coordinator: events, and task results put over
    /// Flight (see [`outbox_loop`]).
    outbox: mpsc::UnboundedSender<Outgoing>,
    /// The open Notices stream to each peer.
    notice_streams: Mutex<HashMap<String, mpsc::UnboundedSender<pb::MapOutputReady>>>,
    /// Each query's lookup tables as last read.
    table_caches: Mutex<HashMap<QueryId, Arc<TableCache>>>,
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

/// One thing for the coordinator, in the order the task thread made them.
enum Outgoing {
    Event(pb::worker_event::Event),
    /// A final-stage task's result and its rows (`out.chunks` say how many
    /// rows each chunk has), put over Flight.
    Rows {
        out: pb::TaskOutput,
        schema: arrow::datatypes::SchemaRef,
        batches: Vec<RecordBatch>,
    },
}

/// Sends the outbox: results are put over Flight concurrently, and a group
/// report only once every result before it was acked (so a report never
/// overtakes the results it covers); other events go at once. A put that
/// fails goes inline on the Events stream instead, before the report that
/// covers it: results are never dropped while their report is sent.
async fn outbox_loop(shared: std::sync::Weak<Shared>, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    let mut puts: std::collections::VecDeque<tokio::task::JoinHandle<()>> =
        std::collections::VecDeque::new();
    while let Some(item) = rx.recv().await {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        while puts.front().is_some_and(|h| h.is_finished()) {
            puts.pop_front();
        }
        match item {
            Outgoing::Event(e @ pb::worker_event::Event::GroupReport(_)) => {
                for put in puts.drain(..) {
                    let _ = put.await;
                }
                shared.send_event(e);
            }
            Outgoing::Event(e) => shared.send_event(e),
            Outgoing::Rows {
                out,
                schema,
                batches,
            } => {
                let shared = Arc::clone(&shared);
                puts.push_back(tokio::spawn(async move {
                    let put = shared
                        .data
                        .put_output(out.clone(), Arc::clone(&schema), batches.clone())
                        .await;
                    if let Err(e) = put {
                        // Inline, unless that would be a control message
                        // over its bound (which would break the stream): the
                        // task fails instead.
                        let bytes: usize = batches.iter().map(|b| b.get_array_memory_size()).sum();
                        if bytes > MAX_MESSAGE_BYTES / 2 {
                            tracing::error!("putting a task's results ({bytes} bytes) failed: {e}");
                            let failed = pb::TaskOutput {
                                query: out.query,
                                batch: out.batch,
                                attempt: out.attempt,
                                error: Some(format!(
                                    "a task's results ({bytes} bytes) could not be delivered: {e}"
                                )),
                                error_code: "53000".into(),
                                ..Default::default()
                            };
                            shared.send_event(pb::worker_event::Event::Output(failed));
                            return;
                        }
                        tracing::warn!("putting a task's results failed, sending them inline: {e}");
                        match inline_output(out, &schema, &batches) {
                            Ok(out) => shared.send_event(pb::worker_event::Event::Output(out)),
                            Err(e) => tracing::error!("encoding a task's results failed: {e}"),
                        }
                    }
                }));
            }
        }
    }
}

/// `out` with its rows inline (`chunks[i].ipc`), the rows split by
/// `chunks[i].rows`.
fn inline_output(
    mut out: pb::TaskOutput,
    schema: &arrow::datatypes::SchemaRef,
    batches: &[RecordBatch],
) -> Result<pb::TaskOutput> {
    let all = arrow::compute::concat_batches(schema, batches)?;
    let mut at = 0usize;
    for c in &mut out.chunks {
        let rows = (c.rows as usize).min(all.num_rows().saturating_sub(at));
        c.ipc = to_ipc(schema, &[all.slice(at, rows)])?;
        c.rows = 0;
        at += rows;
    }
    Ok(out)
}

impl Shared {
    /// Reports to the coordinator (a group report after every result sent
    /// before it).
    fn event(&self, event: pb::worker_event::Event) {
        let _ = self.outbox.send(Outgoing::Event(event));
    }

    /// Sends a final-stage task's rows (over Flight), then its result.
    fn rows(
        &self,
        out: pb::TaskOutput,
        schema: arrow::datatypes::SchemaRef,
        batches: Vec<RecordBatch>,
    ) {
        let _ = self.outbox.send(Outgoing::Rows {
            out,
            schema,
            batches,
        });
    }

    /// Sends on the long-lived Events stream now (opened, or reopened
    /// after a failure, on demand).
    fn send_event(&self, event: pb::worker_event::Event) {
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

    /// Asks again, in the background, for every lookup table a query here
    /// holds (with the version held: the coordinator answers "unchanged"
    /// for a table whose relations did not change).
    fn refresh_tables(&self) {
        let caches: Vec<(QueryId, Arc<TableCache>)> = self
            .table_caches
            .lock()
            .iter()
            .map(|(q, c)| (*q, Arc::clone(c)))
            .collect();
        for (query, cache) in caches {
            let held: Vec<(u32, u64)> = cache
                .tables
                .lock()
                .iter()
                .map(|(join, (v, _))| (*join, *v))
                .collect();
            for (join, version) in held {
                let data = self.data.clone();
                let cache = Arc::clone(&cache);
                self.handle.spawn(async move {
                    let req = pb::ReadTableRequest {
                        query: query.0,
                        join,
                        held_version: Some(version),
                    };
                    match data.read_table(req).await {
                        Ok(Some((v, rows))) => cache.offer(join, v, &rows),
                        Ok(None) => {}
                        // The join reads it itself when it needs it.
                        Err(e) => {
                            tracing::debug!("refreshing a lookup table failed: {e}");
                            cache.read_failed(join);
                        }
                    }
                });
            }
        }
    }

    /// Reads a new query's lookup tables in the background, so that no
    /// task waits on the network for them: a task of a stage with a lookup
    /// join starts once its tables are in (`WorkerQuery::tables_in`); the
    /// scheduler hears when one lands.
    fn prefetch_tables(self: &Arc<Self>, query: QueryId, cache: &Arc<TableCache>, joins: Vec<u32>) {
        for join in joins {
            if cache.has(join) {
                continue;
            }
            let shared = Arc::clone(self);
            let cache = Arc::clone(cache);
            self.handle.spawn(async move {
                let req = pb::ReadTableRequest {
                    query: query.0,
                    join,
                    held_version: None,
                };
                match shared.data.read_table(req).await {
                    Ok(Some((v, rows))) => cache.offer(join, v, &rows),
                    Ok(None) => cache.read_failed(join),
                    Err(e) => {
                        tracing::debug!("reading a lookup table failed: {e}");
                        cache.read_failed(join);
                    }
                }
                shared.send(Msg::TableLoaded);
            });
        }
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
        self.send_event(pb::worker_event::Event::Hello(pb::Hello { worker, epoch }));
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
    let (outbox, outbox_rx) = mpsc::unbounded_channel();
    let store = Arc::new(BlockStore::new());
    let credential = crate::cluster::ClusterSecret::credential_slot(None);
    let member = config
        .cluster_secret
        .with_credential(Arc::clone(&credential));
    let shared = Arc::new(Shared {
        data: crate::dataplane::DataClient::new(
            crate::cluster::channel(&config.coordinator)?,
            &member,
        ),
        address: address.clone(),
        coordinator: coordinator_client(&config.coordinator, &member)?,
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
        outbox,
        notice_streams: Mutex::new(HashMap::new()),
        table_caches: Mutex::new(HashMap::new()),
    });
    tokio::spawn(outbox_loop(Arc::downgrade(&shared), outbox_rx));
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
    let slots = Slots::start(
        match config.slots {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        },
        shared.handle.clone(),
    )?;
    shared
        .counters
        .task_slots
        .store(slots.size as u64, Ordering::Relaxed);
    let thread = std::thread::Builder::new()
        .name("drizzle-tasks".into())
        .stack_size(crate::THREAD_STACK_BYTES)
        .spawn(move || Scheduler::new(thread_shared, slots).run(rx))
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

/// How often a worker heartbeats.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);

/// The finite side of lookup joins, fetched from the coordinator.
#[derive(Clone)]
struct RemoteTables {
    shared: Arc<Shared>,
    query: QueryId,
    cache: Arc<TableCache>,
}

/// A query's lookup tables on this worker, as last read (by join id:
/// version and rows). When the coordinator signals a change, each is asked
/// for again in the background ([`Shared::refresh_tables`]), so a join
/// usually finds its new rows here instead of waiting on the network.
#[derive(Default)]
struct TableCache {
    tables: Mutex<HashMap<u32, (u64, Vec<RecordBatch>)>>,
    /// Joins whose background read failed: the join reads its table itself
    /// (the one read that waits on the network, on a slot).
    failed: Mutex<std::collections::HashSet<u32>>,
    /// Bumped when newer rows land or a read fails: joins look again.
    landed: AtomicU64,
}

impl TableCache {
    /// Keeps `rows` at `version` unless a newer version is in.
    fn offer(&self, join: u32, version: u64, rows: &[RecordBatch]) {
        let mut tables = self.tables.lock();
        if tables.get(&join).is_none_or(|(v, _)| *v < version) {
            tables.insert(join, (version, rows.to_vec()));
            self.failed.lock().remove(&join);
            self.landed.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// A background read of `join`'s table failed.
    fn read_failed(&self, join: u32) {
        self.failed.lock().insert(join);
        self.landed.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether a task reading `join` may start: its table is in, or its
    /// background read failed (the join then reads it itself).
    fn has(&self, join: u32) -> bool {
        self.tables.lock().contains_key(&join) || self.failed.lock().contains(&join)
    }

    /// Bytes held.
    fn bytes(&self) -> u64 {
        self.tables
            .lock()
            .values()
            .flat_map(|(_, rows)| rows)
            .map(|b| b.get_array_memory_size() as u64)
            .sum()
    }
}

/// A built-in stream's log partition, read by range from the server's
/// Flight endpoint (the server checks the range against the batch's
/// trigger time, so a replay reads the same rows).
struct LogRange {
    data: crate::dataplane::DataClient,
    query: QueryId,
    /// The source stage, and the partition of its stream.
    stage: u32,
    partition: u32,
}

impl Source for LogRange {
    fn read(
        &self,
        from: u64,
        until_unix_us: i64,
    ) -> futures::future::BoxFuture<'static, Result<(u64, Vec<RecordBatch>)>> {
        let data = self.data.clone();
        let req = pb::ReadSourceRequest {
            query: self.query.0,
            stage: self.stage,
            partition: self.partition,
            from,
            max_rows: MAX_BATCH_ROWS,
            until_unix_us,
        };
        Box::pin(async move { data.read_source(req).await })
    }
}

/// A source read's outcome: (one past the last row, the rows).
type ReadResult = Result<(u64, Vec<RecordBatch>)>;

/// A finished source read, for the task thread.
struct ReadDone {
    query: QueryId,
    stage: u32,
    partition: MapPartition,
    batch: u64,
    /// The read's id ([`ReadAhead::in_flight`]): a read of a partition
    /// replaced since is dropped.
    id: u64,
    result: ReadResult,
}

/// A finished block download, for the task thread.
/// A reduce partition's checkpoint objects were loaded (or not): the
/// scheduler restores its state, and its tasks may start.
struct Restored {
    query: QueryId,
    /// The query's incarnation that asked (a replaced one's are dropped).
    incarnation: u64,
    stage: u32,
    partition: ReducePartition,
    restore: pb::Restore,
    /// Reduce partitions of the attempt that restores.
    partitions: u32,
    result: Result<Vec<(u32, Vec<u8>)>>,
}

struct FetchDone {
    query: QueryId,
    /// The consuming task: (batch, stage, partition).
    task: (u64, u32, ReducePartition),
    notice: pb::MapOutputReady,
    result: Result<Vec<RecordBatch>>,
}

/// A map partition's reads, started ahead of its tasks: at most one in
/// flight, and at most [`READ_AHEAD_BATCHES`] done and waiting.
#[derive(Default)]
struct ReadAhead {
    /// (batch, read id, from, trigger time) of the read in flight.
    in_flight: Option<(u64, u64, u64, i64)>,
    /// Where the next read starts (the end of the last one); `None`: at
    /// the partition's position.
    cursor: Option<u64>,
    /// Finished reads by batch: (from, trigger time, outcome).
    done: BTreeMap<u64, (u64, i64, ReadResult)>,
}

/// How many finished reads a map partition may hold ahead of its tasks.
/// One is enough to overlap a batch's read with the previous batch's
/// work; each more would hold another batch of rows in memory.
const READ_AHEAD_BATCHES: usize = 1;

/// How long before its trigger time a map task's read may start (the
/// server answers once the trigger time has passed).
const READ_AHEAD: Duration = Duration::from_millis(100);

struct MapState {
    source: Arc<dyn Source>,
    read: ReadAhead,
    /// The last batch this partition ran (or its checkpoint covers).
    last_batch: Option<u64>,
    next_offset: u64,
    /// The source stage's window assigner and lookup tables.
    chain: ChainState,
}

/// A reduce partition of a shuffle stage.
struct ReduceState {
    /// Its state; `None` while a task of it runs on a slot.
    work: Option<Box<ReduceWork>>,
    last_batch: Option<u64>,
}

/// A reduce partition's state: the stage's stateful operator and the
/// lookup tables of the kernels after it.
struct ReduceWork {
    operator: Box<dyn StatefulOperator>,
    /// The lookup tables of the kernels after the operator.
    chain: ChainState,
}

impl ReduceWork {
    fn size(&self) -> StateSize {
        let mut size = self.chain.size();
        size += self.operator.state_size();
        size
    }
}

impl ReduceState {
    /// The state held (none while it is on a slot).
    fn size(&self) -> StateSize {
        self.work.as_ref().map(|w| w.size()).unwrap_or_default()
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
    /// Remote blocks downloading, by (producing stage, map partition,
    /// producer): started when their notice arrives, so the task finds its
    /// inputs in.
    fetching: std::collections::HashSet<(u32, u32, u32)>,
    /// Remote blocks downloaded, by (producing stage, map partition,
    /// producer).
    fetched: HashMap<(u32, u32, u32), Vec<RecordBatch>>,
}

/// One query as this worker knows it.
struct WorkerQuery {
    /// The query's stages, as shipped: what each task runs, what each
    /// shuffle hashes on.
    graph: StageGraph,
    /// Each stage's chain of steps (by stage id), shared with the slots.
    steps: Arc<Vec<Vec<Step>>>,
    /// Which incarnation of the query this is on this worker (a new
    /// generation is a new one): results of a replaced one are dropped.
    incarnation: u64,
    /// Partitions with a task on a slot, by (stage, partition): their next
    /// task waits.
    busy: std::collections::HashSet<(u32, u32)>,
    mode: SchedulingMode,
    /// Map partitions per shuffle input of the reduce stage.
    shuffle_inputs: Vec<u32>,
    reduce_partitions: u32,
    reduce_placement: Vec<String>,
    tables: RemoteTables,
    maps: BTreeMap<(u32, MapPartition), MapState>,
    /// Partitions of shuffle stages, by (stage, partition).
    reduces: BTreeMap<(u32, ReducePartition), ReduceState>,
    /// Map tasks waiting for their trigger time (instant, Unix µs).
    pending_maps: BTreeMap<(u64, u32, MapPartition), (Instant, i64)>,
    /// Reduce tasks pre-scheduled, with the notices received so far.
    pending_reduces: BTreeMap<(u64, u32, ReducePartition), PendingReduce>,
    /// Per stage (by id): the stages it reads and their partitions; empty
    /// for a source stage. A task of the stage runs once it has a notice
    /// from every partition of every one of them.
    stage_inputs: Vec<Vec<(u32, u32)>>,
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
    /// Worker id owning each reduce partition (of every shuffle stage).
    reduce_owners: Vec<u32>,
    /// Both, per stage (`owners_by_stage`): what notices are checked against.
    owners: Vec<Vec<u32>>,
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
    /// Rows and time per stage and step since the last group report.
    stats: BTreeMap<u32, StageStats>,
    /// State held and watermark, per (stage, partition) on this worker.
    gauges: BTreeMap<(u32, u32), Gauge>,
    /// The query's batch clock, from its launches: (origin, Unix µs;
    /// interval, ns).
    clock: Option<(i64, u64)>,
    /// Per final-stage partition: empty results held back (see
    /// [`EmptyRun`]).
    empty_runs: HashMap<u32, EmptyRun>,
    /// Per stage (by id): the lookup joins its tasks run; a task starts
    /// once their tables are in this worker's cache.
    stage_joins: Vec<Vec<u32>>,
    /// Reduce partitions, by (stage, partition), whose checkpoint state is
    /// still loading: their tasks wait.
    restoring: std::collections::HashSet<(u32, u32)>,
}

/// Empty results of one final-stage partition held back while the worker is
/// behind its clock (the partition's next batch has already triggered):
/// the coordinator gets them as one `TaskOutput` (`empty_from`) before the
/// partition's next non-empty result, once the run spans a quarter of its
/// group, at the group's last batch, or as soon as the worker is on time
/// again. A worker on time sends every result at once, so holding adds no
/// latency; one behind (a recovery's catch-up, micro-batches shorter than a
/// task) sends a few messages per group instead of one per batch.
#[derive(Debug, Clone, Copy)]
struct EmptyRun {
    from: u64,
    to: u64,
    attempt: u64,
    rows_in: u64,
    late_rows: u64,
}

/// What a stage's tasks did on this worker since the last report.
#[derive(Debug, Default)]
struct StageStats {
    /// Reading the input: a source range, or shuffled blocks.
    input: StepStats,
    /// Per step of the stage's chain ([`steps`]).
    steps: Vec<StepStats>,
    tasks: u64,
}

impl StageStats {
    fn new(steps: usize) -> Self {
        Self {
            steps: vec![StepStats::default(); steps],
            ..Self::default()
        }
    }

    /// Adds what one task did.
    fn merge(&mut self, other: &StageStats) {
        fn add(a: &mut StepStats, b: &StepStats) {
            a.rows_in += b.rows_in;
            a.rows_out += b.rows_out;
            a.time_ns += b.time_ns;
        }
        add(&mut self.input, &other.input);
        if self.steps.len() < other.steps.len() {
            self.steps.resize(other.steps.len(), StepStats::default());
        }
        for (a, b) in self.steps.iter_mut().zip(&other.steps) {
            add(a, b);
        }
        self.tasks += other.tasks;
    }
}

/// The state a partition holds and the watermark it last acted on.
#[derive(Debug, Clone, Copy)]
struct Gauge {
    state: StateSize,
    watermark_us: Option<i64>,
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
    /// (query, batch, shuffle stage, partition).
    Reduce(QueryId, u64, u32, ReducePartition),
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
    /// The id of the next source read started.
    next_read: u64,
    /// The next query incarnation.
    next_incarnation: u64,
    slots: Slots,
    /// Tasks on slots.
    running: usize,
}

/// How long pulling one block may take before its producer counts as lost.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

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
        // A join: input stage 0 has 3 partitions, input stage 1 has 2.
        let inputs = [(0, 3), (1, 2)];
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
        assert_eq!(watermark_of(&left_only, &[(0, 2), (1, 2)]), None);
        assert_eq!(watermark_of(&left_only, &[(0, 2)]), Some(50));
        let both = [with(0, 0, Some(50)), with(1, 0, Some(30)), with(1, 1, None)];
        assert_eq!(watermark_of(&both, &[(0, 2), (1, 2)]), Some(30));
        // A stage reading a shuffle stage (stage 2) counts only that input.
        let deeper = [
            with(2, 0, Some(40)),
            with(2, 1, Some(45)),
            with(0, 0, Some(10)),
        ];
        assert_eq!(watermark_of(&deeper, &[(2, 2)]), Some(40));
    }

    #[test]
    fn notices_are_accepted_from_the_generation_and_the_partition_s_owner() {
        // A join: stage 0 has 2 partitions, stage 1 has 1; owners by worker id.
        let owners = [7, 8, 9];
        let inputs = [2, 1];
        let owners = owners_by_stage(&owners, &inputs, &[], &[0, 0]);
        let from = |stage, map, worker, attempt| pb::MapOutputReady {
            worker,
            attempt,
            ..notice(stage, map)
        };
        assert!(accepts_notice(&from(0, 1, 8, 3), 3, &owners));
        assert!(accepts_notice(&from(1, 0, 9, 4), 3, &owners));
        assert!(
            accepts_notice(&from(0, 0, 7, 3), 3, &owners),
            "an older attempt of the same generation"
        );
        assert!(
            !accepts_notice(&from(0, 0, 7, 2), 3, &owners),
            "an older generation"
        );
        assert!(
            !accepts_notice(&from(0, 1, 5, 3), 3, &owners),
            "a lost worker that no longer owns the partition"
        );
        assert!(!accepts_notice(&from(1, 1, 9, 3), 3, &owners));
        assert!(accepts_notice(&from(0, 0, 5, 3), 3, &[]));
        // Stage 2 (a shuffle stage, 2 partitions on workers 8 and 7) feeds
        // stage 3: its notices count from the partition's owner only.
        let owners = owners_by_stage(&[7, 8, 9], &[2, 1], &[8, 7], &[0, 0, 1, 1]);
        assert!(accepts_notice(&from(2, 0, 8, 3), 3, &owners));
        assert!(accepts_notice(&from(2, 1, 7, 3), 3, &owners));
        assert!(!accepts_notice(&from(2, 1, 8, 3), 3, &owners));
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
        assert!(p.runnable(&[(0, 10)]));
        assert!(!p.runnable(&[(0, 10), (1, 1)]));
    }

    #[test]
    fn a_task_of_a_later_stage_waits_for_its_own_input_stage_only() {
        // Stage 2 reads stage 1 (4 partitions), which read stage 0.
        let mut p = PendingReduce {
            launched: true,
            notices: (0..3).map(|m| notice(0, m)).collect(),
            ..Default::default()
        };
        assert!(
            !p.runnable(&[(1, 4)]),
            "the source stage's notices do not count"
        );
        for m in 0..4 {
            p.add(notice(1, m));
        }
        assert!(p.runnable(&[(1, 4)]));
    }
}
