//! The durable, partitioned, append-only log behind built-in streams and
//! tables.
//!
//! Each partition is one file of frames:
//!
//! ```text
//! frame := magic "DRZ2" | payload_len u32 | crc32(payload) u32 | base_offset u64 | rows u32
//!          | append_time_us i64 | payload
//! payload := one Arrow IPC stream holding one RecordBatch
//! ```
//!
//! (Frames written before append times existed, magic "DRZ1", read with
//! append time 0.)
//!
//! Offsets count rows. An append is one frame, written and then `fdatasync`ed
//! before [`PartitionLog::append`] returns, so an acknowledged `INSERT` or
//! `COPY` survives `kill -9`; a statement is one frame, so it is all or
//! nothing. On open, a torn or corrupt tail (a crash mid-append) is cut off:
//! those rows were never acknowledged.
//!
//! # Invariants
//! * Appends to one partition are serialised by its file mutex; the index and
//!   `end` move forward only after the frame is durable, so readers never see
//!   rows that could be lost.
//! * Frames are never rewritten; a batch's source range `[from, to)` reads the
//!   same rows every time (replay).
//! * Append times never decrease within a partition, and a frame becomes
//!   visible before any later append can take a smaller time; so the rows
//!   appended at or before time `t` ([`PartitionLog::end_at`]) are the same
//!   whenever that is asked after `t`. A micro-batch's source range ends
//!   there for its trigger time, which makes every batch replayable from its
//!   id alone (recovery, restart).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use crate::error::{ExecError, Result};

const MAGIC_V1: &[u8; 4] = b"DRZ1";
const MAGIC: &[u8; 4] = b"DRZ2";
const HEADER_V1: usize = 4 + 4 + 4 + 8 + 4;
const HEADER: usize = HEADER_V1 + 8;
/// Bytes of decoded batches a stream partition keeps cached (tables keep all).
const STREAM_CACHE_BYTES: usize = 64 << 20;

#[derive(Debug, Clone)]
struct Frame {
    base: u64,
    rows: u32,
    /// Append time (Unix µs).
    ts: i64,
    pos: u64,
    len: u32,
}

/// One partition of a log.
#[derive(Debug)]
pub struct PartitionLog {
    path: PathBuf,
    schema: SchemaRef,
    file: Mutex<File>,
    frames: RwLock<Vec<Frame>>,
    end: AtomicU64,
    /// Set while an append is choosing its time and becoming visible.
    appending: std::sync::atomic::AtomicBool,
    /// The last append time (under the file mutex).
    last_ts: std::sync::atomic::AtomicI64,
    cache: Mutex<Cache>,
}

#[derive(Debug)]
struct Cache {
    limit: Option<usize>,
    bytes: usize,
    /// Decoded frames by frame index, oldest first.
    entries: std::collections::VecDeque<(usize, RecordBatch)>,
}

impl Cache {
    fn get(&self, idx: usize) -> Option<RecordBatch> {
        self.entries
            .iter()
            .rev()
            .find(|(i, _)| *i == idx)
            .map(|(_, b)| b.clone())
    }

    fn put(&mut self, idx: usize, batch: RecordBatch) {
        if self.entries.iter().any(|(i, _)| *i == idx) {
            return;
        }
        self.bytes += batch.get_array_memory_size();
        self.entries.push_back((idx, batch));
        if let Some(limit) = self.limit {
            while self.bytes > limit && self.entries.len() > 1 {
                if let Some((_, old)) = self.entries.pop_front() {
                    self.bytes -= old.get_array_memory_size();
                }
            }
        }
    }
}

