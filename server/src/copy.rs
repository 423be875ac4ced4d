//! `COPY` data: Postgres text format and CSV, both directions.

use arrow::array::Array;
use arrow::record_batch::RecordBatch;
use bytes::{BufMut, BytesMut};
use drizzle_planner::CopyOptions;

use crate::errors::PgError;

/// One input record with the line it started on (1-based).
#[derive(Debug)]
pub struct Record {
    /// Line number.
    pub line: usize,
    /// Field values; `None` is NULL.
    pub fields: Vec<Option<String>>,
}

/// Splits COPY input into records of exactly `width` fields.
pub fn parse_records(text: &str, o: &CopyOptions, width: usize) -> Result<Vec<Record>, PgError> {
    let mut out = Vec::new();
    if o.csv {
        parse_csv(text, o, width, &mut out)?;
    } else {
        // The text after the last newline is a record only when non-empty.
        let body = text.strip_suffix('\n').unwrap_or(text);
        for (i, raw) in body.split('\n').enumerate() {
            if text.is_empty() {
                break;
            }
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            if line == "\\." {
                break;
            }
            if i == 0 && o.header {
                continue;
            }
            let fields: Vec<Option<String>> = line
                .split(o.delimiter)
                .map(|f| {
                    if f == o.null {
                        None
                    } else {
                        Some(unescape_text(f))
                    }
                })
                .collect();
            check_width(&fields, width, i + 1)?;
            out.push(Record {
                line: i + 1,
                fields,
            });
        }
    }
    Ok(out)
}

fn check_width(fields: &[Option<String>], width: usize, line: usize) -> Result<(), PgError> {
    if fields.len() > width {
        return Err(PgError::new(
            "22P04",
            format!("extra data after last expected column, line {line}"),
        ));
    }
    if fields.len() < width {
        return Err(PgError::new(
            "22P04",
            format!("missing data for column {}, line {line}", fields.len() + 1),
        ));
    }
    Ok(())
}

fn unescape_text(f: &str) -> String {
    if !f.contains('\\') {
        return f.to_string();
    }
    let mut s = String::with_capacity(f.len());
    let mut chars = f.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            s.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => s.push('\n'),
            Some('t') => s.push('\t'),
            Some('r') => s.push('\r'),
            Some('b') => s.push('\u{8}'),
            Some('f') => s.push('\u{c}'),
            Some('v') => s.push('\u{b}'),
            Some(other) => s.push(other),
            None => s.push('\\'),
        }
    }
    s
}

fn parse_csv(
    text: &str,
    o: &CopyOptions,
    width: usize,
    out: &mut Vec<Record>,
) -> Result<(), PgError> {
    let mut chars = text.chars().peekable();
    let mut line = 1usize;
    let mut first = true;
    loop {
        if chars.peek().is_none() {
            break;
        }
        let start_line = line;
        let mut fields: Vec<Option<String>> = Vec::new();
        let mut field = String::new();
        let mut quoted_field = false;
        let mut in_quotes = false;
        let mut end_of_data = false;
        loop {
            match chars.next() {
                None => {
                    if in_quotes {
                        return Err(PgError::new(
                            "22P04",
                            format!("unterminated CSV quoted field, line {start_line}"),
                        ));
                    }
                    break;
                }
                Some('"') if in_quotes => {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        field.push('"');
                    } else {
                        in_quotes = false;
                    }
                }
                Some('"') if field.is_empty() && !quoted_field => {
                    in_quotes = true;
                    quoted_field = true;
                }
                Some(c) if in_quotes => {
                    if c == '\n' {
                        line += 1;
                    }
                    field.push(c);
                }
                Some(c) if c == o.delimiter => {
                    fields.push(csv_value(std::mem::take(&mut field), quoted_field, o));
                    quoted_field = false;
                }
                Some('\r') if chars.peek() == Some(&'\n') => {}
                Some('\n') => {
                    line += 1;
                    break;
                }
                Some(c) => field.push(c),
            }
        }
        if fields.is_empty() && field == "\\." && !quoted_field {
            end_of_data = true;
        }
        if end_of_data {
            break;
        }
        fields.push(csv_value(field, quoted_field, o));
        if fields.len() == 1 && fields[0].as_deref() == Some("") && !quoted_field {
            // A blank line.
            if chars.peek().is_none() {
                break;
            }
        }
        if first && o.header {
            first = false;
            continue;
        }
        first = false;
        check_width(&fields, width, start_line)?;
        out.push(Record {
            line: start_line,
            fields,
        });
    }
    Ok(())
}

