//! `SessionAggregateExec`: the reduce side of an aggregation over
//! `SESSION(stream, ts, gap)` windows.
//!
//! The map side gives each row the provisional window `[ts, ts + gap)` and
//! aggregates partially by (key, provisional window), as for any window;
//! the shuffle partitions by the key alone, so all of a key's windows meet
//! here. Per key, the overlapping windows merge into sessions: a session
//! is a maximal run of the key's rows less than `gap` apart, from its first
//! row's time to its last row's time plus `gap`. A session closes when the
//! watermark reaches its end (no row still to come can reach it); its
//! partial rows are then merged into one row per session and emitted.

use arrow::array::ArrayRef;
use arrow::compute::concat_batches;
use arrow::row::Rows;
use drizzle_planner::SessionBounds;

use super::*;

/// A key's open session: `[start, end)` in µs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Session {
    start: i64,
    end: i64,
}

/// The keyed state of one reduce partition of a session aggregation: the
/// open sessions per key and the partial rows that make them up.
pub struct SessionAggregateExec {
    plan: AggregatePlan,
    bounds: SessionBounds,
    gap_us: i64,
    keys: RowConverter,
    /// Key (row format) → its open sessions, by start; pairwise disjoint,
    /// so their ends are in order too.
    sessions: HashMap<Vec<u8>, Vec<Session>>,
    /// Partial rows of open sessions, filed under a time no later than
    /// their session's end: looked at again once the watermark reaches it.
    pending: BTreeMap<i64, Vec<RecordBatch>>,
    /// Sessions ending at or before this (µs) are closed; rows older than
    /// it are late.
    closed_through: Option<i64>,
    open_sessions: u64,
    key_bytes: u64,
    pending_bytes: u64,
}

impl SessionAggregateExec {
    /// Empty state for `plan`, whose window must be a session.
    pub fn new(plan: AggregatePlan) -> Result<Self> {
        let window = plan
            .window
            .as_ref()
            .ok_or_else(|| ExecError::invalid("a session aggregate without a window"))?;
        let bounds = window
            .session
            .clone()
            .ok_or_else(|| ExecError::invalid("a session aggregate without session bounds"))?;
        if bounds.start.is_none() && bounds.end.is_none() {
            return Err(ExecError::invalid(
                "a session aggregate grouped by neither window bound",
            ));
        }
        let gap_us = window.size_us;
        let keys = RowConverter::new(
            bounds
                .keys
                .iter()
                .map(|&i| SortField::new(plan.partial_schema.field(i).data_type().clone()))
                .collect(),
        )?;
        Ok(Self {
            plan,
            bounds,
            gap_us,
            keys,
            sessions: HashMap::new(),
            pending: BTreeMap::new(),
            closed_through: None,
            open_sessions: 0,
            key_bytes: 0,
            pending_bytes: 0,
        })
    }

    /// The provisional window of every row of a partial batch.
    fn windows(&self, batch: &RecordBatch) -> Result<(Vec<i64>, Vec<i64>)> {
        let column = |i: usize| -> Result<Vec<i64>> {
            let ts = batch
                .column(i)
                .as_primitive_opt::<TimestampMicrosecondType>()
                .ok_or_else(|| ExecError::invalid("a session bound is not a timestamp"))?;
            Ok(ts.values().to_vec())
        };
        let gap = self.gap_us;
        Ok(match (self.bounds.start, self.bounds.end) {
            (Some(s), Some(e)) => (column(s)?, column(e)?),
            (Some(s), None) => {
                let starts = column(s)?;
                let ends = starts.iter().map(|s| s.saturating_add(gap)).collect();
                (starts, ends)
            }
            (None, Some(e)) => {
                let ends = column(e)?;
                let starts = ends.iter().map(|e| e.saturating_sub(gap)).collect();
                (starts, ends)
            }
            (None, None) => return Err(ExecError::invalid("no session bound")),
        })
    }

    /// Each row's key in row format (`None`: no key columns, one key).
    fn key_rows(&self, batch: &RecordBatch) -> Result<Option<Rows>> {
        if self.bounds.keys.is_empty() {
            return Ok(None);
        }
        let cols: Vec<ArrayRef> = self
            .bounds
            .keys
            .iter()
            .map(|&i| Arc::clone(batch.column(i)))
            .collect();
        Ok(Some(self.keys.convert_columns(&cols)?))
    }

