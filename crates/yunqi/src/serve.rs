//! `yunqi serve`: opens (or creates) the data directory, takes its lock, bootstraps the admin,
//! and serves the HTTP API until SIGINT or SIGTERM, then drains requests and flushes the audit
//! chain.
//!
//! Data directory layout: `yunqi.lock` (held while serving), `admin.token` (mode 0600),
//! `meta.db` (metadata store), `audit/` (the audit chain), `endpoints.json` (where the running
//! server listens; removed at shutdown).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use yunqi_audit::AuditChain;
use yunqi_governance::Governance;
use yunqi_store::SqliteStore;
use yunqi_types::{Clock, SystemClock};

use crate::{DEFAULT_DATA, DEFAULT_HTTP, DEFAULT_PG};

#[derive(Args)]
pub struct ServeArgs {
    /// Configuration file (yunqi.toml; docs/configuration.md); flags override it.
    #[arg(long, env = "YUNQI_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (created on first start) [default: ./yunqi-data].
    #[arg(long)]
    data: Option<PathBuf>,
    /// HTTP address (API, console, metrics). Port 0 picks a free port [default: 127.0.0.1:7700].
    #[arg(long)]
    http: Option<String>,
    /// PostgreSQL wire protocol address. Port 0 picks a free port [default: 127.0.0.1:7432].
    #[arg(long)]
    pg: Option<String>,
    /// Cluster mode: the PostgreSQL database the nodes share (run `yunqi cluster init` first).
    #[arg(long, env = "YUNQI_POSTGRES")]
    postgres: Option<String>,
    /// Cluster mode: this node's name, unique in the cluster.
    #[arg(long, env = "YUNQI_NODE")]
    node: Option<String>,
    /// Cluster mode: NATS servers with JetStream (comma separated) that keep the streams'
    /// events for all nodes (run `yunqi cluster init --nats URL` first).
    #[arg(long, env = "YUNQI_NATS")]
    nats: Option<String>,
    /// Cluster mode: `s3://bucket/prefix` that keeps the datasets' files for all nodes (run
    /// `yunqi cluster init --object-store URL` first).
    #[arg(long, env = "YUNQI_OBJECT_STORE")]
    object_store: Option<String>,
    /// Cluster mode: the S3 endpoint, for a server other than AWS.
    #[arg(long, env = "YUNQI_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: String,
    /// PEM certificate chain for TLS on the PostgreSQL endpoint (with --pg-tls-key).
    #[arg(long, requires = "pg_tls_key")]
    pg_tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the PostgreSQL endpoint (with --pg-tls-cert).
    #[arg(long, requires = "pg_tls_cert")]
    pg_tls_key: Option<PathBuf>,
    /// URL prefix NGSI-LD subscriptions may notify (repeatable, or comma-separated in
    /// YUNQI_NOTIFY_ALLOW), e.g. http://notify.city.example/ ; none by default.
    #[arg(
        long = "notify-allow",
        env = "YUNQI_NOTIFY_ALLOW",
        value_delimiter = ','
    )]
    notify_allow: Vec<String>,
    /// Where signed checkpoints of the audit chain go (repeatable, or comma-separated in
    /// YUNQI_AUDIT_WITNESS): a file or directory outside the data directory, or an http:// URL.
    #[arg(
        long = "audit-witness",
        env = "YUNQI_AUDIT_WITNESS",
        value_delimiter = ','
    )]
    audit_witness: Vec<String>,
    /// A checkpoint at least every this many seconds while records are appended.
    #[arg(long, default_value_t = 10)]
    audit_checkpoint_secs: u64,
    /// A checkpoint at least every this many records.
    #[arg(long, default_value_t = 10_000)]
    audit_checkpoint_records: u64,
    /// An RFC 3161 time-stamp authority (http:// URL) that stamps every checkpoint.
    #[arg(long, env = "YUNQI_AUDIT_TSA")]
    audit_tsa: Option<String>,
}

/// Holds the data directory's lock for as long as it lives.
struct DataDirLock {
    _file: File,
}

fn lock_data_dir(dir: &Path) -> anyhow::Result<DataDirLock> {
    let path = dir.join("yunqi.lock");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "data directory {} is in use by another yunqi server{}\nhint: stop that server first, or start this one with another --data DIR",
                dir.display(),
                holder
                    .trim()
                    .strip_prefix("pid ")
                    .map(|p| format!(" (pid {p})"))
                    .unwrap_or_default()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    file.set_len(0)?;
    write!(file, "pid {}", std::process::id())?;
    file.sync_all()?;
    Ok(DataDirLock { _file: file })
}

