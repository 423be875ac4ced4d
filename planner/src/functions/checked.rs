//! Integer arithmetic that raises 22003 on overflow, as Postgres does,
//! instead of wrapping (DataFusion's `+`, `-` and `*` wrap, and its `sum`
//! of integers wraps too).
//!
//! [`CheckedIntegerArithmetic`] is an analyzer rule: after type coercion it
//! rewrites every integer `a + b`, `a - b` and `a * b` in a plan into a call
//! of [`CheckedArithmetic`] (`checked_add`, ...), keeping the expression's
//! name, so the result schema is unchanged. Being functions, they travel in
//! encoded plans to the workers, which resolve them by name.
//! [`CheckedSum`] replaces `sum` with one whose integer accumulators check
//! every addition.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array};
use arrow::datatypes::{DataType, Int64Type};
use arrow::error::ArrowError;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DataFusionError, Result, ScalarValue};
use datafusion::logical_expr::expr::{BinaryExpr, ScalarFunction};
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::merge_schema;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, EmitTo, Expr, ExprSchemable,
    GroupsAccumulator, LogicalPlan, Operator, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl,
    Signature, Volatility,
};
use datafusion::optimizer::AnalyzerRule;

/// `+`, `-` or `*` on integers, failing on overflow.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CheckedArithmetic {
    op: ArithOp,
    signature: Signature,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ArithOp {
    Add,
    Sub,
    Mul,
}

impl CheckedArithmetic {
    fn new(op: ArithOp) -> Self {
        Self {
            op,
            signature: Signature::any(2, Volatility::Immutable),
        }
    }

    /// The three functions.
    pub fn all() -> [ScalarUDF; 3] {
        [ArithOp::Add, ArithOp::Sub, ArithOp::Mul].map(|op| ScalarUDF::from(Self::new(op)))
    }
}

/// Postgres's wording for an integer overflow of `t`.
fn out_of_range(t: &DataType) -> DataFusionError {
    let name = match t {
        DataType::Int16 | DataType::Int8 => "smallint",
        DataType::Int32 => "integer",
        _ => "bigint",
    };
    DataFusionError::ArrowError(
        Box::new(ArrowError::ArithmeticOverflow(format!(
            "{name} out of range"
        ))),
        None,
    )
}

impl ScalarUDFImpl for CheckedArithmetic {
    fn name(&self) -> &str {
        match self.op {
            ArithOp::Add => "checked_add",
            ArithOp::Sub => "checked_sub",
            ArithOp::Mul => "checked_mul",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        Ok(arg_types.first().cloned().unwrap_or(DataType::Int64))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [a, b] = args.args.as_slice() else {
            return Err(DataFusionError::Internal(format!(
                "{} takes two arguments",
                self.name()
            )));
        };
        let scalar = matches!((a, b), (ColumnarValue::Scalar(_), ColumnarValue::Scalar(_)));
        let n = if scalar { 1 } else { args.number_rows };
        let (a, b) = (a.to_array(n)?, b.to_array(n)?);
        let kernel = match self.op {
            ArithOp::Add => arrow::compute::kernels::numeric::add,
            ArithOp::Sub => arrow::compute::kernels::numeric::sub,
            ArithOp::Mul => arrow::compute::kernels::numeric::mul,
        };
        let out = match kernel(&a, &b) {
            Ok(out) => out,
            Err(ArrowError::ArithmeticOverflow(_)) => return Err(out_of_range(a.data_type())),
            Err(e) => return Err(e.into()),
        };
        if scalar {
            Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&out, 0)?))
        } else {
            Ok(ColumnarValue::Array(out))
        }
    }
}

/// Rewrites integer `+`, `-`, `*` into the checked functions.
#[derive(Debug, Default)]
pub struct CheckedIntegerArithmetic;

impl AnalyzerRule for CheckedIntegerArithmetic {
    fn name(&self) -> &str {
        "drizzle_checked_integer_arithmetic"
    }

    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        let [add, sub, mul] = CheckedArithmetic::all().map(Arc::new);
        plan.transform_up_with_subqueries(|plan| {
            if matches!(plan, LogicalPlan::TableScan(_)) {
                return Ok(Transformed::no(plan));
            }
            let schema = merge_schema(&plan.inputs());
            let names = NamePreserver::new(&plan);
            plan.map_expressions(|expr| {
                let name = names.save(&expr);
                let rewritten = expr.transform_up(|e| {
                    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = &e else {
                        return Ok(Transformed::no(e));
                    };
                    let udf = match op {
                        Operator::Plus => &add,
                        Operator::Minus => &sub,
                        Operator::Multiply => &mul,
                        _ => return Ok(Transformed::no(e)),
                    };
                    let (Ok(lt), Ok(rt)) = (left.get_type(&schema), right.get_type(&schema)) else {
                        return Ok(Transformed::no(e));
                    };
                    if !(lt.is_integer() && lt == rt) {
                        return Ok(Transformed::no(e));
                    }
                    Ok(Transformed::yes(Expr::ScalarFunction(
                        ScalarFunction::new_udf(
                            Arc::clone(udf),
                            vec![(**left).clone(), (**right).clone()],
                        ),
                    )))
                })?;
                Ok(rewritten.update_data(|e| name.restore(e)))
            })?
            .map_data(|plan| plan.recompute_schema())
        })
        .map(|t| t.data)
    }
}

