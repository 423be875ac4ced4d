//! # drizzle-planner: from SQL to streaming stages
//!
//! Where it sits: `server` hands every statement's text to
//! [`parse_statements`]; for queries, [`plan_query`] returns either a finite
//! DataFusion [`LogicalPlan`](datafusion::logical_expr::LogicalPlan) (no
//! stream involved) or a [`StreamingPlan`], which `exec` runs as micro-batches.
//!
//! ```text
//!  SQL ──parse_statements──▶ DrizzleStatement
//!      ──plan_query────────▶ DataFusion LogicalPlan (name resolution via
//!                            DrizzleContextProvider, DataFusion optimiser)
//!      ──lower─────────────▶ StreamingPlan: a StageGraph (stages cut at every
//!                            aggregation and stream join, each a chain of
//!                            operators; see EXPLAIN) and how results leave
//! ```
//!
//! DataFusion stays a library of *stateless per-batch kernels* here: the
//! planner keeps its physical expressions and aggregate functions, and puts
//! windows, watermarks and keyed state in Drizzle's own operators (the split
//! Arroyo uses). An aggregation is split into a partial half (map side, before
//! the shuffle) and a final half holding partial states as Arrow arrays.
//!
//! Types to read first: [`DrizzleStatement`], [`StreamingPlan`],
//! [`graph::StageGraph`], [`BatchOp`], [`AggregatePlan`], [`WindowSpec`],
//! [`PlanError`].

pub mod catalog;
pub mod codec;
pub mod error;
pub mod functions;
pub mod graph;
pub mod lower;
pub mod plan;
pub mod providers;
pub mod statement;
pub mod types;

use std::sync::Arc;

pub use catalog::{ColumnDef, FunctionDef, StreamDef, TableDef, ViewDef, WatermarkSpec};
pub use codec::{decode_graph, decode_plan, encode_graph, encode_plan};
pub use error::{PlanError, Result};
pub use graph::{Operator, Partitioning, Stage, StageGraph, StageInput, StageOutput};
pub use lower::{
    plan_query, plan_view_query, sql_to_logical, sql_to_unoptimized, PlannedQuery, Relation,
    RelationResolver, OP_COLUMN,
};
pub use plan::{
    AggregatePlan, BatchOp, EmitMode, EventTimeSpec, IntervalJoinPlan, LookupJoinSpec,
    OverAggregatePlan, OverRetain, Ranking, SessionBounds, StreamingPlan, TopNPlan, WindowGroup,
    WindowJoinPlan, WEIGHT_COLUMN,
};
pub use providers::{StreamProvider, WindowKind, WindowProvider, WindowSpec};
pub use statement::{
    parse_statements, AnalyzeTarget, CopyOptions, DrizzleStatement, ObjectKind, RoleOptions, Secret,
};

/// Builds the DataFusion session state Drizzle plans with: default functions,
/// and the optimiser without the rules that would change the shape of a
/// streaming aggregation (a single `count(DISTINCT)` must stay one aggregate).
pub fn new_session_context() -> datafusion::prelude::SessionContext {
    let config = datafusion::prelude::SessionConfig::new()
        .with_target_partitions(1)
        .with_information_schema(false);
    let ctx = datafusion::prelude::SessionContext::new_with_config(config);
    ctx.remove_optimizer_rule("single_distinct_aggregation_to_group_by");
    // A LIMIT on a continuous query ends it; it must stay at the top, not be
    // copied into the stream side of a join.
    ctx.remove_optimizer_rule("push_down_limit");
    // Integer overflow is 22003, as in Postgres: constant folding checked
    // before DataFusion's (which wraps), and checked physical arithmetic.
    let state = ctx.state();
    let mut rules: Vec<Arc<dyn datafusion::optimizer::OptimizerRule + Send + Sync>> =
        vec![Arc::new(functions::overflow::FoldCheckedConstants)];
    rules.extend(state.optimizers().iter().cloned());
    let mut physical = state.physical_optimizers().to_vec();
    physical.push(Arc::new(functions::overflow::CheckOverflowRule));
    let state = datafusion::execution::SessionStateBuilder::new_from_existing(state)
        .with_optimizer_rules(rules)
        .with_physical_optimizer_rules(physical)
        .build();
    let ctx = datafusion::prelude::SessionContext::new_with_state(state);
    functions::register(&ctx);
    ctx
}
