//! Exactly once across `kill -9`: a continuous view fed while the server is killed at random
//! moments (≥ 50 times) ends with exactly the rows of an uninterrupted run, window by window —
//! no window lost, none written twice, no event counted twice. Driven by one seed (printed; set
//! `YUNQI_TEST_SEED` to replay) and `YUNQI_SENSE_KILLS` kills (default 50).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::Server;
use serde_json::Value;

const STREAM: &str = "CREATE STREAM traffic.detections (plate TEXT, segment INT, district TEXT, speed DOUBLE, ts TIMESTAMP) WITH (event_time = 'ts', watermark = '2 seconds')";
const VIEW: &str = "CREATE CONTINUOUS VIEW traffic.flow AS SELECT window_start, window_end, district, segment, grouping(district) AS gd, grouping(segment) AS gs, count(*) AS vehicles, approx_count_distinct(plate) AS plates, sum(speed) AS speed_sum, max(speed) AS fastest FROM TUMBLE(traffic.detections, ts, INTERVAL '1' SECOND) GROUP BY window_start, window_end, ROLLUP(district, segment)";

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Batch `b`: 500 events of second `b` of event time, delivered up to 1.5 s out of order
/// (some fall in the previous second's window, still open under the 2 s watermark).
fn batch(b: u64) -> String {
    let mut r = Rng(b * 7919 + 1);
    let mut lines = Vec::new();
    for i in 0..500u64 {
        let us = b as i64 * 1_000_000 + (i as i64 * 2_000) - r.below(1_500_000) as i64;
        let t = chrono::DateTime::from_timestamp_micros(1_795_651_200_000_000 + us.max(0)).unwrap();
        let seg = r.below(30);
        lines.push(format!(
            r#"{{"plate":"浙A{:04}","segment":{seg},"district":"d{}","speed":{}.{},"ts":"{}"}}"#,
            r.below(400),
            seg % 5,
            20 + r.below(60),
            r.below(10),
            t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        ));
    }
    lines.join("\n")
}

fn post(s: &Server, token: &str, path: &str, body: &str, content_type: &str) -> (u16, Value) {
    let agent = common::agent();
    let mut r = agent
        .post(format!("{}{path}", s.url))
        .header("Authorization", format!("Bearer {token}"))
        .header("Content-Type", content_type)
        .send(body)
        .expect("post");
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn sql(s: &Server, token: &str, q: &str) -> Value {
    let (status, v) = post(
        s,
        token,
        "/api/v1/sql",
        &serde_json::json!({ "sql": q }).to_string(),
        "application/json",
    );
    assert_eq!(status, 200, "{q}: {v}");
    v
}

fn send(s: &Server, token: &str, body: &str) -> u64 {
    let (status, v) = post(
        s,
        token,
        "/api/v1/streams/traffic/detections/events",
        body,
        "application/x-ndjson",
    );
    assert_eq!(status, 200, "{v}");
    v["end_offset"].as_u64().unwrap()
}

/// Sets up a data directory: departments, principals, the stream and the view. Returns the
/// steward's and the camera account's tokens.
fn setup(s: &Server) -> (String, String) {
    s.dept("traffic");
    let steward = s.principal("tsteward", "steward", Some("traffic"));
    let camera = s.principal("cameras", "service", Some("traffic"));
    sql(s, &steward, STREAM);
    sql(s, &steward, VIEW);
    (steward, camera)
}

/// The view's rows once everything up to `end` is processed and every window closed.
fn final_rows(s: &Server, token: &str, end: u64) -> BTreeMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = s.call("GET", "/api/v1/views/traffic/flow", Some(token), None);
        if v["offset"].as_u64().unwrap_or(0) >= end && v["open_windows"].as_u64() == Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "view stuck: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let v = sql(s, token, "SELECT * FROM traffic.flow");
    let mut rows = BTreeMap::new();
    for r in v["rows"].as_array().unwrap() {
        let a = r.as_array().unwrap();
        let key = format!("{}|{}|{}|{}|{}", a[0], a[2], a[3], a[4], a[5]);
        let prev = rows.insert(key.clone(), r.to_string());
        assert!(prev.is_none(), "window row written twice: {key}");
    }
    rows
}

