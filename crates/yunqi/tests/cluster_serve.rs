//! Serve on a three-node cluster (PostgreSQL on this machine, a NATS server of the test's own):
//! a service applied on one node is decided by one node at a time while every node takes
//! applications; quotas stay exact; the deciding node killed (kill -9) or paused (SIGSTOP) is
//! taken over by another from the decision log, and the paused one, woken, decides nothing
//! more.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Database, Server};
use serde_json::{Value, json};

const PASS: &str = r#"
[service]
department = "transport"
name = "pass"
title = "货车通行证"
title_en = "Lorry pass"
applicants = ["citizen"]

[[inputs]]
name = "plate"
type = "plate"
label = "车牌号 / Plate"

[[quotas]]
name = "total"
key = "plate"
limit = 2
period = "total"
reason = "该车辆的两次通行证已用完 / this vehicle has used its two passes"

[outcome]
decide = "automatic"

[document]
title = "货车通行证"
fields = ["plate"]
"#;

fn apply(url: &str, token: &str, plate: &str, key: &str) -> (u16, Value) {
    let mut r = common::agent()
        .post(format!("{url}/api/v1/services/transport/pass/applications"))
        .header("Authorization", format!("Bearer {token}"))
        .header("Content-Type", "application/json")
        .header("Idempotency-Key", key)
        .send(json!({ "inputs": { "plate": plate } }).to_string())
        .expect("apply");
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Applies until a node answers other than 503 (a service changing nodes), for up to 30 s.
fn apply_retrying(url: &str, token: &str, plate: &str, key: &str) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, v) = apply(url, token, plate, key);
        if status != 503 || Instant::now() > deadline {
            return (status, v);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn decided_by(s: &Server, token: &str) -> String {
    let (status, v) = s.call("GET", "/api/v1/services/transport/pass", Some(token), None);
    assert_eq!(status, 200, "{v}");
    v["decided_by"].as_str().unwrap_or_default().to_string()
}

/// A valid resident ID number (its check character computed), the `i`-th of a series.
fn id_number(i: usize) -> String {
    let body = format!("11010519900101{i:03}");
    const W: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    let sum: u32 = body
        .chars()
        .zip(W)
        .map(|(c, w)| c.to_digit(10).unwrap() * w)
        .sum();
    let check = b"10X98765432"[(sum % 11) as usize] as char;
    format!("{body}{check}")
}

fn signal(s: &Server, sig: &str) {
    std::process::Command::new("kill")
        .args([sig, &s.child.id().to_string()])
        .status()
        .expect("kill");
}

#[test]
fn three_nodes_decide_each_service_once_and_take_over_a_dead_or_paused_decider() {
    let db = Database::create("serve3");
    let nats_dir = tempfile::tempdir().unwrap();
    let nats = yunqi_stream_nats::server::NatsServer::start(nats_dir.path());
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = common::three_nodes(&db, &nats.url(), &dirs);
    nodes[0].dept("transport");
    let steward = nodes[0].principal("xsteward", "steward", Some("transport"));
    let citizens: Vec<String> = (0..3)
        .map(|i| common::citizen(&nodes[0], &format!("c{i}"), &id_number(i)))
        .collect();

    // Applied on b: b decides it; a and c know it and send its applications there.
    let (status, v) = common::post_toml(&nodes[1], &steward, PASS);
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["decided_by"], "b", "{v}");
    assert_eq!(decided_by(&nodes[2], &steward), "b");
    // Without a valid token a node answers 401 itself and moves nothing.
    let (status, v) = nodes[0].call(
        "POST",
        "/api/v1/services/transport/pass/applications",
        Some("not-a-token"),
        Some(r#"{"inputs": {"plate": "浙B99999"}}"#),
    );
    assert_eq!(status, 401, "{v}");
    // Which node decides is for the service's stewards, not for applicants.
    assert_eq!(decided_by(&nodes[2], &citizens[0]), "");
    let (status, v) = nodes[0].call("GET", "/api/v1/services", Some(&steward), None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["services"][0]["service"], "transport.pass", "{v}");

    // 10 plates, 3 applications each, from three citizens on three nodes at once: two passes
    // per plate and no more, each decision numbered once.
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    let threads: Vec<_> = (0..3)
        .map(|t| {
            let (url, token) = (urls[t].clone(), citizens[t].clone());
            std::thread::spawn(move || {
                (0..10)
                    .map(|p| {
                        let (status, v) =
                            apply(&url, &token, &format!("浙B{p:05}"), &format!("k{t}-{p}"));
                        assert_eq!(status, 200, "{v}");
                        v
                    })
                    .collect::<Vec<Value>>()
            })
        })
        .collect();
    let decisions: Vec<Value> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let mut granted: BTreeMap<String, usize> = BTreeMap::new();
    let mut ids: Vec<String> = Vec::new();
    for d in &decisions {
        ids.push(d["id"].as_str().unwrap().to_string());
        if d["decision"] == "approved" {
            *granted
                .entry(d["explanation"]["inputs"]["plate"].as_str().unwrap().into())
                .or_default() += 1;
        }
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 30, "every decision numbered once");
    assert_eq!(granted.len(), 10, "{granted:?}");
    assert!(granted.values().all(|n| *n == 2), "{granted:?}");
    // A document issued by b verifies on a: one key for the city.
    let token = decisions
        .iter()
        .find_map(|d| d["document"]["token"].as_str())
        .expect("a document");
    let (status, v) = nodes[0].call(
        "GET",
        &format!("/api/v1/documents/verify?token={token}"),
        None,
        None,
    );
    assert_eq!((status, &v["status"]), (200, &json!("valid")), "{v}");

    // b killed: after its lease lapses another node decides, from the log: the quotas spent
    // stay spent, a retried key gets its first answer.
    let before = decisions
        .iter()
        .find(|d| d["decision"] == "approved")
        .unwrap()
        .clone();
    nodes[1].kill9();
    let (status, v) = apply_retrying(&urls[0], &citizens[0], "浙B00000", "k-after-kill");
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["decision"], "refused",
        "the plate's two passes stay spent: {v}"
    );
    let owner = decided_by(&nodes[0], &steward);
    assert!(owner == "a" || owner == "c", "{owner}");
    let t = before["id"].as_str().unwrap();
    let k = decisions.iter().position(|d| d["id"] == t).unwrap();
    let (status, v) = apply(
        &urls[2],
        &citizens[k / 10],
        before["explanation"]["inputs"]["plate"].as_str().unwrap(),
        &format!("k{}-{}", k / 10, k % 10),
    );
    assert_eq!((status, &v["id"]), (200, &before["id"]), "{v}");
    let (status, v) = apply(&urls[2], &citizens[1], "浙B00100", "k-new");
    assert_eq!((status, &v["decision"]), (200, &json!("approved")), "{v}");

    // The deciding node paused with applications in flight: once its lease has lapsed the
    // other node takes the service over; the paused one, woken, is fenced off (its round in
    // flight is not stored, the applicant retries) and sends what it gets to the new owner.
    // However the race falls, the plate gets its two passes and no more.
    let (o, other) = if owner == "a" { (0, 2) } else { (2, 0) };
    let (url, token) = (urls[o].clone(), citizens[2].clone());
    let writer = std::thread::spawn(move || {
        (0..12)
            .map(|i| apply_retrying(&url, &token, "浙B00200", &format!("p-{i}")))
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_millis(30));
    signal(&nodes[o], "-STOP");
    std::thread::sleep(Duration::from_secs(6)); // the lease (5 s) lapses
    let taken = apply_retrying(&urls[other], &citizens[0], "浙B00200", "q-0");
    signal(&nodes[o], "-CONT");
    assert_eq!(taken.0, 200, "{taken:?}");
    let mut answers = writer.join().unwrap();
    answers.push(taken);
    assert!(answers.iter().all(|(s, _)| *s == 200), "{answers:?}");
    let approved = answers
        .iter()
        .filter(|(_, v)| v["decision"] == "approved")
        .count();
    assert_eq!(approved, 2, "{answers:?}");
    let (status, v) = apply_retrying(&urls[o], &citizens[2], "浙B00200", "p-last");
    assert_eq!((status, &v["decision"]), (200, &json!("refused")), "{v}");
    assert_eq!(decided_by(&nodes[o], &steward), ["a", "b", "c"][other]);
    // One log, each key decided once, whichever node decided it.
    let (status, v) = nodes[other].call(
        "GET",
        "/api/v1/services/transport/pass",
        Some(&steward),
        None,
    );
    assert_eq!(status, 200, "{v}");
    let keys = 30 + 1 + 1 + 12 + 1 + 1;
    assert_eq!(v["stats"]["decided"], keys, "{v}");
}
