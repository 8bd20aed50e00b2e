//! The SSO-OIDC client: wire model, typed errors, endpoint resolution.

mod client;
mod endpoint;
mod error;
mod model;
#[cfg(feature = "aws-iam")]
mod sigv4;

pub use crate::tls::TlsConfigError;
pub use client::{ClientBuildError, OidcClient, OidcClientBuilder};
pub use endpoint::{EndpointError, EndpointParams, resolve_endpoint};
pub use error::{
    Cause, ErrorClass, ErrorDetails, OidcError, Operation, ServiceErrorKind, parse_error_response,
};
pub use model::*;
#[cfg(feature = "aws-iam")]
pub use sigv4::{AwsCredentials, SIGNING_NAME, SigV4Signer};