/// Writes `contents` to `path` atomically (temporary file, fsync, rename, fsync directory),
/// with `mode`.
pub fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = path.parent().context("path has no parent")?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Starts writing signed checkpoints of the audit chain to the witnesses the operator names.
fn start_witness(
    args: &ServeArgs,
    data: &Path,
    audit: &Arc<AuditChain>,
) -> anyhow::Result<yunqi_audit::Witnesser> {
    let targets = args
        .audit_witness
        .iter()
        .filter(|t| !t.trim().is_empty())
        .map(|t| yunqi_audit::Target::parse(t.trim(), data))
        .collect::<Result<Vec<_>, _>>()
        .map_err(crate::user_error)?;
    if let Some(tsa) = &args.audit_tsa {
        if !tsa.starts_with("http://") {
            bail!(
                "--audit-tsa {tsa:?} is not an http:// URL\nhint: e.g. --audit-tsa http://tsa.city.example/"
            );
        }
        if targets.is_empty() {
            bail!(
                "--audit-tsa stamps checkpoints, which go to witnesses\nhint: name one with --audit-witness"
            );
        }
    }
    if args.audit_checkpoint_secs == 0 || args.audit_checkpoint_records == 0 {
        bail!("--audit-checkpoint-secs and --audit-checkpoint-records are at least 1");
    }
    let key = yunqi_audit::witness::node_key(data).map_err(crate::user_error)?;
    let n = targets.len();
    let w = yunqi_audit::Witnesser::start(
        audit.clone(),
        key,
        yunqi_audit::WitnessConfig {
            targets,
            every: std::time::Duration::from_secs(args.audit_checkpoint_secs),
            records: args.audit_checkpoint_records,
            tsa: args.audit_tsa.clone(),
        },
    )
    .map_err(crate::user_error)?;
    if n > 0 {
        tracing::info!(witnesses = n, "audit checkpoints go to the witnesses");
    }
    Ok(w)
}

fn init_logging(format: &str, level: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        "json" => builder.json().init(),
        "text" => builder.init(),
        other => {
            bail!("unknown log format {other:?}\nhint: use --log-format text or --log-format json")
        }
    }
    Ok(())
}

async fn bind(addr: &str, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} for {what}\nhint: is another server using it? pick another address with --{}", if what == "HTTP" { "http" } else { "pg" })
    })
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: finishing requests in flight, flushing the audit chain");
}

/// A server that is up: what `yunqi demo` needs to seed it through its own API.
pub struct Ready {
    /// `http://ADDR`.
    pub http: String,
    /// The data directory.
    pub data: PathBuf,
    /// The admin's token.
    pub admin_token: String,
}

/// Called once the server listens.
pub type OnReady = Box<dyn FnOnce(Ready) + Send>;

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    run_with(args, "info", Box::new(|_| {}))
}

