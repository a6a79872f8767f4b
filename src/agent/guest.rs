//! The guest side of the agent: answers the host on a vsock port and, when the guest's sshd cannot listen on
//! vsock itself (the Debian test guest), forwards vsock port 22 to it.

use std::collections::HashSet;
use std::fs;
use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};

use super::protocol::{self, GuestStatus, Hello, ProtocolError, Reply, Request, TimeSet};

/// UIDs at or above this belong to Nix's auto-allocated build users.
const AUTO_ALLOCATED_BUILD_UID_BASE: u32 = 872_415_232;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub port: u32,
    pub ssh_forward: Option<String>,
    pub disk_path: PathBuf,
    pub poweroff_command: String,
}

/// Listens on a vsock port (any CID) and returns the listening socket.
pub fn vsock_listen(port: u32) -> nix::Result<OwnedFd> {
    let fd = socket::socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
    socket::listen(&fd, Backlog::new(64)?)?;
    Ok(fd)
}

/// Bridges this process's stdin/stdout to host vsock port `port` (the host is CID 2) until both directions
/// end: the guest's end of the read-only store queries (`dvn-host-store@.service`, socket-activated).
pub fn host_bridge(port: u32) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::fd::{AsFd, FromRawFd, IntoRawFd};
    let fd = socket::socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).context("vsock socket")?;
    socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &VsockAddr::new(libc::VMADDR_CID_HOST, port))
        .with_context(|| format!("connecting to host vsock port {port}"))?;
    // SAFETY: a connected stream socket we own; vsock supports read, write and shutdown like a unix stream.
    let host = unsafe { UnixStream::from_raw_fd(fd.into_raw_fd()) };
    // Unbuffered copies of stdin and stdout (under socket activation, both are the accepted connection): std's
    // stdout is line-buffered, which would hold binary protocol bytes back until a newline.
    let stdin = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned().context("stdin")?);
    let mut stdout = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned().context("stdout")?);
    let mut to_host = host.try_clone().context("vsock socket")?;
    let upstream = std::thread::spawn(move || {
        let _ = std::io::copy(&mut &stdin, &mut to_host);
        let _ = to_host.shutdown(std::net::Shutdown::Write);
    });
    let mut from_host = host;
    std::io::copy(&mut from_host, &mut stdout).context("relaying from the host")?;
    // The host closed its side; our reader may still block on stdin, so do not wait for it.
    drop(upstream);
    Ok(())
}

fn vsock_accept(listener: &OwnedFd) -> nix::Result<UnixStream> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let raw = socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
    // A vsock stream socket supports read, write and shutdown like any stream socket.
    Ok(unsafe { UnixStream::from_raw_fd(raw) })
}

