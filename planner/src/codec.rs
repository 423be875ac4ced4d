//! Wire form of a [`StageGraph`] ([`encode_graph`], [`decode_graph`]): the
//! plan fragment of every stage, which the coordinator ships to a worker
//! once per query, inside its first launch message. ([`encode_plan`] adds
//! a [`StreamingPlan`]'s emit mode, limit and keys.)
//!
//! Expressions and aggregate functions are DataFusion's own protobuf forms
//! (`datafusion-proto`); everything Drizzle-specific (windows, emit mode,
//! schemas, the stream definition) is JSON around them. An aggregation is
//! carried as a partial `AggregateExec` over an `EmptyExec` of its input
//! schema, which is how `datafusion-proto` serialises aggregate functions.
//!
//! The finite side of a lookup join is not shipped: a worker asks the
//! coordinator for its rows by [`LookupJoinSpec::id`], so the decoded plan
//! holds an empty relation of the right schema in its place.

use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use datafusion::common::DFSchema;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{EmptyRelation, JoinType, LogicalPlan};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode, PhysicalGroupBy};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::windows::WindowAggExec;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::physical_plan::from_proto::parse_physical_expr;
use datafusion_proto::physical_plan::to_proto::serialize_physical_expr;
use datafusion_proto::physical_plan::{AsExecutionPlan, DefaultPhysicalExtensionCodec};
use datafusion_proto::protobuf::{PhysicalExprNode, PhysicalPlanNode};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::catalog::StreamDef;
use crate::error::{PlanError, Result};
use crate::graph::{Operator, Partitioning, Stage, StageGraph, StageId, StageInput, StageOutput};
use crate::plan::{
    AggregatePlan, BatchOp, EmitMode, EventTimeSpec, IntervalJoinPlan, LookupJoinSpec,
    OverAggregatePlan, OverRetain, Ranking, StreamingPlan, TopNPlan, WindowGroup, WindowJoinPlan,
};
use crate::providers::{WindowProvider, WindowSpec};

#[derive(Serialize, Deserialize)]
struct PlanWire {
    /// [`encode_graph`]'s bytes.
    graph: Vec<u8>,
    limit: Option<usize>,
    output_schema: Schema,
    emit: EmitMode,
    upsert_keys: Option<Vec<usize>>,
    #[serde(default)]
    event_time: Option<usize>,
    #[serde(default)]
    op_column: bool,
    #[serde(default)]
    rank_column: bool,
}

#[derive(Serialize, Deserialize)]
enum OpWire {
    Filter {
        input: Schema,
        predicate: Vec<u8>,
    },
    TopK {
        input: Schema,
        order_by: Vec<Vec<u8>>,
        /// (descending, nulls first) of each `order_by`.
        options: Vec<(bool, bool)>,
        limit: usize,
    },
    Project {
        input: Schema,
        exprs: Vec<Vec<u8>>,
        schema: Schema,
    },
    LookupJoin {
        id: u32,
        input: Schema,
        table_schema: Schema,
        stream_keys: Vec<Vec<u8>>,
        table_keys: Vec<Vec<u8>>,
        left_outer: bool,
        stream_on_left: bool,
        filter: Option<Vec<u8>>,
        schema: Schema,
        display: String,
        #[serde(default)]
        relations: Vec<String>,
    },
}

#[derive(Serialize, Deserialize)]
struct JoinWire {
    /// `inner`, `left_semi` or `left_anti`.
    #[serde(default)]
    join_type: String,
    left_input: Schema,
    right_input: Schema,
    left_keys: Vec<Vec<u8>>,
    right_keys: Vec<Vec<u8>>,
    left_window: usize,
    right_window: usize,
    window_is_end: bool,
    size_us: i64,
    filter: Option<Vec<u8>>,
    schema: Schema,
    display: String,
}

#[derive(Serialize, Deserialize)]
struct IntervalJoinWire {
    left_input: Schema,
    right_input: Schema,
    left_keys: Vec<Vec<u8>>,
    right_keys: Vec<Vec<u8>>,
    left_time: usize,
    right_time: usize,
    lower_us: i64,
    upper_us: i64,
    left_lag_us: i64,
    right_lag_us: i64,
    filter: Option<Vec<u8>>,
    schema: Schema,
    display: String,
    #[serde(default)]
    regular: bool,
    /// `Inner`, `Left`, `Right` or `Full`.
    #[serde(default)]
    outer: Option<(bool, bool)>,
    #[serde(default)]
    weighted: bool,
}

