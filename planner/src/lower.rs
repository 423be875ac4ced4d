//! From SQL to a [`StreamingPlan`] (continuous) or a DataFusion
//! [`LogicalPlan`] (finite).
//!
//! DataFusion resolves names through [`DrizzleContextProvider`], plans and
//! optimises the query; [`lower`] then walks the optimised logical plan and
//! turns it into Drizzle's streaming pipeline, refusing with a clear
//! `0A000` what cannot run on an unbounded stream.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::tree_node::TreeNode;
use datafusion::common::ScalarValue;
use datafusion::common::{DFSchema, TableReference};
use datafusion::config::ConfigOptions;
use datafusion::datasource::{provider_as_source, source_as_provider, TableProvider};
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::planner::{ContextProvider, ExprPlanner};
use datafusion::logical_expr::{
    AggregateUDF, Expr, HigherOrderUDF, JoinType, LogicalPlan, ScalarUDF, TableSource, WindowUDF,
};
use datafusion::physical_expr::aggregate::LoweredAggregateBuilder;
use datafusion::physical_expr::{create_physical_expr, PhysicalExpr};
use datafusion::sql::planner::SqlToRel;
use datafusion::sql::sqlparser::ast::Query;

use crate::catalog::StreamDef;
use crate::error::{PlanError, Result};
use crate::graph::{Operator, Partitioning, Stage, StageGraph, StageId, StageInput, StageOutput};
use crate::plan::{
    AggregatePlan, BatchOp, EmitMode, LookupJoinSpec, StreamingPlan, WindowGroup, WindowJoinPlan,
};
use crate::providers::{StreamProvider, WindowKind, WindowProvider, WindowSpec};

/// A relation a name resolves to.
#[derive(Debug, Clone)]
pub enum Relation {
    /// A stream.
    Stream(StreamDef),
    /// A finite relation (table or materialized view) DataFusion can scan.
    Finite(Arc<dyn TableProvider>),
}

/// Looks up relations by name; implemented by the server's catalog.
pub trait RelationResolver: Send + Sync {
    /// The relation called `name` (already normalised), if any.
    fn resolve(&self, name: &str) -> Option<Relation>;

    /// A system relation: `schema` is `pg_catalog` or `information_schema`.
    fn resolve_system(&self, _schema: &str, _name: &str) -> Option<Relation> {
        None
    }

    /// A user's SQL function called `name` (already normalised), if any.
    fn function(&self, _name: &str) -> Option<crate::catalog::FunctionDef> {
        None
    }
}

/// Resolves nothing: what a SQL function's body is planned against (it
/// sees its arguments and the built-in functions only, so a function can
/// never call itself).
pub(crate) struct NothingResolver;

impl RelationResolver for NothingResolver {
    fn resolve(&self, _name: &str) -> Option<Relation> {
        None
    }
}

/// A planned query.
#[derive(Debug)]
pub enum PlannedQuery {
    /// Reads no stream: DataFusion runs it to completion.
    Finite(LogicalPlan),
    /// Reads a stream: runs as micro-batches until cancelled or `LIMIT`.
    Continuous(Box<StreamingPlan>),
}

/// Name resolution for DataFusion's SQL planner.
pub struct DrizzleContextProvider<'a> {
    state: &'a SessionState,
    resolver: &'a dyn RelationResolver,
}

impl<'a> DrizzleContextProvider<'a> {
    /// Resolution against `resolver`, functions from `state`.
    pub fn new(state: &'a SessionState, resolver: &'a dyn RelationResolver) -> Self {
        Self { state, resolver }
    }
}

fn df_plan_err(msg: String) -> datafusion::error::DataFusionError {
    datafusion::error::DataFusionError::Plan(msg)
}

/// A window function's interval argument in milliseconds: a fixed,
/// positive `INTERVAL`.
fn window_interval(e: &Expr, usage: &str) -> datafusion::error::Result<i64> {
    let ms = match e {
        Expr::Literal(ScalarValue::IntervalMonthDayNano(Some(v)), _) if v.months == 0 => {
            v.days as i64 * 86_400_000 + v.nanoseconds / 1_000_000
        }
        Expr::Literal(ScalarValue::IntervalDayTime(Some(v)), _) => {
            v.days as i64 * 86_400_000 + v.milliseconds as i64
        }
        other => {
            return Err(df_plan_err(format!(
                "expected a fixed INTERVAL (no months) in {usage}, found {other}"
            )))
        }
    };
    if ms <= 0 {
        return Err(df_plan_err(format!(
            "window intervals must be positive in {usage}"
        )));
    }
    Ok(ms)
}

/// Most windows `HOP` puts one row of a table in.
const MAX_HOP_COPIES: i64 = 1024;

/// `TUMBLE`/`HOP` over a table: the table's rows with a non-NULL time,
/// each once per window it falls in, plus `window_start` and `window_end`;
/// the same windows a stream gets, with no watermark (a table is complete).
fn finite_window(
    name: &str,
    table: Arc<dyn TableProvider>,
    ts: &str,
    kind: WindowKind,
    args: &[Expr],
    usage: &str,
) -> datafusion::error::Result<Arc<dyn TableSource>> {
    use datafusion::common::Column;
    use datafusion::logical_expr::{lit, LogicalPlanBuilder};
    let schema = table.schema();
    if let Some(f) = schema
        .fields()
        .iter()
        .find(|f| f.name() == "window_start" || f.name() == "window_end")
    {
        return Err(df_plan_err(format!(
            "{usage}: {name} already has a column {}, which the window would add",
            f.name()
        )));
    }
    let tz = match schema.field_with_name(ts).map(|f| f.data_type()) {
        Ok(DataType::Timestamp(_, tz)) => tz.clone(),
        Ok(other) => {
            return Err(df_plan_err(format!(
                "type mismatch: window time column {ts} must be a TIMESTAMP, not {other}"
            )))
        }
        Err(_) => {
            return Err(datafusion::error::DataFusionError::SchemaError(
                Box::new(datafusion::common::SchemaError::FieldNotFound {
                    field: Box::new(Column::new_unqualified(ts)),
                    valid_fields: vec![],
                }),
                Box::new(None),
            ))
        }
    };
    let (slide_ms, size_ms) = match kind {
        WindowKind::Tumble | WindowKind::Session => {
            let s = window_interval(&args[2], usage)?;
            (s, s)
        }
        WindowKind::Hop => (
            window_interval(&args[2], usage)?,
            window_interval(&args[3], usage)?,
        ),
    };
    if size_ms % slide_ms != 0 || slide_ms > size_ms {
        return Err(df_plan_err(format!(
            "HOP size ({size_ms} ms) must be a multiple of its slide ({slide_ms} ms)"
        )));
    }
    let copies = size_ms / slide_ms;
    if copies > MAX_HOP_COPIES {
        return Err(df_plan_err(format!(
            "HOP over a table puts each row in {copies} windows; at most {MAX_HOP_COPIES}"
        )));
    }
    let interval = |ms: i64| {
        lit(ScalarValue::IntervalMonthDayNano(Some(
            arrow::datatypes::IntervalMonthDayNano::new(0, 0, ms.saturating_mul(1_000_000)),
        )))
    };
    let time = Expr::Column(Column::new_unqualified(ts));
    let scan = LogicalPlanBuilder::scan(name, provider_as_source(table), None)?
        .filter(time.clone().is_not_null())?
        .build()?;
    let ts_type = DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, tz);
    let mut plan: Option<LogicalPlanBuilder> = None;
    for i in 0..copies {
        let bin = datafusion::functions::datetime::date_bin()
            .call(vec![interval(slide_ms), time.clone()]);
        let start = Expr::Cast(datafusion::logical_expr::Cast::new(
            Box::new(bin - interval(i * slide_ms)),
            ts_type.clone(),
        ));
        let mut exprs: Vec<Expr> = schema
            .fields()
            .iter()
            .map(|f| Expr::Column(Column::new(Some(TableReference::bare(name)), f.name())))
            .collect();
        exprs.push(start.clone().alias("window_start"));
        exprs.push((start + interval(size_ms)).alias("window_end"));
        let branch = LogicalPlanBuilder::from(scan.clone()).project(exprs)?;
        plan = Some(match plan {
            None => branch,
            Some(p) => p.union(branch.build()?)?,
        });
    }
    let plan = plan
        .ok_or_else(|| df_plan_err(format!("{usage}: no window")))?
        .build()?;
    Ok(provider_as_source(Arc::new(
        datafusion::datasource::ViewTable::new(plan, None),
    )))
}

impl ContextProvider for DrizzleContextProvider<'_> {
    fn get_table_source(
        &self,
        name: TableReference,
    ) -> datafusion::error::Result<Arc<dyn TableSource>> {
        let found = match name.schema() {
            Some(schema @ ("pg_catalog" | "information_schema")) => {
                self.resolver.resolve_system(schema, name.table())
            }
            Some("public") => self.resolver.resolve(name.table()),
            Some(_) => None,
            // Unqualified: the user's relations, then pg_catalog's (which
            // Postgres searches implicitly).
            None => self
                .resolver
                .resolve(name.table())
                .or_else(|| self.resolver.resolve_system("pg_catalog", name.table())),
        };
        match found {
            Some(Relation::Stream(def)) => {
                Ok(provider_as_source(Arc::new(StreamProvider::new(def))))
            }
            Some(Relation::Finite(p)) => Ok(provider_as_source(p)),
            None => Err(df_plan_err(format!("table '{}' not found", name.table()))),
        }
    }

    fn get_table_function_source(
        &self,
        name: &str,
        args: Vec<Expr>,
    ) -> datafusion::error::Result<Arc<dyn TableSource>> {
        let kind = match name.to_lowercase().trim_matches('"') {
            "tumble" => WindowKind::Tumble,
            "hop" => WindowKind::Hop,
            "session" => WindowKind::Session,
            other => {
                return Err(datafusion::error::DataFusionError::NotImplemented(format!(
                    "table function {other}; Drizzle has TUMBLE(stream, ts, size), \
                     HOP(stream, ts, slide, size) and SESSION(stream, ts, gap)"
                )))
            }
        };
        let usage = match kind {
            WindowKind::Tumble => "TUMBLE(stream, time_column, INTERVAL 'n' SECOND)",
            WindowKind::Hop => "HOP(stream, time_column, INTERVAL slide, INTERVAL size)",
            WindowKind::Session => "SESSION(stream, time_column, INTERVAL gap)",
        };
        let want = if kind == WindowKind::Hop { 4 } else { 3 };
        if args.len() != want {
            return Err(df_plan_err(format!(
                "wrong number of arguments: write {usage}"
            )));
        }
        // The arguments are names; inside a correlated subquery DataFusion
        // may have resolved one against the outer query first.
        let ident = |e: &Expr| match e {
            Expr::Column(c) => Ok(c.name.clone()),
            Expr::OuterReferenceColumn(_, c) => Ok(c.name.clone()),
            other => Err(df_plan_err(format!(
                "expected a name in {usage}, found {other}"
            ))),
        };
        let stream_name = ident(&args[0])?;
        let ts = ident(&args[1])?;
        let stream = match self.resolver.resolve(&stream_name) {
            Some(Relation::Stream(def)) => def,
            // Over a table, the same windows as a finite relation: a batch
            // query computes what the continuous one does over a stream.
            Some(Relation::Finite(_)) if kind == WindowKind::Session => {
                return Err(datafusion::error::DataFusionError::NotImplemented(format!(
                    "SESSION over table {stream_name}: session windows are kept per key of a \
                     continuous aggregation over a stream; over a table, number the sessions \
                     with LAG() and SUM() OVER (PARTITION BY key ORDER BY {ts})"
                )))
            }
            Some(Relation::Finite(table)) => {
                return finite_window(&stream_name, table, &ts, kind, &args, usage)
            }
            None => return Err(df_plan_err(format!("table '{stream_name}' not found"))),
        };
        if let Some(c) = stream
            .columns
            .iter()
            .find(|c| c.name == "window_start" || c.name == "window_end")
        {
            return Err(df_plan_err(format!(
                "{usage}: {stream_name} already has a column {}, which the window would add; \
                 rename it (window_start AS ...) in the view that makes it",
                c.name
            )));
        }
        let schema = stream.schema();
        let time_column = schema.index_of(&ts).map_err(|_| {
            datafusion::error::DataFusionError::SchemaError(
                Box::new(datafusion::common::SchemaError::FieldNotFound {
                    field: Box::new(datafusion::common::Column::new_unqualified(ts.clone())),
                    valid_fields: vec![],
                }),
                Box::new(None),
            )
        })?;
        let processing_time = stream.proctime.as_deref() == Some(ts.as_str());
        if let Some(c) = stream.columns.get(time_column) {
            if !matches!(c.data_type, DataType::Timestamp(_, _)) {
                return Err(df_plan_err(format!(
                    "type mismatch: window time column {ts} must be a TIMESTAMP, not {}",
                    c.sql_type
                )));
            }
        }
        if kind == WindowKind::Session && processing_time {
            return Err(datafusion::error::DataFusionError::NotImplemented(format!(
                "SESSION over the processing-time column {ts}: session windows are over \
                 event time; use TUMBLE or HOP over {ts}"
            )));
        }
        let interval = |e: &Expr| window_interval(e, usage);
        let (slide_ms, size_ms) = match kind {
            WindowKind::Tumble | WindowKind::Session => {
                let s = interval(&args[2])?;
                (s, s)
            }
            WindowKind::Hop => (interval(&args[2])?, interval(&args[3])?),
        };
        if kind == WindowKind::Hop && (size_ms % slide_ms != 0 || slide_ms > size_ms) {
            return Err(df_plan_err(format!(
                "HOP size ({size_ms} ms) must be a multiple of its slide ({slide_ms} ms)"
            )));
        }
        let delay_ms = if processing_time {
            // Processing time: a micro-batch's rows all have its trigger
            // time, so the watermark is the batch's time, with no delay.
            0
        } else {
            let Some(wm) = &stream.watermark else {
                return Err(df_plan_err(format!(
                    "windows need event time: stream {} has no watermark; declare WATERMARK FOR {ts} AS {ts} - INTERVAL '1' SECOND \
                     (or a processing-time column: p_time AS PROCTIME())",
                    stream.name
                )));
            };
            if wm.column != ts {
                return Err(df_plan_err(format!(
                    "the window column {ts} must be the watermark column {} of stream {}{}",
                    wm.column,
                    stream.name,
                    stream
                        .proctime
                        .as_ref()
                        .map(|p| format!(" or its processing-time column {p}"))
                        .unwrap_or_default()
                )));
            }
            wm.delay_ms
        };
        let spec = WindowSpec {
            kind,
            time_column,
            time_column_name: ts,
            size_ms,
            slide_ms,
            watermark_delay_ms: delay_ms,
            processing_time,
        };
        Ok(provider_as_source(Arc::new(WindowProvider::new(
            stream, spec,
        ))))
    }

    fn get_expr_planners(&self) -> &[Arc<dyn ExprPlanner>] {
        self.state.expr_planners()
    }

    fn get_function_meta(&self, name: &str) -> Option<Arc<ScalarUDF>> {
        if let Some(f) = self.state.scalar_functions().get(name) {
            return Some(Arc::clone(f));
        }
        let def = self.resolver.function(name)?;
        let body_context = DrizzleContextProvider::new(self.state, &NothingResolver);
        // A body that no longer plans (a function it used is gone) leaves
        // the name unresolved: the query fails with DataFusion's error.
        crate::functions::sql::SqlFunction::new(def, &body_context)
            .ok()
            .map(|f| Arc::new(ScalarUDF::from(f)))
    }

    fn get_higher_order_meta(&self, name: &str) -> Option<Arc<HigherOrderUDF>> {
        self.state.higher_order_functions().get(name).cloned()
    }

    fn get_aggregate_meta(&self, name: &str) -> Option<Arc<AggregateUDF>> {
        self.state.aggregate_functions().get(name).cloned()
    }

    fn get_window_meta(&self, name: &str) -> Option<Arc<WindowUDF>> {
        self.state.window_functions().get(name).cloned()
    }

    fn get_variable_type(&self, _variable_names: &[String]) -> Option<DataType> {
        None
    }

    fn options(&self) -> &ConfigOptions {
        self.state.config_options()
    }

    fn udf_names(&self) -> Vec<String> {
        self.state.scalar_functions().keys().cloned().collect()
    }

    fn udaf_names(&self) -> Vec<String> {
        self.state.aggregate_functions().keys().cloned().collect()
    }

    fn higher_order_function_names(&self) -> Vec<String> {
        self.state
            .higher_order_functions()
            .keys()
            .cloned()
            .collect()
    }

    fn udwf_names(&self) -> Vec<String> {
        self.state.window_functions().keys().cloned().collect()
    }
}

/// Plans a query: DataFusion SQL planning and optimisation, then lowering
/// when the query reads a stream.
pub fn plan_query(
    state: &SessionState,
    resolver: &dyn RelationResolver,
    query: &Query,
    params: &[ScalarValue],
) -> Result<PlannedQuery> {
    plan_with(state, resolver, query, params, lower)
}

/// A materialized view's query: as [`plan_query`], except that `ORDER BY
/// ... LIMIT n` is a top-N (the view holds the first n rows of that order
/// as rows arrive; see [`lower_view`]).
pub fn plan_view_query(
    state: &SessionState,
    resolver: &dyn RelationResolver,
    query: &Query,
    params: &[ScalarValue],
) -> Result<PlannedQuery> {
    plan_with(state, resolver, query, params, lower_view)
}

/// A query as a finite plan, or lowered by `lowering` when it reads a stream.
fn plan_with(
    state: &SessionState,
    resolver: &dyn RelationResolver,
    query: &Query,
    params: &[ScalarValue],
    lowering: fn(&LogicalPlan) -> Result<StreamingPlan>,
) -> Result<PlannedQuery> {
    let logical = sql_to_logical(state, resolver, query, params)?;
    if !reads_stream(&logical) {
        return Ok(PlannedQuery::Finite(logical));
    }
    Ok(PlannedQuery::Continuous(Box::new(lowering(&logical)?)))
}

