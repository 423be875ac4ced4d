//! `OverChangesExec`: an `OVER` aggregation whose input changes (a top-N's
//! or a non-windowed aggregation's rows, each with a weight), as Nexmark q6
//! runs `avg(final) OVER (PARTITION BY seller ORDER BY date_time ROWS
//! BETWEEN 10 PRECEDING AND CURRENT ROW)` over each auction's winning bid,
//! which changes while the auction is open.
//!
//! Rows come and go anywhere in a partition's order, so nothing waits for
//! a watermark: the state is every row of every partition, in order. A
//! change to a partition can only alter the results of the rows whose
//! frames reach it: the changed rows themselves and, for `ROWS BETWEEN n
//! PRECEDING AND CURRENT ROW`, the n rows after the last of them (rows
//! further on see the same n predecessors as before). Each micro-batch
//! evaluates DataFusion's window expressions over that stretch of each
//! changed partition (after the n rows its first frame reaches back to)
//! before and after applying the changes, and emits the difference: the
//! results that went away as `delete`s, the new ones as `insert`s, results
//! that stayed the same not at all.

use std::ops::Bound;

use arrow::array::StringArray;
use arrow::compute::concat_batches;
use arrow::datatypes::{Field, Schema};
use arrow::row::Rows;
use drizzle_planner::OverAggregatePlan;

use super::*;

/// Net weights by partition (row format), then by held key.
type Changes = BTreeMap<Vec<u8>, BTreeMap<Vec<u8>, i64>>;

/// Name of the column checkpointed rows carry their multiplicity in.
const STATE_COUNT: &str = "__drizzle_count";

/// The state of one reduce partition of an `OVER` over changes.
pub struct OverChangesExec {
    plan: OverAggregatePlan,
    /// The `PARTITION BY` values in row format (a constant without one).
    part: RowConverter,
    /// The `ORDER BY` value, then every input column: a row's place in its
    /// partition, equal rows together.
    rest: RowConverter,
    /// The results (input columns and aggregates), to tell which changed.
    results: RowConverter,
    /// Every row: its partition's bytes, then its `rest` bytes → how many
    /// such rows there are, and how many of the bytes are the partition's.
    rows: BTreeMap<Vec<u8>, (u64, u32)>,
    /// How many rows a frame reaches back (the largest `n PRECEDING`).
    reach: u64,
    /// Rows held, counted with their multiplicity, and their bytes.
    held: u64,
    bytes: u64,
    /// The output: the plan's columns, then `op`.
    schema: SchemaRef,
}

impl OverChangesExec {
    /// Empty state for `plan` (which has `changes` set).
    pub fn new(plan: OverAggregatePlan) -> Result<Self> {
        let mut part_types = plan
            .partition_by
            .iter()
            .map(|e| e.data_type(&plan.input))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if part_types.is_empty() {
            part_types.push(DataType::Boolean);
        }
        let part = RowConverter::new(part_types.into_iter().map(SortField::new).collect())?;
        // The window expressions' own order: ascending, and their nulls.
        let order = plan
            .window_exprs
            .first()
            .and_then(|w| w.order_by().first().map(|s| s.options))
            .unwrap_or_default();
        let mut rest_fields = vec![SortField::new_with_options(
            plan.input.field(plan.time_column).data_type().clone(),
            order,
        )];
        rest_fields.extend(
            plan.input
                .fields()
                .iter()
                .map(|f| SortField::new(f.data_type().clone())),
        );
        let rest = RowConverter::new(rest_fields)?;
        let results = RowConverter::new(
            plan.schema
                .fields()
                .iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect(),
        )?;
        let mut fields: Vec<arrow::datatypes::FieldRef> =
            plan.schema.fields().iter().cloned().collect();
        fields.push(Arc::new(Field::new(
            drizzle_planner::OP_COLUMN,
            DataType::Utf8,
            false,
        )));
        Ok(Self {
            reach: plan.retain.rows,
            plan,
            part,
            rest,
            results,
            rows: BTreeMap::new(),
            held: 0,
            bytes: 0,
            schema: Arc::new(Schema::new(fields)),
        })
    }

