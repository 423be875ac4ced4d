//! Checkpoints at group boundaries, kept in an object store.
//!
//! A checkpoint covers a query up to and including one micro-batch `C`, the
//! last batch of a group. Each stateful reduce task writes its keyed state
//! (Arrow IPC, [`StateObject`]) after running `C`; each map task reports the
//! source offset its next batch starts from and its watermark state. Once
//! every piece is in and the query's sink has committed every batch up to
//! `C`, the coordinator writes one [`Manifest`]: the checkpoint exists when,
//! and only when, its manifest does (an object-store `put` is atomic).
//!
//! ```text
//!  <key>/<C, 20 digits>/r<r>.state      reduce partition r's state after batch C
//!  <key>/<C, 20 digits>/MANIFEST.json   written last; names every state object
//! ```
//!
//! Storage goes through the `object_store` crate: a local directory by
//! default (`<data-dir>/checkpoints`), or any S3-compatible store when the
//! location is an `s3://bucket/prefix` URL (credentials and endpoint from the
//! usual `AWS_*` environment variables, see `docs/operations.md`).
//! The last [`KEEP`] checkpoints of a key are kept; older ones, and state
//! objects of checkpoints that never completed, are deleted, except the
//! objects a kept checkpoint's deltas are laid over.
//!
//! **Incremental checkpoints.** Keyed aggregate state is written as a delta
//! when it can be: only the groups changed since the previous complete
//! checkpoint ([`StateObject::delta_base`]), so a checkpoint costs in
//! proportion to the change, not to the state. A delta's [`StateFile::chain`]
//! names the full snapshot and the deltas it is laid over; restoring loads
//! them in order and the latest row of each key wins (windows closed by then
//! are dropped). The coordinator compacts a chain, asking for a full
//! snapshot, after 32 deltas or once the deltas add up to the full
//! snapshot's size, and after a rescale. Window joins and inner interval
//! and regular joins write deltas too: the rows they took in after the
//! base, with the horizon (closed windows, the watermark or the
//! `state_ttl` cut-off) their held rows were last dropped by, so a restore
//! drops the older layers' rows that went since. Joins whose held rows
//! change (outer and weighted joins) are written in full.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{ExecError, Result};

/// Checkpoints kept per query or view.
pub const KEEP: usize = 2;

const MANIFEST: &str = "MANIFEST.json";

/// Where one map partition stands after the checkpoint's batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MapCheckpoint {
    /// Input stage (0, or 1 for a window join's right stream).
    pub stage: u32,
    /// Source partition.
    pub partition: u32,
    /// The source offset the next batch starts from.
    pub next_offset: u64,
    /// Largest event time seen (the watermark state), µs.
    pub max_event_us: Option<i64>,
}

/// One reduce partition's state object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StateFile {
    /// The shuffle stage whose partition this is; absent in checkpoints
    /// written before plans had more than one (it is then the plan's only
    /// stateful stage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<u32>,
    /// Reduce partition.
    pub partition: u32,
    /// Object path in the checkpoint store.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// For a delta (an incremental checkpoint of keyed state): the objects
    /// it is laid over, the full snapshot first, then older deltas in
    /// order. Empty for a full snapshot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<String>,
    /// Bytes of the chain's objects (0 for a full snapshot).
    #[serde(default)]
    pub chain_bytes: u64,
    /// Bytes of the chain's full snapshot (0 for a full snapshot).
    #[serde(default)]
    pub base_bytes: u64,
}

impl StateFile {
    /// Bytes of the deltas laid over the full snapshot, this one included.
    pub fn delta_bytes(&self) -> u64 {
        if self.chain.is_empty() {
            0
        } else {
            self.chain_bytes - self.base_bytes + self.bytes
        }
    }
}

/// The atomic record of one checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// The query or view the checkpoint belongs to.
    pub key: String,
    /// The last micro-batch covered: the next run starts at `batch + 1`.
    pub batch: u64,
    /// The query's time origin (Unix µs): batch `b` triggers at
    /// `origin + interval * (b + 1)`, which fixes every batch's source range.
    pub origin_unix_us: i64,
    /// The batch interval (µs).
    pub interval_us: u64,
    /// Reduce partitions the state was written with.
    pub reduce_partitions: u32,
    /// Every map partition's position.
    pub maps: Vec<MapCheckpoint>,
    /// Every reduce partition's state.
    pub states: Vec<StateFile>,
    /// The last batch the sink had committed when the manifest was written.
    pub last_emitted: Option<u64>,
    /// When it was written (Unix ms).
    pub created_unix_ms: i64,
}

