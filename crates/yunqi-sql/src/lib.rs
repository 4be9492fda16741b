//! The SQL engine: Apache DataFusion, in a session built for one principal that holds only the
//! tables that principal may see, with only the rows it may see.
//!
//! Architecture invariant: a query can reach only what is registered in its session, and the
//! session is built from governance's answers for the calling principal. There is no shared
//! catalog a query could escape to. `information_schema` therefore lists only visible tables.
//!
//! Every query is audited (action `sql.query`, object the tables it read) before its result is
//! returned; a refused or failed query is audited with its outcome. Queries are read-only:
//! DDL, DML and session statements are refused by DataFusion's `SQLOptions`.
//!
//! Tables: `system.departments`, `system.principals` (ID numbers masked but for the principal
//! itself), `system.tokens` (never secrets), and `department.dataset` for every dataset the
//! principal may query: its own department's, and other departments' through the active grant
//! its department holds, enforced at the scan ([`secure`]).
//!
//! A query planned under a grant checks, before it runs, that the grant is still in force: a
//! grant revoked between `Parse` and `Execute` stops the query.
#![deny(missing_docs)]

pub mod convert;
pub mod explain;
mod pg_catalog;
pub mod secure;
pub mod subject;
mod system;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{DataFusionError, ParamValues, ScalarValue};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::{Cast, Expr, LogicalPlan, TryCast};
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use yunqi_governance::{Actor, CallContext, Governance};
use yunqi_types::{Error, ErrorCode, Limits, Outcome, suggest};

/// The catalog every session uses; SQL names are `schema.table` inside it.
pub const CATALOG: &str = "yunqi";

/// `department.dataset__v3` is version 3 of `department.dataset` (for its own department).
pub const VERSION_INFIX: &str = "__v";

/// A planned statement, ready to run (possibly after binding parameters).
#[derive(Debug, Clone)]
pub struct Planned {
    /// The SQL text.
    pub sql: String,
    /// The plan, built in the principal's session.
    pub plan: LogicalPlan,
    /// Tables the plan reads, `schema.table`.
    pub tables: Vec<String>,
    /// Columns the plan reads, `schema.table.column`.
    pub columns: Vec<String>,
    /// Grants the plan reads under.
    pub grants: Vec<yunqi_types::Grant>,
    /// The plan with the subject column carried as a last column ([`subject`]), when the
    /// query returns rows of a dataset with a subject column one for one.
    pub subject_plan: Option<LogicalPlan>,
    /// Set for `EXPLAIN [ANALYZE] [VERBOSE]`: yunqi renders the plan ([`explain`]).
    pub explain: Option<explain::ExplainKind>,
}

/// What a session holds besides its tables.
#[derive(Debug, Default)]
pub struct Registered {
    /// Grants, by table (`department.dataset`).
    pub grants: BTreeMap<String, yunqi_types::Grant>,
    /// Subject columns, by table.
    pub subjects: BTreeMap<String, String>,
}

impl Planned {
    /// The result's schema.
    pub fn schema(&self) -> SchemaRef {
        Arc::new(self.plan.schema().as_arrow().clone())
    }

    /// Types of the placeholders `$1`, `$2`, … in order; `None` where DataFusion cannot infer one.
    pub fn parameter_types(&self) -> Result<Vec<Option<DataType>>, Error> {
        let types = self
            .plan
            .get_parameter_types()
            .map_err(|e| map_error(e, &[]))?;
        let index = |name: &str, len: usize| {
            name.strip_prefix('$')
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|i| (1..=len).contains(i))
        };
        let mut out = vec![None; types.len()];
        for (name, t) in types {
            if let Some(i) = index(&name, out.len()) {
                out[i - 1] = t;
            }
        }
        // `$1::BIGINT`: DataFusion leaves the placeholder untyped; the cast says what it is.
        let _ = self.plan.apply_with_subqueries(|node| {
            node.apply_expressions(|expr| {
                expr.apply(|e| {
                        if let Expr::Cast(Cast { expr, field })
                        | Expr::TryCast(TryCast { expr, field }) = e
                            && let Expr::Placeholder(p) = expr.as_ref()
                            && let Some(i) = index(&p.id, out.len())
                            && out[i - 1].is_none()
                        {
                            out[i - 1] = Some(field.data_type().clone());
                        }
                        Ok(TreeNodeRecursion::Continue)
                    })
            })
        });
        Ok(out)
    }
}

