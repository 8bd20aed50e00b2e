//! Handles to the per-request metrics, looked up once per listener and
//! route instead of on every request.
//!
//! `metrics::counter!(name, label => value)` builds a key (allocating for
//! the label) and looks it up in the recorder's registry on every call; on
//! the hot path that costs more than the increment itself. The handles here
//! are registered lazily, on first use, so a metric appears in `/metrics`
//! only once it has a value (as with the macros), and with whatever
//! recorder is installed by then.

use std::sync::{Arc, OnceLock};

use http::StatusCode;
use metrics::{Counter, Gauge, Histogram};

use crate::metric_names;

/// The `status_class` label values, by `status / 100 - 1`.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The `kind` label values of `upstream_errors_total`, as
/// `ForwardError::kind` names them.
const UPSTREAM_ERROR_KINDS: [&str; 4] = ["connect", "timeout", "queue_timeout", "other"];

/// A request answered as the client's fault; the `kind` label of
/// `sso_token_proxy_client_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClientError {
    /// `CONNECT`, a foreign absolute-form target, `*`.
    TargetRefused,
    /// A path above the base path, or an escaped slash refused.
    PathRefused,
    /// A malformed or cut-off request body.
    BadBody,
    /// A request body that did not arrive in time.
    BodyTimeout,
    /// No route takes the request (`404`).
    NoRoute,
    /// An HTTP/2 stream whose client took no response bytes for
    /// `send_timeout`, reset.
    SendTimeout,
}

const CLIENT_ERROR_KINDS: [&str; 6] = [
    "target_refused",
    "path_refused",
    "bad_body",
    "body_timeout",
    "no_route",
    "send_timeout",
];

/// Metric handles shared by every connection of one listener.
#[derive(Debug, Default)]
pub(super) struct ProxyMetrics {
    in_flight: OnceLock<Gauge>,
    client_errors: [OnceLock<Counter>; 6],
    connections: OnceLock<Gauge>,
}

impl ProxyMetrics {
    /// `sso_token_proxy_client_errors_total{kind}`.
    pub(super) fn client_errors(&self, kind: ClientError) -> &Counter {
        let i = kind as usize;
        self.client_errors[i].get_or_init(|| {
            metrics::counter!(metric_names::CLIENT_ERRORS_TOTAL.name, "kind" => CLIENT_ERROR_KINDS[i])
        })
    }

    /// `sso_token_proxy_client_connections`.
    pub(super) fn connections(&self) -> &Gauge {
        self.connections
            .get_or_init(|| metrics::gauge!(metric_names::CLIENT_CONNECTIONS.name))
    }

    /// `sso_token_proxy_requests_in_flight`.
    pub(super) fn in_flight(&self) -> &Gauge {
        self.in_flight
            .get_or_init(|| metrics::gauge!(metric_names::REQUESTS_IN_FLIGHT.name))
    }
}

/// Metric handles of one route (of one listener), with the route's name as
/// their `route` label; those of requests no route took have `route=""`.
#[derive(Debug)]
pub(super) struct RouteMetrics {
    route: Arc<str>,
    /// The listener's.
    pub(super) listener: Arc<ProxyMetrics>,
    requests: [OnceLock<Counter>; 5],
    duration: OnceLock<Histogram>,
    upstream_errors: [OnceLock<Counter>; 4],
}

impl RouteMetrics {
    pub(super) fn new(route: &str, listener: Arc<ProxyMetrics>) -> Self {
        Self {
            route: route.into(),
            listener,
            requests: Default::default(),
            duration: OnceLock::new(),
            upstream_errors: Default::default(),
        }
    }

    /// `sso_token_proxy_requests_total{route,status_class}` for `status`.
    pub(super) fn requests(&self, status: StatusCode) -> &Counter {
        let class = status_class_index(status);
        self.requests[class].get_or_init(|| {
            metrics::counter!(
                metric_names::REQUESTS_TOTAL.name,
                "route" => Arc::clone(&self.route),
                "status_class" => STATUS_CLASSES[class]
            )
        })
    }

    /// `sso_token_proxy_request_duration_seconds{route}`.
    pub(super) fn duration(&self) -> &Histogram {
        self.duration.get_or_init(|| {
            metrics::histogram!(
                metric_names::REQUEST_DURATION_SECONDS.name,
                "route" => Arc::clone(&self.route)
            )
        })
    }

    /// `sso_token_proxy_upstream_errors_total{route,kind}`.
    pub(super) fn upstream_errors(&self, kind: &'static str) -> Option<&Counter> {
        let i = UPSTREAM_ERROR_KINDS.iter().position(|k| *k == kind)?;
        Some(self.upstream_errors[i].get_or_init(|| {
            metrics::counter!(
                metric_names::UPSTREAM_ERRORS_TOTAL.name,
                "route" => Arc::clone(&self.route),
                "kind" => UPSTREAM_ERROR_KINDS[i]
            )
        }))
    }
}

fn status_class_index(status: StatusCode) -> usize {
    match status.as_u16() {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        for (status, class) in [
            (101, "1xx"),
            (200, "2xx"),
            (204, "2xx"),
            (304, "3xx"),
            (404, "4xx"),
            (500, "5xx"),
            (599, "5xx"),
        ] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(STATUS_CLASSES[status_class_index(status)], class);
        }
    }
}
