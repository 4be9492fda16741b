//! `yunqi.toml`: what `yunqi serve --config FILE` reads. Flags and environment variables
//! override it; what neither sets takes the defaults documented in docs/configuration.md.
//!
//! ```toml
//! [server]
//! data = "/var/lib/yunqi"
//! http = "0.0.0.0:7700"
//! pg = "0.0.0.0:7432"
//!
//! [limits]
//! query_timeout_ms = 10000
//!
//! [cluster]
//! node = "node-a"
//! postgres = "postgresql://db.city.example:5432/yunqi"
//! nats = "nats://nats-1.city.example:4222,nats://nats-2.city.example:4222"
//! object_store = "s3://city-yunqi/prod"
//! s3_endpoint = "http://s3.city.example:8333"
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use yunqi_types::Limits;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listen addresses and the data directory.
    #[serde(default)]
    pub server: ServerSection,
    /// Every limit of the platform, by name.
    #[serde(default)]
    pub limits: Limits,
    /// Cluster mode; absent: embedded.
    pub cluster: Option<ClusterSection>,
}

/// `[server]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Data directory.
    pub data: Option<PathBuf>,
    /// HTTP address.
    pub http: Option<String>,
    /// PostgreSQL wire protocol address.
    pub pg: Option<String>,
}

/// `[cluster]`: the shared engines and this node's place among the nodes.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// This node's name, unique in the cluster (default: the host name and HTTP port).
    pub node: Option<String>,
    /// The PostgreSQL database every node shares.
    pub postgres: Option<String>,
    /// How often a node confirms it is current (milliseconds).
    pub heartbeat_ms: u64,
    /// How long a node serves after its last confirmation (milliseconds); also the longest a
    /// revocation waits for a node that does not confirm it.
    pub lease_ms: u64,
    /// NATS servers with JetStream (comma separated) for the streams' events; absent: each
    /// node keeps its streams in its data directory.
    pub nats: Option<String>,
    /// Prefix of yunqi's JetStream streams and buckets: one per cluster on a NATS system.
    pub nats_prefix: String,
    /// Replicas of each JetStream stream (3 on a JetStream cluster).
    pub nats_replicas: usize,
    /// `s3://bucket/prefix` for the datasets' files; absent: each node keeps its datasets in
    /// its data directory. Credentials come from `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` (anonymous requests without them).
    pub object_store: Option<String>,
    /// The S3 endpoint (`http://host:port` for a server other than AWS).
    pub s3_endpoint: Option<String>,
    /// The S3 region.
    pub s3_region: String,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            node: None,
            postgres: None,
            heartbeat_ms: 250,
            lease_ms: 2_000,
            nats: None,
            nats_prefix: "yunqi".into(),
            nats_replicas: 1,
            object_store: None,
            s3_endpoint: None,
            s3_region: "us-east-1".into(),
        }
    }
}

/// Cluster mode, resolved.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// This node's name.
    pub node: Option<String>,
    /// The PostgreSQL URL.
    pub postgres: String,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Lease.
    pub lease: Duration,
    /// The stream log on NATS JetStream, when configured.
    pub nats: Option<yunqi_stream_nats::NatsConfig>,
    /// The datasets' files in object storage, when configured.
    pub objects: Option<yunqi_store_s3::S3Config>,
}

impl Config {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Parses and checks a configuration.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "{}\nhint: docs/configuration.md lists every section and key",
                e.to_string().trim_end()
            )
        })?;
        check_limits(&config.limits)?;
        if let Some(c) = &config.cluster {
            check_cluster(c)?;
        }
        Ok(config)
    }

    /// The cluster section with flags applied: `node`, `postgres` and `nats` override the
    /// file's.
    pub fn cluster(
        &self,
        node: Option<&str>,
        postgres: Option<&str>,
        nats: Option<&str>,
    ) -> anyhow::Result<Option<Cluster>> {
        let section = match (&self.cluster, postgres) {
            (None, None) => {
                if node.is_some() || nats.is_some() {
                    bail!(
                        "--node and --nats belong to a cluster, but no cluster is configured\nhint: add --postgres URL or a [cluster] section with postgres = \"URL\""
                    );
                }
                return Ok(None);
            }
            (Some(c), _) => c.clone(),
            (None, Some(_)) => ClusterSection::default(),
        };
        let Some(postgres) = postgres
            .map(str::to_string)
            .or_else(|| section.postgres.clone())
        else {
            bail!(
                "[cluster] needs postgres = \"URL\", the database the nodes share\nhint: e.g. postgres = \"postgresql://127.0.0.1:5432/yunqi\""
            );
        };
        let node = node.map(str::to_string).or(section.node.clone());
        if let Some(n) = &node {
            check_node_name(n)?;
        }
        let nats = nats
            .map(str::to_string)
            .or(section.nats.clone())
            .map(|urls| yunqi_stream_nats::NatsConfig {
                urls,
                prefix: section.nats_prefix.clone(),
                replicas: section.nats_replicas,
                ..Default::default()
            });
        Ok(Some(Cluster {
            node,
            postgres,
            heartbeat: Duration::from_millis(section.heartbeat_ms),
            lease: Duration::from_millis(section.lease_ms),
            nats,
            objects: section
                .object_store
                .clone()
                .map(|url| yunqi_store_s3::S3Config {
                    url,
                    endpoint: section.s3_endpoint.clone(),
                    region: section.s3_region.clone(),
                }),
        }))
    }
}

