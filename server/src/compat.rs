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
//! - `OPERATOR(pg_catalog.~)` is `~` (psql's way of writing operators).
//! - `expr COLLATE name` is `expr`: text compares bytewise in Drizzle.
//! - A select item that is a bare call of one of these functions is named
//!   after the function, as in Postgres (`SELECT version()` has a column
//!   `version`).
//!
//! The catalog functions that need no session (`version()`,
//! `format_type()`, ...) are `drizzle_planner::functions::catalog`.

use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    visit_expressions_mut, BinaryOperator, DataType, Expr, FunctionArg, FunctionArgExpr,
    FunctionArguments, Ident, ObjectName, ObjectNamePart, Query, Select, SelectItem, SetExpr,
    TimezoneInfo, Value, ValueWithSpan,
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
    /// Relation OIDs, for `'name'::regclass`.
    pub catalog: &'a crate::catalog::Catalog,
}

fn call(name: &str, args: Vec<Expr>) -> Expr {
    Expr::Function(datafusion::sql::sqlparser::ast::Function {
        name: ObjectName::from(vec![Ident::new(name)]),
        uses_odbc_syntax: false,
        parameters: FunctionArguments::None,
        args: FunctionArguments::List(datafusion::sql::sqlparser::ast::FunctionArgumentList {
            duplicate_treatment: None,
            args: args
                .into_iter()
                .map(|a| FunctionArg::Unnamed(FunctionArgExpr::Expr(a)))
                .collect(),
            clauses: vec![],
        }),
        filter: None,
        null_treatment: None,
        over: None,
        within_group: vec![],
    })
}

/// A LIKE pattern with escape character `escape`, rewritten for
/// DataFusion's backslash escapes: literal backslashes doubled, then
/// `<escape>c` made `\c`. As SQL, so it works for parameters too.
fn rebase_escapes(pattern: &mut Expr, escape: char) {
    let doubled = call("replace", vec![pattern.clone(), text("\\"), text("\\\\")]);
    let escape_re = if escape.is_alphanumeric() {
        escape.to_string()
    } else {
        format!("\\{escape}")
    };
    *pattern = call(
        "regexp_replace",
        vec![
            doubled,
            text(&format!("{escape_re}(.)")),
            text("\\${1}"),
            text("g"),
        ],
    );
}

/// OIDs of the system catalogs, as Postgres numbers them.
const SYSTEM_OIDS: &[(&str, i64)] = &[
    ("pg_type", 1247),
    ("pg_attribute", 1249),
    ("pg_proc", 1255),
    ("pg_class", 1259),
    ("pg_authid", 1260),
    ("pg_database", 1262),
    ("pg_constraint", 2606),
    ("pg_description", 2609),
    ("pg_index", 2610),
    ("pg_namespace", 2615),
    ("pg_am", 2601),
    ("pg_roles", 1260),
];

