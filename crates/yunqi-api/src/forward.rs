//! On a cluster, a request for leased work goes to the node that does it: a service's
//! requests to the node that decides it ([`yunqi_serve::Serve::route`]), a shared continuous
//! view's progress and live feed to the node that runs it ([`yunqi_sense::Sense::route_view`]);
//! a node takes the work here if nobody does it. When another node does, this layer sends the
//! request there as it came — method, path, query, headers (the caller's token among them),
//! body — and answers with that node's answer (a live feed relayed as it arrives). The node
//! that does the work authenticates, authorises and audits as for any request.
//!
//! A forwarded request carries `Yunqi-Forwarded-By`; a node that gets one for work it does not
//! do (the work moved meanwhile) answers 503 rather than forwarding again.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use yunqi_serve::{Route, Serve};
use yunqi_types::Error;

use crate::AppState;
use crate::error::ApiError;

/// The header a forwarded request carries: the forwarding node's name.
pub const FORWARDED_BY: &str = "yunqi-forwarded-by";

/// Longest a forwarded request may take (the owner's own request timeout applies within it).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);

/// Leased work a request is for.
enum Work {
    /// A service, `department.service`.
    Service(String),
    /// A continuous view, `department.view`.
    View(String),
}

/// The continuous view a request is for (its progress, its live feed), from its path.
fn view_in_path(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/api/v1/views/")?;
    let mut parts = rest.split('/');
    let (d, n) = (parts.next()?, parts.next()?);
    let tail = parts.next();
    (!d.is_empty()
        && !n.is_empty()
        && matches!(tail, None | Some("live"))
        && parts.next().is_none())
    .then(|| format!("{d}.{n}"))
}

/// The service a request is for, from its path alone.
fn service_in_path(path: &str) -> Option<String> {
    let rest = path
        .strip_prefix("/api/v1/services/")
        .or_else(|| path.strip_prefix("/api/v1/me/consents/"))?;
    let mut parts = rest.split('/');
    let (d, n) = (parts.next()?, parts.next()?);
    (!d.is_empty() && !n.is_empty()).then(|| format!("{d}.{n}"))
}

/// The service a request is for, from its path or, for the routes that name it in the body or
/// the query, from there.
fn service_of(
    serve: &Serve,
    method: &Method,
    path: &str,
    query: &str,
    body: &[u8],
) -> Option<String> {
    if let Some(s) = service_in_path(path) {
        return Some(s);
    }
    match (method, path) {
        (&Method::POST, "/api/v1/services") => std::str::from_utf8(body)
            .ok()
            .and_then(|t| yunqi_serve::definition::parse(t).ok())
            .map(|s| s.full_name()),
        (&Method::POST, "/api/v1/documents/revoke") => {
            serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("id")?.as_str().map(str::to_string))
                .and_then(|id| Serve::decision_service(&id).map(str::to_string))
        }
        (&Method::GET, "/api/v1/documents/verify") => query
            .split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .and_then(|t| serve.document_service(t)),
        _ => None,
    }
}

fn may_name_a_service(path: &str) -> bool {
    path.starts_with("/api/v1/services")
        || path.starts_with("/api/v1/me/consents/")
        || path == "/api/v1/documents/revoke"
        || path == "/api/v1/documents/verify"
}

