//! The stage graph: a continuous query as the Drizzle scheduler sees it.
//!
//! A [`StageGraph`] is a list of [`Stage`]s in topological order (every
//! stage after the stages it reads). A stage is a chain of [`Operator`]s
//! run by one task per partition and micro-batch; it reads either a
//! stream's partitions ([`StageInput::Source`]) or the shuffled outputs of
//! upstream stages ([`StageInput::Shuffle`]), and writes either a shuffle
//! into the next stage ([`StageOutput::Shuffle`], partitioned by
//! [`Partitioning`]) or the query's results ([`StageOutput::Sink`]). The
//! graph is cut at every exchange, as Ballista cuts DataFusion plans:
//!
//! ```text
//!  Stage 0: StreamScan ─ WindowAssign ─ Filter ─ AggregatePartial ─┐ hash(keys)
//!  Stage 1: ShuffleRead(0) ─ AggregateFinal ─ Projection ─ Sink ◀──┘
//! ```
//!
//! The scheduler places every stage's partitions before a group starts,
//! consumers first; a task of a shuffle stage runs once every partition of
//! every input stage has announced its output for the micro-batch.
//! EXPLAIN is derived from the graph ([`StageGraph::explain`]).

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::logical_expr::JoinType;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_expr::PhysicalExpr;

use crate::catalog::StreamDef;
use crate::plan::{
    AggregatePlan, BatchOp, EmitMode, EventTimeSpec, IntervalJoinPlan, OverAggregatePlan, TopNPlan,
    WindowJoinPlan,
};
use crate::providers::{WindowKind, WindowSpec};

/// A stage's number within its graph (its index in [`StageGraph::stages`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StageId(pub u32);

impl std::fmt::Display for StageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where a stage's rows come from.
#[derive(Debug, Clone)]
pub enum StageInput {
    /// A stream: one task per stream partition.
    Source(StreamDef),
    /// The shuffled outputs of upstream stages, in the order the first
    /// operator takes them (a join's left input, then its right one): one
    /// task per partition of this stage.
    Shuffle(Vec<StageId>),
}

/// How a shuffle spreads rows over the consuming stage's partitions.
#[derive(Debug, Clone)]
pub enum Partitioning {
    /// By the hash of these expressions over the producing stage's output;
    /// with no expressions, every row goes to partition 0 (a global
    /// aggregate).
    Hash(Vec<Arc<dyn PhysicalExpr>>),
    /// Every row to every partition: a small input (one row per window)
    /// joined with a large one that stays spread out.
    Broadcast,
}

/// Where a stage's rows go.
#[derive(Debug, Clone)]
pub enum StageOutput {
    /// Into stage `to`, partitioned.
    Shuffle {
        /// The consuming stage.
        to: StageId,
        /// How rows are spread over its partitions.
        partitioning: Partitioning,
    },
    /// The query's results.
    Sink(EmitMode),
}

/// One operator of a stage's chain.
#[derive(Debug, Clone)]
pub enum Operator {
    /// `TUMBLE`/`HOP` window assignment, late rows dropped against the
    /// watermark (state: the largest event time seen).
    WindowAssign(WindowSpec),
    /// Event time on a stream read without a window (an interval join's
    /// input): watermark tracking, late rows dropped (state: the largest
    /// event time seen).
    EventTime(EventTimeSpec),
    /// A stateless kernel (filter, projection, lookup join).
    Kernel(BatchOp),
    /// The map-side half of an aggregation (no state across batches).
    AggregatePartial(Arc<AggregatePlan>),
    /// The reduce-side half: keyed state, per window when windowed.
    AggregateFinal(Arc<AggregatePlan>),
    /// A window join of the stage's two shuffle inputs (state: each open
    /// window's rows of both sides).
    WindowJoin(Arc<WindowJoinPlan>),
    /// An interval join of the stage's two shuffle inputs (state: the rows
    /// of both sides a future row can still match).
    IntervalJoin(Arc<IntervalJoinPlan>),
    /// `UNION ALL` of the stage's shuffle inputs (no state).
    Union,
    /// The best N rows per key (state: those rows).
    TopN(Arc<TopNPlan>),
    /// Aggregates over each row's frame of predecessors (state: the rows
    /// not yet complete and those later frames reach).
    OverAggregate(Arc<OverAggregatePlan>),
}

