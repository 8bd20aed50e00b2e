//! The SSO-OIDC HTTP client: one pooled hyper client, restJson1 bodies,
//! typed errors. It never retries; the retry policy wraps it.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use serde::{Serialize, de::DeserializeOwned};

use super::{
    endpoint::{EndpointError, EndpointParams, resolve_endpoint},
    error::{Cause, OidcError, Operation, parse_error_response},
    model::*,
};
use crate::tls;

/// Largest response body the client reads; OIDC responses are a few KiB.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientBuildError {
    /// Endpoint resolution failed.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsConfigError),
    /// Neither an endpoint nor a region was given.
    #[error("no SSO-OIDC endpoint: set a region or an explicit endpoint URL")]
    NoEndpoint,
}

/// Builds an [`OidcClient`].
#[derive(Debug, Clone)]
pub struct OidcClientBuilder {
    params: EndpointParams,
    connect_timeout: Duration,
    call_timeout: Duration,
    tls: Option<rustls::ClientConfig>,
    #[cfg(feature = "aws-iam")]
    signer: Option<super::sigv4::SigV4Signer>,
}

impl Default for OidcClientBuilder {
    fn default() -> Self {
        Self {
            params: EndpointParams::default(),
            connect_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(15),
            tls: None,
            #[cfg(feature = "aws-iam")]
            signer: None,
        }
    }
}

impl OidcClientBuilder {
    /// Resolve the endpoint from this region (see [`resolve_endpoint`]).
    #[must_use]
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.params.region = Some(region.into());
        self
    }

    /// Use this endpoint URL instead of the regional one. Plain `http` is
    /// accepted only here, for loopback emulators and test doubles.
    #[must_use]
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.params.endpoint = Some(url.into());
        self
    }

    /// Use the FIPS endpoint.
    #[must_use]
    pub fn fips(mut self, on: bool) -> Self {
        self.params.use_fips = on;
        self
    }

    /// Use the dual-stack (IPv6) endpoint.
    #[must_use]
    pub fn dual_stack(mut self, on: bool) -> Self {
        self.params.use_dual_stack = on;
        self
    }

    /// TCP connect timeout (default 5 s).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Timeout for one whole call, headers and body (default 15 s).
    #[must_use]
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// A custom rustls configuration (default: webpki roots).
    #[must_use]
    pub fn tls_config(mut self, config: rustls::ClientConfig) -> Self {
        self.tls = Some(config);
        self
    }

    /// Signs `CreateTokenWithIAM` calls with this signer (SigV4 for
    /// `sso-oauth`). Without one, those calls fail before anything is sent.
    #[cfg(feature = "aws-iam")]
    #[must_use]
    pub fn sigv4(mut self, signer: super::sigv4::SigV4Signer) -> Self {
        self.signer = Some(signer);
        self
    }

    /// Builds the client.
    pub fn build(self) -> Result<OidcClient, ClientBuildError> {
        if self.params.region.is_none() && self.params.endpoint.is_none() {
            return Err(ClientBuildError::NoEndpoint);
        }
        let base = resolve_endpoint(&self.params)?;
        let tls = match self.tls {
            Some(config) => config,
            None => tls::client_config(None)?,
        };
        let connector = tls::https_connector(tls, self.connect_timeout);
        let http = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .timer(TokioTimer::new())
            .build(connector);
        Ok(OidcClient {
            inner: Arc::new(Inner {
                http,
                base,
                call_timeout: self.call_timeout,
                #[cfg(feature = "aws-iam")]
                signer: self.signer,
            }),
        })
    }
}

/// A client for the SSO-OIDC operations. Cheap to clone; clones share the
/// connection pool.
///
/// # Example
///
/// ```no_run
/// use sso_token_proxy::{OidcClient, Secret, oidc::CreateTokenRequest};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // https://oidc.eu-west-1.amazonaws.com, from the AWS endpoint rules.
/// let client = OidcClient::builder().region("eu-west-1").build()?;
/// let request = CreateTokenRequest::refresh(
///     "my-client-id",
///     Secret::new("my-client-secret"),
///     Secret::new("my-refresh-token"),
/// );
/// let response = client.create_token(&request).await?;
/// println!("expires in {:?} s", response.expires_in);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct OidcClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: Uri,
    call_timeout: Duration,
    #[cfg(feature = "aws-iam")]
    signer: Option<super::sigv4::SigV4Signer>,
}

impl std::fmt::Debug for OidcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcClient")
            .field("endpoint", &self.inner.base)
            .field("call_timeout", &self.inner.call_timeout)
            .finish()
    }
}

impl OidcClient {
    /// A builder with default timeouts.
    pub fn builder() -> OidcClientBuilder {
        OidcClientBuilder::default()
    }

    /// The resolved endpoint.
    pub fn endpoint(&self) -> &Uri {
        &self.inner.base
    }

