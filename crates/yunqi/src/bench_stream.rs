//! `yunqi bench stream`: events per second per core into the three-level rollup of the city
//! brain — (a) in-process Arrow batches, (b) from CSV and NDJSON files (parse included),
//! (c) NDJSON over HTTP into a running server, durable — and the time from the watermark
//! passing a window's end to the window reaching a live subscriber.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{
    ArrayRef, DictionaryArray, Float64Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use datafusion::arrow::datatypes::Int32Type;
use serde_json::json;
use yunqi_sense::{Engine, ViewPlan, parse_create_stream};

use crate::bench::{median, progress, workdir};
use crate::simulate::{Detection, OutFormat, TrafficArgs, detections};

const STREAM: &str = "CREATE STREAM traffic.detections (plate TEXT, segment INT, district TEXT, speed DOUBLE, ts TIMESTAMP) WITH (event_time = 'ts', watermark = '5 seconds')";
/// The city brain's rollup: road segment → district → city, per minute.
pub const ROLLUP: &str = "CREATE CONTINUOUS VIEW traffic.flow_1m AS SELECT window_start, window_end, district, segment, count(*) AS vehicles, approx_count_distinct(plate) AS plates, avg(speed) AS speed FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE) GROUP BY window_start, window_end, ROLLUP(district, segment)";
/// The per-segment count the peers were measured on.
pub const SEGMENT_COUNT: &str = "CREATE CONTINUOUS VIEW traffic.seg_1m AS SELECT window_start, window_end, segment, count(*) AS vehicles FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE) GROUP BY window_start, window_end, segment";

const BATCH_ROWS: usize = 65_536;

/// Options of `yunqi bench stream`.
#[derive(clap::Args)]
pub struct StreamBench {
    /// Generated detections for the in-process and file runs.
    #[arg(long, default_value_t = 10_000_000)]
    pub events: u64,
    /// Runs of each in-process measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Measure this CSV or NDJSON file instead of generated ones.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Events sent over HTTP (0 to skip).
    #[arg(long, default_value_t = 2_000_000)]
    pub http_events: u64,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 4)]
    pub http_clients: usize,
    /// Events per HTTP request.
    #[arg(long, default_value_t = 50_000)]
    pub http_batch: usize,
    /// Directory to write in (default: a temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

fn plan(sql: &str) -> anyhow::Result<Arc<ViewPlan>> {
    let s = parse_create_stream(STREAM, "bench", chrono::Utc::now()).map_err(crate::user_error)?;
    Ok(Arc::new(
        ViewPlan::parse(sql, &|_| Ok(s.clone())).map_err(crate::user_error)?,
    ))
}

/// `events` detections spread over `seconds` of rush-hour event time.
fn generate(events: u64, seconds: u64) -> anyhow::Result<Vec<Detection>> {
    // The simulator makes rate / 1.8 detections per second at rush hour.
    let rate = (events * 18).div_ceil(seconds * 10).max(1);
    let args = TrafficArgs {
        rate,
        duration: seconds + 1,
        start: None,
        segments: 3_000,
        vehicles: 300_000,
        local_percent: 70,
        max_delay_ms: 2_000,
        seed: 2026,
        out: String::new(),
        format: OutFormat::Ndjson,
    };
    let start = chrono::DateTime::parse_from_rfc3339("2026-11-26T08:00:00+08:00")?.to_utc();
    let mut out = Vec::with_capacity(events as usize);
    let _ = detections(&args, start, |d| {
        if (out.len() as u64) < events {
            out.push(d.clone());
        }
        Ok(())
    })?;
    Ok(out)
}

