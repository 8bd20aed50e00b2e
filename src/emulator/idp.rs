//! The emulator's test token issuer: an ES256 key generated at start, JWTs
//! minted for any subject, a JWKS and OIDC discovery document, and the
//! validation `CreateTokenWithIAM` applies to a JWT bearer assertion
//! (signature, `iss`, `aud`, `exp`, `nbf`, `sub`).

use std::time::Duration;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, decode_header, encode,
    errors::ErrorKind,
};
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _},
};
use serde::{Deserialize, Serialize};

use super::state::{epoch_secs, random_token};

/// Path of the issuer under the emulator's base URL.
pub(crate) const ISSUER_PATH: &str = "/_emulator/idp";
/// Path of its JWKS.
pub(crate) const JWKS_PATH: &str = "/_emulator/idp/jwks.json";
/// Path of its OIDC discovery document.
pub(crate) const DISCOVERY_PATH: &str = "/_emulator/idp/.well-known/openid-configuration";

/// Claims of a minted assertion.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct AssertionClaims {
    pub(crate) iss: String,
    pub(crate) sub: String,
    pub(crate) aud: String,
    pub(crate) iat: i64,
    pub(crate) nbf: i64,
    pub(crate) exp: i64,
    pub(crate) jti: String,
}

/// Why an assertion was refused; the text goes into an `InvalidGrant`
/// description and never repeats the assertion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AssertionRejected(pub(crate) &'static str);

/// An ES256 signing key and its public half.
pub(crate) struct TestIssuer {
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    x: String,
    y: String,
}

impl TestIssuer {
    /// A new issuer with a fresh P-256 key.
    pub(crate) fn generate() -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("P-256 key generation does not fail");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("a freshly generated key parses");
        // Uncompressed point: 0x04 || X (32 bytes) || Y (32 bytes).
        let point = pair.public_key().as_ref();
        let x = URL_SAFE_NO_PAD.encode(&point[1..33]);
        let y = URL_SAFE_NO_PAD.encode(&point[33..65]);
        let decoding =
            DecodingKey::from_ec_components(&x, &y).expect("coordinates of a valid key decode");
        Self {
            kid: random_token("emulator-", 8),
            encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
            decoding,
            x,
            y,
        }
    }

    /// Signs an assertion for `sub`, valid for `lifetime` from now (or, with
    /// `expired`, that expired `lifetime` ago).
    pub(crate) fn mint(
        &self,
        issuer: &str,
        sub: &str,
        aud: &str,
        lifetime: Duration,
        expired: bool,
    ) -> String {
        let now = epoch_secs();
        let secs = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX / 2);
        let (iat, exp) = if expired {
            (now - 2 * secs, now - secs)
        } else {
            (now, now + secs)
        };
        let claims = AssertionClaims {
            iss: issuer.to_owned(),
            sub: sub.to_owned(),
            aud: aud.to_owned(),
            iat,
            nbf: iat,
            exp,
            jti: random_token("", 16),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        encode(&header, &claims, &self.encoding).expect("ES256 signing with a valid key")
    }

    /// The JWKS with the one public key.
    pub(crate) fn jwks(&self) -> serde_json::Value {
        serde_json::json!({"keys": [{
            "kty": "EC",
            "crv": "P-256",
            "alg": "ES256",
            "use": "sig",
            "kid": self.kid,
            "x": self.x,
            "y": self.y,
        }]})
    }

    /// Validates an assertion as a trusted token issuer's JWT: ES256 by this
    /// key, issued by `issuer` for one of `audiences`, inside its validity
    /// window, with a subject. Returns the claims.
    pub(crate) fn validate(
        &self,
        assertion: &str,
        issuer: &str,
        audiences: &[String],
    ) -> Result<AssertionClaims, AssertionRejected> {
        let header =
            decode_header(assertion).map_err(|_| AssertionRejected("Assertion is not a JWT"))?;
        if header.kid.as_deref().is_some_and(|kid| kid != self.kid) {
            return Err(AssertionRejected(
                "Assertion is signed with a key the trusted token issuer does not publish",
            ));
        }
        let mut validation = Validation::new(Algorithm::ES256);
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.set_issuer(&[issuer]);
        validation.set_audience(audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data =
            decode::<AssertionClaims>(assertion, &self.decoding, &validation).map_err(|e| {
                AssertionRejected(match e.kind() {
                    ErrorKind::ExpiredSignature => "Assertion has expired",
                    ErrorKind::ImmatureSignature => "Assertion is not valid yet",
                    ErrorKind::InvalidIssuer => "Assertion issuer is not a trusted token issuer",
                    ErrorKind::InvalidAudience => {
                        "Assertion audience is not one the application accepts"
                    }
                    ErrorKind::InvalidSignature => "Assertion signature is invalid",
                    ErrorKind::InvalidAlgorithm => "Assertion algorithm is not accepted",
                    ErrorKind::MissingRequiredClaim(_) => "Assertion lacks a required claim",
                    _ => "Assertion could not be validated",
                })
            })?;
        if data.claims.sub.trim().is_empty() {
            return Err(AssertionRejected("Assertion has an empty subject"));
        }
        Ok(data.claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISS: &str = "http://127.0.0.1:1/_emulator/idp";

    fn audiences() -> Vec<String> {
        vec!["app".to_owned()]
    }

    #[test]
    fn minted_assertions_validate_and_carry_the_subject() {
        let idp = TestIssuer::generate();
        let jwt = idp.mint(ISS, "alice", "app", Duration::from_secs(60), false);
        let claims = idp.validate(&jwt, ISS, &audiences()).unwrap();
        assert_eq!(claims.sub, "alice");
        assert_eq!(idp.jwks()["keys"][0]["kid"], idp.kid);
    }

    #[test]
    fn each_check_refuses_what_it_should() {
        let idp = TestIssuer::generate();
        let reason = |jwt: &str| idp.validate(jwt, ISS, &audiences()).unwrap_err().0;
        assert_eq!(
            reason(&idp.mint(ISS, "a", "app", Duration::from_secs(60), true)),
            "Assertion has expired"
        );
        assert_eq!(
            reason(&idp.mint("http://other", "a", "app", Duration::from_secs(60), false)),
            "Assertion issuer is not a trusted token issuer"
        );
        assert_eq!(
            reason(&idp.mint(ISS, "a", "other-app", Duration::from_secs(60), false)),
            "Assertion audience is not one the application accepts"
        );
        assert_eq!(
            reason(&idp.mint(ISS, " ", "app", Duration::from_secs(60), false)),
            "Assertion has an empty subject"
        );
        assert_eq!(reason("not-a-jwt"), "Assertion is not a JWT");

        // Another issuer's key (same kid forged): the signature fails.
        let mut other = TestIssuer::generate();
        other.kid = idp.kid.clone();
        assert_eq!(
            reason(&other.mint(ISS, "a", "app", Duration::from_secs(60), false)),
            "Assertion signature is invalid"
        );
        // A changed payload: the signature fails.
        let jwt = idp.mint(ISS, "alice", "app", Duration::from_secs(60), false);
        let mut parts: Vec<String> = jwt.split('.').map(str::to_owned).collect();
        let mut claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
        claims["sub"] = "mallory".into();
        parts[1] = URL_SAFE_NO_PAD.encode(claims.to_string());
        assert_eq!(reason(&parts.join(".")), "Assertion signature is invalid");
    }
}
