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
    /// Memory of the arrays of `batches` (kept as they come and go:
    /// walking them per micro-batch cost a tenth of a join's time).
    batch_bytes: u64,
    /// Index entries that point at dropped batches.
    stale: u64,
    /// What `index` holds, in bytes (kept as it changes: summing it per
    /// micro-batch would cost as much as the join).
    index_bytes: u64,
    /// A weighted join's live rows by the hash of their columns: where a
    /// retraction finds the row it takes back.
    by_hash: HashMap<u64, Vec<RowRef>>,
    /// Rows of held batches whose weight went to 0 (a weighted join's).
    dead: u64,
    /// The outer side of a weighted outer join: rows keep `matched`.
    tracks_matches: bool,
}

/// The bytes an index entry costs besides its rows: the key and the map's
/// own overhead.
fn index_entry_bytes(key: &[u8]) -> u64 {
    key.len() as u64 + 48
}

/// A weighted join compacts a side once more than this many of its held
/// rows are dead (and more than half of them).
const COMPACT_MIN_DEAD: u64 = if cfg!(test) { 16 } else { 1024 };

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
    /// The micro-batch it was added in: a checkpoint delta holds the
    /// batches added after its base.
    arrived: u64,
    /// The time column, µs.
    times: Vec<i64>,
    /// The largest of `times`: the batch is dropped once it is too old.
    max_time: i64,
    /// Per row, how many pairs it made (an outer side's rows: a row with
    /// none was emitted padded with NULLs).
    matches: Vec<u32>,
    /// A weighted join's: per row, its weight (0: taken back) and the hash
    /// of its columns; empty otherwise.
    weights: Vec<i64>,
    hashes: Vec<u64>,
    /// Rows whose weight is not 0 (all rows of an unweighted join's).
    live: usize,
    /// A weighted outer join's outer side: per row, the sum of the weights
    /// of the other side's rows it pairs with (0: it is emitted padded
    /// with NULLs); empty otherwise.
    matched: Vec<i64>,
}

impl HeldSide {
    /// Adds `batch` (no NULL key or time left in it) with its encoded keys
    /// and times; returns its arrival number.
    fn add(
        &mut self,
        batch: RecordBatch,
        arrived: u64,
        keys: &arrow::row::Rows,
        times: Vec<i64>,
        (weights, hashes): (Vec<i64>, Vec<u64>),
    ) -> u64 {
        let seq = self.next;
        self.next += 1;
        for row in 0..batch.num_rows() {
            self.index_row(keys.row(row).as_ref(), seq, row as u32);
        }
        for (row, h) in hashes.iter().enumerate() {
            self.by_hash.entry(*h).or_default().push((seq, row as u32));
        }
        self.rows += batch.num_rows() as u64;
        self.batch_bytes += batch.get_array_memory_size() as u64;
        let max_time = times.iter().copied().max().unwrap_or(i64::MIN);
        self.batches.insert(
            seq,
            HeldBatch {
                matches: vec![0; batch.num_rows()],
                matched: if self.tracks_matches {
                    vec![0; batch.num_rows()]
                } else {
                    Vec::new()
                },
                live: batch.num_rows(),
                batch,
                arrived,
                times,
                max_time,
                weights,
                hashes,
            },
        );
        seq
    }

    /// The weight of held row `at` (1 in an unweighted join; 0 once taken
    /// back or dropped).
    fn weight(&self, at: RowRef) -> i64 {
        match self.batches.get(&at.0) {
            Some(b) if b.weights.is_empty() => 1,
            Some(b) => b.weights.get(at.1 as usize).copied().unwrap_or(0),
            None => 0,
        }
    }

    /// A weighted join: merges each row of batch `seq` into an older live
    /// row with the same columns and a weight of the opposite sign (a
    /// retraction takes back the row it names, an insertion cancels an
    /// earlier retraction), so only rows that are still there stay held.
    fn cancel(&mut self, seq: u64) -> Result<()> {
        let Some(b) = self.batches.get(&seq) else {
            return Ok(());
        };
        let n = b.batch.num_rows();
        for row in 0..n {
            let Some(b) = self.batches.get(&seq) else {
                break;
            };
            let (w, h) = (b.weights[row], b.hashes[row]);
            if w == 0 {
                continue;
            }
            let me = (seq, row as u32);
            let Some(candidates) = self.by_hash.get(&h) else {
                continue;
            };
            let mut found = None;
            for &other in candidates {
                if other == me || self.weight(other).signum() != -w.signum() {
                    continue;
                }
                if self.same_row(other, me)? {
                    found = Some(other);
                    break;
                }
            }
            let Some(other) = found else { continue };
            let ow = self.weight(other);
            // The older row keeps what is left of both.
            self.set_weight(me, 0);
            self.set_weight(other, ow + w);
        }
        Ok(())
    }

