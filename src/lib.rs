//! # sso-token-proxy
//!
//! Obtains OAuth 2.0 bearer tokens from AWS IAM Identity Center OIDC
//! (`CreateToken`), keeps them fresh, and puts `Authorization: Bearer …` on
//! outbound requests — as a tower layer or as a sidecar reverse proxy.
//!
//! # Cargo features
//!
//! | feature | what it adds |
//! |---|---|
//! | `layer` | the library core: [`BearerTokenLayer`], `TokenCache`, the token sources, the SSO-OIDC client and its retry policy |
//! | `axum` | [`ReplayableBody`] for `axum::body::Body` (axum-core only) |
//! | `redis` | `store`: the token store replicas share on Redis |
//! | `emulator` | `emulator`: the in-process SSO-OIDC emulator, for tests |
//! | `proxy` (default) | the `sso-token-proxy` binary and the `proxy` module; implies all of the above |
//!
//! A library user depends on `default-features = false, features =
//! ["layer"]`: no axum server, clap, redis, toml or Prometheus exporter, and
//! tokio with `rt`, `sync` and `time` only.

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