    /// `CreateToken`: exchanges a refresh token, device code or
    /// authorization code for tokens.
    pub async fn create_token(
        &self,
        request: &CreateTokenRequest,
    ) -> Result<CreateTokenResponse, OidcError> {
        self.call(Operation::CreateToken, request).await
    }

    /// `CreateTokenWithIAM`: exchanges a JWT from a trusted token issuer, an
    /// Identity Center token of another application, a refresh token or an
    /// authorization code for an application's tokens. Signed with the
    /// builder's [`sigv4`](OidcClientBuilder::sigv4) signer.
    #[cfg(feature = "aws-iam")]
    pub async fn create_token_with_iam(
        &self,
        request: &CreateTokenWithIamRequest,
    ) -> Result<CreateTokenWithIamResponse, OidcError> {
        self.call(Operation::CreateTokenWithIam, request).await
    }

    /// `RegisterClient`: registers a public client.
    pub async fn register_client(
        &self,
        request: &RegisterClientRequest,
    ) -> Result<RegisterClientResponse, OidcError> {
        self.call(Operation::RegisterClient, request).await
    }

    /// `StartDeviceAuthorization`: starts the device flow.
    pub async fn start_device_authorization(
        &self,
        request: &StartDeviceAuthorizationRequest,
    ) -> Result<StartDeviceAuthorizationResponse, OidcError> {
        self.call(Operation::StartDeviceAuthorization, request)
            .await
    }

    async fn call<I: Serialize, O: DeserializeOwned>(
        &self,
        operation: Operation,
        input: &I,
    ) -> Result<O, OidcError> {
        let timeout = self.inner.call_timeout;
        match tokio::time::timeout(timeout, self.call_inner(operation, input)).await {
            Ok(result) => result,
            Err(_) => Err(OidcError::Timeout { operation, timeout }),
        }
    }

    async fn call_inner<I: Serialize, O: DeserializeOwned>(
        &self,
        operation: Operation,
        input: &I,
    ) -> Result<O, OidcError> {
        let body = Bytes::from(serde_json::to_vec(input).map_err(|e| OidcError::Decode {
            operation,
            status: 0,
            message: format!("cannot encode request: {e}"),
        })?);
        let uri = join_path(&self.inner.base, operation.path());
        #[cfg_attr(not(feature = "aws-iam"), allow(unused_mut))]
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("sso-token-proxy/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(body.clone()))
            .expect("static request parts are valid");
        if operation == Operation::CreateTokenWithIam {
            self.sign(operation, &mut request, &body).await?;
        }

        let response = self
            .inner
            .http
            .request(request)
            .await
            .map_err(|e| transport_error(operation, e))?;
        let (parts, body) = response.into_parts();
        let bytes = Limited::new(body, MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| match e.downcast::<http_body_util::LengthLimitError>() {
                Ok(_) => OidcError::Decode {
                    operation,
                    status: parts.status.as_u16(),
                    message: format!("response body larger than {MAX_RESPONSE_BYTES} bytes"),
                },
                Err(e) => OidcError::Io {
                    operation,
                    source: Cause::new(e),
                },
            })?
            .to_bytes();

        if !parts.status.is_success() {
            return Err(parse_error_response(
                operation,
                parts.status,
                &parts.headers,
                &bytes,
            ));
        }
        decode_success(operation, parts.status, &bytes)
    }
}

impl OidcClient {
    #[cfg(feature = "aws-iam")]
    async fn sign(
        &self,
        operation: Operation,
        request: &mut Request<Full<Bytes>>,
        body: &[u8],
    ) -> Result<(), OidcError> {
        let Some(signer) = &self.inner.signer else {
            return Err(no_signer(operation));
        };
        signer.sign(operation, request, body).await
    }

    #[cfg(not(feature = "aws-iam"))]
    async fn sign(
        &self,
        operation: Operation,
        _request: &mut Request<Full<Bytes>>,
        _body: &[u8],
    ) -> Result<(), OidcError> {
        Err(no_signer(operation))
    }
}

fn no_signer(operation: Operation) -> OidcError {
    OidcError::Credentials {
        operation,
        retryable: false,
        source: Cause::new(if cfg!(feature = "aws-iam") {
            "this client has no SigV4 signer (OidcClientBuilder::sigv4)"
        } else {
            "this build has no AWS IAM support (Cargo feature `aws-iam`)"
        }),
    }
}

fn decode_success<O: DeserializeOwned>(
    operation: Operation,
    status: StatusCode,
    bytes: &[u8],
) -> Result<O, OidcError> {
    // Category and position only: serde_json quotes a value of the wrong
    // type, and a response may carry (or echo) a secret anywhere.
    serde_json::from_slice(bytes).map_err(|e| OidcError::Decode {
        operation,
        status: status.as_u16(),
        message: crate::token::json_error_reason(&e),
    })
}

/// Appends an operation path to the endpoint, keeping any base path.
fn join_path(base: &Uri, path: &str) -> Uri {
    let prefix = base.path().trim_end_matches('/');
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(
        format!("{prefix}{path}")
            .parse()
            .expect("endpoint path and operation path form a valid path"),
    );
    Uri::from_parts(parts).expect("endpoint with a new path is a valid URI")
}

/// Whether a rustls error hides anywhere in the chain. `io::Error` wraps
/// its cause without exposing it through `source()`, so look inside too.
fn is_tls_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    if error.downcast_ref::<rustls::Error>().is_some() {
        return true;
    }
    if let Some(io) = error.downcast_ref::<std::io::Error>()
        && let Some(inner) = io.get_ref()
        && is_tls_failure(inner)
    {
        return true;
    }
    error.source().is_some_and(is_tls_failure)
}

