//! Headless device login (`device_login = true`): the `sso-token-proxy`
//! binary runs the device flow itself against the in-process emulator,
//! shows the verification URI and user code at `GET /login` and in
//! `/readyz`, and serves once someone approves through the emulator's
//! approval endpoint. With `[store] kind = "redis"` three replicas share one
//! device flow.
//!
//! Processes cannot share a paused clock, so time is real: the emulator
//! asks for a 1 s poll interval and every wait is an event polled with a
//! deadline.

#[allow(dead_code)]
#[path = "support/binary_harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "support/redis.rs"]
mod redis_support;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use harness::{BIN, Http, Resp, assert_no_secrets, free_addr, full};
use http::{Request, StatusCode};
use redis_support::RedisServer;
use sso_token_proxy::emulator::{Emulator, EmulatorConfig, EmulatorHandle};
use tokio::process::{Child, Command};

const START_URL: &str = "https://example-org.awsapps.com/start";

/// One `sso-token-proxy` process with its ports and log.
struct Proxy {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    stderr_path: PathBuf,
}

impl Proxy {
    /// Writes `config(listen, admin)` to `dir/name.toml` and starts the
    /// binary on it.
    fn spawn(dir: &Path, name: &str, config: impl Fn(SocketAddr, SocketAddr) -> String) -> Self {
        let (addr, admin) = (free_addr(), free_addr());
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config(addr, admin)).unwrap();
        let stderr_path = dir.join(format!("{name}.stderr"));
        let child = Command::new(BIN)
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "debug")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&stderr_path).unwrap()))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn sso-token-proxy");
        Self {
            child,
            addr,
            admin,
            stderr_path,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `GET` on the admin listener; `None` while it does not answer (or
    /// panics with the log when the process ended).
    async fn admin_get(&mut self, http: &Http, path: &str) -> Option<Resp> {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("sso-token-proxy exited with {status}:\n{}", self.stderr());
        }
        tokio::time::timeout(Duration::from_secs(5), http.try_get(&self.admin_url(path)))
            .await
            .ok()?
            .ok()
    }

    /// Waits until `/login` shows a prompt and returns `/login`'s JSON.
    async fn wait_for_prompt(&mut self, http: &Http) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(resp) = self.admin_get(http, "/login").await
                && resp.status == StatusCode::OK
            {
                let body = resp.json();
                if body["sources"]["default"]["state"] == "waiting_for_approval" {
                    return body;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no login prompt within 30 s:\n{}",
                self.stderr()
            );
            tokio::time::sleep(harness::STEP).await;
        }
    }

    /// Waits until `/readyz` answers 200.
    async fn wait_ready(&mut self, http: &Http, limit: Duration) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(resp) = self.admin_get(http, "/readyz").await
                && resp.status == StatusCode::OK
            {
                return resp.json();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not ready within {limit:?}:\n{}",
                self.stderr()
            );
            tokio::time::sleep(harness::STEP).await;
        }
    }
}