/// What a statement is, before planning: most are queries; a few session statements that
/// PostgreSQL clients send on their own are accepted and change nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatementKind {
    /// A query, to plan and run.
    Query(String),
    /// `SET …`, `RESET …`, `DISCARD …`: acknowledged with this tag, no effect.
    Session(&'static str),
    /// `BEGIN` / `START TRANSACTION`: read-only queries need no transaction; acknowledged.
    Begin,
    /// `COMMIT`, `ROLLBACK`, `END`: acknowledged.
    End(&'static str),
}

/// A query's result.
#[derive(Debug, Clone)]
pub struct QueryResult {
    /// Column names and types.
    pub schema: SchemaRef,
    /// The rows.
    pub batches: Vec<RecordBatch>,
    /// Whether rows past `sql_result_rows_max` were left out.
    pub truncated: bool,
}

/// The engine. Cheap to share behind an `Arc`.
pub struct SqlEngine {
    gov: Arc<Governance>,
    limits: Limits,
    /// Rewrites what PostgreSQL clients send about their catalog (`::regclass`,
    /// `OPERATOR(pg_catalog.~)`, …) into SQL DataFusion plans.
    compat: datafusion_pg_catalog::sql::PostgresCompatibilityParser,
    /// pg_catalog's fixed tables (pg_type, pg_proc, …) for yunqi's sorted pg_catalog, read
    /// once (the library's set-up, which registers the catalog functions, still reads its own
    /// copy on each catalog query; only those queries pay for it).
    pg_static: std::sync::OnceLock<Arc<datafusion_pg_catalog::pg_catalog::PgCatalogStaticTables>>,
}

impl SqlEngine {
    /// An engine over what governance knows.
    pub fn new(gov: Arc<Governance>, limits: Limits) -> Self {
        SqlEngine {
            gov,
            limits,
            compat: datafusion_pg_catalog::sql::PostgresCompatibilityParser::new(),
            pg_static: std::sync::OnceLock::new(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Splits SQL text into statements and sorts them.
    pub fn split(&self, sql: &str) -> Result<Vec<StatementKind>, Error> {
        if sql.len() > self.limits.sql_text_bytes_max {
            return Err(Error::limit(
                "sql_text_bytes_max",
                self.limits.sql_text_bytes_max as u64,
                "SQL text is too long",
            )
            .hint("send a shorter statement"));
        }
        // PostgreSQL's own syntax first (with the rewrites of what clients send about their
        // catalog), then DataFusion's, whose error is the one to show.
        let statements: Vec<DfStatement> = match self.compat.parse(sql) {
            Ok(s) => s
                .into_iter()
                .map(|s| DfStatement::Statement(Box::new(s)))
                .collect(),
            Err(_) => datafusion::sql::parser::DFParser::parse_sql_with_dialect(
                sql,
                &PostgreSqlDialect {},
            )
            .map_err(|e| syntax_error(&e.to_string()))?
            .into_iter()
            .collect(),
        };
        Ok(statements
            .into_iter()
            .map(|s| {
                use datafusion::sql::sqlparser::ast::Statement as S;
                match s {
                    DfStatement::Statement(inner) => match inner.as_ref() {
                        S::Set(_) => StatementKind::Session("SET"),
                        S::Discard { .. } => StatementKind::Session("DISCARD ALL"),
                        S::StartTransaction { .. } => StatementKind::Begin,
                        S::Commit { .. } => StatementKind::End("COMMIT"),
                        S::Rollback { .. } => StatementKind::End("ROLLBACK"),
                        _ => StatementKind::Query(self.compat.rewrite(*inner).to_string()),
                    },
                    other => StatementKind::Query(other.to_string()),
                }
            })
            .collect())
    }

    /// A session holding what `actor` may see, and the grants it holds them under.
    fn session(&self, actor: &Actor) -> Result<(SessionContext, Registered), Error> {
        let config = SessionConfig::new()
            .with_default_catalog_and_schema(CATALOG, "system")
            .with_information_schema(true);
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(self.limits.query_memory_bytes_max, 1.0)
            .build_arc()
            .map_err(|e| Error::internal(format!("cannot set up the query runtime: {e}")))?;
        // In a cluster, shared datasets' files are read from object storage.
        if let Some((url, store)) = self.gov.dataset_store().object_store() {
            let url = datafusion::execution::object_store::ObjectStoreUrl::parse(&url)
                .map_err(|e| Error::internal(format!("object store URL: {e}")))?;
            runtime.register_object_store(url.as_ref(), store);
        }
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        system::register(&ctx, &self.gov, actor)?;
        let registered = system::register_datasets(&ctx, &self.gov, actor)?;
        Ok((ctx, registered))
    }

    /// Plans one query for `actor`. Refused and invalid queries are audited.
    pub async fn plan(
        &self,
        actor: &Actor,
        sql: &str,
        call: &CallContext,
    ) -> Result<Planned, Error> {
        let result = self.plan_inner(actor, sql).await;
        if let Err(e) = &result {
            let failed = Planned {
                sql: sql.to_string(),
                plan: LogicalPlan::EmptyRelation(datafusion::logical_expr::EmptyRelation {
                    produce_one_row: false,
                    schema: Arc::new(datafusion::common::DFSchema::empty()),
                }),
                tables: Vec::new(),
                columns: Vec::new(),
                grants: Vec::new(),
                subject_plan: None,
                explain: None,
            };
            self.audit(actor, &failed, outcome_of(e), &e.message, call)
                .await?;
        }
        result
    }

    async fn plan_inner(&self, actor: &Actor, sql: &str) -> Result<Planned, Error> {
        // In a cluster, the session is built from the grants stored now, not those this node
        // had loaded when another node's approval was answered.
        self.gov.catch_up_now().await?;
        let (ctx, registered) = self.session(actor)?;
        let visible = visible_tables(&ctx);
        let state = ctx.state();
        let statement = state
            .sql_to_statement(sql, &datafusion::config::Dialect::PostgreSQL)
            .map_err(|e| map_error(e, &visible))?;
        if let Ok(references) = state.resolve_table_references(&statement) {
            system::register_versions(&ctx, &self.gov, actor, &references)?;
            // pg_catalog, for psql's \d and BI tools, built from this session's own catalog:
            // it lists only what the principal may see. Set up only when a query asks.
            if references.iter().any(|r| {
                r.schema() == Some("pg_catalog")
                    || (r.schema().is_none() && r.table().starts_with("pg_"))
            }) {
                let static_tables = match self.pg_static.get() {
                    Some(t) => t.clone(),
                    None => {
                        let t = Arc::new(
                            datafusion_pg_catalog::pg_catalog::PgCatalogStaticTables::try_new()
                                .map_err(|e| {
                                    Error::internal(format!("cannot read pg_catalog tables: {e}"))
                                })?,
                        );
                        self.pg_static.get_or_init(|| t).clone()
                    }
                };
                pg_catalog::install(&ctx, CATALOG, &static_tables).await?;
            }
        }
        let state = ctx.state();
        let plan = state
            .statement_to_plan(statement)
            .await
            .map_err(|e| map_error(e, &visible))?;
        SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false)
            .verify_plan(&plan)
            .map_err(|e| {
                Error::new(ErrorCode::PermissionDenied, "only queries may run here")
                    .detail(e.strip_backtrace().to_string())
                    .hint("yunqi SQL reads data; it does not create, change or drop tables")
            })?;
        let mut tables = Vec::new();
        let _ = plan.apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(scan) = node {
                tables.push(scan.table_name.to_string());
            }
            Ok(TreeNodeRecursion::Continue)
        });
        tables.sort();
        tables.dedup();
        let mut columns = Vec::new();
        let _ = plan.apply_with_subqueries(|node| {
            node.apply_expressions(|expr| {
                for c in expr.column_refs() {
                    if let Some(r) = &c.relation {
                        let table = format!("{}.{}", r.schema().unwrap_or("system"), r.table());
                        if tables.contains(&table) {
                            columns.push(format!("{table}.{}", c.name));
                        }
                    }
                }
                Ok(TreeNodeRecursion::Continue)
            })
        });
        columns.sort();
        columns.dedup();
        let grants = tables
            .iter()
            .filter_map(|t| registered.grants.get(t).cloned())
            .collect();
        let explain = explain::ExplainKind::of(&plan).map(|(k, _)| k);
        let subject_plan = match explain {
            Some(_) => None,
            None => subject::augment(&plan, &registered.subjects),
        };
        Ok(Planned {
            sql: sql.to_string(),
            plan,
            tables,
            columns,
            grants,
            subject_plan,
            explain,
        })
    }

    /// Runs a planned query with parameter values, audits it, and returns at most `rows_max`
    /// rows (`None`: all).
    pub async fn execute(
        &self,
        actor: &Actor,
        planned: &Planned,
        params: Vec<ScalarValue>,
        rows_max: Option<usize>,
        call: &CallContext,
    ) -> Result<QueryResult, Error> {
        let started = std::time::Instant::now();
        let result = self.execute_inner(actor, planned, params, rows_max).await;
        let ms = started.elapsed().as_millis();
        let (outcome, detail) = match &result {
            Ok((r, subjects)) => (
                Outcome::Ok,
                format!(
                    "{} rows{} in {ms} ms{}",
                    r.batches.iter().map(RecordBatch::num_rows).sum::<usize>(),
                    if r.truncated { ", truncated" } else { "" },
                    subjects
                ),
            ),
            Err(e) => (outcome_of(e), format!("{} after {ms} ms", e.message)),
        };
        self.audit(actor, planned, outcome, &detail, call).await?;
        result.map(|(r, _)| r)
    }

    /// Runs a planned query in full for an in-memory index (a service's lookup table), with
    /// each row's subject key (`None` where the dataset names no subject column or the row has
    /// none), so that every later use of a row can be audited with its subject. Audited once,
    /// as one query.
    pub async fn execute_indexed(
        &self,
        actor: &Actor,
        planned: &Planned,
        call: &CallContext,
    ) -> Result<(QueryResult, Vec<Option<String>>), Error> {
        let started = std::time::Instant::now();
        let result = self.execute_rows(actor, planned, Vec::new()).await;
        let ms = started.elapsed().as_millis();
        let result = result.and_then(|(r, plan_has_subject)| {
            if !plan_has_subject {
                let n = r.batches.iter().map(RecordBatch::num_rows).sum();
                return Ok((r, vec![None; n]));
            }
            let (batches, keys) = self.split_subjects(r.batches)?;
            Ok((
                QueryResult {
                    schema: r.schema,
                    batches,
                    truncated: false,
                },
                keys,
            ))
        });
        let (outcome, detail) = match &result {
            Ok((r, _)) => (
                Outcome::Ok,
                format!(
                    "{} rows in {ms} ms, indexed for lookups (each use is audited with its decision)",
                    r.batches.iter().map(RecordBatch::num_rows).sum::<usize>()
                ),
            ),
            Err(e) => (outcome_of(e), format!("{} after {ms} ms", e.message)),
        };
        self.audit(actor, planned, outcome, &detail, call).await?;
        result
    }

    /// Takes the carried subject column off, returning each row's subject key.
    fn split_subjects(
        &self,
        batches: Vec<RecordBatch>,
    ) -> Result<(Vec<RecordBatch>, Vec<Option<String>>), Error> {
        use datafusion::arrow::array::{Array, AsArray};
        let mut keys = Vec::new();
        let mut out = Vec::with_capacity(batches.len());
        for b in batches {
            let last = b.num_columns() - 1;
            let text = datafusion::arrow::compute::cast(b.column(last), &DataType::Utf8)
                .map_err(|e| Error::internal(format!("subject column: {e}")))?;
            let text = text.as_string::<i32>();
            keys.extend(
                (0..text.len()).map(|i| {
                    (!text.is_null(i)).then(|| yunqi_governance::subject_key(text.value(i)))
                }),
            );
            let keep: Vec<usize> = (0..last).collect();
            out.push(
                b.project(&keep)
                    .map_err(|e| Error::internal(format!("subject column: {e}")))?,
            );
        }
        Ok((out, keys))
    }

    /// Runs a plan (with its subject column carried, when it has one): the rows, and whether
    /// the subject column is their last.
    async fn execute_rows(
        &self,
        actor: &Actor,
        planned: &Planned,
        params: Vec<ScalarValue>,
    ) -> Result<(QueryResult, bool), Error> {
        // The plan holds what the grants allowed when it was made: they must still hold.
        for g in &planned.grants {
            self.gov.grant_in_force(actor, &g.id)?;
        }
        let (ctx, _) = self.session(actor)?;
        let mut plan = planned
            .subject_plan
            .clone()
            .unwrap_or_else(|| planned.plan.clone());
        if !params.is_empty() {
            plan = plan
                .with_param_values(ParamValues::List(
                    params.into_iter().map(Into::into).collect(),
                ))
                .map_err(|e| map_error(e, &[]))?;
        }
        let schema = planned.schema();
        let timeout = Duration::from_millis(self.limits.query_timeout_ms);
        let run = async {
            if let Some(kind) = planned.explain {
                return explain_rows(&ctx, &plan, kind, &schema).await;
            }
            let df = ctx
                .execute_logical_plan(plan)
                .await
                .map_err(|e| map_error(e, &[]))?;
            df.collect().await.map_err(|e| map_error(e, &[]))
        };
        let batches = match tokio::time::timeout(timeout, run).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(Error::limit(
                    "query_timeout_ms",
                    self.limits.query_timeout_ms,
                    "query took too long",
                )
                .hint("narrow the query with WHERE or LIMIT"));
            }
        };
        Ok((
            QueryResult {
                schema,
                batches,
                truncated: false,
            },
            planned.subject_plan.is_some(),
        ))
    }

    async fn execute_inner(
        &self,
        actor: &Actor,
        planned: &Planned,
        params: Vec<ScalarValue>,
        rows_max: Option<usize>,
    ) -> Result<(QueryResult, String), Error> {
        let (
            QueryResult {
                schema, batches, ..
            },
            _,
        ) = self.execute_rows(actor, planned, params).await?;
        let (batches, truncated) = match rows_max {
            Some(max) => truncate(batches, max),
            None => (batches, false),
        };
        let (batches, subjects) = if planned.subject_plan.is_some() {
            self.take_subjects(batches)?
        } else {
            (batches, String::new())
        };
        Ok((
            QueryResult {
                schema,
                batches,
                truncated,
            },
            subjects,
        ))
    }

    /// Takes the carried subject column off the result; returns the audit detail part naming
    /// the subjects' keys (`; subjects k1 k2`), or saying why they were not recorded.
    fn take_subjects(
        &self,
        batches: Vec<RecordBatch>,
    ) -> Result<(Vec<RecordBatch>, String), Error> {
        use datafusion::arrow::array::AsArray;
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let max = self.limits.subject_rows_max;
        let mut keys = std::collections::BTreeSet::new();
        let mut out = Vec::with_capacity(batches.len());
        for b in batches {
            let last = b.num_columns() - 1;
            if rows <= max {
                let text = datafusion::arrow::compute::cast(b.column(last), &DataType::Utf8)
                    .map_err(|e| Error::internal(format!("subject column: {e}")))?;
                for v in text.as_string::<i32>().iter().flatten() {
                    keys.insert(yunqi_governance::subject_key(v));
                }
            }
            let keep: Vec<usize> = (0..last).collect();
            out.push(
                b.project(&keep)
                    .map_err(|e| Error::internal(format!("subject column: {e}")))?,
            );
        }
        let note = if rows > max {
            format!("; subjects not recorded (more than subject_rows_max = {max} rows)")
        } else if keys.is_empty() {
            String::new()
        } else {
            format!(
                "; subjects {}",
                keys.into_iter().collect::<Vec<_>>().join(" ")
            )
        };
        Ok((out, note))
    }

    /// Plans and runs one SQL text of one query, for the HTTP API.
    pub async fn query(
        &self,
        actor: &Actor,
        sql: &str,
        call: &CallContext,
    ) -> Result<QueryResult, Error> {
        let statements = self.split(sql)?;
        let query = match statements.as_slice() {
            [StatementKind::Query(q)] => q.clone(),
            [] => {
                return Err(Error::invalid("the SQL text is empty")
                    .hint("send a query, e.g. SELECT * FROM system.departments"));
            }
            [_] => {
                return Err(Error::invalid("only queries may run over HTTP")
                    .hint("send a SELECT; session statements (SET, BEGIN) have no effect here"));
            }
            _ => {
                return Err(Error::invalid(format!(
                    "the SQL text holds {} statements",
                    statements.len()
                ))
                .hint("send one query per request"));
            }
        };
        let planned = self.plan(actor, &query, call).await?;
        self.execute(
            actor,
            &planned,
            Vec::new(),
            Some(self.limits.sql_result_rows_max),
            call,
        )
        .await
    }

    /// Derives a dataset of `actor`'s department from a query: the result becomes the
    /// dataset's next version (replacing the rows it had; the dataset is created if needed) and
    /// the query and the datasets it read are recorded as its lineage. The query runs as `actor`
    /// and may read only the department's own datasets: a grant lets a department read another's
    /// data, not keep a copy of it.
    pub async fn derive(
        &self,
        actor: &Actor,
        department: &str,
        name: &str,
        sql: &str,
        call: &CallContext,
    ) -> Result<yunqi_datasets::Manifest, Error> {
        self.gov
            .check_dataset_write(actor, department, name, call)
            .await?;
        let query = match self.split(sql)?.as_slice() {
            [StatementKind::Query(q)] => q.clone(),
            _ => {
                return Err(Error::invalid("a derivation is one query")
                    .hint("give a single SELECT whose result becomes the dataset"));
            }
        };
        let planned = self.plan(actor, &query, call).await?;
        if let Some(g) = planned.grants.first() {
            let e = Error::denied(format!(
                "{} is read under grant {}, which does not allow keeping a copy",
                g.dataset, g.id
            ))
            .hint("derive datasets from your own department's datasets; query granted ones where they are");
            self.audit(actor, &planned, Outcome::Denied, &e.message, call)
                .await?;
            return Err(e);
        }
        let result = self
            .execute(actor, &planned, Vec::new(), None, call)
            .await?;
        let bytes = convert::to_parquet(&result.schema, &result.batches)?;
        if self.gov.catalog_entry(actor, department, name).is_err() {
            let spec = yunqi_datasets::DatasetSpec {
                on_node: false,
                department: yunqi_types::Name::parse("department", department)?,
                name: yunqi_types::Name::parse("dataset", name)?,
                description: format!(
                    "derived by SQL: {}",
                    query.chars().take(200).collect::<String>()
                ),
                columns: vec![],
                subject: None,
                tags: vec![],
            };
            self.gov.create_dataset(actor, spec, call).await?;
        }
        let options = yunqi_datasets::ImportOptions {
            mode: yunqi_datasets::Mode::Replace,
            format: Some(yunqi_datasets::Format::Parquet),
            ..Default::default()
        };
        let report = self
            .gov
            .import_dataset(actor, department, name, bytes, options, call)
            .await?;
        let sources = planned
            .tables
            .iter()
            .filter(|t| !t.starts_with("system.") && !t.starts_with("information_schema."))
            .cloned()
            .collect();
        self.gov
            .record_derivation(
                actor,
                department,
                name,
                yunqi_datasets::Derivation {
                    sql: query,
                    sources,
                    version: report.version,
                    by: actor.principal.name.to_string(),
                    at: self.gov.now(),
                },
                call,
            )
            .await
    }

    async fn audit(
        &self,
        actor: &Actor,
        planned: &Planned,
        outcome: Outcome,
        detail: &str,
        call: &CallContext,
    ) -> Result<(), Error> {
        let object = if planned.tables.is_empty() {
            "sql".to_string()
        } else {
            format!("table:{}", planned.tables.join(","))
        };
        let sql = &planned.sql;
        let mut text: String = sql.chars().take(512).collect();
        if text.len() < sql.len() {
            text.push('…');
        }
        let mut detail = detail.to_string();
        if !planned.columns.is_empty() {
            detail.push_str(&format!("; columns {}", planned.columns.join(",")));
        }
        if !planned.grants.is_empty() {
            let ids: Vec<&str> = planned.grants.iter().map(|g| g.id.as_str()).collect();
            detail.push_str(&format!("; grants {}", ids.join(",")));
        }
        let purpose = planned
            .grants
            .iter()
            .map(|g| format!("{}: {}", g.id, g.purpose))
            .collect::<Vec<_>>()
            .join("; ");
        self.gov
            .record_query(
                actor,
                &object,
                outcome,
                purpose,
                format!("{detail}: {text}"),
                call,
            )
            .await
    }
}

