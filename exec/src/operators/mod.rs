//! The operators a task runs over one micro-batch.
//!
//! * [`apply_ops`]: the stateless kernels (`FilterExec`, `ProjectionExec`,
//!   `LookupJoinExec`) of a stage.
//! * [`WindowAssignExec`]: assigns `TUMBLE`/`HOP`/`SESSION` windows and drops late rows,
//!   judging lateness row by row against the watermark *before* that row
//!   (the largest event time seen earlier in the partition minus the delay),
//!   exactly as a record-at-a-time engine would; its only state is that
//!   maximum, so results do not depend on how rows fall into micro-batches.
//! * [`partial_aggregate`]: the map-side half of an aggregation, producing one
//!   row of partial states per group of the batch.
//! * [`AggregateFinalExec`]: the reduce-side half, keyed state kept as
//!   DataFusion `GroupsAccumulator`s (Arrow arrays of partial states). A
//!   windowed aggregation keeps one group table per open window and drops it
//!   when the window closes, so memory is bounded by the open windows.
//! * [`SessionAggregateExec`]: the reduce side of an aggregation over
//!   `SESSION` windows: per key, the provisional windows of its partial
//!   rows merged into sessions, each emitted once the watermark passes its
//!   end, so memory is bounded by the open sessions.
//! * [`WindowJoinExec`]: the reduce side of a window join of two streams:
//!   each open window's rows of both inputs, hash-joined and dropped when the
//!   watermark passes the window's end.
//! * [`IntervalJoinExec`]: the reduce side of an interval join: rows of both
//!   inputs held until the watermark passes their interval, each matching
//!   pair emitted once as soon as both rows are there (without an interval,
//!   a regular join holding every row; an outer one also emits unmatched
//!   rows padded with NULLs and deletes them at their first match).
//! * [`TopNExec`]: the best N rows per key (`ROW_NUMBER() ... <= N`),
//!   re-emitted as an upsert when a key's rows change.
//! * [`OverAggregateExec`]: aggregates over a bounded frame of each row's
//!   predecessors in event-time order (`OVER (... ROWS/RANGE ... PRECEDING
//!   AND CURRENT ROW)`), each row emitted once its frame is complete.
//! * [`OverChangesExec`]: the same over changing rows (a top-N's): each
//!   change re-evaluates the frames it reaches and emits the results that
//!   went and came, as `delete`s and `insert`s.
//!
//! Stateful operators keep one contract, [`StatefulOperator`]: a
//! micro-batch's rows per input and the input watermark in, batches out,
//! state size for the memory budget, snapshot and restore for checkpoints.
//! [`stateful_operator`] is the registry that builds one from a stage
//! graph's [`Operator`]; adding an operator is its file plus a line there.

use std::collections::BTreeMap;

// hashbrown with a fast non-cryptographic hasher (the join probe is on the hot path).
use datafusion::common::HashMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatchOptions,
    TimestampMicrosecondArray, UInt32Array,
};
use arrow::compute::{filter_record_batch, take, take_record_batch};
use arrow::datatypes::{DataType, SchemaRef, TimestampMicrosecondType};
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, SortField};
use datafusion::logical_expr::{EmitTo, GroupsAccumulator, JoinType};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_expr::{GroupsAccumulatorAdapter, PhysicalExpr};
use datafusion::physical_plan::aggregates::group_values::{new_group_values, GroupValues};
use datafusion::physical_plan::aggregates::order::GroupOrdering;
use drizzle_planner::{
    AggregatePlan, BatchOp, EventTimeSpec, IntervalJoinPlan, LookupJoinSpec, Operator, Stage,
    StageInput, TopNPlan, WindowJoinPlan, WindowKind, WindowSpec,
};

use crate::error::{ExecError, Result};

mod aggregate;
mod chain;
mod interval_join;
mod lookup_join;
mod over;
mod over_changes;
mod session;
mod top_n;
mod window_assign;
mod window_join;
#[allow(unused_imports)]
pub use self::aggregate::*;
#[allow(unused_imports)]
pub use self::chain::*;
#[allow(unused_imports)]
pub use self::interval_join::*;
#[allow(unused_imports)]
pub use self::lookup_join::*;
#[allow(unused_imports)]
pub use self::over::*;
#[allow(unused_imports)]
pub use self::over_changes::*;
#[allow(unused_imports)]
pub use self::session::*;
#[allow(unused_imports)]
pub use self::top_n::*;
#[allow(unused_imports)]
pub use self::window_assign::*;
#[allow(unused_imports)]
pub use self::window_join::*;

