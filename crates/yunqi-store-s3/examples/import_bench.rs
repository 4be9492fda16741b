//! Import throughput: the embedded dataset store (a directory, fsynced) against the cluster's
//! (Parquet objects in a SeaweedFS server of its own, manifests in PostgreSQL on
//! 127.0.0.1:5432), on the same CSV, in one run; prints the median MB/s of each and the ratio.
//!
//! `cargo run --release -p yunqi-store-s3 --example import_bench -- [MB] [RUNS]`
//! (with `eval "$(bash scripts/engines.sh)"` first, for `YUNQI_WEED`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use yunqi_datasets::{DatasetSpec, DatasetStore, ImportOptions, Mode, SharedStore};
use yunqi_types::Name;

fn admin_sql(sql: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(
            "host=127.0.0.1 port=5432 user=postgres dbname=test",
            tokio_postgres::NoTls,
        )
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (scripts/services.sh starts it)");
        tokio::spawn(conn);
        client.batch_execute(sql).await.expect(sql);
    });
}

fn csv(mb: usize) -> String {
    let mut s = String::from("plate,owner_id,seats,registered,district\n");
    let mut i = 0u64;
    while s.len() < mb << 20 {
        s.push_str(&format!(
            "浙A{:05},33010{:013},{},2020-{:02}-{:02},district-{}\n",
            i % 100_000,
            i,
            2 + i % 6,
            1 + i % 12,
            1 + i % 28,
            i % 13
        ));
        i += 1;
    }
    s
}

fn run(store: &DatasetStore, name: &str, bytes: &[u8]) -> Duration {
    let spec = DatasetSpec {
        department: Name::parse("department", "transport").unwrap(),
        name: Name::parse("dataset", name).unwrap(),
        description: String::new(),
        columns: vec![],
        subject: None,
        tags: vec![],
        on_node: false,
    };
    store.create(spec, Utc::now()).unwrap();
    let began = Instant::now();
    let _lock = store.lock_writes("transport", name).unwrap();
    let options = ImportOptions {
        mode: Mode::Replace,
        ..Default::default()
    };
    let staged = store
        .prepare_import("transport", name, bytes, options, "bench", Utc::now())
        .unwrap();
    store.publish(&staged).unwrap();
    began.elapsed()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mb: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(64);
    let runs: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(5);
    let data = csv(mb);
    let dir = tempfile::tempdir().unwrap();
    let db = format!("yunqi_bench_import_{}", std::process::id());
    admin_sql(&format!("CREATE DATABASE {db}"));
    let url = format!("postgresql://postgres@127.0.0.1:5432/{db}");
    yunqi_store_pg::init(&url).unwrap();
    let weed = yunqi_store_s3::server::WeedServer::start(&dir.path().join("weed"), "yunqi-bench");
    let s3 = yunqi_store_s3::S3Config {
        url: weed.url("city"),
        endpoint: Some(weed.endpoint()),
        region: "us-east-1".into(),
    };
    yunqi_store_s3::init(&s3).unwrap();
    let embedded = DatasetStore::open(&dir.path().join("embedded"), 1 << 31).unwrap();
    let pg =
        Arc::new(yunqi_store_pg::PgStore::open(&url, "bench", Duration::from_secs(3)).unwrap());
    let shared = DatasetStore::open_shared(
        &dir.path().join("node"),
        1 << 31,
        SharedStore {
            manifests: Arc::new(yunqi_store_pg::ClusterManifests::new(pg)),
            blobs: yunqi_store_s3::S3Blobs::open(&s3).unwrap(),
        },
    )
    .unwrap();
    let (mut e, mut c) = (Vec::new(), Vec::new());
    for r in 0..runs {
        // Interleaved, so that both see the same machine.
        let t = run(&embedded, &format!("v{r}"), data.as_bytes());
        e.push(mb as f64 / t.as_secs_f64());
        let t = run(&shared, &format!("v{r}"), data.as_bytes());
        c.push(mb as f64 / t.as_secs_f64());
    }
    let (e, c) = (median(e), median(c));
    println!(
        "import of {mb} MB CSV, median of {runs}: embedded {e:.1} MB/s, cluster (S3 + PostgreSQL) {c:.1} MB/s, ratio {:.2}",
        c / e
    );
    drop(shared);
    drop(weed);
    admin_sql(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"));
}
