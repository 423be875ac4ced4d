//! Arrow values on the wire: Postgres type OIDs, text and binary encodings of
//! result columns, written straight into the output buffer (no per-row
//! allocation), and parsing of text values (COPY, parameters).

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, StringArray};
use arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Float32Type, Float64Type, Int16Type, Int32Type,
    Int64Type, Int8Type, IntervalUnit, SchemaRef, TimeUnit, UInt16Type, UInt32Type, UInt64Type,
    UInt8Type,
};
use arrow::record_batch::RecordBatch;
use bytes::{BufMut, BytesMut};
use chrono::{DateTime, NaiveDate};

use crate::errors::PgError;

/// Postgres OIDs of the types Drizzle returns.
pub mod oid {
    /// bool
    pub const BOOL: u32 = 16;
    /// bytea
    pub const BYTEA: u32 = 17;
    /// int8
    pub const INT8: u32 = 20;
    /// int2
    pub const INT2: u32 = 21;
    /// int4
    pub const INT4: u32 = 23;
    /// text
    pub const TEXT: u32 = 25;
    /// float4
    pub const FLOAT4: u32 = 700;
    /// float8
    pub const FLOAT8: u32 = 701;
    /// date
    pub const DATE: u32 = 1082;
    /// timestamp
    pub const TIMESTAMP: u32 = 1114;
    /// timestamptz
    pub const TIMESTAMPTZ: u32 = 1184;
    /// numeric
    pub const NUMERIC: u32 = 1700;
}

/// The Postgres type a column is described as.
pub fn pg_type(t: &DataType) -> u32 {
    match t {
        DataType::Boolean => oid::BOOL,
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => oid::INT2,
        DataType::Int32 | DataType::UInt16 => oid::INT4,
        DataType::Int64 | DataType::UInt32 | DataType::UInt64 => oid::INT8,
        DataType::Float16 | DataType::Float32 => oid::FLOAT4,
        DataType::Float64 => oid::FLOAT8,
        DataType::Decimal128(_, _) => oid::NUMERIC,
        DataType::Date32 => oid::DATE,
        DataType::Timestamp(_, None) => oid::TIMESTAMP,
        DataType::Timestamp(_, Some(_)) => oid::TIMESTAMPTZ,
        DataType::Binary | DataType::LargeBinary => oid::BYTEA,
        DataType::List(f) | DataType::LargeList(f) => match pg_type(f.data_type()) {
            oid::BOOL => 1000,
            oid::INT2 => 1005,
            oid::INT4 => 1007,
            oid::INT8 => 1016,
            oid::FLOAT4 => 1021,
            oid::FLOAT8 => 1022,
            _ => 1009,
        },
        _ => oid::TEXT,
    }
}

/// Postgres' epoch (2000-01-01) in Unix days and microseconds.
const PG_EPOCH_DAYS: i64 = 10_957;
const PG_EPOCH_US: i64 = PG_EPOCH_DAYS * 86_400_000_000;

fn ts_to_us(array: &dyn Array, row: usize) -> i64 {
    match array.data_type() {
        DataType::Timestamp(TimeUnit::Second, _) => {
            array
                .as_primitive::<arrow::datatypes::TimestampSecondType>()
                .value(row)
                * 1_000_000
        }
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            array
                .as_primitive::<arrow::datatypes::TimestampMillisecondType>()
                .value(row)
                * 1000
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => array
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
            .value(row),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => {
            array
                .as_primitive::<arrow::datatypes::TimestampNanosecondType>()
                .value(row)
                / 1000
        }
        _ => 0,
    }
}

fn write_timestamp_text(out: &mut BytesMut, us: i64, tz: bool) {
    use std::fmt::Write;
    let mut s = String::with_capacity(32);
    match DateTime::from_timestamp_micros(us) {
        Some(dt) => {
            let naive = dt.naive_utc();
            let _ = write!(s, "{}", naive.format("%Y-%m-%d %H:%M:%S"));
            let frac = us.rem_euclid(1_000_000);
            if frac != 0 {
                let f = format!("{frac:06}");
                let _ = write!(s, ".{}", f.trim_end_matches('0'));
            }
            if tz {
                s.push_str("+00");
            }
        }
        None => s.push_str("infinity"),
    }
    out.put_slice(s.as_bytes());
}

fn write_float_text(out: &mut BytesMut, v: f64) {
    if v.is_nan() {
        out.put_slice(b"NaN");
    } else if v.is_infinite() {
        out.put_slice(if v > 0.0 { b"Infinity" } else { b"-Infinity" });
    } else {
        out.put_slice(v.to_string().as_bytes());
    }
}

