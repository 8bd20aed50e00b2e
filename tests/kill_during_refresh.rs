//! Crash safety of refresh-token persistence: the `token` subcommand runs a
//! tight refresh loop with rotation on and is killed with SIGKILL at random
//! points, over and over. After every kill the state file must parse and
//! hold a refresh token the service accepts, so the next process goes on.
//!
//! The emulator runs with rotation grace (a used refresh token stays valid
//! until its successor is first used). Without it no client can survive a
//! crash between the service rotating the token and the client saving the
//! new one; the property under test is that our write is atomic and happens
//! before the new token is used.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use rand::Rng;
use sso_token_proxy::{
    emulator::{Emulator, EmulatorConfig},
    token::StateFile,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_refresh_loops_never_loses_the_refresh_token() {
    let emulator = Emulator::start(EmulatorConfig {
        rotation_grace: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let (client_id, client_secret) = emulator.register_client("kill-test");
    let initial = emulator.issue_refresh_token(&client_id, &[]);

    let dir = tempfile::tempdir().unwrap();
    let rt_file = dir.path().join("refresh_token");
    std::fs::write(&rt_file, format!("{}\n", initial.expose())).unwrap();
    let state = dir.path().join("state.json");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
upstream = "http://127.0.0.1:9"
[admin]
listen = "127.0.0.1:0"
[oidc]
endpoint = "{url}"
client_id = "{client_id}"
client_secret = "{secret}"
[token]
source = "refresh_token"
refresh_token_file = "{rt}"
state_file = "{state}"
[retry]
max_attempts = 1
"#,
            url = emulator.url(),
            secret = client_secret.expose(),
            rt = rt_file.display(),
            state = state.display(),
        ),
    )
    .unwrap();

    let binary = env!("CARGO_BIN_EXE_sso-token-proxy");
    let mut kills = 0;
    let mut rng = rand::rng();
    while kills < 24 {
        let before = emulator.counters().create_token;
        let mut child = Command::new(binary)
            .args(["token", "--count", "1000000", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until this process is refreshing, then kill it at a random
        // point of its loop.
        let started = std::time::Instant::now();
        while emulator.counters().create_token < before + 2 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "child never refreshed"
            );
            if let Some(status) = child.try_wait().unwrap() {
                panic!("child exited early with {status}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_micros(rng.random_range(0..20_000))).await;
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;

        let saved = StateFile::load(&state)
            .unwrap_or_else(|e| panic!("after kill {kills}: {e}"))
            .unwrap_or_else(|| panic!("after kill {kills}: no state file"));
        let token = saved
            .refresh_token
            .expect("state file holds a refresh token");
        assert!(
            emulator.is_refresh_token_live(token.expose()),
            "after kill {kills}: the saved refresh token is not accepted"
        );
    }
    let counters = emulator.counters();
    assert!(
        counters.create_token >= 48,
        "refreshes happened: {}",
        counters.create_token
    );
    assert_eq!(
        counters.errors_by_kind.get("InvalidGrant"),
        None,
        "{counters:?}"
    );
}