impl Manifest {
    /// Bytes of state the checkpoint holds.
    pub fn bytes(&self) -> u64 {
        self.states.iter().map(|s| s.bytes).sum()
    }
}

/// The checkpoint store.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    location: String,
}

fn err(location: impl Into<String>, e: impl std::fmt::Display) -> ExecError {
    ExecError::Checkpoint {
        location: location.into(),
        message: e.to_string(),
    }
}

impl CheckpointStore {
    /// Opens `location`: an `s3://bucket[/prefix]` URL (configured from the
    /// `AWS_*` environment: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_REGION`, `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`) or a local directory,
    /// created if missing.
    pub fn open(location: &str) -> Result<Self> {
        let store: Arc<dyn ObjectStore> = if location.starts_with("s3://") {
            let s3 = object_store::aws::AmazonS3Builder::from_env()
                .with_url(location)
                .build()
                .map_err(|e| err(location, e))?;
            let prefix = location
                .trim_start_matches("s3://")
                .split_once('/')
                .map(|(_, p)| p.trim_matches('/').to_string())
                .unwrap_or_default();
            if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
            }
        } else {
            std::fs::create_dir_all(location).map_err(|e| ExecError::io(location, e))?;
            Arc::new(
                object_store::local::LocalFileSystem::new_with_prefix(location)
                    .map_err(|e| err(location, e))?,
            )
        };
        Ok(Self {
            store,
            location: location.to_string(),
        })
    }

    /// Where the store is (for messages and `SHOW`).
    pub fn location(&self) -> &str {
        &self.location
    }

    fn dir(key: &str, batch: u64) -> String {
        format!("{key}/{batch:020}")
    }

    /// Writes reduce partition `partition`'s state after `batch`.
    pub async fn put_state(
        &self,
        key: &str,
        batch: u64,
        (stage, partition): (u32, u32),
        bytes: Vec<u8>,
    ) -> Result<StateFile> {
        let path = format!("{}/s{stage}r{partition}.state", Self::dir(key, batch));
        let len = bytes.len() as u64;
        self.store
            .put(&Path::from(path.as_str()), PutPayload::from(bytes))
            .await
            .map_err(|e| err(&path, e))?;
        Ok(StateFile {
            stage: Some(stage),
            partition,
            path,
            bytes: len,
            chain: Vec::new(),
            chain_bytes: 0,
            base_bytes: 0,
        })
    }

    /// Reads an object.
    pub async fn get(&self, path: &str) -> Result<Bytes> {
        let result = self
            .store
            .get(&Path::from(path))
            .await
            .map_err(|e| err(path, e))?;
        result.bytes().await.map_err(|e| err(path, e))
    }

    /// Writes the manifest (the checkpoint exists from here on), then
    /// deletes all but the last [`KEEP`] checkpoints of its key.
    pub async fn commit(&self, manifest: &Manifest) -> Result<()> {
        let path = format!("{}/{MANIFEST}", Self::dir(&manifest.key, manifest.batch));
        let json = serde_json::to_vec_pretty(manifest).map_err(|e| err(&path, e))?;
        self.store
            .put(&Path::from(path.as_str()), PutPayload::from(json))
            .await
            .map_err(|e| err(&path, e))?;
        self.collect_garbage(&manifest.key).await
    }

    /// Checkpoint batches of `key` that have a manifest, and every batch
    /// directory (with or without one).
    async fn batches(&self, key: &str) -> Result<(Vec<u64>, Vec<(u64, Path)>)> {
        let prefix = Path::from(key);
        let mut objects = self.store.list(Some(&prefix));
        let mut complete = Vec::new();
        let mut all = Vec::new();
        while let Some(meta) = objects.next().await {
            let meta = meta.map_err(|e| err(key, e))?;
            let parts: Vec<_> = meta.location.parts().collect();
            let n = parts.len();
            if n < 2 {
                continue;
            }
            let Ok(batch) = parts[n - 2].as_ref().parse::<u64>() else {
                continue;
            };
            if parts[n - 1].as_ref() == MANIFEST {
                complete.push(batch);
            }
            all.push((batch, meta.location));
        }
        complete.sort_unstable();
        Ok((complete, all))
    }

    async fn collect_garbage(&self, key: &str) -> Result<()> {
        let (complete, all) = self.batches(key).await?;
        if complete.len() < KEEP {
            return Ok(());
        }
        // Everything older than the oldest kept checkpoint goes, complete or
        // not, except the objects a kept checkpoint's deltas are laid over.
        let oldest_kept = complete[complete.len() - KEEP];
        let mut referenced = std::collections::HashSet::new();
        for batch in &complete[complete.len() - KEEP..] {
            let path = format!("{}/{MANIFEST}", Self::dir(key, *batch));
            let manifest: Manifest =
                serde_json::from_slice(&self.get(&path).await?).map_err(|e| err(&path, e))?;
            for s in manifest.states {
                referenced.extend(s.chain);
            }
        }
        let mut emptied = std::collections::BTreeSet::new();
        for (batch, path) in all {
            if batch < oldest_kept && !referenced.contains(path.as_ref()) {
                if let Err(e) = self.store.delete(&path).await {
                    tracing::warn!(%path, "cannot delete an old checkpoint object: {e}");
                }
                emptied.insert(batch);
            }
        }
        if !self.location.starts_with("s3://") {
            // A directory store keeps empty directories: remove them too.
            for batch in emptied {
                let dir = std::path::Path::new(&self.location).join(Self::dir(key, batch));
                let _ = std::fs::remove_dir(dir);
            }
        }
        Ok(())
    }

    /// The newest complete checkpoint of `key`.
    pub async fn latest(&self, key: &str) -> Result<Option<Manifest>> {
        let (complete, _) = self.batches(key).await?;
        let Some(batch) = complete.last() else {
            return Ok(None);
        };
        let path = format!("{}/{MANIFEST}", Self::dir(key, *batch));
        let bytes = self.get(&path).await?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| err(&path, e))
    }

    /// Number of complete checkpoints of `key`.
    pub async fn count(&self, key: &str) -> Result<usize> {
        Ok(self.batches(key).await?.0.len())
    }

    /// Deletes every checkpoint of `key` (a dropped view, an ended query).
    pub async fn remove(&self, key: &str) -> Result<()> {
        let (_, all) = self.batches(key).await?;
        for (_, path) in all {
            self.store.delete(&path).await.map_err(|e| err(key, e))?;
        }
        if !self.location.starts_with("s3://") {
            let _ = std::fs::remove_dir_all(std::path::Path::new(&self.location).join(key));
        }
        Ok(())
    }
}

