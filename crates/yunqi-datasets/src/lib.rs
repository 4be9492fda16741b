//! Dataset storage: each dataset is a directory `DIR/datasets/<department>/<name>/` holding its
//! `manifest.json` and its Parquet files under `data/` — or, in a cluster, a manifest in the
//! shared metadata store and files in object storage ([`shared`]), for every dataset but those
//! the node's own streams write (views' results, entity tables), which stay in its directory.
//!
//! Architecture invariant: a version is visible whole or not at all. An import writes its
//! Parquet file (fsynced) first, then a new manifest to a temporary file (fsynced), then renames
//! it over `manifest.json` and fsyncs the directory. A crash before the rename leaves the
//! previous version intact and an unreferenced file, which the next open removes.
//!
//! Imports into one store are serialised; reads never wait for them (they read the manifest
//! they got). The store decides nothing about who may do what: governance does.
#![deny(missing_docs)]

pub mod csv_import;
pub mod ndjson_import;
pub mod parquet_import;
pub mod schema;
pub mod shared;
pub mod streams;

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use datafusion::arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use yunqi_types::{ColumnClass, Error, Name, suggest};

pub use csv_import::Reject;
pub use schema::{Column, ColumnType, Derivation, Manifest, Version, ViewSource};
pub use shared::{BlobInfo, Blobs, SharedManifests, SharedStore, SweepReport};
pub use streams::{StreamCatalog, StreamDeclarations, StreamManifest};

/// How an import combines with what is there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The new rows are added to the current version's.
    #[default]
    Append,
    /// The new rows replace the current version's.
    Replace,
    /// Each new row replaces the current row with the same key, or is added.
    Upsert,
}

/// How to read an import.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportOptions {
    /// Append, replace or upsert.
    pub mode: Mode,
    /// Key columns of an upsert: a new row replaces the current row with the same key.
    pub key: Vec<String>,
    /// Import the good rows and keep the bad ones in the rejects (otherwise refuse the file).
    pub lenient: bool,
    /// Field delimiter; detected when `None`.
    pub delimiter: Option<u8>,
    /// Whether the first row is a header; detected when `None`.
    pub header: Option<bool>,
    /// The file's format; detected when `None` (a first `{` means NDJSON).
    pub format: Option<Format>,
}

/// A file format an import reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Comma- (or tab-, semicolon-, bar-) separated values.
    Csv,
    /// One JSON object per line.
    Ndjson,
    /// Apache Parquet.
    Parquet,
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ImportReport {
    /// `department.name`.
    pub dataset: String,
    /// The version it made.
    pub version: u64,
    /// Rows imported.
    pub rows_imported: u64,
    /// Rows rejected (lenient imports).
    pub rows_rejected: u64,
    /// Rows in the new version.
    pub rows_total: u64,
    /// Rows of the previous version replaced by new rows with the same key (upserts).
    pub rows_replaced: u64,
    /// The first rejected rows.
    pub rejects: Vec<Reject>,
    /// Format read.
    pub format: Format,
    /// Text encoding read.
    pub encoding: String,
    /// Delimiter used.
    pub delimiter: String,
    /// Whether the first row was a header.
    pub header: bool,
    /// The columns after the import, with their classes.
    pub columns: Vec<Column>,
}

/// A version written but not yet visible.
#[derive(Debug)]
pub struct Staged {
    /// The manifest that publishing makes current.
    pub manifest: Manifest,
    /// What the import did.
    pub report: ImportReport,
    written: Vec<String>,
    /// The revision of the shared manifest the version was prepared on (`None` for a
    /// dataset in the node's directory).
    base: Option<u64>,
}

/// A new dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetSpec {
    /// Owning department.
    pub department: Name,
    /// Name.
    pub name: Name,
    /// Description.
    pub description: String,
    /// Declared columns; empty to take them from the first import.
    pub columns: Vec<Column>,
    /// The subject column, if declared.
    pub subject: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Kept in the node's own directory even in a cluster: written by the node's own streams
    /// (a view's results, an entity table).
    pub on_node: bool,
}

/// Files written for a version that is not staged yet: removed if the import stops on an error
/// (a failed write, a full disk), so nothing half-written stays behind.
struct Unstaged<'a> {
    store: &'a DatasetStore,
    place: Place,
    files: Vec<String>,
}

impl Drop for Unstaged<'_> {
    fn drop(&mut self) {
        for f in &self.files {
            self.store.remove_file(&self.place, f);
        }
    }
}

/// Where a dataset's manifest and files are.
#[derive(Debug, Clone)]
enum Place {
    /// `DIR/datasets/<department>/<name>/`.
    Local(PathBuf),
    /// The shared store, under `datasets/<department>/<name>/`.
    Shared(String),
}

/// This node's view of the shared store.
struct Shared {
    store: SharedStore,
    /// The revision of each shared dataset's manifest as this node last read or wrote it.
    revisions: Mutex<std::collections::HashMap<String, u64>>,
    /// The highest revision read (sync holds the lock, so syncs do not interleave).
    seen: Mutex<u64>,
}

fn conflict(sql_name: &str) -> Error {
    Error::new(
        yunqi_types::ErrorCode::Conflict,
        format!("dataset {sql_name} was changed on another node meanwhile"),
    )
    .detail("nothing of this change is visible")
    .hint("retry: the change is applied to the latest version")
}

/// Imports of this many rows or more are written as one Parquet file per core, in parallel.
pub const PARALLEL_ROWS_MIN: u64 = 256 * 1024;

/// Versions a continuous view's manifest keeps (older ones' files are removed at the next
/// start).
pub const VIEW_VERSIONS_KEPT: usize = 32;

/// A continuous view's version is compacted into one file when it would have more files.
pub const VIEW_FILES_MAX: usize = 32;

/// How often a cluster's node reads the shared manifests committed since it last looked, in
/// the background (queries also do before planning).
pub const SYNC_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Rejected rows shown in an error or a report.
pub const REJECTS_SHOWN: usize = 10;

/// The embedded dataset store.
pub struct DatasetStore {
    root: PathBuf,
    import_bytes_max: usize,
    imports: Mutex<()>,
    /// Every manifest, by `department.name`: read from disk once at open, then kept up to date
    /// by `write_manifest` (all writes go through this store), so that planning a query reads
    /// no file.
    manifests: std::sync::RwLock<std::collections::BTreeMap<String, Manifest>>,
    /// The cluster's shared store, if any.
    shared: Option<Shared>,
}

fn io(e: std::io::Error, what: &str) -> Error {
    Error::internal(format!("dataset storage: {what}: {e}")).hint("check the data directory's disk")
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(e, "sync directory"))
}

fn random_suffix() -> String {
    let mut b = [0u8; 6];
    let _ = getrandom::fill(&mut b);
    hex::encode(b)
}

