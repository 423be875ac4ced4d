//! The streaming plan: a continuous query's [`StageGraph`] and how its
//! results leave it (emit mode, `LIMIT`, upsert keys), and the operator
//! specifications the graph's stages hold: stateless kernels ([`BatchOp`]),
//! aggregations split into partial and final halves ([`AggregatePlan`]),
//! window joins ([`WindowJoinPlan`]), interval joins ([`IntervalJoinPlan`]),
//! top-N ([`TopNPlan`]) and `OVER` aggregations ([`OverAggregatePlan`]). Expressions are DataFusion
//! `PhysicalExpr`s, evaluated over Arrow batches; state and event time are
//! Drizzle's own.

use std::fmt;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::logical_expr::{JoinType, LogicalPlan};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::windows::WindowExpr;

use crate::catalog::StreamDef;
use crate::graph::StageGraph;

/// A stateless kernel applied to every batch.
#[derive(Debug, Clone)]
pub enum BatchOp {
    /// Keep rows where the predicate is true.
    Filter {
        /// The predicate over the input schema.
        predicate: Arc<dyn PhysicalExpr>,
    },
    /// Compute new columns.
    Project {
        /// One expression per output column, over the input schema.
        exprs: Vec<Arc<dyn PhysicalExpr>>,
        /// The output schema.
        schema: SchemaRef,
    },
    /// Equi-join every stream row against a finite relation (a table, a view
    /// or a query over them).
    LookupJoin(Arc<LookupJoinSpec>),
    /// Keep each batch's first `limit` rows in `order_by` order (equal rows
    /// in arrival order): the map side of a top-N without `PARTITION BY`,
    /// since a row behind `limit` better rows of its own batch cannot be in
    /// the top N. Rows keep their order.
    TopK {
        /// The `ORDER BY` expressions, with their directions.
        order_by: Vec<(Arc<dyn PhysicalExpr>, arrow::compute::SortOptions)>,
        /// How many rows to keep.
        limit: usize,
    },
}

/// How to join a stream against a finite relation.
#[derive(Debug, Clone)]
pub struct LookupJoinSpec {
    /// The join's number within its plan (map ops first, then post ops):
    /// how a worker names it when it asks the coordinator for the table side.
    pub id: u32,
    /// The finite side, re-evaluated when a table it reads changes.
    pub table_plan: LogicalPlan,
    /// The tables and views the finite side reads: only their changes make
    /// a task re-read it.
    pub relations: Vec<String>,
    /// The finite side's schema.
    pub table_schema: SchemaRef,
    /// Key expressions over the stream side.
    pub stream_keys: Vec<Arc<dyn PhysicalExpr>>,
    /// Key expressions over the table side.
    pub table_keys: Vec<Arc<dyn PhysicalExpr>>,
    /// Inner, or left outer with the stream preserved.
    pub join_type: JoinType,
    /// True when the stream is the left input (output = stream cols, table cols).
    pub stream_on_left: bool,
    /// Extra (non-equi) condition over the joined schema.
    pub filter: Option<Arc<dyn PhysicalExpr>>,
    /// The joined schema.
    pub schema: SchemaRef,
    /// The join keys as SQL, for EXPLAIN.
    pub display: String,
}

