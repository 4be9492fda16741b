//! `pg_catalog` for PostgreSQL clients (psql's `\d`, BI tools), built from the session's own
//! catalog, so it lists only what the principal may see. psql asks for a relation's oid in one
//! query and for its columns in the next, and every query has a fresh session: oids must come
//! out the same each time, so names are listed in sorted order and `pg_class` is listed first
//! in every session (oids are handed out in listing order, by whichever table lists first).

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::CatalogProviderList;
use datafusion::datasource::TableType;
use datafusion::error::DataFusionError;
use datafusion::prelude::SessionContext;
use datafusion_pg_catalog::pg_catalog::catalog_info::CatalogInfo;
use datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_pg_catalog::pg_catalog::{PgCatalogSchemaProvider, PgCatalogStaticTables};
use yunqi_types::Error;

#[derive(Debug, Clone)]
struct Sorted(Arc<dyn CatalogProviderList>);

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[async_trait]
impl CatalogInfo for Sorted {
    async fn catalog_names(&self) -> Result<Vec<String>, DataFusionError> {
        Ok(sorted(CatalogInfo::catalog_names(&self.0).await?))
    }

    async fn schema_names(&self, catalog: &str) -> Result<Option<Vec<String>>, DataFusionError> {
        Ok(CatalogInfo::schema_names(&self.0, catalog)
            .await?
            .map(sorted))
    }

    async fn table_names(
        &self,
        catalog: &str,
        schema: &str,
    ) -> Result<Option<Vec<String>>, DataFusionError> {
        Ok(CatalogInfo::table_names(&self.0, catalog, schema)
            .await?
            .map(sorted))
    }

    async fn table_schema(
        &self,
        catalog: &str,
        schema: &str,
        table: &str,
    ) -> Result<Option<SchemaRef>, DataFusionError> {
        CatalogInfo::table_schema(&self.0, catalog, schema, table).await
    }

    async fn table_type(
        &self,
        catalog: &str,
        schema: &str,
        table: &str,
    ) -> Result<Option<TableType>, DataFusionError> {
        CatalogInfo::table_type(&self.0, catalog, schema, table).await
    }
}

/// Adds `pg_catalog` and the PostgreSQL catalog functions to a session.
pub async fn install(
    ctx: &SessionContext,
    catalog: &str,
    static_tables: &Arc<PgCatalogStaticTables>,
) -> Result<(), Error> {
    let fail =
        |e: &dyn std::fmt::Display| Error::internal(format!("cannot set up pg_catalog: {e}"));
    // The functions (and a first pg_catalog), as the library sets them up …
    datafusion_pg_catalog::setup_pg_catalog(ctx, catalog, EmptyContextProvider)
        .map_err(|e| fail(&e))?;
    // … then pg_catalog again, over the sorted view of this session's catalog.
    let provider = PgCatalogSchemaProvider::try_new(
        Sorted(ctx.state().catalog_list().clone()),
        static_tables.clone(),
        EmptyContextProvider,
    )
    .map_err(|e| fail(&e))?;
    ctx.catalog(catalog)
        .ok_or_else(|| Error::internal("the session has no yunqi catalog"))?
        .register_schema("pg_catalog", Arc::new(provider))
        .map_err(|e| fail(&e))?;
    ctx.sql("SELECT count(*) FROM pg_catalog.pg_class")
        .await
        .map_err(|e| fail(&e))?
        .collect()
        .await
        .map_err(|e| fail(&e))?;
    Ok(())
}
