//! The command line: `run` (default), `check-config`, `token`, `login`,
//! `emulator`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum, parser::ValueSource};
use tokio::net::TcpListener;

use crate::{
    admin,
    config::{
        Config, ConfigError, DEFAULT_SOURCE, EmulatorSection, LoginConfig, OidcConfig, RouteConfig,
        RuntimeShape, SourceConfig, SourceKind,
    },
    emulator::{Emulator, EmulatorConfig, EmulatorHandle, SeedClient},
    oidc::OidcClient,
    per_core,
    proxy::{Proxy, ProxyError, Route, SharedLimits},
    sink::Sink,
    sources::TokenSources,
    tls,
    token::{
        DevicePrompt, LoginOptions, Reuse, SsoCacheFile, StateFile, Token, TokenError, device_login,
    },
};

/// Token-exchange reverse proxy for AWS IAM Identity Center OIDC.
#[derive(Debug, Parser)]
#[command(name = "sso-token-proxy", version, about)]
pub(crate) struct Cli {
    /// The config file.
    #[arg(long, global = true, default_value = "config.toml")]
    pub(crate) config: PathBuf,
    /// Log line format (level from RUST_LOG, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
    /// What to do (default: run the proxy).
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the config file and exit (0 when valid, 2 otherwise).
    CheckConfig {
        /// Don't check that the listen addresses are free.
        #[arg(long)]
        no_bind_check: bool,
    },
    /// Print a valid access token as JSON (stored, else from CreateToken).
    ///
    /// The stored one (state or cache file) while it has at least
    /// refresh_before_expiry + expiry_margin left, else a new one from
    /// CreateToken, stored as the proxy stores it.
    Token {
        /// Always call CreateToken. The service may rotate the refresh
        /// token: a proxy running with the same state or cache file keeps
        /// the old one and its next refresh can fail.
        #[arg(long)]
        fresh: bool,
        /// Refresh this many times in a row, printing each (always calls
        /// CreateToken); for exercising rotation and persistence.
        #[arg(long, hide = true)]
        count: Option<u32>,
    },
    /// Log in with the device flow and write an AWS SSO cache file.
    ///
    /// Needs only oidc.region and token.start_url; the file is
    /// token.sso_cache_file, else the AWS CLI's
    /// ~/.aws/sso/cache/<sha1 of session_name or start_url>.json.
    Login,
    /// Run the SSO-OIDC emulator alone.
    Emulator {
        /// Where it listens.
        #[arg(long, default_value = "127.0.0.1:8999")]
        listen: SocketAddr,
    },
}

/// Parses the command line and runs. Config problems exit 2, other
/// failures 1.
pub(crate) fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let config_given = matches.value_source("config") != Some(ValueSource::DefaultValue);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    init_tracing(cli.log_format);
    // Before any secret is read: no core file, not dumpable.
    if let Err(e) = crate::hardening::keep_memory_private() {
        tracing::warn!(error = %e, "could not keep the process's memory private (core files, ptrace)");
    }
    tls::install_crypto_provider();
    // One worker (TOKIO_WORKER_THREADS=1, e.g. a sidecar pinned to one
    // core) is served better by the single-threaded scheduler.
    let single = std::env::var("TOKIO_WORKER_THREADS").is_ok_and(|v| v.trim() == "1");
    let mut builder = if single {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sso-token-proxy: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("{e}");
            if let Some(hint) = config_hint(&e, config_given) {
                eprintln!("{hint}");
            }
            ExitCode::from(2)
        }
        Err(Failure::Other(message)) => {
            eprintln!("sso-token-proxy: {message}");
            ExitCode::from(1)
        }
    }
}

/// A second line for a config file that is not there: how to name one.
fn config_hint(e: &ConfigError, config_given: bool) -> Option<String> {
    let [(key, reason)] = e.problems.as_slice() else {
        return None;
    };
    if key != "(file)" || !reason.contains("No such file") {
        return None;
    }
    Some(if config_given {
        "hint: check the path given to --config (see sso-token-proxy --help)".to_owned()
    } else {
        format!(
            "hint: no --config was given, so {} in the current directory was tried; \
             pass --config FILE (see sso-token-proxy --help)",
            e.file
        )
    })
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

enum Failure {
    Config(ConfigError),
    Other(String),
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Self::Config(e)
    }
}

fn config_problem(config: &Config, key: &str, reason: impl Into<String>) -> Failure {
    file_problem(&config.path, key, reason)
}

