//! `yunqi demo` end to end, on a small city: the city is seeded through the API and served;
//! the credentials file lets anyone try the three services at once; traffic flows in live; a
//! second run on the same directory resumes without seeding anything twice.

mod common;

use common::Server;
use serde_json::{Value, json};

const SMALL: [&str; 8] = [
    "--residents",
    "5000",
    "--vehicles",
    "2000",
    "--businesses",
    "500",
    "--rate",
    "300",
];

fn token_of(creds: &Value, name: &str) -> String {
    creds["principals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{name} in {creds}"))["token"]
        .as_str()
        .unwrap()
        .to_string()
}

fn workday() -> String {
    use chrono::Datelike;
    let mut d = (chrono::Utc::now() + chrono::Duration::hours(8)).date_naive();
    loop {
        d += chrono::Duration::days(1);
        let next = d + chrono::Duration::days(1);
        if d.weekday().number_from_monday() <= 4 && next.to_string() != "2027-01-01" {
            return d.to_string();
        }
    }
}

#[test]
fn the_demo_city_seeds_serves_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, printed) = Server::start_demo(dir.path(), &SMALL);
    let text = printed.join("\n");
    assert!(text.contains("demo city: seeding"), "{text}");
    assert!(text.contains("demo city: ready"), "{text}");

    // The credentials file: every demo principal with its token; citizens with their ID
    // numbers and plates (local and not).
    let creds: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("demo/credentials.json")).unwrap(),
    )
    .unwrap();
    let principals = creds["principals"].as_array().unwrap();
    assert!(principals.len() >= 15, "{creds}");
    for p in principals {
        for k in ["name", "department", "role", "token"] {
            assert!(p.get(k).is_some(), "{k} missing in {p}");
        }
    }
    let citizen = principals.iter().find(|p| p["role"] == "citizen").unwrap();
    let id = citizen["id_number"].as_str().unwrap().to_string();
    assert!(yunqi_types::NationalId::parse(&id).is_ok(), "{id}");
    let plates: Vec<String> = citizen["plates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    assert!(plates.iter().any(|p| p.starts_with("浙A")), "{plates:?}");
    let other = plates.iter().find(|p| !p.starts_with("浙A")).unwrap();
    let ctoken = citizen["token"].as_str().unwrap().to_string();

    // A citizen applies for the permit with a non-local plate of theirs: the vehicle is looked
    // up through transport's grant.
    let day = workday();
    let (status, d) = s.call(
        "POST",
        "/api/v1/services/traffic/urgent-entry-permit/applications",
        Some(&ctoken),
        Some(
            &json!({"inputs": {"plate": other, "date": day, "window": "day", "reason": "送货"}})
                .to_string(),
        ),
    );
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["decision"], "approved", "{d}");
    assert_eq!(d["explanation"]["data"]["vehicle"]["found"], true, "{d}");
    assert!(
        d["explanation"]["data"]["vehicle"]
            .get("owner_id")
            .is_none(),
        "{d}"
    );
    // Another demo citizen's plate is theirs to apply for, not this citizen's.
    let neighbour = principals
        .iter()
        .find(|p| p["role"] == "citizen" && p["name"] != citizen["name"])
        .unwrap();
    let theirs = neighbour["plates"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p.as_str())
        .find(|p| !p.starts_with("浙A"))
        .unwrap();
    let (status, e) = s.call(
        "POST",
        "/api/v1/services/traffic/urgent-entry-permit/applications",
        Some(&ctoken),
        Some(
            &json!({"inputs": {"plate": theirs, "date": day, "window": "day", "reason": "送货"}})
                .to_string(),
        ),
    );
    assert_eq!(status, 403, "{e}");
    // A hospital charges a demo citizen's visit (they consented; their credit line is derived).
    let hospital = token_of(&creds, "hospital_zju1");
    let (status, c) = s.call(
        "POST",
        "/api/v1/services/health/credit-healthcare/applications",
        Some(&hospital),
        Some(&json!({"inputs": {"patient": id, "amount": 200, "visit": "V-1"}}).to_string()),
    );
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["decision"], "approved", "{c}");
    // The credit score is derived, with its lineage.
    let city = token_of(&creds, "city_steward");
    let (_, ds) = s.call(
        "GET",
        "/api/v1/datasets/city/credit_scores",
        Some(&city),
        None,
    );
    assert!(ds.to_string().contains("city.payments"), "{ds}");
    // The steward of the city has a grant request waiting.
    let (_, inbox) = s.call("GET", "/api/v1/grants?state=pending", Some(&city), None);
    assert!(inbox.to_string().contains("公积金"), "{inbox}");

    // Every department's datasets are there.
    for (who, ds) in [
        ("traffic_steward", "traffic/restricted_zones"),
        ("transport_steward", "transport/vehicles"),
        ("market_steward", "market/businesses"),
        ("health_steward", "health/insurance_accounts"),
        ("housing_steward", "housing/fund_accounts"),
        ("city_steward", "city/holidays"),
    ] {
        let (status, v) = s.call(
            "GET",
            &format!("/api/v1/datasets/{ds}"),
            Some(&token_of(&creds, who)),
            None,
        );
        assert_eq!(status, 200, "{ds}: {v}");
        assert!(v["rows"].as_u64().unwrap() > 0, "{ds}: {v}");
    }

    // Traffic flows in live: the detections stream grows.
    let steward = token_of(&creds, "traffic_steward");
    let events = |s: &Server| -> u64 {
        let (_, v) = s.call(
            "GET",
            "/api/v1/views/traffic/district_load_1m",
            Some(&steward),
            None,
        );
        v["offset"].as_u64().unwrap_or(0)
    };
    let first = events(&s);
    let mut later = first;
    for _ in 0..40 {
        std::thread::sleep(std::time::Duration::from_millis(250));
        later = events(&s);
        if later > first {
            break;
        }
    }
    assert!(later > first, "no live traffic: {first} → {later}");
    let (_, residents) = s.call("GET", "/api/v1/datasets/city/residents", Some(&city), None);
    let versions = residents["versions"].as_array().map(Vec::len);
    assert_eq!(s.terminate(), Some(0));

    // A second run resumes: nothing seeded twice, the same tokens work.
    let (s2, printed) = Server::start_demo(dir.path(), &SMALL);
    let text = printed.join("\n");
    assert!(text.contains("resuming"), "{text}");
    let (status, again) = s2.call("GET", "/api/v1/datasets/city/residents", Some(&city), None);
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["versions"].as_array().map(Vec::len), versions);
    let (status, mine) = s2.call(
        "GET",
        "/api/v1/services/traffic/urgent-entry-permit/applications",
        Some(&ctoken),
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(mine["applications"].as_array().unwrap().len(), 1);
}
