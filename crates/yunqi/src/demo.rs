//! `yunqi demo`: the demo city of the product brief, served. The first run on a data directory
//! seeds it through the server's own API — departments, people, a million residents with valid
//! ID numbers, vehicles, businesses, insurance and housing-fund accounts, holidays, a derived
//! credit score with lineage, grants with purposes, the traffic streams and the city brain's
//! continuous views, the three services — and writes `DIR/demo/credentials.json`; every run
//! then keeps simulated traffic flowing in live. A second run resumes: nothing is seeded twice.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use crate::serve::{Ready, ServeArgs};
use crate::simulate::{DISTRICTS, Rng};

/// Options of `yunqi demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Residents in the city's register (each with a valid ID number).
    #[arg(long, default_value_t = 1_000_000)]
    pub residents: u32,
    /// Registered vehicles (the simulated traffic's fleet).
    #[arg(long, default_value_t = 300_000)]
    pub vehicles: u32,
    /// Registered businesses.
    #[arg(long, default_value_t = 100_000)]
    pub businesses: u32,
    /// Vehicle detections per second sent live at rush hour (less at other hours; 0: none).
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
}

/// The simulator's seed: the registry's plates are the plates the live traffic shows.
const SEED: u64 = 2026;
const LOCAL_PERCENT: u32 = 70;
/// Road segments with a camera.
const SEGMENTS: u32 = 3_000;
/// The restricted zone whose load the urgent entry permit reads: one district's roads.
const ZONE_DISTRICT: &str = "上城区";

/// Administrative division codes of Hangzhou's districts, in [`DISTRICTS`] order.
const DISTRICT_CODES: [&str; 10] = [
    "330102", "330105", "330106", "330108", "330109", "330110", "330113", "330114", "330111",
    "330112",
];

const SURNAMES: [&str; 24] = [
    "王", "李", "张", "刘", "陈", "杨", "黄", "赵", "吴", "周", "徐", "孙", "马", "朱", "胡", "郭",
    "何", "林", "罗", "高", "郑", "梁", "谢", "宋",
];
const GIVEN: [&str; 32] = [
    "伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟", "涛", "明",
    "超", "秀", "霞", "平", "刚", "桂", "华", "丹", "鹏", "辉", "玲", "浩", "宇", "欣", "晨", "琳",
];

/// China's public holidays and make-up working days (国务院办公厅 schedule for 2026).
const HOLIDAYS: &[(&str, &str)] = &[
    ("2026-01-01", "holiday"),
    ("2026-01-02", "holiday"),
    ("2026-01-03", "holiday"),
    ("2026-01-04", "workday"),
    ("2026-02-14", "workday"),
    ("2026-02-15", "holiday"),
    ("2026-02-16", "holiday"),
    ("2026-02-17", "holiday"),
    ("2026-02-18", "holiday"),
    ("2026-02-19", "holiday"),
    ("2026-02-20", "holiday"),
    ("2026-02-21", "holiday"),
    ("2026-02-22", "holiday"),
    ("2026-02-23", "holiday"),
    ("2026-02-28", "workday"),
    ("2026-04-04", "holiday"),
    ("2026-04-05", "holiday"),
    ("2026-04-06", "holiday"),
    ("2026-05-01", "holiday"),
    ("2026-05-02", "holiday"),
    ("2026-05-03", "holiday"),
    ("2026-05-04", "holiday"),
    ("2026-05-05", "holiday"),
    ("2026-05-09", "workday"),
    ("2026-06-19", "holiday"),
    ("2026-06-20", "holiday"),
    ("2026-06-21", "holiday"),
    ("2026-09-20", "workday"),
    ("2026-09-25", "holiday"),
    ("2026-09-26", "holiday"),
    ("2026-09-27", "holiday"),
    ("2026-10-01", "holiday"),
    ("2026-10-02", "holiday"),
    ("2026-10-03", "holiday"),
    ("2026-10-04", "holiday"),
    ("2026-10-05", "holiday"),
    ("2026-10-06", "holiday"),
    ("2026-10-07", "holiday"),
    ("2026-10-10", "workday"),
    ("2027-01-01", "holiday"),
];

