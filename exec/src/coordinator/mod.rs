//! The coordinator: the runtime the server talks to. It accepts worker
//! registrations and heartbeats over gRPC, plans each continuous query once,
//! group-schedules it on the registered workers, serves them source ranges
//! and lookup tables, and collects the final stage's results in batch order.
//!
//! ```text
//!             one LaunchGroup per worker per group (G micro-batches)
//!  Coordinator ───────────────────────────────────────────────▶ Worker k
//!      ▲   GroupReport (once per worker per group), heartbeats      │ map task (b, p) at trigger time
//!      └───────────────────────────────────────────────────────────┤ writes blocks to its BlockStore,
//!                                                                   │ MapOutputReady ──▶ consumer's worker
//!                                                                   │ reduce task (b, r) when all notices are in,
//!                                                                   │ blocks pulled by Flight do_get
//!  Collector ◀── DeliverOutput (final-stage tasks, keyed by batch) ─┘
//!      └─▶ client session / materialized view, in batch order
//! ```
//!
//! Each query's coordination is a state machine without I/O,
//! `QueryMachine` (`machine.rs`): its lifecycle is an explicit
//! phase (placing, running, checkpointing, recovering, rebalancing, ended),
//! events from workers, the collector, the session and timers go in, and
//! launches, barriers, cancellations and checkpoint writes come out; a small
//! driver (`attempt.rs`) performs them. Unit tests drive the machine with
//! virtual workers and virtual time.
//!
//! # Invariants
//! * Group scheduling: exactly one [`pb::LaunchGroupRequest`] per worker
//!   hosting a task, per group of `G` micro-batches, and nothing per
//!   micro-batch; the plan fragment travels in a worker's first launch only.
//!   Workers trigger batch `b` at `start + (b+1)·interval` on their clocks.
//! * Pre-scheduling: reduce partitions are placed before map partitions
//!   (consumers first) and every launch carries the placement, so a map task
//!   notifies consumers directly; the coordinator is not involved inside a
//!   group. [`Scheduling::Bsp`] is the contrast: G = 1, map tasks report to
//!   the coordinator, which launches the reduce tasks after the barrier.
//! * Placement is sticky: partition `i` lives on the `i mod W`-th worker (by
//!   id) for the life of the query, so task state stays local; a recovery
//!   moves only the lost worker's partitions.
//! * The next group is shipped when the current one is half done, so group
//!   boundaries do not stall output.
//! * Results are released strictly in batch order, each batch once.
//!
//! # Fault tolerance and adaptation (group boundaries)
//! * Batch `b` triggers at `origin + interval·(b+1)` and reads the source
//!   rows available then, so any batch can be re-run and reads the same rows.
//! * Checkpoints: at most every `checkpoint_interval`, a group is launched as
//!   a checkpoint group; after its last batch `C` reduce tasks send their
//!   state (SaveState) and map tasks report their positions; once all are in
//!   and the sink has committed every batch up to `C`, the coordinator
//!   writes the [`Manifest`].
//! * A lost worker (its Events stream broke, no heartbeat for
//!   `worker_timeout`, or a peer could not pull its blocks: `FetchFailed`)
//!   ends the query's attempt. With [`Recovery::LostWork`] (the default) the
//!   next attempt re-runs only the lost work: it continues the query's
//!   *generation*, the survivors keep their partitions, state and retained
//!   map outputs, and the lost worker's partitions move to the least loaded
//!   survivors (spread over all of them), restored from the last checkpoint.
//!   The recovery's first group covers every batch since the checkpoint:
//!   moved partitions re-run them, survivors skip what they already ran and
//!   announce their retained map outputs again to the moved consumers.
//!   [`Recovery::Rollback`] (and BSP) starts a new generation instead: every
//!   partition restarts from the checkpoint on the survivors.
//! * Map outputs are retained until a checkpoint covers their batch (each
//!   launch names the latest one; workers drop what it covers), so a moved
//!   reduce partition can read the survivors' outputs since the checkpoint.
//!   After ten checkpoint intervals without a checkpoint retention stops
//!   (worker memory stays bounded) and a loss rolls back, until checkpoints
//!   succeed again.
//! * The collector keys outputs by (batch, partition) and drops those of
//!   batches it already released; tasks are deterministic, so within a
//!   generation any attempt's output of a (batch, partition) is the same:
//!   output stays exactly-once and in batch order.
//! * Membership changes (a worker registered, a worker draining) and
//!   `parallelism` changes take effect at a boundary: the next group is a
//!   checkpoint group, and the next attempt starts from that checkpoint with
//!   the new placement (state re-partitioned by key if the count changed),
//!   with nothing replayed.
//! * Fencing: outputs and notices of an older generation are ignored; a
//!   notice is accepted only from the worker that owns its map partition in
//!   the current layout; a worker declared lost is forgotten, everything its
//!   event stream still says is ignored, and it comes back (if alive) as a
//!   new worker with a new registration epoch, which launches name.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use drizzle_planner::graph::StageId as GraphStage;
use drizzle_planner::{
    BatchOp, EmitMode, LookupJoinSpec, Operator, StageGraph, StageInput, StreamingPlan,
};
use drizzle_shuffle::{BatchId, QueryId};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, watch, Notify};
use tonic::{Request, Response, Status};

