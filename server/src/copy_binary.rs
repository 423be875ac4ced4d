//! `COPY ... (FORMAT binary)`: Postgres's binary COPY format, both
//! directions (asyncpg's `copy_records_to_table` writes it, its
//! `copy_from_query` can read it).
//!
//! The stream is the signature `PGCOPY\n\377\r\n\0`, a flags word and a
//! header extension length, then per row a field count (i16) and per field
//! a length (i32, -1 for NULL) and the value in the type's binary send
//! format, and a trailer of -1.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder,
    Float64Builder, Int16Builder, Int32Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, TimeUnit};
use arrow::record_batch::RecordBatch;
use bytes::{BufMut, Bytes, BytesMut};

use crate::errors::PgError;

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
/// Postgres's epoch (2000-01-01) in Unix days and microseconds.
const PG_EPOCH_DAYS: i32 = 10_957;
const PG_EPOCH_US: i64 = 10_957 * 86_400_000_000;

/// The stream's header.
pub fn header() -> Bytes {
    let mut b = BytesMut::with_capacity(19);
    b.put_slice(SIGNATURE);
    b.put_i32(0);
    b.put_i32(0);
    b.freeze()
}

/// The stream's trailer.
pub fn trailer() -> Bytes {
    Bytes::from_static(&[0xff, 0xff])
}

/// One binary COPY tuple per row of `batch`.
pub fn rows(batch: &RecordBatch) -> Vec<Bytes> {
    let mut out = BytesMut::new();
    let mut ends = Vec::with_capacity(batch.num_rows());
    for row in 0..batch.num_rows() {
        out.put_i16(batch.num_columns() as i16);
        for col in batch.columns() {
            if col.is_null(row) || col.data_type().is_null() {
                out.put_i32(-1);
                continue;
            }
            let at = out.len();
            out.put_i32(0);
            crate::encode::write_binary(&mut out, col.as_ref(), row);
            let len = (out.len() - at - 4) as i32;
            out[at..at + 4].copy_from_slice(&len.to_be_bytes());
        }
        ends.push(out.len());
    }
    let all = out.freeze();
    let mut start = 0;
    ends.into_iter()
        .map(|end| {
            let r = all.slice(start..end);
            start = end;
            r
        })
        .collect()
}

fn bad(message: impl Into<String>) -> PgError {
    PgError::new("22P04", message)
}

/// A column being decoded.
enum Column {
    Bool(BooleanBuilder),
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Text(StringBuilder),
    Bytes(BinaryBuilder),
    Date(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder, DataType),
    Numeric(Decimal128Builder, i8),
}

impl Column {
    fn new(t: &DataType, name: &str) -> Result<Self, PgError> {
        Ok(match t {
            DataType::Boolean => Column::Bool(BooleanBuilder::new()),
            DataType::Int16 => Column::I16(Int16Builder::new()),
            DataType::Int32 => Column::I32(Int32Builder::new()),
            DataType::Int64 => Column::I64(Int64Builder::new()),
            DataType::Float32 => Column::F32(Float32Builder::new()),
            DataType::Float64 => Column::F64(Float64Builder::new()),
            DataType::Utf8 => Column::Text(StringBuilder::new()),
            DataType::Binary => Column::Bytes(BinaryBuilder::new()),
            DataType::Date32 => Column::Date(Date32Builder::new()),
            DataType::Timestamp(_, _) => {
                Column::Timestamp(TimestampMicrosecondBuilder::new(), t.clone())
            }
            DataType::Decimal128(p, s) => Column::Numeric(
                Decimal128Builder::new()
                    .with_precision_and_scale(*p, *s)
                    .map_err(|e| PgError::internal(e.to_string()))?,
                *s,
            ),
            other => {
                return Err(PgError::new(
                    "0A000",
                    format!("binary COPY of column \"{name}\" of type {other} is not supported"),
                ))
            }
        })
    }

    fn null(&mut self) {
        match self {
            Column::Bool(b) => b.append_null(),
            Column::I16(b) => b.append_null(),
            Column::I32(b) => b.append_null(),
            Column::I64(b) => b.append_null(),
            Column::F32(b) => b.append_null(),
            Column::F64(b) => b.append_null(),
            Column::Text(b) => b.append_null(),
            Column::Bytes(b) => b.append_null(),
            Column::Date(b) => b.append_null(),
            Column::Timestamp(b, _) => b.append_null(),
            Column::Numeric(b, _) => b.append_null(),
        }
    }

