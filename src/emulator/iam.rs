//! `CreateTokenWithIAM` in the emulator: applications (by ARN) that trust the
//! emulator's test issuer, and the four grants the model lists. The SigV4
//! check in front of it is [`super::sigv4`].
//!
//! Every access token issued here names its user: the JWT's `sub` for the
//! JWT bearer grant, the subject token's user for token exchange. Read it
//! with [`token_subject`](super::token_subject) or in the echo resource's
//! `subject` member.

use std::{
    collections::{HashMap, HashSet},
    time::Instant,
};

use crate::{
    oidc::{
        AwsAdditionalDetails, CreateTokenWithIamRequest, CreateTokenWithIamResponse,
        GRANT_AUTHORIZATION_CODE, GRANT_JWT_BEARER, GRANT_REFRESH_TOKEN, GRANT_TOKEN_EXCHANGE,
        ServiceErrorKind, TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_REFRESH_TOKEN,
    },
    secret::Secret,
};

use super::{
    idp::{ISSUER_PATH, TestIssuer},
    sigv4::TestAwsCredentials,
    state::{ApiError, State, ceil_secs, fake_id_token, random_token},
};

/// The application every emulator knows unless configured otherwise.
pub const DEFAULT_APPLICATION_ARN: &str =
    "arn:aws:sso::111122223333:application/ssoins-1111111111111111/apl-1111111111111111";
/// The `aud` the default application accepts, and the default of minted
/// assertions.
pub const DEFAULT_AUDIENCE: &str = "sso-token-proxy";
/// The access key id of the emulator's test credentials. Valid nowhere else.
pub const TEST_ACCESS_KEY_ID: &str = "AKIAEMULATOR00000000";
/// The secret access key of the emulator's test credentials. Valid nowhere
/// else.
pub const TEST_SECRET_ACCESS_KEY: &str = "emulator/test/secret/key/valid/nowhere/00";
/// The user of tokens from an authorization code (the emulator has no login
/// page that would name one).
const AUTHORIZATION_CODE_USER: &str = "emulator-user";
/// Scopes granted when neither the request nor the application names any
/// (the model's documented defaults).
const DEFAULT_SCOPES: [&str; 3] = ["openid", "aws", "sts:identity_context"];

/// An Identity Center application with OAuth grants, as the emulator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmulatorApplication {
    /// Its ARN: the `clientId` of `CreateTokenWithIAM`.
    pub arn: String,
    /// The `aud` values its JWT bearer grant accepts from the test issuer.
    pub audiences: Vec<String>,
    /// The scopes it may grant; empty means any.
    pub scopes: Vec<String>,
}

impl Default for EmulatorApplication {
    fn default() -> Self {
        Self {
            arn: DEFAULT_APPLICATION_ARN.to_owned(),
            audiences: vec![DEFAULT_AUDIENCE.to_owned()],
            scopes: Vec::new(),
        }
    }
}

/// The emulator's test credentials ([`TEST_ACCESS_KEY_ID`],
/// [`TEST_SECRET_ACCESS_KEY`]).
pub fn test_aws_credentials() -> TestAwsCredentials {
    TestAwsCredentials {
        access_key_id: TEST_ACCESS_KEY_ID.to_owned(),
        secret_access_key: Secret::new(TEST_SECRET_ACCESS_KEY),
        session_token: None,
    }
}

struct IamRefresh {
    application: String,
    subject: String,
    scopes: Vec<String>,
}

/// What `CreateTokenWithIAM` needs beyond the shared token bookkeeping.
pub(crate) struct IamState {
    pub(crate) credentials: Vec<TestAwsCredentials>,
    applications: HashMap<String, EmulatorApplication>,
    pub(crate) issuer: TestIssuer,
    refresh_tokens: HashMap<String, IamRefresh>,
    /// Users refused with `AccessDenied` (not assigned to the application).
    denied_users: HashSet<String>,
}

impl IamState {
    pub(crate) fn new(
        credentials: Vec<TestAwsCredentials>,
        applications: Vec<EmulatorApplication>,
    ) -> Self {
        Self {
            credentials,
            applications: applications
                .into_iter()
                .map(|a| (a.arn.clone(), a))
                .collect(),
            issuer: TestIssuer::generate(),
            refresh_tokens: HashMap::new(),
            denied_users: HashSet::new(),
        }
    }

    /// Refuses `subject` with `AccessDenied` from now on.
    pub(crate) fn deny_user(&mut self, subject: &str) {
        self.denied_users.insert(subject.to_owned());
    }

    /// Adds (or replaces) an application.
    pub(crate) fn add_application(&mut self, application: EmulatorApplication) {
        self.applications
            .insert(application.arn.clone(), application);
    }

