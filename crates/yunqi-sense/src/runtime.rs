//! The running city brain: events in (decoded, validated, audited, appended to the stream log
//! and acknowledged once durable) and one runner thread per continuous view (log → engine →
//! the view's dataset, the live feed, a checkpoint).
//!
//! Exactly once: a runner writes closed windows to the view's dataset as a version marked with
//! the end of the last window it holds, then checkpoints the engine's state with the log offset
//! it reflects (one file, written to a temporary name, fsynced, renamed). After a crash it
//! restores the checkpoint and re-reads the log from its offset; processing is deterministic
//! (the watermark advances with the events, never with the wall clock), so the windows it
//! closes again are the same, and those already in the dataset — ending at or before the mark —
//! are not written twice. The late table is rewritten whole from the state, so it is exact too.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::{DataType, TimestampMicrosecondType};
use datafusion::arrow::util::display::array_value_to_string;
use yunqi_datasets::{StreamManifest, ViewSource};
use yunqi_governance::{Actor, CallContext, Governance, SYSTEM_PRINCIPAL};
use yunqi_stream::{Retention, StreamLog};
use yunqi_types::{Error, Outcome};

use crate::engine::{Engine, late_schema};
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

    fn wait(&self, seen: u64, timeout: Duration) -> u64 {
        let guard = self.seq.lock().expect("wake lock");
        let (guard, _) = self
            .cv
            .wait_timeout_while(guard, timeout, |s| *s == seen)
            .expect("wake lock");
        *guard
    }

    fn current(&self) -> u64 {
        *self.seq.lock().expect("wake lock")
    }
}

struct ViewHandle {
    plan: Arc<ViewPlan>,
    live: tokio::sync::broadcast::Sender<Arc<str>>,
    status: Mutex<ViewStatus>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Streams and continuous views of a server.
pub struct Sense {
    pub(crate) gov: Arc<Governance>,
    pub(crate) log: Arc<dyn StreamLog>,
    /// The log of NGSI-LD entity streams: the node's own, also in cluster mode (their entity
    /// writer runs on the node that declared them).
    pub(crate) entity_log: Arc<dyn StreamLog>,
    dir: PathBuf,
    views: RwLock<BTreeMap<String, Arc<ViewHandle>>>,
    /// The entities of each NGSI-LD stream, by stream.
    pub(crate) entities: RwLock<BTreeMap<String, Arc<crate::entities::EntityStore>>>,
    /// NGSI-LD subscriptions.
    pub(crate) subs: Arc<crate::subscriptions::Subscriptions>,
    pub(crate) wake: Arc<Wake>,
    dedup: Arc<crate::dedup::Dedup>,
    stop: Arc<AtomicBool>,
    /// Set when the server begins to stop: live feeds end so connections can close.
    closing: tokio::sync::watch::Sender<bool>,
    maintenance: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// How often a runner checkpoints when windows are open but none closed.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Bytes of log a runner reads at once.
const READ_BYTES: usize = 8 << 20;

fn system_actor_name() -> &'static str {
    SYSTEM_PRINCIPAL
}

fn rfc3339(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

impl Sense {
    /// Starts the runners of every existing view. `log` holds the streams' events,
    /// `entity_log` the NGSI-LD entity streams' (the same log on one node; in a cluster whose
    /// streams live in NATS JetStream, the node's own); `dir` holds the views' checkpoints.
    pub fn open(
        gov: Arc<Governance>,
        log: Arc<dyn StreamLog>,
        entity_log: Arc<dyn StreamLog>,
        dir: &Path,
    ) -> Result<Arc<Sense>, Error> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::internal(format!("create {}: {e}", dir.display())))?;
        let subs = crate::subscriptions::Subscriptions::open(gov.clone(), dir)?;
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
            let plan = ViewPlan::parse(&v.sql, &|name| sense.gov.stream_definition(name))
                .map_err(|e| e.detail(format!("view {} no longer plans", m.sql_name())))?;
            sense.start(Arc::new(plan))?;
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
                self.start(plan.clone())?;
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
        Ok(views
            .values()
            .map(|v| v.status.lock().expect("status lock").clone())
            .collect())
    }

