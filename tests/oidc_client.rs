//! The SSO-OIDC client over real HTTPS: certificate verification through
//! rustls, HTTP/2 by ALPN, and every grant type round-tripped against the
//! emulator behind a TLS terminator.

#[path = "support/tls_front.rs"]
mod tls_front;

use sso_token_proxy::{
    emulator::{Emulator, EmulatorConfig, Fault},
    oidc::{
        CreateTokenRequest, ErrorClass, OidcClient, OidcError, Operation, RegisterClientRequest,
        ServiceErrorKind, StartDeviceAuthorizationRequest,
    },
};
use tls_front::tls_front;

#[tokio::test]
async fn untrusted_certificate_is_a_fatal_tls_error() {
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let front = tls_front(&emulator).await;
    let client = OidcClient::builder()
        .endpoint(format!("https://localhost:{}", front.port))
        .build()
        .unwrap();
    let err = client
        .register_client(&RegisterClientRequest::public("tls-test"))
        .await
        .unwrap_err();
    assert!(matches!(err, OidcError::Tls { .. }), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Fatal);
    assert_eq!(emulator.counters().register_client, 0);
}

#[tokio::test]
async fn every_operation_and_grant_round_trips_over_https_and_h2() {
    let emulator = Emulator::start(EmulatorConfig {
        device_poll_interval: std::time::Duration::ZERO,
        ..Default::default()
    })
    .await
    .unwrap();
    let front = tls_front(&emulator).await;
    // A caller's own rustls config, trusting the front's certificate only.
    let tls = front.client_config();
    let client = OidcClient::builder()
        .endpoint(format!("https://localhost:{}", front.port))
        .tls_config(tls)
        .build()
        .unwrap();

    // RegisterClient, StartDeviceAuthorization, device_code grant.
    let reg = client
        .register_client(&RegisterClientRequest::public("tls-test"))
        .await
        .unwrap();
    let (id, secret) = (reg.client_id.unwrap(), reg.client_secret.unwrap());
    let device = client
        .start_device_authorization(&StartDeviceAuthorizationRequest {
            client_id: id.clone(),
            client_secret: secret.clone(),
            start_url: "https://example.awsapps.com/start".into(),
        })
        .await
        .unwrap();
    let poll = CreateTokenRequest::device_code(
        id.clone(),
        secret.clone(),
        device.device_code.clone().unwrap(),
    );
    let pending = client.create_token(&poll).await.unwrap_err();
    assert_eq!(
        pending.service_kind(),
        Some(ServiceErrorKind::AuthorizationPending)
    );
    assert_eq!(pending.class(), ErrorClass::Pending);
    assert!(emulator.approve(device.user_code.as_deref().unwrap()));
    let tokens = client.create_token(&poll).await.unwrap();
    assert!(emulator.is_access_token_live(tokens.access_token.as_ref().unwrap().expose()));

    // refresh_token grant.
    let refreshed = client
        .create_token(&CreateTokenRequest::refresh(
            id.clone(),
            secret.clone(),
            tokens.refresh_token.unwrap(),
        ))
        .await
        .unwrap();
    assert!(refreshed.access_token.is_some() && refreshed.expires_in.unwrap() > 0);

    // authorization_code grant with PKCE (RFC 7636 appendix B values).
    let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
    let code = emulator.issue_authorization_code(&id, "http://127.0.0.1/cb", Some(challenge));
    let by_code = client
        .create_token(&CreateTokenRequest::authorization_code(
            id.clone(),
            secret.clone(),
            code,
            "http://127.0.0.1/cb",
            Some(verifier.into()),
        ))
        .await
        .unwrap();
    assert!(by_code.id_token.is_some());

    // Every CreateToken error decodes to its own variant with its class.
    for kind in [
        ServiceErrorKind::AccessDenied,
        ServiceErrorKind::AuthorizationPending,
        ServiceErrorKind::ExpiredToken,
        ServiceErrorKind::InternalServer,
        ServiceErrorKind::InvalidClient,
        ServiceErrorKind::InvalidGrant,
        ServiceErrorKind::InvalidRequest,
        ServiceErrorKind::InvalidScope,
        ServiceErrorKind::SlowDown,
        ServiceErrorKind::UnauthorizedClient,
        ServiceErrorKind::UnsupportedGrantType,
    ] {
        emulator.inject(Operation::CreateToken, [Fault::Error(kind)]);
        let err = client.create_token(&poll).await.unwrap_err();
        assert_eq!(err.service_kind(), Some(kind), "{err:?}");
        let expected = match kind {
            ServiceErrorKind::SlowDown => ErrorClass::Throttled,
            ServiceErrorKind::InternalServer => ErrorClass::Transient,
            ServiceErrorKind::AuthorizationPending => ErrorClass::Pending,
            _ => ErrorClass::Fatal,
        };
        assert_eq!(err.class(), expected, "{kind}");
    }
    // An HTML 502 from a load balancer, an empty 503, a malformed 200.
    emulator.inject(
        Operation::CreateToken,
        [Fault::Html502, Fault::EmptyBody(503), Fault::Malformed200],
    );
    let html = client.create_token(&poll).await.unwrap_err();
    assert!(
        matches!(html, OidcError::Unknown { status: 502, .. })
            && html.class() == ErrorClass::Transient
    );
    let empty = client.create_token(&poll).await.unwrap_err();
    assert!(
        matches!(empty, OidcError::Unknown { status: 503, .. })
            && empty.class() == ErrorClass::Transient
    );
    let malformed = client.create_token(&poll).await.unwrap_err();
    assert!(
        matches!(malformed, OidcError::Decode { .. }) && malformed.class() == ErrorClass::Fatal
    );

    // All of it over one pooled h2 connection.
    let negotiated = front.negotiated.lock().unwrap().clone();
    assert!(!negotiated.is_empty());
    assert!(
        negotiated.iter().all(|p| p.as_deref() == Some(&b"h2"[..])),
        "{negotiated:?}"
    );
    assert_eq!(negotiated.len(), 1, "the pool reuses one connection");
}
