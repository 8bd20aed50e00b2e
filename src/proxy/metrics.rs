//! Handles to the per-request metrics, looked up once per proxy instead of
//! on every request.
//!
//! `metrics::counter!(name, label => value)` builds a key (allocating for
//! the label) and looks it up in the recorder's registry on every call; on
//! the hot path that costs more than the increment itself. The handles here
//! are registered lazily, on first use, so a metric appears in `/metrics`
//! only once it has a value (as with the macros), and with whatever
//! recorder is installed by then.

use std::sync::OnceLock;

use http::StatusCode;
use metrics::{Counter, Gauge, Histogram};

use crate::metric_names;

/// The `status_class` label values, by `status / 100 - 1`.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

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
}

const CLIENT_ERROR_KINDS: [&str; 4] =
    ["target_refused", "path_refused", "bad_body", "body_timeout"];

/// Per-request metric handles shared by every connection of one proxy.
#[derive(Debug, Default)]
pub(super) struct ProxyMetrics {
    requests: [OnceLock<Counter>; 5],
    duration: OnceLock<Histogram>,
    in_flight: OnceLock<Gauge>,
    client_errors: [OnceLock<Counter>; 4],
    connections: OnceLock<Gauge>,
}

impl ProxyMetrics {
    /// `sso_token_proxy_requests_total{status_class}` for `status`.
    pub(super) fn requests(&self, status: StatusCode) -> &Counter {
        let class = status_class_index(status);
        self.requests[class].get_or_init(
            || metrics::counter!(metric_names::REQUESTS_TOTAL.name, "status_class" => STATUS_CLASSES[class]),
        )
    }

    /// `sso_token_proxy_request_duration_seconds`.
    pub(super) fn duration(&self) -> &Histogram {
        self.duration
            .get_or_init(|| metrics::histogram!(metric_names::REQUEST_DURATION_SECONDS.name))
    }

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
