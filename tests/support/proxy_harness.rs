//! Harness for `tests/proxy.rs`: an in-process `Proxy` on 127.0.0.1:0 over a
//! counting token source, a hyper HTTP/1.1 upstream that records what it
//! receives, HTTP/1.1 and h2c clients, and a raw TCP client for requests no
//! well-behaved client would send.

use std::{
    collections::HashSet,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use sha2::{Digest as _, Sha256};
use sso_token_proxy::{
    Secret,
    cache::{CacheOptions, TokenCache},
    oidc::{ErrorDetails, OidcError, Operation, ServiceErrorKind},
    proxy::{Proxy, ProxyConfig},
    token::{FetchFuture, Reuse, Token, TokenError, TokenSource},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{Notify, mpsc, oneshot},
    task::JoinHandle,
};

/// Bound on any single wait in these tests, so a bug fails instead of hanging.
pub(crate) const HANG_GUARD: Duration = Duration::from_secs(20);

pub(crate) type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

// === token source ===

/// Hands out `token-1`, `token-2`, ... and counts the calls; fails with
/// `InvalidGrant` while `failing` is set.
#[derive(Default)]
pub(crate) struct SourceState {
    calls: AtomicUsize,
    failing: AtomicBool,
}

impl SourceState {
    pub(crate) fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

struct CountingSource(Arc<SourceState>);

impl TokenSource for CountingSource {
    fn identity(&self) -> String {
        "test-source".into()
    }

    fn scopes(&self) -> &[String] {
        &[]
    }

    fn fetch(&self, _reuse: Reuse) -> FetchFuture<'_> {
        let n = self.0.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let failing = self.0.failing.load(Ordering::SeqCst);
        Box::pin(async move {
            if failing {
                return Err(TokenError::Oidc(OidcError::Service {
                    operation: Operation::CreateToken,
                    kind: ServiceErrorKind::InvalidGrant,
                    details: Box::new(ErrorDetails {
                        status: 400,
                        error: Some("invalid_grant".into()),
                        ..Default::default()
                    }),
                }));
            }
            Ok(Token::new(
                Secret::new(format!("token-{n}")),
                Duration::from_secs(3600),
            ))
        })
    }
}

// === upstream ===

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) method: String,
    pub(crate) uri: String,
    pub(crate) version: Version,
    pub(crate) headers: HeaderMap,
    pub(crate) body_len: u64,
    pub(crate) body_sha256: String,
    /// Trailer fields that came after the body, if any.
    pub(crate) trailers: HeaderMap,
}

impl Seen {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    pub(crate) fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }
}

#[derive(Default)]
struct UpstreamState {
    seen: Mutex<Vec<Seen>>,
    /// `Authorization` values answered `401`.
    rejected: Mutex<HashSet<String>>,
    /// Answer every request `401`, whatever it carries.
    reject_all: AtomicBool,
    /// Held requests report here once their head and body have arrived.
    arrived: Mutex<Option<mpsc::UnboundedSender<String>>>,
    release: Notify,
    /// Answer `401` to a request without `Authorization`, as a protected
    /// resource does.
    require_authorization: AtomicBool,
    /// Every byte received on plain-HTTP connections, in arrival order.
    received: Mutex<Vec<u8>>,
    /// Connections accepted, and connections that have ended.
    accepted: AtomicUsize,
    ended: AtomicUsize,
    ended_changed: Notify,
}

/// A hyper HTTP/1.1 server that records every request. Behaviour is chosen
/// by request headers:
///
/// * `x-test-hold`: report arrival, then wait for [`Upstream::release`]
///   (forever if never released).
/// * `x-test-response-bytes: N`: stream N bytes of [`pattern`].
/// * `x-test-set-cookies`: answer with two `Set-Cookie` fields.
/// * `x-test-hop-headers`: answer with hop-by-hop fields that must not reach
///   the client.
/// * `x-test-response-headers: N`: add N fields `x-h-0` … to the answer.
/// * `x-test-response-header-bytes: N`: add one field of N bytes.
///
/// A `TRACE` is answered as its final recipient should: with the request
/// head it received (token included) as a `message/http` body.
pub(crate) struct Upstream {
    pub(crate) addr: SocketAddr,
    state: Arc<UpstreamState>,
    arrived: tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>,
    _task: AbortOnDrop,
}

