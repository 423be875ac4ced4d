//! DataFusion table providers over Drizzle's finite relations: tables (their
//! durable log) and materialized views (their current contents).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::compute::interleave_record_batch;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use arrow::row::{OwnedRow, RowConverter, SortField};
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use drizzle_exec::log::Log;
use parking_lot::Mutex;

/// A table: every row appended to its log.
#[derive(Debug)]
pub struct TableLogProvider {
    schema: SchemaRef,
    log: Arc<Log>,
}

impl TableLogProvider {
    /// A provider over `log`.
    pub fn new(schema: SchemaRef, log: Arc<Log>) -> Self {
        Self { schema, log }
    }
}

#[async_trait]
impl TableProvider for TableLogProvider {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let batches = self
            .log
            .read_all()
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(MemorySourceConfig::try_new_exec(
            &[batches],
            Arc::clone(&self.schema),
            projection.cloned(),
        )?)
    }
}

/// How a view keeps its rows.
enum ViewRows {
    /// Every emitted row, in emit order.
    Append(Vec<RecordBatch>),
    /// The latest row per key.
    Upsert(UpsertRows),
    /// A multiset: rows with how many times each is in the view (a result
    /// without a key, fed `insert` and `delete` changes).
    Multiset(MultisetRows),
}

struct MultisetRows {
    /// Over the view's columns (without `op`).
    converter: RowConverter,
    /// Row → how many times it is in the view (never 0: such rows go). A
    /// count may be negative in between (a delete applied before the
    /// insert it cancels); only positive counts are shown.
    counts: HashMap<OwnedRow, i64>,
}

struct UpsertRows {
    keys: Vec<usize>,
    converter: RowConverter,
    batches: Vec<RecordBatch>,
    /// Key → (batch, row) of its latest version.
    latest: HashMap<OwnedRow, (usize, usize)>,
    /// Insertion order of keys, for a stable scan order.
    order: Vec<OwnedRow>,
}

/// The contents of a materialized view, fed by its continuous query.
pub struct ViewStore {
    /// The rows as the query emits them (an `op` column last, for an
    /// aggregate over changes).
    rows_schema: SchemaRef,
    /// The view's columns (without `op`).
    schema: SchemaRef,
    /// Index of the `op` column: rows whose `op` is `delete` remove their
    /// key.
    op_column: Option<usize>,
    rows: Mutex<ViewRows>,
    /// The last micro-batch applied (for SHOW and tests).
    pub last_batch: Mutex<Option<u64>>,
    /// Set when the view's query failed.
    pub error: Mutex<Option<String>>,
    /// The view's durable output log: every applied batch's rows plus its
    /// batch id, so a restart restores the contents and knows the last
    /// batch applied (results of batches up to it are not applied twice).
    log: Option<Arc<drizzle_exec::log::PartitionLog>>,
    /// A column whose values never decrease over the emitted rows (a window
    /// bound of a windowed query): a view reading this one uses it as its
    /// event time, with a watermark of its largest value seen.
    pub event_time: Option<String>,
}

/// Name of the batch-id column of a view's output log.
const BATCH_COLUMN: &str = "__drizzle_batch";

impl std::fmt::Debug for ViewStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewStore")
            .field("schema", &self.schema)
            .finish()
    }
}

impl ViewStore {
    /// An append view (append and windowed queries).
    pub fn append(schema: SchemaRef) -> Self {
        Self {
            rows_schema: Arc::clone(&schema),
            op_column: None,
            schema,
            rows: Mutex::new(ViewRows::Append(Vec::new())),
            last_batch: Mutex::new(None),
            error: Mutex::new(None),
            log: None,
            event_time: None,
        }
    }

