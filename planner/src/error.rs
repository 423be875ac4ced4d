//! The planner's error type. Each variant is one category the server maps to
//! a SQLSTATE code (see `drizzle-server`'s `errors` module).

use datafusion::error::DataFusionError;

/// Errors raised while parsing or planning a statement.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The SQL text does not parse (SQLSTATE 42601).
    #[error("syntax error: {message}")]
    Syntax {
        /// What the parser expected and found.
        message: String,
    },
    /// A stream, table or view that does not exist (42P01).
    #[error("relation \"{name}\" does not exist")]
    UnknownRelation {
        /// The name as written.
        name: String,
    },
    /// A relation that already exists (42P07).
    #[error("relation \"{name}\" already exists")]
    DuplicateRelation {
        /// The name as written.
        name: String,
    },
    /// A column that does not exist (42703).
    #[error("column \"{name}\" does not exist{hint}")]
    UnknownColumn {
        /// The column name.
        name: String,
        /// Extra context (where it was looked up), may be empty.
        hint: String,
    },
    /// A value or expression of the wrong type (42804).
    #[error("type mismatch: {message}")]
    TypeMismatch {
        /// What did not match.
        message: String,
    },
    /// A literal or option value that cannot be interpreted (22P02 / 22023).
    #[error("invalid value: {message}")]
    InvalidValue {
        /// What is wrong and what is expected.
        message: String,
    },
    /// A feature Drizzle does not support, or that cannot be computed on an
    /// unbounded stream (0A000).
    #[error("{feature} is not supported{hint}")]
    Unsupported {
        /// The feature.
        feature: String,
        /// How to get the result another way, may be empty.
        hint: String,
    },
    /// Text that is not valid in the server encoding, e.g. a NUL byte (22021).
    #[error("{message}")]
    InvalidText {
        /// What is wrong.
        message: String,
    },
    /// A statement nested deeper than Drizzle plans (54001).
    #[error("statement too complex: {message}")]
    TooComplex {
        /// What is too deep and the limit.
        message: String,
    },
    /// A plan fragment that cannot be encoded or decoded (XX000).
    #[error("internal error: {message}")]
    Internal {
        /// What failed.
        message: String,
    },
    /// An error from DataFusion's planner.
    #[error("{source}")]
    DataFusion {
        /// The underlying error.
        #[source]
        source: DataFusionError,
    },
}

impl PlanError {
    /// Shorthand for [`PlanError::Unsupported`] with no hint.
    pub fn unsupported(feature: impl Into<String>) -> Self {
        PlanError::Unsupported {
            feature: feature.into(),
            hint: String::new(),
        }
    }

    /// Shorthand for [`PlanError::Unsupported`] with a hint appended as `: hint`.
    pub fn unsupported_hint(feature: impl Into<String>, hint: impl AsRef<str>) -> Self {
        PlanError::Unsupported {
            feature: feature.into(),
            hint: format!("; {}", hint.as_ref()),
        }
    }

    /// Shorthand for [`PlanError::Syntax`].
    pub fn syntax(message: impl Into<String>) -> Self {
        PlanError::Syntax {
            message: message.into(),
        }
    }

    /// Shorthand for [`PlanError::InvalidValue`].
    pub fn invalid(message: impl Into<String>) -> Self {
        PlanError::InvalidValue {
            message: message.into(),
        }
    }
}

impl From<DataFusionError> for PlanError {
    fn from(source: DataFusionError) -> Self {
        PlanError::DataFusion { source }
    }
}

impl From<datafusion::sql::sqlparser::parser::ParserError> for PlanError {
    fn from(e: datafusion::sql::sqlparser::parser::ParserError) -> Self {
        let message = match e {
            datafusion::sql::sqlparser::parser::ParserError::ParserError(m)
            | datafusion::sql::sqlparser::parser::ParserError::TokenizerError(m) => m,
            datafusion::sql::sqlparser::parser::ParserError::RecursionLimitExceeded => {
                return PlanError::TooComplex {
                    message: format!(
                        "expressions nest more than {} levels deep",
                        crate::statement::MAX_NESTING
                    ),
                }
            }
        };
        PlanError::Syntax { message }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, PlanError>;
