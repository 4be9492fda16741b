//! Prometheus metrics, kept in the application state (no global recorder) and rendered in the
//! text exposition format at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use yunqi_audit::AuditStats;

/// Upper bounds of the latency histogram buckets, in seconds.
const BUCKETS_SECONDS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS_SECONDS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    errors: BTreeMap<&'static str, u64>,
}

/// The HTTP metrics.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    /// Records one finished request.
    pub fn record(
        &self,
        method: &str,
        route: &str,
        status: u16,
        seconds: f64,
        error_code: Option<&'static str>,
    ) {
        let mut inner = self.inner.lock().expect("metrics lock");
        *inner
            .requests
            .entry((method.to_string(), route.to_string(), status))
            .or_default() += 1;
        let h = inner.latency.entry(route.to_string()).or_default();
        for (i, bound) in BUCKETS_SECONDS.iter().enumerate() {
            if seconds <= *bound {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
        if let Some(code) = error_code {
            *inner.errors.entry(code).or_default() += 1;
        }
    }

    /// Renders everything, with the audit chain's counters.
    pub fn render(&self, audit: &AuditStats, audit_seq: u64) -> String {
        let inner = self.inner.lock().expect("metrics lock");
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP yunqi_build_info yunqi version.\n# TYPE yunqi_build_info gauge"
        );
        let _ = writeln!(
            out,
            "yunqi_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        let _ = writeln!(
            out,
            "# HELP yunqi_http_requests_total HTTP requests by method, route and status.\n# TYPE yunqi_http_requests_total counter"
        );
        for ((method, route, status), n) in &inner.requests {
            let _ = writeln!(
                out,
                "yunqi_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP yunqi_http_request_duration_seconds HTTP request latency by route.\n# TYPE yunqi_http_request_duration_seconds histogram"
        );
        for (route, h) in &inner.latency {
            for (i, bound) in BUCKETS_SECONDS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "yunqi_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "yunqi_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "yunqi_http_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "yunqi_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
                h.count
            );
        }
        let _ = writeln!(
            out,
            "# HELP yunqi_http_errors_total HTTP error responses by error code.\n# TYPE yunqi_http_errors_total counter"
        );
        for (code, n) in &inner.errors {
            let _ = writeln!(out, "yunqi_http_errors_total{{code=\"{code}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP yunqi_audit_records_appended_total Audit records made durable since start.\n# TYPE yunqi_audit_records_appended_total counter"
        );
        let _ = writeln!(
            out,
            "yunqi_audit_records_appended_total {}",
            audit.records_appended.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP yunqi_audit_group_commits_total Audit group commits (fdatasync) since start.\n# TYPE yunqi_audit_group_commits_total counter"
        );
        let _ = writeln!(
            out,
            "yunqi_audit_group_commits_total {}",
            audit.group_commits.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP yunqi_audit_sync_seconds_total Time spent in audit fdatasync.\n# TYPE yunqi_audit_sync_seconds_total counter"
        );
        let _ = writeln!(
            out,
            "yunqi_audit_sync_seconds_total {}",
            audit.sync_micros_total.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "# HELP yunqi_audit_last_seq Sequence number of the last durable audit record.\n# TYPE yunqi_audit_last_seq gauge"
        );
        let _ = writeln!(out, "yunqi_audit_last_seq {audit_seq}");
        for (name, kind, help, v) in [
            (
                "yunqi_audit_witness_checkpoints_total",
                "counter",
                "Signed checkpoints of the audit chain made for the witnesses.",
                &audit.witness_checkpoints,
            ),
            (
                "yunqi_audit_witness_last_seq",
                "gauge",
                "Record of the last checkpoint made for the witnesses.",
                &audit.witness_last_seq,
            ),
            (
                "yunqi_audit_witness_failures_total",
                "counter",
                "Checkpoint writes to a witness that failed or were dropped.",
                &audit.witness_failures,
            ),
            (
                "yunqi_audit_witness_tsa_failures_total",
                "counter",
                "Checkpoints the time-stamp authority did not stamp.",
                &audit.witness_tsa_failures,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
        out
    }
}
