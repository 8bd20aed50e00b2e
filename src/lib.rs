//! # sso-token-proxy
//!
//! Obtains OAuth 2.0 bearer tokens from AWS IAM Identity Center OIDC
//! (`CreateToken`), keeps them fresh, and puts `Authorization: Bearer …` on
//! outbound requests — as a tower layer or as a sidecar reverse proxy.

pub mod admin;
pub mod cache;
pub mod cli;
pub mod config;
pub mod emulator;
pub mod fs_atomic;
pub mod layer;
pub mod metric_names;
pub mod oidc;
pub mod proxy;
pub mod retry;
pub mod secret;
pub mod store;
pub mod tls;
pub mod token;

pub use layer::{
    BearerTokenError, BearerTokenLayer, BearerTokenService, ReplayBody, ReplayableBody,
};
pub use secret::Secret;