/// A window join of two streams: both inputs are shuffled by the join key
/// into the reduce stage, which keeps each open window's rows of both sides
/// and joins them once the watermark (the minimum over both inputs) passes
/// the window's end.
#[derive(Debug, Clone)]
pub struct WindowJoinPlan {
    /// Equi-join keys over the left input's map output (window bound excluded).
    pub left_keys: Vec<Arc<dyn PhysicalExpr>>,
    /// Equi-join keys over the right input's map output.
    pub right_keys: Vec<Arc<dyn PhysicalExpr>>,
    /// Column of the window bound (start or end) in the left map output.
    pub left_window: usize,
    /// Column of the window bound in the right map output.
    pub right_window: usize,
    /// True when the joined bound is `window_end` (else `window_start`).
    pub window_is_end: bool,
    /// Window size in microseconds.
    pub size_us: i64,
    /// Extra (non-equi) condition over the joined schema.
    pub filter: Option<Arc<dyn PhysicalExpr>>,
    /// The right input's schema (its keys are over it).
    pub right_input: SchemaRef,
    /// `Inner`, or `LeftSemi` / `LeftAnti` (`IN`, `EXISTS`, `NOT EXISTS`
    /// subqueries): the left rows with a match, or without one.
    pub join_type: JoinType,
    /// The output schema: left columns then right columns for an inner
    /// join, the left columns alone for a semi or anti join. `filter` is
    /// always over left then right columns.
    pub schema: SchemaRef,
    /// The ON clause as SQL, for EXPLAIN.
    pub display: String,
}

/// Which numbering a top-N bounds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Ranking {
    /// `ROW_NUMBER()`: 1, 2, 3, ...; ties in arrival order.
    #[default]
    RowNumber,
    /// `RANK()`: equal rows share a number and the next ones skip (1, 1,
    /// 3); a key keeps every row ranked at most N, ties at the boundary
    /// included.
    Rank,
    /// `DENSE_RANK()`: equal rows share a number, none skipped (1, 1, 2);
    /// a key keeps every row among its N best distinct values.
    DenseRank,
}

/// A top-N per key: `ROW_NUMBER() OVER (PARTITION BY k ORDER BY o)` with
/// a filter `<= N` on it (top-N; N = 1 is a dedup). The input is shuffled
/// by the partition keys; the reduce stage keeps each key's best N rows and,
/// after each micro-batch, emits every rank of the keys whose rows changed.
/// The input is append-only, so a key's ranks only fill up: the result is
/// an upsert keyed by the partition columns (and the rank when N > 1).
#[derive(Debug, Clone)]
pub struct TopNPlan {
    /// The `PARTITION BY` expressions over the input.
    pub partition_by: Vec<Arc<dyn PhysicalExpr>>,
    /// The `ORDER BY` expressions over the input, with their directions.
    pub order_by: Vec<(Arc<dyn PhysicalExpr>, arrow::compute::SortOptions)>,
    /// How many rows each key keeps.
    pub limit: u64,
    /// The input's schema.
    pub input: SchemaRef,
    /// The output: the input's columns, then the row number.
    pub schema: SchemaRef,
    /// The window as SQL, for EXPLAIN.
    pub display: String,
    /// Its rows feed an operator that consumes changes (an `OVER` or an
    /// aggregation): after each micro-batch it emits, for each key whose
    /// rows changed, the key's previous ranks with weight -1 and its new
    /// ones with +1 (unchanged ranks left out), in a last column
    /// [`WEIGHT_COLUMN`].
    pub changes: bool,
    /// `ROW_NUMBER()`, `RANK()` or `DENSE_RANK()`. With the last two, ties
    /// share a rank, so the rank is no key: the top-N emits changes.
    pub ranking: Ranking,
}

