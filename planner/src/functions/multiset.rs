//! Aggregates over changes that cannot retract by arithmetic: `min`,
//! `max` and `count(DISTINCT ...)` of an aggregation over a non-windowed
//! aggregation, whose input rows come and go (weights +1 and -1). Each
//! group keeps a multiset of its values: value → weight, values in the
//! Arrow row format so that their byte order is their SQL order. A value
//! whose weight comes back to zero is gone; the result is the smallest or
//! largest value of positive weight, or how many there are.
//!
//! The planner calls them in place of the user's aggregates
//! ([`weighted_call`]); their partial state (the multiset as two lists,
//! values and weights) is merged after the shuffle like any other.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BinaryArray, Int64Array};
use arrow::datatypes::{DataType, Field, FieldRef, Int64Type};
use arrow::row::{RowConverter, SortField};
use datafusion::common::utils::SingleRowListArrayBuilder;
use datafusion::common::{internal_err, Result, ScalarValue};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Expr, Signature, Volatility,
};

/// What a multiset aggregate computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MultisetKind {
    /// The smallest value of positive weight.
    Min,
    /// The largest value of positive weight.
    Max,
    /// How many distinct values have a positive weight.
    CountDistinct,
}

impl MultisetKind {
    /// The aggregate for a user's function name (`min`, `max`, `count` with
    /// `DISTINCT`), if there is one.
    pub fn of(name: &str, distinct: bool) -> Option<Self> {
        match (name, distinct) {
            ("min", _) => Some(Self::Min),
            ("max", _) => Some(Self::Max),
            ("count", true) => Some(Self::CountDistinct),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Min => "__drizzle_weighted_min",
            Self::Max => "__drizzle_weighted_max",
            Self::CountDistinct => "__drizzle_weighted_count_distinct",
        }
    }
}

/// `kind(value, weight)`: a multiset aggregate of weighted values.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct WeightedMultiset {
    kind: MultisetKind,
    signature: Signature,
}

impl WeightedMultiset {
    /// The aggregate.
    pub fn new(kind: MultisetKind) -> Self {
        Self {
            kind,
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

/// The three aggregates, for registration (workers decode plans naming them).
pub fn all() -> Vec<AggregateUDF> {
    [
        MultisetKind::Min,
        MultisetKind::Max,
        MultisetKind::CountDistinct,
    ]
    .into_iter()
    .map(|k| AggregateUDF::from(WeightedMultiset::new(k)))
    .collect()
}

/// The call `kind(value, weight)`.
pub fn weighted_call(kind: MultisetKind, value: Expr, weight: Expr) -> Expr {
    AggregateUDF::from(WeightedMultiset::new(kind)).call(vec![value, weight])
}

impl AggregateUDFImpl for WeightedMultiset {
    fn name(&self) -> &str {
        self.kind.name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match (self.kind, arg_types.first()) {
            (MultisetKind::CountDistinct, _) => Ok(DataType::Int64),
            (_, Some(t)) => Ok(t.clone()),
            (_, None) => internal_err!("{} takes a value and a weight", self.kind.name()),
        }
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![
            Arc::new(Field::new_list(
                format_state_name(args.name, "values"),
                Field::new_list_field(DataType::Binary, true),
                true,
            )),
            Arc::new(Field::new_list(
                format_state_name(args.name, "weights"),
                Field::new_list_field(DataType::Int64, true),
                true,
            )),
        ])
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let Some(value) = args.expr_fields.first() else {
            return internal_err!("{} takes a value and a weight", self.kind.name());
        };
        Ok(Box::new(MultisetAccumulator::new(
            self.kind,
            value.data_type().clone(),
        )?))
    }
}

/// One group's multiset.
#[derive(Debug)]
struct MultisetAccumulator {
    kind: MultisetKind,
    data_type: DataType,
    rows: RowConverter,
    /// Value (row format) → weight; never zero.
    weights: BTreeMap<Vec<u8>, i64>,
    bytes: usize,
}

impl MultisetAccumulator {
    fn new(kind: MultisetKind, data_type: DataType) -> Result<Self> {
        Ok(Self {
            kind,
            rows: RowConverter::new(vec![SortField::new(data_type.clone())])?,
            data_type,
            weights: BTreeMap::new(),
            bytes: 0,
        })
    }

    fn add(&mut self, value: &[u8], weight: i64) {
        if weight == 0 {
            return;
        }
        match self.weights.get_mut(value) {
            Some(w) => {
                *w = w.saturating_add(weight);
                if *w == 0 {
                    self.weights.remove(value);
                    self.bytes = self.bytes.saturating_sub(value.len() + 48);
                }
            }
            None => {
                self.bytes += value.len() + 48;
                self.weights.insert(value.to_vec(), weight);
            }
        }
    }

    fn value(&self, row: &[u8]) -> Result<ScalarValue> {
        let parser = self.rows.parser();
        let arrays = self.rows.convert_rows([parser.parse(row)])?;
        match arrays.first() {
            Some(a) => ScalarValue::try_from_array(a, 0),
            None => internal_err!("a multiset value did not decode"),
        }
    }
}

impl Accumulator for MultisetAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let [value, weight] = values else {
            return internal_err!("{} takes a value and a weight", self.kind.name());
        };
        let rows = self.rows.convert_columns(&[Arc::clone(value)])?;
        let weight = arrow::compute::cast(weight, &DataType::Int64)?;
        let weight = weight.as_primitive::<Int64Type>();
        for i in 0..value.len() {
            // NULLs are not values (as min, max and count ignore them).
            if value.is_valid(i) && weight.is_valid(i) {
                self.add(rows.row(i).as_ref(), weight.value(i));
            }
        }
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let mut live = self.weights.iter().filter(|(_, w)| **w > 0);
        let found = match self.kind {
            MultisetKind::CountDistinct => {
                return Ok(ScalarValue::Int64(Some(live.count() as i64)));
            }
            MultisetKind::Min => live.next(),
            MultisetKind::Max => live.next_back(),
        };
        match found {
            Some((row, _)) => self.value(row),
            None => ScalarValue::try_from(&self.data_type),
        }
    }

