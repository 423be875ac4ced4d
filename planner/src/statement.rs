//! Drizzle's SQL statements and their parser.
//!
//! Standard SQL (queries, `CREATE TABLE` column lists, data types,
//! expressions) is parsed by DataFusion's re-exported `sqlparser`; Drizzle's
//! own statements (`CREATE STREAM ... WATERMARK FOR`, `SHOW QUERIES`,
//! `CANCEL QUERY`, ...) are parsed here by driving the same parser token by
//! token, so errors carry sqlparser's positions and wording.

use std::collections::BTreeMap;

use datafusion::sql::sqlparser::ast::{
    BinaryOperator, DateTimeField, Expr as SqlExpr, Ident, Interval, Query, Value,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::Token;

use crate::catalog::{ColumnDef, WatermarkSpec};
use crate::error::{PlanError, Result};
use crate::types::sql_to_arrow;

/// Kinds of catalog objects, for `DROP` and `SHOW`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// A stream.
    Stream,
    /// A reference table.
    Table,
    /// A materialized view.
    MaterializedView,
}

impl ObjectKind {
    /// The SQL words for this kind.
    pub fn sql_name(self) -> &'static str {
        match self {
            ObjectKind::Stream => "STREAM",
            ObjectKind::Table => "TABLE",
            ObjectKind::MaterializedView => "MATERIALIZED VIEW",
        }
    }
}

/// `COPY ... FROM STDIN` / `TO STDOUT` format options.
#[derive(Debug, Clone, PartialEq)]
pub struct CopyOptions {
    /// CSV (true) or Postgres text format (false).
    pub csv: bool,
    /// Skip (FROM) or write (TO) a header line.
    pub header: bool,
    /// Field delimiter.
    pub delimiter: char,
    /// The string that stands for NULL.
    pub null: String,
    /// Postgres's binary COPY format (`FORMAT binary`).
    pub binary: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            csv: false,
            header: false,
            delimiter: '\t',
            null: "\\N".into(),
            binary: false,
        }
    }
}

/// A parsed statement.
#[derive(Debug, Clone)]
pub enum DrizzleStatement {
    /// `CREATE STREAM`.
    CreateStream {
        /// Stream name.
        name: String,
        /// `IF NOT EXISTS` was given.
        if_not_exists: bool,
        /// Columns.
        columns: Vec<ColumnDef>,
        /// `WATERMARK FOR ...`.
        watermark: Option<WatermarkSpec>,
        /// `name [TIMESTAMPTZ] AS PROCTIME()`: the processing-time column.
        proctime: Option<String>,
        /// `WITH (...)` options, keys lower-cased.
        options: BTreeMap<String, String>,
    },
    /// `CREATE TABLE`.
    CreateTable {
        /// Table name.
        name: String,
        /// `IF NOT EXISTS` was given.
        if_not_exists: bool,
        /// Columns.
        columns: Vec<ColumnDef>,
    },
    /// `CREATE MATERIALIZED VIEW name AS query`.
    CreateView {
        /// View name.
        name: String,
        /// `IF NOT EXISTS` was given.
        if_not_exists: bool,
        /// The defining query.
        query: Box<Query>,
    },
    /// `CREATE [OR REPLACE] FUNCTION name(arg type, ...) RETURNS type
    /// LANGUAGE SQL AS 'SELECT expr'` (or `RETURN expr`).
    CreateFunction {
        /// The function.
        def: crate::catalog::FunctionDef,
        /// `OR REPLACE` was given.
        or_replace: bool,
    },
    /// `DROP FUNCTION [IF EXISTS] name[(types)]`.
    DropFunction {
        /// Function name.
        name: String,
        /// `IF EXISTS` was given.
        if_exists: bool,
    },
    /// `ALTER MATERIALIZED VIEW name SET [(] parallelism = N [)]`: the
    /// view's reduce partitions change at its next group boundary.
    AlterViewParallelism {
        /// View name.
        name: String,
        /// New number of reduce partitions.
        parallelism: u32,
    },
    /// `DROP STREAM|TABLE|MATERIALIZED VIEW [IF EXISTS] name`.
    Drop {
        /// What to drop.
        kind: ObjectKind,
        /// Name.
        name: String,
        /// `IF EXISTS` was given.
        if_exists: bool,
    },
    /// `INSERT INTO name [(cols)] query`.
    Insert {
        /// Target stream or table.
        target: String,
        /// Explicit column list (may be empty).
        columns: Vec<String>,
        /// `VALUES ...` or a finite `SELECT`.
        source: Box<Query>,
    },
    /// `COPY name [(cols)] FROM STDIN [options]`.
    CopyFrom {
        /// Target stream or table.
        target: String,
        /// Explicit column list (may be empty).
        columns: Vec<String>,
        /// Format options.
        options: CopyOptions,
    },
    /// `COPY (query) TO STDOUT [options]`.
    CopyTo {
        /// The query whose rows are written.
        query: Box<Query>,
        /// Format options.
        options: CopyOptions,
    },
    /// A query: continuous when it reads a stream, finite otherwise.
    Query(Box<Query>),
    /// `EXPLAIN query`.
    Explain(Box<Query>),
    /// `EXPLAIN ANALYZE id` or `EXPLAIN ANALYZE view_name`: a running
    /// query's stage graph with what each stage and operator did so far.
    ExplainAnalyze(AnalyzeTarget),
    /// `SHOW STREAMS|TABLES|MATERIALIZED VIEWS`.
    ShowObjects(ObjectKind),
    /// `SHOW QUERIES`.
    ShowQueries,
    /// `SHOW WORKERS`: registered workers and their scheduling counters.
    ShowWorkers,
    /// `SHOW CREATE STREAM|TABLE|MATERIALIZED VIEW name`.
    ShowCreate {
        /// What kind of object.
        kind: ObjectKind,
        /// Its name.
        name: String,
    },
    /// `SHOW name` (a session setting).
    ShowVariable(String),
    /// `SET [SESSION|LOCAL] name {=|TO} value`.
    Set {
        /// Setting name, lower-cased.
        name: String,
        /// Value as text.
        value: String,
    },
    /// `RESET name`.
    Reset(String),
    /// `CANCEL QUERY id`.
    CancelQuery(u64),
    /// `BEGIN` / `START TRANSACTION`.
    Begin,
    /// `COMMIT` / `END`.
    Commit,
    /// `ROLLBACK` / `ABORT`.
    Rollback,
    /// `DECLARE name CURSOR FOR query`.
    DeclareCursor {
        /// Cursor name.
        name: String,
        /// The query.
        query: Box<Query>,
    },
    /// `FETCH [n|ALL|NEXT] [FROM|IN] name [WITH (timeout = 'duration')]`.
    Fetch {
        /// Cursor name.
        name: String,
        /// How many rows at most (`None` = ALL).
        count: Option<u64>,
        /// Return what arrived after this long (µs), as Materialize's
        /// `FETCH ... WITH (timeout = ...)`; `None`: the session's
        /// `cursor_fetch_timeout`.
        timeout_us: Option<u64>,
    },
    /// `CLOSE name` / `CLOSE ALL`.
    CloseCursor(Option<String>),
    /// `DEALLOCATE [PREPARE] name` (`Some`) or `DEALLOCATE [PREPARE] ALL` (`None`).
    Deallocate(Option<String>),
    /// `DISCARD ALL`: drops prepared statements, cursors and portals and resets settings.
    DiscardAll,
    /// No-op statements drivers send.
    NoOp(&'static str),
    /// `ROLLBACK TO SAVEPOINT name`: the transaction block goes on (a
    /// failed one is usable again); nothing is undone.
    RollbackToSavepoint,
    /// `CREATE USER|ROLE name [WITH] option ...` (`USER` logs in by default).
    CreateRole {
        /// Role name.
        name: String,
        /// `CREATE USER` (may log in unless `NOLOGIN`) rather than `CREATE ROLE`.
        user: bool,
        /// The options given.
        options: RoleOptions,
    },
    /// `ALTER USER|ROLE name [WITH] option ...`.
    AlterRole {
        /// Role name.
        name: String,
        /// The options given.
        options: RoleOptions,
    },
    /// `DROP USER|ROLE [IF EXISTS] name [, ...]`.
    DropRole {
        /// Role names.
        names: Vec<String>,
        /// `IF EXISTS` was given.
        if_exists: bool,
    },
}

/// A password as written in SQL; never shown by `Debug`.
#[derive(Clone, PartialEq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Options of `CREATE/ALTER USER|ROLE`; `None` where not given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoleOptions {
    /// `PASSWORD 'text'` (`Some(Some)`) or `PASSWORD NULL` (`Some(None)`).
    pub password: Option<Option<Secret>>,
    /// `SUPERUSER` / `NOSUPERUSER`.
    pub superuser: Option<bool>,
    /// `LOGIN` / `NOLOGIN`.
    pub login: Option<bool>,
}

/// What `EXPLAIN ANALYZE` reports on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnalyzeTarget {
    /// A running query, by the id `SHOW QUERIES` gives.
    Query(u64),
    /// A materialized view's query, by the view's name.
    View(String),
}

