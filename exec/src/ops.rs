//! The operators a task runs over one micro-batch.
//!
//! * [`apply_ops`]: the stateless kernels (`FilterExec`, `ProjectionExec`,
//!   `LookupJoinExec`) of a stage.
//! * [`WindowAssignExec`]: assigns `TUMBLE`/`HOP` windows and drops late rows,
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
//! * [`WindowJoinExec`]: the reduce side of a window join of two streams:
//!   each open window's rows of both inputs, hash-joined and dropped when the
//!   watermark passes the window's end.

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
    AggregatePlan, BatchOp, LookupJoinSpec, WindowJoinPlan, WindowKind, WindowSpec,
};

use crate::error::{ExecError, Result};

/// Evaluates the finite side of a lookup join (a table, a view, or a query
/// over them) and says when any table changed.
pub trait TableEvaluator: Send + Sync {
    /// A number that changes whenever any table or view changes.
    fn version(&self) -> u64;
    /// The rows of a lookup join's finite side (its `table_plan` run to
    /// completion, or fetched from the coordinator by the join's id).
    fn evaluate(&self, spec: &LookupJoinSpec) -> Result<Vec<RecordBatch>>;
}

/// Per-task cache of the hash tables of lookup joins.
#[derive(Default)]
pub struct JoinCache {
    tables: HashMap<usize, BuiltTable>,
}

impl JoinCache {
    /// Memory held by the built tables (rows and hash indexes).
    pub fn size(&self) -> StateSize {
        let mut size = StateSize::default();
        for t in self.tables.values() {
            let index = match &t.index {
                KeyIndex::Int(m) => {
                    m.capacity() * (size_of::<(i64, Vec<u32>)>() + 1)
                        + m.values().map(|v| v.capacity() * 4).sum::<usize>()
                }
                KeyIndex::Rows { converter, index } => {
                    converter.size()
                        + index.capacity() * (size_of::<(Box<[u8]>, Vec<u32>)>() + 1)
                        + index
                            .iter()
                            .map(|(k, v)| k.len() + v.capacity() * 4)
                            .sum::<usize>()
                }
            };
            size += StateSize {
                bytes: t.batch.get_array_memory_size() as u64 + index as u64,
                keys: t.batch.num_rows() as u64,
            };
        }
        size
    }
}

struct BuiltTable {
    version: u64,
    batch: RecordBatch,
    index: KeyIndex,
}

/// Table rows by join key.
enum KeyIndex {
    /// One integer key: hashed as i64, no row encoding.
    Int(HashMap<i64, Vec<u32>>),
    /// Any other key: arrow's row format.
    Rows {
        converter: RowConverter,
        index: RowIndex,
    },
}

fn int_key(array: &ArrayRef) -> Option<ArrayRef> {
    match array.data_type() {
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32 => arrow::compute::cast(array, &DataType::Int64).ok(),
        _ => None,
    }
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
                BatchOp::Filter { .. } => batch,
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
        };
    }
    Ok(batch)
}

/// Row numbers by key, in arrow's row format.
type RowIndex = HashMap<Box<[u8]>, Vec<u32>>;

/// Rows by their key (arrow's row format); rows with a NULL key are left
/// out (they never match). Returns the converter to encode probe keys.
fn row_key_index(keys: &[ArrayRef], rows: usize) -> Result<(RowConverter, RowIndex)> {
    let converter = RowConverter::new(
        keys.iter()
            .map(|k| SortField::new(k.data_type().clone()))
            .collect(),
    )?;
    let encoded = converter.convert_columns(keys)?;
    let mut index: RowIndex = HashMap::new();
    for row in 0..rows {
        if keys.iter().any(|k| k.is_null(row)) {
            continue;
        }
        index
            .entry(encoded.row(row).as_ref().into())
            .or_default()
            .push(row as u32);
    }
    Ok((converter, index))
}

