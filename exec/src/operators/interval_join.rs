//! `IntervalJoinExec`: the reduce side of an interval join of two streams.

use super::*;

/// A held row: (arrival number of its batch, row).
type RowRef = (u64, u32);

/// A matching pair: the left row and the right row.
type Pair = (RowRef, RowRef);

/// Batches just added to a side: their arrival numbers and encoded keys.
type Added = Vec<(u64, arrow::row::Rows)>;

/// Rows of one input held by an interval join, indexed by key.
#[derive(Default)]
struct HeldSide {
    /// Batches by arrival number.
    batches: BTreeMap<u64, HeldBatch>,
    /// Key (arrow's row format) → the rows with it, as (batch, row). Entries
    /// of dropped batches stay until the index is rebuilt.
    index: HashMap<Vec<u8>, Vec<(u64, u32)>>,
    /// The next arrival number.
    next: u64,
    /// Rows in `batches`.
    rows: u64,
    /// Index entries that point at dropped batches.
    stale: u64,
    /// What `index` holds, in bytes (kept as it changes: summing it per
    /// micro-batch would cost as much as the join).
    index_bytes: u64,
}

/// The bytes an index entry costs besides its rows: the key and the map's
/// own overhead.
fn index_entry_bytes(key: &[u8]) -> u64 {
    key.len() as u64 + 48
}

/// The bytes an index row reference costs.
const INDEX_REF_BYTES: u64 = size_of::<(u64, u32)>() as u64;

impl HeldSide {
    /// Indexes row `row` of batch `seq` under `key`.
    fn index_row(&mut self, key: &[u8], seq: u64, row: u32) {
        match self.index.get_mut(key) {
            Some(rows) => rows.push((seq, row)),
            None => {
                self.index_bytes += index_entry_bytes(key);
                self.index.insert(key.to_vec(), vec![(seq, row)]);
            }
        }
        self.index_bytes += INDEX_REF_BYTES;
    }
}

struct HeldBatch {
    batch: RecordBatch,
    /// The time column, µs.
    times: Vec<i64>,
    /// The largest of `times`: the batch is dropped once it is too old.
    max_time: i64,
    /// Per row, how many pairs it made (an outer side's rows: a row with
    /// none was emitted padded with NULLs).
    matches: Vec<u32>,
}

impl HeldSide {
    /// Adds `batch` (no NULL key or time left in it) with its encoded keys
    /// and times; returns its arrival number.
    fn add(&mut self, batch: RecordBatch, keys: &arrow::row::Rows, times: Vec<i64>) -> u64 {
        let seq = self.next;
        self.next += 1;
        for row in 0..batch.num_rows() {
            self.index_row(keys.row(row).as_ref(), seq, row as u32);
        }
        self.rows += batch.num_rows() as u64;
        let max_time = times.iter().copied().max().unwrap_or(i64::MIN);
        self.batches.insert(
            seq,
            HeldBatch {
                matches: vec![0; batch.num_rows()],
                batch,
                times,
                max_time,
            },
        );
        seq
    }

    /// Drops the batches whose every row is older than `before` (µs), and
    /// rebuilds the index once most of it points at dropped rows.
    fn drop_before(&mut self, before: i64, converter: &RowConverter, keys: &KeyEval) -> Result<()> {
        let old: Vec<u64> = self
            .batches
            .iter()
            .filter(|(_, b)| b.max_time < before)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in old {
            if let Some(b) = self.batches.remove(&seq) {
                let n = b.batch.num_rows() as u64;
                self.rows -= n;
                self.stale += n;
            }
        }
        if self.stale > self.rows.max(1024) {
            self.index.clear();
            self.index_bytes = 0;
            self.stale = 0;
            for (seq, held) in &self.batches {
                let encoded = converter.convert_columns(&keys.eval(&held.batch)?)?;
                for row in 0..held.batch.num_rows() {
                    let key = encoded.row(row);
                    match self.index.get_mut(key.as_ref()) {
                        Some(rows) => rows.push((*seq, row as u32)),
                        None => {
                            self.index_bytes += index_entry_bytes(key.as_ref());
                            self.index
                                .insert(key.as_ref().to_vec(), vec![(*seq, row as u32)]);
                        }
                    }
                    self.index_bytes += INDEX_REF_BYTES;
                }
            }
        }
        Ok(())
    }

