//! Continuous views on a three-node cluster (PostgreSQL on this machine; NATS and SeaweedFS
//! servers of the test's own): a view runs on one node at a time, its results read on every
//! node, its progress and live feed answered through any node; the node running it killed
//! (kill -9) or paused (SIGSTOP) past its lease, another node takes the view over from its
//! checkpoint in the object store, and every window is written exactly once.

mod common;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::time::{Duration, Instant};

use common::{Engines, Server};
use serde_json::{Value, json};

const STREAM: &str = "CREATE STREAM traffic.detections (plate TEXT, segment INT, ts TIMESTAMP) WITH (event_time = 'ts', watermark = '1 second')";
const VIEW: &str = "CREATE CONTINUOUS VIEW traffic.per_segment AS SELECT window_start, window_end, segment, count(*) AS vehicles FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE) GROUP BY window_start, window_end, segment";

/// Batch `k`: `PER` detections in minute `k / BATCHES_PER_MINUTE`, 15 s apart within it.
const PER: usize = 70;
const BATCHES_PER_MINUTE: u64 = 3;

fn batch(k: u64) -> String {
    let minute = k / BATCHES_PER_MINUTE;
    let second = (k % BATCHES_PER_MINUTE) * 15;
    (0..PER)
        .map(|i| {
            format!(
                r#"{{"plate":"浙A{k:03}{i:02}","segment":{},"ts":"2026-12-07T08:{minute:02}:{second:02}Z"}}"#,
                i % 7
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn post(url: &str, token: &str, key: &str, body: &str) -> Result<(u16, Value), String> {
    let mut r = common::agent()
        .post(format!("{url}/api/v1/streams/traffic/detections/events"))
        .header("Authorization", format!("Bearer {token}"))
        .header("Content-Type", "application/x-ndjson")
        .header("Idempotency-Key", key)
        .send(body)
        .map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

/// Sends batch `key` to the live nodes but `skip`, starting at `first`, until one takes it.
fn post_retrying(
    nodes: &[Option<Server>],
    first: usize,
    skip: Option<usize>,
    token: &str,
    key: &str,
    body: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = first;
    let mut last = Vec::new();
    loop {
        if skip != Some(i % nodes.len())
            && let Some(n) = &nodes[i % nodes.len()]
        {
            match post(&n.url, token, key, body) {
                Ok((200, _)) => return,
                other => last.push(format!("node {}: {other:?}", i % nodes.len())),
            }
        }
        assert!(
            Instant::now() < deadline,
            "no node took batch {key}: {:?}",
            &last[last.len().saturating_sub(3)..]
        );
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sql(s: &Server, token: &str, q: &str) -> Value {
    let body = json!({ "sql": q }).to_string();
    let (status, v) = s.call("POST", "/api/v1/sql", Some(token), Some(&body));
    assert_eq!(status, 200, "{q}: {v}");
    v
}

/// The view's status as `node` answers it (forwarded to the node that runs it), once a node
/// runs it.
fn status(s: &Server, token: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, v) = s.call(
            "GET",
            "/api/v1/views/traffic/per_segment",
            Some(token),
            None,
        );
        if code == 200 {
            return v;
        }
        assert_eq!(code, 503, "{v}");
        assert!(Instant::now() < deadline, "the view found no node: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn signal(s: &Server, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &s.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

fn index(name: &str) -> usize {
    ["a", "b", "c"].iter().position(|n| *n == name).unwrap()
}

#[test]
fn a_view_runs_on_one_node_and_moves_when_its_node_dies_or_stalls() {
    let engines = Engines::start("cluster_views");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes: Vec<Option<Server>> = ["a", "b", "c"]
        .iter()
        .zip(&dirs)
        .map(|(n, d)| Some(engines.node(d.path(), n)))
        .collect();
    let admin = nodes[0].as_ref().unwrap().admin_token.clone();
    for n in nodes.iter_mut().flatten() {
        n.admin_token = admin.clone();
    }
    let a = nodes[0].as_ref().unwrap();
    a.dept("traffic");
    let steward = a.principal("tsteward", "steward", Some("traffic"));
    let camera = a.principal("cameras", "service", Some("traffic"));
    let analyst = a.principal("tanalyst", "analyst", Some("traffic"));
    sql(a, &steward, STREAM);
    // Created on b: b runs it.
    sql(nodes[1].as_ref().unwrap(), &steward, VIEW);
    let v = status(nodes[2].as_ref().unwrap(), &steward);
    assert_eq!(v["run_by"], "b", "{v}");
    let v = status(nodes[2].as_ref().unwrap(), &analyst);
    assert!(v.get("run_by").is_none(), "only stewards see nodes: {v}");
    let (code, list) = a.call("GET", "/api/v1/views", Some(&steward), None);
    assert_eq!(code, 200, "{list}");
    assert_eq!(list["views"][0]["view"], "traffic.per_segment", "{list}");
    assert_eq!(list["views"][0]["run_by"], "b", "{list}");

    // The live feed, subscribed on a, relayed from b.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    {
        let url = format!("{}/api/v1/views/traffic/per_segment/live", a.url);
        let token = steward.clone();
        std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            let Ok(mut r) = agent
                .get(&url)
                .header("Authorization", format!("Bearer {token}"))
                .call()
            else {
                return;
            };
            let reader = std::io::BufReader::new(r.body_mut().as_reader());
            for line in reader.lines().map_while(Result::ok) {
                if let Some(d) = line.strip_prefix("data:") {
                    let _ = tx.send(d.trim().to_string());
                    return;
                }
            }
        });
    }
    std::thread::sleep(Duration::from_millis(500));

    let batches = 36u64;
    let mut killed = None;
    let mut paused = None;
    for k in 0..batches {
        if k == 6 {
            let m = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("a live message relayed from the view's node");
            let m: Value = serde_json::from_str(&m).unwrap();
            assert_eq!(m["view"], "traffic.per_segment", "{m}");
        }
        if k == 10 {
            // kill -9 of the node running the view: another takes it over.
            let runner = status(nodes[0].as_ref().unwrap(), &steward)["run_by"]
                .as_str()
                .unwrap()
                .to_string();
            let i = index(&runner);
            nodes[i].as_mut().unwrap().kill9();
            nodes[i] = None;
            killed = Some((i, Instant::now()));
        }
        if k == 18 {
            // The killed node back (once its membership lapsed, 2 s); it takes nothing from
            // the view's new node.
            let (i, at) = killed.unwrap();
            std::thread::sleep(Duration::from_secs(3).saturating_sub(at.elapsed()));
            let mut n = engines.node(dirs[i].path(), ["a", "b", "c"][i]);
            n.admin_token = admin.clone();
            nodes[i] = Some(n);
        }
        if k == 22 {
            // The running node paused past its lease: another takes the view over while it
            // sleeps; woken, it writes no window twice and lets the view go.
            let any = nodes.iter().flatten().next().unwrap();
            let runner = status(any, &steward)["run_by"]
                .as_str()
                .unwrap()
                .to_string();
            let i = index(&runner);
            signal(nodes[i].as_ref().unwrap(), "-STOP");
            paused = Some(i);
        }
        if k == 28 {
            // Another node has taken the view over meanwhile (the lease is 5 s).
            let p = paused.unwrap();
            let other = nodes
                .iter()
                .enumerate()
                .find(|(i, n)| *i != p && n.is_some())
                .and_then(|(_, n)| n.as_ref())
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let v = status(other, &steward);
                if v["run_by"].as_str().is_some_and(|r| index(r) != p) {
                    break;
                }
                assert!(Instant::now() < deadline, "nobody took the view over: {v}");
                std::thread::sleep(Duration::from_millis(200));
            }
            signal(nodes[p].as_ref().unwrap(), "-CONT");
        }
        let skip = paused.filter(|_| k < 28);
        post_retrying(
            &nodes,
            (k % 3) as usize,
            skip,
            &camera,
            &format!("cam-{k:04}"),
            &batch(k),
        );
    }
    // An event an hour later closes every minute.
    post_retrying(
        &nodes,
        0,
        None,
        &camera,
        "flush",
        r#"{"plate":"浙A9999","segment":0,"ts":"2026-12-07T09:30:00Z"}"#,
    );
    let total = batches * PER as u64;
    let mut expected: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for k in 0..batches {
        let minute = format!("2026-12-07T08:{:02}:00", k / BATCHES_PER_MINUTE);
        for i in 0..PER {
            *expected
                .entry((minute.clone(), (i % 7) as i64))
                .or_default() += 1;
        }
    }
    for n in nodes.iter().flatten() {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = sql(n, &steward, "SELECT sum(vehicles) FROM traffic.per_segment");
            if v["rows"][0][0].as_i64() == Some(total as i64) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the view has not counted every event once: {v}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let rows = sql(
            n,
            &steward,
            "SELECT CAST(window_start AS TEXT), segment, vehicles FROM traffic.per_segment ORDER BY 1, 2",
        );
        let mut got: BTreeMap<(String, i64), i64> = BTreeMap::new();
        for r in rows["rows"].as_array().unwrap() {
            let key = (
                r[0].as_str().unwrap()[..19].replace(' ', "T"),
                r[1].as_i64().unwrap(),
            );
            assert!(
                got.insert(key.clone(), r[2].as_i64().unwrap()).is_none(),
                "window written twice: {key:?}"
            );
        }
        assert_eq!(got, expected, "every window once, exact");
    }
    // Its progress through any node: every event read, by one node.
    let end = total + 1;
    for n in nodes.iter().flatten() {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = status(n, &steward);
            if v["offset"].as_u64() == Some(end) {
                assert!(v["run_by"].is_string(), "{v}");
                break;
            }
            assert!(Instant::now() < deadline, "{v}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let runners: Vec<String> = nodes
        .iter()
        .flatten()
        .map(|n| status(n, &steward)["run_by"].as_str().unwrap().to_string())
        .collect();
    assert!(
        runners.windows(2).all(|w| w[0] == w[1]),
        "one node runs the view: {runners:?}"
    );
}
