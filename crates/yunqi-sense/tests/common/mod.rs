//! Shared by the engine tests: a traffic stream, generated events, and the batch-SQL oracle.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::util::display::array_value_to_string;
use datafusion::prelude::SessionContext;
use yunqi_datasets::StreamManifest;
use yunqi_sense::plan::{OutputKind, ViewPlan};
use yunqi_sense::{Engine, parse_create_stream};

pub const STREAM: &str = "CREATE STREAM traffic.detections (plate TEXT, segment INT, district TEXT, speed DOUBLE, ts TIMESTAMP) WITH (event_time = 'ts', watermark = '5 seconds')";

/// 2026-11-26T00:00:00Z in microseconds.
pub const T0: i64 = 1_795_651_200_000_000;

pub fn stream() -> StreamManifest {
    parse_create_stream(STREAM, "steward", chrono::Utc::now()).expect("stream")
}

pub fn plan(sql: &str) -> Arc<ViewPlan> {
    let s = stream();
    Arc::new(
        ViewPlan::parse(sql, &|name| {
            assert_eq!(name, "traffic.detections");
            Ok(s.clone())
        })
        .expect("view plan"),
    )
}

/// SplitMix64.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub plate: Option<String>,
    pub segment: Option<i64>,
    pub district: Option<String>,
    pub speed: Option<f64>,
    pub ts: i64,
}

pub const DISTRICTS: [&str; 4] = ["上城", "西湖", "拱墅", "滨江"];

/// `n` events over `minutes` minutes from T0 in event-time order, then shuffled so that each
/// arrives at most `jitter_us` after a later one (delivery out of order, within the delay).
pub fn events(n: usize, minutes: i64, jitter_us: i64, seed: u64) -> Vec<Event> {
    let mut r = Rng(seed);
    let span = minutes * 60_000_000;
    let mut out: Vec<Event> = (0..n)
        .map(|i| {
            let segment = r.below(40) as i64;
            let local = r.below(3) != 0;
            Event {
                plate: if r.below(200) == 0 {
                    None
                } else {
                    Some(format!(
                        "{}{:05}",
                        if local { "浙A" } else { "沪B" },
                        r.below(300)
                    ))
                },
                segment: Some(segment),
                district: Some(DISTRICTS[(segment % 4) as usize].to_string()),
                speed: if r.below(50) == 0 {
                    None
                } else {
                    Some((r.below(12_000) as f64) / 100.0)
                },
                ts: T0 + (i as i64 * span) / n as i64 + r.below(1000) as i64,
            }
        })
        .collect();
    // Delivery order: sort by event time plus a random delay below the jitter.
    let mut keyed: Vec<(i64, Event)> = out
        .drain(..)
        .map(|e| {
            let d = if jitter_us > 0 {
                r.below(jitter_us as u64) as i64
            } else {
                0
            };
            (e.ts + d, e)
        })
        .collect();
    keyed.sort_by_key(|(k, _)| *k);
    keyed.into_iter().map(|(_, e)| e).collect()
}

pub fn batch(events: &[Event]) -> RecordBatch {
    let s = stream();
    let cols: Vec<ArrayRef> = vec![
        Arc::new(
            events
                .iter()
                .map(|e| e.plate.clone())
                .collect::<StringArray>(),
        ),
        Arc::new(events.iter().map(|e| e.segment).collect::<Int64Array>()),
        Arc::new(
            events
                .iter()
                .map(|e| e.district.clone())
                .collect::<StringArray>(),
        ),
        Arc::new(events.iter().map(|e| e.speed).collect::<Float64Array>()),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(events.iter().map(|e| e.ts))
                .with_timezone("UTC"),
        ),
    ];
    RecordBatch::try_new(s.arrow_schema(), cols).expect("batch")
}

/// Runs the engine over the events in batches of `step`, closing ready windows after each
/// batch, then everything.
pub fn run(plan: &Arc<ViewPlan>, events: &[Event], step: usize) -> (RecordBatch, Engine) {
    let mut e = Engine::new(plan.clone()).expect("engine");
    let mut out = Vec::new();
    for chunk in events.chunks(step.max(1)) {
        e.process(&batch(chunk)).expect("process");
        if let Some(c) = e.close_ready().expect("close") {
            out.push(c.batch);
        }
    }
    if let Some(c) = e.close_all().expect("close all") {
        out.push(c.batch);
    }
    let schema = e.output_schema();
    (concat_batches(&schema, &out).expect("concat"), e)
}

/// The view computed by DataFusion as a batch query over the events.
pub async fn oracle(plan: &ViewPlan, events: &[Event]) -> RecordBatch {
    let ctx = SessionContext::new();
    ctx.register_batch("events", batch(events))
        .expect("register");
    let sql = plan.batch_sql("events", true);
    let df = ctx.sql(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    let schema = Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await.expect("oracle");
    concat_batches(&schema, &batches).expect("concat")
}

/// Rows by their key (window and grouping columns), values as text.
pub fn rows(plan: &ViewPlan, b: &RecordBatch) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for r in 0..b.num_rows() {
        let mut key = Vec::new();
        let mut vals = Vec::new();
        for (c, o) in plan.outputs.iter().enumerate() {
            let v = array_value_to_string(b.column(c), r).expect("display");
            match o.kind {
                OutputKind::Agg(_) => vals.push(v),
                _ => key.push(v),
            }
        }
        let k = key.join("|");
        assert!(out.insert(k.clone(), vals).is_none(), "duplicate row {k}");
    }
    out
}

/// Checks the engine's rows against the oracle's: same keys, equal values (floats to 1e-9
/// relative; `approx` columns within 5 %).
pub fn assert_same(plan: &ViewPlan, engine: &RecordBatch, oracle: &RecordBatch, approx: &[&str]) {
    let a = rows(plan, engine);
    let b = rows(plan, oracle);
    let ka: Vec<&String> = a.keys().collect();
    let kb: Vec<&String> = b.keys().collect();
    assert_eq!(
        ka.len(),
        kb.len(),
        "row count: engine {} oracle {}",
        ka.len(),
        kb.len()
    );
    assert_eq!(ka, kb, "row keys differ");
    let agg_names: Vec<&str> = plan
        .outputs
        .iter()
        .filter(|o| matches!(o.kind, OutputKind::Agg(_)))
        .map(|o| o.name.as_str())
        .collect();
    for (k, va) in &a {
        let vb = &b[k];
        for (i, (x, y)) in va.iter().zip(vb).enumerate() {
            if x == y {
                continue;
            }
            let (fx, fy) = (x.parse::<f64>(), y.parse::<f64>());
            let (Ok(fx), Ok(fy)) = (fx, fy) else {
                panic!("{k}: {} engine {x:?} oracle {y:?}", agg_names[i]);
            };
            let tol = if approx.contains(&agg_names[i]) {
                0.05
            } else {
                1e-9
            };
            assert!(
                (fx - fy).abs() <= tol * fy.abs().max(1.0),
                "{k}: {} engine {x} oracle {y}",
                agg_names[i]
            );
        }
    }
}
