//! Cluster mode: a node joins the cluster over the shared PostgreSQL store and keeps current
//! with it; `yunqi cluster init` and `yunqi cluster status`.
//!
//! Keeping current: a task heartbeats every `heartbeat_ms` (and at once when the store announces
//! a new version), reloads governance when the store is ahead, and renews the node's fence from
//! the moment the read that proved it current began. A node whose heartbeats fail stops serving
//! when its lease runs out, so a revocation on another node never waits longer than one lease.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Subcommand;
use yunqi_governance::{Fence, Governance};
use yunqi_store_pg::{NodeInfo, PgStore};
use yunqi_types::Error;

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Create or migrate yunqi's schema in the shared PostgreSQL database (idempotent).
    Init {
        /// The database the nodes share.
        #[arg(long, env = "YUNQI_POSTGRES")]
        postgres: String,
        #[command(flatten)]
        nats: NatsArgs,
        #[command(flatten)]
        objects: ObjectArgs,
    },
    /// The nodes of the cluster: their addresses, versions, heartbeats and what they hold.
    Status {
        /// The database the nodes share.
        #[arg(long, env = "YUNQI_POSTGRES")]
        postgres: String,
        #[command(flatten)]
        nats: NatsArgs,
        #[command(flatten)]
        objects: ObjectArgs,
    },
}

/// The NATS engine of `yunqi cluster init|status`.
#[derive(clap::Args)]
pub struct NatsArgs {
    /// NATS servers with JetStream (comma separated), when the cluster keeps its streams and
    /// audit chains there.
    #[arg(long, env = "YUNQI_NATS")]
    pub nats: Option<String>,
    /// Prefix of yunqi's JetStream streams and buckets (as `[cluster] nats_prefix`).
    #[arg(long, default_value = "yunqi")]
    nats_prefix: String,
    /// Replicas of the offsets bucket made by `init` (as `[cluster] nats_replicas`).
    #[arg(long, default_value_t = 1)]
    nats_replicas: usize,
}

/// The object store of `yunqi cluster init|status`.
#[derive(clap::Args)]
pub struct ObjectArgs {
    /// `s3://bucket/prefix`, when the cluster keeps its datasets' files there.
    #[arg(long, env = "YUNQI_OBJECT_STORE")]
    object_store: Option<String>,
    /// The S3 endpoint, for a server other than AWS (as `[cluster] s3_endpoint`).
    #[arg(long, env = "YUNQI_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// The S3 region (as `[cluster] s3_region`).
    #[arg(long, default_value = "us-east-1")]
    s3_region: String,
}

impl ObjectArgs {
    fn config(&self) -> Option<yunqi_store_s3::S3Config> {
        self.object_store
            .as_ref()
            .map(|url| yunqi_store_s3::S3Config {
                url: url.clone(),
                endpoint: self.s3_endpoint.clone(),
                region: self.s3_region.clone(),
            })
    }
}

impl NatsArgs {
    /// The engine these arguments name, if any.
    pub fn config(&self) -> Option<yunqi_stream_nats::NatsConfig> {
        self.nats
            .as_ref()
            .map(|urls| yunqi_stream_nats::NatsConfig {
                urls: urls.clone(),
                prefix: self.nats_prefix.clone(),
                replicas: self.nats_replicas,
                ..Default::default()
            })
    }
}

/// A node's default name: the host name and the HTTP port (`host-7700`).
pub fn default_node_name(http: &str) -> anyhow::Result<String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_else(|_| "node".into())
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect::<String>();
    let port = http.rsplit(':').next().unwrap_or("0");
    if port == "0" {
        anyhow::bail!(
            "a cluster node on a free port (--http HOST:0) needs a name\nhint: give it one with --node NAME or [cluster] node"
        );
    }
    let name: String = format!("{host}-{port}").chars().take(63).collect();
    crate::config::check_node_name(&name)?;
    Ok(name)
}

/// Registers this node, confirms it current once, and starts keeping it current until `stop`.
pub async fn join(
    store: Arc<PgStore>,
    gov: Arc<Governance>,
    fence: Arc<Fence>,
    every: Duration,
    http: String,
    pg: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let info = NodeInfo {
        name: store.node().to_string(),
        http,
        pg,
        software: env!("CARGO_PKG_VERSION").to_string(),
    };
    let s = store.clone();
    let seen = gov.version();
    blocking(move || s.register(&info, seen)).await?;
    sync_once(&store, &gov, &fence).await?;
    tracing::info!(node = store.node(), "joined the cluster");
    Ok(tokio::spawn(keep_current(store, gov, fence, every, stop)))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("metadata store task failed: {e}")))?
}

/// One round: heartbeat, catch up if behind, renew the fence.
async fn sync_once(
    store: &Arc<PgStore>,
    gov: &Arc<Governance>,
    fence: &Fence,
) -> Result<(), Error> {
    let began = Instant::now();
    let seen = gov.version();
    let s = store.clone();
    let current = blocking(move || s.heartbeat(seen)).await?;
    if current > seen {
        let now = gov.refresh().await?;
        if now < current {
            return Err(Error::unavailable(
                "the metadata store went back in version",
            )
            .detail(format!(
                "the store announced version {current} but reads as {now}"
            ))
            .hint(
                "the cluster's database was restored from an older backup or replaced; stop every node, check the database, then start them again",
            ));
        }
        fence.renew(began);
        // Say at once that this node has the new version: a revocation may be waiting for it.
        let s = store.clone();
        blocking(move || s.heartbeat(now)).await?;
    } else {
        fence.renew(began);
    }
    Ok(())
}

