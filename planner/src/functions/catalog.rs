//! The catalog and information functions Postgres clients and tools call
//! (`version()`, `format_type()`, `has_table_privilege()`, ...), with
//! Postgres's names and results. Functions whose value depends on the
//! session (`current_user`, `current_setting()`, `pg_backend_pid()`) are
//! not here: the server replaces them by their values before planning.
//!
//! Drizzle has no object privileges yet (every role that can log in may do
//! everything, see `docs/security.md`), so the `has_*_privilege` family
//! answers true; comments are not stored, so the `*_description`
//! functions answer NULL.

use std::sync::{Arc, LazyLock, OnceLock};

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, ListBuilder, StringArray, StringBuilder,
};
use arrow::datatypes::{DataType, Field, Int64Type, TimeUnit};
use datafusion::common::{Result, ScalarValue};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, TypeSignature,
    Volatility,
};
use datafusion::prelude::SessionContext;

type Body = fn(&[ArrayRef], usize) -> Result<ArrayRef>;

/// One catalog function: a name, a signature, a return type and a body
/// over the arguments as arrays of the batch's length.
#[derive(Debug)]
struct CatalogFn {
    name: &'static str,
    signature: Signature,
    returns: DataType,
    body: Body,
}

// Functions are told apart by name (each name has one body).
impl PartialEq for CatalogFn {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.signature == other.signature
            && self.returns == other.returns
    }
}

impl Eq for CatalogFn {}

impl std::hash::Hash for CatalogFn {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
        self.returns.hash(state);
    }
}

impl ScalarUDFImpl for CatalogFn {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(self.returns.clone())
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let scalar = args
            .args
            .iter()
            .all(|a| matches!(a, ColumnarValue::Scalar(_)));
        let n = if scalar { 1 } else { args.number_rows };
        let arrays = args
            .args
            .iter()
            .map(|a| a.to_array(n))
            .collect::<Result<Vec<_>>>()?;
        let out = (self.body)(&arrays, n)?;
        if scalar {
            Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&out, 0)?))
        } else {
            Ok(ColumnarValue::Array(out))
        }
    }
}

fn function(
    name: &'static str,
    signature: TypeSignature,
    volatility: Volatility,
    returns: DataType,
    body: Body,
) -> ScalarUDF {
    ScalarUDF::from(CatalogFn {
        name,
        signature: Signature::new(signature, volatility),
        returns,
        body,
    })
}

/// The `version()` text, in Postgres's format.
pub fn version_text() -> String {
    format!(
        "PostgreSQL 16.0 (Drizzle {}) on {}-unknown-linux-gnu, compiled by rustc, 64-bit",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH
    )
}

/// When this process started (`pg_postmaster_start_time()`), Unix µs.
static STARTED_US: LazyLock<i64> = LazyLock::new(|| {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
});

/// The bootstrap superuser's name, which `pg_get_userbyid(10)` answers
/// (every object is owned by OID 10).
static OWNER: OnceLock<String> = OnceLock::new();

/// Sets the name behind OID 10 (the server does this at start).
pub fn set_owner_name(name: &str) {
    let _ = OWNER.set(name.to_string());
}

fn texts(n: usize, value: Option<&str>) -> ArrayRef {
    Arc::new(StringArray::from(vec![value; n]))
}

fn oids(a: &ArrayRef) -> Result<ArrayRef> {
    Ok(arrow::compute::cast(a, &DataType::Int64)?)
}