    fn push(&mut self, v: &[u8], name: &str) -> Result<(), PgError> {
        let int = |v: &[u8]| -> Result<i64, PgError> {
            Ok(match v.len() {
                2 => i16::from_be_bytes([v[0], v[1]]) as i64,
                4 => i32::from_be_bytes([v[0], v[1], v[2], v[3]]) as i64,
                8 => i64::from_be_bytes(v.try_into().map_err(|_| bad("bad integer"))?),
                n => return Err(bad(format!("column \"{name}\": an integer of {n} bytes"))),
            })
        };
        let range = |x: i64, what: &str| PgError::new("22003", format!("{what} out of range: {x}"));
        match self {
            Column::Bool(b) => match v {
                [x] => b.append_value(*x != 0),
                _ => {
                    return Err(bad(format!(
                        "column \"{name}\": a boolean of {} bytes",
                        v.len()
                    )))
                }
            },
            Column::I16(b) => {
                let x = int(v)?;
                b.append_value(i16::try_from(x).map_err(|_| range(x, "smallint"))?)
            }
            Column::I32(b) => {
                let x = int(v)?;
                b.append_value(i32::try_from(x).map_err(|_| range(x, "integer"))?)
            }
            Column::I64(b) => b.append_value(int(v)?),
            Column::F32(b) => match v.len() {
                4 => b.append_value(f32::from_be_bytes([v[0], v[1], v[2], v[3]])),
                8 => b.append_value(
                    f64::from_be_bytes(v.try_into().map_err(|_| bad("bad float"))?) as f32,
                ),
                n => return Err(bad(format!("column \"{name}\": a float of {n} bytes"))),
            },
            Column::F64(b) => match v.len() {
                4 => b.append_value(f32::from_be_bytes([v[0], v[1], v[2], v[3]]) as f64),
                8 => b.append_value(f64::from_be_bytes(
                    v.try_into().map_err(|_| bad("bad float"))?,
                )),
                n => return Err(bad(format!("column \"{name}\": a float of {n} bytes"))),
            },
            Column::Text(b) => {
                let s = std::str::from_utf8(v).map_err(|_| {
                    PgError::new(
                        "22021",
                        format!("column \"{name}\": text is not valid UTF-8"),
                    )
                })?;
                if s.contains('\0') {
                    return Err(PgError::new(
                        "22021",
                        format!("column \"{name}\": text holds a NUL byte"),
                    ));
                }
                b.append_value(s)
            }
            Column::Bytes(b) => b.append_value(v),
            Column::Date(b) => {
                let d = int(v)?;
                let d = i32::try_from(d).map_err(|_| range(d, "date"))?;
                b.append_value(d.saturating_add(PG_EPOCH_DAYS))
            }
            Column::Timestamp(b, _) => b.append_value(int(v)?.saturating_add(PG_EPOCH_US)),
            Column::Numeric(b, scale) => b.append_value(numeric(v, *scale, name)?),
        }
        Ok(())
    }

    fn finish(self) -> Result<ArrayRef, PgError> {
        Ok(match self {
            Column::Bool(mut b) => Arc::new(b.finish()),
            Column::I16(mut b) => Arc::new(b.finish()),
            Column::I32(mut b) => Arc::new(b.finish()),
            Column::I64(mut b) => Arc::new(b.finish()),
            Column::F32(mut b) => Arc::new(b.finish()),
            Column::F64(mut b) => Arc::new(b.finish()),
            Column::Text(mut b) => Arc::new(b.finish()),
            Column::Bytes(mut b) => Arc::new(b.finish()),
            Column::Date(mut b) => Arc::new(b.finish()),
            Column::Timestamp(mut b, t) => {
                let a: ArrayRef = Arc::new(b.finish());
                match t {
                    DataType::Timestamp(TimeUnit::Microsecond, None) => a,
                    other => arrow::compute::cast(&a, &other)
                        .map_err(|e| PgError::new("22008", e.to_string()))?,
                }
            }
            Column::Numeric(mut b, _) => Arc::new(b.finish()),
        })
    }
}

