//! The metadata store on PostgreSQL, shared by the nodes of a cluster.
//!
//! [`PgStore`] implements [`IdentityStore`] over one PostgreSQL database:
//! - a versioned schema ([`init`] migrates it, idempotently; a node refuses a database of
//!   another version and says what to run);
//! - every batch is one transaction that checks the store's version against the version the
//!   writing node's state stands at (compare-and-set: a node that missed another node's change is
//!   told [`yunqi_store::STALE`], reloads, and the user retries), raises it, and sends a
//!   `NOTIFY` so that every node reloads within milliseconds;
//! - node membership: each node registers, and heartbeats with the version it has loaded;
//! - [`IdentityStore::confirm`]: a revocation returns once every live node has loaded it, or
//!   after one lease, by when a node that has not has fenced itself off (see
//!   `yunqi_governance::Fence`).
//!
//! The interface is synchronous (governance calls it from blocking tasks); the client runs on
//! a small runtime of its own, so that it may be called from anywhere.
#![deny(missing_docs)]

mod checkpoints;
mod leases;
mod manifests;
mod streams;
pub use checkpoints::{ClusterCheckpoints, MakeCheckpoint, last_checkpoint, read_checkpoints};
pub use leases::ClusterLeases;
pub use manifests::ClusterManifests;
pub use streams::ClusterStreams;

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, Config, IsolationLevel, NoTls};
use yunqi_store::{IdentityChange, IdentitySnapshot, IdentityStore, STALE, StoredToken};
use yunqi_types::{
    Department, Error, ErrorCode, Grant, Name, NationalId, Principal, Role, TokenInfo,
};

/// The version of the PostgreSQL schema this code reads and writes.
pub const SCHEMA_VERSION: i32 = 5;

/// The channel on which a batch's new version is announced.
const CHANNEL: &str = "yunqi_identity";

/// Longest one operation (a query, a transaction) may take before it is reported unavailable.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);

/// Serialises `init` across processes.
const INIT_LOCK: i64 = 0x7975_6e71_6900_0001;

/// Schema migrations: the n-th entry takes the schema from version n to n + 1.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE yunqi_identity_version (
    id       int PRIMARY KEY CHECK (id = 1),
    version  bigint NOT NULL
);
INSERT INTO yunqi_identity_version (id, version) VALUES (1, 0);
CREATE TABLE yunqi_department (
    name        text PRIMARY KEY,
    title       text NOT NULL,
    created_at  timestamptz NOT NULL
);
CREATE TABLE yunqi_principal (
    name          text PRIMARY KEY,
    role          text NOT NULL,
    department    text REFERENCES yunqi_department(name),
    id_number     text UNIQUE,
    display_name  text NOT NULL,
    created_at    timestamptz NOT NULL
);
CREATE TABLE yunqi_token (
    id           text PRIMARY KEY,
    principal    text NOT NULL REFERENCES yunqi_principal(name),
    secret_hash  bytea NOT NULL CHECK (length(secret_hash) = 32),
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz,
    revoked_at   timestamptz
);
CREATE TABLE yunqi_grant (
    id      text PRIMARY KEY,
    record  jsonb NOT NULL
);
CREATE TABLE yunqi_node (
    name          text PRIMARY KEY,
    http          text NOT NULL,
    pg            text NOT NULL,
    software      text NOT NULL,
    started_at    timestamptz NOT NULL,
    heartbeat_at  timestamptz NOT NULL,
    stopped_at    timestamptz,
    seen_version  bigint NOT NULL,
    lease_ms      bigint NOT NULL
);
",
    "