/// Writes the text form of `array[row]` (not null).
pub fn write_text(out: &mut BytesMut, array: &dyn Array, row: usize) {
    use std::fmt::Write;
    match array.data_type() {
        DataType::Boolean => out.put_slice(if array.as_boolean().value(row) {
            b"t"
        } else {
            b"f"
        }),
        DataType::Int8 => out.put_slice(
            array
                .as_primitive::<Int8Type>()
                .value(row)
                .to_string()
                .as_bytes(),
        ),
        DataType::Int16 => out.put_slice(
            array
                .as_primitive::<Int16Type>()
                .value(row)
                .to_string()
                .as_bytes(),
        ),
        DataType::Int32 => {
            out.put_slice(itoa_buf(array.as_primitive::<Int32Type>().value(row) as i64).as_bytes())
        }
        DataType::Int64 => {
            out.put_slice(itoa_buf(array.as_primitive::<Int64Type>().value(row)).as_bytes())
        }
        DataType::UInt8 => out.put_slice(
            array
                .as_primitive::<UInt8Type>()
                .value(row)
                .to_string()
                .as_bytes(),
        ),
        DataType::UInt16 => out.put_slice(
            array
                .as_primitive::<UInt16Type>()
                .value(row)
                .to_string()
                .as_bytes(),
        ),
        DataType::UInt32 => out.put_slice(
            array
                .as_primitive::<UInt32Type>()
                .value(row)
                .to_string()
                .as_bytes(),
        ),
        DataType::UInt64 => out.put_slice(
            array
                .as_primitive::<UInt64Type>()
                .value(row)
                .to_string()
                .as_bytes(),
        ),
        DataType::Float32 => {
            write_float_text(out, array.as_primitive::<Float32Type>().value(row) as f64)
        }
        DataType::Float64 => write_float_text(out, array.as_primitive::<Float64Type>().value(row)),
        DataType::Utf8 => out.put_slice(array.as_string::<i32>().value(row).as_bytes()),
        DataType::LargeUtf8 => out.put_slice(array.as_string::<i64>().value(row).as_bytes()),
        DataType::Utf8View => out.put_slice(array.as_string_view().value(row).as_bytes()),
        DataType::Date32 => {
            let d = array.as_primitive::<Date32Type>().value(row);
            match NaiveDate::from_num_days_from_ce_opt(d + 719_163) {
                Some(date) => {
                    let mut s = String::new();
                    let _ = write!(s, "{}", date.format("%Y-%m-%d"));
                    out.put_slice(s.as_bytes());
                }
                None => out.put_slice(b"infinity"),
            }
        }
        DataType::Timestamp(_, tz) => write_timestamp_text(out, ts_to_us(array, row), tz.is_some()),
        DataType::Binary => {
            out.put_slice(b"\\x");
            for b in array.as_binary::<i32>().value(row) {
                let mut s = String::new();
                let _ = write!(s, "{b:02x}");
                out.put_slice(s.as_bytes());
            }
        }
        DataType::Interval(IntervalUnit::MonthDayNano) => {
            let v = array
                .as_primitive::<arrow::datatypes::IntervalMonthDayNanoType>()
                .value(row);
            write_interval_text(out, v.months, v.days, v.nanoseconds / 1000);
        }
        DataType::Duration(unit) => {
            use arrow::datatypes::{
                DurationMicrosecondType, DurationMillisecondType, DurationNanosecondType,
                DurationSecondType,
            };
            let us = match unit {
                TimeUnit::Second => array
                    .as_primitive::<DurationSecondType>()
                    .value(row)
                    .saturating_mul(1_000_000),
                TimeUnit::Millisecond => array
                    .as_primitive::<DurationMillisecondType>()
                    .value(row)
                    .saturating_mul(1000),
                TimeUnit::Microsecond => array.as_primitive::<DurationMicrosecondType>().value(row),
                TimeUnit::Nanosecond => {
                    array.as_primitive::<DurationNanosecondType>().value(row) / 1000
                }
            };
            // As Postgres prints `timestamp - timestamp`: days, then time.
            let days = us / 86_400_000_000;
            write_interval_text(
                out,
                0,
                i32::try_from(days).unwrap_or(i32::MAX),
                us % 86_400_000_000,
            );
        }
        DataType::List(_) => write_array_text(out, &array.as_list::<i32>().value(row)),
        DataType::LargeList(_) => write_array_text(out, &array.as_list::<i64>().value(row)),
        _ => {
            let options = arrow::util::display::FormatOptions::default();
            match arrow::util::display::ArrayFormatter::try_new(array, &options) {
                Ok(f) => {
                    let mut s = String::new();
                    let _ = write!(s, "{}", f.value(row));
                    out.put_slice(s.as_bytes());
                }
                Err(_) => out.put_slice(b"?"),
            }
        }
    }
}

