//! Sense end to end over the real binary: a steward declares a stream and a continuous view in
//! SQL, a service account sends events over HTTP (bad ones rejected by index), the view's rows
//! match the same aggregation written independently in batch SQL over the same events, late
//! events land in the late table, the live feed pushes closed windows, the view survives a
//! restart without writing a window twice, and other departments are refused.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use common::{Server, connect};
use serde_json::Value;

const STREAM: &str = "CREATE STREAM traffic.detections (plate TEXT, segment INT, district TEXT, speed DOUBLE, ts TIMESTAMP) WITH (event_time = 'ts', watermark = '5 seconds')";
const VIEW: &str = "CREATE CONTINUOUS VIEW traffic.flow_1m AS SELECT window_start, window_end, district, segment, grouping(segment) AS all_segments, count(*) AS vehicles, approx_count_distinct(plate) AS plates, avg(speed) AS speed FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE) GROUP BY window_start, window_end, ROLLUP(district, segment)";

const DISTRICTS: [&str; 3] = ["西湖区", "上城区", "滨江区"];

fn ts(sec: f64) -> String {
    let t = chrono::DateTime::parse_from_rfc3339("2026-11-26T00:00:00Z").unwrap()
        + chrono::Duration::microseconds((sec * 1e6) as i64);
    t.to_utc()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// `n` events over `secs` seconds starting at `from`, delivered up to 2 s out of order.
fn events(n: usize, from: f64, secs: f64, seed: u64) -> Vec<String> {
    let mut x = seed;
    let mut next = move || {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut out: Vec<(f64, String)> = (0..n)
        .map(|i| {
            let t = from + secs * i as f64 / n as f64;
            let seg = next() % 12;
            let plate = format!(
                "{}{:04}",
                if next() % 3 == 0 { "沪B" } else { "浙A" },
                next() % 150
            );
            let speed = (next() % 900) as f64 / 10.0;
            let line = format!(
                r#"{{"plate":"{plate}","segment":{seg},"district":"{}","speed":{speed},"ts":"{}"}}"#,
                DISTRICTS[(seg % 3) as usize],
                ts(t)
            );
            (t + (next() % 2000) as f64 / 1000.0, line)
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out.into_iter().map(|(_, l)| l).collect()
}

fn post_events(s: &Server, token: &str, query: &str, body: &str) -> (u16, Value) {
    post_events_keyed(s, token, query, None, body)
}

/// Posts NDJSON events, with an `Idempotency-Key` when given (on a cluster, to each node in
/// turn).
fn post_events_keyed(
    s: &Server,
    token: &str,
    query: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, Value) {
    post_events_at(&s.next_url(), token, query, key, body)
}

/// Posts NDJSON events to the node at `url`.
fn post_events_at(
    url: &str,
    token: &str,
    query: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let mut req = common::agent()
        .post(format!(
            "{url}/api/v1/streams/traffic/detections/events{query}"
        ))
        .header("Authorization", format!("Bearer {token}"))
        .header("Content-Type", "application/x-ndjson");
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let mut r = req.send(body).expect("post events");
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn sql(s: &Server, token: &str, q: &str) -> Value {
    let (status, v) = s.call(
        "POST",
        "/api/v1/sql",
        Some(token),
        Some(&serde_json::json!({ "sql": q }).to_string()),
    );
    assert_eq!(status, 200, "{q}: {v}");
    v
}

fn wait_view(s: &Server, token: &str, view: &str, offset: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, v) = s.call("GET", &format!("/api/v1/views/{view}"), Some(token), None);
        assert_eq!(status, 200, "{v}");
        if v["offset"].as_u64().unwrap_or(0) >= offset {
            return v;
        }
        assert!(Instant::now() < deadline, "view {view} stuck: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Rows (window_start, district, segment, all_segments, vehicles, plates, speed) keyed by
/// window, district, segment and the grouping flag.
fn keyed(rows: &Value) -> BTreeMap<String, (i64, i64, f64)> {
    let mut out = BTreeMap::new();
    for r in rows.as_array().unwrap() {
        let key = format!("{}|{}|{}|{}", r[0], r[1], r[2], r[3]);
        let v = (
            r[4].as_i64().unwrap_or_else(|| panic!("{r}")),
            r[5].as_i64().unwrap(),
            r[6].as_f64().unwrap(),
        );
        assert!(
            out.insert(key.clone(), v).is_none(),
            "row written twice: {key}"
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_continuous_views_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path());
    s.dept("traffic");
    s.dept("police");
    let steward = s.principal("tsteward", "steward", Some("traffic"));
    let camera = s.principal("cameras", "service", Some("traffic"));
    let outsider = s.principal("pofficer", "analyst", Some("police"));

    // Declared in SQL, over HTTP; the view over pgwire.
    let v = sql(&s, &steward, STREAM);
    assert_eq!(v["created"], "stream", "{v}");
    let client = connect(&s, "tsteward", &steward).await.unwrap();
    client.simple_query(VIEW).await.unwrap();
    let (status, v) = s.call("GET", "/api/v1/views", Some(&steward), None);
    assert_eq!(status, 200);
    assert_eq!(v["views"][0]["view"], "traffic.flow_1m", "{v}");
    // The camera account may not declare streams; nobody may declare a view that the engine
    // cannot compute.
    let (status, v) = s.call(
        "POST",
        "/api/v1/sql",
        Some(&camera),
        Some(&serde_json::json!({"sql": STREAM.replace("detections", "other")}).to_string()),
    );
    assert_eq!(status, 403, "{v}");
    let (status, v) = s.call("POST", "/api/v1/sql", Some(&steward), Some(&serde_json::json!({"sql": "CREATE CONTINUOUS VIEW traffic.bad AS SELECT window_start, median(speed) AS m FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE) GROUP BY window_start"}).to_string()));
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("median"),
        "{v}"
    );

    // Events: five minutes, three batches, three bad events in the first.
    let good = events(3_000, 0.0, 300.0, 42);
    let mut first: Vec<String> = good[..1000].to_vec();
    first.insert(
        10,
        r#"{"plate":"浙A0001","segment":1,"district":"西湖区","speed":3,"ts":"yesterday"}"#.into(),
    );
    first.insert(20, r#"{"plate":"浙A0001","segment":1,"district":"西湖区","speed":"fast","ts":"2026-11-26T00:00:01Z"}"#.into());
    first.insert(30, "not json".into());
    let (status, v) = post_events(&s, &camera, "", &first.join("\n"));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["accepted"], 1000, "{v}");
    assert_eq!(v["rejected"], 3, "{v}");
    let idx: Vec<u64> = v["rejections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, vec![10, 20, 30], "{v}");
    assert!(
        v["rejections"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("RFC 3339"),
        "{v}"
    );
    assert!(
        v["rejections"][1]["reason"]
            .as_str()
            .unwrap()
            .contains("speed"),
        "{v}"
    );
    // atomic=true refuses a batch with a bad event whole.
    let (status, v) = post_events(
        &s,
        &camera,
        "?atomic=true",
        &format!("{}\nnot json", good[1000]),
    );
    assert_eq!(status, 400, "{v}");
    for chunk in [&good[1000..2000], &good[2000..]] {
        let (status, v) = post_events(&s, &camera, "", &chunk.join("\n"));
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["rejected"], 0, "{v}");
    }
    // Other departments, the admin: refused, and audited.
    let (status, _) = post_events(&s, &outsider, "", &good[0]);
    assert_eq!(status, 403);
    let (status, _) = post_events(&s, &s.admin_token.clone(), "", &good[0]);
    assert_eq!(status, 403);

    // An event far ahead closes every window of the five minutes.
    let flush = events(1, 3600.0, 1.0, 1).remove(0);
    let (status, v) = post_events(&s, &camera, "", &flush);
    assert_eq!(status, 200, "{v}");
    let end = v["end_offset"].as_u64().unwrap();
    assert_eq!(end, 3001);
    let st = wait_view(&s, &steward, "traffic/flow_1m", end);
    assert_eq!(st["events_in"], 3001, "{st}");

    // The oracle: the same events imported as a dataset, the same aggregation in batch SQL,
    // written independently (date_bin and exact distinct counts).
    let (status, v) = s.call(
        "POST",
        "/api/v1/datasets",
        Some(&steward),
        Some(r#"{"department":"traffic","name":"raw"}"#),
    );
    assert_eq!(status, 201, "{v}");
    let agent = common::agent();
    let mut r = agent
        .post(format!("{}/api/v1/datasets/traffic/raw/import", s.url))
        .header("Authorization", format!("Bearer {steward}"))
        .send(good.join("\n"))
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        200,
        "{}",
        r.body_mut().read_to_string().unwrap()
    );
    let want = sql(
        &s,
        &steward,
        "SELECT date_bin(INTERVAL '1 minute', ts) AS window_start, district, segment, grouping(segment) AS all_segments, count(*) AS vehicles, count(DISTINCT plate) AS plates, avg(speed) AS speed FROM traffic.raw GROUP BY date_bin(INTERVAL '1 minute', ts), ROLLUP(district, segment)",
    );
    let got = sql(
        &s,
        &steward,
        "SELECT window_start, district, segment, all_segments, vehicles, plates, speed FROM traffic.flow_1m",
    );
    let (want, got) = (keyed(&want["rows"]), keyed(&got["rows"]));
    assert_eq!(
        got.len(),
        want.len(),
        "rows: view {} oracle {}",
        got.len(),
        want.len()
    );
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (k, (n, p, sp)) in &want {
        let (gn, gp, gsp) = got[k];
        assert_eq!(gn, *n, "{k}");
        assert!((gsp - sp).abs() < 1e-6, "{k}: speed {gsp} vs {sp}");
        let tol = if *p <= 64 {
            0
        } else {
            (*p as f64 * 0.05) as i64
        };
        assert!((gp - p).abs() <= tol, "{k}: plates {gp} vs {p}");
    }

    // Live: a subscriber sees the next window close; the outsider may not subscribe.
    let (status, _) = s.call(
        "GET",
        "/api/v1/views/traffic/flow_1m/live",
        Some(&outsider),
        None,
    );
    assert_eq!(status, 403);
    let url = format!("{}/api/v1/views/traffic/flow_1m/live", s.url);
    let token = steward.clone();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let r = agent
            .get(&url)
            .header("Authorization", format!("Bearer {token}"))
            .call()
            .unwrap();
        let reader = BufReader::new(r.into_body().into_reader());
        for line in reader.lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let later = events(100, 3600.0, 30.0, 9).join("\n");
    let (status, _) = post_events(&s, &camera, "", &later);
    assert_eq!(status, 200);
    let (status, _) = post_events(&s, &camera, "", &events(1, 7200.0, 1.0, 3)[0]);
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut data = None;
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200))
            && let Some(d) = line.strip_prefix("data:")
        {
            data = Some(d.trim().to_string());
            break;
        }
    }
    let data: Value = serde_json::from_str(&data.expect("a live message")).unwrap();
    assert_eq!(data["view"], "traffic.flow_1m", "{data}");
    assert!(
        data["rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["window_start"]
                .as_str()
                .unwrap()
                .starts_with("2026-11-26T01:00")),
        "{data}"
    );

    // A late event (minute 0, long closed) is counted in the late table, not folded in.
    let (status, _) = post_events(&s, &camera, "", &good[5]);
    assert_eq!(status, 200);
    let st = wait_view(&s, &steward, "traffic/flow_1m", 3103);
    assert_eq!(st["events_late"], 1, "{st}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let late = sql(
            &s,
            &steward,
            "SELECT window_start, late_events FROM traffic.flow_1m_late",
        );
        if late["rows"].as_array().unwrap().len() == 1 {
            assert_eq!(late["rows"][0][1], 1, "{late}");
            break;
        }
        assert!(Instant::now() < deadline, "{late}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The CLI: replay a file (bad lines named by line number), show the view; a view's
    // dataset takes no imports.
    let file = dir.path().join("more.ndjson");
    let mut more = events(200, 3700.0, 20.0, 77);
    more.insert(3, "{\"plate\":\"x\"}".into());
    std::fs::write(&file, more.join("\n")).unwrap();
    let (code, out, err) = common::cli(
        &s,
        &camera,
        &[
            "stream",
            "replay",
            "traffic.detections",
            file.to_str().unwrap(),
            "--batch",
            "64",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("200 events sent and durable, 1 rejected"),
        "{out}"
    );
    assert!(
        out.contains("line 4: ts: every event needs its event time"),
        "{out}"
    );
    let (code, out, err) = common::cli(&s, &steward, &["view", "show", "traffic.flow_1m"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("traffic.flow_1m  over traffic.detections"),
        "{out}"
    );
    let (code, out, err) = common::cli(&s, &steward, &["stream", "list"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("traffic.detections (plate text"), "{out}");
    let mut r = common::agent()
        .post(format!("{}/api/v1/datasets/traffic/flow_1m/import", s.url))
        .header("Authorization", format!("Bearer {steward}"))
        .send("window_start,vehicles\n2026-11-26T00:00:00Z,1\n")
        .unwrap();
    let text = r.body_mut().read_to_string().unwrap();
    assert_eq!(r.status().as_u16(), 400, "{text}");
    assert!(text.contains("written by a continuous view"), "{text}");

    // Every append and denial is in the audit chain.
    let audit = s.audit_all();
    let appends = audit
        .iter()
        .filter(|r| r["action"] == "stream.append" && r["outcome"] == "ok")
        .count();
    assert!(appends >= 7, "{appends}");
    assert!(audit.iter().any(|r| r["action"] == "stream.append"
        && r["outcome"] == "denied"
        && r["principal"] == "pofficer"));
    assert!(audit.iter().any(|r| r["action"] == "view.create"));
    assert!(audit.iter().any(|r| r["action"] == "stream.create"));
    // On a cluster, a node killed under a view is tested in cluster.rs (`views_…`).
    if common::clustered() {
        return;
    }

    // A restart resumes where the view was: nothing written twice, new windows still close.
    let before = sql(&s, &steward, "SELECT count(*) AS n FROM traffic.flow_1m")["rows"][0][0]
        .as_i64()
        .unwrap();
    assert_eq!(s.terminate(), Some(0));
    let s = Server::start(dir.path());
    let (status, v) = post_events(&s, &camera, "", &events(1, 10_800.0, 1.0, 4)[0]);
    assert_eq!(status, 200);
    assert_eq!(v["end_offset"], 3304, "{v}");
    wait_view(&s, &steward, "traffic/flow_1m", 3304);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = sql(
            &s,
            &steward,
            "SELECT window_start, district, segment, all_segments, vehicles, plates, speed FROM traffic.flow_1m",
        );
        let rows = keyed(&all["rows"]);
        if rows.len() as i64 > before {
            break;
        }
        assert!(Instant::now() < deadline, "no new window after restart");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn post_keyed(s: &Server, token: &str, key: &str, body: &str) -> (u16, Value) {
    post_events_keyed(s, token, "", Some(key), body)
}

/// A producer that retries — at once, concurrently, or after the server crashed — appends each
/// keyed batch once; views read keyed entries like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_batches_are_appended_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path());
    s.dept("traffic");
    let steward = s.principal("tsteward", "steward", Some("traffic"));
    let camera = s.principal("cameras", "service", Some("traffic"));
    sql(&s, &steward, STREAM);
    sql(
        &s,
        &steward,
        "CREATE CONTINUOUS VIEW traffic.seg_1m AS SELECT window_start, window_end, segment, count(*) AS vehicles FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE) GROUP BY window_start, window_end, segment",
    );
    let end = |s: &Server| {
        s.call(
            "GET",
            "/api/v1/streams/traffic/detections",
            Some(&steward),
            None,
        )
        .1["events"]
            .as_u64()
            .unwrap()
    };

    // Sent twice: appended once, the second answer is the first's.
    let mut first = events(500, 0.0, 60.0, 1);
    first.push("not json".into());
    let body = first.join("\n");
    let (status, a) = post_keyed(&s, &camera, "batch-0001", &body);
    assert_eq!(status, 200, "{a}");
    assert_eq!(
        (
            a["accepted"].as_u64(),
            a["rejected"].as_u64(),
            a["duplicate"].as_bool()
        ),
        (Some(500), Some(1), Some(false)),
        "{a}"
    );
    let (_, b) = post_keyed(&s, &camera, "batch-0001", &body);
    assert_eq!(b["duplicate"], true, "{b}");
    assert_eq!(
        (&b["first_offset"], &b["end_offset"], &b["rejected"]),
        (&a["first_offset"], &a["end_offset"], &a["rejected"])
    );
    assert_eq!(end(&s), 500);

    // Eight retries at once: one appends, seven get its answer. (At once on one node: across
    // nodes a producer retries after an answer or a timeout, see yunqi-sense's dedup.rs.)
    let second = events(300, 60.0, 60.0, 2).join("\n");
    let answers: Vec<Value> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                sc.spawn(|| post_events_at(&s.url, &camera, "", Some("batch-0002"), &second).1)
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        answers.iter().filter(|v| v["duplicate"] == false).count(),
        1,
        "{answers:?}"
    );
    assert!(
        answers
            .iter()
            .all(|v| v["first_offset"] == 500 && v["end_offset"] == 800),
        "{answers:?}"
    );
    assert_eq!(end(&s), 800);
    let (status, v) = post_keyed(&s, &camera, "bad key", "{}");
    assert_eq!(status, 400, "{v}");

    // After kill -9 the log alone remembers the keys (on a cluster: cluster.rs kills nodes).
    let s = if common::clustered() {
        s
    } else {
        s.kill9();
        Server::start(dir.path())
    };
    let (_, c) = post_keyed(&s, &camera, "batch-0001", &body);
    assert_eq!(
        (
            c["duplicate"].as_bool(),
            c["end_offset"].as_u64(),
            c["rejected"].as_u64()
        ),
        (Some(true), Some(500), Some(1)),
        "{c}"
    );
    let (_, d) = post_keyed(
        &s,
        &camera,
        "batch-0003",
        &events(100, 120.0, 60.0, 3).join("\n"),
    );
    assert_eq!(
        (d["duplicate"].as_bool(), d["end_offset"].as_u64()),
        (Some(false), Some(900)),
        "{d}"
    );

    // `stream replay` keys its batches by the file: a second run appends nothing.
    let file = dir.path().join("again.ndjson");
    std::fs::write(&file, events(250, 180.0, 60.0, 4).join("\n")).unwrap();
    let args = [
        "stream",
        "replay",
        "traffic.detections",
        file.to_str().unwrap(),
        "--batch",
        "100",
    ];
    let (code, out, err) = common::cli(&s, &camera, &args);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("250 events sent and durable"), "{out}");
    let (code, out, err) = common::cli(&s, &camera, &args);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("0 events sent and durable")
            && out.contains("250 events of this file were in the stream already"),
        "{out}"
    );
    assert_eq!(end(&s), 1150);

    // The view read every keyed entry once.
    let v = wait_view(&s, &steward, "traffic/seg_1m", 1150);
    assert_eq!(
        v["events_in"].as_u64().unwrap() + v["events_late"].as_u64().unwrap(),
        1150,
        "{v}"
    );
    let audit = s.audit_all();
    assert!(
        audit.iter().any(|r| r["action"] == "stream.append"
            && r["detail"]
                .as_str()
                .unwrap_or("")
                .starts_with("duplicate of idempotency key batch-0001")),
        "duplicates are audited"
    );
}
