//! SQL golden tests: every `tests/golden/*.slt` file is run against a small city and its
//! results compared with the file. The format is sqllogictest's, reduced to what governed SQL
//! needs:
//!
//! ```text
//! # a comment
//! as pa                      -- run what follows as principal `pa`
//!
//! query                      -- a query, then `----`, then the expected rows (cells joined
//! SELECT …                   -- by `|`, NULL as NULL), ended by a blank line
//! ----
//! 浙A***00|西湖区
//!
//! error not_found            -- a query that must fail with this yunqi error code
//! SELECT …
//! ```
//!
//! `UPDATE_GOLDEN=1 cargo test -p yunqi-sql --test golden` rewrites the expected rows from the
//! actual ones (review the diff before committing).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::util::display::array_value_to_string;
use yunqi_audit::AuditChain;
use yunqi_governance::{Actor, CallContext, Governance, GrantRequest, PrincipalSpec};
use yunqi_sql::SqlEngine;
use yunqi_store::SqliteStore;
use yunqi_types::{Limits, Name, Role, SystemClock};

fn call() -> CallContext {
    CallContext {
        request_id: "golden".into(),
    }
}

fn n(s: &str) -> Name {
    Name::parse("name", s).unwrap()
}

/// The small city the golden files query:
/// - `transport.vehicles` (owner department transport): 8 vehicles in two districts, with
///   owners' ID numbers, names and mobiles (personal, detected at import);
/// - `police.watchlist`: two real ID numbers;
/// - grant to police: plate, owner_id, owner_name, district, year of 西湖区 rows only,
///   owner_name unmasked;
/// - principals: `ta` (transport analyst), `pa` (police analyst), `ha` (health analyst, no
///   grant), `admin`.
async fn city(dir: &Path) -> (Arc<Governance>, BTreeMap<String, Actor>, String) {
    let clock = Arc::new(SystemClock);
    let audit =
        Arc::new(AuditChain::open(&dir.join("audit"), clock.clone(), &Limits::default()).unwrap());
    let store = Arc::new(SqliteStore::open(&dir.join("meta.db")).unwrap());
    let datasets = yunqi_datasets::DatasetStore::open(&dir.join("datasets"), 1 << 20).unwrap();
    let gov = Arc::new(Governance::open(store, datasets, audit, clock).unwrap());
    let token = gov.bootstrap().await.unwrap().unwrap();
    let admin = gov.authenticate(&token.token).map_err(|(e, _)| e).unwrap();
    let mut actors = BTreeMap::new();
    for d in ["transport", "police", "health"] {
        gov.create_department(&admin, n(d), d.into(), &call())
            .await
            .unwrap();
    }
    for (name, role, dept) in [
        ("ts", Role::Steward, "transport"),
        ("ta", Role::Analyst, "transport"),
        ("ps", Role::Steward, "police"),
        ("pa", Role::Analyst, "police"),
        ("ha", Role::Analyst, "health"),
    ] {
        let spec = PrincipalSpec {
            name: n(name),
            role,
            department: Some(n(dept)),
            id_number: None,
            display_name: None,
            token_expires_at: None,
        };
        let (_, t) = gov.create_principal(&admin, spec, &call()).await.unwrap();
        actors.insert(
            name.to_string(),
            gov.authenticate(&t.token).map_err(|(e, _)| e).unwrap(),
        );
    }
    let ts = actors["ts"].clone();
    let ps = actors["ps"].clone();
    for (dept, name, by, csv) in [
        (
            "transport",
            "vehicles",
            &ts,
            "plate,owner_id,owner_name,mobile,district,year\n\
             浙A10000,330106197001011003,张三,13800000000,西湖区,2016\n\
             浙A10001,330106197101011019,李四,13800000001,上城区,2015\n\
             浙A10002,330106197201011024,王五,13800000002,西湖区,2017\n\
             沪B10003,33010619730101103X,赵六,13800000003,上城区,2018\n\
             浙A10004,330106197401011045,钱七,13800000004,西湖区,2019\n\
             苏E10005,330106197501011050,孙八,13800000005,上城区,2020\n\
             浙A10006,330106197601011066,周九,13800000006,西湖区,2021\n\
             浙A10007,330106197701011071,吴十,13800000007,上城区,2022\n",
        ),
        (
            "police",
            "watchlist",
            &ps,
            "id_number,note\n330106197001011003,a\n330106197101011019,b\n",
        ),
    ] {
        let spec = yunqi_datasets::DatasetSpec {
            on_node: false,
            department: n(dept),
            name: n(name),
            description: String::new(),
            columns: vec![],
            subject: None,
            tags: vec![],
        };
        gov.create_dataset(by, spec, &call()).await.unwrap();
        gov.import_dataset(
            by,
            dept,
            name,
            csv.as_bytes().to_vec(),
            Default::default(),
            &call(),
        )
        .await
        .unwrap();
    }
    // transport.fines: version 1, then a column added, then version 2 appended.
    let spec = yunqi_datasets::DatasetSpec {
        on_node: false,
        department: n("transport"),
        name: n("fines"),
        description: String::new(),
        columns: vec![],
        subject: None,
        tags: vec![],
    };
    gov.create_dataset(&ts, spec, &call()).await.unwrap();
    let csv = "plate,amount\n浙A10000,200\n沪B10003,50\n";
    gov.import_dataset(
        &ts,
        "transport",
        "fines",
        csv.as_bytes().to_vec(),
        Default::default(),
        &call(),
    )
    .await
    .unwrap();
    let paid = yunqi_datasets::Column {
        name: "paid".into(),
        label: None,
        column_type: yunqi_datasets::ColumnType::Bool,
        class: yunqi_types::ColumnClass::Internal,
        class_declared: true,
        detected: None,
    };
    gov.add_column(&ts, "transport", "fines", paid, &call())
        .await
        .unwrap();
    let csv = "plate,amount,paid\n浙A10004,100,true\n";
    gov.import_dataset(
        &ts,
        "transport",
        "fines",
        csv.as_bytes().to_vec(),
        Default::default(),
        &call(),
    )
    .await
    .unwrap();
    let pa = actors["pa"].clone();
    let grant = gov
        .request_grant(
            &pa,
            GrantRequest {
                dataset: "transport.vehicles".into(),
                columns: ["plate", "owner_id", "owner_name", "district", "year"]
                    .map(String::from)
                    .to_vec(),
                rows: Some("district = '西湖区'".into()),
                purpose: "golden tests".into(),
                until: chrono::Utc::now() + chrono::Duration::days(30),
                unmasked: vec!["owner_name".into()],
                unmasked_reason: Some("to address letters".into()),
            },
            &call(),
        )
        .await
        .unwrap();
    gov.approve_grant(&ts, &grant.id, &call()).await.unwrap();
    actors.insert("admin".into(), admin);
    (gov, actors, grant.id)
}