fn lookup_join(
    op_index: usize,
    spec: &LookupJoinSpec,
    batch: &RecordBatch,
    joins: &mut JoinCache,
    tables: &dyn TableEvaluator,
) -> Result<RecordBatch> {
    let version = tables.version();
    let stale = joins
        .tables
        .get(&op_index)
        .is_none_or(|t| t.version != version);
    if stale {
        let batches = tables.evaluate(spec)?;
        let table = arrow::compute::concat_batches(&spec.table_schema, &batches)?;
        let keys = spec
            .table_keys
            .iter()
            .map(|e| eval(e, &table))
            .collect::<Result<Vec<_>>>()?;
        let index = match (keys.len(), keys.first().and_then(int_key)) {
            (1, Some(k)) => {
                let k = k.as_primitive::<arrow::datatypes::Int64Type>();
                let mut index: HashMap<i64, Vec<u32>> = HashMap::with_capacity(k.len());
                for row in 0..k.len() {
                    if k.is_valid(row) {
                        index.entry(k.value(row)).or_default().push(row as u32);
                    }
                }
                KeyIndex::Int(index)
            }
            _ => {
                let (converter, index) = row_key_index(&keys, table.num_rows())?;
                KeyIndex::Rows { converter, index }
            }
        };
        joins.tables.insert(
            op_index,
            BuiltTable {
                version,
                batch: table,
                index,
            },
        );
    }
    let built = joins
        .tables
        .get(&op_index)
        .ok_or_else(|| ExecError::invalid("lookup join table missing"))?;
    let keys = spec
        .stream_keys
        .iter()
        .map(|e| eval(e, batch))
        .collect::<Result<Vec<_>>>()?;
    let mut stream_idx: Vec<u32> = Vec::with_capacity(batch.num_rows());
    let mut table_idx: Vec<Option<u32>> = Vec::with_capacity(batch.num_rows());
    let left = spec.join_type == JoinType::Left;
    let mut emit = |row: usize, matches: Option<&Vec<u32>>| match matches {
        Some(m) => {
            for &t in m {
                stream_idx.push(row as u32);
                table_idx.push(Some(t));
            }
        }
        None if left => {
            stream_idx.push(row as u32);
            table_idx.push(None);
        }
        None => {}
    };
    // The table side's key types are the same after DataFusion's coercion.
    match &built.index {
        KeyIndex::Int(index) => {
            let k = int_key(&keys[0])
                .ok_or_else(|| ExecError::invalid("join key is not an integer"))?;
            let k = k.as_primitive::<arrow::datatypes::Int64Type>();
            for row in 0..batch.num_rows() {
                emit(
                    row,
                    if k.is_null(row) {
                        None
                    } else {
                        index.get(&k.value(row))
                    },
                );
            }
        }
        KeyIndex::Rows { converter, index } => {
            let rows = converter.convert_columns(&keys)?;
            for row in 0..batch.num_rows() {
                let null = keys.iter().any(|k| k.is_null(row));
                emit(
                    row,
                    if null {
                        None
                    } else {
                        index.get(rows.row(row).as_ref())
                    },
                );
            }
        }
    }
    let stream_part = take_record_batch(batch, &UInt32Array::from(stream_idx))?;
    let table_indices = UInt32Array::from(table_idx);
    let table_cols = built
        .batch
        .columns()
        .iter()
        .map(|c| take(c.as_ref(), &table_indices, None))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut columns = Vec::with_capacity(spec.schema.fields().len());
    if spec.stream_on_left {
        columns.extend(stream_part.columns().iter().cloned());
        columns.extend(table_cols);
    } else {
        columns.extend(table_cols);
        columns.extend(stream_part.columns().iter().cloned());
    }
    let joined = RecordBatch::try_new_with_options(
        Arc::clone(&spec.schema),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(stream_part.num_rows())),
    )?;
    match &spec.filter {
        Some(f) => {
            let mask = as_mask(&eval(f, &joined)?)?;
            Ok(filter_record_batch(&joined, &mask)?)
        }
        None => Ok(joined),
    }
}

/// Window assignment with per-row watermarks; the state of one source partition.
#[derive(Debug, Clone, Default)]
pub struct WindowAssignExec {
    /// Largest event time seen so far in the partition (µs).
    pub max_event_us: Option<i64>,
}

/// What [`WindowAssignExec::assign`] produced.
pub struct Assigned {
    /// Input rows (repeated per window for HOP) plus `window_start`, `window_end`.
    pub batch: RecordBatch,
    /// Rows dropped because their window had already closed.
    pub late: u64,
}

impl WindowAssignExec {
    /// The partition's watermark after the rows seen so far (µs).
    pub fn watermark_us(&self, spec: &WindowSpec) -> Option<i64> {
        self.max_event_us
            .map(|m| m.saturating_sub(spec.watermark_delay_ms * 1000))
    }

