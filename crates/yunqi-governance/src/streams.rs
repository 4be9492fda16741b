//! Streams and continuous views: declaring them (stewards of the department), sending events
//! (the department's service accounts and stewards), each authorised and audited. A view's
//! results are a dataset like any other — cataloged, classified, granted, masked — written only
//! by the view.

use std::sync::Arc;

use yunqi_datasets::{
    Column, DatasetSpec, Manifest, StreamDeclarations, StreamManifest, ViewSource,
};
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
    pub fn with_streams(mut self, catalog: Arc<dyn StreamDeclarations>) -> Governance {
        self.streams = Some(catalog);
        self
    }

    /// Makes continuous views' results shared datasets (a cluster whose streams are in the
    /// shared log and whose datasets are in object storage: each view is run by one node, the
    /// holder of its lease, and read on every node).
    pub fn with_shared_views(mut self) -> Governance {
        self.shared_views = true;
        self
    }

    /// Whether continuous views' results are the cluster's (see [`Governance::with_shared_views`]).
    pub fn shared_views(&self) -> bool {
        self.shared_views
    }

    /// The dataset store (for the writers of continuous views' rows).
    pub fn dataset_store(&self) -> &Arc<yunqi_datasets::DatasetStore> {
        &self.datasets
    }

    fn stream_catalog(&self) -> Result<&Arc<dyn StreamDeclarations>, Error> {
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
        if let (Some(t), Some(table)) = (&m.ngsi_type, m.entities_table()) {
            if let Some(other) = catalog
                .list()
                .into_iter()
                .find(|o| o.ngsi_type.as_deref() == Some(t.as_str()))
            {
                let e = Error::already_exists("NGSI-LD entity type", t).hint(format!(
                    "stream {} already records it; an entity type maps to one stream",
                    other.sql_name()
                ));
                return Err(self.fail(actor, &action, e, ctx).await);
            }
            if self.datasets.get(&m.department, &table).is_ok() {
                let e = Error::already_exists("dataset", &format!("{}.{table}", m.department))
                    .hint(
                        "the stream's entity table would take that name; pick another stream name",
                    );
                return Err(self.fail(actor, &action, e, ctx).await);
            }
        }
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
        let m = catalog.create(m)?;
        if let (Some(t), Some(table)) = (&m.ngsi_type, m.entities_table()) {
            let name = Name::parse("dataset", &table)?;
            self.create_dataset(
                actor,
                DatasetSpec {
                    on_node: true,
                    department: department.clone(),
                    name: name.clone(),
                    description: format!(
                        "latest state of each NGSI-LD entity of type {t} (stream {})",
                        m.sql_name()
                    ),
                    columns: m.columns.clone(),
                    subject: None,
                    tags: vec!["stream".into(), "ngsi-ld".into()],
                },
                ctx,
            )
            .await?;
            let store = self.datasets.clone();
            let source = ViewSource {
                sql: String::new(),
                stream: m.sql_name(),
                late_table_of: None,
                entities_of: Some(m.sql_name()),
            };
            let d = department.to_string();
            tokio::task::spawn_blocking(move || store.set_view(&d, name.as_str(), Some(source)))
                .await
                .map_err(|e| Error::internal(format!("entity table task failed: {e}")))??;
        }
        Ok(m)
    }

    /// The stream recording NGSI-LD entities of `entity_type`.
    pub fn ngsi_stream(&self, entity_type: &str) -> Result<StreamManifest, Error> {
        self.stream_catalog()?
            .list()
            .into_iter()
            .find(|m| m.ngsi_type.as_deref() == Some(entity_type))
            .ok_or_else(|| {
                Error::not_found("NGSI-LD entity type", entity_type).hint(
                    "a steward maps a type to a stream: CREATE STREAM d.s (id TEXT, ...) \
                     WITH (event_time = '...', ngsi_type = 'Type')",
                )
            })
    }

    /// Every NGSI-LD stream's definition, for yunqi's own use.
    pub fn ngsi_streams(&self) -> Vec<StreamManifest> {
        self.stream_definitions()
            .into_iter()
            .filter(|m| m.ngsi_type.is_some())
            .collect()
    }

    /// Authorises reading a stream's entities outside SQL (the NGSI-LD API), auditing a
    /// denial: the stream's department reads them whole; another department under its active
    /// grant on the entity table, whose columns and masks then apply. A grant with a row
    /// filter, or an entity table with a subject column, is read through SQL only, where the
    /// filter is planned and the subjects recorded.
    pub async fn authorize_entity_read(
        &self,
        actor: &Actor,
        m: &StreamManifest,
        ctx: &CallContext,
    ) -> Result<(Manifest, Option<yunqi_types::Grant>), Error> {
        let table = m.entities_table().ok_or_else(|| {
            Error::invalid(format!("stream {} does not record entities", m.sql_name()))
        })?;
        let manifest = self.datasets.get(&m.department, &table)?;
        let dataset = manifest.sql_name();
        let action = Action::DatasetQuery {
            dataset: &dataset,
            department: &m.department,
        };
        if crate::authorize(&actor.principal, &action).is_ok() {
            return Ok((manifest, None));
        }
        let own = actor.principal.department.as_ref().map(|d| d.as_str());
        let grant = own.and_then(|own| self.active_grant(&dataset, own));
        let Some(grant) = grant else {
            // Denied: audited with the reason the policy gives.
            self.authorize(actor, &action, ctx).await?;
            return Err(Error::denied(format!("no grant on {dataset}")));
        };
        let usable = crate::authorize(
            &actor.principal,
            &Action::GrantUse {
                id: &grant.id,
                grantee: &grant.grantee,
            },
        );
        let refused = if let Err(e) = usable {
            Some(e)
        } else if grant.rows.is_some() || manifest.subject.is_some() {
            Some(
                Error::denied(format!(
                    "the entities of {dataset} are readable to you only through SQL"
                ))
                .detail(if grant.rows.is_some() {
                    "your grant limits the rows you see"
                } else {
                    "the table has a subject column, whose accesses are recorded by SQL queries"
                })
                .hint(format!("query it: SELECT * FROM {dataset}")),
            )
        } else {
            None
        };
        if let Some(e) = refused {
            self.record_denial(
                Some(&actor.principal),
                "entity.read",
                &format!("dataset:{dataset}"),
                &e,
                ctx,
            )
            .await?;
            return Err(e);
        }
        Ok((manifest, Some(grant)))
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
        // A view over an NGSI-LD entity stream reads its node's own log, so its results stay
        // on that node too.
        let on_node = !self.shared_views
            || self
                .stream_catalog()
                .and_then(|c| c.get(&source.stream))
                .is_ok_and(|m| m.ngsi_type.is_some());
        self.create_dataset(
            actor,
            DatasetSpec {
                on_node,
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
                on_node,
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
