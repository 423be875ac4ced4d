//! `OverAggregateExec`: aggregates over a bounded frame of each row's
//! predecessors, `agg(x) OVER (PARTITION BY k ORDER BY ts ROWS BETWEEN n
//! PRECEDING AND CURRENT ROW)` or `RANGE BETWEEN INTERVAL ... PRECEDING AND
//! CURRENT ROW`, ordered by event time.
//!
//! A row's frame is complete once every row with its time has arrived:
//! when the watermark (less the input's lag) has passed its time. Rows wait
//! until then; each micro-batch releases the complete ones, evaluates
//! DataFusion's window expressions over each key's released rows after the
//! rows its frames reach back to, emits every released row once with its
//! aggregates (append), and keeps per key only what later frames reach.

use arrow::array::ArrayRef;
use arrow::compute::concat_batches;
use arrow::row::Rows;
use drizzle_planner::OverAggregatePlan;

use super::*;

/// The keyed state of one reduce partition of an `OVER` aggregation.
pub struct OverAggregateExec {
    plan: OverAggregatePlan,
    keys: RowConverter,
    /// Rows whose frame is not complete yet (time at or after `released`).
    pending: Vec<RecordBatch>,
    /// Per key (row format): the micro-batch a row of it was last released
    /// in, and its released rows a later frame can reach, in time order.
    history: HashMap<Vec<u8>, (u64, RecordBatch)>,
    /// For `RANGE`-only frames: when each key's history runs out (its last
    /// time plus the range), so idle keys are forgotten.
    expiry: BTreeMap<i64, Vec<Vec<u8>>>,
    /// Rows with a time before this were released (µs).
    released: Option<i64>,
    pending_bytes: u64,
    history_bytes: u64,
    /// The micro-batch being processed.
    now: u64,
    /// `SET state_ttl` in micro-batches: keys idle that long lose their
    /// history (a later row's frame starts over).
    ttl: Option<u64>,
    /// Frames `UNBOUNDED PRECEDING`: per such window expression, its
    /// aggregate and whether peers (equal times, a `RANGE` frame) share a
    /// result.
    running: Vec<(Arc<AggregateFunctionExpr>, bool)>,
    /// Per window expression, its place in `running` (`None`: a bounded
    /// frame or `lag`, evaluated over the key's kept rows).
    running_of: Vec<Option<usize>>,
    /// Per key: the micro-batch a row of it was last released in, and one
    /// accumulator per running window expression (the aggregate of every
    /// row so far).
    accumulators: HashMap<Vec<u8>, (u64, Running)>,
}

/// The accumulators of a key, one per running window expression.
type Running = Vec<Box<dyn datafusion::logical_expr::Accumulator>>;

/// Name of the column checkpointed `OVER` rows carry their key's last
/// release micro-batch in (for `SET state_ttl`).
pub const STATE_RELEASED: &str = "__drizzle_released";

impl OverAggregateExec {
    /// Empty state for `plan`.
    pub fn new(plan: OverAggregatePlan) -> Result<Self> {
        let types = plan
            .partition_by
            .iter()
            .map(|e| e.data_type(&plan.input))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let keys = RowConverter::new(types.into_iter().map(SortField::new).collect())?;
        let mut running = Vec::new();
        let mut running_of = vec![None; plan.window_exprs.len()];
        if plan.retain.unbounded {
            use datafusion::logical_expr::WindowFrameBound;
            use datafusion::physical_expr::window::{
                PlainAggregateWindowExpr, SlidingAggregateWindowExpr,
            };
            for (i, w) in plan.window_exprs.iter().enumerate() {
                let frame = w.get_window_frame();
                if !matches!(&frame.start_bound, WindowFrameBound::Preceding(v) if v.is_null()) {
                    continue;
                }
                let any = w.as_any();
                let agg = if let Some(p) = any.downcast_ref::<PlainAggregateWindowExpr>() {
                    p.get_aggregate_expr()
                } else if let Some(p) = any.downcast_ref::<SlidingAggregateWindowExpr>() {
                    p.get_aggregate_expr()
                } else {
                    // Not an aggregate (lag): evaluated over kept rows.
                    continue;
                };
                let peers = frame.units == datafusion::logical_expr::WindowFrameUnits::Range;
                running_of[i] = Some(running.len());
                running.push((Arc::new(agg.clone()), peers));
            }
        }
        Ok(Self {
            running,
            running_of,
            accumulators: HashMap::new(),
            plan,
            keys,
            pending: Vec::new(),
            history: HashMap::new(),
            expiry: BTreeMap::new(),
            released: None,
            pending_bytes: 0,
            history_bytes: 0,
            now: 0,
            ttl: None,
        })
    }