enum Block {
    Comment(String),
    As(String),
    Query { sql: String, expected: Vec<String> },
    Error { code: String, sql: String },
}

fn parse(text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('#') {
            blocks.push(Block::Comment(line.to_string()));
            continue;
        }
        if let Some(who) = line.strip_prefix("as ") {
            blocks.push(Block::As(who.trim().to_string()));
        } else if line == "query" {
            let mut sql = Vec::new();
            for l in lines.by_ref() {
                if l.trim_end() == "----" {
                    break;
                }
                sql.push(l);
            }
            let mut expected = Vec::new();
            while let Some(l) = lines.peek() {
                if l.trim_end().is_empty() {
                    break;
                }
                expected.push(l.trim_end().to_string());
                lines.next();
            }
            blocks.push(Block::Query {
                sql: sql.join("\n"),
                expected,
            });
        } else if let Some(code) = line.strip_prefix("error ") {
            let mut sql = Vec::new();
            while let Some(l) = lines.peek() {
                if l.trim_end().is_empty() {
                    break;
                }
                sql.push(*l);
                lines.next();
            }
            blocks.push(Block::Error {
                code: code.trim().to_string(),
                sql: sql.join("\n"),
            });
        } else {
            panic!("unknown line in golden file: {line}");
        }
    }
    blocks
}

