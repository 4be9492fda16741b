//! The running city brain: events in (decoded, validated, audited, appended to the stream log
//! and acknowledged once durable) and one runner thread per continuous view (`runner.rs`: log →
//! engine → the view's dataset, the live feed, a checkpoint; exactly once across crashes). On a
//! cluster a shared view runs on the node holding its lease (`cluster.rs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::DataType;
use yunqi_datasets::{StreamManifest, ViewSource};
use yunqi_governance::{Actor, CallContext, Governance, SYSTEM_PRINCIPAL};
use yunqi_stream::{Retention, StreamLog};
use yunqi_types::{Error, Outcome};

use crate::engine::late_schema;
use crate::ingest::{self, Rejected};
use crate::plan::{DdlKind, ViewPlan, ddl_kind, parse_create_stream};

/// A format events arrive in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventFormat {
    /// One JSON object per line.
    Ndjson,
    /// CSV with a header.
    Csv,
    /// An Arrow IPC stream.
    Arrow,
}

/// What happened to a batch of events.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AppendReport {
    /// `department.stream`.
    pub stream: String,
    /// Events accepted and durable.
    pub accepted: u64,
    /// Events rejected.
    pub rejected: u64,
    /// The rejected events (the first [`ingest::REJECTED_LISTED_MAX`]).
    pub rejections: Vec<Rejected>,
    /// Offsets given to the accepted events: `[first, end)`.
    pub first_offset: u64,
    /// See `first_offset`.
    pub end_offset: u64,
    /// The batch's idempotency key had been sent before: nothing was appended, and this is
    /// what the first attempt did (its rejections are not listed again).
    pub duplicate: bool,
}

/// What a DDL statement did.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "created", rename_all = "snake_case")]
pub enum DdlOutcome {
    /// A stream was declared.
    Stream {
        /// Its definition.
        stream: Box<StreamManifest>,
    },
    /// A continuous view was created and started.
    View {
        /// `department.view`.
        view: String,
        /// Its late table.
        late_table: String,
        /// Its columns.
        columns: Vec<String>,
    },
}

/// A view's progress.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ViewStatus {
    /// `department.view`.
    pub view: String,
    /// The stream it reads.
    pub stream: String,
    /// Log offset processed up to.
    pub offset: u64,
    /// The watermark (RFC 3339), once events have arrived.
    pub watermark: Option<String>,
    /// End of the last window written (RFC 3339).
    pub written_through: Option<String>,
    /// Events folded into windows, late, filtered out.
    pub events_in: u64,
    /// See `events_in`.
    pub events_late: u64,
    /// See `events_in`.
    pub events_filtered: u64,
    /// Open windows.
    pub open_windows: usize,
    /// Windows written.
    pub windows_written: u64,
    /// The last error, if the view is stuck.
    pub error: Option<String>,
    /// On a cluster, the node that runs the view, shown to its department's stewards.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_by: Option<String>,
}

/// Wakes runners when events arrive.
#[derive(Default)]
pub(crate) struct Wake {
    seq: Mutex<u64>,
    cv: Condvar,
}

impl Wake {
    pub(crate) fn notify(&self) {
        *self.seq.lock().expect("wake lock") += 1;
        self.cv.notify_all();
    }

    pub(crate) fn wait(&self, seen: u64, timeout: Duration) -> u64 {
        let guard = self.seq.lock().expect("wake lock");
        let (guard, _) = self
            .cv
            .wait_timeout_while(guard, timeout, |s| *s == seen)
            .expect("wake lock");
        *guard
    }

    pub(crate) fn current(&self) -> u64 {
        *self.seq.lock().expect("wake lock")
    }
}

pub(crate) struct ViewHandle {
    pub(crate) plan: Arc<ViewPlan>,
    pub(crate) live: tokio::sync::broadcast::Sender<Arc<str>>,
    pub(crate) status: Mutex<ViewStatus>,
    pub(crate) thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set when this node lets the view go (cluster): its runner ends.
    pub(crate) stop: AtomicBool,
}

