//! The named token sources of a config: one [`TokenCache`] per name
//! (`"default"` for `[token]`, `NAME` for each `[sources.NAME]`), the name
//! being the `source` label of the cache's metrics. Routes and sinks that
//! name the same source share its cache, so one `CreateToken` serves them
//! all per refresh window.
//!
//! Sources of kind `refresh_token` that redeem the same client and refresh
//! token (typically a `[sources.NAME]` that only changes `[token]`'s
//! `scopes`) share one holder of the newest refresh token
//! ([`RefreshTokenSource::with_scopes`]): they take turns calling
//! `CreateToken`, so one source's rotation never revokes the other's
//! refresh token, and the state file keeps that token once.
//!
//! Each kind is built by one function ([`build_source`] dispatches on
//! [`SourceKind`]); a new kind adds an arm there. A `jwt_bearer` source
//! exchanges with `CreateTokenWithIAM` through the shared client, which the
//! CLI then builds with a SigV4 signer.

use std::{path::PathBuf, sync::Arc, time::Duration};

use http::HeaderName;

use crate::{
    cache::{CacheOptions, CallerTokens, TokenCache},
    config::{
        Config, ConfigError, ExchangeConfig, SecretSetting, SourceConfig, SourceKind, StoreKind,
        shares_refresh_token,
    },
    login::{DeviceLogin, DeviceLoginSource, LoginSettings},
    oidc::OidcClient,
    retry::OidcRetryPolicy,
    secret::Secret,
    store::{RedisConnectOptions, RedisStore, SharedStoreOptions, SharedStoreSource},
    token::{CredentialUpdate, RefreshTokenSource, SsoCacheSource, TokenSource},
};

/// One named source and its cache.
#[derive(Clone)]
pub(crate) struct NamedSource {
    /// The source's name.
    pub(crate) name: String,
    /// Its cache (clones share it).
    pub(crate) cache: TokenCache,
    /// Its device login, with `device_login = true`.
    pub(crate) login: Option<DeviceLogin>,
    /// The source the cache fetches from.
    source: Arc<dyn TokenSource>,
    /// Secret files re-read on SIGHUP or when they change.
    client_secret_file: Option<PathBuf>,
    refresh_token_file: Option<PathBuf>,
    /// Where the keys of those files are written (for log lines).
    client_secret_key: String,
    refresh_token_key: String,
}

/// Every configured source, `"default"` first, then the others in name
/// order. Cheap to clone.
#[derive(Clone)]
pub(crate) struct TokenSources {
    sources: Arc<[NamedSource]>,
    /// The `source = "exchange"` sources: name, cache of callers' tokens,
    /// inbound header.
    exchanges: Arc<[(String, CallerTokens, HeaderName)]>,
}

impl std::fmt::Debug for TokenSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.sources.iter().map(|s| &s.cache))
            .finish()
    }
}

impl TokenSources {
    /// Builds every source of `config` with `oidc` (one client for all:
    /// one Identity Center per proxy). Unusable state or cache files are
    /// config errors naming the key.
    pub(crate) fn build(config: &Config, oidc: &OidcClient) -> Result<Self, ConfigError> {
        let mut built: Vec<(NamedSource, Option<RefreshTokenSource>)> = Vec::new();
        for source_config in &config.sources {
            // A source redeeming a refresh token an earlier one redeems
            // shares that one's holder.
            let sibling = config
                .sources
                .iter()
                .zip(&built)
                .find(|(earlier, _)| {
                    earlier.token.source == SourceKind::RefreshToken
                        && source_config.token.source == SourceKind::RefreshToken
                        && shares_refresh_token(earlier, source_config)
                })
                .and_then(|(earlier, (_, refresh))| Some((earlier, refresh.as_ref()?)));
            let (source, refresh, login) = build_source(config, source_config, oidc, sibling)?;
            let cache = TokenCache::from_arc(Arc::clone(&source), cache_options(source_config));
            let file_of =
                |s: &Option<crate::config::SecretSetting>| s.as_ref().and_then(|s| s.file.clone());
            built.push((
                NamedSource {
                    name: source_config.name.clone(),
                    cache,
                    login,
                    source,
                    client_secret_file: file_of(&source_config.client_secret),
                    refresh_token_file: file_of(&source_config.token.refresh_token),
                    client_secret_key: format!(
                        "{}.client_secret_file",
                        source_config.client_section
                    ),
                    refresh_token_key: source_config.key("refresh_token_file"),
                },
                refresh,
            ));
        }
        let mut exchanges = Vec::new();
        for exchange in &config.exchanges {
            exchanges.push((
                exchange.name.clone(),
                caller_tokens(config, exchange, oidc),
                exchange.inbound_header.clone(),
            ));
        }
        Ok(Self {
            sources: built.into_iter().map(|(named, _)| named).collect(),
            exchanges: exchanges.into(),
        })
    }

