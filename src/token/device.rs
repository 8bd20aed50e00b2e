//! The device authorization flow (RFC 8628) behind `sso-token-proxy login`:
//! RegisterClient → StartDeviceAuthorization → show the code → poll
//! CreateToken → write an AWS SSO cache file.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use sha1::{Digest, Sha1};

use super::{SsoCacheFile, Token, TokenError, sso_cache::format_time};
use crate::{
    oidc::{
        CreateTokenRequest, CreateTokenResponse, ErrorClass, OidcClient, OidcError,
        RegisterClientRequest, ServiceErrorKind, StartDeviceAuthorizationRequest,
    },
    retry::{OidcRetryPolicy, RetryConfig},
};

/// The cache file name the AWS CLI uses: hex SHA-1 of the session name (for
/// `sso_session` profiles) or of the start URL, plus `.json`.
pub fn sso_cache_file_name(session_name_or_start_url: &str) -> String {
    let digest = Sha1::digest(session_name_or_start_url.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}.json")
}

/// Settings of a device login.
#[derive(Debug, Clone)]
pub struct LoginOptions {
    /// The AWS access portal URL.
    pub start_url: String,
    /// Region written into the cache file.
    pub region: String,
    /// Client name to register.
    pub client_name: String,
    /// Scopes to request.
    pub scopes: Vec<String>,
    /// Where to write the cache file.
    pub cache_file: PathBuf,
    /// Poll interval when the service does not send one (RFC 8628: 5 s).
    pub default_interval: Duration,
    /// How much a `slow_down` adds to the interval (RFC 8628: 5 s).
    pub slow_down_increment: Duration,
    /// Retry settings for transient failures while polling.
    pub retry: RetryConfig,
}

impl LoginOptions {
    /// Options with the RFC 8628 defaults.
    pub fn new(
        start_url: impl Into<String>,
        region: impl Into<String>,
        cache_file: PathBuf,
    ) -> Self {
        Self {
            start_url: start_url.into(),
            region: region.into(),
            client_name: "sso-token-proxy".to_owned(),
            scopes: Vec::new(),
            cache_file,
            default_interval: Duration::from_secs(5),
            slow_down_increment: Duration::from_secs(5),
            retry: RetryConfig::default(),
        }
    }
}

/// What to show the person who approves the login.
#[derive(Debug, Clone)]
pub struct DevicePrompt {
    /// Where to go.
    pub verification_uri: String,
    /// The same with the code filled in, when the service gives one.
    pub verification_uri_complete: Option<String>,
    /// The code to type (not a secret: it is useless without the device code).
    pub user_code: String,
    /// How long the code stays valid.
    pub expires_in: Duration,
}

/// The first poll interval: the service's `interval` when it sends a
/// positive one, else `default`.
pub(crate) fn first_interval(interval: Option<i32>, default: Duration) -> Duration {
    match interval {
        Some(secs) if secs > 0 => Duration::from_secs(secs as u64),
        _ => default,
    }
}

/// How polling ended without a token.
#[derive(Debug)]
pub(crate) enum DevicePollError {
    /// The device code expired before anyone approved it (`ExpiredToken`,
    /// or its `expiresIn` passed): a new device authorization is needed.
    Expired,
    /// Denied, or a failure that polling again would not mend.
    Failed(TokenError),
}

/// How to poll `CreateToken` for a device code (RFC 8628 §3.4, §3.5).
#[derive(Debug, Clone)]
pub(crate) struct PollSettings {
    /// The first pause between polls (the service's `interval`).
    pub(crate) interval: Duration,
    /// What each `SlowDown` adds to the pause (RFC 8628: 5 s).
    pub(crate) slow_down_increment: Duration,
    /// How long the device code lives (`expiresIn`).
    pub(crate) expires_in: Duration,
    /// Retries of transient failures.
    pub(crate) retry: RetryConfig,
}