/// Plans (and for `ANALYZE` runs) the statement an `EXPLAIN` explains, and renders it with
/// yunqi's own displayer: plan shapes and operators, never files, paths or statistics.
async fn explain_rows(
    ctx: &SessionContext,
    plan: &LogicalPlan,
    kind: explain::ExplainKind,
    schema: &SchemaRef,
) -> Result<Vec<RecordBatch>, Error> {
    let (_, inner) = explain::ExplainKind::of(plan)
        .ok_or_else(|| Error::internal("an EXPLAIN plan lost its statement"))?;
    let state = ctx.state();
    let files = explain::dataset_files(inner);
    let optimized = state.optimize(inner).map_err(|e| map_error(e, &[]))?;
    let physical = state
        .create_physical_plan(inner)
        .await
        .map_err(|e| map_error(e, &[]))?;
    let mut rows = Vec::new();
    if kind.verbose {
        rows.push(("initial_logical_plan", explain::logical(inner)));
    }
    rows.push(("logical_plan", explain::logical(&optimized)));
    if kind.analyze {
        datafusion::physical_plan::collect(physical.clone(), ctx.task_ctx())
            .await
            .map_err(|e| map_error(e, &[]))?;
        rows.push((
            "plan_with_metrics",
            explain::physical(&physical, kind, &files),
        ));
    } else {
        rows.push(("physical_plan", explain::physical(&physical, kind, &files)));
    }
    Ok(vec![
        explain::rows(schema, rows).map_err(|e| Error::internal(format!("EXPLAIN: {e}")))?,
    ])
}