impl DrizzleStatement {
    /// The command tag used in CommandComplete for statements without rows.
    pub fn tag(&self) -> &'static str {
        match self {
            DrizzleStatement::CreateStream { .. } => "CREATE STREAM",
            DrizzleStatement::CreateTable { .. } => "CREATE TABLE",
            DrizzleStatement::CreateView { .. } => "CREATE MATERIALIZED VIEW",
            DrizzleStatement::CreateFunction { .. } => "CREATE FUNCTION",
            DrizzleStatement::DropFunction { .. } => "DROP FUNCTION",
            DrizzleStatement::Drop { kind, .. } => match kind {
                ObjectKind::Stream => "DROP STREAM",
                ObjectKind::Table => "DROP TABLE",
                ObjectKind::MaterializedView => "DROP MATERIALIZED VIEW",
            },
            DrizzleStatement::Set { .. } => "SET",
            DrizzleStatement::Reset(_) => "RESET",
            DrizzleStatement::CancelQuery(_) => "CANCEL QUERY",
            DrizzleStatement::Begin => "BEGIN",
            DrizzleStatement::Commit => "COMMIT",
            DrizzleStatement::Rollback | DrizzleStatement::RollbackToSavepoint => "ROLLBACK",
            DrizzleStatement::DeclareCursor { .. } => "DECLARE CURSOR",
            DrizzleStatement::CloseCursor(_) => "CLOSE CURSOR",
            DrizzleStatement::Deallocate(None) => "DEALLOCATE ALL",
            DrizzleStatement::Deallocate(Some(_)) => "DEALLOCATE",
            DrizzleStatement::DiscardAll => "DISCARD ALL",
            DrizzleStatement::NoOp(tag) => tag,
            DrizzleStatement::CreateRole { .. } => "CREATE ROLE",
            DrizzleStatement::AlterRole { .. } => "ALTER ROLE",
            DrizzleStatement::DropRole { .. } => "DROP ROLE",
            _ => "SELECT",
        }
    }
}

/// How deep parentheses, subqueries and `CASE`s may nest (sqlparser's
/// recursion limit).
pub const MAX_NESTING: usize = 64;

/// How deep an expression tree may grow: the operators of a chain such as
/// `a + b + ... ` or `x = 1 OR x = 2 OR ...` each add a level, and every
/// nested parenthesis adds those of its own chains. Deeper statements are
/// refused with 54001 before they are planned: planning, optimising and
/// evaluating walk the tree recursively. Threads that plan and run user SQL
/// have stacks sized for this depth (see `drizzle_exec::THREAD_STACK_BYTES`).
pub const MAX_EXPRESSION_DEPTH: usize = 2_000;

/// Refuses a statement whose expression tree would be deeper than
/// [`MAX_EXPRESSION_DEPTH`], from its tokens alone (no tree is built, so this
/// check itself uses constant stack).
///
/// The estimate is an upper bound: within one parenthesis level every
/// operator token counts a level, a comma starts a new operand, and a nested
/// level adds to the levels of the one around it.
fn check_expression_depth<'a>(tokens: impl IntoIterator<Item = &'a Token>) -> Result<()> {
    let mut outer: Vec<usize> = Vec::new();
    let mut around = 0usize;
    let mut current = 0usize;
    for token in tokens {
        match token {
            Token::LParen | Token::LBracket => {
                outer.push(current);
                around += current;
                current = 0;
                if outer.len() > MAX_NESTING {
                    return Err(PlanError::TooComplex {
                        message: format!("parentheses nest more than {MAX_NESTING} levels deep"),
                    });
                }
            }
            Token::RParen | Token::RBracket => {
                current = outer.pop().unwrap_or(0);
                around = around.saturating_sub(current);
            }
            Token::Comma | Token::SemiColon => current = 0,
            Token::EscapedStringLiteral(text) if text.contains('\0') => {
                return Err(PlanError::InvalidText {
                    message: "invalid byte sequence for encoding \"UTF8\": 0x00".into(),
                })
            }
            Token::Word(w)
                if matches!(
                    w.keyword,
                    Keyword::AND
                        | Keyword::OR
                        | Keyword::NOT
                        | Keyword::IS
                        | Keyword::LIKE
                        | Keyword::ILIKE
                        | Keyword::BETWEEN
                        | Keyword::IN
                        | Keyword::CASE
                        | Keyword::WHEN
                ) && w.quote_style.is_none() =>
            {
                current += 1
            }
            Token::Plus
            | Token::Minus
            | Token::Mul
            | Token::Div
            | Token::Mod
            | Token::StringConcat
            | Token::Eq
            | Token::DoubleEq
            | Token::Neq
            | Token::Lt
            | Token::Gt
            | Token::LtEq
            | Token::GtEq
            | Token::Caret
            | Token::Ampersand
            | Token::Pipe
            | Token::ShiftLeft
            | Token::ShiftRight
            | Token::DoubleColon
            | Token::Tilde
            | Token::ExclamationMark => current += 1,
            _ => {}
        }
        if around + current > MAX_EXPRESSION_DEPTH {
            return Err(PlanError::TooComplex {
                message: format!(
                    "an expression is more than {MAX_EXPRESSION_DEPTH} operators deep"
                ),
            });
        }
    }
    Ok(())
}

/// `t FOR SYSTEM_TIME AS OF x` (Flink's and RisingWave's temporal join of
/// a stream with a table at processing time): Drizzle's lookup join of a
/// stream with a table already reads the table as it is when each
/// micro-batch runs, so the clause is read and dropped. `x` is a column
/// reference (`b.p_time`) or a call (`PROCTIME()`). Tables keep no history,
/// so this is the only meaning it can have.
fn processing_time_lookups(
    mut tokens: Vec<datafusion::sql::sqlparser::tokenizer::TokenWithSpan>,
) -> Vec<datafusion::sql::sqlparser::tokenizer::TokenWithSpan> {
    use datafusion::sql::sqlparser::tokenizer::Whitespace;
    let blank = |t: &Token| matches!(t, Token::Whitespace(_));
    let word = |t: &Token, w: &str| matches!(t, Token::Word(x) if x.quote_style.is_none() && x.value.eq_ignore_ascii_case(w));
    let mut i = 0;
    while i < tokens.len() {
        // The clause's words, in order, with only blanks between them.
        let mut at = i;
        let mut matched = true;
        for w in ["FOR", "SYSTEM_TIME", "AS", "OF"] {
            while at < tokens.len() && blank(&tokens[at].token) && w != "FOR" {
                at += 1;
            }
            if at < tokens.len() && word(&tokens[at].token, w) {
                at += 1;
            } else {
                matched = false;
                break;
            }
        }
        if !matched {
            i += 1;
            continue;
        }
        // The expression: a dotted name, or a call with its parentheses.
        while at < tokens.len() && blank(&tokens[at].token) {
            at += 1;
        }
        let mut end = at;
        while end < tokens.len() && matches!(tokens[end].token, Token::Word(_)) {
            end += 1;
            if end < tokens.len() && tokens[end].token == Token::Period {
                end += 1;
            } else {
                break;
            }
        }
        if end < tokens.len() && tokens[end].token == Token::LParen {
            let mut depth = 0usize;
            while end < tokens.len() {
                match tokens[end].token {
                    Token::LParen => depth += 1,
                    Token::RParen => depth = depth.saturating_sub(1),
                    _ => {}
                }
                end += 1;
                if depth == 0 {
                    break;
                }
            }
        }
        if end == at {
            // No expression: left for the parser to refuse.
            i += 1;
            continue;
        }
        for t in &mut tokens[i..end] {
            t.token = Token::Whitespace(Whitespace::Space);
        }
        i = end;
    }
    tokens
}

/// Flink's window table functions, `TABLE(HOP(TABLE bid, DESCRIPTOR(ts),
/// slide, size))`, read as Drizzle's (and RisingWave's) `HOP(bid, ts, slide,
/// size)`: the same windows with the same arguments in the same order, so
/// Flink's `TUMBLE`, `HOP` and `SESSION` queries run as Flink writes them.
/// The `TABLE(...)` around the call, `TABLE` before the relation and
/// `DESCRIPTOR(...)` around the time column are dropped; anything else is
/// left for the parser.
fn flink_window_tables(
    mut tokens: Vec<datafusion::sql::sqlparser::tokenizer::TokenWithSpan>,
) -> Vec<datafusion::sql::sqlparser::tokenizer::TokenWithSpan> {
    use datafusion::sql::sqlparser::tokenizer::Whitespace;
    let word = |t: &Token, w: &str| matches!(t, Token::Word(x) if x.quote_style.is_none() && x.value.eq_ignore_ascii_case(w));
    // The next token that is not blank, from `i` on.
    let next = |tokens: &[datafusion::sql::sqlparser::tokenizer::TokenWithSpan], mut i: usize| {
        while i < tokens.len() && matches!(tokens[i].token, Token::Whitespace(_)) {
            i += 1;
        }
        i
    };
    // The index of the parenthesis closing the one at `open`.
    let closing = |tokens: &[datafusion::sql::sqlparser::tokenizer::TokenWithSpan], open: usize| {
        let mut depth = 0usize;
        for (i, t) in tokens.iter().enumerate().skip(open) {
            match t.token {
                Token::LParen => depth += 1,
                Token::RParen => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        return Some(i);
                    }
                }
                _ => {}
            }
        }
        None
    };
    let blank = |t: &mut datafusion::sql::sqlparser::tokenizer::TokenWithSpan| {
        t.token = Token::Whitespace(Whitespace::Space);
    };
    let mut i = 0;
    while i < tokens.len() {
        if !word(&tokens[i].token, "TABLE") {
            i += 1;
            continue;
        }
        let outer_open = next(&tokens, i + 1);
        let call = next(&tokens, outer_open + 1);
        let inner_open = next(&tokens, call + 1);
        let is_window = outer_open < tokens.len()
            && tokens[outer_open].token == Token::LParen
            && call < tokens.len()
            && ["TUMBLE", "HOP", "SESSION", "CUMULATE"]
                .iter()
                .any(|w| word(&tokens[call].token, w))
            && inner_open < tokens.len()
            && tokens[inner_open].token == Token::LParen;
        let inner_close = if is_window {
            closing(&tokens, inner_open)
        } else {
            None
        };
        let outer_close = inner_close
            .map(|c| next(&tokens, c + 1))
            .filter(|&c| c < tokens.len() && tokens[c].token == Token::RParen);
        let (Some(inner_close), Some(outer_close)) = (inner_close, outer_close) else {
            i += 1;
            continue;
        };
        blank(&mut tokens[i]);
        blank(&mut tokens[outer_open]);
        blank(&mut tokens[outer_close]);
        // `TABLE` before the relation, the call's first argument.
        let first = next(&tokens, inner_open + 1);
        if first < inner_close && word(&tokens[first].token, "TABLE") {
            blank(&mut tokens[first]);
        }
        // `DESCRIPTOR(col)` → `col`, among the call's own arguments.
        let mut at = inner_open + 1;
        while at < inner_close {
            if word(&tokens[at].token, "DESCRIPTOR") {
                let open = next(&tokens, at + 1);
                if open < inner_close && tokens[open].token == Token::LParen {
                    if let Some(close) = closing(&tokens, open).filter(|&c| c < inner_close) {
                        blank(&mut tokens[at]);
                        blank(&mut tokens[open]);
                        blank(&mut tokens[close]);
                        at = close;
                    }
                }
            }
            at += 1;
        }
        i = outer_close + 1;
    }
    tokens
}

