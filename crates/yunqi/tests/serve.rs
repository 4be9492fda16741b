//! Serve end to end over the real binary: a steward applies the urgent entry permit's
//! definition (a bad one is refused line by line); a citizen applies and gets a decision that
//! explains itself, with the vehicle looked up through transport's grant and the zone's live
//! load from a continuous view; quotas, idempotent retries, restarts and who may apply.

mod common;

use common::Server;
use serde_json::{Value, json};

const PERMIT: &str = include_str!("../../../services/traffic.urgent-entry-permit.toml");

fn apply(s: &Server, token: &str, inputs: Value, key: Option<&str>) -> (u16, Value) {
    let mut req = common::agent()
        .post(format!(
            "{}/api/v1/services/traffic/urgent-entry-permit/applications",
            s.url
        ))
        .header("Authorization", format!("Bearer {token}"))
        .header("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let mut r = req
        .send(json!({ "inputs": inputs }).to_string())
        .expect("apply");
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Workdays in the next 60 days (Hangzhou time), in the first month that has at least six.
fn workdays() -> Vec<String> {
    use chrono::Datelike;
    let today = (chrono::Utc::now() + chrono::Duration::hours(8)).date_naive();
    let all: Vec<chrono::NaiveDate> = (1..60)
        .map(|i| today + chrono::Duration::days(i))
        .filter(|d| d.weekday().number_from_monday() <= 5)
        .collect();
    let month = all
        .iter()
        .map(|d| (d.year(), d.month()))
        .find(|m| all.iter().filter(|d| (d.year(), d.month()) == *m).count() >= 6)
        .expect("a month with six workdays");
    all.into_iter()
        .filter(|d| (d.year(), d.month()) == month)
        .map(|d| d.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_urgent_entry_permit_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path());
    s.dept("traffic");
    s.dept("transport");
    s.dept("city");
    let csteward = s.principal("csteward", "steward", Some("city"));
    let tsteward = s.principal("tsteward", "steward", Some("traffic"));
    let xsteward = s.principal("xsteward", "steward", Some("transport"));
    let analyst = s.principal("tanalyst", "analyst", Some("traffic"));
    let officer = s.principal("tofficer", "officer", Some("traffic"));
    let citizen = common::citizen(&s, "c_li", "11010519491231002X");
    let neighbour = common::citizen(&s, "c_zhang", "110105198001010016");

    // Transport's vehicle registry, granted to traffic for the permit.
    common::dataset(
        &s,
        &xsteward,
        "transport",
        "vehicles",
        "plate,vehicle_type,owner_id\n沪B12345,小型汽车,11010519491231002X\n苏E54321,小型汽车,11010519491231002X\n浙A11111,小型汽车,11010519491231002X\n浙D48BP5,小型汽车,110105198001010016\n",
    );
    let until = (chrono::Utc::now() + chrono::Duration::days(90))
        .date_naive()
        .to_string();
    common::grant(
        &s,
        &tsteward,
        &xsteward,
        &json!({
        "dataset": "transport.vehicles", "columns": ["plate", "vehicle_type", "owner_id"],
        "purpose": "非浙A急事通: vehicle registration check", "until": until,
        // The service matches the plate an applicant gives: it must see plates unmasked.
        "unmasked": ["plate"], "unmasked_reason": "the plate an applicant gives is matched exactly"}),
    );
    // The city's holiday calendar (a weekday made a holiday), granted to traffic.
    let days = workdays();
    common::dataset(
        &s,
        &csteward,
        "city",
        "holidays",
        &format!("day,kind\n{},holiday\n", days[1]),
    );
    common::grant(
        &s,
        &tsteward,
        &csteward,
        &json!({
        "dataset": "city.holidays", "columns": ["day", "kind"],
        "purpose": "非浙A急事通: no permits on holidays", "until": until}),
    );
    // The zone's live load: a continuous view over a stream of detections.
    common::permit_streams(&s, &tsteward);

    // A bad definition is refused whole, line by line; only stewards apply.
    let (status, v) = common::post_toml(
        &s,
        &tsteward,
        &PERMIT.replace("period = \"month\"", "period = \"week\""),
    );
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["detail"]
            .as_str()
            .unwrap()
            .contains("unknown quota period \"week\""),
        "{v}"
    );
    // What an applicant reads must be labelled: a lookup's columns, each rule in both
    // languages.
    let (status, v) = common::post_toml(
        &s,
        &tsteward,
        &PERMIT.replace(", vehicle_type = \"车辆类型 / Vehicle type\"", ""),
    );
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["detail"]
            .as_str()
            .unwrap()
            .contains("lookup vehicle: column vehicle_type needs a label"),
        "{v}"
    );
    let (status, v) = common::post_toml(
        &s,
        &tsteward,
        &PERMIT.replace("label_en = \"The vehicle is in the registry\"\n", ""),
    );
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["detail"]
            .as_str()
            .unwrap()
            .contains("rule vehicle_known: say what it checks"),
        "{v}"
    );
    let (status, v) = common::post_toml(&s, &analyst, PERMIT);
    assert_eq!(status, 403, "{v}");
    let (status, v) = common::post_toml(&s, &tsteward, PERMIT);
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["version"], 1);
    // A service that spends a vehicle's quota without tying the vehicle to the applicant is
    // applied with a warning.
    let start = PERMIT.find("[behalf]").unwrap();
    let end = start + PERMIT[start..].find("\n\n").unwrap();
    let loose = format!("{}{}", &PERMIT[..start], &PERMIT[end..])
        .replace("name = \"urgent-entry-permit\"", "name = \"loose-permit\"");
    let file = dir.path().join("loose.toml");
    std::fs::write(&file, loose).unwrap();
    let (code, out, err) =
        common::cli(&s, &tsteward, &["service", "apply", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("warning: quota monthly is counted by the input plate, which nothing ties to the applicant"),
        "{err}"
    );
    let (code, out, err) = common::cli(&s, &tsteward, &["service", "list"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("traffic.urgent-entry-permit v1  非浙A急事通"),
        "{out}"
    );

    // A citizen applies: approved, explained — the rules, the data and its source, the quotas.
    let day = days[0].clone();
    let inputs = json!({"plate": "沪B12345", "date": day, "window": "day", "reason": "送货"});
    let (status, d) = apply(&s, &citizen, inputs.clone(), Some("app-1"));
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["decision"], "approved", "{d}");
    assert_eq!(d["explanation"]["data"]["vehicle"]["found"], true, "{d}");
    assert_eq!(
        d["explanation"]["data"]["vehicle"]["vehicle_type"], "小型汽车",
        "{d}"
    );
    assert_eq!(
        d["explanation"]["data"]["zone"]["found"], false,
        "no window closed yet: {d}"
    );
    assert_eq!(d["explanation"]["rules"].as_array().unwrap().len(), 4);
    assert_eq!(d["explanation"]["quotas"][1]["used"], 1, "{d}");
    // The citizen reads it as sentences, in the city's time, with every value labelled.
    let r = &d["readable"];
    assert_eq!(r["language"], "zh", "{r}");
    assert_eq!(r["decision"], "已通过", "{r}");
    assert_eq!(r["rules"][0]["label"], "车辆不是浙A号牌", "{r}");
    assert_eq!(r["rules"][0]["result"], "符合", "{r}");
    assert!(
        r["decided_at"].as_str().unwrap().ends_with("（北京时间）"),
        "{r}"
    );
    let window = r["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "window")
        .unwrap();
    assert_eq!(window["label"], "通行时段", "{r}");
    assert_eq!(window["value"], "当日全天（0时至24时）", "{r}");
    assert_eq!(r["data"][0]["label"], "机动车登记信息（交通运输局）", "{r}");
    assert!(
        r["data"][0]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["label"] == "车辆类型" && f["value"] == "小型汽车"),
        "{r}"
    );
    let (y, m, dd) = (
        &day[..4],
        day[5..7].trim_start_matches('0'),
        day[8..].trim_start_matches('0'),
    );
    assert!(
        r["document"]["valid"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{y}年{m}月{dd}日 00:00（北京时间） 至 ")),
        "{r}"
    );
    assert!(
        r["quotas"][1]["text"]
            .as_str()
            .unwrap()
            .contains("已用 1 次，上限 3 次"),
        "{r}"
    );
    assert!(
        !r.to_string().contains("starts_with"),
        "no expressions for the citizen: {r}"
    );
    // In English when the phone asks for it.
    let mut resp = common::agent()
        .get(format!(
            "{}/api/v1/services/traffic/urgent-entry-permit/applications/{}",
            s.url,
            d["id"].as_str().unwrap().rsplit('/').next().unwrap()
        ))
        .header("Authorization", format!("Bearer {citizen}"))
        .header("Accept-Language", "en-GB,en;q=0.9,zh;q=0.5")
        .call()
        .unwrap();
    let en: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    let r = &en["readable"];
    assert_eq!(r["language"], "en", "{r}");
    assert_eq!(
        r["rules"][0]["label"], "The vehicle does not have a local 浙A plate",
        "{r}"
    );
    assert_eq!(r["decision"], "Approved", "{r}");
    assert!(
        r["decided_at"]
            .as_str()
            .unwrap()
            .ends_with("(Beijing time)"),
        "{r}"
    );
    // The expressions stay for officers and stewards.
    assert_eq!(
        en["explanation"]["rules"][0]["require"],
        "not starts_with(plate, '浙A')"
    );
    // A retry with the same key is the same decision.
    let (_, again) = apply(&s, &citizen, inputs.clone(), Some("app-1"));
    assert_eq!(again["id"], d["id"]);
    assert_eq!(again["document"]["token"], d["document"]["token"]);

    // The permit: a signed token anyone can check — online without a login, offline with the
    // published key; a forged one fails both ways.
    let token = d["document"]["token"]
        .as_str()
        .expect("a granted permit has a document");
    assert!(token.len() < 700, "fits a QR code: {}", token.len());
    let mut r = common::agent()
        .get(format!("{}/api/v1/documents/verify?token={token}", s.url))
        .call()
        .unwrap();
    let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(
        v["status"], "not_yet_valid",
        "valid from the permit's day: {v}"
    );
    assert_eq!(v["claims"]["fields"]["plate"], "沪B12345", "{v}");
    let from: chrono::DateTime<chrono::Utc> =
        v["claims"]["valid_from"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        from,
        chrono::DateTime::parse_from_rfc3339(&format!("{day}T00:00:00+08:00")).unwrap(),
        "a day window starts at local midnight: {v}"
    );
    let (body, sig) = token.split_once('.').unwrap();
    let forged = format!("{}A.{sig}", &body[..body.len() - 1]);
    let mut r = common::agent()
        .get(format!("{}/api/v1/documents/verify?token={forged}", s.url))
        .call()
        .unwrap();
    let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(v["status"], "invalid", "{v}");
    let mut r = common::agent()
        .get(format!("{}/api/v1/documents/public-key", s.url))
        .call()
        .unwrap();
    let key: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    let key = key["public_key"].as_str().unwrap().to_string();
    let out = std::process::Command::new(common::BIN)
        .args(["document", "verify", token, "--public-key", &key])
        .env("YUNQI_URL", "http://127.0.0.1:9") // offline: nothing to reach
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("not yet valid: 非浙A急事通 电子通行凭证")
            && text.contains("plate: 沪B12345"),
        "{text} (exit {:?}: {})",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(common::BIN)
        .args(["document", "verify", &forged, "--public-key", &key])
        .env("YUNQI_URL", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not match"));

    // Its QR code (the online verification link) is drawn only for tokens this city signed;
    // the console that shows it is served with a strict Content-Security-Policy.
    let r = common::agent()
        .get(format!("{}/api/v1/documents/qr?token={token}", s.url))
        .call()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/svg+xml");
    let r = common::agent()
        .get(format!("{}/api/v1/documents/qr?token={forged}", s.url))
        .call()
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = common::agent().get(format!("{}/", s.url)).call().unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe"),
        "{csp}"
    );

    // An officer revokes it (a violation); online verification says so; the citizen may not.
    let body = json!({"id": d["id"], "reason": "违章: 闯限行区"}).to_string();
    let (status, v) = s.call(
        "POST",
        "/api/v1/documents/revoke",
        Some(&citizen),
        Some(&body),
    );
    assert_eq!(status, 403, "{v}");
    let (status, v) = s.call(
        "POST",
        "/api/v1/documents/revoke",
        Some(&officer),
        Some(&body),
    );
    assert_eq!(status, 200, "{v}");
    let verify = |s: &Server| -> Value {
        let mut r = common::agent()
            .get(format!("{}/api/v1/documents/verify?token={token}", s.url))
            .call()
            .unwrap();
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
    };
    let v = verify(&s);
    assert_eq!(
        (v["status"].as_str(), v["valid"].as_bool()),
        (Some("revoked"), Some(false)),
        "{v}"
    );
    assert!(v["reason"].as_str().unwrap().contains("闯限行区"), "{v}");
    let token = token.to_string();
    // Refusals say why: a local plate, a holiday of the city's calendar.
    for (plate, date, reason) in [
        ("浙A11111", &day, "浙A号牌"),
        ("沪B12345", &days[1], "节假日"),
    ] {
        let (status, r) = apply(
            &s,
            &citizen,
            json!({"plate": plate, "date": date, "window": "day", "reason": "x"}),
            None,
        );
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["decision"], "refused", "{r}");
        assert!(r["reasons"][0].as_str().unwrap().contains(reason), "{r}");
    }
    // Only for one's own vehicle: another person's plate, and a plate the registry does not
    // know, are refused alike as audited denials that say nothing of the owner, and spend
    // nothing of the vehicle's quota. The owner applies for it as usual.
    for plate in ["浙D48BP5", "沪C00000"] {
        let (status, r) = apply(
            &s,
            &citizen,
            json!({"plate": plate, "date": day, "window": "day", "reason": "x"}),
            None,
        );
        assert_eq!(status, 403, "{plate}: {r}");
        assert_eq!(r["error"]["code"], "permission_denied", "{r}");
        assert!(
            r["error"]["detail"].as_str().unwrap().contains("本人名下"),
            "{r}"
        );
        assert!(
            !r.to_string().contains("110105"),
            "nothing of the owner: {r}"
        );
    }
    let denials = s
        .audit_all()
        .into_iter()
        .filter(|r| {
            r["action"] == "service.apply" && r["outcome"] == "denied" && r["principal"] == "c_li"
        })
        .count();
    assert_eq!(denials, 2, "each denial is audited");
    let (status, r) = apply(
        &s,
        &neighbour,
        json!({"plate": "浙D48BP5", "date": day, "window": "day", "reason": "x"}),
        None,
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["decision"], "approved", "{r}");
    assert_eq!(
        r["explanation"]["quotas"][1]["used"], 1,
        "untouched by the denials: {r}"
    );
    assert!(
        r["explanation"]["data"]["vehicle"]
            .get("owner_id")
            .is_none(),
        "the decision shows no ID number: {r}"
    );
    // Bad inputs are refused at the edge; an analyst is not an applicant.
    let (status, r) = apply(
        &s,
        &citizen,
        json!({"plate": "沪B1", "date": day, "window": "night"}),
        None,
    );
    assert_eq!(status, 400, "{r}");
    assert!(
        r["error"]["detail"]
            .as_str()
            .unwrap()
            .contains("window: \"night\""),
        "{r}"
    );
    let (status, r) = apply(&s, &analyst, inputs.clone(), None);
    assert_eq!(status, 403, "{r}");

    // The monthly quota: three a month, the fourth refused — and still after kill -9.
    for dd in &days[2..4] {
        let (_, r) = apply(
            &s,
            &citizen,
            json!({"plate": "沪B12345", "date": dd, "window": "day", "reason": "x"}),
            None,
        );
        assert_eq!(r["decision"], "approved", "{r}");
    }
    // (On a cluster, cluster_serve.rs kills the deciding node instead.)
    if !common::clustered() {
        s.kill9();
        s = Server::start(dir.path());
    }
    let (_, r) = apply(
        &s,
        &citizen,
        json!({"plate": "沪B12345", "date": days[4], "window": "day", "reason": "x"}),
        None,
    );
    assert_eq!(r["decision"], "refused", "{r}");
    assert!(
        r["reasons"][0].as_str().unwrap().contains("本月已办理3次"),
        "{r}"
    );
    assert_eq!(r["explanation"]["quotas"][1]["used"], 3, "{r}");
    let (_, again) = apply(&s, &citizen, inputs, Some("app-1"));
    assert_eq!(again["id"], d["id"], "the retry after a restart");
    let mut r = common::agent()
        .get(format!("{}/api/v1/documents/verify?token={token}", s.url))
        .call()
        .unwrap();
    let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(
        v["status"], "revoked",
        "the revocation survives kill -9: {v}"
    );
    // A violation recorded during a permit's window cancels it, by itself.
    let (_, other) = apply(
        &s,
        &citizen,
        json!({"plate": "苏E54321", "date": day, "window": "day", "reason": "x"}),
        None,
    );
    assert_eq!(other["decision"], "approved", "{other}");
    let other_token = other["document"]["token"].as_str().unwrap().to_string();
    let violation =
        json!({"plate": "苏E54321", "kind": "闯限行区", "ts": format!("{day}T10:00:00+08:00")});
    let (status, v) = s.call(
        "POST",
        "/api/v1/streams/traffic/violations/events",
        Some(&tsteward),
        Some(&violation.to_string()),
    );
    assert_eq!(status, 200, "{v}");
    let mut cancelled = Value::Null;
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let (_, v) = s.call(
            "GET",
            &format!("/api/v1/documents/verify?token={other_token}"),
            None,
            None,
        );
        if v["status"] == "revoked" {
            cancelled = v;
            break;
        }
    }
    assert!(
        cancelled["reason"]
            .as_str()
            .unwrap_or("")
            .contains("交通违法"),
        "the violation did not cancel the permit: {cancelled}"
    );
    // The applicant's own list; the audit chain has every decision and the lookups' queries.
    let (status, mine) = s.call(
        "GET",
        "/api/v1/services/traffic/urgent-entry-permit/applications",
        Some(&citizen),
        None,
    );
    assert_eq!(status, 200, "{mine}");
    assert!(
        mine["applications"].as_array().unwrap().len() >= 3,
        "{mine}"
    );
    let audit = s.audit_all();
    assert!(
        audit
            .iter()
            .any(|r| r["action"] == "service.decide" && r["principal"] == "c_li")
    );
    assert!(
        audit.iter().any(|r| r["principal"]
            .as_str()
            .unwrap_or("")
            .starts_with("svc_traffic")
            && r["object"]
                .as_str()
                .unwrap_or("")
                .contains("transport.vehicles")),
        "lookups are audited as the service"
    );
}