/// A reduce partition's state as stored: a JSON header plus Arrow IPC
/// sections (one per kind of rows the operator keeps).
#[derive(Debug, Default)]
pub struct StateObject {
    /// Windows with an end at or before this are closed (µs).
    pub closed_through: Option<i64>,
    /// A delta: only the keys changed after the checkpoint of this batch
    /// (whose state it is laid over). `None`: the full state.
    pub delta_base: Option<u64>,
    /// Arrow IPC blocks (see `drizzle_shuffle::encode_block`).
    pub sections: Vec<Vec<u8>>,
}

#[derive(Serialize, Deserialize)]
struct StateHeader {
    closed_through: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    delta_base: Option<u64>,
    sections: Vec<u64>,
}

impl StateObject {
    /// `b"DZST" | header_len u32 | header JSON | sections...`
    pub fn encode(&self) -> Result<Vec<u8>> {
        let header = StateHeader {
            closed_through: self.closed_through,
            delta_base: self.delta_base,
            sections: self.sections.iter().map(|s| s.len() as u64).collect(),
        };
        let header = serde_json::to_vec(&header).map_err(|e| err("state", e))?;
        let mut out = Vec::with_capacity(
            8 + header.len() + self.sections.iter().map(Vec::len).sum::<usize>(),
        );
        out.extend_from_slice(b"DZST");
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        for s in &self.sections {
            out.extend_from_slice(s);
        }
        Ok(out)
    }