impl Upstream {
    /// A plain-HTTP/1.1 upstream.
    pub(crate) async fn start() -> Self {
        Self::start_with(None, None).await
    }

    /// A plain-HTTP/1.1 upstream that closes a keep-alive connection once it
    /// has been idle for `keep_alive`, as servers and load balancers do.
    pub(crate) async fn start_closing_idle_after(keep_alive: Duration) -> Self {
        Self::start_with(None, Some(keep_alive)).await
    }

    /// An https upstream (HTTP/1.1 and HTTP/2, chosen by ALPN from `alpn`)
    /// with a fresh self-signed certificate for 127.0.0.1, written as PEM to
    /// the returned file.
    pub(crate) async fn start_tls(alpn: &[&[u8]]) -> (Self, tempfile::NamedTempFile) {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let mut ca_file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut ca_file, cert.cert.pem().as_bytes()).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        (Self::start_with(Some(acceptor), None).await, ca_file)
    }

    async fn start_with(
        tls: Option<tokio_rustls::TlsAcceptor>,
        keep_alive: Option<Duration>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState::default());
        let (tx, rx) = mpsc::unbounded_channel();
        *state.arrived.lock().unwrap() = Some(tx);
        let task_state = Arc::clone(&state);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                task_state.accepted.fetch_add(1, Ordering::SeqCst);
                let state = Arc::clone(&task_state);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _ended = EndedGuard(Arc::clone(&state));
                    let recorded = Arc::clone(&state);
                    let service = service_fn(move |req| upstream_handle(Arc::clone(&state), req));
                    match tls {
                        None => {
                            let stream = Recording {
                                inner: stream,
                                state: recorded,
                            };
                            let mut builder = hyper::server::conn::http1::Builder::new();
                            if let Some(keep_alive) = keep_alive {
                                // hyper's header timer also runs while a
                                // keep-alive connection waits for its next
                                // request: an idle timeout.
                                builder
                                    .timer(hyper_util::rt::TokioTimer::new())
                                    .header_read_timeout(keep_alive);
                            }
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        Some(tls) => {
                            let Ok(stream) = tls.accept(stream).await else {
                                return;
                            };
                            let _ =
                                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            state,
            arrived: tokio::sync::Mutex::new(rx),
            _task: AbortOnDrop(task),
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// From now on, requests without `Authorization` are answered `401`.
    pub(crate) fn require_authorization(&self) {
        self.state
            .require_authorization
            .store(true, Ordering::SeqCst);
    }

    /// Every byte the upstream received over plain HTTP so far.
    pub(crate) fn received_bytes(&self) -> Vec<u8> {
        self.state.received.lock().unwrap().clone()
    }

    pub(crate) fn reject(&self, authorization: &str) {
        self.state
            .rejected
            .lock()
            .unwrap()
            .insert(authorization.to_owned());
    }

    /// From now on answers every request `401`.
    pub(crate) fn reject_all(&self) {
        self.state.reject_all.store(true, Ordering::SeqCst);
    }

    /// Waits until a held request has arrived; returns its path.
    pub(crate) async fn wait_arrived(&self) -> String {
        let mut rx = self.arrived.lock().await;
        tokio::time::timeout(HANG_GUARD, rx.recv())
            .await
            .expect("held request never arrived")
            .unwrap()
    }

    /// Lets every held request answer.
    pub(crate) fn release(&self) {
        self.state.release.notify_waiters();
    }

    /// Connections accepted so far.
    pub(crate) fn connections(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Waits until `n` connections in all have ended (closed by either
    /// side).
    pub(crate) async fn wait_ended(&self, n: usize) {
        let wait = async {
            loop {
                let changed = self.state.ended_changed.notified();
                if self.state.ended.load(Ordering::SeqCst) >= n {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(HANG_GUARD, wait)
            .await
            .unwrap_or_else(|_| panic!("fewer than {n} upstream connections ever ended"));
    }
}

/// A plain upstream connection that copies what it reads into
/// [`UpstreamState::received`].
struct Recording {
    inner: TcpStream,
    state: Arc<UpstreamState>,
}

impl tokio::io::AsyncRead for Recording {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &result {
            this.state
                .received
                .lock()
                .unwrap()
                .extend_from_slice(&buf.filled()[before..]);
        }
        result
    }
}

impl tokio::io::AsyncWrite for Recording {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts a connection as ended when its task finishes.
struct EndedGuard(Arc<UpstreamState>);

impl Drop for EndedGuard {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Ordering::SeqCst);
        self.0.ended_changed.notify_waiters();
    }
}

async fn upstream_handle(
    state: Arc<UpstreamState>,
    req: Request<Incoming>,
) -> Result<Response<TestBody>, Infallible> {
    let (parts, mut body) = req.into_parts();
    let mut hasher = Sha256::new();
    let mut body_len = 0u64;
    let mut trailers = HeaderMap::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        match frame.into_data() {
            Ok(data) => {
                body_len += data.len() as u64;
                hasher.update(&data);
            }
            Err(frame) => {
                if let Ok(fields) = frame.into_trailers() {
                    trailers.extend(fields);
                }
            }
        }
    }
    let seen = Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        version: parts.version,
        headers: parts.headers.clone(),
        body_len,
        body_sha256: hex(&hasher.finalize()),
        trailers,
    };
    state.seen.lock().unwrap().push(seen);

    // What RFC 9110 §9.3.8 asks of a TRACE's final recipient (Apache's
    // default): the request head as received, back to the client.
    if parts.method == Method::TRACE {
        let mut echo = format!("TRACE {} {:?}\r\n", parts.uri, parts.version);
        for (name, value) in &parts.headers {
            echo.push_str(&format!(
                "{name}: {}\r\n",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
        let mut response = Response::new(full(echo));
        response
            .headers_mut()
            .insert("content-type", HeaderValue::from_static("message/http"));
        return Ok(response);
    }

    let headers = &parts.headers;
    if headers.contains_key("x-test-hold") {
        let released = state.release.notified();
        tokio::pin!(released);
        released.as_mut().enable();
        if let Some(tx) = &*state.arrived.lock().unwrap() {
            let _ = tx.send(parts.uri.path().to_owned());
        }
        released.await;
    }

    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let missing = authorization.is_empty() && state.require_authorization.load(Ordering::SeqCst);
    if missing
        || state.reject_all.load(Ordering::SeqCst)
        || state.rejected.lock().unwrap().contains(authorization)
    {
        let mut response = Response::new(full("rejected"));
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        response
            .headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        return Ok(response);
    }

    let mut response = match headers.get("x-test-response-bytes") {
        Some(n) => {
            let n: usize = n.to_str().unwrap().parse().unwrap();
            let mut response = Response::new(chunked_pattern(n));
            response
                .headers_mut()
                .insert("content-length", HeaderValue::from(n));
            response
        }
        None => Response::new(full("ok")),
    };
    let out = response.headers_mut();
    out.insert("x-upstream", HeaderValue::from_static("yes"));
    if let Some(n) = headers.get("x-test-response-headers") {
        let n: usize = n.to_str().unwrap().parse().unwrap();
        for i in 0..n {
            let name = http::HeaderName::try_from(format!("x-h-{i}")).unwrap();
            out.insert(name, HeaderValue::from(i));
        }
    }
    if let Some(n) = headers.get("x-test-response-header-bytes") {
        let n: usize = n.to_str().unwrap().parse().unwrap();
        out.insert("x-big", HeaderValue::try_from("b".repeat(n)).unwrap());
    }
    if headers.contains_key("x-test-set-cookies") {
        out.append("set-cookie", HeaderValue::from_static("a=1; Path=/"));
        out.append(
            "set-cookie",
            HeaderValue::from_static("b=2; Path=/; HttpOnly"),
        );
    }
    if headers.contains_key("x-test-hop-headers") {
        out.insert("connection", HeaderValue::from_static("x-resp-hop"));
        out.insert("x-resp-hop", HeaderValue::from_static("1"));
        out.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        out.insert(
            "proxy-authenticate",
            HeaderValue::from_static("Basic realm=\"x\""),
        );
        out.insert("upgrade", HeaderValue::from_static("h2c"));
        out.insert("x-resp-end-to-end", HeaderValue::from_static("kept"));
    }
    Ok(response)
}

// === bodies ===

pub(crate) fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into()).map_err(|e| match e {}).boxed()
}

pub(crate) fn empty() -> TestBody {
    full(Bytes::new())
}

/// Byte `i` of every test pattern.
pub(crate) fn pattern_byte(i: usize) -> u8 {
    (i % 251) as u8
}

/// `n` pattern bytes streamed in 64 KiB chunks, with no length known up front.
pub(crate) fn chunked_pattern(n: usize) -> TestBody {
    const CHUNK: usize = 64 * 1024;
    let chunks = (0..n.div_ceil(CHUNK)).map(move |c| {
        let start = c * CHUNK;
        let end = (start + CHUNK).min(n);
        let data: Vec<u8> = (start..end).map(pattern_byte).collect();
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(Bytes::from(
            data,
        )))
    });
    StreamBody::new(futures_util::stream::iter(chunks)).boxed()
}

pub(crate) fn pattern_sha256(n: usize) -> String {
    let mut hasher = Sha256::new();
    let data: Vec<u8> = (0..n).map(pattern_byte).collect();
    hasher.update(&data);
    hex(&hasher.finalize())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// === proxy ===

pub(crate) fn proxy_config(upstream: &str) -> ProxyConfig {
    ProxyConfig {
        shutdown_grace: Duration::from_secs(10),
        header_read_timeout: Duration::from_secs(10),
        upstream_connect_timeout: Duration::from_secs(2),
        upstream_response_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(30),
        max_replay_body_bytes: 64 * 1024,
        ..ProxyConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            upstream.parse::<Uri>().unwrap(),
        )
    }
}

/// A proxy served in-process until [`RunningProxy::shutdown`] or drop.
pub(crate) struct RunningProxy {
    pub(crate) addr: SocketAddr,
    pub(crate) source: Arc<SourceState>,
    shutdown: Option<oneshot::Sender<()>>,
    serve: Option<JoinHandle<std::io::Result<()>>>,
}

impl RunningProxy {
    pub(crate) async fn start(config: ProxyConfig) -> Self {
        Self::start_with(config, false).await
    }

    pub(crate) async fn start_with(config: ProxyConfig, failing_source: bool) -> Self {
        let source = Arc::new(SourceState::default());
        source.failing.store(failing_source, Ordering::SeqCst);
        let cache = TokenCache::new(CountingSource(Arc::clone(&source)), CacheOptions::default());
        let proxy = Proxy::new(&config, cache).expect("proxy builds");
        let listener = TcpListener::bind(config.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let serve = tokio::spawn(proxy.serve(listener, async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            source,
            shutdown: Some(tx),
            serve: Some(serve),
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Starts the graceful shutdown.
    pub(crate) fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub(crate) fn is_serving(&self) -> bool {
        self.serve.as_ref().is_some_and(|s| !s.is_finished())
    }

    /// Waits for `serve` to return.
    pub(crate) async fn join(&mut self) -> std::io::Result<()> {
        let serve = self.serve.take().expect("joined once");
        tokio::time::timeout(HANG_GUARD, serve)
            .await
            .expect("serve did not return")
            .unwrap()
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        if let Some(serve) = &self.serve {
            serve.abort();
        }
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// === clients ===

pub(crate) fn h1_client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub(crate) fn h2c_client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Sends `request` and collects the response.
pub(crate) async fn send(
    client: &Client<HttpConnector, TestBody>,
    request: Request<TestBody>,
) -> (http::response::Parts, Bytes) {
    let response = tokio::time::timeout(HANG_GUARD, client.request(request))
        .await
        .expect("response in time")
        .expect("response");
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(HANG_GUARD, body.collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    (parts, body)
}

/// Waits, at most [`HANG_GUARD`], for a request spawned earlier (a task
/// that ran [`send`]) and asserts that it was answered `200 OK`.
pub(crate) async fn answered_ok(spawned: tokio::task::JoinHandle<(http::response::Parts, Bytes)>) {
    let (parts, _) = tokio::time::timeout(HANG_GUARD, spawned)
        .await
        .expect("the spawned request was answered in time")
        .expect("the spawned request's task ran to its end");
    assert_eq!(parts.status, http::StatusCode::OK);
}

/// A response read off a raw socket.
#[derive(Debug)]
pub(crate) struct RawResponse {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl RawResponse {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

/// Writes `request` as is, reads the response until the server closes the
/// connection (send `Connection: close`), and parses it. The body must be
/// sent with `Content-Length`.
pub(crate) async fn raw(addr: SocketAddr, request: &str) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(HANG_GUARD, stream.read_to_end(&mut bytes))
        .await
        .expect("server closed the connection in time")
        .unwrap();
    let split = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = std::str::from_utf8(&bytes[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    RawResponse {
        status,
        headers,
        body: bytes[split + 4..].to_vec(),
    }
}