    /// The per-caller cache and inbound header of the exchange source
    /// named `name`.
    pub(crate) fn exchange(&self, name: &str) -> Option<(&CallerTokens, &HeaderName)> {
        self.exchanges
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, tokens, header)| (tokens, header))
    }

    /// The per-caller caches of the exchange sources.
    pub(crate) fn exchanges(&self) -> impl Iterator<Item = &CallerTokens> {
        self.exchanges.iter().map(|(_, tokens, _)| tokens)
    }

    /// The cache of the source named `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&TokenCache> {
        self.sources
            .iter()
            .find(|s| s.name == name)
            .map(|s| &s.cache)
    }

    /// The `"default"` source's cache (`[token]`).
    pub(crate) fn default_cache(&self) -> &TokenCache {
        &self.sources[0].cache
    }

    /// Every source, `"default"` first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &NamedSource> {
        self.sources.iter()
    }

    /// Keeps each source named in `names` fresh in the background (one
    /// keeper per source, however often it is named): its first token is
    /// fetched now, and it is refreshed inside its refresh window with or
    /// without traffic, so an idle pod stays ready and no request waits for
    /// CreateToken. Abort the returned tasks to stop them.
    pub(crate) fn keep_fresh<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut kept: Vec<&str> = Vec::new();
        let mut keepers = Vec::new();
        for name in names {
            if kept.contains(&name) {
                continue;
            }
            kept.push(name);
            let Some(cache) = self.get(name).cloned() else {
                continue;
            };
            keepers.push(tokio::spawn(async move { cache.keep_fresh().await }));
        }
        keepers
    }

    /// After each device login, fetches the source's token at once (the
    /// failures remembered while the login waited are forgotten), so the
    /// proxy serves as soon as someone approves.
    pub(crate) fn spawn_login_followers(&self) {
        for source in self.sources.iter() {
            let Some(login) = &source.login else {
                continue;
            };
            let mut completions = login.completions();
            let cache = source.cache.clone();
            tokio::spawn(async move {
                while completions.changed().await.is_ok() {
                    cache.clear_failure();
                    if let Err(e) = cache.get().await {
                        tracing::warn!(source = cache.name(), kind = e.kind(), error = %e, "no token after the device login; will retry on demand");
                    }
                }
            });
        }
    }

    /// Re-reads the secret files on SIGHUP, and when their modification
    /// time changes (a Kubernetes Secret update swaps the file), without
    /// dropping connections or the current tokens.
    ///
    /// SIGHUP is always handled, so that it never terminates the proxy (its
    /// default action): with inline secrets there is nothing to reload, and
    /// that is logged. The handler is installed before this returns, so a
    /// signal sent once the proxy has started is never fatal.
    pub(crate) fn spawn_credential_reloader(&self) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; secret files are still watched");
                None
            }
        };
        let watched: Vec<NamedSource> = self
            .sources
            .iter()
            .filter(|s| s.client_secret_file.is_some() || s.refresh_token_file.is_some())
            .cloned()
            .collect();
        if watched.is_empty() {
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
        let all: Vec<TokenCache> = self.sources.iter().map(|s| s.cache.clone()).collect();
        let mtime = |p: &Option<PathBuf>| {
            p.as_ref()
                .and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        };
        let mtimes = move |watched: &[NamedSource]| {
            watched
                .iter()
                .map(|s| (mtime(&s.client_secret_file), mtime(&s.refresh_token_file)))
                .collect::<Vec<_>>()
        };
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seen = mtimes(&watched);
            loop {
                let reason = tokio::select! {
                    Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => "SIGHUP",
                    _ = tick.tick() => {
                        if mtimes(&watched) == seen {
                            continue;
                        }
                        "secret file changed"
                    }
                };
                seen = mtimes(&watched);
                let mut changed = false;
                for s in &watched {
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
                        client_secret: read(&s.client_secret_file, &s.client_secret_key),
                        refresh_token: read(&s.refresh_token_file, &s.refresh_token_key),
                    };
                    if s.source.reload(update).await {
                        tracing::info!(reason, source = %s.name, "credentials reloaded");
                        changed = true;
                    }
                }
                if changed {
                    // Sources that share a credential share the change.
                    for cache in &all {
                        cache.clear_failure();
                    }
                } else {
                    tracing::debug!(reason, "credentials unchanged");
                }
            }
        });
    }
}