/// Runs the agent until the process is killed.
pub fn run(config: AgentConfig) -> anyhow::Result<()> {
    use anyhow::Context;
    let listener = vsock_listen(config.port).with_context(|| format!("listening on vsock port {}", config.port))?;
    if let Some(target) = config.ssh_forward.clone() {
        let ssh_listener = vsock_listen(crate::spec::VSOCK_PORT_SSH).context("listening on vsock port 22")?;
        thread::Builder::new().name("ssh-forward".into()).spawn(move || forward_ssh(ssh_listener, target))?;
    }
    eprintln!("dvn-agent: listening on vsock port {}", config.port);
    loop {
        match vsock_accept(&listener) {
            Ok(stream) => {
                let config = config.clone();
                // A failed spawn (out of threads or memory) drops this connection, not the agent.
                let spawned = thread::Builder::new().name("agent-conn".into()).spawn(move || {
                    if let Err(err) = serve(stream, &config)
                        && !matches!(err, ProtocolError::Closed)
                    {
                        eprintln!("dvn-agent: connection ended: {err}");
                    }
                });
                if let Err(err) = spawned {
                    eprintln!("dvn-agent: cannot serve a connection: {err}");
                    thread::sleep(Duration::from_millis(100));
                }
            }
            Err(err) => {
                eprintln!("dvn-agent: accept failed: {err}");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn forward_ssh(listener: OwnedFd, target: String) {
    loop {
        let Ok(stream) = vsock_accept(&listener) else {
            thread::sleep(Duration::from_millis(100));
            continue;
        };
        let target = target.clone();
        let spawned = thread::Builder::new().name("ssh-forward-conn".into()).spawn(move || match TcpStream::connect(&target) {
            Ok(sshd) => {
                let _ = crate::relay::relay(Box::new(stream), Box::new(sshd));
            }
            Err(err) => eprintln!("dvn-agent: sshd at {target} is not reachable: {err}"),
        });
        if let Err(err) = spawned {
            eprintln!("dvn-agent: cannot forward a connection: {err}");
            thread::sleep(Duration::from_millis(100));
        }
    }
}

fn serve(stream: UnixStream, config: &AgentConfig) -> Result<(), ProtocolError> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let line = protocol::read_line(&mut reader)?;
        let request = protocol::decode_request(&line);
        let response = match &request {
            Ok(request) => match handle(request, config) {
                Ok(reply) => protocol::ok_response(&reply),
                Err(message) => protocol::error_response(message),
            },
            Err(err) => protocol::error_response(err.to_string()),
        };
        protocol::write_message(&mut writer, &response)?;
        // Only a request that decodes to Poweroff powers off, not any line that mentions it.
        if should_power_off(&request) && response.ok {
            writer.flush()?;
            power_off(&config.poweroff_command);
        }
    }
}

fn should_power_off<E>(request: &Result<Request, E>) -> bool {
    matches!(request, Ok(Request::Poweroff))
}

fn handle(request: &Request, config: &AgentConfig) -> Result<Reply, String> {
    match request {
        Request::Hello => Ok(Reply::Hello(Hello {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            hostname: fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string(),
        })),
        Request::Status => Ok(Reply::Status(status(config))),
        Request::SetTime { unix_ms } => set_time(*unix_ms).map(Reply::TimeSet),
        Request::Poweroff => Ok(Reply::Empty {}),
    }
}

fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn status(config: &AgentConfig) -> GuestStatus {
    let (disk_free_bytes, disk_total_bytes) = nix::sys::statvfs::statvfs(&config.disk_path)
        .map(|s| {
            let frsize = s.fragment_size();
            (s.blocks_available() * frsize, s.blocks() * frsize)
        })
        .unwrap_or((0, 0));
    GuestStatus {
        uptime_seconds: fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(0.0),
        guest_ip: guest_ipv4(),
        disk_free_bytes,
        disk_total_bytes,
        builds_in_flight: count_builds(Path::new("/proc"), &build_uids()),
        unix_ms: now_unix_ms(),
    }
}

fn guest_ipv4() -> Option<String> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    for ifaddr in addrs {
        let Some(addr) = ifaddr.address.as_ref().and_then(|a| a.as_sockaddr_in()) else { continue };
        let ip = addr.ip();
        if !ip.is_loopback() {
            return Some(ip.to_string());
        }
    }
    None
}

fn set_time(host_unix_ms: i64) -> Result<TimeSet, String> {
    let offset_ms = now_unix_ms() - host_unix_ms;
    let spec = nix::sys::time::TimeSpec::new(host_unix_ms.div_euclid(1000), host_unix_ms.rem_euclid(1000) * 1_000_000);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, spec).map_err(|e| format!("setting the clock: {e}"))?;
    Ok(TimeSet { offset_ms })
}

fn power_off(command: &str) {
    eprintln!("dvn-agent: powering off ({command})");
    let ran = Command::new("/bin/sh").arg("-c").arg(command).status().map(|s| s.success()).unwrap_or(false);
    if !ran {
        // The init could not do it: at least make the disk consistent before cutting power.
        nix::unistd::sync();
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    }
}

/// UIDs of Nix build users: the members of the `nixbld` group, looked up through the C library (NSS), not by
/// parsing /etc/group and /etc/passwd by hand.
pub fn build_uids() -> HashSet<u32> {
    let Ok(Some(group)) = nix::unistd::Group::from_name("nixbld") else { return HashSet::new() };
    group.mem.iter().filter_map(|name| nix::unistd::User::from_name(name).ok().flatten()).map(|user| user.uid.as_raw()).collect()
}

