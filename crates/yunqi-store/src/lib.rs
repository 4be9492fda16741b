//! The metadata store: departments, principals, tokens and grants.
//!
//! [`IdentityStore`] is the narrow interface; [`SqliteStore`] the embedded implementation (one
//! SQLite file in the data directory, WAL, `synchronous = FULL`, so that a change is durable
//! when `apply` returns). The PostgreSQL implementation (`yunqi-store-pg`) is shared by the nodes
//! of a cluster: every batch it applies raises the store's version, a batch based on an older
//! version is refused as stale, and [`IdentityStore::confirm`] waits until every live node has
//! loaded a version.
//!
//! The store holds no policy: it is told what to write by `yunqi-governance`, which has already
//! validated, authorised and audited the change.
#![deny(missing_docs)]

pub mod held;
pub use held::HeldLeases;
use std::path::Path;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use yunqi_types::{Department, Error, Grant, Name, NationalId, Principal, Role, TokenInfo};

/// A token as stored: its public part and the SHA-256 of its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredToken {
    /// The public part.
    pub info: TokenInfo,
    /// SHA-256 of the secret.
    pub secret_hash: [u8; 32],
}

/// Everything the store holds, as loaded at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentitySnapshot {
    /// Departments.
    pub departments: Vec<Department>,
    /// Principals.
    pub principals: Vec<Principal>,
    /// Tokens, revoked and expired ones included.
    pub tokens: Vec<StoredToken>,
    /// Grants and requests for them, in every state.
    pub grants: Vec<Grant>,
    /// The store's version when this was loaded: it grows with every applied batch.
    pub version: u64,
}

/// One change; a list of them is applied atomically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityChange {
    /// Creates a department.
    CreateDepartment(Department),
    /// Creates a principal.
    CreatePrincipal(Principal),
    /// Creates a token.
    CreateToken(StoredToken),
    /// Revokes a token.
    RevokeToken {
        /// Token id.
        id: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// Creates or replaces a grant (its whole record).
    PutGrant(Box<Grant>),
}

/// The detail of the conflict a shared store answers when a batch was based on an old version.
pub const STALE: &str = "the metadata store changed since this node last loaded it";

/// Who holds a lease (see [`Leases`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    /// The node's name.
    pub node: String,
    /// Where the node takes HTTP requests (its registered address, `http://host:port`), when
    /// it is a registered node.
    pub http: Option<String>,
    /// The lease's fencing epoch: raised by every acquisition.
    pub epoch: u64,
    /// Whether the lease is still in force (not expired).
    pub live: bool,
}

impl LeaseHolder {
    /// The holder's HTTP base URL (`http://host:port`), when it is a registered node.
    pub fn base_url(&self) -> Option<String> {
        self.http.as_deref().map(|h| {
            if h.starts_with("http://") || h.starts_with("https://") {
                h.trim_end_matches('/').to_string()
            } else {
                format!("http://{h}")
            }
        })
    }
}

/// Where a request for leased work (a service's decider, a view's runner) goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This node does the work (or it does not exist: this node answers that).
    Here,
    /// The node that does it: its name and HTTP base URL (`http://host:port`).
    At {
        /// The node's name.
        node: String,
        /// Its base URL.
        url: String,
    },
}

/// Leases shared by a cluster's nodes: a named piece of work (a service's decider) is done by
/// one node at a time, which renews its lease well within its time to live; a lease not
/// renewed lapses, and another node takes the work over under a higher epoch.
pub trait Leases: Send + Sync + 'static {
    /// This node's name.
    fn node(&self) -> &str;
    /// Takes `lease` for this node for `ttl` if nobody holds it in force, or if this node's
    /// name does (an earlier process of this node, which is gone): `Ok(epoch)`, the new epoch;
    /// else `Err(holder)`.
    fn acquire(
        &self,
        lease: &str,
        ttl: std::time::Duration,
    ) -> Result<Result<u64, LeaseHolder>, Error>;
    /// Extends a lease this node holds at `epoch` by `ttl` from now; false if it lapsed or
    /// was taken (the work must stop).
    fn renew(&self, lease: &str, epoch: u64, ttl: std::time::Duration) -> Result<bool, Error>;
    /// Gives a lease up at once (a node stopping), so that another node need not wait for it
    /// to lapse.
    fn release(&self, lease: &str, epoch: u64) -> Result<(), Error>;
    /// Who holds `lease`, if anyone ever did.
    fn holder(&self, lease: &str) -> Result<Option<LeaseHolder>, Error>;
}

/// One version of a service's definition, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDefinition {
    /// `department.service`.
    pub service: String,
    /// Its version, from 1.
    pub version: u32,
    /// The definition's text (TOML), as applied.
    pub text: String,
}

