//! Token lifecycle through the real `sso-token-proxy` binary against an
//! in-process emulator: 401-driven refreshes are bounded (issue 12), and
//! the lifecycle guarantees of issue 13.
//!
//! Every test has its own emulator on 127.0.0.1:0, its own temp dir and
//! ports, and bounds every wait.

#[allow(dead_code)]
#[path = "support/binary_harness.rs"]
mod harness;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use http::{Request, StatusCode};
use sso_token_proxy::emulator::EmulatorConfig;
use tokio::time::{Instant, timeout};

use harness::{Env, Http, Opts, full};

/// The test's overall limit.
const LIMIT: Duration = Duration::from_secs(60);

async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: test did not finish within {LIMIT:?}"))
}

/// `/metrics`, parsed.
async fn scrape(http: &Http, url: &str) -> prometheus_parse::Scrape {
    let r = http.get(url).await;
    assert_eq!(r.status, StatusCode::OK);
    let text = String::from_utf8(r.body.to_vec()).expect("UTF-8 metrics");
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text")
}

/// The sum of the samples of `name` whose labels include `labels`.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(x)
            | prometheus_parse::Value::Gauge(x)
            | prometheus_parse::Value::Untyped(x) => x,
            ref other => panic!("{name} is not a scalar: {other:?}"),
        })
        .sum()
}

/// Issue 12: a client that provokes `401`s (here the echo resource answers
/// with the status the request asks for, whatever the token) cannot make
/// the proxy call `CreateToken` once per request: three forced refreshes,
/// then every `401` passes through unchanged and is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_provoking_401s_causes_three_refreshes_and_the_rest_are_counted() {
    bounded("provoked 401s", async {
        let env = Env::new(EmulatorConfig::default()).await;
        let proxy = env.start(Opts::default()).await;
        let http = Http::new();
        assert_eq!(http.get(&proxy.url("/warm")).await.status, StatusCode::OK);
        let before = env.emulator.counters();

        for i in 0..50 {
            let r = http
                .send(
                    Request::post(proxy.url(&format!("/provoke/{i}")))
                        .header("x-echo-status", "401")
                        .body(full(&b"replayable"[..]))
                        .unwrap(),
                )
                .await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "request {i}");
            assert_eq!(
                r.json()["path"],
                format!("/provoke/{i}"),
                "the upstream's own 401"
            );
        }
        let after = env.emulator.counters();
        assert_eq!(
            after.create_token,
            before.create_token + 3,
            "{before:?} -> {after:?}"
        );
        // Each request reached the upstream once, plus three replays.
        assert_eq!(after.echo_authorized, before.echo_authorized + 53);

        let metrics = scrape(&http, &proxy.admin_url("/metrics")).await;
        let forced = |decision| {
            sample(
                &metrics,
                "sso_token_proxy_forced_refreshes_total",
                &[("source", "default"), ("decision", decision)],
            )
        };
        assert_eq!(forced("allowed"), 3.0);
        assert_eq!(forced("limited"), 47.0);
        assert_eq!(forced("superseded"), 0.0);

        // The kept token still serves.
        assert_eq!(http.get(&proxy.url("/after")).await.status, StatusCode::OK);
        assert_eq!(env.emulator.counters().create_token, after.create_token);
    })
    .await;
}

