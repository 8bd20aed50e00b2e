//! What a new user meets on the command line, run on the real binary: the
//! login recipe of `deploy/README.md` against the emulator, the quick start
//! from another directory, the second example config (two routes and a
//! sink), `token` while the quick start runs, the hint
//! when there is no config file, and the README's command summary against
//! `--help`.

#[allow(dead_code)]
#[path = "support/binary_harness.rs"]
mod harness;

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use harness::{BIN, Http, assert_no_secrets, free_addr, full, poll_until};
use http::{Request, StatusCode};
use sha1::{Digest as _, Sha1};
use sso_token_proxy::emulator::{Emulator, EmulatorConfig, EmulatorHandle};
use tokio::{
    process::{Child, Command},
    time::timeout,
};

/// The test's overall limit.
const LIMIT: Duration = Duration::from_secs(60);

async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: test did not finish within {LIMIT:?}"))
}

fn repo_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The fenced blocks of a Markdown text: `(info string, body)`.
fn fenced_blocks(markdown: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start().strip_prefix("```")) {
            (None, Some(info)) => current = Some((info.trim().to_owned(), String::new())),
            (Some(_), Some(_)) => blocks.extend(current.take()),
            (Some((_, body)), None) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    blocks
}

/// The AWS CLI's cache file name, computed independently of the crate.
fn aws_cli_cache_name(key: &str) -> String {
    let hex: String = Sha1::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{hex}.json")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Spawns the binary with `args`, `HOME` set to `home`, in `cwd`, stderr to
/// a file.
fn spawn(args: &[&str], home: &Path, cwd: &Path, stderr: &Path) -> Child {
    Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .env("HOME", home)
        .env("RUST_LOG", "info")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(stderr).expect("stderr file"))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sso-token-proxy")
}

/// Runs the binary to completion: `(exit code, stdout, stderr)`.
async fn run(args: &[&str], home: &Path, cwd: &Path) -> (Option<i32>, String, String) {
    let stderr_path = cwd.join(format!("run-{}.stderr", rand_suffix()));
    let child = spawn(args, home, cwd, &stderr_path);
    let out = timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("sso-token-proxy {args:?} did not finish within 30 s"))
        .expect("wait");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        std::fs::read_to_string(&stderr_path).unwrap_or_default(),
    )
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Waits until `url` answers `200`, or panics with the child's stderr when
/// it exits first or 20 s pass.
async fn wait_ok(child: &mut Child, url: &str, stderr: &Path) {
    let http = Http::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!(
                "sso-token-proxy exited ({status}):\n{}",
                std::fs::read_to_string(stderr).unwrap_or_default()
            );
        }
        if let Ok(Ok(r)) = timeout(Duration::from_secs(1), http.try_get(url)).await
            && r.status == StatusCode::OK
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{url} did not answer 200 within 20 s:\n{}",
            std::fs::read_to_string(stderr).unwrap_or_default()
        );
        tokio::time::sleep(harness::STEP).await;
    }
}

