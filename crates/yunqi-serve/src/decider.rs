//! The decider: one writer per service that decides applications in order, so that quotas are
//! spent atomically, and makes each round of decisions durable before anyone hears of them.
//!
//! An application is checked (inputs) and looked up (lookups) by its caller, concurrently; the
//! decider thread then takes every application waiting, and for each in turn: answers a
//! retried idempotency key with the decision it already has; evaluates the rules against the
//! inputs, lookups and quota state (this round's earlier decisions included); spends the quotas
//! all or nothing. The round's decisions are audited ([`Recorder`]), appended to the service's
//! decision log as one entry (JSON lines, with their ledger changes), and only then published
//! to the ledger and answered. Start-up replays the log: the ledger, the decisions by key and
//! the decision numbers come back exactly.
//!
//! A pending decision (a rule sends it to review, or the service decides by review) holds its
//! quota units like a granted one: an officer's later refusal will give them back with a
//! logged change of its own (review is not built yet).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Map, Value as Json};
use yunqi_stream::StreamLog;
use yunqi_types::{Clock, Error};

use crate::calendar::Calendar;
use crate::definition::{InputType, Otherwise, Outcome, Service};
use crate::ledger::{Change, Ledger, SpendKey};
use crate::rules::{Env, Value};

/// A boxed future (for the object-safe [`Recorder`]).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Applications decided in one round at most.
const ROUND_MAX: usize = 4096;

/// A looked-up row: column → value.
pub type Row = BTreeMap<String, Value>;

/// Makes a round's decisions and acts part of the audit chain, durably, before they are
/// logged.
pub trait Recorder: Send + Sync + 'static {
    /// Records the decisions and the acts on earlier ones (review, repayment, deadline missed).
    fn record<'a>(
        &'a self,
        decisions: &'a [&'a Decision],
        acts: &'a [&'a Act],
    ) -> BoxFuture<'a, Result<(), Error>>;

    /// Records documents revoked by events (officers' revocations are audited by the caller).
    fn record_revocations<'a>(
        &'a self,
        revocations: &'a [Revocation],
    ) -> BoxFuture<'a, Result<(), Error>> {
        let _ = revocations;
        Box::pin(async { Ok(()) })
    }
}

/// Records each decision in the audit chain: who applied, the service, the decision and its
/// reasons.
pub struct AuditRecorder(pub yunqi_audit::SharedAuditLog);

impl Recorder for AuditRecorder {
    fn record<'a>(
        &'a self,
        decisions: &'a [&'a Decision],
        acts: &'a [&'a Act],
    ) -> BoxFuture<'a, Result<(), Error>> {
        let service = |id: &str| id.split_once('/').map_or(id, |(s, _)| s).to_string();
        let acted = acts.iter().map(|a| yunqi_types::AuditEvent {
            principal: a.by.clone(),
            department: String::new(),
            action: match a.act {
                ActKind::Breach => "service.sla_breach",
                ActKind::Repay => "service.repay",
                _ => "service.review",
            }
            .into(),
            object: format!("service:{}", service(&a.id)),
            outcome: Some(yunqi_types::Outcome::Ok),
            purpose: String::new(),
            detail: format!(
                "{} {}{}{}",
                a.id,
                a.act.as_str(),
                a.assignee
                    .as_ref()
                    .map(|x| format!(" to {x}"))
                    .unwrap_or_default(),
                a.reason
                    .as_ref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ),
            request_id: String::new(),
        });
        let events = decisions
            .iter()
            .map(|d| {
                // Every data item used: its datasets and grants (purposes), and the subjects
                // of the rows, so that "who accessed my data" finds the decision.
                let mut data = Vec::new();
                let mut purposes: Vec<&str> = Vec::new();
                for (name, v) in &d.data {
                    let src = &v["source"];
                    if let Some(ds) = src["datasets"].as_array() {
                        let ds: Vec<&str> = ds.iter().filter_map(|x| x.as_str()).collect();
                        data.push(format!("{name}<-{}", ds.join("+")));
                    }
                    for g in src["grants"].as_array().into_iter().flatten() {
                        if let Some(g) = g.as_str()
                            && !purposes.contains(&g)
                        {
                            purposes.push(g);
                        }
                    }
                }
                let mut detail = format!("{} {:?}", d.id, d.decision);
                if !d.subjects.is_empty() {
                    detail.push_str(&format!("; subjects {}", d.subjects.join(" ")));
                }
                if !data.is_empty() {
                    detail.push_str(&format!("; data {}", data.join(",")));
                }
                if !d.reasons.is_empty() {
                    detail.push_str(&format!(": {}", d.reasons.join("; ")));
                }
                yunqi_types::AuditEvent {
                    principal: d.applicant.clone(),
                    department: String::new(),
                    action: "service.decide".into(),
                    object: format!("service:{}", d.service),
                    outcome: Some(yunqi_types::Outcome::Ok),
                    purpose: purposes.join("; "),
                    detail,
                    request_id: String::new(),
                }
            })
            .chain(acted)
            .collect();
        Box::pin(async move { self.0.append(events).await.map(|_| ()) })
    }

    fn record_revocations<'a>(
        &'a self,
        revocations: &'a [Revocation],
    ) -> BoxFuture<'a, Result<(), Error>> {
        let events = revocations
            .iter()
            .map(|r| yunqi_types::AuditEvent {
                principal: r.by.clone(),
                department: String::new(),
                action: "document.revoke".into(),
                object: format!(
                    "service:{}",
                    r.revoke
                        .split_once('/')
                        .map_or(r.revoke.as_str(), |(s, _)| s)
                ),
                outcome: Some(yunqi_types::Outcome::Ok),
                purpose: String::new(),
                detail: format!("{}: {}", r.revoke, r.reason),
                request_id: String::new(),
            })
            .collect();
        Box::pin(async move { self.0.append(events).await.map(|_| ()) })
    }
}

/// A stream whose events cancel documents, with its event-time column.
#[derive(Debug, Clone)]
pub struct CancelSource {
    /// What cancels what.
    pub cancel: crate::definition::Cancel,
    /// The stream's event-time column.
    pub event_time: String,
}

/// The consumer name under which a decider keeps its place in a cancelling stream.
fn cancel_consumer(service: &Service) -> String {
    format!("serve-{}-{}", service.department, service.name)
}

/// An application, checked and looked up.
#[derive(Debug, Clone)]
pub struct Application {
    /// Who applies (principal name).
    pub applicant: String,
    /// The applicant's fields rules read as `applicant.<field>` (see
    /// [`crate::definition::APPLICANT_FIELDS`]), from the authenticated principal.
    pub applicant_fields: BTreeMap<String, Value>,
    /// The idempotency key, if the caller sent one.
    pub key: Option<String>,
    /// The inputs, typed.
    pub inputs: BTreeMap<String, Value>,
    /// Each lookup's row (`None`: not found).
    pub lookups: BTreeMap<String, Option<Row>>,
    /// Where each lookup's row came from (datasets, grants, the row's subject).
    pub sources: BTreeMap<String, crate::lookup::Source>,
    /// Whether the person the service's consent names has consented (`None`: the service
    /// needs no consent).
    pub consent: Option<bool>,
}

/// The decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Granted.
    Approved,
    /// Refused, with reasons.
    Refused,
    /// Waiting for an officer.
    Pending,
}

/// How one rule came out.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RuleOutcome {
    /// The rule.
    pub rule: String,
    /// Its condition.
    pub require: String,
    /// Met, not met, or unknown (a value was missing).
    pub met: Option<bool>,
    /// Its reason, when not met.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// How one quota stood.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QuotaOutcome {
    /// The quota.
    pub quota: String,
    /// What it counts by.
    pub key: String,
    /// The period (`2026-11`).
    pub period: String,
    /// Used, this decision included.
    pub used: u32,
    /// The limit.
    pub limit: u32,
}

