//! NGSI-LD entities: the latest state of each entity of a type, kept in memory, changed only
//! through the type's stream, snapshotted as the stream's entity table.
//!
//! One writer thread per entity type takes the requests waiting for it, computes each
//! entity's new state, audits every request, appends the new states to the stream as one log
//! entry (durable before anyone is answered), then publishes them to readers. The log is the
//! truth: the entity table (`<stream>_latest`) is a snapshot of the state written at most once
//! a second with the log offset it reflects; at start the state is that snapshot plus the log
//! after its offset. Readers see only durable states.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::Value;
use yunqi_datasets::Column;
use yunqi_governance::{Actor, CallContext, Governance, SYSTEM_PRINCIPAL};
use yunqi_stream::StreamLog;
use yunqi_types::{Error, Outcome};

use crate::ngsi::{self, EntitySchema, Incoming, Problem, Row, View};
use crate::runtime::{DELETED_METADATA, Sense, decode_ipc_marked, encode_ipc};

/// Most entities in one write request.
pub const ENTITIES_PER_REQUEST_MAX: usize = 10_000;

/// Most entities a query returns at once.
pub const QUERY_LIMIT_MAX: usize = 1000;

/// Entities taken into one log entry at most.
const ROUND_ENTITIES_MAX: usize = 20_000;

/// How a write treats existing entities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// New entities only: an existing id is refused (`AlreadyExists`).
    Create,
    /// Create or change; with `replace` the attributes not sent are cleared.
    Upsert {
        /// Replace the whole entity (NGSI-LD's default) rather than merge attributes.
        replace: bool,
    },
    /// Change attributes of existing entities only (`ResourceNotFound` otherwise).
    Patch,
    /// Delete existing entities (`ResourceNotFound` otherwise).
    Delete,
}

/// What happened to one entity of a write.
#[derive(Debug, Clone)]
pub struct EntityOutcome {
    /// Its id (as sent, when it had one).
    pub id: String,
    /// `Ok(true)` created, `Ok(false)` changed, or why not.
    pub result: Result<bool, Problem>,
    /// Attributes not taken (the stream does not record them): `(name, reason)`.
    pub not_updated: Vec<(String, String)>,
}

/// Changes a temporal query reads at most.
pub const TEMPORAL_EVENTS_MAX: u64 = 2_000_000;

/// A temporal query's bound on the event time (microseconds since 1970).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeRel {
    /// Strictly before.
    Before(i64),
    /// Strictly after.
    After(i64),
    /// From the first (inclusive) to the second (exclusive).
    Between(i64, i64),
}

/// A temporal query over the history of entities of a type.
#[derive(Debug, Clone, Default)]
pub struct TemporalQuery {
    /// The entity type.
    pub entity_type: String,
    /// Only these ids.
    pub ids: Option<Vec<String>>,
    /// Only these attributes.
    pub attrs: Option<Vec<String>>,
    /// The time bound.
    pub timerel: Option<TimeRel>,
    /// Each attribute's latest instances only.
    pub last_n: Option<usize>,
    /// `options=temporalValues`: `[value, observedAt]` pairs.
    pub temporal_values: bool,
    /// `options=aggregatedValues`: the methods (`totalCount`, `distinctCount`, `sum`, `avg`,
    /// `min`, `max`) over periods of this many microseconds (`None`: the whole range).
    pub aggregate: Option<(Vec<String>, Option<i64>)>,
}

/// Aggregates an attribute's instances (`[value, observedAt]` in time order) by period:
/// for each method, `[[result, from, to], …]` with RFC 3339 bounds.
fn aggregate(instances: &[(Value, i64)], methods: &[String], period_us: Option<i64>) -> Value {
    let mut buckets: BTreeMap<i64, Vec<&Value>> = BTreeMap::new();
    let origin = instances.first().map_or(0, |(_, t)| *t);
    for (v, t) in instances {
        let b = match period_us {
            Some(p) if p > 0 => origin + (t - origin).div_euclid(p) * p,
            _ => origin,
        };
        buckets.entry(b).or_default().push(v);
    }
    let last = instances.last().map_or(0, |(_, t)| *t);
    let mut out = serde_json::Map::new();
    out.insert("type".into(), Value::String("Property".into()));
    for m in methods {
        let rows: Vec<Value> = buckets
            .iter()
            .map(|(from, vals)| {
                let to = match period_us {
                    Some(p) if p > 0 => from + p,
                    _ => last + 1,
                };
                let nums: Vec<f64> = vals.iter().filter_map(|v| v.as_f64()).collect();
                let r = match m.as_str() {
                    "totalCount" => Value::from(vals.len()),
                    "distinctCount" => {
                        let mut seen: Vec<String> = vals.iter().map(|v| v.to_string()).collect();
                        seen.sort();
                        seen.dedup();
                        Value::from(seen.len())
                    }
                    "sum" => Value::from(nums.iter().sum::<f64>()),
                    "avg" if !nums.is_empty() => {
                        Value::from(nums.iter().sum::<f64>() / nums.len() as f64)
                    }
                    "min" => nums
                        .iter()
                        .copied()
                        .reduce(f64::min)
                        .map_or(Value::Null, Value::from),
                    "max" => nums
                        .iter()
                        .copied()
                        .reduce(f64::max)
                        .map_or(Value::Null, Value::from),
                    _ => Value::Null,
                };
                serde_json::json!([r, ngsi::rfc3339(*from), ngsi::rfc3339(to)])
            })
            .collect();
        out.insert(m.clone(), Value::Array(rows));
    }
    Value::Object(out)
}

