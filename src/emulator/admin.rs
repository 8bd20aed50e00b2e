//! The JSON admin routes under `/_emulator/`, and the device approval page.

use std::time::{Duration, Instant};

use axum::{body::Body, extract::Request, response::Response};
use http::{HeaderMap, Method, StatusCode, header};
use serde::{Deserialize, Deserializer, de::DeserializeOwned};
use serde_json::json;

use crate::oidc::Operation;

use super::{Shared, fault::Fault, iam, idp, state::ceil_secs, wire};

/// Largest admin request body accepted.
const ADMIN_BODY_LIMIT: usize = 64 * 1024;

/// Handles an admin route, or gives the request back when the method and
/// path are not one.
pub(crate) async fn handle(shared: &Shared, req: Request) -> Result<Response, Request> {
    let route = match (req.method(), req.uri().path()) {
        (&Method::POST, "/_emulator/faults") => Route::InjectFaults,
        (&Method::DELETE, "/_emulator/faults") => Route::ClearFaults,
        (&Method::GET, "/_emulator/counters") => Route::Counters,
        (&Method::POST, "/_emulator/clients") => Route::Clients,
        (&Method::POST, "/_emulator/refresh_tokens") => Route::RefreshTokens,
        (&Method::POST, "/_emulator/authorization_codes") => Route::AuthorizationCodes,
        (&Method::POST, "/_emulator/config") => Route::Config,
        (&Method::POST, "/_emulator/revoke_access_tokens") => Route::RevokeAccessTokens,
        (&Method::POST, "/_emulator/revoke_refresh_tokens") => Route::RevokeRefreshTokens,
        (&Method::GET, "/_emulator/device") => Route::DevicePage,
        (&Method::POST, "/_emulator/device/approve") => Route::Decide { approve: true },
        (&Method::POST, "/_emulator/device/deny") => Route::Decide { approve: false },
        (&Method::POST, "/_emulator/jwt") => Route::MintAssertion,
        (&Method::POST, "/_emulator/applications") => Route::Applications,
        (&Method::GET, idp::JWKS_PATH) => Route::Jwks,
        (&Method::GET, idp::DISCOVERY_PATH) => Route::Discovery,
        _ => return Err(req),
    };
    let (parts, body) = req.into_parts();
    Ok(match route {
        Route::Counters => wire::json(StatusCode::OK, &shared.lock().counters.clone()),
        Route::DevicePage => device_page(parts.uri.query().unwrap_or("")),
        Route::Jwks => wire::json(StatusCode::OK, &shared.lock().iam.issuer.jwks()),
        Route::Discovery => {
            let issuer = iam::issuer_url(&shared.base_url);
            wire::json(
                StatusCode::OK,
                &json!({
                    "issuer": issuer,
                    "jwks_uri": format!("{}{}", shared.base_url, idp::JWKS_PATH),
                    "id_token_signing_alg_values_supported": ["ES256"],
                    "subject_types_supported": ["public"],
                    "response_types_supported": ["id_token"],
                }),
            )
        }
        route => match wire::read_body(body, ADMIN_BODY_LIMIT).await {
            Ok(bytes) => run(shared, route, &parts.headers, &bytes),
            Err(_) => bad_request("body is too large or could not be read"),
        },
    })
}

#[derive(Debug, Clone, Copy)]
enum Route {
    InjectFaults,
    ClearFaults,
    Counters,
    Clients,
    RefreshTokens,
    AuthorizationCodes,
    Config,
    RevokeAccessTokens,
    RevokeRefreshTokens,
    DevicePage,
    Decide { approve: bool },
    MintAssertion,
    Applications,
    Jwks,
    Discovery,
}

fn bad_request(message: impl Into<String>) -> Response {
    let message: String = message.into();
    wire::json(
        StatusCode::BAD_REQUEST,
        &json!({"error": "bad_request", "message": message}),
    )
}

fn not_found(message: &str) -> Response {
    wire::json(
        StatusCode::NOT_FOUND,
        &json!({"error": "not_found", "message": message}),
    )
}

fn ok() -> Response {
    wire::json(StatusCode::OK, &json!({"ok": true}))
}

/// Decodes a JSON admin body; the error is a message for a `400`.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))
}

/// `Some(None)` for an explicit `null`, `None` (by `default`) when absent.
fn explicit_option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<Fault>>, D::Error> {
    Option::<Fault>::deserialize(d).map(Some)
}

