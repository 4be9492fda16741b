//! Dataset manifests shared by the nodes (`yunqi_dataset`), for clusters whose datasets' files
//! live in object storage.
//!
//! Every commit is one transaction that raises the one head revision (`yunqi_dataset_head`,
//! whose row lock orders the commits, so revisions become visible in order and a node that has
//! read up to revision r has seen every commit up to r) and writes the manifest only if its
//! stored revision is still the one the writer read (compare-and-set).
//!
//! Writes to one dataset are also serialised across the nodes by a session-level advisory
//! lock, held on a connection of its own for as long as the write lasts: a node that dies
//! loses its connection, and the lock with it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use yunqi_datasets::{Manifest, SharedManifests};
use yunqi_types::{Error, ErrorCode};

use crate::{PgStore, block_on, connect, pg_error};

/// Longest a write waits for another node's write to the same dataset.
const LOCK_WAIT: Duration = Duration::from_secs(60);

/// Keeps advisory locks apart from yunqi's other ones.
const LOCK_SEED: i64 = 0x7975_6e71_6964;

/// The cluster's dataset manifests in PostgreSQL.
pub struct ClusterManifests {
    pg: Arc<PgStore>,
}

impl ClusterManifests {
    /// Manifests in `pg`'s database.
    pub fn new(pg: Arc<PgStore>) -> ClusterManifests {
        ClusterManifests { pg }
    }
}

fn parse(text: &str) -> Result<Manifest, Error> {
    serde_json::from_str(text).map_err(|e| {
        tracing::error!(error = %e, "a shared dataset manifest is unreadable");
        Error::internal("a shared dataset manifest is unreadable")
            .hint("the cluster's database was changed by something other than yunqi")
    })
}

/// Holds an advisory lock: dropping the client ends its session, which releases it.
struct Held(#[allow(dead_code)] tokio_postgres::Client);

impl SharedManifests for ClusterManifests {
    fn since(&self, since: u64) -> Result<(Vec<(Manifest, u64)>, u64), Error> {
        let from = since as i64;
        let (rows, head) = self.pg.run(Box::new(move |c| {
            Box::pin(async move {
                let head: i64 = c
                    .query_one("SELECT revision FROM yunqi_dataset_head WHERE id = 1", &[])
                    .await
                    .map_err(pg_error)?
                    .get(0);
                if head <= from {
                    return Ok((Vec::new(), head));
                }
                let rows = c
                    .query(
                        "SELECT manifest::text, revision FROM yunqi_dataset
                         WHERE revision > $1 ORDER BY revision",
                        &[&from],
                    )
                    .await
                    .map_err(pg_error)?;
                let rows: Vec<(String, i64)> =
                    rows.into_iter().map(|r| (r.get(0), r.get(1))).collect();
                Ok((rows, head))
            })
        }))?;
        let mut top = head.max(from) as u64;
        let mut out = Vec::with_capacity(rows.len());
        for (text, revision) in rows {
            top = top.max(revision as u64);
            out.push((parse(&text)?, revision as u64));
        }
        Ok((out, top))
    }

    fn commit(&self, m: &Manifest, expected: Option<u64>) -> Result<u64, Error> {
        let name = m.sql_name();
        let text = serde_json::to_string(m).map_err(|e| Error::internal(e.to_string()))?;
        let expected = expected.map(|e| e as i64);
        let revision = self.pg.run(Box::new(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await.map_err(pg_error)?;
                let revision: i64 = tx
                    .query_one(
                        "UPDATE yunqi_dataset_head SET revision = revision + 1 WHERE id = 1
                         RETURNING revision",
                        &[],
                    )
                    .await
                    .map_err(pg_error)?
                    .get(0);
                let written = match expected {
                    None => tx
                        .execute(
                            "INSERT INTO yunqi_dataset (sql_name, revision, manifest)
                             VALUES ($1, $2, $3::text::jsonb) ON CONFLICT (sql_name) DO NOTHING",
                            &[&name, &revision, &text],
                        )
                        .await
                        .map_err(pg_error)?,
                    Some(e) => tx
                        .execute(
                            "UPDATE yunqi_dataset
                             SET revision = $2, manifest = $3::text::jsonb, updated_at = now()
                             WHERE sql_name = $1 AND revision = $4",
                            &[&name, &revision, &text, &e],
                        )
                        .await
                        .map_err(pg_error)?,
                };
                if written == 0 {
                    // Dropping the transaction rolls it back.
                    return Ok(None);
                }
                tx.commit().await.map_err(pg_error)?;
                Ok(Some(revision))
            })
        }))?;
        revision.map(|r| r as u64).ok_or_else(|| {
            Error::new(
                ErrorCode::Conflict,
                format!("dataset {} was changed meanwhile", m.sql_name()),
            )
        })
    }

    fn lock(&self, sql_name: &str) -> Result<Box<dyn Send>, Error> {
        let config = self.pg.config.clone();
        let key = sql_name.to_string();
        let client = block_on(self.pg.rt(), async move {
            let client = connect(&config).await?;
            let deadline = Instant::now() + LOCK_WAIT;
            loop {
                let held: bool = client
                    .query_one(
                        "SELECT pg_try_advisory_lock(hashtextextended($1, $2))",
                        &[&key, &LOCK_SEED],
                    )
                    .await
                    .map_err(pg_error)?
                    .get(0);
                if held {
                    return Ok(client);
                }
                if Instant::now() > deadline {
                    return Err(Error::unavailable(format!(
                        "dataset {key} is being written on another node"
                    ))
                    .detail(format!(
                        "waited {} s for that write to finish",
                        LOCK_WAIT.as_secs()
                    ))
                    .hint("retry once the other import is done"));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })?;
        Ok(Box::new(Held(client)))
    }
}