/// The top-N rank a view's `ORDER BY ... LIMIT n` adds as the output's
/// last column (the view keeps it hidden; it is the view's key).
pub const RANK_COLUMN: &str = "__drizzle_rank";

/// Lowers a materialized view's plan: `ORDER BY e LIMIT n` over a stream
/// becomes `ROW_NUMBER() OVER (ORDER BY e) <= n`, a top-N with no
/// partition (one reduce partition keeps the best n rows), whose rank is
/// carried to the output's last column ([`RANK_COLUMN`]) as the upsert key.
pub fn lower_view(plan: &LogicalPlan) -> Result<StreamingPlan> {
    let (stripped, limit) = strip_top_limit(plan)?;
    let Some(n) = limit else {
        return lower(plan);
    };
    let Some(ranked) = ordered_limit(&stripped, n)? else {
        return lower(plan);
    };
    let mut lowered = lower(&ranked)?;
    lowered.rank_column = true;
    Ok(lowered)
}

/// `plan` with the `Sort` under its projections and aliases replaced by a
/// `ROW_NUMBER()` over the sort's order bounded by `n`, the rank carried up
/// as the last column; `None` when there is no `Sort` there.
fn ordered_limit(plan: &LogicalPlan, n: usize) -> Result<Option<LogicalPlan>> {
    use datafusion::logical_expr::{col, lit, ExprFunctionExt, LogicalPlanBuilder};
    Ok(Some(match plan {
        LogicalPlan::Sort(s) => {
            let rank = datafusion::functions_window::expr_fn::row_number()
                .order_by(s.expr.clone())
                .build()?
                .alias(RANK_COLUMN);
            LogicalPlanBuilder::from(s.input.as_ref().clone())
                .window(vec![rank])?
                .filter(col(RANK_COLUMN).lt_eq(lit(n as u64)))?
                .build()?
        }
        LogicalPlan::Projection(p) => {
            let Some(input) = ordered_limit(&p.input, n)? else {
                return Ok(None);
            };
            let mut exprs = p.expr.clone();
            exprs.push(col(RANK_COLUMN));
            LogicalPlanBuilder::from(input).project(exprs)?.build()?
        }
        LogicalPlan::SubqueryAlias(a) => {
            let Some(input) = ordered_limit(&a.input, n)? else {
                return Ok(None);
            };
            LogicalPlanBuilder::from(input)
                .alias(a.alias.clone())?
                .build()?
        }
        _ => return Ok(None),
    }))
}

/// SQL to an optimised DataFusion logical plan.
pub fn sql_to_logical(
    state: &SessionState,
    resolver: &dyn RelationResolver,
    query: &Query,
    params: &[ScalarValue],
) -> Result<LogicalPlan> {
    let mut plan = sql_to_unoptimized(state, resolver, query)?;
    if !params.is_empty() {
        plan = plan.with_param_values(params.to_vec())?;
    }
    Ok(state.optimize(&plan)?)
}

/// SQL to DataFusion's logical plan before optimisation (for DESCRIBE and
/// parameter types: placeholders are still in it).
pub fn sql_to_unoptimized(
    state: &SessionState,
    resolver: &dyn RelationResolver,
    query: &Query,
) -> Result<LogicalPlan> {
    let provider = DrizzleContextProvider::new(state, resolver);
    let sql_to_rel = SqlToRel::new(&provider);
    let mut query = query.clone();
    let _ = datafusion::sql::sqlparser::ast::VisitMut::visit(&mut query, &mut WindowAliases);
    Ok(
        sql_to_rel.sql_statement_to_plan(datafusion::sql::sqlparser::ast::Statement::Query(
            Box::new(query),
        ))?,
    )
}

/// `FROM HOP(bid, ...)` without an alias is named after its stream, as in
/// Flink and RisingWave, so `bid.auction` resolves (Nexmark writes it so).
struct WindowAliases;

impl datafusion::sql::sqlparser::ast::VisitorMut for WindowAliases {
    type Break = ();

    fn pre_visit_table_factor(
        &mut self,
        t: &mut datafusion::sql::sqlparser::ast::TableFactor,
    ) -> std::ops::ControlFlow<()> {
        use datafusion::sql::sqlparser::ast::{
            Expr as SqlExpr, FunctionArg, FunctionArgExpr, ObjectNamePart, TableAlias, TableFactor,
        };
        if let TableFactor::Table {
            name,
            alias: alias @ None,
            args: Some(args),
            ..
        } = t
        {
            let is_window = matches!(
                name.0.last(),
                Some(ObjectNamePart::Identifier(i))
                    if i.value.eq_ignore_ascii_case("tumble") || i.value.eq_ignore_ascii_case("hop")
            );
            let stream = match args.args.first() {
                Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(SqlExpr::Identifier(i)))) => {
                    Some(i.clone())
                }
                Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(SqlExpr::CompoundIdentifier(
                    parts,
                )))) => parts.last().cloned(),
                _ => None,
            };
            if let (true, Some(stream)) = (is_window, stream) {
                *alias = Some(TableAlias {
                    explicit: true,
                    name: stream,
                    columns: vec![],
                    at: None,
                });
            }
        }
        std::ops::ControlFlow::Continue(())
    }
}

/// True when any scan in the plan reads a stream (or a window over one).
pub fn reads_stream(plan: &LogicalPlan) -> bool {
    let mut found = false;
    let _ = plan.apply(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            if let Ok(p) = source_as_provider(&scan.source) {
                if p.downcast_ref::<StreamProvider>().is_some()
                    || p.downcast_ref::<WindowProvider>().is_some()
                {
                    found = true;
                }
            }
        }
        Ok(if found {
            datafusion::common::tree_node::TreeNodeRecursion::Stop
        } else {
            datafusion::common::tree_node::TreeNodeRecursion::Continue
        })
    });
    // Subqueries in expressions are planned as separate plans; look there too.
    found
}

/// A window bound column of a flow's rows: `window_start` or `window_end`
/// of windows `size_us` long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WindowCol {
    is_end: bool,
    size_us: i64,
    /// A `SESSION` window's provisional bound (`[ts, ts + gap)` per row),
    /// which only an aggregation, merging the windows, makes final.
    session: bool,
}

/// Refuses an expression over a flow's provisional `SESSION` bounds
/// (before the aggregation that merges them, they are per row).
fn session_free(flow: &Flow, e: &Expr, schema: &DFSchema) -> Result<()> {
    let reads = e.column_refs().iter().any(|c| {
        schema
            .index_of_column(c)
            .ok()
            .and_then(|i| flow.windows.get(i).copied().flatten())
            .is_some_and(|w| w.session)
    });
    if reads {
        return Err(PlanError::unsupported_hint(
            "an expression over SESSION window bounds before they are aggregated",
            "GROUP BY window_start, window_end first, then filter or compute in an outer query",
        ));
    }
    Ok(())
}

/// Refuses a flow that still carries provisional `SESSION` bounds: only an
/// aggregation over them merges a key's rows into sessions.
fn no_open_sessions(flow: &Flow) -> Result<()> {
    if flow.windows.iter().flatten().any(|w| w.session) {
        return Err(PlanError::unsupported_hint(
            "SESSION windows that are not aggregated",
            "aggregate them: SELECT k, count(*), window_start, window_end FROM SESSION(s, ts, INTERVAL '10' SECOND) GROUP BY k, window_start, window_end",
        ));
    }
    Ok(())
}

/// The stage under construction for a subtree of the plan, and what its
/// rows are.
struct Flow {
    input: StageInput,
    operators: Vec<Operator>,
    /// Per output column: the window bound it is, if one.
    windows: Vec<Option<WindowCol>>,
    /// The rows are an upsert aggregate's (they change): nothing stateful
    /// may consume them until changelogs exist.
    upsert: bool,
    /// The rows come out when windows close (a windowed aggregate or a
    /// window join upstream).
    closes_windows: bool,
    /// Per output column: the stream's event-time (watermark) column, if it
    /// is that. Only within a source stage (reset at every cut): an
    /// interval join may add event-time tracking to that stage.
    event_time: Vec<Option<EventCol>>,
    /// At most one row per window: a windowed aggregate grouped by its
    /// window columns alone (and filters or projections of it). A join
    /// broadcasts such an input rather than gather a window in one
    /// partition.
    small: bool,
    /// The rows end with an `op` column past the plan's own ones (`upsert`
    /// or `delete`): an aggregate over changes, whose groups can vanish.
    /// Projections carry it along.
    op_column: bool,
    /// The rows are changes to a result without a key (`op` is `insert`
    /// or `delete`): an `OVER` over changing rows. Implies `upsert` (no
    /// stateful operator consumes them) and `op_column`.
    changes: bool,
}

/// A stream's event-time column as a flow carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EventCol {
    /// Its index in the stream's schema.
    stream_column: usize,
    /// Rows still to come have it at least the watermark minus this (µs),
    /// when the stage already tracks the watermark (a window assigner);
    /// `None` when nothing tracks it yet.
    lag_us: Option<i64>,
}

impl Flow {
    fn push(&mut self, op: BatchOp) {
        self.operators.push(Operator::Kernel(op));
    }

    /// A stage reading the shuffle out of stage `from` through a keyed
    /// operator whose output carries no window or event-time facts.
    fn keyed(from: StageId, operator: Operator, upsert: bool) -> Flow {
        Flow {
            input: StageInput::Shuffle(vec![from]),
            operators: vec![operator],
            windows: Vec::new(),
            upsert,
            closes_windows: false,
            event_time: Vec::new(),
            small: false,
            op_column: false,
            changes: false,
        }
    }
}

/// The stages finished so far; each flow is cut into one at a shuffle.
#[derive(Default)]
struct Stages {
    stages: Vec<Stage>,
    /// `ROW_NUMBER()` windows a filter above bounds, by the window node's
    /// address: how many rows per key they keep.
    top_n: Vec<(usize, u64)>,
}

/// Placeholder consumer of a shuffle, set once the consumer is placed.
const UNPLACED: StageId = StageId(u32::MAX);

impl Stages {
    /// Cuts `flow` into a stage that shuffles its rows by `keys` into the
    /// stage reading it.
    fn cut(&mut self, flow: Flow, keys: Vec<Arc<dyn PhysicalExpr>>) -> StageId {
        self.cut_to(flow, Partitioning::Hash(keys))
    }

    /// Cuts `flow` into a stage whose rows are spread by `partitioning`.
    fn cut_to(&mut self, flow: Flow, partitioning: Partitioning) -> StageId {
        let id = StageId(self.stages.len() as u32);
        self.stages.push(Stage {
            id,
            input: flow.input,
            operators: flow.operators,
            output: StageOutput::Shuffle {
                to: UNPLACED,
                partitioning,
            },
        });
        id
    }

    /// Cuts both inputs of a join. A small input (one row per window) is
    /// broadcast: every partition of the join gets all of it, and the other
    /// input is spread by its keys, or by all its columns when it has none
    /// (instead of gathering each window in one partition). Only the right
    /// input of a semi or anti join may be broadcast (a left row must be in
    /// one partition to be emitted once).
    #[allow(clippy::too_many_arguments)]
    fn cut_join(
        &mut self,
        (left, left_keys, left_schema): (Flow, Vec<Arc<dyn PhysicalExpr>>, &Schema),
        (right, right_keys, right_schema): (Flow, Vec<Arc<dyn PhysicalExpr>>, &Schema),
        join_type: JoinType,
    ) -> (StageId, StageId) {
        let spread = |keys: Vec<Arc<dyn PhysicalExpr>>, schema: &Schema| {
            if keys.is_empty() {
                Partitioning::Hash(leading_columns(schema, schema.fields().len()))
            } else {
                Partitioning::Hash(keys)
            }
        };
        if right.small && !matches!(join_type, JoinType::Right | JoinType::Full) {
            let l = self.cut_to(left, spread(left_keys, left_schema));
            let r = self.cut_to(right, Partitioning::Broadcast);
            return (l, r);
        }
        if left.small && matches!(join_type, JoinType::Inner | JoinType::Right) {
            let l = self.cut_to(left, Partitioning::Broadcast);
            let r = self.cut_to(right, spread(right_keys, right_schema));
            return (l, r);
        }
        let l = self.cut(left, left_keys);
        let r = self.cut(right, right_keys);
        (l, r)
    }

    /// The graph with `flow` as its sink stage, every shuffle pointed at
    /// its consumer.
    fn finish(mut self, flow: Flow, emit: EmitMode, output_schema: SchemaRef) -> StageGraph {
        let id = StageId(self.stages.len() as u32);
        self.stages.push(Stage {
            id,
            input: flow.input,
            operators: flow.operators,
            output: StageOutput::Sink(emit),
        });
        // Source stages first (0..k, in the order their streams are read;
        // the runtime numbers a query's inputs so), then the others in the
        // order they were cut: still every stage after those it reads.
        let (mut order, rest): (Vec<Stage>, Vec<Stage>) = self
            .stages
            .into_iter()
            .partition(|s| matches!(s.input, StageInput::Source(_)));
        order.extend(rest);
        let renumber: std::collections::HashMap<StageId, StageId> = order
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id, StageId(i as u32)))
            .collect();
        for stage in &mut order {
            stage.id = renumber[&stage.id];
            if let StageInput::Shuffle(inputs) = &mut stage.input {
                for i in inputs.iter_mut() {
                    *i = renumber[i];
                }
            }
        }
        self.stages = order;
        let consumers: Vec<(StageId, StageId)> = self
            .stages
            .iter()
            .flat_map(|s| match &s.input {
                StageInput::Shuffle(inputs) => inputs.iter().map(|i| (*i, s.id)).collect(),
                StageInput::Source(_) => Vec::new(),
            })
            .collect();
        for (producer, consumer) in consumers {
            if let Some(StageOutput::Shuffle { to, .. }) = self
                .stages
                .get_mut(producer.0 as usize)
                .map(|s| &mut s.output)
            {
                *to = consumer;
            }
        }
        StageGraph {
            stages: self.stages,
            output_schema,
            state_ttl_batches: None,
        }
    }
}

/// The first `n` columns of `schema` as expressions (a shuffle's keys).
fn leading_columns(schema: &Schema, n: usize) -> Vec<Arc<dyn PhysicalExpr>> {
    schema
        .fields()
        .iter()
        .take(n)
        .enumerate()
        .map(|(i, f)| {
            Arc::new(datafusion::physical_expr::expressions::Column::new(
                f.name(),
                i,
            )) as Arc<dyn PhysicalExpr>
        })
        .collect()
}

/// Per-column facts (window bounds, event time) after a projection whose
/// output column i reads input column `sources[i]` as is (`None`: computed).
fn carried<T: Copy>(facts: &[Option<T>], sources: &[Option<usize>]) -> Vec<Option<T>> {
    sources
        .iter()
        .map(|s| s.and_then(|i| facts.get(i).copied().flatten()))
        .collect()
}

/// The input column a plain column reference (possibly aliased) reads.
fn column_index(e: &Expr, schema: &DFSchema) -> Option<usize> {
    match e {
        Expr::Column(c) => schema.index_of_column(c).ok(),
        Expr::Alias(a) => column_index(&a.expr, schema),
        _ => None,
    }
}

/// A join type as SQL spells it (for error messages).
fn sql_join(join_type: JoinType) -> &'static str {
    match join_type {
        JoinType::Inner => "INNER",
        JoinType::Left => "LEFT",
        JoinType::Right => "RIGHT",
        JoinType::Full => "FULL",
        JoinType::LeftSemi => "LEFT SEMI",
        JoinType::RightSemi => "RIGHT SEMI",
        JoinType::LeftAnti => "LEFT ANTI",
        JoinType::RightAnti => "RIGHT ANTI",
        JoinType::LeftMark => "LEFT MARK",
        JoinType::RightMark => "RIGHT MARK",
    }
}

