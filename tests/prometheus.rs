//! The alert rules in `deploy/monitoring/alerts.yaml`, unchanged, in a real
//! `prometheus` scraping the real `sso-token-proxy` binary (emulator
//! upstream, 30-second tokens): every rule evaluates without error; after
//! the emulator revokes the refresh token, SsoTokenProxyNeedsLogin goes
//! pending, then firing, seen through Prometheus's HTTP API; after a new
//! login (a new refresh token in `refresh_token_file` and `SIGHUP`) it
//! resolves.
//!
//! Needs `prometheus` on `PATH` (`bash scripts/test.sh` installs Debian's
//! package); without it the test fails and says so. Scrape and evaluation
//! run every second; the alert's `for` is the shipped one minute, so the
//! test takes about two minutes and is bounded to six.

#[allow(dead_code)]
#[path = "support/binary_harness.rs"]
mod harness;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use http::{Request, StatusCode};
use serde_json::{Value, json};
use sso_token_proxy::emulator::EmulatorConfig;
use tokio::{
    process::{Child, Command},
    time::{Instant, sleep, timeout},
};

use harness::{Env, Http, Opts, free_addr, full, poll_until};

/// The whole test's limit.
const LIMIT: Duration = Duration::from_secs(360);
const ALERT: &str = "SsoTokenProxyNeedsLogin";

/// `prometheus` on `PATH`, or a failure that says how to get it.
fn prometheus_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("prometheus"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`prometheus` is not on PATH: run `bash scripts/test.sh`, which installs \
                 Debian's prometheus package (or `apt-get install prometheus`)"
            )
        })
}