/// Arrow batches as a producer would send them (text keys dictionary-encoded).
fn batches(ev: &[Detection]) -> Vec<RecordBatch> {
    let s = parse_create_stream(STREAM, "bench", chrono::Utc::now()).expect("stream");
    let schema = Arc::new(datafusion::arrow::datatypes::Schema::new(vec![
        datafusion::arrow::datatypes::Field::new(
            "plate",
            datafusion::arrow::datatypes::DataType::Utf8,
            true,
        ),
        datafusion::arrow::datatypes::Field::new(
            "segment",
            datafusion::arrow::datatypes::DataType::Int64,
            true,
        ),
        datafusion::arrow::datatypes::Field::new(
            "district",
            datafusion::arrow::datatypes::DataType::Dictionary(
                Box::new(datafusion::arrow::datatypes::DataType::Int32),
                Box::new(datafusion::arrow::datatypes::DataType::Utf8),
            ),
            true,
        ),
        datafusion::arrow::datatypes::Field::new(
            "speed",
            datafusion::arrow::datatypes::DataType::Float64,
            true,
        ),
        s.arrow_schema().field(4).clone(),
    ]));
    ev.chunks(BATCH_ROWS)
        .map(|c| {
            let cols: Vec<ArrayRef> = vec![
                Arc::new(
                    c.iter()
                        .map(|d| Some(d.plate.as_str()))
                        .collect::<StringArray>(),
                ),
                Arc::new(Int64Array::from_iter_values(
                    c.iter().map(|d| d.segment as i64),
                )),
                Arc::new(
                    c.iter()
                        .map(|d| Some(d.district))
                        .collect::<DictionaryArray<Int32Type>>(),
                ),
                Arc::new(Float64Array::from_iter_values(c.iter().map(|d| d.speed))),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(
                        c.iter().map(|d| d.ts.timestamp_micros()),
                    )
                    .with_timezone("UTC"),
                ),
            ];
            RecordBatch::try_new(schema.clone(), cols).expect("batch")
        })
        .collect()
}

fn run_engine(plan: &Arc<ViewPlan>, batches: &[RecordBatch]) -> anyhow::Result<(f64, usize)> {
    let t = Instant::now();
    let mut e = Engine::new(plan.clone()).map_err(crate::user_error)?;
    let mut rows = 0;
    for b in batches {
        e.process(b).map_err(crate::user_error)?;
        if let Some(c) = e.close_ready().map_err(crate::user_error)? {
            rows += c.batch.num_rows();
        }
    }
    if let Some(c) = e.close_all().map_err(crate::user_error)? {
        rows += c.batch.num_rows();
    }
    Ok((t.elapsed().as_secs_f64(), rows))
}

/// Splits a file's text at line boundaries into pieces of about `size` bytes.
fn pieces(text: &str, size: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = size.min(rest.len());
        while end < rest.len() && rest.as_bytes()[end - 1] != b'\n' {
            end += 1;
        }
        out.push(&rest[..end]);
        rest = &rest[end..];
    }
    out
}

/// Parse + engine over a file, one thread: (seconds, result rows).
fn run_file(plan: &Arc<ViewPlan>, text: &str, csv: bool) -> anyhow::Result<(f64, f64, usize)> {
    let s = parse_create_stream(STREAM, "bench", chrono::Utc::now()).map_err(crate::user_error)?;
    let t = Instant::now();
    let (header, body) = if csv {
        text.split_once('\n').unwrap_or((text, ""))
    } else {
        ("", text)
    };
    let mut e = Engine::new(plan.clone()).map_err(crate::user_error)?;
    let mut parse = Duration::ZERO;
    let mut rows = 0;
    for piece in pieces(body, 4 << 20) {
        let p = Instant::now();
        let d = if csv {
            yunqi_sense::ingest::decode_csv_with_header(&s, header, piece)
        } else {
            yunqi_sense::ingest::decode_ndjson(&s, piece.as_bytes())
        }
        .map_err(crate::user_error)?;
        parse += p.elapsed();
        anyhow::ensure!(
            d.rejected.is_empty(),
            "rejected events: {:?}",
            &d.rejected[..1]
        );
        e.process(&d.batch).map_err(crate::user_error)?;
        if let Some(c) = e.close_ready().map_err(crate::user_error)? {
            rows += c.batch.num_rows();
        }
    }
    if let Some(c) = e.close_all().map_err(crate::user_error)? {
        rows += c.batch.num_rows();
    }
    Ok((t.elapsed().as_secs_f64(), parse.as_secs_f64(), rows))
}