fn outcome_of(e: &Error) -> Outcome {
    match e.code {
        ErrorCode::PermissionDenied | ErrorCode::Unauthenticated => Outcome::Denied,
        _ => Outcome::Failed,
    }
}

fn truncate(batches: Vec<RecordBatch>, max: usize) -> (Vec<RecordBatch>, bool) {
    let mut out = Vec::new();
    let mut left = max;
    let mut truncated = false;
    for b in batches {
        if left == 0 {
            truncated |= b.num_rows() > 0;
            continue;
        }
        if b.num_rows() > left {
            out.push(b.slice(0, left));
            left = 0;
            truncated = true;
        } else {
            left -= b.num_rows();
            out.push(b);
        }
    }
    (out, truncated)
}

/// `schema.table` of every table registered in a session.
fn visible_tables(ctx: &SessionContext) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(catalog) = ctx.catalog(CATALOG) {
        for schema in catalog.schema_names() {
            if schema == "information_schema" {
                continue;
            }
            if let Some(s) = catalog.schema(&schema) {
                out.extend(s.table_names().into_iter().map(|t| format!("{schema}.{t}")));
            }
        }
    }
    out.sort();
    out
}

fn syntax_error(message: &str) -> Error {
    Error::invalid(format!("syntax error: {}", message.trim_start_matches("sql parser error: ")))
        .hint("yunqi speaks PostgreSQL-flavoured SQL (Apache DataFusion); check the statement near the position given")
}

