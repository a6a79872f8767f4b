//! The loopback listener of the ssh proxy: inherited from launchd or systemd (so the OS owns the port and
//! starts us on the first connection), or bound by us.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "127.0.0.1:{port} is already in use (nix.linux-builder uses 31022; another darwin-vz-nix may use it). \
         Pick another with --port, or run `darwin-vz-nix doctor` to see who holds it"
    )]
    InUse { port: u16 },
    #[error("listening on 127.0.0.1:{port}: {source}")]
    Bind { port: u16, source: io::Error },
    #[error("the socket handed over by {manager} is not usable: {source}")]
    Inherited { manager: &'static str, source: io::Error },
    /// The proxy gives whoever connects the guest's sshd: only this machine may reach it.
    #[error(
        "the socket handed over by {manager} listens on {addr}, not on the loopback interface; \
         configure it to listen on 127.0.0.1 only (e.g. ListenStream=127.0.0.1:PORT)"
    )]
    NotLoopback { manager: &'static str, addr: SocketAddr },
}

/// Where the listener came from, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Launchd,
    Systemd,
    Bound,
}

pub fn open(port: u16) -> Result<(TcpListener, Origin), ListenError> {
    if let Some(listener) = from_launchd()? {
        return Ok((listener, Origin::Launchd));
    }
    if let Some(listener) = from_systemd()? {
        return Ok((listener, Origin::Systemd));
    }
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match TcpListener::bind(addr) {
        Ok(listener) => Ok((listener, Origin::Bound)),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(ListenError::InUse { port }),
        Err(source) => Err(ListenError::Bind { port, source }),
    }
}

/// systemd socket activation: LISTEN_PID is us and LISTEN_FDS >= 1; the first socket is fd 3.
fn from_systemd() -> Result<Option<TcpListener>, ListenError> {
    use std::os::fd::FromRawFd;
    let ours = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse::<u32>().ok()).unwrap_or(0);
    if !ours || count == 0 {
        return Ok(None);
    }
    // Children (QEMU and its helpers) must not think the sockets are theirs.
    // SAFETY: called before any other thread starts.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    // Take ownership only of a real listening socket: fd 3 could be anything if the caller lied.
    // SAFETY: fd 3 is only borrowed for the check.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(3) };
    let listening = nix::sys::socket::getsockopt(&borrowed, nix::sys::socket::sockopt::AcceptConn);
    if listening != Ok(true) {
        return Err(ListenError::Inherited {
            manager: "systemd",
            source: io::Error::other("LISTEN_FDS is set but fd 3 is not a listening socket"),
        });
    }
    // SAFETY: fd 3 is an open listening socket that nothing else in this process owns.
    let listener = unsafe { TcpListener::from_raw_fd(3) };
    set_cloexec(&listener).map_err(|source| ListenError::Inherited { manager: "systemd", source })?;
    loopback_only(listener, "systemd").map(Some)
}

/// Refuses an inherited socket that listens beyond this machine, and logs the address it really has.
fn loopback_only(listener: TcpListener, manager: &'static str) -> Result<TcpListener, ListenError> {
    let addr = listener.local_addr().map_err(|source| ListenError::Inherited { manager, source })?;
    if !addr.ip().is_loopback() {
        return Err(ListenError::NotLoopback { manager, addr });
    }
    tracing::info!("using the socket handed over by {manager}: {addr}");
    Ok(listener)
}

fn set_cloexec(listener: &TcpListener) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    fcntl(listener, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map(|_| ()).map_err(io::Error::from)
}

/// launchd socket activation: the plist's `Sockets.Listener`.
#[cfg(target_os = "macos")]
fn from_launchd() -> Result<Option<TcpListener>, ListenError> {
    use std::os::fd::FromRawFd;
    unsafe extern "C" {
        fn launch_activate_socket(name: *const libc::c_char, fds: *mut *mut libc::c_int, cnt: *mut libc::size_t) -> libc::c_int;
    }
    let mut fds: *mut libc::c_int = std::ptr::null_mut();
    let mut count: libc::size_t = 0;
    // SAFETY: valid C string and out-pointers; launchd allocates `fds` with malloc.
    let rc = unsafe { launch_activate_socket(c"Listener".as_ptr(), &mut fds, &mut count) };
    if rc != 0 {
        // ESRCH: not started by launchd; ENOENT: no such socket in the plist. Both mean "bind it yourself".
        return Ok(None);
    }
    if fds.is_null() || count == 0 {
        return Ok(None);
    }
    // SAFETY: launchd returned `count` descriptors; we take the first and close the rest.
    let listener = unsafe {
        let first = *fds;
        for i in 1..count {
            libc::close(*fds.add(i));
        }
        libc::free(fds.cast());
        TcpListener::from_raw_fd(first)
    };
    set_cloexec(&listener).map_err(|source| ListenError::Inherited { manager: "launchd", source })?;
    loopback_only(listener, "launchd").map(Some)
}

#[cfg(not(target_os = "macos"))]
fn from_launchd() -> Result<Option<TcpListener>, ListenError> {
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_picks_a_free_port_and_a_taken_port_is_explained() {
        let (listener, origin) = open(0).unwrap();
        assert_eq!(origin, Origin::Bound);
        let port = listener.local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert!(listener.local_addr().unwrap().ip().is_loopback());
        let err = open(port).unwrap_err();
        assert!(matches!(err, ListenError::InUse { port: p } if p == port));
        assert!(err.to_string().contains("--port"));
    }

    #[test]
    fn an_inherited_socket_on_every_interface_is_refused() {
        let any = TcpListener::bind("0.0.0.0:0").unwrap();
        let port = any.local_addr().unwrap().port();
        let err = loopback_only(any, "systemd").unwrap_err();
        assert!(matches!(err, ListenError::NotLoopback { addr, .. } if addr.port() == port), "{err:?}");
        assert!(err.to_string().contains("0.0.0.0") && err.to_string().contains("127.0.0.1"), "{err}");
        let local = TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(loopback_only(local, "systemd").is_ok());
        let v6 = TcpListener::bind("[::1]:0");
        if let Ok(v6) = v6 {
            assert!(loopback_only(v6, "launchd").is_ok(), "::1 is loopback too");
        }
    }
}