fn file_problem(file: &Path, key: &str, reason: impl Into<String>) -> Failure {
    Failure::Config(ConfigError {
        file: file.display().to_string(),
        problems: vec![(key.to_owned(), reason.into())],
    })
}

async fn dispatch(cli: Cli) -> Result<(), Failure> {
    match cli.command.unwrap_or(Command::Run) {
        Command::Emulator { listen } => crate::emulator::run_standalone(listen)
            .await
            .map_err(|e| Failure::Other(format!("emulator: cannot listen on {listen}: {e}"))),
        Command::CheckConfig { no_bind_check } => check_config(&cli.config, !no_bind_check).await,
        Command::Run => run(&cli.config).await,
        Command::Token { fresh, count } => token(&cli.config, fresh, count).await,
        Command::Login => login(&cli.config).await,
    }
}

// === check-config ===

async fn check_config(path: &Path, bind_check: bool) -> Result<(), Failure> {
    let config = Config::load(path)?;
    let mut problems = Vec::new();
    if bind_check {
        for (key, addr) in listen_addrs(&config) {
            if let Err(e) = std::net::TcpListener::bind(addr) {
                problems.push((key, format!("cannot listen on {addr}: {e}")));
            }
        }
    }
    problems.extend(token_dirs_not_writable(&config));
    problems.extend(sink_dirs_not_writable(&config));
    for source in &config.sources {
        match source.token.source {
            SourceKind::RefreshToken => {
                if let Some(p) = &source.token.state_file
                    && let Err(e) = StateFile::load(p)
                {
                    problems.push((source.key("state_file"), e.to_string()));
                }
            }
            SourceKind::SsoCache => {
                if let Some(p) = &source.token.sso_cache_file
                    && let Err(e) = SsoCacheFile::load(p)
                {
                    problems.push((source.key("sso_cache_file"), e.to_string()));
                }
            }
            SourceKind::JwtBearer => {
                // The embedded emulator writes its own assertion file at start.
                let written_by_emulator = config
                    .emulator
                    .as_ref()
                    .and_then(|e| e.assertion_file.as_ref())
                    == source.token.assertion_file.as_ref();
                if let Some(p) = &source.token.assertion_file
                    && !written_by_emulator
                    && let Err(reason) = crate::config::read_secret_file(p)
                {
                    problems.push((source.key("assertion_file"), reason));
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(Failure::Config(ConfigError {
            file: config.path.display().to_string(),
            problems,
        }));
    }
    println!("{}: ok", config.path.display());
    Ok(())
}

/// The directories the token source writes its files in, and whether this
/// process can create files there (a rotated refresh token that cannot be
/// saved is lost with the process).
fn token_dirs_not_writable(config: &Config) -> Vec<(String, String)> {
    let files = config
        .sources
        .iter()
        .map(|source| match source.token.source {
            SourceKind::RefreshToken => {
                (source.key("state_file"), source.token.state_file.as_ref())
            }
            SourceKind::SsoCache => (
                source.key("sso_cache_file"),
                source.token.sso_cache_file.as_ref(),
            ),
            // Reads its assertion file, writes nothing.
            SourceKind::JwtBearer => (source.key("assertion_file"), None),
        });
    files
        .filter_map(|(key, path)| {
            // A missing directory is created at start: then its nearest
            // existing parent must take files.
            let dir = nearest_existing_dir(path?);
            crate::fs_atomic::check_dir_writable(dir).err().map(|e| {
                (
                    key,
                    format!(
                        "cannot create files in {}: {e}; the rotated refresh token could not be saved there",
                        dir.display()
                    ),
                )
            })
        })
        .collect()
}

/// The directories of the `[[sink]]` files, and whether this process can
/// create files there. A missing directory is created at start (mode
/// 0700): then its nearest existing parent must take files.
fn sink_dirs_not_writable(config: &Config) -> Vec<(String, String)> {
    config
        .sinks
        .iter()
        .enumerate()
        .filter_map(|(i, sink)| {
            let dir = nearest_existing_dir(&sink.path);
            crate::fs_atomic::check_dir_writable(dir).err().map(|e| {
                (
                    format!("sink[{i}].path"),
                    format!(
                        "cannot create files in {}: {e}; the token sink could not be written there",
                        dir.display()
                    ),
                )
            })
        })
        .collect()
}

/// The directory of `file`, or its nearest ancestor that exists.
fn nearest_existing_dir(file: &Path) -> &Path {
    crate::fs_atomic::parent_dir(file)
        .ancestors()
        .find(|d| d.as_os_str().is_empty() || d.exists())
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Starts the `[[sink]]`s, creating missing directories (mode 0700). Their
/// sources are kept fresh by `TokenSources::keep_fresh`, so the files stay
/// fresh without any request.
fn start_sinks(config: &Config, sources: &TokenSources) -> Result<Vec<Sink>, Failure> {
    let mut sinks = Vec::new();
    for (i, sink) in config.sinks.iter().enumerate() {
        let dir = crate::fs_atomic::parent_dir(&sink.path);
        if !dir.is_dir() {
            crate::fs_atomic::create_private_dir_all(dir).map_err(|e| {
                config_problem(
                    config,
                    &format!("sink[{i}].path"),
                    format!("cannot create directory {}: {e}", dir.display()),
                )
            })?;
            tracing::info!(dir = %dir.display(), "created the token sink's directory (mode 0700)");
        }
        let cache = sources.get(&sink.source).ok_or_else(|| {
            config_problem(
                config,
                &format!("sink[{i}].source"),
                format!("unknown token source `{}`", sink.source),
            )
        })?;
        tracing::info!(
            path = %sink.path.display(),
            source = %sink.source,
            format = sink.format.as_str(),
            "writing the source's token to a sink"
        );
        sinks.push(Sink::spawn(sink.clone(), cache));
    }
    Ok(sinks)
}

fn listen_addrs(config: &Config) -> Vec<(String, SocketAddr)> {
    let mut out: Vec<(String, SocketAddr)> = route_listeners(config)
        .into_iter()
        .map(|(key, addr, _)| (key, addr))
        .collect();
    out.push(("admin.listen".to_owned(), config.admin.listen));
    if let Some(e) = &config.emulator {
        out.push(("emulator.listen".to_owned(), e.listen));
    }
    out
}

/// Raises the open-file limit as far as allowed, and warns when it is
/// still below the connections the config lets the proxy hold.
fn check_open_file_limit(config: &Config) {
    if let Err(e) = crate::hardening::raise_open_file_limit() {
        tracing::warn!(error = %e, "could not raise the open-file limit");
    }
    // Client connections per listener, upstream connections per route, the
    // admin listener's, and some for everything else (files, the SSO-OIDC
    // endpoint, Redis, the runtime).
    let needed = route_listeners(config).len() * config.proxy.max_connections
        + config.routes.len() * config.proxy.upstream_max_connections
        + admin::MAX_CONNECTIONS
        + 64;
    if let Some(limit) = crate::hardening::open_file_limit()
        && limit < needed as u64
    {
        tracing::warn!(
            open_files = limit,
            needed,
            "the open-file limit is below what proxy.max_connections and \
             proxy.upstream_max_connections allow: connections beyond it cannot be \
             accepted or opened; raise the hard limit (ulimit -Hn, LimitNOFILE=, the \
             container runtime's nofile ulimit) or lower those keys"
        );
    }
}

/// The proxy's listeners: each address some route is served on, with the
/// key that names it (`proxy.listen`, else the first route's `listen`)
/// and its routes in matching order.
fn route_listeners(config: &Config) -> Vec<(String, SocketAddr, Vec<&RouteConfig>)> {
    let mut out: Vec<(String, SocketAddr, Vec<&RouteConfig>)> = Vec::new();
    for route in &config.routes {
        match out.iter_mut().find(|(_, addr, _)| *addr == route.listen) {
            Some((_, _, routes)) => routes.push(route),
            None => {
                let key = if route.listen == config.proxy.listen {
                    "proxy.listen".to_owned()
                } else {
                    route.key("listen")
                };
                out.push((key, route.listen, vec![route]));
            }
        }
    }
    out
}

fn log_routes(routes: &[&RouteConfig]) {
    for route in routes {
        tracing::info!(
            route = %route.name,
            listen = %route.listen,
            host = route.host.as_deref().unwrap_or("*"),
            path_prefix = route.path_prefix.as_deref().unwrap_or("/"),
            upstream = %route.upstream,
            source = %route.token_source,
            "route"
        );
    }
}

/// A listener's routes as the proxy takes them, with their sources'
/// caches.
fn proxy_routes(routes: &[&RouteConfig], sources: &TokenSources) -> Vec<Route> {
    routes
        .iter()
        .map(|r| {
            // Validation made sure the source exists.
            let cache = sources
                .get(&r.token_source)
                .unwrap_or_else(|| sources.default_cache())
                .clone();
            let mut route = Route::new(r.name.clone(), r.upstream.clone(), cache);
            if let Some((callers, inbound)) = sources.exchange(&r.token_source) {
                route = route.per_caller(callers.clone(), inbound.clone());
            }
            let mut route = route
                .strip_prefix(r.strip_prefix)
                .token_header(r.token_header.clone())
                .token_format(r.token_format.clone())
                .preserve_host(r.preserve_host)
                .forwarded_headers(r.forwarded_headers)
                .escaped_slashes(r.escaped_slashes);
            if let Some(host) = &r.host {
                route = route.host(host.clone());
            }
            if let Some(prefix) = &r.path_prefix {
                route = route.path_prefix(prefix.clone());
            }
            if let Some(ca) = &r.upstream_ca_file {
                route = route.upstream_ca_file(ca.clone());
            }
            route
        })
        .collect()
}

/// A problem building a proxy, as `FILE: key: reason` with the route's key.
fn proxy_problem(config: &Config, e: ProxyError) -> Failure {
    match &e {
        ProxyError::Route { route, key, reason } => {
            let section = config
                .routes
                .iter()
                .find(|r| &r.name == route)
                .map_or_else(|| format!("route.{route}"), |r| r.section.clone());
            // `proxy.upstream_ca_file` for the implicit route.
            config_problem(config, &format!("{section}.{key}"), reason.clone())
        }
        _ => config_problem(config, e.config_key(), e.to_string()),
    }
}

// === shared set-up ===

/// What to do when the `[emulator]`'s address is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WhenTaken {
    /// A config error (the proxy must own its emulator).
    Fail,
    /// Use the emulator that listens there (e.g. the running quick start's),
    /// if it is one.
    UseRunning,
}

/// The `[oidc]` client and `[token]` as the one source `login` and
/// `token` know.
fn default_source_config(oidc: &OidcConfig, token: &crate::config::TokenConfig) -> SourceConfig {
    SourceConfig {
        name: DEFAULT_SOURCE.to_owned(),
        section: "token".to_owned(),
        token: token.clone(),
        client_id: oidc.client_id.clone(),
        client_secret: oidc.client_secret.clone(),
        client_section: "oidc".to_owned(),
    }
}

/// The emulator's clients for `sources`: each client with every refresh
/// token configured for it (and the state files', so a restart works),
/// granted the scopes of all its sources.
fn emulator_seeds(sources: &[SourceConfig]) -> Vec<SeedClient> {
    let mut clients: Vec<SeedClient> = Vec::new();
    for source in sources {
        let (Some(id), Some(secret)) = (&source.client_id, &source.client_secret) else {
            continue;
        };
        let i = match clients.iter().position(|c| &c.client_id == id) {
            Some(i) => i,
            None => {
                clients.push(SeedClient {
                    client_id: id.clone(),
                    client_secret: secret.value.clone(),
                    refresh_tokens: Vec::new(),
                    scopes: Vec::new(),
                });
                clients.len() - 1
            }
        };
        let client = &mut clients[i];
        let token = &source.token;
        let state = token
            .state_file
            .as_deref()
            .and_then(|p| StateFile::load(p).ok().flatten())
            .and_then(|state| state.refresh_token);
        for rt in token.refresh_token.iter().map(|r| &r.value).chain(&state) {
            if !client.refresh_tokens.contains(rt) {
                client.refresh_tokens.push(rt.clone());
            }
        }
        for scope in &token.scopes {
            if !client.scopes.contains(scope) {
                client.scopes.push(scope.clone());
            }
        }
    }
    clients
}

/// Starts the `[emulator]` of the quick start, seeded with the configured
/// clients and refresh tokens.
async fn start_embedded_emulator(
    file: &Path,
    section: Option<&EmulatorSection>,
    sources: &[SourceConfig],
    when_taken: WhenTaken,
) -> Result<Option<EmulatorHandle>, Failure> {
    let Some(section) = section else {
        return Ok(None);
    };
    let clients = emulator_seeds(sources);
    let started = Emulator::start(EmulatorConfig {
        listen: section.listen,
        access_token_lifetime: section.access_token_lifetime,
        rotate_refresh_tokens: section.rotate_refresh_tokens,
        device_poll_interval: section.device_poll_interval,
        clients,
        ..Default::default()
    })
    .await;
    let handle = match started {
        Ok(handle) => handle,
        Err(e)
            if e.kind() == std::io::ErrorKind::AddrInUse
                && when_taken == WhenTaken::UseRunning
                && is_running_emulator(section.listen).await =>
        {
            tracing::info!(listen = %section.listen, "an SSO-OIDC emulator already listens there (the running quick start?); using it");
            return Ok(None);
        }
        Err(e) => {
            return Err(file_problem(
                file,
                "emulator.listen",
                format!("cannot listen on {}: {e}", section.listen),
            ));
        }
    };
    tracing::info!(url = %handle.url(), "built-in SSO-OIDC emulator started");
    if let Some(path) = &section.assertion_file {
        keep_assertion_file(file, section, &handle, path.clone())?;
    }
    Ok(Some(handle))
}

/// Writes a JWT of the emulator's test issuer to `path` now and again at
/// 80% of its lifetime, as a kubelet does for a projected token.
fn keep_assertion_file(
    file: &Path,
    section: &EmulatorSection,
    emulator: &EmulatorHandle,
    path: PathBuf,
) -> Result<(), Failure> {
    let (subject, lifetime) = (
        section.assertion_subject.clone(),
        section.assertion_lifetime,
    );
    let write = move |emulator: &EmulatorHandle, path: &Path| {
        let jwt = emulator.mint_assertion(&subject, lifetime);
        crate::fs_atomic::write_atomic(path, jwt.expose().as_bytes())
    };
    write(emulator, &path).map_err(|e| {
        file_problem(
            file,
            "emulator.assertion_file",
            format!("cannot write {}: {e}", path.display()),
        )
    })?;
    let emulator = emulator.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(lifetime.mul_f64(0.8)).await;
            match write(&emulator, &path) {
                Ok(()) => {
                    tracing::debug!(path = %path.display(), "emulator: assertion file rotated")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "emulator: cannot rotate the assertion file")
                }
            }
        }
    });
    Ok(())
}

