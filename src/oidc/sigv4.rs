//! SigV4 for `CreateTokenWithIAM`: AWS credentials from the standard chain
//! (through `aws-config`), held until shortly before they expire, and request
//! signing with `aws-sigv4` for the signing name `sso-oauth`.
//!
//! The chain is the SDKs' own: environment variables, the shared config and
//! credentials files (static keys, `role_arn` with a source, and
//! `credential_process`), web identity (IRSA), the container endpoint (ECS
//! task roles and EKS Pod Identity) and EC2 instance metadata (IMDSv2).
//! Profiles that log in through IAM Identity Center (`sso_session`) are not
//! supported: this build leaves out the SDK's `sso` feature.
//!
//! The SDK caches credentials inside its clients' orchestrator, which a
//! hand-built request does not go through; [`AwsCredentials`] applies the
//! same rule in front of the chain: reuse until a margin before the
//! expiry the provider reported, re-resolve credentials without an expiry
//! every 15 minutes (the SDK's default), one resolution at a time.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use aws_credential_types::{
    Credentials,
    provider::{ProvideCredentials, SharedCredentialsProvider, error::CredentialsError},
};
use aws_sigv4::{
    http_request::{SignableBody, SignableRequest, SigningSettings, sign},
    sign::v4,
};
use aws_smithy_runtime_api::client::identity::Identity;
use sha2::{Digest as _, Sha256};
use tokio::sync::{Mutex, OnceCell};

use super::error::{Cause, OidcError, Operation};
use crate::{metric_names::AWS_CREDENTIALS_LOADS_TOTAL, secret::Secret};

/// The SigV4 signing name of IAM Identity Center OIDC (`aws.auth#sigv4` in
/// the service model).
pub const SIGNING_NAME: &str = "sso-oauth";

/// Credentials are replaced this long before they expire (or at half their
/// remaining life, if that is sooner).
const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(300);
/// Credentials without an expiry are resolved again after this long.
const NO_EXPIRY_REUSE: Duration = Duration::from_secs(900);

// === impl AwsCredentials ===

/// AWS credentials for signing: a provider and the cache in front of it.
/// Cheap to clone; clones share the cache.
#[derive(Clone)]
pub struct AwsCredentials {
    inner: Arc<CredentialsInner>,
}

struct CredentialsInner {
    /// The provider, built on first use (building the default chain reads
    /// files and the environment).
    provider: OnceCell<SharedCredentialsProvider>,
    /// For the default chain: the region its STS calls use.
    chain_region: Option<String>,
    /// Held across a resolution, so concurrent signers wait for one.
    cached: Mutex<Option<Cached>>,
}

struct Cached {
    credentials: Credentials,
    reuse_until: SystemTime,
}

impl fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("default_chain", &self.inner.chain_region.is_some())
            .finish_non_exhaustive()
    }
}

impl AwsCredentials {
    /// The standard AWS credential chain; `region` is used by the providers
    /// that call STS (web identity, `role_arn` profiles). Built lazily.
    pub fn default_chain(region: impl Into<String>) -> Self {
        Self::with(OnceCell::new(), Some(region.into()))
    }

    /// Any credentials provider (e.g. one the application already has).
    pub fn from_provider(provider: impl ProvideCredentials + 'static) -> Self {
        Self::with(
            OnceCell::new_with(Some(SharedCredentialsProvider::new(provider))),
            None,
        )
    }

    /// Fixed keys, for tests and the emulator.
    pub fn fixed(
        access_key_id: &str,
        secret_access_key: &Secret,
        session_token: Option<&Secret>,
    ) -> Self {
        Self::from_provider(Credentials::new(
            access_key_id,
            secret_access_key.expose(),
            session_token.map(|t| t.expose().to_owned()),
            None,
            "sso-token-proxy-fixed",
        ))
    }

    fn with(provider: OnceCell<SharedCredentialsProvider>, chain_region: Option<String>) -> Self {
        Self {
            inner: Arc::new(CredentialsInner {
                provider,
                chain_region,
                cached: Mutex::new(None),
            }),
        }
    }