/// A chain of operators run by one task per partition and micro-batch.
#[derive(Debug, Clone)]
pub struct Stage {
    /// Its number.
    pub id: StageId,
    /// What it reads.
    pub input: StageInput,
    /// Its operators, in the order rows pass them.
    pub operators: Vec<Operator>,
    /// What it writes.
    pub output: StageOutput,
}

impl Stage {
    /// For a source stage: which of the stream's columns its operators
    /// read (`None`: all of them, or not a source stage). A generator need
    /// not make the others: they are read up to the first projection or
    /// partial aggregation, which keeps only what it names.
    pub fn source_columns_read(&self) -> Option<Vec<bool>> {
        use datafusion::physical_expr::utils::collect_columns;
        let StageInput::Source(stream) = &self.input else {
            return None;
        };
        let width = stream.columns.len();
        let mut read = vec![false; width];
        let mut mark = |e: &Arc<dyn PhysicalExpr>| {
            for c in collect_columns(e) {
                // Indices past the stream's columns are window bounds.
                if let Some(r) = read.get_mut(c.index()) {
                    *r = true;
                }
            }
        };
        for op in &self.operators {
            match op {
                Operator::WindowAssign(w) => mark(&column_expr(w.time_column)),
                Operator::EventTime(e) => mark(&column_expr(e.time_column)),
                Operator::Kernel(BatchOp::Filter { predicate }) => mark(predicate),
                Operator::Kernel(BatchOp::TopK { order_by, .. }) => {
                    order_by.iter().for_each(|(e, _)| mark(e))
                }
                Operator::Kernel(BatchOp::Project { exprs, .. }) => {
                    // A projection that keeps every column in place and adds
                    // some (shared subexpressions) passes the columns on:
                    // what it adds is read, the rest is up to what follows.
                    let keeps_all = exprs.len() >= width
                        && exprs.iter().take(width).enumerate().all(|(i, e)| {
                            e.downcast_ref::<Column>().is_some_and(|c| c.index() == i)
                        });
                    if keeps_all {
                        exprs.iter().skip(width).for_each(&mut mark);
                    } else {
                        exprs.iter().for_each(&mut mark);
                        return Some(read);
                    }
                }
                Operator::AggregatePartial(agg) => {
                    agg.group_exprs.iter().for_each(|(e, _)| mark(e));
                    for a in &agg.aggregates {
                        a.expressions().iter().for_each(&mut mark);
                    }
                    agg.filters.iter().flatten().for_each(&mut mark);
                    return Some(read);
                }
                // Anything else passes every column on.
                _ => return None,
            }
        }
        None
    }

    /// Tasks per micro-batch: the stream's partitions for a source stage,
    /// `reduce_partitions` for a shuffle stage.
    pub fn tasks(&self, reduce_partitions: u32) -> u32 {
        match &self.input {
            StageInput::Source(stream) => stream.partitions,
            StageInput::Shuffle(_) => reduce_partitions,
        }
    }

    /// True when an operator keeps state across micro-batches that a
    /// checkpoint must save (window assignment's watermark aside).
    pub fn is_stateful(&self) -> bool {
        self.operators.iter().any(|o| {
            matches!(
                o,
                Operator::AggregateFinal(_)
                    | Operator::WindowJoin(_)
                    | Operator::IntervalJoin(_)
                    | Operator::TopN(_)
                    | Operator::OverAggregate(_)
            )
        })
    }
}

fn column_expr(i: usize) -> Arc<dyn PhysicalExpr> {
    Arc::new(Column::new("", i))
}

/// A continuous query as stages and the shuffles between them.
#[derive(Debug, Clone)]
pub struct StageGraph {
    /// The stages, every one after the stages it reads; the last one is the
    /// only one with a [`StageOutput::Sink`].
    pub stages: Vec<Stage>,
    /// The schema of the rows the sink stage delivers.
    pub output_schema: SchemaRef,
    /// `SET state_ttl`, in micro-batches: keyed state no row has touched
    /// for this many micro-batches is evicted (non-windowed aggregates)
    /// and held join rows this old are dropped (regular joins). `None`:
    /// state is kept until the watermark allows dropping it.
    pub state_ttl_batches: Option<u64>,
}

