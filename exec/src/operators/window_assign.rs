//! `WindowAssignExec`: `TUMBLE`/`HOP`/`SESSION` window assignment and late-row
//! dropping against the per-partition watermark.

use super::*;

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

    /// Event time without windows: drops the rows older than the watermark
    /// before them (judged row by row, as [`Self::assign`] does) and
    /// advances the largest event time. Rows with a NULL time are kept.
    pub fn track(
        &mut self,
        spec: &EventTimeSpec,
        batch: &RecordBatch,
    ) -> Result<(RecordBatch, u64)> {
        let column = batch
            .columns()
            .get(spec.time_column)
            .ok_or_else(|| ExecError::invalid("event-time column out of range"))?;
        let ts = column
            .as_primitive_opt::<TimestampMicrosecondType>()
            .ok_or_else(|| {
                ExecError::invalid("event-time column is not a microsecond timestamp")
            })?;
        let delay = spec.watermark_delay_ms * 1000;
        let mut max = self.max_event_us;
        let mut keep: Option<Vec<bool>> = None;
        let mut late = 0u64;
        for row in 0..batch.num_rows() {
            if ts.is_null(row) {
                continue;
            }
            let t = ts.value(row);
            if max.is_some_and(|m| t < m.saturating_sub(delay)) {
                late += 1;
                keep.get_or_insert_with(|| vec![true; batch.num_rows()])[row] = false;
                continue;
            }
            max = Some(max.map_or(t, |m| m.max(t)));
        }
        self.max_event_us = max;
        let out = match keep {
            Some(mask) => filter_record_batch(batch, &BooleanArray::from(mask))?,
            None => batch.clone(),
        };
        Ok((out, late))
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
            if spec.kind == WindowKind::Session {
                // A row older than the watermark is late, as for event
                // time without windows: sessions its window could join may
                // have closed already. Its provisional window is [t, t + gap).
                if wm.is_some_and(|w| t < w) {
                    late += 1;
                } else {
                    take_idx.push(row as u32);
                    starts.push(t);
                }
                max = Some(max.map_or(t, |m| m.max(t)));
                continue;
            }
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
        let base = if take_idx.len() == batch.num_rows() && spec.kind != WindowKind::Hop {
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