CREATE TABLE yunqi_stream (
    sql_name    text PRIMARY KEY,
    manifest    jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
",
    "
CREATE TABLE yunqi_dataset_head (
    id        int PRIMARY KEY CHECK (id = 1),
    revision  bigint NOT NULL
);
INSERT INTO yunqi_dataset_head (id, revision) VALUES (1, 0);
CREATE TABLE yunqi_dataset (
    sql_name    text PRIMARY KEY,
    revision    bigint NOT NULL,
    manifest    jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX yunqi_dataset_by_revision ON yunqi_dataset (revision);
",
    "
CREATE TABLE yunqi_audit_checkpoint (
    id          bigint PRIMARY KEY,
    made_at     timestamptz NOT NULL DEFAULT now(),
    made_by     text NOT NULL,
    checkpoint  jsonb NOT NULL
);
",
    "
CREATE TABLE yunqi_service (
    service     text NOT NULL,
    version     int NOT NULL,
    definition  text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (service, version)
);
CREATE TABLE yunqi_lease (
    name        text PRIMARY KEY,
    holder      text NOT NULL,
    epoch       bigint NOT NULL,
    expires_at  timestamptz NOT NULL
);
CREATE TABLE yunqi_secret (
    name   text PRIMARY KEY,
    value  bytea NOT NULL
);
",
];

/// Where the database is, for messages to the operator (host, port and database; never the
/// password).
fn describe(config: &Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{host}:{port}/{}",
        config.get_dbname().unwrap_or("(default database)")
    )
}

/// Parses a PostgreSQL URL (`postgresql://HOST:PORT/DATABASE` or `key=value` pairs).
pub fn parse_url(url: &str) -> Result<Config, Error> {
    let mut config = Config::from_str(url).map_err(|e| {
        Error::invalid(format!("{url:?} is not a PostgreSQL URL: {e}"))
            .hint("e.g. postgresql://127.0.0.1:5432/yunqi")
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(OPERATION_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("yunqi");
    }
    Ok(config)
}

fn store_unreachable(e: impl std::fmt::Display) -> Error {
    tracing::warn!(error = %e, "metadata store (PostgreSQL) unreachable");
    Error::unavailable("the cluster's metadata store (PostgreSQL) is unreachable")
        .hint("retry shortly; yunqi resumes by itself once PostgreSQL answers")
}

fn pg_error(e: tokio_postgres::Error) -> Error {
    match e.as_db_error() {
        Some(db)
            if *db.code() == SqlState::UNIQUE_VIOLATION
                || *db.code() == SqlState::FOREIGN_KEY_VIOLATION =>
        {
            Error::new(
                ErrorCode::Conflict,
                format!("change conflicts with stored data: {}", db.message()),
            )
        }
        Some(db) if *db.code() == SqlState::UNDEFINED_TABLE => {
            Error::unavailable("the PostgreSQL database holds no yunqi schema")
                .hint("run `yunqi cluster init --postgres URL` once for the cluster")
        }
        Some(db) => {
            tracing::error!(
                code = db.code().code(),
                message = db.message(),
                "metadata store error"
            );
            // The database's words name its tables: they go to the log, not to the caller.
            Error::internal("the cluster's metadata store refused the operation")
                .hint("an operator finds the cause in the server's log (\"metadata store error\")")
        }
        None => store_unreachable(e),
    }
}

fn corrupt(what: &str, e: Error) -> Error {
    Error::internal(format!(
        "the metadata store holds an invalid {what}: {}",
        e.message
    ))
}

async fn connect(config: &Config) -> Result<Client, Error> {
    let (client, conn) = tokio::time::timeout(OPERATION_TIMEOUT, config.connect(NoTls))
        .await
        .map_err(|_| store_unreachable("connect timed out"))?
        .map_err(pg_error)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "metadata store connection ended");
        }
    });
    Ok(client)
}

type Op<T> = Box<
    dyn for<'c> FnOnce(
            &'c mut Client,
        ) -> Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'c>>
        + Send,
>;

/// A node as it registers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node's name, unique in the cluster.
    pub name: String,
    /// Its HTTP address.
    pub http: String,
    /// Its PostgreSQL wire protocol address.
    pub pg: String,
    /// The yunqi version it runs.
    pub software: String,
}

/// A node as `yunqi cluster status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeStatus {
    /// What it registered.
    pub info: NodeInfo,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat.
    pub heartbeat_at: DateTime<Utc>,
    /// Milliseconds since its last heartbeat, by the database's clock.
    pub heartbeat_age_ms: i64,
    /// When it stopped, if it stopped gracefully.
    pub stopped_at: Option<DateTime<Utc>>,
    /// The metadata version it has loaded.
    pub seen_version: u64,
    /// Its lease: it serves only while its last confirmed read is younger than this.
    pub lease_ms: i64,
}