/// An interval as Postgres prints it (`IntervalStyle = postgres`):
/// `1 mon 2 days 03:04:05.5`, `00:00:01`, `-00:00:01`.
fn write_interval_text(out: &mut BytesMut, months: i32, days: i32, time_us: i64) {
    use std::fmt::Write;
    let mut s = String::new();
    let plural = |n: i32| if n == 1 || n == -1 { "" } else { "s" };
    if months != 0 {
        let (y, m) = (months / 12, months % 12);
        if y != 0 {
            let _ = write!(s, "{y} year{} ", plural(y));
        }
        if m != 0 {
            let _ = write!(s, "{m} mon{} ", plural(m));
        }
    }
    if days != 0 {
        let _ = write!(s, "{days} day{} ", plural(days));
    }
    if time_us != 0 || s.is_empty() {
        let sign = if time_us < 0 { "-" } else { "" };
        let t = time_us.unsigned_abs();
        let (h, m, sec, us) = (
            t / 3_600_000_000,
            (t / 60_000_000) % 60,
            (t / 1_000_000) % 60,
            t % 1_000_000,
        );
        let _ = write!(s, "{sign}{h:02}:{m:02}:{sec:02}");
        if us != 0 {
            let frac = format!("{us:06}");
            let _ = write!(s, ".{}", frac.trim_end_matches('0'));
        }
    }
    out.put_slice(s.trim_end().as_bytes());
}

/// A list in Postgres's array text form: `{a,b,NULL,"x y"}`.
fn write_array_text(out: &mut BytesMut, values: &ArrayRef) {
    out.put_u8(b'{');
    for i in 0..values.len() {
        if i > 0 {
            out.put_u8(b',');
        }
        if values.is_null(i) {
            out.put_slice(b"NULL");
            continue;
        }
        let mut element = BytesMut::new();
        write_text(&mut element, values.as_ref(), i);
        let needs_quotes = element.is_empty()
            || element.eq_ignore_ascii_case(b"null")
            || element
                .iter()
                .any(|b| matches!(b, b'{' | b'}' | b',' | b'"' | b'\\' | b' ' | b'\t' | b'\n'));
        if needs_quotes {
            out.put_u8(b'"');
            for b in element.iter() {
                if matches!(b, b'"' | b'\\') {
                    out.put_u8(b'\\');
                }
                out.put_u8(*b);
            }
            out.put_u8(b'"');
        } else {
            out.put_slice(&element);
        }
    }
    out.put_u8(b'}');
}

fn itoa_buf(v: i64) -> String {
    v.to_string()
}

/// Writes the binary form of `array[row]` (not null) for the type [`pg_type`] declared.
pub fn write_binary(out: &mut BytesMut, array: &dyn Array, row: usize) {
    match array.data_type() {
        DataType::Boolean => out.put_u8(u8::from(array.as_boolean().value(row))),
        DataType::Int8 => out.put_i16(array.as_primitive::<Int8Type>().value(row) as i16),
        DataType::UInt8 => out.put_i16(array.as_primitive::<UInt8Type>().value(row) as i16),
        DataType::Int16 => out.put_i16(array.as_primitive::<Int16Type>().value(row)),
        DataType::UInt16 => out.put_i32(array.as_primitive::<UInt16Type>().value(row) as i32),
        DataType::Int32 => out.put_i32(array.as_primitive::<Int32Type>().value(row)),
        DataType::UInt32 => out.put_i64(array.as_primitive::<UInt32Type>().value(row) as i64),
        DataType::Int64 => out.put_i64(array.as_primitive::<Int64Type>().value(row)),
        DataType::UInt64 => out.put_i64(array.as_primitive::<UInt64Type>().value(row) as i64),
        DataType::Float16 => out.put_f32(
            array
                .as_primitive::<arrow::datatypes::Float16Type>()
                .value(row)
                .to_f32(),
        ),
        DataType::Float32 => out.put_f32(array.as_primitive::<Float32Type>().value(row)),
        DataType::Float64 => out.put_f64(array.as_primitive::<Float64Type>().value(row)),
        DataType::Date32 => {
            out.put_i32(array.as_primitive::<Date32Type>().value(row) - PG_EPOCH_DAYS as i32)
        }
        DataType::Timestamp(_, _) => out.put_i64(ts_to_us(array, row) - PG_EPOCH_US),
        DataType::Binary => out.put_slice(array.as_binary::<i32>().value(row)),
        DataType::Decimal128(_, scale) => write_numeric(
            out,
            array.as_primitive::<Decimal128Type>().value(row),
            *scale,
        ),
        DataType::List(_) => write_array_binary(out, &array.as_list::<i32>().value(row)),
        DataType::LargeList(_) => write_array_binary(out, &array.as_list::<i64>().value(row)),
        _ => write_text(out, array, row),
    }
}

