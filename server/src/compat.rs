//! Postgres compatibility of statements, before they are planned.
//!
//! - Functions whose value is the session's (`current_user`,
//!   `session_user`, `current_database()`, `current_setting()`,
//!   `set_config()`, `pg_backend_pid()`, `pg_cancel_backend()`,
//!   `pg_terminate_backend()`) are replaced by their values. They cannot be
//!   DataFusion functions: a plan knows nothing of the session that runs it.
//! - A function name qualified with `pg_catalog.` loses the qualifier, as
//!   Postgres resolves it: DataFusion's functions live in one flat namespace
//!   (`pg_catalog.version()` is `version()`).
//! - A select item that is a bare call of one of these functions is named
//!   after the function, as in Postgres (`SELECT version()` has a column
//!   `version`).
//!
//! The catalog functions that need no session (`version()`,
//! `format_type()`, ...) are `drizzle_planner::functions::catalog`.

use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    visit_expressions_mut, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, Ident,
    ObjectName, ObjectNamePart, Query, SelectItem, SetExpr, Value, ValueWithSpan,
};
use drizzle_planner::DrizzleStatement;

use crate::engine::Settings;
use crate::errors::PgError;
use crate::session::SessionRegistry;

/// What the session functions answer from.
pub struct SessionFacts<'a> {
    /// The session's role.
    pub user: &'a str,
    /// Whether it is a superuser.
    pub superuser: bool,
    /// The database the client asked for.
    pub database: &'a str,
    /// Its backend pid.
    pub pid: i32,
    /// Every session (for `pg_cancel_backend`, `pg_terminate_backend`).
    pub registry: &'a SessionRegistry,
    /// Describing, not running: signal nobody (`settings` is a copy).
    pub dry: bool,
}

/// Session functions that may appear without parentheses.
const BARE: &[&str] = &[
    "current_user",
    "session_user",
    "user",
    "current_role",
    "current_catalog",
    "current_schema",
];

/// Functions named after themselves when they are a select item.
const NAMED: &[&str] = &[
    "current_user",
    "session_user",
    "user",
    "current_role",
    "current_catalog",
    "current_schema",
    "current_schemas",
    "current_database",
    "current_setting",
    "set_config",
    "pg_backend_pid",
    "pg_cancel_backend",
    "pg_terminate_backend",
    "version",
    "pg_postmaster_start_time",
    "format_type",
    "pg_get_userbyid",
    "pg_encoding_to_char",
    "quote_ident",
    "pg_table_is_visible",
    "obj_description",
    "col_description",
    "shobj_description",
    "has_table_privilege",
    "has_schema_privilege",
    "has_database_privilege",
    "has_column_privilege",
    "has_function_privilege",
];

/// Rewrites every query inside `stmt` (see the module docs).
pub fn rewrite_statement(
    stmt: &mut DrizzleStatement,
    facts: &SessionFacts<'_>,
    settings: &mut Settings,
) -> Result<(), PgError> {
    let query: Option<&mut Query> = match stmt {
        DrizzleStatement::Query(q) | DrizzleStatement::Explain(q) => Some(q),
        DrizzleStatement::DeclareCursor { query, .. } => Some(query),
        DrizzleStatement::Insert { source, .. } => Some(source),
        DrizzleStatement::CopyTo { query, .. } => Some(query),
        _ => None,
    };
    match query {
        Some(q) => rewrite_query(q, facts, settings),
        None => Ok(()),
    }
}

fn last_name(name: &ObjectName) -> Option<String> {
    match name.0.last()? {
        ObjectNamePart::Identifier(i) => Some(i.value.to_lowercase()),
        _ => None,
    }
}

/// The session function an expression calls, if it is one: its name and
/// its arguments.
fn session_call(e: &Expr) -> Option<(String, Vec<Expr>)> {
    match e {
        Expr::Identifier(Ident {
            value,
            quote_style: None,
            ..
        }) if BARE.contains(&value.to_lowercase().as_str()) => {
            Some((value.to_lowercase(), Vec::new()))
        }
        Expr::Function(f) => {
            let name = last_name(&f.name)?;
            let args = match &f.args {
                FunctionArguments::None => Vec::new(),
                FunctionArguments::List(list) => list
                    .args
                    .iter()
                    .map(|a| match a {
                        FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e.clone()),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()?,
                FunctionArguments::Subquery(_) => return None,
            };
            Some((name, args))
        }
        _ => None,
    }
}

fn text(s: &str) -> Expr {
    Expr::Value(ValueWithSpan::from(Value::SingleQuotedString(
        s.to_string(),
    )))
}

fn null() -> Expr {
    Expr::Value(ValueWithSpan::from(Value::Null))
}

fn boolean(b: bool) -> Expr {
    Expr::Value(ValueWithSpan::from(Value::Boolean(b)))
}

fn number(n: i64) -> Expr {
    Expr::Value(ValueWithSpan::from(Value::Number(n.to_string(), false)))
}

/// A constant argument as text (string, number or boolean literal).
fn constant(e: &Expr) -> Option<String> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) => Some(s.clone()),
            Value::Number(n, _) => Some(n.clone()),
            Value::Boolean(b) => Some(b.to_string()),
            _ => None,
        },
        Expr::Cast { expr, .. } | Expr::Nested(expr) => constant(expr),
        Expr::UnaryOp { op, expr } => constant(expr).map(|c| format!("{op}{c}")),
        _ => None,
    }
}

