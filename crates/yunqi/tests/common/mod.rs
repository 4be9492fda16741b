//! Starts the real `yunqi` binary on ephemeral ports and talks to it over real HTTP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_yunqi");

pub struct Server {
    pub child: Child,
    pub url: String,
    /// `host:port` of the PostgreSQL endpoint.
    pub pg: String,
    pub data: PathBuf,
    pub admin_token: String,
    agent: ureq::Agent,
    /// With `YUNQI_TEST_CLUSTER=3`: the other nodes and the engines of a three-node cluster;
    /// requests go round-robin over the nodes.
    cluster: Option<Box<Cluster>>,
}

/// The rest of a cluster a test's [`Server`] stands for: its other nodes (dropped first) and
/// the engines they share.
struct Cluster {
    others: Vec<Server>,
    turn: std::sync::atomic::AtomicUsize,
    _dirs: Vec<tempfile::TempDir>,
    _engines: Engines,
}

/// A cluster's engines, the test's own: a PostgreSQL database, a NATS server and a SeaweedFS
/// server, prepared by `yunqi cluster init`.
pub struct Engines {
    pub nats: yunqi_stream_nats::server::NatsServer,
    pub weed: yunqi_store_s3::server::WeedServer,
    pub db: Database,
    args: Vec<String>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Engines {
    pub fn start(tag: &str) -> Engines {
        let db = Database::create(tag);
        let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
        let nats = yunqi_stream_nats::server::NatsServer::start(dirs[0].path());
        let weed = yunqi_store_s3::server::WeedServer::start(dirs[1].path(), "yunqi-suite");
        let args: Vec<String> = [
            "--postgres".to_string(),
            db.url(),
            "--nats".into(),
            nats.url(),
            "--object-store".into(),
            weed.url("city"),
            "--s3-endpoint".into(),
            weed.endpoint(),
        ]
        .into();
        let mut init = vec!["cluster", "init"];
        init.extend(args.iter().map(String::as_str));
        let (code, _, err) = yunqi(&init);
        assert_eq!(code, 0, "cluster init: {err}");
        Engines {
            nats,
            weed,
            db,
            args,
            _dirs: dirs,
        }
    }

    /// Starts node `name` on `data` over these engines.
    pub fn node(&self, data: &Path, name: &str) -> Server {
        let mut args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        args.extend(["--node", name]);
        Server::start_with(data, &args)
    }
}

/// Whether the suites run against a three-node cluster (`YUNQI_TEST_CLUSTER=3`) instead of
/// one embedded server.
pub fn clustered() -> bool {
    std::env::var("YUNQI_TEST_CLUSTER").is_ok_and(|v| v == "3")
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

impl Server {
    /// Starts a server on `data` and waits until it is ready; with `YUNQI_TEST_CLUSTER=3`, a
    /// cluster of three nodes (the first on `data`) over PostgreSQL, NATS JetStream and an S3
    /// server of the test's own, requests spread over the nodes.
    pub fn start(data: &Path) -> Server {
        if clustered() {
            return Server::start_cluster(data);
        }
        Server::start_with(data, &[])
    }

    fn start_cluster(data: &Path) -> Server {
        let engines = Engines::start("suite");
        let mut first = engines.node(data, "a");
        let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut others = vec![
            engines.node(dirs[0].path(), "b"),
            engines.node(dirs[1].path(), "c"),
        ];
        for o in others.iter_mut() {
            o.admin_token = first.admin_token.clone();
        }
        first.cluster = Some(Box::new(Cluster {
            others,
            turn: std::sync::atomic::AtomicUsize::new(0),
            _dirs: dirs,
            _engines: engines,
        }));
        first
    }

    /// The node the next request goes to: this one, or in a cluster each node in turn.
    fn next(&self) -> &Server {
        match &self.cluster {
            None => self,
            Some(c) => {
                let i = c.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    % (c.others.len() + 1);
                if i == 0 { self } else { &c.others[i - 1] }
            }
        }
    }

    /// The HTTP base URL of the node the next request goes to.
    pub fn next_url(&self) -> String {
        self.next().url.clone()
    }

    /// The PostgreSQL endpoint of the node the next session goes to.
    pub fn next_pg(&self) -> String {
        self.next().pg.clone()
    }

    /// Like [`Server::start`], with more arguments to `yunqi serve`.
    pub fn start_with(data: &Path, extra: &[&str]) -> Server {
        Server::launch(data, "serve", extra, "ready", 30).0
    }

    /// Starts `yunqi demo` on `data` (with `extra` arguments) and waits until the demo city is
    /// ready; returns the server and what it printed.
    pub fn start_demo(data: &Path, extra: &[&str]) -> (Server, Vec<String>) {
        Server::launch(data, "demo", extra, "demo city: ready", 300)
    }

    fn launch(
        data: &Path,
        command: &str,
        extra: &[&str],
        until: &str,
        wait_s: u64,
    ) -> (Server, Vec<String>) {
        let mut child = Command::new(BIN)
            .args([command, "--data"])
            .arg(data)
            .args(["--http", "127.0.0.1:0", "--pg", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start yunqi");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let deadline = Instant::now() + Duration::from_secs(wait_s);
        let mut url = None;
        let mut printed = Vec::new();
        for line in lines.by_ref() {
            let line = line.expect("read stdout");
            if let Some(rest) = line.trim().strip_prefix("API") {
                url = rest
                    .split_whitespace()
                    .next()
                    .map(|u| u.trim_end_matches("/api/v1/").to_string());
            }
            printed.push(line.clone());
            if line.starts_with(until) || Instant::now() > deadline {
                break;
            }
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let url = match url {
            Some(u) => u,
            None => {
                let out = child.wait_with_output().expect("wait");
                panic!(
                    "yunqi did not start: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        };
        // A cluster node that did not bootstrap the cluster has no admin token of its own.
        let admin_token = std::fs::read_to_string(data.join("admin.token"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let endpoints: Value = serde_json::from_str(
            &std::fs::read_to_string(data.join("endpoints.json")).expect("endpoints.json"),
        )
        .unwrap();
        let pg = endpoints["pg"].as_str().expect("pg endpoint").to_string();
        (
            Server {
                child,
                url,
                pg,
                data: data.to_path_buf(),
                admin_token,
                agent: agent(),
                cluster: None,
            },
            printed,
        )
    }

    pub fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, Value) {
        let node = self.next();
        call(&node.agent, &node.url, method, path, token, body)
    }

    pub fn admin(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        self.call(method, path, Some(&self.admin_token.clone()), body)
    }

    /// Creates a principal as admin; returns its token.
    pub fn principal(&self, name: &str, role: &str, dept: Option<&str>) -> String {
        let body = serde_json::json!({"name": name, "role": role, "department": dept}).to_string();
        let (status, v) = self.admin("POST", "/api/v1/principals", Some(&body));
        assert_eq!(status, 201, "{v}");
        v["token"]["token"].as_str().unwrap().to_string()
    }

    pub fn dept(&self, name: &str) {
        let (status, v) = self.admin(
            "POST",
            "/api/v1/departments",
            Some(&format!(r#"{{"name":"{name}"}}"#)),
        );
        assert_eq!(status, 201, "{v}");
    }

    /// All audit records (admin view), ascending; in a cluster, every node's records merged
    /// in time order (paged by `next_cursor`).
    pub fn audit_all(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut page = String::new();
        loop {
            let (status, v) = self.admin("GET", &format!("/api/v1/audit?limit=1000{page}"), None);
            assert_eq!(status, 200, "{v}");
            out.extend(v["records"].as_array().unwrap().iter().cloned());
            match (v["next"].as_u64(), v["next_cursor"].as_str()) {
                (Some(n), _) => page = format!("&after={n}"),
                (None, Some(c)) => page = format!("&cursor={c}"),
                (None, None) => return out,
            }
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        self.child.wait().expect("wait").code()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn call(
    agent: &ureq::Agent,
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    try_call(agent, base, method, path, token, body).expect("HTTP call")
}

/// A POST of a `length`-byte body of filler, written whole before the response is read. With
/// `length` one byte over the server's limit, the server has read everything when it answers
/// 413 and closes, so the answer is never lost to a connection reset (which a client still
/// streaming a larger body would race).
pub fn post_over_limit(base: &str, path: &str, token: &str, length: usize) -> (u16, Value) {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    stream.write_all(&vec![b' '; length]).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or(Value::String(body.to_string())),
    )
}

/// Like [`call`], but `None` when the server cannot be reached.
pub fn try_call(
    agent: &ureq::Agent,
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Option<(u16, Value)> {
    let url = format!("{base}{path}");
    let auth = token.map(|t| format!("Bearer {t}"));
    let result = match method {
        "GET" => {
            let mut r = agent.get(&url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        "DELETE" => {
            let mut r = agent.delete(&url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        "POST" => {
            let mut r = agent.post(&url).header("Content-Type", "application/json");
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            match body {
                Some(b) => r.send(b),
                None => r.send_empty(),
            }
        }
        "PUT" => {
            let mut r = agent.put(&url).header("Content-Type", "application/json");
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            match body {
                Some(b) => r.send(b),
                None => r.send_empty(),
            }
        }
        other => panic!("method {other}"),
    };
    let mut response = result.ok()?;
    let status = response.status().as_u16();
    let text = response
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .ok()?;
    Some((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

/// Runs the CLI with the server's URL and a token; returns (exit code, stdout, stderr).
pub fn cli(server: &Server, token: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("YUNQI_URL", server.next_url())
        .env("YUNQI_TOKEN", token)
        .output()
        .expect("run yunqi");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs one SQL text through psql against the server's pg endpoint; returns (exit code,
/// stdout, stderr). psql is installed by scripts/services.sh.
pub fn psql(
    server: &Server,
    user: &str,
    password: &str,
    database: &str,
    sql: &str,
) -> (i32, String, String) {
    let pg = server.next_pg();
    let (host, port) = pg.rsplit_once(':').unwrap();
    let out = std::process::Command::new("psql")
        .args([
            "-h",
            host,
            "-p",
            port,
            "-U",
            user,
            "-d",
            database,
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql is installed by scripts/services.sh");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the CLI with `input` on its standard input.
pub fn cli_with_input(
    server: &Server,
    token: &str,
    args: &[&str],
    input: &str,
) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(args)
        .env("YUNQI_URL", server.next_url())
        .env("YUNQI_TOKEN", token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run yunqi");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A tokio-postgres client logged in to the server's PostgreSQL endpoint.
pub async fn connect(
    server: &Server,
    user: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let pg = server.next_pg();
    let (host, port) = pg.rsplit_once(':').unwrap();
    let config = format!(
        "host={host} port={port} user={user} password={password} dbname=yunqi connect_timeout=10"
    );
    let (client, connection) = tokio_postgres::connect(&config, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// The seed of a randomised test: `YUNQI_TEST_SEED` to replay one, else from the clock.
pub fn test_seed() -> u64 {
    env_or(
        "YUNQI_TEST_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1,
    )
}

/// A number from the environment, or `default`.
pub fn env_or<T: std::str::FromStr>(var: &str, default: T) -> T {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Posts a service definition (TOML) as `token`.
pub fn post_toml(s: &Server, token: &str, body: &str) -> (u16, Value) {
    let mut r = agent()
        .post(format!("{}/api/v1/services", s.url))
        .header("Authorization", format!("Bearer {token}"))
        .header("Content-Type", "application/toml")
        .send(body)
        .expect("post definition");
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Creates a citizen principal as admin; returns its token.
pub fn citizen(s: &Server, name: &str, id_number: &str) -> String {
    let body = serde_json::json!({"name": name, "role": "citizen", "id_number": id_number});
    let (status, v) = s.admin("POST", "/api/v1/principals", Some(&body.to_string()));
    assert_eq!(status, 201, "{v}");
    v["token"]["token"].as_str().unwrap().to_string()
}

/// Creates `department.name` as its steward and imports `csv` into it.
pub fn dataset(s: &Server, steward: &str, department: &str, name: &str, csv: &str) {
    let body = serde_json::json!({"department": department, "name": name}).to_string();
    let (status, v) = s.call("POST", "/api/v1/datasets", Some(steward), Some(&body));
    assert_eq!(status, 201, "{v}");
    let path = format!("/api/v1/datasets/{department}/{name}/import");
    let (status, v) = s.call("POST", &path, Some(steward), Some(csv));
    assert_eq!(status, 200, "{v}");
}

/// Asks for a grant (`request` as the JSON of `POST /api/v1/grants`) and has the owner's
/// steward approve it.
pub fn grant(s: &Server, requester: &str, owner: &str, request: &Value) -> String {
    let (status, g) = s.call(
        "POST",
        "/api/v1/grants",
        Some(requester),
        Some(&request.to_string()),
    );
    assert_eq!(status, 201, "{g}");
    let id = g["id"].as_str().unwrap().to_string();
    let (status, v) = s.call(
        "POST",
        &format!("/api/v1/grants/{id}/approve"),
        Some(owner),
        None,
    );
    assert_eq!(status, 200, "{v}");
    id
}

/// The streams and continuous view of the urgent entry permit: the zone's load it reads, and
/// the violations that cancel permits.
pub fn permit_streams(s: &Server, steward: &str) {
    for q in [
        "CREATE STREAM traffic.violations (plate TEXT, kind TEXT, ts TIMESTAMP) WITH (event_time = 'ts', watermark = '1 second')",
        "CREATE STREAM traffic.zone_detections (plate TEXT, ts TIMESTAMP) WITH (event_time = 'ts', watermark = '1 second')",
        "CREATE CONTINUOUS VIEW traffic.zone_load_1m AS SELECT window_start, window_end, count(*) AS vehicles FROM TUMBLE(traffic.zone_detections, ts, INTERVAL '1' MINUTE) GROUP BY window_start, window_end",
    ] {
        let body = serde_json::json!({ "sql": q }).to_string();
        let (status, v) = s.call("POST", "/api/v1/sql", Some(steward), Some(&body));
        assert_eq!(status, 200, "{v}");
    }
}

/// A database of its own on the local PostgreSQL, dropped at the end.
pub struct Database {
    pub name: String,
}

pub const ADMIN_URL: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=10";

/// Runs `sql` on the database at `url` (on a thread of its own, so that async tests may call it).
pub fn run_sql(url: &str, sql: &str) {
    let (url, sql) = (url.to_string(), sql.to_string());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("PostgreSQL on 127.0.0.1:5432 (scripts/services.sh starts it)");
            tokio::spawn(conn);
            client.batch_execute(&sql).await.expect(&sql);
        });
    })
    .join()
    .expect("the SQL thread");
}

pub fn admin_sql(sql: &str) {
    run_sql(ADMIN_URL, sql);
}

impl Database {
    pub fn create(tag: &str) -> Database {
        let name = format!(
            "yunqi_test_{tag}_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        admin_sql(&format!("CREATE DATABASE {name}"));
        Database { name }
    }

    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:5432/{}", self.name)
    }

    pub fn sql(&self, sql: &str) {
        run_sql(&self.url(), sql);
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        admin_sql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

/// Runs the yunqi binary with `args`: (exit code, stdout, stderr).
pub fn yunqi(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run yunqi");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts a cluster node `name` on `data` over the database at `postgres`, its streams in the
/// NATS server at `nats` when given.
pub fn cluster_node(data: &Path, postgres: &str, nats: Option<&str>, name: &str) -> Server {
    let mut args = vec!["--postgres", postgres, "--node", name];
    if let Some(n) = nats {
        args.extend(["--nats", n]);
    }
    Server::start_with(data, &args)
}

/// Prepares the engines and starts nodes `a`, `b` and `c` on `dirs`, streams in NATS; every
/// node's `admin_token` is the bootstrapping node's.
pub fn three_nodes(db: &Database, nats: &str, dirs: &[tempfile::TempDir]) -> Vec<Server> {
    let (code, _, err) = cluster_cli("init", &db.url(), nats, &[]);
    assert_eq!(code, 0, "{err}");
    let mut nodes: Vec<Server> = ["a", "b", "c"]
        .iter()
        .zip(dirs)
        .map(|(n, d)| cluster_node(d.path(), &db.url(), Some(nats), n))
        .collect();
    let admin = nodes[0].admin_token.clone();
    for n in nodes.iter_mut() {
        n.admin_token = admin.clone();
    }
    nodes
}

/// `yunqi cluster COMMAND --postgres POSTGRES --nats NATS EXTRA…`: (exit code, stdout, stderr).
pub fn cluster_cli(
    command: &str,
    postgres: &str,
    nats: &str,
    extra: &[&str],
) -> (i32, String, String) {
    let mut args = vec!["cluster", command, "--postgres", postgres, "--nats", nats];
    args.extend_from_slice(extra);
    yunqi(&args)
}