impl NodeStatus {
    /// Whether the node is running and current enough to serve.
    pub fn live(&self) -> bool {
        self.stopped_at.is_none() && self.heartbeat_age_ms < self.lease_ms
    }
}

/// What [`init`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitReport {
    /// The schema version found (0: none).
    pub from: i32,
    /// The schema version now.
    pub to: i32,
}

/// The metadata store on PostgreSQL.
pub struct PgStore {
    runtime: Option<tokio::runtime::Runtime>,
    config: Config,
    client: Arc<tokio::sync::Mutex<Option<Client>>>,
    node: String,
    lease: Duration,
    changes: Arc<tokio::sync::Notify>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // May be dropped inside another runtime, where blocking is not allowed.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("yunqi-meta-pg")
        .enable_all()
        .build()
        .map_err(|e| Error::internal(format!("cannot start the metadata store's runtime: {e}")))
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
        .map_err(|_| Error::internal("the metadata store's task ended"))?
}

/// Creates or migrates the yunqi schema in the database at `url`; safe to run again and from
/// several processes at once.
pub fn init(url: &str) -> Result<InitReport, Error> {
    let config = parse_url(url)?;
    let rt = runtime()?;
    let report = block_on(&rt, async move {
        let mut client = connect(&config).await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&INIT_LOCK])
            .await
            .map_err(pg_error)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS yunqi_schema (
                 id           int PRIMARY KEY CHECK (id = 1),
                 version      int NOT NULL,
                 migrated_at  timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(pg_error)?;
        let from: i32 = tx
            .query_opt("SELECT version FROM yunqi_schema WHERE id = 1", &[])
            .await
            .map_err(pg_error)?
            .map(|r| r.get(0))
            .unwrap_or(0);
        if from > SCHEMA_VERSION {
            return Err(newer_schema(from));
        }
        for m in &MIGRATIONS[from as usize..] {
            tx.batch_execute(m).await.map_err(pg_error)?;
        }
        tx.execute(
            "INSERT INTO yunqi_schema (id, version) VALUES (1, $1)
             ON CONFLICT (id) DO UPDATE SET version = excluded.version, migrated_at = now()
             WHERE yunqi_schema.version <> excluded.version",
            &[&SCHEMA_VERSION],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        Ok(InitReport {
            from,
            to: SCHEMA_VERSION,
        })
    });
    rt.shutdown_background();
    report
}

fn newer_schema(found: i32) -> Error {
    Error::unavailable(format!(
        "the PostgreSQL database holds yunqi schema version {found}; this yunqi uses version {SCHEMA_VERSION}"
    ))
    .hint("run the yunqi release the rest of the cluster runs, or upgrade this node")
}

impl PgStore {
    /// Opens the store at `url` for node `node`, whose lease is `lease`. Refuses a database
    /// without the yunqi schema or with another version of it, saying what to run.
    pub fn open(url: &str, node: &str, lease: Duration) -> Result<PgStore, Error> {
        let config = parse_url(url)?;
        let rt = runtime()?;
        let where_ = describe(&config);
        let check = config.clone();
        let client = match block_on(&rt, async move {
            let client = connect(&check).await?;
            let version: Option<i32> = match client
                .query_opt("SELECT version FROM yunqi_schema WHERE id = 1", &[])
                .await
            {
                Ok(row) => row.map(|r| r.get(0)),
                Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => None,
                Err(e) => return Err(pg_error(e)),
            };
            match version {
                Some(SCHEMA_VERSION) => Ok(client),
                Some(v) if v > SCHEMA_VERSION => Err(newer_schema(v)),
                Some(v) => Err(Error::unavailable(format!(
                    "the PostgreSQL database holds yunqi schema version {v}; this yunqi uses version {SCHEMA_VERSION}"
                ))
                .hint("run `yunqi cluster init --postgres URL` to migrate it")),
                None => Err(Error::unavailable("the PostgreSQL database holds no yunqi schema")
                    .hint("run `yunqi cluster init --postgres URL` once for the cluster")),
            }
        }) {
            Ok(c) => c,
            Err(e) => {
                // Dropping a runtime blocks, which is not allowed inside another runtime.
                rt.shutdown_background();
                let message = format!("{} ({where_})", e.message);
                return Err(Error { message, ..e });
            }
        };
        let store = PgStore {
            runtime: Some(rt),
            config,
            client: Arc::new(tokio::sync::Mutex::new(Some(client))),
            node: node.to_string(),
            lease,
            changes: Arc::new(tokio::sync::Notify::new()),
        };
        store.listen();
        Ok(store)
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.runtime
            .as_ref()
            .expect("runtime lives as long as the store")
    }

