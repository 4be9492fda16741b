//! Streams and continuous views: declaring them (stewards of the department), sending events
//! (the department's service accounts and stewards), each authorised and audited. A view's
//! results are a dataset like any other — cataloged, classified, granted, masked — written only
//! by the view.

use std::sync::Arc;

use yunqi_datasets::{Column, DatasetSpec, Manifest, StreamCatalog, StreamManifest, ViewSource};
use yunqi_types::{Error, Name, Outcome};

use crate::{Action, Actor, CallContext, Governance};

/// A continuous view to create.
#[derive(Debug, Clone)]
pub struct NewView {
    /// Its department (the stream's).
    pub department: String,
    /// Its name.
    pub name: String,
    /// Its columns.
    pub columns: Vec<Column>,
    /// Its late table's columns.
    pub late_columns: Vec<Column>,
    /// Its statement and stream.
    pub source: ViewSource,
}

impl Governance {
    /// Uses `catalog` for stream definitions.
    pub fn with_streams(mut self, catalog: Arc<StreamCatalog>) -> Governance {
        self.streams = Some(catalog);
        self
    }

    /// The dataset store (for the writers of continuous views' rows).
    pub fn dataset_store(&self) -> &Arc<yunqi_datasets::DatasetStore> {
        &self.datasets
    }

    fn stream_catalog(&self) -> Result<&Arc<StreamCatalog>, Error> {
        self.streams
            .as_ref()
            .ok_or_else(|| Error::unavailable("streams are not enabled on this server"))
    }

    /// Declares a stream (stewards of its department, admins).
    pub async fn create_stream(
        &self,
        actor: &Actor,
        m: StreamManifest,
        ctx: &CallContext,
    ) -> Result<StreamManifest, Error> {
        let catalog = self.stream_catalog()?.clone();
        let name = m.sql_name();
        let department = Name::parse("department", &m.department)?;
        let action = Action::DatasetWrite {
            dataset: &name,
            department: &department,
        };
        self.authorize(actor, &action, ctx).await?;
        if let Err(e) = self.get_department(actor, department.as_str()) {
            return Err(self.fail(actor, &action, e, ctx).await);
        }
        if self.datasets.get(&m.department, &m.name).is_ok() {
            let e = Error::already_exists("dataset", &name)
                .hint("streams and datasets share names within a department; pick another");
            return Err(self.fail(actor, &action, e, ctx).await);
        }
        if catalog.get(&name).is_ok() {
            let e = Error::already_exists("stream", &name)
                .hint("send events to it, or pick another name");
            return Err(self.fail(actor, &action, e, ctx).await);
        }
        m.check()?;
        let columns: Vec<String> = m
            .columns
            .iter()
            .map(|c| format!("{} {:?}", c.name, c.column_type).to_lowercase())
            .collect();
        let detail = format!(
            "({}) event_time {} watermark {} ms",
            columns.join(", "),
            m.event_time,
            m.watermark_ms
        );
        self.audit
            .append(vec![Self::actor_event(
                actor,
                "stream.create",
                format!("stream:{name}"),
                Outcome::Ok,
                detail,
                ctx,
            )])
            .await?;
        catalog.create(m)
    }

    /// Every stream (anyone who may read the catalog).
    pub fn list_streams(&self, actor: &Actor) -> Result<Vec<StreamManifest>, Error> {
        crate::authorize(&actor.principal, &Action::CatalogRead)?;
        Ok(self.stream_catalog()?.list())
    }

    /// A stream's definition (anyone who may read the catalog).
    pub fn get_stream(&self, actor: &Actor, name: &str) -> Result<StreamManifest, Error> {
        crate::authorize(&actor.principal, &Action::CatalogRead)?;
        self.stream_catalog()?.get(name)
    }

    /// A stream's definition, for yunqi's own use (view runners).
    pub fn stream_definition(&self, name: &str) -> Result<StreamManifest, Error> {
        self.stream_catalog()?.get(name)
    }

    /// Every stream's definition, for yunqi's own use (retention).
    pub fn stream_definitions(&self) -> Vec<StreamManifest> {
        self.streams.as_ref().map(|c| c.list()).unwrap_or_default()
    }

    /// Authorises sending events to a stream (auditing a denial); returns its definition.
    pub async fn authorize_append(
        &self,
        actor: &Actor,
        name: &str,
        ctx: &CallContext,
    ) -> Result<StreamManifest, Error> {
        let m = self.stream_catalog()?.get(name)?;
        let action = Action::StreamAppend {
            stream: name,
            department: &m.department,
        };
        self.authorize(actor, &action, ctx).await?;
        Ok(m)
    }

    /// Creates a continuous view's result dataset and its late table (stewards of the
    /// department, admins). `sql` is the view's statement, already checked by the planner.
    pub async fn create_view(
        &self,
        actor: &Actor,
        view: NewView,
        ctx: &CallContext,
    ) -> Result<Manifest, Error> {
        let NewView {
            department,
            name,
            columns,
            late_columns,
            source,
        } = view;
        let (department, name) = (department.as_str(), name.as_str());
        let department = Name::parse("department", department)?;
        let name = Name::parse("view", name)?;
        let late_name = Name::parse("view", &format!("{name}_late"))?;
        let sql_name = format!("{department}.{name}");
        let action = Action::DatasetWrite {
            dataset: &sql_name,
            department: &department,
        };
        self.authorize(actor, &action, ctx).await?;
        if self.stream_catalog()?.get(&sql_name).is_ok() {
            let e = Error::already_exists("stream", &sql_name)
                .hint("streams and views share names within a department; pick another");
            return Err(self.fail(actor, &action, e, ctx).await);
        }
        for n in [&name, &late_name] {
            if self.datasets.get(department.as_str(), n.as_str()).is_ok() {
                let e = Error::already_exists("dataset", &format!("{department}.{n}"))
                    .hint("pick another name for the view");
                return Err(self.fail(actor, &action, e, ctx).await);
            }
        }
        let description = format!("continuous view over {}", source.stream);
        self.create_dataset(
            actor,
            DatasetSpec {
                department: department.clone(),
                name: name.clone(),
                description: description.clone(),
                columns,
                subject: None,
                tags: vec!["stream".into()],
            },
            ctx,
        )
        .await?;
        self.create_dataset(
            actor,
            DatasetSpec {
                department: department.clone(),
                name: late_name.clone(),
                description: format!(
                    "late events of {sql_name}: windows that received events after they closed"
                ),
                columns: late_columns,
                subject: None,
                tags: vec!["stream".into()],
            },
            ctx,
        )
        .await?;
        let store = self.datasets.clone();
        let late_source = ViewSource {
            late_table_of: Some(sql_name.clone()),
            ..source.clone()
        };
        let (d, n, l) = (
            department.to_string(),
            name.to_string(),
            late_name.to_string(),
        );
        let m = tokio::task::spawn_blocking(move || {
            store.set_view(&d, &l, Some(late_source))?;
            store.set_view(&d, &n, Some(source))
        })
        .await
        .map_err(|e| Error::internal(format!("view task failed: {e}")))??;
        self.audit
            .append(vec![Self::actor_event(
                actor,
                "view.create",
                format!("dataset:{sql_name}"),
                Outcome::Ok,
                m.view.as_ref().map(|v| v.sql.clone()).unwrap_or_default(),
                ctx,
            )])
            .await?;
        Ok(m)
    }
}
