//! Grants enforced at the scan. A dataset read under a grant is a [`GrantedTable`]: its scan
//! reads the Parquet files, keeps only the rows passing the grant's row filter, keeps only the
//! granted columns and masks the personal and sensitive ones the grant does not unmask, all
//! below a [`GrantBoundaryExec`].
//!
//! Invariant: nothing of the query above the boundary reaches below it. The table accepts no
//! filter pushdown, and the boundary refuses the physical optimiser's filter, projection and
//! limit pushdowns, so a user's predicate is only ever evaluated on rows the grant lets through
//! and on values as masked: it cannot probe hidden rows (not even through errors such as a
//! division by zero) nor compare against unmasked values.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, AsArray, StringBuilder};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{Result as DfResult, ScalarValue};
use datafusion::datasource::{TableType, provider_as_source};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{
    ColumnarValue, Expr, LogicalPlan, LogicalPlanBuilder, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, Volatility, col,
};
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricBuilder, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PhysicalExpr, PlanProperties,
};
use datafusion::prelude::SessionContext;
use yunqi_datasets::Manifest;
use yunqi_types::{ColumnClass, Detected, Error, Grant, mask};

/// Masks text values of one detected kind (the masks of `yunqi_types::mask`).
#[derive(Debug, PartialEq, Eq, Hash)]
struct MaskUdf {
    name: String,
    kind: Option<Detected>,
    signature: Signature,
}

impl ScalarUDFImpl for MaskUdf {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let input = args.args[0].clone().into_array(args.number_rows)?;
        let text = cast(&input, &DataType::Utf8)?;
        let text = text.as_string::<i32>();
        let mut out = StringBuilder::with_capacity(text.len(), text.value_data().len());
        let mut buf = String::new();
        for v in text.iter() {
            match v {
                Some(v) => {
                    mask::by_kind_into(self.kind, v, &mut buf);
                    out.append_value(&buf);
                }
                None => out.append_null(),
            }
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

fn mask_udf(kind: Option<Detected>) -> Arc<ScalarUDF> {
    let name = match kind {
        Some(k) => format!(
            "mask_{}",
            serde_json::to_value(k)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        ),
        None => "mask".to_string(),
    };
    Arc::new(ScalarUDF::from(MaskUdf {
        name,
        kind,
        signature: Signature::string(1, Volatility::Immutable),
    }))
}

/// A dataset as one grant lets its holder see it.
#[derive(Debug)]
pub struct GrantedTable {
    grant: Grant,
    /// Files → row filter → granted columns, masked.
    plan: LogicalPlan,
    schema: SchemaRef,
    /// The same with the raw subject column appended as [`crate::subject::SUBJECT_COLUMN`],
    /// for recording whose rows a query returned (never registered for users).
    subject_plan: Option<LogicalPlan>,
}

impl GrantedTable {
    /// Builds the table over `raw` (the dataset's full table) for `grant`.
    pub fn new(
        ctx: &SessionContext,
        manifest: &Manifest,
        raw: Arc<dyn TableProvider>,
        grant: Grant,
    ) -> Result<GrantedTable, Error> {
        let name = manifest.sql_name();
        let internal = |e: datafusion::error::DataFusionError| {
            Error::internal(format!("cannot plan {name} under grant {}: {e}", grant.id))
        };
        let mut builder = LogicalPlanBuilder::scan(name.clone(), provider_as_source(raw), None)
            .map_err(internal)?;
        if let Some(rows) = &grant.rows {
            let expr = ctx.parse_sql_expr(rows, builder.schema()).map_err(|e| {
                Error::denied(format!(
                    "the row filter of grant {} on {name} no longer applies",
                    grant.id
                ))
                .detail(format!("{rows}: {}", e.strip_backtrace()))
                .hint(format!(
                    "ask department \"{}\" to revoke it and approve a new request",
                    grant.owner
                ))
            })?;
            builder = builder.filter(expr).map_err(internal)?;
        }
        let mut exprs: Vec<Expr> = Vec::new();
        for c in &manifest.columns {
            if !grant.columns.contains(&c.name) {
                continue;
            }
            let column = col(format!("\"{}\"", c.name));
            let masked = c.class >= ColumnClass::Personal && !grant.is_unmasked(&c.name);
            let expr = match (masked, c.column_type) {
                (false, _) => column,
                (true, yunqi_datasets::ColumnType::Text) => mask_udf(c.detected).call(vec![column]),
                // Masked values of other types are withheld whole.
                (true, t) => {
                    Expr::Literal(ScalarValue::try_from(&t.arrow()).map_err(internal)?, None)
                }
            };
            exprs.push(expr.alias(&c.name));
        }
        let subject_plan = match &manifest.subject {
            Some(s) => {
                let mut with = exprs.clone();
                with.push(col(format!("\"{s}\"")).alias(crate::subject::SUBJECT_COLUMN));
                Some(
                    builder
                        .clone()
                        .project(with)
                        .map_err(internal)?
                        .build()
                        .map_err(internal)?,
                )
            }
            None => None,
        };
        let plan = builder
            .project(exprs)
            .map_err(internal)?
            .build()
            .map_err(internal)?;
        let schema = Arc::new(plan.schema().as_arrow().clone());
        Ok(GrantedTable {
            grant,
            plan,
            schema,
            subject_plan,
        })
    }

    /// The table with the raw subject column appended, if the dataset has one.
    pub fn with_subject(&self) -> Option<GrantedTable> {
        let plan = self.subject_plan.clone()?;
        Some(GrantedTable {
            grant: self.grant.clone(),
            schema: Arc::new(plan.schema().as_arrow().clone()),
            plan,
            subject_plan: None,
        })
    }
}

#[async_trait]
impl TableProvider for GrantedTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let mut builder = LogicalPlanBuilder::from(self.plan.clone());
        if let Some(p) = projection {
            let fields = self.plan.schema().columns();
            builder = builder.project(p.iter().map(|&i| Expr::Column(fields[i].clone())))?;
        }
        let inner = state.create_physical_plan(&builder.build()?).await?;
        Ok(Arc::new(GrantBoundaryExec::new(
            inner,
            self.grant.dataset.clone(),
            self.grant.id.clone(),
        )))
    }
}

