//! One `CreateTokenWithIAM` exchange, with the retry policy: a credential
//! (a JWT from a trusted token issuer, or another application's Identity
//! Center token) in, an application's [`Token`] out.
//!
//! The pod's own source ([`JwtBearerSource`](super::JwtBearerSource)) calls
//! it with the assertion file's contents; a per-caller cache calls it with
//! each caller's inbound token. It holds no state between calls.

use std::fmt;

use tower::ServiceExt as _;

use super::{Token, TokenError};
use crate::{
    oidc::{CreateTokenWithIamRequest, OidcClient, TOKEN_TYPE_ACCESS_TOKEN},
    retry::OidcRetryPolicy,
    secret::Secret,
};

/// What is exchanged.
#[derive(Clone)]
pub enum IamGrant {
    /// `urn:ietf:params:oauth:grant-type:jwt-bearer` with this JWT.
    JwtBearer {
        /// The JWT from a trusted token issuer.
        assertion: Secret,
    },
    /// `urn:ietf:params:oauth:grant-type:token-exchange` with this token.
    TokenExchange {
        /// The token to exchange.
        subject_token: Secret,
        /// Its type URI; Identity Center takes
        /// [`TOKEN_TYPE_ACCESS_TOKEN`].
        subject_token_type: String,
    },
}

impl IamGrant {
    /// A JWT bearer grant.
    pub fn jwt_bearer(assertion: Secret) -> Self {
        Self::JwtBearer { assertion }
    }

    /// A token exchange grant for an Identity Center access token.
    pub fn access_token_exchange(subject_token: Secret) -> Self {
        Self::TokenExchange {
            subject_token,
            subject_token_type: TOKEN_TYPE_ACCESS_TOKEN.to_owned(),
        }
    }

    /// The grant's short name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::JwtBearer { .. } => "jwt_bearer",
            Self::TokenExchange { .. } => "token_exchange",
        }
    }
}

impl fmt::Debug for IamGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::JwtBearer { .. } => f.debug_struct("JwtBearer").finish_non_exhaustive(),
            Self::TokenExchange {
                subject_token_type, ..
            } => f
                .debug_struct("TokenExchange")
                .field("subject_token_type", subject_token_type)
                .finish_non_exhaustive(),
        }
    }
}

/// Exchanges credentials for one application's tokens. Cheap to clone.
#[derive(Clone, Debug)]
pub struct IamExchange {
    oidc: OidcClient,
    policy: OidcRetryPolicy,
    application_arn: String,
    scopes: Vec<String>,
}

impl IamExchange {
    /// Exchanges at `application_arn` through `oidc`, which must sign (see
    /// [`OidcClientBuilder::sigv4`](crate::oidc::OidcClientBuilder::sigv4)).
    pub fn new(oidc: OidcClient, application_arn: impl Into<String>) -> Self {
        Self {
            oidc,
            policy: OidcRetryPolicy::new(Default::default()),
            application_arn: application_arn.into(),
            scopes: Vec::new(),
        }
    }

    /// The retry policy (default: [`OidcRetryPolicy`] with default settings).
    #[must_use]
    pub fn retry_policy(mut self, policy: OidcRetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Scopes to request; none asks for all of the application's.
    #[must_use]
    pub fn scopes(mut self, scopes: Vec<String>) -> Self {
        self.scopes = scopes;
        self
    }

    /// The application's ARN (`clientId`).
    pub fn application_arn(&self) -> &str {
        &self.application_arn
    }

    /// The requested scopes.
    pub fn requested_scopes(&self) -> &[String] {
        &self.scopes
    }

    /// One exchange, retried per the policy (throttling and transient
    /// failures), never cached here.
    pub async fn exchange(&self, grant: IamGrant) -> Result<Token, TokenError> {
        let request = match grant {
            IamGrant::JwtBearer { assertion } => {
                CreateTokenWithIamRequest::jwt_bearer(self.application_arn.clone(), assertion)
            }
            IamGrant::TokenExchange {
                subject_token,
                subject_token_type,
            } => CreateTokenWithIamRequest::token_exchange(
                self.application_arn.clone(),
                subject_token,
                subject_token_type,
            ),
        }
        .with_scopes(self.scopes.clone());
        let response = tower::retry::Retry::new(self.policy.clone(), self.oidc.clone())
            .oneshot(request)
            .await?;
        let token = Token::from_iam_response(&response)?;
        Ok(if token.scopes().is_empty() {
            token.with_scopes(self.scopes.clone())
        } else {
            token
        })
    }
}

/// Which grant a per-caller exchange makes of the caller's inbound token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallerGrant {
    /// The inbound token is a JWT of a trusted token issuer.
    JwtBearer,
    /// The inbound token is exchanged as a token of this type URI.
    TokenExchange {
        /// E.g. [`TOKEN_TYPE_ACCESS_TOKEN`].
        subject_token_type: String,
    },
}

/// A [`CallerExchange`](crate::cache::CallerExchange) through
/// `CreateTokenWithIAM`: each caller's inbound token is the grant's
/// credential.
#[derive(Debug, Clone)]
pub struct IamCallerExchange {
    exchange: IamExchange,
    grant: CallerGrant,
}

impl IamCallerExchange {
    /// Exchanges inbound tokens through `exchange` with `grant`.
    pub fn new(exchange: IamExchange, grant: CallerGrant) -> Self {
        Self { exchange, grant }
    }
}

impl crate::cache::CallerExchange for IamCallerExchange {
    fn exchange(&self, inbound: Secret) -> super::FetchFuture<'_> {
        let grant = match &self.grant {
            CallerGrant::JwtBearer => IamGrant::jwt_bearer(inbound),
            CallerGrant::TokenExchange { subject_token_type } => IamGrant::TokenExchange {
                subject_token: inbound,
                subject_token_type: subject_token_type.clone(),
            },
        };
        Box::pin(self.exchange.exchange(grant))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_credential() {
        let g = IamGrant::jwt_bearer("S3CRET-jwt".into());
        let t = IamGrant::access_token_exchange("S3CRET-token".into());
        let text = format!("{g:?} {t:?}");
        assert!(!text.contains("S3CRET"), "{text}");
        assert_eq!((g.name(), t.name()), ("jwt_bearer", "token_exchange"));
    }
}
