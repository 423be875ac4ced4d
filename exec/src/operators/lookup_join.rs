//! `LookupJoinExec`: an equi-join of each stream row against a finite
//! relation, whose hash table is cached until a table it reads changes.

use super::*;

/// Per-task cache of the hash tables of lookup joins.
#[derive(Default)]
pub struct JoinCache {
    tables: HashMap<usize, BuiltTable>,
}

impl JoinCache {
    /// Memory held by the built tables (rows and hash indexes).
    pub fn size(&self) -> StateSize {
        let mut size = StateSize::default();
        for t in self.tables.values() {
            let index = match &t.index {
                KeyIndex::Int(m) => {
                    m.capacity() * (size_of::<(i64, Vec<u32>)>() + 1)
                        + m.values().map(|v| v.capacity() * 4).sum::<usize>()
                }
                KeyIndex::Rows { converter, index } => {
                    converter.size()
                        + index.capacity() * (size_of::<(Box<[u8]>, Vec<u32>)>() + 1)
                        + index
                            .iter()
                            .map(|(k, v)| k.len() + v.capacity() * 4)
                            .sum::<usize>()
                }
            };
            size += StateSize {
                bytes: t.batch.get_array_memory_size() as u64 + index as u64,
                keys: t.batch.num_rows() as u64,
            };
        }
        size
    }
}

pub(super) struct BuiltTable {
    version: u64,
    batch: RecordBatch,
    index: KeyIndex,
}

/// Table rows by join key.
pub(super) enum KeyIndex {
    /// One integer key: hashed as i64, no row encoding.
    Int(HashMap<i64, Vec<u32>>),
    /// Any other key: arrow's row format.
    Rows {
        converter: RowConverter,
        index: RowIndex,
    },
}

pub(super) fn int_key(array: &ArrayRef) -> Option<ArrayRef> {
    match array.data_type() {
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32 => arrow::compute::cast(array, &DataType::Int64).ok(),
        _ => None,
    }
}

/// Row numbers by key, in arrow's row format.
pub(super) type RowIndex = HashMap<Box<[u8]>, Vec<u32>>;

/// Rows by their key (arrow's row format); rows with a NULL key are left
/// out (they never match). Returns the converter to encode probe keys.
pub(super) fn row_key_index(keys: &[ArrayRef], rows: usize) -> Result<(RowConverter, RowIndex)> {
    let converter = RowConverter::new(
        keys.iter()
            .map(|k| SortField::new(k.data_type().clone()))
            .collect(),
    )?;
    let encoded = converter.convert_columns(keys)?;
    let mut index: RowIndex = HashMap::new();
    for row in 0..rows {
        if keys.iter().any(|k| k.is_null(row)) {
            continue;
        }
        index
            .entry(encoded.row(row).as_ref().into())
            .or_default()
            .push(row as u32);
    }
    Ok((converter, index))
}

pub(super) fn lookup_join(
    op_index: usize,
    spec: &LookupJoinSpec,
    batch: &RecordBatch,
    joins: &mut JoinCache,
    tables: &dyn TableEvaluator,
) -> Result<RecordBatch> {
    let version = tables.version();
    let stale = joins
        .tables
        .get(&op_index)
        .is_none_or(|t| t.version != version);
    if stale {
        let batches = tables.evaluate(spec)?;
        let table = arrow::compute::concat_batches(&spec.table_schema, &batches)?;
        let keys = spec
            .table_keys
            .iter()
            .map(|e| eval(e, &table))
            .collect::<Result<Vec<_>>>()?;
        let index = match (keys.len(), keys.first().and_then(int_key)) {
            (1, Some(k)) => {
                let k = k.as_primitive::<arrow::datatypes::Int64Type>();
                let mut index: HashMap<i64, Vec<u32>> = HashMap::with_capacity(k.len());
                for row in 0..k.len() {
                    if k.is_valid(row) {
                        index.entry(k.value(row)).or_default().push(row as u32);
                    }
                }
                KeyIndex::Int(index)
            }
            _ => {
                let (converter, index) = row_key_index(&keys, table.num_rows())?;
                KeyIndex::Rows { converter, index }
            }
        };
        joins.tables.insert(
            op_index,
            BuiltTable {
                version,
                batch: table,
                index,
            },
        );
    }
    let built = joins
        .tables
        .get(&op_index)
        .ok_or_else(|| ExecError::invalid("lookup join table missing"))?;
    let keys = spec
        .stream_keys
        .iter()
        .map(|e| eval(e, batch))
        .collect::<Result<Vec<_>>>()?;
    let mut stream_idx: Vec<u32> = Vec::with_capacity(batch.num_rows());
    let mut table_idx: Vec<Option<u32>> = Vec::with_capacity(batch.num_rows());
    let left = spec.join_type == JoinType::Left;
    let mut emit = |row: usize, matches: Option<&Vec<u32>>| match matches {
        Some(m) => {
            for &t in m {
                stream_idx.push(row as u32);
                table_idx.push(Some(t));
            }
        }
        None if left => {
            stream_idx.push(row as u32);
            table_idx.push(None);
        }
        None => {}
    };
    // The table side's key types are the same after DataFusion's coercion.
    match &built.index {
        KeyIndex::Int(index) => {
            let k = int_key(&keys[0])
                .ok_or_else(|| ExecError::invalid("join key is not an integer"))?;
            let k = k.as_primitive::<arrow::datatypes::Int64Type>();
            for row in 0..batch.num_rows() {
                emit(
                    row,
                    if k.is_null(row) {
                        None
                    } else {
                        index.get(&k.value(row))
                    },
                );
            }
        }
        KeyIndex::Rows { converter, index } => {
            let rows = converter.convert_columns(&keys)?;
            for row in 0..batch.num_rows() {
                let null = keys.iter().any(|k| k.is_null(row));
                emit(
                    row,
                    if null {
                        None
                    } else {
                        index.get(rows.row(row).as_ref())
                    },
                );
            }
        }
    }
    let stream_part = take_record_batch(batch, &UInt32Array::from(stream_idx))?;
    let table_indices = UInt32Array::from(table_idx);
    let table_cols = built
        .batch
        .columns()
        .iter()
        .map(|c| take(c.as_ref(), &table_indices, None))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut columns = Vec::with_capacity(spec.schema.fields().len());
    if spec.stream_on_left {
        columns.extend(stream_part.columns().iter().cloned());
        columns.extend(table_cols);
    } else {
        columns.extend(table_cols);
        columns.extend(stream_part.columns().iter().cloned());
    }
    let joined = RecordBatch::try_new_with_options(
        Arc::clone(&spec.schema),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(stream_part.num_rows())),
    )?;
    match &spec.filter {
        Some(f) => {
            let mask = as_mask(&eval(f, &joined)?)?;
            Ok(filter_record_batch(&joined, &mask)?)
        }
        None => Ok(joined),
    }
}
