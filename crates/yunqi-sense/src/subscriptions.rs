//! NGSI-LD subscriptions: standing queries whose matches yunqi POSTs to an HTTP endpoint.
//!
//! A subscription names one entity type (optionally ids or an id pattern), the attributes it
//! watches, a `q` filter, and where and how to notify. It acts as the token that created it:
//! every notification is rendered under that principal's rights as they are at the time (a
//! revoked token or grant pauses the subscription), and audited as `subscription.notify`.
//!
//! Matching happens in the entity writer, after a round is durable: the new state of each
//! changed entity is tested against the type's subscriptions and kept in the subscription's
//! pending set (latest state per entity, so memory is bounded by the type's entities). One
//! delivery task per subscription ([`crate::notify`]) sends the pending states, at most one
//! notification per `throttling` seconds, retrying with backoff; a failing endpoint marks the
//! subscription `failed` and loses nothing but intermediate states of the same entity.
//!
//! Endpoints are limited to the URL prefixes the operator allows (`yunqi serve
//! --notify-allow`); none are allowed by default. Definitions are kept in
//! `subscriptions.json` beside the views' checkpoints, written atomically on every change.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use yunqi_governance::{Actor, CallContext, Governance};
use yunqi_types::{Error, Outcome, Role};

use crate::ngsi::{self, EntitySchema, Row};

/// Most subscriptions a server holds.
pub const SUBSCRIPTIONS_MAX: usize = 10_000;

/// Most subscriptions one principal holds.
pub const SUBSCRIPTIONS_PER_PRINCIPAL_MAX: usize = 100;

/// Longest endpoint URI, in bytes.
const URI_BYTES_MAX: usize = 2048;

/// How a notification renders entities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Format {
    /// Attributes as `{"type": "Property", "value": …}`.
    #[serde(rename = "normalized")]
    Normalized,
    /// Attributes as plain values.
    #[serde(rename = "keyValues")]
    KeyValues,
}

/// Which entities a subscription selects (all of its type when both are empty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selector {
    /// One entity id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// A regular expression over ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_pattern: Option<String>,
}

/// A subscription as defined (and stored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Definition {
    /// `urn:ngsi-ld:Subscription:…`.
    pub id: String,
    /// Optional name and description, for people.
    #[serde(default)]
    pub name: Option<String>,
    /// Description.
    #[serde(default)]
    pub description: Option<String>,
    /// The entity type.
    pub entity_type: String,
    /// Selectors within the type (any one matching selects an entity).
    #[serde(default)]
    pub selectors: Vec<Selector>,
    /// Attributes whose change triggers a notification (any attribute when empty).
    #[serde(default)]
    pub watched: Vec<String>,
    /// A `q` filter on the new state.
    #[serde(default)]
    pub q: Option<String>,
    /// Attributes sent (all the owner may see when empty).
    #[serde(default)]
    pub attributes: Vec<String>,
    /// Rendering.
    pub format: Format,
    /// Where to POST.
    pub uri: String,
    /// The endpoint's media type: `application/json` or `application/ld+json`.
    pub accept: String,
    /// Least seconds between two notifications (0: none).
    #[serde(default)]
    pub throttling: u64,
    /// When the subscription ends.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    /// Whether it notifies (a paused subscription keeps nothing pending).
    pub active: bool,
    /// Why yunqi paused it, when it did (the owner lost the right to read).
    #[serde(default)]
    pub paused_reason: Option<String>,
    /// The owner (principal) and the token it acts as.
    pub owner: String,
    /// Token id.
    pub token_id: String,
    /// When created and last changed.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub modified_at: DateTime<Utc>,
}

/// Delivery counters of a subscription.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// Notifications delivered (2xx).
    pub times_sent: u64,
    /// Attempts that failed.
    pub times_failed: u64,
    /// Last attempt, last success, last failure.
    pub last_notification: Option<DateTime<Utc>>,
    /// Last success.
    pub last_success: Option<DateTime<Utc>>,
    /// Last failure.
    pub last_failure: Option<DateTime<Utc>>,
    /// What went wrong last (status code or connection error).
    pub last_failure_reason: Option<String>,
    /// Whether the last attempt failed.
    pub failing: bool,
}

/// A definition compiled for matching.
pub(crate) struct Compiled {
    pub(crate) def: Definition,
    pub(crate) schema: Arc<EntitySchema>,
    ids: Vec<String>,
    patterns: Vec<regex::Regex>,
    q: Option<crate::q::Query>,
    watched: Vec<usize>,
    pub(crate) attrs: Option<Vec<usize>>,
}

