//! Token sinks (`[[sink]]`): a source's current access token written to a
//! file, for apps that cannot send their requests through the proxy and
//! read a token file instead (as they read Kubernetes projected tokens or
//! Vault Agent sinks).
//!
//! A sink subscribes to its source's [`TokenCache`] and rewrites its file
//! atomically (temp file, fsync, rename: a reader sees the old token or the
//! new one, never a torn file) with the configured mode each time a new
//! token is published. The cache's keeper refreshes the token inside its
//! refresh window, so the file always holds a new token before the one it
//! replaces expires. A failed write is retried with backoff until it lands
//! or a newer token replaces it. On shutdown the file is removed, kept, or
//! rewritten as expired.
//!
//! Only access tokens are written: never a refresh token or a client
//! secret. In the AWS SSO cache format that matters twice: whoever reads
//! the file cannot mint tokens, and an AWS SDK that finds no refresh token
//! uses the access token as it is instead of redeeming (and, with
//! rotation, revoking) the proxy's refresh token.

use std::{
    fmt,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::{sync::watch, task::JoinHandle, time::Instant};

use crate::{
    cache::TokenCache,
    fs_atomic, metric_names,
    retry::{Backoff, Jitter},
    token::{Token, format_time},
};

/// Pauses between retries of a failed write.
const RETRY_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(250),
    factor: 2.0,
    cap: Duration::from_secs(5),
    jitter: Jitter::None,
};

/// What a sink file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SinkFormat {
    /// The access token alone, no newline.
    Raw,
    /// `{"accessToken": "...", "expiresAt": "RFC 3339"}`.
    Json,
    /// The AWS SSO cache file format (`~/.aws/sso/cache/<sha1>.json`) the
    /// AWS CLI and SDKs read: `startUrl`, `region`, `accessToken`,
    /// `expiresAt`; no refresh credentials.
    SsoCache {
        /// The access portal URL the token belongs to.
        start_url: String,
        /// The Identity Center region, where known.
        region: Option<String>,
    },
}

impl SinkFormat {
    /// The config word for it.
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Json => "json",
            Self::SsoCache { .. } => "sso_cache",
        }
    }

    /// The file's contents for `access_token`, expiring at `expires_at`.
    fn render(&self, access_token: &str, expires_at: SystemTime) -> Vec<u8> {
        let expires_at = format_time(expires_at);
        match self {
            Self::Raw => access_token.as_bytes().to_vec(),
            Self::Json => serde_json::to_vec(&serde_json::json!({
                "accessToken": access_token,
                "expiresAt": expires_at,
            }))
            .expect("JSON of strings"),
            Self::SsoCache { start_url, region } => {
                let mut file = serde_json::Map::new();
                file.insert("startUrl".into(), start_url.clone().into());
                if let Some(region) = region {
                    file.insert("region".into(), region.clone().into());
                }
                file.insert("accessToken".into(), access_token.into());
                file.insert("expiresAt".into(), expires_at.into());
                serde_json::to_vec_pretty(&file).expect("JSON of strings")
            }
        }
    }

    /// The file for `token`.
    fn render_token(&self, token: &Token) -> Vec<u8> {
        self.render(token.access_token().expose(), token.expires_at_wall())
    }

    /// A file that holds no token and says it expired at `at`: an empty
    /// file for `raw`, an empty `accessToken` otherwise.
    fn render_expired(&self, at: SystemTime) -> Vec<u8> {
        self.render("", at)
    }
}

/// What happens to a sink's file when the proxy stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnShutdown {
    /// Delete it (default): no token outlives the proxy on disk.
    Remove,
    /// Leave it as it is (it stays usable until the token expires).
    Keep,
    /// Rewrite it without a token and with an expiry of now.
    Expire,
}

impl OnShutdown {
    /// The config word for it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Remove => "remove",
            Self::Keep => "keep",
            Self::Expire => "expire",
        }
    }
}

