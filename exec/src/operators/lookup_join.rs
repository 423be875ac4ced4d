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
    /// [`TableEvaluator::version`] when last checked.
    seen: u64,
    /// The version of the rows.
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
    let seen = tables.version(spec);
    let held = match joins.tables.get(&op_index) {
        Some(t) if t.seen == seen => Some(None),
        Some(t) => Some(Some(t.version)),
        None => None,
    };
    let fresh = match held {
        Some(None) => None,
        Some(Some(version)) => match tables.evaluate(spec, Some(version))? {
            None => {
                if let Some(t) = joins.tables.get_mut(&op_index) {
                    t.seen = seen;
                }
                None
            }
            rows => rows,
        },
        None => Some(tables.evaluate(spec, None)?.ok_or_else(|| {
            ExecError::invalid("a lookup join's table came back unchanged before it was read")
        })?),
    };
    if let Some((version, batches)) = fresh {
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
                seen,
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

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{Field, Schema};
    use datafusion::common::DFSchema;
    use datafusion::logical_expr::{EmptyRelation, LogicalPlan};
    use datafusion::physical_expr::expressions::Column;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Relations as a signal and per-join versions, as the coordinator
    /// answers remote workers: the signal moves on any change, the rows'
    /// version only when the join's own relation changes.
    #[derive(Default)]
    struct Versions {
        signal: AtomicU64,
        mine: AtomicU64,
        reads: AtomicU64,
    }

    impl TableEvaluator for Versions {
        fn version(&self, _spec: &LookupJoinSpec) -> u64 {
            self.signal.load(Ordering::SeqCst)
        }

        fn any_version(&self) -> u64 {
            self.signal.load(Ordering::SeqCst)
        }

        fn evaluate(
            &self,
            spec: &LookupJoinSpec,
            held: Option<u64>,
        ) -> Result<Option<(u64, Vec<RecordBatch>)>> {
            let v = self.mine.load(Ordering::SeqCst);
            if held == Some(v) {
                return Ok(None);
            }
            self.reads.fetch_add(1, Ordering::SeqCst);
            let rows = RecordBatch::try_new(
                Arc::clone(&spec.table_schema),
                vec![Arc::new(Int64Array::from(vec![1, 2, v as i64 + 10]))],
            )?;
            Ok(Some((v, vec![rows])))
        }
    }

    #[test]
    fn a_join_rereads_its_table_only_when_a_relation_it_reads_changed() {
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, true)]));
        let joined = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("t", DataType::Int64, true),
        ]));
        let table_schema = Arc::new(Schema::new(vec![Field::new("t", DataType::Int64, true)]));
        let spec = LookupJoinSpec {
            id: 0,
            table_plan: LogicalPlan::EmptyRelation(EmptyRelation {
                produce_one_row: false,
                schema: Arc::new(DFSchema::try_from(table_schema.as_ref().clone()).unwrap()),
            }),
            relations: vec!["t".into()],
            table_schema,
            stream_keys: vec![Arc::new(Column::new("k", 0))],
            table_keys: vec![Arc::new(Column::new("t", 0))],
            join_type: JoinType::Inner,
            stream_on_left: true,
            filter: None,
            schema: joined,
            display: String::new(),
        };
        let stream = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from(vec![1, 11, 12]))],
        )
        .unwrap();
        let tables = Versions::default();
        let mut cache = JoinCache::default();
        let run = |cache: &mut JoinCache| lookup_join(0, &spec, &stream, cache, &tables).unwrap();
        // Version 1: rows 1, 2, 11.
        tables.mine.store(1, Ordering::SeqCst);
        assert_eq!(run(&mut cache).num_rows(), 2);
        assert_eq!(run(&mut cache).num_rows(), 2);
        assert_eq!(
            tables.reads.load(Ordering::SeqCst),
            1,
            "cached while nothing changed"
        );
        // Another relation changed: the signal moves, the rows are current.
        tables.signal.store(5, Ordering::SeqCst);
        assert_eq!(run(&mut cache).num_rows(), 2);
        assert_eq!(run(&mut cache).num_rows(), 2);
        assert_eq!(
            tables.reads.load(Ordering::SeqCst),
            1,
            "not re-read for another relation"
        );
        // Its own relation changed: re-read once (rows 1, 2, 12).
        tables.mine.store(2, Ordering::SeqCst);
        tables.signal.store(6, Ordering::SeqCst);
        let out = run(&mut cache);
        assert_eq!(out.num_rows(), 2);
        assert_eq!(
            out.column(1)
                .as_primitive::<arrow::datatypes::Int64Type>()
                .values()
                .to_vec(),
            vec![1, 12]
        );
        run(&mut cache);
        assert_eq!(tables.reads.load(Ordering::SeqCst), 2);
    }
}
