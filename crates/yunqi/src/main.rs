//! The `yunqi` binary: the server (`yunqi serve`), the offline tools (`yunqi audit verify`,
//! `yunqi bench`) and the client commands that talk to a running server over HTTP
//! (`YUNQI_URL`, `YUNQI_TOKEN`). Every command that prints a result accepts `--json`.

mod bench;
mod bench_decide;
mod bench_ngsi;
mod bench_notify;
mod bench_share;
mod bench_stream;
mod client;
mod client_service;
mod client_stream;
mod cluster;
mod config;
mod demo;
mod serve;
mod simulate;

use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc: the server allocates and frees small objects at a high rate on every thread
/// (decisions, audit records, JSON); glibc's allocator spent about 40% of a decision's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};

/// Default HTTP address: the API, the console and metrics.
pub const DEFAULT_HTTP: &str = "127.0.0.1:7700";
/// Default PostgreSQL wire protocol address (not 5432, which a real PostgreSQL may use).
pub const DEFAULT_PG: &str = "127.0.0.1:7432";
/// Default data directory.
pub const DEFAULT_DATA: &str = "./yunqi-data";

#[derive(Parser)]
#[command(name = "yunqi", version, about = "yunqi: a government cloud platform for a city, in one binary", long_about = None)]
struct Cli {
    /// Print one JSON document instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// URL of a running yunqi server (client commands).
    #[arg(
        long,
        global = true,
        env = "YUNQI_URL",
        default_value = "http://127.0.0.1:7700"
    )]
    url: String,
    /// Bearer token (client commands).
    #[arg(long, global = true, env = "YUNQI_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server on a data directory (everything embedded).
    Serve(serve::ServeArgs),
    /// The demo city, served: seeds a new data directory (departments, a million residents,
    /// vehicles, businesses, grants, the city brain's views, the three services) through the
    /// API, writes DIR/demo/credentials.json, and keeps simulated traffic flowing in.
    Demo(demo::DemoArgs),
    /// Departments (委办局): the tenants.
    #[command(subcommand, name = "dept")]
    Dept(client::DeptCommand),
    /// Principals: people, citizens and service accounts.
    #[command(subcommand)]
    Principal(client::PrincipalCommand),
    /// Bearer tokens.
    #[command(subcommand)]
    Token(client::TokenCommand),
    /// Datasets and the catalog.
    #[command(subcommand)]
    Dataset(client::DatasetCommand),
    /// Import a CSV file into a dataset as a new version.
    Import(client::ImportArgs),
    /// Grants: ask for other departments' data, decide requests for yours.
    #[command(subcommand)]
    Grant(client::GrantCommand),
    /// Run a query, or a SQL shell, over what your token may read.
    Sql(client::SqlArgs),
    /// For a citizen: who read your data, when, for what purpose.
    Accesses,
    /// The catalog: search datasets, show one with its grants.
    #[command(subcommand)]
    Catalog(client::CatalogCommand),
    /// Streams of events (the city brain): list, show, replay a file.
    #[command(subcommand)]
    Stream(client_stream::StreamCommand),
    /// Continuous views over streams: list, show progress.
    #[command(subcommand)]
    View(client_stream::ViewCommand),
    /// Citizen services: definitions, applications, the review queue, repayments.
    #[command(subcommand)]
    Service(client_service::ServiceCommand),
    /// Your consents to services that ask for one (citizens).
    #[command(subcommand)]
    Consent(client_service::ConsentCommand),
    /// Signed documents: verify one, offline with the issuer's public key.
    #[command(subcommand)]
    Document(client_service::DocumentCommand),
    /// The audit chain.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Who the token belongs to.
    Whoami,
    /// Cluster mode: prepare the shared engines, list the nodes.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Benchmarks; figures go to BENCHMARKS.md.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Simulated city data: `yunqi simulate traffic` writes vehicle detections as NDJSON.
    #[command(subcommand)]
    Simulate(SimulateCommand),
}

#[derive(Subcommand)]
enum SimulateCommand {
    /// Vehicle detections of the simulated city (deterministic for a seed), out of order
    /// within --max-delay-ms, as NDJSON or CSV.
    Traffic(simulate::TrafficArgs),
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the whole chain offline and name the first bad record (exit 1 if any).
    Verify {
        /// Data directory.
        #[arg(long, default_value = DEFAULT_DATA)]
        data: PathBuf,
        /// Hashing threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Also check the chain against the checkpoints of a witness (a file or directory the
        /// server wrote with --audit-witness, or where an HTTP witness stored them); repeatable.
        #[arg(long)]
        witness: Vec<PathBuf>,
        /// Verify a cluster's chains instead: every node's chain in NATS JetStream (--nats)
        /// against the signed cluster checkpoints in this PostgreSQL database.
        #[arg(long, env = "YUNQI_POSTGRES", requires = "nats")]
        postgres: Option<String>,
        #[command(flatten)]
        nats: cluster::NatsArgs,
    },
    /// Read records from a running server.
    List(client::AuditListArgs),
}