async fn emulator() -> EmulatorHandle {
    Emulator::start(EmulatorConfig {
        device_poll_interval: Duration::from_secs(1),
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator starts")
}

/// A proxy whose one source logs in by itself; no client, no refresh
/// token configured. `extra` goes at the end (e.g. `[store]`).
fn login_config(
    emulator: &EmulatorHandle,
    state_file: &Path,
    listen: SocketAddr,
    admin: SocketAddr,
    extra: &str,
) -> String {
    let url = emulator.url();
    format!(
        r#"[proxy]
listen = "{listen}"
upstream = "{url}"
shutdown_grace = "2s"
[admin]
listen = "{admin}"
[oidc]
endpoint = "{url}"
region = "us-east-1"
[token]
source = "refresh_token"
device_login = true
start_url = "{START_URL}"
state_file = "{state}"
[retry]
base_delay = "50ms"
{extra}"#,
        state = state_file.display(),
    )
}

/// Approves `user_code` the way a person's browser does: the emulator's
/// approval endpoint.
async fn approve(http: &Http, emulator: &EmulatorHandle, user_code: &str) {
    let resp = http
        .send(
            Request::post(format!("{}/_emulator/device/approve", emulator.url()))
                .header("content-type", "application/json")
                .body(full(
                    serde_json::json!({ "user_code": user_code }).to_string(),
                ))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::OK, "{:?}", resp.body);
}

/// Every device code the emulator issued, as `assert_no_secrets` takes
/// them.
fn device_codes(emulator: &EmulatorHandle) -> Vec<String> {
    let codes: Vec<String> = emulator
        .device_codes()
        .iter()
        .map(|c| c.expose().to_owned())
        .collect();
    assert!(!codes.is_empty(), "the emulator issued no device code");
    codes
}

fn assert_no_device_code(what: &str, text: &str, codes: &[String]) {
    let secrets: Vec<(&str, &str)> = codes.iter().map(|c| ("device code", c.as_str())).collect();
    assert_no_secrets(what, text, &secrets, &[]);
}

/// One replica, nothing configured but the start URL: it registers a
/// client, starts one device authorization, shows it at `/login` and in
/// `/readyz` (503) and the log, and serves once it is approved: the state
/// file holds the tokens, the upstream gets a live token. The device code
/// appears nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_logs_in_through_the_device_flow() {
    let emulator = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("state").join("state.json");
    let mut proxy = Proxy::spawn(dir.path(), "proxy", |listen, admin| {
        login_config(&emulator, &state_file, listen, admin, "")
    });
    let http = Http::new();

    let login = proxy.wait_for_prompt(&http).await;
    assert_eq!(login["login_required"], true, "{login}");
    let prompt = &login["sources"]["default"];
    let user_code = prompt["user_code"].as_str().unwrap().to_owned();
    let verification = prompt["verification_uri"].as_str().unwrap();
    assert_eq!(verification, format!("{}/_emulator/device", emulator.url()));
    assert_eq!(
        prompt["verification_uri_complete"],
        format!("{verification}?user_code={user_code}")
    );
    assert_eq!(prompt["polled_by_this_replica"], true);
    assert!(
        prompt["expires_in_seconds"].as_u64().unwrap() > 500,
        "{login}"
    );

    // Not ready, and saying why; requests are refused without a token.
    let readyz = proxy.admin_get(&http, "/readyz").await.unwrap();
    assert_eq!(readyz.status, StatusCode::SERVICE_UNAVAILABLE);
    let readyz_body = readyz.json();
    assert_eq!(readyz_body["reason"], "login_required", "{readyz_body}");
    assert_eq!(readyz_body["user_code"], user_code.as_str());
    assert_eq!(readyz_body["sources"]["default"]["needs_login"], true);
    let refused = http.get(&proxy.url("/anything")).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        refused.json()["kind"],
        "LoginRequired",
        "{:?}",
        refused.body
    );

    // A browser gets a page with the link and the code.
    let page = http
        .send(
            Request::get(proxy.admin_url("/login"))
                .header("accept", "text/html,application/xhtml+xml")
                .body(harness::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let html = String::from_utf8_lossy(&page.body).into_owned();
    assert!(html.contains(&user_code), "{html}");
    assert!(html.contains(&format!("{verification}?user_code={user_code}")));

    let counters = emulator.counters();
    assert_eq!(counters.register_client, 1, "{counters:?}");
    assert_eq!(counters.start_device_authorization, 1, "{counters:?}");

    approve(&http, &emulator, &user_code).await;
    let ready = proxy.wait_ready(&http, Duration::from_secs(30)).await;
    assert_eq!(ready["sources"]["default"]["needs_login"], false, "{ready}");
    assert_eq!(ready["refresh_token_persisted"], true, "{ready}");

    // The upstream (the emulator's echo resource) accepts the token.
    let before = emulator.counters().echo_authorized;
    let served = http.get(&proxy.url("/anything")).await;
    assert_eq!(served.status, StatusCode::OK, "{:?}", served.body);
    assert_eq!(emulator.counters().echo_authorized, before + 1);

    // The tokens are on disk (with the registered client) like a rotation.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    for key in ["refreshToken", "accessToken", "clientId", "clientSecret"] {
        assert!(state[key].is_string(), "{key} missing from the state file");
    }
    assert!(emulator.is_refresh_token_live(state["refreshToken"].as_str().unwrap()));

    // `/login` is idle again; still exactly one device authorization.
    let login = proxy.admin_get(&http, "/login").await.unwrap().json();
    assert_eq!(login["login_required"], false, "{login}");
    assert_eq!(login["sources"]["default"]["state"], "idle");
    let counters = emulator.counters();
    assert_eq!(counters.start_device_authorization, 1, "{counters:?}");
    assert_eq!(counters.register_client, 1, "{counters:?}");
    // Polled at the interval the emulator asked for: never too fast.
    assert_eq!(
        counters.errors_by_kind.get("SlowDown"),
        None,
        "{counters:?}"
    );

    // The log showed the prompt, never the device code.
    let log = proxy.stderr();
    assert!(log.contains(&user_code), "the log shows the user code");
    let codes = device_codes(&emulator);
    assert_no_device_code("stderr", &log, &codes);
    assert_no_device_code("/login", &login.to_string(), &codes);
    assert_no_device_code("/readyz", &readyz_body.to_string(), &codes);
    assert_no_device_code("/login page", &html, &codes);
}

// === three replicas, one Redis ===

/// `n` replicas sharing `redis`, each with its own state file.
fn start_replicas(
    emulator: &EmulatorHandle,
    redis: &RedisServer,
    dir: &Path,
    n: usize,
    lock_lease: &str,
) -> Vec<Proxy> {
    let store = format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\nkey_prefix = \"device-login-test:\"\nlock_lease = \"{lock_lease}\"\n",
        redis.url()
    );
    (0..n)
        .map(|i| {
            let state_file = dir.join(format!("state-{i}.json"));
            Proxy::spawn(dir, &format!("replica-{i}"), |listen, admin| {
                login_config(emulator, &state_file, listen, admin, &store)
            })
        })
        .collect()
}

