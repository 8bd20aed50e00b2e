//! Harness for tests that run the real `sso-token-proxy` binary against an
//! in-process emulator: free ports, config files in a temp dir, spawning
//! with captured stderr, readiness polling, a small HTTP client (HTTP/1.1
//! and h2c) and a raw TCP client for hand-written requests.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Version};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use sso_token_proxy::emulator::{Emulator, EmulatorConfig, EmulatorHandle};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    process::{Child, Command},
    time::{Instant, sleep, timeout},
};

/// The binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_sso-token-proxy");

/// Polling step for every bounded wait.
pub(crate) const STEP: Duration = Duration::from_millis(20);

/// Request body type of [`Http`].
pub(crate) type ReqBody = BoxBody<Bytes, Infallible>;

/// A whole body from bytes.
pub(crate) fn full(bytes: impl Into<Bytes>) -> ReqBody {
    Full::new(bytes.into()).boxed()
}

/// An empty body.
pub(crate) fn empty() -> ReqBody {
    full(Bytes::new())
}

/// A free TCP port on 127.0.0.1 (bound, then released), never one this
/// test process was given before: the kernel may hand a just-released
/// port out again at once, so two calls in a row could otherwise return
/// the same address (a config with `proxy.listen` equal to `admin.listen`).
pub(crate) fn free_addr() -> SocketAddr {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        if !given.contains(&addr.port()) {
            given.push(addr.port());
            return addr;
        }
    }
}

/// Polls `check` every [`STEP`] until it returns `Some`, for at most
/// `limit`; panics with `what` on timeout.
pub(crate) async fn poll_until<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        sleep(STEP).await;
    }
}

/// What a test tunes in the generated config.
#[derive(Debug, Clone)]
pub(crate) struct Opts {
    /// `RUST_LOG` of the child.
    pub(crate) rust_log: String,
    /// Extra lines for `[proxy]`.
    pub(crate) proxy: String,
    /// Extra lines for `[token]`.
    pub(crate) token: String,
    /// Replaces the `[token]` source lines (`source`, `refresh_token_file`,
    /// `state_file`), e.g. for `source = "sso_cache"`.
    pub(crate) token_source: Option<String>,
    /// Lines of `[retry]`.
    pub(crate) retry: String,
    /// Write the client secret and refresh token into the config itself
    /// instead of naming the secret files.
    pub(crate) inline_secrets: bool,
    /// Tables appended to the config (`[sources.NAME]`, `[[route]]`, ...).
    pub(crate) extra: String,
    /// Leave `[proxy]` out (a token-only sidecar, with `[[sink]]`s in
    /// `extra`); nothing listens on [`Running::addr`] then.
    pub(crate) token_only: bool,
    /// Environment variables for the binary (e.g. `TOKIO_WORKER_THREADS`).
    pub(crate) env: Vec<(&'static str, String)>,
    /// Start the binary with this soft limit on open files, as systemd and
    /// container runtimes start a process with 1024.
    pub(crate) soft_open_files: Option<u64>,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            rust_log: "info,sso_token_proxy=debug".to_owned(),
            proxy: "shutdown_grace = \"10s\"\n".to_owned(),
            token: String::new(),
            token_source: None,
            retry: "base_delay = \"50ms\"\nthrottle_base_delay = \"100ms\"\n".to_owned(),
            inline_secrets: false,
            extra: String::new(),
            token_only: false,
            env: Vec::new(),
            soft_open_files: None,
        }
    }
}

/// One test's world: an emulator, a registered client with a refresh
/// token, and a temp dir holding the secret files and configs.
pub(crate) struct Env {
    /// The emulator (OIDC and the protected echo upstream).
    pub(crate) emulator: EmulatorHandle,
    /// Temp dir of this test.
    pub(crate) dir: tempfile::TempDir,
    /// The client id.
    pub(crate) client_id: String,
    /// The client secret (also in `client_secret` in the dir).
    pub(crate) client_secret: String,
    /// The configured refresh token (also in `refresh_token` in the dir).
    pub(crate) refresh_token: String,
}