#[derive(Serialize, Deserialize)]
struct AggregateWire {
    input: Schema,
    /// A partial `AggregateExec` over an `EmptyExec`, as `datafusion-proto` bytes.
    exec: Vec<u8>,
    group_schema: Schema,
    partial_schema: Schema,
    output_schema: Schema,
    window: Option<WindowGroup>,
    #[serde(default)]
    changes: bool,
    #[serde(default)]
    over_changes: bool,
}

fn codec_err(e: impl std::fmt::Display) -> PlanError {
    PlanError::Internal {
        message: format!("plan fragment encoding: {e}"),
    }
}

fn encode_expr(e: &Arc<dyn PhysicalExpr>) -> Result<Vec<u8>> {
    Ok(serialize_physical_expr(e, &DefaultPhysicalExtensionCodec {})?.encode_to_vec())
}

fn decode_expr(bytes: &[u8], ctx: &TaskContext, schema: &Schema) -> Result<Arc<dyn PhysicalExpr>> {
    let node = PhysicalExprNode::decode(bytes).map_err(codec_err)?;
    let e = parse_physical_expr(&node, ctx, schema, &DefaultPhysicalExtensionCodec {})?;
    // `fail_on_overflow` is not on the wire.
    Ok(crate::functions::overflow::check_overflow(e)?)
}

/// The schema a stream input's map ops start from.
pub fn input_schema(stream: &StreamDef, window: Option<&WindowSpec>) -> SchemaRef {
    match window {
        Some(spec) => datafusion::datasource::TableProvider::schema(&WindowProvider::new(
            stream.clone(),
            spec.clone(),
        )),
        None => stream.schema(),
    }
}

fn encode_ops(ops: &[BatchOp], mut input: SchemaRef) -> Result<(Vec<OpWire>, SchemaRef)> {
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        let (wire, next) = match op {
            BatchOp::Filter { predicate } => (
                OpWire::Filter {
                    input: input.as_ref().clone(),
                    predicate: encode_expr(predicate)?,
                },
                Arc::clone(&input),
            ),
            BatchOp::TopK { order_by, limit } => (
                OpWire::TopK {
                    input: input.as_ref().clone(),
                    order_by: order_by
                        .iter()
                        .map(|(e, _)| encode_expr(e))
                        .collect::<Result<_>>()?,
                    options: order_by
                        .iter()
                        .map(|(_, o)| (o.descending, o.nulls_first))
                        .collect(),
                    limit: *limit,
                },
                Arc::clone(&input),
            ),
            BatchOp::Project { exprs, schema } => (
                OpWire::Project {
                    input: input.as_ref().clone(),
                    exprs: exprs.iter().map(encode_expr).collect::<Result<_>>()?,
                    schema: schema.as_ref().clone(),
                },
                Arc::clone(schema),
            ),
            BatchOp::LookupJoin(spec) => (
                OpWire::LookupJoin {
                    id: spec.id,
                    input: input.as_ref().clone(),
                    table_schema: spec.table_schema.as_ref().clone(),
                    stream_keys: spec
                        .stream_keys
                        .iter()
                        .map(encode_expr)
                        .collect::<Result<_>>()?,
                    table_keys: spec
                        .table_keys
                        .iter()
                        .map(encode_expr)
                        .collect::<Result<_>>()?,
                    left_outer: spec.join_type != JoinType::Inner,
                    stream_on_left: spec.stream_on_left,
                    filter: spec.filter.as_ref().map(encode_expr).transpose()?,
                    schema: spec.schema.as_ref().clone(),
                    display: spec.display.clone(),
                    relations: spec.relations.clone(),
                },
                Arc::clone(&spec.schema),
            ),
        };
        out.push(wire);
        input = next;
    }
    Ok((out, input))
}