/// A node name: 1 to 63 of a-z, 0-9, - and _, starting with a letter or digit.
pub fn check_node_name(n: &str) -> anyhow::Result<()> {
    let ok = !n.is_empty()
        && n.len() <= 63
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && n.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !ok {
        bail!("node name {n:?} is not valid\nhint: use 1 to 63 of a-z, 0-9, - and _, e.g. node-a");
    }
    Ok(())
}

fn check_cluster(c: &ClusterSection) -> anyhow::Result<()> {
    if c.heartbeat_ms == 0 || c.lease_ms == 0 {
        bail!("[cluster] heartbeat_ms and lease_ms are at least 1");
    }
    if c.lease_ms < 2 * c.heartbeat_ms {
        bail!(
            "[cluster] lease_ms ({}) must be at least twice heartbeat_ms ({}), or a node that misses one heartbeat stops serving\nhint: the defaults are heartbeat_ms = 250 and lease_ms = 2000",
            c.lease_ms,
            c.heartbeat_ms
        );
    }
    if !(1..=5).contains(&c.nats_replicas) {
        bail!(
            "[cluster] nats_replicas = {} is not allowed: JetStream keeps 1 to 5 replicas\nhint: 1 on a single NATS server, 3 on a JetStream cluster",
            c.nats_replicas
        );
    }
    Ok(())
}

/// Every limit is a positive number.
fn check_limits(limits: &Limits) -> anyhow::Result<()> {
    let v = serde_json::to_value(limits)?;
    for (name, value) in v.as_object().into_iter().flatten() {
        if value.as_u64() == Some(0) {
            bail!(
                "[limits] {name} = 0 is not allowed: every limit is at least 1\nhint: remove the key to use its default ({})",
                serde_json::to_value(Limits::default())?[name]
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_the_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.limits, Limits::default());
        assert!(c.cluster.is_none());
        assert!(c.cluster(None, None, None).unwrap().is_none());
    }

    #[test]
    fn limits_are_set_by_name_and_typos_are_refused() {
        let c = Config::parse("[limits]\nquery_timeout_ms = 5000\n").unwrap();
        assert_eq!(c.limits.query_timeout_ms, 5000);
        assert_eq!(
            c.limits.sql_result_rows_max,
            Limits::default().sql_result_rows_max
        );
        let e = Config::parse("[limits]\nquery_timeout = 5000\n").unwrap_err();
        assert!(format!("{e:#}").contains("query_timeout"), "{e:#}");
        let e = Config::parse("[limits]\nquery_timeout_ms = 0\n").unwrap_err();
        assert!(format!("{e:#}").contains("at least 1"), "{e:#}");
        let e = Config::parse("[serverr]\n").unwrap_err();
        assert!(format!("{e:#}").contains("serverr"), "{e:#}");
    }

    #[test]
    fn flags_override_the_cluster_section() {
        let c = Config::parse(
            "[cluster]\nnode = \"node-a\"\npostgres = \"postgresql://db/yunqi\"\nlease_ms = 3000\n",
        )
        .unwrap();
        let k = c.cluster(Some("node-b"), None, None).unwrap().unwrap();
        assert_eq!(k.node.as_deref(), Some("node-b"));
        assert_eq!(k.postgres, "postgresql://db/yunqi");
        assert_eq!(k.lease, Duration::from_millis(3000));
        assert_eq!(k.heartbeat, Duration::from_millis(250));
        let k = Config::default()
            .cluster(None, Some("postgresql://x/y"), None)
            .unwrap()
            .unwrap();
        assert_eq!(k.postgres, "postgresql://x/y");
        assert!(Config::default().cluster(Some("n1"), None, None).is_err());
        assert!(
            Config::parse("[cluster]\nnode = \"a\"\n")
                .unwrap()
                .cluster(None, None, None)
                .is_err()
        );
        assert!(Config::parse("[cluster]\npostgres = \"p\"\nheartbeat_ms = 2000\n").is_err());
        assert!(check_node_name("Node A").is_err());
        assert!(k.nats.is_none());
        let c = Config::parse(
            "[cluster]\npostgres = \"p\"\nnats = \"nats://a:4222\"\nnats_prefix = \"city\"\nnats_replicas = 3\n",
        )
        .unwrap();
        let n = c.cluster(None, None, None).unwrap().unwrap().nats.unwrap();
        assert_eq!(
            (n.urls.as_str(), n.prefix.as_str(), n.replicas),
            ("nats://a:4222", "city", 3)
        );
        let n = c
            .cluster(None, None, Some("nats://b:4222"))
            .unwrap()
            .unwrap()
            .nats
            .unwrap();
        assert_eq!(
            (n.urls.as_str(), n.prefix.as_str()),
            ("nats://b:4222", "city")
        );
        assert!(
            Config::default()
                .cluster(None, None, Some("nats://b"))
                .is_err()
        );
        assert!(Config::parse("[cluster]\npostgres = \"p\"\nnats_replicas = 0\n").is_err());
    }

    /// docs/configuration.md names every limit with its default: a new limit must be documented.
    #[test]
    fn every_limit_is_documented_with_its_default() {
        let doc = include_str!("../../../docs/configuration.md");
        let defaults = serde_json::to_value(Limits::default()).unwrap();
        for (name, value) in defaults.as_object().unwrap() {
            let row = doc
                .lines()
                .find(|l| l.starts_with(&format!("| `{name}` ")))
                .unwrap_or_else(|| panic!("docs/configuration.md does not list {name}"));
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            assert_eq!(
                cells[2].replace('_', ""),
                value.to_string(),
                "docs/configuration.md gives another default for {name}"
            );
        }
    }
}
