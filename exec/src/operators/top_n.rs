//! `TopNExec`: the best N rows per key, for `ROW_NUMBER() OVER (PARTITION
//! BY k ORDER BY o) <= N` (top-N; N = 1 is a dedup).

use arrow::array::{BooleanArray, UInt64Array};
use arrow::row::{OwnedRow, Rows};
use drizzle_planner::Ranking;

use super::*;

/// One held row: its sort key, its arrival number (ties keep arrival
/// order) and its values.
struct Held {
    sort: OwnedRow,
    seq: u64,
    row: OwnedRow,
}

/// The reduce side of a top-N. Rows come in append-only, so a key's ranks
/// only fill up or change rows, never empty: after each micro-batch every
/// rank of each key whose rows changed is emitted, an upsert keyed by the
/// partition columns and the rank. State: at most N rows per key, in Arrow's
/// row format.
pub struct TopNExec {
    plan: TopNPlan,
    keys: RowConverter,
    sort: RowConverter,
    values: RowConverter,
    /// Key (row format) → the micro-batch a row of it last arrived in,
    /// and its best rows, best first.
    groups: HashMap<Vec<u8>, (u64, Vec<Held>)>,
    next_seq: u64,
    rows: u64,
    bytes: u64,
    /// The micro-batch being processed.
    now: u64,
    /// `SET state_ttl` in micro-batches.
    ttl: Option<u64>,
    /// For a plan that emits changes: the rows each key changed in this
    /// micro-batch held before it (to retract them).
    before: HashMap<Vec<u8>, Vec<(OwnedRow, OwnedRow)>>,
}

/// Name of the column a top-N's checkpointed rows carry their key's last
/// arrival micro-batch in (for `SET state_ttl`).
pub const STATE_SEEN: &str = "__drizzle_seen";

impl TopNExec {
    /// Empty state for `plan`.
    pub fn new(plan: TopNPlan) -> Result<Self> {
        let types = |exprs: &mut dyn Iterator<Item = &Arc<dyn PhysicalExpr>>| {
            exprs
                .map(|e| e.data_type(&plan.input))
                .collect::<std::result::Result<Vec<_>, _>>()
        };
        let mut key_types = types(&mut plan.partition_by.iter())?;
        if key_types.is_empty() {
            // No PARTITION BY: one key, the same for every row.
            key_types.push(DataType::Boolean);
        }
        let sort_types = types(&mut plan.order_by.iter().map(|(e, _)| e))?;
        let keys = RowConverter::new(key_types.into_iter().map(SortField::new).collect())?;
        let sort = RowConverter::new(
            sort_types
                .into_iter()
                .zip(&plan.order_by)
                .map(|(t, (_, o))| SortField::new_with_options(t, *o))
                .collect(),
        )?;
        let values = RowConverter::new(
            plan.input
                .fields()
                .iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect(),
        )?;
        Ok(Self {
            plan,
            keys,
            sort,
            values,
            groups: HashMap::new(),
            next_seq: 0,
            rows: 0,
            bytes: 0,
            now: 0,
            ttl: None,
            before: HashMap::new(),
        })
    }

    fn encode(&self, batch: &RecordBatch) -> Result<(Rows, Rows, Rows)> {
        let mut keys = self
            .plan
            .partition_by
            .iter()
            .map(|e| eval(e, batch))
            .collect::<Result<Vec<_>>>()?;
        if keys.is_empty() {
            keys.push(Arc::new(BooleanArray::new(
                arrow::buffer::BooleanBuffer::new_set(batch.num_rows()),
                None,
            )));
        }
        let sort = self
            .plan
            .order_by
            .iter()
            .map(|(e, _)| eval(e, batch))
            .collect::<Result<Vec<_>>>()?;
        Ok((
            self.keys.convert_columns(&keys)?,
            self.sort.convert_columns(&sort)?,
            self.values.convert_columns(batch.columns())?,
        ))
    }