/// Service definitions shared by a cluster's nodes, every version kept.
pub trait DefinitionStore: Send + Sync + 'static {
    /// The latest version of every service.
    fn latest(&self) -> Result<Vec<StoredDefinition>, Error>;
    /// The latest version of one service.
    fn latest_of(&self, service: &str) -> Result<Option<StoredDefinition>, Error>;
    /// Stores a new version; `conflict` if that version of the service exists (another node
    /// applied one meanwhile).
    fn put(&self, d: &StoredDefinition) -> Result<(), Error>;
}

/// What yunqi needs of a metadata store.
pub trait IdentityStore: Send + Sync + 'static {
    /// Loads everything.
    fn load(&self) -> Result<IdentitySnapshot, Error>;
    /// Applies the changes atomically and durably, or none of them, and returns the store's new
    /// version. `base` is the version the caller's state stands at; a store that other writers
    /// share refuses a batch whose base is not its current version (a conflict whose detail is
    /// [`STALE`]): the caller reloads and the user retries.
    fn apply(&self, base: u64, changes: &[IdentityChange]) -> Result<u64, Error>;
    /// Returns once every other live reader of the store has loaded `version` or has fenced
    /// itself off (refuses requests until it has caught up). A store with one reader returns at
    /// once.
    fn confirm(&self, version: u64) -> Result<(), Error> {
        let _ = version;
        Ok(())
    }
    /// The version stored now, for a store other writers share (so that a writer can catch up
    /// before it checks a change); `None` for a store this process alone writes.
    fn current_version(&self) -> Result<Option<u64>, Error> {
        Ok(None)
    }
}

/// The version of the SQLite schema this code writes.
pub const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE department (
    name        TEXT PRIMARY KEY,
    title       TEXT NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;
CREATE TABLE principal (
    name         TEXT PRIMARY KEY,
    role         TEXT NOT NULL,
    department   TEXT REFERENCES department(name),
    id_number    TEXT UNIQUE,
    display_name TEXT NOT NULL,
    created_at   INTEGER NOT NULL
) STRICT;
CREATE TABLE token (
    id          TEXT PRIMARY KEY,
    principal   TEXT NOT NULL REFERENCES principal(name),
    secret_hash BLOB NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER,
    revoked_at  INTEGER
) STRICT;
";

/// Added in schema version 2. A grant is one JSON record: it is read whole and written whole.
const SCHEMA_V2: &str = "
CREATE TABLE grant_record (
    id      TEXT PRIMARY KEY,
    record  TEXT NOT NULL
) STRICT;
";

/// The embedded store: one SQLite file.
///
/// The data directory's lock makes its server the only writer, so the version is a counter kept
/// in memory: it starts at 0 on every open and is never compared.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    version: std::sync::atomic::AtomicU64,
}

fn db_error(e: rusqlite::Error) -> Error {
    Error::internal(format!("metadata store error: {e}"))
        .hint("check the data directory's disk; `meta.db` is the metadata store")
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

fn corrupt(what: &str, e: Error) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("{what}: {}", e.message).into(),
    )
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore, Error> {
        let conn = Connection::open(path).map_err(db_error)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
        )
        .map_err(db_error)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(db_error)?;
        match version {
            0 => {
                conn.execute_batch(&format!(
                    "BEGIN; {SCHEMA} {SCHEMA_V2} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                ))
                .map_err(db_error)?;
            }
            1 => {
                conn.execute_batch(&format!(
                    "BEGIN; {SCHEMA_V2} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                ))
                .map_err(db_error)?;
            }
            SCHEMA_VERSION => {}
            other => {
                return Err(Error::internal(format!(
                    "metadata store {} has schema version {other}",
                    path.display()
                ))
                .detail(format!("this yunqi reads schema version {SCHEMA_VERSION}"))
                .hint("run the yunqi release that wrote this data directory, or a newer one"));
            }
        }
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            version: std::sync::atomic::AtomicU64::new(0),
        })
    }
}