/// Issue 13: the emulator issues 3 s tokens; with the default margins
/// (`expiry_margin` 10 s, `refresh_before_expiry` 5 min) the proxy scales
/// them to the token (0.75 s, 1.5 s) and serves 20 s of steady traffic
/// without one failed request, calling `CreateToken` about twice per token
/// lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_second_tokens_serve_twenty_seconds_without_a_failure() {
    const LIFETIME: Duration = Duration::from_secs(3);
    const RUN: Duration = Duration::from_secs(20);
    bounded("short-lived tokens", async {
        let env = Env::new(EmulatorConfig {
            access_token_lifetime: LIFETIME,
            ..Default::default()
        })
        .await;
        let proxy = env.start(Opts::default()).await;
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let started = Instant::now();
        let clients = (0..2).map(|c| {
            let (url, ok, failed) = (
                proxy.url(&format!("/steady/{c}")),
                ok.clone(),
                failed.clone(),
            );
            tokio::spawn(async move {
                let http = Http::new();
                while started.elapsed() < RUN {
                    let r = http.get(&url).await;
                    if r.status == StatusCode::OK {
                        ok.fetch_add(1, Ordering::SeqCst);
                    } else {
                        failed.fetch_add(1, Ordering::SeqCst);
                        eprintln!("{}: {}", r.status, String::from_utf8_lossy(&r.body));
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        });
        for client in clients.collect::<Vec<_>>() {
            client.await.unwrap();
        }
        let counters = env.emulator.counters();
        assert_eq!(failed.load(Ordering::SeqCst), 0, "{counters:?}");
        assert!(ok.load(Ordering::SeqCst) > 100);
        assert_eq!(
            counters.echo_unauthorized, 0,
            "no expired token reached the upstream"
        );
        let lifetimes = RUN.as_secs_f64() / LIFETIME.as_secs_f64();
        let calls = counters.create_token as f64;
        assert!(
            calls >= lifetimes && calls <= 2.0 * lifetimes + 2.0,
            "{calls} CreateToken calls in {lifetimes:.1} token lifetimes"
        );
        assert!(
            !proxy.stderr().contains("NoRefreshToken")
                && !proxy.stderr().contains("ExpiredOnArrival"),
            "{}",
            proxy.stderr()
        );
    })
    .await;
}

/// An idle pod stays ready: with no request at all, every source a route
/// uses is refreshed inside its refresh window, so `/readyz` (which
/// Kubernetes would use to take the pod out of its Service, and so away
/// from any traffic that could refresh the token) never flips to 503 when a
/// token runs out, and the first request after the quiet spell is served
/// with a valid token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_proxy_keeps_its_token_fresh_and_stays_ready() {
    const LIFETIME: Duration = Duration::from_secs(3);
    const IDLE: Duration = Duration::from_secs(12);
    bounded("idle proxy", async {
        let env = Env::new(EmulatorConfig {
            access_token_lifetime: LIFETIME,
            ..Default::default()
        })
        .await;
        let proxy = env.start(Opts::default()).await;
        let http = Http::new();
        let readyz = proxy.admin_url("/readyz");
        // The first token (`bounded` limits the wait).
        while http.get(&readyz).await.status != StatusCode::OK {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let started = Instant::now();
        let mut probes = 0;
        while started.elapsed() < IDLE {
            let r = http.get(&readyz).await;
            assert_eq!(
                r.status,
                StatusCode::OK,
                "not ready after {:?} idle: {}",
                started.elapsed(),
                String::from_utf8_lossy(&r.body)
            );
            probes += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(probes > 20);
        let counters = env.emulator.counters();
        let lifetimes = IDLE.as_secs_f64() / LIFETIME.as_secs_f64();
        let calls = counters.create_token as f64;
        assert!(
            calls >= lifetimes && calls <= 2.0 * lifetimes + 3.0,
            "{calls} CreateToken calls in {lifetimes:.1} idle token lifetimes"
        );
        assert_eq!(
            counters.echo_authorized + counters.echo_unauthorized,
            0,
            "nothing reached the upstream"
        );

        let r = http.get(&proxy.url("/after-idle")).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(env.emulator.counters().echo_unauthorized, 0);
    })
    .await;
}

/// Issue 13: with `source = "sso_cache"` the cache file still lists the
/// token the upstream rejected as valid. Tokens are known by their value,
/// so the rejected token is never read back from the file: one
/// `CreateToken`, the replay succeeds, and the revoked token never reaches
/// the upstream again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sso_cache_token_rejected_upstream_is_never_sent_again() {
    bounded("sso_cache 401", async {
        let env = Env::new(EmulatorConfig::default()).await;
        let cache_file = env.path("sso-cache.json");
        let expired = serde_json::json!({
            "startUrl": "https://example.awsapps.com/start",
            "region": "us-east-1",
            "accessToken": "expired-token",
            "expiresAt": "2020-01-01T00:00:00Z",
            "clientId": env.client_id,
            "clientSecret": env.client_secret,
            "registrationExpiresAt": "2099-01-01T00:00:00Z",
            "refreshToken": env.refresh_token,
            "someFutureKey": {"kept": true},
        });
        std::fs::write(&cache_file, serde_json::to_vec_pretty(&expired).unwrap()).unwrap();
        let proxy = env
            .start(Opts {
                token_source: Some(format!(
                    "source = \"sso_cache\"\nsso_cache_file = \"{}\"",
                    cache_file.display()
                )),
                ..Opts::default()
            })
            .await;
        let http = Http::new();
        assert_eq!(http.get(&proxy.url("/first")).await.status, StatusCode::OK);
        let read_file = || -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(&cache_file).unwrap()).unwrap()
        };
        let first_token = read_file()["accessToken"].as_str().unwrap().to_owned();
        let before = env.emulator.counters();
        assert_eq!(before.create_token, 1);

        env.emulator.revoke_access_tokens();
        assert!(
            env.emulator
                .is_refresh_token_live(read_file()["refreshToken"].as_str().unwrap()),
            "the file's refresh token still works"
        );
        let r = http
            .send(
                Request::post(proxy.url("/replayed"))
                    .body(full(&b"replayable"[..]))
                    .unwrap(),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        for i in 0..20 {
            let r = http.get(&proxy.url(&format!("/after/{i}"))).await;
            assert_eq!(
                r.status,
                StatusCode::OK,
                "{}",
                String::from_utf8_lossy(&r.body)
            );
        }
        let after = env.emulator.counters();
        assert_eq!(
            after.create_token,
            before.create_token + 1,
            "{before:?} -> {after:?}"
        );
        assert_eq!(
            after.echo_unauthorized,
            before.echo_unauthorized + 1,
            "the revoked token reached the upstream once: {before:?} -> {after:?}"
        );
        assert_eq!(after.echo_authorized, before.echo_authorized + 21);
        let file = read_file();
        assert_ne!(file["accessToken"], first_token.as_str());
        assert!(
            env.emulator
                .is_access_token_live(file["accessToken"].as_str().unwrap())
        );
        assert_eq!(file["someFutureKey"]["kept"], true);
    })
    .await;
}

/// `[token]` lines for the refresh-token source with its state file in a
/// directory of its own, which a test can rename away.
fn state_in_subdir(env: &Env) -> (String, std::path::PathBuf) {
    let dir = env.path("state");
    std::fs::create_dir(&dir).unwrap();
    let lines = format!(
        "source = \"refresh_token\"\nrefresh_token_file = \"{}\"\nstate_file = \"{}\"",
        env.path("refresh_token").display(),
        dir.join("state.json").display()
    );
    (lines, dir)
}

/// The refresh token in a state file, if it parses.
fn saved_refresh_token(state_file: &std::path::Path) -> Option<String> {
    let text = std::fs::read(state_file).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    v["refreshToken"].as_str().map(str::to_owned)
}

/// Issue 13: the state directory disappears (renamed away; tests run as
/// root, so permissions cannot stand in for a failing disk) while tokens
/// rotate. Requests keep being served with the newest refresh token held in
/// memory, `/readyz` and the gauge say it is not on disk, and once the
/// directory is back the newest refresh token is written within 2 s with no
/// traffic and no refresh at all. A `kill -9` and a restart then serve from
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_directory_gone_mid_rotation_loses_nothing() {
    bounded("state directory gone", async {
        let env = Env::new(EmulatorConfig {
            access_token_lifetime: Duration::from_secs(2),
            ..Default::default()
        })
        .await;
        let (token_source, state_dir) = state_in_subdir(&env);
        let state_file = state_dir.join("state.json");
        let opts = Opts {
            token_source: Some(token_source),
            ..Opts::default()
        };
        let mut proxy = env.start(opts.clone()).await;
        let http = Http::new();

        // Steady traffic keeps the 2 s tokens rotating, about once a second.
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let traffic = {
            let (url, ok, failed, stop) = (
                proxy.url("/rotating"),
                ok.clone(),
                failed.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let http = Http::new();
                while !stop.load(Ordering::SeqCst) {
                    let r = http.get(&url).await;
                    if r.status == StatusCode::OK {
                        ok.fetch_add(1, Ordering::SeqCst);
                    } else {
                        failed.fetch_add(1, Ordering::SeqCst);
                        eprintln!("{}: {}", r.status, String::from_utf8_lossy(&r.body));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        let rotations = |n: u64| {
            let env = &env;
            async move {
                let start = env.emulator.counters().create_token;
                harness::poll_until(Duration::from_secs(20), "rotations", || async {
                    (env.emulator.counters().create_token >= start + n).then_some(())
                })
                .await;
            }
        };
        rotations(2).await;
        assert!(saved_refresh_token(&state_file).is_some());

        let away = env.path("state-away");
        std::fs::rename(&state_dir, &away).unwrap();
        rotations(3).await;
        let ready = http.get(&proxy.admin_url("/readyz")).await;
        assert_eq!(ready.status, StatusCode::OK, "serving is fine");
        let ready = ready.json();
        assert_eq!(ready["refresh_token_persisted"], false, "{ready}");
        assert!(
            ready["persist_error"]
                .as_str()
                .unwrap()
                .contains("state.json"),
            "{ready}"
        );
        let metrics = scrape(&http, &proxy.admin_url("/metrics")).await;
        assert_eq!(
            sample(
                &metrics,
                "sso_token_proxy_refresh_token_persisted",
                &[("source", "default")]
            ),
            0.0
        );

        // Tokens issued from now on live an hour: the proxy keeps its
        // sources fresh with or without traffic, so with 2 s tokens it would
        // never stop rotating; after the next rotation it has nothing to
        // refresh for half an hour.
        env.emulator
            .set_access_token_lifetime(Duration::from_secs(3600));
        stop.store(true, Ordering::SeqCst);
        traffic.await.unwrap();
        // A background refresh the last requests started may still reach
        // the emulator: wait until CreateToken calls have stopped for a
        // second (bounded), so what follows happens with no refresh at all.
        let mut last = (env.emulator.counters().create_token, Instant::now());
        harness::poll_until(Duration::from_secs(15), "refreshes to stop", || {
            let now = env.emulator.counters();
            let settled = now.create_token == last.0
                && now.create_token == now.tokens_issued
                && last.1.elapsed() >= Duration::from_secs(1);
            if now.create_token != last.0 {
                last = (now.create_token, Instant::now());
            }
            std::future::ready(settled.then_some(()))
        })
        .await;
        let before_return = env.emulator.counters();
        let stale = saved_refresh_token(&away.join("state.json")).unwrap();
        assert!(
            !env.emulator.is_refresh_token_live(&stale),
            "the file on disk is stale"
        );

        // The directory returns; no request is made from here on.
        std::fs::rename(&away, &state_dir).unwrap();
        let returned = Instant::now();
        harness::poll_until(
            Duration::from_secs(2),
            "the newest refresh token on disk",
            || async {
                saved_refresh_token(&state_file)
                    .filter(|t| env.emulator.is_refresh_token_live(t))
                    .map(|_| ())
            },
        )
        .await;
        eprintln!(
            "on disk {:?} after the directory returned",
            returned.elapsed()
        );
        assert_eq!(
            env.emulator.counters().create_token,
            before_return.create_token
        );
        // The writer marks it written once the directory is synced too.
        let ready = harness::poll_until(
            Duration::from_secs(2),
            "/readyz to say persisted",
            || async {
                let ready = http.get(&proxy.admin_url("/readyz")).await.json();
                (ready["refresh_token_persisted"] == true).then_some(ready)
            },
        )
        .await;
        assert!(ready.get("persist_error").is_none(), "{ready}");
        let log = proxy.stderr();
        assert!(
            log.matches("could not write the newest refresh token")
                .count()
                >= 2,
            "a warning per retry:\n{log}"
        );

        // kill -9, restart: the saved refresh token carries on.
        proxy.child.kill().await.unwrap();
        let restarted = env.start(opts).await;
        let r = http.get(&restarted.url("/after-restart")).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&r.body)
        );

        let counters = env.emulator.counters();
        assert_eq!(failed.load(Ordering::SeqCst), 0, "{counters:?}");
        assert!(ok.load(Ordering::SeqCst) > 50);
        assert_eq!(
            counters.errors_by_kind.get("InvalidGrant"),
            None,
            "{counters:?}"
        );
        let newest = saved_refresh_token(&state_file).unwrap();
        harness::assert_no_secrets(
            "proxy stderr",
            &log,
            &[
                ("configured refresh token", env.refresh_token.as_str()),
                ("client secret", env.client_secret.as_str()),
                ("newest refresh token", newest.as_str()),
            ],
            &[env.client_id.as_str()],
        );
    })
    .await;
}

/// `check-config`, and a plain run, as a user who cannot create files in
/// the state file's directory (root-owned, mode 0755), and with a state
/// file under a regular file: exit 2 naming `token.state_file`. The same
/// checks for an `sso_cache` file's directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_state_directory_is_a_config_error() {
    use std::os::unix::fs::PermissionsExt;
    bounded("unwritable state directory", async {
        let env = Env::new(EmulatorConfig::default()).await;
        // Everything readable by `nobody`; the state directory not writable.
        let shared = tempfile::Builder::new().tempdir_in("/tmp").unwrap();
        std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let readonly = shared.path().join("state");
        std::fs::create_dir(&readonly).unwrap();
        std::fs::set_permissions(&readonly, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cache_file = readonly.join("sso-cache.json");
        std::fs::write(
            &cache_file,
            serde_json::to_vec(&serde_json::json!({
                "accessToken": "a",
                "expiresAt": "2020-01-01T00:00:00Z",
                "refreshToken": "r",
                "clientId": "c",
                "clientSecret": "s",
            }))
            .unwrap(),
        )
        .unwrap();
        std::fs::set_permissions(&cache_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let config_for = |name: &str, token: &str| {
            let text = format!(
                r#"[proxy]
listen = "127.0.0.1:0"
upstream = "{url}"
[admin]
listen = "127.0.0.1:0"
[oidc]
endpoint = "{url}"
client_id = "c"
client_secret = "s"
[token]
{token}
"#,
                url = env.emulator.url()
            );
            let path = shared.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            path
        };
        let as_nobody = |args: &'static [&'static str], config: std::path::PathBuf| async move {
            let child = tokio::process::Command::new("setpriv")
                .args([
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    harness::BIN,
                ])
                .args(args)
                .arg("--config")
                .arg(&config)
                .env("RUST_LOG", "error")
                .env_remove("RUST_BACKTRACE")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("run setpriv");
            let out = timeout(Duration::from_secs(20), child.wait_with_output())
                .await
                .unwrap_or_else(|_| panic!("{args:?} did not exit within 20 s"))
                .unwrap();
            (
                out.status,
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let refresh = config_for(
            "refresh.toml",
            &format!(
                "source = \"refresh_token\"\nrefresh_token = \"r\"\nstate_file = \"{}\"",
                readonly.join("state.json").display()
            ),
        );
        let sso = config_for(
            "sso.toml",
            &format!(
                "source = \"sso_cache\"\nsso_cache_file = \"{}\"",
                cache_file.display()
            ),
        );
        for (config, key) in [
            (&refresh, "token.state_file"),
            (&sso, "token.sso_cache_file"),
        ] {
            for args in [&["check-config", "--no-bind-check"][..], &[][..]] {
                let (status, stderr) = as_nobody(args, config.clone()).await;
                assert_eq!(status.code(), Some(2), "{args:?} {key}: {stderr}");
                let line = format!(
                    "{}: {key}: cannot create files in {}",
                    config.display(),
                    readonly.display()
                );
                assert!(stderr.contains(&line), "{args:?}: {stderr}");
                assert!(!stderr.contains("panicked"), "{stderr}");
            }
        }
        // Root may write there: the same configs pass.
        let (status, stdout, stderr) = harness::run_binary(
            &["check-config", "--no-bind-check"],
            &refresh,
            "error",
            Duration::from_secs(20),
        )
        .await;
        assert!(status.success(), "{stdout}{stderr}");

        // A state file under a regular file: no directory at all.
        let regular = env.write("regular-file", "x");
        let under_file = config_for(
            "under-file.toml",
            &format!(
                "source = \"refresh_token\"\nrefresh_token = \"r\"\nstate_file = \"{}\"",
                regular.join("state.json").display()
            ),
        );
        let (status, _, stderr) = harness::run_binary(
            &["check-config", "--no-bind-check"],
            &under_file,
            "error",
            Duration::from_secs(20),
        )
        .await;
        assert_eq!(status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&format!("{}: token.state_file: ", under_file.display())),
            "{stderr}"
        );
    })
    .await;
}

/// Issue 13: durations have ranges; absurd values exit 2 with one
/// `FILE: key: reason` line each, at `check-config` and at start, and never
/// reach a clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_durations_exit_2_naming_each_key() {
    bounded("absurd durations", async {
        let env = Env::new(EmulatorConfig::default()).await;
        let opts = Opts {
            proxy: "idle_timeout = \"10000d\"\nupstream_response_timeout = \"100000000d\"\n"
                .to_owned(),
            token: "refresh_before_expiry = \"1000d\"\nexpiry_margin = \"584942417355y\"\n"
                .to_owned(),
            retry: "max_delay = \"20000d\"\n".to_owned(),
            ..Opts::default()
        };
        let text = env.config_text(harness::free_addr(), harness::free_addr(), &opts);
        let config = env.write("absurd.toml", &text);
        for args in [&["check-config", "--no-bind-check"][..], &[][..]] {
            let (status, _, stderr) =
                harness::run_binary(args, &config, "error", Duration::from_secs(20)).await;
            assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
            for key in [
                "proxy.idle_timeout",
                "proxy.upstream_response_timeout",
                "token.refresh_before_expiry",
                "token.expiry_margin",
                "retry.max_delay",
            ] {
                assert!(
                    stderr.contains(&format!("{}: {key}: ", config.display())),
                    "{args:?} {key}: {stderr}"
                );
            }
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    })
    .await;
}