/// An `OVER` aggregation on event time: aggregates over a bounded frame of
/// each row's predecessors in its partition (`ROWS BETWEEN n PRECEDING AND
/// CURRENT ROW`, `RANGE BETWEEN INTERVAL ... PRECEDING AND CURRENT ROW`),
/// ordered by an event-time column. The input is shuffled by the `PARTITION
/// BY` keys; the reduce stage holds rows until the watermark says every row
/// with their time has arrived, then emits each row once with its
/// aggregates (append), keeping only the rows a later frame can reach.
#[derive(Debug, Clone)]
pub struct OverAggregatePlan {
    /// DataFusion's window expressions, over the input; each adds a column.
    pub window_exprs: Vec<Arc<dyn WindowExpr>>,
    /// The `PARTITION BY` expressions over the input (the shuffle's keys).
    pub partition_by: Vec<Arc<dyn PhysicalExpr>>,
    /// The `ORDER BY` column: event time.
    pub time_column: usize,
    /// Rows still to come have a time of at least the watermark minus this
    /// (µs): rows older than that are complete, peers included.
    pub time_lag_us: i64,
    /// What a later row's frame can reach.
    pub retain: OverRetain,
    /// The input's schema.
    pub input: SchemaRef,
    /// The output: the input's columns, then one per window expression.
    pub schema: SchemaRef,
    /// The window as SQL, for EXPLAIN.
    pub display: String,
    /// The input is a change stream (a top-N's or a non-windowed
    /// aggregation's rows, each with a [`WEIGHT_COLUMN`] last): rows come
    /// and go anywhere in a partition's order, so nothing waits for a
    /// watermark. Each micro-batch re-evaluates the rows whose frames the
    /// changes reach (a changed row and the `retain.rows` rows after it)
    /// and emits their previous results as `delete`s and their new ones
    /// as `insert`s in a last [`OP_COLUMN`](crate::OP_COLUMN) (`ROWS`
    /// frames only; `time_column` is then any orderable column).
    pub changes: bool,
}

/// The rows an `OVER` aggregation keeps per key for frames still to come:
/// its last `rows` rows and those less than `range_us` older than the
/// watermark (the largest of its frames; 0 when no frame is of that kind).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OverRetain {
    /// `ROWS n PRECEDING`: the last n rows.
    pub rows: u64,
    /// `RANGE INTERVAL ... PRECEDING`: that interval, in µs.
    pub range_us: i64,
    /// Every frame is `UNBOUNDED PRECEDING` (a running aggregate): no row
    /// is kept, only each key's accumulators (`rows` and `range_us` are 0).
    #[serde(default)]
    pub unbounded: bool,
}

/// An interval join of two streams (`l.ts BETWEEN r.ts - INTERVAL ... AND
/// r.ts + INTERVAL ...` with equality keys): both inputs are shuffled by the
/// keys into the reduce stage, which keeps the rows of both sides that a
/// future row of the other side can still match, emits each matching pair
/// once as soon as both rows are there, and drops rows by watermark.
#[derive(Debug, Clone)]
pub struct IntervalJoinPlan {
    /// Equi-join keys over the left input's map output.
    pub left_keys: Vec<Arc<dyn PhysicalExpr>>,
    /// Equi-join keys over the right input's map output.
    pub right_keys: Vec<Arc<dyn PhysicalExpr>>,
    /// The left time column.
    pub left_time: usize,
    /// The right time column.
    pub right_time: usize,
    /// `left_time - right_time >= lower_us` in every matching pair.
    pub lower_us: i64,
    /// `left_time - right_time <= upper_us` in every matching pair.
    pub upper_us: i64,
    /// Rows of the left input still to come have `left_time >= watermark -
    /// left_lag_us` (0 for a stream's event time, the window size for a
    /// window start).
    pub left_lag_us: i64,
    /// The same bound for the right input.
    pub right_lag_us: i64,
    /// The whole non-equi condition (the time bounds included) over left
    /// then right columns.
    pub filter: Option<Arc<dyn PhysicalExpr>>,
    /// The right input's schema (its keys are over it).
    pub right_input: SchemaRef,
    /// The output schema: left columns then right columns.
    pub schema: SchemaRef,
    /// The ON clause and the time bounds as SQL, for EXPLAIN.
    pub display: String,
    /// A regular join: no time bounds (the times, bounds and lags are not
    /// used), so no row is ever dropped by watermark. Both inputs are
    /// append-only, so an inner join's output is too.
    pub regular: bool,
    /// `Inner`, or (regular joins only) `Left`, `Right` or `Full`: a row of
    /// an outer side with no match yet is emitted padded with NULLs, and
    /// that row is deleted when its first match arrives. The output of an
    /// outer join is a change stream: its rows end with an `op` column,
    /// `insert` or `delete`.
    pub join_type: JoinType,
    /// A regular inner join of rows that change: both inputs end with a
    /// weight column ([`WEIGHT_COLUMN`], past `right_input`'s and the left
    /// input's columns), a held row is taken back by a row equal to it
    /// with the opposite weight, and the output is a change stream (`op`,
    /// `insert` or `delete`, per unit of the pair's weight product).
    pub weighted: bool,
}

