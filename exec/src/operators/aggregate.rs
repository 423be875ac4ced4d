//! Aggregation: the map-side partial half and `AggregateFinalExec`, the
//! reduce-side keyed state (per window when windowed).

use arrow::row::OwnedRow;

use super::*;

pub(super) fn new_accumulator(
    agg: &Arc<AggregateFunctionExpr>,
) -> Result<Box<dyn GroupsAccumulator>> {
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

pub(super) struct GroupTable {
    values: Box<dyn GroupValues>,
    accs: Vec<Box<dyn GroupsAccumulator>>,
    /// For a global aggregate (no GROUP BY): whether any row arrived.
    seen: bool,
    /// Per group: the micro-batch that last changed it (incremental
    /// checkpoints write the groups changed since the last one).
    changed: Vec<u64>,
}

impl GroupTable {
    pub(super) fn new(plan: &AggregatePlan) -> Result<Self> {
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

    pub(super) fn size(&self, plan: &AggregatePlan) -> StateSize {
        StateSize {
            bytes: (self.values.size()
                + self.accs.iter().map(|a| a.size()).sum::<usize>()
                + self.changed.capacity() * 8) as u64,
            keys: self.len(plan) as u64,
        }
    }

    pub(super) fn len(&self, plan: &AggregatePlan) -> usize {
        if plan.group_exprs.is_empty() {
            usize::from(self.seen)
        } else {
            self.values.len()
        }
    }

    /// Merges partial rows of micro-batch `stamp`; returns the group index
    /// of each row.
    pub(super) fn merge(
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
    pub(super) fn snapshot(
        &mut self,
        plan: &AggregatePlan,
        since: Option<u64>,
    ) -> Result<(RecordBatch, Vec<u64>)> {
        let n = self.len(plan);
        if n == 0 {
            return Ok((
                RecordBatch::new_empty(Arc::clone(&plan.partial_schema)),
                Vec::new(),
            ));
        }
        let partial = self.drain(plan, n)?;
        // Emitting drained the table: merge the rows back, in group order
        // (so group indexes, and their change stamps, stay as they were).
        let changed = std::mem::take(&mut self.changed);
        *self = GroupTable::new(plan)?;
        self.merge(plan, &partial, 0)?;
        self.changed = changed;
        let stamp = |g: usize| self.changed.get(g).copied().unwrap_or(0);
        let Some(since) = since else {
            return Ok((partial, (0..n).map(stamp).collect()));
        };
        let picked: Vec<u32> = (0..n)
            .filter(|&g| self.changed.get(g).is_none_or(|&c| c > since))
            .map(|g| g as u32)
            .collect();
        let stamps = picked.iter().map(|&g| stamp(g as usize)).collect();
        if picked.len() == n {
            return Ok((partial, stamps));
        }
        Ok((
            take_record_batch(&partial, &UInt32Array::from(picked))?,
            stamps,
        ))
    }

    /// Empties the table into partial rows (group columns, then every
    /// aggregate's state), one per group in group order; `n` is
    /// [`Self::len`].
    fn drain(&mut self, plan: &AggregatePlan, n: usize) -> Result<RecordBatch> {
        self.take_all(
            &plan.partial_schema,
            !plan.group_exprs.is_empty(),
            n,
            |acc| Ok(acc.state(EmitTo::All)?),
        )
    }

    /// Empties the table into a batch of `schema`: the group columns (when
    /// `grouped`), then what `take` takes from each accumulator.
    fn take_all(
        &mut self,
        schema: &SchemaRef,
        grouped: bool,
        n: usize,
        take: impl Fn(&mut Box<dyn GroupsAccumulator>) -> Result<Vec<ArrayRef>>,
    ) -> Result<RecordBatch> {
        let mut columns = if grouped {
            self.values.emit(EmitTo::All)?
        } else {
            Vec::new()
        };
        for acc in &mut self.accs {
            columns.extend(take(acc)?);
        }
        Ok(RecordBatch::try_new_with_options(
            Arc::clone(schema),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(n)),
        )?)
    }

    /// Sets group `g`'s last-changed micro-batch (a restore keeps the
    /// original one, so idle-state eviction is the same after recovery).
    pub(super) fn set_changed(&mut self, g: usize, stamp: u64) {
        if let Some(c) = self.changed.get_mut(g) {
            *c = stamp;
        }
    }

    /// Evicts the groups no row changed since before micro-batch `before`
    /// (`SET state_ttl`); returns how many.
    pub(super) fn evict_idle(&mut self, plan: &AggregatePlan, before: u64) -> Result<usize> {
        let n = self.len(plan);
        let idle = (0..n)
            .filter(|&g| self.changed.get(g).is_some_and(|&c| c < before))
            .count();
        if idle == 0 {
            return Ok(0);
        }
        let partial = self.drain(plan, n)?;
        let keep: Vec<u32> = (0..n)
            .filter(|&g| self.changed.get(g).is_none_or(|&c| c >= before))
            .map(|g| g as u32)
            .collect();
        let stamps: Vec<u64> = keep
            .iter()
            .map(|&g| self.changed.get(g as usize).copied().unwrap_or(0))
            .collect();
        let kept = take_record_batch(&partial, &UInt32Array::from(keep))?;
        *self = GroupTable::new(plan)?;
        if kept.num_rows() > 0 {
            let groups = self.merge(plan, &kept, 0)?;
            for (row, g) in groups.into_iter().enumerate() {
                self.set_changed(g, stamps[row]);
            }
        }
        Ok(idle)
    }

    /// Emits every group's final row and empties the table.
    pub(super) fn emit_all(&mut self, plan: &AggregatePlan) -> Result<RecordBatch> {
        let n = self.len(plan);
        if n == 0 {
            return Ok(RecordBatch::new_empty(Arc::clone(&plan.output_schema)));
        }
        self.take_all(
            &plan.output_schema,
            !plan.group_exprs.is_empty(),
            n,
            |acc| Ok(vec![acc.evaluate(EmitTo::All)?]),
        )
    }

    /// The current rows of `changed` groups, leaving the state in place.
    /// `keys` holds the group columns of rows whose group index is `key_groups`.
    pub(super) fn emit_changed(
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

/// The reduce-side half of an aggregation; the keyed state of one reduce partition.
pub struct AggregateFinalExec {
    plan: AggregatePlan,
    /// Upsert (no window) state.
    table: Option<GroupTable>,
    /// Windowed state: window end (µs) → groups of that window.
    windows: BTreeMap<i64, GroupTable>,
    /// Windows with end ≤ this are closed (µs).
    closed_through: Option<i64>,
    /// `SET state_ttl` in micro-batches (upsert aggregates only).
    ttl: Option<u64>,
    /// Groups were evicted since the last snapshot.
    evicted: bool,
    /// A change-emitting aggregate (`plan.changes`): each group's last
    /// emitted row, retracted when the group changes.
    last: Vec<Option<OwnedRow>>,
    last_bytes: u64,
    /// Row format of the output rows (change-emitting aggregates).
    out_rows: Option<RowConverter>,
}

impl AggregateFinalExec {
    /// Empty state for `plan`.
    pub fn new(plan: AggregatePlan) -> Self {
        Self {
            plan,
            table: None,
            windows: BTreeMap::new(),
            closed_through: None,
            ttl: None,
            evicted: false,
            last: Vec::new(),
            last_bytes: 0,
            out_rows: None,
        }
    }

    /// The schema of a change-emitting aggregate's rows: the output, then
    /// the weight.
    pub fn change_schema(plan: &AggregatePlan) -> SchemaRef {
        let mut fields: Vec<arrow::datatypes::FieldRef> =
            plan.output_schema.fields().iter().cloned().collect();
        fields.push(Arc::new(arrow::datatypes::Field::new(
            drizzle_planner::WEIGHT_COLUMN,
            DataType::Int64,
            false,
        )));
        Arc::new(arrow::datatypes::Schema::new(fields))
    }

    fn out_converter(&mut self) -> Result<&RowConverter> {
        if self.out_rows.is_none() {
            self.out_rows = Some(RowConverter::new(
                self.plan
                    .output_schema
                    .fields()
                    .iter()
                    .map(|f| SortField::new(f.data_type().clone()))
                    .collect(),
            )?);
        }
        self.out_rows
            .as_ref()
            .ok_or_else(|| ExecError::invalid("no output row format"))
    }

    /// The changed groups' new rows `out` (of groups `order`) as changes:
    /// each group's previous row with weight -1 (if it had one, and it
    /// differs), then its new row with weight +1.
    fn as_changes(&mut self, order: &[usize], out: &RecordBatch) -> Result<RecordBatch> {
        let new = self.out_converter()?.convert_columns(out.columns())?;
        // An aggregation over changes: a group whose rows all went (its
        // first sum, of the weights, is 0) is only taken back.
        let rows_left = if self.plan.over_changes {
            out.columns()
                .get(self.plan.group_exprs.len())
                .and_then(|c| c.as_primitive_opt::<arrow::datatypes::Int64Type>())
                .cloned()
        } else {
            None
        };
        let mut retract: Vec<OwnedRow> = Vec::new();
        let mut add: Vec<u32> = Vec::new();
        for (i, &g) in order.iter().enumerate() {
            if self.last.len() <= g {
                self.last.resize(g + 1, None);
            }
            let row = new.row(i);
            let gone = rows_left
                .as_ref()
                .is_some_and(|n| n.is_valid(i) && n.value(i) == 0);
            if let Some(prev) = &self.last[g] {
                if prev.row() == row && !gone {
                    continue;
                }
                self.last_bytes = self.last_bytes.saturating_sub(prev.as_ref().len() as u64);
                retract.push(prev.clone());
            }
            if gone {
                self.last[g] = None;
                continue;
            }
            self.last_bytes += row.as_ref().len() as u64;
            self.last[g] = Some(row.owned());
            add.push(i as u32);
        }
        let schema = Self::change_schema(&self.plan);
        let weighted = |columns: Vec<ArrayRef>, weight: i64| -> Result<RecordBatch> {
            let n = columns.first().map_or(0, |c| c.len());
            let mut columns = columns;
            columns.push(Arc::new(Int64Array::from(vec![weight; n])));
            Ok(RecordBatch::try_new_with_options(
                Arc::clone(&schema),
                columns,
                &RecordBatchOptions::new().with_row_count(Some(n)),
            )?)
        };
        let mut parts = Vec::with_capacity(2);
        if !retract.is_empty() {
            let columns = self
                .out_converter()?
                .convert_rows(retract.iter().map(|r| r.row()))?;
            parts.push(weighted(columns, -1)?);
        }
        let added = take_record_batch(out, &UInt32Array::from(add))?;
        parts.push(weighted(added.columns().to_vec(), 1)?);
        Ok(arrow::compute::concat_batches(&schema, &parts)?)
    }

    /// After a restore: every group's current row is what was emitted last.
    fn remember_all(&mut self) -> Result<()> {
        self.last.clear();
        self.last_bytes = 0;
        let k = self.plan.group_exprs.len();
        let plan = self.plan.clone();
        let Some(table) = self.table.as_mut() else {
            return Ok(());
        };
        let n = table.len(&plan);
        if n == 0 {
            return Ok(());
        }
        let (partial, _) = table.snapshot(&plan, None)?;
        let keys: Vec<ArrayRef> = partial.columns()[..k].to_vec();
        let order: Vec<usize> = (0..n).collect();
        let out = table.emit_changed(&plan, &order, &keys)?;
        let rows = self.out_converter()?.convert_columns(out.columns())?;
        // Over changes, a group with no row left was taken back.
        let rows_left = if plan.over_changes {
            out.columns()
                .get(k)
                .and_then(|c| c.as_primitive_opt::<arrow::datatypes::Int64Type>())
                .cloned()
        } else {
            None
        };
        self.last = (0..n)
            .map(|i| {
                let gone = rows_left
                    .as_ref()
                    .is_some_and(|c| c.is_valid(i) && c.value(i) == 0);
                (!gone).then(|| rows.row(i).owned())
            })
            .collect();
        self.last_bytes = self
            .last
            .iter()
            .flatten()
            .map(|r| r.as_ref().len() as u64)
            .sum();
        Ok(())
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
        size.bytes += self.last_bytes + self.last.capacity() as u64 * 32;
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
        fields.push(Arc::new(arrow::datatypes::Field::new(
            STATE_CHANGED,
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
            let (partial, stamps) = table.snapshot(&self.plan, since)?;
            if partial.num_rows() == 0 {
                continue;
            }
            let mut columns = partial.columns().to_vec();
            columns.push(Arc::new(Int64Array::from(vec![end; partial.num_rows()])));
            columns.push(Arc::new(Int64Array::from_iter_values(
                stamps.into_iter().map(|s| s as i64),
            )));
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
            if !state_width_ok(batch, width) {
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
            if !state_width_ok(batch, width) {
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
                // Checkpoints from before change stamps were kept have none:
                // their groups count as changed at the checkpoint.
                let stamps = batch
                    .columns()
                    .get(width + 1)
                    .and_then(|c| c.as_primitive_opt::<arrow::datatypes::Int64Type>());
                if let Some(t) = self.table.as_mut() {
                    let groups = t.merge(&self.plan, &partial, as_of)?;
                    if let Some(stamps) = stamps {
                        for (row, g) in groups.into_iter().enumerate() {
                            if stamps.is_valid(row) {
                                t.set_changed(g, stamps.value(row).max(0) as u64);
                            }
                        }
                    }
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
    ) -> Result<OperatorOutput> {
        match self.plan.window.clone() {
            None => self.process_upsert(batch, partials),
            Some(w) => self.process_windowed(batch, partials, w, watermark_us),
        }
    }

    pub(super) fn process_upsert(
        &mut self,
        stamp: u64,
        partials: &[RecordBatch],
    ) -> Result<OperatorOutput> {
        if self.table.is_none() {
            self.table = Some(GroupTable::new(&self.plan)?);
        }
        let plan = &self.plan;
        let Some(table) = self.table.as_mut() else {
            return Err(ExecError::invalid("aggregate state missing"));
        };
        // `SET state_ttl`: groups idle for more than the TTL go first, so
        // one of them seen in this batch starts over.
        if let Some(ttl) = self.ttl {
            if ttl_check(stamp, ttl) && table.evict_idle(plan, stamp.saturating_sub(ttl))? > 0 {
                // A delta cannot say a group is gone: the next checkpoint
                // is complete.
                self.evicted = true;
            }
        }
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
            return Ok(OperatorOutput {
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
        let out = if plan.changes {
            self.as_changes(&order, &out)?
        } else {
            out
        };
        Ok(OperatorOutput {
            chunks: vec![(None, out)],
            late: 0,
        })
    }

    pub(super) fn process_windowed(
        &mut self,
        stamp: u64,
        partials: &[RecordBatch],
        w: drizzle_planner::WindowGroup,
        watermark_us: Option<i64>,
    ) -> Result<OperatorOutput> {
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
        Ok(OperatorOutput { chunks, late })
    }
}

/// Name of the window-end column of checkpointed aggregate state.
pub const STATE_WINDOW_END: &str = "__drizzle_window_end";

/// Name of the column of checkpointed aggregate state that holds each
/// group's last-changed micro-batch (for `SET state_ttl`).
pub const STATE_CHANGED: &str = "__drizzle_changed";

/// A checkpointed aggregate state batch: the partial columns, the window
/// end, and (since change stamps are kept) the stamps.
fn state_width_ok(batch: &RecordBatch, width: usize) -> bool {
    (width + 1..=width + 2).contains(&batch.num_columns())
}

impl StatefulOperator for AggregateFinalExec {
    fn name(&self) -> &'static str {
        "AggregateFinalExec"
    }

    fn process(
        &mut self,
        batch: u64,
        inputs: &[Vec<RecordBatch>],
        watermark_us: Option<i64>,
    ) -> Result<OperatorOutput> {
        let partials = one_input("AggregateFinalExec", inputs)?;
        AggregateFinalExec::process(self, batch, partials, watermark_us)
    }

    fn state_size(&self) -> StateSize {
        AggregateFinalExec::state_size(self)
    }

    fn snapshot(&mut self, delta_base: Option<u64>) -> Result<OperatorSnapshot> {
        // After an eviction, only a complete snapshot says what is gone.
        let delta_base = if std::mem::take(&mut self.evicted) {
            None
        } else {
            delta_base
        };
        let (closed_through, rows) = AggregateFinalExec::snapshot(self, delta_base)?;
        Ok(OperatorSnapshot {
            closed_through,
            delta_base,
            sections: vec![rows],
        })
    }

    /// Not for an aggregate emitting changes (the aggregate it feeds holds
    /// its groups' rows, which an eviction would leave there) nor for one
    /// over changes (a later retraction would start an evicted group below
    /// zero).
    fn set_state_ttl(&mut self, batches: u64) {
        if !self.plan.changes && !self.plan.over_changes {
            self.ttl = Some(batches.max(1));
        }
    }

    fn restore(&mut self, layers: Vec<OperatorSnapshot>, batch: u64) -> Result<()> {
        let layers = layers
            .into_iter()
            .map(|l| {
                let rows = l.sections.into_iter().next().unwrap_or_default();
                (l.closed_through, rows)
            })
            .collect();
        let (closed_through, rows) = self.overlay(layers)?;
        AggregateFinalExec::restore(self, closed_through, &rows, batch)?;
        if self.plan.changes {
            self.remember_all()?;
        }
        Ok(())
    }
}
