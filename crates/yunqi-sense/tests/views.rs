//! The incremental engine against DataFusion computing the same view as a batch query.

mod common;

use common::*;
use yunqi_sense::Engine;

const ROLLUP: &str = "CREATE CONTINUOUS VIEW traffic.flow_1m AS SELECT window_start, window_end, district, segment, count(*) AS vehicles, approx_count_distinct(plate) AS plates, avg(speed) AS speed FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE) GROUP BY window_start, window_end, ROLLUP(district, segment)";

/// Every supported shape, with the columns that are approximate.
const SHAPES: &[(&str, &[&str])] = &[
    (ROLLUP, &["plates"]),
    (
        "CREATE CONTINUOUS VIEW traffic.seg AS SELECT window_start, window_end, segment, count(*) AS n FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE) GROUP BY window_start, window_end, segment",
        &[],
    ),
    (
        "CREATE CONTINUOUS VIEW traffic.fast AS SELECT window_start, window_end, district, count(speed) AS measured, sum(speed) AS total, min(speed) AS slowest, max(speed) AS fastest, min(ts) AS first_seen, max(segment) AS top_segment FROM HOP(traffic.detections, ts, INTERVAL '30' SECOND, INTERVAL '2' MINUTE) WHERE speed > 20 AND plate LIKE '浙A%' GROUP BY window_start, window_end, district",
        &[],
    ),
    (
        "CREATE CONTINUOUS VIEW traffic.sets AS SELECT window_start, window_end, district, segment, grouping(district) AS all_districts, count(*) AS n, sum(segment) AS seg_sum FROM TUMBLE(traffic.detections, ts, INTERVAL '90' SECOND) GROUP BY window_start, window_end, GROUPING SETS ((district), (segment), ())",
        &[],
    ),
    (
        "CREATE CONTINUOUS VIEW traffic.city AS SELECT window_start, count(*) AS n, approx_count_distinct(plate) AS plates, avg(speed) AS speed FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE) GROUP BY window_start",
        &["plates"],
    ),
    (
        "CREATE CONTINUOUS VIEW traffic.cube AS SELECT window_start, window_end, district, plate, grouping(plate) AS any_plate, count(*) AS n FROM TUMBLE(traffic.detections, ts, INTERVAL '5' MINUTE) WHERE segment < 5 GROUP BY window_start, window_end, CUBE(district, plate)",
        &[],
    ),
];

#[tokio::test]
async fn every_shape_equals_the_batch_oracle() {
    let ev = events(20_000, 10, 4_000_000, 7);
    for (sql, approx) in SHAPES {
        let p = plan(sql);
        let (got, e) = run(&p, &ev, 777);
        assert_eq!(e.stats().events_late, 0, "{sql}");
        let want = oracle(&p, &ev).await;
        assert!(want.num_rows() > 0);
        assert_same(&p, &got, &want, approx);
    }
}

#[tokio::test]
async fn out_of_order_within_the_delay_equals_sorted_exactly() {
    let sorted = events(30_000, 6, 0, 11);
    let shuffled = events(30_000, 6, 4_900_000, 11);
    assert_ne!(sorted, shuffled);
    for (sql, _) in SHAPES {
        let p = plan(sql);
        let (a, _) = run(&p, &sorted, 1000);
        let (b, _) = run(&p, &shuffled, 313);
        assert_eq!(rows(&p, &a), rows(&p, &b), "{sql}");
    }
}

#[tokio::test]
async fn batch_size_changes_nothing() {
    let ev = events(10_000, 5, 3_000_000, 3);
    let p = plan(ROLLUP);
    let (a, _) = run(&p, &ev, 1);
    let (b, _) = run(&p, &ev, 10_000);
    let (c, _) = run(&p, &ev, 97);
    assert_eq!(rows(&p, &a), rows(&p, &b));
    assert_eq!(rows(&p, &a), rows(&p, &c));
}

#[tokio::test]
async fn late_events_are_counted_not_folded() {
    let p = plan(ROLLUP);
    let mut ev = events(6_000, 4, 0, 5);
    // After minute 3 has been seen, events of minute 0 arrive: beyond the 5 s delay.
    let mut late: Vec<Event> = ev[..50].to_vec();
    for e in &mut late {
        e.plate = Some("浙A99999".into());
    }
    ev.extend(late.iter().cloned());
    let (got, e) = run(&p, &ev, 500);
    assert_eq!(e.stats().events_late, 50);
    let on_time: Vec<Event> = ev[..6_000].to_vec();
    assert_same(&p, &got, &oracle(&p, &on_time).await, &["plates"]);
    let table = e.late_rows().unwrap();
    assert_eq!(table.num_rows(), 1);
    let counts = rows_of(&table, 2);
    assert_eq!(counts, vec!["50"]);
    let behind = rows_of(&table, 4);
    assert!(behind[0].parse::<i64>().unwrap() > 60_000, "{behind:?}");
}

#[tokio::test]
async fn allowed_lateness_keeps_windows_open() {
    let sql = ROLLUP.replace(
        " AS SELECT",
        " WITH (allowed_lateness = '5 minutes') AS SELECT",
    );
    let p = plan(&sql);
    let mut ev = events(6_000, 4, 0, 5);
    let late: Vec<Event> = ev[..50].to_vec();
    ev.extend(late.iter().cloned());
    let (got, e) = run(&p, &ev, 500);
    assert_eq!(e.stats().events_late, 0);
    assert_same(&p, &got, &oracle(&p, &ev).await, &["plates"]);
}