    fn size(&self) -> StateSize {
        StateSize {
            bytes: batches_bytes(self.batches.values().map(|b| &b.batch))
                + self.rows * 12
                + self.index_bytes,
            keys: self.rows,
        }
    }
}

/// The columns of `side`'s held rows `refs`, in order.
fn gather(side: &HeldSide, refs: impl Iterator<Item = (u64, u32)>) -> Result<Vec<ArrayRef>> {
    let mut slot: HashMap<u64, usize> = HashMap::new();
    let mut batches: Vec<&RecordBatch> = Vec::new();
    let mut indices: Vec<(usize, usize)> = Vec::new();
    for (seq, row) in refs {
        let at = match slot.get(&seq) {
            Some(at) => *at,
            None => {
                let b = side.batches.get(&seq).ok_or_else(|| {
                    ExecError::invalid("an interval join pair refers to a dropped batch")
                })?;
                batches.push(&b.batch);
                slot.insert(seq, batches.len() - 1);
                batches.len() - 1
            }
        };
        indices.push((at, row as usize));
    }
    let width = batches.first().map_or(0, |b| b.num_columns());
    (0..width)
        .map(|c| {
            let arrays: Vec<&dyn Array> = batches.iter().map(|b| b.column(c).as_ref()).collect();
            Ok(arrow::compute::interleave(&arrays, &indices)?)
        })
        .collect()
}

/// A side's key expressions, cast to the types both sides' keys share.
struct KeyEval {
    exprs: Vec<Arc<dyn PhysicalExpr>>,
    types: Vec<DataType>,
}

impl KeyEval {
    fn eval(&self, batch: &RecordBatch) -> Result<Vec<ArrayRef>> {
        self.exprs
            .iter()
            .zip(&self.types)
            .map(|(e, t)| {
                let a = eval(e, batch)?;
                Ok(if a.data_type() == t {
                    a
                } else {
                    arrow::compute::cast(&a, t)?
                })
            })
            .collect()
    }
}

/// The reduce side of an interval join: each pair of rows with equal keys
/// and `left_time - right_time` within the interval is emitted once, in the
/// micro-batch where the later of the two arrives. A row is held until no
/// row still to come on the other side can match it (the watermark, less
/// that side's lag, has passed its interval), so state is bounded by the
/// interval plus the watermark delay.
pub struct IntervalJoinExec {
    plan: IntervalJoinPlan,
    converter: RowConverter,
    left_keys: KeyEval,
    right_keys: KeyEval,
    left: HeldSide,
    right: HeldSide,
    /// `SET state_ttl` in micro-batches (regular joins only).
    ttl: Option<u64>,
    /// The micro-batch being processed: a regular join's rows carry the one
    /// they arrived in as their time.
    now: u64,
    /// An outer join's output: the plan's columns, then `op`.
    changes_schema: SchemaRef,
}

/// Name of the column a regular join's checkpointed rows carry their
/// arrival micro-batch in (for `SET state_ttl`).
pub const STATE_ARRIVED: &str = "__drizzle_arrived";

/// Name of the column an outer join's checkpointed rows carry their match
/// counts in (after [`STATE_ARRIVED`]).
pub const STATE_MATCHES: &str = "__drizzle_matches";

impl IntervalJoinExec {
    /// Empty state for `plan`.
    pub fn new(plan: IntervalJoinPlan) -> Result<Self> {
        let types = plan
            .right_keys
            .iter()
            .map(|k| k.data_type(&plan.right_input))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let converter =
            RowConverter::new(types.iter().map(|t| SortField::new(t.clone())).collect())?;
        Ok(Self {
            left_keys: KeyEval {
                exprs: plan.left_keys.clone(),
                types: types.clone(),
            },
            right_keys: KeyEval {
                exprs: plan.right_keys.clone(),
                types,
            },
            converter,
            changes_schema: {
                let mut fields: Vec<arrow::datatypes::FieldRef> =
                    plan.schema.fields().iter().cloned().collect();
                fields.push(Arc::new(arrow::datatypes::Field::new(
                    drizzle_planner::OP_COLUMN,
                    DataType::Utf8,
                    false,
                )));
                Arc::new(arrow::datatypes::Schema::new(fields))
            },
            plan,
            left: HeldSide::default(),
            right: HeldSide::default(),
            ttl: None,
            now: 0,
        })
    }

