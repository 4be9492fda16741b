//! Durable audit appends: the embedded chain (segment files, one `fdatasync` per group commit)
//! against a node's chain on NATS JetStream (one server on this machine, every write synced
//! before it is acknowledged), with concurrent writers each appending one record at a time as
//! requests do. Prints one Markdown table; medians of `RUNS` runs; then a cluster verify of
//! what was written.
//!
//! cargo run --release -p yunqi-stream-nats --example audit_bench -- [RECORDS] [RUNS]
//!
//! Needs `YUNQI_NATS_SERVER` (see scripts/engines.sh).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use yunqi_audit::{AuditChain, AuditLog};
use yunqi_stream_nats::server::NatsServer;
use yunqi_stream_nats::{NatsAudit, NatsConfig, init};
use yunqi_types::{AuditEvent, Limits, SystemClock};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// (records/s, p50 ms, p99 ms, records per commit)
fn run(audit: Arc<dyn AuditLog>, writers: usize, records: usize) -> (f64, f64, f64, f64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let commits = audit
        .stats()
        .group_commits
        .load(std::sync::atomic::Ordering::Relaxed);
    let per = records / writers;
    let began = Instant::now();
    let lat: Vec<Duration> = rt.block_on(async {
        let tasks: Vec<_> = (0..writers)
            .map(|w| {
                let audit = audit.clone();
                tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(per);
                    for i in 0..per {
                        let e = AuditEvent {
                            principal: format!("analyst-{w}"),
                            department: "transport".into(),
                            action: "sql.query".into(),
                            object: "dataset:transport.vehicles".into(),
                            detail: format!("query {i}: SELECT district, count(*) FROM transport.vehicles GROUP BY district"),
                            request_id: format!("{w:04}{i:012}"),
                            ..Default::default()
                        };
                        let t = Instant::now();
                        audit.append(vec![e]).await.expect("append");
                        lat.push(t.elapsed());
                    }
                    lat
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    let secs = began.elapsed().as_secs_f64();
    let commits = audit
        .stats()
        .group_commits
        .load(std::sync::atomic::Ordering::Relaxed)
        - commits;
    let mut ms: Vec<f64> = lat.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = ms.len();
    (
        n as f64 / secs,
        ms[n / 2],
        ms[(n * 99 / 100).min(n - 1)],
        n as f64 / commits.max(1) as f64,
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let records: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let runs: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(&dir.path().join("nats"));
    let config = NatsConfig {
        urls: server.url(),
        prefix: "bench".into(),
        ..NatsConfig::default()
    };
    init(&config).expect("init");
    println!("| chain | writers | records/s | append p50 | p99 | records per commit |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut node = 0;
    for writers in [1usize, 16, 64] {
        for kind in ["embedded (fdatasync)", "JetStream, sync_interval: always"] {
            let mut rows = Vec::new();
            for r in 0..runs {
                let audit: Arc<dyn AuditLog> = if kind.starts_with("embedded") {
                    Arc::new(
                        AuditChain::open(
                            &dir.path().join(format!("chain-{writers}-{r}")),
                            Arc::new(SystemClock),
                            &Limits::default(),
                        )
                        .unwrap(),
                    )
                } else {
                    node += 1;
                    Arc::new(
                        NatsAudit::open(
                            config.clone(),
                            &format!("node-{node}"),
                            Arc::new(SystemClock),
                            &Limits::default(),
                        )
                        .unwrap(),
                    )
                };
                let n = if writers == 1 { records / 4 } else { records };
                rows.push(run(audit, writers, n));
            }
            println!(
                "| {kind} | {writers} | {:.0} | {:.2} ms | {:.2} ms | {:.1} |",
                median(rows.iter().map(|r| r.0).collect()),
                median(rows.iter().map(|r| r.1).collect()),
                median(rows.iter().map(|r| r.2).collect()),
                median(rows.iter().map(|r| r.3).collect()),
            );
        }
    }
    let began = Instant::now();
    let reports = yunqi_stream_nats::audit::verify_chains(&config, &HashMap::new()).unwrap();
    let records: u64 = reports.iter().map(|r| r.check.records).sum();
    let bytes: u64 = reports.iter().map(|r| r.bytes).sum();
    assert!(reports.iter().all(|r| r.check.problem.is_none()));
    let secs = began.elapsed().as_secs_f64();
    println!(
        "\nverify over JetStream: {} chains, {records} records, {:.1} MB in {secs:.2} s ({:.0} records/s)",
        reports.len(),
        bytes as f64 / 1e6,
        records as f64 / secs
    );
}