impl Env {
    /// Starts an emulator with `config`, registers a client and issues a
    /// refresh token, and writes both secrets to files.
    pub(crate) async fn new(config: EmulatorConfig) -> Self {
        let emulator = Emulator::start(config).await.expect("emulator starts");
        let (client_id, secret) = emulator.register_client("binary-tests");
        let refresh = emulator.issue_refresh_token(&client_id, &[]);
        let dir = tempfile::tempdir().expect("temp dir");
        let env = Self {
            emulator,
            dir,
            client_id,
            client_secret: secret.expose().to_owned(),
            refresh_token: refresh.expose().to_owned(),
        };
        std::fs::write(
            env.path("client_secret"),
            format!("{}\n", env.client_secret),
        )
        .unwrap();
        std::fs::write(
            env.path("refresh_token"),
            format!("{}\n", env.refresh_token),
        )
        .unwrap();
        env
    }

    /// A path in the temp dir.
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The configured state file.
    pub(crate) fn state_file(&self) -> PathBuf {
        self.path("state.json")
    }

    /// A complete, valid config for the refresh-token source.
    pub(crate) fn config_text(&self, listen: SocketAddr, admin: SocketAddr, opts: &Opts) -> String {
        let url = self.emulator.url();
        let (client_secret, refresh_token) = if opts.inline_secrets {
            (
                format!("client_secret = \"{}\"", self.client_secret),
                format!("refresh_token = \"{}\"", self.refresh_token),
            )
        } else {
            (
                format!(
                    "client_secret_file = \"{}\"",
                    self.path("client_secret").display()
                ),
                format!(
                    "refresh_token_file = \"{}\"",
                    self.path("refresh_token").display()
                ),
            )
        };
        let proxy_section = if opts.token_only {
            String::new()
        } else {
            format!(
                "[proxy]\nlisten = \"{listen}\"\nupstream = \"{url}\"\n{}",
                opts.proxy
            )
        };
        format!(
            r#"{proxy_section}
[admin]
listen = "{admin}"

[oidc]
endpoint = "{url}"
client_id = "{client_id}"
{client_secret}

[token]
{source}
{token}
[retry]
{retry}
{extra}"#,
            extra = opts.extra,
            client_id = self.client_id,
            source = opts.token_source.clone().unwrap_or_else(|| format!(
                "source = \"refresh_token\"\n{refresh_token}\nstate_file = \"{}\"",
                self.state_file().display(),
            )),
            token = opts.token,
            retry = opts.retry,
        )
    }

    /// Writes `text` to `name` in the temp dir.
    pub(crate) fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Starts the proxy (`sso-token-proxy --config FILE`, no subcommand)
    /// and waits until `/healthz` answers. Retries with new ports when
    /// another process took one of the chosen ports in between.
    pub(crate) async fn start(&self, opts: Opts) -> Running {
        for attempt in 0..5 {
            let (listen, admin) = (free_addr(), free_addr());
            let config_path = self.write("config.toml", &self.config_text(listen, admin, &opts));
            let stderr_path = self.path(&format!("proxy-{attempt}.stderr"));
            let stderr = std::fs::File::create(&stderr_path).unwrap();
            let mut command = match opts.soft_open_files {
                None => Command::new(BIN),
                Some(limit) => {
                    let mut sh = Command::new("sh");
                    sh.arg("-c")
                        .arg(format!("ulimit -Sn {limit} && exec \"$0\" \"$@\""))
                        .arg(BIN);
                    sh
                }
            };
            let child = command
                .arg("--config")
                .arg(&config_path)
                .env("RUST_LOG", &opts.rust_log)
                .envs(opts.env.iter().map(|(k, v)| (*k, v.as_str())))
                .env_remove("RUST_BACKTRACE")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(stderr))
                .kill_on_drop(true)
                .spawn()
                .expect("spawn sso-token-proxy");
            let mut running = Running {
                child,
                addr: listen,
                admin,
                stderr_path,
            };
            match running.wait_healthy().await {
                Ok(()) => return running,
                Err(status) => {
                    let log = running.stderr();
                    assert!(
                        log.contains("cannot listen") && attempt < 4,
                        "sso-token-proxy exited early ({status}):\n{log}"
                    );
                }
            }
        }
        unreachable!("the loop returns or panics")
    }
}

/// A running proxy process; killed when dropped.
pub(crate) struct Running {
    /// The child process.
    pub(crate) child: Child,
    /// `proxy.listen`.
    pub(crate) addr: SocketAddr,
    /// `admin.listen`.
    pub(crate) admin: SocketAddr,
    /// Where its stderr goes.
    pub(crate) stderr_path: PathBuf,
}

