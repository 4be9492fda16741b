//! Dataset operations: create, import, declare column classes, read the catalog, and find what
//! a principal may query. Each change is authorised, audited before it becomes visible, then
//! applied; each denial is audited.

use yunqi_datasets::{DatasetSpec, ImportOptions, ImportReport, Manifest};
use yunqi_types::{ColumnClass, Error, Name, Outcome};

use crate::{Action, Actor, CallContext, Governance, authorize};

/// A dataset a principal may query.
#[derive(Debug, Clone)]
pub struct Queryable {
    /// Its manifest.
    pub manifest: Manifest,
    /// Data files of the current version (absolute paths, or object URLs in a cluster).
    pub files: Vec<String>,
    /// Rejects files of every version (the owner's only).
    pub rejects_files: Vec<String>,
    /// The grant it is read under; `None` for the principal's own department's datasets.
    pub grant: Option<yunqi_types::Grant>,
}

impl Governance {
    fn dataset_event(
        &self,
        actor: &Actor,
        action: &str,
        dataset: &str,
        outcome: Outcome,
        detail: String,
        ctx: &CallContext,
    ) -> yunqi_types::AuditEvent {
        Self::actor_event(
            actor,
            action,
            format!("dataset:{dataset}"),
            outcome,
            detail,
            ctx,
        )
    }

    /// Authorises a write to `department.name` (auditing a denial); returns the department's
    /// name and the dataset's SQL name.
    async fn authorize_write(
        &self,
        actor: &Actor,
        department: &str,
        name: &str,
        ctx: &CallContext,
    ) -> Result<(Name, String), Error> {
        let department = Name::parse("department", department)?;
        let dataset = format!("{department}.{name}");
        self.authorize(
            actor,
            &Action::DatasetWrite {
                dataset: &dataset,
                department: &department,
            },
            ctx,
        )
        .await?;
        Ok((department, dataset))
    }

    /// Creates a dataset (stewards of its department, admins).
    pub async fn create_dataset(
        &self,
        actor: &Actor,
        spec: DatasetSpec,
        ctx: &CallContext,
    ) -> Result<Manifest, Error> {
        let dataset = format!("{}.{}", spec.department, spec.name);
        let action = Action::DatasetWrite {
            dataset: &dataset,
            department: &spec.department,
        };
        self.authorize(actor, &action, ctx).await?;
        let _guard = self.dataset_lock.lock().await;
        self.get_department(actor, spec.department.as_str())?;
        self.audit
            .append(vec![self.dataset_event(
                actor,
                "dataset.create",
                &dataset,
                Outcome::Ok,
                String::new(),
                ctx,
            )])
            .await?;
        let store = self.datasets.clone();
        let now = self.now();
        let result = tokio::task::spawn_blocking(move || store.create(spec, now))
            .await
            .map_err(|e| Error::internal(format!("dataset task failed: {e}")))?;
        if let Err(e) = &result {
            let failed = self.dataset_event(
                actor,
                "dataset.create",
                &dataset,
                Outcome::Failed,
                e.message.clone(),
                ctx,
            );
            let _ = self.audit.append(vec![failed]).await;
        }
        result
    }