/// Streams and continuous views of a server.
pub struct Sense {
    pub(crate) gov: Arc<Governance>,
    pub(crate) log: Arc<dyn StreamLog>,
    /// The log of NGSI-LD entity streams: the node's own, also in cluster mode (their entity
    /// writer runs on the node that declared them).
    pub(crate) entity_log: Arc<dyn StreamLog>,
    dir: PathBuf,
    pub(crate) views: RwLock<BTreeMap<String, Arc<ViewHandle>>>,
    /// The entities of each NGSI-LD stream, by stream.
    pub(crate) entities: RwLock<BTreeMap<String, Arc<crate::entities::EntityStore>>>,
    /// NGSI-LD subscriptions.
    pub(crate) subs: Arc<crate::subscriptions::Subscriptions>,
    pub(crate) wake: Arc<Wake>,
    dedup: Arc<crate::dedup::Dedup>,
    pub(crate) stop: Arc<AtomicBool>,
    /// On a cluster whose views are shared: the view leases this node holds.
    pub(crate) cluster: Option<yunqi_store::HeldLeases>,
    /// Set when the server begins to stop: live feeds end so connections can close.
    closing: tokio::sync::watch::Sender<bool>,
    maintenance: Mutex<Option<std::thread::JoinHandle<()>>>,
}

pub(crate) fn system_actor_name() -> &'static str {
    SYSTEM_PRINCIPAL
}