    /// Makes the store durable: replays the output log at `path` (created if
    /// missing) into it, then logs every batch applied from here on.
    pub fn with_log(mut self, path: std::path::PathBuf) -> Result<Self, drizzle_exec::ExecError> {
        let mut fields: Vec<arrow::datatypes::FieldRef> =
            self.rows_schema.fields().iter().cloned().collect();
        fields.push(Arc::new(arrow::datatypes::Field::new(
            BATCH_COLUMN,
            arrow::datatypes::DataType::UInt64,
            false,
        )));
        let schema = Arc::new(arrow::datatypes::Schema::new(fields));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| drizzle_exec::ExecError::io(dir, e))?;
        }
        let log = drizzle_exec::log::PartitionLog::open(path, schema, false)?;
        let width = self.rows_schema.fields().len();
        for logged in log.read(0, log.end_offset())? {
            let ids = logged
                .column(width)
                .as_any()
                .downcast_ref::<arrow::array::UInt64Array>()
                .ok_or_else(|| drizzle_exec::ExecError::invalid("view log batch ids"))?;
            let Some(batch_id) = ids.iter().flatten().max() else {
                continue;
            };
            let rows = RecordBatch::try_new(
                Arc::clone(&self.rows_schema),
                logged.columns()[..width].to_vec(),
            )?;
            self.apply(batch_id, rows)?;
        }
        self.log = Some(Arc::new(log));
        Ok(self)
    }

    /// An upsert view keyed by the output columns `keys`; with `op`, the
    /// rows end with an `op` column, and `delete` removes a key; with
    /// `rank`, the last column before it is a top-N's rank, the key, which
    /// the view does not show.
    pub fn upsert(
        schema: SchemaRef,
        keys: Vec<usize>,
        op: bool,
        rank: bool,
    ) -> Result<Self, arrow::error::ArrowError> {
        let converter = RowConverter::new(
            keys.iter()
                .map(|&k| SortField::new(schema.field(k).data_type().clone()))
                .collect(),
        )?;
        let width = schema.fields().len();
        let op_column = (op && width > 0).then(|| width - 1);
        let shown = width - usize::from(op_column.is_some()) - usize::from(rank && width > 1);
        let visible = if shown == width {
            Arc::clone(&schema)
        } else {
            Arc::new(schema.project(&(0..shown).collect::<Vec<_>>())?)
        };
        Ok(Self {
            rows_schema: Arc::clone(&schema),
            op_column,
            schema: visible,
            rows: Mutex::new(ViewRows::Upsert(UpsertRows {
                keys,
                converter,
                batches: Vec::new(),
                latest: HashMap::new(),
                order: Vec::new(),
            })),
            last_batch: Mutex::new(None),
            error: Mutex::new(None),
            log: None,
            event_time: None,
        })
    }

    /// A view of a result without a key that changes (`EmitMode::Changes`):
    /// the rows end with an `op` column, `insert` or `delete`, and the view
    /// holds every row inserted and not deleted.
    pub fn changes(schema: SchemaRef) -> Result<Self, arrow::error::ArrowError> {
        let width = schema.fields().len();
        if width < 2 {
            return Err(arrow::error::ArrowError::SchemaError(
                "a changing view without columns".into(),
            ));
        }
        let visible = Arc::new(schema.project(&(0..width - 1).collect::<Vec<_>>())?);
        let converter = RowConverter::new(
            visible
                .fields()
                .iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect(),
        )?;
        Ok(Self {
            rows_schema: Arc::clone(&schema),
            op_column: Some(width - 1),
            schema: visible,
            rows: Mutex::new(ViewRows::Multiset(MultisetRows {
                converter,
                counts: HashMap::new(),
            })),
            last_batch: Mutex::new(None),
            error: Mutex::new(None),
            log: None,
            event_time: None,
        })
    }

    /// The view's schema.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// True when the view only ever adds rows (append and windowed
    /// queries), so its output log is a stream another view can read.
    pub fn is_append(&self) -> bool {
        matches!(&*self.rows.lock(), ViewRows::Append(_))
    }

    /// The durable output log (the view's rows then a batch-id column).
    pub fn output_log(&self) -> Option<Arc<drizzle_exec::log::PartitionLog>> {
        self.log.clone()
    }

    /// Applies one micro-batch's output (durably first, if the store has a
    /// log).
    pub fn apply(&self, batch_id: u64, batch: RecordBatch) -> Result<(), drizzle_exec::ExecError> {
        if let (Some(log), true) = (&self.log, batch.num_rows() > 0) {
            let mut columns = batch.columns().to_vec();
            columns.push(Arc::new(arrow::array::UInt64Array::from(vec![
                batch_id;
                batch
                    .num_rows(
                    )
            ])));
            let logged = RecordBatch::try_new(Arc::clone(log.schema()), columns)?;
            log.append(&logged)?;
        }
        let mut rows = self.rows.lock();
        match &mut *rows {
            ViewRows::Multiset(m) => {
                let width = self.schema.fields().len();
                let values = m.converter.convert_columns(&batch.columns()[..width])?;
                let ops = batch
                    .column(width)
                    .as_any()
                    .downcast_ref::<arrow::array::StringArray>()
                    .ok_or_else(|| drizzle_exec::ExecError::invalid("a view's op column"))?;
                for (i, row) in values.iter().enumerate() {
                    let change = if ops.value(i) == "delete" { -1 } else { 1 };
                    let key = row.owned();
                    let c = m.counts.entry(key.clone()).or_default();
                    *c += change;
                    if *c == 0 {
                        m.counts.remove(&key);
                    }
                }
            }
            ViewRows::Append(v) => {
                if batch.num_rows() > 0 {
                    v.push(batch);
                }
            }
            ViewRows::Upsert(u) if u.keys.is_empty() => {
                // A global aggregate (no GROUP BY): one row, the latest.
                if batch.num_rows() > 0 {
                    u.batches = vec![batch.slice(batch.num_rows() - 1, 1)];
                }
            }
            ViewRows::Upsert(u) => {
                if batch.num_rows() > 0 {
                    let cols: Vec<_> = u
                        .keys
                        .iter()
                        .map(|&k| Arc::clone(batch.column(k)))
                        .collect();
                    let keys = u.converter.convert_columns(&cols)?;
                    let b = u.batches.len();
                    for row in 0..batch.num_rows() {
                        let key = keys.row(row).owned();
                        if u.latest.insert(key.clone(), (b, row)).is_none() {
                            u.order.push(key);
                        }
                    }
                    u.batches.push(batch);
                    // Compact when most stored rows are stale.
                    let stored: usize = u.batches.iter().map(|b| b.num_rows()).sum();
                    if stored > 1024 && stored > 4 * u.latest.len() {
                        let snapshot = snapshot_upsert(u, &self.rows_schema)?;
                        u.batches = vec![snapshot];
                        for (i, key) in u.order.iter().enumerate() {
                            u.latest.insert(key.clone(), (0, i));
                        }
                    }
                }
            }
        }
        *self.last_batch.lock() = Some(batch_id);
        Ok(())
    }

    /// The current contents.
    pub fn snapshot(&self) -> Result<Vec<RecordBatch>, arrow::error::ArrowError> {
        let rows = self.rows.lock();
        match &*rows {
            ViewRows::Append(v) => Ok(v.clone()),
            ViewRows::Multiset(m) => {
                if !m.counts.values().any(|c| *c > 0) {
                    return Ok(Vec::new());
                }
                let rows = m
                    .counts
                    .iter()
                    .flat_map(|(r, c)| std::iter::repeat_n(r.row(), (*c).max(0) as usize));
                let columns = m.converter.convert_rows(rows)?;
                Ok(vec![RecordBatch::try_new(
                    Arc::clone(&self.schema),
                    columns,
                )?])
            }
            ViewRows::Upsert(u) => {
                let latest = snapshot_upsert(u, &self.rows_schema)?;
                let shown = self.schema.fields().len();
                let Some(op) = self.op_column else {
                    if shown == latest.num_columns() {
                        return Ok(vec![latest]);
                    }
                    return Ok(vec![latest.project(&(0..shown).collect::<Vec<_>>())?]);
                };
                // Keys whose latest row deletes them are gone.
                let ops = latest
                    .column(op)
                    .as_any()
                    .downcast_ref::<arrow::array::StringArray>()
                    .ok_or_else(|| {
                        arrow::error::ArrowError::SchemaError(
                            "a view's op column is not text".into(),
                        )
                    })?;
                let live: arrow::array::BooleanArray =
                    ops.iter().map(|o| Some(o != Some("delete"))).collect();
                let kept = arrow::compute::filter_record_batch(&latest, &live)?;
                Ok(vec![kept.project(&(0..shown.min(op)).collect::<Vec<_>>())?])
            }
        }
    }
}