    /// Runs `op` on the store's connection, (re)connecting first if needed.
    fn run<T: Send + 'static>(&self, op: Op<T>) -> Result<T, Error> {
        let client = self.client.clone();
        let config = self.config.clone();
        block_on(self.rt(), async move {
            let mut guard = client.lock().await;
            if guard.as_ref().is_none_or(Client::is_closed) {
                *guard = Some(connect(&config).await?);
            }
            let c = guard.as_mut().expect("connected");
            let result = match tokio::time::timeout(OPERATION_TIMEOUT, op(c)).await {
                Ok(r) => r,
                Err(_) => {
                    // The connection may be wedged: the next call starts a new one.
                    *guard = None;
                    return Err(store_unreachable("operation timed out"));
                }
            };
            if result.is_err() && guard.as_ref().is_some_and(Client::is_closed) {
                *guard = None;
            }
            result
        })
    }

    /// Notified whenever another node (or this one) has applied a batch, and after every
    /// reconnection of the listener (a change may have been missed meanwhile).
    pub fn changes(&self) -> Arc<tokio::sync::Notify> {
        self.changes.clone()
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// This node's lease.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Keeps a connection that LISTENs for new versions, reconnecting while the store lives.
    fn listen(&self) {
        let config = self.config.clone();
        let changes = self.changes.clone();
        self.rt().spawn(async move {
            loop {
                if let Ok(Ok((client, mut conn))) =
                    tokio::time::timeout(OPERATION_TIMEOUT, config.connect(NoTls)).await
                {
                    let notify = changes.clone();
                    let driver = tokio::spawn(async move {
                        let mut messages =
                            futures::stream::poll_fn(move |cx| conn.poll_message(cx));
                        while let Some(m) = messages.next().await {
                            match m {
                                Ok(AsyncMessage::Notification(_)) => notify.notify_one(),
                                Ok(_) => {}
                                Err(_) => break,
                            }
                        }
                    });
                    if client
                        .batch_execute(&format!("LISTEN {CHANNEL}"))
                        .await
                        .is_ok()
                    {
                        changes.notify_one();
                        let _ = driver.await;
                    } else {
                        driver.abort();
                    }
                    drop(client);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
    }

    /// Registers this node (again, after a restart). Refuses if a running node holds the name.
    pub fn register(&self, info: &NodeInfo, seen: u64) -> Result<(), Error> {
        let info = info.clone();
        let lease_ms = self.lease.as_millis() as i64;
        self.run(Box::new(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await.map_err(pg_error)?;
                let running: Option<bool> = tx
                    .query_opt(
                        "SELECT stopped_at IS NULL
                                AND heartbeat_at > now() - lease_ms * interval '1 millisecond'
                         FROM yunqi_node WHERE name = $1 FOR UPDATE",
                        &[&info.name],
                    )
                    .await
                    .map_err(pg_error)?
                    .map(|r| r.get(0));
                if running == Some(true) {
                    return Err(Error::new(
                        ErrorCode::Conflict,
                        format!("node name {:?} is in use by a running node", info.name),
                    )
                    .hint("give each node its own name ([cluster] node or --node), or stop the other node first"));
                }
                tx.execute(
                    "INSERT INTO yunqi_node
                         (name, http, pg, software, started_at, heartbeat_at, stopped_at, seen_version, lease_ms)
                     VALUES ($1, $2, $3, $4, now(), now(), NULL, $5, $6)
                     ON CONFLICT (name) DO UPDATE SET
                         http = excluded.http, pg = excluded.pg, software = excluded.software,
                         started_at = now(), heartbeat_at = now(), stopped_at = NULL,
                         seen_version = excluded.seen_version, lease_ms = excluded.lease_ms",
                    &[
                        &info.name,
                        &info.http,
                        &info.pg,
                        &info.software,
                        &(seen as i64),
                        &lease_ms,
                    ],
                )
                .await
                .map_err(pg_error)?;
                tx.commit().await.map_err(pg_error)
            })
        }))
    }

    /// Records that this node is alive and has loaded `seen`; returns the store's version.
    pub fn heartbeat(&self, seen: u64) -> Result<u64, Error> {
        let node = self.node.clone();
        self.run(Box::new(move |c| {
            Box::pin(async move {
                let row = c
                    .query_one(
                        "WITH hb AS (
                             UPDATE yunqi_node
                             SET heartbeat_at = now(), seen_version = GREATEST(seen_version, $2)
                             WHERE name = $1 AND stopped_at IS NULL
                             RETURNING 1)
                         SELECT version, (SELECT count(*) FROM hb)
                         FROM yunqi_identity_version WHERE id = 1",
                        &[&node, &(seen as i64)],
                    )
                    .await
                    .map_err(pg_error)?;
                if row.get::<_, i64>(1) == 0 {
                    return Err(Error::unavailable(format!(
                        "node {node:?} is not registered in the cluster"
                    ))
                    .hint("restart the node; it registers itself at start"));
                }
                Ok(row.get::<_, i64>(0) as u64)
            })
        }))
    }

    /// Records that this node stopped gracefully.
    pub fn deregister(&self) -> Result<(), Error> {
        let node = self.node.clone();
        self.run(Box::new(move |c| {
            Box::pin(async move {
                c.execute(
                    "UPDATE yunqi_node SET stopped_at = now() WHERE name = $1",
                    &[&node],
                )
                .await
                .map_err(pg_error)?;
                Ok(())
            })
        }))
    }

    /// Every node that ever registered, by name.
    pub fn nodes(&self) -> Result<Vec<NodeStatus>, Error> {
        self.run(Box::new(|c| Box::pin(nodes(c))))
    }
}