/// Whether a DataFusion error comes from reading stored files (object store, Parquet, IO):
/// such errors name the files' paths in the data directory, which nobody querying may see.
fn is_storage_error(e: &DataFusionError) -> bool {
    use datafusion::arrow::error::ArrowError;
    match e {
        DataFusionError::ObjectStore(_)
        | DataFusionError::ParquetError(_)
        | DataFusionError::IoError(_)
        | DataFusionError::External(_) => true,
        DataFusionError::ArrowError(a, _) => matches!(
            a.as_ref(),
            ArrowError::IoError(..) | ArrowError::ExternalError(_) | ArrowError::ParquetError(_)
        ),
        _ => false,
    }
}

/// Turns a DataFusion error into an error people can act on. Errors from reading stored files
/// are replaced whole by one that names no path (the original goes to the server's log), and
/// any other message is cleared of path-like words ([`scrub_paths`]).
pub fn map_error(e: DataFusionError, visible: &[String]) -> Error {
    let mut out = map_error_inner(e, visible);
    out.message = scrub_paths(&out.message);
    out.detail = out.detail.as_deref().map(scrub_paths);
    out
}

/// Replaces every word that looks like a file system path or a file URL (`/a/b`, `a/b/c.parquet`,
/// `file:///…`) by `<path>`: a second line of defence behind the structural handling of
/// storage errors and plans.
pub fn scrub_paths(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        let core = word.trim_matches(|c: char| "[]()'\",;:{}`<>".contains(c));
        let slashes = core.matches('/').count();
        let pathlike = core.contains("://")
            || (core.starts_with('/') && slashes >= 2)
            || slashes >= 2 && (core.ends_with(".parquet") || core.contains("/data/"))
            || core.contains(".parquet") && slashes >= 1;
        if pathlike && !core.is_empty() {
            out.push_str(&word.replace(core, "<path>"));
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in text.chars() {
        if c.is_whitespace() {
            flush(&mut word, &mut out);
            out.push(c);
        } else {
            word.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

fn map_error_inner(e: DataFusionError, visible: &[String]) -> Error {
    // A cluster's object store that does not answer: the data is there, the store is not.
    if let DataFusionError::ObjectStore(o) = e.find_root()
        && !matches!(o.as_ref(), datafusion::object_store::Error::NotFound { .. })
    {
        tracing::warn!(error = %o, "a query could not reach the object store");
        return Error::unavailable("the object store (S3) cannot be reached")
            .detail("the query stopped while reading; nothing was changed")
            .hint("retry in a few seconds, once the object store answers again");
    }
    if is_storage_error(e.find_root()) {
        let root = e.find_root().strip_backtrace();
        tracing::warn!(error = %root, "a query could not read stored data");
        return Error::internal("the query could not read a dataset's stored data")
            .detail("the query stopped while reading; nothing was changed")
            .hint("try again; if it keeps failing, tell the platform's operators the request id");
    }
    let root = e.find_root().strip_backtrace();
    match e.find_root() {
        DataFusionError::SQL(..) => syntax_error(&root),
        DataFusionError::ResourcesExhausted(_) => {
            Error::new(ErrorCode::LimitExceeded, "query needs more memory than it may use")
                .detail(root)
                .hint("aggregate or filter more, or ask for fewer columns; the limit is query_memory_bytes_max")
        }
        DataFusionError::Plan(msg) if msg.starts_with("table '") && msg.ends_with("' not found") => {
            let full = &msg["table '".len()..msg.len() - "' not found".len()];
            let name = full.strip_prefix("yunqi.").unwrap_or(full);
            let e = Error::not_found("table", name);
            match suggest::did_you_mean(name, visible.iter().map(String::as_str)) {
                Some(s) => e.hint(format!("did you mean \"{s}\"?")),
                None => e.hint("tables you may read: SELECT table_schema, table_name FROM information_schema.tables"),
            }
        }
        DataFusionError::Plan(_) | DataFusionError::SchemaError(..) | DataFusionError::Execution(_) | DataFusionError::ArrowError(..) => {
            Error::invalid(root).hint("check the names and types in the query")
        }
        DataFusionError::NotImplemented(_) => {
            Error::invalid(format!("not supported: {root}")).hint("rewrite the query without this construct")
        }
        _ => Error::internal(format!("query failed: {root}")),
    }
}

#[cfg(test)]
mod tests {
    use super::scrub_paths;

    #[test]
    fn scrub_paths_removes_paths_and_keeps_words() {
        assert_eq!(
            scrub_paths("cannot read /srv/yunqi/datasets/a/b/data/v1.parquet: eof"),
            "cannot read <path>: eof"
        );
        assert_eq!(
            scrub_paths("object at srv/yunqi/datasets/a/b/data/v1-ab.parquet (42)"),
            "object at <path> (42)"
        );
        assert_eq!(scrub_paths("url 'file:///x/y'"), "url '<path>'");
        assert_eq!(
            scrub_paths("column \"a/b\" of 1/2 does not exist"),
            "column \"a/b\" of 1/2 does not exist"
        );
    }
}
