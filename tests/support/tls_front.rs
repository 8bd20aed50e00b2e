//! A TLS terminator in front of the emulator for the SSO-OIDC client tests:
//! a self-signed certificate for `localhost`, h2 and http/1.1 by ALPN.

use std::sync::{Arc, Mutex};

use rcgen::generate_simple_self_signed;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sso_token_proxy::emulator::EmulatorHandle;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// A TLS terminator on 127.0.0.1 in front of the emulator, offering h2 and
/// http/1.1; records the protocol each connection negotiated.
pub(crate) struct TlsFront {
    pub(crate) port: u16,
    pub(crate) cert_der: CertificateDer<'static>,
    pub(crate) negotiated: Arc<Mutex<Vec<Option<Vec<u8>>>>>,
}

impl TlsFront {
    /// A caller's own rustls config (ring), trusting the front's
    /// certificate only.
    pub(crate) fn client_config(&self) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert_der.clone()).unwrap();
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
    }
}

pub(crate) async fn tls_front(emulator: &EmulatorHandle) -> TlsFront {
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
