//! The admin HTTP listener every Ferry program runs: binding rules (loopback unless a
//! token is configured), the token check in constant time (bearer header, or the
//! `ferry_admin_token` cookie that `GET /login?token=…` sets for a browser), the
//! cross-site checks that protect the web panels' forms, the Prometheus text endpoint,
//! and what both programs' panels share: the page around them (a maud template, so
//! every value is escaped), the error page and the number formats. Each program adds
//! its own routes.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use maud::{DOCTYPE, Markup, PreEscaped, html};
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use subtle::ConstantTimeEq;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "the admin listener {addr} is not on loopback, so it needs a token: set admin_token_file (or --admin-token-file) or listen on 127.0.0.1"
    )]
    TokenRequired { addr: SocketAddr },
    #[error("cannot read the admin token file {path}: {source}")]
    TokenFile {
        path: String,
        source: std::io::Error,
    },
    #[error("the admin token file {path} is empty; put a long random string in it")]
    EmptyToken { path: String },
    #[error("cannot listen for admin HTTP on {addr}: {source}; pick another address with --admin")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Reads the token file (first line, trimmed) if one is configured.
pub fn load_token(path: Option<&Path>) -> Result<Option<Arc<str>>, AdminError> {
    let Some(path) = path else { return Ok(None) };
    let shown = path.display().to_string();
    let text = crate::config::read_text(path).map_err(|source| AdminError::TokenFile {
        path: shown.clone(),
        source,
    })?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(AdminError::EmptyToken { path: shown });
    }
    Ok(Some(Arc::from(token)))
}

/// Binds the admin listener, refusing a non-loopback address without a token.
pub async fn bind(
    addr: SocketAddr,
    token: &Option<Arc<str>>,
) -> Result<tokio::net::TcpListener, AdminError> {
    if !addr.ip().is_loopback() && token.is_none() {
        return Err(AdminError::TokenRequired { addr });
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })
}

/// Paths a load balancer or orchestrator probes; they reveal nothing but liveness,
/// so they answer without the token.
const OPEN_PATHS: &[&str] = &["/healthz", "/readyz"];

/// The cookie a browser carries the admin token in (a browser cannot send a bearer
/// header when following a link or submitting a form).
pub const TOKEN_COOKIE: &str = "ferry_admin_token";

/// The route that turns a token in the query string into the cookie.
pub const LOGIN_PATH: &str = "/login";

/// What the checks in front of every route need to know.
#[derive(Clone)]
struct Guard {
    token: Option<Arc<str>>,
}

/// Every request passes here before its route. In order:
///
/// 1. Probes (`/healthz`, `/readyz`) pass: they reveal nothing.
/// 2. Without a token (only possible on loopback), the `Host` header must be an IP
///    address or `localhost`. Otherwise any web page could use DNS rebinding (its own
///    host name re-pointed at 127.0.0.1) to read the API and submit the panel's
///    forms as a "same-origin" page. With a token this cannot help an attacker: the
///    browser keeps the cookie for the real host name only.
/// 3. A request that changes something (any method but GET/HEAD/OPTIONS) must come
///    from the panel itself when it comes from a browser at all (see
///    [`cross_site_refusal`]).
/// 4. With a token, the bearer header or the cookie must carry it.
async fn guard(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if OPEN_PATHS.contains(&path) {
        return next.run(request).await;
    }
    let headers = request.headers();
    if guard.token.is_none()
        && let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok())
        && !host_is_local(host)
    {
        return (
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "this admin listener has no token, so it only answers requests addressed to \
                 localhost or an IP address, not {host:?} (a guard against DNS rebinding); \
                 open it by IP address, or configure admin_token_file\n"
            ),
        )
            .into_response();
    }
    if let Err(why) = cross_site_refusal(request.method(), headers) {
        tracing::warn!("admin request {} {path} refused: {why}", request.method());
        return (StatusCode::FORBIDDEN, format!("{why}\n")).into_response();
    }
    let Some(token) = &guard.token else {
        return next.run(request).await;
    };
    // The login route checks the token it is given itself.
    if path == LOGIN_PATH || presents_token(headers, token) {
        next.run(request).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            "admin token required: send Authorization: Bearer <token>, or in a browser open \
             /login?token=<token> once\n",
        )
            .into_response()
    }
}

