//! One way to keep the newest refresh token on disk, with one failure
//! policy, for every source (the refresh-token source's state file, the
//! shared store's local copy of it, the SSO cache file).
//!
//! The newest refresh token always lives in memory first: a source uses it
//! for its next refresh whatever the disk says. [`TokenFileWriter::persist`]
//! then writes it atomically (with the access token that came with it)
//! before the access token is handed out. When that write fails:
//!
//! * the token stays in memory and keeps being used;
//! * the write is retried in the background, after 250 ms, then every
//!   500 ms, then every second, until it lands; a newer token supersedes a
//!   pending one (only the newest is ever written);
//! * each failed attempt is a warning in the log and counts in
//!   `sso_token_proxy_persist_failures_total`, and [`PersistStatus`] says
//!   why the newest token is not on disk (`/readyz` shows it, the
//!   `sso_token_proxy_refresh_token_persisted` gauge is 0).
//!
//! What is guaranteed: the file on disk is always whole (old or new, never
//! torn), and once the disk takes writes again the newest refresh token is
//! on it within about a second. What is not: a process killed while a write
//! is pending loses that token, and with rotation the session with it.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use crate::{
    fs_atomic, metric_names,
    retry::{Backoff, Jitter},
};

/// The pauses between retries of a failed write.
const RETRY_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(250),
    factor: 2.0,
    cap: Duration::from_secs(1),
    jitter: Jitter::None,
};

/// What a file format makes of the newest tokens.
pub(crate) enum Rendered {
    /// Write these bytes.
    Write(Vec<u8>),
    /// The file already holds newer tokens another process wrote: leave it.
    Superseded,
    /// The file on disk does not parse (`why`): its bytes are kept beside
    /// it ([`damaged_copy`]), then these are written.
    ReplaceDamaged { bytes: Vec<u8>, why: String },
}

/// Where the bytes of a file that did not parse are kept: `NAME.damaged`
/// beside it (mode 0600, as they may hold tokens), the last one only.
pub(crate) fn damaged_copy(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".damaged");
    path.with_file_name(name)
}

/// How the newest tokens go into one kind of file.
pub(crate) trait TokenFileFormat: Send + Sync + 'static {
    /// What is written: the newest tokens and whatever goes with them.
    type Contents: Send + Sync + 'static;

    /// What the file is, for messages (`state file`, `SSO cache file`).
    const WHAT: &'static str;

    /// The file's new contents: `current` (what is on disk; `None` when
    /// there is no file) with `newest` written in, keeping keys this version
    /// does not know. `Err` when the current file must not be overwritten.
    fn render(&self, current: Option<&[u8]>, newest: &Self::Contents) -> Result<Rendered, String>;
}

/// Whether the newest refresh token is on disk, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistStatus {
    /// The file it goes to.
    pub path: PathBuf,
    /// Whether the newest refresh token is on disk (or nothing was ever to
    /// be written).
    pub persisted: bool,
    /// Why the last write failed, while the newest token is not on disk.
    pub reason: Option<String>,
    /// Failed writes since the newest token was last on disk.
    pub failed_attempts: u32,
}

/// Writes of one file: the newest contents, and how far they got.
#[derive(Default)]
struct Progress<C> {
    /// The newest contents and their generation.
    newest: Option<(u64, Arc<C>)>,
    /// The newest generation on disk (or found superseded).
    settled: u64,
    /// The generation the next `persist` gets.
    next_generation: u64,
    /// Why the last write failed, while the newest is not settled.
    reason: Option<String>,
    /// Failed writes since the last one that landed.
    failed_attempts: u32,
    /// A retry task is running.
    retrying: bool,
}

impl<C> Progress<C> {
    fn pending(&self) -> bool {
        self.newest.as_ref().is_some_and(|(g, _)| *g > self.settled)
    }
}

struct WriterInner<F: TokenFileFormat> {
    path: PathBuf,
    format: F,
    progress: Mutex<Progress<F::Contents>>,
    /// One write at a time, so an older write never lands after a newer.
    writing: tokio::sync::Mutex<()>,
}

/// Keeps the newest tokens of one source on disk; see the module docs.
/// Cheap to clone; clones share everything.
pub(crate) struct TokenFileWriter<F: TokenFileFormat> {
    inner: Arc<WriterInner<F>>,
}

impl<F: TokenFileFormat> Clone for TokenFileWriter<F> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<F: TokenFileFormat> fmt::Debug for TokenFileWriter<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenFileWriter")
            .field("path", &self.inner.path)
            .field("status", &self.status())
            .finish()
    }
}

