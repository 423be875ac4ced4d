//! The micro-batch runtime: coordinator, workers and the result collector.
//!
//! ```text
//!             one LaunchGroup per worker per group (G micro-batches)
//!  Coordinator ───────────────────────────────────────────────▶ Worker k
//!      ▲   GroupReport (once per worker per group)                 │ map task (b, p) at trigger time
//!      └──────────────────────────────────────────────────────────┤ writes blocks to the BlockStore,
//!                                                                  │ sends MapOutputReady ──▶ consumer's worker
//!                                                                  │ reduce task (b, r) when all notices are in
//!  Collector (sink side) ◀── TaskOutput (final-stage tasks) ───────┘
//!      └─▶ client session / materialized view, in batch order
//! ```
//!
//! # Invariants
//! * Group scheduling: the coordinator sends exactly one [`LaunchGroup`] to
//!   each worker hosting a task per group of `G` micro-batches, and nothing
//!   per micro-batch; workers trigger batch `b` at `start + (b+1)·interval`
//!   on their own clocks.
//! * Pre-scheduling: reduce partitions are placed before map partitions
//!   (consumers first) and every launch carries the placement, so a map task
//!   notifies consumers directly. A reduce task holds no slot until it has a
//!   notice from every map partition for its batch (all shuffle inputs).
//! * Order: a worker runs its runnable tasks earliest batch first, consumers
//!   before producers of the same batch; map partition `p` runs batches in
//!   order, so its notices arrive in order and reduce tasks run in order.
//! * Placement is sticky: partition `i` lives on worker `i mod W` for the
//!   life of the query, so task state (source cursor, watermark, keyed
//!   aggregate state) stays local across batches and groups.
//! * Only the worker thread owning a partition touches its state.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use drizzle_planner::{BatchOp, EmitMode, StreamingPlan};
use drizzle_shuffle::{
    BatchId, BlockId, BlockStore, MapPartition, QueryId, ReducePartition, StageId,
};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch, Notify};

use crate::error::{ExecError, Result};
use crate::ops::{
    apply_ops, partial_aggregate, AggregateFinalExec, JoinCache, TableEvaluator, WindowAssignExec,
};
use crate::source::{SourcePartition, MAX_BATCH_ROWS};

/// A worker (a task runtime with its own block store and scheduler).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u32);

/// A group of consecutive micro-batches scheduled together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub u64);

/// How the coordinator schedules a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduling {
    /// Group scheduling with pre-scheduled shuffles (the Drizzle design).
    Drizzle,
}

/// What a client asks the runtime to run.
pub struct QuerySpec {
    /// The plan.
    pub plan: StreamingPlan,
    /// The source partitions (one map task each).
    pub sources: Vec<SourcePartition>,
    /// Where each source partition starts (row offset).
    pub start_offsets: Vec<u64>,
    /// The micro-batch interval.
    pub batch_interval: Duration,
    /// Micro-batches per group.
    pub group_size: u32,
    /// Number of reduce partitions.
    pub reduce_partitions: u32,
    /// For SHOW QUERIES: the SQL or the view it feeds.
    pub label: String,
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
    /// Current group size.
    pub group_size: AtomicU32,
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
    /// When the query started.
    pub started: Instant,
    /// Set once the query ended, with the reason.
    pub ended: Mutex<Option<String>>,
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
}