async fn emulator() -> EmulatorHandle {
    Emulator::start(EmulatorConfig {
        // The device flow polls no faster than this (whole seconds).
        device_poll_interval: Duration::from_secs(1),
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator starts")
}

/// `deploy/README.md`'s login recipe, as written, against the emulator:
/// the `login.toml` there (plus the emulator's endpoint), `HOME` a temp
/// dir, the code approved with the command `login` prints; then the proxy
/// runs on the cache file at the AWS CLI's default path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_readme_login_recipe_works_against_the_emulator() {
    bounded("login recipe", async {
        let readme = repo_file("deploy/README.md");
        let blocks = fenced_blocks(&readme);
        let (_, recipe) = blocks
            .iter()
            .find(|(info, body)| info == "toml" && body.starts_with("# login.toml"))
            .expect("deploy/README.md has a ```toml block starting with `# login.toml`");
        assert!(
            blocks.iter().any(|(info, body)| info == "sh"
                && body.contains("sso-token-proxy login --config login.toml")),
            "deploy/README.md shows `sso-token-proxy login --config login.toml`"
        );
        let toml: toml::Table = recipe.parse().expect("the recipe is TOML");
        let start_url = toml["token"]["start_url"]
            .as_str()
            .expect("token.start_url")
            .to_owned();
        let sections: Vec<&str> = toml.keys().map(String::as_str).collect();
        assert_eq!(sections, ["oidc", "token"], "only what login needs");

        let emulator = emulator().await;
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        // The only addition: the emulator instead of the regional endpoint.
        let login_toml = recipe.replacen(
            "[oidc]\n",
            &format!("[oidc]\nendpoint = \"{}\"\n", emulator.url()),
            1,
        );
        assert_ne!(&login_toml, recipe, "the recipe has an [oidc] line");
        std::fs::write(dir.path().join("login.toml"), &login_toml).unwrap();

        let stderr_path = dir.path().join("login.stderr");
        let mut child = spawn(
            &["login", "--config", "login.toml"],
            &home,
            dir.path(),
            &stderr_path,
        );
        let read = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
        // The printed approval command: curl ... -d '{"user_code":"X"}' URL.
        let (body, url) = poll_until(Duration::from_secs(20), "the approval command", || {
            let text = read();
            async move {
                let line = text.lines().find(|l| l.trim_start().starts_with("curl "))?;
                let body = line.split('\'').nth(3)?.to_owned();
                let url = line.split_whitespace().last()?.to_owned();
                Some((body, url))
            }
        })
        .await;
        assert!(
            url.starts_with(&emulator.url()) && url.ends_with("/_emulator/device/approve"),
            "{url}"
        );
        let approve = Http::new()
            .send(
                Request::post(&url)
                    .header("content-type", "application/json")
                    .body(full(body.clone()))
                    .unwrap(),
            )
            .await;
        assert_eq!(approve.status, StatusCode::OK, "{body}: {:?}", approve.body);
        let status = timeout(Duration::from_secs(30), child.wait())
            .await
            .unwrap_or_else(|_| panic!("login did not finish:\n{}", read()))
            .unwrap();
        let log = read();
        assert!(status.success(), "login failed ({status}):\n{log}");

        let cache_dir = home.join(".aws/sso/cache");
        let cache_file = cache_dir.join(aws_cli_cache_name(&start_url));
        let cache: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&cache_file)
                .unwrap_or_else(|e| panic!("{}: {e}\n{log}", cache_file.display())),
        )
        .unwrap();
        assert_eq!(mode(&cache_file), 0o600);
        assert_eq!(cache["startUrl"], start_url.as_str());
        assert_eq!(cache["region"], toml["oidc"]["region"].as_str().unwrap());
        let field = |k: &str| {
            cache[k]
                .as_str()
                .unwrap_or_else(|| panic!("{k}"))
                .to_owned()
        };
        let access = field("accessToken");
        assert!(emulator.is_access_token_live(&access));
        // No secret, and no device code (`aod…`, found by the shape check).
        assert_no_secrets(
            "login stderr",
            &log,
            &[
                ("access token", access.as_str()),
                ("refresh token", field("refreshToken").as_str()),
                ("client secret", field("clientSecret").as_str()),
            ],
            &[field("clientId").as_str()],
        );
        let logins = emulator.counters().create_token;
        assert_eq!(logins, 1, "one device-code CreateToken");

        // The proxy on the same default cache file: no sso_cache_file key.
        let (listen, admin) = (free_addr(), free_addr());
        std::fs::write(
            dir.path().join("proxy.toml"),
            format!(
                "{login_toml}\n[proxy]\nlisten = \"{listen}\"\nupstream = \"{url}\"\n\
                 [admin]\nlisten = \"{admin}\"\n",
                url = emulator.url(),
            )
            .replacen("[token]\n", "[token]\nsource = \"sso_cache\"\n", 1),
        )
        .unwrap();
        let stderr_path = dir.path().join("proxy.stderr");
        let mut proxy = spawn(&["--config", "proxy.toml"], &home, dir.path(), &stderr_path);
        wait_ok(&mut proxy, &format!("http://{admin}/readyz"), &stderr_path).await;
        let r = Http::new().get(&format!("http://{listen}/hello")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json()["authorized"], true);
        assert_eq!(
            emulator.counters().create_token,
            logins,
            "the proxy used the cached token, no new CreateToken"
        );
        proxy.start_kill().unwrap();
    })
    .await;
}

