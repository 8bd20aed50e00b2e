//! The sidecar reverse proxy: every request that reaches it goes to the
//! upstream of its [`Route`] with that route's token (by default
//! `Authorization: Bearer <token>`). [`Proxy::new`] makes one route that
//! takes everything; [`Proxy::with_routes`] serves several on one listener.
//!
//! Each request passes, outermost first:
//!
//! 0. **Route** (`route.rs`): the first route whose host and path prefix
//!    match (on the normalised path); none: `404` naming no upstream, and
//!    no token is sought. A listener with one route that takes everything
//!    does no matching. Everything below is that route's.
//! 1. **Target check.** `CONNECT` is answered `405`; an HTTP/1 absolute-form
//!    target naming neither the proxy, nor the route's upstream, nor the
//!    route's host is answered `400`. Neither is forwarded or given a token.
//! 2. **Rewrite for the upstream** (`Forwarder::prepare`), before any token
//!    is sought or set: hop-by-hop fields are removed (the fixed list and
//!    every field named in `Connection`, but never `Host`); the path is
//!    normalised and joined under the upstream's base path (`path.rs`: dot
//!    segments, also percent-encoded, and `//` removed; a path that would
//!    climb above the base path is answered `400`), the query kept byte for
//!    byte; `Host` (unless `preserve_host`), `Via` and
//!    `X-Forwarded-For/-Proto/-Host` (when `forwarded_headers`) are set.
//!    Since this runs before the token layer, nothing a client names can
//!    remove the token or the forwarding fields.
//! 3. **Metrics and tracing.** One `request` span at `DEBUG` (method, path
//!    without the query, status, duration; never header values or the query
//!    string) and
//!    `sso_token_proxy_requests_total{route,status_class}`,
//!    `sso_token_proxy_request_duration_seconds{route}`,
//!    `sso_token_proxy_requests_in_flight`. A body of known size up to
//!    `max_replay_body_bytes` is read into memory so that the request can be
//!    replayed, while the bodies held so fit in `replay_buffer_bytes`;
//!    anything else is streamed.
//! 4. **[`BearerTokenLayer`].** Sets the token; `503` when none can be
//!    had; after an upstream `401`, one refresh and one replay of a
//!    buffered request.
//! 5. **Forwarder.** Sends the prepared request, untouched, as HTTP/1.1 or,
//!    for https upstreams offering it by ALPN, HTTP/2, on a pooled
//!    connection (`pool.rs`: one upstream, so no pool key; idle HTTP/1.1
//!    connections in a last-in-first-out stack, closed after
//!    `idle_timeout`; one shared HTTP/2 connection), and removes the
//!    hop-by-hop fields of the response. Bodies stream both ways.
//!    At most `upstream_max_connections` are open; a request that finds
//!    all busy waits up to `upstream_queue_timeout`, then `503`.
//!    Connect failures answer `502`, no response headers within
//!    `upstream_response_timeout` `504`; these count in
//!    `sso_token_proxy_upstream_errors_total{route,kind}`. A request body the
//!    client breaks or stops sending is the client's fault (`400`, `408`,
//!    `sso_token_proxy_client_errors_total{kind}`).
//!
//! The server speaks HTTP/1.1 with keep-alive and HTTP/2 without TLS (prior
//! knowledge), to at most `max_connections` clients at once (`server.rs`).
//! Every state of a connection has a timer (`activity.rs`): the first
//! request head, later HTTP/1 heads (`header_read_timeout`), request bodies
//! (`request_body_timeout`), responses the client does not take
//! (`send_timeout`), idleness (`idle_timeout`) and a connection asked to
//! close (`drain_timeout`). HTTP/2 clients are limited in streams, resets
//! and control frames (`h2_monitor.rs`). On shutdown the listener is
//! closed at once, in-flight requests get up to `shutdown_grace` to finish,
//! and [`Proxy::serve`] returns.
//!
//! # Example
//!
//! ```no_run
//! # use std::time::Duration;
//! # use sso_token_proxy::{CacheOptions, Secret, TokenCache, proxy::{Proxy, ProxyConfig},
//! #     token::{FetchFuture, Reuse, Token, TokenSource}};
//! # struct Fixed;
//! # impl TokenSource for Fixed {
//! #     fn identity(&self) -> String { "fixed".into() }
//! #     fn scopes(&self) -> &[String] { &[] }
//! #     fn fetch(&self, _: Reuse) -> FetchFuture<'_> {
//! #         Box::pin(async { Ok(Token::new(Secret::new("t"), Duration::from_secs(3600))) })
//! #     }
//! # }
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ProxyConfig::new("127.0.0.1:8080".parse()?, "http://127.0.0.1:9000".parse()?);
//! let cache = TokenCache::new(Fixed, CacheOptions::default());
//! let proxy = Proxy::new(&config, cache)?;
//! let listener = tokio::net::TcpListener::bind(config.listen).await?;
//! proxy
//!     .serve(listener, async {
//!         let _ = tokio::signal::ctrl_c().await;
//!     })
//!     .await?;
//! # Ok(())
//! # }
//! ```

