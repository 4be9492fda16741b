//! `yunqi bench decide`: durable decisions per second for the urgent entry permit — inputs
//! checked, four rules, a yearly and a monthly quota per plate, each decision audited and
//! logged durably before it is answered — with many callers contending for the same plates;
//! and, side by side in the same run, the same quota transaction on PostgreSQL driven by
//! pgbench (conditional upserts of the two counters and an insert of the permit, one
//! transaction per application, durable commits).

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use serde_json::json;
use yunqi_serve::calendar::Calendar;
use yunqi_serve::decider::{Application, AuditRecorder, Decider, Verdict, check_inputs};
use yunqi_serve::rules::Value;
use yunqi_types::{Clock, Limits, SystemClock};

use crate::bench::{median, progress, workdir};

const PERMIT: &str = include_str!("../../../services/traffic.urgent-entry-permit.toml");

/// Options of `yunqi bench decide`.
#[derive(clap::Args)]
pub struct DecideBench {
    /// Applications per in-process run.
    #[arg(long, default_value_t = 300_000)]
    pub applications: usize,
    /// Distinct plates applying (fewer plates, more contention).
    #[arg(long, default_value_t = 20_000)]
    pub plates: usize,
    /// Concurrent callers in process.
    #[arg(long, default_value_t = 512)]
    pub callers: usize,
    /// Runs of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Applications sent to PostgreSQL (0 to skip the baseline).
    #[arg(long, default_value_t = 30_000)]
    pub pg_applications: usize,
    /// PostgreSQL clients.
    #[arg(long, default_value_t = 16)]
    pub pg_clients: usize,
    /// PostgreSQL to compare with (psql and pgbench are run with these settings).
    #[arg(
        long,
        default_value = "host=127.0.0.1 port=5432 user=postgres dbname=test"
    )]
    pub pg: String,
    /// Applications sent over HTTP to a server of this binary (0 to skip; at most
    /// --applications).
    #[arg(long, default_value_t = 100_000)]
    pub http_applications: usize,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 64)]
    pub http_clients: usize,
    /// Directory to write in (default: a temporary directory).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
}

/// The applications: (plate, date, window).
fn applications(n: usize, plates: usize, today: chrono::NaiveDate) -> Vec<(String, String)> {
    let cal = Calendar::china();
    let days: Vec<String> = (0..=60)
        .map(|i| today + chrono::Duration::days(i))
        .filter(|d| !cal.is_rest_day(*d) && !cal.is_rest_day(*d + chrono::Duration::days(1)))
        .map(|d| d.to_string())
        .collect();
    let mut x: u64 = 0x00c0_ffee;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|_| {
            let p = next() as usize % plates.max(1);
            let d = &days[next() as usize % days.len()];
            (format!("沪B{p:05}"), d.clone())
        })
        .collect()
}

struct Run {
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    approved: usize,
}