/// A query over the entities of a type.
#[derive(Debug, Clone, Default)]
pub struct EntityQuery {
    /// The entity type (required).
    pub entity_type: String,
    /// Only these ids.
    pub ids: Option<Vec<String>>,
    /// An `idPattern` (regular expression over ids).
    pub id_pattern: Option<String>,
    /// The `q` filter.
    pub q: Option<String>,
    /// Only these attributes.
    pub attrs: Option<Vec<String>>,
    /// Skip this many matches.
    pub offset: usize,
    /// Return at most this many (≤ [`QUERY_LIMIT_MAX`]).
    pub limit: usize,
    /// Key-value rendering.
    pub key_values: bool,
    /// A geo-query on a GeoProperty.
    pub geo: Option<crate::geo::GeoQuery>,
}

struct Table {
    rows: BTreeMap<Box<str>, Row>,
    /// Log offset the rows reflect.
    offset: u64,
    /// Bumped by each published round.
    version: u64,
}

/// A round's new states by id (`None`: deleted) and the deleted entities' last states.
type RoundStates = (HashMap<Box<str>, Option<Row>>, HashMap<Box<str>, Row>);

struct WriteOp {
    actor: Actor,
    ctx: CallContext,
    mode: WriteMode,
    entities: Vec<Incoming>,
    /// Entities refused before the writer (reported in the audit record).
    refused_early: usize,
    reply: tokio::sync::oneshot::Sender<Result<Vec<Result<bool, Problem>>, Error>>,
}

/// The entities of one type.
pub(crate) struct EntityStore {
    pub(crate) schema: Arc<EntitySchema>,
    table: String,
    state: RwLock<Table>,
    tx: Mutex<Option<tokio::sync::mpsc::Sender<WriteOp>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    stop: AtomicBool,
    /// Events the log had dropped by retention before the snapshot read them (lost changes).
    lost: u64,
    /// Subscriptions, told of every durable change.
    subs: Arc<crate::subscriptions::Subscriptions>,
}

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

