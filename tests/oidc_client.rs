//! The SSO-OIDC client over real HTTPS: certificate verification through
//! rustls, HTTP/2 by ALPN, and every grant type round-tripped against the
//! emulator behind a TLS terminator.

use std::sync::{Arc, Mutex};

use rcgen::generate_simple_self_signed;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sso_token_proxy::{
    emulator::{Emulator, EmulatorConfig, EmulatorHandle, Fault},
    oidc::{
        CreateTokenRequest, ErrorClass, OidcClient, OidcError, Operation, RegisterClientRequest,
        ServiceErrorKind, StartDeviceAuthorizationRequest,
    },
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// A TLS terminator on 127.0.0.1 in front of the emulator, offering h2 and
/// http/1.1; records the protocol each connection negotiated.
struct TlsFront {
    port: u16,
    cert_der: CertificateDer<'static>,
    negotiated: Arc<Mutex<Vec<Option<Vec<u8>>>>>,
}

async fn tls_front(emulator: &EmulatorHandle) -> TlsFront {
    let certified = generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![certified.cert.der().clone()], key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let backend = emulator.addr();
    let negotiated = Arc::new(Mutex::new(Vec::new()));
    let record = negotiated.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let record = record.clone();
            tokio::spawn(async move {
                // Handshake failures (untrusted client) just end the connection.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                record
                    .lock()
                    .unwrap()
                    .push(tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec));
                let mut upstream = TcpStream::connect(backend).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    TlsFront {
        port,
        cert_der: certified.cert.der().clone(),
        negotiated,
    }
}

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
    let mut roots = rustls::RootCertStore::empty();
    roots.add(front.cert_der.clone()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
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