/// Builds in flight, read from a /proc tree: each running build has its own build user, so the number of
/// distinct build-user UIDs with live processes; plus nix-daemon workers (a nix-daemon whose parent is one),
/// which exist while a client session substitutes or uploads. Whichever is larger.
pub fn count_builds(proc_root: &Path, build_uids: &HashSet<u32>) -> u32 {
    let Ok(entries) = fs::read_dir(proc_root) else { return 0 };
    let mut processes = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else { continue };
        // comm may hold spaces and parentheses: it ends at the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let comm = stat[open + 1..close].to_string();
        let ppid: u32 = stat[close + 1..].split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
        let uid = fs::read_to_string(entry.path().join("status"))
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()));
        processes.push((pid, ppid, comm, uid));
    }
    let daemons: HashSet<u32> = processes.iter().filter(|p| p.2 == "nix-daemon").map(|p| p.0).collect();
    let workers = processes.iter().filter(|p| p.2 == "nix-daemon" && daemons.contains(&p.1)).count() as u32;
    let builders: HashSet<u32> =
        processes.iter().filter_map(|p| p.3).filter(|uid| build_uids.contains(uid) || *uid >= AUTO_ALLOCATED_BUILD_UID_BASE).collect();
    workers.max(builders.len() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_process(root: &Path, pid: u32, ppid: u32, comm: &str, uid: u32) {
        let dir = root.join(pid.to_string());
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("stat"), format!("{pid} ({comm}) S {ppid} 1 1 0 -1")).unwrap();
        fs::write(dir.join("status"), format!("Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")).unwrap();
    }

    #[test]
    fn counts_build_users_and_daemon_workers() {
        let proc_dir = tempfile::tempdir().unwrap();
        let root = proc_dir.path();
        fs::create_dir_all(root.join("self")).unwrap();
        fake_process(root, 1, 0, "systemd", 0);
        fake_process(root, 10, 1, "nix-daemon", 0);
        assert_eq!(count_builds(root, &HashSet::from([30001])), 0, "the master daemon alone is no build");
        fake_process(root, 11, 10, "nix-daemon", 0);
        assert_eq!(count_builds(root, &HashSet::from([30001])), 1, "one worker");
        fake_process(root, 20, 11, "bash", 30001);
        fake_process(root, 21, 20, "make (jobs)", 30001);
        fake_process(root, 22, 11, "gcc", 30002);
        assert_eq!(count_builds(root, &HashSet::from([30001, 30002])), 2, "two build users busy");
        fake_process(root, 30, 11, "cc1", AUTO_ALLOCATED_BUILD_UID_BASE + 5);
        assert_eq!(count_builds(root, &HashSet::from([30001, 30002])), 3);
    }

    #[test]
    fn only_a_decoded_poweroff_powers_off() {
        let line = |request: &Request| serde_json::to_value(protocol::encode_request(request)).unwrap();
        let mut status = line(&Request::Status);
        status["note"] = serde_json::json!("poweroff");
        let status = status.to_string();
        assert!(status.contains("\"poweroff\""), "the old check would have powered off: {status}");
        assert_eq!(protocol::decode_request(&status).unwrap(), Request::Status);
        assert!(!should_power_off(&protocol::decode_request(&status)));
        assert!(!should_power_off(&protocol::decode_request(r#"{"garbage":"poweroff"}"#)));
        assert!(should_power_off(&protocol::decode_request(&line(&Request::Poweroff).to_string())));
    }

    #[test]
    fn build_users_are_the_nixbld_members_nss_knows() {
        // Whatever this machine has: each uid found belongs to a member of nixbld, and none without the group.
        let uids = build_uids();
        match nix::unistd::Group::from_name("nixbld").unwrap() {
            Some(group) => assert!(uids.len() <= group.mem.len()),
            None => assert!(uids.is_empty()),
        }
    }
}
