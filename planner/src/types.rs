//! Mapping of Postgres type names to Arrow types.

use arrow::datatypes::{DataType, TimeUnit};
use datafusion::sql::sqlparser::ast::{DataType as SqlType, ExactNumberInfo, TimezoneInfo};

use crate::error::{PlanError, Result};

/// Maps a SQL type as parsed to the Arrow type Drizzle stores it as.
pub fn sql_to_arrow(t: &SqlType) -> Result<DataType> {
    use SqlType as T;
    Ok(match t {
        T::Boolean | T::Bool => DataType::Boolean,
        T::SmallInt(_) | T::Int2(_) => DataType::Int16,
        T::Int(_) | T::Integer(_) | T::Int4(_) => DataType::Int32,
        T::BigInt(_) | T::Int8(_) => DataType::Int64,
        T::Real | T::Float4 => DataType::Float32,
        T::Float(_) | T::Float8 | T::Double(_) | T::DoublePrecision => DataType::Float64,
        T::Numeric(info) | T::Decimal(info) | T::Dec(info) => match info {
            ExactNumberInfo::PrecisionAndScale(p, s) => {
                if *p == 0 || *p > 38 || *s < 0 || *s > *p as i64 {
                    return Err(PlanError::invalid(format!(
                        "NUMERIC({p},{s}): precision must be 1..38 and scale 0..precision"
                    )));
                }
                DataType::Decimal128(*p as u8, *s as i8)
            }
            ExactNumberInfo::Precision(p) => {
                if *p == 0 || *p > 38 {
                    return Err(PlanError::invalid(format!("NUMERIC({p}): precision must be 1..38")));
                }
                DataType::Decimal128(*p as u8, 0)
            }
            ExactNumberInfo::None => DataType::Decimal128(38, 10),
        },
        T::Text | T::String(_) | T::Varchar(_) | T::CharacterVarying(_) | T::Char(_) | T::Character(_) => {
            DataType::Utf8
        }
        T::Date => DataType::Date32,
        T::Timestamp(_, TimezoneInfo::None | TimezoneInfo::WithoutTimeZone) => {
            DataType::Timestamp(TimeUnit::Microsecond, None)
        }
        T::Timestamp(_, TimezoneInfo::Tz | TimezoneInfo::WithTimeZone) => {
            DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into()))
        }
        T::Bytea => DataType::Binary,
        other => {
            return Err(PlanError::unsupported_hint(
                format!("column type {other}"),
                "use BOOLEAN, SMALLINT, INT, BIGINT, REAL, DOUBLE PRECISION, NUMERIC(p,s), TEXT, VARCHAR, DATE, TIMESTAMP or TIMESTAMPTZ",
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    fn map(s: &str) -> Result<DataType> {
        let mut p = Parser::new(&PostgreSqlDialect {}).try_with_sql(s).unwrap();
        sql_to_arrow(&p.parse_data_type().unwrap())
    }

    #[test]
    fn postgres_names_map_to_arrow() {
        assert_eq!(map("BIGINT").unwrap(), DataType::Int64);
        assert_eq!(map("DOUBLE PRECISION").unwrap(), DataType::Float64);
        assert_eq!(map("NUMERIC(10,2)").unwrap(), DataType::Decimal128(10, 2));
        assert_eq!(map("VARCHAR(20)").unwrap(), DataType::Utf8);
        assert_eq!(
            map("TIMESTAMP").unwrap(),
            DataType::Timestamp(TimeUnit::Microsecond, None)
        );
        assert!(matches!(
            map("TIMESTAMPTZ").unwrap(),
            DataType::Timestamp(_, Some(_))
        ));
        assert!(map("NUMERIC(50,2)").is_err());
    }
}