/// Parses a string holding zero or more `;`-separated statements.
///
/// Statements nested deeper than [`MAX_NESTING`] or with expressions deeper
/// than [`MAX_EXPRESSION_DEPTH`] are refused (54001).
pub fn parse_statements(sql: &str) -> Result<Vec<DrizzleStatement>> {
    let dialect = PostgreSqlDialect {};
    let tokens = datafusion::sql::sqlparser::tokenizer::Tokenizer::new(&dialect, sql)
        .tokenize_with_location()
        .map_err(|e| {
            // sqlparser stops at an escape for a NUL byte (E'\x00', E'\000',
            // E'\u0000'); Postgres refuses NUL in text with 22021.
            let lower = sql.to_ascii_lowercase();
            if e.message.contains("Unterminated encoded string literal")
                && ["\\x00", "\\000", "\\u0000"]
                    .iter()
                    .any(|n| lower.contains(n))
            {
                PlanError::InvalidText {
                    message: "invalid byte sequence for encoding \"UTF8\": 0x00".into(),
                }
            } else {
                PlanError::syntax(e.to_string())
            }
        })?;
    check_expression_depth(tokens.iter().map(|t| &t.token))?;
    let tokens = flink_window_tables(processing_time_lookups(tokens));
    let mut parser = Parser::new(&dialect)
        .with_recursion_limit(MAX_NESTING)
        .with_tokens_with_locations(tokens);
    let mut out = Vec::new();
    loop {
        while parser.consume_token(&Token::SemiColon) {}
        if parser.peek_token().token == Token::EOF {
            break;
        }
        out.push(parse_one(&mut parser)?);
        if !parser.consume_token(&Token::SemiColon) && parser.peek_token().token != Token::EOF {
            let found = parser.peek_token();
            return Err(PlanError::syntax(format!(
                "expected end of statement, found: {found}"
            )));
        }
    }
    Ok(out)
}

/// True when the next word is `word` (case-insensitive); consumes it.
fn eat_word(p: &mut Parser<'_>, word: &str) -> bool {
    if let Token::Word(w) = &p.peek_token().token {
        if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word) {
            p.next_token();
            return true;
        }
    }
    false
}

fn expect_word(p: &mut Parser<'_>, word: &str) -> Result<()> {
    if eat_word(p, word) {
        Ok(())
    } else {
        Err(PlanError::syntax(format!(
            "expected {word}, found: {}",
            p.peek_token()
        )))
    }
}

/// Normalises an identifier the Postgres way: unquoted names fold to lower case.
pub fn normalize_ident(id: &Ident) -> String {
    if id.quote_style.is_some() {
        id.value.clone()
    } else {
        id.value.to_lowercase()
    }
}

fn parse_name(p: &mut Parser<'_>) -> Result<String> {
    let name = p.parse_object_name(false)?;
    if name.0.len() != 1 {
        return Err(PlanError::unsupported(format!("qualified name {name}")));
    }
    let ident = name.0[0]
        .as_ident()
        .ok_or_else(|| PlanError::syntax(format!("expected a name, found {name}")))?;
    Ok(normalize_ident(ident))
}

fn parse_if_not_exists(p: &mut Parser<'_>) -> bool {
    p.parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS])
}

/// `[WITH] option ...` of `CREATE/ALTER USER|ROLE`.
fn parse_role_options(p: &mut Parser<'_>) -> Result<RoleOptions> {
    let _ = p.parse_keyword(Keyword::WITH);
    let mut o = RoleOptions::default();
    loop {
        if p.parse_keyword(Keyword::PASSWORD) {
            if p.parse_keyword(Keyword::NULL) {
                o.password = Some(None);
            } else {
                o.password = Some(Some(Secret(p.parse_literal_string()?)));
            }
        } else if eat_word(p, "ENCRYPTED") {
            p.expect_keyword(Keyword::PASSWORD)?;
            o.password = Some(Some(Secret(p.parse_literal_string()?)));
        } else if eat_word(p, "SUPERUSER") {
            o.superuser = Some(true);
        } else if eat_word(p, "NOSUPERUSER") {
            o.superuser = Some(false);
        } else if eat_word(p, "LOGIN") {
            o.login = Some(true);
        } else if eat_word(p, "NOLOGIN") {
            o.login = Some(false);
        } else {
            match &p.peek_token().token {
                Token::SemiColon | Token::EOF => return Ok(o),
                Token::Word(w) => {
                    return Err(PlanError::unsupported_hint(
                        format!("role option {}", w.value.to_uppercase()),
                        "PASSWORD, SUPERUSER, NOSUPERUSER, LOGIN and NOLOGIN are supported",
                    ))
                }
                other => {
                    return Err(PlanError::syntax(format!(
                        "expected a role option, found: {other}"
                    )))
                }
            }
        }
    }
}

/// `CREATE FUNCTION` after its first words: Postgres's syntax (sqlparser's
/// parser), a SQL function whose body is one expression.
fn parse_create_function(p: &mut Parser<'_>, or_replace: bool) -> Result<DrizzleStatement> {
    use datafusion::sql::sqlparser::ast::{
        ArgMode, CreateFunctionBody, FunctionReturnType, Statement, ValueWithSpan,
    };
    let Statement::CreateFunction(f) = p.parse_create_function(false, or_replace, false)? else {
        return Err(PlanError::syntax("expected a function definition"));
    };
    if f.name.0.len() != 1 {
        return Err(PlanError::unsupported(format!("qualified name {}", f.name)));
    }
    let name = f.name.0[0]
        .as_ident()
        .map(normalize_ident)
        .ok_or_else(|| PlanError::syntax(format!("expected a name, found {}", f.name)))?;
    if let Some(language) = &f.language {
        if !language.value.eq_ignore_ascii_case("sql") {
            return Err(PlanError::unsupported_hint(
                format!("functions in LANGUAGE {}", language.value),
                "write the function in SQL: LANGUAGE SQL AS 'SELECT expression'",
            ));
        }
    }
    let column = |name: String, t: &datafusion::sql::sqlparser::ast::DataType| {
        Ok::<_, PlanError>(ColumnDef {
            name,
            data_type: sql_to_arrow(t)?,
            sql_type: t.to_string(),
            nullable: true,
        })
    };
    let mut args = Vec::new();
    for a in f.args.iter().flatten() {
        if !matches!(a.mode, None | Some(ArgMode::In)) || a.default_expr.is_some() {
            return Err(PlanError::unsupported(
                "OUT, INOUT and default arguments of a function",
            ));
        }
        let arg = a.name.as_ref().map(normalize_ident).ok_or_else(|| {
            PlanError::unsupported_hint(
                "an unnamed function argument",
                "name every argument: CREATE FUNCTION f(s VARCHAR, c VARCHAR) ...",
            )
        })?;
        if args.iter().any(|c: &ColumnDef| c.name == arg) {
            return Err(PlanError::syntax(format!(
                "parameter name \"{arg}\" used more than once"
            )));
        }
        args.push(column(arg, &a.data_type)?);
    }
    let returns = match &f.return_type {
        Some(FunctionReturnType::DataType(t)) => column(String::new(), t)?,
        Some(FunctionReturnType::SetOf(_)) => {
            return Err(PlanError::unsupported("set-returning functions"))
        }
        None => return Err(PlanError::syntax("a function needs RETURNS type")),
    };
    let text = |e: &SqlExpr| match e {
        SqlExpr::Value(ValueWithSpan { value, .. }) => match value {
            Value::SingleQuotedString(s) => Some(s.clone()),
            Value::DollarQuotedString(d) => Some(d.value.clone()),
            _ => None,
        },
        _ => None,
    };
    let body = match &f.function_body {
        Some(CreateFunctionBody::AsBeforeOptions { body, .. })
        | Some(CreateFunctionBody::AsAfterOptions(body)) => text(body)
            .ok_or_else(|| PlanError::syntax("a function body is a string: AS 'SELECT ...'"))?,
        Some(CreateFunctionBody::Return(e)) | Some(CreateFunctionBody::AsReturnExpr(e)) => {
            e.to_string()
        }
        _ => {
            return Err(PlanError::syntax(
                "a function needs a body: AS 'SELECT expression'",
            ))
        }
    };
    Ok(DrizzleStatement::CreateFunction {
        def: crate::catalog::FunctionDef {
            name,
            args,
            returns,
            body: function_body_expression(&body)?,
        },
        or_replace,
    })
}

