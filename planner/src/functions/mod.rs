//! SQL functions with Postgres names that behave as Postgres documents
//! them, where DataFusion's differ: `to_char`, `to_timestamp` and `to_date`
//! take Postgres template patterns ([`pg_format`]), not chrono's; `sum` of
//! integers raises 22003 on overflow instead of wrapping, and `mod` exists
//! ([`checked`]); integer `+`, `-` and `*` raise 22003 too ([`overflow`]);
//! the catalog and information functions clients call ([`catalog`]); the
//! multiset aggregates that retract `min`, `max` and `count(DISTINCT)` over
//! changes ([`multiset`]).
//!
//! [`register`] installs them in a `SessionContext`; every context Drizzle
//! makes (planning, and the workers that decode plans) goes through
//! [`crate::new_session_context`], so a plan names the same functions
//! everywhere.

pub mod catalog;
pub mod checked;
pub mod multiset;
pub mod overflow;
pub mod pg_format;
pub mod sql;

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Date32Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::{exec_err, Result, ScalarValue};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, TypeSignature,
    Volatility,
};
use datafusion::prelude::SessionContext;

use pg_format::Template;

/// Installs Drizzle's functions, replacing DataFusion's of the same names.
pub fn register(ctx: &SessionContext) {
    catalog::register(ctx);
    ctx.register_udf(ScalarUDF::from(PgToChar::new()));
    ctx.register_udf(ScalarUDF::from(PgToTimestamp::new()));
    ctx.register_udf(ScalarUDF::from(PgToDate::new()));
    ctx.register_udf(checked::CheckedArithmetic::modulo());
    ctx.register_udf(ScalarUDF::from(ProcTime::new()));
    ctx.register_udaf(datafusion::logical_expr::AggregateUDF::from(
        checked::CheckedSum::new(),
    ));
    for udaf in multiset::all() {
        ctx.register_udaf(udaf);
    }
}

/// The template argument: one pattern for every row (a literal, the usual
/// case) or one per row.
enum Templates {
    Same(Option<Template>),
    PerRow(ArrayRef),
}

impl Templates {
    fn new(arg: &ColumnarValue) -> Result<Self> {
        Ok(match arg {
            ColumnarValue::Scalar(s) => match s {
                ScalarValue::Utf8(v) | ScalarValue::LargeUtf8(v) | ScalarValue::Utf8View(v) => {
                    Templates::Same(v.as_deref().map(Template::parse))
                }
                ScalarValue::Null => Templates::Same(None),
                other => {
                    return exec_err!("a format template must be text, not {}", other.data_type())
                }
            },
            ColumnarValue::Array(a) => Templates::PerRow(arrow::compute::cast(a, &DataType::Utf8)?),
        })
    }

    /// Row `row`'s template: the shared one borrowed (no copy per row), or
    /// the row's own parsed.
    fn get(&self, row: usize) -> Option<std::borrow::Cow<'_, Template>> {
        match self {
            Templates::Same(t) => t.as_ref().map(std::borrow::Cow::Borrowed),
            Templates::PerRow(a) => {
                let a = a.as_string::<i32>();
                (!a.is_null(row)).then(|| std::borrow::Cow::Owned(Template::parse(a.value(row))))
            }
        }
    }
}

fn rows_of(args: &[ColumnarValue]) -> usize {
    args.iter()
        .find_map(|a| match a {
            ColumnarValue::Array(a) => Some(a.len()),
            ColumnarValue::Scalar(_) => None,
        })
        .unwrap_or(1)
}

fn all_scalar(args: &[ColumnarValue]) -> bool {
    args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_)))
}

fn finish(array: ArrayRef, scalar: bool) -> Result<ColumnarValue> {
    if scalar {
        Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(
            &array, 0,
        )?))
    } else {
        Ok(ColumnarValue::Array(array))
    }
}

/// `to_char(timestamp | date, text)` with Postgres patterns.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct PgToChar {
    signature: Signature,
}

impl Default for PgToChar {
    fn default() -> Self {
        Self::new()
    }
}