impl IdentityStore for SqliteStore {
    fn load(&self) -> Result<IdentitySnapshot, Error> {
        let conn = self.conn.lock().expect("store lock");
        let mut snapshot = IdentitySnapshot::default();
        let mut stmt = conn
            .prepare("SELECT name, title, created_at FROM department ORDER BY name")
            .map_err(db_error)?;
        let rows = stmt
            .query_map([], |r| {
                let name: String = r.get(0)?;
                Ok(Department {
                    name: Name::parse("department", &name).map_err(|e| corrupt("department", e))?,
                    title: r.get(1)?,
                    created_at: from_micros(r.get(2)?),
                })
            })
            .map_err(db_error)?;
        for row in rows {
            snapshot.departments.push(row.map_err(db_error)?);
        }
        let mut stmt = conn
            .prepare(
                "SELECT name, role, department, id_number, display_name, created_at
                 FROM principal ORDER BY name",
            )
            .map_err(db_error)?;
        let rows = stmt
            .query_map([], |r| {
                let name: String = r.get(0)?;
                let role: String = r.get(1)?;
                let department: Option<String> = r.get(2)?;
                let id_number: Option<String> = r.get(3)?;
                Ok(Principal {
                    name: Name::parse("principal", &name).map_err(|e| corrupt("principal", e))?,
                    role: role.parse::<Role>().map_err(|e| corrupt("role", e))?,
                    department: department
                        .map(|d| Name::parse("department", &d))
                        .transpose()
                        .map_err(|e| corrupt("department", e))?,
                    id_number: id_number
                        .map(|n| NationalId::parse(&n))
                        .transpose()
                        .map_err(|e| corrupt("id number", e))?,
                    display_name: r.get(4)?,
                    created_at: from_micros(r.get(5)?),
                })
            })
            .map_err(db_error)?;
        for row in rows {
            snapshot.principals.push(row.map_err(db_error)?);
        }
        let mut stmt = conn
            .prepare(
                "SELECT id, principal, secret_hash, created_at, expires_at, revoked_at
                 FROM token ORDER BY created_at, id",
            )
            .map_err(db_error)?;
        let rows = stmt
            .query_map([], |r| {
                let principal: String = r.get(1)?;
                let hash: Vec<u8> = r.get(2)?;
                Ok(StoredToken {
                    info: TokenInfo {
                        id: r.get(0)?,
                        principal: Name::parse("principal", &principal)
                            .map_err(|e| corrupt("principal", e))?,
                        created_at: from_micros(r.get(3)?),
                        expires_at: r.get::<_, Option<i64>>(4)?.map(from_micros),
                        revoked_at: r.get::<_, Option<i64>>(5)?.map(from_micros),
                    },
                    secret_hash: hash.try_into().map_err(|_| {
                        rusqlite::Error::FromSqlConversionFailure(
                            2,
                            rusqlite::types::Type::Blob,
                            "token hash is not 32 bytes".into(),
                        )
                    })?,
                })
            })
            .map_err(db_error)?;
        for row in rows {
            snapshot.tokens.push(row.map_err(db_error)?);
        }
        let mut stmt = conn
            .prepare("SELECT record FROM grant_record ORDER BY id")
            .map_err(db_error)?;
        let rows = stmt
            .query_map([], |r| {
                let record: String = r.get(0)?;
                serde_json::from_str::<Grant>(&record).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        0,
                        rusqlite::types::Type::Text,
                        format!("grant record: {e}").into(),
                    )
                })
            })
            .map_err(db_error)?;
        for row in rows {
            snapshot.grants.push(row.map_err(db_error)?);
        }
        snapshot
            .grants
            .sort_by(|a, b| (a.requested_at, &a.id).cmp(&(b.requested_at, &b.id)));
        snapshot.version = self.version.load(std::sync::atomic::Ordering::SeqCst);
        Ok(snapshot)
    }

    fn apply(&self, _base: u64, changes: &[IdentityChange]) -> Result<u64, Error> {
        let mut conn = self.conn.lock().expect("store lock");
        let tx = conn.transaction().map_err(db_error)?;
        for change in changes {
            match change {
                IdentityChange::CreateDepartment(d) => tx.execute(
                    "INSERT INTO department (name, title, created_at) VALUES (?1, ?2, ?3)",
                    params![d.name.as_str(), d.title, micros(d.created_at)],
                ),
                IdentityChange::CreatePrincipal(p) => tx.execute(
                    "INSERT INTO principal (name, role, department, id_number, display_name, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        p.name.as_str(),
                        p.role.as_str(),
                        p.department.as_ref().map(Name::as_str),
                        p.id_number.as_ref().map(NationalId::as_str),
                        p.display_name,
                        micros(p.created_at)
                    ],
                ),
                IdentityChange::CreateToken(t) => tx.execute(
                    "INSERT INTO token (id, principal, secret_hash, created_at, expires_at, revoked_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, NULL)",
                    params![
                        t.info.id,
                        t.info.principal.as_str(),
                        &t.secret_hash[..],
                        micros(t.info.created_at),
                        t.info.expires_at.map(micros)
                    ],
                ),
                IdentityChange::RevokeToken { id, at } => {
                    let found: Option<String> = tx
                        .query_row("SELECT id FROM token WHERE id = ?1", [id], |r| r.get(0))
                        .optional()
                        .map_err(db_error)?;
                    if found.is_none() {
                        return Err(Error::not_found("token", id));
                    }
                    tx.execute(
                        "UPDATE token SET revoked_at = coalesce(revoked_at, ?2) WHERE id = ?1",
                        params![id, micros(*at)],
                    )
                }
                IdentityChange::PutGrant(g) => {
                    let record = serde_json::to_string(g)
                        .map_err(|e| Error::internal(format!("cannot encode grant: {e}")))?;
                    tx.execute(
                        "INSERT INTO grant_record (id, record) VALUES (?1, ?2)
                         ON CONFLICT (id) DO UPDATE SET record = excluded.record",
                        params![g.id, record],
                    )
                }
            }
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    Error::new(yunqi_types::ErrorCode::Conflict, format!("change conflicts with stored data: {e}"))
                }
                other => db_error(other),
            })?;
        }
        tx.commit().map_err(db_error)?;
        Ok(self
            .version
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    #[test]
    fn changes_survive_reopen_and_apply_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let store = SqliteStore::open(&path).unwrap();
        let dept = Department {
            name: Name::parse("department", "transport").unwrap(),
            title: "交通运输局".into(),
            created_at: t(0),
        };
        let alice = Principal {
            name: Name::parse("principal", "alice").unwrap(),
            role: Role::Steward,
            department: Some(dept.name.clone()),
            id_number: None,
            display_name: "Alice".into(),
            created_at: t(1),
        };
        let token = StoredToken {
            info: TokenInfo {
                id: "0011223344556677".into(),
                principal: alice.name.clone(),
                created_at: t(2),
                expires_at: Some(t(100)),
                revoked_at: None,
            },
            secret_hash: [7; 32],
        };
        store
            .apply(
                0,
                &[
                    IdentityChange::CreateDepartment(dept.clone()),
                    IdentityChange::CreatePrincipal(alice.clone()),
                    IdentityChange::CreateToken(token.clone()),
                ],
            )
            .unwrap();
        // A batch with a failing change writes nothing.
        let bob = Principal {
            name: Name::parse("principal", "bob").unwrap(),
            ..alice.clone()
        };
        let err = store
            .apply(
                0,
                &[
                    IdentityChange::CreatePrincipal(bob),
                    IdentityChange::CreateDepartment(dept.clone()),
                ],
            )
            .unwrap_err();
        assert_eq!(err.code, yunqi_types::ErrorCode::Conflict);
        store
            .apply(
                0,
                &[IdentityChange::RevokeToken {
                    id: token.info.id.clone(),
                    at: t(5),
                }],
            )
            .unwrap();
        drop(store);

        let loaded = SqliteStore::open(&path).unwrap().load().unwrap();
        assert_eq!(loaded.departments, vec![dept]);
        assert_eq!(loaded.principals, vec![alice]);
        assert_eq!(loaded.tokens.len(), 1);
        assert_eq!(loaded.tokens[0].info.revoked_at, Some(t(5)));
        assert_eq!(loaded.tokens[0].secret_hash, [7; 32]);
    }

    #[test]
    fn grants_are_written_whole_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let store = SqliteStore::open(&path).unwrap();
        let mut g = Grant {
            id: "g_0123456789ab".into(),
            dataset: "transport.vehicles".into(),
            owner: "transport".into(),
            grantee: "police".into(),
            requested_by: "wang".into(),
            requested_at: t(0),
            columns: vec!["plate".into(), "owner_id".into()],
            rows: Some("district = '西湖区'".into()),
            purpose: "非浙A急事通 checks".into(),
            expires_at: t(86_400),
            unmasked: vec!["plate".into()],
            unmasked_reason: Some("match plates".into()),
            status: yunqi_types::GrantStatus::Pending,
            decided_by: None,
            decided_at: None,
            reason: None,
            revoked_by: None,
            revoked_at: None,
        };
        store
            .apply(0, &[IdentityChange::PutGrant(Box::new(g.clone()))])
            .unwrap();
        g.status = yunqi_types::GrantStatus::Approved;
        g.decided_by = Some("li".into());
        store
            .apply(0, &[IdentityChange::PutGrant(Box::new(g.clone()))])
            .unwrap();
        drop(store);
        let loaded = SqliteStore::open(&path).unwrap().load().unwrap();
        assert_eq!(loaded.grants, vec![g]);
    }

    #[test]
    fn revoking_an_unknown_token_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("meta.db")).unwrap();
        let err = store
            .apply(
                0,
                &[IdentityChange::RevokeToken {
                    id: "nope".into(),
                    at: t(0),
                }],
            )
            .unwrap_err();
        assert_eq!(err.code, yunqi_types::ErrorCode::NotFound);
    }
}