pub fn stream(o: StreamBench, json_out: bool) -> anyhow::Result<ExitCode> {
    let say = progress(json_out);
    let (_guard, dir) = workdir(o.dir.clone())?;
    say(format!("generating {} detections…", o.events));
    let ev = generate(o.events, 600)?;
    let n = ev.len() as f64;
    let rollup = plan(ROLLUP)?;
    let seg = plan(SEGMENT_COUNT)?;

    // (a) In-process Arrow batches.
    let arrow = batches(&ev);
    let mut result = serde_json::Map::new();
    for (name, p) in [("rollup", &rollup), ("segment_count", &seg)] {
        let mut times = Vec::new();
        let mut rows = 0;
        for _ in 0..o.runs {
            let (t, r) = run_engine(p, &arrow)?;
            times.push(t);
            rows = r;
        }
        let t = median(times);
        say(format!(
            "(a) arrow → {name}: {:.1} M events/s on one core ({rows} rows)",
            n / t / 1e6
        ));
        result.insert(
            format!("arrow_{name}"),
            json!({"events": ev.len(), "seconds": t, "events_per_s_per_core": n / t, "rows": rows}),
        );
    }
    drop(arrow);

    // (b) From files: the given one, or CSV and NDJSON written from the same events.
    let files: Vec<(String, PathBuf, bool)> = match &o.file {
        Some(f) => {
            let csv = !std::fs::read(f)?.starts_with(b"{");
            vec![(if csv { "csv" } else { "ndjson" }.into(), f.clone(), csv)]
        }
        None => {
            let csv = dir.join("detections.csv");
            let mut w = std::io::BufWriter::new(std::fs::File::create(&csv)?);
            w.write_all(b"plate,segment,district,speed,ts\n")?;
            for d in &ev {
                w.write_all(d.line(OutFormat::Csv).as_bytes())?;
            }
            w.flush()?;
            let nd = dir.join("detections.ndjson");
            let mut w = std::io::BufWriter::new(std::fs::File::create(&nd)?);
            for d in &ev {
                w.write_all(d.line(OutFormat::Ndjson).as_bytes())?;
            }
            w.flush()?;
            vec![("csv".into(), csv, true), ("ndjson".into(), nd, false)]
        }
    };
    for (kind, path, csv) in &files {
        let text = std::fs::read_to_string(path)?;
        let events = text.lines().count() - usize::from(*csv);
        for (name, p) in [("rollup", &rollup), ("segment_count", &seg)] {
            let mut times = Vec::new();
            let mut parses = Vec::new();
            let mut rows = 0;
            for _ in 0..o.runs {
                let (t, parse, r) = run_file(p, &text, *csv)?;
                times.push(t);
                parses.push(parse);
                rows = r;
            }
            let (t, parse) = (median(times), median(parses));
            say(format!(
                "(b) {kind} file → {name}: {:.1} M events/s on one core (parse {:.1} M/s, {} MB/s; {rows} rows)",
                events as f64 / t / 1e6,
                events as f64 / parse / 1e6,
                (text.len() as f64 / t / 1e6).round()
            ));
            result.insert(
                format!("{kind}_{name}"),
                json!({"file": path, "bytes": text.len(), "events": events, "seconds": t,
                       "parse_seconds": parse, "events_per_s_per_core": events as f64 / t, "rows": rows}),
            );
        }
    }

    // (c) NDJSON over HTTP into a server, durable, with live visibility.
    if o.http_events > 0 {
        // Spread over ten minutes of event time, so that windows close while events arrive.
        let http_ev = generate(o.http_events, 600)?;
        let r = http(&dir, &http_ev, &o, &say)?;
        result.insert("http".into(), r);
    }
    let out = json!({"benchmark": "stream", "events": ev.len(), "runs": o.runs, "results": result});
    if json_out {
        println!("{out}");
    }
    Ok(ExitCode::SUCCESS)
}