impl PgToChar {
    /// The function.
    pub fn new() -> Self {
        let mut variants = vec![TypeSignature::Exact(vec![DataType::Date32, DataType::Utf8])];
        for unit in [
            TimeUnit::Second,
            TimeUnit::Millisecond,
            TimeUnit::Microsecond,
            TimeUnit::Nanosecond,
        ] {
            variants.push(TypeSignature::Exact(vec![
                DataType::Timestamp(unit, None),
                DataType::Utf8,
            ]));
            variants.push(TypeSignature::Exact(vec![
                DataType::Timestamp(unit, Some("+00:00".into())),
                DataType::Utf8,
            ]));
            variants.push(TypeSignature::Exact(vec![
                DataType::Timestamp(unit, Some("UTC".into())),
                DataType::Utf8,
            ]));
        }
        Self {
            signature: Signature::one_of(variants, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for PgToChar {
    fn name(&self) -> &str {
        "to_char"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [value, template] = args.args.as_slice() else {
            return exec_err!("to_char takes a value and a template");
        };
        let scalar = all_scalar(&args.args);
        let n = rows_of(&args.args);
        let values = value.to_array(n)?;
        let micros =
            arrow::compute::cast(&values, &DataType::Timestamp(TimeUnit::Microsecond, None))?;
        let micros = micros.as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        let templates = Templates::new(template)?;
        let mut out = StringBuilder::with_capacity(n, n * 16);
        let mut text = String::new();
        for row in 0..n {
            let Some(t) = templates.get(row) else {
                out.append_null();
                continue;
            };
            if micros.is_null(row) {
                out.append_null();
                continue;
            }
            let Some(ts) = chrono::DateTime::from_timestamp_micros(micros.value(row)) else {
                return exec_err!("timestamp out of range");
            };
            text.clear();
            t.format(&ts.naive_utc(), &mut text);
            out.append_value(&text);
        }
        finish(Arc::new(out.finish()), scalar)
    }
}

/// `f(text, template)`, or the one-argument form DataFusion provides.
fn text_and_template() -> Signature {
    Signature::one_of(
        vec![
            TypeSignature::Exact(vec![DataType::Utf8, DataType::Utf8]),
            TypeSignature::Any(1),
        ],
        Volatility::Immutable,
    )
}

fn parse_with_template(
    name: &str,
    args: &[ColumnarValue],
    mut emit: impl FnMut(Option<chrono::NaiveDateTime>),
) -> Result<()> {
    let [text, template] = args else {
        return exec_err!("{name} takes a text and a template");
    };
    let n = rows_of(args);
    let text = arrow::compute::cast(&text.to_array(n)?, &DataType::Utf8)?;
    let text = text.as_string::<i32>();
    let templates = Templates::new(template)?;
    for row in 0..n {
        match templates.get(row) {
            Some(t) if !text.is_null(row) => match t.parse_datetime(text.value(row)) {
                Ok(ts) => emit(Some(ts)),
                Err(e) => {
                    // A text the template cannot read: 22P02, as for any
                    // invalid text representation.
                    return Err(datafusion::error::DataFusionError::ArrowError(
                        Box::new(arrow::error::ArrowError::ParseError(format!("{name}: {e}"))),
                        None,
                    ));
                }
            },
            _ => emit(None),
        }
    }
    Ok(())
}

/// `to_timestamp(text, text)` with Postgres patterns (a `timestamptz` at
/// UTC); `to_timestamp(number)` is DataFusion's (seconds since the epoch).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct PgToTimestamp {
    signature: Signature,
}

impl Default for PgToTimestamp {
    fn default() -> Self {
        Self::new()
    }
}

impl PgToTimestamp {
    /// The function.
    pub fn new() -> Self {
        Self {
            signature: text_and_template(),
        }
    }
}

impl ScalarUDFImpl for PgToTimestamp {
    fn name(&self) -> &str {
        "to_timestamp"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        if arg_types.len() == 1 {
            let config = datafusion::config::ConfigOptions::default();
            return datafusion::functions::datetime::to_timestamp(&config)
                .inner()
                .return_type(arg_types);
        }
        Ok(DataType::Timestamp(
            TimeUnit::Microsecond,
            Some("+00:00".into()),
        ))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        if args.args.len() == 1 {
            let config = Arc::clone(&args.config_options);
            return datafusion::functions::datetime::to_timestamp(&config)
                .inner()
                .invoke_with_args(args);
        }
        let scalar = all_scalar(&args.args);
        let mut out = TimestampMicrosecondBuilder::new().with_timezone("+00:00");
        parse_with_template("to_timestamp", &args.args, |ts| {
            out.append_option(ts.map(|t| t.and_utc().timestamp_micros()))
        })?;
        finish(Arc::new(out.finish()), scalar)
    }
}

/// `to_date(text, text)` with Postgres patterns; `to_date(text)` is
/// DataFusion's.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct PgToDate {
    signature: Signature,
}

impl Default for PgToDate {
    fn default() -> Self {
        Self::new()
    }
}

impl PgToDate {
    /// The function.
    pub fn new() -> Self {
        Self {
            signature: text_and_template(),
        }
    }
}

impl ScalarUDFImpl for PgToDate {
    fn name(&self) -> &str {
        "to_date"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Date32)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        if args.args.len() == 1 {
            return datafusion::functions::datetime::to_date()
                .inner()
                .invoke_with_args(args);
        }
        let scalar = all_scalar(&args.args);
        let mut out = Date32Builder::new();
        parse_with_template("to_date", &args.args, |ts| {
            out.append_option(ts.map(|t| {
                use chrono::Datelike;
                t.date().num_days_from_ce() - 719_163
            }))
        })?;
        finish(Arc::new(out.finish()), scalar)
    }
}

/// `PROCTIME()`: processing time, the wall clock when the row is processed
/// (Flink's and RisingWave's). Unlike `now()`, which is the statement's
/// start, it is evaluated with every batch: volatile.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ProcTime {
    signature: Signature,
}

impl Default for ProcTime {
    fn default() -> Self {
        Self::new()
    }
}

impl ProcTime {
    /// The function.
    pub fn new() -> Self {
        Self {
            signature: Signature::exact(vec![], Volatility::Volatile),
        }
    }
}

impl ScalarUDFImpl for ProcTime {
    fn name(&self) -> &str {
        "proctime"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Timestamp(
            TimeUnit::Microsecond,
            Some("+00:00".into()),
        ))
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        Ok(ColumnarValue::Scalar(ScalarValue::TimestampMicrosecond(
            Some(now),
            Some("+00:00".into()),
        )))
    }
}