async fn nodes(c: &mut Client) -> Result<Vec<NodeStatus>, Error> {
    let rows = c
        .query(
            "SELECT name, http, pg, software, started_at, heartbeat_at,
                    (extract(epoch FROM now() - heartbeat_at) * 1000)::bigint,
                    stopped_at, seen_version, lease_ms
             FROM yunqi_node ORDER BY name",
            &[],
        )
        .await
        .map_err(pg_error)?;
    Ok(rows
        .iter()
        .map(|r| NodeStatus {
            info: NodeInfo {
                name: r.get(0),
                http: r.get(1),
                pg: r.get(2),
                software: r.get(3),
            },
            started_at: r.get(4),
            heartbeat_at: r.get(5),
            heartbeat_age_ms: r.get(6),
            stopped_at: r.get(7),
            seen_version: r.get::<_, i64>(8) as u64,
            lease_ms: r.get(9),
        })
        .collect())
}

/// Lists every node of the cluster at `url` (for `yunqi cluster status`), with the store's
/// version.
pub fn status(url: &str) -> Result<(u64, Vec<NodeStatus>), Error> {
    let config = parse_url(url)?;
    let rt = runtime()?;
    let out = block_on(&rt, async move {
        let mut c = connect(&config).await?;
        let version: i64 = c
            .query_one(
                "SELECT version FROM yunqi_identity_version WHERE id = 1",
                &[],
            )
            .await
            .map_err(pg_error)?
            .get(0);
        Ok((version as u64, nodes(&mut c).await?))
    });
    rt.shutdown_background();
    out
}