    /// Assigns windows to `batch` (the stream's rows) and drops late rows.
    pub fn assign(
        &mut self,
        spec: &WindowSpec,
        schema: &SchemaRef,
        batch: &RecordBatch,
    ) -> Result<Assigned> {
        let ts = batch.column(spec.time_column);
        let ts = ts
            .as_primitive_opt::<TimestampMicrosecondType>()
            .ok_or_else(|| {
                ExecError::invalid("window time column is not a microsecond timestamp")
            })?;
        let size = spec.size_ms * 1000;
        let slide = spec.slide_ms * 1000;
        let delay = spec.watermark_delay_ms * 1000;
        let mut take_idx: Vec<u32> = Vec::with_capacity(batch.num_rows());
        let mut starts: Vec<i64> = Vec::with_capacity(batch.num_rows());
        let mut late = 0u64;
        let mut max = self.max_event_us;
        for row in 0..batch.num_rows() {
            if ts.is_null(row) {
                continue;
            }
            let t = ts.value(row);
            let wm = max.map(|m| m.saturating_sub(delay));
            let last_start = t.div_euclid(slide) * slide;
            let mut s = last_start;
            let mut kept = false;
            while s > t - size {
                let end = s + size;
                if wm.is_none_or(|w| end > w) {
                    take_idx.push(row as u32);
                    starts.push(s);
                    kept = true;
                }
                if spec.kind == WindowKind::Tumble {
                    break;
                }
                s -= slide;
            }
            if !kept {
                late += 1;
            }
            max = Some(max.map_or(t, |m| m.max(t)));
        }
        self.max_event_us = max;
        // HOP emits windows latest-start first per row; order is irrelevant to the aggregate.
        // The common case (TUMBLE, nothing late, no NULL times) keeps every row once: no copy.
        let base = if take_idx.len() == batch.num_rows() && spec.kind == WindowKind::Tumble {
            batch.clone()
        } else {
            take_record_batch(batch, &UInt32Array::from(take_idx))?
        };
        let tz = match ts.data_type() {
            DataType::Timestamp(_, tz) => tz.clone(),
            _ => None,
        };
        let ends: Vec<i64> = starts.iter().map(|s| s + size).collect();
        let mut columns = base.columns().to_vec();
        columns.push(Arc::new(
            TimestampMicrosecondArray::from(starts).with_timezone_opt(tz.clone()),
        ));
        columns.push(Arc::new(
            TimestampMicrosecondArray::from(ends).with_timezone_opt(tz),
        ));
        let out = RecordBatch::try_new_with_options(
            Arc::clone(schema),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(base.num_rows())),
        )?;
        Ok(Assigned { batch: out, late })
    }
}

fn new_accumulator(agg: &Arc<AggregateFunctionExpr>) -> Result<Box<dyn GroupsAccumulator>> {
    if agg.groups_accumulator_supported() {
        Ok(agg.create_groups_accumulator()?)
    } else {
        let agg = Arc::clone(agg);
        Ok(Box::new(GroupsAccumulatorAdapter::new(move || {
            agg.create_accumulator()
        })))
    }
}

/// The map-side half of an aggregation: one row per group of `batch`, the
/// group columns followed by every aggregate's partial state.
pub fn partial_aggregate(plan: &AggregatePlan, batch: &RecordBatch) -> Result<RecordBatch> {
    if batch.num_rows() == 0 {
        return Ok(RecordBatch::new_empty(Arc::clone(&plan.partial_schema)));
    }
    let group_cols = plan
        .group_exprs
        .iter()
        .map(|(e, _)| eval(e, batch))
        .collect::<Result<Vec<_>>>()?;
    let mut values = new_group_values(Arc::clone(&plan.group_schema), &GroupOrdering::None)?;
    let mut groups = Vec::with_capacity(batch.num_rows());
    if group_cols.is_empty() {
        groups.resize(batch.num_rows(), 0);
    } else {
        values.intern(&group_cols, &mut groups)?;
    }
    let n = if group_cols.is_empty() {
        1
    } else {
        values.len()
    };
    let mut columns = if group_cols.is_empty() {
        Vec::new()
    } else {
        values.emit(EmitTo::All)?
    };
    for (agg, filter) in plan.aggregates.iter().zip(&plan.filters) {
        let mut acc = new_accumulator(agg)?;
        let args = agg
            .expressions()
            .iter()
            .map(|e| eval(e, batch))
            .collect::<Result<Vec<_>>>()?;
        let mask = match filter {
            Some(f) => Some(as_mask(&eval(f, batch)?)?),
            None => None,
        };
        acc.update_batch(&args, &groups, mask.as_ref(), n)?;
        columns.extend(acc.state(EmitTo::All)?);
    }
    Ok(RecordBatch::try_new_with_options(
        Arc::clone(&plan.partial_schema),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(n)),
    )?)
}

struct GroupTable {
    values: Box<dyn GroupValues>,
    accs: Vec<Box<dyn GroupsAccumulator>>,
    /// For a global aggregate (no GROUP BY): whether any row arrived.
    seen: bool,
    /// Per group: the micro-batch that last changed it (incremental
    /// checkpoints write the groups changed since the last one).
    changed: Vec<u64>,
}

impl GroupTable {
    fn new(plan: &AggregatePlan) -> Result<Self> {
        Ok(Self {
            values: new_group_values(Arc::clone(&plan.group_schema), &GroupOrdering::None)?,
            accs: plan
                .aggregates
                .iter()
                .map(new_accumulator)
                .collect::<Result<Vec<_>>>()?,
            seen: false,
            changed: Vec::new(),
        })
    }

    fn size(&self, plan: &AggregatePlan) -> StateSize {
        StateSize {
            bytes: (self.values.size()
                + self.accs.iter().map(|a| a.size()).sum::<usize>()
                + self.changed.capacity() * 8) as u64,
            keys: self.len(plan) as u64,
        }
    }