/// Where a dataset stands ([`DatasetStore::latest`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latest {
    /// The latest version and its rows.
    pub version: Option<(u64, u64)>,
    /// A fingerprint of its columns, their classes and its subject column.
    pub policy: u64,
}

impl DatasetStore {
    /// Opens the store under `root` (created if missing) and removes files no manifest names
    /// (left by imports a crash interrupted).
    pub fn open(root: &Path, import_bytes_max: usize) -> Result<Arc<DatasetStore>, Error> {
        DatasetStore::open_with(root, import_bytes_max, None)
    }

    /// Opens the store of a cluster's node: datasets in `shared`, and those of the node's own
    /// streams under `root`.
    pub fn open_shared(
        root: &Path,
        import_bytes_max: usize,
        shared: SharedStore,
    ) -> Result<Arc<DatasetStore>, Error> {
        let store = DatasetStore::open_with(root, import_bytes_max, Some(shared))?;
        // What does not sync before reading (lookups' cache checks through `latest`) trails
        // other nodes' commits by at most this.
        let weak = Arc::downgrade(&store);
        std::thread::Builder::new()
            .name("yunqi-manifests".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(SYNC_EVERY);
                    let Some(store) = weak.upgrade() else { return };
                    if let Err(e) = store.sync() {
                        tracing::debug!(error = %e.message, "shared manifests not refreshed");
                    }
                }
            })
            .map_err(|e| Error::internal(format!("cannot start the manifests' sync: {e}")))?;
        Ok(store)
    }

    fn open_with(
        root: &Path,
        import_bytes_max: usize,
        shared: Option<SharedStore>,
    ) -> Result<Arc<DatasetStore>, Error> {
        fs::create_dir_all(root).map_err(|e| io(e, "create datasets directory"))?;
        let store = DatasetStore {
            root: root.to_path_buf(),
            import_bytes_max,
            imports: Mutex::new(()),
            manifests: Default::default(),
            shared: shared.map(|store| Shared {
                store,
                revisions: Default::default(),
                seen: Mutex::new(0),
            }),
        };
        let loaded = store.load_all()?;
        *store.manifests.write().expect("manifests lock") =
            loaded.into_iter().map(|m| (m.sql_name(), m)).collect();
        store.sync()?;
        let local: Vec<Manifest> = store
            .list()?
            .into_iter()
            .filter(|m| !store.is_shared(&m.sql_name()))
            .collect();
        for m in local {
            let dir = store.dir(&m.department, &m.name);
            let named: HashSet<String> = m
                .versions
                .iter()
                .flat_map(|v| v.files.iter().cloned().chain(v.rejects_file.clone()))
                .collect();
            if let Ok(entries) = fs::read_dir(dir.join("data")) {
                for e in entries.flatten() {
                    let rel = format!("data/{}", e.file_name().to_string_lossy());
                    if !named.contains(&rel) {
                        let _ = fs::remove_file(e.path());
                    }
                }
            }
        }
        Ok(Arc::new(store))
    }

    fn dir(&self, department: &str, name: &str) -> PathBuf {
        self.root.join(department).join(name)
    }

    /// Whether `sql_name` is a dataset of the shared store.
    fn is_shared(&self, sql_name: &str) -> bool {
        self.shared.as_ref().is_some_and(|s| {
            s.revisions
                .lock()
                .expect("revisions lock")
                .contains_key(sql_name)
        })
    }

    fn place(&self, department: &str, name: &str) -> Place {
        if self.is_shared(&format!("{department}.{name}")) {
            Place::Shared(shared::dataset_prefix(department, name))
        } else {
            Place::Local(self.dir(department, name))
        }
    }

    /// Where DataFusion reads a file of a dataset: an absolute path, or an object's URL.
    fn location(&self, place: &Place, rel: &str) -> String {
        match (place, &self.shared) {
            (Place::Local(dir), _) => dir.join(rel).to_string_lossy().into_owned(),
            (Place::Shared(prefix), Some(s)) => s.store.blobs.url(&format!("{prefix}{rel}")),
            (Place::Shared(_), None) => unreachable!("shared datasets need a shared store"),
        }
    }

    fn blobs(&self) -> &dyn Blobs {
        self.shared
            .as_ref()
            .expect("shared datasets need a shared store")
            .store
            .blobs
            .as_ref()
    }

    /// The cluster's object store, for state kept beside the shared datasets (continuous
    /// views' checkpoints); `None` when every dataset is on this node.
    pub fn shared_blobs(&self) -> Option<Arc<dyn Blobs>> {
        self.shared.as_ref().map(|s| s.store.blobs.clone())
    }

    /// Whether `department.name` is one of the cluster's shared datasets (as this node last
    /// read them), rather than this node's own.
    pub fn is_shared_dataset(&self, department: &str, name: &str) -> bool {
        self.is_shared(&format!("{department}.{name}"))
    }

    /// The object store DataFusion reads shared datasets through, and the URL to register it
    /// under (`None` when every dataset is on this node).
    pub fn object_store(&self) -> Option<(String, Arc<dyn object_store::ObjectStore>)> {
        self.shared.as_ref().map(|s| s.store.blobs.object_store())
    }

    /// Where the rejects files of every version are (absolute paths or object URLs).
    pub fn rejects_files(&self, m: &Manifest) -> Vec<String> {
        let place = self.place(&m.department, &m.name);
        m.versions
            .iter()
            .filter_map(|v| v.rejects_file.as_ref())
            .map(|f| self.location(&place, f))
            .collect()
    }

    /// Where a version's data files are (the current version when `None`): absolute paths,
    /// or object URLs.
    pub fn files(&self, m: &Manifest, version: Option<u64>) -> Result<Vec<String>, Error> {
        let v = match version {
            Some(n) => Some(m.version(n)?),
            None => m.current(),
        };
        let place = self.place(&m.department, &m.name);
        Ok(
            v.map(|v| v.files.iter().map(|f| self.location(&place, f)).collect())
                .unwrap_or_default(),
        )
    }

    /// Reads the shared manifests committed since this node last looked (nothing to do
    /// without a shared store). Queries call it through [`DatasetStore::list`], so that a
    /// version committed on any node before a query starts is the version it reads.
    pub fn sync(&self) -> Result<(), Error> {
        let Some(s) = &self.shared else {
            return Ok(());
        };
        let mut seen = s.seen.lock().expect("seen lock");
        let (changed, top) = s.store.manifests.since(*seen)?;
        if !changed.is_empty() {
            let mut manifests = self.manifests.write().expect("manifests lock");
            let mut revisions = s.revisions.lock().expect("revisions lock");
            for (m, revision) in changed {
                let name = m.sql_name();
                if !revisions.contains_key(&name) && manifests.contains_key(&name) {
                    tracing::warn!(
                        dataset = %name,
                        "a shared dataset has the name of one of this node's own; the node's is kept"
                    );
                    continue;
                }
                if revisions.get(&name).is_none_or(|&r| r < revision) {
                    revisions.insert(name.clone(), revision);
                    manifests.insert(name, m);
                }
            }
        }
        *seen = top.max(*seen);
        Ok(())
    }

    /// Holds the cluster-wide lock on writes to a shared dataset until the guard is dropped
    /// (`None` for a dataset on this node, which the caller's own lock serialises).
    pub fn lock_writes(
        &self,
        department: &str,
        name: &str,
    ) -> Result<Option<Box<dyn Send>>, Error> {
        let sql_name = format!("{department}.{name}");
        self.sync()?;
        match &self.shared {
            Some(s) if self.is_shared(&sql_name) => Ok(Some(s.store.manifests.lock(&sql_name)?)),
            _ => Ok(None),
        }
    }

    /// Removes the shared store's files that no manifest names and that are older than
    /// `grace` (an import on another node may still be about to commit younger ones).
    pub fn sweep(
        &self,
        grace: std::time::Duration,
        now: DateTime<Utc>,
    ) -> Result<SweepReport, Error> {
        let mut report = SweepReport::default();
        if self.shared.is_none() {
            return Ok(report);
        }
        // Listed before the manifests are read: a file committed meanwhile is named by them.
        let objects = self.blobs().list("datasets/")?;
        self.sync()?;
        let mut named = HashSet::new();
        for m in self.manifests.read().expect("manifests lock").values() {
            if !self.is_shared(&m.sql_name()) {
                continue;
            }
            let prefix = shared::dataset_prefix(&m.department, &m.name);
            for v in &m.versions {
                for f in v.files.iter().chain(v.rejects_file.iter()) {
                    named.insert(format!("{prefix}{f}"));
                }
            }
        }
        let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
        for o in objects {
            report.objects += 1;
            if named.contains(&o.key) {
                continue;
            }
            if now - o.modified < grace {
                report.young += 1;
                continue;
            }
            self.blobs().delete(&o.key)?;
            report.removed += 1;
            report.bytes_removed += o.size;
        }
        Ok(report)
    }

    /// Creates an empty dataset.
    pub fn create(&self, spec: DatasetSpec, now: DateTime<Utc>) -> Result<Manifest, Error> {
        let _guard = self.imports.lock().expect("imports lock");
        let dir = self.dir(spec.department.as_str(), spec.name.as_str());
        let shared = self.shared.is_some() && !spec.on_node;
        if shared {
            self.sync()?;
        }
        if self
            .get(spec.department.as_str(), spec.name.as_str())
            .is_ok()
        {
            return Err(Error::already_exists(
                "dataset",
                &format!("{}.{}", spec.department, spec.name),
            )
            .hint("import into it, or pick another name"));
        }
        if spec.name.as_str().contains("__") {
            return Err(Error::invalid(format!("invalid dataset name \"{}\"", spec.name))
                .detail("names with \"__\" are kept for the tables yunqi derives from datasets (`__rejects`)")
                .hint("use single underscores"));
        }
        let mut seen = HashSet::new();
        for c in &spec.columns {
            Name::parse("column", &c.name)?;
            if !seen.insert(c.name.clone()) {
                return Err(
                    Error::invalid(format!("column \"{}\" is declared twice", c.name))
                        .hint("give every column a different name"),
                );
            }
        }
        if let Some(s) = &spec.subject
            && !spec.columns.is_empty()
            && !spec.columns.iter().any(|c| &c.name == s)
        {
            return Err(
                Error::invalid(format!("subject column \"{s}\" is not declared"))
                    .hint("name one of the declared columns, or leave the subject out"),
            );
        }
        if !shared {
            fs::create_dir_all(dir.join("data")).map_err(|e| io(e, "create dataset directory"))?;
        }
        let tags = check_tags(spec.tags)?;
        let m = Manifest {
            derived_from: None,
            tags,
            subject_declared: spec.subject.is_some(),
            subject: spec.subject,
            format: schema::MANIFEST_FORMAT,
            department: spec.department.to_string(),
            name: spec.name.to_string(),
            description: spec.description,
            columns: spec.columns,
            versions: Vec::new(),
            created_at: now,
            view: None,
        };
        if shared {
            self.commit_shared(&m, None).map_err(|e| match e.code {
                yunqi_types::ErrorCode::Conflict => Error::already_exists("dataset", &m.sql_name())
                    .hint("import into it, or pick another name"),
                _ => e,
            })?;
        } else {
            self.write_manifest(&m)?;
        }
        Ok(m)
    }

    /// Where a dataset stands, without copying its manifest (`None`: no such dataset): its
    /// latest version and row count (`None` before the first version), and a fingerprint of
    /// what decides how it is read — its columns with their classes and its subject column —
    /// that changes whenever those do.
    pub fn latest(&self, sql_name: &str) -> Option<Latest> {
        use std::hash::{Hash, Hasher};
        let manifests = self.manifests.read().expect("manifests lock");
        let m = manifests.get(sql_name)?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for c in &m.columns {
            (&c.name, c.class, c.column_type).hash(&mut h);
        }
        m.subject.hash(&mut h);
        Some(Latest {
            version: m.versions.last().map(|v| (v.version, v.rows)),
            policy: h.finish(),
        })
    }

    /// A dataset's manifest as committed now, on any node (one round trip to the shared store
    /// in a cluster; the cache alone may be half a second behind): for checks a change must
    /// make against the dataset's current columns.
    pub fn get_current(&self, department: &str, name: &str) -> Result<Manifest, Error> {
        self.sync()?;
        self.get(department, name)
    }

    /// The manifest of a dataset.
    pub fn get(&self, department: &str, name: &str) -> Result<Manifest, Error> {
        let sql_name = format!("{department}.{name}");
        if let Some(m) = self
            .manifests
            .read()
            .expect("manifests lock")
            .get(&sql_name)
        {
            return Ok(m.clone());
        }
        // Created on another node a moment ago: read what was committed since, then look again.
        if self.shared.is_some() {
            self.sync()?;
        }
        let manifests = self.manifests.read().expect("manifests lock");
        if let Some(m) = manifests.get(&sql_name) {
            return Ok(m.clone());
        }
        let e = Error::not_found("dataset", &sql_name);
        Err(
            match suggest::did_you_mean(&sql_name, manifests.keys().map(String::as_str)) {
                Some(s) => e.hint(format!("did you mean \"{s}\"?")),
                None => e.hint("list datasets with `yunqi dataset list`"),
            },
        )
    }

    /// A dataset's manifest and, for a shared one, the revision it is at (read together).
    fn get_based(&self, department: &str, name: &str) -> Result<(Manifest, Option<u64>), Error> {
        let sql_name = format!("{department}.{name}");
        {
            let manifests = self.manifests.read().expect("manifests lock");
            if let Some(m) = manifests.get(&sql_name) {
                let revision = self.shared.as_ref().and_then(|s| {
                    s.revisions
                        .lock()
                        .expect("revisions lock")
                        .get(&sql_name)
                        .copied()
                });
                return Ok((m.clone(), revision));
            }
        }
        self.get(department, name).map(|m| (m, None))
    }

    /// Commits a shared dataset's manifest over revision `expected` (`None`: a new dataset).
    fn commit_shared(&self, m: &Manifest, expected: Option<u64>) -> Result<(), Error> {
        let s = self
            .shared
            .as_ref()
            .expect("shared datasets need a shared store");
        let name = m.sql_name();
        let revision = s
            .store
            .manifests
            .commit(m, expected)
            .map_err(|e| match e.code {
                yunqi_types::ErrorCode::Conflict => conflict(&name),
                _ => e,
            })?;
        let mut manifests = self.manifests.write().expect("manifests lock");
        let mut revisions = s.revisions.lock().expect("revisions lock");
        if revisions.get(&name).is_none_or(|&r| r < revision) {
            revisions.insert(name.clone(), revision);
            manifests.insert(name, m.clone());
        }
        Ok(())
    }

    /// Writes a manifest read at revision `base` (shared) or from this node's directory
    /// (`None`).
    fn write(&self, m: &Manifest, base: Option<u64>) -> Result<(), Error> {
        match base {
            Some(b) => self.commit_shared(m, Some(b)),
            None => self.write_manifest(m),
        }
    }

    /// Reads one manifest from disk.
    fn read_manifest(&self, department: &str, name: &str) -> Result<Manifest, Error> {
        let path = self.dir(department, name).join("manifest.json");
        let bytes = fs::read(&path).map_err(|e| io(e, "read manifest"))?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
            Error::internal(format!(
                "manifest of {department}.{name} cannot be read: {e}"
            ))
        })?;
        if m.format != schema::MANIFEST_FORMAT {
            return Err(Error::internal(format!(
                "manifest of {department}.{name} has format {}",
                m.format
            ))
            .hint("run the yunqi release that wrote it, or a newer one"));
        }
        Ok(m)
    }

    /// Every dataset, by `department.name`. In a cluster it first reads the shared manifests
    /// committed since it last looked (when the metadata store cannot be reached, it answers
    /// with what it read before).
    pub fn list(&self) -> Result<Vec<Manifest>, Error> {
        if let Err(e) = self.sync() {
            tracing::warn!(error = %e.message, "shared dataset manifests not refreshed");
        }
        Ok(self
            .manifests
            .read()
            .expect("manifests lock")
            .values()
            .cloned()
            .collect())
    }

    /// Every manifest on disk.
    fn load_all(&self) -> Result<Vec<Manifest>, Error> {
        let mut out = Vec::new();
        let Ok(departments) = fs::read_dir(&self.root) else {
            return Ok(out);
        };
        for d in departments.flatten() {
            let Ok(datasets) = fs::read_dir(d.path()) else {
                continue;
            };
            for ds in datasets.flatten() {
                if ds.path().join("manifest.json").exists() {
                    out.push(self.read_manifest(
                        &d.file_name().to_string_lossy(),
                        &ds.file_name().to_string_lossy(),
                    )?);
                }
            }
        }
        out.sort_by_key(Manifest::sql_name);
        Ok(out)
    }

    fn write_manifest(&self, m: &Manifest) -> Result<(), Error> {
        let dir = self.dir(&m.department, &m.name);
        let tmp = dir.join(".manifest.json.tmp");
        let bytes =
            serde_json::to_vec_pretty(m).map_err(|e| Error::internal(format!("manifest: {e}")))?;
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&tmp)
            .map_err(|e| io(e, "write manifest"))?;
        f.write_all(&bytes)
            .and_then(|_| f.sync_all())
            .map_err(|e| io(e, "write manifest"))?;
        fs::rename(&tmp, dir.join("manifest.json")).map_err(|e| io(e, "publish manifest"))?;
        sync_dir(&dir)?;
        self.manifests
            .write()
            .expect("manifests lock")
            .insert(m.sql_name(), m.clone());
        Ok(())
    }

    /// Writes `batch` as the Parquet file `rel` of the dataset at `place`; returns its size.
    fn write_parquet(&self, place: &Place, rel: &str, batch: &RecordBatch) -> Result<u64, Error> {
        match place {
            Place::Local(dir) => self.write_parquet_file(&dir.join(rel), batch),
            Place::Shared(prefix) => {
                let props = WriterProperties::builder()
                    .set_compression(Compression::SNAPPY)
                    .build();
                let mut out = Vec::new();
                let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(props))
                    .map_err(|e| Error::internal(format!("cannot write Parquet: {e}")))?;
                writer
                    .write(batch)
                    .and_then(|_| writer.close().map(|_| ()))
                    .map_err(|e| Error::internal(format!("cannot write Parquet: {e}")))?;
                let size = out.len() as u64;
                self.blobs()
                    .put(&format!("{prefix}{rel}"), bytes::Bytes::from(out))?;
                Ok(size)
            }
        }
    }

    /// Removes file `rel` of the dataset at `place`, if it is there.
    fn remove_file(&self, place: &Place, rel: &str) {
        match place {
            Place::Local(dir) => {
                let _ = fs::remove_file(dir.join(rel));
            }
            Place::Shared(prefix) => {
                if let Err(e) = self.blobs().delete(&format!("{prefix}{rel}")) {
                    tracing::warn!(error = %e.message, file = %rel, "a file left for the sweeper");
                }
            }
        }
    }

    fn write_parquet_file(&self, path: &Path, batch: &RecordBatch) -> Result<u64, Error> {
        let file = File::create(path).map_err(|e| io(e, "create data file"))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props))
            .map_err(|e| Error::internal(format!("cannot write Parquet: {e}")))?;
        writer
            .write(batch)
            .map_err(|e| Error::internal(format!("cannot write Parquet: {e}")))?;
        let file = writer
            .into_inner()
            .map_err(|e| Error::internal(format!("cannot write Parquet: {e}")))?;
        file.sync_all().map_err(|e| io(e, "sync data file"))?;
        Ok(file.metadata().map(|m| m.len()).unwrap_or(0))
    }

    /// Imports CSV bytes into a dataset as a new version: [`DatasetStore::prepare_import`],
    /// then [`DatasetStore::publish`].
    pub fn import_csv(
        &self,
        department: &str,
        name: &str,
        bytes: &[u8],
        options: ImportOptions,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<ImportReport, Error> {
        let staged = self.prepare_import(department, name, bytes, options, by, now)?;
        self.publish(&staged)?;
        Ok(staged.report)
    }

    /// Reads CSV bytes and writes their rows as Parquet files of the next version, which no
    /// reader sees until [`DatasetStore::publish`]. Strict imports refuse the whole file if any
    /// row is bad, naming the first bad rows; lenient ones keep the bad rows, with line and
    /// reason, in the version's rejects. The caller serialises imports into one dataset.
    pub fn prepare_import(
        &self,
        department: &str,
        name: &str,
        bytes: &[u8],
        options: ImportOptions,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<Staged, Error> {
        if bytes.len() > self.import_bytes_max {
            return Err(Error::limit(
                "import_bytes_max",
                self.import_bytes_max as u64,
                "file is too large to import at once",
            )
            .hint("split the file and import the parts with --mode append"));
        }
        // In a cluster, the version is prepared on the latest one any node committed.
        self.sync()?;
        let (mut m, base) = self.get_based(department, name)?;
        if let Some(v) = &m.view {
            return Err(Error::invalid(format!(
                "{} is written by a continuous view, not by imports",
                m.sql_name()
            ))
            .detail(format!("it holds the results of: {}", v.sql))
            .hint("send events to the stream it reads instead"));
        }
        let parquet = match options.format {
            Some(Format::Parquet) => true,
            Some(_) => false,
            None => parquet_import::looks_like_parquet(bytes),
        };
        let (text, encoding, undecodable) = if parquet {
            (std::borrow::Cow::Borrowed(""), "binary", Vec::new())
        } else {
            csv_import::decode(bytes)?
        };
        let format = if parquet {
            Format::Parquet
        } else {
            options
                .format
                .unwrap_or(if ndjson_import::looks_like_ndjson(&text) {
                    Format::Ndjson
                } else {
                    Format::Csv
                })
        };
        let parsed = match format {
            Format::Parquet => {
                if m.columns.is_empty() {
                    m.columns = parquet_import::infer_columns(bytes)?;
                }
                parquet_import::parse(bytes, &m.columns)?
            }
            Format::Csv => {
                let delimiter = options
                    .delimiter
                    .unwrap_or_else(|| csv_import::detect_delimiter(&text));
                let mut header = options.header;
                if m.columns.is_empty() {
                    m.columns = csv_import::infer_columns(&text, delimiter)?;
                    header = Some(true);
                }
                csv_import::parse(&text, delimiter, &m.columns, header)?
            }
            Format::Ndjson => {
                if m.columns.is_empty() {
                    m.columns = ndjson_import::infer_columns(&text)?;
                }
                ndjson_import::parse(&text, &m.columns)?
            }
        };
        let mut parsed = parsed;
        if !undecodable.is_empty() {
            parsed.rejects.extend(undecodable);
            parsed.rejects.sort_by_key(|r| r.line);
        }
        let key = if options.mode == Mode::Upsert {
            parsed.unify()?;
            let key = key_columns(&m, &options.key)?;
            reject_key_conflicts(&mut parsed, &key)?;
            Some(key)
        } else {
            None
        };
        if !options.lenient && !parsed.rejects.is_empty() {
            let shown: Vec<String> = parsed
                .rejects
                .iter()
                .take(REJECTS_SHOWN)
                .map(|r| match &r.column {
                    Some(c) => format!("line {}, column {c}: {}", r.line, r.reason),
                    None => format!("line {}: {}", r.line, r.reason),
                })
                .collect();
            return Err(Error::invalid(format!(
                "import into dataset \"{}\" refused: {} of {} rows are invalid",
                m.sql_name(),
                parsed.rejects.len(),
                parsed.rejects.len() + parsed.rows()
            ))
            .detail(shown.join("; "))
            .hint("fix those rows, or import with --lenient to take the good rows and keep the bad ones in the rejects"));
        }
        let previous = m.current().cloned();
        let number = previous.as_ref().map_or(0, |v| v.version) + 1;
        let place = self.place(&m.department, &m.name);
        let (mut files, mut rows_total, mut bytes_total) = match (options.mode, &previous) {
            (Mode::Append, Some(p)) => (p.files.clone(), p.rows, p.bytes),
            _ => (Vec::new(), 0, 0),
        };
        let imported = parsed.rows() as u64;
        // Removed again if the import stops on an error before it is staged.
        let mut written = Unstaged {
            store: self,
            place: place.clone(),
            files: Vec::new(),
        };
        let mut rows_replaced = 0;
        if let (Some(key), Some(p)) = (&key, &previous) {
            // The previous rows whose key no new row has, rewritten as one file.
            let new_keys: std::collections::HashSet<String> = (0..parsed.batch.num_rows())
                .filter_map(|row| key_of(&parsed.batch, key, row))
                .collect();
            let old = self.read_files(&m, &p.files)?;
            let kept = keep_rows(&old, |b, row| {
                key_of(b, key, row).is_none_or(|k| !new_keys.contains(&k))
            })?;
            rows_replaced = p.rows - kept.num_rows() as u64;
            if kept.num_rows() > 0 {
                let rel = format!("data/v{number:06}-kept-{}.parquet", random_suffix());
                written.files.push(rel.clone());
                bytes_total += self.write_parquet(&place, &rel, &kept)?;
                files.push(rel);
                rows_total += kept.num_rows() as u64;
            }
        }
        if imported > 0 {
            // Large versions are written as one file per core, in parallel.
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
            let parts = if imported >= PARALLEL_ROWS_MIN {
                threads
            } else {
                1
            };
            let rows = parsed.batch.num_rows();
            let slices: Vec<(String, RecordBatch)> = if parsed.pieces.is_empty() {
                (0..parts)
                    .map(|i| {
                        let (a, b) = (rows * i / parts, rows * (i + 1) / parts);
                        (
                            format!("data/v{number:06}-{}.parquet", random_suffix()),
                            parsed.batch.slice(a, b - a),
                        )
                    })
                    .collect()
            } else {
                // A parallel parse's pieces, written as they are.
                parsed
                    .pieces
                    .iter()
                    .filter(|p| p.num_rows() > 0)
                    .map(|p| {
                        (
                            format!("data/v{number:06}-{}.parquet", random_suffix()),
                            p.clone(),
                        )
                    })
                    .collect()
            };
            written
                .files
                .extend(slices.iter().map(|(rel, _)| rel.clone()));
            let sizes: Vec<Result<u64, Error>> = std::thread::scope(|scope| {
                let handles: Vec<_> = slices
                    .iter()
                    .map(|(rel, batch)| {
                        let place = &place;
                        scope.spawn(move || self.write_parquet(place, rel, batch))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(Error::internal("a writer thread panicked")))
                    })
                    .collect()
            });
            for (size, (rel, _)) in sizes.into_iter().zip(slices) {
                bytes_total += size?;
                files.push(rel);
            }
            rows_total += imported;
        }
        let rejects_file = if parsed.rejects.is_empty() {
            None
        } else {
            let rel = format!("data/v{number:06}-rejects-{}.parquet", random_suffix());
            written.files.push(rel.clone());
            self.write_parquet(&place, &rel, &rejects_batch(number, &parsed.rejects)?)?;
            Some(rel)
        };
        csv_import::update_classes(&mut m.columns, &parsed.samples);
        // The new version is what was imported; a derivation records itself afterwards.
        m.derived_from = None;
        if !m.subject_declared {
            let ids: Vec<&Column> = m
                .columns
                .iter()
                .filter(|c| c.detected == Some(yunqi_types::Detected::IdNumber))
                .collect();
            if let [only] = ids.as_slice() {
                m.subject = Some(only.name.clone());
            }
        }
        m.versions.push(Version {
            version: number,
            created_at: now,
            created_by: by.to_string(),
            mode: match options.mode {
                Mode::Append => "append".into(),
                Mode::Replace => "replace".into(),
                Mode::Upsert => format!("upsert by {}", options.key.join(",")),
            },
            files,
            rows: rows_total,
            bytes: bytes_total,
            rejected: parsed.rejects.len() as u64,
            rejects_file,
            through_us: None,
        });
        let report = ImportReport {
            dataset: m.sql_name(),
            version: number,
            rows_imported: imported,
            rows_rejected: parsed.rejects.len() as u64,
            rows_total,
            rows_replaced,
            rejects: parsed.rejects.into_iter().take(REJECTS_SHOWN).collect(),
            encoding: encoding.to_string(),
            format,
            delimiter: match format {
                Format::Csv => (parsed.delimiter as char).to_string(),
                Format::Ndjson | Format::Parquet => String::new(),
            },
            header: parsed.header,
            columns: m.columns.clone(),
        };
        Ok(Staged {
            manifest: m,
            report,
            written: std::mem::take(&mut written.files),
            base,
        })
    }

    /// Reads data files of `m` with its current schema (columns added since read as NULL).
    fn read_files(&self, m: &Manifest, files: &[String]) -> Result<Vec<RecordBatch>, Error> {
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let place = self.place(&m.department, &m.name);
        let schema = m.arrow_schema();
        let mut out = Vec::new();
        for f in files {
            let reader = match &place {
                Place::Local(dir) => {
                    let file =
                        fs::File::open(dir.join(f)).map_err(|e| io(e, "read a data file"))?;
                    ParquetRecordBatchReaderBuilder::try_new(file).and_then(|b| b.build())
                }
                Place::Shared(prefix) => {
                    let bytes = self.blobs().get(&format!("{prefix}{f}"))?;
                    ParquetRecordBatchReaderBuilder::try_new(bytes).and_then(|b| b.build())
                }
            }
            .map_err(|e| Error::internal(format!("cannot read {f}: {e}")))?;
            for b in reader {
                let b = b.map_err(|e| Error::internal(format!("cannot read {f}: {e}")))?;
                let columns: Vec<ArrayRef> = schema
                    .fields()
                    .iter()
                    .map(|field| match b.column_by_name(field.name()) {
                        Some(c) => c.clone(),
                        None => datafusion::arrow::array::new_null_array(
                            field.data_type(),
                            b.num_rows(),
                        ),
                    })
                    .collect();
                out.push(
                    RecordBatch::try_new(schema.clone(), columns)
                        .map_err(|e| Error::internal(format!("cannot read {f}: {e}")))?,
                );
            }
        }
        Ok(out)
    }

    /// Makes a prepared version visible, atomically.
    /// In a cluster, a version prepared on a revision another node has since replaced is
    /// refused with a `conflict` error, and nothing of it becomes visible.
    pub fn publish(&self, staged: &Staged) -> Result<(), Error> {
        let _guard = self.imports.lock().expect("imports lock");
        self.write(&staged.manifest, staged.base)
    }

    /// Removes the files of a prepared version that will not be published.
    pub fn discard(&self, staged: Staged) {
        let place = self.place(&staged.manifest.department, &staged.manifest.name);
        for f in staged.written {
            self.remove_file(&place, &f);
        }
    }

    /// Changes a dataset's manifest (not its data) under the imports lock, and writes it.
    fn update(
        &self,
        department: &str,
        name: &str,
        change: impl Fn(&mut Manifest) -> Result<(), Error>,
    ) -> Result<Manifest, Error> {
        let _guard = self.imports.lock().expect("imports lock");
        // A shared manifest another node changed meanwhile is read again and changed anew.
        let mut attempt = 0;
        loop {
            self.sync()?;
            let (mut m, base) = self.get_based(department, name)?;
            change(&mut m)?;
            match self.write(&m, base) {
                Err(e) if e.code == yunqi_types::ErrorCode::Conflict && attempt < 8 => {
                    attempt += 1;
                }
                Err(e) => return Err(e),
                Ok(()) => return Ok(m),
            }
        }
    }

    /// Marks a dataset as a continuous view's result (or late table).
    pub fn set_view(
        &self,
        department: &str,
        name: &str,
        view: Option<ViewSource>,
    ) -> Result<Manifest, Error> {
        self.update(department, name, |m| {
            m.view = view.clone();
            Ok(())
        })
    }

    /// Appends a continuous view's newly closed windows as a new version marked `through_us`
    /// (the end of the last window written). Views write often, so the manifest keeps the last
    /// [`VIEW_VERSIONS_KEPT`] versions and the rows are compacted into one file once the
    /// version has [`VIEW_FILES_MAX`] files.
    ///
    /// `rows` is given the mark of the version the new one is written over (`i64::MIN`
    /// before the first) and answers the rows of windows after it: on a cluster the mark is
    /// the one the version is committed over (compare-and-set), so a window is never written
    /// twice, whichever runner writes. `None` when there was nothing after the mark.
    pub fn append_view_rows(
        &self,
        department: &str,
        name: &str,
        rows: &dyn Fn(i64) -> Result<RecordBatch, Error>,
        through_us: i64,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<RecordBatch>, Error> {
        let pick = |mark: Option<i64>| -> Result<Option<RecordBatch>, Error> {
            let mark = mark.unwrap_or(i64::MIN);
            let batch = rows(mark)?;
            Ok((batch.num_rows() > 0 || through_us > mark).then_some(batch))
        };
        let written =
            self.write_view_version(department, name, &pick, Some(through_us), false, by, now)?;
        Ok(written.map(|(_, batch)| batch))
    }

    /// Replaces a view's late table with `batch`, as a new version.
    pub fn replace_view_rows(
        &self,
        department: &str,
        name: &str,
        batch: &RecordBatch,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<Manifest, Error> {
        self.write_view_version(
            department,
            name,
            &|_| Ok(Some(batch.clone())),
            None,
            true,
            by,
            now,
        )
        .map(|w| w.expect("a replacement is always written").0)
    }

    /// Replaces an entity table's rows with `batch`, the latest state of every entity as of
    /// log offset `offset` (kept in the version's `through_us`, read back by
    /// [`DatasetStore::entity_rows`]).
    pub fn replace_entity_rows(
        &self,
        department: &str,
        name: &str,
        batch: &RecordBatch,
        offset: u64,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<Manifest, Error> {
        let offset = i64::try_from(offset)
            .map_err(|_| Error::internal("entity table offset out of range"))?;
        self.write_view_version(
            department,
            name,
            &|_| Ok(Some(batch.clone())),
            Some(offset),
            true,
            by,
            now,
        )
        .map(|w| w.expect("a replacement is always written").0)
    }

    /// An entity table's current rows and the log offset they reflect (0 and no rows before
    /// the first snapshot).
    pub fn entity_rows(
        &self,
        department: &str,
        name: &str,
    ) -> Result<(Vec<RecordBatch>, u64), Error> {
        let m = self.get(department, name)?;
        let Some(v) = m.current() else {
            return Ok((Vec::new(), 0));
        };
        let batches = self.read_files(&m, &v.files)?;
        Ok((batches, v.through_us.unwrap_or(0).max(0) as u64))
    }

    /// Writes a view's next version with the rows `batch` picks given the current version's
    /// mark (`None` from it: nothing to write, no version); the manifest and the rows written.
    #[allow(clippy::too_many_arguments)]
    fn write_view_version(
        &self,
        department: &str,
        name: &str,
        batch: &dyn Fn(Option<i64>) -> Result<Option<RecordBatch>, Error>,
        through_us: Option<i64>,
        replace: bool,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<(Manifest, RecordBatch)>, Error> {
        let _guard = self.imports.lock().expect("imports lock");
        let (mut m, base) = self.get_based(department, name)?;
        if m.view.is_none() {
            return Err(Error::invalid(format!(
                "{} is not a continuous view",
                m.sql_name()
            )));
        }
        let Some(batch) = batch(m.current().and_then(|v| v.through_us))? else {
            return Ok(None);
        };
        let place = self.place(department, name);
        let number = m.versions.last().map_or(1, |v| v.version + 1);
        let (mut files, mut rows, mut bytes) = match (replace, m.current()) {
            (false, Some(v)) => (v.files.clone(), v.rows, v.bytes),
            _ => (Vec::new(), 0, 0),
        };
        let mut written = Unstaged {
            store: self,
            place: place.clone(),
            files: Vec::new(),
        };
        if batch.num_rows() > 0 {
            let rel = format!("data/v{number:06}-{}.parquet", random_suffix());
            written.files.push(rel.clone());
            if files.len() >= VIEW_FILES_MAX {
                let mut all = self.read_files(&m, &files)?;
                all.push(batch.clone());
                let merged = datafusion::arrow::compute::concat_batches(&m.arrow_schema(), &all)
                    .map_err(|e| Error::internal(format!("compact view rows: {e}")))?;
                bytes = self.write_parquet(&place, &rel, &merged)?;
                files = vec![rel];
            } else {
                bytes += self.write_parquet(&place, &rel, &batch)?;
                files.push(rel);
            }
            rows += batch.num_rows() as u64;
        }
        m.versions.push(Version {
            version: number,
            created_at: now,
            created_by: by.to_string(),
            mode: if replace { "replace" } else { "append" }.into(),
            files,
            rows,
            bytes,
            rejected: 0,
            rejects_file: None,
            through_us: through_us.or_else(|| m.current().and_then(|v| v.through_us)),
        });
        let mut dropped = Vec::new();
        if m.versions.len() > VIEW_VERSIONS_KEPT {
            let extra = m.versions.len() - VIEW_VERSIONS_KEPT;
            dropped = m.versions.drain(..extra).collect::<Vec<_>>();
        }
        self.write(&m, base)?;
        written.files.clear();
        // Files only the dropped versions held are removed (replaced tables would otherwise
        // keep one file per version forever).
        for v in dropped {
            for f in v.files {
                if !m.versions.iter().any(|k| k.files.contains(&f)) {
                    self.remove_file(&place, &f);
                }
            }
        }
        Ok(Some((m, batch)))
    }

    /// Records how a dataset's current version was derived (or, with `None`, that it was not).
    pub fn set_derivation(
        &self,
        department: &str,
        name: &str,
        derivation: Option<Derivation>,
    ) -> Result<Manifest, Error> {
        self.update(department, name, |m| {
            m.derived_from = derivation.clone();
            Ok(())
        })
    }

    /// Replaces a dataset's tags.
    pub fn set_tags(
        &self,
        department: &str,
        name: &str,
        tags: Vec<String>,
    ) -> Result<Manifest, Error> {
        self.update(department, name, |m| {
            m.tags = check_tags(tags.clone())?;
            Ok(())
        })
    }

    /// Sets (or, with `None`, clears) the subject column, as a steward declares it.
    pub fn set_subject(
        &self,
        department: &str,
        name: &str,
        column: Option<&str>,
    ) -> Result<Manifest, Error> {
        self.update(department, name, |m| {
            if let Some(c) = column
                && m.column_index(c).is_none()
            {
                return Err(unknown_column(m, c));
            }
            m.subject = column.map(str::to_string);
            m.subject_declared = true;
            Ok(())
        })
    }

    /// Adds a column at the end of the schema. Rows of earlier versions read it as NULL.
    pub fn add_column(
        &self,
        department: &str,
        name: &str,
        column: Column,
    ) -> Result<Manifest, Error> {
        Name::parse("column", &column.name)?;
        self.update(department, name, |m| {
            if m.column_index(&column.name).is_some() {
                return Err(Error::already_exists(
                    "column",
                    &format!("{}.{}", m.sql_name(), column.name),
                )
                .hint("pick another name"));
            }
            if m.columns.is_empty() {
                return Err(Error::invalid(format!(
                    "dataset {} has no columns yet",
                    m.sql_name()
                ))
                .hint("import a file first (its columns become the schema), or declare them at creation"));
            }
            m.columns.push(column.clone());
            Ok(())
        })
    }

    /// Sets a column's class, as a steward declares it.
    pub fn set_class(
        &self,
        department: &str,
        name: &str,
        column: &str,
        class: ColumnClass,
    ) -> Result<Manifest, Error> {
        self.update(department, name, |m| {
            let i = m
                .column_index(column)
                .ok_or_else(|| unknown_column(m, column))?;
            m.columns[i].class = class;
            m.columns[i].class_declared = true;
            Ok(())
        })
    }
}

/// `column` is not a column of `m`: with the closest name, or the list of names.
fn unknown_column(m: &Manifest, column: &str) -> Error {
    let names: Vec<&str> = m.columns.iter().map(|c| c.name.as_str()).collect();
    let e = Error::not_found("column", &format!("{}.{column}", m.sql_name()));
    match suggest::did_you_mean(column, names.iter().copied()) {
        Some(s) => e.hint(format!("did you mean \"{s}\"?")),
        None => e.hint(format!("columns: {}", names.join(", "))),
    }
}

/// The schema of the rejects table (`department.dataset__rejects` in SQL).
pub fn rejects_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("version", DataType::Int64, false),
        Field::new("line", DataType::Int64, false),
        Field::new("column", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, false),
        Field::new("raw", DataType::Utf8, false),
    ]))
}

