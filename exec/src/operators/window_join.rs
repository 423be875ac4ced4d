//! `WindowJoinExec`: the reduce side of a window join of two streams.

use super::*;

/// The reduce side of a window join: rows of both inputs per open window,
/// joined once the watermark passes the window's end. State of a closed
/// window is dropped; rows for it that arrive later are counted as late.
pub struct WindowJoinExec {
    plan: WindowJoinPlan,
    /// Window end (µs) → (left rows, right rows).
    windows: BTreeMap<i64, (Vec<RecordBatch>, Vec<RecordBatch>)>,
    /// Window end (µs) → the micro-batch each of its left and right
    /// batches arrived in: a checkpoint delta holds those after its base.
    arrived: BTreeMap<i64, (Vec<u64>, Vec<u64>)>,
    /// Every window ending at or before this has been emitted.
    closed_through: Option<i64>,
    /// The micro-batch being processed.
    now: u64,
}

impl WindowJoinExec {
    /// Empty state for `plan`.
    pub fn new(plan: WindowJoinPlan) -> Self {
        Self {
            plan,
            windows: BTreeMap::new(),
            arrived: BTreeMap::new(),
            closed_through: None,
            now: 0,
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
    pub(super) fn window_ends(&self, batch: &RecordBatch, column: usize) -> Result<Vec<i64>> {
        let bound = arrow::compute::cast(batch.column(column), &DataType::Int64)?;
        let bound = bound.as_primitive::<arrow::datatypes::Int64Type>();
        let shift = if self.plan.window_is_end {
            0
        } else {
            self.plan.size_us
        };
        Ok(bound.values().iter().map(|v| v + shift).collect())
    }

    pub(super) fn add(&mut self, batch: &RecordBatch, left: bool) -> Result<u64> {
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
            let arrived = self.arrived.entry(end).or_default();
            if left {
                entry.0.push(rows);
                arrived.0.push(self.now);
            } else {
                entry.1.push(rows);
                arrived.1.push(self.now);
            }
        }
        Ok(late)
    }

    /// Joins one closed window's rows.
    pub(super) fn join_window(
        &self,
        left: &[RecordBatch],
        right: &[RecordBatch],
    ) -> Result<RecordBatch> {
        let schema = &self.plan.schema;
        if self.plan.join_type == JoinType::LeftAnti && right.is_empty() {
            // Nothing to match: every left row.
            let Some(l0) = left.first() else {
                return Ok(RecordBatch::new_empty(Arc::clone(schema)));
            };
            let rows = arrow::compute::concat_batches(&l0.schema(), left)?;
            return Ok(RecordBatch::try_new_with_options(
                Arc::clone(schema),
                rows.columns().to_vec(),
                &RecordBatchOptions::new().with_row_count(Some(rows.num_rows())),
            )?);
        }
        let outer = matches!(
            self.plan.join_type,
            JoinType::Left | JoinType::Right | JoinType::Full
        );
        let (Some(l0), Some(r0)) = (left.first(), right.first()) else {
            if !outer {
                return Ok(RecordBatch::new_empty(Arc::clone(schema)));
            }
            // One side only: its rows, padded if the join keeps them.
            let l = left
                .first()
                .map(|l0| arrow::compute::concat_batches(&l0.schema(), left))
                .transpose()?;
            let r = right
                .first()
                .map(|r0| arrow::compute::concat_batches(&r0.schema(), right))
                .transpose()?;
            return self.with_unmatched(None, l.as_ref(), r.as_ref());
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
        // The pairs, left columns then right ones, filtered.
        let pairs_schema = match self.plan.join_type {
            JoinType::Inner => Arc::clone(schema),
            _ => Arc::new(arrow::datatypes::Schema::new(
                left.schema()
                    .fields()
                    .iter()
                    .chain(right.schema().fields())
                    .cloned()
                    .collect::<Vec<_>>(),
            )),
        };
        let mut columns = Vec::with_capacity(pairs_schema.fields().len());
        for c in left.columns() {
            columns.push(take(c, &li, None)?);
        }
        for c in right.columns() {
            columns.push(take(c, &ri, None)?);
        }
        let joined = RecordBatch::try_new_with_options(
            pairs_schema,
            columns,
            &RecordBatchOptions::new().with_row_count(Some(li.len())),
        )?;
        let (joined, li, ri) = match &self.plan.filter {
            Some(f) if joined.num_rows() > 0 => {
                let mask = as_mask(&eval(f, &joined)?)?;
                let li = arrow::compute::filter(&li, &mask)?;
                let ri = arrow::compute::filter(&ri, &mask)?;
                (filter_record_batch(&joined, &mask)?, li, ri)
            }
            _ => (joined, Arc::new(li) as ArrayRef, Arc::new(ri) as ArrayRef),
        };
        if outer {
            let (li, ri) = (
                li.as_primitive::<arrow::datatypes::UInt32Type>(),
                ri.as_primitive::<arrow::datatypes::UInt32Type>(),
            );
            let (left, right) = (
                (self.plan.join_type != JoinType::Right).then(|| unmatched(&left, li)),
                (self.plan.join_type != JoinType::Left).then(|| unmatched(&right, ri)),
            );
            let (left, right) = (left.transpose()?, right.transpose()?);
            return self.with_unmatched(Some(joined), left.as_ref(), right.as_ref());
        }
        match self.plan.join_type {
            JoinType::LeftSemi | JoinType::LeftAnti => {
                // The left rows with a match (semi) or without (anti), each
                // once, in their order.
                let mut matched = vec![false; left.num_rows()];
                let li = li.as_primitive::<arrow::datatypes::UInt32Type>();
                for i in li.values().iter() {
                    matched[*i as usize] = true;
                }
                let keep = self.plan.join_type == JoinType::LeftSemi;
                let mask =
                    BooleanArray::from(matched.iter().map(|m| *m == keep).collect::<Vec<_>>());
                let rows = filter_record_batch(&left, &mask)?;
                Ok(RecordBatch::try_new_with_options(
                    Arc::clone(schema),
                    rows.columns().to_vec(),
                    &RecordBatchOptions::new().with_row_count(Some(rows.num_rows())),
                )?)
            }
            _ => Ok(joined),
        }
    }

    /// An outer join's output for a window: its matched pairs, then the
    /// unmatched rows of each side it keeps, padded with NULLs for the
    /// other side's columns. `left` and `right` are the unmatched rows (a
    /// side that is not kept is ignored).
    fn with_unmatched(
        &self,
        pairs: Option<RecordBatch>,
        left: Option<&RecordBatch>,
        right: Option<&RecordBatch>,
    ) -> Result<RecordBatch> {
        let schema = &self.plan.schema;
        let right_width = self.plan.right_input.fields().len();
        let left_width = schema.fields().len().saturating_sub(right_width);
        let nulls = |from: usize, to: usize, rows: usize| -> Vec<ArrayRef> {
            schema.fields()[from..to]
                .iter()
                .map(|f| arrow::array::new_null_array(f.data_type(), rows))
                .collect()
        };
        let options = |rows: usize| RecordBatchOptions::new().with_row_count(Some(rows));
        let mut parts = Vec::with_capacity(3);
        if let Some(p) = pairs.filter(|p| p.num_rows() > 0) {
            parts.push(RecordBatch::try_new_with_options(
                Arc::clone(schema),
                p.columns().to_vec(),
                &options(p.num_rows()),
            )?);
        }
        let keep_left = matches!(self.plan.join_type, JoinType::Left | JoinType::Full);
        let keep_right = matches!(self.plan.join_type, JoinType::Right | JoinType::Full);
        if let Some(l) = left.filter(|l| keep_left && l.num_rows() > 0) {
            let mut columns = l.columns().to_vec();
            columns.extend(nulls(left_width, schema.fields().len(), l.num_rows()));
            parts.push(RecordBatch::try_new_with_options(
                Arc::clone(schema),
                columns,
                &options(l.num_rows()),
            )?);
        }
        if let Some(r) = right.filter(|r| keep_right && r.num_rows() > 0) {
            let mut columns = nulls(0, left_width, r.num_rows());
            columns.extend(r.columns().iter().cloned());
            parts.push(RecordBatch::try_new_with_options(
                Arc::clone(schema),
                columns,
                &options(r.num_rows()),
            )?);
        }
        Ok(arrow::compute::concat_batches(schema, &parts)?)
    }

    /// The held rows of both inputs (as shuffled to this partition) and the
    /// closed-through bound; the state is unchanged. With `since`, only
    /// the rows that arrived after that micro-batch (a delta).
    pub fn snapshot(
        &self,
        since: Option<u64>,
    ) -> (Option<i64>, Vec<RecordBatch>, Vec<RecordBatch>) {
        let mut left = Vec::new();
        let mut right = Vec::new();
        let none = (Vec::new(), Vec::new());
        for (end, (l, r)) in &self.windows {
            let (la, ra) = self.arrived.get(end).unwrap_or(&none);
            let new =
                |i: usize, at: &Vec<u64>| since.is_none_or(|b| at.get(i).is_none_or(|a| *a > b));
            left.extend(
                l.iter()
                    .enumerate()
                    .filter(|(i, _)| new(*i, la))
                    .map(|(_, b)| b.clone()),
            );
            right.extend(
                r.iter()
                    .enumerate()
                    .filter(|(i, _)| new(*i, ra))
                    .map(|(_, b)| b.clone()),
            );
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
    ) -> Result<OperatorOutput> {
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
                self.arrived.remove(&end);
                let rows = self.join_window(&l, &r)?;
                chunks.push((Some(end), rows));
            }
            // Every window ending at or before the watermark is closed, with
            // rows or without.
            self.closed_through = Some(self.closed_through.map_or(wm, |c| c.max(wm)));
        }
        Ok(OperatorOutput { chunks, late })
    }
}

/// The rows of `side` that no pair in `matched` (row indexes) uses.
fn unmatched(side: &RecordBatch, matched: &UInt32Array) -> Result<RecordBatch> {
    let mut used = vec![false; side.num_rows()];
    for i in matched.values().iter() {
        if let Some(u) = used.get_mut(*i as usize) {
            *u = true;
        }
    }
    let mask = BooleanArray::from(used.iter().map(|u| !u).collect::<Vec<_>>());
    Ok(filter_record_batch(side, &mask)?)
}

impl StatefulOperator for WindowJoinExec {
    fn name(&self) -> &'static str {
        "WindowJoinExec"
    }