/// The layer.
pub async fn forward(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(node) = state
        .serve
        .cluster_node()
        .or_else(|| state.sense.cluster_node().map(str::to_string))
    else {
        return next.run(req).await;
    };
    let path = req.uri().path().to_string();
    let view = (req.method() == Method::GET && state.sense.cluster_node().is_some())
        .then(|| view_in_path(&path))
        .flatten();
    let service_route = state.serve.cluster_node().is_some()
        && may_name_a_service(&path)
        && !(path == "/api/v1/services" && req.method() == Method::GET);
    if view.is_none() && !service_route {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, state.limits.request_body_bytes_max).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError {
                error: Error::invalid("the request body is larger than this server takes").detail(
                    format!(
                        "the limit request_body_bytes_max is {}",
                        state.limits.request_body_bytes_max
                    ),
                ),
                status: Some(StatusCode::PAYLOAD_TOO_LARGE),
            }
            .into_response();
        }
    };
    // Only a signed-in caller moves a service between nodes (the public document check
    // aside); anyone else is answered here, 401 and audited, by the route's own extractor.
    let public = path == "/api/v1/documents/verify";
    if !public && !signed_in(&state, &parts.headers).await {
        return next
            .run(Request::from_parts(parts, Body::from(bytes)))
            .await;
    }
    let query = parts.uri.query().unwrap_or("").to_string();
    let work = match view {
        Some(v) => Work::View(v),
        None => match service_of(&state.serve, &parts.method, &path, &query, &bytes) {
            Some(s) => Work::Service(s),
            None => {
                return next
                    .run(Request::from_parts(parts, Body::from(bytes)))
                    .await;
            }
        },
    };
    let how = match (&work, path.ends_with("/live")) {
        (Work::View(_), true) => Relay::Live,
        (Work::View(_), false) => Relay::Quick,
        (Work::Service(_), _) => Relay::Whole,
    };
    let (serve, sense) = (state.serve.clone(), state.sense.clone());
    let route = tokio::task::spawn_blocking(move || match work {
        Work::Service(service) => serve.route(&service),
        Work::View(view) => sense.route_view(&view),
    })
    .await;
    let route = match route {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return ApiError::from(e).into_response(),
        Err(_) => {
            return ApiError::from(Error::internal("routing the request failed")).into_response();
        }
    };
    let (owner, url) = match route {
        Route::Here => {
            return next
                .run(Request::from_parts(parts, Body::from(bytes)))
                .await;
        }
        Route::At { node, url } => (node, url),
    };
    if parts.headers.contains_key(FORWARDED_BY) {
        return ApiError::from(
            Error::unavailable("this work is moving between the cluster's nodes")
                .hint("retry in a second"),
        )
        .into_response();
    }
    let target = format!(
        "{url}{}",
        parts
            .uri
            .path_and_query()
            .map_or(path.as_str(), |p| p.as_str())
    );
    let mut out = axum::http::Request::builder()
        .method(parts.method.clone())
        .uri(&target);
    for (k, v) in &parts.headers {
        if !is_hop_by_hop(k) {
            out = out.header(k, v);
        }
    }
    out = out.header(FORWARDED_BY, node.as_str());
    let Ok(out) = out.body(bytes.to_vec()) else {
        return ApiError::from(Error::invalid("the request cannot be forwarded")).into_response();
    };
    let limit = state.limits.request_body_bytes_max.max(64 << 20) as u64;
    let sent = tokio::task::spawn_blocking(move || send(out, limit, how)).await;
    match sent {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::warn!(node = %owner, error = %e, "forwarding to the node doing the work failed");
            ApiError::from(
                Error::unavailable("the node that does this work did not answer")
                .hint("retry shortly: if that node is gone, another takes the work over within seconds"),
            )
            .into_response()
        }
        Err(_) => ApiError::from(Error::internal("forwarding the request failed")).into_response(),
    }
}

/// Whether the request's bearer token authenticates (on this node, caught up with the store).
async fn signed_in(state: &AppState, headers: &axum::http::HeaderMap) -> bool {
    let Some(token) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
    else {
        return false;
    };
    state.gov.authenticate_current(token).await.is_ok()
}

fn is_hop_by_hop(k: &HeaderName) -> bool {
    matches!(
        k.as_str(),
        "host" | "connection" | "content-length" | "transfer-encoding" | "keep-alive" | "upgrade"
    ) || k.as_str() == FORWARDED_BY
}

/// Longest wait for a view's progress from the node running it (answered from its memory;
/// a node that takes longer is stalled, and its lease about to pass to another).
const QUICK_TIMEOUT: Duration = Duration::from_secs(3);

/// How a forwarded request's answer comes back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Relay {
    /// Whole, within [`FORWARD_TIMEOUT`].
    Whole = 0,
    /// Whole, within [`QUICK_TIMEOUT`] (a view's progress).
    Quick = 1,
    /// As it arrives, for as long as both sides listen (a live feed): only connecting and the
    /// answer's start are limited.
    Live = 2,
}