fn print_witnessed(w: &yunqi_audit::WitnessReport) {
    match &w.problem {
        None => println!(
            "witnessed: OK, {} checkpoints up to record {} (last at {}), {} time-stamped",
            w.checkpoints,
            w.witnessed_seq,
            w.last_time.as_deref().unwrap_or("-"),
            w.stamped
        ),
        Some(p) => {
            println!("witnessed: the chain is NOT what the witnesses saw: {p}");
            if let Some(seq) = w.first_touched {
                println!("first touched record: {seq}");
            }
        }
    }
    match w.node_key_matches {
        Some(false) => println!(
            "note: the data directory's node key did not sign every checkpoint (keys: {})",
            w.keys.join(", ")
        ),
        None if w.checkpoints > 0 => {
            println!(
                "note: no node key in the data directory; checkpoints signed by {}",
                w.keys.join(", ")
            )
        }
        _ => {}
    }
}

/// A library error for the command line: its message, then its detail and hint, so that the
/// person at the terminal learns what to do.
pub fn user_error(e: yunqi_types::Error) -> anyhow::Error {
    let mut text = e.message;
    if let Some(d) = e.detail {
        text.push_str(&format!("\ndetail: {d}"));
    }
    if let Some(h) = e.hint {
        text.push_str(&format!("\nhint: {h}"));
    }
    anyhow::anyhow!(text)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Audit(AuditCommand::Verify {
            data,
            threads,
            witness,
            postgres,
            nats,
        }) => match nats.config() {
            Some(n) => cluster::verify(postgres.as_deref(), &n, json),
            None => verify(&data, threads, &witness, json),
        },
        Command::Bench(cmd) => bench::run(cmd, json),
        Command::Cluster(cmd) => cluster::run(cmd, json),
        Command::Simulate(SimulateCommand::Traffic(args)) => simulate::traffic(args),
        other => {
            let api = client::Api::new(&cli.url, cli.token.as_deref());
            match other {
                Command::Dept(c) => client::dept(&api, c, json),
                Command::Principal(c) => client::principal(&api, c, json),
                Command::Token(c) => client::token(&api, c, json),
                Command::Dataset(c) => client::dataset(&api, c, json),
                Command::Import(a) => client::import(&api, a, json),
                Command::Grant(c) => client::grant(&api, c, json),
                Command::Sql(a) => client::sql(&api, a, json),
                Command::Accesses => client::accesses(&api, json),
                Command::Catalog(c) => client::catalog(&api, c, json),
                Command::Stream(c) => client_stream::stream(&api, c, json),
                Command::View(c) => client_stream::view(&api, c, json),
                Command::Service(c) => client_service::service(&api, c, json),
                Command::Document(c) => client_service::document(&api, c, json),
                Command::Consent(c) => client_service::consent(&api, c, json),
                Command::Audit(AuditCommand::List(a)) => client::audit_list(&api, a, json),
                Command::Whoami => client::whoami(&api, json),
                _ => unreachable!("handled above"),
            }
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"error": {"code": "client", "message": format!("{e:#}")}})
                );
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(2)
        }
    }
}

fn verify(
    data: &std::path::Path,
    threads: Option<usize>,
    witnesses: &[PathBuf],
    json: bool,
) -> anyhow::Result<ExitCode> {
    let dir = data.join("audit");
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let started = std::time::Instant::now();
    let report = yunqi_audit::verify(&dir, threads).map_err(user_error)?;
    let seconds = started.elapsed().as_secs_f64();
    let witnessed = if witnesses.is_empty() {
        None
    } else {
        let mut checkpoints = Vec::new();
        for w in witnesses {
            checkpoints.extend(yunqi_audit::witness::read_checkpoints(w).map_err(user_error)?);
        }
        Some(yunqi_audit::verify_witnessed(&dir, data, checkpoints).map_err(user_error)?)
    };
    let ok = report.ok() && witnessed.as_ref().is_none_or(|w| w.ok());
    if json {
        let mut v = serde_json::to_value(&report)?;
        v["ok"] = ok.into();
        v["seconds"] = seconds.into();
        if let Some(w) = &witnessed {
            v["witness"] = serde_json::to_value(w)?;
        }
        println!("{v}");
    } else {
        match &report.problem {
            None => println!(
                "audit chain OK: {} records in {} segments ({:.1} MB) verified in {:.3} s ({:.0} records/s); last record {} hash {}",
                report.records,
                report.segments,
                report.bytes as f64 / 1e6,
                seconds,
                report.records as f64 / seconds.max(1e-9),
                report.last_seq,
                report.last_hash
            ),
            Some(p) => {
                println!("audit chain DAMAGED: {}", p.reason);
                if let Some(seq) = p.seq {
                    println!("first bad record: {seq}");
                }
                if let (Some(seg), Some(off)) = (&p.segment, p.offset) {
                    println!("at: {} byte {off}", seg.display());
                }
                println!("records verified before it: {}", report.records);
            }
        }
        if report.torn_tail {
            println!(
                "note: the last segment ends in a torn, unacknowledged write (a crash); the next start cuts it off"
            );
        }
        if let Some(w) = &witnessed {
            print_witnessed(w);
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