    /// Offers every row of `batch`; the keys whose best rows changed go in
    /// `changed` (once each).
    fn offer(&mut self, batch: &RecordBatch, changed: &mut Vec<Vec<u8>>) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let (keys, sort, values) = self.encode(batch)?;
        let limit = usize::try_from(self.plan.limit).unwrap_or(usize::MAX);
        for i in 0..batch.num_rows() {
            let s = sort.row(i);
            let key = keys.row(i);
            let group = self.groups.entry_ref(key.as_ref()).or_default();
            group.0 = group.0.max(self.now);
            let held = &mut group.1;
            // A full key keeps its rows against a worse one, and against an
            // equal one for ROW_NUMBER() (ties keep arrival order); with
            // RANK() and DENSE_RANK() an equal one shares the last rank.
            let full = match self.plan.ranking {
                Ranking::RowNumber => {
                    held.len() >= limit && held.last().is_some_and(|last| s >= last.sort.row())
                }
                Ranking::Rank => held.len() >= limit && s > held[limit - 1].sort.row(),
                Ranking::DenseRank => {
                    held.last().is_some_and(|last| s > last.sort.row()) && has_values(held, limit)
                }
            };
            if full {
                continue;
            }
            if self.plan.changes && !self.before.contains_key(key.as_ref()) {
                self.before.insert(
                    key.as_ref().to_vec(),
                    held.iter()
                        .map(|h| (h.sort.clone(), h.row.clone()))
                        .collect(),
                );
            }
            let at = held.partition_point(|h| h.sort.row() <= s);
            let row = values.row(i).owned();
            self.bytes += (row.as_ref().len() + s.as_ref().len() + 48) as u64;
            self.rows += 1;
            held.insert(
                at,
                Held {
                    sort: s.owned(),
                    seq: self.next_seq,
                    row,
                },
            );
            self.next_seq += 1;
            let keep = kept(held, limit, self.plan.ranking);
            while held.len() > keep {
                if let Some(out) = held.pop() {
                    self.bytes = self.bytes.saturating_sub(
                        (out.row.as_ref().len() + out.sort.as_ref().len() + 48) as u64,
                    );
                    self.rows -= 1;
                }
            }
            if changed.last().is_none_or(|k| k.as_slice() != key.as_ref()) {
                changed.push(key.as_ref().to_vec());
            }
        }
        Ok(())
    }

    /// Every rank of `keys`, as output rows (input columns, then the rank).
    fn ranks(&self, keys: &[Vec<u8>]) -> Result<RecordBatch> {
        let mut rows = Vec::new();
        let mut ranks = Vec::new();
        for key in keys {
            if let Some((_, held)) = self.groups.get(key.as_slice()) {
                let numbers = numbering(held.iter().map(|h| &h.sort), self.plan.ranking);
                for (h, n) in held.iter().zip(numbers) {
                    rows.push(h.row.row());
                    ranks.push(n);
                }
            }
        }
        self.output(rows, ranks, None)
    }

    /// The changes of `keys` (each held rows in `before`): each (rank, row)
    /// that went, with weight -1, and each that came, with +1.
    fn changes(&mut self, keys: &[Vec<u8>]) -> Result<RecordBatch> {
        let mut rows = Vec::new();
        let mut ranks = Vec::new();
        let mut weights = Vec::new();
        let empty = Vec::new();
        let ranking = self.plan.ranking;
        for key in keys {
            let old = self.before.get(key.as_slice()).unwrap_or(&empty);
            let new = self
                .groups
                .get(key.as_slice())
                .map(|(_, held)| held.as_slice())
                .unwrap_or_default();
            let old: Vec<(u64, &OwnedRow)> = numbering(old.iter().map(|(s, _)| s), ranking)
                .into_iter()
                .zip(old.iter().map(|(_, r)| r))
                .collect();
            let new: Vec<(u64, &OwnedRow)> = numbering(new.iter().map(|h| &h.sort), ranking)
                .into_iter()
                .zip(new.iter().map(|h| &h.row))
                .collect();
            // What one side has and the other has not (ties can make a
            // key's rows many: counted, not searched).
            let mut left: HashMap<(u64, &[u8]), u64> = HashMap::new();
            for (rank, row) in &new {
                *left.entry((*rank, row.as_ref())).or_default() += 1;
            }
            for (rank, row) in &old {
                match left.get_mut(&(*rank, row.as_ref())) {
                    Some(c) if *c > 0 => *c -= 1,
                    _ => {
                        rows.push(row.row());
                        ranks.push(*rank);
                        weights.push(-1);
                    }
                }
            }
            for (rank, row) in &new {
                if let Some(c) = left.get_mut(&(*rank, row.as_ref())) {
                    if *c > 0 {
                        *c -= 1;
                        rows.push(row.row());
                        ranks.push(*rank);
                        weights.push(1);
                    }
                }
            }
        }
        let out = self.output(rows, ranks, Some(weights));
        self.before.clear();
        out
    }

    /// Output rows: `rows` (input columns), their ranks, and their weights
    /// when the plan emits changes.
    fn output(
        &self,
        rows: Vec<arrow::row::Row<'_>>,
        ranks: Vec<u64>,
        weights: Option<Vec<i64>>,
    ) -> Result<RecordBatch> {
        let schema = self.output_schema();
        if rows.is_empty() {
            return Ok(RecordBatch::new_empty(schema));
        }
        let mut columns = self.values.convert_rows(rows)?;
        let rank: ArrayRef = Arc::new(UInt64Array::from(ranks));
        let rank_type = self
            .plan
            .schema
            .fields()
            .last()
            .map(|f| f.data_type().clone())
            .unwrap_or(DataType::UInt64);
        columns.push(if rank_type == DataType::UInt64 {
            rank
        } else {
            arrow::compute::cast(&rank, &rank_type)?
        });
        if let Some(w) = weights {
            columns.push(Arc::new(Int64Array::from(w)));
        }
        Ok(RecordBatch::try_new(schema, columns)?)
    }

    /// The plan's schema, with a weight column last when it emits changes.
    fn output_schema(&self) -> SchemaRef {
        if !self.plan.changes {
            return Arc::clone(&self.plan.schema);
        }
        let mut fields: Vec<arrow::datatypes::FieldRef> =
            self.plan.schema.fields().iter().cloned().collect();
        fields.push(Arc::new(arrow::datatypes::Field::new(
            drizzle_planner::WEIGHT_COLUMN,
            DataType::Int64,
            false,
        )));
        Arc::new(arrow::datatypes::Schema::new(fields))
    }
}