/// A login config needs `token.start_url`; a config without `[proxy]` and
/// `[admin]` is still refused by the proxy itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minimal_login_config_names_what_is_missing() {
    bounded("minimal login config", async {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("login.toml"),
            "[oidc]\nregion = \"us-east-1\"\n",
        )
        .unwrap();
        let (code, _, stderr) =
            run(&["login", "--config", "login.toml"], dir.path(), dir.path()).await;
        assert_eq!(code, Some(2), "{stderr}");
        assert!(
            stderr.starts_with("login.toml: token.start_url: missing"),
            "{stderr}"
        );
        let (code, _, stderr) = run(
            &["check-config", "--config", "login.toml"],
            dir.path(),
            dir.path(),
        )
        .await;
        assert_eq!(code, Some(2), "{stderr}");
        for key in ["proxy", "admin", "token"] {
            assert!(
                stderr.contains(&format!("login.toml: {key}: missing required section")),
                "{stderr}"
            );
        }
    })
    .await;
}

/// The repository's `config.toml`, copied to another directory (ports
/// moved) and run from a third: it serves, and its state file lands in
/// `~/.local/state/sso-token-proxy/`, created 0700.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_start_config_works_from_any_directory() {
    bounded("quick start elsewhere", async {
        let dir = tempfile::tempdir().unwrap();
        let (home, elsewhere, cwd) = (
            dir.path().join("home"),
            dir.path().join("elsewhere"),
            dir.path().join("cwd"),
        );
        for d in [&home, &elsewhere, &cwd] {
            std::fs::create_dir(d).unwrap();
        }
        let (listen, admin, emu) = (free_addr(), free_addr(), free_addr());
        let config = repo_file("config.toml");
        for fixed in ["127.0.0.1:8080", "127.0.0.1:9901", "127.0.0.1:8999"] {
            assert!(config.contains(fixed), "config.toml has {fixed}");
        }
        let config = config
            .replace("127.0.0.1:8080", &listen.to_string())
            .replace("127.0.0.1:9901", &admin.to_string())
            .replace("127.0.0.1:8999", &emu.to_string());
        let config_path = elsewhere.join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let stderr_path = dir.path().join("proxy.stderr");
        let config_arg = config_path.display().to_string();
        let mut proxy = spawn(&["--config", &config_arg], &home, &cwd, &stderr_path);
        wait_ok(&mut proxy, &format!("http://{admin}/readyz"), &stderr_path).await;
        let r = Http::new().get(&format!("http://{listen}/hello")).await;
        assert_eq!(r.json()["authorized"], true);
        let state_dir = home.join(".local/state/sso-token-proxy");
        assert!(
            state_dir.join("quickstart-state.json").is_file(),
            "state file in {}",
            state_dir.display()
        );
        assert_eq!(mode(&state_dir), 0o700);
        assert_eq!(mode(&home.join(".local/state")), 0o700);
        let leftovers: Vec<PathBuf> = [&elsewhere, &cwd]
            .iter()
            .flat_map(|d| std::fs::read_dir(d).unwrap())
            .map(|e| e.unwrap().path())
            .filter(|p| p != &config_path)
            .collect();
        assert!(
            leftovers.is_empty(),
            "nothing written next to the config or in the cwd: {leftovers:?}"
        );
        proxy.start_kill().unwrap();
    })
    .await;
}

