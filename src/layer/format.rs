//! [`TokenFormat`]: how a token is written into its header's value.

use std::fmt;

use bytes::{BufMut as _, Bytes, BytesMut};
use http::HeaderValue;

use crate::token::Token;

/// The placeholder a format names the token with.
const PLACEHOLDER: &str = "{token}";

/// How the token is written into its header's value: text before and after
/// it, e.g. `Bearer {token}` (the default) or `{token}` alone.
///
/// ```
/// use sso_token_proxy::layer::TokenFormat;
///
/// assert_eq!(TokenFormat::parse("Bearer {token}")?, TokenFormat::bearer());
/// let bare = TokenFormat::parse("{token}")?;
/// assert_eq!(bare.to_string(), "{token}");
/// assert!(TokenFormat::parse("Bearer").is_err());
/// assert!(TokenFormat::parse("{token} and {token}").is_err());
/// # Ok::<(), sso_token_proxy::layer::TokenFormatError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct TokenFormat {
    prefix: Bytes,
    suffix: Bytes,
}

/// Why a text is not a [`TokenFormat`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenFormatError {
    /// The text does not contain `{token}`.
    #[error("must contain {{token}} where the token goes, e.g. \"Bearer {{token}}\"")]
    NoPlaceholder,
    /// The text contains `{token}` more than once.
    #[error("must contain {{token}} exactly once")]
    SeveralPlaceholders,
    /// The text around `{token}` cannot be part of a header value.
    #[error("{0}")]
    NotAHeaderValue(&'static str),
}

impl TokenFormat {
    /// `Bearer {token}`.
    pub fn bearer() -> Self {
        Self {
            prefix: Bytes::from_static(b"Bearer "),
            suffix: Bytes::new(),
        }
    }

    /// A format from text holding `{token}` exactly once. The rest must be
    /// visible ASCII or spaces, and neither begin nor end with a space (a
    /// header value's outer whitespace is not part of it).
    pub fn parse(text: &str) -> Result<Self, TokenFormatError> {
        let (prefix, suffix) = text
            .split_once(PLACEHOLDER)
            .ok_or(TokenFormatError::NoPlaceholder)?;
        if suffix.contains(PLACEHOLDER) {
            return Err(TokenFormatError::SeveralPlaceholders);
        }
        let visible = |s: &str| s.bytes().all(|b| b == b' ' || b.is_ascii_graphic());
        if !visible(prefix) || !visible(suffix) {
            return Err(TokenFormatError::NotAHeaderValue(
                "may hold only visible ASCII characters and spaces",
            ));
        }
        if prefix.starts_with(' ') || suffix.ends_with(' ') {
            return Err(TokenFormatError::NotAHeaderValue(
                "must not begin or end with a space (a header value's outer spaces are dropped)",
            ));
        }
        Ok(Self {
            prefix: Bytes::copy_from_slice(prefix.as_bytes()),
            suffix: Bytes::copy_from_slice(suffix.as_bytes()),
        })
    }

    /// `<prefix>{token}`: what [`BearerTokenLayer::prefix`] sets.
    ///
    /// [`BearerTokenLayer::prefix`]: super::BearerTokenLayer::prefix
    pub fn with_prefix(prefix: &HeaderValue) -> Self {
        Self {
            prefix: Bytes::copy_from_slice(prefix.as_bytes()),
            suffix: Bytes::new(),
        }
    }

    /// Whether this is `Bearer {token}`, the value every [`Token`] carries
    /// ready-made.
    pub(crate) fn is_bearer(&self) -> bool {
        self.suffix.is_empty() && self.prefix == "Bearer "
    }

    /// The header value for `token`, marked sensitive.
    pub(crate) fn value(&self, token: &Token) -> HeaderValue {
        let access = token.access_token().expose().as_bytes();
        let mut bytes =
            BytesMut::with_capacity(self.prefix.len() + access.len() + self.suffix.len());
        bytes.put_slice(&self.prefix);
        bytes.put_slice(access);
        bytes.put_slice(&self.suffix);
        // The parts are valid header value bytes (the token is checked when
        // it arrives; the prefix comes from a `HeaderValue` or `parse`), so
        // the whole is too.
        let mut value = HeaderValue::from_maybe_shared(bytes.freeze())
            .unwrap_or_else(|_| token.header_value().clone());
        value.set_sensitive(true);
        value
    }
}

impl Default for TokenFormat {
    fn default() -> Self {
        Self::bearer()
    }
}

impl fmt::Display for TokenFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
        write!(
            f,
            "{}{PLACEHOLDER}{}",
            text(&self.prefix),
            text(&self.suffix)
        )
    }
}

impl fmt::Debug for TokenFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenFormat({self})")
    }
}

impl std::str::FromStr for TokenFormat {
    type Err = TokenFormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::secret::Secret;

    #[test]
    fn the_token_goes_where_the_placeholder_is() {
        let token = Token::new(Secret::new("t0k"), Duration::from_secs(60));
        for (format, want) in [
            ("Bearer {token}", "Bearer t0k"),
            ("{token}", "t0k"),
            ("Token token={token}", "Token token=t0k"),
            ("{token};v=1", "t0k;v=1"),
            ("x {token} y", "x t0k y"),
        ] {
            let value = TokenFormat::parse(format).unwrap().value(&token);
            assert_eq!(value, want, "{format}");
            assert!(value.is_sensitive());
        }
        assert!(TokenFormat::parse("Bearer {token}").unwrap().is_bearer());
        assert!(!TokenFormat::parse("bearer {token}").unwrap().is_bearer());
    }

    #[test]
    fn formats_that_cannot_make_a_header_value_are_refused() {
        use TokenFormatError::*;
        assert_eq!(TokenFormat::parse(""), Err(NoPlaceholder));
        assert_eq!(TokenFormat::parse("Bearer {tok}"), Err(NoPlaceholder));
        assert_eq!(
            TokenFormat::parse("{token}{token}"),
            Err(SeveralPlaceholders)
        );
        for bad in [
            " {token}",
            "{token} ",
            "a\r\n{token}",
            "{token}\0",
            "é {token}",
            "\t{token}",
        ] {
            assert!(
                matches!(TokenFormat::parse(bad), Err(NotAHeaderValue(_))),
                "{bad:?}"
            );
        }
    }
}
