//! The services of a server: definitions applied by stewards (each version kept, audited),
//! one decider per service, and applications — inputs checked, lookups run in SQL as the
//! service's department (so grants, masks and audit apply), then decided.
//!
//! A definition is kept in `DIR/<department>.<service>/v<N>.toml` (on a cluster, in the
//! cluster's store: see [`crate::cluster`]); the highest version is live. A new version may
//! add quotas after the existing ones but not move, rename or change them: the decision log's
//! counts refer to them by position.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{DataType, Date32Type, Float64Type, Int64Type};
use datafusion::scalar::ScalarValue;
use serde_json::{Map, Value as Json};
use yunqi_governance::{Action, Actor, CallContext, Governance};
use yunqi_sql::SqlEngine;
use yunqi_stream::StreamLog;
use yunqi_types::{Clock, Error, Name, Outcome, Principal, Role};

use crate::calendar::Calendar;
use crate::decider::{
    ActKind, ActRequest, Application, AuditRecorder, Decider, Decision, check_inputs,
};
use crate::definition::{self, Applicant, Behalf, BehalfMode, Lookup, Service, Subject};
use crate::rules::Value;

struct Live {
    version: u32,
    decider: Decider,
    /// The version of the holiday dataset the decider's calendar was read from.
    calendar_version: tokio::sync::Mutex<Option<u64>>,
}

/// What applying a definition did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Applied {
    /// `department.service`.
    pub service: String,
    /// The version now live.
    pub version: u32,
    /// The definition, as read.
    pub definition: Service,
    /// Decisions so far, approvals today (the city's date) and applications waiting for review;
    /// on a cluster, only from the node that decides the service (`GET` the service for them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
    /// On a cluster: the node that decides the service now, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// What the definition leaves open (see [`Service::warnings`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// A service's counts.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Stats {
    /// Decisions made.
    pub decided: u64,
    /// Approved today (documents issued).
    pub approved_today: u64,
    /// Waiting for review.
    pub pending: usize,
}

/// The services of a server.
pub struct Serve {
    gov: Arc<Governance>,
    sql: Arc<SqlEngine>,
    log: Arc<dyn StreamLog>,
    clock: Arc<dyn Clock>,
    dir: PathBuf,
    calendar: Calendar,
    services: RwLock<BTreeMap<String, Arc<Live>>>,
    signer: Arc<crate::document::Signer>,
    /// Consents given: (subject key of the person, service) → when.
    consents: RwLock<HashMap<(String, String), chrono::DateTime<chrono::Utc>>>,
    /// Serialises consent changes (each is logged, then applied).
    consent_writer: tokio::sync::Mutex<()>,
    /// How far the consent log has been read.
    consents_read: std::sync::Mutex<u64>,
    lookups: crate::lookup::Lookups,
    cluster: Option<crate::cluster::ServeCluster>,
    stopping: AtomicBool,
}

/// The stream consents are logged in.
const CONSENTS: &str = "serve.consents";

/// A consent given or withdrawn, as its log keeps it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ConsentLine {
    /// The person's subject key (a hash of the ID number, never the number).
    subject: String,
    service: String,
    given: bool,
    at: chrono::DateTime<chrono::Utc>,
}

/// A consent a citizen has given.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConsentGiven {
    /// `department.service`.
    pub service: String,
    /// The service's title.
    pub title: String,
    /// When.
    pub given_at: chrono::DateTime<chrono::Utc>,
}

/// What online verification says of a document.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verification {
    /// Signed by this server's key and within its validity now.
    pub valid: bool,
    /// `valid`, `not_yet_valid`, `expired`, `revoked` or `invalid`.
    pub status: &'static str,
    /// Why not, when it is not valid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What it says (when the signature holds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claims: Option<crate::document::Claims>,
}

fn io(e: std::io::Error, what: &str) -> Error {
    Error::internal(format!("services: {what}: {e}")).hint("check the data directory's disk")
}

fn versions(dir: &Path) -> Result<Vec<(u32, PathBuf)>, Error> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| io(e, "list versions"))? {
        let p = e.map_err(|e| io(e, "list versions"))?.path();
        let v = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix('v'))
            .and_then(|n| n.strip_suffix(".toml"))
            .and_then(|n| n.parse().ok());
        if let Some(v) = v {
            out.push((v, p));
        }
    }
    out.sort();
    Ok(out)
}

/// The people a decision is about, so that their "who accessed my data" lists a read of it:
/// the subjects of the rows it used and the ID numbers among its inputs.
fn subjects_of(service: &Service, d: &Decision) -> Vec<String> {
    let mut subjects = d.subjects.clone();
    for i in &service.inputs {
        if matches!(i.kind, crate::definition::InputType::IdNumber)
            && let Some(v) = d.inputs.get(&i.name).and_then(|v| v.as_str())
        {
            let k = yunqi_governance::subject_key(v);
            if !subjects.contains(&k) {
                subjects.push(k);
            }
        }
    }
    subjects
}

/// The kind of applicant a principal applies as.
fn applicant_kind(role: Role) -> Applicant {
    match role {
        Role::Citizen => Applicant::Citizen,
        Role::Service => Applicant::Enterprise,
        _ => Applicant::Officer,
    }
}

/// The applicant's fields that lookups and rules read, from the authenticated principal.
pub fn applicant_fields(p: &Principal) -> BTreeMap<String, Value> {
    let text = |s: &str| Value::Text(s.to_string());
    let mut out = BTreeMap::new();
    out.insert(
        "id_number".into(),
        p.id_number
            .as_ref()
            .map_or(Value::Null, |i| text(i.as_str())),
    );
    out.insert("name".into(), text(&p.display_name));
    out.insert("principal".into(), text(p.name.as_str()));
    out.insert("role".into(), text(p.role.as_str()));
    out.insert(
        "department".into(),
        p.department
            .as_ref()
            .map_or(Value::Null, |d| text(d.as_str())),
    );
    out
}

