//! `yunqi bench ngsi`: NGSI-LD entity updates per second into a running server, each
//! acknowledged only once audited and durable — (a) batch upserts
//! (`POST /ngsi-ld/v1/entityOperations/upsert`), (b) one entity per request
//! (`PATCH /ngsi-ld/v1/entities/{id}/attrs`), the way a device or an IoT agent sends them —
//! with request latency, against the published Orion-LD figure — and (c) the latency of a
//! subscription's notifications at a steady update rate (`bench_notify`).

use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::bench::{median, progress, workdir};
use crate::bench_stream::post;
use crate::simulate::DISTRICTS;

/// Orion-LD's published figure: about 12,000 entity updates per second on a 38-CPU machine
/// (FIWARE load tests).
const ORION_LD_UPDATES_PER_S: f64 = 12_000.0;
const ORION_LD_CPUS: f64 = 38.0;

const STREAM: &str = "CREATE STREAM traffic.flow (id TEXT, date_observed TIMESTAMP, intensity INT, \
    average_vehicle_speed DOUBLE, district TEXT, ref_road_segment TEXT) \
    WITH (event_time = 'date_observed', watermark = '5 seconds', ngsi_type = 'TrafficFlowObserved')";

/// Options of `yunqi bench ngsi`.
#[derive(clap::Args)]
pub struct NgsiBench {
    /// Distinct entities (road segments with a flow sensor).
    #[arg(long, default_value_t = 20_000)]
    pub entities: usize,
    /// Entity updates sent as batch upserts.
    #[arg(long, default_value_t = 1_000_000)]
    pub upserts: usize,
    /// Entities per batch upsert.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// Single-entity patches.
    #[arg(long, default_value_t = 50_000)]
    pub patches: usize,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Runs of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Entity updates per second sent while a subscription notifies every one of them.
    #[arg(long, default_value_t = 10_000)]
    pub notify_rate: usize,
    /// Seconds of each notification-latency run.
    #[arg(long, default_value_t = 5.0)]
    pub notify_secs: f64,
    /// Directory to write in (default: a temporary directory).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
}

fn entity(i: usize, n: usize, round: usize) -> serde_json::Value {
    let seg = i % n;
    json!({
        "id": format!("urn:ngsi-ld:TrafficFlowObserved:seg-{seg:06}"),
        "type": "TrafficFlowObserved",
        "intensity": ((i * 7919 + round) % 120) as i64,
        "averageVehicleSpeed": ((i * 31 + round) % 900) as f64 / 10.0,
        "district": DISTRICTS[seg % DISTRICTS.len()],
        "refRoadSegment": format!("urn:ngsi-ld:RoadSegment:{seg}"),
        "dateObserved": (chrono::DateTime::parse_from_rfc3339("2026-11-26T08:00:00Z").expect("time")
            + chrono::Duration::milliseconds(i as i64 * 10)).to_utc()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    })
}

struct Run {
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Sends `requests` (method, URL, body) from `clients` threads; every answer must be 2xx.
fn drive(
    agent: &ureq::Agent,
    token: &str,
    requests: Arc<Vec<(bool, String, String)>>,
    clients: usize,
    updates: usize,
) -> anyhow::Result<Run> {
    let next = Arc::new(AtomicUsize::new(0));
    let lat: Arc<Mutex<Vec<f64>>> = Arc::default();
    let t = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let (next, lat, requests, agent) =
                (next.clone(), lat.clone(), requests.clone(), agent.clone());
            let auth = format!("Bearer {token}");
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut mine = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((patch, url, body)) = requests.get(i) else {
                        break;
                    };
                    let sent = Instant::now();
                    let req = if *patch {
                        agent.patch(url)
                    } else {
                        agent.post(url)
                    };
                    let mut r = req
                        .header("Authorization", &auth)
                        .header("Content-Type", "application/json")
                        .send(body.as_str())?;
                    let status = r.status().as_u16();
                    if status >= 300 {
                        let text = r.body_mut().read_to_string().unwrap_or_default();
                        anyhow::bail!("{url}: {status} {text}");
                    }
                    mine.push(sent.elapsed().as_secs_f64() * 1e3);
                }
                lat.lock().expect("latencies").extend(mine);
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("a client panicked"))??;
    }
    let secs = t.elapsed().as_secs_f64();
    let mut lat = lat.lock().expect("latencies").clone();
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize];
    Ok(Run {
        per_s: updates as f64 / secs,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
    })
}