/// The suffix that names a dataset's rejects table in SQL.
pub const REJECTS_SUFFIX: &str = "__rejects";

fn rejects_batch(version: u64, rejects: &[Reject]) -> Result<RecordBatch, Error> {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(
            rejects.iter().map(|_| version as i64),
        )),
        Arc::new(Int64Array::from_iter_values(
            rejects.iter().map(|r| r.line as i64),
        )),
        Arc::new(StringArray::from_iter(
            rejects.iter().map(|r| r.column.as_deref()),
        )),
        Arc::new(StringArray::from_iter_values(
            rejects.iter().map(|r| r.reason.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            rejects.iter().map(|r| r.raw.as_str()),
        )),
    ];
    RecordBatch::try_new(rejects_schema(), columns)
        .map_err(|e| Error::internal(format!("rejects: {e}")))
}

/// The key columns of an upsert, checked against the schema.
fn key_columns(m: &Manifest, key: &[String]) -> Result<Vec<usize>, Error> {
    if key.is_empty() {
        return Err(Error::invalid("an upsert needs key columns")
            .hint("name them with --key C1,C2 (`key=` in the API)"));
    }
    key.iter()
        .map(|k| {
            m.column_index(k).ok_or_else(|| {
                let e = Error::invalid(format!("key column \"{k}\" is not in {}", m.sql_name()));
                match suggest::did_you_mean(k, m.columns.iter().map(|c| c.name.as_str())) {
                    Some(s) => e.hint(format!("did you mean \"{s}\"?")),
                    None => e.hint("name columns of the dataset"),
                }
            })
        })
        .collect()
}