use crate::checkpoint::{CheckpointStore, Manifest, MapCheckpoint, StateFile, StateObject};
use crate::cluster::pb::coordinator_server::{Coordinator as CoordinatorRpc, CoordinatorServer};
use crate::cluster::pb::{self, SchedulingMode};
use crate::cluster::{
    from_ipc, worker_client, MAX_MESSAGE_BYTES, MAX_STATE_OBJECT_BYTES, PROTOCOL_VERSION,
};
use crate::error::{ExecError, Result};
use crate::operators::TableEvaluator;
use crate::sources::SourcePartition;
use crate::worker::{start_worker, ErrorClassifier, WorkerConfig, WorkerHandle};

mod analyze;
mod attempt;
mod barrier;
mod collector;
mod data;
mod machine;
mod placement;
mod query;
mod service;
pub(crate) mod simulate;
mod state;
#[allow(unused_imports)]
pub use self::analyze::Analysis;
#[allow(unused_imports)]
use self::attempt::*;
#[allow(unused_imports)]
use self::barrier::*;
#[allow(unused_imports)]
use self::collector::*;
#[allow(unused_imports)]
use self::machine::*;
#[allow(unused_imports)]
use self::placement::*;
#[allow(unused_imports)]
use self::query::*;
#[allow(unused_imports)]
use self::service::*;
#[allow(unused_imports)]
use self::state::*;

/// A worker (a task runtime with its own block store and scheduler).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u32);

/// A group of consecutive micro-batches scheduled together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub u64);

/// How the coordinator schedules a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scheduling {
    /// Group scheduling with pre-scheduled shuffles (the Drizzle design).
    #[default]
    Drizzle,
    /// Group scheduling without pre-scheduled shuffles: one launch per
    /// group, but the coordinator starts each batch's reduce tasks after all
    /// its map tasks reported (for the scheduling benchmark).
    GroupOnly,
    /// Bulk-synchronous: one micro-batch per launch, and the coordinator
    /// starts reduce tasks after every map task of the batch reported.
    Bsp,
}

impl std::str::FromStr for Scheduling {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_lowercase().as_str() {
            "drizzle" => Ok(Scheduling::Drizzle),
            "group" => Ok(Scheduling::GroupOnly),
            "bsp" => Ok(Scheduling::Bsp),
            other => Err(format!("'{other}' is not 'drizzle', 'group' or 'bsp'")),
        }
    }
}

impl std::fmt::Display for Scheduling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scheduling::Drizzle => "drizzle",
            Scheduling::GroupOnly => "group",
            Scheduling::Bsp => "bsp",
        })
    }
}

/// What the coordinator does when a worker is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Recovery {
    /// Re-run only the lost work (the Drizzle design): survivors keep their
    /// partitions, state and map outputs; the lost worker's partitions are
    /// restored from the last checkpoint on the survivors, spread over all
    /// of them, and replay the batches since. Needs checkpoints and Drizzle
    /// scheduling; otherwise the coordinator rolls back.
    #[default]
    LostWork,
    /// Roll every partition of the query back to the last checkpoint (on
    /// all survivors) and replay from there.
    Rollback,
}

impl std::str::FromStr for Recovery {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_lowercase().as_str() {
            "lost-work" | "lost_work" => Ok(Recovery::LostWork),
            "rollback" => Ok(Recovery::Rollback),
            other => Err(format!("'{other}' is not 'lost-work' or 'rollback'")),
        }
    }
}

impl std::fmt::Display for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Recovery::LostWork => "lost-work",
            Recovery::Rollback => "rollback",
        })
    }
}

/// What a client asks the runtime to run.
pub struct QuerySpec {
    /// The plan.
    pub plan: StreamingPlan,
    /// The stream inputs, in the plan's order ([`StreamingPlan::streams`]: the source stages in order).
    pub inputs: Vec<InputSpec>,
    /// The micro-batch interval.
    pub batch_interval: Duration,
    /// Micro-batches per group; 0 = adaptive (`'auto'`).
    pub group_size: u32,
    /// Drizzle or BSP.
    pub scheduling: Scheduling,
    /// Number of reduce partitions.
    pub reduce_partitions: u32,
    /// For SHOW QUERIES: the SQL or the view it feeds.
    pub label: String,
    /// Checkpointing and resumption.
    pub durability: Durability,
    /// The query's memory budget in bytes (0: none): keyed state, join
    /// rows and lookup tables, over every worker.
    pub memory_limit: u64,
}

