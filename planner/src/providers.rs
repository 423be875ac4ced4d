//! DataFusion table providers that stand for Drizzle relations while a query
//! is planned.
//!
//! A [`StreamProvider`] marks a stream in a logical plan; it cannot be scanned
//! by DataFusion (a stream is unbounded), only lowered by [`crate::lower`].
//! A [`WindowProvider`] is what `TUMBLE(...)` / `HOP(...)` in a `FROM` clause
//! resolve to: the stream's columns plus `window_start` and `window_end`.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;

use crate::catalog::StreamDef;

/// A stream, as a relation in a logical plan.
#[derive(Debug)]
pub struct StreamProvider {
    /// The stream's definition.
    pub def: StreamDef,
    schema: SchemaRef,
}

impl StreamProvider {
    /// Wraps a stream definition.
    pub fn new(def: StreamDef) -> Self {
        let schema = def.schema();
        Self { def, schema }
    }
}

#[async_trait]
impl TableProvider for StreamProvider {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        _projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Err(DataFusionError::Plan(format!(
            "stream {} is unbounded and can only be read by a continuous query",
            self.def.name
        )))
    }
}

/// The kind of window a window table function assigns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WindowKind {
    /// `TUMBLE(stream, ts, size)`: fixed, non-overlapping windows.
    Tumble,
    /// `HOP(stream, ts, slide, size)`: fixed windows every `slide`.
    Hop,
    /// `SESSION(stream, ts, gap)`: per key of the aggregation over it, the
    /// maximal runs of rows less than `gap` apart. The assigner gives each
    /// row the provisional window `[ts, ts + gap)`; the aggregation merges
    /// the windows that overlap.
    Session,
}

/// A window assignment over a stream's event-time column.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WindowSpec {
    /// Tumble, hop or session.
    pub kind: WindowKind,
    /// Index of the event-time column in the stream's schema.
    pub time_column: usize,
    /// Name of the event-time column.
    pub time_column_name: String,
    /// Window size in milliseconds (a session's gap).
    pub size_ms: i64,
    /// Distance between window starts in milliseconds (= size for TUMBLE).
    pub slide_ms: i64,
    /// The stream's watermark delay in milliseconds.
    pub watermark_delay_ms: i64,
    /// The time column is the stream's processing-time column: every row
    /// of a micro-batch has the batch's trigger time, and the watermark
    /// moves to it with every batch, rows or none.
    #[serde(default)]
    pub processing_time: bool,
}

/// `TUMBLE(...)` / `HOP(...)` / `SESSION(...)` as a relation: stream columns + window bounds.
#[derive(Debug)]
pub struct WindowProvider {
    /// The stream windowed.
    pub stream: StreamDef,
    /// The window assignment.
    pub spec: WindowSpec,
    schema: SchemaRef,
}

impl WindowProvider {
    /// Builds the provider; the window columns take the event-time column's type.
    pub fn new(stream: StreamDef, spec: WindowSpec) -> Self {
        let base = stream.schema();
        let ts_type = match base.field(spec.time_column).data_type() {
            DataType::Timestamp(_, tz) => DataType::Timestamp(TimeUnit::Microsecond, tz.clone()),
            other => other.clone(),
        };
        let mut fields: Vec<Field> = base.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new("window_start", ts_type.clone(), false));
        fields.push(Field::new("window_end", ts_type, false));
        Self {
            stream,
            spec,
            schema: Arc::new(Schema::new(fields)),
        }
    }
}

#[async_trait]
impl TableProvider for WindowProvider {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        _projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Err(DataFusionError::Plan(format!(
            "window over stream {} can only be read by a continuous query",
            self.stream.name
        )))
    }
}
