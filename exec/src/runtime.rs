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
//!   writes the [`Manifest`](crate::checkpoint::Manifest).
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
use drizzle_planner::{BatchOp, EmitMode, LookupJoinSpec, StreamingPlan};
use drizzle_shuffle::{BatchId, QueryId};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, watch, Notify};
use tonic::{Request, Response, Status};

use crate::checkpoint::{CheckpointStore, Manifest, MapCheckpoint, StateFile, StateObject};
use crate::cluster::pb::coordinator_server::{Coordinator as CoordinatorRpc, CoordinatorServer};
use crate::cluster::pb::{self, SchedulingMode};
use crate::cluster::{from_ipc, to_ipc, worker_client, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use crate::error::{ExecError, Result};
use crate::ops::TableEvaluator;
use crate::source::SourcePartition;
use crate::worker::{start_worker, ErrorClassifier, WorkerConfig, WorkerHandle};

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
    /// The stream inputs, in the plan's order ([`StreamingPlan::inputs`]).
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
}

/// A lookup join's finite side as shipped to workers: (version, Arrow IPC).
type EncodedTable = (u64, Arc<Vec<u8>>);

/// Coordinator-side state of one running query.
struct CompiledQuery {
    id: QueryId,
    plan: StreamingPlan,
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

impl Owners {
    fn of(layout: &Layout) -> Self {
        let id = |slot: &usize| layout.workers[*slot].id.0;
        Self {
            workers: layout.workers.iter().map(|w| w.id.0).collect(),
            maps: layout
                .maps
                .iter()
                .map(|m| m.iter().map(id).collect())
                .collect(),
            reduces: layout.reduces.iter().map(id).collect(),
        }
    }

    fn reduce(&self, r: u32) -> Option<u32> {
        self.reduces.get(r as usize).copied()
    }

    /// The owner of final-stage task `p`: a reduce partition, or a map
    /// partition of a plan without a shuffle.
    fn final_task(&self, p: u32) -> Option<u32> {
        if self.reduces.is_empty() {
            self.maps.first()?.get(p as usize).copied()
        } else {
            self.reduce(p)
        }
    }
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

impl CompiledQuery {
    /// The checkpoint a keyed-state snapshot may be a delta of: the latest
    /// complete one, if it has the current reduce partitions, fewer than
    /// [`MAX_DELTAS`] deltas, and deltas that add up to no more than the
    /// full snapshot (or [`MIN_DELTA_BUDGET`]).
    fn delta_base(&self) -> Option<u64> {
        if self.plan.aggregate.is_none() || self.full_checkpoint_next.load(Ordering::Acquire) {
            return None;
        }
        let last = self.last_checkpoint.lock();
        let m = last.as_ref()?;
        let partitions = self.status.reduce_partitions.load(Ordering::Acquire);
        (m.reduce_partitions == partitions
            && m.states.len() == partitions as usize
            && m.states.iter().all(|s| {
                let base = if s.chain.is_empty() {
                    s.bytes
                } else {
                    s.base_bytes
                };
                s.chain.len() < MAX_DELTAS && s.delta_bytes() <= base.max(MIN_DELTA_BUDGET)
            }))
        .then_some(m.batch)
    }

    /// Resolves each delta's chain against the kept checkpoints; `None` when
    /// a base is gone (the checkpoint is then dropped, and the next one is
    /// written in full).
    fn resolve_chains(&self, states: Vec<(StateFile, Option<u64>)>) -> Option<Vec<StateFile>> {
        let kept = self.kept_checkpoints.lock();
        let mut out = Vec::with_capacity(states.len());
        for (mut file, base) in states {
            if let Some(base) = base {
                let m = kept.iter().find(|m| m.batch == base)?;
                let prev = m.states.iter().find(|s| s.partition == file.partition)?;
                file.chain = prev.chain.clone();
                file.chain.push(prev.path.clone());
                file.chain_bytes = prev.chain_bytes + prev.bytes;
                file.base_bytes = if prev.chain.is_empty() {
                    prev.bytes
                } else {
                    prev.base_bytes
                };
            }
            out.push(file);
        }
        Some(out)
    }
}

impl CompiledQuery {
    /// Whether a loss now can re-run only the lost work: every map output
    /// since the last checkpoint is retained.
    fn can_recover_lost_work(&self) -> bool {
        if !self.lost_work || !self.retaining.load(Ordering::Acquire) {
            return false;
        }
        let since = self.retained_since.load(Ordering::Acquire);
        self.last_checkpoint
            .lock()
            .as_ref()
            .map_or(since == 0, |m| m.batch + 1 >= since)
    }

    /// At a group boundary: stops retaining map outputs once no checkpoint
    /// was written for `stall` (the store is failing: retained blocks would
    /// grow without bound), and retains again from batch `from` on once
    /// checkpoints are back. Updates the recovery mode SHOW QUERIES shows.
    fn check_retention(&self, stall: Duration, from: u64) {
        if !self.lost_work {
            return;
        }
        let age = self
            .status
            .last_checkpoint
            .lock()
            .map_or_else(|| self.status.started.elapsed(), |(_, at, _)| at.elapsed());
        let retaining = self.retaining.load(Ordering::Acquire);
        if retaining && age > stall {
            self.retaining.store(false, Ordering::Release);
            tracing::warn!(query = %self.id, "no checkpoint for {age:?}: map outputs are no longer retained, a lost worker now rolls the query back");
        } else if !retaining && age < stall {
            self.retained_since.store(from, Ordering::Release);
            self.retaining.store(true, Ordering::Release);
            tracing::info!(query = %self.id, "checkpoints are back: map outputs retained again from batch {from}");
        }
        let mode = if !self.retaining.load(Ordering::Acquire) {
            "rollback (checkpoints stalled)"
        } else if self.can_recover_lost_work() {
            "lost-work"
        } else {
            "rollback (until the next checkpoint)"
        };
        let mut shown = self.status.recovery.lock();
        if *shown != mode {
            *shown = mode.to_string();
        }
    }

    /// Every batch up to the returned one was committed by the sink.
    fn committed_through(&self) -> Option<u64> {
        let released = self.released.load(Ordering::Acquire);
        if !self.durability.durable_sink {
            return released.checked_sub(1);
        }
        let sent = self.last_sent_rows.load(Ordering::Acquire);
        let acked = self.acked.load(Ordering::Acquire);
        if acked >= sent {
            released.checked_sub(1)
        } else {
            acked.checked_sub(1)
        }
    }

    fn trigger_at(&self, b: BatchId) -> Instant {
        self.start + self.offset_of(b)
    }

    fn offset_of(&self, b: BatchId) -> Duration {
        Duration::from_nanos((self.interval.as_nanos() as u64).saturating_mul(b.0 + 1))
    }

    /// Map partitions of input stage `s`.
    fn partitions(&self, s: usize) -> u32 {
        self.inputs.get(s).map_or(0, |i| i.sources.len() as u32)
    }

    /// Map partitions over every input stage.
    fn total_map_partitions(&self) -> u32 {
        (0..self.inputs.len()).map(|s| self.partitions(s)).sum()
    }

