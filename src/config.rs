//! `config.toml`: the model, secrets from inline values or files, and a
//! validation that reports every problem as `FILE: key: reason`.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use http::Uri;
use toml::{Table, Value};

use http::HeaderName;

pub(crate) use crate::secret::read_secret_file;
use crate::{
    fs_atomic::expand_tilde,
    layer::TokenFormat,
    oidc::{EndpointParams, resolve_endpoint},
    proxy::{
        DEFAULT_ROUTE, EscapedSlashes, HostMatch, check_token_header, parse_path_prefix,
        prefix_covers,
    },
    retry::{Backoff, Jitter, RetryConfig},
    secret::Secret,
    sink::{OnShutdown, SinkConfig, SinkFormat},
};

/// Every problem found in a config file. `Display` gives one
/// `FILE: key: reason` line per problem.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) struct ConfigError {
    /// The file.
    pub(crate) file: String,
    /// `(key, reason)` pairs.
    pub(crate) problems: Vec<(String, String)>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (key, reason)) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {key}: {reason}", self.file)?;
        }
        Ok(())
    }
}

/// A secret and where it came from.
#[derive(Debug, Clone)]
pub(crate) struct SecretSetting {
    /// The value.
    pub(crate) value: Secret,
    /// The file it was read from, if any.
    pub(crate) file: Option<PathBuf>,
    /// That file's modification time.
    pub(crate) modified: Option<SystemTime>,
}

/// Where tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SourceKind {
    /// `refresh_token` grant with a configured client and refresh token.
    RefreshToken,
    /// An AWS SSO cache file.
    SsoCache,
    /// `CreateTokenWithIAM` with the JWT in `assertion_file`, for the
    /// application whose ARN is the source's `client_id`; SigV4-signed with
    /// the AWS credential chain.
    JwtBearer,
}

/// `[proxy]`.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Where the proxy listens.
    pub listen: SocketAddr,
    /// The upstream of the route [`Proxy::new`](crate::proxy::Proxy::new)
    /// makes (the config file's implicit route `default`); `None` for a
    /// proxy with only explicit routes.
    pub upstream: Option<Uri>,
    /// Extra CA certificates for an https upstream.
    pub upstream_ca_file: Option<PathBuf>,
    /// Keep the client's `Host` instead of the upstream's authority.
    pub preserve_host: bool,
    /// Add `Via` and `X-Forwarded-For/-Proto/-Host`.
    pub forwarded_headers: bool,
    /// How long in-flight requests may finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// Limit for reading a request's headers.
    pub header_read_timeout: Duration,
    /// Limit for connecting to the upstream.
    pub upstream_connect_timeout: Duration,
    /// Limit for the upstream's response headers (then 504).
    pub upstream_response_timeout: Duration,
    /// Idle keep-alive connections are closed after this.
    pub idle_timeout: Duration,
    /// Request bodies up to this size are buffered so that a request can be
    /// replayed after an upstream 401.
    pub max_replay_body_bytes: usize,
    /// Memory for request bodies held for a replay, over all connections
    /// at once; a body that does not fit is streamed instead.
    pub replay_buffer_bytes: usize,
    /// What `%2F`, `%5C` and `\` in a request path do.
    pub escaped_slashes: EscapedSlashes,
    /// Limit for a buffered request body to arrive, and for a streamed one
    /// to pause between reads (then 408 and the connection is closed).
    pub request_body_timeout: Duration,
    /// Limit for a client to take response bytes it is sent: a connection
    /// whose writes make no progress this long is closed.
    pub send_timeout: Duration,
    /// How long a connection asked to close (idle, shutdown; h2 GOAWAY)
    /// may take to go, once nothing is in flight, before its socket is
    /// closed.
    pub drain_timeout: Duration,
    /// Client connections served at once by one [`Proxy`](crate::proxy::Proxy)
    /// (the binary: per listener, over all its runtimes); beyond it, new
    /// connections wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// Bytes a request head may have (HTTP/1 request line and fields; h2
    /// header list); beyond it, 431.
    pub max_request_header_bytes: usize,
    /// Connections to a route's upstream at once (the binary: over all its
    /// runtimes); beyond it, requests wait for one to come free.
    pub upstream_max_connections: usize,
    /// Limit for a request to wait for an upstream connection (then 503).
    pub upstream_queue_timeout: Duration,
    /// How long a request that finds every upstream connection busy waits
    /// for one to come back before opening another, once a route holds
    /// `upstream_connect_wait_above`; zero: never.
    pub upstream_connect_wait: Duration,
    /// Upstream connections a route opens without waiting first (the
    /// binary: over all its runtimes).
    pub upstream_connect_wait_above: usize,
    /// Header fields an upstream response head may have.
    pub upstream_max_response_headers: usize,
    /// Bytes an upstream response head may have.
    pub upstream_max_response_header_bytes: usize,
    /// Streams one HTTP/2 client may have open at once.
    pub http2_max_concurrent_streams: u32,
    /// Streams an HTTP/2 client may reset before the proxy has accepted
    /// them (the "rapid reset" attack); beyond it, GOAWAY.
    pub http2_max_pending_accept_reset_streams: usize,
    /// Streams the proxy may reset because of a client's protocol errors,
    /// over a connection's life; beyond it, GOAWAY.
    pub http2_max_local_error_reset_streams: usize,
    /// Control frames (SETTINGS, PING, PRIORITY, RST_STREAM, WINDOW_UPDATE,
    /// empty DATA/HEADERS/CONTINUATION, unknown types) one HTTP/2 client may
    /// send per second; beyond it, GOAWAY (ENHANCE_YOUR_CALM) and close.
    pub http2_max_control_frames_per_second: u32,
}

impl ProxyConfig {
    /// A config with every optional key at its default.
    pub fn new(listen: SocketAddr, upstream: Uri) -> Self {
        Self {
            upstream: Some(upstream),
            ..Self::for_routes(listen)
        }
    }

    /// A config without an upstream of its own, for
    /// [`Proxy::with_routes`](crate::proxy::Proxy::with_routes), with every
    /// optional key at its default.
    pub fn for_routes(listen: SocketAddr) -> Self {
        Self {
            listen,
            upstream: None,
            upstream_ca_file: None,
            preserve_host: false,
            forwarded_headers: true,
            shutdown_grace: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(60),
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_response_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            max_replay_body_bytes: 64 * 1024,
            replay_buffer_bytes: 32 * 1024 * 1024,
            escaped_slashes: EscapedSlashes::Keep,
            request_body_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(5),
            max_connections: 4096,
            max_request_header_bytes: 64 * 1024,
            upstream_max_connections: 1024,
            upstream_queue_timeout: Duration::from_secs(5),
            upstream_connect_wait: Duration::from_millis(20),
            upstream_connect_wait_above: 64,
            upstream_max_response_headers: 256,
            upstream_max_response_header_bytes: 128 * 1024,
            http2_max_concurrent_streams: 128,
            http2_max_pending_accept_reset_streams: 20,
            http2_max_local_error_reset_streams: 1024,
            http2_max_control_frames_per_second: 1000,
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub(crate) struct AdminConfig {
    /// Where `/healthz`, `/readyz`, `/metrics` are served.
    pub(crate) listen: SocketAddr,
}

/// `[oidc]`.
#[derive(Debug, Clone)]
pub(crate) struct OidcConfig {
    /// Explicit endpoint URL.
    pub(crate) endpoint: Option<String>,
    /// Region, for the regional endpoint.
    pub(crate) region: Option<String>,
    /// Use the FIPS endpoint.
    pub(crate) use_fips: bool,
    /// Use the dual-stack endpoint.
    pub(crate) use_dual_stack: bool,
    /// Client id (refresh_token source).
    pub(crate) client_id: Option<String>,
    /// Client secret (refresh_token source).
    pub(crate) client_secret: Option<SecretSetting>,
    /// TCP connect timeout.
    pub(crate) connect_timeout: Duration,
    /// Timeout of one call.
    pub(crate) call_timeout: Duration,
}

impl OidcConfig {
    /// The endpoint parameters.
    pub(crate) fn endpoint_params(&self) -> EndpointParams {
        EndpointParams {
            region: self.region.clone(),
            use_fips: self.use_fips,
            use_dual_stack: self.use_dual_stack,
            endpoint: self.endpoint.clone(),
        }
    }
}

/// `[token]`.
#[derive(Debug, Clone)]
pub(crate) struct TokenConfig {
    /// Where tokens come from.
    pub(crate) source: SourceKind,
    /// The refresh token (refresh_token source).
    pub(crate) refresh_token: Option<SecretSetting>,
    /// The AWS SSO cache file (sso_cache source, and where `login` writes).
    pub(crate) sso_cache_file: Option<PathBuf>,
    /// Where rotated refresh tokens are persisted.
    pub(crate) state_file: Option<PathBuf>,
    /// Scopes to request.
    pub(crate) scopes: Vec<String>,
    /// Refresh this long before expiry.
    pub(crate) refresh_before_expiry: Duration,
    /// Never hand out a token with less than this left.
    pub(crate) expiry_margin: Duration,
    /// Access portal URL, for `login`.
    pub(crate) start_url: Option<String>,
    /// The JWT the jwt_bearer source exchanges (re-read for every exchange).
    pub(crate) assertion_file: Option<PathBuf>,
    /// Run the device flow when there is no usable refresh token (headless
    /// login; `refresh_token` sources with a `start_url`).
    pub(crate) device_login: bool,
}

/// One named token source: `[token]` with `[oidc]`'s client is
/// [`DEFAULT_SOURCE`]; each `[sources.NAME]` is another. Each gets one
/// `TokenCache`, whose metrics carry the name as their `source` label.
#[derive(Debug, Clone)]
pub(crate) struct SourceConfig {
    /// `"default"` for `[token]`, else `NAME`.
    pub(crate) name: String,
    /// Where its keys are written: `token` or `sources.NAME` (for messages).
    pub(crate) section: String,
    /// Its `[token]` keys (a `[sources.NAME]` without `source` takes the
    /// ones it does not set from `[token]`).
    pub(crate) token: TokenConfig,
    /// Its client id: its own `client_id`, else `[oidc]`'s.
    pub(crate) client_id: Option<String>,
    /// Its client secret: its own, else `[oidc]`'s.
    pub(crate) client_secret: Option<SecretSetting>,
    /// Where its client settings are written (`oidc` or `sources.NAME`).
    pub(crate) client_section: String,
}

impl SourceConfig {
    /// `section.key`, for messages.
    pub(crate) fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.section)
    }
}

/// A `[sources.NAME]` with `source = "exchange"`: no token of its own; a
/// route naming it exchanges each caller's inbound token with
/// `CreateTokenWithIAM` and forwards with the caller's exchanged token.
#[derive(Debug, Clone)]
// Without `aws-iam` the config refuses the source, so nothing reads it.
#[cfg_attr(not(feature = "aws-iam"), allow(dead_code))]
pub(crate) struct ExchangeConfig {
    /// `NAME`, the `source` label of its metrics.
    pub(crate) name: String,
    /// The Identity Center application's ARN (`client_id`).
    pub(crate) application_arn: String,
    /// The grant the inbound token is exchanged with.
    pub(crate) grant: ExchangeGrant,
    /// Scopes to request; none asks for all of the application's.
    pub(crate) scopes: Vec<String>,
    /// The request header carrying the caller's token (removed before
    /// forwarding).
    pub(crate) inbound_header: HeaderName,
    /// Callers held at most.
    pub(crate) max_callers: u64,
    /// How long a refused caller's refusal is remembered.
    pub(crate) caller_failure_ttl: Duration,
    /// Exchanges in flight at once, per replica.
    pub(crate) max_concurrent_exchanges: usize,
    /// Refresh an active caller's token this long before expiry.
    pub(crate) refresh_before_expiry: Duration,
    /// Never hand out a token with less than this left.
    pub(crate) expiry_margin: Duration,
}

/// `grant` of an exchange source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ExchangeGrant {
    /// `jwt_bearer`: the inbound token is a JWT of a trusted token issuer.
    JwtBearer,
    /// `token_exchange`, with the inbound token's type URI.
    TokenExchange(String),
}

/// One route: a `[[route]]` table, or the implicit route `default` that
/// `[proxy] upstream` makes (last, on `proxy.listen`, taking everything).
#[derive(Debug, Clone)]
pub(crate) struct RouteConfig {
    /// Its name, the `route` label of its metrics.
    pub(crate) name: String,
    /// Where its keys are written: `route.NAME`, or `proxy` for the
    /// implicit route (for messages).
    pub(crate) section: String,
    /// The listener it is served on (`listen`, else `proxy.listen`).
    pub(crate) listen: SocketAddr,
    /// The host it takes, as written (`name` or `name:port`).
    pub(crate) host: Option<String>,
    /// The path prefix it takes, as written.
    pub(crate) path_prefix: Option<String>,
    /// Remove the prefix before joining with the upstream's base path.
    pub(crate) strip_prefix: bool,
    /// Where its requests go.
    pub(crate) upstream: Uri,
    /// Extra CA certificates for an https upstream (else `[proxy]`'s).
    pub(crate) upstream_ca_file: Option<PathBuf>,
    /// The name of the source its token comes from.
    pub(crate) token_source: String,
    /// The header the token goes in.
    pub(crate) token_header: HeaderName,
    /// How the token is written into that header.
    pub(crate) token_format: TokenFormat,
    /// Keep the client's `Host`.
    pub(crate) preserve_host: bool,
    /// Add `Via` and `X-Forwarded-*`.
    pub(crate) forwarded_headers: bool,
    /// What escaped slashes in a path do.
    pub(crate) escaped_slashes: EscapedSlashes,
}

impl RouteConfig {
    /// `section.key`, for messages.
    pub(crate) fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.section)
    }
}

/// `[emulator]`: run the built-in emulator in-process (quick start).
#[derive(Debug, Clone)]
pub(crate) struct EmulatorSection {
    /// Where it listens.
    pub(crate) listen: SocketAddr,
    /// Lifetime of the access tokens it issues.
    pub(crate) access_token_lifetime: Duration,
    /// Whether it rotates refresh tokens.
    pub(crate) rotate_refresh_tokens: bool,
    /// The `interval` its device authorizations ask clients to poll at.
    pub(crate) device_poll_interval: Duration,
    /// A file the emulator keeps filled with a JWT of its test issuer, as a
    /// kubelet keeps a projected service-account token (quick start of the
    /// jwt_bearer source).
    pub(crate) assertion_file: Option<PathBuf>,
    /// The `sub` of those JWTs.
    pub(crate) assertion_subject: String,
    /// Their lifetime; each is replaced at 80% of it.
    pub(crate) assertion_lifetime: Duration,
}

/// Where the tokens live (`[store] kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreKind {
    /// In this process only (one replica).
    Local,
    /// In Redis, shared by every replica.
    Redis,
}

/// `[store]`: sharing tokens between replicas.
#[derive(Debug, Clone)]
pub(crate) struct StoreConfig {
    /// Where the tokens live.
    pub(crate) kind: StoreKind,
    /// `redis://` or `rediss://` URL without credentials (kind = "redis").
    pub(crate) url: Option<String>,
    /// Prepended to every Redis key.
    pub(crate) key_prefix: String,
    /// Redis ACL user.
    pub(crate) username: Option<String>,
    /// Redis password.
    pub(crate) password: Option<SecretSetting>,
    /// CA certificates for a `rediss://` server.
    pub(crate) ca_file: Option<PathBuf>,
    /// Time to live of the refresh lock.
    pub(crate) lock_lease: Duration,
    /// How long a replica waits for another's refresh.
    pub(crate) wait_timeout: Duration,
    /// Limit for each Redis command.
    pub(crate) command_timeout: Duration,
    /// Refresh with the local refresh token when Redis is unreachable.
    pub(crate) refresh_without_store: bool,
}