/// A decision, as the log keeps it and the applicant reads it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Decision {
    /// `department.service/number`.
    pub id: String,
    /// The service.
    pub service: String,
    /// Who applied.
    pub applicant: String,
    /// The idempotency key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// When.
    pub decided_at: DateTime<Utc>,
    /// The decision.
    pub decision: Verdict,
    /// Why (the reasons of the rules and quotas that were not met).
    pub reasons: Vec<String>,
    /// The inputs.
    pub inputs: Map<String, Json>,
    /// Every rule evaluated.
    pub rules: Vec<RuleOutcome>,
    /// Every lookup: found or not, and the values used.
    pub data: Map<String, Json>,
    /// The quotas.
    pub quotas: Vec<QuotaOutcome>,
    /// What the decision changed in the ledger.
    pub changes: Vec<Change>,
    /// The document a granted application got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<Issued>,
    /// When an officer must have decided by (applications sent to review).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_at: Option<DateTime<Utc>>,
    /// The review, once it has begun (assigned, decided or overdue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review: Option<Review>,
    /// The money the application drew on its line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draw: Option<Draw>,
    /// The subject keys of the rows looked up (whose data the decision used).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subjects: Vec<String>,
}

impl Decision {
    /// The quota buckets it holds (spent and not given back).
    fn held(&self) -> Vec<SpendKey> {
        self.changes
            .iter()
            .filter_map(|c| match c {
                Change::Spend { at } => Some(at.clone()),
                _ => None,
            })
            .collect()
    }
}

/// The review of an application an officer decides.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Review {
    /// The officer it is assigned to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignee: Option<String>,
    /// Who decided it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// When.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<DateTime<Utc>>,
    /// The officer's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When its deadline passed undecided (the SLA breach).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breached_at: Option<DateTime<Utc>>,
}

/// Money drawn on a line by one application.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Draw {
    /// The line.
    pub line: String,
    /// The account (`line:key`).
    pub account: String,
    /// Drawn, fen.
    pub fen: i64,
    /// Repaid so far, fen.
    pub repaid_fen: i64,
    /// To be repaid by.
    pub due_at: DateTime<Utc>,
}

impl Draw {
    /// Still owed, fen.
    pub fn owed(&self) -> i64 {
        self.fen - self.repaid_fen
    }
}

/// What can be done to a decision after it is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActKind {
    /// Assign a pending application to an officer.
    Assign,
    /// Approve a pending application (its document is issued).
    Approve,
    /// Refuse a pending application (its quota units and money are given back).
    Refuse,
    /// The review deadline passed undecided.
    Breach,
    /// Repay money an application drew.
    Repay,
}

impl ActKind {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            ActKind::Assign => "assign",
            ActKind::Approve => "approve",
            ActKind::Refuse => "refuse",
            ActKind::Breach => "breach",
            ActKind::Repay => "repay",
        }
    }
}

/// An act on a decision, as the decision log keeps it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Act {
    /// What.
    pub act: ActKind,
    /// The decision.
    pub id: String,
    /// Who (`system` for a missed deadline).
    pub by: String,
    /// When.
    pub at: DateTime<Utc>,
    /// Why (approve, refuse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// To whom (assign).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignee: Option<String>,
    /// How much (repay), fen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fen: Option<i64>,
    /// What it changed in the ledger.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<Change>,
    /// The document an approval issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<Issued>,
    /// The idempotency key it was asked with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl Act {
    /// The decision after this act.
    pub fn apply(&self, d: &Decision) -> Decision {
        let mut d = d.clone();
        if self.act == ActKind::Repay {
            if let Some(draw) = &mut d.draw {
                draw.repaid_fen += self.fen.unwrap_or(0);
            }
            return d;
        }
        let review = d.review.get_or_insert_with(Review::default);
        match self.act {
            ActKind::Assign => review.assignee = self.assignee.clone(),
            ActKind::Breach => review.breached_at = Some(self.at),
            ActKind::Approve | ActKind::Refuse => {
                review.decided_by = Some(self.by.clone());
                review.decided_at = Some(self.at);
                review.reason = self.reason.clone();
                if self.act == ActKind::Approve {
                    d.decision = Verdict::Approved;
                    d.document = self.document.clone();
                } else {
                    d.decision = Verdict::Refused;
                    d.reasons.extend(self.reason.clone());
                }
                if let Some(draw) = &mut d.draw {
                    for c in &self.changes {
                        if let Change::Draw { fen, .. } = c {
                            draw.repaid_fen -= fen;
                        }
                    }
                }
            }
            ActKind::Repay => {}
        }
        d
    }
}

/// An act asked for, checked by the caller for who may do it.
#[derive(Debug, Clone)]
pub struct ActRequest {
    /// What.
    pub act: ActKind,
    /// The decision.
    pub id: String,
    /// Who.
    pub by: String,
    /// Whether they may act on an application assigned to someone else (stewards).
    pub overrides: bool,
    /// Why (required to refuse).
    pub reason: Option<String>,
    /// To whom (assign).
    pub assignee: Option<String>,
    /// How much (repay; default: all that is owed), fen.
    pub fen: Option<i64>,
    /// The idempotency key: a retried act with the same key is not done again.
    pub key: Option<String>,
}

/// A document as issued.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Issued {
    /// The signed token (see [`crate::document`]).
    pub token: String,
    /// Valid from, if limited.
    pub valid_from: Option<DateTime<Utc>>,
    /// Valid until (exclusive), if limited.
    pub valid_to: Option<DateTime<Utc>>,
    /// The code it registers (a credit code), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// Converts a value for JSON.
pub fn to_json(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::from(*i),
        Value::Num(x) => Json::from(*x),
        Value::Text(s) => Json::String(s.clone()),
        Value::Date(d) => Json::String(d.to_string()),
        Value::List(l) => Json::Array(l.iter().map(to_json).collect()),
    }
}

/// Checks one input against its type; `today` for date ranges.
pub fn check_input(
    kind: &InputType,
    name: &str,
    raw: &Json,
    today: NaiveDate,
) -> Result<Value, String> {
    let text = || {
        raw.as_str()
            .map(str::trim)
            .ok_or_else(|| format!("{name}: expected text, got {raw}"))
    };
    match kind {
        InputType::Plate => {
            let s = text()?.to_uppercase();
            // Province characters are not touched by to_uppercase.
            if yunqi_types::classify::is_plate(&s) {
                Ok(Value::Text(s))
            } else {
                Err(format!(
                    "{name}: \"{}\" is not a vehicle plate (e.g. 沪B12345)",
                    text()?
                ))
            }
        }
        InputType::IdNumber => yunqi_types::NationalId::parse(text()?)
            .map(|id| Value::Text(id.as_str().to_string()))
            .map_err(|e| format!("{name}: {}", e.message)),
        InputType::Date { min_days, max_days } => {
            let d: NaiveDate = text()?.parse().map_err(|_| {
                format!(
                    "{name}: \"{}\" is not a date (YYYY-MM-DD)",
                    text().unwrap_or("")
                )
            })?;
            let days = (d - today).num_days();
            if let Some(lo) = min_days
                && days < *lo
            {
                return Err(format!(
                    "{name}: {d} is before {}",
                    today + chrono::Duration::days(*lo)
                ));
            }
            if let Some(hi) = max_days
                && days > *hi
            {
                return Err(format!(
                    "{name}: {d} is after {} ({hi} days from today)",
                    today + chrono::Duration::days(*hi)
                ));
            }
            Ok(Value::Date(d))
        }
        InputType::Enum { values, .. } => {
            let s = text()?;
            if values.iter().any(|v| v == s) {
                Ok(Value::Text(s.to_string()))
            } else {
                Err(format!(
                    "{name}: \"{s}\" is not one of {}",
                    values.join(", ")
                ))
            }
        }
        InputType::Money { max_yuan } => {
            let yuan = raw
                .as_f64()
                .or_else(|| raw.as_str().and_then(|s| s.trim().parse().ok()))
                .ok_or_else(|| format!("{name}: expected an amount in yuan, got {raw}"))?;
            let fen = (yuan * 100.0).round();
            if !(0.0..=9e15).contains(&fen) || (fen / 100.0 - yuan).abs() > 1e-9 {
                return Err(format!(
                    "{name}: {yuan} is not an amount in yuan with at most 2 decimals"
                ));
            }
            if let Some(m) = max_yuan
                && yuan > *m
            {
                return Err(format!("{name}: {yuan} is above the most, {m} yuan"));
            }
            Ok(Value::Num(fen / 100.0))
        }
        InputType::Text { max_chars } => {
            let s = text()?;
            if s.chars().count() > *max_chars {
                return Err(format!("{name}: longer than {max_chars} characters"));
            }
            Ok(Value::Text(s.to_string()))
        }
    }
}