/// How a query checkpoints and where it resumes.
#[derive(Debug, Clone, Default)]
pub struct Durability {
    /// Its checkpoints' key in the store (a view's name); `None`: a
    /// per-run key, deleted when the query ends.
    pub key: Option<String>,
    /// Start from this checkpoint (a view resumed after a restart).
    pub resume: Option<Manifest>,
    /// Batches up to this one were already committed by the sink: drop them.
    pub skip_through: Option<u64>,
    /// The time origin (Unix µs) to keep batch ids and source ranges stable
    /// across restarts; `None`: now.
    pub origin_unix_us: Option<i64>,
    /// The sink commits durably and acknowledges with
    /// [`QueryHandle::commit`]; a checkpoint waits for that acknowledgement.
    pub durable_sink: bool,
}

/// One stream input of a query: its source partitions (one map task each)
/// and where each starts (row offset).
#[derive(Debug, Clone)]
pub struct InputSpec {
    /// The source partitions.
    pub sources: Vec<SourcePartition>,
    /// Start offset per partition.
    pub start_offsets: Vec<u64>,
}

/// Live counters of a query, shown by `SHOW QUERIES`.
#[derive(Debug)]
pub struct QueryStatus {
    /// The query id.
    pub id: QueryId,
    /// The SQL or view name.
    pub label: String,
    /// Batch interval.
    pub batch_interval: Duration,
    /// Drizzle or BSP.
    pub scheduling: Scheduling,
    /// True when the group size adapts (`group_size = 'auto'`).
    pub adaptive: bool,
    /// Current group size.
    pub group_size: AtomicU32,
    /// Groups launched.
    pub groups: AtomicU64,
    /// Micro-batches completed.
    pub batches: AtomicU64,
    /// Source rows read.
    pub rows_in: AtomicU64,
    /// Rows emitted.
    pub rows_out: AtomicU64,
    /// Rows dropped as late.
    pub late_rows: AtomicU64,
    /// Emit time minus trigger time of the last completed batch (µs).
    pub last_latency_us: AtomicU64,
    /// Coordinator time spent planning and shipping groups (µs, total).
    pub coordination_us: AtomicU64,
    /// Launch messages sent to workers.
    pub launches: AtomicU64,
    /// Emit-minus-trigger time of recent batches (µs), at most [`RECENT_BATCHES`].
    pub recent_latencies_us: Mutex<std::collections::VecDeque<u32>>,
    /// (emit time, batch, group size) of recent batches, for the benchmarks.
    pub recent_emits: Mutex<std::collections::VecDeque<(Instant, u64, u32)>>,
    /// The current attempt (1 + recoveries + rebalances).
    pub attempt: AtomicU64,
    /// Attempts started because a worker was lost.
    pub recoveries: AtomicU64,
    /// Partitions (map and reduce) restored from a checkpoint by recoveries:
    /// only the lost ones with lost-work recovery, all with a rollback.
    pub recovered_partitions: AtomicU64,
    /// The last recovery, described (`SHOW QUERIES`).
    pub last_recovery: Mutex<Option<String>>,
    /// What a lost worker would cost now: `lost-work`, or `rollback` (and why).
    pub recovery: Mutex<String>,
    /// Current reduce partitions.
    pub reduce_partitions: AtomicU32,
    /// The last checkpoint: (batch, when written, bytes).
    pub last_checkpoint: Mutex<Option<(u64, Instant, u64)>>,
    /// When the query started.
    pub started: Instant,
    /// Set once the query ended, with the reason.
    pub ended: Mutex<Option<String>>,
    /// State held over every worker (bytes), as last reported.
    pub state_bytes: AtomicU64,
    /// Keys (groups) or held join rows over every worker, as last reported.
    pub state_keys: AtomicU64,
    /// The query's memory budget (bytes, 0: none).
    pub memory_limit: u64,
    /// The query's stage graph (for `EXPLAIN ANALYZE`).
    pub graph: StageGraph,
    /// What its tasks did, as workers reported (`EXPLAIN ANALYZE`).
    pub analysis: Mutex<Analysis>,
    /// Where its coordination is: placing, running, checkpointing,
    /// recovering, rebalancing or ended (`EXPLAIN ANALYZE`).
    pub phase: Mutex<&'static str>,
}

impl QueryStatus {
    /// `EXPLAIN ANALYZE`: the stage graph with what every stage and operator
    /// did so far.
    pub fn explain_analyze(&self) -> Vec<String> {
        let batches = self.batches.load(Ordering::Relaxed);
        let header = format!(
            "StreamingQuery {} ({}): {} batches, {} rows in, {} rows out, {} late, running {:.1} s, coordination {} (attempt {})",
            self.id.0,
            self.label,
            batches,
            self.rows_in.load(Ordering::Relaxed),
            self.rows_out.load(Ordering::Relaxed),
            self.late_rows.load(Ordering::Relaxed),
            self.started.elapsed().as_secs_f64(),
            *self.phase.lock(),
            self.attempt.load(Ordering::Relaxed)
        );
        self.analysis.lock().render(
            header,
            &self.graph,
            self.reduce_partitions.load(Ordering::Relaxed),
        )
    }
}