/// A server of this binary on a fresh data directory: (child, base URL, admin token).
pub(crate) fn start_server(
    data: &std::path::Path,
) -> anyhow::Result<(std::process::Child, String, String)> {
    start_server_with(data, &[])
}

/// [`start_server`] with more arguments to `yunqi serve`.
pub(crate) fn start_server_with(
    data: &std::path::Path,
    extra: &[&str],
) -> anyhow::Result<(std::process::Child, String, String)> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["serve", "--data"])
        .arg(data)
        .args(["--http", "127.0.0.1:0", "--pg", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut url = None;
    for line in lines.by_ref() {
        let line = line?;
        if let Some(rest) = line.trim().strip_prefix("API") {
            url = rest
                .split_whitespace()
                .next()
                .map(|u| u.trim_end_matches("/api/v1/").to_string());
        }
        if line == "ready" {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let url = url.ok_or_else(|| anyhow::anyhow!("the server did not start"))?;
    let token = std::fs::read_to_string(data.join("admin.token"))?
        .trim()
        .to_string();
    Ok((child, url, token))
}

/// Department `traffic` with its steward `tsteward` and a service account `service`; their
/// tokens.
pub(crate) fn traffic_accounts(
    agent: &ureq::Agent,
    url: &str,
    admin: &str,
    service: &str,
) -> anyhow::Result<(String, String)> {
    let j = "application/json";
    post(
        agent,
        &format!("{url}/api/v1/departments"),
        admin,
        j,
        r#"{"name":"traffic"}"#,
    )?;
    let token = |name: &str, role: &str| -> anyhow::Result<String> {
        let body = json!({"name": name, "role": role, "department": "traffic"}).to_string();
        let v = post(agent, &format!("{url}/api/v1/principals"), admin, j, &body)?;
        Ok(v["token"]["token"].as_str().unwrap_or_default().to_string())
    };
    Ok((token("tsteward", "steward")?, token(service, "service")?))
}

pub(crate) fn post(
    agent: &ureq::Agent,
    url: &str,
    token: &str,
    ct: &str,
    body: &str,
) -> anyhow::Result<serde_json::Value> {
    let mut r = agent
        .post(url)
        .header("Authorization", format!("Bearer {token}"))
        .header("Content-Type", ct)
        .send(body)?;
    let status = r.status().as_u16();
    let v: serde_json::Value = serde_json::from_str(&r.body_mut().read_to_string()?)?;
    anyhow::ensure!(status < 300, "{url}: {status} {v}");
    Ok(v)
}

fn http(
    dir: &std::path::Path,
    ev: &[Detection],
    o: &StreamBench,
    say: &impl Fn(String),
) -> anyhow::Result<serde_json::Value> {
    let data = dir.join("http-server");
    let (mut child, url, admin) = start_server(&data)?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let j = "application/json";
    let (steward, camera) = traffic_accounts(&agent, &url, &admin, "cameras")?;
    post(
        &agent,
        &format!("{url}/api/v1/sql"),
        &steward,
        j,
        &json!({"sql": STREAM}).to_string(),
    )?;
    post(
        &agent,
        &format!("{url}/api/v1/sql"),
        &steward,
        j,
        &json!({"sql": ROLLUP}).to_string(),
    )?;

    // Live subscriber: the time each message arrives and the window end it reaches.
    let seen: Arc<Mutex<Vec<(Instant, i64)>>> = Arc::default();
    {
        let seen = seen.clone();
        let live = format!("{url}/api/v1/views/traffic/flow_1m/live");
        let token = steward.clone();
        std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            let Ok(r) = agent
                .get(&live)
                .header("Authorization", format!("Bearer {token}"))
                .call()
            else {
                return;
            };
            for line in BufReader::new(r.into_body().into_reader()).lines() {
                let Ok(line) = line else { break };
                if let Some(d) = line.strip_prefix("data:")
                    && let Ok(v) = serde_json::from_str::<serde_json::Value>(d.trim())
                    && let Some(t) = v["through"].as_str()
                    && let Ok(t) = chrono::DateTime::parse_from_rfc3339(t)
                {
                    seen.lock()
                        .expect("seen")
                        .push((Instant::now(), t.timestamp_micros()));
                }
            }
        });
    }
    std::thread::sleep(Duration::from_millis(200));

    let bodies: Vec<(String, i64)> = ev
        .chunks(o.http_batch)
        .map(|c| {
            let max = c.iter().map(|d| d.ts.timestamp_micros()).max().unwrap_or(0);
            (
                c.iter()
                    .map(|d| d.line(OutFormat::Ndjson))
                    .collect::<String>(),
                max,
            )
        })
        .collect();
    let bytes: usize = bodies.iter().map(|b| b.0.len()).sum();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let acks: Arc<Mutex<Vec<(Instant, i64)>>> = Arc::default();
    let bodies = Arc::new(bodies);
    let events_url = format!("{url}/api/v1/streams/traffic/detections/events");
    say(format!(
        "(c) sending {} events over HTTP in batches of {} from {} clients…",
        ev.len(),
        o.http_batch,
        o.http_clients
    ));
    let t = Instant::now();
    let handles: Vec<_> = (0..o.http_clients)
        .map(|_| {
            let (next, acks, bodies, agent) =
                (next.clone(), acks.clone(), bodies.clone(), agent.clone());
            let (events_url, camera) = (events_url.clone(), camera.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((body, max)) = bodies.get(i) else {
                        return Ok(());
                    };
                    post(&agent, &events_url, &camera, "application/x-ndjson", body)?;
                    acks.lock().expect("acks").push((Instant::now(), *max));
                }
            })
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("a client panicked"))??;
    }
    let ingest = t.elapsed().as_secs_f64();
    // An event far ahead closes the last windows.
    let flush = Detection {
        ts: ev.last().expect("events").ts + chrono::Duration::hours(1),
        ..ev[0].clone()
    };
    post(
        &agent,
        &events_url,
        &camera,
        "application/x-ndjson",
        &flush.line(OutFormat::Ndjson),
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let last_end = {
        let size = 60_000_000i64;
        (ev.iter()
            .map(|d| d.ts.timestamp_micros())
            .max()
            .unwrap_or(0)
            / size
            + 1)
            * size
    };
    while Instant::now() < deadline {
        if seen
            .lock()
            .expect("seen")
            .iter()
            .any(|(_, e)| *e >= last_end)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let end_to_end = t.elapsed().as_secs_f64();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();

    // Visibility: from the acknowledgement that carried the watermark past a window's end to
    // the live message with that window.
    let mut acks = acks.lock().expect("acks").clone();
    acks.sort_by_key(|a| a.0);
    let delay = 5_000_000i64;
    let mut lat = Vec::new();
    let mut max_ts = i64::MIN;
    let mut closable: Vec<(Instant, i64)> = Vec::new();
    for (at, m) in &acks {
        if *m > max_ts {
            max_ts = *m;
            closable.push((*at, max_ts - delay));
        }
    }
    for (got, through) in seen.lock().expect("seen").iter() {
        if let Some((at, _)) = closable.iter().find(|(_, wm)| wm >= through)
            && got >= at
        {
            lat.push(got.duration_since(*at).as_secs_f64() * 1000.0);
        }
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 - 1.0) * q).round() as usize)
            .copied()
    };
    let rate = ev.len() as f64 / ingest;
    say(format!(
        "(c) NDJSON over HTTP, durable: {:.2} M events/s ({:.0} MB/s); window visible after its watermark: p50 {:?} ms, p99 {:?} ms ({} windows)",
        rate / 1e6,
        bytes as f64 / ingest / 1e6,
        pct(0.5).map(|v| v.round()),
        pct(0.99).map(|v| v.round()),
        lat.len()
    ));
    Ok(
        json!({"events": ev.len(), "bytes": bytes, "batch": o.http_batch, "clients": o.http_clients,
              "ingest_seconds": ingest, "events_per_s": rate, "end_to_end_seconds": end_to_end,
              "visibility_ms_p50": pct(0.5), "visibility_ms_p99": pct(0.99), "windows_measured": lat.len()}),
    )
}
