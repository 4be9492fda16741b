//! yunqi's HTTP API: `/api/v1/…` (JSON), `/healthz`, `/metrics`, and the OpenAPI document at
//! `/api/v1/openapi.json`, generated from the handlers' annotations.
//!
//! API boundary: this is the only crate that knows HTTP and JSON. It parses wire types into
//! domain values (rejecting bad input with errors that say what to do), calls governance, and
//! maps domain errors to one status per error code.
#![deny(missing_docs)]

pub mod console;
pub mod error;
pub mod extract;
pub mod forward;
pub mod handlers;
pub mod metrics;
pub mod ngsi;
pub mod services;
pub mod streams;
pub mod wire;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};
use utoipa::OpenApi;
use yunqi_governance::Governance;
use yunqi_types::{Error, Limits};

use crate::error::{ApiError, PendingError, error_body};
use crate::extract::RequestInfo;

/// Everything a handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// Governance: authentication, policy, identity operations, audit.
    pub gov: Arc<Governance>,
    /// Limits.
    pub limits: Arc<Limits>,
    /// The governed SQL engine.
    pub sql: Arc<yunqi_sql::SqlEngine>,
    /// Streams and continuous views.
    pub sense: Arc<yunqi_sense::Sense>,
    /// Citizen services.
    pub serve: Arc<yunqi_serve::Serve>,
    /// HTTP metrics.
    pub metrics: Arc<metrics::Metrics>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    /// New state.
    pub fn new(
        gov: Arc<Governance>,
        sql: Arc<yunqi_sql::SqlEngine>,
        sense: Arc<yunqi_sense::Sense>,
        serve: Arc<yunqi_serve::Serve>,
        limits: Limits,
    ) -> Self {
        AppState {
            sql,
            sense,
            serve,
            in_flight: Arc::new(tokio::sync::Semaphore::new(limits.requests_in_flight_max)),
            gov,
            limits: Arc::new(limits),
            metrics: Arc::new(metrics::Metrics::default()),
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "yunqi API", description = "The HTTP API of yunqi, a government cloud platform for a city. Every call but /healthz and /metrics needs `Authorization: Bearer TOKEN`. Errors are {\"error\": {\"code\", \"message\", \"detail\", \"hint\", \"request_id\"}}."),
    paths(
        handlers::healthz, handlers::metrics, handlers::openapi, handlers::whoami,
        handlers::create_department, handlers::list_departments, handlers::get_department,
        handlers::create_principal, handlers::list_principals, handlers::get_principal,
        handlers::create_token, handlers::list_tokens, handlers::revoke_token,
        handlers::audit, handlers::sql,
        handlers::create_dataset, handlers::list_datasets, handlers::get_dataset,
        handlers::import_dataset, handlers::set_class,
        handlers::request_grant, handlers::list_grants, handlers::get_grant,
        handlers::approve_grant, handlers::refuse_grant, handlers::revoke_grant,
        handlers::set_subject, handlers::my_accesses, handlers::add_column, handlers::set_tags, handlers::derive,
        streams::create_stream, streams::list_streams, streams::get_stream, streams::append_events,
        streams::list_views, streams::get_view, streams::live,
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "identity", description = "Departments, principals and tokens"),
        (name = "audit", description = "The audit chain"),
        (name = "sql", description = "Governed SQL over what the caller may see"),
        (name = "datasets", description = "Datasets, imports and the catalog"),
        (name = "streams", description = "Event streams and continuous views (the city brain)"),
        (name = "grants", description = "Requests for other departments' data and their decisions"),
        (name = "operations", description = "Health, metrics, this document"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document, generated from the handlers.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
}

/// The router with every route and the request middleware.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/healthz", get(handlers::healthz))
        .route("/metrics", get(handlers::metrics))
        .route("/api/v1/openapi.json", get(handlers::openapi))
        .route("/api/v1/whoami", get(handlers::whoami))
        .route(
            "/api/v1/departments",
            get(handlers::list_departments).post(handlers::create_department),
        )
        .route("/api/v1/departments/{name}", get(handlers::get_department))
        .route(
            "/api/v1/principals",
            get(handlers::list_principals).post(handlers::create_principal),
        )
        .route("/api/v1/principals/{name}", get(handlers::get_principal))
        .route(
            "/api/v1/principals/{name}/tokens",
            post(handlers::create_token),
        )
        .route("/api/v1/tokens", get(handlers::list_tokens))
        .route("/api/v1/tokens/{id}/revoke", post(handlers::revoke_token))
        .route("/api/v1/audit", get(handlers::audit))
        .route("/api/v1/sql", post(handlers::sql))
        .route(
            "/api/v1/grants",
            get(handlers::list_grants).post(handlers::request_grant),
        )
        .route("/api/v1/grants/{id}", get(handlers::get_grant))
        .route("/api/v1/me/accesses", get(handlers::my_accesses))
        .route(
            "/api/v1/datasets/{department}/{name}/subject",
            post(handlers::set_subject),
        )
        .route(
            "/api/v1/datasets/{department}/{name}/columns",
            post(handlers::add_column),
        )
        .route(
            "/api/v1/datasets/{department}/{name}/tags",
            post(handlers::set_tags),
        )
        .route(
            "/api/v1/datasets/{department}/{name}/derive",
            post(handlers::derive),
        )
        .route("/api/v1/grants/{id}/approve", post(handlers::approve_grant))
        .route("/api/v1/grants/{id}/refuse", post(handlers::refuse_grant))
        .route("/api/v1/grants/{id}/revoke", post(handlers::revoke_grant))
        .route(
            "/api/v1/datasets",
            get(handlers::list_datasets).post(handlers::create_dataset),
        )
        .route(
            "/api/v1/datasets/{department}/{name}",
            get(handlers::get_dataset),
        )
        .route(
            "/api/v1/datasets/{department}/{name}/import",
            post(handlers::import_dataset)
                .layer(DefaultBodyLimit::max(state.limits.import_bytes_max)),
        )
        .route(
            "/api/v1/datasets/{department}/{name}/columns/{column}/class",
            post(handlers::set_class),
        )
        .route(
            "/api/v1/streams",
            get(streams::list_streams).post(streams::create_stream),
        )
        .route(
            "/api/v1/streams/{department}/{name}",
            get(streams::get_stream),
        )
        .route(
            "/api/v1/streams/{department}/{name}/events",
            post(streams::append_events)
                .layer(DefaultBodyLimit::max(state.limits.import_bytes_max)),
        )
        .route("/api/v1/views", get(streams::list_views))
        .route("/api/v1/views/{department}/{name}", get(streams::get_view))
        .route("/api/v1/views/{department}/{name}/live", get(streams::live))
        .route(
            "/ngsi-ld/v1/entities",
            get(ngsi::query_entities).post(ngsi::create_entity),
        )
        .route(
            "/ngsi-ld/v1/entities/{id}",
            get(ngsi::get_entity).delete(ngsi::delete_entity),
        )
        .route(
            "/ngsi-ld/v1/entityOperations/delete",
            post(ngsi::batch_delete).layer(DefaultBodyLimit::max(ENTITY_BATCH_BYTES_MAX)),
        )
        .route("/ngsi-ld/v1/entities/{id}/attrs", patch(ngsi::patch_attrs))
        .route(
            "/ngsi-ld/v1/entities/{id}/attrs/{attr}",
            axum::routing::delete(ngsi::delete_attr),
        )
        .route(
            "/ngsi-ld/v1/entityOperations/create",
            post(ngsi::batch_create).layer(DefaultBodyLimit::max(ENTITY_BATCH_BYTES_MAX)),
        )
        .route(
            "/ngsi-ld/v1/entityOperations/upsert",
            post(ngsi::batch_upsert).layer(DefaultBodyLimit::max(ENTITY_BATCH_BYTES_MAX)),
        )
        .route("/ngsi-ld/v1/types", get(ngsi::types))
        .route(
            "/ngsi-ld/v1/subscriptions",
            get(ngsi::list_subscriptions).post(ngsi::create_subscription),
        )
        .route(
            "/ngsi-ld/v1/subscriptions/{id}",
            get(ngsi::get_subscription)
                .patch(ngsi::patch_subscription)
                .delete(ngsi::delete_subscription),
        )
        .route(
            "/ngsi-ld/v1/temporal/entities",
            get(ngsi::temporal_entities),
        )
        .route(
            "/ngsi-ld/v1/temporal/entities/{id}",
            get(ngsi::temporal_entity),
        )
        .route(
            "/api/v1/services",
            get(services::list).post(services::apply),
        )
        .route("/api/v1/services/{department}/{name}", get(services::get))
        .route("/api/v1/documents/public-key", get(services::public_key))
        .route("/api/v1/documents/verify", get(services::verify))
        .route("/api/v1/documents/qr", get(console::qr))
        .route("/", get(console::index))
        .route("/console", get(console::index))
        .route("/favicon.ico", get(console::favicon))
        .route("/console/app.js", get(console::app_js))
        .route("/console/app.css", get(console::app_css))
        .route("/console/echarts.js", get(console::echarts))
        .route("/api/v1/documents/revoke", post(services::revoke))
        .route(
            "/api/v1/services/{department}/{name}/applications",
            get(services::my_applications).post(services::apply_for),
        )
        .route(
            "/api/v1/services/{department}/{name}/applications/{number}",
            get(services::application),
        )
        .route(
            "/api/v1/services/{department}/{name}/applications/{number}/{act}",
            post(services::act),
        )
        .route(
            "/api/v1/services/{department}/{name}/reviews",
            get(services::reviews),
        )
        .route("/api/v1/me/consents", get(services::my_consents))
        .route(
            "/api/v1/me/consents/{department}/{name}",
            put(services::give_consent).delete(services::withdraw_consent),
        )
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed);
    api.layer(DefaultBodyLimit::max(state.limits.request_body_bytes_max))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            forward::forward,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            request_middleware,
        ))
        .with_state(state)
}

