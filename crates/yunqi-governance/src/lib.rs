//! Governance: who is calling (authentication), whether they may (the policy, in [`policy`]),
//! and the identity operations themselves, each audited.
//!
//! Architecture invariant: every state change goes through [`Governance`], which authorises it,
//! writes its audit record (durable) and only then applies it to the store. A denial is audited
//! too. No change is visible before its audit record is durable; a crash between the two leaves
//! an audit record of a change that was never acknowledged, never the reverse.
#![deny(missing_docs)]

mod datasets;
mod grants;
pub mod policy;
pub mod row_filter;
mod streams;
pub mod tokens;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use yunqi_audit::{AuditPage, AuditQuery, SharedAuditLog};
use yunqi_store::{IdentityChange, IdentitySnapshot, IdentityStore, StoredToken};
use yunqi_types::{
    AuditEvent, Clock, Department, Error, Grant, Limits, Name, NationalId, Outcome, Principal,
    Role, TokenInfo, suggest,
};

pub use datasets::Queryable;
pub use grants::{GRANT_TEXT_CHARS_MAX, GrantFilter, GrantRequest};
pub use policy::{Action, authorize};
pub use streams::NewView;
pub use tokens::NewToken;

/// The name under which yunqi itself appears in the audit chain (bootstrap, start, stop).
pub const SYSTEM_PRINCIPAL: &str = "yunqi";
/// The bootstrap principal.
pub const ADMIN_PRINCIPAL: &str = "admin";

/// The key under which a person appears in the audit chain's records of queries that returned
/// their rows: 12 hex digits of SHA-256 of their ID number (the number itself is never written).
pub fn subject_key(id_number: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("yunqi subject {id_number}").as_bytes());
    hex::encode(&digest[..6])
}

/// Who is calling, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// The principal.
    pub principal: Principal,
    /// The id of the token it used.
    pub token_id: String,
}

/// Where a call comes from, for the audit record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallContext {
    /// Request id (also in logs and error bodies).
    pub request_id: String,
}

/// A new principal, as asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrincipalSpec {
    /// Name.
    pub name: Name,
    /// Role.
    pub role: Role,
    /// Department (required for steward, analyst, officer and service; none for admin, citizen).
    pub department: Option<Name>,
    /// National ID number (required for citizens, refused for others).
    pub id_number: Option<NationalId>,
    /// Display name (defaults to the name).
    pub display_name: Option<String>,
    /// When the first token expires, if ever.
    pub token_expires_at: Option<DateTime<Utc>>,
}

#[derive(Default)]
struct State {
    /// The store's version this state stands at.
    version: u64,
    departments: BTreeMap<Name, Department>,
    principals: BTreeMap<Name, Principal>,
    tokens: HashMap<String, StoredToken>,
    grants: BTreeMap<String, Grant>,
}

impl State {
    fn from_snapshot(s: IdentitySnapshot) -> State {
        State {
            version: s.version,
            departments: s
                .departments
                .into_iter()
                .map(|d| (d.name.clone(), d))
                .collect(),
            principals: s
                .principals
                .into_iter()
                .map(|p| (p.name.clone(), p))
                .collect(),
            tokens: s
                .tokens
                .into_iter()
                .map(|t| (t.info.id.clone(), t))
                .collect(),
            grants: s.grants.into_iter().map(|g| (g.id.clone(), g)).collect(),
        }
    }

    fn apply(&mut self, changes: Vec<IdentityChange>) {
        for c in changes {
            match c {
                IdentityChange::CreateDepartment(d) => {
                    self.departments.insert(d.name.clone(), d);
                }
                IdentityChange::CreatePrincipal(p) => {
                    self.principals.insert(p.name.clone(), p);
                }
                IdentityChange::CreateToken(t) => {
                    self.tokens.insert(t.info.id.clone(), t);
                }
                IdentityChange::RevokeToken { id, at } => {
                    if let Some(t) = self.tokens.get_mut(&id) {
                        t.info.revoked_at.get_or_insert(at);
                    }
                }
                IdentityChange::PutGrant(g) => {
                    self.grants.insert(g.id.clone(), *g);
                }
            }
        }
    }

    fn principal(&self, name: &str) -> Result<&Principal, Error> {
        self.principals.get(name).ok_or_else(|| {
            let e = Error::not_found("principal", name);
            match suggest::did_you_mean(name, self.principals.keys().map(Name::as_str)) {
                Some(s) => e.hint(format!("did you mean \"{s}\"?")),
                None => e.hint("list principals with `yunqi principal list`"),
            }
        })
    }

