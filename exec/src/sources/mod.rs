//! Sources: where a map task's rows come from.
//!
//! A micro-batch reads a fixed, replayable range of each source partition:
//! `[from, to)` in row offsets. For a built-in stream the range indexes the
//! partition's durable [`Log`]; for `datagen` it indexes the
//! generated sequence (row `n` of a generator is a pure function of `n`), and
//! `to` is how many rows the configured rate has produced by the trigger time.
//!
//! Workers read their source partitions themselves, through [`Source`]: a
//! generator runs on the worker ([`GeneratedPartition`]); a built-in
//! stream's log range is served by the server's Flight endpoint
//! (`worker::LogRange`, see [`crate::dataplane`]). A connector to an external
//! log (Kafka) implements the same trait: a replayable range per partition.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float32Array, Float64Array, Int16Array, Int32Array,
    Int64Array, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use drizzle_planner::StreamDef;

use crate::error::{ExecError, Result};
use crate::log::Log;

mod datagen;
#[allow(unused_imports)]
pub use self::datagen::*;

/// Most rows one map task reads for one micro-batch; a backlog is spread over batches.
pub const MAX_BATCH_ROWS: u64 = 4 << 20;

/// One source partition as a worker reads it.
pub trait Source: Send + Sync {
    /// The rows from offset `from` on that were available at the
    /// micro-batch's trigger time `until_unix_us`, at most
    /// [`MAX_BATCH_ROWS`]: (one past the last row, the rows). The same
    /// `(from, until_unix_us)` reads the same rows every time, so any batch
    /// can be re-run. The future does its I/O and CPU off the caller's
    /// thread: a worker starts it ahead of the task and runs the task once
    /// the rows are in.
    fn read(
        &self,
        from: u64,
        until_unix_us: i64,
    ) -> futures::future::BoxFuture<'static, Result<(u64, Vec<RecordBatch>)>>;
}

/// A datagen partition, generated where it is read.
#[derive(Debug, Clone)]
pub struct GeneratedPartition {
    /// The generator.
    pub generator: Arc<DatagenSource>,
    /// The partition it generates.
    pub partition: u32,
}

impl Source for GeneratedPartition {
    fn read(
        &self,
        from: u64,
        until_unix_us: i64,
    ) -> futures::future::BoxFuture<'static, Result<(u64, Vec<RecordBatch>)>> {
        let g = Arc::clone(&self.generator);
        let p = self.partition;
        Box::pin(async move {
            let to = g
                .available(p, until_unix_us)
                .min(from.saturating_add(MAX_BATCH_ROWS))
                .max(from);
            if to == from {
                return Ok((to, Vec::new()));
            }
            // Generating is CPU work: off the runtime's threads.
            tokio::task::spawn_blocking(move || Ok((to, vec![g.generate(p, from, to)?])))
                .await
                .map_err(|e| ExecError::Unavailable {
                    message: format!("generating rows failed: {e}"),
                })?
        })
    }
}

/// One source partition as the server sees it.
#[derive(Debug, Clone)]
pub enum SourcePartition {
    /// A built-in stream's log partition.
    Log(Arc<crate::log::PartitionLog>),
    /// A datagen generator and the partition it generates.
    Datagen(Arc<DatagenSource>, u32),
    /// A materialized view's output log read as a stream (a view over a
    /// view), as rows of the stream schema `.1` (the log's leading columns;
    /// it also keeps batch ids).
    View(Arc<crate::log::PartitionLog>, SchemaRef),
}

impl SourcePartition {
    /// Offset one past the last row available at `now_us`.
    pub fn available(&self, now_us: i64) -> u64 {
        match self {
            SourcePartition::Log(p) | SourcePartition::View(p, _) => p.end_offset(),
            SourcePartition::Datagen(g, p) => g.available(*p, now_us),
        }
    }

    /// Rows available at time `t_us` (Unix µs), the same answer every time
    /// once the clock has passed `t_us`: where a micro-batch triggered at
    /// `t_us` ends its range (replayable).
    pub fn available_at(&self, t_us: i64) -> u64 {
        match self {
            SourcePartition::Log(p) | SourcePartition::View(p, _) => p.end_at(t_us),
            SourcePartition::Datagen(g, p) => g.available(*p, t_us),
        }
    }

