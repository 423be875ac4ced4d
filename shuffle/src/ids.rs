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

/// A query's shuffle ticket token: 16 random bytes the coordinator makes
/// per query and ships only to the workers that run it. A Flight ticket
/// must carry it, so a block cannot be fetched by guessing its id.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct QueryToken(pub [u8; 16]);

impl fmt::Debug for QueryToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("QueryToken(<redacted>)")
    }
}

impl QueryToken {
    /// The token in a launch message (16 bytes), if it is one.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(QueryToken)
    }

    /// Compares in constant time.
    pub fn matches(&self, other: &[u8]) -> bool {
        other.len() == self.0.len()
            && self
                .0
                .iter()
                .zip(other)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

impl BlockId {
    /// Length of an encoded [`BlockId::to_ticket`]: the id, then the token.
    pub const TICKET_LEN: usize = 28 + 16;

    /// The Arrow Flight ticket naming this block: query, batch (u64 each),
    /// stage, map, reduce (u32 each), big-endian, then the query's token.
    pub fn to_ticket(&self, token: &QueryToken) -> Vec<u8> {
        let mut t = Vec::with_capacity(Self::TICKET_LEN);
        t.extend_from_slice(&self.query.0.to_be_bytes());
        t.extend_from_slice(&self.batch.0.to_be_bytes());
        t.extend_from_slice(&self.stage.0.to_be_bytes());
        t.extend_from_slice(&self.map.0.to_be_bytes());
        t.extend_from_slice(&self.reduce.0.to_be_bytes());
        t.extend_from_slice(&token.0);
        t
    }

    /// The token part of a ticket written by [`BlockId::to_ticket`].
    pub fn ticket_token(t: &[u8]) -> &[u8] {
        t.get(28..).unwrap_or_default()
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
        let token = QueryToken([7; 16]);
        let ticket = id.to_ticket(&token);
        assert_eq!(BlockId::from_ticket(&ticket).unwrap(), id);
        assert!(token.matches(BlockId::ticket_token(&ticket)));
        assert!(!QueryToken([8; 16]).matches(BlockId::ticket_token(&ticket)));
        assert!(BlockId::from_ticket(&[0u8; 5]).is_err());
    }
}
