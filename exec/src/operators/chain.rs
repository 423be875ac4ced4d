//! A stage's operator chain as a task runs it: the graph's operators
//! grouped into [`Step`]s (a run of stateless kernels is one step, with one
//! lookup-table cache), built once per query by [`steps`].

use super::*;

/// One step of a stage's chain.
#[derive(Debug, Clone)]
pub enum Step {
    /// `TUMBLE`/`HOP` assignment over the stream's rows (their schema given).
    Window(WindowSpec, SchemaRef),
    /// Event-time tracking over the stream's rows, late rows dropped.
    EventTime(EventTimeSpec),
    /// A run of stateless kernels.
    Kernels(Vec<BatchOp>),
    /// The map-side half of an aggregation.
    Partial(Arc<AggregatePlan>),
    /// The stage's stateful operator (the task state holds it).
    Stateful,
}

/// The steps of `stage`, in order.
pub fn steps(stage: &Stage) -> Vec<Step> {
    let mut out: Vec<Step> = Vec::new();
    for op in &stage.operators {
        match op {
            Operator::WindowAssign(spec) => {
                let schema = match &stage.input {
                    StageInput::Source(stream) => {
                        drizzle_planner::codec::input_schema(stream, Some(spec))
                    }
                    StageInput::Shuffle(_) => Arc::new(arrow::datatypes::Schema::empty()),
                };
                out.push(Step::Window(spec.clone(), schema));
            }
            Operator::EventTime(spec) => out.push(Step::EventTime(spec.clone())),
            Operator::Kernel(k) => match out.last_mut() {
                Some(Step::Kernels(run)) => run.push(k.clone()),
                _ => out.push(Step::Kernels(vec![k.clone()])),
            },
            Operator::AggregatePartial(agg) => out.push(Step::Partial(Arc::clone(agg))),
            Operator::AggregateFinal(_)
            | Operator::WindowJoin(_)
            | Operator::IntervalJoin(_)
            | Operator::TopN(_)
            | Operator::OverAggregate(_)
            | Operator::Union => out.push(Step::Stateful),
        }
    }
    out
}

/// Which of the stage's operators each of [`steps`]'s steps runs (a run of
/// kernels is one step of several operators).
pub fn step_operators(stage: &Stage) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    let mut kernels = false;
    for (i, op) in stage.operators.iter().enumerate() {
        let kernel = matches!(op, Operator::Kernel(_));
        match out.last_mut() {
            Some(run) if kernel && kernels => run.end = i + 1,
            _ => out.push(i..i + 1),
        }
        kernels = kernel;
    }
    out
}

/// What one step did, summed over tasks (for `EXPLAIN ANALYZE`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepStats {
    /// Rows into the step.
    pub rows_in: u64,
    /// Rows out of it.
    pub rows_out: u64,
    /// Time spent in it (ns).
    pub time_ns: u64,
}

impl StepStats {
    /// Adds one run of `rows_in` → `rows_out` rows since `started`.
    pub fn record(&mut self, rows_in: usize, rows_out: usize, started: std::time::Instant) {
        self.rows_in += rows_in as u64;
        self.rows_out += rows_out as u64;
        self.time_ns += started.elapsed().as_nanos() as u64;
    }
}

/// The per-partition state of a chain's stateless steps: the window
/// assigner's largest event time and each kernel run's lookup tables.
#[derive(Default)]
pub struct ChainState {
    /// Window assignment state (the watermark source of a source stage).
    pub window: WindowAssignExec,
    /// One cache per step (only kernel runs use theirs).
    pub joins: Vec<JoinCache>,
}

impl ChainState {
    /// The lookup tables held.
    pub fn size(&self) -> StateSize {
        let mut size = StateSize::default();
        for j in &self.joins {
            size += j.size();
        }
        size
    }
}

/// The watermark a source stage's steps produce after the rows seen so
/// far (µs): its window assigner's or event-time tracker's, if it has one.
pub fn steps_watermark(steps: &[Step], state: &ChainState) -> Option<i64> {
    steps.iter().find_map(|s| match s {
        Step::Window(spec, _) => state.window.watermark_us(spec),
        Step::EventTime(spec) => state
            .window
            .max_event_us
            .map(|m| m.saturating_sub(spec.watermark_delay_ms * 1000)),
        _ => None,
    })
}

/// Runs `steps` (none of them [`Step::Stateful`]) over `batch`; returns
/// the output and the rows dropped as late. `stats[i]` (where there is
/// one) counts step i's rows and time.
pub fn run_steps(
    steps: &[Step],
    mut batch: RecordBatch,
    state: &mut ChainState,
    tables: &dyn TableEvaluator,
    stats: &mut [StepStats],
) -> Result<(RecordBatch, u64)> {
    let mut late = 0;
    if state.joins.len() < steps.len() {
        state.joins.resize_with(steps.len(), JoinCache::default);
    }
    for (i, step) in steps.iter().enumerate() {
        let started = std::time::Instant::now();
        let rows_in = batch.num_rows();
        batch = match step {
            Step::Window(spec, schema) => {
                let assigned = state.window.assign(spec, schema, &batch)?;
                late += assigned.late;
                assigned.batch
            }
            Step::EventTime(spec) => {
                let (kept, dropped) = state.window.track(spec, &batch)?;
                late += dropped;
                kept
            }
            Step::Kernels(ops) => apply_ops(ops, batch, &mut state.joins[i], tables)?,
            Step::Partial(agg) => partial_aggregate(agg, &batch)?,
            Step::Stateful => {
                return Err(ExecError::invalid(
                    "a stateful operator inside a stateless run of steps",
                ))
            }
        };
        if let Some(s) = stats.get_mut(i) {
            s.record(rows_in, batch.num_rows(), started);
        }
    }
    Ok((batch, late))
}