/// A join of two streams: a window join, both sides windowed alike and
/// joined on their window bound. Either side may itself be windowed
/// aggregates or a window join: their rows come out when windows close,
/// which is when the join closes them too.
fn lower_window_join(
    j: &datafusion::logical_expr::logical_plan::Join,
    stages: &mut Stages,
    props: &datafusion::execution::context::ExecutionProps,
) -> Result<Flow> {
    const HINT: &str = "join two streams by window (window both sides with the same TUMBLE or HOP \
        and join ON l.key = r.key AND l.window_start = r.window_start) or by interval \
        (ON l.key = r.key AND l.ts BETWEEN r.ts - INTERVAL '10' SECOND AND r.ts)";
    let outer = matches!(
        j.join_type,
        JoinType::Left | JoinType::Right | JoinType::Full
    );
    if !outer
        && !matches!(
            j.join_type,
            JoinType::Inner | JoinType::LeftSemi | JoinType::LeftAnti
        )
    {
        return Err(PlanError::unsupported_hint(
            format!("a {} join of two streams", sql_join(j.join_type)),
            "use an inner window join, IN or EXISTS",
        ));
    }
    let left = lower_node(&j.left, stages)?;
    let right = lower_node(&j.right, stages)?;
    no_open_sessions(&left)?;
    no_open_sessions(&right)?;
    if left.upsert || right.upsert {
        return lower_join_of_changes(j, (left, right), stages, props);
    }
    let mut bound = None;
    let mut left_keys = Vec::new();
    let mut right_keys = Vec::new();
    let mut display = Vec::new();
    for (l, r) in &j.on {
        display.push(format!("{l} = {r}"));
        let windows = (
            column_index(l, j.left.schema())
                .and_then(|i| left.windows.get(i).copied().flatten().map(|w| (i, w))),
            column_index(r, j.right.schema())
                .and_then(|i| right.windows.get(i).copied().flatten().map(|w| (i, w))),
        );
        match windows {
            (Some((li, lw)), Some((ri, rw))) if bound.is_none() => {
                if lw != rw {
                    return Err(PlanError::unsupported_hint(
                        "a join of streams windowed differently",
                        HINT,
                    ));
                }
                bound = Some((li, ri, lw));
            }
            _ => {
                left_keys.push(physical(l, j.left.schema(), props)?);
                right_keys.push(physical(r, j.right.schema(), props)?);
            }
        }
    }
    if outer && bound.is_none() {
        // A regular outer join: its NULL-padded rows are taken back when a
        // match comes, so its output is a change stream. An outer window
        // join pads a window's unmatched rows once, when it closes; an
        // outer interval join once the watermark passes their interval.
        const OUTER_HINT: &str = "join the streams ON keys alone (a regular outer join), \
            by window (ON l.key = r.key AND l.window_start = r.window_start) or by interval \
            (ON l.key = r.key AND l.ts BETWEEN r.ts - INTERVAL '10' SECOND AND r.ts)";
        if left_keys.is_empty() {
            return Err(PlanError::unsupported_hint(
                format!(
                    "a {} join of two streams without an equality key",
                    sql_join(j.join_type)
                ),
                OUTER_HINT,
            ));
        }
    }
    let Some((left_window, right_window, w)) = bound else {
        if j.join_type == JoinType::Inner || outer {
            // An interval join, or without one a regular join.
            let interval = interval_bounds(j, &left, &right)?;
            if interval.is_some() || !left_keys.is_empty() {
                return lower_interval_join(
                    j,
                    (left, right),
                    (left_keys, right_keys),
                    interval,
                    display,
                    stages,
                    props,
                );
            }
        }
        let windowed =
            left.windows.iter().any(Option::is_some) && right.windows.iter().any(Option::is_some);
        return Err(PlanError::unsupported_hint(
            if windowed {
                "a join of two streams without equal window bounds in ON"
            } else {
                "a join of two unwindowed streams"
            },
            HINT,
        ));
    };
    // The filter is over left then right columns, whatever the join keeps.
    let both = j.left.schema().join(j.right.schema())?;
    let filter = j
        .filter
        .as_ref()
        .map(|f| physical(f, &both, props))
        .transpose()?;
    let partition_by = |keys: &[Arc<dyn PhysicalExpr>], window: usize| {
        if keys.is_empty() {
            let name = if w.is_end {
                "window_end"
            } else {
                "window_start"
            };
            vec![
                Arc::new(datafusion::physical_expr::expressions::Column::new(
                    name, window,
                )) as Arc<dyn PhysicalExpr>,
            ]
        } else {
            keys.to_vec()
        }
    };
    let plan = WindowJoinPlan {
        left_keys: left_keys.clone(),
        right_keys: right_keys.clone(),
        left_window,
        right_window,
        window_is_end: w.is_end,
        size_us: w.size_us,
        filter,
        right_input: Arc::new(j.right.schema().as_arrow().clone()),
        join_type: j.join_type,
        schema: Arc::new(j.schema.as_arrow().clone()),
        display: display.join(", "),
    };
    // Window columns keep their meaning where they are never NULL: an
    // outer join's padded side loses them (a FULL join's both sides).
    let (left_width, right_width) = (
        j.left.schema().fields().len(),
        j.right.schema().fields().len(),
    );
    let keep = |flow: &Flow, width: usize, kept: bool| -> Vec<Option<WindowCol>> {
        if kept {
            (0..width)
                .map(|i| flow.windows.get(i).copied().flatten())
                .collect()
        } else {
            vec![None; width]
        }
    };
    let mut windows = keep(
        &left,
        left_width,
        matches!(
            j.join_type,
            JoinType::Inner | JoinType::Left | JoinType::LeftSemi | JoinType::LeftAnti
        ),
    );
    if !matches!(j.join_type, JoinType::LeftSemi | JoinType::LeftAnti) {
        windows.extend(keep(
            &right,
            right_width,
            matches!(j.join_type, JoinType::Inner | JoinType::Right),
        ));
    }
    // A small side is broadcast to every partition unless its rows are
    // kept unmatched (an outer side pads each row once, in one partition).
    let broadcast = (right.small && !matches!(j.join_type, JoinType::Right | JoinType::Full))
        || (left.small && matches!(j.join_type, JoinType::Inner | JoinType::Right));
    let (l, r) = if broadcast {
        stages.cut_join(
            (left, left_keys, j.left.schema().as_arrow()),
            (right, right_keys, j.right.schema().as_arrow()),
            j.join_type,
        )
    } else {
        let l = stages.cut(left, partition_by(&left_keys, left_window));
        let r = stages.cut(right, partition_by(&right_keys, right_window));
        (l, r)
    };
    Ok(Flow {
        input: StageInput::Shuffle(vec![l, r]),
        operators: vec![Operator::WindowJoin(Arc::new(plan))],
        windows,
        upsert: false,
        closes_windows: true,
        event_time: Vec::new(),
        small: false,
        op_column: false,
        changes: false,
    })
}

/// A regular join (inner, left, right or full) where either input changes
/// (a non-windowed aggregation, a top-N, an outer join, ...): both inputs
/// become weighted change streams, shuffled by their keys into a
/// `JoinExec` that holds each side's rows with their weights (a retraction
/// cancels the row it takes back) and emits each pair's change, the
/// product of the two weights, as `op`; an outer side's row is present
/// padded with NULLs while the weights it is matched by add up to 0. The
/// output is a change stream without a key.
fn lower_join_of_changes(
    j: &datafusion::logical_expr::logical_plan::Join,
    (mut left, mut right): (Flow, Flow),
    stages: &mut Stages,
    props: &datafusion::execution::context::ExecutionProps,
) -> Result<Flow> {
    const HINT: &str = "an updating result (a non-windowed aggregation, a top-N, an outer \
        join) joins other rows by an inner or outer join ON equality keys";
    if !matches!(
        j.join_type,
        JoinType::Inner | JoinType::Left | JoinType::Right | JoinType::Full
    ) {
        return Err(PlanError::unsupported_hint(
            format!(
                "a {} join of a result whose rows change",
                sql_join(j.join_type)
            ),
            HINT,
        ));
    }
    let mut left_keys = Vec::new();
    let mut right_keys = Vec::new();
    let mut display = Vec::new();
    for (l, r) in &j.on {
        display.push(format!("{l} = {r}"));
        left_keys.push(physical(l, j.left.schema(), props)?);
        right_keys.push(physical(r, j.right.schema(), props)?);
    }
    if left_keys.is_empty() {
        return Err(PlanError::unsupported_hint(
            "a join of a result whose rows change without an equality key",
            HINT,
        ));
    }
    no_open_sessions(&left)?;
    no_open_sessions(&right)?;
    const WHAT: &str = "a join of this updating result";
    weighted(&mut left, j.left.schema().as_arrow(), WHAT, HINT)?;
    weighted(&mut right, j.right.schema().as_arrow(), WHAT, HINT)?;
    let plan = crate::plan::IntervalJoinPlan {
        display: display.join(", "),
        weighted: true,
        ..regular_join_plan(j, (&left_keys, &right_keys), props)?
    };
    // Both sides by key: a row and its retraction meet in one partition.
    let l = stages.cut(left, left_keys);
    let r = stages.cut(right, right_keys);
    Ok(Flow {
        input: StageInput::Shuffle(vec![l, r]),
        operators: vec![Operator::IntervalJoin(Arc::new(plan))],
        windows: Vec::new(),
        upsert: true,
        closes_windows: false,
        event_time: Vec::new(),
        small: false,
        op_column: true,
        changes: true,
    })
}

/// The plan of a regular join `j` on keys: no time bounds, the whole
/// condition as its filter, unweighted, no display yet.
fn regular_join_plan(
    j: &datafusion::logical_expr::logical_plan::Join,
    (left_keys, right_keys): (&Keys, &Keys),
    props: &datafusion::execution::context::ExecutionProps,
) -> Result<crate::plan::IntervalJoinPlan> {
    // The filter is over left then right columns, whatever the join keeps.
    let both = j.left.schema().join(j.right.schema())?;
    let filter = j
        .filter
        .as_ref()
        .map(|f| physical(f, &both, props))
        .transpose()?;
    Ok(crate::plan::IntervalJoinPlan {
        left_keys: left_keys.clone(),
        right_keys: right_keys.clone(),
        left_time: 0,
        right_time: 0,
        lower_us: i64::MIN,
        upper_us: i64::MAX,
        left_lag_us: 0,
        right_lag_us: 0,
        filter,
        right_input: Arc::new(j.right.schema().as_arrow().clone()),
        schema: Arc::new(j.schema.as_arrow().clone()),
        display: String::new(),
        regular: true,
        join_type: j.join_type,
        weighted: false,
    })
}

/// The time condition of an interval join, found in a join's filter.
#[derive(Debug, Clone, Copy)]
struct Interval {
    /// The left and right time columns.
    left: usize,
    right: usize,
    /// `left - right` lies in `[lower_us, upper_us]` in every match.
    lower_us: i64,
    upper_us: i64,
}

/// A fixed interval literal in microseconds (no months: their length varies).
fn interval_us(e: &Expr) -> Option<i64> {
    match e {
        Expr::Literal(ScalarValue::IntervalMonthDayNano(Some(v)), _) if v.months == 0 => (v.days
            as i64)
            .checked_mul(86_400_000_000)?
            .checked_add(v.nanoseconds / 1000),
        Expr::Literal(ScalarValue::IntervalDayTime(Some(v)), _) => (v.days as i64)
            .checked_mul(86_400_000_000)?
            .checked_add(v.milliseconds as i64 * 1000),
        Expr::Cast(c) => interval_us(&c.expr),
        _ => None,
    }
}

/// `column`, `column + INTERVAL` or `column - INTERVAL`: the column and the
/// offset in microseconds.
fn time_term(e: &Expr) -> Option<(&datafusion::common::Column, i64)> {
    use datafusion::logical_expr::{BinaryExpr, Operator as Op};
    match e {
        Expr::Column(c) => Some((c, 0)),
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
            Op::Plus => match (time_term(left), time_term(right)) {
                (Some((c, o)), None) => Some((c, o.checked_add(interval_us(right)?)?)),
                (None, Some((c, o))) => Some((c, o.checked_add(interval_us(left)?)?)),
                _ => None,
            },
            Op::Minus => {
                let (c, o) = time_term(left)?;
                Some((c, o.checked_sub(interval_us(right)?)?))
            }
            _ => None,
        },
        _ => None,
    }
}

/// Finds `l.t BETWEEN r.t - a AND r.t + b` (or the same as comparisons) in
/// an inner join's filter, between two columns that carry event time on
/// their sides. `None` when there is no bounded interval.
fn interval_bounds(
    j: &datafusion::logical_expr::logical_plan::Join,
    left: &Flow,
    right: &Flow,
) -> Result<Option<Interval>> {
    use datafusion::logical_expr::{BinaryExpr, Operator as Op};
    let Some(filter) = &j.filter else {
        return Ok(None);
    };
    // (lower, upper) of left - right per pair of time columns.
    let mut found: std::collections::BTreeMap<(usize, usize), (Option<i64>, Option<i64>)> =
        Default::default();
    let mut bound = |a: &Expr, op: Op, b: &Expr| {
        let (Some((ca, oa)), Some((cb, ob))) = (time_term(a), time_term(b)) else {
            return;
        };
        let side = |c: &datafusion::common::Column| match (
            j.left.schema().index_of_column(c).ok(),
            j.right.schema().index_of_column(c).ok(),
        ) {
            (Some(i), None) => Some((true, i)),
            (None, Some(i)) => Some((false, i)),
            _ => None,
        };
        // As left - right `op` c.
        let (l, r, op, c) = match (side(ca), side(cb)) {
            // l + oa op r + ob  =>  l - r op ob - oa
            (Some((true, l)), Some((false, r))) => (l, r, op, ob.checked_sub(oa)),
            // r + oa op l + ob  =>  l - r op' oa - ob
            (Some((false, r)), Some((true, l))) => {
                let flipped = match op {
                    Op::Gt => Op::Lt,
                    Op::GtEq => Op::LtEq,
                    Op::Lt => Op::Gt,
                    Op::LtEq => Op::GtEq,
                    other => other,
                };
                (l, r, flipped, oa.checked_sub(ob))
            }
            _ => return,
        };
        let Some(c) = c else { return };
        let entry = found.entry((l, r)).or_default();
        if matches!(op, Op::Gt | Op::GtEq | Op::Eq) {
            entry.0 = Some(entry.0.map_or(c, |x: i64| x.max(c)));
        }
        if matches!(op, Op::Lt | Op::LtEq | Op::Eq) {
            entry.1 = Some(entry.1.map_or(c, |x: i64| x.min(c)));
        }
    };
    for conjunct in datafusion::logical_expr::utils::split_conjunction(filter) {
        match conjunct {
            Expr::BinaryExpr(BinaryExpr { left, op, right })
                if matches!(op, Op::Gt | Op::GtEq | Op::Lt | Op::LtEq | Op::Eq) =>
            {
                bound(left, *op, right)
            }
            Expr::Between(b) if !b.negated => {
                bound(&b.expr, Op::GtEq, &b.low);
                bound(&b.expr, Op::LtEq, &b.high);
            }
            _ => {}
        }
    }
    let timed = |flow: &Flow, i: usize| {
        flow.windows.get(i).copied().flatten().is_some()
            || flow.event_time.get(i).copied().flatten().is_some()
    };
    for ((l, r), bounds) in found {
        if let (Some(lower_us), Some(upper_us)) = bounds {
            if timed(left, l) && timed(right, r) {
                return Ok(Some(Interval {
                    left: l,
                    right: r,
                    lower_us,
                    upper_us,
                }));
            }
        }
    }
    Ok(None)
}

/// How far below the watermark a flow's rows still to come may have time
/// column `i` (µs), adding event-time tracking to its source stage when
/// nothing tracks the stream's watermark yet.
fn time_lag(flow: &mut Flow, i: usize, what: &str) -> Result<i64> {
    if let Some(w) = flow.windows.get(i).copied().flatten() {
        // Windows still to come end after the watermark.
        return Ok(if w.is_end { 0 } else { w.size_us });
    }
    let Some(ec) = flow.event_time.get(i).copied().flatten() else {
        return Err(PlanError::unsupported(format!(
            "{what} on a column that is not event time"
        )));
    };
    if let Some(lag) = ec.lag_us {
        return Ok(lag);
    }
    let StageInput::Source(stream) = &flow.input else {
        return Err(PlanError::unsupported(format!(
            "{what} on event time read through a shuffle"
        )));
    };
    let Some(wm) = &stream.watermark else {
        return Err(PlanError::unsupported(format!(
            "{what} on a stream without a watermark"
        )));
    };
    let spec = crate::plan::EventTimeSpec {
        time_column: ec.stream_column,
        time_column_name: wm.column.clone(),
        watermark_delay_ms: wm.delay_ms,
    };
    flow.operators.insert(0, Operator::EventTime(spec));
    for c in flow.event_time.iter_mut().flatten() {
        c.lag_us = Some(0);
    }
    Ok(0)
}

/// Join key expressions of one side.
type Keys = Vec<Arc<dyn PhysicalExpr>>;

/// An interval join of two streams: both sides shuffled by their equality
/// keys into a stage running `IntervalJoinExec`. Without an interval, a
/// regular inner join of two append-only streams: the stage holds every row
/// of both inputs (none can be dropped by watermark) and emits each
/// matching pair once, when the later of its two rows arrives; its output
/// is append-only.
#[allow(clippy::too_many_arguments)]
fn lower_interval_join(
    j: &datafusion::logical_expr::logical_plan::Join,
    (mut left, mut right): (Flow, Flow),
    (left_keys, right_keys): (Keys, Keys),
    interval: Option<Interval>,
    mut display: Vec<String>,
    stages: &mut Stages,
    props: &datafusion::execution::context::ExecutionProps,
) -> Result<Flow> {
    if left_keys.is_empty() {
        return Err(PlanError::unsupported_hint(
            "an interval join without an equality condition",
            "join ON l.key = r.key AND l.ts BETWEEN r.ts - INTERVAL ... AND r.ts + INTERVAL ...",
        ));
    }
    let mut plan = crate::plan::IntervalJoinPlan {
        regular: interval.is_none(),
        ..regular_join_plan(j, (&left_keys, &right_keys), props)?
    };
    if let Some(interval) = interval {
        plan.left_lag_us = time_lag(&mut left, interval.left, "an interval join")?;
        plan.right_lag_us = time_lag(&mut right, interval.right, "an interval join")?;
        plan.left_time = interval.left;
        plan.right_time = interval.right;
        plan.lower_us = interval.lower_us;
        plan.upper_us = interval.upper_us;
        let fmt_us = |us: i64| format!("{}ms", us / 1000);
        display.push(format!(
            "{} - {} in [{}, {}]",
            j.left.schema().field(interval.left).name(),
            j.right.schema().field(interval.right).name(),
            fmt_us(interval.lower_us),
            fmt_us(interval.upper_us)
        ));
    }
    plan.display = display.join(", ");
    let outer = plan.join_type != JoinType::Inner;
    // An outer regular join takes its padded rows back (a change stream);
    // an outer interval join emits them once, when nothing can match them.
    let changes = outer && plan.regular;
    let (l, r) = if outer {
        // Each row of an outer side in one partition (never broadcast), so
        // its NULL-padded row is emitted once.
        (stages.cut(left, left_keys), stages.cut(right, right_keys))
    } else {
        stages.cut_join(
            (left, left_keys, j.left.schema().as_arrow()),
            (right, right_keys, j.right.schema().as_arrow()),
            JoinType::Inner,
        )
    };
    Ok(Flow {
        input: StageInput::Shuffle(vec![l, r]),
        operators: vec![Operator::IntervalJoin(Arc::new(plan))],
        windows: Vec::new(),
        upsert: changes,
        closes_windows: false,
        event_time: Vec::new(),
        small: false,
        op_column: changes,
        changes,
    })
}

fn physical(
    expr: &Expr,
    schema: &DFSchema,
    state_props: &datafusion::execution::context::ExecutionProps,
) -> Result<Arc<dyn PhysicalExpr>> {
    let e = create_physical_expr(
        expr,
        schema,
        state_props,
        &PhysicalPlanningContext::default(),
    )?;
    Ok(crate::functions::overflow::check_overflow(e)?)
}