    /// Imports CSV bytes into a dataset as a new version (stewards of its department, admins).
    pub async fn import_dataset(
        &self,
        actor: &Actor,
        department: &str,
        name: &str,
        bytes: Vec<u8>,
        options: ImportOptions,
        ctx: &CallContext,
    ) -> Result<ImportReport, Error> {
        let (department, dataset) = self.authorize_write(actor, department, name, ctx).await?;
        let _guard = self.dataset_lock.lock().await;
        let _cluster_guard = self.lock_dataset_writes(department.as_str(), name).await?;
        let store = self.datasets.clone();
        let (d, n, by, now) = (
            department.to_string(),
            name.to_string(),
            actor.principal.name.to_string(),
            self.now(),
        );
        let staged = tokio::task::spawn_blocking(move || {
            store.prepare_import(&d, &n, &bytes, options, &by, now)
        })
        .await
        .map_err(|e| Error::internal(format!("import task failed: {e}")))?;
        let staged = match staged {
            Ok(s) => s,
            Err(e) => {
                let failed = self.dataset_event(
                    actor,
                    "dataset.import",
                    &dataset,
                    Outcome::Failed,
                    e.message.clone(),
                    ctx,
                );
                self.audit.append(vec![failed]).await?;
                return Err(e);
            }
        };
        let r = &staged.report;
        let detail = format!(
            "version {}: {} rows imported, {} rejected, {} in all",
            r.version, r.rows_imported, r.rows_rejected, r.rows_total
        );
        if let Err(e) = self
            .audit
            .append(vec![self.dataset_event(
                actor,
                "dataset.import",
                &dataset,
                Outcome::Ok,
                detail,
                ctx,
            )])
            .await
        {
            self.datasets.discard(staged);
            return Err(e);
        }
        if let Err(e) = self.datasets.publish(&staged) {
            // Refused by compare-and-set: nothing names the files. Any other failure may have
            // committed after all: the files are left to the sweeper (or the next open).
            if e.code == yunqi_types::ErrorCode::Conflict {
                self.datasets.discard(staged);
            }
            let failed = self.dataset_event(
                actor,
                "dataset.import",
                &dataset,
                Outcome::Failed,
                format!("not published: {}", e.message),
                ctx,
            );
            let _ = self.audit.append(vec![failed]).await;
            return Err(e);
        }
        Ok(staged.report)
    }

    /// In a cluster, holds the lock on writes to a shared dataset across the nodes until the
    /// guard is dropped (nothing for a dataset on this node).
    async fn lock_dataset_writes(
        &self,
        department: &str,
        name: &str,
    ) -> Result<Option<Box<dyn Send>>, Error> {
        let store = self.datasets.clone();
        let (d, n) = (department.to_string(), name.to_string());
        tokio::task::spawn_blocking(move || store.lock_writes(&d, &n))
            .await
            .map_err(|e| Error::internal(format!("dataset lock task failed: {e}")))?
    }

    /// A change to a dataset's description (not its data) by a steward of its department or
    /// an admin: authorised as a dataset write, audited, then applied by `apply` (given the
    /// department's name).
    #[allow(clippy::too_many_arguments)]
    async fn change_dataset(
        &self,
        actor: &Actor,
        department: &str,
        name: &str,
        action: &str,
        detail: String,
        ctx: &CallContext,
        apply: impl FnOnce(&yunqi_datasets::DatasetStore, &str) -> Result<Manifest, Error>,
    ) -> Result<Manifest, Error> {
        let (department, dataset) = self.authorize_write(actor, department, name, ctx).await?;
        let _guard = self.dataset_lock.lock().await;
        let _cluster_guard = self.lock_dataset_writes(department.as_str(), name).await?;
        self.datasets.get(department.as_str(), name)?;
        let event = self.dataset_event(actor, action, &dataset, Outcome::Ok, detail, ctx);
        self.audit.append(vec![event]).await?;
        apply(&self.datasets, department.as_str())
    }

    /// Declares a column's class (stewards of its department, admins); imports never change a
    /// declared class.
    pub async fn classify_column(
        &self,
        actor: &Actor,
        department: &str,
        name: &str,
        column: &str,
        class: ColumnClass,
        ctx: &CallContext,
    ) -> Result<Manifest, Error> {
        let detail = format!("column {column} is {class}");
        self.change_dataset(
            actor,
            department,
            name,
            "dataset.classify",
            detail,
            ctx,
            |d, dept| d.set_class(dept, name, column, class),
        )
        .await
    }

    /// Checks that `actor` may write the dataset (auditing a denial), before work is done for
    /// a write: a derivation runs its query only if its result may be stored.
    pub async fn check_dataset_write(
        &self,
        actor: &Actor,
        department: &str,
        name: &str,
        ctx: &CallContext,
    ) -> Result<(), Error> {
        Name::parse("dataset", name)?;
        self.authorize_write(actor, department, name, ctx)
            .await
            .map(|_| ())
    }

    /// Records that the dataset's current version was derived by a query (lineage).
    pub async fn record_derivation(
        &self,
        actor: &Actor,
        department: &str,
        name: &str,
        derivation: yunqi_datasets::Derivation,
        ctx: &CallContext,
    ) -> Result<Manifest, Error> {
        let detail = format!(
            "version {} derived from {}",
            derivation.version,
            derivation.sources.join(", ")
        );
        self.change_dataset(
            actor,
            department,
            name,
            "dataset.derive",
            detail,
            ctx,
            |d, dept| d.set_derivation(dept, name, Some(derivation)),
        )
        .await
    }

