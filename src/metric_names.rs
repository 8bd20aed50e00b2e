//! Every metric the crate records: name, type, labels and meaning, in one
//! table.
//!
//! Code records a metric through its constant here, e.g.
//! `metrics::counter!(TOKEN_FETCHES_TOTAL.name, "outcome" => "success")`;
//! [`describe_all`] hands each one's meaning to the installed recorder, so
//! `/metrics` carries `# HELP` lines; a test keeps the README's metrics
//! table equal to [`ALL`]. Adding a metric is one `const` and one entry in
//! [`ALL`]; adding a label is one word in its `labels`.
//!
//! The crate records through the [`metrics`] facade: a library user who
//! installs a recorder of their own sees the same names.
//!
//! ```
//! use sso_token_proxy::metric_names::{self, MetricKind};
//!
//! let fetches = metric_names::ALL
//!     .iter()
//!     .find(|m| m.name == "sso_token_proxy_token_fetches_total")
//!     .unwrap();
//! assert_eq!(fetches.kind, MetricKind::Counter);
//! assert_eq!(fetches.labels, ["source", "outcome", "kind"]);
//! ```

/// The Prometheus type of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MetricKind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution, in buckets.
    Histogram,
}

impl MetricKind {
    /// The Prometheus name of the type: `counter`, `gauge` or `histogram`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// One metric: its name, type, label names and meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metric {
    /// The full name, starting with `sso_token_proxy_`.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// The label names, in the order the code sets them.
    pub labels: &'static [&'static str],
    /// What it measures: the `# HELP` text.
    pub help: &'static str,
}

const fn counter(
    name: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
) -> Metric {
    metric(name, MetricKind::Counter, labels, help)
}

const fn gauge(name: &'static str, labels: &'static [&'static str], help: &'static str) -> Metric {
    metric(name, MetricKind::Gauge, labels, help)
}

const fn histogram(
    name: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
) -> Metric {
    metric(name, MetricKind::Histogram, labels, help)
}

const fn metric(
    name: &'static str,
    kind: MetricKind,
    labels: &'static [&'static str],
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind,
        labels,
        help,
    }
}

// === proxy ===

/// Proxied requests by route and status class (`1xx` … `5xx`); `route`
/// is empty for requests no route took.
pub const REQUESTS_TOTAL: Metric = counter(
    "sso_token_proxy_requests_total",
    &["route", "status_class"],
    "Proxied requests by route and status class (route empty: no route took it).",
);
/// Proxied request duration, by route.
pub const REQUEST_DURATION_SECONDS: Metric = histogram(
    "sso_token_proxy_request_duration_seconds",
    &["route"],
    "Proxied request duration, until the response head is ready, by route.",
);
/// Requests being served.
pub const REQUESTS_IN_FLIGHT: Metric = gauge(
    "sso_token_proxy_requests_in_flight",
    &[],
    "Requests being served.",
);
/// Upstream failures by route and kind (`connect`, `timeout`,
/// `queue_timeout`, `other`).
pub const UPSTREAM_ERRORS_TOTAL: Metric = counter(
    "sso_token_proxy_upstream_errors_total",
    &["route", "kind"],
    "Upstream connect, timeout, connection-queue timeout and other failures, by route.",
);
/// Requests answered as the client's fault, by kind (`target_refused`,
/// `path_refused`, `bad_body`, `body_timeout`, `no_route`, and
/// `send_timeout`: an HTTP/2 stream reset because its client took no
/// response bytes).
pub const CLIENT_ERRORS_TOTAL: Metric = counter(
    "sso_token_proxy_client_errors_total",
    &["kind"],
    "Requests refused or cut short because of what the client sent (or did not send).",
);
/// Open client connections.
pub const CLIENT_CONNECTIONS: Metric = gauge(
    "sso_token_proxy_client_connections",
    &[],
    "Open client connections (at most proxy.max_connections).",
);
/// Client connections the proxy closed, by reason (`idle`,
/// `header_timeout`, `send_timeout`, `drain_timeout`, `http2_abuse`).
pub const CLIENT_CONNECTIONS_CLOSED_TOTAL: Metric = counter(
    "sso_token_proxy_client_connections_closed_total",
    &["reason"],
    "Client connections the proxy closed or asked to close, by reason.",
);
/// Upstream connections opened, by route and protocol (`http1`, `http2`).
pub const UPSTREAM_CONNECTIONS_OPENED_TOTAL: Metric = counter(
    "sso_token_proxy_upstream_connections_opened_total",
    &["route", "protocol"],
    "Upstream connections opened, by route; steady under steady load when keep-alive works.",
);
/// Idle pooled HTTP/1.1 upstream connections, by route.
pub const UPSTREAM_CONNECTIONS_IDLE: Metric = gauge(
    "sso_token_proxy_upstream_connections_idle",
    &["route"],
    "Idle pooled HTTP/1.1 upstream connections of each route, sampled by the pool's reaper.",
);