/// How many recent per-batch latencies a query keeps (for benchmarks and SHOW).
pub const RECENT_BATCHES: usize = 1 << 16;

/// One micro-batch's output, delivered in batch order.
#[derive(Debug)]
pub struct EmittedBatch {
    /// The micro-batch.
    pub batch: BatchId,
    /// Its rows (may be empty for an empty batch).
    pub rows: RecordBatch,
}

struct CancelToken {
    cancelled: AtomicBool,
    notify: Notify,
}

impl CancelToken {
    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }
}

/// A running query; dropping it cancels the query.
pub struct QueryHandle {
    /// The query id.
    pub id: QueryId,
    /// Live counters.
    pub status: Arc<QueryStatus>,
    /// The schema of the emitted rows.
    pub schema: SchemaRef,
    /// Output semantics.
    pub emit: EmitMode,
    results: mpsc::Receiver<Result<EmittedBatch>>,
    cancel: Arc<CancelToken>,
    acked: Arc<AtomicU64>,
}

impl QueryHandle {
    /// A durable sink committed every batch up to `batch` (see
    /// [`Durability::durable_sink`]).
    pub fn commit(&self, batch: BatchId) {
        self.acked.fetch_max(batch.0 + 1, Ordering::AcqRel);
    }

    /// The next micro-batch's output; `None` when the query ended.
    ///
    /// # Cancel safety
    /// Cancel safe: a batch not returned stays queued.
    pub async fn next(&mut self) -> Option<Result<EmittedBatch>> {
        self.results.recv().await
    }

    /// Stops the query and frees its resources.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }
}

impl Drop for QueryHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// How to start the runtime.
#[derive(Clone)]
pub struct RuntimeConfig {
    /// Where the coordinator listens for workers (`127.0.0.1:0` for an
    /// embedded server with only in-process workers).
    pub cluster_listen: SocketAddr,
    /// The address workers are told to reach the coordinator at (defaults to
    /// the bound address).
    pub cluster_advertise: Option<String>,
    /// In-process workers to start (0 = wait for remote `drizzle worker`s).
    pub local_workers: usize,
    /// How long a query waits for a first worker before it fails.
    pub worker_wait: Duration,
    /// A worker silent this long is declared lost.
    pub worker_timeout: Duration,
    /// Error classification for in-process workers.
    pub classify: ErrorClassifier,
    /// Adaptive group size (`group_size = 'auto'`).
    pub adaptive: AdaptiveGroupSize,
    /// Where checkpoints go (a directory or `s3://` URL); `None`: no
    /// checkpoints (a lost worker then restarts its queries from their start).
    pub checkpoint_location: Option<String>,
    /// Checkpoint at the first group boundary after this much time.
    pub checkpoint_interval: Duration,
    /// Recovery of lost workers.
    pub recovery: Recovery,
    /// Proof of membership on every cluster call, both ways.
    pub cluster_secret: crate::cluster::ClusterSecret,
    /// The server-wide memory budget for query state (bytes, 0: none): when
    /// the state of all queries together exceeds it, the query holding the
    /// most fails with 53200, so one query cannot starve the others.
    pub server_memory_limit: u64,
}

/// How `group_size = 'auto'` adapts: at every group boundary the coordinator
/// measures the share of wall time it spent coordinating the last group;
/// above `upper` it multiplies the group size by 2 (cut overhead fast), below
/// `lower` it subtracts 1 (regain responsiveness slowly), within `[1, max]`.
#[derive(Debug, Clone, Copy)]
pub struct AdaptiveGroupSize {
    /// Lower bound on the coordination share.
    pub lower: f64,
    /// Upper bound on the coordination share.
    pub upper: f64,
    /// Largest group size.
    pub max: u32,
}

impl Default for AdaptiveGroupSize {
    fn default() -> Self {
        Self {
            lower: 0.02,
            upper: 0.05,
            max: 1000,
        }
    }
}

impl AdaptiveGroupSize {
    /// The next group size after a group that spent `share` of its wall time
    /// on coordination.
    pub fn next(&self, g: u32, share: f64) -> u32 {
        let g = if share > self.upper {
            g.saturating_mul(2)
        } else if share < self.lower {
            g.saturating_sub(1)
        } else {
            g
        };
        g.clamp(1, self.max.max(1))
    }
}

/// A registered worker, as `SHOW WORKERS` shows it.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    /// Id assigned at registration.
    pub id: WorkerId,
    /// Its control and Flight address.
    pub address: String,
    /// Registration epoch.
    pub epoch: u64,
    /// Time since its last heartbeat.
    pub since_heartbeat: Duration,
    /// Its counters, as of the last heartbeat.
    pub counters: pb::WorkerCounters,
    /// Launch messages the coordinator sent it.
    pub launches_sent: u64,
}