fn in_process(
    dir: &std::path::Path,
    apps: &[(String, String)],
    callers: usize,
) -> anyhow::Result<Run> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let audit = Arc::new(
        yunqi_audit::AuditChain::open(&dir.join("audit"), clock.clone(), &Limits::default())
            .map_err(crate::user_error)?,
    );
    let log = yunqi_stream::SegmentLog::open(
        &dir.join("log"),
        yunqi_stream::LogConfig::default(),
        clock.clone(),
    )
    .map_err(crate::user_error)?;
    let service = Arc::new(yunqi_serve::definition::parse(PERMIT).map_err(crate::user_error)?);
    let decider = Arc::new(
        Decider::open(
            service.clone(),
            Calendar::china(),
            log.clone(),
            Arc::new(AuditRecorder(audit.clone())),
            clock.clone(),
            Some(Arc::new(
                yunqi_serve::document::Signer::open(&dir.join("documents.ed25519"))
                    .map_err(crate::user_error)?,
            )),
            Vec::new(),
        )
        .map_err(crate::user_error)?,
    );
    let today = Calendar::china().local_date(clock.now().timestamp_micros());
    let vehicle = |plate: &str| {
        Some(BTreeMap::from([
            ("plate".to_string(), Value::Text(plate.into())),
            ("vehicle_type".to_string(), Value::Text("小型汽车".into())),
        ]))
    };
    let zone = Some(BTreeMap::from([("vehicles".to_string(), Value::Int(400))]));
    let apps = Arc::new(apps.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let results = rt.block_on(async {
        let tasks: Vec<_> = (0..callers)
            .map(|_| {
                let (apps, next, decider, service, zone) =
                    (apps.clone(), next.clone(), decider.clone(), service.clone(), zone.clone());
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((plate, date)) = apps.get(i) else {
                            return Ok::<_, yunqi_types::Error>(out);
                        };
                        let sent = Instant::now();
                        let inputs = json!({"plate": plate, "date": date, "window": "day", "reason": "送货"});
                        let inputs = check_inputs(&service, inputs.as_object().expect("object"), today)?;
                        let app = Application {
                            applicant_fields: Default::default(),
                            applicant: "bench".into(),
                            key: Some(format!("bench-{i}")),
                            inputs,
                            lookups: BTreeMap::from([
                                ("vehicle".to_string(), vehicle(plate)),
                                ("zone".to_string(), zone.clone()),
                            ]),
                            sources: BTreeMap::new(),
                            consent: None,
                        };
                        let d = decider.decide(app).await?;
                        out.push((
                            sent.elapsed().as_secs_f64() * 1e3,
                            d.decision == Verdict::Approved,
                            plate.clone(),
                            date.clone(),
                        ));
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.map_err(|e| anyhow::anyhow!("caller failed: {e}"))??);
        }
        Ok::<_, anyhow::Error>(all)
    })?;
    let secs = t.elapsed().as_secs_f64();
    decider.shutdown();
    rt.block_on(async {
        yunqi_stream::StreamLog::shutdown(log.as_ref()).await;
        audit.shutdown().await;
    });
    check_quotas(
        results
            .iter()
            .filter(|r| r.1)
            .map(|r| (r.2.as_str(), r.3.as_str())),
    )?;
    let mut lat: Vec<f64> = results.iter().map(|r| r.0).collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize];
    Ok(Run {
        per_s: results.len() as f64 / secs,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        approved: results.iter().filter(|r| r.1).count(),
    })
}

/// Checks that no plate got more than its quotas: (plate, date) of every approval.
fn check_quotas<'a>(approved: impl Iterator<Item = (&'a str, &'a str)>) -> anyhow::Result<()> {
    let mut month: HashMap<(&str, &str), u32> = HashMap::new();
    let mut year: HashMap<(&str, &str), u32> = HashMap::new();
    for (plate, date) in approved {
        *month.entry((plate, &date[..7])).or_default() += 1;
        *year.entry((plate, &date[..4])).or_default() += 1;
    }
    anyhow::ensure!(
        month.values().all(|n| *n <= 3) && year.values().all(|n| *n <= 12),
        "a quota was over-spent"
    );
    Ok(())
}

