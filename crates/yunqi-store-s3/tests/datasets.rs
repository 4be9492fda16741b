//! Datasets shared by the nodes of a cluster, against real engines: manifests in PostgreSQL
//! (127.0.0.1:5432, a database per test), files in a SeaweedFS server of the test's own.
//! Two stores over the same engines stand for two nodes.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use yunqi_datasets::{Blobs, DatasetSpec, DatasetStore, ImportOptions, Mode, SharedStore};
use yunqi_store_s3::server::WeedServer;
use yunqi_store_s3::{S3Blobs, S3Config};
use yunqi_types::{ErrorCode, Name};

const ADMIN_URL: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=10";

fn admin_sql(sql: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(ADMIN_URL, tokio_postgres::NoTls)
            .await
            .expect("PostgreSQL on 127.0.0.1:5432 (scripts/services.sh starts it)");
        tokio::spawn(conn);
        client.batch_execute(sql).await.expect(sql);
    });
}

/// A database, a SeaweedFS server and a bucket of the test's own.
struct Engines {
    db: String,
    weed: WeedServer,
    dir: tempfile::TempDir,
}

impl Engines {
    fn start(tag: &str) -> Engines {
        let db = format!(
            "yunqi_test_s3_{tag}_{}_{}",
            std::process::id(),
            Utc::now().timestamp_subsec_nanos()
        );
        admin_sql(&format!("CREATE DATABASE {db}"));
        let dir = tempfile::tempdir().unwrap();
        let weed = WeedServer::start(&dir.path().join("weed"), &format!("yunqi-{tag}"));
        let e = Engines { db, weed, dir };
        yunqi_store_pg::init(&e.pg_url()).unwrap();
        let marked = yunqi_store_s3::init(&e.s3()).unwrap();
        assert!(marked.marked);
        assert!(
            !yunqi_store_s3::init(&e.s3()).unwrap().marked,
            "init is idempotent"
        );
        e
    }

    fn pg_url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:5432/{}", self.db)
    }

    fn s3(&self) -> S3Config {
        S3Config {
            url: self.weed.url("city"),
            endpoint: Some(self.weed.endpoint()),
            region: "us-east-1".into(),
        }
    }

    /// A node's dataset store.
    fn node(&self, name: &str) -> Arc<DatasetStore> {
        let pg = Arc::new(
            yunqi_store_pg::PgStore::open(&self.pg_url(), name, Duration::from_secs(3)).unwrap(),
        );
        let shared = SharedStore {
            manifests: Arc::new(yunqi_store_pg::ClusterManifests::new(pg)),
            blobs: S3Blobs::open(&self.s3()).unwrap(),
        };
        DatasetStore::open_shared(&self.dir.path().join(name), 64 << 20, shared).unwrap()
    }
}

impl Drop for Engines {
    fn drop(&mut self) {
        self.weed.kill();
        admin_sql(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db));
    }
}

fn spec(name: &str) -> DatasetSpec {
    DatasetSpec {
        department: Name::parse("department", "transport").unwrap(),
        name: Name::parse("dataset", name).unwrap(),
        description: "registered vehicles".into(),
        columns: vec![],
        subject: None,
        tags: vec![],
        on_node: false,
    }
}

fn append() -> ImportOptions {
    ImportOptions {
        mode: Mode::Append,
        ..Default::default()
    }
}

fn csv(from: usize, n: usize) -> String {
    let mut s = String::from("plate,seats\n");
    for i in from..from + n {
        s.push_str(&format!("浙A{i:05},{}\n", i % 9));
    }
    s
}

/// Imports as governance does: the cluster's lock on the dataset's writes, prepare, publish.
fn import(store: &DatasetStore, name: &str, bytes: &str) -> Result<u64, yunqi_types::Error> {
    let _lock = store.lock_writes("transport", name)?;
    let staged = store.prepare_import(
        "transport",
        name,
        bytes.as_bytes(),
        append(),
        "t",
        Utc::now(),
    )?;
    let version = staged.report.version;
    store.publish(&staged)?;
    Ok(version)
}

