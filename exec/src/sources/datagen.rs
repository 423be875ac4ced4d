//! The `datagen` connector: row `n` of each column is a pure function of
//! `n` (and the column's name), produced at a configured rate.

use super::*;

/// How one column of a datagen stream is generated.
#[derive(Debug, Clone)]
pub(super) enum FieldGen {
    Sequence { min: i64, span: Option<u64> },
    Random { min: i64, max: i64 },
    Values(Vec<String>),
    RandomString { length: usize },
    GenerationTime,
}

/// A `connector = 'datagen'` generator.
#[derive(Debug, Clone)]
pub struct DatagenSource {
    schema: SchemaRef,
    fields: Vec<FieldGen>,
    /// Rows per second, over all partitions.
    pub rows_per_second: f64,
    partitions: u32,
    /// Generation time of row 0 (Unix µs).
    pub start_us: i64,
}

pub(super) fn opt_i64(def: &StreamDef, key: &str) -> Result<Option<i64>> {
    def.options
        .get(key)
        .map(|v| {
            v.trim()
                .parse::<i64>()
                .map_err(|_| ExecError::InvalidOption {
                    option: key.into(),
                    message: format!("'{v}' is not an integer"),
                })
        })
        .transpose()
}

impl DatagenSource {
    /// Validates the options of a datagen stream.
    pub fn new(def: &StreamDef) -> Result<Self> {
        let rows_per_second = match def.options.get("rows_per_second") {
            Some(v) => v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| *r > 0.0 && r.is_finite())
                .ok_or_else(|| ExecError::InvalidOption {
                    option: "rows_per_second".into(),
                    message: format!("'{v}' is not a positive number"),
                })?,
            None => 1.0,
        };
        for key in def.options.keys() {
            let known = matches!(key.as_str(), "connector" | "rows_per_second" | "partitions")
                || key
                    .strip_prefix("fields.")
                    .and_then(|rest| rest.split_once('.'))
                    .is_some_and(|(col, opt)| {
                        def.columns.iter().any(|c| c.name == col)
                            && matches!(opt, "kind" | "min" | "max" | "length" | "values")
                    });
            if !known {
                return Err(ExecError::InvalidOption {
                    option: key.clone(),
                    message: "unknown datagen option (rows_per_second, partitions, fields.<col>.kind|min|max|length|values)".into(),
                });
            }
        }
        let mut fields = Vec::new();
        for c in &def.columns {
            let key = |o: &str| format!("fields.{}.{o}", c.name);
            let kind = def.options.get(&key("kind")).map(|s| s.to_lowercase());
            let min = opt_i64(def, &key("min"))?;
            let max = opt_i64(def, &key("max"))?;
            let gen = if let Some(values) = def.options.get(&key("values")) {
                FieldGen::Values(values.split(',').map(|s| s.trim().to_string()).collect())
            } else {
                match (kind.as_deref(), &c.data_type) {
                    (None, DataType::Timestamp(_, _)) => FieldGen::GenerationTime,
                    (Some("sequence"), _) => {
                        let lo = min.unwrap_or(0);
                        // With a max the sequence wraps: min + n % (max - min + 1).
                        let span = match max {
                            Some(hi) if hi < lo => {
                                return Err(ExecError::InvalidOption {
                                    option: key("max"),
                                    message: format!("max {hi} is below min {lo}"),
                                })
                            }
                            Some(hi) => Some((hi - lo + 1) as u64),
                            None => None,
                        };
                        FieldGen::Sequence { min: lo, span }
                    }
                    (None | Some("random"), DataType::Utf8) => FieldGen::RandomString {
                        length: opt_i64(def, &key("length"))?.unwrap_or(8).clamp(1, 1024) as usize,
                    },
                    (None | Some("random"), _) => {
                        let (lo, hi) = (min.unwrap_or(0), max.unwrap_or(1_000_000));
                        if hi < lo {
                            return Err(ExecError::InvalidOption {
                                option: key("max"),
                                message: format!("max {hi} is below min {lo}"),
                            });
                        }
                        FieldGen::Random { min: lo, max: hi }
                    }
                    (Some(other), _) => {
                        return Err(ExecError::InvalidOption {
                            option: key("kind"),
                            message: format!("'{other}' is not sequence or random"),
                        })
                    }
                }
            };
            fields.push(gen);
        }
        Ok(Self {
            schema: def.source_schema(),
            fields,
            rows_per_second,
            partitions: def.partitions.max(1),
            start_us: def.created_at_ms * 1000,
        })
    }
}

impl Generator for DatagenSource {
    fn starts_now(&self) -> bool {
        true
    }