/// The key of a row, `None` if a key column is empty.
fn key_of(batch: &RecordBatch, key: &[usize], row: usize) -> Option<String> {
    let mut out = String::new();
    for &k in key {
        let c = batch.column(k);
        if c.is_null(row) {
            return None;
        }
        out.push_str(&datafusion::arrow::util::display::array_value_to_string(c, row).ok()?);
        out.push('\u{1f}');
    }
    Some(out)
}

/// The rows of `batches` for which `keep` holds, as one batch.
fn keep_rows(
    batches: &[RecordBatch],
    keep: impl Fn(&RecordBatch, usize) -> bool,
) -> Result<RecordBatch, Error> {
    let mut out = Vec::new();
    let mut schema = None;
    for b in batches {
        schema.get_or_insert_with(|| b.schema());
        let mask: datafusion::arrow::array::BooleanArray =
            (0..b.num_rows()).map(|row| Some(keep(b, row))).collect();
        out.push(
            datafusion::arrow::compute::filter_record_batch(b, &mask)
                .map_err(|e| Error::internal(format!("upsert: {e}")))?,
        );
    }
    match schema {
        Some(s) => datafusion::arrow::compute::concat_batches(&s, &out)
            .map_err(|e| Error::internal(format!("upsert: {e}"))),
        None => Ok(RecordBatch::new_empty(Arc::new(Schema::empty()))),
    }
}