/// A list in Postgres's binary array form: dimensions, a null flag, the
/// element type, then each element with its length (-1 for NULL).
fn write_array_binary(out: &mut BytesMut, values: &ArrayRef) {
    let n = values.len();
    out.put_i32(i32::from(n > 0));
    out.put_i32(i32::from(values.null_count() > 0));
    out.put_u32(pg_type(values.data_type()));
    if n > 0 {
        out.put_i32(n as i32);
        out.put_i32(1);
    }
    for i in 0..n {
        if values.is_null(i) {
            out.put_i32(-1);
            continue;
        }
        let mut element = BytesMut::new();
        write_binary(&mut element, values.as_ref(), i);
        out.put_i32(element.len() as i32);
        out.put_slice(&element);
    }
}

/// Postgres binary NUMERIC: base-10000 digits, weight, sign, display scale.
fn write_numeric(out: &mut BytesMut, value: i128, scale: i8) {
    let scale = scale.max(0) as u32;
    let negative = value < 0;
    let mut mag = value.unsigned_abs();
    // Pad the fraction to a multiple of 4 decimal digits.
    let frac_groups = scale.div_ceil(4);
    let pad = frac_groups * 4 - scale;
    mag *= 10u128.pow(pad);
    let mut groups: Vec<i16> = Vec::new();
    while mag > 0 {
        groups.push((mag % 10_000) as i16);
        mag /= 10_000;
    }
    while (groups.len() as u32) < frac_groups {
        groups.push(0);
    }
    groups.reverse();
    let weight = groups.len() as i16 - frac_groups as i16 - 1;
    // Trim trailing zero groups (weight is unaffected) and leading ones.
    while groups.last() == Some(&0) {
        groups.pop();
    }
    let mut weight = weight;
    while groups.first() == Some(&0) {
        groups.remove(0);
        weight -= 1;
    }
    out.put_i16(groups.len() as i16);
    out.put_i16(if groups.is_empty() { 0 } else { weight });
    out.put_u16(if negative && !groups.is_empty() {
        0x4000
    } else {
        0
    });
    out.put_u16(scale as u16);
    for g in groups {
        out.put_i16(g);
    }
}

/// Appends one DataRow message per row of `batch` to `out`.
/// `binary[i]` selects the binary format for column i.
pub fn write_data_rows(out: &mut BytesMut, batch: &RecordBatch, binary: &[bool]) {
    let cols = batch.columns();
    for row in 0..batch.num_rows() {
        out.put_u8(b'D');
        let len_at = out.len();
        out.put_i32(0);
        out.put_i16(cols.len() as i16);
        for (i, col) in cols.iter().enumerate() {
            if col.is_null(row) || col.data_type().is_null() {
                out.put_i32(-1);
                continue;
            }
            let field_at = out.len();
            out.put_i32(0);
            if binary.get(i).copied().unwrap_or(false) {
                write_binary(out, col.as_ref(), row);
            } else {
                write_text(out, col.as_ref(), row);
            }
            let flen = (out.len() - field_at - 4) as i32;
            out[field_at..field_at + 4].copy_from_slice(&flen.to_be_bytes());
        }
        let mlen = (out.len() - len_at) as i32;
        out[len_at..len_at + 4].copy_from_slice(&mlen.to_be_bytes());
    }
}