impl Compiled {
    fn new(def: Definition, schema: Arc<EntitySchema>) -> Result<Compiled, Error> {
        let mut ids = Vec::new();
        let mut patterns = Vec::new();
        for s in &def.selectors {
            if let Some(id) = &s.id {
                ngsi::check_entity_id(id).map_err(|p| Error::invalid(p.detail))?;
                ids.push(id.clone());
            }
            if let Some(p) = &s.id_pattern {
                patterns.push(regex::Regex::new(p).map_err(|e| {
                    Error::invalid(format!("idPattern is not a regular expression: {e}"))
                })?);
            }
        }
        let column = |a: &String, what: &str| {
            schema.column_of(a).ok_or_else(|| {
                Error::invalid(format!(
                    "{what} names \"{a}\", which entities of type {} do not have",
                    schema.entity_type
                ))
                .hint(format!("their attributes: {}", schema.attr_names()))
            })
        };
        let watched = def
            .watched
            .iter()
            .map(|a| column(a, "watchedAttributes"))
            .collect::<Result<Vec<_>, _>>()?;
        let attrs = if def.attributes.is_empty() {
            None
        } else {
            Some(
                def.attributes
                    .iter()
                    .map(|a| column(a, "notification.attributes"))
                    .collect::<Result<Vec<_>, _>>()?,
            )
        };
        let q = match &def.q {
            Some(q) => Some(crate::q::parse(&schema, q).map_err(|p| {
                Error::invalid(p.detail).hint("q is like intensity>100;district==\"西湖\"")
            })?),
            None => None,
        };
        Ok(Compiled {
            def,
            schema,
            ids,
            patterns,
            q,
            watched,
            attrs,
        })
    }

    /// The columns whose values decide a match (q and watched attributes).
    pub(crate) fn read_columns(&self) -> Vec<usize> {
        let mut cols = self.watched.clone();
        if let Some(q) = &self.q {
            q.columns(&mut cols);
        }
        cols
    }

    /// Whether a change of entity `id` from `prev` to `new` is notified.
    fn matches(&self, id: &str, prev: Option<&Row>, new: &Row) -> bool {
        let selected = (self.ids.is_empty() && self.patterns.is_empty())
            || self.ids.iter().any(|i| i == id)
            || self.patterns.iter().any(|p| p.is_match(id));
        if !selected || !self.q.as_ref().is_none_or(|q| q.matches(new)) {
            return false;
        }
        match prev {
            None => {
                self.watched.is_empty()
                    || self
                        .watched
                        .iter()
                        .any(|c| !matches!(new[*c], ngsi::Val::Null))
            }
            Some(prev) if self.watched.is_empty() => prev != new,
            Some(prev) => self.watched.iter().any(|c| prev[*c] != new[*c]),
        }
    }

    fn expired(&self, now: DateTime<Utc>) -> bool {
        self.def.expires_at.is_some_and(|at| now >= at)
    }
}

/// One subscription: its definition, what waits to be sent, and how delivery goes.
pub(crate) struct Sub {
    pub(crate) compiled: RwLock<Arc<Compiled>>,
    /// Entities' latest matching states not yet delivered.
    pub(crate) pending: Mutex<HashMap<Box<str>, Row>>,
    pub(crate) wake: tokio::sync::Notify,
    pub(crate) delivery: Mutex<Delivery>,
    pub(crate) stop: AtomicBool,
}

impl Sub {
    pub(crate) fn current(&self) -> Arc<Compiled> {
        self.compiled.read().expect("subscription lock").clone()
    }
}

/// Stored form: definition and delivery counters.
#[derive(Serialize, Deserialize)]
struct Stored {
    definition: Definition,
    #[serde(default)]
    delivery: Delivery,
}

/// The subscriptions of a server.
pub struct Subscriptions {
    pub(crate) gov: Arc<Governance>,
    path: PathBuf,
    allow: RwLock<Vec<String>>,
    pub(crate) subs: RwLock<BTreeMap<String, Arc<Sub>>>,
    /// Subscriptions of types no entity store serves (kept, saved, not matched).
    unloaded: Mutex<Vec<Stored>>,
    /// Subscriptions in force: the writers' fast path when there are none.
    any: AtomicUsize,
    pub(crate) seq: AtomicU64,
    pub(crate) notifier: crate::notify::Notifier,
    save_lock: Mutex<()>,
}

/// A change the writer made durable: the entity's id, its state before and after.
pub(crate) type Change = (Box<str>, Option<Row>, Row);