const DEPARTMENTS: &[(&str, &str)] = &[
    ("city", "大数据局 Big Data Bureau"),
    ("traffic", "公安交警 Traffic Police"),
    ("transport", "交通运输局 Transport Bureau"),
    ("market", "市场监管局 Market Regulation"),
    ("health", "医保局 Health Insurance"),
    ("housing", "公积金中心 Housing Fund"),
];

/// (name, role, department, display name).
const STAFF: &[(&str, &str, &str, &str)] = &[
    ("city_steward", "steward", "city", "大数据局 数据管理员"),
    ("city_analyst", "analyst", "city", "大数据局 分析师"),
    ("traffic_steward", "steward", "traffic", "交警 数据管理员"),
    ("traffic_officer", "officer", "traffic", "交警 民警"),
    ("traffic_analyst", "analyst", "traffic", "交警 分析师"),
    ("traffic_camera", "service", "traffic", "卡口摄像头 Cameras"),
    (
        "transport_steward",
        "steward",
        "transport",
        "交通运输局 数据管理员",
    ),
    (
        "market_steward",
        "steward",
        "market",
        "市场监管局 数据管理员",
    ),
    ("market_officer", "officer", "market", "市场监管局 审批员"),
    ("health_steward", "steward", "health", "医保局 数据管理员"),
    ("hospital_zju1", "service", "health", "浙大一院 (hospital)"),
    (
        "hospital_srrsh",
        "service",
        "health",
        "邵逸夫医院 (hospital)",
    ),
    (
        "housing_steward",
        "steward",
        "housing",
        "公积金中心 数据管理员",
    ),
];

const CITIZENS: [&str; 5] = ["c_zhang", "c_li", "c_wang", "c_zhao", "c_chen"];

const SERVICES: &[(&str, &str)] = &[
    (
        "traffic_steward",
        include_str!("../../../services/traffic.urgent-entry-permit.toml"),
    ),
    (
        "market_steward",
        include_str!("../../../services/market.business-registration.toml"),
    ),
    (
        "health_steward",
        include_str!("../../../services/health.credit-healthcare.toml"),
    ),
];

/// A resident ID number (GB 11643) with its check character.
fn id_number(region: &str, birth: chrono::NaiveDate, seq: u32) -> String {
    let first = format!("{region}{}{:03}", birth.format("%Y%m%d"), seq % 1000);
    let check = yunqi_types::NationalId::check_char(first.as_bytes());
    format!("{first}{check}")
}

/// Resident `i`: ID number, name, gender, birth date, district.
fn resident(
    i: u32,
) -> (
    String,
    String,
    &'static str,
    chrono::NaiveDate,
    &'static str,
) {
    let mut r = Rng(u64::from(i));
    let d = (r.below(DISTRICTS.len() as u64)) as usize;
    let birth = chrono::NaiveDate::from_ymd_opt(1945, 1, 1).expect("date")
        + chrono::Duration::days(r.below(365 * 62) as i64);
    // The sequence number's last digit is odd for men, even for women; i keeps ID numbers
    // unique (one region and day hold 1,000 numbers).
    let male = r.below(2) == 0;
    let seq = ((i / 10) % 500) * 2 + u32::from(male);
    let name = format!(
        "{}{}{}",
        SURNAMES[r.below(SURNAMES.len() as u64) as usize],
        GIVEN[r.below(GIVEN.len() as u64) as usize],
        if r.below(3) == 0 {
            ""
        } else {
            GIVEN[r.below(GIVEN.len() as u64) as usize]
        }
    );
    (
        id_number(DISTRICT_CODES[d], birth, seq),
        name,
        if male { "男" } else { "女" },
        birth,
        DISTRICTS[d],
    )
}