pub(crate) fn rfc3339(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

impl Sense {
    /// Starts the runners of every existing view. `log` holds the streams' events,
    /// `entity_log` the NGSI-LD entity streams' (the same log on one node; in a cluster whose
    /// streams live in NATS JetStream, the node's own); `dir` holds the views' checkpoints.
    /// With `leases` (a cluster whose views are shared, [`Governance::shared_views`]), a shared
    /// view runs on the node that holds its lease, its checkpoint beside the shared datasets.
    pub fn open(
        gov: Arc<Governance>,
        log: Arc<dyn StreamLog>,
        entity_log: Arc<dyn StreamLog>,
        dir: &Path,
        leases: Option<Arc<dyn yunqi_store::Leases>>,
    ) -> Result<Arc<Sense>, Error> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::internal(format!("create {}: {e}", dir.display())))?;
        let subs = crate::subscriptions::Subscriptions::open(gov.clone(), dir)?;
        let shares_views = gov.shared_views();
        let sense = Arc::new(Sense {
            subs,
            gov,
            log,
            entity_log,
            dir: dir.to_path_buf(),
            views: RwLock::new(BTreeMap::new()),
            entities: RwLock::new(BTreeMap::new()),
            wake: Arc::new(Wake::default()),
            dedup: Arc::default(),
            stop: Arc::new(AtomicBool::new(false)),
            closing: tokio::sync::watch::channel(false).0,
            maintenance: Mutex::new(None),
            cluster: leases
                .filter(|_| shares_views)
                .map(crate::cluster::view_leases),
        });
        for m in sense.gov.ngsi_streams() {
            sense.start_entities(&m)?;
        }
        sense.subs.restore(&|t| {
            sense
                .entities
                .read()
                .expect("entities lock")
                .values()
                .find(|s| s.schema.entity_type == t)
                .map(|s| s.schema.clone())
        });
        let manifests = sense.gov.dataset_store().list()?;
        for m in manifests {
            let Some(v) = &m.view else { continue };
            if v.late_table_of.is_some() || v.entities_of.is_some() {
                continue;
            }
            // A cluster's shared views start where their leases are taken.
            if sense.cluster.is_some()
                && sense
                    .gov
                    .dataset_store()
                    .is_shared_dataset(&m.department, &m.name)
            {
                continue;
            }
            let plan = ViewPlan::parse(&v.sql, &|name| sense.gov.stream_definition(name))
                .map_err(|e| e.detail(format!("view {} no longer plans", m.sql_name())))?;
            sense.start(Arc::new(plan))?;
        }
        if sense.cluster.is_some() {
            crate::cluster::start_keeping(&sense);
        }
        let weak = Arc::downgrade(&sense);
        let stop = sense.stop.clone();
        let t = std::thread::Builder::new()
            .name("yunqi-retention".into())
            .spawn(move || {
                let mut last = Instant::now() - Duration::from_secs(3600);
                while !stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(200));
                    if last.elapsed() < Duration::from_secs(60) {
                        continue;
                    }
                    last = Instant::now();
                    let Some(s) = weak.upgrade() else { break };
                    s.apply_retention();
                }
            })
            .map_err(|e| Error::internal(format!("start retention thread: {e}")))?;
        *sense.maintenance.lock().expect("maintenance lock") = Some(t);
        Ok(sense)
    }

    /// Trims every stream's log to its declared retention.
    fn apply_retention(&self) {
        let streams = self.gov.stream_definitions();
        let now = chrono::Utc::now().timestamp_micros();
        for m in streams {
            let r = Retention {
                max_age: m.retention_secs.map(Duration::from_secs),
                max_bytes: m.retention_bytes,
            };
            if r.max_age.is_none() && r.max_bytes.is_none() {
                continue;
            }
            if let Err(e) = self
                .log_for(&m.sql_name())
                .apply_retention(&m.sql_name(), &r, now)
            {
                tracing::warn!(stream = %m.sql_name(), error = %e.message, "retention failed");
            }
        }
    }

    /// Runs `CREATE STREAM` or `CREATE CONTINUOUS VIEW`.
    pub async fn execute_ddl(
        self: &Arc<Self>,
        actor: &Actor,
        sql: &str,
        ctx: &CallContext,
    ) -> Result<DdlOutcome, Error> {
        match ddl_kind(sql) {
            Some(DdlKind::CreateStream) => {
                let m = parse_create_stream(sql, actor.principal.name.as_str(), self.gov.now())?;
                let m = self.create_stream(actor, m, ctx).await?;
                Ok(DdlOutcome::Stream {
                    stream: Box::new(m),
                })
            }
            Some(DdlKind::CreateContinuousView) => {
                let plan = ViewPlan::parse(sql, &|name| self.gov.get_stream(actor, name))?;
                crate::validate::with_datafusion(&plan).await?;
                let plan = Arc::new(plan);
                let source = ViewSource {
                    sql: plan.sql.clone(),
                    stream: plan.stream.clone(),
                    late_table_of: None,
                    entities_of: None,
                };
                let late_columns = late_schema()
                    .fields()
                    .iter()
                    .map(|f| yunqi_datasets::Column {
                        name: f.name().clone(),
                        label: None,
                        column_type: match f.data_type() {
                            DataType::Int64 => yunqi_datasets::ColumnType::Int,
                            _ => yunqi_datasets::ColumnType::Timestamp,
                        },
                        class: yunqi_types::ColumnClass::Internal,
                        class_declared: true,
                        detected: None,
                    })
                    .collect();
                self.gov
                    .create_view(
                        actor,
                        yunqi_governance::NewView {
                            department: plan.department.clone(),
                            name: plan.name.clone(),
                            columns: plan.output_columns(),
                            late_columns,
                            source,
                        },
                        ctx,
                    )
                    .await?;
                let shared = self.cluster.is_some()
                    && self
                        .gov
                        .dataset_store()
                        .is_shared_dataset(&plan.department, &plan.name);
                if shared {
                    // Taken here if no node runs it yet (no node does: it is new).
                    let plan = plan.clone();
                    let sense = self.clone();
                    tokio::task::spawn_blocking(move || sense.take_view(plan))
                        .await
                        .map_err(|_| Error::internal("starting the view failed"))??;
                } else {
                    self.start(plan.clone())?;
                }
                Ok(DdlOutcome::View {
                    view: plan.sql_name(),
                    late_table: format!("{}_late", plan.sql_name()),
                    columns: plan.outputs.iter().map(|o| o.name.clone()).collect(),
                })
            }
            None => Err(Error::invalid(
                "not a CREATE STREAM or CREATE CONTINUOUS VIEW statement",
            )),
        }
    }

    /// Declares a stream; an NGSI-LD stream's entities are served from then on.
    pub async fn create_stream(
        &self,
        actor: &Actor,
        m: StreamManifest,
        ctx: &CallContext,
    ) -> Result<StreamManifest, Error> {
        let m = self.gov.create_stream(actor, m, ctx).await?;
        if m.ngsi_type.is_some() {
            self.start_entities(&m)?;
        }
        Ok(m)
    }

    /// Decodes, validates, audits and durably appends a batch of events. With `atomic`, one
    /// bad event refuses the batch whole. With an idempotency `key`, a batch sent again (a
    /// retry) is not appended again: the answer is the first attempt's (see [`crate::dedup`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn append(
        &self,
        actor: &Actor,
        stream: &str,
        format: EventFormat,
        body: &[u8],
        atomic: bool,
        key: Option<&str>,
        ctx: &CallContext,
    ) -> Result<AppendReport, Error> {
        let m = self.gov.authorize_append(actor, stream, ctx).await?;
        if let Some(t) = &m.ngsi_type {
            return Err(Error::invalid(format!(
                "stream {stream} records NGSI-LD entities of type {t}"
            ))
            .detail("its events are entity states, written through the NGSI-LD API")
            .hint("send entities to POST /ngsi-ld/v1/entityOperations/upsert"));
        }
        let object = format!("stream:{stream}");
        let ticket = match key {
            None => None,
            Some(k) => {
                crate::dedup::check_key(k)?;
                match self.dedup.claim(&self.log, stream, k).await? {
                    crate::dedup::Claim::First(t) => Some(t),
                    crate::dedup::Claim::Duplicate(d) => {
                        self.gov
                            .record_access(
                                actor,
                                "stream.append",
                                &object,
                                Outcome::Ok,
                                format!(
                                    "duplicate of idempotency key {k}: nothing appended (events {}..{})",
                                    d.first, d.end
                                ),
                                ctx,
                            )
                            .await?;
                        return Ok(AppendReport {
                            stream: stream.to_string(),
                            accepted: d.end - d.first,
                            rejected: d.rejected,
                            rejections: Vec::new(),
                            first_offset: d.first,
                            end_offset: d.end,
                            duplicate: true,
                        });
                    }
                }
            }
        };
        let decoded = match format {
            EventFormat::Ndjson => ingest::decode_ndjson(&m, body)?,
            EventFormat::Csv => ingest::decode_csv(&m, body)?,
            EventFormat::Arrow => ingest::decode_arrow(&m, body)?,
        };
        let accepted = decoded.batch.num_rows() as u64;
        let rejected = decoded.rejected.len() as u64;
        // Checked before anything is audited or written: a batch is one log entry.
        let count = u32::try_from(accepted).map_err(|_| {
            Error::limit(
                "events_per_batch",
                u32::MAX as u64,
                "too many events in one batch",
            )
            .hint("send the events in several requests")
        })?;
        if atomic && rejected > 0 {
            let first: Vec<String> = decoded
                .rejected
                .iter()
                .take(5)
                .map(|r| format!("event {}: {}", r.index, r.reason))
                .collect();
            self.gov
                .record_access(
                    actor,
                    "stream.append",
                    &object,
                    Outcome::Failed,
                    format!(
                        "batch refused: {rejected} of {} events bad",
                        accepted + rejected
                    ),
                    ctx,
                )
                .await?;
            return Err(Error::invalid(format!(
                "{rejected} of {} events are invalid; the batch was refused whole",
                accepted + rejected
            ))
            .detail(first.join("; "))
            .hint("fix the events named, or send without atomic=true to accept the good ones"));
        }
        // Audited before the append: no event is visible before its record is durable.
        self.gov
            .record_access(
                actor,
                "stream.append",
                &object,
                Outcome::Ok,
                format!("{accepted} events accepted, {rejected} rejected"),
                ctx,
            )
            .await?;
        let (first, end) = if accepted > 0 {
            let payload = match key {
                // The key goes into the entry, so the log alone knows it after a restart.
                Some(k) => {
                    let metadata = std::collections::HashMap::from([
                        (crate::dedup::KEY_METADATA.to_string(), k.to_string()),
                        (
                            crate::dedup::REJECTED_METADATA.to_string(),
                            rejected.to_string(),
                        ),
                    ]);
                    let schema = decoded
                        .batch
                        .schema()
                        .as_ref()
                        .clone()
                        .with_metadata(metadata);
                    let keyed = decoded
                        .batch
                        .clone()
                        .with_schema(Arc::new(schema))
                        .map_err(|e| Error::internal(format!("keyed batch: {e}")))?;
                    encode_ipc(&keyed)?
                }
                None => encode_ipc(&decoded.batch)?,
            };
            let a = self.log.append(stream, count, payload).await?;
            self.wake.notify();
            if let Some(t) = ticket {
                t.done(crate::dedup::Done {
                    first: a.first,
                    end: a.end,
                    rejected,
                });
            }
            (a.first, a.end)
        } else {
            let end = self.log.end_offset(stream);
            (end, end)
        };
        let mut rejections = decoded.rejected;
        rejections.truncate(ingest::REJECTED_LISTED_MAX);
        Ok(AppendReport {
            stream: stream.to_string(),
            accepted,
            rejected,
            rejections,
            first_offset: first,
            end_offset: end,
            duplicate: false,
        })
    }

    /// Views, with their progress (anyone who may read the catalog).
    pub fn list_views(&self, actor: &Actor) -> Result<Vec<ViewStatus>, Error> {
        yunqi_governance::authorize(&actor.principal, &yunqi_governance::Action::CatalogRead)?;
        let views = self.views.read().expect("views lock");
        Ok(views.values().map(|v| self.status_for(actor, v)).collect())
    }

    /// One view's progress.
    pub fn view_status(&self, actor: &Actor, name: &str) -> Result<ViewStatus, Error> {
        yunqi_governance::authorize(&actor.principal, &yunqi_governance::Action::CatalogRead)?;
        let views = self.views.read().expect("views lock");
        let v = views
            .get(name)
            .ok_or_else(|| Error::not_found("continuous view", name))?;
        Ok(self.status_for(actor, v))
    }

    /// A view's status as `actor` sees it: which node runs it only for those who may change
    /// the view's department's datasets.
    fn status_for(&self, actor: &Actor, v: &ViewHandle) -> ViewStatus {
        let mut st = v.status.lock().expect("status lock").clone();
        let name = v.plan.sql_name();
        let steward = yunqi_types::Name::parse("department", &v.plan.department).is_ok_and(|d| {
            yunqi_governance::authorize(
                &actor.principal,
                &yunqi_governance::Action::DatasetWrite {
                    dataset: &name,
                    department: &d,
                },
            )
            .is_ok()
        });
        st.run_by = self.cluster_node().filter(|_| steward).map(str::to_string);
        st
    }

    /// A view's live feed: one JSON message per batch of closed windows. Only the view's own
    /// department reads it live (others query it under a grant).
    pub async fn subscribe(
        &self,
        actor: &Actor,
        name: &str,
        ctx: &CallContext,
    ) -> Result<tokio::sync::broadcast::Receiver<Arc<str>>, Error> {
        let handle = {
            let views = self.views.read().expect("views lock");
            views.get(name).cloned()
        };
        let Some(handle) = handle else {
            return Err(Error::not_found("continuous view", name));
        };
        let action = yunqi_governance::Action::DatasetQuery {
            dataset: name,
            department: &handle.plan.department,
        };
        let object = format!("dataset:{name}");
        if let Err(e) = yunqi_governance::authorize(&actor.principal, &action) {
            self.gov
                .record_denial(Some(&actor.principal), "view.live", &object, &e, ctx)
                .await?;
            return Err(e);
        }
        self.gov
            .record_access(actor, "view.live", &object, Outcome::Ok, String::new(), ctx)
            .await?;
        Ok(handle.live.subscribe())
    }

    /// A stream's end as stored now (on a cluster, every node's acknowledged appends).
    pub fn end_offset(&self, stream: &str) -> u64 {
        self.log_for(stream).current_end_offset(stream)
    }

    /// The log that holds `stream`'s events.
    pub(crate) fn log_for(&self, stream: &str) -> &Arc<dyn StreamLog> {
        if self
            .entities
            .read()
            .expect("entities lock")
            .contains_key(stream)
        {
            &self.entity_log
        } else {
            &self.log
        }
    }

    /// Starts a view's runner on this node.
    pub(crate) fn start(self: &Arc<Self>, plan: Arc<ViewPlan>) -> Result<(), Error> {
        let name = plan.sql_name();
        let checkpoint = match self.gov.dataset_store().shared_blobs() {
            Some(blobs)
                if self
                    .gov
                    .dataset_store()
                    .is_shared_dataset(&plan.department, &plan.name) =>
            {
                crate::runner::Checkpoint::Shared {
                    blobs,
                    key: crate::runner::shared_checkpoint_key(&name),
                }
            }
            _ => crate::runner::Checkpoint::File(self.dir.join(format!("{name}.checkpoint"))),
        };
        let (live, _) = tokio::sync::broadcast::channel(256);
        let handle = Arc::new(ViewHandle {
            plan: plan.clone(),
            live,
            status: Mutex::new(ViewStatus {
                view: name.clone(),
                stream: plan.stream.clone(),
                ..ViewStatus::default()
            }),
            thread: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let runner = crate::runner::Runner::open(self.clone(), handle.clone(), checkpoint)?;
        let t = std::thread::Builder::new()
            .name(format!("view {name}"))
            .spawn(move || runner.run())
            .map_err(|e| Error::internal(format!("start view thread: {e}")))?;
        *handle.thread.lock().expect("thread lock") = Some(t);
        self.views.write().expect("views lock").insert(name, handle);
        Ok(())
    }

    /// Ends the live feeds (the server is stopping; their connections must close).
    pub fn begin_shutdown(&self) {
        let _ = self.closing.send(true);
    }

    /// A receiver that turns true when the server begins to stop.
    pub fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Stops the runners (each checkpoints first) and the maintenance thread.
    pub fn shutdown(&self) {
        self.begin_shutdown();
        self.shutdown_entities();
        self.subs.shutdown();
        self.stop.store(true, Ordering::Release);
        self.wake.notify();
        let handles: Vec<Arc<ViewHandle>> = self
            .views
            .read()
            .expect("views lock")
            .values()
            .cloned()
            .collect();
        for h in handles {
            if let Some(t) = h.thread.lock().expect("thread lock").take() {
                let _ = t.join();
            }
        }
        if let Some(t) = self.maintenance.lock().expect("maintenance lock").take() {
            let _ = t.join();
        }
        self.release_views();
    }
}

/// Encodes a batch as an Arrow IPC stream.
pub fn encode_ipc(batch: &RecordBatch) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(batch.get_array_memory_size() + 1024);
    {
        let mut w =
            datafusion::arrow::ipc::writer::StreamWriter::try_new(&mut out, &batch.schema())
                .map_err(|e| Error::internal(format!("encode events: {e}")))?;
        w.write(batch)
            .and_then(|_| w.finish())
            .map_err(|e| Error::internal(format!("encode events: {e}")))?;
    }
    Ok(out)
}

