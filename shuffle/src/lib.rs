//! # drizzle-shuffle: the data plane between stages
//!
//! Drizzle splits every continuous query into stages at shuffle boundaries
//! (SQL → DataFusion logical plan → streaming plan → [`Stage`]s → tasks). A map
//! task of one micro-batch hash-partitions its output by the reduce key and
//! writes one *block* per reduce partition; the reduce task for that partition
//! pulls the blocks of every map task once it has been told (by a
//! `MapOutputReady` notice) that they exist.
//!
//! This crate owns everything about those blocks:
//!
//! * [`BlockId`]: the key of a block — (query, batch, stage, map partition,
//!   reduce partition). Every id is a newtype so they cannot be mixed up.
//! * [`block`]: the block format, Arrow IPC stream bytes ([`encode_block`],
//!   [`decode_block`]).
//! * [`partition`]: hash partitioning of a `RecordBatch` by key columns
//!   ([`hash_partition`]), with a hash that is fixed across processes so every
//!   worker routes a key to the same reduce partition.
//! * [`store`]: the [`BlockStore`] a worker keeps its map outputs in until the
//!   consumers have read them.
//! * [`flight`]: the Arrow Flight transport: [`BlockFlightService`] serves a
//!   worker's blocks by `do_get` (the ticket is [`BlockId::to_ticket`]), and
//!   [`fetch_block`] pulls one from another worker.
//!
//! [`Stage`]: https://docs.rs/drizzle-planner
#![deny(unsafe_code)]

pub mod block;
pub mod error;
pub mod flight;
pub mod ids;
pub mod partition;
pub mod store;

pub use block::{decode_block, encode_block};
pub use error::{Result, ShuffleError};
pub use flight::{fetch_block, BlockFlightService};
pub use ids::{BatchId, BlockId, MapPartition, QueryId, QueryToken, ReducePartition, StageId};
pub use partition::hash_partition;
pub use store::BlockStore;
