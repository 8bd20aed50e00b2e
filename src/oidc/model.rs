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
/// `grantType` of `CreateTokenWithIAM` for a JWT from a trusted token
/// issuer (RFC 7523).
pub const GRANT_JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// `grantType` of `CreateTokenWithIAM` for an Identity Center access token
/// issued to another application (RFC 8693).
pub const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// Token type URI of an access token (`subjectTokenType`,
/// `requestedTokenType`, `issuedTokenType`).
pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
/// Token type URI of a refresh token (`requestedTokenType`,
/// `issuedTokenType`).
pub const TOKEN_TYPE_REFRESH_TOKEN: &str = "urn:ietf:params:oauth:token-type:refresh_token";

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

/// Input of `CreateTokenWithIAM` (`POST /token?aws_iam=t`, SigV4-signed for
/// `sso-oauth`). Required: `clientId` (an application ARN) and `grantType`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateTokenWithIamRequest {
    /// The ARN of an Identity Center application with OAuth grants.
    pub client_id: String,
    /// One of [`GRANT_JWT_BEARER`], [`GRANT_TOKEN_EXCHANGE`],
    /// [`GRANT_REFRESH_TOKEN`], [`GRANT_AUTHORIZATION_CODE`].
    pub grant_type: String,
    /// Authorization code (authorization code grant only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<Secret>,
    /// Refresh token (refresh token grant only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<Secret>,
    /// A JWT from a trusted token issuer (JWT bearer grant only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assertion: Option<Secret>,
    /// Requested scopes; none means every scope of the application.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Vec<String>>,
    /// Redirect URI (authorization code grant only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_uri: Option<String>,
    /// The token to exchange (token exchange grant only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_token: Option<Secret>,
    /// Type URI of `subjectToken`, e.g. [`TOKEN_TYPE_ACCESS_TOKEN`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_token_type: Option<String>,
    /// Type URI of the token wanted back (token exchange grant only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_token_type: Option<String>,
    /// PKCE code verifier (authorization code grant only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_verifier: Option<Secret>,
}

impl CreateTokenWithIamRequest {
    fn bare(client_id: impl Into<String>, grant_type: &str) -> Self {
        Self {
            client_id: client_id.into(),
            grant_type: grant_type.to_owned(),
            code: None,
            refresh_token: None,
            assertion: None,
            scope: None,
            redirect_uri: None,
            subject_token: None,
            subject_token_type: None,
            requested_token_type: None,
            code_verifier: None,
        }
    }

    /// A JWT bearer grant: `assertion` is a JWT from a trusted token issuer.
    pub fn jwt_bearer(application_arn: impl Into<String>, assertion: Secret) -> Self {
        Self {
            assertion: Some(assertion),
            ..Self::bare(application_arn, GRANT_JWT_BEARER)
        }
    }

    /// A token exchange grant for an Identity Center access token issued to
    /// another application.
    pub fn token_exchange(
        application_arn: impl Into<String>,
        subject_token: Secret,
        subject_token_type: impl Into<String>,
    ) -> Self {
        Self {
            subject_token: Some(subject_token),
            subject_token_type: Some(subject_token_type.into()),
            ..Self::bare(application_arn, GRANT_TOKEN_EXCHANGE)
        }
    }

    /// A refresh token grant.
    pub fn refresh(application_arn: impl Into<String>, refresh_token: Secret) -> Self {
        Self {
            refresh_token: Some(refresh_token),
            ..Self::bare(application_arn, GRANT_REFRESH_TOKEN)
        }
    }