/// The HTTP client for answers relayed `how`.
fn agent(how: Relay) -> &'static ureq::Agent {
    static AGENTS: [std::sync::OnceLock<ureq::Agent>; 3] =
        [const { std::sync::OnceLock::new() }; 3];
    AGENTS[how as usize].get_or_init(|| {
        let config = ureq::Agent::config_builder()
            .max_redirects(0)
            .http_status_as_error(false);
        match how {
            Relay::Whole => config.timeout_global(Some(FORWARD_TIMEOUT)),
            Relay::Quick => config.timeout_global(Some(QUICK_TIMEOUT)),
            Relay::Live => config
                .timeout_connect(Some(Duration::from_secs(5)))
                .timeout_recv_response(Some(Duration::from_secs(30))),
        }
        .build()
        .into()
    })
}

/// Asks the node at `url` for `path` (a GET) on behalf of the caller whose `authorization`
/// header is given, as a forwarded request; its JSON answer when it is a 200.
pub(crate) fn fetch_json(
    url: &str,
    path: &str,
    authorization: Option<&axum::http::HeaderValue>,
    node: &str,
) -> Result<serde_json::Value, String> {
    let mut req = axum::http::Request::builder()
        .method(Method::GET)
        .uri(format!("{url}{path}"))
        .header(FORWARDED_BY, node);
    if let Some(a) = authorization {
        req = req.header(axum::http::header::AUTHORIZATION, a);
    }
    let req = req.body(Vec::new()).map_err(|e| e.to_string())?;
    let r = agent(Relay::Quick).run(req).map_err(|e| e.to_string())?;
    if r.status() != StatusCode::OK {
        return Err(format!("answered {}", r.status()));
    }
    let (_, mut body) = r.into_parts();
    let bytes = body
        .with_config()
        .limit(4 << 20)
        .read_to_vec()
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

/// Largest piece of a live feed relayed at once.
const LIVE_CHUNK: usize = 64 << 10;

/// Sends `req` to the node doing the work; its answer whole, or (a live feed) relayed as it
/// arrives, until either side closes.
fn send(req: axum::http::Request<Vec<u8>>, limit: u64, how: Relay) -> Result<Response, String> {
    let r = agent(how).run(req).map_err(|e| e.to_string())?;
    let (parts, mut body) = r.into_parts();
    let mut resp = Response::builder().status(parts.status);
    for (k, v) in &parts.headers {
        if !is_hop_by_hop(k) {
            resp = resp.header(k, v);
        }
    }
    if how == Relay::Live {
        let mut reader = body.into_reader();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(16);
        std::thread::Builder::new()
            .name("yunqi-live-relay".into())
            .spawn(move || {
                let mut buf = vec![0u8; LIVE_CHUNK];
                loop {
                    match std::io::Read::read(&mut reader, &mut buf) {
                        Ok(0) => return,
                        Ok(n) => {
                            let chunk = axum::body::Bytes::copy_from_slice(&buf[..n]);
                            if tx.blocking_send(Ok(chunk)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.blocking_send(Err(e));
                            return;
                        }
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        return resp
            .body(Body::from_stream(stream))
            .map_err(|e| e.to_string());
    }
    let bytes = body
        .with_config()
        .limit(limit)
        .read_to_vec()
        .map_err(|e| e.to_string())?;
    resp.body(Body::from(bytes)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_are_found_in_paths() {
        assert_eq!(
            service_in_path("/api/v1/services/traffic/urgent-entry-permit/applications"),
            Some("traffic.urgent-entry-permit".into())
        );
        assert_eq!(
            service_in_path("/api/v1/me/consents/health/credit-care"),
            Some("health.credit-care".into())
        );
        assert_eq!(service_in_path("/api/v1/services"), None);
        assert_eq!(service_in_path("/api/v1/services/traffic"), None);
        assert_eq!(service_in_path("/api/v1/services/traffic/"), None);
    }

    #[test]
    fn views_are_found_in_paths() {
        assert_eq!(
            view_in_path("/api/v1/views/traffic/flow_1m"),
            Some("traffic.flow_1m".into())
        );
        assert_eq!(
            view_in_path("/api/v1/views/traffic/flow_1m/live"),
            Some("traffic.flow_1m".into())
        );
        assert_eq!(view_in_path("/api/v1/views"), None);
        assert_eq!(view_in_path("/api/v1/views/traffic"), None);
        assert_eq!(view_in_path("/api/v1/views/traffic/flow_1m/other"), None);
        assert_eq!(view_in_path("/api/v1/views/traffic/flow_1m/live/x"), None);
    }
}