/// The whole file.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// The file it was read from.
    pub(crate) path: PathBuf,
    /// `[proxy]`.
    pub(crate) proxy: ProxyConfig,
    /// `[admin]`.
    pub(crate) admin: AdminConfig,
    /// `[oidc]`.
    pub(crate) oidc: OidcConfig,
    /// `[token]`.
    pub(crate) token: TokenConfig,
    /// Every token source by name: `"default"` (`[token]`) first, then the
    /// `[sources.NAME]` tables in name order.
    pub(crate) sources: Vec<SourceConfig>,
    /// Every route in matching order: the `[[route]]` tables as written,
    /// then the implicit `default` of `[proxy] upstream`.
    pub(crate) routes: Vec<RouteConfig>,
    /// `[retry]`.
    pub(crate) retry: RetryConfig,
    /// `[emulator]`, when present.
    pub(crate) emulator: Option<EmulatorSection>,
    /// `[store]`.
    pub(crate) store: StoreConfig,
    /// `[[sink]]`s, in config order.
    pub(crate) sinks: Vec<SinkConfig>,
    /// `[proxy] runtime`: how the binary schedules its listeners.
    pub(crate) runtime: RuntimeShape,
    /// `[proxy] cpu_affinity`: whether each core's runtime is bound to its
    /// CPU (`runtime = "thread_per_core"` only).
    pub(crate) cpu_affinity: CpuAffinity,
    /// The `[sources.NAME]` tables with `source = "exchange"`, in name
    /// order (not in `sources`: they hold no token of their own).
    pub(crate) exchanges: Vec<ExchangeConfig>,
}

/// How the binary runs the proxy's listeners (`[proxy] runtime`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum RuntimeShape {
    /// `"work_stealing"`: one tokio runtime with a worker per core, one
    /// listener and one upstream pool per route, shared by all workers.
    WorkStealing,
    /// `"thread_per_core"` (the default): one single-threaded runtime per
    /// core, each with its own `SO_REUSEPORT` listeners and upstream pools;
    /// the connection caps hold over all of them together.
    #[default]
    ThreadPerCore,
}

/// Whether the runtimes of `runtime = "thread_per_core"` are bound to
/// CPUs (`[proxy] cpu_affinity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum CpuAffinity {
    /// `"auto"` (the default): when the process starts as many runtimes as
    /// there are CPUs it may run on, two or more, runtime N is bound to the
    /// Nth of them; otherwise none is bound.
    #[default]
    Auto,
    /// `"off"`: the kernel places every runtime's thread.
    Off,
}

/// What `login` reads: a config file where only `[oidc]` and the login keys
/// of `[token]` are needed (`region` and `start_url`). Sections it does not
/// use are still validated when present, so a full config is accepted or
/// refused exactly as for the proxy.
#[derive(Debug, Clone)]
pub(crate) struct LoginConfig {
    /// The file it was read from.
    pub(crate) path: PathBuf,
    /// `[oidc]`.
    pub(crate) oidc: OidcConfig,
    /// `[token]`; `source` is `sso_cache` when not set.
    pub(crate) token: TokenConfig,
    /// `[retry]`.
    pub(crate) retry: RetryConfig,
    /// `[emulator]`, when present.
    pub(crate) emulator: Option<EmulatorSection>,
}

impl Config {
    /// Reads and validates a config file.
    pub(crate) fn load(path: &Path) -> Result<Self, ConfigError> {
        parse(&read_file(path)?, path, Reader::config)
    }

    /// Parses and validates config text; `path` is used in messages and to
    /// resolve relative paths.
    pub(crate) fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        parse(text, path, Reader::config)
    }
}

impl LoginConfig {
    /// Reads and validates a config file for `login`.
    pub(crate) fn load(path: &Path) -> Result<Self, ConfigError> {
        parse(&read_file(path)?, path, Reader::login)
    }
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        problems: vec![("(file)".to_owned(), format!("cannot read: {e}"))],
    })
}

/// The file's path inside a parsed config.
trait WithPath {
    fn set_path(&mut self, path: &Path);
}

impl WithPath for Config {
    fn set_path(&mut self, path: &Path) {
        self.path = path.to_path_buf();
    }
}

impl WithPath for LoginConfig {
    fn set_path(&mut self, path: &Path) {
        self.path = path.to_path_buf();
    }
}

fn parse<T: WithPath>(
    text: &str,
    path: &Path,
    read: fn(&mut Reader, &Table) -> Option<T>,
) -> Result<T, ConfigError> {
    let file = path.display().to_string();
    let table: Table = text.parse().map_err(|e: toml::de::Error| {
        let key = e
            .span()
            .map(|s| {
                let line = text[..s.start.min(text.len())].lines().count().max(1);
                format!("(line {line})")
            })
            .unwrap_or_else(|| "(syntax)".to_owned());
        ConfigError {
            file: file.clone(),
            problems: vec![(key, e.message().to_owned())],
        }
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut r = Reader {
        problems: Vec::new(),
        base,
        exchanges: Vec::new(),
    };
    match read(&mut r, &table) {
        Some(mut c) if r.problems.is_empty() => {
            c.set_path(path);
            Ok(c)
        }
        _ => Err(ConfigError {
            file,
            problems: r.problems,
        }),
    }
}

/// The AWS CLI's cache file for a session name or start URL:
/// `~/.aws/sso/cache/<sha1>.json`. `None` when `HOME` is not set.
pub(crate) fn default_sso_cache_file(session_name_or_start_url: &str) -> Option<PathBuf> {
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(
        Path::new(&home)
            .join(".aws/sso/cache")
            .join(crate::token::sso_cache_file_name(session_name_or_start_url)),
    )
}

/// Seconds in a day, for duration bounds.
const DAY: u64 = 24 * 3600;

const SECTIONS: &[&str] = &[
    "proxy", "admin", "oidc", "token", "sources", "route", "retry", "emulator", "store", "sink",
];

/// The keys of a `[[route]]`.
const ROUTE_KEYS: &[&str] = &[
    "name",
    "listen",
    "host",
    "path_prefix",
    "strip_prefix",
    "upstream",
    "upstream_ca_file",
    "token_source",
    "token_header",
    "token_format",
    "preserve_host",
    "forwarded_headers",
    "escaped_slashes",
];

/// The keys of `[token]`, which every `[sources.NAME]` also takes.
const TOKEN_KEYS: &[&str] = &[
    "source",
    "refresh_token",
    "refresh_token_file",
    "sso_cache_file",
    "state_file",
    "scopes",
    "refresh_before_expiry",
    "expiry_margin",
    "start_url",
    "session_name",
    "assertion_file",
    "device_login",
];

/// What `[sources.NAME]` takes beyond [`TOKEN_KEYS`]: its own client.
const SOURCE_CLIENT_KEYS: &[&str] = &["client_id", "client_secret", "client_secret_file"];

/// The keys of a `[sources.NAME]` with `source = "exchange"`.
const EXCHANGE_KEYS: &[&str] = &[
    "source",
    "client_id",
    "grant",
    "subject_token_type",
    "scopes",
    "inbound_header",
    "max_callers",
    "caller_failure_ttl",
    "max_concurrent_exchanges",
    "refresh_before_expiry",
    "expiry_margin",
];

/// `subject_token_type` when unset: an access token (what Identity Center
/// takes).
const DEFAULT_SUBJECT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// The name of the source `[token]` configures.
pub(crate) const DEFAULT_SOURCE: &str = "default";

/// Which command reads the file: `login` needs less.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Run,
    Login,
}

/// Each section as read; `None` where it is missing or has a problem.
struct Sections {
    proxy: Option<ProxyConfig>,
    admin: Option<AdminConfig>,
    oidc: Option<OidcConfig>,
    token: Option<TokenConfig>,
    sources: Vec<SourceConfig>,
    routes: Vec<RouteConfig>,
    retry: Option<RetryConfig>,
    emulator: Option<EmulatorSection>,
    store: Option<StoreConfig>,
    sinks: Vec<SinkConfig>,
    exchanges: Vec<ExchangeConfig>,
}

/// Walks the TOML table, collecting problems instead of stopping at the
/// first.
struct Reader {
    problems: Vec<(String, String)>,
    base: PathBuf,
    /// Exchange sources found while reading `[sources]`.
    exchanges: Vec<ExchangeConfig>,
}

struct Section<'a> {
    name: &'a str,
    table: Option<&'a Table>,
}

impl Reader {
    fn problem(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.problems.push((key.into(), reason.into()));
    }

    fn section<'a>(&mut self, root: &'a Table, name: &'a str, known: &[&str]) -> Section<'a> {
        let table = match root.get(name) {
            None => None,
            Some(Value::Table(t)) => Some(t),
            Some(_) => {
                self.problem(name, "must be a table ([section])");
                None
            }
        };
        if let Some(t) = table {
            for key in t.keys() {
                if !known.contains(&key.as_str()) {
                    self.problem(
                        format!("{name}.{key}"),
                        format!("unknown key (known keys: {})", known.join(", ")),
                    );
                }
            }
        }
        Section { name, table }
    }

