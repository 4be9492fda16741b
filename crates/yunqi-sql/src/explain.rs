//! `EXPLAIN` as a principal may see it. DataFusion's own explain output names the Parquet files
//! of a scan (their paths in the data directory, file ids, how they are grouped), the pruning
//! predicates and column statistics (minimum and maximum values), and, under a grant, the
//! grant's row filter and masks below the boundary. yunqi therefore never lets DataFusion
//! render a plan for a principal: `EXPLAIN`, `EXPLAIN VERBOSE` and `EXPLAIN ANALYZE` are
//! planned by yunqi and rendered here, node by node.
//!
//! Guarantees: a scan of a dataset is rendered as `DatasetScan: dataset=<department.dataset>,
//! columns=[…]` (with the query's own pushed-down predicate and limit), never with files,
//! paths or statistics; everything below a grant boundary collapses into one `GrantedScan`
//! node naming the dataset, the grant and the columns it shows, so neither the grant's row
//! filter and masks nor the row counts and timings of what the grant hides are shown. Other
//! operators are shown with their own expressions (which come from the query), and partition
//! counts are left out (they follow the number of files and of cores).

use std::collections::BTreeMap;
use std::fmt::{self, Write};
use std::sync::Arc;

use datafusion::arrow::array::{RecordBatch, StringArray};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::memory::MemorySourceConfig;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::listing::ListingTable;
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::source_as_provider;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::{DisplayFormatType, ExecutionPlan, Partitioning};

use crate::secure::GrantBoundaryExec;

/// Which `EXPLAIN` a statement asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExplainKind {
    /// `VERBOSE`: the unoptimised plan too, and each operator's output columns.
    pub verbose: bool,
    /// `ANALYZE`: the query runs; each operator shows the rows it produced and its time.
    pub analyze: bool,
}

impl ExplainKind {
    /// The kind of an `EXPLAIN` plan and the plan it explains; `None` for other plans.
    pub fn of(plan: &LogicalPlan) -> Option<(ExplainKind, &LogicalPlan)> {
        match plan {
            LogicalPlan::Explain(e) => Some((
                ExplainKind {
                    verbose: e.verbose,
                    analyze: false,
                },
                e.plan.as_ref(),
            )),
            LogicalPlan::Analyze(a) => Some((
                ExplainKind {
                    verbose: a.verbose,
                    analyze: true,
                },
                a.input.as_ref(),
            )),
            _ => None,
        }
    }
}

/// Dataset names by the object-store location of their files, read from the plan's own table
/// scans: how a file scan is named without showing its files.
pub fn dataset_files(plan: &LogicalPlan) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && let Ok(provider) = source_as_provider(&scan.source)
            && let Some(listing) =
                (provider.as_ref() as &dyn std::any::Any).downcast_ref::<ListingTable>()
        {
            for url in listing.table_paths() {
                out.insert(url.prefix().to_string(), scan.table_name.to_string());
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    out
}

/// Renders a logical plan: DataFusion's indented form, which names tables by their SQL names
/// and shows the query's own expressions (a granted table is one scan: its row filter and
/// masks are inside the table, not in the plan).
pub fn logical(plan: &LogicalPlan) -> String {
    plan.display_indent().to_string()
}

/// Renders a physical plan for a principal (see the module documentation).
pub fn physical(
    plan: &Arc<dyn ExecutionPlan>,
    kind: ExplainKind,
    files: &BTreeMap<String, String>,
) -> String {
    let mut out = String::new();
    node(plan.as_ref(), 0, kind, files, &mut out);
    out.truncate(out.trim_end().len());
    out
}

/// The result rows of an `EXPLAIN`: `(plan_type, plan)`, in the statement's schema.
pub fn rows(schema: &SchemaRef, rows: Vec<(&str, String)>) -> Result<RecordBatch, String> {
    let (types, plans): (Vec<&str>, Vec<String>) = rows.into_iter().unzip();
    RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(types)),
            Arc::new(StringArray::from(plans)),
        ],
    )
    .map_err(|e| e.to_string())
}

fn node(
    plan: &dyn ExecutionPlan,
    depth: usize,
    kind: ExplainKind,
    files: &BTreeMap<String, String>,
    out: &mut String,
) {
    for _ in 0..depth {
        out.push_str("  ");
    }
    let columns = || {
        plan.schema()
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut descend = true;
    if let Some(b) = plan.downcast_ref::<GrantBoundaryExec>() {
        let _ = write!(
            out,
            "GrantedScan: dataset={}, grant={}, columns=[{}]",
            b.dataset(),
            b.grant(),
            columns()
        );
        descend = false;
    } else if let Some(ds) = plan.downcast_ref::<DataSourceExec>() {
        let source = ds.data_source();
        if let Some(scan) = source.downcast_ref::<FileScanConfig>() {
            let dataset = scan
                .file_groups
                .iter()
                .flat_map(|g| g.files())
                .find_map(|f| files.get(f.object_meta.location.as_ref()))
                .map_or("(unnamed)", String::as_str);
            let _ = write!(
                out,
                "DatasetScan: dataset={dataset}, columns=[{}]",
                columns()
            );
            if let Some(p) = scan.file_source().filter() {
                let _ = write!(out, ", predicate={p}");
            }
            if let Some(l) = scan.limit {
                let _ = write!(out, ", limit={l}");
            }
        } else if source.downcast_ref::<MemorySourceConfig>().is_some() {
            let _ = write!(out, "MemoryScan: columns=[{}]", columns());
        } else {
            let _ = write!(out, "DataSourceExec: columns=[{}]", columns());
        }
    } else if let Some(r) = plan.downcast_ref::<RepartitionExec>() {
        let partitioning = match r.partitioning() {
            Partitioning::RoundRobinBatch(_) => "RoundRobinBatch".to_string(),
            Partitioning::Hash(exprs, _) => format!(
                "Hash([{}])",
                exprs
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Partitioning::Range(_) => "Range".to_string(),
            Partitioning::UnknownPartitioning(_) => "Unknown".to_string(),
        };
        let _ = write!(out, "RepartitionExec: partitioning={partitioning}");
    } else {
        let _ = write!(out, "{}", Own(plan));
    }
    if kind.verbose {
        let _ = write!(out, ", schema=[{}]", columns());
    }
    if kind.analyze
        && let Some(m) = plan.metrics()
    {
        let m = m.aggregate_by_name();
        let rows = m.output_rows();
        let compute = m.elapsed_compute();
        if rows.is_some() || compute.is_some() {
            out.push_str(", metrics=[");
            if let Some(r) = rows {
                let _ = write!(out, "output_rows={r}");
            }
            if let Some(ns) = compute {
                if rows.is_some() {
                    out.push_str(", ");
                }
                let _ = write!(out, "elapsed_compute={:.3}ms", ns as f64 / 1e6);
            }
            out.push(']');
        }
    }
    out.push('\n');
    if descend {
        for child in plan.children() {
            node(child.as_ref(), depth + 1, kind, files, out);
        }
    }
}

/// An operator in its own words, on one line.
struct Own<'a>(&'a dyn ExecutionPlan);

impl fmt::Display for Own<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt_as(DisplayFormatType::Default, f)
    }
}