    /// One view's progress.
    pub fn view_status(&self, actor: &Actor, name: &str) -> Result<ViewStatus, Error> {
        yunqi_governance::authorize(&actor.principal, &yunqi_governance::Action::CatalogRead)?;
        let views = self.views.read().expect("views lock");
        let v = views
            .get(name)
            .ok_or_else(|| Error::not_found("continuous view", name))?;
        Ok(v.status.lock().expect("status lock").clone())
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

    /// Whether `stream` is the key of a declared stream the log knows.
    pub fn end_offset(&self, stream: &str) -> u64 {
        self.log_for(stream).end_offset(stream)
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

    fn start(self: &Arc<Self>, plan: Arc<ViewPlan>) -> Result<(), Error> {
        let name = plan.sql_name();
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
        });
        let runner = Runner::open(self.clone(), handle.clone())?;
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

/// A checkpoint that cannot be read. The view can be recomputed: its written windows stay
/// (the dataset's mark skips them) and the rest is re-read from the log, while it still holds
/// the stream from its start.
fn damaged_checkpoint(path: &Path, why: &str) -> Error {
    Error::internal(format!("checkpoint {} is unreadable: {why}", path.display())).hint(
        "stop yunqi and move the file aside: the view then recomputes from the start of the stream's log, without writing a window twice",
    )
}

/// The checkpoint file's first line.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct CheckpointHeader {
    /// Log offset the state reflects.
    offset: u64,
    /// Windows written so far.
    windows_written: u64,
}

struct Runner {
    sense: Arc<Sense>,
    handle: Arc<ViewHandle>,
    engine: Engine,
    offset: u64,
    /// End of the last window in the dataset (from its manifest).
    written_through: i64,
    windows_written: u64,
    checkpoint: PathBuf,
    late_written: usize,
    late_events_written: u64,
    /// Events removed by retention before this view read them (since start).
    lost: u64,
}

impl Runner {
    fn open(sense: Arc<Sense>, handle: Arc<ViewHandle>) -> Result<Runner, Error> {
        let plan = handle.plan.clone();
        let checkpoint = sense.dir.join(format!("{}.checkpoint", plan.sql_name()));
        let (engine, offset, windows_written) = match std::fs::read(&checkpoint) {
            Ok(bytes) => {
                let nl = bytes
                    .iter()
                    .position(|&b| b == b'\n')
                    .ok_or_else(|| damaged_checkpoint(&checkpoint, "no header line"))?;
                let header: CheckpointHeader = serde_json::from_slice(&bytes[..nl])
                    .map_err(|e| damaged_checkpoint(&checkpoint, &e.to_string()))?;
                (
                    Engine::restore(plan.clone(), &bytes[nl + 1..])
                        .map_err(|e| damaged_checkpoint(&checkpoint, &e.message))?,
                    header.offset,
                    header.windows_written,
                )
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (Engine::new(plan.clone())?, 0, 0)
            }
            Err(e) => {
                return Err(Error::internal(format!(
                    "read checkpoint {}: {e}",
                    checkpoint.display()
                )));
            }
        };
        let m = sense
            .gov
            .dataset_store()
            .get(&plan.department, &plan.name)?;
        let written_through = m.current().and_then(|v| v.through_us).unwrap_or(i64::MIN);
        let late_events_written = engine.stats().events_late;
        Ok(Runner {
            sense,
            handle,
            engine,
            offset,
            written_through,
            windows_written,
            checkpoint,
            late_written: usize::MAX,
            late_events_written,
            lost: 0,
        })
    }