fn csv_value(field: String, quoted: bool, o: &CopyOptions) -> Option<String> {
    if !quoted && field == o.null {
        None
    } else {
        Some(field)
    }
}

/// Appends the COPY TO form of every row of `batch` (one line each).
/// Formats a batch as COPY lines: one `Bytes` per row (Postgres sends each row
/// in its own CopyData message, and drivers such as psycopg 3 read one row per
/// message). The rows share one buffer.
pub fn format_rows(batch: &RecordBatch, o: &CopyOptions) -> Vec<bytes::Bytes> {
    let mut out = BytesMut::new();
    let mut ends = Vec::with_capacity(batch.num_rows());
    format_rows_into(&mut out, batch, o, &mut ends);
    let all = out.freeze();
    let mut start = 0;
    ends.into_iter()
        .map(|end| {
            let row = all.slice(start..end);
            start = end;
            row
        })
        .collect()
}

fn format_rows_into(
    out: &mut BytesMut,
    batch: &RecordBatch,
    o: &CopyOptions,
    ends: &mut Vec<usize>,
) {
    let mut value = BytesMut::new();
    for row in 0..batch.num_rows() {
        for (i, col) in batch.columns().iter().enumerate() {
            if i > 0 {
                out.put_u8(o.delimiter as u8);
            }
            if col.is_null(row) || col.data_type().is_null() {
                out.put_slice(o.null.as_bytes());
                continue;
            }
            value.clear();
            crate::encode::write_text(&mut value, col.as_ref(), row);
            if o.csv {
                let needs_quotes = value.is_empty()
                    || value
                        .iter()
                        .any(|&b| b == b'"' || b == b'\n' || b == b'\r' || b == o.delimiter as u8);
                if needs_quotes {
                    out.put_u8(b'"');
                    for &b in value.iter() {
                        if b == b'"' {
                            out.put_u8(b'"');
                        }
                        out.put_u8(b);
                    }
                    out.put_u8(b'"');
                } else {
                    out.put_slice(&value);
                }
            } else {
                for &b in value.iter() {
                    match b {
                        b'\\' => out.put_slice(b"\\\\"),
                        b'\n' => out.put_slice(b"\\n"),
                        b'\r' => out.put_slice(b"\\r"),
                        b'\t' => out.put_slice(b"\\t"),
                        b => out.put_u8(b),
                    }
                }
            }
        }
        out.put_u8(b'\n');
        ends.push(out.len());
    }
}

/// The header line for `COPY ... TO STDOUT (HEADER)`.
pub fn header_line(batch_schema: &arrow::datatypes::Schema, o: &CopyOptions) -> String {
    let names: Vec<&str> = batch_schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    format!("{}\n", names.join(&o.delimiter.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_with_nulls_and_escapes() {
        let o = CopyOptions::default();
        let r = parse_records("1\tone\n2\t\\N\n3\ta\\tb\n\\.\n", &o, 2).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[1].fields[1], None);
        assert_eq!(r[2].fields[1].as_deref(), Some("a\tb"));
        let e = parse_records("1\tone\textra\n", &o, 2).unwrap_err();
        assert_eq!(e.code, "22P04");
        assert!(e.message.contains("line 1"));
    }

    #[test]
    fn csv_with_quotes_header_and_line_numbers() {
        let o = CopyOptions {
            csv: true,
            header: true,
            delimiter: ',',
            null: String::new(),
            binary: false,
        };
        let r = parse_records("id,name\n1,\"a,b\"\n2,\n3,\"say \"\"hi\"\"\"\n", &o, 2).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].fields[1].as_deref(), Some("a,b"));
        assert_eq!(r[1].fields[1], None);
        assert_eq!(r[2].fields[1].as_deref(), Some("say \"hi\""));
        assert_eq!(r[2].line, 4);
        let e = parse_records("id,name\n1\n", &o, 2).unwrap_err();
        assert!(e.message.contains("line 2"), "{}", e.message);
    }
}