fn snapshot_upsert(
    u: &UpsertRows,
    schema: &SchemaRef,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    if u.keys.is_empty() {
        return Ok(u
            .batches
            .last()
            .cloned()
            .unwrap_or_else(|| RecordBatch::new_empty(Arc::clone(schema))));
    }
    if u.order.is_empty() {
        return Ok(RecordBatch::new_empty(Arc::clone(schema)));
    }
    let indices: Vec<(usize, usize)> = u
        .order
        .iter()
        .filter_map(|k| u.latest.get(k).copied())
        .collect();
    let refs: Vec<&RecordBatch> = u.batches.iter().collect();
    interleave_record_batch(&refs, &indices)
}

/// A materialized view as a finite relation.
#[derive(Debug)]
pub struct ViewProvider {
    store: Arc<ViewStore>,
}

impl ViewProvider {
    /// A provider over `store`.
    pub fn new(store: Arc<ViewStore>) -> Self {
        Self { store }
    }
}

#[async_trait]
impl TableProvider for ViewProvider {
    fn schema(&self) -> SchemaRef {
        Arc::clone(self.store.schema())
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if let Some(e) = self.store.error.lock().clone() {
            return Err(DataFusionError::Execution(format!(
                "materialized view failed: {e}"
            )));
        }
        let batches = self.store.snapshot()?;
        Ok(MemorySourceConfig::try_new_exec(
            &[batches],
            self.schema(),
            projection.cloned(),
        )?)
    }
}
