//! `kill -9` under load: citizens apply for the urgent entry permit from several threads while
//! the server is killed at a random moment; after each restart every acknowledged decision is
//! still there (a retry with its key returns it unchanged) and no plate holds more than its
//! monthly quota. Kill points: `YUNQI_SERVE_KILLS` (default 3).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Server, env_or, test_seed};
use serde_json::{Value, json};

const PERMIT: &str = include_str!("../../../services/traffic.urgent-entry-permit.toml");
const PLATES: [&str; 3] = ["沪B12345", "苏E54321", "皖A00001"];

fn apply(url: &str, token: &str, inputs: &Value, key: &str) -> Option<(u16, Value)> {
    let mut r = common::agent()
        .post(format!(
            "{url}/api/v1/services/traffic/urgent-entry-permit/applications"
        ))
        .header("Authorization", format!("Bearer {token}"))
        .header("Content-Type", "application/json")
        .header("Idempotency-Key", key)
        .send(json!({ "inputs": inputs }).to_string())
        .ok()?;
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().ok()?;
    Some((status, serde_json::from_str(&text).ok()?))
}

fn setup(s: &Server) -> String {
    s.dept("traffic");
    s.dept("transport");
    let tsteward = s.principal("tsteward", "steward", Some("traffic"));
    let xsteward = s.principal("xsteward", "steward", Some("transport"));
    let citizen = common::citizen(s, "c_li", "11010519491231002X");
    let csv = format!(
        "plate,vehicle_type,owner_id\n{}\n",
        PLATES
            .map(|p| format!("{p},小型汽车,11010519491231002X"))
            .join("\n")
    );
    common::dataset(s, &xsteward, "transport", "vehicles", &csv);
    let until = (chrono::Utc::now() + chrono::Duration::days(90))
        .date_naive()
        .to_string();
    common::grant(
        s,
        &tsteward,
        &xsteward,
        &json!({"dataset": "transport.vehicles",
        "columns": ["plate", "vehicle_type", "owner_id"], "purpose": "permit checks",
        "until": until, "unmasked": ["plate"], "unmasked_reason": "plates are matched exactly"}),
    );
    common::permit_streams(s, &tsteward);
    // Without the holiday dataset: weekends are the rest days here.
    let definition = PERMIT.replace("calendar = \"city.holidays\"\n", "");
    let mut r = common::agent()
        .post(format!("{}/api/v1/services", s.url))
        .header("Authorization", format!("Bearer {tsteward}"))
        .header("Content-Type", "application/toml")
        .send(definition)
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        201,
        "{}",
        r.body_mut().read_to_string().unwrap()
    );
    citizen
}

/// An acknowledged decision: plate, date, decision id, verdict.
type Acked = (String, String, String, String);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_decision_lost_no_quota_overspent() {
    let kills: usize = env_or("YUNQI_SERVE_KILLS", 3);
    let mut seed = test_seed();
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path());
    let citizen = setup(&s);
    let today = (chrono::Utc::now() + chrono::Duration::hours(8)).date_naive();
    let days: Vec<String> = (1..60)
        .map(|i| today + chrono::Duration::days(i))
        .filter(|d| {
            use chrono::Datelike;
            d.weekday().number_from_monday() <= 5
        })
        .map(|d| d.to_string())
        .collect();
    // key → (plate, date, decision id, verdict) of every acknowledged decision.
    let acked: Arc<Mutex<BTreeMap<String, Acked>>> = Arc::default();
    for round in 0..kills {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads: Vec<_> = (0..6)
            .map(|t| {
                let (url, citizen, acked, stop, days) = (
                    s.url.clone(),
                    citizen.clone(),
                    acked.clone(),
                    stop.clone(),
                    days.clone(),
                );
                let mut x = next() | 1;
                std::thread::spawn(move || {
                    let mut i = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let plate = PLATES[x as usize % PLATES.len()];
                        let date = &days[(x >> 8) as usize % days.len()];
                        let key = format!("r{round}-t{t}-{i}");
                        i += 1;
                        let inputs =
                            json!({"plate": plate, "date": date, "window": "day", "reason": "x"});
                        let Some((200, d)) = apply(&url, &citizen, &inputs, &key) else {
                            continue;
                        };
                        acked.lock().unwrap().insert(
                            key,
                            (
                                plate.to_string(),
                                date.clone(),
                                d["id"].as_str().unwrap().to_string(),
                                d["decision"].as_str().unwrap().to_string(),
                            ),
                        );
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(150 + next() % 600));
        s.kill9();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        s = Server::start(dir.path());
        // Every acknowledged decision survived: its retry returns it unchanged.
        let acked_now = acked.lock().unwrap().clone();
        assert!(
            !acked_now.is_empty(),
            "round {round}: nothing was acknowledged"
        );
        for (key, (plate, date, id, verdict)) in &acked_now {
            let inputs = json!({"plate": plate, "date": date, "window": "day", "reason": "x"});
            let (status, d) = apply(&s.url, &citizen, &inputs, key).expect("retry");
            assert_eq!(status, 200, "{d}");
            assert_eq!(
                (d["id"].as_str().unwrap(), d["decision"].as_str().unwrap()),
                (id.as_str(), verdict.as_str()),
                "round {round}: {key} changed after kill -9"
            );
        }
        // No plate over its monthly quota, counting every decision the server holds.
        let (status, mine) = s.call(
            "GET",
            "/api/v1/services/traffic/urgent-entry-permit/applications",
            Some(&citizen),
            None,
        );
        assert_eq!(status, 200, "{mine}");
        let list = mine["applications"].as_array().unwrap();
        let ids: BTreeSet<&str> = list.iter().map(|d| d["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), list.len(), "a decision listed twice");
        for (_, _, id, _) in acked_now.values() {
            assert!(
                ids.contains(id.as_str()),
                "round {round}: acknowledged {id} is gone"
            );
        }
        let mut per_month: BTreeMap<(String, String), usize> = BTreeMap::new();
        for d in list.iter().filter(|d| d["decision"] == "approved") {
            let plate = d["explanation"]["inputs"]["plate"]
                .as_str()
                .unwrap()
                .to_string();
            let month = d["explanation"]["inputs"]["date"].as_str().unwrap()[..7].to_string();
            *per_month.entry((plate, month)).or_default() += 1;
        }
        assert!(
            per_month.values().all(|n| *n <= 3),
            "round {round}: over-spent: {per_month:?}"
        );
        eprintln!(
            "round {round}: {} acknowledged, {} decisions held, {} plate-months approved",
            acked_now.len(),
            list.len(),
            per_month.len()
        );
    }
}
