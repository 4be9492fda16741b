//! `yunqi bench decide`: durable decisions per second for the urgent entry permit — inputs
//! checked, four rules, a yearly and a monthly quota per plate, each decision audited and
//! logged durably before it is answered — with many callers contending for the same plates;
//! and, side by side on the same applications, the same quota transaction on PostgreSQL
//! (conditional upserts of the two counters and an insert of the permit, one transaction per
//! application, durable commits).

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
    /// PostgreSQL connection string.
    #[arg(
        long,
        default_value = "host=127.0.0.1 port=5432 user=postgres dbname=test"
    )]
    pub pg: String,
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
    let zone = Some(BTreeMap::from([
        ("vehicles".to_string(), Value::Int(40)),
        ("capacity".to_string(), Value::Int(100)),
    ]));
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
                            applicant: "bench".into(),
                            key: Some(format!("bench-{i}")),
                            inputs,
                            lookups: BTreeMap::from([
                                ("vehicle".to_string(), vehicle(plate)),
                                ("zone".to_string(), zone.clone()),
                            ]),
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
    // No plate over its quotas.
    let mut month: HashMap<(String, String), u32> = HashMap::new();
    let mut year: HashMap<(String, String), u32> = HashMap::new();
    for (_, ok, plate, date) in &results {
        if *ok {
            *month
                .entry((plate.clone(), date[..7].to_string()))
                .or_default() += 1;
            *year
                .entry((plate.clone(), date[..4].to_string()))
                .or_default() += 1;
        }
    }
    anyhow::ensure!(
        month.values().all(|n| *n <= 3) && year.values().all(|n| *n <= 12),
        "a quota was over-spent"
    );
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

fn postgres(conn: &str, apps: &[(String, String)], clients: usize) -> anyhow::Result<Run> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let schema = format!("yunqi_bench_{}", std::process::id());
    rt.block_on(async {
        let connect = || async {
            let (c, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            Ok::<_, tokio_postgres::Error>(c)
        };
        let admin = connect().await.map_err(|e| {
            anyhow::anyhow!("cannot reach PostgreSQL at \"{conn}\": {e} (pass --pg, or --pg-applications 0 to skip)")
        })?;
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema};
                 CREATE TABLE {schema}.quota_usage (quota text, key text, bucket int, used int NOT NULL,
                     PRIMARY KEY (quota, key, bucket));
                 CREATE TABLE {schema}.permits (id bigserial PRIMARY KEY, plate text NOT NULL,
                     day date NOT NULL, time_window text NOT NULL, reason text NOT NULL,
                     decided_at timestamptz NOT NULL DEFAULT now());"
            ))
            .await?;
        let apps = Arc::new(apps.to_vec());
        let next = Arc::new(AtomicUsize::new(0));
        let t = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let mut c = connect().await?;
            let (apps, next, schema) = (apps.clone(), next.clone(), schema.clone());
            tasks.push(tokio::spawn(async move {
                let spend = c
                    .prepare(&format!(
                        "INSERT INTO {schema}.quota_usage VALUES ($1, $2, $3, 1)
                         ON CONFLICT (quota, key, bucket) DO UPDATE SET used = quota_usage.used + 1
                         WHERE quota_usage.used < $4 RETURNING used"
                    ))
                    .await?;
                let permit = c
                    .prepare(&format!(
                        "INSERT INTO {schema}.permits (plate, day, time_window, reason) VALUES ($1, $2::text::date, 'day', '送货')"
                    ))
                    .await?;
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((plate, date)) = apps.get(i) else {
                        return Ok::<_, tokio_postgres::Error>(out);
                    };
                    let sent = Instant::now();
                    let year: i32 = date[..4].parse().unwrap_or(0);
                    let month: i32 = year * 12 + date[5..7].parse::<i32>().unwrap_or(1) - 1;
                    let tx = c.transaction().await?;
                    let ok = !tx.query(&spend, &[&"yearly", plate, &year, &12i32]).await?.is_empty()
                        && !tx.query(&spend, &[&"monthly", plate, &month, &3i32]).await?.is_empty();
                    if ok {
                        tx.execute(&permit, &[plate, date]).await?;
                        tx.commit().await?;
                    } else {
                        tx.rollback().await?;
                    }
                    out.push((sent.elapsed().as_secs_f64() * 1e3, ok));
                }
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.map_err(|e| anyhow::anyhow!("client failed: {e}"))??);
        }
        let secs = t.elapsed().as_secs_f64();
        let over: i64 = admin
            .query_one(
                &format!(
                    "SELECT count(*) FROM {schema}.quota_usage
                     WHERE (quota = 'monthly' AND used > 3) OR (quota = 'yearly' AND used > 12)"
                ),
                &[],
            )
            .await?
            .get(0);
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await?;
        anyhow::ensure!(over == 0, "PostgreSQL over-spent {over} quotas");
        let mut lat: Vec<f64> = all.iter().map(|r| r.0).collect();
        lat.sort_by(|a, b| a.total_cmp(b));
        let pct = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize];
        Ok(Run {
            per_s: all.len() as f64 / secs,
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            approved: all.iter().filter(|r| r.1).count(),
        })
    })
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
    let mut pg = None;
    if o.pg_applications > 0 {
        let pg_apps = &apps[..o.pg_applications.min(apps.len())];
        say(format!(
            "PostgreSQL: {} applications, {} clients, one transaction each…",
            pg_apps.len(),
            o.pg_clients
        ));
        let run = postgres(&o.pg, pg_apps, o.pg_clients)?;
        say(format!(
            "    {:.0} decisions/s; p50 {:.2} ms, p99 {:.2} ms; {} approved",
            run.per_s, run.p50_ms, run.p99_ms, run.approved
        ));
        pg = Some(run);
    }
    let rate = median(ours.iter().map(|r| r.per_s).collect());
    let p50 = median(ours.iter().map(|r| r.p50_ms).collect());
    let p99 = median(ours.iter().map(|r| r.p99_ms).collect());
    say(format!(
        "yunqi in process: {rate:.0} durable decisions/s (median of {runs}); p50 {p50:.2} ms, p99 {p99:.2} ms{}",
        pg.as_ref()
            .map(|p| format!("; PostgreSQL {:.0}/s → {:.1}×", p.per_s, rate / p.per_s))
            .unwrap_or_default()
    ));
    if json_out {
        println!(
            "{}",
            json!({"benchmark": "decide", "applications": apps.len(), "plates": o.plates,
                   "callers": o.callers, "runs": runs,
                   "in_process": {"decisions_per_s": rate, "p50_ms": p50, "p99_ms": p99},
                   "postgres": pg.map(|p| json!({"applications": o.pg_applications, "clients": o.pg_clients,
                       "decisions_per_s": p.per_s, "p50_ms": p.p50_ms, "p99_ms": p.p99_ms}))})
        );
    }
    Ok(ExitCode::SUCCESS)
}
