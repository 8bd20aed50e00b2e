//! # sso-token-proxy
//!
//! Obtains OAuth 2.0 bearer tokens from AWS IAM Identity Center OIDC
//! (`CreateToken`), keeps them fresh, and puts `Authorization: Bearer …` on
//! outbound requests — as a tower layer or as a sidecar reverse proxy.

#[cfg(feature = "proxy")]
pub mod admin;
#[cfg(feature = "layer")]
pub mod cache;
#[cfg(feature = "proxy")]
pub mod cli;
#[cfg(feature = "proxy")]
pub mod config;
#[cfg(feature = "emulator")]
pub mod emulator;
#[cfg(feature = "layer")]
pub mod fs_atomic;
#[cfg(feature = "layer")]
pub mod layer;
pub mod metric_names;
#[cfg(feature = "layer")]
pub mod oidc;
#[cfg(feature = "proxy")]
pub mod proxy;
#[cfg(feature = "layer")]
pub mod retry;
#[cfg(feature = "layer")]
pub mod secret;
#[cfg(feature = "redis")]
pub mod store;
#[cfg(feature = "layer")]
pub mod tls;
#[cfg(feature = "layer")]
pub mod token;

#[cfg(feature = "layer")]
pub use layer::{
    BearerTokenError, BearerTokenLayer, BearerTokenService, ReplayBody, ReplayableBody,
};
#[cfg(feature = "layer")]
pub use secret::Secret;