/// A type's name as Postgres's `format_type` writes it.
pub fn type_name(oid: i64, typmod: Option<i64>) -> Option<String> {
    let base = match oid {
        16 => "boolean",
        17 => "bytea",
        18 => "\"char\"",
        19 => "name",
        20 => "bigint",
        21 => "smallint",
        23 => "integer",
        25 => "text",
        26 => "oid",
        114 => "json",
        700 => "real",
        701 => "double precision",
        1042 => "character",
        1043 => "character varying",
        1082 => "date",
        1083 => "time without time zone",
        1114 => "timestamp without time zone",
        1184 => "timestamp with time zone",
        1186 => "interval",
        1700 => "numeric",
        2950 => "uuid",
        3802 => "jsonb",
        1000 => "boolean[]",
        1001 => "bytea[]",
        1005 => "smallint[]",
        1007 => "integer[]",
        1009 => "text[]",
        1015 => "character varying[]",
        1016 => "bigint[]",
        1021 => "real[]",
        1022 => "double precision[]",
        1115 => "timestamp without time zone[]",
        1182 => "date[]",
        1231 => "numeric[]",
        _ => return Some("???".into()),
    };
    Some(match (oid, typmod) {
        (1043 | 1042, Some(m)) if m >= 4 => format!("{base}({})", m - 4),
        (1700, Some(m)) if m >= 4 => {
            let m = m - 4;
            format!("{base}({},{})", (m >> 16) & 0xffff, m & 0xffff)
        }
        _ => base.to_string(),
    })
}

fn array_bound(a: &ArrayRef, upper: bool) -> Result<ArrayRef> {
    let lengths: Vec<Option<i64>> = match a.data_type() {
        DataType::List(_) => {
            let l = a.as_list::<i32>();
            (0..l.len())
                .map(|i| (l.is_valid(i)).then(|| l.value_length(i) as i64))
                .collect()
        }
        DataType::LargeList(_) => {
            let l = a.as_list::<i64>();
            (0..l.len())
                .map(|i| (l.is_valid(i)).then(|| l.value_length(i)))
                .collect()
        }
        _ => vec![None; a.len()],
    };
    Ok(Arc::new(
        lengths
            .into_iter()
            .map(|n| n.filter(|n| *n > 0).map(|n| if upper { n } else { 1 }))
            .collect::<arrow::array::Int64Array>(),
    ))
}

/// The OID of a built-in type named as SQL or as `pg_type` names it
/// (`to_regtype`); `None` for a type Drizzle does not have.
pub fn type_oid(name: &str) -> Option<i64> {
    let n = name.trim().trim_start_matches("pg_catalog.").to_lowercase();
    Some(match n.as_str() {
        "bool" | "boolean" => 16,
        "bytea" => 17,
        "int8" | "bigint" => 20,
        "int2" | "smallint" => 21,
        "int4" | "int" | "integer" => 23,
        "text" => 25,
        "oid" => 26,
        "float4" | "real" => 700,
        "float8" | "double precision" => 701,
        "varchar" | "character varying" => 1043,
        "date" => 1082,
        "timestamp" | "timestamp without time zone" => 1114,
        "timestamptz" | "timestamp with time zone" => 1184,
        "interval" => 1186,
        "numeric" | "decimal" => 1700,
        _ => return None,
    })
}

/// `pg_size_pretty`: bytes, or kB/MB/GB/TB once past 10 of the unit
/// below, rounded as Postgres rounds.
pub fn size_pretty(bytes: i64) -> String {
    let mut v = bytes;
    for unit in ["bytes", "kB", "MB", "GB", "TB"] {
        if v.abs() < 10 * 1024 || unit == "TB" {
            return format!("{v} {unit}");
        }
        v = (v + if v < 0 { -512 } else { 512 }) / 1024;
    }
    format!("{v} PB")
}

/// Postgres's reserved key words: `quote_ident` quotes them.
const RESERVED: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "column",
    "constraint",
    "create",
    "current_catalog",
    "current_date",
    "current_role",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "from",
    "grant",
    "group",
    "having",
    "in",
    "initially",
    "intersect",
    "into",
    "lateral",
    "leading",
    "limit",
    "localtime",
    "localtimestamp",
    "not",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "placing",
    "primary",
    "references",
    "returning",
    "select",
    "session_user",
    "some",
    "symmetric",
    "system_user",
    "table",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "when",
    "where",
    "window",
    "with",
];

