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
//! nothing.
//!
//! # Damage
//! On open, a torn tail (an incomplete or unreadable last frame, with no
//! whole frame after it: a crash mid-append) is cut off: those rows were
//! never acknowledged. Any other damage (a bad frame with good frames after
//! it) is never cut: [`PartitionLog::open`] refuses the file with
//! [`ExecError::Corrupt`], naming the file and byte offset, and
//! [`PartitionLog::repair`] (`drizzle repair`) moves each damaged region to a
//! quarantine file beside the log and puts a *gap* frame in its place:
//!
//! ```text
//! gap := magic "DRZG" | 0 u32 | 0 u32 | base_offset u64 | rows u32 | append_time_us i64
//! ```
//!
//! A gap stands for rows that were lost; it keeps every later row at its
//! offset (so replayable batch ranges, view start offsets and checkpointed
//! source positions stay valid) and reads as no rows.
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
const MAGIC_GAP: &[u8; 4] = b"DRZG";
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
    /// Lost rows (a repaired region): read as nothing.
    gap: bool,
}

/// A frame found while scanning a file.
struct Scanned {
    frame: Frame,
    /// Byte offset one past the frame.
    next: usize,
}

/// Reads the frame starting at byte `pos` of `data`, if it is whole and its
/// checksum matches.
fn frame_at(data: &[u8], pos: usize) -> Option<Scanned> {
    let h = data.get(pos..pos + HEADER_V1)?;
    let header = match &h[0..4] {
        m if (m == MAGIC || m == MAGIC_GAP) && pos + HEADER <= data.len() => HEADER,
        m if m == MAGIC_V1 => HEADER_V1,
        _ => return None,
    };
    let gap = &h[0..4] == MAGIC_GAP;
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    let crc = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    let base = u64::from_le_bytes(h[12..20].try_into().ok()?);
    let rows = u32::from_le_bytes([h[20], h[21], h[22], h[23]]);
    let ts = if header == HEADER {
        i64::from_le_bytes(data[pos + 24..pos + 32].try_into().ok()?)
    } else {
        0
    };
    let start = pos + header;
    let end = start.checked_add(len)?;
    if end > data.len() || (gap && len != 0) || crc32fast::hash(&data[start..end]) != crc {
        return None;
    }
    Some(Scanned {
        frame: Frame {
            base,
            rows,
            ts,
            pos: start as u64,
            len: len as u32,
            gap,
        },
        next: end,
    })
}

/// Whether `tail` is a frame cut short by a crash mid-append: too short
/// for a header, or shorter than its header says.
fn incomplete(tail: &[u8]) -> bool {
    if tail.len() < HEADER_V1 {
        return true;
    }
    let header = match &tail[0..4] {
        m if m == MAGIC || m == MAGIC_GAP => HEADER,
        m if m == MAGIC_V1 => HEADER_V1,
        _ => return false,
    };
    let len = u32::from_le_bytes([tail[4], tail[5], tail[6], tail[7]]) as usize;
    tail.len() < header.saturating_add(len)
}

/// The first whole frame that starts after byte `from`, if any.
fn next_whole_frame(data: &[u8], from: usize) -> Option<(usize, Scanned)> {
    let mut at = from;
    while at + 4 <= data.len() {
        let found = data[at..]
            .windows(3)
            .position(|w| w == b"DRZ")
            .map(|i| at + i)?;
        if let Some(f) = frame_at(data, found) {
            return Some((found, f));
        }
        at = found + 1;
    }
    None
}

/// The frames of a log file up to the first damage; `Ok` holds them and the
/// end of the last good one.
struct Scan {
    frames: Vec<Frame>,
    end_rows: u64,
    valid_to: usize,
}

fn scan(data: &[u8]) -> Scan {
    let mut frames = Vec::new();
    let mut pos = 0usize;
    let mut end = 0u64;
    while let Some(f) = frame_at(data, pos) {
        if f.frame.base != end {
            break;
        }
        end += f.frame.rows as u64;
        pos = f.next;
        frames.push(f.frame);
    }
    Scan {
        frames,
        end_rows: end,
        valid_to: pos,
    }
}

/// What [`PartitionLog::repair`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RepairReport {
    /// Damaged regions moved aside: (byte offset, length, quarantine file).
    pub quarantined: Vec<(u64, u64, PathBuf)>,
    /// Rows the damaged regions held (now gaps).
    pub lost_rows: u64,
    /// A torn tail that was cut (bytes).
    pub torn_tail: u64,
}