/// Checks an application's inputs: every required one present and valid, no unknown ones.
pub fn check_inputs(
    service: &Service,
    inputs: &Map<String, Json>,
    today: NaiveDate,
) -> Result<BTreeMap<String, Value>, Error> {
    let mut problems = Vec::new();
    let mut out = BTreeMap::new();
    for k in inputs.keys() {
        if !service.inputs.iter().any(|i| &i.name == k) {
            problems.push(format!("{k}: {} has no such input", service.full_name()));
        }
    }
    for i in &service.inputs {
        match inputs.get(&i.name) {
            None | Some(Json::Null) if i.required => problems.push(format!("{}: required", i.name)),
            None | Some(Json::Null) => {
                out.insert(i.name.clone(), Value::Null);
            }
            Some(raw) => match check_input(&i.kind, &i.name, raw, today) {
                Ok(v) => {
                    out.insert(i.name.clone(), v);
                }
                Err(e) => problems.push(e),
            },
        }
    }
    if problems.is_empty() {
        return Ok(out);
    }
    let names: Vec<&str> = service.inputs.iter().map(|i| i.name.as_str()).collect();
    Err(Error::invalid(format!(
        "the application's inputs are not valid ({} problem{})",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    ))
    .detail(problems.join("; "))
    .hint(format!(
        "send {{\"inputs\": {{...}}}} with {}",
        names.join(", ")
    )))
}

type Reply = tokio::sync::oneshot::Sender<Result<Arc<Decision>, Error>>;

enum Job {
    Apply { app: Application, reply: Reply },
    Act { req: ActRequest, reply: Reply },
}

/// How often the decider looks for review deadlines that have passed.
const DEADLINE_TICK: std::time::Duration = std::time::Duration::from_millis(500);

/// A document withdrawn (e.g. for a violation during its window). The quota it used stays
/// used: a permit counts once issued.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Revocation {
    /// The decision whose document it withdraws.
    pub revoke: String,
    /// Why.
    pub reason: String,
    /// Who.
    pub by: String,
    /// When.
    pub at: DateTime<Utc>,
}

#[derive(Default)]
struct State {
    ledger: Ledger,
    by_key: HashMap<String, Arc<Decision>>,
    by_id: HashMap<String, Arc<Decision>>,
    revoked: HashMap<String, Revocation>,
    by_applicant: HashMap<String, Vec<Arc<Decision>>>,
    /// Pending decisions, by deadline.
    pending: BTreeSet<(DateTime<Utc>, String)>,
    /// Pending decisions whose deadline has not yet been reported missed.
    watch: BTreeSet<(DateTime<Utc>, String)>,
    /// Draws not fully repaid, per account, by due date.
    open_draws: HashMap<String, BTreeSet<(DateTime<Utc>, String)>>,
    /// Acts by idempotency key → the decision they acted on.
    act_keys: HashMap<String, String>,
    /// The inputs cancelling events are matched against, and the decisions with documents by
    /// `input \0 value`.
    cancel_inputs: Vec<String>,
    with_document: HashMap<String, Vec<String>>,
    decided: u64,
    /// Approvals by the city's local date of approval (documents issued per day).
    approved_on: BTreeMap<NaiveDate, u64>,
}

/// The local date (UTC+8) of an instant.
fn local_day(t: DateTime<Utc>) -> NaiveDate {
    (t + chrono::Duration::hours(8)).date_naive()
}

impl State {
    /// Makes `d` the current state of its decision: a new one, or one after an act.
    fn put(&mut self, d: Arc<Decision>) {
        let old = self.by_id.insert(d.id.clone(), d.clone());
        if d.decision == Verdict::Approved
            && old.as_ref().is_none_or(|o| o.decision != Verdict::Approved)
        {
            let at = d
                .review
                .as_ref()
                .and_then(|r| r.decided_at)
                .unwrap_or(d.decided_at);
            *self.approved_on.entry(local_day(at)).or_default() += 1;
        }
        match &old {
            None => self.decided += 1,
            Some(o) => {
                if let Some(due) = o.due_at {
                    self.pending.remove(&(due, o.id.clone()));
                    self.watch.remove(&(due, o.id.clone()));
                }
                if let Some(dr) = &o.draw
                    && let Some(set) = self.open_draws.get_mut(&dr.account)
                {
                    set.remove(&(dr.due_at, o.id.clone()));
                    if set.is_empty() {
                        self.open_draws.remove(&dr.account);
                    }
                }
            }
        }
        if d.decision == Verdict::Pending
            && let Some(due) = d.due_at
        {
            self.pending.insert((due, d.id.clone()));
            if d.review.as_ref().is_none_or(|r| r.breached_at.is_none()) {
                self.watch.insert((due, d.id.clone()));
            }
        }
        if let Some(dr) = &d.draw
            && dr.owed() > 0
        {
            self.open_draws
                .entry(dr.account.clone())
                .or_default()
                .insert((dr.due_at, d.id.clone()));
        }
        let list = self.by_applicant.entry(d.applicant.clone()).or_default();
        match old {
            None => list.push(d.clone()),
            Some(_) => {
                if let Some(x) = list.iter_mut().rev().find(|x| x.id == d.id) {
                    *x = d.clone();
                }
            }
        }
        let issued_now = d.document.is_some() && old.as_ref().is_none_or(|o| o.document.is_none());
        if issued_now {
            for input in &self.cancel_inputs {
                if let Some(v) = d.inputs.get(input).and_then(|v| v.as_str()) {
                    self.with_document
                        .entry(format!("{input}\0{v}"))
                        .or_default()
                        .push(d.id.clone());
                }
            }
        }
        if let Some(k) = &d.key {
            self.by_key.insert(k.clone(), d);
        }
    }

    /// Whether an account has a draw past its due date.
    fn overdue(&self, account: &str, now: DateTime<Utc>) -> bool {
        self.open_draws
            .get(account)
            .and_then(|s| s.first())
            .is_some_and(|(due, _)| *due < now)
    }
}

