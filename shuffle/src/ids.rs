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