    fn join(&self, id: u32) -> Option<&LookupJoinSpec> {
        let right = self.plan.join.iter().flat_map(|j| j.right.map_ops.iter());
        self.plan
            .map_ops
            .iter()
            .chain(right)
            .chain(&self.plan.post_ops)
            .find_map(|op| match op {
                BatchOp::LookupJoin(spec) if spec.id == id => Some(spec.as_ref()),
                _ => None,
            })
    }
}

enum SinkMsg {
    Output {
        attempt: u64,
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

impl State {
    fn query(&self, id: u64) -> std::result::Result<Arc<CompiledQuery>, Status> {
        self.queries
            .lock()
            .get(&QueryId(id))
            .cloned()
            .ok_or_else(|| Status::not_found(format!("query q{id} is not running")))
    }
}

impl State {
    /// Whether a registered worker still heartbeats.
    fn is_live(&self, w: &WorkerEntry) -> bool {
        w.last_heartbeat.elapsed() < self.worker_timeout
    }

    /// Declares a worker incarnation lost (or drained): it is forgotten, its
    /// queries start a new attempt, and if alive it must register again.
    fn forget_worker(&self, id: WorkerId, epoch: u64, why: &str) {
        let removed = {
            let mut workers = self.workers.write();
            match workers.get(&id) {
                Some(w) if w.epoch == epoch => workers.remove(&id),
                _ => None,
            }
        };
        if let Some(w) = removed {
            tracing::warn!(worker = id.0, address = %w.address, "worker removed: {why}");
            self.workers_changed.notify_waiters();
        }
    }

    fn on_group_report(&self, report: pb::GroupReport) {
        if let Ok(q) = self.query(report.query) {
            if report.attempt != q.status.attempt.load(Ordering::Acquire) {
                return; // fenced: an older attempt
            }
            if !report.maps.is_empty() {
                let mut pending = q.pending_checkpoints.lock();
                for m in &report.maps {
                    let entry = pending.entry(m.batch).or_default();
                    entry.attempt = report.attempt;
                    entry.maps.push(MapCheckpoint {
                        stage: m.stage,
                        partition: m.partition,
                        next_offset: m.next_offset,
                        max_event_us: m.max_event_us,
                    });
                }
                drop(pending);
                q.checkpoint_progress.notify_one();
            }
            q.status
                .rows_in
                .fetch_add(report.rows_in, Ordering::Relaxed);
            q.status
                .late_rows
                .fetch_add(report.late_rows, Ordering::Relaxed);
            let _ = q.reports.send(report);
        }
    }

    /// A consumer could not pull a block from its producer: the producer's
    /// map outputs are lost. Like a worker that went silent, the producer is
    /// forgotten (if alive, it registers again as a new worker), and the
    /// query's next attempt re-runs its partitions on the survivors.
    fn on_fetch_failed(&self, reporter: u32, f: pb::FetchFailed) {
        let Ok(q) = self.query(f.query) else {
            return;
        };
        if f.attempt < q.generation.load(Ordering::Acquire) {
            return; // about an older generation's notice
        }
        let producer = WorkerId(f.producer);
        let epoch = self.workers.read().get(&producer).map(|w| w.epoch);
        if let Some(epoch) = epoch {
            self.forget_worker(
                producer,
                epoch,
                &format!(
                    "worker {reporter} could not pull its output of batch {} from {}: {}",
                    f.batch, f.location, f.message
                ),
            );
        }
    }

    /// A final-stage task's output (or failure) for the query's collector,
    /// from worker `worker`.
    fn on_output(&self, worker: u32, out: pb::TaskOutput) {
        let Ok(q) = self.query(out.query) else {
            // The query ended; its late results have nowhere to go.
            return;
        };
        if out.attempt < q.generation.load(Ordering::Acquire) {
            return; // fenced: an older generation (its batches are re-run)
        }
        {
            let owners = q.owners.lock();
            let counts = match out.error {
                Some(_) => owners.workers.contains(&worker),
                None => owners.final_task(out.partition) == Some(worker),
            };
            if !counts {
                tracing::warn!(
                    query = %q.id,
                    worker,
                    partition = out.partition,
                    "ignored a task output from a worker that does not own the task"
                );
                return;
            }
        }
        if out.error.is_none() {
            self.account_state(&q, worker, out.state_bytes, out.state_keys);
        }
        q.status.rows_in.fetch_add(out.rows_in, Ordering::Relaxed);
        q.status
            .late_rows
            .fetch_add(out.late_rows, Ordering::Relaxed);
        if let Some(message) = out.error {
            if out.attempt != q.status.attempt.load(Ordering::Acquire) {
                return; // a failure of an attempt that was replaced
            }
            let _ = q.sink.send(SinkMsg::Failed(ExecError::Remote {
                code: out.error_code,
                message,
            }));
            return;
        }
        let mut chunks = Vec::with_capacity(out.chunks.len());
        for c in out.chunks {
            match from_ipc(c.ipc) {
                Ok(batches) => {
                    // Never trust a peer with the collector's invariants.
                    let want = q.plan.output_schema.fields().len();
                    if let Some(b) = batches.iter().find(|b| b.num_columns() != want) {
                        let _ = q.sink.send(SinkMsg::Failed(ExecError::invalid(format!(
                            "a task of query {} returned {} columns, expected {want}",
                            q.id,
                            b.num_columns()
                        ))));
                        return;
                    }
                    chunks.extend(batches.into_iter().map(|b| (c.window_end, b)))
                }
                Err(e) => {
                    let _ = q.sink.send(SinkMsg::Failed(e));
                    return;
                }
            }
        }
        let _ = q.sink.send(SinkMsg::Output {
            attempt: out.attempt,
            batch: BatchId(out.batch),
            partition: out.partition,
            chunks,
        });
    }
}

/// The operator that holds most of a plan's state, for budget errors.
fn state_operator(plan: &StreamingPlan) -> &'static str {
    if plan.aggregate.is_some() {
        "AggregateFinalExec"
    } else if plan.join.is_some() {
        "WindowJoinExec"
    } else {
        "LookupJoinExec (lookup tables)"
    }
}

impl State {
    /// Records what `worker` holds for query `q`, and enforces the query's
    /// budget and the server's.
    fn account_state(&self, q: &Arc<CompiledQuery>, worker: u32, bytes: u64, keys: u64) {
        if q.over_budget.load(Ordering::Acquire) {
            return;
        }
        let (total, total_keys) = {
            let mut by = q.state_by_worker.lock();
            by.insert(worker, (bytes, keys));
            by.values()
                .fold((0u64, 0u64), |(b, k), (x, y)| (b + x, k + y))
        };
        q.status.state_bytes.store(total, Ordering::Relaxed);
        q.status.state_keys.store(total_keys, Ordering::Relaxed);
        let limit = q.status.memory_limit;
        if limit > 0 && total > limit {
            q.over_budget.store(true, Ordering::Release);
            let _ = q.sink.send(SinkMsg::Failed(ExecError::OutOfMemory {
                message: format!(
                    "query memory limit exceeded: {} holds {} of state \
                     ({total_keys} keys or rows) over all workers, query_memory_limit is {}",
                    state_operator(&q.plan),
                    crate::worker::human_bytes(total),
                    crate::worker::human_bytes(limit)
                ),
            }));
            return;
        }
        let server_limit = self.server_memory_limit;
        if server_limit == 0 {
            return;
        }
        let queries: Vec<Arc<CompiledQuery>> = self.queries.lock().values().cloned().collect();
        let all: u64 = queries
            .iter()
            .filter(|q| !q.over_budget.load(Ordering::Acquire))
            .map(|q| q.status.state_bytes.load(Ordering::Relaxed))
            .sum();
        if all <= server_limit {
            return;
        }
        // The largest holder fails, not whichever query grew last.
        if let Some(big) = queries
            .iter()
            .filter(|q| !q.over_budget.load(Ordering::Acquire))
            .max_by_key(|q| q.status.state_bytes.load(Ordering::Relaxed))
        {
            let held = big.status.state_bytes.load(Ordering::Relaxed);
            let _ = big.sink.send(SinkMsg::Failed(ExecError::OutOfMemory {
                message: format!(
                    "server memory limit exceeded: queries hold {} of state together, \
                     server_memory_limit is {}; this query's {} held the most ({})",
                    crate::worker::human_bytes(all),
                    crate::worker::human_bytes(server_limit),
                    state_operator(&big.plan),
                    crate::worker::human_bytes(held)
                ),
            }));
            // Not counted again while it winds down.
            big.over_budget.store(true, Ordering::Release);
        }
    }
}

struct CoordinatorService {
    state: Arc<State>,
}

/// The caller's credential is not a current registration's.
fn stale_member() -> Status {
    Status::permission_denied(
        "not a registered worker of this coordinator (unknown or stale registration)",
    )
}

impl State {
    /// The current registration whose credential `request` carries.
    fn member<T>(&self, request: &Request<T>) -> Option<(WorkerId, u64)> {
        let credential = crate::cluster::credential_of(request)?;
        self.workers
            .read()
            .values()
            .find(|w| {
                w.credential.len() == credential.len()
                    && crate::cluster::has_credential(request, &w.credential)
            })
            .map(|w| (w.id, w.epoch))
    }

    /// Fails unless `caller` is a worker the query is placed on.
    fn placed(
        &self,
        caller: Option<(WorkerId, u64)>,
        q: &CompiledQuery,
    ) -> std::result::Result<(), Status> {
        let Some((id, _)) = caller else {
            return Err(stale_member());
        };
        if self
            .placements
            .lock()
            .get(&q.id)
            .is_some_and(|p| p.contains(&id))
        {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "worker {} does not run query {}",
                id.0, q.id
            )))
        }
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

impl CoordinatorService {
    async fn do_register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> std::result::Result<Response<pb::RegisterResponse>, Status> {
        let req = request.into_inner();
        crate::cluster::check_version(req.protocol_version, "the worker")?;
        if req.epoch == 0 {
            return Err(Status::invalid_argument(
                "a registration needs a nonzero epoch",
            ));
        }
        let epoch = req.epoch;
        // The registration's credential: the worker's proof of identity to
        // the coordinator, and the coordinator's to the worker.
        let credential = crate::cluster::random_credential();
        let client = worker_client(
            &req.address,
            &self
                .state
                .secret
                .with_credential(crate::cluster::ClusterSecret::credential_slot(Some(
                    &credential,
                ))),
        )
        .map_err(internal)?;
        let id = WorkerId(self.state.next_worker.fetch_add(1, Ordering::Relaxed));
        {
            let mut workers = self.state.workers.write();
            // The same address registering again is a new worker.
            workers.retain(|_, w| w.address != req.address);
            workers.insert(
                id,
                WorkerEntry {
                    draining: false,
                    id,
                    address: req.address.clone(),
                    epoch,
                    client,
                    last_heartbeat: Instant::now(),
                    counters: pb::WorkerCounters::default(),
                    launches_sent: 0,
                    credential: credential.clone(),
                },
            );
        }
        self.state.workers_changed.notify_waiters();
        tracing::info!(worker = id.0, address = %req.address, epoch, "worker registered");
        Ok(Response::new(pb::RegisterResponse {
            worker_id: id.0,
            epoch,
            heartbeat_interval_ms: crate::worker::HEARTBEAT_INTERVAL.as_millis() as u64,
            tables_version: self.state.tables.version(),
            member_credential: credential,
        }))
    }