/// The decider of one service.
pub struct Decider {
    service: Arc<Service>,
    log: LogWriter,
    broken: Arc<AtomicBool>,
    signer: Option<Arc<crate::document::Signer>>,
    calendar: Arc<RwLock<Calendar>>,
    state: Arc<RwLock<State>>,
    tx: Mutex<Option<tokio::sync::mpsc::Sender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Where a decider's entries go: its service's decision log, appended to where the decider
/// knows it ends when the log is shared by a cluster's nodes (another node's decider that took
/// the service over has appended, and this one is fenced off).
#[derive(Clone)]
struct LogWriter {
    log: Arc<dyn StreamLog>,
    stream: String,
    /// The log's end as this decider knows it, when appends are fenced.
    fence: Option<Arc<tokio::sync::Mutex<u64>>>,
}

impl LogWriter {
    async fn append(&self, count: u32, payload: Vec<u8>) -> Result<(), Error> {
        match &self.fence {
            None => self
                .log
                .append(&self.stream, count, payload)
                .await
                .map(|_| ()),
            Some(end) => {
                let mut end = end.lock().await;
                let a = self
                    .log
                    .append_expecting(&self.stream, count, payload, *end)
                    .await?;
                *end = a.end;
                Ok(())
            }
        }
    }
}

/// Whether an error says another node's decider took the service over.
pub fn is_deposed(e: &Error) -> bool {
    e.code == yunqi_types::ErrorCode::Conflict && e.detail.as_deref() == Some(yunqi_stream::DEPOSED)
}

/// The stream key of a service's decision log.
pub fn log_stream(service: &Service) -> String {
    format!("serve.{}.{}", service.department, service.name)
}

struct Env1<'a, 'r> {
    app: &'a Application,
    round: &'a mut crate::ledger::Round<'r>,
    service: &'a Service,
    calendar: &'a Calendar,
    today: NaiveDate,
    spends: &'a [(SpendKey, u32)],
    lines: Vec<LineState>,
}

impl Env for Env1<'_, '_> {
    fn get(&self, path: &[&str]) -> Option<Value> {
        match path {
            [name] => self.app.inputs.get(*name).cloned(),
            ["applicant", field] => Some(
                self.app
                    .applicant_fields
                    .get(*field)
                    .cloned()
                    .unwrap_or(Value::Null),
            ),
            ["quota", q, what] => {
                let i = self.service.quotas.iter().position(|x| x.name == *q)?;
                let (k, limit) = &self.spends[i];
                let used = self.round.used(k);
                Some(Value::Int(match *what {
                    "used" => used as i64,
                    "left" => limit.saturating_sub(used) as i64,
                    "limit" => *limit as i64,
                    _ => return None,
                }))
            }
            ["line", l, what] => {
                let i = self.service.lines.iter().position(|x| x.name == *l)?;
                let ls = self.lines.get(i)?;
                Some(match *what {
                    "limit" => ls.limit.map_or(Value::Null, yuan),
                    "outstanding" => yuan(ls.outstanding),
                    "left" => ls
                        .limit
                        .map_or(Value::Null, |lim| yuan((lim - ls.outstanding).max(0))),
                    "overdue" => Value::Bool(ls.overdue),
                    _ => return None,
                })
            }
            [lookup, column] => {
                let row = self.app.lookups.get(*lookup)?;
                if *column == "found" {
                    return Some(Value::Bool(row.is_some()));
                }
                Some(
                    row.as_ref()
                        .and_then(|r| r.get(*column).cloned())
                        .unwrap_or(Value::Null),
                )
            }
            _ => None,
        }
    }
    fn today(&self) -> NaiveDate {
        self.today
    }
    fn is_rest_day(&self, date: NaiveDate) -> bool {
        self.calendar.is_rest_day(date)
    }
}

impl Decider {
    /// Opens a service's decider: replays its decision log, then starts its thread.
    pub fn open(
        service: Arc<Service>,
        calendar: Calendar,
        log: Arc<dyn StreamLog>,
        recorder: Arc<dyn Recorder>,
        clock: Arc<dyn Clock>,
        signer: Option<Arc<crate::document::Signer>>,
        cancels: Vec<CancelSource>,
    ) -> Result<Decider, Error> {
        // Over a log other nodes share, every append expects the log to end where this decider
        // read or wrote it last: once another node's decider for the service has appended,
        // this one stops deciding (the cluster's lease gives the service to one node at a
        // time; this makes a deposed owner harmless even before it learns of it).
        let fenced = log.shared();
        let stream = log_stream(&service);
        let mut state = State {
            cancel_inputs: service.cancel_on.iter().map(|c| c.input.clone()).collect(),
            ..State::default()
        };
        let mut from = log.start_offset(&stream);
        if from > 0 {
            return Err(Error::internal(format!(
                "the decision log {stream} lost its first {from} decisions"
            ))
            .hint("decision logs are kept whole; restore the data directory from a backup"));
        }
        loop {
            let entries = log.read(&stream, from, 8 << 20)?;
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
                    if line.starts_with(b"{\"revoke\"") {
                        let r: Revocation = serde_json::from_slice(line).map_err(|err| {
                            Error::internal(format!("decision log {stream} at {}: {err}", e.first))
                        })?;
                        state.revoked.insert(r.revoke.clone(), r);
                        continue;
                    }
                    let bad = |err: serde_json::Error| {
                        Error::internal(format!("decision log {stream} at {}: {err}", e.first))
                    };
                    if line.starts_with(b"{\"act\"") {
                        let a: Act = serde_json::from_slice(line).map_err(bad)?;
                        a.changes.iter().for_each(|c| state.ledger.replay(c));
                        let d = state.by_id.get(&a.id).cloned().ok_or_else(|| {
                            Error::internal(format!(
                                "decision log {stream} at {}: {} acts on an unknown decision",
                                e.first,
                                a.act.as_str()
                            ))
                        })?;
                        if let Some(k) = &a.key {
                            state.act_keys.insert(k.clone(), a.id.clone());
                        }
                        state.put(Arc::new(a.apply(&d)));
                        continue;
                    }
                    let d: Decision = serde_json::from_slice(line).map_err(bad)?;
                    d.changes.iter().for_each(|c| state.ledger.replay(c));
                    state.put(Arc::new(d));
                }
                from = e.end();
            }
        }
        let state = Arc::new(RwLock::new(state));
        let calendar = Arc::new(RwLock::new(calendar));
        let writer = LogWriter {
            log: log.clone(),
            stream: stream.clone(),
            fence: fenced.then(|| Arc::new(tokio::sync::Mutex::new(from))),
        };
        let broken = Arc::new(AtomicBool::new(false));
        let (tx, rx) = tokio::sync::mpsc::channel(ROUND_MAX);
        let thread = {
            let (service, state, calendar, signer, log, writer, broken) = (
                service.clone(),
                state.clone(),
                calendar.clone(),
                signer.clone(),
                log.clone(),
                writer.clone(),
                broken.clone(),
            );
            std::thread::Builder::new()
                .name(format!("decide {}", service.full_name()))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_time()
                        .build()
                        .expect("decider runtime");
                    rt.block_on(run(
                        Round0 {
                            service,
                            calendar,
                            state,
                            log,
                            recorder,
                            clock,
                            signer,
                            cancels,
                            writer,
                            broken,
                        },
                        rx,
                    ));
                })
                .map_err(|e| Error::internal(format!("start the decider: {e}")))?
        };
        Ok(Decider {
            service,
            log: writer,
            broken,
            signer,
            calendar,
            state,
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The service.
    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }

    /// The document key, if this decider issues documents.
    pub fn signer(&self) -> Option<&Arc<crate::document::Signer>> {
        self.signer.as_ref()
    }

    /// Replaces the calendar (its holiday dataset changed); later rounds use it.
    pub fn set_calendar(&self, calendar: Calendar) {
        *self.calendar.write().expect("calendar lock") = calendar;
    }

    /// Decides an application; resolves once the decision is durable.
    pub async fn decide(&self, app: Application) -> Result<Arc<Decision>, Error> {
        self.ask(|reply| Job::Apply { app, reply }).await
    }

    /// Acts on a decision (review, repayment); resolves once the act is durable, with the
    /// decision as it now stands. Who may act is the caller's check; the decider checks that
    /// the act fits the decision (pending, assigned to the actor, money owed).
    pub async fn act(&self, req: ActRequest) -> Result<Arc<Decision>, Error> {
        self.ask(|reply| Job::Act { req, reply }).await
    }

    /// Hands a job to the writer and waits for its answer.
    async fn ask(&self, job: impl FnOnce(Reply) -> Job) -> Result<Arc<Decision>, Error> {
        let stopping = || {
            Error::unavailable("the server is stopping")
                .hint("retry with the same Idempotency-Key once it is back")
        };
        let tx = self
            .tx
            .lock()
            .expect("tx lock")
            .clone()
            .ok_or_else(stopping)?;
        let (reply, rx) = tokio::sync::oneshot::channel();
        tx.send(job(reply)).await.map_err(|_| stopping())?;
        rx.await.map_err(|_| stopping())?
    }

    /// The applications waiting for review, the earliest deadline first.
    pub fn queue(&self) -> Vec<Arc<Decision>> {
        let st = self.state.read().expect("state lock");
        st.pending
            .iter()
            .filter_map(|(_, id)| st.by_id.get(id).cloned())
            .collect()
    }

    /// Drawn and not repaid on an account (`line:key`), fen.
    pub fn outstanding(&self, account: &str) -> i64 {
        self.state
            .read()
            .expect("state lock")
            .ledger
            .outstanding(account)
    }

    /// Used units of quota `quota` for `key` in `bucket`.
    pub fn used(&self, quota: usize, key: &str, bucket: i32) -> u32 {
        self.state
            .read()
            .expect("state lock")
            .ledger
            .used(&SpendKey {
                quota: quota as u16,
                key: key.into(),
                bucket,
            })
    }

    /// A decision by id.
    pub fn decision(&self, id: &str) -> Option<Arc<Decision>> {
        self.state
            .read()
            .expect("state lock")
            .by_id
            .get(id)
            .cloned()
    }

    /// The revocation of a decision's document, if it was revoked.
    pub fn revocation(&self, id: &str) -> Option<Revocation> {
        self.state
            .read()
            .expect("state lock")
            .revoked
            .get(id)
            .cloned()
    }

    /// Withdraws the document of a granted decision, durably; its quota stays used.
    pub async fn revoke(&self, r: Revocation) -> Result<(), Error> {
        match self.decision(&r.revoke) {
            None => return Err(Error::not_found("decision", &r.revoke)),
            Some(d) if d.document.is_none() => {
                return Err(Error::invalid(format!(
                    "decision {} issued no document",
                    r.revoke
                )));
            }
            Some(_) => {}
        }
        let mut line =
            serde_json::to_vec(&r).map_err(|e| Error::internal(format!("encode: {e}")))?;
        line.push(b'\n');
        self.log.append(1, line).await.map_err(|e| {
            if is_deposed(&e) {
                self.broken.store(true, Ordering::Release);
                moved(&self.service)
            } else {
                e
            }
        })?;
        self.state
            .write()
            .expect("state lock")
            .revoked
            .insert(r.revoke.clone(), r);
        Ok(())
    }

    /// An applicant's decisions, newest first.
    pub fn applications_of(&self, applicant: &str) -> Vec<Arc<Decision>> {
        let st = self.state.read().expect("state lock");
        let mut v = st.by_applicant.get(applicant).cloned().unwrap_or_default();
        v.reverse();
        v
    }

    /// Applications approved on a local date (UTC+8), and pending now.
    pub fn stats(&self, day: NaiveDate) -> (u64, usize) {
        let st = self.state.read().expect("state lock");
        (
            st.approved_on.get(&day).copied().unwrap_or(0),
            st.pending.len(),
        )
    }

    /// Whether it stopped deciding (its log could not be written, or another node's decider
    /// took the service over): applications get 503 until it is opened again.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Decisions made so far.
    pub fn decided(&self) -> u64 {
        self.state.read().expect("state lock").decided
    }

    /// Stops after the applications it holds.
    pub fn shutdown(&self) {
        self.tx.lock().expect("tx lock").take();
        if let Some(t) = self.thread.lock().expect("thread lock").take() {
            let _ = t.join();
        }
    }
}