    fn available(&self, p: u32, now_us: i64) -> u64 {
        let elapsed = (now_us - self.start_us).max(0) as f64 / 1e6;
        let total = (elapsed * self.rows_per_second) as u64;
        let n = self.partitions as u64;
        total / n + u64::from((total % n) > p as u64)
    }

    fn generate(&self, p: u32, from: u64, to: u64) -> Result<RecordBatch> {
        let n = self.partitions as u64;
        let seqs: Vec<u64> = (from..to).map(|i| i * n + p as u64).collect();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.fields.len());
        for (gen, field) in self.fields.iter().zip(self.schema.fields()) {
            let ints =
                |f: &dyn Fn(u64) -> i64| -> Vec<i64> { seqs.iter().map(|&s| f(s)).collect() };
            let values: Vec<i64> = match gen {
                FieldGen::Sequence { min, span } => match span {
                    Some(span) => ints(&|s| min + (s % span) as i64),
                    None => ints(&|s| min + s as i64),
                },
                FieldGen::Random { min, max } => {
                    let span = (max - min + 1) as u64;
                    ints(&|s| min + (mix(s ^ field_salt(field.name())) % span) as i64)
                }
                FieldGen::GenerationTime => {
                    let rate = self.rows_per_second;
                    let start = self.start_us;
                    ints(&|s| start + (s as f64 * 1e6 / rate) as i64)
                }
                FieldGen::Values(vals) => {
                    let salt = field_salt(field.name());
                    let strings: Vec<&str> = seqs
                        .iter()
                        .map(|&s| vals[(mix(s ^ salt) % vals.len() as u64) as usize].as_str())
                        .collect();
                    columns.push(cast_strings(strings, field.data_type())?);
                    continue;
                }
                FieldGen::RandomString { length } => {
                    let salt = field_salt(field.name());
                    let strings: Vec<String> = seqs
                        .iter()
                        .map(|&s| {
                            let mut x = mix(s ^ salt);
                            (0..*length)
                                .map(|_| {
                                    x = mix(x);
                                    (b'a' + (x % 26) as u8) as char
                                })
                                .collect()
                        })
                        .collect();
                    columns.push(Arc::new(StringArray::from(strings)));
                    continue;
                }
            };
            columns.push(ints_to_array(values, field.data_type())?);
        }
        Ok(RecordBatch::try_new(Arc::clone(&self.schema), columns)?)
    }
}

pub(super) fn field_salt(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// splitmix64: a fixed, fast mixer, so row n of a generator is reproducible.
pub(super) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

pub(super) fn ints_to_array(v: Vec<i64>, t: &DataType) -> Result<ArrayRef> {
    Ok(match t {
        DataType::Int64 => Arc::new(Int64Array::from(v)),
        DataType::Int32 => Arc::new(Int32Array::from(
            v.into_iter().map(|x| x as i32).collect::<Vec<_>>(),
        )),
        DataType::Int16 => Arc::new(Int16Array::from(
            v.into_iter().map(|x| x as i16).collect::<Vec<_>>(),
        )),
        DataType::Float64 => Arc::new(Float64Array::from(
            v.into_iter().map(|x| x as f64).collect::<Vec<_>>(),
        )),
        DataType::Float32 => Arc::new(Float32Array::from(
            v.into_iter().map(|x| x as f32).collect::<Vec<_>>(),
        )),
        DataType::Boolean => Arc::new(BooleanArray::from(
            v.into_iter().map(|x| x % 2 == 1).collect::<Vec<_>>(),
        )),
        DataType::Utf8 => Arc::new(StringArray::from(
            v.into_iter().map(|x| x.to_string()).collect::<Vec<_>>(),
        )),
        DataType::Date32 => Arc::new(Date32Array::from(
            v.into_iter().map(|x| x as i32).collect::<Vec<_>>(),
        )),
        DataType::Timestamp(TimeUnit::Microsecond, tz) => {
            Arc::new(TimestampMicrosecondArray::from(v).with_timezone_opt(tz.clone()))
        }
        DataType::Decimal128(_, _) => {
            arrow::compute::cast(&(Arc::new(Int64Array::from(v)) as ArrayRef), t)?
        }
        other => {
            return Err(ExecError::invalid(format!(
                "datagen cannot generate {other}"
            )))
        }
    })
}

pub(super) fn cast_strings(v: Vec<&str>, t: &DataType) -> Result<ArrayRef> {
    let arr: ArrayRef = Arc::new(StringArray::from(v));
    if t == &DataType::Utf8 {
        return Ok(arr);
    }
    Ok(arrow::compute::cast(&arr, t)?)
}