/// The cache of an exchange source's callers' tokens, exchanged with
/// `CreateTokenWithIAM` through `oidc` (which signs: see the CLI).
#[cfg(feature = "aws-iam")]
fn caller_tokens(config: &Config, exchange: &ExchangeConfig, oidc: &OidcClient) -> CallerTokens {
    use crate::{
        cache::CallerOptions,
        config::ExchangeGrant,
        token::{CallerGrant, IamCallerExchange, IamExchange},
    };
    let iam = IamExchange::new(oidc.clone(), exchange.application_arn.clone())
        .retry_policy(OidcRetryPolicy::new(config.retry.clone()))
        .scopes(exchange.scopes.clone());
    let grant = match &exchange.grant {
        ExchangeGrant::JwtBearer => CallerGrant::JwtBearer,
        ExchangeGrant::TokenExchange(subject_token_type) => CallerGrant::TokenExchange {
            subject_token_type: subject_token_type.clone(),
        },
    };
    CallerTokens::new(
        IamCallerExchange::new(iam, grant),
        CallerOptions {
            name: exchange.name.clone(),
            max_callers: exchange.max_callers,
            failure_ttl: exchange.caller_failure_ttl,
            max_concurrent_exchanges: exchange.max_concurrent_exchanges,
            refresh_before_expiry: exchange.refresh_before_expiry,
            expiry_margin: exchange.expiry_margin,
        },
    )
}

/// Without AWS IAM support the config refuses exchange sources.
#[cfg(not(feature = "aws-iam"))]
fn caller_tokens(_: &Config, _: &ExchangeConfig, _: &OidcClient) -> CallerTokens {
    unreachable!("the config refuses source = \"exchange\" without the aws-iam feature")
}

fn cache_options(source: &SourceConfig) -> CacheOptions {
    CacheOptions {
        name: source.name.clone(),
        refresh_before_expiry: source.token.refresh_before_expiry,
        expiry_margin: source.token.expiry_margin,
        ..Default::default()
    }
}

fn problem(config: &Config, key: String, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        file: config.path.display().to_string(),
        problems: vec![(key, reason.into())],
    }
}

/// A built source: what its cache fetches from, the refresh-token holder
/// (for later siblings), its device login.
type Built = (
    Arc<dyn TokenSource>,
    Option<RefreshTokenSource>,
    Option<DeviceLogin>,
);