    fn header(bytes: &[u8]) -> Result<(StateHeader, usize)> {
        let bad = |m: &str| err("state", format!("not a Drizzle state object: {m}"));
        if bytes.len() < 8 || &bytes[..4] != b"DZST" {
            return Err(bad("bad magic"));
        }
        let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
        let header: StateHeader = bytes
            .get(8..8usize.saturating_add(len))
            .ok_or_else(|| bad("truncated header"))
            .and_then(|h| serde_json::from_slice(h).map_err(|e| err("state", e)))?;
        Ok((header, len))
    }

    /// The batch a delta is laid over, read from the header alone.
    pub fn peek_delta_base(bytes: &[u8]) -> Result<Option<u64>> {
        Ok(Self::header(bytes)?.0.delta_base)
    }

    /// The inverse of [`StateObject::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let bad = |m: &str| err("state", format!("not a Drizzle state object: {m}"));
        let (header, len) = Self::header(bytes)?;
        let mut pos = 8 + len;
        let mut sections = Vec::with_capacity(header.sections.len());
        for n in header.sections {
            let end = pos.saturating_add(n as usize);
            sections.push(
                bytes
                    .get(pos..end)
                    .ok_or_else(|| bad("truncated section"))?
                    .to_vec(),
            );
            pos = end;
        }
        Ok(Self {
            closed_through: header.closed_through,
            delta_base: header.delta_base,
            sections,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(key: &str, batch: u64, states: Vec<StateFile>) -> Manifest {
        Manifest {
            key: key.into(),
            batch,
            origin_unix_us: 1,
            interval_us: 1000,
            reduce_partitions: 1,
            maps: vec![MapCheckpoint {
                stage: 0,
                partition: 0,
                next_offset: batch * 10,
                max_event_us: Some(5),
            }],
            states,
            last_emitted: Some(batch),
            created_unix_ms: 0,
        }
    }

    #[tokio::test]
    async fn manifests_are_atomic_and_the_last_two_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
        assert_eq!(store.latest("views/v").await.unwrap(), None);
        for batch in [9u64, 19, 29] {
            let state = store
                .put_state("views/v", batch, (1, 0), vec![1, 2, 3])
                .await
                .unwrap();
            store
                .commit(&manifest("views/v", batch, vec![state]))
                .await
                .unwrap();
        }
        // A checkpoint that wrote its state but never its manifest does not exist.
        store
            .put_state("views/v", 39, (1, 0), vec![4, 5])
            .await
            .unwrap();
        let latest = store.latest("views/v").await.unwrap().unwrap();
        assert_eq!(latest.batch, 29);
        assert_eq!(latest.bytes(), 3);
        assert_eq!(store.get(&latest.states[0].path).await.unwrap().len(), 3);
        assert_eq!(store.count("views/v").await.unwrap(), 2, "kept: 19 and 29");
        assert!(store
            .get("views/v/00000000000000000009/r0.state")
            .await
            .is_err());
        // Another key is independent; removal deletes everything of a key.
        assert_eq!(store.latest("views/w").await.unwrap(), None);
        store.remove("views/v").await.unwrap();
        assert_eq!(store.latest("views/v").await.unwrap(), None);
    }

    #[test]
    fn state_objects_round_trip_and_reject_garbage() {
        let s = StateObject {
            closed_through: Some(42),
            delta_base: Some(7),
            sections: vec![vec![1, 2], vec![], vec![3]],
        };
        let back = StateObject::decode(&s.encode().unwrap()).unwrap();
        assert_eq!(back.closed_through, Some(42));
        assert_eq!(back.delta_base, Some(7));
        assert_eq!(
            StateObject::peek_delta_base(&s.encode().unwrap()).unwrap(),
            Some(7)
        );
        assert_eq!(back.sections, vec![vec![1, 2], vec![], vec![3]]);
        assert!(StateObject::decode(b"nope").is_err());
        let mut cut = s.encode().unwrap();
        cut.truncate(cut.len() - 1);
        assert!(StateObject::decode(&cut).is_err());
    }
}
