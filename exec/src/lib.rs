//! # drizzle-exec: the micro-batch runtime
//!
//! Where it sits: `planner` produces a [`StreamingPlan`](drizzle_planner::StreamingPlan);
//! the server opens its sources and calls [`Runtime::start_query`]; results
//! come back through a [`QueryHandle`], one [`EmittedBatch`] per micro-batch,
//! in batch order.
//!
//! ```text
//!  Log / datagen ─▶ MapTask (WindowAssignExec, FilterExec, ProjectionExec,
//!                   LookupJoinExec, partial aggregate) ─▶ Arrow IPC blocks
//!                   ─MapOutputReady─▶ ReduceTask (AggregateFinalExec, HAVING,
//!                   projection) ─▶ collector ─▶ session / materialized view
//! ```
//!
//! Execution follows the Drizzle design (see `coordinator` for the invariants):
//! the coordinator plans a group of micro-batches at once and sends each
//! worker one launch message per group; shuffles are pre-scheduled, and a
//! worker-local scheduler starts a reduce task when notices from all its map
//! tasks have arrived, with no coordinator barrier inside a group.
//!
//! The coordinator and the workers are separate processes in a cluster
//! (`drizzle server --workers 0` plus `drizzle worker`s) and the same code
//! in one process for the embedded server: they always talk through the
//! cluster protocol ([`cluster`], `proto/drizzle.proto`, gRPC over tonic).
//! Rows travel on the data plane, Arrow Flight: shuffle blocks between
//! workers (a worker reads its own without the network), and source ranges,
//! lookup tables, checkpoint state and large results between workers and
//! the coordinator ([`dataplane`]).
//!
//! Modules: [`log`] (durable partitioned log behind built-in streams and
//! tables), [`sources`] (the [`sources::Source`] trait: log and datagen
//! sources), [`dataplane`] (the coordinator's Flight endpoint), [`operators`] (operators and
//! keyed state), [`coordinator`] (the coordinator and the result collector),
//! [`worker`] (a worker, its local scheduler and task slots), [`cluster`] (the protocol),
//! [`sim`] (virtual workers that drive the real coordinator without
//! processes, for tests and `drizzle bench sim`).
//! Types to read first: [`Runtime`], [`QuerySpec`], [`QueryHandle`],
//! [`worker::start_worker`], [`operators::AggregateFinalExec`], [`log::PartitionLog`].

pub mod checkpoint;
pub mod cluster;
pub mod coordinator;
pub mod dataplane;
pub mod error;
pub mod log;
pub mod operators;
pub mod sim;
pub mod sources;
pub mod worker;

pub use error::{ExecError, Result};

/// Stack size of every thread that plans or evaluates user SQL: the async
/// runtimes' threads (their blocking pools included) and workers' task
/// threads. Sized for `drizzle_planner::statement::MAX_EXPRESSION_DEPTH`
/// (about 2 KiB per level in a debug build, with a wide margin); only the
/// pages a thread touches are ever committed.
pub const THREAD_STACK_BYTES: usize = 32 << 20;
pub use coordinator::{
    AdaptiveGroupSize, Durability, EmittedBatch, GroupId, InputSpec, QueryHandle, QuerySpec,
    QueryStatus, Recovery, Runtime, RuntimeConfig, Scheduling, WorkerId, WorkerInfo,
};
pub use operators::TableEvaluator;
pub use worker::{start_worker, ErrorClassifier, WorkerConfig, WorkerHandle};
