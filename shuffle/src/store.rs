//! The worker-local block store.
//!
//! Map tasks put their blocks here; reduce tasks take them once every
//! `MapOutputReady` notice of their batch has arrived. A block is removed when
//! its consumer has read it, so the store holds only in-flight micro-batches
//! and stays bounded on a stream that runs for days.

use std::collections::HashMap;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::error::{Result, ShuffleError};
use crate::ids::{BlockId, QueryId};

/// In-memory store of encoded shuffle blocks, keyed by [`BlockId`].
#[derive(Debug, Default)]
pub struct BlockStore {
    blocks: Mutex<HashMap<BlockId, Bytes>>,
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

    /// Removes and returns a block: its consumer is the only reader.
    pub fn take(&self, id: &BlockId) -> Result<Bytes> {
        self.blocks
            .lock()
            .remove(id)
            .ok_or_else(|| ShuffleError::MissingBlock {
                block: id.to_string(),
            })
    }

    /// Drops every block of a query (the query ended or was cancelled).
    pub fn drop_query(&self, query: QueryId) {
        self.blocks.lock().retain(|id, _| id.query != query);
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

    #[test]
    fn take_removes_and_drop_query_clears() {
        let store = BlockStore::new();
        let id = |q, r| BlockId {
            query: QueryId(q),
            batch: BatchId(0),
            stage: StageId(0),
            map: MapPartition(0),
            reduce: ReducePartition(r),
        };
        store.put(id(1, 0), Bytes::from_static(b"a"));
        store.put(id(1, 1), Bytes::from_static(b"b"));
        store.put(id(2, 0), Bytes::from_static(b"c"));
        assert_eq!(store.take(&id(1, 0)).unwrap(), Bytes::from_static(b"a"));
        assert!(store.take(&id(1, 0)).is_err());
        store.drop_query(QueryId(1));
        assert_eq!(store.usage(), (1, 1));
    }
}