fn decode_ops(ops: Vec<OpWire>, ctx: &TaskContext) -> Result<Vec<BatchOp>> {
    ops.into_iter()
        .map(|op| {
            Ok(match op {
                OpWire::Filter { input, predicate } => BatchOp::Filter {
                    predicate: decode_expr(&predicate, ctx, &input)?,
                },
                OpWire::TopK {
                    input,
                    order_by,
                    options,
                    limit,
                } => BatchOp::TopK {
                    order_by: order_by
                        .iter()
                        .zip(options)
                        .map(|(e, (descending, nulls_first))| {
                            Ok((
                                decode_expr(e, ctx, &input)?,
                                arrow::compute::SortOptions {
                                    descending,
                                    nulls_first,
                                },
                            ))
                        })
                        .collect::<Result<_>>()?,
                    limit,
                },
                OpWire::Project {
                    input,
                    exprs,
                    schema,
                } => BatchOp::Project {
                    exprs: exprs
                        .iter()
                        .map(|e| decode_expr(e, ctx, &input))
                        .collect::<Result<_>>()?,
                    schema: Arc::new(schema),
                },
                OpWire::LookupJoin {
                    id,
                    input,
                    table_schema,
                    stream_keys,
                    table_keys,
                    left_outer,
                    stream_on_left,
                    filter,
                    schema,
                    display,
                    relations,
                } => {
                    let df_schema = DFSchema::try_from(table_schema.clone())?;
                    BatchOp::LookupJoin(Arc::new(LookupJoinSpec {
                        id,
                        relations,
                        table_plan: LogicalPlan::EmptyRelation(EmptyRelation {
                            produce_one_row: false,
                            schema: Arc::new(df_schema),
                        }),
                        stream_keys: stream_keys
                            .iter()
                            .map(|e| decode_expr(e, ctx, &input))
                            .collect::<Result<_>>()?,
                        table_keys: table_keys
                            .iter()
                            .map(|e| decode_expr(e, ctx, &table_schema))
                            .collect::<Result<_>>()?,
                        table_schema: Arc::new(table_schema),
                        join_type: if left_outer {
                            JoinType::Left
                        } else {
                            JoinType::Inner
                        },
                        stream_on_left,
                        filter: filter.map(|f| decode_expr(&f, ctx, &schema)).transpose()?,
                        schema: Arc::new(schema),
                        display,
                    }))
                }
            })
        })
        .collect()
}

fn encode_aggregate(agg: &AggregatePlan, input: SchemaRef) -> Result<AggregateWire> {
    let exec = AggregateExec::try_new(
        AggregateMode::Partial,
        PhysicalGroupBy::new_single(agg.group_exprs.clone()),
        agg.aggregates.clone(),
        agg.filters.clone(),
        Arc::new(EmptyExec::new(Arc::clone(&input))),
        Arc::clone(&input),
    )?;
    let node = PhysicalPlanNode::try_from_physical_plan(
        Arc::new(exec) as Arc<dyn ExecutionPlan>,
        &DefaultPhysicalExtensionCodec {},
    )?;
    Ok(AggregateWire {
        input: input.as_ref().clone(),
        exec: node.encode_to_vec(),
        group_schema: agg.group_schema.as_ref().clone(),
        partial_schema: agg.partial_schema.as_ref().clone(),
        output_schema: agg.output_schema.as_ref().clone(),
        window: agg.window.clone(),
        changes: agg.changes,
        over_changes: agg.over_changes,
    })
}

fn decode_aggregate(wire: AggregateWire, ctx: &TaskContext) -> Result<AggregatePlan> {
    let node = PhysicalPlanNode::decode(wire.exec.as_slice()).map_err(codec_err)?;
    let plan = node.try_into_physical_plan(ctx, &DefaultPhysicalExtensionCodec {})?;
    let exec = plan
        .downcast_ref::<AggregateExec>()
        .ok_or_else(|| codec_err("the aggregate fragment is not an AggregateExec"))?;
    let mut group_exprs = exec.group_expr().expr().to_vec();
    let mut aggregates = exec.aggr_expr().to_vec();
    let mut filters = exec.filter_expr().to_vec();
    // `fail_on_overflow` is not on the wire.
    if let Some(checked) =
        crate::functions::overflow::check_aggregate(&group_exprs, &aggregates, &filters)?
    {
        group_exprs = checked.group_exprs;
        aggregates = checked.aggregates;
        filters = checked.filters;
    }
    Ok(AggregatePlan {
        group_exprs,
        aggregates,
        filters,
        group_schema: Arc::new(wire.group_schema),
        partial_schema: Arc::new(wire.partial_schema),
        output_schema: Arc::new(wire.output_schema),
        window: wire.window,
        changes: wire.changes,
        over_changes: wire.over_changes,
    })
}