/// One `[[sink]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SinkConfig {
    /// The token source whose token is written.
    pub(crate) source: String,
    /// The file.
    pub(crate) path: PathBuf,
    /// What goes in it.
    pub(crate) format: SinkFormat,
    /// Its mode (default 0600).
    pub(crate) mode: u32,
    /// What happens to it on shutdown.
    pub(crate) on_shutdown: OnShutdown,
}

/// How far a sink got, for `/readyz`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SinkStatus {
    /// Id of the token in the file (`Token::id`), once one was written.
    pub(crate) written: Option<u64>,
    /// When that token expires.
    pub(crate) expires_at: Option<Instant>,
    /// Why the last write failed, while the newest token is not written.
    pub(crate) error: Option<String>,
}

impl SinkStatus {
    /// Whether the file holds a token that has not expired.
    pub(crate) fn holds_valid_token(&self) -> bool {
        self.expires_at.is_some_and(|t| Instant::now() < t)
    }
}

/// Reads a sink's status (cheap to clone).
#[derive(Debug, Clone)]
pub(crate) struct SinkProbe {
    config: Arc<SinkConfig>,
    status: Arc<Mutex<SinkStatus>>,
}

impl SinkProbe {
    /// The sink's settings.
    pub(crate) fn config(&self) -> &SinkConfig {
        &self.config
    }

    /// What it last did.
    pub(crate) fn status(&self) -> SinkStatus {
        self.status.lock().expect("sink status lock").clone()
    }
}

/// A running sink: its task and what it last did.
pub(crate) struct Sink {
    config: Arc<SinkConfig>,
    status: Arc<Mutex<SinkStatus>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl fmt::Debug for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sink")
            .field("config", &self.config)
            .field("status", &self.probe().status())
            .finish_non_exhaustive()
    }
}

impl Sink {
    /// Starts writing `cache`'s tokens to the file. The cache must be kept
    /// fresh by someone: traffic, or [`TokenCache::keep_fresh`].
    pub(crate) fn spawn(config: SinkConfig, cache: &TokenCache) -> Self {
        let config = Arc::new(config);
        let status = Arc::new(Mutex::new(SinkStatus::default()));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(write_tokens(
            Arc::clone(&config),
            cache.subscribe(),
            stopped,
            Arc::clone(&status),
        ));
        Self {
            config,
            status,
            stop,
            task,
        }
    }

    /// A handle that reads the sink's status, for `/readyz`.
    pub(crate) fn probe(&self) -> SinkProbe {
        SinkProbe {
            config: Arc::clone(&self.config),
            status: Arc::clone(&self.status),
        }
    }

    /// Stops writing (a write under way completes first), then removes,
    /// keeps or expires the file as configured.
    pub(crate) async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let config = Arc::clone(&self.config);
        let result = tokio::task::spawn_blocking(move || finish(&config))
            .await
            .unwrap_or_else(|e| Err(format!("task failed: {e}")));
        let path = self.config.path.display();
        match result {
            Ok(()) => tracing::info!(
                path = %path,
                on_shutdown = self.config.on_shutdown.as_str(),
                "token sink closed"
            ),
            Err(e) => tracing::warn!(
                path = %path,
                on_shutdown = self.config.on_shutdown.as_str(),
                error = %e,
                "could not close the token sink"
            ),
        }
    }
}

/// Does what `on_shutdown` says to the file.
fn finish(config: &SinkConfig) -> Result<(), String> {
    match config.on_shutdown {
        OnShutdown::Keep => Ok(()),
        OnShutdown::Remove => match std::fs::remove_file(&config.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("cannot remove it: {e}")),
        },
        OnShutdown::Expire => {
            let bytes = config.format.render_expired(SystemTime::now());
            fs_atomic::write_atomic_mode(&config.path, &bytes, config.mode)
                .map_err(|e| format!("cannot rewrite it: {e}"))
        }
    }
}

