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

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
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

/// Makes a round's decisions part of the audit chain, durably, before they are logged.
pub trait Recorder: Send + Sync + 'static {
    /// Records the decisions.
    fn record<'a>(&'a self, decisions: &'a [&'a Decision]) -> BoxFuture<'a, Result<(), Error>>;
}

/// Records each decision in the audit chain: who applied, the service, the decision and its
/// reasons.
pub struct AuditRecorder(pub yunqi_audit::SharedAuditLog);

impl Recorder for AuditRecorder {
    fn record<'a>(&'a self, decisions: &'a [&'a Decision]) -> BoxFuture<'a, Result<(), Error>> {
        let events = decisions
            .iter()
            .map(|d| yunqi_types::AuditEvent {
                principal: d.applicant.clone(),
                department: String::new(),
                action: "service.decide".into(),
                object: format!("service:{}", d.service),
                outcome: Some(yunqi_types::Outcome::Ok),
                purpose: String::new(),
                detail: format!(
                    "{} {:?}{}",
                    d.id,
                    d.decision,
                    if d.reasons.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", d.reasons.join("; "))
                    }
                ),
                request_id: String::new(),
            })
            .collect();
        Box::pin(async move { self.0.append(events).await.map(|_| ()) })
    }
}

/// An application, checked and looked up.
#[derive(Debug, Clone)]
pub struct Application {
    /// Who applies (principal name).
    pub applicant: String,
    /// The idempotency key, if the caller sent one.
    pub key: Option<String>,
    /// The inputs, typed.
    pub inputs: BTreeMap<String, Value>,
    /// Each lookup's row (`None`: not found).
    pub lookups: BTreeMap<String, Option<Row>>,
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
        InputType::Enum { values } => {
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
            Ok(Value::Int(fen as i64))
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

struct Job {
    app: Application,
    reply: tokio::sync::oneshot::Sender<Result<Arc<Decision>, Error>>,
}

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

struct State {
    ledger: Ledger,
    by_key: HashMap<String, Arc<Decision>>,
    by_id: HashMap<String, Arc<Decision>>,
    revoked: HashMap<String, Revocation>,
    by_applicant: HashMap<String, Vec<Arc<Decision>>>,
    decided: u64,
}

/// The decider of one service.
pub struct Decider {
    service: Arc<Service>,
    log: Arc<dyn StreamLog>,
    stream: String,
    signer: Option<Arc<crate::document::Signer>>,
    calendar: Arc<RwLock<Calendar>>,
    state: Arc<RwLock<State>>,
    tx: Mutex<Option<tokio::sync::mpsc::Sender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The stream key of a service's decision log.
pub fn log_stream(service: &Service) -> String {
    format!("serve.{}.{}", service.department, service.name)
}

struct Env1<'a> {
    app: &'a Application,
    round: &'a crate::ledger::Round<'a>,
    service: &'a Service,
    calendar: &'a Calendar,
    today: NaiveDate,
    spends: &'a [(SpendKey, u32)],
}

impl Env for Env1<'_> {
    fn get(&self, path: &[&str]) -> Option<Value> {
        match path {
            [name] => self.app.inputs.get(*name).cloned(),
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
    ) -> Result<Decider, Error> {
        let stream = log_stream(&service);
        let mut state = State {
            ledger: Ledger::default(),
            by_key: HashMap::new(),
            by_id: HashMap::new(),
            revoked: HashMap::new(),
            by_applicant: HashMap::new(),
            decided: 0,
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
                    let d: Decision = serde_json::from_slice(line).map_err(|err| {
                        Error::internal(format!("decision log {stream} at {}: {err}", e.first))
                    })?;
                    d.changes.iter().for_each(|c| state.ledger.replay(c));
                    state.decided += 1;
                    let d = Arc::new(d);
                    state.by_id.insert(d.id.clone(), d.clone());
                    state
                        .by_applicant
                        .entry(d.applicant.clone())
                        .or_default()
                        .push(d.clone());
                    if let Some(k) = &d.key {
                        state.by_key.insert(k.clone(), d);
                    }
                }
                from = e.end();
            }
        }
        let state = Arc::new(RwLock::new(state));
        let calendar = Arc::new(RwLock::new(calendar));
        let (tx, rx) = tokio::sync::mpsc::channel(ROUND_MAX);
        let thread = {
            let (service, state, calendar, signer, log, stream) = (
                service.clone(),
                state.clone(),
                calendar.clone(),
                signer.clone(),
                log.clone(),
                stream.clone(),
            );
            std::thread::Builder::new()
                .name(format!("decide {}", service.full_name()))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .expect("decider runtime");
                    rt.block_on(run(
                        service, calendar, state, rx, log, recorder, clock, stream, signer,
                    ));
                })
                .map_err(|e| Error::internal(format!("start the decider: {e}")))?
        };
        Ok(Decider {
            service,
            log,
            stream,
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
        let tx = self
            .tx
            .lock()
            .expect("tx lock")
            .clone()
            .ok_or_else(|| Error::unavailable("the server is stopping"))?;
        let (reply, rx) = tokio::sync::oneshot::channel();
        tx.send(Job { app, reply })
            .await
            .map_err(|_| Error::unavailable("the server is stopping"))?;
        rx.await
            .map_err(|_| Error::unavailable("the server is stopping"))?
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
        self.log.append(&self.stream, 1, line).await?;
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

#[allow(clippy::too_many_arguments)]
async fn run(
    service: Arc<Service>,
    calendar: Arc<RwLock<Calendar>>,
    state: Arc<RwLock<State>>,
    mut rx: tokio::sync::mpsc::Receiver<Job>,
    log: Arc<dyn StreamLog>,
    recorder: Arc<dyn Recorder>,
    clock: Arc<dyn Clock>,
    stream: String,
    signer: Option<Arc<crate::document::Signer>>,
) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < ROUND_MAX {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let now = clock.now();
        // Decide the round against the published state.
        let (decisions, changes, fresh) = {
            let calendar = calendar.read().expect("calendar lock");
            let today = calendar.local_date(now.timestamp_micros());
            let st = state.read().expect("state lock");
            let mut round = st.ledger.round();
            let mut keys: HashMap<&str, usize> = HashMap::new();
            let mut decisions: Vec<Arc<Decision>> = Vec::with_capacity(jobs.len());
            let mut fresh: Vec<bool> = Vec::with_capacity(jobs.len());
            let mut number = st.decided;
            for job in &jobs {
                let app = &job.app;
                if let Some(k) = &app.key {
                    if let Some(d) = st.by_key.get(k) {
                        decisions.push(d.clone());
                        fresh.push(false);
                        continue;
                    }
                    if let Some(&i) = keys.get(k.as_str()) {
                        decisions.push(decisions[i].clone());
                        fresh.push(false);
                        continue;
                    }
                }
                number += 1;
                let mut d = decide_one(&service, &calendar, app, &mut round, today, now, number);
                if d.decision == Verdict::Approved
                    && let Some(signer) = &signer
                {
                    d.document = issue(&service, &calendar, app, &d, now, signer);
                }
                let d = Arc::new(d);
                if let Some(k) = &app.key {
                    keys.insert(k.as_str(), decisions.len());
                }
                decisions.push(d);
                fresh.push(true);
            }
            (decisions, round.finish(), fresh)
        };
        let new: Vec<Arc<Decision>> = decisions
            .iter()
            .zip(&fresh)
            .filter(|(_, f)| **f)
            .map(|(d, _)| d.clone())
            .collect();
        let committed: Result<(), Error> = async {
            if new.is_empty() {
                return Ok(());
            }
            let owned: Vec<&Decision> = new.iter().map(|d| d.as_ref()).collect();
            recorder.record(&owned).await?;
            let mut payload = Vec::with_capacity(new.len() * 512);
            for d in &new {
                serde_json::to_writer(&mut payload, d.as_ref())
                    .map_err(|e| Error::internal(format!("encode a decision: {e}")))?;
                payload.push(b'\n');
            }
            log.append(&stream, new.len() as u32, payload).await?;
            Ok(())
        }
        .await;
        if committed.is_ok() && !new.is_empty() {
            let mut st = state.write().expect("state lock");
            st.ledger.publish(changes);
            st.decided += new.len() as u64;
            for d in new {
                st.by_id.insert(d.id.clone(), d.clone());
                st.by_applicant
                    .entry(d.applicant.clone())
                    .or_default()
                    .push(d.clone());
                if let Some(k) = &d.key {
                    st.by_key.insert(k.clone(), d);
                }
            }
        }
        for (job, d) in jobs.into_iter().zip(decisions) {
            let _ = job.reply.send(match &committed {
                Ok(()) => Ok(d),
                Err(e) => Err(e.clone()),
            });
        }
    }
}

fn decide_one(
    service: &Service,
    calendar: &Calendar,
    app: &Application,
    round: &mut crate::ledger::Round<'_>,
    today: NaiveDate,
    now: DateTime<Utc>,
    number: u64,
) -> Decision {
    // The quota buckets this application would spend.
    let spends: Vec<(SpendKey, u32)> = service
        .quotas
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let key = match app.inputs.get(&q.key) {
                Some(Value::Text(s)) => s.clone(),
                Some(v) => v.to_string(),
                None => String::new(),
            };
            let date = match q.date.as_ref().and_then(|d| app.inputs.get(d)) {
                Some(Value::Date(d)) => *d,
                _ => today,
            };
            (
                SpendKey {
                    quota: i as u16,
                    key: key.into(),
                    bucket: q.period.bucket(date),
                },
                q.limit,
            )
        })
        .collect();
    let mut rules = Vec::with_capacity(service.rules.len());
    let mut reasons = Vec::new();
    let mut refused = false;
    let mut review = matches!(service.outcome, Outcome::Review { .. });
    {
        let env = Env1 {
            app,
            round,
            service,
            calendar,
            today,
            spends: &spends,
        };
        for r in &service.rules {
            let met = match r.expr.eval(&env) {
                Ok(Value::Bool(b)) => Some(b),
                Ok(Value::Null) => None,
                Ok(_) | Err(_) => None,
            };
            let reason = (met != Some(true)).then(|| r.reason.clone());
            if met != Some(true) {
                match r.otherwise {
                    Otherwise::Refuse => {
                        refused = true;
                        reasons.push(r.reason.clone());
                    }
                    Otherwise::Review => review = true,
                }
            }
            rules.push(RuleOutcome {
                rule: r.name.clone(),
                require: r.require.clone(),
                met,
                reason,
            });
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
    for (name, row) in &app.lookups {
        data.insert(
            name.clone(),
            match row {
                None => serde_json::json!({"found": false}),
                Some(r) => {
                    let mut m = Map::new();
                    m.insert("found".into(), Json::Bool(true));
                    for (c, v) in r {
                        m.insert(c.clone(), to_json(v));
                    }
                    Json::Object(m)
                }
            },
        );
    }
    Decision {
        id: format!("{}/{number}", service.full_name()),
        service: service.full_name(),
        applicant: app.applicant.clone(),
        key: app.key.clone(),
        decided_at: now,
        decision: if refused {
            Verdict::Refused
        } else if review {
            Verdict::Pending
        } else {
            Verdict::Approved
        },
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
    }
}

/// The document of a granted application: the fields the definition names, valid over the
/// window its `valid_window` input names on the service's first date input (a whole day when
/// it names none).
fn issue(
    service: &Service,
    calendar: &Calendar,
    app: &Application,
    d: &Decision,
    now: DateTime<Utc>,
    signer: &crate::document::Signer,
) -> Option<Issued> {
    let doc = service.document.as_ref()?;
    let plain = |v: &Value| match v {
        Value::Text(s) => s.clone(),
        other => other.to_string(),
    };
    let fields = doc
        .fields
        .iter()
        .filter_map(|f| app.inputs.get(f).map(|v| (f.clone(), plain(v))))
        .collect();
    let date = service
        .inputs
        .iter()
        .find_map(|i| match app.inputs.get(&i.name) {
            Some(Value::Date(x)) => Some(*x),
            _ => None,
        });
    let kind = match doc.valid_window.as_ref().and_then(|w| app.inputs.get(w)) {
        Some(Value::Text(w)) if w == "noon" => crate::calendar::WindowKind::Noon,
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
    })
}