/// Waits until every replica shows the same prompt; returns its user code
/// and the index of the replica that polls for it.
async fn shared_prompt(http: &Http, replicas: &mut [Proxy]) -> (String, usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut prompts = Vec::new();
        for r in replicas.iter_mut() {
            let login = r.wait_for_prompt(http).await;
            let source = &login["sources"]["default"];
            prompts.push((
                source["user_code"].as_str().unwrap().to_owned(),
                source["polled_by_this_replica"] == true,
            ));
        }
        let code = &prompts[0].0;
        let holders: Vec<usize> = (0..prompts.len()).filter(|&i| prompts[i].1).collect();
        if prompts.iter().all(|(c, _)| c == code) && holders.len() == 1 {
            return (code.clone(), holders[0]);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replicas never agreed on one prompt: {prompts:?}"
        );
        tokio::time::sleep(harness::STEP).await;
    }
}

/// Issue 15's acceptance test: three replicas share one Redis store and
/// have no refresh token. Exactly one device flow runs (one RegisterClient,
/// one StartDeviceAuthorization), every replica shows its prompt and is not
/// ready; one approval through the emulator's approval endpoint makes all
/// three ready and serving with the token the holder stored in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_device_login_through_redis() {
    let redis = RedisServer::start();
    let emulator = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let mut replicas = start_replicas(&emulator, &redis, dir.path(), 3, "15s");
    let http = Http::new();

    let (user_code, holder) = shared_prompt(&http, &mut replicas).await;
    for r in replicas.iter_mut() {
        let readyz = r.admin_get(&http, "/readyz").await.unwrap();
        assert_eq!(readyz.status, StatusCode::SERVICE_UNAVAILABLE);
        let body = readyz.json();
        assert_eq!(body["reason"], "login_required", "{body}");
        assert_eq!(body["user_code"], user_code.as_str(), "{body}");
    }
    let counters = emulator.counters();
    assert_eq!(counters.start_device_authorization, 1, "{counters:?}");
    assert_eq!(counters.register_client, 1, "{counters:?}");

    approve(&http, &emulator, &user_code).await;
    for r in replicas.iter_mut() {
        r.wait_ready(&http, Duration::from_secs(30)).await;
    }
    let before = emulator.counters().echo_authorized;
    for r in &replicas {
        let served = http.get(&r.url("/anything")).await;
        assert_eq!(served.status, StatusCode::OK, "{:?}", served.body);
    }
    let counters = emulator.counters();
    assert_eq!(counters.echo_authorized, before + 3, "{counters:?}");
    assert_eq!(counters.start_device_authorization, 1, "{counters:?}");
    assert_eq!(counters.register_client, 1, "{counters:?}");
    // One approved device code redeemed once: one token for all.
    assert_eq!(counters.tokens_issued, 1, "{counters:?}");

    // Every replica keeps the shared refresh token in its state file.
    let refresh_tokens: Vec<String> = (0..3)
        .map(|i| {
            let path = dir.path().join(format!("state-{i}.json"));
            let state: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            state["refreshToken"].as_str().unwrap().to_owned()
        })
        .collect();
    assert!(refresh_tokens.iter().all(|t| t == &refresh_tokens[0]));
    assert!(emulator.is_refresh_token_live(&refresh_tokens[0]));

    let codes = device_codes(&emulator);
    for (i, r) in replicas.iter().enumerate() {
        let log = r.stderr();
        assert_no_device_code(&format!("replica {i} stderr"), &log, &codes);
        if i == holder {
            assert!(log.contains("took the fleet's login lock"), "{log}");
        } else {
            assert!(
                log.contains("another replica completed the device login"),
                "{log}"
            );
        }
    }
}