    /// Merges the window `[start, end)` into `key`'s sessions.
    fn insert(&mut self, key: &[u8], start: i64, end: i64) {
        if !self.sessions.contains_key(key) {
            self.key_bytes += key.len() as u64 + 64;
        }
        let list = self.sessions.entry_ref(key).or_default();
        // The sessions it overlaps: from the first ending after its start
        // to the last starting before its end.
        let lo = list.partition_point(|s| s.end <= start);
        let hi = list.partition_point(|s| s.start < end);
        if lo >= hi {
            list.insert(lo, Session { start, end });
            self.open_sessions += 1;
        } else {
            let merged = Session {
                start: start.min(list[lo].start),
                end: end.max(list[hi - 1].end),
            };
            list.drain(lo + 1..hi);
            list[lo] = merged;
            self.open_sessions -= (hi - lo - 1) as u64;
        }
    }

    fn file(&mut self, at: i64, rows: RecordBatch) {
        self.pending_bytes += rows.get_array_memory_size() as u64;
        self.pending.entry(at).or_default().push(rows);
    }

    /// Adds a micro-batch's partial rows; returns how many were late.
    fn add(&mut self, partial: &RecordBatch) -> Result<u64> {
        if partial.num_rows() == 0 {
            return Ok(0);
        }
        let (starts, ends) = self.windows(partial)?;
        let keys = self.key_rows(partial)?;
        let mut keep = Vec::with_capacity(partial.num_rows());
        let mut first_end = i64::MAX;
        let mut late = 0;
        for i in 0..partial.num_rows() {
            // The map side drops rows older than its watermark; this is
            // the same rule against the (lower) merged one.
            if self.closed_through.is_some_and(|c| starts[i] < c) {
                late += 1;
                continue;
            }
            self.insert(key_of(&keys, i), starts[i], ends[i]);
            keep.push(i as u32);
            first_end = first_end.min(ends[i]);
        }
        if keep.is_empty() {
            return Ok(late);
        }
        let rows = if keep.len() == partial.num_rows() {
            partial.clone()
        } else {
            take_record_batch(partial, &UInt32Array::from(keep))?
        };
        self.file(first_end, rows);
        Ok(late)
    }