impl PartitionLog {
    /// Opens (creating if needed) a partition file and recovers its index.
    pub fn open(path: PathBuf, schema: SchemaRef, cache_all: bool) -> Result<Self> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| ExecError::io(&path, e))?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)
            .map_err(|e| ExecError::io(&path, e))?;
        let mut frames = Vec::new();
        let mut pos = 0usize;
        let mut end = 0u64;
        while pos + HEADER_V1 <= data.len() {
            let h = &data[pos..pos + HEADER_V1];
            let header = match &h[0..4] {
                m if m == MAGIC && pos + HEADER <= data.len() => HEADER,
                m if m == MAGIC_V1 => HEADER_V1,
                _ => break,
            };
            let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
            let crc = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
            let base = u64::from_le_bytes(h[12..20].try_into().unwrap_or_default());
            let rows = u32::from_le_bytes([h[20], h[21], h[22], h[23]]);
            let ts = if header == HEADER {
                i64::from_le_bytes(data[pos + 24..pos + 32].try_into().unwrap_or_default())
            } else {
                0
            };
            let start = pos + header;
            if start + len > data.len()
                || crc32fast::hash(&data[start..start + len]) != crc
                || base != end
            {
                break;
            }
            frames.push(Frame {
                base,
                rows,
                ts,
                pos: start as u64,
                len: len as u32,
            });
            end += rows as u64;
            pos = start + len;
        }
        if pos < data.len() {
            tracing::warn!(path = %path.display(), valid = pos, total = data.len(), "truncating torn log tail");
            file.set_len(pos as u64)
                .map_err(|e| ExecError::io(&path, e))?;
            file.sync_all().map_err(|e| ExecError::io(&path, e))?;
        }
        file.seek(SeekFrom::End(0))
            .map_err(|e| ExecError::io(&path, e))?;
        let last_ts = frames.last().map_or(0, |f| f.ts);
        Ok(Self {
            path,
            schema,
            file: Mutex::new(file),
            frames: RwLock::new(frames),
            end: AtomicU64::new(end),
            appending: std::sync::atomic::AtomicBool::new(false),
            last_ts: std::sync::atomic::AtomicI64::new(last_ts),
            cache: Mutex::new(Cache {
                limit: (!cache_all).then_some(STREAM_CACHE_BYTES),
                bytes: 0,
                entries: Default::default(),
            }),
        })
    }

    /// The row schema.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Offset one past the last durable row.
    pub fn end_offset(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    /// Appends a batch durably; returns its base offset.
    pub fn append(&self, batch: &RecordBatch) -> Result<u64> {
        if batch.num_rows() == 0 {
            return Ok(self.end_offset());
        }
        let payload = drizzle_shuffle::encode_block(&self.schema, std::slice::from_ref(batch))?;
        let mut file = self.file.lock();
        // Announce the append before choosing its time: a reader that sees
        // no append in progress knows any later one gets a later time.
        self.appending.store(true, Ordering::SeqCst);
        let result = self.append_locked(&mut file, batch, &payload);
        self.appending.store(false, Ordering::SeqCst);
        result
    }

    fn append_locked(&self, file: &mut File, batch: &RecordBatch, payload: &[u8]) -> Result<u64> {
        let ts = unix_us().max(self.last_ts.load(Ordering::Acquire));
        let base = self.end.load(Ordering::Acquire);
        let mut buf = Vec::with_capacity(HEADER + payload.len());
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        buf.extend_from_slice(&base.to_le_bytes());
        buf.extend_from_slice(&(batch.num_rows() as u32).to_le_bytes());
        buf.extend_from_slice(&ts.to_le_bytes());
        buf.extend_from_slice(payload);
        let pos = file
            .seek(SeekFrom::End(0))
            .map_err(|e| ExecError::io(&self.path, e))?;
        if let Err(e) = file.write_all(&buf).and_then(|_| file.sync_data()) {
            // Undo a partial write so the file stays a sequence of whole frames.
            let _ = file.set_len(pos);
            return Err(ExecError::io(&self.path, e));
        }
        self.last_ts.store(ts, Ordering::Release);
        let mut frames = self.frames.write();
        frames.push(Frame {
            base,
            rows: batch.num_rows() as u32,
            ts,
            pos: pos + HEADER as u64,
            len: payload.len() as u32,
        });
        let idx = frames.len() - 1;
        self.cache.lock().put(idx, batch.clone());
        self.end
            .store(base + batch.num_rows() as u64, Ordering::Release);
        Ok(base)
    }

    /// Offset one past the last row appended at or before `t_us` (Unix µs).
    /// The same answer every time once the clock has passed `t_us`.
    pub fn end_at(&self, t_us: i64) -> u64 {
        if self.appending.load(Ordering::SeqCst) {
            // An append in progress may have chosen a time <= t: wait for it.
            drop(self.file.lock());
        }
        let frames = self.frames.read();
        let n = frames.partition_point(|f| f.ts <= t_us);
        match n {
            0 => 0,
            n => frames[n - 1].base + frames[n - 1].rows as u64,
        }
    }

    /// Rows `[from, to)`, as slices of the stored batches.
    pub fn read(&self, from: u64, to: u64) -> Result<Vec<RecordBatch>> {
        let to = to.min(self.end_offset());
        if from >= to {
            return Ok(Vec::new());
        }
        let frames: Vec<(usize, Frame)> = {
            let all = self.frames.read();
            let first = all.partition_point(|f| f.base + f.rows as u64 <= from);
            all[first..]
                .iter()
                .enumerate()
                .take_while(|(_, f)| f.base < to)
                .map(|(i, f)| (first + i, f.clone()))
                .collect()
        };
        let mut out = Vec::with_capacity(frames.len());
        for (idx, f) in frames {
            let batch = self.frame_batch(idx, &f)?;
            let lo = from.saturating_sub(f.base) as usize;
            let hi = ((to - f.base) as usize).min(f.rows as usize);
            out.push(if lo == 0 && hi == f.rows as usize {
                batch
            } else {
                batch.slice(lo, hi - lo)
            });
        }
        Ok(out)
    }

    fn frame_batch(&self, idx: usize, f: &Frame) -> Result<RecordBatch> {
        if let Some(b) = self.cache.lock().get(idx) {
            return Ok(b);
        }
        let mut buf = vec![0u8; f.len as usize];
        {
            use std::os::unix::fs::FileExt;
            let file = self.file.lock();
            file.read_exact_at(&mut buf, f.pos)
                .map_err(|e| ExecError::io(&self.path, e))?;
        }
        let mut batches = drizzle_shuffle::decode_block(&Bytes::from(buf))?;
        if batches.len() != 1 {
            return Err(ExecError::Corrupt {
                path: self.path.display().to_string(),
                message: format!("frame at {} holds {} batches", f.pos, batches.len()),
            });
        }
        let batch = batches.remove(0);
        self.cache.lock().put(idx, batch.clone());
        Ok(batch)
    }
}

