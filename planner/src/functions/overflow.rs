//! Integer `+`, `-` and `*` that raise 22003 on overflow, as Postgres's do,
//! instead of wrapping.
//!
//! DataFusion's `BinaryExpr` wraps unless it is built with
//! `fail_on_overflow`, which neither its physical planner nor
//! `datafusion-proto` sets. So the check is switched on in three places:
//! - [`check_overflow`] rewrites a physical expression; the streaming
//!   lowering applies it to every expression it makes, and the plan codec
//!   applies it again after decoding on a worker (the flag is not on the
//!   wire);
//! - [`CheckOverflowRule`], a physical optimiser rule, does the same for
//!   finite queries planned by DataFusion (projections, filters and
//!   aggregations);
//! - [`FoldCheckedConstants`], a logical optimiser rule that runs before
//!   DataFusion's constant folding (which evaluates wrapping expressions at
//!   plan time), folds integer arithmetic on literals with checked
//!   operations.

use std::sync::Arc;

use arrow::datatypes::DataType;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode};
use datafusion::common::{Result, ScalarValue};
use datafusion::logical_expr::{BinaryExpr as LogicalBinary, Expr, LogicalPlan, Operator};
use datafusion::optimizer::utils::NamePreserver;
use datafusion::optimizer::{OptimizerConfig, OptimizerRule};
use datafusion::physical_expr::expressions::BinaryExpr;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode, PhysicalGroupBy};
use datafusion::physical_plan::filter::{FilterExec, FilterExecBuilder};
use datafusion::physical_plan::projection::{ProjectionExec, ProjectionExpr};
use datafusion::physical_plan::ExecutionPlan;

fn is_checked_op(op: &Operator) -> bool {
    matches!(op, Operator::Plus | Operator::Minus | Operator::Multiply)
}

/// Rewrites `expr` so every `+`, `-` and `*` in it fails on overflow.
/// Returns whether anything changed.
pub fn check_overflow_changed(
    expr: Arc<dyn PhysicalExpr>,
) -> Result<Transformed<Arc<dyn PhysicalExpr>>> {
    expr.transform_up(|e| {
        let Some(b) = e.downcast_ref::<BinaryExpr>() else {
            return Ok(Transformed::no(e));
        };
        let checked = BinaryExpr::new(Arc::clone(b.left()), *b.op(), Arc::clone(b.right()))
            .with_fail_on_overflow(true);
        if !is_checked_op(b.op()) || b == &checked {
            return Ok(Transformed::no(e));
        }
        Ok(Transformed::yes(Arc::new(checked) as Arc<dyn PhysicalExpr>))
    })
}

/// Rewrites `expr` so every `+`, `-` and `*` in it fails on overflow.
pub fn check_overflow(expr: Arc<dyn PhysicalExpr>) -> Result<Arc<dyn PhysicalExpr>> {
    check_overflow_changed(expr).data()
}

/// [`check_overflow`] over group expressions and aggregate arguments.
pub fn check_aggregate(
    group: &[(Arc<dyn PhysicalExpr>, String)],
    aggregates: &[Arc<datafusion::physical_expr::aggregate::AggregateFunctionExpr>],
    filters: &[Option<Arc<dyn PhysicalExpr>>],
) -> Result<Option<CheckedAggregate>> {
    let mut changed = false;
    let mut track = |e: &Arc<dyn PhysicalExpr>| -> Result<Arc<dyn PhysicalExpr>> {
        let t = check_overflow_changed(Arc::clone(e))?;
        changed |= t.transformed;
        Ok(t.data)
    };
    let group_exprs = group
        .iter()
        .map(|(e, n)| Ok((track(e)?, n.clone())))
        .collect::<Result<Vec<_>>>()?;
    let mut new_aggregates = Vec::with_capacity(aggregates.len());
    for a in aggregates {
        let all = a.all_expressions();
        let args = all
            .args
            .iter()
            .map(&mut track)
            .collect::<Result<Vec<_>>>()?;
        match a.with_new_expressions(args, all.order_by_exprs) {
            Some(new) => new_aggregates.push(Arc::new(new)),
            None => new_aggregates.push(Arc::clone(a)),
        }
    }
    let filters = filters
        .iter()
        .map(|f| f.as_ref().map(&mut track).transpose())
        .collect::<Result<Vec<_>>>()?;
    Ok(changed.then_some(CheckedAggregate {
        group_exprs,
        aggregates: new_aggregates,
        filters,
    }))
}

/// An aggregation's expressions with overflow checks on.
pub struct CheckedAggregate {
    /// Group expressions and their names.
    pub group_exprs: Vec<(Arc<dyn PhysicalExpr>, String)>,
    /// Aggregate functions.
    pub aggregates: Vec<Arc<datafusion::physical_expr::aggregate::AggregateFunctionExpr>>,
    /// Per-aggregate `FILTER (WHERE ...)` predicates.
    pub filters: Vec<Option<Arc<dyn PhysicalExpr>>>,
}

