//! Token lifecycle against the in-process emulator over real sockets: the
//! cache's single-flight, refresh-ahead and failure memory, the retry
//! policy, rotation with the state file, SSO cache files and device login.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use sso_token_proxy::{
    Secret,
    cache::{CacheOptions, Lookup, TokenCache},
    emulator::{Emulator, EmulatorConfig, EmulatorHandle, Fault},
    oidc::{ErrorClass, OidcClient, Operation, ServiceErrorKind},
    retry::{Backoff, Jitter, OidcRetryPolicy, RetryConfig, RetryEvent},
    token::{
        DevicePrompt, LoginOptions, RefreshTokenSource, Reuse, SsoCacheFile, SsoCacheSource,
        StateFile, TokenSource, device_login,
    },
};

fn fast_retry() -> RetryConfig {
    let backoff = |base_ms| Backoff {
        base: Duration::from_millis(base_ms),
        factor: 2.0,
        cap: Duration::from_secs(2),
        jitter: Jitter::None,
    };
    RetryConfig {
        max_attempts: 3,
        transient: backoff(20),
        throttled: Backoff {
            factor: 3.0,
            ..backoff(40)
        },
    }
}

struct Setup {
    emulator: EmulatorHandle,
    client_id: String,
    client_secret: Secret,
    refresh_token: Secret,
}

async fn setup(config: EmulatorConfig) -> Setup {
    let emulator = Emulator::start(config).await.unwrap();
    let (client_id, client_secret) = emulator.register_client("lifecycle");
    let refresh_token = emulator.issue_refresh_token(&client_id, &[]);
    Setup {
        emulator,
        client_id,
        client_secret,
        refresh_token,
    }
}

