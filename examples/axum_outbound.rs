// Run with: cargo run --example axum_outbound
//
//! An axum app whose handler calls an upstream API through a hyper client
//! wrapped in `BearerTokenLayer`: every outbound request carries a fresh
//! token from IAM Identity Center OIDC.
//!
//! Everything runs in this process: the SSO-OIDC emulator (with its
//! protected echo resource as the upstream), the token cache and the app.
//! The example calls its own app once, prints what came back and exits 0
//! when the upstream accepted the token.

use std::{process::ExitCode, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::State,
    response::{IntoResponse, Response},
    routing::get,
};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use sso_token_proxy::{
    Secret,
    cache::{CacheOptions, TokenCache},
    emulator::{Emulator, EmulatorConfig, SeedClient},
    layer::{BearerTokenError, BearerTokenLayer, BearerTokenService, unavailable_response},
    oidc::OidcClient,
    token::RefreshTokenSource,
};
use tower::{ServiceBuilder, ServiceExt as _};

type Outbound = BearerTokenService<Client<HttpConnector, Full<Bytes>>>;

#[derive(Clone)]
struct AppState {
    upstream: Outbound,
    upstream_url: String,
}

/// Calls the upstream; its answer (or a `503` without a token) is ours.
async fn handler(State(state): State<AppState>) -> Response {
    let request = Request::get(format!("{}/orders?limit=1", state.upstream_url))
        .body(Full::new(Bytes::new()))
        .expect("a valid request");
    match state.upstream.oneshot(request).await {
        Ok(response) => response.map(Body::new),
        Err(BearerTokenError::Token(e)) => unavailable_response(&e),
        Err(e) => (StatusCode::BAD_GATEWAY, format!("upstream failed: {e}")).into_response(),
    }
}

#[tokio::main]
async fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    // The emulator's own fake credentials, valid nowhere else.
    let client_id = "axum-outbound-example".to_owned();
    let client_secret = Secret::new("example-client-secret");
    let refresh_token = Secret::new("example-refresh-token");
    let emulator = Emulator::start(EmulatorConfig {
        clients: vec![SeedClient {
            client_id: client_id.clone(),
            client_secret: client_secret.clone(),
            refresh_tokens: vec![refresh_token.clone()],
            scopes: Vec::new(),
        }],
        ..EmulatorConfig::default()
    })
    .await?;

    // Tokens: CreateToken with the refresh token, cached and kept fresh.
    let oidc = OidcClient::builder().endpoint(emulator.url()).build()?;
    let source =
        RefreshTokenSource::builder(oidc, client_id, client_secret, refresh_token).build()?;
    let cache = TokenCache::new(source, CacheOptions::default());

    // The outbound client: hyper-util's pooled client under the layer.
    let upstream = ServiceBuilder::new()
        .layer(BearerTokenLayer::new(cache))
        .service(Client::builder(TokioExecutor::new()).build_http());
    let app = Router::new().route("/", get(handler)).with_state(AppState {
        upstream,
        upstream_url: emulator.url(),
    });

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    println!(
        "app listening on http://{addr}, upstream at {}",
        emulator.url()
    );

    // Call the app once, as a user would.
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = Request::get(format!("http://{addr}/")).body(Empty::new())?;
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request)).await??;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    println!("GET / -> {status}");
    println!("{}", String::from_utf8_lossy(&body));

    server.abort();
    emulator.shutdown().await;
    Ok(if status == StatusCode::OK {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