/// A SQL function's body as one expression: `SELECT expr` (no FROM, no
/// other clause) or the expression itself.
fn function_body_expression(body: &str) -> Result<String> {
    use datafusion::sql::sqlparser::ast::{SelectItem, SetExpr};
    let body = body.trim().trim_end_matches(';').trim();
    let dialect = PostgreSqlDialect {};
    let starts_select = body
        .get(..6)
        .is_some_and(|w| w.eq_ignore_ascii_case("select"));
    if !starts_select {
        let e = Parser::new(&dialect)
            .with_recursion_limit(MAX_NESTING)
            .try_with_sql(body)?
            .parse_expr()?;
        return Ok(e.to_string());
    }
    let query = Parser::new(&dialect)
        .with_recursion_limit(MAX_NESTING)
        .try_with_sql(body)?
        .parse_query()?;
    let one_expression = || {
        PlanError::unsupported_hint(
            "a function body other than one expression",
            "write the body as SELECT expression, with no FROM",
        )
    };
    let SetExpr::Select(select) = query.body.as_ref() else {
        return Err(one_expression());
    };
    let simple = query.order_by.is_none()
        && query.limit_clause.is_none()
        && query.with.is_none()
        && select.from.is_empty()
        && select.selection.is_none()
        && select.having.is_none()
        && select.projection.len() == 1;
    if !simple {
        return Err(one_expression());
    }
    match &select.projection[0] {
        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => Ok(e.to_string()),
        _ => Err(one_expression()),
    }
}

fn parse_one(p: &mut Parser<'_>) -> Result<DrizzleStatement> {
    if p.parse_keyword(Keyword::CREATE) {
        let or_replace = p.parse_keywords(&[Keyword::OR, Keyword::REPLACE]);
        if p.parse_keyword(Keyword::FUNCTION) {
            return parse_create_function(p, or_replace);
        }
        if or_replace {
            return Err(PlanError::unsupported(
                "CREATE OR REPLACE of anything but a FUNCTION",
            ));
        }
        let user = p.parse_keyword(Keyword::USER);
        if user || p.parse_keyword(Keyword::ROLE) {
            let name = normalize_ident(&p.parse_identifier()?);
            let options = parse_role_options(p)?;
            return Ok(DrizzleStatement::CreateRole {
                name,
                user,
                options,
            });
        }
        if eat_word(p, "STREAM") {
            return parse_create_stream(p);
        }
        if p.parse_keyword(Keyword::TABLE) {
            let if_not_exists = parse_if_not_exists(p);
            let name = parse_name(p)?;
            let (columns, watermark, proctime) = parse_columns(p, false)?;
            debug_assert!(watermark.is_none() && proctime.is_none());
            if p.parse_keyword(Keyword::WITH) {
                return Err(PlanError::unsupported("WITH options on CREATE TABLE"));
            }
            return Ok(DrizzleStatement::CreateTable {
                name,
                if_not_exists,
                columns,
            });
        }
        if p.parse_keywords(&[Keyword::MATERIALIZED, Keyword::VIEW]) {
            let if_not_exists = parse_if_not_exists(p);
            let name = parse_name(p)?;
            p.expect_keyword(Keyword::AS)?;
            let query = p.parse_query()?;
            return Ok(DrizzleStatement::CreateView {
                name,
                if_not_exists,
                query,
            });
        }
        if p.parse_keyword(Keyword::VIEW) {
            return Err(PlanError::unsupported_hint(
                "CREATE VIEW",
                "use CREATE MATERIALIZED VIEW",
            ));
        }
        return Err(PlanError::syntax(format!(
            "expected STREAM, TABLE or MATERIALIZED VIEW after CREATE, found: {}",
            p.peek_token()
        )));
    }
    if p.parse_keyword(Keyword::ALTER) {
        if p.parse_keyword(Keyword::USER) || p.parse_keyword(Keyword::ROLE) {
            let name = if p.parse_keyword(Keyword::CURRENT_USER)
                || p.parse_keyword(Keyword::SESSION_USER)
            {
                // Resolved by the session.
                String::new()
            } else {
                normalize_ident(&p.parse_identifier()?)
            };
            let options = parse_role_options(p)?;
            return Ok(DrizzleStatement::AlterRole { name, options });
        }
        if !p.parse_keywords(&[Keyword::MATERIALIZED, Keyword::VIEW]) {
            return Err(PlanError::unsupported_hint(
                "this ALTER",
                "ALTER MATERIALIZED VIEW name SET parallelism = N is supported",
            ));
        }
        let name = parse_name(p)?;
        p.expect_keyword(Keyword::SET)?;
        let paren = p.consume_token(&Token::LParen);
        expect_word(p, "parallelism")?;
        if !p.consume_token(&Token::Eq) {
            p.expect_keyword(Keyword::TO)?;
        }
        let value = p.parse_literal_uint()?;
        if paren {
            p.expect_token(&Token::RParen)?;
        }
        let parallelism = u32::try_from(value)
            .ok()
            .filter(|n| (1..=1024).contains(n))
            .ok_or_else(|| PlanError::InvalidValue {
                message: format!("parallelism must be between 1 and 1024, got {value}"),
            })?;
        return Ok(DrizzleStatement::AlterViewParallelism { name, parallelism });
    }
    if p.parse_keyword(Keyword::DROP) {
        if p.parse_keyword(Keyword::FUNCTION) {
            let if_exists = p.parse_keywords(&[Keyword::IF, Keyword::EXISTS]);
            let name = parse_name(p)?;
            // An argument list is allowed (functions are not overloaded).
            if p.consume_token(&Token::LParen) {
                while !p.consume_token(&Token::RParen) {
                    if p.peek_token().token == Token::EOF {
                        return Err(PlanError::syntax("expected ) after the argument types"));
                    }
                    p.next_token();
                }
            }
            return Ok(DrizzleStatement::DropFunction { name, if_exists });
        }
        if p.parse_keyword(Keyword::USER) || p.parse_keyword(Keyword::ROLE) {
            let if_exists = p.parse_keywords(&[Keyword::IF, Keyword::EXISTS]);
            let mut names = vec![normalize_ident(&p.parse_identifier()?)];
            while p.consume_token(&Token::Comma) {
                names.push(normalize_ident(&p.parse_identifier()?));
            }
            return Ok(DrizzleStatement::DropRole { names, if_exists });
        }
        let kind = parse_object_kind(p)?;
        let if_exists = p.parse_keywords(&[Keyword::IF, Keyword::EXISTS]);
        let name = parse_name(p)?;
        return Ok(DrizzleStatement::Drop {
            kind,
            name,
            if_exists,
        });
    }
    if p.parse_keyword(Keyword::SHOW) {
        return parse_show(p);
    }
    if eat_word(p, "CANCEL") {
        expect_word(p, "QUERY")?;
        let id = p.parse_literal_uint()?;
        return Ok(DrizzleStatement::CancelQuery(id));
    }
    if p.parse_keyword(Keyword::INSERT) {
        p.expect_keyword(Keyword::INTO)?;
        let target = parse_name(p)?;
        let columns = parse_optional_column_list(p)?;
        let source = p.parse_query()?;
        return Ok(DrizzleStatement::Insert {
            target,
            columns,
            source,
        });
    }
    if p.parse_keyword(Keyword::COPY) {
        return parse_copy(p);
    }
    if p.parse_keyword(Keyword::EXPLAIN) {
        if p.parse_keyword(Keyword::ANALYZE) {
            // A running query by id (`SHOW QUERIES`) or a view by name;
            // a query text would have to run first, and a continuous one
            // never ends.
            let _ = eat_word(p, "QUERY");
            if matches!(p.peek_token().token, Token::Number(..)) {
                let id = p.parse_literal_uint()?;
                return Ok(DrizzleStatement::ExplainAnalyze(AnalyzeTarget::Query(id)));
            }
            let _ = p.parse_keywords(&[Keyword::MATERIALIZED, Keyword::VIEW]);
            let starts_query = matches!(
                p.peek_token().token,
                Token::Word(ref w) if matches!(w.keyword, Keyword::SELECT | Keyword::WITH | Keyword::VALUES)
            ) || p.peek_token().token == Token::LParen;
            if starts_query {
                return Err(PlanError::unsupported_hint(
                    "EXPLAIN ANALYZE of a query text",
                    "name a running query: EXPLAIN ANALYZE <id from SHOW QUERIES> or EXPLAIN ANALYZE <materialized view>",
                ));
            }
            let name = parse_name(p)?;
            return Ok(DrizzleStatement::ExplainAnalyze(AnalyzeTarget::View(name)));
        }
        let _ = p.parse_keyword(Keyword::VERBOSE);
        return Ok(DrizzleStatement::Explain(p.parse_query()?));
    }
    if p.parse_keyword(Keyword::SET) {
        let _ = p.parse_one_of_keywords(&[Keyword::SESSION, Keyword::LOCAL]);
        // SET [SESSION CHARACTERISTICS AS] TRANSACTION ...: one isolation
        // level (read committed, as every statement is its own snapshot).
        if eat_word(p, "CHARACTERISTICS") || p.parse_keyword(Keyword::TRANSACTION) {
            while !matches!(p.peek_token().token, Token::SemiColon | Token::EOF) {
                p.next_token();
            }
            return Ok(DrizzleStatement::NoOp("SET"));
        }
        if p.parse_keywords(&[Keyword::TIME, Keyword::ZONE]) {
            let value = if p.parse_keyword(Keyword::LOCAL) || p.parse_keyword(Keyword::DEFAULT) {
                "UTC".to_string()
            } else {
                parse_setting_value(p)?
            };
            return Ok(DrizzleStatement::Set {
                name: "timezone".into(),
                value,
            });
        }
        let name = parse_setting_name(p)?;
        if !p.consume_token(&Token::Eq) && !p.parse_keyword(Keyword::TO) {
            return Err(PlanError::syntax(format!(
                "expected = or TO after SET {name}, found: {}",
                p.peek_token()
            )));
        }
        let value = parse_setting_value(p)?;
        return Ok(DrizzleStatement::Set { name, value });
    }
    if eat_word(p, "RESET") {
        let name = parse_setting_name(p)?;
        return Ok(DrizzleStatement::Reset(name));
    }
    if p.parse_keyword(Keyword::BEGIN) || p.parse_keywords(&[Keyword::START, Keyword::TRANSACTION])
    {
        let _ = p.parse_one_of_keywords(&[Keyword::WORK, Keyword::TRANSACTION]);
        skip_to_end(p);
        return Ok(DrizzleStatement::Begin);
    }
    if p.parse_keyword(Keyword::COMMIT) || p.parse_keyword(Keyword::END) {
        let _ = p.parse_one_of_keywords(&[Keyword::WORK, Keyword::TRANSACTION]);
        return Ok(DrizzleStatement::Commit);
    }
    if p.parse_keyword(Keyword::ROLLBACK) || eat_word(p, "ABORT") {
        let _ = p.parse_one_of_keywords(&[Keyword::WORK, Keyword::TRANSACTION]);
        if p.parse_keyword(Keyword::TO) {
            let _ = p.parse_keyword(Keyword::SAVEPOINT);
            p.parse_identifier()?;
            return Ok(DrizzleStatement::RollbackToSavepoint);
        }
        return Ok(DrizzleStatement::Rollback);
    }
    // Savepoints: statements apply as they run (a transaction block only
    // groups them), so there is nothing to mark or release.
    if p.parse_keyword(Keyword::SAVEPOINT) {
        p.parse_identifier()?;
        return Ok(DrizzleStatement::NoOp("SAVEPOINT"));
    }
    if p.parse_keyword(Keyword::RELEASE) {
        let _ = p.parse_keyword(Keyword::SAVEPOINT);
        p.parse_identifier()?;
        return Ok(DrizzleStatement::NoOp("RELEASE"));
    }
    if p.parse_keyword(Keyword::DECLARE) {
        let name = normalize_ident(&p.parse_identifier()?);
        // DECLARE name [BINARY] [ASENSITIVE|INSENSITIVE] [[NO] SCROLL] CURSOR [{WITH|WITHOUT} HOLD] FOR query
        loop {
            if p.parse_keyword(Keyword::CURSOR) {
                break;
            }
            if p.parse_one_of_keywords(&[
                Keyword::BINARY,
                Keyword::ASENSITIVE,
                Keyword::INSENSITIVE,
                Keyword::NO,
                Keyword::SCROLL,
            ])
            .is_none()
            {
                return Err(PlanError::syntax(format!(
                    "expected CURSOR, found: {}",
                    p.peek_token()
                )));
            }
        }
        if p.parse_one_of_keywords(&[Keyword::WITH, Keyword::WITHOUT])
            .is_some()
        {
            p.expect_keyword(Keyword::HOLD)?;
        }
        p.expect_keyword(Keyword::FOR)?;
        let query = p.parse_query()?;
        return Ok(DrizzleStatement::DeclareCursor { name, query });
    }
    if p.parse_keyword(Keyword::FETCH) {
        let _ = p.parse_keyword(Keyword::FORWARD);
        let count = if p.parse_keyword(Keyword::ALL) {
            None
        } else if p.parse_keyword(Keyword::NEXT) {
            Some(1)
        } else if let Token::Number(_, _) = p.peek_token().token {
            Some(p.parse_literal_uint()?)
        } else {
            Some(1)
        };
        let _ = p.parse_one_of_keywords(&[Keyword::FROM, Keyword::IN]);
        let name = normalize_ident(&p.parse_identifier()?);
        let mut timeout_us = None;
        if p.parse_keyword(Keyword::WITH) {
            p.expect_token(&Token::LParen)?;
            expect_word(p, "timeout")?;
            if !p.consume_token(&Token::Eq) {
                p.expect_keyword(Keyword::TO)?;
            }
            let value = parse_setting_value(p)?;
            p.expect_token(&Token::RParen)?;
            timeout_us = Some(parse_duration_setting_us(&value)?);
        }
        return Ok(DrizzleStatement::Fetch {
            name,
            count,
            timeout_us,
        });
    }
    if p.parse_keyword(Keyword::CLOSE) {
        if p.parse_keyword(Keyword::ALL) {
            return Ok(DrizzleStatement::CloseCursor(None));
        }
        let name = normalize_ident(&p.parse_identifier()?);
        return Ok(DrizzleStatement::CloseCursor(Some(name)));
    }
    if p.parse_keyword(Keyword::DISCARD) {
        if p.parse_keyword(Keyword::ALL) {
            return Ok(DrizzleStatement::DiscardAll);
        }
        // DISCARD PLANS | SEQUENCES | TEMP: nothing of the kind is cached.
        for (word, tag) in [
            ("PLANS", "DISCARD PLANS"),
            ("SEQUENCES", "DISCARD SEQUENCES"),
            ("TEMP", "DISCARD TEMP"),
            ("TEMPORARY", "DISCARD TEMP"),
        ] {
            if eat_word(p, word) {
                return Ok(DrizzleStatement::NoOp(tag));
            }
        }
        return Err(PlanError::syntax(format!(
            "expected ALL, PLANS, SEQUENCES or TEMP after DISCARD, found: {}",
            p.peek_token()
        )));
    }
    if p.parse_keyword(Keyword::DEALLOCATE) {
        let _ = p.parse_keyword(Keyword::PREPARE);
        if p.parse_keyword(Keyword::ALL) {
            return Ok(DrizzleStatement::Deallocate(None));
        }
        let name = normalize_ident(&p.parse_identifier()?);
        return Ok(DrizzleStatement::Deallocate(Some(name)));
    }
    match p.peek_token().token {
        Token::Word(ref w)
            if matches!(w.keyword, Keyword::SELECT | Keyword::WITH | Keyword::VALUES) =>
        {
            Ok(DrizzleStatement::Query(p.parse_query()?))
        }
        Token::LParen => Ok(DrizzleStatement::Query(p.parse_query()?)),
        _ => match p.parse_statement() {
            Ok(stmt) => Err(PlanError::unsupported(format!(
                "statement {}",
                stmt.to_string()
                    .split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            ))),
            Err(e) => Err(e.into()),
        },
    }
}

