//! Whose rows a query returned. For a dataset with a subject column (a person's ID number), a
//! query that returns its rows one for one — a selection with filters, sorts, limits and
//! aliases over one table — is run with the subject column carried along as a last, hidden
//! column; the engine takes it off the result and records the subjects' keys in the query's
//! audit record when the query returned at most `subject_rows_max` rows. Aggregates, joins and
//! unions return no one's row as such and record no subjects.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::common::Column;
use datafusion::datasource::{provider_as_source, source_as_provider};
use datafusion::logical_expr::{Expr, LogicalPlan, Projection, SubqueryAlias, TableScanBuilder};

use crate::secure::GrantedTable;

/// Name of the carried subject column.
pub const SUBJECT_COLUMN: &str = "__yunqi_subject";

/// `plan` with the subject column of the one subject dataset it returns rows of appended as
/// its last output column; `None` when the plan is not of that shape.
pub fn augment(plan: &LogicalPlan, subjects: &BTreeMap<String, String>) -> Option<LogicalPlan> {
    let mut chain = Vec::new();
    let mut node = plan;
    let scan = loop {
        match node {
            LogicalPlan::Limit(_)
            | LogicalPlan::Sort(_)
            | LogicalPlan::Projection(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::SubqueryAlias(_) => {
                chain.push(node);
                node = node.inputs().first().copied()?;
            }
            LogicalPlan::TableScan(scan) => break scan,
            _ => return None,
        }
    };
    let subject = subjects.get(&scan.table_name.to_string())?;
    let provider = source_as_provider(&scan.source).ok()?;
    let (mut rebuilt, mut current) =
        match (provider.as_ref() as &dyn Any).downcast_ref::<GrantedTable>() {
            Some(granted) => {
                let source = provider_as_source(Arc::new(granted.with_subject()?));
                let s = TableScanBuilder::new(scan.table_name.clone(), source)
                    .with_filters(scan.filters.clone())
                    .with_fetch(scan.fetch)
                    .build()
                    .ok()?;
                (
                    LogicalPlan::TableScan(s),
                    Column::new(Some(scan.table_name.clone()), SUBJECT_COLUMN),
                )
            }
            None => (
                node.clone(),
                Column::new(Some(scan.table_name.clone()), subject.as_str()),
            ),
        };
    for n in chain.iter().rev() {
        rebuilt = match n {
            LogicalPlan::Projection(p) => {
                let mut exprs = p.expr.clone();
                exprs.push(Expr::Column(current.clone()).alias(SUBJECT_COLUMN));
                current = Column::new_unqualified(SUBJECT_COLUMN);
                LogicalPlan::Projection(Projection::try_new(exprs, Arc::new(rebuilt)).ok()?)
            }
            LogicalPlan::SubqueryAlias(a) => {
                current = Column::new(Some(a.alias.clone()), current.name.clone());
                LogicalPlan::SubqueryAlias(
                    SubqueryAlias::try_new(Arc::new(rebuilt), a.alias.clone()).ok()?,
                )
            }
            other => other
                .with_new_exprs(other.expressions(), vec![rebuilt])
                .ok()?,
        };
    }
    let fields = rebuilt.schema().fields();
    let original = plan.schema().fields();
    let in_place = fields.len() == original.len() + 1
        && fields.last().is_some_and(|f| f.name() == SUBJECT_COLUMN);
    if in_place {
        return Some(rebuilt);
    }
    // No projection carried it to the end: add one.
    let mut exprs: Vec<Expr> = plan
        .schema()
        .columns()
        .into_iter()
        .map(Expr::Column)
        .collect();
    exprs.push(Expr::Column(current).alias(SUBJECT_COLUMN));
    Projection::try_new(exprs, Arc::new(rebuilt))
        .ok()
        .map(LogicalPlan::Projection)
}
