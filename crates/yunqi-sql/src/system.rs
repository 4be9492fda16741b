//! The `system` schema: departments, principals and tokens, as the calling principal may see
//! them (the same answers as the HTTP API, from the same governance calls).

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanArray, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use datafusion::catalog::MemTable;
use datafusion::prelude::SessionContext;
use yunqi_governance::{Actor, Governance};
use yunqi_types::{Error, mask};

fn text(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Utf8, nullable)
}

fn time(name: &str, nullable: bool) -> Field {
    Field::new(
        name,
        DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        nullable,
    )
}

fn table(
    ctx: &SessionContext,
    name: &str,
    fields: Vec<Field>,
    columns: Vec<ArrayRef>,
) -> Result<(), Error> {
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| Error::internal(format!("cannot build system.{name}: {e}")))?;
    let mem = MemTable::try_new(schema, vec![vec![batch]])
        .map_err(|e| Error::internal(format!("cannot build system.{name}: {e}")))?;
    ctx.register_table(format!("system.{name}"), Arc::new(mem))
        .map_err(|e| Error::internal(format!("cannot register system.{name}: {e}")))?;
    Ok(())
}

fn times(values: impl Iterator<Item = Option<i64>>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from(values.collect::<Vec<_>>()).with_timezone("UTC"))
}

/// A table over Parquet files with the dataset's schema (an empty table without files).
pub fn parquet_table(
    name: &str,
    schema: datafusion::arrow::datatypes::SchemaRef,
    files: &[String],
) -> Result<Arc<dyn datafusion::catalog::TableProvider>, Error> {
    use datafusion::datasource::file_format::parquet::ParquetFormat;
    use datafusion::datasource::listing::{
        ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
    };
    if files.is_empty() {
        return Ok(Arc::new(
            MemTable::try_new(schema, vec![vec![]]).map_err(|e| Error::internal(e.to_string()))?,
        ));
    }
    let urls = files
        .iter()
        .map(ListingTableUrl::parse)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::internal(format!("{name}: {e}")))?;
    let options =
        ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .with_schema(schema);
    Ok(Arc::new(
        ListingTable::try_new(config).map_err(|e| Error::internal(format!("{name}: {e}")))?,
    ))
}

/// Registers the datasets `actor` may query: a schema per department, a Parquet table per
/// dataset over its current version's files (an empty table before the first import); other
/// departments' datasets as their grants let `actor` see them. Returns the grants and the
/// subject columns, by table.
pub fn register_datasets(
    ctx: &SessionContext,
    gov: &Governance,
    actor: &Actor,
) -> Result<crate::Registered, Error> {
    let mut registered = crate::Registered::default();
    use datafusion::catalog::MemorySchemaProvider;

    let catalog = ctx
        .catalog(crate::CATALOG)
        .ok_or_else(|| Error::internal("the session has no yunqi catalog"))?;
    for q in gov.queryable(actor)? {
        let m = &q.manifest;
        if catalog.schema(&m.department).is_none() {
            catalog
                .register_schema(&m.department, Arc::new(MemorySchemaProvider::new()))
                .map_err(|e| {
                    Error::internal(format!("cannot register schema {}: {e}", m.department))
                })?;
        }
        let sql_name = m.sql_name();
        let raw = parquet_table(&sql_name, m.arrow_schema(), &q.files)?;
        if let Some(s) = &m.subject {
            registered.subjects.insert(sql_name.clone(), s.clone());
        }
        if let Some(grant) = q.grant {
            let table = crate::secure::GrantedTable::new(ctx, m, raw, grant.clone())?;
            ctx.register_table(sql_name.clone(), Arc::new(table))
                .map_err(|e| Error::internal(format!("cannot register {sql_name}: {e}")))?;
            registered.grants.insert(sql_name, grant);
            continue;
        }
        ctx.register_table(sql_name.clone(), raw)
            .map_err(|e| Error::internal(format!("cannot register {sql_name}: {e}")))?;
        let rejects = format!("{sql_name}{}", yunqi_datasets::REJECTS_SUFFIX);
        ctx.register_table(
            rejects.clone(),
            parquet_table(&rejects, yunqi_datasets::rejects_schema(), &q.rejects_files)?,
        )
        .map_err(|e| Error::internal(format!("cannot register {rejects}: {e}")))?;
    }
    Ok(registered)
}

