//! The other two services the demo city ships, end to end over the real binary:
//! - one-day business registration: the name checked against the registry and granted once,
//!   the legal representative looked up by ID number through a grant, a licence with a valid
//!   unified social credit code; licensed trades reviewed by an officer (queue, assignment,
//!   approval, refusal that frees the name, a missed deadline recorded), surviving `kill -9`;
//! - credit healthcare: a credit score derived by SQL with lineage, a hospital charging a
//!   visit to the patient's credit line only with the patient's recorded consent, drawn and
//!   repaid atomically.

mod common;

use common::Server;
use serde_json::{Value, json};

const REGISTRATION: &str = include_str!("../../../services/market.business-registration.toml");
const CREDIT: &str = include_str!("../../../services/health.credit-healthcare.toml");

/// A resident ID number with its check character: `region` (6 digits), `birth` (YYYYMMDD),
/// `seq` (3 digits).
fn id_number(region: &str, birth: &str, seq: u32) -> String {
    let first = format!("{region}{birth}{seq:03}");
    let check = yunqi_types::NationalId::check_char(first.as_bytes());
    format!("{first}{check}")
}

fn apply(s: &Server, token: &str, service: &str, inputs: Value) -> (u16, Value) {
    let body = json!({ "inputs": inputs }).to_string();
    s.call(
        "POST",
        &format!("/api/v1/services/{service}/applications"),
        Some(token),
        Some(&body),
    )
}

