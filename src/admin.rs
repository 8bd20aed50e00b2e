//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `/login`.
//!
//! `/healthz` answers 200 while the process serves. `/readyz` answers 200
//! only while every token source a route uses holds a valid token, 503 with
//! the reason otherwise; either way its JSON has the state of each route
//! and each source, and says whether the newest refresh tokens are on disk
//! (`refresh_token_persisted`, and `persist_error` while one is not).
//! `/metrics` is Prometheus text from the `metrics` recorder. `/login`
//! shows what a person must do to approve the device login of each source
//! with `device_login = true` (JSON, or a small HTML page for a browser);
//! never the device code.
//!
//! [`serve`] bounds what a client of the listener can hold, since in a pod
//! the kubelet's probes need it on an address the whole cluster network
//! can reach: at most [`MAX_CONNECTIONS`] connections (more wait in the
//! listen backlog, so the files the proxy's own connections need stay
//! free), and each request head due within the proxy's
//! `header_read_timeout`, also while a kept-alive connection waits for its
//! next request.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore, sync::watch};

use crate::{
    emulator::html_escape,
    hot_metrics::{HotRecorder, MetricsHandle},
    login::{DeviceLogin, LoginPrompt, LoginState},
    metric_names,
    sink::SinkProbe,
    sources::TokenSources,
};

/// Installs the process-wide Prometheus recorder, with the per-request
/// metrics kept per thread in front of it ([`HotRecorder`]), and returns
/// its handle. Call once, at start.
pub(crate) fn install_metrics_recorder() -> Result<MetricsHandle, String> {
    let recorder = HotRecorder::new()?;
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
    metric_names::describe_all();
    Ok(handle)
}

/// Who uses which token source: what `/readyz` reports and waits for.
#[derive(Debug, Clone, Default)]
pub(crate) struct SourceUsers {
    /// `(route, source)`, in matching order.
    pub(crate) routes: Vec<(String, String)>,
    /// The sources `[[sink]]`s write.
    pub(crate) sinks: Vec<String>,
}

impl SourceUsers {
    /// Whether `source` is used by a route or a sink.
    fn uses(&self, source: &str) -> bool {
        self.routes.iter().any(|(_, s)| s == source) || self.sinks.iter().any(|s| s == source)
    }
}

#[derive(Clone)]
struct AdminState {
    sources: TokenSources,
    users: Arc<SourceUsers>,
    sinks: Vec<SinkProbe>,
    metrics: Option<MetricsHandle>,
}

/// The admin router.
pub(crate) fn router(
    sources: TokenSources,
    users: SourceUsers,
    sinks: Vec<SinkProbe>,
    metrics: Option<MetricsHandle>,
) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/login", get(login_page))
        .with_state(AdminState {
            sources,
            users: Arc::new(users),
            sinks,
            metrics,
        })
}

/// Connections the admin listener serves at once: the kubelet's probes and
/// a scraper or two need a handful.
pub(crate) const MAX_CONNECTIONS: usize = 256;

/// Serves `app` on `listener` (HTTP/1.1) until `shutdown` turns true, then
/// lets the requests in flight finish. See the module docs for the bounds.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    header_read_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(true);
    loop {
        // A place first, so that at the cap new clients wait in the backlog.
        let place = tokio::select! {
            () = stopped(&mut shutdown) => break,
            place = Arc::clone(&places).acquire_owned() => place.expect("never closed"),
        };
        let stream = tokio::select! {
            () = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) if crate::proxy::is_connection_error(&e) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "admin listener cannot accept connections; pausing");
                    tokio::time::sleep(crate::proxy::ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let connection =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(place);
        });
    }
    graceful.shutdown().await;
}

/// Until `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

