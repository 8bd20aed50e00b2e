//! The SSO-OIDC client: wire model, typed errors, endpoint resolution.

pub mod client;
pub mod endpoint;
pub mod error;
pub mod model;

pub use client::{OidcClient, OidcClientBuilder};
pub use endpoint::{EndpointError, EndpointParams, resolve_endpoint};
pub use error::{
    ErrorClass, ErrorDetails, OidcError, Operation, ServiceErrorKind, parse_error_response,
};
pub use model::*;
