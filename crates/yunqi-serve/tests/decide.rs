//! The decider over a real, durable decision log: the permit service's rules and reasons,
//! 1,000 simultaneous applications for one plate granting exactly the quota, idempotency keys,
//! and a restart that rebuilds the ledger and the decisions from the log alone.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use yunqi_serve::calendar::Calendar;
use yunqi_serve::decider::{Application, Decider, Decision, Recorder, Verdict, check_inputs};
use yunqi_serve::definition::{Service, parse};
use yunqi_serve::rules::Value;
use yunqi_stream::{LogConfig, SegmentLog};
use yunqi_types::{Error, ManualClock};

const PERMIT: &str = include_str!("../../../services/traffic.urgent-entry-permit.toml");

#[derive(Default)]
struct Audit(Mutex<Vec<String>>);

impl Recorder for Audit {
    fn record<'a>(
        &'a self,
        decisions: &'a [&'a Decision],
        acts: &'a [&'a yunqi_serve::decider::Act],
    ) -> yunqi_serve::decider::BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let mut a = self.0.lock().unwrap();
            a.extend(decisions.iter().map(|d| d.id.clone()));
            a.extend(acts.iter().map(|x| format!("{} {}", x.id, x.act.as_str())));
            Ok(())
        })
    }
}

struct World {
    service: Arc<Service>,
    dir: tempfile::TempDir,
    clock: ManualClock,
    audit: Arc<Audit>,
}

impl World {
    fn new() -> World {
        World {
            service: Arc::new(parse(PERMIT).expect("permit definition")),
            dir: tempfile::tempdir().unwrap(),
            // Thursday 2026-11-26, 10:00 in Hangzhou.
            clock: ManualClock::new("2026-11-26T02:00:00Z".parse().unwrap()),
            audit: Arc::default(),
        }
    }

    fn open(&self) -> Decider {
        let log = SegmentLog::open(
            &self.dir.path().join("log"),
            LogConfig::default(),
            Arc::new(self.clock.clone()),
        )
        .unwrap();
        let mut cal = Calendar::china();
        cal.holidays.insert("2027-01-01".parse().unwrap());
        Decider::open(
            self.service.clone(),
            cal,
            log,
            self.audit.clone(),
            Arc::new(self.clock.clone()),
            None,
            Vec::new(),
        )
        .unwrap()
    }