async fn load(c: &mut Client) -> Result<IdentitySnapshot, Error> {
    let tx = c
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(pg_error)?;
    let mut s = IdentitySnapshot {
        version: tx
            .query_one(
                "SELECT version FROM yunqi_identity_version WHERE id = 1",
                &[],
            )
            .await
            .map_err(pg_error)?
            .get::<_, i64>(0) as u64,
        ..Default::default()
    };
    for r in tx
        .query(
            "SELECT name, title, created_at FROM yunqi_department ORDER BY name",
            &[],
        )
        .await
        .map_err(pg_error)?
    {
        s.departments.push(Department {
            name: Name::parse("department", r.get(0)).map_err(|e| corrupt("department", e))?,
            title: r.get(1),
            created_at: r.get(2),
        });
    }
    for r in tx
        .query(
            "SELECT name, role, department, id_number, display_name, created_at
             FROM yunqi_principal ORDER BY name",
            &[],
        )
        .await
        .map_err(pg_error)?
    {
        let department: Option<&str> = r.get(2);
        let id_number: Option<&str> = r.get(3);
        s.principals.push(Principal {
            name: Name::parse("principal", r.get(0)).map_err(|e| corrupt("principal", e))?,
            role: r
                .get::<_, &str>(1)
                .parse::<Role>()
                .map_err(|e| corrupt("role", e))?,
            department: department
                .map(|d| Name::parse("department", d))
                .transpose()
                .map_err(|e| corrupt("department", e))?,
            id_number: id_number
                .map(NationalId::parse)
                .transpose()
                .map_err(|e| corrupt("id number", e))?,
            display_name: r.get(4),
            created_at: r.get(5),
        });
    }
    for r in tx
        .query(
            "SELECT id, principal, secret_hash, created_at, expires_at, revoked_at
             FROM yunqi_token ORDER BY created_at, id",
            &[],
        )
        .await
        .map_err(pg_error)?
    {
        let hash: &[u8] = r.get(2);
        s.tokens.push(StoredToken {
            info: TokenInfo {
                id: r.get(0),
                principal: Name::parse("principal", r.get(1))
                    .map_err(|e| corrupt("principal", e))?,
                created_at: r.get(3),
                expires_at: r.get(4),
                revoked_at: r.get(5),
            },
            secret_hash: hash
                .try_into()
                .map_err(|_| corrupt("token", Error::internal("hash is not 32 bytes")))?,
        });
    }
    for r in tx
        .query("SELECT record::text FROM yunqi_grant ORDER BY id", &[])
        .await
        .map_err(pg_error)?
    {
        let g: Grant = serde_json::from_str(r.get(0))
            .map_err(|e| corrupt("grant", Error::internal(e.to_string())))?;
        s.grants.push(g);
    }
    s.grants
        .sort_by(|a, b| (a.requested_at, &a.id).cmp(&(b.requested_at, &b.id)));
    tx.commit().await.map_err(pg_error)?;
    Ok(s)
}