impl QueryHandle {
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

/// Everything a worker needs to run one query's tasks; shared, immutable.
struct CompiledQuery {
    id: QueryId,
    plan: StreamingPlan,
    window_schema: Option<SchemaRef>,
    map_partitions: u32,
    reduce_partitions: u32,
    /// Reduce partition → worker (placed first).
    reduce_placement: Vec<WorkerId>,
    status: Arc<QueryStatus>,
    sink: mpsc::UnboundedSender<SinkMsg>,
    reports: mpsc::UnboundedSender<GroupReport>,
    start: Instant,
    interval: Duration,
}

impl CompiledQuery {
    fn trigger_at(&self, b: BatchId) -> Instant {
        self.start + Duration::from_nanos((self.interval.as_nanos() as u64).saturating_mul(b.0 + 1))
    }
}

/// The per-group launch message: a worker's tasks for `batches`.
pub struct LaunchGroup {
    query: Arc<CompiledQuery>,
    /// The group.
    pub group: GroupId,
    /// The micro-batches of the group.
    pub batches: std::ops::Range<u64>,
    /// Map partitions on this worker, with their source and start offset.
    map_tasks: Vec<(MapPartition, SourcePartition, u64)>,
    /// Reduce partitions on this worker.
    reduce_tasks: Vec<ReducePartition>,
}

/// Pushed by a map task to each consumer's worker when its output is ready.
#[derive(Debug, Clone)]
pub struct MapOutputReady {
    /// Query.
    pub query: QueryId,
    /// Micro-batch.
    pub batch: BatchId,
    /// Producing stage.
    pub stage: StageId,
    /// Producing map partition.
    pub map: MapPartition,
    /// Rows per reduce partition (0 = no block).
    pub rows: Vec<u32>,
    /// The source partition's watermark after this batch (µs).
    pub watermark_us: Option<i64>,
}

enum WorkerMsg {
    Launch(Box<LaunchGroup>),
    MapOutputReady(MapOutputReady),
    Cancel(QueryId),
    Shutdown,
}

/// Sent by a worker once it finished all its tasks of a group.
#[derive(Debug)]
struct GroupReport {
    #[allow(dead_code)]
    worker: WorkerId,
    group: GroupId,
    /// Source ranges read, per (batch, map partition): replayable.
    #[allow(dead_code)]
    ranges: Vec<SourceRange>,
}

/// Output chunks of one final-stage task: (window end, rows).
type Chunks = Vec<(Option<i64>, RecordBatch)>;

/// A source range read by a map task: (batch, partition, from, to).
type SourceRange = (BatchId, MapPartition, u64, u64);

enum SinkMsg {
    Output {
        batch: BatchId,
        chunks: Vec<(Option<i64>, RecordBatch)>,
    },
    Failed(ExecError),
}

/// The runtime: a coordinator and `W` local workers.
pub struct Runtime {
    workers: Vec<std_mpsc::Sender<WorkerMsg>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    next_query: AtomicU64,
    queries: Mutex<BTreeMap<QueryId, Arc<QueryStatus>>>,
    cancels: Mutex<HashMap<QueryId, Arc<CancelToken>>>,
    /// Total launch messages sent (all queries), for tests and metrics.
    pub launch_messages: AtomicU64,
}

impl Runtime {
    /// Starts `workers` worker threads.
    pub fn start(workers: usize, tables: Arc<dyn TableEvaluator>) -> Arc<Self> {
        let workers = workers.max(1);
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..workers {
            let (tx, rx) = std_mpsc::channel();
            senders.push(tx);
            receivers.push(rx);
        }
        let mut threads = Vec::new();
        let blocks = Arc::new(BlockStore::new());
        for (i, rx) in receivers.into_iter().enumerate() {
            let peers = senders.clone();
            let blocks = Arc::clone(&blocks);
            let tables = Arc::clone(&tables);
            let handle = std::thread::Builder::new()
                .name(format!("drizzle-worker-{i}"))
                .spawn(move || {
                    Worker {
                        id: WorkerId(i as u32),
                        peers,
                        tables,
                        blocks,
                        queries: HashMap::new(),
                    }
                    .run(rx)
                });
            match handle {
                Ok(h) => threads.push(h),
                Err(e) => tracing::error!("cannot start worker thread: {e}"),
            }
        }
        Arc::new(Self {
            workers: senders,
            threads: Mutex::new(threads),
            next_query: AtomicU64::new(1),
            queries: Mutex::new(BTreeMap::new()),
            cancels: Mutex::new(HashMap::new()),
            launch_messages: AtomicU64::new(0),
        })
    }