    fn times<'a>(&self, batch: &'a RecordBatch) -> Result<&'a TimestampMicrosecondArray> {
        batch
            .column(self.plan.time_column)
            .as_primitive_opt::<TimestampMicrosecondType>()
            .ok_or_else(|| ExecError::invalid("the OVER order column is not a timestamp"))
    }

    /// Each row's key in row format (`None`: no `PARTITION BY`, one key).
    fn key_rows(&self, batch: &RecordBatch) -> Result<Option<Rows>> {
        if self.plan.partition_by.is_empty() {
            return Ok(None);
        }
        let cols = self
            .plan
            .partition_by
            .iter()
            .map(|e| eval(e, batch))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(self.keys.convert_columns(&cols)?))
    }

    /// The rows of `batch` by key, then time (arrival order among equal
    /// times), as runs of one key: (key bytes, row indices).
    fn runs(&self, batch: &RecordBatch) -> Result<Vec<(Vec<u8>, Vec<u32>)>> {
        let keys = self.key_rows(batch)?;
        let ts = self.times(batch)?;
        let key = |i: u32| key_of(&keys, i as usize);
        let mut order: Vec<u32> = (0..batch.num_rows() as u32).collect();
        order.sort_by(|&a, &b| {
            key(a)
                .cmp(key(b))
                .then(ts.value(a as usize).cmp(&ts.value(b as usize)))
        });
        let mut runs = Vec::new();
        let mut at = 0;
        while at < order.len() {
            let k = key(order[at]);
            let mut end = at + 1;
            while end < order.len() && key(order[end]) == k {
                end += 1;
            }
            runs.push((k.to_vec(), order[at..end].to_vec()));
            at = end;
        }
        Ok(runs)
    }

    /// Holds a micro-batch's rows; returns how many were late (a time
    /// already released, or none).
    fn add(&mut self, batch: &RecordBatch) -> Result<u64> {
        if batch.num_rows() == 0 {
            return Ok(0);
        }
        let ts = self.times(batch)?;
        let keep: Vec<bool> = (0..batch.num_rows())
            .map(|i| ts.is_valid(i) && self.released.is_none_or(|r| ts.value(i) >= r))
            .collect();
        let kept = keep.iter().filter(|k| **k).count();
        let late = (batch.num_rows() - kept) as u64;
        let rows = if kept == batch.num_rows() {
            batch.clone()
        } else {
            filter_record_batch(batch, &BooleanArray::from(keep))?
        };
        if rows.num_rows() > 0 {
            self.pending_bytes += rows.get_array_memory_size() as u64;
            self.pending.push(rows);
        }
        Ok(late)
    }

    /// Releases the rows with a time before `bound`: each with its
    /// aggregates, by key and time.
    fn release(&mut self, bound: i64) -> Result<Option<RecordBatch>> {
        if self.released.is_some_and(|r| bound <= r) {
            return Ok(None);
        }
        self.released = Some(bound);
        let pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let mut due_parts = Vec::new();
        for batch in pending {
            let ts = self.times(&batch)?;
            let due: Vec<bool> = (0..batch.num_rows()).map(|i| ts.value(i) < bound).collect();
            let n = due.iter().filter(|d| **d).count();
            if n == 0 {
                self.pending_bytes += batch.get_array_memory_size() as u64;
                self.pending.push(batch);
                continue;
            }
            if n == batch.num_rows() {
                due_parts.push(batch);
                continue;
            }
            let later = filter_record_batch(
                &batch,
                &arrow::compute::not(&BooleanArray::from(due.clone()))?,
            )?;
            self.pending_bytes += later.get_array_memory_size() as u64;
            self.pending.push(later);
            due_parts.push(filter_record_batch(&batch, &BooleanArray::from(due))?);
        }
        let out = if due_parts.is_empty() {
            None
        } else {
            let due = concat_batches(&self.plan.input, &due_parts)?;
            Some(self.evaluate(&due, bound)?)
        };
        self.expire(bound);
        Ok(out)
    }

    /// Runs the window expressions over `due` (complete rows, any order),
    /// each key after its history, and keeps what later frames reach. A
    /// frame unbounded in the past is its key's accumulator, fed the rows
    /// in time order; the others are evaluated over the key's kept rows.
    fn evaluate(&mut self, due: &RecordBatch, bound: i64) -> Result<RecordBatch> {
        let bounded = self.running_of.iter().any(Option::is_none);
        let mut outputs = Vec::new();
        for (key, rows) in self.runs(due)? {
            let fresh = take_record_batch(due, &UInt32Array::from(rows))?;
            let (all, skip) = if bounded {
                let held = self.history.remove(key.as_slice()).map(|(_, h)| h);
                if let Some(h) = &held {
                    self.history_bytes = self
                        .history_bytes
                        .saturating_sub(h.get_array_memory_size() as u64);
                }
                let all = match held {
                    Some(h) => concat_batches(&self.plan.input, &[h, fresh.clone()])?,
                    None => fresh.clone(),
                };
                let skip = all.num_rows() - fresh.num_rows();
                (all, skip)
            } else {
                (fresh.clone(), 0)
            };
            let mut running = if self.running.is_empty() {
                Vec::new()
            } else {
                self.running_values(&key, &fresh)?
            }
            .into_iter();
            let mut columns: Vec<ArrayRef> = fresh.columns().to_vec();
            for (expr, at) in self.plan.window_exprs.iter().zip(&self.running_of) {
                columns.push(match at {
                    Some(_) => running.next().ok_or_else(|| {
                        ExecError::invalid("a running OVER expression has no values")
                    })?,
                    None => expr.evaluate(&all)?.slice(skip, fresh.num_rows()),
                });
            }
            outputs.push(RecordBatch::try_new(
                Arc::clone(&self.plan.schema),
                columns,
            )?);
            if bounded {
                self.keep(key, &all, bound)?;
            }
        }
        Ok(concat_batches(&self.plan.schema, &outputs)?)
    }

    /// Frames `UNBOUNDED PRECEDING`: a key's released rows (`fresh`, in
    /// time order) go into its accumulators; a row's result is their value
    /// after it (after its last peer for a `RANGE` frame). One array per
    /// running expression.
    fn running_values(&mut self, key: &[u8], fresh: &RecordBatch) -> Result<Vec<ArrayRef>> {
        let n = fresh.num_rows();
        let ts = self.times(fresh)?.values().clone();
        let now = self.now;
        if !self.accumulators.contains_key(key) {
            let accs = self
                .running
                .iter()
                .map(|(a, _)| a.create_accumulator())
                .collect::<std::result::Result<Running, _>>()?;
            self.accumulators.insert(key.to_vec(), (now, accs));
        }
        let entry = self
            .accumulators
            .get_mut(key)
            .ok_or_else(|| ExecError::invalid("a running OVER key has no accumulators"))?;
        entry.0 = now;
        let width = self.plan.input.fields().len();
        let mut out = Vec::with_capacity(self.running.len());
        for (i, ((agg, peers), acc)) in self.running.iter().zip(entry.1.iter_mut()).enumerate() {
            let args = agg
                .expressions()
                .iter()
                .map(|e| eval(e, fresh))
                .collect::<Result<Vec<_>>>()?;
            let mut values = Vec::with_capacity(n);
            let mut at = 0;
            while at < n {
                let mut end = at + 1;
                if *peers {
                    while end < n && ts[end] == ts[at] {
                        end += 1;
                    }
                }
                let slice: Vec<ArrayRef> = args.iter().map(|a| a.slice(at, end - at)).collect();
                acc.update_batch(&slice)?;
                let v = acc.evaluate()?;
                values.extend(std::iter::repeat_n(v, end - at));
                at = end;
            }
            let column = self
                .running_of
                .iter()
                .position(|r| *r == Some(i))
                .ok_or_else(|| ExecError::invalid("a running OVER aggregate has no column"))?;
            let field = self.plan.schema.field(width + column);
            let array = datafusion::common::ScalarValue::iter_to_array(values)?;
            out.push(if array.data_type() == field.data_type() {
                array
            } else {
                arrow::compute::cast(&array, field.data_type())?
            });
        }
        Ok(out)
    }

    /// The running state as rows: each key (row format), the micro-batch
    /// it was last released in, then each accumulator's state fields.
    /// The accumulators are rebuilt from it (an accumulator may give its
    /// state away).
    fn running_state(&mut self) -> Result<Option<RecordBatch>> {
        if self.accumulators.is_empty() {
            return Ok(None);
        }
        let mut fields = vec![
            arrow::datatypes::Field::new("__drizzle_key", DataType::Binary, false),
            arrow::datatypes::Field::new(STATE_RELEASED, DataType::Int64, false),
        ];
        for (agg, _) in &self.running {
            for f in agg.state_fields()? {
                fields.push(f.as_ref().clone().with_nullable(true));
            }
        }
        let entries: Vec<_> = self.accumulators.drain().collect();
        let mut states: Vec<Vec<datafusion::common::ScalarValue>> =
            vec![Vec::with_capacity(entries.len()); fields.len() - 2];
        let mut keys = Vec::with_capacity(entries.len());
        let mut seen = Vec::with_capacity(entries.len());
        for (key, (s, mut accs)) in entries {
            let mut c = 0;
            for acc in accs.iter_mut() {
                for v in acc.state()? {
                    states[c].push(v);
                    c += 1;
                }
            }
            keys.push(key);
            seen.push(s as i64);
        }
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(arrow::array::BinaryArray::from_iter_values(keys.iter())),
            Arc::new(Int64Array::from(seen)),
        ];
        for (values, field) in states.into_iter().zip(fields.iter().skip(2)) {
            let array = datafusion::common::ScalarValue::iter_to_array(values)?;
            columns.push(if array.data_type() == field.data_type() {
                array
            } else {
                arrow::compute::cast(&array, field.data_type())?
            });
        }
        let batch = RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), columns)?;
        self.restore_running(&batch)?;
        Ok(Some(batch))
    }

    /// Accumulators back from [`Self::running_state`]'s rows.
    fn restore_running(&mut self, state: &RecordBatch) -> Result<()> {
        let bad = || ExecError::invalid("checkpointed running OVER state does not match the query");
        let keys = state.column(0).as_binary_opt::<i32>().ok_or_else(bad)?;
        let seen = state
            .column(1)
            .as_primitive_opt::<arrow::datatypes::Int64Type>()
            .ok_or_else(bad)?;
        let widths = self
            .running
            .iter()
            .map(|(a, _)| Ok(a.state_fields()?.len()))
            .collect::<Result<Vec<_>>>()?;
        if state.num_columns() != 2 + widths.iter().sum::<usize>() {
            return Err(bad());
        }
        for row in 0..state.num_rows() {
            let mut accs: Running = Vec::with_capacity(self.running.len());
            let mut c = 2;
            for ((agg, _), w) in self.running.iter().zip(&widths) {
                let mut acc = agg.create_accumulator()?;
                let cols: Vec<ArrayRef> = state.columns()[c..c + w]
                    .iter()
                    .map(|a| a.slice(row, 1))
                    .collect();
                acc.merge_batch(&cols)?;
                accs.push(acc);
                c += w;
            }
            self.accumulators.insert(
                keys.value(row).to_vec(),
                (seen.value(row).max(0) as u64, accs),
            );
        }
        Ok(())
    }

    /// Keeps the rows of `key` (`all`, in time order) that a frame of a row
    /// at or after `bound` reaches.
    fn keep(&mut self, key: Vec<u8>, all: &RecordBatch, bound: i64) -> Result<()> {
        let n = all.num_rows();
        let retain = self.plan.retain;
        let by_rows = n.saturating_sub(usize::try_from(retain.rows).unwrap_or(usize::MAX));
        let ts = self.times(all)?;
        let from = bound.saturating_sub(retain.range_us);
        let by_range = (0..n).find(|&i| ts.value(i) >= from).unwrap_or(n);
        let first = by_rows.min(by_range);
        if first >= n {
            return Ok(());
        }
        if retain.rows == 0 {
            let last = ts.value(n - 1).saturating_add(retain.range_us);
            self.expiry.entry(last).or_default().push(key.clone());
        }
        // A copy, so the kept rows do not pin the whole batch.
        let kept = take_record_batch(
            all,
            &UInt32Array::from((first as u32..n as u32).collect::<Vec<_>>()),
        )?;
        self.history_bytes += kept.get_array_memory_size() as u64;
        self.history.insert(key, (self.now, kept));
        Ok(())
    }

    /// Forgets the keys whose history no frame at or after `bound` reaches
    /// (`RANGE` frames only; `ROWS` frames keep a key's last rows).
    fn expire(&mut self, bound: i64) {
        while let Some(entry) = self.expiry.first_entry() {
            if *entry.key() >= bound {
                break;
            }
            for key in entry.remove() {
                let stale = self.history.get(key.as_slice()).is_some_and(|(_, h)| {
                    self.times(h).is_ok_and(|ts| {
                        !ts.is_empty()
                            && ts
                                .value(ts.len() - 1)
                                .saturating_add(self.plan.retain.range_us)
                                < bound
                    })
                });
                if stale {
                    if let Some((_, h)) = self.history.remove(key.as_slice()) {
                        self.history_bytes = self
                            .history_bytes
                            .saturating_sub(h.get_array_memory_size() as u64);
                    }
                }
            }
        }
    }
}