/// Roles that apply as each kind of applicant.
fn roles(applicants: &[Applicant]) -> Vec<Role> {
    applicants
        .iter()
        .map(|a| match a {
            Applicant::Citizen => Role::Citizen,
            Applicant::Enterprise => Role::Service,
            Applicant::Officer => Role::Officer,
        })
        .collect()
}

/// The principal lookups run as: the service's department, as a service account.
fn service_actor(s: &Service) -> Result<Actor, Error> {
    let name = format!("svc_{}_{}", s.department, s.name.replace('-', "_"));
    let name: String = name.chars().take(60).collect();
    Ok(Actor {
        principal: Principal {
            name: Name::parse("principal", &name)?,
            role: Role::Service,
            department: Some(Name::parse("department", &s.department)?),
            id_number: None,
            display_name: format!("service {}", s.full_name()),
            created_at: chrono::DateTime::default(),
        },
        token_id: String::new(),
    })
}

pub(crate) fn scalar(v: &Value) -> ScalarValue {
    match v {
        Value::Null => ScalarValue::Null,
        Value::Bool(b) => ScalarValue::Boolean(Some(*b)),
        Value::Int(i) => ScalarValue::Int64(Some(*i)),
        Value::Num(x) => ScalarValue::Float64(Some(*x)),
        Value::Text(s) => ScalarValue::Utf8(Some(s.clone())),
        Value::Date(d) => {
            ScalarValue::Date32(Some((*d - chrono::NaiveDate::default()).num_days() as i32))
        }
        Value::List(_) => ScalarValue::Null,
    }
}

