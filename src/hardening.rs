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
}