/// Physical optimiser rule: overflow checks in the projections, filters and
/// aggregations of a finite plan.
#[derive(Debug, Default)]
pub struct CheckOverflowRule;

impl PhysicalOptimizerRule for CheckOverflowRule {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            if let Some(p) = node.downcast_ref::<ProjectionExec>() {
                let mut changed = false;
                let mut exprs = Vec::with_capacity(p.expr().len());
                for pe in p.expr() {
                    let t = check_overflow_changed(Arc::clone(&pe.expr))?;
                    changed |= t.transformed;
                    exprs.push(ProjectionExpr {
                        expr: t.data,
                        alias: pe.alias.clone(),
                    });
                }
                if !changed {
                    return Ok(Transformed::no(node));
                }
                let new = ProjectionExec::try_new_with_schema_metadata(
                    exprs,
                    Arc::clone(p.input()),
                    p.schema().as_ref(),
                )?;
                return Ok(Transformed::yes(Arc::new(new) as Arc<dyn ExecutionPlan>));
            }
            if let Some(f) = node.downcast_ref::<FilterExec>() {
                let t = check_overflow_changed(Arc::clone(f.predicate()))?;
                if !t.transformed {
                    return Ok(Transformed::no(node));
                }
                let new = FilterExecBuilder::new(t.data, Arc::clone(f.input()))
                    .apply_projection_by_ref(f.projection().as_ref())?
                    .with_default_selectivity(f.default_selectivity())
                    .with_batch_size(f.batch_size())
                    .with_fetch(f.fetch())
                    .build()?;
                return Ok(Transformed::yes(Arc::new(new) as Arc<dyn ExecutionPlan>));
            }
            if let Some(a) = node.downcast_ref::<AggregateExec>() {
                // Only the modes that evaluate their input expressions.
                if matches!(
                    a.mode(),
                    AggregateMode::Final | AggregateMode::FinalPartitioned
                ) {
                    return Ok(Transformed::no(node));
                }
                let g = a.group_expr();
                let Some(checked) = check_aggregate(g.expr(), a.aggr_expr(), a.filter_expr())?
                else {
                    return Ok(Transformed::no(node));
                };
                let group = PhysicalGroupBy::new(
                    checked.group_exprs,
                    g.null_expr().to_vec(),
                    g.groups().to_vec(),
                    g.has_grouping_set(),
                );
                let new = AggregateExec::try_new(
                    *a.mode(),
                    group,
                    checked.aggregates,
                    checked.filters,
                    Arc::clone(a.input()),
                    a.input_schema(),
                )?
                .with_limit_options(a.limit_options());
                return Ok(Transformed::yes(Arc::new(new) as Arc<dyn ExecutionPlan>));
            }
            Ok(Transformed::no(node))
        })
        .data()
    }

    fn name(&self) -> &str {
        "drizzle_check_overflow"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// An integer constant: a literal, or a cast of one to an integer type.
fn integer_constant(e: &Expr) -> Option<ScalarValue> {
    match e {
        Expr::Literal(v, _) if v.data_type().is_integer() => Some(v.clone()),
        Expr::Cast(c) if c.field.data_type().is_integer() => match c.expr.as_ref() {
            Expr::Literal(v, _) => v.cast_to(c.field.data_type()).ok(),
            _ => None,
        },
        _ => None,
    }
}

/// Folds `+`, `-` and `*` of two integer constants of one type with
/// checked arithmetic, before DataFusion's constant folding wraps them.
fn fold_checked(e: Expr) -> Result<Transformed<Expr>> {
    e.transform_up(|e| {
        let Expr::BinaryExpr(LogicalBinary { left, op, right }) = &e else {
            return Ok(Transformed::no(e));
        };
        if !is_checked_op(op) {
            return Ok(Transformed::no(e));
        }
        let (Some(l), Some(r)) = (integer_constant(left), integer_constant(right)) else {
            return Ok(Transformed::no(e));
        };
        if l.data_type() != r.data_type() || matches!(l.data_type(), DataType::Null) {
            return Ok(Transformed::no(e));
        }
        let v = match op {
            Operator::Plus => l.add_checked(&r)?,
            Operator::Minus => l.sub_checked(&r)?,
            _ => l.mul_checked(&r)?,
        };
        Ok(Transformed::yes(Expr::Literal(v, None)))
    })
}

/// Logical optimiser rule: integer constant arithmetic folded with checks
/// (see the module docs). It must run before `simplify_expressions`.
#[derive(Debug, Default)]
pub struct FoldCheckedConstants;

impl OptimizerRule for FoldCheckedConstants {
    fn name(&self) -> &str {
        "drizzle_fold_checked_constants"
    }

    fn apply_order(&self) -> Option<datafusion::optimizer::ApplyOrder> {
        Some(datafusion::optimizer::ApplyOrder::BottomUp)
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        let names = NamePreserver::new(&plan);
        plan.map_expressions(|e| {
            let name = names.save(&e);
            Ok(fold_checked(e)?.update_data(|e| name.restore(e)))
        })
    }
}