    fn len(&self, plan: &AggregatePlan) -> usize {
        if plan.group_exprs.is_empty() {
            usize::from(self.seen)
        } else {
            self.values.len()
        }
    }

    /// Merges partial rows of micro-batch `stamp`; returns the group index
    /// of each row.
    fn merge(
        &mut self,
        plan: &AggregatePlan,
        partial: &RecordBatch,
        stamp: u64,
    ) -> Result<Vec<usize>> {
        let k = plan.group_exprs.len();
        let mut groups = Vec::with_capacity(partial.num_rows());
        if k == 0 {
            groups.resize(partial.num_rows(), 0);
            self.seen |= partial.num_rows() > 0;
        } else {
            self.values.intern(&partial.columns()[..k], &mut groups)?;
        }
        let total = self.len(plan).max(1);
        let mut col = k;
        for (acc, agg) in self.accs.iter_mut().zip(&plan.aggregates) {
            let width = agg.state_fields()?.len();
            acc.merge_batch(&partial.columns()[col..col + width], &groups, total)?;
            col += width;
        }
        if self.changed.len() < total {
            self.changed.resize(total, stamp);
        }
        for &g in &groups {
            self.changed[g] = stamp;
        }
        Ok(groups)
    }

    /// The table as partial rows (group columns, then every aggregate's
    /// state: `plan.partial_schema`), leaving the table as it was; with
    /// `since`, only the groups changed after that micro-batch.
    fn snapshot(&mut self, plan: &AggregatePlan, since: Option<u64>) -> Result<RecordBatch> {
        let n = self.len(plan);
        if n == 0 {
            return Ok(RecordBatch::new_empty(Arc::clone(&plan.partial_schema)));
        }
        let mut columns = if plan.group_exprs.is_empty() {
            Vec::new()
        } else {
            self.values.emit(EmitTo::All)?
        };
        for acc in &mut self.accs {
            columns.extend(acc.state(EmitTo::All)?);
        }
        let partial = RecordBatch::try_new_with_options(
            Arc::clone(&plan.partial_schema),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(n)),
        )?;
        // Emitting drained the table: merge the rows back, in group order
        // (so group indexes, and their change stamps, stay as they were).
        let changed = std::mem::take(&mut self.changed);
        *self = GroupTable::new(plan)?;
        self.merge(plan, &partial, 0)?;
        self.changed = changed;
        let Some(since) = since else {
            return Ok(partial);
        };
        let picked: Vec<u32> = (0..n)
            .filter(|&g| self.changed.get(g).is_none_or(|&c| c > since))
            .map(|g| g as u32)
            .collect();
        if picked.len() == n {
            return Ok(partial);
        }
        Ok(take_record_batch(&partial, &UInt32Array::from(picked))?)
    }

    /// Emits every group's final row and empties the table.
    fn emit_all(&mut self, plan: &AggregatePlan) -> Result<RecordBatch> {
        let n = self.len(plan);
        if n == 0 {
            return Ok(RecordBatch::new_empty(Arc::clone(&plan.output_schema)));
        }
        let mut columns = if plan.group_exprs.is_empty() {
            Vec::new()
        } else {
            self.values.emit(EmitTo::All)?
        };
        for acc in &mut self.accs {
            columns.push(acc.evaluate(EmitTo::All)?);
        }
        Ok(RecordBatch::try_new_with_options(
            Arc::clone(&plan.output_schema),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(n)),
        )?)
    }

    /// The current rows of `changed` groups, leaving the state in place.
    /// `keys` holds the group columns of rows whose group index is `key_groups`.
    fn emit_changed(
        &mut self,
        plan: &AggregatePlan,
        changed: &[usize],
        keys: &[ArrayRef],
    ) -> Result<RecordBatch> {
        let total = self.len(plan);
        let mut columns: Vec<ArrayRef> = keys.to_vec();
        let local: Vec<usize> = (0..changed.len()).collect();
        let idx = UInt32Array::from(changed.iter().map(|&g| g as u32).collect::<Vec<_>>());
        for (acc, agg) in self.accs.iter_mut().zip(&plan.aggregates) {
            // GroupsAccumulator emits destructively: take the states, put them
            // back, and evaluate a scratch accumulator over the changed groups.
            let states = acc.state(EmitTo::All)?;
            let identity: Vec<usize> = (0..total).collect();
            acc.merge_batch(&states, &identity, total)?;
            let picked = states
                .iter()
                .map(|s| take(s.as_ref(), &idx, None))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let mut scratch = new_accumulator(agg)?;
            scratch.merge_batch(&picked, &local, changed.len())?;
            columns.push(scratch.evaluate(EmitTo::All)?);
        }
        Ok(RecordBatch::try_new_with_options(
            Arc::clone(&plan.output_schema),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(changed.len())),
        )?)
    }
}