fn urn_suffix() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{:x}{:04x}", t, N.fetch_add(1, Ordering::Relaxed) & 0xffff)
}

impl Subscriptions {
    /// Loads the stored subscriptions; [`Subscriptions::restore`] compiles them once the
    /// entity stores exist.
    pub(crate) fn open(gov: Arc<Governance>, dir: &Path) -> Result<Arc<Subscriptions>, Error> {
        let path = dir.join("subscriptions.json");
        let stored: Vec<Stored> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::internal(format!("the subscriptions file is not readable: {e}"))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::internal(format!("read subscriptions: {e}"))),
        };
        Ok(Arc::new(Subscriptions {
            gov,
            path,
            allow: RwLock::new(Vec::new()),
            subs: RwLock::new(BTreeMap::new()),
            unloaded: Mutex::new(stored),
            any: AtomicUsize::new(0),
            seq: AtomicU64::new(0),
            notifier: crate::notify::Notifier::start()?,
            save_lock: Mutex::new(()),
        }))
    }

    /// Compiles the stored subscriptions of the types `schema_of` knows and starts their
    /// delivery.
    pub(crate) fn restore(self: &Arc<Self>, schema_of: &dyn Fn(&str) -> Option<Arc<EntitySchema>>) {
        let stored = std::mem::take(&mut *self.unloaded.lock().expect("unloaded lock"));
        let mut left = Vec::new();
        for s in stored {
            let Some(schema) = schema_of(&s.definition.entity_type) else {
                left.push(s);
                continue;
            };
            match Compiled::new(s.definition.clone(), schema) {
                Ok(c) => self.insert(c, s.delivery),
                Err(e) => {
                    tracing::warn!(id = %s.definition.id, error = %e.message, "subscription no longer compiles; kept, not matched");
                    left.push(s);
                }
            }
        }
        if !left.is_empty() {
            tracing::warn!(
                count = left.len(),
                "subscriptions of entity types no stream records are kept but not matched"
            );
        }
        *self.unloaded.lock().expect("unloaded lock") = left;
    }

    /// Sets the endpoint URL prefixes the operator allows.
    pub fn set_allowed(&self, prefixes: Vec<String>) {
        *self.allow.write().expect("allow lock") = prefixes;
    }

    fn allowed(&self, uri: &str) -> bool {
        self.allow.read().expect("allow lock").iter().any(|p| {
            uri.strip_prefix(p.as_str()).is_some_and(|rest| {
                p.ends_with('/') || rest.is_empty() || rest.starts_with(['/', '?'])
            })
        })
    }

    fn insert(self: &Arc<Self>, c: Compiled, delivery: Delivery) {
        let id = c.def.id.clone();
        let sub = Arc::new(Sub {
            compiled: RwLock::new(Arc::new(c)),
            pending: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
            delivery: Mutex::new(delivery),
            stop: AtomicBool::new(false),
        });
        self.subs
            .write()
            .expect("subscriptions lock")
            .insert(id, sub.clone());
        self.any.fetch_add(1, Ordering::AcqRel);
        self.notifier.spawn(self.clone(), sub);
    }

    /// Whether any subscription could match a change (else the writer skips the work).
    pub(crate) fn watching(&self) -> bool {
        self.any.load(Ordering::Acquire) > 0
    }

    /// Tests a round's changes of one type against its subscriptions; matches wait for
    /// delivery.
    pub(crate) fn on_commit(&self, entity_type: &str, changes: &[Change]) {
        let now = Utc::now();
        let subs = self.subs.read().expect("subscriptions lock");
        for sub in subs.values() {
            let c = sub.current();
            if c.def.entity_type != entity_type || !c.def.active || c.expired(now) {
                continue;
            }
            let mut added = false;
            {
                let mut pending = sub.pending.lock().expect("pending lock");
                for (id, prev, new) in changes {
                    if c.matches(id, prev.as_ref(), new) {
                        pending.insert(id.clone(), new.clone());
                        added = true;
                    }
                }
            }
            if added {
                sub.wake.notify_one();
            }
        }
    }

    /// Writes every definition and its counters (atomically: temporary file, fsync, rename).
    pub(crate) fn save(&self) -> Result<(), Error> {
        let _g = self.save_lock.lock().expect("save lock");
        let mut all: Vec<Stored> = self
            .subs
            .read()
            .expect("subscriptions lock")
            .values()
            .map(|s| Stored {
                definition: s.current().def.clone(),
                delivery: s.delivery.lock().expect("delivery lock").clone(),
            })
            .collect();
        for s in self.unloaded.lock().expect("unloaded lock").iter() {
            all.push(Stored {
                definition: s.definition.clone(),
                delivery: s.delivery.clone(),
            });
        }
        let bytes = serde_json::to_vec_pretty(&all)
            .map_err(|e| Error::internal(format!("encode subscriptions: {e}")))?;
        let tmp = self.path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| Error::internal(format!("write subscriptions: {e}")))
    }

    /// Stops delivery (pending notifications are not sent) and saves the counters.
    pub(crate) fn shutdown(&self) {
        for s in self.subs.read().expect("subscriptions lock").values() {
            s.stop.store(true, Ordering::Release);
            s.wake.notify_one();
        }
        self.notifier.shutdown();
        if let Err(e) = self.save() {
            tracing::error!(error = %e.message, "subscriptions not saved at shutdown");
        }
    }

    /// Pauses a subscription whose owner lost the right to read (until the owner resumes it).
    pub(crate) fn pause(&self, sub: &Sub, reason: String) {
        {
            let mut guard = sub.compiled.write().expect("subscription lock");
            let c = &**guard;
            let mut def = c.def.clone();
            def.active = false;
            def.paused_reason = Some(reason);
            def.modified_at = Utc::now();
            let next = Compiled {
                def,
                schema: c.schema.clone(),
                ids: c.ids.clone(),
                patterns: c.patterns.clone(),
                q: c.q.clone(),
                watched: c.watched.clone(),
                attrs: c.attrs.clone(),
            };
            *guard = Arc::new(next);
        }
        sub.pending.lock().expect("pending lock").clear();
        if let Err(e) = self.save() {
            tracing::error!(error = %e.message, "paused subscription not saved");
        }
    }
}

