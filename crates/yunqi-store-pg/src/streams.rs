//! Stream declarations shared by the nodes (`yunqi_stream`), for clusters whose streams' events
//! live in NATS JetStream: a stream declared on one node takes events on every node.
//!
//! NGSI-LD entity streams stay declared on the node that declared them (in its data
//! directory), as their entity writer runs there: two nodes writing merged entity states to
//! one log would lose each other's updates. Names are unique across both.
//!
//! Declarations never change once made, so a node caches each it has read.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use yunqi_datasets::{StreamCatalog, StreamDeclarations, StreamManifest};
use yunqi_types::Error;

use crate::{PgStore, pg_error};

/// The cluster's stream catalog: shared declarations in PostgreSQL, NGSI-LD ones in the node's
/// own catalog.
pub struct ClusterStreams {
    pg: Arc<PgStore>,
    local: StreamCatalog,
    cache: RwLock<BTreeMap<String, StreamManifest>>,
}

fn exists(name: &str) -> Error {
    Error::already_exists("stream", name)
        .hint("pick another name, or send events to the existing stream")
}

fn parse(v: String) -> Result<StreamManifest, Error> {
    serde_json::from_str(&v).map_err(|e| {
        tracing::error!(error = %e, "a shared stream declaration is unreadable");
        Error::internal("a shared stream declaration is unreadable")
            .hint("the cluster's database was changed by something other than yunqi")
    })
}

impl ClusterStreams {
    /// Shared declarations in `pg`'s database, NGSI-LD ones in `local`.
    pub fn new(pg: Arc<PgStore>, local: StreamCatalog) -> ClusterStreams {
        ClusterStreams {
            pg,
            local,
            cache: RwLock::new(BTreeMap::new()),
        }
    }

    fn shared(&self, sql_name: &str) -> Result<Option<StreamManifest>, Error> {
        if let Some(m) = self.cache.read().expect("cache lock").get(sql_name) {
            return Ok(Some(m.clone()));
        }
        let name = sql_name.to_string();
        let row = self.pg.run(Box::new(move |c| {
            Box::pin(async move {
                c.query_opt(
                    "SELECT manifest::text FROM yunqi_stream WHERE sql_name = $1",
                    &[&name],
                )
                .await
                .map_err(pg_error)
            })
        }))?;
        let Some(row) = row else { return Ok(None) };
        let m = parse(row.get(0))?;
        self.cache
            .write()
            .expect("cache lock")
            .insert(sql_name.to_string(), m.clone());
        Ok(Some(m))
    }

    fn all_shared(&self) -> Result<Vec<StreamManifest>, Error> {
        let rows = self.pg.run(Box::new(|c| {
            Box::pin(async move {
                c.query(
                    "SELECT manifest::text FROM yunqi_stream ORDER BY sql_name",
                    &[],
                )
                .await
                .map_err(pg_error)
            })
        }))?;
        let all = rows
            .into_iter()
            .map(|r| parse(r.get(0)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut cache = self.cache.write().expect("cache lock");
        for m in &all {
            cache.insert(m.sql_name(), m.clone());
        }
        Ok(all)
    }
}

impl StreamDeclarations for ClusterStreams {
    fn create(&self, m: StreamManifest) -> Result<StreamManifest, Error> {
        m.check()?;
        let name = m.sql_name();
        if m.ngsi_type.is_some() {
            if self.shared(&name)?.is_some() {
                return Err(exists(&name));
            }
            return self.local.create(m);
        }
        if self.local.get(&name).is_ok() {
            return Err(exists(&name));
        }
        let value = serde_json::to_string(&m).map_err(|e| Error::internal(e.to_string()))?;
        let key = name.clone();
        let inserted = self.pg.run(Box::new(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO yunqi_stream (sql_name, manifest) VALUES ($1, $2::text::jsonb)
                     ON CONFLICT (sql_name) DO NOTHING",
                    &[&key, &value],
                )
                .await
                .map_err(pg_error)
            })
        }))?;
        if inserted == 0 {
            return Err(exists(&name));
        }
        self.cache
            .write()
            .expect("cache lock")
            .insert(name, m.clone());
        Ok(m)
    }

    fn get(&self, sql_name: &str) -> Result<StreamManifest, Error> {
        if let Ok(m) = self.local.get(sql_name) {
            return Ok(m);
        }
        match self.shared(sql_name) {
            Ok(Some(m)) => Ok(m),
            Ok(None) => {
                let names: Vec<String> = self.list().iter().map(|m| m.sql_name()).collect();
                Err(yunqi_datasets::streams::not_found(
                    sql_name,
                    names.iter().map(String::as_str),
                ))
            }
            Err(e) => Err(e),
        }
    }

    fn list(&self) -> Vec<StreamManifest> {
        let mut all: BTreeMap<String, StreamManifest> = match self.all_shared() {
            Ok(v) => v.into_iter().map(|m| (m.sql_name(), m)).collect(),
            // Unreachable: what this node has read before.
            Err(_) => self.cache.read().expect("cache lock").clone(),
        };
        for m in self.local.list() {
            all.insert(m.sql_name(), m);
        }
        all.into_values().collect()
    }
}