/// Serves, logging at `level` unless `RUST_LOG` says otherwise, calling `on_ready` once the
/// server listens.
pub fn run_with(args: ServeArgs, level: &str, on_ready: OnReady) -> anyhow::Result<ExitCode> {
    init_logging(&args.log_format, level)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("yunqi")
        .build()?;
    runtime.block_on(serve(args, on_ready))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(args: ServeArgs, on_ready: OnReady) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => crate::config::Config::load(path)?,
        None => crate::config::Config::default(),
    };
    let data = args
        .data
        .clone()
        .or(config.server.data.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA));
    let http_addr_arg = args
        .http
        .clone()
        .or(config.server.http.clone())
        .unwrap_or_else(|| DEFAULT_HTTP.to_string());
    let pg_addr_arg = args
        .pg
        .clone()
        .or(config.server.pg.clone())
        .unwrap_or_else(|| DEFAULT_PG.to_string());
    let mut cluster = config.cluster(
        args.node.as_deref(),
        args.postgres.as_deref(),
        args.nats.as_deref(),
    )?;
    match (&mut cluster, &args.object_store) {
        (Some(c), Some(url)) => {
            let mut o = c.objects.clone().unwrap_or(yunqi_store_s3::S3Config {
                url: String::new(),
                endpoint: None,
                region: "us-east-1".into(),
            });
            o.url = url.clone();
            if args.s3_endpoint.is_some() {
                o.endpoint = args.s3_endpoint.clone();
            }
            c.objects = Some(o);
        }
        (None, Some(_)) => anyhow::bail!(
            "--object-store belongs to a cluster, but no cluster is configured\nhint: add --postgres URL or a [cluster] section with postgres = \"URL\""
        ),
        (Some(c), None) => {
            if let (Some(o), Some(e)) = (c.objects.as_mut(), &args.s3_endpoint) {
                o.endpoint = Some(e.clone());
            }
        }
        (None, None) => {}
    }
    let tls = match (&args.pg_tls_cert, &args.pg_tls_key) {
        (Some(cert), Some(key)) => {
            Some(yunqi_pg::tls_acceptor(cert, key).map_err(crate::user_error)?)
        }
        _ => None,
    };
    let tls_note = if tls.is_some() {
        "TLS offered"
    } else {
        "no TLS"
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&data)
        .with_context(|| format!("cannot create data directory {}", data.display()))?;
    let _lock = lock_data_dir(&data)?;
    let limits = config.limits.clone();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);

    let node = match &cluster {
        None => None,
        Some(c) => Some(match &c.node {
            Some(n) => n.clone(),
            None => crate::cluster::default_node_name(&http_addr_arg)?,
        }),
    };
    // With NATS, each node's audit chain lives there (signed cluster checkpoints in
    // PostgreSQL chain the nodes' heads); otherwise in the data directory.
    let (audit, chain, nats_audit): (
        yunqi_audit::SharedAuditLog,
        Option<Arc<AuditChain>>,
        Option<Arc<yunqi_stream_nats::NatsAudit>>,
    ) = match (&node, cluster.as_ref().and_then(|c| c.nats.clone())) {
        (Some(node), Some(n)) => {
            if !args.audit_witness.is_empty() {
                bail!(
                    "--audit-witness is for embedded servers: a cluster node's audit chain lives in NATS JetStream, checkpointed in PostgreSQL\nhint: leave out --audit-witness; `yunqi audit verify --nats URL --postgres URL` checks the cluster's chains"
                );
            }
            let a = Arc::new(
                yunqi_stream_nats::NatsAudit::open(n, node, clock.clone(), &limits)
                    .map_err(crate::user_error)?,
            );
            (a.clone(), None, Some(a))
        }
        _ => {
            let c = Arc::new(
                AuditChain::open(&data.join("audit"), clock.clone(), &limits)
                    .map_err(crate::user_error)?,
            );
            (c.clone(), Some(c), None)
        }
    };
    let witness = match &chain {
        Some(c) => Some(start_witness(&args, &data, c)?),
        None => None,
    };
    let (store, shared): (Arc<dyn yunqi_store::IdentityStore>, _) = match (&cluster, &node) {
        (Some(c), Some(node)) => {
            let pg = Arc::new(
                yunqi_store_pg::PgStore::open(&c.postgres, node, c.lease)
                    .map_err(crate::user_error)?,
            );
            (pg.clone() as Arc<dyn yunqi_store::IdentityStore>, Some(pg))
        }
        _ => (
            Arc::new(SqliteStore::open(&data.join("meta.db")).map_err(crate::user_error)?),
            None,
        ),
    };
    let checkpointer = match (&shared, &nats_audit) {
        (Some(pg), Some(a)) => Some(start_cluster_checkpoints(
            pg.clone(),
            a.clone(),
            yunqi_audit::witness::node_key(&data).map_err(crate::user_error)?,
            std::time::Duration::from_secs(args.audit_checkpoint_secs.max(1)),
        )),
        _ => None,
    };
    let fence = cluster
        .as_ref()
        .map(|c| Arc::new(yunqi_governance::Fence::new(c.lease)));
    // With object storage, datasets are the cluster's: manifests in PostgreSQL, files in the
    // bucket (those the node's own streams write stay in its data directory).
    let datasets = match (&shared, cluster.as_ref().and_then(|c| c.objects.as_ref())) {
        (Some(pg), Some(o)) => yunqi_datasets::DatasetStore::open_shared(
            &data.join("datasets"),
            limits.import_bytes_max,
            yunqi_datasets::SharedStore {
                manifests: Arc::new(yunqi_store_pg::ClusterManifests::new(pg.clone())),
                blobs: yunqi_store_s3::S3Blobs::open(o).map_err(crate::user_error)?,
            },
        ),
        _ => yunqi_datasets::DatasetStore::open(&data.join("datasets"), limits.import_bytes_max),
    }
    .map_err(crate::user_error)?;
    if datasets.object_store().is_some() {
        start_sweeper(datasets.clone());
    }
    let local_streams = yunqi_datasets::StreamCatalog::open(&data.join("streams").join("catalog"))
        .map_err(crate::user_error)?;
    // With the streams' events in JetStream, their declarations are the cluster's too.
    let streams_catalog: Arc<dyn yunqi_datasets::StreamDeclarations> =
        match (&shared, cluster.as_ref().and_then(|c| c.nats.as_ref())) {
            (Some(pg), Some(_)) => Arc::new(yunqi_store_pg::ClusterStreams::new(
                pg.clone(),
                local_streams,
            )),
            _ => Arc::new(local_streams),
        };
    // The node's own log (services' decision logs and consents when there is no shared log);
    // the streams' events go to JetStream when it is configured.
    let log: Arc<dyn yunqi_stream::StreamLog> = yunqi_stream::SegmentLog::open(
        &data.join("streams").join("log"),
        yunqi_stream::LogConfig::default(),
        clock.clone(),
    )
    .map_err(crate::user_error)?;
    let events: Arc<dyn yunqi_stream::StreamLog> =
        match cluster.as_ref().and_then(|c| c.nats.clone()) {
            None => log.clone(),
            Some(n) => Arc::new(
                yunqi_stream_nats::NatsLog::open(n, clock.clone()).map_err(crate::user_error)?,
            ),
        };
    // With streams in JetStream and datasets in object storage, continuous views are the
    // cluster's: each run by the node holding its lease, its results a shared dataset.
    let view_leases: Option<Arc<dyn yunqi_store::Leases>> = match &shared {
        Some(pg) if events.shared() && datasets.object_store().is_some() => {
            Some(Arc::new(yunqi_store_pg::ClusterLeases::new(pg.clone())))
        }
        _ => None,
    };
    let gov = Governance::open(store, datasets, audit.clone(), clock)
        .map_err(crate::user_error)?
        .with_limits(limits.clone())
        .with_streams(streams_catalog);
    let gov = if view_leases.is_some() {
        gov.with_shared_views()
    } else {
        gov
    };
    let gov = Arc::new(match &fence {
        Some(f) => gov.with_fence(f.clone()),
        None => gov,
    });
    let sense = yunqi_sense::Sense::open(
        gov.clone(),
        events.clone(),
        log.clone(),
        &data.join("views"),
        view_leases,
    )
    .map_err(crate::user_error)?;
    for p in &args.notify_allow {
        if !p.starts_with("http://") || p.len() <= "http://".len() {
            bail!(
                "--notify-allow {p:?} is not an http:// URL prefix\nhint: e.g. --notify-allow http://notify.city.example/"
            );
        }
    }
    sense.allow_notifications_to(args.notify_allow.clone());

    let token_path = data.join("admin.token");
    // Nodes of a new cluster may start together: one bootstraps, the others see its admin.
    let bootstrapped = match gov.bootstrap().await {
        Err(e) if shared.is_some() && e.code == yunqi_types::ErrorCode::Conflict => {
            gov.refresh().await.map_err(crate::user_error)?;
            gov.bootstrap().await
        }
        other => other,
    };
    if let Some(token) = bootstrapped.map_err(crate::user_error)? {
        write_atomically(&token_path, format!("{}\n", token.token).as_bytes(), 0o600)?;
        tracing::info!(path = %token_path.display(), "created the bootstrap principal \"admin\"");
    }

    let http = bind(&http_addr_arg, "HTTP").await?;
    let http_addr = http.local_addr()?;
    let pg = bind(&pg_addr_arg, "PostgreSQL").await?;
    let pg_addr = pg.local_addr()?;
    let (sync_stop, sync_rx) = tokio::sync::watch::channel(false);
    let sync = match (&shared, &fence, &cluster) {
        (Some(store), Some(fence), Some(c)) => Some(
            crate::cluster::join(
                store.clone(),
                gov.clone(),
                fence.clone(),
                c.heartbeat,
                format!("http://{http_addr}"),
                pg_addr.to_string(),
                sync_rx,
            )
            .await
            .map_err(crate::user_error)?,
        ),
        _ => None,
    };
    let endpoints = serde_json::json!({
        "http": format!("http://{http_addr}"),
        "pg": pg_addr.to_string(),
        "pid": std::process::id(),
    });
    write_atomically(
        &data.join("endpoints.json"),
        endpoints.to_string().as_bytes(),
        0o644,
    )?;
    gov.record_system(
        "yunqi.start",
        format!("version {}, http {http_addr}", env!("CARGO_PKG_VERSION")),
    )
    .await
    .map_err(crate::user_error)?;

    println!(
        "yunqi {} serving data directory {}",
        env!("CARGO_PKG_VERSION"),
        data.display()
    );
    println!("  API         http://{http_addr}/api/v1/  (OpenAPI: /api/v1/openapi.json)");
    println!("  health      http://{http_addr}/healthz   metrics: http://{http_addr}/metrics");
    println!(
        "  PostgreSQL  psql \"postgresql://admin@{}:{}/yunqi\"  (password: a principal's token; {tls_note})",
        pg_addr.ip(),
        pg_addr.port()
    );
    if let Some(store) = &shared {
        println!(
            "  cluster     node {} over the shared metadata store (`yunqi cluster status`)",
            store.node()
        );
    }
    if let Some(n) = cluster.as_ref().and_then(|c| c.nats.as_ref()) {
        println!(
            "  streams     events on NATS JetStream (prefix {}, {} replica(s))",
            n.prefix, n.replicas
        );
    }
    if let Some(o) = cluster.as_ref().and_then(|c| c.objects.as_ref()) {
        println!(
            "  datasets    files in object storage ({}), manifests in PostgreSQL",
            o.url
        );
    }
    if token_path.exists() {
        println!("  admin token {}", token_path.display());
    } else {
        println!("  admin token on the node that bootstrapped the cluster (its DIR/admin.token)");
    }
    println!(
        "  try: export YUNQI_URL=http://{http_addr} YUNQI_TOKEN=$(cat {})",
        token_path.display()
    );
    println!("ready");
    let _ = std::io::stdout().flush();

    let engine = Arc::new(yunqi_sql::SqlEngine::new(gov.clone(), limits.clone()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    {
        let sense = sense.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            // Live feeds end first: graceful shutdown waits for open connections.
            sense.begin_shutdown();
            let _ = stop_tx.send(true);
        });
    }
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let pg_task = tokio::spawn(yunqi_pg::serve(
        pg,
        yunqi_pg::PgServer::new(gov.clone(), engine.clone(), sense.clone()),
        tls,
        stopped(stop_rx.clone()),
    ));
    let document_key = data.join("keys").join("documents.ed25519");
    // With the cluster's store and a shared log, each service is decided by the node holding its
    // lease, with its decision log in JetStream and the city's one document key.
    let (serve_log, serve_cluster) = match (&shared, cluster.as_ref().and_then(|c| c.nats.as_ref()))
    {
        (Some(pg), Some(_)) => {
            share_document_key(pg, &document_key)?;
            let leases = Arc::new(yunqi_store_pg::ClusterLeases::new(pg.clone()));
            (
                events.clone(),
                Some(yunqi_serve::ServeCluster::new(leases.clone(), leases)),
            )
        }
        _ => (log.clone(), None),
    };
    let serve = yunqi_serve::Serve::open(
        gov.clone(),
        engine.clone(),
        serve_log,
        Arc::new(SystemClock),
        &data.join("services"),
        &document_key,
        serve_cluster,
    )
    .map_err(crate::user_error)?;
    let state = yunqi_api::AppState::new(gov.clone(), engine, sense.clone(), serve.clone(), limits);
    let admin_token = fs::read_to_string(&token_path)
        .unwrap_or_default()
        .trim()
        .to_string();
    on_ready(Ready {
        http: format!("http://{http_addr}"),
        data: data.clone(),
        admin_token,
    });
    yunqi_api::serve(http, yunqi_api::router(state), stopped(stop_rx)).await?;
    let _ = pg_task.await;
    {
        let sense = sense.clone();
        let _ = tokio::task::spawn_blocking(move || sense.shutdown()).await;
        let _ = tokio::task::spawn_blocking(move || serve.shutdown()).await;
    }
    yunqi_stream::StreamLog::shutdown(log.as_ref()).await;
    if !Arc::ptr_eq(&log, &events) {
        yunqi_stream::StreamLog::shutdown(events.as_ref()).await;
    }

    let _ = sync_stop.send(true);
    if let (Some(task), Some(store)) = (sync, &shared) {
        let _ = task.await;
        let store = store.clone();
        let _ = tokio::task::spawn_blocking(move || store.deregister()).await;
    }
    let _ = gov
        .record_system("yunqi.stop", "graceful shutdown".into())
        .await;
    if let Some(c) = checkpointer {
        let _ = tokio::task::spawn_blocking(move || c.stop()).await;
    }
    audit.shutdown().await;
    if let Some(w) = witness {
        let _ = tokio::task::spawn_blocking(move || w.stop()).await;
    }
    let _ = fs::remove_file(data.join("endpoints.json"));
    tracing::info!(audit_seq = audit.durable_head().seq, "stopped");
    Ok(())
}