struct WorkerEntry {
    /// Asked to stop (SIGTERM): no new placements.
    draining: bool,
    id: WorkerId,
    address: String,
    epoch: u64,
    client: pb::worker_client::WorkerClient<crate::cluster::ClusterChannel>,
    last_heartbeat: Instant,
    counters: pb::WorkerCounters,
    launches_sent: u64,
    /// The registration's credential (see `cluster`'s module docs).
    credential: String,
    /// Tasks it runs at once.
    slots: u32,
}

/// A lookup join's finite side as shipped to workers: (version, Arrow IPC).
type EncodedTable = (u64, Arc<Vec<RecordBatch>>);

/// Coordinator-side state of one running query.
struct CompiledQuery {
    id: QueryId,
    plan: StreamingPlan,
    /// The plan's stages: what workers run (shipped as `encoded_plan`).
    graph: StageGraph,
    encoded_plan: Vec<u8>,
    scheduling: Scheduling,
    inputs: Vec<InputSpec>,
    status: Arc<QueryStatus>,
    sink: mpsc::UnboundedSender<SinkMsg>,
    reports: mpsc::UnboundedSender<pb::GroupReport>,
    map_done: mpsc::UnboundedSender<pb::MapOutputReady>,
    cancel: Arc<CancelToken>,
    start: Instant,
    start_unix_us: i64,
    interval: Duration,
    /// Encoded lookup tables by join id: (version, IPC).
    tables: Mutex<HashMap<u32, EncodedTable>>,
    /// Checkpoint key.
    key: String,
    /// Delete the checkpoints when the query ends (not a view's).
    ephemeral: bool,
    durability: Durability,
    /// Checkpoint pieces received, by batch.
    pending_checkpoints: Mutex<BTreeMap<u64, PendingCheckpoint>>,
    /// The last complete checkpoint.
    last_checkpoint: Mutex<Option<Manifest>>,
    /// When the oldest checkpoint asked for since the last complete one was
    /// due (its group's last batch triggered); `None`: none is outstanding.
    /// A long group (a recovery's catch-up, a large group size) is not a
    /// late checkpoint.
    checkpoint_due: Mutex<Option<Instant>>,
    /// Wakes the coordinator loop when a checkpoint piece arrives.
    checkpoint_progress: Notify,
    /// Target reduce partitions (`ALTER ... SET parallelism`).
    target_partitions: AtomicU32,
    /// The attempt that started the current generation: outputs of any
    /// attempt since are valid (lost-work recovery keeps the generation).
    generation: AtomicU64,
    /// Lost-work recovery applies: the runtime's mode, Drizzle scheduling
    /// and checkpoints on.
    lost_work: bool,
    /// Map outputs are retained until a checkpoint covers them; off while
    /// checkpoints stall, so that worker memory stays bounded.
    retaining: AtomicBool,
    /// The first batch from which every map output is retained.
    retained_since: AtomicU64,
    /// Collector: batches below this were released.
    released: AtomicU64,
    /// Collector: 1 + the last batch released with rows (0: none).
    last_sent_rows: AtomicU64,
    /// Durable sink: 1 + the last batch it committed (0: none).
    acked: Arc<AtomicU64>,
    /// State per worker as last reported: (bytes, keys).
    state_by_worker: Mutex<HashMap<u32, (u64, u64)>>,
    /// Failed for its memory budget: no longer counted.
    over_budget: AtomicBool,
    /// The complete checkpoints still kept in the store (the last
    /// [`checkpoint::KEEP`], oldest first): what a delta can be laid over.
    kept_checkpoints: Mutex<Vec<Manifest>>,
    /// A delta could not be laid over its base: the next checkpoint of
    /// keyed state is written in full.
    full_checkpoint_next: AtomicBool,
    /// The query's shuffle token, sent only to the workers that run it.
    token: drizzle_shuffle::QueryToken,
    /// Which worker runs which partition in the current attempt.
    owners: Mutex<Owners>,
}

/// Which worker (id) runs each partition of an attempt: results, reports
/// and checkpoint state count only from a partition's owner.
#[derive(Debug, Default)]
struct Owners {
    workers: Vec<u32>,
    /// Per input stage, per map partition.
    maps: Vec<Vec<u32>>,
    /// Per reduce partition.
    reduces: Vec<u32>,
}

/// Pieces of one checkpoint gathered so far.
#[derive(Default)]
struct PendingCheckpoint {
    attempt: u64,
    maps: Vec<MapCheckpoint>,
    /// Each state object, and for a delta the checkpoint it is laid over.
    states: Vec<(StateFile, Option<u64>)>,
}

/// At most this many deltas are laid over a full snapshot of keyed state;
/// the next checkpoint compacts the chain (writes the state in full).
const MAX_DELTAS: usize = 32;

/// Deltas may add up to the full snapshot's size, or this much if larger,
/// before the chain is compacted.
const MIN_DELTA_BUDGET: u64 = 1 << 20;