impl StatefulOperator for OverAggregateExec {
    fn name(&self) -> &'static str {
        "OverAggregateExec"
    }

    fn process(
        &mut self,
        batch: u64,
        inputs: &[Vec<RecordBatch>],
        watermark_us: Option<i64>,
    ) -> Result<OperatorOutput> {
        let rows = one_input("OverAggregateExec", inputs)?;
        self.now = batch;
        if let Some(ttl) = self.ttl.filter(|&t| ttl_check(batch, t)) {
            // Keys no row reached for longer than the TTL forget their
            // history.
            let before = batch.saturating_sub(ttl);
            let mut freed = 0u64;
            self.history.retain(|_, (seen, h)| {
                let keep = *seen >= before;
                if !keep {
                    freed += h.get_array_memory_size() as u64;
                }
                keep
            });
            self.history_bytes = self.history_bytes.saturating_sub(freed);
            self.accumulators.retain(|_, (seen, _)| *seen >= before);
        }
        let mut late = 0;
        for batch in rows {
            late += self.add(batch)?;
        }
        let mut chunks = Vec::new();
        if let Some(wm) = watermark_us {
            if let Some(out) = self.release(wm.saturating_sub(self.plan.time_lag_us))? {
                if out.num_rows() > 0 {
                    chunks.push((None, out));
                }
            }
        }
        Ok(OperatorOutput { chunks, late })
    }

    fn state_size(&self) -> StateSize {
        let rows = self.pending.iter().map(|b| b.num_rows()).sum::<usize>()
            + self
                .history
                .values()
                .map(|(_, b)| b.num_rows())
                .sum::<usize>();
        let running: usize = self
            .accumulators
            .iter()
            .map(|(k, (_, accs))| k.len() + 64 + accs.iter().map(|a| a.size()).sum::<usize>())
            .sum();
        StateSize {
            bytes: self.pending_bytes
                + self.history_bytes
                + self.history.len() as u64 * 64
                + running as u64,
            keys: (rows + self.accumulators.len()) as u64,
        }
    }

    /// Always in full, one section of input rows: the held history (times
    /// before the release bound) and the pending rows (at or after it),
    /// each with its key's last release batch as a last column (0 for
    /// pending rows).
    fn snapshot(&mut self, _delta_base: Option<u64>) -> Result<OperatorSnapshot> {
        let mut fields: Vec<arrow::datatypes::FieldRef> =
            self.plan.input.fields().iter().cloned().collect();
        fields.push(Arc::new(arrow::datatypes::Field::new(
            STATE_RELEASED,
            DataType::Int64,
            false,
        )));
        let schema = Arc::new(arrow::datatypes::Schema::new(fields));
        let stamped = |b: &RecordBatch, seen: u64| -> Result<RecordBatch> {
            let mut columns = b.columns().to_vec();
            columns.push(Arc::new(Int64Array::from(vec![seen as i64; b.num_rows()])));
            Ok(RecordBatch::try_new(Arc::clone(&schema), columns)?)
        };
        let mut rows = Vec::with_capacity(self.history.len() + self.pending.len());
        for (seen, b) in self.history.values() {
            rows.push(stamped(b, *seen)?);
        }
        for b in &self.pending {
            rows.push(stamped(b, 0)?);
        }
        let mut sections = vec![rows];
        if !self.running.is_empty() {
            // A second section: each key's accumulators.
            sections.push(self.running_state()?.into_iter().collect());
        }
        Ok(OperatorSnapshot {
            closed_through: self.released,
            delta_base: None,
            sections,
        })
    }

    fn set_state_ttl(&mut self, batches: u64) {
        self.ttl = Some(batches.max(1));
    }

    fn restore(&mut self, layers: Vec<OperatorSnapshot>, batch: u64) -> Result<()> {
        let released = layers.iter().filter_map(|l| l.closed_through).max();
        let width = self.plan.input.fields().len();
        let mut held = Vec::new();
        let mut seen: Vec<i64> = Vec::new();
        for layer in layers {
            for (i, section) in layer.sections.into_iter().enumerate() {
                if i == 1 {
                    for state in &section {
                        self.restore_running(state)?;
                    }
                    continue;
                }
                for rows in section {
                    if rows.num_rows() == 0 {
                        continue;
                    }
                    if !(width..=width + 1).contains(&rows.num_columns()) {
                        return Err(ExecError::invalid(
                            "checkpointed OVER state does not match the query",
                        ));
                    }
                    match rows
                        .columns()
                        .get(width)
                        .and_then(|c| c.as_primitive_opt::<arrow::datatypes::Int64Type>())
                    {
                        Some(s) => seen.extend(s.values().iter().copied()),
                        None => seen.extend(std::iter::repeat_n(batch as i64, rows.num_rows())),
                    }
                    held.push(RecordBatch::try_new(
                        Arc::clone(&self.plan.input),
                        rows.columns()[..width].to_vec(),
                    )?);
                }
            }
        }
        let all = concat_batches(&self.plan.input, &held)?;
        let Some(bound) = released else {
            self.add(&all)?;
            return Ok(());
        };
        let ts = self.times(&all)?;
        let before: Vec<bool> = (0..all.num_rows()).map(|i| ts.value(i) < bound).collect();
        let history_seen: Vec<i64> = seen
            .iter()
            .zip(&before)
            .filter(|(_, b)| **b)
            .map(|(s, _)| *s)
            .collect();
        let history = filter_record_batch(&all, &BooleanArray::from(before.clone()))?;
        let pending =
            filter_record_batch(&all, &arrow::compute::not(&BooleanArray::from(before))?)?;
        // History back per key, in time order, with its last release batch.
        for (key, rows) in self.runs(&history)? {
            self.now = rows
                .iter()
                .map(|&r| history_seen.get(r as usize).copied().unwrap_or(0))
                .max()
                .unwrap_or(0)
                .max(0) as u64;
            let rows = take_record_batch(&history, &UInt32Array::from(rows))?;
            self.keep(key, &rows, bound)?;
        }
        self.now = batch;
        self.released = Some(bound);
        self.add(&pending)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{Field, Schema, TimeUnit};
    use datafusion::common::ScalarValue;
    use datafusion::logical_expr::{
        WindowFrame, WindowFrameBound, WindowFrameUnits, WindowFunctionDefinition,
    };
    use datafusion::physical_expr::expressions::Column;
    use datafusion::physical_expr::PhysicalSortExpr;

    const RANGE: i64 = 10;
    const ROWS: u64 = 2;

    /// `count(*)` over the last RANGE µs and `sum(v)` over the last ROWS
    /// rows and the current one, per key `k`, ordered by `ts`.
    fn plan() -> OverAggregatePlan {
        let input = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("v", DataType::Int64, true),
            Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, None), true),
        ]));
        let k: Arc<dyn PhysicalExpr> = Arc::new(Column::new("k", 0));
        let v: Arc<dyn PhysicalExpr> = Arc::new(Column::new("v", 1));
        let order = vec![PhysicalSortExpr::new_default(Arc::new(Column::new(
            "ts", 2,
        )))];
        let frame = |units, start| {
            Arc::new(WindowFrame::new_bounds(
                units,
                WindowFrameBound::Preceding(start),
                WindowFrameBound::CurrentRow,
            ))
        };
        let expr = |fun, arg: &Arc<dyn PhysicalExpr>, f| {
            datafusion::physical_plan::windows::create_window_expr(
                &WindowFunctionDefinition::AggregateUDF(fun),
                "w".into(),
                std::slice::from_ref(arg),
                std::slice::from_ref(&k),
                &order,
                f,
                Arc::clone(&input),
                false,
                false,
                None,
            )
            .unwrap()
        };
        let window_exprs = vec![
            expr(
                datafusion::functions_aggregate::count::count_udaf(),
                &v,
                frame(
                    WindowFrameUnits::Range,
                    ScalarValue::IntervalMonthDayNano(Some(
                        arrow::datatypes::IntervalMonthDayNano::new(0, 0, RANGE * 1000),
                    )),
                ),
            ),
            expr(
                datafusion::functions_aggregate::sum::sum_udaf(),
                &v,
                frame(WindowFrameUnits::Rows, ScalarValue::UInt64(Some(ROWS))),
            ),
        ];
        let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new("n", DataType::Int64, false));
        fields.push(Field::new("s", DataType::Int64, true));
        OverAggregatePlan {
            window_exprs,
            partition_by: vec![k],
            time_column: 2,
            time_lag_us: 0,
            retain: drizzle_planner::OverRetain {
                rows: ROWS,
                range_us: RANGE,
                unbounded: false,
            },
            input,
            schema: Arc::new(Schema::new(fields)),
            display: String::new(),
            changes: false,
        }
    }

    /// Rows (k, v, ts) in the plan's input schema.
    fn input(p: &OverAggregatePlan, rows: &[(i64, i64, i64)]) -> RecordBatch {
        RecordBatch::try_new(
            Arc::clone(&p.input),
            vec![
                Arc::new(Int64Array::from(
                    rows.iter().map(|r| r.0).collect::<Vec<_>>(),
                )),
                Arc::new(Int64Array::from(
                    rows.iter().map(|r| r.1).collect::<Vec<_>>(),
                )),
                Arc::new(TimestampMicrosecondArray::from(
                    rows.iter().map(|r| r.2).collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap()
    }

    /// `SET state_ttl`: a key no row reached for longer than the TTL loses
    /// its history (a later row's ROWS frame starts over), whether or not a
    /// checkpoint came between.
    #[test]
    fn keys_idle_longer_than_the_ttl_forget_their_history() {
        let p = plan();
        let batch = |rows: &[(i64, i64, i64)]| input(&p, rows);
        let sums = |out: &OperatorOutput| {
            let mut v = Vec::new();
            for (_, b) in &out.chunks {
                let k = b.column(0).as_primitive::<arrow::datatypes::Int64Type>();
                let s = b.column(4).as_primitive::<arrow::datatypes::Int64Type>();
                v.extend((0..b.num_rows()).map(|i| (k.value(i), s.value(i))));
            }
            v.sort_unstable();
            v
        };
        for restore in [false, true] {
            let mut exec = OverAggregateExec::new(p.clone()).unwrap();
            exec.set_state_ttl(4);
            exec.process(0, &[vec![batch(&[(1, 5, 10), (2, 7, 11)])]], Some(20))
                .unwrap();
            let out = exec
                .process(3, &[vec![batch(&[(2, 1, 30)])]], Some(40))
                .unwrap();
            assert_eq!(sums(&out), vec![(2, 8)]);
            if restore {
                let snap = exec.snapshot(None).unwrap();
                exec = OverAggregateExec::new(p.clone()).unwrap();
                exec.set_state_ttl(4);
                exec.restore(vec![snap], 3).unwrap();
            }
            // Batch 6: key 1 (last released at 0) is forgotten, key 2 (3) not.
            let out = exec
                .process(6, &[vec![batch(&[(1, 2, 50), (2, 3, 51)])]], Some(60))
                .unwrap();
            assert_eq!(sums(&out), vec![(1, 2), (2, 11)], "restored: {restore}");
        }
    }

    /// Against a model over all rows: every row exactly once, after the
    /// watermark passed it, with its frames' count and sum; rows arrive out
    /// of order within the watermark delay, with a checkpoint half way.
    #[test]
    fn every_row_once_with_its_frames_against_a_model() {
        let p = plan();
        let mut exec = OverAggregateExec::new(p.clone()).unwrap();
        let mut seed = 11u64;
        let mut next = move |m: i64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) % m as u64) as i64
        };
        let delay = 6;
        let mut clock = 100i64;
        let mut all: Vec<(i64, i64, i64)> = Vec::new();
        let mut got: Vec<(i64, i64, i64, i64, Option<i64>)> = Vec::new();
        let mut used = std::collections::HashSet::new();
        for batch in 0..150u64 {
            let wm_before = clock - delay;
            let mut rows = Vec::new();
            for _ in 0..next(5) {
                clock += next(4);
                // Unique times (ROWS frames order equal times arbitrarily).
                let mut t = (clock - next(delay + 1)).max(wm_before);
                while !used.insert(t) {
                    t += 1;
                }
                clock = clock.max(t);
                rows.push((next(3), next(100), t));
            }
            all.extend(&rows);
            let batch_in = input(&p, &rows);
            let wm = clock - delay;
            let out = exec.process(batch, &[vec![batch_in]], Some(wm)).unwrap();
            for (_, b) in &out.chunks {
                let k = b.column(0).as_primitive::<arrow::datatypes::Int64Type>();
                let v = b.column(1).as_primitive::<arrow::datatypes::Int64Type>();
                let t = b.column(2).as_primitive::<TimestampMicrosecondType>();
                let n = b.column(3).as_primitive::<arrow::datatypes::Int64Type>();
                let s = b.column(4).as_primitive::<arrow::datatypes::Int64Type>();
                for i in 0..b.num_rows() {
                    assert!(
                        t.value(i) < wm,
                        "a row released before the watermark passed it"
                    );
                    got.push((
                        k.value(i),
                        t.value(i),
                        v.value(i),
                        n.value(i),
                        s.is_valid(i).then(|| s.value(i)),
                    ));
                }
            }
            if batch == 70 {
                let snap = exec.snapshot(None).unwrap();
                exec = OverAggregateExec::new(p.clone()).unwrap();
                exec.restore(vec![snap], batch).unwrap();
            }
        }
        let out = exec.process(150, &[vec![]], Some(i64::MAX / 4)).unwrap();
        for (_, b) in &out.chunks {
            got.extend((0..b.num_rows()).map(|i| {
                (
                    b.column(0)
                        .as_primitive::<arrow::datatypes::Int64Type>()
                        .value(i),
                    b.column(2)
                        .as_primitive::<TimestampMicrosecondType>()
                        .value(i),
                    b.column(1)
                        .as_primitive::<arrow::datatypes::Int64Type>()
                        .value(i),
                    b.column(3)
                        .as_primitive::<arrow::datatypes::Int64Type>()
                        .value(i),
                    Some(
                        b.column(4)
                            .as_primitive::<arrow::datatypes::Int64Type>()
                            .value(i),
                    ),
                )
            }));
        }
        let mut want = Vec::new();
        for &(k, v, t) in &all {
            let mut mine: Vec<(i64, i64)> = all
                .iter()
                .filter(|r| r.0 == k && r.2 <= t)
                .map(|r| (r.2, r.1))
                .collect();
            mine.sort_unstable();
            let n = mine.iter().filter(|r| r.0 >= t - RANGE).count() as i64;
            let s: i64 = mine.iter().rev().take(ROWS as usize + 1).map(|r| r.1).sum();
            want.push((k, t, v, n, Some(s)));
        }
        got.sort_unstable();
        want.sort_unstable();
        assert!(want.len() > 200, "the model has rows to compare");
        assert_eq!(got, want);
        assert!(
            exec.state_size().keys <= 3 * (ROWS + 1) + 20,
            "state is bounded"
        );
    }

    /// `fun(arg)` per key `k`, ordered by `ts`, over a frame unbounded in
    /// the past.
    fn running(
        p: &OverAggregatePlan,
        fun: Arc<datafusion::logical_expr::AggregateUDF>,
        units: WindowFrameUnits,
        arg: &Arc<dyn PhysicalExpr>,
    ) -> Arc<dyn datafusion::physical_expr::window::WindowExpr> {
        let k: Arc<dyn PhysicalExpr> = Arc::new(Column::new("k", 0));
        let order = vec![PhysicalSortExpr::new_default(Arc::new(Column::new(
            "ts", 2,
        )))];
        datafusion::physical_plan::windows::create_window_expr(
            &WindowFunctionDefinition::AggregateUDF(fun),
            "w".into(),
            std::slice::from_ref(arg),
            std::slice::from_ref(&k),
            &order,
            Arc::new(WindowFrame::new_bounds(
                units,
                WindowFrameBound::Preceding(ScalarValue::UInt64(None)),
                WindowFrameBound::CurrentRow,
            )),
            Arc::clone(&p.input),
            false,
            false,
            None,
        )
        .unwrap()
    }

    /// A running `sum(v)` (ROWS UNBOUNDED PRECEDING) next to the bounded
    /// frames of [`plan`]: every row once with all three, against a model
    /// over all rows, through a checkpoint; the bounded frames keep their
    /// rows, the running one its accumulator.
    #[test]
    fn running_and_bounded_frames_in_one_query_against_a_model() {
        let mut p = plan();
        let v: Arc<dyn PhysicalExpr> = Arc::new(Column::new("v", 1));
        let total = running(
            &p,
            datafusion::functions_aggregate::sum::sum_udaf(),
            WindowFrameUnits::Rows,
            &v,
        );
        p.window_exprs.push(total);
        let mut fields: Vec<Field> = p
            .schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new("total", DataType::Int64, true));
        p.schema = Arc::new(Schema::new(fields));
        p.retain.unbounded = true;
        let mut exec = OverAggregateExec::new(p.clone()).unwrap();
        let mut all: Vec<(i64, i64, i64)> = Vec::new();
        let mut got: Vec<(i64, i64, i64, i64, i64)> = Vec::new();
        let mut collect = |out: &OperatorOutput| {
            for (_, b) in &out.chunks {
                let int = |i: usize| b.column(i).as_primitive::<arrow::datatypes::Int64Type>();
                let t = b.column(2).as_primitive::<TimestampMicrosecondType>();
                for i in 0..b.num_rows() {
                    got.push((
                        int(0).value(i),
                        t.value(i),
                        int(3).value(i),
                        int(4).value(i),
                        int(5).value(i),
                    ));
                }
            }
        };
        for b in 0..40i64 {
            let rows: Vec<(i64, i64, i64)> = (b * 4..b * 4 + 4)
                .map(|t| ((t * 7) % 3, (t * 13) % 17, t))
                .collect();
            all.extend(&rows);
            let out = exec
                .process(b as u64, &[vec![input(&p, &rows)]], Some(b * 4))
                .unwrap();
            collect(&out);
            if b == 20 {
                let snap = exec.snapshot(None).unwrap();
                exec = OverAggregateExec::new(p.clone()).unwrap();
                exec.restore(vec![snap], b as u64).unwrap();
            }
        }
        collect(&exec.process(40, &[vec![]], Some(i64::MAX / 4)).unwrap());
        let mut want = Vec::new();
        for &(key, _, t) in &all {
            let mine: Vec<(i64, i64)> = all
                .iter()
                .filter(|r| r.0 == key && r.2 <= t)
                .map(|r| (r.2, r.1))
                .collect();
            let n = mine.iter().filter(|r| r.0 >= t - RANGE).count() as i64;
            let s: i64 = mine.iter().rev().take(ROWS as usize + 1).map(|r| r.1).sum();
            let total: i64 = mine.iter().map(|r| r.1).sum();
            want.push((key, t, n, s, total));
        }
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want);
        assert!(
            exec.history.len() <= 3 && exec.accumulators.len() == 3,
            "the bounded frames' rows and the running sums, per key"
        );
    }

    /// Frames unbounded in the past: `sum(v)` (ROWS) and `avg(v)` (RANGE,
    /// peers share) per key, against a model over all rows; state is one
    /// accumulator per key, and a checkpoint restored midway changes
    /// nothing.
    #[test]
    fn running_aggregates_against_a_model_through_a_checkpoint() {
        let mut p = plan();
        let v: Arc<dyn PhysicalExpr> = Arc::new(Column::new("v", 1));
        let as_float = datafusion::physical_expr::expressions::cast(
            Arc::clone(&v),
            &p.input,
            DataType::Float64,
        )
        .unwrap();
        let expr = |fun, units, arg: &Arc<dyn PhysicalExpr>| running(&p, fun, units, arg);
        p.window_exprs = vec![
            expr(
                datafusion::functions_aggregate::sum::sum_udaf(),
                WindowFrameUnits::Rows,
                &v,
            ),
            expr(
                datafusion::functions_aggregate::average::avg_udaf(),
                WindowFrameUnits::Range,
                &as_float,
            ),
        ];
        let mut fields: Vec<Field> = p
            .input
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new("s", DataType::Int64, true));
        fields.push(Field::new("a", DataType::Float64, true));
        p.schema = Arc::new(Schema::new(fields));
        p.retain = drizzle_planner::OverRetain {
            rows: 0,
            range_us: 0,
            unbounded: true,
        };
        // Each micro-batch: times t..t+3 for keys 0..3 (key 0 twice at
        // each time: peers), released one micro-batch later.
        let mut exec = OverAggregateExec::new(p.clone()).unwrap();
        let mut model: std::collections::HashMap<i64, Vec<(i64, i64)>> = Default::default();
        let mut got: Vec<(i64, i64, i64, f64)> = Vec::new();
        let mut expected: Vec<(i64, i64, i64, f64)> = Vec::new();
        for b in 0..40i64 {
            let mut rows = Vec::new();
            for t in b * 4..b * 4 + 4 {
                for key in 0..3 {
                    rows.push((key, (t * 7 + key) % 11, t));
                }
                rows.push((0, t % 5, t));
            }
            let out = exec
                .process(b as u64, &[vec![input(&p, &rows)]], Some(b * 4))
                .unwrap();
            for (_, o) in &out.chunks {
                let int = |i: usize| o.column(i).as_primitive::<arrow::datatypes::Int64Type>();
                let ts = o.column(2).as_primitive::<TimestampMicrosecondType>();
                let a = o.column(4).as_primitive::<arrow::datatypes::Float64Type>();
                for i in 0..o.num_rows() {
                    // ROWS sums of peers depend on their order: keep the
                    // largest per (key, time), which is the same either way.
                    got.push((int(0).value(i), ts.value(i), int(3).value(i), a.value(i)));
                }
            }
            for r in &rows {
                model.entry(r.0).or_default().push((r.2, r.1));
            }
            if b == 20 {
                let snap = exec.snapshot(None).unwrap();
                exec = OverAggregateExec::new(p.clone()).unwrap();
                exec.restore(vec![snap], b as u64).unwrap();
            }
            assert_eq!(exec.history.len(), 0, "no row is kept");
        }
        let released = 39 * 4;
        for (key, rows) in &model {
            let mut sum = 0;
            for (i, (t, v)) in rows.iter().enumerate() {
                if *t >= released {
                    break;
                }
                sum += v;
                let peers: Vec<i64> = rows.iter().filter(|r| r.0 <= *t).map(|r| r.1).collect();
                let avg = peers.iter().sum::<i64>() as f64 / peers.len() as f64;
                let last_peer = rows.get(i + 1).is_none_or(|n| n.0 != *t);
                if last_peer {
                    expected.push((*key, *t, sum, avg));
                }
            }
        }
        // Per (key, time): the largest ROWS sum (the last peer's) and the
        // RANGE average all peers share.
        let mut best: BTreeMap<(i64, i64), (i64, f64)> = Default::default();
        for (key, t, s, a) in got {
            let e = best.entry((key, t)).or_insert((s, a));
            assert!((e.1 - a).abs() < 1e-9, "peers share a RANGE result");
            e.0 = e.0.max(s);
        }
        expected.sort_by_key(|x| (x.0, x.1));
        let got: Vec<(i64, i64, i64, f64)> = best
            .into_iter()
            .map(|((k, t), (s, a))| (k, t, s, a))
            .collect();
        assert_eq!(got.len(), expected.len());
        for (g, e) in got.iter().zip(&expected) {
            assert_eq!((g.0, g.1, g.2), (e.0, e.1, e.2));
            assert!((g.3 - e.3).abs() < 1e-9, "{g:?} vs {e:?}");
        }
        assert_eq!(
            exec.state_size().keys,
            3 + 16,
            "3 keys' accumulators and the last micro-batch's 16 rows, not released yet"
        );
    }
}