fn encode_join(j: &WindowJoinPlan, left_input: SchemaRef) -> Result<JoinWire> {
    Ok(JoinWire {
        join_type: match j.join_type {
            JoinType::LeftSemi => "left_semi",
            JoinType::LeftAnti => "left_anti",
            JoinType::Left => "left",
            JoinType::Right => "right",
            JoinType::Full => "full",
            _ => "inner",
        }
        .into(),
        left_input: left_input.as_ref().clone(),
        right_input: j.right_input.as_ref().clone(),
        left_keys: j.left_keys.iter().map(encode_expr).collect::<Result<_>>()?,
        right_keys: j
            .right_keys
            .iter()
            .map(encode_expr)
            .collect::<Result<_>>()?,
        left_window: j.left_window,
        right_window: j.right_window,
        window_is_end: j.window_is_end,
        size_us: j.size_us,
        filter: j.filter.as_ref().map(encode_expr).transpose()?,
        schema: j.schema.as_ref().clone(),
        display: j.display.clone(),
    })
}

/// Key expressions decoded over `schema`.
fn decode_keys(
    keys: &[Vec<u8>],
    ctx: &TaskContext,
    schema: &Schema,
) -> Result<Vec<Arc<dyn PhysicalExpr>>> {
    keys.iter().map(|e| decode_expr(e, ctx, schema)).collect()
}

/// Left columns then right columns: what a join's filter is over.
fn both_sides(left: &Schema, right: &Schema) -> Schema {
    Schema::new(
        left.fields()
            .iter()
            .chain(right.fields())
            .cloned()
            .collect::<Vec<_>>(),
    )
}

fn decode_join(w: JoinWire, ctx: &TaskContext) -> Result<WindowJoinPlan> {
    let keys = |k: &[Vec<u8>], schema: &Schema| decode_keys(k, ctx, schema);
    let both = both_sides(&w.left_input, &w.right_input);
    Ok(WindowJoinPlan {
        join_type: match w.join_type.as_str() {
            "left_semi" => JoinType::LeftSemi,
            "left_anti" => JoinType::LeftAnti,
            "left" => JoinType::Left,
            "right" => JoinType::Right,
            "full" => JoinType::Full,
            "inner" => JoinType::Inner,
            other => return Err(codec_err(format!("unknown window join type {other:?}"))),
        },
        left_keys: keys(&w.left_keys, &w.left_input)?,
        right_keys: keys(&w.right_keys, &w.right_input)?,
        left_window: w.left_window,
        right_window: w.right_window,
        window_is_end: w.window_is_end,
        size_us: w.size_us,
        filter: w.filter.map(|f| decode_expr(&f, ctx, &both)).transpose()?,
        right_input: Arc::new(w.right_input),
        schema: Arc::new(w.schema),
        display: w.display,
    })
}

fn encode_interval_join(j: &IntervalJoinPlan, left_input: SchemaRef) -> Result<IntervalJoinWire> {
    let exprs = |k: &[Arc<dyn PhysicalExpr>]| k.iter().map(encode_expr).collect::<Result<_>>();
    Ok(IntervalJoinWire {
        left_input: left_input.as_ref().clone(),
        right_input: j.right_input.as_ref().clone(),
        left_keys: exprs(&j.left_keys)?,
        right_keys: exprs(&j.right_keys)?,
        left_time: j.left_time,
        right_time: j.right_time,
        lower_us: j.lower_us,
        upper_us: j.upper_us,
        left_lag_us: j.left_lag_us,
        right_lag_us: j.right_lag_us,
        filter: j.filter.as_ref().map(encode_expr).transpose()?,
        schema: j.schema.as_ref().clone(),
        display: j.display.clone(),
        regular: j.regular,
        outer: match j.join_type {
            JoinType::Left => Some((true, false)),
            JoinType::Right => Some((false, true)),
            JoinType::Full => Some((true, true)),
            _ => None,
        },
        weighted: j.weighted,
    })
}