/// Builds one source. `sibling` is an earlier `refresh_token` source that
/// redeems the same refresh token; the new one then shares its holder.
/// Returns the refresh-token source too, for later siblings.
fn build_source(
    config: &Config,
    source: &SourceConfig,
    oidc: &OidcClient,
    sibling: Option<(&SourceConfig, &RefreshTokenSource)>,
) -> Result<Built, ConfigError> {
    let policy = OidcRetryPolicy::new(config.retry.clone());
    match source.token.source {
        SourceKind::RefreshToken => {
            let refresh = match sibling {
                Some((_, earlier)) => earlier.with_scopes(source.token.scopes.clone()),
                None => refresh_token_source(config, source, oidc.clone(), policy)?,
            };
            let (shared, fleet): (Arc<dyn TokenSource>, _) = match config.store.kind {
                StoreKind::Local => (
                    Arc::new(refresh.with_scopes(source.token.scopes.clone())),
                    None,
                ),
                StoreKind::Redis => {
                    let first = sibling.map_or(source, |(earlier, _)| earlier);
                    let shared = shared_store_source(config, first, source, &refresh)?;
                    (Arc::new(shared.clone()), Some(shared))
                }
            };
            if !source.token.device_login {
                return Ok((shared, Some(refresh), None));
            }
            let login = DeviceLogin::new(
                LoginSettings {
                    source: source.name.clone(),
                    start_url: source.token.start_url.clone().unwrap_or_default(),
                    scopes: source.token.scopes.clone(),
                    client_name: format!("sso-token-proxy-{}", source.name),
                    default_interval: Duration::from_secs(5),
                    slow_down_increment: Duration::from_secs(5),
                    retry: config.retry.clone(),
                    restart_pause: Duration::from_secs(5),
                    lock_lease: config.store.lock_lease,
                },
                oidc.clone(),
                refresh.with_scopes(source.token.scopes.clone()),
                fleet,
            );
            let wrapped: Arc<dyn TokenSource> =
                Arc::new(DeviceLoginSource::new(shared, login.clone()));
            Ok((wrapped, Some(refresh), Some(login)))
        }
        SourceKind::SsoCache => {
            let path = source.token.sso_cache_file.clone().ok_or_else(|| {
                problem(config, source.key("sso_cache_file"), "missing required key")
            })?;
            let built =
                SsoCacheSource::new(path, oidc.clone(), policy, source.token.scopes.clone())
                    .map_err(|e| problem(config, source.key("sso_cache_file"), e.to_string()))?;
            Ok((Arc::new(built), None, None))
        }
        SourceKind::JwtBearer => Ok((jwt_bearer_source(config, source, oidc, policy)?, None, None)),
    }
}

/// The pod's token from its assertion file (`source = "jwt_bearer"`).
/// `oidc` signs `CreateTokenWithIAM` (the CLI gives it a SigV4 signer when
/// a source needs one).
#[cfg(feature = "aws-iam")]
fn jwt_bearer_source(
    config: &Config,
    source: &SourceConfig,
    oidc: &OidcClient,
    policy: OidcRetryPolicy,
) -> Result<Arc<dyn TokenSource>, ConfigError> {
    use crate::token::{IamExchange, JwtBearerSource};
    let (Some(application_arn), Some(file)) = (
        source.client_id.clone(),
        source.token.assertion_file.clone(),
    ) else {
        return Err(problem(
            config,
            source.key("source"),
            "jwt_bearer source needs a client_id (the application ARN) and an assertion_file",
        ));
    };
    let exchange = IamExchange::new(oidc.clone(), application_arn)
        .retry_policy(policy)
        .scopes(source.token.scopes.clone());
    Ok(Arc::new(JwtBearerSource::new(exchange, file)))
}

#[cfg(not(feature = "aws-iam"))]
fn jwt_bearer_source(
    config: &Config,
    source: &SourceConfig,
    _oidc: &OidcClient,
    _policy: OidcRetryPolicy,
) -> Result<Arc<dyn TokenSource>, ConfigError> {
    Err(problem(
        config,
        source.key("source"),
        "\"jwt_bearer\" needs AWS IAM support, which this build leaves out (Cargo feature `aws-iam`)",
    ))
}