/// Where the value after `held[i]`'s starts (`held` best first): a binary
/// search, so a key with many tied rows costs no more than one with few.
fn next_value(held: &[Held], i: usize) -> usize {
    let value = held[i].sort.row();
    i + held[i..].partition_point(|h| h.sort.row() <= value)
}

/// Whether `held` (best first) has at least `n` distinct sort keys, in
/// O(n log len).
fn has_values(held: &[Held], n: usize) -> bool {
    let mut at = 0;
    for _ in 0..n {
        if at >= held.len() {
            return false;
        }
        at = next_value(held, at);
    }
    true
}

/// How many of `held` (best first) a key keeps: `limit` rows for
/// `ROW_NUMBER()`, every row ranked at most `limit` otherwise.
fn kept(held: &[Held], limit: usize, ranking: Ranking) -> usize {
    if held.len() <= limit {
        return held.len();
    }
    match ranking {
        Ranking::RowNumber => limit,
        // The rows tied with the limit-th.
        Ranking::Rank => next_value(held, limit - 1),
        // The rows of the first `limit` values.
        Ranking::DenseRank => {
            let mut at = 0;
            for _ in 0..limit {
                if at >= held.len() {
                    break;
                }
                at = next_value(held, at);
            }
            at
        }
    }
}

/// The numbers of rows with sort keys `sorts` (best first).
fn numbering<'a>(sorts: impl Iterator<Item = &'a OwnedRow>, ranking: Ranking) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    let mut previous: Option<&OwnedRow> = None;
    for (i, s) in sorts.enumerate() {
        let n = match (ranking, previous, out.last()) {
            (Ranking::RowNumber, _, _) => i as u64 + 1,
            (_, Some(p), Some(&last)) if p == s => last,
            (Ranking::Rank, _, _) => i as u64 + 1,
            (Ranking::DenseRank, _, last) => last.copied().unwrap_or(0) + 1,
        };
        out.push(n);
        previous = Some(s);
    }
    out
}