/// Evaluates the finite side of a lookup join (a table, a view, or a query
/// over them) and says when the relations it reads changed.
pub trait TableEvaluator: Send + Sync {
    /// A number that changes whenever a relation `spec` reads may have
    /// changed. Asked every micro-batch: cheap.
    fn version(&self, spec: &LookupJoinSpec) -> u64;
    /// A number that changes whenever any table or view changes (the
    /// coordinator pushes it to workers as the signal to check).
    fn any_version(&self) -> u64;
    /// The rows of a lookup join's finite side (its `table_plan` run to
    /// completion, or fetched from the coordinator by the join's id) with
    /// their version, or `None` when `held`, the version of the rows the
    /// caller holds, is still current.
    fn evaluate(
        &self,
        spec: &LookupJoinSpec,
        held: Option<u64>,
    ) -> Result<Option<(u64, Vec<RecordBatch>)>>;
}

fn eval(expr: &Arc<dyn PhysicalExpr>, batch: &RecordBatch) -> Result<ArrayRef> {
    Ok(expr.evaluate(batch)?.into_array(batch.num_rows())?)
}

fn as_mask(array: &ArrayRef) -> Result<BooleanArray> {
    match array.data_type() {
        DataType::Boolean => Ok(array.as_boolean().clone()),
        DataType::Null => Ok(BooleanArray::from(vec![false; array.len()])),
        other => Err(ExecError::invalid(format!(
            "predicate evaluated to {other}, not boolean"
        ))),
    }
}

/// Applies stateless kernels in order.
pub fn apply_ops(
    ops: &[BatchOp],
    mut batch: RecordBatch,
    joins: &mut JoinCache,
    tables: &dyn TableEvaluator,
) -> Result<RecordBatch> {
    for (i, op) in ops.iter().enumerate() {
        if batch.num_rows() == 0 {
            // Still give the batch the right schema.
            batch = match op {
                BatchOp::Filter { .. } | BatchOp::TopK { .. } => batch,
                BatchOp::Project { schema, .. } => RecordBatch::new_empty(Arc::clone(schema)),
                BatchOp::LookupJoin(spec) => RecordBatch::new_empty(Arc::clone(&spec.schema)),
            };
            continue;
        }
        batch = match op {
            BatchOp::Filter { predicate } => {
                let mask = as_mask(&eval(predicate, &batch)?)?;
                filter_record_batch(&batch, &mask)?
            }
            BatchOp::Project { exprs, schema } => {
                let columns = exprs
                    .iter()
                    .map(|e| eval(e, &batch))
                    .collect::<Result<Vec<_>>>()?;
                RecordBatch::try_new_with_options(
                    Arc::clone(schema),
                    columns,
                    &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
                )?
            }
            BatchOp::LookupJoin(spec) => lookup_join(i, spec, &batch, joins, tables)?,
            BatchOp::TopK { order_by, limit } => first_rows(&batch, order_by, *limit)?,
        };
    }
    Ok(batch)
}

/// `batch`'s first `limit` rows in `order_by` order, equal rows in
/// arrival order, kept in arrival order.
fn first_rows(
    batch: &RecordBatch,
    order_by: &[(Arc<dyn PhysicalExpr>, arrow::compute::SortOptions)],
    limit: usize,
) -> Result<RecordBatch> {
    if batch.num_rows() <= limit {
        return Ok(batch.clone());
    }
    let mut columns = Vec::with_capacity(order_by.len() + 1);
    for (e, options) in order_by {
        columns.push(arrow::compute::SortColumn {
            values: eval(e, batch)?,
            options: Some(*options),
        });
    }
    // The row's position breaks ties: the earlier row is first.
    let n = u32::try_from(batch.num_rows())
        .map_err(|_| ExecError::invalid("a batch of more than 4 billion rows"))?;
    columns.push(arrow::compute::SortColumn {
        values: Arc::new(UInt32Array::from_iter_values(0..n)),
        options: None,
    });
    let best = arrow::compute::lexsort_to_indices(&columns, Some(limit))?;
    // Back in arrival order.
    let mut kept: Vec<u32> = best.values().to_vec();
    kept.sort_unstable();
    Ok(take_record_batch(batch, &UInt32Array::from(kept))?)
}