impl StageGraph {
    /// The stage writing the results.
    pub fn sink(&self) -> &Stage {
        self.stages
            .last()
            .expect("a stage graph has at least one stage")
    }

    /// The source stages, in order.
    pub fn sources(&self) -> impl Iterator<Item = &Stage> {
        self.stages
            .iter()
            .filter(|s| matches!(s.input, StageInput::Source(_)))
    }

    /// Stage `id`.
    pub fn stage(&self, id: StageId) -> Option<&Stage> {
        self.stages.get(id.0 as usize)
    }

    /// The number of shuffles (edges) in the graph.
    pub fn shuffles(&self) -> usize {
        self.stages
            .iter()
            .filter(|s| matches!(s.output, StageOutput::Shuffle { .. }))
            .count()
    }

    /// EXPLAIN: one header line, then each stage from the sink down, its
    /// operators from the last to the first (as DataFusion indents a plan).
    pub fn explain(&self, header: String, reduce_partitions: u32) -> Vec<String> {
        self.explain_annotated(header, reduce_partitions, &|_, _| None)
    }

    /// [`Self::explain`] with notes: `note(stage, None)` is added to a
    /// stage's header line, `note(stage, Some(i))` to line `i` of its
    /// [`describe`] (0: its input, then its operators, then its output).
    /// `EXPLAIN ANALYZE` puts measurements there.
    pub fn explain_annotated(
        &self,
        header: String,
        reduce_partitions: u32,
        note: &dyn Fn(&Stage, Option<usize>) -> Option<String>,
    ) -> Vec<String> {
        let mut lines = vec![header];
        let sources = self.sources().count();
        let with = |line: String, n: Option<String>| match n {
            Some(n) => format!("{line} {n}"),
            None => line,
        };
        for stage in self.stages.iter().rev() {
            let name = match &stage.input {
                StageInput::Source(_) if sources == 1 => "map".to_string(),
                StageInput::Source(_) => match self.sources().position(|s| s.id == stage.id) {
                    Some(0) => "map, left".to_string(),
                    Some(1) => "map, right".to_string(),
                    Some(i) => format!("map, input {i}"),
                    None => "map".to_string(),
                },
                StageInput::Shuffle(_) => "reduce".to_string(),
            };
            lines.push(with(
                format!(
                    "  Stage {} ({name}, {} tasks per micro-batch):",
                    stage.id,
                    stage.tasks(reduce_partitions)
                ),
                note(stage, None),
            ));
            let described = describe(stage, reduce_partitions);
            let last = described.len().saturating_sub(1);
            for (i, op) in described.iter().rev().enumerate() {
                lines.push(with(
                    format!("    {}{}", "  ".repeat(i), op),
                    note(stage, Some(last - i)),
                ));
            }
        }
        lines
    }
}