    /// Whether the left and the right side are outer sides.
    fn outer(&self) -> (bool, bool) {
        match self.plan.join_type {
            JoinType::Left => (true, false),
            JoinType::Right => (false, true),
            JoinType::Full => (true, true),
            _ => (false, false),
        }
    }

    /// `rows` of one side padded with NULLs for the other, with `op`.
    fn padded(&self, rows: &RecordBatch, left: bool, op: &str) -> Result<RecordBatch> {
        let n = rows.num_rows();
        let lw = self.left_width();
        let fields = self.plan.schema.fields();
        let nulls = |range: std::ops::Range<usize>| -> Vec<ArrayRef> {
            range
                .map(|i| arrow::array::new_null_array(fields[i].data_type(), n))
                .collect()
        };
        let mut columns = if left {
            let mut c = rows.columns().to_vec();
            c.extend(nulls(lw..fields.len()));
            c
        } else {
            let mut c = nulls(0..lw);
            c.extend(rows.columns().iter().cloned());
            c
        };
        columns.push(Arc::new(arrow::array::StringArray::from_iter_values(
            std::iter::repeat_n(op, n),
        )));
        Ok(RecordBatch::try_new_with_options(
            Arc::clone(&self.changes_schema),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(n)),
        )?)
    }

    /// The held rows `refs` of one side.
    fn rows_of(&self, left: bool, refs: &[RowRef]) -> Result<RecordBatch> {
        let side = if left { &self.left } else { &self.right };
        let schema = if left {
            Arc::new(
                self.plan
                    .schema
                    .project(&(0..self.left_width()).collect::<Vec<_>>())?,
            )
        } else {
            Arc::clone(&self.plan.right_input)
        };
        let columns = gather(side, refs.iter().copied())?;
        Ok(RecordBatch::try_new_with_options(
            schema,
            columns,
            &RecordBatchOptions::new().with_row_count(Some(refs.len())),
        )?)
    }

    /// Columns of the left input.
    fn left_width(&self) -> usize {
        self.plan.schema.fields().len() - self.plan.right_input.fields().len()
    }

    /// Rows held on both sides.
    pub fn held_rows(&self) -> u64 {
        self.left.rows + self.right.rows
    }

    /// Keeps the rows of `batches` that can match (key and time not NULL),
    /// adds them to a side and returns the new arrival numbers with the
    /// batches' encoded keys.
    fn add(&mut self, batches: &[RecordBatch], left: bool) -> Result<(Added, Vec<RecordBatch>)> {
        let mut added = Vec::new();
        let mut unusable = Vec::new();
        for batch in batches.iter().filter(|b| b.num_rows() > 0) {
            let (keys, column) = if left {
                (&self.left_keys, self.plan.left_time)
            } else {
                (&self.right_keys, self.plan.right_time)
            };
            let key_arrays = keys.eval(batch)?;
            // A regular join has no time: a row's is the micro-batch it
            // arrived in (all pairs match; `state_ttl` drops old rows).
            let time: ArrayRef = if self.plan.regular {
                Arc::new(Int64Array::from(vec![self.now as i64; batch.num_rows()]))
            } else {
                let t = arrow::compute::cast(
                    batch.column(column),
                    &DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, None),
                )?;
                arrow::compute::cast(&t, &DataType::Int64)?
            };
            let usable = BooleanArray::from(
                (0..batch.num_rows())
                    .map(|r| !time.is_null(r) && key_arrays.iter().all(|k| !k.is_null(r)))
                    .collect::<Vec<_>>(),
            );
            let (batch, key_arrays, time) = if usable.true_count() == batch.num_rows() {
                (batch.clone(), key_arrays, time)
            } else {
                unusable.push(filter_record_batch(batch, &arrow::compute::not(&usable)?)?);
                let keys = key_arrays
                    .iter()
                    .map(|k| arrow::compute::filter(k, &usable))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                (
                    filter_record_batch(batch, &usable)?,
                    keys,
                    arrow::compute::filter(&time, &usable)?,
                )
            };
            if batch.num_rows() == 0 {
                continue;
            }
            let encoded = self.converter.convert_columns(&key_arrays)?;
            let times = time
                .as_primitive::<arrow::datatypes::Int64Type>()
                .values()
                .to_vec();
            let side = if left {
                &mut self.left
            } else {
                &mut self.right
            };
            let seq = side.add(batch, &encoded, times);
            added.push((seq, encoded));
        }
        Ok((added, unusable))
    }

    /// The pairs (left (batch, row), right (batch, row)) that the new rows
    /// of `probe` make with the rows held on the other side whose arrival
    /// number is below `other_limit`.
    fn probe(
        &self,
        probe_left: bool,
        new: &[(u64, arrow::row::Rows)],
        other_limit: u64,
        pairs: &mut Vec<Pair>,
    ) -> Result<()> {
        let (mine, other) = if probe_left {
            (&self.left, &self.right)
        } else {
            (&self.right, &self.left)
        };
        let (lower, upper) = (self.plan.lower_us, self.plan.upper_us);
        for (seq, encoded) in new {
            let Some(held) = mine.batches.get(seq) else {
                continue;
            };
            for row in 0..held.batch.num_rows() {
                let Some(matches) = other.index.get(encoded.row(row).as_ref()) else {
                    continue;
                };
                let t = held.times[row];
                for &(oseq, orow) in matches {
                    if oseq >= other_limit {
                        continue;
                    }
                    let Some(o) = other.batches.get(&oseq) else {
                        continue;
                    };
                    let ot = o.times[orow as usize];
                    let d = if probe_left {
                        t.saturating_sub(ot)
                    } else {
                        ot.saturating_sub(t)
                    };
                    if d < lower || d > upper {
                        continue;
                    }
                    let me = (*seq, row as u32);
                    pairs.push(if probe_left {
                        (me, (oseq, orow))
                    } else {
                        ((oseq, orow), me)
                    });
                }
            }
        }
        Ok(())
    }

    /// The joined rows of `pairs`, filtered by the join's condition, and
    /// the pairs that passed it.
    fn materialize(&self, pairs: Vec<Pair>) -> Result<(RecordBatch, Vec<Pair>)> {
        let schema = &self.plan.schema;
        if pairs.is_empty() {
            return Ok((RecordBatch::new_empty(Arc::clone(schema)), pairs));
        }
        let mut columns = gather(&self.left, pairs.iter().map(|p| p.0))?;
        columns.extend(gather(&self.right, pairs.iter().map(|p| p.1))?);
        let joined = RecordBatch::try_new_with_options(
            Arc::clone(schema),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(pairs.len())),
        )?;
        match &self.plan.filter {
            Some(f) => {
                let mask = as_mask(&eval(f, &joined)?)?;
                let kept = pairs
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask.is_valid(*i) && mask.value(*i))
                    .map(|(_, p)| *p)
                    .collect();
                Ok((filter_record_batch(&joined, &mask)?, kept))
            }
            None => Ok((joined, pairs)),
        }
    }

    /// An outer join's changes besides its pairs (`rows`): counts the
    /// matches of `pairs`; a held row of an outer side that had none before
    /// this micro-batch has its NULL-padded row deleted, a new one that has
    /// none is inserted padded (so are rows whose key is NULL).
    #[allow(clippy::too_many_arguments)]
    fn outer_changes(
        &mut self,
        rows: RecordBatch,
        pairs: &[Pair],
        (left_before, right_before): (u64, u64),
        (left_new, right_new): (&Added, &Added),
        (left_unusable, right_unusable): (Vec<RecordBatch>, Vec<RecordBatch>),
    ) -> Result<RecordBatch> {
        let (left_outer, right_outer) = self.outer();
        let mut deleted: [Vec<RowRef>; 2] = [Vec::new(), Vec::new()];
        for &(l, r) in pairs {
            for (outer, side, at, before, gone) in [
                (left_outer, &mut self.left, l, left_before, 0usize),
                (right_outer, &mut self.right, r, right_before, 1),
            ] {
                if !outer {
                    continue;
                }
                if let Some(b) = side.batches.get_mut(&at.0) {
                    if let Some(c) = b.matches.get_mut(at.1 as usize) {
                        if *c == 0 && at.0 < before {
                            deleted[gone].push(at);
                        }
                        *c = c.saturating_add(1);
                    }
                }
            }
        }
        let mut parts = Vec::new();
        for (left, refs) in [(true, &deleted[0]), (false, &deleted[1])] {
            if !refs.is_empty() {
                parts.push(self.padded(&self.rows_of(left, refs)?, left, "delete")?);
            }
        }
        let mut columns = rows.columns().to_vec();
        columns.push(Arc::new(arrow::array::StringArray::from_iter_values(
            std::iter::repeat_n("insert", rows.num_rows()),
        )));
        parts.push(RecordBatch::try_new_with_options(
            Arc::clone(&self.changes_schema),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(rows.num_rows())),
        )?);
        for (left, outer, new, unusable) in [
            (true, left_outer, left_new, left_unusable),
            (false, right_outer, right_new, right_unusable),
        ] {
            if !outer {
                continue;
            }
            let side = if left { &self.left } else { &self.right };
            let lonely: Vec<RowRef> = new
                .iter()
                .filter_map(|(seq, _)| side.batches.get(seq).map(|b| (*seq, b)))
                .flat_map(|(seq, b)| {
                    b.matches
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| **c == 0)
                        .map(move |(i, _)| (seq, i as u32))
                })
                .collect();
            if !lonely.is_empty() {
                parts.push(self.padded(&self.rows_of(left, &lonely)?, left, "insert")?);
            }
            for rows in unusable {
                parts.push(self.padded(&rows, left, "insert")?);
            }
        }
        Ok(arrow::compute::concat_batches(
            &self.changes_schema,
            &parts,
        )?)
    }

    /// Adds a micro-batch's rows of both inputs, emits the new pairs and
    /// drops the rows no future row can match.
    pub fn process(
        &mut self,
        left: &[RecordBatch],
        right: &[RecordBatch],
        watermark_us: Option<i64>,
    ) -> Result<OperatorOutput> {
        if let (true, Some(ttl)) = (self.plan.regular, self.ttl) {
            if ttl_check(self.now, ttl) {
                // Rows held longer than the TTL match nothing more.
                let before = self.now.saturating_sub(ttl) as i64;
                self.left
                    .drop_before(before, &self.converter, &self.left_keys)?;
                self.right
                    .drop_before(before, &self.converter, &self.right_keys)?;
            }
        }
        let left_before = self.left.next;
        let right_before = self.right.next;
        let (right_new, right_unusable) = self.add(right, false)?;
        let (left_new, left_unusable) = self.add(left, true)?;
        let mut pairs = Vec::new();
        // New left rows against every right row held (new ones included),
        // new right rows against the left rows held before this batch.
        self.probe(true, &left_new, u64::MAX, &mut pairs)?;
        self.probe(false, &right_new, left_before, &mut pairs)?;
        let (rows, pairs) = self.materialize(pairs)?;
        let rows = if self.outer() == (false, false) {
            rows
        } else {
            self.outer_changes(
                rows,
                &pairs,
                (left_before, right_before),
                (&left_new, &right_new),
                (left_unusable, right_unusable),
            )?
        };
        if let Some(wm) = watermark_us.filter(|_| !self.plan.regular) {
            // Rows still to come: left at or after wm - left_lag, right at
            // or after wm - right_lag. A left row at l matches right rows in
            // [l - upper, l - lower]; a right row at r left rows in
            // [r + lower, r + upper].
            let right_from = wm.saturating_sub(self.plan.right_lag_us);
            let left_from = wm.saturating_sub(self.plan.left_lag_us);
            self.left.drop_before(
                right_from.saturating_add(self.plan.lower_us),
                &self.converter,
                &self.left_keys,
            )?;
            self.right.drop_before(
                left_from.saturating_sub(self.plan.upper_us),
                &self.converter,
                &self.right_keys,
            )?;
        }
        let chunks = if rows.num_rows() > 0 {
            vec![(None, rows)]
        } else {
            Vec::new()
        };
        Ok(OperatorOutput { chunks, late: 0 })
    }
}