#[test]
fn kill_9_at_random_points_gives_the_uninterrupted_results() {
    let kills: u64 = common::env_or("YUNQI_SENSE_KILLS", 50);
    killed_runs_match_the_uninterrupted_run(kills, &|dir, _| Server::start(dir));
}

/// The same on a cluster node whose streams' events live in NATS JetStream (a server of this
/// test's own): the node is killed, the log outlives it, the restarted node (a new name each
/// time, as a replacement node would have) carries on from the shared log and its checkpoints.
#[test]
fn kill_9_of_a_node_with_streams_on_jetstream_gives_the_uninterrupted_results() {
    let kills: u64 = common::env_or("YUNQI_SENSE_KILLS_CLUSTER", 12);
    let db = common::Database::create("sense_js");
    let nats_dir = tempfile::tempdir().unwrap();
    let nats = yunqi_stream_nats::server::NatsServer::start(nats_dir.path());
    let (code, out, err) = common::cluster_cli("init", &db.url(), &nats.url(), &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("created the offsets bucket"), "{out}");
    killed_runs_match_the_uninterrupted_run(kills, &|dir, i| {
        common::cluster_node(dir, &db.url(), Some(&nats.url()), &format!("n{i}"))
    });
    let (code, out, err) = common::cluster_cli("status", &db.url(), &nats.url(), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("up; 1 yunqi stream(s) in JetStream"), "{out}");
}

fn killed_runs_match_the_uninterrupted_run(
    kills: u64,
    start: &dyn Fn(&std::path::Path, u64) -> Server,
) {
    let seed = common::test_seed();
    println!("sense crash test seed {seed} ({kills} kills); replay with YUNQI_TEST_SEED={seed}");
    let mut rng = Rng(seed);
    let batches_per_round = 3;
    let total = kills * batches_per_round;
    let flush = {
        let t = chrono::DateTime::from_timestamp_micros(
            1_795_651_200_000_000 + (total as i64 + 3600) * 1_000_000,
        )
        .unwrap();
        format!(
            r#"{{"plate":"浙A0000","segment":0,"district":"d0","speed":1.0,"ts":"{}"}}"#,
            t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        )
    };

    // The uninterrupted run.
    let clean_dir = tempfile::tempdir().unwrap();
    let clean = Server::start(clean_dir.path());
    let (steward, camera) = setup(&clean);
    for b in 0..total {
        send(&clean, &camera, &batch(b));
    }
    let end = send(&clean, &camera, &flush);
    let want = final_rows(&clean, &steward, end);
    assert!(want.len() as u64 > total * 5, "{} rows", want.len());
    drop(clean);

    // The same events, with a kill -9 after every few batches, at a random moment.
    let dir = tempfile::tempdir().unwrap();
    let mut s = start(dir.path(), 0);
    let (steward, camera) = setup(&s);
    let mut next = 0u64;
    for k in 1..=kills {
        for _ in 0..batches_per_round {
            send(&s, &camera, &batch(next));
            next += 1;
        }
        // Kill while the view works through what was just sent (or, now and then, at once).
        let pause = match rng.below(4) {
            0 => 0,
            _ => rng.below(40),
        };
        std::thread::sleep(Duration::from_millis(pause));
        s.kill9();
        s = start(dir.path(), k);
    }
    assert_eq!(next, total);
    let end2 = send(&s, &camera, &flush);
    assert_eq!(end2, end, "the log holds exactly the acknowledged events");
    let got = final_rows(&s, &steward, end2);
    let missing: Vec<&String> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "seed {seed}: {} windows missing (e.g. {:?}), {} extra (e.g. {:?})",
        missing.len(),
        missing.first(),
        extra.len(),
        extra.first()
    );
    for (k, w) in &want {
        assert_eq!(&got[k], w, "seed {seed}: window {k} differs");
    }
}
