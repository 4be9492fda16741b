//! `yunqi bench ngsi`, part (c): NGSI-LD subscription notification latency — entity updates
//! sent as batch upserts at a steady rate, one subscription matching all of them, an HTTP
//! endpoint in this process receiving the notifications; latency is from the moment the
//! upsert carrying an update is sent to the moment the notification carrying it arrives
//! (ingest, audit, durable log, match, render, audit of the notification, POST).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The probe stream: one entity per slot, `seq` numbering each update.
pub(crate) const PROBE_STREAM: &str = "CREATE STREAM traffic.probe (id TEXT, \
    date_observed TIMESTAMP, seq BIGINT) WITH (event_time = 'date_observed', \
    ngsi_type = 'LatencyProbe')";

/// What one run measured.
pub(crate) struct NotifyRun {
    /// Updates sent per second, as achieved.
    pub sent_per_s: f64,
    /// Updates whose notification arrived (the rest were coalesced into a later state).
    pub notified: usize,
    /// Updates sent.
    pub sent: usize,
    /// Latency percentiles, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Notifications (POSTs) received.
    pub posts: usize,
}

type Arrivals = Arc<Mutex<(HashMap<i64, Instant>, usize)>>;

fn serve_conn(stream: TcpStream, got: Arrivals) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut r = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let at = Instant::now();
        if let Ok(v) = serde_json::from_slice::<Value>(&body) {
            let mut g = got.lock().expect("arrivals");
            g.1 += 1;
            for e in v["data"].as_array().into_iter().flatten() {
                if let Some(seq) = e["seq"].as_i64() {
                    g.0.entry(seq).or_insert(at);
                }
            }
        }
        if out.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").is_err() {
            return;
        }
    }
}

/// Starts the endpoint; returns its URL prefix and what it receives.
pub(crate) fn endpoint() -> anyhow::Result<(String, Arrivals)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}/", l.local_addr()?);
    let got: Arrivals = Arc::default();
    let g = got.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let g = g.clone();
            std::thread::spawn(move || serve_conn(s, g));
        }
    });
    Ok((url, got))
}

/// Subscribes to every probe update, keyValues, to the endpoint.
pub(crate) fn subscribe(
    agent: &ureq::Agent,
    url: &str,
    token: &str,
    endpoint: &str,
) -> anyhow::Result<()> {
    let body = json!({
        "type": "Subscription",
        "entities": [{"type": "LatencyProbe"}],
        "watchedAttributes": ["seq"],
        "notification": {"format": "keyValues", "attributes": ["seq"],
                         "endpoint": {"uri": format!("{endpoint}probe"), "accept": "application/json"}},
    });
    let mut r = agent
        .post(format!("{url}/ngsi-ld/v1/subscriptions"))
        .header("Authorization", format!("Bearer {token}"))
        .header("Content-Type", "application/json")
        .send(body.to_string())?;
    let status = r.status().as_u16();
    anyhow::ensure!(
        status == 201,
        "subscribe: {status} {}",
        r.body_mut().read_to_string().unwrap_or_default()
    );
    Ok(())
}

/// Sends `rate` updates a second for `secs` seconds, in batches of `batch` from `clients`
/// threads on a fixed schedule, over `entities` probe entities; waits for the notifications.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    agent: &ureq::Agent,
    url: &str,
    token: &str,
    got: &Arrivals,
    first_seq: i64,
    rate: usize,
    secs: f64,
    batch: usize,
    entities: usize,
) -> anyhow::Result<NotifyRun> {
    let total = ((rate as f64 * secs) as usize).max(batch);
    let batches = total.div_ceil(batch);
    let interval = Duration::from_secs_f64(batch as f64 / rate as f64);
    let clients = 8usize;
    let sent_at: Arc<Mutex<Vec<(i64, Instant)>>> = Arc::default();
    let start = Instant::now();
    let upsert = format!("{url}/ngsi-ld/v1/entityOperations/upsert?options=update");
    let posts_before = got.lock().expect("arrivals").1;
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let (agent, upsert, token, sent_at) = (
                agent.clone(),
                upsert.clone(),
                token.to_string(),
                sent_at.clone(),
            );
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut mine = Vec::new();
                let mut b = c;
                while b < batches {
                    let due = start + interval * b as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let from = b * batch;
                    let to = (from + batch).min(total);
                    let body: Vec<Value> = (from..to)
                        .map(|i| {
                            json!({"id": format!("urn:ngsi-ld:LatencyProbe:p{:06}", i % entities),
                                   "type": "LatencyProbe", "seq": first_seq + i as i64,
                                   "dateObserved": "2026-11-26T08:00:00Z"})
                        })
                        .collect();
                    let t = Instant::now();
                    let mut r = agent
                        .post(&upsert)
                        .header("Authorization", format!("Bearer {token}"))
                        .header("Content-Type", "application/json")
                        .send(Value::Array(body).to_string())?;
                    let status = r.status().as_u16();
                    anyhow::ensure!(
                        status < 300,
                        "upsert: {status} {}",
                        r.body_mut().read_to_string().unwrap_or_default()
                    );
                    mine.extend((from..to).map(|i| (first_seq + i as i64, t)));
                    b += clients;
                }
                sent_at.lock().expect("sent").extend(mine);
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("a sender panicked"))??;
    }
    let sent_secs = start.elapsed().as_secs_f64();
    // The last updates' notifications: wait until nothing new arrives for a second.
    let mut last = (0usize, Instant::now());
    loop {
        let n = got.lock().expect("arrivals").0.len();
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(1) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent = sent_at.lock().expect("sent").clone();
    let g = got.lock().expect("arrivals");
    let mut lat: Vec<f64> = sent
        .iter()
        .filter_map(|(seq, t)| {
            g.0.get(seq)
                .map(|a| a.duration_since(*t).as_secs_f64() * 1e3)
        })
        .collect();
    anyhow::ensure!(!lat.is_empty(), "no notification arrived");
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize];
    Ok(NotifyRun {
        sent_per_s: sent.len() as f64 / sent_secs,
        notified: lat.len(),
        sent: sent.len(),
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        posts: g.1 - posts_before,
    })
}