    /// Each row's partition and `rest` bytes (`data`: the input columns).
    fn encode(&self, data: &RecordBatch) -> Result<(Rows, Rows)> {
        let mut keys = self
            .plan
            .partition_by
            .iter()
            .map(|e| eval(e, data))
            .collect::<Result<Vec<_>>>()?;
        if keys.is_empty() {
            keys.push(Arc::new(BooleanArray::new(
                arrow::buffer::BooleanBuffer::new_set(data.num_rows()),
                None,
            )));
        }
        let mut rest = Vec::with_capacity(data.num_columns() + 1);
        rest.push(Arc::clone(data.column(self.plan.time_column)));
        rest.extend(data.columns().iter().cloned());
        Ok((
            self.part.convert_columns(&keys)?,
            self.rest.convert_columns(&rest)?,
        ))
    }

    /// The rows of partition `part` from `n` rows before `from` (counted
    /// with multiplicity) up to `to` (all when `None`), each repeated by
    /// its multiplicity; and how many of them come before `from`.
    fn stretch(&self, part: &[u8], from: &[u8], n: u64, to: Option<&[u8]>) -> (Vec<&[u8]>, usize) {
        let mut before: Vec<(&[u8], u64)> = Vec::new();
        let mut need = n;
        for (k, (c, _)) in self
            .rows
            .range::<[u8], _>((Bound::Unbounded, Bound::Excluded(from)))
            .rev()
        {
            if need == 0 || !k.starts_with(part) {
                break;
            }
            let take = (*c).min(need);
            before.push((k.as_slice(), take));
            need -= take;
        }
        let mut out: Vec<&[u8]> = Vec::new();
        for (k, c) in before.iter().rev() {
            out.extend(std::iter::repeat_n(&k[part.len()..], *c as usize));
        }
        let context = out.len();
        for (k, (c, _)) in self
            .rows
            .range::<[u8], _>((Bound::Included(from), Bound::Unbounded))
        {
            if !k.starts_with(part) || to.is_some_and(|t| k.as_slice() > t) {
                break;
            }
            out.extend(std::iter::repeat_n(&k[part.len()..], *c as usize));
        }
        (out, context)
    }

    /// The key `n` rows (with multiplicity) after `after` in its partition,
    /// or `None` when the partition ends sooner.
    fn nth_after(&self, part: &[u8], after: &[u8], n: u64) -> Option<Vec<u8>> {
        if n == 0 {
            return Some(after.to_vec());
        }
        let mut seen = 0;
        for (k, (c, _)) in self
            .rows
            .range::<[u8], _>((Bound::Excluded(after), Bound::Unbounded))
        {
            if !k.starts_with(part) {
                return None;
            }
            seen += c;
            if seen >= n {
                return Some(k.clone());
            }
        }
        None
    }

    /// The results of the rows `rest` (one partition's, in order) after the
    /// first `context`.
    fn evaluate(&self, rest: &[&[u8]], context: usize) -> Result<Option<RecordBatch>> {
        if rest.len() <= context {
            return Ok(None);
        }
        let parser = self.rest.parser();
        let columns = self
            .rest
            .convert_rows(rest.iter().map(|r| parser.parse(r)))?;
        let data = RecordBatch::try_new(Arc::clone(&self.plan.input), columns[1..].to_vec())?;
        let n = data.num_rows() - context;
        let mut out: Vec<ArrayRef> = data.slice(context, n).columns().to_vec();
        for expr in &self.plan.window_exprs {
            out.push(expr.evaluate(&data)?.slice(context, n));
        }
        Ok(Some(RecordBatch::try_new(
            Arc::clone(&self.plan.schema),
            out,
        )?))
    }

    /// Adds `weight` rows of `key` (negative: removes them), whose first
    /// `plen` bytes are its partition's.
    fn apply(&mut self, key: &[u8], plen: u32, weight: i64) -> Result<()> {
        let held = self.rows.get(key).map_or(0, |(c, _)| *c);
        let now = i128::from(held) + i128::from(weight);
        let now = u64::try_from(now).map_err(|_| {
            ExecError::invalid("an OVER over changes was asked to retract a row it does not hold")
        })?;
        let size = key.len() as u64 + 48;
        if held == 0 && now > 0 {
            self.bytes += size;
        } else if held > 0 && now == 0 {
            self.bytes = self.bytes.saturating_sub(size);
        }
        self.held = self.held - held + now;
        if now == 0 {
            self.rows.remove(key);
        } else if let Some((c, _)) = self.rows.get_mut(key) {
            *c = now;
        } else {
            self.rows.insert(key.to_vec(), (now, plen));
        }
        Ok(())
    }