    fn process(
        &mut self,
        batch: u64,
        inputs: &[Vec<RecordBatch>],
        watermark_us: Option<i64>,
    ) -> Result<OperatorOutput> {
        self.now = batch;
        match inputs {
            [left, right] => WindowJoinExec::process(self, left, right, watermark_us),
            _ => Err(ExecError::invalid(format!(
                "WindowJoinExec reads two inputs, not {}",
                inputs.len()
            ))),
        }
    }

    fn state_size(&self) -> StateSize {
        WindowJoinExec::state_size(self)
    }

    /// The held rows of both inputs; a delta of `delta_base`: the rows
    /// that arrived after it (held rows never change, and the windows a
    /// restore must drop are those the closed-through bound has passed).
    fn snapshot(&mut self, delta_base: Option<u64>) -> Result<OperatorSnapshot> {
        let (closed_through, left, right) = WindowJoinExec::snapshot(self, delta_base);
        Ok(OperatorSnapshot {
            closed_through,
            delta_base,
            sections: vec![left, right],
        })
    }

    fn restore(&mut self, layers: Vec<OperatorSnapshot>, batch: u64) -> Result<()> {
        self.now = batch;
        for layer in layers {
            let mut sections = layer.sections.into_iter();
            let left = sections.next().unwrap_or_default();
            let right = sections.next().unwrap_or_default();
            WindowJoinExec::restore(self, layer.closed_through, &left, &right)?;
        }
        // A delta chain's older layers hold rows of windows closed since.
        if let Some(c) = self.closed_through {
            self.windows.retain(|end, _| *end > c);
            self.arrived.retain(|end, _| *end > c);
        }
        Ok(())
    }
}