/// `s` as an identifier, quoted when Postgres's `quote_ident` would.
pub fn quote_ident(s: &str) -> String {
    let plain = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !RESERVED.contains(&s);
    if plain {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

fn map_text(a: &ArrayRef, f: impl Fn(&str) -> Option<String>) -> Result<ArrayRef> {
    let a = arrow::compute::cast(a, &DataType::Utf8)?;
    let a = a.as_string::<i32>();
    let mut b = StringBuilder::with_capacity(a.len(), a.len() * 8);
    for i in 0..a.len() {
        b.append_option(if a.is_null(i) { None } else { f(a.value(i)) });
    }
    Ok(Arc::new(b.finish()))
}

fn map_oid(a: &ArrayRef, mut f: impl FnMut(i64) -> Option<String>) -> Result<ArrayRef> {
    let a = oids(a)?;
    let a = a.as_primitive::<Int64Type>();
    let mut b = StringBuilder::with_capacity(a.len(), a.len() * 8);
    for i in 0..a.len() {
        b.append_option(if a.is_null(i) { None } else { f(a.value(i)) });
    }
    Ok(Arc::new(b.finish()))
}

fn all_true(_args: &[ArrayRef], n: usize) -> Result<ArrayRef> {
    Ok(Arc::new(BooleanArray::from(vec![true; n])))
}

fn null_text(_args: &[ArrayRef], n: usize) -> Result<ArrayRef> {
    Ok(texts(n, None))
}

/// Splits a qualified identifier as Postgres's `parse_ident` does: parts
/// separated by dots, unquoted parts folded to lower case, `"quoted"` parts
/// kept as written (`""` is a quote).
pub fn parse_ident(s: &str) -> std::result::Result<Vec<String>, &'static str> {
    let mut parts = Vec::new();
    let mut chars = s.trim().chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => return Err("unclosed double quote"),
                }
            }
            if part.is_empty() {
                return Err("empty quoted identifier");
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == '.' || c.is_whitespace() {
                    break;
                }
                part.extend(c.to_lowercase());
                chars.next();
            }
            if part.is_empty() {
                return Err("no valid identifier");
            }
        }
        parts.push(part);
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.next() {
            None => return Ok(parts),
            Some('.') => {
                while chars.peek().is_some_and(|c| c.is_whitespace()) {
                    chars.next();
                }
            }
            Some(_) => return Err("extra characters after the identifier"),
        }
    }
}

/// Postgres's `format()`: `%s` (text, NULL as empty), `%I` (an identifier,
/// quoted where needed), `%L` (a literal, NULL as `NULL`), `%%`, and
/// positions (`%2$s`).
pub fn format_text(
    template: &str,
    values: &[Option<&str>],
) -> std::result::Result<String, &'static str> {
    let mut out = String::with_capacity(template.len());
    let mut chars = template.chars().peekable();
    let mut next = 0usize;
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'%') {
            chars.next();
            out.push('%');
            continue;
        }
        let mut digits = String::new();
        while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
            digits.push(d);
            chars.next();
        }
        let index = if digits.is_empty() {
            next
        } else if chars.next() == Some('$') {
            match digits.parse::<usize>() {
                Ok(p) if p >= 1 => p - 1,
                _ => return Err("format specifies argument 0, but arguments are numbered from 1"),
            }
        } else {
            return Err("widths in format() are not supported");
        };
        next = index + 1;
        let kind = chars.next().ok_or("unterminated format() type specifier")?;
        let value = *values.get(index).ok_or("too few arguments for format()")?;
        match kind {
            's' => out.push_str(value.unwrap_or("")),
            'I' => out.push_str(&quote_ident(
                value.ok_or("null values cannot be formatted as an SQL identifier")?,
            )),
            'L' => match value {
                None => out.push_str("NULL"),
                Some(v) => {
                    out.push('\'');
                    out.push_str(&v.replace('\'', "''"));
                    out.push('\'');
                }
            },
            _ => return Err("unrecognized format() type specifier"),
        }
    }
    Ok(out)
}