impl StatefulOperator for TopNExec {
    fn name(&self) -> &'static str {
        "TopNExec"
    }

    fn process(
        &mut self,
        batch: u64,
        inputs: &[Vec<RecordBatch>],
        _watermark_us: Option<i64>,
    ) -> Result<OperatorOutput> {
        let input = one_input("TopNExec", inputs)?;
        self.now = batch;
        // A top-N emitting changes keeps every key: the operator after it
        // holds the key's rows, which a forgotten key could not retract.
        let ttl = self.ttl.filter(|_| !self.plan.changes);
        if let Some(ttl) = ttl.filter(|&t| ttl_check(batch, t)) {
            // Keys no row reached for longer than the TTL start over.
            let before = batch.saturating_sub(ttl);
            let (mut rows, mut bytes) = (0u64, 0u64);
            self.groups.retain(|_, (seen, held)| {
                let keep = *seen >= before;
                if !keep {
                    rows += held.len() as u64;
                    bytes += held
                        .iter()
                        .map(|h| (h.row.as_ref().len() + h.sort.as_ref().len() + 48) as u64)
                        .sum::<u64>();
                }
                keep
            });
            self.rows = self.rows.saturating_sub(rows);
            self.bytes = self.bytes.saturating_sub(bytes);
        }
        let mut changed = Vec::new();
        for b in input {
            self.offer(b, &mut changed)?;
        }
        changed.sort_unstable();
        changed.dedup();
        let out = if self.plan.changes {
            self.changes(&changed)?
        } else {
            self.ranks(&changed)?
        };
        let chunks = if out.num_rows() > 0 {
            vec![(None, out)]
        } else {
            Vec::new()
        };
        Ok(OperatorOutput { chunks, late: 0 })
    }

    fn state_size(&self) -> StateSize {
        StateSize {
            bytes: self.bytes + self.groups.len() as u64 * 64,
            keys: self.groups.len() as u64,
        }
    }

    /// Always in full: the held rows in arrival order (so a restore offers
    /// them as they came and ties keep their order), each with its key's
    /// last arrival micro-batch as a last column.
    fn snapshot(&mut self, _delta_base: Option<u64>) -> Result<OperatorSnapshot> {
        let mut held: Vec<(u64, &Held)> = self
            .groups
            .values()
            .flat_map(|(seen, rows)| rows.iter().map(move |h| (*seen, h)))
            .collect();
        held.sort_by_key(|(_, h)| h.seq);
        let rows: Vec<_> = held.iter().map(|(_, h)| h.row.row()).collect();
        let section = if rows.is_empty() {
            Vec::new()
        } else {
            let mut fields: Vec<arrow::datatypes::FieldRef> =
                self.plan.input.fields().iter().cloned().collect();
            fields.push(Arc::new(arrow::datatypes::Field::new(
                STATE_SEEN,
                DataType::Int64,
                false,
            )));
            let mut columns = self.values.convert_rows(rows)?;
            columns.push(Arc::new(Int64Array::from_iter_values(
                held.iter().map(|(seen, _)| *seen as i64),
            )));
            vec![RecordBatch::try_new(
                Arc::new(arrow::datatypes::Schema::new(fields)),
                columns,
            )?]
        };
        Ok(OperatorSnapshot {
            closed_through: None,
            delta_base: None,
            sections: vec![section],
        })
    }

    fn restore(&mut self, layers: Vec<OperatorSnapshot>, batch: u64) -> Result<()> {
        let mut ignored = Vec::new();
        let width = self.plan.input.fields().len();
        for layer in layers {
            for section in layer.sections {
                for b in section {
                    // Checkpoints from before keys' arrival batches were
                    // kept have none: the checkpoint's counts.
                    let seen = (b.num_columns() == width + 1)
                        .then(|| {
                            b.column(width)
                                .as_primitive_opt::<arrow::datatypes::Int64Type>()
                        })
                        .flatten();
                    let Some(seen) = seen else {
                        self.now = batch;
                        self.offer(&b, &mut ignored)?;
                        continue;
                    };
                    let rows = b.project(&(0..width).collect::<Vec<_>>())?;
                    // A key's rows share its batch: offered together, in
                    // their order.
                    let mut by_seen: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
                    for (i, s) in seen.values().iter().enumerate() {
                        by_seen.entry(*s).or_default().push(i as u32);
                    }
                    for (s, picked) in by_seen {
                        self.now = s.max(0) as u64;
                        let part = take_record_batch(&rows, &UInt32Array::from(picked))?;
                        self.offer(&part, &mut ignored)?;
                    }
                }
            }
        }
        self.now = batch;
        self.before.clear();
        Ok(())
    }

    fn set_state_ttl(&mut self, batches: u64) {
        self.ttl = Some(batches.max(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{Field, Schema};
    use datafusion::physical_expr::expressions::Column;

    fn plan(limit: u64) -> TopNPlan {
        let input = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("v", DataType::Int64, true),
        ]));
        let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new("rn", DataType::UInt64, false));
        TopNPlan {
            partition_by: vec![Arc::new(Column::new("k", 0))],
            order_by: vec![(
                Arc::new(Column::new("v", 1)),
                arrow::compute::SortOptions {
                    descending: true,
                    nulls_first: false,
                },
            )],
            limit,
            input,
            schema: Arc::new(Schema::new(fields)),
            display: String::new(),
            changes: false,
            ranking: Ranking::RowNumber,
        }
    }

    fn batch(p: &TopNPlan, rows: &[(i64, i64)]) -> RecordBatch {
        RecordBatch::try_new(
            Arc::clone(&p.input),
            vec![
                Arc::new(Int64Array::from(
                    rows.iter().map(|r| r.0).collect::<Vec<_>>(),
                )),
                Arc::new(Int64Array::from(
                    rows.iter().map(|r| r.1).collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap()
    }

    fn triples(out: &OperatorOutput) -> Vec<(i64, i64, u64)> {
        let mut v = Vec::new();
        for (_, b) in &out.chunks {
            let k = b.column(0).as_primitive::<arrow::datatypes::Int64Type>();
            let x = b.column(1).as_primitive::<arrow::datatypes::Int64Type>();
            let r = b.column(2).as_primitive::<arrow::datatypes::UInt64Type>();
            for i in 0..b.num_rows() {
                v.push((k.value(i), x.value(i), r.value(i)));
            }
        }
        v.sort_unstable();
        v
    }

    /// (value, rank, weight) of every change emitted, sorted.
    fn changes_of(out: &OperatorOutput) -> Vec<(i64, u64, i64)> {
        let mut v = Vec::new();
        for (_, b) in &out.chunks {
            let x = b.column(1).as_primitive::<arrow::datatypes::Int64Type>();
            let r = b.column(2).as_primitive::<arrow::datatypes::UInt64Type>();
            let w = b.column(3).as_primitive::<arrow::datatypes::Int64Type>();
            for i in 0..b.num_rows() {
                v.push((x.value(i), r.value(i), w.value(i)));
            }
        }
        v.sort_unstable();
        v
    }

    /// `SET state_ttl`: a key no row reached for longer than the TTL starts
    /// over, whether or not a checkpoint came between.
    #[test]
    fn keys_idle_longer_than_the_ttl_start_over() {
        let p = plan(2);
        for restore in [false, true] {
            let mut exec = TopNExec::new(p.clone()).unwrap();
            exec.set_state_ttl(4);
            exec.process(0, &[vec![batch(&p, &[(1, 50), (1, 40), (2, 9)])]], None)
                .unwrap();
            exec.process(3, &[vec![batch(&p, &[(2, 1)])]], None)
                .unwrap();
            if restore {
                let snap = exec.snapshot(None).unwrap();
                exec = TopNExec::new(p.clone()).unwrap();
                exec.set_state_ttl(4);
                exec.restore(vec![snap], 3).unwrap();
            }
            // Batch 6: key 1 (last seen at 0) is gone, key 2 (3) is not.
            let out = exec
                .process(6, &[vec![batch(&p, &[(1, 5), (2, 5)])]], None)
                .unwrap();
            assert_eq!(
                triples(&out),
                vec![(1, 5, 1), (2, 5, 2), (2, 9, 1)],
                "restored: {restore}"
            );
        }
    }

    /// A top-N feeding an operator that consumes changes emits, per changed
    /// key, each rank whose row changed: the old row with weight -1 and the
    /// new one with +1; ranks that kept their row are not emitted.
    #[test]
    fn emits_changed_ranks_as_retractions_and_additions() {
        let mut p = plan(2);
        p.changes = true;
        let mut exec = TopNExec::new(p.clone()).unwrap();
        let out = exec
            .process(0, &[vec![batch(&p, &[(1, 5), (1, 3)])]], None)
            .unwrap();
        assert_eq!(changes_of(&out), vec![(3, 2, 1), (5, 1, 1)]);
        // 4 goes between: rank 2 changes from 3 to 4, rank 1 stays 5.
        let out = exec
            .process(1, &[vec![batch(&p, &[(1, 4), (1, 1)])]], None)
            .unwrap();
        assert_eq!(changes_of(&out), vec![(3, 2, -1), (4, 2, 1)]);
        // 9 goes first: both ranks change.
        let out = exec
            .process(2, &[vec![batch(&p, &[(1, 9)])]], None)
            .unwrap();
        assert_eq!(
            changes_of(&out),
            vec![(4, 2, -1), (5, 1, -1), (5, 2, 1), (9, 1, 1)]
        );
    }

    /// RANK() keeps ties at the boundary and numbers them alike, skipping
    /// after; DENSE_RANK() keeps the rows of the N best values.
    #[test]
    fn rank_and_dense_rank_keep_ties() {
        let run = |ranking: Ranking| {
            let mut p = plan(2);
            p.changes = true;
            p.ranking = ranking;
            let mut exec = TopNExec::new(p.clone()).unwrap();
            let mut outs = Vec::new();
            for rows in [&[(1, 10), (1, 10), (1, 7)][..], &[(1, 12)][..]] {
                let out = exec.process(0, &[vec![batch(&p, rows)]], None).unwrap();
                outs.push(changes_of(&out));
            }
            outs
        };
        assert_eq!(
            run(Ranking::Rank),
            vec![
                // 7 is ranked 3: not kept.
                vec![(10, 1, 1), (10, 1, 1)],
                vec![(10, 1, -1), (10, 1, -1), (10, 2, 1), (10, 2, 1), (12, 1, 1)],
            ]
        );
        assert_eq!(
            run(Ranking::DenseRank),
            vec![
                vec![(7, 2, 1), (10, 1, 1), (10, 1, 1)],
                // 7 is now the third value.
                vec![
                    (7, 2, -1),
                    (10, 1, -1),
                    (10, 1, -1),
                    (10, 2, 1),
                    (10, 2, 1),
                    (12, 1, 1)
                ],
            ]
        );
    }

    /// Many ties in one key: DENSE_RANK() keeps them all (one value), a
    /// worse row is turned away by a binary search rather than a count of
    /// the key's values, and a better one takes their place.
    #[test]
    fn dense_rank_with_many_ties() {
        let mut p = plan(1);
        p.changes = true;
        p.ranking = Ranking::DenseRank;
        let mut exec = TopNExec::new(p.clone()).unwrap();
        let ties: Vec<(i64, i64)> = (0..20_000).map(|_| (1, 10)).collect();
        let worse: Vec<(i64, i64)> = (0..20_000).map(|i| (1, i % 10)).collect();
        let out = exec.process(0, &[vec![batch(&p, &ties)]], None).unwrap();
        assert_eq!(changes_of(&out).len(), 20_000);
        let out = exec.process(1, &[vec![batch(&p, &worse)]], None).unwrap();
        assert!(out.chunks.is_empty());
        assert_eq!(exec.state_size().keys, 1);
        let out = exec
            .process(2, &[vec![batch(&p, &[(1, 11)])]], None)
            .unwrap();
        let changes = changes_of(&out);
        assert_eq!(changes.len(), 20_001);
        assert_eq!(changes.iter().filter(|c| c.2 == -1).count(), 20_000);
        assert!(changes.contains(&(11, 1, 1)));
    }

    /// Against a record-at-a-time model: after each batch, the changed keys'
    /// ranks are exactly the best `limit` values seen, ties in arrival order.
    #[test]
    fn keeps_the_best_rows_per_key_and_emits_changed_keys() {
        let p = plan(2);
        let mut exec = TopNExec::new(p.clone()).unwrap();
        let out = exec
            .process(
                0,
                &[vec![batch(&p, &[(1, 5), (1, 7), (2, 1), (1, 6)])]],
                None,
            )
            .unwrap();
        assert_eq!(triples(&out), vec![(1, 6, 2), (1, 7, 1), (2, 1, 1)]);
        // Key 1: 3 is worse than both; key 2 gets a better row.
        let out = exec
            .process(1, &[vec![batch(&p, &[(1, 3), (2, 9)])]], None)
            .unwrap();
        assert_eq!(triples(&out), vec![(2, 1, 2), (2, 9, 1)]);
        // A checkpoint restores the same ranks.
        let snap = exec.snapshot(None).unwrap();
        let mut again = TopNExec::new(p.clone()).unwrap();
        again.restore(vec![snap], 1).unwrap();
        let out = again
            .process(2, &[vec![batch(&p, &[(1, 8)])]], None)
            .unwrap();
        assert_eq!(triples(&out), vec![(1, 7, 2), (1, 8, 1)]);
        assert_eq!(again.state_size().keys, 2);
    }
}
