//! Integer arithmetic as Postgres does it: [`CheckedSum`] replaces `sum`
//! with one whose integer accumulators raise 22003 on overflow instead of
//! wrapping, and [`CheckedArithmetic::modulo`] is Postgres's `mod(a, b)`.
//!
//! Integer `+`, `-` and `*` in expressions are checked by
//! [`super::overflow`].

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array};
use arrow::datatypes::{DataType, Int64Type};
use arrow::error::ArrowError;
use datafusion::common::{DataFusionError, Result, ScalarValue};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, EmitTo, GroupsAccumulator,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

/// Integer arithmetic with Postgres's errors (only `mod` is registered).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CheckedArithmetic {
    op: ArithOp,
    signature: Signature,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ArithOp {
    /// Postgres's `mod(a, b)`: the remainder, with the sign of `a`;
    /// 22012 when `b` is zero.
    Mod,
}

impl CheckedArithmetic {
    fn new(op: ArithOp) -> Self {
        Self {
            op,
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }

    /// Postgres's `mod(a, b)` (DataFusion has no function of that name).
    pub fn modulo() -> ScalarUDF {
        ScalarUDF::from(Self::new(ArithOp::Mod))
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
            ArithOp::Mod => "mod",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        Ok(arg_types.first().cloned().unwrap_or(DataType::Int64))
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        // mod(a, b) takes two numbers of one type, as Postgres's overloads do.
        let [a, b] = arg_types else {
            return Err(DataFusionError::Plan(format!(
                "{} takes two arguments",
                self.name()
            )));
        };
        let common = datafusion::logical_expr::type_coercion::binary::binary_numeric_coercion(a, b)
            .filter(DataType::is_numeric)
            .ok_or_else(|| {
                DataFusionError::Plan(format!("function {}({a}, {b}) does not exist", self.name()))
            })?;
        Ok(vec![common.clone(), common])
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
            ArithOp::Mod => arrow::compute::kernels::numeric::rem,
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

    fn create_sliding_accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        if args.return_field.data_type() == &DataType::Int64 && !args.is_distinct {
            return Ok(Box::new(CheckedSlidingSum::default()));
        }
        self.inner.inner().create_sliding_accumulator(args)
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

/// A checked sum over a sliding frame (`OVER (... ROWS n PRECEDING)`):
/// rows leave the frame by retraction; NULL when no non-NULL value is in it.
#[derive(Debug, Default)]
struct CheckedSlidingSum {
    sum: i64,
    count: u64,
}

impl CheckedSlidingSum {
    fn apply(&mut self, values: &[ArrayRef], sign: i64) -> Result<()> {
        let Some(values) = values.first() else {
            return Ok(());
        };
        let values = as_i64(values)?;
        for v in values.as_primitive::<Int64Type>().iter().flatten() {
            let term = if sign < 0 { v.checked_neg() } else { Some(v) };
            self.sum = term
                .and_then(|t| self.sum.checked_add(t))
                .ok_or_else(|| out_of_range(&DataType::Int64))?;
            self.count = if sign < 0 {
                self.count.saturating_sub(1)
            } else {
                self.count + 1
            };
        }
        Ok(())
    }
}

impl Accumulator for CheckedSlidingSum {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.apply(values, 1)
    }

    fn retract_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.apply(values, -1)
    }

    fn supports_retract_batch(&self) -> bool {
        true
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Int64((self.count > 0).then_some(self.sum)))
    }

    fn size(&self) -> usize {
        size_of_val(self)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![ScalarValue::Int64(
            (self.count > 0).then_some(self.sum),
        )])
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