/// The replica running the device flow dies before anyone approves: its
/// login lock's lease runs out, another replica starts a device
/// authorization of its own, and approving that one makes the survivors
/// ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replica_takes_over_the_login_when_the_holder_dies() {
    let redis = RedisServer::start();
    let emulator = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let mut replicas = start_replicas(&emulator, &redis, dir.path(), 2, "3s");
    let http = Http::new();

    let (first_code, holder) = shared_prompt(&http, &mut replicas).await;
    let mut dead = replicas.remove(holder);
    dead.child.start_kill().unwrap();
    dead.child.wait().await.unwrap();
    let survivor = &mut replicas[0];

    // The survivor takes over with a new device authorization.
    let second_code = harness::poll_until(Duration::from_secs(30), "a new prompt", || {
        let http = http.clone();
        let url = survivor.admin_url("/login");
        let first = first_code.clone();
        async move {
            let login = http.try_get(&url).await.ok()?.json();
            let source = &login["sources"]["default"];
            let code = source["user_code"].as_str()?;
            (source["polled_by_this_replica"] == true && code != first).then(|| code.to_owned())
        }
    })
    .await;
    assert_eq!(emulator.counters().start_device_authorization, 2);
    // The dead replica's code is no use to anyone now; the new one is.
    approve(&http, &emulator, &second_code).await;
    survivor.wait_ready(&http, Duration::from_secs(30)).await;
    let served = http.get(&survivor.url("/anything")).await;
    assert_eq!(served.status, StatusCode::OK);
    let counters = emulator.counters();
    assert_eq!(counters.start_device_authorization, 2, "{counters:?}");
    assert_eq!(
        counters.register_client, 1,
        "the registration is reused: {counters:?}"
    );
    assert_no_device_code(
        "survivor stderr",
        &survivor.stderr(),
        &device_codes(&emulator),
    );
}
