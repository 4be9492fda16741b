//! Leases and service definitions in PostgreSQL (`yunqi_lease`, `yunqi_service`), and secrets
//! every node must share (`yunqi_secret`: the city's document key).
//!
//! A lease row holds its holder, a fencing epoch raised by every acquisition and when it
//! expires, by the database's clock (`now()`), so that nodes' clocks need not agree. Taking
//! and renewing are single statements: two nodes racing for a lapsed lease cannot both win.

use std::sync::Arc;
use std::time::Duration;

use yunqi_store::{DefinitionStore, LeaseHolder, Leases, StoredDefinition};
use yunqi_types::{Error, ErrorCode};

use crate::{PgStore, pg_error};

/// The cluster's leases and service definitions, over a node's connection.
pub struct ClusterLeases {
    pg: Arc<PgStore>,
}

impl ClusterLeases {
    /// Leases and definitions in `pg`'s database, taken in the name of `pg`'s node.
    pub fn new(pg: Arc<PgStore>) -> ClusterLeases {
        ClusterLeases { pg }
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Leases for ClusterLeases {
    fn node(&self) -> &str {
        self.pg.node()
    }

    fn acquire(&self, lease: &str, ttl: Duration) -> Result<Result<u64, LeaseHolder>, Error> {
        let (name, node, ms) = (lease.to_string(), self.pg.node().to_string(), millis(ttl));
        let won = self.pg.run(Box::new(move |c| {
            Box::pin(async move {
                c.query_opt(
                    "INSERT INTO yunqi_lease AS l (name, holder, epoch, expires_at)
                     VALUES ($1, $2, 1, now() + make_interval(secs => $3::float8 / 1000.0))
                     ON CONFLICT (name) DO UPDATE
                       SET holder = EXCLUDED.holder, epoch = l.epoch + 1,
                           expires_at = EXCLUDED.expires_at
                       WHERE l.expires_at <= now() OR l.holder = EXCLUDED.holder
                     RETURNING epoch",
                    &[&name, &node, &ms],
                )
                .await
                .map_err(pg_error)
            })
        }))?;
        if let Some(row) = won {
            return Ok(Ok(row.get::<_, i64>(0) as u64));
        }
        // Lease rows are never deleted: the row the upsert did not win is there.
        match self.holder(lease)? {
            Some(h) => Ok(Err(h)),
            None => Err(Error::internal(format!("the lease {lease} vanished"))
                .hint("the cluster's database was changed by something other than yunqi")),
        }
    }

    fn renew(&self, lease: &str, epoch: u64, ttl: Duration) -> Result<bool, Error> {
        let (name, node, ms, epoch) = (
            lease.to_string(),
            self.pg.node().to_string(),
            millis(ttl),
            epoch as i64,
        );
        let n = self.pg.run(Box::new(move |c| {
            Box::pin(async move {
                c.execute(
                    "UPDATE yunqi_lease
                     SET expires_at = now() + make_interval(secs => $3::float8 / 1000.0)
                     WHERE name = $1 AND holder = $2 AND epoch = $4 AND expires_at > now()",
                    &[&name, &node, &ms, &epoch],
                )
                .await
                .map_err(pg_error)
            })
        }))?;
        Ok(n == 1)
    }

    fn release(&self, lease: &str, epoch: u64) -> Result<(), Error> {
        let (name, node, epoch) = (lease.to_string(), self.pg.node().to_string(), epoch as i64);
        self.pg.run(Box::new(move |c| {
            Box::pin(async move {
                c.execute(
                    "UPDATE yunqi_lease SET expires_at = now()
                     WHERE name = $1 AND holder = $2 AND epoch = $3",
                    &[&name, &node, &epoch],
                )
                .await
                .map_err(pg_error)
            })
        }))?;
        Ok(())
    }

    fn holder(&self, lease: &str) -> Result<Option<LeaseHolder>, Error> {
        let name = lease.to_string();
        let row = self.pg.run(Box::new(move |c| {
            Box::pin(async move {
                c.query_opt(
                    "SELECT l.holder, n.http, l.epoch, l.expires_at > now()
                     FROM yunqi_lease l LEFT JOIN yunqi_node n ON n.name = l.holder
                     WHERE l.name = $1",
                    &[&name],
                )
                .await
                .map_err(pg_error)
            })
        }))?;
        Ok(row.map(|r| LeaseHolder {
            node: r.get(0),
            http: r.get(1),
            epoch: r.get::<_, i64>(2) as u64,
            live: r.get(3),
        }))
    }
}

fn definition(r: &tokio_postgres::Row) -> StoredDefinition {
    StoredDefinition {
        service: r.get(0),
        version: r.get::<_, i32>(1) as u32,
        text: r.get(2),
    }
}

impl DefinitionStore for ClusterLeases {
    fn latest(&self) -> Result<Vec<StoredDefinition>, Error> {
        let rows = self.pg.run(Box::new(|c| {
            Box::pin(async move {
                c.query(
                    "SELECT DISTINCT ON (service) service, version, definition
                     FROM yunqi_service ORDER BY service, version DESC",
                    &[],
                )
                .await
                .map_err(pg_error)
            })
        }))?;
        Ok(rows.iter().map(definition).collect())
    }

    fn latest_of(&self, service: &str) -> Result<Option<StoredDefinition>, Error> {
        let name = service.to_string();
        let row = self.pg.run(Box::new(move |c| {
            Box::pin(async move {
                c.query_opt(
                    "SELECT service, version, definition FROM yunqi_service
                     WHERE service = $1 ORDER BY version DESC LIMIT 1",
                    &[&name],
                )
                .await
                .map_err(pg_error)
            })
        }))?;
        Ok(row.as_ref().map(definition))
    }

    fn put(&self, d: &StoredDefinition) -> Result<(), Error> {
        let (name, version, text) = (d.service.clone(), d.version as i32, d.text.clone());
        let n = self.pg.run(Box::new(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO yunqi_service (service, version, definition)
                     VALUES ($1, $2, $3) ON CONFLICT (service, version) DO NOTHING",
                    &[&name, &version, &text],
                )
                .await
                .map_err(pg_error)
            })
        }))?;
        if n == 0 {
            return Err(Error::new(
                ErrorCode::Conflict,
                format!(
                    "version {} of service {} was applied meanwhile on another node",
                    d.version, d.service
                ),
            )
            .hint("read the service's definition again, then apply yours as the next version"));
        }
        Ok(())
    }
}

impl PgStore {
    /// The secret named `name` every node shares: `candidate` if no node stored one yet
    /// (this node's, stored now), else the one stored first.
    pub fn shared_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>, Error> {
        let (name, value) = (name.to_string(), candidate.to_vec());
        self.run(Box::new(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO yunqi_secret (name, value) VALUES ($1, $2)
                     ON CONFLICT (name) DO NOTHING",
                    &[&name, &value],
                )
                .await
                .map_err(pg_error)?;
                let row = c
                    .query_one("SELECT value FROM yunqi_secret WHERE name = $1", &[&name])
                    .await
                    .map_err(pg_error)?;
                Ok(row.get::<_, Vec<u8>>(0))
            })
        }))
    }
}