    /// An authorization code grant.
    pub fn authorization_code(
        application_arn: impl Into<String>,
        code: Secret,
        redirect_uri: impl Into<String>,
        code_verifier: Option<Secret>,
    ) -> Self {
        Self {
            code: Some(code),
            redirect_uri: Some(redirect_uri.into()),
            code_verifier,
            ..Self::bare(application_arn, GRANT_AUTHORIZATION_CODE)
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

    /// Sets `requestedTokenType` (token exchange only).
    #[must_use]
    pub fn with_requested_token_type(mut self, token_type: impl Into<String>) -> Self {
        self.requested_token_type = Some(token_type.into());
        self
    }
}

/// Output of `CreateTokenWithIAM`. Every member is optional in the model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateTokenWithIamResponse {
    /// The bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<Secret>,
    /// `Bearer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_type: Option<String>,
    /// Lifetime of the access token in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<i32>,
    /// A refresh token, when the application allows the refresh grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<Secret>,
    /// A JWT naming the user the access token is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_token: Option<Secret>,
    /// Type URI of the issued token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_token_type: Option<String>,
    /// The scopes granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Vec<String>>,
    /// AWS extensions: the identity context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_additional_details: Option<AwsAdditionalDetails>,
}

/// `awsAdditionalDetails` of a `CreateTokenWithIAM` response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AwsAdditionalDetails {
    /// The identity context STS signed and encrypted for trusted identity
    /// propagation. Not marked sensitive in the model, but it stands for the
    /// user, so it is kept out of logs like a token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_context: Option<Secret>,
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
    fn create_token_with_iam_request_uses_wire_names() {
        let req = CreateTokenWithIamRequest::jwt_bearer(
            "arn:aws:sso::111122223333:application/ssoins-1/apl-1",
            "header.claims.sig".into(),
        )
        .with_scopes(vec!["openid".into()]);
        let v: serde_json::Value = serde_json::to_value(&req).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "clientId": "arn:aws:sso::111122223333:application/ssoins-1/apl-1",
                "grantType": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "assertion": "header.claims.sig",
                "scope": ["openid"],
            })
        );
        let req = CreateTokenWithIamRequest::token_exchange(
            "arn:x",
            "subject".into(),
            TOKEN_TYPE_ACCESS_TOKEN,
        )
        .with_requested_token_type(TOKEN_TYPE_REFRESH_TOKEN);
        let v: serde_json::Value = serde_json::to_value(&req).unwrap();
        assert_eq!(v["grantType"], GRANT_TOKEN_EXCHANGE);
        assert_eq!(v["subjectToken"], "subject");
        assert_eq!(v["subjectTokenType"], TOKEN_TYPE_ACCESS_TOKEN);
        assert_eq!(v["requestedTokenType"], TOKEN_TYPE_REFRESH_TOKEN);
        assert!(v.get("assertion").is_none() && v.get("scope").is_none());
    }

    #[test]
    fn create_token_with_iam_response_decodes_all_members() {
        let r: CreateTokenWithIamResponse = serde_json::from_str(
            r#"{"accessToken":"a","tokenType":"Bearer","expiresIn":3600,"refreshToken":"r",
                "idToken":"i","issuedTokenType":"urn:ietf:params:oauth:token-type:access_token",
                "scope":["openid","aws"],"awsAdditionalDetails":{"identityContext":"ctx"},"new":1}"#,
        )
        .unwrap();
        assert_eq!(r.access_token.unwrap().expose(), "a");
        assert_eq!(r.expires_in, Some(3600));
        assert_eq!(
            r.issued_token_type.as_deref(),
            Some(TOKEN_TYPE_ACCESS_TOKEN)
        );
        assert_eq!(r.scope, Some(vec!["openid".to_owned(), "aws".to_owned()]));
        assert_eq!(
            r.aws_additional_details
                .unwrap()
                .identity_context
                .unwrap()
                .expose(),
            "ctx"
        );
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
        let mut iam = CreateTokenWithIamRequest::authorization_code(
            "arn:x",
            "S3CRET-code".into(),
            "http://127.0.0.1/cb",
            Some("S3CRET-verifier".into()),
        );
        iam.assertion = Some("S3CRET-assertion".into());
        iam.subject_token = Some("S3CRET-subject".into());
        iam.refresh_token = Some("S3CRET-refresh".into());
        let iam_resp = CreateTokenWithIamResponse {
            access_token: Some("S3CRET-access".into()),
            refresh_token: Some("S3CRET-refresh".into()),
            id_token: Some("S3CRET-id".into()),
            aws_additional_details: Some(AwsAdditionalDetails {
                identity_context: Some("S3CRET-context".into()),
            }),
            ..Default::default()
        };
        for text in [
            format!("{iam:?}"),
            format!("{iam_resp:?}"),
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
