//! `yunqi bench import` and `yunqi bench sql`: the Share pillar against the peer a city would
//! pick for the same job (DuckDB), on the same generated data, in the same run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};
use yunqi_datasets::{DatasetSpec, DatasetStore, ImportOptions};
use yunqi_governance::{Actor, CallContext, Governance, GrantRequest, PrincipalSpec};
use yunqi_types::{Limits, Name, Role, SystemClock};

use crate::bench::{median, progress, workdir};
use crate::simulate::{DISTRICTS, Rng};

const REGIONS: [&str; 10] = [
    "330102", "330105", "330106", "330108", "330109", "330110", "330113", "330114", "330111",
    "330112",
];
const FAMILY: [&str; 12] = [
    "王", "李", "张", "刘", "陈", "杨", "黄", "赵", "吴", "周", "徐", "孙",
];
const GIVEN: [&str; 12] = [
    "伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳",
];
const PROVINCES: [&str; 6] = ["浙A", "浙A", "浙A", "沪B", "苏E", "皖A"];
const PLATE_CHARS: &[u8] = b"0123456789ABCDEFGHJKLMNPQRSTUVWXYZ";

fn id_number(rng: &mut Rng, district: usize) -> String {
    const W: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    let first17 = format!(
        "{}{:04}{:02}{:02}{:03}",
        REGIONS[district],
        1950 + rng.below(55),
        1 + rng.below(12),
        1 + rng.below(28),
        rng.below(1000)
    );
    let sum: u32 = first17
        .bytes()
        .zip(W)
        .map(|(b, w)| u32::from(b - b'0') * w)
        .sum();
    format!("{first17}{}", b"10X98765432"[(sum % 11) as usize] as char)
}

/// `rows` vehicle registrations as CSV: plate, owner_id, owner_name, mobile, district, year,
/// seats, amount.
pub fn vehicles_csv(rows: usize) -> Vec<u8> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut out = Vec::with_capacity(rows * 110);
    out.extend_from_slice(b"plate,owner_id,owner_name,mobile,district,year,seats,amount\n");
    for _ in 0..rows {
        let d = rng.below(10) as usize;
        let mut plate = String::from(PROVINCES[rng.below(6) as usize]);
        for _ in 0..5 {
            plate.push(PLATE_CHARS[rng.below(PLATE_CHARS.len() as u64) as usize] as char);
        }
        let _ = writeln!(
            out,
            "{plate},{},{}{},1{}{:09},{},{},{},{}.{:02}",
            id_number(&mut rng, d),
            FAMILY[rng.below(12) as usize],
            GIVEN[rng.below(12) as usize],
            3 + rng.below(7),
            rng.below(1_000_000_000),
            DISTRICTS[d],
            2005 + rng.below(21),
            2 + rng.below(8),
            rng.below(100_000),
            rng.below(100)
        );
    }
    out
}