mod activity;
mod balance;
mod body;
mod error;
mod forward;
mod h2_monitor;
mod headers;
mod io;
mod metrics;
mod path;
mod pool;
mod route;
mod server;
mod service;
mod stream_watch;
mod target;
mod task_waker;
mod upload;

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{net::TcpListener, sync::Semaphore};

pub use self::error::ProxyError;
pub use self::path::{EscapedSlashes, PathRefusal, UpstreamPath};
pub use self::route::Route;
pub(crate) use self::route::{HostMatch, check_token_header, parse_path_prefix, prefix_covers};
pub(crate) use self::server::{ACCEPT_ERROR_PAUSE, is_connection_error};
pub use self::target::{Refusal, TargetCheck};
use self::{
    activity::ConnTimers,
    forward::{Forwarder, ForwarderSettings},
    metrics::ProxyMetrics,
    pool::{PoolGroup, PoolSettings},
    route::{ActiveRoute, RouteTable},
    upload::UpstreamBody,
};
pub use crate::config::ProxyConfig;
use crate::{cache::TokenCache, layer::BearerTokenLayer, tls};

/// The name of the route [`Proxy::new`] makes of [`ProxyConfig::upstream`].
pub const DEFAULT_ROUTE: &str = "default";

/// The reverse proxy for one listener: built from the `[proxy]` config and
/// its routes, then served on a listener.
pub struct Proxy {
    routes: Arc<RouteTable>,
    metrics: Arc<ProxyMetrics>,
    settings: ServerSettings,
    /// One permit per client connection served, shared with the other
    /// proxies of its [`SharedLimits`].
    connections: Arc<Semaphore>,
    /// One permit per KiB of request body held for a replay, shared too.
    replay_budget: Arc<Semaphore>,
    /// Its runtime's part in spreading the listener's connections evenly
    /// over the runtimes of its [`SharedLimits`].
    member: balance::Member,
}

/// The caps that several [`Proxy`]s of one listener keep together, one
/// proxy per runtime (`runtime = "thread_per_core"`): at most
/// `max_connections` client connections over all of them, and at most
/// `upstream_max_connections` upstream connections per route (its pools
/// form one [`PoolGroup`]).
#[derive(Clone)]
pub(crate) struct SharedLimits {
    connections: Arc<Semaphore>,
    replay_budget: Arc<Semaphore>,
    upstream_max_connections: usize,
    upstream_connect_wait_above: usize,
    /// By route name.
    pool_groups: Arc<Mutex<HashMap<String, Arc<PoolGroup<UpstreamBody>>>>>,
    /// The proxies' client connections, spread evenly over them.
    balancer: Arc<balance::Balancer>,
}

