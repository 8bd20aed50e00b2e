//! The real binary with `source = "jwt_bearer"`: AWS credentials from the
//! environment (the standard chain), the assertion file re-read, the token
//! the emulator issued for the file's subject forwarded upstream, a wrong
//! secret key refused, and no secret in the logs.

#[allow(dead_code)]
#[path = "support/binary_harness.rs"]
mod harness;

use std::{
    path::Path,
    process::{Output, Stdio},
    time::Duration,
};

use harness::{BIN, Http, assert_no_secrets, free_addr, poll_until};
use http::StatusCode;
use sso_token_proxy::emulator::{
    DEFAULT_APPLICATION_ARN, Emulator, EmulatorConfig, EmulatorHandle, TEST_ACCESS_KEY_ID,
    TEST_SECRET_ACCESS_KEY, token_subject,
};
use tokio::{process::Command, time::timeout};

const LIMIT: Duration = Duration::from_secs(60);

/// The binary with AWS credentials in its environment and nothing else of
/// the AWS chain reachable (no profile files, no instance metadata).
fn command(dir: &Path, secret: &str, rust_log: &str) -> Command {
    let mut cmd = Command::new(BIN);
    for (key, _) in std::env::vars() {
        if key.starts_with("AWS_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("AWS_CONFIG_FILE", dir.join("no-aws-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            dir.join("no-aws-credentials"),
        )
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", rust_log)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

fn config(emulator: &EmulatorHandle, dir: &Path, listen: &str, admin: &str) -> std::path::PathBuf {
    let text = format!(
        r#"[proxy]
listen = "{listen}"
upstream = "{url}"
[admin]
listen = "{admin}"
[oidc]
endpoint = "{url}"
region = "us-east-1"
client_id = "{DEFAULT_APPLICATION_ARN}"
[token]
source = "jwt_bearer"
assertion_file = "{assertion}"
"#,
        url = emulator.url(),
        assertion = dir.join("assertion.jwt").display(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn write_assertion(emulator: &EmulatorHandle, dir: &Path, subject: &str) -> String {
    let jwt = emulator.mint_assertion(subject, Duration::from_secs(600));
    replace_file(&dir.join("assertion.jwt"), jwt.expose().as_bytes()).unwrap();
    jwt.expose().to_owned()
}

async fn run(mut cmd: Command, args: &[&str], config: &Path) -> Output {
    let child = cmd
        .args(args)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    timeout(LIMIT, child.wait_with_output())
        .await
        .expect("the binary finished in time")
        .unwrap()
}

#[tokio::test]
async fn token_subcommand_signs_with_the_environment_credentials() {
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config(&emulator, dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    let jwt = write_assertion(&emulator, dir.path(), "pod-from-file");

    let out = run(
        command(dir.path(), TEST_SECRET_ACCESS_KEY, "trace"),
        &["token"],
        &config,
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let access = printed["accessToken"].as_str().unwrap();
    assert_eq!(token_subject(access).as_deref(), Some("pod-from-file"));
    assert!(emulator.is_access_token_live(access));
    assert_eq!(emulator.counters().create_token_with_iam, 1);
    // Even at trace level: no key, assertion or token in the log.
    for (label, secret) in [
        ("secret key", TEST_SECRET_ACCESS_KEY),
        ("assertion", jwt.as_str()),
        ("access token", access),
    ] {
        assert!(!stderr.contains(secret), "the {label} is in the log");
    }

    // A wrong secret key: refused by the emulator, exit 1, nothing leaked.
    let wrong_secret = "wrong/secret/key/0123456789abcdefghijkl";
    let out = run(
        command(dir.path(), wrong_secret, "debug"),
        &["token"],
        &config,
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("InvalidSignatureException"), "{stderr}");
    assert!(stderr.contains("HTTP 403"), "{stderr}");
    assert_no_secrets(
        "token with a wrong secret key",
        &stderr,
        &[("secret key", wrong_secret), ("assertion", &jwt)],
        &[DEFAULT_APPLICATION_ARN, &emulator.url()],
    );
    let counters = emulator.counters();
    assert_eq!(counters.create_token_with_iam, 2);
    assert_eq!(counters.errors_by_kind["InvalidSignature"], 1);
    assert_eq!(counters.tokens_issued, 1);
}

#[tokio::test]
async fn check_config_reports_a_missing_assertion_file() {
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config(&emulator, dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    let out = run(
        command(dir.path(), TEST_SECRET_ACCESS_KEY, "info"),
        &["check-config"],
        &config,
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("token.assertion_file: cannot read"),
        "{stderr}"
    );
    write_assertion(&emulator, dir.path(), "pod");
    let out = run(
        command(dir.path(), TEST_SECRET_ACCESS_KEY, "info"),
        &["check-config"],
        &config,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(emulator.counters().create_token_with_iam, 0);
}

#[tokio::test]
async fn proxy_forwards_the_token_of_the_files_subject() {
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (free_addr(), free_addr());
    let config = config(
        &emulator,
        dir.path(),
        &listen.to_string(),
        &admin.to_string(),
    );
    write_assertion(&emulator, dir.path(), "pod-a");
    let stderr = std::fs::File::create(dir.path().join("proxy.stderr")).unwrap();
    let mut child = command(dir.path(), TEST_SECRET_ACCESS_KEY, "info")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr))
        .spawn()
        .unwrap();
    let http = Http::new();
    let ready = format!("http://{admin}/readyz");
    poll_until(LIMIT, "the proxy becomes ready", || {
        let http = &http;
        let ready = ready.clone();
        async move {
            match http.try_get(&ready).await {
                Ok(r) if r.status == StatusCode::OK => Some(()),
                _ => None,
            }
        }
    })
    .await;
    let resp = http.get(&format!("http://{listen}/hello")).await;
    assert_eq!(resp.status, StatusCode::OK);
    let echo = resp.json();
    assert_eq!(echo["authorized"], true);
    assert_eq!(echo["subject"], "pod-a", "{echo}");
    assert_eq!(echo["path"], "/hello");
    assert_eq!(emulator.counters().create_token_with_iam, 1);
    assert_eq!(emulator.counters().echo_authorized, 1);
    child.start_kill().unwrap();
    let _ = child.wait().await;
}

#[tokio::test]
async fn embedded_emulator_keeps_the_assertion_file_like_a_kubelet() {
    let dir = tempfile::tempdir().unwrap();
    let emulator_addr = free_addr();
    let text = format!(
        r#"[proxy]
listen = "127.0.0.1:0"
upstream = "http://{emulator_addr}"
[admin]
listen = "127.0.0.1:0"
[oidc]
endpoint = "http://{emulator_addr}"
region = "us-east-1"
client_id = "{DEFAULT_APPLICATION_ARN}"
[token]
source = "jwt_bearer"
assertion_file = "assertion.jwt"
[emulator]
listen = "{emulator_addr}"
assertion_file = "assertion.jwt"
assertion_subject = "embedded-pod"
"#
    );
    let config = dir.path().join("config.toml");
    std::fs::write(&config, text).unwrap();
    // The file does not exist yet: the embedded emulator writes it at start.
    let out = run(
        command(dir.path(), TEST_SECRET_ACCESS_KEY, "info"),
        &["check-config", "--no-bind-check"],
        &config,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(
        command(dir.path(), TEST_SECRET_ACCESS_KEY, "info"),
        &["token"],
        &config,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        token_subject(printed["accessToken"].as_str().unwrap()).as_deref(),
        Some("embedded-pod")
    );
    let jwt = std::fs::read_to_string(dir.path().join("assertion.jwt")).unwrap();
    assert_eq!(jwt.split('.').count(), 3, "a JWT was written");
}

/// Replaces `path` as a kubelet does: a new file renamed over the old one.
fn replace_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}