    /// Emits the sessions that end at or before `watermark`, one row each
    /// (in order of end), and forgets them.
    fn close(&mut self, watermark: i64) -> Result<Option<RecordBatch>> {
        let later = self.pending.split_off(&watermark.saturating_add(1));
        let due = std::mem::replace(&mut self.pending, later);
        if due.is_empty() {
            return Ok(None);
        }
        let batches: Vec<RecordBatch> = due.into_values().flatten().collect();
        let due_bytes: u64 = batches_bytes(&batches);
        self.pending_bytes = self.pending_bytes.saturating_sub(due_bytes);
        let all = concat_batches(&self.plan.partial_schema, &batches)?;
        let (starts, _) = self.windows(&all)?;
        let keys = self.key_rows(&all)?;
        // Each row's session: closed ones get a group number, the rows of
        // open ones are filed again under their session's end.
        let mut ids: HashMap<(&[u8], i64), usize> = HashMap::new();
        let mut closed_rows: Vec<u32> = Vec::new();
        let mut closed_groups: Vec<usize> = Vec::new();
        let mut first_row: Vec<u32> = Vec::new();
        let mut closed: Vec<Session> = Vec::new();
        let mut refile: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
        for (i, &start) in starts.iter().enumerate() {
            let key = key_of(&keys, i);
            let session = self
                .sessions
                .get(key)
                .and_then(|list| {
                    let at = list.partition_point(|s| s.end <= start);
                    list.get(at).filter(|s| s.start <= start).copied()
                })
                .ok_or_else(|| ExecError::invalid("a held session row without its session"))?;
            if session.end <= watermark {
                let g = *ids.entry((key, session.start)).or_insert_with(|| {
                    first_row.push(i as u32);
                    closed.push(session);
                    closed.len() - 1
                });
                closed_rows.push(i as u32);
                closed_groups.push(g);
            } else {
                refile.entry(session.end).or_default().push(i as u32);
            }
        }
        drop(ids);
        for (at, rows) in refile {
            let rows = take_record_batch(&all, &UInt32Array::from(rows))?;
            self.file(at, rows);
        }
        if closed.is_empty() {
            return Ok(None);
        }
        // Merge each closed session's partial states into one row.
        let taken = take_record_batch(&all, &UInt32Array::from(closed_rows))?;
        let k = self.plan.group_exprs.len();
        let mut at = k;
        let mut aggregates = Vec::with_capacity(self.plan.aggregates.len());
        for agg in &self.plan.aggregates {
            let width = agg.state_fields()?.len();
            let states = taken
                .columns()
                .get(at..at + width)
                .ok_or_else(|| ExecError::invalid("session state does not match the query"))?;
            let mut acc = new_accumulator(agg)?;
            acc.merge_batch(states, &closed_groups, closed.len())?;
            aggregates.push(acc.evaluate(EmitTo::All)?);
            at += width;
        }
        let first = UInt32Array::from(first_row.clone());
        let bound = |i: usize, values: Vec<i64>| -> ArrayRef {
            Arc::new(
                TimestampMicrosecondArray::from(values)
                    .with_data_type(all.schema().field(i).data_type().clone()),
            )
        };
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(k + aggregates.len());
        for g in 0..k {
            if Some(g) == self.bounds.start {
                columns.push(bound(g, closed.iter().map(|s| s.start).collect()));
            } else if Some(g) == self.bounds.end {
                columns.push(bound(g, closed.iter().map(|s| s.end).collect()));
            } else {
                columns.push(take(all.column(g).as_ref(), &first, None)?);
            }
        }
        columns.extend(aggregates);
        let out = RecordBatch::try_new_with_options(
            Arc::clone(&self.plan.output_schema),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(closed.len())),
        )?;
        // Forget the closed sessions.
        for (g, session) in closed.iter().enumerate() {
            let key = key_of(&keys, first_row[g] as usize);
            let mut emptied = false;
            if let Some(list) = self.sessions.get_mut(key) {
                if let Ok(i) = list.binary_search_by_key(&session.start, |s| s.start) {
                    list.remove(i);
                    self.open_sessions = self.open_sessions.saturating_sub(1);
                }
                emptied = list.is_empty();
            }
            if emptied {
                self.sessions.remove(key);
                self.key_bytes = self.key_bytes.saturating_sub(key.len() as u64 + 64);
            }
        }
        // In order of end, then start: the order they closed in.
        let mut order: Vec<u32> = (0..closed.len() as u32).collect();
        order.sort_by_key(|&g| (closed[g as usize].end, closed[g as usize].start));
        Ok(Some(take_record_batch(&out, &UInt32Array::from(order))?))
    }
}

