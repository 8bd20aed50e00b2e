//! # sso-token-proxy
//!
//! Obtains OAuth 2.0 bearer tokens from AWS IAM Identity Center OIDC
//! (`CreateToken`), keeps them fresh, and puts `Authorization: Bearer …` on
//! outbound requests — as a tower layer or as a sidecar reverse proxy.
//!
//! # The layer
//!
//! A [`TokenSource`] fetches tokens ([`RefreshTokenSource`] with a client and
//! refresh token, [`SsoCacheSource`] from an AWS SSO cache file); a
//! [`TokenCache`] keeps one fresh (single-flight, refresh-ahead, failure
//! memory); [`BearerTokenLayer`] puts it on every request of any
//! `tower::Service<http::Request<B>>`:
//!
//! ```no_run
//! use sso_token_proxy::{
//!     BearerTokenLayer, CacheOptions, OidcClient, RefreshTokenSource, Secret, TokenCache,
//! };
//! use tower::ServiceBuilder;
//!
//! # fn inner_service() -> tower::util::BoxCloneService<http::Request<String>, http::Response<String>, std::convert::Infallible> {
//! #     tower::util::BoxCloneService::new(tower::service_fn(|_: http::Request<String>| async {
//! #         Ok(http::Response::new(String::new()))
//! #     }))
//! # }
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let oidc = OidcClient::builder().region("us-east-1").build()?;
//! let source = RefreshTokenSource::builder(
//!     oidc,
//!     "my-client-id",
//!     Secret::new("my-client-secret"),
//!     Secret::new("my-refresh-token"),
//! )
//! .state_file("/var/lib/my-app/sso-state.json")
//! .build()?;
//! let cache = TokenCache::new(source, CacheOptions::default());
//!
//! let client = ServiceBuilder::new()
//!     .layer(BearerTokenLayer::new(cache))
//!     .service(inner_service());
//! # let _ = client;
//! # Ok(())
//! # }
//! ```
//!
//! The layer takes tokens from any [`TokenProvider`]; [`TokenCache`] is the
//! one this crate offers. Without a token the service fails with
//! [`BearerTokenError::Token`], which [`unavailable_response`] turns into a
//! `503` JSON answer.
//!
//! # Cargo features
//!
//! | feature | what it adds |
//! |---|---|
//! | `layer` | the library core: [`BearerTokenLayer`], [`TokenCache`], the token sources, the SSO-OIDC client ([`oidc`]) and its retry policy ([`retry`]) |
//! | `axum` | [`ReplayableBody`] for `axum::body::Body` (axum-core only) |
//! | `redis` | `store`: the token store replicas share on Redis |
//! | `emulator` | `emulator`: the in-process SSO-OIDC emulator, for tests |
//! | `aws-iam` (default) | `CreateTokenWithIAM`: SigV4 signing with the AWS credential chain (`aws-config`, `oidc::SigV4Signer`), `IamExchange` and `JwtBearerSource` (a JWT from a file exchanged for the pod's token) |
//! | `proxy` (default) | the `sso-token-proxy` binary and the `proxy` module; implies all of the above but `aws-iam` |
//!
//! A library user depends on `default-features = false, features =
//! ["layer"]`: no axum server, clap, redis, toml or Prometheus exporter, and
//! tokio with `rt`, `sync` and `time` only.
//!
//! # Metrics
//!
//! The crate records through the [`metrics`](https://docs.rs/metrics)
//! facade; [`metric_names`] lists every metric it records.

#[cfg(feature = "proxy")]
mod admin;
#[cfg(feature = "layer")]
pub mod cache;
#[cfg(feature = "proxy")]
mod cli;
#[cfg(feature = "proxy")]
mod config;
#[cfg(feature = "emulator")]
pub mod emulator;
#[cfg(feature = "layer")]
mod fs_atomic;
#[cfg(feature = "proxy")]
mod hardening;
#[cfg(feature = "proxy")]
mod hot_metrics;
#[cfg(feature = "layer")]
pub mod layer;
#[cfg(feature = "proxy")]
mod login;
pub mod metric_names;
#[cfg(feature = "layer")]
pub mod oidc;
#[cfg(feature = "proxy")]
mod per_core;
#[cfg(feature = "proxy")]
pub mod proxy;
#[cfg(feature = "layer")]
pub mod retry;
#[cfg(feature = "layer")]
mod secret;
#[cfg(feature = "proxy")]
mod sink;
#[cfg(feature = "proxy")]
mod sources;
#[cfg(feature = "redis")]
pub mod store;
#[cfg(feature = "layer")]
mod tls;
#[cfg(feature = "layer")]
pub mod token;

#[cfg(feature = "layer")]
pub use self::{
    cache::{
        CacheOptions, CallerExchange, CallerOptions, CallerTokens, Lookup, Reexchange, Rejection,
        TokenCache, TokenUnavailable,
    },
    layer::{
        BearerTokenError, BearerTokenLayer, BearerTokenService, ReplayBody, ReplayableBody,
        TokenProvider, unavailable_response,
    },
    oidc::{OidcClient, OidcError},
    secret::Secret,
    token::{RefreshTokenSource, Reuse, SsoCacheSource, Token, TokenError, TokenSource},
};

#[cfg(feature = "aws-iam")]
pub use self::token::{CallerGrant, IamCallerExchange, IamExchange, IamGrant, JwtBearerSource};

/// Not API: entry points for this crate's own binary, fuzz targets and
/// tests. Anything here may change or go in any release.
#[cfg(feature = "proxy")]
#[doc(hidden)]
pub mod __private {
    use std::{path::Path, process::ExitCode};

    /// The `sso-token-proxy` binary.
    pub fn main() -> ExitCode {
        crate::cli::main()
    }

    /// Parses `config.toml` text as the binary does (relative paths resolve
    /// against `path`'s directory): the parsed config's `Debug` text, or
    /// the error message.
    pub fn parse_config(text: &str, path: &Path) -> Result<String, String> {
        crate::config::Config::parse(text, path)
            .map(|config| format!("{config:?}"))
            .map_err(|e| e.to_string())
    }
}

/// The README's Rust examples, compiled as doc-tests.
#[cfg(all(doctest, feature = "layer"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