/// Makes this node's document key the cluster's: the key the first node stored in the
/// cluster's store (this node's own, made and checked as embedded, if none is), written to
/// `path`. A node whose existing key differs from the cluster's is refused: documents it signed
/// would not verify elsewhere.
fn share_document_key(pg: &yunqi_store_pg::PgStore, path: &Path) -> anyhow::Result<()> {
    let existed = path.exists();
    // Loads (and checks) the key, or makes one: what this node offers the cluster.
    yunqi_serve::document::Signer::open(path).map_err(crate::user_error)?;
    let local =
        fs::read(path).with_context(|| format!("read the document key {}", path.display()))?;
    let shared = pg
        .shared_secret("documents.ed25519", &local)
        .map_err(crate::user_error)?;
    if shared == local {
        return Ok(());
    }
    if existed {
        bail!(
            "this node's document key {} is not the cluster's\nhint: documents are signed with the city's one key; move this file away (keep it if it signed documents) and start again to use the cluster's",
            path.display()
        );
    }
    write_atomically(path, &shared, 0o600)
}

/// The thread that makes signed cluster checkpoints of the nodes' audit chains.
struct Checkpointer {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    /// Makes a last checkpoint (this node's final records) and stops.
    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.thread.thread().unpark();
        let _ = self.thread.join();
    }
}