/// What a subscription request body says, before it is checked against rights.
struct Spec {
    id: Option<String>,
    name: Option<String>,
    description: Option<String>,
    entity_type: Option<String>,
    selectors: Option<Vec<Selector>>,
    watched: Option<Vec<String>>,
    q: Option<Option<String>>,
    attributes: Option<Vec<String>>,
    format: Option<Format>,
    uri: Option<String>,
    accept: Option<String>,
    throttling: Option<u64>,
    expires_at: Option<Option<DateTime<Utc>>>,
    active: Option<bool>,
}

const KNOWN_FIELDS: &[&str] = &[
    "id",
    "type",
    "@context",
    "subscriptionName",
    "name",
    "description",
    "entities",
    "watchedAttributes",
    "q",
    "notification",
    "throttling",
    "expiresAt",
    "isActive",
    "notificationTrigger",
    "status",
];

fn strings(v: &Value, field: &str) -> Result<Vec<String>, Error> {
    let arr = v
        .as_array()
        .ok_or_else(|| Error::invalid(format!("{field} must be an array of attribute names")))?;
    arr.iter()
        .map(|a| {
            a.as_str()
                .map(str::to_string)
                .ok_or_else(|| Error::invalid(format!("{field} must hold strings")))
        })
        .collect()
}

fn text(v: &Value, field: &str) -> Result<String, Error> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| Error::invalid(format!("{field} must be a string")))
}

