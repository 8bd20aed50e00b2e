//! Request and response shapes of the SSO-OIDC operations, as the service
//! model (`service-2.json`, restJson1) defines them. Member names on the wire
//! are camelCase; every member the model marks sensitive is a [`Secret`].

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// `grantType` for exchanging a refresh token.
pub const GRANT_REFRESH_TOKEN: &str = "refresh_token";
/// `grantType` for the device authorization flow (RFC 8628).
pub const GRANT_DEVICE_CODE: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// `grantType` for the authorization code flow (with PKCE).
pub const GRANT_AUTHORIZATION_CODE: &str = "authorization_code";

/// Input of `CreateToken` (`POST /token`). Required: `clientId`,
/// `clientSecret`, `grantType`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateTokenRequest {
    /// The client id from `RegisterClient`.
    pub client_id: String,
    /// The client secret from `RegisterClient`.
    pub client_secret: Secret,
    /// One of the `GRANT_*` constants.
    pub grant_type: String,
    /// Device code from `StartDeviceAuthorization` (device flow only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_code: Option<Secret>,
    /// Authorization code (authorization code flow only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<Secret>,
    /// Refresh token (refresh flow only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<Secret>,
    /// Requested scopes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Vec<String>>,
    /// Redirect URI of the authorization code flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_uri: Option<String>,
    /// PKCE code verifier of the authorization code flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_verifier: Option<Secret>,
}

impl CreateTokenRequest {
    /// A `refresh_token` grant request.
    pub fn refresh(
        client_id: impl Into<String>,
        client_secret: Secret,
        refresh_token: Secret,
    ) -> Self {
        Self {
            client_id: client_id.into(),
            client_secret,
            grant_type: GRANT_REFRESH_TOKEN.to_owned(),
            device_code: None,
            code: None,
            refresh_token: Some(refresh_token),
            scope: None,
            redirect_uri: None,
            code_verifier: None,
        }
    }

    /// A device code grant request (RFC 8628 polling).
    pub fn device_code(
        client_id: impl Into<String>,
        client_secret: Secret,
        device_code: Secret,
    ) -> Self {
        Self {
            grant_type: GRANT_DEVICE_CODE.to_owned(),
            refresh_token: None,
            device_code: Some(device_code),
            ..Self::refresh(client_id, client_secret, Secret::default())
        }
    }

    /// An authorization code grant request.
    pub fn authorization_code(
        client_id: impl Into<String>,
        client_secret: Secret,
        code: Secret,
        redirect_uri: impl Into<String>,
        code_verifier: Option<Secret>,
    ) -> Self {
        Self {
            grant_type: GRANT_AUTHORIZATION_CODE.to_owned(),
            refresh_token: None,
            code: Some(code),
            redirect_uri: Some(redirect_uri.into()),
            code_verifier,
            ..Self::refresh(client_id, client_secret, Secret::default())
        }
    }

    /// Sets the requested scopes; an empty list sends none.
    #[must_use]
    pub fn with_scopes(mut self, scopes: Vec<String>) -> Self {
        self.scope = if scopes.is_empty() {
            None
        } else {
            Some(scopes)
        };
        self
    }
}

/// Output of `CreateToken`. The model makes every member optional; callers
/// that need one check for it (see [`crate::oidc::OidcError::Decode`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateTokenResponse {
    /// The bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<Secret>,
    /// Always `Bearer` in practice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_type: Option<String>,
    /// Lifetime of the access token in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<i32>,
    /// A refresh token; with rotation it replaces the one that was used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<Secret>,
    /// An OpenID Connect id token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_token: Option<Secret>,
}

/// Input of `RegisterClient` (`POST /client/register`). Required:
/// `clientName`, `clientType`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterClientRequest {
    /// Friendly client name.
    pub client_name: String,
    /// Client type; the service accepts `public`.
    pub client_type: String,
    /// Scopes the client may request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// Redirect URIs for the authorization code flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_uris: Option<Vec<String>>,
    /// Grant types the client may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_types: Option<Vec<String>>,
    /// Issuer URL of a trusted token issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_url: Option<String>,
    /// ARN of the application the client is entitled to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entitled_application_arn: Option<String>,
}