impl SharedLimits {
    /// The caps of `config`, not yet shared with anyone.
    pub(crate) fn new(config: &ProxyConfig) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(config.max_connections)),
            replay_budget: Arc::new(Semaphore::new(config.replay_buffer_bytes / 1024)),
            upstream_max_connections: config.upstream_max_connections,
            upstream_connect_wait_above: config.upstream_connect_wait_above,
            pool_groups: Arc::default(),
            balancer: Arc::default(),
        }
    }

    fn pool_group(&self, route: &str) -> Arc<PoolGroup<UpstreamBody>> {
        let mut groups = self
            .pool_groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(groups.entry(route.to_owned()).or_insert_with(|| {
            PoolGroup::new(
                self.upstream_max_connections,
                self.upstream_connect_wait_above,
            )
        }))
    }
}

#[derive(Debug, Clone, Copy)]
struct ServerSettings {
    timers: ConnTimers,
    shutdown_grace: Duration,
    max_replay_body_bytes: u64,
    request_body_timeout: Duration,
    max_connections: usize,
    max_request_header_bytes: usize,
    http2_max_concurrent_streams: u32,
    http2_max_pending_accept_reset_streams: usize,
    http2_max_local_error_reset_streams: usize,
    http2_max_control_frames_per_second: u32,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("routes", &self.routes)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// A proxy with one route, [`DEFAULT_ROUTE`], that takes every request
    /// to `config.upstream` with a token from `cache`. Builds the upstream
    /// client (pooled; rustls with the webpki roots and `upstream_ca_file`;
    /// HTTP/1.1, and HTTP/2 by ALPN for https) and the service stack.
    pub fn new(config: &ProxyConfig, cache: TokenCache) -> Result<Self, ProxyError> {
        let upstream = config
            .upstream
            .clone()
            .ok_or_else(|| ProxyError::Upstream("(none)".to_owned()))?;
        let route = Route::new(DEFAULT_ROUTE, upstream, cache);
        let metrics = Arc::new(ProxyMetrics::default());
        let limits = SharedLimits::new(config);
        let active = active_route(config, &route, &metrics, &limits)?;
        Ok(Self::from_table(config, vec![active], metrics, &limits))
    }

    /// A proxy whose listener serves `routes`: each request goes to the
    /// first route (in this order) whose host and path prefix match it;
    /// none: `404`. Each route gets its own upstream pool, token layer and
    /// target check; the server settings (timers, limits) are `config`'s,
    /// and so are the route settings a route leaves unset. `config`'s own
    /// `upstream` is not used.
    ///
    /// Cheap enough to call once per worker thread: routes share their
    /// token caches, each call makes its own upstream pools.
    pub fn with_routes(config: &ProxyConfig, routes: Vec<Route>) -> Result<Self, ProxyError> {
        Self::with_shared_limits(config, routes, &SharedLimits::new(config))
    }

    /// As [`Proxy::with_routes`], keeping to the connection caps of
    /// `limits` together with every other proxy built with them: the
    /// `max_connections` and `upstream_max_connections` of the config they
    /// were made from hold over all these proxies, not for each.
    pub(crate) fn with_shared_limits(
        config: &ProxyConfig,
        routes: Vec<Route>,
        limits: &SharedLimits,
    ) -> Result<Self, ProxyError> {
        if routes.is_empty() {
            return Err(ProxyError::NoRoutes);
        }
        let metrics = Arc::new(ProxyMetrics::default());
        let mut active = Vec::with_capacity(routes.len());
        for (i, route) in routes.iter().enumerate() {
            if routes[..i].iter().any(|r| r.name == route.name) {
                return Err(route.error("name", "another route has this name"));
            }
            active.push(
                active_route(config, route, &metrics, limits).map_err(|e| match e {
                    ProxyError::Upstream(u) => {
                        route.error("upstream", ProxyError::Upstream(u).to_string())
                    }
                    ProxyError::Tls(e @ tls::TlsConfigError::CaFile { .. }) => {
                        route.error("upstream_ca_file", e.to_string())
                    }
                    ProxyError::Tls(e) => route.error("upstream", e.to_string()),
                    other => other,
                })?,
            );
        }
        Ok(Self::from_table(config, active, metrics, limits))
    }