async fn apply(c: &mut Client, base: u64, changes: Vec<IdentityChange>) -> Result<u64, Error> {
    let tx = c.transaction().await.map_err(pg_error)?;
    let current: i64 = tx
        .query_one(
            "SELECT version FROM yunqi_identity_version WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await
        .map_err(pg_error)?
        .get(0);
    if current as u64 != base {
        return Err(
            Error::new(ErrorCode::Conflict, "the metadata store changed meanwhile").detail(STALE),
        );
    }
    for change in &changes {
        match change {
            IdentityChange::CreateDepartment(d) => {
                tx.execute(
                    "INSERT INTO yunqi_department (name, title, created_at) VALUES ($1, $2, $3)",
                    &[&d.name.as_str(), &d.title, &d.created_at],
                )
                .await
            }
            IdentityChange::CreatePrincipal(p) => {
                tx.execute(
                    "INSERT INTO yunqi_principal
                         (name, role, department, id_number, display_name, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                    &[
                        &p.name.as_str(),
                        &p.role.as_str(),
                        &p.department.as_ref().map(Name::as_str),
                        &p.id_number.as_ref().map(NationalId::as_str),
                        &p.display_name,
                        &p.created_at,
                    ],
                )
                .await
            }
            IdentityChange::CreateToken(t) => {
                tx.execute(
                    "INSERT INTO yunqi_token
                         (id, principal, secret_hash, created_at, expires_at, revoked_at)
                     VALUES ($1, $2, $3, $4, $5, NULL)",
                    &[
                        &t.info.id,
                        &t.info.principal.as_str(),
                        &&t.secret_hash[..],
                        &t.info.created_at,
                        &t.info.expires_at,
                    ],
                )
                .await
            }
            IdentityChange::RevokeToken { id, at } => {
                let n = tx
                    .execute(
                        "UPDATE yunqi_token SET revoked_at = coalesce(revoked_at, $2) WHERE id = $1",
                        &[id, at],
                    )
                    .await
                    .map_err(pg_error)?;
                if n == 0 {
                    return Err(Error::not_found("token", id));
                }
                Ok(n)
            }
            IdentityChange::PutGrant(g) => {
                let record = serde_json::to_string(g)
                    .map_err(|e| Error::internal(format!("cannot encode grant: {e}")))?;
                tx.execute(
                    "INSERT INTO yunqi_grant (id, record) VALUES ($1, $2::text::jsonb)
                     ON CONFLICT (id) DO UPDATE SET record = excluded.record",
                    &[&g.id, &record],
                )
                .await
            }
        }
        .map_err(pg_error)?;
    }
    let version: i64 = tx
        .query_one(
            "UPDATE yunqi_identity_version SET version = version + 1 WHERE id = 1
             RETURNING version",
            &[],
        )
        .await
        .map_err(pg_error)?
        .get(0);
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[&CHANNEL, &version.to_string()],
    )
    .await
    .map_err(pg_error)?;
    tx.commit().await.map_err(pg_error)?;
    Ok(version as u64)
}

impl IdentityStore for PgStore {
    fn load(&self) -> Result<IdentitySnapshot, Error> {
        self.run(Box::new(|c| Box::pin(load(c))))
    }

    fn current_version(&self) -> Result<Option<u64>, Error> {
        let v: i64 = self.run(Box::new(|c| {
            Box::pin(async move {
                Ok(c.query_one(
                    "SELECT version FROM yunqi_identity_version WHERE id = 1",
                    &[],
                )
                .await
                .map_err(pg_error)?
                .get(0))
            })
        }))?;
        Ok(Some(v as u64))
    }

    fn apply(&self, base: u64, changes: &[IdentityChange]) -> Result<u64, Error> {
        let changes = changes.to_vec();
        self.run(Box::new(move |c| Box::pin(apply(c, base, changes))))
    }

    /// Waits until every other live node has loaded `version`, polling the membership table;
    /// gives up waiting after one lease (plus a margin), by when any node that has not loaded
    /// it has fenced itself off. Never fails: the lease makes the wait safe even when
    /// PostgreSQL stops answering meanwhile.
    fn confirm(&self, version: u64) -> Result<(), Error> {
        let deadline = Instant::now() + self.lease + Duration::from_millis(100);
        let mut behind = Vec::new();
        loop {
            let node = self.node.clone();
            let pending = self.run(Box::new(move |c| {
                Box::pin(async move {
                    let rows = c
                        .query(
                            "SELECT name FROM yunqi_node
                             WHERE name <> $1 AND stopped_at IS NULL AND seen_version < $2
                               AND heartbeat_at > now() - lease_ms * interval '1 millisecond'",
                            &[&node, &(version as i64)],
                        )
                        .await
                        .map_err(pg_error)?;
                    Ok(rows
                        .iter()
                        .map(|r| r.get::<_, String>(0))
                        .collect::<Vec<_>>())
                })
            }));
            match pending {
                Ok(p) if p.is_empty() => return Ok(()),
                Ok(p) => behind = p,
                Err(_) => {}
            }
            if Instant::now() >= deadline {
                tracing::warn!(version, nodes = ?behind, "nodes did not confirm a revocation within their lease; they have fenced themselves off");
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