/// Parses text values into a column of type `t` (NULLs stay NULL).
/// On failure, names the first bad value and its index in `values`.
pub fn parse_column(
    values: &[Option<&str>],
    t: &DataType,
    column: &str,
) -> Result<ArrayRef, (usize, PgError)> {
    let strings: ArrayRef = Arc::new(StringArray::from(values.to_vec()));
    let normalized: ArrayRef = match t {
        DataType::Boolean => Arc::new(StringArray::from(
            values
                .iter()
                .map(|v| {
                    v.map(|s| match s.trim().to_lowercase().as_str() {
                        "t" | "true" | "yes" | "y" | "on" | "1" => "true".to_string(),
                        "f" | "false" | "no" | "n" | "off" | "0" => "false".to_string(),
                        other => other.to_string(),
                    })
                })
                .collect::<Vec<_>>(),
        )),
        _ => strings,
    };
    let options = arrow::compute::CastOptions {
        safe: true,
        ..Default::default()
    };
    let cast = arrow::compute::cast_with_options(&normalized, t, &options).map_err(|e| {
        (
            0,
            PgError::new(
                "42804",
                format!("cannot load column {column} of type {t}: {e}"),
            ),
        )
    })?;
    for (i, v) in values.iter().enumerate() {
        if v.is_some() && cast.is_null(i) {
            return Err((
                i,
                PgError::new(
                    "22P02",
                    format!(
                        "invalid input syntax for type {} in column {column}: \"{}\"",
                        sql_type_name(t),
                        v.unwrap_or_default()
                    ),
                ),
            ));
        }
    }
    Ok(cast)
}

/// A Postgres-style name for an Arrow type, for messages.
pub fn sql_type_name(t: &DataType) -> &'static str {
    match t {
        DataType::Boolean => "boolean",
        DataType::Int16 => "smallint",
        DataType::Int32 => "integer",
        DataType::Int64 => "bigint",
        DataType::Float32 => "real",
        DataType::Float64 => "double precision",
        DataType::Decimal128(_, _) => "numeric",
        DataType::Utf8 => "text",
        DataType::Date32 => "date",
        DataType::Timestamp(_, None) => "timestamp",
        DataType::Timestamp(_, Some(_)) => "timestamp with time zone",
        DataType::Binary => "bytea",
        _ => "unknown",
    }
}

/// Row description fields for a schema: (name, type oid, type size).
pub fn describe(schema: &SchemaRef) -> Vec<(String, u32, i16)> {
    schema
        .fields()
        .iter()
        .map(|f| {
            let oid = pg_type(f.data_type());
            let size = match oid {
                oid::BOOL => 1,
                oid::INT2 => 2,
                oid::INT4 | oid::FLOAT4 | oid::DATE => 4,
                oid::INT8 | oid::FLOAT8 | oid::TIMESTAMP | oid::TIMESTAMPTZ => 8,
                _ => -1,
            };
            (f.name().clone(), oid, size)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Decimal128Array, Int64Array, TimestampMicrosecondArray};

    fn text(a: &dyn Array, row: usize) -> String {
        let mut b = BytesMut::new();
        write_text(&mut b, a, row);
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn text_formats_match_postgres() {
        let ts = TimestampMicrosecondArray::from(vec![10_000_000, 1_500_000]);
        assert_eq!(text(&ts, 0), "1970-01-01 00:00:10");
        assert_eq!(text(&ts, 1), "1970-01-01 00:00:01.5");
        let f = arrow::array::Float64Array::from(vec![3.0, 0.25]);
        assert_eq!(text(&f, 0), "3");
        assert_eq!(text(&f, 1), "0.25");
        let d = Decimal128Array::from(vec![1250])
            .with_precision_and_scale(10, 2)
            .unwrap();
        assert_eq!(text(&d, 0), "12.50");
    }

    #[test]
    fn numeric_binary_encoding() {
        // 12.50 → digits [12, 5000], weight 0, scale 2
        let mut b = BytesMut::new();
        write_numeric(&mut b, 1250, 2);
        assert_eq!(&b[..], &[0, 2, 0, 0, 0, 0, 0, 2, 0, 12, 0x13, 0x88]);
        let mut z = BytesMut::new();
        write_numeric(&mut z, 0, 0);
        assert_eq!(&z[..], &[0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn parse_reports_the_bad_value() {
        let ok = parse_column(&[Some("1"), None, Some("3")], &DataType::Int64, "a").unwrap();
        assert_eq!(
            ok.as_any().downcast_ref::<Int64Array>().unwrap().value(2),
            3
        );
        let (idx, err) = parse_column(&[Some("1"), Some("x")], &DataType::Int64, "a").unwrap_err();
        assert_eq!(idx, 1);
        assert_eq!(err.code, "22P02");
    }
}