/// The server's HTTP API, as the seeding and the simulator call it.
struct Api {
    agent: ureq::Agent,
    base: String,
}

impl Api {
    fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        content_type: &str,
        body: &str,
    ) -> anyhow::Result<(u16, Value)> {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {token}");
        let mut r = match method {
            "GET" => self.agent.get(&url).header("Authorization", &auth).call()?,
            "PUT" => self
                .agent
                .put(&url)
                .header("Authorization", &auth)
                .send_empty()?,
            _ => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .header("Content-Type", content_type)
                .send(body)?,
        };
        let status = r.status().as_u16();
        let text = r
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .unwrap_or_default();
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// A call that must succeed; "already exists" counts as success (a seeding resumed after
    /// an interruption).
    fn must(
        &self,
        method: &str,
        path: &str,
        token: &str,
        content_type: &str,
        body: &str,
    ) -> anyhow::Result<Value> {
        let (status, v) = self.call(method, path, token, content_type, body)?;
        anyhow::ensure!(
            status < 300 || status == 409,
            "{method} {path}: {status} {v}"
        );
        Ok(v)
    }

    fn json(&self, path: &str, token: &str, body: &Value) -> anyhow::Result<Value> {
        self.must("POST", path, token, "application/json", &body.to_string())
    }
}

/// What the seeding made that the simulator and the credentials file need.
#[derive(serde::Serialize, serde::Deserialize)]
struct Seeded {
    principals: Vec<Value>,
    camera_token: String,
    vehicles: u32,
}

/// `yunqi demo`.
pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let DemoArgs {
        serve,
        residents,
        vehicles,
        businesses,
        rate,
    } = args;
    let sizes = Sizes {
        residents: residents.max(CITIZENS.len() as u32),
        vehicles: vehicles.max(100),
        businesses: businesses.max(1),
        rate,
    };
    crate::serve::run_with(
        serve,
        "warn",
        Box::new(move |ready: Ready| {
            std::thread::Builder::new()
                .name("demo".into())
                .spawn(move || {
                    if let Err(e) = demo(&ready, &sizes) {
                        eprintln!("error: the demo city could not be set up: {e:#}");
                        eprintln!(
                            "hint: stop the server (Ctrl-C) and start `yunqi demo` again: it resumes where it stopped"
                        );
                    }
                })
                .expect("demo thread");
        }),
    )
}

#[derive(Clone, Copy)]
struct Sizes {
    residents: u32,
    vehicles: u32,
    businesses: u32,
    rate: u64,
}

fn demo(ready: &Ready, sizes: &Sizes) -> anyhow::Result<()> {
    let started = Instant::now();
    let api = Api {
        agent: ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(600)))
            .build()
            .into(),
        base: ready.http.clone(),
    };
    let dir = ready.data.join("demo");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let state = dir.join("seeded.json");
    let seeded: Seeded = match std::fs::read(&state) {
        Ok(bytes) => {
            println!("demo city: resuming (seeded before; {})", state.display());
            serde_json::from_slice(&bytes).context("demo/seeded.json is not readable")?
        }
        Err(_) => {
            println!("demo city: seeding through the API (a few seconds with the release build)…");
            let s = seed(&api, &ready.admin_token, sizes)?;
            crate::serve::write_atomically(&state, &serde_json::to_vec(&s)?, 0o600)?;
            s
        }
    };
    let credentials = dir.join("credentials.json");
    crate::serve::write_atomically(
        &credentials,
        serde_json::to_string_pretty(&json!({ "principals": seeded.principals }))?.as_bytes(),
        0o600,
    )?;
    println!(
        "demo city: ready in {:.1} s — {} principals in {}",
        started.elapsed().as_secs_f64(),
        seeded.principals.len(),
        credentials.display()
    );
    println!(
        "  console     {}/  (log in with a token from the credentials file)",
        ready.http
    );
    if let Some(c) = seeded.principals.iter().find(|p| p["role"] == "citizen") {
        println!(
            "  try, as citizen {} (plates {}):",
            c["name"].as_str().unwrap_or(""),
            c["plates"]
        );
        println!(
            "    export YUNQI_URL={} YUNQI_TOKEN=$(jq -r '.principals[] | select(.name==\"{}\") | .token' {})",
            ready.http,
            c["name"].as_str().unwrap_or(""),
            credentials.display()
        );
        println!(
            "    yunqi service request traffic.urgent-entry-permit plate=… date=YYYY-MM-DD window=day reason=送货"
        );
    }
    let _ = std::io::stdout().flush();
    if sizes.rate > 0 {
        simulate_live(&api, &seeded, sizes.rate);
    }
    Ok(())
}

