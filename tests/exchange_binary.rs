//! 100,000 distinct callers through the real binary with
//! `max_callers = 10000`, on real sockets: each caller's JWT (the
//! emulator's ES256 test issuer) is exchanged once at an in-process
//! emulator, every request reaches a recording upstream with its own
//! caller's token, no JWT reaches the upstream's socket, and the binary's
//! resident set stays flat once the cache is full.
//!
//! Run with `cargo test --test exchange_binary -- --nocapture` (it prints
//! the binary's RSS). `EXCHANGE_PROXY_BIN=path/to/sso-token-proxy` runs it
//! against another build of the binary (`benches/exchange/callers.sh`
//! uses the release one for BENCHMARKS.md).

#[allow(dead_code)]
#[path = "support/binary_harness.rs"]
mod harness;

use std::{
    convert::Infallible,
    io,
    path::{Path, PathBuf},
    pin::Pin,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures_util::{StreamExt as _, stream};
use harness::{BIN, Http, free_addr};
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sso_token_proxy::emulator::{
    DEFAULT_APPLICATION_ARN, Emulator, EmulatorConfig, EmulatorHandle, TEST_ACCESS_KEY_ID,
    TEST_SECRET_ACCESS_KEY, token_subject,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    process::{Child, Command},
    time::timeout,
};

/// Distinct callers in the run.
const CALLERS: u32 = 100_000;
/// `max_callers` of the exchange source.
const MAX_CALLERS: u64 = 10_000;
/// RSS is read after this many callers (the cache is full and evicting)
/// and again at the end.
const WARM: u32 = 20_000;
/// Requests in flight at once.
const IN_FLIGHT: usize = 48;
/// Every this many callers one also sends a second request, a cache hit.
const SECOND_REQUEST_EVERY: u32 = 10;
/// Per request; generous, the machine is shared.
const LIMIT: Duration = Duration::from_secs(60);

// === the recording upstream ===

/// What the upstream saw, kept small: counts, the first few mismatches,
/// and whether the test issuer's JWT header ever crossed its sockets.
#[derive(Default)]
struct Record {
    requests: AtomicU64,
    own_token: AtomicU64,
    mismatches: Mutex<Vec<String>>,
    jwt_seen: AtomicBool,
    token_len: AtomicU64,
}

/// An upstream on `127.0.0.1:0` that checks each request's token against
/// the caller named in its path (`/c/<subject>/...`) and scans every byte
/// it reads for `needle`.
async fn start_upstream(needle: Arc<[u8]>) -> (String, Arc<Record>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let record = Arc::new(Record::default());
    let shared = Arc::clone(&record);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let record = Arc::clone(&shared);
            let io = Scanning {
                stream,
                needle: Arc::clone(&needle),
                tail: Vec::new(),
                record: Arc::clone(&record),
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    std::future::ready(Ok::<_, Infallible>(check(&record, &req)))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(io), service)
                    .await;
            });
        }
    });
    (url, record)
}

fn check(record: &Record, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    record.requests.fetch_add(1, Ordering::Relaxed);
    let want = req.uri().path().split('/').nth(2).unwrap_or("");
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let got = auth
        .and_then(|a| a.strip_prefix("Bearer "))
        .and_then(token_subject);
    if got.as_deref() == Some(want)
        && req.headers().get_all(header::AUTHORIZATION).iter().count() == 1
    {
        record.own_token.fetch_add(1, Ordering::Relaxed);
        record
            .token_len
            .store(auth.map_or(0, str::len) as u64, Ordering::Relaxed);
    } else {
        let mut mismatches = record.mismatches.lock().unwrap();
        if mismatches.len() < 5 {
            mismatches.push(format!("{} carried the token of {got:?}", req.uri().path()));
        }
    }
    Response::new(Full::new(Bytes::from_static(b"ok")))
}

/// The upstream's side of a connection: reads are scanned for the needle,
/// across read boundaries.
struct Scanning {
    stream: TcpStream,
    needle: Arc<[u8]>,
    /// The last `needle.len() - 1` bytes read.
    tail: Vec<u8>,
    record: Arc<Record>,
}

impl AsyncRead for Scanning {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        let new = &buf.filled()[before..];
        if !new.is_empty() {
            let mut window = std::mem::take(&mut this.tail);
            window.extend_from_slice(new);
            if window
                .windows(this.needle.len())
                .any(|w| *w == *this.needle)
            {
                this.record.jwt_seen.store(true, Ordering::Relaxed);
            }
            let keep = this.needle.len() - 1;
            this.tail = window[window.len().saturating_sub(keep)..].to_vec();
        }
        result
    }
}