impl StatefulOperator for SessionAggregateExec {
    fn name(&self) -> &'static str {
        "SessionAggregateExec"
    }

    fn process(
        &mut self,
        _batch: u64,
        inputs: &[Vec<RecordBatch>],
        watermark_us: Option<i64>,
    ) -> Result<OperatorOutput> {
        let partials = one_input("SessionAggregateExec", inputs)?;
        let mut late = 0;
        for partial in partials {
            late += self.add(partial)?;
        }
        let mut chunks = Vec::new();
        if let Some(wm) = watermark_us {
            if let Some(out) = self.close(wm)? {
                chunks.push((None, out));
            }
            self.closed_through = Some(self.closed_through.map_or(wm, |c| c.max(wm)));
        }
        Ok(OperatorOutput { chunks, late })
    }

    fn state_size(&self) -> StateSize {
        StateSize {
            bytes: self.pending_bytes + self.key_bytes + self.open_sessions * 16,
            keys: self.open_sessions,
        }
    }

    /// Always in full: the partial rows of the open sessions (the sessions
    /// are what those rows' windows merge into).
    fn snapshot(&mut self, _delta_base: Option<u64>) -> Result<OperatorSnapshot> {
        Ok(OperatorSnapshot {
            closed_through: self.closed_through,
            delta_base: None,
            sections: vec![self.pending.values().flatten().cloned().collect()],
        })
    }

    fn restore(&mut self, layers: Vec<OperatorSnapshot>, _batch: u64) -> Result<()> {
        let width = self.plan.partial_schema.fields().len();
        for layer in layers {
            if let Some(c) = layer.closed_through {
                self.closed_through = Some(self.closed_through.map_or(c, |o| o.max(c)));
            }
            for section in layer.sections {
                for rows in section {
                    if rows.num_columns() != width {
                        return Err(ExecError::invalid(
                            "checkpointed session state does not match the query",
                        ));
                    }
                    let rows = RecordBatch::try_new(
                        Arc::clone(&self.plan.partial_schema),
                        rows.columns().to_vec(),
                    )?;
                    // Held rows are never late: add them as they were.
                    let closed = self.closed_through.take();
                    let result = self.add(&rows);
                    self.closed_through = closed;
                    result?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{Field, Schema, TimeUnit};
    use datafusion::physical_expr::expressions::Column;
    use drizzle_planner::WindowGroup;

    const GAP: i64 = 10;

    fn plan() -> AggregatePlan {
        let t = DataType::Timestamp(TimeUnit::Microsecond, None);
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("window_start", t.clone(), false),
            Field::new("window_end", t, false),
        ]));
        let col = |n: &str, i: usize| {
            (
                Arc::new(Column::new(n, i)) as Arc<dyn PhysicalExpr>,
                n.into(),
            )
        };
        AggregatePlan {
            group_exprs: vec![col("k", 0), col("window_start", 1), col("window_end", 2)],
            aggregates: vec![],
            filters: vec![],
            group_schema: Arc::clone(&schema),
            partial_schema: Arc::clone(&schema),
            output_schema: schema,
            window: Some(WindowGroup {
                group_index: 1,
                is_end: false,
                size_us: GAP,
                session: Some(SessionBounds {
                    start: Some(1),
                    end: Some(2),
                    keys: vec![0],
                }),
            }),
            changes: false,
            over_changes: false,
        }
    }

    fn rows(p: &AggregatePlan, rows: &[(i64, i64)]) -> RecordBatch {
        RecordBatch::try_new(
            Arc::clone(&p.partial_schema),
            vec![
                Arc::new(Int64Array::from(
                    rows.iter().map(|r| r.0).collect::<Vec<_>>(),
                )),
                Arc::new(TimestampMicrosecondArray::from(
                    rows.iter().map(|r| r.1).collect::<Vec<_>>(),
                )),
                Arc::new(TimestampMicrosecondArray::from(
                    rows.iter().map(|r| r.1 + GAP).collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap()
    }

    fn sessions(out: &OperatorOutput) -> Vec<(i64, i64, i64)> {
        key_and_times(out, [0, 1, 2])
    }

    /// Against a model over all rows at once: per key, the runs of rows
    /// less than GAP apart. Rows arrive out of order within the watermark
    /// delay, in micro-batches, with a checkpoint and restore half way.
    #[test]
    fn sessions_match_a_model_and_close_only_behind_the_watermark() {
        let p = plan();
        let mut seed = 7u64;
        let mut next = move |m: i64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) % m as u64) as i64
        };
        let mut all: Vec<(i64, i64)> = Vec::new();
        let mut exec = SessionAggregateExec::new(p.clone()).unwrap();
        let mut got = Vec::new();
        let mut clock = 0i64;
        let delay = 15;
        for batch in 0..200u64 {
            let wm_before = clock - delay;
            let mut b = Vec::new();
            for _ in 0..next(6) {
                clock += next(7);
                // Up to `delay` out of order, never behind the watermark.
                let t = (clock - next(delay + 1)).max(wm_before);
                b.push((next(4), t));
            }
            all.extend(&b);
            let out = exec
                .process(batch, &[vec![rows(&p, &b)]], Some(clock - delay))
                .unwrap();
            for s in sessions(&out) {
                assert!(
                    s.2 <= clock - delay,
                    "{s:?} closed before the watermark passed it"
                );
                got.push(s);
            }
            if batch == 100 {
                let snap = exec.snapshot(None).unwrap();
                exec = SessionAggregateExec::new(p.clone()).unwrap();
                exec.restore(vec![snap], batch).unwrap();
            }
        }
        let out = exec.process(200, &[vec![]], Some(i64::MAX / 4)).unwrap();
        got.extend(sessions(&out));
        assert_eq!(exec.state_size().keys, 0, "every session closed");
        let mut want = Vec::new();
        for key in 0..4 {
            let mut ts: Vec<i64> = all.iter().filter(|r| r.0 == key).map(|r| r.1).collect();
            ts.sort_unstable();
            let mut i = 0;
            while i < ts.len() {
                let start = ts[i];
                while i + 1 < ts.len() && ts[i + 1] - ts[i] < GAP {
                    i += 1;
                }
                want.push((key, start, ts[i] + GAP));
                i += 1;
            }
        }
        got.sort_unstable();
        want.sort_unstable();
        assert!(want.len() > 20, "the model has sessions to compare");
        assert_eq!(got, want);
    }
}