impl<F: TokenFileFormat> TokenFileWriter<F> {
    pub(crate) fn new(path: impl Into<PathBuf>, format: F) -> Self {
        Self {
            inner: Arc::new(WriterInner {
                path: path.into(),
                format,
                progress: Mutex::new(Progress {
                    newest: None,
                    settled: 0,
                    next_generation: 1,
                    reason: None,
                    failed_attempts: 0,
                    retrying: false,
                }),
                writing: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The file.
    pub(crate) fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Makes `newest` the contents to keep on disk and writes it now. When
    /// that fails, it is retried in the background until it lands (or a
    /// newer `persist` supersedes it). Returns whether it is on disk.
    pub(crate) async fn persist(&self, newest: F::Contents) -> bool {
        {
            let mut p = self.inner.progress.lock().expect("progress lock");
            let generation = p.next_generation;
            p.next_generation += 1;
            p.newest = Some((generation, Arc::new(newest)));
        }
        let landed = self.write_newest().await;
        if !landed {
            self.ensure_retrying();
        }
        landed
    }

    /// Drops a pending write: the file holds newer tokens another process
    /// wrote, which win.
    pub(crate) fn abandon_pending(&self) {
        let mut p = self.inner.progress.lock().expect("progress lock");
        if let Some((generation, _)) = &p.newest {
            p.settled = p.settled.max(*generation);
        }
        p.reason = None;
        p.failed_attempts = 0;
    }

    /// Whether the newest contents are on disk, and if not, why.
    pub(crate) fn status(&self) -> PersistStatus {
        let p = self.inner.progress.lock().expect("progress lock");
        let pending = p.pending();
        PersistStatus {
            path: self.inner.path.clone(),
            persisted: !pending,
            reason: if pending { p.reason.clone() } else { None },
            failed_attempts: if pending { p.failed_attempts } else { 0 },
        }
    }

    /// Writes the newest contents if they are not on disk yet. Returns
    /// whether they are.
    async fn write_newest(&self) -> bool {
        let _one_at_a_time = self.inner.writing.lock().await;
        let (generation, contents) = {
            let p = self.inner.progress.lock().expect("progress lock");
            match &p.newest {
                Some((g, c)) if *g > p.settled => (*g, Arc::clone(c)),
                _ => return true,
            }
        };
        let inner = Arc::clone(&self.inner);
        let result = tokio::task::spawn_blocking(move || inner.write_once(&contents))
            .await
            .unwrap_or_else(|e| Err(format!("writer task failed: {e}")));
        let path = self.inner.path.display();
        let mut p = self.inner.progress.lock().expect("progress lock");
        match result {
            Ok(rendered) => {
                let recovered = p.failed_attempts > 0;
                p.settled = p.settled.max(generation);
                if !p.pending() {
                    p.reason = None;
                    p.failed_attempts = 0;
                }
                match rendered {
                    Rendered::Write(_) if recovered => tracing::info!(
                        path = %path,
                        "the newest refresh token is on disk again"
                    ),
                    Rendered::Write(_) => {}
                    Rendered::ReplaceDamaged { why, .. } => tracing::warn!(
                        path = %path,
                        kept_as = %damaged_copy(&self.inner.path).display(),
                        problem = %why,
                        "the {} on disk did not parse; its contents were kept aside and the newest \
                         tokens written in its place",
                        F::WHAT
                    ),
                    Rendered::Superseded => tracing::info!(
                        path = %path,
                        "the {} holds newer tokens another process wrote; not overwriting them",
                        F::WHAT
                    ),
                }
                !p.pending()
            }
            Err(reason) => {
                p.failed_attempts += 1;
                metrics::counter!(metric_names::PERSIST_FAILURES_TOTAL.name).increment(1);
                tracing::warn!(
                    path = %path,
                    attempt = p.failed_attempts,
                    error = %reason,
                    "could not write the newest refresh token to the {}; it is kept in memory and used, \
                     and the write is retried",
                    F::WHAT
                );
                p.reason = Some(reason);
                false
            }
        }
    }

    fn ensure_retrying(&self) {
        let mut p = self.inner.progress.lock().expect("progress lock");
        if p.retrying || !p.pending() {
            return;
        }
        p.retrying = true;
        tokio::spawn(retry_until_written(Arc::downgrade(&self.inner)));
    }
}

impl<F: TokenFileFormat> WriterInner<F> {
    /// Reads the file, renders the new contents and replaces it atomically.
    fn write_once(&self, newest: &F::Contents) -> Result<Rendered, String> {
        let current = match std::fs::read(&self.path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("cannot read {}: {e}", self.path.display())),
        };
        let rendered = self.format.render(current.as_deref(), newest)?;
        let bytes = match &rendered {
            Rendered::Write(bytes) => bytes,
            Rendered::ReplaceDamaged { bytes, .. } => {
                // Never replaced without a copy: the newest tokens go to disk
                // only once what was there can still be looked at.
                let aside = damaged_copy(&self.path);
                fs_atomic::write_atomic(&aside, current.as_deref().unwrap_or_default()).map_err(
                    |e| format!("cannot keep the damaged file as {}: {e}", aside.display()),
                )?;
                bytes
            }
            Rendered::Superseded => return Ok(rendered),
        };
        fs_atomic::write_atomic(&self.path, bytes)
            .map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
        Ok(rendered)
    }
}

/// Retries the newest write with backoff until it lands; ends with the
/// writer.
async fn retry_until_written<F: TokenFileFormat>(inner: Weak<WriterInner<F>>) {
    let mut retry = 0;
    loop {
        tokio::time::sleep(RETRY_BACKOFF.delay(retry)).await;
        retry = retry.saturating_add(1);
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let writer = TokenFileWriter { inner };
        writer.write_newest().await;
        let mut p = writer.inner.progress.lock().expect("progress lock");
        if !p.pending() {
            p.retrying = false;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes the string as it is; `superseded_by` marks file contents that
    /// are "newer" than anything written.
    struct Plain {
        superseded_by: Option<&'static str>,
    }

    impl TokenFileFormat for Plain {
        type Contents = String;
        const WHAT: &'static str = "test file";

        fn render(&self, current: Option<&[u8]>, newest: &String) -> Result<Rendered, String> {
            if let (Some(current), Some(newer)) = (current, self.superseded_by)
                && current == newer.as_bytes()
            {
                return Ok(Rendered::Superseded);
            }
            Ok(Rendered::Write(newest.clone().into_bytes()))
        }
    }

    fn writer(path: &Path) -> TokenFileWriter<Plain> {
        TokenFileWriter::new(
            path,
            Plain {
                superseded_by: None,
            },
        )
    }

    #[tokio::test]
    async fn writes_at_once_when_the_disk_takes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let w = writer(&path);
        assert!(w.status().persisted, "nothing to write yet");
        assert!(w.persist("one".to_owned()).await);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one");
        assert!(w.persist("two".to_owned()).await);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        let status = w.status();
        assert!(status.persisted && status.reason.is_none());
    }

    /// Polls `check` every 20 ms for at most `limit` (the writer's retries
    /// run on real time and the blocking pool).
    async fn eventually(limit: Duration, what: &str, check: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        while !check() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_is_retried_until_it_lands_and_the_newest_wins() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        std::fs::create_dir(&state_dir).unwrap();
        let path = state_dir.join("state.json");
        let w = writer(&path);
        assert!(w.persist("one".to_owned()).await);

        // The directory goes away: the write fails, is reported, retried.
        let away = dir.path().join("away");
        std::fs::rename(&state_dir, &away).unwrap();
        assert!(!w.persist("two".to_owned()).await);
        let status = w.status();
        assert!(!status.persisted);
        assert!(
            status.reason.as_deref().unwrap().contains("cannot write"),
            "{status:?}"
        );
        assert_eq!(status.failed_attempts, 1);
        eventually(Duration::from_secs(10), "three retries", || {
            w.status().failed_attempts >= 4
        })
        .await;
        // A newer token supersedes the pending one.
        assert!(!w.persist("three".to_owned()).await);

        // The directory returns: the newest lands within about a second.
        std::fs::rename(&away, &state_dir).unwrap();
        eventually(Duration::from_secs(2), "the newest on disk", || {
            w.status().persisted
        })
        .await;
        assert_eq!(w.status().reason, None);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three");
        eventually(Duration::from_secs(2), "the retry task ends", || {
            !w.inner.progress.lock().unwrap().retrying
        })
        .await;
    }

    #[tokio::test]
    async fn a_file_holding_newer_tokens_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.json");
        std::fs::write(&path, "newer, from another process").unwrap();
        let w = TokenFileWriter::new(
            &path,
            Plain {
                superseded_by: Some("newer, from another process"),
            },
        );
        assert!(w.persist("ours".to_owned()).await);
        assert!(w.status().persisted);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "newer, from another process"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn abandoning_a_pending_write_stops_the_retries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("state.json");
        let w = writer(&path);
        assert!(!w.persist("one".to_owned()).await);
        w.abandon_pending();
        assert!(w.status().persisted);
        eventually(Duration::from_secs(2), "the retry task ends", || {
            !w.inner.progress.lock().unwrap().retrying
        })
        .await;
        assert_eq!(w.status().failed_attempts, 0);
        assert!(!path.exists());
    }
}