    /// Whether held rows `a` and `b` have equal columns.
    fn same_row(&self, a: RowRef, b: RowRef) -> Result<bool> {
        let (Some(ba), Some(bb)) = (self.batches.get(&a.0), self.batches.get(&b.0)) else {
            return Ok(false);
        };
        for (ca, cb) in ba.batch.columns().iter().zip(bb.batch.columns()) {
            let x = ca.slice(a.1 as usize, 1);
            let y = cb.slice(b.1 as usize, 1);
            if x.data_type() != y.data_type() || x.to_data() != y.to_data() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Sets held row `at`'s weight; a row that reaches 0 is dead (matches
    /// nothing, is no longer found by its hash), a batch with no live row
    /// is dropped.
    fn set_weight(&mut self, at: RowRef, w: i64) {
        let Some(b) = self.batches.get_mut(&at.0) else {
            return;
        };
        let Some(slot) = b.weights.get_mut(at.1 as usize) else {
            return;
        };
        let was = *slot;
        *slot = w;
        if was == 0 || w != 0 {
            return;
        }
        b.live -= 1;
        let h = b.hashes[at.1 as usize];
        if let Some(refs) = self.by_hash.get_mut(&h) {
            refs.retain(|r| *r != at);
            if refs.is_empty() {
                self.by_hash.remove(&h);
            }
        }
        if b.live == 0 {
            if let Some(gone) = self.batches.remove(&at.0) {
                let n = gone.batch.num_rows() as u64;
                self.batch_bytes = self
                    .batch_bytes
                    .saturating_sub(gone.batch.get_array_memory_size() as u64);
                self.rows -= n;
                self.stale += n;
                self.dead -= n - 1;
            }
        } else {
            self.dead += 1;
        }
    }

    /// A weighted join: once most held rows are dead, holds only the live
    /// ones (new batches, a new index).
    fn compact(&mut self, converter: &RowConverter, keys: &KeyEval) -> Result<()> {
        if self.dead <= (self.rows / 2).max(COMPACT_MIN_DEAD) {
            return Ok(());
        }
        let old = std::mem::take(&mut self.batches);
        let next = self.next;
        *self = HeldSide {
            next,
            tracks_matches: self.tracks_matches,
            ..HeldSide::default()
        };
        for (_, b) in old {
            let live = BooleanArray::from(b.weights.iter().map(|w| *w != 0).collect::<Vec<_>>());
            let pick = |v: &[i64]| -> Vec<i64> {
                v.iter()
                    .zip(&b.weights)
                    .filter(|(_, w)| **w != 0)
                    .map(|(x, _)| *x)
                    .collect()
            };
            let times = pick(&b.times);
            let weights = pick(&b.weights);
            let matched = pick(&b.matched);
            let hashes: Vec<u64> = b
                .hashes
                .iter()
                .zip(&b.weights)
                .filter(|(_, w)| **w != 0)
                .map(|(h, _)| *h)
                .collect();
            let batch = filter_record_batch(&b.batch, &live)?;
            let encoded = converter.convert_columns(&keys.eval(&batch)?)?;
            let seq = self.add(batch, b.arrived, &encoded, times, (weights, hashes));
            if let Some(held) = self.batches.get_mut(&seq) {
                if held.matched.len() == matched.len() {
                    held.matched = matched;
                }
            }
        }
        Ok(())
    }

    /// Drops the batches whose every row is older than `before` (µs), and
    /// rebuilds the index once most of it points at dropped rows. With
    /// `unmatched`, returns the dropped rows that made no pair (an outer
    /// side's, to be padded).
    fn drop_before(
        &mut self,
        before: i64,
        converter: &RowConverter,
        keys: &KeyEval,
        unmatched: bool,
    ) -> Result<Vec<RecordBatch>> {
        let old: Vec<u64> = self
            .batches
            .iter()
            .filter(|(_, b)| b.max_time < before)
            .map(|(seq, _)| *seq)
            .collect();
        let mut lonely = Vec::new();
        for seq in old {
            if let Some(b) = self.batches.remove(&seq) {
                if unmatched && b.matches.contains(&0) {
                    let mask =
                        BooleanArray::from(b.matches.iter().map(|m| *m == 0).collect::<Vec<_>>());
                    lonely.push(filter_record_batch(&b.batch, &mask)?);
                }
                let n = b.batch.num_rows() as u64;
                self.batch_bytes = self
                    .batch_bytes
                    .saturating_sub(b.batch.get_array_memory_size() as u64);
                self.rows -= n;
                self.stale += n;
                self.dead -= (b.batch.num_rows() - b.live) as u64;
            }
        }
        if self.stale > self.rows.max(1024) {
            self.index.clear();
            self.index_bytes = 0;
            self.stale = 0;
            self.by_hash.clear();
            for (seq, held) in &self.batches {
                for (row, h) in held.hashes.iter().enumerate() {
                    if held.weights[row] != 0 {
                        self.by_hash.entry(*h).or_default().push((*seq, row as u32));
                    }
                }
            }
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
        Ok(lonely)
    }

    fn size(&self) -> StateSize {
        let weighted = self
            .batches
            .values()
            .next()
            .is_some_and(|b| !b.weights.is_empty());
        StateSize {
            bytes: self.batch_bytes
                + self.rows * if weighted { 12 + 16 + 40 } else { 12 }
                + self.index_bytes,
            keys: self.rows - self.dead,
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
    /// A weighted join's output rows in row format (to consolidate them).
    out_rows: Option<RowConverter>,
    /// What the held rows were last dropped by: the watermark (µs) of an
    /// interval join, the `state_ttl` cut-off micro-batch of a regular
    /// join. Checkpoints keep it, so a restore laying a delta over older
    /// rows drops the ones dropped since.
    horizon: Option<i64>,
}

/// Name of the column a regular join's checkpointed rows carry their
/// arrival micro-batch in (for `SET state_ttl`).
pub const STATE_ARRIVED: &str = "__drizzle_arrived";

/// Name of the column an outer join's checkpointed rows carry their match
/// counts in (after [`STATE_ARRIVED`]).
pub const STATE_MATCHES: &str = "__drizzle_matches";

/// Name of the column a weighted join's checkpointed rows carry their
/// weights in (after [`STATE_ARRIVED`]).
pub const STATE_WEIGHT: &str = "__drizzle_weight";

/// The hasher a weighted join finds equal rows with (only within one
/// process: hashes are not checkpointed).
fn row_hash_state() -> datafusion::common::hash_utils::RandomState {
    datafusion::common::hash_utils::RandomState::with_seed(0x6a6f_696e_5f72_6f77)
}

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
            left: HeldSide {
                tracks_matches: plan.weighted
                    && matches!(plan.join_type, JoinType::Left | JoinType::Full),
                ..HeldSide::default()
            },
            right: HeldSide {
                tracks_matches: plan.weighted
                    && matches!(plan.join_type, JoinType::Right | JoinType::Full),
                ..HeldSide::default()
            },
            plan,
            ttl: None,
            now: 0,
            out_rows: None,
            horizon: None,
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

    /// `rows` of one side padded with NULLs for the other, with `op` (a
    /// change stream's) or without (an outer interval join's append-only
    /// output).
    fn padded(&self, rows: &RecordBatch, left: bool, op: Option<&str>) -> Result<RecordBatch> {
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
        let schema = match op {
            Some(op) => {
                columns.push(Arc::new(arrow::array::StringArray::from_iter_values(
                    std::iter::repeat_n(op, n),
                )));
                &self.changes_schema
            }
            None => &self.plan.schema,
        };
        Ok(RecordBatch::try_new_with_options(
            Arc::clone(schema),
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
        let weighted = self.plan.weighted;
        for batch in batches.iter().filter(|b| b.num_rows() > 0) {
            // A weighted join's rows end with their weight; a row whose
            // weight is 0 changes nothing.
            let weights: Option<Int64Array> = if weighted {
                let w = batch
                    .columns()
                    .last()
                    .and_then(|c| c.as_primitive_opt::<arrow::datatypes::Int64Type>())
                    .ok_or_else(|| ExecError::invalid("a weighted join's rows have no weight"))?;
                Some(w.clone())
            } else {
                None
            };
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
                    .map(|r| {
                        !time.is_null(r)
                            && key_arrays.iter().all(|k| !k.is_null(r))
                            && weights.as_ref().is_none_or(|w| w.value(r) != 0)
                    })
                    .collect::<Vec<_>>(),
            );
            let (batch, key_arrays, time) = if usable.true_count() == batch.num_rows() {
                (batch.clone(), key_arrays, time)
            } else {
                // Rows that can never match: an outer side emits them
                // padded (a weighted join's with their weights).
                let never = if weighted {
                    let w = weights
                        .as_ref()
                        .ok_or_else(|| ExecError::invalid("no weights"))?;
                    BooleanArray::from(
                        (0..batch.num_rows())
                            .map(|r| !usable.value(r) && w.value(r) != 0)
                            .collect::<Vec<_>>(),
                    )
                } else {
                    arrow::compute::not(&usable)?
                };
                unusable.push(filter_record_batch(batch, &never)?);
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
            let (batch, weighing) = if weighted {
                let width = batch.num_columns() - 1;
                let w = batch
                    .column(width)
                    .as_primitive::<arrow::datatypes::Int64Type>()
                    .values()
                    .to_vec();
                let data = batch.project(&(0..width).collect::<Vec<_>>())?;
                let mut hashes = vec![0; data.num_rows()];
                datafusion::common::hash_utils::create_hashes(
                    data.columns(),
                    &row_hash_state(),
                    &mut hashes,
                )?;
                (data, (w, hashes))
            } else {
                (batch, (Vec::new(), Vec::new()))
            };
            let side = if left {
                &mut self.left
            } else {
                &mut self.right
            };
            let seq = side.add(batch, self.now, &encoded, times, weighing);
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
            let weighted = !held.weights.is_empty();
            for row in 0..held.batch.num_rows() {
                if weighted && held.weights[row] == 0 {
                    continue;
                }
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
                    if weighted && o.weights.get(orow as usize).is_none_or(|w| *w == 0) {
                        continue;
                    }
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

    /// A weighted join's pairs `rows` as changes: each pair's weight is
    /// the product of its rows' weights; a pair of weight w is emitted |w|
    /// times, `insert` when w > 0, `delete` when w < 0.
    fn weighted_changes(
        &mut self,
        rows: RecordBatch,
        pairs: &[Pair],
        padded: Vec<(RecordBatch, Vec<i64>)>,
    ) -> Result<RecordBatch> {
        // Consolidated: equal rows' weights add up (a pair taken back and
        // made again in one micro-batch emits nothing).
        let mut weights: Vec<i64> = pairs
            .iter()
            .map(|&(l, r)| self.left.weight(l).saturating_mul(self.right.weight(r)))
            .collect();
        let rows = if padded.is_empty() {
            rows
        } else {
            let mut parts = vec![rows];
            for (b, w) in padded {
                parts.push(b);
                weights.extend(w);
            }
            arrow::compute::concat_batches(&self.plan.schema, &parts)?
        };
        if rows.num_rows() > 1 {
            if self.out_rows.is_none() {
                self.out_rows = Some(RowConverter::new(
                    rows.schema()
                        .fields()
                        .iter()
                        .map(|f| SortField::new(f.data_type().clone()))
                        .collect(),
                )?);
            }
            let converter = self
                .out_rows
                .as_ref()
                .ok_or_else(|| ExecError::invalid("no output row format"))?;
            let encoded = converter.convert_columns(rows.columns())?;
            let mut first: HashMap<arrow::row::Row<'_>, usize> = HashMap::new();
            for i in 0..rows.num_rows() {
                let at = *first.entry(encoded.row(i)).or_insert(i);
                if at != i {
                    weights[at] = weights[at].saturating_add(weights[i]);
                    weights[i] = 0;
                }
            }
        }
        let mut take_rows: Vec<u32> = Vec::with_capacity(pairs.len());
        let mut ops: Vec<&str> = Vec::with_capacity(pairs.len());
        for (i, &w) in weights.iter().enumerate() {
            for _ in 0..w.unsigned_abs().min(u32::MAX as u64) {
                take_rows.push(i as u32);
                ops.push(if w > 0 { "insert" } else { "delete" });
            }
        }
        let identity = take_rows.len() == rows.num_rows()
            && take_rows.iter().enumerate().all(|(i, t)| *t as usize == i);
        let rows = if identity {
            rows
        } else {
            take_record_batch(&rows, &UInt32Array::from(take_rows))?
        };
        let mut columns = rows.columns().to_vec();
        columns.push(Arc::new(arrow::array::StringArray::from_iter_values(ops)));
        Ok(RecordBatch::try_new_with_options(
            Arc::clone(&self.changes_schema),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(rows.num_rows())),
        )?)
    }

    /// A weighted outer join's padded rows (the plan's columns, NULLs for
    /// the other side) and their weights: adds the other side's weights to
    /// each outer row's `matched` for the pairs it made; a row whose
    /// padded presence changed (it is new, taken back, or its matches went
    /// to or from 0) emits the difference. Rows that can never match
    /// (`unusable`, a NULL key) are padded with their own weights.
    fn weighted_outer_changes(
        &mut self,
        pairs: &[Pair],
        (left_before, right_before): (u64, u64),
        (left_new, right_new): (&Added, &Added),
        (left_unusable, right_unusable): (Vec<RecordBatch>, Vec<RecordBatch>),
    ) -> Result<Vec<(RecordBatch, Vec<i64>)>> {
        let (left_outer, right_outer) = self.outer();
        let mut out = Vec::new();
        // Present padded: the row's weight while nothing matches it.
        let padded_weight = |w: i64, m: i64| if m == 0 { w } else { 0 };
        for (left, outer, before, new, unusable) in [
            (true, left_outer, left_before, left_new, left_unusable),
            (false, right_outer, right_before, right_new, right_unusable),
        ] {
            if !outer {
                continue;
            }
            // Old rows touched by this micro-batch's pairs: their padded
            // weight before.
            let mut was: HashMap<RowRef, i64> = HashMap::new();
            for &(l, r) in pairs {
                let (me, other) = if left { (l, r) } else { (r, l) };
                let ow = if left {
                    self.right.weight(other)
                } else {
                    self.left.weight(other)
                };
                let side = if left {
                    &mut self.left
                } else {
                    &mut self.right
                };
                let Some(b) = side.batches.get_mut(&me.0) else {
                    continue;
                };
                let i = me.1 as usize;
                let (Some(m), Some(&w)) = (b.matched.get_mut(i), b.weights.get(i)) else {
                    continue;
                };
                if me.0 < before {
                    was.entry(me).or_insert(padded_weight(w, *m));
                }
                *m = m.saturating_add(ow);
            }
            let side = if left { &self.left } else { &self.right };
            let mut refs: Vec<RowRef> = Vec::new();
            let mut deltas: Vec<i64> = Vec::new();
            let now = |at: RowRef| -> i64 {
                side.batches
                    .get(&at.0)
                    .and_then(|b| {
                        Some(padded_weight(
                            *b.weights.get(at.1 as usize)?,
                            *b.matched.get(at.1 as usize)?,
                        ))
                    })
                    .unwrap_or(0)
            };
            for (at, before_w) in was {
                let d = now(at) - before_w;
                if d != 0 {
                    refs.push(at);
                    deltas.push(d);
                }
            }
            for (seq, _) in new.iter() {
                let n = side.batches.get(seq).map_or(0, |b| b.batch.num_rows());
                for row in 0..n {
                    let d = now((*seq, row as u32));
                    if d != 0 {
                        refs.push((*seq, row as u32));
                        deltas.push(d);
                    }
                }
            }
            if !refs.is_empty() {
                let rows = self.padded(&self.rows_of(left, &refs)?, left, Some("insert"))?;
                let width = rows.num_columns() - 1;
                out.push((rows.project(&(0..width).collect::<Vec<_>>())?, deltas));
            }
            for rows in unusable {
                // The weight is the input's last column.
                let width = rows.num_columns() - 1;
                let w = rows
                    .column(width)
                    .as_primitive_opt::<arrow::datatypes::Int64Type>()
                    .ok_or_else(|| ExecError::invalid("a weighted join's rows have no weight"))?
                    .values()
                    .to_vec();
                let data = rows.project(&(0..width).collect::<Vec<_>>())?;
                let padded = self.padded(&data, left, Some("insert"))?;
                let pw = padded.num_columns() - 1;
                out.push((padded.project(&(0..pw).collect::<Vec<_>>())?, w));
            }
        }
        Ok(out)
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
                parts.push(self.padded(&self.rows_of(left, refs)?, left, Some("delete"))?);
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
                parts.push(self.padded(&self.rows_of(left, &lonely)?, left, Some("insert"))?);
            }
            for rows in unusable {
                parts.push(self.padded(&rows, left, Some("insert"))?);
            }
        }
        Ok(arrow::compute::concat_batches(
            &self.changes_schema,
            &parts,
        )?)
    }

    /// Drops the held rows that no row still to come can match:
    /// `horizon` is the watermark (µs) of an interval join, the first
    /// micro-batch a regular join's rows must have arrived in to stay
    /// (`state_ttl`). An outer interval join returns the dropped rows of
    /// its outer sides that matched nothing, padded with NULLs: nothing can
    /// match them any more.
    fn drop_to(&mut self, horizon: i64) -> Result<Vec<RecordBatch>> {
        self.horizon = Some(self.horizon.map_or(horizon, |h| h.max(horizon)));
        if self.plan.regular {
            self.left
                .drop_before(horizon, &self.converter, &self.left_keys, false)?;
            self.right
                .drop_before(horizon, &self.converter, &self.right_keys, false)?;
            return Ok(Vec::new());
        }
        let (left_outer, right_outer) = if self.plan.weighted {
            (false, false)
        } else {
            self.outer()
        };
        // Rows still to come: left at or after wm - left_lag, right at
        // or after wm - right_lag. A left row at l matches right rows in
        // [l - upper, l - lower]; a right row at r left rows in
        // [r + lower, r + upper].
        let right_from = horizon.saturating_sub(self.plan.right_lag_us);
        let left_from = horizon.saturating_sub(self.plan.left_lag_us);
        let left = self.left.drop_before(
            right_from.saturating_add(self.plan.lower_us),
            &self.converter,
            &self.left_keys,
            left_outer,
        )?;
        let right = self.right.drop_before(
            left_from.saturating_sub(self.plan.upper_us),
            &self.converter,
            &self.right_keys,
            right_outer,
        )?;
        let mut padded = Vec::with_capacity(left.len() + right.len());
        for (is_left, rows) in left
            .iter()
            .map(|r| (true, r))
            .chain(right.iter().map(|r| (false, r)))
        {
            padded.push(self.padded(rows, is_left, None)?);
        }
        Ok(padded)
    }

    /// An outer interval join's matches: counts them on the outer sides'
    /// held rows (a row padded when dropped is one that made none).
    fn count_matches(&mut self, pairs: &[Pair]) {
        let (left_outer, right_outer) = self.outer();
        for &(l, r) in pairs {
            for (outer, side, at) in [
                (left_outer, &mut self.left, l),
                (right_outer, &mut self.right, r),
            ] {
                if let Some(c) = outer
                    .then(|| side.batches.get_mut(&at.0))
                    .flatten()
                    .and_then(|b| b.matches.get_mut(at.1 as usize))
                {
                    *c = c.saturating_add(1);
                }
            }
        }
    }

    /// Whether checkpoints of this join may be deltas: its held rows are
    /// only ever added and dropped by `drop_to`, never changed (a
    /// weighted join's weights and an outer join's match counts change).
    pub fn writes_deltas(plan: &IntervalJoinPlan) -> bool {
        !plan.weighted && matches!(plan.join_type, JoinType::Inner)
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
                self.drop_to(self.now.saturating_sub(ttl) as i64)?;
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
        let rows = if self.plan.weighted {
            let padded = self.weighted_outer_changes(
                &pairs,
                (left_before, right_before),
                (&left_new, &right_new),
                (left_unusable, right_unusable),
            )?;
            let rows = self.weighted_changes(rows, &pairs, padded)?;
            // Then each new row takes back the held row it retracts.
            for (seq, _) in &right_new {
                self.right.cancel(*seq)?;
            }
            for (seq, _) in &left_new {
                self.left.cancel(*seq)?;
            }
            self.left.compact(&self.converter, &self.left_keys)?;
            self.right.compact(&self.converter, &self.right_keys)?;
            rows
        } else if self.outer() == (false, false) {
            rows
        } else if !self.plan.regular {
            // Append-only: the pairs now, a row whose key or time is NULL
            // padded now, a row that matched nothing padded when dropped.
            self.count_matches(&pairs);
            let (left_outer, right_outer) = self.outer();
            let mut parts = vec![rows];
            for (left, outer, unusable) in [
                (true, left_outer, left_unusable),
                (false, right_outer, right_unusable),
            ] {
                for rows in unusable.iter().filter(|_| outer) {
                    parts.push(self.padded(rows, left, None)?);
                }
            }
            arrow::compute::concat_batches(&self.plan.schema, &parts)?
        } else {
            self.outer_changes(
                rows,
                &pairs,
                (left_before, right_before),
                (&left_new, &right_new),
                (left_unusable, right_unusable),
            )?
        };
        let rows = match watermark_us.filter(|_| !self.plan.regular) {
            Some(wm) => {
                let padded = self.drop_to(wm)?;
                if padded.is_empty() {
                    rows
                } else {
                    let mut parts = vec![rows];
                    parts.extend(padded);
                    arrow::compute::concat_batches(&self.plan.schema, &parts)?
                }
            }
            None => rows,
        };
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

    /// The held rows of both inputs (a regular join's with the micro-batch
    /// they arrived in, a last column) and the horizon they were last
    /// dropped by. A delta of `delta_base` where [`Self::writes_deltas`]:
    /// only the rows added after that micro-batch; a restore lays it over
    /// the older rows and drops those the horizon has passed since.
    fn snapshot(&mut self, delta_base: Option<u64>) -> Result<OperatorSnapshot> {
        let regular = self.plan.regular;
        let outer = self.outer() != (false, false);
        let weighted = self.plan.weighted;
        let delta_base = delta_base.filter(|_| Self::writes_deltas(&self.plan));
        let since = delta_base.unwrap_or(0);
        let rows = |side: &HeldSide| -> Result<Vec<RecordBatch>> {
            side.batches
                .values()
                .filter(|b| delta_base.is_none() || b.arrived > since)
                .map(|b| {
                    // An interval join's rows carry their times; an outer
                    // one's also their match counts, as a regular join's.
                    if !regular && !outer {
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
                    if weighted {
                        fields.push(Arc::new(arrow::datatypes::Field::new(
                            STATE_WEIGHT,
                            DataType::Int64,
                            false,
                        )));
                        columns.push(Arc::new(Int64Array::from(b.weights.clone())));
                    }
                    if outer {
                        // A weighted join's outer rows: the weights they
                        // are matched by; else match counts.
                        fields.push(Arc::new(arrow::datatypes::Field::new(
                            STATE_MATCHES,
                            DataType::Int64,
                            false,
                        )));
                        columns.push(if weighted {
                            Arc::new(Int64Array::from(if b.matched.is_empty() {
                                vec![0; b.batch.num_rows()]
                            } else {
                                b.matched.clone()
                            }))
                        } else {
                            Arc::new(Int64Array::from_iter_values(
                                b.matches.iter().map(|m| i64::from(*m)),
                            ))
                        });
                    }
                    Ok(RecordBatch::try_new(
                        Arc::new(arrow::datatypes::Schema::new(fields)),
                        columns,
                    )?)
                })
                .collect()
        };
        Ok(OperatorSnapshot {
            closed_through: self.horizon,
            delta_base,
            sections: vec![rows(&self.left)?, rows(&self.right)?],
        })
    }

    fn restore(&mut self, layers: Vec<OperatorSnapshot>, batch: u64) -> Result<()> {
        let widths = [self.left_width(), self.plan.right_input.fields().len()];
        // Rows of a delta chain's older layers that were dropped before
        // its last one go again (every partition's horizon is the same: the
        // watermark and the micro-batch are the query's).
        let horizon = layers.iter().filter_map(|l| l.closed_through).max();
        for layer in layers {
            let mut sections = layer.sections.into_iter();
            for (left, width) in [(true, widths[0]), (false, widths[1])] {
                for rows in sections.next().unwrap_or_default() {
                    // A regular join's rows come back with their arrival
                    // batch (checkpoints from before it was kept: the
                    // checkpoint's).
                    self.now = batch;
                    let mut matches = None;
                    let mut weighted_matched: Option<Vec<i64>> = None;
                    let with_counts = self.plan.regular || self.outer() != (false, false);
                    let rows = if with_counts && rows.num_columns() > width {
                        let int = |i: usize| {
                            rows.column(i)
                                .as_primitive_opt::<arrow::datatypes::Int64Type>()
                                .ok_or_else(|| {
                                    ExecError::invalid("join state counts are not Int64")
                                })
                        };
                        if let Some(&a) = int(width)?.values().first().filter(|_| self.plan.regular)
                        {
                            self.now = a.max(0) as u64;
                        }
                        if self.plan.weighted {
                            // The rows with their weights last, as they
                            // arrive; dead ones are left out.
                            let mut keep: Vec<usize> = (0..width).collect();
                            keep.push(width + 1);
                            if rows.num_columns() <= width + 1 {
                                return Err(ExecError::invalid(
                                    "a weighted join's checkpoint has no weights",
                                ));
                            }
                            let live = BooleanArray::from(
                                int(width + 1)?
                                    .values()
                                    .iter()
                                    .map(|w| *w != 0)
                                    .collect::<Vec<_>>(),
                            );
                            if rows.num_columns() > width + 2 {
                                let m = arrow::compute::filter(int(width + 2)?, &live)?;
                                weighted_matched = Some(
                                    m.as_primitive::<arrow::datatypes::Int64Type>()
                                        .values()
                                        .to_vec(),
                                );
                            }
                            filter_record_batch(&rows.project(&keep)?, &live)?
                        } else {
                            if rows.num_columns() > width + 1 {
                                matches = Some(int(width + 1)?.values().to_vec());
                            }
                            rows.project(&(0..width).collect::<Vec<_>>())?
                        }
                    } else {
                        rows
                    };
                    let (added, _) = self.add(std::slice::from_ref(&rows), left)?;
                    if let (Some(m), Some((seq, _))) = (weighted_matched, added.first()) {
                        let side = if left {
                            &mut self.left
                        } else {
                            &mut self.right
                        };
                        if let Some(b) = side.batches.get_mut(seq) {
                            if b.matched.len() == m.len() {
                                b.matched = m;
                            }
                        }
                    }
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
        if let Some(h) = horizon {
            self.drop_to(h)?;
        }
        self.now = batch;
        Ok(())
    }

    /// Regular joins only, and not a weighted join: a retraction of a row
    /// the TTL dropped would take back pairs that row never made.
    fn set_state_ttl(&mut self, batches: u64) {
        if self.plan.regular && !self.plan.weighted {
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
            weighted: false,
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

    /// A left interval join: a pair at once; a left row whose key is NULL
    /// padded at once; a left row that matched nothing padded once, when
    /// the watermark has passed its interval (its match count survives a
    /// checkpoint); the output has no op column.
    #[test]
    fn a_left_interval_join_pads_a_row_once_nothing_can_match_it() {
        let (ls, rs) = (side("a"), side("b"));
        // A right row at most 5 s after the left one.
        let mut left = plan(-5_000_000, 0);
        left.join_type = JoinType::Left;
        let s = 1_000_000;
        let step = |exec: &mut IntervalJoinExec,
                    b: u64,
                    l: &[(Option<i64>, i64)],
                    r: &[(Option<i64>, i64)],
                    wm: Option<i64>| {
            let out =
                StatefulOperator::process(exec, b, &[vec![rows(&ls, l)], vec![rows(&rs, r)]], wm)
                    .unwrap();
            let mut v = Vec::new();
            for (_, b) in &out.chunks {
                assert_eq!(b.num_columns(), 4, "no op column");
                let a = b.column(0).as_primitive::<arrow::datatypes::Int64Type>();
                let r = b.column(2).as_primitive::<arrow::datatypes::Int64Type>();
                for i in 0..b.num_rows() {
                    let get = |x: &Int64Array| x.is_valid(i).then(|| x.value(i));
                    v.push((get(a), get(r)));
                }
            }
            v.sort();
            v
        };
        let mut exec = IntervalJoinExec::new(left.clone()).unwrap();
        assert_eq!(
            step(
                &mut exec,
                0,
                &[(Some(1), 0), (Some(2), s), (None, 2 * s)],
                &[(Some(1), 3 * s)],
                None
            ),
            vec![(None, None), (Some(1), Some(1))]
        );
        let snap = exec.snapshot(None).unwrap();
        let mut exec = IntervalJoinExec::new(left).unwrap();
        exec.restore(vec![snap], 0).unwrap();
        // Key 2's payment comes 8 s late: no pair. The watermark (4 s)
        // has not passed key 2's interval (1 s to 6 s).
        assert_eq!(
            step(&mut exec, 1, &[], &[(Some(2), 9 * s)], Some(4 * s)),
            vec![]
        );
        // At 7 s it has: key 2 is padded; key 1 matched, so it is not.
        assert_eq!(
            step(&mut exec, 2, &[], &[], Some(7 * s)),
            vec![(Some(2), None)]
        );
        // Once only, and right rows are never padded in a LEFT join.
        assert_eq!(step(&mut exec, 3, &[], &[], Some(100 * s)), vec![]);
        assert_eq!(exec.held_rows(), 0);
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

    /// Checkpoints as a full snapshot followed by deltas: a join restored
    /// from the chain at any checkpoint holds exactly the rows the original
    /// held then, and makes exactly the pairs it made afterwards (an
    /// interval join dropping rows by watermark between the layers, and a
    /// regular join dropping them by `state_ttl`).
    #[test]
    fn a_delta_chain_restores_exactly_the_held_rows() {
        let (ls, rs) = (side("a"), side("b"));
        let left: Vec<(Option<i64>, i64)> = (0..80)
            .map(|i| (if i % 7 == 0 { None } else { Some(i % 3) }, i * 2))
            .collect();
        let right: Vec<(Option<i64>, i64)> = (0..55).map(|i| (Some(i % 4), i * 3)).collect();
        let step = 4;
        let batches = 170 / step + 1;
        let input = |b: i64| {
            let (t, until) = (b * step, (b + 1) * step);
            let pick = |v: &[(Option<i64>, i64)]| -> Vec<(Option<i64>, i64)> {
                v.iter()
                    .filter(|r| r.1 >= t && r.1 < until)
                    .copied()
                    .collect()
            };
            (
                vec![rows(&ls, &pick(&left)), rows(&rs, &pick(&right))],
                Some(until),
            )
        };
        for regular in [false, true] {
            let make = || {
                let mut p = plan(-3, 1);
                p.regular = regular;
                let mut exec = IntervalJoinExec::new(p).unwrap();
                exec.set_state_ttl(6);
                exec
            };
            // The original run, checkpointing every third batch: in full
            // every fourth checkpoint, else a delta of the previous one.
            let mut exec = make();
            let mut outputs = Vec::new();
            let mut held = Vec::new();
            let mut chains: Vec<(u64, Vec<OperatorSnapshot>)> = Vec::new();
            let mut chain: Vec<OperatorSnapshot> = Vec::new();
            let mut deltas = 0;
            for b in 0..batches {
                let (inputs, wm) = input(b);
                let out = StatefulOperator::process(
                    &mut exec,
                    b as u64,
                    &[vec![inputs[0].clone()], vec![inputs[1].clone()]],
                    wm,
                )
                .unwrap();
                outputs.push(triples(&out));
                held.push(exec.held_rows());
                if b % 3 == 2 {
                    let base =
                        (chains.last().map(|c| c.0)).filter(|_| !chain.len().is_multiple_of(4));
                    let snap = StatefulOperator::snapshot(&mut exec, base).unwrap();
                    if snap.delta_base.is_some() {
                        deltas += 1;
                    } else {
                        chain.clear();
                    }
                    chain.push(snap);
                    chains.push((
                        b as u64,
                        chain
                            .iter()
                            .map(|s| OperatorSnapshot {
                                closed_through: s.closed_through,
                                delta_base: s.delta_base,
                                sections: s.sections.clone(),
                            })
                            .collect(),
                    ));
                }
            }
            assert!(deltas > 5, "deltas written: {deltas}");
            let pairs: usize = outputs.iter().map(Vec::len).sum();
            assert!(pairs > 10, "pairs: {pairs}");
            for (c, layers) in chains {
                let mut back = make();
                back.restore(layers, c).unwrap();
                assert_eq!(
                    back.held_rows(),
                    held[c as usize],
                    "regular {regular}: rows held after batch {c}"
                );
                for b in c + 1..batches as u64 {
                    let (inputs, wm) = input(b as i64);
                    let out = StatefulOperator::process(
                        &mut back,
                        b,
                        &[vec![inputs[0].clone()], vec![inputs[1].clone()]],
                        wm,
                    )
                    .unwrap();
                    assert_eq!(
                        triples(&out),
                        outputs[b as usize],
                        "regular {regular}: batch {b} after a restore at {c}"
                    );
                }
            }
        }
    }

    /// A weighted join (of results that change) against a model of
    /// multisets: after every micro-batch, the changes emitted so far add
    /// up to the join of what both sides hold, retractions (some before
    /// the row they take back) leave no row behind, and a checkpoint
    /// restored midway changes nothing.
    #[test]
    fn a_weighted_join_emits_the_changes_of_the_join_of_its_inputs() {
        for join_type in [JoinType::Inner, JoinType::Left, JoinType::Full] {
            for seed in 1..=8u64 {
                weighted_join_against_a_model(join_type, seed);
            }
        }
    }

    /// NULL in the model's output rows.
    const NULL: i64 = i64::MIN;

    fn weighted_join_against_a_model(join_type: JoinType, seed: u64) {
        type Model = BTreeMap<(i64, i64), i64>;
        let schema = |k: &str, v: &str, weighted: bool| {
            let mut fields = vec![
                Field::new(k, DataType::Int64, true),
                Field::new(v, DataType::Int64, true),
            ];
            if weighted {
                fields.push(Field::new(
                    drizzle_planner::WEIGHT_COLUMN,
                    DataType::Int64,
                    false,
                ));
            }
            Arc::new(Schema::new(fields))
        };
        let (ls, rs) = (schema("k", "v", true), schema("j", "u", true));
        let joined = Arc::new(Schema::new(
            schema("k", "v", false)
                .fields()
                .iter()
                .chain(schema("j", "u", false).fields().iter())
                .map(|f| f.as_ref().clone())
                .collect::<Vec<_>>(),
        ));
        let plan = IntervalJoinPlan {
            left_keys: vec![Arc::new(Column::new("k", 0))],
            right_keys: vec![Arc::new(Column::new("j", 0))],
            left_time: 0,
            right_time: 0,
            lower_us: i64::MIN,
            upper_us: i64::MAX,
            left_lag_us: 0,
            right_lag_us: 0,
            filter: None,
            right_input: schema("j", "u", false),
            schema: joined,
            display: String::new(),
            regular: true,
            join_type,
            weighted: true,
        };
        let batch = |schema: &SchemaRef, rows: &[(i64, i64, i64)]| {
            RecordBatch::try_new(
                Arc::clone(schema),
                vec![
                    Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                    Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
                    Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
                ],
            )
            .unwrap()
        };
        let mut seed = 0x2545_f491_4f6c_dd1du64.wrapping_mul(seed);
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n) as i64
        };
        let mut exec = IntervalJoinExec::new(plan.clone()).unwrap();
        let (mut left, mut right) = (Model::new(), Model::new());
        let mut emitted: std::collections::HashMap<[i64; 4], i64> = Default::default();
        for step in 0..300u64 {
            let mut changes = |model: &mut Model| {
                let mut rows = Vec::new();
                for _ in 0..next(24) {
                    let live: Vec<(i64, i64)> = model
                        .iter()
                        .filter(|(_, w)| **w > 0)
                        .map(|(r, _)| *r)
                        .collect();
                    let (row, w) = match next(10) {
                        // A retraction of a row not (yet) there.
                        0 => ((next(4), next(3)), -1),
                        1..=5 if !live.is_empty() => (live[next(live.len() as u64) as usize], -1),
                        _ => ((next(4), next(3)), 1),
                    };
                    *model.entry(row).or_default() += w;
                    rows.push((row.0, row.1, w));
                }
                rows
            };
            let l = changes(&mut left);
            let r = changes(&mut right);
            exec.now = step;
            let out = exec
                .process(&[batch(&ls, &l)], &[batch(&rs, &r)], None)
                .unwrap();
            for (_, b) in &out.chunks {
                let int = |c: usize, i: usize| {
                    let a = b.column(c).as_primitive::<arrow::datatypes::Int64Type>();
                    if a.is_null(i) {
                        NULL
                    } else {
                        a.value(i)
                    }
                };
                let ops = b.column(4).as_string::<i32>();
                for i in 0..b.num_rows() {
                    let key = [int(0, i), int(1, i), int(2, i), int(3, i)];
                    *emitted.entry(key).or_default() +=
                        if ops.value(i) == "insert" { 1 } else { -1 };
                }
            }
            emitted.retain(|_, w| *w != 0);
            let mut expected: std::collections::HashMap<[i64; 4], i64> = Default::default();
            for (&(k, v), &wl) in &left {
                for (&(j, u), &wr) in &right {
                    if k == j && wl * wr != 0 {
                        *expected.entry([k, v, j, u]).or_default() += wl * wr;
                    }
                }
            }
            // Outer rows the other side's weights do not match, padded.
            let key_weight = |model: &Model, key: i64| -> i64 {
                model
                    .iter()
                    .filter(|(r, _)| r.0 == key)
                    .map(|(_, w)| *w)
                    .sum()
            };
            if join_type != JoinType::Inner {
                for (&(k, v), &wl) in &left {
                    if wl != 0 && key_weight(&right, k) == 0 {
                        *expected.entry([k, v, NULL, NULL]).or_default() += wl;
                    }
                }
            }
            if join_type == JoinType::Full {
                for (&(j, u), &wr) in &right {
                    if wr != 0 && key_weight(&left, j) == 0 {
                        *expected.entry([NULL, NULL, j, u]).or_default() += wr;
                    }
                }
            }
            expected.retain(|_, w| *w != 0);
            assert_eq!(
                emitted, expected,
                "{join_type}, seed {seed}, after micro-batch {step}"
            );
            let held: i64 = left.values().chain(right.values()).map(|w| w.abs()).sum();
            assert_eq!(
                exec.state_size().keys as i64,
                held,
                "after micro-batch {step}"
            );
            // Rows taken back do not pile up: batches with no live row go,
            // the others are compacted once most of their rows are dead.
            let kept = (exec.left.rows + exec.right.rows) as i64;
            assert!(
                kept <= 2 * held + 2 * COMPACT_MIN_DEAD as i64,
                "{kept} rows kept for {held}"
            );
            if step == 150 {
                let snap = StatefulOperator::snapshot(&mut exec, None).unwrap();
                exec = IntervalJoinExec::new(plan.clone()).unwrap();
                exec.restore(vec![snap], step).unwrap();
                assert_eq!(exec.state_size().keys as i64, held);
            }
        }
    }
}
