//! Durable appends to the stream log: the embedded segment log against NATS JetStream (one
//! server on this machine, every write synced before it is acknowledged, and, to show what the
//! syncs cost, JetStream's default of syncing every two minutes), on the same entries, with
//! concurrent appenders, then a sequential read of everything back. Prints one Markdown table;
//! medians of `RUNS` runs.
//!
//! cargo run --release -p yunqi-stream-nats --example log_bench -- [EVENTS_PER_ENTRY] [ENTRY_BYTES] [ENTRIES] [RUNS]
//!
//! Needs `YUNQI_NATS_SERVER` (see scripts/engines.sh).

use std::sync::Arc;
use std::time::{Duration, Instant};

use yunqi_stream::{LogConfig, SegmentLog, StreamLog};
use yunqi_stream_nats::server::NatsServer;
use yunqi_stream_nats::{NatsConfig, NatsLog, init};
use yunqi_types::SystemClock;

struct Run {
    append_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    read_s: f64,
    rounds: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn run(
    log: Arc<dyn StreamLog>,
    stream: &str,
    clients: usize,
    entries: usize,
    events: u32,
    bytes: usize,
) -> Run {
    let rounds_before = log
        .stats()
        .group_commits
        .load(std::sync::atomic::Ordering::Relaxed);
    let began = Instant::now();
    let per = entries / clients;
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let log = log.clone();
            let stream = stream.to_string();
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(per);
                for i in 0..per {
                    let mut payload = vec![(c * 31 + i) as u8; bytes];
                    payload[0] = c as u8;
                    let t = Instant::now();
                    log.append_blocking(&stream, events, payload)
                        .expect("append");
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let append_s = began.elapsed().as_secs_f64();
    lat.sort();
    let rounds = log
        .stats()
        .group_commits
        .load(std::sync::atomic::Ordering::Relaxed)
        - rounds_before;
    let began = Instant::now();
    let mut from = 0;
    let mut n = 0usize;
    loop {
        let got = log.read(stream, from, 8 << 20).expect("read");
        if got.is_empty() {
            break;
        }
        for e in got {
            if e.end() > from {
                from = e.end();
                n += 1;
            }
        }
    }
    assert_eq!(n, per * clients);
    Run {
        append_s,
        p50_ms: lat[lat.len() / 2].as_secs_f64() * 1e3,
        p99_ms: lat[lat.len() * 99 / 100].as_secs_f64() * 1e3,
        read_s: began.elapsed().as_secs_f64(),
        rounds,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let events = arg(0, 1_000) as u32;
    let bytes = arg(1, 64 * 1024);
    let entries = arg(2, 2_000);
    let runs = arg(3, 3);
    println!(
        "entries of {events} events, {bytes} bytes; {entries} entries per run; median of {runs} runs\n"
    );
    println!(
        "| log | appenders | entries/s | events/s | MB/s | append p50 ms | p99 ms | entries per round | read MB/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let dir = tempfile::tempdir().unwrap();
    let synced = NatsServer::start_with(&dir.path().join("nats-synced"), true);
    let unsynced = NatsServer::start_with(&dir.path().join("nats-unsynced"), false);
    let nats = |s: &NatsServer| -> Arc<dyn StreamLog> {
        let c = NatsConfig {
            urls: s.url(),
            prefix: "bench".into(),
            ..Default::default()
        };
        init(&c).expect("init");
        Arc::new(NatsLog::open(c, Arc::new(SystemClock)).expect("open"))
    };
    let segment: Arc<dyn StreamLog> = SegmentLog::open(
        &dir.path().join("segments"),
        LogConfig::default(),
        Arc::new(SystemClock),
    )
    .expect("segment log");
    let logs: Vec<(&str, Arc<dyn StreamLog>)> = vec![
        ("embedded segment log (fdatasync)", segment),
        ("JetStream, sync_interval: always", nats(&synced)),
        ("JetStream, default sync (2 min)", nats(&unsynced)),
    ];
    for clients in [1usize, 4, 16] {
        for (name, log) in &logs {
            let mut results = Vec::new();
            for r in 0..runs {
                let stream = format!("bench.c{clients}.r{r}");
                results.push(run(log.clone(), &stream, clients, entries, events, bytes));
            }
            let append = median(results.iter().map(|r| r.append_s).collect());
            let n = (entries / clients * clients) as f64;
            println!(
                "| {name} | {clients} | {:.0} | {:.0} | {:.1} | {:.2} | {:.2} | {:.1} | {:.0} |",
                n / append,
                n * f64::from(events) / append,
                n * bytes as f64 / append / 1e6,
                median(results.iter().map(|r| r.p50_ms).collect()),
                median(results.iter().map(|r| r.p99_ms).collect()),
                n / median(results.iter().map(|r| r.rounds as f64).collect()),
                n * bytes as f64 / median(results.iter().map(|r| r.read_s).collect()) / 1e6,
            );
        }
    }
}