impl AsyncWrite for Scanning {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

// === the binary ===

/// The binary under test: `EXCHANGE_PROXY_BIN`, or this build's.
fn binary() -> PathBuf {
    std::env::var_os("EXCHANGE_PROXY_BIN").map_or_else(|| PathBuf::from(BIN), PathBuf::from)
}

/// The binary's config: the pod's own token from an assertion file (the
/// `[token]` every config has; no route uses it) and one route whose
/// callers' tokens are exchanged.
fn write_config(emulator: &EmulatorHandle, dir: &Path, upstream: &str) -> (PathBuf, String) {
    let (listen, admin) = (free_addr(), free_addr());
    let assertion = dir.join("pod.jwt");
    let pod = emulator.mint_assertion("pod", Duration::from_secs(3600));
    std::fs::write(&assertion, pod.expose()).unwrap();
    let text = format!(
        r#"[proxy]
listen = "{listen}"
[admin]
listen = "{admin}"
[oidc]
endpoint = "{url}"
region = "us-east-1"
client_id = "{DEFAULT_APPLICATION_ARN}"
[token]
source = "jwt_bearer"
assertion_file = "{assertion}"
[sources.callers]
source = "exchange"
client_id = "{DEFAULT_APPLICATION_ARN}"
grant = "jwt_bearer"
max_callers = {MAX_CALLERS}
[[route]]
name = "callers"
upstream = "{upstream}"
token_source = "callers"
"#,
        url = emulator.url(),
        assertion = assertion.display(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    (path, format!("{listen}|{admin}"))
}

/// Starts the binary with the emulator's test keys as its AWS credentials
/// (the standard chain, from the environment; nothing else reachable).
fn spawn(dir: &Path, config: &Path) -> Child {
    let mut cmd = Command::new(binary());
    for (key, _) in std::env::vars() {
        if key.starts_with("AWS_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", TEST_SECRET_ACCESS_KEY)
        .env("AWS_CONFIG_FILE", dir.join("no-aws-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            dir.join("no-aws-credentials"),
        )
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "warn")
        .env_remove("RUST_BACKTRACE")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("proxy.stderr")).unwrap(),
        ))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sso-token-proxy")
}

/// The resident set of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// `sso_token_proxy_caller_cache_entries{source="callers"}` from `/metrics`.
async fn held_callers(http: &Http, admin: &str) -> f64 {
    let metrics = http.get(&format!("http://{admin}/metrics")).await;
    assert_eq!(metrics.status, StatusCode::OK);
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    text.lines()
        .find(|l| l.starts_with("sso_token_proxy_caller_cache_entries{source=\"callers\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no caller_cache_entries gauge in:\n{text}"))
}

/// The header segment every JWT of the emulator's test issuer starts with.
fn jwt_header(emulator: &EmulatorHandle) -> Arc<[u8]> {
    let sample = emulator.mint_assertion("sample", Duration::from_secs(60));
    format!("{}.", sample.expose().split('.').next().unwrap())
        .into_bytes()
        .into()
}

/// The binary, started and ready.
struct Running {
    child: Child,
    pid: u32,
    listen: String,
    admin: String,
}

impl Running {
    async fn stop(&mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
    }
}

/// Starts the binary for `upstream` and waits until `/readyz` answers 200.
async fn start_proxy(emulator: &EmulatorHandle, dir: &Path, upstream: &str) -> Running {
    let (config, addrs) = write_config(emulator, dir, upstream);
    let (listen, admin) = addrs.split_once('|').unwrap();
    let mut child = spawn(dir, &config);
    let pid = child.id().unwrap();
    let http = Http::new();
    let ready = format!("http://{admin}/readyz");
    let deadline = tokio::time::Instant::now() + LIMIT;
    let log = || std::fs::read_to_string(dir.join("proxy.stderr")).unwrap_or_default();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the proxy exited ({status}):\n{}", log());
        }
        match http.try_get(&ready).await {
            Ok(r) if r.status == StatusCode::OK => break,
            last => assert!(
                tokio::time::Instant::now() < deadline,
                "not ready in {LIMIT:?}: {last:?}\n{}",
                log()
            ),
        }
        tokio::time::sleep(harness::STEP).await;
    }
    Running {
        child,
        pid,
        listen: listen.to_owned(),
        admin: admin.to_owned(),
    }
}