fn decode_interval_join(w: IntervalJoinWire, ctx: &TaskContext) -> Result<IntervalJoinPlan> {
    let keys = |k: &[Vec<u8>], schema: &Schema| decode_keys(k, ctx, schema);
    let both = both_sides(&w.left_input, &w.right_input);
    let width = |s: &Schema, i: usize| {
        if i < s.fields().len() {
            Ok(i)
        } else {
            Err(codec_err("an interval join's time column is out of range"))
        }
    };
    Ok(IntervalJoinPlan {
        left_keys: keys(&w.left_keys, &w.left_input)?,
        right_keys: keys(&w.right_keys, &w.right_input)?,
        left_time: width(&w.left_input, w.left_time)?,
        right_time: width(&w.right_input, w.right_time)?,
        lower_us: w.lower_us,
        upper_us: w.upper_us,
        left_lag_us: w.left_lag_us,
        right_lag_us: w.right_lag_us,
        filter: w.filter.map(|f| decode_expr(&f, ctx, &both)).transpose()?,
        right_input: Arc::new(w.right_input),
        schema: Arc::new(w.schema),
        display: w.display,
        regular: w.regular,
        join_type: match w.outer {
            Some((true, false)) => JoinType::Left,
            Some((false, true)) => JoinType::Right,
            Some((true, true)) => JoinType::Full,
            _ => JoinType::Inner,
        },
        weighted: w.weighted && w.regular,
    })
}

/// Encodes a whole plan: its graph ([`encode_graph`]) and how results
/// leave it.
pub fn encode_plan(plan: &StreamingPlan) -> Result<Vec<u8>> {
    let wire = PlanWire {
        graph: encode_graph(&plan.graph)?,
        limit: plan.limit,
        output_schema: plan.output_schema.as_ref().clone(),
        emit: plan.emit,
        upsert_keys: plan.upsert_keys.clone(),
        event_time: plan.event_time,
        op_column: plan.op_column,
        rank_column: plan.rank_column,
    };
    serde_json::to_vec(&wire).map_err(codec_err)
}

/// Decodes a plan written by [`encode_plan`]; functions resolve against `ctx`.
pub fn decode_plan(bytes: &[u8], ctx: &TaskContext) -> Result<StreamingPlan> {
    let wire: PlanWire = serde_json::from_slice(bytes).map_err(codec_err)?;
    Ok(StreamingPlan {
        graph: decode_graph(&wire.graph, ctx)?,
        limit: wire.limit,
        output_schema: Arc::new(wire.output_schema),
        emit: wire.emit,
        upsert_keys: wire.upsert_keys,
        event_time: wire.event_time,
        op_column: wire.op_column,
        rank_column: wire.rank_column,
    })
}

// ---- The stage graph on the wire ----