/// What a stateful operator emits for one micro-batch.
pub struct OperatorOutput {
    /// Batches, each tagged with the window it closes (its end, µs; `None`
    /// for upserts), in window order.
    pub chunks: Vec<(Option<i64>, RecordBatch)>,
    /// Rows that arrived for a window that had already closed.
    pub late: u64,
}

/// A checkpoint of one stateful operator of one partition.
#[derive(Debug, Default)]
pub struct OperatorSnapshot {
    /// Windows ending at or before this (µs) are closed.
    pub closed_through: Option<i64>,
    /// Set when the rows are a delta: the keys changed after this batch's
    /// complete checkpoint.
    pub delta_base: Option<u64>,
    /// The rows, one section per input of the operator (as shuffled to the
    /// partition, so a restore can re-partition them by the same keys).
    pub sections: Vec<Vec<RecordBatch>>,
}

/// The contract of every stateful operator (stateless kernels stay
/// DataFusion `PhysicalExpr`s, see [`apply_ops`]).
pub trait StatefulOperator: Send {
    /// Its name, as EXPLAIN and errors show it.
    fn name(&self) -> &'static str;

    /// Consumes micro-batch `batch`: `inputs[i]` holds its rows from input
    /// `i`; `watermark_us` is the minimum of the inputs' watermarks.
    fn process(
        &mut self,
        batch: u64,
        inputs: &[Vec<RecordBatch>],
        watermark_us: Option<i64>,
    ) -> Result<OperatorOutput>;

    /// The state held now.
    fn state_size(&self) -> StateSize;

    /// A checkpoint of the state, a delta of the keys changed after
    /// `delta_base`'s checkpoint where the operator supports it.
    fn snapshot(&mut self, delta_base: Option<u64>) -> Result<OperatorSnapshot>;

    /// Restores from checkpoint layers, oldest first: a delta chain (full
    /// snapshot first), or every old partition's snapshot when the partition
    /// count changed (sections already re-partitioned to this partition).
    /// `batch` is the checkpoint's micro-batch.
    fn restore(&mut self, layers: Vec<OperatorSnapshot>, batch: u64) -> Result<()>;

    /// `SET state_ttl`: state idle (or, for held join rows, as old) for
    /// this many micro-batches may be evicted. Operators whose state the
    /// watermark bounds ignore it. Idle times are counted in micro-batches
    /// and kept in checkpoints, so a recovered query evicts exactly what
    /// the original run would have.
    fn set_state_ttl(&mut self, _batches: u64) {}
}

/// How often (in micro-batches) an operator with a state TTL of `ttl`
/// micro-batches looks for idle state: an eighth of the TTL, so state is
/// evicted at most an eighth of the TTL late; the same batches in every run.
pub(crate) fn ttl_check(batch: u64, ttl: u64) -> bool {
    batch.is_multiple_of((ttl / 8).max(1))
}

/// The registry: the stateful operator a graph operator runs as, if it is
/// one.
pub fn stateful_operator(op: &Operator) -> Result<Option<Box<dyn StatefulOperator>>> {
    Ok(match op {
        Operator::AggregateFinal(plan)
            if plan.window.as_ref().is_some_and(|w| w.session.is_some()) =>
        {
            Some(Box::new(SessionAggregateExec::new(plan.as_ref().clone())?))
        }
        Operator::AggregateFinal(plan) => {
            Some(Box::new(AggregateFinalExec::new(plan.as_ref().clone())))
        }
        Operator::WindowJoin(plan) => Some(Box::new(WindowJoinExec::new(plan.as_ref().clone()))),
        Operator::IntervalJoin(plan) => {
            Some(Box::new(IntervalJoinExec::new(plan.as_ref().clone())?))
        }
        Operator::Union => Some(Box::new(UnionExec)),
        Operator::TopN(plan) => Some(Box::new(TopNExec::new(plan.as_ref().clone())?)),
        Operator::OverAggregate(plan) if plan.changes => {
            Some(Box::new(OverChangesExec::new(plan.as_ref().clone())?))
        }
        Operator::OverAggregate(plan) => {
            Some(Box::new(OverAggregateExec::new(plan.as_ref().clone())?))
        }
        Operator::WindowAssign(_)
        | Operator::EventTime(_)
        | Operator::Kernel(_)
        | Operator::AggregatePartial(_) => None,
    })
}

