//! Plain plumbing the VZ engine needs around the framework: the stop state the delegate feeds and `wait()` reads,
//! the console pipe and its copier thread, and turning a borrowed vsock descriptor into an owned stream.
//! Compiled and tested everywhere.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::{Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::engine::StopReason;

/// The VM's stop state: set once (first reason wins), waited on by any number of threads.
#[derive(Default)]
pub struct StopState {
    reason: Mutex<Option<StopReason>>,
    changed: Condvar,
}

impl StopState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records how the VM ended. Later calls do not overwrite the first reason.
    pub fn set(&self, reason: StopReason) {
        let mut guard = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(reason);
            self.changed.notify_all();
        }
    }

    pub fn get(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until a reason is set, at most `timeout` (None = forever). None on timeout.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<StopReason> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut guard = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = guard.as_ref() {
                return Some(r.clone());
            }
            guard = match deadline {
                None => self.changed.wait(guard).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    self.changed
                        .wait_timeout(guard, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }
}

/// A pipe whose ends are close-on-exec (macOS has no pipe2, so set the flag right after creating it).
pub fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe().map_err(io::Error::from)?;
    for fd in [&r, &w] {
        set_cloexec(fd.as_fd())?;
    }
    Ok((r, w))
}

fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    let flags = FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD).map_err(io::Error::from)?);
    fcntl(fd, FcntlArg::F_SETFD(flags | FdFlag::FD_CLOEXEC)).map_err(io::Error::from)?;
    Ok(())
}

/// A thread copying everything from `from` into `to` until end of file (all write ends closed). The receiver gets
/// a message when the thread is done, so callers can wait for it with a bound.
pub fn spawn_copier(
    mut from: File,
    mut to: Box<dyn Write + Send>,
) -> io::Result<(JoinHandle<()>, mpsc::Receiver<()>)> {
    let (done_tx, done_rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("vz-console".into())
        .spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        // A failing sink must not block the guest's console: keep draining the pipe.
                        if to.write_all(&buf[..n]).is_ok() {
                            let _ = to.flush();
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            let _ = to.flush();
            let _ = done_tx.send(());
        })?;
    Ok((handle, done_rx))
}

/// Duplicates a descriptor owned by someone else (e.g. a `VZVirtioSocketConnection`, which closes its own when it
/// is released) into an owned, close-on-exec stream.
///
/// # Safety
/// `fd` must be an open socket descriptor for the duration of the call.
pub unsafe fn dup_stream(fd: RawFd) -> io::Result<UnixStream> {
    if fd < 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid file descriptor {fd}"),
        ));
    }
    // SAFETY: the caller guarantees fd is open for the duration of this call.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let owned = borrowed.try_clone_to_owned()?; // F_DUPFD_CLOEXEC
    let stream = UnixStream::from(owned);
    // The framework may hand out a non-blocking descriptor; the supervisor wants ordinary blocking I/O.
    stream.set_nonblocking(false)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;

    #[test]
    fn stop_state_first_reason_wins_and_wakes_waiters() {
        let s = Arc::new(StopState::new());
        assert_eq!(s.wait(Some(Duration::from_millis(20))), None);
        let s2 = s.clone();
        let waiter = std::thread::spawn(move || s2.wait(None));
        std::thread::sleep(Duration::from_millis(20));
        s.set(StopReason::GuestShutdown);
        s.set(StopReason::Forced);
        assert_eq!(waiter.join().unwrap(), Some(StopReason::GuestShutdown));
        assert_eq!(s.get(), Some(StopReason::GuestShutdown));
        assert_eq!(
            s.wait(Some(Duration::ZERO)),
            Some(StopReason::GuestShutdown)
        );
    }

    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn copier_copies_until_eof() {
        let (r, w) = cloexec_pipe().unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let (h, done) = spawn_copier(File::from(r), Box::new(Shared(out.clone()))).unwrap();
        let mut w = File::from(w);
        w.write_all(b"[    0.000000] Booting Linux\n").unwrap();
        w.write_all(b"login: ").unwrap();
        drop(w);
        done.recv_timeout(Duration::from_secs(5)).unwrap();
        h.join().unwrap();
        assert_eq!(
            out.lock().unwrap().as_slice(),
            b"[    0.000000] Booting Linux\nlogin: "
        );
    }

    #[test]
    fn pipe_is_cloexec() {
        let (r, w) = cloexec_pipe().unwrap();
        for fd in [r.as_raw_fd(), w.as_raw_fd()] {
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            assert!(flags & libc::FD_CLOEXEC != 0);
        }
    }

    #[test]
    fn dup_stream_outlives_the_original() {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut dup = unsafe { dup_stream(a.as_raw_fd()) }.unwrap();
        drop(a); // the framework closes its descriptor; ours stays open
        let mut b = b;
        b.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        dup.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        assert!(unsafe { dup_stream(-1) }.is_err());
    }
}