/// `'name'::regclass`: the relation's OID (42P01 when there is none).
fn regclass(name: &str, facts: &SessionFacts<'_>) -> Result<i64, PgError> {
    if let Ok(oid) = name.trim().parse::<i64>() {
        return Ok(oid);
    }
    let bare = name
        .trim()
        .trim_start_matches("pg_catalog.")
        .trim_start_matches("public.");
    let bare = match bare.strip_prefix('"').and_then(|b| b.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\""),
        None => bare.to_lowercase(),
    };
    if let Some((_, oid)) = SYSTEM_OIDS.iter().find(|(n, _)| *n == bare) {
        return Ok(*oid);
    }
    facts
        .catalog
        .oid(&bare)
        .map(i64::from)
        .ok_or_else(|| PgError::undefined_table(&bare))
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
    let mut functions = FunctionsInFrom;
    let _ = datafusion::sql::sqlparser::ast::VisitMut::visit(q, &mut functions);
    hide_system_columns(q);
    let mut empty = EmptySelects;
    let _ = datafusion::sql::sqlparser::ast::VisitMut::visit(q, &mut empty);
    let mut sorted = SortBySubqueries;
    let _ = datafusion::sql::sqlparser::ast::VisitMut::visit(q, &mut sorted);
    let mut memberships = MembershipInSelectItems;
    let _ = datafusion::sql::sqlparser::ast::VisitMut::visit(q, &mut memberships);
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
        // OPERATOR(pg_catalog.~) is ~ (psql writes its operators so).
        if let Expr::BinaryOp { op, .. } = e {
            if let BinaryOperator::PGCustomBinaryOperator(parts) = op {
                let plain = match parts.as_slice() {
                    [schema, name] if schema.eq_ignore_ascii_case("pg_catalog") => {
                        plain_operator(name)
                    }
                    [name] => plain_operator(name),
                    _ => None,
                };
                if let Some(plain) = plain {
                    *op = plain;
                }
            }
        }
        // LIKE ... ESCAPE '/' (SQLAlchemy's): the literal parts of the
        // pattern are rewritten to DataFusion's backslash escapes.
        if let Expr::Like {
            pattern,
            escape_char,
            ..
        }
        | Expr::ILike {
            pattern,
            escape_char,
            ..
        } = e
        {
            let escape = escape_char.as_ref().and_then(|v| match &v.value {
                Value::SingleQuotedString(c) if c.chars().count() == 1 => c.chars().next(),
                _ => None,
            });
            if let Some(escape) = escape.filter(|c| *c != '\\') {
                rebase_escapes(pattern, escape);
                *escape_char = None;
            }
        }
        // 'name'::regclass is the relation's OID.
        if let Expr::Cast {
            expr, data_type, ..
        } = e
        {
            let is_regclass = matches!(data_type, DataType::Regclass)
                || matches!(plain_type_name(data_type).as_deref(), Some("regclass"));
            if let (true, Expr::Value(v)) = (is_regclass, expr.as_ref()) {
                if let Value::SingleQuotedString(name) = &v.value {
                    match regclass(name, facts) {
                        Ok(oid) => *e = number(oid),
                        Err(err) => {
                            failed = Some(err);
                            return ControlFlow::Break(());
                        }
                    }
                    return ControlFlow::Continue(());
                }
            }
        }
        // 'pg_catalog.array_in'::regproc is the function's name (the
        // catalogs' regproc columns hold names here).
        if let Expr::Cast {
            expr, data_type, ..
        } = e
        {
            let is_regproc = matches!(plain_type_name(data_type).as_deref(), Some("regproc"));
            if let (true, Expr::Value(v)) = (is_regproc, expr.as_ref()) {
                if let Value::SingleQuotedString(name) = &v.value {
                    let name = name.strip_prefix("pg_catalog.").unwrap_or(name).to_string();
                    *e = text(&name);
                    return ControlFlow::Continue(());
                }
            }
        }
        // Comments are not stored: obj_description(...) and kin are NULL,
        // whatever their arguments (often casts Drizzle cannot evaluate,
        // such as a computed name to regclass).
        if let Some((name, _)) = session_call(e) {
            if matches!(
                name.as_str(),
                "obj_description" | "col_description" | "shobj_description"
            ) {
                *e = Expr::Cast {
                    kind: datafusion::sql::sqlparser::ast::CastKind::DoubleColon,
                    expr: Box::new(null()),
                    data_type: DataType::Text,
                    array: false,
                    format: None,
                };
                return ControlFlow::Continue(());
            }
        }
        // ::pg_catalog.text is ::text; ::regclass and kin are OIDs.
        if let Expr::Cast { data_type, .. } = e {
            if let Some(t) = plain_type(data_type) {
                *data_type = t;
            }
        }
        // ARRAY(SELECT ... FROM unnest(<catalog array>)): the catalogs'
        // arrays (ACLs, options) are all NULL, so the array is empty.
        if let Expr::Function(f) = e {
            let is_array = last_name(&f.name).as_deref() == Some("array");
            let sub: Option<&Query> = match &f.args {
                FunctionArguments::Subquery(sub) => Some(sub),
                FunctionArguments::List(list) => match list.args.as_slice() {
                    [FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Subquery(sub)))] => Some(sub),
                    _ => None,
                },
                FunctionArguments::None => None,
            };
            if let (true, Some(sub)) = (is_array, sub) {
                if unnests_catalog_array(sub) {
                    *e = Expr::Cast {
                        kind: datafusion::sql::sqlparser::ast::CastKind::DoubleColon,
                        expr: Box::new(null()),
                        data_type: DataType::Array(
                            datafusion::sql::sqlparser::ast::ArrayElemTypeDef::SquareBracket(
                                Box::new(DataType::Text),
                                None,
                            ),
                        ),
                        array: false,
                        format: None,
                    };
                    return ControlFlow::Continue(());
                }
            }
        }
        // A catalog lookup as a scalar subquery: DataFusion wants it
        // aggregated (it yields at most one row, as in Postgres).
        if let Expr::Subquery(sub) = e {
            if reads_empty_catalog(sub) {
                *e = null();
            } else {
                aggregate_catalog_lookup(sub);
            }
        }
        // pg_get_viewdef(oid): a view's definition, from the catalog.
        if let Some(def) = viewdef_lookup(e) {
            *e = def;
            return ControlFlow::Continue(());
        }
        // COLLATE "C" / pg_catalog.default: text compares bytewise here.
        if let Expr::Collate { expr, .. } = e {
            *e = (**expr).clone();
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
    if let Some(e) = failed {
        return Err(e);
    }
    let mut wildcards = ExpandWildcards { facts, settings };
    let _ = datafusion::sql::sqlparser::ast::VisitMut::visit(q, &mut wildcards);
    let mut names = UniqueNames;
    let _ = datafusion::sql::sqlparser::ast::VisitMut::visit(q, &mut names);
    Ok(())
}

/// Parses one table factor or expression written by a rewrite (its parts
/// are rendered from a parsed statement, so it parses).
fn parse_sql<T>(
    sql: &str,
    f: impl FnOnce(
        &mut datafusion::sql::sqlparser::parser::Parser<'_>,
    ) -> Result<T, datafusion::sql::sqlparser::parser::ParserError>,
) -> Option<T> {
    let dialect = datafusion::sql::sqlparser::dialect::PostgreSqlDialect {};
    let mut parser = datafusion::sql::sqlparser::parser::Parser::new(&dialect)
        .try_with_sql(sql)
        .ok()?;
    f(&mut parser).ok()
}