    /// The net changes of `batches` (input columns then a weight), by
    /// partition then key.
    fn net_changes(&self, batches: &[RecordBatch]) -> Result<Changes> {
        let width = self.plan.input.fields().len();
        let mut changes = Changes::new();
        for b in batches {
            if b.num_rows() == 0 {
                continue;
            }
            if b.num_columns() != width + 1 {
                return Err(ExecError::invalid(
                    "an OVER over changes got rows without their weight",
                ));
            }
            let weights = b
                .column(width)
                .as_primitive_opt::<arrow::datatypes::Int64Type>()
                .ok_or_else(|| ExecError::invalid("a change weight that is not BIGINT"))?;
            let data = b.project(&(0..width).collect::<Vec<_>>())?;
            let (parts, rests) = self.encode(&data)?;
            for i in 0..b.num_rows() {
                let part = parts.row(i);
                let mut key = Vec::with_capacity(part.as_ref().len() + rests.row(i).as_ref().len());
                key.extend_from_slice(part.as_ref());
                key.extend_from_slice(rests.row(i).as_ref());
                let w = weights.value(i);
                match changes.get_mut(part.as_ref()) {
                    Some(keys) => *keys.entry(key).or_default() += w,
                    None => {
                        changes.insert(part.as_ref().to_vec(), BTreeMap::from([(key, w)]));
                    }
                }
            }
        }
        for keys in changes.values_mut() {
            keys.retain(|_, w| *w != 0);
        }
        changes.retain(|_, keys| !keys.is_empty());
        Ok(changes)
    }

    /// The rows of `old` and `new` that are not in the other, with `op`.
    fn difference(&self, old: Vec<RecordBatch>, new: Vec<RecordBatch>) -> Result<RecordBatch> {
        let old = concat_batches(&self.plan.schema, &old)?;
        let new = concat_batches(&self.plan.schema, &new)?;
        let old_rows = self.results.convert_columns(old.columns())?;
        let new_rows = self.results.convert_columns(new.columns())?;
        let mut left: HashMap<&[u8], u64> = HashMap::new();
        for r in old_rows.iter() {
            *left.entry(r.data()).or_default() += 1;
        }
        let mut inserts = Vec::new();
        for (j, r) in new_rows.iter().enumerate() {
            match left.get_mut(r.data()) {
                Some(c) if *c > 0 => *c -= 1,
                _ => inserts.push(j as u32),
            }
        }
        let mut deletes = Vec::new();
        for (i, r) in old_rows.iter().enumerate() {
            if let Some(c) = left.get_mut(r.data()) {
                if *c > 0 {
                    *c -= 1;
                    deletes.push(i as u32);
                }
            }
        }
        let op = |what: &str, n: usize| -> ArrayRef {
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(what, n)))
        };
        let mut parts = Vec::with_capacity(2);
        for (rows, picked, what) in [(&old, deletes, "delete"), (&new, inserts, "insert")] {
            if picked.is_empty() {
                continue;
            }
            let n = picked.len();
            let mut columns = take_record_batch(rows, &UInt32Array::from(picked))?
                .columns()
                .to_vec();
            columns.push(op(what, n));
            parts.push(RecordBatch::try_new(Arc::clone(&self.schema), columns)?);
        }
        Ok(concat_batches(&self.schema, &parts)?)
    }
}