/// Event time on a stream read without a window: the watermark is tracked
/// as the window assigner does (largest event time seen minus the delay),
/// and rows older than the watermark before them are dropped as late.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EventTimeSpec {
    /// Index of the event-time column in the stream's schema.
    pub time_column: usize,
    /// Its name.
    pub time_column_name: String,
    /// The stream's watermark delay in milliseconds.
    pub watermark_delay_ms: i64,
}

/// Which group column carries the window, so the reduce side can close it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WindowGroup {
    /// Index among the group columns.
    pub group_index: usize,
    /// True when the group column is `window_end` (else `window_start`).
    pub is_end: bool,
    /// Window size in microseconds (to get the end from the start; a
    /// session's gap).
    pub size_us: i64,
    /// Set for `SESSION` windows: the group columns are provisional
    /// per-row windows that the reduce side merges per key.
    #[serde(default)]
    pub session: Option<SessionBounds>,
}

/// Where a session aggregation's window bounds are among its group
/// columns (at least one of them is), and its other group columns: the
/// key each session belongs to, which the shuffle partitions by.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionBounds {
    /// Index of `window_start` among the group columns.
    pub start: Option<usize>,
    /// Index of `window_end` among the group columns.
    pub end: Option<usize>,
    /// The other group columns.
    pub keys: Vec<usize>,
}

/// A grouped aggregation split into partial (map) and final (reduce) halves.
#[derive(Debug, Clone)]
pub struct AggregatePlan {
    /// Group expressions over the aggregate input, with output names.
    pub group_exprs: Vec<(Arc<dyn PhysicalExpr>, String)>,
    /// The aggregate functions.
    pub aggregates: Vec<Arc<AggregateFunctionExpr>>,
    /// Optional `FILTER (WHERE ...)` per aggregate.
    pub filters: Vec<Option<Arc<dyn PhysicalExpr>>>,
    /// Schema of the group columns alone.
    pub group_schema: SchemaRef,
    /// Schema of a partial-aggregate block: group columns then every state field.
    pub partial_schema: SchemaRef,
    /// Output: group columns then aggregate values.
    pub output_schema: SchemaRef,
    /// Set when the aggregation groups by a window column.
    pub window: Option<WindowGroup>,
    /// A non-windowed aggregation whose rows feed another aggregation: it
    /// emits changes, each changed group's previous row with weight -1 and
    /// its new row with weight +1, in a last column
    /// [`WEIGHT_COLUMN`].
    pub changes: bool,
    /// Its input is such changes (its aggregates are sums of weighted
    /// values): `state_ttl` must not evict a group, whose later
    /// retractions would then start it below zero.
    pub over_changes: bool,
}

/// The weight column of a change stream: +1 for a row added, -1 for a row
/// retracted (an update is a retraction and an addition).
pub const WEIGHT_COLUMN: &str = "__drizzle_weight";

/// How results leave the query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EmitMode {
    /// One output row per qualifying input row.
    Append,
    /// Each window's final rows, once, when the watermark passes its end.
    OnWindowClose,
    /// After each micro-batch, the current row of every group that changed.
    Upsert,
    /// After each micro-batch, the rows the result lost and gained, each
    /// with an `op` column last: `delete` or `insert` (a result without a
    /// key, such as an `OVER` over changing rows).
    Changes,
}

impl fmt::Display for EmitMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EmitMode::Append => "append",
            EmitMode::OnWindowClose => "on window close",
            EmitMode::Upsert => "upsert",
            EmitMode::Changes => "changes",
        })
    }
}