fn oidc(emulator: &EmulatorHandle) -> OidcClient {
    OidcClient::builder()
        .endpoint(emulator.url())
        .call_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

fn source(s: &Setup, policy: OidcRetryPolicy) -> RefreshTokenSource {
    RefreshTokenSource::builder(
        oidc(&s.emulator),
        s.client_id.clone(),
        s.client_secret.clone(),
        s.refresh_token.clone(),
    )
    .retry_policy(policy)
    .build()
    .unwrap()
}

/// A source with fast retries that keeps its tokens in `state`.
fn source_with_state(s: &Setup, state: &std::path::Path) -> RefreshTokenSource {
    RefreshTokenSource::builder(
        oidc(&s.emulator),
        s.client_id.clone(),
        s.client_secret.clone(),
        s.refresh_token.clone(),
    )
    .retry_policy(OidcRetryPolicy::new(fast_retry()))
    .state_file(state)
    .build()
    .unwrap()
}

fn options(window: Duration, margin: Duration) -> CacheOptions {
    CacheOptions {
        refresh_before_expiry: window,
        expiry_margin: margin,
        ..Default::default()
    }
}

fn recording_policy() -> (OidcRetryPolicy, Arc<Mutex<Vec<RetryEvent>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let policy = OidcRetryPolicy::new(fast_retry())
        .with_observer(move |e| sink.lock().unwrap().push(e.clone()));
    (policy, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_cold_gets_make_one_create_token_call() {
    let s = setup(EmulatorConfig::default()).await;
    let cache = TokenCache::new(
        source(&s, OidcRetryPolicy::new(fast_retry())),
        CacheOptions::default(),
    );
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let c = cache.clone();
            tokio::spawn(async move { c.get().await.unwrap().id() })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    assert!(ids.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(s.emulator.counters().create_token, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refresh_per_window_and_no_caller_waits() {
    // 2 s tokens, refreshed in their last second.
    let s = setup(EmulatorConfig {
        access_token_lifetime: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let cache = TokenCache::new(
        source(&s, OidcRetryPolicy::new(fast_retry())),
        options(Duration::from_secs(1), Duration::from_millis(100)),
    );
    let first = cache.get().await.unwrap();
    let mut seen = vec![first.id()];
    // Three windows of requests every 10 ms: every one is answered from
    // memory (never a miss), and each token is replaced exactly once.
    let deadline = first.expires_at() + Duration::from_secs(4);
    while tokio::time::Instant::now() < deadline {
        match cache.lookup() {
            Lookup::Hit(t) | Lookup::RefreshAhead(t) => {
                if *seen.last().unwrap() != t.id() {
                    seen.push(t.id());
                }
            }
            other => panic!("a caller would have waited for a token: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let calls = s.emulator.counters().create_token;
    assert_eq!(calls as usize, seen.len(), "one CreateToken per token seen");
    assert!((4..=6).contains(&seen.len()), "tokens seen: {}", seen.len());
    assert_eq!(
        cache.stats().refresh_ahead as usize,
        seen.len() - 1 + usize::from(cache.stats().refresh_ahead as usize == seen.len())
    );
}

async fn scripted_then_success(kind: ServiceErrorKind) -> (Vec<RetryEvent>, u64) {
    let s = setup(EmulatorConfig::default()).await;
    s.emulator.inject(
        Operation::CreateToken,
        [Fault::Error(kind), Fault::Error(kind)],
    );
    let (policy, events) = recording_policy();
    let cache = TokenCache::new(source(&s, policy), CacheOptions::default());
    let token = cache.get().await.expect("third attempt succeeds");
    assert!(token.is_valid());
    let events = events.lock().unwrap().clone();
    (events, s.emulator.counters().create_token)
}

#[tokio::test]
async fn slow_down_twice_then_success_is_one_token_with_growing_delays() {
    let (events, calls) = scripted_then_success(ServiceErrorKind::SlowDown).await;
    assert_eq!(calls, 3);
    assert_eq!(events.len(), 2);
    assert!(
        events
            .iter()
            .all(|e| e.class == ErrorClass::Throttled && e.kind == "SlowDown")
    );
    let (d1, d2) = (events[0].delay.unwrap(), events[1].delay.unwrap());
    assert!(d2 > d1, "{d1:?} then {d2:?}");
}

#[tokio::test]
async fn internal_server_twice_then_success_is_one_token_with_growing_delays() {
    let (events, calls) = scripted_then_success(ServiceErrorKind::InternalServer).await;
    assert_eq!(calls, 3);
    assert!(events.iter().all(|e| e.class == ErrorClass::Transient));
    let (d1, d2) = (events[0].delay.unwrap(), events[1].delay.unwrap());
    assert!(d2 > d1, "{d1:?} then {d2:?}");
    // SlowDown's curve is steeper than InternalServer's.
    let (slow, _) = scripted_then_success(ServiceErrorKind::SlowDown).await;
    assert!(slow[1].delay.unwrap() / 2 > d2 / 2 && slow[0].delay.unwrap() > d1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_fails_after_one_call_and_a_thousand_callers_add_at_most_one() {
    let s = setup(EmulatorConfig::default()).await;
    s.emulator.inject_always(
        Operation::CreateToken,
        Some(Fault::Error(ServiceErrorKind::InvalidGrant)),
    );
    let cache = TokenCache::new(
        source(&s, OidcRetryPolicy::new(fast_retry())),
        CacheOptions::default(),
    );
    let err = cache.get().await.unwrap_err();
    assert_eq!(err.kind(), "InvalidGrant");
    assert_eq!(err.class(), ErrorClass::Fatal);
    assert_eq!(s.emulator.counters().create_token, 1);
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let c = cache.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(i)).await;
                c.get().await.unwrap_err().kind()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), "InvalidGrant");
    }
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(s.emulator.counters().create_token <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_service_keeps_the_valid_token_then_names_the_cause() {
    let s = setup(EmulatorConfig {
        access_token_lifetime: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let cache = TokenCache::new(
        source(&s, OidcRetryPolicy::new(fast_retry())),
        options(Duration::from_secs(1), Duration::ZERO),
    );
    let token = cache.get().await.unwrap();
    s.emulator.clone().shutdown().await;
    // Until expiry every caller gets the token (refresh-ahead fails quietly).
    while token.ttl() > Duration::from_millis(50) {
        assert_eq!(cache.get().await.unwrap().id(), token.id());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(token.ttl() + Duration::from_millis(20)).await;
    let err = cache.get().await.unwrap_err();
    assert_eq!(err.kind(), "Connect", "{err}");
    assert_eq!(err.class(), ErrorClass::Transient);
    assert!(err.to_string().contains("connect"), "{err}");
    assert!(cache.stats().refresh_ahead_failed >= 1);
}

#[tokio::test]
async fn five_rotations_in_a_row_and_the_state_file_holds_the_last() {
    let s = setup(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let src = source_with_state(&s, &state);
    let mut previous = s.refresh_token.clone();
    for _ in 0..5 {
        let token = src
            .fetch(Reuse::Never)
            .await
            .expect("each refresh succeeds");
        let saved = StateFile::load(&state).unwrap().unwrap();
        let newest = saved.refresh_token.unwrap();
        assert_ne!(newest, previous, "rotated");
        assert!(
            !s.emulator.is_refresh_token_live(previous.expose()),
            "old one revoked"
        );
        assert!(s.emulator.is_refresh_token_live(newest.expose()));
        assert_eq!(saved.access_token.as_ref(), Some(token.access_token()));
        previous = newest;
    }
    assert_eq!(s.emulator.counters().create_token, 5);
    assert_eq!(
        s.emulator.counters().errors_by_kind.get("InvalidGrant"),
        None
    );

    // A restart picks the state file's token over the configured (revoked)
    // one, and reuses the stored access token without a call. The file,
    // opened to others meanwhile (a restore from a backup, say), is
    // narrowed to its owner again at once, not at the next rotation.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = || std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(), 0o600);
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o644)).unwrap();
    let restarted = RefreshTokenSource::builder(
        oidc(&s.emulator),
        s.client_id.clone(),
        s.client_secret.clone(),
        s.refresh_token.clone(),
    )
    .state_file(&state)
    .build()
    .unwrap();
    assert_eq!(mode(), 0o600);
    restarted
        .fetch(Reuse::IfValidFor(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(s.emulator.counters().create_token, 5);
    restarted
        .fetch(Reuse::Never)
        .await
        .expect("state file token accepted");
    assert_eq!(s.emulator.counters().create_token, 6);
}

/// The process died after SSO-OIDC rotated the refresh token and its
/// write had reached the temp copy, not the rename: on restart the copy's
/// live token is used, not the file's revoked one, and the copy is gone.
#[tokio::test]
async fn a_state_write_cut_short_by_a_crash_is_recovered_on_restart() {
    let s = setup(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let src = source_with_state(&s, &state);
    src.fetch(Reuse::Never).await.unwrap();
    let first = std::fs::read(&state).unwrap();
    src.fetch(Reuse::Never).await.unwrap();
    drop(src);
    // As if the second write had stopped before its rename, in a process
    // that is gone.
    let copy = dir
        .path()
        .join(format!(".state.json.tmp-{}-00000000000000aa", u32::MAX));
    std::fs::rename(&state, &copy).unwrap();
    std::fs::write(&state, &first).unwrap();
    let first_token = serde_json::from_slice::<serde_json::Value>(&first).unwrap()["refreshToken"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        !s.emulator.is_refresh_token_live(&first_token),
        "rotated away"
    );

    let restarted = source_with_state(&s, &state);
    restarted
        .fetch(Reuse::Never)
        .await
        .expect("the copy's live refresh token is used");
    assert_eq!(
        s.emulator.counters().errors_by_kind.get("InvalidGrant"),
        None
    );
    assert!(!copy.exists());
}

#[tokio::test]
async fn corrupt_state_file_is_an_error_naming_the_path_and_is_left_alone() {
    let s = setup(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    std::fs::write(&state, b"{\"refreshToken\": \"abc").unwrap();
    let err = RefreshTokenSource::builder(
        oidc(&s.emulator),
        s.client_id.clone(),
        s.client_secret.clone(),
        s.refresh_token.clone(),
    )
    .state_file(&state)
    .build()
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&state.display().to_string()), "{msg}");
    assert!(!msg.contains("abc"), "{msg}");
    assert_eq!(std::fs::read(&state).unwrap(), b"{\"refreshToken\": \"abc");
}

// === SSO cache files ===

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/sso-cache/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

#[test]
fn aws_cli_cache_files_load_in_every_expires_at_form() {
    for (name, expect_extra) in [
        ("cli-v2-z.json", vec![]),
        ("fractional.json", vec![]),
        ("utc-suffix.json", vec![]),
        ("with-extra-keys.json", vec!["someFutureKey", "nested"]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, fixture(name)).unwrap();
        let file = SsoCacheFile::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(file.access_token.is_some(), "{name}");
        assert!(file.token().is_some(), "{name}: expiresAt parses");
        for key in expect_extra {
            assert!(file.extra.contains_key(key), "{name}: {key}");
        }
    }
}

#[tokio::test]
async fn sso_cache_source_refreshes_and_rewrites_keeping_unknown_keys() {
    let s = setup(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.json");
    let expired = serde_json::json!({
        "startUrl": "https://example.awsapps.com/start",
        "region": "us-east-1",
        "accessToken": "expired-token",
        "expiresAt": "2020-01-01T00:00:00UTC",
        "clientId": s.client_id,
        "clientSecret": s.client_secret.expose(),
        "registrationExpiresAt": "2099-01-01T00:00:00Z",
        "refreshToken": s.refresh_token.expose(),
        "someFutureKey": {"kept": true},
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&expired).unwrap()).unwrap();
    let src = SsoCacheSource::new(
        &path,
        oidc(&s.emulator),
        OidcRetryPolicy::new(fast_retry()),
        vec![],
    )
    .unwrap();
    let cache = TokenCache::new(src, CacheOptions::default());
    let token = cache.get().await.unwrap();
    assert!(
        s.emulator
            .is_access_token_live(token.access_token().expose())
    );
    let raw: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(raw["accessToken"], token.access_token().expose());
    assert_eq!(raw["someFutureKey"]["kept"], true);
    assert_eq!(raw["startUrl"], "https://example.awsapps.com/start");
    let rotated = raw["refreshToken"].as_str().unwrap();
    assert_ne!(rotated, s.refresh_token.expose());
    assert!(s.emulator.is_refresh_token_live(rotated));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // A valid token in the file is used without a call.
    let before = s.emulator.counters().create_token;
    let again = SsoCacheSource::new(
        &path,
        oidc(&s.emulator),
        OidcRetryPolicy::new(fast_retry()),
        vec![],
    )
    .unwrap();
    let reused = again
        .fetch(Reuse::IfValidFor(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(reused.access_token(), token.access_token());
    assert_eq!(s.emulator.counters().create_token, before);
}

#[tokio::test]
async fn corrupt_or_truncated_cache_files_are_errors_naming_the_path_and_untouched() {
    let s = setup(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    for (name, contents) in [
        (
            "truncated.json",
            &b"{\"accessToken\": \"abc\", \"expiresAt\": \"2030-"[..],
        ),
        ("empty.json", &b""[..]),
        ("garbage.json", &b"not json at all"[..]),
        (
            "bad-time.json",
            &br#"{"accessToken":"a","expiresAt":"tomorrow"}"#[..],
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        let err = SsoCacheSource::new(
            &path,
            oidc(&s.emulator),
            OidcRetryPolicy::new(fast_retry()),
            vec![],
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{name}: {msg}");
        assert_eq!(std::fs::read(&path).unwrap(), contents, "{name} untouched");
    }
    let missing = dir.path().join("missing.json");
    let err = SsoCacheSource::new(
        &missing,
        oidc(&s.emulator),
        OidcRetryPolicy::new(fast_retry()),
        vec![],
    )
    .unwrap_err();
    assert!(err.to_string().contains("missing.json"));
}

// === device login ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_completes_after_approval_through_pending_and_slow_down() {
    let emulator = Emulator::start(EmulatorConfig {
        device_poll_interval: Duration::from_millis(200),
        ..Default::default()
    })
    .await
    .unwrap();
    // The second poll is answered SlowDown; the ones before approval are
    // AuthorizationPending.
    emulator.inject(
        Operation::CreateToken,
        [
            Fault::Delay(Duration::ZERO),
            Fault::Error(ServiceErrorKind::SlowDown),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let cache_file = dir.path().join("sso").join("cache.json");
    let mut options = LoginOptions::new(
        "https://example.awsapps.com/start",
        "us-east-1",
        cache_file.clone(),
    );
    options.slow_down_increment = Duration::from_millis(300);
    let (code_tx, code_rx) = tokio::sync::oneshot::channel::<DevicePrompt>();
    let approver = {
        let emulator = emulator.clone();
        tokio::spawn(async move {
            let prompt = code_rx.await.unwrap();
            // Approve only once the client has been told to wait at least
            // twice (pending, then slow_down).
            while emulator.counters().create_token < 3 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(emulator.approve(&prompt.user_code));
        })
    };
    let client = oidc(&emulator);
    let (file, token) = device_login(&client, &options, move |p| {
        let _ = code_tx.send(p.clone());
    })
    .await
    .unwrap();
    approver.await.unwrap();
    let counters = emulator.counters();
    assert!(
        counters
            .errors_by_kind
            .get("AuthorizationPending")
            .copied()
            .unwrap_or(0)
            >= 1
    );
    assert_eq!(counters.errors_by_kind.get("SlowDown").copied(), Some(1));
    assert!(emulator.is_access_token_live(token.access_token().expose()));
    // The written file is one the sso_cache source (and the AWS CLI) reads.
    let loaded = SsoCacheFile::load(&cache_file).unwrap();
    assert_eq!(loaded.access_token, file.access_token);
    assert!(
        loaded.refresh_token.is_some()
            && loaded.client_id.is_some()
            && loaded.client_secret.is_some()
    );
    assert_eq!(
        loaded.start_url.as_deref(),
        Some("https://example.awsapps.com/start")
    );
    let src = SsoCacheSource::new(
        &cache_file,
        client,
        OidcRetryPolicy::new(fast_retry()),
        vec![],
    )
    .unwrap();
    let refreshed = src.fetch(Reuse::Never).await.unwrap();
    assert!(emulator.is_access_token_live(refreshed.access_token().expose()));
}

// === SSO cache file: failed writes and other writers (issue 13) ===

/// An SSO cache file with an expired access token and `refresh_token`.
fn write_expired_cache_file(s: &Setup, path: &std::path::Path, refresh_token: &Secret) {
    let json = serde_json::json!({
        "startUrl": "https://example.awsapps.com/start",
        "region": "us-east-1",
        "accessToken": "expired-token",
        "expiresAt": "2020-01-01T00:00:00Z",
        "clientId": s.client_id,
        "clientSecret": s.client_secret.expose(),
        "registrationExpiresAt": "2099-01-01T00:00:00Z",
        "refreshToken": refresh_token.expose(),
        "someFutureKey": {"kept": true},
    });
    std::fs::write(path, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
}

fn cache_file_field(path: &std::path::Path, key: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    v[key].as_str().map(str::to_owned)
}

fn sso_source(s: &Setup, path: &std::path::Path) -> SsoCacheSource {
    SsoCacheSource::new(
        path,
        oidc(&s.emulator),
        OidcRetryPolicy::new(fast_retry()),
        vec![],
    )
    .unwrap()
}

/// Writes tokens into the cache file as the AWS CLI would after its own
/// refresh: the other keys stay.
fn another_process_writes(
    path: &std::path::Path,
    access: &Secret,
    refresh: &Secret,
    expires_in: Duration,
) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    v["accessToken"] = access.expose().into();
    v["refreshToken"] = refresh.expose().into();
    v["expiresAt"] = humantime::format_rfc3339_seconds(std::time::SystemTime::now() + expires_in)
        .to_string()
        .into();
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// Polls `check` every 20 ms for at most `limit`.
async fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The cache file's directory disappears: the rotated refresh token is kept
/// in memory and used for the next refresh, also once the directory is
/// back with the stale file in it (which still holds a revoked refresh
/// token), and the write is retried until the newest token is on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sso_cache_failed_write_keeps_the_newest_refresh_token_and_retries() {
    let s = setup(EmulatorConfig::default()).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("cache");
    std::fs::create_dir(&dir).unwrap();
    let path = dir.join("cache.json");
    write_expired_cache_file(&s, &path, &s.refresh_token);
    let source = sso_source(&s, &path);
    source
        .fetch(Reuse::IfValidFor(Duration::from_secs(60)))
        .await
        .unwrap();
    let on_disk = cache_file_field(&path, "refreshToken").unwrap();
    assert!(s.emulator.is_refresh_token_live(&on_disk));

    let away = root.path().join("away");
    std::fs::rename(&dir, &away).unwrap();
    let second = source.fetch(Reuse::Never).await.unwrap();
    assert!(
        s.emulator
            .is_access_token_live(second.access_token().expose())
    );
    let status = source.persistence();
    assert!(!status.persisted, "{status:?}");
    assert!(status.reason.is_some(), "{status:?}");
    assert!(
        !s.emulator.is_refresh_token_live(&on_disk),
        "the file's refresh token was rotated away"
    );
    // Just after the second retry failed, the next is a second away.
    eventually(Duration::from_secs(10), "two retries", || {
        source.persistence().failed_attempts >= 3
    })
    .await;

    // The directory returns with the stale file: the held token wins.
    std::fs::rename(&away, &dir).unwrap();
    assert_eq!(cache_file_field(&path, "refreshToken").unwrap(), on_disk);
    let third = source.fetch(Reuse::Never).await.unwrap();
    assert!(
        s.emulator
            .is_access_token_live(third.access_token().expose())
    );
    let counters = s.emulator.counters();
    assert_eq!(counters.create_token, 3);
    assert_eq!(
        counters.errors_by_kind.get("InvalidGrant"),
        None,
        "{counters:?}"
    );
    eventually(
        Duration::from_secs(2),
        "the newest refresh token on disk",
        || {
            cache_file_field(&path, "refreshToken")
                .is_some_and(|t| s.emulator.is_refresh_token_live(&t))
        },
    )
    .await;
    assert!(source.persistence().persisted);
    assert_eq!(
        cache_file_field(&path, "accessToken").unwrap(),
        third.access_token().expose()
    );
    let raw: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(raw["someFutureKey"]["kept"], true);
}

/// Another process (the AWS CLI) refreshed and rewrote the cache file: its
/// newer tokens are adopted instead of redeeming the refresh token it
/// rotated away.
#[tokio::test]
async fn sso_cache_adopts_newer_tokens_another_process_wrote() {
    let s = setup(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.json");
    write_expired_cache_file(&s, &path, &s.refresh_token);
    let source = sso_source(&s, &path);
    let ours = source
        .fetch(Reuse::IfValidFor(Duration::from_secs(60)))
        .await
        .unwrap();

    // The other process redeems the file's refresh token and writes.
    let file_refresh = Secret::new(cache_file_field(&path, "refreshToken").unwrap());
    let theirs = oidc(&s.emulator)
        .create_token(&sso_token_proxy::oidc::CreateTokenRequest::refresh(
            s.client_id.clone(),
            s.client_secret.clone(),
            file_refresh,
        ))
        .await
        .unwrap();
    let (their_access, their_refresh) = (
        theirs.access_token.clone().unwrap(),
        theirs.refresh_token.clone().unwrap(),
    );
    // Same second as ours or not, a refresh token we never held wins.
    another_process_writes(
        &path,
        &their_access,
        &their_refresh,
        Duration::from_secs(3600),
    );
    let calls = s.emulator.counters().create_token;

    let adopted = source
        .fetch(Reuse::IfValidFor(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(adopted.access_token(), &their_access);
    assert_ne!(adopted.access_token(), ours.access_token());
    assert_eq!(
        s.emulator.counters().create_token,
        calls,
        "no refresh needed"
    );
    // The next refresh redeems their refresh token, not the revoked one.
    let next = source.fetch(Reuse::Never).await.unwrap();
    assert!(
        s.emulator
            .is_access_token_live(next.access_token().expose())
    );
    let counters = s.emulator.counters();
    assert_eq!(
        counters.errors_by_kind.get("InvalidGrant"),
        None,
        "{counters:?}"
    );
    assert!(!s.emulator.is_refresh_token_live(their_refresh.expose()));
    let on_disk = cache_file_field(&path, "refreshToken").unwrap();
    assert!(s.emulator.is_refresh_token_live(&on_disk));
}

/// Another process redeems the refresh token while our refresh is on its
/// way (ours is slowed down): ours is refused with `InvalidGrant`, the file
/// is read again, and the other process's newer token is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sso_cache_invalid_grant_rereads_the_file_and_uses_the_newer_token() {
    let s = setup(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.json");
    write_expired_cache_file(&s, &path, &s.refresh_token);
    let source = Arc::new(sso_source(&s, &path));
    s.emulator.inject(
        Operation::CreateToken,
        [Fault::Delay(Duration::from_millis(1500))],
    );
    let ours = tokio::spawn({
        let source = Arc::clone(&source);
        async move { source.fetch(Reuse::Never).await }
    });
    // Our call has reached the emulator and waits there.
    eventually(Duration::from_secs(10), "our CreateToken", || {
        s.emulator.counters().create_token == 1
    })
    .await;
    let theirs = oidc(&s.emulator)
        .create_token(&sso_token_proxy::oidc::CreateTokenRequest::refresh(
            s.client_id.clone(),
            s.client_secret.clone(),
            s.refresh_token.clone(),
        ))
        .await
        .unwrap();
    let their_access = theirs.access_token.clone().unwrap();
    another_process_writes(
        &path,
        &their_access,
        theirs.refresh_token.as_ref().unwrap(),
        Duration::from_secs(3600),
    );

    let token = ours.await.unwrap().expect("their token is used");
    assert_eq!(token.access_token(), &their_access);
    let counters = s.emulator.counters();
    assert_eq!(counters.create_token, 2, "{counters:?}");
    assert_eq!(counters.errors_by_kind.get("InvalidGrant"), Some(&1));
    // Their tokens are left in the file.
    assert_eq!(
        cache_file_field(&path, "accessToken").unwrap(),
        their_access.expose()
    );
}
