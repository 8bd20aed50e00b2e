//! Token sinks (`[[sink]]`) through the real `sso-token-proxy` binary
//! against an in-process emulator issuing short-lived tokens: files
//! rewritten on every refresh with no request at all, never torn for a
//! reader polling them, read by botocore's `SSOTokenProvider`, and removed,
//! kept or expired on SIGTERM.
//!
//! Every test has its own emulator on 127.0.0.1:0, its own temp dir and
//! ports, and bounds every wait.

#[allow(dead_code)]
#[path = "support/binary_harness.rs"]
mod harness;

use std::{
    collections::BTreeSet,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use http::StatusCode;
use sha2::{Digest as _, Sha256};
use sso_token_proxy::{emulator::EmulatorConfig, token::parse_expires_at};
use tokio::time::timeout;

use harness::{Env, Http, Opts, poll_until};

/// The test's overall limit.
const LIMIT: Duration = Duration::from_secs(120);

async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: test did not finish within {LIMIT:?}"))
}

/// An emulator issuing tokens that live `secs` seconds (with
/// refresh-token rotation).
fn short_tokens(secs: u64) -> EmulatorConfig {
    EmulatorConfig {
        access_token_lifetime: Duration::from_secs(secs),
        ..Default::default()
    }
}

/// What a poller made of a sink file.
#[derive(Debug, Default)]
struct Observed {
    /// Reads that found the file.
    reads: u64,
    /// Reads that could not be parsed, or found no file after a first one.
    failures: Vec<String>,
    /// The distinct tokens read, in order.
    tokens: Vec<String>,
}

/// The file formats a test polls.
#[derive(Debug, Clone, Copy)]
enum Format {
    Raw,
    Json,
    SsoCache,
}

/// Parses one read of a sink file: the token, and what is wrong with it.
fn parse(format: Format, bytes: &[u8], read_at: SystemTime) -> Result<String, String> {
    let token = match format {
        Format::Raw => {
            let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned())?;
            if text.is_empty() || text.contains(char::is_whitespace) {
                return Err(format!("not a bare token ({} bytes)", text.len()));
            }
            return Ok(text.to_owned());
        }
        Format::Json | Format::SsoCache => {
            let v: serde_json::Value = serde_json::from_slice(bytes)
                .map_err(|e| format!("torn JSON ({} bytes): {e}", bytes.len()))?;
            let token = v["accessToken"]
                .as_str()
                .filter(|t| !t.is_empty())
                .ok_or("no accessToken")?
                .to_owned();
            let expires = v["expiresAt"].as_str().ok_or("no expiresAt")?;
            let expires = parse_expires_at(expires)?;
            // `expiresAt` is written in whole seconds, rounded down.
            if expires + Duration::from_secs(1) <= read_at {
                return Err(format!("an expired token ({expires:?} at {read_at:?})"));
            }
            if let Format::SsoCache = format {
                for key in ["refreshToken", "clientSecret", "clientId"] {
                    if v.get(key).is_some() {
                        return Err(format!("holds {key}"));
                    }
                }
                v["startUrl"].as_str().ok_or("no startUrl")?;
            }
            token
        }
    };
    Ok(token)
}