impl EntityStore {
    /// Rebuilds the state (snapshot + log after it) and starts the writer and the snapshotter.
    pub(crate) fn open(
        gov: Arc<Governance>,
        log: Arc<dyn StreamLog>,
        wake: Arc<dyn Fn() + Send + Sync>,
        subs: Arc<crate::subscriptions::Subscriptions>,
        m: &yunqi_datasets::StreamManifest,
    ) -> Result<Arc<EntityStore>, Error> {
        let schema = Arc::new(EntitySchema::new(m)?);
        let table = m
            .entities_table()
            .ok_or_else(|| Error::internal("NGSI-LD stream without an entity table"))?;
        let stream = m.sql_name();
        let store = gov.dataset_store().clone();
        let (batches, from) = store.entity_rows(&m.department, &table)?;
        let mut rows = BTreeMap::new();
        for b in &batches {
            for r in ngsi::batch_to_rows(&schema, b)? {
                rows.insert(id_of(&schema, &r), r);
            }
        }
        let start = log.start_offset(&stream);
        let lost = start.saturating_sub(from);
        if lost > 0 {
            tracing::warn!(%stream, lost, "retention removed entity changes the snapshot had not read");
        }
        let mut offset = from.max(start);
        loop {
            let entries = log.read(&stream, offset, 8 << 20)?;
            if entries.is_empty() {
                break;
            }
            for e in entries {
                let skip = offset.saturating_sub(e.first) as usize;
                let mut seen = 0usize;
                for (b, deleted) in decode_ipc_marked(&e.payload)? {
                    for r in ngsi::batch_to_rows(&schema, &b)? {
                        seen += 1;
                        if seen <= skip {
                            continue;
                        }
                        if deleted {
                            rows.remove(&id_of(&schema, &r));
                        } else {
                            rows.insert(id_of(&schema, &r), r);
                        }
                    }
                }
                offset = e.end();
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let es = Arc::new(EntityStore {
            schema,
            table,
            state: RwLock::new(Table {
                rows,
                offset,
                version: 1,
            }),
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            lost,
            subs,
        });
        let writer = {
            let (es, gov, log) = (es.clone(), gov.clone(), log.clone());
            std::thread::Builder::new()
                .name(format!("entities {stream}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_time()
                        .build()
                        .expect("writer runtime");
                    rt.block_on(es.write_loop(rx, gov, log, wake));
                })
                .map_err(|e| Error::internal(format!("start entity writer: {e}")))?
        };
        let snapshotter = {
            let es = es.clone();
            std::thread::Builder::new()
                .name(format!("snapshot {stream}"))
                .spawn(move || es.snapshot_loop(gov))
                .map_err(|e| Error::internal(format!("start entity snapshots: {e}")))?
        };
        es.threads
            .lock()
            .expect("threads lock")
            .extend([writer, snapshotter]);
        Ok(es)
    }

    async fn write_loop(
        self: Arc<Self>,
        mut rx: tokio::sync::mpsc::Receiver<WriteOp>,
        gov: Arc<Governance>,
        log: Arc<dyn StreamLog>,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) {
        let stream = self.schema.stream.sql_name();
        let object = format!("stream:{stream}");
        while let Some(first) = rx.recv().await {
            let mut ops = vec![first];
            let mut n = ops[0].entities.len();
            while n < ROUND_ENTITIES_MAX {
                match rx.try_recv() {
                    Ok(op) => {
                        n += op.entities.len();
                        ops.push(op);
                    }
                    Err(_) => break,
                }
            }
            // New states, against the published state and this round's earlier changes.
            let now = now_us();
            // The round's new states; `None`: deleted (its last state kept in `tombstones`).
            let mut overlay: HashMap<Box<str>, Option<Row>> = HashMap::new();
            let mut tombstones: HashMap<Box<str>, Row> = HashMap::new();
            let mut changed: Vec<Box<str>> = Vec::new();
            let mut results: Vec<Vec<Result<bool, Problem>>> = Vec::with_capacity(ops.len());
            {
                let st = self.state.read().expect("entities lock");
                for op in &ops {
                    let mut out = Vec::with_capacity(op.entities.len());
                    for inc in &op.entities {
                        let prev = match overlay.get(inc.id.as_str()) {
                            Some(state) => state.as_ref(),
                            None => st.rows.get(inc.id.as_str()),
                        };
                        let r = match (op.mode, prev) {
                            (WriteMode::Delete | WriteMode::Patch, None) => Err(not_found(&inc.id)),
                            (WriteMode::Delete, Some(last)) => {
                                let id: Box<str> = inc.id.as_str().into();
                                tombstones.insert(id.clone(), last.clone());
                                if overlay.insert(id.clone(), None).is_none() {
                                    changed.push(id);
                                }
                                Ok(false)
                            }
                            (WriteMode::Create, Some(_)) => Err(Problem {
                                kind: "AlreadyExists",
                                title: "entity already exists".into(),
                                detail: format!("entity {} already exists", inc.id),
                            }),
                            (mode, prev) => {
                                let replace = matches!(mode, WriteMode::Upsert { replace: true });
                                let row = ngsi::merge(&self.schema, prev, inc, replace, now);
                                let created = prev.is_none();
                                let id: Box<str> = inc.id.as_str().into();
                                if overlay.insert(id.clone(), Some(row)).is_none() {
                                    changed.push(id);
                                }
                                Ok(created)
                            }
                        };
                        out.push(r);
                    }
                    results.push(out);
                }
            }
            // Every request is audited before its changes are durable or visible.
            let audit: Vec<_> = ops
                .iter()
                .zip(&results)
                .map(|(op, res)| {
                    let created = res.iter().filter(|r| matches!(r, Ok(true))).count();
                    let updated = res.iter().filter(|r| matches!(r, Ok(false))).count();
                    let refused = res.len() - created - updated + op.refused_early;
                    let outcome = if created + updated == 0 && refused > 0 {
                        Outcome::Failed
                    } else {
                        Outcome::Ok
                    };
                    let (action, detail) = if op.mode == WriteMode::Delete {
                        (
                            "entity.delete",
                            format!("{updated} deleted, {refused} refused"),
                        )
                    } else {
                        (
                            "entity.write",
                            format!(
                                "{}: {created} created, {updated} changed, {refused} refused",
                                mode_word(op.mode)
                            ),
                        )
                    };
                    (&op.actor, action, object.clone(), outcome, detail, &op.ctx)
                })
                .collect();
            let committed = self
                .commit(
                    &gov,
                    log.as_ref(),
                    &stream,
                    audit,
                    &changed,
                    (overlay, tombstones),
                )
                .await;
            if committed.is_ok() && !changed.is_empty() {
                wake();
            }
            for (op, res) in ops.into_iter().zip(results) {
                let _ = op.reply.send(match &committed {
                    Ok(()) => Ok(res),
                    Err(e) => Err(e.clone()),
                });
            }
        }
    }

    /// Audits a round's requests, appends its new states durably, then publishes them.
    async fn commit(
        &self,
        gov: &Governance,
        log: &dyn StreamLog,
        stream: &str,
        audit: Vec<(&Actor, &str, String, Outcome, String, &CallContext)>,
        changed: &[Box<str>],
        (overlay, tombstones): RoundStates,
    ) -> Result<(), Error> {
        gov.record_accesses(audit).await?;
        if changed.is_empty() {
            return Ok(());
        }
        // One event per changed entity: its state after the round; then one entry of the
        // deleted ones' last states, marked as deletions (views never see it).
        let (kept, deleted): (Vec<&Box<str>>, Vec<&Box<str>>) =
            changed.iter().partition(|id| overlay[*id].is_some());
        let mut end = None;
        if !kept.is_empty() {
            let rows: Vec<&Row> = kept.iter().filter_map(|id| overlay[*id].as_ref()).collect();
            let payload = encode_ipc(&ngsi::rows_to_batch(&self.schema, &rows)?)?;
            let count =
                u32::try_from(rows.len()).map_err(|_| Error::internal("entity round too large"))?;
            end = Some(log.append(stream, count, payload).await?.end);
        }
        if !deleted.is_empty() {
            let rows: Vec<&Row> = deleted.iter().map(|id| &tombstones[*id]).collect();
            let batch = ngsi::rows_to_batch(&self.schema, &rows)?;
            let metadata = std::collections::HashMap::from([(
                DELETED_METADATA.to_string(),
                rows.len().to_string(),
            )]);
            let schema = batch.schema().as_ref().clone().with_metadata(metadata);
            let marked = batch
                .with_schema(Arc::new(schema))
                .map_err(|e| Error::internal(format!("deletion entry: {e}")))?;
            let count =
                u32::try_from(rows.len()).map_err(|_| Error::internal("entity round too large"))?;
            end = Some(log.append(stream, count, encode_ipc(&marked)?).await?.end);
        }
        // Subscriptions see each kept entity's state before and after the round.
        let mut notify: Vec<crate::subscriptions::Change> = Vec::new();
        let watching = self.subs.watching();
        let mut st = self.state.write().expect("entities lock");
        for (id, state) in overlay {
            match state {
                Some(row) => {
                    if watching {
                        notify.push((id.clone(), st.rows.get(&id).cloned(), row.clone()));
                    }
                    st.rows.insert(id, row);
                }
                None => {
                    st.rows.remove(&id);
                }
            }
        }
        if let Some(end) = end {
            st.offset = end;
        }
        st.version += 1;
        drop(st);
        if !notify.is_empty() {
            self.subs.on_commit(&self.schema.entity_type, &notify);
        }
        Ok(())
    }

    fn snapshot_loop(self: Arc<Self>, gov: Arc<Governance>) {
        let m = &self.schema.stream;
        let mut saved = 0u64;
        loop {
            let stopping = self.stop.load(Ordering::Acquire);
            let (version, offset, batch) = {
                let st = self.state.read().expect("entities lock");
                if st.version == saved {
                    (st.version, st.offset, None)
                } else {
                    let rows: Vec<&Row> = st.rows.values().collect();
                    (
                        st.version,
                        st.offset,
                        Some(ngsi::rows_to_batch(&self.schema, &rows)),
                    )
                }
            };
            match batch {
                None => {}
                Some(Err(e)) => tracing::error!(error = %e.message, "entity snapshot"),
                Some(Ok(batch)) => {
                    match gov.dataset_store().replace_entity_rows(
                        &m.department,
                        &self.table,
                        &batch,
                        offset,
                        SYSTEM_PRINCIPAL,
                        chrono::Utc::now(),
                    ) {
                        Ok(_) => saved = version,
                        Err(e) => tracing::error!(
                            table = %self.table, error = %e.message, "entity snapshot not written"
                        ),
                    }
                }
            }
            if stopping {
                break;
            }
            for _ in 0..10 {
                if self.stop.load(Ordering::Acquire) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Sends a write to the writer and waits for its outcome.
    async fn submit(
        &self,
        actor: &Actor,
        ctx: &CallContext,
        mode: WriteMode,
        entities: Vec<Incoming>,
        refused_early: usize,
    ) -> Result<Vec<Result<bool, Problem>>, Error> {
        let tx = self
            .tx
            .lock()
            .expect("tx lock")
            .clone()
            .ok_or_else(|| Error::unavailable("the server is stopping"))?;
        let (reply, rx) = tokio::sync::oneshot::channel();
        tx.send(WriteOp {
            actor: actor.clone(),
            ctx: ctx.clone(),
            mode,
            entities,
            refused_early,
            reply,
        })
        .await
        .map_err(|_| Error::unavailable("the server is stopping"))?;
        rx.await
            .map_err(|_| Error::unavailable("the server is stopping"))?
    }

    fn get(&self, id: &str) -> Option<Row> {
        self.state
            .read()
            .expect("entities lock")
            .rows
            .get(id)
            .cloned()
    }

    fn contains(&self, id: &str) -> bool {
        self.state
            .read()
            .expect("entities lock")
            .rows
            .contains_key(id)
    }

    /// Entities in the store, and the log offset they reflect.
    pub(crate) fn counts(&self) -> (usize, u64, u64) {
        let st = self.state.read().expect("entities lock");
        (st.rows.len(), st.offset, self.lost)
    }

    /// Stops the writer (after the requests it holds) and writes a last snapshot.
    pub(crate) fn shutdown(&self) {
        self.tx.lock().expect("tx lock").take();
        self.stop.store(true, Ordering::Release);
        let threads: Vec<_> = self
            .threads
            .lock()
            .expect("threads lock")
            .drain(..)
            .collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

fn id_of(schema: &EntitySchema, r: &Row) -> Box<str> {
    match &r[schema.id_col] {
        ngsi::Val::Text(s) => s.clone(),
        _ => "".into(),
    }
}

fn mode_word(m: WriteMode) -> &'static str {
    match m {
        WriteMode::Create => "create",
        WriteMode::Upsert { replace: true } => "upsert (replace)",
        WriteMode::Upsert { replace: false } => "upsert (update)",
        WriteMode::Patch => "patch",
        WriteMode::Delete => "delete",
    }
}

fn not_found(id: &str) -> Problem {
    Problem {
        kind: "ResourceNotFound",
        title: "entity not found".into(),
        detail: format!("no entity {id}"),
    }
}

/// A write's entities of one type: the store, the entities with their place in the request,
/// and how many were refused before reaching the writer.
type Group = (Arc<EntityStore>, Vec<(usize, Incoming)>, usize);

/// The entity type of a body, when it names one.
fn type_of(v: &Value) -> Option<&str> {
    v.get("type")
        .or_else(|| v.get("@type"))
        .and_then(Value::as_str)
}

impl Sense {
    pub(crate) fn entity_store(&self, entity_type: &str) -> Result<Arc<EntityStore>, Error> {
        // By the stores' own types: no catalog read per entity of a batch.
        if let Some(s) = self
            .entities
            .read()
            .expect("entities lock")
            .values()
            .find(|s| s.schema.entity_type == entity_type)
        {
            return Ok(s.clone());
        }
        let m = self.gov.ngsi_stream(entity_type)?;
        Err(Error::unavailable(format!(
            "the entities of {entity_type} (stream {}) are not loaded",
            m.sql_name()
        ))
        .hint("the server could not load them at start: its log says why; restart it once fixed"))
    }

    /// The store holding entity `id`, if any.
    fn store_of(&self, id: &str) -> Option<Arc<EntityStore>> {
        self.entities
            .read()
            .expect("entities lock")
            .values()
            .find(|s| s.contains(id))
            .cloned()
    }

    /// Starts serving the entities of an NGSI-LD stream.
    pub(crate) fn start_entities(&self, m: &yunqi_datasets::StreamManifest) -> Result<(), Error> {
        let wake = self.wake.clone();
        let store = EntityStore::open(
            self.gov.clone(),
            self.entity_log.clone(),
            Arc::new(move || wake.notify()),
            self.subs.clone(),
            m,
        )?;
        self.entities
            .write()
            .expect("entities lock")
            .insert(m.sql_name(), store);
        Ok(())
    }

    /// Creates, upserts or patches entities (NGSI-LD). Entities may be of several types, each
    /// mapped to its stream; the actor must be allowed to send events to each. With `url_id`
    /// (a patch), `bodies` is one object of attributes. Returns one outcome per entity, in
    /// order; an error only when nothing could be done (denied, unknown type, stopping).
    pub async fn ngsi_write(
        &self,
        actor: &Actor,
        bodies: Vec<Value>,
        mode: WriteMode,
        url_id: Option<&str>,
        ctx: &CallContext,
    ) -> Result<Vec<EntityOutcome>, Error> {
        if bodies.len() > ENTITIES_PER_REQUEST_MAX {
            return Err(Error::limit(
                "entities_per_request",
                ENTITIES_PER_REQUEST_MAX as u64,
                "too many entities in one request",
            )
            .hint("send them in several requests"));
        }
        // Each entity to its type's store; the stores' streams authorised once each.
        let mut outcomes: Vec<EntityOutcome> = Vec::with_capacity(bodies.len());
        let mut groups: BTreeMap<String, Group> = BTreeMap::new();
        for body in &bodies {
            let i = outcomes.len();
            let id_sent = url_id
                .map(str::to_string)
                .or_else(|| body.get("id").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_default();
            outcomes.push(EntityOutcome {
                id: id_sent.clone(),
                result: Ok(false),
                not_updated: Vec::new(),
            });
            let store = match (url_id, type_of(body)) {
                (Some(id), None) => match self.store_of(id) {
                    Some(s) => s,
                    None => {
                        outcomes[i].result = Err(not_found(id));
                        continue;
                    }
                },
                (_, Some(t)) => match self.entity_store(t) {
                    Ok(s) => s,
                    Err(e) if bodies.len() == 1 => return Err(e),
                    Err(e) => {
                        outcomes[i].result = Err(Problem::bad(
                            "unknown entity type",
                            format!("{}; {}", e.message, e.hint.unwrap_or_default()),
                        ));
                        continue;
                    }
                },
                (None, None) => {
                    outcomes[i].result = Err(Problem::bad(
                        "entity without type",
                        "every entity needs a \"type\" (e.g. TrafficFlowObserved)",
                    ));
                    continue;
                }
            };
            let key = store.schema.stream.sql_name();
            let group = groups
                .entry(key)
                .or_insert_with(|| (store.clone(), Vec::new(), 0));
            match ngsi::parse_entity(&store.schema, body, url_id) {
                Err(p) => {
                    outcomes[i].result = Err(p);
                    group.2 += 1;
                }
                Ok(inc) if !inc.unknown.is_empty() && mode != WriteMode::Patch => {
                    let (name, reason) = &inc.unknown[0];
                    outcomes[i].result = Err(Problem::bad(
                        "unknown attribute",
                        format!("{name}: {reason}"),
                    ));
                    group.2 += 1;
                }
                Ok(mut inc) => {
                    outcomes[i].not_updated = std::mem::take(&mut inc.unknown);
                    if mode != WriteMode::Patch || !inc.attrs.is_empty() {
                        group.1.push((i, inc));
                    }
                }
            }
        }
        // Ids new to a type must not name an entity of another type.
        if mode != WriteMode::Patch {
            for (key, (_, incs, refused)) in groups.iter_mut() {
                let others: Vec<Arc<EntityStore>> = self
                    .entities
                    .read()
                    .expect("entities lock")
                    .iter()
                    .filter(|(k, _)| *k != key)
                    .map(|(_, s)| s.clone())
                    .collect();
                incs.retain(
                    |(i, inc)| match others.iter().find(|s| s.contains(&inc.id)) {
                        Some(s) => {
                            outcomes[*i].result = Err(Problem {
                                kind: "AlreadyExists",
                                title: "entity already exists".into(),
                                detail: format!(
                                    "entity {} exists with type {}",
                                    inc.id, s.schema.entity_type
                                ),
                            });
                            *refused += 1;
                            false
                        }
                        None => true,
                    },
                );
            }
        }
        for (key, (store, incs, refused)) in groups {
            self.gov.authorize_append(actor, &key, ctx).await?;
            let (idx, incs): (Vec<usize>, Vec<Incoming>) = incs.into_iter().unzip();
            let results = store.submit(actor, ctx, mode, incs, refused).await?;
            for (i, r) in idx.into_iter().zip(results) {
                outcomes[i].result = r;
            }
        }
        Ok(outcomes)
    }

    /// Deletes entities by id (NGSI-LD delete and batch delete): each is refused alone when
    /// no type records it; the rest are deleted durably, audited as `entity.delete`, under the
    /// same right as writes.
    pub async fn ngsi_delete(
        &self,
        actor: &Actor,
        ids: Vec<String>,
        ctx: &CallContext,
    ) -> Result<Vec<EntityOutcome>, Error> {
        if ids.len() > ENTITIES_PER_REQUEST_MAX {
            return Err(Error::limit(
                "entities_per_request",
                ENTITIES_PER_REQUEST_MAX as u64,
                "too many entities in one request",
            )
            .hint("send them in several requests"));
        }
        let mut outcomes: Vec<EntityOutcome> = Vec::with_capacity(ids.len());
        let mut groups: BTreeMap<String, Group> = BTreeMap::new();
        for id in ids {
            let i = outcomes.len();
            let checked = ngsi::check_entity_id(&id);
            let store = checked.as_ref().ok().and_then(|_| self.store_of(&id));
            outcomes.push(EntityOutcome {
                id: id.clone(),
                result: Ok(false),
                not_updated: Vec::new(),
            });
            match (checked, store) {
                (Err(p), _) => outcomes[i].result = Err(p),
                (Ok(()), None) => outcomes[i].result = Err(not_found(&id)),
                (Ok(()), Some(store)) => {
                    let key = store.schema.stream.sql_name();
                    let group = groups
                        .entry(key)
                        .or_insert_with(|| (store.clone(), Vec::new(), 0));
                    group.1.push((
                        i,
                        Incoming {
                            id,
                            attrs: Vec::new(),
                            observed_at: None,
                            unknown: Vec::new(),
                        },
                    ));
                }
            }
        }
        for (key, (store, incs, refused)) in groups {
            self.gov.authorize_append(actor, &key, ctx).await?;
            let (idx, incs): (Vec<usize>, Vec<Incoming>) = incs.into_iter().unzip();
            let results = store
                .submit(actor, ctx, WriteMode::Delete, incs, refused)
                .await?;
            for (i, r) in idx.into_iter().zip(results) {
                outcomes[i].result = r;
            }
        }
        Ok(outcomes)
    }

    /// Deletes one attribute of an entity (NGSI-LD `DELETE …/attrs/{attrId}`): the attribute
    /// is cleared as a patch would set it, durably and audited; an attribute the entity does
    /// not have is not found, and `id` and the event-time attribute cannot be deleted.
    pub async fn ngsi_delete_attr(
        &self,
        actor: &Actor,
        id: &str,
        attr: &str,
        ctx: &CallContext,
    ) -> Result<Result<(), Problem>, Error> {
        if let Err(p) = ngsi::check_entity_id(id) {
            return Ok(Err(p));
        }
        let Some(store) = self.store_of(id) else {
            return Ok(Err(not_found(id)));
        };
        let schema = &store.schema;
        let missing = |detail: String| Problem {
            kind: "ResourceNotFound",
            title: "attribute not found".into(),
            detail,
        };
        let Some(c) = schema.cols.iter().position(|c| c.attr == attr) else {
            return Ok(Err(missing(format!(
                "entities of type {} have no attribute {attr}",
                schema.entity_type
            ))));
        };
        if c == schema.id_col || c == schema.time_col {
            return Ok(Err(Problem::bad(
                "attribute cannot be deleted",
                format!("{attr} is the entity's id or its event time, which every state has"),
            )));
        }
        // The right to write comes first: nobody else learns which attributes are set.
        self.gov
            .authorize_append(actor, &schema.stream.sql_name(), ctx)
            .await?;
        if !store
            .get(id)
            .is_some_and(|r| !matches!(r[c], ngsi::Val::Null))
        {
            return Ok(Err(missing(format!("entity {id} has no attribute {attr}"))));
        }
        let inc = Incoming {
            id: id.to_string(),
            attrs: vec![(c, ngsi::Val::Null)],
            observed_at: None,
            unknown: Vec::new(),
        };
        let results = store
            .submit(actor, ctx, WriteMode::Patch, vec![inc], 0)
            .await?;
        Ok(results.into_iter().next().unwrap_or(Ok(false)).map(|_| ()))
    }

    /// The history of entities of a type (NGSI-LD temporal retrieval, `/temporal/entities`),
    /// read from the type's log: each attribute as its instances in time order, each with its
    /// `observedAt`, under the same rights, columns and masks as a query. `timerel` bounds the
    /// event time (`before`/`after` `from`, `between` `from` and `to`); `last_n` keeps each
    /// attribute's latest instances. Reads at most [`TEMPORAL_EVENTS_MAX`] events.
    pub async fn ngsi_temporal(
        &self,
        actor: &Actor,
        query: &TemporalQuery,
        ctx: &CallContext,
    ) -> Result<Vec<Value>, Error> {
        // By type, or (`/temporal/entities/{id}`, no type) by the one id's type.
        let found = if query.entity_type.is_empty() {
            let id = query
                .ids
                .as_ref()
                .and_then(|i| i.first())
                .map_or("", String::as_str);
            self.store_of(id)
                .ok_or_else(|| Error::not_found("entity", id))
        } else {
            self.entity_store(&query.entity_type)
        };
        let store = match found {
            Ok(s) => s,
            Err(e)
                if e.code == yunqi_types::ErrorCode::NotFound && !query.entity_type.is_empty() =>
            {
                return Ok(Vec::new());
            }
            Err(e) => return Err(e),
        };
        let (table, view) = self.entity_view(actor, &store, ctx).await?;
        let schema = &store.schema;
        let attrs = attr_columns(schema, query.attrs.as_deref())?;
        let stream = schema.stream.sql_name();
        let in_time = |t: i64| match query.timerel {
            None => true,
            Some(TimeRel::Before(a)) => t < a,
            Some(TimeRel::After(a)) => t > a,
            Some(TimeRel::Between(a, b)) => t >= a && t < b,
        };
        // Each entity's states, in log order.
        let mut history: BTreeMap<Box<str>, Vec<Row>> = BTreeMap::new();
        let mut offset = self.entity_log.start_offset(&stream);
        let mut read = 0u64;
        loop {
            let entries = self.entity_log.read(&stream, offset, 8 << 20)?;
            if entries.is_empty() {
                break;
            }
            for e in entries {
                read += u64::from(e.count);
                if read > TEMPORAL_EVENTS_MAX {
                    return Err(Error::limit(
                        "temporal_events",
                        TEMPORAL_EVENTS_MAX,
                        "the temporal query reads too many changes",
                    )
                    .hint("narrow it with timerel=between&timeAt=…&endTimeAt=… or id=…"));
                }
                let skip = offset.saturating_sub(e.first) as usize;
                let mut seen = 0usize;
                for (b, deleted) in decode_ipc_marked(&e.payload)? {
                    for r in ngsi::batch_to_rows(schema, &b)? {
                        seen += 1;
                        if deleted || seen <= skip {
                            continue;
                        }
                        let id = id_of(schema, &r);
                        let wanted = query
                            .ids
                            .as_ref()
                            .is_none_or(|ids| ids.iter().any(|i| **i == *id));
                        let t = match r[schema.time_col] {
                            ngsi::Val::Ts(t) => t,
                            _ => continue,
                        };
                        if wanted && in_time(t) {
                            history.entry(id).or_default().push(r);
                        }
                    }
                }
                offset = e.end();
            }
        }
        let mut out = Vec::new();
        for (id, rows) in &history {
            let mut entity = serde_json::Map::new();
            entity.insert("id".into(), Value::String(id.to_string()));
            entity.insert("type".into(), Value::String(schema.entity_type.clone()));
            let mut instances: BTreeMap<String, Vec<Value>> = BTreeMap::new();
            for r in rows {
                let observed = match r[schema.time_col] {
                    ngsi::Val::Ts(t) => ngsi::rfc3339(t),
                    _ => String::new(),
                };
                let Value::Object(state) =
                    ngsi::render(schema, &table, r, attrs.as_deref(), false, &view)
                else {
                    continue;
                };
                for (k, mut v) in state {
                    if k == "id" || k == "type" || k == schema.cols[schema.time_col].attr {
                        continue;
                    }
                    if let Value::Object(o) = &mut v {
                        o.entry("observedAt")
                            .or_insert(Value::String(observed.clone()));
                    }
                    instances.entry(k).or_default().push(v);
                }
            }
            for (k, mut list) in instances {
                if let Some(n) = query.last_n
                    && list.len() > n
                {
                    list.drain(..list.len() - n);
                }
                let v = if let Some((methods, period)) = &query.aggregate {
                    let pairs: Vec<(Value, i64)> = list
                        .iter()
                        .filter_map(|v| {
                            let value = v.get("value").or_else(|| v.get("object"))?.clone();
                            let t = v.get("observedAt")?.as_str()?;
                            let t = chrono::DateTime::parse_from_rfc3339(t)
                                .ok()?
                                .timestamp_micros();
                            Some((value, t))
                        })
                        .collect::<Vec<_>>();
                    let mut pairs = pairs;
                    pairs.sort_by_key(|(_, t)| *t);
                    aggregate(&pairs, methods, *period)
                } else if query.temporal_values {
                    let kind = list
                        .first()
                        .and_then(|v| v.get("type").cloned())
                        .unwrap_or(Value::String("Property".into()));
                    let values: Vec<Value> = list
                        .iter()
                        .map(|v| {
                            let value = v.get("value").or_else(|| v.get("object")).cloned();
                            serde_json::json!([value, v.get("observedAt")])
                        })
                        .collect();
                    serde_json::json!({"type": kind, "values": values})
                } else {
                    Value::Array(list)
                };
                entity.insert(k, v);
            }
            out.push(Value::Object(entity));
        }
        self.gov
            .record_access(
                actor,
                "entity.read",
                &format!("dataset:{}.{}", schema.stream.department, store.table),
                Outcome::Ok,
                format!(
                    "temporal query type={}: {} entities, {read} changes read",
                    query.entity_type,
                    out.len()
                ),
                ctx,
            )
            .await?;
        Ok(out)
    }

    /// One entity, as `actor` may see it (NGSI-LD retrieve).
    pub async fn ngsi_get(
        &self,
        actor: &Actor,
        id: &str,
        attrs: Option<&[String]>,
        key_values: bool,
        ctx: &CallContext,
    ) -> Result<Value, Error> {
        ngsi::check_entity_id(id).map_err(|p| Error::invalid(p.detail))?;
        let Some(store) = self.store_of(id) else {
            return Err(Error::not_found("entity", id));
        };
        let (table, view) = self.entity_view(actor, &store, ctx).await?;
        let attrs = attr_columns(&store.schema, attrs)?;
        let row = store
            .get(id)
            .ok_or_else(|| Error::not_found("entity", id))?;
        let out = ngsi::render(
            &store.schema,
            &table,
            &row,
            attrs.as_deref(),
            key_values,
            &view,
        );
        self.gov
            .record_access(
                actor,
                "entity.read",
                &format!("dataset:{}.{}", store.schema.stream.department, store.table),
                Outcome::Ok,
                format!("entity {id}"),
                ctx,
            )
            .await?;
        Ok(out)
    }

    /// Entities of a type matching a query, as `actor` may see them, in id order; with the
    /// number of matches in all.
    pub async fn ngsi_query(
        &self,
        actor: &Actor,
        query: &EntityQuery,
        ctx: &CallContext,
    ) -> Result<(Vec<Value>, usize), Error> {
        // A type no stream records has no entities: brokers answer such a query (clients
        // send one as a connectivity probe) with an empty list, not an error.
        let store = match self.entity_store(&query.entity_type) {
            Ok(s) => s,
            Err(e) if e.code == yunqi_types::ErrorCode::NotFound => return Ok((Vec::new(), 0)),
            Err(e) => return Err(e),
        };
        let (table, view) = self.entity_view(actor, &store, ctx).await?;
        let schema = &store.schema;
        let q = match &query.q {
            Some(q) => Some(crate::q::parse(schema, q).map_err(|p| {
                Error::invalid(p.detail).hint("q is like intensity>100;district==\"西湖\"")
            })?),
            None => None,
        };
        if let Some(q) = &q {
            let mut cols = Vec::new();
            q.columns(&mut cols);
            if let Some(c) = cols.iter().find(|c| !view.sees(**c)) {
                return Err(Error::denied(format!(
                    "q reads attribute {}, which your grant does not include",
                    schema.cols[*c].attr
                )));
            }
        }
        let pattern = match &query.id_pattern {
            Some(p) => Some(regex::Regex::new(p).map_err(|e| {
                Error::invalid(format!("idPattern is not a regular expression: {e}"))
            })?),
            None => None,
        };
        // A geo-query reads its GeoProperty in clear: the grant must show it unmasked.
        let geo = match &query.geo {
            Some(g) => {
                let c = schema
                    .cols
                    .iter()
                    .position(|c| c.attr == g.property && c.kind == ngsi::AttrKind::GeoProperty)
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "geoproperty {} is not a GeoProperty of {}",
                            g.property, schema.entity_type
                        ))
                        .hint("geo-queries match the location attribute: geoproperty=location")
                    })?;
                if !view.sees_clear(c) {
                    return Err(Error::denied(format!(
                        "a geo-query reads {}, which your grant does not show unmasked",
                        g.property
                    )));
                }
                Some((c, g))
            }
            None => None,
        };
        let attrs = attr_columns(schema, query.attrs.as_deref())?;
        let limit = query.limit.min(QUERY_LIMIT_MAX);
        let mut total = 0usize;
        let mut out = Vec::new();
        {
            let st = store.state.read().expect("entities lock");
            let matches = |id: &str, row: &Row| {
                pattern.as_ref().is_none_or(|p| p.is_match(id))
                    && q.as_ref().is_none_or(|q| q.matches(row))
                    && geo.is_none_or(|(c, g)| match &row[c] {
                        ngsi::Val::Text(t) => crate::geo::point_of(t).is_some_and(|p| g.matches(p)),
                        _ => false,
                    })
            };
            let mut take = |id: &str, row: &Row| {
                if matches(id, row) {
                    if total >= query.offset && out.len() < limit {
                        out.push(ngsi::render(
                            schema,
                            &table,
                            row,
                            attrs.as_deref(),
                            query.key_values,
                            &view,
                        ));
                    }
                    total += 1;
                }
            };
            match &query.ids {
                Some(ids) => {
                    let mut ids: Vec<&String> = ids.iter().collect();
                    ids.sort();
                    ids.dedup();
                    for id in ids {
                        if let Some(row) = st.rows.get(id.as_str()) {
                            take(id, row);
                        }
                    }
                }
                None => st.rows.iter().for_each(|(id, row)| take(id, row)),
            }
        }
        self.gov
            .record_access(
                actor,
                "entity.read",
                &format!("dataset:{}.{}", schema.stream.department, store.table),
                Outcome::Ok,
                format!(
                    "query type={}{}: {} of {total} returned",
                    query.entity_type,
                    query
                        .q
                        .as_ref()
                        .map(|q| format!(" q={q}"))
                        .unwrap_or_default(),
                    out.len()
                ),
                ctx,
            )
            .await?;
        Ok((out, total))
    }

    /// The entity types served, with their streams and entity counts.
    pub fn ngsi_types(&self, actor: &Actor) -> Result<Vec<Value>, Error> {
        yunqi_governance::authorize(&actor.principal, &yunqi_governance::Action::CatalogRead)?;
        let stores = self.entities.read().expect("entities lock");
        Ok(stores
            .values()
            .map(|s| {
                let (entities, offset, lost) = s.counts();
                serde_json::json!({
                    "id": s.schema.entity_type,
                    "type": "EntityType",
                    "typeName": s.schema.entity_type,
                    "attributeNames": s.schema.cols.iter().enumerate()
                        .filter(|(i, _)| *i != s.schema.id_col)
                        .map(|(_, c)| c.attr.clone()).collect::<Vec<_>>(),
                    "stream": s.schema.stream.sql_name(),
                    "table": format!("{}.{}", s.schema.stream.department, s.table),
                    "entityCount": entities,
                    "logOffset": offset,
                    "changesLostToRetention": lost,
                })
            })
            .collect())
    }

    pub(crate) async fn entity_view(
        &self,
        actor: &Actor,
        store: &EntityStore,
        ctx: &CallContext,
    ) -> Result<(Vec<Column>, View), Error> {
        let (manifest, grant) = self
            .gov
            .authorize_entity_read(actor, &store.schema.stream, ctx)
            .await?;
        let view = match &grant {
            None => View::whole(&store.schema),
            Some(g) => View::granted(&store.schema, &manifest.columns, g),
        };
        Ok((manifest.columns, view))
    }

    pub(crate) fn shutdown_entities(&self) {
        let stores: Vec<_> = self
            .entities
            .read()
            .expect("entities lock")
            .values()
            .cloned()
            .collect();
        for s in stores {
            s.shutdown();
        }
    }
}

/// The columns of an `attrs` list.
fn attr_columns(
    schema: &EntitySchema,
    attrs: Option<&[String]>,
) -> Result<Option<Vec<usize>>, Error> {
    let Some(attrs) = attrs else { return Ok(None) };
    attrs
        .iter()
        .map(|a| {
            schema.column_of(a).ok_or_else(|| {
                Error::invalid(format!(
                    "attrs names \"{a}\", which stream {} does not record",
                    schema.stream.sql_name()
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}