fn operation_from_name(name: &str) -> Option<Operation> {
    [
        Operation::CreateToken,
        Operation::CreateTokenWithIam,
        Operation::RegisterClient,
        Operation::StartDeviceAuthorization,
    ]
    .into_iter()
    .find(|op| op.as_str().eq_ignore_ascii_case(name) || op.path() == name)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsBody {
    operation: String,
    #[serde(default)]
    faults: Vec<Fault>,
    #[serde(default, deserialize_with = "explicit_option")]
    always: Option<Option<Fault>>,
}

#[derive(Deserialize)]
struct ClientBody {
    client_name: String,
    #[serde(default)]
    scopes: Vec<String>,
}

#[derive(Deserialize)]
struct RefreshTokenBody {
    client_id: String,
    #[serde(default)]
    scopes: Vec<String>,
}

#[derive(Deserialize)]
struct AuthorizationCodeBody {
    client_id: String,
    redirect_uri: String,
    #[serde(default)]
    code_challenge: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigBody {
    #[serde(default)]
    access_token_lifetime_secs: Option<u64>,
    #[serde(default)]
    access_token_lifetime_ms: Option<u64>,
    #[serde(default)]
    rotate_refresh_tokens: Option<bool>,
}

#[derive(Deserialize)]
struct UserCodeBody {
    user_code: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplicationBody {
    arn: String,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    scopes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MintBody {
    sub: String,
    #[serde(default)]
    aud: Option<String>,
    #[serde(default)]
    lifetime_secs: Option<u64>,
    #[serde(default)]
    expired: bool,
}

fn run(shared: &Shared, route: Route, headers: &HeaderMap, body: &[u8]) -> Response {
    let result = match route {
        Route::InjectFaults => inject_faults(shared, body),
        Route::ClearFaults => {
            shared.lock().clear_faults();
            Ok(ok())
        }
        Route::Clients => parse::<ClientBody>(body).map(|b| {
            let registered = shared.lock().add_client(None, None, b.scopes, None);
            tracing::debug!(client_name = %b.client_name, "emulator: admin registered a client");
            wire::json(
                StatusCode::OK,
                &json!({"clientId": registered.client_id, "clientSecret": registered.client_secret}),
            )
        }),
        Route::RefreshTokens => parse::<RefreshTokenBody>(body).map(|b| {
            let mut state = shared.lock();
            if !state.has_client(&b.client_id) {
                return not_found("unknown client_id");
            }
            let token = state.issue_refresh_token(&b.client_id, &b.scopes);
            wire::json(StatusCode::OK, &json!({"refreshToken": token}))
        }),
        Route::AuthorizationCodes => parse::<AuthorizationCodeBody>(body).map(|b| {
            let mut state = shared.lock();
            if !state.has_client(&b.client_id) {
                return not_found("unknown client_id");
            }
            let code = state.issue_authorization_code(
                &b.client_id,
                &b.redirect_uri,
                b.code_challenge.as_deref(),
                Instant::now(),
            );
            wire::json(StatusCode::OK, &json!({"code": code}))
        }),
        Route::Config => parse::<ConfigBody>(body).map(|b| {
            let mut state = shared.lock();
            if let Some(ms) = b.access_token_lifetime_ms {
                state.settings.access_token_lifetime = Duration::from_millis(ms);
            } else if let Some(secs) = b.access_token_lifetime_secs {
                state.settings.access_token_lifetime = Duration::from_secs(secs);
            }
            if let Some(rotate) = b.rotate_refresh_tokens {
                state.settings.rotate_refresh_tokens = rotate;
            }
            let settings = &state.settings;
            wire::json(
                StatusCode::OK,
                &json!({
                    "access_token_lifetime_secs": ceil_secs(settings.access_token_lifetime),
                    "access_token_lifetime_ms": u64::try_from(settings.access_token_lifetime.as_millis()).unwrap_or(u64::MAX),
                    "rotate_refresh_tokens": settings.rotate_refresh_tokens,
                }),
            )
        }),
        Route::RevokeAccessTokens => {
            shared.lock().revoke_access_tokens();
            Ok(ok())
        }
        Route::RevokeRefreshTokens => {
            let revoked = shared.lock().revoke_refresh_tokens();
            Ok(wire::json(
                StatusCode::OK,
                &json!({"ok": true, "revoked": revoked}),
            ))
        }
        Route::Decide { approve } => Ok(decide(shared, headers, body, approve)),
        Route::MintAssertion => parse::<MintBody>(body).map(|b| {
            let assertion = shared.mint_assertion(
                &b.sub,
                b.aud.as_deref().unwrap_or(iam::DEFAULT_AUDIENCE),
                Duration::from_secs(b.lifetime_secs.unwrap_or(3600)),
                b.expired,
            );
            wire::json(StatusCode::OK, &json!({"assertion": assertion}))
        }),
        Route::Applications => parse::<ApplicationBody>(body).map(|b| {
            if b.arn.trim().is_empty() {
                return bad_request("arn must not be empty");
            }
            shared.lock().iam.add_application(iam::EmulatorApplication {
                arn: b.arn.clone(),
                audiences: b.audiences,
                scopes: b.scopes,
            });
            wire::json(StatusCode::OK, &json!({"ok": true, "arn": b.arn}))
        }),
        Route::Counters | Route::DevicePage | Route::Jwks | Route::Discovery => {
            Ok(not_found("no such admin route"))
        }
    };
    result.unwrap_or_else(bad_request)
}

fn inject_faults(shared: &Shared, body: &[u8]) -> Result<Response, String> {
    let b: FaultsBody = parse(body)?;
    let op = operation_from_name(&b.operation).ok_or_else(|| {
        format!(
            "unknown operation {:?}; expected CreateToken, CreateTokenWithIAM, RegisterClient or StartDeviceAuthorization",
            b.operation
        )
    })?;
    let queued = b.faults.len();
    let mut state = shared.lock();
    state.inject(op, b.faults);
    if let Some(always) = b.always {
        state.inject_always(op, always);
    }
    Ok(wire::json(
        StatusCode::OK,
        &json!({"ok": true, "operation": op.as_str(), "queued": queued}),
    ))
}

fn decide(shared: &Shared, headers: &HeaderMap, body: &[u8], approve: bool) -> Response {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    let user_code = if is_json {
        match parse::<UserCodeBody>(body) {
            Ok(b) => Some(b.user_code),
            Err(message) => return bad_request(message),
        }
    } else {
        wire::form_value(&String::from_utf8_lossy(body), "user_code")
    };
    let Some(user_code) = user_code.map(|c| c.trim().to_ascii_uppercase()) else {
        return bad_request("user_code is required");
    };
    let done = shared
        .lock()
        .decide_device(&user_code, approve, Instant::now());
    let verb = if approve { "approved" } else { "denied" };
    if is_json {
        if done {
            wire::json(
                StatusCode::OK,
                &json!({"user_code": user_code, "approved": approve}),
            )
        } else {
            not_found("no pending device authorization with that user_code")
        }
    } else {
        let (status, text) = if done {
            (
                StatusCode::OK,
                format!("Device {verb}. You can close this window."),
            )
        } else {
            (
                StatusCode::NOT_FOUND,
                "No pending device authorization has that code.".to_owned(),
            )
        };
        html_page(status, &text, None)
    }
}

fn device_page(query: &str) -> Response {
    let user_code = wire::form_value(query, "user_code").unwrap_or_default();
    html_page(StatusCode::OK, "Authorize a device", Some(&user_code))
}

fn html_page(status: StatusCode, heading: &str, form_code: Option<&str>) -> Response {
    let mut html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>SSO-OIDC emulator</title></head>\n\
         <body>\n<h1>{}</h1>\n",
        wire::html_escape(heading)
    );
    if let Some(code) = form_code {
        let code = wire::html_escape(code);
        html.push_str(&format!(
            "<form method=\"post\" action=\"/_emulator/device/approve\">\n\
             <label>Code <input name=\"user_code\" value=\"{code}\"></label>\n\
             <button type=\"submit\">Approve</button>\n\
             <button type=\"submit\" formaction=\"/_emulator/device/deny\">Deny</button>\n\
             </form>\n"
        ));
    }
    html.push_str("</body></html>\n");
    wire::response(status, "text/html; charset=utf-8", Body::from(html))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_body_distinguishes_absent_and_null_always() {
        let b: FaultsBody =
            serde_json::from_str(r#"{"operation":"CreateToken","faults":["SlowDown"]}"#).unwrap();
        assert!(b.always.is_none());
        let b: FaultsBody =
            serde_json::from_str(r#"{"operation":"CreateToken","always":null}"#).unwrap();
        assert_eq!(b.always, Some(None));
        let b: FaultsBody =
            serde_json::from_str(r#"{"operation":"CreateToken","always":"Html502"}"#).unwrap();
        assert_eq!(b.always, Some(Some(Fault::Html502)));
    }

    #[test]
    fn operations_by_name_or_path() {
        assert_eq!(
            operation_from_name("CreateToken"),
            Some(Operation::CreateToken)
        );
        assert_eq!(
            operation_from_name("/client/register"),
            Some(Operation::RegisterClient)
        );
        assert_eq!(operation_from_name("nope"), None);
    }
}