/// Passes its input's batches through unchanged and lets no optimisation cross it.
#[derive(Debug)]
pub struct GrantBoundaryExec {
    input: Arc<dyn ExecutionPlan>,
    dataset: String,
    grant: String,
    properties: Arc<PlanProperties>,
    /// Rows passed up (what the grant lets through, which its holder may count anyway), for
    /// `EXPLAIN ANALYZE`; nothing is measured below the boundary.
    metrics: ExecutionPlanMetricsSet,
}

impl GrantBoundaryExec {
    fn new(input: Arc<dyn ExecutionPlan>, dataset: String, grant: String) -> Self {
        let properties = input.properties().clone();
        GrantBoundaryExec {
            input,
            dataset,
            grant,
            properties,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// The dataset read under the grant, `department.dataset`.
    pub fn dataset(&self) -> &str {
        &self.dataset
    }

    /// The grant's id.
    pub fn grant(&self) -> &str {
        &self.grant
    }
}

impl DisplayAs for GrantBoundaryExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "GrantBoundaryExec: grant={}", self.grant)
    }
}

impl ExecutionPlan for GrantBoundaryExec {
    fn name(&self) -> &str {
        "GrantBoundaryExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let [input] = <[_; 1]>::try_from(children).map_err(|_| {
            datafusion::error::DataFusionError::Internal("GrantBoundaryExec has one child".into())
        })?;
        Ok(Arc::new(GrantBoundaryExec::new(
            input,
            self.dataset.clone(),
            self.grant.clone(),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        use futures::StreamExt;
        let input = self.input.execute(partition, context)?;
        let schema = input.schema();
        let rows = MetricBuilder::new(&self.metrics).output_rows(partition);
        let counted = input.map(move |b| {
            if let Ok(b) = &b {
                rows.add(b.num_rows());
            }
            b
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, counted)))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}