fn skip_to_end(p: &mut Parser<'_>) {
    while !matches!(p.peek_token().token, Token::SemiColon | Token::EOF) {
        p.next_token();
    }
}

fn parse_object_kind(p: &mut Parser<'_>) -> Result<ObjectKind> {
    if eat_word(p, "STREAM") {
        Ok(ObjectKind::Stream)
    } else if p.parse_keyword(Keyword::TABLE) {
        Ok(ObjectKind::Table)
    } else if p.parse_keywords(&[Keyword::MATERIALIZED, Keyword::VIEW]) {
        Ok(ObjectKind::MaterializedView)
    } else {
        Err(PlanError::syntax(format!(
            "expected STREAM, TABLE or MATERIALIZED VIEW, found: {}",
            p.peek_token()
        )))
    }
}

fn parse_show(p: &mut Parser<'_>) -> Result<DrizzleStatement> {
    if eat_word(p, "STREAMS") {
        return Ok(DrizzleStatement::ShowObjects(ObjectKind::Stream));
    }
    if p.parse_keyword(Keyword::TABLES) {
        return Ok(DrizzleStatement::ShowObjects(ObjectKind::Table));
    }
    if p.parse_keywords(&[Keyword::MATERIALIZED, Keyword::VIEWS]) {
        return Ok(DrizzleStatement::ShowObjects(ObjectKind::MaterializedView));
    }
    if eat_word(p, "QUERIES") {
        return Ok(DrizzleStatement::ShowQueries);
    }
    if eat_word(p, "WORKERS") {
        return Ok(DrizzleStatement::ShowWorkers);
    }
    if p.parse_keyword(Keyword::CREATE) {
        let kind = parse_object_kind(p)?;
        let name = parse_name(p)?;
        return Ok(DrizzleStatement::ShowCreate { kind, name });
    }
    if p.parse_keyword(Keyword::TRANSACTION) {
        expect_word(p, "ISOLATION")?;
        expect_word(p, "LEVEL")?;
        return Ok(DrizzleStatement::ShowVariable(
            "transaction_isolation".into(),
        ));
    }
    if p.parse_keywords(&[Keyword::TIME, Keyword::ZONE]) {
        return Ok(DrizzleStatement::ShowVariable("timezone".into()));
    }
    if p.parse_keyword(Keyword::ALL) {
        return Ok(DrizzleStatement::ShowVariable("all".into()));
    }
    let name = parse_setting_name(p)?;
    Ok(DrizzleStatement::ShowVariable(name))
}

