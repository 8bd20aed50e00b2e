//! `source = "jwt_bearer"`: the pod's own token, from a JWT in a file (a
//! projected service-account token, say) exchanged with
//! `CreateTokenWithIAM`.
//!
//! The file is read again for every exchange, so a rotation by the kubelet
//! (which swaps the file atomically) is picked up at the next refresh; an
//! assertion is never cached past the exchange it was read for.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use sha2::{Digest as _, Sha256};

use super::{FetchFuture, IamExchange, IamGrant, Reuse, Token, TokenError, TokenSource};
use crate::{metric_names::ASSERTION_ROTATIONS_TOTAL, secret::read_secret_file};

struct Held {
    access: Option<Token>,
    /// SHA-256 of the last assertion exchanged, to notice a rotation.
    assertion_digest: Option<[u8; 32]>,
}

/// One token for the pod from an assertion file (`grantType` JWT bearer).
pub struct JwtBearerSource {
    exchange: IamExchange,
    assertion_file: PathBuf,
    held: tokio::sync::Mutex<Held>,
}

impl fmt::Debug for JwtBearerSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtBearerSource")
            .field("application_arn", &self.exchange.application_arn())
            .field("assertion_file", &self.assertion_file)
            .finish_non_exhaustive()
    }
}

impl JwtBearerSource {
    /// Exchanges the JWT in `assertion_file` through `exchange`.
    pub fn new(exchange: IamExchange, assertion_file: impl Into<PathBuf>) -> Self {
        Self {
            exchange,
            assertion_file: assertion_file.into(),
            held: tokio::sync::Mutex::new(Held {
                access: None,
                assertion_digest: None,
            }),
        }
    }

    /// The assertion file.
    pub fn assertion_file(&self) -> &Path {
        &self.assertion_file
    }

    async fn fetch_inner(&self, reuse: Reuse) -> Result<Token, TokenError> {
        // Held across the exchange: one exchange at a time.
        let mut held = self.held.lock().await;
        if let (Reuse::IfValidFor(min), Some(token)) = (reuse, &held.access)
            && token.ttl() >= min
        {
            return Ok(token.clone());
        }
        let (assertion, _) =
            read_secret_file(&self.assertion_file).map_err(|reason| TokenError::File {
                path: self.assertion_file.display().to_string(),
                reason,
            })?;
        let digest: [u8; 32] = Sha256::digest(assertion.expose().as_bytes()).into();
        if held.assertion_digest.is_some_and(|d| d != digest) {
            metrics::counter!(ASSERTION_ROTATIONS_TOTAL.name).increment(1);
            tracing::info!(path = %self.assertion_file.display(), "assertion file rotated");
        }
        held.assertion_digest = Some(digest);
        let token = self
            .exchange
            .exchange(IamGrant::jwt_bearer(assertion))
            .await?;
        held.access = Some(token.clone());
        Ok(token)
    }
}

impl TokenSource for JwtBearerSource {
    fn identity(&self) -> String {
        format!(
            "jwt_bearer:{}:{}",
            self.exchange.application_arn(),
            self.assertion_file.display()
        )
    }

    fn scopes(&self) -> &[String] {
        self.exchange.requested_scopes()
    }

    fn fetch(&self, reuse: Reuse) -> FetchFuture<'_> {
        Box::pin(self.fetch_inner(reuse))
    }
}