/// A `refresh_token` source with its state file (the directory is made,
/// mode 0700, when missing). The state file of any source sharing the
/// refresh token serves them all.
fn refresh_token_source(
    config: &Config,
    source: &SourceConfig,
    oidc: OidcClient,
    policy: OidcRetryPolicy,
) -> Result<RefreshTokenSource, ConfigError> {
    // A device login may start with neither client nor refresh token.
    let login = source.token.device_login;
    let (Some(client_id), Some(secret), Some(refresh)) = (
        source.client_id.clone().or_else(|| login.then(String::new)),
        source
            .client_secret
            .as_ref()
            .map(|s| s.value.clone())
            .or_else(|| login.then(|| Secret::new(""))),
        source.token.refresh_token.clone().or_else(|| {
            login.then(|| SecretSetting {
                value: Secret::new(""),
                file: None,
                modified: None,
            })
        }),
    ) else {
        return Err(problem(
            config,
            source.key("source"),
            "refresh_token source needs a client_id, a client_secret and a refresh_token",
        ));
    };
    let mut builder = RefreshTokenSource::builder(oidc, client_id, secret, refresh.value)
        .retry_policy(policy)
        .scopes(source.token.scopes.clone());
    if login {
        builder = builder.awaiting_login(source.token.start_url.as_deref().unwrap_or_default());
    }
    let configured_at = refresh.modified.or_else(|| {
        std::fs::metadata(&config.path)
            .and_then(|m| m.modified())
            .ok()
    });
    if let Some(at) = configured_at {
        builder = builder.configured_at(at);
    }
    let state_file = config
        .sources
        .iter()
        .filter(|other| {
            other.name == source.name
                || (other.token.source == SourceKind::RefreshToken
                    && shares_refresh_token(other, source))
        })
        .find_map(|other| Some((other, other.token.state_file.as_ref()?)));
    if let Some((owner, p)) = state_file {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.is_dir()
        {
            crate::fs_atomic::create_private_dir_all(dir).map_err(|e| {
                problem(
                    config,
                    owner.key("state_file"),
                    format!("cannot create directory {}: {e}", dir.display()),
                )
            })?;
            tracing::info!(dir = %dir.display(), "created the state file's directory (mode 0700)");
        }
        builder = builder.state_file(p.clone());
    }
    builder.build().map_err(|e| {
        let key = state_file.map_or_else(|| source.key("state_file"), |(o, _)| o.key("state_file"));
        problem(config, key, e.to_string())
    })
}