    fn raw<'a>(&mut self, s: &Section<'a>, key: &str) -> Option<&'a Value> {
        s.table.and_then(|t| t.get(key))
    }

    fn string(&mut self, s: &Section<'_>, key: &str) -> Option<String> {
        match self.raw(s, key)? {
            Value::String(v) => Some(v.clone()),
            _ => {
                self.problem(format!("{}.{key}", s.name), "must be a string");
                None
            }
        }
    }

    fn non_empty_string(&mut self, s: &Section<'_>, key: &str) -> Option<String> {
        let v = self.string(s, key)?;
        if v.trim().is_empty() {
            self.problem(format!("{}.{key}", s.name), "must not be empty");
            return None;
        }
        Some(v)
    }

    fn required_string(&mut self, s: &Section<'_>, key: &str) -> Option<String> {
        let v = self.string(s, key);
        if v.is_none() && self.raw(s, key).is_none() {
            self.problem(format!("{}.{key}", s.name), "missing required key");
        }
        v
    }

    fn boolean(&mut self, s: &Section<'_>, key: &str, default: bool) -> bool {
        match self.raw(s, key) {
            None => default,
            Some(Value::Boolean(b)) => *b,
            Some(_) => {
                self.problem(format!("{}.{key}", s.name), "must be true or false");
                default
            }
        }
    }

    fn integer(
        &mut self,
        s: &Section<'_>,
        key: &str,
        default: i64,
        range: std::ops::RangeInclusive<i64>,
    ) -> i64 {
        match self.raw(s, key) {
            None => default,
            Some(Value::Integer(i)) if range.contains(i) => *i,
            Some(_) => {
                self.problem(
                    format!("{}.{key}", s.name),
                    format!(
                        "must be an integer from {} to {}",
                        range.start(),
                        range.end()
                    ),
                );
                default
            }
        }
    }

    /// A count that must lie in `range`.
    fn count(
        &mut self,
        s: &Section<'_>,
        key: &str,
        default: usize,
        range: std::ops::RangeInclusive<usize>,
    ) -> usize {
        let range = (*range.start() as i64)..=(*range.end() as i64);
        self.integer(s, key, default as i64, range) as usize
    }

    /// A duration that must lie in `range`: every duration key has one, so
    /// no value from a config file can overflow a clock.
    fn duration_within(
        &mut self,
        s: &Section<'_>,
        key: &str,
        default: Duration,
        range: std::ops::RangeInclusive<Duration>,
    ) -> Duration {
        let Some(text) = self.string(s, key) else {
            return default;
        };
        let value = match humantime::parse_duration(text.trim()) {
            Ok(d) => d,
            Err(e) => {
                self.problem(
                    format!("{}.{key}", s.name),
                    format!(
                        "`{text}` is not a duration ({e}); write e.g. \"250ms\", \"30s\", \"5m\""
                    ),
                );
                return default;
            }
        };
        if range.contains(&value) {
            return value;
        }
        self.problem(
            format!("{}.{key}", s.name),
            format!(
                "`{text}` is out of range: must be from {} to {}",
                humantime::format_duration(*range.start()),
                humantime::format_duration(*range.end())
            ),
        );
        default
    }

    fn escaped_slashes(&mut self, s: &Section<'_>, default: EscapedSlashes) -> EscapedSlashes {
        match self.string(s, "escaped_slashes").as_deref() {
            None => default,
            Some("keep") => EscapedSlashes::Keep,
            Some("reject") => EscapedSlashes::Reject,
            Some(other) => {
                self.problem(
                    format!("{}.escaped_slashes", s.name),
                    format!("`{other}` is not a policy; write \"keep\" or \"reject\""),
                );
                default
            }
        }
    }

    fn socket_addr(&mut self, s: &Section<'_>, key: &str, required: bool) -> Option<SocketAddr> {
        let text = if required {
            self.required_string(s, key)?
        } else {
            self.string(s, key)?
        };
        match text.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    format!("{}.{key}", s.name),
                    format!("`{text}` is not an address; write IP:PORT, e.g. \"127.0.0.1:8080\""),
                );
                None
            }
        }
    }

    fn path(&mut self, s: &Section<'_>, key: &str) -> Option<PathBuf> {
        let text = self.string(s, key)?;
        if text.trim().is_empty() {
            self.problem(format!("{}.{key}", s.name), "must not be empty");
            return None;
        }
        let p = expand_tilde(&text);
        Some(if p.is_relative() {
            self.base.join(p)
        } else {
            p
        })
    }

    /// `key` inline or `key_file`; exactly one when `required`.
    fn secret(&mut self, s: &Section<'_>, key: &str, required: bool) -> Option<SecretSetting> {
        let file_key = format!("{key}_file");
        let inline = self.string(s, key);
        let file = self.path(s, &file_key);
        match (inline, file) {
            (Some(_), Some(_)) => {
                self.problem(
                    format!("{}.{key}", s.name),
                    format!("set either {key} or {file_key}, not both"),
                );
                None
            }
            (Some(v), None) => {
                if v.is_empty() {
                    self.problem(format!("{}.{key}", s.name), "must not be empty");
                    return None;
                }
                Some(SecretSetting {
                    value: Secret::new(v),
                    file: None,
                    modified: None,
                })
            }
            (None, Some(path)) => match read_secret_file(&path) {
                Ok((value, modified)) => Some(SecretSetting {
                    value,
                    file: Some(path),
                    modified,
                }),
                Err(reason) => {
                    self.problem(format!("{}.{file_key}", s.name), reason);
                    None
                }
            },
            (None, None) => {
                if required {
                    self.problem(
                        format!("{}.{key}", s.name),
                        format!("missing: set {key} or {file_key}"),
                    );
                }
                None
            }
        }
    }

    fn config(&mut self, root: &Table) -> Option<Config> {
        let s = self.sections(root, Purpose::Run);
        Some(Config {
            path: PathBuf::new(),
            proxy: s.proxy?,
            admin: s.admin?,
            oidc: s.oidc?,
            token: s.token?,
            sources: s.sources,
            routes: s.routes,
            retry: s.retry?,
            emulator: s.emulator,
            store: s.store?,
            sinks: s.sinks,
            runtime: self.runtime(root),
            cpu_affinity: self.cpu_affinity(root),
            exchanges: s.exchanges,
        })
    }

    /// `[proxy] runtime` (read apart from [`ProxyConfig`], which the library
    /// shares: the runtime is the binary's business).
    fn runtime(&mut self, root: &Table) -> RuntimeShape {
        let s = Section {
            name: "proxy",
            table: root.get("proxy").and_then(Value::as_table),
        };
        match self.string(&s, "runtime").as_deref() {
            Some("work_stealing") => RuntimeShape::WorkStealing,
            None | Some("thread_per_core") => RuntimeShape::ThreadPerCore,
            Some(other) => {
                self.problem(
                    "proxy.runtime",
                    format!(
                        "`{other}` is not a runtime; write \"work_stealing\" or \"thread_per_core\""
                    ),
                );
                RuntimeShape::default()
            }
        }
    }

    /// `[proxy] cpu_affinity`, read apart for the same reason as `runtime`.
    fn cpu_affinity(&mut self, root: &Table) -> CpuAffinity {
        let s = Section {
            name: "proxy",
            table: root.get("proxy").and_then(Value::as_table),
        };
        match self.string(&s, "cpu_affinity").as_deref() {
            None | Some("auto") => CpuAffinity::Auto,
            Some("off") => CpuAffinity::Off,
            Some(other) => {
                self.problem(
                    "proxy.cpu_affinity",
                    format!("`{other}` is not a CPU affinity; write \"auto\" or \"off\""),
                );
                CpuAffinity::default()
            }
        }
    }

    fn login(&mut self, root: &Table) -> Option<LoginConfig> {
        let s = self.sections(root, Purpose::Login);
        Some(LoginConfig {
            path: PathBuf::new(),
            oidc: s.oidc?,
            token: s.token?,
            retry: s.retry?,
            emulator: s.emulator,
        })
    }

    /// Every section, with the checks across sections. For `login`, a
    /// missing `[proxy]` or `[admin]` is fine; present ones are checked.
    fn sections(&mut self, root: &Table, purpose: Purpose) -> Sections {
        for key in root.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                self.problem(
                    key.clone(),
                    format!("unknown section (known: {})", SECTIONS.join(", ")),
                );
            }
        }
        let optional = |name: &str| purpose == Purpose::Login && !root.contains_key(name);
        let proxy = if optional("proxy") {
            None
        } else {
            self.proxy(root)
        };
        let admin = if optional("admin") {
            None
        } else {
            self.admin(root)
        };
        let oidc = self.oidc(root);
        let token = self.token(root, purpose);
        let retry = self.retry(root);
        let emulator = self.emulator(root);
        let store = self.store(root);
        let sources = match (&oidc, &token) {
            (Some(oidc), Some(token)) => self.sources(root, oidc, token),
            _ => Vec::new(),
        };
        if let Some(store) = &store {
            self.sources_share_credentials(&sources, store);
        }
        for source in sources.iter().filter(|s| s.token.device_login) {
            if source.client_id.is_some() != source.client_secret.is_some() {
                self.problem(
                    format!("{}.client_secret", source.client_section),
                    format!(
                        "{} = true: set both client_id and client_secret (a registered client), or neither (the proxy registers one with RegisterClient)",
                        source.key("device_login")
                    ),
                );
            }
        }
        if let Some(oidc) = &oidc {
            for source in sources
                .iter()
                .filter(|s| s.token.source == SourceKind::JwtBearer)
            {
                self.jwt_bearer_client(oidc, source);
            }
        }
        let routes = match (&proxy, &admin) {
            (Some(proxy), Some(admin)) => {
                self.routes(root, proxy, admin, emulator.as_ref(), &sources)
            }
            _ => Vec::new(),
        };
        let sinks = self.sinks(root, oidc.as_ref(), &sources);
        if let (Some(oidc), Some(token)) = (&oidc, &token)
            && token.source == SourceKind::RefreshToken
            && !token.device_login
        {
            let reported = |r: &Self, key: &str| r.problems.iter().any(|(k, _)| k.starts_with(key));
            if oidc.client_id.is_none() && !reported(self, "oidc.client_id") {
                self.problem(
                    "oidc.client_id",
                    "missing required key (token.source = \"refresh_token\" needs it)",
                );
            }
            if oidc.client_secret.is_none() && !reported(self, "oidc.client_secret") {
                self.problem(
                    "oidc.client_secret",
                    "missing: set client_secret or client_secret_file (token.source = \"refresh_token\" needs it)",
                );
            }
        }
        if let (Some(token), Some(store)) = (&token, &store)
            && store.kind == StoreKind::Redis
            && token.source != SourceKind::RefreshToken
        {
            self.problem(
                "store.kind",
                "\"redis\" shares refresh-token state; it needs token.source = \"refresh_token\"",
            );
        }
        if let (Some(p), Some(a)) = (&proxy, &admin)
            && p.listen == a.listen
            && p.listen.port() != 0
        {
            self.problem("admin.listen", "must differ from proxy.listen");
        }
        let exchanges = std::mem::take(&mut self.exchanges);
        Sections {
            proxy,
            admin,
            oidc,
            token,
            sources,
            routes,
            retry,
            emulator,
            store,
            sinks,
            exchanges,
        }
    }

    /// A `[sources.NAME]` with `source = "exchange"`.
    fn exchange_source(
        &mut self,
        name: &str,
        s: &Section<'_>,
        table: &Table,
        oidc: &OidcConfig,
    ) -> Option<ExchangeConfig> {
        let key = |k: &str| format!("{}.{k}", s.name);
        for k in table.keys() {
            if !EXCHANGE_KEYS.contains(&k.as_str()) {
                self.problem(
                    key(k),
                    format!(
                        "unknown key for source = \"exchange\" (known keys: {})",
                        EXCHANGE_KEYS.join(", ")
                    ),
                );
            }
        }
        if !cfg!(feature = "aws-iam") {
            self.problem(
                key("source"),
                "\"exchange\" needs AWS IAM support, which this build leaves out (Cargo feature `aws-iam`)",
            );
            return None;
        }
        let application_arn = match self.string(s, "client_id") {
            Some(id) if is_application_arn(&id) => Some(id),
            Some(id) => {
                self.problem(
                    key("client_id"),
                    format!(
                        "`{id}` is not an application ARN; source = \"exchange\" needs the ARN of an Identity Center application (arn:aws:sso::ACCOUNT:application/...)"
                    ),
                );
                None
            }
            None => {
                self.problem(
                    key("client_id"),
                    "missing required key (source = \"exchange\" needs the application ARN, e.g. \"arn:aws:sso::111122223333:application/ssoins-.../apl-...\")",
                );
                None
            }
        };
        let subject_token_type = self.non_empty_string(s, "subject_token_type");
        let grant = match self.string(s, "grant").as_deref() {
            None | Some("jwt_bearer") => {
                if subject_token_type.is_some() {
                    self.problem(
                        key("subject_token_type"),
                        "only for grant = \"token_exchange\"",
                    );
                }
                Some(ExchangeGrant::JwtBearer)
            }
            Some("token_exchange") => Some(ExchangeGrant::TokenExchange(
                subject_token_type.unwrap_or_else(|| DEFAULT_SUBJECT_TOKEN_TYPE.to_owned()),
            )),
            Some(other) => {
                self.problem(
                    key("grant"),
                    format!("`{other}` is not a grant; use \"jwt_bearer\" or \"token_exchange\""),
                );
                None
            }
        };
        let scopes = match self.raw(s, "scopes") {
            None => Vec::new(),
            Some(Value::Array(items)) if items.iter().all(Value::is_str) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            Some(_) => {
                self.problem(key("scopes"), "must be a list of strings");
                Vec::new()
            }
        };
        let inbound_header = match self.string(s, "inbound_header") {
            None => Some(http::header::AUTHORIZATION),
            Some(text) => match HeaderName::from_bytes(text.as_bytes()) {
                Ok(h) => match check_token_header(&h) {
                    Ok(()) => Some(h),
                    Err(reason) => {
                        self.problem(key("inbound_header"), reason);
                        None
                    }
                },
                Err(_) => {
                    self.problem(
                        key("inbound_header"),
                        format!("`{text}` is not a header name; write e.g. \"Authorization\" or \"X-Caller-Token\""),
                    );
                    None
                }
            },
        };
        let max_callers = self.integer(s, "max_callers", 10_000, 1..=10_000_000) as u64;
        let caller_failure_ttl = self.duration_within(
            s,
            "caller_failure_ttl",
            Duration::from_secs(30),
            Duration::from_secs(1)..=Duration::from_secs(3600),
        );
        let max_concurrent_exchanges = self.count(s, "max_concurrent_exchanges", 32, 1..=1024);
        let refresh_before_expiry = self.duration_within(
            s,
            "refresh_before_expiry",
            Duration::from_secs(300),
            Duration::ZERO..=Duration::from_secs(7 * DAY),
        );
        let expiry_margin = self.duration_within(
            s,
            "expiry_margin",
            Duration::from_secs(10),
            Duration::ZERO..=Duration::from_secs(DAY),
        );
        if oidc.region.is_none() && !self.problems.iter().any(|(k, _)| k == "oidc.region") {
            self.problem(
                "oidc.region",
                format!(
                    "missing: {} = \"exchange\" signs requests with SigV4 and needs the region (also with an explicit endpoint)",
                    key("source")
                ),
            );
        }
        Some(ExchangeConfig {
            name: name.to_owned(),
            application_arn: application_arn?,
            grant: grant?,
            scopes,
            inbound_header: inbound_header?,
            max_callers,
            caller_failure_ttl,
            max_concurrent_exchanges,
            refresh_before_expiry,
            expiry_margin,
        })
    }

    /// A jwt_bearer source's client: an application ARN as its client id,
    /// and a region to sign for.
    fn jwt_bearer_client(&mut self, oidc: &OidcConfig, source: &SourceConfig) {
        let reported = |r: &Self, key: &str| r.problems.iter().any(|(k, _)| k.starts_with(key));
        let key = format!("{}.client_id", source.client_section);
        match source.client_id.as_deref() {
            None if !reported(self, &key) => self.problem(
                key,
                format!(
                    "missing required key ({} = \"jwt_bearer\" needs the application ARN, e.g. \"arn:aws:sso::111122223333:application/ssoins-.../apl-...\")",
                    source.key("source")
                ),
            ),
            Some(id) if !is_application_arn(id) => self.problem(
                key,
                format!(
                    "`{id}` is not an application ARN; {} = \"jwt_bearer\" needs the ARN of an Identity Center application (arn:aws:sso::ACCOUNT:application/...)",
                    source.key("source")
                ),
            ),
            _ => {}
        }
        if oidc.region.is_none() && !reported(self, "oidc.region") {
            self.problem(
                "oidc.region",
                format!(
                    "missing: {} = \"jwt_bearer\" signs requests with SigV4 and needs the region (also with an explicit endpoint)",
                    source.key("source")
                ),
            );
        }
    }

    fn proxy(&mut self, root: &Table) -> Option<ProxyConfig> {
        let s = self.section(
            root,
            "proxy",
            &[
                "listen",
                "upstream",
                "upstream_ca_file",
                "preserve_host",
                "forwarded_headers",
                "shutdown_grace",
                "header_read_timeout",
                "upstream_connect_timeout",
                "upstream_response_timeout",
                "idle_timeout",
                "max_replay_body_bytes",
                "replay_buffer_bytes",
                "escaped_slashes",
                "request_body_timeout",
                "send_timeout",
                "drain_timeout",
                "max_connections",
                "max_request_header_bytes",
                "upstream_max_connections",
                "upstream_queue_timeout",
                "upstream_connect_wait",
                "upstream_connect_wait_above",
                "upstream_max_response_headers",
                "upstream_max_response_header_bytes",
                "http2_max_concurrent_streams",
                "http2_max_pending_accept_reset_streams",
                "http2_max_local_error_reset_streams",
                "http2_max_control_frames_per_second",
                "runtime",
                "cpu_affinity",
            ],
        );
        // A token-only sidecar: sinks, and nothing to proxy.
        let token_only = root.contains_key("sink")
            && !root.contains_key("route")
            && self.raw(&s, "upstream").is_none();
        if s.table.is_none() && root.get("proxy").is_none() {
            if token_only {
                return Some(ProxyConfig::for_routes(SocketAddr::from((
                    [127, 0, 0, 1],
                    0,
                ))));
            }
            self.problem("proxy", "missing required section");
            return None;
        }
        let listen = if token_only && self.raw(&s, "listen").is_none() {
            Some(SocketAddr::from(([127, 0, 0, 1], 0)))
        } else {
            self.socket_addr(&s, "listen", true)
        };
        // Without routes every request goes to `upstream`; with them it is
        // the implicit route `default`, which may be left out; with only
        // sinks there is nothing to proxy.
        let upstream = match self.string(&s, "upstream") {
            Some(text) => Some(self.upstream_url("proxy.upstream", &text)?),
            None if self.raw(&s, "upstream").is_some() => return None,
            None if !root.contains_key("route") && !token_only => {
                self.problem(
                    "proxy.upstream",
                    "missing required key (where requests go), or add [[route]] tables (or only [[sink]]s for a token-only sidecar)",
                );
                return None;
            }
            None => None,
        };
        if token_only && self.raw(&s, "listen").is_some() {
            self.problem(
                "proxy.listen",
                "nothing listens there: there is no proxy.upstream and no [[route]] (a token-only sidecar with [[sink]]s needs neither)",
            );
        }
        let upstream_ca_file = self.path(&s, "upstream_ca_file");
        if let Some(p) = &upstream_ca_file
            && let Err(e) = std::fs::metadata(p)
        {
            self.problem(
                "proxy.upstream_ca_file",
                format!("cannot read {}: {e}", p.display()),
            );
        }
        let d = ProxyConfig {
            upstream,
            ..ProxyConfig::for_routes(listen?)
        };
        // Bounds: wide enough for any real client or upstream, narrow
        // enough that a typo cannot hold connections for days or disable a
        // limit.
        let seconds = Duration::from_secs;
        let ms = Duration::from_millis;
        let cfg = ProxyConfig {
            upstream_ca_file,
            preserve_host: self.boolean(&s, "preserve_host", d.preserve_host),
            forwarded_headers: self.boolean(&s, "forwarded_headers", d.forwarded_headers),
            shutdown_grace: self.duration_within(
                &s,
                "shutdown_grace",
                d.shutdown_grace,
                Duration::ZERO..=seconds(3600),
            ),
            header_read_timeout: self.duration_within(
                &s,
                "header_read_timeout",
                d.header_read_timeout,
                ms(100)..=seconds(3600),
            ),
            upstream_connect_timeout: self.duration_within(
                &s,
                "upstream_connect_timeout",
                d.upstream_connect_timeout,
                ms(10)..=seconds(600),
            ),
            upstream_response_timeout: self.duration_within(
                &s,
                "upstream_response_timeout",
                d.upstream_response_timeout,
                ms(100)..=seconds(DAY),
            ),
            idle_timeout: self.duration_within(
                &s,
                "idle_timeout",
                d.idle_timeout,
                ms(100)..=seconds(DAY),
            ),
            max_replay_body_bytes: self.integer(
                &s,
                "max_replay_body_bytes",
                d.max_replay_body_bytes as i64,
                0..=16 * 1024 * 1024,
            ) as usize,
            replay_buffer_bytes: self.integer(
                &s,
                "replay_buffer_bytes",
                d.replay_buffer_bytes as i64,
                0..=4 * 1024 * 1024 * 1024,
            ) as usize,
            escaped_slashes: self.escaped_slashes(&s, d.escaped_slashes),
            request_body_timeout: self.duration_within(
                &s,
                "request_body_timeout",
                d.request_body_timeout,
                ms(100)..=seconds(3600),
            ),
            send_timeout: self.duration_within(
                &s,
                "send_timeout",
                d.send_timeout,
                ms(100)..=seconds(3600),
            ),
            drain_timeout: self.duration_within(
                &s,
                "drain_timeout",
                d.drain_timeout,
                ms(10)..=seconds(600),
            ),
            max_connections: self.count(&s, "max_connections", d.max_connections, 1..=1_000_000),
            max_request_header_bytes: self.count(
                &s,
                "max_request_header_bytes",
                d.max_request_header_bytes,
                8 * 1024..=1024 * 1024,
            ),
            upstream_max_connections: self.count(
                &s,
                "upstream_max_connections",
                d.upstream_max_connections,
                1..=1_000_000,
            ),
            upstream_queue_timeout: self.duration_within(
                &s,
                "upstream_queue_timeout",
                d.upstream_queue_timeout,
                ms(1)..=seconds(600),
            ),
            upstream_connect_wait: self.duration_within(
                &s,
                "upstream_connect_wait",
                d.upstream_connect_wait,
                Duration::ZERO..=seconds(60),
            ),
            upstream_connect_wait_above: self.count(
                &s,
                "upstream_connect_wait_above",
                d.upstream_connect_wait_above,
                1..=1_000_000,
            ),
            upstream_max_response_headers: self.count(
                &s,
                "upstream_max_response_headers",
                d.upstream_max_response_headers,
                100..=10_000,
            ),
            upstream_max_response_header_bytes: self.count(
                &s,
                "upstream_max_response_header_bytes",
                d.upstream_max_response_header_bytes,
                8 * 1024..=16 * 1024 * 1024,
            ),
            http2_max_concurrent_streams: self.count(
                &s,
                "http2_max_concurrent_streams",
                d.http2_max_concurrent_streams as usize,
                1..=10_000,
            ) as u32,
            http2_max_pending_accept_reset_streams: self.count(
                &s,
                "http2_max_pending_accept_reset_streams",
                d.http2_max_pending_accept_reset_streams,
                1..=10_000,
            ),
            http2_max_local_error_reset_streams: self.count(
                &s,
                "http2_max_local_error_reset_streams",
                d.http2_max_local_error_reset_streams,
                1..=1_000_000,
            ),
            http2_max_control_frames_per_second: self.count(
                &s,
                "http2_max_control_frames_per_second",
                d.http2_max_control_frames_per_second as usize,
                10..=1_000_000,
            ) as u32,
            ..d
        };
        Some(cfg)
    }

    fn upstream_url(&mut self, key: &str, text: &str) -> Option<Uri> {
        let uri: Uri = match text.parse() {
            Ok(u) => u,
            Err(e) => {
                self.problem(key, format!("`{text}` is not a URL: {e}"));
                return None;
            }
        };
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            Some(other) => {
                self.problem(
                    key,
                    format!("scheme `{other}` is not supported; use http:// or https://"),
                );
                return None;
            }
            None => {
                self.problem(
                    key,
                    format!("`{text}` has no scheme; write e.g. http://127.0.0.1:9000"),
                );
                return None;
            }
        }
        if uri.host().is_none_or(str::is_empty) {
            self.problem(key, format!("`{text}` has no host"));
            return None;
        }
        if uri.query().is_some() {
            self.problem(key, "must not have a query string");
            return None;
        }
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            self.problem(key, "must not contain user info");
            return None;
        }
        Some(uri)
    }

    fn admin(&mut self, root: &Table) -> Option<AdminConfig> {
        let s = self.section(root, "admin", &["listen"]);
        if root.get("admin").is_none() {
            self.problem("admin", "missing required section");
            return None;
        }
        Some(AdminConfig {
            listen: self.socket_addr(&s, "listen", true)?,
        })
    }

    fn oidc(&mut self, root: &Table) -> Option<OidcConfig> {
        let s = self.section(
            root,
            "oidc",
            &[
                "endpoint",
                "region",
                "use_fips",
                "use_dual_stack",
                "client_id",
                "client_secret",
                "client_secret_file",
                "connect_timeout",
                "call_timeout",
            ],
        );
        if root.get("oidc").is_none() {
            self.problem("oidc", "missing required section");
            return None;
        }
        let cfg = OidcConfig {
            endpoint: self.string(&s, "endpoint"),
            region: self.string(&s, "region"),
            use_fips: self.boolean(&s, "use_fips", false),
            use_dual_stack: self.boolean(&s, "use_dual_stack", false),
            client_id: self.string(&s, "client_id").filter(|c| !c.is_empty()),
            client_secret: self.secret(&s, "client_secret", false),
            connect_timeout: self.duration_within(
                &s,
                "connect_timeout",
                Duration::from_secs(5),
                Duration::from_millis(10)..=Duration::from_secs(600),
            ),
            call_timeout: self.duration_within(
                &s,
                "call_timeout",
                Duration::from_secs(15),
                Duration::from_millis(100)..=Duration::from_secs(600),
            ),
        };
        if cfg.endpoint.is_none() && cfg.region.is_none() {
            self.problem(
                "oidc.region",
                "missing: set region (or an explicit endpoint)",
            );
        } else if let Err(e) = resolve_endpoint(&cfg.endpoint_params()) {
            let key = if cfg.endpoint.is_some() {
                "oidc.endpoint"
            } else {
                "oidc.region"
            };
            self.problem(key, e.to_string());
        }
        Some(cfg)
    }

    /// Every token source: `"default"` from `[token]` and `[oidc]`'s
    /// client, then each `[sources.NAME]`.
    fn sources(
        &mut self,
        root: &Table,
        oidc: &OidcConfig,
        token: &TokenConfig,
    ) -> Vec<SourceConfig> {
        let mut out = vec![SourceConfig {
            name: DEFAULT_SOURCE.to_owned(),
            section: "token".to_owned(),
            token: token.clone(),
            client_id: oidc.client_id.clone(),
            client_secret: oidc.client_secret.clone(),
            client_section: "oidc".to_owned(),
        }];
        let tables = match root.get("sources") {
            None => return out,
            Some(Value::Table(t)) => t,
            Some(_) => {
                self.problem("sources", "must be tables, one per source ([sources.NAME])");
                return out;
            }
        };
        let token_table = match root.get("token") {
            Some(Value::Table(t)) => Some(t),
            _ => None,
        };
        for (name, value) in tables {
            let section = format!("sources.{name}");
            let Value::Table(table) = value else {
                self.problem(&section, "must be a table ([sources.NAME])");
                continue;
            };
            if let Err(reason) = check_name(name) {
                self.problem(&section, reason);
                continue;
            }
            if name == DEFAULT_SOURCE {
                self.problem(
                    &section,
                    "\"default\" is the source [token] configures; give this one another name",
                );
                continue;
            }
            let own = Section {
                name: &section,
                table: Some(table),
            };
            if table.get("source").and_then(Value::as_str) == Some("exchange") {
                if let Some(exchange) = self.exchange_source(name, &own, table, oidc) {
                    self.exchanges.push(exchange);
                }
                continue;
            }
            let known: Vec<&str> = TOKEN_KEYS
                .iter()
                .chain(SOURCE_CLIENT_KEYS)
                .copied()
                .collect();
            for key in table.keys() {
                if !known.contains(&key.as_str()) {
                    self.problem(
                        format!("{section}.{key}"),
                        format!("unknown key (known keys: {})", known.join(", ")),
                    );
                }
            }
            let parsed = if table.contains_key("source") {
                self.token_keys(&own, Purpose::Run)
            } else if let Some(inherited) = token_table {
                self.inheriting_token_keys(&section, table, inherited)
            } else {
                // `[token]` is missing, which is reported.
                None
            };
            let Some(parsed) = parsed else {
                continue;
            };
            let client_id = match self.string(&own, "client_id") {
                Some(id) if !id.is_empty() => Some(id),
                Some(_) => {
                    self.problem(format!("{section}.client_id"), "must not be empty");
                    None
                }
                None => oidc.client_id.clone(),
            };
            let own_secret = self.secret(&own, "client_secret", false);
            let has_own_client = table.contains_key("client_id")
                || table.contains_key("client_secret")
                || table.contains_key("client_secret_file");
            let client_section = if has_own_client {
                section.clone()
            } else {
                "oidc".to_owned()
            };
            if parsed.source == SourceKind::RefreshToken && !parsed.device_login {
                let reported =
                    |r: &Self, key: &str| r.problems.iter().any(|(k, _)| k.starts_with(key));
                if client_id.is_none() && !reported(self, &format!("{section}.client_id")) {
                    self.problem(
                        format!("{section}.client_id"),
                        "missing: set client_id here or in [oidc] (source = \"refresh_token\" needs it)",
                    );
                }
                if own_secret.is_none()
                    && oidc.client_secret.is_none()
                    && !reported(self, &format!("{section}.client_secret"))
                {
                    self.problem(
                        format!("{section}.client_secret"),
                        "missing: set client_secret or client_secret_file here or in [oidc] (source = \"refresh_token\" needs it)",
                    );
                }
            }
            out.push(SourceConfig {
                name: name.clone(),
                section,
                token: parsed,
                client_id,
                client_secret: own_secret.or_else(|| oidc.client_secret.clone()),
                client_section,
            });
        }
        out
    }

    /// A `[sources.NAME]` without `source`: `[token]` with the keys `own`
    /// sets put in place of its own. Problems are reported for the keys
    /// `own` sets; those of inherited keys are already reported under
    /// `token.`.
    fn inheriting_token_keys(
        &mut self,
        section: &str,
        own: &Table,
        inherited: &Table,
    ) -> Option<TokenConfig> {
        let mut merged = inherited.clone();
        for (key, value) in own {
            if !TOKEN_KEYS.contains(&key.as_str()) {
                continue;
            }
            // `x` and `x_file` are one setting: the source's replaces both.
            let base = key.strip_suffix("_file").unwrap_or(key);
            merged.remove(base);
            merged.remove(&format!("{base}_file"));
            merged.insert(key.clone(), value.clone());
        }
        let before = self.problems.len();
        let parsed = self.token_keys(
            &Section {
                name: section,
                table: Some(&merged),
            },
            Purpose::Run,
        );
        let prefix = format!("{section}.");
        let mut found = self.problems.split_off(before);
        found.retain(|(key, _)| {
            key.strip_prefix(&prefix).is_none_or(|k| {
                let base = k.strip_suffix("_file").unwrap_or(k);
                own.contains_key(base) || own.contains_key(&format!("{base}_file"))
            })
        });
        self.problems.extend(found);
        parsed
    }

    /// Sources that hold the same credential must not undo each other:
    /// those sharing a refresh token share its state file, and an SSO cache
    /// file (one session) belongs to one source.
    fn sources_share_credentials(&mut self, sources: &[SourceConfig], store: &StoreConfig) {
        for (i, b) in sources.iter().enumerate() {
            for a in &sources[..i] {
                match (a.token.source, b.token.source) {
                    (SourceKind::RefreshToken, SourceKind::RefreshToken)
                        if shares_refresh_token(a, b) =>
                    {
                        if let (Some(pa), Some(pb)) = (&a.token.state_file, &b.token.state_file)
                            && pa != pb
                        {
                            self.problem(
                                b.key("state_file"),
                                format!(
                                    "source `{}` uses the same client and refresh token with state_file {}; sources that share a refresh token share its state file (set the same one, or leave it out here)",
                                    a.name,
                                    pa.display()
                                ),
                            );
                        }
                        if store.kind == StoreKind::Redis && a.token.scopes != b.token.scopes {
                            self.problem(
                                "store.kind",
                                format!(
                                    "sources `{}` and `{}` share a refresh token with different scopes; the shared store keeps one access token per refresh token, so with kind = \"redis\" give each its own refresh token",
                                    a.name, b.name
                                ),
                            );
                        }
                    }
                    (SourceKind::SsoCache, SourceKind::SsoCache)
                        if a.token.sso_cache_file.is_some()
                            && a.token.sso_cache_file == b.token.sso_cache_file =>
                    {
                        self.problem(
                            b.key("sso_cache_file"),
                            format!(
                                "also the cache file of source `{}`; a cache file holds one session's tokens, so name one source for it and use that one",
                                a.name
                            ),
                        );
                    }
                    _ => {}
                }
            }
        }
    }

    /// The `[[route]]` tables in order, then the implicit route `default`
    /// of `[proxy] upstream`, with the checks across routes.
    fn routes(
        &mut self,
        root: &Table,
        proxy: &ProxyConfig,
        admin: &AdminConfig,
        emulator: Option<&EmulatorSection>,
        sources: &[SourceConfig],
    ) -> Vec<RouteConfig> {
        let tables: Vec<&Table> = match root.get("route") {
            None => Vec::new(),
            Some(Value::Array(items)) => {
                let tables: Vec<&Table> = items.iter().filter_map(Value::as_table).collect();
                if tables.len() != items.len() {
                    self.problem("route", "must be tables: write [[route]]");
                }
                tables
            }
            Some(_) => {
                self.problem(
                    "route",
                    "must be an array of tables: write [[route]], not [route]",
                );
                return Vec::new();
            }
        };
        let mut routes: Vec<RouteConfig> = Vec::new();
        for (i, table) in tables.into_iter().enumerate() {
            if let Some(route) = self.route(i, table, proxy, admin, emulator, sources, &routes) {
                routes.push(route);
            }
        }
        if let Some(upstream) = &proxy.upstream {
            if let Some(taken) = routes.iter().find(|r| r.name == DEFAULT_ROUTE) {
                self.problem(
                    taken.key("name"),
                    "\"default\" is the route [proxy] upstream makes; give this one another name",
                );
            }
            routes.push(RouteConfig {
                name: DEFAULT_ROUTE.to_owned(),
                section: "proxy".to_owned(),
                listen: proxy.listen,
                host: None,
                path_prefix: None,
                strip_prefix: false,
                upstream: upstream.clone(),
                upstream_ca_file: None,
                token_source: DEFAULT_SOURCE.to_owned(),
                token_header: http::header::AUTHORIZATION,
                token_format: TokenFormat::bearer(),
                preserve_host: proxy.preserve_host,
                forwarded_headers: proxy.forwarded_headers,
                escaped_slashes: proxy.escaped_slashes,
            });
        }
        self.unreachable_routes(&routes);
        routes
    }

    /// One `[[route]]`, the `index`th (from 0); `earlier` are those before.
    #[allow(clippy::too_many_arguments)]
    fn route(
        &mut self,
        index: usize,
        table: &Table,
        proxy: &ProxyConfig,
        admin: &AdminConfig,
        emulator: Option<&EmulatorSection>,
        sources: &[SourceConfig],
        earlier: &[RouteConfig],
    ) -> Option<RouteConfig> {
        // Named by its name once that is usable, by its place before.
        let placed = format!("route[{}]", index + 1);
        let name = match table.get("name") {
            Some(Value::String(n)) => match check_name(n) {
                Ok(()) => Some(n.clone()),
                Err(reason) => {
                    self.problem(format!("{placed}.name"), reason);
                    None
                }
            },
            Some(_) => {
                self.problem(format!("{placed}.name"), "must be a string");
                None
            }
            None => {
                self.problem(
                    format!("{placed}.name"),
                    "missing required key (the route's name, its metric label)",
                );
                None
            }
        };
        let section_name = name.as_ref().map_or(placed, |n| format!("route.{n}"));
        let s = Section {
            name: &section_name,
            table: Some(table),
        };
        for key in table.keys() {
            if !ROUTE_KEYS.contains(&key.as_str()) {
                self.problem(
                    format!("{section_name}.{key}"),
                    format!("unknown key (known keys: {})", ROUTE_KEYS.join(", ")),
                );
            }
        }
        let key = |k: &str| format!("{section_name}.{k}");
        let name = match name {
            Some(n) if earlier.iter().any(|r| r.name == n) => {
                self.problem(key("name"), "another route has this name");
                None
            }
            n => n,
        };
        let listen = self.socket_addr(&s, "listen", false);
        if let Some(addr) = listen
            && addr.port() != 0
        {
            let taken_by = if addr == admin.listen {
                Some("admin.listen")
            } else if emulator.is_some_and(|e| e.listen == addr) {
                Some("emulator.listen")
            } else {
                None
            };
            if let Some(other) = taken_by {
                self.problem(key("listen"), format!("must differ from {other}"));
            }
        }
        let host = self.string(&s, "host");
        if let Some(h) = &host
            && let Err(reason) = HostMatch::parse(h)
        {
            self.problem(key("host"), reason);
        }
        let path_prefix = self.string(&s, "path_prefix");
        if let Some(p) = &path_prefix
            && let Err(reason) = parse_path_prefix(p)
        {
            self.problem(key("path_prefix"), reason);
        }
        let strip_prefix = self.boolean(&s, "strip_prefix", false);
        if strip_prefix && path_prefix.is_none() {
            self.problem(
                key("strip_prefix"),
                "needs path_prefix (the prefix to strip)",
            );
        }
        let upstream = self
            .required_string(&s, "upstream")
            .and_then(|u| self.upstream_url(&key("upstream"), &u));
        let upstream_ca_file = self.path(&s, "upstream_ca_file");
        if let Some(p) = &upstream_ca_file
            && let Err(e) = std::fs::metadata(p)
        {
            self.problem(
                key("upstream_ca_file"),
                format!("cannot read {}: {e}", p.display()),
            );
        }
        let token_source = self
            .non_empty_string(&s, "token_source")
            .unwrap_or_else(|| DEFAULT_SOURCE.to_owned());
        if !sources.iter().any(|src| src.name == token_source)
            && !self.exchanges.iter().any(|e| e.name == token_source)
        {
            let known: Vec<&str> = sources
                .iter()
                .map(|src| src.name.as_str())
                .chain(self.exchanges.iter().map(|e| e.name.as_str()))
                .collect();
            self.problem(
                key("token_source"),
                format!(
                    "no source is named `{token_source}` (sources: {}; [token] is \"default\", others are [sources.NAME])",
                    known.join(", ")
                ),
            );
        }
        let token_header = match self.string(&s, "token_header") {
            None => Some(http::header::AUTHORIZATION),
            Some(text) => match HeaderName::from_bytes(text.as_bytes()) {
                Ok(h) => match check_token_header(&h) {
                    Ok(()) => Some(h),
                    Err(reason) => {
                        self.problem(key("token_header"), reason);
                        None
                    }
                },
                Err(_) => {
                    self.problem(
                        key("token_header"),
                        format!("`{text}` is not a header name; write e.g. \"X-Api-Token\""),
                    );
                    None
                }
            },
        };
        let token_format = match self.string(&s, "token_format") {
            None => Some(TokenFormat::bearer()),
            Some(text) => match TokenFormat::parse(&text) {
                Ok(f) => Some(f),
                Err(e) => {
                    self.problem(key("token_format"), format!("`{text}`: {e}"));
                    None
                }
            },
        };
        Some(RouteConfig {
            name: name?,
            section: section_name.clone(),
            listen: listen.unwrap_or(proxy.listen),
            host,
            path_prefix,
            strip_prefix,
            upstream: upstream?,
            upstream_ca_file,
            token_source,
            token_header: token_header?,
            token_format: token_format?,
            preserve_host: self.boolean(&s, "preserve_host", proxy.preserve_host),
            forwarded_headers: self.boolean(&s, "forwarded_headers", proxy.forwarded_headers),
            escaped_slashes: self.escaped_slashes(&s, proxy.escaped_slashes),
        })
    }

    /// A route that an earlier one on its listener always takes first can
    /// never match: a config error, not a silent dead route.
    fn unreachable_routes(&mut self, routes: &[RouteConfig]) {
        struct Matcher {
            host: Option<HostMatch>,
            prefix: Option<bytes::Bytes>,
        }
        let matchers: Vec<Matcher> = routes
            .iter()
            .map(|r| Matcher {
                host: r.host.as_deref().and_then(|h| HostMatch::parse(h).ok()),
                prefix: r
                    .path_prefix
                    .as_deref()
                    .and_then(|p| parse_path_prefix(p).ok())
                    .flatten(),
            })
            .collect();
        for (j, later) in routes.iter().enumerate() {
            let covered_by = routes[..j].iter().zip(&matchers).find(|(earlier, m)| {
                let l = &matchers[j];
                earlier.listen == later.listen
                    && match (&m.host, &l.host) {
                        (None, _) => true,
                        (Some(a), Some(b)) => a.covers(b),
                        (Some(_), None) => false,
                    }
                    && match (&m.prefix, &l.prefix) {
                        (None, _) => true,
                        (Some(a), Some(b)) => prefix_covers(a, b),
                        (Some(_), None) => false,
                    }
            });
            if let Some((earlier, _)) = covered_by {
                let (key, what) = if later.section == "proxy" {
                    ("proxy.upstream".to_owned(), "is never used".to_owned())
                } else {
                    (later.key("name"), "never matches".to_owned())
                };
                self.problem(
                    key,
                    format!(
                        "{what}: route `{}` comes first on {} and takes every request it would",
                        earlier.name, earlier.listen
                    ),
                );
            }
        }
    }

    fn token(&mut self, root: &Table, purpose: Purpose) -> Option<TokenConfig> {
        let s = self.section(root, "token", TOKEN_KEYS);
        if root.get("token").is_none() && purpose == Purpose::Run {
            self.problem("token", "missing required section");
            return None;
        }
        self.token_keys(&s, purpose)
    }

    /// The keys of `[token]`, from `s` (`[token]` itself, or a
    /// `[sources.NAME]` table with what it inherits merged in).
    fn token_keys(&mut self, s: &Section<'_>, purpose: Purpose) -> Option<TokenConfig> {
        let key = |k: &str| format!("{}.{k}", s.name);
        let source = match purpose {
            Purpose::Run => self.required_string(s, "source"),
            // `login` writes an SSO cache file, whatever the proxy reads.
            Purpose::Login => self.string(s, "source"),
        };
        let source = match source.as_deref() {
            Some("refresh_token") => SourceKind::RefreshToken,
            Some("sso_cache") => SourceKind::SsoCache,
            Some("jwt_bearer") if cfg!(feature = "aws-iam") => SourceKind::JwtBearer,
            Some("jwt_bearer") => {
                self.problem(
                    key("source"),
                    "\"jwt_bearer\" needs AWS IAM support, which this build leaves out (Cargo feature `aws-iam`)",
                );
                return None;
            }
            Some("exchange") => {
                self.problem(
                    key("source"),
                    "\"exchange\" has no token of its own (it exchanges each caller's); put it in a [sources.NAME] and name it in a [[route]]'s token_source",
                );
                return None;
            }
            Some(other) => {
                self.problem(
                    key("source"),
                    format!(
                        "`{other}` is not a source; use \"refresh_token\", \"sso_cache\" or \"jwt_bearer\" (or \"exchange\" in a [sources.NAME])"
                    ),
                );
                return None;
            }
            None if purpose == Purpose::Login && self.raw(s, "source").is_none() => {
                SourceKind::SsoCache
            }
            None => return None,
        };
        let assertion_file = self.path(s, "assertion_file");
        if source == SourceKind::JwtBearer
            && assertion_file.is_none()
            && self.raw(s, "assertion_file").is_none()
        {
            self.problem(
                key("assertion_file"),
                "missing required key (source = \"jwt_bearer\" needs it), e.g. \"/var/run/secrets/sso-token-proxy/token\"",
            );
        }
        let device_login = self.boolean(s, "device_login", false);
        if device_login && source != SourceKind::RefreshToken {
            self.problem(
                key("device_login"),
                "only a source = \"refresh_token\" source can log in by itself",
            );
        }
        if device_login && self.raw(s, "start_url").is_none() {
            self.problem(
                key("start_url"),
                "missing: device_login = true needs the AWS access portal URL, e.g. \"https://my-org.awsapps.com/start\"",
            );
        }
        let refresh_token = self.secret(
            s,
            "refresh_token",
            source == SourceKind::RefreshToken && !device_login,
        );
        let start_url = self.non_empty_string(s, "start_url");
        let session_name = self.non_empty_string(s, "session_name");
        let sso_cache_file = match self.path(s, "sso_cache_file") {
            Some(p) => Some(p),
            None if self.raw(s, "sso_cache_file").is_some() => None,
            None => session_name
                .as_deref()
                .or(start_url.as_deref())
                .and_then(default_sso_cache_file),
        };
        // `login` names what it misses itself (start_url first).
        if source == SourceKind::SsoCache
            && purpose == Purpose::Run
            && sso_cache_file.is_none()
            && self.raw(s, "sso_cache_file").is_none()
        {
            self.problem(
                key("sso_cache_file"),
                "missing: set sso_cache_file, or start_url (or session_name) to use the AWS CLI's ~/.aws/sso/cache/<sha1>.json (needs HOME)",
            );
        }
        let state_file = self.path(s, "state_file");
        if let Some(p) = &state_file {
            let dir = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            // A missing directory is created (0700) at start, as long as
            // its nearest existing ancestor is a directory.
            let existing = dir
                .ancestors()
                .map(|a| {
                    if a.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        a
                    }
                })
                .find(|a| a.exists());
            if !existing.is_some_and(Path::is_dir) {
                self.problem(
                    key("state_file"),
                    format!(
                        "directory {} does not exist and cannot be created ({} is not a directory)",
                        dir.display(),
                        existing.unwrap_or(dir).display()
                    ),
                );
            }
        }
        let scopes = match self.raw(s, "scopes") {
            None => Vec::new(),
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                for item in items {
                    match item {
                        Value::String(v) => out.push(v.clone()),
                        _ => self.problem(key("scopes"), "must be a list of strings"),
                    }
                }
                out
            }
            Some(_) => {
                self.problem(key("scopes"), "must be a list of strings");
                Vec::new()
            }
        };
        // Both scale down with each token's lifetime (see the cache's
        // margins); the bounds only stop values no token could use.
        let refresh_before_expiry = self.duration_within(
            s,
            "refresh_before_expiry",
            Duration::from_secs(300),
            Duration::ZERO..=Duration::from_secs(7 * DAY),
        );
        let expiry_margin = self.duration_within(
            s,
            "expiry_margin",
            Duration::from_secs(10),
            Duration::ZERO..=Duration::from_secs(DAY),
        );
        Some(TokenConfig {
            source,
            refresh_token,
            sso_cache_file,
            state_file,
            scopes,
            refresh_before_expiry,
            expiry_margin,
            start_url,
            assertion_file,
            device_login,
        })
    }

    fn retry(&mut self, root: &Table) -> Option<RetryConfig> {
        let s = self.section(
            root,
            "retry",
            &[
                "max_attempts",
                "base_delay",
                "max_delay",
                "throttle_base_delay",
                "throttle_max_delay",
            ],
        );
        let defaults = RetryConfig::default();
        Some(RetryConfig {
            max_attempts: self.integer(&s, "max_attempts", defaults.max_attempts as i64, 1..=20)
                as u32,
            transient: Backoff {
                base: self.duration_within(
                    &s,
                    "base_delay",
                    defaults.transient.base,
                    Duration::from_millis(1)..=Duration::from_secs(60),
                ),
                cap: self.duration_within(
                    &s,
                    "max_delay",
                    defaults.transient.cap,
                    Duration::from_millis(1)..=Duration::from_secs(600),
                ),
                factor: 2.0,
                jitter: Jitter::Full,
            },
            throttled: Backoff {
                base: self.duration_within(
                    &s,
                    "throttle_base_delay",
                    defaults.throttled.base,
                    Duration::from_millis(1)..=Duration::from_secs(60),
                ),
                cap: self.duration_within(
                    &s,
                    "throttle_max_delay",
                    defaults.throttled.cap,
                    Duration::from_millis(1)..=Duration::from_secs(600),
                ),
                factor: 3.0,
                jitter: Jitter::Equal,
            },
        })
    }

    fn store(&mut self, root: &Table) -> Option<StoreConfig> {
        let s = self.section(
            root,
            "store",
            &[
                "kind",
                "url",
                "key_prefix",
                "username",
                "password",
                "password_file",
                "ca_file",
                "lock_lease",
                "wait_timeout",
                "command_timeout",
                "refresh_without_store",
            ],
        );
        let kind = match self.string(&s, "kind").as_deref() {
            None | Some("local") => StoreKind::Local,
            Some("redis") => StoreKind::Redis,
            Some(other) => {
                self.problem(
                    "store.kind",
                    format!("`{other}` is not a store; use \"local\" or \"redis\""),
                );
                return None;
            }
        };
        let url = self.string(&s, "url");
        if kind == StoreKind::Redis {
            match &url {
                None if self.raw(&s, "url").is_none() => {
                    self.problem("store.url", "missing required key (kind = \"redis\" needs it), e.g. \"redis://127.0.0.1:6379\"");
                }
                None => {}
                Some(u) => self.redis_url(u),
            }
        }
        let ca_file = self.path(&s, "ca_file");
        if let Some(p) = &ca_file {
            if let Err(e) = std::fs::metadata(p) {
                self.problem("store.ca_file", format!("cannot read {}: {e}", p.display()));
            } else if url.as_deref().is_some_and(|u| !u.starts_with("rediss://")) {
                self.problem("store.ca_file", "only applies to a TLS URL (rediss://)");
            }
        }
        let lock_lease = self.duration_within(
            &s,
            "lock_lease",
            Duration::from_secs(15),
            Duration::from_millis(100)..=Duration::from_secs(600),
        );
        let wait_timeout = self.duration_within(
            &s,
            "wait_timeout",
            Duration::from_secs(10),
            Duration::from_millis(1)..=Duration::from_secs(600),
        );
        let command_timeout = self.duration_within(
            &s,
            "command_timeout",
            Duration::from_secs(2),
            Duration::from_millis(1)..=Duration::from_secs(60),
        );
        Some(StoreConfig {
            kind,
            url,
            key_prefix: self
                .string(&s, "key_prefix")
                .unwrap_or_else(|| "sso-token-proxy:".to_owned()),
            username: self.string(&s, "username").filter(|u| !u.is_empty()),
            password: self.secret(&s, "password", false),
            ca_file,
            lock_lease,
            wait_timeout,
            command_timeout,
            refresh_without_store: self.boolean(&s, "refresh_without_store", false),
        })
    }

    fn redis_url(&mut self, text: &str) {
        let key = "store.url";
        let Some((scheme, rest)) = text.split_once("://") else {
            self.problem(
                key,
                format!("`{text}` is not a URL; write e.g. \"redis://127.0.0.1:6379\""),
            );
            return;
        };
        if !matches!(scheme, "redis" | "rediss") {
            self.problem(
                key,
                format!("scheme `{scheme}` is not supported; use redis:// or rediss:// (TLS)"),
            );
            return;
        }
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.contains('@') {
            // Keeps the password out of the URL, which is logged.
            self.problem(
                key,
                "must not contain credentials; set store.username and store.password_file",
            );
        } else if authority.is_empty() {
            self.problem(key, format!("`{text}` has no host"));
        }
    }

    /// `[[sink]]` tables. Paths that would overwrite the token source's own
    /// files, or another sink's, are refused.
    fn sinks(
        &mut self,
        root: &Table,
        oidc: Option<&OidcConfig>,
        sources: &[SourceConfig],
    ) -> Vec<SinkConfig> {
        let tables = match root.get("sink") {
            None => return Vec::new(),
            Some(Value::Array(items)) => items,
            Some(_) => {
                self.problem("sink", "must be an array of tables ([[sink]])");
                return Vec::new();
            }
        };
        let mut sinks = Vec::new();
        for (i, item) in tables.iter().enumerate() {
            let name = format!("sink[{i}]");
            let Value::Table(table) = item else {
                self.problem(name, "must be a table ([[sink]])");
                continue;
            };
            if let Some(sink) = self.sink(&name, table, oidc) {
                sinks.push((i, sink));
            }
        }
        // The files sources keep their credentials in.
        let own_files: Vec<(String, &PathBuf)> = sources
            .iter()
            .flat_map(|s| {
                [
                    (s.key("state_file"), s.token.state_file.as_ref()),
                    (s.key("sso_cache_file"), s.token.sso_cache_file.as_ref()),
                    (s.key("assertion_file"), s.token.assertion_file.as_ref()),
                ]
            })
            .filter_map(|(k, p)| Some((k, p?)))
            .collect();
        let mut problems = Vec::new();
        for (n, (i, sink)) in sinks.iter().enumerate() {
            if sinks[..n]
                .iter()
                .any(|(_, earlier)| same_file(&earlier.path, &sink.path))
            {
                problems.push((
                    format!("sink[{i}].path"),
                    format!(
                        "{} is written by an earlier [[sink]] too",
                        sink.path.display()
                    ),
                ));
            }
            if let Some((key, _)) = own_files.iter().find(|(_, own)| same_file(&sink.path, own)) {
                problems.push((
                    format!("sink[{i}].path"),
                    format!(
                        "{} is {key}: a sink would overwrite the credential there",
                        sink.path.display()
                    ),
                ));
            }
            // Sources with problems are missing here; those were reported.
            if !sources.is_empty() && !sources.iter().any(|s| s.name == sink.source) {
                let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
                problems.push((
                    format!("sink[{i}].source"),
                    format!(
                        "unknown token source `{}` (sources: {}; [token] is \"default\")",
                        sink.source,
                        names.join(", ")
                    ),
                ));
            }
        }
        self.problems.extend(problems);
        sinks.into_iter().map(|(_, sink)| sink).collect()
    }

    fn sink(&mut self, name: &str, table: &Table, oidc: Option<&OidcConfig>) -> Option<SinkConfig> {
        const KNOWN: &[&str] = &[
            "source",
            "path",
            "format",
            "mode",
            "on_shutdown",
            "start_url",
            "region",
            "session_name",
            "cache_dir",
        ];
        for key in table.keys() {
            if !KNOWN.contains(&key.as_str()) {
                self.problem(
                    format!("{name}.{key}"),
                    format!("unknown key (known keys: {})", KNOWN.join(", ")),
                );
            }
        }
        let s = Section {
            name,
            table: Some(table),
        };
        let source = self
            .non_empty_string(&s, "source")
            .unwrap_or_else(|| "default".to_owned());
        let format_word = self.string(&s, "format");
        let start_url = self.non_empty_string(&s, "start_url");
        let region = self
            .non_empty_string(&s, "region")
            .or_else(|| oidc.and_then(|o| o.region.clone()));
        let session_name = self.non_empty_string(&s, "session_name");
        let cache_dir = self.path(&s, "cache_dir");
        let path = self.path(&s, "path");
        let sso_only = |r: &mut Self, key: &str| {
            if r.raw(&s, key).is_some() {
                r.problem(
                    format!("{name}.{key}"),
                    "only applies to format = \"sso_cache\"",
                );
            }
        };
        let (format, path) = match format_word.as_deref() {
            None | Some("raw") | Some("json") => {
                for key in ["start_url", "region", "session_name", "cache_dir"] {
                    sso_only(self, key);
                }
                let format = if format_word.as_deref() == Some("json") {
                    SinkFormat::Json
                } else {
                    SinkFormat::Raw
                };
                if path.is_none() && self.raw(&s, "path").is_none() {
                    self.problem(format!("{name}.path"), "missing required key");
                }
                (format, path)
            }
            Some("sso_cache") => {
                let Some(start_url) = start_url else {
                    if self.raw(&s, "start_url").is_none() {
                        self.problem(
                            format!("{name}.start_url"),
                            "missing: the AWS SSO cache format names the access portal URL",
                        );
                    }
                    return None;
                };
                let path = match (path, cache_dir) {
                    (Some(_), Some(_)) => {
                        self.problem(
                            format!("{name}.path"),
                            "set either path or cache_dir, not both",
                        );
                        None
                    }
                    (Some(p), None) => Some(p),
                    // The name the AWS CLI and SDKs look for.
                    (None, dir) => {
                        let file = crate::token::sso_cache_file_name(
                            session_name.as_deref().unwrap_or(&start_url),
                        );
                        match dir.or_else(|| {
                            std::env::var_os("HOME")
                                .filter(|h| !h.is_empty())
                                .map(|h| Path::new(&h).join(".aws/sso/cache"))
                        }) {
                            Some(dir) => Some(dir.join(file)),
                            None => {
                                self.problem(
                                    format!("{name}.cache_dir"),
                                    "missing: set cache_dir or path (HOME is not set for the default ~/.aws/sso/cache)",
                                );
                                None
                            }
                        }
                    }
                };
                (SinkFormat::SsoCache { start_url, region }, path)
            }
            Some(other) => {
                self.problem(
                    format!("{name}.format"),
                    format!("`{other}` is not a format; use \"raw\", \"json\" or \"sso_cache\""),
                );
                return None;
            }
        };
        let mode = match self.string(&s, "mode") {
            None => 0o600,
            Some(text) => match u32::from_str_radix(text.trim(), 8) {
                Ok(mode) if mode & !0o777 != 0 => {
                    self.problem(
                        format!("{name}.mode"),
                        format!("`{text}` has bits beyond 0777"),
                    );
                    0o600
                }
                Ok(mode) if mode & 0o022 != 0 => {
                    self.problem(
                        format!("{name}.mode"),
                        format!(
                            "`{text}` lets others write the token file; drop group/other write (e.g. \"0640\")"
                        ),
                    );
                    0o600
                }
                Ok(mode) if mode & 0o400 == 0 => {
                    self.problem(
                        format!("{name}.mode"),
                        format!("`{text}` does not let the owner read the file"),
                    );
                    0o600
                }
                Ok(mode) => mode,
                Err(_) => {
                    self.problem(
                        format!("{name}.mode"),
                        format!("`{text}` is not an octal mode; write e.g. \"0600\" or \"0640\""),
                    );
                    0o600
                }
            },
        };
        let on_shutdown = match self.string(&s, "on_shutdown").as_deref() {
            None | Some("remove") => OnShutdown::Remove,
            Some("keep") => OnShutdown::Keep,
            Some("expire") => OnShutdown::Expire,
            Some(other) => {
                self.problem(
                    format!("{name}.on_shutdown"),
                    format!("`{other}` is not a choice; use \"remove\", \"keep\" or \"expire\""),
                );
                OnShutdown::Remove
            }
        };
        Some(SinkConfig {
            source,
            path: path?,
            format,
            mode,
            on_shutdown,
        })
    }

    fn emulator(&mut self, root: &Table) -> Option<EmulatorSection> {
        root.get("emulator")?;
        let s = self.section(
            root,
            "emulator",
            &[
                "listen",
                "access_token_lifetime",
                "rotate_refresh_tokens",
                "assertion_file",
                "assertion_subject",
                "assertion_lifetime",
                "device_poll_interval",
            ],
        );
        let assertion_lifetime = self.duration_within(
            &s,
            "assertion_lifetime",
            Duration::from_secs(3600),
            Duration::from_secs(10)..=Duration::from_secs(DAY),
        );
        let assertion_subject = self
            .string(&s, "assertion_subject")
            .unwrap_or_else(|| "quickstart-pod".to_owned());
        if assertion_subject.trim().is_empty() {
            self.problem("emulator.assertion_subject", "must not be empty");
        }
        let assertion_file = self.path(&s, "assertion_file");
        Some(EmulatorSection {
            listen: self.socket_addr(&s, "listen", true)?,
            access_token_lifetime: self.duration_within(
                &s,
                "access_token_lifetime",
                Duration::from_secs(3600),
                Duration::from_secs(1)..=Duration::from_secs(7 * DAY),
            ),
            rotate_refresh_tokens: self.boolean(&s, "rotate_refresh_tokens", true),
            device_poll_interval: self.duration_within(
                &s,
                "device_poll_interval",
                Duration::from_secs(5),
                Duration::from_secs(1)..=Duration::from_secs(60),
            ),
            assertion_file,
            assertion_subject,
            assertion_lifetime,
        })
    }
}