fn parse_setting_name(p: &mut Parser<'_>) -> Result<String> {
    let mut name = normalize_ident(&p.parse_identifier()?);
    while p.consume_token(&Token::Period) {
        name.push('.');
        name.push_str(&normalize_ident(&p.parse_identifier()?));
    }
    Ok(name)
}

fn parse_setting_value(p: &mut Parser<'_>) -> Result<String> {
    let mut parts = Vec::new();
    loop {
        let tok = p.next_token();
        let s = match &tok.token {
            Token::SingleQuotedString(s) => s.clone(),
            Token::Number(n, _) => n.clone(),
            Token::Word(w) => w.value.clone(),
            Token::Minus => "-".into(),
            other => {
                return Err(PlanError::syntax(format!(
                    "unexpected {other} in SET value"
                )))
            }
        };
        parts.push(s);
        if !p.consume_token(&Token::Comma) {
            break;
        }
    }
    Ok(parts.join(","))
}

fn parse_optional_column_list(p: &mut Parser<'_>) -> Result<Vec<String>> {
    if let Token::LParen = p.peek_token().token {
        // `INSERT INTO t (SELECT ...)` is a parenthesised query, not a column list.
        if let Token::Word(w) = &p.peek_nth_token(1).token {
            if matches!(w.keyword, Keyword::SELECT | Keyword::VALUES | Keyword::WITH) {
                return Ok(Vec::new());
            }
        }
        p.expect_token(&Token::LParen)?;
        let cols = p.parse_comma_separated(|p| p.parse_identifier())?;
        p.expect_token(&Token::RParen)?;
        return Ok(cols.iter().map(normalize_ident).collect());
    }
    Ok(Vec::new())
}

fn parse_create_stream(p: &mut Parser<'_>) -> Result<DrizzleStatement> {
    let if_not_exists = parse_if_not_exists(p);
    let name = parse_name(p)?;
    let (columns, watermark, proctime) = parse_columns(p, true)?;
    let mut options = BTreeMap::new();
    if p.parse_keyword(Keyword::WITH) {
        p.expect_token(&Token::LParen)?;
        loop {
            let key = match p.next_token().token {
                Token::SingleQuotedString(s) => s.to_lowercase(),
                Token::Word(w) => {
                    let mut k = w.value.to_lowercase();
                    while p.consume_token(&Token::Period) {
                        k.push('.');
                        k.push_str(&normalize_ident(&p.parse_identifier()?));
                    }
                    k
                }
                other => {
                    return Err(PlanError::syntax(format!(
                        "expected option name, found: {other}"
                    )))
                }
            };
            p.expect_token(&Token::Eq)?;
            let value = match p.next_token().token {
                Token::SingleQuotedString(s) => s,
                Token::Number(n, _) => n,
                Token::Word(w) => w.value,
                other => {
                    return Err(PlanError::syntax(format!(
                        "expected option value, found: {other}"
                    )))
                }
            };
            if options.insert(key.clone(), value).is_some() {
                return Err(PlanError::invalid(format!("option {key} given twice")));
            }
            if !p.consume_token(&Token::Comma) {
                break;
            }
        }
        p.expect_token(&Token::RParen)?;
    }
    Ok(DrizzleStatement::CreateStream {
        name,
        if_not_exists,
        columns,
        watermark,
        proctime,
        options,
    })
}

/// A stream's columns, its watermark and its processing-time column.
type StreamColumns = (Vec<ColumnDef>, Option<WatermarkSpec>, Option<String>);

/// Parses `(col type [NOT NULL|NULL], ... [, WATERMARK FOR col AS expr])`;
/// on a stream (`allow_watermark`) also `col [TIMESTAMPTZ] AS PROCTIME()`.
fn parse_columns(p: &mut Parser<'_>, allow_watermark: bool) -> Result<StreamColumns> {
    p.expect_token(&Token::LParen)?;
    let mut columns: Vec<ColumnDef> = Vec::new();
    let mut watermark = None;
    let mut proctime: Option<String> = None;
    loop {
        if eat_word(p, "WATERMARK") {
            if !allow_watermark {
                return Err(PlanError::unsupported_hint(
                    "WATERMARK on a table",
                    "watermarks belong to streams",
                ));
            }
            p.expect_keyword(Keyword::FOR)?;
            let column = normalize_ident(&p.parse_identifier()?);
            p.expect_keyword(Keyword::AS)?;
            let expr = p.parse_expr()?;
            watermark = Some(parse_watermark_expr(&column, &expr)?);
        } else if let Some(name) = parse_proctime_column(p)? {
            if !allow_watermark {
                return Err(PlanError::unsupported_hint(
                    "a PROCTIME() column on a table",
                    "processing time belongs to streams",
                ));
            }
            if proctime.is_some() {
                return Err(PlanError::invalid(
                    "a stream has at most one PROCTIME() column",
                ));
            }
            if columns.iter().any(|c| c.name == name) {
                return Err(PlanError::invalid(format!(
                    "column \"{name}\" specified more than once"
                )));
            }
            proctime = Some(name);
        } else {
            let ident = p.parse_identifier()?;
            let name = normalize_ident(&ident);
            if proctime.as_deref() == Some(name.as_str()) {
                return Err(PlanError::invalid(format!(
                    "column \"{name}\" specified more than once"
                )));
            }
            let sql_type = p.parse_data_type()?;
            let data_type = sql_to_arrow(&sql_type)?;
            if p.parse_keyword(Keyword::AS) {
                return Err(PlanError::unsupported_hint(
                    format!("the computed column {name}"),
                    format!("the one computed column a stream has is processing time: {name} AS PROCTIME()"),
                ));
            }
            let mut nullable = true;
            loop {
                if p.parse_keywords(&[Keyword::NOT, Keyword::NULL]) {
                    nullable = false;
                } else if p.parse_keyword(Keyword::NULL) {
                    nullable = true;
                } else {
                    break;
                }
            }
            if columns.iter().any(|c| c.name == name) {
                return Err(PlanError::invalid(format!(
                    "column \"{name}\" specified more than once"
                )));
            }
            columns.push(ColumnDef {
                name,
                data_type,
                sql_type: sql_type.to_string(),
                nullable,
            });
        }
        if !p.consume_token(&Token::Comma) {
            break;
        }
    }
    p.expect_token(&Token::RParen)?;
    if columns.is_empty() {
        return Err(PlanError::syntax(
            "a stream or table needs at least one column",
        ));
    }
    if let Some(wm) = &watermark {
        if proctime.as_deref() == Some(wm.column.as_str()) {
            return Err(PlanError::invalid(format!(
                "WATERMARK FOR {}: a PROCTIME() column is processing time, whose watermark is \
                 the micro-batch's time; declare the watermark on an event-time column",
                wm.column
            )));
        }
        let col = columns
            .iter()
            .find(|c| c.name == wm.column)
            .ok_or_else(|| PlanError::UnknownColumn {
                name: wm.column.clone(),
                hint: " (named in WATERMARK FOR)".into(),
            })?;
        if !matches!(col.data_type, arrow::datatypes::DataType::Timestamp(_, _)) {
            return Err(PlanError::TypeMismatch {
                message: format!(
                    "WATERMARK FOR {} needs a TIMESTAMP or TIMESTAMPTZ column, not {}",
                    wm.column, col.sql_type
                ),
            });
        }
    }
    Ok((columns, watermark, proctime))
}

/// `name [TIMESTAMPTZ | TIMESTAMP WITH TIME ZONE] AS PROCTIME()` (Flink's and
/// RisingWave's spelling of a processing-time column): its name, with the
/// parser past it; `None` (nothing consumed) for any other column.
fn parse_proctime_column(p: &mut Parser<'_>) -> Result<Option<String>> {
    use datafusion::sql::sqlparser::parser::ParserError;
    let not_this = || ParserError::ParserError(String::new());
    let found = p.maybe_parse(|p| {
        let ident = p.parse_identifier()?;
        if !p.parse_keyword(Keyword::AS) {
            // A type first: `p_time TIMESTAMPTZ AS PROCTIME()`.
            let t = p.parse_data_type()?;
            if !matches!(
                sql_to_arrow(&t),
                Ok(arrow::datatypes::DataType::Timestamp(_, Some(_)))
            ) || !p.parse_keyword(Keyword::AS)
            {
                return Err(not_this());
            }
        }
        match p.next_token().token {
            Token::Word(w) if w.value.eq_ignore_ascii_case("proctime") => {}
            _ => return Err(not_this()),
        }
        p.expect_token(&Token::LParen)?;
        p.expect_token(&Token::RParen)?;
        Ok(normalize_ident(&ident))
    })?;
    Ok(found)
}

fn parse_watermark_expr(column: &str, expr: &SqlExpr) -> Result<WatermarkSpec> {
    let bad = || {
        PlanError::unsupported_hint(
            format!("watermark expression {expr}"),
            format!("write WATERMARK FOR {column} AS {column} - INTERVAL '2' SECOND"),
        )
    };
    let col_matches =
        |e: &SqlExpr| matches!(e, SqlExpr::Identifier(id) if normalize_ident(id) == column);
    match expr {
        e if col_matches(e) => Ok(WatermarkSpec {
            column: column.into(),
            delay_ms: 0,
        }),
        SqlExpr::BinaryOp {
            left,
            op: BinaryOperator::Minus,
            right,
        } if col_matches(left) => {
            let delay_ms = interval_ms(right)?;
            if delay_ms < 0 {
                return Err(PlanError::invalid("watermark delay must not be negative"));
            }
            Ok(WatermarkSpec {
                column: column.into(),
                delay_ms,
            })
        }
        _ => Err(bad()),
    }
}

