//! Signed cluster checkpoints of the nodes' audit chains (`yunqi_audit_checkpoint`): every few
//! seconds one node chains every node's head into the next checkpoint (see
//! `yunqi_audit::cluster`). Checkpoints are made under a transaction-level advisory lock, so
//! the nodes that try at once make one, and a node skips its turn when another node's
//! checkpoint is recent or nothing was appended since.

use std::sync::Arc;
use std::time::Duration;

use yunqi_audit::cluster::ClusterCheckpoint;
use yunqi_types::Error;

use crate::{PgStore, block_on, connect, parse_url, pg_error, runtime};

/// Keeps the checkpoint lock apart from yunqi's other advisory locks.
const CHECKPOINT_LOCK: i64 = 0x7975_6e71_6900_0002;

/// Makes the next checkpoint from the last one (`None` to skip this turn).
pub type MakeCheckpoint =
    Box<dyn FnOnce(Option<&ClusterCheckpoint>) -> Option<ClusterCheckpoint> + Send>;

/// The cluster's audit checkpoints in PostgreSQL.
pub struct ClusterCheckpoints {
    pg: Arc<PgStore>,
}

fn parse(text: &str) -> Result<ClusterCheckpoint, Error> {
    serde_json::from_str(text).map_err(|e| {
        Error::internal("a cluster audit checkpoint is unreadable")
            .detail(e.to_string())
            .hint("the cluster's database was changed by something other than yunqi")
    })
}

impl ClusterCheckpoints {
    /// Checkpoints in `pg`'s database.
    pub fn new(pg: Arc<PgStore>) -> ClusterCheckpoints {
        ClusterCheckpoints { pg }
    }

    /// Unless another checkpoint was made less than `every` ago, makes the next one with
    /// `make` and stores it; returns it when one was stored.
    pub fn commit(
        &self,
        every: Duration,
        make: MakeCheckpoint,
    ) -> Result<Option<ClusterCheckpoint>, Error> {
        let every_ms = every.as_millis() as i64;
        self.pg.run(Box::new(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await.map_err(pg_error)?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CHECKPOINT_LOCK])
                    .await
                    .map_err(pg_error)?;
                let last = tx
                    .query_opt(
                        "SELECT checkpoint::text,
                                made_at > now() - make_interval(secs => $1::float8 / 1000)
                         FROM yunqi_audit_checkpoint ORDER BY id DESC LIMIT 1",
                        &[&(every_ms as f64)],
                    )
                    .await
                    .map_err(pg_error)?;
                let prev = match &last {
                    Some(row) => {
                        if row.get::<_, bool>(1) {
                            return Ok(None);
                        }
                        Some(parse(row.get(0))?)
                    }
                    None => None,
                };
                let Some(next) = make(prev.as_ref()) else {
                    return Ok(None);
                };
                let text = serde_json::to_string(&next)
                    .map_err(|e| Error::internal(format!("encode a checkpoint: {e}")))?;
                tx.execute(
                    "INSERT INTO yunqi_audit_checkpoint (id, made_by, checkpoint)
                     VALUES ($1, $2, $3::text::jsonb)",
                    &[&(next.id as i64), &next.by, &text],
                )
                .await
                .map_err(pg_error)?;
                tx.commit().await.map_err(pg_error)?;
                Ok(Some(next))
            })
        }))
    }
}

/// The last checkpoint in the database at `url`: what `yunqi cluster status` shows.
pub fn last_checkpoint(url: &str) -> Result<Option<ClusterCheckpoint>, Error> {
    let config = parse_url(url)?;
    let rt = runtime()?;
    let row = block_on(&rt, async move {
        let client = connect(&config).await?;
        Ok(client
            .query_opt(
                "SELECT checkpoint::text FROM yunqi_audit_checkpoint ORDER BY id DESC LIMIT 1",
                &[],
            )
            .await
            .map_err(pg_error)?
            .map(|r| r.get::<_, String>(0)))
    });
    rt.shutdown_background();
    row?.as_deref().map(parse).transpose()
}

/// Every checkpoint in the database at `url`, in order: what `yunqi audit verify --cluster`
/// reads.
pub fn read_checkpoints(url: &str) -> Result<Vec<ClusterCheckpoint>, Error> {
    let config = parse_url(url)?;
    let rt = runtime()?;
    let rows = block_on(&rt, async move {
        let client = connect(&config).await?;
        let rows = client
            .query(
                "SELECT checkpoint::text FROM yunqi_audit_checkpoint ORDER BY id",
                &[],
            )
            .await
            .map_err(pg_error)?;
        Ok(rows
            .into_iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>())
    });
    rt.shutdown_background();
    rows?.iter().map(|t| parse(t)).collect()
}