impl StatefulOperator for IntervalJoinExec {
    fn name(&self) -> &'static str {
        if self.plan.regular {
            "JoinExec"
        } else {
            "IntervalJoinExec"
        }
    }

    fn process(
        &mut self,
        batch: u64,
        inputs: &[Vec<RecordBatch>],
        watermark_us: Option<i64>,
    ) -> Result<OperatorOutput> {
        self.now = batch;
        match inputs {
            [left, right] => IntervalJoinExec::process(self, left, right, watermark_us),
            _ => Err(ExecError::invalid(format!(
                "IntervalJoinExec reads two inputs, not {}",
                inputs.len()
            ))),
        }
    }

    fn state_size(&self) -> StateSize {
        let mut size = self.left.size();
        size += self.right.size();
        size
    }

    /// Always in full: the held rows of both inputs (a regular join's
    /// with the micro-batch they arrived in, a last column).
    fn snapshot(&mut self, _delta_base: Option<u64>) -> Result<OperatorSnapshot> {
        let regular = self.plan.regular;
        let outer = self.outer() != (false, false);
        let rows = |side: &HeldSide| -> Result<Vec<RecordBatch>> {
            side.batches
                .values()
                .map(|b| {
                    if !regular {
                        return Ok(b.batch.clone());
                    }
                    let mut fields: Vec<arrow::datatypes::FieldRef> =
                        b.batch.schema().fields().iter().cloned().collect();
                    fields.push(Arc::new(arrow::datatypes::Field::new(
                        STATE_ARRIVED,
                        DataType::Int64,
                        false,
                    )));
                    let mut columns = b.batch.columns().to_vec();
                    columns.push(Arc::new(Int64Array::from(vec![
                        b.max_time;
                        b.batch.num_rows()
                    ])));
                    if outer {
                        fields.push(Arc::new(arrow::datatypes::Field::new(
                            STATE_MATCHES,
                            DataType::Int64,
                            false,
                        )));
                        columns.push(Arc::new(Int64Array::from_iter_values(
                            b.matches.iter().map(|m| i64::from(*m)),
                        )));
                    }
                    Ok(RecordBatch::try_new(
                        Arc::new(arrow::datatypes::Schema::new(fields)),
                        columns,
                    )?)
                })
                .collect()
        };
        Ok(OperatorSnapshot {
            closed_through: None,
            delta_base: None,
            sections: vec![rows(&self.left)?, rows(&self.right)?],
        })
    }

    fn restore(&mut self, layers: Vec<OperatorSnapshot>, batch: u64) -> Result<()> {
        let widths = [self.left_width(), self.plan.right_input.fields().len()];
        for layer in layers {
            let mut sections = layer.sections.into_iter();
            for (left, width) in [(true, widths[0]), (false, widths[1])] {
                for rows in sections.next().unwrap_or_default() {
                    // A regular join's rows come back with their arrival
                    // batch (checkpoints from before it was kept: the
                    // checkpoint's).
                    self.now = batch;
                    let mut matches = None;
                    let rows = if self.plan.regular && rows.num_columns() > width {
                        let int = |i: usize| {
                            rows.column(i)
                                .as_primitive_opt::<arrow::datatypes::Int64Type>()
                                .ok_or_else(|| {
                                    ExecError::invalid("join state counts are not Int64")
                                })
                        };
                        if let Some(&a) = int(width)?.values().first() {
                            self.now = a.max(0) as u64;
                        }
                        if rows.num_columns() > width + 1 {
                            matches = Some(int(width + 1)?.values().to_vec());
                        }
                        rows.project(&(0..width).collect::<Vec<_>>())?
                    } else {
                        rows
                    };
                    let (added, _) = self.add(std::slice::from_ref(&rows), left)?;
                    // Held rows were usable: they come back one for one.
                    if let (Some(m), Some((seq, _))) = (matches, added.first()) {
                        let side = if left {
                            &mut self.left
                        } else {
                            &mut self.right
                        };
                        if let Some(b) = side.batches.get_mut(seq) {
                            if b.matches.len() == m.len() {
                                b.matches = m
                                    .iter()
                                    .map(|c| (*c).clamp(0, u32::MAX as i64) as u32)
                                    .collect();
                            }
                        }
                    }
                }
            }
        }
        self.now = batch;
        Ok(())
    }

    fn set_state_ttl(&mut self, batches: u64) {
        if self.plan.regular {
            self.ttl = Some(batches.max(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{Field, Schema, TimeUnit};
    use datafusion::physical_expr::expressions::Column;

    fn side(name: &str) -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new(name, DataType::Int64, true),
            Field::new("t", DataType::Timestamp(TimeUnit::Microsecond, None), true),
        ]))
    }

    fn rows(schema: &SchemaRef, rows: &[(Option<i64>, i64)]) -> RecordBatch {
        RecordBatch::try_new(
            Arc::clone(schema),
            vec![
                Arc::new(Int64Array::from(
                    rows.iter().map(|r| r.0).collect::<Vec<_>>(),
                )),
                Arc::new(TimestampMicrosecondArray::from(
                    rows.iter().map(|r| r.1).collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap()
    }

    fn plan(lower_us: i64, upper_us: i64) -> IntervalJoinPlan {
        let (ls, rs) = (side("a"), side("b"));
        let joined = Arc::new(Schema::new(
            ls.fields()
                .iter()
                .chain(rs.fields().iter())
                .map(|f| f.as_ref().clone())
                .collect::<Vec<_>>(),
        ));
        IntervalJoinPlan {
            left_keys: vec![Arc::new(Column::new("a", 0))],
            right_keys: vec![Arc::new(Column::new("b", 0))],
            left_time: 1,
            right_time: 1,
            lower_us,
            upper_us,
            left_lag_us: 0,
            right_lag_us: 0,
            filter: None,
            right_input: rs,
            schema: joined,
            display: String::new(),
            regular: false,
            join_type: JoinType::Inner,
        }
    }

    /// (key, left time, right time) of every output row.
    fn triples(out: &OperatorOutput) -> Vec<(i64, i64, i64)> {
        key_and_times(out, [0, 1, 3])
    }

    /// `SET state_ttl` on a regular join: a row matches rows of the other
    /// side that arrive at most the TTL after it, and its arrival batch
    /// survives a checkpoint.
    #[test]
    fn a_regular_join_drops_rows_held_longer_than_the_ttl() {
        let (ls, rs) = (side("a"), side("b"));
        let mut regular = plan(i64::MIN, i64::MAX);
        regular.regular = true;
        let mut exec = IntervalJoinExec::new(regular.clone()).unwrap();
        exec.set_state_ttl(4);
        let step = |exec: &mut IntervalJoinExec,
                    b: u64,
                    l: &[(Option<i64>, i64)],
                    r: &[(Option<i64>, i64)]| {
            let out =
                StatefulOperator::process(exec, b, &[vec![rows(&ls, l)], vec![rows(&rs, r)]], None)
                    .unwrap();
            triples(&out)
        };
        step(&mut exec, 0, &[(Some(1), 100)], &[]);
        step(&mut exec, 1, &[], &[(Some(2), 7)]);
        assert_eq!(step(&mut exec, 3, &[], &[(Some(1), 5)]), vec![(1, 100, 5)]);
        // Through a checkpoint: the rows keep their arrival batches.
        let snap = exec.snapshot(None).unwrap();
        let mut again = IntervalJoinExec::new(regular).unwrap();
        again.set_state_ttl(4);
        again.restore(vec![snap], 3).unwrap();
        // Batch 6: the left row (batch 0) is older than the TTL, the right
        // row of key 2 (batch 1) too; the right row of key 1 (batch 3) not.
        assert_eq!(
            step(&mut again, 6, &[(Some(2), 200)], &[(Some(1), 9)]),
            vec![]
        );
        assert_eq!(again.held_rows(), 3, "two right rows and the new left row");
        assert_eq!(
            step(&mut again, 7, &[(Some(1), 300)], &[]),
            vec![(1, 300, 5), (1, 300, 9)]
        );
    }

    /// A full outer join: unmatched rows of both sides come padded with
    /// NULLs, and go (a delete) at their first match only, also when that
    /// match comes after a checkpoint was restored.
    #[test]
    fn a_full_join_pads_unmatched_rows_and_takes_them_back_once() {
        let (ls, rs) = (side("a"), side("b"));
        let mut full = plan(i64::MIN, i64::MAX);
        full.regular = true;
        full.join_type = JoinType::Full;
        // (a, b, op) of every output row.
        let changes = |out: &OperatorOutput| {
            let mut v = Vec::new();
            for (_, b) in &out.chunks {
                let a = b.column(0).as_primitive::<arrow::datatypes::Int64Type>();
                let r = b.column(2).as_primitive::<arrow::datatypes::Int64Type>();
                let op = b.column(4).as_string::<i32>();
                for i in 0..b.num_rows() {
                    let get = |x: &Int64Array| x.is_valid(i).then(|| x.value(i));
                    v.push((get(a), get(r), op.value(i).to_string()));
                }
            }
            v.sort();
            v
        };
        let step = |exec: &mut IntervalJoinExec,
                    b: u64,
                    l: &[(Option<i64>, i64)],
                    r: &[(Option<i64>, i64)]| {
            let out =
                StatefulOperator::process(exec, b, &[vec![rows(&ls, l)], vec![rows(&rs, r)]], None)
                    .unwrap();
            changes(&out)
        };
        let ins = |a: Option<i64>, b: Option<i64>| (a, b, "insert".to_string());
        let del = |a: Option<i64>, b: Option<i64>| (a, b, "delete".to_string());
        let mut exec = IntervalJoinExec::new(full.clone()).unwrap();
        assert_eq!(
            step(
                &mut exec,
                0,
                &[(Some(1), 0), (Some(2), 0), (None, 0)],
                &[(Some(2), 0), (Some(3), 0)]
            ),
            vec![
                ins(None, None),
                ins(None, Some(3)),
                ins(Some(1), None),
                ins(Some(2), Some(2))
            ]
        );
        let snap = exec.snapshot(None).unwrap();
        let mut exec = IntervalJoinExec::new(full).unwrap();
        exec.restore(vec![snap], 0).unwrap();
        // Key 1's left row and key 3's right row meet their first match;
        // key 2's left row had one already.
        assert_eq!(
            step(&mut exec, 1, &[(Some(3), 0)], &[(Some(1), 0), (Some(2), 0)]),
            vec![
                del(None, Some(3)),
                del(Some(1), None),
                ins(Some(1), Some(1)),
                ins(Some(2), Some(2)),
                ins(Some(3), Some(3)),
            ]
        );
        // A second match of key 1 deletes nothing.
        assert_eq!(
            step(&mut exec, 2, &[], &[(Some(1), 0)]),
            vec![ins(Some(1), Some(1))]
        );
    }

    #[test]
    fn every_pair_once_whatever_the_batching_and_state_stays_bounded() {
        // Rows in event-time order on both sides; keys 0..3. The model: every
        // (l, r) with equal non-NULL keys and l - r in [-3, 1].
        let (ls, rs) = (side("a"), side("b"));
        let left: Vec<(Option<i64>, i64)> = (0..60)
            .map(|i| (if i % 7 == 0 { None } else { Some(i % 3) }, i * 2))
            .collect();
        let right: Vec<(Option<i64>, i64)> = (0..40).map(|i| (Some(i % 4), i * 3)).collect();
        let mut model = Vec::new();
        for l in &left {
            for r in &right {
                if let Some(k) = l.0 {
                    if Some(k) == r.0 && (-3..=1).contains(&(l.1 - r.1)) {
                        model.push((k, l.1, r.1));
                    }
                }
            }
        }
        model.sort();
        assert!(model.len() > 10);
        for step in [1usize, 5, 17, 200] {
            let mut exec = IntervalJoinExec::new(plan(-3, 1)).unwrap();
            let mut got = Vec::new();
            let mut max_held = 0;
            let mut t = 0;
            while t <= 130 {
                let until = t + step as i64;
                let l: Vec<_> = left
                    .iter()
                    .filter(|r| r.1 >= t && r.1 < until)
                    .copied()
                    .collect();
                let r: Vec<_> = right
                    .iter()
                    .filter(|r| r.1 >= t && r.1 < until)
                    .copied()
                    .collect();
                // The watermark: every row before `until` has arrived.
                let out = exec
                    .process(&[rows(&ls, &l)], &[rows(&rs, &r)], Some(until))
                    .unwrap();
                got.extend(triples(&out));
                max_held = max_held.max(exec.held_rows());
                t = until;
            }
            got.sort();
            assert_eq!(got, model, "batches of {step}");
            if step < 10 {
                assert!(max_held < 20, "held {max_held} rows with batches of {step}");
            }
        }
    }

    #[test]
    fn snapshot_and_restore_keep_the_pairs_to_come() {
        let (ls, rs) = (side("a"), side("b"));
        let mut exec = IntervalJoinExec::new(plan(-10, 0)).unwrap();
        exec.process(&[rows(&ls, &[(Some(1), 5)])], &[], Some(5))
            .unwrap();
        let snap = StatefulOperator::snapshot(&mut exec, None).unwrap();
        let mut back = IntervalJoinExec::new(plan(-10, 0)).unwrap();
        back.restore(vec![snap], 1).unwrap();
        let out = back
            .process(&[], &[rows(&rs, &[(Some(1), 10), (Some(2), 10)])], Some(10))
            .unwrap();
        assert_eq!(triples(&out), vec![(1, 5, 10)]);
        // The watermark passed the left row's interval: it is gone.
        back.process(&[], &[], Some(30)).unwrap();
        assert_eq!(back.held_rows(), 0);
    }
}
