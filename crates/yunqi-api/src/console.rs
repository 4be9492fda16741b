//! The console: a single-page web app served by the binary (no separate server, no build
//! step), and the QR codes of documents it shows.
//!
//! The page talks to the same HTTP API as every other client, with the token the user logs in
//! with, so what it shows is exactly what that principal's role and grants allow. Its files
//! are compiled into the binary; a strict Content-Security-Policy allows only them.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::AppState;

const INDEX: &str = include_str!("../console/index.html");
const APP_JS: &str = include_str!("../console/app.js");
const APP_CSS: &str = include_str!("../console/app.css");
/// Apache ECharts 6.1.0 (the "common" build: line, bar, pie and their components), from npm;
/// Apache License 2.0 (`console/vendor/ECHARTS-LICENSE`).
const ECHARTS: &str = include_str!("../console/vendor/echarts.common.min.js");

const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `GET /` and `GET /console`: the console.
pub async fn index() -> Response {
    asset(INDEX, "text/html; charset=utf-8")
}

/// `GET /favicon.ico`: none (browsers ask for it).
pub async fn favicon() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// `GET /console/app.js`.
pub async fn app_js() -> Response {
    asset(APP_JS, "text/javascript; charset=utf-8")
}

/// `GET /console/echarts.js`: the charting library.
pub async fn echarts() -> Response {
    let mut r = asset(ECHARTS, "text/javascript; charset=utf-8");
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=86400"),
    );
    r
}

/// `GET /console/app.css`.
pub async fn app_css() -> Response {
    asset(APP_CSS, "text/css; charset=utf-8")
}

/// The token whose QR code is asked for.
#[derive(Debug, serde::Deserialize)]
pub struct QrParams {
    /// A document's token.
    pub token: String,
}

/// `GET /api/v1/documents/qr?token=…` (no login): an SVG QR code of the document's online
/// verification link, for the holder to show. Only tokens this server signed are drawn.
pub async fn qr(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    crate::extract::Query(p): crate::extract::Query<QrParams>,
) -> Result<Response, crate::error::ApiError> {
    if state.serve.verify(&p.token).status == "invalid" {
        return Err(
            yunqi_types::Error::invalid("not a document this city issued")
                .hint("draw the QR code of a token from a decision's document")
                .into(),
        );
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        })
        .unwrap_or("localhost");
    let link = format!("http://{host}/api/v1/documents/verify?token={}", p.token);
    let code = qrcode::QrCode::with_error_correction_level(link.as_bytes(), qrcode::EcLevel::L)
        .map_err(|e| {
            yunqi_types::Error::invalid(format!("the token does not fit a QR code: {e}"))
        })?;
    let svg = code
        .render::<qrcode::render::svg::Color<'_>>()
        .min_dimensions(240, 240)
        .quiet_zone(true)
        .build();
    let mut r = (StatusCode::OK, svg).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("image/svg+xml"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=3600"),
    );
    Ok(r)
}