    fn department(&self, name: &str) -> Result<&Department, Error> {
        self.departments.get(name).ok_or_else(|| {
            let e = Error::not_found("department", name);
            match suggest::did_you_mean(name, self.departments.keys().map(Name::as_str)) {
                Some(s) => e.hint(format!("did you mean \"{s}\"?")),
                None => e.hint(
                    "list departments with `yunqi dept list`, create one with `yunqi dept create`",
                ),
            }
        })
    }
}

/// The governance service. Share it behind an `Arc`.
pub struct Governance {
    store: Arc<dyn IdentityStore>,
    datasets: Arc<yunqi_datasets::DatasetStore>,
    /// Serialises dataset changes (imports are staged, audited, then published).
    dataset_lock: tokio::sync::Mutex<()>,
    audit: SharedAuditLog,
    clock: Arc<dyn Clock>,
    state: RwLock<State>,
    /// Serialises changes so that check-then-write is atomic.
    write_lock: tokio::sync::Mutex<()>,
    limits: Limits,
    /// Stream definitions, when streams are enabled.
    streams: Option<Arc<dyn yunqi_datasets::StreamDeclarations>>,
    /// In a cluster: refuses requests while this node cannot confirm it is current.
    fence: Option<Arc<Fence>>,
    /// In a cluster whose streams and datasets are shared: continuous views' results are
    /// shared datasets too (each view run by the node holding its lease).
    shared_views: bool,
}

/// A node's lease on being current with the cluster's metadata store.
///
/// The node renews it each time it has read the store's version and stands at it; it serves
/// requests only while its last renewal is younger than the lease. A node that revokes something
/// therefore knows that, one lease after its commit, every other node has either loaded the
/// revocation or stopped serving ([`IdentityStore::confirm`]).
pub struct Fence {
    origin: std::time::Instant,
    lease: std::time::Duration,
    /// Milliseconds after `origin` of the last renewal, plus one; 0 while never renewed.
    renewed: std::sync::atomic::AtomicU64,
}

