//! The engine: executes statements against the catalog and the runtime.
//!
//! Sessions ([`crate::session`]) own the wire protocol and per-connection
//! state (settings, cursors, portals); everything that changes shared state
//! or starts queries goes through [`Engine`].

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrow::array::{ArrayRef, RecordBatchOptions, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::TreeNode;
use datafusion::common::ScalarValue;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::Query;
use drizzle_exec::coordinator::{InputSpec, QuerySpec};
use drizzle_exec::sources::open_source;
use drizzle_exec::{QueryHandle, Runtime, RuntimeConfig, Scheduling, TableEvaluator};
use drizzle_planner::{
    plan_query, plan_view_query, sql_to_unoptimized, CopyOptions, DrizzleStatement, EmitMode,
    ObjectKind, PlannedQuery, StreamDef, StreamingPlan, TableDef, ViewDef,
};
use parking_lot::Mutex;

use crate::catalog::{Catalog, Oid};
use crate::errors::{from_datafusion, PgError};
use crate::providers::ViewStore;

/// Server-wide defaults.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Default micro-batch interval.
    pub batch_interval: Duration,
    /// Default group size (0 = adaptive, `'auto'`).
    pub group_size: u32,
    /// Default reduce partitions (0 = number of workers).
    pub parallelism: u32,
    /// Default scheduling (Drizzle, or BSP for comparison).
    pub scheduling: Scheduling,
    /// Where the coordinator listens for workers.
    pub cluster_listen: std::net::SocketAddr,
    /// The coordinator address workers are told (default: the bound one).
    pub cluster_advertise: Option<String>,
    /// How long a query waits for a first worker.
    pub worker_wait: Duration,
    /// A worker silent this long is declared lost.
    pub worker_timeout: Duration,
    /// Bounds of the adaptive group size.
    pub adaptive: drizzle_exec::AdaptiveGroupSize,
    /// Checkpoint storage: a directory or an `s3://bucket/prefix` URL
    /// (`None`: `<data dir>/checkpoints`).
    pub checkpoint_location: Option<String>,
    /// A checkpoint is taken at the first group boundary after this long.
    pub checkpoint_interval: Duration,
    /// Recovery of lost workers: re-run only their work, or roll back.
    pub recovery: drizzle_exec::Recovery,
    /// The cluster's shared secret (default: a random one, which only this
    /// process's in-process workers know).
    pub cluster_secret: drizzle_exec::cluster::ClusterSecret,
    /// Default `query_memory_limit` (bytes, 0: none); materialized views
    /// run with it.
    pub query_memory_limit: u64,
    /// The server-wide budget for the state of all queries (bytes, 0: none).
    pub server_memory_limit: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            batch_interval: Duration::from_millis(100),
            group_size: 0,
            parallelism: 0,
            scheduling: Scheduling::Drizzle,
            cluster_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            cluster_advertise: None,
            worker_wait: Duration::from_secs(30),
            worker_timeout: Duration::from_secs(10),
            adaptive: drizzle_exec::AdaptiveGroupSize::default(),
            checkpoint_location: None,
            checkpoint_interval: Duration::from_secs(1),
            recovery: drizzle_exec::Recovery::default(),
            cluster_secret: drizzle_exec::cluster::ClusterSecret::random(),
            query_memory_limit: DEFAULT_QUERY_MEMORY_LIMIT,
            server_memory_limit: default_server_memory_limit(),
        }
    }
}

/// Default `query_memory_limit`: 1 GiB.
pub const DEFAULT_QUERY_MEMORY_LIMIT: u64 = 1 << 30;

/// Default server-wide budget: half the machine's memory (`/proc/meminfo`),
/// or 8 GiB where that cannot be read.
pub fn default_server_memory_limit() -> u64 {
    let total_kb = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    total_kb.map_or(8 << 30, |kb| kb * 1024 / 2)
}

/// A memory size as Postgres writes one: a number with a unit (`B`, `kB`,
/// `MB`, `GB`, `TB`; case-insensitive, optional space), a bare number in kB
/// as for Postgres's memory settings, or `0`, `-1` or `unlimited` for no
/// limit (0).
pub fn parse_memory_size(value: &str) -> Option<u64> {
    let v = value.trim();
    if v.eq_ignore_ascii_case("unlimited") || v == "-1" {
        return Some(0);
    }
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, unit) = v.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "kb" => 1 << 10,
        "b" => 1,
        "mb" => 1 << 20,
        "gb" => 1 << 30,
        "tb" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// A memory size for SHOW: the largest unit that divides it, as Postgres.
pub fn format_memory_size(bytes: u64) -> String {
    if bytes == 0 {
        return "unlimited".into();
    }
    for (shift, unit) in [(40, "TB"), (30, "GB"), (20, "MB"), (10, "kB")] {
        if bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}B")
}

/// Per-session settings (`SET`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// `batch_interval`.
    pub batch_interval: Duration,
    /// `group_size`.
    pub group_size: u32,
    /// `parallelism`.
    pub parallelism: u32,
    /// `scheduling`.
    pub scheduling: Scheduling,
    /// `stream_start = 'latest'`.
    pub start_latest: bool,
    /// `cursor_fetch_timeout`: how long a `FETCH n` or a row-limited
    /// `Execute` of a continuous query waits for `n` rows before it returns
    /// fewer. `None` (the default, `0`): until `n` rows or the query's end,
    /// since drivers take a short batch for the end of the results.
    pub fetch_timeout: Option<Duration>,
    /// `query_memory_limit` (bytes, 0: none).
    pub memory_limit: u64,
    /// `statement_timeout`: a statement (a continuous query's whole run
    /// included) running longer ends with 57014. `None` (`0`): no limit.
    pub statement_timeout: Option<Duration>,
    /// `state_ttl`: keyed state of later continuous queries that no row
    /// touched for this long is evicted (non-windowed aggregates), and
    /// regular joins drop rows held this long. `None` (`0`): kept.
    pub state_ttl: Option<Duration>,
    /// Other Postgres settings drivers set; stored and echoed by SHOW.
    pub other: BTreeMap<String, String>,
}

impl Settings {
    /// Defaults, for unit tests that need settings without an engine.
    #[cfg(test)]
    pub fn for_tests() -> Self {
        Settings {
            batch_interval: Duration::from_millis(100),
            group_size: 0,
            parallelism: 0,
            scheduling: Scheduling::Drizzle,
            start_latest: false,
            fetch_timeout: None,
            memory_limit: 0,
            statement_timeout: None,
            state_ttl: None,
            other: BTreeMap::new(),
        }
    }

    /// `state_ttl` in micro-batches of the session's interval (rounded
    /// up), as a query's stage graph carries it.
    pub fn state_ttl_batches(&self) -> Option<u64> {
        ttl_batches(self.state_ttl, self.batch_interval)
    }

    /// The database the session asked for.
    pub fn database(&self) -> &str {
        self.other.get("database").map_or("drizzle", String::as_str)
    }

    /// Back to `defaults`, keeping what describes the session (its role).
    pub fn reset_to(&mut self, defaults: Settings) {
        let keep: Vec<(String, String)> = ["session_authorization", "is_superuser", "database"]
            .iter()
            .filter_map(|k| self.other.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect();
        *self = defaults;
        self.other.extend(keep);
    }
}

/// What a statement produced.
pub enum Outcome {
    /// A command without rows.
    Command(String),
    /// A finite result.
    Rows {
        /// Schema.
        schema: SchemaRef,
        /// Rows.
        batches: Vec<RecordBatch>,
        /// Command tag word ("SELECT", "SHOW", "EXPLAIN").
        tag: &'static str,
    },
    /// A continuous query.
    Stream(QueryHandle),
    /// `COPY ... FROM STDIN`: the session collects the data then calls [`Engine::copy_in`].
    CopyIn(CopyInTarget),
}

/// Where a `COPY FROM STDIN` goes.
pub struct CopyInTarget {
    /// Stream or table name.
    pub name: String,
    /// Number of columns the client sends.
    pub columns: Vec<usize>,
    /// Format.
    pub options: CopyOptions,
}

/// The shared server state.
pub struct Engine {
    /// The catalog.
    pub catalog: Arc<Catalog>,
    /// The micro-batch runtime.
    pub runtime: Arc<Runtime>,
    /// DataFusion context for finite queries and planning.
    pub ctx: SessionContext,
    /// Defaults.
    pub config: EngineConfig,
    /// Running views: the task feeding the store, and the query.
    views: Mutex<BTreeMap<String, (tokio::task::JoinHandle<()>, drizzle_shuffle::QueryId)>>,
    /// Every client session (cancel keys, `pg_stat_activity`, shutdown).
    pub sessions: Arc<crate::session::SessionRegistry>,
}

/// Lets lookup joins evaluate their finite side from worker threads.
struct EngineTables {
    catalog: Arc<Catalog>,
    ctx: SessionContext,
    handle: tokio::runtime::Handle,
}

impl TableEvaluator for EngineTables {
    fn version(&self, spec: &drizzle_planner::LookupJoinSpec) -> u64 {
        self.catalog.relations_version(&spec.relations)
    }