    async fn do_heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> std::result::Result<Response<pb::HeartbeatResponse>, Status> {
        let caller = self.state.member(&request);
        let req = request.into_inner();
        crate::cluster::check_version(req.protocol_version, "the worker")?;
        let mut workers = self.state.workers.write();
        let known = match workers.get_mut(&WorkerId(req.worker_id)) {
            Some(w) if w.epoch == req.epoch && caller == Some((w.id, w.epoch)) => {
                w.last_heartbeat = Instant::now();
                w.counters = req.counters.unwrap_or_default();
                true
            }
            _ => false,
        };
        Ok(Response::new(pb::HeartbeatResponse { known }))
    }

    async fn do_events(
        &self,
        request: Request<tonic::Streaming<pb::WorkerEvent>>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        let Some((id, epoch)) = self.state.member(&request) else {
            return Err(stale_member());
        };
        let mut events = request.into_inner();
        let mut whose: Option<(u32, u64)> = Some((id.0, epoch));
        let result = self.event_loop(&mut events, &mut whose).await;
        if let Some((id, epoch)) = whose {
            // The stream broke or ended: that incarnation is gone (a live
            // worker reopens its stream under a new registration).
            self.state
                .forget_worker(WorkerId(id), epoch, "its event stream ended");
        }
        result?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn do_save_state(
        &self,
        request: Request<pb::SaveStateRequest>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        let caller = self.state.member(&request);
        let req = request.into_inner();
        let q = self.state.query(req.query)?;
        if req.attempt != q.status.attempt.load(Ordering::Acquire) {
            return Ok(Response::new(pb::Ack {}));
        }
        if caller.map(|(id, _)| id.0) != q.owners.lock().reduce(req.partition) {
            return Err(Status::permission_denied(
                "only the worker that owns a reduce partition saves its state",
            ));
        }
        let Some(store) = self.state.checkpoints.as_ref() else {
            return Err(Status::failed_precondition("checkpoints are disabled"));
        };
        let base = StateObject::peek_delta_base(&req.state).map_err(internal)?;
        let file = store
            .put_state(&q.key, req.batch, req.partition, req.state)
            .await
            .map_err(internal)?;
        let mut pending = q.pending_checkpoints.lock();
        let entry = pending.entry(req.batch).or_default();
        entry.attempt = req.attempt;
        entry.states.push((file, base));
        drop(pending);
        q.checkpoint_progress.notify_one();
        Ok(Response::new(pb::Ack {}))
    }

    async fn do_load_state(
        &self,
        request: Request<pb::LoadStateRequest>,
    ) -> std::result::Result<Response<pb::LoadStateResponse>, Status> {
        let caller = self.state.member(&request);
        let req = request.into_inner();
        let q = self.state.query(req.query)?;
        self.state.placed(caller, &q)?;
        if !req.path.starts_with(&format!("{}/", q.key)) {
            return Err(Status::permission_denied("not this query's checkpoint"));
        }
        let Some(store) = self.state.checkpoints.as_ref() else {
            return Err(Status::failed_precondition("checkpoints are disabled"));
        };
        let bytes = store.get(&req.path).await.map_err(internal)?;
        Ok(Response::new(pb::LoadStateResponse {
            state: bytes.to_vec(),
        }))
    }

    async fn do_drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        let caller = self.state.member(&request);
        let req = request.into_inner();
        let id = WorkerId(req.worker_id);
        if caller != Some((id, req.epoch)) {
            return Err(stale_member());
        }
        {
            let mut workers = self.state.workers.write();
            match workers.get_mut(&id) {
                Some(w) if w.epoch == req.epoch => w.draining = true,
                _ => return Ok(Response::new(pb::Ack {})),
            }
        }
        self.state.workers_changed.notify_waiters();
        tracing::info!(worker = id.0, "worker draining");
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let placed = self
                .state
                .placements
                .lock()
                .values()
                .any(|p| p.contains(&id));
            if !placed || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.state.forget_worker(id, req.epoch, "it drained");
        Ok(Response::new(pb::Ack {}))
    }
}

impl CoordinatorService {
    async fn event_loop(
        &self,
        events: &mut tonic::Streaming<pb::WorkerEvent>,
        whose: &mut Option<(u32, u64)>,
    ) -> std::result::Result<(), Status> {
        while let Some(event) = events.message().await? {
            let event = match event.event {
                Some(pb::worker_event::Event::Hello(h)) => {
                    // Who the stream is from is known by its credential;
                    // a Hello claiming another identity is a forgery.
                    if *whose != Some((h.worker, h.epoch)) {
                        return Err(Status::permission_denied(
                            "an event stream's Hello names another worker than its credential",
                        ));
                    }
                    continue;
                }
                Some(e) => e,
                None => continue,
            };
            // A worker declared lost (or registered again since) is fenced:
            // whatever it still says is ignored.
            let registered = whose.is_some_and(|(id, epoch)| {
                self.state
                    .workers
                    .read()
                    .get(&WorkerId(id))
                    .is_some_and(|w| w.epoch == epoch)
            });
            if !registered {
                continue;
            }
            let sender = whose.map_or(0, |(id, _)| id);
            match event {
                pb::worker_event::Event::GroupReport(report) => {
                    if report.worker == sender {
                        self.state.on_group_report(report)
                    }
                }
                pb::worker_event::Event::Output(output) => {
                    let worker = whose.map_or(0, |(id, _)| id);
                    self.state.on_output(worker, output)
                }
                pb::worker_event::Event::MapDone(notice) => {
                    if let Ok(q) = self.state.query(notice.query) {
                        let _ = q.map_done.send(notice);
                    }
                }
                pb::worker_event::Event::FetchFailed(f) => {
                    let reporter = whose.map_or(0, |(id, _)| id);
                    self.state.on_fetch_failed(reporter, f)
                }
                pb::worker_event::Event::Hello(_) => {}
            }
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl CoordinatorRpc for CoordinatorService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> std::result::Result<Response<pb::RegisterResponse>, Status> {
        self.do_register(request).await
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> std::result::Result<Response<pb::HeartbeatResponse>, Status> {
        self.do_heartbeat(request).await
    }

    async fn events(
        &self,
        request: Request<tonic::Streaming<pb::WorkerEvent>>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        self.do_events(request).await
    }

    async fn save_state(
        &self,
        request: Request<pb::SaveStateRequest>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        self.do_save_state(request).await
    }

    async fn load_state(
        &self,
        request: Request<pb::LoadStateRequest>,
    ) -> std::result::Result<Response<pb::LoadStateResponse>, Status> {
        self.do_load_state(request).await
    }

    async fn drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        self.do_drain(request).await
    }

    async fn read_source(
        &self,
        request: Request<pb::ReadSourceRequest>,
    ) -> std::result::Result<Response<pb::ReadSourceResponse>, Status> {
        let caller = self.state.member(&request);
        let req = request.into_inner();
        let q = self.state.query(req.query)?;
        self.state.placed(caller, &q)?;
        let source = q
            .inputs
            .get(req.stage as usize)
            .and_then(|i| i.sources.get(req.partition as usize))
            .cloned()
            .ok_or_else(|| Status::invalid_argument("no such source partition"))?;
        let schema = match (req.stage, &q.plan.join) {
            (1, Some(j)) => j.right.stream.schema(),
            _ => q.plan.stream.schema(),
        };
        // The batch's range ends at what was appended by its trigger time:
        // wait until that time has passed here (clocks differ), then ask.
        let until = if req.until_unix_us > 0 {
            req.until_unix_us
        } else {
            unix_us()
        };
        let ahead = until.saturating_add(1).saturating_sub(unix_us());
        if ahead > 0 {
            tokio::time::sleep(Duration::from_micros(ahead as u64)).await;
        }
        let (to, ipc) = tokio::task::spawn_blocking(move || -> Result<(u64, Vec<u8>)> {
            let to = source
                .available_at(until)
                .min(req.from.saturating_add(req.max_rows))
                .max(req.from);
            let batches = source.read(req.from, to)?;
            Ok((to, to_ipc(&schema, &batches)?))
        })
        .await
        .map_err(internal)?
        .map_err(internal)?;
        Ok(Response::new(pb::ReadSourceResponse { to, ipc }))
    }

    async fn read_table(
        &self,
        request: Request<pb::ReadTableRequest>,
    ) -> std::result::Result<Response<pb::ReadTableResponse>, Status> {
        let caller = self.state.member(&request);
        let req = request.into_inner();
        let q = self.state.query(req.query)?;
        self.state.placed(caller, &q)?;
        let version = self.state.tables.version();
        if let Some((v, ipc)) = q.tables.lock().get(&req.join) {
            if *v == version {
                return Ok(Response::new(pb::ReadTableResponse {
                    version,
                    ipc: ipc.as_ref().clone(),
                }));
            }
        }
        let tables = Arc::clone(&self.state.tables);
        let q2 = Arc::clone(&q);
        let join = req.join;
        let ipc = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
            let spec = q2
                .join(join)
                .ok_or_else(|| ExecError::invalid(format!("query has no lookup join {join}")))?;
            let batches = tables.evaluate(spec)?;
            to_ipc(&spec.table_schema, &batches)
        })
        .await
        .map_err(internal)?
        .map_err(internal)?;
        let ipc = Arc::new(ipc);
        q.tables
            .lock()
            .insert(req.join, (version, Arc::clone(&ipc)));
        Ok(Response::new(pb::ReadTableResponse {
            version,
            ipc: ipc.as_ref().clone(),
        }))
    }
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
        crate::cluster::spawn_server(
            crate::cluster::server_builder().add_service(service),
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
        let reduce_partitions = if spec.plan.has_shuffle() {
            spec.reduce_partitions.max(1)
        } else {
            0
        };
        // 0 = 'auto': adaptive, starting from 1.
        let adaptive = spec.group_size == 0 && spec.scheduling != Scheduling::Bsp;
        // Re-running only lost work needs map outputs kept until a
        // checkpoint covers them, and workers that trigger batches on their own.
        let lost_work = self.state.recovery == Recovery::LostWork
            && spec.scheduling == Scheduling::Drizzle
            && self.state.checkpoints.is_some();
        let group_size = match spec.scheduling {
            Scheduling::Bsp => 1,
            Scheduling::Drizzle | Scheduling::GroupOnly => spec.group_size.max(1),
        };
        let status = Arc::new(QueryStatus {
            id,
            label: spec.label.clone(),
            batch_interval: spec.batch_interval,
            scheduling: spec.scheduling,
            adaptive,
            group_size: AtomicU32::new(group_size),
            batches: AtomicU64::new(0),
            rows_in: AtomicU64::new(0),
            rows_out: AtomicU64::new(0),
            late_rows: AtomicU64::new(0),
            last_latency_us: AtomicU64::new(0),
            coordination_us: AtomicU64::new(0),
            launches: AtomicU64::new(0),
            groups: AtomicU64::new(0),
            recent_latencies_us: Mutex::new(std::collections::VecDeque::new()),
            recent_emits: Mutex::new(std::collections::VecDeque::new()),
            attempt: AtomicU64::new(0),
            recoveries: AtomicU64::new(0),
            recovered_partitions: AtomicU64::new(0),
            last_recovery: Mutex::new(None),
            recovery: Mutex::new(if lost_work { "lost-work" } else { "rollback" }.to_string()),
            reduce_partitions: AtomicU32::new(reduce_partitions),
            last_checkpoint: Mutex::new(
                spec.durability
                    .resume
                    .as_ref()
                    .map(|m| (m.batch, Instant::now(), m.bytes())),
            ),
            started: Instant::now(),
            ended: Mutex::new(None),
            state_bytes: AtomicU64::new(0),
            state_keys: AtomicU64::new(0),
            memory_limit: spec.memory_limit,
        });
        let encoded_plan = drizzle_planner::encode_plan(&spec.plan)?;
        let (sink_tx, sink_rx) = mpsc::unbounded_channel();
        let (report_tx, report_rx) = mpsc::unbounded_channel();
        let (map_done_tx, map_done_rx) = mpsc::unbounded_channel();
        let (results_tx, results_rx) = mpsc::channel(64);
        let cancel = Arc::new(CancelToken {
            cancelled: AtomicBool::new(false),
            notify: Notify::new(),
        });
        // The time origin fixes every batch's trigger time, hence its source
        // range: a resumed view keeps its origin, so replayed batches read
        // what they read before.
        let now_us = unix_us();
        let origin_us = spec
            .durability
            .resume
            .as_ref()
            .map(|m| m.origin_unix_us)
            .or(spec.durability.origin_unix_us)
            .unwrap_or(now_us);
        let since_origin = Duration::from_micros(now_us.saturating_sub(origin_us).max(0) as u64);
        let start = Instant::now()
            .checked_sub(since_origin)
            .unwrap_or_else(Instant::now);
        let ephemeral = spec.durability.key.is_none();
        let key = spec
            .durability
            .key
            .clone()
            .unwrap_or_else(|| format!("queries/q{}-{now_us}", id.0));
        let released = spec.durability.skip_through.map_or(0, |b| b + 1).max(
            spec.durability
                .resume
                .as_ref()
                .and_then(|m| m.last_emitted)
                .map_or(0, |b| b + 1),
        );
        let acked = Arc::new(AtomicU64::new(released));
        let resumed = spec.durability.resume.clone();
        let query = Arc::new(CompiledQuery {
            key,
            ephemeral,
            last_checkpoint: Mutex::new(spec.durability.resume.clone()),
            durability: spec.durability,
            pending_checkpoints: Mutex::new(BTreeMap::new()),
            checkpoint_progress: Notify::new(),
            target_partitions: AtomicU32::new(reduce_partitions),
            generation: AtomicU64::new(0),
            lost_work,
            retaining: AtomicBool::new(lost_work),
            retained_since: AtomicU64::new(0),
            released: AtomicU64::new(released),
            last_sent_rows: AtomicU64::new(0),
            acked: Arc::clone(&acked),
            state_by_worker: Mutex::new(HashMap::new()),
            over_budget: AtomicBool::new(false),
            kept_checkpoints: Mutex::new(resumed.into_iter().collect()),
            full_checkpoint_next: AtomicBool::new(false),
            owners: Mutex::new(Owners::default()),
            token: {
                let mut t = [0u8; 16];
                // Without OS randomness the token is zeros: still required,
                // and the cluster secret still guards every call.
                let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut t);
                drizzle_shuffle::QueryToken(t)
            },
            id,
            encoded_plan,
            scheduling: spec.scheduling,
            inputs: spec.inputs,
            status: Arc::clone(&status),
            sink: sink_tx,
            reports: report_tx,
            map_done: map_done_tx,
            cancel: Arc::clone(&cancel),
            start,
            start_unix_us: origin_us,
            interval: spec.batch_interval,
            tables: Mutex::new(HashMap::new()),
            plan: spec.plan,
        });
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

