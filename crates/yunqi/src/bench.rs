//! `yunqi bench`: benchmarks that compare yunqi with a baseline in the same run, and report
//! medians. Results go to BENCHMARKS.md with the command that produced them.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Subcommand;
use serde_json::json;
use sha2::Digest;
use yunqi_audit::AuditChain;
use yunqi_types::{AuditEvent, Limits, Outcome, SystemClock};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Durable audit appends per second with concurrent writers, and `audit verify` records
    /// per second, against the fsync limit and a one-record-per-fsync baseline.
    Audit {
        /// Concurrent writers.
        #[arg(long, default_value_t = 64)]
        writers: usize,
        /// Seconds per append run.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Runs of each measurement (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Records in the chain that is verified.
        #[arg(long, default_value_t = 5_000_000)]
        verify_records: u64,
        /// Directory to write in (default: a temporary directory); it should be on the disk
        /// the data directory will use.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// CSV import MB/s with validation, classification and Parquet output, against DuckDB's
    /// CSV-to-Parquet copy of the same file.
    Import {
        /// Rows of generated vehicle registrations.
        #[arg(long, default_value_t = 2_000_000)]
        rows: usize,
        /// Runs of each measurement (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// A Python with the `duckdb` package, for the side-by-side figure
        /// (`benches/share_vs_duckdb.sh` installs one).
        #[arg(long)]
        python: Option<PathBuf>,
        /// Directory to write in (default: a temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Events per second per core into the city brain's three-level rollup: in-process Arrow
    /// batches, CSV and NDJSON files, NDJSON over HTTP (durable), and how soon a closed window
    /// reaches a live subscriber.
    Stream(crate::bench_stream::StreamBench),
    /// NGSI-LD entity updates per second over HTTP, durable: batch upserts and single-entity
    /// attribute patches, against the published Orion-LD figure.
    Ngsi(crate::bench_ngsi::NgsiBench),
    /// Durable decisions per second for the urgent entry permit (rules, quotas contended,
    /// audit, decision log), against the same quota transaction on PostgreSQL.
    Decide(crate::bench_decide::DecideBench),
    /// Query time governed (a grantee through yunqi's engine: grant, masks, audit) against
    /// ungoverned (plain DataFusion on the same files), and against DuckDB on the same files.
    Sql {
        /// Rows of generated vehicle registrations.
        #[arg(long, default_value_t = 2_000_000)]
        rows: usize,
        /// Runs of each query (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// A Python with the `duckdb` package (see `bench import`).
        #[arg(long)]
        python: Option<PathBuf>,
        /// Directory to write in (default: a temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// The directory a benchmark writes in: `dir`, or a temporary one removed with the guard.
pub(crate) fn workdir(
    dir: Option<PathBuf>,
) -> anyhow::Result<(Option<tempfile::TempDir>, PathBuf)> {
    Ok(match dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            (None, d)
        }
        None => {
            let t = tempfile::Builder::new().prefix("yunqi-bench-").tempdir()?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    })
}

/// Prints a benchmark's progress on stderr, unless the result is asked for as JSON.
pub(crate) fn progress(json_out: bool) -> impl Fn(String) {
    move |s| {
        if !json_out {
            eprintln!("{s}");
        }
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn sample_event(i: u64) -> AuditEvent {
    AuditEvent {
        principal: format!("analyst{}", i % 97),
        department: "traffic_police".into(),
        action: "dataset.query".into(),
        object: format!("dataset:transport.vehicles#{}", i % 1000),
        outcome: Some(Outcome::Ok),
        purpose: "urgent entry permit decision".into(),
        detail: "columns plate,owner_id masked".into(),
        request_id: format!("{i:016x}"),
    }
}

/// Median latency of write(4 KiB) + fdatasync on `dir`: the physical limit of one commit.
fn fsync_latency(dir: &Path) -> anyhow::Result<Duration> {
    let path = dir.join("fsync-probe");
    let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
    let block = [0x5au8; 4096];
    let mut samples = Vec::new();
    for _ in 0..300 {
        f.write_all(&block)?;
        let t = Instant::now();
        f.sync_data()?;
        samples.push(t.elapsed().as_secs_f64());
    }
    std::fs::remove_file(&path)?;
    Ok(Duration::from_secs_f64(median(samples)))
}

/// Appends from `writers` concurrent tasks for `seconds`, checkpointed to a file witness
/// `witness` when given; returns (appends/s, group commits, mean fdatasync time in µs).
async fn append_run(
    dir: &Path,
    writers: usize,
    seconds: f64,
    witness: Option<&Path>,
) -> anyhow::Result<(f64, u64, f64)> {
    let chain = Arc::new(
        AuditChain::open(dir, Arc::new(SystemClock), &Limits::default())
            .map_err(crate::user_error)?,
    );
    let witnesser = match witness {
        Some(w) => Some(
            yunqi_audit::Witnesser::start(
                chain.clone(),
                yunqi_audit::witness::node_key(dir).map_err(crate::user_error)?,
                yunqi_audit::WitnessConfig {
                    targets: vec![yunqi_audit::Target::File(w.to_path_buf())],
                    every: Duration::from_secs(1),
                    records: 10_000,
                    tsa: None,
                },
            )
            .map_err(crate::user_error)?,
        ),
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let commits_before = chain.stats().group_commits.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (chain, stop, count) = (chain.clone(), stop.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = w as u64 * 1_000_000_000;
            while !stop.load(Ordering::Relaxed) {
                chain.append(sample_event(i)).await.expect("append");
                count.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(w) = witnesser {
        w.stop();
        anyhow::ensure!(
            chain.stats().witness_checkpoints.load(Ordering::Relaxed) > 0
                && chain.stats().witness_failures.load(Ordering::Relaxed) == 0,
            "the witness got no checkpoint"
        );
    }
    let commits = chain.stats().group_commits.load(Ordering::Relaxed) - commits_before;
    let sync_us =
        chain.stats().sync_micros_total.load(Ordering::Relaxed) as f64 / commits.max(1) as f64;
    chain.shutdown().await;
    Ok((
        count.load(Ordering::Relaxed) as f64 / elapsed,
        commits,
        sync_us,
    ))
}

pub fn run(cmd: BenchCommand, json_out: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Audit {
            writers,
            seconds,
            runs,
            verify_records,
            dir,
        } => audit(writers, seconds, runs, verify_records, dir, json_out),
        BenchCommand::Import {
            rows,
            runs,
            python,
            dir,
        } => crate::bench_share::import(rows, runs, python, dir, json_out),
        BenchCommand::Sql {
            rows,
            runs,
            python,
            dir,
        } => crate::bench_share::sql(rows, runs, python, dir, json_out),
        BenchCommand::Stream(o) => crate::bench_stream::stream(o, json_out),
        BenchCommand::Ngsi(o) => crate::bench_ngsi::ngsi(o, json_out),
        BenchCommand::Decide(o) => crate::bench_decide::decide(o, json_out),
    }
}

fn audit(
    writers: usize,
    seconds: f64,
    runs: usize,
    verify_records: u64,
    dir: Option<PathBuf>,
    json_out: bool,
) -> anyhow::Result<ExitCode> {
    let (_tmp, base) = workdir(dir)?;
    let runs = runs.max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let say = progress(json_out);

    let latency = fsync_latency(&base)?;
    let fsync_bound = 1.0 / latency.as_secs_f64();
    say(format!(
        "fdatasync median latency: {:.0} µs → at most {fsync_bound:.0} commits/s",
        latency.as_secs_f64() * 1e6
    ));

    let mut single = Vec::new();
    let mut many = Vec::new();
    let mut batch = Vec::new();
    let mut witnessed = Vec::new();
    for r in 0..runs {
        let d = base.join(format!("single-{r}"));
        let (rate, _, _) = runtime.block_on(append_run(&d, 1, seconds.min(2.0), None))?;
        say(format!("run {}: 1 writer: {rate:.0} appends/s", r + 1));
        single.push(rate);
        std::fs::remove_dir_all(&d)?;
        let d = base.join(format!("many-{r}"));
        let (rate, commits, sync_us) = runtime.block_on(append_run(&d, writers, seconds, None))?;
        let per_commit = rate * seconds / commits.max(1) as f64;
        say(format!(
            "run {}: {writers} writers: {rate:.0} appends/s, {per_commit:.1} records per group commit, {sync_us:.0} µs per fdatasync",
            r + 1
        ));
        many.push(rate);
        batch.push(per_commit);
        std::fs::remove_dir_all(&d)?;
        // The same with a file witness, checkpointed every 10,000 records or second.
        let d = base.join(format!("witnessed-{r}"));
        let w = base.join(format!("witness-{r}.jsonl"));
        std::fs::create_dir_all(&d)?;
        let (rate, _, _) = runtime.block_on(append_run(&d, writers, seconds, Some(&w)))?;
        let checkpoints = std::fs::read_to_string(&w)?.lines().count();
        say(format!(
            "run {}: {writers} writers, witnessed: {rate:.0} appends/s, {checkpoints} checkpoints",
            r + 1
        ));
        witnessed.push(rate);
        std::fs::remove_dir_all(&d)?;
        std::fs::remove_file(&w)?;
    }

    // Verification: build a chain of verify_records quickly (batches), then verify it.
    let vdir = base.join("verify");
    if vdir.exists() {
        std::fs::remove_dir_all(&vdir)?;
    }
    runtime.block_on(async {
        let chain = AuditChain::open(&vdir, Arc::new(SystemClock), &Limits::default())
            .map_err(crate::user_error)?;
        let mut i = 0u64;
        while i < verify_records {
            let n = (verify_records - i).min(4096);
            chain
                .append_many((i..i + n).map(sample_event).collect())
                .await
                .map_err(crate::user_error)?;
            i += n;
        }
        chain.shutdown().await;
        anyhow::Ok(())
    })?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut verify_rates = Vec::new();
    let mut hash_rates = Vec::new();
    let mut bytes = 0u64;
    for r in 0..runs {
        let t = Instant::now();
        let report = yunqi_audit::verify(&vdir.clone(), threads).map_err(crate::user_error)?;
        let secs = t.elapsed().as_secs_f64();
        anyhow::ensure!(
            report.ok() && report.records == verify_records,
            "verification failed: {report:?}"
        );
        bytes = report.bytes;
        verify_rates.push(report.records as f64 / secs);
        // Baseline: one thread doing nothing but SHA-256 over the same segment bytes.
        let t = Instant::now();
        for (_, path) in yunqi_audit::chain::list_segments(&vdir).map_err(crate::user_error)? {
            let buf = std::fs::read(&path)?;
            let mut h = sha2::Sha256::new();
            h.update(&buf);
            std::hint::black_box(h.finalize());
        }
        let hash_secs = t.elapsed().as_secs_f64();
        hash_rates.push(bytes as f64 / hash_secs);
        say(format!(
            "run {}: verify {} records in {secs:.3} s = {:.0} records/s; SHA-256 alone, 1 thread: {:.0} MB/s",
            r + 1,
            report.records,
            report.records as f64 / secs,
            bytes as f64 / hash_secs / 1e6
        ));
    }
    std::fs::remove_dir_all(&vdir)?;

    let (single, many, batch) = (median(single), median(many), median(batch));
    let witnessed = median(witnessed);
    let verify_rate = median(verify_rates);
    let hash_rate = median(hash_rates);
    let verify_bytes_rate = verify_rate * bytes as f64 / verify_records as f64;
    let result = json!({
        "benchmark": "audit",
        "writers": writers,
        "seconds_per_run": seconds,
        "runs": runs,
        "fsync_median_us": latency.as_secs_f64() * 1e6,
        "fsync_bound_commits_per_s": fsync_bound,
        "appends_per_s_1_writer": single,
        "appends_per_s": many,
        "records_per_group_commit": batch,
        "ratio_vs_1_writer": many / single,
        "ratio_vs_fsync_bound": many / fsync_bound,
        "appends_per_s_witnessed": witnessed,
        "witnessed_ratio": witnessed / many,
        "verify_records": verify_records,
        "verify_bytes": bytes,
        "verify_records_per_s": verify_rate,
        "verify_mb_per_s": verify_bytes_rate / 1e6,
        "sha256_1_thread_mb_per_s": hash_rate / 1e6,
        "verify_ratio_vs_sha256_1_thread": verify_bytes_rate / hash_rate,
        "threads": threads,
    });
    if json_out {
        println!("{result}");
    } else {
        println!(
            "audit appends, {writers} writers: {many:.0}/s median of {runs} ({:.1}× one writer at {single:.0}/s; {:.1}× the one-commit-per-fsync bound {fsync_bound:.0}/s; {batch:.1} records per group commit)",
            many / single,
            many / fsync_bound
        );
        println!(
            "audit appends, {writers} writers, with a file witness (a checkpoint per 10,000 records or second): {witnessed:.0}/s ({:.2}× unwitnessed)",
            witnessed / many
        );
        println!(
            "audit verify: {verify_rate:.0} records/s median of {runs} ({:.0} MB/s on {threads} threads; {:.2}× SHA-256 alone on one thread at {:.0} MB/s)",
            verify_bytes_rate / 1e6,
            verify_bytes_rate / hash_rate,
            hash_rate / 1e6
        );
    }
    Ok(ExitCode::SUCCESS)
}