    /// Replaces a dataset's tags (stewards of its department, admins).
    pub async fn set_tags(
        &self,
        actor: &Actor,
        department: &str,
        name: &str,
        tags: Vec<String>,
        ctx: &CallContext,
    ) -> Result<Manifest, Error> {
        let detail = format!("tags {}", tags.join(", "));
        self.change_dataset(
            actor,
            department,
            name,
            "dataset.tags",
            detail,
            ctx,
            |d, dept| d.set_tags(dept, name, tags),
        )
        .await
    }

    /// Adds a column to a dataset's schema (stewards of its department, admins).
    pub async fn add_column(
        &self,
        actor: &Actor,
        department: &str,
        name: &str,
        column: yunqi_datasets::Column,
        ctx: &CallContext,
    ) -> Result<Manifest, Error> {
        let detail = format!(
            "column {} {:?} {}",
            column.name, column.column_type, column.class
        );
        self.change_dataset(
            actor,
            department,
            name,
            "dataset.add_column",
            detail,
            ctx,
            |d, dept| d.add_column(dept, name, column),
        )
        .await
    }

    /// Declares (or clears) a dataset's subject column (stewards of its department, admins).
    pub async fn set_subject(
        &self,
        actor: &Actor,
        department: &str,
        name: &str,
        column: Option<&str>,
        ctx: &CallContext,
    ) -> Result<Manifest, Error> {
        let detail = match column {
            Some(c) => format!("subject column {c}"),
            None => "no subject column".into(),
        };
        self.change_dataset(
            actor,
            department,
            name,
            "dataset.subject",
            detail,
            ctx,
            |d, dept| d.set_subject(dept, name, column),
        )
        .await
    }

    /// The catalog: every dataset's description, schema, classes and versions (not its data).
    pub fn catalog(&self, actor: &Actor) -> Result<Vec<Manifest>, Error> {
        authorize(&actor.principal, &Action::CatalogRead)?;
        self.datasets.list()
    }

    /// One catalog entry.
    pub fn catalog_entry(
        &self,
        actor: &Actor,
        department: &str,
        name: &str,
    ) -> Result<Manifest, Error> {
        authorize(&actor.principal, &Action::CatalogRead)?;
        self.datasets.get(department, name)
    }

    /// An older version of a dataset of `actor`'s own department: its manifest and the files
    /// of version `version`. Other departments read the current version only, under grants.
    pub fn version_files(
        &self,
        actor: &Actor,
        department: &str,
        name: &str,
        version: u64,
    ) -> Result<(Manifest, Vec<String>), Error> {
        let m = self.datasets.get(department, name)?;
        let dataset = m.sql_name();
        authorize(
            &actor.principal,
            &Action::DatasetQuery {
                dataset: &dataset,
                department: &m.department,
            },
        )?;
        let files = self.datasets.files(&m, Some(version))?;
        Ok((m, files))
    }

    /// The datasets `actor` may query, with the files of their current versions and of their
    /// rejects: its own department's, and other departments' under the active grant its
    /// department holds.
    pub fn queryable(&self, actor: &Actor) -> Result<Vec<Queryable>, Error> {
        let mut out = Vec::new();
        let own = actor.principal.department.as_ref().map(|d| d.as_str());
        for m in self.datasets.list()? {
            let dataset = m.sql_name();
            let action = Action::DatasetQuery {
                dataset: &dataset,
                department: &m.department,
            };
            if authorize(&actor.principal, &action).is_ok() {
                out.push(Queryable {
                    files: self.datasets.files(&m, None)?,
                    rejects_files: self.datasets.rejects_files(&m),
                    manifest: m,
                    grant: None,
                });
            } else if let Some(own) = own
                && let Some(grant) = self.active_grant(&dataset, own)
                && authorize(
                    &actor.principal,
                    &Action::GrantUse {
                        id: &grant.id,
                        grantee: &grant.grantee,
                    },
                )
                .is_ok()
            {
                out.push(Queryable {
                    files: self.datasets.files(&m, None)?,
                    rejects_files: Vec::new(),
                    manifest: m,
                    grant: Some(grant),
                });
            }
        }
        Ok(out)
    }
}