    fn from_table(
        config: &ProxyConfig,
        routes: Vec<ActiveRoute>,
        metrics: Arc<ProxyMetrics>,
        limits: &SharedLimits,
    ) -> Self {
        Self {
            routes: Arc::new(RouteTable::new(routes, &metrics)),
            metrics,
            connections: Arc::clone(&limits.connections),
            replay_budget: Arc::clone(&limits.replay_budget),
            member: limits.balancer.join(),
            settings: ServerSettings {
                timers: ConnTimers {
                    header_read: config.header_read_timeout,
                    idle: config.idle_timeout,
                    send: config.send_timeout,
                    drain: config.drain_timeout,
                },
                shutdown_grace: config.shutdown_grace,
                max_replay_body_bytes: config.max_replay_body_bytes as u64,
                request_body_timeout: config.request_body_timeout,
                max_connections: config.max_connections,
                max_request_header_bytes: config.max_request_header_bytes,
                http2_max_concurrent_streams: config.http2_max_concurrent_streams,
                http2_max_pending_accept_reset_streams: config
                    .http2_max_pending_accept_reset_streams,
                http2_max_local_error_reset_streams: config.http2_max_local_error_reset_streams,
                http2_max_control_frames_per_second: config.http2_max_control_frames_per_second,
            },
        }
    }

    /// Serves connections from `listener` until `shutdown` resolves; then
    /// stops accepting (the listener is closed), lets in-flight requests
    /// finish for up to `shutdown_grace`, and returns.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        server::serve(self, listener, shutdown).await
    }
}

/// One route's upstream client, token layer and target check, with
/// `config`'s settings where the route leaves them unset.
fn active_route(
    config: &ProxyConfig,
    route: &Route,
    metrics: &Arc<ProxyMetrics>,
    limits: &SharedLimits,
) -> Result<ActiveRoute, ProxyError> {
    let upstream = &route.upstream;
    let usable = matches!(upstream.scheme_str(), Some("http" | "https"))
        && upstream.host().is_some_and(|h| !h.is_empty())
        && upstream.query().is_none();
    if !usable {
        return Err(ProxyError::Upstream(upstream.to_string()));
    }
    if let Err(reason) = check_token_header(&route.token_header) {
        return Err(route.error("token_header", reason));
    }
    let strip = match (&route.path_prefix, route.strip_prefix) {
        (Some(prefix), true) => Some(
            parse_path_prefix(prefix)
                .map_err(|reason| route.error("path_prefix", reason))?
                .map(|_| prefix.as_str()),
        )
        .flatten(),
        _ => None,
    };
    let ca_file = route
        .upstream_ca_file
        .as_deref()
        .or(config.upstream_ca_file.as_deref());
    let tls_config = tls::client_config(ca_file)?;
    let connector = tls::https_connector(tls_config, config.upstream_connect_timeout);
    let forwarder = Forwarder::new(ForwarderSettings {
        route: &route.name,
        upstream,
        connector,
        pool: PoolSettings {
            idle_timeout: config.idle_timeout,
            queue_timeout: config.upstream_queue_timeout,
            connect_wait: config.upstream_connect_wait,
            max_response_headers: config.upstream_max_response_headers,
            max_response_header_bytes: config.upstream_max_response_header_bytes,
        },
        pool_group: limits.pool_group(&route.name),
        preserve_host: route.preserve_host.unwrap_or(config.preserve_host),
        forwarded_headers: route.forwarded_headers.unwrap_or(config.forwarded_headers),
        response_timeout: config.upstream_response_timeout,
        escaped_slashes: route.escaped_slashes.unwrap_or(config.escaped_slashes),
        strip_prefix: strip,
    })
    .ok_or_else(|| ProxyError::Upstream(upstream.to_string()))?;
    let layer = BearerTokenLayer::new(route.cache.clone())
        .header_name(route.token_header.clone())
        .token_format(route.token_format.clone());
    let stack = tower::Layer::layer(&layer, forwarder);
    ActiveRoute::new(route, TargetCheck::new(upstream), stack, metrics)
}