fn transport_error(operation: Operation, error: hyper_util::client::legacy::Error) -> OidcError {
    if is_tls_failure(&error) {
        OidcError::Tls {
            operation,
            source: Cause::new(error),
        }
    } else if error.is_connect() {
        OidcError::Connect {
            operation,
            source: Cause::new(error),
        }
    } else {
        OidcError::Io {
            operation,
            source: Cause::new(error),
        }
    }
}

// === impl tower::Service ===

/// `CreateToken` as a tower service, so the retry policy can wrap it.
impl tower::Service<CreateTokenRequest> for OidcClient {
    type Response = CreateTokenResponse;
    type Error = OidcError;
    type Future = Pin<Box<dyn Future<Output = Result<CreateTokenResponse, OidcError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The pool grows on demand; there is no capacity to wait for.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: CreateTokenRequest) -> Self::Future {
        let client = self.clone();
        Box::pin(async move { client.create_token(&request).await })
    }
}

/// `CreateTokenWithIAM` as a tower service, so the retry policy can wrap it.
#[cfg(feature = "aws-iam")]
impl tower::Service<CreateTokenWithIamRequest> for OidcClient {
    type Response = CreateTokenWithIamResponse;
    type Error = OidcError;
    type Future =
        Pin<Box<dyn Future<Output = Result<CreateTokenWithIamResponse, OidcError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: CreateTokenWithIamRequest) -> Self::Future {
        let client = self.clone();
        Box::pin(async move { client.create_token_with_iam(&request).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_success_is_described_without_its_values() {
        // `expiresIn` of the wrong type, holding what the endpoint echoed.
        let body = br#"{"accessToken":"aoa-x","tokenType":"Bearer","expiresIn":"RT-canary-91bd","refreshToken":"RT-canary-91bd"}"#;
        let e = decode_success::<CreateTokenResponse>(Operation::CreateToken, StatusCode::OK, body)
            .unwrap_err();
        let shown = e.to_string();
        assert!(matches!(e, OidcError::Decode { status: 200, .. }), "{e:?}");
        assert!(shown.contains("wrong shape"), "{shown}");
        assert!(!shown.contains("canary"), "{shown}");
        assert!(!format!("{e:?}").contains("canary"));
    }

    #[test]
    fn join_keeps_base_path() {
        let base: Uri = "http://127.0.0.1:8999".parse().unwrap();
        assert_eq!(
            join_path(&base, "/token").to_string(),
            "http://127.0.0.1:8999/token"
        );
        let base: Uri = "https://gw.example/oidc/".parse().unwrap();
        assert_eq!(
            join_path(&base, "/token").to_string(),
            "https://gw.example/oidc/token"
        );
        assert_eq!(
            join_path(&base, Operation::CreateTokenWithIam.path()).to_string(),
            "https://gw.example/oidc/token?aws_iam=t"
        );
    }

    #[test]
    fn builder_needs_an_endpoint() {
        assert!(matches!(
            OidcClient::builder().build(),
            Err(ClientBuildError::NoEndpoint)
        ));
    }

    #[tokio::test]
    async fn connection_refused_is_transient_connect_error() {
        // Bind then drop to get a port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = OidcClient::builder()
            .endpoint(format!("http://127.0.0.1:{port}"))
            .build()
            .unwrap();
        let err = client
            .create_token(&CreateTokenRequest::refresh("c", "s".into(), "r".into()))
            .await
            .unwrap_err();
        assert!(matches!(err, OidcError::Connect { .. }), "{err:?}");
        assert_eq!(err.class(), crate::oidc::ErrorClass::Transient);
    }

    #[tokio::test]
    async fn a_silent_server_times_out_as_transient() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accept and hold connections without answering.
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            loop {
                let (c, _) = listener.accept().await.unwrap();
                conns.push(c);
            }
        });
        let client = OidcClient::builder()
            .endpoint(format!("http://{addr}"))
            .call_timeout(Duration::from_millis(200))
            .build()
            .unwrap();
        let err = client
            .create_token(&CreateTokenRequest::refresh("c", "s".into(), "r".into()))
            .await
            .unwrap_err();
        assert!(matches!(err, OidcError::Timeout { .. }), "{err:?}");
        assert_eq!(err.class(), crate::oidc::ErrorClass::Transient);
        held.abort();
    }
}
