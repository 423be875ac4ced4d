//! Identifier newtypes shared by the planner, the runtime and the shuffle.

use std::fmt;

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident, $inner:ty, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id_newtype!(
    /// A running continuous query (a client's `SELECT` or a materialized view).
    QueryId, u64, "q"
);
id_newtype!(
    /// A micro-batch of a query; batch ids of one query start at 0 and are dense.
    BatchId, u64, "b"
);
id_newtype!(
    /// A stage of a query's stage graph (0 is the map stage reading the source).
    StageId, u32, "s"
);
id_newtype!(
    /// The partition a map task reads (one per source partition).
    MapPartition, u32, "m"
);
id_newtype!(
    /// The partition a reduce task owns (one hash range of the shuffle key).
    ReducePartition, u32, "r"
);

/// The key of one shuffle block: the output of one map task of one
/// micro-batch destined for one reduce partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId {
    /// The query the block belongs to.
    pub query: QueryId,
    /// The micro-batch that produced it.
    pub batch: BatchId,
    /// The stage whose map tasks wrote it.
    pub stage: StageId,
    /// The map task (source partition) that wrote it.
    pub map: MapPartition,
    /// The reduce partition it is destined for.
    pub reduce: ReducePartition,
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}/{}/{}",
            self.query, self.batch, self.stage, self.map, self.reduce
        )
    }
}

impl BlockId {
    /// Length of an encoded [`BlockId::to_ticket`].
    pub const TICKET_LEN: usize = 28;

    /// The Arrow Flight ticket naming this block: query, batch (u64 each),
    /// stage, map, reduce (u32 each), big-endian.
    pub fn to_ticket(&self) -> Vec<u8> {
        let mut t = Vec::with_capacity(Self::TICKET_LEN);
        t.extend_from_slice(&self.query.0.to_be_bytes());
        t.extend_from_slice(&self.batch.0.to_be_bytes());
        t.extend_from_slice(&self.stage.0.to_be_bytes());
        t.extend_from_slice(&self.map.0.to_be_bytes());
        t.extend_from_slice(&self.reduce.0.to_be_bytes());
        t
    }

    /// Parses a ticket written by [`BlockId::to_ticket`].
    pub fn from_ticket(t: &[u8]) -> crate::Result<Self> {
        let bad = || crate::ShuffleError::BadTicket { len: t.len() };
        if t.len() != Self::TICKET_LEN {
            return Err(bad());
        }
        let u64_at = |i: usize| -> crate::Result<u64> {
            Ok(u64::from_be_bytes(
                t[i..i + 8].try_into().map_err(|_| bad())?,
            ))
        };
        let u32_at = |i: usize| -> crate::Result<u32> {
            Ok(u32::from_be_bytes(
                t[i..i + 4].try_into().map_err(|_| bad())?,
            ))
        };
        Ok(BlockId {
            query: QueryId(u64_at(0)?),
            batch: BatchId(u64_at(8)?),
            stage: StageId(u32_at(16)?),
            map: MapPartition(u32_at(20)?),
            reduce: ReducePartition(u32_at(24)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticket_round_trip_and_rejects_bad_length() {
        let id = BlockId {
            query: QueryId(7),
            batch: BatchId(u64::MAX - 1),
            stage: StageId(1),
            map: MapPartition(3),
            reduce: ReducePartition(9),
        };
        assert_eq!(BlockId::from_ticket(&id.to_ticket()).unwrap(), id);
        assert!(BlockId::from_ticket(&[0u8; 5]).is_err());
    }
}