    /// Waits until at least one worker registered, or fails after the wait.
    async fn wait_for_workers(&self, cancel: &CancelToken) -> Result<()> {
        let deadline = Instant::now() + self.worker_wait;
        loop {
            let notified = self.state.workers_changed.notified();
            if !self.state.workers.read().is_empty() {
                return Ok(());
            }
            if cancel.is_cancelled() {
                return Err(ExecError::Cancelled);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ExecError::Unavailable {
                    message: format!(
                        "no worker registered with the coordinator at {} within {} s; start one with `drizzle worker --coordinator {}`",
                        self.cluster_address,
                        self.worker_wait.as_secs(),
                        self.cluster_address
                    ),
                });
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(left.min(Duration::from_millis(200))) => {}
                _ = cancel.notify.notified() => {}
            }
        }
    }

    /// The coordinator loop of one query: runs attempts until the query
    /// ends. An attempt places partitions on the live workers, then plans and
    /// ships one group at a time (group g+1 while group g runs); it ends when
    /// a worker is lost or at a boundary where the cluster or the
    /// parallelism changed (the next attempt starts from the checkpoint taken
    /// there, a new generation). After a loss, lost-work recovery continues
    /// the generation: the survivors keep their partitions and only the lost
    /// ones restart from the last checkpoint; a rollback starts a new
    /// generation from that checkpoint.
    async fn coordinate(
        &self,
        query: &Arc<CompiledQuery>,
        mut done: watch::Receiver<u64>,
        mut reports: mpsc::UnboundedReceiver<pb::GroupReport>,
        mut map_done: mpsc::UnboundedReceiver<pb::MapOutputReady>,
    ) -> Result<()> {
        let cancel = &query.cancel;
        let mut carry: Option<Carry> = None;
        let mut rolling_back = false;
        // Workers that may hold the query: told to drop it when it ends.
        let mut placed: Vec<Placed> = Vec::new();
        // Attempts that fail at once back off (10 ms doubling to 1 s), so a
        // cluster in flux is never spun on.
        let mut backoff = Duration::ZERO;
        let result = loop {
            if cancel.is_cancelled() {
                break Ok(());
            }
            if !backoff.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = cancel.notify.notified() => {}
                }
                if cancel.is_cancelled() {
                    break Ok(());
                }
            }
            if let Err(e) = self.wait_for_workers(cancel).await {
                break Err(e);
            }
            let started = Instant::now();
            let attempt = query.status.attempt.fetch_add(1, Ordering::AcqRel) + 1;
            let resume = query.last_checkpoint.lock().clone();
            let start = match carry.take() {
                Some(c) => self.continue_from(query, c, attempt),
                None => Start::Fresh {
                    after_loss: std::mem::take(&mut rolling_back),
                },
            };
            let (end, launched) = self
                .run_attempt(
                    query,
                    attempt,
                    resume,
                    start,
                    &mut done,
                    &mut reports,
                    &mut map_done,
                )
                .await;
            if let Some(c) = &launched {
                placed = c.layout.workers.clone();
            }
            match end {
                AttemptEnd::Cancelled => break Ok(()),
                AttemptEnd::WorkerLost(who) => {
                    backoff = if started.elapsed() < Duration::from_secs(1) {
                        (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1))
                    } else {
                        Duration::ZERO
                    };
                    query.status.recoveries.fetch_add(1, Ordering::Relaxed);
                    let from = query.last_checkpoint.lock().as_ref().map(|m| m.batch);
                    if query.can_recover_lost_work() {
                        tracing::warn!(query = %query.id, attempt, "worker {who} lost; re-running its work from checkpoint {from:?}");
                        carry = launched;
                    } else {
                        tracing::warn!(query = %query.id, attempt, "worker {who} lost; rolling back to checkpoint {from:?}");
                        // Every worker drops the attempt's state.
                        cancel_on(&placed, query.id, attempt);
                        rolling_back = true;
                    }
                }
                AttemptEnd::Rebalance => {
                    backoff = Duration::ZERO;
                    tracing::info!(query = %query.id, attempt, "rebalancing at a group boundary");
                    cancel_on(&placed, query.id, attempt);
                }
            }
        };
        cancel_on(&placed, query.id, 0);
        result
    }

    /// Plans lost-work recovery from what the last attempt launched: its
    /// live workers keep their partitions, the lost workers' partitions move
    /// to the least loaded live ones that are not draining. A fresh start
    /// when none may take them.
    fn continue_from(&self, query: &CompiledQuery, carry: Carry, attempt: u64) -> Start {
        let (keep, take): (Vec<bool>, Vec<bool>) = {
            let workers = self.state.workers.read();
            carry
                .layout
                .workers
                .iter()
                .map(|p| match workers.get(&p.id) {
                    Some(w) if w.epoch == p.epoch && self.state.is_live(w) => (true, !w.draining),
                    _ => (false, false),
                })
                .unzip()
        };
        // A lost worker that is merely cut off drops the query when it hears.
        let gone: Vec<Placed> = carry
            .layout
            .workers
            .iter()
            .zip(&keep)
            .filter(|(_, k)| !**k)
            .map(|(p, _)| p.clone())
            .collect();
        cancel_on(&gone, query.id, attempt - 1);
        match carry.layout.after_loss(&keep, &take) {
            Some((layout, moved)) if !layout.workers.is_empty() => Start::Continue {
                layout,
                next_batch: carry.next_batch,
                moved,
            },
            _ => {
                // Nobody to continue on: every survivor drops the query.
                cancel_on(&carry.layout.workers, query.id, attempt - 1);
                Start::Fresh { after_loss: true }
            }
        }
    }

    /// One attempt of a query; see [`Runtime::coordinate`]. Returns why it
    /// ended and what it had launched.
    #[allow(clippy::too_many_arguments)]
    async fn run_attempt(
        &self,
        query: &Arc<CompiledQuery>,
        attempt: u64,
        resume: Option<Manifest>,
        start: Start,
        done: &mut watch::Receiver<u64>,
        reports: &mut mpsc::UnboundedReceiver<pb::GroupReport>,
        map_done: &mut mpsc::UnboundedReceiver<pb::MapOutputReady>,
    ) -> (AttemptEnd, Option<Carry>) {
        let cancel = &query.cancel;
        let map_partitions: Vec<u32> = (0..query.inputs.len())
            .map(|s| query.partitions(s))
            .collect();
        let first_batch = resume.as_ref().map_or(0, |m| m.batch + 1);
        let restored_from = resume.as_ref().map_or("the start".to_string(), |m| {
            format!("checkpoint {}", m.batch)
        });
        // Placement, frozen for the attempt: consumers first, then producers.
        // Each placed worker's registration epoch goes with its launches: a
        // worker that registered again since (a new worker) refuses them.
        let mut recovering = false;
        let (layout, mut next_batch) = match start {
            Start::Fresh { after_loss } => {
                recovering = after_loss;
                let workers: Vec<Placed> = self
                    .state
                    .workers
                    .read()
                    .values()
                    .filter(|w| !w.draining && self.state.is_live(w))
                    .map(|w| Placed {
                        id: w.id,
                        address: w.address.clone(),
                        client: w.client.clone(),
                        epoch: w.epoch,
                    })
                    .collect();
                if workers.is_empty() {
                    // Every worker is draining: wait for one to come.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    return (AttemptEnd::Rebalance, None);
                }
                let reduce_partitions = if query.plan.has_shuffle() {
                    query.target_partitions.load(Ordering::Acquire).max(1)
                } else {
                    0
                };
                query.generation.store(attempt, Ordering::Release);
                (
                    Layout::spread(workers, &map_partitions, reduce_partitions),
                    first_batch,
                )
            }
            Start::Continue {
                layout,
                next_batch,
                moved,
            } => {
                query
                    .status
                    .recovered_partitions
                    .fetch_add(u64::from(moved), Ordering::Relaxed);
                *query.status.last_recovery.lock() = Some(format!(
                    "lost work: {moved} of {} partitions restored from {} on {} workers",
                    layout.partitions(),
                    restored_from,
                    layout.workers.len()
                ));
                (layout, next_batch.max(first_batch))
            }
        };
        let generation = query.generation.load(Ordering::Acquire);
        if recovering {
            // A rollback after a loss restores every partition.
            query
                .status
                .recovered_partitions
                .fetch_add(layout.partitions() as u64, Ordering::Relaxed);
            *query.status.last_recovery.lock() = Some(format!(
                "rollback: all {} partitions restored from {} on {} workers",
                layout.partitions(),
                restored_from,
                layout.workers.len()
            ));
        }
        let placement = &layout.workers;
        *query.owners.lock() = Owners::of(&layout);
        self.state
            .placements
            .lock()
            .insert(query.id, placement.iter().map(|p| p.id).collect());
        let reduce_partitions = layout.reduces.len() as u32;
        query
            .status
            .reduce_partitions
            .store(reduce_partitions, Ordering::Relaxed);
        let final_tasks = if reduce_partitions > 0 {
            reduce_partitions
        } else {
            query.partitions(0)
        };
        let _ = query.sink.send(SinkMsg::Attempt {
            generation,
            final_tasks,
        });
        query
            .pending_checkpoints
            .lock()
            .retain(|_, p| p.attempt >= attempt);
        let reduce_placement: Vec<String> = layout
            .reduces
            .iter()
            .map(|&slot| placement[slot].address.clone())
            .collect();
        let map_owners = layout.map_owners();
        let mode = match query.scheduling {
            Scheduling::Drizzle => SchedulingMode::Drizzle,
            Scheduling::GroupOnly | Scheduling::Bsp => SchedulingMode::Bsp,
        };
        // Ten checkpoint intervals without a checkpoint: the store is failing.
        let stall = (self.state.checkpoint_interval * 10).max(Duration::from_secs(2));
        let restore = resume.as_ref().map(|m| pb::Restore {
            batch: m.batch,
            reduce_partitions: m.reduce_partitions,
            states: m
                .states
                .iter()
                .map(|s| pb::StateRef {
                    partition: s.partition,
                    path: s.path.clone(),
                    chain: s.chain.clone(),
                })
                .collect(),
        });
        let start_of = |stage: usize, p: u32| -> (u64, Option<i64>) {
            if let Some(m) = &resume {
                if let Some(c) = m
                    .maps
                    .iter()
                    .find(|c| c.stage as usize == stage && c.partition == p)
                {
                    return (c.next_offset, c.max_event_us);
                }
            }
            let offset = query
                .inputs
                .get(stage)
                .and_then(|i| i.start_offsets.get(p as usize).copied())
                .unwrap_or(0);
            (offset, None)
        };
        let carry = |next_batch: u64| {
            Some(Carry {
                layout: layout.clone(),
                next_batch,
            })
        };
        let mut plan_sent = vec![false; placement.len()];
        let mut last_boundary: Option<Instant> = None;
        let mut coordinated = Duration::ZERO;
        let mut group = 0u64;
        let mut last_checkpoint_at = Instant::now();
        // The checkpoint that ends this attempt (a rebalance), once launched.
        let mut closing: Option<u64> = None;
        // BSP: notices per batch, collected by the coordinator.
        let mut barrier: BTreeMap<u64, Vec<pb::MapOutputReady>> = BTreeMap::new();
        let reduce_workers: Vec<usize> = {
            let mut v = layout.reduces.clone();
            v.sort();
            v.dedup();
            v
        };
        let checkpoints_on = self.state.checkpoints.is_some();
        loop {
            if cancel.is_cancelled() {
                return (AttemptEnd::Cancelled, carry(next_batch));
            }
            if let Some(lost) = self.lost_worker(placement) {
                return (AttemptEnd::WorkerLost(lost), carry(next_batch));
            }
            if let Some(target) = closing {
                // Rebalancing: no more groups; wait for the closing checkpoint.
                if query
                    .last_checkpoint
                    .lock()
                    .as_ref()
                    .is_some_and(|m| m.batch >= target)
                {
                    return (AttemptEnd::Rebalance, carry(next_batch));
                }
            } else {
                let t0 = Instant::now();
                if query.status.adaptive {
                    // A group boundary: adapt to the last group's coordination share.
                    if let Some(since) = last_boundary {
                        let wall = t0.saturating_duration_since(since).as_secs_f64();
                        let share = coordinated.as_secs_f64() / wall.max(1e-9);
                        let g = query.status.group_size.load(Ordering::Relaxed);
                        query
                            .status
                            .group_size
                            .store(self.state.adaptive.next(g, share), Ordering::Relaxed);
                    }
                    last_boundary = Some(t0);
                    coordinated = Duration::ZERO;
                }
                let g = query.status.group_size.load(Ordering::Relaxed).max(1) as u64;
                let rebalance =
                    checkpoints_on && self.needs_rebalance(query, placement, reduce_partitions);
                let checkpoint = checkpoints_on
                    && (rebalance
                        || last_checkpoint_at.elapsed() >= self.state.checkpoint_interval);
                if checkpoint {
                    last_checkpoint_at = Instant::now();
                }
                // A recovery's first group also re-covers, for the partitions
                // it moved, every batch since the checkpoint (the survivors
                // skip what they already ran).
                let from = if group == 0 { first_batch } else { next_batch };
                // Map outputs are kept for lost-work recovery (see `coordinate`)
                // while checkpoints keep releasing them.
                query.check_retention(stall, from);
                let retain_blocks = query.retaining.load(Ordering::Acquire);
                let batches: Vec<pb::BatchParams> = (from..next_batch + g)
                    .map(|b| pb::BatchParams {
                        batch: b,
                        trigger_unix_us: query.start_unix_us
                            + query.offset_of(BatchId(b)).as_micros() as i64,
                    })
                    .collect();
                let tables_version = self.state.tables.version();
                let covered_through = query.last_checkpoint.lock().as_ref().map(|m| m.batch);
                // A rebalance's closing checkpoint is written in full: the
                // attempt waits for it, so it must never depend on a base.
                let delta_base = if rebalance { None } else { query.delta_base() };
                let mut sends = Vec::new();
                let mut sent_to = Vec::new();
                for (i, placed) in placement.iter().enumerate() {
                    let mut map_tasks: Vec<pb::MapTaskSpec> = Vec::new();
                    for (stage, slots) in layout.maps.iter().enumerate() {
                        map_tasks.extend((0u32..).zip(slots).filter(|(_, &slot)| slot == i).map(
                            |(p, _)| {
                                let (start, max_event) = start_of(stage, p);
                                pb::MapTaskSpec {
                                    partition: p,
                                    stage: stage as u32,
                                    start_offset: (!plan_sent[i]).then_some(start),
                                    max_event_us: if plan_sent[i] { None } else { max_event },
                                }
                            },
                        ));
                    }
                    let reduce_tasks: Vec<u32> = (0u32..)
                        .zip(&layout.reduces)
                        .filter(|(_, &slot)| slot == i)
                        .map(|(r, _)| r)
                        .collect();
                    if map_tasks.is_empty() && reduce_tasks.is_empty() {
                        continue;
                    }
                    let req = pb::LaunchGroupRequest {
                        protocol_version: PROTOCOL_VERSION,
                        query: query.id.0,
                        group,
                        epoch: placed.epoch,
                        plan: if plan_sent[i] {
                            Vec::new()
                        } else {
                            query.encoded_plan.clone()
                        },
                        mode: mode as i32,
                        map_partitions: query.partitions(0),
                        reduce_partitions,
                        reduce_placement: reduce_placement.clone(),
                        map_tasks,
                        reduce_tasks,
                        batches: batches.clone(),
                        label: query.status.label.clone(),
                        tables_version,
                        shuffle_inputs: if reduce_partitions > 0 {
                            map_partitions.clone()
                        } else {
                            Vec::new()
                        },
                        attempt,
                        checkpoint,
                        restore: if plan_sent[i] { None } else { restore.clone() },
                        generation,
                        map_owners: map_owners.clone(),
                        retain_blocks,
                        covered_through,
                        memory_limit: query.status.memory_limit,
                        delta_base,
                        query_token: query.token.0.to_vec(),
                    };
                    plan_sent[i] = true;
                    sent_to.push(placed.id);
                    let mut client = placed.client.clone();
                    let who = placed.clone();
                    sends.push(async move {
                        // A partitioned worker never answers: bound the wait.
                        let r = tokio::time::timeout(LAUNCH_TIMEOUT, client.launch_group(req))
                            .await
                            .unwrap_or_else(|_| Err(Status::deadline_exceeded("launch timed out")));
                        (who, r)
                    });
                }
                let n = sends.len() as u64;
                let mut failed = None;
                for (who, r) in futures::future::join_all(sends).await {
                    if let Err(s) = r {
                        // A worker that cannot take its launch is gone (dead,
                        // cut off, or registered again): forgotten, so that no
                        // attempt counts on its state again.
                        tracing::warn!(query = %query.id, "launch to worker {} ({}) failed: {}", who.id.0, who.address, s.message());
                        self.state
                            .forget_worker(who.id, who.epoch, "its launch failed");
                        failed = Some(format!("{} ({})", who.id.0, who.address));
                    }
                }
                if let Some(who) = failed {
                    // Survivors that took the launch hold its batches: a
                    // continuation re-covers them.
                    return (AttemptEnd::WorkerLost(who), carry(next_batch + g));
                }
                {
                    let mut workers = self.state.workers.write();
                    for id in sent_to {
                        if let Some(w) = workers.get_mut(&id) {
                            w.launches_sent += 1;
                        }
                    }
                }
                query.status.launches.fetch_add(n, Ordering::Relaxed);
                query.status.groups.fetch_add(1, Ordering::Relaxed);
                self.state.launch_messages.fetch_add(n, Ordering::Relaxed);
                let spent = t0.elapsed();
                coordinated += spent;
                query
                    .status
                    .coordination_us
                    .fetch_add(spent.as_micros() as u64, Ordering::Relaxed);
                next_batch += g;
                group += 1;
                if rebalance {
                    closing = Some(next_batch - 1);
                    continue;
                }
            }
            // Drizzle ships the next group once the previous one is done and
            // this one is half way through the previous one's length: about
            // one group ahead, so a boundary never stalls the pipeline (with
            // G = 1 too). BSP waits for its batch: that barrier is BSP.
            let g = query.status.group_size.load(Ordering::Relaxed).max(1) as u64;
            let threshold = match (closing, query.scheduling) {
                (Some(_), _) => u64::MAX,
                (None, Scheduling::Bsp) => next_batch,
                (None, _) => next_batch.saturating_sub(g) + g / 2,
            };
            loop {
                if *done.borrow() >= threshold || cancel.is_cancelled() {
                    break;
                }
                let workers_changed = self.state.workers_changed.notified();
                let progress = query.checkpoint_progress.notified();
                if let Err(e) = self.commit_checkpoints(query, attempt).await {
                    tracing::warn!(query = %query.id, "checkpoint not written: {e}");
                }
                if closing.is_some_and(|target| {
                    query
                        .last_checkpoint
                        .lock()
                        .as_ref()
                        .is_some_and(|m| m.batch >= target)
                }) {
                    break;
                }
                if let Some(lost) = self.lost_worker(placement) {
                    return (AttemptEnd::WorkerLost(lost), carry(next_batch));
                }
                if closing.is_none()
                    && checkpoints_on
                    && self.needs_rebalance(query, placement, reduce_partitions)
                {
                    break; // plan the closing group now
                }
                tokio::select! {
                    r = done.changed() => if r.is_err() { return (AttemptEnd::Cancelled, carry(next_batch)) },
                    _ = cancel.notify.notified() => return (AttemptEnd::Cancelled, carry(next_batch)),
                    _ = workers_changed => {}
                    _ = progress => {}
                    Some(report) = reports.recv() => {
                        tracing::trace!(query = %query.id, group = report.group, worker = report.worker, "group report");
                    }
                    Some(notice) = map_done.recv() => {
                        if notice.attempt != attempt {
                            continue;
                        }
                        let t0 = Instant::now();
                        let batch = notice.batch;
                        let list = barrier.entry(batch).or_default();
                        list.push(notice);
                        if list.len() as u32 >= query.total_map_partitions() {
                            let notices = barrier.remove(&batch).unwrap_or_default();
                            let mut sends = Vec::new();
                            for &i in &reduce_workers {
                                let mut client = placement[i].client.clone();
                                let req = pb::LaunchReduceRequest {
                                    query: query.id.0,
                                    batch,
                                    notices: notices.clone(),
                                };
                                sends.push(async move {
                                    tokio::time::timeout(LAUNCH_TIMEOUT, client.launch_reduce(req))
                                        .await
                                        .unwrap_or_else(|_| Err(Status::deadline_exceeded("launch timed out")))
                                });
                            }
                            let failed = futures::future::join_all(sends)
                                .await
                                .into_iter()
                                .find_map(|r| r.err());
                            let spent = t0.elapsed();
                            coordinated += spent;
                            query
                                .status
                                .coordination_us
                                .fetch_add(spent.as_micros() as u64, Ordering::Relaxed);
                            if let Some(s) = failed {
                                return (AttemptEnd::WorkerLost(format!("(launching reduce tasks: {})", s.message())), carry(next_batch));
                            }
                        }
                    }
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }

    /// At a boundary: should the next group close this attempt (a worker is
    /// draining, a new one is idle, or the parallelism changed)?
    fn needs_rebalance(
        &self,
        query: &CompiledQuery,
        placement: &[Placed],
        reduce_partitions: u32,
    ) -> bool {
        if query.plan.has_shuffle()
            && query.target_partitions.load(Ordering::Acquire) != reduce_partitions
        {
            return true;
        }
        let workers = self.state.workers.read();
        let live = workers.values().filter(|w| !w.draining).count();
        live != placement.len()
            || placement
                .iter()
                .any(|p| workers.get(&p.id).is_none_or(|w| w.draining))
    }

    /// Writes every complete checkpoint of the attempt whose batches the
    /// sink has committed.
    async fn commit_checkpoints(&self, query: &CompiledQuery, attempt: u64) -> Result<()> {
        let Some(store) = self.state.checkpoints.as_ref() else {
            return Ok(());
        };
        let Some(committed) = query.committed_through() else {
            return Ok(());
        };
        let maps = query.total_map_partitions() as usize;
        let reduces = query.status.reduce_partitions.load(Ordering::Acquire) as usize;
        let ready = {
            let pending = query.pending_checkpoints.lock();
            pending
                .iter()
                .rev()
                .find(|(b, p)| {
                    **b <= committed
                        && p.attempt == attempt
                        && p.maps.len() >= maps
                        && p.states.len() >= reduces
                })
                .map(|(b, p)| (*b, p.maps.clone(), p.states.clone()))
        };
        let Some((batch, mut map_states, mut states)) = ready else {
            return Ok(());
        };
        map_states.sort_by_key(|m| (m.stage, m.partition));
        map_states.dedup_by_key(|m| (m.stage, m.partition));
        states.sort_by_key(|(s, _)| s.partition);
        states.dedup_by_key(|(s, _)| s.partition);
        let Some(states) = query.resolve_chains(states) else {
            tracing::warn!(
                query = %query.id,
                batch,
                "a checkpoint delta's base is no longer kept: dropped; the next is written in full"
            );
            query.pending_checkpoints.lock().retain(|b, _| *b > batch);
            query.full_checkpoint_next.store(true, Ordering::Release);
            return Ok(());
        };
        let full = states.iter().all(|s| s.chain.is_empty());
        let manifest = Manifest {
            key: query.key.clone(),
            batch,
            origin_unix_us: query.start_unix_us,
            interval_us: query.interval.as_micros() as u64,
            reduce_partitions: reduces as u32,
            maps: map_states,
            states,
            last_emitted: Some(committed),
            created_unix_ms: unix_us() / 1000,
        };
        store.commit(&manifest).await?;
        query.pending_checkpoints.lock().retain(|b, _| *b > batch);
        if full {
            query.full_checkpoint_next.store(false, Ordering::Release);
        }
        *query.status.last_checkpoint.lock() = Some((batch, Instant::now(), manifest.bytes()));
        {
            let mut kept = query.kept_checkpoints.lock();
            kept.push(manifest.clone());
            let excess = kept.len().saturating_sub(crate::checkpoint::KEEP);
            kept.drain(..excess);
        }
        *query.last_checkpoint.lock() = Some(manifest);
        Ok(())
    }

    /// A worker of `placement` that is gone (deregistered or silent).
    fn lost_worker(&self, placement: &[Placed]) -> Option<String> {
        let lost = {
            let workers = self.state.workers.read();
            placement.iter().find_map(|p| match workers.get(&p.id) {
                Some(w) if w.epoch == p.epoch && self.state.is_live(w) => None,
                _ => Some((p.id, p.epoch, format!("{} ({})", p.id.0, p.address))),
            })
        };
        let (id, epoch, who) = lost?;
        // Forgotten at once, so that the next attempt does not place on it.
        self.state.forget_worker(id, epoch, "it went silent");
        Some(who)
    }
}

/// Tells `workers` to drop `query` (`attempt` and older; 0: every
/// attempt), in the background and bounded: a hung worker gets nothing.
fn cancel_on(workers: &[Placed], query: QueryId, attempt: u64) {
    for placed in workers {
        let mut client = placed.client.clone();
        let req = pb::CancelQueryRequest {
            query: query.0,
            attempt,
        };
        tokio::spawn(async move {
            let _ = tokio::time::timeout(LAUNCH_TIMEOUT, client.cancel_query(req)).await;
        });
    }
}

/// How long a launch may take before its worker counts as lost.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(5);

/// A worker an attempt placed tasks on.
#[derive(Clone)]
struct Placed {
    id: WorkerId,
    address: String,
    client: pb::worker_client::WorkerClient<crate::cluster::ClusterChannel>,
    epoch: u64,
}

/// Where an attempt runs every partition; frozen for the attempt.
#[derive(Clone)]
struct Layout {
    /// The workers placed on; an index into this is a *slot*.
    workers: Vec<Placed>,
    /// Per input stage, per map partition: its slot.
    maps: Vec<Vec<usize>>,
    /// Per reduce partition: its slot (consumers are placed first).
    reduces: Vec<usize>,
}

impl Layout {
    /// Sticky placement over `workers`: reduce partition `r` on slot
    /// `r mod W`, then input stage `s`'s partition `p` on slot
    /// `(offset_s + p) mod W`, where `offset_s` counts the partitions of the
    /// stages before `s`.
    fn spread(workers: Vec<Placed>, map_partitions: &[u32], reduce_partitions: u32) -> Self {
        let w = workers.len().max(1);
        let reduces = (0..reduce_partitions as usize).map(|r| r % w).collect();
        let mut offset = 0usize;
        let maps = map_partitions
            .iter()
            .map(|&n| {
                let slots = (0..n as usize).map(|p| (offset + p) % w).collect();
                offset += n as usize;
                slots
            })
            .collect();
        Self {
            workers,
            maps,
            reduces,
        }
    }

    /// The layout after some workers were lost: `keep[slot]` says whether a
    /// slot survived (it keeps every partition it holds), `take[slot]`
    /// whether it may take lost partitions. Returns the new layout and the
    /// number of partitions moved, or `None` when partitions must move and
    /// no survivor may take them.
    fn after_loss(&self, keep: &[bool], take: &[bool]) -> Option<(Self, u32)> {
        let (maps, reduces, moved) = reassign(keep, take, &self.maps, &self.reduces)?;
        // Renumber the surviving slots.
        let mut slot_of = vec![usize::MAX; self.workers.len()];
        let mut workers = Vec::new();
        for (i, w) in self.workers.iter().enumerate() {
            if keep.get(i).copied().unwrap_or(false) {
                slot_of[i] = workers.len();
                workers.push(w.clone());
            }
        }
        let renumber = |s: &usize| slot_of[*s];
        Some((
            Self {
                workers,
                maps: maps
                    .iter()
                    .map(|slots| slots.iter().map(renumber).collect())
                    .collect(),
                reduces: reduces.iter().map(renumber).collect(),
            },
            moved,
        ))
    }

    /// Worker ids owning each map partition, input stages in order.
    fn map_owners(&self) -> Vec<u32> {
        self.maps
            .iter()
            .flatten()
            .map(|&slot| self.workers[slot].id.0)
            .collect()
    }

    /// Partitions (map and reduce) in all.
    fn partitions(&self) -> usize {
        self.maps.iter().map(Vec::len).sum::<usize>() + self.reduces.len()
    }
}

/// Moves every partition of a slot that is not kept to the least loaded slot
/// that may take partitions, reduce partitions first (consumers are placed
/// before producers), so the replay is spread over all survivors. Kept slots
/// keep every partition they hold. Returns the new slots per partition and
/// how many moved, or `None` when some partition has nowhere to go.
fn reassign(
    keep: &[bool],
    take: &[bool],
    maps: &[Vec<usize>],
    reduces: &[usize],
) -> Option<(Vec<Vec<usize>>, Vec<usize>, u32)> {
    let kept = |s: usize| keep.get(s).copied().unwrap_or(false);
    let mut load = vec![0usize; keep.len()];
    for &s in reduces.iter().chain(maps.iter().flatten()) {
        if kept(s) {
            load[s] += 1;
        }
    }
    let mut moved = 0u32;
    let mut place = |s: usize| -> Option<usize> {
        if kept(s) {
            return Some(s);
        }
        let to = (0..keep.len())
            .filter(|&t| kept(t) && take.get(t).copied().unwrap_or(false))
            .min_by_key(|&t| (load[t], t))?;
        load[to] += 1;
        moved += 1;
        Some(to)
    };
    let reduces = reduces
        .iter()
        .map(|&s| place(s))
        .collect::<Option<Vec<_>>>()?;
    let maps = maps
        .iter()
        .map(|slots| slots.iter().map(|&s| place(s)).collect::<Option<Vec<_>>>())
        .collect::<Option<Vec<_>>>()?;
    Some((maps, reduces, moved))
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

/// Why an attempt ended.
enum AttemptEnd {
    Cancelled,
    /// A placed worker is gone: recover from the last checkpoint.
    WorkerLost(String),
    /// The closing checkpoint of a rebalance is written.
    Rebalance,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Pushes the table version to every worker when a table or view changes,
/// so lookup joins re-read their finite side.
async fn watch_tables(state: Arc<State>, mut stop: watch::Receiver<bool>) {
    let mut last = state.tables.version();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = stop.changed() => return,
        }
        let version = state.tables.version();
        if version == last {
            continue;
        }
        last = version;
        let clients: Vec<_> = state
            .workers
            .read()
            .values()
            .map(|w| w.client.clone())
            .collect();
        for mut c in clients {
            tokio::spawn(async move {
                let req = pb::TablesChangedRequest { version };
                let _ = tokio::time::timeout(LAUNCH_TIMEOUT, c.tables_changed(req)).await;
            });
        }
    }
}

/// Forgets workers that stopped heartbeating.
async fn watch_workers(state: Arc<State>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.changed() => return,
        }
        let timeout = state.worker_timeout;
        let silent: Vec<(WorkerId, u64)> = state
            .workers
            .read()
            .values()
            .filter(|w| !state.is_live(w))
            .map(|w| (w.id, w.epoch))
            .collect();
        for (id, epoch) in silent {
            state.forget_worker(id, epoch, &format!("no heartbeat for {timeout:?}"));
        }
    }
}

