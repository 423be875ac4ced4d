//! Task slots: the threads that run tasks' CPU work (operators, routing,
//! block encoding, state snapshots) while the task thread keeps scheduling.
//!
//! The task thread prepares a task (its inputs are already in: source
//! reads and block downloads start ahead, see the scheduler), checks its
//! partition's state out to a slot, and takes it back with the task's
//! outcome as a message ([`Computed`]). A partition runs on one slot at a
//! time, so its batches stay in order; different partitions run at once.

use super::*;

type Job = Box<dyn FnOnce() + Send>;

/// A fixed pool of slot threads fed by one queue.
pub(super) struct Slots {
    jobs: Option<std_mpsc::Sender<Job>>,
    /// How many tasks may run at once.
    pub(super) size: usize,
}

impl Slots {
    /// Starts `size` slot threads (at least one), in `runtime`'s context
    /// (a lookup join's table read blocks on it).
    pub(super) fn start(size: usize, runtime: tokio::runtime::Handle) -> Result<Self> {
        let size = size.max(1);
        let (tx, rx) = std_mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..size {
            let rx = Arc::clone(&rx);
            let runtime = runtime.clone();
            std::thread::Builder::new()
                .name(format!("drizzle-slot-{i}"))
                .stack_size(crate::THREAD_STACK_BYTES)
                .spawn(move || {
                    let _context = runtime.enter();
                    loop {
                        // One idle slot waits on the queue, the others on the lock.
                        let job = rx.lock().recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return, // the scheduler is gone
                        }
                    }
                })
                .map_err(|e| ExecError::io("task slot thread", e))?;
        }
        Ok(Self {
            jobs: Some(tx),
            size,
        })
    }

    /// Runs `job` on the next free slot.
    pub(super) fn run(&self, job: impl FnOnce() + Send + 'static) {
        if let Some(tx) = &self.jobs {
            let _ = tx.send(Box::new(job));
        }
    }
}

/// A task's CPU work and its partition's state, checked out to a slot.
pub(super) enum Work {
    Map {
        chain: ChainState,
        pieces: Vec<RecordBatch>,
        /// The read reached the end of a bounded source: the partition's
        /// watermark moves past every window.
        ended: bool,
        /// For a stream with a processing-time column: the rows' schema
        /// with it, and the batch's trigger time (Unix µs), its value.
        proctime: Option<(arrow::datatypes::SchemaRef, i64)>,
    },
    Reduce {
        work: Box<ReduceWork>,
        /// Rows per input of the stage, in its input order: blocks read
        /// here (still encoded) or downloaded.
        inputs: Vec<Vec<Input>>,
        watermark: Option<i64>,
        /// Snapshot the keyed state after the batch: a checkpoint (the
        /// delta's base, if any).
        checkpoint: Option<Option<u64>>,
    },
}

/// One shuffled input of a reduce task.
pub(super) enum Input {
    /// A block of this worker's store (decoded on the slot).
    Local(bytes::Bytes),
    /// A downloaded block.
    Rows(Vec<RecordBatch>),
}

/// A task as a slot runs it.
pub(super) struct SlotTask {
    pub(super) query: QueryId,
    pub(super) incarnation: u64,
    pub(super) batch: u64,
    pub(super) stage: u32,
    pub(super) partition: u32,
    pub(super) steps: Arc<Vec<Vec<Step>>>,
    pub(super) tables: RemoteTables,
    /// Where the output goes: a shuffle (how, into how many partitions),
    /// or the sink (None).
    pub(super) shuffle: Option<(Partitioning, usize)>,
    pub(super) sink_schema: arrow::datatypes::SchemaRef,
    pub(super) stats: StageStats,
    pub(super) work: Work,
    /// A map task's source range.
    pub(super) range: Option<(u64, u64)>,
}

/// What a task produced.
pub(super) enum Produced {
    /// Blocks per consumer partition (None: no rows for it) and their rows.
    Shuffle {
        blocks: Vec<Option<bytes::Bytes>>,
        rows: Vec<u32>,
    },
    /// Chunks for the sink (with the window each closes).
    Sink(Vec<(Option<i64>, RecordBatch)>),
}

