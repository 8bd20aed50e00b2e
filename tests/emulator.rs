//! End-to-end tests of the SSO-OIDC emulator over real sockets.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt as _, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use sso_token_proxy::{
    Secret,
    emulator::{Emulator, EmulatorConfig, EmulatorHandle, Fault, SeedClient},
    oidc::{Operation, ServiceErrorKind, parse_error_response},
};

const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
const ERROR_NS: &str = ":http://internal.amazon.com/coral/com.amazonaws.sso.oidc/";

// === a small raw HTTP client ===

struct Resp {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// Asserts a well-formed modelled error of `kind` and returns its body.
    #[track_caller]
    fn assert_service_error(&self, kind: ServiceErrorKind) -> Value {
        assert_eq!(
            self.status,
            kind.status(),
            "{kind}: {:?}",
            String::from_utf8_lossy(&self.body)
        );
        let expected_type = format!("{}{ERROR_NS}", kind.shape_name());
        assert_eq!(
            self.header("x-amzn-errortype"),
            Some(expected_type.as_str()),
            "{kind}"
        );
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{kind}"
        );
        assert!(
            self.header("x-amzn-requestid")
                .is_some_and(|id| id.len() == 36),
            "{kind}"
        );
        let body = self.json();
        assert_eq!(body["error"], kind.oauth_code(), "{kind}");
        assert!(
            body["error_description"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "{kind}"
        );
        body
    }
}