    fn run(mut self) {
        let stream = self.handle.plan.stream.clone();
        let mut last_checkpoint = Instant::now();
        let mut checkpointed_offset = self.offset;
        let mut seen = self.sense.wake.current();
        loop {
            let stopping = self.sense.stop.load(Ordering::Acquire);
            let end = self.sense.log_for(&stream).end_offset(&stream);
            let mut progressed = false;
            if self.offset < end {
                match self.step(&stream) {
                    Ok(()) => progressed = true,
                    Err(_) if self.offset < self.sense.log_for(&stream).start_offset(&stream) => {
                        // Retention removed events this view had not read: say so and go on
                        // from what is left, rather than stop for good.
                        let start = self.sense.log_for(&stream).start_offset(&stream);
                        let lost = start - self.offset;
                        tracing::error!(view = %self.handle.plan.sql_name(), lost, "events were removed by retention before the view read them");
                        self.lost += lost;
                        self.offset = start;
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(view = %self.handle.plan.sql_name(), error = %e.message, "view stopped on an error; retrying");
                        self.status(Some(e.message.clone()));
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                }
            }
            let closed = match self.close() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(view = %self.handle.plan.sql_name(), error = %e.message, "writing the view's rows failed; retrying");
                    self.status(Some(e.message.clone()));
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            if (closed || stopping || last_checkpoint.elapsed() >= CHECKPOINT_EVERY)
                && self.offset != checkpointed_offset
            {
                if let Err(e) = self.write_checkpoint() {
                    tracing::error!(view = %self.handle.plan.sql_name(), error = %e.message, "checkpoint failed");
                } else {
                    checkpointed_offset = self.offset;
                    last_checkpoint = Instant::now();
                }
            }
            self.status(None);
            if stopping {
                break;
            }
            if !progressed {
                seen = self.sense.wake.wait(seen, Duration::from_millis(200));
            }
        }
    }

    /// Reads a chunk of the log into the engine.
    fn step(&mut self, stream: &str) -> Result<(), Error> {
        let entries = self
            .sense
            .log_for(stream)
            .read(stream, self.offset, READ_BYTES)?;
        for e in entries {
            let skip = self.offset.saturating_sub(e.first) as usize;
            if skip >= e.count as usize {
                continue;
            }
            let mut skipped = 0usize;
            for b in decode_ipc(&e.payload)? {
                let rows = b.num_rows();
                if skipped + rows <= skip {
                    skipped += rows;
                    continue;
                }
                let from = skip.saturating_sub(skipped);
                skipped += rows;
                self.engine.process(&b.slice(from, rows - from))?;
            }
            self.offset = e.first + e.count as u64;
        }
        Ok(())
    }

    /// Closes ready windows and writes them (those not written before a restart).
    fn close(&mut self) -> Result<bool, Error> {
        let plan = self.handle.plan.clone();
        let store = self.sense.gov.dataset_store().clone();
        let now = self.sense.gov.now();
        let mut wrote = false;
        if let Some(closed) = self.engine.close_ready()? {
            wrote = true;
            self.write_closed(&closed, &store, now)?;
        }
        let late = self.engine.stats().events_late;
        if late != self.late_events_written || self.late_written == usize::MAX {
            let table = self.engine.late_rows()?;
            if table.num_rows() > 0 || self.late_written == usize::MAX {
                store.replace_view_rows(
                    &plan.department,
                    &format!("{}_late", plan.name),
                    &table,
                    system_actor_name(),
                    now,
                )?;
            }
            self.late_written = table.num_rows();
            self.late_events_written = late;
            wrote = true;
        }
        Ok(wrote)
    }

    /// Writes closed windows not yet in the dataset, and sends them live.
    fn write_closed(
        &mut self,
        closed: &crate::engine::Closed,
        store: &yunqi_datasets::DatasetStore,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), Error> {
        let plan = self.handle.plan.clone();
        let rows = unwritten(&closed.batch, &plan, self.written_through)?;
        if rows.num_rows() == 0 && closed.through_end_us <= self.written_through {
            return Ok(());
        }
        store.append_view_rows(
            &plan.department,
            &plan.name,
            &rows,
            closed.through_end_us,
            system_actor_name(),
            now,
        )?;
        self.written_through = self.written_through.max(closed.through_end_us);
        self.windows_written += closed.windows as u64;
        if rows.num_rows() > 0 {
            let _ =
                self.handle
                    .live
                    .send(Arc::from(live_message(&plan, &rows, closed.through_end_us)));
        }
        Ok(())
    }

    fn write_checkpoint(&self) -> Result<(), Error> {
        let header = CheckpointHeader {
            offset: self.offset,
            windows_written: self.windows_written,
        };
        let mut bytes = serde_json::to_vec(&header).map_err(|e| Error::internal(e.to_string()))?;
        bytes.push(b'\n');
        bytes.extend_from_slice(&self.engine.snapshot()?);
        let tmp = self.checkpoint.with_extension("checkpoint.tmp");
        let io = |e: std::io::Error| Error::internal(format!("write checkpoint: {e}"));
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_data().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, &self.checkpoint).map_err(io)?;
        std::fs::File::open(&self.sense.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }

    fn status(&self, error: Option<String>) {
        let s = self.engine.stats();
        let mut st = self.handle.status.lock().expect("status lock");
        st.offset = self.offset;
        st.watermark = s.watermark_us.map(rfc3339);
        st.written_through =
            (self.written_through != i64::MIN).then(|| rfc3339(self.written_through));
        st.events_in = s.events_in;
        st.events_late = s.events_late;
        st.events_filtered = s.events_filtered;
        st.open_windows = s.open_windows;
        st.windows_written = self.windows_written;
        st.error = error.or_else(|| {
            (self.lost > 0).then(|| {
                format!(
                    "{} events were removed by the stream's retention before this view read them",
                    self.lost
                )
            })
        });
    }
}

/// The rows of windows ending after `through` (those not yet in the dataset).
fn unwritten(batch: &RecordBatch, plan: &ViewPlan, through: i64) -> Result<RecordBatch, Error> {
    if through == i64::MIN {
        return Ok(batch.clone());
    }
    let Some(i) = plan
        .outputs
        .iter()
        .position(|o| o.kind == crate::plan::OutputKind::WindowStart)
    else {
        return Ok(batch.clone());
    };
    let starts = batch.column(i).as_primitive::<TimestampMicrosecondType>();
    let size = plan.window.size_us;
    let keep: BooleanArray = (0..batch.num_rows())
        .map(|r| Some(starts.value(r) + size > through))
        .collect();
    filter_record_batch(batch, &keep).map_err(|e| Error::internal(format!("filter: {e}")))
}

/// The live feed's message for newly closed windows.
fn live_message(plan: &ViewPlan, rows: &RecordBatch, through: i64) -> String {
    let mut out = String::with_capacity(rows.num_rows() * 96 + 128);
    out.push_str(&format!(
        "{{\"view\":\"{}\",\"through\":\"{}\",\"rows\":[",
        plan.sql_name(),
        rfc3339(through)
    ));
    for r in 0..rows.num_rows() {
        if r > 0 {
            out.push(',');
        }
        out.push('{');
        for (c, f) in rows.schema().fields().iter().enumerate() {
            if c > 0 {
                out.push(',');
            }
            out.push_str(&serde_json::to_string(f.name()).unwrap_or_default());
            out.push(':');
            let col = rows.column(c);
            if col.is_null(r) {
                out.push_str("null");
                continue;
            }
            let v = array_value_to_string(col, r).unwrap_or_default();
            match f.data_type() {
                DataType::Int64 | DataType::Float64 => out.push_str(&v),
                _ => out.push_str(&serde_json::to_string(&v).unwrap_or_default()),
            }
        }
        out.push('}');
    }
    out.push_str("]}");
    out
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