    fn size(&self) -> usize {
        size_of_val(self) + self.bytes
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let values = BinaryArray::from_iter_values(self.weights.keys());
        let weights = Int64Array::from_iter_values(self.weights.values().copied());
        Ok(vec![
            ScalarValue::List(Arc::new(
                SingleRowListArrayBuilder::new(Arc::new(values)).build_list_array(),
            )),
            ScalarValue::List(Arc::new(
                SingleRowListArrayBuilder::new(Arc::new(weights)).build_list_array(),
            )),
        ])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let [values, weights] = states else {
            return internal_err!("{} state is values and weights", self.kind.name());
        };
        let values = values.as_list::<i32>();
        let weights = weights.as_list::<i32>();
        for i in 0..values.len() {
            if values.is_null(i) || weights.is_null(i) {
                continue;
            }
            let v = values.value(i);
            let w = weights.value(i);
            let (v, w) = (v.as_binary::<i32>(), w.as_primitive::<Int64Type>());
            for j in 0..v.len().min(w.len()) {
                self.add(v.value(j), w.value(j));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(kind: MultisetKind, batches: &[(&[Option<i64>], &[i64])]) -> ScalarValue {
        let mut acc = MultisetAccumulator::new(kind, DataType::Int64).unwrap();
        for (values, weights) in batches {
            acc.update_batch(&[
                Arc::new(Int64Array::from(values.to_vec())),
                Arc::new(Int64Array::from(weights.to_vec())),
            ])
            .unwrap();
        }
        acc.evaluate().unwrap()
    }

    #[test]
    fn a_retracted_extreme_gives_way_to_the_next() {
        let added: &[(&[Option<i64>], &[i64])] =
            &[(&[Some(3), Some(9), Some(5), None], &[1, 1, 1, 1])];
        assert_eq!(run(MultisetKind::Max, added), ScalarValue::Int64(Some(9)));
        let retracted: &[(&[Option<i64>], &[i64])] = &[
            (&[Some(3), Some(9), Some(5)], &[1, 1, 1]),
            (&[Some(9), Some(3)], &[-1, -1]),
        ];
        assert_eq!(
            run(MultisetKind::Max, retracted),
            ScalarValue::Int64(Some(5))
        );
        assert_eq!(
            run(MultisetKind::Min, retracted),
            ScalarValue::Int64(Some(5))
        );
        let gone: &[(&[Option<i64>], &[i64])] = &[(&[Some(3)], &[1]), (&[Some(3)], &[-1])];
        assert_eq!(run(MultisetKind::Min, gone), ScalarValue::Int64(None));
        // Two rows of 7, one taken back: still 7; count(DISTINCT) counts it once.
        let twice: &[(&[Option<i64>], &[i64])] = &[
            (&[Some(7), Some(7), Some(2)], &[1, 1, 1]),
            (&[Some(7)], &[-1]),
        ];
        assert_eq!(run(MultisetKind::Max, twice), ScalarValue::Int64(Some(7)));
        assert_eq!(
            run(MultisetKind::CountDistinct, twice),
            ScalarValue::Int64(Some(2))
        );
    }

    #[test]
    fn partial_states_merge_even_with_a_retraction_seen_first() {
        // One partial saw the -1 of a value another partial added.
        let mut a = MultisetAccumulator::new(MultisetKind::Max, DataType::Int64).unwrap();
        a.update_batch(&[
            Arc::new(Int64Array::from(vec![10, 4])),
            Arc::new(Int64Array::from(vec![-1, 1])),
        ])
        .unwrap();
        let mut b = MultisetAccumulator::new(MultisetKind::Max, DataType::Int64).unwrap();
        b.update_batch(&[
            Arc::new(Int64Array::from(vec![10])),
            Arc::new(Int64Array::from(vec![1])),
        ])
        .unwrap();
        let mut total = MultisetAccumulator::new(MultisetKind::Max, DataType::Int64).unwrap();
        for part in [&mut a, &mut b] {
            let states: Vec<ArrayRef> = part
                .state()
                .unwrap()
                .into_iter()
                .map(|s| s.to_array().unwrap())
                .collect();
            total.merge_batch(&states).unwrap();
        }
        assert_eq!(total.evaluate().unwrap(), ScalarValue::Int64(Some(4)));
    }
}