/// `sum` with integer additions checked: 22003 instead of a wrapped result.
/// Other types are DataFusion's `sum`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CheckedSum {
    inner: Arc<AggregateUDF>,
}

impl CheckedSum {
    /// The function.
    pub fn new() -> Self {
        Self {
            inner: datafusion::functions_aggregate::sum::sum_udaf(),
        }
    }
}

impl Default for CheckedSum {
    fn default() -> Self {
        Self::new()
    }
}

impl AggregateUDFImpl for CheckedSum {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.inner().coerce_types(arg_types)
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<arrow::datatypes::FieldRef>> {
        self.inner.inner().state_fields(args)
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        if args.return_field.data_type() == &DataType::Int64 && !args.is_distinct {
            return Ok(Box::new(CheckedSumAccumulator::default()));
        }
        self.inner.inner().accumulator(args)
    }

    fn groups_accumulator_supported(&self, args: AccumulatorArgs) -> bool {
        self.inner.inner().groups_accumulator_supported(args)
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        if args.return_field.data_type() == &DataType::Int64 && !args.is_distinct {
            return Ok(Box::new(CheckedSumGroups::new()));
        }
        self.inner.inner().create_groups_accumulator(args)
    }

    fn reverse_expr(&self) -> datafusion::logical_expr::ReversedUDAF {
        datafusion::logical_expr::ReversedUDAF::Identical
    }

    fn order_sensitivity(&self) -> datafusion::logical_expr::utils::AggregateOrderSensitivity {
        self.inner.inner().order_sensitivity()
    }
}

/// The integer argument as i64 values.
fn as_i64(array: &ArrayRef) -> Result<ArrayRef> {
    Ok(arrow::compute::cast(array, &DataType::Int64)?)
}

#[derive(Debug, Default)]
struct CheckedSumAccumulator {
    sum: Option<i64>,
}

impl CheckedSumAccumulator {
    fn add(&mut self, values: &ArrayRef) -> Result<()> {
        let values = as_i64(values)?;
        let values = values.as_primitive::<Int64Type>();
        for v in values.iter().flatten() {
            let s = self.sum.unwrap_or(0);
            self.sum = Some(
                s.checked_add(v)
                    .ok_or_else(|| out_of_range(&DataType::Int64))?,
            );
        }
        Ok(())
    }
}

impl Accumulator for CheckedSumAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        match values.first() {
            Some(v) => self.add(v),
            None => Ok(()),
        }
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Int64(self.sum))
    }

    fn size(&self) -> usize {
        size_of_val(self)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![ScalarValue::Int64(self.sum)])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.update_batch(states)
    }
}

/// Per-group checked sums.
struct CheckedSumGroups {
    sums: Vec<i64>,
    seen: Vec<bool>,
}

impl CheckedSumGroups {
    fn new() -> Self {
        Self {
            sums: Vec::new(),
            seen: Vec::new(),
        }
    }

    fn add(
        &mut self,
        values: &ArrayRef,
        groups: &[usize],
        filter: Option<&BooleanArray>,
        total: usize,
    ) -> Result<()> {
        self.sums.resize(total, 0);
        self.seen.resize(total, false);
        let values = as_i64(values)?;
        let values = values.as_primitive::<Int64Type>();
        for (row, &g) in groups.iter().enumerate() {
            if values.is_null(row) || filter.is_some_and(|f| !f.is_valid(row) || !f.value(row)) {
                continue;
            }
            match self.sums[g].checked_add(values.value(row)) {
                Some(s) => {
                    self.sums[g] = s;
                    self.seen[g] = true;
                }
                None => return Err(out_of_range(&DataType::Int64)),
            }
        }
        Ok(())
    }

    fn take(&mut self, emit_to: EmitTo) -> (Vec<i64>, Vec<bool>) {
        match emit_to {
            EmitTo::All => (
                std::mem::take(&mut self.sums),
                std::mem::take(&mut self.seen),
            ),
            EmitTo::First(n) => {
                let rest_sums = self.sums.split_off(n);
                let rest_seen = self.seen.split_off(n);
                (
                    std::mem::replace(&mut self.sums, rest_sums),
                    std::mem::replace(&mut self.seen, rest_seen),
                )
            }
        }
    }
}

impl GroupsAccumulator for CheckedSumGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        match values.first() {
            Some(v) => self.add(v, group_indices, opt_filter, total_num_groups),
            None => Ok(()),
        }
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let (sums, seen) = self.take(emit_to);
        let array: Int64Array = sums
            .into_iter()
            .zip(seen)
            .map(|(s, seen)| seen.then_some(s))
            .collect();
        Ok(Arc::new(array))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        Ok(vec![self.evaluate(emit_to)?])
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.update_batch(values, group_indices, None, total_num_groups)
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        // Each row is its own partial sum (NULL where filtered out).
        let Some(v) = values.first() else {
            return Ok(vec![]);
        };
        let v = as_i64(v)?;
        let v = v.as_primitive::<Int64Type>();
        let state: Int64Array = (0..v.len())
            .map(|i| {
                let kept = opt_filter.is_none_or(|f| f.is_valid(i) && f.value(i));
                (kept && v.is_valid(i)).then(|| v.value(i))
            })
            .collect();
        Ok(vec![Arc::new(state)])
    }

    fn size(&self) -> usize {
        self.sums.capacity() * 9 + size_of_val(self)
    }
}