fn number(d: &Value) -> String {
    d["id"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string()
}

fn act(s: &Server, token: &str, service: &str, d: &Value, act: &str, body: Value) -> (u16, Value) {
    s.call(
        "POST",
        &format!(
            "/api/v1/services/{service}/applications/{}/{act}",
            number(d)
        ),
        Some(token),
        Some(&body.to_string()),
    )
}

const REG: &str = "market/business-registration";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn business_registration_with_review() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path());
    s.dept("market");
    s.dept("city");
    let msteward = s.principal("msteward", "steward", Some("market"));
    let csteward = s.principal("csteward", "steward", Some("city"));
    let officer = s.principal("mofficer", "officer", Some("market"));
    let officer2 = s.principal("mofficer2", "officer", Some("market"));
    let adult = id_number("330106", "19850312", 17);
    let minor = id_number("330106", "20150601", 21);
    let stranger = id_number("330106", "19790101", 33);
    let ghost = id_number("330106", "19700101", 99);
    let newcomer = id_number("330106", "19900101", 55);
    let founder = common::citizen(&s, "c_wang", &adult);
    let other = common::citizen(&s, "c_zhao", &stranger);
    let young = common::citizen(&s, "c_xiao", &minor);
    let unregistered = common::citizen(&s, "c_wu", &ghost);

    common::dataset(
        &s,
        &csteward,
        "city",
        "residents",
        &format!(
            "id_number,name,birth_date\n{adult},王小明,1985-03-12\n{minor},李小红,2015-06-01\n"
        ),
    );
    common::dataset(
        &s,
        &msteward,
        "market",
        "businesses",
        "name,credit_code,status\n杭州老字号餐饮有限公司,91330106MA2H0000X0,active\n",
    );
    let until = (chrono::Utc::now() + chrono::Duration::days(90))
        .date_naive()
        .to_string();
    // Authorised agents (代办): c_zhao may register a business for the newcomer; an
    // authorisation for the founder has lapsed.
    let yesterday = (chrono::Utc::now() - chrono::Duration::days(2))
        .date_naive()
        .to_string();
    common::dataset(
        &s,
        &msteward,
        "market",
        "agents",
        &format!(
            "agent_id,subject_id,until\n{stranger},{newcomer},{until}\n{stranger},{adult},{yesterday}\n"
        ),
    );
    let residents_grant = common::grant(
        &s,
        &msteward,
        &csteward,
        &json!({
        "dataset": "city.residents", "columns": ["id_number", "name", "birth_date"],
        "purpose": "企业开办: legal representative check", "until": until,
        "unmasked": ["id_number"], "unmasked_reason": "the ID number an applicant gives is matched exactly"}),
    );
    let (status, v) = common::post_toml(&s, &msteward, REGISTRATION);
    assert_eq!(status, 201, "{v}");

    let company = |name: &str, rep: &str, scope: &str| {
        json!({"company_name": name, "legal_rep": rep, "capital": 1000000,
               "scope": scope, "address": "西湖区文三路1号"})
    };
    // Approved at once, with a licence that carries a new, valid credit code.
    let (status, ok) = apply(
        &s,
        &founder,
        REG,
        company("杭州云栖软件有限公司", &adult, "software"),
    );
    assert_eq!(status, 200, "{ok}");
    assert_eq!(ok["decision"], "approved", "{ok}");
    let code = ok["document"]["code"].as_str().unwrap().to_string();
    assert!(yunqi_types::classify::is_credit_code(&code), "{code}");
    assert!(code.starts_with("91330106"));
    let token = ok["document"]["token"].as_str().unwrap();
    let (_, v) = s.call(
        "GET",
        &format!("/api/v1/documents/verify?token={token}"),
        None,
        None,
    );
    assert_eq!(v["status"], "valid", "{v}");
    assert_eq!(v["claims"]["fields"]["credit_code"], code.as_str());
    assert_eq!(
        v["claims"]["fields"]["company_name"],
        "杭州云栖软件有限公司"
    );
    // The representative came through the grant: the name masked, the birth date used.
    assert_eq!(ok["explanation"]["data"]["rep"]["found"], true, "{ok}");
    assert_ne!(ok["explanation"]["data"]["rep"]["name"], "王小明", "{ok}");

    // The explanation names each item's source and grant; the representative's own
    // "who accessed my data" lists the decision that used their record.
    assert_eq!(
        ok["explanation"]["data"]["rep"]["source"]["datasets"],
        json!(["city.residents"]),
        "{ok}"
    );
    assert!(
        ok["explanation"]["data"]["rep"]["source"]["grants"][0]
            .as_str()
            .unwrap()
            .contains("legal representative check"),
        "{ok}"
    );
    let (status, acc) = s.call("GET", "/api/v1/me/accesses", Some(&founder), None);
    assert_eq!(status, 200, "{acc}");
    assert!(
        acc.to_string()
            .contains("service:market.business-registration")
            && acc.to_string().contains("legal representative check"),
        "{acc}"
    );
    let (_, acc) = s.call("GET", "/api/v1/me/accesses", Some(&other), None);
    assert!(!acc.to_string().contains("business-registration"), "{acc}");

    // Nobody registers a business in someone else's name: a citizen who is neither the
    // legal representative nor their agent is refused as a denial, audited, and spends
    // nothing (the name stays free).
    let (status, denied) = apply(
        &s,
        &other,
        REG,
        company("杭州冒名顶替有限公司", &adult, "software"),
    );
    assert_eq!(status, 403, "{denied}");
    assert_eq!(denied["error"]["code"], "permission_denied", "{denied}");
    assert!(
        denied["error"]["detail"]
            .as_str()
            .unwrap()
            .contains("法定代表人须为申请人本人"),
        "{denied}"
    );
    assert!(!denied.to_string().contains(&adult), "{denied}");
    let audited = s.audit_all();
    assert!(
        audited.iter().any(|r| r["action"] == "service.apply"
            && r["outcome"] == "denied"
            && r["principal"] == "c_zhao"),
        "the denial is audited"
    );
    let (_, own) = apply(
        &s,
        &founder,
        REG,
        company("杭州冒名顶替有限公司", &adult, "software"),
    );
    assert_eq!(own["decision"], "approved", "the name was not spent: {own}");

    // Lookups are as fresh as the data: a resident added by a new version is found at once.
    // c_zhao applies as the newcomer's registered agent.
    let (status, v) = s.call(
        "POST",
        "/api/v1/datasets/city/residents/import",
        Some(&csteward),
        Some(&format!(
            "id_number,name,birth_date\n{adult},王小明,1985-03-12\n{minor},李小红,2015-06-01\n{newcomer},周新,1990-01-01\n"
        )),
    );
    assert_eq!(status, 200, "{v}");
    let (_, fresh) = apply(
        &s,
        &other,
        REG,
        company("杭州新来科技有限公司", &newcomer, "software"),
    );
    assert_eq!(fresh["decision"], "approved", "{fresh}");

    // Refusals, each with its reason.
    for (inputs, reason) in [
        (
            company("杭州云栖软件有限公司", &adult, "software"),
            "已被申请",
        ),
        (
            company("杭州老字号餐饮有限公司", &adult, "catering"),
            "已被登记",
        ),
        (
            company("杭州少年科技有限公司", &minor, "software"),
            "年满18周岁",
        ),
        (
            company("杭州无名科技有限公司", &ghost, "software"),
            "核验未通过",
        ),
        (company("云栖", &adult, "software"), "组织形式"),
    ] {
        // Each applies as the representative themself.
        let rep = inputs["legal_rep"].as_str().unwrap();
        let who = if rep == minor {
            &young
        } else if rep == ghost {
            &unregistered
        } else {
            &founder
        };
        let (status, r) = apply(&s, who, REG, inputs.clone());
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["decision"], "refused", "{inputs}: {r}");
        assert!(r["reasons"].to_string().contains(reason), "{inputs}: {r}");
    }

    // A licensed trade goes to review with a one-day deadline.
    let (_, food) = apply(
        &s,
        &founder,
        REG,
        company("杭州云栖食品有限公司", &adult, "food_production"),
    );
    assert_eq!(food["decision"], "pending", "{food}");
    assert!(food["reasons"].to_string().contains("转人工审核"), "{food}");
    let due: chrono::DateTime<chrono::Utc> = food["due_at"].as_str().unwrap().parse().unwrap();
    let decided: chrono::DateTime<chrono::Utc> =
        food["decided_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(due - decided, chrono::Duration::hours(24));
    let (_, food2) = apply(
        &s,
        &founder,
        REG,
        company("杭州某某医疗器械有限公司", &adult, "medical_devices"),
    );
    assert_eq!(food2["decision"], "pending", "{food2}");

    // The queue is the department's: officers see it, citizens do not.
    let (status, q) = s.call(
        "GET",
        &format!("/api/v1/services/{REG}/reviews"),
        Some(&officer),
        None,
    );
    assert_eq!(status, 200, "{q}");
    let ids: Vec<&str> = q["pending"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [food["id"].as_str().unwrap(), food2["id"].as_str().unwrap()]
    );
    assert_eq!(q["pending"][0]["overdue"], false);
    // The officer saw the representative's ID number in the queue: the representative's own
    // "who accessed my data" says so.
    let (_, acc) = s.call("GET", "/api/v1/me/accesses", Some(&founder), None);
    assert!(acc.to_string().contains("mofficer"), "{acc}");
    let (status, _) = s.call(
        "GET",
        &format!("/api/v1/services/{REG}/reviews"),
        Some(&founder),
        None,
    );
    assert_eq!(status, 403);
    let (status, _) = act(&s, &founder, REG, &food, "approve", json!({}));
    assert_eq!(status, 403, "applicants do not review");

    // Assigned to one officer; another cannot decide it; the assignee approves.
    let (status, v) = act(
        &s,
        &officer,
        REG,
        &food,
        "assign",
        json!({"assignee": "mofficer"}),
    );
    assert_eq!(status, 200, "{v}");
    let (status, v) = act(
        &s,
        &officer,
        REG,
        &food,
        "assign",
        json!({"assignee": "c_wang"}),
    );
    assert_eq!(
        status, 400,
        "only the department's officers are assigned: {v}"
    );
    let (status, v) = act(&s, &officer2, REG, &food, "approve", json!({}));
    assert_eq!(status, 409, "{v}");
    let (status, v) = act(
        &s,
        &officer2,
        REG,
        &food,
        "assign",
        json!({"assignee": "mofficer2"}),
    );
    assert_eq!(status, 409, "only the assignee or a steward reassigns: {v}");
    let (status, v) = act(
        &s,
        &officer,
        REG,
        &food,
        "approve",
        json!({"reason": "食品生产许可证已核验"}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["decision"], "approved");
    assert!(yunqi_types::classify::is_credit_code(
        v["document"]["code"].as_str().unwrap()
    ));
    // The applicant reads it; a stranger does not.
    let path = format!("/api/v1/services/{REG}/applications/{}", number(&food));
    let (status, mine) = s.call("GET", &path, Some(&founder), None);
    assert_eq!(status, 200);
    assert_eq!(mine["decision"], "approved");
    assert_eq!(mine["review"]["decided_by"], "mofficer");
    let (status, _) = s.call("GET", &path, Some(&other), None);
    assert_eq!(status, 403);

    // A refusal needs a reason, and frees the name.
    let (status, _) = act(&s, &officer2, REG, &food2, "refuse", json!({}));
    assert_eq!(status, 400);
    let (status, v) = act(
        &s,
        &officer2,
        REG,
        &food2,
        "refuse",
        json!({"reason": "缺少第二类医疗器械经营备案"}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["decision"], "refused");
    let (_, again) = apply(
        &s,
        &founder,
        REG,
        company("杭州某某医疗器械有限公司", &adult, "medical_devices"),
    );
    assert_eq!(
        again["decision"], "pending",
        "the name was given back: {again}"
    );

    // A column the steward reclassifies as personal is masked for the service from then on:
    // the index is rebuilt, the birth date is hidden, and the age rule cannot pass.
    let (status, v) = s.call(
        "POST",
        "/api/v1/datasets/city/residents/columns/birth_date/class",
        Some(&csteward),
        Some(&json!({"class": "personal"}).to_string()),
    );
    assert_eq!(status, 200, "{v}");
    let (_, masked) = apply(
        &s,
        &founder,
        REG,
        company("杭州遮蔽以后科技有限公司", &adult, "software"),
    );
    assert_eq!(masked["decision"], "refused", "{masked}");
    assert_ne!(
        masked["explanation"]["data"]["rep"]["birth_date"], "1985-03-12",
        "{masked}"
    );
    let (status, v) = s.call(
        "POST",
        "/api/v1/datasets/city/residents/columns/birth_date/class",
        Some(&csteward),
        Some(&json!({"class": "public"}).to_string()),
    );
    assert_eq!(status, 200, "{v}");

    // Without the grant, the lookup cannot run: no application is decided on stale data.
    let (status, v) = s.call(
        "POST",
        &format!("/api/v1/grants/{residents_grant}/revoke"),
        Some(&csteward),
        Some(&json!({"reason": "review of purposes"}).to_string()),
    );
    assert_eq!(status, 200, "{v}");
    let (status, v) = apply(
        &s,
        &founder,
        REG,
        company("杭州撤销以后有限公司", &adult, "software"),
    );
    assert_ne!(status, 200, "decided without the grant: {v}");
    common::grant(
        &s,
        &msteward,
        &csteward,
        &json!({
        "dataset": "city.residents", "columns": ["id_number", "name", "birth_date"],
        "purpose": "企业开办: legal representative check", "until": until,
        "unmasked": ["id_number"], "unmasked_reason": "the ID number an applicant gives is matched exactly"}),
    );

    // kill -9: decisions, reviews and the queue come back from the decision log.
    // (On a three-node cluster the suite's server is the cluster, which a restart would
    // replace; the cluster's own takeover is tested in cluster_serve.rs.)
    if !common::clustered() {
        s.kill9();
        s = Server::start(dir.path());
    }
    let (_, mut mine2) = s.call("GET", &path, Some(&founder), None);
    // The readable explanation is rendered now (column classes as they now stand).
    let mut mine = mine;
    mine.as_object_mut().unwrap().remove("readable");
    mine2.as_object_mut().unwrap().remove("readable");
    assert_eq!(mine2, mine);
    let (_, q) = s.call(
        "GET",
        &format!("/api/v1/services/{REG}/reviews"),
        Some(&officer),
        None,
    );
    assert_eq!(q["pending"].as_array().unwrap().len(), 1);
    assert_eq!(q["pending"][0]["id"], again["id"]);

    // A deadline that passes undecided is recorded once and audited.
    let quick = REGISTRATION.replace("review_hours = 24", "review_hours = 0.0003");
    let (status, v) = common::post_toml(&s, &msteward, &quick);
    assert_eq!(status, 201, "{v}");
    let (_, late) = apply(
        &s,
        &founder,
        REG,
        company("杭州迟到医疗器械有限公司", &adult, "medical_devices"),
    );
    assert_eq!(late["decision"], "pending", "{late}");
    let mut breached = Value::Null;
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let (_, q) = s.call(
            "GET",
            &format!("/api/v1/services/{REG}/reviews"),
            Some(&officer),
            None,
        );
        if let Some(x) = q["pending"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == late["id"])
            && !x["review"]["breached_at"].is_null()
        {
            assert_eq!(x["overdue"], true);
            breached = x.clone();
            break;
        }
    }
    assert!(!breached.is_null(), "the missed deadline was not recorded");
    // The same from the command line.
    let late_id = late["id"].as_str().unwrap();
    let (code, out, err) = common::cli(
        &s,
        &officer,
        &["service", "queue", "market.business-registration"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(late_id) && out.contains("OVERDUE"), "{out}");
    let (code, out, err) = common::cli(
        &s,
        &officer,
        &[
            "service",
            "review",
            late_id,
            "refuse",
            "--reason",
            "材料不全",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("refused") && out.contains("材料不全"), "{out}");
    let (code, out, err) = common::cli(
        &s,
        &founder,
        &[
            "service",
            "request",
            "market.business-registration",
            "company_name=杭州命令行软件有限公司",
            &format!("legal_rep={adult}"),
            "capital=50000",
            "scope=software",
            "address=余杭区",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("approved") && out.contains("code: 91330106"),
        "{out}"
    );
    let audit = s.audit_all();
    let has = |action: &str, principal: &str| {
        audit
            .iter()
            .any(|r| r["action"] == action && r["principal"] == principal)
    };
    assert!(has("service.review", "mofficer"));
    assert!(has("service.review", "mofficer2"));
    assert!(has("service.sla_breach", "system"));
    assert!(has("service.queue", "mofficer"));
}

const CH: &str = "health/credit-healthcare";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_healthcare_with_consent_and_a_derived_score() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path());
    s.dept("health");
    s.dept("city");
    let hsteward = s.principal("hsteward", "steward", Some("health"));
    let csteward = s.principal("csteward", "steward", Some("city"));
    let hospital = s.principal("hospital_1", "service", Some("health"));
    let good = id_number("330102", "19800220", 11);
    let poor = id_number("330102", "19820505", 12);
    let patient = common::citizen(&s, "c_chen", &good);
    let neighbour = common::citizen(&s, "c_sun", &poor);

    // The city credit score: derived by SQL from the bureau's own datasets, with lineage.
    common::dataset(
        &s,
        &csteward,
        "city",
        "residents",
        &format!("id_number,name\n{good},陈一\n{poor},孙二\n"),
    );
    common::dataset(
        &s,
        &csteward,
        "city",
        "payments",
        &format!("id_number,on_time,late\n{good},24,0\n{poor},3,4\n"),
    );
    let derive = json!({"sql": "SELECT r.id_number, 550 + 5 * p.on_time - 30 * p.late AS score, \
        CASE WHEN 550 + 5 * p.on_time - 30 * p.late >= 650 THEN 1000 ELSE 0 END AS credit_line_yuan \
        FROM city.residents r JOIN city.payments p ON r.id_number = p.id_number"});
    let (status, v) = s.call(
        "POST",
        "/api/v1/datasets/city/credit_scores/derive",
        Some(&csteward),
        Some(&derive.to_string()),
    );
    assert!(status == 200 || status == 201, "{v}");
    let (_, ds) = s.call(
        "GET",
        "/api/v1/datasets/city/credit_scores",
        Some(&csteward),
        None,
    );
    let lineage = ds.to_string();
    assert!(
        lineage.contains("city.residents") && lineage.contains("city.payments"),
        "{ds}"
    );
    let until = (chrono::Utc::now() + chrono::Duration::days(90))
        .date_naive()
        .to_string();
    common::grant(
        &s,
        &hsteward,
        &csteward,
        &json!({
        "dataset": "city.credit_scores", "columns": ["id_number", "score", "credit_line_yuan"],
        "purpose": "先看病后付费: credit line", "until": until,
        "unmasked": ["id_number"], "unmasked_reason": "the patient's ID number is matched exactly"}),
    );
    let (status, v) = common::post_toml(&s, &hsteward, CREDIT);
    assert_eq!(status, 201, "{v}");

    let visit = |who: &str, yuan: f64| json!({"patient": who, "amount": yuan, "visit": "V-001"});
    // Without the patient's consent, nothing is charged.
    let (status, r) = apply(&s, &hospital, CH, visit(&good, 300.0));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["decision"], "refused");
    assert!(r["reasons"].to_string().contains("尚未开通"), "{r}");
    assert!(
        r["explanation"]["data"].get("score").is_none(),
        "nothing about the patient is looked up without consent: {r}"
    );
    let (status, _) = apply(&s, &patient, CH, visit(&good, 300.0));
    assert_eq!(status, 403, "citizens do not charge visits");
    // Hospitals are accounts of health: another department's service account is refused.
    s.dept("traffic");
    let camera = s.principal("camera_1", "service", Some("traffic"));
    let (status, v) = apply(&s, &camera, CH, visit(&good, 300.0));
    assert_eq!(status, 403, "{v}");

    // The patient consents; only citizens consent, for themselves.
    let (status, v) = s.call(
        "PUT",
        &format!("/api/v1/me/consents/{CH}"),
        Some(&patient),
        None,
    );
    assert_eq!(status, 200, "{v}");
    let (status, _) = s.call(
        "PUT",
        &format!("/api/v1/me/consents/{CH}"),
        Some(&hospital),
        None,
    );
    assert_eq!(status, 403);
    let (_, mine) = s.call("GET", "/api/v1/me/consents", Some(&patient), None);
    assert_eq!(
        mine["consents"][0]["service"], "health.credit-healthcare",
        "{mine}"
    );
    let (_, theirs) = s.call("GET", "/api/v1/me/consents", Some(&neighbour), None);
    assert_eq!(theirs["consents"], json!([]));

    let (_, first) = apply(&s, &hospital, CH, visit(&good, 300.0));
    assert_eq!(first["decision"], "approved", "{first}");
    assert_eq!(first["draw"]["owed_yuan"], 300.0);
    assert_eq!(first["explanation"]["data"]["score"]["score"], 670);
    assert_eq!(
        first["explanation"]["data"]["line.credit"]["limit_yuan"],
        1000.0
    );
    let (_, over) = apply(&s, &hospital, CH, visit(&good, 700.01));
    assert_eq!(over["decision"], "refused", "{over}");
    assert!(over["reasons"].to_string().contains("信用额度"), "{over}");
    // A poor score: refused, even with consent.
    s.call(
        "PUT",
        &format!("/api/v1/me/consents/{CH}"),
        Some(&neighbour),
        None,
    );
    let (_, low) = apply(&s, &hospital, CH, visit(&poor, 10.0));
    assert_eq!(low["decision"], "refused");
    assert!(low["reasons"].to_string().contains("600"), "{low}");

    // The patient reads the visit, a neighbour cannot; the hospital that is paid records the
    // repayment, not the patient who owes it.
    let path = format!("/api/v1/services/{CH}/applications/{}", number(&first));
    let (status, _) = s.call("GET", &path, Some(&patient), None);
    assert_eq!(status, 200);
    let (status, _) = s.call("GET", &path, Some(&neighbour), None);
    assert_eq!(status, 403);
    let (status, _) = act(&s, &neighbour, CH, &first, "repay", json!({}));
    assert_eq!(status, 403);
    let (status, _) = act(&s, &patient, CH, &first, "repay", json!({"amount": 100}));
    assert_eq!(status, 403);
    let (status, v) = act(&s, &hospital, CH, &first, "repay", json!({"amount": 100}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["draw"]["owed_yuan"], 200.0);

    // kill -9: the line and the consent survive.
    // (On a three-node cluster the suite's server is the cluster, which a restart would
    // replace; the cluster's own takeover is tested in cluster_serve.rs.)
    if !common::clustered() {
        s.kill9();
        s = Server::start(dir.path());
    }
    let (_, over) = apply(&s, &hospital, CH, visit(&good, 800.01));
    assert_eq!(over["decision"], "refused", "200 owed: {over}");
    let (_, fits) = apply(&s, &hospital, CH, visit(&good, 800.0));
    assert_eq!(fits["decision"], "approved", "{fits}");
    let (status, v) = act(&s, &hospital, CH, &first, "repay", json!({}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["draw"]["owed_yuan"], 0.0);

    let (code, out, _) = common::cli(&s, &patient, &["consent", "list"]);
    assert_eq!(code, 0);
    assert!(out.contains("health.credit-healthcare"), "{out}");
    // Consent withdrawn: no more charges.
    let (status, _) = s.call(
        "DELETE",
        &format!("/api/v1/me/consents/{CH}"),
        Some(&patient),
        None,
    );
    assert_eq!(status, 200);
    let (_, r) = apply(&s, &hospital, CH, visit(&good, 10.0));
    assert_eq!(r["decision"], "refused");
    let audit = s.audit_all();
    for (action, who) in [
        ("consent.give", "c_chen"),
        ("consent.withdraw", "c_chen"),
        ("service.repay", "hospital_1"),
        ("service.decide", "hospital_1"),
    ] {
        assert!(
            audit
                .iter()
                .any(|r| r["action"] == action && r["principal"] == who),
            "{action} by {who}"
        );
    }
    // The score was read as the service, under the grant — once, into an index (it did not
    // change), and not once per visit; each visit's decision names what it used.
    let reads = audit
        .iter()
        .filter(|r| r["action"] == "sql.query" && r["principal"] == "svc_health_credit_healthcare")
        .count();
    let builds = if common::clustered() { 1 } else { 2 };
    assert_eq!(
        reads, builds,
        "one index build before and one after the restart"
    );
    assert!(audit.iter().any(|r| {
        r["action"] == "service.decide"
            && r["detail"]
                .as_str()
                .unwrap_or("")
                .contains("score<-city.credit_scores")
    }));
    // The score was read as the service, under the grant.
    assert!(audit.iter().any(|r| r["action"] == "sql.query"
        && r["principal"] == "svc_health_credit_healthcare"
        && r["purpose"].as_str().unwrap_or("").contains("先看病后付费")));
}