fn seed(api: &Api, admin: &str, sizes: &Sizes) -> anyhow::Result<Seeded> {
    let step = |what: &str, t: Instant| {
        println!("  {what} ({:.1} s)", t.elapsed().as_secs_f64());
        let _ = std::io::stdout().flush();
    };
    let t = Instant::now();
    for (name, title) in DEPARTMENTS {
        api.json(
            "/api/v1/departments",
            admin,
            &json!({"name": name, "title": title}),
        )?;
    }
    let mut principals = Vec::new();
    let mut tokens = std::collections::HashMap::new();
    for (name, role, dept, display) in STAFF {
        let v = api.json(
            "/api/v1/principals",
            admin,
            &json!({"name": name, "role": role, "department": dept, "display_name": display}),
        )?;
        let token = v["token"]["token"].as_str().unwrap_or_default().to_string();
        anyhow::ensure!(
            !token.is_empty(),
            "an earlier seeding of this directory stopped before it finished (principal {name} exists, its token was not saved)\nhint: start `yunqi demo` with a new --data directory"
        );
        tokens.insert(*name, token.clone());
        principals.push(json!({"name": name, "department": dept, "role": role,
                                "display_name": display, "token": token}));
    }
    let tok = |n: &str| tokens.get(n).cloned().unwrap_or_default();
    step("departments and staff", t);

    // The resident register (city): a million people with valid ID numbers.
    let t = Instant::now();
    let mut csv = String::with_capacity(sizes.residents as usize * 60);
    csv.push_str("id_number,name,gender,birth_date,district\n");
    let mut payments = String::with_capacity(sizes.residents as usize * 28);
    payments.push_str("id_number,on_time,late\n");
    let mut ids = Vec::with_capacity(sizes.residents as usize);
    let mut taken = std::collections::HashSet::with_capacity(sizes.residents as usize);
    let mut i = 0u32;
    while ids.len() < sizes.residents as usize {
        let (id, name, gender, birth, district) = resident(i);
        i += 1;
        // Random birth dates meet now and then: an ID number is one person's.
        if !taken.insert(id.clone()) {
            continue;
        }
        let i = i - 1;
        csv.push_str(&format!("{id},{name},{gender},{birth},{district}\n"));
        let mut r = Rng(u64::from(i) ^ 0x5041_594D);
        // Demo citizens pay on time (good credit: a line of 3,000 yuan); some residents do not.
        let (on_time, late) = if i < CITIZENS.len() as u32 {
            (30, 0)
        } else {
            (r.below(36), r.below(5) * r.below(2))
        };
        payments.push_str(&format!("{id},{on_time},{late}\n"));
        ids.push(id);
    }
    dataset(
        api,
        &tok("city_steward"),
        "city",
        "residents",
        "常住人口库 The resident register: ID number, name, gender, birth date, district",
        &["人口", "residents"],
        csv,
    )?;
    dataset(
        api,
        &tok("city_steward"),
        "city",
        "payments",
        "缴费记录 Bills paid on time and late, per resident (utilities, fines, taxes)",
        &["信用", "credit"],
        payments,
    )?;
    let mut holidays = String::from("day,kind\n");
    for (d, k) in HOLIDAYS {
        holidays.push_str(&format!("{d},{k}\n"));
    }
    dataset(
        api,
        &tok("city_steward"),
        "city",
        "holidays",
        "法定节假日 Public holidays and make-up working days",
        &["日历", "calendar"],
        holidays,
    )?;
    // The city credit score (钱江分-like), derived by SQL, with lineage.
    api.json(
        "/api/v1/datasets/city/credit_scores/derive",
        &tok("city_steward"),
        &json!({"sql": "SELECT r.id_number, \
            least(850, 550 + 5 * p.on_time - 30 * p.late) AS score, \
            CASE WHEN 550 + 5 * p.on_time - 30 * p.late >= 700 THEN 3000 \
                 WHEN 550 + 5 * p.on_time - 30 * p.late >= 650 THEN 1000 ELSE 0 END AS credit_line_yuan \
            FROM city.residents r JOIN city.payments p ON r.id_number = p.id_number"}),
    )?;
    step(
        &format!(
            "{} residents, payments, holidays, the credit score derived",
            sizes.residents
        ),
        t,
    );

    // Vehicles (transport): the simulated traffic's fleet; demo citizens own some.
    let t = Instant::now();
    let mut fleet: Vec<(String, String)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for v in 0..sizes.vehicles {
        let p = crate::simulate::plate(SEED, v, LOCAL_PERCENT);
        if seen.insert(p.clone()) {
            let owner = ids[(v as usize * 7919 + 11) % ids.len()].clone();
            fleet.push((p, owner));
        }
    }
    let mut plates_of: Vec<Vec<String>> = vec![Vec::new(); CITIZENS.len()];
    let (mut local, mut other) = (0usize, 0usize);
    for (c, plates) in plates_of.iter_mut().enumerate() {
        // One local plate and two non-local ones each: try the permit with both kinds.
        while !fleet[local].0.starts_with("浙A") {
            local += 1;
        }
        plates.push(fleet[local].0.clone());
        fleet[local].1 = ids[c].clone();
        local += 1;
        for _ in 0..2 {
            while fleet[other].0.starts_with("浙A") || plates.contains(&fleet[other].0) {
                other += 1;
            }
            plates.push(fleet[other].0.clone());
            fleet[other].1 = ids[c].clone();
            other += 1;
        }
    }
    let mut csv = String::from("plate,vehicle_type,owner_id,registered\n");
    for (i, (p, owner)) in fleet.iter().enumerate() {
        let kind = ["小型汽车", "小型汽车", "小型汽车", "中型货车", "新能源汽车"][i % 5];
        let year = 2008 + (i % 18);
        csv.push_str(&format!("{p},{kind},{owner},{year}-0{}-15\n", 1 + i % 9));
    }
    dataset(
        api,
        &tok("transport_steward"),
        "transport",
        "vehicles",
        "机动车登记 Vehicle registry: plate, type, owner, registration date",
        &["车辆", "vehicles"],
        csv,
    )?;

    // Businesses (market), insurance (health), housing fund (housing).
    let mut csv = String::from("name,credit_code,legal_rep_id,district,registered,status\n");
    const TRADES: [&str; 8] = [
        "科技",
        "餐饮",
        "贸易",
        "咨询",
        "电子商务",
        "文化传媒",
        "物流",
        "建筑",
    ];
    for b in 0..sizes.businesses {
        let mut r = Rng(u64::from(b) ^ 0xB5B5_0000);
        let d = (r.below(DISTRICTS.len() as u64)) as usize;
        let brand: String = (0..2)
            .map(|_| GIVEN[r.below(GIVEN.len() as u64) as usize])
            .collect();
        let code = yunqi_serve::decider::credit_code(DISTRICT_CODES[d], 50_000_000 + u64::from(b))
            .context("credit code")?;
        csv.push_str(&format!(
            "杭州{brand}{}{}有限公司,{code},{},{},{}-0{}-01,{}\n",
            TRADES[(b % 8) as usize],
            b,
            ids[(b as usize * 104_729) % ids.len()],
            DISTRICTS[d],
            2000 + (b % 26),
            1 + b % 9,
            if b % 17 == 0 { "revoked" } else { "active" }
        ));
    }
    dataset(
        api,
        &tok("market_steward"),
        "market",
        "businesses",
        "企业登记 Business registry: name, unified social credit code, legal representative",
        &["企业", "businesses"],
        csv,
    )?;
    // Authorised agents (代办人): the second demo citizen may register a business for the
    // first, for a year (the business registration service reads it).
    let until = (chrono::Utc::now() + chrono::Duration::days(365)).date_naive();
    dataset(
        api,
        &tok("market_steward"),
        "market",
        "agents",
        "授权代办 Authorised agents: who may apply for a business registration for whom, until when",
        &["代办", "agents"],
        format!("agent_id,subject_id,until\n{},{},{until}\n", ids[1], ids[0]),
    )?;
    let accounts = (sizes.residents / 5).max(CITIZENS.len() as u32);
    let mut ins = String::from("id_number,scheme,balance_yuan,status\n");
    let mut fund = String::from("id_number,employer,monthly_deposit_yuan,balance_yuan\n");
    for i in 0..accounts {
        let id = &ids[i as usize];
        ins.push_str(&format!(
            "{id},{},{}.{:02},active\n",
            if i % 3 == 0 {
                "城乡居民"
            } else {
                "职工医保"
            },
            (i * 37) % 20_000,
            i % 100
        ));
        fund.push_str(&format!(
            "{id},{},{},{}\n",
            fund_employer(i),
            800 + (i * 13) % 4000,
            (i * 97) % 300_000
        ));
    }
    dataset(
        api,
        &tok("health_steward"),
        "health",
        "insurance_accounts",
        "医保账户 Health insurance accounts",
        &["医保"],
        ins,
    )?;
    dataset(
        api,
        &tok("housing_steward"),
        "housing",
        "fund_accounts",
        "公积金账户 Housing fund accounts",
        &["公积金"],
        fund,
    )?;
    step(
        &format!(
            "{} vehicles, {} businesses, {accounts} insurance and housing-fund accounts",
            fleet.len(),
            sizes.businesses
        ),
        t,
    );

    // Grants between departments, each with its purpose.
    let t = Instant::now();
    let until = (chrono::Utc::now() + chrono::Duration::days(365))
        .date_naive()
        .to_string();
    for (requester, owner, req) in [
        (
            "traffic_steward",
            "transport_steward",
            json!({"dataset": "transport.vehicles",
            "columns": ["plate", "vehicle_type", "owner_id"],
            "purpose": "非浙A急事通: vehicle registration check", "until": until,
            "unmasked": ["plate"], "unmasked_reason": "the plate an applicant gives is matched exactly"}),
        ),
        (
            "traffic_steward",
            "city_steward",
            json!({"dataset": "city.holidays",
            "columns": ["day", "kind"], "purpose": "非浙A急事通: no permits on holidays", "until": until}),
        ),
        (
            "market_steward",
            "city_steward",
            json!({"dataset": "city.residents",
            "columns": ["id_number", "name", "birth_date"],
            "purpose": "企业开办: legal representative check", "until": until,
            "unmasked": ["id_number"], "unmasked_reason": "the ID number an applicant gives is matched exactly"}),
        ),
        (
            "health_steward",
            "city_steward",
            json!({"dataset": "city.credit_scores",
            "columns": ["id_number", "score", "credit_line_yuan"],
            "purpose": "先看病后付费: credit line", "until": until,
            "unmasked": ["id_number"], "unmasked_reason": "the patient's ID number is matched exactly"}),
        ),
    ] {
        let g = api.json("/api/v1/grants", &tok(requester), &req)?;
        if let Some(id) = g["id"].as_str() {
            api.must(
                "POST",
                &format!("/api/v1/grants/{id}/approve"),
                &tok(owner),
                "application/json",
                "",
            )?;
        }
    }
    // One request left in the city's inbox, for its steward to decide in the console.
    api.json(
        "/api/v1/grants",
        &tok("housing_steward"),
        &json!({"dataset": "city.residents", "columns": ["id_number", "district"],
                "purpose": "公积金: check the district of residence for housing loans",
                "until": until}),
    )?;
    step("grants", t);

    // The restricted zone (traffic police): where and when non-local plates need a permit.
    dataset(
        api,
        &tok("traffic_steward"),
        "traffic",
        "restricted_zones",
        "限行区域 Restricted zones: where and when non-local plates need a permit",
        &["限行", "zones"],
        format!(
            "zone,district,weekday_hours,description\n\
             core,{ZONE_DISTRICT},07:00-09:00 17:00-19:00,\"环城线以内 Inside the ring road; its load is the view traffic.zone_load_1m\"\n\
             west_lake,西湖区,07:00-20:00,\"西湖景区 West Lake scenic area (weekends and holidays too)\"\n"
        ),
    )?;

    // The city brain: detections, violations, and continuous views over them.
    let t = Instant::now();
    for q in [
        "CREATE STREAM traffic.detections (plate TEXT, segment INT, district TEXT, speed DOUBLE, ts TIMESTAMP) WITH (event_time = 'ts', watermark = '2 seconds')".to_string(),
        "CREATE STREAM traffic.violations (plate TEXT, kind TEXT, segment INT, ts TIMESTAMP) WITH (event_time = 'ts', watermark = '1 second')".to_string(),
        "CREATE CONTINUOUS VIEW traffic.district_load_1m AS SELECT window_start, window_end, district, count(*) AS vehicles, avg(speed) AS avg_speed, approx_count_distinct(plate) AS distinct_vehicles FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE) GROUP BY window_start, window_end, district".to_string(),
        "CREATE CONTINUOUS VIEW traffic.segment_load_1m AS SELECT window_start, window_end, segment, district, count(*) AS vehicles, avg(speed) AS avg_speed FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE) GROUP BY window_start, window_end, segment, district".to_string(),
        format!("CREATE CONTINUOUS VIEW traffic.zone_load_1m AS SELECT window_start, window_end, count(*) AS vehicles FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE) WHERE district = '{ZONE_DISTRICT}' GROUP BY window_start, window_end"),
    ] {
        api.json("/api/v1/sql", &tok("traffic_steward"), &json!({ "sql": q }))?;
    }
    step("streams and continuous views", t);

    // The three services.
    let t = Instant::now();
    for (steward, toml) in SERVICES {
        api.must(
            "POST",
            "/api/v1/services",
            &tok(steward),
            "application/toml",
            toml,
        )?;
    }
    step("services", t);

    // Demo citizens: residents of the register, with their vehicles; consented to credit
    // healthcare, so that hospitals can charge them.
    for (c, name) in CITIZENS.iter().enumerate() {
        let (id, display, ..) = resident(c as u32);
        let v = api.json(
            "/api/v1/principals",
            admin,
            &json!({"name": name, "role": "citizen", "id_number": id, "display_name": display}),
        )?;
        let token = v["token"]["token"].as_str().unwrap_or_default().to_string();
        api.must(
            "PUT",
            "/api/v1/me/consents/health/credit-healthcare",
            &token,
            "application/json",
            "",
        )?;
        principals.push(json!({"name": name, "department": null, "role": "citizen",
            "display_name": display, "token": token, "id_number": id, "plates": plates_of[c]}));
    }
    Ok(Seeded {
        principals,
        camera_token: tok("traffic_camera"),
        vehicles: sizes.vehicles,
    })
}