/// Polls `create_token` until the person approves: waits `interval`
/// before each poll, keeps polling on `AuthorizationPending`, adds
/// `slow_down_increment` to the interval for good on each `SlowDown`,
/// retries transient failures with backoff, and stops on `ExpiredToken`,
/// at the code's expiry, or on any other error.
pub(crate) async fn poll_device_token<F, Fut>(
    settings: &PollSettings,
    mut create_token: F,
) -> Result<CreateTokenResponse, DevicePollError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<CreateTokenResponse, OidcError>>,
{
    let deadline = tokio::time::Instant::now() + settings.expires_in;
    let mut interval = settings.interval;
    let mut transient = OidcRetryPolicy::new(settings.retry.clone());
    loop {
        tokio::time::sleep(interval).await;
        match create_token().await {
            Ok(response) => return Ok(response),
            Err(e) => match (e.service_kind(), e.class()) {
                (Some(ServiceErrorKind::AuthorizationPending), _) => {
                    tracing::debug!("authorization pending");
                }
                (Some(ServiceErrorKind::SlowDown), _) => {
                    interval += settings.slow_down_increment;
                    tracing::debug!(
                        interval_s = interval.as_secs_f64(),
                        "slow_down: polling less often"
                    );
                }
                (Some(ServiceErrorKind::ExpiredToken), _) => return Err(DevicePollError::Expired),
                (_, ErrorClass::Transient | ErrorClass::Throttled) => {
                    match transient.decide(&e).delay {
                        Some(delay) => tokio::time::sleep(delay).await,
                        None => return Err(DevicePollError::Failed(e.into())),
                    }
                }
                _ => return Err(DevicePollError::Failed(e.into())),
            },
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DevicePollError::Expired);
        }
    }
}