/// The same applications over HTTP to a server of this binary, set up as the demo city would
/// be: the vehicle registry granted by transport (plates unmasked), the city's holiday
/// calendar, the zone-load view and the violations stream, the permit applied by the traffic
/// steward. Each request is a citizen's `POST …/applications`: authenticated, inputs checked,
/// two lookups run in SQL as the service under the grant (audited), decided, durable.
fn over_http(
    dir: &std::path::Path,
    apps: &[(String, String)],
    plates: usize,
    clients: usize,
) -> anyhow::Result<Run> {
    use crate::bench_stream::{post, start_server};
    use std::sync::Mutex;
    let (mut child, url, admin) = start_server(&dir.join("server"))?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(120)))
        .max_idle_connections_per_host(clients.max(1))
        .build()
        .into();
    let j = "application/json";
    let setup = || -> anyhow::Result<String> {
        for d in ["traffic", "transport", "city"] {
            post(
                &agent,
                &format!("{url}/api/v1/departments"),
                &admin,
                j,
                &json!({"name": d}).to_string(),
            )?;
        }
        let token = |name: &str, role: &str, dept: Option<&str>| -> anyhow::Result<String> {
            let body = json!({"name": name, "role": role, "department": dept}).to_string();
            let v = post(
                &agent,
                &format!("{url}/api/v1/principals"),
                &admin,
                j,
                &body,
            )?;
            Ok(v["token"]["token"].as_str().unwrap_or_default().to_string())
        };
        let ts = token("tsteward", "steward", Some("traffic"))?;
        let xs = token("xsteward", "steward", Some("transport"))?;
        let cs = token("csteward", "steward", Some("city"))?;
        let citizen = {
            let body =
                json!({"name": "c_bench", "role": "citizen", "id_number": "11010519491231002X"})
                    .to_string();
            let v = post(
                &agent,
                &format!("{url}/api/v1/principals"),
                &admin,
                j,
                &body,
            )?;
            v["token"]["token"].as_str().unwrap_or_default().to_string()
        };
        let dataset = |steward: &str, d: &str, n: &str, csv: String| -> anyhow::Result<()> {
            post(
                &agent,
                &format!("{url}/api/v1/datasets"),
                steward,
                j,
                &json!({"department": d, "name": n}).to_string(),
            )?;
            post(
                &agent,
                &format!("{url}/api/v1/datasets/{d}/{n}/import"),
                steward,
                "text/csv",
                &csv,
            )?;
            Ok(())
        };
        let mut vehicles = String::from("plate,vehicle_type,owner_id\n");
        for p in 0..plates.max(1) {
            vehicles.push_str(&format!("沪B{p:05},小型汽车,11010519491231002X\n"));
        }
        dataset(&xs, "transport", "vehicles", vehicles)?;
        dataset(
            &cs,
            "city",
            "holidays",
            "day,kind\n2027-01-01,holiday\n".into(),
        )?;
        let until = (chrono::Utc::now() + chrono::Duration::days(90))
            .date_naive()
            .to_string();
        for (owner, req) in [
            (
                &xs,
                json!({"dataset": "transport.vehicles", "columns": ["plate", "vehicle_type", "owner_id"],
                "purpose": "非浙A急事通", "until": until, "unmasked": ["plate"],
                "unmasked_reason": "the plate an applicant gives is matched exactly"}),
            ),
            (
                &cs,
                json!({"dataset": "city.holidays", "columns": ["day", "kind"],
                "purpose": "非浙A急事通", "until": until}),
            ),
        ] {
            let g = post(
                &agent,
                &format!("{url}/api/v1/grants"),
                &ts,
                j,
                &req.to_string(),
            )?;
            let id = g["id"].as_str().unwrap_or_default();
            post(
                &agent,
                &format!("{url}/api/v1/grants/{id}/approve"),
                owner,
                j,
                "",
            )?;
        }
        for q in [
            "CREATE STREAM traffic.violations (plate TEXT, kind TEXT, ts TIMESTAMP) WITH (event_time = 'ts', watermark = '1 second')",
            "CREATE STREAM traffic.zone_detections (plate TEXT, ts TIMESTAMP) WITH (event_time = 'ts', watermark = '1 second')",
            "CREATE CONTINUOUS VIEW traffic.zone_load_1m AS SELECT window_start, window_end, count(*) AS vehicles FROM TUMBLE(traffic.zone_detections, ts, INTERVAL '1' MINUTE) GROUP BY window_start, window_end",
        ] {
            post(
                &agent,
                &format!("{url}/api/v1/sql"),
                &ts,
                j,
                &json!({ "sql": q }).to_string(),
            )?;
        }
        post(
            &agent,
            &format!("{url}/api/v1/services"),
            &ts,
            "application/toml",
            PERMIT,
        )?;
        Ok(citizen)
    };
    let citizen = match setup() {
        Ok(c) => c,
        Err(e) => {
            let _ = child.kill();
            return Err(e);
        }
    };
    let target = format!("{url}/api/v1/services/traffic/urgent-entry-permit/applications");
    let next = Arc::new(AtomicUsize::new(0));
    let results: Arc<Mutex<Vec<(f64, bool, usize)>>> = Arc::default();
    let apps = Arc::new(apps.to_vec());
    let t = Instant::now();
    let handles: Vec<_> = (0..clients.max(1))
        .map(|_| {
            let (next, results, apps, agent, target) =
                (next.clone(), results.clone(), apps.clone(), agent.clone(), target.clone());
            let auth = format!("Bearer {citizen}");
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut mine = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((plate, date)) = apps.get(i) else { break };
                    let body = json!({"inputs": {"plate": plate, "date": date, "window": "day", "reason": "送货"}});
                    let sent = Instant::now();
                    let mut r = agent
                        .post(&target)
                        .header("Authorization", &auth)
                        .header("Content-Type", "application/json")
                        .header("Idempotency-Key", format!("bench-{i}"))
                        .send(body.to_string())?;
                    let status = r.status().as_u16();
                    let text = r.body_mut().read_to_string().unwrap_or_default();
                    anyhow::ensure!(status == 200, "{status} {text}");
                    let v: serde_json::Value = serde_json::from_str(&text)?;
                    mine.push((sent.elapsed().as_secs_f64() * 1e3, v["decision"] == "approved", i));
                }
                results.lock().expect("results").extend(mine);
                Ok(())
            })
        })
        .collect();
    let mut failed = None;
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed = Some(e),
            Err(_) => failed = Some(anyhow::anyhow!("a client panicked")),
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    if let Some(e) = failed {
        return Err(e);
    }
    let results = results.lock().expect("results").clone();
    check_quotas(
        results
            .iter()
            .filter(|r| r.1)
            .map(|r| (apps[r.2].0.as_str(), apps[r.2].1.as_str())),
    )?;
    let mut lat: Vec<f64> = results.iter().map(|r| r.0).collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize];
    Ok(Run {
        per_s: results.len() as f64 / secs,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        approved: results.iter().filter(|r| r.1).count(),
    })
}