fn fund_employer(i: u32) -> &'static str {
    [
        "阿里巴巴",
        "网易",
        "海康威视",
        "杭州市政府",
        "浙江大学",
        "吉利汽车",
    ][(i % 6) as usize]
}

/// Creates a dataset and imports `csv` into it, once.
fn dataset(
    api: &Api,
    steward: &str,
    department: &str,
    name: &str,
    description: &str,
    tags: &[&str],
    csv: String,
) -> anyhow::Result<()> {
    let (status, v) = api.call(
        "POST",
        "/api/v1/datasets",
        steward,
        "application/json",
        &json!({"department": department, "name": name, "description": description, "tags": tags})
            .to_string(),
    )?;
    if status == 409 {
        // Made by an earlier run: import only if that run stopped before the import landed,
        // so a dataset is never imported twice nor left empty.
        let (_, d) = api.call(
            "GET",
            &format!("/api/v1/datasets/{department}/{name}"),
            steward,
            "application/json",
            "",
        )?;
        if d["versions"].as_array().is_some_and(|v| !v.is_empty()) {
            return Ok(());
        }
    } else {
        anyhow::ensure!(status < 300, "dataset {department}.{name}: {status} {v}");
    }
    api.must(
        "POST",
        &format!("/api/v1/datasets/{department}/{name}/import"),
        steward,
        "text/csv",
        &csv,
    )?;
    Ok(())
}

