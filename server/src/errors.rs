//! Errors as the client sees them: a SQLSTATE, a message, maybe a hint.
//!
//! Every library error is classified here; the mapping follows Postgres:
//! syntax 42601, unknown relation 42P01, unknown column 42703, type mismatch
//! 42804, bad literal 22P02, unsupported 0A000, cancel 57014.

use datafusion::error::DataFusionError;
use drizzle_exec::ExecError;
use drizzle_planner::PlanError;

/// An error to send as an ErrorResponse.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct PgError {
    /// SQLSTATE.
    pub code: &'static str,
    /// Primary message.
    pub message: String,
    /// Optional hint.
    pub hint: Option<String>,
    /// FATAL (closes the connection) rather than ERROR.
    pub fatal: bool,
}

impl PgError {
    /// A new ERROR.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            hint: None,
            fatal: false,
        }
    }

    /// Adds a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Marks it FATAL.
    pub fn fatal(mut self) -> Self {
        self.fatal = true;
        self
    }

    /// Internal error (XX000).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new("XX000", message)
    }

    /// I/O error on a path (58030).
    pub fn io(path: impl AsRef<std::path::Path>, e: std::io::Error) -> Self {
        Self::new(
            "58030",
            format!("I/O error on {}: {e}", path.as_ref().display()),
        )
    }

    /// Relation already exists (42P07).
    pub fn duplicate(name: &str) -> Self {
        Self::new("42P07", format!("relation \"{name}\" already exists"))
    }

    /// Relation does not exist (42P01).
    pub fn undefined_table(name: &str) -> Self {
        Self::new("42P01", format!("relation \"{name}\" does not exist"))
    }

    /// Feature not supported (0A000).
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new("0A000", message)
    }

    /// Query cancelled (57014).
    pub fn cancelled() -> Self {
        Self::new("57014", "canceling statement due to user request")
    }
}

impl From<PlanError> for PgError {
    fn from(e: PlanError) -> Self {
        match e {
            PlanError::Syntax { .. } => PgError::new("42601", e.to_string()),
            PlanError::InvalidText { .. } => PgError::new("22021", e.to_string()),
            PlanError::TooComplex { .. } => PgError::new("54001", e.to_string())
                .with_hint("split the expression, or use IN (...) instead of a chain of OR"),
            PlanError::UnknownRelation { .. } => PgError::new("42P01", e.to_string()),
            PlanError::DuplicateRelation { .. } => PgError::new("42P07", e.to_string()),
            PlanError::UnknownColumn { .. } => PgError::new("42703", e.to_string()),
            PlanError::TypeMismatch { .. } => PgError::new("42804", e.to_string()),
            PlanError::InvalidValue { .. } => PgError::new("22023", e.to_string()),
            PlanError::Unsupported { feature, hint } => {
                let mut err = PgError::new("0A000", format!("{feature} is not supported"));
                if let Some(h) = hint.strip_prefix("; ") {
                    err = err.with_hint(h);
                }
                err
            }
            PlanError::Internal { .. } => PgError::new("XX000", e.to_string()),
            PlanError::DataFusion { source } => from_datafusion(source),
        }
    }
}

/// A SQLSTATE received from a worker, as the `&'static str` PgError holds.
/// Codes are 5 ASCII alphanumerics; a bounded set is interned, anything
/// else becomes XX000.
fn intern_code(code: &str) -> &'static str {
    static CODES: std::sync::OnceLock<parking_lot::Mutex<std::collections::HashSet<&'static str>>> =
        std::sync::OnceLock::new();
    if code.len() != 5 || !code.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return "XX000";
    }
    let mut codes = CODES.get_or_init(Default::default).lock();
    if let Some(c) = codes.get(code) {
        return c;
    }
    if codes.len() >= 512 {
        return "XX000";
    }
    let leaked: &'static str = Box::leak(code.to_string().into_boxed_str());
    codes.insert(leaked);
    leaked
}

impl From<ExecError> for PgError {
    fn from(e: ExecError) -> Self {
        match e {
            ExecError::Execution { source } => from_datafusion(source),
            ExecError::Plan { source } => source.into(),
            ExecError::Arrow { source } => from_arrow(source),
            ExecError::Cancelled => PgError::cancelled(),
            ExecError::Remote { code, message } => PgError::new(intern_code(&code), message),
            ExecError::InvalidOption { .. } => PgError::new("22023", e.to_string()),
            ExecError::OutOfMemory { .. } => PgError::new("53200", e.to_string()),
            ExecError::InvalidData { .. } => PgError::new("22P02", e.to_string()),
            ExecError::Io { .. } | ExecError::Corrupt { .. } | ExecError::Checkpoint { .. } => {
                PgError::new("58030", e.to_string())
            }
            ExecError::Shuffle { .. } | ExecError::Unavailable { .. } => {
                PgError::new("XX000", e.to_string())
            }
        }
    }
}