/// Whether an sso-token-proxy emulator answers on `listen`: its counters
/// route returns the counters' JSON.
async fn is_running_emulator(listen: SocketAddr) -> bool {
    use http_body_util::{BodyExt as _, Empty, Limited};
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let Ok(uri) = format!("http://{addr}/_emulator/counters").parse::<http::Uri>() else {
        return false;
    };
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let probe = async {
        let resp = client.get(uri).await.ok()?;
        if resp.status() != http::StatusCode::OK {
            return None;
        }
        let body = Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .ok()?
            .to_bytes();
        serde_json::from_slice::<crate::emulator::Counters>(&body).ok()
    };
    tokio::time::timeout(Duration::from_secs(5), probe)
        .await
        .ok()
        .flatten()
        .is_some()
}

/// Whether a source calls `CreateTokenWithIAM`, so the client must sign.
fn needs_sigv4(config: &Config) -> bool {
    !config.exchanges.is_empty()
        || config
            .sources
            .iter()
            .any(|s| s.token.source == SourceKind::JwtBearer)
}

/// The one SSO-OIDC client of the process; with `sign`, it signs
/// `CreateTokenWithIAM` with the AWS credential chain for `oidc.region`.
fn oidc_client(file: &Path, oidc: &OidcConfig, sign: bool) -> Result<OidcClient, Failure> {
    let mut builder = OidcClient::builder()
        .fips(oidc.use_fips)
        .dual_stack(oidc.use_dual_stack)
        .connect_timeout(oidc.connect_timeout)
        .call_timeout(oidc.call_timeout);
    if let Some(region) = &oidc.region {
        builder = builder.region(region.clone());
    }
    if let Some(endpoint) = &oidc.endpoint {
        builder = builder.endpoint(endpoint.clone());
    }
    #[cfg(feature = "aws-iam")]
    if sign && let Some(region) = &oidc.region {
        use crate::oidc::{AwsCredentials, SigV4Signer};
        // The credential chain is built at the first signed call.
        builder = builder.sigv4(SigV4Signer::new(
            AwsCredentials::default_chain(region.clone()),
            region.clone(),
        ));
    }
    #[cfg(not(feature = "aws-iam"))]
    let _ = sign;
    builder.build().map_err(|e| {
        let key = if oidc.endpoint.is_some() {
            "oidc.endpoint"
        } else {
            "oidc.region"
        };
        file_problem(file, key, e.to_string())
    })
}

