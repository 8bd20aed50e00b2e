//! `CreateTokenWithIAM` on real sockets: the SigV4-signing client against the
//! emulator's independent verifier over HTTP and HTTPS/h2, every modelled
//! error, wrong keys refused, and the `jwt_bearer` source through the token
//! cache with a rotating assertion file.

#[path = "support/tls_front.rs"]
mod tls_front;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use sso_token_proxy::{
    Secret,
    cache::{CacheOptions, TokenCache},
    emulator::{
        DEFAULT_APPLICATION_ARN, DEFAULT_AUDIENCE, Emulator, EmulatorApplication, EmulatorConfig,
        EmulatorHandle, Fault, TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, token_subject,
    },
    oidc::{
        AwsCredentials, CreateTokenWithIamRequest, ErrorClass, OidcClient, OidcError, Operation,
        ServiceErrorKind, SigV4Signer, TOKEN_TYPE_ACCESS_TOKEN,
    },
    retry::{OidcRetryPolicy, RetryConfig},
    token::{IamExchange, JwtBearerSource, Reuse, TokenError, TokenSource},
};
use tls_front::tls_front;

const OTHER_APP: &str = "arn:aws:sso::111122223333:application/ssoins-1111111111111111/apl-2222";

async fn emulator() -> EmulatorHandle {
    Emulator::start(EmulatorConfig {
        applications: vec![
            EmulatorApplication::default(),
            EmulatorApplication {
                arn: OTHER_APP.into(),
                audiences: vec![],
                scopes: vec!["read".into(), "write".into()],
            },
        ],
        ..Default::default()
    })
    .await
    .unwrap()
}

fn signer(secret: &str) -> SigV4Signer {
    SigV4Signer::new(
        AwsCredentials::fixed(TEST_ACCESS_KEY_ID, &Secret::new(secret), None),
        "us-east-1",
    )
}

fn client(url: &str, secret: &str) -> OidcClient {
    OidcClient::builder()
        .endpoint(url)
        .sigv4(signer(secret))
        .build()
        .unwrap()
}

fn jwt_bearer(emulator: &EmulatorHandle, subject: &str) -> CreateTokenWithIamRequest {
    CreateTokenWithIamRequest::jwt_bearer(
        DEFAULT_APPLICATION_ARN,
        emulator.mint_assertion(subject, Duration::from_secs(600)),
    )
}

#[tokio::test]
async fn signed_exchanges_verify_and_carry_the_subject() {
    let emulator = emulator().await;
    let client = client(&emulator.url(), TEST_SECRET_ACCESS_KEY);

    let resp = client
        .create_token_with_iam(&jwt_bearer(&emulator, "alice"))
        .await
        .unwrap();
    let access = resp.access_token.clone().unwrap();
    assert_eq!(token_subject(access.expose()).as_deref(), Some("alice"));
    assert!(emulator.is_access_token_live(access.expose()));
    assert_eq!(resp.token_type.as_deref(), Some("Bearer"));
    assert_eq!(
        resp.issued_token_type.as_deref(),
        Some(TOKEN_TYPE_ACCESS_TOKEN)
    );
    assert!(resp.expires_in.unwrap() > 0 && resp.id_token.is_some());
    assert!(
        resp.aws_additional_details
            .unwrap()
            .identity_context
            .is_some()
    );

    // Token exchange at another application keeps the user, narrows scopes.
    let exchanged = client
        .create_token_with_iam(
            &CreateTokenWithIamRequest::token_exchange(OTHER_APP, access, TOKEN_TYPE_ACCESS_TOKEN)
                .with_scopes(vec!["read".into()]),
        )
        .await
        .unwrap();
    assert_eq!(
        token_subject(exchanged.access_token.unwrap().expose()).as_deref(),
        Some("alice")
    );
    assert_eq!(exchanged.scope, Some(vec!["read".to_owned()]));

    let counters = emulator.counters();
    assert_eq!(counters.create_token_with_iam, 2);
    assert_eq!(counters.create_token, 0, "IAM calls are not CreateToken");
    assert_eq!(counters.tokens_issued, 2);
    assert!(counters.errors_by_kind.is_empty(), "{counters:?}");
}