impl Spec {
    fn parse(body: &Value, creating: bool) -> Result<Spec, Error> {
        let obj = body
            .as_object()
            .ok_or_else(|| Error::invalid("a subscription is a JSON object"))?;
        if let Some(k) = obj.keys().find(|k| !KNOWN_FIELDS.contains(&k.as_str())) {
            let hint = match k.as_str() {
                "timeInterval" => "periodic notifications are not served; use throttling",
                "geoQ" => "geo-filtered subscriptions are not served; filter with q",
                "temporalQ" | "scopeQ" | "lang" | "csf" => "this member is not served",
                _ => "see the NGSI-LD Subscription data type",
            };
            return Err(Error::invalid(format!("{k} is not a member yunqi takes")).hint(hint));
        }
        if let Some(t) = obj.get("type")
            && t.as_str() != Some("Subscription")
        {
            return Err(Error::invalid("type must be \"Subscription\""));
        }
        if let Some(trigger) = obj.get("notificationTrigger") {
            for t in strings(trigger, "notificationTrigger")? {
                if !matches!(
                    t.as_str(),
                    "entityCreated" | "entityUpdated" | "attributeCreated" | "attributeUpdated"
                ) {
                    return Err(
                        Error::invalid(format!("notificationTrigger {t} is not served")).hint(
                            "yunqi notifies creations and changes of entities and attributes",
                        ),
                    );
                }
            }
        }
        let id = match obj.get("id") {
            Some(v) => {
                let id = text(v, "id")?;
                if !id.starts_with("urn:") || id.len() > 256 {
                    return Err(Error::invalid("id must be a URN of at most 256 bytes")
                        .hint("e.g. urn:ngsi-ld:Subscription:traffic-jams, or leave it out"));
                }
                Some(id)
            }
            None => None,
        };
        let (mut entity_type, mut selectors) = (None, None);
        if let Some(ents) = obj.get("entities") {
            let arr = ents
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| Error::invalid("entities must be a non-empty array"))?;
            let mut sels = Vec::new();
            for e in arr {
                let t = e.get("type").and_then(Value::as_str).ok_or_else(|| {
                    Error::invalid("every entities member needs a type")
                        .hint("e.g. {\"type\": \"TrafficFlowObserved\"}")
                })?;
                if entity_type.get_or_insert_with(|| t.to_string()) != t {
                    return Err(Error::invalid("a subscription watches one entity type")
                        .hint("create one subscription per type"));
                }
                let sel = Selector {
                    id: e.get("id").map(|v| text(v, "entities.id")).transpose()?,
                    id_pattern: e
                        .get("idPattern")
                        .map(|v| text(v, "entities.idPattern"))
                        .transpose()?,
                };
                if sel.id.is_some() || sel.id_pattern.is_some() {
                    sels.push(sel);
                }
            }
            selectors = Some(sels);
        }
        let notification = obj.get("notification");
        if creating && notification.is_none() {
            return Err(Error::invalid("a subscription needs a notification")
                .hint("\"notification\": {\"endpoint\": {\"uri\": \"http://…\"}}"));
        }
        let (mut attributes, mut format, mut uri, mut accept) = (None, None, None, None);
        if let Some(n) = notification {
            if let Some(a) = n.get("attributes") {
                attributes = Some(strings(a, "notification.attributes")?);
            }
            if let Some(f) = n.get("format") {
                format = Some(match f.as_str() {
                    Some("normalized") => Format::Normalized,
                    Some("keyValues") => Format::KeyValues,
                    _ => {
                        return Err(Error::invalid(
                            "notification.format must be normalized or keyValues",
                        ));
                    }
                });
            }
            match n.get("endpoint") {
                Some(ep) => {
                    uri = Some(text(
                        ep.get("uri").unwrap_or(&Value::Null),
                        "notification.endpoint.uri",
                    )?);
                    if let Some(a) = ep.get("accept") {
                        let a = text(a, "notification.endpoint.accept")?;
                        if a != "application/json" && a != "application/ld+json" {
                            return Err(Error::invalid(
                                "notification.endpoint.accept must be application/json or application/ld+json",
                            ));
                        }
                        accept = Some(a);
                    }
                }
                None if creating => {
                    return Err(Error::invalid("notification.endpoint.uri is required"));
                }
                None => {}
            }
        }
        let throttling = match obj.get("throttling") {
            Some(v) => Some(v.as_u64().filter(|t| *t <= 86_400).ok_or_else(|| {
                Error::invalid("throttling is whole seconds between 0 and 86400")
            })?),
            None => None,
        };
        let expires_at = match obj.get("expiresAt") {
            Some(Value::Null) => Some(None),
            Some(v) => Some(Some(
                DateTime::parse_from_rfc3339(&text(v, "expiresAt")?)
                    .map_err(|e| Error::invalid(format!("expiresAt is not a date-time: {e}")))?
                    .to_utc(),
            )),
            None => None,
        };
        let active = match obj.get("isActive") {
            Some(v) => Some(
                v.as_bool()
                    .ok_or_else(|| Error::invalid("isActive must be true or false"))?,
            ),
            None => None,
        };
        let q = match obj.get("q") {
            Some(Value::Null) => Some(None),
            Some(v) => Some(Some(text(v, "q")?)),
            None => None,
        };
        let name = obj
            .get("subscriptionName")
            .or_else(|| obj.get("name"))
            .map(|v| text(v, "subscriptionName"))
            .transpose()?;
        let description = obj
            .get("description")
            .map(|v| text(v, "description"))
            .transpose()?;
        if name.as_ref().is_some_and(|n| n.chars().count() > 200)
            || description
                .as_ref()
                .is_some_and(|d| d.chars().count() > 2000)
        {
            return Err(Error::invalid(
                "subscriptionName is at most 200 characters, description at most 2000",
            ));
        }
        Ok(Spec {
            id,
            name,
            description,
            entity_type,
            selectors,
            watched: obj
                .get("watchedAttributes")
                .map(|v| strings(v, "watchedAttributes"))
                .transpose()?,
            q,
            attributes,
            format,
            uri,
            accept,
            throttling,
            expires_at,
            active,
        })
    }
}

