//! After the first decision: an officer's review (assign, approve, refuse with the quota given
//! back), deadlines missed and reported, money lines drawn and repaid, consent — every act
//! durable in the decision log and replayed the same after a restart.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use yunqi_serve::calendar::Calendar;
use yunqi_serve::decider::{
    Act, ActKind, ActRequest, Application, CancelSource, Decider, Decision, Recorder, Revocation,
    Verdict, check_inputs,
};
use yunqi_serve::definition::{Service, parse};
use yunqi_serve::rules::Value;
use yunqi_stream::{LogConfig, SegmentLog};
use yunqi_types::{Error, ErrorCode, ManualClock};

#[derive(Default)]
struct Audit(Mutex<Vec<String>>);

impl Recorder for Audit {
    fn record<'a>(
        &'a self,
        decisions: &'a [&'a Decision],
        acts: &'a [&'a Act],
    ) -> yunqi_serve::decider::BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let mut a = self.0.lock().unwrap();
            a.extend(decisions.iter().map(|d| format!("{} decided", d.id)));
            a.extend(acts.iter().map(|x| format!("{} {}", x.id, x.act.as_str())));
            Ok(())
        })
    }

    fn record_revocations<'a>(
        &'a self,
        revocations: &'a [Revocation],
    ) -> yunqi_serve::decider::BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let mut a = self.0.lock().unwrap();
            a.extend(revocations.iter().map(|r| format!("{} revoked", r.revoke)));
            Ok(())
        })
    }
}

const REVIEWED: &str = r#"
[service]
department = "transport"
name = "oversize-permit"
title = "超限运输许可"
applicants = ["enterprise"]

[[inputs]]
name = "plate"
type = "plate"

[[quotas]]
name = "once"
key = "plate"
limit = 1
period = "total"
reason = "该车辆已有一份许可"

[outcome]
decide = "review"
review_hours = 2

[document]
title = "超限运输许可证"
fields = ["plate"]
"#;

const CREDIT: &str = r#"
[service]
department = "health"
name = "credit-healthcare"
title = "先看病后付费"
applicants = ["enterprise"]

[[inputs]]
name = "patient"
type = "id_number"

[[inputs]]
name = "amount"
type = "money"
max_yuan = 5000

[[lookups]]
name = "score"
sql = "SELECT credit_line_yuan FROM city.credit_scores WHERE id_number = :patient"

[[lines]]
name = "credit"
key = "patient"
limit = "score.credit_line_yuan"
amount = "amount"
due_days = 10
reason = "超出先看病后付费额度，或有逾期未还的费用"

[consent]
subject = "patient"
reason = "患者未开通先看病后付费"

[[rules]]
name = "scored"
require = "score.found and not line.credit.overdue"
label = "有信用分且没有逾期"
label_en = "Scored and nothing overdue"
reason = "患者没有信用分，或有逾期"

[outcome]
decide = "automatic"
"#;

const PATIENT: &str = "11010519491231002X";

struct World {
    service: Arc<Service>,
    dir: tempfile::TempDir,
    clock: ManualClock,
    audit: Arc<Audit>,
}

impl World {
    fn new(def: &str) -> World {
        World {
            service: Arc::new(parse(def).unwrap_or_else(|e| panic!("{e:?}"))),
            dir: tempfile::tempdir().unwrap(),
            clock: ManualClock::new("2026-11-26T02:00:00Z".parse().unwrap()),
            audit: Arc::default(),
        }
    }

    fn log(&self) -> Arc<SegmentLog> {
        SegmentLog::open(
            &self.dir.path().join("log"),
            LogConfig::default(),
            Arc::new(self.clock.clone()),
        )
        .unwrap()
    }

    fn open(&self) -> Decider {
        self.open_with(self.log(), Vec::new())
    }

    fn open_with(&self, log: Arc<SegmentLog>, cancels: Vec<CancelSource>) -> Decider {
        let signer = yunqi_serve::document::Signer::open(&self.dir.path().join("key")).unwrap();
        Decider::open(
            self.service.clone(),
            Calendar::china(),
            log,
            self.audit.clone(),
            Arc::new(self.clock.clone()),
            Some(Arc::new(signer)),
            cancels,
        )
        .unwrap()
    }

    fn app(
        &self,
        inputs: serde_json::Value,
        lookups: BTreeMap<String, Option<BTreeMap<String, Value>>>,
        consent: Option<bool>,
    ) -> Application {
        let inputs = check_inputs(
            &self.service,
            inputs.as_object().unwrap(),
            "2026-11-26".parse().unwrap(),
        )
        .unwrap();
        Application {
            applicant_fields: Default::default(),
            applicant: "company1".into(),
            key: None,
            inputs,
            lookups,
            sources: BTreeMap::new(),
            consent,
        }
    }