/// Output of one reduce task for one micro-batch.
pub struct AggregateOutput {
    /// Closed windows (by window end, µs) or, for upserts, one chunk keyed `None`.
    pub chunks: Vec<(Option<i64>, RecordBatch)>,
    /// Rows that arrived for a window that had already closed.
    pub late: u64,
}

/// The reduce-side half of an aggregation; the keyed state of one reduce partition.
pub struct AggregateFinalExec {
    plan: AggregatePlan,
    /// Upsert (no window) state.
    table: Option<GroupTable>,
    /// Windowed state: window end (µs) → groups of that window.
    windows: BTreeMap<i64, GroupTable>,
    /// Windows with end ≤ this are closed (µs).
    closed_through: Option<i64>,
}

impl AggregateFinalExec {
    /// Empty state for `plan`.
    pub fn new(plan: AggregatePlan) -> Self {
        Self {
            plan,
            table: None,
            windows: BTreeMap::new(),
            closed_through: None,
        }
    }

    /// Number of open windows (windowed) or groups (upsert).
    pub fn open_state(&self) -> usize {
        match &self.table {
            Some(t) => t.len(&self.plan),
            None => self.windows.len(),
        }
    }

    /// Memory held by the keyed state (every open window's groups).
    pub fn state_size(&self) -> StateSize {
        let mut size = StateSize::default();
        if let Some(t) = &self.table {
            size += t.size(&self.plan);
        }
        for t in self.windows.values() {
            size += t.size(&self.plan);
        }
        size
    }

    /// The schema of [`AggregateFinalExec::snapshot`]'s rows: the partial
    /// schema plus the window end (NULL for an upsert aggregate).
    pub fn snapshot_schema(&self) -> SchemaRef {
        let mut fields: Vec<arrow::datatypes::FieldRef> =
            self.plan.partial_schema.fields().iter().cloned().collect();
        fields.push(Arc::new(arrow::datatypes::Field::new(
            STATE_WINDOW_END,
            DataType::Int64,
            true,
        )));
        Arc::new(arrow::datatypes::Schema::new(fields))
    }

    /// The keyed state as rows (see [`AggregateFinalExec::snapshot_schema`];
    /// the first columns are the group columns, which the shuffle hashes on)
    /// and the closed-through bound; the state itself is unchanged. With
    /// `since`, only the groups changed after that micro-batch: a delta that
    /// [`AggregateFinalExec::overlay`] lays over the state as of `since`.
    pub fn snapshot(&mut self, since: Option<u64>) -> Result<(Option<i64>, Vec<RecordBatch>)> {
        let schema = self.snapshot_schema();
        let mut out = Vec::new();
        let mut tables: Vec<(Option<i64>, &mut GroupTable)> = Vec::new();
        if let Some(t) = self.table.as_mut() {
            tables.push((None, t));
        }
        tables.extend(self.windows.iter_mut().map(|(end, t)| (Some(*end), t)));
        for (end, table) in tables {
            let partial = table.snapshot(&self.plan, since)?;
            if partial.num_rows() == 0 {
                continue;
            }
            let mut columns = partial.columns().to_vec();
            columns.push(Arc::new(Int64Array::from(vec![end; partial.num_rows()])));
            out.push(RecordBatch::try_new(Arc::clone(&schema), columns)?);
        }
        Ok((self.closed_through, out))
    }

    /// Lays checkpoint layers over each other (a full snapshot, then the
    /// deltas written after it, in order): of the rows with one key (group
    /// columns and window end) the last wins, and windows closed as of the
    /// last layer are dropped. Returns the closed-through bound and rows
    /// for [`AggregateFinalExec::restore`].
    pub fn overlay(
        &self,
        layers: Vec<(Option<i64>, Vec<RecordBatch>)>,
    ) -> Result<(Option<i64>, Vec<RecordBatch>)> {
        let closed_through = layers.iter().filter_map(|(c, _)| *c).max();
        let batches: Vec<RecordBatch> = layers
            .into_iter()
            .flat_map(|(_, rows)| rows)
            .filter(|b| b.num_rows() > 0)
            .collect();
        if batches.len() <= 1 && closed_through.is_none() {
            return Ok((closed_through, batches));
        }
        let k = self.plan.group_exprs.len();
        let width = self.plan.partial_schema.fields().len();
        let schema = self.snapshot_schema();
        let mut key_fields: Vec<SortField> = schema.fields()[..k]
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect();
        key_fields.push(SortField::new(DataType::Int64));
        let converter = RowConverter::new(key_fields)?;
        let mut seen: datafusion::common::HashSet<Box<[u8]>> = Default::default();
        let mut kept: Vec<RecordBatch> = Vec::with_capacity(batches.len());
        // Newest first, so the first row of a key seen is its latest.
        for batch in batches.iter().rev() {
            if batch.num_columns() != width + 1 {
                return Err(ExecError::invalid(
                    "checkpointed aggregate state does not match the query",
                ));
            }
            let mut cols: Vec<ArrayRef> = batch.columns()[..k].to_vec();
            cols.push(Arc::clone(batch.column(width)));
            let rows = converter.convert_columns(&cols)?;
            let ends = batch
                .column(width)
                .as_primitive_opt::<arrow::datatypes::Int64Type>()
                .ok_or_else(|| ExecError::invalid("checkpointed window ends are not Int64"))?;
            let mut pick = Vec::new();
            for i in (0..batch.num_rows()).rev() {
                let closed = ends.is_valid(i) && closed_through.is_some_and(|c| ends.value(i) <= c);
                if seen.insert(rows.row(i).as_ref().into()) && !closed {
                    pick.push(i as u32);
                }
            }
            pick.reverse();
            if !pick.is_empty() {
                kept.push(take_record_batch(batch, &UInt32Array::from(pick))?);
            }
        }
        kept.reverse();
        Ok((closed_through, kept))
    }