/// Whether the bearer header or a `ferry_admin_token` cookie carries `token`; both
/// compared in constant time.
fn presents_token(headers: &HeaderMap, token: &str) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(presented) = bearer {
        return bool::from(presented.as_bytes().ct_eq(token.as_bytes()));
    }
    // A browser may hold several cookies of that name (say, one per path); any that
    // matches will do.
    cookie_values(headers, TOKEN_COOKIE)
        .iter()
        .any(|value| bool::from(value.ct_eq(token.as_bytes())))
}

/// The (percent-decoded) values of every cookie called `name` in the `Cookie` headers.
fn cookie_values(headers: &HeaderMap, name: &str) -> Vec<Vec<u8>> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(n, _)| *n == name)
        .map(|(_, value)| percent_decode_str(value.trim_matches('"')).collect())
        .collect()
}

/// What a cookie value cannot hold as it is: everything but RFC 6265's `cookie-octet`
/// (controls, space, `"`, `,`, `;`, `\`; non-ASCII is always encoded), and `%` itself.
const NOT_COOKIE_OCTET: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'%')
    .add(b',')
    .add(b';')
    .add(b'\\');

/// Cookie values may only hold some ASCII characters (RFC 6265 `cookie-octet`); a token
/// file may hold anything, so everything else (and `%`) is percent-encoded.
fn cookie_encode(token: &str) -> String {
    utf8_percent_encode(token, NOT_COOKIE_OCTET).to_string()
}

/// True for `localhost`, `*.localhost` and IP literals, with or without a port: host
/// names an attacker cannot point at this machine by DNS rebinding.
fn host_is_local(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        // [v6]:port
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        },
    };
    let lower = name.to_ascii_lowercase();
    lower == "localhost" || lower.ends_with(".localhost") || lower.parse::<IpAddr>().is_ok()
}

/// Refuses a state-changing request that a browser sent from another site.
///
/// Why: the panels' buttons are plain HTML forms, and any web page the operator visits
/// can make the browser submit a form to `http://127.0.0.1:7843/panel/policy`
/// (cross-site request forgery); on a loopback listener without a token nothing else
/// would stop it. Browsers add `Origin` to every POST (and `Referer` unless told not
/// to), and a page cannot forge either, so the request is accepted only when that
/// header names the host the request was sent to — the panel's own page. A request
/// without either header does not come from a web page (the CLI, curl, scripts) and is
/// accepted; the token, if any, still applies to it.
fn cross_site_refusal(method: &Method, headers: &HeaderMap) -> Result<(), String> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let (name, source) = match (headers.get(header::ORIGIN), headers.get(header::REFERER)) {
        (Some(origin), _) => ("Origin", origin),
        (None, Some(referer)) => ("Referer", referer),
        (None, None) => return Ok(()),
    };
    let source = source.to_str().unwrap_or("");
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    match authority_of(source) {
        Some(authority) if !host.is_empty() && authority.eq_ignore_ascii_case(host) => Ok(()),
        _ => Err(format!(
            "cross-site request refused: its {name} header {source:?} is not this admin \
             listener ({host:?}); use the panel served by this listener"
        )),
    }
}

/// `host[:port]` of an `http(s)://host[:port][/…]` origin or URL.
fn authority_of(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    (!authority.is_empty() && !authority.contains('@')).then_some(authority)
}

/// `GET /login?token=…`: checks the token and stores it in an HttpOnly, SameSite=Strict
/// cookie, then sends the browser to the panel. SameSite=Strict keeps the browser from
/// sending it with requests that other sites start; HttpOnly keeps it from scripts.
/// It cannot be `Secure`: the admin listener speaks plain HTTP.
async fn login(
    State(guard): State<Guard>,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let see_panel = |cookie: Option<String>| {
        let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
        let headers = response.headers_mut();
        // The token was in this URL: keep it out of caches and of Referer headers.
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        if let Some(value) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
            headers.insert(header::SET_COOKIE, value);
        }
        response
    };
    let Some(token) = &guard.token else {
        // No token on this listener: nothing to remember.
        return see_panel(None);
    };
    let presented = query.get("token").map(String::as_str).unwrap_or("");
    if !bool::from(presented.as_bytes().ct_eq(token.as_bytes())) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::CACHE_CONTROL, "no-store")],
            "wrong or missing admin token: open /login?token=<the first line of the admin token file>\n",
        )
            .into_response();
    }
    see_panel(Some(format!(
        "{TOKEN_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
        cookie_encode(token)
    )))
}

