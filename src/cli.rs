//! The command line: `run` (default), `check-config`, `token`, `login`,
//! `emulator`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum, parser::ValueSource};
use tokio::net::TcpListener;

use crate::{
    admin,
    cache::{CacheOptions, TokenCache},
    config::{
        Config, ConfigError, EmulatorSection, LoginConfig, OidcConfig, SourceKind, StoreKind,
        TokenConfig,
    },
    emulator::{Emulator, EmulatorConfig, EmulatorHandle, SeedClient},
    oidc::OidcClient,
    proxy::Proxy,
    retry::OidcRetryPolicy,
    store::{RedisConnectOptions, RedisStore, SharedStoreOptions, SharedStoreSource},
    tls,
    token::{
        CredentialUpdate, DevicePrompt, LoginOptions, RefreshTokenSource, Reuse, SsoCacheFile,
        SsoCacheSource, StateFile, Token, TokenError, TokenSource, device_login,
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
                problems.push((key.to_owned(), format!("cannot listen on {addr}: {e}")));
            }
        }
    }
    problems.extend(token_dirs_not_writable(&config));
    match config.token.source {
        SourceKind::RefreshToken => {
            if let Some(p) = &config.token.state_file
                && let Err(e) = StateFile::load(p)
            {
                problems.push(("token.state_file".to_owned(), e.to_string()));
            }
        }
        SourceKind::SsoCache => {
            if let Some(p) = &config.token.sso_cache_file
                && let Err(e) = SsoCacheFile::load(p)
            {
                problems.push(("token.sso_cache_file".to_owned(), e.to_string()));
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
    let files = match config.token.source {
        SourceKind::RefreshToken => [("token.state_file", config.token.state_file.as_ref())],
        SourceKind::SsoCache => [("token.sso_cache_file", config.token.sso_cache_file.as_ref())],
    };
    files
        .into_iter()
        .filter_map(|(key, path)| {
            // A missing directory is created at start: then its nearest
            // existing parent must take files.
            let dir = crate::fs_atomic::parent_dir(path?)
                .ancestors()
                .find(|d| d.as_os_str().is_empty() || d.exists())
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            crate::fs_atomic::check_dir_writable(dir).err().map(|e| {
                (
                    key.to_owned(),
                    format!(
                        "cannot create files in {}: {e}; the rotated refresh token could not be saved there",
                        dir.display()
                    ),
                )
            })
        })
        .collect()
}

fn listen_addrs(config: &Config) -> Vec<(&'static str, SocketAddr)> {
    let mut out = vec![
        ("proxy.listen", config.proxy.listen),
        ("admin.listen", config.admin.listen),
    ];
    if let Some(e) = &config.emulator {
        out.push(("emulator.listen", e.listen));
    }
    out
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

/// Starts the `[emulator]` of the quick start, seeded with the configured
/// client and refresh token (and the state file's, so a restart works).
async fn start_embedded_emulator(
    file: &Path,
    section: Option<&EmulatorSection>,
    oidc: &OidcConfig,
    token: &TokenConfig,
    when_taken: WhenTaken,
) -> Result<Option<EmulatorHandle>, Failure> {
    let Some(section) = section else {
        return Ok(None);
    };
    let mut refresh_tokens = Vec::new();
    if let Some(rt) = &token.refresh_token {
        refresh_tokens.push(rt.value.clone());
    }
    if let Some(p) = &token.state_file
        && let Ok(Some(state)) = StateFile::load(p)
        && let Some(rt) = state.refresh_token
    {
        refresh_tokens.push(rt);
    }
    let clients = match (&oidc.client_id, &oidc.client_secret) {
        (Some(id), Some(secret)) => vec![SeedClient {
            client_id: id.clone(),
            client_secret: secret.value.clone(),
            refresh_tokens,
            scopes: token.scopes.clone(),
        }],
        _ => Vec::new(),
    };
    let started = Emulator::start(EmulatorConfig {
        listen: section.listen,
        access_token_lifetime: section.access_token_lifetime,
        rotate_refresh_tokens: section.rotate_refresh_tokens,
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
    Ok(Some(handle))
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

fn oidc_client(file: &Path, oidc: &OidcConfig) -> Result<OidcClient, Failure> {
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
    builder.build().map_err(|e| {
        let key = if oidc.endpoint.is_some() {
            "oidc.endpoint"
        } else {
            "oidc.region"
        };
        file_problem(file, key, e.to_string())
    })
}

fn retry_policy(config: &Config) -> OidcRetryPolicy {
    OidcRetryPolicy::new(config.retry.clone())
}

/// Builds the configured token source. Unusable state or cache files are
/// config errors naming the key.
fn token_source(config: &Config, oidc: OidcClient) -> Result<Arc<dyn TokenSource>, Failure> {
    let policy = retry_policy(config);
    match config.token.source {
        SourceKind::RefreshToken => {
            let (Some(client_id), Some(secret), Some(refresh)) = (
                config.oidc.client_id.clone(),
                config.oidc.client_secret.clone(),
                config.token.refresh_token.clone(),
            ) else {
                return Err(config_problem(
                    config,
                    "token.source",
                    "refresh_token source needs oidc.client_id, oidc.client_secret and token.refresh_token",
                ));
            };
            let mut builder = RefreshTokenSource::builder(
                oidc,
                client_id.clone(),
                secret.value,
                refresh.value.clone(),
            )
            .retry_policy(policy)
            .scopes(config.token.scopes.clone());
            let configured_at = refresh.modified.or_else(|| {
                std::fs::metadata(&config.path)
                    .and_then(|m| m.modified())
                    .ok()
            });
            if let Some(at) = configured_at {
                builder = builder.configured_at(at);
            }
            if let Some(p) = &config.token.state_file {
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty())
                    && !dir.is_dir()
                {
                    crate::fs_atomic::create_private_dir_all(dir).map_err(|e| {
                        config_problem(
                            config,
                            "token.state_file",
                            format!("cannot create directory {}: {e}", dir.display()),
                        )
                    })?;
                    tracing::info!(dir = %dir.display(), "created the state file's directory (mode 0700)");
                }
                builder = builder.state_file(p.clone());
            }
            let source = builder
                .build()
                .map_err(|e| config_problem(config, "token.state_file", e.to_string()))?;
            match config.store.kind {
                StoreKind::Local => Ok(Arc::new(source)),
                StoreKind::Redis => shared_store_source(config, source, client_id, refresh.value),
            }
        }
        SourceKind::SsoCache => {
            let path = config.token.sso_cache_file.clone().ok_or_else(|| {
                config_problem(config, "token.sso_cache_file", "missing required key")
            })?;
            let source = SsoCacheSource::new(path, oidc, policy, config.token.scopes.clone())
                .map_err(|e| config_problem(config, "token.sso_cache_file", e.to_string()))?;
            Ok(Arc::new(source))
        }
    }
}

/// Wraps the refresh-token source so that replicas share its tokens through
/// Redis (`[store] kind = "redis"`).
fn shared_store_source(
    config: &Config,
    source: RefreshTokenSource,
    client_id: String,
    configured_refresh_token: crate::secret::Secret,
) -> Result<Arc<dyn TokenSource>, Failure> {
    let store = &config.store;
    let url = store
        .url
        .clone()
        .ok_or_else(|| config_problem(config, "store.url", "missing required key"))?;
    let redis = RedisStore::connect(&RedisConnectOptions {
        url,
        username: store.username.clone(),
        password: store.password.as_ref().map(|p| p.value.clone()),
        ca_file: store.ca_file.clone(),
        command_timeout: store.command_timeout,
    })
    .map_err(|e| config_problem(config, "store.url", e.to_string()))?;
    tracing::info!(redis = %redis.endpoint(), key_prefix = %store.key_prefix, "sharing tokens through Redis");
    let options = SharedStoreOptions {
        key_prefix: store.key_prefix.clone(),
        lock_lease: store.lock_lease,
        wait_timeout: store.wait_timeout,
        refresh_without_store: store.refresh_without_store,
        expiry_margin: config.token.expiry_margin,
        ..Default::default()
    };
    Ok(Arc::new(SharedStoreSource::new(
        source,
        redis,
        client_id,
        configured_refresh_token,
        options,
    )))
}

fn cache_options(config: &Config) -> CacheOptions {
    CacheOptions {
        refresh_before_expiry: config.token.refresh_before_expiry,
        expiry_margin: config.token.expiry_margin,
        ..Default::default()
    }
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
    let unwritable = token_dirs_not_writable(&config);
    if !unwritable.is_empty() {
        return Err(Failure::Config(ConfigError {
            file: config.path.display().to_string(),
            problems: unwritable,
        }));
    }
    let proxy_listener = bind(&config, "proxy.listen", config.proxy.listen).await?;
    let admin_listener = bind(&config, "admin.listen", config.admin.listen).await?;
    let emulator = start_embedded_emulator(
        &config.path,
        config.emulator.as_ref(),
        &config.oidc,
        &config.token,
        WhenTaken::Fail,
    )
    .await?;
    let oidc = oidc_client(&config.path, &config.oidc)?;
    let source = token_source(&config, oidc)?;
    let cache = TokenCache::from_arc(source.clone(), cache_options(&config));
    spawn_credential_reloader(&config, source, cache.clone());
    let proxy = Proxy::new(&config.proxy, cache.clone())
        .map_err(|e| config_problem(&config, e.config_key(), e.to_string()))?;

    // The first token is fetched now; readiness waits for it, start does not.
    let warm = cache.clone();
    tokio::spawn(async move {
        if let Err(e) = warm.get().await {
            tracing::error!(kind = e.kind(), error = %e, "could not get the first token; will retry on demand");
        }
    });

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let admin_app = admin::router(cache.clone(), metrics);
    let mut admin_shutdown = shutdown_rx.clone();
    let admin_task = tokio::spawn(async move {
        let _ = axum::serve(admin_listener, admin_app)
            .with_graceful_shutdown(async move {
                let _ = admin_shutdown.wait_for(|stop| *stop).await;
            })
            .await;
    });

    tracing::info!(
        proxy = %config.proxy.listen,
        admin = %config.admin.listen,
        upstream = %config.proxy.upstream,
        "sso-token-proxy listening"
    );
    let proxy_shutdown = {
        let tx = shutdown_tx.clone();
        async move {
            shutdown_signal().await;
            tracing::info!("shutting down: no new connections, draining in-flight requests");
            let _ = tx.send(true);
        }
    };
    proxy
        .serve(proxy_listener, proxy_shutdown)
        .await
        .map_err(|e| Failure::Other(format!("proxy server failed: {e}")))?;
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), admin_task).await;
    if let Some(emulator) = emulator {
        emulator.shutdown().await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Re-reads the secret files on SIGHUP, and when their modification time
/// changes (a Kubernetes Secret update swaps the file), without dropping
/// connections or the current token.
///
/// SIGHUP is always handled, so that it never terminates the proxy (its
/// default action): with inline secrets there is nothing to reload, and
/// that is logged. The handler is installed before this returns, so a
/// signal sent once the proxy has started is never fatal.
fn spawn_credential_reloader(config: &Config, source: Arc<dyn TokenSource>, cache: TokenCache) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; secret files are still watched");
            None
        }
    };
    let client_secret_file = config
        .oidc
        .client_secret
        .as_ref()
        .and_then(|s| s.file.clone());
    let refresh_token_file = config
        .token
        .refresh_token
        .as_ref()
        .and_then(|s| s.file.clone());
    if client_secret_file.is_none() && refresh_token_file.is_none() {
        if let Some(mut hup) = hup {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!(
                        "SIGHUP: nothing to reload (no *_file secrets are configured); still serving"
                    );
                }
            });
        }
        return;
    }
    let mtime = |p: &Option<PathBuf>| {
        p.as_ref()
            .and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen = (mtime(&client_secret_file), mtime(&refresh_token_file));
        loop {
            let reason = tokio::select! {
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => "SIGHUP",
                _ = tick.tick() => {
                    let now = (mtime(&client_secret_file), mtime(&refresh_token_file));
                    if now == seen {
                        continue;
                    }
                    "secret file changed"
                }
            };
            seen = (mtime(&client_secret_file), mtime(&refresh_token_file));
            let read = |p: &Option<PathBuf>, key: &str| {
                p.as_ref()
                    .and_then(|p| match crate::config::read_secret_file(p) {
                        Ok((value, _)) => Some(value),
                        Err(reason) => {
                            tracing::warn!(key, %reason, "keeping the current credential");
                            None
                        }
                    })
            };
            let update = CredentialUpdate {
                client_secret: read(&client_secret_file, "oidc.client_secret_file"),
                refresh_token: read(&refresh_token_file, "token.refresh_token_file"),
            };
            if source.reload(update).await {
                cache.clear_failure();
                tracing::info!(reason, "credentials reloaded");
            } else {
                tracing::debug!(reason, "credentials unchanged");
            }
        }
    });
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
        &config.oidc,
        &config.token,
        WhenTaken::UseRunning,
    )
    .await?;
    let oidc = oidc_client(&config.path, &config.oidc)?;
    let source = token_source(&config, oidc)?;
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
        &config.oidc,
        &config.token,
        WhenTaken::UseRunning,
    )
    .await?;
    let oidc = oidc_client(&config.path, &config.oidc)?;
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