impl RegisterClientRequest {
    /// A public client with the given name and no other options.
    pub fn public(client_name: impl Into<String>) -> Self {
        Self {
            client_name: client_name.into(),
            client_type: "public".to_owned(),
            scopes: None,
            redirect_uris: None,
            grant_types: None,
            issuer_url: None,
            entitled_application_arn: None,
        }
    }
}

/// Output of `RegisterClient`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterClientResponse {
    /// The new client id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The new client secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<Secret>,
    /// Issue time, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id_issued_at: Option<i64>,
    /// Secret expiry, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_expires_at: Option<i64>,
    /// Authorization endpoint, when the client has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_endpoint: Option<String>,
    /// Token endpoint, when the client has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_endpoint: Option<String>,
}

/// Input of `StartDeviceAuthorization` (`POST /device_authorization`).
/// Required: `clientId`, `clientSecret`, `startUrl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StartDeviceAuthorizationRequest {
    /// The client id from `RegisterClient`.
    pub client_id: String,
    /// The client secret from `RegisterClient`.
    pub client_secret: Secret,
    /// The AWS access portal URL.
    pub start_url: String,
}

/// Output of `StartDeviceAuthorization`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StartDeviceAuthorizationResponse {
    /// The device code to poll `CreateToken` with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_code: Option<Secret>,
    /// The code the person types at the verification URI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_code: Option<String>,
    /// Where the person approves the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_uri: Option<String>,
    /// The verification URI with the user code filled in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_uri_complete: Option<String>,
    /// Lifetime of the device code in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<i32>,
    /// Minimum polling interval in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<i32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_token_request_uses_wire_names_and_scope_list() {
        let req = CreateTokenRequest::refresh("cid", "csecret".into(), "rtok".into())
            .with_scopes(vec!["sso:account:access".into()]);
        let v: serde_json::Value = serde_json::to_value(&req).unwrap();
        assert_eq!(v["clientId"], "cid");
        assert_eq!(v["clientSecret"], "csecret");
        assert_eq!(v["grantType"], "refresh_token");
        assert_eq!(v["refreshToken"], "rtok");
        assert_eq!(v["scope"], serde_json::json!(["sso:account:access"]));
        assert!(v.get("deviceCode").is_none());
        assert!(v.get("codeVerifier").is_none());
    }

    #[test]
    fn create_token_response_decodes_all_members() {
        let r: CreateTokenResponse = serde_json::from_str(
            r#"{"accessToken":"a","tokenType":"Bearer","expiresIn":3600,"refreshToken":"r","idToken":"i","extra":1}"#,
        )
        .unwrap();
        assert_eq!(r.access_token.unwrap().expose(), "a");
        assert_eq!(r.expires_in, Some(3600));
        assert_eq!(r.refresh_token.unwrap().expose(), "r");
        assert_eq!(r.id_token.unwrap().expose(), "i");
    }

    #[test]
    fn debug_of_secret_holding_shapes_has_no_secret() {
        let mut req = CreateTokenRequest::authorization_code(
            "cid",
            "S3CRET-client".into(),
            "S3CRET-code".into(),
            "http://127.0.0.1/cb",
            Some("S3CRET-verifier".into()),
        );
        req.refresh_token = Some("S3CRET-refresh".into());
        req.device_code = Some("S3CRET-device".into());
        let resp = CreateTokenResponse {
            access_token: Some("S3CRET-access".into()),
            token_type: Some("Bearer".into()),
            expires_in: Some(1),
            refresh_token: Some("S3CRET-refresh".into()),
            id_token: Some("S3CRET-id".into()),
        };
        let reg = RegisterClientResponse {
            client_id: Some("cid".into()),
            client_secret: Some("S3CRET-client".into()),
            ..Default::default()
        };
        let sda_req = StartDeviceAuthorizationRequest {
            client_id: "cid".into(),
            client_secret: "S3CRET-client".into(),
            start_url: "https://x".into(),
        };
        let sda = StartDeviceAuthorizationResponse {
            device_code: Some("S3CRET-device".into()),
            user_code: Some("ABCD-EFGH".into()),
            ..Default::default()
        };
        for text in [
            format!("{req:?}"),
            format!("{resp:?}"),
            format!("{reg:?}"),
            format!("{sda_req:?}"),
            format!("{sda:?}"),
        ] {
            assert!(!text.contains("S3CRET"), "secret leaked in {text}");
        }
    }
}
