//! Datasets' files in S3-compatible object storage, shared by the nodes of a cluster.
//!
//! [`S3Blobs`] implements [`yunqi_datasets::Blobs`] over one bucket and key prefix
//! (`s3://bucket/prefix`): an import's Parquet files are objects (multipart uploads above
//! [`MULTIPART_MIN`]), acknowledged before the manifest naming them is committed in the
//! metadata store; DataFusion reads them through the same `object_store` client.
//!
//! [`init`] marks the prefix as yunqi's (an object `yunqi-cluster.json`, written once); a node
//! refuses a prefix without it, saying what to run. An object store that cannot be reached
//! gives 503 with a hint once the client's retries (about 10 s) are spent; nothing
//! half-written is ever visible, since a version's manifest names only acknowledged objects.
//!
//! The interface is synchronous (the dataset store calls it from blocking tasks); the client
//! runs on a small runtime of its own.
#![deny(missing_docs)]

pub mod server;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    WriteMultipart,
};
use yunqi_datasets::{BlobInfo, Blobs};
use yunqi_types::Error;

/// Objects at least this large are written as multipart uploads, in parts of this size.
pub const MULTIPART_MIN: usize = 8 * 1024 * 1024;

/// The object marking a prefix as prepared for yunqi.
const MARKER: &str = "yunqi-cluster.json";

/// Where a cluster keeps its objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// `s3://bucket/prefix` (the prefix may be empty).
    pub url: String,
    /// The S3 endpoint (`http://127.0.0.1:8333` for a local server); AWS's when `None`.
    pub endpoint: Option<String>,
    /// The region.
    pub region: String,
}

impl S3Config {
    fn bucket_and_prefix(&self) -> Result<(String, String), Error> {
        let rest = self.url.strip_prefix("s3://").ok_or_else(|| {
            Error::invalid(format!("object store URL \"{}\" is not s3://", self.url))
                .hint("write it as s3://bucket or s3://bucket/prefix")
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.len() < 3 {
            return Err(Error::invalid(format!(
                "object store URL \"{}\" names no valid bucket",
                self.url
            ))
            .hint("bucket names have 3 to 63 characters: s3://city-yunqi/prod"));
        }
        Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
    }
}

fn unreachable(what: &str, e: impl std::fmt::Display) -> Error {
    tracing::warn!(error = %e, "object store: {what} failed");
    Error::unavailable("the object store (S3) cannot be reached")
        .detail(format!(
            "{what} did not complete; nothing half-written is visible"
        ))
        .hint("retry in a few seconds, once the object store answers again")
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("yunqi-objects")
        .enable_all()
        .build()
        .map_err(|e| Error::internal(format!("cannot start the object store's runtime: {e}")))
}

fn block_on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    f: impl Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, Error> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv()
        .map_err(|_| Error::internal("the object store's task ended"))?
}

fn client(config: &S3Config) -> Result<(AmazonS3, String, String), Error> {
    let (bucket, prefix) = config.bucket_and_prefix()?;
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(&bucket)
        .with_region(&config.region)
        .with_retry(RetryConfig {
            max_retries: 4,
            retry_timeout: Duration::from_secs(10),
            ..Default::default()
        })
        .with_client_options(
            ClientOptions::new()
                .with_connect_timeout(Duration::from_secs(3))
                .with_timeout(Duration::from_secs(60))
                .with_allow_http(
                    config
                        .endpoint
                        .as_deref()
                        .is_some_and(|e| e.starts_with("http://")),
                ),
        );
    if let Some(e) = &config.endpoint {
        b = b.with_endpoint(e);
    }
    // No credentials in the environment: anonymous requests (a local server without
    // identities), rather than asking a cloud's instance metadata service.
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
        b = b.with_skip_signature(true);
    }
    let s3 = b.build().map_err(|e| {
        Error::invalid(format!("object store settings refused: {e}"))
            .hint("check [cluster] object_store, s3_endpoint and s3_region")
    })?;
    Ok((s3, bucket, prefix))
}

/// What [`init`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    /// Whether the prefix was marked now (false: it already was).
    pub marked: bool,
}

/// Marks the prefix as yunqi's; safe to run again.
pub fn init(config: &S3Config) -> Result<InitReport, Error> {
    let (s3, _, prefix) = client(config)?;
    let rt = runtime()?;
    let marker = key(&prefix, MARKER);
    let body = serde_json::json!({ "format": 1, "software": "yunqi" }).to_string();
    let r = block_on(&rt, async move {
        let put = s3
            .put_opts(
                &marker,
                PutPayload::from(body),
                PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                },
            )
            .await;
        match put {
            Ok(_) => Ok(InitReport { marked: true }),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(InitReport { marked: false }),
            Err(e) => Err(unreachable("marking the bucket", e)),
        }
    });
    rt.shutdown_background();
    r
}