    /// Credentials that are good for a while yet. When the provider fails
    /// while the held credentials are still unexpired, those are used.
    pub async fn get(&self) -> Result<Credentials, CredentialsError> {
        let mut cached = self.inner.cached.lock().await;
        let now = SystemTime::now();
        if let Some(c) = cached.as_ref()
            && now < c.reuse_until
        {
            return Ok(c.credentials.clone());
        }
        let provider = self
            .inner
            .provider
            .get_or_init(|| build_default_chain(self.inner.chain_region.clone()))
            .await;
        match provider.provide_credentials().await {
            Ok(credentials) => {
                metrics::counter!(AWS_CREDENTIALS_LOADS_TOTAL.name, "outcome" => "ok").increment(1);
                let now = SystemTime::now();
                let reuse_until = reuse_until(credentials.expiry(), now);
                tracing::debug!(
                    reuse_secs = reuse_until
                        .duration_since(now)
                        .unwrap_or_default()
                        .as_secs(),
                    "AWS credentials resolved"
                );
                *cached = Some(Cached {
                    credentials: credentials.clone(),
                    reuse_until,
                });
                Ok(credentials)
            }
            Err(e) => {
                metrics::counter!(AWS_CREDENTIALS_LOADS_TOTAL.name, "outcome" => "error")
                    .increment(1);
                match cached.as_ref() {
                    Some(c) if c.credentials.expiry().is_none_or(|exp| now < exp) => {
                        tracing::warn!(error = %e, "could not refresh AWS credentials; using the held ones until they expire");
                        Ok(c.credentials.clone())
                    }
                    _ => Err(e),
                }
            }
        }
    }
}

/// When held credentials stop being reused: a margin before their expiry
/// (the smaller of 5 minutes and half the remaining life), or 15 minutes
/// after resolution when they have no expiry.
fn reuse_until(expiry: Option<SystemTime>, now: SystemTime) -> SystemTime {
    match expiry {
        None => now + NO_EXPIRY_REUSE,
        Some(expiry) => {
            let left = expiry.duration_since(now).unwrap_or_default();
            expiry - REFRESH_BEFORE_EXPIRY.min(left / 2)
        }
    }
}

async fn build_default_chain(region: Option<String>) -> SharedCredentialsProvider {
    use aws_config::{
        default_provider::credentials::DefaultCredentialsChain, provider_config::ProviderConfig,
    };
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};

    // rustls on ring, like every other client in this process.
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let region = region.map(aws_config::Region::new);
    let config = ProviderConfig::without_region()
        .with_region(region.clone())
        .with_http_client(http);
    let mut builder = DefaultCredentialsChain::builder().configure(config);
    if let Some(region) = region {
        builder = builder.region(region);
    }
    SharedCredentialsProvider::new(builder.build().await)
}

// === impl SigV4Signer ===

/// Signs SSO-OIDC requests with SigV4 for one region. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SigV4Signer {
    credentials: AwsCredentials,
    region: String,
}

impl SigV4Signer {
    /// A signer for `region` (the region in the credential scope; the
    /// service's region).
    pub fn new(credentials: AwsCredentials, region: impl Into<String>) -> Self {
        Self {
            credentials,
            region: region.into(),
        }
    }

    /// The signing region.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The credentials behind the signer.
    pub fn credentials(&self) -> &AwsCredentials {
        &self.credentials
    }

    /// Adds `x-amz-date`, `authorization` (and `x-amz-security-token` for
    /// temporary credentials) to `request`, whose body is `body`.
    pub async fn sign<B>(
        &self,
        operation: Operation,
        request: &mut http::Request<B>,
        body: &[u8],
    ) -> Result<(), OidcError> {
        let credentials = self
            .credentials
            .get()
            .await
            .map_err(|e| credentials_error(operation, e))?;
        sign_request(&credentials, &self.region, SystemTime::now(), request, body).map_err(|e| {
            OidcError::Credentials {
                operation,
                retryable: false,
                source: Cause::new(e),
            }
        })
    }
}

fn credentials_error(operation: Operation, error: CredentialsError) -> OidcError {
    // A timeout or a provider's failure (STS, IMDS, the container endpoint)
    // may pass; no credentials at all, or a broken configuration, will not.
    let retryable = !matches!(
        error,
        CredentialsError::CredentialsNotLoaded(_) | CredentialsError::InvalidConfiguration(_)
    );
    OidcError::Credentials {
        operation,
        retryable,
        source: Cause::new(error),
    }
}

/// Why a request could not be signed (never carries a credential).
#[derive(Debug, thiserror::Error)]
#[error("SigV4 signing failed: {0}")]
pub(crate) struct SigningError(String);