/// `arn:<partition>:sso::<account>:application/<instance>/<id>`, loosely.
fn is_application_arn(text: &str) -> bool {
    let parts: Vec<&str> = text.splitn(6, ':').collect();
    matches!(parts[..], ["arn", partition, "sso", "", account, resource]
        if partition.starts_with("aws")
            && !account.is_empty()
            && account.bytes().all(|b| b.is_ascii_digit())
            && resource.starts_with("application/")
            && resource.len() > "application/".len())
}

/// Whether two `refresh_token` sources redeem the same refresh token with
/// the same client: then one rotation would revoke the other's token unless
/// they share one holder of it.
pub(crate) fn shares_refresh_token(a: &SourceConfig, b: &SourceConfig) -> bool {
    a.client_id == b.client_id
        && match (&a.token.refresh_token, &b.token.refresh_token) {
            (Some(x), Some(y)) => x.value == y.value,
            _ => false,
        }
}

/// A source or route name: what a metric label and a JSON key can carry.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    let fits = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if fits {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a name: use 1 to 64 letters, digits, `_` or `-`"
        ))
    }
}

/// Whether two paths name the same file: equal, or equal once their
/// directories are resolved (symlinks, `..`).
fn same_file(a: &Path, b: &Path) -> bool {
    let resolved = |p: &Path| {
        let dir = crate::fs_atomic::parent_dir(p).canonicalize().ok()?;
        Some(dir.join(p.file_name()?))
    };
    a == b || matches!((resolved(a), resolved(b)), (Some(x), Some(y)) if x == y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/test.toml"))
    }

    const MINIMAL: &str = r#"
[proxy]
listen = "127.0.0.1:8080"
upstream = "http://127.0.0.1:9000"
[admin]
listen = "127.0.0.1:9901"
[oidc]
region = "us-east-1"
client_id = "c"
client_secret = "s"
[token]
source = "refresh_token"
refresh_token = "r"
"#;

    /// Every duration key, `(section, key)`.
    const DURATION_KEYS: &[(&str, &str)] = &[
        ("sources.callers", "caller_failure_ttl"),
        ("sources.callers", "refresh_before_expiry"),
        ("sources.callers", "expiry_margin"),
        ("proxy", "shutdown_grace"),
        ("proxy", "header_read_timeout"),
        ("proxy", "upstream_connect_timeout"),
        ("proxy", "upstream_response_timeout"),
        ("proxy", "idle_timeout"),
        ("proxy", "request_body_timeout"),
        ("proxy", "send_timeout"),
        ("proxy", "drain_timeout"),
        ("proxy", "upstream_queue_timeout"),
        ("proxy", "upstream_connect_wait"),
        ("oidc", "connect_timeout"),
        ("oidc", "call_timeout"),
        ("token", "refresh_before_expiry"),
        ("token", "expiry_margin"),
        ("retry", "base_delay"),
        ("retry", "max_delay"),
        ("retry", "throttle_base_delay"),
        ("retry", "throttle_max_delay"),
        ("store", "lock_lease"),
        ("store", "wait_timeout"),
        ("store", "command_timeout"),
        ("emulator", "access_token_lifetime"),
        ("emulator", "assertion_lifetime"),
        ("emulator", "device_poll_interval"),
    ];

    /// MINIMAL with `key = "value"` in `[section]`.
    fn with_key(section: &str, key: &str, value: &str) -> String {
        let header = format!("[{section}]\n");
        let line = format!("{key} = \"{value}\"\n");
        if MINIMAL.contains(&header) {
            MINIMAL.replace(&header, &format!("{header}{line}"))
        } else if section == "emulator" {
            format!("{MINIMAL}{header}listen = \"127.0.0.1:0\"\n{line}")
        } else if section == "sources.callers" {
            format!(
                "{MINIMAL}{header}source = \"exchange\"\n\
                 client_id = \"arn:aws:sso::111122223333:application/ssoins-1/apl-2\"\n{line}"
            )
        } else {
            format!("{MINIMAL}{header}{line}")
        }
    }

    /// Issue 13: no duration from a config file can overflow a clock. Each
    /// has a range; absurd values are a `FILE: key: reason` problem, not a
    /// panic at the first `Instant + Duration`.
    #[test]
    fn every_duration_has_a_range_and_huge_values_are_errors() {
        // The list above is complete: one entry per duration read.
        let calls = include_str!("config.rs")
            .matches(&format!("self.{}(", "duration_within"))
            .count();
        assert_eq!(
            calls,
            DURATION_KEYS.len(),
            "a duration key is missing above"
        );
        for (section, key) in DURATION_KEYS {
            for huge in ["8d", "10000d", "584942417355y", "18446744073709551615s"] {
                let err = parse(&with_key(section, key, huge)).unwrap_err();
                assert_eq!(err.problems.len(), 1, "{section}.{key} = {huge}: {err}");
                let (problem_key, reason) = &err.problems[0];
                assert_eq!(problem_key, &format!("{section}.{key}"), "{err}");
                assert!(
                    reason.contains("out of range") || reason.contains("is not a duration"),
                    "{section}.{key} = {huge}: {reason}"
                );
                assert!(
                    err.to_string()
                        .starts_with(&format!("/etc/test.toml: {section}.{key}: ")),
                    "{err}"
                );
            }
            // Each default lies in its range, and "1m" in every one.
            parse(&with_key(section, key, "1m"))
                .unwrap_or_else(|e| panic!("{section}.{key} = 1m: {e}"));
        }
        let err = parse(&with_key("store", "lock_lease", "10ms")).unwrap_err();
        assert_eq!(
            err.problems[0].1,
            "`10ms` is out of range: must be from 100ms to 10m"
        );
    }

    #[test]
    fn quick_start_and_minimal_configs_parse_with_defaults() {
        let quick =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml")).unwrap();
        let c = Config::parse(
            &quick,
            Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml")),
        )
        .unwrap();
        assert!(c.emulator.is_some());
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.token.refresh_before_expiry, Duration::from_secs(300));
        assert_eq!(c.retry.max_attempts, 3);
        assert_eq!(c.store.kind, crate::config::StoreKind::Local);
        assert!(format!("{c:?}").matches("***").count() >= 2);
        assert!(!format!("{c:?}").contains("\"s\""));
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = MINIMAL
            .replace(
                "upstream = \"http://127.0.0.1:9000\"",
                "upstream = \"ftp://x\"\nbogus = 1",
            )
            .replace(
                "source = \"refresh_token\"",
                "source = \"refresh_token\"\nrefresh_before_expiry = \"5 parsecs\"",
            );
        let err = parse(&text).unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|(k, _)| k.as_str()).collect();
        assert!(keys.contains(&"proxy.upstream"), "{keys:?}");
        assert!(keys.contains(&"proxy.bogus"), "{keys:?}");
        assert!(keys.contains(&"token.refresh_before_expiry"), "{keys:?}");
        for line in err.to_string().lines() {
            assert!(line.starts_with("/etc/test.toml: "), "{line}");
        }
    }

    #[test]
    fn proxy_limits_have_defaults_and_bounds() {
        let c = parse(MINIMAL).unwrap();
        let d = ProxyConfig::new(c.proxy.listen, c.proxy.upstream.clone().unwrap());
        assert_eq!(c.proxy.max_connections, d.max_connections);
        assert_eq!(c.proxy.request_body_timeout, d.request_body_timeout);
        assert!(c.proxy.upstream_max_response_headers >= 200);
        assert!(c.proxy.upstream_max_response_header_bytes >= 64 * 1024);
        assert_eq!(c.proxy.replay_buffer_bytes, 32 * 1024 * 1024);

        let text = MINIMAL.replace(
            "upstream = \"http://127.0.0.1:9000\"",
            "upstream = \"http://127.0.0.1:9000\"\n\
             request_body_timeout = \"2s\"\n\
             max_connections = 10\n\
             upstream_queue_timeout = \"250ms\"\n\
             replay_buffer_bytes = 1048576\n\
             http2_max_concurrent_streams = 7",
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.proxy.request_body_timeout, Duration::from_secs(2));
        assert_eq!(c.proxy.max_connections, 10);
        assert_eq!(c.proxy.upstream_queue_timeout, Duration::from_millis(250));
        assert_eq!(c.proxy.http2_max_concurrent_streams, 7);
        assert_eq!(c.proxy.replay_buffer_bytes, 1024 * 1024);

        let text = MINIMAL.replace(
            "upstream = \"http://127.0.0.1:9000\"",
            "upstream = \"http://127.0.0.1:9000\"\n\
             request_body_timeout = \"0s\"\n\
             replay_buffer_bytes = -1\n\
             drain_timeout = \"2h\"\n\
             max_connections = 0\n\
             upstream_max_response_headers = 5\n\
             http2_max_control_frames_per_second = -1",
        );
        let err = parse(&text).unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "proxy.replay_buffer_bytes",
                "proxy.request_body_timeout",
                "proxy.drain_timeout",
                "proxy.max_connections",
                "proxy.upstream_max_response_headers",
                "proxy.http2_max_control_frames_per_second",
            ]
        );
    }

    #[test]
    fn upstream_connect_wait_defaults_to_20ms_above_64_connections_and_zero_turns_it_off() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.proxy.upstream_connect_wait, Duration::from_millis(20));
        assert_eq!(c.proxy.upstream_connect_wait_above, 64);

        let with = |keys: &str| {
            MINIMAL.replace(
                "upstream = \"http://127.0.0.1:9000\"",
                &format!("upstream = \"http://127.0.0.1:9000\"\n{keys}"),
            )
        };
        let c = parse(&with(
            "upstream_connect_wait = \"0s\"\nupstream_connect_wait_above = 16",
        ))
        .unwrap();
        assert_eq!(c.proxy.upstream_connect_wait, Duration::ZERO);
        assert_eq!(c.proxy.upstream_connect_wait_above, 16);

        let err = parse(&with(
            "upstream_connect_wait = \"2m\"\nupstream_connect_wait_above = 0",
        ))
        .unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "proxy.upstream_connect_wait",
                "proxy.upstream_connect_wait_above"
            ]
        );
    }

    #[test]
    fn escaped_slashes_is_keep_or_reject() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.proxy.escaped_slashes, EscapedSlashes::Keep);
        let with = |policy: &str| {
            MINIMAL.replace(
                "upstream = \"http://127.0.0.1:9000\"",
                &format!("upstream = \"http://127.0.0.1:9000\"\nescaped_slashes = \"{policy}\""),
            )
        };
        let c = parse(&with("reject")).unwrap();
        assert_eq!(c.proxy.escaped_slashes, EscapedSlashes::Reject);
        let err = parse(&with("decode")).unwrap_err();
        assert_eq!(err.problems[0].0, "proxy.escaped_slashes");
    }

    #[test]
    fn runtime_is_thread_per_core_unless_work_stealing_is_asked() {
        assert_eq!(parse(MINIMAL).unwrap().runtime, RuntimeShape::ThreadPerCore);
        let with = |shape: &str| {
            MINIMAL.replace(
                "upstream = \"http://127.0.0.1:9000\"",
                &format!("upstream = \"http://127.0.0.1:9000\"\nruntime = \"{shape}\""),
            )
        };
        let c = parse(&with("thread_per_core")).unwrap();
        assert_eq!(c.runtime, RuntimeShape::ThreadPerCore);
        assert_eq!(
            parse(&with("work_stealing")).unwrap().runtime,
            RuntimeShape::WorkStealing
        );
        let err = parse(&with("per_core")).unwrap_err();
        assert_eq!(err.problems[0].0, "proxy.runtime");
        assert!(err.problems[0].1.contains("thread_per_core"), "{err}");
    }

    #[test]
    fn cpu_affinity_is_auto_unless_turned_off() {
        assert_eq!(parse(MINIMAL).unwrap().cpu_affinity, CpuAffinity::Auto);
        let with = |value: &str| {
            MINIMAL.replace(
                "upstream = \"http://127.0.0.1:9000\"",
                &format!("upstream = \"http://127.0.0.1:9000\"\ncpu_affinity = {value}"),
            )
        };
        assert_eq!(
            parse(&with("\"auto\"")).unwrap().cpu_affinity,
            CpuAffinity::Auto
        );
        assert_eq!(
            parse(&with("\"off\"")).unwrap().cpu_affinity,
            CpuAffinity::Off
        );
        let err = parse(&with("\"0-1\"")).unwrap_err();
        assert_eq!(keys(&err), ["proxy.cpu_affinity"]);
        assert!(err.problems[0].1.contains("\"auto\" or \"off\""), "{err}");
        let err = parse(&with("true")).unwrap_err();
        assert_eq!(keys(&err), ["proxy.cpu_affinity"]);
        assert!(err.problems[0].1.contains("must be a string"), "{err}");
    }

    fn keys(err: &ConfigError) -> Vec<&str> {
        err.problems.iter().map(|(k, _)| k.as_str()).collect()
    }

    /// `device_login = true`: a `refresh_token` source that needs no
    /// refresh token and no client (it registers one), but a start URL;
    /// a client is both id and secret or neither.
    #[test]
    fn device_login_needs_a_start_url_and_no_refresh_token() {
        let login = r#"
[proxy]
listen = "127.0.0.1:8080"
upstream = "http://127.0.0.1:9000"
[admin]
listen = "127.0.0.1:9901"
[oidc]
region = "us-east-1"
[token]
source = "refresh_token"
device_login = true
start_url = "https://x.awsapps.com/start"
"#;
        let c = parse(login).unwrap();
        assert!(c.token.device_login);
        assert!(c.sources[0].client_id.is_none() && c.token.refresh_token.is_none());
        assert!(!parse(MINIMAL).unwrap().token.device_login);

        let err =
            parse(&login.replace("start_url = \"https://x.awsapps.com/start\"\n", "")).unwrap_err();
        assert_eq!(keys(&err), ["token.start_url"], "{err}");
        let err = parse(&login.replace("[oidc]\n", "[oidc]\nclient_id = \"c\"\n")).unwrap_err();
        assert_eq!(keys(&err), ["oidc.client_secret"], "{err}");
        let err =
            parse(&login.replace("device_login = true", "device_login = \"yes\"")).unwrap_err();
        assert_eq!(keys(&err)[0], "token.device_login", "{err}");
        let err = parse(&format!(
            "{login}[sources.cli]\nsource = \"sso_cache\"\nsso_cache_file = \"/tmp/c.json\"\ndevice_login = true\nstart_url = \"https://x\"\n"
        ))
        .unwrap_err();
        assert_eq!(keys(&err), ["sources.cli.device_login"], "{err}");
        // A configured client works too.
        let c = parse(&login.replace(
            "[oidc]\n",
            "[oidc]\nclient_id = \"c\"\nclient_secret = \"s\"\n",
        ))
        .unwrap();
        assert_eq!(c.sources[0].client_id.as_deref(), Some("c"));
    }

    #[test]
    fn token_is_the_default_source_and_sources_inherit_it() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.sources.len(), 1);
        assert_eq!(c.sources[0].name, DEFAULT_SOURCE);
        assert_eq!(c.sources[0].client_id.as_deref(), Some("c"));

        let text = format!(
            "{MINIMAL}\
             [sources.reports]\nscopes = [\"reports:read\"]\nexpiry_margin = \"3s\"\n\
             [sources.vendor]\nsource = \"refresh_token\"\nrefresh_token = \"v\"\n\
             client_id = \"vc\"\nclient_secret = \"vs\"\n"
        );
        let c = parse(&text).unwrap();
        let names: Vec<_> = c.sources.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["default", "reports", "vendor"]);
        let reports = &c.sources[1];
        // Only what it sets differs from [token].
        assert_eq!(reports.token.source, SourceKind::RefreshToken);
        assert_eq!(reports.token.scopes, ["reports:read"]);
        assert_eq!(reports.token.expiry_margin, Duration::from_secs(3));
        assert_eq!(
            reports.token.refresh_before_expiry,
            c.token.refresh_before_expiry
        );
        assert_eq!(
            reports.token.refresh_token.as_ref().unwrap().value.expose(),
            "r"
        );
        assert_eq!(reports.client_id.as_deref(), Some("c"));
        assert_eq!(reports.client_section, "oidc");
        assert!(shares_refresh_token(&c.sources[0], reports));
        let vendor = &c.sources[2];
        assert_eq!(vendor.client_id.as_deref(), Some("vc"));
        assert_eq!(vendor.client_secret.as_ref().unwrap().value.expose(), "vs");
        assert_eq!(vendor.client_section, "sources.vendor");
        assert!(vendor.token.scopes.is_empty());
        assert!(!shares_refresh_token(&c.sources[0], vendor));
        assert!(!format!("{c:?}").contains("\"vs\""));
    }

    #[test]
    fn bad_sources_are_reported_with_their_key() {
        let bad = |extra: &str| parse(&format!("{MINIMAL}{extra}")).unwrap_err();

        let err = bad("[sources.x]\nscopes = [1]\nbogus = true\n");
        assert_eq!(keys(&err), ["sources.x.bogus", "sources.x.scopes"], "{err}");
        let err = bad("[sources.\"a b\"]\nscopes = []\n");
        assert_eq!(keys(&err), ["sources.a b"], "{err}");
        let err = bad("[sources.default]\nscopes = []\n");
        assert!(err.problems[0].1.contains("[token]"), "{err}");
        let err = parse(&format!("sources = 3\n{MINIMAL}")).unwrap_err();
        assert_eq!(keys(&err), ["sources"]);
        // A source of its own kind inherits nothing from [token].
        let err = bad("[sources.x]\nsource = \"refresh_token\"\n");
        assert_eq!(keys(&err), ["sources.x.refresh_token"], "{err}");
        let err = bad("[sources.x]\nsource = \"magic\"\n");
        assert_eq!(keys(&err), ["sources.x.source"], "{err}");
        // A client is needed, here or in [oidc].
        let no_client = MINIMAL.replace("client_id = \"c\"\n", "");
        let err = parse(&format!(
            "{no_client}[sources.x]\nsource = \"refresh_token\"\nrefresh_token = \"y\"\n"
        ))
        .unwrap_err();
        assert_eq!(
            keys(&err),
            ["sources.x.client_id", "oidc.client_id"],
            "{err}"
        );
        // An inherited key that is wrong is reported once, under token.
        let err = parse(&format!(
            "{}[sources.x]\nscopes = [\"a\"]\n",
            MINIMAL.replace(
                "refresh_token = \"r\"",
                "refresh_token = \"r\"\nexpiry_margin = \"9d\""
            )
        ))
        .unwrap_err();
        assert_eq!(keys(&err), ["token.expiry_margin"], "{err}");
    }

    #[test]
    fn sinks_are_read_with_their_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let text = format!(
            "{MINIMAL}\
             [[sink]]\npath = \"{d}/token\"\n\
             [[sink]]\nsource = \"reports\"\npath = \"{d}/token.json\"\nformat = \"json\"\n\
             mode = \"0640\"\non_shutdown = \"expire\"\n\
             [[sink]]\nformat = \"sso_cache\"\nstart_url = \"https://x.awsapps.com/start\"\n\
             session_name = \"team\"\ncache_dir = \"{d}/aws\"\non_shutdown = \"keep\"\n\
             [sources.reports]\nscopes = [\"r\"]\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.sinks.len(), 3);
        assert_eq!(
            c.sinks[0],
            SinkConfig {
                source: "default".into(),
                path: dir.path().join("token"),
                format: SinkFormat::Raw,
                mode: 0o600,
                on_shutdown: OnShutdown::Remove,
            }
        );
        assert_eq!(c.sinks[1].source, "reports");
        assert_eq!(c.sinks[1].format, SinkFormat::Json);
        assert_eq!(c.sinks[1].mode, 0o640);
        assert_eq!(c.sinks[1].on_shutdown, OnShutdown::Expire);
        // The AWS CLI's name: SHA-1 of the session name; the region from
        // [oidc].
        assert_eq!(
            c.sinks[2].path,
            dir.path()
                .join("aws")
                .join(crate::token::sso_cache_file_name("team"))
        );
        assert_eq!(
            c.sinks[2].format,
            SinkFormat::SsoCache {
                start_url: "https://x.awsapps.com/start".into(),
                region: Some("us-east-1".into()),
            }
        );
        assert_eq!(c.sinks[2].on_shutdown, OnShutdown::Keep);
    }

    #[test]
    fn a_token_only_sidecar_has_sinks_and_no_proxy() {
        let no_proxy = MINIMAL.replace(
            "[proxy]\nlisten = \"127.0.0.1:8080\"\nupstream = \"http://127.0.0.1:9000\"\n",
            "",
        );
        assert!(!no_proxy.contains("[proxy]"));
        let c = parse(&format!("{no_proxy}[[sink]]\npath = \"/tmp/t\"\n")).unwrap();
        assert!(c.routes.is_empty());
        assert_eq!(c.sinks.len(), 1);
        // [proxy] for its server-wide keys only, without listen: fine.
        let c = parse(&format!(
            "{no_proxy}[proxy]\nshutdown_grace = \"3s\"\n[[sink]]\npath = \"/tmp/t\"\n"
        ))
        .unwrap();
        assert!(c.routes.is_empty());
        // Without sinks, something must be proxied.
        let err = parse(&no_proxy).unwrap_err();
        assert_eq!(keys(&err), ["proxy"], "{err}");
        let err = parse(&format!("{no_proxy}[proxy]\nlisten = \"127.0.0.1:8080\"\n")).unwrap_err();
        assert_eq!(keys(&err), ["proxy.upstream"], "{err}");
        assert!(err.problems[0].1.contains("[[sink]]"), "{err}");
        // A listen address nothing would use is a mistake.
        let err = parse(&format!(
            "{no_proxy}[proxy]\nlisten = \"127.0.0.1:8080\"\n[[sink]]\npath = \"/tmp/t\"\n"
        ))
        .unwrap_err();
        assert_eq!(keys(&err), ["proxy.listen"], "{err}");
    }

    #[test]
    fn bad_sinks_are_reported_with_their_key() {
        let bad = |extra: &str| parse(&format!("{MINIMAL}{extra}")).unwrap_err();
        let err = bad("[[sink]]\nformat = \"yaml\"\nbogus = 1\n");
        assert_eq!(keys(&err), ["sink[0].bogus", "sink[0].format"], "{err}");
        let err = bad("[[sink]]\nformat = \"raw\"\n");
        assert_eq!(keys(&err), ["sink[0].path"], "{err}");
        let err = bad("[[sink]]\npath = \"/tmp/t\"\nstart_url = \"https://x\"\n");
        assert_eq!(keys(&err), ["sink[0].start_url"], "{err}");
        assert!(err.problems[0].1.contains("sso_cache"), "{err}");
        let err = bad("[[sink]]\nformat = \"sso_cache\"\npath = \"/tmp/t\"\n");
        assert_eq!(keys(&err), ["sink[0].start_url"], "{err}");
        for (mode, why) in [
            ("0666", "others write"),
            ("0620", "others write"),
            ("0200", "owner read"),
            ("1777", "beyond 0777"),
            ("rw-r-----", "not an octal mode"),
        ] {
            let err = bad(&format!("[[sink]]\npath = \"/tmp/t\"\nmode = \"{mode}\"\n"));
            assert_eq!(keys(&err), ["sink[0].mode"], "{err}");
            assert!(err.problems[0].1.contains(why), "{mode}: {err}");
        }
        let err = bad("[[sink]]\npath = \"/tmp/t\"\non_shutdown = \"shred\"\n");
        assert_eq!(keys(&err), ["sink[0].on_shutdown"], "{err}");
        let err = bad("[[sink]]\npath = \"/tmp/t\"\nsource = \"nope\"\n");
        assert_eq!(keys(&err), ["sink[0].source"], "{err}");
        assert!(err.problems[0].1.contains("default"), "{err}");
        let err = bad("[[sink]]\npath = \"/tmp/t\"\n[[sink]]\npath = \"/tmp/../tmp/t\"\n");
        assert_eq!(keys(&err), ["sink[1].path"], "{err}");
        let err = parse(&format!("sink = \"x\"\n{MINIMAL}")).unwrap_err();
        assert_eq!(keys(&err), ["sink"], "{err}");

        // Never over a file that holds a refresh token.
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.json");
        let text = format!(
            "{}[[sink]]\npath = \"{}\"\n",
            MINIMAL.replace(
                "refresh_token = \"r\"",
                &format!(
                    "refresh_token = \"r\"\nstate_file = \"{}\"",
                    state.display()
                )
            ),
            dir.path().join(".").join("state.json").display()
        );
        let err = parse(&text).unwrap_err();
        assert_eq!(keys(&err), ["sink[0].path"], "{err}");
        assert!(err.problems[0].1.contains("token.state_file"), "{err}");
    }

    #[test]
    fn sources_sharing_a_credential_must_not_undo_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let state = |name: &str| dir.path().join(name).display().to_string();
        let text = format!(
            "{MINIMAL}[sources.x]\nscopes = [\"a\"]\nstate_file = \"{}\"\n\
             [sources.y]\nscopes = [\"b\"]\nstate_file = \"{}\"\n",
            state("one.json"),
            state("two.json")
        );
        let err = parse(&text).unwrap_err();
        assert_eq!(keys(&err), ["sources.y.state_file"], "{err}");
        assert!(err.problems[0].1.contains("source `x`"), "{err}");

        // The same file, or one of them only: fine.
        let text = format!(
            "{MINIMAL}[sources.x]\nscopes = [\"a\"]\nstate_file = \"{}\"\n\
             [sources.y]\nscopes = [\"b\"]\n",
            state("one.json")
        );
        parse(&text).unwrap();

        // With Redis, one record per refresh token: one scope set.
        let text = format!(
            "{MINIMAL}[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\n\
             [sources.x]\nscopes = [\"a\"]\n"
        );
        let err = parse(&text).unwrap_err();
        assert_eq!(keys(&err), ["store.kind"], "{err}");

        let cache = dir.path().join("cache.json").display().to_string();
        let text = format!(
            "{MINIMAL}[sources.x]\nsource = \"sso_cache\"\nsso_cache_file = \"{cache}\"\n\
             [sources.y]\nsource = \"sso_cache\"\nsso_cache_file = \"{cache}\"\nscopes = [\"b\"]\n"
        );
        let err = parse(&text).unwrap_err();
        assert_eq!(keys(&err), ["sources.y.sso_cache_file"], "{err}");
    }

    const JWT_BEARER: &str = r#"