/// Runs `script` with the given Python (which must have `duckdb`), `args` as JSON on stdin;
/// returns its JSON output, or why it could not.
fn duckdb(python: Option<&Path>, script: &str, args: Value) -> Result<Value, String> {
    let python = python.ok_or(
        "not run: pass --python with the duckdb package (benches/share_vs_duckdb.sh does)",
    )?;
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(args.to_string().as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "DuckDB script failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("DuckDB script output: {e}"))
}

const DUCKDB_IMPORT: &str = r#"
import duckdb, json, sys, time, statistics
a = json.load(sys.stdin)
out = {"version": duckdb.__version__}
for threads in a["threads"]:
    times = []
    for r in range(a["runs"]):
        con = duckdb.connect()
        con.execute(f"SET threads = {threads}")
        t = time.perf_counter()
        con.execute(f"COPY (SELECT * FROM read_csv('{a['csv']}', header = true)) TO '{a['out']}' (FORMAT parquet, COMPRESSION snappy)")
        times.append(time.perf_counter() - t)
        con.close()
    out[f"seconds_{threads}_threads"] = statistics.median(times)
print(json.dumps(out))
"#;

const DUCKDB_SQL: &str = r#"
import duckdb, json, sys, time, statistics
a = json.load(sys.stdin)
con = duckdb.connect()
con.execute(f"SET threads = {a['threads']}")
files = ", ".join(f"'{f}'" for f in a["files"])
con.execute(f"CREATE VIEW vehicles AS SELECT * FROM read_parquet([{files}])")
out = {"version": duckdb.__version__, "ms": []}
for q in a["queries"]:
    q = q.replace("transport.vehicles", "vehicles")
    con.execute(q).fetchall()
    times = []
    for r in range(a["runs"]):
        t = time.perf_counter()
        con.execute(q).fetchall()
        times.append((time.perf_counter() - t) * 1000)
    out["ms"].append(statistics.median(times))
print(json.dumps(out))
"#;

/// `yunqi bench import`.
pub fn import(
    rows: usize,
    runs: usize,
    python: Option<PathBuf>,
    dir: Option<PathBuf>,
    json_out: bool,
) -> anyhow::Result<ExitCode> {
    let (_tmp, base) = workdir(dir)?;
    let runs = runs.max(1);
    let say = progress(json_out);
    let csv = vehicles_csv(rows);
    let csv_path = base.join("vehicles.csv");
    std::fs::write(&csv_path, &csv)?;
    let mb = csv.len() as f64 / 1e6;
    say(format!("{rows} rows, {mb:.1} MB of CSV"));
    let store =
        DatasetStore::open(&base.join("datasets"), csv.len() + 1).map_err(crate::user_error)?;
    let mut secs = Vec::new();
    for r in 0..runs {
        let name = format!("vehicles{r}");
        store
            .create(
                DatasetSpec {
                    on_node: false,
                    department: Name::parse("department", "transport")
                        .map_err(crate::user_error)?,
                    name: Name::parse("dataset", &name).map_err(crate::user_error)?,
                    description: String::new(),
                    columns: vec![],
                    subject: None,
                    tags: vec![],
                },
                chrono::Utc::now(),
            )
            .map_err(crate::user_error)?;
        let t = Instant::now();
        let report = store
            .import_csv(
                "transport",
                &name,
                &csv,
                ImportOptions::default(),
                "bench",
                chrono::Utc::now(),
            )
            .map_err(crate::user_error)?;
        let s = t.elapsed().as_secs_f64();
        anyhow::ensure!(
            report.rows_imported as usize == rows,
            "import lost rows: {report:?}"
        );
        say(format!(
            "run {}: yunqi import {s:.2} s = {:.0} MB/s ({} columns classified: {})",
            r + 1,
            mb / s,
            report.columns.len(),
            report
                .columns
                .iter()
                .map(|c| format!("{} {}", c.name, c.class))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        secs.push(s);
    }
    let yunqi_s = median(secs);
    let yunqi_mbps = mb / yunqi_s;
    let duck = duckdb(
        python.as_deref(),
        DUCKDB_IMPORT,
        json!({"csv": csv_path, "out": base.join("duck.parquet"), "runs": runs, "threads": [1, 2]}),
    );
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut result = json!({
        "benchmark": "import",
        "rows": rows,
        "csv_mb": mb,
        "runs": runs,
        "yunqi_seconds": yunqi_s,
        "yunqi_mb_per_s": yunqi_mbps,
        "yunqi_threads": threads.min(8),
        "machine_threads": threads,
    });
    match &duck {
        Ok(d) => {
            let d1 = d["seconds_1_threads"].as_f64().unwrap_or(f64::NAN);
            let d2 = d["seconds_2_threads"].as_f64().unwrap_or(f64::NAN);
            result["duckdb_version"] = d["version"].clone();
            result["duckdb_mb_per_s_1_thread"] = json!(mb / d1);
            result["duckdb_mb_per_s_2_threads"] = json!(mb / d2);
            result["ratio_vs_duckdb_1_thread"] = json!(yunqi_mbps / (mb / d1));
            result["ratio_vs_duckdb_2_threads"] = json!(yunqi_mbps / (mb / d2));
        }
        Err(e) => result["duckdb"] = json!(e),
    }
    if json_out {
        println!("{result}");
    } else {
        println!(
            "yunqi CSV import (validate, type, classify, Parquet): {yunqi_mbps:.0} MB/s on {} threads, median of {runs} ({rows} rows, {mb:.0} MB)",
            threads.min(8)
        );
        match duck {
            Ok(_) => println!(
                "DuckDB {} CSV → Parquet: {:.0} MB/s on 1 thread, {:.0} MB/s on 2 threads; yunqi = {:.2}× / {:.2}×",
                result["duckdb_version"].as_str().unwrap_or("?"),
                result["duckdb_mb_per_s_1_thread"].as_f64().unwrap_or(0.0),
                result["duckdb_mb_per_s_2_threads"].as_f64().unwrap_or(0.0),
                result["ratio_vs_duckdb_1_thread"].as_f64().unwrap_or(0.0),
                result["ratio_vs_duckdb_2_threads"].as_f64().unwrap_or(0.0),
            ),
            Err(e) => println!("DuckDB: {e}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The queries of `bench sql`: group-bys, a filter, a top-k, a distinct count over a masked
/// column, a LIKE.
pub const QUERIES: [&str; 5] = [
    "SELECT district, count(*) AS n FROM transport.vehicles GROUP BY district",
    "SELECT year, avg(amount) AS a FROM transport.vehicles WHERE seats >= 5 GROUP BY year ORDER BY year",
    "SELECT plate, amount FROM transport.vehicles ORDER BY amount DESC LIMIT 10",
    "SELECT count(DISTINCT owner_id) AS n FROM transport.vehicles",
    "SELECT district, max(year) AS y, min(seats) AS s, sum(amount) AS t FROM transport.vehicles WHERE plate LIKE '浙A%' GROUP BY district",
];

fn call() -> CallContext {
    CallContext {
        request_id: "bench".into(),
    }
}

/// `yunqi bench sql`.
pub fn sql(
    rows: usize,
    runs: usize,
    python: Option<PathBuf>,
    dir: Option<PathBuf>,
    json_out: bool,
) -> anyhow::Result<ExitCode> {
    let (_tmp, base) = workdir(dir)?;
    let runs = runs.max(1);
    let say = progress(json_out);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let csv = vehicles_csv(rows);
    let (gov, files, analyst) = runtime.block_on(setup(&base, csv))?;
    let engine = yunqi_sql::SqlEngine::new(gov.clone(), Limits::default());
    say(format!("{rows} rows in {} Parquet file(s)", files.len()));

    // Ungoverned: plain DataFusion over the same files.
    let plain = datafusion::prelude::SessionContext::new();
    let mut governed_ms = Vec::new();
    let mut plain_ms = Vec::new();
    runtime.block_on(async {
        use datafusion::datasource::file_format::parquet::ParquetFormat;
        use datafusion::datasource::listing::{
            ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
        };
        let urls = files
            .iter()
            .map(ListingTableUrl::parse)
            .collect::<Result<Vec<_>, _>>()?;
        let m = gov
            .catalog_entry(&analyst_owner(&gov)?, "transport", "vehicles")
            .map_err(crate::user_error)?;
        let config = ListingTableConfig::new_with_multi_paths(urls)
            .with_listing_options(ListingOptions::new(Arc::new(ParquetFormat::default())))
            .with_schema(m.arrow_schema());
        plain.register_table("vehicles", Arc::new(ListingTable::try_new(config)?))?;
        for q in QUERIES {
            let pq = q.replace("transport.vehicles", "vehicles");
            plain.sql(&pq).await?.collect().await?;
            engine
                .query(&analyst, q, &call())
                .await
                .map_err(crate::user_error)?;
            let (mut p, mut g) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                let t = Instant::now();
                plain.sql(&pq).await?.collect().await?;
                p.push(t.elapsed().as_secs_f64() * 1000.0);
                let t = Instant::now();
                engine
                    .query(&analyst, q, &call())
                    .await
                    .map_err(crate::user_error)?;
                g.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            let (p, g) = (median(p), median(g));
            say(format!(
                "{q}\n  ungoverned {p:.1} ms, governed {g:.1} ms ({:+.1}%)",
                (g / p - 1.0) * 100.0
            ));
            plain_ms.push(p);
            governed_ms.push(g);
        }
        anyhow::Ok(())
    })?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let duck = duckdb(
        python.as_deref(),
        DUCKDB_SQL,
        json!({"files": files, "queries": QUERIES, "runs": runs, "threads": threads}),
    );
    let geo = |v: &[f64]| (v.iter().map(|x| x.ln()).sum::<f64>() / v.len() as f64).exp();
    let overheads: Vec<f64> = governed_ms
        .iter()
        .zip(&plain_ms)
        .map(|(g, p)| g / p)
        .collect();
    let mut result = json!({
        "benchmark": "sql",
        "rows": rows,
        "runs": runs,
        "threads": threads,
        "queries": QUERIES,
        "ungoverned_ms": plain_ms,
        "governed_ms": governed_ms,
        "governed_over_ungoverned_geomean": geo(&overheads),
    });
    if let Ok(d) = &duck {
        let dms: Vec<f64> = d["ms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_f64)
            .collect();
        let ratios: Vec<f64> = governed_ms.iter().zip(&dms).map(|(g, d)| g / d).collect();
        let plain_ratios: Vec<f64> = plain_ms.iter().zip(&dms).map(|(p, d)| p / d).collect();
        result["duckdb_version"] = d["version"].clone();
        result["duckdb_ms"] = json!(dms);
        result["governed_over_duckdb_geomean"] = json!(geo(&ratios));
        result["ungoverned_over_duckdb_geomean"] = json!(geo(&plain_ratios));
    }
    if json_out {
        println!("{result}");
    } else {
        println!(
            "governed / ungoverned query time, geometric mean of {} queries: {:.3} (median of {runs} runs each, {rows} rows)",
            QUERIES.len(),
            geo(&overheads)
        );
        match &duck {
            Ok(_) => println!(
                "yunqi governed / DuckDB {}: {:.2} geometric mean (ungoverned DataFusion / DuckDB: {:.2})",
                result["duckdb_version"].as_str().unwrap_or("?"),
                result["governed_over_duckdb_geomean"]
                    .as_f64()
                    .unwrap_or(0.0),
                result["ungoverned_over_duckdb_geomean"]
                    .as_f64()
                    .unwrap_or(0.0)
            ),
            Err(e) => println!("DuckDB: {e}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn analyst_owner(gov: &Governance) -> anyhow::Result<Actor> {
    // Any principal may read the catalog; the bench's owner steward is `ts`.
    let p = gov
        .principal_named("ts")
        .ok_or_else(|| anyhow::anyhow!("bench principal missing"))?;
    Ok(Actor {
        principal: p,
        token_id: String::new(),
    })
}

/// A city with transport.vehicles imported and a grant of every column to the police; returns
/// governance, the dataset's files and the police analyst.
async fn setup(base: &Path, csv: Vec<u8>) -> anyhow::Result<(Arc<Governance>, Vec<String>, Actor)> {
    let clock = Arc::new(SystemClock);
    let limits = Limits {
        import_bytes_max: csv.len() + 1,
        ..Limits::default()
    };
    let audit = Arc::new(
        yunqi_audit::AuditChain::open(&base.join("audit"), clock.clone(), &limits)
            .map_err(crate::user_error)?,
    );
    let store =
        Arc::new(yunqi_store::SqliteStore::open(&base.join("meta.db")).map_err(crate::user_error)?);
    let datasets = DatasetStore::open(&base.join("datasets"), limits.import_bytes_max)
        .map_err(crate::user_error)?;
    let gov = Arc::new(
        Governance::open(store, datasets, audit, clock)
            .map_err(crate::user_error)?
            .with_limits(limits),
    );
    let e = crate::user_error;
    let admin_token = gov.bootstrap().await.map_err(e)?.expect("fresh");
    let admin = gov
        .authenticate(&admin_token.token)
        .map_err(|(x, _)| e(x))?;
    let n = |s: &str| Name::parse("name", s).map_err(crate::user_error);
    for d in ["transport", "police"] {
        gov.create_department(&admin, n(d)?, d.into(), &call())
            .await
            .map_err(e)?;
    }
    let mut actors = Vec::new();
    for (name, role, dept) in [
        ("ts", Role::Steward, "transport"),
        ("pa", Role::Analyst, "police"),
    ] {
        let spec = PrincipalSpec {
            name: n(name)?,
            role,
            department: Some(n(dept)?),
            id_number: None,
            display_name: None,
            token_expires_at: None,
        };
        let (_, t) = gov
            .create_principal(&admin, spec, &call())
            .await
            .map_err(e)?;
        actors.push(gov.authenticate(&t.token).map_err(|(x, _)| e(x))?);
    }
    let (ts, pa) = (actors[0].clone(), actors[1].clone());
    gov.create_dataset(
        &ts,
        DatasetSpec {
            on_node: false,
            department: n("transport")?,
            name: n("vehicles")?,
            description: String::new(),
            columns: vec![],
            subject: None,
            tags: vec![],
        },
        &call(),
    )
    .await
    .map_err(e)?;
    gov.import_dataset(
        &ts,
        "transport",
        "vehicles",
        csv,
        ImportOptions::default(),
        &call(),
    )
    .await
    .map_err(e)?;
    let grant = gov
        .request_grant(
            &pa,
            GrantRequest {
                dataset: "transport.vehicles".into(),
                columns: vec!["*".into()],
                rows: None,
                purpose: "benchmark".into(),
                until: chrono::Utc::now() + chrono::Duration::days(1),
                unmasked: vec![],
                unmasked_reason: None,
            },
            &call(),
        )
        .await
        .map_err(e)?;
    gov.approve_grant(&ts, &grant.id, &call())
        .await
        .map_err(e)?;
    let files = gov
        .version_files(&ts, "transport", "vehicles", 1)
        .map_err(e)?
        .1;
    Ok((gov, files, pa))
}
