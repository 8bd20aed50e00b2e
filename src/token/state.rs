//! The refresh-token source's state file: the newest (rotated) refresh token
//! and the access token that came with it, so a restart neither loses the
//! rotation nor spends a `CreateToken` call.

use std::{fmt, path::Path, time::SystemTime};

use serde::{Deserialize, Serialize};

use super::{
    TokenError,
    persist::{Rendered, TokenFileFormat, damaged_copy},
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

/// Recovers what a process that died mid-write left beside the state
/// file at `path`: the whole temp copy of a write that was not renamed yet
/// (`.NAME.tmp-PID-RANDOM`, see `fs_atomic`). SSO-OIDC has rotated the
/// refresh token by the time it is written, so such a copy may hold the
/// only live one. The newest complete copy replaces the file when it was
/// written later than the file, or when the file does not parse (its bytes
/// then kept as `NAME.damaged`, as the writer keeps them); the leftovers
/// of processes that are gone are removed, as they hold tokens. A copy of
/// a process still running (another one sharing the file, such as
/// `token`) may be a write in progress and is left alone. Returns whether
/// a copy was adopted.
pub(crate) fn recover_leftover_writes(path: &Path) -> bool {
    // With their contents, if whole.
    let leftovers: Vec<(std::path::PathBuf, Option<StateFile>)> = fs_atomic::leftover_temps(path)
        .into_iter()
        .map(|copy| {
            let whole = std::fs::read(&copy)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<StateFile>(&bytes).ok())
                .filter(|s| s.refresh_token.as_ref().is_some_and(|t| !t.is_empty()));
            (copy, whole)
        })
        .collect();
    let newest = leftovers
        .iter()
        .filter_map(|(p, s)| Some((p, s.as_ref()?.updated_at()?)))
        .max_by_key(|(_, at)| *at)
        .map(|(p, at)| (p.clone(), at));
    let current = StateFile::load(path);
    let mut adopted = None;
    if let Some((copy, at)) = newest {
        // A file that does not parse is replaced too, as the writer does,
        // and its bytes kept aside first; one that cannot be read is not.
        let (later, damaged) = match &current {
            Ok(Some(state)) => (state.updated_at().is_none_or(|t| at > t), None),
            Ok(None) => (true, None),
            Err(_) => match std::fs::read(path) {
                Ok(bytes) => (true, Some(bytes)),
                Err(_) => (false, None),
            },
        };
        if later {
            let adopt = (|| {
                if let Some(bytes) = &damaged {
                    fs_atomic::write_atomic(&damaged_copy(path), bytes)?;
                }
                std::fs::rename(&copy, path)?;
                fs_atomic::sync_dir(fs_atomic::dir_of(path))
            })();
            match adopt {
                Ok(()) => {
                    tracing::warn!(
                        path = %path.display(),
                        from = %copy.display(),
                        "a write of the state file was cut short (the process died); its whole copy, newer \
                         than the file, is now the state file"
                    );
                    adopted = Some(copy);
                }
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    from = %copy.display(),
                    error = %e,
                    "could not adopt a newer copy of the state file left by a write that was cut short"
                ),
            }
        }
    }
    for (leftover, _) in &leftovers {
        if Some(leftover) != adopted.as_ref() && std::fs::remove_file(leftover).is_ok() {
            tracing::info!(path = %leftover.display(), "removed a state file write left by a process that is gone");
        }
    }
    adopted.is_some()
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

    fn state_at(refresh: &str, updated_at: &str) -> Vec<u8> {
        serde_json::to_vec(&StateFile {
            refresh_token: Some(Secret::new(refresh)),
            updated_at: Some(updated_at.to_owned()),
            ..Default::default()
        })
        .unwrap()
    }

    /// A process killed between writing the state file's temp copy and
    /// renaming it: the copy, newer than the file, becomes the file; the
    /// leftovers of gone processes are removed; a running process's write
    /// is left alone.
    #[test]
    fn a_write_cut_short_is_recovered_from_its_whole_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, state_at("rt-old", "2026-01-01T00:00:00Z")).unwrap();
        let leftover =
            |pid: u32, n: u32| dir.path().join(format!(".state.json.tmp-{pid}-{n:016x}"));
        // Gone processes (no such pid): a whole newer copy, an older one,
        // a torn one.
        let gone = u32::MAX;
        std::fs::write(
            leftover(gone, 1),
            state_at("rt-new", "2026-01-02T00:00:00Z"),
        )
        .unwrap();
        std::fs::write(
            leftover(gone, 2),
            state_at("rt-older", "2025-12-31T00:00:00Z"),
        )
        .unwrap();
        std::fs::write(leftover(gone, 3), br#"{"refreshToken":"rt-to"#).unwrap();
        // A process that runs (pid 1 always does), newer still: a write in
        // progress, not a leftover.
        std::fs::write(leftover(1, 4), state_at("rt-busy", "2026-01-03T00:00:00Z")).unwrap();
        // Another file's leftover is not this file's.
        let other = dir
            .path()
            .join(format!(".other.json.tmp-{gone}-0000000000000005"));
        std::fs::write(&other, b"x").unwrap();

        let on_disk = || {
            let state = StateFile::load(&path).unwrap().unwrap();
            state.refresh_token.unwrap().expose().to_owned()
        };
        assert!(recover_leftover_writes(&path));
        assert_eq!(on_disk(), "rt-new");
        for n in 1..=3 {
            assert!(!leftover(gone, n).exists(), "leftover {n} removed");
        }
        assert!(leftover(1, 4).exists(), "a running process's write kept");
        assert!(other.exists());
        // Nothing left to recover.
        assert!(!recover_leftover_writes(&path));

        // A copy older than the file is only removed.
        std::fs::write(
            leftover(gone, 6),
            state_at("rt-stale", "2025-01-01T00:00:00Z"),
        )
        .unwrap();
        assert!(!recover_leftover_writes(&path));
        assert_eq!(on_disk(), "rt-new");
        assert!(!leftover(gone, 6).exists());

        // A damaged file gives way to a whole copy, as to the writer, and
        // its bytes are kept.
        std::fs::write(&path, b"{torn").unwrap();
        std::fs::write(
            leftover(gone, 7),
            state_at("rt-copy", "2024-01-01T00:00:00Z"),
        )
        .unwrap();
        assert!(recover_leftover_writes(&path));
        assert_eq!(on_disk(), "rt-copy");
        assert_eq!(std::fs::read(damaged_copy(&path)).unwrap(), b"{torn");
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
        let aside = damaged_copy(&path);
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
