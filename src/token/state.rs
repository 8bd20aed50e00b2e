//! The refresh-token source's state file: the newest (rotated) refresh token
//! and the access token that came with it, so a restart neither loses the
//! rotation nor spends a `CreateToken` call.

use std::{fmt, path::Path, time::SystemTime};

use serde::{Deserialize, Serialize};

use super::{
    TokenError,
    persist::{Rendered, TokenFileFormat},
    sso_cache::json_error_reason,
};
use crate::{fs_atomic, secret::Secret};

/// Contents of `token.state_file` (JSON, camelCase). Keys this version does
/// not know survive a rewrite.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateFile {
    /// The client the refresh token belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The client's secret, when a device login registered the client
    /// (a configured secret is never written here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<Secret>,
    /// When that registration expires, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_expires_at: Option<String>,
    /// The newest refresh token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<Secret>,
    /// The access token obtained with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<Secret>,
    /// Expiry of `access_token`, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// When this file was written, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
    /// Keys this version does not know.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl fmt::Debug for StateFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateFile")
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
            .field("registration_expires_at", &self.registration_expires_at)
            .field("refresh_token", &self.refresh_token)
            .field("access_token", &self.access_token)
            .field("expires_at", &self.expires_at)
            .field("updated_at", &self.updated_at)
            .field("extra_keys", &self.extra.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl StateFile {
    /// Reads the file; `Ok(None)` when it does not exist. A file that is
    /// empty, not JSON, or has no refresh token is an error naming the path
    /// (and is left alone).
    pub fn load(path: &Path) -> Result<Option<Self>, TokenError> {
        let file_error = |reason: String| TokenError::File {
            path: path.display().to_string(),
            reason,
        };
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(file_error(format!("cannot read state file: {e}"))),
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(file_error(
                "state file is empty (truncated?); fix or remove it".to_owned(),
            ));
        }
        let state: Self = serde_json::from_slice(&bytes)
            .map_err(|e| file_error(format!("state file is corrupt: {}", json_error_reason(&e))))?;
        if state.refresh_token.as_ref().is_none_or(Secret::is_empty) {
            return Err(file_error(
                "state file has no refreshToken; fix or remove it".to_owned(),
            ));
        }
        Ok(Some(state))
    }

    /// When the file says it was written.
    pub fn updated_at(&self) -> Option<SystemTime> {
        self.updated_at
            .as_deref()
            .and_then(|s| super::parse_expires_at(s).ok())
    }

    /// Writes the file atomically (mode 0600).
    pub fn store(&self, path: &Path) -> Result<(), TokenError> {
        let bytes = serde_json::to_vec_pretty(self).expect("state serialises");
        fs_atomic::write_atomic(path, &bytes).map_err(|e| TokenError::File {
            path: path.display().to_string(),
            reason: format!("cannot write state file: {e}"),
        })
    }
}

/// The state file as a [`TokenFileFormat`]: the newest tokens replace the
/// file's, keys a newer version wrote there are kept.
pub(crate) struct StateFileFormat;

impl TokenFileFormat for StateFileFormat {
    type Contents = StateFile;
    const WHAT: &'static str = "state file";

    fn render(&self, current: Option<&[u8]>, newest: &StateFile) -> Result<Rendered, String> {
        // A file that does not parse is this process's own, damaged (by
        // hand, or by another program): the newest tokens must still reach
        // the disk, so they replace it, and its bytes are kept aside.
        let (extra, damaged) = match current.map(serde_json::from_slice::<StateFile>) {
            None => (Default::default(), None),
            Some(Ok(state)) => (state.extra, None),
            Some(Err(e)) => (Default::default(), Some(json_error_reason(&e))),
        };
        let merged = StateFile {
            extra,
            ..newest.clone()
        };
        let bytes = serde_json::to_vec_pretty(&merged)
            .map_err(|e| format!("cannot serialise the state file: {}", json_error_reason(&e)))?;
        Ok(match damaged {
            None => Rendered::Write(bytes),
            Some(why) => Rendered::ReplaceDamaged { bytes, why },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_keeps_unknown_keys_and_replaces_tokens() {
        let current = br#"{"refreshToken":"old","futureKey":{"kept":true}}"#;
        let newest = StateFile {
            client_id: Some("c".into()),
            refresh_token: Some(Secret::new("new")),
            ..Default::default()
        };
        let Rendered::Write(bytes) = StateFileFormat.render(Some(current), &newest).unwrap() else {
            panic!("a state file is always written");
        };
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["refreshToken"], "new");
        assert_eq!(v["clientId"], "c");
        assert_eq!(v["futureKey"]["kept"], true);
        let Rendered::ReplaceDamaged { bytes, why } =
            StateFileFormat.render(Some(b"{torn"), &newest).unwrap()
        else {
            panic!("a damaged state file is replaced, its bytes kept");
        };
        assert!(serde_json::from_slice::<StateFile>(&bytes).is_ok());
        assert!(why.contains("line 1"), "{why}");
    }

    /// A state file damaged while the proxy runs: the newest tokens still
    /// reach the disk, the damaged bytes are kept beside it, and no secret
    /// is quoted in what is said about it.
    #[tokio::test]
    async fn a_damaged_file_is_kept_aside_and_replaced_by_the_newest_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let damaged = br#"{"refreshToken":"aor-canary-half-writ"#;
        std::fs::write(&path, damaged).unwrap();
        let writer = crate::token::persist::TokenFileWriter::new(&path, StateFileFormat);
        let newest = StateFile {
            refresh_token: Some(Secret::new("new")),
            ..Default::default()
        };
        assert!(writer.persist(newest).await);
        let on_disk = StateFile::load(&path).unwrap().unwrap();
        assert_eq!(on_disk.refresh_token.unwrap().expose(), "new");
        let aside = crate::token::persist::damaged_copy(&path);
        assert_eq!(aside, dir.path().join("state.json.damaged"));
        assert_eq!(std::fs::read(&aside).unwrap(), damaged);
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&aside).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let status = writer.status();
        assert!(status.persisted, "{status:?}");
    }
}