/// One partition of a log.
#[derive(Debug)]
pub struct PartitionLog {
    path: PathBuf,
    schema: SchemaRef,
    /// Serialises appends. No descriptor is held between operations: an
    /// append or an uncached read opens the file for itself, so a server
    /// with thousands of partitions holds no descriptor for idle ones.
    append_lock: Mutex<()>,
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
    ///
    /// A torn tail is cut; any other damage fails with
    /// [`ExecError::Corrupt`] (see the module docs) and changes nothing.
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
        let Scan {
            frames,
            end_rows: end,
            valid_to: pos,
        } = scan(&data);
        if pos < data.len() {
            if let Some((at, _)) = next_whole_frame(&data, pos + 1) {
                return Err(ExecError::Corrupt {
                    path: path.display().to_string(),
                    message: format!(
                        "damaged frame at byte {pos} ({} bytes up to the next good frame, at \
                         byte {at}, of {} in the file); refusing to open it, which would drop \
                         every good frame after it. Stop the server and run `drizzle repair \
                         --data-dir <dir>`: it moves the damaged bytes to a quarantine file \
                         and keeps every good frame",
                        at - pos,
                        data.len()
                    ),
                });
            }
            if !incomplete(&data[pos..]) {
                return Err(ExecError::Corrupt {
                    path: path.display().to_string(),
                    message: format!(
                        "the last frame, at byte {pos}, is whole but damaged (its rows were \
                         acknowledged); refusing to cut it. Stop the server and run `drizzle \
                         repair --data-dir <dir>` to move it to a quarantine file"
                    ),
                });
            }
            tracing::warn!(path = %path.display(), valid = pos, total = data.len(), "truncating torn log tail");
            file.set_len(pos as u64)
                .map_err(|e| ExecError::io(&path, e))?;
            file.sync_all().map_err(|e| ExecError::io(&path, e))?;
        }
        drop(file);
        let last_ts = frames.last().map_or(0, |f| f.ts);
        Ok(Self {
            path,
            schema,
            append_lock: Mutex::new(()),
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

    /// Repairs a damaged partition file in place (the server must not be
    /// running): each damaged region goes to `<file>.bad-<byte offset>`
    /// beside it and is replaced by a gap frame for the rows it held, so
    /// every good frame after it keeps its rows and offsets; a torn tail is
    /// cut. The new file replaces the old one atomically.
    pub fn repair(path: &Path) -> Result<RepairReport> {
        let data = std::fs::read(path).map_err(|e| ExecError::io(path, e))?;
        let mut report = RepairReport::default();
        let mut out: Vec<u8> = Vec::with_capacity(data.len());
        let mut pos = 0usize;
        let mut end = 0u64;
        let mut last_ts = 0i64;
        while pos < data.len() {
            match frame_at(&data, pos) {
                Some(f) if f.frame.base == end => {
                    out.extend_from_slice(&data[pos..f.next]);
                    end += f.frame.rows as u64;
                    last_ts = f.frame.ts;
                    pos = f.next;
                }
                _ => {
                    let Some((at, next)) = next_whole_frame(&data, pos + 1) else {
                        // The tail: kept aside too, whole or torn.
                        let quarantine = PathBuf::from(format!("{}.bad-{pos}", path.display()));
                        write_synced(&quarantine, &data[pos..])?;
                        report.torn_tail = (data.len() - pos) as u64;
                        report.quarantined.push((
                            pos as u64,
                            (data.len() - pos) as u64,
                            quarantine,
                        ));
                        break;
                    };
                    let quarantine = PathBuf::from(format!("{}.bad-{pos}", path.display()));
                    write_synced(&quarantine, &data[pos..at])?;
                    report
                        .quarantined
                        .push((pos as u64, (at - pos) as u64, quarantine));
                    // The rows between the last good frame and the next one
                    // are lost; a later frame with an earlier base (its own
                    // header damaged) cannot be placed and is quarantined too.
                    if next.frame.base > end {
                        let lost = next.frame.base - end;
                        let Ok(rows) = u32::try_from(lost) else {
                            return Err(ExecError::Corrupt {
                                path: path.display().to_string(),
                                message: format!(
                                    "a gap of {lost} rows at byte {pos} is too large to record"
                                ),
                            });
                        };
                        out.extend_from_slice(MAGIC_GAP);
                        out.extend_from_slice(&0u32.to_le_bytes());
                        out.extend_from_slice(&crc32fast::hash(&[]).to_le_bytes());
                        out.extend_from_slice(&end.to_le_bytes());
                        out.extend_from_slice(&rows.to_le_bytes());
                        out.extend_from_slice(&last_ts.to_le_bytes());
                        report.lost_rows += lost;
                        end = next.frame.base;
                    }
                    pos = at;
                }
            }
        }
        if report.quarantined.is_empty() && report.torn_tail == 0 {
            return Ok(report);
        }
        let tmp = PathBuf::from(format!("{}.repair", path.display()));
        write_synced(&tmp, &out)?;
        std::fs::rename(&tmp, path).map_err(|e| ExecError::io(path, e))?;
        if let Some(dir) = path.parent() {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(report)
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
        let _appending = self.append_lock.lock();
        let mut file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| ExecError::io(&self.path, e))?;
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
            gap: false,
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
            drop(self.append_lock.lock());
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
            if f.gap {
                continue;
            }
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
            // Frames are never rewritten: a read needs no lock.
            File::open(&self.path)
                .and_then(|file| file.read_exact_at(&mut buf, f.pos))
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

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| ExecError::io(path, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| ExecError::io(path, e))
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

    fn values(log: &PartitionLog, from: u64, to: u64) -> Vec<i64> {
        log.read(from, to)
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
            .collect()
    }

    /// Damage in the middle is refused, never cut; repair keeps every good
    /// frame after it at its offsets.
    #[test]
    fn corruption_in_the_middle_is_refused_then_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let schema: SchemaRef =
            Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let path = dir.path().join("p0.log");
        let frame_starts: Vec<u64>;
        {
            let log = PartitionLog::open(path.clone(), Arc::clone(&schema), false).unwrap();
            let mut starts = Vec::new();
            for i in 0..5 {
                starts.push(std::fs::metadata(&path).unwrap().len());
                log.append(&batch(&schema, vec![i * 10, i * 10 + 1]))
                    .unwrap();
            }
            frame_starts = starts;
        }
        let good = std::fs::read(&path).unwrap();
        // 16 bytes overwritten inside the third frame's payload.
        let mut bad = good.clone();
        let at = frame_starts[2] as usize + HEADER + 8;
        bad[at..at + 16].copy_from_slice(&[0xAB; 16]);
        std::fs::write(&path, &bad).unwrap();
        let err = PartitionLog::open(path.clone(), Arc::clone(&schema), false).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("byte {}", frame_starts[2])) && msg.contains("drizzle repair"),
            "{msg}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), bad, "nothing was cut");
        let report = PartitionLog::repair(&path).unwrap();
        assert_eq!(report.lost_rows, 2);
        assert_eq!(report.quarantined.len(), 1);
        let (offset, len, quarantine) = &report.quarantined[0];
        assert_eq!(*offset, frame_starts[2]);
        assert_eq!(*len, frame_starts[3] - frame_starts[2]);
        assert_eq!(
            std::fs::read(quarantine).unwrap(),
            bad[frame_starts[2] as usize..frame_starts[3] as usize]
        );
        let log = PartitionLog::open(path.clone(), Arc::clone(&schema), false).unwrap();
        assert_eq!(log.end_offset(), 10, "offsets are kept");
        assert_eq!(values(&log, 0, 10), vec![0, 1, 10, 11, 30, 31, 40, 41]);
        assert_eq!(
            values(&log, 6, 8),
            vec![30, 31],
            "later rows keep their offsets"
        );
        log.append(&batch(&schema, vec![50])).unwrap();
        drop(log);
        let log = PartitionLog::open(path, schema, false).unwrap();
        assert_eq!(values(&log, 10, 11), vec![50]);
    }

    /// A whole last frame that is damaged held acknowledged rows: it is
    /// refused, not cut, and repair keeps it aside.
    #[test]
    fn a_damaged_last_whole_frame_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let schema: SchemaRef =
            Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let path = dir.path().join("p0.log");
        {
            let log = PartitionLog::open(path.clone(), Arc::clone(&schema), false).unwrap();
            log.append(&batch(&schema, vec![1])).unwrap();
            log.append(&batch(&schema, vec![2])).unwrap();
        }
        let mut data = std::fs::read(&path).unwrap();
        let n = data.len();
        data[n - 3] ^= 0xff;
        std::fs::write(&path, &data).unwrap();
        assert!(PartitionLog::open(path.clone(), Arc::clone(&schema), false).is_err());
        let report = PartitionLog::repair(&path).unwrap();
        assert_eq!(
            report.quarantined.len(),
            1,
            "the damaged frame is kept aside"
        );
        let log = PartitionLog::open(path, schema, false).unwrap();
        assert_eq!(values(&log, 0, 5), vec![1]);
    }

    /// Thousands of partitions hold no descriptors between operations.
    #[test]
    fn partitions_hold_no_descriptors() {
        let open_fds = || {
            std::fs::read_dir("/proc/self/fd")
                .map(|d| d.count())
                .unwrap_or(0)
        };
        let dir = tempfile::tempdir().unwrap();
        let schema: SchemaRef =
            Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let before = open_fds();
        let log = Log::open(dir.path(), Arc::clone(&schema), 2048, false).unwrap();
        for i in 0..4096 {
            log.append(&batch(&schema, vec![i])).unwrap();
        }
        assert_eq!(log.row_count(), 4096);
        let after = open_fds();
        // Other tests run alongside: allow them some descriptors.
        assert!(after < before + 100, "{before} -> {after} descriptors");
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
