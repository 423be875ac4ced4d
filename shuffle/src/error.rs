//! The error type of the shuffle crate.

use arrow::error::ArrowError;
use datafusion::error::DataFusionError;

/// Errors raised while encoding, decoding, partitioning or storing blocks.
#[derive(Debug, thiserror::Error)]
pub enum ShuffleError {
    /// Arrow IPC encoding or decoding failed.
    #[error("arrow error in shuffle block {context}: {source}")]
    Arrow {
        /// What was being done.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: ArrowError,
    },
    /// Hashing or evaluating partition keys failed.
    #[error("partitioning failed: {source}")]
    Partition {
        /// The underlying error.
        #[source]
        source: DataFusionError,
    },
    /// A block that a consumer asked for is not in the store.
    #[error("shuffle block {block} is missing")]
    MissingBlock {
        /// The id of the block, rendered.
        block: String,
    },
    /// A block ticket of the wrong length (see `BlockId::TICKET_LEN`).
    #[error("malformed block ticket of {len} bytes")]
    BadTicket {
        /// The ticket's length.
        len: usize,
    },
    /// Fetching a block from another worker over Arrow Flight failed.
    #[error("fetching shuffle block {block} from {location} failed: {message}")]
    Fetch {
        /// The id of the block, rendered.
        block: String,
        /// The producer's address.
        location: String,
        /// What went wrong.
        message: String,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, ShuffleError>;