#[tokio::test]
async fn wrong_secret_or_unknown_key_is_refused_before_the_operation() {
    let emulator = emulator().await;
    let wrong = client(&emulator.url(), "not-the-emulator-secret");
    let err = wrong
        .create_token_with_iam(&jwt_bearer(&emulator, "alice"))
        .await
        .unwrap_err();
    match &err {
        OidcError::Unknown { code, status, .. } => {
            assert_eq!(code.as_deref(), Some("InvalidSignatureException"));
            assert_eq!(*status, 403);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(err.class(), ErrorClass::Fatal);
    assert!(err.to_string().contains("HTTP 403"), "{err}");

    let stranger = OidcClient::builder()
        .endpoint(emulator.url())
        .sigv4(SigV4Signer::new(
            AwsCredentials::fixed("AKIAUNKNOWN000000000", &Secret::new("x"), None),
            "us-east-1",
        ))
        .build()
        .unwrap();
    let err = stranger
        .create_token_with_iam(&jwt_bearer(&emulator, "alice"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, OidcError::Unknown { code: Some(c), status: 403, .. } if c == "UnrecognizedClientException"),
        "{err:?}"
    );

    // An injected fault is not reached without a valid signature.
    emulator.inject(
        Operation::CreateTokenWithIam,
        [Fault::Error(ServiceErrorKind::SlowDown)],
    );
    let err = wrong
        .create_token_with_iam(&jwt_bearer(&emulator, "alice"))
        .await
        .unwrap_err();
    assert!(matches!(err, OidcError::Unknown { status: 403, .. }));

    let counters = emulator.counters();
    assert_eq!(counters.create_token_with_iam, 3);
    assert_eq!(counters.errors_by_kind["InvalidSignature"], 2);
    assert_eq!(counters.errors_by_kind["UnrecognizedClient"], 1);
    assert_eq!(counters.tokens_issued, 0);
    assert!(counters.create_token_with_iam_by_grant.is_empty());
}

#[tokio::test]
async fn no_signer_means_nothing_is_sent() {
    let emulator = emulator().await;
    let unsigned = OidcClient::builder()
        .endpoint(emulator.url())
        .build()
        .unwrap();
    let err = unsigned
        .create_token_with_iam(&jwt_bearer(&emulator, "alice"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            OidcError::Credentials {
                retryable: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.class(), ErrorClass::Fatal);
    assert_eq!(emulator.counters().create_token_with_iam, 0);
}

#[tokio::test]
async fn every_modelled_error_decodes_with_its_class() {
    let emulator = emulator().await;
    let client = client(&emulator.url(), TEST_SECRET_ACCESS_KEY);
    let request = jwt_bearer(&emulator, "alice");
    for kind in [
        ServiceErrorKind::InvalidRequest,
        ServiceErrorKind::InvalidClient,
        ServiceErrorKind::InvalidGrant,
        ServiceErrorKind::UnauthorizedClient,
        ServiceErrorKind::UnsupportedGrantType,
        ServiceErrorKind::InvalidScope,
        ServiceErrorKind::AuthorizationPending,
        ServiceErrorKind::SlowDown,
        ServiceErrorKind::AccessDenied,
        ServiceErrorKind::ExpiredToken,
        ServiceErrorKind::InternalServer,
        ServiceErrorKind::InvalidRequestRegion,
    ] {
        emulator.inject(Operation::CreateTokenWithIam, [Fault::Error(kind)]);
        let err = client.create_token_with_iam(&request).await.unwrap_err();
        assert_eq!(err.service_kind(), Some(kind), "{err:?}");
        assert_eq!(err.operation(), Operation::CreateTokenWithIam);
        assert_eq!(err.class(), kind.class(), "{kind}");
        assert_eq!(err.details().unwrap().status, kind.status().as_u16());
    }
    // The emulator's own rules: an expired assertion is InvalidGrant.
    let expired = CreateTokenWithIamRequest::jwt_bearer(
        DEFAULT_APPLICATION_ARN,
        emulator.mint_assertion_with("alice", DEFAULT_AUDIENCE, Duration::from_secs(60), true),
    );
    let err = client.create_token_with_iam(&expired).await.unwrap_err();
    assert_eq!(err.service_kind(), Some(ServiceErrorKind::InvalidGrant));
    // The service's words are kept for the caller who asks, never shown.
    let said = err.details().unwrap().error_description.as_deref();
    assert!(
        said.is_some_and(|d| d.contains("Assertion has expired")),
        "{said:?}"
    );
    assert!(!err.to_string().contains("Assertion"), "{err}");
    let wrong_audience = CreateTokenWithIamRequest::jwt_bearer(
        DEFAULT_APPLICATION_ARN,
        emulator.mint_assertion_with("alice", "someone-else", Duration::from_secs(60), false),
    );
    let err = client
        .create_token_with_iam(&wrong_audience)
        .await
        .unwrap_err();
    assert_eq!(err.service_kind(), Some(ServiceErrorKind::InvalidGrant));
    assert_eq!(emulator.counters().tokens_issued, 0);
}

#[tokio::test]
async fn signed_calls_verify_over_https_and_h2() {
    let emulator = emulator().await;
    let front = tls_front(&emulator).await;
    let build = |secret: &str| {
        OidcClient::builder()
            .endpoint(format!("https://localhost:{}", front.port))
            .tls_config(front.client_config())
            .sigv4(signer(secret))
            .build()
            .unwrap()
    };
    let resp = build(TEST_SECRET_ACCESS_KEY)
        .create_token_with_iam(&jwt_bearer(&emulator, "bob"))
        .await
        .unwrap();
    assert_eq!(
        token_subject(resp.access_token.unwrap().expose()).as_deref(),
        Some("bob")
    );
    let err = build("wrong")
        .create_token_with_iam(&jwt_bearer(&emulator, "bob"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, OidcError::Unknown { status: 403, .. }),
        "{err:?}"
    );
    let negotiated = front.negotiated.lock().unwrap().clone();
    assert!(
        !negotiated.is_empty() && negotiated.iter().all(|p| p.as_deref() == Some(&b"h2"[..])),
        "{negotiated:?}"
    );
}

// === the jwt_bearer source ===

fn write_assertion(path: &Path, emulator: &EmulatorHandle, subject: &str, expired: bool) {
    let jwt =
        emulator.mint_assertion_with(subject, DEFAULT_AUDIENCE, Duration::from_secs(600), expired);
    replace_file(path, format!("{}\n", jwt.expose()).as_bytes()).unwrap();
}

fn source(emulator: &EmulatorHandle, file: &Path) -> JwtBearerSource {
    let exchange = IamExchange::new(
        client(&emulator.url(), TEST_SECRET_ACCESS_KEY),
        DEFAULT_APPLICATION_ARN,
    )
    .retry_policy(OidcRetryPolicy::new(RetryConfig::default()));
    JwtBearerSource::new(exchange, file)
}

#[tokio::test]
async fn jwt_bearer_source_rereads_a_rotated_assertion() {
    let emulator = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    write_assertion(&file, &emulator, "pod-a", false);
    let source = source(&emulator, &file);

    let first = source
        .fetch(Reuse::IfValidFor(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(
        token_subject(first.access_token().expose()).as_deref(),
        Some("pod-a")
    );
    write_assertion(&file, &emulator, "pod-b", false);
    // A held, valid token is reused without reading the file or calling AWS.
    let again = source
        .fetch(Reuse::IfValidFor(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(again.id(), first.id());
    assert_eq!(emulator.counters().create_token_with_iam, 1);
    // A new exchange reads the rotated file.
    let second = source.fetch(Reuse::Never).await.unwrap();
    assert_eq!(
        token_subject(second.access_token().expose()).as_deref(),
        Some("pod-b")
    );
    assert_eq!(emulator.counters().create_token_with_iam, 2);
    assert!(source.identity().starts_with("jwt_bearer:arn:aws:sso::"));
}

#[tokio::test]
async fn jwt_bearer_source_refreshes_through_the_cache_and_follows_rotation() {
    let emulator = emulator().await;
    // Short-lived tokens, so the cache has to refresh on its own.
    emulator.set_access_token_lifetime(Duration::from_secs(3));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    write_assertion(&file, &emulator, "pod-a", false);
    let cache = TokenCache::new(
        source(&emulator, &file),
        CacheOptions {
            refresh_before_expiry: Duration::from_secs(1),
            expiry_margin: Duration::from_millis(200),
            ..Default::default()
        },
    );
    let first = cache.get().await.unwrap();
    assert_eq!(
        token_subject(first.access_token().expose()).as_deref(),
        Some("pod-a")
    );

    // The kubelet rotates the projected token; the next refresh uses it.
    write_assertion(&file, &emulator, "pod-b", false);
    let deadline = Instant::now() + Duration::from_secs(30);
    let rotated = loop {
        let token = cache.get().await.unwrap();
        if token_subject(token.access_token().expose()).as_deref() == Some("pod-b") {
            break token;
        }
        assert!(
            Instant::now() < deadline,
            "no refresh picked up the rotated assertion"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(rotated.id(), first.id());
    assert!(emulator.is_access_token_live(rotated.access_token().expose()));
    let counters = emulator.counters();
    assert!(counters.create_token_with_iam >= 2, "{counters:?}");
    assert_eq!(
        counters.create_token_with_iam_by_grant["urn:ietf:params:oauth:grant-type:jwt-bearer"],
        counters.create_token_with_iam
    );
}

#[tokio::test]
async fn expired_assertion_is_a_typed_fatal_error_and_is_not_retried() {
    let emulator = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    write_assertion(&file, &emulator, "pod-a", true);
    let jwt = std::fs::read_to_string(&file).unwrap();
    let cache = TokenCache::new(source(&emulator, &file), CacheOptions::default());

    let err = cache.get().await.unwrap_err();
    assert_eq!(err.kind(), "InvalidGrant");
    assert_eq!(err.class(), ErrorClass::Fatal);
    assert!(matches!(
        &err.source,
        TokenError::Oidc(OidcError::Service {
            kind: ServiceErrorKind::InvalidGrant,
            operation: Operation::CreateTokenWithIam,
            ..
        })
    ));
    assert!(!format!("{err} {err:?}").contains(jwt.trim()));
    // Remembered: a second request inside the backoff makes no call.
    assert!(cache.get().await.is_err());
    assert_eq!(emulator.counters().create_token_with_iam, 1);
}

#[tokio::test]
async fn a_missing_assertion_file_is_a_file_error_and_sends_nothing() {
    let emulator = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let source = source(&emulator, &dir.path().join("absent"));
    let err = source.fetch(Reuse::Never).await.unwrap_err();
    assert!(matches!(err, TokenError::File { .. }), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Fatal);
    assert_eq!(emulator.counters().create_token_with_iam, 0);
}

/// Replaces `path` as a kubelet does: a new file renamed over the old one.
fn replace_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}