    fn any_version(&self) -> u64 {
        self.catalog.data_version.load(Ordering::Acquire)
    }

    fn evaluate(
        &self,
        spec: &drizzle_planner::LookupJoinSpec,
        held: Option<u64>,
    ) -> drizzle_exec::Result<Option<(u64, Vec<RecordBatch>)>> {
        // Read before the rows: a change in between makes the next batch
        // read them again, never miss it.
        let version = self.version(spec);
        if held == Some(version) {
            return Ok(None);
        }
        let ctx = self.ctx.clone();
        let plan = spec.table_plan.clone();
        let rows = self
            .handle
            .block_on(async move { ctx.execute_logical_plan(plan).await?.collect().await })?;
        Ok(Some((version, rows)))
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn text_batch(names: &[&str], rows: Vec<Vec<Option<String>>>) -> (SchemaRef, Vec<RecordBatch>) {
    let schema = Arc::new(Schema::new(
        names
            .iter()
            .map(|n| Field::new(*n, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let columns: Vec<ArrayRef> = (0..names.len())
        .map(|c| {
            Arc::new(StringArray::from(
                rows.iter().map(|r| r[c].clone()).collect::<Vec<_>>(),
            )) as ArrayRef
        })
        .collect();
    let batch = RecordBatch::try_new_with_options(
        Arc::clone(&schema),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(rows.len())),
    );
    match batch {
        Ok(b) => (schema, vec![b]),
        Err(_) => (Arc::clone(&schema), vec![]),
    }
}

impl Engine {
    /// Opens the data directory, starts the workers and resumes every view.
    pub async fn open(
        data_dir: &std::path::Path,
        workers: usize,
        config: EngineConfig,
    ) -> Result<Arc<Self>, PgError> {
        let catalog = Arc::new(Catalog::open(data_dir)?);
        let ctx = drizzle_planner::new_session_context();
        let tables = Arc::new(EngineTables {
            catalog: Arc::clone(&catalog),
            ctx: ctx.clone(),
            handle: tokio::runtime::Handle::current(),
        });
        let runtime = Runtime::start(
            RuntimeConfig {
                cluster_listen: config.cluster_listen,
                cluster_advertise: config.cluster_advertise.clone(),
                local_workers: workers,
                worker_wait: config.worker_wait,
                worker_timeout: config.worker_timeout,
                adaptive: config.adaptive,
                checkpoint_location: Some(
                    config
                        .checkpoint_location
                        .clone()
                        .unwrap_or_else(|| data_dir.join("checkpoints").display().to_string()),
                ),
                checkpoint_interval: config.checkpoint_interval,
                recovery: config.recovery,
                cluster_secret: config.cluster_secret.clone(),
                server_memory_limit: config.server_memory_limit,
                classify: Arc::new(|e: drizzle_exec::ExecError| {
                    let pg = PgError::from(e);
                    (pg.code.to_string(), pg.message)
                }),
            },
            tables,
        )
        .await?;
        let engine = Arc::new(Self {
            catalog,
            runtime,
            ctx,
            config,
            views: Mutex::new(BTreeMap::new()),
            sessions: Arc::new(crate::session::SessionRegistry::default()),
        });
        for view in engine.catalog.views_oldest_first() {
            // A view that cannot resume is kept, marked failed (SHOW
            // MATERIALIZED VIEWS and SELECT say why): it never stops the
            // server from starting.
            let resumed = std::panic::AssertUnwindSafe(engine.resume_view(&view));
            let error = match futures::FutureExt::catch_unwind(resumed).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.message),
                Err(_) => Some("internal error while resuming (see the server log)".to_string()),
            };
            if let Some(e) = error {
                tracing::error!(view = %view.name, "cannot resume materialized view: {e}");
                if engine.catalog.view_store(&view.name).is_none() {
                    let failed = ViewStore::append(Arc::new(Schema::empty()));
                    engine.catalog.attach_view(&view.name, Arc::new(failed));
                }
                if let Some(store) = engine.catalog.view_store(&view.name) {
                    *store.error.lock() = Some(format!("cannot resume: {e}"));
                }
            }
        }
        Ok(engine)
    }

    /// Default session settings.
    pub fn default_settings(&self) -> Settings {
        Settings {
            batch_interval: self.config.batch_interval,
            group_size: self.config.group_size,
            parallelism: self.config.parallelism,
            scheduling: self.config.scheduling,
            start_latest: false,
            fetch_timeout: None,
            memory_limit: self.config.query_memory_limit,
            statement_timeout: None,
            state_ttl: None,
            other: BTreeMap::new(),
        }
    }

    fn reduce_partitions(&self, settings: &Settings) -> u32 {
        if settings.parallelism == 0 {
            self.runtime.slot_count() as u32
        } else {
            settings.parallelism
        }
    }

    /// Plans a query (continuous or finite) with parameter values.
    pub fn plan(&self, query: &Query, params: &[ScalarValue]) -> Result<PlannedQuery, PgError> {
        self.plan_in(query, params, &self.default_settings())
    }

    /// [`Engine::plan`] for a session: `pg_catalog` and
    /// `information_schema` answer with its database and settings.
    pub fn plan_in(
        &self,
        query: &Query,
        params: &[ScalarValue],
        settings: &Settings,
    ) -> Result<PlannedQuery, PgError> {
        let resolver = self.resolver(settings);
        Ok(plan_query(&self.ctx.state(), &resolver, query, params)?)
    }

    /// Plans a materialized view's query. A query over materialized views
    /// alone (no stream) reads its append-only views as streams: their
    /// output logs, from the first row (a view over a view).
    pub fn plan_view(
        &self,
        query: &Query,
        params: &[ScalarValue],
    ) -> Result<PlannedQuery, PgError> {
        // A view deletes the keys its filter drops (see
        // `StreamingPlan::delete_filtered_keys`).
        Ok(match self.plan_view_query(query, params)? {
            PlannedQuery::Continuous(mut plan) => {
                plan.delete_filtered_keys()?;
                PlannedQuery::Continuous(plan)
            }
            finite => finite,
        })
    }

    fn plan_view_query(
        &self,
        query: &Query,
        params: &[ScalarValue],
    ) -> Result<PlannedQuery, PgError> {
        let settings = self.default_settings();
        let resolver = self.resolver(&settings);
        let planned = plan_view_query(&self.ctx.state(), &resolver, query, params);
        if let Ok(PlannedQuery::Continuous(_)) = planned {
            return Ok(planned?);
        }
        // Finite, or refused because a window (TUMBLE over a view) needs a
        // stream: read the views as streams.
        let views = crate::catalog::ViewsAsStreams(self.catalog.as_ref(), &resolver);
        match (
            planned,
            plan_view_query(&self.ctx.state(), &views, query, params),
        ) {
            (_, Ok(continuous @ PlannedQuery::Continuous(_))) => Ok(continuous),
            // Refused either way: the views-as-streams reading says why.
            (Err(_), Err(e)) => Err(e.into()),
            (first, _) => Ok(first?),
        }
    }

    /// The partitions of a query input: a stream's source, or the output
    /// log of a view read as a stream.
    fn input_sources(
        &self,
        stream: &StreamDef,
    ) -> Result<Vec<drizzle_exec::sources::SourcePartition>, PgError> {
        if stream.connector() == Some(crate::catalog::VIEW_CONNECTOR) {
            let log = self
                .catalog
                .view_store(&stream.name)
                .and_then(|v| v.output_log())
                .ok_or_else(|| PgError::undefined_table(&stream.name))?;
            return Ok(vec![drizzle_exec::sources::SourcePartition::View(
                log,
                stream.schema(),
            )]);
        }
        let log = self.catalog.stream_log(&stream.name);
        Ok(open_source(stream, log.as_ref())?)
    }

    fn resolver<'a>(&'a self, settings: &'a Settings) -> crate::system_catalog::SystemResolver<'a> {
        crate::system_catalog::SystemResolver {
            catalog: self.catalog.as_ref(),
            asker: crate::system_catalog::Asker {
                database: settings.database(),
                settings,
                sessions: &self.sessions,
            },
        }
    }

    /// The result schema and parameter types of a query, without running it.
    pub fn describe_query(
        &self,
        query: &Query,
        settings: &Settings,
    ) -> Result<(SchemaRef, Vec<Option<DataType>>), PgError> {
        let resolver = self.resolver(settings);
        let plan = sql_to_unoptimized(&self.ctx.state(), &resolver, query)?;
        let mut types = plan.get_parameter_types().map_err(from_datafusion)?;
        // Like Postgres, `$1::type` gives the parameter that type.
        let _ = plan.apply_with_subqueries(|node| {
            node.apply_expressions(|e| {
                e.apply(|e| {
                    if let datafusion::logical_expr::Expr::Cast(c) = e {
                        if let datafusion::logical_expr::Expr::Placeholder(p) = c.expr.as_ref() {
                            types.insert(p.id.clone(), Some(c.field.data_type().clone()));
                        }
                    }
                    Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
                })
            })
        });
        let mut ordered: Vec<(usize, Option<DataType>)> = types
            .into_iter()
            .filter_map(|(k, v)| {
                k.trim_start_matches('$')
                    .parse::<usize>()
                    .ok()
                    .map(|i| (i, v))
            })
            .collect();
        ordered.sort_by_key(|(i, _)| *i);
        let n = ordered.last().map(|(i, _)| *i).unwrap_or(0);
        let mut params = vec![None; n];
        for (i, t) in ordered {
            if i >= 1 {
                params[i - 1] = t;
            }
        }
        Ok((Arc::new(plan.schema().as_arrow().clone()), params))
    }

    /// Parameter types of `INSERT ... VALUES ($1, ...)`: each placeholder
    /// takes the type of the column it is inserted into.
    pub fn describe_insert(
        &self,
        target: &str,
        columns: &[String],
        source: &Query,
    ) -> Result<Vec<Option<DataType>>, PgError> {
        use datafusion::sql::sqlparser::ast::{Expr as SqlExpr, SetExpr, Value};
        let (schema, _, _) = self.insert_target(target)?;
        let idx = self.column_indices(&schema, columns)?;
        let mut types: Vec<Option<DataType>> = Vec::new();
        if let SetExpr::Values(values) = source.body.as_ref() {
            for row in &values.rows {
                for (c, e) in row.iter().enumerate() {
                    if let SqlExpr::Value(v) = e {
                        if let Value::Placeholder(p) = &v.value {
                            if let (Ok(n), Some(&col)) =
                                (p.trim_start_matches('$').parse::<usize>(), idx.get(c))
                            {
                                if n >= 1 {
                                    if types.len() < n {
                                        types.resize(n, None);
                                    }
                                    types[n - 1] = Some(schema.field(col).data_type().clone());
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(types)
    }

    /// Runs a finite DataFusion plan.
    pub async fn run_finite(
        &self,
        plan: LogicalPlan,
    ) -> Result<(SchemaRef, Vec<RecordBatch>), PgError> {
        let schema: SchemaRef = Arc::new(plan.schema().as_arrow().clone());
        let df = self
            .ctx
            .execute_logical_plan(plan)
            .await
            .map_err(from_datafusion)?;
        let batches = df.collect().await.map_err(from_datafusion)?;
        Ok((schema, batches))
    }

    /// Starts a continuous query.
    pub fn start_continuous(
        &self,
        mut plan: StreamingPlan,
        settings: &Settings,
        label: String,
    ) -> Result<QueryHandle, PgError> {
        plan.graph.state_ttl_batches = settings.state_ttl_batches();
        let inputs = plan
            .streams()
            .into_iter()
            .map(|stream| {
                let (sources, start_offsets) = self.open_sources(stream, settings.start_latest)?;
                Ok(InputSpec {
                    sources,
                    start_offsets,
                })
            })
            .collect::<Result<Vec<_>, PgError>>()?;
        let spec = QuerySpec {
            plan,
            inputs,
            batch_interval: settings.batch_interval,
            group_size: settings.group_size,
            scheduling: settings.scheduling,
            reduce_partitions: self.reduce_partitions(settings),
            label,
            durability: drizzle_exec::Durability::default(),
            memory_limit: settings.memory_limit,
        };
        Ok(self.runtime.start_query(spec)?)
    }

    fn open_sources(
        &self,
        stream: &StreamDef,
        latest: bool,
    ) -> Result<(Vec<drizzle_exec::sources::SourcePartition>, Vec<u64>), PgError> {
        let sources = self.input_sources(stream)?;
        let now_us = now_ms() * 1000;
        let offsets = sources
            .iter()
            .map(|s| match s {
                // Datagen's rows exist from the moment a query looks at them.
                drizzle_exec::sources::SourcePartition::Generated(g, _) if g.starts_now() => {
                    s.available(now_us)
                }
                _ if latest => s.available(now_us),
                _ => 0,
            })
            .collect();
        Ok((sources, offsets))
    }

    /// Executes a statement that needs no session-held state.
    pub async fn execute(
        &self,
        stmt: DrizzleStatement,
        settings: &mut Settings,
        params: &[ScalarValue],
        sql: &str,
    ) -> Result<Outcome, PgError> {
        match stmt {
            DrizzleStatement::CreateStream {
                name,
                if_not_exists,
                columns,
                watermark,
                proctime,
                mut options,
            } => {
                let partitions = match options.remove("partitions") {
                    Some(p) => p.trim().parse::<u32>().ok().filter(|p| (1..=1024).contains(p)).ok_or_else(|| {
                        PgError::new("22023", format!("invalid option partitions: '{p}' is not a number from 1 to 1024"))
                    })?,
                    None => 1,
                };
                let def = StreamDef {
                    name,
                    columns,
                    watermark,
                    options,
                    partitions,
                    created_at_ms: now_ms(),
                    proctime,
                };
                if def.connector().is_some() {
                    // Validate connector options now, not at the first query.
                    open_source(&def, None)?;
                }
                self.catalog.create_stream(def, if_not_exists)?;
                Ok(Outcome::Command("CREATE STREAM".into()))
            }
            DrizzleStatement::CreateFunction { def, or_replace } => {
                drizzle_planner::functions::sql::check(&def)?;
                self.catalog.create_function(def, or_replace)?;
                Ok(Outcome::Command("CREATE FUNCTION".into()))
            }
            DrizzleStatement::DropFunction { name, if_exists } => {
                if !self.catalog.drop_function(&name)? && !if_exists {
                    return Err(PgError::new(
                        "42883",
                        format!("function {name} does not exist"),
                    ));
                }
                Ok(Outcome::Command("DROP FUNCTION".into()))
            }
            DrizzleStatement::CreateTable {
                name,
                if_not_exists,
                columns,
            } => {
                self.catalog
                    .create_table(TableDef { name, columns }, if_not_exists)?;
                Ok(Outcome::Command("CREATE TABLE".into()))
            }
            DrizzleStatement::CreateView {
                name,
                if_not_exists,
                query,
            } => {
                if self.catalog.exists(&name) {
                    if if_not_exists && self.catalog.view(&name).is_some() {
                        return Ok(Outcome::Command("CREATE MATERIALIZED VIEW".into()));
                    }
                    return Err(PgError::duplicate(&name));
                }
                let plan = match self.plan_view(&query, params)? {
                    PlannedQuery::Continuous(p) => *p,
                    PlannedQuery::Finite(_) => {
                        return Err(PgError::unsupported(
                            "a materialized view whose query reads no stream (it reads tables \
                             only, or can return no row, as with LIMIT 0) is not supported",
                        )
                        .with_hint(
                            "a materialized view maintains a query over a stream or over \
                             append-only materialized views",
                        ))
                    }
                };
                if plan.limit.is_some() {
                    return Err(PgError::unsupported(
                        "LIMIT without ORDER BY in a materialized view is not supported",
                    )
                    .with_hint(
                        "ORDER BY ... LIMIT n keeps the first n rows of that order as rows arrive (a top-N)",
                    ));
                }
                let mut offsets = Vec::new();
                for stream in plan.streams() {
                    // A view read as a stream is read from its first row.
                    let latest = settings.start_latest
                        && stream.connector() != Some(crate::catalog::VIEW_CONNECTOR);
                    offsets.push(self.open_sources(stream, latest)?.1);
                }
                let more_start_offsets = offsets.split_off(1.min(offsets.len()));
                let offsets = offsets.pop().unwrap_or_default();
                let def = ViewDef {
                    name: name.clone(),
                    query: query.to_string(),
                    batch_interval_us: settings.batch_interval.as_micros() as u64,
                    parallelism: self.reduce_partitions(settings),
                    start_offsets: offsets,
                    more_start_offsets,
                    group_size: settings.group_size,
                    origin_unix_us: Some(now_ms() * 1000),
                    state_ttl_us: settings
                        .state_ttl
                        .map_or(0, |t| t.as_micros().min(u64::MAX as u128) as u64),
                };
                // A fresh id: a view never sees an earlier object's files.
                let (oid, dir) = self.catalog.new_view_dir();
                let store = Arc::new(new_view_store(&plan)?.with_log(dir.join("output.log"))?);
                self.catalog
                    .create_view(def.clone(), oid, Arc::clone(&store))?;
                if let Err(e) = self.launch_view(&def, oid, plan, store, None) {
                    let _ = self.catalog.drop_view(&name);
                    self.remove_view_data(oid).await;
                    return Err(e);
                }
                Ok(Outcome::Command("CREATE MATERIALIZED VIEW".into()))
            }
            DrizzleStatement::Drop {
                kind,
                name,
                if_exists,
            } => {
                let dropped = match kind {
                    ObjectKind::Stream => self.catalog.drop_stream(&name)?,
                    ObjectKind::Table => self.catalog.drop_table(&name)?,
                    ObjectKind::MaterializedView => {
                        let dropped = self.catalog.drop_view(&name)?;
                        let running = self.views.lock().remove(&name);
                        if let Some((task, id)) = running {
                            task.abort();
                            self.runtime.cancel(id);
                        }
                        if let Some(view) = &dropped {
                            self.remove_view_data(view.oid).await;
                        }
                        dropped.is_some()
                    }
                };
                if !dropped {
                    if if_exists {
                        return Ok(Outcome::Command(format!("DROP {}", kind.sql_name())));
                    }
                    let what = kind.sql_name().to_lowercase();
                    return Err(PgError::new(
                        "42P01",
                        format!("{what} \"{name}\" does not exist"),
                    ));
                }
                Ok(Outcome::Command(format!("DROP {}", kind.sql_name())))
            }
            DrizzleStatement::Insert {
                target,
                columns,
                source,
            } => {
                let n = self.insert(&target, &columns, &source, params).await?;
                Ok(Outcome::Command(format!("INSERT 0 {n}")))
            }
            DrizzleStatement::CopyFrom {
                target,
                columns,
                options,
            } => {
                let schema = self.insert_target(&target)?.0;
                let idx = self.column_indices(&schema, &columns)?;
                Ok(Outcome::CopyIn(CopyInTarget {
                    name: target,
                    columns: idx,
                    options,
                }))
            }
            DrizzleStatement::Query(query) => match self.plan_in(&query, params, settings)? {
                PlannedQuery::Finite(plan) => {
                    let (schema, batches) = self.run_finite(plan).await?;
                    Ok(Outcome::Rows {
                        schema,
                        batches,
                        tag: "SELECT",
                    })
                }
                PlannedQuery::Continuous(plan) => Ok(Outcome::Stream(self.start_continuous(
                    *plan,
                    settings,
                    sql.trim().to_string(),
                )?)),
            },
            DrizzleStatement::ExplainAnalyze(target) => {
                let id = match &target {
                    drizzle_planner::AnalyzeTarget::Query(id) => drizzle_shuffle::QueryId(*id),
                    drizzle_planner::AnalyzeTarget::View(name) => {
                        let running = self.views.lock().get(name).map(|(_, id)| *id);
                        match running {
                            Some(id) => id,
                            None if self.catalog.view(name).is_some() => {
                                return Err(PgError::new(
                                    "55000",
                                    format!("materialized view {name} is not running"),
                                ))
                            }
                            None => return Err(PgError::undefined_table(name)),
                        }
                    }
                };
                let status = self
                    .runtime
                    .queries()
                    .into_iter()
                    .find(|q| q.id == id)
                    .ok_or_else(|| {
                        PgError::new("42704", format!("query {} is not running", id.0))
                            .with_hint("SHOW QUERIES lists running queries")
                    })?;
                let (schema, batches) = text_batch(
                    &["QUERY PLAN"],
                    status
                        .explain_analyze()
                        .into_iter()
                        .map(|l| vec![Some(l)])
                        .collect(),
                );
                Ok(Outcome::Rows {
                    schema,
                    batches,
                    tag: "EXPLAIN",
                })
            }
            DrizzleStatement::Explain(query) => {
                let lines = match self.plan_in(&query, params, settings)? {
                    PlannedQuery::Continuous(plan) => {
                        plan.explain(self.reduce_partitions(settings) as usize)
                    }
                    PlannedQuery::Finite(plan) => {
                        let mut v = vec!["FiniteQuery: runs once with DataFusion".to_string()];
                        v.extend(
                            plan.display_indent()
                                .to_string()
                                .lines()
                                .map(|l| format!("  {l}")),
                        );
                        v
                    }
                };
                let (schema, batches) = text_batch(
                    &["QUERY PLAN"],
                    lines.into_iter().map(|l| vec![Some(l)]).collect(),
                );
                Ok(Outcome::Rows {
                    schema,
                    batches,
                    tag: "EXPLAIN",
                })
            }
            DrizzleStatement::ShowObjects(kind) => Ok(self.show_objects(kind)),
            DrizzleStatement::AlterViewParallelism { name, parallelism } => {
                if !self.catalog.set_view_parallelism(&name, parallelism)? {
                    return Err(PgError::new(
                        "42P01",
                        format!("materialized view {name} does not exist"),
                    ));
                }
                let id = self.views.lock().get(&name).map(|(_, id)| *id);
                if let Some(id) = id {
                    self.runtime.set_parallelism(id, parallelism);
                }
                Ok(Outcome::Command("ALTER MATERIALIZED VIEW".into()))
            }
            DrizzleStatement::ShowQueries => Ok(self.show_queries()),
            DrizzleStatement::ShowWorkers => Ok(self.show_workers()),
            DrizzleStatement::ShowCreate { kind, name } => self.show_create(kind, &name),
            DrizzleStatement::ShowVariable(name) if name == "all" => {
                let (schema, batches) = show_all(settings);
                Ok(Outcome::Rows {
                    schema,
                    batches,
                    tag: "SHOW",
                })
            }
            DrizzleStatement::ShowVariable(name) => {
                let value = show_setting(settings, &name)?;
                let (schema, batches) = text_batch(&[name.as_str()], vec![vec![Some(value)]]);
                Ok(Outcome::Rows {
                    schema,
                    batches,
                    tag: "SHOW",
                })
            }
            DrizzleStatement::Set { name, value } => {
                apply_setting(settings, &name, &value)?;
                Ok(Outcome::Command("SET".into()))
            }
            DrizzleStatement::Reset(name) => {
                let defaults = self.default_settings();
                match name.as_str() {
                    "all" => settings.reset_to(defaults),
                    "batch_interval" => settings.batch_interval = defaults.batch_interval,
                    "group_size" => settings.group_size = defaults.group_size,
                    "parallelism" => settings.parallelism = defaults.parallelism,
                    "scheduling" => settings.scheduling = defaults.scheduling,
                    "stream_start" => settings.start_latest = false,
                    "cursor_fetch_timeout" => settings.fetch_timeout = defaults.fetch_timeout,
                    "query_memory_limit" => settings.memory_limit = defaults.memory_limit,
                    "statement_timeout" => settings.statement_timeout = None,
                    "state_ttl" => settings.state_ttl = None,
                    other => {
                        settings.other.remove(other);
                    }
                }
                Ok(Outcome::Command("RESET".into()))
            }
            DrizzleStatement::CancelQuery(id) => {
                if self.runtime.cancel(drizzle_shuffle::QueryId(id)) {
                    Ok(Outcome::Command("CANCEL QUERY".into()))
                } else {
                    Err(PgError::new("42704", format!("query {id} is not running"))
                        .with_hint("SHOW QUERIES lists running queries"))
                }
            }
            DrizzleStatement::NoOp(tag) => Ok(Outcome::Command(tag.into())),
            other => Err(PgError::internal(format!(
                "statement {} reached the engine",
                other.tag()
            ))),
        }
    }

    /// The schema and log a built-in stream or table is written to.
    fn insert_target(
        &self,
        name: &str,
    ) -> Result<(SchemaRef, Arc<drizzle_exec::log::Log>, bool), PgError> {
        if let Some(def) = self.catalog.stream(name) {
            if let Some(c) = def.connector() {
                return Err(PgError::new(
                    "42809",
                    format!("stream {name} is fed by connector '{c}'; it takes no INSERT or COPY"),
                ));
            }
            let log = self
                .catalog
                .stream_log(name)
                .ok_or_else(|| PgError::undefined_table(name))?;
            return Ok((def.source_schema(), log, false));
        }
        if let Some(def) = self.catalog.table(name) {
            let log = self
                .catalog
                .table_log(name)
                .ok_or_else(|| PgError::undefined_table(name))?;
            return Ok((def.schema(), log, true));
        }
        if self.catalog.view(name).is_some() {
            return Err(PgError::new(
                "42809",
                format!("cannot insert into materialized view {name}"),
            ));
        }
        Err(PgError::undefined_table(name))
    }

    fn column_indices(
        &self,
        schema: &SchemaRef,
        columns: &[String],
    ) -> Result<Vec<usize>, PgError> {
        if columns.is_empty() {
            return Ok((0..schema.fields().len()).collect());
        }
        let mut out = Vec::new();
        for c in columns {
            let i = schema
                .index_of(c)
                .map_err(|_| PgError::new("42703", format!("column \"{c}\" does not exist")))?;
            if out.contains(&i) {
                return Err(PgError::new(
                    "42701",
                    format!("column \"{c}\" specified more than once"),
                ));
            }
            out.push(i);
        }
        Ok(out)
    }

    /// Casts `columns` (the values of target columns `idx`) into one batch of
    /// the target schema, checking NOT NULL; all or nothing.
    fn conform(
        &self,
        schema: &SchemaRef,
        idx: &[usize],
        columns: Vec<ArrayRef>,
        rows: usize,
    ) -> Result<RecordBatch, PgError> {
        let mut out: Vec<Option<ArrayRef>> = vec![None; schema.fields().len()];
        for (value, &target) in columns.into_iter().zip(idx) {
            let field = schema.field(target);
            let cast = if value.data_type() == field.data_type() {
                value
            } else {
                if !arrow::compute::can_cast_types(value.data_type(), field.data_type()) {
                    return Err(PgError::new(
                        "42804",
                        format!(
                            "column \"{}\" is of type {} but expression is of type {}",
                            field.name(),
                            crate::encode::sql_type_name(field.data_type()),
                            value.data_type()
                        ),
                    ));
                }
                let options = arrow::compute::CastOptions {
                    safe: false,
                    ..Default::default()
                };
                arrow::compute::cast_with_options(&value, field.data_type(), &options).map_err(
                    |e| {
                        PgError::new(
                            "22P02",
                            format!("invalid value for column \"{}\": {e}", field.name()),
                        )
                    },
                )?
            };
            out[target] = Some(cast);
        }
        let mut arrays = Vec::with_capacity(out.len());
        for (i, a) in out.into_iter().enumerate() {
            let field = schema.field(i);
            let a = a.unwrap_or_else(|| arrow::array::new_null_array(field.data_type(), rows));
            if !field.is_nullable() && a.null_count() > 0 {
                return Err(PgError::new(
                    "23502",
                    format!(
                        "null value in column \"{}\" violates not-null constraint",
                        field.name()
                    ),
                ));
            }
            arrays.push(a);
        }
        RecordBatch::try_new_with_options(
            Arc::clone(schema),
            arrays,
            &RecordBatchOptions::new().with_row_count(Some(rows)),
        )
        .map_err(|e| PgError::internal(e.to_string()))
    }

    async fn insert(
        &self,
        target: &str,
        columns: &[String],
        source: &Query,
        params: &[ScalarValue],
    ) -> Result<usize, PgError> {
        let (schema, log, is_table) = self.insert_target(target)?;
        let idx = self.column_indices(&schema, columns)?;
        let plan = match self.plan(source, params)? {
            PlannedQuery::Finite(p) => p,
            PlannedQuery::Continuous(_) => {
                return Err(PgError::unsupported(
                    "INSERT ... SELECT from a stream is not supported",
                )
                .with_hint("it would never finish; use a MATERIALIZED VIEW"))
            }
        };
        let (src_schema, batches) = self.run_finite(plan).await?;
        if src_schema.fields().len() > idx.len() {
            return Err(PgError::new(
                "42601",
                "INSERT has more expressions than target columns",
            ));
        }
        if src_schema.fields().len() < idx.len() && !columns.is_empty() {
            return Err(PgError::new(
                "42601",
                "INSERT has more target columns than expressions",
            ));
        }
        let idx = &idx[..src_schema.fields().len()];
        let all = arrow::compute::concat_batches(&src_schema, &batches)
            .map_err(|e| PgError::internal(e.to_string()))?;
        let rows = all.num_rows();
        let batch = self.conform(&schema, idx, all.columns().to_vec(), rows)?;
        log.append(&batch)?;
        if is_table {
            self.catalog.bump_data_version(target);
        }
        Ok(rows)
    }

    /// Parses and appends `COPY ... FROM STDIN` data; all or nothing.
    pub fn copy_in(&self, target: &CopyInTarget, data: &[u8]) -> Result<usize, PgError> {
        let (schema, log, is_table) = self.insert_target(&target.name)?;
        if target.options.binary {
            let types: Vec<(DataType, String)> = target
                .columns
                .iter()
                .map(|&c| {
                    let f = schema.field(c);
                    (f.data_type().clone(), f.name().clone())
                })
                .collect();
            let (columns, rows) = crate::copy_binary::parse(data, &types)?;
            let batch = self.conform(&schema, &target.columns, columns, rows)?;
            log.append(&batch)?;
            if is_table {
                self.catalog.bump_data_version(&target.name);
            }
            return Ok(rows);
        }
        let text = std::str::from_utf8(data)
            .map_err(|e| PgError::new("22021", format!("COPY data is not valid UTF-8: {e}")))?;
        crate::session::reject_nul(text)?;
        let records = crate::copy::parse_records(text, &target.options, target.columns.len())?;
        let rows = records.len();
        let mut columns = Vec::with_capacity(target.columns.len());
        for (c, &col) in target.columns.iter().enumerate() {
            let field = schema.field(col);
            let values: Vec<Option<&str>> =
                records.iter().map(|r| r.fields[c].as_deref()).collect();
            let array = crate::encode::parse_column(&values, field.data_type(), field.name())
                .map_err(|(i, mut e)| {
                    e.message = format!("{}, line {}", e.message, records[i].line);
                    e
                })?;
            columns.push(array);
        }
        let batch = self.conform(&schema, &target.columns, columns, rows)?;
        log.append(&batch)?;
        if is_table {
            self.catalog.bump_data_version(&target.name);
        }
        Ok(rows)
    }

    fn show_objects(&self, kind: ObjectKind) -> Outcome {
        let (schema, batches) = match kind {
            ObjectKind::Stream => text_batch(
                &[
                    "name",
                    "columns",
                    "watermark",
                    "source",
                    "partitions",
                    "rows",
                ],
                self.catalog
                    .streams()
                    .into_iter()
                    .map(|s| {
                        let rows = self
                            .catalog
                            .stream_log(&s.name)
                            .map(|l| l.row_count().to_string());
                        vec![
                            Some(s.name.clone()),
                            Some(
                                s.schema()
                                    .fields()
                                    .iter()
                                    .map(|f| f.name().as_str())
                                    .collect::<Vec<_>>()
                                    .join(", "),
                            ),
                            s.watermark
                                .as_ref()
                                .map(|w| format!("{} - {}ms", w.column, w.delay_ms)),
                            Some(s.connector().unwrap_or("log").to_string()),
                            Some(s.partitions.to_string()),
                            rows,
                        ]
                    })
                    .collect(),
            ),
            ObjectKind::Table => text_batch(
                &["name", "columns", "rows"],
                self.catalog
                    .tables()
                    .into_iter()
                    .map(|t| {
                        let rows = self
                            .catalog
                            .table_log(&t.name)
                            .map(|l| l.row_count().to_string());
                        vec![Some(t.name.clone()), Some(column_names(&t.columns)), rows]
                    })
                    .collect(),
            ),
            ObjectKind::MaterializedView => text_batch(
                &["name", "query", "last_batch", "status", "error"],
                self.catalog
                    .views()
                    .into_iter()
                    .map(|v| {
                        let store = self.catalog.view_store(&v.name);
                        let last = store
                            .as_ref()
                            .and_then(|s| *s.last_batch.lock())
                            .map(|b| b.to_string());
                        let error = store.as_ref().and_then(|s| s.error.lock().clone());
                        let status = if error.is_some() { "failed" } else { "running" };
                        vec![
                            Some(v.name.clone()),
                            Some(v.query.clone()),
                            last,
                            Some(status.to_string()),
                            error,
                        ]
                    })
                    .collect(),
            ),
        };
        Outcome::Rows {
            schema,
            batches,
            tag: "SHOW",
        }
    }

    fn show_queries(&self) -> Outcome {
        let rows = self
            .runtime
            .queries()
            .into_iter()
            .map(|q| {
                let batches = q.batches.load(Ordering::Relaxed);
                let coord = q.coordination_us.load(Ordering::Relaxed);
                let checkpoint = *q.last_checkpoint.lock();
                vec![
                    Some(q.id.0.to_string()),
                    Some(q.label.clone()),
                    Some(batches.to_string()),
                    Some(q.rows_in.load(Ordering::Relaxed).to_string()),
                    Some(q.rows_out.load(Ordering::Relaxed).to_string()),
                    Some(q.late_rows.load(Ordering::Relaxed).to_string()),
                    Some(format!(
                        "{:.3}",
                        q.last_latency_us.load(Ordering::Relaxed) as f64 / 1000.0
                    )),
                    Some(format!("{}", q.batch_interval.as_micros() as f64 / 1000.0)),
                    Some(q.group_size.load(Ordering::Relaxed).to_string()),
                    Some(format!(
                        "{:.1}",
                        batches as f64 / q.started.elapsed().as_secs_f64().max(1e-3)
                    )),
                    Some(format!("{:.1}", coord as f64 / batches.max(1) as f64)),
                    Some(q.scheduling.to_string()),
                    Some(q.groups.load(Ordering::Relaxed).to_string()),
                    Some(q.launches.load(Ordering::Relaxed).to_string()),
                    Some(q.reduce_partitions.load(Ordering::Relaxed).to_string()),
                    Some(q.attempt.load(Ordering::Relaxed).to_string()),
                    Some(q.recovery.lock().clone()),
                    Some(q.recoveries.load(Ordering::Relaxed).to_string()),
                    Some(q.recovered_partitions.load(Ordering::Relaxed).to_string()),
                    q.last_recovery.lock().clone(),
                    checkpoint.map(|(b, _, _)| b.to_string()),
                    checkpoint.map(|(_, at, _)| format!("{:.1}", at.elapsed().as_secs_f64())),
                    checkpoint.map(|(_, _, bytes)| bytes.to_string()),
                    Some(q.state_bytes.load(Ordering::Relaxed).to_string()),
                    Some(q.state_keys.load(Ordering::Relaxed).to_string()),
                    Some(format_memory_size(q.memory_limit)),
                ]
            })
            .collect();
        let (schema, batches) = text_batch(
            &[
                "id",
                "query",
                "batches",
                "rows_in",
                "rows_out",
                "late_rows",
                "last_batch_latency_ms",
                "batch_interval_ms",
                "group_size",
                "batches_per_second",
                "coordination_us_per_batch",
                "scheduling",
                "groups",
                "launches",
                "parallelism",
                "attempt",
                "recovery",
                "recoveries",
                "recovered_partitions",
                "last_recovery",
                "checkpoint_batch",
                "checkpoint_age_s",
                "checkpoint_bytes",
                "state_bytes",
                "state_keys",
                "memory_limit",
            ],
            rows,
        );
        Outcome::Rows {
            schema,
            batches,
            tag: "SHOW",
        }
    }

    fn show_workers(&self) -> Outcome {
        let rows = self
            .runtime
            .workers()
            .into_iter()
            .map(|w| {
                let c = &w.counters;
                let n = |v: u64| Some(v.to_string());
                vec![
                    n(w.id.0 as u64),
                    Some(w.address.clone()),
                    n(w.epoch),
                    Some(format!("{:.0}", w.since_heartbeat.as_secs_f64() * 1000.0)),
                    n(w.launches_sent),
                    n(c.launches_received),
                    n(c.map_tasks_run),
                    n(c.reduce_tasks_run),
                    n(c.notices_sent),
                    n(c.notices_received),
                    n(c.reduces_started_by_notices),
                    n(c.reduces_started_by_coordinator),
                    n(c.coordinator_messages_in_group),
                    n(c.blocks_read_local),
                    n(c.blocks_fetched_remote),
                    n(c.out_of_order_reduces),
                    n(c.blocks_held),
                    n(c.block_bytes_held),
                    n(c.partitions_adopted),
                    n(c.fetch_failures),
                    n(c.task_slots),
                    n(c.peak_tasks_running),
                    n(c.empty_results_in_runs),
                ]
            })
            .collect();
        let (schema, batches) = text_batch(
            &[
                "id",
                "address",
                "epoch",
                "ms_since_heartbeat",
                "launches_sent",
                "launches_received",
                "map_tasks",
                "reduce_tasks",
                "notices_sent",
                "notices_received",
                "reduces_started_by_notices",
                "reduces_started_by_coordinator",
                "coordinator_messages_in_group",
                "blocks_read_local",
                "blocks_fetched_remote",
                "out_of_order_reduces",
                "blocks_held",
                "block_bytes_held",
                "partitions_adopted",
                "fetch_failures",
                "task_slots",
                "peak_tasks_running",
                "empty_results_in_runs",
            ],
            rows,
        );
        Outcome::Rows {
            schema,
            batches,
            tag: "SHOW",
        }
    }

    fn show_create(&self, kind: ObjectKind, name: &str) -> Result<Outcome, PgError> {
        let text = match kind {
            ObjectKind::Stream => {
                let s = self
                    .catalog
                    .stream(name)
                    .ok_or_else(|| PgError::undefined_table(name))?;
                let mut parts: Vec<String> = s.columns.iter().map(column_ddl).collect();
                if let Some(p) = &s.proctime {
                    parts.push(format!("{p} AS PROCTIME()"));
                }
                if let Some(w) = &s.watermark {
                    parts.push(format!(
                        "WATERMARK FOR {} AS {} - INTERVAL '{}' MILLISECOND",
                        w.column, w.column, w.delay_ms
                    ));
                }
                let mut opts: Vec<String> = s
                    .options
                    .iter()
                    .map(|(k, v)| format!("{k} = '{}'", v.replace('\'', "''")))
                    .collect();
                if s.partitions != 1 {
                    opts.push(format!("partitions = '{}'", s.partitions));
                }
                let with = if opts.is_empty() {
                    String::new()
                } else {
                    format!(" WITH ({})", opts.join(", "))
                };
                format!("CREATE STREAM {} ({}){}", s.name, parts.join(", "), with)
            }
            ObjectKind::Table => {
                let t = self
                    .catalog
                    .table(name)
                    .ok_or_else(|| PgError::undefined_table(name))?;
                let parts: Vec<String> = t.columns.iter().map(column_ddl).collect();
                format!("CREATE TABLE {} ({})", t.name, parts.join(", "))
            }
            ObjectKind::MaterializedView => {
                let v = self
                    .catalog
                    .view(name)
                    .ok_or_else(|| PgError::undefined_table(name))?;
                format!("CREATE MATERIALIZED VIEW {} AS {}", v.name, v.query)
            }
        };
        let (schema, batches) = text_batch(
            &["name", "create_sql"],
            vec![vec![Some(name.to_string()), Some(text)]],
        );
        Ok(Outcome::Rows {
            schema,
            batches,
            tag: "SHOW",
        })
    }

    /// Deletes a view's output log and checkpoints.
    async fn remove_view_data(&self, oid: Oid) {
        let dir = self.catalog.view_dir(oid);
        if dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(view = oid, "cannot delete {}: {e}", dir.display());
            }
        }
        if let Some(store) = self.runtime.checkpoints() {
            if let Err(e) = store.remove(&view_key(oid)).await {
                tracing::warn!(view = oid, "cannot delete its checkpoints: {e}");
            }
        }
    }

    /// Restarts a view after a server restart: its contents come back from
    /// its output log, its state from its last checkpoint, and the batches
    /// since are replayed (results the log already holds are dropped).
    async fn resume_view(self: &Arc<Self>, def: &ViewDef) -> Result<(), PgError> {
        let stmts = drizzle_planner::parse_statements(&def.query)?;
        let Some(DrizzleStatement::Query(query)) = stmts.into_iter().next() else {
            return Err(PgError::internal(format!("view {} has no query", def.name)));
        };
        let plan = match self.plan_view(&query, &[])? {
            PlannedQuery::Continuous(p) => *p,
            PlannedQuery::Finite(_) => {
                return Err(PgError::internal("view query is not continuous"))
            }
        };
        let oid = self
            .catalog
            .oid(&def.name)
            .ok_or_else(|| PgError::internal(format!("view {} has no object id", def.name)))?;
        if def.origin_unix_us.is_none() {
            // Made before origins existed: no stable batch ids, so the view
            // is rebuilt from the start of its input.
            self.remove_view_data(oid).await;
        }
        let store = Arc::new(
            new_view_store(&plan)?.with_log(self.catalog.view_dir(oid).join("output.log"))?,
        );
        self.catalog.attach_view(&def.name, Arc::clone(&store));
        let resume = match (self.runtime.checkpoints(), def.origin_unix_us) {
            (Some(cs), Some(_)) => cs.latest(&view_key(oid)).await?,
            _ => None,
        };
        if let Some(m) = &resume {
            tracing::info!(view = %def.name, batch = m.batch, "resuming from checkpoint");
        }
        self.launch_view(def, oid, plan, store, resume)
    }

    fn launch_view(
        &self,
        def: &ViewDef,
        oid: Oid,
        mut plan: StreamingPlan,
        store: Arc<ViewStore>,
        resume: Option<drizzle_exec::checkpoint::Manifest>,
    ) -> Result<(), PgError> {
        plan.graph.state_ttl_batches = ttl_batches(
            (def.state_ttl_us > 0).then(|| Duration::from_micros(def.state_ttl_us)),
            Duration::from_micros(def.batch_interval_us.max(1)),
        );
        let now_us = now_ms() * 1000;
        // A view made before origins existed has no stable batch ids: it
        // starts over (its log is replayed, not its checkpoints).
        let stable = def.origin_unix_us.is_some();
        let mut inputs = Vec::new();
        for (i, stream) in plan.streams().into_iter().enumerate() {
            let sources = self.input_sources(stream)?;
            let mut offsets = match i {
                0 => def.start_offsets.clone(),
                i => def
                    .more_start_offsets
                    .get(i - 1)
                    .cloned()
                    .unwrap_or_default(),
            };
            offsets.resize(sources.len(), 0);
            for (o, s) in offsets.iter_mut().zip(&sources) {
                if !stable
                    && matches!(s, drizzle_exec::sources::SourcePartition::Generated(g, _) if g.starts_now())
                {
                    *o = s.available(now_us);
                }
            }
            inputs.push(InputSpec {
                sources,
                start_offsets: offsets,
            });
        }
        let spec = QuerySpec {
            plan,
            inputs,
            batch_interval: Duration::from_micros(def.batch_interval_us.max(1)),
            group_size: def.group_size,
            scheduling: self.config.scheduling,
            reduce_partitions: def.parallelism.max(1),
            label: format!("MATERIALIZED VIEW {}", def.name),
            durability: drizzle_exec::Durability {
                key: Some(view_key(oid)),
                skip_through: if stable {
                    *store.last_batch.lock()
                } else {
                    None
                },
                resume: if stable { resume } else { None },
                origin_unix_us: def.origin_unix_us,
                durable_sink: true,
            },
            memory_limit: self.config.query_memory_limit,
        };
        let mut handle = self.runtime.start_query(spec)?;
        let id = handle.id;
        let catalog = Arc::clone(&self.catalog);
        let name = def.name.clone();
        let task = tokio::spawn(async move {
            while let Some(next) = handle.next().await {
                match next {
                    Ok(batch) => {
                        let id = batch.batch;
                        let applied =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                store.apply(id.0, batch.rows)
                            }));
                        let failed = match applied {
                            Ok(Ok(())) => None,
                            Ok(Err(e)) => Some(e.to_string()),
                            Err(_) => Some("internal error applying a batch".to_string()),
                        };
                        if let Some(e) = failed {
                            tracing::error!(view = %name, "materialized view failed: {e}");
                            *store.error.lock() = Some(e);
                            handle.cancel();
                            break;
                        }
                        // Durable: a checkpoint may now cover this batch.
                        handle.commit(id);
                        catalog.bump_data_version(&name);
                    }
                    Err(e) => {
                        tracing::error!(view = %name, "materialized view failed: {e}");
                        *store.error.lock() = Some(e.to_string());
                        break;
                    }
                }
            }
        });
        self.views.lock().insert(def.name.clone(), (task, id));
        Ok(())
    }
}

/// A state TTL in micro-batches of `interval` (rounded up, at least 1).
fn ttl_batches(ttl: Option<Duration>, interval: Duration) -> Option<u64> {
    let ttl = ttl?;
    let interval = interval.as_micros().max(1);
    Some(
        ttl.as_micros()
            .div_ceil(interval)
            .clamp(1, u64::MAX as u128) as u64,
    )
}

/// A view's key in the checkpoint store: its object id, never its name.
fn view_key(oid: Oid) -> String {
    format!("views/{oid}")
}

fn new_view_store(plan: &StreamingPlan) -> Result<ViewStore, PgError> {
    let schema = Arc::clone(&plan.output_schema);
    match plan.emit {
        EmitMode::Upsert => {
            let keys = plan.upsert_keys.clone().ok_or_else(|| {
                PgError::unsupported("a materialized view over GROUP BY that does not select every group column is not supported")
                    .with_hint("add the GROUP BY columns to the SELECT list")
            })?;
            ViewStore::upsert(schema, keys, plan.op_column, plan.rank_column)
                .map_err(|e| PgError::internal(e.to_string()))
        }
        EmitMode::Changes => {
            ViewStore::changes(schema).map_err(|e| PgError::internal(e.to_string()))
        }
        _ => {
            let mut store = ViewStore::append(schema);
            store.event_time = plan
                .event_time
                .and_then(|i| plan.output_schema.fields().get(i))
                .filter(|f| matches!(f.data_type(), DataType::Timestamp(_, _)))
                .map(|f| f.name().clone());
            Ok(store)
        }
    }
}

/// `name TYPE [NOT NULL]`, for SHOW CREATE.
fn column_ddl(c: &drizzle_planner::ColumnDef) -> String {
    format!(
        "{} {}{}",
        c.name,
        c.sql_type,
        if c.nullable { "" } else { " NOT NULL" }
    )
}

fn column_names(columns: &[drizzle_planner::ColumnDef]) -> String {
    columns
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The value `SHOW name` prints.
pub fn show_setting(settings: &Settings, name: &str) -> Result<String, PgError> {
    Ok(match name {
        "batch_interval" => format!("{}ms", settings.batch_interval.as_micros() as f64 / 1000.0),
        "group_size" => match settings.group_size {
            0 => "auto".to_string(),
            g => g.to_string(),
        },
        "parallelism" => settings.parallelism.to_string(),
        "scheduling" => settings.scheduling.to_string(),
        "stream_start" => if settings.start_latest {
            "latest"
        } else {
            "earliest"
        }
        .into(),
        "cursor_fetch_timeout" => match settings.fetch_timeout {
            Some(t) => format!("{}ms", t.as_millis()),
            None => "0".into(),
        },
        "query_memory_limit" => format_memory_size(settings.memory_limit),
        "state_ttl" => match settings.state_ttl {
            Some(t) if t.subsec_millis() == 0 => format!("{}s", t.as_secs()),
            Some(t) => format!("{}ms", t.as_millis()),
            None => "0".into(),
        },
        "statement_timeout" => match settings.statement_timeout {
            Some(t) if t.subsec_millis() == 0 => format!("{}s", t.as_secs()),
            Some(t) => format!("{}ms", t.as_millis()),
            None => "0".into(),
        },
        other => match settings.other.get(other) {
            Some(v) => v.clone(),
            None => match postgres_parameter(other) {
                Some(p) => p.default.into(),
                None => {
                    return Err(PgError::new(
                        "42704",
                        format!("unrecognized configuration parameter \"{other}\""),
                    ))
                }
            },
        },
    })
}

/// Drizzle's own settings, for `SHOW ALL`: (name, description).
const DRIZZLE_PARAMETERS: &[(&str, &str)] = &[
    (
        "batch_interval",
        "Micro-batch interval of new continuous queries.",
    ),
    (
        "group_size",
        "Micro-batches per scheduling group ('auto' adapts).",
    ),
    (
        "parallelism",
        "Reduce partitions of new continuous queries (0: one per worker).",
    ),
    (
        "scheduling",
        "drizzle (group scheduling, pre-scheduled shuffles), group or bsp.",
    ),
    (
        "stream_start",
        "Where a continuous query starts reading a stream: earliest or latest.",
    ),
    (
        "cursor_fetch_timeout",
        "How long FETCH waits for its rows (0: until they arrive).",
    ),
    (
        "query_memory_limit",
        "Memory budget of a continuous query's state.",
    ),
    (
        "statement_timeout",
        "Cancel any statement running longer (0: no limit).",
    ),
    (
        "state_ttl",
        "Evict keyed state of later continuous queries idle this long (0: keep).",
    ),
];

/// A Postgres parameter Drizzle knows.
struct PostgresParameter {
    name: &'static str,
    default: &'static str,
    /// False for the read-only ones (SET gets 55P02).
    settable: bool,
    description: &'static str,
}

const fn param(
    name: &'static str,
    default: &'static str,
    settable: bool,
    description: &'static str,
) -> PostgresParameter {
    PostgresParameter {
        name,
        default,
        settable,
        description,
    }
}

/// Postgres parameters drivers and tools read or set. The read-only ones
/// describe the server; the settable ones are kept per session and shown
/// back, with no effect on Drizzle unless the description says otherwise.
const POSTGRES_PARAMETERS: &[PostgresParameter] = &[
    param(
        "server_version",
        crate::SERVER_VERSION,
        false,
        "Postgres version Drizzle speaks (and its own).",
    ),
    param(
        "server_version_num",
        crate::SERVER_VERSION_NUM,
        false,
        "Postgres version as a number.",
    ),
    param("server_encoding", "UTF8", false, "Text is UTF-8."),
    param(
        "client_encoding",
        "UTF8",
        true,
        "Accepted; text is always UTF-8.",
    ),
    param(
        "datestyle",
        "ISO, MDY",
        true,
        "Accepted; dates are always ISO.",
    ),
    param("timezone", "UTC", true, "Accepted; timestamps are UTC."),
    param("intervalstyle", "postgres", true, "Accepted; no effect."),
    param("integer_datetimes", "on", false, "Timestamps are integers."),
    param(
        "standard_conforming_strings",
        "on",
        true,
        "Backslashes in '...' are literal.",
    ),
    param(
        "is_superuser",
        "off",
        false,
        "Whether the session's role is a superuser.",
    ),
    param("session_authorization", "", false, "The session's role."),
    param(
        "application_name",
        "",
        true,
        "The client's name, shown nowhere yet.",
    ),
    param(
        "extra_float_digits",
        "1",
        true,
        "Accepted; floats print shortest-exact.",
    ),
    param(
        "search_path",
        "public",
        true,
        "Accepted; relations live in public.",
    ),
    param(
        "client_min_messages",
        "notice",
        true,
        "Accepted; no effect.",
    ),
    param(
        "lock_timeout",
        "0",
        true,
        "Accepted; Drizzle takes no user-visible locks.",
    ),
    param(
        "idle_in_transaction_session_timeout",
        "0",
        true,
        "Accepted; no effect.",
    ),
    param("idle_session_timeout", "0", true, "Accepted; no effect."),
    param("bytea_output", "hex", true, "Accepted; no effect."),
    param(
        "default_transaction_isolation",
        "read committed",
        true,
        "Accepted; every statement is its own snapshot.",
    ),
    param(
        "transaction_isolation",
        "read committed",
        true,
        "Accepted; every statement is its own snapshot.",
    ),
    param(
        "default_transaction_read_only",
        "off",
        true,
        "Accepted; no effect.",
    ),
    param("transaction_read_only", "off", true, "Accepted; no effect."),
    param(
        "max_identifier_length",
        "63",
        false,
        "Identifiers are not truncated.",
    ),
    param("work_mem", "4MB", true, "Accepted; see query_memory_limit."),
    param("maintenance_work_mem", "64MB", true, "Accepted; no effect."),
    param("row_security", "on", true, "Accepted; no effect."),
    param("xmloption", "content", true, "Accepted; no effect."),
    param(
        "synchronous_commit",
        "on",
        true,
        "Accepted; writes are always synced.",
    ),
    param(
        "in_hot_standby",
        "off",
        false,
        "Drizzle is never a standby.",
    ),
    param("lc_messages", "C", true, "Accepted; messages are English."),
    param("lc_monetary", "C", true, "Accepted; no effect."),
    param("lc_numeric", "C", true, "Accepted; no effect."),
    param("lc_time", "C", true, "Accepted; no effect."),
    param("lc_collate", "C", false, "Text sorts bytewise."),
    param("lc_ctype", "C", false, "Character classes are Unicode."),
    param("jit", "off", true, "Accepted; no effect."),
    param(
        "block_size",
        "8192",
        false,
        "Reported for tools; no meaning here.",
    ),
    param(
        "max_connections",
        "100",
        false,
        "Reported for tools; sessions are not capped.",
    ),
    param(
        "session_characteristics.isolation",
        "read committed",
        true,
        "Accepted; no effect.",
    ),
];

fn postgres_parameter(name: &str) -> Option<&'static PostgresParameter> {
    POSTGRES_PARAMETERS.iter().find(|p| p.name == name)
}

/// Every parameter: name, current setting and description (`SHOW ALL`,
/// `pg_settings`).
pub fn all_settings(settings: &Settings) -> Vec<(String, Option<String>, String)> {
    let drizzle = DRIZZLE_PARAMETERS.iter().map(|(n, d)| (*n, *d));
    let postgres = POSTGRES_PARAMETERS.iter().map(|p| (p.name, p.description));
    drizzle
        .chain(postgres)
        .map(|(name, description)| {
            (
                name.to_string(),
                show_setting(settings, name).ok(),
                description.to_string(),
            )
        })
        .collect()
}

/// `SHOW ALL`.
fn show_all(settings: &Settings) -> (SchemaRef, Vec<RecordBatch>) {
    let rows = all_settings(settings)
        .into_iter()
        .map(|(n, v, d)| vec![Some(n), v, Some(d)])
        .collect();
    text_batch(&["name", "setting", "description"], rows)
}

/// `SET name = value`.
pub fn apply_setting(settings: &mut Settings, name: &str, value: &str) -> Result<(), PgError> {
    let invalid = |what: &str| {
        PgError::new(
            "22023",
            format!("invalid value for {name}: \"{value}\" ({what})"),
        )
    };
    match name {
        "batch_interval" => {
            let us = drizzle_planner::statement::parse_duration_setting_us(value)?;
            if !(100..=3_600_000_000).contains(&us) {
                return Err(invalid("from 0.1ms to 1h"));
            }
            settings.batch_interval = Duration::from_micros(us);
        }
        "group_size" => {
            settings.group_size = if value.eq_ignore_ascii_case("auto") {
                0
            } else {
                value
                    .parse()
                    .ok()
                    .filter(|g| (1..=10_000).contains(g))
                    .ok_or_else(|| invalid("'auto' or a number from 1 to 10000"))?
            };
        }
        "scheduling" => {
            settings.scheduling = value
                .parse()
                .map_err(|_| invalid("'drizzle', 'group' or 'bsp'"))?;
        }
        "parallelism" => {
            settings.parallelism = value
                .parse()
                .ok()
                .filter(|g| (1..=1024).contains(g))
                .ok_or_else(|| invalid("a number from 1 to 1024"))?;
        }
        "stream_start" => {
            settings.start_latest = match value.to_lowercase().as_str() {
                "latest" => true,
                "earliest" => false,
                _ => return Err(invalid("'earliest' or 'latest'")),
            }
        }
        "cursor_fetch_timeout" => {
            let us = drizzle_planner::statement::parse_duration_setting_us(value)?;
            settings.fetch_timeout = (us > 0).then(|| Duration::from_micros(us));
        }
        "state_ttl" => {
            let v = value.trim();
            settings.state_ttl = if v == "0" || v.eq_ignore_ascii_case("default") {
                None
            } else {
                Some(Duration::from_micros(
                    drizzle_planner::statement::parse_duration_setting_us(v)?,
                ))
            };
        }
        "statement_timeout" => {
            let v = value.trim();
            settings.statement_timeout = if v == "0" || v.eq_ignore_ascii_case("default") {
                None
            } else {
                Some(Duration::from_micros(
                    drizzle_planner::statement::parse_duration_setting_us(v)?,
                ))
            };
        }
        "query_memory_limit" => {
            settings.memory_limit = parse_memory_size(value)
                .ok_or_else(|| invalid("a size such as '256MB' or '1GB', or 'unlimited'"))?;
        }
        other => match postgres_parameter(other) {
            Some(p) if p.settable => {
                settings.other.insert(other.to_string(), value.to_string());
            }
            Some(_) => {
                return Err(PgError::new(
                    "55P02",
                    format!("parameter \"{other}\" cannot be changed"),
                ))
            }
            None => {
                return Err(PgError::new(
                    "42704",
                    format!("unrecognized configuration parameter \"{other}\""),
                ))
            }
        },
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_read_and_print_as_postgres_does() {
        assert_eq!(parse_memory_size("256MB"), Some(256 << 20));
        assert_eq!(parse_memory_size("1 GB"), Some(1 << 30));
        assert_eq!(parse_memory_size("64kB"), Some(64 << 10));
        assert_eq!(parse_memory_size("1024"), Some(1 << 20), "bare number: kB");
        assert_eq!(parse_memory_size("10b"), Some(10));
        for none in ["unlimited", "-1", "0"] {
            assert_eq!(parse_memory_size(none), Some(0), "{none}");
        }
        for bad in [
            "",
            "lots",
            "12XB",
            "-5MB",
            "99999999999999999999TB",
            "1.5GB",
        ] {
            assert_eq!(parse_memory_size(bad), None, "{bad}");
        }
        assert_eq!(format_memory_size(1 << 30), "1GB");
        assert_eq!(format_memory_size(4 << 20), "4MB");
        assert_eq!(format_memory_size(1536), "1536B");
        assert_eq!(format_memory_size(0), "unlimited");
    }
}