/// Functions in FROM, as Postgres reads them (Grafana's and pgjdbc's
/// catalog queries use both forms):
/// - `generate_series(a, b) AS s(r)` is the rows `a..=b` in column `r`
///   (`(SELECT unnest(generate_series(a, b)) AS r) AS s`);
/// - any other (scalar) function, `string_to_array(...) s`, is one row
///   whose column is named after the alias (`(SELECT f(...) AS s) AS s`).
///
/// `TUMBLE` and `HOP` stay (Drizzle's window table functions), and so does
/// `unnest` (DataFusion plans it in FROM).
struct FunctionsInFrom;

impl datafusion::sql::sqlparser::ast::VisitorMut for FunctionsInFrom {
    type Break = ();

    fn pre_visit_table_factor(
        &mut self,
        t: &mut datafusion::sql::sqlparser::ast::TableFactor,
    ) -> ControlFlow<()> {
        let datafusion::sql::sqlparser::ast::TableFactor::Table {
            name,
            alias,
            args: Some(args),
            with_ordinality: false,
            ..
        } = t
        else {
            return ControlFlow::Continue(());
        };
        let Some(function) = last_name(name) else {
            return ControlFlow::Continue(());
        };
        let function = function.to_lowercase();
        if matches!(function.as_str(), "tumble" | "hop" | "session" | "unnest") || name.0.len() > 2
        {
            return ControlFlow::Continue(());
        }
        let rendered = args
            .args
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let table = alias
            .as_ref()
            .map_or_else(|| Ident::new(&function).to_string(), |a| a.name.to_string());
        let column = alias
            .as_ref()
            .and_then(|a| a.columns.first())
            .map_or_else(|| table.clone(), |c| c.name.to_string());
        let value = if function == "generate_series" {
            format!("unnest(generate_series({rendered}))")
        } else {
            format!("{}({rendered})", Ident::new(&function))
        };
        let sql = format!("(SELECT {value} AS {column}) AS {table}");
        if let Some(derived) = parse_sql(&sql, |p| p.parse_table_factor()) {
            *t = derived;
        }
        ControlFlow::Continue(())
    }
}

/// `pg_get_viewdef(oid [, pretty])` is the view's definition, read from
/// `drizzle_relations` (a catalog lookup, so it plans correlated).
fn viewdef_lookup(e: &Expr) -> Option<Expr> {
    let (name, args) = session_call(e)?;
    if name != "pg_get_viewdef" || args.is_empty() || args.len() > 2 {
        return None;
    }
    let sql = format!(
        "(SELECT max(definition) FROM pg_catalog.drizzle_relations WHERE oid = {})",
        args[0]
    );
    parse_sql(&sql, |p| p.parse_expr())
}

/// `xmin`, the system column DataGrip reads from every catalog (to load
/// only what changed): catalog rows have no transaction ids in Drizzle, so
/// it is 1 (with `age(xid)` 0, every row counts as new). A column named
/// `xmin` is replaced only where it names a catalog's: qualified by the
/// alias of a `pg_*` table, or bare in a query that reads only catalogs.
fn hide_system_columns(q: &mut Query) {
    let mut catalogs = Vec::new();
    let mut user_tables = false;
    let _ = datafusion::sql::sqlparser::ast::visit_relations(&*q, |name| {
        let last = last_name(name).unwrap_or_default().to_lowercase();
        if last.starts_with("pg_") {
            catalogs.push(last);
        } else {
            user_tables = true;
        }
        ControlFlow::<()>::Continue(())
    });
    if catalogs.is_empty() {
        return;
    }
    let mut aliases = CatalogAliases(catalogs);
    let _ = datafusion::sql::sqlparser::ast::Visit::visit(&*q, &mut aliases);
    let aliases = aliases.0;
    let _ = visit_expressions_mut(q, |e| {
        let is_xmin = match e {
            Expr::Identifier(i) => !user_tables && i.value.eq_ignore_ascii_case("xmin"),
            Expr::CompoundIdentifier(parts) => match parts.as_slice() {
                [.., table, column] => {
                    column.value.eq_ignore_ascii_case("xmin")
                        && aliases.contains(&table.value.to_lowercase())
                }
                _ => false,
            },
            _ => false,
        };
        if is_xmin {
            *e = number(1);
        }
        ControlFlow::<()>::Continue(())
    });
}

/// `ORDER BY CASE WHEN x IN (SELECT ...) ...` (Grafana's table list):
/// DataFusion plans subqueries in projections and filters but not in a
/// sort, so the select is wrapped and sorts by columns it computes:
/// `SELECT a, b FROM (SELECT a, b, <key> AS "?sort?1" ...) ORDER BY "?sort?1"`.
struct SortBySubqueries;

impl datafusion::sql::sqlparser::ast::VisitorMut for SortBySubqueries {
    type Break = ();