/// Every `every`, unless another node just did: reads every node's chain head from the log
/// engine and chains them into the next signed checkpoint in PostgreSQL.
fn start_cluster_checkpoints(
    pg: Arc<yunqi_store_pg::PgStore>,
    audit: Arc<yunqi_stream_nats::NatsAudit>,
    key: ed25519_dalek::SigningKey,
    every: std::time::Duration,
) -> Checkpointer {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name("yunqi-audit-checkpoints".into())
        .spawn(move || {
            let checkpoints = yunqi_store_pg::ClusterCheckpoints::new(pg.clone());
            let node = pg.node().to_string();
            loop {
                std::thread::park_timeout(every);
                let last = flag.load(std::sync::atomic::Ordering::Acquire);
                let heads = match audit.heads() {
                    Ok(h) => h,
                    Err(e) => {
                        tracing::warn!(error = %e.message, "audit chains' heads not read; no checkpoint this time");
                        if last { break } else { continue }
                    }
                };
                let (key, by) = (key.clone(), node.clone());
                // At shutdown, checkpoint this node's last records whoever made the last one.
                let min_age = if last { std::time::Duration::ZERO } else { every / 2 };
                let made = checkpoints.commit(
                    min_age,
                    Box::new(move |prev| {
                        let unchanged = prev.is_some_and(|p| {
                            heads.iter().all(|h| p.head(&h.node).is_some_and(|o| o.seq >= h.seq))
                        });
                        (!unchanged).then(|| {
                            yunqi_audit::cluster::ClusterCheckpoint::make(
                                prev,
                                heads,
                                &by,
                                &key,
                                chrono::Utc::now(),
                            )
                        })
                    }),
                );
                match made {
                    Ok(Some(c)) => tracing::debug!(id = c.id, "cluster audit checkpoint made"),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e.message, "cluster audit checkpoint not made"),
                }
                if last {
                    break;
                }
            }
        })
        .expect("start the checkpoint thread");
    Checkpointer { stop, thread }
}

/// How long an unreferenced object is kept: longer than any import takes between writing its
/// files and committing its manifest.
const SWEEP_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes, every ten minutes, the objects no shared manifest names (left by imports that
/// crashed or lost a race) once they are older than [`SWEEP_GRACE`]. Every node sweeps; a
/// sweep is safe to run concurrently.
fn start_sweeper(datasets: Arc<yunqi_datasets::DatasetStore>) {
    std::thread::Builder::new()
        .name("yunqi-sweeper".into())
        .spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(600));
                match datasets.sweep(SWEEP_GRACE, chrono::Utc::now()) {
                    Ok(r) if r.removed > 0 => tracing::info!(
                        removed = r.removed,
                        bytes = r.bytes_removed,
                        "object store swept"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e.message, "object store sweep failed"),
                }
            }
        })
        .expect("the sweeper thread");
}
