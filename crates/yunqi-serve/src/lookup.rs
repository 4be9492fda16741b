//! Lookups, fast: a lookup the city runs thousands of times a second is read from memory, not
//! planned and run in SQL for every application.
//!
//! - `SELECT columns FROM dataset WHERE column = :input` (one table, one equality on one
//!   parameter) is *keyed*: the dataset is read once, in SQL, as the service's department —
//!   the same grant, row filter, columns and masks — into an index by that column;
//! - a lookup without parameters (the latest window of a view) is *constant*: its one row is
//!   read once;
//! - anything else is planned and run per application.
//!
//! An index is as fresh as the data: before each use it checks that every dataset it read is
//! still at the version it was built from and that every grant it read under is still in force;
//! if not, it is rebuilt (a revoked grant makes the rebuild, and so the application, fail as
//! the query would). Building is one audited query; each use is audited with the decision it
//! serves — the datasets, the grants and their purposes, and the subject of the row used — so
//! the audit chain and a citizen's "who accessed my data" see every use.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use datafusion::logical_expr::{BinaryExpr, Expr, LogicalPlan, Operator};
use datafusion::scalar::ScalarValue;
use yunqi_governance::{Actor, CallContext, Governance};
use yunqi_sql::{Planned, SqlEngine};
use yunqi_types::Error;

use crate::decider::Row;
use crate::definition::Lookup;
use crate::rules::Value;

/// Largest dataset a lookup is indexed from; larger ones are queried per application.
pub const INDEX_ROWS_MAX: u64 = 2_000_000;

/// Where a looked-up row came from, for the explanation and the audit.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Source {
    /// Datasets read, `department.name`.
    pub datasets: Vec<String>,
    /// Grants read under: `id: purpose`.
    pub grants: Vec<String>,
    /// The subject key of the row used, when its dataset names a subject column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// How a lookup is answered.
#[derive(Debug, Clone, PartialEq)]
enum Shape {
    /// Indexed by a column of one dataset; the SQL that reads the whole index.
    Keyed { index_sql: String },
    /// One row, read once per version.
    Constant,
    /// Planned and run per application.
    Query,
}

/// The shape of a planned lookup.
fn shape(planned: &Planned, lookup: &Lookup) -> Shape {
    if lookup.params.is_empty() {
        return Shape::Constant;
    }
    if lookup.params.len() != 1 {
        return Shape::Query;
    }
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let LogicalPlan::Projection(p) = &planned.plan else {
        return Shape::Query;
    };
    let LogicalPlan::Filter(f) = p.input.as_ref() else {
        return Shape::Query;
    };
    let LogicalPlan::TableScan(scan) = f.input.as_ref() else {
        return Shape::Query;
    };
    if !scan.filters.is_empty() || scan.fetch.is_some() {
        return Shape::Query;
    }
    let key = match &f.predicate {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Eq,
            right,
        }) => match (left.as_ref(), right.as_ref()) {
            (Expr::Column(c), Expr::Placeholder(ph)) | (Expr::Placeholder(ph), Expr::Column(c))
                if ph.id == "$1" =>
            {
                c.name.clone()
            }
            _ => return Shape::Query,
        },
        _ => return Shape::Query,
    };
    let mut columns = Vec::new();
    for e in &p.expr {
        match e {
            Expr::Column(c) => columns.push(quote(&c.name)),
            _ => return Shape::Query,
        }
    }
    let table = scan.table_name.to_string();
    let parts: Vec<&str> = table.split('.').collect();
    let [.., schema, name] = parts.as_slice() else {
        return Shape::Query;
    };
    Shape::Keyed {
        index_sql: format!(
            "SELECT {}, {} AS \"__yunqi_key\" FROM {}.{}",
            columns.join(", "),
            quote(&key),
            quote(schema),
            quote(name)
        ),
    }
}

/// Rows by key: the row's values and its subject key.
type Rows = HashMap<Box<str>, (Box<[Value]>, Option<Box<str>>)>;

/// A lookup's index, as built.
struct Built {
    /// Each dataset read and where it stood (version, classes, subject column).
    versions: Vec<(String, yunqi_datasets::Latest)>,
    grants: Vec<String>,
    source: Source,
    columns: Arc<[String]>,
    /// Keyed: rows by key; constant: the one row under "".
    rows: Rows,
}

/// One lookup's cache.
#[derive(Default)]
struct Slot {
    built: RwLock<Option<Arc<Built>>>,
    building: tokio::sync::Mutex<()>,
    /// The lookup is not indexable (its shape, or a source too large or not a dataset): it is
    /// planned and run per application.
    query_only: std::sync::atomic::AtomicBool,
}

/// The lookups of a server's services.
#[derive(Default)]
pub struct Lookups {
    /// By service, lookup name and SQL (a new definition's lookup is a new slot).
    slots: RwLock<HashMap<(String, String, String), Arc<Slot>>>,
}

/// A looked-up row and where it came from.
pub struct Found {
    /// The row (`None`: not found).
    pub row: Option<Row>,
    /// Its source.
    pub source: Source,
}

fn grants_of(planned: &Planned) -> Vec<String> {
    planned
        .grants
        .iter()
        .map(|g| format!("{}: {}", g.id, g.purpose))
        .collect()
}

impl Lookups {
    /// Forgets a service's indexes (its definition changed).
    pub fn forget(&self, service: &str) {
        self.slots
            .write()
            .expect("slots lock")
            .retain(|(s, _, _), _| s != service);
    }