/// The sink side: gathers final-stage outputs and emits them in batch order.
async fn collect(
    query: Arc<CompiledQuery>,
    mut sink: mpsc::UnboundedReceiver<SinkMsg>,
    results: mpsc::Sender<Result<EmittedBatch>>,
    done: watch::Sender<u64>,
    cancel: Arc<CancelToken>,
) {
    // Per batch, each final task's output (a task re-run by a later attempt
    // replaces, never adds to, its partition's output: tasks are
    // deterministic, so any attempt of a generation computes the same rows).
    let mut pending: BTreeMap<u64, BTreeMap<u32, Chunks>> = BTreeMap::new();
    let mut generation = 0u64;
    let mut final_tasks = u32::MAX;
    // Batches below `next` were released: results for them are duplicates.
    let mut next = query.released.load(Ordering::Acquire);
    let mut remaining = query.plan.limit;
    let schema = Arc::clone(&query.plan.output_schema);
    let end = |reason: &str| {
        *query.status.ended.lock() = Some(reason.to_string());
    };
    loop {
        let cancelled = cancel.notify.notified();
        let msg = if cancel.is_cancelled() {
            None
        } else {
            tokio::select! {
                m = sink.recv() => m,
                _ = cancelled => None,
                _ = results.closed() => None,
            }
        };
        let Some(msg) = msg else {
            end("cancelled");
            cancel.cancel();
            // A client still listening learns why its query ended (CANCEL QUERY).
            let _ = results.try_send(Err(ExecError::Cancelled));
            return;
        };
        match msg {
            SinkMsg::Failed(e) => {
                end(&e.to_string());
                let _ = results.send(Err(e)).await;
                cancel.cancel();
                return;
            }
            SinkMsg::Attempt {
                generation: g,
                final_tasks: n,
            } => {
                if g != generation || n != final_tasks {
                    // A new generation re-runs every unreleased batch; lost-work
                    // recovery keeps the survivors' outputs (the lost
                    // partitions' are delivered again).
                    pending.clear();
                }
                generation = g;
                final_tasks = n;
            }
            SinkMsg::Output {
                attempt: a,
                batch,
                partition,
                chunks,
            } => {
                if a >= generation && batch.0 >= next {
                    pending
                        .entry(batch.0)
                        .or_default()
                        .insert(partition, chunks);
                }
            }
        }
        while pending
            .get(&next)
            .is_some_and(|parts| parts.len() as u32 >= final_tasks)
        {
            let Some(parts) = pending.remove(&next) else {
                break;
            };
            let mut chunks: Chunks = parts.into_values().flatten().collect();
            // Closed windows in window order, whatever partition they came from.
            chunks.sort_by_key(|(w, _)| *w);
            let batches: Vec<RecordBatch> = chunks
                .into_iter()
                .map(|(_, b)| b)
                .filter(|b| b.num_rows() > 0)
                .collect();
            let mut rows = match arrow::compute::concat_batches(&schema, &batches) {
                Ok(r) => r,
                Err(e) => {
                    let _ = results.send(Err(e.into())).await;
                    cancel.cancel();
                    return;
                }
            };
            let mut finished = false;
            if let Some(left) = remaining.as_mut() {
                if rows.num_rows() >= *left {
                    rows = rows.slice(0, *left);
                    finished = true;
                }
                *left -= rows.num_rows();
            }
            let status = &query.status;
            status.batches.fetch_add(1, Ordering::Relaxed);
            status
                .rows_out
                .fetch_add(rows.num_rows() as u64, Ordering::Relaxed);
            let latency = Instant::now().saturating_duration_since(query.trigger_at(BatchId(next)));
            status
                .last_latency_us
                .store(latency.as_micros() as u64, Ordering::Relaxed);
            {
                let mut recent = status.recent_latencies_us.lock();
                if recent.len() == RECENT_BATCHES {
                    recent.pop_front();
                }
                recent.push_back(latency.as_micros().min(u32::MAX as u128) as u32);
            }
            {
                let mut emits = status.recent_emits.lock();
                if emits.len() == RECENT_BATCHES {
                    emits.pop_front();
                }
                emits.push_back((
                    Instant::now(),
                    next,
                    status.group_size.load(Ordering::Relaxed),
                ));
            }
            if rows.num_rows() > 0 || finished {
                let emitted = EmittedBatch {
                    batch: BatchId(next),
                    rows,
                };
                query.last_sent_rows.store(next + 1, Ordering::Release);
                if results.send(Ok(emitted)).await.is_err() {
                    end("client gone");
                    cancel.cancel();
                    return;
                }
            }
            next += 1;
            query.released.store(next, Ordering::Release);
            let _ = done.send(next);
            if finished {
                end("limit reached");
                cancel.cancel();
                return;
            }
        }
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