/// Registers the `system` tables for `actor`.
pub fn register(ctx: &SessionContext, gov: &Governance, actor: &Actor) -> Result<(), Error> {
    let departments = gov.list_departments(actor)?;
    table(
        ctx,
        "departments",
        vec![
            text("name", false),
            text("title", false),
            time("created_at", false),
        ],
        vec![
            Arc::new(StringArray::from_iter_values(
                departments.iter().map(|d| d.name.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                departments.iter().map(|d| d.title.as_str()),
            )),
            times(
                departments
                    .iter()
                    .map(|d| Some(d.created_at.timestamp_micros())),
            ),
        ],
    )?;

    let principals = gov.list_principals(actor, None)?;
    let me = &actor.principal.name;
    table(
        ctx,
        "principals",
        vec![
            text("name", false),
            text("role", false),
            text("department", true),
            text("id_number", true),
            text("display_name", false),
            time("created_at", false),
        ],
        vec![
            Arc::new(StringArray::from_iter_values(
                principals.iter().map(|p| p.name.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                principals.iter().map(|p| p.role.as_str()),
            )),
            Arc::new(StringArray::from_iter(
                principals
                    .iter()
                    .map(|p| p.department.as_ref().map(|d| d.as_str())),
            )),
            Arc::new(StringArray::from_iter(principals.iter().map(|p| {
                p.id_number.as_ref().map(|id| {
                    if &p.name == me {
                        id.to_string()
                    } else {
                        mask::national_id(id.as_str())
                    }
                })
            }))),
            Arc::new(StringArray::from_iter_values(
                principals.iter().map(|p| p.display_name.as_str()),
            )),
            times(
                principals
                    .iter()
                    .map(|p| Some(p.created_at.timestamp_micros())),
            ),
        ],
    )?;

    let tokens = gov.list_tokens(actor, None)?;
    let now = gov.now();
    table(
        ctx,
        "tokens",
        vec![
            text("id", false),
            text("principal", false),
            time("created_at", false),
            time("expires_at", true),
            time("revoked_at", true),
            Field::new("active", DataType::Boolean, false),
        ],
        vec![
            Arc::new(StringArray::from_iter_values(
                tokens.iter().map(|t| t.id.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                tokens.iter().map(|t| t.principal.as_str()),
            )),
            times(tokens.iter().map(|t| Some(t.created_at.timestamp_micros()))),
            times(
                tokens
                    .iter()
                    .map(|t| t.expires_at.map(|x| x.timestamp_micros())),
            ),
            times(
                tokens
                    .iter()
                    .map(|t| t.revoked_at.map(|x| x.timestamp_micros())),
            ),
            Arc::new(BooleanArray::from(
                tokens.iter().map(|t| t.is_active(now)).collect::<Vec<_>>(),
            )),
        ],
    )?;
    Ok(())
}

/// Registers the older versions a statement names as `department.dataset__vN`, for the
/// owner's staff (`queryable` has registered the current versions already).
pub fn register_versions(
    ctx: &SessionContext,
    gov: &Governance,
    actor: &Actor,
    references: &[datafusion::common::TableReference],
) -> Result<(), Error> {
    for r in references {
        let (Some(schema), table) = (r.schema(), r.table()) else {
            continue;
        };
        let Some((name, n)) = table.rsplit_once(crate::VERSION_INFIX) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else {
            continue;
        };
        let Ok((m, files)) = gov.version_files(actor, schema, name, n) else {
            // Not one's own dataset or no such version: the planner says "not found".
            continue;
        };
        let sql_name = format!("{schema}.{table}");
        if ctx.table_exist(sql_name.as_str()).unwrap_or(false) {
            continue;
        }
        ctx.register_table(
            sql_name.clone(),
            parquet_table(&sql_name, m.arrow_schema(), &files)?,
        )
        .map_err(|e| Error::internal(format!("cannot register {sql_name}: {e}")))?;
    }
    Ok(())
}