/// Installs the catalog functions in `ctx`.
pub fn register(ctx: &SessionContext) {
    LazyLock::force(&STARTED_US);
    let privileges = [
        "has_table_privilege",
        "has_schema_privilege",
        "has_database_privilege",
        "has_column_privilege",
        "has_any_column_privilege",
        "has_function_privilege",
        "has_sequence_privilege",
        "has_type_privilege",
        "has_language_privilege",
        "has_tablespace_privilege",
        "has_server_privilege",
        "has_foreign_data_wrapper_privilege",
    ];
    for name in privileges {
        ctx.register_udf(function(
            name,
            TypeSignature::VariadicAny,
            Volatility::Stable,
            DataType::Boolean,
            all_true,
        ));
    }
    for name in [
        "pg_table_is_visible",
        "pg_type_is_visible",
        "pg_function_is_visible",
    ] {
        ctx.register_udf(function(
            name,
            TypeSignature::Any(1),
            Volatility::Stable,
            DataType::Boolean,
            all_true,
        ));
    }
    for name in [
        "obj_description",
        "col_description",
        "shobj_description",
        "pg_get_expr",
        "pg_get_indexdef",
        "pg_get_constraintdef",
        "pg_get_triggerdef",
        "pg_get_statisticsobjdef_columns",
        "pg_get_partkeydef",
        "pg_get_ruledef",
        "pg_get_viewdef",
        "pg_get_functiondef",
        "pg_get_function_arguments",
        "pg_get_function_result",
        "pg_get_function_identity_arguments",
        "pg_get_partition_constraintdef",
        "pg_get_serial_sequence",
    ] {
        ctx.register_udf(function(
            name,
            TypeSignature::VariadicAny,
            Volatility::Stable,
            DataType::Utf8,
            null_text,
        ));
    }
    ctx.register_udf(function(
        "pg_relation_is_publishable",
        TypeSignature::Any(1),
        Volatility::Stable,
        DataType::Boolean,
        |_, n| Ok(Arc::new(BooleanArray::from(vec![false; n]))),
    ));
    for name in [
        "pg_relation_size",
        "pg_total_relation_size",
        "pg_table_size",
        "pg_indexes_size",
    ] {
        ctx.register_udf(function(
            name,
            TypeSignature::VariadicAny,
            Volatility::Volatile,
            DataType::Int64,
            |_, n| Ok(Arc::new(arrow::array::Int64Array::from(vec![0i64; n]))),
        ));
    }
    // array_lower / array_upper of dimension 1 (Drizzle's arrays are
    // one-dimensional, 1-based): NULL for an empty or NULL array.
    for (name, upper) in [("array_lower", false), ("array_upper", true)] {
        let body: Body = if upper {
            |args, _| array_bound(&args[0], true)
        } else {
            |args, _| array_bound(&args[0], false)
        };
        ctx.register_udf(function(
            name,
            TypeSignature::Any(2),
            Volatility::Immutable,
            DataType::Int64,
            body,
        ));
    }
    ctx.register_udf(function(
        "to_regtype",
        TypeSignature::Any(1),
        Volatility::Stable,
        DataType::Int64,
        |args, _| {
            let names = arrow::compute::cast(&args[0], &DataType::Utf8)?;
            let names = names.as_string::<i32>();
            Ok(Arc::new(
                (0..names.len())
                    .map(|i| {
                        if names.is_null(i) {
                            None
                        } else {
                            type_oid(names.value(i))
                        }
                    })
                    .collect::<arrow::array::Int64Array>(),
            ))
        },
    ));
    ctx.register_udf(function(
        "pg_size_pretty",
        TypeSignature::Any(1),
        Volatility::Immutable,
        DataType::Utf8,
        |args, _| map_oid(&args[0], |b| Some(size_pretty(b))),
    ));
    ctx.register_udf(function(
        "version",
        TypeSignature::Nullary,
        Volatility::Stable,
        DataType::Utf8,
        |_, n| Ok(texts(n, Some(&version_text()))),
    ));
    ctx.register_udf(function(
        "pg_postmaster_start_time",
        TypeSignature::Nullary,
        Volatility::Stable,
        DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
        |_, n| {
            Ok(Arc::new(
                arrow::array::TimestampMicrosecondArray::from(vec![*STARTED_US; n])
                    .with_timezone("+00:00"),
            ))
        },
    ));
    ctx.register_udf(function(
        "current_schema",
        TypeSignature::Nullary,
        Volatility::Stable,
        DataType::Utf8,
        |_, n| Ok(texts(n, Some("public"))),
    ));
    ctx.register_udf(function(
        "current_schemas",
        TypeSignature::Any(1),
        Volatility::Stable,
        DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, true))),
        |args, n| {
            let implicit = arrow::compute::cast(&args[0], &DataType::Boolean)?;
            let implicit = implicit.as_boolean();
            let mut b = ListBuilder::new(StringBuilder::new());
            for i in 0..n {
                if implicit.is_valid(i) && implicit.value(i) {
                    b.values().append_value("pg_catalog");
                }
                b.values().append_value("public");
                b.append(true);
            }
            Ok(Arc::new(b.finish()))
        },
    ));
    ctx.register_udf(function(
        "format_type",
        TypeSignature::Any(2),
        Volatility::Stable,
        DataType::Utf8,
        |args, _| {
            let typmods = oids(&args[1])?;
            let typmods = typmods.as_primitive::<Int64Type>().clone();
            let mut i = 0usize;
            map_oid(&args[0], |oid| {
                let m = (typmods.is_valid(i)).then(|| typmods.value(i));
                i += 1;
                type_name(oid, m.filter(|m| *m >= 0))
            })
        },
    ));
    ctx.register_udf(function(
        "pg_get_userbyid",
        TypeSignature::Any(1),
        Volatility::Stable,
        DataType::Utf8,
        |args, _| {
            map_oid(&args[0], |oid| {
                Some(if oid == 10 {
                    OWNER.get().cloned().unwrap_or_else(|| "drizzle".into())
                } else {
                    format!("unknown (OID={oid})")
                })
            })
        },
    ));
    ctx.register_udf(function(
        "pg_encoding_to_char",
        TypeSignature::Any(1),
        Volatility::Stable,
        DataType::Utf8,
        |args, _| {
            map_oid(&args[0], |e| {
                Some(
                    match e {
                        0 => "SQL_ASCII",
                        6 => "UTF8",
                        _ => "",
                    }
                    .into(),
                )
            })
        },
    ));
    // Drizzle has no transaction ids; every catalog row's xmin is 1.
    ctx.register_udf(function(
        "txid_current",
        TypeSignature::Nullary,
        Volatility::Volatile,
        DataType::Int64,
        |_, n| Ok(Arc::new(arrow::array::Int64Array::from(vec![1i64; n]))),
    ));
    ctx.register_udf(function(
        "pg_is_in_recovery",
        TypeSignature::Nullary,
        Volatility::Stable,
        DataType::Boolean,
        |_, n| Ok(Arc::new(BooleanArray::from(vec![false; n]))),
    ));
    // age(xid): transactions since xid. Drizzle has no transaction ids (every
    // row's xmin is 1 and no transaction is older), so it is 0.
    ctx.register_udf(function(
        "age",
        TypeSignature::Any(1),
        Volatility::Stable,
        DataType::Int64,
        |args, n| {
            if !args[0].data_type().is_integer() && !args[0].data_type().is_null() {
                return Err(datafusion::error::DataFusionError::NotImplemented(format!(
                    "age({}) is not supported; age(xid) is",
                    args[0].data_type()
                )));
            }
            Ok(Arc::new(arrow::array::Int64Array::from(vec![0i64; n])))
        },
    ));
    ctx.register_udf(function(
        "parse_ident",
        TypeSignature::Any(1),
        Volatility::Immutable,
        DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, true))),
        |args, _| {
            let names = arrow::compute::cast(&args[0], &DataType::Utf8)?;
            let names = names.as_string::<i32>();
            let mut b = ListBuilder::new(StringBuilder::new());
            for i in 0..names.len() {
                if names.is_null(i) {
                    b.append(false);
                    continue;
                }
                for part in parse_ident(names.value(i)).map_err(|e| {
                    datafusion::error::DataFusionError::Execution(format!(
                        "string is not a valid identifier: \"{}\" ({e})",
                        names.value(i)
                    ))
                })? {
                    b.values().append_value(part);
                }
                b.append(true);
            }
            Ok(Arc::new(b.finish()))
        },
    ));
    ctx.register_udf(function(
        "format",
        TypeSignature::VariadicAny,
        Volatility::Stable,
        DataType::Utf8,
        |args, n| {
            let Some((template, values)) = args.split_first() else {
                return Err(datafusion::error::DataFusionError::Plan(
                    "format() takes a format string and values".into(),
                ));
            };
            let template = arrow::compute::cast(template, &DataType::Utf8)?;
            let template = template.as_string::<i32>();
            let values = values
                .iter()
                .map(|v| arrow::compute::cast(v, &DataType::Utf8))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let mut out = StringBuilder::new();
            for row in 0..n {
                if template.is_null(row) {
                    out.append_null();
                    continue;
                }
                let cells: Vec<Option<&str>> = values
                    .iter()
                    .map(|v| {
                        let v = v.as_string::<i32>();
                        v.is_valid(row).then(|| v.value(row))
                    })
                    .collect();
                let text = format_text(template.value(row), &cells)
                    .map_err(|e| datafusion::error::DataFusionError::Execution(e.into()))?;
                out.append_value(text);
            }
            Ok(Arc::new(out.finish()))
        },
    ));
    ctx.register_udf(function(
        "quote_ident",
        TypeSignature::Any(1),
        Volatility::Immutable,
        DataType::Utf8,
        |args, _| map_text(&args[0], |s| Some(quote_ident(s))),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_follows_postgres() {
        assert_eq!(
            format_text("%s.%I = %L %%", &[Some("a"), Some("My T"), Some("it's")]),
            Ok("a.\"My T\" = 'it''s' %".into())
        );
        assert_eq!(
            format_text("%2$s %1$s %s", &[Some("x"), Some("y")]),
            Ok("y x y".into())
        );
        assert_eq!(format_text("[%s] %L", &[None, None]), Ok("[] NULL".into()));
        assert!(format_text("%s %s", &[Some("x")]).is_err());
        assert!(format_text("%I", &[None]).is_err());
    }

    #[test]
    fn parse_ident_splits_and_folds_like_postgres() {
        assert_eq!(
            parse_ident("public.Bids"),
            Ok(vec!["public".into(), "bids".into()])
        );
        assert_eq!(
            parse_ident("\"My \"\"T\"\" \" . x"),
            Ok(vec!["My \"T\" ".into(), "x".into()])
        );
        assert!(parse_ident("a.").is_err());
        assert!(parse_ident("\"a").is_err());
        assert!(parse_ident("a b").is_err());
    }

    #[test]
    fn names_and_quoting_follow_postgres() {
        assert_eq!(type_name(23, None).as_deref(), Some("integer"));
        assert_eq!(
            type_name(1043, Some(14)).as_deref(),
            Some("character varying(10)")
        );
        assert_eq!(
            type_name(1700, Some((10 << 16 | 2) + 4)).as_deref(),
            Some("numeric(10,2)")
        );
        assert_eq!(type_name(99999, None).as_deref(), Some("???"));
        assert_eq!(quote_ident("abc_1"), "abc_1");
        assert_eq!(quote_ident("Abc"), "\"Abc\"");
        assert_eq!(quote_ident("select"), "\"select\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident(""), "\"\"");
        assert!(version_text().starts_with("PostgreSQL 16.0 (Drizzle "));
        assert_eq!(size_pretty(0), "0 bytes");
        assert_eq!(size_pretty(10 * 1024 - 1), "10239 bytes");
        assert_eq!(size_pretty(10 * 1024), "10 kB");
        assert_eq!(size_pretty(5 << 30), "5120 MB");
    }
}