/// A task's result.
pub(super) struct TaskOut {
    pub(super) watermark_us: Option<i64>,
    /// The partition's state after the task.
    pub(super) size: StateSize,
    /// A checkpoint of the partition's state, to encode off the slot.
    pub(super) snapshot: Option<OperatorSnapshot>,
    pub(super) produced: Produced,
}

/// A task back from its slot: its partition's state and its outcome.
pub(super) struct Computed {
    pub(super) query: QueryId,
    pub(super) incarnation: u64,
    pub(super) batch: u64,
    pub(super) stage: u32,
    pub(super) partition: u32,
    pub(super) stats: StageStats,
    pub(super) late: u64,
    pub(super) range: Option<(u64, u64)>,
    /// The state, back (None when the task panicked: the query fails).
    pub(super) state: Option<Returned>,
    pub(super) result: Result<TaskOut>,
}

/// A partition's state, back from a slot.
pub(super) enum Returned {
    Map(ChainState),
    Reduce(Box<ReduceWork>),
}

impl SlotTask {
    /// Runs the task; never panics (a panic becomes the task's error).
    pub(super) fn run(self) -> Computed {
        let (query, incarnation, batch, stage, partition, range) = (
            self.query,
            self.incarnation,
            self.batch,
            self.stage,
            self.partition,
            self.range,
        );
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.compute()));
        match outcome {
            Ok((stats, late, state, result)) => Computed {
                query,
                incarnation,
                batch,
                stage,
                partition,
                stats,
                late,
                range,
                state: Some(state),
                result,
            },
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(query = %query, batch, "task panicked: {message}");
                Computed {
                    query,
                    incarnation,
                    batch,
                    stage,
                    partition,
                    stats: StageStats::default(),
                    late: 0,
                    range,
                    state: None,
                    result: Err(ExecError::Unavailable {
                        message: format!("a task of query {query} failed internally: {message}"),
                    }),
                }
            }
        }
    }

    fn compute(self) -> (StageStats, u64, Returned, Result<TaskOut>) {
        let SlotTask {
            batch,
            stage,
            steps,
            tables,
            shuffle,
            sink_schema,
            mut stats,
            work,
            ..
        } = self;
        let no_steps = Vec::new();
        let steps = steps.get(stage as usize).unwrap_or(&no_steps);
        let mut late = 0;
        match work {
            Work::Map {
                mut chain,
                pieces,
                ended,
                proctime,
            } => {
                let result = (|| {
                    let mut outputs = Vec::with_capacity(pieces.len());
                    for piece in pieces {
                        let piece = match &proctime {
                            Some((schema, at)) => with_proctime(piece, schema, *at)?,
                            None => piece,
                        };
                        let (out, l) =
                            run_steps(steps, piece, &mut chain, &tables, &mut stats.steps)?;
                        late += l;
                        if out.num_rows() > 0 {
                            outputs.push(out);
                        }
                    }
                    if let Some((_, at)) = proctime {
                        // Processing time passes with or without rows: the
                        // next batch's rows are all later than this one.
                        let clock = steps
                            .iter()
                            .any(|s| matches!(s, Step::Window(spec, _) if spec.processing_time));
                        if clock {
                            chain.window.max_event_us =
                                Some(chain.window.max_event_us.map_or(at, |m| m.max(at)));
                        }
                    }
                    if ended {
                        chain.window.max_event_us = Some(END_OF_INPUT_US);
                    }
                    let produced = match &shuffle {
                        Some((by, n)) => encode_shuffle(&outputs, by, *n)?,
                        None => {
                            // A source stage writing the sink (a plan without shuffles).
                            let schema = outputs
                                .first()
                                .map(RecordBatch::schema)
                                .unwrap_or(sink_schema);
                            let out = arrow::compute::concat_batches(&schema, &outputs)?;
                            Produced::Sink(vec![(None, out)])
                        }
                    };
                    Ok(TaskOut {
                        watermark_us: steps_watermark(steps, &chain),
                        size: chain.size(),
                        snapshot: None,
                        produced,
                    })
                })();
                (stats, late, Returned::Map(chain), result)
            }
            Work::Reduce {
                mut work,
                inputs,
                watermark,
                checkpoint,
            } => {
                let result = (|| {
                    let fetch_started = Instant::now();
                    let mut rows: Vec<Vec<RecordBatch>> = Vec::with_capacity(inputs.len());
                    for input in inputs {
                        let mut batches = Vec::new();
                        for block in input {
                            match block {
                                Input::Local(bytes) => {
                                    batches.extend(drizzle_shuffle::decode_block(&bytes)?)
                                }
                                Input::Rows(b) => batches.extend(b),
                            }
                        }
                        rows.push(batches);
                    }
                    let fetched: usize = rows.iter().flatten().map(RecordBatch::num_rows).sum();
                    stats.tasks += 1;
                    stats.input.record(fetched, fetched, fetch_started);
                    let started = Instant::now();
                    let out = work.operator.process(batch, &rows, watermark)?;
                    let produced: usize = out.chunks.iter().map(|(_, c)| c.num_rows()).sum();
                    if let Some(s) = stats.steps.first_mut() {
                        s.record(fetched, produced, started);
                    }
                    late += out.late;
                    let snapshot = match checkpoint {
                        Some(base) => Some(snapshot_reduce(&mut work, base)?),
                        None => None,
                    };
                    // The steps after the stateful operator (the stage's first).
                    let after = steps.get(1..).unwrap_or_default();
                    let after_stats = stats.steps.get_mut(1..).unwrap_or_default();
                    let mut chunks = Vec::with_capacity(out.chunks.len());
                    for (w, b) in out.chunks {
                        let (b, l) =
                            run_steps(after, b, &mut work.chain, &tables, &mut *after_stats)?;
                        late += l;
                        chunks.push((w, b));
                    }
                    let produced = match &shuffle {
                        Some((by, n)) => {
                            // Into the next stage: the operator has consumed
                            // its inputs up to their watermark, so that is its
                            // output's.
                            let outputs: Vec<RecordBatch> = chunks
                                .into_iter()
                                .map(|(_, b)| b)
                                .filter(|b| b.num_rows() > 0)
                                .collect();
                            encode_shuffle(&outputs, by, *n)?
                        }
                        None => Produced::Sink(chunks),
                    };
                    Ok(TaskOut {
                        watermark_us: watermark,
                        size: work.size(),
                        snapshot,
                        produced,
                    })
                })();
                (stats, late, Returned::Reduce(work), result)
            }
        }
    }
}

