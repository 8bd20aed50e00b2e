//! The admin listener: `/healthz`, `/readyz`, `/metrics`.
//!
//! `/healthz` answers 200 while the process serves. `/readyz` answers 200
//! only while every token source a route uses holds a valid token, 503 with
//! the reason otherwise; either way its JSON has the state of each route
//! and each source, and says whether the newest refresh tokens are on disk
//! (`refresh_token_persisted`, and `persist_error` while one is not).
//! `/metrics` is Prometheus text from the `metrics` recorder.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::{metric_names, sink::SinkProbe, sources::TokenSources};

/// Installs the process-wide Prometheus recorder and returns its handle.
/// Call once, at start.
pub(crate) fn install_metrics_recorder() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("duration_seconds".to_owned()),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ],
        )
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
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
    metrics: Option<PrometheusHandle>,
}

/// The admin router.
pub(crate) fn router(
    sources: TokenSources,
    users: SourceUsers,
    sinks: Vec<SinkProbe>,
    metrics: Option<PrometheusHandle>,
) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AdminState {
            sources,
            users: Arc::new(users),
            sinks,
            metrics,
        })
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
    let anyone_uses = state.sources.iter().any(|s| state.users.uses(&s.name));
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
                let why = unavailable(cache);
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
            let ready = valid_by_name
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

/// Why `cache` holds no valid token: a remembered failure, or none yet.
fn unavailable(cache: &crate::cache::TokenCache) -> serde_json::Map<String, serde_json::Value> {
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
