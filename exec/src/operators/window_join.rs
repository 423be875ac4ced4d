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
        let (joined, li) = match &self.plan.filter {
            Some(f) if joined.num_rows() > 0 => {
                let mask = as_mask(&eval(f, &joined)?)?;
                let li = arrow::compute::filter(&li, &mask)?;
                (filter_record_batch(&joined, &mask)?, li)
            }
            _ => (joined, Arc::new(li) as ArrayRef),
        };
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