async fn keep_current(
    store: Arc<PgStore>,
    gov: Arc<Governance>,
    fence: Arc<Fence>,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let changes = store.changes();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = changes.notified() => {}
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        match sync_once(&store, &gov, &fence).await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("the metadata store answers again: this node serves");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e.message, lease_ms = fence.lease().as_millis() as u64,
                    "cannot confirm this node is current; it stops serving when its lease runs out");
            }
            Err(_) => {}
        }
    }
}

/// `yunqi cluster …`.
pub fn run(cmd: ClusterCommand, json: bool) -> anyhow::Result<std::process::ExitCode> {
    match cmd {
        ClusterCommand::Init {
            postgres,
            nats,
            objects,
        } => {
            let r = yunqi_store_pg::init(&postgres).map_err(crate::user_error)?;
            let n = match nats.config() {
                Some(c) => Some(yunqi_stream_nats::init(&c).map_err(crate::user_error)?),
                None => None,
            };
            let o = match objects.config() {
                Some(c) => Some((yunqi_store_s3::init(&c).map_err(crate::user_error)?, c.url)),
                None => None,
            };
            if json {
                let nats = n.as_ref().map(|n| {
                    serde_json::json!({"server_version": n.server_version,
                        "created_offsets_bucket": n.created_offsets_bucket,
                        "streams": n.streams, "max_payload": n.max_payload})
                });
                println!(
                    "{}",
                    serde_json::json!({"schema_from": r.from, "schema": r.to, "nats": nats,
                        "object_store": o.as_ref().map(|(r, url)| serde_json::json!({"url": url, "marked": r.marked}))})
                );
                return Ok(std::process::ExitCode::SUCCESS);
            }
            if let Some((r, url)) = &o {
                if r.marked {
                    println!("object store {url}: prepared for yunqi");
                } else {
                    println!("object store {url}: already prepared");
                }
            }
            if let Some(n) = &n {
                println!(
                    "NATS {}: {}; {} yunqi stream(s); messages up to {} bytes",
                    n.server_version,
                    if n.created_offsets_bucket {
                        "created the offsets bucket"
                    } else {
                        "the offsets bucket is in place"
                    },
                    n.streams,
                    n.max_payload
                );
            }
            if r.from == r.to {
                println!("yunqi schema version {} is in place; nothing to do", r.to);
            } else if r.from == 0 {
                println!("created yunqi schema version {}", r.to);
            } else {
                println!("migrated yunqi schema from version {} to {}", r.from, r.to);
            }
        }
        ClusterCommand::Status {
            postgres,
            nats,
            objects,
        } => {
            let (version, nodes) = yunqi_store_pg::status(&postgres).map_err(crate::user_error)?;
            let objects = objects.config().map(|c| {
                let state = match yunqi_store_s3::status(&c) {
                    Ok(true) => "up".to_string(),
                    Ok(false) => "not prepared: run `yunqi cluster init`".to_string(),
                    Err(e) => format!("unreachable: {}", e.message),
                };
                (c.url, state)
            });
            let nats = nats
                .config()
                .map(|c| yunqi_stream_nats::status(&c).map_err(|e| e.message));
            let checkpoint =
                yunqi_store_pg::last_checkpoint(&postgres).map_err(crate::user_error)?;
            if json {
                let nodes: Vec<_> = nodes
                    .iter()
                    .map(|n| {
                        serde_json::json!({
                            "name": n.info.name, "http": n.info.http, "pg": n.info.pg,
                            "software": n.info.software, "state": state(n),
                            "started_at": n.started_at, "heartbeat_at": n.heartbeat_at,
                            "heartbeat_age_ms": n.heartbeat_age_ms, "stopped_at": n.stopped_at,
                            "metadata_version": n.seen_version, "lease_ms": n.lease_ms,
                            "holds": holds(n),
                        })
                    })
                    .collect();
                let nats = nats.map(|n| match n {
                    Ok(s) => serde_json::json!({"state": "up", "server_version": s.server_version, "streams": s.streams,
                        "audit_chains": s.audit.iter().map(|h| serde_json::json!({"node": h.node, "records": h.seq})).collect::<Vec<_>>()}),
                    Err(e) => serde_json::json!({"state": "unreachable", "error": e}),
                });
                println!(
                    "{}",
                    serde_json::json!({"metadata_version": version, "nodes": nodes, "nats": nats,
                        "audit_checkpoint": checkpoint.as_ref().map(|c| serde_json::json!({"id": c.id, "time": c.time, "by": c.by})),
                        "object_store": objects.as_ref().map(|(url, state)| serde_json::json!({"url": url, "state": state}))})
                );
            } else {
                println!("metadata version {version}; {} node(s)", nodes.len());
                match &nats {
                    Some(Ok(s)) => {
                        println!(
                            "NATS {} up; {} yunqi stream(s) in JetStream",
                            s.server_version, s.streams
                        );
                        if !s.audit.is_empty() {
                            let chains: Vec<String> = s
                                .audit
                                .iter()
                                .map(|h| format!("{} {}", h.node, h.seq))
                                .collect();
                            println!("audit chains (node, records): {}", chains.join(", "));
                        }
                    }
                    Some(Err(e)) => println!("NATS unreachable: {e}"),
                    None => {}
                }
                if let Some((url, state)) = &objects {
                    println!("object store {url}: {state}");
                }
                if let Some(c) = &checkpoint {
                    println!(
                        "last audit checkpoint {} at {} by node {}",
                        c.id, c.time, c.by
                    );
                }
                println!(
                    "{:<20} {:<8} {:<9} {:>8} {:>10}  {:<24} {:<22} holds",
                    "NODE", "STATE", "SOFTWARE", "VERSION", "HEARTBEAT", "HTTP", "PG"
                );
                for n in &nodes {
                    println!(
                        "{:<20} {:<8} {:<9} {:>8} {:>8}ms  {:<24} {:<22} {}",
                        n.info.name,
                        state(n),
                        n.info.software,
                        n.seen_version,
                        n.heartbeat_age_ms,
                        n.info.http,
                        n.info.pg,
                        holds(n)
                    );
                }
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn state(n: &yunqi_store_pg::NodeStatus) -> &'static str {
    if n.stopped_at.is_some() {
        "stopped"
    } else if n.live() {
        "live"
    } else {
        "lapsed"
    }
}

/// What the node holds of the cluster's work. Until writers are spread over the nodes, every
/// node holds its own data directory's datasets, views' outputs, NGSI-LD entity streams and
/// services; streams are the cluster's when NATS is configured (status shows NATS then).
fn holds(n: &yunqi_store_pg::NodeStatus) -> &'static str {
    if n.stopped_at.is_some() {
        "-"
    } else {
        "its own datasets, views, entity streams, services"
    }
}

/// `yunqi audit verify --nats URL [--postgres URL]`: every node's chain in JetStream, checked
/// record by record and against the signed cluster checkpoints in PostgreSQL.
pub fn verify(
    postgres: Option<&str>,
    nats: &yunqi_stream_nats::NatsConfig,
    json: bool,
) -> anyhow::Result<std::process::ExitCode> {
    use std::collections::HashMap;
    let started = Instant::now();
    let checkpoints = match postgres {
        Some(url) => yunqi_store_pg::read_checkpoints(url).map_err(crate::user_error)?,
        None => Vec::new(),
    };
    let mut wanted: HashMap<String, Vec<u64>> = HashMap::new();
    for c in &checkpoints {
        for h in &c.heads {
            wanted.entry(h.node.clone()).or_default().push(h.seq);
        }
    }
    let chains =
        yunqi_stream_nats::audit::verify_chains(nats, &wanted).map_err(crate::user_error)?;
    let mut problems = yunqi_audit::cluster::check_checkpoints(&checkpoints);
    let mut nodes = Vec::new();
    for c in &chains {
        if let Some((seq, why)) = &c.check.problem {
            problems.push(format!("node {}: record {seq}: {why}", c.node));
        }
        problems.extend(yunqi_audit::cluster::check_chain_against(
            &c.node,
            &c.check,
            &checkpoints,
        ));
        nodes.push(serde_json::json!({
            "node": c.node,
            "records": c.check.records,
            "rounds": c.rounds,
            "bytes": c.bytes,
            "last_seq": c.check.last_seq,
            "last_hash": hex::encode(c.check.last_hash),
            "ok": c.check.problem.is_none(),
        }));
    }
    let seconds = started.elapsed().as_secs_f64();
    let ok = problems.is_empty();
    let last = checkpoints.last();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "ok": ok,
                "nodes": nodes,
                "checkpoints": checkpoints.len(),
                "last_checkpoint": last.map(|c| serde_json::json!({"id": c.id, "time": c.time, "by": c.by})),
                "problems": problems,
                "seconds": seconds,
            })
        );
    } else {
        for c in &chains {
            println!(
                "node {}: {} records, last {} hash {}{}",
                c.node,
                c.check.records,
                c.check.last_seq,
                hex::encode(c.check.last_hash),
                if c.check.problem.is_some() {
                    " (DAMAGED)"
                } else {
                    ""
                }
            );
        }
        match last {
            Some(l) => println!(
                "checkpoints: {} (last {} at {} by node {})",
                checkpoints.len(),
                l.id,
                l.time,
                l.by
            ),
            None if postgres.is_some() => println!("checkpoints: none yet"),
            None => println!("checkpoints: not checked (give --postgres URL)"),
        }
        if ok {
            println!(
                "audit chains OK: {} nodes verified in {seconds:.3} s",
                chains.len()
            );
        } else {
            println!("audit chains DAMAGED:");
            for p in &problems {
                println!("  {p}");
            }
        }
    }
    Ok(if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}