    fn hours(&self, h: i64) {
        self.clock.advance_micros(h * 3_600_000_000);
    }
}

fn req(act: ActKind, id: &str, by: &str) -> ActRequest {
    ActRequest {
        act,
        id: id.into(),
        by: by.into(),
        overrides: false,
        reason: None,
        assignee: None,
        fen: None,
        key: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_holds_the_quota_until_an_officer_decides() {
    let w = World::new(REVIEWED);
    let d = w.open();
    let apply = |plate: &str| w.app(serde_json::json!({"plate": plate}), BTreeMap::new(), None);

    let a = d.decide(apply("苏E12345")).await.unwrap();
    assert_eq!(a.decision, Verdict::Pending, "{a:?}");
    assert_eq!(
        a.due_at.unwrap() - a.decided_at,
        chrono::Duration::hours(2),
        "the deadline is review_hours after the application"
    );
    assert!(a.document.is_none(), "no document before approval");
    // The pending application holds the plate's one unit.
    let b = d.decide(apply("苏E12345")).await.unwrap();
    assert_eq!(b.decision, Verdict::Refused);
    assert_eq!(b.reasons, ["该车辆已有一份许可"]);
    assert_eq!(
        d.queue().iter().map(|x| x.id.as_str()).collect::<Vec<_>>(),
        [a.id.as_str()]
    );

    // Nobody decides their own application.
    let e = d
        .act(req(ActKind::Approve, &a.id, "company1"))
        .await
        .unwrap_err();
    assert!(e.message.contains("may not decide"), "{e:?}");

    // Assigned to one officer, it is theirs: another officer cannot decide it, a steward can.
    let mut r = req(ActKind::Assign, &a.id, "lead");
    r.assignee = Some("officer1".into());
    d.act(r).await.unwrap();
    let e = d
        .act(req(ActKind::Approve, &a.id, "officer2"))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict);
    assert!(e.message.contains("assigned to officer1"), "{e:?}");
    let ok = d
        .act(req(ActKind::Approve, &a.id, "officer1"))
        .await
        .unwrap();
    assert_eq!(ok.decision, Verdict::Approved);
    assert!(ok.document.is_some(), "approval issues the document");
    assert_eq!(
        ok.review.as_ref().unwrap().decided_by.as_deref(),
        Some("officer1")
    );
    let e = d
        .act(req(ActKind::Refuse, &a.id, "officer1"))
        .await
        .unwrap_err();
    assert!(e.message.contains("not waiting for review"), "{e:?}");
    assert!(d.queue().is_empty());

    // A refusal needs a reason, and gives the quota back.
    let c = d.decide(apply("苏E22222")).await.unwrap();
    let e = d
        .act(req(ActKind::Refuse, &c.id, "officer2"))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidInput);
    let mut r = req(ActKind::Refuse, &c.id, "officer2");
    r.reason = Some("证件照片不清晰，请重新申请".into());
    let refused = d.act(r).await.unwrap();
    assert_eq!(refused.decision, Verdict::Refused);
    assert!(
        refused
            .reasons
            .contains(&"证件照片不清晰，请重新申请".to_string())
    );
    let again = d.decide(apply("苏E22222")).await.unwrap();
    assert_eq!(
        again.decision,
        Verdict::Pending,
        "the unit came back: {again:?}"
    );

    // Nobody decides it in time: the missed deadline is recorded once, and audited.
    w.hours(3);
    let mut breached = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        breached = d
            .decision(&again.id)
            .and_then(|x| x.review.as_ref().and_then(|r| r.breached_at));
        if breached.is_some() {
            break;
        }
    }
    assert!(
        breached.is_some(),
        "the deadline passed and was not reported"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let audit = w.audit.0.lock().unwrap().clone();
    let breaches = audit.iter().filter(|x| x.ends_with(" breach")).count();
    assert_eq!(breaches, 1, "{audit:?}");
    assert!(audit.contains(&format!("{} approve", a.id)));
    let before: Vec<Arc<Decision>> = [&a.id, &c.id, &again.id]
        .iter()
        .map(|id| d.decision(id).unwrap())
        .collect();
    drop(d);

    // A restart replays the acts: the same decisions, the same queue, the same quota state.
    let d = w.open();
    for x in &before {
        assert_eq!(&d.decision(&x.id).unwrap(), x);
    }
    assert_eq!(
        d.queue().iter().map(|x| x.id.as_str()).collect::<Vec<_>>(),
        [again.id.as_str()]
    );
    let held = d.decide(apply("苏E22222")).await.unwrap();
    assert_eq!(
        held.decision,
        Verdict::Refused,
        "still held after the restart"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let audit = w.audit.0.lock().unwrap().clone();
    assert_eq!(
        audit.iter().filter(|x| x.ends_with(" breach")).count(),
        1,
        "a breach is not reported again after a restart"
    );
}

fn score(line: i64) -> BTreeMap<String, Option<BTreeMap<String, Value>>> {
    BTreeMap::from([(
        "score".to_string(),
        Some(BTreeMap::from([(
            "credit_line_yuan".to_string(),
            Value::Int(line),
        )])),
    )])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_lines_draw_within_the_line_and_repay() {
    let w = World::new(CREDIT);
    let d = w.open();
    let charge = |yuan: f64, consent: bool| {
        w.app(
            serde_json::json!({"patient": PATIENT, "amount": yuan}),
            score(1000),
            Some(consent),
        )
    };
    let account = format!("credit:{PATIENT}");

    let no = d.decide(charge(100.0, false)).await.unwrap();
    assert_eq!(no.decision, Verdict::Refused);
    assert_eq!(no.rules[0].rule, "consent");
    assert_eq!(no.reasons, ["患者未开通先看病后付费"]);
    assert!(no.draw.is_none() && d.outstanding(&account) == 0);

    let first = d.decide(charge(600.0, true)).await.unwrap();
    assert_eq!(first.decision, Verdict::Approved, "{first:?}");
    let draw = first.draw.clone().unwrap();
    assert_eq!((draw.fen, draw.repaid_fen), (60_000, 0));
    assert_eq!(draw.due_at - first.decided_at, chrono::Duration::days(10));
    assert_eq!(first.data["line.credit"]["limit_yuan"], 1000.0);
    let over = d.decide(charge(400.01, true)).await.unwrap();
    assert_eq!(over.decision, Verdict::Refused, "600 + 400.01 > 1000");
    let exact = d.decide(charge(400.0, true)).await.unwrap();
    assert_eq!(
        exact.decision,
        Verdict::Approved,
        "the line is used to the fen"
    );
    assert_eq!(d.outstanding(&account), 100_000);

    // Part repaid, then the rest; nothing more is owed.
    let mut r = req(ActKind::Repay, &first.id, "company1");
    r.fen = Some(25_000);
    r.key = Some("pay-1".into());
    let part = d.act(r.clone()).await.unwrap();
    assert_eq!(part.draw.as_ref().unwrap().owed(), 35_000);
    let again = d.act(r.clone()).await.unwrap();
    assert_eq!(again, part, "a retried repayment is not recorded twice");
    assert_eq!(d.outstanding(&account), 75_000);
    let mut r = req(ActKind::Repay, &first.id, "company1");
    r.fen = Some(35_001);
    assert_eq!(d.act(r).await.unwrap_err().code, ErrorCode::InvalidInput);
    d.act(req(ActKind::Repay, &first.id, "company1"))
        .await
        .unwrap();
    let e = d
        .act(req(ActKind::Repay, &first.id, "company1"))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict);
    assert_eq!(d.outstanding(&account), 40_000);

    // Eleven days on, the second charge is overdue: the line is closed until it is repaid.
    w.hours(11 * 24);
    let late = d.decide(charge(10.0, true)).await.unwrap();
    assert_eq!(late.decision, Verdict::Refused, "{late:?}");
    assert_eq!(late.data["line.credit"]["overdue"], true);
    drop(d);

    // The restart gives back the same line, and the repayment's key.
    let d = w.open();
    assert_eq!(d.outstanding(&account), 40_000);
    let mut r = req(ActKind::Repay, &first.id, "company1");
    r.fen = Some(25_000);
    r.key = Some("pay-1".into());
    assert_eq!(
        d.act(r).await.unwrap().draw.as_ref().unwrap().repaid_fen,
        60_000,
        "the key is known after the restart: nothing repaid again"
    );
    assert_eq!(d.outstanding(&account), 40_000);
    d.act(req(ActKind::Repay, &exact.id, PATIENT))
        .await
        .unwrap();
    assert_eq!(d.outstanding(&account), 0);
    let fresh = d.decide(charge(10.0, true)).await.unwrap();
    assert_eq!(fresh.decision, Verdict::Approved, "{fresh:?}");

    // No credit score: refused by the rule, nothing drawn.
    let unknown = w.app(
        serde_json::json!({"patient": PATIENT, "amount": 1}),
        BTreeMap::from([("score".to_string(), None)]),
        Some(true),
    );
    let r = d.decide(unknown).await.unwrap();
    assert_eq!(r.decision, Verdict::Refused);
    assert_eq!(d.outstanding(&account), 1_000);
}

#[test]
fn credit_codes_are_valid() {
    for n in [0u64, 1, 42, 99_999_999, 123_456_789] {
        let c = yunqi_serve::decider::credit_code("330106", n).unwrap();
        assert!(yunqi_types::classify::is_credit_code(&c), "{c}");
        assert!(c.starts_with("91330106"));
    }
    assert_ne!(
        yunqi_serve::decider::credit_code("330106", 1),
        yunqi_serve::decider::credit_code("330106", 2)
    );
}

const CANCELLED: &str = r#"
[service]
department = "traffic"
name = "day-permit"
title = "通行证"
applicants = ["citizen"]

[[inputs]]
name = "plate"
type = "plate"

[[inputs]]
name = "date"
type = "date"

[outcome]
decide = "automatic"

[document]
title = "通行证"
fields = ["plate", "date"]

[[cancel_on]]
stream = "traffic.violations"
column = "plate"
input = "plate"
reason = "通行期间有交通违法记录"
"#;

/// One log entry of violations, as Sense writes them: Arrow IPC, plate and event time.
fn violations(rows: &[(&str, &str)]) -> Vec<u8> {
    use datafusion::arrow::array::{StringArray, TimestampMicrosecondArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use datafusion::arrow::record_batch::RecordBatch;
    let schema = Arc::new(Schema::new(vec![
        Field::new("plate", DataType::Utf8, true),
        Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, None), true),
    ]));
    let plates = StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>());
    let ts = TimestampMicrosecondArray::from(
        rows.iter()
            .map(|r| {
                r.1.parse::<chrono::DateTime<chrono::Utc>>()
                    .unwrap()
                    .timestamp_micros()
            })
            .collect::<Vec<_>>(),
    );
    let b = RecordBatch::try_new(schema.clone(), vec![Arc::new(plates), Arc::new(ts)]).unwrap();
    let mut out = Vec::new();
    let mut w = datafusion::arrow::ipc::writer::StreamWriter::try_new(&mut out, &schema).unwrap();
    w.write(&b).unwrap();
    w.finish().unwrap();
    drop(w);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_violation_during_the_window_cancels_the_permit() {
    let w = World::new(CANCELLED);
    let source = || {
        vec![CancelSource {
            cancel: w.service.cancel_on[0].clone(),
            event_time: "ts".into(),
        }]
    };
    let log = w.log();
    let d = w.open_with(log.clone(), source());
    let permit = |plate: &str, date: &str| {
        w.app(
            serde_json::json!({"plate": plate, "date": date}),
            BTreeMap::new(),
            None,
        )
    };
    // Valid 2026-11-30 00:00 to 24:00 in Hangzhou (UTC+8).
    let a = d.decide(permit("苏E12345", "2026-11-30")).await.unwrap();
    let b = d.decide(permit("苏E12345", "2026-12-02")).await.unwrap();
    let c = d.decide(permit("沪B00001", "2026-11-30")).await.unwrap();
    assert!(a.document.is_some() && b.document.is_some() && c.document.is_some());

    // One violation inside a's window (10:00 local), one just before it, one of another plate.
    let events = violations(&[
        ("苏E12345", "2026-11-29T15:59:59Z"),
        ("苏E12345", "2026-11-30T02:00:00Z"),
        ("浙A99999", "2026-11-30T02:00:00Z"),
    ]);
    log.append("traffic.violations", 3, events).await.unwrap();
    let mut revoked = None;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        revoked = d.revocation(&a.id);
        if revoked.is_some() {
            break;
        }
    }
    let r = revoked.expect("the violation during the window did not cancel the permit");
    assert_eq!(r.by, "system");
    assert!(r.reason.contains("通行期间有交通违法记录"), "{r:?}");
    assert!(d.revocation(&b.id).is_none(), "another day's permit stands");
    assert!(
        d.revocation(&c.id).is_none(),
        "another plate's permit stands"
    );
    // The quota (here none) and the decision are unchanged: a revoked permit was issued.
    assert_eq!(d.decision(&a.id).unwrap().decision, Verdict::Approved);
    drop(d);
    drop(log);

    // After a restart: still revoked, and the events are not read again.
    let log = w.log();
    let d = w.open_with(log.clone(), source());
    assert!(d.revocation(&a.id).is_some());
    let late = violations(&[("沪B00001", "2026-11-30T15:59:59Z")]);
    log.append("traffic.violations", 1, late).await.unwrap();
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if d.revocation(&c.id).is_some() {
            break;
        }
    }
    assert!(
        d.revocation(&c.id).is_some(),
        "the last second of the window counts"
    );
    let audit = w.audit.0.lock().unwrap().clone();
    assert_eq!(
        audit.iter().filter(|x| x.ends_with(" revoked")).count(),
        2,
        "{audit:?}"
    );
}
