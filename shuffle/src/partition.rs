//! Hash partitioning of record batches by key columns.

use arrow::array::{ArrayRef, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::record_batch::RecordBatch;
use datafusion::common::hash_utils::create_hashes;

use crate::error::{Result, ShuffleError};

/// The fixed hash seed: every process must route a key to the same reduce
/// partition, so the hasher cannot be randomly seeded.
fn random_state() -> datafusion::common::hash_utils::RandomState {
    datafusion::common::hash_utils::RandomState::with_seed(0x6472_697a_7a6c_6521)
}

/// Splits `batch` into `partitions` batches by the hash of `keys` (columns
/// evaluated over `batch`). Partition `i` of the result holds the rows whose
/// key hashes to `i`; rows keep their relative order. Empty partitions are
/// empty batches, so the result always has `partitions` entries.
pub fn hash_partition(
    batch: &RecordBatch,
    keys: &[ArrayRef],
    partitions: usize,
) -> Result<Vec<RecordBatch>> {
    let partitions = partitions.max(1);
    if partitions == 1 || batch.num_rows() == 0 {
        let mut out = vec![batch.clone()];
        out.extend((1..partitions).map(|_| batch.slice(0, 0)));
        return Ok(out);
    }
    let mut hashes = vec![0u64; batch.num_rows()];
    create_hashes(keys, &random_state(), &mut hashes)
        .map_err(|source| ShuffleError::Partition { source })?;
    let mut indices: Vec<Vec<u32>> = vec![Vec::new(); partitions];
    for (row, hash) in hashes.iter().enumerate() {
        indices[(*hash % partitions as u64) as usize].push(row as u32);
    }
    indices
        .into_iter()
        .map(|idx| {
            take_record_batch(batch, &UInt32Array::from(idx)).map_err(|source| {
                ShuffleError::Arrow {
                    context: "partition",
                    source,
                }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::collections::HashMap;
    use std::sync::Arc;

    #[test]
    fn same_key_same_partition_and_all_rows_kept() {
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
        let keys: Vec<i64> = (0..1000).map(|i| i % 37).collect();
        let col: ArrayRef = Arc::new(Int64Array::from(keys));
        let batch = RecordBatch::try_new(schema, vec![Arc::clone(&col)]).unwrap();
        let parts = hash_partition(&batch, &[col], 4).unwrap();
        assert_eq!(parts.len(), 4);
        assert_eq!(parts.iter().map(|p| p.num_rows()).sum::<usize>(), 1000);
        let mut home: HashMap<i64, usize> = HashMap::new();
        for (p, part) in parts.iter().enumerate() {
            let k = part
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap();
            for i in 0..k.len() {
                assert_eq!(
                    *home.entry(k.value(i)).or_insert(p),
                    p,
                    "key split across partitions"
                );
            }
        }
        assert!(
            home.values()
                .collect::<std::collections::HashSet<_>>()
                .len()
                > 1
        );
    }
}