/// Callers `range`, `IN_FLIGHT` requests at a time, each with its own JWT;
/// every `SECOND_REQUEST_EVERY`th caller sends a second request (a hit).
async fn drive(http: &Http, emulator: &EmulatorHandle, listen: &str, range: std::ops::Range<u32>) {
    let requests = range.flat_map(|i| {
        let times = if i % SECOND_REQUEST_EVERY == 0 { 2 } else { 1 };
        std::iter::repeat_n(i, times)
    });
    // Consecutive requests of one caller share its JWT; minted once.
    let last: Mutex<Option<(u32, String)>> = Mutex::new(None);
    let statuses = stream::iter(requests)
        .map(|i| {
            let jwt = {
                let mut last = last.lock().unwrap();
                match &*last {
                    Some((n, jwt)) if *n == i => jwt.clone(),
                    _ => {
                        let jwt = emulator
                            .mint_assertion(&format!("caller-{i}"), Duration::from_secs(3600))
                            .expose()
                            .to_owned();
                        *last = Some((i, jwt.clone()));
                        jwt
                    }
                }
            };
            let request = Request::get(format!("http://{listen}/c/caller-{i}/x"))
                .header(header::AUTHORIZATION, format!("Bearer {jwt}"))
                .body(harness::empty())
                .unwrap();
            async move {
                let response = timeout(LIMIT, http.try_send(request))
                    .await
                    .unwrap_or_else(|_| panic!("caller-{i}: no answer in {LIMIT:?}"))
                    .unwrap_or_else(|e| panic!("caller-{i}: {e}"));
                (i, response.status)
            }
        })
        .buffer_unordered(IN_FLIGHT);
    statuses
        .for_each(|(i, status)| {
            assert_eq!(status, StatusCode::OK, "caller-{i}");
            std::future::ready(())
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_callers_through_the_binary_keep_their_tokens_in_bounded_memory() {
    let started = std::time::Instant::now();
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    // Every JWT of the test issuer starts with this header segment.
    let (upstream, record) = start_upstream(jwt_header(&emulator)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = start_proxy(&emulator, dir.path(), &upstream).await;
    let (listen, admin, pid) = (&*proxy.listen, &*proxy.admin, proxy.pid);
    let http = Http::new();
    // Whatever was exchanged before the first caller (nothing: no route
    // uses `[token]`) is not a caller's.
    let before = emulator.counters().create_token_with_iam;
    let rss_ready = rss_kib(pid);

    drive(&http, &emulator, listen, 0..MAX_CALLERS as u32).await;
    let rss_full = rss_kib(pid);
    drive(&http, &emulator, listen, MAX_CALLERS as u32..WARM).await;
    let rss_warm = rss_kib(pid);
    let held_warm = held_callers(&http, admin).await;
    drive(&http, &emulator, listen, WARM..CALLERS).await;
    let rss_end = rss_kib(pid);
    let held_end = held_callers(&http, admin).await;

    // Every request reached the upstream with its own caller's token.
    let requests = u64::from(CALLERS + CALLERS.div_ceil(SECOND_REQUEST_EVERY));
    let mismatches = record.mismatches.lock().unwrap().clone();
    assert!(mismatches.is_empty(), "{mismatches:?}");
    assert_eq!(record.requests.load(Ordering::Relaxed), requests);
    assert_eq!(record.own_token.load(Ordering::Relaxed), requests);
    assert!(
        !record.jwt_seen.load(Ordering::Relaxed),
        "a caller's JWT reached the upstream"
    );
    // One exchange per caller: the second requests were hits.
    let counters = emulator.counters();
    assert_eq!(
        counters.create_token_with_iam - before,
        u64::from(CALLERS),
        "{counters:?}"
    );
    for held in [held_warm, held_end] {
        assert!(
            held > 0.0 && held <= MAX_CALLERS as f64,
            "{held} callers held"
        );
    }

    // Memory. Once the cache is full (10,000 callers) the binary holds the
    // same number of entries whatever the number of callers seen. Had it
    // kept every caller, the 80,000 callers after `WARM` would have cost at
    // least their entries' payload: the exchanged token and its
    // `Bearer <token>` header value (two heap copies) and the 32-byte key,
    // before any moka or allocator overhead (the measured cost is about ten
    // times that). Growth must stay below half of that lower bound: room
    // for allocator noise, far from what keeping every caller would take.
    let token_len = record.token_len.load(Ordering::Relaxed) - "Bearer ".len() as u64;
    let entry_payload = 2 * token_len + "Bearer ".len() as u64 + 32;
    let unbounded_kib = u64::from(CALLERS - WARM) * entry_payload / 1024;
    let growth = rss_end.saturating_sub(rss_warm);
    eprintln!(
        "binary {}: RSS {rss_ready} KiB ready, {rss_full} KiB after {MAX_CALLERS} callers, \
         {rss_warm} KiB after {WARM}, {rss_end} KiB after {CALLERS} ({held_end} held); \
         growth after {WARM}: {growth} KiB; unbounded would be >= {unbounded_kib} KiB; \
         {requests} requests in {:.0?}",
        binary().display(),
        started.elapsed()
    );
    assert!(
        growth * 2 < unbounded_kib,
        "RSS grew {growth} KiB over the last {} callers (unbounded: >= {unbounded_kib} KiB)",
        CALLERS - WARM
    );
    proxy.stop().await;
}

#[tokio::test]
async fn the_callers_gauge_falls_to_zero_once_their_tokens_expire() {
    let emulator = Emulator::start(EmulatorConfig {
        access_token_lifetime: Duration::from_secs(2),
        ..Default::default()
    })
    .await
    .unwrap();
    let (upstream, record) = start_upstream(jwt_header(&emulator)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = start_proxy(&emulator, dir.path(), &upstream).await;
    let http = Http::new();
    drive(&http, &emulator, &proxy.listen, 0..3).await;
    assert_eq!(record.own_token.load(Ordering::Relaxed), 4);
    // Read at the scrape, not left from the last exchange.
    assert_eq!(held_callers(&http, &proxy.admin).await, 3.0);
    // With no traffic, the tokens expire and moka lets them go.
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let held = held_callers(&http, &proxy.admin).await;
        if held == 0.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{held} callers still held"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    proxy.stop().await;
}