/// An upsert's rows with an empty key or a key an earlier row of the file has are rejected.
fn reject_key_conflicts(parsed: &mut csv_import::Parsed, key: &[usize]) -> Result<(), Error> {
    let batch = &parsed.batch;
    let mut first_line: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let mut ok = Vec::with_capacity(batch.num_rows());
    let raw = |row: usize| {
        (0..batch.num_columns())
            .map(|c| {
                datafusion::arrow::util::display::array_value_to_string(batch.column(c), row)
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let names: Vec<String> = key
        .iter()
        .map(|&k| batch.schema().field(k).name().clone())
        .collect();
    for row in 0..batch.num_rows() {
        let line = parsed.lines.get(row).copied().unwrap_or(0);
        match key_of(batch, key, row) {
            None => {
                ok.push(false);
                parsed.rejects.push(Reject {
                    line,
                    column: None,
                    reason: format!("key ({}) is empty", names.join(", ")),
                    raw: raw(row),
                });
            }
            Some(k) => match first_line.get(&k) {
                Some(first) => {
                    ok.push(false);
                    parsed.rejects.push(Reject {
                        line,
                        column: None,
                        reason: format!(
                            "key ({}) repeats the row of line {first}",
                            names.join(", ")
                        ),
                        raw: raw(row),
                    });
                }
                None => {
                    first_line.insert(k, line);
                    ok.push(true);
                }
            },
        }
    }
    if ok.iter().all(|&k| k) {
        return Ok(());
    }
    let mask = datafusion::arrow::array::BooleanArray::from(ok.clone());
    parsed.batch = datafusion::arrow::compute::filter_record_batch(&parsed.batch, &mask)
        .map_err(|e| Error::internal(format!("upsert: {e}")))?;
    parsed.lines = parsed
        .lines
        .iter()
        .zip(&ok)
        .filter(|(_, k)| **k)
        .map(|(l, _)| *l)
        .collect();
    parsed.rejects.sort_by_key(|r| r.line);
    Ok(())
}

/// Most tags on a dataset.
pub const TAGS_MAX: usize = 32;

/// Tags trimmed, checked and made unique, in the order given.
fn check_tags(tags: Vec<String>) -> Result<Vec<String>, Error> {
    let mut out: Vec<String> = Vec::new();
    for t in tags {
        let t = t.trim().to_string();
        if t.is_empty() || t.chars().count() > 64 || t.chars().any(char::is_control) {
            return Err(Error::invalid(format!("invalid tag \"{t}\""))
                .hint("a tag is 1 to 64 characters without control characters"));
        }
        if !out.contains(&t) {
            out.push(t);
        }
    }
    if out.len() > TAGS_MAX {
        return Err(Error::invalid(format!("{} tags given", out.len()))
            .hint(format!("a dataset has at most {TAGS_MAX} tags")));
    }
    Ok(out)
}