/// Largest body of an NGSI-LD batch operation (up to 10,000 entities).
const ENTITY_BATCH_BYTES_MAX: usize = 32 << 20;

fn new_request_id() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    hex::encode(b)
}

/// Per request: an id, the in-flight limit, the time limit, error bodies, metrics and one log
/// line.
async fn request_middleware(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let info = RequestInfo {
        id: new_request_id(),
        principal: Arc::new(OnceLock::new()),
    };
    req.extensions_mut().insert(info.clone());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());

    // NGSI-LD: the representations a client may ask for and send, checked before routing.
    let mut wants = ngsi::Wants::Json;
    if path.starts_with("/ngsi-ld/") {
        let h = req.headers();
        let accept = h
            .get(axum::http::header::ACCEPT)
            .and_then(|v| v.to_str().ok());
        match ngsi::negotiate(accept) {
            Some(w) => wants = w,
            None => {
                return ngsi::refused(
                    StatusCode::NOT_ACCEPTABLE,
                    "not acceptable",
                    format!(
                        "Accept: {} names neither application/json nor application/ld+json",
                        accept.unwrap_or("")
                    ),
                    &info.id,
                );
            }
        }
        let ct = h
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let has_body = matches!(
            method,
            axum::http::Method::POST | axum::http::Method::PATCH | axum::http::Method::PUT
        );
        if has_body && !ngsi::content_type_ok(ct) {
            return ngsi::refused(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported media type",
                format!(
                    "Content-Type {} is not application/json or application/ld+json",
                    ct.unwrap_or("")
                ),
                &info.id,
            );
        }
    }

    let mut response = match state.in_flight.clone().try_acquire_owned() {
        Err(_) => ApiError::from(
            Error::unavailable("too many requests in flight")
                .detail(format!(
                    "the limit requests_in_flight_max is {}",
                    state.limits.requests_in_flight_max
                ))
                .hint("retry after a short wait"),
        )
        .into_response(),
        Ok(_permit) => {
            let timeout = Duration::from_millis(state.limits.request_timeout_ms);
            match tokio::time::timeout(timeout, next.run(req)).await {
                Ok(r) => r,
                Err(_) => ApiError::from(
                    Error::unavailable("request took too long")
                        .detail(format!(
                            "the limit request_timeout_ms is {}",
                            state.limits.request_timeout_ms
                        ))
                        .hint("retry; if it keeps happening, narrow the request"),
                )
                .into_response(),
            }
        }
    };

    let error_code = match response.extensions_mut().remove::<PendingError>() {
        Some(PendingError(error)) => {
            let status = response.status();
            let headers = std::mem::take(response.headers_mut());
            let body = if path.starts_with("/ngsi-ld/") {
                ngsi::problem_body(&error, &info.id)
            } else {
                error_body(&error, &info.id)
            };
            let mut rendered = (status, axum::Json(body)).into_response();
            for (k, v) in headers.iter() {
                if k != axum::http::header::CONTENT_LENGTH && k != axum::http::header::CONTENT_TYPE
                {
                    rendered.headers_mut().insert(k.clone(), v.clone());
                }
            }
            if status == StatusCode::INTERNAL_SERVER_ERROR {
                tracing::error!(request_id = %info.id, error = %error.message, detail = ?error.detail, "internal error");
            }
            response = rendered;
            Some(error.code.as_str())
        }
        None => None,
    };
    if wants == ngsi::Wants::JsonLd {
        response = ngsi::as_json_ld(response).await;
    }
    if let Ok(v) = HeaderValue::from_str(&info.id) {
        response.headers_mut().insert("x-request-id", v);
    }
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    state.metrics.record(
        method.as_str(),
        &route,
        status,
        elapsed.as_secs_f64(),
        error_code,
    );
    tracing::info!(
        target: "yunqi::http",
        request_id = %info.id,
        method = %method,
        path = %path,
        status,
        latency_ms = elapsed.as_secs_f64() * 1e3,
        principal = info.principal.get().map(String::as_str).unwrap_or(""),
        error = error_code.unwrap_or(""),
        "request"
    );
    response
}