/// `piece` (a source's rows) with the processing-time column `schema` ends
/// with: every row gets `at_us`, the batch's trigger time.
fn with_proctime(
    piece: RecordBatch,
    schema: &arrow::datatypes::SchemaRef,
    at_us: i64,
) -> Result<RecordBatch> {
    let mut columns = piece.columns().to_vec();
    columns.push(Arc::new(
        arrow::array::TimestampMicrosecondArray::from_value(at_us, piece.num_rows())
            .with_timezone("+00:00"),
    ));
    Ok(RecordBatch::try_new(Arc::clone(schema), columns)?)
}

/// Routes a task's output rows to `n` consumer partitions by `by` and
/// encodes one block per partition that gets rows (a broadcast block once).
pub(super) fn encode_shuffle(
    outputs: &[RecordBatch],
    by: &Partitioning,
    n: usize,
) -> Result<Produced> {
    let mut per_reduce: Vec<Vec<RecordBatch>> = vec![Vec::new(); n];
    for out in outputs {
        let parts = route(out, by, n)?;
        for (r, part) in parts.into_iter().enumerate() {
            if part.num_rows() > 0 {
                if let Some(v) = per_reduce.get_mut(r) {
                    v.push(part);
                }
            }
        }
    }
    let mut rows = vec![0u32; n];
    let mut blocks = vec![None; n];
    // A broadcast block is the same for every partition: encoded once.
    let mut broadcast: Option<bytes::Bytes> = None;
    for (r, parts) in per_reduce.iter().enumerate() {
        let Some(first) = parts.first() else {
            continue;
        };
        rows[r] = parts.iter().map(|b| b.num_rows() as u32).sum();
        let bytes = match (&broadcast, by) {
            (Some(bytes), _) => bytes.clone(),
            (None, Partitioning::Broadcast) => {
                let bytes = drizzle_shuffle::encode_block(&first.schema(), parts)?;
                broadcast = Some(bytes.clone());
                bytes
            }
            (None, Partitioning::Hash(_)) => drizzle_shuffle::encode_block(&first.schema(), parts)?,
        };
        blocks[r] = Some(bytes);
    }
    Ok(Produced::Shuffle { blocks, rows })
}