/// The sink's task: writes each published token until told to stop.
async fn write_tokens(
    config: Arc<SinkConfig>,
    mut tokens: watch::Receiver<Option<Arc<Token>>>,
    mut stop: watch::Receiver<bool>,
    status: Arc<Mutex<SinkStatus>>,
) {
    let label = config.path.display().to_string();
    // A token published before the sink started is written at once.
    let mut pending = tokens.borrow_and_update().clone();
    let mut failures = 0u32;
    let mut retry_at = None;
    loop {
        if let Some(token) = pending.clone()
            && retry_at.is_none_or(|at| Instant::now() >= at)
        {
            let bytes = config.format.render_token(&token);
            let (path, mode) = (config.path.clone(), config.mode);
            let result = tokio::task::spawn_blocking(move || {
                fs_atomic::write_atomic_mode(&path, &bytes, mode)
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            let mut s = status.lock().expect("sink status lock");
            match result {
                Ok(()) => {
                    metrics::counter!(
                        metric_names::SINK_WRITES_TOTAL.name,
                        "sink" => label.clone(),
                        "outcome" => "written"
                    )
                    .increment(1);
                    if failures > 0 {
                        tracing::info!(path = %label, "token sink written again");
                    }
                    tracing::debug!(path = %label, token_id = token.id(), "token sink written");
                    s.written = Some(token.id());
                    s.expires_at = Some(token.expires_at());
                    s.error = None;
                    pending = None;
                    failures = 0;
                    retry_at = None;
                }
                Err(e) => {
                    metrics::counter!(
                        metric_names::SINK_WRITES_TOTAL.name,
                        "sink" => label.clone(),
                        "outcome" => "failed"
                    )
                    .increment(1);
                    let delay = RETRY_BACKOFF.delay(failures);
                    failures = failures.saturating_add(1);
                    tracing::warn!(
                        path = %label,
                        attempt = failures,
                        error = %e,
                        retry_in_ms = delay.as_millis() as u64,
                        "could not write the token sink; retrying"
                    );
                    s.error = Some(format!("cannot write {label}: {e}"));
                    retry_at = Some(Instant::now() + delay);
                }
            }
        }
        let retry = async {
            match (pending.is_some(), retry_at) {
                (true, Some(at)) => tokio::time::sleep_until(at).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => return,
            changed = tokens.changed() => {
                if changed.is_err() {
                    return;
                }
                // A dropped token (`None`) leaves the file until the next.
                if let Some(token) = tokens.borrow_and_update().clone() {
                    pending = Some(token);
                    retry_at = None;
                }
            }
            () = retry => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::{
        cache::CacheOptions,
        secret::Secret,
        token::{FetchFuture, Reuse, TokenSource},
    };

    #[test]
    fn formats() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(SinkFormat::Raw.render("tok", at), b"tok");
        let json: serde_json::Value =
            serde_json::from_slice(&SinkFormat::Json.render("tok", at)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"accessToken": "tok", "expiresAt": "2023-11-14T22:13:20Z"})
        );
        let sso = SinkFormat::SsoCache {
            start_url: "https://example.awsapps.com/start".into(),
            region: Some("eu-west-1".into()),
        };
        let file: serde_json::Value = serde_json::from_slice(&sso.render("tok", at)).unwrap();
        assert_eq!(
            file,
            serde_json::json!({
                "startUrl": "https://example.awsapps.com/start",
                "region": "eu-west-1",
                "accessToken": "tok",
                "expiresAt": "2023-11-14T22:13:20Z",
            })
        );
        // What this proxy reads back as an SSO cache file.
        let parsed =
            crate::token::SsoCacheFile::parse(&sso.render("tok", at), "x".as_ref()).unwrap();
        assert!(parsed.refresh_token.is_none() && parsed.client_secret.is_none());
        assert_eq!(SinkFormat::Raw.render_expired(at), b"");
        let expired: serde_json::Value =
            serde_json::from_slice(&SinkFormat::Json.render_expired(at)).unwrap();
        assert_eq!(expired["accessToken"], "");
    }

    /// Issues `sink-0`, `sink-1`, ... valid for ten minutes.
    #[derive(Default)]
    struct Numbered(std::sync::atomic::AtomicU64);

    impl TokenSource for Numbered {
        fn identity(&self) -> String {
            "numbered".into()
        }
        fn scopes(&self) -> &[String] {
            &[]
        }
        fn fetch(&self, _reuse: Reuse) -> FetchFuture<'_> {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move {
                Ok(Token::new(
                    Secret::new(format!("sink-{n}")),
                    Duration::from_secs(600),
                ))
            })
        }
    }

    fn config(path: PathBuf, on_shutdown: OnShutdown) -> SinkConfig {
        SinkConfig {
            source: "default".into(),
            path,
            format: SinkFormat::Raw,
            mode: 0o640,
            on_shutdown,
        }
    }

    async fn eventually(what: &str, check: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(std::time::Instant::now() < deadline, "{what} within 10 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn writes_each_token_with_its_mode_and_closes_as_configured() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TokenCache::new(Numbered::default(), CacheOptions::default());
        // A token published before the sink exists is written at once.
        let first = cache.get().await.unwrap();
        let path = dir.path().join("token");
        let sink = Sink::spawn(config(path.clone(), OnShutdown::Remove), &cache);
        eventually("the first token", || {
            sink.probe().status().written == Some(first.id())
        })
        .await;
        assert_eq!(std::fs::read(&path).unwrap(), b"sink-0");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert!(sink.probe().status().holds_valid_token());
        // A rejection drops the token; the file keeps it until the next.
        cache.reject(&first);
        let second = cache.get().await.unwrap();
        eventually("the second token", || {
            sink.probe().status().written == Some(second.id())
        })
        .await;
        assert_eq!(std::fs::read(&path).unwrap(), b"sink-1");
        sink.shutdown().await;
        assert!(!path.exists(), "removed on shutdown");

        let kept = dir.path().join("kept");
        let sink = Sink::spawn(config(kept.clone(), OnShutdown::Keep), &cache);
        eventually("written", || kept.exists()).await;
        sink.shutdown().await;
        assert_eq!(std::fs::read(&kept).unwrap(), b"sink-1");

        let expired = dir.path().join("expired.json");
        let mut c = config(expired.clone(), OnShutdown::Expire);
        c.format = SinkFormat::Json;
        let sink = Sink::spawn(c, &cache);
        eventually("written", || expired.exists()).await;
        sink.shutdown().await;
        let file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&expired).unwrap()).unwrap();
        assert_eq!(file["accessToken"], "");
        let at = crate::token::parse_expires_at(file["expiresAt"].as_str().unwrap()).unwrap();
        assert!(at <= SystemTime::now());
        assert_eq!(
            std::fs::metadata(&expired).unwrap().permissions().mode() & 0o777,
            0o640
        );
    }

    #[tokio::test]
    async fn a_failed_write_is_retried_until_it_lands() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TokenCache::new(Numbered::default(), CacheOptions::default());
        cache.get().await.unwrap();
        let sub = dir.path().join("mount");
        let path = sub.join("token");
        let sink = Sink::spawn(config(path.clone(), OnShutdown::Keep), &cache);
        let probe = sink.probe();
        eventually("a failure is reported", || probe.status().error.is_some()).await;
        assert!(probe.status().written.is_none());
        assert!(!probe.status().holds_valid_token());
        // The volume appears: the token lands without a new one.
        std::fs::create_dir(&sub).unwrap();
        eventually("written after the retry", || {
            probe.status().written.is_some()
        })
        .await;
        assert_eq!(std::fs::read(&path).unwrap(), b"sink-0");
        assert_eq!(probe.status().error, None);
        sink.shutdown().await;
    }
}