[proxy]
listen = "127.0.0.1:8080"
upstream = "http://127.0.0.1:9000"
[admin]
listen = "127.0.0.1:9901"
[oidc]
region = "eu-west-1"
client_id = "arn:aws:sso::111122223333:application/ssoins-1111111111111111/apl-1111111111111111"
[token]
source = "jwt_bearer"
assertion_file = "/var/run/secrets/sso-token-proxy/token"
"#;

    #[cfg(feature = "aws-iam")]
    #[test]
    fn jwt_bearer_needs_an_application_arn_a_region_and_an_assertion_file() {
        let c = parse(JWT_BEARER).unwrap();
        assert_eq!(c.token.source, SourceKind::JwtBearer);
        assert_eq!(
            c.token.assertion_file.as_deref(),
            Some(Path::new("/var/run/secrets/sso-token-proxy/token"))
        );
        let keys = |text: &str| -> Vec<String> {
            parse(text)
                .unwrap_err()
                .problems
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        };
        let text = JWT_BEARER
            .replace(
                "region = \"eu-west-1\"",
                "endpoint = \"http://127.0.0.1:8999\"",
            )
            .replace("arn:aws:sso::111122223333:application", "my-client")
            .replace("assertion_file = ", "#")
            + "[emulator]\nlisten = \"127.0.0.1:8999\"\nassertion_lifetime = \"1s\"\n";
        let found = keys(&text);
        for key in [
            "oidc.region",
            "oidc.client_id",
            "token.assertion_file",
            "emulator.assertion_lifetime",
        ] {
            assert!(found.iter().any(|k| k == key), "{key} in {found:?}");
        }
    }

    #[cfg(feature = "aws-iam")]
    #[test]
    fn a_named_jwt_bearer_source_takes_its_own_application_arn() {
        let text = format!(
            "{MINIMAL}[sources.pod]\nsource = \"jwt_bearer\"\nassertion_file = \"/run/token\"\n\
             client_id = \"arn:aws:sso::111122223333:application/ssoins-1/apl-2\"\n"
        );
        let c = parse(&text).unwrap();
        let pod = c.sources.iter().find(|s| s.name == "pod").unwrap();
        assert_eq!(pod.token.source, SourceKind::JwtBearer);
        assert_eq!(
            pod.client_id.as_deref(),
            Some("arn:aws:sso::111122223333:application/ssoins-1/apl-2")
        );
        // Inheriting [oidc]'s client id (not an ARN) is named as a problem.
        let text = format!(
            "{MINIMAL}[sources.pod]\nsource = \"jwt_bearer\"\nassertion_file = \"/run/token\"\n"
        );
        let err = parse(&text).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].0, "oidc.client_id");
        assert!(err.problems[0].1.contains("sources.pod.source"), "{err}");
    }

    #[cfg(feature = "aws-iam")]
    #[test]
    fn an_exchange_source_takes_its_keys_and_routes_name_it() {
        let arn = "arn:aws:sso::111122223333:application/ssoins-1/apl-2";
        let text = format!(
            "{MINIMAL}[sources.callers]\nsource = \"exchange\"\nclient_id = \"{arn}\"\n\
             [[route]]\nname = \"r\"\npath_prefix = \"/api\"\nupstream = \"http://127.0.0.1:9100\"\n\
             token_source = \"callers\"\n"
        );
        let c = parse(&text).unwrap();
        assert!(c.sources.iter().all(|s| s.name != "callers"));
        let e = &c.exchanges[0];
        assert_eq!(e.name, "callers");
        assert_eq!(e.application_arn, arn);
        assert_eq!(e.grant, ExchangeGrant::JwtBearer);
        assert_eq!(e.inbound_header, http::header::AUTHORIZATION);
        assert_eq!(e.max_callers, 10_000);
        assert_eq!(e.caller_failure_ttl, Duration::from_secs(30));
        assert_eq!(e.max_concurrent_exchanges, 32);
        assert_eq!(c.routes[0].token_source, "callers");

        let text = format!(
            "{MINIMAL}[sources.callers]\nsource = \"exchange\"\nclient_id = \"{arn}\"\n\
             grant = \"token_exchange\"\ninbound_header = \"X-Caller-Token\"\nmax_callers = 5\n\
             caller_failure_ttl = \"2m\"\nmax_concurrent_exchanges = 4\nscopes = [\"a\"]\n"
        );
        let e = parse(&text).unwrap().exchanges.remove(0);
        assert_eq!(
            e.grant,
            ExchangeGrant::TokenExchange(DEFAULT_SUBJECT_TOKEN_TYPE.to_owned())
        );
        assert_eq!(e.inbound_header.as_str(), "x-caller-token");
        assert_eq!((e.max_callers, e.max_concurrent_exchanges), (5, 4));
        assert_eq!(e.caller_failure_ttl, Duration::from_secs(120));
        assert_eq!(e.scopes, ["a"]);
    }

    #[cfg(feature = "aws-iam")]
    #[test]
    fn bad_exchange_sources_are_reported_with_their_key() {
        let arn = "arn:aws:sso::111122223333:application/ssoins-1/apl-2";
        let cases = [
            ("client_id = \"c\"\n", "sources.x.client_id"),
            ("grant = \"password\"\n", "sources.x.grant"),
            (
                "subject_token_type = \"t\"\n",
                "sources.x.subject_token_type",
            ),
            ("inbound_header = \"cookie\"\n", "sources.x.inbound_header"),
            ("inbound_header = \"a b\"\n", "sources.x.inbound_header"),
            ("max_callers = 0\n", "sources.x.max_callers"),
            (
                "caller_failure_ttl = \"0s\"\n",
                "sources.x.caller_failure_ttl",
            ),
            (
                "caller_failure_ttl = \"2h\"\n",
                "sources.x.caller_failure_ttl",
            ),
            (
                "max_concurrent_exchanges = 0\n",
                "sources.x.max_concurrent_exchanges",
            ),
            ("assertion_file = \"/t\"\n", "sources.x.assertion_file"),
        ];
        for (line, key) in cases {
            let id = if line.starts_with("client_id") {
                String::new()
            } else {
                format!("client_id = \"{arn}\"\n")
            };
            let text = format!("{MINIMAL}[sources.x]\nsource = \"exchange\"\n{id}{line}");
            let err = parse(&text).unwrap_err();
            assert_eq!(keys(&err), [key], "{line}: {err}");
        }
        let missing = format!("{MINIMAL}[sources.x]\nsource = \"exchange\"\n");
        assert_eq!(keys(&parse(&missing).unwrap_err()), ["sources.x.client_id"]);
        let in_token = MINIMAL.replace("source = \"refresh_token\"", "source = \"exchange\"");
        let err = parse(&in_token).unwrap_err();
        assert!(keys(&err).contains(&"token.source"), "{err}");
        let unsigned = format!(
            "{}[sources.x]\nsource = \"exchange\"\nclient_id = \"{arn}\"\n",
            MINIMAL.replace(
                "region = \"us-east-1\"\n",
                "endpoint = \"http://127.0.0.1:1\"\n"
            )
        );
        assert_eq!(keys(&parse(&unsigned).unwrap_err()), ["oidc.region"]);
    }

    #[cfg(feature = "aws-iam")]
    #[test]
    fn exchange_example_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/exchange.toml");
        let c = Config::load(Path::new(path)).unwrap();
        assert_eq!(c.exchanges.len(), 1);
        assert_eq!(c.routes[0].token_source, c.exchanges[0].name);
    }

    #[cfg(feature = "aws-iam")]
    #[test]
    fn jwt_bearer_example_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/jwt-bearer.toml");
        let c = Config::load(Path::new(path)).unwrap();
        assert_eq!(c.token.source, SourceKind::JwtBearer);
        let emulator = c.emulator.unwrap();
        assert_eq!(emulator.assertion_file, c.token.assertion_file);
        assert_eq!(emulator.assertion_subject, "quickstart-pod");
    }

    #[cfg(not(feature = "aws-iam"))]
    #[test]
    fn jwt_bearer_needs_the_aws_iam_feature() {
        let err = parse(JWT_BEARER).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].0, "token.source");
        assert!(err.problems[0].1.contains("aws-iam"), "{err}");
    }

    #[test]
    fn application_arns() {
        assert!(is_application_arn(
            "arn:aws:sso::111122223333:application/ssoins-1/apl-1"
        ));
        assert!(is_application_arn(
            "arn:aws-us-gov:sso::111122223333:application/ssoins-1/apl-1"
        ));
        assert!(!is_application_arn("arn:aws:sso::x:application/a"));
        assert!(!is_application_arn("arn:aws:sso::1:application/"));
        assert!(!is_application_arn("arn:aws:iam::1:role/r"));
        assert!(!is_application_arn("client-id"));
    }

    #[test]
    fn routes_are_read_in_order_and_proxy_upstream_is_the_implicit_last() {
        let text = format!(
            "{MINIMAL}[sources.reports]\nscopes = [\"r\"]\n\
             [[route]]\nname = \"vendor\"\nlisten = \"127.0.0.1:8081\"\nupstream = \"https://vendor.example/api\"\n\
             token_header = \"X-Api-Token\"\ntoken_format = \"{{token}}\"\n\
             [[route]]\nname = \"reports\"\npath_prefix = \"/reports/\"\nstrip_prefix = true\n\
             upstream = \"http://127.0.0.1:9100/r\"\ntoken_source = \"reports\"\npreserve_host = true\n"
        );
        let c = parse(&text).unwrap();
        let names: Vec<_> = c.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["vendor", "reports", "default"]);
        let vendor = &c.routes[0];
        assert_eq!(vendor.listen, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(vendor.token_header, "x-api-token");
        assert_eq!(vendor.token_format.to_string(), "{token}");
        assert_eq!(vendor.token_source, "default");
        let reports = &c.routes[1];
        assert_eq!(reports.listen, c.proxy.listen);
        assert_eq!(reports.path_prefix.as_deref(), Some("/reports/"));
        assert!(reports.strip_prefix && reports.preserve_host);
        assert!(reports.forwarded_headers);
        let default = &c.routes[2];
        assert_eq!(default.section, "proxy");
        assert_eq!(default.token_format, TokenFormat::bearer());
        assert_eq!(Some(&default.upstream), c.proxy.upstream.as_ref());

        // Only routes: no implicit one.
        let text = format!(
            "{}[[route]]\nname = \"a\"\nupstream = \"http://127.0.0.1:9\"\n",
            MINIMAL.replace("upstream = \"http://127.0.0.1:9000\"\n", "")
        );
        let c = parse(&text).unwrap();
        assert!(c.proxy.upstream.is_none());
        assert_eq!(c.routes.len(), 1);
        // Neither: where would requests go?
        let err =
            parse(&MINIMAL.replace("upstream = \"http://127.0.0.1:9000\"\n", "")).unwrap_err();
        assert_eq!(keys(&err), ["proxy.upstream"]);
    }

    #[test]
    fn bad_routes_are_reported_with_their_key() {
        // Routes only, so that none shadows the implicit one.
        let only_routes = MINIMAL.replace("upstream = \"http://127.0.0.1:9000\"\n", "");
        let bad = |routes: &str| parse(&format!("{only_routes}{routes}")).unwrap_err();
        let route = |extra: &str| {
            format!("[[route]]\nname = \"r\"\nupstream = \"http://127.0.0.1:9\"\n{extra}")
        };

        let err = bad(&route("token_source = \"nope\"\n"));
        assert_eq!(keys(&err), ["route.r.token_source"], "{err}");
        assert!(err.problems[0].1.contains("default"), "{err}");
        for (extra, key) in [
            ("token_format = \"Bearer\"\n", "route.r.token_format"),
            (
                "token_format = \"{token} {token}\"\n",
                "route.r.token_format",
            ),
            (
                "token_format = \"Bearer {token}\\n\"\n",
                "route.r.token_format",
            ),
            ("token_header = \"Connection\"\n", "route.r.token_header"),
            ("token_header = \"Host\"\n", "route.r.token_header"),
            (
                "token_header = \"Content-Length\"\n",
                "route.r.token_header",
            ),
            ("token_header = \"bad header\"\n", "route.r.token_header"),
            ("host = \"user@x\"\n", "route.r.host"),
            ("path_prefix = \"v1\"\n", "route.r.path_prefix"),
            ("path_prefix = \"/v1/../x\"\n", "route.r.path_prefix"),
            ("strip_prefix = true\n", "route.r.strip_prefix"),
            ("listen = \"127.0.0.1:9901\"\n", "route.r.listen"),
            ("escaped_slashes = \"decode\"\n", "route.r.escaped_slashes"),
            ("bogus = 1\n", "route.r.bogus"),
        ] {
            let err = bad(&route(extra));
            assert_eq!(keys(&err), [key], "{extra}: {err}");
        }
        let err = bad("[[route]]\nupstream = \"http://127.0.0.1:9\"\n");
        assert_eq!(keys(&err), ["route[1].name"], "{err}");
        let err = bad("[[route]]\nname = \"x\"\n");
        assert_eq!(keys(&err), ["route.x.upstream"], "{err}");
        let err = bad("[route]\nname = \"x\"\n");
        assert_eq!(keys(&err), ["route"], "{err}");
        let err = bad(&format!("{}{}", route(""), route("")));
        assert_eq!(keys(&err), ["route.r.name"], "{err}");
        let err = parse(&format!(
            "{MINIMAL}[[route]]\nname = \"default\"\nupstream = \"http://127.0.0.1:9\"\npath_prefix = \"/d\"\n"
        ))
        .unwrap_err();
        assert_eq!(keys(&err), ["route.default.name"], "{err}");
    }

    #[test]
    fn routes_that_can_never_match_are_errors() {
        let bad = |routes: &str| parse(&format!("{MINIMAL}{routes}")).unwrap_err();
        let route = |name: &str, extra: &str| {
            format!("[[route]]\nname = \"{name}\"\nupstream = \"http://127.0.0.1:9\"\n{extra}")
        };
        // A catch-all on proxy.listen leaves the implicit route nothing.
        let err = bad(&route("all", ""));
        assert_eq!(keys(&err), ["proxy.upstream"], "{err}");
        // A prefix under an earlier one, or the same host.
        let err = bad(&format!(
            "{}{}",
            route("v1", "path_prefix = \"/v1\"\n"),
            route("v1-items", "path_prefix = \"/v1/items/\"\n")
        ));
        assert_eq!(keys(&err), ["route.v1-items.name"], "{err}");
        let err = bad(&format!(
            "{}{}",
            route("api", "host = \"api.internal\"\n"),
            route(
                "api-v1",
                "host = \"API.internal:8080\"\npath_prefix = \"/v1\"\n"
            )
        ));
        assert_eq!(keys(&err), ["route.api-v1.name"], "{err}");
        // Not shadowed: narrower first, another listener, another host.
        parse(&format!(
            "{MINIMAL}{}{}{}{}",
            route("items", "path_prefix = \"/v1/items\"\n"),
            route("v1", "path_prefix = \"/v1\"\n"),
            route("other-listener", "listen = \"127.0.0.1:8082\"\n"),
            route("api", "host = \"api.internal:8080\"\n")
                + &route("api-any", "host = \"api.internal\"\n"),
        ))
        .unwrap();
    }

    #[test]
    fn secret_files_must_be_small_regular_files() {
        assert!(
            read_secret_file(Path::new("/dev/zero"))
                .unwrap_err()
                .contains("not a regular file")
        );
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; 70 * 1024]).unwrap();
        assert!(read_secret_file(&big).unwrap_err().contains("larger than"));
        let ok = dir.path().join("ok");
        std::fs::write(&ok, "s3cret\n").unwrap();
        assert_eq!(read_secret_file(&ok).unwrap().0.expose(), "s3cret");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        assert!(read_secret_file(&empty).unwrap_err().contains("empty"));
    }
}