    /// Merges snapshot rows (of this partition, or re-partitioned by key)
    /// into the state, as of micro-batch `as_of` (the checkpoint's).
    pub fn restore(
        &mut self,
        closed_through: Option<i64>,
        rows: &[RecordBatch],
        as_of: u64,
    ) -> Result<()> {
        if let Some(c) = closed_through {
            self.closed_through = Some(self.closed_through.map_or(c, |o| o.max(c)));
        }
        let width = self.plan.partial_schema.fields().len();
        for batch in rows {
            if batch.num_rows() == 0 {
                continue;
            }
            if batch.num_columns() != width + 1 {
                return Err(ExecError::invalid(
                    "checkpointed aggregate state does not match the query",
                ));
            }
            let partial = RecordBatch::try_new(
                Arc::clone(&self.plan.partial_schema),
                batch.columns()[..width].to_vec(),
            )?;
            let ends = batch
                .column(width)
                .as_primitive_opt::<arrow::datatypes::Int64Type>()
                .ok_or_else(|| ExecError::invalid("checkpointed window ends are not Int64"))?;
            if self.plan.window.is_none() {
                if self.table.is_none() {
                    self.table = Some(GroupTable::new(&self.plan)?);
                }
                if let Some(t) = self.table.as_mut() {
                    t.merge(&self.plan, &partial, as_of)?;
                }
                continue;
            }
            let mut by_window: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
            for row in 0..ends.len() {
                if ends.is_valid(row) {
                    by_window
                        .entry(ends.value(row))
                        .or_default()
                        .push(row as u32);
                }
            }
            for (end, rows) in by_window {
                let part = take_record_batch(&partial, &UInt32Array::from(rows))?;
                let table = match self.windows.entry(end) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert(GroupTable::new(&self.plan)?)
                    }
                };
                table.merge(&self.plan, &part, as_of)?;
            }
        }
        Ok(())
    }

    /// Merges the partial blocks of one micro-batch, then emits: closed windows
    /// (when `watermark_us` passed their end) or the changed groups.
    pub fn process(
        &mut self,
        batch: u64,
        partials: &[RecordBatch],
        watermark_us: Option<i64>,
    ) -> Result<AggregateOutput> {
        match self.plan.window {
            None => self.process_upsert(batch, partials),
            Some(w) => self.process_windowed(batch, partials, w, watermark_us),
        }
    }

    fn process_upsert(&mut self, stamp: u64, partials: &[RecordBatch]) -> Result<AggregateOutput> {
        if self.table.is_none() {
            self.table = Some(GroupTable::new(&self.plan)?);
        }
        let plan = &self.plan;
        let Some(table) = self.table.as_mut() else {
            return Err(ExecError::invalid("aggregate state missing"));
        };
        let k = plan.group_exprs.len();
        let mut first_row: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
        let mut order: Vec<usize> = Vec::new();
        for (b, partial) in partials.iter().enumerate() {
            if partial.num_rows() == 0 {
                continue;
            }
            let groups = table.merge(plan, partial, stamp)?;
            for (row, g) in groups.into_iter().enumerate() {
                if let std::collections::btree_map::Entry::Vacant(e) = first_row.entry(g) {
                    e.insert((b, row));
                    order.push(g);
                }
            }
        }
        if order.is_empty() {
            return Ok(AggregateOutput {
                chunks: vec![],
                late: 0,
            });
        }
        // Key values of the changed groups, taken from the rows that changed them.
        let keys: Vec<ArrayRef> = (0..k)
            .map(|c| {
                let parts: Vec<ArrayRef> = order
                    .iter()
                    .map(|g| {
                        let (b, row) = first_row[g];
                        partials[b].column(c).slice(row, 1)
                    })
                    .collect();
                let refs: Vec<&dyn Array> = parts.iter().map(|a| a.as_ref()).collect();
                arrow::compute::concat(&refs)
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let out = table.emit_changed(plan, &order, &keys)?;
        Ok(AggregateOutput {
            chunks: vec![(None, out)],
            late: 0,
        })
    }

    fn process_windowed(
        &mut self,
        stamp: u64,
        partials: &[RecordBatch],
        w: drizzle_planner::WindowGroup,
        watermark_us: Option<i64>,
    ) -> Result<AggregateOutput> {
        let mut late = 0u64;
        for partial in partials {
            if partial.num_rows() == 0 {
                continue;
            }
            let col = partial.column(w.group_index);
            let ts = col
                .as_primitive_opt::<TimestampMicrosecondType>()
                .ok_or_else(|| ExecError::invalid("window column is not a timestamp"))?;
            let mut by_window: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
            for row in 0..ts.len() {
                let v = ts.value(row);
                let end = if w.is_end { v } else { v + w.size_us };
                by_window.entry(end).or_default().push(row as u32);
            }
            for (end, rows) in by_window {
                if self.closed_through.is_some_and(|c| end <= c) {
                    late += rows.len() as u64;
                    continue;
                }
                let part = if rows.len() == partial.num_rows() {
                    partial.clone()
                } else {
                    take_record_batch(partial, &UInt32Array::from(rows))?
                };
                let table = match self.windows.entry(end) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert(GroupTable::new(&self.plan)?)
                    }
                };
                table.merge(&self.plan, &part, stamp)?;
            }
        }
        let mut chunks = Vec::new();
        if let Some(wm) = watermark_us {
            while let Some(entry) = self.windows.first_entry() {
                if *entry.key() > wm {
                    break;
                }
                let end = *entry.key();
                let mut table = entry.remove();
                chunks.push((Some(end), table.emit_all(&self.plan)?));
            }
            self.closed_through = Some(self.closed_through.map_or(wm, |c| c.max(wm)));
        }
        Ok(AggregateOutput { chunks, late })
    }
}