/// Ready while every source a route uses holds a valid token (every source
/// when no route names one). The JSON has each route's and each source's
/// state, and the fields of a single-source proxy at the top level: the
/// time left on the shortest-lived token in use, or why one is missing,
/// and whether every newest refresh token is on disk.
async fn readyz(State(state): State<AdminState>) -> Response {
    // Routes or sinks name what is needed (a route of an exchange source
    // needs none); with neither, every source is.
    let anyone_uses = !state.users.routes.is_empty() || !state.users.sinks.is_empty();
    let mut sources = serde_json::Map::new();
    let mut valid_by_name = Vec::new();
    let mut shortest: Option<u64> = None;
    let mut first_missing: Option<serde_json::Value> = None;
    let mut persisted = None;
    let mut persist_failure: Option<serde_json::Value> = None;
    for source in state.sources.iter() {
        let cache = &source.cache;
        let required = !anyone_uses || state.users.uses(&source.name);
        let mut fields = serde_json::Map::new();
        let current = cache.current();
        fields.insert("valid".to_owned(), current.is_some().into());
        fields.insert("used".to_owned(), required.into());
        match &current {
            Some(token) => {
                let left = token.ttl().as_secs();
                fields.insert("expires_in_seconds".to_owned(), left.into());
                if required {
                    shortest = Some(shortest.map_or(left, |s| s.min(left)));
                }
            }
            None => {
                let why = unavailable(cache, source.login.as_ref());
                if required && first_missing.is_none() {
                    let mut top = why.clone();
                    top.insert("source".to_owned(), source.name.clone().into());
                    first_missing = Some(top.into());
                }
                fields.extend(why);
            }
        }
        fields.insert("needs_login".to_owned(), cache.needs_login().into());
        if let Some(at) = cache.source().registration_expires_at() {
            let left = at.saturating_duration_since(tokio::time::Instant::now());
            fields.insert(
                "registration_expires_in_seconds".to_owned(),
                left.as_secs().into(),
            );
        }
        // A refresh token only in memory is reported, but serving is fine:
        // readiness does not depend on it.
        if let Some(persist) = cache.persistence() {
            fields.insert(
                "refresh_token_persisted".to_owned(),
                persist.persisted.into(),
            );
            persisted = Some(persisted.unwrap_or(true) && persist.persisted);
            if let Some(reason) = persist.reason {
                let failure = serde_json::json!({
                    "persist_error": reason,
                    "persist_failed_attempts": persist.failed_attempts,
                });
                if let serde_json::Value::Object(f) = &failure {
                    fields.extend(f.clone());
                }
                persist_failure.get_or_insert(failure);
            }
        }
        valid_by_name.push((source.name.as_str(), current.is_some()));
        sources.insert(source.name.clone(), fields.into());
    }
    let routes: serde_json::Map<String, serde_json::Value> = state
        .users
        .routes
        .iter()
        .map(|(route, source)| {
            // A per-caller route has no token to wait for.
            let ready = state.sources.exchange(source).is_some()
                || valid_by_name
                    .iter()
                    .any(|(name, valid)| name == source && *valid);
            (
                route.clone(),
                serde_json::json!({ "source": source, "ready": ready }),
            )
        })
        .collect();

    let (status, mut body) = match first_missing {
        None => (
            StatusCode::OK,
            serde_json::json!({
                "status": "ready",
                "token_expires_in_seconds": shortest.unwrap_or(0),
            }),
        ),
        Some(serde_json::Value::Object(why)) => {
            let mut body = serde_json::Map::new();
            body.insert("status".to_owned(), "not_ready".into());
            body.extend(why);
            (StatusCode::SERVICE_UNAVAILABLE, body.into())
        }
        Some(_) => unreachable!("built as an object above"),
    };
    if let Some(fields) = body.as_object_mut() {
        if let Some(persisted) = persisted {
            fields.insert("refresh_token_persisted".to_owned(), persisted.into());
        }
        if let Some(serde_json::Value::Object(failure)) = persist_failure {
            fields.extend(failure);
        }
        fields.insert("routes".to_owned(), routes.into());
        fields.insert("sources".to_owned(), sources.into());
    }
    // An app that reads a sink file starts once the file holds a token.
    let (status, body) = with_sinks(status, body, &state.sinks);
    (status, Json(body)).into_response()
}

/// Why `cache` holds no valid token: a device login waiting for a person,
/// a remembered failure, or none yet.
fn unavailable(
    cache: &crate::cache::TokenCache,
    login: Option<&DeviceLogin>,
) -> serde_json::Map<String, serde_json::Value> {
    if let Some(login) = login.filter(|l| l.in_progress()) {
        let mut why = serde_json::Map::new();
        why.insert("reason".to_owned(), "login_required".into());
        why.insert("login".to_owned(), login.state().as_str().into());
        if let LoginState::Waiting { prompt, .. } = login.state() {
            why.extend(prompt_fields(&prompt));
        }
        return why;
    }
    let why = match cache.last_failure() {
        Some(f) => serde_json::json!({
            "reason": "token_unavailable",
            "kind": f.kind(),
            "message": f.to_string(),
            "retry_after_seconds": f.retry_after.as_secs_f64().ceil() as u64,
        }),
        None => serde_json::json!({ "reason": "no_token_yet" }),
    };
    match why {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    }
}

