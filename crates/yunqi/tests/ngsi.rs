//! NGSI-LD end to end over the real binary: a steward maps an entity type to a stream, a
//! device account creates, batch-upserts and patches entities (bad ones refused one by one),
//! entities are retrieved and queried with `q` exactly as a model of the same changes says,
//! the latest state is a SQL table, a continuous view counts the changes, another department
//! reads only under a grant (columns and masks applied), and acknowledged changes survive
//! `kill -9`.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::Server;
use serde_json::{Value, json};

const STREAM: &str = "CREATE STREAM traffic.flow (id TEXT, date_observed TIMESTAMP, intensity INT, \
    average_vehicle_speed DOUBLE, district TEXT, ref_road_segment TEXT, location TEXT, operator TEXT) \
    WITH (event_time = 'date_observed', watermark = '5 seconds', ngsi_type = 'TrafficFlowObserved')";

const DISTRICTS: [&str; 4] = ["西湖区", "上城区", "滨江区", "拱墅区"];

/// A request with its status, headers and JSON body.
fn raw(
    s: &Server,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> (u16, Vec<(String, String)>, Value) {
    let agent = common::agent();
    let url = format!("{}{path}", s.url);
    let auth = format!("Bearer {token}");
    let result = match (method, body) {
        ("GET", _) => agent.get(&url).header("Authorization", &auth).call(),
        ("POST", Some(b)) => agent
            .post(&url)
            .header("Authorization", &auth)
            .header("Content-Type", "application/ld+json")
            .send(b.to_string()),
        ("DELETE", _) => agent.delete(&url).header("Authorization", &auth).call(),
        ("PATCH", Some(b)) => agent
            .patch(&url)
            .header("Authorization", &auth)
            .header("Content-Type", "application/json")
            .send(b.to_string()),
        _ => panic!("{method}"),
    };
    let mut r = result.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = r.status().as_u16();
    let headers = r
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn sql(s: &Server, token: &str, q: &str) -> (u16, Value) {
    s.call(
        "POST",
        "/api/v1/sql",
        Some(token),
        Some(&json!({ "sql": q }).to_string()),
    )
}

fn ts(sec: u64) -> String {
    (chrono::DateTime::parse_from_rfc3339("2026-11-26T08:00:00Z").unwrap()
        + chrono::Duration::seconds(sec as i64))
    .to_utc()
    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn id(i: usize) -> String {
    format!("urn:ngsi-ld:TrafficFlowObserved:seg-{i:04}")
}

/// The model's state of one entity: intensity, speed, district, observed second.
type Model = BTreeMap<String, (i64, f64, String, u64)>;

fn kv(i: usize, intensity: i64, speed: f64, sec: u64) -> Value {
    json!({
        "id": id(i),
        "type": "TrafficFlowObserved",
        "intensity": intensity,
        "averageVehicleSpeed": speed,
        "district": DISTRICTS[i % 4],
        "refRoadSegment": format!("urn:ngsi-ld:RoadSegment:{i}"),
        "location": {"type": "Point", "coordinates": [120.1 + i as f64 / 1000.0, 30.25]},
        "operator": format!("张{i}"),
        "dateObserved": ts(sec),
    })
}

/// Every entity the query returns, page by page.
fn query_all(s: &Server, token: &str, q: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let (status, h, v) = raw(
            s,
            "GET",
            &format!(
                "/ngsi-ld/v1/entities?type=TrafficFlowObserved&q={}&limit=37&offset={offset}&count=true&options=keyValues",
                urlencode(q)
            ),
            token,
            None,
        );
        assert_eq!(status, 200, "{q}: {v}");
        let page = v.as_array().unwrap().clone();
        let total: usize = header(&h, "NGSILD-Results-Count").unwrap().parse().unwrap();
        offset += page.len();
        out.extend(page);
        if offset >= total {
            assert_eq!(out.len(), total);
            return out;
        }
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ngsi_ld_entities_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path());
    s.dept("traffic");
    s.dept("police");
    let steward = s.principal("tsteward", "steward", Some("traffic"));
    let device = s.principal("iot_agent", "service", Some("traffic"));
    let police = s.principal("pofficer", "analyst", Some("police"));
    let psteward = s.principal("psteward", "steward", Some("police"));

    // An entity type maps to one stream.
    let (status, v) = sql(&s, &steward, STREAM);
    assert_eq!(status, 200, "{v}");
    let (status, v) = sql(
        &s,
        &steward,
        &STREAM.replace("traffic.flow ", "traffic.flow2 "),
    );
    assert_eq!(status, 409, "{v}");
    let (status, _, v) = raw(&s, "GET", "/ngsi-ld/v1/types", &steward, None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["typeList"], json!(["TrafficFlowObserved"]), "{v}");

    // Create one entity (normalized); again is a conflict.
    let first = json!({
        "id": id(0), "type": "TrafficFlowObserved",
        "@context": "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context.jsonld",
        "intensity": {"type": "Property", "value": 7, "observedAt": ts(1)},
        "averageVehicleSpeed": {"type": "Property", "value": 33.5},
        "district": {"type": "Property", "value": DISTRICTS[0]},
        "refRoadSegment": {"type": "Relationship", "object": "urn:ngsi-ld:RoadSegment:0"},
    });
    let (status, h, v) = raw(&s, "POST", "/ngsi-ld/v1/entities", &device, Some(&first));
    assert_eq!(status, 201, "{v}");
    assert_eq!(
        header(&h, "location"),
        Some(format!("/ngsi-ld/v1/entities/{}", id(0)).as_str())
    );
    let (status, _, v) = raw(&s, "POST", "/ngsi-ld/v1/entities", &device, Some(&first));
    assert_eq!(status, 409, "{v}");
    assert_eq!(
        v["type"], "https://uri.etsi.org/ngsi-ld/errors/AlreadyExists",
        "{v}"
    );

    // Batch upsert: 300 entities, two of them bad, refused by id with the reason.
    let mut model: Model = BTreeMap::new();
    let mut batch = Vec::new();
    for i in 0..300 {
        let intensity = ((i * 37) % 1000) as i64;
        let speed = (i % 90) as f64 + 0.5;
        batch.push(kv(i, intensity, speed, 10 + i as u64 / 10));
        model.insert(
            id(i),
            (
                intensity,
                speed,
                DISTRICTS[i % 4].into(),
                10 + i as u64 / 10,
            ),
        );
    }
    batch.push(json!({"id": id(900), "type": "TrafficFlowObserved", "colour": "red"}));
    batch.push(json!({"id": id(901), "type": "TrafficFlowObserved", "intensity": "heavy"}));
    let (status, _, v) = raw(
        &s,
        "POST",
        "/ngsi-ld/v1/entityOperations/upsert",
        &device,
        Some(&Value::Array(batch)),
    );
    assert_eq!(status, 207, "{v}");
    assert_eq!(v["success"].as_array().unwrap().len(), 300);
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{v}");
    assert_eq!(errors[0]["entityId"], id(900));
    assert!(
        errors[0]["error"]["detail"]
            .as_str()
            .unwrap()
            .contains("colour"),
        "{v}"
    );
    assert_eq!(errors[1]["entityId"], id(901));
    assert!(
        errors[1]["error"]["detail"]
            .as_str()
            .unwrap()
            .contains("intensity"),
        "{v}"
    );

    // Upsert with options=update merges: only intensity changes; all existed, so 204.
    let updates: Vec<Value> = (0..300)
        .step_by(3)
        .map(|i| json!({"id": id(i), "type": "TrafficFlowObserved", "intensity": 2000 + i as i64}))
        .collect();
    let (status, _, v) = raw(
        &s,
        "POST",
        "/ngsi-ld/v1/entityOperations/upsert?options=update",
        &device,
        Some(&Value::Array(updates)),
    );
    assert_eq!(status, 204, "{v}");
    // (An update without an observation time is observed when it arrives.)
    const NOW: u64 = u64::MAX;
    for i in (0..300).step_by(3) {
        let e = model.get_mut(&id(i)).unwrap();
        e.0 = 2000 + i as i64;
        e.3 = NOW;
    }
    // Patch: a recorded attribute changes, an unknown one is reported; an unknown entity is 404.
    let (status, _, v) = raw(
        &s,
        "PATCH",
        &format!("/ngsi-ld/v1/entities/{}/attrs", id(5)),
        &device,
        Some(&json!({"intensity": {"type": "Property", "value": 999}, "colour": "red"})),
    );
    assert_eq!(status, 207, "{v}");
    assert_eq!(v["updated"], json!(["intensity"]), "{v}");
    assert_eq!(v["notUpdated"][0]["attributeName"], "colour", "{v}");
    let e = model.get_mut(&id(5)).unwrap();
    (e.0, e.3) = (999, NOW);
    let (status, _, v) = raw(
        &s,
        "PATCH",
        "/ngsi-ld/v1/entities/urn:x:nobody/attrs",
        &device,
        Some(&json!({"intensity": 1})),
    );
    assert_eq!(status, 404, "{v}");
    assert_eq!(
        v["type"], "https://uri.etsi.org/ngsi-ld/errors/ResourceNotFound",
        "{v}"
    );

    // Retrieve: normalized, key-values, a subset of attributes.
    let (status, _, v) = raw(
        &s,
        "GET",
        &format!("/ngsi-ld/v1/entities/{}", id(5)),
        &steward,
        None,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["type"], "TrafficFlowObserved");
    assert_eq!(v["intensity"], json!({"type": "Property", "value": 999}));
    assert_eq!(v["refRoadSegment"]["object"], "urn:ngsi-ld:RoadSegment:5");
    assert_eq!(v["location"]["value"]["type"], "Point", "{v}");
    let observed = v["dateObserved"]["value"]["@value"].as_str().unwrap();
    assert!(
        observed > ts(3600).as_str(),
        "patched, observed on arrival: {v}"
    );
    let (_, _, v) = raw(
        &s,
        "GET",
        &format!(
            "/ngsi-ld/v1/entities/{}?options=keyValues&attrs=intensity,district",
            id(5)
        ),
        &steward,
        None,
    );
    assert_eq!(
        v,
        json!({"id": id(5), "type": "TrafficFlowObserved", "intensity": 999, "district": DISTRICTS[1]})
    );
    let (status, _, _) = raw(
        &s,
        "GET",
        "/ngsi-ld/v1/entities/urn:x:nobody",
        &steward,
        None,
    );
    assert_eq!(status, 404);

    // Query by type with q: the entities a model of the same changes says, in id order.
    type Pred = fn(&(i64, f64, String, u64)) -> bool;
    let cases: [(&str, Pred); 4] = [
        ("intensity>=500", |e| e.0 >= 500),
        ("intensity>=500;district==\"西湖区\"", |e| {
            e.0 >= 500 && e.2 == "西湖区"
        }),
        (
            "averageVehicleSpeed<10.5|district==\"拱墅区\",\"上城区\"",
            |e| e.1 < 10.5 || e.2 == "拱墅区" || e.2 == "上城区",
        ),
        (
            "(intensity==100..400|intensity>2100);dateObserved>=2026-11-26T08:00:20Z",
            |e| ((100..=400).contains(&e.0) || e.0 > 2100) && e.3 >= 20,
        ),
    ];
    for (q, pred) in cases {
        let got: Vec<String> = query_all(&s, &steward, q)
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect();
        let want: Vec<String> = model
            .iter()
            .filter(|(_, e)| pred(e))
            .map(|(k, _)| k.clone())
            .collect();
        assert!(!want.is_empty(), "{q}");
        assert_eq!(got, want, "{q}");
    }
    let (status, _, v) = raw(
        &s,
        "GET",
        "/ngsi-ld/v1/entities?q=intensity%3E1",
        &steward,
        None,
    );
    assert_eq!(status, 400, "{v}");
    assert_eq!(
        v["type"], "https://uri.etsi.org/ngsi-ld/errors/BadRequestData",
        "{v}"
    );
    let (status, _, v) = raw(
        &s,
        "GET",
        &format!(
            "/ngsi-ld/v1/entities?type=TrafficFlowObserved&q={}",
            urlencode("colour==\"red\"")
        ),
        &steward,
        None,
    );
    assert_eq!(status, 400, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("colour"), "{v}");

    // The stream takes no plain events: entity states come through NGSI-LD only.
    let (status, v) = s.call(
        "POST",
        "/api/v1/streams/traffic/flow/events",
        Some(&device),
        Some("{}"),
    );
    assert_eq!(status, 400, "{v}");

    // The latest state is a SQL table (a snapshot at most about a second old).
    // (The batch replaced the first entity, so 300 entities.)
    let want_sum: i64 = model.values().map(|e| e.0).sum::<i64>();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, v) = sql(
            &s,
            &steward,
            "SELECT count(*), sum(intensity) FROM traffic.flow_latest",
        );
        assert_eq!(status, 200, "{v}");
        if v["rows"][0] == json!([300, want_sum]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "entity table never caught up: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A continuous view over the entity stream counts the changes per minute of observation.
    let (status, v) = sql(
        &s,
        &steward,
        "CREATE CONTINUOUS VIEW traffic.flow_changes AS SELECT window_start, window_end, count(*) AS changes FROM TUMBLE(traffic.flow, date_observed, INTERVAL '1' MINUTE) GROUP BY window_start, window_end",
    );
    assert_eq!(status, 200, "{v}");

    // Another department: refused until a grant; then only the granted columns, masked.
    let (status, _, v) = raw(
        &s,
        "GET",
        &format!("/ngsi-ld/v1/entities/{}", id(5)),
        &police,
        None,
    );
    assert_eq!(status, 403, "{v}");
    let (status, _, v) = raw(
        &s,
        "POST",
        "/ngsi-ld/v1/entityOperations/upsert",
        &police,
        Some(&json!([kv(1, 1, 1.0, 1)])),
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
            &json!({
        "dataset": "traffic.flow_latest", "columns": ["id", "intensity", "operator"],
        "purpose": "incident response: flow at the scene", "until": until})
            .to_string(),
        ),
    );
    assert_eq!(status, 201, "{g}");
    let gid = g["id"].as_str().unwrap();
    let (status, v) = s.call(
        "POST",
        &format!("/api/v1/grants/{gid}/approve"),
        Some(&steward),
        None,
    );
    assert_eq!(status, 200, "{v}");
    let (status, _, v) = raw(
        &s,
        "GET",
        &format!("/ngsi-ld/v1/entities/{}?options=keyValues", id(5)),
        &police,
        None,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["intensity"], 999, "{v}");
    assert_eq!(v["operator"], "**", "masked: {v}");
    assert!(
        v.get("averageVehicleSpeed").is_none() && v.get("district").is_none(),
        "{v}"
    );
    let (status, _, v) = raw(
        &s,
        "GET",
        "/ngsi-ld/v1/entities?type=TrafficFlowObserved&q=district==%22x%22",
        &police,
        None,
    );
    assert_eq!(status, 403, "a q over an attribute the grant hides: {v}");

    // Acknowledged changes survive kill -9, before any snapshot could take them.
    let last: Vec<Value> = (0..300).map(|i| kv(i, 5000 + i as i64, 1.0, 100)).collect();
    let (status, _, v) = raw(
        &s,
        "POST",
        "/ngsi-ld/v1/entityOperations/upsert",
        &device,
        Some(&Value::Array(last)),
    );
    assert_eq!(status, 204, "{v}");
    s.kill9();
    let s = Server::start(dir.path());
    let (_, _, v) = raw(
        &s,
        "GET",
        &format!("/ngsi-ld/v1/entities/{}?options=keyValues", id(299)),
        &steward,
        None,
    );
    assert_eq!(v["intensity"], 5299, "{v}");
    let got = query_all(&s, &steward, "intensity>=5000");
    assert_eq!(got.len(), 300);
    // The view read every change the log holds: 1 + 300 + 100 + 1 + 300.
    let (_, stream) = s.call("GET", "/api/v1/streams/traffic/flow", Some(&steward), None);
    assert_eq!(stream["events"], 702, "{stream}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, v) = s.call(
            "GET",
            "/api/v1/views/traffic/flow_changes",
            Some(&steward),
            None,
        );
        assert_eq!(status, 200, "{v}");
        if v["offset"] == 702 {
            assert!(
                v["events_in"].as_u64().unwrap() + v["events_late"].as_u64().unwrap() == 702,
                "{v}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "view stuck: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Every write and read is in the audit chain.
    let audit = s.audit_all();
    let count = |action: &str, who: &str| {
        audit
            .iter()
            .filter(|r| r["action"] == action && r["principal"] == who)
            .count()
    };
    assert!(count("entity.write", "iot_agent") >= 5, "writes audited");
    assert!(
        count("entity.read", "pofficer") >= 1,
        "grantee reads audited"
    );
    assert!(
        audit
            .iter()
            .any(|r| r["principal"] == "pofficer" && r["outcome"] == "denied"),
        "denials audited"
    );
}

/// As published NGSI-LD clients send requests: paths with a trailing slash, and a query for a
/// type nobody records as their connectivity probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ngsi_ld_paths_with_trailing_slashes_and_empty_queries() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path());
    s.dept("traffic");
    s.dept("police");
    let steward = s.principal("tsteward", "steward", Some("traffic"));
    let device = s.principal("iot_agent", "service", Some("traffic"));
    let police = s.principal("pofficer", "analyst", Some("police"));
    let (status, v) = sql(&s, &steward, STREAM);
    assert_eq!(status, 200, "{v}");

    // The probe: a type that does not exist is an empty list, counted 0.
    let (status, h, v) = raw(
        &s,
        "GET",
        "/ngsi-ld/v1/entities/?type=NoSuchType&count=true",
        &device,
        None,
    );
    assert_eq!((status, &v), (200, &json!([])), "{v}");
    assert_eq!(header(&h, "ngsild-results-count"), Some("0"));

    // Creates and batch operations with a trailing slash land as without one.
    let one = kv(1, 5, 40.0, 1);
    let (status, _, v) = raw(&s, "POST", "/ngsi-ld/v1/entities/", &device, Some(&one));
    assert_eq!(status, 201, "{v}");
    let batch = json!([kv(2, 6, 41.0, 2), kv(3, 7, 42.0, 3)]);
    let (status, _, v) = raw(
        &s,
        "POST",
        "/ngsi-ld/v1/entityOperations/create/",
        &device,
        Some(&batch),
    );
    assert_eq!(status, 201, "{v}");
    let (status, _, v) = raw(
        &s,
        "POST",
        "/ngsi-ld/v1/entityOperations/upsert/?options=update",
        &device,
        Some(&json!([kv(3, 70, 42.0, 4)])),
    );
    assert_eq!(status, 204, "{v}");
    let (status, h, v) = raw(
        &s,
        "GET",
        "/ngsi-ld/v1/entities/?type=TrafficFlowObserved&count=true&options=keyValues",
        &device,
        None,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(header(&h, "ngsild-results-count"), Some("3"), "{v}");
    assert_eq!(v[2]["intensity"], 70, "{v}");
    let (status, _, v) = raw(&s, "GET", "/ngsi-ld/v1/types/", &device, None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["typeList"], json!(["TrafficFlowObserved"]), "{v}");
    // Content negotiation: JSON-LD puts the @context in the body, JSON in a Link header;
    // neither is 406; a body that is not JSON is 415.
    let path = format!("/ngsi-ld/v1/entities/{}", id(1));
    let get_with = |accept: &str| {
        let mut r = common::agent()
            .get(format!("{}{path}", s.url))
            .header("Authorization", format!("Bearer {device}"))
            .header("Accept", accept)
            .call()
            .unwrap();
        let status = r.status().as_u16();
        let ct = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        let link = r.headers().get("link").is_some();
        let body: Value =
            serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap_or(Value::Null);
        (status, ct, link, body)
    };
    let (status, ct, link, body) = get_with("application/ld+json");
    assert_eq!(status, 200, "{body}");
    assert_eq!(ct.as_deref(), Some("application/ld+json"));
    assert!(!link, "no Link header with JSON-LD");
    assert!(
        body["@context"]
            .as_str()
            .unwrap()
            .contains("ngsi-ld-core-context"),
        "{body}"
    );
    let (status, ct, link, body) = get_with("application/json");
    assert_eq!(status, 200, "{body}");
    assert!(ct.unwrap().starts_with("application/json"));
    assert!(link && body.get("@context").is_none(), "{body}");
    let (status, _, _, body) = get_with("text/html");
    assert_eq!(status, 406, "{body}");
    let r = common::agent()
        .post(format!("{}/ngsi-ld/v1/entities", s.url))
        .header("Authorization", format!("Bearer {device}"))
        .header("Content-Type", "text/plain")
        .send(kv(9, 1, 1.0, 1).to_string())
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    // Temporal queries over the log: an attribute's instances in time order, each observed
    // at its event time; lastN, timerel and temporalValues; an unknown type is empty.
    let path3 = format!("/ngsi-ld/v1/temporal/entities/{}", id(3));
    let (status, _, h3) = raw(&s, "GET", &path3, &device, None);
    assert_eq!(status, 200, "{h3}");
    let values: Vec<i64> = h3["intensity"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["value"].as_i64().unwrap())
        .collect();
    assert_eq!(values, [7, 70], "{h3}");
    assert_eq!(h3["intensity"][1]["observedAt"], ts(4), "{h3}");
    let (_, _, last) = raw(
        &s,
        "GET",
        &format!("{path3}?lastN=1&attrs=intensity"),
        &device,
        None,
    );
    assert_eq!(last["intensity"].as_array().unwrap().len(), 1, "{last}");
    assert!(last.get("district").is_none(), "{last}");
    let after = format!(
        "/ngsi-ld/v1/temporal/entities?type=TrafficFlowObserved&timerel=after&timeAt={}&options=temporalValues",
        urlencode(&ts(3))
    );
    let (status, _, v) = raw(&s, "GET", &after, &device, None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v.as_array().unwrap().len(),
        1,
        "only entity 3 changed after second 3: {v}"
    );
    assert_eq!(v[0]["intensity"]["values"], json!([[70, ts(4)]]), "{v}");
    let (status, _, agg) = raw(
        &s,
        "GET",
        &format!(
            "{path3}?options=aggregatedValues&aggrMethods=totalCount,avg,max&aggrPeriodDuration=PT1H&attrs=intensity"
        ),
        &device,
        None,
    );
    assert_eq!(status, 200, "{agg}");
    assert_eq!(agg["intensity"]["totalCount"][0][0], 2, "{agg}");
    assert_eq!(agg["intensity"]["avg"][0][0], 38.5, "{agg}");
    assert_eq!(agg["intensity"]["max"][0][0], 70.0, "{agg}");
    let (status, _, v) = raw(
        &s,
        "GET",
        &format!("{path3}?aggrMethods=median"),
        &device,
        None,
    );
    assert_eq!(status, 400, "{v}");
    let (status, _, v) = raw(
        &s,
        "GET",
        "/ngsi-ld/v1/temporal/entities?type=NoSuchType",
        &device,
        None,
    );
    assert_eq!((status, v), (200, json!([])));
    let (status, _, v) = raw(&s, "GET", &path3, &police, None);
    assert_eq!(status, 403, "{v}");
    // Geo-queries on the location: near a point within a distance (metres, great circle),
    // within a polygon; a bad geometry says what to send.
    let geo = |georel: &str, geometry: &str, coords: &str| {
        let (status, _, v) = raw(
            &s,
            "GET",
            &format!(
                "/ngsi-ld/v1/entities?type=TrafficFlowObserved&georel={}&geometry={geometry}&coordinates={}",
                urlencode(georel),
                urlencode(coords)
            ),
            &device,
            None,
        );
        let ids: Vec<String> = v
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| e["id"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default();
        (status, ids, v)
    };
    assert_eq!(
        geo("near;maxDistance==50", "Point", "[120.102,30.25]").1,
        [id(2)]
    );
    assert_eq!(
        geo("near;maxDistance==100", "Point", "[120.102,30.25]").1,
        [id(1), id(2), id(3)]
    );
    assert_eq!(
        geo("near;minDistance==50", "Point", "[120.102,30.25]").1,
        [id(1), id(3)]
    );
    let square =
        "[[[120.1005,30.2],[120.1025,30.2],[120.1025,30.3],[120.1005,30.3],[120.1005,30.2]]]";
    assert_eq!(geo("within", "Polygon", square).1, [id(1), id(2)]);
    assert_eq!(geo("disjoint", "Polygon", square).1, [id(3)]);
    let (status, _, v) = geo("near", "Point", "[120.1,30.2]");
    assert_eq!(status, 400, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("maxDistance"), "{v}");
    // An entity that does not exist is still not found, with or without the slash.
    let (status, _, _) = raw(
        &s,
        "GET",
        "/ngsi-ld/v1/entities/urn:ngsi-ld:TrafficFlowObserved:none/",
        &device,
        None,
    );
    assert_eq!(status, 404);

    // Deleting: one entity (204, then gone, then 404), a batch with one unknown id (207),
    // only by the type's department, audited, and still deleted after kill -9.
    let path1 = format!("/ngsi-ld/v1/entities/{}", id(1));
    let (status, _, v) = raw(&s, "DELETE", &path1, &police, None);
    assert_eq!(status, 403, "{v}");
    let (status, _, v) = raw(&s, "DELETE", &path1, &device, None);
    assert_eq!(status, 204, "{v}");
    let (status, _, _) = raw(&s, "GET", &path1, &device, None);
    assert_eq!(status, 404);
    let (status, _, v) = raw(&s, "DELETE", &format!("{path1}/"), &device, None);
    assert_eq!(status, 404, "{v}");
    let (status, _, v) = raw(
        &s,
        "POST",
        "/ngsi-ld/v1/entityOperations/delete/",
        &device,
        Some(&json!([id(2), id(77)])),
    );
    assert_eq!(status, 207, "{v}");
    assert_eq!(v["success"], json!([id(2)]), "{v}");
    assert_eq!(v["errors"][0]["entityId"], id(77), "{v}");
    let deletes = s
        .audit_all()
        .into_iter()
        .filter(|r| r["action"] == "entity.delete" && r["principal"] == "iot_agent")
        .count();
    assert_eq!(deletes, 2, "each delete request is audited");
    // Deleting one attribute: gone from the entity; again, or an unknown one, is 404; the
    // event time cannot be deleted; another department may not.
    let path3 = format!("/ngsi-ld/v1/entities/{}", id(3));
    let (status, _, v) = raw(
        &s,
        "DELETE",
        &format!("{path3}/attrs/operator"),
        &police,
        None,
    );
    assert_eq!(status, 403, "{v}");
    let (status, _, v) = raw(
        &s,
        "DELETE",
        &format!("{path3}/attrs/operator"),
        &device,
        None,
    );
    assert_eq!(status, 204, "{v}");
    let (_, _, e) = raw(
        &s,
        "GET",
        &format!("{path3}?options=keyValues"),
        &device,
        None,
    );
    assert!(e.get("operator").is_none() && e["intensity"] == 70, "{e}");
    for (attr, want) in [("operator", 404), ("colour", 404), ("dateObserved", 400)] {
        let (status, _, v) = raw(
            &s,
            "DELETE",
            &format!("{path3}/attrs/{attr}"),
            &device,
            None,
        );
        assert_eq!(status, want, "{attr}: {v}");
    }
    // A re-created entity is a new one.
    let (status, _, v) = raw(
        &s,
        "POST",
        "/ngsi-ld/v1/entities",
        &device,
        Some(&kv(2, 9, 9.0, 9)),
    );
    assert_eq!(status, 201, "{v}");
    s.kill9();
    s = Server::start(dir.path());
    let (status, _, all) = raw(
        &s,
        "GET",
        "/ngsi-ld/v1/entities?type=TrafficFlowObserved&options=keyValues",
        &device,
        None,
    );
    assert_eq!(status, 200, "{all}");
    let all = all.as_array().unwrap().clone();
    let ids: Vec<&str> = all.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [id(2), id(3)], "after kill -9");
    assert_eq!(all[0]["intensity"], 9);
    // The latest-state table follows (snapshotted at most once a second).
    let mut rows = Value::Null;
    for _ in 0..50 {
        let (_, v) = sql(
            &s,
            &steward,
            "SELECT id FROM traffic.flow_latest ORDER BY id",
        );
        rows = v["rows"].clone();
        if rows.as_array().is_some_and(|r| r.len() == 2) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(rows.as_array().map(Vec::len), Some(2), "{rows}");
}
