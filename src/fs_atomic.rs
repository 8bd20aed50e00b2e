//! Crash-safe file replacement: write a temp file in the same directory,
//! fsync it, rename it over the target, fsync the directory. A reader (or a
//! process restarted after SIGKILL) sees the old file or the new one, never
//! a torn one.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

/// Atomically replaces `path` with `contents`, mode 0600.
pub(crate) fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, contents, 0o600)
}

/// Atomically replaces `path` with `contents`, with exactly `mode` (the
/// umask does not narrow it).
pub(crate) fn write_atomic_mode(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = dir_of(path);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        "{}{}-{:016x}",
        temp_prefix(&name.to_string_lossy()),
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(contents)?;
        // Created private, then given exactly `mode`: the umask can only
        // narrow a mode, and nobody else reads the file before it is whole.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The directory `path` is in (`.` for a bare name).
pub(crate) fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// How the temp copies of a file named `name` begin; the writer's pid and
/// a random number follow.
fn temp_prefix(name: &str) -> String {
    format!(".{name}.tmp-")
}

/// The temp copies of `path` that [`write_atomic`] left behind in
/// processes that are gone (killed between writing a copy and renaming
/// it). A copy of a running process may be a write in progress and is not
/// listed; this process has none yet when it asks at start, and in a
/// container it may have the pid of the one that died. A process is told
/// running by `/proc/PID` (Linux; elsewhere every writer counts as gone).
pub(crate) fn leftover_temps(path: &Path) -> Vec<PathBuf> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    let prefix = temp_prefix(name);
    let Ok(entries) = fs::read_dir(dir_of(path)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| {
            let file_name = entry.file_name();
            let pid = file_name
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok());
            pid.is_some_and(|pid| {
                pid == std::process::id() || !Path::new(&format!("/proc/{pid}")).exists()
            })
        })
        .map(|entry| entry.path())
        .collect()
}

/// Makes the entries of `dir` (a rename into it) durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Narrows a file of this process's own that others may read (mode 0644
/// from a restore or a hand edit, say) to 0600, with a warning; until its
/// next write the tokens in it would stay readable otherwise.
pub(crate) fn keep_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 == 0 {
        return;
    }
    match fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o700)) {
        Ok(()) => tracing::warn!(
            path = %path.display(),
            mode = format!("{mode:o}"),
            "the file was open to other users; narrowed to the owner"
        ),
        Err(e) => tracing::warn!(
            path = %path.display(),
            mode = format!("{mode:o}"),
            error = %e,
            "the file is open to other users and could not be narrowed"
        ),
    }
}

/// Creates `dir` and any missing parents with mode 0700 (narrowed further
/// by the umask); directories that exist are left as they are.
#[cfg_attr(not(feature = "proxy"), allow(dead_code))]
pub(crate) fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Expands a leading `~/` to `$HOME/`.
// Only the binary reads paths from config files.
#[cfg_attr(not(feature = "proxy"), allow(dead_code))]
pub(crate) fn expand_tilde(path: &str) -> std::path::PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest),
        _ if path == "~" => std::env::var_os("HOME")
            .map(Into::into)
            .unwrap_or_else(|| path.into()),
        _ => path.into(),
    }
}

/// Checks that this process can create files in `dir` (what
/// [`write_atomic`] needs) by creating and removing a temp file there.
#[cfg_attr(not(feature = "proxy"), allow(dead_code))]
pub(crate) fn check_dir_writable(dir: &Path) -> io::Result<()> {
    let probe = dir.join(format!(
        ".sso-token-proxy-write-check-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe)?;
    fs::remove_file(&probe)
}

/// The directory a file named by `path` lives in (`.` for a bare name).
#[cfg_attr(not(feature = "proxy"), allow(dead_code))]
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_dirs_are_created_0700_and_existing_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let nested = dir.path().join("state/sso-token-proxy");
        create_private_dir_all(&nested).unwrap();
        for d in [dir.path().join("state"), nested.clone()] {
            assert_eq!(
                fs::metadata(&d).unwrap().permissions().mode() & 0o777,
                0o700
            );
        }
        assert_eq!(
            fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777,
            0o755,
            "an existing directory keeps its mode"
        );
        create_private_dir_all(&nested).unwrap();
    }

    #[test]
    fn replaces_file_with_mode_0600_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic(&path, b"new contents").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new contents");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn a_given_mode_is_exact_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        write_atomic_mode(&path, b"t", 0o640).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        write_atomic_mode(&path, b"u", 0o444).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o444
        );
        assert_eq!(fs::read(&path).unwrap(), b"u");
    }

    #[test]
    fn failure_leaves_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let missing_dir = dir.path().join("nope").join("state.json");
        assert!(write_atomic(&missing_dir, b"x").is_err());
    }

    #[test]
    fn tilde_expands_to_home() {
        let home = std::env::var("HOME").unwrap();
        assert_eq!(expand_tilde("~/a/b"), Path::new(&home).join("a/b"));
        assert_eq!(expand_tilde("/x/y"), Path::new("/x/y"));
    }

    #[test]
    fn writable_dirs_pass_and_the_probe_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        check_dir_writable(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        // A "directory" that is a regular file, and one that does not exist.
        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(check_dir_writable(&file).is_err());
        assert!(check_dir_writable(&dir.path().join("missing")).is_err());
        assert_eq!(parent_dir(Path::new("state.json")), Path::new("."));
        assert_eq!(parent_dir(Path::new("/a/b.json")), Path::new("/a"));
    }
}