/// Evaluates an `INTERVAL '...' [unit]` literal to milliseconds.
pub fn interval_ms(expr: &SqlExpr) -> Result<i64> {
    let (text, unit) = match expr {
        SqlExpr::Interval(Interval {
            value,
            leading_field,
            ..
        }) => {
            let text = match value.as_ref() {
                SqlExpr::Value(v) => match &v.value {
                    Value::SingleQuotedString(s) => s.clone(),
                    Value::Number(n, _) => n.clone(),
                    other => return Err(PlanError::invalid(format!("bad interval value {other}"))),
                },
                other => return Err(PlanError::invalid(format!("bad interval value {other}"))),
            };
            (text, leading_field.clone())
        }
        SqlExpr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => (s.clone(), None),
            other => {
                return Err(PlanError::invalid(format!(
                    "expected an INTERVAL, found {other}"
                )))
            }
        },
        SqlExpr::Nested(inner) => return interval_ms(inner),
        other => {
            return Err(PlanError::invalid(format!(
                "expected an INTERVAL literal, found {other}"
            )))
        }
    };
    let unit_ms = |u: &str| -> Option<f64> {
        Some(match u.to_lowercase().trim_end_matches('s') {
            "microsecond" | "u" => 0.001,
            "millisecond" | "m" => 1.0,
            "second" | "sec" => 1000.0,
            "minute" | "min" => 60_000.0,
            "hour" | "h" => 3_600_000.0,
            "day" | "d" => 86_400_000.0,
            "week" => 604_800_000.0,
            _ => return None,
        })
    };
    if let Some(field) = unit {
        let n: f64 = text
            .trim()
            .parse()
            .map_err(|_| PlanError::invalid(format!("bad interval value '{text}'")))?;
        let u = match field {
            DateTimeField::Microsecond | DateTimeField::Microseconds => 0.001,
            DateTimeField::Millisecond | DateTimeField::Milliseconds => 1.0,
            DateTimeField::Second | DateTimeField::Seconds => 1000.0,
            DateTimeField::Minute | DateTimeField::Minutes => 60_000.0,
            DateTimeField::Hour | DateTimeField::Hours => 3_600_000.0,
            DateTimeField::Day | DateTimeField::Days => 86_400_000.0,
            other => return Err(PlanError::unsupported(format!("interval unit {other}"))),
        };
        return Ok((n * u).round() as i64);
    }
    parse_duration_ms(&text, unit_ms)
}

fn parse_duration_ms(text: &str, unit_ms: impl Fn(&str) -> Option<f64>) -> Result<i64> {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.is_empty() || !words.len().is_multiple_of(2) {
        return Err(PlanError::invalid(format!(
            "bad interval '{text}': write e.g. INTERVAL '10' SECOND or '500 milliseconds'"
        )));
    }
    let mut total = 0.0;
    for pair in words.chunks(2) {
        let n: f64 = pair[0]
            .parse()
            .map_err(|_| PlanError::invalid(format!("bad interval '{text}'")))?;
        let u = unit_ms(pair[1])
            .ok_or_else(|| PlanError::invalid(format!("bad interval unit in '{text}'")))?;
        total += n * u;
    }
    Ok(total.round() as i64)
}

/// Parses a duration setting such as `'100ms'`, `'1s'`, `'500 milliseconds'` to microseconds.
pub fn parse_duration_setting_us(text: &str) -> Result<u64> {
    let t = text.trim().to_lowercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        PlanError::invalid(format!("bad duration '{text}': write e.g. '100ms' or '1s'"))
    })?;
    let us = match unit.trim() {
        "us" | "microsecond" | "microseconds" => n,
        "" | "ms" | "millisecond" | "milliseconds" => n * 1e3,
        "s" | "sec" | "second" | "seconds" => n * 1e6,
        "min" | "minute" | "minutes" => n * 60e6,
        "h" | "hour" | "hours" => n * 3600e6,
        "d" | "day" | "days" => n * 86400e6,
        other => {
            return Err(PlanError::invalid(format!(
                "bad duration unit '{other}' in '{text}': use us, ms, s, min, h or d"
            )))
        }
    };
    if us.is_nan() || us < 1.0 {
        return Err(PlanError::invalid(format!(
            "duration '{text}' must be positive"
        )));
    }
    Ok(us as u64)
}

fn parse_copy_options(p: &mut Parser<'_>) -> Result<CopyOptions> {
    let mut o = CopyOptions::default();
    let mut delimiter_set = false;
    let mut null_set = false;
    let _ = p.parse_keyword(Keyword::WITH);
    let parenthesised = p.consume_token(&Token::LParen);
    loop {
        if matches!(
            p.peek_token().token,
            Token::SemiColon | Token::EOF | Token::RParen
        ) {
            break;
        }
        if p.parse_keyword(Keyword::FORMAT) {
            // asyncpg writes the format quoted: FORMAT 'csv'.
            if let Token::SingleQuotedString(f) = &p.peek_token().token {
                let f = f.to_lowercase();
                if matches!(f.as_str(), "csv" | "text" | "binary") {
                    p.next_token();
                    o.csv = f == "csv";
                    o.binary = f == "binary";
                    if parenthesised && !p.consume_token(&Token::Comma) {
                        break;
                    }
                    continue;
                }
            }
            if eat_word(p, "csv") {
                o.csv = true;
            } else if eat_word(p, "text") {
                o.csv = false;
            } else if eat_word(p, "binary") {
                o.binary = true;
            } else {
                return Err(PlanError::unsupported_hint(
                    format!("COPY format {}", p.peek_token()),
                    "use text, csv or binary",
                ));
            }
        } else if eat_word(p, "binary") {
            o.binary = true;
        } else if eat_word(p, "csv") {
            o.csv = true;
        } else if p.parse_keyword(Keyword::HEADER) {
            o.header = !(p.parse_keyword(Keyword::FALSE) || eat_word(p, "off"));
            let _ = p.parse_keyword(Keyword::TRUE) || eat_word(p, "on");
        } else if p.parse_keyword(Keyword::DELIMITER) {
            let _ = p.parse_keyword(Keyword::AS);
            let s = p.parse_literal_string()?;
            let mut chars = s.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) => o.delimiter = c,
                _ => {
                    return Err(PlanError::invalid(
                        "COPY delimiter must be a single character",
                    ))
                }
            }
            delimiter_set = true;
        } else if p.parse_keyword(Keyword::NULL) {
            let _ = p.parse_keyword(Keyword::AS);
            o.null = p.parse_literal_string()?;
            null_set = true;
        } else if p.parse_keyword(Keyword::ENCODING) {
            let enc = p.parse_literal_string()?;
            if !enc.eq_ignore_ascii_case("utf8") && !enc.eq_ignore_ascii_case("utf-8") {
                return Err(PlanError::unsupported("COPY encodings other than UTF8"));
            }
        } else {
            return Err(PlanError::unsupported_hint(
                format!("COPY option {}", p.peek_token()),
                "supported: FORMAT text|csv, HEADER, DELIMITER, NULL",
            ));
        }
        if parenthesised && !p.consume_token(&Token::Comma) {
            break;
        }
    }
    if parenthesised {
        p.expect_token(&Token::RParen)?;
    }
    if o.binary && (o.csv || o.header || delimiter_set || null_set) {
        return Err(PlanError::invalid(
            "COPY in binary format takes no CSV, HEADER, DELIMITER or NULL option",
        ));
    }
    if o.csv {
        if !delimiter_set {
            o.delimiter = ',';
        }
        if !null_set {
            o.null = String::new();
        }
    }
    Ok(o)
}