/// Runs the device flow and writes the cache file. `prompt` is called once,
/// when the person must act.
pub async fn device_login(
    oidc: &OidcClient,
    options: &LoginOptions,
    prompt: impl FnOnce(&DevicePrompt),
) -> Result<(SsoCacheFile, Token), TokenError> {
    let mut register = RegisterClientRequest::public(options.client_name.clone());
    if !options.scopes.is_empty() {
        register.scopes = Some(options.scopes.clone());
    }
    let registration = oidc.register_client(&register).await?;
    let client_id = registration
        .client_id
        .clone()
        .ok_or_else(|| TokenError::Login("RegisterClient returned no clientId".to_owned()))?;
    let client_secret = registration
        .client_secret
        .clone()
        .ok_or_else(|| TokenError::Login("RegisterClient returned no clientSecret".to_owned()))?;

    let device = oidc
        .start_device_authorization(&StartDeviceAuthorizationRequest {
            client_id: client_id.clone(),
            client_secret: client_secret.clone(),
            start_url: options.start_url.clone(),
        })
        .await?;
    let device_code = device.device_code.clone().ok_or_else(|| {
        TokenError::Login("StartDeviceAuthorization returned no deviceCode".to_owned())
    })?;
    let expires_in = Duration::from_secs(device.expires_in.unwrap_or(600).max(1) as u64);
    prompt(&DevicePrompt {
        verification_uri: device.verification_uri.clone().unwrap_or_default(),
        verification_uri_complete: device.verification_uri_complete.clone(),
        user_code: device.user_code.clone().unwrap_or_default(),
        expires_in,
    });

    let request =
        CreateTokenRequest::device_code(client_id.clone(), client_secret.clone(), device_code)
            .with_scopes(options.scopes.clone());
    let settings = PollSettings {
        interval: first_interval(device.interval, options.default_interval),
        slow_down_increment: options.slow_down_increment,
        expires_in,
        retry: options.retry.clone(),
    };
    let response = poll_device_token(&settings, || oidc.create_token(&request))
        .await
        .map_err(|e| match e {
            DevicePollError::Expired => TokenError::Login(
                "the device code expired before it was approved; run login again".to_owned(),
            ),
            DevicePollError::Failed(e) => e,
        })?;

    let token = Token::from_response(&response)?;
    let file = SsoCacheFile {
        start_url: Some(options.start_url.clone()),
        region: Some(options.region.clone()),
        access_token: Some(token.access_token().clone()),
        expires_at: Some(format_time(token.expires_at_wall())),
        client_id: Some(client_id),
        client_secret: Some(client_secret),
        registration_expires_at: registration.client_secret_expires_at.map(|secs| {
            format_time(SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64))
        }),
        refresh_token: response.refresh_token.clone(),
        extra: Default::default(),
    };
    if let Some(dir) = options.cache_file.parent()
        && !dir.as_os_str().is_empty()
    {
        // 0700 for what is created (as for the state file), although the
        // AWS CLI leaves `~/.aws/sso/cache` to the umask.
        crate::fs_atomic::create_private_dir_all(dir).map_err(|e| TokenError::File {
            path: dir.display().to_string(),
            reason: format!("cannot create cache directory: {e}"),
        })?;
    }
    file.store(&options.cache_file)?;
    Ok((file, token))
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        sync::{Arc, Mutex},
    };

    use super::*;
    use crate::{oidc::Operation, secret::Secret};

    fn service_error(kind: ServiceErrorKind) -> OidcError {
        OidcError::Service {
            operation: Operation::CreateToken,
            kind,
            details: Box::new(crate::oidc::ErrorDetails {
                status: 400,
                ..Default::default()
            }),
        }
    }

    fn approved() -> CreateTokenResponse {
        CreateTokenResponse {
            access_token: Some(Secret::new("access")),
            expires_in: Some(3600),
            ..Default::default()
        }
    }

    /// Plays `answers` and records when each poll came (paused clock).
    async fn poll_with(
        settings: PollSettings,
        answers: Vec<Result<CreateTokenResponse, OidcError>>,
    ) -> (Result<CreateTokenResponse, DevicePollError>, Vec<Duration>) {
        let start = tokio::time::Instant::now();
        let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
        let polls = Arc::new(Mutex::new(Vec::new()));
        let result = poll_device_token(&settings, || {
            polls.lock().unwrap().push(start.elapsed());
            let next = answers.lock().unwrap().pop_front().expect("an answer left");
            async move { next }
        })
        .await;
        let polls = polls.lock().unwrap().clone();
        (result, polls)
    }

    fn settings() -> PollSettings {
        PollSettings {
            interval: Duration::from_secs(5),
            slow_down_increment: Duration::from_secs(5),
            expires_in: Duration::from_secs(600),
            retry: RetryConfig::default(),
        }
    }

    /// RFC 8628 §3.5: wait `interval` before each poll; `slow_down` adds
    /// 5 s to it for good; `authorization_pending` changes nothing.
    #[tokio::test(start_paused = true)]
    async fn slow_down_adds_five_seconds_for_good() {
        let (result, polls) = poll_with(
            settings(),
            vec![
                Err(service_error(ServiceErrorKind::AuthorizationPending)),
                Err(service_error(ServiceErrorKind::SlowDown)),
                Err(service_error(ServiceErrorKind::AuthorizationPending)),
                Err(service_error(ServiceErrorKind::SlowDown)),
                Ok(approved()),
            ],
        )
        .await;
        assert!(result.is_ok());
        let secs: Vec<u64> = polls.iter().map(Duration::as_secs).collect();
        // Gaps: 5, 5, then 10 after the first slow_down, then 15.
        assert_eq!(secs, [5, 10, 20, 30, 45]);
    }

    /// `expired_token`, or the code's own expiry, ends the polling as
    /// `Expired` (the caller starts a new device authorization); a denial
    /// is a failure.
    #[tokio::test(start_paused = true)]
    async fn expiry_and_denial_end_the_polling() {
        let (result, polls) = poll_with(
            settings(),
            vec![
                Err(service_error(ServiceErrorKind::AuthorizationPending)),
                Err(service_error(ServiceErrorKind::ExpiredToken)),
            ],
        )
        .await;
        assert!(matches!(result, Err(DevicePollError::Expired)));
        assert_eq!(polls.len(), 2);

        let short = PollSettings {
            expires_in: Duration::from_secs(12),
            ..settings()
        };
        let pending = || Err(service_error(ServiceErrorKind::AuthorizationPending));
        let (result, polls) = poll_with(short, vec![pending(), pending(), pending()]).await;
        assert!(matches!(result, Err(DevicePollError::Expired)));
        assert_eq!(polls.len(), 3, "no poll after the code expired");

        let (result, _) = poll_with(
            settings(),
            vec![Err(service_error(ServiceErrorKind::AccessDenied))],
        )
        .await;
        match result {
            Err(DevicePollError::Failed(e)) => assert_eq!(e.kind_name(), "AccessDenied"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cache_file_name_is_sha1_hex() {
        // SHA-1 of "abc" is a well-known test vector.
        assert_eq!(
            sso_cache_file_name("abc"),
            "a9993e364706816aba3e25717850c26c9cd0d89d.json"
        );
    }
}