/// Polls `path` in a tight loop on a thread until `stop`.
fn poll_file(path: PathBuf, format: Format, stop: Arc<AtomicBool>) -> JoinHandle<Observed> {
    std::thread::spawn(move || {
        let mut seen = Observed::default();
        while !stop.load(Ordering::Relaxed) {
            let read_at = SystemTime::now();
            match std::fs::read(&path) {
                Ok(bytes) => {
                    seen.reads += 1;
                    match parse(format, &bytes, read_at) {
                        Ok(token) => {
                            if seen.tokens.last() != Some(&token) {
                                seen.tokens.push(token);
                            }
                        }
                        Err(e) => seen.failures.push(e),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && seen.reads == 0 => {}
                Err(e) => seen.failures.push(format!("read: {e}")),
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        seen
    })
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Acceptance (issue 15): with three-second tokens and no request at all,
/// each sink file is rewritten on every refresh; a reader polling it during
/// the rotations always parses it, always finds an unexpired token, and
/// sees every token the emulator issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_files_follow_every_refresh_and_are_never_torn() {
    bounded("sinks follow refreshes", async {
        let env = Env::new(short_tokens(3)).await;
        let (raw, json, sso) = (
            env.path("token"),
            env.path("token.json"),
            env.path("sso.json"),
        );
        let opts = Opts {
            extra: format!(
                "[[sink]]\npath = \"{}\"\nmode = \"0640\"\n\
                 [[sink]]\npath = \"{}\"\nformat = \"json\"\n\
                 [[sink]]\npath = \"{}\"\nformat = \"sso_cache\"\n\
                 start_url = \"https://example.awsapps.com/start\"\n",
                raw.display(),
                json.display(),
                sso.display()
            ),
            ..Opts::default()
        };
        let stop = Arc::new(AtomicBool::new(false));
        let pollers = [
            poll_file(raw.clone(), Format::Raw, stop.clone()),
            poll_file(json.clone(), Format::Json, stop.clone()),
            poll_file(sso.clone(), Format::SsoCache, stop.clone()),
        ];
        let proxy = env.start(opts).await;
        let http = Http::new();
        // Ready once every sink holds a token.
        let ready = poll_until(Duration::from_secs(20), "/readyz 200", || {
            let (http, url) = (http.clone(), proxy.admin_url("/readyz"));
            async move { Some(http.get(&url).await).filter(|r| r.status == StatusCode::OK) }
        })
        .await
        .json();
        let sinks = ready["sinks"].as_array().expect("sinks in /readyz");
        assert_eq!(sinks.len(), 3, "{ready}");
        assert!(sinks.iter().all(|s| s["written"] == true), "{ready}");

        // About six refreshes (3 s tokens are refreshed every 1.5 s).
        tokio::time::sleep(Duration::from_secs(9)).await;
        let issued_before_stop = env.emulator.counters().tokens_issued;
        stop.store(true, Ordering::Relaxed);
        let observed: [Observed; 3] = pollers.map(|p| p.join().expect("poller"));
        let counters = env.emulator.counters();

        for (name, seen) in ["raw", "json", "sso_cache"].iter().zip(&observed) {
            assert!(
                seen.failures.is_empty(),
                "{name}: {} of {} reads failed, e.g. {:?}",
                seen.failures.len(),
                seen.reads,
                seen.failures.first()
            );
            assert!(seen.reads > 500, "{name}: only {} reads", seen.reads);
            // Every token issued before the pollers stopped was in the
            // file (the last one may still have been on its way).
            let distinct: BTreeSet<_> = seen.tokens.iter().collect();
            assert_eq!(
                distinct.len(),
                seen.tokens.len(),
                "{name}: a token came back"
            );
            assert!(
                seen.tokens.len() as u64 + 1 >= issued_before_stop
                    && seen.tokens.len() as u64 <= counters.tokens_issued,
                "{name}: {} tokens read, {issued_before_stop} issued ({counters:?})",
                seen.tokens.len()
            );
            assert!(
                seen.tokens.len() >= 4,
                "{name}: {:?} tokens",
                seen.tokens.len()
            );
        }
        // The three files carried the same tokens (a poller that stopped
        // last may have seen one more).
        for other in &observed[1..] {
            let (a, b) = (&observed[0].tokens, &other.tokens);
            let common = a.len().min(b.len());
            assert_eq!(a[..common], b[..common]);
            assert!(a.len().abs_diff(b.len()) <= 1);
        }
        // Only the keeper drove refreshes: no request reached the proxy.
        assert_eq!(counters.echo_authorized + counters.echo_unauthorized, 0);
        assert!(counters.errors_by_kind.is_empty(), "{counters:?}");
        // What the file holds now is a live token.
        let now = std::fs::read_to_string(&raw).unwrap();
        assert!(env.emulator.is_access_token_live(&now));
        assert_eq!(
            std::fs::metadata(&raw).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(
            std::fs::metadata(&json).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temp file is left behind once the proxy has stopped (while it
        // runs, a write of the state file or a sink may be under way).
        let mut proxy = proxy;
        proxy.sigterm();
        assert!(proxy.wait_exit(Duration::from_secs(20)).await.success());
        let names: Vec<String> = std::fs::read_dir(env.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
        drop(proxy);
    })
    .await;
}

/// Acceptance (issue 15): botocore's `SSOTokenProvider`, configured with an
/// `sso-session`, reads the sink written in the AWS SSO cache format (under
/// the AWS CLI's file name) and gets each new token as the proxy refreshes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn botocore_reads_the_sso_cache_sink() {
    bounded("botocore reads the sink", async {
        let probe = std::process::Command::new("python3")
            .args(["-c", "import botocore"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        assert!(
            probe.is_ok_and(|s| s.success()),
            "python3 cannot import botocore: run `bash scripts/test.sh` (installs boto3)"
        );
        // Four-second tokens: a new one every two seconds.
        let env = Env::new(short_tokens(4)).await;
        let home = env.path("home");
        std::fs::create_dir_all(home.join(".aws")).unwrap();
        let start_url = "https://example.awsapps.com/start";
        std::fs::write(
            home.join(".aws/config"),
            format!(
                "[profile sinktest]\nsso_session = team\n\n\
                 [sso-session team]\nsso_start_url = {start_url}\nsso_region = us-east-1\n"
            ),
        )
        .unwrap();
        let cache_dir = home.join(".aws/sso/cache");
        let opts = Opts {
            extra: format!(
                "[[sink]]\nformat = \"sso_cache\"\nstart_url = \"{start_url}\"\n\
                 region = \"us-east-1\"\nsession_name = \"team\"\ncache_dir = \"{}\"\n",
                cache_dir.display()
            ),
            ..Opts::default()
        };
        let proxy = env.start(opts).await;
        // The AWS CLI's name: SHA-1 of the session name.
        let file = cache_dir.join(format!("{}.json", sha1_hex("team")));
        let stop = Arc::new(AtomicBool::new(false));
        let poller = poll_file(file.clone(), Format::SsoCache, stop.clone());

        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fidelity/botocore_sso_sink.py"
        );
        let out = timeout(
            Duration::from_secs(90),
            tokio::process::Command::new("python3")
                .arg(script)
                .args(["sinktest", "3", "45"])
                .env("HOME", &home)
                .env("AWS_CONFIG_FILE", home.join(".aws/config"))
                .env("AWS_SHARED_CREDENTIALS_FILE", home.join(".aws/credentials"))
                .env_remove("AWS_PROFILE")
                .env_remove("AWS_ACCESS_KEY_ID")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("the botocore check finishes")
        .expect("run python3");
        stop.store(true, Ordering::Relaxed);
        let seen = poller.join().expect("poller");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "botocore check failed:\n{stdout}\n{stderr}"
        );
        let summary = stdout
            .lines()
            .find(|l| l.starts_with("botocore sink: "))
            .unwrap_or_else(|| panic!("no summary:\n{stdout}"));
        assert!(summary.ends_with(" 0 failed"), "{summary}");
        // Every token botocore read was one the sink file held.
        let in_file: BTreeSet<String> = seen.tokens.iter().map(|t| sha256_hex(t)).collect();
        let read: Vec<&str> = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("token "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        assert!(read.len() >= 3, "{stdout}");
        for digest in &read {
            assert!(
                in_file.contains(*digest),
                "botocore read a token the sink never held"
            );
        }
        assert!(seen.failures.is_empty(), "{:?}", seen.failures.first());
        drop(proxy);
    })
    .await;
}

fn sha1_hex(text: &str) -> String {
    // The crate's own helper gives the AWS CLI's file name.
    sso_token_proxy::token::sso_cache_file_name(text)
        .trim_end_matches(".json")
        .to_owned()
}

/// What a sink file is after SIGTERM: removed, kept with its valid token,
/// or rewritten with no token and an expiry in the past.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_removes_keeps_or_expires_the_sink_files() {
    bounded("on_shutdown", async {
        let env = Env::new(EmulatorConfig::default()).await;
        let (removed, kept, expired) = (
            env.path("removed"),
            env.path("kept.json"),
            env.path("expired.json"),
        );
        let opts = Opts {
            extra: format!(
                "[[sink]]\npath = \"{}\"\n\
                 [[sink]]\npath = \"{}\"\nformat = \"json\"\non_shutdown = \"keep\"\n\
                 [[sink]]\npath = \"{}\"\nformat = \"sso_cache\"\non_shutdown = \"expire\"\n\
                 start_url = \"https://example.awsapps.com/start\"\nmode = \"0644\"\n",
                removed.display(),
                kept.display(),
                expired.display()
            ),
            ..Opts::default()
        };
        let mut proxy = env.start(opts).await;
        let http = Http::new();
        poll_until(Duration::from_secs(20), "/readyz 200", || {
            let (http, url) = (http.clone(), proxy.admin_url("/readyz"));
            async move { Some(http.get(&url).await).filter(|r| r.status == StatusCode::OK) }
        })
        .await;
        let token = std::fs::read_to_string(&removed).unwrap();
        assert!(env.emulator.is_access_token_live(&token));

        proxy.sigterm();
        let status = proxy.wait_exit(Duration::from_secs(30)).await;
        assert!(status.success(), "{status:?}\n{}", proxy.stderr());
        assert!(!removed.exists(), "on_shutdown = \"remove\"");
        let file = read_json(&kept);
        assert_eq!(
            file["accessToken"],
            token.as_str(),
            "on_shutdown = \"keep\""
        );
        let file = read_json(&expired);
        assert_eq!(file["accessToken"], "", "on_shutdown = \"expire\"");
        assert_eq!(file["startUrl"], "https://example.awsapps.com/start");
        let at = parse_expires_at(file["expiresAt"].as_str().unwrap()).unwrap();
        assert!(at <= SystemTime::now());
        assert_eq!(
            std::fs::metadata(&expired).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert!(
            proxy.stderr().contains("token sink closed"),
            "{}",
            proxy.stderr()
        );
    })
    .await;
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A token-only sidecar: no `[proxy]`, no route, one sink of a named
/// source. Nothing listens for requests, only that source's token is
/// fetched, `/readyz` is 200 once the file holds it, and SIGTERM removes
/// the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_only_sidecar_needs_no_proxy() {
    bounded("token-only sidecar", async {
        let env = Env::new(EmulatorConfig::default()).await;
        let file = env.path("tokens/reports.json");
        let scoped = env
            .emulator
            .issue_refresh_token(&env.client_id, &["reports:read".to_owned()]);
        let opts = Opts {
            token_only: true,
            extra: format!(
                "[sources.reports]\nsource = \"refresh_token\"\nrefresh_token = \"{}\"\n\
                 scopes = [\"reports:read\"]\n\
                 [[sink]]\nsource = \"reports\"\npath = \"{}\"\nformat = \"json\"\n",
                scoped.expose(),
                file.display()
            ),
            ..Opts::default()
        };
        let config = env.write(
            "check.toml",
            &env.config_text(harness::free_addr(), harness::free_addr(), &opts),
        );
        let (status, stdout, stderr) =
            harness::run_binary(&["check-config"], &config, "warn", Duration::from_secs(30)).await;
        assert!(status.success(), "{stdout}{stderr}");

        let mut proxy = env.start(opts).await;
        let http = Http::new();
        let ready = poll_until(Duration::from_secs(20), "/readyz 200", || {
            let (http, url) = (http.clone(), proxy.admin_url("/readyz"));
            async move { Some(http.get(&url).await).filter(|r| r.status == StatusCode::OK) }
        })
        .await
        .json();
        assert_eq!(ready["sinks"][0]["source"], "reports", "{ready}");
        assert_eq!(ready["sinks"][0]["written"], true, "{ready}");
        let token = read_json(&file)["accessToken"].as_str().unwrap().to_owned();
        assert!(env.emulator.is_access_token_live(&token));
        // Only the sink's source was fetched: the default source has no
        // route and no sink.
        let counters = env.emulator.counters();
        assert_eq!(counters.create_token, 1, "{counters:?}");
        assert!(
            tokio::net::TcpStream::connect(proxy.addr).await.is_err(),
            "nothing listens for requests"
        );
        assert!(
            proxy.stderr().contains("token-only sidecar"),
            "{}",
            proxy.stderr()
        );
        proxy.sigterm();
        assert!(proxy.wait_exit(Duration::from_secs(30)).await.success());
        assert!(!file.exists());
    })
    .await;
}