/// A binary NUMERIC as an i128 at `scale`.
fn numeric(v: &[u8], scale: i8, name: &str) -> Result<i128, PgError> {
    if v.len() < 8 {
        return Err(bad(format!("column \"{name}\": a short numeric")));
    }
    let n = i16::from_be_bytes([v[0], v[1]]) as usize;
    let weight = i16::from_be_bytes([v[2], v[3]]) as i32;
    let sign = u16::from_be_bytes([v[4], v[5]]);
    if sign == 0xC000 {
        return Err(PgError::new("22003", format!("column \"{name}\": NaN")));
    }
    if v.len() != 8 + 2 * n {
        return Err(bad(format!(
            "column \"{name}\": a numeric of the wrong length"
        )));
    }
    // value = sum(d_i * 10000^(weight - i)), then scaled by 10^scale.
    let overflow = || PgError::new("22003", format!("column \"{name}\": numeric out of range"));
    let mut acc: i128 = 0;
    let mut exp10: i32 = 0; // the power of ten acc is in units of
    for i in 0..n {
        let d = i16::from_be_bytes([v[8 + 2 * i], v[9 + 2 * i]]) as i128;
        acc = acc
            .checked_mul(10_000)
            .and_then(|a| a.checked_add(d))
            .ok_or_else(overflow)?;
        exp10 = 4 * (weight - i as i32);
    }
    // acc is in units of 10^exp10; bring it to 10^-scale.
    let shift = exp10 + scale as i32;
    let value = if shift >= 0 {
        10i128
            .checked_pow(shift as u32)
            .and_then(|p| acc.checked_mul(p))
            .ok_or_else(overflow)?
    } else {
        let p = 10i128.checked_pow((-shift) as u32).ok_or_else(overflow)?;
        acc / p
    };
    Ok(if sign == 0x4000 { -value } else { value })
}

/// Decodes a binary COPY stream into one array per column of `types`.
pub fn parse(data: &[u8], types: &[(DataType, String)]) -> Result<(Vec<ArrayRef>, usize), PgError> {
    if data.len() < 19 || &data[..11] != SIGNATURE {
        return Err(bad("COPY file signature not recognized"));
    }
    let ext = u32::from_be_bytes([data[15], data[16], data[17], data[18]]) as usize;
    let mut pos = 19usize
        .checked_add(ext)
        .filter(|p| *p <= data.len())
        .ok_or_else(|| bad("invalid COPY file header"))?;
    let mut columns = types
        .iter()
        .map(|(t, n)| Column::new(t, n))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rows = 0usize;
    loop {
        let count = data
            .get(pos..pos + 2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| bad("COPY data ended without its trailer"))?;
        pos += 2;
        if count == -1 {
            break;
        }
        if count as usize != types.len() {
            return Err(bad(format!(
                "row {} has {count} fields, expected {}",
                rows + 1,
                types.len()
            )));
        }
        for (c, column) in columns.iter_mut().enumerate() {
            let len = data
                .get(pos..pos + 4)
                .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| bad("unexpected end of COPY data"))?;
            pos += 4;
            if len < 0 {
                column.null();
                continue;
            }
            let value = data
                .get(pos..pos + len as usize)
                .ok_or_else(|| bad("unexpected end of COPY data"))?;
            pos += len as usize;
            column.push(value, &types[c].1).map_err(|mut e| {
                e.message = format!("{}, row {}", e.message, rows + 1);
                e
            })?;
        }
        rows += 1;
    }
    let arrays = columns
        .into_iter()
        .map(Column::finish)
        .collect::<Result<Vec<_>, _>>()?;
    Ok((arrays, rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, Int32Array, StringArray};
    use arrow::datatypes::{Field, Schema};

    #[test]
    fn a_batch_survives_the_binary_format_and_garbage_is_refused() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int32, true),
            Field::new("b", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int32Array::from(vec![Some(1), None, Some(-7)])),
                Arc::new(StringArray::from(vec![Some("x"), Some("ü"), None])),
            ],
        )
        .unwrap();
        let mut data = header().to_vec();
        for r in rows(&batch) {
            data.extend_from_slice(&r);
        }
        data.extend_from_slice(&trailer());
        let types = vec![
            (DataType::Int32, "a".to_string()),
            (DataType::Utf8, "b".to_string()),
        ];
        let (arrays, n) = parse(&data, &types).unwrap();
        assert_eq!(n, 3);
        assert_eq!(arrays[0].as_ref(), batch.column(0).as_ref());
        assert_eq!(
            arrays[1].as_string::<i32>(),
            batch.column(1).as_string::<i32>()
        );
        assert!(parse(b"not a copy file at all", &types).is_err());
        assert!(parse(&data[..data.len() - 3], &types).is_err());
        // numeric 12.345 at scale 3: digits 12, 3450; weight 0, dscale 3.
        let num = [0u8, 2, 0, 0, 0, 0, 0, 3, 0, 12, 0x0d, 0x7a];
        assert_eq!(numeric(&num, 3, "n").unwrap(), 12_345);
        assert_eq!(numeric(&num, 2, "n").unwrap(), 1_234);
    }
}