impl Drop for Decider {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What the decider thread works with.
struct Round0 {
    service: Arc<Service>,
    calendar: Arc<RwLock<Calendar>>,
    state: Arc<RwLock<State>>,
    log: Arc<dyn StreamLog>,
    recorder: Arc<dyn Recorder>,
    clock: Arc<dyn Clock>,
    signer: Option<Arc<crate::document::Signer>>,
    cancels: Vec<CancelSource>,
    writer: LogWriter,
    broken: Arc<AtomicBool>,
}

/// What a round produced, in order.
enum Out {
    New(Arc<Decision>),
    Act(Box<Act>, Arc<Decision>),
}

/// A caller's answer: known now (a retry, a refused act), or once the round is durable.
enum Answer {
    Now(Result<Arc<Decision>, Error>),
    Durable(Arc<Decision>),
}

async fn run(w: Round0, mut rx: tokio::sync::mpsc::Receiver<Job>) {
    let consumer = cancel_consumer(&w.service);
    let mut broken: Option<Error> = None;
    let mut cursors: Vec<u64> = w
        .cancels
        .iter()
        .map(|c| {
            w.log
                .committed_offset(&c.cancel.stream, &consumer)
                .ok()
                .flatten()
                .unwrap_or(0)
        })
        .collect();
    loop {
        if !w.cancels.is_empty() {
            cancel_scan(&w, &consumer, &mut cursors).await;
        }
        let mut jobs = Vec::new();
        tokio::select! {
            j = rx.recv() => match j {
                Some(j) => jobs.push(j),
                None => break,
            },
            _ = tokio::time::sleep(DEADLINE_TICK) => {}
        }
        while !jobs.is_empty() && jobs.len() < ROUND_MAX {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let now = w.clock.now();
        let overdue: Vec<String> = w
            .state
            .read()
            .expect("state lock")
            .watch
            .iter()
            .take_while(|(due, _)| *due <= now)
            .map(|(_, id)| id.clone())
            .collect();
        if jobs.is_empty() && overdue.is_empty() {
            continue;
        }
        if let Some(e) = &broken {
            for job in jobs {
                let (Job::Apply { reply, .. } | Job::Act { reply, .. }) = job;
                let _ = reply.send(Err(e.clone()));
            }
            continue;
        }
        // A round whose audit records were written but whose log entry was not leaves the
        // writer unable to go on without reusing decision numbers: it stops deciding until
        // the server restarts and rebuilds its state from the log.
        if let Err(e) = round(&w, jobs, overdue, now).await {
            broken = Some(if is_deposed(&e) {
                moved(&w.service)
            } else {
                Error::unavailable(format!(
                    "service {} stopped deciding: its decision log could not be written ({})",
                    w.service.full_name(),
                    e.message
                ))
                .hint("fix the data directory's disk, then restart the server")
            });
            w.broken.store(true, Ordering::Release);
        }
    }
}

/// Reads the cancelling streams from where it left off: every event whose column matches a
/// document's input within the document's validity revokes it, durably and audited; then the
/// place is committed.
async fn cancel_scan(w: &Round0, consumer: &str, cursors: &mut [u64]) {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{DataType, TimeUnit, TimestampMicrosecondType};
    for (c, cursor) in w.cancels.iter().zip(cursors.iter_mut()) {
        let stream = &c.cancel.stream;
        let from = (*cursor).max(w.log.start_offset(stream));
        if from >= w.log.end_offset(stream) {
            continue;
        }
        let Ok(entries) = w.log.read(stream, from, 4 << 20) else {
            continue;
        };
        let mut next = from;
        let mut found: Vec<Revocation> = Vec::new();
        {
            let st = w.state.read().expect("state lock");
            for e in &entries {
                next = e.end();
                let Ok(batches) = yunqi_sense::runtime::decode_ipc(&e.payload) else {
                    continue;
                };
                let mut offset = e.first;
                for b in batches {
                    let n = b.num_rows() as u64;
                    let (Some(keys), Some(times)) = (
                        b.column_by_name(&c.cancel.column),
                        b.column_by_name(&c.event_time),
                    ) else {
                        offset += n;
                        continue;
                    };
                    let Ok(keys) = datafusion::arrow::compute::cast(keys, &DataType::Utf8) else {
                        offset += n;
                        continue;
                    };
                    let Ok(times) = datafusion::arrow::compute::cast(
                        times,
                        &DataType::Timestamp(TimeUnit::Microsecond, None),
                    ) else {
                        offset += n;
                        continue;
                    };
                    let keys = keys.as_string::<i32>();
                    let times = times.as_primitive::<TimestampMicrosecondType>();
                    for r in 0..b.num_rows() {
                        let at = offset + r as u64;
                        if at < from || keys.is_null(r) || times.is_null(r) {
                            continue;
                        }
                        let Some(ts) = DateTime::from_timestamp_micros(times.value(r)) else {
                            continue;
                        };
                        let k = format!("{}\0{}", c.cancel.input, keys.value(r));
                        for id in st.with_document.get(&k).into_iter().flatten() {
                            let Some(d) = st.by_id.get(id) else {
                                continue;
                            };
                            let Some(doc) = &d.document else {
                                continue;
                            };
                            // Within its validity, and after it was issued: a permit is not
                            // cancelled by what happened before it existed.
                            let issued = d
                                .review
                                .as_ref()
                                .and_then(|r| r.decided_at)
                                .unwrap_or(d.decided_at);
                            let inside = doc.valid_from.is_none_or(|f| f <= ts)
                                && doc.valid_to.is_none_or(|t| ts < t)
                                && issued <= ts;
                            if inside
                                && !st.revoked.contains_key(id)
                                && !found.iter().any(|x| &x.revoke == id)
                            {
                                found.push(Revocation {
                                    revoke: id.clone(),
                                    reason: format!(
                                        "{} ({stream} event {at} at {})",
                                        c.cancel.reason,
                                        ts.to_rfc3339()
                                    ),
                                    by: "system".into(),
                                    at: w.clock.now(),
                                });
                            }
                        }
                    }
                    offset += n;
                }
            }
        }
        if !found.is_empty() {
            let mut payload = Vec::new();
            for r in &found {
                if serde_json::to_writer(&mut payload, r).is_err() {
                    return;
                }
                payload.push(b'\n');
            }
            if w.recorder.record_revocations(&found).await.is_err() {
                return; // tried again on the next pass
            }
            if let Err(e) = w.writer.append(found.len() as u32, payload).await {
                if is_deposed(&e) {
                    // Another node decides the service now; it revokes from the same place.
                    w.broken.store(true, Ordering::Release);
                }
                return; // else tried again on the next pass
            }
            let mut st = w.state.write().expect("state lock");
            for r in found {
                st.revoked.insert(r.revoke.clone(), r);
            }
        }
        *cursor = next;
        let _ = w.log.commit_offset(stream, consumer, next);
    }
}

/// The answer to a retried idempotency key: at once, or — when the decision was made or
/// changed in this round — once the round is durable, like the first request.
fn retried(touched: &HashMap<String, Arc<Decision>>, d: Arc<Decision>) -> Answer {
    if touched.contains_key(&d.id) {
        Answer::Durable(d)
    } else {
        Answer::Now(Ok(d))
    }
}

/// Decides a round: applications and acts in order, then the deadlines missed; audits and
/// logs it as one entry; publishes and answers once it is durable.
async fn round(
    w: &Round0,
    jobs: Vec<Job>,
    overdue: Vec<String>,
    now: DateTime<Utc>,
) -> Result<(), Error> {
    let service = &w.service;
    let mut outs: Vec<Out> = Vec::with_capacity(jobs.len());
    let mut answers: Vec<(Reply, Answer)> = Vec::with_capacity(jobs.len());
    let changes = {
        let calendar = w.calendar.read().expect("calendar lock");
        let today = calendar.local_date(now.timestamp_micros());
        let st = w.state.read().expect("state lock");
        let mut round = st.ledger.round();
        // Decisions made or changed in this round, and this round's idempotency keys.
        let mut touched: HashMap<String, Arc<Decision>> = HashMap::new();
        let mut keys: HashMap<String, String> = HashMap::new();
        let mut act_keys: HashMap<String, String> = HashMap::new();
        let current = |touched: &HashMap<String, Arc<Decision>>, id: &str| {
            touched.get(id).or_else(|| st.by_id.get(id)).cloned()
        };
        let mut number = st.decided;
        for job in jobs {
            match job {
                Job::Apply { app, reply } => {
                    if let Some(k) = &app.key {
                        let known = match keys.get(k) {
                            Some(id) => current(&touched, id),
                            None => st.by_key.get(k).and_then(|d| current(&touched, &d.id)),
                        };
                        if let Some(d) = known {
                            answers.push((reply, retried(&touched, d)));
                            continue;
                        }
                    }
                    number += 1;
                    let mut d = decide_one(
                        service, &calendar, &st, &app, &mut round, today, now, number,
                    );
                    if d.decision == Verdict::Approved
                        && let Some(signer) = &w.signer
                    {
                        d.document = issue(service, &calendar, &d, now, signer);
                    }
                    let d = Arc::new(d);
                    if let Some(k) = &app.key {
                        keys.insert(k.clone(), d.id.clone());
                    }
                    touched.insert(d.id.clone(), d.clone());
                    outs.push(Out::New(d.clone()));
                    answers.push((reply, Answer::Durable(d)));
                }
                Job::Act { req, reply } => {
                    if let Some(k) = &req.key {
                        let known = act_keys
                            .get(k)
                            .or_else(|| st.act_keys.get(k))
                            .and_then(|id| current(&touched, id));
                        if let Some(d) = known {
                            answers.push((reply, retried(&touched, d)));
                            continue;
                        }
                    }
                    let cur = current(&touched, &req.id);
                    match act(w, &calendar, &mut round, cur, req, now) {
                        Ok((a, d)) => {
                            let d = Arc::new(d);
                            if let Some(k) = &a.key {
                                act_keys.insert(k.clone(), d.id.clone());
                            }
                            touched.insert(d.id.clone(), d.clone());
                            outs.push(Out::Act(Box::new(a), d.clone()));
                            answers.push((reply, Answer::Durable(d)));
                        }
                        Err(e) => answers.push((reply, Answer::Now(Err(e)))),
                    }
                }
            }
        }
        for id in overdue {
            let Some(d) = current(&touched, &id) else {
                continue;
            };
            if d.decision != Verdict::Pending
                || d.review.as_ref().is_some_and(|r| r.breached_at.is_some())
            {
                continue;
            }
            let a = Act {
                act: ActKind::Breach,
                id: id.clone(),
                by: "system".into(),
                at: now,
                reason: Some(format!(
                    "not decided by its deadline {}",
                    d.due_at.map(|t| t.to_rfc3339()).unwrap_or_default()
                )),
                assignee: None,
                fen: None,
                changes: Vec::new(),
                document: None,
                key: None,
            };
            let d = Arc::new(a.apply(&d));
            touched.insert(id, d.clone());
            outs.push(Out::Act(Box::new(a), d));
        }
        round.finish()
    };
    let committed: Result<(), Error> = async {
        if outs.is_empty() {
            return Ok(());
        }
        let mut decisions: Vec<&Decision> = Vec::with_capacity(outs.len());
        let mut acts: Vec<&Act> = Vec::new();
        let mut payload = Vec::with_capacity(outs.len() * 512);
        for o in &outs {
            match o {
                Out::New(d) => {
                    decisions.push(d);
                    serde_json::to_writer(&mut payload, d.as_ref())
                }
                Out::Act(a, _) => {
                    acts.push(a);
                    serde_json::to_writer(&mut payload, a)
                }
            }
            .map_err(|e| Error::internal(format!("encode a decision: {e}")))?;
            payload.push(b'\n');
        }
        w.recorder.record(&decisions, &acts).await?;
        w.writer.append(outs.len() as u32, payload).await?;
        Ok(())
    }
    .await;
    if committed.is_ok() && !outs.is_empty() {
        let mut st = w.state.write().expect("state lock");
        st.ledger.publish(changes);
        for o in outs {
            match o {
                Out::New(d) => st.put(d),
                Out::Act(a, d) => {
                    if let Some(k) = &a.key {
                        st.act_keys.insert(k.clone(), d.id.clone());
                    }
                    st.put(d)
                }
            }
        }
    }
    for (reply, answer) in answers {
        let _ = reply.send(match answer {
            Answer::Now(r) => r,
            Answer::Durable(d) => match &committed {
                Ok(()) => Ok(d),
                Err(e) if is_deposed(e) => Err(moved(&w.service)),
                Err(e) => Err(e.clone()),
            },
        });
    }
    committed
}

/// The answer to applications of a round that another node's decider fenced off: nothing of
/// it was decided (the retry is decided there, by the same idempotency key).
fn moved(service: &Service) -> Error {
    Error::unavailable(format!(
        "service {} is now decided by another node",
        service.full_name()
    ))
    .hint("retry: the request goes to the node that decides it now")
}

fn conflict(message: String) -> Error {
    Error::new(yunqi_types::ErrorCode::Conflict, message)
}

/// Checks an act against the decision as it stands and makes it: the act to log and the
/// decision after it.
fn act(
    w: &Round0,
    calendar: &Calendar,
    round: &mut crate::ledger::Round<'_>,
    current: Option<Arc<Decision>>,
    req: ActRequest,
    now: DateTime<Utc>,
) -> Result<(Act, Decision), Error> {
    let d = current.ok_or_else(|| {
        Error::not_found("application", &req.id)
            .hint("an application id looks like traffic.urgent-entry-permit/42")
    })?;
    let mut a = Act {
        act: req.act,
        id: d.id.clone(),
        by: req.by.clone(),
        at: now,
        reason: req
            .reason
            .as_deref()
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(str::to_string),
        assignee: None,
        fen: None,
        changes: Vec::new(),
        document: None,
        key: req.key.clone(),
    };
    if matches!(
        req.act,
        ActKind::Assign | ActKind::Approve | ActKind::Refuse
    ) {
        if d.decision != Verdict::Pending {
            return Err(conflict(format!(
                "application {} is not waiting for review: it is {}",
                d.id,
                match d.decision {
                    Verdict::Approved => "approved",
                    Verdict::Refused => "refused",
                    Verdict::Pending => "pending",
                }
            ))
            .hint("only pending applications are assigned, approved or refused"));
        }
        // Assigned, it is the assignee's: only they (or a steward) decide or reassign it.
        if let Some(who) = d.review.as_ref().and_then(|r| r.assignee.as_ref())
            && who != &req.by
            && !req.overrides
        {
            return Err(
                conflict(format!("application {} is assigned to {who}", d.id)).hint(format!(
                    "{who} decides it, or a steward assigns it to you first"
                )),
            );
        }
        if req.act != ActKind::Assign && d.applicant == req.by {
            return Err(Error::denied(format!(
                "{} applied for {} and may not decide it",
                req.by, d.id
            ))
            .hint("another officer of the department decides it"));
        }
    }
    match req.act {
        ActKind::Assign => {
            a.assignee = Some(req.assignee.clone().ok_or_else(|| {
                Error::invalid("say to whom").hint("send {\"assignee\": \"officer name\"}")
            })?);
        }
        ActKind::Approve => {
            if let Some(signer) = &w.signer {
                a.document = issue(&w.service, calendar, &d, now, signer);
            }
        }
        ActKind::Refuse => {
            if a.reason.is_none() {
                return Err(Error::invalid("a refusal needs a reason")
                    .hint("the applicant reads it: say what is wrong and what to do"));
            }
            a.changes = round.release(&d.held());
            if let Some(dr) = &d.draw
                && let Some(c) = round.repay(&dr.account, dr.owed())
            {
                a.changes.push(c);
            }
        }
        ActKind::Repay => {
            let dr = d.draw.as_ref().ok_or_else(|| {
                Error::invalid(format!("application {} drew no money", d.id))
                    .hint("only applications to a service with a money line are repaid")
            })?;
            let owed = dr.owed();
            if owed <= 0 {
                return Err(conflict(format!("application {} is repaid", d.id))
                    .hint("nothing is owed on it; GET the application to see its draw"));
            }
            let fen = req.fen.unwrap_or(owed);
            if fen <= 0 || fen > owed {
                return Err(Error::invalid(format!(
                    "repay between 0.01 and {}.{:02} yuan",
                    owed / 100,
                    owed % 100
                )));
            }
            // What the ledger repaid is what the decision records.
            let Some(c) = round.repay(&dr.account, fen) else {
                return Err(conflict(format!("application {} owes nothing", d.id)));
            };
            if let Change::Draw { fen: paid, .. } = &c {
                a.fen = Some(-paid);
            }
            a.changes.push(c);
        }
        ActKind::Breach => {
            return Err(Error::invalid(
                "a missed deadline is recorded by the decider",
            ));
        }
    }
    let after = a.apply(&d);
    Ok((a, after))
}

/// Where a money line stands for one application.
struct LineState {
    account: String,
    /// The line's size, fen (`None`: its limit could not be computed).
    limit: Option<i64>,
    outstanding: i64,
    overdue: bool,
}

fn yuan(fen: i64) -> Value {
    Value::Num(fen as f64 / 100.0)
}

fn to_fen(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => i.checked_mul(100),
        Value::Num(x) if x.is_finite() => Some((x * 100.0).round() as i64),
        _ => None,
    }
}

#[allow(clippy::too_many_arguments)]
fn decide_one(
    service: &Service,
    calendar: &Calendar,
    st: &State,
    app: &Application,
    round: &mut crate::ledger::Round<'_>,
    today: NaiveDate,
    now: DateTime<Utc>,
    number: u64,
) -> Decision {
    let text = |name: &str| match app.inputs.get(name) {
        Some(Value::Text(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => String::new(),
    };
    // The quota buckets this application would spend.
    let spends: Vec<(SpendKey, u32)> = service
        .quotas
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let date = match q.date.as_ref().and_then(|d| app.inputs.get(d)) {
                Some(Value::Date(d)) => *d,
                _ => today,
            };
            (
                SpendKey {
                    quota: i as u16,
                    key: text(&q.key).into(),
                    bucket: q.period.bucket(date),
                },
                q.limit,
            )
        })
        .collect();
    let mut env = Env1 {
        app,
        round,
        service,
        calendar,
        today,
        spends: &spends,
        lines: Vec::new(),
    };
    // The money lines: their limits are computed from inputs and lookups first.
    let lines: Vec<LineState> = service
        .lines
        .iter()
        .map(|l| {
            let account = format!("{}:{}", l.name, text(&l.key));
            LineState {
                limit: l.limit_expr.eval(&env).ok().as_ref().and_then(to_fen),
                outstanding: env.round.outstanding(&account),
                overdue: st.overdue(&account, now),
                account,
            }
        })
        .collect();
    env.lines = lines;
    let mut rules = Vec::with_capacity(service.rules.len() + 1);
    let mut reasons = Vec::new();
    let mut refused = false;
    let mut review = matches!(service.outcome, Outcome::Review { .. });
    if let Some(c) = &service.consent {
        let met = app.consent == Some(true);
        if !met {
            refused = true;
            reasons.push(c.reason.clone());
        }
        rules.push(RuleOutcome {
            rule: "consent".into(),
            require: format!("the holder of {} has consented", c.subject),
            met: Some(met),
            reason: (!met).then(|| c.reason.clone()),
        });
    }
    for r in &service.rules {
        let met = match r.expr.eval(&env) {
            Ok(Value::Bool(b)) => Some(b),
            Ok(_) | Err(_) => None,
        };
        let reason = (met != Some(true)).then(|| r.reason.clone());
        if met != Some(true) {
            match r.otherwise {
                Otherwise::Refuse => refused = true,
                Otherwise::Review => review = true,
            }
            reasons.push(r.reason.clone());
        }
        rules.push(RuleOutcome {
            rule: r.name.clone(),
            require: r.require.clone(),
            met,
            reason,
        });
    }
    let Env1 { lines, round, .. } = env;
    // Money first (checked, not yet drawn), then quotas all or nothing, then the draw: an
    // application either gets everything it needs or changes nothing.
    let mut draw = None;
    if !refused && let (Some(l), Some(ls)) = (service.lines.first(), lines.first()) {
        let fen = app.inputs.get(&l.amount).and_then(to_fen).unwrap_or(0);
        let fits = ls
            .limit
            .is_some_and(|lim| fen > 0 && ls.outstanding.saturating_add(fen) <= lim);
        if fits && !ls.overdue {
            draw = Some((l, ls, fen));
        } else {
            refused = true;
            reasons.push(l.reason.clone());
        }
    }
    let mut changes = Vec::new();
    let mut quotas = Vec::new();
    if !refused {
        match round.try_spend(&spends) {
            Ok(c) => changes = c,
            Err(full) => {
                refused = true;
                reasons.push(service.quotas[full.index].reason.clone());
            }
        }
    }
    let draw = match draw {
        Some((l, ls, fen)) if !refused => {
            let limit = ls.limit.unwrap_or(0);
            match round.try_draw(&ls.account, fen, limit) {
                Ok(c) => {
                    changes.push(c);
                    Some(Draw {
                        line: l.name.clone(),
                        account: ls.account.clone(),
                        fen,
                        repaid_fen: 0,
                        due_at: now + chrono::Duration::days(l.due_days as i64),
                    })
                }
                Err(_) => None, // checked above: cannot happen
            }
        }
        _ => None,
    };
    for (i, (k, limit)) in spends.iter().enumerate() {
        let q = &service.quotas[i];
        quotas.push(QuotaOutcome {
            quota: q.name.clone(),
            key: k.key.to_string(),
            period: q.period.label(k.bucket),
            used: round.used(k),
            limit: *limit,
        });
    }
    let mut data = Map::new();
    let mut subjects = Vec::new();
    for (name, row) in &app.lookups {
        let mut m = Map::new();
        m.insert("found".into(), Json::Bool(row.is_some()));
        for (c, v) in row.iter().flatten() {
            m.insert(c.clone(), to_json(v));
        }
        if let Some(s) = app.sources.get(name) {
            m.insert(
                "source".into(),
                serde_json::json!({"datasets": s.datasets, "grants": s.grants}),
            );
            if row.is_some()
                && let Some(k) = &s.subject
                && !subjects.contains(k)
            {
                subjects.push(k.clone());
            }
        }
        data.insert(name.clone(), Json::Object(m));
    }
    for (l, ls) in service.lines.iter().zip(&lines) {
        data.insert(
            format!("line.{}", l.name),
            serde_json::json!({
                "account": ls.account,
                "limit_yuan": ls.limit.map(|f| f as f64 / 100.0),
                "outstanding_yuan": ls.outstanding as f64 / 100.0,
                "overdue": ls.overdue,
            }),
        );
    }
    let decision = if refused {
        Verdict::Refused
    } else if review {
        Verdict::Pending
    } else {
        Verdict::Approved
    };
    if decision == Verdict::Approved {
        reasons.clear(); // only review rules were unmet, and none sent it to review
    }
    Decision {
        id: format!("{}/{number}", service.full_name()),
        service: service.full_name(),
        applicant: app.applicant.clone(),
        key: app.key.clone(),
        decided_at: now,
        decision,
        reasons,
        inputs: app
            .inputs
            .iter()
            .map(|(k, v)| (k.clone(), to_json(v)))
            .collect(),
        rules,
        data,
        quotas,
        changes,
        document: None,
        due_at: (decision == Verdict::Pending).then(|| {
            now + chrono::Duration::milliseconds((service.review_hours * 3_600_000.0) as i64)
        }),
        review: None,
        draw,
        subjects,
    }
}

/// A new unified social credit code (统一社会信用代码, GB 32100-2015) for decision `number`:
/// `9` (registered by market regulation), `1` (an enterprise), the region, a nine-character
/// organisation code (GB 11714, its own check character) and the check character.
pub fn credit_code(region: &str, number: u64) -> Option<String> {
    let org8 = format!("{:08}", number % 100_000_000);
    const W: [u32; 8] = [3, 7, 9, 10, 5, 8, 4, 2];
    let sum: u32 = org8
        .bytes()
        .zip(W)
        .map(|(b, w)| (b - b'0') as u32 * w)
        .sum();
    let c9 = match 11 - sum % 11 {
        10 => 'X',
        11 => '0',
        n => char::from_digit(n, 10)?,
    };
    let first17 = format!("91{region}{org8}{c9}");
    let check = yunqi_types::classify::credit_code_check(&first17)?;
    Some(format!("{first17}{check}"))
}

/// The document of a granted application: the fields the definition names, valid over the
/// window its `valid_window` input names on the service's first date input (a whole day when
/// it names none); with a new credit code when the definition asks for one.
fn issue(
    service: &Service,
    calendar: &Calendar,
    d: &Decision,
    now: DateTime<Utc>,
    signer: &crate::document::Signer,
) -> Option<Issued> {
    let doc = service.document.as_ref()?;
    let plain = |v: &Json| match v {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    };
    let money = |f: &str| {
        service
            .inputs
            .iter()
            .any(|i| i.name == f && matches!(i.kind, InputType::Money { .. }))
    };
    let mut fields: BTreeMap<String, String> = doc
        .fields
        .iter()
        .filter_map(|f| {
            d.inputs.get(f).map(|v| match v.as_f64() {
                Some(yuan) if money(f) => (f.clone(), format!("{yuan:.2}")),
                _ => (f.clone(), plain(v)),
            })
        })
        .collect();
    let code = match &doc.credit_code_region {
        Some(region) => {
            let number = d.id.rsplit_once('/')?.1.parse().ok()?;
            let c = credit_code(region, number)?;
            fields.insert("credit_code".into(), c.clone());
            Some(c)
        }
        None => None,
    };
    let date = service.inputs.iter().find_map(|i| match i.kind {
        InputType::Date { .. } => d.inputs.get(&i.name)?.as_str()?.parse::<NaiveDate>().ok(),
        _ => None,
    });
    let kind = match doc
        .valid_window
        .as_ref()
        .and_then(|w| d.inputs.get(w))
        .and_then(|v| v.as_str())
    {
        Some("noon") => crate::calendar::WindowKind::Noon,
        _ => crate::calendar::WindowKind::Day,
    };
    let (valid_from, valid_to) = match date {
        Some(x) => {
            let v = calendar.window(kind, x);
            (
                DateTime::from_timestamp_micros(v.start_us),
                DateTime::from_timestamp_micros(v.end_us),
            )
        }
        None => (None, None),
    };
    let token = signer
        .issue(crate::document::Claims {
            id: d.id.clone(),
            service: d.service.clone(),
            title: doc.title.clone(),
            fields,
            valid_from,
            valid_to,
            issued_at: now,
            kid: String::new(),
        })
        .ok()?;
    Some(Issued {
        token,
        valid_from,
        valid_to,
        code,
    })
}