/// Rows of the current version, read by DataFusion through the object store.
fn rows_via_sql(store: &DatasetStore, name: &str) -> usize {
    use datafusion::prelude::*;
    // As a query does: the datasets as of now, on any node.
    store.list().unwrap();
    let m = store.get("transport", name).unwrap();
    let files = store.files(&m, None).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ctx = SessionContext::new();
        let (url, os) = store.object_store().unwrap();
        let url = datafusion::execution::object_store::ObjectStoreUrl::parse(url).unwrap();
        ctx.runtime_env().register_object_store(url.as_ref(), os);
        let mut n = 0;
        for f in files {
            assert!(f.starts_with("s3://yunqi-"), "{f}");
            let df = ctx
                .read_parquet(f, ParquetReadOptions::default())
                .await
                .unwrap();
            n += df.count().await.unwrap();
        }
        n
    })
}

#[test]
fn the_bucket_keeps_small_and_multipart_objects() {
    let e = Engines::start("blobs");
    let blobs = S3Blobs::open(&e.s3()).unwrap();
    blobs
        .put("datasets/a/b/small", bytes::Bytes::from_static(b"hello"))
        .unwrap();
    let big: Vec<u8> = (0..20 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    blobs
        .put("datasets/a/b/big", bytes::Bytes::from(big.clone()))
        .unwrap();
    assert_eq!(&blobs.get("datasets/a/b/small").unwrap()[..], b"hello");
    assert!(
        blobs.get("datasets/a/b/big").unwrap() == big,
        "a multipart object reads back whole"
    );
    let mut listed: Vec<(String, u64)> = blobs
        .list("datasets/")
        .unwrap()
        .into_iter()
        .map(|b| (b.key, b.size))
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        vec![
            ("datasets/a/b/big".to_string(), big.len() as u64),
            ("datasets/a/b/small".to_string(), 5)
        ]
    );
    blobs.delete("datasets/a/b/small").unwrap();
    blobs.delete("datasets/a/b/small").unwrap();
    assert_eq!(
        blobs.get("datasets/a/b/small").unwrap_err().code,
        ErrorCode::Internal
    );
    assert_eq!(
        blobs.url("datasets/x"),
        format!("{}/datasets/x", e.weed.url("city"))
    );
    // A prefix nobody prepared is refused, saying what to run.
    let other = S3Config {
        url: e.weed.url("elsewhere"),
        ..e.s3()
    };
    let err = S3Blobs::open(&other).err().unwrap();
    assert!(
        err.hint.as_deref().unwrap().contains("yunqi cluster init"),
        "{err:?}"
    );
}

#[test]
fn a_dataset_imported_on_one_node_is_read_on_another() {
    let e = Engines::start("share");
    let (a, b) = (e.node("node-a"), e.node("node-b"));
    a.create(spec("vehicles"), Utc::now()).unwrap();
    assert_eq!(
        b.create(spec("vehicles"), Utc::now()).unwrap_err().code,
        ErrorCode::AlreadyExists,
        "one name across the nodes"
    );
    assert_eq!(import(&a, "vehicles", &csv(0, 1000)).unwrap(), 1);
    // Without a query, B's cache catches up in the background (lookups read it).
    let began = std::time::Instant::now();
    while b.latest("transport.vehicles").and_then(|l| l.version) != Some((1, 1000)) {
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "B's cache did not catch up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = b.list().unwrap();
    let m = seen
        .iter()
        .find(|m| m.name == "vehicles")
        .expect("B lists A's dataset");
    assert_eq!(m.current().unwrap().rows, 1000);
    assert_eq!(rows_via_sql(&b, "vehicles"), 1000);
    // B appends on A's version; A sees B's.
    assert_eq!(import(&b, "vehicles", &csv(1000, 500)).unwrap(), 2);
    a.list().unwrap();
    assert_eq!(
        a.get("transport", "vehicles")
            .unwrap()
            .current()
            .unwrap()
            .rows,
        1500
    );
    assert_eq!(rows_via_sql(&a, "vehicles"), 1500);
    // A manifest change on a node that had not seen the latest version is applied to it.
    let b2 = b
        .set_tags("transport", "vehicles", vec!["registry".into()])
        .unwrap();
    assert_eq!(b2.versions.len(), 2);
    let a2 = a
        .set_subject("transport", "vehicles", Some("plate"))
        .unwrap();
    assert_eq!(a2.tags, vec!["registry".to_string()], "B's tags kept");
    assert_eq!(a2.versions.len(), 2);
    // Nothing on the nodes' own disks.
    assert!(!e.dir.path().join("node-a/transport/vehicles").exists());
}

#[test]
fn concurrent_imports_on_two_nodes_never_lose_a_version() {
    let e = Engines::start("race");
    let (a, b) = (e.node("node-a"), e.node("node-b"));
    a.create(spec("fines"), Utc::now()).unwrap();
    b.list().unwrap();
    std::thread::scope(|s| {
        for (i, store) in [a.clone(), b.clone()].into_iter().enumerate() {
            s.spawn(move || {
                for k in 0..6 {
                    import(&store, "fines", &csv((i * 100 + k) * 100, 100)).unwrap();
                }
            });
        }
    });
    a.list().unwrap();
    let m = a.get("transport", "fines").unwrap();
    let numbers: Vec<u64> = m.versions.iter().map(|v| v.version).collect();
    assert_eq!(numbers, (1..=12).collect::<Vec<_>>());
    assert_eq!(m.current().unwrap().rows, 1200);
    assert_eq!(rows_via_sql(&b, "fines"), 1200);

    // Without the lock, compare-and-set still refuses the second of two versions prepared on
    // the same one, and nothing of it becomes visible.
    let x = a
        .prepare_import(
            "transport",
            "fines",
            csv(0, 10).as_bytes(),
            append(),
            "t",
            Utc::now(),
        )
        .unwrap();
    let y = b
        .prepare_import(
            "transport",
            "fines",
            csv(0, 20).as_bytes(),
            append(),
            "t",
            Utc::now(),
        )
        .unwrap();
    a.publish(&x).unwrap();
    let err = b.publish(&y).unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict, "{err:?}");
    assert!(err.hint.is_some());
    b.discard(y);
    b.list().unwrap();
    assert_eq!(
        b.get("transport", "fines").unwrap().current().unwrap().rows,
        1210
    );
    assert_eq!(
        b.sweep(Duration::ZERO, Utc::now()).unwrap().removed,
        0,
        "the loser's files are gone"
    );
}

