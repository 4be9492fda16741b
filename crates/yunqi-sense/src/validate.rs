//! A view is also planned by DataFusion, as the batch query it equals
//! ([`crate::plan::ViewPlan::batch_sql`]) over an empty table of the stream's columns: what
//! DataFusion refuses (a type mismatch in WHERE, an unknown function) is refused with its error.

use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use yunqi_types::Error;

use crate::plan::ViewPlan;

/// Plans the view's batch equivalent with DataFusion.
pub async fn with_datafusion(plan: &ViewPlan) -> Result<(), Error> {
    let schema = Arc::new(datafusion::arrow::datatypes::Schema::new(
        plan.stream_columns
            .iter()
            .map(|c| datafusion::arrow::datatypes::Field::new(&c.name, c.column_type.arrow(), true))
            .collect::<Vec<_>>(),
    ));
    let ctx = SessionContext::new();
    let table = MemTable::try_new(schema.clone(), vec![vec![RecordBatch::new_empty(schema)]])
        .map_err(|e| Error::internal(format!("validate view: {e}")))?;
    ctx.register_table("__events", Arc::new(table))
        .map_err(|e| Error::internal(format!("validate view: {e}")))?;
    let sql = plan.batch_sql("__events", false);
    let df = ctx
        .sql(&sql)
        .await
        .map_err(|e| Error::invalid(format!("the view does not plan: {e}")))?;
    df.create_physical_plan()
        .await
        .map_err(|e| Error::invalid(format!("the view does not plan: {e}")))?;
    Ok(())
}