/// Whether the prefix is marked as yunqi's (an error when the store cannot be reached).
pub fn status(config: &S3Config) -> Result<bool, Error> {
    let (s3, _, prefix) = client(config)?;
    let rt = runtime()?;
    let marker = key(&prefix, MARKER);
    let r = block_on(&rt, async move {
        match s3.head(&marker).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(unreachable("reading the bucket", e)),
        }
    });
    rt.shutdown_background();
    r
}

fn key(prefix: &str, k: &str) -> Path {
    if prefix.is_empty() {
        Path::from(k)
    } else {
        Path::from(format!("{prefix}/{k}"))
    }
}

/// Datasets' files in one bucket under one prefix.
pub struct S3Blobs {
    runtime: Option<tokio::runtime::Runtime>,
    s3: Arc<AmazonS3>,
    bucket: String,
    prefix: String,
}

impl Drop for S3Blobs {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl S3Blobs {
    /// Opens the prefix; refuses one [`init`] has not marked, saying what to run.
    pub fn open(config: &S3Config) -> Result<Arc<S3Blobs>, Error> {
        if !status(config)? {
            return Err(Error::unavailable(format!(
                "the object store at {} is not prepared for yunqi",
                config.url
            ))
            .hint("run `yunqi cluster init` once against these engines"));
        }
        let (s3, bucket, prefix) = client(config)?;
        Ok(Arc::new(S3Blobs {
            runtime: Some(runtime()?),
            s3: Arc::new(s3),
            bucket,
            prefix,
        }))
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.runtime
            .as_ref()
            .expect("runtime lives as long as the store")
    }

    fn path(&self, k: &str) -> Path {
        key(&self.prefix, k)
    }
}

impl Blobs for S3Blobs {
    fn put(&self, k: &str, bytes: Bytes) -> Result<(), Error> {
        let (s3, path) = (self.s3.clone(), self.path(k));
        block_on(self.rt(), async move {
            if bytes.len() < MULTIPART_MIN {
                s3.put(&path, PutPayload::from(bytes))
                    .await
                    .map_err(|e| unreachable("writing a data file", e))?;
                return Ok(());
            }
            let upload = s3
                .put_multipart(&path)
                .await
                .map_err(|e| unreachable("starting a multipart upload", e))?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, MULTIPART_MIN);
            w.put(bytes);
            match w.finish().await {
                Ok(_) => Ok(()),
                // An aborted upload's parts are removed by the store (or its lifecycle rule).
                Err(e) => Err(unreachable("completing a multipart upload", e)),
            }
        })
    }

    fn get(&self, k: &str) -> Result<Bytes, Error> {
        let (s3, path) = (self.s3.clone(), self.path(k));
        block_on(self.rt(), async move {
            match s3.get(&path).await {
                Ok(r) => r
                    .bytes()
                    .await
                    .map_err(|e| unreachable("reading a data file", e)),
                Err(object_store::Error::NotFound { .. }) => {
                    tracing::error!(object = %path, "a file a manifest names is missing");
                    Err(
                        Error::internal("a data file is missing from the object store")
                            .hint("the bucket was changed by something other than yunqi"),
                    )
                }
                Err(e) => Err(unreachable("reading a data file", e)),
            }
        })
    }

    fn delete(&self, k: &str) -> Result<(), Error> {
        let (s3, path) = (self.s3.clone(), self.path(k));
        block_on(self.rt(), async move {
            match s3.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(unreachable("removing a file", e)),
            }
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<BlobInfo>, Error> {
        let s3 = self.s3.clone();
        let root = self.prefix.clone();
        let path = self.path(prefix.trim_end_matches('/'));
        block_on(self.rt(), async move {
            let all: Vec<object_store::ObjectMeta> = s3
                .list(Some(&path))
                .try_collect()
                .await
                .map_err(|e| unreachable("listing files", e))?;
            Ok(all
                .into_iter()
                .map(|o| {
                    let full = o.location.to_string();
                    let key = match root.is_empty() {
                        true => full,
                        false => full
                            .strip_prefix(&format!("{root}/"))
                            .map(str::to_string)
                            .unwrap_or(full),
                    };
                    BlobInfo {
                        key,
                        modified: o.last_modified,
                        size: o.size,
                    }
                })
                .collect())
        })
    }

    fn url(&self, k: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.path(k))
    }

    fn object_store(&self) -> (String, Arc<dyn ObjectStore>) {
        (format!("s3://{}", self.bucket), self.s3.clone())
    }
}