enum SinkMsg {
    Output {
        attempt: u64,
        /// The output stands for batches `from..=batch`, those before
        /// `batch` empty (a run of empty results).
        from: u64,
        batch: BatchId,
        partition: u32,
        chunks: Vec<(Option<i64>, RecordBatch)>,
    },
    /// A new attempt starts; a new generation forgets the unreleased
    /// outputs of older ones (lost-work recovery keeps them).
    Attempt {
        generation: u64,
        final_tasks: u32,
    },
    Failed(ExecError),
}

/// Output chunks of one final-stage task: (window end, rows).
type Chunks = Vec<(Option<i64>, RecordBatch)>;

struct State {
    workers: RwLock<BTreeMap<WorkerId, WorkerEntry>>,
    workers_changed: Notify,
    next_worker: AtomicU32,
    queries: Mutex<HashMap<QueryId, Arc<CompiledQuery>>>,
    tables: Arc<dyn TableEvaluator>,
    launch_messages: AtomicU64,
    worker_timeout: Duration,
    adaptive: AdaptiveGroupSize,
    checkpoints: Option<CheckpointStore>,
    checkpoint_interval: Duration,
    recovery: Recovery,
    /// Workers each running query is placed on.
    placements: Mutex<HashMap<QueryId, Vec<WorkerId>>>,
    /// Attached to every call to a worker.
    secret: crate::cluster::ClusterSecret,
    /// See [`RuntimeConfig::server_memory_limit`].
    server_memory_limit: u64,
}

struct CoordinatorService {
    state: Arc<State>,
}

/// The runtime: the coordinator and, in the embedded mode, its in-process
/// workers (which speak the same protocol over loopback).
pub struct Runtime {
    state: Arc<State>,
    local_workers: Mutex<Vec<Arc<WorkerHandle>>>,
    /// The address workers reach the coordinator at.
    pub cluster_address: String,
    next_query: AtomicU64,
    cancels: Mutex<HashMap<QueryId, Arc<CancelToken>>>,
    worker_wait: Duration,
    stop: watch::Sender<bool>,
}