impl Fence {
    /// A fence with `lease`, not yet renewed (the node starts fenced off).
    pub fn new(lease: std::time::Duration) -> Fence {
        Fence {
            origin: std::time::Instant::now(),
            lease,
            renewed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The lease.
    pub fn lease(&self) -> std::time::Duration {
        self.lease
    }

    /// Renews the lease from `at`: the moment the read that confirmed this node current began.
    pub fn renew(&self, at: std::time::Instant) {
        let ms = at.saturating_duration_since(self.origin).as_millis() as u64 + 1;
        self.renewed
            .fetch_max(ms, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the lease holds now.
    pub fn holds(&self) -> bool {
        let renewed = self.renewed.load(std::sync::atomic::Ordering::SeqCst);
        if renewed == 0 {
            return false;
        }
        let at = self.origin + std::time::Duration::from_millis(renewed - 1);
        at.elapsed() < self.lease
    }

    fn check(&self) -> Result<(), Error> {
        if self.holds() {
            return Ok(());
        }
        Err(Error::unavailable(
            "this node cannot confirm that it is current with the cluster's metadata store",
        )
        .detail("a revocation made on another node may not have reached it")
        .hint("send the request to another node; this one serves again once PostgreSQL answers it"))
    }
}

impl Governance {
    /// Loads the identities from the store.
    pub fn open(
        store: Arc<dyn IdentityStore>,
        datasets: Arc<yunqi_datasets::DatasetStore>,
        audit: SharedAuditLog,
        clock: Arc<dyn Clock>,
    ) -> Result<Governance, Error> {
        let snapshot = store.load()?;
        Ok(Governance {
            store,
            datasets,
            dataset_lock: tokio::sync::Mutex::new(()),
            audit,
            clock,
            state: RwLock::new(State::from_snapshot(snapshot)),
            write_lock: tokio::sync::Mutex::new(()),
            limits: Limits::default(),
            streams: None,
            fence: None,
            shared_views: false,
        })
    }

    /// Serves only while `fence` holds (cluster mode).
    pub fn with_fence(mut self, fence: Arc<Fence>) -> Governance {
        self.fence = Some(fence);
        self
    }

    /// Whether this node serves requests: always embedded; in a cluster, while its fence holds.
    pub fn serving(&self) -> bool {
        self.fence.as_ref().is_none_or(|f| f.holds())
    }

    /// The store's version the in-memory state stands at.
    pub fn version(&self) -> u64 {
        self.read().version
    }

    /// Loads the store again if another node has changed it; returns the version now held.
    pub async fn refresh(&self) -> Result<u64, Error> {
        let _guard = self.write_lock.lock().await;
        self.reload_locked().await
    }

    /// Takes the write lock, first catching up with a store other nodes write (one round
    /// trip), so that a change is checked against what is stored now: a request that follows
    /// another node's answer is never refused as a race.
    async fn lock_current(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, Error> {
        let guard = self.write_lock.lock().await;
        if self
            .stored_version()
            .await?
            .is_some_and(|v| v > self.read().version)
        {
            self.reload_locked().await?;
        }
        Ok(guard)
    }

    /// The version a store other nodes write holds now (`None` embedded).
    async fn stored_version(&self) -> Result<Option<u64>, Error> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.current_version())
            .await
            .map_err(|e| Error::internal(format!("metadata store task failed: {e}")))?
    }

    /// Reloads the state from the store if the store is ahead. The caller holds `write_lock`.
    async fn reload_locked(&self) -> Result<u64, Error> {
        let store = self.store.clone();
        let snapshot = tokio::task::spawn_blocking(move || store.load())
            .await
            .map_err(|e| Error::internal(format!("metadata store task failed: {e}")))??;
        let mut state = self.state.write().expect("state lock");
        if snapshot.version > state.version {
            *state = State::from_snapshot(snapshot);
        }
        Ok(state.version)
    }

    /// The actor of an open session (a PostgreSQL connection) as of now: refused once its token
    /// is revoked or expired, or while this node is fenced off.
    pub fn revalidate(&self, actor: &Actor) -> Result<Actor, Error> {
        self.check_serving()?;
        self.actor_of_token(&actor.token_id)
    }

    /// Refuses while this node is fenced off (cluster mode).
    fn check_serving(&self) -> Result<(), Error> {
        self.fence.as_ref().map_or(Ok(()), |f| f.check())
    }

    /// Uses `limits` instead of the defaults.
    pub fn with_limits(mut self, limits: Limits) -> Governance {
        self.limits = limits;
        self
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The audit log.
    pub fn audit(&self) -> &SharedAuditLog {
        &self.audit
    }

    /// The clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().expect("state lock")
    }

    /// Creates the bootstrap principal `admin` if there is none; returns its new token.
    pub async fn bootstrap(&self) -> Result<Option<NewToken>, Error> {
        let _guard = self.write_lock.lock().await;
        if self.read().principals.contains_key(ADMIN_PRINCIPAL) {
            return Ok(None);
        }
        let now = self.clock.now();
        let admin = Principal {
            name: Name::parse("principal", ADMIN_PRINCIPAL)?,
            role: Role::Admin,
            department: None,
            id_number: None,
            display_name: "Platform administrator".into(),
            created_at: now,
        };
        let (token, stored) = tokens::issue(&admin.name, now, None)?;
        let event = AuditEvent {
            principal: SYSTEM_PRINCIPAL.into(),
            action: "principal.create".into(),
            object: format!("principal:{ADMIN_PRINCIPAL}"),
            outcome: Some(Outcome::Ok),
            detail: format!("bootstrap admin with token {}", stored.info.id),
            ..Default::default()
        };
        self.commit(
            event,
            vec![
                IdentityChange::CreatePrincipal(admin),
                IdentityChange::CreateToken(stored),
            ],
        )
        .await?;
        Ok(Some(token))
    }

    /// Records a lifecycle event of yunqi itself (start, stop).
    pub async fn record_system(&self, action: &str, detail: String) -> Result<(), Error> {
        self.audit
            .append(vec![AuditEvent {
                principal: SYSTEM_PRINCIPAL.into(),
                action: action.into(),
                object: "yunqi".into(),
                outcome: Some(Outcome::Ok),
                detail,
                ..Default::default()
            }])
            .await
            .map(|_| ())
    }

    /// Finds the principal a bearer token belongs to. Does not audit: the caller audits the
    /// denial with the request it came with ([`Governance::record_denial`]).
    pub async fn authenticate_current(&self, bearer: &str) -> Result<Actor, (Error, Option<Name>)> {
        let seen = self.read().version;
        match self.authenticate(bearer) {
            // Unknown here: with a store other nodes write, perhaps created there a moment
            // ago; catch up (one round trip) and look again.
            Err((e, None)) if tokens::parse(bearer).is_ok() => match self.catch_up(seen).await {
                Ok(true) => self.authenticate(bearer),
                _ => Err((e, None)),
            },
            other => other,
        }
    }

    /// Looks something up with `f`; when it is not found here and a store other nodes write
    /// is ahead (created there a moment ago), catches up and looks again.
    async fn lookup<T>(&self, f: impl Fn(&Self) -> Result<T, Error>) -> Result<T, Error> {
        let seen = self.read().version;
        match f(self) {
            Err(e) if e.code == yunqi_types::ErrorCode::NotFound => {
                if self.catch_up(seen).await? {
                    f(self)
                } else {
                    Err(e)
                }
            }
            other => other,
        }
    }

    /// Catches up with a store other nodes write (one round trip; nothing embedded), so that
    /// what is read next includes every change another node answered before now: a query
    /// sees a grant approved on another node a moment ago.
    pub async fn catch_up_now(&self) -> Result<(), Error> {
        let seen = self.read().version;
        self.catch_up(seen).await.map(|_| ())
    }

    /// Whether a store other nodes write holds more than version `seen`, reloading it then
    /// (unless that has happened meanwhile).
    async fn catch_up(&self, seen: u64) -> Result<bool, Error> {
        match self.stored_version().await? {
            Some(v) if v > seen => {
                if v > self.read().version {
                    self.refresh().await?;
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// [`Governance::authenticate_current`] without catching up: what this node holds now.
    pub fn authenticate(&self, bearer: &str) -> Result<Actor, (Error, Option<Name>)> {
        let (id, secret_hash) = tokens::parse(bearer).map_err(|e| (e, None))?;
        self.check_serving().map_err(|e| (e, None))?;
        let state = self.read();
        let unknown = || {
            Error::unauthenticated("token is not valid")
                .detail("no active token matches the one given")
                .hint("check the token; the admin's is in DIR/admin.token, others are printed once when created")
        };
        let stored = state.tokens.get(&id).ok_or_else(|| (unknown(), None))?;
        if !tokens::hash_eq(&stored.secret_hash, &secret_hash) {
            return Err((unknown(), None));
        }
        let owner = Some(stored.info.principal.clone());
        let now = self.clock.now();
        if let Some(at) = stored.info.revoked_at {
            return Err((
                Error::unauthenticated("token was revoked")
                    .detail(format!("token {id} was revoked at {}", at.to_rfc3339()))
                    .hint("ask for a new token (`yunqi token create PRINCIPAL`)"),
                owner,
            ));
        }
        if let Some(at) = stored.info.expires_at
            && now >= at
        {
            return Err((
                Error::unauthenticated("token has expired")
                    .detail(format!("token {id} expired at {}", at.to_rfc3339()))
                    .hint("ask for a new token (`yunqi token create PRINCIPAL`)"),
                owner,
            ));
        }
        let principal = state
            .principals
            .get(&stored.info.principal)
            .cloned()
            .ok_or_else(|| (Error::internal("token belongs to no principal"), None))?;
        Ok(Actor {
            principal,
            token_id: id,
        })
    }

    /// The actor a standing request (an NGSI-LD subscription) acts as: the principal of token
    /// `token_id` as it is now, while the token is neither revoked nor expired.
    pub fn actor_of_token(&self, token_id: &str) -> Result<Actor, Error> {
        let state = self.read();
        let stored = state
            .tokens
            .get(token_id)
            .ok_or_else(|| Error::unauthenticated(format!("token {token_id} no longer exists")))?;
        if stored.info.revoked_at.is_some() {
            return Err(Error::unauthenticated(format!(
                "token {token_id} was revoked"
            )));
        }
        if stored
            .info
            .expires_at
            .is_some_and(|at| self.clock.now() >= at)
        {
            return Err(Error::unauthenticated(format!(
                "token {token_id} has expired"
            )));
        }
        let principal = state
            .principals
            .get(&stored.info.principal)
            .cloned()
            .ok_or_else(|| Error::internal("token belongs to no principal"))?;
        Ok(Actor {
            principal,
            token_id: token_id.to_string(),
        })
    }

    /// Audits a denied call: failed authentication (`principal` = who the token named, if
    /// anyone) or any other refusal made outside governance.
    pub async fn record_denial(
        &self,
        principal: Option<&Principal>,
        action: &str,
        object: &str,
        error: &Error,
        ctx: &CallContext,
    ) -> Result<(), Error> {
        self.audit
            .append(vec![AuditEvent {
                principal: principal.map(|p| p.name.to_string()).unwrap_or_default(),
                department: principal
                    .and_then(|p| p.department.as_ref())
                    .map(|d| d.to_string())
                    .unwrap_or_default(),
                action: action.into(),
                object: object.into(),
                outcome: Some(Outcome::Denied),
                detail: error.message.clone(),
                request_id: ctx.request_id.clone(),
                ..Default::default()
            }])
            .await
            .map(|_| ())
    }

    /// Audits an access made by `actor` outside governance's own operations (a SQL query, a
    /// login over the PostgreSQL protocol). Returns only once the record is durable.
    pub async fn record_access(
        &self,
        actor: &Actor,
        action: &str,
        object: &str,
        outcome: Outcome,
        detail: String,
        ctx: &CallContext,
    ) -> Result<(), Error> {
        self.audit
            .append(vec![Self::actor_event(
                actor,
                action,
                object.to_string(),
                outcome,
                detail,
                ctx,
            )])
            .await
            .map(|_| ())
    }

    /// [`Governance::record_access`] for several accesses at once (one durable append):
    /// `(actor, action, object, outcome, detail, context)` each.
    pub async fn record_accesses(
        &self,
        accesses: Vec<(&Actor, &str, String, Outcome, String, &CallContext)>,
    ) -> Result<(), Error> {
        if accesses.is_empty() {
            return Ok(());
        }
        let events = accesses
            .into_iter()
            .map(|(actor, action, object, outcome, detail, ctx)| {
                Self::actor_event(actor, action, object, outcome, detail, ctx)
            })
            .collect();
        self.audit.append(events).await.map(|_| ())
    }

    /// Authorises `action` for `actor`, auditing a denial (for engines built on governance).
    pub async fn authorize_action(
        &self,
        actor: &Actor,
        action: &Action<'_>,
        ctx: &CallContext,
    ) -> Result<(), Error> {
        self.authorize(actor, action, ctx).await
    }

    /// Audits a query: like [`Governance::record_access`], with the purposes of the grants it
    /// used.
    pub async fn record_query(
        &self,
        actor: &Actor,
        object: &str,
        outcome: Outcome,
        purpose: String,
        detail: String,
        ctx: &CallContext,
    ) -> Result<(), Error> {
        let mut event =
            Self::actor_event(actor, "sql.query", object.to_string(), outcome, detail, ctx);
        event.purpose = purpose;
        self.audit.append(vec![event]).await.map(|_| ())
    }

    /// The accesses to a citizen's data: queries that returned rows whose subject is the
    /// citizen, newest first, at most `limit`. Reading them is itself audited.
    pub async fn accesses_of(
        &self,
        actor: &Actor,
        limit: usize,
        ctx: &CallContext,
    ) -> Result<Vec<yunqi_audit::AuditRecord>, Error> {
        let id = match (&actor.principal.role, &actor.principal.id_number) {
            (Role::Citizen, Some(id)) => id.clone(),
            _ => {
                let e = Error::denied("only citizens have accesses to their data listed").hint(
                    "use a citizen's token; staff read the audit chain with `yunqi audit list`",
                );
                self.record_access(
                    actor,
                    "subject.accesses",
                    "audit",
                    Outcome::Denied,
                    e.message.clone(),
                    ctx,
                )
                .await?;
                return Err(e);
            }
        };
        let needle = format!(" {} ", subject_key(id.as_str()));
        let audit = self.audit.clone();
        let found =
            tokio::task::spawn_blocking(move || -> Result<Vec<yunqi_audit::AuditRecord>, Error> {
                let mut out = Vec::new();
                // Queries that returned the citizen's rows, and service decisions that used
                // them (a lookup answered from an index), newest first, on every node's chain.
                for (action, node) in audit.chains()?.into_iter().flat_map(|n| {
                    [
                        "sql.query",
                        "service.decide",
                        "service.read",
                        "service.queue",
                    ]
                    .map(|a| (a, n.clone()))
                }) {
                    let mut before = None;
                    let mut found_here = 0;
                    while found_here < limit {
                        let page = audit.query(&AuditQuery {
                            action: Some(action.into()),
                            outcome: Some(Outcome::Ok),
                            before,
                            descending: true,
                            limit: 1000,
                            node: node.clone(),
                            ..Default::default()
                        })?;
                        for r in page.records {
                            // The SQL text follows the first ": " and is not to be trusted.
                            let head = r
                                .detail
                                .split_once(": ")
                                .map_or(r.detail.as_str(), |(h, _)| h);
                            let subjects = head
                                .split(';')
                                .find_map(|part| part.trim().strip_prefix("subjects "));
                            if subjects.is_some_and(|s| format!(" {s} ").contains(&needle)) {
                                out.push(r);
                                found_here += 1;
                            }
                        }
                        match page.next {
                            Some(n) => before = Some(n),
                            None => break,
                        }
                    }
                }
                out.sort_by_key(|r| std::cmp::Reverse((r.time, r.seq)));
                out.truncate(limit);
                Ok(out)
            })
            .await
            .map_err(|e| Error::internal(format!("audit query task failed: {e}")))?;
        let found = found?;
        self.record_access(
            actor,
            "subject.accesses",
            "audit",
            Outcome::Ok,
            format!("{} accesses", found.len()),
            ctx,
        )
        .await?;
        Ok(found)
    }

    /// A principal by name, for audit records of failed authentication.
    pub fn principal_named(&self, name: &str) -> Option<Principal> {
        self.read().principals.get(name).cloned()
    }

    /// An audit event of `actor` doing `action` on `object`.
    fn actor_event(
        actor: &Actor,
        action: &str,
        object: String,
        outcome: Outcome,
        detail: String,
        ctx: &CallContext,
    ) -> AuditEvent {
        let p = &actor.principal;
        AuditEvent {
            principal: p.name.to_string(),
            department: p
                .department
                .as_ref()
                .map(|d| d.to_string())
                .unwrap_or_default(),
            action: action.into(),
            object,
            outcome: Some(outcome),
            purpose: String::new(),
            detail,
            request_id: ctx.request_id.clone(),
        }
    }

    fn event(
        actor: &Actor,
        action: &Action<'_>,
        outcome: Outcome,
        detail: String,
        ctx: &CallContext,
    ) -> AuditEvent {
        Self::actor_event(
            actor,
            action.audit_action(),
            action.audit_object(),
            outcome,
            detail,
            ctx,
        )
    }

    /// Authorises, auditing a denial.
    async fn authorize(
        &self,
        actor: &Actor,
        action: &Action<'_>,
        ctx: &CallContext,
    ) -> Result<(), Error> {
        if let Err(e) = authorize(&actor.principal, action) {
            let event = Self::event(actor, action, Outcome::Denied, e.message.clone(), ctx);
            self.audit.append(vec![event]).await?;
            return Err(e);
        }
        Ok(())
    }

    /// Audits a failure after authorisation (conflict, not found) and returns it.
    async fn fail(&self, actor: &Actor, action: &Action<'_>, e: Error, ctx: &CallContext) -> Error {
        let event = Self::event(actor, action, Outcome::Failed, e.message.clone(), ctx);
        match self.audit.append(vec![event]).await {
            Ok(_) => e,
            Err(audit_error) => audit_error,
        }
    }

    /// Writes the audit record, then the store, then memory. Called with the write lock held.
    async fn commit(&self, event: AuditEvent, changes: Vec<IdentityChange>) -> Result<(), Error> {
        let failed_event = AuditEvent {
            outcome: Some(Outcome::Failed),
            ..event.clone()
        };
        self.audit.append(vec![event]).await?;
        let store = self.store.clone();
        let to_store = changes.clone();
        let base = self.read().version;
        let stored = tokio::task::spawn_blocking(move || store.apply(base, &to_store))
            .await
            .map_err(|e| Error::internal(format!("metadata store task failed: {e}")))?;
        let stored = match stored {
            Err(e) if e.detail.as_deref() == Some(yunqi_store::STALE) => {
                // Another node wrote first: catch up, so that the user's retry is checked
                // against what is stored now.
                let _ = self.reload_locked().await;
                Err(Error::new(
                    yunqi_types::ErrorCode::Conflict,
                    "another node changed departments, principals, tokens or grants at the same moment",
                )
                .hint("send the request again"))
            }
            other => other,
        };
        let version = match stored {
            Ok(v) => v,
            Err(e) => {
                // The audit says it was done; say that it was not.
                let _ = self
                    .audit
                    .append(vec![AuditEvent {
                        detail: format!("metadata store write failed: {}", e.message),
                        ..failed_event
                    }])
                    .await;
                return Err(e);
            }
        };
        // A revocation is answered only once no node serves what it took away.
        let revokes = changes.iter().any(|c| match c {
            IdentityChange::RevokeToken { .. } => true,
            IdentityChange::PutGrant(g) => g.revoked_at.is_some(),
            _ => false,
        });
        {
            let mut state = self.state.write().expect("state lock");
            state.apply(changes);
            state.version = state.version.max(version);
        }
        if revokes {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.confirm(version))
                .await
                .map_err(|e| Error::internal(format!("metadata store task failed: {e}")))??;
        }
        Ok(())
    }

    /// Creates a department.
    pub async fn create_department(
        &self,
        actor: &Actor,
        name: Name,
        title: String,
        ctx: &CallContext,
    ) -> Result<Department, Error> {
        let action = Action::DepartmentCreate { name: &name };
        self.authorize(actor, &action, ctx).await?;
        let _guard = self.lock_current().await?;
        if self.read().departments.contains_key(&name) {
            let e = Error::already_exists("department", name.as_str())
                .hint("pick another name, or use the existing department");
            return Err(self.fail(actor, &action, e, ctx).await);
        }
        let department = Department {
            name: name.clone(),
            title,
            created_at: self.clock.now(),
        };
        let event = Self::event(actor, &action, Outcome::Ok, String::new(), ctx);
        self.commit(
            event,
            vec![IdentityChange::CreateDepartment(department.clone())],
        )
        .await?;
        Ok(department)
    }

    /// Lists departments.
    pub fn list_departments(&self, actor: &Actor) -> Result<Vec<Department>, Error> {
        authorize(&actor.principal, &Action::DepartmentRead)?;
        Ok(self.read().departments.values().cloned().collect())
    }

    /// One department.
    pub fn get_department(&self, actor: &Actor, name: &str) -> Result<Department, Error> {
        authorize(&actor.principal, &Action::DepartmentRead)?;
        self.read().department(name).cloned()
    }

    /// Creates a principal and its first token.
    pub async fn create_principal(
        &self,
        actor: &Actor,
        spec: PrincipalSpec,
        ctx: &CallContext,
    ) -> Result<(Principal, NewToken), Error> {
        let action = Action::PrincipalCreate {
            name: &spec.name,
            department: spec.department.as_ref(),
            role: spec.role,
        };
        self.authorize(actor, &action, ctx).await?;
        let _guard = self.lock_current().await?;
        let now = self.clock.now();
        let check = (|| {
            let state = self.read();
            if state.principals.contains_key(&spec.name) {
                return Err(Error::already_exists("principal", spec.name.as_str())
                    .hint("pick another name; to give an existing principal a new token use `yunqi token create`"));
            }
            match (spec.role.needs_department(), &spec.department) {
                (true, None) => {
                    return Err(Error::invalid(format!(
                        "a principal with role \"{}\" needs a department",
                        spec.role
                    ))
                    .hint("pass --dept DEPARTMENT (\"department\" in the API)"));
                }
                (false, Some(d)) => {
                    return Err(Error::invalid(format!(
                        "a principal with role \"{}\" belongs to no department",
                        spec.role
                    ))
                    .detail(format!("department \"{d}\" was given"))
                    .hint("leave out the department"));
                }
                (true, Some(d)) => {
                    state.department(d.as_str())?;
                }
                (false, None) => {}
            }
            match (spec.role, &spec.id_number) {
                (Role::Citizen, None) => {
                    return Err(Error::invalid("a citizen needs a national ID number")
                        .hint("pass --id-number (\"id_number\" in the API)"));
                }
                (Role::Citizen, Some(id)) => {
                    if state
                        .principals
                        .values()
                        .any(|p| p.id_number.as_ref() == Some(id))
                    {
                        return Err(Error::already_exists(
                            "citizen with national ID number",
                            id.as_str(),
                        )
                        .hint("each citizen has one principal; give it a new token instead"));
                    }
                }
                (_, Some(_)) => {
                    return Err(Error::invalid("only citizens have a national ID number")
                        .hint("leave out the ID number"));
                }
                (_, None) => {}
            }
            if let Some(t) = spec.token_expires_at
                && t <= now
            {
                return Err(Error::invalid("token expiry is in the past")
                    .detail(format!(
                        "it is {}, now is {}",
                        t.to_rfc3339(),
                        now.to_rfc3339()
                    ))
                    .hint("give a time in the future"));
            }
            Ok(())
        })();
        if let Err(e) = check {
            return Err(self.fail(actor, &action, e, ctx).await);
        }
        let principal = Principal {
            display_name: spec
                .display_name
                .clone()
                .unwrap_or_else(|| spec.name.to_string()),
            name: spec.name.clone(),
            role: spec.role,
            department: spec.department.clone(),
            id_number: spec.id_number.clone(),
            created_at: now,
        };
        let (token, stored) = tokens::issue(&principal.name, now, spec.token_expires_at)?;
        let event = Self::event(
            actor,
            &action,
            Outcome::Ok,
            format!("role {}, token {}", spec.role, stored.info.id),
            ctx,
        );
        self.commit(
            event,
            vec![
                IdentityChange::CreatePrincipal(principal.clone()),
                IdentityChange::CreateToken(stored),
            ],
        )
        .await?;
        Ok((principal, token))
    }

    /// Lists the principals the actor may see, optionally of one department.
    pub fn list_principals(
        &self,
        actor: &Actor,
        department: Option<&str>,
    ) -> Result<Vec<Principal>, Error> {
        let state = self.read();
        if let Some(d) = department {
            state.department(d)?;
        }
        Ok(state
            .principals
            .values()
            .filter(|p| {
                department.is_none_or(|d| p.department.as_ref().is_some_and(|pd| pd.as_str() == d))
            })
            .filter(|p| {
                authorize(&actor.principal, &Action::PrincipalRead { principal: p }).is_ok()
            })
            .cloned()
            .collect())
    }

    /// One principal.
    pub async fn get_principal(
        &self,
        actor: &Actor,
        name: &str,
        ctx: &CallContext,
    ) -> Result<Principal, Error> {
        let principal = self.read().principal(name)?.clone();
        self.authorize(
            actor,
            &Action::PrincipalRead {
                principal: &principal,
            },
            ctx,
        )
        .await?;
        Ok(principal)
    }

    /// Creates a token for a principal.
    pub async fn create_token(
        &self,
        actor: &Actor,
        owner: &str,
        expires_at: Option<DateTime<Utc>>,
        ctx: &CallContext,
    ) -> Result<NewToken, Error> {
        let owner = self.lookup(|g| g.read().principal(owner).cloned()).await?;
        let action = Action::TokenManage { owner: &owner };
        self.authorize(actor, &action, ctx).await?;
        let _guard = self.lock_current().await?;
        let now = self.clock.now();
        if let Some(t) = expires_at
            && t <= now
        {
            let e = Error::invalid("token expiry is in the past")
                .detail(format!(
                    "it is {}, now is {}",
                    t.to_rfc3339(),
                    now.to_rfc3339()
                ))
                .hint("give a time in the future");
            return Err(self.fail(actor, &action, e, ctx).await);
        }
        let (token, stored) = tokens::issue(&owner.name, now, expires_at)?;
        let mut event = Self::event(
            actor,
            &action,
            Outcome::Ok,
            format!("token {} created", stored.info.id),
            ctx,
        );
        event.action = "token.create".into();
        event.object = format!("token:{}", stored.info.id);
        self.commit(event, vec![IdentityChange::CreateToken(stored)])
            .await?;
        Ok(token)
    }

    /// Lists tokens (never their secrets) of the principals the actor may manage.
    pub fn list_tokens(&self, actor: &Actor, owner: Option<&str>) -> Result<Vec<TokenInfo>, Error> {
        let state = self.read();
        if let Some(o) = owner {
            let p = state.principal(o)?;
            authorize(&actor.principal, &Action::TokenManage { owner: p })?;
        }
        let mut out: Vec<TokenInfo> = state
            .tokens
            .values()
            .filter(|t| owner.is_none_or(|o| t.info.principal.as_str() == o))
            .filter(|t| {
                state.principals.get(&t.info.principal).is_some_and(|p| {
                    authorize(&actor.principal, &Action::TokenManage { owner: p }).is_ok()
                })
            })
            .map(|t| t.info.clone())
            .collect();
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    /// Revokes a token. Revoking a revoked token succeeds and changes nothing.
    pub async fn revoke_token(
        &self,
        actor: &Actor,
        id: &str,
        ctx: &CallContext,
    ) -> Result<TokenInfo, Error> {
        let (info, owner) = self
            .lookup(|g| {
                let state = g.read();
                let t = state.tokens.get(id).ok_or_else(|| {
                    Error::not_found("token", id).hint("list tokens with `yunqi token list`")
                })?;
                Ok((
                    t.info.clone(),
                    state.principal(t.info.principal.as_str())?.clone(),
                ))
            })
            .await?;
        let action = Action::TokenManage { owner: &owner };
        self.authorize(actor, &action, ctx).await?;
        let _guard = self.lock_current().await?;
        if info.revoked_at.is_some() {
            return Ok(info);
        }
        let now = self.clock.now();
        let mut event = Self::event(
            actor,
            &action,
            Outcome::Ok,
            format!("token {id} of principal {} revoked", owner.name),
            ctx,
        );
        event.action = "token.revoke".into();
        event.object = format!("token:{id}");
        self.commit(
            event,
            vec![IdentityChange::RevokeToken {
                id: id.to_string(),
                at: now,
            }],
        )
        .await?;
        Ok(TokenInfo {
            revoked_at: Some(now),
            ..info
        })
    }

    /// Reads audit records. Stewards are limited to their department's records, everyone else
    /// to their own: a query that asks for more is denied, one that asks for nothing in
    /// particular is narrowed.
    pub async fn query_audit(
        &self,
        actor: &Actor,
        mut q: AuditQuery,
        ctx: &CallContext,
    ) -> Result<AuditPage, Error> {
        let p = &actor.principal;
        if q.principal.is_none() && q.department.is_none() {
            match p.role {
                Role::Admin => {}
                Role::Steward => q.department = p.department.as_ref().map(|d| d.to_string()),
                _ => q.principal = Some(p.name.to_string()),
            }
        }
        fn exact(f: &Option<String>) -> Option<&str> {
            f.as_deref().filter(|s| !s.ends_with('*'))
        }
        let action = Action::AuditRead {
            department: exact(&q.department),
            principal: exact(&q.principal),
        };
        let allowed = if p.role == Role::Admin {
            Ok(())
        } else {
            // A prefix filter could reach other departments' records: only exact ones pass.
            authorize(p, &action)
        };
        if let Err(e) = allowed {
            let event = Self::event(actor, &action, Outcome::Denied, e.message.clone(), ctx);
            self.audit.append(vec![event]).await?;
            return Err(e);
        }
        let audit = self.audit.clone();
        tokio::task::spawn_blocking(move || audit.query(&q))
            .await
            .map_err(|e| Error::internal(format!("audit query task failed: {e}")))?
    }
}