/// `examples/routes-and-sink.toml`, ports moved: two routes against the
/// embedded emulator, each with its own source (scopes) and header format,
/// and a sink that holds the first route's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_and_sink_example_serves_both_routes_and_writes_the_sink() {
    bounded("routes-and-sink example", async {
        let dir = tempfile::tempdir().unwrap();
        let (home, cwd) = (dir.path().join("home"), dir.path().join("cwd"));
        for d in [&home, &cwd] {
            std::fs::create_dir(d).unwrap();
        }
        let (listen, admin, emu) = (free_addr(), free_addr(), free_addr());
        let config = repo_file("examples/routes-and-sink.toml");
        for fixed in ["127.0.0.1:8080", "127.0.0.1:9901", "127.0.0.1:8999"] {
            assert!(config.contains(fixed), "the example has {fixed}");
        }
        let config = config
            .replace("127.0.0.1:8080", &listen.to_string())
            .replace("127.0.0.1:9901", &admin.to_string())
            .replace("127.0.0.1:8999", &emu.to_string());
        let config_path = dir.path().join("routes-and-sink.toml");
        std::fs::write(&config_path, config).unwrap();
        let stderr_path = dir.path().join("proxy.stderr");
        let config_arg = config_path.display().to_string();
        let mut proxy = spawn(&["--config", &config_arg], &home, &cwd, &stderr_path);
        wait_ok(&mut proxy, &format!("http://{admin}/readyz"), &stderr_path).await;
        let http = Http::new();

        let internal = http.get(&format!("http://{listen}/internal/hello")).await;
        assert_eq!(internal.status, StatusCode::OK);
        let internal = internal.json();
        assert_eq!(internal["authorized"], true, "{internal}");
        assert_eq!(internal["token_header"], "authorization", "{internal}");
        assert_eq!(internal["path"], "/internal-api/hello");

        let vendor = http.get(&format!("http://{listen}/vendor/hello")).await;
        assert_eq!(vendor.status, StatusCode::OK);
        let vendor = vendor.json();
        assert_eq!(vendor["authorized"], true, "{vendor}");
        // The bare token in X-Api-Token, no Authorization at all.
        assert_eq!(vendor["token_header"], "x-api-token", "{vendor}");
        assert_eq!(vendor["path"], "/vendor-api/hello");

        let unmatched = http.get(&format!("http://{listen}/other")).await;
        assert_eq!(unmatched.status, StatusCode::NOT_FOUND);
        assert_eq!(unmatched.json()["error"], "no_route");

        // Two sources, two scope sets: two tokens, one CreateToken each.
        let counters = http
            .get(&format!("http://{emu}/_emulator/counters"))
            .await
            .json();
        assert_eq!(counters["create_token"], 2, "{counters}");
        assert_eq!(
            counters["errors_by_kind"],
            serde_json::json!({}),
            "{counters}"
        );

        let readyz = http.get(&format!("http://{admin}/readyz")).await.json();
        assert_eq!(
            readyz["routes"]["internal"]["source"], "default",
            "{readyz}"
        );
        assert_eq!(readyz["routes"]["vendor"]["source"], "vendor", "{readyz}");
        assert_eq!(readyz["sinks"][0]["written"], true, "{readyz}");
        let sink_path = home.join(".local/state/sso-token-proxy/routes-and-sink-token.json");
        let sink: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&sink_path).unwrap()).unwrap();
        assert!(
            sink["accessToken"].as_str().is_some_and(|t| t.len() > 20),
            "{sink}"
        );
        assert!(sink["expiresAt"].is_string(), "{sink}");
        assert_eq!(mode(&sink_path), 0o600);
        proxy.start_kill().unwrap();
    })
    .await;
}

/// `token` while a quick-start-shaped proxy runs (its `[emulator]` address
/// is taken): it uses the running emulator and prints the stored token
/// without a CreateToken call; `--fresh` calls CreateToken and says why
/// that is risky.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_works_while_the_quick_start_runs() {
    bounded("token beside the quick start", async {
        let dir = tempfile::tempdir().unwrap();
        let (listen, admin, emu) = (free_addr(), free_addr(), free_addr());
        let config = format!(
            r#"[proxy]
listen = "{listen}"
upstream = "http://{emu}"
[admin]
listen = "{admin}"
[oidc]
endpoint = "http://{emu}"
region = "us-east-1"
client_id = "qs-client"
client_secret = "qs-client-secret-that-is-long-enough"
[token]
source = "refresh_token"
refresh_token = "qs-refresh-token-that-is-long-enough"
state_file = "state/nested/state.json"
[emulator]
listen = "{emu}"
"#
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        let stderr_path = dir.path().join("proxy.stderr");
        let mut proxy = spawn(
            &["--config", "config.toml"],
            dir.path(),
            dir.path(),
            &stderr_path,
        );
        wait_ok(&mut proxy, &format!("http://{admin}/readyz"), &stderr_path).await;
        assert_eq!(mode(&dir.path().join("state/nested")), 0o700);
        let http = Http::new();
        let counters = || async {
            http.get(&format!("http://{emu}/_emulator/counters"))
                .await
                .json()
        };
        assert_eq!(counters().await["create_token"], 1);

        let (code, stdout, stderr) = run(&["token"], dir.path(), dir.path()).await;
        assert_eq!(code, Some(0), "{stderr}");
        let printed: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON");
        let access = printed["accessToken"]
            .as_str()
            .expect("accessToken")
            .to_owned();
        let echo = |token: String| {
            let http = http.clone();
            async move {
                http.send(
                    Request::get(format!("http://{emu}/check"))
                        .header("authorization", format!("Bearer {token}"))
                        .body(harness::empty())
                        .unwrap(),
                )
                .await
                .status
            }
        };
        assert_eq!(
            echo(access.clone()).await,
            StatusCode::OK,
            "the token is live"
        );
        assert_eq!(
            counters().await["create_token"],
            1,
            "the stored token was printed, no CreateToken:\n{stderr}"
        );
        assert!(!stderr.contains("--fresh"), "{stderr}");

        let (code, stdout, stderr) = run(&["token", "--fresh"], dir.path(), dir.path()).await;
        assert_eq!(code, Some(0), "{stderr}");
        assert!(
            stderr.contains("token --fresh: calling CreateToken"),
            "{stderr}"
        );
        let fresh: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON");
        let fresh_access = fresh["accessToken"].as_str().unwrap().to_owned();
        assert_ne!(fresh_access, access);
        assert_eq!(echo(fresh_access).await, StatusCode::OK);
        assert_eq!(counters().await["create_token"], 2);
        proxy.start_kill().unwrap();
    })
    .await;
}