/// Wraps a refresh-token source so that replicas share its tokens through
/// Redis (`[store] kind = "redis"`). The keys of the credential `first`
/// (the first source that redeems it) are `key_prefix` for `"default"`,
/// `key_prefix` + `NAME:` for the others.
fn shared_store_source(
    config: &Config,
    first: &SourceConfig,
    source: &SourceConfig,
    refresh: &RefreshTokenSource,
) -> Result<SharedStoreSource, ConfigError> {
    let store = &config.store;
    let url = store
        .url
        .clone()
        .ok_or_else(|| problem(config, "store.url".to_owned(), "missing required key"))?;
    let redis = RedisStore::connect(&RedisConnectOptions {
        url,
        username: store.username.clone(),
        password: store.password.as_ref().map(|p| p.value.clone()),
        ca_file: store.ca_file.clone(),
        command_timeout: store.command_timeout,
    })
    .map_err(|e| problem(config, "store.url".to_owned(), e.to_string()))?;
    let key_prefix = if first.name == crate::config::DEFAULT_SOURCE {
        store.key_prefix.clone()
    } else {
        format!("{}{}:", store.key_prefix, first.name)
    };
    tracing::info!(redis = %redis.endpoint(), %key_prefix, source = %source.name, "sharing tokens through Redis");
    let options = SharedStoreOptions {
        key_prefix,
        lock_lease: store.lock_lease,
        wait_timeout: store.wait_timeout,
        refresh_without_store: store.refresh_without_store,
        expiry_margin: source.token.expiry_margin,
        ..Default::default()
    };
    let login = source.token.device_login;
    let (Some(client_id), Some(configured)) = (
        source.client_id.clone().or_else(|| login.then(String::new)),
        source
            .token
            .refresh_token
            .as_ref()
            .map(|r| r.value.clone())
            .or_else(|| login.then(|| Secret::new(""))),
    ) else {
        return Err(problem(
            config,
            source.key("source"),
            "refresh_token source needs a client_id and a refresh_token",
        ));
    };
    Ok(SharedStoreSource::new(
        refresh.with_scopes(source.token.scopes.clone()),
        redis,
        client_id,
        configured,
        options,
    ))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        emulator::{Emulator, EmulatorConfig},
        token::{Reuse, StateFile},
    };

    fn oidc(url: &str) -> OidcClient {
        OidcClient::builder()
            .endpoint(url)
            .call_timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    }

    /// `[token]` with scopes `a` and `[sources.reports]` that only asks for
    /// `b`: the same client and rotating refresh token.
    fn two_scopes_config(
        dir: &Path,
        url: &str,
        client: &(String, crate::secret::Secret),
        rt: &str,
    ) -> Config {
        let text = format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
upstream = "http://127.0.0.1:9"
[admin]
listen = "127.0.0.1:0"
[oidc]
endpoint = "{url}"
client_id = "{}"
client_secret = "{}"
[token]
source = "refresh_token"
refresh_token = "{rt}"
state_file = "state.json"
scopes = ["a"]
[sources.reports]
scopes = ["b"]
"#,
            client.0,
            client.1.expose()
        );
        Config::parse(&text, &dir.join("config.toml")).unwrap()
    }

    /// Two sources over one rotating refresh token with different scopes
    /// take turns: each refresh uses the token the last one left, so none
    /// is ever refused. Two holders of the same token (what the sharing
    /// prevents) revoke each other at the first rotation.
    #[tokio::test]
    async fn sources_sharing_a_refresh_token_never_revoke_each_other() {
        let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
        let client = emulator.register_client("routes");
        let scopes = ["a".to_owned(), "b".to_owned()];
        let rt = emulator.issue_refresh_token(&client.0, &scopes);
        let dir = tempfile::tempdir().unwrap();
        let config = two_scopes_config(dir.path(), &emulator.url(), &client, rt.expose());

        let sources = TokenSources::build(&config, &oidc(&emulator.url())).unwrap();
        let names: Vec<_> = sources.iter().map(|s| s.cache.name().to_owned()).collect();
        assert_eq!(names, ["default", "reports"]);
        let default = sources.get("default").unwrap().source().clone();
        let reports = sources.get("reports").unwrap().source().clone();
        assert_eq!(reports.scopes(), ["b"]);
        for _ in 0..3 {
            // In turn, and at the same time.
            default.fetch(Reuse::Never).await.unwrap();
            reports.fetch(Reuse::Never).await.unwrap();
            let (a, b) = tokio::join!(default.fetch(Reuse::Never), reports.fetch(Reuse::Never));
            assert_ne!(
                a.unwrap().access_token().expose(),
                b.unwrap().access_token().expose()
            );
        }
        let counters = emulator.counters();
        assert_eq!(counters.create_token, 12, "{counters:?}");
        assert_eq!(counters.tokens_issued, 12, "{counters:?}");
        assert!(counters.errors_by_kind.is_empty(), "{counters:?}");
        // The state file holds the newest refresh token, once: a restart
        // from it works.
        let state = StateFile::load(&dir.path().join("state.json"))
            .unwrap()
            .unwrap();
        assert_ne!(state.refresh_token.as_ref(), Some(&rt));
        let restarted = TokenSources::build(&config, &oidc(&emulator.url())).unwrap();
        restarted
            .get("reports")
            .unwrap()
            .source()
            .fetch(Reuse::Never)
            .await
            .unwrap();

        // Control: two holders of one refresh token.
        let rt = emulator.issue_refresh_token(&client.0, &scopes);
        let dir = tempfile::tempdir().unwrap();
        let config = two_scopes_config(dir.path(), &emulator.url(), &client, rt.expose());
        let one = TokenSources::build(&config, &oidc(&emulator.url())).unwrap();
        let two = TokenSources::build(&config, &oidc(&emulator.url())).unwrap();
        one.default_cache()
            .source()
            .fetch(Reuse::Never)
            .await
            .unwrap();
        let refused = two
            .get("reports")
            .unwrap()
            .source()
            .fetch(Reuse::Never)
            .await
            .unwrap_err();
        assert_eq!(refused.kind_name(), "InvalidGrant");
    }
}