/// Checks an endpoint URI's form (http, a host, no credentials, bounded length).
fn check_uri(uri: &str) -> Result<(), Error> {
    let bad = |why: &str| {
        Error::invalid(format!("notification.endpoint.uri {why}"))
            .hint("e.g. http://notify.city.example/hooks/traffic")
    };
    if uri.len() > URI_BYTES_MAX {
        return Err(bad("is too long"));
    }
    let Some(rest) = uri.strip_prefix("http://") else {
        return Err(bad(
            "must be an http:// URL (https and MQTT endpoints are not served)",
        ));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() || authority.contains('@') {
        return Err(bad("must name a host and no credentials"));
    }
    if uri.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("must not contain spaces"));
    }
    Ok(())
}

fn iso(t: Option<DateTime<Utc>>) -> Value {
    t.map(|t| Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
        .unwrap_or(Value::Null)
}

/// A subscription as NGSI-LD represents it, with its delivery status.
fn represent(c: &Compiled, d: &Delivery, now: DateTime<Utc>) -> Value {
    let def = &c.def;
    let mut entities: Vec<Value> = def
        .selectors
        .iter()
        .map(|s| {
            let mut e = json!({"type": def.entity_type});
            if let Some(id) = &s.id {
                e["id"] = json!(id);
            }
            if let Some(p) = &s.id_pattern {
                e["idPattern"] = json!(p);
            }
            e
        })
        .collect();
    if entities.is_empty() {
        entities.push(json!({"type": def.entity_type}));
    }
    let status = if c.expired(now) {
        "expired"
    } else if def.active {
        "active"
    } else {
        "paused"
    };
    let mut notification = json!({
        "format": def.format,
        "endpoint": {"uri": def.uri, "accept": def.accept},
        "status": if d.failing { "failed" } else { "ok" },
        "timesSent": d.times_sent,
        "timesFailed": d.times_failed,
    });
    if !def.attributes.is_empty() {
        notification["attributes"] = json!(def.attributes);
    }
    for (k, v) in [
        ("lastNotification", d.last_notification),
        ("lastSuccess", d.last_success),
        ("lastFailure", d.last_failure),
    ] {
        if v.is_some() {
            notification[k] = iso(v);
        }
    }
    if let Some(r) = &d.last_failure_reason {
        notification["lastFailureReason"] = json!(r);
    }
    let mut out = json!({
        "id": def.id,
        "type": "Subscription",
        "entities": entities,
        "notification": notification,
        "isActive": def.active,
        "status": status,
        "createdAt": iso(Some(def.created_at)),
        "modifiedAt": iso(Some(def.modified_at)),
        "owner": def.owner,
    });
    if let Some(n) = &def.name {
        // Both spellings: `name` (NGSI-LD 1.3, which clients still read), `subscriptionName`.
        out["subscriptionName"] = json!(n);
        out["name"] = json!(n);
    }
    if let Some(d) = &def.description {
        out["description"] = json!(d);
    }
    if !def.watched.is_empty() {
        out["watchedAttributes"] = json!(def.watched);
    }
    if let Some(q) = &def.q {
        out["q"] = json!(q);
    }
    if def.throttling > 0 {
        out["throttling"] = json!(def.throttling);
    }
    if def.expires_at.is_some() {
        out["expiresAt"] = iso(def.expires_at);
    }
    if let Some(r) = &def.paused_reason {
        out["pausedReason"] = json!(r);
    }
    out
}

fn may_manage(actor: &Actor, def: &Definition) -> bool {
    actor.principal.role == Role::Admin || actor.principal.name.as_str() == def.owner
}

impl crate::Sense {
    fn subscription(&self, actor: &Actor, id: &str) -> Result<Arc<Sub>, Error> {
        let sub = self
            .subs
            .subs
            .read()
            .expect("subscriptions lock")
            .get(id)
            .cloned();
        // Another principal's subscription is as unknown as a missing one.
        sub.filter(|s| may_manage(actor, &s.current().def))
            .ok_or_else(|| Error::not_found("subscription", id))
    }

    /// Checks a compiled definition against the owner's rights: the type readable, and the
    /// attributes it watches, filters on and sends visible to them.
    async fn check_rights(
        &self,
        actor: &Actor,
        c: &Compiled,
        ctx: &CallContext,
    ) -> Result<(), Error> {
        let store = self.entity_store(&c.def.entity_type)?;
        let (_, view) = self.entity_view(actor, &store, ctx).await?;
        let mut cols = c.read_columns();
        cols.extend(c.attrs.iter().flatten());
        if let Some(col) = cols.iter().find(|col| !view.sees(**col)) {
            return Err(Error::denied(format!(
                "the subscription reads attribute {}, which your grant does not include",
                c.schema.cols[*col].attr
            )));
        }
        Ok(())
    }

    /// Creates a subscription (NGSI-LD `POST /subscriptions`) acting as `actor`; returns its
    /// id. Audited as `subscription.create`.
    pub async fn create_subscription(
        &self,
        actor: &Actor,
        body: &Value,
        ctx: &CallContext,
    ) -> Result<String, Error> {
        let spec = Spec::parse(body, true)?;
        let entity_type = spec.entity_type.clone().ok_or_else(|| {
            Error::invalid("a subscription names its entity type in entities")
                .hint("\"entities\": [{\"type\": \"TrafficFlowObserved\"}]")
        })?;
        let store = self.entity_store(&entity_type)?;
        let uri = spec.uri.clone().unwrap_or_default();
        check_uri(&uri)?;
        let id = spec
            .id
            .clone()
            .unwrap_or_else(|| format!("urn:ngsi-ld:Subscription:{}", urn_suffix()));
        {
            let subs = self.subs.subs.read().expect("subscriptions lock");
            if subs.contains_key(&id) {
                return Err(Error::already_exists("subscription", &id));
            }
            if subs.len() >= SUBSCRIPTIONS_MAX {
                return Err(Error::limit(
                    "subscriptions",
                    SUBSCRIPTIONS_MAX as u64,
                    "the server holds as many subscriptions as it takes",
                ));
            }
            let owned = subs
                .values()
                .filter(|s| s.current().def.owner == actor.principal.name.as_str())
                .count();
            if owned >= SUBSCRIPTIONS_PER_PRINCIPAL_MAX {
                return Err(Error::limit(
                    "subscriptions_per_principal",
                    SUBSCRIPTIONS_PER_PRINCIPAL_MAX as u64,
                    "you hold as many subscriptions as one principal may",
                )
                .hint("delete subscriptions you no longer need"));
            }
        }
        let now = Utc::now();
        let def = Definition {
            id: id.clone(),
            name: spec.name,
            description: spec.description,
            entity_type,
            selectors: spec.selectors.unwrap_or_default(),
            watched: spec.watched.unwrap_or_default(),
            q: spec.q.flatten(),
            attributes: spec.attributes.unwrap_or_default(),
            format: spec.format.unwrap_or(Format::Normalized),
            uri: uri.clone(),
            accept: spec.accept.unwrap_or_else(|| "application/json".into()),
            throttling: spec.throttling.unwrap_or(0),
            expires_at: spec.expires_at.flatten(),
            active: spec.active.unwrap_or(true),
            paused_reason: None,
            owner: actor.principal.name.as_str().to_string(),
            token_id: actor.token_id.clone(),
            created_at: now,
            modified_at: now,
        };
        let c = Compiled::new(def, store.schema.clone())?;
        self.check_rights(actor, &c, ctx).await?;
        let object = format!("subscription:{id}");
        if !self.subs.allowed(&uri) {
            let e = Error::denied(format!(
                "notifications to {uri} are not allowed on this server"
            ))
            .hint("the operator allows endpoints with yunqi serve --notify-allow URL-PREFIX");
            self.gov
                .record_denial(
                    Some(&actor.principal),
                    "subscription.create",
                    &object,
                    &e,
                    ctx,
                )
                .await?;
            return Err(e);
        }
        self.gov
            .record_access(
                actor,
                "subscription.create",
                &object,
                Outcome::Ok,
                format!("{} to {uri}", c.def.entity_type),
                ctx,
            )
            .await?;
        self.subs.insert(c, Delivery::default());
        self.subs.save()?;
        Ok(id)
    }

    /// The subscriptions `actor` owns (an admin: all), in id order, with their status.
    pub fn subscriptions(&self, actor: &Actor) -> Vec<Value> {
        let now = Utc::now();
        self.subs
            .subs
            .read()
            .expect("subscriptions lock")
            .values()
            .filter_map(|s| {
                let c = s.current();
                may_manage(actor, &c.def)
                    .then(|| represent(&c, &s.delivery.lock().expect("delivery lock"), now))
            })
            .collect()
    }

    /// One subscription with its status.
    pub fn get_subscription(&self, actor: &Actor, id: &str) -> Result<Value, Error> {
        let s = self.subscription(actor, id)?;
        let c = s.current();
        Ok(represent(
            &c,
            &s.delivery.lock().expect("delivery lock"),
            Utc::now(),
        ))
    }

    /// Changes a subscription (NGSI-LD `PATCH /subscriptions/{id}`): the members sent replace
    /// theirs; checked again against the owner's rights and the allowed endpoints. Resuming a
    /// paused subscription (`isActive: true`) makes it act as the caller's token.
    pub async fn update_subscription(
        &self,
        actor: &Actor,
        id: &str,
        body: &Value,
        ctx: &CallContext,
    ) -> Result<(), Error> {
        let sub = self.subscription(actor, id)?;
        let spec = Spec::parse(body, false)?;
        let old = sub.current();
        if spec.id.as_ref().is_some_and(|i| i != id) {
            return Err(Error::invalid("a subscription's id cannot change"));
        }
        if spec
            .entity_type
            .as_ref()
            .is_some_and(|t| *t != old.def.entity_type)
        {
            return Err(Error::invalid("a subscription's entity type cannot change")
                .hint("create a new subscription for the other type"));
        }
        let mut def = old.def.clone();
        if let Some(v) = spec.name {
            def.name = Some(v);
        }
        if let Some(v) = spec.description {
            def.description = Some(v);
        }
        if let Some(v) = spec.selectors {
            def.selectors = v;
        }
        if let Some(v) = spec.watched {
            def.watched = v;
        }
        if let Some(v) = spec.q {
            def.q = v;
        }
        if let Some(v) = spec.attributes {
            def.attributes = v;
        }
        if let Some(v) = spec.format {
            def.format = v;
        }
        if let Some(v) = spec.uri {
            check_uri(&v)?;
            def.uri = v;
        }
        if let Some(v) = spec.accept {
            def.accept = v;
        }
        if let Some(v) = spec.throttling {
            def.throttling = v;
        }
        if let Some(v) = spec.expires_at {
            def.expires_at = v;
        }
        if let Some(v) = spec.active {
            def.active = v;
            if v {
                def.paused_reason = None;
                def.token_id = actor.token_id.clone();
                def.owner = actor.principal.name.as_str().to_string();
            }
        }
        def.modified_at = Utc::now();
        let c = Compiled::new(def, old.schema.clone())?;
        let owner = if actor.principal.name.as_str() == c.def.owner {
            actor.clone()
        } else {
            self.gov.actor_of_token(&c.def.token_id)?
        };
        self.check_rights(&owner, &c, ctx).await?;
        let object = format!("subscription:{id}");
        if !self.subs.allowed(&c.def.uri) {
            let e = Error::denied(format!(
                "notifications to {} are not allowed on this server",
                c.def.uri
            ))
            .hint("the operator allows endpoints with yunqi serve --notify-allow URL-PREFIX");
            self.gov
                .record_denial(
                    Some(&actor.principal),
                    "subscription.update",
                    &object,
                    &e,
                    ctx,
                )
                .await?;
            return Err(e);
        }
        self.gov
            .record_access(
                actor,
                "subscription.update",
                &object,
                Outcome::Ok,
                format!(
                    "{} to {}{}",
                    c.def.entity_type,
                    c.def.uri,
                    if c.def.active { "" } else { ", paused" }
                ),
                ctx,
            )
            .await?;
        let active = c.def.active;
        *sub.compiled.write().expect("subscription lock") = Arc::new(c);
        if !active {
            sub.pending.lock().expect("pending lock").clear();
        }
        self.subs.save()
    }

    /// Deletes a subscription; nothing more is sent for it. Audited as
    /// `subscription.delete`.
    pub async fn delete_subscription(
        &self,
        actor: &Actor,
        id: &str,
        ctx: &CallContext,
    ) -> Result<(), Error> {
        let sub = self.subscription(actor, id)?;
        self.gov
            .record_access(
                actor,
                "subscription.delete",
                &format!("subscription:{id}"),
                Outcome::Ok,
                String::new(),
                ctx,
            )
            .await?;
        sub.stop.store(true, Ordering::Release);
        sub.wake.notify_one();
        if self
            .subs
            .subs
            .write()
            .expect("subscriptions lock")
            .remove(id)
            .is_some()
        {
            self.subs.any.fetch_sub(1, Ordering::AcqRel);
        }
        self.subs.save()
    }

    /// Sets the endpoint URL prefixes notifications may go to (`yunqi serve --notify-allow`).
    pub fn allow_notifications_to(&self, prefixes: Vec<String>) {
        self.subs.set_allowed(prefixes);
    }
}
