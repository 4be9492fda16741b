//! Row filters of grants: one SQL predicate over the dataset's own columns. Checked when a
//! grant is requested and again when it is approved; the SQL engine plans it under the scan.

use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{Expr, visit_expressions};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::Token;
use yunqi_datasets::Manifest;
use yunqi_types::{Error, suggest};

/// Longest row filter.
pub const ROW_FILTER_BYTES_MAX: usize = 4096;

/// Checks that `predicate` is one SQL expression over columns of `manifest`, with no
/// subquery; returns it trimmed.
pub fn check(predicate: &str, manifest: &Manifest) -> Result<String, Error> {
    let text = predicate.trim();
    let invalid = |message: String| {
        Error::invalid(message).detail(format!("row filter: {text}")).hint(
            "a row filter is one SQL condition over the dataset's columns, e.g. district = '西湖区' AND year >= 2020",
        )
    };
    if text.is_empty() {
        return Err(invalid("the row filter is empty".into()));
    }
    if text.len() > ROW_FILTER_BYTES_MAX {
        return Err(invalid(format!(
            "the row filter is longer than {ROW_FILTER_BYTES_MAX} bytes"
        )));
    }
    let dialect = PostgreSqlDialect {};
    let mut parser = Parser::new(&dialect)
        .try_with_sql(text)
        .map_err(|e| invalid(format!("the row filter is not valid SQL: {e}")))?;
    let expr = parser
        .parse_expr()
        .map_err(|e| invalid(format!("the row filter is not valid SQL: {e}")))?;
    if parser.peek_token().token != Token::EOF {
        return Err(invalid(
            "the row filter must be a single condition (text follows it)".into(),
        ));
    }
    let mut problem: Option<String> = None;
    let _ = visit_expressions(&expr, |e| {
        let found = match e {
            Expr::Subquery(_) | Expr::Exists { .. } | Expr::InSubquery { .. } => {
                Some("a row filter may not hold a subquery".to_string())
            }
            Expr::CompoundIdentifier(parts) => Some(format!(
                "use bare column names in a row filter, not \"{}\"",
                parts
                    .iter()
                    .map(|p| p.value.as_str())
                    .collect::<Vec<_>>()
                    .join(".")
            )),
            Expr::Identifier(id) => {
                let name = if id.quote_style.is_some() {
                    id.value.clone()
                } else {
                    id.value.to_lowercase()
                };
                if manifest.columns.iter().any(|c| c.name == name) {
                    None
                } else {
                    let names = manifest.columns.iter().map(|c| c.name.as_str());
                    Some(match suggest::did_you_mean(&name, names) {
                        Some(s) => format!(
                            "the row filter names column \"{name}\", which {} does not have; did you mean \"{s}\"?",
                            manifest.sql_name()
                        ),
                        None => format!(
                            "the row filter names column \"{name}\", which {} does not have",
                            manifest.sql_name()
                        ),
                    })
                }
            }
            _ => None,
        };
        match found {
            Some(p) => {
                problem = Some(p);
                ControlFlow::Break(())
            }
            None => ControlFlow::Continue(()),
        }
    });
    match problem {
        Some(p) => Err(invalid(p)),
        None => Ok(text.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yunqi_datasets::schema::{Column, ColumnType};
    use yunqi_types::ColumnClass;

    fn manifest() -> Manifest {
        let col = |name: &str| Column {
            name: name.into(),
            label: None,
            column_type: ColumnType::Text,
            class: ColumnClass::Internal,
            class_declared: false,
            detected: None,
        };
        Manifest {
            format: 1,
            department: "transport".into(),
            name: "vehicles".into(),
            description: String::new(),
            tags: vec![],
            columns: vec![col("plate"), col("district")],
            versions: vec![],
            subject: None,
            subject_declared: false,
            derived_from: None,
            created_at: chrono::Utc::now(),
            view: None,
        }
    }

    #[test]
    fn accepts_conditions_over_own_columns() {
        let m = manifest();
        assert_eq!(
            check("  district = '西湖区' AND plate LIKE '浙A%' ", &m).unwrap(),
            "district = '西湖区' AND plate LIKE '浙A%'"
        );
        assert!(check("upper(district) IN ('A', 'B')", &m).is_ok());
    }

    #[test]
    fn refuses_escapes() {
        let m = manifest();
        for (bad, why) in [
            ("", "empty"),
            ("district = 'x'; DROP TABLE y", "single condition"),
            ("plate IN (SELECT plate FROM police.watchlist)", "subquery"),
            ("EXISTS (SELECT 1)", "subquery"),
            ("vehicles.plate = 'x'", "bare column"),
            ("distrcit = 'x'", "did you mean \"district\""),
            ("owner = 'x'", "does not have"),
        ] {
            let e = check(bad, &m).unwrap_err();
            let text = format!("{} {:?}", e.message, e.detail);
            assert!(
                text.contains(why),
                "{bad:?} should be refused for {why:?}, got {text}"
            );
        }
    }
}