fn from_arrow(e: arrow::error::ArrowError) -> PgError {
    use arrow::error::ArrowError as A;
    match &e {
        A::CastError(m) | A::ParseError(m) => PgError::new("22P02", m.clone()),
        A::DivideByZero => PgError::new("22012", "division by zero"),
        // Arrow's checked kernels say "Overflow happened on: a + b".
        A::ArithmeticOverflow(m) if m.starts_with("Overflow happened on") => {
            PgError::new("22003", format!("integer out of range ({m})"))
        }
        A::ArithmeticOverflow(m) => PgError::new("22003", m.clone()),
        A::ExternalError(inner) => {
            if let Some(ex) = inner.downcast_ref::<ExecError>() {
                return PgError::new("XX000", ex.to_string());
            }
            PgError::new("XX000", e.to_string())
        }
        _ => PgError::new("XX000", e.to_string()),
    }
}

/// Classifies a DataFusion error.
pub fn from_datafusion(e: DataFusionError) -> PgError {
    use datafusion::common::SchemaError;
    match e {
        DataFusionError::Context(_, inner) => from_datafusion(*inner),
        DataFusionError::Diagnostic(_, inner) => from_datafusion(*inner),
        DataFusionError::ArrowError(a, _) => from_arrow(*a),
        DataFusionError::SchemaError(s, _) => match *s {
            SchemaError::FieldNotFound { field, .. } => {
                PgError::new("42703", format!("column \"{}\" does not exist", field.name))
            }
            SchemaError::AmbiguousReference { field } => PgError::new(
                "42702",
                format!("column reference \"{}\" is ambiguous", field.name),
            ),
            other => PgError::new("42P18", other.to_string()),
        },
        DataFusionError::SQL(p, _) => PgError::new("42601", format!("syntax error: {p}")),
        DataFusionError::NotImplemented(m) => {
            PgError::new("0A000", format!("{} is not supported", strip_debug(&m)))
        }
        DataFusionError::External(inner) => match inner.downcast::<ExecError>() {
            Ok(ex) => (*ex).into(),
            Err(other) => PgError::new("XX000", other.to_string()),
        },
        DataFusionError::Plan(m) => classify_message(&m, "42804"),
        DataFusionError::Execution(m) => classify_message(&m, "XX000"),
        other => classify_message(&other.to_string(), "XX000"),
    }
}

fn classify_message(m: &str, default: &'static str) -> PgError {
    let lower = m.to_lowercase();
    let code = if let Some(rest) = lower.strip_prefix("table '") {
        let name = rest.split('\'').next().unwrap_or_default();
        if lower.contains("not found") {
            return PgError::undefined_table(name);
        }
        default
    } else if lower.contains("divide by zero") || lower.contains("division by zero") {
        "22012"
    } else if lower.contains("overflow happened on")
        || ["bigint", "integer", "smallint"]
            .iter()
            .any(|t| lower.contains(&format!("{t} out of range")))
    {
        "22003"
    } else if lower.contains("cannot cast")
        || lower.contains("cast error")
        || lower.contains("invalid input syntax")
    {
        "22P02"
    } else if lower.contains("invalid function")
        || lower.contains("no function matches")
        || lower.contains("not supported for type")
    {
        "42883"
    } else if lower.contains("coerc")
        || lower.contains("type mismatch")
        || lower.contains("can't be evaluated")
        || lower.contains("must be a timestamp")
    {
        "42804"
    } else if lower.contains("not found") && lower.contains("column") {
        "42703"
    } else if lower.contains("projections require unique expression names") {
        "42701"
    } else {
        default
    };
    let message = strip_debug(
        m.trim_start_matches("Error during planning: ")
            .trim_start_matches("Execution error: "),
    );
    PgError::new(code, message)
}

/// A message without the Rust debug dumps some DataFusion errors carry
/// (`Identifier(Ident { value: .., span: .. })`): every `{ ... }` block is
/// dropped, so a client reads `Identifier(Ident)`.
pub fn strip_debug(m: &str) -> String {
    let mut out = String::with_capacity(m.len());
    let mut depth = 0usize;
    for c in m.chars() {
        match c {
            '{' if out.ends_with(' ')
                && out.trim_end().ends_with(|p: char| p.is_alphanumeric()) =>
            {
                depth += 1;
                // Drop the space before the block.
                out.pop();
            }
            '{' if depth > 0 => depth += 1,
            '}' if depth > 0 => depth -= 1,
            _ if depth > 0 => {}
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_dumps_are_stripped_from_messages() {
        assert_eq!(
            strip_debug("Dot access not supported for non-string expr: Identifier(Ident { value: \"x\", span: Span(Location(1,14)..Location(1,15)) })"),
            "Dot access not supported for non-string expr: Identifier(Ident)"
        );
        assert_eq!(
            strip_debug("Collate { expr: Value(V { v: 1 }) } is"),
            "Collate is"
        );
        assert_eq!(strip_debug("bad array '{1,2}'"), "bad array '{1,2}'");
    }

    #[test]
    fn plan_errors_map_to_postgres_codes() {
        assert_eq!(PgError::from(PlanError::syntax("x")).code, "42601");
        assert_eq!(PgError::from(PlanError::unsupported("y")).code, "0A000");
        assert_eq!(
            classify_message("table 'nope' not found", "XX000").code,
            "42P01"
        );
        assert_eq!(
            classify_message("Cannot cast string 'x' to value of Int32 type", "XX000").code,
            "22P02"
        );
        assert_eq!(
            classify_message(
                "Cannot infer common argument type for comparison operation Int64 = Utf8",
                "42804"
            )
            .code,
            "42804"
        );
    }
}
