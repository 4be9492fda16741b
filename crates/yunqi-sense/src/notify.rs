//! Delivery of NGSI-LD notifications: one task per subscription on a runtime of its own, so a
//! slow endpoint never holds up entity writes, queries or other subscriptions.
//!
//! A task waits for pending states, keeps `throttling` between notifications, renders the
//! states as the owner may see them now, POSTs them (redirects are not followed: an allowed
//! endpoint cannot send yunqi elsewhere), audits the attempt, and on failure keeps the states
//! pending and retries after a backoff that doubles from 0.5 s up to 60 s.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{Value, json};
use yunqi_governance::CallContext;
use yunqi_types::{Error, Outcome};

use crate::ngsi::{self, Row, View};
use crate::subscriptions::{Format, Sub, Subscriptions};

/// Most entities in one notification; more pending are sent in the next one.
pub const NOTIFICATION_ENTITIES_MAX: usize = 1000;

/// How long one POST may take, connection included.
const POST_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait between retries.
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The delivery runtime and its HTTP client.
pub(crate) struct Notifier {
    rt: Mutex<Option<tokio::runtime::Runtime>>,
    agent: ureq::Agent,
}

impl Notifier {
    pub(crate) fn start() -> Result<Notifier, Error> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(64)
            .thread_name("yunqi-notify")
            .enable_time()
            .build()
            .map_err(|e| Error::internal(format!("start the notification runtime: {e}")))?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(POST_TIMEOUT))
            .max_redirects(0)
            .http_status_as_error(false)
            .user_agent(concat!("yunqi/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Notifier {
            rt: Mutex::new(Some(rt)),
            agent,
        })
    }

    pub(crate) fn spawn(&self, subs: Arc<Subscriptions>, sub: Arc<Sub>) {
        if let Some(rt) = self.rt.lock().expect("notifier lock").as_ref() {
            rt.spawn(deliver(subs, sub));
        }
    }

    pub(crate) fn shutdown(&self) {
        if let Some(rt) = self.rt.lock().expect("notifier lock").take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Notifier {
    /// Dropping a runtime blocks, which is not allowed inside another runtime (a server that
    /// fails to start drops Sense from its async start-up).
    fn drop(&mut self) {
        if let Ok(mut rt) = self.rt.lock()
            && let Some(rt) = rt.take()
        {
            rt.shutdown_background();
        }
    }
}

fn backoff(failures: u32) -> Duration {
    let d = Duration::from_millis(500).saturating_mul(1u32 << failures.saturating_sub(1).min(10));
    d.min(BACKOFF_MAX)
}

/// Sleeps for `d` unless the subscription is stopped first; false when stopped.
async fn pause(sub: &Sub, d: Duration) -> bool {
    let until = tokio::time::Instant::now() + d;
    while !sub.stop.load(Ordering::Acquire) {
        let now = tokio::time::Instant::now();
        if now >= until {
            return true;
        }
        let step = (until - now).min(Duration::from_millis(200));
        tokio::time::sleep(step).await;
    }
    false
}

async fn deliver(subs: Arc<Subscriptions>, sub: Arc<Sub>) {
    let mut last_sent: Option<Instant> = None;
    let mut failures = 0u32;
    loop {
        // Wait for something to send.
        loop {
            if sub.stop.load(Ordering::Acquire) {
                return;
            }
            if !sub.pending.lock().expect("pending lock").is_empty() {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(500), sub.wake.notified()).await;
        }
        let c = sub.current();
        if let (Some(t), true) = (last_sent, c.def.throttling > 0) {
            let gap = Duration::from_secs(c.def.throttling).saturating_sub(t.elapsed());
            if !pause(&sub, gap).await {
                return;
            }
        }
        if failures > 0 && !pause(&sub, backoff(failures)).await {
            return;
        }
        let c = sub.current();
        if !c.def.active || c.def.expires_at.is_some_and(|at| Utc::now() >= at) {
            sub.pending.lock().expect("pending lock").clear();
            continue;
        }
        let batch: Vec<(Box<str>, Row)> = {
            let mut pending = sub.pending.lock().expect("pending lock");
            let mut ids: Vec<Box<str>> = pending.keys().cloned().collect();
            ids.sort();
            ids.truncate(NOTIFICATION_ENTITIES_MAX);
            ids.into_iter()
                .filter_map(|id| pending.remove(&id).map(|row| (id, row)))
                .collect()
        };
        if batch.is_empty() {
            continue;
        }
        let n = subs.seq.fetch_add(1, Ordering::Relaxed);
        let ctx = CallContext {
            request_id: format!("notify-{n}"),
        };
        let object = format!("subscription:{}", c.def.id);
        // The owner's rights as they are now.
        let actor = match subs.gov.actor_of_token(&c.def.token_id) {
            Ok(a) => a,
            Err(e) => {
                let owner = subs.gov.principal_named(&c.def.owner);
                let e = e.hint("the owner resumes it with isActive: true");
                let _ = subs
                    .gov
                    .record_denial(owner.as_ref(), "subscription.notify", &object, &e, &ctx)
                    .await;
                subs.pause(&sub, e.message.clone());
                continue;
            }
        };
        let view = match subs
            .gov
            .authorize_entity_read(&actor, &c.schema.stream, &ctx)
            .await
        {
            Ok((manifest, grant)) => {
                let view = match &grant {
                    None => View::whole(&c.schema),
                    Some(g) => View::granted(&c.schema, &manifest.columns, g),
                };
                let mut cols = c.read_columns();
                cols.extend(c.attrs.iter().flatten());
                match cols.iter().find(|col| !view.sees(**col)) {
                    None => Ok((manifest.columns, view)),
                    Some(col) => Err(Error::denied(format!(
                        "the owner's grant no longer includes attribute {}",
                        c.schema.cols[*col].attr
                    ))),
                }
            }
            Err(e) => Err(e),
        };
        let (table, view) = match view {
            Ok(v) => v,
            Err(e) => {
                if e.code == yunqi_types::ErrorCode::PermissionDenied {
                    let _ = subs
                        .gov
                        .record_denial(
                            Some(&actor.principal),
                            "subscription.notify",
                            &object,
                            &e,
                            &ctx,
                        )
                        .await;
                    subs.pause(&sub, e.message.clone());
                } else {
                    failures += 1;
                    restore(&sub, batch);
                }
                continue;
            }
        };
        let key_values = c.def.format == Format::KeyValues;
        let data: Vec<Value> = batch
            .iter()
            .map(|(_, row)| {
                ngsi::render(
                    &c.schema,
                    &table,
                    row,
                    c.attrs.as_deref(),
                    key_values,
                    &view,
                )
            })
            .collect();
        let now = Utc::now();
        let mut body = json!({
            "id": format!("urn:ngsi-ld:Notification:{}:{n}", c.def.id.rsplit(':').next().unwrap_or("s")),
            "type": "Notification",
            "subscriptionId": c.def.id,
            "notifiedAt": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "data": data,
        });
        let ld = c.def.accept == "application/ld+json";
        if ld {
            body["@context"] = json!(crate::ngsi::CORE_CONTEXT);
        }
        let agent = subs.notifier.agent.clone();
        let uri = c.def.uri.clone();
        let sent = Instant::now();
        let result = tokio::task::spawn_blocking(move || post(&agent, &uri, ld, &body))
            .await
            .unwrap_or_else(|e| Err(format!("delivery task failed: {e}")));
        let ms = sent.elapsed().as_secs_f64() * 1e3;
        let count = batch.len();
        let (outcome, detail) = match &result {
            Ok(status) => (
                Outcome::Ok,
                format!(
                    "{count} entities to {}: HTTP {status} in {ms:.1} ms",
                    c.def.uri
                ),
            ),
            Err(why) => (
                Outcome::Failed,
                format!("{count} entities to {}: {why}", c.def.uri),
            ),
        };
        let _ = subs
            .gov
            .record_access(
                &actor,
                "subscription.notify",
                &object,
                outcome,
                detail,
                &ctx,
            )
            .await;
        let mut d = sub.delivery.lock().expect("delivery lock");
        d.last_notification = Some(now);
        match result {
            Ok(_) => {
                d.times_sent += 1;
                d.last_success = Some(now);
                d.failing = false;
                failures = 0;
                last_sent = Some(Instant::now());
            }
            Err(why) => {
                d.times_failed += 1;
                d.last_failure = Some(now);
                d.last_failure_reason = Some(why);
                d.failing = true;
                failures += 1;
                drop(d);
                restore(&sub, batch);
            }
        }
    }
}

/// Puts undelivered states back, unless a newer state of the entity is already pending.
fn restore(sub: &Sub, batch: Vec<(Box<str>, Row)>) {
    let mut pending = sub.pending.lock().expect("pending lock");
    for (id, row) in batch {
        pending.entry(id).or_insert(row);
    }
}

/// POSTs one notification; the status of a 2xx answer, or why it failed.
fn post(agent: &ureq::Agent, uri: &str, ld: bool, body: &Value) -> Result<u16, String> {
    let text = body.to_string();
    let mut req = agent.post(uri);
    req = if ld {
        req.header("Content-Type", "application/ld+json")
    } else {
        req.header("Content-Type", "application/json").header(
            "Link",
            format!(
                "<{}>; rel=\"http://www.w3.org/ns/json-ld#context\"; type=\"application/ld+json\"",
                crate::ngsi::CORE_CONTEXT
            ),
        )
    };
    match req.send(text.as_str()) {
        Ok(r) => {
            let status = r.status().as_u16();
            if (200..300).contains(&status) {
                Ok(status)
            } else {
                Err(format!("HTTP {status}"))
            }
        }
        Err(e) => Err(match e {
            ureq::Error::Timeout(_) => "timed out".to_string(),
            ureq::Error::Io(e) => format!("connection failed: {}", e.kind()),
            ureq::Error::ConnectionFailed => "connection failed".to_string(),
            other => other.to_string(),
        }),
    }
}