/// The same decision as one PostgreSQL transaction: both counters spent by conditional
/// upserts (the row lock serialises a plate; `used < limit` is checked on the locked row, so
/// READ COMMITTED cannot over-spend), the monthly refusal undoing the yearly spend, the permit
/// inserted, the commit durable. Driven by pgbench, `clients` connections.
const PG_SETUP: &str = "
DROP SCHEMA IF EXISTS {schema} CASCADE;
CREATE SCHEMA {schema};
CREATE TABLE {schema}.quota_usage (quota text, key text, bucket int, used int NOT NULL,
    PRIMARY KEY (quota, key, bucket));
CREATE TABLE {schema}.permits (id bigserial PRIMARY KEY, plate text NOT NULL, day date NOT NULL,
    time_window text NOT NULL, reason text NOT NULL, decided_at timestamptz NOT NULL DEFAULT now());
CREATE FUNCTION {schema}.decide(p text, d date) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE used_now int;
BEGIN
  INSERT INTO {schema}.quota_usage VALUES ('yearly', p, extract(year FROM d)::int, 1)
    ON CONFLICT (quota, key, bucket) DO UPDATE SET used = quota_usage.used + 1
    WHERE quota_usage.used < 12 RETURNING used INTO used_now;
  IF used_now IS NULL THEN RETURN false; END IF;
  BEGIN
    INSERT INTO {schema}.quota_usage VALUES ('monthly', p,
        (extract(year FROM d) * 12 + extract(month FROM d) - 1)::int, 1)
      ON CONFLICT (quota, key, bucket) DO UPDATE SET used = quota_usage.used + 1
      WHERE quota_usage.used < 3 RETURNING used INTO used_now;
    IF used_now IS NULL THEN RAISE EXCEPTION 'monthly quota used'; END IF;
  EXCEPTION WHEN raise_exception THEN
    -- undo the yearly spend of this refused application
    UPDATE {schema}.quota_usage SET used = used - 1
      WHERE quota = 'yearly' AND key = p AND bucket = extract(year FROM d)::int;
    RETURN false;
  END;
  INSERT INTO {schema}.permits (plate, day, time_window, reason) VALUES (p, d, 'day', '送货');
  RETURN true;
END $$;
";

fn pg_args(conn: &str) -> Vec<String> {
    // "host=… port=… user=… dbname=…" → psql/pgbench options.
    let mut out = Vec::new();
    for part in conn.split_whitespace() {
        if let Some((k, v)) = part.split_once('=') {
            let flag = match k {
                "host" => "-h",
                "port" => "-p",
                "user" => "-U",
                "dbname" => "-d",
                _ => continue,
            };
            out.push(flag.to_string());
            out.push(v.to_string());
        }
    }
    out
}

