//! The web inspector: a browser UI to watch and drive sessions, served at
//! `/` (the sessions list) and `/sessions/{id}` (one session). Its header
//! links to the API document; `/` asked for JSON only answers an index of
//! the server's documents.
//!
//! Its files (plain HTML, CSS and JavaScript modules under
//! `crates/api/inspector/`) are compiled into the binary: nothing is built,
//! nothing is fetched from elsewhere at run time. The page talks to the same
//! `/v1` API as any client, with the owner's token from `sessionStorage` as
//! `Bearer`; no secret ever goes into a URL. Every response here carries a
//! Content-Security-Policy that allows scripts, styles and connections from
//! this origin only and no inline code, so content rendered by the page can
//! never run (the page also renders every agent and user string as text).

use axum::extract::{Path, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::error::ApiError;
use crate::AppState;

/// The page's policy: its own scripts, styles, images and API only.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The one HTML page; the script routes by path. `{{auth}}` says whether
/// the server wants a token, so the page asks for one before any request.
const SHELL: &str = include_str!("../inspector/index.html");

/// The static files under `/assets/`: name, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../inspector/app.js"),
    ),
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../inspector/api.js"),
    ),
    (
        "stream.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../inspector/stream.js"),
    ),
    (
        "list.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../inspector/list.js"),
    ),
    (
        "session.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../inspector/session.js"),
    ),
    (
        "entries.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../inspector/entries.js"),
    ),
    (
        "dom.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../inspector/dom.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../inspector/style.css"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_bytes!("../inspector/favicon.svg"),
    ),
];

/// The inspector's routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(root))
        .route("/sessions/{id}", get(shell))
        .route("/assets/{file}", get(asset))
}

/// The headers every inspector response carries.
fn hardened(mut resp: Response, content_type: &'static str) -> Response {
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        HeaderName::from_static("referrer-policy"),
        HeaderValue::from_static("no-referrer"),
    );
    // The files change with the binary; revalidating is cheap and keeps a
    // new server from running an old script.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// The inspector's page; a client that asks for JSON and not HTML at `/`
/// gets a small index pointing to the API document instead.
async fn root(state: State<AppState>, headers: axum::http::HeaderMap) -> Response {
    let accept = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if accept.contains("application/json") && !accept.contains("text/html") {
        return axum::Json(serde_json::json!({
            "name": "baton",
            "api": "/openapi.json",
            "inspector": "/",
            "health": "/healthz",
            "metrics": "/metrics",
        }))
        .into_response();
    }
    shell(state).await
}

async fn shell(State(state): State<AppState>) -> Response {
    let auth = if state.auth.requires_token() {
        "token"
    } else {
        "none"
    };
    hardened(
        SHELL.replace("{{auth}}", auth).into_response(),
        "text/html; charset=utf-8",
    )
}

async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, bytes)) => hardened(bytes.into_response(), content_type),
        None => ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: format!("no inspector file {file:?}"),
            turn_id: None,
            permission: None,
        }
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file the page loads is embedded, and none is loaded from
    /// elsewhere (the policy would block it, and the page must work offline).
    #[test]
    fn the_page_loads_only_embedded_files() {
        let mut refs = Vec::new();
        for (name, _, bytes) in ASSETS.iter().filter(|(n, _, _)| n.ends_with(".js")) {
            let text = std::str::from_utf8(bytes).unwrap_or_default();
            for line in text.lines() {
                if let Some(rest) = line.trim().strip_prefix("import ") {
                    if let Some(start) = rest.find("'./") {
                        let tail = &rest[start + 3..];
                        let end = tail.find('\'').unwrap_or(tail.len());
                        refs.push((name.to_string(), tail[..end].to_owned()));
                    }
                }
                assert!(
                    !line.contains("innerHTML") && !line.contains("insertAdjacentHTML"),
                    "{name} must render content as text: {line}"
                );
            }
        }
        for marker in ["src=\"/assets/", "href=\"/assets/"] {
            for part in SHELL.split(marker).skip(1) {
                let end = part.find('"').unwrap_or(part.len());
                refs.push(("index.html".into(), part[..end].to_owned()));
            }
        }
        assert!(refs.len() > 5, "found the references: {refs:?}");
        for (from, file) in refs {
            assert!(
                ASSETS.iter().any(|(n, _, _)| *n == file),
                "{from} loads {file}, which is not embedded"
            );
        }
        assert!(!SHELL.contains("http://") && !SHELL.contains("https://"));
        assert!(!SHELL.contains("<script>") && !SHELL.contains("style="));
    }
}
