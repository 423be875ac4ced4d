//! The runtime's error type.

use arrow::error::ArrowError;
use datafusion::error::DataFusionError;
use drizzle_planner::PlanError;
use drizzle_shuffle::ShuffleError;

/// Errors raised by the runtime: storage, sources, operators, scheduling.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Reading or writing the data directory failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A log file is damaged beyond the torn tail that recovery truncates.
    #[error("corrupt log {path}: {message}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A row or batch does not fit the target (wrong type, NULL in NOT NULL).
    #[error("{message}")]
    InvalidData {
        /// What is wrong.
        message: String,
    },
    /// An operator failed while evaluating a batch (division by zero, overflow, ...).
    #[error("{source}")]
    Execution {
        /// The underlying error.
        #[source]
        source: DataFusionError,
    },
    /// Arrow failed.
    #[error("{source}")]
    Arrow {
        /// The underlying error.
        #[source]
        source: ArrowError,
    },
    /// A shuffle block could not be written or read.
    #[error("{source}")]
    Shuffle {
        /// The underlying error.
        #[source]
        source: ShuffleError,
    },
    /// Planning failed (for the finite side of a join, say).
    #[error("{source}")]
    Plan {
        /// The underlying error.
        #[source]
        source: PlanError,
    },
    /// Bad connector options.
    #[error("invalid option {option}: {message}")]
    InvalidOption {
        /// The option key.
        option: String,
        /// What is wrong and what is expected.
        message: String,
    },
    /// The query was cancelled.
    #[error("canceling statement due to user request")]
    Cancelled,
    /// A task failed on a worker; `code` is the SQLSTATE the worker chose.
    #[error("{message}")]
    Remote {
        /// SQLSTATE.
        code: String,
        /// The worker's message.
        message: String,
    },
    /// Reading or writing checkpoint storage failed.
    #[error("checkpoint storage {location}: {message}")]
    Checkpoint {
        /// The object or store.
        location: String,
        /// What failed.
        message: String,
    },
    /// A query's state outgrew its memory budget, or the server's budget
    /// (SQLSTATE 53200).
    #[error("{message}")]
    OutOfMemory {
        /// Which budget, and the operator that holds the state.
        message: String,
    },
    /// The runtime is shutting down or a worker is gone.
    #[error("runtime unavailable: {message}")]
    Unavailable {
        /// What is gone.
        message: String,
    },
}

impl ExecError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        ExecError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    /// Shorthand for [`ExecError::InvalidData`].
    pub fn invalid(message: impl Into<String>) -> Self {
        ExecError::InvalidData {
            message: message.into(),
        }
    }
}

impl From<DataFusionError> for ExecError {
    fn from(source: DataFusionError) -> Self {
        ExecError::Execution { source }
    }
}

impl From<ArrowError> for ExecError {
    fn from(source: ArrowError) -> Self {
        ExecError::Arrow { source }
    }
}

impl From<ShuffleError> for ExecError {
    fn from(source: ShuffleError) -> Self {
        ExecError::Shuffle { source }
    }
}

impl From<PlanError> for ExecError {
    fn from(source: PlanError) -> Self {
        ExecError::Plan { source }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, ExecError>;