    /// Number of workers.
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Status of every running query.
    pub fn queries(&self) -> Vec<Arc<QueryStatus>> {
        self.queries.lock().values().cloned().collect()
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

    /// Stops every worker thread.
    pub fn shutdown(&self) {
        for w in &self.workers {
            let _ = w.send(WorkerMsg::Shutdown);
        }
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
    }

    /// Starts a continuous query. Must be called inside a tokio runtime.
    pub fn start_query(self: &Arc<Self>, spec: QuerySpec) -> Result<QueryHandle> {
        let id = QueryId(self.next_query.fetch_add(1, Ordering::Relaxed));
        let w = self.workers.len() as u32;
        let map_partitions = spec.sources.len() as u32;
        let reduce_partitions = if spec.plan.has_shuffle() {
            spec.reduce_partitions.max(1)
        } else {
            0
        };
        // Consumers first: reduce partitions are placed, then producers learn where they are.
        let reduce_placement: Vec<WorkerId> =
            (0..reduce_partitions).map(|r| WorkerId(r % w)).collect();
        let status = Arc::new(QueryStatus {
            id,
            label: spec.label.clone(),
            batch_interval: spec.batch_interval,
            group_size: AtomicU32::new(spec.group_size.max(1)),
            batches: AtomicU64::new(0),
            rows_in: AtomicU64::new(0),
            rows_out: AtomicU64::new(0),
            late_rows: AtomicU64::new(0),
            last_latency_us: AtomicU64::new(0),
            coordination_us: AtomicU64::new(0),
            launches: AtomicU64::new(0),
            recent_latencies_us: Mutex::new(std::collections::VecDeque::new()),
            started: Instant::now(),
            ended: Mutex::new(None),
        });
        let (sink_tx, sink_rx) = mpsc::unbounded_channel();
        let (report_tx, report_rx) = mpsc::unbounded_channel();
        let (results_tx, results_rx) = mpsc::channel(64);
        let cancel = Arc::new(CancelToken {
            cancelled: AtomicBool::new(false),
            notify: Notify::new(),
        });
        let window_schema = spec.plan.window.as_ref().map(|ws| {
            datafusion::datasource::TableProvider::schema(&drizzle_planner::WindowProvider::new(
                spec.plan.stream.clone(),
                ws.clone(),
            ))
        });
        let query = Arc::new(CompiledQuery {
            id,
            window_schema,
            map_partitions,
            reduce_partitions,
            reduce_placement,
            status: Arc::clone(&status),
            sink: sink_tx,
            reports: report_tx,
            start: Instant::now(),
            interval: spec.batch_interval,
            plan: spec.plan,
        });
        let schema = Arc::clone(&query.plan.output_schema);
        let emit = query.plan.emit;
        self.queries.lock().insert(id, Arc::clone(&status));
        self.cancels.lock().insert(id, Arc::clone(&cancel));
        let (done_tx, done_rx) = watch::channel(0u64);
        let final_tasks = if reduce_partitions > 0 {
            reduce_partitions
        } else {
            map_partitions
        };
        tokio::spawn(collect(
            Arc::clone(&query),
            sink_rx,
            results_tx,
            done_tx,
            final_tasks,
            Arc::clone(&cancel),
        ));
        let rt = Arc::clone(self);
        tokio::spawn(async move {
            rt.coordinate(
                query,
                spec.sources,
                spec.start_offsets,
                done_rx,
                report_rx,
                Arc::clone(&cancel),
            )
            .await;
            rt.queries.lock().remove(&id);
            rt.cancels.lock().remove(&id);
        });
        Ok(QueryHandle {
            id,
            status,
            schema,
            emit,
            results: results_rx,
            cancel: Arc::clone(&self.cancels.lock().get(&id).cloned().unwrap_or_else(|| {
                Arc::new(CancelToken {
                    cancelled: AtomicBool::new(true),
                    notify: Notify::new(),
                })
            })),
        })
    }

    /// The coordinator loop of one query: plan and ship one group at a time,
    /// shipping group g+1 while group g runs.
    async fn coordinate(
        &self,
        query: Arc<CompiledQuery>,
        sources: Vec<SourcePartition>,
        start_offsets: Vec<u64>,
        mut done: watch::Receiver<u64>,
        mut reports: mpsc::UnboundedReceiver<GroupReport>,
        cancel: Arc<CancelToken>,
    ) {
        let w = self.workers.len() as u32;
        let mut group = 0u64;
        let mut next_batch = 0u64;
        let mut first_launch = true;
        loop {
            if cancel.is_cancelled() {
                break;
            }
            let g = query.status.group_size.load(Ordering::Relaxed).max(1) as u64;
            let t0 = Instant::now();
            let batches = next_batch..next_batch + g;
            for worker in 0..w {
                let map_tasks: Vec<(MapPartition, SourcePartition, u64)> = if first_launch {
                    (0..query.map_partitions)
                        .filter(|p| p % w == worker)
                        .map(|p| {
                            (
                                MapPartition(p),
                                sources[p as usize].clone(),
                                start_offsets[p as usize],
                            )
                        })
                        .collect()
                } else {
                    (0..query.map_partitions)
                        .filter(|p| p % w == worker)
                        .map(|p| (MapPartition(p), sources[p as usize].clone(), u64::MAX))
                        .collect()
                };
                let reduce_tasks: Vec<ReducePartition> = (0..query.reduce_partitions)
                    .filter(|r| query.reduce_placement[*r as usize].0 == worker)
                    .map(ReducePartition)
                    .collect();
                if map_tasks.is_empty() && reduce_tasks.is_empty() {
                    continue;
                }
                let msg = WorkerMsg::Launch(Box::new(LaunchGroup {
                    query: Arc::clone(&query),
                    group: GroupId(group),
                    batches: batches.clone(),
                    map_tasks,
                    reduce_tasks,
                }));
                if self.workers[worker as usize].send(msg).is_err() {
                    cancel.cancel();
                }
                query.status.launches.fetch_add(1, Ordering::Relaxed);
                self.launch_messages.fetch_add(1, Ordering::Relaxed);
            }
            first_launch = false;
            query
                .status
                .coordination_us
                .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
            next_batch += g;
            group += 1;
            // Ship the next group once this one is half way through.
            let threshold = next_batch - g / 2;
            loop {
                if *done.borrow() >= threshold || cancel.is_cancelled() {
                    break;
                }
                tokio::select! {
                    r = done.changed() => if r.is_err() { cancel.cancel(); break; },
                    _ = cancel.notify.notified() => break,
                    Some(report) = reports.recv() => {
                        tracing::trace!(query = %query.id, group = report.group.0, "group report");
                    }
                }
            }
        }
        for tx in &self.workers {
            let _ = tx.send(WorkerMsg::Cancel(query.id));
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The sink side: gathers final-stage outputs and emits them in batch order.
async fn collect(
    query: Arc<CompiledQuery>,
    mut sink: mpsc::UnboundedReceiver<SinkMsg>,
    results: mpsc::Sender<Result<EmittedBatch>>,
    done: watch::Sender<u64>,
    final_tasks: u32,
    cancel: Arc<CancelToken>,
) {
    let mut pending: BTreeMap<u64, (u32, Chunks)> = BTreeMap::new();
    let mut next = 0u64;
    let mut remaining = query.plan.limit;
    let schema = Arc::clone(&query.plan.output_schema);
    let end = |reason: &str| {
        *query.status.ended.lock() = Some(reason.to_string());
    };
    loop {
        let msg = tokio::select! {
            m = sink.recv() => m,
            _ = cancel.notify.notified() => None,
            _ = results.closed() => None,
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
            SinkMsg::Output { batch, chunks } => {
                let entry = pending.entry(batch.0).or_insert((0, Vec::new()));
                entry.0 += 1;
                entry.1.extend(chunks);
            }
        }
        while pending.get(&next).is_some_and(|(n, _)| *n >= final_tasks) {
            let Some((_, mut chunks)) = pending.remove(&next) else {
                break;
            };
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
            if rows.num_rows() > 0 || finished {
                let emitted = EmittedBatch {
                    batch: BatchId(next),
                    rows,
                };
                if results.send(Ok(emitted)).await.is_err() {
                    end("client gone");
                    cancel.cancel();
                    return;
                }
            }
            next += 1;
            let _ = done.send(next);
            if finished {
                end("limit reached");
                cancel.cancel();
                return;
            }
        }
    }
}

struct MapState {
    source: SourcePartition,
    next_offset: u64,
    window: WindowAssignExec,
    joins: JoinCache,
}

struct ReduceState {
    agg: AggregateFinalExec,
    joins: JoinCache,
}

struct WorkerQuery {
    q: Arc<CompiledQuery>,
    maps: BTreeMap<MapPartition, MapState>,
    reduces: BTreeMap<ReducePartition, ReduceState>,
    /// Map tasks waiting for their trigger time.
    pending_maps: BTreeMap<(u64, MapPartition), ()>,
    /// Reduce tasks pre-scheduled, with the notices received so far.
    pending_reduces: BTreeMap<(u64, ReducePartition), Vec<MapOutputReady>>,
    /// Tasks left per group, for the per-group report.
    group_left: BTreeMap<u64, (usize, Vec<SourceRange>)>,
    group_size: u64,
    group_starts: BTreeMap<u64, u64>,
}

struct Worker {
    id: WorkerId,
    peers: Vec<std_mpsc::Sender<WorkerMsg>>,
    tables: Arc<dyn TableEvaluator>,
    /// In-process workers share one store: a local read skips the network.
    blocks: Arc<BlockStore>,
    queries: HashMap<QueryId, WorkerQuery>,
}

enum Task {
    Map(QueryId, u64, MapPartition),
    Reduce(QueryId, u64, ReducePartition),
}

fn unix_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl Worker {
    fn run(mut self, rx: std_mpsc::Receiver<WorkerMsg>) {
        loop {
            // Drain the inbox without blocking.
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

    /// Returns false on shutdown.
    fn handle(&mut self, msg: WorkerMsg) -> bool {
        match msg {
            WorkerMsg::Shutdown => return false,
            WorkerMsg::Cancel(q) => {
                self.queries.remove(&q);
                self.blocks.drop_query(q);
            }
            WorkerMsg::Launch(launch) => {
                let LaunchGroup {
                    query,
                    group,
                    batches,
                    map_tasks,
                    reduce_tasks,
                } = *launch;
                let wq = self.queries.entry(query.id).or_insert_with(|| WorkerQuery {
                    q: Arc::clone(&query),
                    maps: BTreeMap::new(),
                    reduces: BTreeMap::new(),
                    pending_maps: BTreeMap::new(),
                    pending_reduces: BTreeMap::new(),
                    group_left: BTreeMap::new(),
                    group_size: batches.end - batches.start,
                    group_starts: BTreeMap::new(),
                });
                for (p, source, start) in map_tasks {
                    wq.maps.entry(p).or_insert_with(|| MapState {
                        source,
                        next_offset: start,
                        window: WindowAssignExec::default(),
                        joins: JoinCache::default(),
                    });
                    for b in batches.clone() {
                        wq.pending_maps.insert((b, p), ());
                    }
                }
                for r in &reduce_tasks {
                    if !wq.reduces.contains_key(r) {
                        if let Some(agg) = &query.plan.aggregate {
                            wq.reduces.insert(
                                *r,
                                ReduceState {
                                    agg: AggregateFinalExec::new(agg.clone()),
                                    joins: JoinCache::default(),
                                },
                            );
                        }
                    }
                    for b in batches.clone() {
                        wq.pending_reduces.entry((b, *r)).or_default();
                    }
                }
                let tasks =
                    (wq.maps.len() + reduce_tasks.len()) * (batches.end - batches.start) as usize;
                wq.group_left.insert(group.0, (tasks, Vec::new()));
                wq.group_starts.insert(batches.start, group.0);
                wq.group_size = batches.end - batches.start;
            }
            WorkerMsg::MapOutputReady(notice) => {
                if let Some(wq) = self.queries.get_mut(&notice.query) {
                    for r in 0..wq.q.reduce_partitions {
                        if wq.q.reduce_placement[r as usize] == self.id {
                            if let Some(list) = wq
                                .pending_reduces
                                .get_mut(&(notice.batch.0, ReducePartition(r)))
                            {
                                list.push(notice.clone());
                            } else {
                                wq.pending_reduces.insert(
                                    (notice.batch.0, ReducePartition(r)),
                                    vec![notice.clone()],
                                );
                            }
                        }
                    }
                }
            }
        }
        true
    }

    /// The next runnable task, or how long to wait (None = until a message).
    fn next_task(&self, now: Instant) -> std::result::Result<Task, Option<Instant>> {
        let mut best: Option<(Instant, u8, Task)> = None;
        let mut wake: Option<Instant> = None;
        for (qid, wq) in &self.queries {
            // Ready consumers: every map partition's notice is in.
            if let Some(((b, r), _)) = wq
                .pending_reduces
                .iter()
                .find(|(_, notices)| notices.len() as u32 >= wq.q.map_partitions)
            {
                let at = wq.q.trigger_at(BatchId(*b));
                if best.as_ref().is_none_or(|(t, k, _)| (at, 0) < (*t, *k)) {
                    best = Some((at, 0, Task::Reduce(*qid, *b, *r)));
                }
            }
            if let Some(((b, p), _)) = wq.pending_maps.iter().next() {
                let at = wq.q.trigger_at(BatchId(*b));
                if at <= now {
                    if best.as_ref().is_none_or(|(t, k, _)| (at, 1) < (*t, *k)) {
                        best = Some((at, 1, Task::Map(*qid, *b, *p)));
                    }
                } else {
                    wake = Some(wake.map_or(at, |w: Instant| w.min(at)));
                }
            }
        }
        match best {
            Some((_, _, t)) => Ok(t),
            None => Err(wake),
        }
    }

    fn run_task(&mut self, task: Task) {
        let (qid, b) = match &task {
            Task::Map(q, b, _) | Task::Reduce(q, b, _) => (*q, *b),
        };
        // A panic in an operator fails the query, never the worker thread.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match task {
            Task::Map(q, b, p) => self.run_map(q, b, p),
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
        let Some(wq) = self.queries.get_mut(&qid) else {
            return;
        };
        if let Err(e) = result {
            let _ = wq.q.sink.send(SinkMsg::Failed(e));
            self.queries.remove(&qid);
            self.blocks.drop_query(qid);
            return;
        }
        // Per-group report once all of this worker's tasks of the group are done.
        let group = group_of(&wq.group_starts, b);
        if let Some((left, ranges)) = wq.group_left.get_mut(&group) {
            *left = left.saturating_sub(1);
            if *left == 0 {
                let ranges = std::mem::take(ranges);
                wq.group_left.remove(&group);
                let _ = wq.q.reports.send(GroupReport {
                    worker: self.id,
                    group: GroupId(group),
                    ranges,
                });
            }
        }
    }

    fn run_map(&mut self, qid: QueryId, b: u64, p: MapPartition) -> Result<()> {
        let Some(wq) = self.queries.get_mut(&qid) else {
            return Ok(());
        };
        wq.pending_maps.remove(&(b, p));
        let q = Arc::clone(&wq.q);
        let Some(state) = wq.maps.get_mut(&p) else {
            return Err(ExecError::invalid(format!(
                "map partition {p} not on this worker"
            )));
        };
        let from = state.next_offset;
        let to = state
            .source
            .available(unix_us())
            .min(from.saturating_add(MAX_BATCH_ROWS))
            .max(from);
        let pieces = state.source.read(from, to)?;
        state.next_offset = to;
        q.status.rows_in.fetch_add(to - from, Ordering::Relaxed);
        let plan = &q.plan;
        let mut outputs = Vec::with_capacity(pieces.len());
        for piece in pieces {
            let mut batch = piece;
            if let (Some(spec), Some(schema)) = (&plan.window, &q.window_schema) {
                let assigned = state.window.assign(spec, schema, &batch)?;
                if assigned.late > 0 {
                    q.status
                        .late_rows
                        .fetch_add(assigned.late, Ordering::Relaxed);
                }
                batch = assigned.batch;
            }
            let mut out = apply_ops(&plan.map_ops, batch, &mut state.joins, self.tables.as_ref())?;
            if let Some(agg) = &plan.aggregate {
                out = partial_aggregate(agg, &out)?;
            }
            if out.num_rows() > 0 {
                outputs.push(out);
            }
        }
        let watermark_us = plan
            .window
            .as_ref()
            .and_then(|spec| state.window.watermark_us(spec));
        let group = group_of(&wq.group_starts, b);
        if let Some(left) = wq.group_left.get_mut(&group) {
            left.1.push((BatchId(b), p, from, to));
        }
        match &plan.aggregate {
            None => {
                let schema = outputs
                    .first()
                    .map(|o| o.schema())
                    .unwrap_or_else(|| Arc::clone(&plan.output_schema));
                let batch = arrow::compute::concat_batches(&schema, &outputs)?;
                let out = apply_post(
                    &plan.post_ops,
                    batch,
                    &mut state.joins,
                    self.tables.as_ref(),
                )?;
                let _ = q.sink.send(SinkMsg::Output {
                    batch: BatchId(b),
                    chunks: vec![(None, out)],
                });
            }
            Some(agg) => {
                let k = agg.group_exprs.len();
                let mut per_reduce: Vec<Vec<RecordBatch>> =
                    vec![Vec::new(); q.reduce_partitions as usize];
                for out in &outputs {
                    let keys: Vec<_> = out.columns()[..k].to_vec();
                    let parts = if k == 0 {
                        let mut v = vec![out.clone()];
                        v.extend((1..q.reduce_partitions).map(|_| out.slice(0, 0)));
                        v
                    } else {
                        drizzle_shuffle::hash_partition(out, &keys, q.reduce_partitions as usize)?
                    };
                    for (r, part) in parts.into_iter().enumerate() {
                        if part.num_rows() > 0 {
                            per_reduce[r].push(part);
                        }
                    }
                }
                let mut rows = vec![0u32; q.reduce_partitions as usize];
                for (r, parts) in per_reduce.iter().enumerate() {
                    if parts.is_empty() {
                        continue;
                    }
                    rows[r] = parts.iter().map(|b| b.num_rows() as u32).sum();
                    let bytes = drizzle_shuffle::encode_block(&agg.partial_schema, parts)?;
                    let id = BlockId {
                        query: qid,
                        batch: BatchId(b),
                        stage: StageId(0),
                        map: p,
                        reduce: ReducePartition(r as u32),
                    };
                    self.blocks.put(id, bytes);
                }
                let notice = MapOutputReady {
                    query: qid,
                    batch: BatchId(b),
                    stage: StageId(0),
                    map: p,
                    rows,
                    watermark_us,
                };
                // One notice per consumer worker, pushed directly (no coordinator).
                let mut targets: Vec<WorkerId> = q.reduce_placement.clone();
                targets.sort();
                targets.dedup();
                for t in targets {
                    if t == self.id {
                        let _ = self.handle(WorkerMsg::MapOutputReady(notice.clone()));
                    } else if let Some(peer) = self.peers.get(t.0 as usize) {
                        let _ = peer.send(WorkerMsg::MapOutputReady(notice.clone()));
                    }
                }
            }
        }
        Ok(())
    }

    fn run_reduce(&mut self, qid: QueryId, b: u64, r: ReducePartition) -> Result<()> {
        let Some(wq) = self.queries.get_mut(&qid) else {
            return Ok(());
        };
        let mut notices = wq.pending_reduces.remove(&(b, r)).unwrap_or_default();
        notices.sort_by_key(|n| n.map);
        let q = Arc::clone(&wq.q);
        let Some(state) = wq.reduces.get_mut(&r) else {
            return Err(ExecError::invalid(format!(
                "reduce partition {r} not on this worker"
            )));
        };
        let mut partials = Vec::new();
        for n in &notices {
            if n.rows.get(r.0 as usize).copied().unwrap_or(0) == 0 {
                continue;
            }
            let id = BlockId {
                query: qid,
                batch: BatchId(b),
                stage: n.stage,
                map: n.map,
                reduce: r,
            };
            let bytes = self.blocks.take(&id)?;
            partials.extend(drizzle_shuffle::decode_block(&bytes)?);
        }
        let watermark = notices.iter().filter_map(|n| n.watermark_us).min();
        let out = state.agg.process(&partials, watermark)?;
        if out.late > 0 {
            q.status.late_rows.fetch_add(out.late, Ordering::Relaxed);
        }
        let mut chunks = Vec::with_capacity(out.chunks.len());
        for (w, batch) in out.chunks {
            chunks.push((
                w,
                apply_post(
                    &q.plan.post_ops,
                    batch,
                    &mut state.joins,
                    self.tables.as_ref(),
                )?,
            ));
        }
        let _ = q.sink.send(SinkMsg::Output {
            batch: BatchId(b),
            chunks,
        });
        Ok(())
    }
}

fn group_of(starts: &BTreeMap<u64, u64>, b: u64) -> u64 {
    starts
        .range(..=b)
        .next_back()
        .map(|(_, g)| *g)
        .unwrap_or_default()
}

fn apply_post(
    ops: &[BatchOp],
    batch: RecordBatch,
    joins: &mut JoinCache,
    tables: &dyn TableEvaluator,
) -> Result<RecordBatch> {
    apply_ops(ops, batch, joins, tables)
}