/// How long a client may take to send a request's headers (and, on a kept-alive
/// connection, to start the next one). Without it a slowloris client, sending a header
/// byte now and then, holds a connection and its task forever.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Admin connections served at once; more wait in the listen backlog until one ends
/// (each ends within [`HEADER_TIMEOUT`] of going quiet), so a flood of connections
/// cannot grow the process.
pub const MAX_CONNECTIONS: usize = 256;

/// Pause after a failed accept (out of descriptors, say), so it does not spin a core.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Serves `router` on `listener` until the task is dropped, requiring `token` if set
/// and adding `GET /login` (see [`guard`] for the checks).
///
/// Connections are served by hyper directly rather than `axum::serve`, which has no
/// header timeout and no connection limit (see [`HEADER_TIMEOUT`], [`MAX_CONNECTIONS`]).
pub async fn serve(listener: tokio::net::TcpListener, router: Router, token: Option<Arc<str>>) {
    let guard_state = Guard { token };
    let router = router
        .merge(
            Router::new()
                .route(LOGIN_PATH, get(login))
                .with_state(guard_state.clone()),
        )
        .layer(middleware::from_fn_with_state(guard_state, guard));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::debug!("admin HTTP accept failed: {e}");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
            if let Err(e) = connection.await {
                tracing::debug!("admin HTTP connection ended: {e}");
            }
        });
    }
}

/// Histogram buckets every Ferry program uses for network setup times (handshakes,
/// stream setup): 1 ms to 10 s, so loopback and intercontinental paths both resolve.
pub const SETUP_SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Renders a Prometheus registry in the text exposition format.
pub fn metrics_response(registry: &prometheus::Registry) -> Response {
    let mut body = String::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode_utf8(&registry.gather(), &mut body) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response()
}

// ---------------------------------------------------------------------------------
// Web panels: plain server-rendered HTML, no external assets, no scripts. Pages are
// maud templates, which escape every value put into them; only constants of our own
// (the style sheet) go in unescaped, as `PreEscaped`.

/// The panels' one style sheet, inline (no external assets).
const PANEL_STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}\
table{border-collapse:collapse;margin:.4em 0}\
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}\
th{background:#f3f3f3}code{font-size:.9em}\
form.act{display:inline;margin:0}form.act button{margin-right:.2em}\
.err{color:#a00}.note{color:#555;font-size:.9em}\
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dd{margin:0}";

/// The whole document around a panel's `body`.
fn page(title: &str, refresh: Option<u32>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                @if let Some(seconds) = refresh {
                    meta http-equiv="refresh" content=(seconds);
                }
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
                // CSS is not HTML text: escaping would change it. It is our constant.
                style { (PreEscaped(PANEL_STYLE)) }
            }
            body { (body) }
        }
    }
}

/// A whole panel page. `refresh` reloads it every so many seconds (no JavaScript
/// needed). The headers forbid scripts, other sites' frames (clickjacking of the
/// buttons) and caching, and keep forms posting to this listener only.
pub fn html_page(status: StatusCode, title: &str, refresh: Option<u32>, body: Markup) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
                 frame-ancestors 'none'; base-uri 'none'",
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "same-origin"),
        ],
        page(title, refresh, body).into_string(),
    )
        .into_response()
}

/// A `303 See Other` back to the panel after a form was handled, so that reloading
/// the page does not submit the form again.
pub fn back_to_panel() -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response()
}

/// The fields of a panel form, or the error page for a form that did not parse
/// (`hint` says what to use instead, e.g. "the panel's buttons").
#[allow(clippy::result_large_err)]
pub fn panel_form<T>(
    form: Result<axum::extract::Form<T>, axum::extract::rejection::FormRejection>,
    hint: &str,
) -> Result<T, Response> {
    form.map(|axum::extract::Form(fields)| fields).map_err(|e| {
        panel_error(
            StatusCode::BAD_REQUEST,
            &format!("the form could not be read ({e}); use {hint}"),
        )
    })
}

/// A page saying why a form could not be handled, with a link back.
pub fn panel_error(status: StatusCode, message: &str) -> Response {
    html_page(
        status,
        "Ferry: request failed",
        None,
        html! {
            h1 { "Request failed" }
            p.err { (message) }
            p { a href="/" { "Back to the panel" } }
        },
    )
}

