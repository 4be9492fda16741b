//! Cluster mode over the PostgreSQL server on this machine (started by scripts/services.sh):
//! nodes share departments, principals, tokens and grants; a revocation on one node is refused
//! by every node before the revoke call returns, a stopped node included; the schema is
//! versioned and checked.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Database, Server, connect, yunqi};

fn node(data: &std::path::Path, db: &Database, name: &str) -> Server {
    common::cluster_node(data, &db.url(), None, name)
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
    assert!(out.contains("created yunqi schema version 5"), "{out}");
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

/// POSTs NDJSON events to `traffic.detections`, keyed when `key` is given.
fn post_events(s: &Server, token: &str, key: Option<&str>, body: &str) -> (u16, serde_json::Value) {
    let agent = common::agent();
    let mut req = agent
        .post(format!(
            "{}/api/v1/streams/traffic/detections/events",
            s.url
        ))
        .header("Authorization", format!("Bearer {token}"))
        .header("Content-Type", "application/x-ndjson");
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let mut r = req.send(body).expect("post");
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

fn detections(n: usize, second: u64) -> String {
    (0..n)
        .map(|i| {
            format!(
                r#"{{"plate":"浙A{i:04}","segment":{},"ts":"2026-12-07T08:00:{:02}Z"}}"#,
                i % 7,
                second % 60
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

const DETECTIONS: &str = "CREATE STREAM traffic.detections (plate TEXT, segment INT, ts TIMESTAMP) WITH (event_time = 'ts', watermark = '1 second')";

/// With `[cluster] nats`, a stream's events live in JetStream: they outlive the node that took
/// them (a keyed retry after kill -9 is answered from the shared log), a second node continues
/// its offsets and learns the keys the first appended, and NATS down gives 503s with a hint
/// until it is back — without restarting yunqi.
#[test]
fn streams_on_jetstream_outlive_the_node_and_the_engine_being_down() {
    let db = Database::create("streams_js");
    let nats_dir = tempfile::tempdir().unwrap();
    let mut nats = yunqi_stream_nats::server::NatsServer::start(nats_dir.path());
    // A node pointed at NATS not prepared by init is refused, saying what to run.
    let (code, _, err) = yunqi(&["cluster", "init", "--postgres", &db.url()]);
    assert_eq!(code, 0, "{err}");
    let dir_a = tempfile::tempdir().unwrap();
    let (code, _, err) = yunqi(&[
        "serve",
        "--data",
        dir_a.path().to_str().unwrap(),
        "--http",
        "127.0.0.1:0",
        "--pg",
        "127.0.0.1:0",
        "--postgres",
        &db.url(),
        "--nats",
        &nats.url(),
        "--node",
        "a",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("yunqi cluster init"), "{err}");
    let (code, out, err) = common::cluster_cli("init", &db.url(), &nats.url(), &["--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["nats"]["created_offsets_bucket"], true, "{v}");

    let start = |dir: &std::path::Path, name: &str| {
        common::cluster_node(dir, &db.url(), Some(&nats.url()), name)
    };
    let mut a = start(dir_a.path(), "a");
    a.dept("traffic");
    let steward = a.principal("tsteward", "steward", Some("traffic"));
    let camera = a.principal("cameras", "service", Some("traffic"));
    let body = serde_json::json!({ "sql": DETECTIONS }).to_string();
    let (status, v) = a.call("POST", "/api/v1/sql", Some(&steward), Some(&body));
    assert_eq!(status, 200, "{v}");
    let (status, first) = post_events(&a, &camera, Some("cam-7-0001"), &detections(300, 1));
    assert_eq!(status, 200, "{first}");
    assert_eq!(
        (first["first_offset"].as_u64(), first["end_offset"].as_u64()),
        (Some(0), Some(300))
    );

    // kill -9; the restarted node (a replacement, under another name) answers the retry from
    // the shared log: the same offsets, nothing appended twice.
    a.kill9();
    let a = start(dir_a.path(), "a2");
    let (status, again) = post_events(&a, &camera, Some("cam-7-0001"), &detections(300, 1));
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["end_offset"], 300, "{again}");

    // A second node knows the stream (declarations are the cluster's) and appends after a's
    // events.
    let dir_b = tempfile::tempdir().unwrap();
    let mut b = start(dir_b.path(), "b");
    b.admin_token = a.admin_token.clone();
    let (status, v) = post_events(&b, &camera, None, &detections(50, 2));
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["first_offset"].as_u64(), v["end_offset"].as_u64()),
        (Some(300), Some(350)),
        "{v}"
    );
    // b has read the stream's keys; a then takes a keyed batch and (say) dies before answering:
    // the producer's retry on b is answered with a's offsets, not appended again.
    let (status, v) = post_events(&b, &camera, Some("cam-9-0001"), &detections(5, 4));
    assert_eq!((status, v["end_offset"].as_u64()), (200, Some(355)), "{v}");
    let (status, on_a) = post_events(&a, &camera, Some("cam-9-0002"), &detections(20, 5));
    assert_eq!(
        (status, on_a["end_offset"].as_u64()),
        (200, Some(375)),
        "{on_a}"
    );
    let (status, on_b) = post_events(&b, &camera, Some("cam-9-0002"), &detections(20, 5));
    assert_eq!(status, 200, "{on_b}");
    assert_eq!(on_b["duplicate"], true, "{on_b}");
    assert_eq!(
        (&on_b["first_offset"], &on_b["end_offset"]),
        (&on_a["first_offset"], &on_a["end_offset"])
    );

    // NATS stopped: 503 with a hint, nothing of the engine's address; back: accepted again.
    nats.stop();
    let (status, v) = post_events(&a, &camera, Some("cam-7-0002"), &detections(10, 3));
    assert_eq!(status, 503, "{v}");
    assert!(
        v["error"]["hint"]
            .as_str()
            .is_some_and(|h| h.contains("Idempotency-Key")),
        "{v}"
    );
    assert!(!v.to_string().contains("127.0.0.1"), "{v}");
    nats.restart();
    let back = Instant::now();
    let v = loop {
        let (status, v) = post_events(&a, &camera, Some("cam-7-0002"), &detections(10, 3));
        if status == 200 {
            break v;
        }
        assert_eq!(status, 503, "{v}");
        assert!(
            back.elapsed() < Duration::from_secs(20),
            "did not resume: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Whether the attempt during the outage was stored or not, the key is appended once.
    let end = v["end_offset"].as_u64().unwrap();
    assert_eq!(end, 385, "{v}");
    let (code, out, err) = common::cluster_cli("status", &db.url(), &nats.url(), &["--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["nats"]["state"].as_str(), v["nats"]["streams"].as_u64()),
        (Some("up"), Some(1)),
        "{v}"
    );
}

/// Three nodes, streams in JetStream: a stream declared on one node takes events on every node.
/// A producer sends keyed batches round-robin over the nodes; one node is killed with kill -9
/// while a batch is in flight to it, and the producer sends that batch again to another node.
/// The stream holds every batch exactly once, a view declared on a third node counts every
/// event, and every node's audit chain verifies.
#[test]
fn three_nodes_take_any_stream_and_a_node_killed_mid_ingest_loses_nothing() {
    let db = Database::create("three_js");
    let nats_dir = tempfile::tempdir().unwrap();
    let nats = yunqi_stream_nats::server::NatsServer::start(nats_dir.path());
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = common::three_nodes(&db, &nats.url(), &dirs);
    nodes[0].dept("traffic");
    let steward = nodes[0].principal("tsteward", "steward", Some("traffic"));
    let camera = nodes[0].principal("cameras", "service", Some("traffic"));
    let sql = |s: &Server, q: &str| {
        let body = serde_json::json!({ "sql": q }).to_string();
        let (status, v) = s.call("POST", "/api/v1/sql", Some(&steward), Some(&body));
        assert_eq!(status, 200, "{q}: {v}");
        v
    };
    // Declared on a; known on c; a view over it on b.
    sql(&nodes[0], DETECTIONS);
    let (status, v) = nodes[2].call(
        "GET",
        "/api/v1/streams/traffic/detections",
        Some(&steward),
        None,
    );
    assert_eq!(status, 200, "{v}");
    let (status, v) = nodes[1].call(
        "POST",
        "/api/v1/sql",
        Some(&steward),
        Some(&serde_json::json!({"sql": DETECTIONS}).to_string()),
    );
    assert_eq!(status, 409, "declared once for the cluster: {v}");
    sql(
        &nodes[1],
        "CREATE CONTINUOUS VIEW traffic.per_segment AS SELECT window_start, window_end, segment, count(*) AS vehicles FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE) GROUP BY window_start, window_end, segment",
    );

    let batches = 30u64;
    let per = 100usize;
    let mut alive = [true; 3];
    let mut end = 0;
    for k in 0..batches {
        let key = format!("cam-{k:04}");
        let body = detections(per, k);
        let target = (k % 3) as usize;
        let v = if k == 14 {
            // In flight to c when c is killed: the answer may be lost either way.
            let (url, camera2, body2, key2) = (
                nodes[2].url.clone(),
                camera.clone(),
                body.clone(),
                key.clone(),
            );
            let inflight = std::thread::spawn(move || {
                let agent = common::agent();
                agent
                    .post(format!("{url}/api/v1/streams/traffic/detections/events"))
                    .header("Authorization", format!("Bearer {camera2}"))
                    .header("Content-Type", "application/x-ndjson")
                    .header("Idempotency-Key", &key2)
                    .send(&body2)
                    .map(|r| r.status().as_u16())
            });
            std::thread::sleep(Duration::from_millis(3));
            nodes[2].kill9();
            alive[2] = false;
            let _ = inflight.join();
            let (status, v) = post_events(&nodes[0], &camera, Some(&key), &body);
            assert_eq!(status, 200, "{v}");
            v
        } else {
            let t = if alive[target] {
                target
            } else {
                (target + 1) % 3
            };
            let (status, v) = post_events(&nodes[t], &camera, Some(&key), &body);
            assert_eq!(status, 200, "batch {k} on node {t}: {v}");
            v
        };
        assert_eq!(
            v["end_offset"].as_u64().unwrap() - v["first_offset"].as_u64().unwrap(),
            per as u64,
            "{v}"
        );
        end = end.max(v["end_offset"].as_u64().unwrap());
    }
    assert_eq!(end, batches * per as u64, "every batch once");
    // An event an hour later closes the minute; the view on b has counted everything.
    let flush = r#"{"plate":"浙A9999","segment":0,"ts":"2026-12-07T09:00:00Z"}"#;
    let (status, v) = post_events(&nodes[0], &camera, None, flush);
    assert_eq!(status, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = sql(&nodes[1], "SELECT sum(vehicles) FROM traffic.per_segment");
        if v["rows"][0][0].as_i64() == Some((batches * per as u64) as i64) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the view on b did not count every event: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every node's audit chain is in JetStream: the killed node's verifies with the survivors',
    // and all of them agree with the signed cluster checkpoints in PostgreSQL.
    for (i, n) in nodes.iter_mut().enumerate() {
        if alive[i] {
            n.terminate();
        }
    }
    let verify = || {
        let out = std::process::Command::new(common::BIN)
            .args([
                "--json",
                "audit",
                "verify",
                "--nats",
                &nats.url(),
                "--postgres",
                &db.url(),
            ])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), v)
    };
    let (code, v) = verify();
    assert_eq!((code, &v["ok"]), (Some(0), &serde_json::json!(true)), "{v}");
    let nodes_seen: Vec<&str> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes_seen, ["a", "b", "c"], "{v}");
    for n in v["nodes"].as_array().unwrap() {
        assert!(n["records"].as_u64().unwrap() > 0, "{v}");
    }
    assert!(v["checkpoints"].as_u64().unwrap() >= 1, "{v}");
    let last = v["last_checkpoint"]["id"].as_u64().unwrap();
    let (code, out, err) = common::cluster_cli("status", &db.url(), &nats.url(), &["--json"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["audit_checkpoint"]["id"], last, "{status}");
    let chains = status["nats"]["audit_chains"].as_array().unwrap();
    assert_eq!(chains.len(), 3, "{status}");
    assert_eq!(
        status["nats"]["streams"], 1,
        "audit chains are not streams: {status}"
    );
    // A checkpoint altered in the database is caught: its signature and the next one's link.
    db.sql(&format!(
        "UPDATE yunqi_audit_checkpoint SET checkpoint = jsonb_set(checkpoint, '{{heads,0,seq}}', '1') WHERE id = {}",
        last.max(2) - 1
    ));
    let (code, v) = verify();
    assert_eq!(code, Some(1), "{v}");
    let problems = v["problems"].to_string();
    assert!(
        problems.contains("is not signed by the key it names"),
        "{v}"
    );
}

/// Datasets in object storage (a SeaweedFS server of the test's own) with manifests in
/// PostgreSQL: imported on one node, queried on another; a node killed mid-import leaves the
/// previous version whole; the object store down gives 503 and the node resumes by itself.
#[test]
fn datasets_in_object_storage_are_every_nodes() {
    let db = Database::create("datasets_s3");
    let pg = db.url();
    let weed_dir = tempfile::tempdir().unwrap();
    let mut weed = yunqi_store_s3::server::WeedServer::start(weed_dir.path(), "yunqi-cluster-test");
    let url = weed.url("city");
    let endpoint = weed.endpoint();
    let objects = [
        "--object-store",
        url.as_str(),
        "--s3-endpoint",
        endpoint.as_str(),
    ];
    let (code, _, err) = yunqi(&["cluster", "init", "--postgres", &pg]);
    assert_eq!(code, 0, "{err}");
    // A node pointed at a bucket init has not prepared is refused, saying what to run.
    let dir_a = tempfile::tempdir().unwrap();
    let mut args = vec![
        "serve",
        "--data",
        dir_a.path().to_str().unwrap(),
        "--http",
        "127.0.0.1:0",
        "--pg",
        "127.0.0.1:0",
        "--postgres",
        &pg,
        "--node",
        "a",
    ];
    args.extend(objects);
    let (code, _, err) = yunqi(&args);
    assert_ne!(code, 0);
    assert!(err.contains("yunqi cluster init"), "{err}");
    let mut init = vec!["cluster", "init", "--postgres", &pg];
    init.extend(objects);
    let (code, out, err) = yunqi(&init);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("prepared for yunqi"), "{out}");

    let start = |dir: &std::path::Path, name: &str| {
        let mut args = vec!["--postgres", pg.as_str(), "--node", name];
        args.extend(objects);
        Server::start_with(dir, &args)
    };
    let a = start(dir_a.path(), "a");
    a.dept("transport");
    let steward = a.principal("ts", "steward", Some("transport"));
    let dir_b = tempfile::tempdir().unwrap();
    let mut b = start(dir_b.path(), "b");
    b.admin_token = a.admin_token.clone();
    let (status, v) = a.call(
        "POST",
        "/api/v1/datasets",
        Some(&steward),
        Some(r#"{"department":"transport","name":"vehicles"}"#),
    );
    assert_eq!(status, 201, "{v}");
    let rows = |from: usize, n: usize| {
        let mut s = String::from("plate,seats\n");
        for i in from..from + n {
            s.push_str(&format!("浙A{i:05},{}\n", 2 + i % 6));
        }
        s
    };
    let path = "/api/v1/datasets/transport/vehicles/import";
    let (status, v) = a.call("POST", path, Some(&steward), Some(&rows(0, 1000)));
    assert_eq!(status, 200, "{v}");
    let count = |s: &Server| {
        let body = serde_json::json!({"sql": "SELECT count(*) AS n, sum(seats) AS s FROM transport.vehicles"}).to_string();
        let (status, v) = s.call("POST", "/api/v1/sql", Some(&steward), Some(&body));
        assert_eq!(status, 200, "{v}");
        v["rows"][0].clone()
    };
    let on_a = count(&a);
    assert_eq!(on_a[0], 1000, "{on_a}");
    assert_eq!(count(&b), on_a, "node b reads what node a imported");
    // b appends; a reads it at once.
    let (status, v) = b.call("POST", path, Some(&steward), Some(&rows(1000, 500)));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["version"], 2, "{v}");
    assert_eq!(count(&a)[0], 1500);

    // The object store down: 503 with a hint, nothing half-written; back: resumes.
    weed.kill();
    let (status, v) = a.call("POST", path, Some(&steward), Some(&rows(1500, 10)));
    assert_eq!(status, 503, "{v}");
    assert!(
        v["error"]["hint"].as_str().unwrap().contains("retry"),
        "{v}"
    );
    weed.restart();
    // Reads resume by themselves once the store answers again (503 until then).
    let body = serde_json::json!({"sql": "SELECT count(*) FROM transport.vehicles"}).to_string();
    let began = Instant::now();
    loop {
        let (status, v) = b.call("POST", "/api/v1/sql", Some(&steward), Some(&body));
        if status == 200 {
            assert_eq!(
                v["rows"][0][0], 1500,
                "nothing of the failed import is visible"
            );
            break;
        }
        assert_eq!(status, 503, "{v}");
        assert!(began.elapsed() < Duration::from_secs(60), "{v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, v) = a.call("POST", path, Some(&steward), Some(&rows(1500, 10)));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["version"], 3, "{v}");
    assert_eq!(count(&b)[0], 1510);

    // kill -9 of node a while it imports 200,000 rows (an upsert by plate); the client, unsure
    // whether it was applied, sends it again to node b: the dead node's write lock went with
    // it, and the rows are there once whether a's attempt committed or not.
    let big = rows(0, 200_000);
    let expected_seats: i64 = (0..200_000i64).map(|i| 2 + i % 6).sum();
    let upsert = format!("{path}?mode=upsert&key=plate");
    let inflight = {
        let (url, token, body, upsert) =
            (a.url.clone(), steward.clone(), big.clone(), upsert.clone());
        std::thread::spawn(move || {
            common::agent()
                .post(format!("{url}{upsert}"))
                .header("Authorization", format!("Bearer {token}"))
                .header("Content-Type", "text/csv")
                .send(&body)
                .map(|r| r.status().as_u16())
        })
    };
    std::thread::sleep(Duration::from_millis(150));
    let mut a = a;
    a.kill9();
    let _ = inflight.join();
    let began = Instant::now();
    let (status, v) = b.call("POST", &upsert, Some(&steward), Some(&big));
    assert_eq!(status, 200, "{v}");
    assert!(
        began.elapsed() < Duration::from_secs(30),
        "the dead node's lock was released"
    );
    let version = v["version"].as_u64().unwrap();
    assert!(version == 4 || version == 5, "{v}");
    let after = count(&b);
    assert_eq!(after[0], 200_000, "every row once: {after}");
    assert_eq!(after[1], expected_seats, "{after}");

    // `cluster status` reports the object store.
    let mut status_cmd = vec!["cluster", "status", "--postgres", &pg, "--json"];
    status_cmd.extend(objects);
    let (code, out, err) = yunqi(&status_cmd);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["object_store"]["state"], "up", "{v}");
}
