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
use crate::plan::{
    AggregatePlan, BatchOp, EmitMode, LookupJoinSpec, StreamInput, StreamingPlan, WindowGroup,
    WindowJoinPlan,
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
            other => {
                return Err(datafusion::error::DataFusionError::NotImplemented(format!(
                    "table function {other}; Drizzle has TUMBLE(stream, ts, size) and HOP(stream, ts, slide, size)"
                )))
            }
        };
        let usage = match kind {
            WindowKind::Tumble => "TUMBLE(stream, time_column, INTERVAL 'n' SECOND)",
            WindowKind::Hop => "HOP(stream, time_column, INTERVAL slide, INTERVAL size)",
        };
        let want = if kind == WindowKind::Tumble { 3 } else { 4 };
        if args.len() != want {
            return Err(df_plan_err(format!(
                "wrong number of arguments: write {usage}"
            )));
        }
        let ident = |e: &Expr| match e {
            Expr::Column(c) => Ok(c.name.clone()),
            other => Err(df_plan_err(format!(
                "expected a name in {usage}, found {other}"
            ))),
        };
        let stream_name = ident(&args[0])?;
        let ts = ident(&args[1])?;
        let stream = match self.resolver.resolve(&stream_name) {
            Some(Relation::Stream(def)) => def,
            Some(Relation::Finite(_)) => {
                return Err(df_plan_err(format!(
                    "{usage}: {stream_name} is a table, windows apply to streams"
                )))
            }
            None => return Err(df_plan_err(format!("table '{stream_name}' not found"))),
        };
        let time_column = stream
            .columns
            .iter()
            .position(|c| c.name == ts)
            .ok_or_else(|| {
                datafusion::error::DataFusionError::SchemaError(
                    Box::new(datafusion::common::SchemaError::FieldNotFound {
                        field: Box::new(datafusion::common::Column::new_unqualified(ts.clone())),
                        valid_fields: vec![],
                    }),
                    Box::new(None),
                )
            })?;
        if !matches!(
            stream.columns[time_column].data_type,
            DataType::Timestamp(_, _)
        ) {
            return Err(df_plan_err(format!(
                "type mismatch: window time column {ts} must be a TIMESTAMP, not {}",
                stream.columns[time_column].sql_type
            )));
        }
        let interval = |e: &Expr| -> datafusion::error::Result<i64> {
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
        };
        let (slide_ms, size_ms) = match kind {
            WindowKind::Tumble => {
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
        let Some(wm) = &stream.watermark else {
            return Err(df_plan_err(format!(
                "windows need event time: stream {} has no watermark; declare WATERMARK FOR {ts} AS {ts} - INTERVAL '1' SECOND",
                stream.name
            )));
        };
        if wm.column != ts {
            return Err(df_plan_err(format!(
                "the window column {ts} must be the watermark column {} of stream {}",
                wm.column, stream.name
            )));
        }
        let spec = WindowSpec {
            kind,
            time_column,
            time_column_name: ts,
            size_ms,
            slide_ms,
            watermark_delay_ms: wm.delay_ms,
        };
        Ok(provider_as_source(Arc::new(WindowProvider::new(
            stream, spec,
        ))))
    }

    fn get_expr_planners(&self) -> &[Arc<dyn ExprPlanner>] {
        self.state.expr_planners()
    }

    fn get_function_meta(&self, name: &str) -> Option<Arc<ScalarUDF>> {
        self.state.scalar_functions().get(name).cloned()
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
    let logical = sql_to_logical(state, resolver, query, params)?;
    if !reads_stream(&logical) {
        return Ok(PlannedQuery::Finite(logical));
    }
    Ok(PlannedQuery::Continuous(Box::new(lower(&logical)?)))
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

struct Lowered {
    stream: StreamDef,
    window: Option<WindowSpec>,
    map_ops: Vec<BatchOp>,
    aggregate: Option<AggregatePlan>,
    join: Option<WindowJoinPlan>,
    post_ops: Vec<BatchOp>,
}

impl Lowered {
    fn push(&mut self, op: BatchOp) {
        if self.aggregate.is_some() || self.join.is_some() {
            self.post_ops.push(op);
        } else {
            self.map_ops.push(op);
        }
    }
}

/// `window_start` / `window_end` of a window table function, by column.
fn window_bound(e: &Expr) -> Option<&str> {
    match e {
        Expr::Column(c) if c.name == "window_start" || c.name == "window_end" => {
            Some(c.name.as_str())
        }
        _ => None,
    }
}

/// A join of two streams: a window join, both sides windowed alike and
/// joined on their window bound.
fn lower_window_join(
    j: &datafusion::logical_expr::logical_plan::Join,
    props: &datafusion::execution::context::ExecutionProps,
) -> Result<Lowered> {
    const HINT: &str = "a join of two streams is a window join: window both sides with the same \
        TUMBLE or HOP and join ON l.key = r.key AND l.window_start = r.window_start";
    if j.join_type != JoinType::Inner {
        return Err(PlanError::unsupported_hint(
            format!("a {} join of two streams", j.join_type),
            "use an inner window join",
        ));
    }
    let left = lower_node(&j.left)?;
    let right = lower_node(&j.right)?;
    for side in [&left, &right] {
        if side.aggregate.is_some() || side.join.is_some() {
            return Err(PlanError::unsupported_hint(
                "a join of an aggregated or joined stream",
                HINT,
            ));
        }
    }
    let (Some(lw), Some(rw)) = (&left.window, &right.window) else {
        return Err(PlanError::unsupported_hint(
            "a join of two unwindowed streams",
            HINT,
        ));
    };
    if (lw.kind, lw.size_ms, lw.slide_ms) != (rw.kind, rw.size_ms, rw.slide_ms) {
        return Err(PlanError::unsupported_hint(
            "a join of streams windowed differently",
            HINT,
        ));
    }
    let mut bound = None;
    let mut left_keys = Vec::new();
    let mut right_keys = Vec::new();
    let mut display = Vec::new();
    for (l, r) in &j.on {
        display.push(format!("{l} = {r}"));
        match (window_bound(l), window_bound(r)) {
            (Some(a), Some(b)) if a == b && bound.is_none() => {
                let index = |e: &Expr, schema: &DFSchema| -> Result<usize> {
                    match e {
                        Expr::Column(c) => Ok(schema.index_of_column(c)?),
                        _ => Err(PlanError::unsupported_hint(
                            "a window bound expression",
                            HINT,
                        )),
                    }
                };
                bound = Some((
                    index(l, j.left.schema())?,
                    index(r, j.right.schema())?,
                    a == "window_end",
                ));
            }
            _ => {
                left_keys.push(physical(l, j.left.schema(), props)?);
                right_keys.push(physical(r, j.right.schema(), props)?);
            }
        }
    }
    let Some((left_window, right_window, window_is_end)) = bound else {
        return Err(PlanError::unsupported_hint(
            "a join of two streams without equal window bounds in ON",
            HINT,
        ));
    };
    let filter = j
        .filter
        .as_ref()
        .map(|f| physical(f, &j.schema, props))
        .transpose()?;
    Ok(Lowered {
        stream: left.stream,
        window: left.window.clone(),
        map_ops: left.map_ops,
        aggregate: None,
        join: Some(WindowJoinPlan {
            right: StreamInput {
                stream: right.stream,
                window: right.window.clone(),
                map_ops: right.map_ops,
            },
            left_keys,
            right_keys,
            left_window,
            right_window,
            window_is_end,
            size_us: lw.size_ms * 1000,
            filter,
            schema: Arc::new(j.schema.as_arrow().clone()),
            display: display.join(", "),
        }),
        post_ops: Vec::new(),
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

/// Lowers an optimised logical plan that reads a stream.
pub fn lower(plan: &LogicalPlan) -> Result<StreamingPlan> {
    let (stripped, limit) = strip_top_limit(plan)?;
    let body = &stripped;
    let lowered = lower_node(body)?;
    let output_schema: SchemaRef = Arc::new(body.schema().as_arrow().clone());
    let emit = match &lowered.aggregate {
        None if lowered.join.is_some() => EmitMode::OnWindowClose,
        None => EmitMode::Append,
        Some(a) if a.window.is_some() => EmitMode::OnWindowClose,
        Some(_) => EmitMode::Upsert,
    };
    let upsert_keys = match &lowered.aggregate {
        Some(agg) if emit == EmitMode::Upsert => key_columns(
            agg.group_exprs.len(),
            &lowered.post_ops,
            output_schema.fields().len(),
        ),
        _ => None,
    };
    let mut next_join = 0u32;
    let mut number_joins = |ops: Vec<BatchOp>| -> Vec<BatchOp> {
        ops.into_iter()
            .map(|op| match op {
                BatchOp::LookupJoin(spec) => {
                    let mut spec = spec.as_ref().clone();
                    spec.id = next_join;
                    next_join += 1;
                    BatchOp::LookupJoin(Arc::new(spec))
                }
                other => other,
            })
            .collect()
    };
    let map_ops = number_joins(lowered.map_ops);
    let mut join = lowered.join;
    if let Some(j) = join.as_mut() {
        j.right.map_ops = number_joins(std::mem::take(&mut j.right.map_ops));
    }
    let post_ops = number_joins(lowered.post_ops);
    Ok(StreamingPlan {
        join,
        upsert_keys,
        stream: lowered.stream,
        window: lowered.window,
        map_ops,
        aggregate: lowered.aggregate,
        post_ops,
        limit,
        output_schema,
        emit,
    })
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

/// Follows plain column references through the post-aggregate projections to
/// find where each of the `k` group columns lands in the output.
fn key_columns(k: usize, post_ops: &[BatchOp], output_width: usize) -> Option<Vec<usize>> {
    use datafusion::physical_expr::expressions::Column;
    // position[i] = where aggregate output column i is now, if still present.
    let mut position: Vec<Option<usize>> = (0..k).map(Some).collect();
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

fn lower_node(plan: &LogicalPlan) -> Result<Lowered> {
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
                    "reading {} here: only one stream feeds a continuous query; tables join to it",
                    scan.table_name
                )));
            };
            let mut lowered = Lowered {
                join: None,
                stream,
                window,
                map_ops: Vec::new(),
                aggregate: None,
                post_ops: Vec::new(),
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
                    lowered.push(BatchOp::Project {
                        exprs,
                        schema: Arc::new(scan.projected_schema.as_arrow().clone()),
                    });
                }
            }
            Ok(lowered)
        }
        LogicalPlan::Projection(p) => {
            let mut lowered = lower_node(&p.input)?;
            let exprs = p
                .expr
                .iter()
                .map(|e| physical(e, p.input.schema(), &props))
                .collect::<Result<Vec<_>>>()?;
            lowered.push(BatchOp::Project {
                exprs,
                schema: Arc::new(p.schema.as_arrow().clone()),
            });
            Ok(lowered)
        }
        LogicalPlan::Filter(f) => {
            let mut lowered = lower_node(&f.input)?;
            let predicate = physical(&f.predicate, f.input.schema(), &props)?;
            lowered.push(BatchOp::Filter { predicate });
            Ok(lowered)
        }
        LogicalPlan::SubqueryAlias(a) => lower_node(&a.input),
        LogicalPlan::Join(j) => {
            let left_stream = reads_stream(&j.left);
            let right_stream = reads_stream(&j.right);
            if left_stream && right_stream {
                return lower_window_join(j, &props);
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
            let mut lowered = lower_node(stream_side)?;
            if lowered.aggregate.is_some() {
                return Err(PlanError::unsupported("joining the result of an aggregation"));
            }
            if lowered.join.is_some() {
                return Err(PlanError::unsupported(
                    "a lookup join on the result of a stream-stream join",
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
            lowered.push(BatchOp::LookupJoin(Arc::new(LookupJoinSpec {
                id: 0,
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
            Ok(lowered)
        }
        LogicalPlan::Aggregate(a) => {
            let mut lowered = lower_node(&a.input)?;
            if lowered.aggregate.is_some() {
                return Err(PlanError::unsupported("an aggregation over an aggregation"));
            }
            if lowered.join.is_some() {
                return Err(PlanError::unsupported_hint(
                    "an aggregation over a stream-stream join",
                    "aggregate each stream first, or join a stream with a materialized view",
                ));
            }
            let input_schema = a.input.schema();
            let physical_input = input_schema.as_arrow();
            let mut group_exprs = Vec::new();
            for (i, e) in a.group_expr.iter().enumerate() {
                if matches!(e, Expr::GroupingSet(_)) {
                    return Err(PlanError::unsupported("GROUPING SETS, CUBE and ROLLUP"));
                }
                let name = a.schema.field(i).name().clone();
                group_exprs.push((physical(e, input_schema, &props)?, name));
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
            let window = lowered.window.as_ref().and_then(|w| {
                group_exprs.iter().enumerate().find_map(|(i, (_, name))| {
                    let is_end = name == "window_end";
                    (is_end || name == "window_start").then_some(WindowGroup {
                        group_index: i,
                        is_end,
                        size_us: w.size_ms * 1000,
                    })
                })
            });
            lowered.aggregate = Some(AggregatePlan {
                group_exprs,
                aggregates,
                filters,
                group_schema: Arc::new(Schema::new(group_fields)),
                partial_schema: Arc::new(Schema::new(partial_fields)),
                output_schema: Arc::new(a.schema.as_arrow().clone()),
                window,
            });
            Ok(lowered)
        }
        LogicalPlan::Sort(_) => Err(PlanError::unsupported_hint(
            "ORDER BY on a continuous query",
            "an unbounded stream has no final order; create a MATERIALIZED VIEW and ORDER BY when you SELECT from it",
        )),
        LogicalPlan::Limit(_) => Err(PlanError::unsupported("LIMIT inside a continuous query (only at the top)")),
        LogicalPlan::Window(_) => Err(PlanError::unsupported_hint(
            "window functions (OVER) on a stream",
            "use TUMBLE or HOP with GROUP BY window_start",
        )),
        LogicalPlan::Union(_) => Err(PlanError::unsupported("UNION of streams")),
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
            assert_eq!(back.window, p.window);
            match (&back.aggregate, &p.aggregate) {
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
        let j = p.join.as_ref().expect("a window join");
        assert_eq!(j.right.stream.name, "clicks");
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
        assert_eq!(back.join.as_ref().unwrap().schema, j.schema);
        for bad in [
            "SELECT * FROM events e JOIN clicks c ON e.ad_id = c.ad_id",
            "SELECT * FROM TUMBLE(events, ts, INTERVAL '10' SECOND) e \
             JOIN TUMBLE(clicks, ts, INTERVAL '5' SECOND) c ON e.ad_id = c.ad_id AND e.window_start = c.window_start",
            "SELECT * FROM TUMBLE(events, ts, INTERVAL '10' SECOND) e \
             JOIN TUMBLE(clicks, ts, INTERVAL '10' SECOND) c ON e.ad_id = c.ad_id",
            "SELECT count(*) FROM TUMBLE(events, ts, INTERVAL '10' SECOND) e \
             JOIN TUMBLE(clicks, ts, INTERVAL '10' SECOND) c ON e.ad_id = c.ad_id AND e.window_start = c.window_start",
            "SELECT * FROM TUMBLE(events, ts, INTERVAL '10' SECOND) e \
             LEFT JOIN TUMBLE(clicks, ts, INTERVAL '10' SECOND) c ON e.ad_id = c.ad_id AND e.window_start = c.window_start",
        ] {
            assert!(matches!(plan(bad), Err(PlanError::Unsupported { .. })), "{bad}");
        }
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
        let agg = p.aggregate.as_ref().unwrap();
        assert_eq!(agg.window.unwrap().group_index, 1);
        assert_eq!(agg.window.unwrap().size_us, 10_000_000);
    }

    #[test]
    fn plain_group_by_is_an_upsert_keyed_by_its_group_columns() {
        let p = continuous(
            "SELECT kind, count(DISTINCT ad_id) AS n FROM events GROUP BY kind HAVING count(*) > 1",
        );
        assert_eq!(p.emit, EmitMode::Upsert);
        assert_eq!(p.upsert_keys, Some(vec![0]));
        // count(DISTINCT) stays a single aggregate (no two-level rewrite).
        assert_eq!(p.aggregate.as_ref().unwrap().aggregates.len(), 2);
        let p = continuous("SELECT count(*) FROM events GROUP BY kind");
        assert_eq!(p.upsert_keys, None, "the key is not selected");
    }

    #[test]
    fn unbounded_impossibilities_are_refused() {
        for sql in [
            "SELECT ad_id FROM events ORDER BY ad_id",
            "SELECT a.ad_id FROM events a JOIN events b ON a.ad_id = b.ad_id",
            "SELECT ad_id, row_number() OVER (ORDER BY ts) FROM events",
            "SELECT ad_id FROM events LIMIT 3 OFFSET 2",
        ] {
            assert!(
                matches!(plan(sql), Err(PlanError::Unsupported { .. })),
                "{sql}"
            );
        }
        assert!(matches!(
            plan("SELECT * FROM ads"),
            Ok(PlannedQuery::Finite(_))
        ));
    }
}