/// Decodes an Arrow IPC stream.
pub fn decode_ipc(bytes: &[u8]) -> Result<Vec<RecordBatch>, Error> {
    // Deletions of NGSI-LD entities are the entity store's business: no event for anyone else.
    Ok(decode_ipc_marked(bytes)?
        .into_iter()
        .filter(|(_, deleted)| !deleted)
        .map(|(b, _)| b)
        .collect())
}

/// The schema metadata key that marks a log entry of an NGSI-LD stream as deletions: its rows
/// are the last states of entities deleted (see `entities.rs`).
pub const DELETED_METADATA: &str = "yunqi.ngsi.deleted";

/// The batches of an entry, each with whether it records deletions.
pub(crate) fn decode_ipc_marked(bytes: &[u8]) -> Result<Vec<(RecordBatch, bool)>, Error> {
    let reader =
        datafusion::arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
            .map_err(|e| Error::internal(format!("decode events: {e}")))?;
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::internal(format!("decode events: {e}")))?;
    // Entry metadata (an idempotency key) is the log's business, not the events'.
    batches
        .into_iter()
        .map(|b| {
            if b.schema().metadata().is_empty() {
                return Ok((b, false));
            }
            let deleted = b.schema().metadata().contains_key(DELETED_METADATA);
            let plain = Arc::new(datafusion::arrow::datatypes::Schema::new(
                b.schema().fields().clone(),
            ));
            RecordBatch::try_new(plain, b.columns().to_vec())
                .map(|b| (b, deleted))
                .map_err(|e| Error::internal(format!("decode events: {e}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    #[test]
    fn deletion_entries_reach_no_view() {
        let schema = Schema::new(vec![Field::new("x", DataType::Int64, false)]);
        let batch = RecordBatch::try_new(
            Arc::new(schema.clone()),
            vec![Arc::new(Int64Array::from(vec![1, 2]))],
        )
        .unwrap();
        let marked = batch
            .clone()
            .with_schema(Arc::new(schema.with_metadata(
                std::collections::HashMap::from([(DELETED_METADATA.to_string(), "2".to_string())]),
            )))
            .unwrap();
        let plain = encode_ipc(&batch).unwrap();
        let deleted = encode_ipc(&marked).unwrap();
        assert_eq!(decode_ipc(&plain).unwrap()[0].num_rows(), 2);
        assert!(decode_ipc(&deleted).unwrap().is_empty());
        let m = decode_ipc_marked(&deleted).unwrap();
        assert!(m[0].1 && m[0].0.schema().metadata().is_empty());
    }
}