#[test]
fn a_crashed_import_leaves_only_garbage_the_sweeper_removes() {
    let e = Engines::start("sweep");
    let a = e.node("node-a");
    a.create(spec("permits"), Utc::now()).unwrap();
    import(&a, "permits", &csv(0, 300)).unwrap();
    // A node that dies between writing its files and committing the manifest.
    let staged = a
        .prepare_import(
            "transport",
            "permits",
            csv(300, 300_000).as_bytes(),
            append(),
            "t",
            Utc::now(),
        )
        .unwrap();
    let orphaned = staged.manifest.current().unwrap().files.len() - 1;
    assert!(orphaned >= 1);
    std::mem::forget(staged);
    let b = e.node("node-b");
    b.list().unwrap();
    assert_eq!(
        b.get("transport", "permits")
            .unwrap()
            .current()
            .unwrap()
            .rows,
        300
    );
    let young = b.sweep(Duration::from_secs(3600), Utc::now()).unwrap();
    assert_eq!(
        (young.removed, young.young),
        (0, orphaned as u64),
        "an import may still commit"
    );
    let swept = b.sweep(Duration::ZERO, Utc::now()).unwrap();
    assert_eq!(swept.removed, orphaned as u64);
    assert!(swept.bytes_removed > 0);
    assert_eq!(
        rows_via_sql(&b, "permits"),
        300,
        "the committed version is intact"
    );
    assert_eq!(b.sweep(Duration::ZERO, Utc::now()).unwrap().removed, 0);
}

#[test]
fn an_unreachable_object_store_gives_503_and_the_import_resumes_when_it_is_back() {
    let mut e = Engines::start("down");
    let a = e.node("node-a");
    a.create(spec("parking"), Utc::now()).unwrap();
    import(&a, "parking", &csv(0, 100)).unwrap();
    e.weed.kill();
    let err = import(&a, "parking", &csv(100, 100)).unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable, "{err:?}");
    assert!(err.message.contains("object store"), "{err:?}");
    assert!(err.hint.as_deref().unwrap().contains("retry"), "{err:?}");
    assert!(
        !format!("{err:?}").contains("127.0.0.1"),
        "no internals: {err:?}"
    );
    assert_eq!(
        a.get("transport", "parking").unwrap().versions.len(),
        1,
        "nothing half-written"
    );
    e.weed.restart();
    assert_eq!(import(&a, "parking", &csv(100, 100)).unwrap(), 2);
    assert_eq!(rows_via_sql(&a, "parking"), 200);
}