/// `UNION ALL` of a stage's shuffle inputs: every row of every input, as
/// they come. It holds no state, so checkpoints skip it.
pub struct UnionExec;

impl StatefulOperator for UnionExec {
    fn name(&self) -> &'static str {
        "UnionExec"
    }

    fn process(
        &mut self,
        _batch: u64,
        inputs: &[Vec<RecordBatch>],
        _watermark_us: Option<i64>,
    ) -> Result<OperatorOutput> {
        Ok(OperatorOutput {
            chunks: inputs
                .iter()
                .flatten()
                .filter(|b| b.num_rows() > 0)
                .map(|b| (None, b.clone()))
                .collect(),
            late: 0,
        })
    }

    fn state_size(&self) -> StateSize {
        StateSize::default()
    }

    fn snapshot(&mut self, _delta_base: Option<u64>) -> Result<OperatorSnapshot> {
        Ok(OperatorSnapshot::default())
    }

    fn restore(&mut self, _layers: Vec<OperatorSnapshot>, _batch: u64) -> Result<()> {
        Ok(())
    }
}

/// Memory held by an operator's state, for the query memory budget and
/// `SHOW QUERIES`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateSize {
    /// Bytes allocated (group keys, accumulators, held rows, hash tables).
    pub bytes: u64,
    /// Keys (groups) or, for a join, rows held.
    pub keys: u64,
}

impl std::ops::AddAssign for StateSize {
    fn add_assign(&mut self, o: Self) {
        self.bytes += o.bytes;
        self.keys += o.keys;
    }
}

/// (key, time, time) of every output row: an Int64 column and two
/// timestamp columns, by index (operator tests compare these with models).
#[cfg(test)]
pub(crate) fn key_and_times(out: &OperatorOutput, [k, a, b]: [usize; 3]) -> Vec<(i64, i64, i64)> {
    let mut v = Vec::new();
    for (_, batch) in &out.chunks {
        let key = batch
            .column(k)
            .as_primitive::<arrow::datatypes::Int64Type>();
        let x = batch.column(a).as_primitive::<TimestampMicrosecondType>();
        let y = batch.column(b).as_primitive::<TimestampMicrosecondType>();
        for i in 0..batch.num_rows() {
            v.push((key.value(i), x.value(i), y.value(i)));
        }
    }
    v
}

/// The rows of a one-input operator's only input.
fn one_input<'a>(name: &str, inputs: &'a [Vec<RecordBatch>]) -> Result<&'a [RecordBatch]> {
    match inputs {
        [rows] => Ok(rows),
        _ => Err(ExecError::invalid(format!(
            "{name} reads one input, not {}",
            inputs.len()
        ))),
    }
}

/// Row `i`'s key bytes in row format; the one empty key when the operator
/// has no key columns (`keys` is `None`).
fn key_of(keys: &Option<arrow::row::Rows>, i: usize) -> &[u8] {
    keys.as_ref().map_or(&[][..], |k| k.row(i).data())
}