impl Running {
    /// `http://PROXY{path}`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `http://ADMIN{path}`.
    pub(crate) fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Everything the child wrote to stderr so far.
    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends SIGTERM.
    pub(crate) fn sigterm(&self) {
        let pid = self.child.id().expect("child still running");
        sigterm(pid);
    }

    /// Waits for the exit, at most `limit`.
    pub(crate) async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        match timeout(limit, self.child.wait()).await {
            Ok(status) => status.expect("wait for child"),
            Err(_) => panic!(
                "sso-token-proxy did not exit within {limit:?}; stderr:\n{}",
                self.stderr()
            ),
        }
    }

    /// Polls `/healthz` until 200 (20 s at most). `Err` with the exit
    /// status if the process ended first.
    async fn wait_healthy(&mut self) -> Result<(), ExitStatus> {
        let http = Http::new();
        let url = self.admin_url("/healthz");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Err(status);
            }
            if let Ok(Ok(r)) = timeout(Duration::from_secs(1), http.try_get(&url)).await
                && r.status == StatusCode::OK
            {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "/healthz did not answer 200 within 20 s; stderr:\n{}",
                self.stderr()
            );
            sleep(STEP).await;
        }
    }
}

/// Sends SIGTERM to `pid`.
pub(crate) fn sigterm(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid} failed");
}

/// Runs the binary with `args` to completion (bounded by `limit`):
/// `(status, stdout, stderr)`.
pub(crate) async fn run_binary(
    args: &[&str],
    config: &Path,
    rust_log: &str,
    limit: Duration,
) -> (ExitStatus, String, String) {
    let child = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", rust_log)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sso-token-proxy");
    let out = timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("sso-token-proxy {args:?} did not finish within {limit:?}"))
        .expect("wait for child");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A response read to its end.
#[derive(Debug)]
pub(crate) struct Resp {
    /// Status.
    pub(crate) status: StatusCode,
    /// HTTP version of the response.
    pub(crate) version: Version,
    /// Headers.
    pub(crate) headers: HeaderMap,
    /// The whole body.
    pub(crate) body: Bytes,
}

impl Resp {
    /// The body as JSON (panics with the body when it is not).
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}), status {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// A header as text.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A hyper-util legacy client: HTTP/1.1, or h2c with prior knowledge.
#[derive(Clone)]
pub(crate) struct Http {
    client: Client<HttpConnector, ReqBody>,
}

impl Http {
    /// An HTTP/1.1 client.
    pub(crate) fn new() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// An h2c (prior knowledge) client.
    pub(crate) fn h2c() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
        }
    }

    /// Sends `req` and reads the whole response (30 s at most).
    pub(crate) async fn send(&self, req: Request<ReqBody>) -> Resp {
        let what = format!("{} {}", req.method(), req.uri());
        timeout(Duration::from_secs(30), self.try_send(req))
            .await
            .unwrap_or_else(|_| panic!("{what}: no response within 30 s"))
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    /// `GET url`.
    pub(crate) async fn get(&self, url: &str) -> Resp {
        self.send(Request::get(url).body(empty()).unwrap()).await
    }

    /// `GET url`, errors returned.
    pub(crate) async fn try_get(&self, url: &str) -> Result<Resp, String> {
        self.try_send(Request::get(url).body(empty()).unwrap())
            .await
    }

    /// Sends `req`; errors as text.
    pub(crate) async fn try_send(&self, req: Request<ReqBody>) -> Result<Resp, String> {
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(Resp {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
        })
    }
}

/// A response read off a raw TCP connection.
#[derive(Debug)]
pub(crate) struct RawResp {
    /// Status code.
    pub(crate) status: u16,
    /// Header lines, names lower-cased.
    pub(crate) headers: Vec<(String, String)>,
    /// Body (content-length or chunked decoded; else up to EOF).
    pub(crate) body: Vec<u8>,
}