    fn app(&self, plate: &str, date: &str, window: &str, key: Option<&str>) -> Application {
        let inputs =
            serde_json::json!({"plate": plate, "date": date, "window": window, "reason": "送货"});
        let inputs = check_inputs(
            &self.service,
            inputs.as_object().unwrap(),
            "2026-11-26".parse().unwrap(),
        )
        .unwrap();
        let vehicle = (!plate.ends_with("99999")).then(|| {
            BTreeMap::from([
                ("plate".to_string(), Value::Text(plate.into())),
                ("vehicle_type".to_string(), Value::Text("小型汽车".into())),
            ])
        });
        let zone = BTreeMap::from([(
            "vehicles".to_string(),
            Value::Int(if plate == "苏E00001" { 6000 } else { 400 }),
        )]);
        Application {
            applicant_fields: Default::default(),
            applicant: "citizen1".into(),
            key: key.map(str::to_string),
            inputs,
            lookups: BTreeMap::from([
                ("vehicle".to_string(), vehicle),
                ("zone".to_string(), Some(zone)),
            ]),
            sources: BTreeMap::new(),
            consent: None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_decide_and_explain() {
    let w = World::new();
    let d = w.open();
    let ok = d
        .decide(w.app("沪B12345", "2026-11-30", "day", None))
        .await
        .unwrap();
    assert_eq!(ok.decision, Verdict::Approved, "{ok:?}");
    assert!(ok.reasons.is_empty());
    assert_eq!(ok.rules.len(), 4);
    assert!(ok.rules.iter().all(|r| r.met == Some(true)));
    assert_eq!(ok.quotas[0].period, "2026");
    assert_eq!(ok.quotas[1].period, "2026-11");
    assert_eq!((ok.quotas[1].used, ok.quotas[1].limit), (1, 3));
    assert_eq!(ok.data["vehicle"]["vehicle_type"], "小型汽车");
    assert_eq!(ok.id, "traffic.urgent-entry-permit/1");

    for (plate, date, window, rule) in [
        ("浙A12345", "2026-11-30", "day", "non_local"),
        ("沪B99999", "2026-11-30", "day", "vehicle_known"),
        ("沪B12345", "2026-11-28", "day", "workdays_only"), // a Saturday
        ("沪B12345", "2026-11-27", "noon", "workdays_only"), // Friday noon into Saturday
        ("沪B12345", "2026-12-31", "noon", "workdays_only"), // into New Year's Day
        ("苏E00001", "2026-11-30", "day", "zone_not_full"),
    ] {
        let r = d.decide(w.app(plate, date, window, None)).await.unwrap();
        assert_eq!(r.decision, Verdict::Refused, "{plate} {date} {window}");
        let failed: Vec<&str> = r
            .rules
            .iter()
            .filter(|o| o.met != Some(true))
            .map(|o| o.rule.as_str())
            .collect();
        assert_eq!(failed, [rule], "{plate} {date} {window}: {r:?}");
        assert_eq!(r.reasons.len(), 1);
        assert!(r.changes.is_empty(), "a refusal spends nothing");
    }
    // Every decision is audited.
    assert_eq!(w.audit.0.lock().unwrap().len(), 7);
    // Inputs are checked at the edge.
    let e = check_inputs(
        &w.service,
        serde_json::json!({"plate": "沪B1", "date": "2027-03-01", "window": "night", "colour": 1})
            .as_object()
            .unwrap(),
        "2026-11-26".parse().unwrap(),
    )
    .unwrap_err();
    let detail = e.detail.unwrap();
    for want in [
        "plate: \"沪B1\" is not a vehicle plate",
        "date: 2027-03-01 is after",
        "window: \"night\" is not one of day, noon",
        "colour: ",
        "reason: required",
    ] {
        assert!(detail.contains(want), "{want}: {detail}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_applications_for_one_plate_get_exactly_the_quota() {
    let w = World::new();
    let d = Arc::new(w.open());
    // Workdays of November, December and January within 60 days.
    let dates: Vec<String> = (0..60)
        .map(|i| chrono::NaiveDate::from_ymd_opt(2026, 11, 26).unwrap() + chrono::Duration::days(i))
        .filter(|x| !Calendar::china().is_rest_day(*x) && x.to_string() != "2027-01-01")
        .map(|x| x.to_string())
        .collect();
    let apps: Vec<Application> = (0..1000)
        .map(|i| w.app("沪B12345", &dates[i % dates.len()], "day", None))
        .collect();
    let handles: Vec<_> = apps
        .into_iter()
        .map(|a| {
            let d = d.clone();
            tokio::spawn(async move { d.decide(a).await.unwrap() })
        })
        .collect();
    let mut by_month: BTreeMap<String, usize> = BTreeMap::new();
    let mut refused = 0;
    for h in handles {
        let r = h.await.unwrap();
        match r.decision {
            Verdict::Approved => {
                *by_month
                    .entry(r.inputs["date"].as_str().unwrap()[..7].to_string())
                    .or_default() += 1
            }
            _ => {
                refused += 1;
                assert!(r.reasons[0].contains("本月已办理3次"), "{r:?}");
            }
        }
    }
    assert_eq!(
        by_month,
        BTreeMap::from([
            ("2026-11".into(), 3),
            ("2026-12".into(), 3),
            ("2027-01".into(), 3)
        ])
    );
    assert_eq!(refused, 991);
    assert_eq!(d.decided(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_restarts_decide_once() {
    let w = World::new();
    let first;
    {
        let d = w.open();
        first = d
            .decide(w.app("沪B12345", "2026-12-01", "day", Some("k-1")))
            .await
            .unwrap();
        let again = d
            .decide(w.app("沪B12345", "2026-12-01", "day", Some("k-1")))
            .await
            .unwrap();
        assert_eq!(again, first, "a retry gets the same decision");
        // Concurrent retries of one new key: one decision.
        let apps: Vec<_> = (0..20)
            .map(|_| w.app("沪B12345", "2026-12-02", "day", Some("k-2")))
            .collect();
        let ids: Vec<String> = futures_join(&d, apps)
            .await
            .into_iter()
            .map(|r| r.id.clone())
            .collect();
        assert!(ids.iter().all(|i| i == &ids[0]), "{ids:?}");
        d.decide(w.app("沪B12345", "2026-12-03", "day", None))
            .await
            .unwrap();
        assert_eq!(d.decided(), 3);
    }
    // After a restart the log alone gives back the ledger and the keys.
    let d = w.open();
    assert_eq!(d.decided(), 3);
    let again = d
        .decide(w.app("沪B12345", "2026-12-01", "day", Some("k-1")))
        .await
        .unwrap();
    assert_eq!(again, first);
    let over = d
        .decide(w.app("沪B12345", "2026-12-04", "day", None))
        .await
        .unwrap();
    assert_eq!(
        over.decision,
        Verdict::Refused,
        "December's 3 are used: {over:?}"
    );
    assert_eq!(over.id, "traffic.urgent-entry-permit/4", "numbers continue");
    assert_eq!(
        w.audit.0.lock().unwrap().len(),
        4,
        "retries are not decided again"
    );
}

async fn futures_join(d: &Decider, apps: Vec<Application>) -> Vec<Arc<Decision>> {
    let mut out = Vec::new();
    std::thread::scope(|s| {
        let hs: Vec<_> = apps
            .into_iter()
            .map(|a| {
                s.spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap()
                        .block_on(d.decide(a))
                        .unwrap()
                })
            })
            .collect();
        out = hs.into_iter().map(|h| h.join().unwrap()).collect();
    });
    out
}