fn batches_bytes<'a>(batches: impl IntoIterator<Item = &'a RecordBatch>) -> u64 {
    batches
        .into_iter()
        .map(|b| b.get_array_memory_size() as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{Field, Schema, TimeUnit};

    fn spec(kind: WindowKind, slide_s: i64, size_s: i64, delay_s: i64) -> WindowSpec {
        WindowSpec {
            kind,
            time_column: 0,
            time_column_name: "ts".into(),
            size_ms: size_s * 1000,
            slide_ms: slide_s * 1000,
            watermark_delay_ms: delay_s * 1000,
            processing_time: false,
        }
    }

    #[test]
    fn a_batch_keeps_its_best_rows_in_arrival_order_ties_to_the_earlier() {
        use datafusion::physical_expr::expressions::Column;
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("price", DataType::Int64, true),
        ]));
        let b = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3, 4, 5, 6])),
                Arc::new(Int64Array::from(vec![
                    Some(5),
                    Some(9),
                    None,
                    Some(9),
                    Some(7),
                    Some(9),
                ])),
            ],
        )
        .unwrap();
        let order: Vec<(Arc<dyn PhysicalExpr>, arrow::compute::SortOptions)> = vec![(
            Arc::new(Column::new("price", 1)),
            arrow::compute::SortOptions {
                descending: true,
                nulls_first: false,
            },
        )];
        let ids = |b: &RecordBatch| -> Vec<i64> {
            b.column(0)
                .as_primitive::<arrow::datatypes::Int64Type>()
                .values()
                .to_vec()
        };
        // The three 9s tie: the first two arrived first.
        assert_eq!(ids(&first_rows(&b, &order, 2).unwrap()), [2, 4]);
        assert_eq!(ids(&first_rows(&b, &order, 4).unwrap()), [2, 4, 5, 6]);
        assert_eq!(
            ids(&first_rows(&b, &order, 10).unwrap()),
            [1, 2, 3, 4, 5, 6]
        );
    }

    fn batch(ts_s: &[i64]) -> (SchemaRef, RecordBatch) {
        let t = DataType::Timestamp(TimeUnit::Microsecond, None);
        let input = Arc::new(Schema::new(vec![Field::new("ts", t.clone(), true)]));
        let b = RecordBatch::try_new(
            input,
            vec![Arc::new(TimestampMicrosecondArray::from(
                ts_s.iter().map(|s| s * 1_000_000).collect::<Vec<_>>(),
            ))],
        )
        .unwrap();
        let out = Arc::new(Schema::new(vec![
            Field::new("ts", t.clone(), true),
            Field::new("window_start", t.clone(), false),
            Field::new("window_end", t, false),
        ]));
        (out, b)
    }

    #[test]
    fn lateness_is_judged_per_row_whatever_the_batching() {
        let rows = [1, 12, 5, 15, 4, 25, 19, 35];
        let s = spec(WindowKind::Tumble, 10, 10, 2);
        // All at once.
        let (schema, b) = batch(&rows);
        let mut one = WindowAssignExec::default();
        let all = one.assign(&s, &schema, &b).unwrap();
        // One row per batch.
        let mut many = WindowAssignExec::default();
        let mut late = 0;
        let mut kept = 0;
        for r in rows {
            let (schema, b) = batch(&[r]);
            let out = many.assign(&s, &schema, &b).unwrap();
            late += out.late;
            kept += out.batch.num_rows();
        }
        assert_eq!(all.late, 3);
        assert_eq!((late, kept), (all.late, all.batch.num_rows()));
        assert_eq!(one.watermark_us(&s), Some(33_000_000));
    }

    #[test]
    fn hop_assigns_every_overlapping_window() {
        let s = spec(WindowKind::Hop, 5, 10, 0);
        let (schema, b) = batch(&[7]);
        let out = WindowAssignExec::default().assign(&s, &schema, &b).unwrap();
        let starts = out
            .batch
            .column(1)
            .as_primitive::<TimestampMicrosecondType>();
        let mut v: Vec<i64> = starts.values().iter().map(|x| x / 1_000_000).collect();
        v.sort();
        assert_eq!(v, vec![0, 5]);
    }

    #[test]
    fn window_state_is_dropped_when_the_window_closes() {
        // The end-to-end behaviour is covered by sql-tests/slt/streaming/window.slt;
        // here we check the bookkeeping of AggregateFinalExec directly.
        let t = DataType::Timestamp(TimeUnit::Microsecond, None);
        let group_schema = Arc::new(Schema::new(vec![Field::new(
            "window_start",
            t.clone(),
            false,
        )]));
        let plan = AggregatePlan {
            group_exprs: vec![(
                Arc::new(datafusion::physical_expr::expressions::Column::new(
                    "window_start",
                    0,
                )),
                "window_start".into(),
            )],
            aggregates: vec![],
            filters: vec![],
            group_schema: Arc::clone(&group_schema),
            partial_schema: Arc::clone(&group_schema),
            output_schema: Arc::clone(&group_schema),
            window: Some(drizzle_planner::WindowGroup {
                group_index: 0,
                is_end: false,
                size_us: 10_000_000,
                session: None,
            }),
            changes: false,
            over_changes: false,
        };
        let mut agg = AggregateFinalExec::new(plan);
        let part = RecordBatch::try_new(
            Arc::clone(&group_schema),
            vec![Arc::new(TimestampMicrosecondArray::from(vec![
                0, 10_000_000, 20_000_000,
            ]))],
        )
        .unwrap();
        let out = agg.process(0, &[part], Some(15_000_000)).unwrap();
        assert_eq!(out.chunks.len(), 1, "only [0,10) closed");
        assert_eq!(agg.open_state(), 2);
        let out = agg.process(1, &[], Some(30_000_000)).unwrap();
        assert_eq!(out.chunks.len(), 2);
        assert_eq!(agg.open_state(), 0, "closed windows free their state");
    }

    /// `SELECT k, count(k) AS n ... GROUP BY k` as an aggregate plan.
    fn count_by_key() -> AggregatePlan {
        use datafusion::physical_expr::aggregate::AggregateExprBuilder;
        let key = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
        let count = AggregateExprBuilder::new(
            datafusion::functions_aggregate::count::count_udaf(),
            vec![Arc::new(
                datafusion::physical_expr::expressions::Column::new("k", 0),
            )],
        )
        .schema(Arc::clone(&key))
        .alias("n")
        .build()
        .unwrap();
        let state: Vec<Field> = count
            .state_fields()
            .unwrap()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        let mut partial = vec![Field::new("k", DataType::Int64, false)];
        partial.extend(state);
        AggregatePlan {
            group_exprs: vec![(
                Arc::new(datafusion::physical_expr::expressions::Column::new("k", 0)),
                "k".into(),
            )],
            aggregates: vec![Arc::new(count)],
            filters: vec![None],
            group_schema: Arc::clone(&key),
            partial_schema: Arc::new(Schema::new(partial)),
            output_schema: Arc::new(Schema::new(vec![
                Field::new("k", DataType::Int64, false),
                Field::new("n", DataType::Int64, false),
            ])),
            window: None,
            changes: false,
            over_changes: false,
        }
    }

    /// The partial rows of `keys` for `plan`.
    fn key_rows(plan: &AggregatePlan, keys: &[i64]) -> RecordBatch {
        let b = RecordBatch::try_new(
            Arc::clone(&plan.group_schema),
            vec![Arc::new(Int64Array::from(keys.to_vec()))],
        )
        .unwrap();
        partial_aggregate(plan, &b).unwrap()
    }

    /// (k, n, weight if any) of every output row, sorted.
    fn counted(out: &OperatorOutput) -> Vec<(i64, i64, Option<i64>)> {
        let mut v = Vec::new();
        for (_, b) in &out.chunks {
            let k = b.column(0).as_primitive::<arrow::datatypes::Int64Type>();
            let n = b.column(1).as_primitive::<arrow::datatypes::Int64Type>();
            let w = b
                .columns()
                .get(2)
                .map(|w| w.as_primitive::<arrow::datatypes::Int64Type>());
            v.extend((0..b.num_rows()).map(|i| (k.value(i), n.value(i), w.map(|w| w.value(i)))));
        }
        v.sort_unstable();
        v
    }

    /// An aggregate feeding another emits changes: a changed group's last
    /// row retracted (-1), its new row added (+1). A restore remembers
    /// the last rows.
    #[test]
    fn a_changing_aggregate_retracts_its_last_rows() {
        let mut plan = count_by_key();
        plan.changes = true;
        for restore in [false, true] {
            let mut agg: Box<dyn StatefulOperator> =
                Box::new(AggregateFinalExec::new(plan.clone()));
            let out = agg
                .process(0, &[vec![key_rows(&plan, &[1, 1, 2])]], None)
                .unwrap();
            assert_eq!(counted(&out), vec![(1, 2, Some(1)), (2, 1, Some(1))]);
            if restore {
                let snap = agg.snapshot(None).unwrap();
                agg = Box::new(AggregateFinalExec::new(plan.clone()));
                agg.restore(vec![snap], 0).unwrap();
            }
            let out = agg
                .process(1, &[vec![key_rows(&plan, &[2, 3])]], None)
                .unwrap();
            assert_eq!(
                counted(&out),
                vec![(2, 1, Some(-1)), (2, 2, Some(1)), (3, 1, Some(1))],
                "restored: {restore}"
            );
            // No rows, no changes.
            let out = agg.process(2, &[vec![]], None).unwrap();
            assert_eq!(counted(&out), vec![]);
        }
    }

    /// `SET state_ttl` on a non-windowed aggregate: a group no row changed
    /// for longer than the TTL starts over; its last change survives a
    /// checkpoint, and the checkpoint after an eviction is complete.
    #[test]
    fn groups_idle_longer_than_the_ttl_start_over() {
        let plan = count_by_key();
        let rows = |k: &[i64]| key_rows(&plan, k);
        let counts = |out: &OperatorOutput| -> Vec<(i64, i64)> {
            counted(out).into_iter().map(|(k, n, _)| (k, n)).collect()
        };
        for restore in [false, true] {
            let mut agg: Box<dyn StatefulOperator> =
                Box::new(AggregateFinalExec::new(plan.clone()));
            agg.set_state_ttl(4);
            agg.process(0, &[vec![rows(&[1, 1, 2])]], None).unwrap();
            agg.process(3, &[vec![rows(&[2])]], None).unwrap();
            if restore {
                let snap = agg.snapshot(None).unwrap();
                agg = Box::new(AggregateFinalExec::new(plan.clone()));
                agg.set_state_ttl(4);
                agg.restore(vec![snap], 3).unwrap();
            }
            // Batch 6: group 1 (changed at 0) is gone, group 2 (3) is not.
            let out = agg.process(6, &[vec![rows(&[1, 2])]], None).unwrap();
            assert_eq!(counts(&out), vec![(1, 1), (2, 3)], "restored: {restore}");
            assert_eq!(agg.state_size().keys, 2);
            let snap = agg.snapshot(Some(5)).unwrap();
            assert_eq!(
                snap.delta_base, None,
                "after an eviction, a complete checkpoint"
            );
            let snap = agg.snapshot(Some(6)).unwrap();
            assert_eq!(snap.delta_base, Some(6), "then deltas again");
        }
    }

    #[test]
    fn checkpoint_deltas_hold_changed_keys_and_overlay_to_the_full_state() {
        let key = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
        let plan = AggregatePlan {
            group_exprs: vec![(
                Arc::new(datafusion::physical_expr::expressions::Column::new("k", 0)),
                "k".into(),
            )],
            aggregates: vec![],
            filters: vec![],
            group_schema: Arc::clone(&key),
            partial_schema: Arc::clone(&key),
            output_schema: Arc::clone(&key),
            window: None,
            changes: false,
            over_changes: false,
        };
        let keys = |k: &[i64]| {
            RecordBatch::try_new(
                Arc::clone(&key),
                vec![Arc::new(Int64Array::from(k.to_vec()))],
            )
            .unwrap()
        };
        let rows = |b: &[RecordBatch]| b.iter().map(|b| b.num_rows()).sum::<usize>();
        let mut agg = AggregateFinalExec::new(plan.clone());
        agg.process(1, &[keys(&[1, 2, 3])], None).unwrap();
        let (_, full) = agg.snapshot(None).unwrap();
        assert_eq!(rows(&full), 3);
        agg.process(2, &[keys(&[2, 4])], None).unwrap();
        let (_, delta) = agg.snapshot(Some(1)).unwrap();
        assert_eq!(rows(&delta), 2, "keys 2 and 4 changed after batch 1");
        let (_, none) = agg.snapshot(Some(2)).unwrap();
        assert_eq!(rows(&none), 0);
        // Snapshots leave the state (and its change stamps) as they were.
        let (_, again) = agg.snapshot(Some(1)).unwrap();
        assert_eq!(rows(&again), 2);
        let (c, laid) = agg.overlay(vec![(None, full), (None, delta)]).unwrap();
        assert_eq!(rows(&laid), 4, "one row per key, the latest");
        let mut back = AggregateFinalExec::new(plan);
        back.restore(c, &laid, 2).unwrap();
        assert_eq!(back.open_state(), 4);
        let (_, since) = back.snapshot(Some(2)).unwrap();
        assert_eq!(rows(&since), 0, "restored keys are as of the checkpoint");
    }

    #[test]
    fn window_join_emits_closed_windows_once_and_counts_late_rows() {
        use arrow::datatypes::{Field, Schema, TimeUnit};
        use datafusion::physical_expr::expressions::Column;
        let side = |name: &str| {
            Arc::new(Schema::new(vec![
                Field::new(name, DataType::Int64, true),
                Field::new(
                    "window_start",
                    DataType::Timestamp(TimeUnit::Microsecond, None),
                    false,
                ),
            ]))
        };
        let (ls, rs) = (side("a"), side("b"));
        let joined = Arc::new(Schema::new(
            ls.fields()
                .iter()
                .chain(rs.fields().iter())
                .map(|f| f.as_ref().clone())
                .collect::<Vec<_>>(),
        ));
        let plan = WindowJoinPlan {
            left_keys: vec![Arc::new(Column::new("a", 0))],
            right_keys: vec![Arc::new(Column::new("b", 0))],
            left_window: 1,
            right_window: 1,
            window_is_end: false,
            size_us: 10,
            filter: None,
            right_input: Arc::clone(&rs),
            join_type: JoinType::Inner,
            schema: joined,
            display: String::new(),
        };
        let batch = |schema: &SchemaRef, keys: Vec<Option<i64>>, starts: Vec<i64>| {
            RecordBatch::try_new(
                Arc::clone(schema),
                vec![
                    Arc::new(Int64Array::from(keys)),
                    Arc::new(TimestampMicrosecondArray::from(starts)),
                ],
            )
            .unwrap()
        };
        let mut exec = WindowJoinExec::new(plan.clone());
        // Window [0,10): keys 1, 1, NULL on the left; 1 and 2 on the right.
        let out = exec
            .process(
                &[batch(&ls, vec![Some(1), Some(1), None], vec![0, 0, 0])],
                &[batch(&rs, vec![Some(1), Some(2)], vec![0, 10])],
                Some(5),
            )
            .unwrap();
        assert!(out.chunks.is_empty(), "the watermark has not passed 10");
        assert_eq!(exec.open_windows(), 2);
        let out = exec.process(&[], &[], Some(10)).unwrap();
        assert_eq!(out.chunks.len(), 1);
        let (end, rows) = &out.chunks[0];
        assert_eq!(*end, Some(10));
        assert_eq!(
            rows.num_rows(),
            2,
            "two left rows with key 1 match one right row; NULL never matches"
        );
        assert_eq!(exec.open_windows(), 1);
        // A row for the closed window is late; the open one still joins.
        let out = exec
            .process(
                &[batch(&ls, vec![Some(1), Some(2)], vec![0, 10])],
                &[],
                Some(20),
            )
            .unwrap();
        assert_eq!(out.late, 1);
        assert_eq!(out.chunks.len(), 1);
        assert_eq!(out.chunks[0].1.num_rows(), 1);
        assert_eq!(exec.open_windows(), 0);

        // Checkpoints as a full snapshot and deltas of the rows that came
        // since: the chain restores exactly the open windows (the full
        // snapshot's window [0,10) closed before the last delta).
        let mut exec = WindowJoinExec::new(plan.clone());
        let inputs = [
            (vec![1, 1], vec![0, 10], vec![1, 2], vec![0, 10], 5),
            (vec![1, 2], vec![10, 20], vec![2], vec![20], 15),
            (vec![2], vec![20], vec![1, 2], vec![10, 30], 15),
        ];
        let mut chain = Vec::new();
        for (b, (lk, lt, rk, rt, wm)) in inputs.into_iter().enumerate() {
            let left = batch(&ls, lk.into_iter().map(Some).collect(), lt);
            let right = batch(&rs, rk.into_iter().map(Some).collect(), rt);
            StatefulOperator::process(&mut exec, b as u64, &[vec![left], vec![right]], Some(wm))
                .unwrap();
            let base = b.checked_sub(1).map(|p| p as u64);
            let snap = StatefulOperator::snapshot(&mut exec, base).unwrap();
            assert_eq!(snap.delta_base, base);
            chain.push(snap);
        }
        let held = |s: &OperatorSnapshot| s.sections.iter().flatten().map(|b| b.num_rows()).sum();
        let sizes: Vec<usize> = chain.iter().map(held).collect();
        assert_eq!(
            sizes,
            vec![4, 3, 3],
            "each delta holds only its batch's rows"
        );
        let mut back = WindowJoinExec::new(plan);
        StatefulOperator::restore(&mut back, chain, 2).unwrap();
        assert_eq!(back.open_windows(), exec.open_windows());
        let rows = |e: &mut WindowJoinExec| -> Vec<(Option<i64>, usize)> {
            let out = StatefulOperator::process(e, 3, &[vec![], vec![]], Some(100)).unwrap();
            out.chunks.iter().map(|(w, b)| (*w, b.num_rows())).collect()
        };
        let want = rows(&mut exec);
        assert_eq!(want, vec![(Some(20), 2), (Some(30), 2), (Some(40), 0)]);
        assert_eq!(rows(&mut back), want);
    }
}