    /// Runs `lookup` of `service` for `params` (its inputs' values, in order), as `actor`.
    #[allow(clippy::too_many_arguments)]
    pub async fn get(
        &self,
        gov: &Governance,
        sql: &SqlEngine,
        actor: &Actor,
        service: &str,
        lookup: &Lookup,
        params: &[Value],
        ctx: &CallContext,
    ) -> Result<Found, Error> {
        let slot = {
            let key = (
                service.to_string(),
                lookup.name.clone(),
                lookup.positional.clone(),
            );
            let found = self.slots.read().expect("slots lock").get(&key).cloned();
            match found {
                Some(s) => s,
                None => self
                    .slots
                    .write()
                    .expect("slots lock")
                    .entry(key)
                    .or_default()
                    .clone(),
            }
        };
        if slot.query_only.load(std::sync::atomic::Ordering::Relaxed) {
            return query(sql, actor, lookup, params, ctx).await;
        }
        let fresh = |b: &Built| {
            b.versions
                .iter()
                .all(|(t, v)| gov.dataset_store().latest(t).as_ref() == Some(v))
                && b.grants
                    .iter()
                    .all(|g| gov.grant_in_force(actor, g).is_ok())
        };
        let current = slot.built.read().expect("built lock").clone();
        let built = match current {
            Some(b) if fresh(&b) => Some(b),
            _ => {
                let _one = slot.building.lock().await;
                let again = slot.built.read().expect("built lock").clone();
                match again {
                    Some(b) if fresh(&b) => Some(b),
                    _ => {
                        let b = self.build(gov, sql, actor, lookup, ctx).await?;
                        if b.is_none() {
                            slot.query_only
                                .store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        *slot.built.write().expect("built lock") = b.clone();
                        b
                    }
                }
            }
        };
        let Some(b) = built else {
            return query(sql, actor, lookup, params, ctx).await;
        };
        let key: &str = match params.first() {
            None => "",
            Some(Value::Text(s)) => s,
            Some(Value::Null) => {
                return Ok(Found {
                    row: None,
                    source: b.source.clone(),
                });
            }
            Some(other) => &other.to_string(),
        };
        let mut source = b.source.clone();
        let row = b.rows.get(key).map(|(values, subject)| {
            source.subject = subject.as_ref().map(|s| s.to_string());
            b.columns
                .iter()
                .cloned()
                .zip(values.iter().cloned())
                .collect()
        });
        Ok(Found { row, source })
    }

    /// Builds a lookup's index; `None` when it is to be queried per application.
    async fn build(
        &self,
        gov: &Governance,
        sql: &SqlEngine,
        actor: &Actor,
        lookup: &Lookup,
        ctx: &CallContext,
    ) -> Result<Option<Arc<Built>>, Error> {
        let planned = sql.plan(actor, &lookup.positional, ctx).await?;
        let mut versions = Vec::new();
        for t in &planned.tables {
            // A dataset without a version yet (a view before its first window) is empty
            // until it has one; a table that is not a dataset is queried each time.
            match gov.dataset_store().latest(t) {
                None => return Ok(None),
                Some(l) if l.version.is_some_and(|(_, rows)| rows > INDEX_ROWS_MAX) => {
                    return Ok(None);
                }
                Some(l) => versions.push((t.clone(), l)),
            }
        }
        let (planned, keyed) = match shape(&planned, lookup) {
            Shape::Query => return Ok(None),
            Shape::Constant => (planned, false),
            Shape::Keyed { index_sql } => (sql.plan(actor, &index_sql, ctx).await?, true),
        };
        let (result, subjects) = sql.execute_indexed(actor, &planned, ctx).await?;
        let fields = result.schema.fields();
        let width = fields.len() - usize::from(keyed);
        let columns: Arc<[String]> = fields[..width].iter().map(|f| f.name().clone()).collect();
        let mut rows: Rows = HashMap::new();
        let mut n = 0;
        for b in &result.batches {
            for i in 0..b.num_rows() {
                let values: Box<[Value]> = (0..width)
                    .map(|c| crate::runtime::cell(b.column(c).as_ref(), i))
                    .collect();
                let key: Box<str> = if keyed {
                    match crate::runtime::cell(b.column(width).as_ref(), i) {
                        Value::Null => {
                            n += 1;
                            continue;
                        }
                        Value::Text(s) => s.into(),
                        other => other.to_string().into(),
                    }
                } else {
                    "".into()
                };
                let subject = subjects.get(n).cloned().flatten().map(Into::into);
                n += 1;
                // The first row for a key, as `LIMIT 1` over the query would give.
                rows.entry(key).or_insert((values, subject));
            }
        }
        Ok(Some(Arc::new(Built {
            versions,
            grants: planned.grants.iter().map(|g| g.id.clone()).collect(),
            source: Source {
                datasets: planned.tables.clone(),
                grants: grants_of(&planned),
                subject: None,
            },
            columns,
            rows,
        })))
    }
}

/// A lookup planned and run for one application (audited as a query, with its subjects).
async fn query(
    sql: &SqlEngine,
    actor: &Actor,
    lookup: &Lookup,
    params: &[Value],
    ctx: &CallContext,
) -> Result<Found, Error> {
    let planned = sql.plan(actor, &lookup.positional, ctx).await?;
    let params: Vec<ScalarValue> = params.iter().map(crate::runtime::scalar).collect();
    let r = sql.execute(actor, &planned, params, Some(1), ctx).await?;
    let row: Option<Row> = r.batches.iter().find(|b| b.num_rows() > 0).map(|b| {
        b.schema()
            .fields()
            .iter()
            .enumerate()
            .map(|(c, f)| {
                (
                    f.name().clone(),
                    crate::runtime::cell(b.column(c).as_ref(), 0),
                )
            })
            .collect()
    });
    Ok(Found {
        row,
        source: Source {
            datasets: planned.tables.clone(),
            grants: grants_of(&planned),
            subject: None,
        },
    })
}