/// Name of the window-end column of checkpointed aggregate state.
pub const STATE_WINDOW_END: &str = "__drizzle_window_end";

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

fn batches_bytes<'a>(batches: impl IntoIterator<Item = &'a RecordBatch>) -> u64 {
    batches
        .into_iter()
        .map(|b| b.get_array_memory_size() as u64)
        .sum()
}

/// The reduce side of a window join: rows of both inputs per open window,
/// joined once the watermark passes the window's end. State of a closed
/// window is dropped; rows for it that arrive later are counted as late.
pub struct WindowJoinExec {
    plan: WindowJoinPlan,
    /// Window end (µs) → (left rows, right rows).
    windows: BTreeMap<i64, (Vec<RecordBatch>, Vec<RecordBatch>)>,
    /// Every window ending at or before this has been emitted.
    closed_through: Option<i64>,
}

impl WindowJoinExec {
    /// Empty state for `plan`.
    pub fn new(plan: WindowJoinPlan) -> Self {
        Self {
            plan,
            windows: BTreeMap::new(),
            closed_through: None,
        }
    }

    /// Open windows held.
    pub fn open_windows(&self) -> usize {
        self.windows.len()
    }

    /// Memory held by the rows of open windows.
    pub fn state_size(&self) -> StateSize {
        let mut size = StateSize::default();
        for (l, r) in self.windows.values() {
            size += StateSize {
                bytes: batches_bytes(l.iter().chain(r)),
                keys: l.iter().chain(r).map(|b| b.num_rows() as u64).sum(),
            };
        }
        size
    }

    /// Window ends of a side's rows.
    fn window_ends(&self, batch: &RecordBatch, column: usize) -> Result<Vec<i64>> {
        let bound = arrow::compute::cast(batch.column(column), &DataType::Int64)?;
        let bound = bound.as_primitive::<arrow::datatypes::Int64Type>();
        let shift = if self.plan.window_is_end {
            0
        } else {
            self.plan.size_us
        };
        Ok(bound.values().iter().map(|v| v + shift).collect())
    }

    fn add(&mut self, batch: &RecordBatch, left: bool) -> Result<u64> {
        if batch.num_rows() == 0 {
            return Ok(0);
        }
        let column = if left {
            self.plan.left_window
        } else {
            self.plan.right_window
        };
        let ends = self.window_ends(batch, column)?;
        let mut distinct = ends.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let mut late = 0;
        for end in distinct {
            let mask = BooleanArray::from(ends.iter().map(|e| *e == end).collect::<Vec<_>>());
            let rows = filter_record_batch(batch, &mask)?;
            if self.closed_through.is_some_and(|c| end <= c) {
                late += rows.num_rows() as u64;
                continue;
            }
            let entry = self.windows.entry(end).or_default();
            if left {
                entry.0.push(rows);
            } else {
                entry.1.push(rows);
            }
        }
        Ok(late)
    }

