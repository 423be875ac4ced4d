//! The streaming plan: what a continuous query computes, as a pipeline of
//! per-batch kernels around one optional stateful aggregation.
//!
//! ```text
//!  source ─▶ [WindowAssignExec] ─▶ map ops (FilterExec, ProjectionExec, LookupJoinExec)
//!         ─▶ [AggregatePartialExec ─▶ shuffle by group key ─▶ AggregateFinalExec]
//!         ─▶ post ops (HAVING, projection) ─▶ sink
//! ```
//!
//! Everything before the shuffle runs in the map stage (one `MapTask` per
//! source partition and micro-batch); the final aggregation and the post ops
//! run in the reduce stage (one `ReduceTask` per reduce partition and
//! micro-batch). Expressions are DataFusion `PhysicalExpr`s, evaluated over
//! Arrow batches; state and event time are Drizzle's own.

use std::fmt;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::logical_expr::{JoinType, LogicalPlan};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_expr::PhysicalExpr;

use crate::catalog::StreamDef;
use crate::providers::WindowSpec;

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
}

/// How to join a stream against a finite relation.
#[derive(Debug, Clone)]
pub struct LookupJoinSpec {
    /// The join's number within its plan (map ops first, then post ops):
    /// how a worker names it when it asks the coordinator for the table side.
    pub id: u32,
    /// The finite side, re-evaluated when a table it reads changes.
    pub table_plan: LogicalPlan,
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

/// A stream input of a plan: its source, window assignment and stateless
/// map kernels (the second input of a window join).
#[derive(Debug, Clone)]
pub struct StreamInput {
    /// The stream read.
    pub stream: StreamDef,
    /// Window assignment applied to the source rows.
    pub window: Option<WindowSpec>,
    /// Stateless kernels of this input's map stage.
    pub map_ops: Vec<BatchOp>,
}

/// A window join of two streams: both inputs are shuffled by the join key
/// into the reduce stage, which keeps each open window's rows of both sides
/// and joins them once the watermark (the minimum over both inputs) passes
/// the window's end.
#[derive(Debug, Clone)]
pub struct WindowJoinPlan {
    /// The right input (the left one is the plan's own stream).
    pub right: StreamInput,
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
    /// The joined schema: left columns then right columns.
    pub schema: SchemaRef,
    /// The ON clause as SQL, for EXPLAIN.
    pub display: String,
}

/// Which group column carries the window, so the reduce side can close it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WindowGroup {
    /// Index among the group columns.
    pub group_index: usize,
    /// True when the group column is `window_end` (else `window_start`).
    pub is_end: bool,
    /// Window size in microseconds (to get the end from the start).
    pub size_us: i64,
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
}

/// How results leave the query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EmitMode {
    /// One output row per qualifying input row.
    Append,
    /// Each window's final rows, once, when the watermark passes its end.
    OnWindowClose,
    /// After each micro-batch, the current row of every group that changed.
    Upsert,
}

impl fmt::Display for EmitMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EmitMode::Append => "append",
            EmitMode::OnWindowClose => "on window close",
            EmitMode::Upsert => "upsert",
        })
    }
}

/// A planned continuous query.
#[derive(Debug, Clone)]
pub struct StreamingPlan {
    /// The stream read.
    pub stream: StreamDef,
    /// Window assignment applied to the source rows.
    pub window: Option<WindowSpec>,
    /// Stateless kernels of the map stage.
    pub map_ops: Vec<BatchOp>,
    /// The stateful aggregation, if any.
    pub aggregate: Option<AggregatePlan>,
    /// A window join with a second stream, if any (never with `aggregate`).
    pub join: Option<WindowJoinPlan>,
    /// Kernels after the aggregation (HAVING, projection).
    pub post_ops: Vec<BatchOp>,
    /// `LIMIT n`: the query ends after n rows.
    pub limit: Option<usize>,
    /// Schema of the rows delivered.
    pub output_schema: SchemaRef,
    /// Output semantics.
    pub emit: EmitMode,
    /// For upserts: the output columns that hold the group key, when every
    /// group column is selected as is.
    pub upsert_keys: Option<Vec<usize>>,
}

impl StreamingPlan {
    /// True when the plan has a shuffle (an aggregation or a window join).
    pub fn has_shuffle(&self) -> bool {
        self.aggregate.is_some() || self.join.is_some()
    }

    /// The stream inputs: the plan's own stream, then a window join's right one.
    pub fn inputs(&self) -> Vec<StreamInput> {
        let mut v = vec![StreamInput {
            stream: self.stream.clone(),
            window: self.window.clone(),
            map_ops: self.map_ops.clone(),
        }];
        if let Some(j) = &self.join {
            v.push(j.right.clone());
        }
        v
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
