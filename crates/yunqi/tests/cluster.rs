//! Cluster mode over the PostgreSQL server on this machine (started by scripts/services.sh):
//! nodes share departments, principals, tokens and grants; a revocation on one node is refused
//! by every node before the revoke call returns, a stopped node included; the schema is
//! versioned and checked.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{BIN, Server, connect};

/// A database of its own on the local PostgreSQL, dropped at the end.
struct Database {
    name: String,
}

const ADMIN_URL: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=10";

/// Runs `sql` on the database at `url`.
fn run_sql(url: &str, sql: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("PostgreSQL on 127.0.0.1:5432 (scripts/services.sh starts it)");
        tokio::spawn(conn);
        client.batch_execute(sql).await.expect(sql);
    });
}

fn admin_sql(sql: &str) {
    run_sql(ADMIN_URL, sql);
}

impl Database {
    fn create(tag: &str) -> Database {
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

    fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:5432/{}", self.name)
    }

    fn sql(&self, sql: &str) {
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

fn yunqi(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run yunqi");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn node(data: &std::path::Path, db: &Database, name: &str) -> Server {
    Server::start_with(data, &["--postgres", &db.url(), "--node", name])
}

/// Starts a node that must refuse to start; returns what it said.
fn refused(data: &std::path::Path, url: &str, name: &str) -> String {
    let (code, _, err) = yunqi(&[
        "serve",
        "--data",
        data.to_str().unwrap(),
        "--http",
        "127.0.0.1:0",
        "--pg",
        "127.0.0.1:0",
        "--postgres",
        url,
        "--node",
        name,
    ]);
    assert_ne!(code, 0, "the node started: {err}");
    err
}

#[test]
fn nodes_share_identities_and_a_revocation_holds_on_every_node_before_it_returns() {
    let db = Database::create("share");
    let url = db.url();
    // A database without the schema is refused, saying what to run.
    let dir_a = tempfile::tempdir().unwrap();
    let err = refused(dir_a.path(), &url, "a");
    assert!(err.contains("yunqi cluster init"), "{err}");
    // init is idempotent.
    let (code, out, err) = yunqi(&["cluster", "init", "--postgres", &url]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("created yunqi schema version 1"), "{out}");
    let (code, out, _) = yunqi(&["cluster", "init", "--postgres", &url]);
    assert_eq!(code, 0);
    assert!(out.contains("nothing to do"), "{out}");

    let a = node(dir_a.path(), &db, "a");
    let dir_b = tempfile::tempdir().unwrap();
    let mut b = node(dir_b.path(), &db, "b");
    assert!(
        b.admin_token.is_empty(),
        "only the first node bootstraps the admin"
    );
    b.admin_token = a.admin_token.clone();
    // A name in use by a running node is refused.
    let dir_c = tempfile::tempdir().unwrap();
    let err = refused(dir_c.path(), &url, "b");
    assert!(err.contains("in use by a running node"), "{err}");

    // What one node creates, the other knows.
    a.dept("transport");
    let token = a.principal("wang", "steward", Some("transport"));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, v) = b.call("GET", "/api/v1/whoami", Some(&token), None);
        if status == 200 {
            assert_eq!(v["principal"]["name"], "wang");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node b never saw wang: {status} {v}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A department made on b conflicts with its name made on a.
    let (status, _) = b.admin(
        "POST",
        "/api/v1/departments",
        Some(r#"{"name":"transport"}"#),
    );
    assert_eq!(status, 409);

    // A prepared statement on b, then the token revoked on a: when the revoke returns, b
    // refuses the next execution and every HTTP request.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let token_id = token.split('_').nth(1).unwrap().to_string();
    rt.block_on(async {
        let client = connect(&b, "wang", &token).await.expect("log in on b");
        let stmt = client.prepare("SELECT 1 + $1::bigint").await.unwrap();
        let row = client.query_one(&stmt, &[&1i64]).await.unwrap();
        assert_eq!(row.get::<_, i64>(0), 2);
        let (status, v) = a.admin("POST", &format!("/api/v1/tokens/{token_id}/revoke"), None);
        assert_eq!(status, 200, "{v}");
        let err = client.query_one(&stmt, &[&1i64]).await.unwrap_err();
        assert_eq!(
            err.as_db_error().map(|e| e.code().code()),
            Some("28000"),
            "{err:?}"
        );
    });
    let (status, v) = b.call("GET", "/api/v1/whoami", Some(&token), None);
    assert_eq!(status, 401, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("revoked"),
        "{v}"
    );

    // A node that does not answer (SIGSTOP): the revoke waits at most one lease, and the
    // node, once resumed, refuses the token before it serves anything else with it.
    let token2 = {
        let (status, v) = a.admin("POST", "/api/v1/principals/wang/tokens", Some("{}"));
        assert_eq!(status, 201, "{v}");
        (
            v["id"].as_str().unwrap().to_string(),
            v["token"].as_str().unwrap().to_string(),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.call("GET", "/api/v1/whoami", Some(&token2.1), None).0 != 200 {
        assert!(Instant::now() < deadline, "node b never saw the new token");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = b.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let started = Instant::now();
    let (status, v) = a.admin("POST", &format!("/api/v1/tokens/{}/revoke", token2.0), None);
    let waited = started.elapsed();
    assert_eq!(status, 200, "{v}");
    assert!(
        Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let (status, v) = b.call("GET", "/api/v1/whoami", Some(&token2.1), None);
    assert!(
        status == 401 || status == 503,
        "a resumed node served a revoked token: {status} {v} (revoke took {waited:?})"
    );

    // Status lists both nodes, live.
    let (code, out, err) = yunqi(&["--json", "cluster", "status", "--postgres", &url]);
    assert_eq!(code, 0, "{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    let nodes = s["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{s}");
    for n in nodes {
        assert_eq!(n["software"], env!("CARGO_PKG_VERSION"));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, out, _) = yunqi(&["--json", "cluster", "status", "--postgres", &url]);
        let s: serde_json::Value = serde_json::from_str(&out).unwrap();
        if s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["state"] == "live")
        {
            break;
        }
        assert!(Instant::now() < deadline, "nodes not live: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A gracefully stopped node says so.
    assert_eq!(b.terminate(), Some(0));
    let (_, out, _) = yunqi(&["--json", "cluster", "status", "--postgres", &url]);
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    let bs = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "b")
        .unwrap()
        .clone();
    assert_eq!(bs["state"], "stopped", "{s}");
    drop(a);
}

#[test]
fn a_node_refuses_a_schema_of_another_version() {
    let db = Database::create("schema");
    let url = db.url();
    let (code, _, err) = yunqi(&["cluster", "init", "--postgres", &url]);
    assert_eq!(code, 0, "{err}");
    db.sql("UPDATE yunqi_schema SET version = 99");
    let dir = tempfile::tempdir().unwrap();
    let err = refused(dir.path(), &url, "a");
    assert!(err.contains("schema version 99"), "{err}");
    let (code, _, err) = yunqi(&["cluster", "init", "--postgres", &url]);
    assert_ne!(code, 0, "init must not downgrade a newer schema");
    assert!(err.contains("schema version 99"), "{err}");
}

#[test]
fn a_config_file_sets_addresses_limits_and_the_cluster() {
    let db = Database::create("config");
    let url = db.url();
    let (code, _, err) = yunqi(&["cluster", "init", "--postgres", &url]);
    assert_eq!(code, 0, "{err}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("yunqi.toml");
    std::fs::write(
        &cfg,
        format!(
            "[limits]\nsql_result_rows_max = 3\n\n[cluster]\nnode = \"cfg-node\"\npostgres = \"{url}\"\nlease_ms = 1000\n"
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let s = Server::start_with(&data, &["--config", cfg.to_str().unwrap()]);
    let (status, v) = s.admin(
        "POST",
        "/api/v1/sql",
        Some(r#"{"sql":"SELECT * FROM (VALUES (1),(2),(3),(4),(5)) AS t(x)"}"#),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["rows"].as_array().unwrap().len(), 3, "{v}");
    let (_, out, _) = yunqi(&["--json", "cluster", "status", "--postgres", &url]);
    assert!(out.contains("\"cfg-node\""), "{out}");
    assert!(out.contains("\"lease_ms\":1000"), "{out}");
    // A typo in the file stops the server with the key named.
    std::fs::write(&cfg, "[limits]\nsql_rows_max = 3\n").unwrap();
    let (code, _, err) = yunqi(&[
        "serve",
        "--config",
        cfg.to_str().unwrap(),
        "--data",
        dir.path().join("d2").to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("sql_rows_max"), "{err}");
}

/// A TCP proxy to the local PostgreSQL that the test can cut and restore: a node behind it
/// loses its metadata store while the others keep theirs.
struct Proxy {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    fn start() -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::<std::net::TcpStream>::new()));
        let (c, k) = (cut.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let Ok(upstream) = std::net::TcpStream::connect("127.0.0.1:5432") else {
                    continue;
                };
                let mut list = k.lock().unwrap();
                list.push(client.try_clone().unwrap());
                list.push(upstream.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                    (upstream, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, cut, conns }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::SeqCst);
        if cut {
            for c in self.conns.lock().unwrap().drain(..) {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

#[test]
fn a_node_cut_off_from_postgres_stops_serving_and_resumes_without_a_restart() {
    let db = Database::create("fence");
    let url = db.url();
    let (code, _, err) = yunqi(&["cluster", "init", "--postgres", &url]);
    assert_eq!(code, 0, "{err}");
    let dir_a = tempfile::tempdir().unwrap();
    let a = node(dir_a.path(), &db, "a");
    let proxy = Proxy::start();
    let via_proxy = format!("postgresql://postgres@127.0.0.1:{}/{}", proxy.port, db.name);
    let dir_b = tempfile::tempdir().unwrap();
    let b = Server::start_with(dir_b.path(), &["--postgres", &via_proxy, "--node", "b"]);
    a.dept("transport");
    let token = a.principal("wang", "steward", Some("transport"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.call("GET", "/api/v1/whoami", Some(&token), None).0 != 200 {
        assert!(Instant::now() < deadline, "node b never saw wang");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(b.call("GET", "/healthz", None, None).0, 200);

    // Cut b off: within its lease (2 s) it stops serving, and says where to go.
    proxy.set_cut(true);
    let cut_at = Instant::now();
    let fenced = loop {
        let (status, v) = b.call("GET", "/api/v1/whoami", Some(&token), None);
        if status == 503 {
            break v;
        }
        assert_eq!(status, 200, "{v}");
        assert!(
            cut_at.elapsed() < Duration::from_secs(4),
            "node b still serves {:?} after losing PostgreSQL",
            cut_at.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        fenced["error"]["hint"]
            .as_str()
            .unwrap()
            .contains("another node"),
        "{fenced}"
    );
    let (status, h) = b.call("GET", "/healthz", None, None);
    assert_eq!((status, h["status"].as_str()), (503, Some("fenced")), "{h}");
    // Meanwhile a revokes wang's token: the call returns, and b, once back, refuses it.
    let id = token.split('_').nth(1).unwrap();
    let (status, v) = a.admin("POST", &format!("/api/v1/tokens/{id}/revoke"), None);
    assert_eq!(status, 200, "{v}");
    proxy.set_cut(false);
    let back = Instant::now();
    loop {
        let (status, v) = b.call("GET", "/api/v1/whoami", Some(&token), None);
        if status == 401 {
            assert!(
                v["error"]["message"].as_str().unwrap().contains("revoked"),
                "{v}"
            );
            break;
        }
        assert_eq!(
            status, 503,
            "a reconnected node served a revoked token: {v}"
        );
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "node b did not resume after PostgreSQL came back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(b.call("GET", "/healthz", None, None).0, 200);
}