/// A planned continuous query: its stage graph and how results leave it.
#[derive(Debug, Clone)]
pub struct StreamingPlan {
    /// The stages and the shuffles between them.
    pub graph: StageGraph,
    /// `LIMIT n`: the query ends after n rows.
    pub limit: Option<usize>,
    /// Schema of the rows delivered.
    pub output_schema: SchemaRef,
    /// Output semantics.
    pub emit: EmitMode,
    /// For upserts: the output columns that hold the group key, when every
    /// group column is selected as is.
    pub upsert_keys: Option<Vec<usize>>,
    /// An output column that never decreases from one emitted row to the
    /// next: a window bound of a query that emits each window's rows, in
    /// window order, when it closes (a windowed aggregate or window join at
    /// the sink). A view over this query's view uses it as event time.
    pub event_time: Option<usize>,
    /// The output's last column is `op` (an upsert whose keys can go away:
    /// an aggregate over changes): `upsert` for a key's new row, `delete`
    /// when the key is gone.
    pub op_column: bool,
    /// A view's `ORDER BY ... LIMIT n` top-N: the output's last data
    /// column (before `op`) is its rank, the view's key, which the view
    /// does not show.
    pub rank_column: bool,
}

impl StreamingPlan {
    /// The plan's stage graph.
    pub fn graph(&self) -> StageGraph {
        self.graph.clone()
    }

    /// For a materialized view: an upsert whose sink filters its rows
    /// (`HAVING`) deletes the keys whose new row fails the filter, through
    /// an `op` column, rather than leave their old row in the view. (A
    /// continuous `SELECT` keeps the filter: it would otherwise show a
    /// delete for every key that never passed.)
    pub fn delete_filtered_keys(&mut self) -> crate::error::Result<()> {
        if self.emit != EmitMode::Upsert {
            return Ok(());
        }
        let Some(sink) = self.graph.stages.last_mut() else {
            return Ok(());
        };
        let Some(operators) =
            crate::lower::deletes_for_filtered_rows(&sink.operators, self.op_column)?
        else {
            return Ok(());
        };
        sink.operators = operators;
        if !self.op_column {
            self.op_column = true;
            let schema = Arc::new(crate::lower::with_op_column(&self.output_schema));
            self.output_schema = Arc::clone(&schema);
            self.graph.output_schema = schema;
        }
        Ok(())
    }

    /// True when the plan has a shuffle.
    pub fn has_shuffle(&self) -> bool {
        self.graph.shuffles() > 0
    }

    /// The streams read, one per source stage in stage order.
    pub fn streams(&self) -> Vec<&StreamDef> {
        self.graph
            .sources()
            .filter_map(|s| match &s.input {
                crate::graph::StageInput::Source(stream) => Some(stream),
                crate::graph::StageInput::Shuffle(_) => None,
            })
            .collect()
    }

    /// The stages of the plan as EXPLAIN shows them (from [`Self::graph`]).
    pub fn stages(&self, reduce_partitions: usize) -> Vec<StageDesc> {
        let graph = self.graph();
        graph
            .stages
            .iter()
            .map(|stage| StageDesc {
                id: stage.id.0,
                tasks: stage.tasks(reduce_partitions as u32).to_string(),
                operators: crate::graph::describe(stage, reduce_partitions as u32),
            })
            .collect()
    }

    /// EXPLAIN text, one line per row.
    pub fn explain(&self, reduce_partitions: usize) -> Vec<String> {
        let header = format!(
            "StreamingQuery: emit={}, output=[{}]{}",
            self.emit,
            self.output_schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>()
                .join(", "),
            self.limit
                .map(|l| format!(", limit={l}"))
                .unwrap_or_default()
        );
        self.graph().explain(header, reduce_partitions as u32)
    }
}

/// A stage as shown by EXPLAIN.
#[derive(Debug, Clone)]
pub struct StageDesc {
    /// Stage id.
    pub id: u32,
    /// How many tasks run per micro-batch.
    pub tasks: String,
    /// Operators, source first.
    pub operators: Vec<String>,
}