    /// Rows `[from, to)`.
    pub fn read(&self, from: u64, to: u64) -> Result<Vec<RecordBatch>> {
        match self {
            SourcePartition::Log(p) => p.read(from, to),
            SourcePartition::View(p, schema) => {
                let width = schema.fields().len();
                p.read(from, to)?
                    .iter()
                    .map(|b| {
                        let columns = b.columns().get(..width).ok_or_else(|| {
                            ExecError::invalid("a view's log has fewer columns than the view")
                        })?;
                        Ok(RecordBatch::try_new(Arc::clone(schema), columns.to_vec())?)
                    })
                    .collect()
            }
            SourcePartition::Datagen(g, p) => {
                if from >= to {
                    Ok(Vec::new())
                } else {
                    Ok(vec![g.generate(*p, from, to)?])
                }
            }
        }
    }
}

/// Opens the partitions of a stream's source.
pub fn open_source(def: &StreamDef, log: Option<&Arc<Log>>) -> Result<Vec<SourcePartition>> {
    match def.connector() {
        None => {
            let log = log.ok_or_else(|| ExecError::invalid(format!("stream {} has no log", def.name)))?;
            Ok(log.partitions.iter().map(|p| SourcePartition::Log(Arc::clone(p))).collect())
        }
        Some("datagen") => {
            let g = Arc::new(DatagenSource::new(def)?);
            Ok((0..def.partitions.max(1)).map(|p| SourcePartition::Datagen(Arc::clone(&g), p)).collect())
        }
        Some(other) => Err(ExecError::InvalidOption {
            option: "connector".into(),
            message: format!("unknown connector '{other}' (Drizzle has datagen; omit WITH for a built-in stream)"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drizzle_planner::ColumnDef;
    use std::collections::BTreeMap;

    fn def(opts: &[(&str, &str)]) -> StreamDef {
        StreamDef {
            name: "g".into(),
            columns: vec![
                ColumnDef {
                    name: "id".into(),
                    data_type: DataType::Int64,
                    sql_type: "BIGINT".into(),
                    nullable: true,
                },
                ColumnDef {
                    name: "kind".into(),
                    data_type: DataType::Utf8,
                    sql_type: "TEXT".into(),
                    nullable: true,
                },
                ColumnDef {
                    name: "ts".into(),
                    data_type: DataType::Timestamp(TimeUnit::Microsecond, None),
                    sql_type: "TIMESTAMP".into(),
                    nullable: true,
                },
            ],
            watermark: None,
            options: opts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            partitions: 1,
            created_at_ms: 1_000,
        }
    }

    #[test]
    fn datagen_is_deterministic_and_rate_driven() {
        let d = def(&[
            ("connector", "datagen"),
            ("rows_per_second", "1000"),
            ("fields.id.kind", "sequence"),
            ("fields.kind.values", "view,click"),
        ]);
        let g = DatagenSource::new(&d).unwrap();
        assert_eq!(g.available(0, 1_000_000 + 500_000), 500);
        let a = g.generate(0, 10, 20).unwrap();
        let b = g.generate(0, 10, 20).unwrap();
        assert_eq!(a, b);
        let ids = a.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(ids.value(0), 10);
        let ts = a
            .column(2)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .unwrap();
        assert_eq!(ts.value(0), 1_000_000 + 10_000);
    }

    #[test]
    fn bad_datagen_options_are_rejected() {
        assert!(
            DatagenSource::new(&def(&[("connector", "datagen"), ("rows_per_second", "-1")]))
                .is_err()
        );
        assert!(DatagenSource::new(&def(&[
            ("connector", "datagen"),
            ("fields.nope.kind", "random")
        ]))
        .is_err());
        assert!(DatagenSource::new(&def(&[
            ("connector", "datagen"),
            ("fields.id.kind", "zigzag")
        ]))
        .is_err());
    }
}
