//! NGSI-LD subscriptions end to end over the real binary, with a real HTTP endpoint: only
//! allowed endpoints, notifications for watched attributes and `q` matches only, as the
//! owner may see the entities (columns and masks of a grant), paused when the grant is
//! revoked, retried while the endpoint fails, throttled, paused, expired, deleted, kept across
//! a restart, and every notification audited.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Server;
use serde_json::{Value, json};

const STREAM: &str = "CREATE STREAM traffic.flow (id TEXT, date_observed TIMESTAMP, intensity INT, \
    average_vehicle_speed DOUBLE, district TEXT, operator TEXT) \
    WITH (event_time = 'date_observed', watermark = '5 seconds', ngsi_type = 'TrafficFlowObserved')";

/// A notification as received: path, headers (lower-case names), body, when.
#[derive(Clone, Debug)]
struct Received {
    path: String,
    headers: Vec<(String, String)>,
    body: Value,
    at: Instant,
}

/// An HTTP endpoint that records every POST; paths starting with `/fail` answer 500 while
/// `failing` is set.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Received>>>,
    failing: Arc<AtomicBool>,
}

fn serve_conn(stream: TcpStream, got: Arc<Mutex<Vec<Received>>>, failing: Arc<AtomicBool>) {
    let mut out = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let fail = path.starts_with("/fail") && failing.load(Ordering::SeqCst);
        got.lock().unwrap().push(Received {
            path,
            headers,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            at: Instant::now(),
        });
        let answer = if fail {
            "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n"
        } else {
            "HTTP/1.1 204 No Content\r\n\r\n"
        };
        if out.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

impl Receiver {
    fn start() -> Receiver {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let failing = Arc::new(AtomicBool::new(false));
        let (g, f) = (got.clone(), failing.clone());
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let (g, f) = (g.clone(), f.clone());
                std::thread::spawn(move || serve_conn(s, g, f));
            }
        });
        Receiver { port, got, failing }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The notifications received on `path` so far.
    fn on(&self, path: &str) -> Vec<Received> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Waits until `path` has received notifications whose entities satisfy `done`.
    fn wait(&self, path: &str, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let t = Instant::now();
        loop {
            let data: Vec<Value> = self
                .on(path)
                .iter()
                .flat_map(|r| r.body["data"].as_array().cloned().unwrap_or_default())
                .collect();
            if done(&data) {
                return data;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{what}: {path} received {data:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn raw(
    s: &Server,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> (u16, Value, Option<String>) {
    let agent = common::agent();
    let url = format!("{}{path}", s.url);
    let auth = format!("Bearer {token}");
    let r = match (method, body) {
        ("GET", _) => agent.get(&url).header("Authorization", &auth).call(),
        ("DELETE", _) => agent.delete(&url).header("Authorization", &auth).call(),
        ("POST", Some(b)) => agent
            .post(&url)
            .header("Authorization", &auth)
            .header("Content-Type", "application/json")
            .send(b.to_string()),
        ("PATCH", Some(b)) => agent
            .patch(&url)
            .header("Authorization", &auth)
            .header("Content-Type", "application/json")
            .send(b.to_string()),
        _ => panic!("{method}"),
    };
    let mut r = r.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = r.status().as_u16();
    let location = r
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = r.body_mut().read_to_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
        location,
    )
}

fn id(i: usize) -> String {
    format!("urn:ngsi-ld:TrafficFlowObserved:seg-{i:04}")
}

fn entity(i: usize, intensity: i64, speed: f64) -> Value {
    json!({
        "id": id(i), "type": "TrafficFlowObserved",
        "intensity": intensity, "averageVehicleSpeed": speed,
        "district": "西湖区", "operator": format!("张{i}"),
        "dateObserved": "2026-11-26T08:00:00Z",
    })
}

fn upsert(s: &Server, token: &str, entities: Vec<Value>) {
    let (status, v, _) = raw(
        s,
        "POST",
        "/ngsi-ld/v1/entityOperations/upsert?options=update",
        token,
        Some(&Value::Array(entities)),
    );
    assert!(status == 201 || status == 204, "{status} {v}");
}

fn subscribe(s: &Server, token: &str, body: Value) -> String {
    let (status, v, loc) = raw(s, "POST", "/ngsi-ld/v1/subscriptions", token, Some(&body));
    assert_eq!(status, 201, "{v}");
    let loc = loc.expect("Location");
    loc.strip_prefix("/ngsi-ld/v1/subscriptions/")
        .expect("location of a subscription")
        .to_string()
}

fn ids_of(data: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = data
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

#[test]
fn ngsi_ld_subscriptions_end_to_end() {
    let rx = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let allow = rx.url("/");
    let mut s = Server::start_with(dir.path(), &["--notify-allow", &allow]);
    s.dept("traffic");
    s.dept("police");
    let steward = s.principal("tsteward", "steward", Some("traffic"));
    let device = s.principal("iot_agent", "service", Some("traffic"));
    let police = s.principal("pofficer", "analyst", Some("police"));
    let psteward = s.principal("psteward", "steward", Some("police"));
    let (status, v) = s.call(
        "POST",
        "/api/v1/sql",
        Some(&steward),
        Some(&json!({ "sql": STREAM }).to_string()),
    );
    assert_eq!(status, 200, "{v}");
    upsert(&s, &device, (0..5).map(|i| entity(i, 10, 40.0)).collect());

    // Only endpoints the operator allows; the refusal is audited.
    let jams = json!({
        "type": "Subscription",
        "entities": [{"type": "TrafficFlowObserved"}],
        "watchedAttributes": ["intensity"],
        "q": "intensity>100",
        "notification": {"attributes": ["intensity", "district"], "format": "keyValues",
                         "endpoint": {"uri": rx.url("/jams"), "accept": "application/json"}},
    });
    let mut elsewhere = jams.clone();
    elsewhere["notification"]["endpoint"]["uri"] = json!("http://127.0.0.2:9/hook");
    let (status, v, _) = raw(
        &s,
        "POST",
        "/ngsi-ld/v1/subscriptions",
        &steward,
        Some(&elsewhere),
    );
    assert_eq!(status, 403, "{v}");
    let mut lookalike = jams.clone();
    lookalike["notification"]["endpoint"]["uri"] =
        json!(format!("http://127.0.0.1:{}@evil.example/", rx.port));
    let (status, v, _) = raw(
        &s,
        "POST",
        "/ngsi-ld/v1/subscriptions",
        &steward,
        Some(&lookalike),
    );
    assert_eq!(status, 400, "credentials in the URI: {v}");
    for (bad, why) in [
        (
            json!({"type": "Subscription", "entities": [{"type": "TrafficFlowObserved"}]}),
            "no notification",
        ),
        (
            json!({"entities": [{"type": "TrafficFlowObserved"}], "watchedAttributes": ["nope"],
                "notification": {"endpoint": {"uri": rx.url("/x")}}}),
            "unknown attribute",
        ),
        (
            json!({"entities": [{"type": "TrafficFlowObserved"}], "timeInterval": 5,
                "notification": {"endpoint": {"uri": rx.url("/x")}}}),
            "periodic",
        ),
        (
            json!({"entities": [{"type": "TrafficFlowObserved"}], "q": "intensity>>1",
                "notification": {"endpoint": {"uri": rx.url("/x")}}}),
            "bad q",
        ),
    ] {
        let (status, v, _) = raw(
            &s,
            "POST",
            "/ngsi-ld/v1/subscriptions",
            &steward,
            Some(&bad),
        );
        assert_eq!(status, 400, "{why}: {v}");
        assert_eq!(
            v["type"], "https://uri.etsi.org/ngsi-ld/errors/BadRequestData",
            "{why}: {v}"
        );
    }

    // Watched attributes and q: only changes of intensity to above 100 are notified.
    let sid = subscribe(&s, &steward, jams.clone());
    assert!(sid.starts_with("urn:ngsi-ld:Subscription:"), "{sid}");
    upsert(
        &s,
        &device,
        vec![
            entity(0, 150, 40.0),
            entity(1, 200, 40.0),
            entity(2, 50, 40.0),
            entity(7, 300, 20.0),
        ],
    );
    let data = rx.wait("/jams", "jams", |d| ids_of(d).len() >= 3);
    assert_eq!(ids_of(&data), vec![id(0), id(1), id(7)], "{data:?}");
    let first = &rx.on("/jams")[0];
    assert_eq!(first.body["type"], "Notification", "{:?}", first.body);
    assert_eq!(first.body["subscriptionId"], json!(sid));
    assert!(
        first
            .headers
            .iter()
            .any(|(k, v)| k == "content-type" && v == "application/json")
    );
    assert!(
        first.headers.iter().any(|(k, _)| k == "link"),
        "a JSON notification links its context"
    );
    let e0 = data.iter().find(|e| e["id"] == json!(id(0))).unwrap();
    assert_eq!(e0["intensity"], 150, "{e0}");
    assert_eq!(e0["district"], "西湖区", "{e0}");
    assert!(
        e0.get("averageVehicleSpeed").is_none(),
        "only the attributes asked for: {e0}"
    );
    // A change of an attribute not watched, and one that does not match q: nothing.
    let before = rx.on("/jams").len();
    upsert(&s, &device, vec![entity(0, 150, 10.0), entity(3, 90, 40.0)]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(rx.on("/jams").len(), before, "{:?}", rx.on("/jams"));
    // A PATCH of a watched attribute is.
    let (status, v, _) = raw(
        &s,
        "PATCH",
        &format!("/ngsi-ld/v1/entities/{}/attrs", id(3)),
        &device,
        Some(&json!({"intensity": {"type": "Property", "value": 111}})),
    );
    assert_eq!(status, 204, "{v}");
    let data = rx.wait("/jams", "patched", |d| {
        d.iter().any(|e| e["id"] == json!(id(3)))
    });
    assert!(
        data.iter()
            .any(|e| e["id"] == json!(id(3)) && e["intensity"] == 111)
    );

    // Its status, to its owner only.
    let (status, v, _) = raw(
        &s,
        "GET",
        &format!("/ngsi-ld/v1/subscriptions/{sid}"),
        &steward,
        None,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "active", "{v}");
    assert_eq!(v["notification"]["status"], "ok", "{v}");
    assert!(v["notification"]["timesSent"].as_u64().unwrap() >= 2, "{v}");
    assert_eq!(v["watchedAttributes"], json!(["intensity"]), "{v}");
    let (status, v, _) = raw(
        &s,
        "GET",
        &format!("/ngsi-ld/v1/subscriptions/{sid}"),
        &police,
        None,
    );
    assert_eq!(
        status, 404,
        "another principal's subscription is unknown to them: {v}"
    );
    let (status, v, _) = raw(&s, "GET", "/ngsi-ld/v1/subscriptions/", &police, None);
    assert_eq!((status, v), (200, json!([])));
    let (status, v, _) = raw(
        &s,
        "DELETE",
        &format!("/ngsi-ld/v1/subscriptions/{sid}"),
        &police,
        None,
    );
    assert_eq!(status, 404, "{v}");

    // Another department subscribes only under a grant, and sees what the grant shows.
    let all = |uri: String| {
        json!({"entities": [{"type": "TrafficFlowObserved", "idPattern": "seg-000[0-4]$"}],
               "notification": {"format": "keyValues", "endpoint": {"uri": uri}}})
    };
    let (status, v, _) = raw(
        &s,
        "POST",
        "/ngsi-ld/v1/subscriptions",
        &police,
        Some(&all(rx.url("/police"))),
    );
    assert_eq!(status, 403, "{v}");
    let (status, v) = s.call(
        "POST",
        "/api/v1/datasets/traffic/flow_latest/columns/operator/class",
        Some(&steward),
        Some(r#"{"class":"personal"}"#),
    );
    assert_eq!(status, 200, "{v}");
    let until = (chrono::Utc::now() + chrono::Duration::days(30))
        .date_naive()
        .to_string();
    let (status, g) = s.call(
        "POST",
        "/api/v1/grants",
        Some(&psteward),
        Some(
            &json!({"dataset": "traffic.flow_latest", "columns": ["id", "intensity", "operator"],
                     "purpose": "incident response: flow at the scene", "until": until})
            .to_string(),
        ),
    );
    assert_eq!(status, 201, "{g}");
    let gid = g["id"].as_str().unwrap().to_string();
    let (status, v) = s.call(
        "POST",
        &format!("/api/v1/grants/{gid}/approve"),
        Some(&steward),
        None,
    );
    assert_eq!(status, 200, "{v}");
    let mut narrow = all(rx.url("/police"));
    narrow["notification"]["attributes"] = json!(["averageVehicleSpeed"]);
    let (status, v, _) = raw(
        &s,
        "POST",
        "/ngsi-ld/v1/subscriptions",
        &police,
        Some(&narrow),
    );
    assert_eq!(status, 403, "an attribute outside the grant: {v}");
    let psid = subscribe(&s, &police, all(rx.url("/police")));
    upsert(&s, &device, vec![entity(4, 42, 40.0), entity(9, 42, 40.0)]);
    let data = rx.wait("/police", "grantee", |d| !d.is_empty());
    assert_eq!(ids_of(&data), vec![id(4)], "idPattern: {data:?}");
    assert_eq!(data[0]["intensity"], 42);
    assert_eq!(data[0]["operator"], "**", "masked: {:?}", data[0]);
    assert!(
        data[0].get("averageVehicleSpeed").is_none(),
        "not granted: {:?}",
        data[0]
    );
    // The grant revoked: the next match is not sent, the subscription is paused, audited.
    let (status, v) = s.call(
        "POST",
        &format!("/api/v1/grants/{gid}/revoke"),
        Some(&steward),
        Some(r#"{"reason": "incident closed"}"#),
    );
    assert_eq!(status, 200, "{v}");
    let sent = rx.on("/police").len();
    upsert(&s, &device, vec![entity(4, 43, 40.0)]);
    let t = Instant::now();
    loop {
        let (_, v, _) = raw(
            &s,
            "GET",
            &format!("/ngsi-ld/v1/subscriptions/{psid}"),
            &police,
            None,
        );
        if v["status"] == "paused" {
            assert!(v["pausedReason"].as_str().is_some(), "{v}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "not paused: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        rx.on("/police").len(),
        sent,
        "nothing sent after the revoke"
    );

    // A failing endpoint: retried with backoff, marked failed, the latest state delivered
    // once it answers again.
    rx.failing.store(true, Ordering::SeqCst);
    let fsid = subscribe(
        &s,
        &steward,
        json!({"entities": [{"type": "TrafficFlowObserved", "id": id(5)}],
               "notification": {"format": "keyValues", "endpoint": {"uri": rx.url("/fail")}}}),
    );
    upsert(&s, &device, vec![entity(5, 1, 40.0)]);
    let t = Instant::now();
    loop {
        let (_, v, _) = raw(
            &s,
            "GET",
            &format!("/ngsi-ld/v1/subscriptions/{fsid}"),
            &steward,
            None,
        );
        if v["notification"]["timesFailed"].as_u64().unwrap_or(0) >= 2 {
            assert_eq!(v["notification"]["status"], "failed", "{v}");
            assert_eq!(v["notification"]["lastFailureReason"], "HTTP 500", "{v}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no retries: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    upsert(&s, &device, vec![entity(5, 2, 40.0)]);
    rx.failing.store(false, Ordering::SeqCst);
    let t = Instant::now();
    loop {
        let (_, v, _) = raw(
            &s,
            "GET",
            &format!("/ngsi-ld/v1/subscriptions/{fsid}"),
            &steward,
            None,
        );
        if v["notification"]["status"] == "ok" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "not recovered: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let delivered = rx.on("/fail");
    let last = delivered.last().unwrap();
    assert_eq!(
        last.body["data"][0]["intensity"], 2,
        "the latest state: {:?}",
        last.body
    );

    // Throttling: at most one notification per 2 seconds.
    let tsid = subscribe(
        &s,
        &steward,
        json!({"entities": [{"type": "TrafficFlowObserved", "id": id(6)}], "throttling": 2,
               "notification": {"endpoint": {"uri": rx.url("/slow"), "accept": "application/ld+json"}}}),
    );
    for k in 0..6 {
        upsert(&s, &device, vec![entity(6, 500 + k, 40.0)]);
        std::thread::sleep(Duration::from_millis(150));
    }
    rx.wait("/slow", "throttled", |d| {
        d.iter().any(|e| e["intensity"]["value"] == 505)
    });
    let slow = rx.on("/slow");
    assert!(slow.len() >= 2, "{slow:?}");
    for w in slow.windows(2) {
        assert!(
            w[1].at - w[0].at >= Duration::from_millis(1900),
            "throttled: {slow:?}"
        );
    }
    assert!(
        slow[0]
            .headers
            .iter()
            .any(|(k, v)| k == "content-type" && v == "application/ld+json")
    );
    assert!(slow[0].body.get("@context").is_some(), "{:?}", slow[0].body);
    assert_eq!(
        slow[0].body["data"][0]["intensity"]["type"], "Property",
        "normalized"
    );

    // Paused: nothing; resumed: notified again. Expired: nothing, and said so.
    let (status, v, _) = raw(
        &s,
        "PATCH",
        &format!("/ngsi-ld/v1/subscriptions/{tsid}"),
        &steward,
        Some(&json!({"isActive": false})),
    );
    assert_eq!(status, 204, "{v}");
    let n = rx.on("/slow").len();
    upsert(&s, &device, vec![entity(6, 600, 40.0)]);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(rx.on("/slow").len(), n);
    let (status, v, _) = raw(
        &s,
        "PATCH",
        &format!("/ngsi-ld/v1/subscriptions/{tsid}"),
        &steward,
        Some(&json!({"isActive": true, "throttling": 0})),
    );
    assert_eq!(status, 204, "{v}");
    upsert(&s, &device, vec![entity(6, 601, 40.0)]);
    rx.wait("/slow", "resumed", |d| {
        d.iter().any(|e| e["intensity"]["value"] == 601)
    });
    let (status, v, _) = raw(
        &s,
        "PATCH",
        &format!("/ngsi-ld/v1/subscriptions/{tsid}"),
        &steward,
        Some(&json!({"expiresAt": "2020-01-01T00:00:00Z"})),
    );
    assert_eq!(status, 204, "{v}");
    let (_, v, _) = raw(
        &s,
        "GET",
        &format!("/ngsi-ld/v1/subscriptions/{tsid}"),
        &steward,
        None,
    );
    assert_eq!(v["status"], "expired", "{v}");

    // Kept across a restart, and still notifying.
    s.terminate();
    let s = Server::start_with(dir.path(), &["--notify-allow", &allow]);
    let (status, v, _) = raw(
        &s,
        "GET",
        "/ngsi-ld/v1/subscriptions?count=true",
        &steward,
        None,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v.as_array().unwrap().len(), 3, "{v}");
    let (_, v, _) = raw(
        &s,
        "GET",
        &format!("/ngsi-ld/v1/subscriptions/{sid}"),
        &steward,
        None,
    );
    assert!(
        v["notification"]["timesSent"].as_u64().unwrap() >= 2,
        "counters kept: {v}"
    );
    let n = rx.on("/jams").len();
    upsert(&s, &device, vec![entity(8, 999, 40.0)]);
    rx.wait("/jams", "after restart", |d| {
        d.iter().any(|e| e["id"] == json!(id(8)))
    });
    assert_eq!(rx.on("/jams").len(), n + 1);

    // Deleted: gone, nothing more sent.
    let (status, v, _) = raw(
        &s,
        "DELETE",
        &format!("/ngsi-ld/v1/subscriptions/{sid}"),
        &steward,
        None,
    );
    assert_eq!(status, 204, "{v}");
    let (status, _, _) = raw(
        &s,
        "GET",
        &format!("/ngsi-ld/v1/subscriptions/{sid}"),
        &steward,
        None,
    );
    assert_eq!(status, 404);
    upsert(&s, &device, vec![entity(8, 1000, 40.0)]);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(rx.on("/jams").len(), n + 1);

    // Every notification and every change of a subscription is in the audit chain.
    let audit = s.audit_all();
    let count = |action: &str, who: &str, outcome: &str| {
        audit
            .iter()
            .filter(|r| r["action"] == action && r["principal"] == who && r["outcome"] == outcome)
            .count()
    };
    assert!(
        count("subscription.notify", "tsteward", "ok") >= 5,
        "notifications audited"
    );
    assert!(
        count("subscription.notify", "tsteward", "failed") >= 2,
        "failures audited"
    );
    assert_eq!(
        count("subscription.notify", "pofficer", "denied"),
        1,
        "the revoked grant"
    );
    assert!(
        count("subscription.create", "tsteward", "denied") >= 1,
        "endpoint refused"
    );
    assert_eq!(count("subscription.delete", "tsteward", "ok"), 1);
    assert!(count("subscription.update", "tsteward", "ok") >= 3);
}