/// The `ROW_NUMBER()` window a filter bounds (`rn <= N`, `rn < N`, `rn =
/// 1`, through projections and aliases): the window node's address and N.
fn top_n_bound(f: &datafusion::logical_expr::logical_plan::Filter) -> Option<(usize, u64)> {
    use datafusion::logical_expr::{BinaryExpr, Operator as Op};
    let literal = |e: &Expr| match e {
        Expr::Literal(v, _) => v.cast_to(&DataType::Int64).ok().and_then(|v| match v {
            ScalarValue::Int64(Some(n)) => Some(n),
            _ => None,
        }),
        _ => None,
    };
    let column = |e: &Expr| {
        let mut e = e;
        while let Expr::Cast(c) = e {
            e = c.expr.as_ref();
        }
        match e {
            Expr::Column(c) => f.input.schema().index_of_column(c).ok(),
            _ => None,
        }
    };
    for conjunct in datafusion::logical_expr::utils::split_conjunction(&f.predicate) {
        let Expr::BinaryExpr(BinaryExpr { left, op, right }) = conjunct else {
            continue;
        };
        let (col, op, n) = match (column(left), literal(right), column(right), literal(left)) {
            (Some(c), Some(n), _, _) => (c, *op, n),
            (_, _, Some(c), Some(n)) => (
                c,
                match op {
                    Op::GtEq => Op::LtEq,
                    Op::Gt => Op::Lt,
                    other => *other,
                },
                n,
            ),
            _ => continue,
        };
        let limit = match op {
            Op::LtEq => n,
            Op::Lt => n.saturating_sub(1),
            Op::Eq if n == 1 => 1,
            _ => continue,
        };
        if limit < 1 {
            continue;
        }
        if let Some(window) = row_number_window(&f.input, col) {
            return Some((std::ptr::from_ref(window) as usize, limit as u64));
        }
    }
    None
}

/// The `Window` node whose lone `ROW_NUMBER()` column `col` of `plan` is,
/// through projections, aliases and filters.
fn row_number_window(plan: &LogicalPlan, col: usize) -> Option<&LogicalPlan> {
    match plan {
        LogicalPlan::SubqueryAlias(a) => row_number_window(&a.input, col),
        LogicalPlan::Filter(f) => row_number_window(&f.input, col),
        LogicalPlan::Projection(p) => {
            let inner = column_index(p.expr.get(col)?, p.input.schema())?;
            row_number_window(&p.input, inner)
        }
        LogicalPlan::Window(w) => {
            let width = w.input.schema().fields().len();
            let is_row_number = w.window_expr.len() == 1
                && col == width
                && matches!(
                    unalias(&w.window_expr[0]),
                    Expr::WindowFunction(wf) if ranking_of(wf.fun.name()).is_some()
                );
            is_row_number.then_some(plan)
        }
        _ => None,
    }
}

/// The numbering a window function is, if it is one a top-N bounds.
fn ranking_of(name: &str) -> Option<crate::plan::Ranking> {
    use crate::plan::Ranking;
    match name.to_ascii_lowercase().as_str() {
        "row_number" => Some(Ranking::RowNumber),
        "rank" => Some(Ranking::Rank),
        "dense_rank" => Some(Ranking::DenseRank),
        _ => None,
    }
}

fn unalias(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => unalias(&a.expr),
        other => other,
    }
}