/// Serves `router` on `listener` until `shutdown` resolves; in-flight requests finish first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::ServiceExt;
    use tower::Layer;
    // Paths are normalised before routing, so that every route of the subtree sees them.
    let app = tower::util::MapRequestLayer::new(ngsi_without_trailing_slash).layer(router);
    axum::serve(listener, app.into_make_service())
        .with_graceful_shutdown(shutdown)
        .await
}

/// NGSI-LD clients send `/ngsi-ld/v1/entities/` and `/ngsi-ld/v1/entityOperations/upsert/`;
/// brokers answer both forms (ETSI GS CIM 009 does not distinguish them), so the trailing
/// slash is taken off every path under `/ngsi-ld/` before it is routed.
fn ngsi_without_trailing_slash(mut req: axum::extract::Request) -> axum::extract::Request {
    let uri = req.uri();
    let path = uri.path();
    if path.starts_with("/ngsi-ld/") && path.ends_with('/') {
        let trimmed = path.trim_end_matches('/');
        let pq = match uri.query() {
            Some(q) => format!("{trimmed}?{q}"),
            None => trimmed.to_string(),
        };
        let mut parts = uri.clone().into_parts();
        if let Ok(pq) = pq.parse() {
            parts.path_and_query = Some(pq);
            if let Ok(u) = axum::http::Uri::from_parts(parts) {
                *req.uri_mut() = u;
            }
        }
    }
    req
}

#[cfg(test)]
mod path_tests {
    #[test]
    fn ngsi_paths_lose_their_trailing_slash() {
        for (from, to) in [
            ("/ngsi-ld/v1/entities/", "/ngsi-ld/v1/entities"),
            (
                "/ngsi-ld/v1/entities/?type=T&limit=1",
                "/ngsi-ld/v1/entities?type=T&limit=1",
            ),
            (
                "/ngsi-ld/v1/entityOperations/upsert//",
                "/ngsi-ld/v1/entityOperations/upsert",
            ),
            ("/api/v1/datasets/", "/api/v1/datasets/"),
            ("/ngsi-ld/v1/types", "/ngsi-ld/v1/types"),
        ] {
            let req = axum::extract::Request::builder()
                .uri(from)
                .body(axum::body::Body::empty())
                .unwrap();
            assert_eq!(
                super::ngsi_without_trailing_slash(req).uri().to_string(),
                to
            );
        }
    }
}