fn render(blocks: &[Block], actual: &[Option<Vec<String>>]) -> String {
    let mut out = String::new();
    for (b, a) in blocks.iter().zip(actual) {
        match b {
            Block::Comment(c) => out.push_str(&format!("{c}\n")),
            Block::As(who) => out.push_str(&format!("as {who}\n\n")),
            Block::Query { sql, .. } => {
                out.push_str(&format!("query\n{sql}\n----\n"));
                for row in a.as_ref().unwrap() {
                    out.push_str(row);
                    out.push('\n');
                }
                out.push('\n');
            }
            Block::Error { code, sql } => out.push_str(&format!("error {code}\n{sql}\n\n")),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_files() {
    let dir = tempfile::tempdir().unwrap();
    let (gov, actors, grant_id) = city(dir.path()).await;
    let grant_id = grant_id.as_str();
    let engine = SqlEngine::new(gov, Limits::default());
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut files: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let mut failures = Vec::new();
    let mut checked = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let blocks = parse(&text);
        let mut actor = actors["ta"].clone();
        let mut actual = Vec::new();
        for b in &blocks {
            match b {
                Block::Comment(_) => actual.push(None),
                Block::As(who) => {
                    actor = actors
                        .get(who)
                        .unwrap_or_else(|| panic!("no principal {who}"))
                        .clone();
                    actual.push(None);
                }
                Block::Query { sql, expected } => {
                    checked += 1;
                    let rows = match engine.query(&actor, sql, &call()).await {
                        Ok(r) => r
                            .batches
                            .iter()
                            .flat_map(|b| {
                                (0..b.num_rows()).map(move |i| {
                                    b.columns()
                                        .iter()
                                        .map(|c| {
                                            if c.is_null(i) {
                                                "NULL".to_string()
                                            } else {
                                                array_value_to_string(c, i).unwrap()
                                            }
                                        })
                                        .collect::<Vec<_>>()
                                        .join("|")
                                        // Grant ids are random; EXPLAIN names the grant.
                                        .replace(grant_id, "g_GRANT")
                                })
                            })
                            .flat_map(|row| row.lines().map(str::to_string).collect::<Vec<_>>())
                            .collect::<Vec<_>>(),
                        Err(e) => vec![format!("ERROR {}: {}", e.code, e.message)],
                    };
                    if &rows != expected && !update {
                        failures.push(format!(
                            "{}: {sql}\nexpected:\n{}\nactual:\n{}",
                            file.display(),
                            expected.join("\n"),
                            rows.join("\n")
                        ));
                    }
                    actual.push(Some(rows));
                }
                Block::Error { code, sql } => {
                    checked += 1;
                    match engine.query(&actor, sql, &call()).await {
                        Ok(_) => failures.push(format!(
                            "{}: {sql}\nexpected error {code}, it ran",
                            file.display()
                        )),
                        Err(e) if e.code.to_string() != *code => failures.push(format!(
                            "{}: {sql}\nexpected error {code}, got {}: {}",
                            file.display(),
                            e.code,
                            e.message
                        )),
                        Err(_) => {}
                    }
                    actual.push(None);
                }
            }
        }
        if update {
            std::fs::write(&file, render(&blocks, &actual)).unwrap();
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} golden checks failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// Every EXPLAIN variant, for a grantee, an owner and the platform admin, searched for the
/// data directory, file names and what the grant hides; then a damaged dataset file, whose
/// error must not name its path either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_and_errors_show_no_server_internals() {
    let dir = tempfile::tempdir().unwrap();
    let (gov, actors, _) = city(dir.path()).await;
    let engine = SqlEngine::new(gov, Limits::default());
    let data_dir = dir.path().to_string_lossy().to_string();
    // Object-store locations drop the leading slash.
    let data_dir_relative = data_dir.trim_start_matches('/').to_string();
    let queries = [
        ("pa", "SELECT * FROM transport.vehicles"),
        (
            "pa",
            "SELECT district, count(*) FROM transport.vehicles GROUP BY district",
        ),
        (
            "pa",
            "SELECT v.plate, w.note FROM transport.vehicles v JOIN police.watchlist w ON v.owner_id = w.id_number WHERE v.year > 2000",
        ),
        (
            "ta",
            "SELECT * FROM transport.vehicles WHERE district = '西湖区'",
        ),
        (
            "ta",
            "SELECT plate, amount FROM transport.fines__v1 UNION ALL SELECT plate, amount FROM transport.fines",
        ),
        ("ta", "SELECT * FROM transport.vehicles__rejects"),
        ("admin", "SELECT * FROM system.principals"),
    ];
    let mut checked = 0;
    for (who, q) in queries {
        for variant in [
            "EXPLAIN",
            "EXPLAIN VERBOSE",
            "EXPLAIN ANALYZE",
            "EXPLAIN ANALYZE VERBOSE",
        ] {
            let sql = format!("{variant} {q}");
            let r = engine
                .query(&actors[who], &sql, &call())
                .await
                .unwrap_or_else(|e| panic!("{who}: {sql}: {e:?}"));
            let text = r
                .batches
                .iter()
                .flat_map(|b| {
                    (0..b.num_rows()).map(move |i| {
                        (0..b.num_columns())
                            .map(|c| array_value_to_string(b.column(c), i).unwrap())
                            .collect::<Vec<_>>()
                            .join("|")
                    })
                })
                .collect::<Vec<_>>()
                .join("\n");
            let mut forbidden = vec![
                data_dir.as_str(),
                data_dir_relative.as_str(),
                ".parquet",
                "datasets/",
                "file_groups",
                "statistics",
                "pruning_predicate",
            ];
            if who == "pa" {
                // The grant's row filter, masks, hidden ID numbers and the rows it hides.
                forbidden.extend([
                    "西湖区",
                    "mask_",
                    "330106197001011003",
                    "FilterExec: district",
                ]);
            }
            for f in forbidden {
                assert!(!text.contains(f), "{who}: {sql} shows {f:?}:\n{text}");
            }
            let expected = if variant.contains("ANALYZE") {
                "plan_with_metrics|"
            } else {
                "physical_plan|"
            };
            assert!(
                text.contains(expected),
                "{who}: {sql}: no {expected}:\n{text}"
            );
            // Operators that count rows say so (an in-memory table's scan alone has no metrics).
            if variant.contains("ANALYZE") && !text.contains("plan_with_metrics|MemoryScan") {
                assert!(
                    text.contains("output_rows="),
                    "{who}: {sql}: no metrics:\n{text}"
                );
            }
            if who != "admin" && !q.contains("rejects") {
                assert!(
                    text.contains("Scan: dataset="),
                    "{who}: {sql}: no named scan:\n{text}"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 28);

    // A damaged file of transport.fines: the error names no path.
    let data = dir.path().join("datasets/transport/fines/data");
    let mut damaged = 0;
    for f in std::fs::read_dir(&data).unwrap() {
        let f = f.unwrap().path();
        if f.extension().is_some_and(|e| e == "parquet") {
            // A footer that claims no metadata: unreadable, as a torn copy would be.
            std::fs::write(&f, b"PAR1 not a parquet file\x00\x00\x00\x00PAR1").unwrap();
            damaged += 1;
        }
    }
    assert!(damaged > 0);
    for sql in [
        "SELECT * FROM transport.fines",
        "EXPLAIN ANALYZE SELECT * FROM transport.fines",
    ] {
        let e = engine.query(&actors["ta"], sql, &call()).await.unwrap_err();
        let shown = format!("{} {:?} {:?}", e.message, e.detail, e.hint);
        for f in [
            data_dir.as_str(),
            data_dir_relative.as_str(),
            ".parquet",
            "datasets/",
        ] {
            assert!(!shown.contains(f), "{sql}: the error shows {f:?}: {shown}");
        }
        assert!(shown.contains("dataset"), "{sql}: {shown}");
    }
}
