//! Every SQL limit, hit: result rows, query time, query memory, SQL text size. Each gives a
//! typed error that names the limit, and the query is audited with its outcome.

use std::sync::Arc;

use yunqi_audit::{AuditChain, AuditLog, AuditQuery};
use yunqi_governance::{Actor, CallContext, Governance};
use yunqi_sql::SqlEngine;
use yunqi_store::SqliteStore;
use yunqi_types::{ErrorCode, Limits, SystemClock};

struct Fixture {
    _dir: tempfile::TempDir,
    audit: Arc<AuditChain>,
    gov: Arc<Governance>,
    admin: Actor,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(SystemClock);
    let audit = Arc::new(
        AuditChain::open(&dir.path().join("audit"), clock.clone(), &Limits::default()).unwrap(),
    );
    let store = Arc::new(SqliteStore::open(&dir.path().join("meta.db")).unwrap());
    let datasets =
        yunqi_datasets::DatasetStore::open(&dir.path().join("datasets"), 1 << 20).unwrap();
    let gov = Arc::new(Governance::open(store, datasets, audit.clone(), clock).unwrap());
    let token = gov.bootstrap().await.unwrap().unwrap();
    let admin = gov.authenticate(&token.token).map_err(|(e, _)| e).unwrap();
    Fixture {
        _dir: dir,
        audit,
        gov,
        admin,
    }
}

fn call() -> CallContext {
    CallContext {
        request_id: "test".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_rows_over_the_limit_are_cut_and_flagged() {
    let f = fixture().await;
    let engine = SqlEngine::new(
        f.gov.clone(),
        Limits {
            sql_result_rows_max: 10,
            ..Limits::default()
        },
    );
    let r = engine
        .query(
            &f.admin,
            "SELECT * FROM unnest(range(0, 1000)) AS t(x)",
            &call(),
        )
        .await
        .unwrap();
    assert_eq!(r.batches.iter().map(|b| b.num_rows()).sum::<usize>(), 10);
    assert!(r.truncated);
    let r = engine
        .query(
            &f.admin,
            "SELECT * FROM unnest(range(0, 10)) AS t(x)",
            &call(),
        )
        .await
        .unwrap();
    assert!(!r.truncated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_over_its_time_is_stopped() {
    let f = fixture().await;
    let engine = SqlEngine::new(
        f.gov.clone(),
        Limits {
            query_timeout_ms: 1,
            ..Limits::default()
        },
    );
    let sql = "SELECT count(*) FROM unnest(range(0, 3000)) a(x) CROSS JOIN unnest(range(0, 3000)) b(y) WHERE (x * y) % 7 = 3";
    let e = engine.query(&f.admin, sql, &call()).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::LimitExceeded);
    assert_eq!(e.message, "query took too long");
    assert!(e.detail.unwrap().contains("query_timeout_ms"));
    let page = f
        .audit
        .query(&AuditQuery {
            action: Some("sql.query".into()),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        page.records.last().unwrap().outcome,
        yunqi_types::Outcome::Failed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_over_its_memory_is_stopped() {
    let f = fixture().await;
    let engine = SqlEngine::new(
        f.gov.clone(),
        Limits {
            query_memory_bytes_max: 64 << 10,
            ..Limits::default()
        },
    );
    let sql = "SELECT x, count(*) FROM unnest(range(0, 500000)) AS t(x) GROUP BY x ORDER BY x DESC";
    let e = engine.query(&f.admin, sql, &call()).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::LimitExceeded, "{e:?}");
    assert!(e.hint.unwrap().contains("query_memory_bytes_max"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_text_over_the_limit_is_refused_before_parsing() {
    let f = fixture().await;
    let engine = SqlEngine::new(
        f.gov.clone(),
        Limits {
            sql_text_bytes_max: 100,
            ..Limits::default()
        },
    );
    let sql = format!("SELECT {}", vec!["1"; 100].join(" + "));
    let e = engine.query(&f.admin, &sql, &call()).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::LimitExceeded);
    assert!(e.detail.unwrap().contains("sql_text_bytes_max"));
}