#[derive(Serialize, Deserialize)]
struct GraphWire {
    stages: Vec<StageWire>,
    output_schema: Schema,
    #[serde(default)]
    state_ttl_batches: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct StageWire {
    input: InputWire,
    operators: Vec<OperatorWire>,
    output: OutputWire,
}

#[derive(Serialize, Deserialize)]
enum InputWire {
    Source(StreamDef),
    Shuffle(Vec<u32>),
}

#[derive(Serialize, Deserialize)]
enum OperatorWire {
    WindowAssign(WindowSpec),
    Kernel(OpWire),
    AggregatePartial(AggregateWire),
    AggregateFinal(AggregateWire),
    WindowJoin(Box<JoinWire>),
    Union,
    EventTime(EventTimeSpec),
    IntervalJoin(Box<IntervalJoinWire>),
    TopN(Box<TopNWire>),
    OverAggregate(Box<OverWire>),
}

#[derive(Serialize, Deserialize)]
struct OverWire {
    input: Schema,
    /// A `WindowAggExec` over an `EmptyExec`, as `datafusion-proto` bytes
    /// (how it serialises window expressions).
    exec: Vec<u8>,
    partition_by: Vec<Vec<u8>>,
    time_column: usize,
    time_lag_us: i64,
    retain: OverRetain,
    schema: Schema,
    display: String,
    #[serde(default)]
    changes: bool,
}

fn encode_over(o: &OverAggregatePlan) -> Result<OverWire> {
    let exec = WindowAggExec::try_new(
        o.window_exprs.clone(),
        Arc::new(EmptyExec::new(Arc::clone(&o.input))),
        false,
    )?;
    let node = PhysicalPlanNode::try_from_physical_plan(
        Arc::new(exec) as Arc<dyn ExecutionPlan>,
        &DefaultPhysicalExtensionCodec {},
    )?;
    Ok(OverWire {
        input: o.input.as_ref().clone(),
        exec: node.encode_to_vec(),
        partition_by: o
            .partition_by
            .iter()
            .map(encode_expr)
            .collect::<Result<_>>()?,
        time_column: o.time_column,
        time_lag_us: o.time_lag_us,
        retain: o.retain,
        schema: o.schema.as_ref().clone(),
        display: o.display.clone(),
        changes: o.changes,
    })
}

fn decode_over(w: OverWire, ctx: &TaskContext) -> Result<OverAggregatePlan> {
    let node = PhysicalPlanNode::decode(w.exec.as_slice()).map_err(codec_err)?;
    let plan = node.try_into_physical_plan(ctx, &DefaultPhysicalExtensionCodec {})?;
    let exec = plan
        .downcast_ref::<WindowAggExec>()
        .ok_or_else(|| codec_err("the OVER fragment is not a WindowAggExec"))?;
    Ok(OverAggregatePlan {
        window_exprs: exec.window_expr().to_vec(),
        partition_by: decode_keys(&w.partition_by, ctx, &w.input)?,
        time_column: w.time_column,
        time_lag_us: w.time_lag_us,
        retain: w.retain,
        input: Arc::new(w.input),
        schema: Arc::new(w.schema),
        display: w.display,
        changes: w.changes,
    })
}

#[derive(Serialize, Deserialize)]
struct TopNWire {
    input: Schema,
    partition_by: Vec<Vec<u8>>,
    order_by: Vec<Vec<u8>>,
    /// (descending, nulls first) of each `order_by`.
    directions: Vec<(bool, bool)>,
    limit: u64,
    schema: Schema,
    display: String,
    #[serde(default)]
    changes: bool,
    #[serde(default)]
    ranking: Ranking,
}

fn encode_top_n(t: &TopNPlan) -> Result<TopNWire> {
    Ok(TopNWire {
        input: t.input.as_ref().clone(),
        partition_by: t
            .partition_by
            .iter()
            .map(encode_expr)
            .collect::<Result<_>>()?,
        order_by: t
            .order_by
            .iter()
            .map(|(e, _)| encode_expr(e))
            .collect::<Result<_>>()?,
        directions: t
            .order_by
            .iter()
            .map(|(_, o)| (o.descending, o.nulls_first))
            .collect(),
        limit: t.limit,
        schema: t.schema.as_ref().clone(),
        display: t.display.clone(),
        changes: t.changes,
        ranking: t.ranking,
    })
}

fn decode_top_n(w: TopNWire, ctx: &TaskContext) -> Result<TopNPlan> {
    if w.order_by.len() != w.directions.len() {
        return Err(codec_err(
            "a top-N's sort keys and directions differ in number",
        ));
    }
    let order = decode_keys(&w.order_by, ctx, &w.input)?;
    Ok(TopNPlan {
        partition_by: decode_keys(&w.partition_by, ctx, &w.input)?,
        order_by: order
            .into_iter()
            .zip(w.directions)
            .map(|(e, (descending, nulls_first))| {
                (
                    e,
                    arrow::compute::SortOptions {
                        descending,
                        nulls_first,
                    },
                )
            })
            .collect(),
        limit: w.limit,
        input: Arc::new(w.input),
        schema: Arc::new(w.schema),
        display: w.display,
        changes: w.changes,
        ranking: w.ranking,
    })
}

#[derive(Serialize, Deserialize)]
enum OutputWire {
    Shuffle {
        to: u32,
        /// The schema the keys are over (the stage's output).
        input: Schema,
        keys: Vec<Vec<u8>>,
        /// Every row to every partition (`keys` is empty).
        #[serde(default)]
        broadcast: bool,
    },
    Sink(EmitMode),
}

/// Encodes a stage graph for a worker: the plan fragment of every stage.
pub fn encode_graph(graph: &StageGraph) -> Result<Vec<u8>> {
    // Per stage: its output schema, and the input of its partial
    // aggregation (which the final half's fragment is encoded over).
    let mut outputs: Vec<SchemaRef> = Vec::with_capacity(graph.stages.len());
    let mut pre_partial: Vec<Option<SchemaRef>> = Vec::with_capacity(graph.stages.len());
    let mut stages = Vec::with_capacity(graph.stages.len());
    for stage in &graph.stages {
        let (input, mut schema) = match &stage.input {
            StageInput::Source(stream) => (InputWire::Source(stream.clone()), stream.schema()),
            StageInput::Shuffle(inputs) => {
                let first = inputs
                    .first()
                    .and_then(|s| outputs.get(s.0 as usize))
                    .cloned()
                    .ok_or_else(|| codec_err("a shuffle stage before its inputs"))?;
                (
                    InputWire::Shuffle(inputs.iter().map(|s| s.0).collect()),
                    first,
                )
            }
        };
        let mut partial_input = None;
        let mut operators = Vec::with_capacity(stage.operators.len());
        for op in &stage.operators {
            let wire = match op {
                Operator::WindowAssign(spec) => {
                    if let StageInput::Source(stream) = &stage.input {
                        schema = input_schema(stream, Some(spec));
                    }
                    OperatorWire::WindowAssign(spec.clone())
                }
                Operator::Kernel(k) => {
                    let (mut wires, next) = encode_ops(std::slice::from_ref(k), schema)?;
                    schema = next;
                    OperatorWire::Kernel(
                        wires
                            .pop()
                            .ok_or_else(|| codec_err("a kernel encoded to nothing"))?,
                    )
                }
                Operator::AggregatePartial(agg) => {
                    partial_input = Some(Arc::clone(&schema));
                    let wire = encode_aggregate(agg, Arc::clone(&schema))?;
                    schema = Arc::clone(&agg.partial_schema);
                    OperatorWire::AggregatePartial(wire)
                }
                Operator::AggregateFinal(agg) => {
                    let over = match &stage.input {
                        StageInput::Shuffle(inputs) => inputs
                            .first()
                            .and_then(|s| pre_partial.get(s.0 as usize).cloned().flatten()),
                        StageInput::Source(_) => None,
                    }
                    .ok_or_else(|| codec_err("a final aggregate without its partial half"))?;
                    schema = Arc::clone(&agg.output_schema);
                    OperatorWire::AggregateFinal(encode_aggregate(agg, over)?)
                }
                Operator::Union => OperatorWire::Union,
                Operator::EventTime(e) => OperatorWire::EventTime(e.clone()),
                Operator::IntervalJoin(j) => {
                    let wire = encode_interval_join(j, Arc::clone(&schema))?;
                    schema = Arc::clone(&j.schema);
                    OperatorWire::IntervalJoin(Box::new(wire))
                }
                Operator::WindowJoin(j) => {
                    let wire = encode_join(j, Arc::clone(&schema))?;
                    schema = Arc::clone(&j.schema);
                    OperatorWire::WindowJoin(Box::new(wire))
                }
                Operator::TopN(t) => {
                    schema = Arc::clone(&t.schema);
                    OperatorWire::TopN(Box::new(encode_top_n(t)?))
                }
                Operator::OverAggregate(o) => {
                    schema = Arc::clone(&o.schema);
                    OperatorWire::OverAggregate(Box::new(encode_over(o)?))
                }
            };
            operators.push(wire);
        }
        let output = match &stage.output {
            StageOutput::Shuffle {
                to,
                partitioning: Partitioning::Hash(keys),
            } => OutputWire::Shuffle {
                to: to.0,
                input: schema.as_ref().clone(),
                keys: keys.iter().map(encode_expr).collect::<Result<_>>()?,
                broadcast: false,
            },
            StageOutput::Shuffle {
                to,
                partitioning: Partitioning::Broadcast,
            } => OutputWire::Shuffle {
                to: to.0,
                input: schema.as_ref().clone(),
                keys: Vec::new(),
                broadcast: true,
            },
            StageOutput::Sink(emit) => OutputWire::Sink(*emit),
        };
        outputs.push(schema);
        pre_partial.push(partial_input);
        stages.push(StageWire {
            input,
            operators,
            output,
        });
    }
    serde_json::to_vec(&GraphWire {
        stages,
        output_schema: graph.output_schema.as_ref().clone(),
        state_ttl_batches: graph.state_ttl_batches,
    })
    .map_err(codec_err)
}

/// Decodes a graph shipped by [`encode_graph`]; functions resolve against
/// `ctx`.
pub fn decode_graph(bytes: &[u8], ctx: &TaskContext) -> Result<StageGraph> {
    let wire: GraphWire = serde_json::from_slice(bytes).map_err(codec_err)?;
    let mut stages = Vec::with_capacity(wire.stages.len());
    for (i, s) in wire.stages.into_iter().enumerate() {
        let input = match s.input {
            InputWire::Source(stream) => StageInput::Source(stream),
            InputWire::Shuffle(inputs) => {
                if inputs.iter().any(|&u| u as usize >= i) {
                    return Err(codec_err("a stage reads a stage after it"));
                }
                StageInput::Shuffle(inputs.into_iter().map(StageId).collect())
            }
        };
        let mut operators = Vec::with_capacity(s.operators.len());
        for op in s.operators {
            operators.push(match op {
                OperatorWire::WindowAssign(spec) => Operator::WindowAssign(spec),
                OperatorWire::Kernel(k) => Operator::Kernel(
                    decode_ops(vec![k], ctx)?
                        .pop()
                        .ok_or_else(|| codec_err("a kernel decoded to nothing"))?,
                ),
                OperatorWire::AggregatePartial(a) => {
                    Operator::AggregatePartial(Arc::new(decode_aggregate(a, ctx)?))
                }
                OperatorWire::AggregateFinal(a) => {
                    Operator::AggregateFinal(Arc::new(decode_aggregate(a, ctx)?))
                }
                OperatorWire::WindowJoin(j) => {
                    Operator::WindowJoin(Arc::new(decode_join(*j, ctx)?))
                }
                OperatorWire::Union => Operator::Union,
                OperatorWire::EventTime(e) => Operator::EventTime(e),
                OperatorWire::IntervalJoin(j) => {
                    Operator::IntervalJoin(Arc::new(decode_interval_join(*j, ctx)?))
                }
                OperatorWire::TopN(t) => Operator::TopN(Arc::new(decode_top_n(*t, ctx)?)),
                OperatorWire::OverAggregate(o) => {
                    Operator::OverAggregate(Arc::new(decode_over(*o, ctx)?))
                }
            });
        }
        let output = match s.output {
            OutputWire::Shuffle {
                to,
                input,
                keys,
                broadcast,
            } => {
                if to as usize <= i {
                    return Err(codec_err("a stage writes a stage before it"));
                }
                StageOutput::Shuffle {
                    to: StageId(to),
                    partitioning: if broadcast {
                        Partitioning::Broadcast
                    } else {
                        Partitioning::Hash(
                            keys.iter()
                                .map(|k| decode_expr(k, ctx, &input))
                                .collect::<Result<_>>()?,
                        )
                    },
                }
            }
            OutputWire::Sink(emit) => StageOutput::Sink(emit),
        };
        stages.push(Stage {
            id: StageId(i as u32),
            input,
            operators,
            output,
        });
    }
    if stages.is_empty() {
        return Err(codec_err("a stage graph without stages"));
    }
    Ok(StageGraph {
        stages,
        output_schema: Arc::new(wire.output_schema),
        state_ttl_batches: wire.state_ttl_batches,
    })
}