/// A stage's operators as EXPLAIN shows them, first to last.
pub fn describe(stage: &Stage, reduce_partitions: u32) -> Vec<String> {
    let mut out = Vec::new();
    match &stage.input {
        StageInput::Source(stream) => out.push(format!(
            "StreamScanExec: stream={}, partitions={}, source={}",
            stream.name,
            stream.partitions,
            stream.connector().unwrap_or("log")
        )),
        StageInput::Shuffle(inputs) => out.push(match inputs.as_slice() {
            [one] => format!("ShuffleReadExec: from stage {one}, pre-scheduled"),
            [a, b] => {
                format!("ShuffleReadExec: from stages {a} and {b}, pre-scheduled, waits for both")
            }
            many => format!(
                "ShuffleReadExec: from stages {}, pre-scheduled, waits for all",
                many.iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
    for op in &stage.operators {
        out.push(describe_operator(op));
    }
    out.push(match &stage.output {
        StageOutput::Shuffle {
            partitioning: Partitioning::Hash(keys),
            ..
        } if keys.is_empty() => "ShuffleWriteExec: all rows to partition 0 (no key)".to_string(),
        StageOutput::Shuffle {
            partitioning: Partitioning::Hash(keys),
            ..
        } => format!(
            "ShuffleWriteExec: hash([{}]) into {reduce_partitions} partitions",
            keys.iter()
                .map(|k| match k.downcast_ref::<Column>() {
                    Some(c) => c.name().to_string(),
                    None => k.to_string(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        ),
        StageOutput::Shuffle {
            partitioning: Partitioning::Broadcast,
            ..
        } => format!(
            "ShuffleWriteExec: broadcast to all {reduce_partitions} partitions (a small input)"
        ),
        StageOutput::Sink(emit) => format!("SinkExec: emit={emit}"),
    });
    out
}

fn names(agg: &AggregatePlan) -> (String, String) {
    let keys: Vec<&str> = agg.group_exprs.iter().map(|(_, n)| n.as_str()).collect();
    let aggs: Vec<&str> = agg.aggregates.iter().map(|a| a.name()).collect();
    (keys.join(", "), aggs.join(", "))
}

fn describe_operator(op: &Operator) -> String {
    match op {
        Operator::WindowAssign(w) => {
            let kind = match w.kind {
                WindowKind::Tumble => format!("TUMBLE(size={}ms)", w.size_ms),
                WindowKind::Hop => format!("HOP(slide={}ms, size={}ms)", w.slide_ms, w.size_ms),
                WindowKind::Session => format!("SESSION(gap={}ms)", w.size_ms),
            };
            if w.processing_time {
                format!(
                    "WindowAssignExec: {kind} on {} (processing time: the micro-batch's trigger time), \
                     watermark=the batch's time",
                    w.time_column_name
                )
            } else {
                format!(
                    "WindowAssignExec: {kind} on {}, watermark={} - {}ms, late rows dropped",
                    w.time_column_name, w.time_column_name, w.watermark_delay_ms
                )
            }
        }
        Operator::EventTime(e) => format!(
            "EventTimeExec: watermark={} - {}ms, late rows dropped",
            e.time_column_name, e.watermark_delay_ms
        ),
        Operator::Kernel(BatchOp::Filter { predicate }) => format!("FilterExec: {predicate}"),
        Operator::Kernel(BatchOp::TopK { order_by, limit }) => format!(
            "TopKExec: each batch's first {limit} rows by [{}] (partial top-N)",
            order_by
                .iter()
                .map(|(e, o)| format!("{e}{}", if o.descending { " DESC" } else { "" }))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Operator::Kernel(BatchOp::Project { exprs, schema }) => format!(
            "ProjectionExec: [{}]",
            exprs
                .iter()
                .zip(schema.fields())
                .map(|(e, f)| format!("{e} AS {}", f.name()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Operator::Kernel(BatchOp::LookupJoin(j)) => format!(
            "LookupJoinExec: {:?}, on=[{}], table side re-read when tables change",
            j.join_type, j.display
        ),
        Operator::AggregatePartial(agg) => {
            let (keys, aggs) = names(agg);
            format!("AggregatePartialExec: group=[{keys}], aggr=[{aggs}]")
        }
        Operator::AggregateFinal(agg)
            if agg.window.as_ref().is_some_and(|w| w.session.is_some()) =>
        {
            let (keys, aggs) = names(agg);
            format!(
                "SessionAggregateExec: group=[{keys}], aggr=[{aggs}], gap={}ms, \
                 state=open sessions per key, each emitted when the watermark passes its end",
                agg.window.as_ref().map_or(0, |w| w.size_us / 1000)
            )
        }
        Operator::AggregateFinal(agg) => {
            let (keys, aggs) = names(agg);
            format!(
                "AggregateFinalExec: group=[{keys}], aggr=[{aggs}], state=keyed{}",
                if agg.window.is_some() {
                    " per window"
                } else if agg.changes {
                    " with each group's last row, emits changes (last row -1, new row +1)"
                } else {
                    ""
                }
            )
        }
        Operator::Union => "UnionExec: all rows of every input".to_string(),
        Operator::OverAggregate(o) if o.changes => format!(
            "OverAggregateExec: {}, over changes, state=every row per key; a change re-evaluates its row \
             and the next {} in its partition, emitted as deletes and inserts",
            o.display, o.retain.rows
        ),
        Operator::OverAggregate(o) => format!(
            "OverAggregateExec: {}, state=rows until the watermark passes their time, then {}",
            o.display,
            {
                let running = "one accumulator per key and aggregate unbounded in the past";
                let kept = match (o.retain.rows, o.retain.range_us) {
                    (0, 0) if o.retain.unbounded => return format!(
                        "OverAggregateExec: {}, state=rows until the watermark passes their time, then {running}",
                        o.display
                    ),
                    (0, r) => format!("those within {}ms of it", r / 1000),
                    (n, 0) => format!("the last {n} rows per key"),
                    (n, r) => format!("the last {n} rows per key and those within {}ms", r / 1000),
                };
                if o.retain.unbounded {
                    format!("{kept}, and {running}")
                } else {
                    kept
                }
            }
        ),
        Operator::TopN(t) => format!(
            "TopNExec: {}, keep={}, state={} per key, emitted ({}) when a key's rows change",
            t.display,
            t.limit,
            match t.ranking {
                crate::plan::Ranking::RowNumber => format!("the best {} rows", t.limit),
                crate::plan::Ranking::Rank => format!("the rows ranked at most {}", t.limit),
                crate::plan::Ranking::DenseRank =>
                    format!("the rows of the best {} values", t.limit),
            },
            if t.changes {
                "changes: old rows -1, new rows +1"
            } else {
                "upsert"
            }
        ),
        Operator::IntervalJoin(j) if j.weighted => format!(
            "JoinExec: {}, on=[{}], state=every live row of both sides with its weight (a retraction takes back the row it names){}, emitted as changes: pair weight = product of the rows' weights{}",
            j.join_type.to_string().to_lowercase(),
            j.display,
            if j.join_type == JoinType::Inner { "" } else { " and an outer row's matching weight" },
            if j.join_type == JoinType::Inner { "" } else { "; an outer row is padded with NULLs while its matching weight is 0" }
        ),
        Operator::IntervalJoin(j) if j.regular && j.join_type != JoinType::Inner => format!(
            "JoinExec: {}, on=[{}], state=every row of both sides (no time bound) with its match count, \
             emitted when both rows are there; an unmatched row of an outer side is inserted padded \
             with NULLs and deleted at its first match",
            j.join_type.to_string().to_lowercase(),
            j.display
        ),
        Operator::IntervalJoin(j) if j.regular => format!(
            "JoinExec: inner, on=[{}], state=every row of both sides (no time bound), emitted when both rows are there",
            j.display
        ),
        Operator::IntervalJoin(j) if j.join_type != JoinType::Inner => format!(
            "IntervalJoinExec: {}, on=[{}], state=rows of both sides until the watermark passes their interval, with match counts; \
             pairs emitted when both rows are there, an unmatched row of an outer side padded with NULLs when the watermark passes its interval",
            j.join_type.to_string().to_lowercase(),
            j.display
        ),
        Operator::IntervalJoin(j) => format!(
            "IntervalJoinExec: inner, on=[{}], state=rows of both sides until the watermark passes their interval, emitted when both rows are there",
            j.display
        ),
        Operator::WindowJoin(j) => format!(
            "WindowJoinExec: {}, on=[{}]{}, state=rows per open window, emitted when the watermark passes the window end",
            match j.join_type {
                JoinType::LeftSemi => "left semi",
                JoinType::LeftAnti => "left anti",
                JoinType::Left => "left (unmatched left rows padded with NULLs)",
                JoinType::Right => "right (unmatched right rows padded with NULLs)",
                JoinType::Full => "full (unmatched rows of both sides padded with NULLs)",
                _ => "inner",
            },
            j.display,
            j.filter
                .as_ref()
                .map(|f| format!(", filter={f}"))
                .unwrap_or_default()
        ),
    }
}
