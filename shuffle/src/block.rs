//! The block format: one Arrow IPC stream (schema message, record batches,
//! end-of-stream marker) per block. The same bytes are what Arrow Flight
//! carries between workers, so a local read and a remote read decode alike.

use std::io::Cursor;

use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;

use crate::error::{Result, ShuffleError};

/// Encodes `batches` (all of `schema`) into one IPC stream block.
pub fn encode_block(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Bytes> {
    let wrap = |source| ShuffleError::Arrow {
        context: "encode",
        source,
    };
    let mut writer = StreamWriter::try_new(Vec::new(), schema).map_err(wrap)?;
    for batch in batches {
        writer.write(batch).map_err(wrap)?;
    }
    writer.finish().map_err(wrap)?;
    Ok(Bytes::from(writer.into_inner().map_err(wrap)?))
}

/// Decodes a block written by [`encode_block`].
pub fn decode_block(bytes: &Bytes) -> Result<Vec<RecordBatch>> {
    let wrap = |source| ShuffleError::Arrow {
        context: "decode",
        source,
    };
    let reader = StreamReader::try_new(Cursor::new(bytes.as_ref()), None).map_err(wrap)?;
    reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(wrap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    #[test]
    fn round_trip_keeps_rows_and_schema() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3])),
                Arc::new(StringArray::from(vec![Some("a"), None, Some("c")])),
            ],
        )
        .unwrap();
        let bytes = encode_block(&schema, &[batch.clone(), batch.slice(1, 2)]).unwrap();
        let back = decode_block(&bytes).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0], batch);
        assert_eq!(back[1], batch.slice(1, 2));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode_block(&Bytes::from_static(b"not arrow at all")).is_err());
    }
}