/// Signs `request` (body `body`) at `time`: deterministic for fixed
/// credentials and time. The payload goes to the signer as its SHA-256
/// only, so no signer log can ever show it.
pub(crate) fn sign_request<B>(
    credentials: &Credentials,
    region: &str,
    time: SystemTime,
    request: &mut http::Request<B>,
    body: &[u8],
) -> Result<(), SigningError> {
    let identity = Identity::from(credentials.clone());
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(SIGNING_NAME)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| SigningError(e.to_string()))?
        .into();
    let headers = request
        .headers()
        .iter()
        .map(|(name, value)| {
            value
                .to_str()
                .map(|v| (name.as_str(), v))
                .map_err(|_| SigningError(format!("header {name} is not visible ASCII")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let payload_hash = hex(&Sha256::digest(body));
    let signable = SignableRequest::new(
        request.method().as_str(),
        request.uri().to_string(),
        headers.into_iter(),
        SignableBody::Precomputed(payload_hash),
    )
    .map_err(|e| SigningError(e.to_string()))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| SigningError(e.to_string()))?
        .into_parts();
    instructions.apply_to_request_http1x(request);
    // The signature is a secret too: keep it out of any header dump.
    if let Some(value) = request.headers_mut().get_mut(http::header::AUTHORIZATION) {
        value.set_sensitive(true);
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> http::Request<()> {
        http::Request::post("https://oidc.us-east-1.amazonaws.com/token?aws_iam=t")
            .header("content-type", "application/json")
            .body(())
            .unwrap()
    }

    fn credentials(token: Option<&str>) -> Credentials {
        Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            token.map(str::to_owned),
            None,
            "test",
        )
    }

    fn authorization(req: &http::Request<()>) -> String {
        req.headers()["authorization"].to_str().unwrap().to_owned()
    }

    #[test]
    fn signing_is_deterministic_for_fixed_credentials_and_time() {
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_440_938_160);
        let body =
            br#"{"clientId":"arn:x","grantType":"urn:ietf:params:oauth:grant-type:jwt-bearer"}"#;
        let mut a = request();
        let mut b = request();
        sign_request(&credentials(None), "us-east-1", time, &mut a, body).unwrap();
        sign_request(&credentials(None), "us-east-1", time, &mut b, body).unwrap();
        assert_eq!(authorization(&a), authorization(&b));
        let auth = authorization(&a);
        assert!(
            auth.starts_with(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/sso-oauth/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature="
            ),
            "{auth}"
        );
        assert_eq!(a.headers()["x-amz-date"], "20150830T123600Z");
        assert!(a.headers()["authorization"].is_sensitive());

        // Any change to body, time, region or key changes the signature.
        let mut other = request();
        sign_request(&credentials(None), "us-east-1", time, &mut other, b"{}").unwrap();
        assert_ne!(authorization(&other), auth);
        let mut other = request();
        sign_request(
            &credentials(None),
            "us-east-1",
            time + Duration::from_secs(1),
            &mut other,
            body,
        )
        .unwrap();
        assert_ne!(authorization(&other), auth);
        let mut other = request();
        sign_request(&credentials(None), "eu-west-1", time, &mut other, body).unwrap();
        assert_ne!(authorization(&other), auth);
        let other_key = Credentials::new("AKIDEXAMPLE", "another", None, None, "test");
        let mut other = request();
        sign_request(&other_key, "us-east-1", time, &mut other, body).unwrap();
        assert_ne!(authorization(&other), auth);
    }

    #[test]
    fn a_session_token_is_sent_signed_and_sensitive() {
        let mut req = request();
        sign_request(
            &credentials(Some("S3CRET-session")),
            "us-east-1",
            SystemTime::now(),
            &mut req,
            b"{}",
        )
        .unwrap();
        let token = &req.headers()["x-amz-security-token"];
        assert_eq!(token, "S3CRET-session");
        assert!(token.is_sensitive());
        assert!(authorization(&req).contains("x-amz-security-token"));
    }

    #[test]
    fn debug_shows_no_secret() {
        let creds = AwsCredentials::fixed(
            "AKIDEXAMPLE",
            &Secret::new("S3CRET-key"),
            Some(&Secret::new("S3CRET-token")),
        );
        let signer = SigV4Signer::new(creds, "us-east-1");
        let text = format!("{signer:?}");
        assert!(!text.contains("S3CRET"), "{text}");
        let text = format!("{:?}", credentials(Some("S3CRET-token")));
        assert!(
            !text.contains("S3CRET") && !text.contains("wJalr"),
            "{text}"
        );
    }

    #[test]
    fn reuse_margin_scales_with_the_remaining_life() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let hour = now + Duration::from_secs(3600);
        assert_eq!(
            reuse_until(Some(hour), now),
            hour - Duration::from_secs(300)
        );
        let soon = now + Duration::from_secs(120);
        assert_eq!(reuse_until(Some(soon), now), now + Duration::from_secs(60));
        assert_eq!(
            reuse_until(Some(now - Duration::from_secs(1)), now),
            now - Duration::from_secs(1)
        );
        assert_eq!(reuse_until(None, now), now + Duration::from_secs(900));
    }

    #[tokio::test]
    async fn fixed_credentials_resolve() {
        let creds = AwsCredentials::fixed("AKIDEXAMPLE", &Secret::new("k"), None);
        let got = creds.get().await.unwrap();
        assert_eq!(got.access_key_id(), "AKIDEXAMPLE");
        assert_eq!(got.secret_access_key(), "k");
    }
}