fn constant_arg(name: &str, args: &[Expr], i: usize) -> Result<String, PgError> {
    args.get(i).and_then(constant).ok_or_else(|| {
        PgError::new(
            "0A000",
            format!("{name}() takes constant arguments in Drizzle"),
        )
    })
}

fn truthy(s: &str) -> bool {
    matches!(s.to_lowercase().as_str(), "true" | "t" | "on" | "yes" | "1")
}

/// The value of session function `name`, if it is one.
fn evaluate(
    name: &str,
    args: &[Expr],
    facts: &SessionFacts<'_>,
    settings: &mut Settings,
) -> Result<Option<Expr>, PgError> {
    Ok(Some(match name {
        "current_user" | "session_user" | "user" | "current_role" => text(facts.user),
        "current_database" | "current_catalog" => text(facts.database),
        "current_schema" => text("public"),
        "current_setting" => {
            let setting = constant_arg(name, args, 0)?.to_lowercase();
            let missing_ok = args.get(1).and_then(constant).is_some_and(|m| truthy(&m));
            match crate::engine::show_setting(settings, &setting) {
                Ok(v) => text(&v),
                Err(_) if missing_ok => null(),
                Err(e) => return Err(e),
            }
        }
        "set_config" => {
            let setting = constant_arg(name, args, 0)?.to_lowercase();
            let value = constant_arg(name, args, 1)?;
            crate::engine::apply_setting(settings, &setting, &value)?;
            text(&crate::engine::show_setting(settings, &setting)?)
        }
        "pg_backend_pid" => number(facts.pid as i64),
        "pg_cancel_backend" | "pg_terminate_backend" => {
            let pid: i32 = constant_arg(name, args, 0)?
                .parse()
                .map_err(|_| PgError::new("22023", format!("{name}() takes a backend pid")))?;
            let terminate = name == "pg_terminate_backend";
            if facts.dry {
                return Ok(Some(boolean(true)));
            }
            boolean(
                facts
                    .registry
                    .signal(pid, facts.user, facts.superuser, terminate)?,
            )
        }
        _ => return Ok(None),
    }))
}

fn rewrite_query(
    q: &mut Query,
    facts: &SessionFacts<'_>,
    settings: &mut Settings,
) -> Result<(), PgError> {
    name_select_items(q);
    let mut failed: Option<PgError> = None;
    let _ = visit_expressions_mut(q, |e| {
        if let Some((name, args)) = session_call(e) {
            match evaluate(&name, &args, facts, settings) {
                Ok(Some(value)) => {
                    *e = value;
                    return ControlFlow::Continue(());
                }
                Ok(None) => {}
                Err(err) => {
                    failed = Some(err);
                    return ControlFlow::Break(());
                }
            }
        }
        if let Expr::Function(f) = e {
            // pg_catalog.f(...) is f(...).
            let qualified = f.name.0.len() == 2
                && matches!(&f.name.0[0], ObjectNamePart::Identifier(i) if i.value.eq_ignore_ascii_case("pg_catalog"));
            if qualified {
                f.name.0.remove(0);
            }
        }
        ControlFlow::Continue(())
    });
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `SELECT version()` names its column `version`, as Postgres does, when
/// that name is not taken by another item.
fn name_select_items(q: &mut Query) {
    let SetExpr::Select(select) = q.body.as_mut() else {
        return;
    };
    let names: Vec<Option<String>> = select
        .projection
        .iter()
        .map(|item| match item {
            SelectItem::UnnamedExpr(e) => session_call(e)
                .map(|(n, _)| n)
                .filter(|n| NAMED.contains(&n.as_str())),
            _ => None,
        })
        .collect();
    for (item, name) in select.projection.iter_mut().zip(&names) {
        let Some(name) = name else { continue };
        if names.iter().filter(|n| n.as_ref() == Some(name)).count() > 1 {
            continue;
        }
        if let SelectItem::UnnamedExpr(e) = item {
            *item = SelectItem::ExprWithAlias {
                expr: e.clone(),
                alias: Ident::new(name.clone()),
            };
        }
    }
}
