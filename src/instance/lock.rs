//! One supervisor per state directory, enforced with flock(2) on `<state>/lock`.
//!
//! The kernel drops the lock when the holder dies, so a stale pid file can never make us believe a VM runs.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::thread;
use std::time::Duration;

use super::{InstanceError, Layout, io_err};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another darwin-vz-nix (pid {pid}) already runs the VM in {dir}; stop it with `darwin-vz-nix stop`")]
    Busy { pid: String, dir: String },
    #[error(transparent)]
    Instance(#[from] InstanceError),
}

/// Held for as long as the supervisor runs. Dropping it releases the lock.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

impl InstanceLock {
    /// Takes the lock without waiting long: a short retry covers a concurrent `status` probe.
    pub fn acquire(layout: &Layout) -> Result<Self, LockError> {
        let path = layout.lock_file();
        // Never through a link: the pid is written into whatever file this opens.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io_err(&path))?;
        for attempt in 0..5 {
            match file.try_lock() {
                Ok(()) => {
                    // The lock file names its holder, for messages only; the lock itself is the truth.
                    let pid = std::process::id().to_string();
                    file.set_len(0).and_then(|_| file.rewind()).and_then(|_| file.write_all(pid.as_bytes())).map_err(io_err(&path))?;
                    return Ok(InstanceLock { _file: file });
                }
                Err(TryLockError::WouldBlock) if attempt < 4 => thread::sleep(Duration::from_millis(40)),
                Err(TryLockError::WouldBlock) => {
                    let mut pid = String::new();
                    let _ = file.read_to_string(&mut pid);
                    return Err(LockError::Busy { pid: pid.trim().to_string(), dir: layout.root.display().to_string() });
                }
                Err(TryLockError::Error(e)) => return Err(io_err(&path)(e).into()),
            }
        }
        unreachable!("the loop returns on its last attempt")
    }
}

/// Whether a supervisor holds the lock now. Creates nothing: a missing lock file means nothing runs.
pub fn is_held(layout: &Layout) -> bool {
    let Ok(file) = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(layout.lock_file()) else { return false };
    // A shared lock conflicts only with the supervisor's exclusive one, so concurrent probes don't collide.
    match file.try_lock_shared() {
        Ok(()) => {
            let _ = file.unlock();
            false
        }
        Err(TryLockError::WouldBlock) => true,
        Err(TryLockError::Error(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_and_release_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        assert!(!is_held(&layout));
        let lock = InstanceLock::acquire(&layout).unwrap();
        assert!(is_held(&layout));
        match InstanceLock::acquire(&layout) {
            Err(LockError::Busy { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("{other:?}"),
        }
        drop(lock);
        assert!(!is_held(&layout));
        let _again = InstanceLock::acquire(&layout).unwrap();
    }

    #[test]
    fn stale_lock_file_is_not_a_running_vm() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        std::fs::write(layout.lock_file(), "1").unwrap();
        assert!(!is_held(&layout), "a pid in a file is not a lock");
        InstanceLock::acquire(&layout).unwrap();
    }

    #[test]
    fn a_planted_link_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, layout.lock_file()).unwrap();
        assert!(InstanceLock::acquire(&layout).is_err(), "a link at the lock's path is refused");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    }
}