fn parse_copy(p: &mut Parser<'_>) -> Result<DrizzleStatement> {
    if p.consume_token(&Token::LParen) {
        let query = p.parse_query()?;
        p.expect_token(&Token::RParen)?;
        p.expect_keyword(Keyword::TO)?;
        if !p.parse_keyword(Keyword::STDOUT) {
            return Err(PlanError::unsupported_hint(
                "COPY TO a file",
                "use COPY (...) TO STDOUT (psql: \\copy)",
            ));
        }
        let options = parse_copy_options(p)?;
        return Ok(DrizzleStatement::CopyTo { query, options });
    }
    let target = parse_name(p)?;
    let columns = parse_optional_column_list(p)?;
    if p.parse_keyword(Keyword::TO) {
        // COPY name [(cols)] TO STDOUT is COPY (SELECT cols FROM name) TO STDOUT.
        if !p.parse_keyword(Keyword::STDOUT) {
            return Err(PlanError::unsupported_hint(
                "COPY TO a file",
                "use COPY ... TO STDOUT (psql: \\copy)",
            ));
        }
        let options = parse_copy_options(p)?;
        let quote = |n: &str| format!("\"{}\"", n.replace('"', "\"\""));
        let list = if columns.is_empty() {
            "*".to_string()
        } else {
            columns
                .iter()
                .map(|c| quote(c))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let sql = format!("SELECT {list} FROM {}", quote(&target));
        let query = Parser::new(&PostgreSqlDialect {})
            .try_with_sql(&sql)?
            .parse_query()?;
        return Ok(DrizzleStatement::CopyTo { query, options });
    }
    p.expect_keyword(Keyword::FROM)?;
    if !p.parse_keyword(Keyword::STDIN) {
        return Err(PlanError::unsupported_hint(
            "COPY FROM a server file",
            "use COPY ... FROM STDIN (psql: \\copy ... FROM 'file')",
        ));
    }
    let options = parse_copy_options(p)?;
    Ok(DrizzleStatement::CopyFrom {
        target,
        columns,
        options,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processing_time_lookups_read_as_lookup_joins() {
        let text = |s: DrizzleStatement| match s {
            DrizzleStatement::Query(q) => q.to_string(),
            other => panic!("not a query: {other:?}"),
        };
        let plain = text(one("SELECT b.a, s.v FROM b JOIN side AS s ON b.a = s.k"));
        for sql in [
            "SELECT b.a, s.v FROM b JOIN side FOR SYSTEM_TIME AS OF b.p_time AS s ON b.a = s.k",
            "SELECT b.a, s.v FROM b JOIN side for system_time as of PROCTIME() AS s ON b.a = s.k",
        ] {
            assert_eq!(text(one(sql)), plain, "{sql}");
        }
        // Without an expression the parser refuses it.
        assert!(parse_statements("SELECT * FROM b JOIN side FOR SYSTEM_TIME AS OF").is_err());
    }

    #[test]
    fn flink_window_table_functions_read_as_drizzles() {
        let text = |s: DrizzleStatement| match s {
            DrizzleStatement::Query(q) => q.to_string(),
            other => panic!("not a query: {other:?}"),
        };
        for (flink, drizzle) in [
            (
                "SELECT * FROM TABLE(HOP(TABLE bid, DESCRIPTOR(date_time), INTERVAL '2' SECOND, INTERVAL '10' SECOND))",
                "SELECT * FROM HOP(bid, date_time, INTERVAL '2' SECOND, INTERVAL '10' SECOND)",
            ),
            (
                "SELECT window_start, count(*) FROM table( tumble( table bid, descriptor( date_time ), INTERVAL '10' SECOND ) ) AS b GROUP BY window_start",
                "SELECT window_start, count(*) FROM tumble(bid, date_time, INTERVAL '10' SECOND) AS b GROUP BY window_start",
            ),
            (
                "SELECT * FROM TABLE(SESSION(TABLE bid, DESCRIPTOR(date_time), INTERVAL '10' SECOND)) s JOIN t ON s.a = t.a",
                "SELECT * FROM SESSION(bid, date_time, INTERVAL '10' SECOND) s JOIN t ON s.a = t.a",
            ),
        ] {
            assert_eq!(text(one(flink)), text(one(drizzle)), "{flink}");
        }
        // Other TABLE(...) forms are left alone.
        assert_eq!(
            text(one("SELECT * FROM TABLE(generate_series(1, 3))")),
            "SELECT * FROM TABLE(generate_series(1, 3))"
        );
    }

    fn one(sql: &str) -> DrizzleStatement {
        let mut v = parse_statements(sql).unwrap();
        assert_eq!(v.len(), 1, "{sql}");
        v.remove(0)
    }

    #[test]
    fn create_stream_with_watermark_and_options() {
        let s = one(
            "CREATE STREAM IF NOT EXISTS Clicks (id BIGINT NOT NULL, url TEXT, ts TIMESTAMP, \
             WATERMARK FOR ts AS ts - INTERVAL '2' SECOND) WITH (connector = 'datagen', rows_per_second = 10, fields.id.kind = 'sequence')",
        );
        let DrizzleStatement::CreateStream {
            name,
            if_not_exists,
            columns,
            watermark,
            options,
            ..
        } = s
        else {
            panic!("wrong statement")
        };
        assert_eq!(name, "clicks");
        assert!(if_not_exists);
        assert_eq!(columns.len(), 3);
        assert!(!columns[0].nullable);
        assert_eq!(watermark.unwrap().delay_ms, 2000);
        assert_eq!(options["connector"], "datagen");
        assert_eq!(options["rows_per_second"], "10");
        assert_eq!(options["fields.id.kind"], "sequence");
    }

    #[test]
    fn proctime_columns_in_flink_and_risingwave_spelling() {
        for sql in [
            "CREATE STREAM s (a INT, p_time AS PROCTIME(), ts TIMESTAMP)",
            "CREATE STREAM s (a INT, p_time TIMESTAMPTZ AS proctime(), ts TIMESTAMP)",
            "CREATE STREAM s (a INT, p_time TIMESTAMP WITH TIME ZONE AS PROCTIME(), ts TIMESTAMP)",
        ] {
            let DrizzleStatement::CreateStream {
                columns, proctime, ..
            } = one(sql)
            else {
                panic!("wrong statement")
            };
            assert_eq!(proctime.as_deref(), Some("p_time"), "{sql}");
            let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
            assert_eq!(names, ["a", "ts"], "{sql}");
        }
        // A plain TIMESTAMPTZ column is a column; other computed columns,
        // a second PROCTIME() and a PROCTIME() type other than TIMESTAMPTZ
        // are refused.
        let DrizzleStatement::CreateStream { proctime, .. } =
            one("CREATE STREAM s (p TIMESTAMPTZ, q BIGINT)")
        else {
            panic!("wrong statement")
        };
        assert!(proctime.is_none());
        for bad in [
            "CREATE STREAM s (a INT, b INT AS a + 1)",
            "CREATE STREAM s (p AS PROCTIME(), q AS PROCTIME())",
            "CREATE STREAM s (p BIGINT AS PROCTIME())",
            "CREATE TABLE t (p AS PROCTIME())",
        ] {
            assert!(parse_statements(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn watermark_on_non_timestamp_is_a_type_error() {
        let e = parse_statements("CREATE STREAM s (a INT, WATERMARK FOR a AS a)").unwrap_err();
        assert!(matches!(e, PlanError::TypeMismatch { .. }), "{e}");
    }

    #[test]
    fn custom_statements_parse() {
        assert!(matches!(
            one("SHOW STREAMS"),
            DrizzleStatement::ShowObjects(ObjectKind::Stream)
        ));
        assert!(matches!(
            one("show materialized views"),
            DrizzleStatement::ShowObjects(ObjectKind::MaterializedView)
        ));
        assert!(matches!(one("SHOW QUERIES"), DrizzleStatement::ShowQueries));
        for (sql, want) in [
            ("EXPLAIN ANALYZE 7", AnalyzeTarget::Query(7)),
            ("EXPLAIN ANALYZE QUERY 7", AnalyzeTarget::Query(7)),
            (
                "EXPLAIN ANALYZE busiest",
                AnalyzeTarget::View("busiest".into()),
            ),
            (
                "EXPLAIN ANALYZE MATERIALIZED VIEW Busiest",
                AnalyzeTarget::View("busiest".into()),
            ),
        ] {
            match one(sql) {
                DrizzleStatement::ExplainAnalyze(got) => assert_eq!(got, want, "{sql}"),
                other => panic!("{sql}: {other:?}"),
            }
        }
        assert!(parse_statements("EXPLAIN ANALYZE SELECT 1").is_err());
        assert!(matches!(one("SHOW WORKERS"), DrizzleStatement::ShowWorkers));
        assert!(matches!(
            one("CANCEL QUERY 7"),
            DrizzleStatement::CancelQuery(7)
        ));
        assert!(matches!(
            one("DROP MATERIALIZED VIEW IF EXISTS v"),
            DrizzleStatement::Drop {
                kind: ObjectKind::MaterializedView,
                if_exists: true,
                ..
            }
        ));
        assert!(
            matches!(one("SET batch_interval = '100ms'"), DrizzleStatement::Set { ref name, ref value } if name == "batch_interval" && value == "100ms")
        );
        assert!(matches!(
            one("FETCH 10 FROM c"),
            DrizzleStatement::Fetch {
                count: Some(10),
                ..
            }
        ));
        assert!(matches!(
            one("DECLARE c NO SCROLL CURSOR WITH HOLD FOR SELECT 1"),
            DrizzleStatement::DeclareCursor { .. }
        ));
        assert!(matches!(
            one("COPY s FROM STDIN WITH (FORMAT csv, HEADER true)"),
            DrizzleStatement::CopyFrom {
                options: CopyOptions {
                    csv: true,
                    header: true,
                    delimiter: ',',
                    ..
                },
                ..
            }
        ));
        assert!(
            matches!(one("COPY s (a, b) FROM STDIN csv"), DrizzleStatement::CopyFrom { ref columns, .. } if columns.len() == 2)
        );
        assert!(matches!(
            one("COPY (SELECT * FROM s) TO STDOUT"),
            DrizzleStatement::CopyTo { .. }
        ));
        assert!(matches!(
            one("INSERT INTO s VALUES (1), (2)"),
            DrizzleStatement::Insert { .. }
        ));
        assert_eq!(
            parse_statements("BEGIN; SELECT 1; COMMIT;").unwrap().len(),
            3
        );
    }

    #[test]
    fn syntax_errors_are_syntax_errors() {
        assert!(matches!(
            parse_statements("SELEC 1").unwrap_err(),
            PlanError::Syntax { .. } | PlanError::Unsupported { .. }
        ));
        assert!(matches!(
            parse_statements("CREATE STREAM (").unwrap_err(),
            PlanError::Syntax { .. }
        ));
        assert!(matches!(
            parse_statements("SELECT 1 2 3").unwrap_err(),
            PlanError::Syntax { .. }
        ));
    }

    #[test]
    fn intervals_and_durations() {
        assert_eq!(parse_duration_setting_us("100ms").unwrap(), 100_000);
        assert_eq!(parse_duration_setting_us("1s").unwrap(), 1_000_000);
        assert_eq!(parse_duration_setting_us("1 ms").unwrap(), 1_000);
        assert!(parse_duration_setting_us("fast").is_err());
        assert!(parse_duration_setting_us("0ms").is_err());
    }
}