    fn post_visit_query(&mut self, q: &mut Query) -> ControlFlow<()> {
        sort_by_subqueries(q);
        ControlFlow::Continue(())
    }
}

fn contains_subquery(e: &Expr) -> bool {
    let mut found = false;
    let _ = datafusion::sql::sqlparser::ast::visit_expressions(e, |e| {
        if matches!(
            e,
            Expr::Subquery(_) | Expr::InSubquery { .. } | Expr::Exists { .. }
        ) {
            found = true;
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    found
}

fn sort_by_subqueries(q: &mut Query) {
    use datafusion::sql::sqlparser::ast::OrderByKind;
    let Some(order_by) = q.order_by.as_mut() else {
        return;
    };
    let OrderByKind::Expressions(keys) = &mut order_by.kind else {
        return;
    };
    if !keys.iter().any(|k| contains_subquery(&k.expr)) {
        return;
    }
    let SetExpr::Select(select) = q.body.as_mut() else {
        return;
    };
    if select.distinct.is_some() || is_grouped(select) || has_aggregate(select) {
        return;
    }
    let mut names: Vec<Ident> = Vec::new();
    for item in &select.projection {
        let name = match item {
            SelectItem::ExprWithAlias { alias, .. } => alias.clone(),
            SelectItem::UnnamedExpr(Expr::Identifier(i)) => i.clone(),
            SelectItem::UnnamedExpr(Expr::CompoundIdentifier(p)) => match p.last() {
                Some(i) => i.clone(),
                None => return,
            },
            _ => return,
        };
        if names.iter().any(|n| n.value == name.value) {
            return;
        }
        names.push(name);
    }
    let mut inner = select.as_ref().clone();
    for (k, key) in keys.iter_mut().enumerate() {
        let position = match &key.expr {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => n.parse::<usize>().ok(),
                _ => None,
            },
            _ => None,
        };
        let column = match position {
            Some(p) if p >= 1 && p <= names.len() => names[p - 1].clone(),
            Some(_) => return,
            None => {
                let alias = Ident::with_quote('"', format!("?sort?{}", k + 1));
                inner.projection.push(SelectItem::ExprWithAlias {
                    expr: key.expr.clone(),
                    alias: alias.clone(),
                });
                alias
            }
        };
        key.expr = Expr::Identifier(column);
    }
    let outer = format!(
        "SELECT {} FROM ({inner}) AS \"?sorted?\"",
        names
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(body) = parse_sql(&outer, |p| p.parse_query()) {
        q.body = body.body;
    }
}

/// `CASE WHEN x IN (SELECT y ...) ...` in a select item: DataFusion plans
/// `IN (subquery)` in filters only, so in select items it becomes a
/// membership test of the aggregated subquery,
/// `coalesce(array_has((SELECT array_agg(y) ...), x), false)` (NULL when
/// `x` is; a NULL among the subquery's values does not make it NULL).
struct MembershipInSelectItems;

impl datafusion::sql::sqlparser::ast::VisitorMut for MembershipInSelectItems {
    type Break = ();

    fn pre_visit_query(&mut self, q: &mut Query) -> ControlFlow<()> {
        each_select(q.body.as_mut(), &mut |select| {
            for item in &mut select.projection {
                if let SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } = item
                {
                    let _ = visit_expressions_mut(e, |e| {
                        if let Some(test) = membership_test(e) {
                            *e = test;
                        }
                        ControlFlow::<()>::Continue(())
                    });
                }
            }
        });
        ControlFlow::Continue(())
    }
}

fn membership_test(e: &Expr) -> Option<Expr> {
    let Expr::InSubquery {
        expr,
        subquery,
        negated,
    } = e
    else {
        return None;
    };
    let mut sub = subquery.as_ref().clone();
    if sub.order_by.is_some() || sub.limit_clause.is_some() || sub.with.is_some() {
        return None;
    }
    let SetExpr::Select(select) = sub.body.as_mut() else {
        return None;
    };
    if select.projection.len() != 1
        || select.distinct.is_some()
        || is_grouped(select)
        || has_aggregate(select)
    {
        return None;
    }
    let (SelectItem::UnnamedExpr(item) | SelectItem::ExprWithAlias { expr: item, .. }) =
        select.projection[0].clone()
    else {
        return None;
    };
    select.projection[0] = SelectItem::UnnamedExpr(call("array_agg", vec![item]));
    // NULL IN (...) is NULL; an empty subquery contains nothing.
    let test = format!(
        "CASE WHEN ({expr}) IS NULL THEN NULL ELSE {}coalesce(array_has(({sub}), {expr}), false) END",
        if *negated { "NOT " } else { "" }
    );
    parse_sql(&test, |p| p.parse_expr())
}

/// Collects the aliases of `pg_*` tables (after their names).
struct CatalogAliases(Vec<String>);

impl datafusion::sql::sqlparser::ast::Visitor for CatalogAliases {
    type Break = ();

    fn pre_visit_table_factor(
        &mut self,
        t: &datafusion::sql::sqlparser::ast::TableFactor,
    ) -> ControlFlow<()> {
        if let datafusion::sql::sqlparser::ast::TableFactor::Table {
            name,
            alias: Some(alias),
            args: None,
            ..
        } = t
        {
            if last_name(name).is_some_and(|n| n.starts_with("pg_")) {
                self.0.push(alias.name.value.to_lowercase());
            }
        }
        ControlFlow::Continue(())
    }
}

/// `SELECT n.oid, n.* FROM pg_namespace n` (DBeaver's way): Postgres
/// returns `oid` twice, DataFusion refuses two columns of one name. The
/// wildcard is expanded to the relation's other columns, so each column
/// comes once (clients read them by name).
struct ExpandWildcards<'a, 'b> {
    facts: &'a SessionFacts<'b>,
    settings: &'a Settings,
}

impl datafusion::sql::sqlparser::ast::VisitorMut for ExpandWildcards<'_, '_> {
    type Break = ();

    fn post_visit_query(&mut self, q: &mut Query) -> ControlFlow<()> {
        if let SetExpr::Select(select) = q.body.as_mut() {
            self.expand(select);
        }
        ControlFlow::Continue(())
    }
}

impl ExpandWildcards<'_, '_> {
    /// The column names of the relation `alias` stands for in `from`.
    fn columns_of(
        &self,
        from: &[datafusion::sql::sqlparser::ast::TableWithJoins],
        alias: &str,
    ) -> Option<Vec<String>> {
        use datafusion::sql::sqlparser::ast::TableFactor;
        let factors = from
            .iter()
            .flat_map(|t| std::iter::once(&t.relation).chain(t.joins.iter().map(|j| &j.relation)));
        for f in factors {
            let TableFactor::Table { name, alias: a, .. } = f else {
                continue;
            };
            let table = last_name(name)?;
            let called = a
                .as_ref()
                .map_or(table.clone(), |a| a.name.value.to_lowercase());
            if called != alias {
                continue;
            }
            let schema = match name.0.len() {
                2 => name.0.first().and_then(|p| match p {
                    ObjectNamePart::Identifier(i) => Some(i.value.to_lowercase()),
                    _ => None,
                }),
                _ => None,
            };
            let resolver = crate::system_catalog::SystemResolver {
                catalog: self.facts.catalog,
                asker: crate::system_catalog::Asker {
                    database: self.facts.database,
                    settings: self.settings,
                    sessions: self.facts.registry,
                },
            };
            use drizzle_planner::RelationResolver;
            let relation = match schema.as_deref() {
                Some(s @ ("pg_catalog" | "information_schema")) => {
                    resolver.resolve_system(s, &table)
                }
                _ => resolver
                    .resolve(&table)
                    .or_else(|| resolver.resolve_system("pg_catalog", &table)),
            }?;
            let fields = match relation {
                drizzle_planner::Relation::Finite(p) => p
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .collect(),
                drizzle_planner::Relation::Stream(def) => def
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .collect(),
            };
            return Some(fields);
        }
        None
    }

    fn expand(&self, select: &mut Select) {
        let explicit: Vec<(String, String)> = select
            .projection
            .iter()
            .filter_map(|i| match i {
                SelectItem::UnnamedExpr(Expr::CompoundIdentifier(p)) if p.len() == 2 => {
                    Some((p[0].value.to_lowercase(), p[1].value.to_lowercase()))
                }
                _ => None,
            })
            .collect();
        if explicit.is_empty() {
            return;
        }
        let mut out = Vec::with_capacity(select.projection.len());
        for item in std::mem::take(&mut select.projection) {
            let SelectItem::QualifiedWildcard(kind, options) = &item else {
                out.push(item);
                continue;
            };
            let alias = match kind {
                datafusion::sql::sqlparser::ast::SelectItemQualifiedWildcardKind::ObjectName(n) => {
                    last_name(n)
                }
                _ => None,
            };
            let plain_options = options.opt_exclude.is_none()
                && options.opt_except.is_none()
                && options.opt_replace.is_none()
                && options.opt_rename.is_none();
            let repeats = alias
                .as_ref()
                .is_some_and(|a| explicit.iter().any(|(q, _)| q == a));
            let columns = match (&alias, plain_options && repeats) {
                (Some(a), true) => self.columns_of(&select.from, a),
                _ => None,
            };
            let (Some(alias), Some(columns)) = (alias, columns) else {
                out.push(item);
                continue;
            };
            for c in columns {
                if explicit
                    .iter()
                    .any(|(q, e)| *q == alias && *e == c.to_lowercase())
                {
                    continue;
                }
                out.push(SelectItem::UnnamedExpr(Expr::CompoundIdentifier(vec![
                    Ident::new(alias.clone()),
                    Ident::with_quote('"', c),
                ])));
            }
        }
        select.projection = out;
    }
}

/// A `SELECT` (without aggregates) over an inner join with an
/// always-empty catalog yields no rows whatever it computes: its items
/// become NULLs of the same names, so that expressions DataFusion cannot
/// plan (psql's queries of publications, policies and statistics) are
/// never planned.
struct EmptySelects;

impl datafusion::sql::sqlparser::ast::VisitorMut for EmptySelects {
    type Break = ();

    fn pre_visit_query(&mut self, q: &mut Query) -> ControlFlow<()> {
        if let SetExpr::Select(select) = q.body.as_mut() {
            // No rows: no order either (and the sort keys, which may name
            // columns the NULLs replaced, go with it).
            if empty_selects(select) {
                q.order_by = None;
            }
        } else {
            each_select(q.body.as_mut(), &mut |s| {
                empty_selects(s);
            });
        }
        ControlFlow::Continue(())
    }
}

fn is_aggregate(name: &str) -> bool {
    matches!(
        name,
        "count"
            | "sum"
            | "min"
            | "max"
            | "avg"
            | "array_agg"
            | "string_agg"
            | "bool_and"
            | "bool_or"
    )
}

/// Calls `f` on every `SELECT` of a query body (both sides of a UNION).
fn each_select(body: &mut SetExpr, f: &mut dyn FnMut(&mut Select)) {
    match body {
        SetExpr::Select(select) => f(select),
        SetExpr::SetOperation { left, right, .. } => {
            each_select(left, f);
            each_select(right, f);
        }
        _ => {}
    }
}

fn is_grouped(select: &Select) -> bool {
    !matches!(
        &select.group_by,
        datafusion::sql::sqlparser::ast::GroupByExpr::Expressions(e, _) if e.is_empty()
    )
}

/// Replaces the items of a select over an empty join by NULLs (named as
/// before) and drops its filter; true when it did.
fn empty_selects(select: &mut Select) -> bool {
    let wildcard = select.projection.iter().any(|i| {
        matches!(
            i,
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(_, _)
        )
    });
    if wildcard
        || is_grouped(select)
        || select.having.is_some()
        || has_aggregate(select)
        || !from_is_empty(&select.from)
    {
        return false;
    }
    for (i, item) in select.projection.iter_mut().enumerate() {
        let alias = match item {
            SelectItem::ExprWithAlias { alias, .. } => alias.clone(),
            SelectItem::UnnamedExpr(Expr::Identifier(id)) => id.clone(),
            SelectItem::UnnamedExpr(Expr::CompoundIdentifier(p)) => match p.last() {
                Some(id) => id.clone(),
                None => continue,
            },
            SelectItem::UnnamedExpr(_) => Ident::with_quote('"', format!("?column?{}", i + 1)),
            _ => continue,
        };
        *item = SelectItem::ExprWithAlias {
            expr: null(),
            alias,
        };
    }
    select.selection = None;
    true
}

/// Finds an aggregate call outside subqueries.
struct AggregateFinder {
    depth: usize,
    found: bool,
}

impl datafusion::sql::sqlparser::ast::Visitor for AggregateFinder {
    type Break = ();

    fn pre_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = e {
            if self.depth == 0 && last_name(&f.name).is_some_and(|n| is_aggregate(&n)) {
                self.found = true;
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }
}

fn from_is_empty(from: &[datafusion::sql::sqlparser::ast::TableWithJoins]) -> bool {
    use datafusion::sql::sqlparser::ast::{JoinOperator, TableFactor};
    fn empty(f: &TableFactor) -> bool {
        match f {
            TableFactor::Table {
                name, args: None, ..
            } => last_name(name).is_some_and(|n| EMPTY_CATALOGS.contains(&n.as_str())),
            // A derived table over an empty join (not aggregated: an
            // aggregate answers a row even over nothing).
            TableFactor::Derived { subquery, .. } => match subquery.body.as_ref() {
                SetExpr::Select(select) => {
                    !is_grouped(select) && !has_aggregate(select) && from_is_empty(&select.from)
                }
                _ => false,
            },
            _ => false,
        }
    }
    // With only inner, cross and left joins, the result is empty when the
    // first relation or any inner-joined one is.
    from.iter().any(|t| {
        let keeps_left = t.joins.iter().all(|j| {
            matches!(
                j.join_operator,
                JoinOperator::Inner(_)
                    | JoinOperator::Join(_)
                    | JoinOperator::CrossJoin(_)
                    | JoinOperator::Left(_)
                    | JoinOperator::LeftOuter(_)
            )
        });
        keeps_left
            && (empty(&t.relation)
                || t.joins.iter().any(|j| {
                    matches!(
                        j.join_operator,
                        JoinOperator::Inner(_) | JoinOperator::Join(_) | JoinOperator::CrossJoin(_)
                    ) && empty(&j.relation)
                }))
    })
}

/// True when a select item calls an aggregate (outside subqueries).
fn has_aggregate(select: &Select) -> bool {
    let mut finder = AggregateFinder {
        depth: 0,
        found: false,
    };
    for item in &select.projection {
        if let SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } = item {
            let _ = datafusion::sql::sqlparser::ast::Visit::visit(e, &mut finder);
        }
    }
    finder.found
}

/// Gives unnamed select items that would share a name (two NULLs, two
/// equal literals, which Postgres allows and DataFusion refuses) distinct
/// names.
struct UniqueNames;

impl datafusion::sql::sqlparser::ast::VisitorMut for UniqueNames {
    type Break = ();

    fn post_visit_query(&mut self, q: &mut Query) -> ControlFlow<()> {
        each_select(q.body.as_mut(), &mut unique_names);
        ControlFlow::Continue(())
    }
}

fn unique_names(select: &mut Select) {
    {
        let name_of = |item: &SelectItem| -> Option<String> {
            match item {
                SelectItem::UnnamedExpr(Expr::Identifier(i)) => Some(i.value.clone()),
                SelectItem::UnnamedExpr(Expr::CompoundIdentifier(p)) => {
                    p.last().map(|i| i.value.clone())
                }
                SelectItem::UnnamedExpr(e) => Some(e.to_string()),
                SelectItem::ExprWithAlias { alias, .. } => Some(alias.value.clone()),
                _ => None,
            }
        };
        let names: Vec<Option<String>> = select.projection.iter().map(name_of).collect();
        for (i, item) in select.projection.iter_mut().enumerate() {
            let Some(name) = &names[i] else { continue };
            let earlier = names[..i]
                .iter()
                .filter(|n| n.as_ref() == Some(name))
                .count();
            let unnamed_expr = matches!(item, SelectItem::UnnamedExpr(e)
                if !matches!(e, Expr::Identifier(_) | Expr::CompoundIdentifier(_)));
            if earlier > 0 && unnamed_expr {
                if let SelectItem::UnnamedExpr(e) = item {
                    *item = SelectItem::ExprWithAlias {
                        expr: e.clone(),
                        alias: Ident::with_quote('"', format!("?column?{}", earlier + 1)),
                    };
                }
            }
        }
    }
}

/// The name of a custom (`pg_catalog.`-qualified or Postgres-only) type.
fn plain_type_name(t: &DataType) -> Option<String> {
    let DataType::Custom(name, _) = t else {
        return None;
    };
    let parts: Vec<String> = name
        .0
        .iter()
        .filter_map(|p| match p {
            ObjectNamePart::Identifier(i) => Some(i.value.to_lowercase()),
            _ => None,
        })
        .collect();
    match parts.as_slice() {
        [schema, base] if schema == "pg_catalog" => Some(base.clone()),
        [base] => Some(base.clone()),
        _ => None,
    }
}

/// The type a Postgres-only or `pg_catalog.`-qualified type name stands for.
fn plain_type(t: &DataType) -> Option<DataType> {
    if matches!(t, DataType::Regclass) {
        return Some(DataType::BigInt(None));
    }
    let base = plain_type_name(t)?;
    Some(match base.as_str() {
        "text" | "name" | "char" | "bpchar" | "varchar" => DataType::Text,
        "bool" | "boolean" => DataType::Boolean,
        "int2" | "smallint" => DataType::SmallInt(None),
        "int4" | "int" | "integer" => DataType::Integer(None),
        "int8" | "bigint" | "oid" | "regclass" | "regtype" | "regproc" | "regprocedure"
        | "regnamespace" | "regrole" | "regoper" | "xid" | "cid" => DataType::BigInt(None),
        "float4" | "real" => DataType::Real,
        "float8" => DataType::DoublePrecision,
        "timestamp" => DataType::Timestamp(None, TimezoneInfo::None),
        "timestamptz" => DataType::Timestamp(None, TimezoneInfo::WithTimeZone),
        "date" => DataType::Date,
        _ => return None,
    })
}

/// `SELECT ... FROM unnest(x)` or from a catalog: psql's way of listing a
/// catalog array (ACLs, options, policy roles), all NULL or empty in Drizzle.
fn unnests_catalog_array(sub: &Query) -> bool {
    let SetExpr::Select(select) = sub.body.as_ref() else {
        return false;
    };
    select.from.iter().any(|t| match &t.relation {
        datafusion::sql::sqlparser::ast::TableFactor::Table { name, .. } => {
            last_name(name).is_some_and(|n| n == "unnest" || n.starts_with("pg_"))
        }
        datafusion::sql::sqlparser::ast::TableFactor::Function { name, .. } => {
            last_name(name).as_deref() == Some("unnest")
        }
        _ => false,
    })
}

/// The system catalogs that are always empty in Drizzle (see
/// `system_catalog`).
const EMPTY_CATALOGS: &[&str] = &[
    "pg_attrdef",
    "pg_collation",
    "pg_constraint",
    "pg_depend",
    "pg_description",
    "pg_enum",
    "pg_event_trigger",
    "pg_extension",
    "pg_foreign_table",
    "pg_index",
    "pg_inherits",
    "pg_locks",
    "pg_opclass",
    "pg_partitioned_table",
    "pg_policy",
    "pg_proc",
    "pg_publication",
    "pg_publication_namespace",
    "pg_publication_rel",
    "pg_rewrite",
    "pg_sequence",
    "pg_shdescription",
    "pg_stat_all_tables",
    "pg_stat_user_tables",
    "pg_statistic_ext",
    "pg_trigger",
    "pg_views",
];

/// A scalar subquery that inner-joins an always-empty catalog: its value is
/// NULL (no row), so it is replaced by NULL (DataFusion cannot plan every
/// correlated form psql sends).
fn reads_empty_catalog(sub: &Query) -> bool {
    let SetExpr::Select(select) = sub.body.as_ref() else {
        return false;
    };
    if select.projection.len() != 1 {
        return false;
    }
    if let SelectItem::UnnamedExpr(Expr::Function(f))
    | SelectItem::ExprWithAlias {
        expr: Expr::Function(f),
        ..
    } = &select.projection[0]
    {
        // An aggregate answers a row even over nothing.
        if last_name(&f.name).is_some_and(|n| is_aggregate(&n)) {
            return false;
        }
    }
    from_is_empty(&select.from)
}

/// `(SELECT x FROM pg_catalog.t WHERE ...)` becomes `(SELECT max(x) ...)`:
/// DataFusion plans a correlated scalar subquery only when it is
/// aggregated. Only lookups in the system catalogs, whose keys make them
/// one row at most, are changed.
fn aggregate_catalog_lookup(sub: &mut Query) {
    let SetExpr::Select(select) = sub.body.as_mut() else {
        return;
    };
    let reads_catalog = select.from.iter().any(|t| {
        let name = match &t.relation {
            datafusion::sql::sqlparser::ast::TableFactor::Table { name, .. } => name.to_string(),
            _ => return false,
        };
        let name = name.to_lowercase();
        name.starts_with("pg_") || name.starts_with("information_schema.")
    });
    if !reads_catalog || is_grouped(select) || select.projection.len() != 1 {
        return;
    }
    let item = &mut select.projection[0];
    let expr = match item {
        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
        _ => return,
    };
    if let Expr::Function(f) = expr {
        if last_name(&f.name).is_some_and(|n| is_aggregate(&n)) {
            return;
        }
    }
    let inner = expr.clone();
    *expr = Expr::Function(datafusion::sql::sqlparser::ast::Function {
        name: ObjectName::from(vec![Ident::new("max")]),
        uses_odbc_syntax: false,
        parameters: FunctionArguments::None,
        args: FunctionArguments::List(datafusion::sql::sqlparser::ast::FunctionArgumentList {
            duplicate_treatment: None,
            args: vec![FunctionArg::Unnamed(FunctionArgExpr::Expr(inner))],
            clauses: vec![],
        }),
        filter: None,
        null_treatment: None,
        over: None,
        within_group: vec![],
    });
}

/// The operator `OPERATOR(pg_catalog.name)` stands for.
fn plain_operator(name: &str) -> Option<BinaryOperator> {
    Some(match name {
        "~" => BinaryOperator::PGRegexMatch,
        "~*" => BinaryOperator::PGRegexIMatch,
        "!~" => BinaryOperator::PGRegexNotMatch,
        "!~*" => BinaryOperator::PGRegexNotIMatch,
        "~~" => BinaryOperator::PGLikeMatch,
        "!~~" => BinaryOperator::PGNotLikeMatch,
        "=" => BinaryOperator::Eq,
        "<>" | "!=" => BinaryOperator::NotEq,
        "<" => BinaryOperator::Lt,
        "<=" => BinaryOperator::LtEq,
        ">" => BinaryOperator::Gt,
        ">=" => BinaryOperator::GtEq,
        "||" => BinaryOperator::StringConcat,
        _ => return None,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(sql: &str) -> String {
        let mut stmt = drizzle_planner::parse_statements(sql)
            .unwrap()
            .into_iter()
            .next()
            .unwrap();
        let registry = SessionRegistry::default();
        let dir = tempfile::tempdir().unwrap();
        let catalog = crate::catalog::Catalog::open(dir.path()).unwrap();
        let facts = SessionFacts {
            catalog: &catalog,
            user: "u",
            superuser: true,
            database: "d",
            pid: 7,
            registry: &registry,
            dry: true,
        };
        let mut settings = Settings::for_tests();
        rewrite_statement(&mut stmt, &facts, &mut settings).unwrap();
        match stmt {
            DrizzleStatement::Query(q) => q.to_string(),
            _ => String::new(),
        }
    }

    #[test]
    fn selects_over_empty_catalogs_compute_nothing() {
        let out = rewritten(
            "SELECT pubname, NULL, NULL FROM pg_catalog.pg_publication p \
             JOIN pg_catalog.pg_publication_rel pr ON p.oid = pr.prpubid \
             UNION SELECT pubname, (SELECT string_agg(attname, ', ') FROM pg_attribute), 1 \
             FROM pg_catalog.pg_publication p JOIN pg_catalog.pg_publication_rel pr ON p.oid = pr.prpubid",
        );
        assert!(!out.contains("string_agg"), "{out}");
        let out = rewritten(
            "SELECT current_user, version(), x.a OPERATOR(pg_catalog.~) 'b' COLLATE \"C\" FROM x",
        );
        assert!(out.contains("'u' AS current_user"), "{out}");
        assert!(out.contains("x.a ~ 'b'"), "{out}");
        let out = rewritten(
            "SELECT 'pg_class'::regclass, '16384'::pg_catalog.regclass, 1::pg_catalog.text",
        );
        assert!(
            out.contains("1259") && out.contains("16384") && out.contains("1::TEXT"),
            "{out}"
        );
    }
}