#[tokio::test]
async fn a_restored_snapshot_continues_exactly() {
    let ev = events(20_000, 8, 4_000_000, 21);
    for (sql, _) in SHAPES {
        let p = plan(sql);
        let (whole, _) = run(&p, &ev, 1000);
        let mut e = Engine::new(p.clone()).unwrap();
        let mut out = Vec::new();
        for (i, chunk) in ev.chunks(1000).enumerate() {
            e.process(&batch(chunk)).unwrap();
            if let Some(c) = e.close_ready().unwrap() {
                out.push(c.batch);
            }
            if i % 3 == 1 {
                let snap = e.snapshot().unwrap();
                e = Engine::restore(p.clone(), &snap).unwrap();
            }
        }
        if let Some(c) = e.close_all().unwrap() {
            out.push(c.batch);
        }
        let resumed = datafusion::arrow::compute::concat_batches(&e.output_schema(), &out).unwrap();
        assert_eq!(rows(&p, &whole), rows(&p, &resumed), "{sql}");
    }
}

fn rows_of(b: &datafusion::arrow::array::RecordBatch, c: usize) -> Vec<String> {
    (0..b.num_rows())
        .map(|r| datafusion::arrow::util::display::array_value_to_string(b.column(c), r).unwrap())
        .collect()
}

#[test]
fn unsupported_sql_names_the_construct() {
    let s = stream();
    let parse = |sql: &str| {
        yunqi_sense::ViewPlan::parse(sql, &|_| Ok(s.clone()))
            .err()
            .map(|e| format!("{} {}", e.message, e.hint.unwrap_or_default()))
            .unwrap_or_else(|| panic!("accepted: {sql}"))
    };
    let base = "CREATE CONTINUOUS VIEW traffic.v AS SELECT window_start, count(*) AS n FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE)";
    let cases = [
        (format!("{base} GROUP BY window_start ORDER BY n"), "ORDER BY"),
        (format!("{base} GROUP BY window_start HAVING count(*) > 1"), "HAVING"),
        (format!("{base} GROUP BY window_start LIMIT 3"), "LIMIT"),
        (format!("{base} GROUP BY window_start, upper(plate)"), "upper(plate)"),
        (base.to_string(), "groups by window"),
        (
            "CREATE CONTINUOUS VIEW traffic.v AS SELECT window_start, median(speed) AS m FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE) GROUP BY window_start".into(),
            "median",
        ),
        (
            "CREATE CONTINUOUS VIEW traffic.v AS SELECT window_start, count(DISTINCT plate) AS m FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE) GROUP BY window_start".into(),
            "DISTINCT",
        ),
        (
            "CREATE CONTINUOUS VIEW traffic.v AS SELECT window_start, sum(plate) AS m FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE) GROUP BY window_start".into(),
            "sum(plate)",
        ),
        (
            "CREATE CONTINUOUS VIEW traffic.v AS SELECT window_start, count(*) FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE) GROUP BY window_start".into(),
            "give",
        ),
        (
            "CREATE CONTINUOUS VIEW traffic.v AS SELECT window_start, plate, count(*) AS n FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE) GROUP BY window_start".into(),
            "not grouped",
        ),
        (
            "CREATE CONTINUOUS VIEW traffic.v AS SELECT count(*) AS n FROM traffic.detections".into(),
            "through a window",
        ),
        (
            "CREATE CONTINUOUS VIEW traffic.v AS SELECT window_start, count(*) AS n FROM TUMBLE(traffic.detections, speed, INTERVAL '1' MINUTE) GROUP BY window_start".into(),
            "event time",
        ),
        (
            "CREATE CONTINUOUS VIEW traffic.v AS SELECT window_start, count(*) AS n FROM HOP(traffic.detections, ts, INTERVAL '7' SECOND, INTERVAL '1' MINUTE) GROUP BY window_start".into(),
            "whole number of slides",
        ),
        (
            "CREATE CONTINUOUS VIEW traffic.v AS SELECT window_start, count(*) AS n FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE) JOIN x ON true GROUP BY window_start".into(),
            "JOIN",
        ),
        (
            "CREATE CONTINUOUS VIEW traffic.v AS SELECT window_start, count(*) AS n FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE) GROUP BY window_start UNION SELECT window_start, 1 AS n FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE) GROUP BY window_start".into(),
            "UNION",
        ),
        (
            "CREATE CONTINUOUS VIEW traffic.v AS SELECT window_start, count(*) AS n, sum(speed) / count(*) AS m FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE) GROUP BY window_start".into(),
            "expression",
        ),
        (
            "CREATE CONTINUOUS VIEW traffic.v AS SELECT window_start, count(*) AS n FROM TUMBLE(traffic.detections, ts, INTERVAL '1 fortnight') GROUP BY window_start".into(),
            "duration",
        ),
        (
            "CREATE CONTINUOUS VIEW traffic.v AS SELECT window_start, count(*) AS n FROM TUMBLE(traffic.detections, ts, INTERVAL '1' MINUTE) GROUP BY window_start, segmnt".into(),
            "segment",
        ),
    ];
    for (sql, want) in cases {
        let got = parse(&sql);
        assert!(got.contains(want), "{sql}\n  → {got}\n  (wanted {want:?})");
    }
}