impl StatefulOperator for OverChangesExec {
    fn name(&self) -> &'static str {
        "OverAggregateExec"
    }

    fn process(
        &mut self,
        _batch: u64,
        inputs: &[Vec<RecordBatch>],
        _watermark_us: Option<i64>,
    ) -> Result<OperatorOutput> {
        let input = one_input("OverAggregateExec", inputs)?;
        let changes = self.net_changes(input)?;
        let mut old = Vec::new();
        let mut new = Vec::new();
        for (part, keys) in &changes {
            let (Some((first, _)), Some((last, _))) =
                (keys.first_key_value(), keys.last_key_value())
            else {
                continue;
            };
            // Rows after the n-th one past the last change see the same
            // frames before and after: they are the same rows, and the
            // rows between hold them apart from every change.
            let to = self.nth_after(part, last, self.reach);
            let (rows, context) = self.stretch(part, first, self.reach, to.as_deref());
            if let Some(b) = self.evaluate(&rows, context)? {
                old.push(b);
            }
            let plen = u32::try_from(part.len())
                .map_err(|_| ExecError::invalid("a PARTITION BY value of more than 4 GB"))?;
            for (key, weight) in keys {
                self.apply(key, plen, *weight)?;
            }
            let (rows, context) = self.stretch(part, first, self.reach, to.as_deref());
            if let Some(b) = self.evaluate(&rows, context)? {
                new.push(b);
            }
        }
        if old.is_empty() && new.is_empty() {
            return Ok(OperatorOutput {
                chunks: Vec::new(),
                late: 0,
            });
        }
        let out = self.difference(old, new)?;
        let chunks = if out.num_rows() > 0 {
            vec![(None, out)]
        } else {
            Vec::new()
        };
        Ok(OperatorOutput { chunks, late: 0 })
    }

    fn state_size(&self) -> StateSize {
        StateSize {
            bytes: self.bytes,
            keys: self.held,
        }
    }

    /// Always in full: every row once, with its multiplicity last.
    fn snapshot(&mut self, _delta_base: Option<u64>) -> Result<OperatorSnapshot> {
        let mut fields: Vec<arrow::datatypes::FieldRef> =
            self.plan.input.fields().iter().cloned().collect();
        fields.push(Arc::new(Field::new(STATE_COUNT, DataType::Int64, false)));
        let schema = Arc::new(Schema::new(fields));
        let parser = self.rest.parser();
        let mut section = Vec::new();
        let keys: Vec<(&Vec<u8>, &(u64, u32))> = self.rows.iter().collect();
        for chunk in keys.chunks(8192) {
            let rests = chunk
                .iter()
                .map(|(k, (_, plen))| parser.parse(&k[*plen as usize..]));
            let mut columns = self.rest.convert_rows(rests)?[1..].to_vec();
            columns.push(Arc::new(Int64Array::from_iter_values(
                chunk.iter().map(|(_, (c, _))| *c as i64),
            )));
            section.push(RecordBatch::try_new(Arc::clone(&schema), columns)?);
        }
        Ok(OperatorSnapshot {
            closed_through: None,
            delta_base: None,
            sections: vec![section],
        })
    }

    fn restore(&mut self, layers: Vec<OperatorSnapshot>, _batch: u64) -> Result<()> {
        let width = self.plan.input.fields().len();
        for layer in layers {
            for section in layer.sections {
                for b in section {
                    if b.num_rows() == 0 {
                        continue;
                    }
                    if b.num_columns() != width + 1 {
                        return Err(ExecError::invalid(
                            "checkpointed OVER state does not match the query",
                        ));
                    }
                    // The multiplicity is the weight of an addition.
                    for (part, keys) in self.net_changes(&[b])? {
                        let plen = part.len() as u32;
                        for (key, weight) in keys {
                            self.apply(&key, plen, weight)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::Field;
    use datafusion::logical_expr::{
        WindowFrame, WindowFrameBound, WindowFrameUnits, WindowFunctionDefinition,
    };
    use datafusion::physical_expr::expressions::Column;
    use datafusion::physical_expr::PhysicalSortExpr;

    const ROWS: u64 = 2;

    /// `sum(v) OVER (PARTITION BY k ORDER BY t ROWS BETWEEN ROWS PRECEDING
    /// AND CURRENT ROW)`.
    fn plan() -> OverAggregatePlan {
        let input = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("t", DataType::Int64, true),
            Field::new("v", DataType::Int64, true),
        ]));
        let k: Arc<dyn PhysicalExpr> = Arc::new(Column::new("k", 0));
        let v: Arc<dyn PhysicalExpr> = Arc::new(Column::new("v", 2));
        let order = vec![PhysicalSortExpr::new_default(Arc::new(Column::new("t", 1)))];
        let frame = Arc::new(WindowFrame::new_bounds(
            WindowFrameUnits::Rows,
            WindowFrameBound::Preceding(datafusion::common::ScalarValue::UInt64(Some(ROWS))),
            WindowFrameBound::CurrentRow,
        ));
        let sum = datafusion::physical_plan::windows::create_window_expr(
            &WindowFunctionDefinition::AggregateUDF(
                datafusion::functions_aggregate::sum::sum_udaf(),
            ),
            "s".to_string(),
            &[Arc::clone(&v)],
            std::slice::from_ref(&k),
            &order,
            frame,
            Arc::clone(&input),
            false,
            false,
            None,
        )
        .unwrap();
        let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new("s", DataType::Int64, true));
        OverAggregatePlan {
            window_exprs: vec![sum],
            partition_by: vec![k],
            time_column: 1,
            time_lag_us: 0,
            retain: drizzle_planner::OverRetain {
                rows: ROWS,
                range_us: 0,
                unbounded: false,
            },
            input,
            schema: Arc::new(Schema::new(fields)),
            display: String::new(),
            changes: true,
        }
    }

    fn batch(p: &OverAggregatePlan, rows: &[(i64, i64, i64, i64)]) -> RecordBatch {
        let col = |f: fn(&(i64, i64, i64, i64)) -> i64| -> ArrayRef {
            Arc::new(Int64Array::from(rows.iter().map(f).collect::<Vec<_>>()))
        };
        let mut fields: Vec<Field> = p
            .input
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new("w", DataType::Int64, false));
        RecordBatch::try_new(
            Arc::new(Schema::new(fields)),
            vec![col(|r| r.0), col(|r| r.1), col(|r| r.2), col(|r| r.3)],
        )
        .unwrap()
    }

    /// The model: every partition's rows sorted, each row's sum over its
    /// frame, recomputed from scratch.
    fn model(rows: &BTreeMap<(i64, i64, i64), u64>) -> Vec<(i64, i64, i64, i64)> {
        let mut out = Vec::new();
        let mut by_key: BTreeMap<i64, Vec<(i64, i64)>> = Default::default();
        for ((k, t, v), c) in rows {
            for _ in 0..*c {
                by_key.entry(*k).or_default().push((*t, *v));
            }
        }
        for (k, list) in by_key {
            for i in 0..list.len() {
                let from = i.saturating_sub(ROWS as usize);
                let s: i64 = list[from..=i].iter().map(|(_, v)| v).sum();
                out.push((k, list[i].0, list[i].1, s));
            }
        }
        out.sort_unstable();
        out
    }

    /// After every micro-batch of random inserts and deletes (some
    /// duplicates, some cancelling within a batch, some partitions never
    /// touched again), the inserts minus the deletes emitted so far are
    /// exactly the model's results; a checkpoint restores the same state.
    #[test]
    fn emitted_changes_add_up_to_the_model_results() {
        let p = plan();
        let mut exec = OverChangesExec::new(p.clone()).unwrap();
        let mut held: BTreeMap<(i64, i64, i64), u64> = Default::default();
        let mut shown: BTreeMap<(i64, i64, i64, i64), i64> = Default::default();
        let mut seed = 7u64;
        let mut rand = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for b in 0..60u64 {
            let mut changes = Vec::new();
            for _ in 0..rand(6) + 1 {
                let held_rows: Vec<_> = held
                    .iter()
                    .flat_map(|(r, c)| std::iter::repeat_n(*r, *c as usize))
                    .collect();
                let pending_deletes = changes
                    .iter()
                    .filter(|c: &&(i64, i64, i64, i64)| c.3 < 0)
                    .count();
                if !held_rows.is_empty() && rand(3) == 0 && pending_deletes < held_rows.len() {
                    let r = held_rows[rand(held_rows.len() as u64) as usize];
                    // Only rows not already deleted in this batch.
                    let already = changes
                        .iter()
                        .filter(|c| (c.0, c.1, c.2) == r && c.3 < 0)
                        .count() as u64;
                    if already < held[&r] {
                        changes.push((r.0, r.1, r.2, -1));
                    }
                } else {
                    changes.push((rand(3) as i64, rand(20) as i64, rand(4) as i64, 1));
                }
            }
            for c in &changes {
                let e = held.entry((c.0, c.1, c.2)).or_default();
                *e = (*e as i64 + c.3) as u64;
            }
            held.retain(|_, c| *c > 0);
            let out = exec.process(b, &[vec![batch(&p, &changes)]], None).unwrap();
            for (_, o) in &out.chunks {
                let ints = |i: usize| {
                    o.column(i)
                        .as_primitive::<arrow::datatypes::Int64Type>()
                        .clone()
                };
                let (k, t, v, s) = (ints(0), ints(1), ints(2), ints(3));
                let op = o.column(4).as_string::<i32>();
                for i in 0..o.num_rows() {
                    let w = if op.value(i) == "insert" { 1 } else { -1 };
                    *shown
                        .entry((k.value(i), t.value(i), v.value(i), s.value(i)))
                        .or_default() += w;
                }
            }
            assert!(
                shown.values().all(|c| *c >= 0),
                "batch {b}: a delete of a row not shown"
            );
            shown.retain(|_, c| *c > 0);
            let got: Vec<_> = shown
                .iter()
                .flat_map(|(r, c)| std::iter::repeat_n(*r, *c as usize))
                .collect();
            assert_eq!(got, model(&held), "batch {b}");
            if b % 20 == 19 {
                let snap = exec.snapshot(None).unwrap();
                exec = OverChangesExec::new(p.clone()).unwrap();
                exec.restore(vec![snap], b).unwrap();
                assert_eq!(exec.state_size().keys, held.values().sum::<u64>());
            }
        }
    }
}