/// Adds each sink's state to a `/readyz` body; not ready while a sink
/// holds no valid token.
fn with_sinks(
    status: StatusCode,
    mut body: serde_json::Value,
    sinks: &[SinkProbe],
) -> (StatusCode, serde_json::Value) {
    if sinks.is_empty() {
        return (status, body);
    }
    let mut all_written = true;
    let states: Vec<serde_json::Value> = sinks
        .iter()
        .map(|sink| {
            let s = sink.status();
            let written = s.holds_valid_token();
            all_written &= written;
            let mut state = serde_json::json!({
                "path": sink.config().path.display().to_string(),
                "source": sink.config().source,
                "written": written,
            });
            if let Some(e) = s.error {
                state["error"] = e.into();
            }
            state
        })
        .collect();
    let Some(fields) = body.as_object_mut() else {
        return (status, body);
    };
    fields.insert("sinks".to_owned(), states.into());
    if status == StatusCode::OK && !all_written {
        fields.insert("status".to_owned(), "not_ready".into());
        fields.insert("reason".to_owned(), "sink_not_written".into());
        return (StatusCode::SERVICE_UNAVAILABLE, body);
    }
    (status, body)
}

/// What `/login` and `/readyz` show of a prompt (never the device code).
fn prompt_fields(prompt: &LoginPrompt) -> serde_json::Map<String, serde_json::Value> {
    let mut fields = serde_json::Map::new();
    fields.insert(
        "verification_uri".to_owned(),
        prompt.verification_uri.clone().into(),
    );
    if let Some(complete) = &prompt.verification_uri_complete {
        fields.insert(
            "verification_uri_complete".to_owned(),
            complete.clone().into(),
        );
    }
    fields.insert("user_code".to_owned(), prompt.user_code.clone().into());
    fields.insert(
        "expires_in_seconds".to_owned(),
        prompt.expires_in_seconds().into(),
    );
    fields
}

/// `GET /login`: each device-login source's state and, while one waits
/// for approval, where to approve it. JSON (`login_required` says whether
/// any waits), or HTML when the client prefers `text/html`.
async fn login_page(State(state): State<AdminState>, headers: axum::http::HeaderMap) -> Response {
    let mut sources = serde_json::Map::new();
    let mut waiting = Vec::new();
    for source in state.sources.iter() {
        let Some(login) = &source.login else {
            continue;
        };
        let login_state = login.state();
        let mut fields = serde_json::Map::new();
        fields.insert("state".to_owned(), login_state.as_str().into());
        fields.insert("valid".to_owned(), source.cache.current().is_some().into());
        if let LoginState::Waiting { prompt, here } = &login_state {
            fields.extend(prompt_fields(prompt));
            fields.insert("polled_by_this_replica".to_owned(), (*here).into());
            waiting.push((source.name.clone(), prompt.clone()));
        }
        sources.insert(source.name.clone(), fields.into());
    }
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    if wants_html {
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            login_html(&waiting, sources.len()),
        )
            .into_response();
    }
    Json(serde_json::json!({
        "login_required": !waiting.is_empty(),
        "sources": sources,
    }))
    .into_response()
}

/// The `/login` page for a browser.
fn login_html(waiting: &[(String, LoginPrompt)], configured: usize) -> String {
    let mut body = String::new();
    if configured == 0 {
        body.push_str("<p>No token source logs in by itself (device_login).</p>\n");
    } else if waiting.is_empty() {
        body.push_str("<p>No login is waiting for approval.</p>\n");
    }
    for (name, prompt) in waiting {
        let link = prompt
            .verification_uri_complete
            .as_deref()
            .unwrap_or(&prompt.verification_uri);
        body.push_str(&format!(
            "<h2>Source {}</h2>\n<p>Open <a href=\"{}\">{}</a> and confirm the code <code>{}</code> \
             (expires in {} s).</p>\n",
            html_escape(name),
            html_escape(link),
            html_escape(link),
            html_escape(&prompt.user_code),
            prompt.expires_in_seconds()
        ));
    }
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>sso-token-proxy login</title></head>\n\
         <body>\n<h1>Device login</h1>\n{body}</body></html>\n"
    )
}

async fn render_metrics(State(state): State<AdminState>) -> Response {
    let Some(handle) = &state.metrics else {
        return (StatusCode::NOT_FOUND, "metrics recorder not installed\n").into_response();
    };
    for source in state.sources.iter() {
        let cache = &source.cache;
        cache.publish_metrics();
        if let Some(persist) = cache.persistence() {
            metrics::gauge!(
                metric_names::REFRESH_TOKEN_PERSISTED.name,
                "source" => cache.name().to_owned()
            )
            .set(if persist.persisted { 1.0 } else { 0.0 });
        }
    }
    // Callers whose tokens expired since the last exchange are gone.
    for callers in state.sources.exchanges() {
        callers.publish_metrics().await;
    }
    handle.run_upkeep();
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}