// === token ===

/// Token fetches by outcome (`success`, `throttled`, `transient`, `fatal`)
/// and error kind (`none` on success).
pub const TOKEN_FETCHES_TOTAL: Metric = counter(
    "sso_token_proxy_token_fetches_total",
    &["source", "outcome", "kind"],
    "Token fetches by outcome (success, throttled, transient, fatal) and error kind (SlowDown, InternalServer, InvalidGrant, ...; none on success).",
);
/// Token fetch duration, retries included.
pub const TOKEN_FETCH_DURATION_SECONDS: Metric = histogram(
    "sso_token_proxy_token_fetch_duration_seconds",
    &["source"],
    "Token fetch duration, retries included.",
);
/// Seconds until the current token expires.
pub const TOKEN_EXPIRY_SECONDS: Metric = gauge(
    "sso_token_proxy_token_expiry_seconds",
    &["source"],
    "Seconds until the current token expires (0 without one).",
);
/// 1 while a valid token is held.
pub const TOKEN_VALID: Metric = gauge(
    "sso_token_proxy_token_valid",
    &["source"],
    "1 while a valid token is held, else 0.",
);
/// Seconds until the client registration expires, where known.
pub const REGISTRATION_EXPIRY_SECONDS: Metric = gauge(
    "sso_token_proxy_registration_expiry_seconds",
    &["source"],
    "Seconds until the client registration behind the source expires (registrationExpiresAt of an SSO cache file; absent where unknown).",
);
/// 1 while a person must log in again.
pub const NEEDS_LOGIN: Metric = gauge(
    "sso_token_proxy_needs_login",
    &["source"],
    "1 after SSO-OIDC rejected the refresh token (InvalidGrant) or once the client registration expired; 0 again after a successful fetch.",
);
/// Background refreshes started.
pub const REFRESH_AHEAD_TOTAL: Metric = counter(
    "sso_token_proxy_refresh_ahead_total",
    &["source"],
    "Background refreshes started before expiry.",
);
/// Retry decisions per failed SSO-OIDC attempt.
pub const OIDC_RETRY_DECISIONS_TOTAL: Metric = counter(
    "sso_token_proxy_oidc_retry_decisions_total",
    &["class", "decision"],
    "Retry decisions per failed SSO-OIDC attempt: retry, not_retryable, attempts_exhausted, budget_exhausted.",
);
/// Tokens dropped after an upstream 401.
pub const TOKEN_INVALIDATIONS_TOTAL: Metric = counter(
    "sso_token_proxy_token_invalidations_total",
    &["source"],
    "Tokens dropped after an upstream 401.",
);
/// Upstream 401s by what they did to the token (`allowed`, `superseded`,
/// `limited`).
pub const FORCED_REFRESHES_TOTAL: Metric = counter(
    "sso_token_proxy_forced_refreshes_total",
    &["source", "decision"],
    "Upstream 401s by decision: allowed (token dropped, a refresh follows), superseded (already dropped or replaced), limited (forced-refresh budget spent; token kept, 401 handed back). For an exchange source, per caller: allowed (exchanged again), limited (already exchanged again within the minute).",
);
/// 0 while the newest refresh token is only in memory.
pub const REFRESH_TOKEN_PERSISTED: Metric = gauge(
    "sso_token_proxy_refresh_token_persisted",
    &["source"],
    "1 while the newest refresh token is on disk (state or SSO cache file); 0 while a failed write of it is being retried.",
);
/// Failed writes of the state or cache file.
pub const PERSIST_FAILURES_TOTAL: Metric = counter(
    "sso_token_proxy_persist_failures_total",
    &[],
    "Failed writes of the state or SSO cache file.",
);

// === CreateTokenWithIAM ===

/// Resolutions of AWS credentials from the chain, by outcome.
pub const AWS_CREDENTIALS_LOADS_TOTAL: Metric = counter(
    "sso_token_proxy_aws_credentials_loads_total",
    &["outcome"],
    "Resolutions of AWS credentials from the credential chain for SigV4 (ok, error).",
);
/// Exchanges that found a rotated assertion file.
pub const ASSERTION_ROTATIONS_TOTAL: Metric = counter(
    "sso_token_proxy_assertion_rotations_total",
    &[],
    "Exchanges that found a different JWT in token.assertion_file than the previous exchange.",
);

// === per-caller exchange ===