/// A top-N: the input shuffled by the `PARTITION BY` keys into a stage
/// running `TopNExec`, which keeps each key's best `limit` rows.
fn lower_top_n(
    w: &datafusion::logical_expr::logical_plan::Window,
    limit: u64,
    stages: &mut Stages,
    props: &datafusion::execution::context::ExecutionProps,
) -> Result<Flow> {
    let Expr::WindowFunction(wf) = unalias(&w.window_expr[0]) else {
        return Err(PlanError::unsupported("a window that is not ROW_NUMBER()"));
    };
    let ranking = ranking_of(wf.fun.name())
        .ok_or_else(|| PlanError::unsupported("a window that is not ROW_NUMBER()"))?;
    let params = &wf.params;
    if params.order_by.is_empty() {
        return Err(PlanError::unsupported(format!(
            "{}() without ORDER BY on a stream (which rows are first is undefined)",
            wf.fun.name().to_uppercase()
        )));
    }
    let flow = lower_node(&w.input, stages)?;
    no_open_sessions(&flow)?;
    if flow.upsert {
        return Err(PlanError::unsupported_hint(
            "a top-N over a non-windowed aggregation (its rows change; that needs retractions, \
             which come with updating queries)",
            "rank windowed results or raw rows",
        ));
    }
    let schema = w.input.schema();
    let partition_by = params
        .partition_by
        .iter()
        .map(|e| physical(e, schema, props))
        .collect::<Result<Vec<_>>>()?;
    let order_by = params
        .order_by
        .iter()
        .map(|s| {
            Ok((
                physical(&s.expr, schema, props)?,
                arrow::compute::SortOptions {
                    descending: !s.asc,
                    nulls_first: s.nulls_first,
                },
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let partitions = if params.partition_by.is_empty() {
        String::new()
    } else {
        format!(
            "PARTITION BY {} ",
            params
                .partition_by
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let display = format!(
        "{}() OVER ({partitions}ORDER BY {})",
        wf.fun.name().to_uppercase(),
        params
            .order_by
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let plan = Arc::new(crate::plan::TopNPlan {
        partition_by: partition_by.clone(),
        order_by,
        limit,
        input: Arc::new(schema.as_arrow().clone()),
        schema: Arc::new(w.schema.as_arrow().clone()),
        display,
        // Ranks that ties share are no key: such a top-N emits changes.
        changes: ranking != crate::plan::Ranking::RowNumber,
        ranking,
    });
    let mut flow = flow;
    if plan.partition_by.is_empty() && !plan.changes {
        // One partition takes every row: send it only each batch's best.
        flow.push(BatchOp::TopK {
            order_by: plan.order_by.clone(),
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
        });
    }
    let from = stages.cut(flow, partition_by);
    if !plan.changes {
        return Ok(Flow::keyed(from, Operator::TopN(plan), true));
    }
    // RANK(), DENSE_RANK(): the rows added and taken back, as `op`.
    let width = plan.schema.fields().len();
    let mut exprs: Vec<Arc<dyn PhysicalExpr>> = leading_columns(&plan.schema, width);
    let mut with_weight: Vec<Field> = plan
        .schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    with_weight.push(Field::new(
        crate::plan::WEIGHT_COLUMN,
        DataType::Int64,
        false,
    ));
    let with_weight = Schema::new(with_weight);
    exprs.push(weight_to_op(width, &with_weight)?);
    let out_schema = Arc::new(with_op_column(&plan.schema));
    let mut out = Flow::keyed(from, Operator::TopN(plan), true);
    out.push(BatchOp::Project {
        exprs,
        schema: out_schema,
    });
    out.op_column = true;
    out.changes = true;
    Ok(out)
}

/// Name of the column an aggregate over changes ends its rows with:
/// `upsert` (the group's new row) or `delete` (the group is gone).
pub const OP_COLUMN: &str = "op";

/// `schema` with the `op` column last.
pub(crate) fn with_op_column(schema: &Schema) -> Schema {
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(OP_COLUMN, DataType::Utf8, false));
    Schema::new(fields)
}

/// A sink stage's filters after its keyed operator (`HAVING`, a `WHERE`
/// over a subquery) as `op` columns: a key whose new row fails the filter
/// is deleted (it may have passed before), not left at its old row. `None`
/// when the stage has no such filter; else its operators and whether the
/// rows now end with `op` (always).
pub(crate) fn deletes_for_filtered_rows(
    stage_operators: &[Operator],
    op_column: bool,
) -> Result<Option<Vec<Operator>>> {
    use datafusion::physical_expr::expressions as pe;
    let filtered = stage_operators
        .iter()
        .skip(1)
        .any(|o| matches!(o, Operator::Kernel(BatchOp::Filter { .. })));
    let mut schema: SchemaRef = match stage_operators.first() {
        Some(Operator::AggregateFinal(a)) if filtered => Arc::clone(&a.output_schema),
        Some(Operator::TopN(t)) if filtered => Arc::clone(&t.schema),
        _ => return Ok(None),
    };
    // An aggregate over changes makes `op` in its first projection, and
    // the projections after it carry it.
    let made_by_plan = op_column;
    let mut op = false;
    let mut operators = vec![stage_operators[0].clone()];
    for o in stage_operators.iter().skip(1) {
        match o {
            Operator::Kernel(BatchOp::Project { exprs, schema: out }) => {
                let mut exprs = exprs.clone();
                let mut out = out.as_ref().clone();
                if op && !made_by_plan {
                    exprs.push(Arc::new(pe::Column::new(
                        OP_COLUMN,
                        schema.fields().len() - 1,
                    )));
                    out = with_op_column(&out);
                }
                op |= made_by_plan;
                schema = Arc::new(out);
                operators.push(Operator::Kernel(BatchOp::Project {
                    exprs,
                    schema: Arc::clone(&schema),
                }));
            }
            Operator::Kernel(BatchOp::Filter { predicate }) => {
                let width = schema.fields().len();
                let data = if op { width - 1 } else { width };
                let mut exprs: Vec<Arc<dyn PhysicalExpr>> = (0..data)
                    .map(|i| {
                        Arc::new(pe::Column::new(schema.field(i).name(), i))
                            as Arc<dyn PhysicalExpr>
                    })
                    .collect();
                let passed: Arc<dyn PhysicalExpr> = if op {
                    Arc::new(pe::Column::new(OP_COLUMN, width - 1))
                } else {
                    pe::lit(ScalarValue::from("upsert"))
                };
                exprs.push(pe::case(
                    None,
                    vec![(Arc::clone(predicate), passed)],
                    Some(pe::lit(ScalarValue::from("delete"))),
                )?);
                if !op {
                    schema = Arc::new(with_op_column(&schema));
                }
                op = true;
                operators.push(Operator::Kernel(BatchOp::Project {
                    exprs,
                    schema: Arc::clone(&schema),
                }));
            }
            other => operators.push(other.clone()),
        }
    }
    Ok(Some(operators))
}

/// Turns a flow of updating rows (a non-windowed aggregation's or a
/// top-N's, its first operator, then filters and projections) into a change
/// stream: the keyed operator emits each changed key's previous rows with
/// weight -1 and its new ones with +1, and the kernels after it carry the
/// weight, last. Returns how many columns come before the weight.
fn into_weighted(flow: &mut Flow, what: &str, hint: &str) -> Result<usize> {
    use datafusion::physical_expr::expressions::Column as PCol;
    // An aggregation over changes ends its first projection with `op`
    // (and the projections after it carry it): that column becomes the
    // weight once the aggregation emits changes.
    let had_op = flow.op_column;
    let (first, mut width) = match flow.operators.first() {
        Some(Operator::AggregateFinal(inner))
            if had_op && inner.over_changes && inner.window.is_none() && !inner.changes =>
        {
            let mut inner = inner.as_ref().clone();
            inner.changes = true;
            let width = inner.output_schema.fields().len();
            (Operator::AggregateFinal(Arc::new(inner)), width)
        }
        _ if had_op => return Err(PlanError::unsupported_hint(what.to_string(), hint)),
        Some(Operator::AggregateFinal(inner)) if inner.window.is_none() && !inner.changes => {
            let mut inner = inner.as_ref().clone();
            inner.changes = true;
            let width = inner.output_schema.fields().len();
            (Operator::AggregateFinal(Arc::new(inner)), width)
        }
        Some(Operator::TopN(t)) if !t.changes => {
            let mut t = t.as_ref().clone();
            t.changes = true;
            let width = t.schema.fields().len();
            (Operator::TopN(Arc::new(t)), width)
        }
        _ => return Err(PlanError::unsupported_hint(what.to_string(), hint)),
    };
    let mut operators = vec![first];
    let weight_field = Field::new(crate::plan::WEIGHT_COLUMN, DataType::Int64, false);
    for op in flow.operators.iter().skip(1) {
        match op {
            Operator::Kernel(BatchOp::Filter { .. }) => operators.push(op.clone()),
            Operator::Kernel(BatchOp::Project { exprs, schema }) => {
                let mut exprs = exprs.clone();
                let mut fields: Vec<Field> =
                    schema.fields().iter().map(|f| f.as_ref().clone()).collect();
                if had_op {
                    // `op`, last, is made or carried here: the weight
                    // takes its place.
                    exprs.pop();
                    fields.pop();
                }
                let n = exprs.len();
                exprs.push(Arc::new(PCol::new(crate::plan::WEIGHT_COLUMN, width)));
                fields.push(weight_field.clone());
                width = n;
                operators.push(Operator::Kernel(BatchOp::Project {
                    exprs,
                    schema: Arc::new(Schema::new(fields)),
                }));
            }
            _ => return Err(PlanError::unsupported(format!("{what} through a join"))),
        }
    }
    flow.operators = operators;
    flow.op_column = false;
    Ok(width)
}

/// Makes `flow`'s rows (of `schema`) end with a weight column
/// ([`crate::plan::WEIGHT_COLUMN`]), for an operator that consumes changes:
/// append-only rows weigh 1, a change stream's `insert` +1 and `delete` -1,
/// and an updating result (a non-windowed aggregation's, a top-N's) is
/// made to emit its changes ([`into_weighted`]).
fn weighted(flow: &mut Flow, schema: &Schema, what: &str, hint: &str) -> Result<()> {
    use datafusion::physical_expr::expressions as pe;
    let width = schema.fields().len();
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(
        crate::plan::WEIGHT_COLUMN,
        DataType::Int64,
        false,
    ));
    let with_weight = Arc::new(Schema::new(fields));
    if flow.changes || !flow.upsert {
        let mut exprs = leading_columns(schema, width);
        exprs.push(if flow.changes {
            let with_op = with_op_column(schema);
            pe::case(
                None,
                vec![(
                    pe::binary(
                        Arc::new(pe::Column::new(OP_COLUMN, width)),
                        datafusion::logical_expr::Operator::Eq,
                        pe::lit(ScalarValue::from("insert")),
                        &with_op,
                    )?,
                    pe::lit(ScalarValue::Int64(Some(1))),
                )],
                Some(pe::lit(ScalarValue::Int64(Some(-1)))),
            )?
        } else {
            pe::lit(ScalarValue::Int64(Some(1)))
        });
        flow.push(BatchOp::Project {
            exprs,
            schema: with_weight,
        });
        flow.op_column = false;
        return Ok(());
    }
    if into_weighted(flow, what, hint)? != width {
        return Err(PlanError::Internal {
            message: format!("{what} lost track of its input columns"),
        });
    }
    Ok(())
}

/// Makes `flow`'s rows (of `schema`) a change stream ending with `op`
/// (`insert` or `delete`): what a consumer of rows that may change (a
/// UNION ALL, the output) gets from any input.
fn into_changes(flow: &mut Flow, schema: &Schema, what: &str, hint: &str) -> Result<()> {
    use datafusion::physical_expr::expressions as pe;
    if flow.changes {
        return Ok(());
    }
    let width = schema.fields().len();
    let mut exprs = leading_columns(schema, width);
    if flow.upsert {
        weighted(flow, schema, what, hint)?;
        let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new(
            crate::plan::WEIGHT_COLUMN,
            DataType::Int64,
            false,
        ));
        exprs.push(weight_to_op(width, &Schema::new(fields))?);
    } else {
        exprs.push(pe::lit(ScalarValue::from("insert")));
    }
    flow.push(BatchOp::Project {
        exprs,
        schema: Arc::new(with_op_column(schema)),
    });
    flow.upsert = true;
    flow.op_column = true;
    flow.changes = true;
    Ok(())
}

/// `op` from the weight at column `at` of `schema`: `insert` when
/// positive, else `delete`. (Weights upstream of it are ±1.)
fn weight_to_op(at: usize, schema: &Schema) -> Result<Arc<dyn PhysicalExpr>> {
    use datafusion::physical_expr::expressions as pe;
    Ok(pe::case(
        None,
        vec![(
            pe::binary(
                Arc::new(pe::Column::new(crate::plan::WEIGHT_COLUMN, at)),
                datafusion::logical_expr::Operator::Gt,
                pe::lit(ScalarValue::Int64(Some(0))),
                schema,
            )?,
            pe::lit(ScalarValue::from("insert")),
        )],
        Some(pe::lit(ScalarValue::from("delete"))),
    )?)
}

/// How an aggregate over changes finishes one of the user's aggregates from
/// the sums it keeps (indices among the sums).
enum Finish {
    /// `count`: the sum of the weights of non-NULL values.
    Count(usize),
    /// `sum`: the weighted sum, NULL when no non-NULL value is left.
    Sum {
        sum: usize,
        count: usize,
        to: DataType,
    },
    /// `avg`: the weighted sum over the count of non-NULL values.
    Avg { sum: usize, count: usize },
    /// `min`, `max`, `count(DISTINCT)`: a multiset aggregate's result as is.
    Value(usize),
}

/// An aggregation over a non-windowed aggregation, whose rows change. The
/// inner aggregation emits changes (each changed group's previous row
/// with weight -1, its new row with +1; the kernels after it carry the
/// weight); the outer one keeps, per group, sums of weighted values, so a
/// retraction subtracts what the addition added: `count`, `sum` and `avg`
/// are exact. `min`, `max` and `count(DISTINCT)` keep each group's values
/// with their weights ([`crate::functions::multiset`]). The result is an
/// upsert keyed by the outer groups, with an `op` column: `delete` once no
/// row of a group is left.
fn lower_aggregate_over_changes(
    a: &datafusion::logical_expr::logical_plan::Aggregate,
    mut flow: Flow,
    stages: &mut Stages,
    props: &datafusion::execution::context::ExecutionProps,
) -> Result<Flow> {
    use datafusion::functions_aggregate::expr_fn::sum;
    use datafusion::logical_expr::{cast, lit, when, ExprSchemable};
    use datafusion::physical_expr::expressions::{self as pe, Column as PCol};
    const HINT: &str = "count, sum, avg, min, max and count(DISTINCT) retract exactly; for the \
        others, aggregate windowed results (GROUP BY window_start in the inner query)";
    let input_schema = a.input.schema();
    weighted(
        &mut flow,
        input_schema.as_arrow(),
        "an aggregation over this updating result",
        HINT,
    )?;
    let weight_field = Field::new(crate::plan::WEIGHT_COLUMN, DataType::Int64, false);
    let extended = input_schema.join(&DFSchema::try_from(Schema::new(vec![weight_field]))?)?;
    let w = Expr::Column(datafusion::common::Column::new_unqualified(
        crate::plan::WEIGHT_COLUMN,
    ));
    // The sums kept per group: the weights first (rows left), then each
    // aggregate's.
    let mut sums: Vec<Expr> = vec![sum(w.clone())];
    let mut finish = Vec::with_capacity(a.aggr_expr.len());
    for e in &a.aggr_expr {
        let Expr::AggregateFunction(AggregateFunction { func, params }) = unalias(e) else {
            return Err(PlanError::unsupported_hint(
                format!("{e} over a non-windowed aggregation"),
                HINT,
            ));
        };
        let name = func.name().to_lowercase();
        let multiset = crate::functions::multiset::MultisetKind::of(&name, params.distinct);
        if (params.distinct && multiset.is_none())
            || params.filter.is_some()
            || !params.order_by.is_empty()
        {
            return Err(PlanError::unsupported_hint(
                format!("{name}(DISTINCT ...), FILTER or ORDER BY over a non-windowed aggregation"),
                HINT,
            ));
        }
        let [arg] = params.args.as_slice() else {
            return Err(PlanError::unsupported_hint(
                format!("{name}() with several arguments over a non-windowed aggregation"),
                HINT,
            ));
        };
        // The weight of a row whose argument is not NULL, else 0.
        let counted = match arg {
            Expr::Literal(v, _) if !v.is_null() => w.clone(),
            _ => when(arg.clone().is_null(), lit(0i64)).otherwise(w.clone())?,
        };
        let arg_type = arg.get_type(input_schema)?;
        if let Some(kind) = multiset {
            sums.push(crate::functions::multiset::weighted_call(
                kind,
                arg.clone(),
                w.clone(),
            ));
            finish.push(Finish::Value(sums.len() - 1));
            continue;
        }
        match name.as_str() {
            "count" => {
                sums.push(sum(counted));
                finish.push(Finish::Count(sums.len() - 1));
            }
            "sum" | "avg" => {
                let weighted = if arg_type.is_integer() && name == "sum" {
                    cast(arg.clone(), DataType::Int64) * w.clone()
                } else if arg_type.is_integer() || arg_type.is_floating() {
                    cast(arg.clone(), DataType::Float64) * cast(w.clone(), DataType::Float64)
                } else {
                    return Err(PlanError::unsupported_hint(
                        format!("{name}() of {arg_type} over a non-windowed aggregation"),
                        "cast it to BIGINT or DOUBLE PRECISION",
                    ));
                };
                sums.push(sum(weighted));
                sums.push(sum(counted));
                let (s, c) = (sums.len() - 2, sums.len() - 1);
                finish.push(if name == "sum" {
                    Finish::Sum {
                        sum: s,
                        count: c,
                        to: if arg_type.is_integer() {
                            DataType::Int64
                        } else {
                            DataType::Float64
                        },
                    }
                } else {
                    Finish::Avg { sum: s, count: c }
                });
            }
            other => {
                return Err(PlanError::unsupported_hint(
                    format!(
                    "{other}() over a non-windowed aggregation (its rows change; {other} cannot \
                         take a row back without keeping every value)"
                ),
                    HINT,
                ))
            }
        }
    }
    // The outer aggregation over the inner rows and their weights.
    let physical_input = extended.as_arrow();
    let mut group_exprs = Vec::new();
    for (i, e) in a.group_expr.iter().enumerate() {
        if matches!(e, Expr::GroupingSet(_)) {
            return Err(PlanError::unsupported("GROUPING SETS, CUBE and ROLLUP"));
        }
        group_exprs.push((
            physical(e, &extended, props)?,
            a.schema.field(i).name().clone(),
        ));
    }
    let k = group_exprs.len();
    let ctx = PhysicalPlanningContext::default();
    let mut aggregates = Vec::new();
    let mut filters = Vec::new();
    for (i, e) in sums.iter().enumerate() {
        let e = e.clone().alias(format!("__drizzle_sum{i}"));
        let lowered =
            LoweredAggregateBuilder::new(&e, &extended, physical_input, props, &ctx).build()?;
        aggregates.push(lowered.aggregate);
        filters.push(lowered.filter);
    }
    if let Some(checked) = crate::functions::overflow::check_aggregate(&[], &aggregates, &filters)?
    {
        aggregates = checked.aggregates;
        filters = checked.filters;
    }
    let group_fields: Vec<Field> = (0..k).map(|i| a.schema.field(i).as_ref().clone()).collect();
    let mut partial_fields = group_fields.clone();
    let mut internal_fields = group_fields.clone();
    for agg in &aggregates {
        for f in agg.state_fields()? {
            partial_fields.push(f.as_ref().clone());
        }
        internal_fields.push(agg.field().as_ref().clone().with_nullable(true));
    }
    let internal = Arc::new(Schema::new(internal_fields));
    let agg = Arc::new(AggregatePlan {
        group_exprs,
        aggregates,
        filters,
        group_schema: Arc::new(Schema::new(group_fields)),
        partial_schema: Arc::new(Schema::new(partial_fields)),
        output_schema: Arc::clone(&internal),
        window: None,
        changes: false,
        over_changes: true,
    });
    flow.operators
        .push(Operator::AggregatePartial(Arc::clone(&agg)));
    let keys = leading_columns(&agg.partial_schema, k);
    let from = stages.cut(flow, keys);
    // The user's columns, then `op`, from the sums.
    let col =
        |i: usize| -> Arc<dyn PhysicalExpr> { Arc::new(PCol::new(internal.field(i).name(), i)) };
    let zero = |i: usize| -> Result<Arc<dyn PhysicalExpr>> {
        Ok(pe::binary(
            col(k + i),
            datafusion::logical_expr::Operator::Eq,
            pe::lit(ScalarValue::Int64(Some(0))),
            &internal,
        )?)
    };
    let null_when_empty = |count: usize,
                           value: Arc<dyn PhysicalExpr>,
                           t: &DataType|
     -> Result<Arc<dyn PhysicalExpr>> {
        Ok(pe::case(
            None,
            vec![(zero(count)?, pe::lit(ScalarValue::try_from(t)?))],
            Some(value),
        )?)
    };
    let mut exprs: Vec<Arc<dyn PhysicalExpr>> = (0..k).map(col).collect();
    for f in &finish {
        exprs.push(match f {
            Finish::Count(c) | Finish::Value(c) => col(k + c),
            Finish::Sum { sum, count, to } => {
                null_when_empty(*count, pe::cast(col(k + sum), &internal, to.clone())?, to)?
            }
            Finish::Avg { sum, count } => {
                let ratio = pe::binary(
                    col(k + sum),
                    datafusion::logical_expr::Operator::Divide,
                    pe::cast(col(k + count), &internal, DataType::Float64)?,
                    &internal,
                )?;
                null_when_empty(*count, ratio, &DataType::Float64)?
            }
        });
    }
    exprs.push(pe::case(
        None,
        vec![(zero(0)?, pe::lit(ScalarValue::from("delete")))],
        Some(pe::lit(ScalarValue::from("upsert"))),
    )?);
    let mut reduce = Flow::keyed(from, Operator::AggregateFinal(agg), true);
    reduce.push(BatchOp::Project {
        exprs,
        schema: Arc::new(with_op_column(a.schema.as_arrow())),
    });
    reduce.op_column = true;
    Ok(reduce)
}

/// `predicate` with each `AND` and `OR` evaluating its cheaper side first:
/// DataFusion evaluates the second side only on the rows the first leaves
/// undecided when they are few (at most a fifth), so a regular expression
/// second runs on those rows alone (Nexmark q21's `regexp_match(url, ...)
/// IS NOT NULL OR lower(channel) IN (...)`). The result is the same: both
/// are commutative in SQL's logic.
fn cheap_side_first(predicate: Arc<dyn PhysicalExpr>) -> Result<Arc<dyn PhysicalExpr>> {
    use datafusion::common::tree_node::Transformed;
    use datafusion::logical_expr::Operator as Op;
    use datafusion::physical_expr::expressions::BinaryExpr;
    use datafusion::physical_expr::ScalarFunctionExpr;
    // Regular expressions are what costs: count the calls.
    let cost = |e: &Arc<dyn PhysicalExpr>| {
        let mut n = 0usize;
        let _ = e.apply(|node| {
            if let Some(call) = node.downcast_ref::<ScalarFunctionExpr>() {
                if call.name().starts_with("regexp") {
                    n += 1;
                }
            }
            if let Some(b) = node.downcast_ref::<BinaryExpr>() {
                if matches!(
                    b.op(),
                    Op::RegexMatch | Op::RegexIMatch | Op::RegexNotMatch | Op::RegexNotIMatch
                ) {
                    n += 1;
                }
            }
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        });
        n
    };
    Ok(predicate
        .transform_up(|node| {
            let Some(b) = node.downcast_ref::<BinaryExpr>() else {
                return Ok(Transformed::no(node));
            };
            if !matches!(b.op(), Op::And | Op::Or) || cost(b.left()) <= cost(b.right()) {
                return Ok(Transformed::no(node));
            }
            let swapped: Arc<dyn PhysicalExpr> = Arc::new(BinaryExpr::new(
                Arc::clone(b.right()),
                *b.op(),
                Arc::clone(b.left()),
            ));
            Ok(Transformed::yes(swapped))
        })?
        .data)
}

/// The function calls a filter's `predicate` and the projection after it
/// (`exprs`) both compute (Nexmark q21's `regexp_match(url, ...)[2]` and
/// `lower(channel)`): a projection computing each once, appended to the
/// input's columns (`schema`), and the predicate and expressions reading
/// those columns instead. `None` when they share none. Volatile calls are
/// never shared.
#[allow(clippy::type_complexity)]
fn share_subexpressions(
    predicate: &Arc<dyn PhysicalExpr>,
    exprs: &[Arc<dyn PhysicalExpr>],
    schema: &Schema,
) -> Result<Option<(BatchOp, Arc<dyn PhysicalExpr>, Vec<Arc<dyn PhysicalExpr>>)>> {
    use datafusion::common::tree_node::{Transformed, TreeNodeRecursion};
    use datafusion::logical_expr::Volatility;
    use datafusion::physical_expr::expressions::Column as PCol;
    use datafusion::physical_expr::ScalarFunctionExpr;
    let occurs_in = |node: &Arc<dyn PhysicalExpr>, e: &Arc<dyn PhysicalExpr>| {
        let mut found = false;
        let _ = e.apply(|n| {
            found = n.as_ref() == node.as_ref();
            Ok(if found {
                TreeNodeRecursion::Stop
            } else {
                TreeNodeRecursion::Continue
            })
        });
        found
    };
    // Each call of the predicate is looked for in every expression: bound
    // the work for machine-written queries with thousands of terms.
    let size = |e: &Arc<dyn PhysicalExpr>| {
        let mut n = 0usize;
        let _ = e.apply(|_| {
            n += 1;
            Ok(TreeNodeRecursion::Continue)
        });
        n
    };
    if size(predicate).saturating_mul(exprs.iter().map(size).sum::<usize>()) > 1 << 20 {
        return Ok(None);
    }
    let mut shared: Vec<Arc<dyn PhysicalExpr>> = Vec::new();
    predicate.apply(|node| {
        let Some(call) = node.downcast_ref::<ScalarFunctionExpr>() else {
            return Ok(TreeNodeRecursion::Continue);
        };
        if call.fun().signature().volatility == Volatility::Volatile {
            return Ok(TreeNodeRecursion::Continue);
        }
        if exprs.iter().any(|e| occurs_in(node, e)) {
            if !shared.iter().any(|s| s.as_ref() == node.as_ref()) {
                shared.push(Arc::clone(node));
            }
            // Its own calls come with it.
            return Ok(TreeNodeRecursion::Jump);
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    if shared.is_empty() {
        return Ok(None);
    }
    let width = schema.fields().len();
    let mut pre: Vec<Arc<dyn PhysicalExpr>> = schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| Arc::new(PCol::new(f.name(), i)) as Arc<dyn PhysicalExpr>)
        .collect();
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    let names: Vec<String> = (0..shared.len())
        .map(|j| format!("__drizzle_shared{j}"))
        .collect();
    for (s, name) in shared.iter().zip(&names) {
        fields.push(Field::new(name, s.data_type(schema)?, s.nullable(schema)?));
        pre.push(Arc::clone(s));
    }
    let replace = |e: &Arc<dyn PhysicalExpr>| -> Result<Arc<dyn PhysicalExpr>> {
        Ok(Arc::clone(e)
            .transform_down(|node| {
                Ok(
                    match shared.iter().position(|s| s.as_ref() == node.as_ref()) {
                        Some(j) => Transformed::new(
                            Arc::new(PCol::new(&names[j], width + j)) as Arc<dyn PhysicalExpr>,
                            true,
                            TreeNodeRecursion::Jump,
                        ),
                        None => Transformed::no(node),
                    },
                )
            })?
            .data)
    };
    let predicate = replace(predicate)?;
    let exprs = exprs.iter().map(replace).collect::<Result<Vec<_>>>()?;
    Ok(Some((
        BatchOp::Project {
            exprs: pre,
            schema: Arc::new(Schema::new(fields)),
        },
        predicate,
        exprs,
    )))
}

/// A frame bound's `INTERVAL` in µs (no months: their length varies).
fn frame_interval_us(v: &ScalarValue) -> Option<i64> {
    match v {
        ScalarValue::IntervalMonthDayNano(Some(i)) if i.months == 0 => (i.days as i64)
            .checked_mul(86_400_000_000)?
            .checked_add(i.nanoseconds / 1000),
        ScalarValue::IntervalDayTime(Some(i)) => (i.days as i64)
            .checked_mul(86_400_000_000)?
            .checked_add(i.milliseconds as i64 * 1000),
        ScalarValue::DurationMicrosecond(Some(us)) => Some(*us),
        ScalarValue::DurationMillisecond(Some(ms)) => ms.checked_mul(1000),
        ScalarValue::DurationSecond(Some(s)) => s.checked_mul(1_000_000),
        _ => None,
    }
    .filter(|us| *us >= 0)
}

/// `OVER` aggregations of a stream: aggregate functions over a bounded
/// frame of predecessors ordered by event time, all with the same `PARTITION
/// BY` (the shuffle's keys), into a stage running `OverAggregateExec`.
fn lower_over(
    w: &datafusion::logical_expr::logical_plan::Window,
    stages: &mut Stages,
    props: &datafusion::execution::context::ExecutionProps,
) -> Result<Flow> {
    use datafusion::logical_expr::{WindowFrameBound, WindowFrameUnits, WindowFunctionDefinition};
    const HINT: &str = "aggregate over a bounded frame ordered by event time: \
        avg(x) OVER (PARTITION BY k ORDER BY ts ROWS BETWEEN 10 PRECEDING AND CURRENT ROW), \
        or RANGE BETWEEN INTERVAL '10' SECOND PRECEDING AND CURRENT ROW; \
        or keep the best rows per key: ROW_NUMBER() OVER (...) AS rn ... WHERE rn <= 10";
    let refuse = |what: String| Err(PlanError::unsupported_hint(what, HINT));
    let schema = w.input.schema();
    let mut partition: Option<&Vec<Expr>> = None;
    let mut time: Option<usize> = None;
    let mut retain = crate::plan::OverRetain::default();
    let mut range_frame = false;
    let mut unbounded = 0usize;
    let mut lags = 0usize;
    for e in &w.window_expr {
        let Expr::WindowFunction(wf) = unalias(e) else {
            return refuse(format!("the window expression {e} on a stream"));
        };
        // lag(x, n): the row n before in its partition, so the last n rows
        // of each key are what it keeps (as a ROWS n PRECEDING frame).
        let lag = match &wf.fun {
            WindowFunctionDefinition::AggregateUDF(_) => None,
            WindowFunctionDefinition::WindowUDF(f) if f.name() == "lag" => {
                match wf.params.args.get(1).map(unalias) {
                    None => Some(1),
                    Some(Expr::Literal(v, _)) => match v.cast_to(&DataType::Int64) {
                        Ok(ScalarValue::Int64(Some(n))) if n >= 0 => Some(n as u64),
                        _ => return refuse(format!("lag() with the offset {v} on a stream")),
                    },
                    Some(other) => {
                        return refuse(format!("lag() with the offset {other} on a stream"))
                    }
                }
            }
            WindowFunctionDefinition::WindowUDF(f) if f.name() == "lead" => {
                return Err(PlanError::unsupported_hint(
                    "lead() on a stream (it would wait for rows still to come)",
                    "use lag() and compare with the row before: \
                     lag(x) OVER (PARTITION BY k ORDER BY ts)",
                ));
            }
            _ => {
                return refuse(format!(
                    "the window function {}() on a stream (only aggregates over a bounded frame, \
                     lag(), and ROW_NUMBER() bounded as a top-N)",
                    wf.fun.name()
                ))
            }
        };
        let p = &wf.params;
        match partition {
            None => partition = Some(&p.partition_by),
            Some(other) if *other != p.partition_by => {
                return refuse("OVER windows with different PARTITION BY in one query".into())
            }
            Some(_) => {}
        }
        let order = match p.order_by.as_slice() {
            [o] if o.asc => column_index(&o.expr, schema),
            _ => None,
        };
        let Some(order) = order else {
            return refuse(format!(
                "{}() OVER without ORDER BY one event-time column ascending on a stream",
                wf.fun.name()
            ));
        };
        if time.is_some_and(|t| t != order) {
            return refuse("OVER windows ordered by different columns in one query".into());
        }
        time = Some(order);
        if let Some(n) = lag {
            // Its frame (the default one) does not matter.
            retain.rows = retain.rows.max(n);
            lags += 1;
            continue;
        }
        let frame = &p.window_frame;
        if !matches!(frame.end_bound, WindowFrameBound::CurrentRow) {
            return refuse(
                "an OVER frame that does not end at CURRENT ROW on a stream (it would wait for rows to come)"
                    .into(),
            );
        }
        let start = match &frame.start_bound {
            WindowFrameBound::Preceding(v) if !v.is_null() => v,
            WindowFrameBound::CurrentRow => &ScalarValue::UInt64(Some(0)),
            WindowFrameBound::Preceding(_) => {
                // UNBOUNDED PRECEDING (the default frame with ORDER BY): a
                // running aggregate per key.
                if matches!(frame.units, WindowFrameUnits::Groups) {
                    return refuse("a GROUPS frame on a stream".into());
                }
                if wf.params.filter.is_some() || wf.params.distinct {
                    return refuse(format!(
                        "{}(DISTINCT ...) or FILTER in an OVER frame unbounded in the past",
                        wf.fun.name()
                    ));
                }
                unbounded += 1;
                continue;
            }
            _ => return refuse("an OVER frame that starts after the current row".into()),
        };
        match frame.units {
            WindowFrameUnits::Rows => {
                let n = match start.cast_to(&DataType::UInt64) {
                    Ok(ScalarValue::UInt64(Some(n))) => n,
                    _ => return refuse(format!("the ROWS frame bound {start}")),
                };
                retain.rows = retain.rows.max(n);
            }
            WindowFrameUnits::Range => {
                range_frame = true;
                let us = match start {
                    ScalarValue::UInt64(Some(0)) => 0,
                    v => match frame_interval_us(v) {
                        Some(us) => us,
                        None => {
                            return refuse(format!(
                                "the RANGE frame bound {v} (an INTERVAL in days, hours, minutes or seconds)"
                            ))
                        }
                    },
                };
                retain.range_us = retain.range_us.max(us);
            }
            WindowFrameUnits::Groups => return refuse("a GROUPS frame on a stream".into()),
        }
    }
    let (Some(partition), Some(time)) = (partition, time) else {
        return refuse("an empty window".into());
    };
    // Frames unbounded in the past are running aggregates per key; bounded
    // ones (and lag) next to them keep the rows they reach.
    retain.unbounded = unbounded > 0;
    let mut flow = lower_node(&w.input, stages)?;
    no_open_sessions(&flow)?;
    // Over changing rows (a top-N's, a non-windowed aggregation's): each
    // change re-evaluates the frames it reaches; nothing waits for time.
    let changes = flow.upsert;
    let time_lag_us = if changes {
        if lags > 0 {
            return refuse(
                "lag() over changing rows (a top-N's or a non-windowed aggregation's)".into(),
            );
        }
        if retain.unbounded {
            return refuse(
                "an OVER frame unbounded in the past over changing rows (a top-N's or a \
                 non-windowed aggregation's: a change would re-evaluate its whole partition)"
                    .into(),
            );
        }
        if range_frame {
            return refuse(
                "a RANGE frame over changing rows (a top-N's or a non-windowed aggregation's)"
                    .into(),
            );
        }
        weighted(
            &mut flow,
            schema.as_arrow(),
            "OVER over this updating result",
            HINT,
        )?;
        0
    } else {
        time_lag(&mut flow, time, "an OVER window ordered")?
    };
    let partition_by = partition
        .iter()
        .map(|e| physical(e, schema, props))
        .collect::<Result<Vec<_>>>()?;
    let ctx = PhysicalPlanningContext::default();
    let window_exprs = w
        .window_expr
        .iter()
        .map(|e| {
            Ok(datafusion::physical_planner::create_window_expr(
                e, schema, props, &ctx,
            )?)
        })
        .collect::<Result<Vec<_>>>()?;
    let display = w
        .window_expr
        .iter()
        .map(|e| unalias(e).to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let plan = Arc::new(crate::plan::OverAggregatePlan {
        window_exprs,
        partition_by: partition_by.clone(),
        time_column: time,
        time_lag_us,
        retain,
        input: Arc::new(schema.as_arrow().clone()),
        schema: Arc::new(w.schema.as_arrow().clone()),
        display,
        changes,
    });
    let from = stages.cut(flow, partition_by);
    let mut out = Flow::keyed(from, Operator::OverAggregate(plan), changes);
    out.op_column = changes;
    out.changes = changes;
    Ok(out)
}

/// Lowers an optimised logical plan that reads a stream into its stage
/// graph: a stage per stream read, and a new stage at every aggregation
/// and stream-stream join.
pub fn lower(plan: &LogicalPlan) -> Result<StreamingPlan> {
    let (stripped, limit) = strip_top_limit(plan)?;
    let body = &stripped;
    let mut stages = Stages::default();
    let flow = lower_node(body, &mut stages)?;
    no_open_sessions(&flow)?;
    let output_schema: SchemaRef = if flow.op_column {
        Arc::new(with_op_column(body.schema().as_arrow()))
    } else {
        Arc::new(body.schema().as_arrow().clone())
    };
    let emit = if flow.changes {
        EmitMode::Changes
    } else if flow.upsert {
        EmitMode::Upsert
    } else if flow.closes_windows {
        EmitMode::OnWindowClose
    } else {
        EmitMode::Append
    };
    // Upserts are keyed by the last aggregation's group columns, followed
    // through the projections after it.
    let upsert_keys = match flow.operators.first() {
        Some(Operator::AggregateFinal(agg)) if emit == EmitMode::Upsert => {
            let after = kernels_after_first(&flow.operators);
            key_columns(agg.group_exprs.len(), &after, output_schema.fields().len())
        }
        Some(Operator::TopN(t)) if emit == EmitMode::Upsert => {
            // Keyed by the partition columns, and the rank when a key has
            // several rows.
            use datafusion::physical_expr::expressions::Column;
            let mut keys: Option<Vec<usize>> = t
                .partition_by
                .iter()
                .map(|e| e.downcast_ref::<Column>().map(Column::index))
                .collect();
            // Without PARTITION BY the rank alone is the key.
            if t.limit > 1 || t.partition_by.is_empty() {
                if let Some(k) = keys.as_mut() {
                    k.push(t.input.fields().len());
                }
            }
            let after = kernels_after_first(&flow.operators);
            let keys = keys
                .and_then(|k| key_positions(k, &after, output_schema.fields().len()))
                .ok_or_else(|| {
                    PlanError::unsupported_hint(
                        "a top-N whose result does not show its key",
                        "select the PARTITION BY columns (and the row number when it keeps more than one row)",
                    )
                })?;
            Some(keys)
        }
        _ => None,
    };
    // The sink's windowed aggregate or window join emits each window's rows
    // when it closes, tagged so the collector releases them in window
    // order: its window bounds never decrease in the output (window_start
    // preferred). A union's or interval join's rows carry no such order.
    let ordered = matches!(
        flow.operators.first(),
        Some(Operator::AggregateFinal(a)) if a.window.as_ref().is_some_and(|w| w.session.is_none())
    ) || matches!(flow.operators.first(), Some(Operator::WindowJoin(_)));
    let event_time = if ordered && emit == EmitMode::OnWindowClose {
        let bound = |end: bool| {
            flow.windows
                .iter()
                .position(|w| w.is_some_and(|w| w.is_end == end))
        };
        bound(false)
            .or_else(|| bound(true))
            .filter(|&i| i < output_schema.fields().len())
    } else {
        None
    };
    let op_column = flow.op_column;
    let mut graph = stages.finish(flow, emit, Arc::clone(&output_schema));
    // Lookup joins are numbered across the whole graph: workers ask the
    // coordinator for a table side by number.
    let mut next_join = 0u32;
    for stage in &mut graph.stages {
        for op in &mut stage.operators {
            if let Operator::Kernel(BatchOp::LookupJoin(spec)) = op {
                let mut numbered = spec.as_ref().clone();
                numbered.id = next_join;
                next_join += 1;
                *spec = Arc::new(numbered);
            }
        }
    }
    Ok(StreamingPlan {
        graph,
        upsert_keys,
        limit,
        output_schema,
        emit,
        event_time,
        op_column,
        rank_column: false,
    })
}

/// The stateless kernels after a stage's first operator.
fn kernels_after_first(operators: &[Operator]) -> Vec<BatchOp> {
    operators
        .iter()
        .skip(1)
        .filter_map(|op| match op {
            Operator::Kernel(k) => Some(k.clone()),
            _ => None,
        })
        .collect()
}

/// Removes a `LIMIT` that has only projections and aliases above it (the
/// optimiser pushes limits below projections); returns the plan and the limit.
fn strip_top_limit(plan: &LogicalPlan) -> Result<(LogicalPlan, Option<usize>)> {
    match plan {
        LogicalPlan::Limit(l) => {
            let skip = match l.get_skip_type()? {
                datafusion::logical_expr::SkipType::Literal(n) => n,
                _ => return Err(PlanError::unsupported("a non-literal OFFSET")),
            };
            if skip != 0 {
                return Err(PlanError::unsupported("OFFSET on a continuous query"));
            }
            let fetch = match l.get_fetch_type()? {
                datafusion::logical_expr::FetchType::Literal(n) => n,
                _ => return Err(PlanError::unsupported("a non-literal LIMIT")),
            };
            let (inner, inner_limit) = strip_top_limit(&l.input)?;
            let limit = match (fetch, inner_limit) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            Ok((inner, limit))
        }
        LogicalPlan::Projection(_) | LogicalPlan::SubqueryAlias(_) => {
            let input = plan.inputs()[0];
            let (inner, limit) = strip_top_limit(input)?;
            if limit.is_none() {
                return Ok((plan.clone(), None));
            }
            let rebuilt = plan.with_new_exprs(plan.expressions(), vec![inner])?;
            Ok((rebuilt, limit))
        }
        other => Ok((other.clone(), None)),
    }
}

/// The relations (tables, views) a finite plan scans, by name.
fn scanned_relations(plan: &LogicalPlan) -> Vec<String> {
    let mut names = std::collections::BTreeSet::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            names.insert(scan.table_name.table().to_string());
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    names.into_iter().collect()
}

/// Follows plain column references through the post-aggregate projections to
/// find where each of the `k` group columns lands in the output.
fn key_columns(k: usize, post_ops: &[BatchOp], output_width: usize) -> Option<Vec<usize>> {
    key_positions((0..k).collect(), post_ops, output_width)
}

/// Follows columns `keys` of an operator's output through the projections
/// after it; where each lands in the output.
fn key_positions(
    keys: Vec<usize>,
    post_ops: &[BatchOp],
    output_width: usize,
) -> Option<Vec<usize>> {
    use datafusion::physical_expr::expressions::Column;
    // position[i] = where key column i is now, if still present.
    let mut position: Vec<Option<usize>> = keys.into_iter().map(Some).collect();
    for op in post_ops {
        if let BatchOp::Project { exprs, .. } = op {
            position = position
                .iter()
                .map(|p| {
                    p.and_then(|src| {
                        exprs.iter().position(|e| {
                            e.downcast_ref::<Column>().is_some_and(|c| c.index() == src)
                        })
                    })
                })
                .collect();
        }
    }
    let keys: Option<Vec<usize>> = position.into_iter().collect();
    keys.filter(|k| k.iter().all(|&i| i < output_width))
}

fn lower_node(plan: &LogicalPlan, stages: &mut Stages) -> Result<Flow> {
    let props = datafusion::execution::context::ExecutionProps::new();
    match plan {
        LogicalPlan::TableScan(scan) => {
            let provider = source_as_provider(&scan.source)?;
            if !scan.filters.is_empty() {
                return Err(PlanError::unsupported("filters pushed into a stream scan"));
            }
            let (stream, window, full_schema) = if let Some(s) = provider.downcast_ref::<StreamProvider>() {
                (s.def.clone(), None, s.schema())
            } else if let Some(w) = provider.downcast_ref::<WindowProvider>() {
                (w.stream.clone(), Some(w.spec.clone()), w.schema())
            } else {
                return Err(PlanError::unsupported(format!(
                    "reading {} here: only streams feed a continuous query; tables join to it",
                    scan.table_name
                )));
            };
            let windows: Vec<Option<WindowCol>> = full_schema
                .fields()
                .iter()
                .map(|f| {
                    let w = window.as_ref()?;
                    let is_end = f.name() == "window_end";
                    (is_end || f.name() == "window_start").then_some(WindowCol {
                        is_end,
                        size_us: w.size_ms * 1000,
                        session: w.kind == WindowKind::Session,
                    })
                })
                .collect();
            let event_time: Vec<Option<EventCol>> = full_schema
                .fields()
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let wm = stream.watermark.as_ref()?;
                    (i < stream.columns.len() && *f.name() == wm.column).then_some(EventCol {
                        stream_column: i,
                        lag_us: window.as_ref().map(|w| w.size_ms * 1000),
                    })
                })
                .collect();
            let mut flow = Flow {
                input: StageInput::Source(stream),
                operators: window.into_iter().map(Operator::WindowAssign).collect(),
                windows,
                upsert: false,
                closes_windows: false,
                event_time,
                small: false,
                op_column: false,
                changes: false,
            };
            if let Some(projection) = &scan.projection {
                let identity = projection.len() == full_schema.fields().len()
                    && projection.iter().enumerate().all(|(i, p)| i == *p);
                if !identity {
                    let exprs = projection
                        .iter()
                        .map(|&i| {
                            Arc::new(datafusion::physical_expr::expressions::Column::new(
                                full_schema.field(i).name(),
                                i,
                            )) as Arc<dyn PhysicalExpr>
                        })
                        .collect();
                    let sources: Vec<Option<usize>> =
                        projection.iter().copied().map(Some).collect();
                    flow.windows = carried(&flow.windows, &sources);
                    flow.event_time = carried(&flow.event_time, &sources);
                    flow.push(BatchOp::Project {
                        exprs,
                        schema: Arc::new(scan.projected_schema.as_arrow().clone()),
                    });
                }
            }
            Ok(flow)
        }
        LogicalPlan::Projection(p) => {
            let mut flow = lower_node(&p.input, stages)?;
            let exprs = p
                .expr
                .iter()
                .map(|e| physical(e, p.input.schema(), &props))
                .collect::<Result<Vec<_>>>()?;
            let sources: Vec<Option<usize>> = p
                .expr
                .iter()
                .map(|e| column_index(e, p.input.schema()))
                .collect();
            for (e, source) in p.expr.iter().zip(&sources) {
                if source.is_none() {
                    session_free(&flow, e, p.input.schema())?;
                }
            }
            flow.windows = carried(&flow.windows, &sources);
            flow.event_time = carried(&flow.event_time, &sources);
            let mut exprs = exprs;
            let mut schema = p.schema.as_arrow().clone();
            if flow.op_column {
                // The `op` column rides along, last.
                let at = p.input.schema().fields().len();
                exprs.push(Arc::new(datafusion::physical_expr::expressions::Column::new(
                    OP_COLUMN, at,
                )));
                schema = with_op_column(&schema);
            }
            if let (LogicalPlan::Filter(f), false) = (p.input.as_ref(), flow.op_column) {
                // The filter just before: what it shares with the
                // projection is computed once, before both.
                if let Some(Operator::Kernel(BatchOp::Filter { predicate })) =
                    flow.operators.last()
                {
                    if let Some((pre, predicate, shared)) =
                        share_subexpressions(predicate, &exprs, f.input.schema().as_arrow())?
                    {
                        flow.operators.pop();
                        flow.push(pre);
                        flow.push(BatchOp::Filter { predicate });
                        exprs = shared;
                    }
                }
            }
            flow.push(BatchOp::Project {
                exprs,
                schema: Arc::new(schema),
            });
            Ok(flow)
        }
        LogicalPlan::Filter(f) => {
            if let Some(bound) = top_n_bound(f) {
                stages.top_n.push(bound);
            }
            let mut flow = lower_node(&f.input, stages)?;
            session_free(&flow, &f.predicate, f.input.schema())?;
            let predicate = cheap_side_first(physical(&f.predicate, f.input.schema(), &props)?)?;
            flow.push(BatchOp::Filter { predicate });
            Ok(flow)
        }
        LogicalPlan::SubqueryAlias(a) => lower_node(&a.input, stages),
        LogicalPlan::Join(j) => {
            let left_stream = reads_stream(&j.left);
            let right_stream = reads_stream(&j.right);
            if left_stream && right_stream {
                return lower_window_join(j, stages, &props);
            }
            if j.on.is_empty() {
                return Err(PlanError::unsupported_hint(
                    "a join without an equality condition",
                    "join on key = key",
                ));
            }
            let (stream_side, table_side, stream_on_left) = if left_stream {
                (&j.left, &j.right, true)
            } else {
                (&j.right, &j.left, false)
            };
            let join_type = match (j.join_type, stream_on_left) {
                (JoinType::Inner, _) => JoinType::Inner,
                (JoinType::Left, true) | (JoinType::Right, false) => JoinType::Left,
                (other, _) => {
                    return Err(PlanError::unsupported_hint(
                        format!("{other} join with the stream on that side"),
                        "use an inner join, or a LEFT JOIN with the stream on the left",
                    ))
                }
            };
            let mut flow = lower_node(stream_side, stages)?;
            if flow.upsert {
                return Err(PlanError::unsupported(
                    "joining the result of a non-windowed aggregation (its rows change)",
                ));
            }
            let mut stream_keys = Vec::new();
            let mut table_keys = Vec::new();
            let mut display = Vec::new();
            for (l, r) in &j.on {
                let (s, t) = if stream_on_left { (l, r) } else { (r, l) };
                stream_keys.push(physical(s, stream_side.schema(), &props)?);
                table_keys.push(physical(t, table_side.schema(), &props)?);
                display.push(format!("{l} = {r}"));
            }
            let filter = match &j.filter {
                Some(f) => {
                    if join_type == JoinType::Left {
                        return Err(PlanError::unsupported(
                            "a LEFT JOIN with a non-equality condition in ON",
                        ));
                    }
                    Some(physical(f, &j.schema, &props)?)
                }
                None => None,
            };
            let table_width = table_side.schema().fields().len();
            flow.windows = if stream_on_left {
                let mut w = flow.windows.clone();
                w.extend(std::iter::repeat_n(None, table_width));
                w
            } else {
                let mut w: Vec<Option<WindowCol>> = vec![None; table_width];
                w.extend(flow.windows.iter().copied());
                w
            };
            flow.event_time = if stream_on_left {
                let mut w = flow.event_time.clone();
                w.resize(stream_side.schema().fields().len(), None);
                w.extend(std::iter::repeat_n(None, table_width));
                w
            } else {
                let mut w: Vec<Option<EventCol>> = vec![None; table_width];
                w.extend(flow.event_time.iter().copied());
                w
            };
            // A lookup join may multiply rows.
            flow.small = false;
            flow.push(BatchOp::LookupJoin(Arc::new(LookupJoinSpec {
                id: 0,
                relations: scanned_relations(table_side),
                table_plan: table_side.as_ref().clone(),
                table_schema: Arc::new(table_side.schema().as_arrow().clone()),
                stream_keys,
                table_keys,
                join_type,
                stream_on_left,
                filter,
                schema: Arc::new(j.schema.as_arrow().clone()),
                display: display.join(", "),
            })));
            Ok(flow)
        }
        LogicalPlan::Aggregate(a) => {
            let mut flow = lower_node(&a.input, stages)?;
            if flow.upsert {
                return lower_aggregate_over_changes(a, flow, stages, &props);
            }
            let input_schema = a.input.schema();
            let physical_input = input_schema.as_arrow();
            let mut group_exprs = Vec::new();
            let mut group_windows = Vec::new();
            for (i, e) in a.group_expr.iter().enumerate() {
                if matches!(e, Expr::GroupingSet(_)) {
                    return Err(PlanError::unsupported("GROUPING SETS, CUBE and ROLLUP"));
                }
                let name = a.schema.field(i).name().clone();
                group_exprs.push((physical(e, input_schema, &props)?, name));
                group_windows.push(
                    column_index(e, input_schema).and_then(|c| flow.windows.get(c).copied().flatten()),
                );
            }
            let mut aggregates = Vec::new();
            let mut filters = Vec::new();
            for e in &a.aggr_expr {
                let inner = match e {
                    Expr::Alias(al) => al.expr.as_ref(),
                    other => other,
                };
                if let Expr::AggregateFunction(AggregateFunction { params, .. }) = inner {
                    if !params.order_by.is_empty() {
                        return Err(PlanError::unsupported("ORDER BY inside an aggregate"));
                    }
                }
                let ctx = PhysicalPlanningContext::default();
                let lowered_agg =
                    LoweredAggregateBuilder::new(e, input_schema, physical_input, &props, &ctx).build()?;
                aggregates.push(lowered_agg.aggregate);
                filters.push(lowered_agg.filter);
            }
            if let Some(checked) =
                crate::functions::overflow::check_aggregate(&[], &aggregates, &filters)?
            {
                aggregates = checked.aggregates;
                filters = checked.filters;
            }
            let group_fields: Vec<Field> = (0..group_exprs.len())
                .map(|i| a.schema.field(i).as_ref().clone())
                .collect();
            let mut partial_fields = group_fields.clone();
            for agg in &aggregates {
                for f in agg.state_fields()? {
                    partial_fields.push(f.as_ref().clone());
                }
            }
            // Which group column is the window?
            let mut window = group_windows.iter().enumerate().find_map(|(i, w)| {
                w.map(|w| WindowGroup {
                    group_index: i,
                    is_end: w.is_end,
                    size_us: w.size_us,
                    session: None,
                })
            });
            let sessions = group_windows.iter().flatten().any(|w| w.session);
            if sessions {
                if let Some(w) = window.as_mut() {
                    let bound = |end: bool| {
                        group_windows
                            .iter()
                            .position(|g| g.is_some_and(|g| g.session && g.is_end == end))
                    };
                    w.session = Some(crate::plan::SessionBounds {
                        start: bound(false),
                        end: bound(true),
                        keys: (0..group_windows.len())
                            .filter(|&i| group_windows[i].is_none())
                            .collect(),
                    });
                }
                // Only the bounds themselves are grouped by: an aggregate
                // argument or group expression over a provisional bound
                // has no final value.
                for e in a.aggr_expr.iter().chain(
                    a.group_expr
                        .iter()
                        .filter(|e| column_index(e, input_schema).is_none()),
                ) {
                    session_free(&flow, e, input_schema)?;
                }
            }
            let agg = Arc::new(AggregatePlan {
                group_exprs,
                aggregates,
                filters,
                group_schema: Arc::new(Schema::new(group_fields)),
                partial_schema: Arc::new(Schema::new(partial_fields)),
                output_schema: Arc::new(a.schema.as_arrow().clone()),
                window,
                changes: false,
                over_changes: false,
            });
            flow.operators
                .push(Operator::AggregatePartial(Arc::clone(&agg)));
            // The partial rows start with the group columns: they are the
            // shuffle's keys (a session's key alone: its provisional
            // windows must meet in one partition to merge).
            let keys = match agg.window.as_ref().and_then(|w| w.session.as_ref()) {
                Some(s) => s
                    .keys
                    .iter()
                    .map(|&i| {
                        Arc::new(datafusion::physical_expr::expressions::Column::new(
                            agg.partial_schema.field(i).name(),
                            i,
                        )) as Arc<dyn PhysicalExpr>
                    })
                    .collect(),
                None => leading_columns(&agg.partial_schema, agg.group_exprs.len()),
            };
            let mut windows = group_windows;
            windows.extend(std::iter::repeat_n(None, agg.aggregates.len()));
            let windowed = agg.window.is_some();
            let per_window = windowed && windows[..agg.group_exprs.len()].iter().all(Option::is_some);
            let from = stages.cut(flow, keys);
            Ok(Flow {
                input: StageInput::Shuffle(vec![from]),
                operators: vec![Operator::AggregateFinal(agg)],
                // Sessions close out of window order and are not aligned:
                // nothing downstream may treat their bounds as windows.
                windows: if windowed && !sessions { windows } else { Vec::new() },
                upsert: !windowed,
                closes_windows: windowed,
                event_time: Vec::new(),
                small: per_window && !sessions,
                op_column: false,
                changes: false,
            })
        }
        LogicalPlan::Sort(_) => Err(PlanError::unsupported_hint(
            "ORDER BY on a continuous query",
            "an unbounded stream has no final order; create a MATERIALIZED VIEW and ORDER BY when you \
             SELECT from it (a view's ORDER BY ... LIMIT n keeps the first n rows of that order as \
             rows arrive: a top-N)",
        )),
        LogicalPlan::Limit(_) => Err(PlanError::unsupported("LIMIT inside a continuous query (only at the top)")),
        LogicalPlan::Window(w) => {
            let address = std::ptr::from_ref(plan) as usize;
            match stages.top_n.iter().find(|(a, _)| *a == address) {
                Some(&(_, limit)) => lower_top_n(w, limit, stages, &props),
                None => lower_over(w, stages, &props),
            }
        }
        LogicalPlan::Union(u) => {
            // UNION ALL: each input is cut into its own stage and shuffled
            // (by all its columns, to spread the rows) into a union stage.
            let mut flows = Vec::with_capacity(u.inputs.len());
            for input in &u.inputs {
                if !reads_stream(input) {
                    return Err(PlanError::unsupported_hint(
                        "UNION ALL of a stream with a table",
                        "every input of a continuous UNION ALL reads a stream",
                    ));
                }
                let flow = lower_node(input, stages)?;
                flows.push((flow, input.schema().as_arrow().clone()));
            }
            // Rows that change make the union a change stream: every input
            // says what it adds and takes back (`op`).
            let changes = flows.iter().any(|(f, _)| f.upsert);
            if changes {
                for (flow, schema) in &mut flows {
                    into_changes(
                        flow,
                        schema,
                        "UNION ALL of this updating result",
                        "union windowed aggregates: GROUP BY window_start",
                    )?;
                    flow.windows.clear();
                    flow.closes_windows = false;
                }
            }
            let windows = match flows.first() {
                Some((first, _)) if flows.iter().all(|(f, _)| f.windows == first.windows) => {
                    first.windows.clone()
                }
                _ => Vec::new(),
            };
            // Rows come out when windows close if every input's do.
            let closes_windows = flows.iter().all(|(f, _)| f.closes_windows);
            let mut inputs = Vec::with_capacity(flows.len());
            for (flow, schema) in flows {
                let keys = leading_columns(&schema, schema.fields().len());
                inputs.push(stages.cut(flow, keys));
            }
            Ok(Flow {
                input: StageInput::Shuffle(inputs),
                operators: vec![Operator::Union],
                windows,
                upsert: changes,
                closes_windows,
                event_time: Vec::new(),
                small: false,
                op_column: changes,
                changes,
            })
        }
        LogicalPlan::Distinct(_) => Err(PlanError::unsupported("DISTINCT ON a stream")),
        other => Err(PlanError::unsupported(format!(
            "{} in a continuous query",
            other.display().to_string().split(':').next().unwrap_or("this operator")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{ColumnDef, WatermarkSpec};
    use crate::statement::{parse_statements, DrizzleStatement};
    use arrow::datatypes::TimeUnit;
    use datafusion::datasource::MemTable;

    struct Fixture;

    /// The plan's last final aggregation.
    fn final_agg(p: &StreamingPlan) -> Option<Arc<AggregatePlan>> {
        p.graph
            .stages
            .iter()
            .flat_map(|s| &s.operators)
            .filter_map(|op| match op {
                Operator::AggregateFinal(a) => Some(Arc::clone(a)),
                _ => None,
            })
            .next_back()
    }

    /// The plan's window join.
    fn window_join(p: &StreamingPlan) -> Option<Arc<WindowJoinPlan>> {
        p.graph
            .stages
            .iter()
            .flat_map(|s| &s.operators)
            .find_map(|op| match op {
                Operator::WindowJoin(j) => Some(Arc::clone(j)),
                _ => None,
            })
    }

    fn col(name: &str, t: DataType) -> ColumnDef {
        ColumnDef {
            name: name.into(),
            sql_type: format!("{t}"),
            data_type: t,
            nullable: true,
        }
    }

    impl RelationResolver for Fixture {
        fn resolve(&self, name: &str) -> Option<Relation> {
            match name {
                "events" | "clicks" => Some(Relation::Stream(StreamDef {
                    name: name.into(),
                    columns: vec![
                        col("ad_id", DataType::Int64),
                        col("kind", DataType::Utf8),
                        col("ts", DataType::Timestamp(TimeUnit::Microsecond, None)),
                    ],
                    watermark: Some(WatermarkSpec {
                        column: "ts".into(),
                        delay_ms: 1000,
                    }),
                    options: Default::default(),
                    partitions: 2,
                    created_at_ms: 0,
                    proctime: None,
                })),
                "ads" => {
                    let schema = Arc::new(Schema::new(vec![
                        Field::new("ad_id", DataType::Int64, true),
                        Field::new("campaign_id", DataType::Int64, true),
                    ]));
                    Some(Relation::Finite(Arc::new(
                        MemTable::try_new(schema, vec![vec![]]).ok()?,
                    )))
                }
                _ => None,
            }
        }
    }

    fn plan(sql: &str) -> Result<PlannedQuery> {
        let ctx = crate::new_session_context();
        let Some(DrizzleStatement::Query(q)) = parse_statements(sql)?.into_iter().next() else {
            panic!("not a query: {sql}")
        };
        plan_query(&ctx.state(), &Fixture, &q, &[])
    }

    fn continuous(sql: &str) -> StreamingPlan {
        match plan(sql).unwrap() {
            PlannedQuery::Continuous(p) => *p,
            PlannedQuery::Finite(_) => panic!("expected a continuous plan for {sql}"),
        }
    }

    #[test]
    fn plan_fragments_survive_the_wire() {
        let ctx = crate::new_session_context().task_ctx();
        for sql in [
            "SELECT ad_id, upper(kind) AS k FROM events WHERE ad_id > 3 AND kind LIKE 'v%' LIMIT 5",
            "SELECT a.campaign_id, window_start, count(*), sum(e.ad_id) FILTER (WHERE e.kind = 'view') \
             FROM TUMBLE(events, ts, INTERVAL '10' SECOND) e JOIN ads a ON e.ad_id = a.ad_id \
             WHERE e.kind <> 'x' GROUP BY a.campaign_id, window_start HAVING count(*) > 1",
            "SELECT kind, count(DISTINCT ad_id) AS n, avg(ad_id) FROM events GROUP BY kind",
            "SELECT e.ad_id, a.campaign_id FROM events e LEFT JOIN ads a ON e.ad_id = a.ad_id",
            "SELECT e.ad_id, a.campaign_id FROM events e JOIN ads a ON e.ad_id = a.ad_id \
             AND a.campaign_id > e.ad_id",
            "SELECT window_start, window_end, min(ad_id) FROM HOP(events, ts, INTERVAL '1' SECOND, \
             INTERVAL '5' SECOND) GROUP BY window_start, window_end",
        ] {
            let p = continuous(sql);
            // The stage graph, as workers get it: the same stages.
            let graph = p.graph();
            let back = crate::codec::decode_graph(
                &crate::codec::encode_graph(&graph).unwrap(),
                &ctx,
            )
            .unwrap();
            assert_eq!(
                back.explain(String::new(), 3),
                graph.explain(String::new(), 3),
                "{sql}"
            );
            assert_eq!(back.output_schema, graph.output_schema, "{sql}");
            let bytes = crate::codec::encode_plan(&p).unwrap();
            let back = crate::codec::decode_plan(&bytes, &ctx).unwrap();
            let ops = |p: &StreamingPlan| -> Vec<Vec<String>> {
                p.stages(3).into_iter().map(|s| s.operators).collect()
            };
            assert_eq!(ops(&back), ops(&p), "{sql}");
            assert_eq!(back.output_schema, p.output_schema, "{sql}");
            assert_eq!(back.emit, p.emit);
            assert_eq!(back.limit, p.limit);
            assert_eq!(back.upsert_keys, p.upsert_keys);
            match (final_agg(&back), final_agg(&p)) {
                (Some(a), Some(b)) => {
                    assert_eq!(a.partial_schema, b.partial_schema, "{sql}");
                    assert_eq!(a.output_schema, b.output_schema, "{sql}");
                    assert_eq!(a.window, b.window);
                    assert_eq!(a.filters.len(), b.filters.len());
                }
                (None, None) => {}
                _ => panic!("aggregate lost on the wire: {sql}"),
            }
        }
        assert!(crate::codec::decode_plan(b"not a plan", &ctx).is_err());
        assert!(crate::codec::decode_graph(b"not a graph", &ctx).is_err());
    }

    #[test]
    fn a_window_without_alias_is_named_after_its_stream() {
        // Nexmark q5's inner query, as RisingWave and Flink write it.
        let p = continuous(
            "SELECT events.ad_id, count(*) AS num, window_start AS starttime \
             FROM HOP(events, ts, INTERVAL '2' SECOND, INTERVAL '10' SECOND) \
             GROUP BY window_start, events.ad_id",
        );
        assert_eq!(p.emit, EmitMode::OnWindowClose);
        let names: Vec<&str> = p
            .output_schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        assert_eq!(names, ["ad_id", "num", "starttime"]);
        // An explicit alias still wins.
        let p = continuous(
            "SELECT e.ad_id FROM TUMBLE(events, ts, INTERVAL '1' SECOND) AS e WHERE e.ad_id > 1",
        );
        assert_eq!(p.output_schema.fields().len(), 1);
        assert!(
            plan("SELECT events.ad_id FROM TUMBLE(events, ts, INTERVAL '1' SECOND) AS e").is_err()
        );
    }

    #[test]
    fn every_plan_is_a_stage_graph_cut_at_its_shuffles() {
        use crate::graph::{Operator, Partitioning, StageId, StageInput, StageOutput};
        // No shuffle: one source stage writing the sink.
        let g = continuous("SELECT ad_id FROM events WHERE ad_id > 3").graph();
        assert_eq!((g.stages.len(), g.shuffles()), (1, 0));
        assert!(matches!(g.sink().input, StageInput::Source(_)));
        assert!(matches!(
            g.sink().output,
            StageOutput::Sink(EmitMode::Append)
        ));
        // An aggregation: partial half, hash on the group columns, final half.
        let g = continuous(
            "SELECT kind, window_start, count(*) FROM TUMBLE(events, ts, INTERVAL '1' SECOND) \
             GROUP BY kind, window_start",
        )
        .graph();
        assert_eq!((g.stages.len(), g.shuffles()), (2, 1));
        let StageOutput::Shuffle {
            to,
            partitioning: Partitioning::Hash(keys),
        } = &g.stages[0].output
        else {
            panic!("stage 0 shuffles");
        };
        assert_eq!((*to, keys.len()), (StageId(1), 2));
        assert!(matches!(
            g.stages[0].operators.last(),
            Some(Operator::AggregatePartial(_))
        ));
        assert!(matches!(&g.stages[1].input, StageInput::Shuffle(i) if i == &[StageId(0)]));
        assert!(matches!(
            g.stages[1].operators.first(),
            Some(Operator::AggregateFinal(_))
        ));
        assert!(g.stages[1].is_stateful() && !g.stages[0].is_stateful());
        assert_eq!((g.stages[0].tasks(4), g.stages[1].tasks(4)), (2, 4));
        // A window join: two source stages into one join stage, left first.
        let g = continuous(
            "SELECT e.ad_id, c.kind FROM TUMBLE(events, ts, INTERVAL '10' SECOND) e \
             JOIN TUMBLE(clicks, ts, INTERVAL '10' SECOND) c \
             ON e.ad_id = c.ad_id AND e.window_start = c.window_start",
        )
        .graph();
        assert_eq!(
            (g.stages.len(), g.shuffles(), g.sources().count()),
            (3, 2, 2)
        );
        assert!(
            matches!(&g.sink().input, StageInput::Shuffle(i) if i == &[StageId(0), StageId(1)])
        );
        assert!(matches!(
            g.sink().operators.first(),
            Some(Operator::WindowJoin(_))
        ));
    }

    #[test]
    fn window_join_of_two_streams_has_two_map_stages_and_survives_the_wire() {
        let sql = "SELECT e.ad_id, c.kind, e.window_start \
             FROM TUMBLE(events, ts, INTERVAL '10' SECOND) e \
             JOIN TUMBLE(clicks, ts, INTERVAL '10' SECOND) c \
             ON e.ad_id = c.ad_id AND e.window_start = c.window_start WHERE c.kind <> 'x'";
        let p = continuous(sql);
        assert_eq!(p.emit, EmitMode::OnWindowClose);
        assert!(p.has_shuffle());
        let j = window_join(&p).expect("a window join");
        assert_eq!(
            p.streams()
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            ["events", "clicks"]
        );
        assert_eq!((j.left_keys.len(), j.right_keys.len()), (1, 1));
        assert!(!j.window_is_end);
        let stages = p.stages(3);
        assert_eq!(stages.len(), 3);
        assert!(stages[2]
            .operators
            .iter()
            .any(|o| o.starts_with("WindowJoinExec")));
        assert!(
            stages[1]
                .operators
                .iter()
                .any(|o| o.starts_with("FilterExec")),
            "filter pushed into the right input"
        );
        let ctx = crate::new_session_context().task_ctx();
        let graph = p.graph();
        let wire =
            crate::codec::decode_graph(&crate::codec::encode_graph(&graph).unwrap(), &ctx).unwrap();
        assert_eq!(
            wire.explain(String::new(), 3),
            graph.explain(String::new(), 3)
        );
        let back =
            crate::codec::decode_plan(&crate::codec::encode_plan(&p).unwrap(), &ctx).unwrap();
        let ops = |p: &StreamingPlan| -> Vec<Vec<String>> {
            p.stages(3).into_iter().map(|s| s.operators).collect()
        };
        assert_eq!(ops(&back), ops(&p));
        assert_eq!(window_join(&back).unwrap().schema, j.schema);
        // Without a window bound or time condition: a regular join.
        for regular in [
            "SELECT * FROM events e JOIN clicks c ON e.ad_id = c.ad_id",
            "SELECT * FROM TUMBLE(events, ts, INTERVAL '10' SECOND) e \
             JOIN TUMBLE(clicks, ts, INTERVAL '10' SECOND) c ON e.ad_id = c.ad_id",
        ] {
            let p = continuous(regular);
            assert_eq!(p.emit, EmitMode::Append);
            assert!(
                p.stages(3)
                    .iter()
                    .any(|s| s.operators.iter().any(|o| o.starts_with("JoinExec"))),
                "{regular}"
            );
        }
        for bad in [
            "SELECT * FROM events e JOIN clicks c ON e.ad_id > c.ad_id",
            "SELECT * FROM TUMBLE(events, ts, INTERVAL '10' SECOND) e \
             JOIN TUMBLE(clicks, ts, INTERVAL '5' SECOND) c ON e.ad_id = c.ad_id AND e.window_start = c.window_start",
            "SELECT * FROM events e LEFT JOIN clicks c \
             ON e.ts BETWEEN c.ts - INTERVAL '1' SECOND AND c.ts",
        ] {
            assert!(matches!(plan(bad), Err(PlanError::Unsupported { .. })), "{bad}");
        }
        // Outer window and interval joins pad a row once nothing can match
        // it (when its window closes, when the watermark passes its
        // interval): append-only, no op column.
        for (sql, emit, operator) in [
            (
                "SELECT * FROM TUMBLE(events, ts, INTERVAL '10' SECOND) e \
                 LEFT JOIN TUMBLE(clicks, ts, INTERVAL '10' SECOND) c \
                 ON e.ad_id = c.ad_id AND e.window_start = c.window_start",
                EmitMode::OnWindowClose,
                "WindowJoinExec: left",
            ),
            (
                "SELECT * FROM events e FULL JOIN clicks c \
                 ON e.ad_id = c.ad_id AND e.ts BETWEEN c.ts - INTERVAL '1' SECOND AND c.ts",
                EmitMode::Append,
                "IntervalJoinExec: full",
            ),
        ] {
            let p = continuous(sql);
            assert_eq!(p.emit, emit, "{sql}");
            let stages = p.stages(3);
            assert!(
                stages
                    .iter()
                    .any(|s| s.operators.iter().any(|o| o.starts_with(operator))),
                "{stages:?}"
            );
        }
    }

    #[test]
    fn aggregates_compose_over_windowed_aggregates_and_window_joins() {
        use crate::graph::{StageId, StageInput};
        // Max over per-window counts (Nexmark q5's inner part): the second
        // aggregation groups by the first's window column, so it is windowed
        // too; three stages, two shuffles.
        let p = continuous(
            "SELECT starttime, max(num) AS maxn FROM ( \
               SELECT events.ad_id, count(*) AS num, window_start AS starttime \
               FROM HOP(events, ts, INTERVAL '2' SECOND, INTERVAL '10' SECOND) \
               GROUP BY events.ad_id, window_start) AS counts \
             GROUP BY starttime",
        );
        assert_eq!(p.emit, EmitMode::OnWindowClose);
        assert_eq!((p.graph.stages.len(), p.graph.shuffles()), (3, 2));
        assert!(matches!(&p.graph.stages[2].input, StageInput::Shuffle(i) if i == &[StageId(1)]));
        let w = final_agg(&p)
            .unwrap()
            .window
            .clone()
            .expect("windowed by starttime");
        assert_eq!((w.group_index, w.is_end, w.size_us), (0, false, 10_000_000));
        // A count over a window join: an upsert over its closed windows.
        let p = continuous(
            "SELECT count(*) FROM TUMBLE(events, ts, INTERVAL '10' SECOND) e \
             JOIN TUMBLE(clicks, ts, INTERVAL '10' SECOND) c \
             ON e.ad_id = c.ad_id AND e.window_start = c.window_start",
        );
        assert_eq!(p.emit, EmitMode::Upsert);
        assert_eq!((p.graph.stages.len(), p.graph.shuffles()), (4, 3));
        // Stages are numbered sources first: the runtime reads inputs so.
        assert_eq!(p.graph.sources().count(), 2);
        assert!(p.graph.stages[..2]
            .iter()
            .all(|s| matches!(s.input, StageInput::Source(_))));
        // An aggregation over a non-windowed aggregation: the inner one
        // emits changes, the outer one sums them, with an op column; max
        // keeps a multiset; array_agg cannot take a row back.
        let over = continuous(
            "SELECT sum(n) AS total FROM (SELECT kind, count(*) AS n FROM events GROUP BY kind) AS k",
        );
        assert!(over.op_column);
        assert_eq!(over.emit, EmitMode::Upsert);
        assert!(over.graph.stages.iter().any(|s| matches!(
            s.operators.first(),
            Some(Operator::AggregateFinal(a)) if a.changes
        )));
        let max = continuous(
            "SELECT max(n) FROM (SELECT kind, count(*) AS n FROM events GROUP BY kind) AS k",
        );
        assert!(max.op_column);
        // OVER over a top-N (Nexmark q6's shape): the top-N emits changes,
        // the OVER re-evaluates what they reach and emits inserts and
        // deletes with an op column; a RANGE frame there is refused.
        let top = "(SELECT ad_id, kind, ts, ROW_NUMBER() OVER (PARTITION BY ad_id ORDER BY ts DESC) AS rn \
                   FROM events) AS t WHERE rn = 1";
        let q6 = continuous(&format!(
            "SELECT kind, count(*) OVER (PARTITION BY kind ORDER BY ts \
             ROWS BETWEEN 3 PRECEDING AND CURRENT ROW) AS n FROM {top}"
        ));
        assert_eq!((q6.emit, q6.op_column), (EmitMode::Changes, true));
        assert_eq!(q6.output_schema.fields().len(), 3);
        assert!(q6.graph.stages.iter().any(|s| matches!(
            s.operators.first(),
            Some(Operator::TopN(t)) if t.changes
        )));
        assert!(q6.graph.stages.iter().any(|s| matches!(
            s.operators.first(),
            Some(Operator::OverAggregate(o)) if o.changes && o.retain.rows == 3
        )));
        let err = plan(&format!(
            "SELECT kind, count(*) OVER (PARTITION BY kind ORDER BY ts \
             RANGE BETWEEN INTERVAL '1' SECOND PRECEDING AND CURRENT ROW) FROM {top}"
        ))
        .unwrap_err();
        assert!(matches!(err, PlanError::Unsupported { .. }), "{err}");
        // Aggregates over a top-N take back its replaced rows.
        let total = continuous(&format!(
            "SELECT kind, count(*) AS n FROM {top} GROUP BY kind"
        ));
        assert_eq!((total.emit, total.op_column), (EmitMode::Upsert, true));
        let err = plan(
            "SELECT array_agg(n) FROM (SELECT kind, count(*) AS n FROM events GROUP BY kind) AS k",
        )
        .unwrap_err();
        assert!(matches!(err, PlanError::Unsupported { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("array_agg() over a non-windowed aggregation"),
            "{err}"
        );
    }

    #[test]
    fn stateless_query_is_one_map_stage() {
        let p = continuous("SELECT ad_id, upper(kind) FROM events WHERE ad_id > 3 LIMIT 5");
        assert_eq!(p.emit, EmitMode::Append);
        assert_eq!(p.limit, Some(5));
        let stages = p.stages(4);
        assert_eq!(stages.len(), 1);
        let ops = &stages[0].operators;
        assert!(ops[0].starts_with("StreamScanExec"));
        assert!(ops.iter().any(|o| o.starts_with("FilterExec")));
        assert!(ops.last().unwrap().contains("emit=append"));
    }

    #[test]
    fn source_stages_know_which_stream_columns_they_read() {
        let read = |sql: &str| continuous(sql).graph.stages[0].source_columns_read();
        // (ad_id, kind, ts)
        assert_eq!(
            read("SELECT ad_id FROM events"),
            Some(vec![true, false, false])
        );
        assert_eq!(
            read("SELECT ad_id FROM events WHERE kind = 'view'"),
            Some(vec![true, true, false])
        );
        assert_eq!(
            read("SELECT window_start, count(*) FROM TUMBLE(events, ts, INTERVAL '1' SECOND) GROUP BY window_start"),
            Some(vec![false, false, true])
        );
        assert_eq!(read("SELECT * FROM events"), None);
    }

    #[test]
    fn ysb_query_splits_at_the_shuffle_with_partial_aggregation() {
        let p = continuous(
            "SELECT a.campaign_id, window_start, count(*) FROM TUMBLE(events, ts, INTERVAL '10' SECOND) e \
             JOIN ads a ON e.ad_id = a.ad_id WHERE e.kind = 'view' GROUP BY a.campaign_id, window_start",
        );
        assert_eq!(p.emit, EmitMode::OnWindowClose);
        let stages = p.stages(4);
        assert_eq!(stages.len(), 2);
        let map: Vec<&str> = stages[0]
            .operators
            .iter()
            .map(|o| o.split(':').next().unwrap())
            .collect();
        assert_eq!(map[0], "StreamScanExec");
        assert_eq!(map[1], "WindowAssignExec");
        assert!(map.contains(&"LookupJoinExec"));
        assert_eq!(
            &map[map.len() - 2..],
            &["AggregatePartialExec", "ShuffleWriteExec"]
        );
        let reduce: Vec<&str> = stages[1]
            .operators
            .iter()
            .map(|o| o.split(':').next().unwrap())
            .collect();
        assert_eq!(reduce[0], "ShuffleReadExec");
        assert_eq!(reduce[1], "AggregateFinalExec");
        assert_eq!(*reduce.last().unwrap(), "SinkExec");
        let agg = final_agg(&p).unwrap();
        assert_eq!(agg.window.clone().unwrap().group_index, 1);
        assert_eq!(agg.window.clone().unwrap().size_us, 10_000_000);
    }

    #[test]
    fn plain_group_by_is_an_upsert_keyed_by_its_group_columns() {
        let p = continuous(
            "SELECT kind, count(DISTINCT ad_id) AS n FROM events GROUP BY kind HAVING count(*) > 1",
        );
        assert_eq!(p.emit, EmitMode::Upsert);
        assert_eq!(p.upsert_keys, Some(vec![0]));
        // count(DISTINCT) stays a single aggregate (no two-level rewrite).
        assert_eq!(final_agg(&p).unwrap().aggregates.len(), 2);
        let p = continuous("SELECT count(*) FROM events GROUP BY kind");
        assert_eq!(p.upsert_keys, None, "the key is not selected");
    }

    #[test]
    fn unbounded_impossibilities_are_refused() {
        for sql in [
            "SELECT ad_id FROM events ORDER BY ad_id",
            "SELECT a.ad_id FROM events a LEFT JOIN events b ON a.kind > b.kind",
            "SELECT ad_id, row_number() OVER (ORDER BY ts) FROM events",
            "SELECT ad_id FROM events LIMIT 3 OFFSET 2",
        ] {
            assert!(
                matches!(plan(sql), Err(PlanError::Unsupported { .. })),
                "{sql}"
            );
        }
        // An outer regular join is a change stream.
        let p = continuous("SELECT a.ad_id FROM events a LEFT JOIN events b ON a.ad_id = b.ad_id");
        assert_eq!((p.emit, p.op_column), (EmitMode::Changes, true));
        assert!(matches!(
            plan("SELECT * FROM ads"),
            Ok(PlannedQuery::Finite(_))
        ));
    }

    #[test]
    fn interval_joins_track_event_time_and_bound_both_sides() {
        // Nexmark q7's shape: a stream joined to a windowed maximum, within
        // the window's bounds.
        let p = continuous(
            "SELECT B.ad_id, B.ts FROM events B JOIN (SELECT max(ad_id) AS top, window_end AS wend \
             FROM TUMBLE(events, ts, INTERVAL '10' SECOND) GROUP BY window_end) B1 \
             ON B.ad_id = B1.top WHERE B.ts BETWEEN B1.wend - INTERVAL '10' SECOND AND B1.wend",
        );
        assert_eq!(p.emit, EmitMode::Append);
        let join = p
            .graph
            .stages
            .iter()
            .flat_map(|s| &s.operators)
            .find_map(|op| match op {
                Operator::IntervalJoin(j) => Some(Arc::clone(j)),
                _ => None,
            })
            .expect("an interval join");
        assert_eq!((join.lower_us, join.upper_us), (-10_000_000, 0));
        assert_eq!((join.left_lag_us, join.right_lag_us), (0, 0));
        // The raw read of the stream tracks its event time; the windowed
        // read has its window assigner.
        let firsts: Vec<&Operator> = p
            .graph
            .sources()
            .filter_map(|s| s.operators.first())
            .collect();
        assert!(
            firsts
                .iter()
                .any(|op| matches!(op, Operator::EventTime(e) if e.watermark_delay_ms == 1000)),
            "{firsts:?}"
        );
        assert!(firsts
            .iter()
            .any(|op| matches!(op, Operator::WindowAssign(_))));
        assert_eq!(
            p.graph.stages.len(),
            4,
            "two reads, the aggregate, the join"
        );
        assert!(p.graph.stages[3].is_stateful());
        // The windowed maximum is one row per window: broadcast to every
        // partition of the join, while the raw stream stays hashed by key.
        let outputs: Vec<&StageOutput> = p.graph.stages.iter().map(|s| &s.output).collect();
        let broadcasts = outputs
            .iter()
            .filter(|o| {
                matches!(
                    o,
                    StageOutput::Shuffle {
                        partitioning: Partitioning::Broadcast,
                        ..
                    }
                )
            })
            .count();
        assert_eq!(broadcasts, 1, "{outputs:?}");
        assert!(p
            .explain(3)
            .join("\n")
            .contains("broadcast to all 3 partitions"));
        // And it survives the wire.
        let ctx = crate::new_session_context().task_ctx();
        let back = crate::codec::decode_graph(&crate::codec::encode_graph(&p.graph).unwrap(), &ctx)
            .unwrap();
        assert_eq!(
            back.explain(String::new(), 3),
            p.graph.explain(String::new(), 3)
        );
        // Two raw streams, bounds as comparisons, sides swapped.
        let p = continuous(
            "SELECT c.ad_id FROM clicks c JOIN events e ON c.ad_id = e.ad_id \
             WHERE c.ts >= e.ts AND c.ts - INTERVAL '5' SECOND <= e.ts",
        );
        let explain = p.explain(2).join("\n");
        assert!(explain.contains("IntervalJoinExec"), "{explain}");
        assert_eq!(explain.matches("EventTimeExec").count(), 2, "{explain}");
        // Without an upper bound (or any bound) no row can be dropped: a
        // regular join, its condition a filter.
        for sql in [
            "SELECT c.ad_id FROM clicks c JOIN events e ON c.ad_id = e.ad_id AND c.ts >= e.ts",
            "SELECT c.ad_id FROM clicks c JOIN events e ON c.ad_id = e.ad_id",
        ] {
            let explain = continuous(sql).explain(2).join("\n");
            assert!(explain.contains("JoinExec: inner"), "{explain}");
            assert!(!explain.contains("IntervalJoinExec"), "{explain}");
        }
        // Without keys, every row of one side would meet every row of the other.
        let sql = "SELECT c.ad_id FROM clicks c JOIN events e ON c.ts BETWEEN e.ts AND e.ts + INTERVAL '1' SECOND";
        assert!(
            matches!(plan(sql), Err(PlanError::Unsupported { .. })),
            "{sql}"
        );
    }
}