    #[cfg(test)]
    pub(crate) fn for_tests() -> Self {
        Self::new(
            vec![test_aws_credentials()],
            vec![EmulatorApplication::default()],
        )
    }
}

fn err<T>(kind: ServiceErrorKind, description: impl Into<String>) -> Result<T, ApiError> {
    Err(ApiError::new(kind, description))
}

/// The issuer URL of the test token issuer behind `base_url`.
pub(crate) fn issuer_url(base_url: &str) -> String {
    format!("{base_url}{ISSUER_PATH}")
}

/// `CreateTokenWithIAM`, after its signature passed. Counts the grant and,
/// on success, the issued token.
pub(crate) fn create_token_with_iam(
    state: &mut State,
    req: CreateTokenWithIamRequest,
    now: Instant,
    base_url: &str,
) -> Result<CreateTokenWithIamResponse, ApiError> {
    state.counters.count_iam_grant(&req.grant_type);
    let Some(app) = state.iam.applications.get(&req.client_id).cloned() else {
        return err(
            ServiceErrorKind::InvalidClient,
            "clientId is not the ARN of an application with OAuth grants",
        );
    };
    let requested = req.scope.clone().unwrap_or_default();
    let mut issue_refresh = false;
    let (subject, held_scopes) = match req.grant_type.as_str() {
        GRANT_JWT_BEARER => {
            let Some(assertion) = req.assertion.as_ref().filter(|a| !a.is_empty()) else {
                return err(
                    ServiceErrorKind::InvalidRequest,
                    "assertion is required for the JWT bearer grant",
                );
            };
            // RFC 7523 §3.1: an invalid or expired JWT is `invalid_grant`.
            let claims = state
                .iam
                .issuer
                .validate(assertion.expose(), &issuer_url(base_url), &app.audiences)
                .map_err(|rejected| ApiError::new(ServiceErrorKind::InvalidGrant, rejected.0))?;
            (claims.sub, None)
        }
        GRANT_TOKEN_EXCHANGE => {
            let Some(subject_token) = req.subject_token.as_ref().filter(|t| !t.is_empty()) else {
                return err(
                    ServiceErrorKind::InvalidRequest,
                    "subjectToken is required for the token exchange grant",
                );
            };
            if req.subject_token_type.as_deref() != Some(TOKEN_TYPE_ACCESS_TOKEN) {
                return err(
                    ServiceErrorKind::InvalidRequest,
                    format!("subjectTokenType must be {TOKEN_TYPE_ACCESS_TOKEN}"),
                );
            }
            match req.requested_token_type.as_deref() {
                None | Some(TOKEN_TYPE_ACCESS_TOKEN) => {}
                Some(TOKEN_TYPE_REFRESH_TOKEN) => issue_refresh = true,
                Some(_) => {
                    return err(
                        ServiceErrorKind::InvalidRequest,
                        "requestedTokenType is not a supported token type",
                    );
                }
            }
            let Some(entry) = state.live_access_token(subject_token.expose(), now) else {
                return err(
                    ServiceErrorKind::InvalidGrant,
                    "Subject token is invalid or expired",
                );
            };
            if entry.audience.as_deref() == Some(app.arn.as_str()) {
                return err(
                    ServiceErrorKind::InvalidGrant,
                    "Subject token was issued to this application; exchange needs another's",
                );
            }
            let Some(subject) = entry.subject.clone() else {
                return err(
                    ServiceErrorKind::InvalidGrant,
                    "Subject token does not identify a user",
                );
            };
            (subject, None)
        }
        GRANT_REFRESH_TOKEN => {
            let Some(token) = req.refresh_token.as_ref().filter(|t| !t.is_empty()) else {
                return err(
                    ServiceErrorKind::InvalidRequest,
                    "refreshToken is required for the refresh_token grant",
                );
            };
            match state.iam.refresh_tokens.get(token.expose()) {
                Some(r) if r.application == app.arn => (r.subject.clone(), Some(r.scopes.clone())),
                Some(_) => {
                    return err(
                        ServiceErrorKind::InvalidGrant,
                        "Refresh token was issued to another application",
                    );
                }
                None => {
                    return err(
                        ServiceErrorKind::InvalidGrant,
                        "Invalid refresh token provided",
                    );
                }
            }
        }
        GRANT_AUTHORIZATION_CODE => {
            state.check_authorization_code(
                &app.arn,
                req.code.as_ref(),
                req.redirect_uri.as_deref(),
                req.code_verifier.as_ref(),
                now,
            )?;
            issue_refresh = true;
            (AUTHORIZATION_CODE_USER.to_owned(), None)
        }
        _ => {
            return err(
                ServiceErrorKind::UnsupportedGrantType,
                "Unsupported grant type",
            );
        }
    };
    if state.iam.denied_users.contains(&subject) {
        return err(
            ServiceErrorKind::AccessDenied,
            "User is not assigned to the application",
        );
    }
    let allowed = held_scopes.unwrap_or_else(|| app.scopes.clone());
    let granted: Vec<String> =
        if !allowed.is_empty() && !requested.iter().all(|s| allowed.contains(s)) {
            return err(
                ServiceErrorKind::InvalidScope,
                "Requested scopes exceed those of the application",
            );
        } else if !requested.is_empty() {
            requested
        } else if !allowed.is_empty() {
            allowed
        } else {
            DEFAULT_SCOPES.iter().map(|s| (*s).to_owned()).collect()
        };
    if req.grant_type == GRANT_AUTHORIZATION_CODE {
        state.use_authorization_code(req.code.as_ref());
    }

    let (access, lifetime) = state.issue_access_token(now, Some(&subject), Some(&app.arn));
    let refresh_token = issue_refresh.then(|| {
        let token = random_token("aor", 100);
        state.iam.refresh_tokens.insert(
            token.clone(),
            IamRefresh {
                application: app.arn.clone(),
                subject: subject.clone(),
                scopes: granted.clone(),
            },
        );
        Secret::new(token)
    });
    let issued_token_type = if req.requested_token_type.as_deref() == Some(TOKEN_TYPE_REFRESH_TOKEN)
    {
        TOKEN_TYPE_REFRESH_TOKEN
    } else {
        TOKEN_TYPE_ACCESS_TOKEN
    };
    state.counters.tokens_issued += 1;
    Ok(CreateTokenWithIamResponse {
        access_token: Some(Secret::new(access)),
        token_type: Some("Bearer".to_owned()),
        expires_in: Some(ceil_secs(lifetime).max(1)),
        refresh_token,
        id_token: Some(Secret::new(fake_id_token(
            base_url,
            &app.arn,
            lifetime,
            Some(&subject),
        ))),
        issued_token_type: Some(issued_token_type.to_owned()),
        scope: Some(granted),
        aws_additional_details: Some(AwsAdditionalDetails {
            identity_context: Some(Secret::new(random_token("ctx", 64))),
        }),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::emulator::token_subject;

    const BASE: &str = "http://127.0.0.1:1";

    fn state() -> State {
        State::for_tests()
    }

    fn assertion(s: &State, sub: &str) -> Secret {
        Secret::new(s.iam.issuer.mint(
            &issuer_url(BASE),
            sub,
            DEFAULT_AUDIENCE,
            Duration::from_secs(300),
            false,
        ))
    }

    fn kind(r: Result<CreateTokenWithIamResponse, ApiError>) -> ServiceErrorKind {
        r.unwrap_err().kind
    }

    #[test]
    fn jwt_bearer_then_token_exchange_keep_the_subject() {
        let mut s = state();
        let now = Instant::now();
        let a = assertion(&s, "alice");
        let resp = create_token_with_iam(
            &mut s,
            CreateTokenWithIamRequest::jwt_bearer(DEFAULT_APPLICATION_ARN, a),
            now,
            BASE,
        )
        .unwrap();
        let access = resp.access_token.unwrap();
        assert_eq!(token_subject(access.expose()).as_deref(), Some("alice"));
        assert_eq!(
            resp.issued_token_type.as_deref(),
            Some(TOKEN_TYPE_ACCESS_TOKEN)
        );
        assert_eq!(resp.scope.unwrap(), DEFAULT_SCOPES);
        assert!(resp.refresh_token.is_none());

        // Exchanging at the same application is refused; another one works.
        let same = CreateTokenWithIamRequest::token_exchange(
            DEFAULT_APPLICATION_ARN,
            access.clone(),
            TOKEN_TYPE_ACCESS_TOKEN,
        );
        assert_eq!(
            kind(create_token_with_iam(&mut s, same, now, BASE)),
            ServiceErrorKind::InvalidGrant
        );
        s.iam.applications.insert(
            "arn:other".into(),
            EmulatorApplication {
                arn: "arn:other".into(),
                audiences: vec![],
                scopes: vec!["read".into()],
            },
        );
        let exchange =
            CreateTokenWithIamRequest::token_exchange("arn:other", access, TOKEN_TYPE_ACCESS_TOKEN)
                .with_requested_token_type(TOKEN_TYPE_REFRESH_TOKEN);
        let resp = create_token_with_iam(&mut s, exchange, now, BASE).unwrap();
        assert_eq!(
            token_subject(resp.access_token.unwrap().expose()).as_deref(),
            Some("alice")
        );
        assert_eq!(resp.scope.unwrap(), ["read"]);
        let refresh = resp.refresh_token.unwrap();
        let again = create_token_with_iam(
            &mut s,
            CreateTokenWithIamRequest::refresh("arn:other", refresh.clone()),
            now,
            BASE,
        )
        .unwrap();
        assert_eq!(
            token_subject(again.access_token.unwrap().expose()).as_deref(),
            Some("alice")
        );
        assert_eq!(
            kind(create_token_with_iam(
                &mut s,
                CreateTokenWithIamRequest::refresh(DEFAULT_APPLICATION_ARN, refresh),
                now,
                BASE
            )),
            ServiceErrorKind::InvalidGrant
        );
        assert_eq!(
            s.counters.create_token_with_iam_by_grant[GRANT_JWT_BEARER],
            1
        );
        assert_eq!(
            s.counters.create_token_with_iam_by_grant[GRANT_TOKEN_EXCHANGE],
            2
        );
    }

    #[test]
    fn modelled_errors_for_bad_input() {
        let mut s = state();
        let now = Instant::now();
        let a = assertion(&s, "alice");
        assert_eq!(
            kind(create_token_with_iam(
                &mut s,
                CreateTokenWithIamRequest::jwt_bearer("arn:unknown", a.clone()),
                now,
                BASE
            )),
            ServiceErrorKind::InvalidClient
        );
        let mut bad_grant =
            CreateTokenWithIamRequest::jwt_bearer(DEFAULT_APPLICATION_ARN, a.clone());
        bad_grant.grant_type = "client_credentials".into();
        assert_eq!(
            kind(create_token_with_iam(&mut s, bad_grant, now, BASE)),
            ServiceErrorKind::UnsupportedGrantType
        );
        let mut no_assertion = CreateTokenWithIamRequest::jwt_bearer(DEFAULT_APPLICATION_ARN, a);
        no_assertion.assertion = None;
        assert_eq!(
            kind(create_token_with_iam(&mut s, no_assertion, now, BASE)),
            ServiceErrorKind::InvalidRequest
        );
        let expired = Secret::new(s.iam.issuer.mint(
            &issuer_url(BASE),
            "alice",
            DEFAULT_AUDIENCE,
            Duration::from_secs(300),
            true,
        ));
        let e = create_token_with_iam(
            &mut s,
            CreateTokenWithIamRequest::jwt_bearer(DEFAULT_APPLICATION_ARN, expired),
            now,
            BASE,
        )
        .unwrap_err();
        assert_eq!(
            (e.kind, e.description.as_str()),
            (ServiceErrorKind::InvalidGrant, "Assertion has expired")
        );
        s.iam
            .applications
            .get_mut(DEFAULT_APPLICATION_ARN)
            .unwrap()
            .scopes = vec!["openid".into()];
        let wide =
            CreateTokenWithIamRequest::jwt_bearer(DEFAULT_APPLICATION_ARN, assertion(&s, "bob"))
                .with_scopes(vec!["admin".into()]);
        assert_eq!(
            kind(create_token_with_iam(&mut s, wide, now, BASE)),
            ServiceErrorKind::InvalidScope
        );
        let unknown_subject = CreateTokenWithIamRequest::token_exchange(
            DEFAULT_APPLICATION_ARN,
            "aoa-nope".into(),
            TOKEN_TYPE_ACCESS_TOKEN,
        );
        assert_eq!(
            kind(create_token_with_iam(&mut s, unknown_subject, now, BASE)),
            ServiceErrorKind::InvalidGrant
        );
        assert_eq!(s.counters.tokens_issued, 0);
    }

    #[test]
    fn a_denied_user_gets_access_denied_and_others_do_not() {
        let mut s = state();
        let now = Instant::now();
        s.iam.deny_user("mallory");
        let denied = CreateTokenWithIamRequest::jwt_bearer(
            DEFAULT_APPLICATION_ARN,
            assertion(&s, "mallory"),
        );
        assert_eq!(
            kind(create_token_with_iam(&mut s, denied, now, BASE)),
            ServiceErrorKind::AccessDenied
        );
        let allowed =
            CreateTokenWithIamRequest::jwt_bearer(DEFAULT_APPLICATION_ARN, assertion(&s, "alice"));
        create_token_with_iam(&mut s, allowed, now, BASE).unwrap();
        assert_eq!(s.counters.tokens_issued, 1);
    }

    #[test]
    fn authorization_code_grant_for_an_application() {
        let mut s = state();
        let now = Instant::now();
        let code =
            s.issue_authorization_code(DEFAULT_APPLICATION_ARN, "http://127.0.0.1/cb", None, now);
        let req = CreateTokenWithIamRequest::authorization_code(
            DEFAULT_APPLICATION_ARN,
            Secret::new(code),
            "http://127.0.0.1/cb",
            None,
        );
        let resp = create_token_with_iam(&mut s, req.clone(), now, BASE).unwrap();
        assert!(resp.refresh_token.is_some());
        assert_eq!(
            kind(create_token_with_iam(&mut s, req, now, BASE)),
            ServiceErrorKind::InvalidGrant
        );
    }
}