/// A byte count for people: `1.5 MiB (1572864 B)`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A Unix time as `YYYY-MM-DD HH:MM:SS UTC` (civil-from-days, proleptic Gregorian).
pub fn utc_time(unix_seconds: u64) -> String {
    let days = (unix_seconds / 86_400) as i64;
    let secs = unix_seconds % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// How long ago `unix_seconds` was, roughly: `3 h 12 min`.
pub fn age(unix_seconds: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let s = now.saturating_sub(unix_seconds);
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86_400 => format!("{} h {} min", s / 3600, s / 60 % 60),
        _ => format!("{} d {} h", s / 86_400, s / 3600 % 24),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn pages_escape_the_title_and_every_value_in_the_body() {
        let hostile = "<script>alert('x')</script> & \"q\"";
        let html = page(hostile, Some(5), html! { p title=(hostile) { (hostile) } }).into_string();
        assert!(
            html.starts_with("<!DOCTYPE html><html lang=\"en\">"),
            "{html}"
        );
        assert!(
            html.contains("<meta http-equiv=\"refresh\" content=\"5\">"),
            "{html}"
        );
        let escaped = "&lt;script&gt;alert('x')&lt;/script&gt; &amp; &quot;q&quot;";
        assert!(
            html.contains(&format!("<title>{escaped}</title>")),
            "{html}"
        );
        assert!(
            html.contains(&format!("<p title=\"{escaped}\">{escaped}</p>")),
            "{html}"
        );
        assert!(!html.contains("<script"), "{html}");
        assert!(!page("t", None, html! {}).into_string().contains("refresh"));
    }

    #[test]
    fn cookie_values_round_trip_any_token() {
        let every_ascii: String = (0u8..0x80).map(char::from).collect();
        for token in [
            "abc123",
            "with space;and,comma\"quote%",
            "ünïcode==",
            "back\\slash\ttab%41",
            every_ascii.as_str(),
        ] {
            let mut headers = HeaderMap::new();
            let cookie = format!("other=1; {TOKEN_COOKIE}={}; x=y", cookie_encode(token));
            headers.insert(header::COOKIE, HeaderValue::from_str(&cookie).unwrap());
            assert!(presents_token(&headers, token), "{token:?}");
            assert!(!presents_token(&headers, "something else"));
        }
        // Only what a cookie cannot hold is encoded.
        assert_eq!(
            cookie_encode("a b;c,d\"e\\f%g=h/ü"),
            "a%20b%3Bc%2Cd%22e%5Cf%25g=h/%C3%BC"
        );
        // Broken escapes are taken as they are.
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("ferry_admin_token=%zz%4"),
        );
        assert!(presents_token(&headers, "%zz%4"));
    }

    #[test]
    fn bearer_header_still_works_and_wins() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer t0k"),
        );
        assert!(presents_token(&headers, "t0k"));
        assert!(!presents_token(&headers, "other"));
        assert!(!presents_token(&HeaderMap::new(), "t0k"));
    }

    #[test]
    fn local_hosts_are_ip_literals_and_localhost() {
        for host in [
            "127.0.0.1:7843",
            "localhost:1",
            "LOCALHOST",
            "[::1]:7843",
            "10.0.0.2",
            "a.localhost:9",
        ] {
            assert!(host_is_local(host), "{host}");
        }
        for host in [
            "evil.example:7843",
            "127.0.0.1.nip.io:7843",
            "localhost.evil.example",
        ] {
            assert!(!host_is_local(host), "{host}");
        }
    }

    #[test]
    fn only_same_origin_browsers_may_change_things() {
        let headers = |pairs: &[(header::HeaderName, &'static str)]| {
            let mut h = HeaderMap::new();
            for (name, value) in pairs {
                h.insert(name.clone(), HeaderValue::from_static(value));
            }
            h
        };
        let host = (header::HOST, "127.0.0.1:7843");
        // Reading is never refused here.
        assert!(
            cross_site_refusal(
                &Method::GET,
                &headers(&[host.clone(), (header::ORIGIN, "http://evil.example")])
            )
            .is_ok()
        );
        // Not from a browser: no Origin, no Referer.
        assert!(cross_site_refusal(&Method::POST, &headers(std::slice::from_ref(&host))).is_ok());
        // The panel's own page.
        assert!(
            cross_site_refusal(
                &Method::POST,
                &headers(&[host.clone(), (header::ORIGIN, "http://127.0.0.1:7843")])
            )
            .is_ok()
        );
        assert!(
            cross_site_refusal(
                &Method::POST,
                &headers(&[
                    host.clone(),
                    (header::REFERER, "http://127.0.0.1:7843/panel")
                ])
            )
            .is_ok()
        );
        // Another site, another port, an opaque origin, a Referer elsewhere.
        for (name, value) in [
            (header::ORIGIN, "http://evil.example"),
            (header::ORIGIN, "http://127.0.0.1:7844"),
            (header::ORIGIN, "null"),
            (header::REFERER, "http://evil.example/page"),
        ] {
            let why = cross_site_refusal(&Method::POST, &headers(&[host.clone(), (name, value)]))
                .unwrap_err();
            assert!(why.contains("cross-site request refused"), "{why}");
        }
        // Origin present but no Host to compare with.
        assert!(
            cross_site_refusal(&Method::POST, &headers(&[(header::ORIGIN, "http://x")])).is_err()
        );
    }

    #[test]
    fn formats_times_and_sizes() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_time(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(human_bytes(1000), "1000 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }

    /// Sends one raw HTTP/1.1 request and returns the whole response.
    async fn request(addr: SocketAddr, text: &str) -> String {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(text.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tcp.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn listener(token: Option<&str>) -> SocketAddr {
        let token: Option<Arc<str>> = token.map(Arc::from);
        let tcp = bind("127.0.0.1:0".parse().unwrap(), &token).await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let router = Router::new()
            .route("/", get(|| async { "panel" }))
            .route("/change", axum::routing::post(|| async { "changed" }));
        tokio::spawn(serve(tcp, router, token));
        addr
    }

    fn get_request(path: &str, host: &str, extra: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n")
    }

    #[tokio::test]
    async fn token_by_header_or_by_login_cookie() {
        let addr = listener(Some("s3cret")).await;
        let host = addr.to_string();
        let r = request(addr, &get_request("/", &host, "")).await;
        assert!(
            r.starts_with("HTTP/1.1 401") && r.contains("/login?token="),
            "{r}"
        );
        let r = request(addr, &get_request("/healthz", &host, "")).await;
        assert!(r.starts_with("HTTP/1.1 404"), "probes pass the guard: {r}");
        let r = request(
            addr,
            &get_request("/", &host, "Authorization: Bearer s3cret\r\n"),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("panel"), "{r}");
        let r = request(
            addr,
            &get_request("/", &host, "Authorization: Bearer wrong\r\n"),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");

        let r = request(addr, &get_request("/login?token=wrong", &host, "")).await;
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
        let r = request(addr, &get_request("/login?token=s3cret", &host, "")).await;
        assert!(r.starts_with("HTTP/1.1 303"), "{r}");
        let lower = r.to_ascii_lowercase();
        assert!(lower.contains("location: /\r\n"), "{r}");
        assert!(
            lower.contains(
                "set-cookie: ferry_admin_token=s3cret; path=/; httponly; samesite=strict"
            ),
            "{r}"
        );
        let r = request(
            addr,
            &get_request("/", &host, "Cookie: ferry_admin_token=s3cret\r\n"),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let r = request(
            addr,
            &get_request("/", &host, "Cookie: ferry_admin_token=nope\r\n"),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    }

    #[tokio::test]
    async fn cross_site_posts_and_rebinding_are_refused() {
        let addr = listener(None).await;
        let host = addr.to_string();
        let post = |origin: &str| {
            format!(
                "POST /change HTTP/1.1\r\nHost: {host}\r\n{origin}Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
        };
        let r = request(addr, &post(&format!("Origin: http://{host}\r\n"))).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let r = request(addr, &post("")).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let r = request(addr, &post("Origin: http://evil.example\r\n")).await;
        assert!(
            r.starts_with("HTTP/1.1 403") && r.contains("cross-site"),
            "{r}"
        );
        // DNS rebinding: a page on evil.example re-pointed at 127.0.0.1 is "same-origin".
        let r = request(addr, &get_request("/", "evil.example:80", "")).await;
        assert!(
            r.starts_with("HTTP/1.1 421") && r.contains("DNS rebinding"),
            "{r}"
        );
        let r = request(
            addr,
            &get_request("/", &format!("localhost:{}", addr.port()), ""),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
}
