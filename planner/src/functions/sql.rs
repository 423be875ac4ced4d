//! Users' SQL functions (`CREATE FUNCTION ... LANGUAGE SQL`).
//!
//! A SQL function's body is one expression over its arguments. It is
//! planned once against the arguments (and the built-in functions only: a
//! body cannot call a user's function, so no function can call itself),
//! and every call is replaced by the body, its arguments substituted, when
//! the optimiser simplifies the plan: a continuous query never carries the
//! function itself, and workers never need to know it.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::datatypes::DataType;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{exec_err, DFSchema, Result};
use datafusion::logical_expr::planner::ContextProvider;
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::{
    ColumnarValue, Expr, ExprSchemable, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::sql::planner::{PlannerContext, SqlToRel};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;

use crate::catalog::FunctionDef;

/// A user's SQL function as DataFusion sees it: a name, a signature, and a
/// body it inlines.
#[derive(Debug)]
pub struct SqlFunction {
    def: FunctionDef,
    signature: Signature,
    /// The body over columns named after the arguments, cast to the result type.
    body: Expr,
}

impl PartialEq for SqlFunction {
    fn eq(&self, other: &Self) -> bool {
        self.def == other.def
    }
}

impl Eq for SqlFunction {}

impl Hash for SqlFunction {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.def.name.hash(state);
        self.def.body.hash(state);
    }
}

impl SqlFunction {
    /// Plans `def`'s body against its arguments; fails as the body's
    /// planning does (an unknown column or function, a type error).
    pub fn new<C: ContextProvider>(def: FunctionDef, context: &C) -> Result<Self> {
        let fields: Vec<arrow::datatypes::Field> = def
            .args
            .iter()
            .map(|a| arrow::datatypes::Field::new(&a.name, a.data_type.clone(), true))
            .collect();
        let schema = DFSchema::from_unqualified_fields(fields.into(), Default::default())?;
        let parsed = Parser::new(&PostgreSqlDialect {})
            .try_with_sql(&def.body)?
            .parse_expr()?;
        let planned =
            SqlToRel::new(context).sql_to_expr(parsed, &schema, &mut PlannerContext::new())?;
        // The body's type must become the declared result type.
        let body = planned.cast_to(&def.returns.data_type, &schema)?;
        let signature = Signature::exact(
            def.args.iter().map(|a| a.data_type.clone()).collect(),
            Volatility::Immutable,
        );
        Ok(Self {
            def,
            signature,
            body,
        })
    }
}

impl ScalarUDFImpl for SqlFunction {
    fn name(&self) -> &str {
        &self.def.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(self.def.returns.data_type.clone())
    }

    fn simplify(&self, args: Vec<Expr>, _info: &SimplifyContext) -> Result<ExprSimplifyResult> {
        if args.len() != self.def.args.len() {
            return Ok(ExprSimplifyResult::Original(args));
        }
        let names: Vec<&str> = self.def.args.iter().map(|a| a.name.as_str()).collect();
        let inlined = self
            .body
            .clone()
            .transform(|e| {
                Ok(match &e {
                    Expr::Column(c) if c.relation.is_none() => {
                        match names.iter().position(|n| *n == c.name) {
                            Some(i) => Transformed::yes(args[i].clone()),
                            None => Transformed::no(e),
                        }
                    }
                    _ => Transformed::no(e),
                })
            })?
            .data;
        Ok(ExprSimplifyResult::Simplified(inlined))
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        // Calls are inlined by the optimiser; one that was not is a bug.
        exec_err!(
            "the SQL function {} was not inlined into the query",
            self.def.name
        )
    }
}

/// Builds the function for a query's planning: `def` checked as
/// [`SqlFunction::new`] does.
pub fn sql_function<C: ContextProvider>(
    def: FunctionDef,
    context: &C,
) -> Result<Arc<datafusion::logical_expr::ScalarUDF>> {
    Ok(Arc::new(datafusion::logical_expr::ScalarUDF::from(
        SqlFunction::new(def, context)?,
    )))
}

/// Checks a definition before it is stored: its body plans, with the
/// declared types, and its name is not a built-in function's (which would
/// hide it).
pub fn check(def: &FunctionDef) -> crate::error::Result<()> {
    let ctx = crate::new_session_context();
    let state = ctx.state();
    if state.scalar_functions().contains_key(&def.name)
        || state.aggregate_functions().contains_key(&def.name)
        || state.window_functions().contains_key(&def.name)
    {
        return Err(crate::error::PlanError::unsupported_hint(
            format!("a function named {}, a built-in function's name", def.name),
            "choose another name",
        ));
    }
    let provider =
        crate::lower::DrizzleContextProvider::new(&state, &crate::lower::NothingResolver);
    SqlFunction::new(def.clone(), &provider)?;
    Ok(())
}