/// A running Prometheus; killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus with a 1 s scrape of `target` (the proxy's admin
    /// listener) and a 1 s rule evaluation of `rules`; waits until ready.
    async fn start(dir: &Path, target: &str, rules: &Path) -> Self {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: sso-token-proxy\n    static_configs:\n      - targets: ['{target}']\n",
                rules = rules.display(),
            ),
        )
        .unwrap();
        for attempt in 0..5 {
            let listen = free_addr();
            let log = dir.join(format!("prometheus-{attempt}.log"));
            let child = Command::new(prometheus_binary())
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join(format!("data-{attempt}")).display()
                ))
                .arg(format!("--web.listen-address={listen}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
                .kill_on_drop(true)
                .spawn()
                .expect("spawn prometheus");
            let mut prometheus = Self {
                child,
                url: format!("http://{listen}"),
                log,
            };
            match prometheus.wait_ready().await {
                Ok(()) => return prometheus,
                Err(text) => assert!(
                    text.contains("address already in use") && attempt < 4,
                    "prometheus exited early:\n{text}"
                ),
            }
        }
        unreachable!("the loop returns or panics")
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let http = Http::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.child.try_wait().unwrap().is_some() {
                return Err(self.log());
            }
            if let Ok(Ok(r)) = timeout(
                Duration::from_secs(2),
                http.try_get(&format!("{}/-/ready", self.url)),
            )
            .await
                && r.status == StatusCode::OK
            {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready within 60 s:\n{}",
                self.log()
            );
            sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `data` of a successful API answer at `path`.
    async fn api(&self, path: &str) -> Value {
        let r = Http::new().get(&format!("{}{path}", self.url)).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {:?}", r.body);
        let body = r.json();
        assert_eq!(body["status"], "success", "{path}: {body}");
        body["data"].clone()
    }

    /// The value of an instant query that yields one sample, if it does.
    async fn query_one(&self, promql: &str) -> Option<f64> {
        let data = self
            .api(&format!("/api/v1/query?query={}", encode(promql)))
            .await;
        match data["result"].as_array().map(Vec::as_slice) {
            Some([sample]) => sample["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }

    /// The alerts named `name`, pending or firing.
    async fn alerts(&self, name: &str) -> Vec<Value> {
        let data = self.api("/api/v1/alerts").await;
        data["alerts"]
            .as_array()
            .expect("alerts list")
            .iter()
            .filter(|a| a["labels"]["alertname"] == name)
            .cloned()
            .collect()
    }
}

/// Percent-encodes a query parameter value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn sighup(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -HUP {pid} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn needs_login_alert_fires_in_prometheus_after_a_revocation_and_resolves_after_a_login() {
    prometheus_binary(); // fail at once, before anything starts, when it is missing
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/monitoring/alerts.yaml");
    let env = Env::new(EmulatorConfig {
        access_token_lifetime: Duration::from_secs(30),
        ..EmulatorConfig::default()
    })
    .await;
    let proxy = env.start(Opts::default()).await;
    let prometheus = Prometheus::start(env.dir.path(), &proxy.admin.to_string(), &rules).await;
    let instance = proxy.admin.to_string();

    // Requests keep flowing, so the proxy keeps refreshing its short-lived
    // tokens (it refreshes on demand).
    let traffic = {
        let url = proxy.url("/traffic");
        tokio::spawn(async move {
            let http = Http::new();
            loop {
                let _ = timeout(Duration::from_secs(2), http.try_get(&url)).await;
                sleep(Duration::from_millis(200)).await;
            }
        })
    };

    let result = timeout(LIMIT, async {
        // Scraped: a valid token, no login needed.
        let selector = format!("{{job=\"sso-token-proxy\",instance=\"{instance}\",source=\"default\"}}");
        poll_until(Duration::from_secs(60), "a scraped valid token", || {
            let q = format!("sso_token_proxy_token_valid{selector}");
            let p = &prometheus;
            async move { (p.query_one(&q).await == Some(1.0)).then_some(()) }
        })
        .await;
        assert_eq!(
            prometheus.query_one(&format!("sso_token_proxy_needs_login{selector}")).await,
            Some(0.0)
        );

        // Prometheus loaded every rule and evaluates each without error.
        let groups = poll_until(Duration::from_secs(60), "every rule evaluated", || {
            let p = &prometheus;
            async move {
                let groups = p.api("/api/v1/rules").await["groups"].clone();
                let rules: Vec<&Value> = groups
                    .as_array()?
                    .iter()
                    .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                    .collect();
                let errors: Vec<String> = rules
                    .iter()
                    .filter(|r| r["health"] == "err")
                    .map(|r| format!("{}: {}", r["name"], r["lastError"]))
                    .collect();
                assert!(errors.is_empty(), "rules failing in Prometheus: {errors:?}");
                rules.iter().all(|r| r["health"] == "ok").then_some(groups.clone())
            }
        })
        .await;
        let names: Vec<&str> = groups
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .filter_map(|r| r["name"].as_str())
            .collect();
        assert!(names.contains(&ALERT), "{ALERT} not loaded: {names:?}");
        assert!(names.len() >= 15, "only {} rules loaded: {names:?}", names.len());
        assert!(prometheus.alerts(ALERT).await.is_empty(), "{ALERT} before any revocation");

        // Revoke every refresh token in the emulator.
        let http = Http::new();
        let r = http
            .send(
                Request::post(format!("{}/_emulator/revoke_refresh_tokens", env.emulator.url()))
                    .body(full("{}"))
                    .unwrap(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.json()["revoked"].as_u64().unwrap() >= 1, "{:?}", r.json());
        let revoked_at = Instant::now();

        // Pending first (for: 1m), then firing.
        let pending_seen = AtomicBool::new(false);
        let firing = poll_until(Duration::from_secs(180), "the alert firing", || {
            let p = &prometheus;
            let pending_seen = &pending_seen;
            async move {
                let alerts = p.alerts(ALERT).await;
                let alert = alerts.first()?;
                if alert["state"] == "pending" {
                    pending_seen.store(true, Ordering::Relaxed);
                }
                (alert["state"] == "firing").then(|| alert.clone())
            }
        })
        .await;
        assert!(pending_seen.into_inner(), "{ALERT} fired without being pending first");
        assert!(
            revoked_at.elapsed() >= Duration::from_secs(60),
            "fired after {:?}, before its `for: 1m`",
            revoked_at.elapsed()
        );
        assert_eq!(firing["labels"]["source"], "default", "{firing}");
        assert_eq!(firing["labels"]["severity"], "critical", "{firing}");
        assert_eq!(firing["labels"]["instance"], instance.as_str(), "{firing}");
        assert!(
            firing["annotations"]["runbook_url"]
                .as_str()
                .is_some_and(|u| u.ends_with("docs/runbook.md#ssotokenproxyneedslogin")),
            "{firing}"
        );
        let fetches = format!(
            "sum(sso_token_proxy_token_fetches_total{{instance=\"{instance}\",outcome=\"fatal\",kind=\"InvalidGrant\"}})"
        );
        assert!(prometheus.query_one(&fetches).await.is_some_and(|n| n >= 1.0));

        // A new login: the operator puts a new refresh token in the secret
        // file (atomically, as a Kubernetes Secret update does) and sends
        // SIGHUP.
        let r = http
            .send(
                Request::post(format!("{}/_emulator/refresh_tokens", env.emulator.url()))
                    .body(full(json!({"client_id": env.client_id}).to_string()))
                    .unwrap(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        let new_refresh_token = r.json()["refreshToken"].as_str().unwrap().to_owned();
        let staged = env.write("refresh_token.new", &format!("{new_refresh_token}\n"));
        std::fs::rename(staged, env.path("refresh_token")).unwrap();
        sighup(proxy.child.id().expect("proxy running"));

        poll_until(Duration::from_secs(90), "the alert resolved", || {
            let p = &prometheus;
            async move { p.alerts(ALERT).await.is_empty().then_some(()) }
        })
        .await;
        assert_eq!(
            prometheus.query_one(&format!("sso_token_proxy_needs_login{selector}")).await,
            Some(0.0)
        );
        assert_eq!(
            prometheus.query_one(&format!("sso_token_proxy_token_valid{selector}")).await,
            Some(1.0)
        );
    })
    .await;
    traffic.abort();
    if result.is_err() {
        panic!(
            "test did not finish within {LIMIT:?}\nproxy stderr:\n{}\nprometheus log:\n{}",
            proxy.stderr(),
            prometheus.log()
        );
    }
}
