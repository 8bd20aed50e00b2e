//! Keeping the process's memory to itself: the binary holds refresh
//! tokens, client secrets and access tokens in memory, so at start it
//!
//! - sets its core-file size limit to zero (soft and hard), so a crash
//!   never writes that memory to disk, whatever `ulimit -c` or the
//!   container runtime allowed;
//! - on Linux, marks itself not dumpable (`PR_SET_DUMPABLE` 0, as
//!   ssh-agent and gpg-agent do): no core dump either, and processes of the
//!   same user can no longer attach to it or read `/proc/PID/mem`,
//!   `/proc/PID/environ` or its open files' contents through `/proc`
//!   (only a process with `CAP_SYS_PTRACE` can).
//!
//! Children started later (a `credential_process`) inherit the core limit
//! but not the dumpable flag, which `execve` resets.
//!
//! The serving path also raises its open-file limit to the hard limit
//! ([`raise_open_file_limit`]).

use std::io;

/// Applies both; the first failure is returned after trying the other, so
/// one refused call (a seccomp profile, say) does not skip the other.
pub(crate) fn keep_memory_private() -> io::Result<()> {
    let no_core = rustix::process::Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    let core = rustix::process::setrlimit(rustix::process::Resource::Core, no_core);
    #[cfg(target_os = "linux")]
    let dumpable =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable);
    #[cfg(not(target_os = "linux"))]
    let dumpable: rustix::io::Result<()> = Ok(());
    core.and(dumpable).map_err(io::Error::from)
}

/// Raises the soft limit on open files to the hard one, as Go's runtime
/// does at start and nginx's `worker_rlimit_nofile` is set for: every
/// client and upstream connection is a file, and systemd and current
/// container runtimes start processes with a soft limit of 1024 under a
/// hard one hundreds of times larger. Returns the soft limit in force
/// afterwards (`None`: unlimited); on an error the limit is unchanged.
pub(crate) fn raise_open_file_limit() -> io::Result<Option<u64>> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return Ok(limit.current);
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    setrlimit(Resource::Nofile, raised)?;
    Ok(limit.maximum)
}

/// The soft limit on open files in force (`None`: unlimited).
pub(crate) fn open_file_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_core_file_and_not_dumpable_afterwards() {
        keep_memory_private().unwrap();
        let limit = rustix::process::getrlimit(rustix::process::Resource::Core);
        assert_eq!((limit.current, limit.maximum), (Some(0), Some(0)));
        #[cfg(target_os = "linux")]
        assert_eq!(
            rustix::process::dumpable_behavior().unwrap(),
            rustix::process::DumpableBehavior::NotDumpable
        );
        // A second call (the limits are already at zero) still succeeds.
        keep_memory_private().unwrap();
    }

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_one() {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let before = getrlimit(Resource::Nofile);
        let hard = before.maximum;
        // Lower the soft limit (always allowed), as a runtime would start
        // the process, when there is room below the hard one.
        if hard.is_none_or(|h| h > 256) {
            setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(256),
                    maximum: hard,
                },
            )
            .unwrap();
            assert_eq!(getrlimit(Resource::Nofile).current, Some(256));
        }
        assert_eq!(raise_open_file_limit().unwrap(), hard);
        let after = getrlimit(Resource::Nofile);
        assert_eq!((after.current, after.maximum), (hard, hard));
        // Already raised: nothing to do, same answer.
        assert_eq!(raise_open_file_limit().unwrap(), hard);
    }
}