fn unix_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A stream or table log: one [`PartitionLog`] per partition.
#[derive(Debug)]
pub struct Log {
    /// The partitions.
    pub partitions: Vec<Arc<PartitionLog>>,
    schema: SchemaRef,
    next: AtomicUsize,
    dir: PathBuf,
}

impl Log {
    /// Opens the log in `dir` with `partitions` partitions.
    pub fn open(dir: &Path, schema: SchemaRef, partitions: u32, cache_all: bool) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| ExecError::io(dir, e))?;
        let partitions = (0..partitions.max(1))
            .map(|p| {
                PartitionLog::open(
                    dir.join(format!("p{p}.log")),
                    Arc::clone(&schema),
                    cache_all,
                )
                .map(Arc::new)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            partitions,
            schema,
            next: AtomicUsize::new(0),
            dir: dir.to_path_buf(),
        })
    }

    /// The row schema.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Appends one statement's rows durably, to one partition chosen round-robin.
    pub fn append(&self, batch: &RecordBatch) -> Result<()> {
        let p = self.next.fetch_add(1, Ordering::Relaxed) % self.partitions.len();
        self.partitions[p].append(batch).map(|_| ())
    }

    /// Every row of every partition (tables).
    pub fn read_all(&self) -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        for p in &self.partitions {
            out.extend(p.read(0, p.end_offset())?);
        }
        Ok(out)
    }

    /// Total rows across partitions.
    pub fn row_count(&self) -> u64 {
        self.partitions.iter().map(|p| p.end_offset()).sum()
    }

    /// Deletes the log's files (DROP).
    pub fn remove_files(&self) -> Result<()> {
        std::fs::remove_dir_all(&self.dir).map_err(|e| ExecError::io(&self.dir, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    fn batch(schema: &SchemaRef, v: Vec<i64>) -> RecordBatch {
        RecordBatch::try_new(Arc::clone(schema), vec![Arc::new(Int64Array::from(v))]).unwrap()
    }

    #[test]
    fn append_read_reopen_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let schema: SchemaRef =
            Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        {
            let log = Log::open(dir.path(), Arc::clone(&schema), 1, false).unwrap();
            log.append(&batch(&schema, vec![1, 2, 3])).unwrap();
            log.append(&batch(&schema, vec![4, 5])).unwrap();
            let part = &log.partitions[0];
            assert_eq!(part.end_offset(), 5);
            let rows: Vec<i64> = part
                .read(2, 4)
                .unwrap()
                .iter()
                .flat_map(|b| {
                    b.column(0)
                        .as_any()
                        .downcast_ref::<Int64Array>()
                        .unwrap()
                        .values()
                        .to_vec()
                })
                .collect();
            assert_eq!(rows, vec![3, 4]);
        }
        // Simulate a crash mid-append: garbage after the last whole frame.
        let path = dir.path().join("p0.log");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"DRZ1\xff\xff\x00\x00partial").unwrap();
        drop(f);
        let log = Log::open(dir.path(), Arc::clone(&schema), 1, false).unwrap();
        assert_eq!(log.row_count(), 5);
        log.append(&batch(&schema, vec![6])).unwrap();
        let log = Log::open(dir.path(), schema, 1, false).unwrap();
        assert_eq!(log.row_count(), 6);
        assert_eq!(log.read_all().unwrap().len(), 3);
    }

    #[test]
    fn append_times_fix_what_a_trigger_time_reads_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let schema: SchemaRef =
            Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let log = Log::open(dir.path(), Arc::clone(&schema), 1, false).unwrap();
        let part = Arc::clone(&log.partitions[0]);
        let before = unix_us() - 1;
        part.append(&batch(&schema, vec![1, 2])).unwrap();
        let between = unix_us();
        // Make sure the next append gets a strictly later time.
        while unix_us() <= between {
            std::hint::spin_loop();
        }
        part.append(&batch(&schema, vec![3])).unwrap();
        assert_eq!(part.end_at(before), 0);
        assert_eq!(part.end_at(between), 2);
        assert_eq!(part.end_at(unix_us()), 3);
        drop(log);
        let log = Log::open(dir.path(), schema, 1, false).unwrap();
        let part = &log.partitions[0];
        assert_eq!(part.end_at(between), 2, "append times survive a reopen");
        assert_eq!(part.end_at(i64::MAX), 3);
    }
}
