//! The admin listener: `/healthz`, `/readyz`, `/metrics`.
//!
//! `/healthz` answers 200 while the process serves. `/readyz` answers 200
//! only while a valid token is held, 503 with the reason otherwise; either
//! way its JSON says whether the newest refresh token is on disk
//! (`refresh_token_persisted`, and `persist_error` while it is not).
//! `/metrics` is Prometheus text from the `metrics` recorder.

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::{metric_names, sources::TokenSources};

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

#[derive(Clone)]
struct AdminState {
    sources: TokenSources,
    metrics: Option<PrometheusHandle>,
}

/// The admin router.
pub(crate) fn router(sources: TokenSources, metrics: Option<PrometheusHandle>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AdminState { sources, metrics })
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let cache = state.sources.default_cache();
    let (status, mut body) = match cache.current() {
        Some(token) => (
            StatusCode::OK,
            serde_json::json!({
                "status": "ready",
                "token_expires_in_seconds": token.ttl().as_secs(),
            }),
        ),
        None => {
            let reason = match cache.last_failure() {
                Some(f) => serde_json::json!({
                    "status": "not_ready",
                    "reason": "token_unavailable",
                    "kind": f.kind(),
                    "message": f.to_string(),
                    "retry_after_seconds": f.retry_after.as_secs_f64().ceil() as u64,
                }),
                None => serde_json::json!({
                    "status": "not_ready",
                    "reason": "no_token_yet",
                }),
            };
            (StatusCode::SERVICE_UNAVAILABLE, reason)
        }
    };
    // A refresh token only in memory is reported, but serving is fine:
    // readiness does not depend on it.
    if let Some(persist) = cache.persistence()
        && let Some(fields) = body.as_object_mut()
    {
        fields.insert(
            "refresh_token_persisted".to_owned(),
            persist.persisted.into(),
        );
        if let Some(reason) = persist.reason {
            fields.insert("persist_error".to_owned(), reason.into());
            fields.insert(
                "persist_failed_attempts".to_owned(),
                persist.failed_attempts.into(),
            );
        }
    }
    (status, Json(body)).into_response()
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