    /// Joins one closed window's rows.
    fn join_window(&self, left: &[RecordBatch], right: &[RecordBatch]) -> Result<RecordBatch> {
        let schema = &self.plan.schema;
        let (Some(l0), Some(r0)) = (left.first(), right.first()) else {
            return Ok(RecordBatch::new_empty(Arc::clone(schema)));
        };
        let left = arrow::compute::concat_batches(&l0.schema(), left)?;
        let right = arrow::compute::concat_batches(&r0.schema(), right)?;
        let keys = |exprs: &[Arc<dyn PhysicalExpr>], b: &RecordBatch| {
            exprs.iter().map(|e| eval(e, b)).collect::<Result<Vec<_>>>()
        };
        let lk = keys(&self.plan.left_keys, &left)?;
        let rk = keys(&self.plan.right_keys, &right)?;
        let mut li: Vec<u32> = Vec::new();
        let mut ri: Vec<u32> = Vec::new();
        if lk.is_empty() {
            for l in 0..left.num_rows() as u32 {
                for r in 0..right.num_rows() as u32 {
                    li.push(l);
                    ri.push(r);
                }
            }
        } else {
            let (converter, index) = row_key_index(&rk, right.num_rows())?;
            let l_rows = converter.convert_columns(&lk)?;
            for row in 0..left.num_rows() {
                if lk.iter().any(|k| k.is_null(row)) {
                    continue;
                }
                if let Some(m) = index.get(l_rows.row(row).as_ref()) {
                    for &r in m {
                        li.push(row as u32);
                        ri.push(r);
                    }
                }
            }
        }
        let li = UInt32Array::from(li);
        let ri = UInt32Array::from(ri);
        let mut columns = Vec::with_capacity(schema.fields().len());
        for c in left.columns() {
            columns.push(take(c, &li, None)?);
        }
        for c in right.columns() {
            columns.push(take(c, &ri, None)?);
        }
        let joined = RecordBatch::try_new_with_options(
            Arc::clone(schema),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(li.len())),
        )?;
        match &self.plan.filter {
            Some(f) if joined.num_rows() > 0 => {
                let mask = as_mask(&eval(f, &joined)?)?;
                Ok(filter_record_batch(&joined, &mask)?)
            }
            _ => Ok(joined),
        }
    }

    /// The held rows of both inputs (as shuffled to this partition) and the
    /// closed-through bound; the state is unchanged.
    pub fn snapshot(&self) -> (Option<i64>, Vec<RecordBatch>, Vec<RecordBatch>) {
        let mut left = Vec::new();
        let mut right = Vec::new();
        for (l, r) in self.windows.values() {
            left.extend(l.iter().cloned());
            right.extend(r.iter().cloned());
        }
        (self.closed_through, left, right)
    }

    /// Adds snapshot rows (of this partition, or re-partitioned by key).
    pub fn restore(
        &mut self,
        closed_through: Option<i64>,
        left: &[RecordBatch],
        right: &[RecordBatch],
    ) -> Result<()> {
        if let Some(c) = closed_through {
            self.closed_through = Some(self.closed_through.map_or(c, |o| o.max(c)));
        }
        for b in left {
            self.add(b, true)?;
        }
        for b in right {
            self.add(b, false)?;
        }
        Ok(())
    }

    /// Adds a micro-batch's rows of both inputs and emits every window the
    /// watermark has passed, in window order.
    pub fn process(
        &mut self,
        left: &[RecordBatch],
        right: &[RecordBatch],
        watermark_us: Option<i64>,
    ) -> Result<AggregateOutput> {
        let mut late = 0;
        for b in left {
            late += self.add(b, true)?;
        }
        for b in right {
            late += self.add(b, false)?;
        }
        let mut chunks = Vec::new();
        if let Some(wm) = watermark_us {
            while let Some(entry) = self.windows.first_entry() {
                if *entry.key() > wm {
                    break;
                }
                let (end, (l, r)) = entry.remove_entry();
                let rows = self.join_window(&l, &r)?;
                chunks.push((Some(end), rows));
            }
            // Every window ending at or before the watermark is closed, with
            // rows or without.
            self.closed_through = Some(self.closed_through.map_or(wm, |c| c.max(wm)));
        }
        Ok(AggregateOutput { chunks, late })
    }
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
        }
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
            }),
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
            right: drizzle_planner::StreamInput {
                stream: drizzle_planner::StreamDef {
                    name: "r".into(),
                    columns: vec![],
                    watermark: None,
                    options: Default::default(),
                    partitions: 1,
                    created_at_ms: 0,
                },
                window: None,
                map_ops: vec![],
            },
            left_keys: vec![Arc::new(Column::new("a", 0))],
            right_keys: vec![Arc::new(Column::new("b", 0))],
            left_window: 1,
            right_window: 1,
            window_is_end: false,
            size_us: 10,
            filter: None,
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
        let mut exec = WindowJoinExec::new(plan);
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
    }
}