/// Per-caller exchanges (`source = "exchange"`), by outcome.
pub const CALLER_EXCHANGES_TOTAL: Metric = counter(
    "sso_token_proxy_caller_exchanges_total",
    &["source", "outcome"],
    "CreateTokenWithIAM exchanges of callers' inbound tokens (ok, refused, throttled, failed, refresh_ok, refresh_failed).",
);
/// Lookups in a per-caller cache, by result.
pub const CALLER_CACHE_LOOKUPS_TOTAL: Metric = counter(
    "sso_token_proxy_caller_cache_lookups_total",
    &["source", "result"],
    "Requests of an exchange source's callers: hit (a cached token), miss (exchanged or waited for one exchange), refused (a remembered refusal), gated (throttled, no exchange).",
);
/// Callers held in a per-caller cache.
pub const CALLER_CACHE_ENTRIES: Metric = gauge(
    "sso_token_proxy_caller_cache_entries",
    &["source"],
    "Callers an exchange source holds a token or a remembered refusal for (at most max_callers), counted at each scrape.",
);

// === token sinks ===

/// Writes of `[[sink]]` files, by outcome.
pub const SINK_WRITES_TOTAL: Metric = counter(
    "sso_token_proxy_sink_writes_total",
    &["sink", "outcome"],
    "Writes of token sink files ([[sink]], labelled by path): written, failed (retried with backoff).",
);

// === shared store ===

/// 1 while Redis answers.
pub const STORE_UP: Metric = gauge(
    "sso_token_proxy_store_up",
    &[],
    "1 while the shared Redis store answers (pinged every second).",
);
/// 1 while the replica refuses or makes refreshes without Redis.
pub const STORE_DEGRADED: Metric = gauge(
    "sso_token_proxy_store_degraded",
    &[],
    "1 while this replica refuses, or makes, refreshes without the shared store.",
);
/// Failed Redis operations by operation.
pub const STORE_ERRORS_TOTAL: Metric = counter(
    "sso_token_proxy_store_errors_total",
    &["op"],
    "Failed shared-store operations: read, lock, renew, release, commit, ping.",
);
/// Refresh locks this replica took.
pub const STORE_LOCK_ACQUIRED_TOTAL: Metric = counter(
    "sso_token_proxy_store_lock_acquired_total",
    &[],
    "Refresh locks this replica took.",
);
/// Waits for another replica's refresh, by outcome.
pub const STORE_LOCK_WAIT_TOTAL: Metric = counter(
    "sso_token_proxy_store_lock_wait_total",
    &["outcome"],
    "Waits for another replica's refresh: adopted its token, took_over the lock, timeout.",
);
/// Tokens taken from the store instead of refreshing.
pub const STORE_TOKENS_ADOPTED_TOTAL: Metric = counter(
    "sso_token_proxy_store_tokens_adopted_total",
    &[],
    "Tokens taken from the shared store instead of refreshing.",
);
/// Refreshes refused while Redis was unreachable.
pub const STORE_REFRESHES_REFUSED_TOTAL: Metric = counter(
    "sso_token_proxy_store_refreshes_refused_total",
    &[],
    "Refreshes refused while the shared store was unreachable.",
);
/// Refreshes made without Redis.
pub const STORE_UNCOORDINATED_REFRESHES_TOTAL: Metric = counter(
    "sso_token_proxy_store_uncoordinated_refreshes_total",
    &[],
    "Refreshes made without the shared store (refresh_without_store = true).",
);
/// Results not stored because another replica stored a newer token.
pub const STORE_CONFLICTS_TOTAL: Metric = counter(
    "sso_token_proxy_store_conflicts_total",
    &[],
    "Refresh results not stored because another replica stored a newer token.",
);

/// Every metric the crate records.
pub const ALL: &[Metric] = &[
    REQUESTS_TOTAL,
    REQUEST_DURATION_SECONDS,
    REQUESTS_IN_FLIGHT,
    UPSTREAM_ERRORS_TOTAL,
    CLIENT_ERRORS_TOTAL,
    CLIENT_CONNECTIONS,
    CLIENT_CONNECTIONS_CLOSED_TOTAL,
    UPSTREAM_CONNECTIONS_OPENED_TOTAL,
    UPSTREAM_CONNECTIONS_IDLE,
    TOKEN_FETCHES_TOTAL,
    TOKEN_FETCH_DURATION_SECONDS,
    TOKEN_EXPIRY_SECONDS,
    TOKEN_VALID,
    REGISTRATION_EXPIRY_SECONDS,
    NEEDS_LOGIN,
    REFRESH_AHEAD_TOTAL,
    OIDC_RETRY_DECISIONS_TOTAL,
    TOKEN_INVALIDATIONS_TOTAL,
    FORCED_REFRESHES_TOTAL,
    REFRESH_TOKEN_PERSISTED,
    PERSIST_FAILURES_TOTAL,
    AWS_CREDENTIALS_LOADS_TOTAL,
    ASSERTION_ROTATIONS_TOTAL,
    CALLER_EXCHANGES_TOTAL,
    CALLER_CACHE_LOOKUPS_TOTAL,
    CALLER_CACHE_ENTRIES,
    SINK_WRITES_TOTAL,
    STORE_UP,
    STORE_DEGRADED,
    STORE_ERRORS_TOTAL,
    STORE_LOCK_ACQUIRED_TOTAL,
    STORE_LOCK_WAIT_TOTAL,
    STORE_TOKENS_ADOPTED_TOTAL,
    STORE_REFRESHES_REFUSED_TOTAL,
    STORE_UNCOORDINATED_REFRESHES_TOTAL,
    STORE_CONFLICTS_TOTAL,
];