/// No arguments where there is no `config.toml`: exit 2, the
/// `FILE: key: reason` line first, then a hint naming `--config` and
/// `--help`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_arguments_without_a_config_file_hints_at_config_and_help() {
    bounded("no arguments", async {
        let dir = tempfile::tempdir().unwrap();
        let (code, _, stderr) = run(&[], dir.path(), dir.path()).await;
        assert_eq!(code, Some(2), "{stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 2, "{stderr}");
        assert!(
            lines[0].starts_with("config.toml: (file): cannot read: "),
            "{stderr}"
        );
        assert!(
            lines[1].starts_with("hint: ")
                && lines[1].contains("--config FILE")
                && lines[1].contains("--help"),
            "{stderr}"
        );
        let (code, _, stderr) =
            run(&["token", "--config", "nope.toml"], dir.path(), dir.path()).await;
        assert_eq!(code, Some(2), "{stderr}");
        assert!(
            stderr.starts_with("nope.toml: (file): cannot read: "),
            "{stderr}"
        );
        assert!(
            stderr.contains("hint: check the path given to --config"),
            "{stderr}"
        );
    })
    .await;
}

/// Long options in `text`, e.g. `--config`.
fn long_flags(text: &str) -> Vec<String> {
    let mut flags: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_owned)
        .collect();
    flags.sort();
    flags.dedup();
    flags
}

/// The README's command summary lists every command of `--help`, each with
/// exactly the options its `--help` shows, and `--config`'s default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_command_summary_matches_help() {
    bounded("README vs --help", async {
        let dir = tempfile::tempdir().unwrap();
        let readme = repo_file("README.md");
        let section = &readme[readme.find("## Command line").expect("## Command line")..];
        let (_, summary) = fenced_blocks(section)
            .into_iter()
            .next()
            .expect("a code block under ## Command line");
        let (code, help, _) = run(&["--help"], dir.path(), dir.path()).await;
        assert_eq!(code, Some(0));
        assert!(help.contains("[default: config.toml]"), "{help}");
        assert!(
            section[..section.find("\n## ").unwrap_or(section.len())]
                .contains("`--config FILE` defaults to `config.toml`"),
            "the README names --config's default"
        );
        let commands: Vec<String> = help
            .split("Commands:")
            .nth(1)
            .and_then(|rest| rest.split("\n\n").next())
            .expect("a Commands: list")
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|c| *c != "help")
            .map(str::to_owned)
            .collect();
        assert!(commands.contains(&"run".to_owned()), "{commands:?}");
        let global = ["--config", "--help", "--log-format", "--version"];
        for command in &commands {
            let line = summary
                .lines()
                .find(|l| {
                    let words: Vec<&str> = l.split_whitespace().collect();
                    words.get(1).map(|w| w.trim_matches(['[', ']'])) == Some(command.as_str())
                })
                .unwrap_or_else(|| panic!("no README line for `{command}`:\n{summary}"));
            let usage = line.split("   ").next().unwrap();
            assert!(
                usage.contains("[--config FILE]") || command == "emulator",
                "`{command}`: --config is optional: {line}"
            );
            let (code, sub_help, _) = run(&[command, "--help"], dir.path(), dir.path()).await;
            assert_eq!(code, Some(0));
            let own = |flags: Vec<String>| -> Vec<String> {
                flags
                    .into_iter()
                    .filter(|f| !global.contains(&f.as_str()))
                    .collect()
            };
            assert_eq!(
                own(long_flags(usage)),
                own(long_flags(&sub_help)),
                "`{command}`: README options differ from `{command} --help`"
            );
        }
        assert_eq!(
            summary.lines().filter(|l| !l.trim().is_empty()).count(),
            commands.len(),
            "one README line per command:\n{summary}"
        );
    })
    .await;
}