pub fn ngsi(o: NgsiBench, json_out: bool) -> anyhow::Result<ExitCode> {
    let (_tmp, dir) = workdir(o.dir.clone())?;
    let say = progress(json_out);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let data = dir.join("ngsi-server");
    let (endpoint, arrivals) = crate::bench_notify::endpoint()?;
    let (mut child, url, admin) =
        crate::bench_stream::start_server_with(&data, &["--notify-allow", &endpoint])?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .max_idle_connections_per_host(o.clients.max(1))
        .build()
        .into();
    let j = "application/json";
    let (steward, agent_token) =
        crate::bench_stream::traffic_accounts(&agent, &url, &admin, "iot_agent")?;
    post(
        &agent,
        &format!("{url}/api/v1/sql"),
        &steward,
        j,
        &json!({ "sql": STREAM }).to_string(),
    )?;

    let n = o.entities.max(1);
    let batch = o.batch.max(1);
    let runs = o.runs.max(1);
    let upsert_url = format!("{url}/ngsi-ld/v1/entityOperations/upsert");
    let mut batch_runs = Vec::new();
    for r in 0..runs {
        let requests: Vec<(bool, String, String)> = (0..o.upserts)
            .collect::<Vec<_>>()
            .chunks(batch)
            .map(|c| {
                let body: Vec<_> = c.iter().map(|i| entity(*i, n, r)).collect();
                (
                    false,
                    upsert_url.clone(),
                    serde_json::Value::Array(body).to_string(),
                )
            })
            .collect();
        say(format!(
            "(a) run {}: {} entity updates in batch upserts of {batch} over {n} entities, {} clients…",
            r + 1,
            o.upserts,
            o.clients
        ));
        let run = drive(
            &agent,
            &agent_token,
            Arc::new(requests),
            o.clients,
            o.upserts,
        )?;
        say(format!(
            "    {:.0} updates/s; request p50 {:.1} ms, p99 {:.1} ms",
            run.per_s, run.p50_ms, run.p99_ms
        ));
        batch_runs.push(run);
    }
    let mut patch_runs = Vec::new();
    for r in 0..runs {
        let requests: Vec<(bool, String, String)> = (0..o.patches)
            .map(|i| {
                let e = entity(i, n, r + 7);
                let id = e["id"].as_str().unwrap_or_default().to_string();
                let body = json!({
                    "intensity": {"type": "Property", "value": e["intensity"]},
                    "averageVehicleSpeed": {"type": "Property", "value": e["averageVehicleSpeed"],
                                            "observedAt": e["dateObserved"]},
                });
                (
                    true,
                    format!("{url}/ngsi-ld/v1/entities/{id}/attrs"),
                    body.to_string(),
                )
            })
            .collect();
        say(format!(
            "(b) run {}: {} single-entity patches, {} clients…",
            r + 1,
            o.patches,
            o.clients
        ));
        let run = drive(
            &agent,
            &agent_token,
            Arc::new(requests),
            o.clients,
            o.patches,
        )?;
        say(format!(
            "    {:.0} updates/s; request p50 {:.1} ms, p99 {:.1} ms",
            run.per_s, run.p50_ms, run.p99_ms
        ));
        patch_runs.push(run);
    }
    // (c) A subscription notified of every update at a steady rate.
    post(
        &agent,
        &format!("{url}/api/v1/sql"),
        &steward,
        j,
        &json!({ "sql": crate::bench_notify::PROBE_STREAM }).to_string(),
    )?;
    crate::bench_notify::subscribe(&agent, &url, &steward, &endpoint)?;
    let mut notify_runs = Vec::new();
    for r in 0..runs {
        say(format!(
            "(c) run {}: {} updates/s for {} s with a subscription notifying each…",
            r + 1,
            o.notify_rate,
            o.notify_secs
        ));
        let run = crate::bench_notify::run(
            &agent,
            &url,
            &agent_token,
            &arrivals,
            (r as i64 + 1) * 1_000_000_000,
            o.notify_rate.max(100),
            o.notify_secs,
            100,
            n,
        )?;
        say(format!(
            "    sent {:.0} updates/s; {} of {} notified in {} POSTs; latency p50 {:.1} ms, p99 {:.1} ms",
            run.sent_per_s, run.notified, run.sent, run.posts, run.p50_ms, run.p99_ms
        ));
        notify_runs.push(run);
    }
    // What the entities hold afterwards: every one is there.
    let check = agent
        .get(format!(
            "{url}/ngsi-ld/v1/entities?type=TrafficFlowObserved&limit=1&count=true"
        ))
        .header("Authorization", format!("Bearer {steward}"))
        .call()?;
    let count: usize = check
        .headers()
        .get("ngsild-results-count")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    anyhow::ensure!(
        count == n.min(o.upserts.max(o.patches)),
        "expected {n} entities, the server holds {count}"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();

    let summary = |runs: &[Run]| {
        (
            median(runs.iter().map(|r| r.per_s).collect()),
            median(runs.iter().map(|r| r.p50_ms).collect()),
            median(runs.iter().map(|r| r.p99_ms).collect()),
        )
    };
    let (b, b50, b99) = summary(&batch_runs);
    let (p, p50, p99) = summary(&patch_runs);
    let c_rate = median(notify_runs.iter().map(|r| r.sent_per_s).collect());
    let c50 = median(notify_runs.iter().map(|r| r.p50_ms).collect());
    let c99 = median(notify_runs.iter().map(|r| r.p99_ms).collect());
    let c_share = median(
        notify_runs
            .iter()
            .map(|r| r.notified as f64 / r.sent as f64)
            .collect(),
    );
    let orion_per_core = ORION_LD_UPDATES_PER_S / ORION_LD_CPUS;
    say(format!(
        "(a) batch upsert: {b:.0} updates/s (median of {runs}); p50 {b50:.1} ms, p99 {b99:.1} ms; \
         {:.1}× Orion-LD's {ORION_LD_UPDATES_PER_S:.0}/s on {ORION_LD_CPUS:.0} CPUs, {:.0}× per core",
        b / ORION_LD_UPDATES_PER_S,
        b / cores / orion_per_core
    ));
    say(format!(
        "(b) single-entity patch: {p:.0} updates/s; p50 {p50:.1} ms, p99 {p99:.1} ms; \
         {:.1}× Orion-LD, {:.0}× per core",
        p / ORION_LD_UPDATES_PER_S,
        p / cores / orion_per_core
    ));
    say(format!(
        "(c) subscription: {c_rate:.0} updates/s sent; notification latency p50 {c50:.1} ms, \
         p99 {c99:.1} ms; {:.1}% of updates notified (the rest coalesced into a later state)",
        c_share * 100.0
    ));
    if json_out {
        println!(
            "{}",
            json!({"benchmark": "ngsi", "entities": n, "clients": o.clients, "runs": runs,
                   "cores": cores,
                   "batch_upsert": {"updates": o.upserts, "batch": batch, "updates_per_s": b,
                                    "p50_ms": b50, "p99_ms": b99},
                   "patch": {"updates": o.patches, "updates_per_s": p, "p50_ms": p50, "p99_ms": p99},
                   "subscription": {"target_updates_per_s": o.notify_rate, "updates_per_s": c_rate,
                                    "latency_p50_ms": c50, "latency_p99_ms": c99,
                                    "notified_share": c_share},
                   "orion_ld_updates_per_s": ORION_LD_UPDATES_PER_S, "orion_ld_cpus": ORION_LD_CPUS})
        );
    }
    Ok(ExitCode::SUCCESS)
}