impl RawResp {
    /// A header's first value.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}), status {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Writes `request` verbatim on a new connection to `addr` and reads one
/// response (10 s at most).
pub(crate) async fn raw_request(addr: SocketAddr, request: &str) -> RawResp {
    timeout(Duration::from_secs(10), raw_exchange(addr, request))
        .await
        .unwrap_or_else(|_| panic!("no raw response within 10 s to {request:?}"))
}

async fn raw_exchange(addr: SocketAddr, request: &str) -> RawResp {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to the proxy");
    stream.write_all(request.as_bytes()).await.unwrap();
    read_raw_response(&mut stream).await
}

/// Reads one response from `stream` (unbounded: the caller bounds it).
pub(crate) async fn read_raw_response(stream: &mut TcpStream) -> RawResp {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "connection closed before a response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut rest = buf[head_end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let body = if let Some(len) = header("content-length") {
        let len: usize = len.parse().unwrap();
        while rest.len() < len {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed mid-body");
            rest.extend_from_slice(&chunk[..n]);
        }
        rest.truncate(len);
        rest
    } else if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        while find(&rest, b"0\r\n\r\n").is_none() {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed mid-body");
            rest.extend_from_slice(&chunk[..n]);
        }
        dechunk(&rest)
    } else if status == 204 || status == 304 {
        Vec::new()
    } else {
        stream.read_to_end(&mut rest).await.unwrap();
        rest
    };
    RawResp {
        status,
        headers,
        body,
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = find(data, b"\r\n").expect("chunk size line");
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .expect("chunk size");
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Every substring shaped like an emulator secret: `aoa`/`aor`/`aos`/`aod`
/// followed by at least 20 URL-safe base64 characters.
pub(crate) fn token_shaped(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let url_safe = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    let mut found = Vec::new();
    let mut i = 0;
    while i + 3 <= bytes.len() {
        let prefix = &bytes[i..i + 3];
        if matches!(prefix, b"aoa" | b"aor" | b"aos" | b"aod") {
            let run = bytes[i + 3..].iter().take_while(|b| url_safe(**b)).count();
            if run >= 20 {
                found.push(text[i..i + 3 + run].to_owned());
                i += 3 + run;
                continue;
            }
        }
        i += 1;
    }
    found
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
pub(crate) fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Runs of 24 or more URL-safe characters mixing upper case, lower case
/// and digits: what a fragment of a random token looks like (identifiers
/// and hex ids do not).
pub(crate) fn random_looking(text: &str) -> Vec<String> {
    let url_safe = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    text.split(|c: char| !url_safe(c))
        .filter(|run| {
            run.len() >= 24
                && run.chars().any(|c| c.is_ascii_uppercase())
                && run.chars().any(|c| c.is_ascii_lowercase())
                && run.chars().any(|c| c.is_ascii_digit())
        })
        .map(str::to_owned)
        .collect()
}

/// Panics if `text` holds any of `secrets` or a fragment of one (any 23
/// characters in a row), a string shaped like an emulator secret, or a
/// random-looking run (see [`random_looking`]) other than those in
/// `allowed` (e.g. the non-secret client id). Secrets are not printed, only
/// their label and a few characters.
pub(crate) fn assert_no_secrets(
    what: &str,
    text: &str,
    secrets: &[(&str, &str)],
    allowed: &[&str],
) {
    let mut text = strip_ansi(text);
    for a in allowed {
        text = text.replace(a, "<allowed>");
    }
    for (label, secret) in secrets {
        assert!(secret.len() >= 24, "{label} is too short to search for");
        if let Some(at) = text.find(secret) {
            let line = text[..at].lines().count();
            panic!("{what}: the {label} appears in line {line}");
        }
        // Windows of 16 every 8 characters: any leaked fragment of 23 or
        // more characters contains one.
        for start in (0..=secret.len() - 16).step_by(8) {
            if let Some(at) = text.find(&secret[start..start + 16]) {
                let line = text[..at].lines().count();
                panic!(
                    "{what}: a fragment of the {label} (from character {start}) appears in line {line}"
                );
            }
        }
    }
    let shaped = token_shaped(&text);
    assert!(
        shaped.is_empty(),
        "{what}: {} token-shaped strings, e.g. one starting {:?}",
        shaped.len(),
        shaped.first().map(|s| &s[..8])
    );
    let random = random_looking(&text);
    assert!(
        random.is_empty(),
        "{what}: {} random-looking strings, e.g. one starting {:?}",
        random.len(),
        random.first().map(|s| &s[..6])
    );
}