pub(crate) fn cell(a: &dyn Array, i: usize) -> Value {
    if a.is_null(i) {
        return Value::Null;
    }
    match a.data_type() {
        DataType::Utf8 => Value::Text(a.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Value::Text(a.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Value::Text(a.as_string_view().value(i).to_string()),
        DataType::Int64 => Value::Int(a.as_primitive::<Int64Type>().value(i)),
        DataType::Float64 => Value::Num(a.as_primitive::<Float64Type>().value(i)),
        DataType::Boolean => Value::Bool(a.as_boolean().value(i)),
        DataType::Date32 => Value::Date(
            chrono::NaiveDate::default()
                + chrono::Duration::days(a.as_primitive::<Date32Type>().value(i) as i64),
        ),
        _ => match datafusion::arrow::util::display::array_value_to_string(a, i) {
            Ok(s) => Value::Text(s),
            Err(_) => Value::Null,
        },
    }
}

impl Serve {
    /// Loads every service's live definition from `dir` and starts its decider; documents are
    /// signed with the key at `key` (made if missing). On a cluster (`cluster`), definitions
    /// live in the cluster's store instead, `log` is shared by the nodes, and each service is
    /// decided by the node that holds its lease (see [`crate::cluster`]): its decider starts
    /// when a request for it first comes here.
    pub fn open(
        gov: Arc<Governance>,
        sql: Arc<SqlEngine>,
        log: Arc<dyn StreamLog>,
        clock: Arc<dyn Clock>,
        dir: &Path,
        key: &Path,
        cluster: Option<crate::cluster::ServeCluster>,
    ) -> Result<Arc<Serve>, Error> {
        let clustered = cluster.is_some();
        if !clustered {
            std::fs::create_dir_all(dir).map_err(|e| io(e, "create the directory"))?;
        }
        let serve = Arc::new(Serve {
            gov,
            sql,
            log,
            clock,
            dir: dir.to_path_buf(),
            calendar: Calendar::china(),
            services: RwLock::new(BTreeMap::new()),
            signer: Arc::new(crate::document::Signer::open(key)?),
            consents: RwLock::new(HashMap::new()),
            consent_writer: tokio::sync::Mutex::new(()),
            consents_read: std::sync::Mutex::new(0),
            lookups: crate::lookup::Lookups::default(),
            cluster,
            stopping: AtomicBool::new(false),
        });
        serve.load_consents()?;
        if clustered {
            crate::cluster::start_renewing(&serve);
            return Ok(serve);
        }
        for e in std::fs::read_dir(dir).map_err(|e| io(e, "list services"))? {
            let p = e.map_err(|e| io(e, "list services"))?.path();
            if !p.is_dir() {
                continue;
            }
            let Some((version, file)) = versions(&p)?.pop() else {
                continue;
            };
            let text = std::fs::read_to_string(&file).map_err(|e| io(e, "read a definition"))?;
            let service = definition::parse(&text)
                .map_err(|e| e.detail(format!("{} no longer reads", file.display())))?;
            serve.start(Arc::new(service), version)?;
        }
        Ok(serve)
    }

    /// The streams whose events cancel the service's documents: each must be a stream of the
    /// service's department with the column named.
    fn cancel_sources(
        &self,
        service: &Service,
    ) -> Result<Vec<crate::decider::CancelSource>, Error> {
        service
            .cancel_on
            .iter()
            .map(|c| {
                let m = self.gov.stream_definition(&c.stream).map_err(|e| {
                    Error::invalid(format!("cancel_on stream {}: {}", c.stream, e.message)).hint(
                        "create the stream first (CREATE STREAM …), then apply the definition",
                    )
                })?;
                if m.department != service.department {
                    return Err(Error::invalid(format!(
                        "cancel_on stream {} belongs to department {}",
                        c.stream, m.department
                    )));
                }
                if !m.columns.iter().any(|x| x.name == c.column) {
                    return Err(Error::invalid(format!(
                        "cancel_on stream {} has no column {}",
                        c.stream, c.column
                    ))
                    .hint(format!(
                        "its columns: {}",
                        m.columns
                            .iter()
                            .map(|x| x.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                Ok(crate::decider::CancelSource {
                    cancel: c.clone(),
                    event_time: m.event_time.clone(),
                })
            })
            .collect()
    }

    fn start(&self, service: Arc<Service>, version: u32) -> Result<(), Error> {
        let name = service.full_name();
        let cancels = self.cancel_sources(&service)?;
        let decider = Decider::open(
            service,
            self.calendar.clone(),
            self.log.clone(),
            Arc::new(AuditRecorder(self.gov.audit().clone())),
            self.clock.clone(),
            Some(self.signer.clone()),
            cancels,
        )?;
        let old = self.services.write().expect("services lock").insert(
            name,
            Arc::new(Live {
                version,
                decider,
                calendar_version: tokio::sync::Mutex::new(None),
            }),
        );
        drop(old);
        Ok(())
    }

    fn live(&self, name: &str) -> Result<Arc<Live>, Error> {
        if let Some(l) = self.services.read().expect("services lock").get(name) {
            return Ok(l.clone());
        }
        if let Some(c) = &self.cluster
            && c.definitions.latest_of(name)?.is_some()
        {
            return Err(Error::unavailable(format!(
                "service {name} is decided by another node of the cluster"
            ))
            .hint("retry: the request goes to the node that decides it"));
        }
        Err(Error::not_found("service", name)
            .hint("GET /api/v1/services lists the services; stewards apply definitions"))
    }

    /// On a cluster, this node's name.
    pub fn cluster_node(&self) -> Option<String> {
        self.cluster.as_ref().map(|c| c.node().to_string())
    }

    pub(crate) fn cluster(&self) -> Option<&crate::cluster::ServeCluster> {
        self.cluster.as_ref()
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    pub(crate) fn decider_broken(&self, name: &str) -> bool {
        self.services
            .read()
            .expect("services lock")
            .get(name)
            .is_none_or(|l| l.decider.is_broken())
    }

    pub(crate) fn live_version(&self, name: &str) -> Option<u32> {
        self.services
            .read()
            .expect("services lock")
            .get(name)
            .map(|l| l.version)
    }

    pub(crate) fn stop_decider(&self, name: &str) {
        let old = self.services.write().expect("services lock").remove(name);
        if let Some(l) = old {
            l.decider.shutdown();
        }
        self.lookups.forget(name);
    }

    /// Starts deciding a service here (a lease just taken, or a newer definition): the old
    /// decider, if any, stops first; the consents given meanwhile are read.
    pub(crate) fn take_over(&self, service: Arc<Service>, version: u32) -> Result<(), Error> {
        let name = service.full_name();
        self.stop_decider(&name);
        self.catch_up_consents()?;
        self.start(service, version)
    }

    /// Applies a definition (stewards of its department): checked whole, its lookups planned
    /// as the department, kept as the next version and made live. Audited.
    pub async fn apply(
        &self,
        actor: &Actor,
        text: &str,
        ctx: &CallContext,
    ) -> Result<Applied, Error> {
        let service = definition::parse(text)?;
        let name = service.full_name();
        self.gov
            .authorize_action(
                actor,
                &Action::ServiceManage {
                    service: &name,
                    department: &service.department,
                },
                ctx,
            )
            .await?;
        self.gov.get_department(actor, &service.department)?;
        // Lookups must plan as the department: tables it may read, columns that exist.
        let as_service = service_actor(&service)?;
        // What applicants read is labelled: every input, every lookup and each of its columns.
        let mut unlabelled = Vec::new();
        for i in &service.inputs {
            if i.label.as_deref().is_none_or(|l| l.trim().is_empty()) {
                unlabelled.push(format!("input {}: label = \"车牌号 / Plate\"", i.name));
            }
        }
        for l in &service.lookups {
            let planned = self
                .sql
                .plan(&as_service, &l.positional, ctx)
                .await
                .map_err(|e| {
                    let mut e = Error::invalid(format!("lookup {} does not plan: {}", l.name, e.message));
                    e.hint = Some(
                        "a lookup runs as the service's department: it reads the department's own datasets and those it holds a grant on".into(),
                    );
                    e
                })?;
            if l.label.as_deref().is_none_or(|x| x.trim().is_empty()) {
                unlabelled.push(format!(
                    "lookup {}: label = \"机动车登记 / Vehicle registration\"",
                    l.name
                ));
            }
            for f in planned.plan.schema().fields() {
                if !l.fields.contains_key(f.name()) {
                    unlabelled.push(format!(
                        "lookup {}: column {} needs a label in fields = {{ {} = \"… / …\" }}",
                        l.name,
                        f.name(),
                        f.name()
                    ));
                }
            }
        }
        if !unlabelled.is_empty() {
            return Err(Error::invalid(format!(
                "the definition of {name} leaves {} thing{} unlabelled for applicants",
                unlabelled.len(),
                if unlabelled.len() == 1 { "" } else { "s" }
            ))
            .detail(unlabelled.join("\n"))
            .hint("label each in Chinese and English, \"中文 / English\"; nothing was applied"));
        }
        self.cancel_sources(&service)?;
        // The version before this one: the live decider's, or on a cluster the stored one.
        let local = self
            .services
            .read()
            .expect("services lock")
            .get(&name)
            .map(|l| l.decider.service().clone());
        let stored = match &self.cluster {
            Some(c) => c.definitions.latest_of(&name)?,
            None => None,
        };
        let previous = match (local, &stored) {
            (Some(p), _) => Some(p),
            (None, Some(d)) => Some(Arc::new(crate::cluster::parse(d)?)),
            (None, None) => None,
        };
        if let Some(old_service) = &previous {
            for (i, l) in old_service.lines.iter().enumerate() {
                let same = service
                    .lines
                    .get(i)
                    .is_some_and(|n| n.name == l.name && n.key == l.key);
                if !same {
                    return Err(Error::invalid(format!(
                        "money line {} cannot be removed, renamed or re-keyed",
                        l.name
                    ))
                    .detail("the amounts owed are kept by the line's name and key")
                    .hint("keep the line's name and key (its limit, amount, due days and reason may change)"));
                }
            }
            let old = &old_service.quotas;
            for (i, q) in old.iter().enumerate() {
                let same = service.quotas.get(i).is_some_and(|n| {
                    n.name == q.name && n.key == q.key && n.period == q.period && n.date == q.date
                });
                if !same {
                    return Err(Error::invalid(format!(
                        "quota {} cannot be moved, renamed or re-keyed",
                        q.name
                    ))
                    .detail("the counts already spent refer to the quotas in their order")
                    .hint("keep the existing quotas as they are (limits and reasons may change) and add new ones after them"));
                }
            }
        }
        let dir = self.dir.join(&name);
        let version = match &self.cluster {
            Some(_) => stored.map_or(1, |d| d.version + 1),
            None => {
                std::fs::create_dir_all(&dir).map_err(|e| io(e, "create the service directory"))?;
                versions(&dir)?.last().map_or(1, |(v, _)| v + 1)
            }
        };
        self.gov
            .record_access(
                actor,
                "service.define",
                &format!("service:{name}"),
                Outcome::Ok,
                format!("version {version}"),
                ctx,
            )
            .await?;
        let service = Arc::new(service);
        if let Some(c) = &self.cluster {
            c.definitions.put(&yunqi_store::StoredDefinition {
                service: name.clone(),
                version,
                text: text.to_string(),
            })?;
            // The node deciding the service takes the new version up: this one at once, another
            // within a renewal; a service nobody decides yet is taken here.
            if c.holds(&name) {
                self.take_over(service.clone(), version)?;
            } else {
                let _ = self.route(&name);
            }
            return Ok(self.applied(&name, service, version));
        }
        let path = dir.join(format!("v{version:06}.toml"));
        let tmp = dir.join(format!(".v{version:06}.toml.tmp"));
        std::fs::write(&tmp, text).map_err(|e| io(e, "write a definition"))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| io(e, "sync a definition"))?;
        std::fs::rename(&tmp, &path).map_err(|e| io(e, "publish a definition"))?;
        if let Ok(live) = self.live(&name) {
            live.decider.shutdown();
        }
        self.lookups.forget(&name);
        self.start(service.clone(), version)?;
        Ok(self.applied(&name, service, version))
    }

    /// What is known of a service at `version`: its stats where it is decided here.
    fn applied(&self, name: &str, service: Arc<Service>, version: u32) -> Applied {
        let live = self
            .services
            .read()
            .expect("services lock")
            .get(name)
            .filter(|l| l.version == version)
            .cloned();
        let decided_by = self.cluster.as_ref().and_then(|c| {
            if live.is_some() {
                Some(c.node().to_string())
            } else {
                c.leases
                    .holder(name)
                    .ok()
                    .flatten()
                    .filter(|h| h.live)
                    .map(|h| h.node)
            }
        });
        Applied {
            service: name.to_string(),
            version,
            warnings: service.warnings(),
            definition: (*service).clone(),
            stats: live.map(|l| self.stats(&l)),
            decided_by,
        }
    }

    fn stats(&self, l: &Live) -> Stats {
        let today = self
            .calendar
            .local_date(self.clock.now().timestamp_micros());
        let (approved_today, pending) = l.decider.stats(today);
        Stats {
            decided: l.decider.decided(),
            approved_today,
            pending,
        }
    }

    /// The live services (anyone signed in): name, version, definition. Blocking on a
    /// cluster (reads the cluster's store).
    pub fn list(&self, actor: &Actor) -> Result<Vec<Applied>, Error> {
        let mut all = self.list_all()?;
        all.iter_mut().for_each(|a| Self::redact(actor, a));
        Ok(all)
    }

    /// One live service.
    pub fn get(&self, actor: &Actor, name: &str) -> Result<Applied, Error> {
        let l = self.live(name)?;
        let mut a = self.applied(name, l.decider.service().clone(), l.version);
        Self::redact(actor, &mut a);
        Ok(a)
    }

    /// Which node decides a service is for those who manage it (its department's stewards).
    fn redact(actor: &Actor, a: &mut Applied) {
        let manages = yunqi_governance::authorize(
            &actor.principal,
            &Action::ServiceManage {
                service: &a.service,
                department: &a.definition.department,
            },
        );
        if manages.is_err() {
            a.decided_by = None;
        }
    }

    fn list_all(&self) -> Result<Vec<Applied>, Error> {
        if let Some(c) = &self.cluster {
            return c
                .definitions
                .latest()?
                .iter()
                .map(|d| {
                    let s = crate::cluster::parse(d)?;
                    Ok(self.applied(&d.service, Arc::new(s), d.version))
                })
                .collect();
        }
        let all: Vec<(String, Arc<Live>)> = self
            .services
            .read()
            .expect("services lock")
            .iter()
            .map(|(n, l)| (n.clone(), l.clone()))
            .collect();
        Ok(all
            .into_iter()
            .map(|(name, l)| self.applied(&name, l.decider.service().clone(), l.version))
            .collect())
    }

    /// Applies for a service: the caller must be one of its applicants; inputs are checked,
    /// lookups run as the service's department, and the decision is durable when it returns.
    pub async fn apply_for(
        &self,
        actor: &Actor,
        name: &str,
        inputs: &Map<String, Json>,
        key: Option<String>,
        ctx: &CallContext,
    ) -> Result<Arc<Decision>, Error> {
        let live = self.live(name)?;
        let service = live.decider.service().clone();
        let roles = roles(&service.applicants);
        self.gov
            .authorize_action(
                actor,
                &Action::ServiceApply {
                    service: name,
                    applicants: &roles,
                },
                ctx,
            )
            .await?;
        if let (Some(allowed), Some(d)) =
            (&service.applicant_departments, &actor.principal.department)
            && !allowed.iter().any(|a| a == d.as_str())
        {
            let e = Error::denied(format!(
                "permission denied to apply for service \"{name}\" as department {d}"
            ))
            .hint(format!(
                "it takes applications from accounts of: {}",
                allowed.join(", ")
            ));
            let why = e.message.clone();
            return Err(self.deny(actor, name, e, why, ctx).await);
        }
        let today = self
            .calendar
            .local_date(self.clock.now().timestamp_micros());
        let inputs = check_inputs(&service, inputs, today)?;
        let as_service = service_actor(&service)?;
        self.refresh_calendar(&live, &service, &as_service, ctx)
            .await?;
        let applicant = applicant_fields(&actor.principal);
        // Whom the application is for, when it names them by an input: checked before
        // anything about them is looked up.
        if let Some(b) = &service.behalf
            && let Subject::Input(input) = &b.subject
        {
            let id = match inputs.get(input) {
                Some(Value::Text(id)) => Some(id.as_str()),
                _ => None,
            };
            let subject = id.map(yunqi_governance::subject_key);
            self.check_behalf(actor, &as_service, &service, b, subject, id, ctx)
                .await?;
        }
        let consent = service
            .consent
            .as_ref()
            .map(|c| match inputs.get(&c.subject) {
                Some(Value::Text(id)) => self
                    .consents
                    .read()
                    .expect("consents lock")
                    .contains_key(&(yunqi_governance::subject_key(id), name.to_string())),
                _ => false,
            });
        let mut lookups = BTreeMap::new();
        let mut sources = BTreeMap::new();
        // Without the consent it needs, nothing about the person is looked up.
        let lookups_allowed = consent != Some(false);
        for l in service.lookups.iter().filter(|_| lookups_allowed) {
            let params: Vec<Value> = l
                .params
                .iter()
                .map(|p| match p.strip_prefix("applicant.") {
                    Some(field) => applicant.get(field).cloned().unwrap_or(Value::Null),
                    None => inputs.get(p).cloned().unwrap_or(Value::Null),
                })
                .collect();
            let found = self
                .lookups
                .get(&self.gov, &self.sql, &as_service, name, l, &params, ctx)
                .await?;
            lookups.insert(l.name.clone(), found.row);
            sources.insert(l.name.clone(), found.source);
        }
        // Whom the application is for, when a lookup's row says (a vehicle's owner).
        if let Some(b) = &service.behalf
            && let Subject::Lookup(l) = &b.subject
        {
            let subject = match lookups.get(l) {
                Some(Some(_)) => sources.get(l).and_then(|s| s.subject.clone()),
                _ => None,
            };
            self.check_behalf(actor, &as_service, &service, b, subject, None, ctx)
                .await?;
        }
        live.decider
            .decide(Application {
                applicant: actor.principal.name.to_string(),
                applicant_fields: applicant,
                key: key.map(|k| format!("{}:{k}", actor.principal.name)),
                inputs,
                lookups,
                sources,
                consent,
            })
            .await
    }

    /// Refuses, as an audited denial, an application for someone the applicant may not act
    /// for under the service's `[behalf]`. `subject` is the person's subject key (`None`: the
    /// application names nobody the service knows, which is refused the same way, so that
    /// the answer says nothing of who the person is or whether they exist).
    #[allow(clippy::too_many_arguments)]
    async fn check_behalf(
        &self,
        actor: &Actor,
        as_service: &Actor,
        service: &Service,
        behalf: &Behalf,
        subject: Option<String>,
        id_number: Option<&str>,
        ctx: &CallContext,
    ) -> Result<(), Error> {
        let kind = applicant_kind(actor.principal.role);
        let mode = behalf.mode(kind);
        let own = || {
            subject.is_some()
                && actor
                    .principal
                    .id_number
                    .as_ref()
                    .map(|id| yunqi_governance::subject_key(id.as_str()))
                    == subject
        };
        let allowed = match mode {
            BehalfMode::Anyone | BehalfMode::Consented => true,
            BehalfMode::Own => own(),
            BehalfMode::Agents => {
                own()
                    || self
                        .is_agent(actor, as_service, service, behalf, id_number, ctx)
                        .await?
            }
            BehalfMode::Nobody => false,
        };
        if allowed {
            return Ok(());
        }
        let name = service.full_name();
        let what = match &behalf.subject {
            Subject::Input(i) | Subject::Lookup(i) => i.as_str(),
        };
        let mut detail = behalf.reason.clone();
        if let Some(en) = &behalf.reason_en {
            detail.push_str(" / ");
            detail.push_str(en);
        }
        let hint = match mode {
            BehalfMode::Own => format!(
                "apply for your own {what}: a {} applies for themself",
                kind.as_str()
            ),
            BehalfMode::Agents => format!(
                "apply for your own {what}, or for a person who has registered you as their agent in {}",
                behalf.agents.as_deref().unwrap_or("the agents dataset")
            ),
            _ => format!("a {} may not apply for this service", kind.as_str()),
        };
        let e = Error::denied(format!(
            "permission denied to apply for service \"{name}\" on behalf of another person"
        ))
        .detail(detail)
        .hint(hint);
        let why = format!(
            "{what} is not the applicant's ({mode:?} applies to a {})",
            kind.as_str()
        );
        Err(self.deny(actor, &name, e, why, ctx).await)
    }

    /// Records a refused application as an audited `service.apply` denial and gives back the
    /// error to answer with (or the audit's own error, if the record could not be written).
    async fn deny(
        &self,
        actor: &Actor,
        service: &str,
        e: Error,
        detail: String,
        ctx: &CallContext,
    ) -> Error {
        match self
            .gov
            .record_access(
                actor,
                "service.apply",
                &format!("service:{service}"),
                Outcome::Denied,
                detail,
                ctx,
            )
            .await
        {
            Ok(()) => e,
            Err(audit) => audit,
        }
    }

    /// Whether the applicant (a citizen) is registered in the service's agents dataset as an
    /// agent of the person with this ID number, today.
    async fn is_agent(
        &self,
        actor: &Actor,
        as_service: &Actor,
        service: &Service,
        behalf: &Behalf,
        id_number: Option<&str>,
        ctx: &CallContext,
    ) -> Result<bool, Error> {
        let (Some(agents), Some(id), Some(me)) =
            (&behalf.agents, id_number, &actor.principal.id_number)
        else {
            return Ok(false);
        };
        let (ds, table) = agents.split_once('.').unwrap_or((agents, ""));
        let sql = format!(
            "SELECT subject_id FROM \"{ds}\".\"{table}\" WHERE agent_id = :applicant.id_number AND subject_id = :subject AND (until IS NULL OR until >= current_date)"
        );
        let lookup = Lookup {
            name: "behalf_agents".into(),
            positional: sql
                .replace(":applicant.id_number", "$1")
                .replace(":subject", "$2"),
            sql,
            params: vec!["applicant.id_number".into(), "subject".into()],
            label: None,
            fields: Default::default(),
        };
        let found = self
            .lookups
            .get(
                &self.gov,
                &self.sql,
                as_service,
                &service.full_name(),
                &lookup,
                &[
                    Value::Text(me.as_str().to_string()),
                    Value::Text(id.to_string()),
                ],
                ctx,
            )
            .await?;
        Ok(found.row.is_some())
    }

    /// The decision as its applicant reads it, in `lang` (see [`crate::explain`]): the live
    /// definition's labels, and each looked-up column's class from its dataset.
    pub fn readable(&self, d: &Decision, lang: crate::explain::Lang) -> Json {
        let Ok(live) = self.live(&d.service) else {
            return Json::Null;
        };
        let service = live.decider.service().clone();
        let store = self.gov.dataset_store().clone();
        let class_of = |lookup: &str, column: &str| -> Option<String> {
            let datasets = d
                .data
                .get(lookup)?
                .get("source")?
                .get("datasets")?
                .as_array()?;
            datasets.iter().filter_map(Json::as_str).find_map(|t| {
                let (dept, name) = t.split_once('.')?;
                let m = store.get(dept, name).ok()?;
                m.columns
                    .iter()
                    .find(|c| c.name == column)
                    .map(|c| c.class.as_str().to_string())
            })
        };
        crate::explain::readable(&service, d, lang, &class_of)
    }

    fn load_consents(&self) -> Result<(), Error> {
        self.catch_up_consents()
    }

    /// Reads the consent log from where this server last read it (on a cluster, other nodes
    /// append to it too) and applies it in log order; the only way consents change in memory.
    /// Readers of consents wait only for the applying, not for the log's reads.
    pub(crate) fn catch_up_consents(&self) -> Result<(), Error> {
        let mut read = self.consents_read.lock().expect("consents read lock");
        let mut from = (*read).max(self.log.start_offset(CONSENTS));
        let mut lines: Vec<ConsentLine> = Vec::new();
        loop {
            let entries = self.log.read(CONSENTS, from, 8 << 20)?;
            if entries.is_empty() {
                break;
            }
            for e in entries {
                let skip = from.saturating_sub(e.first) as usize;
                for line in e
                    .payload
                    .split(|b| *b == b'\n')
                    .filter(|l| !l.is_empty())
                    .skip(skip)
                {
                    lines.push(serde_json::from_slice(line).map_err(|err| {
                        Error::internal(format!("consent log at {}: {err}", e.first))
                    })?);
                }
                from = e.end();
            }
        }
        let mut map = self.consents.write().expect("consents lock");
        for c in lines {
            if c.given {
                map.insert((c.subject, c.service), c.at);
            } else {
                map.remove(&(c.subject, c.service));
            }
        }
        *read = from;
        Ok(())
    }

    /// Gives (or withdraws) the caller's consent to a service that asks for it: a citizen
    /// allows, e.g., hospitals to charge visits to their credit line. Durable and audited.
    pub async fn set_consent(
        &self,
        actor: &Actor,
        name: &str,
        given: bool,
        ctx: &CallContext,
    ) -> Result<(), Error> {
        let id = match (&actor.principal.role, &actor.principal.id_number) {
            (Role::Citizen, Some(id)) => id.clone(),
            _ => {
                return Err(Error::denied("only citizens give or withdraw consent")
                    .hint("sign in with a citizen's token; consent is given by the person it concerns"));
            }
        };
        let live = self.live(name)?;
        if live.decider.service().consent.is_none() {
            return Err(Error::invalid(format!(
                "service {name} asks for no consent"
            )));
        }
        let line = ConsentLine {
            subject: yunqi_governance::subject_key(id.as_str()),
            service: name.to_string(),
            given,
            at: self.clock.now(),
        };
        let _one = self.consent_writer.lock().await;
        self.gov
            .record_access(
                actor,
                if given {
                    "consent.give"
                } else {
                    "consent.withdraw"
                },
                &format!("service:{name}"),
                Outcome::Ok,
                String::new(),
                ctx,
            )
            .await?;
        let mut bytes =
            serde_json::to_vec(&line).map_err(|e| Error::internal(format!("encode: {e}")))?;
        bytes.push(b'\n');
        self.log.append(CONSENTS, 1, bytes).await?;
        // Applied by reading the log up to it, so that consents change in log order.
        self.catch_up_consents()
    }

    /// The consents the caller (a citizen) has given.
    pub fn my_consents(&self, actor: &Actor) -> Result<Vec<ConsentGiven>, Error> {
        let Some(id) = &actor.principal.id_number else {
            return Err(
                Error::denied("only citizens have consents").hint("sign in with a citizen's token")
            );
        };
        let key = yunqi_governance::subject_key(id.as_str());
        if self.cluster.is_some() {
            self.catch_up_consents()?;
        }
        let mine: Vec<(String, chrono::DateTime<chrono::Utc>)> = self
            .consents
            .read()
            .expect("consents lock")
            .iter()
            .filter(|((s, _), _)| *s == key)
            .map(|((_, service), at)| (service.clone(), *at))
            .collect();
        let mut out: Vec<ConsentGiven> = mine
            .into_iter()
            .map(|(service, at)| ConsentGiven {
                title: self.title_of(&service),
                service,
                given_at: at,
            })
            .collect();
        out.sort_by(|a, b| a.service.cmp(&b.service));
        Ok(out)
    }

    /// A service's title, from its live decider or (on a cluster) its stored definition.
    fn title_of(&self, service: &str) -> String {
        if let Some(l) = self.services.read().expect("services lock").get(service) {
            return l.decider.service().title.clone();
        }
        self.cluster
            .as_ref()
            .and_then(|c| c.definition(service).ok().flatten())
            .map(|(d, _)| d.title)
            .unwrap_or_default()
    }

    /// The service a decision id (`department.service/N`) names.
    pub fn decision_service(id: &str) -> Option<&str> {
        Self::service_of(id).ok()
    }

    /// The service a document names, if its signature is this city's.
    pub fn document_service(&self, token: &str) -> Option<String> {
        self.signer.verify(token).ok().map(|c| c.service)
    }

    fn service_of(id: &str) -> Result<&str, Error> {
        id.split_once('/').map(|(s, _)| s).ok_or_else(|| {
            Error::invalid(format!("\"{id}\" is not an application id"))
                .hint("an application id looks like traffic.urgent-entry-permit/42")
        })
    }

    /// Whether the caller is the person a decision is about (the consent's subject).
    fn is_subject(actor: &Actor, service: &Service, d: &Decision) -> bool {
        let (Some(c), Some(id)) = (&service.consent, &actor.principal.id_number) else {
            return false;
        };
        d.inputs.get(&c.subject).and_then(|v| v.as_str()) == Some(id.as_str())
    }

    /// One application: its applicant, the person it is about, or the service department's
    /// officers and stewards (audited) read it.
    pub async fn application(
        &self,
        actor: &Actor,
        id: &str,
        ctx: &CallContext,
    ) -> Result<Arc<Decision>, Error> {
        let name = Self::service_of(id)?;
        let live = self.live(name)?;
        let service = live.decider.service().clone();
        let d = live.decider.decision(id);
        if let Some(d) = &d
            && (d.applicant == actor.principal.name.as_str()
                || Self::is_subject(actor, &service, d))
        {
            return Ok(d.clone());
        }
        self.gov
            .authorize_action(
                actor,
                &Action::ServiceReview {
                    service: name,
                    department: &service.department,
                },
                ctx,
            )
            .await?;
        let d = d.ok_or_else(|| Error::not_found("application", id))?;
        let subjects = subjects_of(&service, &d);
        self.gov
            .record_access(
                actor,
                "service.read",
                &format!("service:{name}"),
                Outcome::Ok,
                if subjects.is_empty() {
                    id.to_string()
                } else {
                    format!("{id}; subjects {}", subjects.join(" "))
                },
                ctx,
            )
            .await?;
        Ok(d)
    }

    /// The applications of a service waiting for review, the earliest deadline first
    /// (officers and stewards of its department; audited).
    pub async fn review_queue(
        &self,
        actor: &Actor,
        name: &str,
        ctx: &CallContext,
    ) -> Result<Vec<Arc<Decision>>, Error> {
        let live = self.live(name)?;
        let department = live.decider.service().department.clone();
        self.gov
            .authorize_action(
                actor,
                &Action::ServiceReview {
                    service: name,
                    department: &department,
                },
                ctx,
            )
            .await?;
        let q = live.decider.queue();
        let mut subjects: Vec<String> = Vec::new();
        for d in &q {
            for k in subjects_of(live.decider.service(), d) {
                if !subjects.contains(&k) {
                    subjects.push(k);
                }
            }
        }
        self.gov
            .record_access(
                actor,
                "service.queue",
                &format!("service:{name}"),
                Outcome::Ok,
                if subjects.is_empty() {
                    format!("{} pending", q.len())
                } else {
                    format!("{} pending; subjects {}", q.len(), subjects.join(" "))
                },
                ctx,
            )
            .await?;
        Ok(q)
    }

    /// Acts on an application: assign, approve or refuse it (officers and stewards of the
    /// service's department; an application assigned to an officer is theirs to decide, or a
    /// steward's), or repay the money it drew (its applicant, the person it is about, or an
    /// officer). Durable and audited when it returns.
    #[allow(clippy::too_many_arguments)]
    pub async fn act(
        &self,
        actor: &Actor,
        id: &str,
        act: ActKind,
        reason: Option<String>,
        assignee: Option<String>,
        yuan: Option<f64>,
        key: Option<String>,
        ctx: &CallContext,
    ) -> Result<Arc<Decision>, Error> {
        let name = Self::service_of(id)?;
        let live = self.live(name)?;
        let service = live.decider.service().clone();
        let review = Action::ServiceReview {
            service: name,
            department: &service.department,
        };
        // A repayment is recorded by whoever is paid — the applicant (the hospital) — or an
        // officer; never by the person who owes it.
        let mine = live
            .decider
            .decision(id)
            .is_some_and(|d| d.applicant == actor.principal.name.as_str());
        if !(act == ActKind::Repay && mine) {
            self.gov.authorize_action(actor, &review, ctx).await?;
        }
        if let Some(a) = &assignee {
            let ok = self.gov.principal_named(a).is_some_and(|p| {
                matches!(p.role, Role::Officer | Role::Steward)
                    && p.department.as_ref().map(|d| d.as_str())
                        == Some(service.department.as_str())
            });
            if !ok {
                return Err(Error::invalid(format!(
                    "{a} is not an officer or steward of department {}",
                    service.department
                ))
                .hint("assign it to an officer of the service's department"));
            }
        }
        let fen = match yuan {
            None => None,
            Some(y)
                if y.is_finite() && y > 0.0 && ((y * 100.0).round() / 100.0 - y).abs() < 1e-9 =>
            {
                Some((y * 100.0).round() as i64)
            }
            Some(y) => {
                return Err(Error::invalid(format!("{y} is not an amount in yuan"))
                    .hint("send a positive amount with at most two decimals, e.g. 120.50"));
            }
        };
        let req = ActRequest {
            act,
            id: id.to_string(),
            by: actor.principal.name.to_string(),
            overrides: actor.principal.role == Role::Steward,
            reason,
            assignee,
            fen,
            key: key.map(|k| format!("{}:{k}", actor.principal.name)),
        };
        let d = live.decider.act(req).await;
        if let Err(e) = &d {
            self.gov
                .record_access(
                    actor,
                    if act == ActKind::Repay {
                        "service.repay"
                    } else {
                        "service.review"
                    },
                    &format!("service:{name}"),
                    Outcome::Failed,
                    format!("{id} {}: {}", act.as_str(), e.message),
                    ctx,
                )
                .await?;
        }
        d
    }

    /// Drawn and not repaid on a money line account (`line:key`) of a service, fen.
    pub fn outstanding(&self, name: &str, account: &str) -> Result<i64, Error> {
        Ok(self.live(name)?.decider.outstanding(account))
    }

    /// Reads the service's holiday dataset (as the service's department) when it has a version
    /// the decider has not seen: `day` (a date) and `kind` (`holiday`, or `workday` for a
    /// weekend day worked).
    async fn refresh_calendar(
        &self,
        live: &Live,
        service: &Service,
        as_service: &Actor,
        ctx: &CallContext,
    ) -> Result<(), Error> {
        let Some(ds) = &service.calendar else {
            return Ok(());
        };
        let (d, n) = ds
            .split_once('.')
            .ok_or_else(|| Error::invalid(format!("calendar {ds} is not department.dataset")))?;
        let (d, n) = (Name::parse("department", d)?, Name::parse("dataset", n)?);
        // Checked on every application: the store's position, not a copy of its manifest.
        let version = self
            .gov
            .dataset_store()
            .latest(&format!("{d}.{n}"))
            .and_then(|l| l.version.map(|(v, _)| v));
        let mut seen = live.calendar_version.lock().await;
        if version.is_some() && *seen == version {
            return Ok(());
        }
        let unreadable = |e: Error| {
            Error::unavailable(format!(
                "the holiday calendar {ds} of {} cannot be read: {}",
                service.full_name(),
                e.message
            ))
            .hint(format!(
                "department {} needs the dataset {ds} (columns day, kind) or a grant on it",
                service.department
            ))
        };
        let planned = self
            .sql
            .plan(as_service, &format!("SELECT day, kind FROM {d}.{n}"), ctx)
            .await
            .map_err(unreadable)?;
        let r = self
            .sql
            .execute(as_service, &planned, Vec::new(), None, ctx)
            .await
            .map_err(unreadable)?;
        let mut cal = Calendar::china();
        for b in &r.batches {
            for i in 0..b.num_rows() {
                let day = match cell(b.column(0).as_ref(), i) {
                    Value::Date(x) => Some(x),
                    Value::Text(t) => t.parse().ok(),
                    _ => None,
                };
                let Some(day) = day else { continue };
                match cell(b.column(1).as_ref(), i) {
                    Value::Text(k) if k == "workday" => cal.workdays.insert(day),
                    _ => cal.holidays.insert(day),
                };
            }
        }
        live.decider.set_calendar(cal);
        *seen = version;
        Ok(())
    }

    /// The caller's own applications to a service, newest first.
    pub fn my_applications(&self, actor: &Actor, name: &str) -> Result<Vec<Arc<Decision>>, Error> {
        let live = self.live(name)?;
        Ok(live.decider.applications_of(actor.principal.name.as_str()))
    }

    /// Revokes the document of decision `id` (officers and stewards of the service's
    /// department), durably; online verification then says so. Audited.
    pub async fn revoke(
        &self,
        actor: &Actor,
        id: &str,
        reason: &str,
        ctx: &CallContext,
    ) -> Result<crate::decider::Revocation, Error> {
        let service = Self::service_of(id)?;
        let live = self.live(service)?;
        let department = live.decider.service().department.clone();
        self.gov
            .authorize_action(
                actor,
                &Action::DocumentRevoke {
                    service,
                    department: &department,
                },
                ctx,
            )
            .await?;
        if reason.trim().is_empty() {
            return Err(Error::invalid("a reason is required")
                .hint("say why, e.g. a violation during the window"));
        }
        let r = crate::decider::Revocation {
            revoke: id.to_string(),
            reason: reason.trim().to_string(),
            by: actor.principal.name.to_string(),
            at: self.clock.now(),
        };
        self.gov
            .record_access(
                actor,
                "document.revoke",
                &format!("service:{service}"),
                Outcome::Ok,
                format!("{id}: {}", r.reason),
                ctx,
            )
            .await?;
        live.decider.revoke(r.clone()).await?;
        Ok(r)
    }

    /// The documents' public key (base64url) and its id.
    pub fn public_key(&self) -> (String, String) {
        (self.signer.public_key(), self.signer.kid().to_string())
    }

    /// Verifies a document online: its signature, and its validity now.
    pub fn verify(&self, token: &str) -> Verification {
        match self.signer.verify(token) {
            Err(e) => Verification {
                valid: false,
                status: "invalid",
                reason: Some(e.message),
                claims: None,
            },
            Ok(c) => {
                let now = self.clock.now();
                let revoked = self
                    .live(&c.service)
                    .ok()
                    .and_then(|l| l.decider.revocation(&c.id));
                let (status, reason) = if let Some(r) = revoked {
                    (
                        "revoked",
                        Some(format!("revoked at {}: {}", r.at, r.reason)),
                    )
                } else if c.valid_from.is_some_and(|f| now < f) {
                    (
                        "not_yet_valid",
                        Some("its validity has not begun".to_string()),
                    )
                } else if c.valid_to.is_some_and(|t| now >= t) {
                    ("expired", Some("its validity has ended".to_string()))
                } else {
                    ("valid", None)
                };
                Verification {
                    valid: status == "valid",
                    status,
                    reason,
                    claims: Some(c),
                }
            }
        }
    }

    /// Stops every decider after the applications it holds (and, on a cluster, gives their
    /// leases up, so that other nodes take the services over at once).
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        let all: Vec<Arc<Live>> = self
            .services
            .read()
            .expect("services lock")
            .values()
            .cloned()
            .collect();
        for l in all {
            l.decider.shutdown();
        }
        self.release_all();
    }
}