async fn bind(config: &Config, key: &str, addr: SocketAddr) -> Result<TcpListener, Failure> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| config_problem(config, key, format!("cannot listen on {addr}: {e}")))
}

// === run ===

async fn run(path: &Path) -> Result<(), Failure> {
    let config = Config::load(path)?;
    let metrics = match admin::install_metrics_recorder() {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error = %e, "metrics recorder not installed");
            None
        }
    };
    if let Some(handle) = metrics.clone() {
        // The exporter keeps histogram samples until upkeep drains them;
        // without a scraper that is a leak, so drain on a timer.
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        });
    }
    let mut unwritable = token_dirs_not_writable(&config);
    unwritable.extend(sink_dirs_not_writable(&config));
    if !unwritable.is_empty() {
        return Err(Failure::Config(ConfigError {
            file: config.path.display().to_string(),
            problems: unwritable,
        }));
    }
    // Thread per core: each address gets one `SO_REUSEPORT` listener per
    // core, bound here so that a taken port is a config problem as usual.
    let cores = match config.runtime {
        RuntimeShape::WorkStealing => None,
        RuntimeShape::ThreadPerCore => Some(per_core::cores()),
    };
    check_open_file_limit(&config);
    let mut listeners = Vec::new();
    let mut core_listeners = Vec::new();
    for (key, addr, routes) in route_listeners(&config) {
        match cores {
            None => listeners.push((bind(&config, &key, addr).await?, routes)),
            Some(n) => {
                let shared = per_core::bind_shared(addr, n).map_err(|e| {
                    config_problem(&config, &key, format!("cannot listen on {addr}: {e}"))
                })?;
                core_listeners.push((shared, routes));
            }
        }
    }
    let admin_listener = bind(&config, "admin.listen", config.admin.listen).await?;
    let emulator = start_embedded_emulator(
        &config.path,
        config.emulator.as_ref(),
        &config.sources,
        WhenTaken::Fail,
    )
    .await?;
    let oidc = oidc_client(&config.path, &config.oidc, needs_sigv4(&config))?;
    let sources = TokenSources::build(&config, &oidc)?;
    sources.spawn_credential_reloader();
    sources.spawn_login_followers();
    let mut proxies = Vec::new();
    for (listener, routes) in listeners {
        let proxy = Proxy::with_routes(&config.proxy, proxy_routes(&routes, &sources))
            .map_err(|e| proxy_problem(&config, e))?;
        log_routes(&routes);
        proxies.push((proxy, listener));
    }
    // Per core: its own proxies (and so its own upstream pools); the
    // connection caps hold over all the cores of a listener together.
    let mut per_core_servers: Vec<Vec<(Proxy, std::net::TcpListener)>> = Vec::new();
    if let Some(n) = cores
        && !core_listeners.is_empty()
    {
        per_core_servers.resize_with(n, Vec::new);
        for (shared, routes) in core_listeners {
            let limits = SharedLimits::new(&config.proxy);
            for (core, listener) in shared.into_iter().enumerate() {
                let proxy = Proxy::with_shared_limits(
                    &config.proxy,
                    proxy_routes(&routes, &sources),
                    &limits,
                )
                .map_err(|e| proxy_problem(&config, e))?;
                per_core_servers[core].push((proxy, listener));
            }
            log_routes(&routes);
        }
    }

    let sinks = start_sinks(&config, &sources)?;
    // Every source a route or a sink uses is kept fresh from now on: the
    // first tokens are fetched now (readiness waits for them, start does
    // not), and an idle pod refreshes inside the refresh window, so it
    // stays ready and no request waits for CreateToken.
    let keepers = sources.keep_fresh(
        config
            .routes
            .iter()
            .map(|r| r.token_source.as_str())
            .chain(config.sinks.iter().map(|s| s.source.as_str())),
    );

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let users = admin::SourceUsers {
        routes: config
            .routes
            .iter()
            .map(|r| (r.name.clone(), r.token_source.clone()))
            .collect(),
        sinks: config.sinks.iter().map(|s| s.source.clone()).collect(),
    };
    let admin_app = admin::router(
        sources.clone(),
        users,
        sinks.iter().map(Sink::probe).collect(),
        metrics,
    );
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        admin_app,
        config.proxy.header_read_timeout,
        shutdown_rx.clone(),
    ));

    let listener_count = proxies.len() + per_core_servers.first().map_or(0, Vec::len);
    if listener_count == 0 {
        tracing::info!(
            admin = %config.admin.listen,
            sinks = sinks.len(),
            "sso-token-proxy running as a token-only sidecar (no routes)"
        );
    } else {
        tracing::info!(
            proxy = %config.proxy.listen,
            admin = %config.admin.listen,
            listeners = listener_count,
            runtimes = per_core_servers.len().max(1),
            "sso-token-proxy listening"
        );
    }
    {
        let tx = shutdown_tx.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutting down: no new connections, draining in-flight requests");
            let _ = tx.send(true);
        });
    }
    let mut servers = tokio::task::JoinSet::new();
    for (proxy, listener) in proxies {
        let mut stop = shutdown_rx.clone();
        servers.spawn(proxy.serve(listener, async move {
            let _ = stop.wait_for(|stop| *stop).await;
        }));
    }
    let cpus = per_core::cpus_for(config.cpu_affinity, per_core_servers.len());
    if let Some(cpus) = &cpus {
        tracing::info!(
            ?cpus,
            "each core's runtime bound to its CPU (cpu_affinity = \"auto\")"
        );
    }
    for (core, core_servers) in per_core_servers.into_iter().enumerate() {
        let cpu = cpus.as_ref().map(|cpus| cpus[core]);
        let done = per_core::spawn(core, cpu, core_servers, shutdown_rx.clone())
            .map_err(|e| Failure::Other(format!("cannot start the thread of core {core}: {e}")))?;
        servers.spawn(async move {
            done.await
                .unwrap_or_else(|_| Err("a core's runtime stopped".to_owned()))
                .map_err(std::io::Error::other)
        });
    }
    if servers.is_empty() {
        let mut stop = shutdown_rx.clone();
        let _ = stop.wait_for(|stop| *stop).await;
    }
    let mut failure = None;
    while let Some(done) = servers.join_next().await {
        let error = match done {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => format!("proxy server failed: {e}"),
            Err(e) => format!("proxy server task failed: {e}"),
        };
        // One listener down takes the others with it.
        let _ = shutdown_tx.send(true);
        failure.get_or_insert(error);
    }
    for keeper in keepers {
        keeper.abort();
    }
    for sink in sinks {
        sink.shutdown().await;
    }
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), admin_task).await;
    if let Some(emulator) = emulator {
        emulator.shutdown().await;
    }
    if let Some(message) = failure {
        return Err(Failure::Other(message));
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

// === token ===

fn token_json(token: &Token) -> serde_json::Value {
    serde_json::json!({
        "accessToken": token.access_token().expose(),
        "tokenType": "Bearer",
        "expiresIn": token.ttl().as_secs(),
        "expiresAt": humantime::format_rfc3339_seconds(token.expires_at_wall()).to_string(),
    })
}

async fn token(path: &Path, fresh: bool, count: Option<u32>) -> Result<(), Failure> {
    let config = Config::load(path)?;
    let emulator = start_embedded_emulator(
        &config.path,
        config.emulator.as_ref(),
        &config.sources,
        WhenTaken::UseRunning,
    )
    .await?;
    let oidc = oidc_client(&config.path, &config.oidc, needs_sigv4(&config))?;
    let sources = TokenSources::build(&config, &oidc)?;
    let source = sources.default_cache().source();
    let fail = |e: TokenError| Failure::Other(format!("no token ({}): {e}", e.kind_name()));
    if fresh {
        eprintln!(
            "token --fresh: calling CreateToken. If the service rotates the refresh token, \
             a proxy running with the same state or cache file keeps the old one and its next \
             refresh can fail; without --fresh the stored token is printed while it is valid."
        );
    }
    match count {
        None if !fresh => {
            let min = config.token.refresh_before_expiry + config.token.expiry_margin;
            let token = source.fetch(Reuse::IfValidFor(min)).await.map_err(fail)?;
            println!("{}", token_json(&token));
        }
        _ => {
            for _ in 0..count.unwrap_or(1) {
                let token = source.fetch(Reuse::Never).await.map_err(fail)?;
                println!("{}", token_json(&token));
            }
        }
    }
    if let Some(e) = emulator {
        e.shutdown().await;
    }
    Ok(())
}

// === login ===

async fn login(path: &Path) -> Result<(), Failure> {
    let config = LoginConfig::load(path)?;
    let problem = |key: &str, reason: &str| file_problem(&config.path, key, reason);
    let start_url = config.token.start_url.clone().ok_or_else(|| {
        problem(
            "token.start_url",
            "missing: login needs the AWS access portal URL",
        )
    })?;
    let region = config.oidc.region.clone().ok_or_else(|| {
        problem(
            "oidc.region",
            "missing: login writes the region into the cache file",
        )
    })?;
    let cache_file = config.token.sso_cache_file.clone().ok_or_else(|| {
        problem(
            "token.sso_cache_file",
            "missing: set it, or set HOME for the default ~/.aws/sso/cache/<sha1>.json",
        )
    })?;
    let emulator = start_embedded_emulator(
        &config.path,
        config.emulator.as_ref(),
        &[default_source_config(&config.oidc, &config.token)],
        WhenTaken::UseRunning,
    )
    .await?;
    let oidc = oidc_client(&config.path, &config.oidc, false)?;
    let mut options = LoginOptions::new(start_url, region, cache_file.clone());
    options.scopes = config.token.scopes.clone();
    options.retry = config.retry.clone();
    let (_, token) = device_login(&oidc, &options, |prompt| {
        eprintln!("To sign in, open this URL in a browser:");
        eprintln!(
            "  {}",
            prompt
                .verification_uri_complete
                .as_deref()
                .unwrap_or(&prompt.verification_uri)
        );
        eprintln!("and confirm the code: {}", prompt.user_code);
        eprintln!("(the code expires in {} s)", prompt.expires_in.as_secs());
        if let Some(command) = emulator_approve_command(prompt) {
            eprintln!("This is the SSO-OIDC emulator; to approve without a browser, run:");
            eprintln!("  {command}");
        }
    })
    .await
    .map_err(|e| Failure::Other(e.to_string()))?;
    eprintln!(
        "Logged in; token valid for {} s, written to {}",
        token.ttl().as_secs(),
        cache_file.display()
    );
    if let Some(e) = emulator {
        e.shutdown().await;
    }
    Ok(())
}

/// The emulator's approval call for this prompt, as a curl command; `None`
/// when the verification page is not the emulator's. The user code and URL
/// are checked to be shell-safe, since the line is meant to be pasted.
fn emulator_approve_command(prompt: &DevicePrompt) -> Option<String> {
    let page = prompt
        .verification_uri
        .strip_suffix('/')
        .unwrap_or(&prompt.verification_uri);
    let base = page.strip_suffix("/_emulator/device")?;
    let uri: http::Uri = base.parse().ok()?;
    let shell_safe = |s: &str| {
        s.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':' | '/' | '[' | ']' | '_')
        })
    };
    let code = &prompt.user_code;
    if !matches!(uri.scheme_str(), Some("http" | "https"))
        || !shell_safe(base)
        || code.is_empty()
        || !code.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return None;
    }
    Some(format!(
        "curl -fsS -X POST -H 'content-type: application/json' -d '{{\"user_code\":\"{code}\"}}' {base}/_emulator/device/approve"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(verification_uri: &str, user_code: &str) -> DevicePrompt {
        DevicePrompt {
            verification_uri: verification_uri.to_owned(),
            verification_uri_complete: None,
            user_code: user_code.to_owned(),
            expires_in: Duration::from_secs(600),
        }
    }

    #[test]
    fn approve_command_only_for_the_emulator_and_only_shell_safe() {
        assert_eq!(
            emulator_approve_command(&prompt(
                "http://127.0.0.1:8999/_emulator/device",
                "ABCD-EFGH"
            ))
            .as_deref(),
            Some(
                "curl -fsS -X POST -H 'content-type: application/json' -d '{\"user_code\":\"ABCD-EFGH\"}' http://127.0.0.1:8999/_emulator/device/approve"
            )
        );
        // The real service's page.
        assert!(
            emulator_approve_command(&prompt(
                "https://device.sso.us-east-1.amazonaws.com/",
                "ABCD-EFGH"
            ))
            .is_none()
        );
        // Anything a shell would interpret is never printed as a command.
        assert!(
            emulator_approve_command(&prompt("http://127.0.0.1:8999/_emulator/device", "AB'$(x)"))
                .is_none()
        );
        assert!(
            emulator_approve_command(&prompt("http://a;b/_emulator/device", "ABCD-EFGH")).is_none()
        );
    }

    #[test]
    fn hint_only_for_a_missing_file() {
        let missing = ConfigError {
            file: "config.toml".to_owned(),
            problems: vec![(
                "(file)".to_owned(),
                "cannot read: No such file or directory (os error 2)".to_owned(),
            )],
        };
        let hint = config_hint(&missing, false).unwrap();
        assert!(
            hint.contains("--config FILE") && hint.contains("--help"),
            "{hint}"
        );
        assert!(config_hint(&missing, true).unwrap().contains("--config"));
        let bad_key = ConfigError {
            file: "config.toml".to_owned(),
            problems: vec![("proxy.listen".to_owned(), "missing required key".to_owned())],
        };
        assert!(config_hint(&bad_key, false).is_none());
    }
}