#[derive(Clone)]
struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Http {
    fn new() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    fn h2() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
        }
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Resp {
        let mut req = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let resp = self
            .client
            .request(req.body(Full::new(body.into())).unwrap())
            .await
            .unwrap_or_else(|e| panic!("request to {url} failed: {e:?}"));
        let (parts, body) = resp.into_parts();
        Resp {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    async fn post_json(&self, url: &str, value: &Value) -> Resp {
        self.send(
            Method::POST,
            url,
            &[("content-type", "application/json")],
            value.to_string(),
        )
        .await
    }

    async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Resp {
        self.send(Method::GET, url, headers, Bytes::new()).await
    }
}

// === helpers ===

async fn start(config: EmulatorConfig) -> (EmulatorHandle, Http) {
    (Emulator::start(config).await.unwrap(), Http::new())
}

async fn start_default() -> (EmulatorHandle, Http) {
    start(EmulatorConfig::default()).await
}

fn refresh_body(client_id: &str, secret: &Secret, token: &str) -> Value {
    json!({
        "clientId": client_id,
        "clientSecret": secret.expose(),
        "grantType": "refresh_token",
        "refreshToken": token,
    })
}

async fn create_token(http: &Http, emu: &EmulatorHandle, body: &Value) -> Resp {
    http.post_json(&format!("{}/token", emu.url()), body).await
}

/// An access token obtained through a refresh grant.
async fn access_token(http: &Http, emu: &EmulatorHandle) -> String {
    let (id, secret) = emu.register_client("echo");
    let rt = emu.issue_refresh_token(&id, &[]);
    let resp = create_token(http, emu, &refresh_body(&id, &secret, rt.expose())).await;
    assert_eq!(resp.status, StatusCode::OK);
    resp.json()["accessToken"].as_str().unwrap().to_owned()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn pkce_challenge(verifier: &str) -> String {
    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// Waits (bounded) until the emulator's own clock says the token expired.
async fn wait_until_expired(emu: &EmulatorHandle, token: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while emu.is_access_token_live(token) {
        assert!(Instant::now() < deadline, "access token never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// === device flow ===

#[tokio::test]
async fn device_flow_pending_slow_down_approve_token_reuse() {
    let (emu, http) = start(EmulatorConfig {
        device_poll_interval: Duration::from_millis(500),
        ..EmulatorConfig::default()
    })
    .await;
    let url = emu.url();

    let reg = http
        .post_json(
            &format!("{url}/client/register"),
            &json!({"clientName": "cli", "clientType": "public"}),
        )
        .await;
    assert_eq!(reg.status, StatusCode::OK);
    let reg = reg.json();
    let client_id = reg["clientId"].as_str().unwrap().to_owned();
    let client_secret = reg["clientSecret"].as_str().unwrap().to_owned();

    let start = http
        .post_json(
            &format!("{url}/device_authorization"),
            &json!({"clientId": client_id, "clientSecret": client_secret, "startUrl": "https://d-123.awsapps.com/start"}),
        )
        .await;
    assert_eq!(start.status, StatusCode::OK);
    let start = start.json();
    let user_code = start["userCode"].as_str().unwrap().to_owned();
    assert!(
        user_code.len() == 9
            && user_code.chars().enumerate().all(|(i, c)| if i == 4 {
                c == '-'
            } else {
                c.is_ascii_uppercase()
            }),
        "{user_code}"
    );
    assert_eq!(start["verificationUri"], format!("{url}/_emulator/device"));
    assert_eq!(
        start["verificationUriComplete"],
        format!("{url}/_emulator/device?user_code={user_code}")
    );
    assert_eq!(start["expiresIn"], 600);
    assert_eq!(start["interval"], 1);
    let device_code = start["deviceCode"].as_str().unwrap().to_owned();
    assert!(device_code.len() >= 40);

    let poll = json!({"clientId": client_id, "clientSecret": client_secret, "grantType": DEVICE_GRANT, "deviceCode": device_code});
    create_token(&http, &emu, &poll)
        .await
        .assert_service_error(ServiceErrorKind::AuthorizationPending);
    // Waiting out the interval is fine...
    tokio::time::sleep(Duration::from_millis(550)).await;
    create_token(&http, &emu, &poll)
        .await
        .assert_service_error(ServiceErrorKind::AuthorizationPending);
    // ...polling again at once is too fast, and the interval grows by 5 s, so
    // the next quick poll is too fast as well.
    create_token(&http, &emu, &poll)
        .await
        .assert_service_error(ServiceErrorKind::SlowDown);
    tokio::time::sleep(Duration::from_millis(550)).await;
    create_token(&http, &emu, &poll)
        .await
        .assert_service_error(ServiceErrorKind::SlowDown);

    // The person approves through the HTML form.
    let page = http
        .get(start["verificationUriComplete"].as_str().unwrap(), &[])
        .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    let html = String::from_utf8_lossy(&page.body).into_owned();
    assert!(
        html.contains(&user_code) && html.contains("/_emulator/device/approve"),
        "{html}"
    );
    let approved = http
        .send(
            Method::POST,
            &format!("{url}/_emulator/device/approve"),
            &[("content-type", "application/x-www-form-urlencoded")],
            format!("user_code={user_code}"),
        )
        .await;
    assert_eq!(approved.status, StatusCode::OK);
    assert!(!emu.approve(&user_code), "already decided");

    let tokens = create_token(&http, &emu, &poll).await;
    assert_eq!(tokens.status, StatusCode::OK);
    assert_eq!(tokens.header("content-type"), Some("application/json"));
    let tokens = tokens.json();
    assert_eq!(tokens["tokenType"], "Bearer");
    assert_eq!(tokens["expiresIn"], 3600);
    let access = tokens["accessToken"].as_str().unwrap();
    let refresh = tokens["refreshToken"].as_str().unwrap();
    assert!(access.starts_with("aoa") && access.len() >= 40);
    assert!(refresh.starts_with("aor") && refresh.len() >= 40);
    assert_eq!(tokens["idToken"].as_str().unwrap().split('.').count(), 3);
    assert!(emu.is_access_token_live(access));
    assert!(emu.is_refresh_token_live(refresh));

    create_token(&http, &emu, &poll)
        .await
        .assert_service_error(ServiceErrorKind::InvalidGrant);

    let c = emu.counters();
    assert_eq!(c.register_client, 1);
    assert_eq!(c.start_device_authorization, 1);
    assert_eq!(c.create_token, 6);
    assert_eq!(c.create_token_by_grant[DEVICE_GRANT], 6);
    assert_eq!(c.errors_by_kind["AuthorizationPending"], 2);
    assert_eq!(c.errors_by_kind["SlowDown"], 2);
    assert_eq!(c.errors_by_kind["InvalidGrant"], 1);
    assert_eq!(c.tokens_issued, 1);
}

#[tokio::test]
async fn device_flow_denied_expired_and_unknown() {
    let (emu, http) = start(EmulatorConfig {
        device_poll_interval: Duration::ZERO,
        device_code_lifetime: Duration::from_millis(1000),
        ..EmulatorConfig::default()
    })
    .await;
    let url = emu.url();
    let (id, secret) = emu.register_client("cli");
    let start_body =
        json!({"clientId": id, "clientSecret": secret.expose(), "startUrl": "https://x/start"});

    let a = http
        .post_json(&format!("{url}/device_authorization"), &start_body)
        .await
        .json();
    assert_eq!(a["interval"], 0);
    assert_eq!(a["expiresIn"], 1);
    let poll_a = json!({"clientId": id, "clientSecret": secret.expose(), "grantType": DEVICE_GRANT, "deviceCode": a["deviceCode"]});
    // Interval zero: rapid polls are never too fast.
    for _ in 0..3 {
        create_token(&http, &emu, &poll_a)
            .await
            .assert_service_error(ServiceErrorKind::AuthorizationPending);
    }
    // Denied through the JSON admin route.
    let denied = http
        .post_json(
            &format!("{url}/_emulator/device/deny"),
            &json!({"user_code": a["userCode"]}),
        )
        .await;
    assert_eq!(denied.status, StatusCode::OK);
    assert_eq!(denied.json()["approved"], false);
    create_token(&http, &emu, &poll_a)
        .await
        .assert_service_error(ServiceErrorKind::AccessDenied);

    let b = http
        .post_json(&format!("{url}/device_authorization"), &start_body)
        .await
        .json();
    let poll_b = json!({"clientId": id, "clientSecret": secret.expose(), "grantType": DEVICE_GRANT, "deviceCode": b["deviceCode"]});
    tokio::time::sleep(Duration::from_millis(1100)).await;
    create_token(&http, &emu, &poll_b)
        .await
        .assert_service_error(ServiceErrorKind::ExpiredToken);
    assert!(
        !emu.approve(b["userCode"].as_str().unwrap()),
        "expired codes cannot be approved"
    );

    let unknown = json!({"clientId": id, "clientSecret": secret.expose(), "grantType": DEVICE_GRANT, "deviceCode": "nope"});
    create_token(&http, &emu, &unknown)
        .await
        .assert_service_error(ServiceErrorKind::InvalidGrant);
    let missing =
        json!({"clientId": id, "clientSecret": secret.expose(), "grantType": DEVICE_GRANT});
    create_token(&http, &emu, &missing)
        .await
        .assert_service_error(ServiceErrorKind::InvalidRequest);

    // Another client's device code is not redeemable.
    let c = http
        .post_json(&format!("{url}/device_authorization"), &start_body)
        .await
        .json();
    assert!(emu.approve(c["userCode"].as_str().unwrap()));
    let (other_id, other_secret) = emu.register_client("other");
    let stolen = json!({"clientId": other_id, "clientSecret": other_secret.expose(), "grantType": DEVICE_GRANT, "deviceCode": c["deviceCode"]});
    create_token(&http, &emu, &stolen)
        .await
        .assert_service_error(ServiceErrorKind::InvalidGrant);
    assert!(!emu.deny("ZZZZ-ZZZZ"));
}

#[tokio::test]
async fn start_device_authorization_validates_client_and_start_url() {
    let (emu, http) = start_default().await;
    let url = format!("{}/device_authorization", emu.url());
    let (id, secret) = emu.register_client("cli");

    let wrong = http
        .post_json(
            &url,
            &json!({"clientId": id, "clientSecret": "wrong", "startUrl": "https://x/start"}),
        )
        .await;
    wrong.assert_service_error(ServiceErrorKind::InvalidClient);
    let unknown = http
        .post_json(&url, &json!({"clientId": "nobody", "clientSecret": secret.expose(), "startUrl": "https://x/start"}))
        .await;
    unknown.assert_service_error(ServiceErrorKind::InvalidClient);
    let body = http
        .post_json(
            &url,
            &json!({"clientId": id, "clientSecret": secret.expose()}),
        )
        .await
        .assert_service_error(ServiceErrorKind::InvalidRequest);
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("startUrl")
    );
    assert_eq!(emu.counters().start_device_authorization, 3);
    assert_eq!(emu.counters().errors_by_kind["InvalidClient"], 2);
}

// === RegisterClient ===

#[tokio::test]
async fn register_client_validates_metadata() {
    let (emu, http) = start_default().await;
    let url = format!("{}/client/register", emu.url());
    let cases = [
        (
            json!({"clientType": "public"}),
            ServiceErrorKind::InvalidRequest,
        ),
        (json!({"clientName": "x"}), ServiceErrorKind::InvalidRequest),
        (
            json!({"clientName": "x", "clientType": "confidential"}),
            ServiceErrorKind::InvalidClientMetadata,
        ),
        (
            json!({"clientName": "x", "clientType": "public", "grantTypes": ["password"]}),
            ServiceErrorKind::UnsupportedGrantType,
        ),
        (
            json!({"clientName": "x", "clientType": "public", "redirectUris": ["/callback"]}),
            ServiceErrorKind::InvalidRedirectUri,
        ),
        (
            json!({"clientName": "x", "clientType": "public", "redirectUris": ["ftp://host/cb"]}),
            ServiceErrorKind::InvalidRedirectUri,
        ),
    ];
    for (body, kind) in cases {
        http.post_json(&url, &body).await.assert_service_error(kind);
    }

    let ok = http
        .post_json(
            &url,
            &json!({
                "clientName": "x",
                "clientType": "public",
                "scopes": ["sso:account:access"],
                "grantTypes": ["authorization_code", "refresh_token", DEVICE_GRANT],
                "redirectUris": ["http://127.0.0.1:4321/oauth/callback"],
            }),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert!(ok.header("x-amzn-errortype").is_none());
    let ok = ok.json();
    assert!(ok["clientSecret"].as_str().unwrap().len() >= 40);
    let issued = ok["clientIdIssuedAt"].as_i64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((issued - now).abs() <= 5);
    assert_eq!(
        ok["clientSecretExpiresAt"].as_i64().unwrap() - issued,
        90 * 24 * 3600
    );
    assert!(
        ok.as_object().unwrap().values().all(|v| !v.is_null()),
        "no null members: {ok}"
    );
    assert_eq!(emu.counters().register_client, 7);
}

// === CreateToken: refresh grant ===

#[tokio::test]
async fn refresh_grant_rotates_and_revokes_the_old_token() {
    let (emu, http) = start_default().await;
    let (id, secret) = emu.register_client("svc");
    let scopes = vec!["sso:account:access".to_owned(), "openid".to_owned()];
    let rt1 = emu.issue_refresh_token(&id, &scopes);

    let r = create_token(&http, &emu, &refresh_body(&id, &secret, rt1.expose())).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = r.json();
    let rt2 = r["refreshToken"].as_str().unwrap().to_owned();
    assert_ne!(rt2, rt1.expose());
    assert!(r.get("idToken").is_none(), "no null members either: {r}");
    assert!(!emu.is_refresh_token_live(rt1.expose()));
    assert!(emu.is_refresh_token_live(&rt2));
    create_token(&http, &emu, &refresh_body(&id, &secret, rt1.expose()))
        .await
        .assert_service_error(ServiceErrorKind::InvalidGrant);

    // Scopes: a subset is fine, anything more is InvalidScope.
    let mut narrower = refresh_body(&id, &secret, &rt2);
    narrower["scope"] = json!(["openid"]);
    let r = create_token(&http, &emu, &narrower).await;
    assert_eq!(r.status, StatusCode::OK);
    let rt3 = r.json()["refreshToken"].as_str().unwrap().to_owned();
    let mut wider = refresh_body(&id, &secret, &rt3);
    wider["scope"] = json!(["openid", "admin"]);
    create_token(&http, &emu, &wider)
        .await
        .assert_service_error(ServiceErrorKind::InvalidScope);

    // A token belongs to its client.
    let (other_id, other_secret) = emu.register_client("other");
    create_token(&http, &emu, &refresh_body(&other_id, &other_secret, &rt3))
        .await
        .assert_service_error(ServiceErrorKind::InvalidGrant);
    create_token(&http, &emu, &refresh_body(&id, &secret, "aor-made-up"))
        .await
        .assert_service_error(ServiceErrorKind::InvalidGrant);
    assert!(emu.is_refresh_token_live(&rt3));

    let c = emu.counters();
    assert_eq!(c.create_token, 6);
    assert_eq!(c.create_token_by_grant["refresh_token"], 6);
    assert_eq!(c.tokens_issued, 2);
    assert_eq!(c.errors_by_kind["InvalidGrant"], 3);
    assert_eq!(c.errors_by_kind["InvalidScope"], 1);
}

#[tokio::test]
async fn refresh_grant_without_rotation_keeps_the_token() {
    let (emu, http) = start(EmulatorConfig {
        rotate_refresh_tokens: false,
        ..EmulatorConfig::default()
    })
    .await;
    let (id, secret) = emu.register_client("svc");
    let rt = emu.issue_refresh_token(&id, &[]);
    let mut seen = Vec::new();
    for _ in 0..2 {
        let r = create_token(&http, &emu, &refresh_body(&id, &secret, rt.expose())).await;
        assert_eq!(r.status, StatusCode::OK);
        let r = r.json();
        assert!(r.get("refreshToken").is_none(), "{r}");
        seen.push(r["accessToken"].as_str().unwrap().to_owned());
    }
    assert_ne!(seen[0], seen[1]);
    assert!(emu.is_refresh_token_live(rt.expose()));

    // Switching rotation on at run time takes effect at once.
    emu.set_rotation(true);
    let r = create_token(&http, &emu, &refresh_body(&id, &secret, rt.expose()))
        .await
        .json();
    assert!(r["refreshToken"].is_string());
    assert!(!emu.is_refresh_token_live(rt.expose()));
}

/// An administrator ending every session: each refresh token, rotated or
/// not, is refused with InvalidGrant from then on; a token issued later
/// works.
#[tokio::test]
async fn admin_revokes_every_refresh_token() {
    let (emu, http) = start_default().await;
    let (id, secret) = emu.register_client("svc");
    let first = emu.issue_refresh_token(&id, &[]);
    let rotated = create_token(&http, &emu, &refresh_body(&id, &secret, first.expose()))
        .await
        .json()["refreshToken"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = emu.issue_refresh_token(&id, &[]);
    assert!(emu.is_refresh_token_live(&rotated) && emu.is_refresh_token_live(other.expose()));

    let url = format!("{}/_emulator/revoke_refresh_tokens", emu.url());
    let r = http.post_json(&url, &json!({})).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!({"ok": true, "revoked": 2}));
    for token in [rotated.as_str(), other.expose()] {
        assert!(!emu.is_refresh_token_live(token));
        let r = create_token(&http, &emu, &refresh_body(&id, &secret, token)).await;
        let body = r.assert_service_error(ServiceErrorKind::InvalidGrant);
        assert!(
            body["error_description"]
                .as_str()
                .unwrap()
                .contains("revoked"),
            "{body}"
        );
    }
    // Nothing left to revoke; the method matters.
    assert_eq!(http.post_json(&url, &json!({})).await.json()["revoked"], 0);
    assert_eq!(http.get(&url, &[]).await.status, StatusCode::UNAUTHORIZED);

    let fresh = emu.issue_refresh_token(&id, &[]);
    let r = create_token(&http, &emu, &refresh_body(&id, &secret, fresh.expose())).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(emu.revoke_refresh_tokens(), 1);
}

#[tokio::test]
async fn seed_clients_and_their_refresh_tokens_work() {
    let (emu, http) = start(EmulatorConfig {
        clients: vec![SeedClient {
            client_id: "seed-client".into(),
            client_secret: Secret::new("seed-secret"),
            refresh_tokens: vec![Secret::new("aor-seed-refresh-token-0123456789")],
            scopes: vec!["openid".into()],
        }],
        ..EmulatorConfig::default()
    })
    .await;
    let secret = Secret::new("seed-secret");
    let mut body = refresh_body("seed-client", &secret, "aor-seed-refresh-token-0123456789");
    body["scope"] = json!(["openid"]);
    let r = create_token(&http, &emu, &body).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
}

// === CreateToken: authorization code grant ===

#[tokio::test]
async fn authorization_code_grant_checks_pkce_redirect_and_single_use() {
    let (emu, http) = start_default().await;
    let (id, secret) = emu.register_client("web");
    let redirect = "http://127.0.0.1:9999/callback";
    let verifier = "a-very-long-pkce-code-verifier-0123456789-abcdefghijklmnop";
    let code_body = |code: &str, verifier: Option<&str>, redirect: &str| {
        let mut b = json!({
            "clientId": id,
            "clientSecret": secret.expose(),
            "grantType": "authorization_code",
            "code": code,
            "redirectUri": redirect,
        });
        if let Some(v) = verifier {
            b["codeVerifier"] = json!(v);
        }
        b
    };

    let code = emu.issue_authorization_code(&id, redirect, Some(&pkce_challenge(verifier)));
    create_token(
        &http,
        &emu,
        &code_body(code.expose(), Some("wrong-verifier"), redirect),
    )
    .await
    .assert_service_error(ServiceErrorKind::InvalidGrant);
    create_token(&http, &emu, &code_body(code.expose(), None, redirect))
        .await
        .assert_service_error(ServiceErrorKind::InvalidGrant);
    create_token(
        &http,
        &emu,
        &code_body(code.expose(), Some(verifier), "http://127.0.0.1:9999/other"),
    )
    .await
    .assert_service_error(ServiceErrorKind::InvalidGrant);
    let ok = create_token(
        &http,
        &emu,
        &code_body(code.expose(), Some(verifier), redirect),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    let ok = ok.json();
    for member in ["accessToken", "refreshToken", "idToken"] {
        assert!(ok[member].is_string(), "{member}");
    }
    create_token(
        &http,
        &emu,
        &code_body(code.expose(), Some(verifier), redirect),
    )
    .await
    .assert_service_error(ServiceErrorKind::InvalidGrant);

    // Through the admin route, without PKCE.
    let issued = http
        .post_json(
            &format!("{}/_emulator/authorization_codes", emu.url()),
            &json!({"client_id": id, "redirect_uri": redirect}),
        )
        .await;
    assert_eq!(issued.status, StatusCode::OK);
    let code = issued.json()["code"].as_str().unwrap().to_owned();
    let ok = create_token(&http, &emu, &code_body(&code, None, redirect)).await;
    assert_eq!(ok.status, StatusCode::OK);

    // Through the admin route, with PKCE.
    let issued = http
        .post_json(
            &format!("{}/_emulator/authorization_codes", emu.url()),
            &json!({"client_id": id, "redirect_uri": redirect, "code_challenge": pkce_challenge(verifier)}),
        )
        .await
        .json();
    let code = issued["code"].as_str().unwrap();
    create_token(&http, &emu, &code_body(code, Some("nope"), redirect))
        .await
        .assert_service_error(ServiceErrorKind::InvalidGrant);
    let ok = create_token(&http, &emu, &code_body(code, Some(verifier), redirect)).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(
        emu.counters().create_token_by_grant["authorization_code"],
        8
    );
}

// === CreateToken: request and client errors ===

#[tokio::test]
async fn create_token_rejects_bad_clients_bodies_and_grants() {
    let (emu, http) = start_default().await;
    let (id, secret) = emu.register_client("svc");
    let rt = emu.issue_refresh_token(&id, &[]);

    let wrong_secret = create_token(
        &http,
        &emu,
        &refresh_body(&id, &Secret::new("nope"), rt.expose()),
    )
    .await;
    assert_eq!(wrong_secret.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        wrong_secret.header("x-amzn-errortype"),
        Some("InvalidClientException:http://internal.amazon.com/coral/com.amazonaws.sso.oidc/")
    );
    wrong_secret.assert_service_error(ServiceErrorKind::InvalidClient);
    create_token(&http, &emu, &refresh_body("unknown", &secret, rt.expose()))
        .await
        .assert_service_error(ServiceErrorKind::InvalidClient);
    assert!(
        emu.is_refresh_token_live(rt.expose()),
        "a failed call must not spend the token"
    );

    let token_url = format!("{}/token", emu.url());
    for raw in ["not json", "{\"clientId\": 5", "[]", ""] {
        http.send(
            Method::POST,
            &token_url,
            &[("content-type", "application/json")],
            raw,
        )
        .await
        .assert_service_error(ServiceErrorKind::InvalidRequest);
    }
    let body = create_token(
        &http,
        &emu,
        &json!({"clientId": id, "clientSecret": secret.expose()}),
    )
    .await
    .assert_service_error(ServiceErrorKind::InvalidRequest);
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("grantType")
    );
    create_token(
        &http,
        &emu,
        &json!({"clientId": id, "clientSecret": secret.expose(), "grantType": "refresh_token"}),
    )
    .await
    .assert_service_error(ServiceErrorKind::InvalidRequest);
    create_token(
        &http,
        &emu,
        &json!({"clientId": id, "clientSecret": secret.expose(), "grantType": "password"}),
    )
    .await
    .assert_service_error(ServiceErrorKind::UnsupportedGrantType);

    let c = emu.counters();
    assert_eq!(c.create_token, 9);
    assert_eq!(c.create_token_by_grant["other"], 1);
    assert_eq!(c.errors_by_kind["InvalidRequest"], 6);
    assert_eq!(c.tokens_issued, 0);
}

// === faults ===

#[tokio::test]
async fn every_service_error_kind_can_be_injected_with_the_real_shape() {
    let (emu, http) = start_default().await;
    let (id, secret) = emu.register_client("svc");
    let rt = emu.issue_refresh_token(&id, &[]);
    emu.inject(
        Operation::CreateToken,
        ServiceErrorKind::ALL.map(Fault::Error),
    );
    for kind in ServiceErrorKind::ALL {
        let resp = create_token(&http, &emu, &refresh_body(&id, &secret, rt.expose())).await;
        let body = resp.assert_service_error(kind);
        let parsed = parse_error_response(
            Operation::CreateToken,
            resp.status,
            &resp.headers,
            &resp.body,
        );
        assert_eq!(parsed.service_kind(), Some(kind));
        match kind {
            ServiceErrorKind::AccessDenied => {
                assert_eq!(body["reason"], "KMS_AccessDeniedException")
            }
            ServiceErrorKind::InvalidRequestRegion => {
                assert!(body["region"].is_string() && body["endpoint"].is_string());
            }
            _ => assert!(body.get("reason").is_none(), "{kind}: {body}"),
        }
    }
    // The script is used up: the next call is handled normally, and the
    // faults did not spend the refresh token.
    let ok = create_token(&http, &emu, &refresh_body(&id, &secret, rt.expose())).await;
    assert_eq!(ok.status, StatusCode::OK);

    let c = emu.counters();
    assert_eq!(c.create_token, 15);
    assert_eq!(c.tokens_issued, 1);
    for kind in ServiceErrorKind::ALL {
        assert_eq!(c.errors_by_kind[kind.name()], 1, "{kind}");
    }
}

#[tokio::test]
async fn transport_shaped_faults() {
    let (emu, http) = start_default().await;
    let url = emu.url();
    emu.inject(
        Operation::RegisterClient,
        [
            Fault::Html502,
            Fault::EmptyBody(503),
            Fault::Malformed200,
            Fault::Delay(Duration::from_millis(300)),
        ],
    );
    let body = json!({"clientName": "x", "clientType": "public"});
    let register = format!("{url}/client/register");

    let html = http.post_json(&register, &body).await;
    assert_eq!(html.status, StatusCode::BAD_GATEWAY);
    assert_eq!(html.header("content-type"), Some("text/html"));
    assert!(html.header("x-amzn-errortype").is_none());
    assert!(String::from_utf8_lossy(&html.body).contains("<html>"));

    let empty = http.post_json(&register, &body).await;
    assert_eq!(empty.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(empty.body.is_empty());
    assert!(empty.header("x-amzn-errortype").is_none());

    let malformed = http.post_json(&register, &body).await;
    assert_eq!(malformed.status, StatusCode::OK);
    assert_eq!(malformed.header("content-type"), Some("application/json"));
    assert_eq!(&malformed.body[..], br#"{"accessToken": 5"#);
    assert!(serde_json::from_slice::<Value>(&malformed.body).is_err());

    let started = Instant::now();
    let delayed = http.post_json(&register, &body).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(delayed.status, StatusCode::OK);
    assert!(delayed.json()["clientId"].is_string());

    let c = emu.counters();
    assert_eq!(c.register_client, 4);
    assert_eq!(c.errors_by_kind["Html502"], 1);
    assert_eq!(c.errors_by_kind["EmptyBody"], 1);
    assert_eq!(c.errors_by_kind["Malformed200"], 1);
    assert_eq!(c.errors_by_kind.len(), 3);
}

#[tokio::test]
async fn sticky_faults_and_clearing() {
    let (emu, http) = start_default().await;
    let (id, secret) = emu.register_client("svc");
    let start_body =
        json!({"clientId": id, "clientSecret": secret.expose(), "startUrl": "https://x/start"});
    let url = format!("{}/device_authorization", emu.url());

    emu.inject_always(
        Operation::StartDeviceAuthorization,
        Some(Fault::Error(ServiceErrorKind::InternalServer)),
    );
    emu.inject(
        Operation::StartDeviceAuthorization,
        [Fault::Error(ServiceErrorKind::SlowDown)],
    );
    http.post_json(&url, &start_body)
        .await
        .assert_service_error(ServiceErrorKind::SlowDown);
    for _ in 0..2 {
        http.post_json(&url, &start_body)
            .await
            .assert_service_error(ServiceErrorKind::InternalServer);
    }
    emu.inject_always(Operation::StartDeviceAuthorization, None);
    assert_eq!(
        http.post_json(&url, &start_body).await.status,
        StatusCode::OK
    );

    emu.inject_always(Operation::StartDeviceAuthorization, Some(Fault::Html502));
    emu.inject(Operation::StartDeviceAuthorization, [Fault::Malformed200]);
    emu.clear_faults();
    assert_eq!(
        http.post_json(&url, &start_body).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn admin_fault_script_is_consumed_in_order() {
    let (emu, http) = start_default().await;
    let url = emu.url();
    let (id, secret) = emu.register_client("svc");
    let rt = emu.issue_refresh_token(&id, &[]);

    let set = http
        .post_json(
            &format!("{url}/_emulator/faults"),
            &json!({"operation": "CreateToken", "faults": ["SlowDown", "SlowDown", "InternalServer", {"empty_body": 504}, {"delay_ms": 10}]}),
        )
        .await;
    assert_eq!(set.status, StatusCode::OK, "{:?}", set.body);

    let body = refresh_body(&id, &secret, rt.expose());
    create_token(&http, &emu, &body)
        .await
        .assert_service_error(ServiceErrorKind::SlowDown);
    create_token(&http, &emu, &body)
        .await
        .assert_service_error(ServiceErrorKind::SlowDown);
    create_token(&http, &emu, &body)
        .await
        .assert_service_error(ServiceErrorKind::InternalServer);
    assert_eq!(
        create_token(&http, &emu, &body).await.status,
        StatusCode::GATEWAY_TIMEOUT
    );
    let delayed = create_token(&http, &emu, &body).await;
    assert_eq!(delayed.status, StatusCode::OK);
    let rt2 = delayed.json()["refreshToken"].as_str().unwrap().to_owned();

    // A sticky fault via the admin route, then cleared with null.
    let faults_url = format!("{url}/_emulator/faults");
    http.post_json(
        &faults_url,
        &json!({"operation": "CreateToken", "always": "InvalidGrant"}),
    )
    .await;
    let body = refresh_body(&id, &secret, &rt2);
    for _ in 0..2 {
        create_token(&http, &emu, &body)
            .await
            .assert_service_error(ServiceErrorKind::InvalidGrant);
    }
    http.post_json(
        &faults_url,
        &json!({"operation": "CreateToken", "always": null}),
    )
    .await;
    assert_eq!(
        create_token(&http, &emu, &body).await.status,
        StatusCode::OK
    );

    // DELETE clears scripts too.
    http.post_json(
        &faults_url,
        &json!({"operation": "CreateToken", "faults": ["Html502"]}),
    )
    .await;
    let cleared = http
        .send(Method::DELETE, &faults_url, &[], Bytes::new())
        .await;
    assert_eq!(cleared.status, StatusCode::OK);
    assert_eq!(emu.counters().create_token, 8);

    // Bad admin input is a 400 with a message, not a silent no-op.
    for bad in [
        json!({"operation": "Nope", "faults": []}),
        json!({"operation": "CreateToken", "faults": ["NotAFault"]}),
        json!({"faults": []}),
    ] {
        let resp = http.post_json(&faults_url, &bad).await;
        assert_eq!(resp.status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(resp.json()["message"].is_string());
    }
}

// === admin routes ===

#[tokio::test]
async fn admin_routes_manage_clients_tokens_config_and_counters() {
    let (emu, http) = start_default().await;
    let url = emu.url();

    let client = http
        .post_json(
            &format!("{url}/_emulator/clients"),
            &json!({"client_name": "admin-made"}),
        )
        .await
        .json();
    let id = client["clientId"].as_str().unwrap().to_owned();
    let secret = Secret::new(client["clientSecret"].as_str().unwrap());
    let rt = http
        .post_json(
            &format!("{url}/_emulator/refresh_tokens"),
            &json!({"client_id": id, "scopes": []}),
        )
        .await
        .json()["refreshToken"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(emu.is_refresh_token_live(&rt));
    let unknown = http
        .post_json(
            &format!("{url}/_emulator/refresh_tokens"),
            &json!({"client_id": "nobody"}),
        )
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    let config = http
        .post_json(
            &format!("{url}/_emulator/config"),
            &json!({"access_token_lifetime_secs": 120, "rotate_refresh_tokens": false}),
        )
        .await;
    assert_eq!(config.status, StatusCode::OK);
    assert_eq!(config.json()["rotate_refresh_tokens"], false);
    let r = create_token(&http, &emu, &refresh_body(&id, &secret, &rt))
        .await
        .json();
    assert_eq!(r["expiresIn"], 120);
    assert!(r.get("refreshToken").is_none());
    let access = r["accessToken"].as_str().unwrap().to_owned();
    assert!(emu.is_access_token_live(&access));

    let revoked = http
        .send(
            Method::POST,
            &format!("{url}/_emulator/revoke_access_tokens"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(revoked.status, StatusCode::OK);
    assert!(!emu.is_access_token_live(&access));

    let counters = http.get(&format!("{url}/_emulator/counters"), &[]).await;
    assert_eq!(counters.status, StatusCode::OK);
    let via_http: sso_token_proxy::emulator::Counters =
        serde_json::from_slice(&counters.body).unwrap();
    assert_eq!(via_http, emu.counters());
    assert_eq!(via_http.create_token, 1);
    assert_eq!(
        via_http.register_client, 0,
        "admin and handle calls are not counted"
    );
    assert_eq!(via_http.tokens_issued, 1);
    assert!(counters.header("x-amzn-requestid").is_some());
}

// === echo resource ===

#[tokio::test]
async fn echo_describes_authorized_requests() {
    let (emu, http) = start_default().await;
    let token = access_token(&http, &emu).await;
    let auth = bearer(&token);
    let resp = http
        .send(
            Method::PUT,
            &format!("{}/some/path?a=1&b=two", emu.url()),
            &[
                ("authorization", &auth),
                ("x-multi", "one"),
                ("x-multi", "two"),
                ("content-type", "text/plain"),
            ],
            "hello",
        )
        .await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    let echo = resp.json();
    assert_eq!(echo["authorized"], true);
    assert_eq!(echo["method"], "PUT");
    assert_eq!(echo["path"], "/some/path");
    assert_eq!(echo["query"], "a=1&b=two");
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["body_length"], 5);
    assert_eq!(echo["headers"]["x-multi"], json!(["one", "two"]));
    assert_eq!(echo["headers"]["content-type"], json!(["text/plain"]));
    assert!(echo["headers"].get("authorization").is_none());
    assert!(
        !String::from_utf8_lossy(&resp.body).contains(&token),
        "token echoed"
    );

    // No query is null; GET of an operation path is the echo resource too.
    let echo = http
        .get(&format!("{}/token", emu.url()), &[("authorization", &auth)])
        .await
        .json();
    assert_eq!(echo["query"], Value::Null);
    assert_eq!(echo["path"], "/token");
    assert_eq!(echo["method"], "GET");

    // HTTP/2 (prior knowledge).
    let h2 = Http::h2()
        .send(
            Method::POST,
            &format!("{}/h2", emu.url()),
            &[("authorization", &auth)],
            "abc",
        )
        .await;
    assert_eq!(h2.version, Version::HTTP_2);
    assert_eq!(h2.json()["version"], "HTTP/2.0");

    let c = emu.counters();
    assert_eq!(c.echo_authorized, 3);
    assert_eq!(c.echo_unauthorized, 0);
}

#[tokio::test]
async fn echo_refuses_missing_unknown_revoked_and_expired_tokens() {
    let (emu, http) = start_default().await;
    let url = format!("{}/resource", emu.url());
    let assert_401 = |resp: Resp| {
        assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            resp.header("www-authenticate"),
            Some(r#"Bearer error="invalid_token""#)
        );
        assert_eq!(resp.header("content-type"), Some("application/json"));
        assert_eq!(resp.json(), json!({"error": "invalid_token"}));
    };

    assert_401(http.get(&url, &[]).await);
    assert_401(
        http.get(&url, &[("authorization", "Bearer aoa-not-issued")])
            .await,
    );
    assert_401(
        http.get(&url, &[("authorization", "Basic Zm9vOmJhcg==")])
            .await,
    );

    let token = access_token(&http, &emu).await;
    assert_eq!(
        http.get(&url, &[("authorization", &bearer(&token))])
            .await
            .status,
        StatusCode::OK
    );
    emu.revoke_access_tokens();
    assert_401(http.get(&url, &[("authorization", &bearer(&token))]).await);

    emu.set_access_token_lifetime(Duration::from_millis(300));
    let short = access_token(&http, &emu).await;
    // Sent as whole seconds, at least 1; the emulator itself enforces the
    // exact lifetime.
    assert_eq!(
        http.get(&url, &[("authorization", &bearer(&short))])
            .await
            .status,
        StatusCode::OK
    );
    wait_until_expired(&emu, &short).await;
    assert_401(http.get(&url, &[("authorization", &bearer(&short))]).await);

    let c = emu.counters();
    assert_eq!(c.echo_authorized, 2);
    assert_eq!(c.echo_unauthorized, 5);
}

#[tokio::test]
async fn short_access_token_lifetime_reports_at_least_one_second() {
    let (emu, http) = start(EmulatorConfig {
        access_token_lifetime: Duration::from_millis(1500),
        ..EmulatorConfig::default()
    })
    .await;
    let (id, secret) = emu.register_client("svc");
    let rt = emu.issue_refresh_token(&id, &[]);
    let r = create_token(&http, &emu, &refresh_body(&id, &secret, rt.expose()))
        .await
        .json();
    assert_eq!(r["expiresIn"], 2);
    emu.set_access_token_lifetime(Duration::from_millis(10));
    let rt = emu.issue_refresh_token(&id, &[]);
    let r = create_token(&http, &emu, &refresh_body(&id, &secret, rt.expose()))
        .await
        .json();
    assert_eq!(r["expiresIn"], 1);
}

#[tokio::test]
async fn echo_test_controls() {
    let (emu, http) = start_default().await;
    let token = access_token(&http, &emu).await;
    let auth = bearer(&token);
    let url = format!("{}/controls", emu.url());

    let teapot = http
        .get(&url, &[("authorization", &auth), ("x-echo-status", "418")])
        .await;
    assert_eq!(teapot.status, StatusCode::IM_A_TEAPOT);
    assert_eq!(teapot.json()["authorized"], true);

    let started = Instant::now();
    let delayed = http
        .get(
            &url,
            &[("authorization", &auth), ("x-echo-delay-ms", "250")],
        )
        .await;
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(delayed.status, StatusCode::OK);

    let n = 300_000usize;
    let bytes = http
        .get(
            &url,
            &[
                ("authorization", &auth),
                ("x-echo-response-bytes", &n.to_string()),
                ("x-echo-status", "202"),
            ],
        )
        .await;
    assert_eq!(bytes.status, StatusCode::ACCEPTED);
    assert_eq!(
        bytes.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(bytes.body.len(), n);
    assert!(
        bytes
            .body
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (i % 251) as u8)
    );

    let cookies = http
        .get(
            &url,
            &[("authorization", &auth), ("x-echo-set-cookies", "3")],
        )
        .await;
    let set: Vec<&str> = cookies
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(set.len(), 3);
    let names: std::collections::HashSet<&str> =
        set.iter().map(|c| c.split('=').next().unwrap()).collect();
    assert_eq!(names.len(), 3, "{set:?}");

    let bad = http
        .get(&url, &[("authorization", &auth), ("x-echo-status", "abc")])
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);

    // Without a live token the controls do nothing.
    let refused = http.get(&url, &[("x-echo-status", "200")]).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn echo_counts_a_ten_megabyte_body_exactly() {
    let (emu, http) = start_default().await;
    let token = access_token(&http, &emu).await;
    let size = 10 * 1024 * 1024 + 7;
    let body = Bytes::from(vec![b'x'; size]);
    let resp = http
        .send(
            Method::POST,
            &format!("{}/upload", emu.url()),
            &[("authorization", &bearer(&token))],
            body.clone(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.json()["body_length"], size as u64);

    // Unauthorized uploads are drained and refused; the connection stays usable.
    let refused = http
        .send(Method::POST, &format!("{}/upload", emu.url()), &[], body)
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let again = http
        .get(
            &format!("{}/x", emu.url()),
            &[("authorization", &bearer(&token))],
        )
        .await;
    assert_eq!(again.status, StatusCode::OK);
}

// === misc ===

#[tokio::test]
async fn every_response_has_a_request_id() {
    let (emu, http) = start_default().await;
    let url = emu.url();
    emu.inject(
        Operation::CreateToken,
        [Fault::Html502, Fault::EmptyBody(500)],
    );
    let mut ids = std::collections::HashSet::new();
    for resp in [
        http.post_json(&format!("{url}/token"), &json!({})).await,
        http.post_json(&format!("{url}/token"), &json!({})).await,
        http.post_json(&format!("{url}/token"), &json!({})).await,
        http.get(&format!("{url}/echo"), &[]).await,
        http.get(&format!("{url}/_emulator/counters"), &[]).await,
        http.get(&format!("{url}/_emulator/device?user_code=%3Cb%3E"), &[])
            .await,
    ] {
        let id = resp
            .header("x-amzn-requestid")
            .expect("request id")
            .to_owned();
        assert!(ids.insert(id));
        if resp
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/html"))
            && resp.status == StatusCode::OK
        {
            let html = String::from_utf8_lossy(&resp.body).into_owned();
            assert!(
                html.contains("&lt;b&gt;") && !html.contains("<b>"),
                "{html}"
            );
        }
    }
}

#[tokio::test]
async fn url_and_addr_agree() {
    let (emu, _) = start_default().await;
    assert_eq!(emu.url(), format!("http://127.0.0.1:{}", emu.addr().port()));
    assert!(!emu.url().ends_with('/'));
    assert!(format!("{emu:?}").contains("EmulatorHandle"));
}

#[tokio::test]
async fn shutdown_refuses_new_connections() {
    let (emu, http) = start_default().await;
    let addr = emu.addr();
    // A pooled keep-alive connection must not hold the shutdown up.
    assert_eq!(
        http.get(&format!("{}/x", emu.url()), &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    let clone = emu.clone();
    tokio::time::timeout(Duration::from_secs(5), clone.shutdown())
        .await
        .expect("shutdown took too long");
    let err = tokio::net::TcpStream::connect(addr)
        .await
        .expect_err("still accepting");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    // The original handle is still usable for inspection, and a second
    // shutdown is harmless.
    let _ = emu.counters();
    emu.shutdown().await;
}