fn unix_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl Runtime {
    /// Starts the coordinator's cluster endpoint and `local_workers`
    /// in-process workers. Must be called inside a tokio runtime.
    pub async fn start(
        config: RuntimeConfig,
        tables: Arc<dyn TableEvaluator>,
    ) -> Result<Arc<Self>> {
        let listener = tokio::net::TcpListener::bind(config.cluster_listen)
            .await
            .map_err(|e| ExecError::io(config.cluster_listen.to_string(), e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| ExecError::io(config.cluster_listen.to_string(), e))?;
        let cluster_address = config
            .cluster_advertise
            .clone()
            .unwrap_or_else(|| bound.to_string());
        let state = Arc::new(State {
            workers: RwLock::new(BTreeMap::new()),
            workers_changed: Notify::new(),
            next_worker: AtomicU32::new(0),
            queries: Mutex::new(HashMap::new()),
            tables,
            launch_messages: AtomicU64::new(0),
            worker_timeout: config.worker_timeout,
            adaptive: config.adaptive,
            checkpoints: config
                .checkpoint_location
                .as_deref()
                .map(CheckpointStore::open)
                .transpose()?,
            checkpoint_interval: config.checkpoint_interval,
            recovery: config.recovery,
            server_memory_limit: config.server_memory_limit,
            placements: Mutex::new(HashMap::new()),
            secret: config.cluster_secret.clone(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let service = tonic::service::interceptor::InterceptedService::new(
            CoordinatorServer::new(CoordinatorService {
                state: Arc::clone(&state),
            })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
            config.cluster_secret.check(),
        );
        // The data plane, on the same port and behind the same secret.
        let data = tonic::service::interceptor::InterceptedService::new(
            arrow_flight::flight_service_server::FlightServiceServer::new(data::CoordinatorData {
                state: Arc::clone(&state),
            })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
            config.cluster_secret.check(),
        );
        crate::cluster::spawn_server(
            crate::cluster::server_builder()
                .add_service(service)
                .add_service(data),
            listener,
            stop_rx.clone(),
            "coordinator",
        );
        tokio::spawn(watch_tables(Arc::clone(&state), stop_rx.clone()));
        tokio::spawn(watch_workers(Arc::clone(&state), stop_rx));
        let runtime = Arc::new(Self {
            state,
            local_workers: Mutex::new(Vec::new()),
            cluster_address: cluster_address.clone(),
            // Query ids differ across server restarts (workers may still
            // hold a previous run's queries): seconds since 2026 times 1000.
            next_query: AtomicU64::new(
                (unix_us() / 1_000_000).saturating_sub(1_767_225_600).max(0) as u64 % 10_000_000
                    * 1000
                    + 1,
            ),
            cancels: Mutex::new(HashMap::new()),
            worker_wait: config.worker_wait,
            stop,
        });
        for _ in 0..config.local_workers {
            let worker = start_worker(WorkerConfig {
                coordinator: cluster_address.clone(),
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                advertise: None,
                classify: Arc::clone(&config.classify),
                cluster_secret: config.cluster_secret.clone(),
                // One in-process worker per core already: one slot each.
                slots: 1,
            })
            .await?;
            runtime.local_workers.lock().push(worker);
        }
        tracing::info!(address = %cluster_address, local_workers = config.local_workers, "coordinator listening");
        Ok(runtime)
    }

    /// Number of registered workers (at least 1, for default parallelism).
    pub fn worker_count(&self) -> usize {
        self.state.workers.read().len().max(1)
    }

    /// Task slots of the registered workers together (at least 1): the
    /// default parallelism of a query.
    pub fn slot_count(&self) -> usize {
        self.state
            .workers
            .read()
            .values()
            .map(|w| w.slots.max(1) as usize)
            .sum::<usize>()
            .max(1)
    }

    /// The registered workers.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        let now = Instant::now();
        self.state
            .workers
            .read()
            .values()
            .map(|w| WorkerInfo {
                id: w.id,
                address: w.address.clone(),
                epoch: w.epoch,
                since_heartbeat: now.saturating_duration_since(w.last_heartbeat),
                counters: w.counters,
                launches_sent: w.launches_sent,
            })
            .collect()
    }

    /// Total launch messages sent (all queries).
    pub fn launch_messages(&self) -> u64 {
        self.state.launch_messages.load(Ordering::Relaxed)
    }

    /// Status of every running query. A query that ended is not listed,
    /// even while its coordinator still winds down: its client has seen the
    /// end already (the collector marks it ended before closing the stream).
    pub fn queries(&self) -> Vec<Arc<QueryStatus>> {
        let mut v: Vec<_> = self
            .state
            .queries
            .lock()
            .values()
            .filter(|q| q.status.ended.lock().is_none())
            .map(|q| Arc::clone(&q.status))
            .collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// Changes a running query's number of reduce partitions at its next
    /// group boundary (state is re-partitioned by key through a checkpoint).
    /// False when no such query runs or it has no shuffle.
    pub fn set_parallelism(&self, id: QueryId, partitions: u32) -> bool {
        match self.state.queries.lock().get(&id) {
            Some(q) if q.plan.has_shuffle() => {
                q.target_partitions
                    .store(partitions.max(1), Ordering::Release);
                q.checkpoint_progress.notify_one();
                true
            }
            _ => false,
        }
    }

    /// The checkpoint store, if checkpoints are on.
    pub fn checkpoints(&self) -> Option<&CheckpointStore> {
        self.state.checkpoints.as_ref()
    }

    /// Cancels a query by id; false when no such query runs.
    pub fn cancel(&self, id: QueryId) -> bool {
        match self.cancels.lock().get(&id) {
            Some(c) => {
                c.cancel();
                true
            }
            None => false,
        }
    }

    /// Stops the cluster endpoint and the in-process workers.
    pub fn shutdown(&self) {
        for c in self.cancels.lock().values() {
            c.cancel();
        }
        let _ = self.stop.send(true);
        for w in self.local_workers.lock().drain(..) {
            w.shutdown();
        }
    }

    /// Starts a continuous query. Must be called inside a tokio runtime.
    /// A query submitted before any worker registered waits for one for the
    /// configured time, then fails.
    pub fn start_query(self: &Arc<Self>, spec: QuerySpec) -> Result<QueryHandle> {
        let id = QueryId(self.next_query.fetch_add(1, Ordering::Relaxed));
        // Re-running only lost work needs map outputs kept until a
        // checkpoint covers them, and workers that trigger batches on their own.
        let lost_work = self.state.recovery == Recovery::LostWork
            && spec.scheduling == Scheduling::Drizzle
            && self.state.checkpoints.is_some();
        let (query, channels) = CompiledQuery::new(id, spec, lost_work)?;
        let QueryChannels {
            sink_rx,
            report_rx,
            map_done_rx,
        } = channels;
        let status = Arc::clone(&query.status);
        let cancel = Arc::clone(&query.cancel);
        let acked = Arc::clone(&query.acked);
        let released = query.released.load(Ordering::Acquire);
        let (results_tx, results_rx) = mpsc::channel(64);
        let schema = Arc::clone(&query.plan.output_schema);
        let emit = query.plan.emit;
        self.state.queries.lock().insert(id, Arc::clone(&query));
        self.cancels.lock().insert(id, Arc::clone(&cancel));
        let (done_tx, done_rx) = watch::channel(released);
        tokio::spawn(collect(
            Arc::clone(&query),
            sink_rx,
            results_tx,
            done_tx,
            Arc::clone(&cancel),
        ));
        let rt = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(e) = rt.coordinate(&query, done_rx, report_rx, map_done_rx).await {
                let _ = query.sink.send(SinkMsg::Failed(e));
            }
            // The collector ends the query (cancels it) once it delivered
            // the last batch or the failure; only then is it forgotten.
            loop {
                let cancelled = query.cancel.notify.notified();
                if query.cancel.is_cancelled() {
                    break;
                }
                cancelled.await;
            }
            rt.state.queries.lock().remove(&id);
            rt.state.placements.lock().remove(&id);
            rt.cancels.lock().remove(&id);
            if query.ephemeral {
                if let Some(store) = rt.state.checkpoints.as_ref() {
                    if let Err(e) = store.remove(&query.key).await {
                        tracing::warn!(query = %id, "cannot delete the query's checkpoints: {e}");
                    }
                }
            }
        });
        Ok(QueryHandle {
            id,
            status,
            schema,
            emit,
            results: results_rx,
            cancel,
            acked,
        })
    }
}

/// How long a launch may take before its worker counts as lost.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(5);

/// A worker an attempt placed tasks on.
#[derive(Clone, Debug)]
struct Placed {
    id: WorkerId,
    address: String,
    epoch: u64,
}

/// Where an attempt runs every partition; frozen for the attempt.
#[derive(Clone, Debug)]
struct Layout {
    /// The workers placed on; an index into this is a *slot*.
    workers: Vec<Placed>,
    /// Per input stage, per map partition: its slot.
    maps: Vec<Vec<usize>>,
    /// Per reduce partition: its slot (consumers are placed first).
    reduces: Vec<usize>,
}

/// What an attempt had launched when it ended: the next attempt continues
/// from it when it recovers only the lost work.
struct Carry {
    layout: Layout,
    /// The first batch not launched yet.
    next_batch: u64,
}

/// How an attempt starts.
enum Start {
    /// A new generation: every partition placed afresh and started from the
    /// last checkpoint (or the query's start); `after_loss`: a rollback.
    Fresh { after_loss: bool },
    /// Lost-work recovery: the survivors keep their partitions; `moved`
    /// partitions of lost workers start from the last checkpoint on them.
    Continue {
        layout: Layout,
        next_batch: u64,
        moved: u32,
    },
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_group_size_multiplies_fast_and_decreases_slowly() {
        let a = AdaptiveGroupSize {
            lower: 0.02,
            upper: 0.05,
            max: 64,
        };
        assert_eq!(a.next(1, 0.5), 2);
        assert_eq!(a.next(16, 0.06), 32);
        assert_eq!(a.next(48, 0.9), 64, "clamped to the maximum");
        assert_eq!(a.next(10, 0.03), 10, "within the bounds: unchanged");
        assert_eq!(a.next(10, 0.001), 9);
        assert_eq!(a.next(1, 0.0), 1, "never below 1");
    }

    #[test]
    fn a_lost_slot_s_partitions_spread_over_survivors_who_keep_theirs() {
        // Three slots, sticky placement: reduce r on r mod 3; two input
        // stages of 3 partitions each (offset 0 and 3).
        let reduces = vec![0, 1, 2, 0, 1, 2];
        let maps = vec![vec![0, 1, 2], vec![0, 1, 2]];
        let keep = [true, false, true];
        let (m, r, moved) = reassign(&keep, &keep, &maps, &reduces).unwrap();
        // Survivors keep every partition they held.
        for (i, &s) in reduces.iter().enumerate() {
            if s != 1 {
                assert_eq!(r[i], s, "reduce {i} stayed");
            }
        }
        for (stage, slots) in maps.iter().enumerate() {
            for (p, &s) in slots.iter().enumerate() {
                if s != 1 {
                    assert_eq!(m[stage][p], s);
                }
            }
        }
        // Slot 1's 2 reduce and 2 map partitions moved, to both survivors.
        assert_eq!(moved, 4);
        assert_eq!(
            (r[1], r[4]),
            (0, 2),
            "reduce partitions first, least loaded"
        );
        assert_eq!((m[0][1], m[1][1]), (0, 2));
        assert!(r.iter().chain(m.iter().flatten()).all(|&s| s != 1));
    }

    #[test]
    fn lost_partitions_go_only_where_they_may_and_nowhere_fails() {
        let reduces = vec![0, 1, 2];
        let maps = vec![vec![0, 1, 2]];
        // Slot 2 survives but is draining: it keeps, takes nothing.
        let (m, r, moved) =
            reassign(&[true, false, true], &[true, false, false], &maps, &reduces).unwrap();
        assert_eq!((r, m, moved), (vec![0, 0, 2], vec![vec![0, 0, 2]], 2));
        // Nothing lost: nothing moves.
        let (_, r, moved) = reassign(&[true; 3], &[true; 3], &maps, &reduces).unwrap();
        assert_eq!((r, moved), (reduces.clone(), 0));
        // No survivor may take the lost partitions.
        assert!(reassign(&[true, false, true], &[false; 3], &maps, &reduces).is_none());
    }
}