fn postgres(
    conn: &str,
    dir: &std::path::Path,
    plates: usize,
    transactions: usize,
    clients: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    use std::process::Command;
    let schema = format!("yunqi_bench_{}", std::process::id());
    let psql = |sql: &str| -> anyhow::Result<String> {
        let out = Command::new("psql")
            .args(pg_args(conn))
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .map_err(|e| {
                anyhow::anyhow!("cannot run psql: {e} (scripts/services.sh installs it)")
            })?;
        anyhow::ensure!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    psql(&PG_SETUP.replace("{schema}", &schema))?;
    let script = dir.join("decide.pgbench");
    std::fs::write(
        &script,
        format!(
            "\\set p random(0, {})\n\\set d random(0, 40)\nSELECT {schema}.decide('沪B' || lpad(:p::text, 5, '0'), current_date + :d);\n",
            plates.max(1) - 1
        ),
    )?;
    let per_client = transactions.div_ceil(clients.max(1));
    let out = Command::new("pgbench")
        .args(pg_args(conn))
        .args([
            "-n",
            "-r",
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-t",
            &per_client.to_string(),
            "-f",
        ])
        .arg(&script)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run pgbench: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let over = psql(&format!(
        "SELECT count(*) FROM {schema}.quota_usage WHERE (quota = 'monthly' AND used > 3) OR (quota = 'yearly' AND used > 12)"
    ));
    let _ = psql(&format!("DROP SCHEMA {schema} CASCADE"));
    anyhow::ensure!(
        out.status.success(),
        "pgbench failed: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(over? == "0", "PostgreSQL over-spent a quota");
    let number = |key: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.trim_start().starts_with(key))
            .and_then(|l| l.split('=').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let tps =
        number("tps").ok_or_else(|| anyhow::anyhow!("no tps in pgbench's output:\n{text}"))?;
    let latency = number("latency average").unwrap_or(0.0);
    let stddev = number("latency stddev").unwrap_or(0.0);
    Ok((tps, latency, stddev))
}

pub fn decide(o: DecideBench, json_out: bool) -> anyhow::Result<ExitCode> {
    let (_tmp, dir) = workdir(o.dir.clone())?;
    let say = progress(json_out);
    let runs = o.runs.max(1);
    let today = Calendar::china().local_date(chrono::Utc::now().timestamp_micros());
    let apps = applications(o.applications, o.plates, today);
    let mut ours = Vec::new();
    for r in 0..runs {
        say(format!(
            "in process, run {}: {} applications from {} plates, {} callers, durable…",
            r + 1,
            apps.len(),
            o.plates,
            o.callers
        ));
        let run = in_process(&dir.join(format!("run-{r}")), &apps, o.callers)?;
        say(format!(
            "    {:.0} decisions/s; p50 {:.2} ms, p99 {:.2} ms; {} approved",
            run.per_s, run.p50_ms, run.p99_ms, run.approved
        ));
        ours.push(run);
    }
    let mut http_runs = Vec::new();
    if o.http_applications > 0 {
        let http_apps = &apps[..o.http_applications.min(apps.len())];
        for r in 0..runs {
            say(format!(
                "over HTTP, run {}: {} applications, {} clients, lookups in SQL, durable…",
                r + 1,
                http_apps.len(),
                o.http_clients
            ));
            let run = over_http(
                &dir.join(format!("http-{r}")),
                http_apps,
                o.plates,
                o.http_clients,
            )?;
            say(format!(
                "    {:.0} decisions/s; p50 {:.2} ms, p99 {:.2} ms; {} approved",
                run.per_s, run.p50_ms, run.p99_ms, run.approved
            ));
            http_runs.push(run);
        }
    }
    let mut pg = None;
    if o.pg_applications > 0 {
        say(format!(
            "PostgreSQL (pgbench): {} applications from {} plates, {} clients, one durable transaction each…",
            o.pg_applications, o.plates, o.pg_clients
        ));
        let (tps, avg, sd) = postgres(&o.pg, &dir, o.plates, o.pg_applications, o.pg_clients)?;
        say(format!(
            "    {tps:.0} decisions/s; latency average {avg:.2} ms (stddev {sd:.2})"
        ));
        pg = Some((tps, avg));
    }
    let rate = median(ours.iter().map(|r| r.per_s).collect());
    let p50 = median(ours.iter().map(|r| r.p50_ms).collect());
    let p99 = median(ours.iter().map(|r| r.p99_ms).collect());
    say(format!(
        "yunqi in process: {rate:.0} durable decisions/s (median of {runs}); p50 {p50:.2} ms, p99 {p99:.2} ms{}",
        pg.as_ref()
            .map(|p| format!("; PostgreSQL {:.0}/s → {:.1}×", p.0, rate / p.0))
            .unwrap_or_default()
    ));
    let http = (!http_runs.is_empty()).then(|| {
        let h = (
            median(http_runs.iter().map(|r| r.per_s).collect()),
            median(http_runs.iter().map(|r| r.p50_ms).collect()),
            median(http_runs.iter().map(|r| r.p99_ms).collect()),
        );
        say(format!(
            "yunqi over HTTP: {:.0} durable decisions/s (median of {runs}); p50 {:.2} ms, p99 {:.2} ms",
            h.0, h.1, h.2
        ));
        h
    });
    if json_out {
        println!(
            "{}",
            json!({"benchmark": "decide", "applications": apps.len(), "plates": o.plates,
                   "callers": o.callers, "runs": runs,
                   "in_process": {"decisions_per_s": rate, "p50_ms": p50, "p99_ms": p99},
                   "http": http.map(|h| json!({"applications": o.http_applications.min(apps.len()),
                       "clients": o.http_clients, "decisions_per_s": h.0, "p50_ms": h.1, "p99_ms": h.2})),
                   "postgres": pg.map(|p| json!({"applications": o.pg_applications, "clients": o.pg_clients,
                       "decisions_per_s": p.0, "latency_avg_ms": p.1}))})
        );
    }
    Ok(ExitCode::SUCCESS)
}