/// Sends live traffic, second by second, as the cameras would: the fleet's plates on the
/// city's segments, more at rush hour; now and then a violation in the restricted zone.
fn simulate_live(api: &Api, seeded: &Seeded, rate: u64) {
    let mut second = 0u64;
    let mut failures = 0;
    loop {
        let tick = Instant::now();
        let now = chrono::Utc::now();
        let args = crate::simulate::TrafficArgs {
            rate,
            duration: 1,
            start: None,
            segments: SEGMENTS,
            vehicles: seeded.vehicles,
            local_percent: LOCAL_PERCENT,
            max_delay_ms: 500,
            seed: SEED ^ second.wrapping_mul(0x9E37_79B9),
            out: "-".into(),
            format: crate::simulate::OutFormat::Ndjson,
        };
        let mut body = String::new();
        let _ = crate::simulate::detections(&args, now, |d| {
            body.push_str(&d.line(crate::simulate::OutFormat::Ndjson));
            Ok(())
        });
        let sent = api.call(
            "POST",
            "/api/v1/streams/traffic/detections/events",
            &seeded.camera_token,
            "application/x-ndjson",
            &body,
        );
        // About one violation a minute in the zone, by a vehicle of the fleet.
        if second % 60 == 59 {
            let v = (second / 60) as u32 % seeded.vehicles.max(1);
            let plate = crate::simulate::plate(SEED, v, LOCAL_PERCENT);
            let line = json!({"plate": plate, "kind": "闯红灯 red light", "segment": 7,
                "ts": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)});
            let _ = api.call(
                "POST",
                "/api/v1/streams/traffic/violations/events",
                &seeded.camera_token,
                "application/x-ndjson",
                &line.to_string(),
            );
        }
        match sent {
            Ok((s, _)) if s < 300 => failures = 0,
            _ => {
                failures += 1;
                if failures > 30 {
                    return; // the server is gone
                }
            }
        }
        second += 1;
        if let Some(rest) = Duration::from_secs(1).checked_sub(tick.elapsed()) {
            std::thread::sleep(rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn residents_have_valid_id_numbers() {
        for i in 0..20_000 {
            let (id, name, gender, birth, district) = resident(i);
            let parsed = yunqi_types::NationalId::parse(&id)
                .unwrap_or_else(|e| panic!("{id}: {}", e.message));
            assert_eq!(parsed.as_str(), id);
            let d = DISTRICTS.iter().position(|x| *x == district).unwrap();
            assert!(id.starts_with(DISTRICT_CODES[d]));
            assert!(id.contains(&birth.format("%Y%m%d").to_string()));
            let odd = (id.as_bytes()[16] - b'0') % 2 == 1;
            assert_eq!(odd, gender == "男", "{id} {gender}");
            assert!(name.chars().count() >= 2);
        }
        assert_eq!(resident(7), resident(7), "deterministic");
    }
}
