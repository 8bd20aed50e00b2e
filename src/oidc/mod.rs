//! The SSO-OIDC client: wire model, typed errors, endpoint resolution.

mod client;
mod endpoint;
mod error;
mod model;

pub use crate::tls::TlsConfigError;
pub use client::{ClientBuildError, OidcClient, OidcClientBuilder};
pub use endpoint::{EndpointError, EndpointParams, resolve_endpoint};
pub use error::{
    Cause, ErrorClass, ErrorDetails, OidcError, Operation, ServiceErrorKind, parse_error_response,
};
pub use model::*;
