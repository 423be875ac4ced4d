//! The worker-local block store.
//!
//! Map tasks put their blocks here; reduce tasks read them once every
//! `MapOutputReady` notice of their batch has arrived.
//!
//! Two retention rules, chosen per query:
//! * **consume on read** (the default): a block is removed when its consumer
//!   has read it, so the store holds only in-flight micro-batches;
//! * **retain until covered** ([`BlockStore::retain`]): blocks stay after
//!   they are read, until a checkpoint covers their batch
//!   ([`BlockStore::drop_through`]). This is what lets a query recover only
//!   the work a lost worker held: a reduce partition restored from the last
//!   checkpoint on another worker pulls the survivors' map outputs of every
//!   batch since, without the survivors re-running anything.
//!
//! Either way the store stays bounded on a stream that runs for days: by
//! the batches in flight, or by those since the last checkpoint.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::error::{Result, ShuffleError};
use crate::ids::{BlockId, QueryId, QueryToken};

/// In-memory store of encoded shuffle blocks, keyed by [`BlockId`].
#[derive(Debug, Default)]
pub struct BlockStore {
    blocks: Mutex<HashMap<BlockId, Bytes>>,
    /// Queries whose blocks are kept after they are read.
    retained: Mutex<HashSet<QueryId>>,
    /// Each query's ticket token: a fetch must present it.
    tokens: Mutex<HashMap<QueryId, QueryToken>>,
}

impl BlockStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores a block, replacing an older copy (a re-run task writes the same bytes).
    pub fn put(&self, id: BlockId, bytes: Bytes) {
        self.blocks.lock().insert(id, bytes);
    }

    /// Returns a block to its consumer. It is removed, unless its query
    /// retains blocks until a checkpoint covers them.
    pub fn read(&self, id: &BlockId) -> Result<Bytes> {
        let retained = self.retained.lock().contains(&id.query);
        let mut blocks = self.blocks.lock();
        let found = if retained {
            blocks.get(id).cloned()
        } else {
            blocks.remove(id)
        };
        found.ok_or_else(|| ShuffleError::MissingBlock {
            block: id.to_string(),
        })
    }

    /// Sets the token a fetch of `query`'s blocks must present.
    pub fn set_token(&self, query: QueryId, token: QueryToken) {
        self.tokens.lock().insert(query, token);
    }

    /// Whether `token` is `query`'s (no query: no token is).
    pub fn authorizes(&self, query: QueryId, token: &[u8]) -> bool {
        self.tokens
            .lock()
            .get(&query)
            .is_some_and(|t| t.matches(token))
    }

    /// Sets whether `query`'s blocks survive being read (see the module docs).
    pub fn retain(&self, query: QueryId, retain: bool) {
        let mut retained = self.retained.lock();
        if retain {
            retained.insert(query);
        } else {
            retained.remove(&query);
        }
    }

    /// Drops `query`'s blocks of every batch up to and including `batch`:
    /// a checkpoint covers them, no recovery will read them again.
    pub fn drop_through(&self, query: QueryId, batch: u64) {
        self.blocks
            .lock()
            .retain(|id, _| id.query != query || id.batch.0 > batch);
    }

    /// Drops every block of a query (the query ended or was cancelled).
    pub fn drop_query(&self, query: QueryId) {
        self.retained.lock().remove(&query);
        self.tokens.lock().remove(&query);
        self.blocks.lock().retain(|id, _| id.query != query);
    }

    /// Bytes of `query`'s blocks held (in flight, or retained for recovery).
    pub fn query_bytes(&self, query: QueryId) -> usize {
        self.blocks
            .lock()
            .iter()
            .filter(|(id, _)| id.query == query)
            .map(|(_, b)| b.len())
            .sum()
    }

    /// Number of blocks held and their total size in bytes.
    pub fn usage(&self) -> (usize, usize) {
        let blocks = self.blocks.lock();
        (blocks.len(), blocks.values().map(Bytes::len).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::*;

    fn id(q: u64, b: u64, r: u32) -> BlockId {
        BlockId {
            query: QueryId(q),
            batch: BatchId(b),
            stage: StageId(0),
            map: MapPartition(0),
            reduce: ReducePartition(r),
        }
    }

    #[test]
    fn read_consumes_and_drop_query_clears() {
        let store = BlockStore::new();
        store.put(id(1, 0, 0), Bytes::from_static(b"a"));
        store.put(id(1, 0, 1), Bytes::from_static(b"b"));
        store.put(id(2, 0, 0), Bytes::from_static(b"c"));
        assert_eq!(store.read(&id(1, 0, 0)).unwrap(), Bytes::from_static(b"a"));
        assert!(store.read(&id(1, 0, 0)).is_err());
        store.drop_query(QueryId(1));
        assert_eq!(store.usage(), (1, 1));
    }

    #[test]
    fn retained_blocks_survive_reads_until_a_checkpoint_covers_them() {
        let store = BlockStore::new();
        store.retain(QueryId(1), true);
        for b in 0..4 {
            store.put(id(1, b, 0), Bytes::from_static(b"x"));
        }
        store.put(id(2, 0, 0), Bytes::from_static(b"y"));
        // Read twice: a recovered consumer reads what a survivor produced.
        assert!(store.read(&id(1, 1, 0)).is_ok());
        assert!(store.read(&id(1, 1, 0)).is_ok());
        // Another query still consumes on read.
        assert!(store.read(&id(2, 0, 0)).is_ok());
        assert!(store.read(&id(2, 0, 0)).is_err());
        // A checkpoint after batch 1 covers batches 0 and 1.
        store.drop_through(QueryId(1), 1);
        assert!(store.read(&id(1, 1, 0)).is_err());
        assert!(store.read(&id(1, 2, 0)).is_ok());
        assert_eq!(store.usage().0, 2);
        // Retention ends with the query.
        store.drop_query(QueryId(1));
        store.put(id(1, 9, 0), Bytes::from_static(b"z"));
        assert!(store.read(&id(1, 9, 0)).is_ok());
        assert!(store.read(&id(1, 9, 0)).is_err());
    }
}
