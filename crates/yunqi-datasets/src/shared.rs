//! The dataset store of a cluster: manifests in a shared metadata store, Parquet files in
//! object storage, so that every node reads and writes the same datasets.
//!
//! The two halves are traits, implemented by the engines' crates (`yunqi-store-pg` for the
//! manifests, `yunqi-store-s3` for the files), so that this crate knows no engine.
//!
//! Invariants:
//! - a version is visible whole or not at all: its files are written (and acknowledged by the
//!   object store) before the manifest naming them is committed;
//! - a manifest is committed with compare-and-set on its revision: a node that did not see the
//!   latest revision cannot overwrite it, so concurrent writers never lose a version;
//! - files no committed manifest names are garbage (an import that crashed, or lost a race);
//!   [`crate::DatasetStore::sweep`] removes them once they are older than a grace period that
//!   outlasts any import.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use yunqi_types::Error;

use crate::Manifest;

/// Shared manifests with revisions, committed by compare-and-set.
pub trait SharedManifests: Send + Sync {
    /// The manifests committed with a revision above `since`, with their revisions, and the
    /// highest revision committed (`since` when nothing changed).
    fn since(&self, since: u64) -> Result<(Vec<(Manifest, u64)>, u64), Error>;

    /// Commits `m` if its stored revision is still `expected` (`None`: no such dataset yet);
    /// returns the new revision. A dataset changed meanwhile gives an error with code
    /// `conflict` ([`yunqi_types::ErrorCode::Conflict`]), and nothing is written.
    fn commit(&self, m: &Manifest, expected: Option<u64>) -> Result<u64, Error>;

    /// Holds the cluster-wide lock on writes to `sql_name` until the guard is dropped (also
    /// released when the holding node dies). Waits for a holder on another node.
    fn lock(&self, sql_name: &str) -> Result<Box<dyn Send>, Error>;
}

/// An object's key and when it was last written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    /// Key, relative to the store's prefix.
    pub key: String,
    /// When it was written.
    pub modified: DateTime<Utc>,
    /// Size in bytes.
    pub size: u64,
}

/// Object storage for datasets' files. Keys are relative to the store's prefix.
pub trait Blobs: Send + Sync {
    /// Stores `bytes` under `key` (as a multipart upload when large); returns once the object
    /// store has acknowledged the whole object.
    fn put(&self, key: &str, bytes: bytes::Bytes) -> Result<(), Error>;
    /// The object under `key`.
    fn get(&self, key: &str) -> Result<bytes::Bytes, Error>;
    /// Removes the object under `key` (no error if there is none).
    fn delete(&self, key: &str) -> Result<(), Error>;
    /// Every object whose key starts with `prefix`.
    fn list(&self, prefix: &str) -> Result<Vec<BlobInfo>, Error>;
    /// The URL DataFusion reads `key` under (`s3://bucket/prefix/key`).
    fn url(&self, key: &str) -> String;
    /// The store DataFusion reads through, and the URL it is registered under
    /// (`s3://bucket`).
    fn object_store(&self) -> (String, Arc<dyn object_store::ObjectStore>);
}

/// The shared halves of a cluster's dataset store.
#[derive(Clone)]
pub struct SharedStore {
    /// Where manifests are committed.
    pub manifests: Arc<dyn SharedManifests>,
    /// Where files are written.
    pub blobs: Arc<dyn Blobs>,
}

/// What a sweep removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SweepReport {
    /// Objects looked at.
    pub objects: u64,
    /// Objects no manifest names, old enough, removed.
    pub removed: u64,
    /// Their bytes.
    pub bytes_removed: u64,
    /// Objects no manifest names, but younger than the grace period (an import may still
    /// commit them), kept.
    pub young: u64,
}

/// The key prefix of a dataset's files in object storage.
pub(crate) fn dataset_prefix(department: &str, name: &str) -> String {
    format!("datasets/{department}/{name}/")
}
