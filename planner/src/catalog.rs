//! Definitions of the objects in the catalog: streams, tables and
//! materialized views. The server persists them; the planner and the runtime
//! read them.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};

/// One column of a stream or table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnDef {
    /// Column name (lower-cased unless quoted).
    pub name: String,
    /// The Arrow type the column is stored as.
    pub data_type: DataType,
    /// The SQL type as the user wrote it (for `SHOW CREATE STREAM`).
    pub sql_type: String,
    /// False when declared `NOT NULL`.
    pub nullable: bool,
}

/// A SQL function: `CREATE FUNCTION name(arg type, ...) RETURNS type
/// LANGUAGE SQL AS 'SELECT expr'`. Its body is one expression over its
/// arguments; a call is replaced by the body (inlined) when a query is
/// planned, so it runs as fast as the expression written out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionDef {
    /// Function name (lower-cased unless quoted).
    pub name: String,
    /// The arguments: name and type.
    pub args: Vec<ColumnDef>,
    /// The result type.
    pub returns: ColumnDef,
    /// The body: one expression over the arguments, as SQL.
    pub body: String,
}

/// `WATERMARK FOR column AS column - INTERVAL ...`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatermarkSpec {
    /// The event-time column.
    pub column: String,
    /// How far the watermark trails the largest event time seen, in milliseconds.
    pub delay_ms: i64,
}

/// A declared stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamDef {
    /// Stream name.
    pub name: String,
    /// Columns in declaration order.
    pub columns: Vec<ColumnDef>,
    /// Optional event-time watermark.
    pub watermark: Option<WatermarkSpec>,
    /// `WITH (...)` options, keys lower-cased. `connector` picks the source.
    pub options: BTreeMap<String, String>,
    /// Number of partitions of the source.
    pub partitions: u32,
    /// Creation time (Unix ms); datagen streams count generated rows from here.
    pub created_at_ms: i64,
    /// A processing-time column, `name AS PROCTIME()`: not stored or
    /// generated, but filled in when a micro-batch reads the stream with
    /// the batch's trigger time. It comes after [`columns`](Self::columns).
    #[serde(default)]
    pub proctime: Option<String>,
}

/// The type of a processing-time column: `TIMESTAMPTZ`.
pub fn proctime_type() -> DataType {
    DataType::Timestamp(
        arrow::datatypes::TimeUnit::Microsecond,
        Some("+00:00".into()),
    )
}

impl StreamDef {
    /// The Arrow schema of the stream's rows as queries see them: the
    /// stored columns, then the processing-time column if there is one.
    pub fn schema(&self) -> SchemaRef {
        match &self.proctime {
            None => columns_schema(&self.columns),
            Some(name) => {
                let mut fields: Vec<Field> = self
                    .columns
                    .iter()
                    .map(|c| Field::new(&c.name, c.data_type.clone(), c.nullable))
                    .collect();
                fields.push(Field::new(name, proctime_type(), false));
                Arc::new(Schema::new(fields))
            }
        }
    }

    /// The schema of the rows a source produces and a stream's log
    /// stores: the declared columns without the processing-time column.
    pub fn source_schema(&self) -> SchemaRef {
        columns_schema(&self.columns)
    }

    /// The connector name, `None` for a built-in (INSERT-fed) stream.
    pub fn connector(&self) -> Option<&str> {
        self.options.get("connector").map(String::as_str)
    }
}

/// A reference-data table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableDef {
    /// Table name.
    pub name: String,
    /// Columns in declaration order.
    pub columns: Vec<ColumnDef>,
}

impl TableDef {
    /// The Arrow schema of the table's rows.
    pub fn schema(&self) -> SchemaRef {
        columns_schema(&self.columns)
    }
}

/// A materialized view: a continuous query whose results are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViewDef {
    /// View name.
    pub name: String,
    /// The defining `SELECT`, as SQL text.
    pub query: String,
    /// The batch interval it runs with, in microseconds.
    pub batch_interval_us: u64,
    /// Number of reduce partitions.
    pub parallelism: u32,
    /// Source offsets the view starts from, per partition (replayable).
    #[serde(default)]
    pub start_offsets: Vec<u64>,
    /// Start offsets of further stream inputs (a window join's right stream).
    #[serde(default)]
    pub more_start_offsets: Vec<Vec<u64>>,
    /// Group size it runs with.
    #[serde(default = "default_group_size")]
    pub group_size: u32,
    /// Its time origin (Unix µs): batch `b` triggers at
    /// `origin + interval * (b + 1)` in every run, so batch ids and source
    /// ranges stay the same across restarts. `None` in catalogs written
    /// before checkpoints existed (the view then starts over at "now").
    #[serde(default)]
    pub origin_unix_us: Option<i64>,
    /// `SET state_ttl` when it was made, in µs (0: none).
    #[serde(default)]
    pub state_ttl_us: u64,
}

fn default_group_size() -> u32 {
    10
}

/// Builds the Arrow schema for a column list.
pub fn columns_schema(columns: &[ColumnDef]) -> SchemaRef {
    Arc::new(Schema::new(
        columns
            .iter()
            .map(|c| Field::new(&c.name, c.data_type.clone(), c.nullable))
            .collect::<Vec<_>>(),
    ))
}