/// Hands the meaning of every metric in [`ALL`] to the installed `metrics`
/// recorder (Prometheus exporters print it as `# HELP`). Call once, after
/// installing the recorder.
pub fn describe_all() {
    for m in ALL {
        match m.kind {
            MetricKind::Counter => metrics::describe_counter!(m.name, m.help),
            MetricKind::Gauge => metrics::describe_gauge!(m.name, m.help),
            MetricKind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    use super::*;

    const PREFIX: &str = "sso_token_proxy_";

    #[test]
    fn names_are_unique_prefixed_and_typed_by_suffix() {
        let mut seen = BTreeSet::new();
        for m in ALL {
            assert!(seen.insert(m.name), "{} listed twice", m.name);
            assert!(m.name.starts_with(PREFIX), "{} lacks the prefix", m.name);
            let snake = |s: &str| {
                !s.is_empty()
                    && s.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            };
            assert!(snake(m.name), "{}", m.name);
            assert!(
                m.labels.iter().all(|l| snake(l)),
                "{}: {:?}",
                m.name,
                m.labels
            );
            // Prometheus conventions: counters end in `_total`, nothing else does.
            assert_eq!(
                m.kind == MetricKind::Counter,
                m.name.ends_with("_total"),
                "{}",
                m.name
            );
            assert!(!m.help.is_empty(), "{} has no help", m.name);
        }
    }

    /// `(type, labels)` per metric in the README's metrics table, whose rows
    /// read ``| `name{label,label}` | type | meaning |``.
    fn readme_table(readme: &str) -> BTreeMap<String, (String, Vec<String>)> {
        let mut table = BTreeMap::new();
        for line in readme.lines() {
            let Some(row) = line.strip_prefix("| `").filter(|r| r.starts_with(PREFIX)) else {
                continue;
            };
            let (metric, rest) = row.split_once('`').expect("closing backtick");
            let kind = rest
                .trim_start_matches([' ', '|'])
                .split('|')
                .next()
                .expect("type column")
                .trim();
            let (name, labels) = match metric.split_once('{') {
                Some((name, labels)) => (
                    name,
                    labels
                        .trim_end_matches('}')
                        .split(',')
                        .map(|l| l.trim().to_owned())
                        .collect(),
                ),
                None => (metric, Vec::new()),
            };
            let previous = table.insert(name.to_owned(), (kind.to_owned(), labels));
            assert!(previous.is_none(), "README lists {name} twice");
        }
        table
    }

    #[test]
    fn readme_metrics_table_matches() {
        let readme = readme_table(include_str!("../README.md"));
        let code: BTreeMap<String, (String, Vec<String>)> = ALL
            .iter()
            .map(|m| {
                let labels = m.labels.iter().map(|l| (*l).to_owned()).collect();
                (m.name.to_owned(), (m.kind.as_str().to_owned(), labels))
            })
            .collect();
        let missing: Vec<_> = code.keys().filter(|n| !readme.contains_key(*n)).collect();
        assert!(
            missing.is_empty(),
            "missing from the README's metrics table: {missing:?}"
        );
        let unknown: Vec<_> = readme.keys().filter(|n| !code.contains_key(*n)).collect();
        assert!(
            unknown.is_empty(),
            "in the README but not in metric_names: {unknown:?}"
        );
        assert_eq!(readme, code, "README metrics table: type or labels differ");
    }

    /// Metric names are spelled here only: no other source file holds a
    /// string literal starting with the prefix.
    #[test]
    fn no_metric_name_spelled_outside_this_module() {
        fn visit(dir: &Path, found: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    visit(&path, found);
                } else if path.extension().is_some_and(|e| e == "rs")
                    && !path.ends_with("metric_names.rs")
                {
                    let text = std::fs::read_to_string(&path).unwrap();
                    let needle = format!("\"{PREFIX}");
                    for (n, line) in text.lines().enumerate() {
                        if line.contains(&needle) {
                            found.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                        }
                    }
                }
            }
        }
        let mut found = Vec::new();
        visit(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut found,
        );
        assert!(
            found.is_empty(),
            "metric names outside metric_names.rs:\n{}",
            found.join("\n")
        );
    }
}
