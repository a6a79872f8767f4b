//! The QEMU engine: qemu-system with virtiofsd per share and vhost-device-vsock, the same device model as the
//! VZ engine (virtio-blk, virtio-net NAT, virtio-fs by tag, virtio-vsock, virtio console).
//!
//! Helper processes get SIGKILL when the supervisor dies (PR_SET_PDEATHSIG) and sit in their own process group,
//! so Ctrl-C reaches only the supervisor, which then shuts the guest down cleanly.

mod args;
mod qmp;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

pub use args::{Accel, Arch};
use args::{Sockets, VSOCK_DEVICE_ID, qemu_args};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::{Engine, EngineError, Machine, StopReason};
use crate::spec::{RosettaMode, VmSpec};

/// How long the processes of a VM being ended may take to go after SIGKILL.
const HELPERS_GONE_WAIT: Duration = Duration::from_secs(5);
/// How long a helper may take to create its socket.
const SOCKET_WAIT: Duration = Duration::from_secs(10);
/// vhost-device-vsock 0.3.0 occasionally stops answering while a guest boots (about one boot in fifty here):
/// it takes connections and answers none, and such a VM never recovers. After this long it is given up.
const VSOCK_STUCK_AFTER: Duration = Duration::from_secs(15);

pub struct QemuEngine {
    arch: Arch,
    qemu: PathBuf,
    virtiofsd: PathBuf,
    /// The Rust virtiofsd (`--shared-dir`, `--readonly`) or QEMU's older C one (`-o source=`), which has no
    /// read-only mode and so is refused for read-only shares.
    virtiofsd_is_rust: bool,
    vhost_vsock: PathBuf,
    /// The guest's network (user-mode, without a path to the host's loopback).
    passt: PathBuf,
}

fn find_program(env: &str, names: &[&str], extra_dirs: &[&str]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    // `cargo install` before the distribution's directories: Debian 12's /usr/lib/qemu/virtiofsd is the C one.
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.extend(extra_dirs.iter().map(PathBuf::from));
    dirs.iter().flat_map(|d| names.iter().map(move |n| d.join(n))).find(|p| p.is_file())
}

/// Where the engine finds its programs; `doctor` reports the same paths.
pub fn locate_qemu() -> Option<PathBuf> {
    find_program("DVN_QEMU", &[Arch::host().qemu_binary()], &[])
}

pub fn locate_virtiofsd() -> Option<PathBuf> {
    find_program("DVN_VIRTIOFSD", &["virtiofsd"], &["/usr/libexec", "/usr/lib", "/usr/lib/qemu"])
}

/// Whether this virtiofsd can make a share read-only itself (the Rust one's `--readonly`). QEMU's C virtiofsd
/// cannot: a share it serves is writable by guest root whatever the guest's mount options say.
pub fn virtiofsd_enforces_read_only(virtiofsd: &Path) -> Result<bool, EngineError> {
    let help = Command::new(virtiofsd)
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| EngineError::io(format!("running {} --help", virtiofsd.display()), e))?;
    let says = |s: &[u8]| String::from_utf8_lossy(s).contains("--readonly");
    Ok(says(&help.stdout) || says(&help.stderr))
}

/// How to get a virtiofsd that enforces read-only shares.
pub const VIRTIOFSD_HINT: &str = "install the Rust virtiofsd (`cargo install virtiofsd --version 1.14.0 --locked`, which needs \
     libcap-ng-dev and libseccomp-dev; Debian 13: apt-get install virtiofsd) or point DVN_VIRTIOFSD at one";

pub fn locate_vhost_vsock() -> Option<PathBuf> {
    find_program("DVN_VHOST_VSOCK", &["vhost-device-vsock"], &[])
}

pub fn locate_passt() -> Option<PathBuf> {
    find_program("DVN_PASST", &["passt"], &["/usr/bin"])
}

/// The guest's network as passt gives it (the addresses QEMU's user network used): the gateway is not mapped
/// to the host (`--no-map-gw`), so nothing reaches the host's loopback; no port of the host is forwarded into
/// the guest. DHCP hands out the host's own resolvers (/etc/resolv.conf), which the guest reaches directly: a
/// host whose only resolver is on its loopback (systemd-resolved's 127.0.0.53) leaves the guest without DNS.
/// (passt's --dns-forward did not answer here with Debian 12's passt.)
pub fn passt_args(fd: std::os::fd::RawFd) -> Vec<String> {
    let mut args: Vec<String> =
        ["--foreground", "--quiet", "--stderr", "--ipv4-only", "--no-map-gw"].iter().map(|s| s.to_string()).collect();
    for (flag, value) in
        [("--address", "10.0.2.15"), ("--netmask", "24"), ("--gateway", "10.0.2.2"), ("--tcp-ports", "none"), ("--udp-ports", "none")]
    {
        args.extend([flag.to_string(), value.to_string()]);
    }
    args.extend(["--fd".to_string(), fd.to_string()]);
    args
}

impl QemuEngine {
    /// Finds qemu-system, virtiofsd and vhost-device-vsock (overridable with DVN_QEMU, DVN_VIRTIOFSD,
    /// DVN_VHOST_VSOCK) and explains how to install whatever is missing.
    pub fn detect() -> Result<Self, EngineError> {
        let arch = Arch::host();
        let missing = |what: &str, hint: &str| EngineError::Missing { what: what.into(), hint: hint.into() };
        let qemu = locate_qemu().ok_or_else(|| {
            missing(arch.qemu_binary(), "install it (Debian: apt-get install qemu-system-x86 or qemu-system-arm) or set DVN_QEMU")
        })?;
        let virtiofsd = locate_virtiofsd().ok_or_else(|| {
            missing(
                "virtiofsd",
                "install it (Debian 12: apt-get install qemu-system-common; newer: apt-get install virtiofsd) or set DVN_VIRTIOFSD",
            )
        })?;
        let vhost_vsock = locate_vhost_vsock().ok_or_else(|| {
            missing(
                "vhost-device-vsock",
                "install it with `cargo install vhost-device-vsock --version 0.3.0 --locked` or set DVN_VHOST_VSOCK",
            )
        })?;
        let passt = locate_passt().ok_or_else(|| {
            missing(
                "passt",
                "install it (Debian: apt-get install passt) or set DVN_PASST; it gives the guest a network without the host's loopback",
            )
        })?;
        let virtiofsd_is_rust = virtiofsd_enforces_read_only(&virtiofsd)?;
        Ok(QemuEngine { arch, qemu, virtiofsd, virtiofsd_is_rust, vhost_vsock, passt })
    }

    /// Refuses a spec this engine cannot run as asked: a read-only share needs a virtiofsd that enforces it,
    /// never only the guest's mount option.
    fn check_spec(&self, spec: &VmSpec) -> Result<(), EngineError> {
        if let Some(share) = spec.shares.iter().find(|s| s.read_only)
            && !self.virtiofsd_is_rust
        {
            return Err(EngineError::ReadOnlyNotEnforced {
                virtiofsd: self.virtiofsd.clone(),
                tag: share.tag.clone(),
                hint: VIRTIOFSD_HINT.into(),
            });
        }
        Ok(())
    }

    /// KVM if it really runs a vCPU here, else TCG. DVN_QEMU_ACCEL=kvm|tcg overrides. Never hangs: the probe
    /// is a paused QEMU that must come up and quit within a few seconds.
    pub fn choose_accel(&self) -> (Accel, String) {
        // The answer does not change while we run: probe once, not at every on-demand boot.
        static CHOSEN: std::sync::OnceLock<(Accel, String)> = std::sync::OnceLock::new();
        CHOSEN.get_or_init(|| self.probe_accel()).clone()
    }

    fn probe_accel(&self) -> (Accel, String) {
        match std::env::var("DVN_QEMU_ACCEL").as_deref() {
            Ok("kvm") => return (Accel::Kvm, "KVM (DVN_QEMU_ACCEL)".into()),
            Ok("tcg") => return (Accel::Tcg, "TCG (DVN_QEMU_ACCEL)".into()),
            _ => {}
        }
        if fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
            return (Accel::Tcg, "TCG (no usable /dev/kvm)".into());
        }
        match self.probe_kvm() {
            Ok(()) => (Accel::Kvm, "KVM".into()),
            Err(reason) => (Accel::Tcg, format!("TCG (KVM unusable: {reason})")),
        }
    }

    fn probe_kvm(&self) -> Result<(), String> {
        let machine = if self.arch == Arch::X86_64 { "q35" } else { "virt" };
        let mut probe = Command::new(&self.qemu);
        die_with_parent(&mut probe);
        let mut child = probe
            .args([
                "-accel",
                "kvm",
                "-cpu",
                "host",
                "-machine",
                machine,
                "-nodefaults",
                "-display",
                "none",
                "-S",
                "-m",
                "64",
                "-qmp",
                "stdio",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        if let Some(mut stdin) = child.stdin.take() {
            // Nested KVM fails when the vCPU's registers are first loaded: asking for status forces that.
            let _ = stdin.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-status\"}\n{\"execute\":\"quit\"}\n");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    let mut stderr = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = e.read_to_string(&mut stderr);
                    }
                    let mut stdout = String::new();
                    if let Some(mut o) = child.stdout.take() {
                        let _ = o.read_to_string(&mut stdout);
                    }
                    return if status.success() && stdout.contains("\"status\"") {
                        Ok(())
                    } else {
                        Err(stderr.lines().find(|l| l.contains("error")).unwrap_or("QEMU exited").trim().to_string())
                    };
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err("QEMU did not answer within 5 s".into());
                }
            }
        }
    }

    fn virtiofsd_args(&self, source: &Path, socket: &Path, read_only: bool) -> Vec<String> {
        let root = nix::unistd::Uid::effective().is_root();
        let mut args = vec![format!("--socket-path={}", socket.display())];
        if self.virtiofsd_is_rust {
            args.push(format!("--shared-dir={}", source.display()));
            args.push("--cache=auto".into());
            args.push(format!("--sandbox={}", if root { "namespace" } else { "none" }));
            if read_only {
                args.push("--readonly".into());
            }
        } else {
            // QEMU's C virtiofsd has no read-only switch: check_spec lets it serve writable shares only.
            // fuse's option parser splits at commas: escape them (and backslashes) in the path.
            let source = source.display().to_string().replace('\\', "\\\\").replace(',', "\\,");
            args.extend(["-o".into(), format!("source={source}"), "-o".into(), "cache=auto".into()]);
            args.extend(["-o".into(), format!("sandbox={}", if root { "namespace" } else { "chroot" })]);
        }
        args
    }

    /// Every process of one VM, in start order, QEMU last: what `boot` runs, and what `debug vm-command` prints
    /// for benchmarks (so a hand-run baseline cannot drift from the engine). `net` holds the two ends of the
    /// network socket pair (QEMU's, passt's) as the fd numbers the processes inherit.
    pub fn launch_plan(&self, spec: &VmSpec, accel: Accel, net: NetFds) -> LaunchPlan {
        let sockets = Sockets::in_dir(&spec.runtime_dir, spec.shares.len());
        let mut helpers: Vec<PlannedProcess> = spec
            .shares
            .iter()
            .zip(&sockets.shares)
            .map(|(share, socket)| PlannedProcess {
                name: "virtiofsd",
                program: self.virtiofsd.clone(),
                args: self.virtiofsd_args(&share.host_path, socket, share.read_only),
                ready_socket: Some(socket.clone()),
                inherits_fd: None,
            })
            .collect();
        // Devices in one group can reach each other's guests; every VM gets its own group, so concurrent VMs
        // (which all use guest CID 3) never see each other.
        helpers.push(PlannedProcess {
            name: "vhost-device-vsock",
            program: self.vhost_vsock.clone(),
            args: vec![
                "--guest-cid=3".into(),
                format!("--socket={}", sockets.vhost_vsock.display()),
                format!("--uds-path={}", sockets.vsock_uds.display()),
                format!("--groups=dvn{}", std::process::id()),
            ],
            ready_socket: Some(sockets.vhost_vsock.clone()),
            inherits_fd: None,
        });
        helpers.push(PlannedProcess {
            name: "passt",
            program: self.passt.clone(),
            args: passt_args(net.passt),
            ready_socket: None,
            inherits_fd: Some(net.passt),
        });
        let qemu = PlannedProcess {
            name: "qemu",
            program: self.qemu.clone(),
            args: qemu_args(spec, self.arch, accel, &sockets, net.qemu),
            ready_socket: Some(sockets.qmp.clone()),
            inherits_fd: Some(net.qemu),
        };
        LaunchPlan { helpers, qemu, sockets }
    }
}

/// The fd numbers of the network socket pair's two ends, as the child processes inherit them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct NetFds {
    pub qemu: RawFd,
    pub passt: RawFd,
}

/// One process the engine starts for a VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedProcess {
    pub name: &'static str,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// The socket it creates once it serves: the next process starts after that (QEMU's is its QMP socket).
    pub ready_socket: Option<PathBuf>,
    /// The network socket-pair end it inherits under the same fd number.
    pub inherits_fd: Option<RawFd>,
}

impl PlannedProcess {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        cmd
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LaunchPlan {
    /// In start order; each waits for the one before to create its ready socket.
    pub helpers: Vec<PlannedProcess>,
    pub qemu: PlannedProcess,
    #[serde(skip)]
    sockets: Sockets,
}

impl LaunchPlan {
    /// The host end of the guest's vsock (vhost-device-vsock's hybrid socket: `CONNECT <port>`).
    pub fn vsock_socket(&self) -> &Path {
        &self.sockets.vsock_uds
    }
    pub fn qmp_socket(&self) -> &Path {
        &self.sockets.qmp
    }
    /// QEMU's QOM path of the vsock device, for `x-query-virtio-status` (has the guest started it?).
    pub fn vsock_device_path() -> String {
        format!("/machine/peripheral/{VSOCK_DEVICE_ID}/virtio-backend")
    }
}

/// Configures a helper so it dies with the supervisor and ignores the terminal's Ctrl-C.
fn supervised(mut cmd: Command, log: &File) -> Result<Command, EngineError> {
    let log = log.try_clone().map_err(|e| EngineError::io("helper log", e))?;
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::from(log)).process_group(0);
    die_with_parent(&mut cmd);
    Ok(cmd)
}

/// SIGKILL for the child when this process dies (Linux), so no helper or probe outlives a killed supervisor.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    #[cfg(target_os = "linux")]
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// Copies QEMU's stdout (the guest console) until it ends. It keeps draining even when the console file cannot
/// take more (disk full): a full pipe would block the guest's console. What cannot be written is dropped, and
/// that is said once.
fn copy_console(stdout: &mut impl Read, console: &mut dyn Write) {
    let mut buf = [0u8; 8192];
    let mut failing = false;
    while let Ok(n) = stdout.read(&mut buf) {
        if n == 0 {
            break;
        }
        match console.write_all(&buf[..n]).and_then(|_| console.flush()) {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("the guest console is written again");
            }
            Ok(()) => {}
            Err(err) if !failing => {
                failing = true;
                tracing::warn!("cannot write the guest console ({err}); dropping its output until it works again");
            }
            Err(_) => {}
        }
    }
}

/// Lets the child inherit `fd` (under the same number): it is close-on-exec for every other child.
fn inherit_fd(cmd: &mut Command, fd: std::os::fd::RawFd) {
    // SAFETY: fcntl is async-signal-safe; it only clears FD_CLOEXEC on a descriptor this process owns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn wait_for_socket(path: &Path, helper: &mut Child, name: &str) -> Result<(), EngineError> {
    let deadline = Instant::now() + SOCKET_WAIT;
    while !path.exists() {
        if let Ok(Some(status)) = helper.try_wait() {
            return Err(EngineError::Boot(format!("{name} exited ({status}) before creating {}", path.display())));
        }
        if Instant::now() > deadline {
            return Err(EngineError::Boot(format!("{name} did not create {} within {SOCKET_WAIT:?}", path.display())));
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Whether a process of group `pgid` still runs (zombies do not count: they hold no socket or lock, and a
/// container's pid 1 may never reap the orphans among them).
#[cfg(target_os = "linux")]
fn group_alive(pgid: u32) -> bool {
    let Ok(proc) = fs::read_dir("/proc") else { return false };
    proc.flatten().filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))).any(|e| {
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else { return false };
        // After the command name's closing parenthesis: state, ppid, pgrp.
        let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().take(3).collect()).unwrap_or_default();
        matches!(fields.as_slice(), [state, _, group] if *state != "Z" && *state != "X" && group.parse() == Ok(pgid))
    })
}

#[cfg(not(target_os = "linux"))]
fn group_alive(_pgid: u32) -> bool {
    false
}

/// A pidfd for the child (Linux): it becomes readable when the child exits, so a waiter needs no timer.
#[cfg(target_os = "linux")]
fn exit_fd(child: &Child) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; the pid is our unreaped
    // child, so it cannot name another process.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    // SAFETY: a descriptor just returned to us and owned by nothing else.
    (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as RawFd) })
}

#[cfg(not(target_os = "linux"))]
fn exit_fd(_child: &Child) -> Option<std::os::fd::OwnedFd> {
    None
}

/// Sleeps until the pidfd says the process exited, at most `left` (None: no limit).
fn sleep_until_exit(fd: &std::os::fd::OwnedFd, left: Option<Duration>) {
    let timeout_ms = left.map_or(-1, |d| i32::try_from(d.as_millis().max(1)).unwrap_or(i32::MAX));
    let mut pollfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the length given. Whatever poll says (exit, timeout, EINTR), the caller
    // looks at the process again.
    let _ = unsafe { libc::poll(&mut pollfd, 1, timeout_ms) };
}

impl Engine for QemuEngine {
    fn check(&self, spec: &VmSpec) -> Result<(), EngineError> {
        self.check_spec(spec)
    }

    fn boot(&self, spec: &VmSpec, mut console: Box<dyn Write + Send>) -> Result<Box<dyn Machine>, EngineError> {
        self.check_spec(spec)?;
        if spec.rosetta == RosettaMode::Required {
            return Err(EngineError::InvalidSpec("Rosetta exists only with the vz engine on Apple silicon; drop --rosetta".into()));
        }
        for file in [&spec.kernel, &spec.initrd, &spec.disk.path] {
            if !file.is_file() {
                return Err(EngineError::InvalidSpec(format!("{} does not exist", file.display())));
            }
        }
        let dir = &spec.runtime_dir;
        fs::create_dir_all(dir).map_err(|e| EngineError::io(format!("creating {}", dir.display()), e))?;
        let log_path = dir.join("helpers.log");
        let log =
            File::options().create(true).append(true).open(&log_path).map_err(|e| EngineError::io(log_path.display().to_string(), e))?;
        let log_start = log.metadata().map(|m| m.len() as usize).unwrap_or(0);
        let (accel, accel_reason) = self.choose_accel();
        tracing::info!("qemu: accelerator {accel_reason}");

        // The guest's network: a socket pair, one end for passt, one for QEMU. passt drops to `nobody`, which
        // clears its parent-death signal, but it quits when QEMU's end closes (QEMU dies with us).
        // std makes both ends close-on-exec; each child inherits only its own end.
        let (net_qemu, net_passt) = UnixStream::pair().map_err(|e| EngineError::io("creating the network socket pair", e))?;
        let plan = self.launch_plan(spec, accel, NetFds { qemu: net_qemu.as_raw_fd(), passt: net_passt.as_raw_fd() });
        for stale in plan.helpers.iter().chain([&plan.qemu]).filter_map(|p| p.ready_socket.as_ref()).chain([&plan.sockets.vsock_uds]) {
            let _ = fs::remove_file(stale);
        }
        // Guest-initiated connections to host port P reach vhost-device-vsock's `<uds-path>_P`: bound before
        // the guest runs, only for the ports the spec allows, so every other port finds nothing there.
        let mut host_ports = HashMap::new();
        for &port in &spec.host_ports {
            let path = host_port_socket(&plan.sockets.vsock_uds, port);
            let _ = fs::remove_file(&path);
            let listener = UnixListener::bind(&path).map_err(|e| EngineError::io(format!("listening on {}", path.display()), e))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                .map_err(|e| EngineError::io(format!("restricting {}", path.display()), e))?;
            host_ports.insert(port, HostPort { listener: Some(listener), path, taken: false });
        }
        let mut machine = QemuMachine {
            host_ports: Mutex::new(host_ports),
            children: Mutex::new(Vec::new()),
            vsock_uds: plan.sockets.vsock_uds.clone(),
            qmp_path: plan.sockets.qmp.clone(),
            forced: Mutex::new(false),
            vsock_started: std::sync::atomic::AtomicBool::new(false),
            ended: AtomicBool::new(false),
            unanswered_since: Mutex::new(None),
            qemu_exit: None,
        };
        let spawn = |process: &PlannedProcess| -> Result<Command, EngineError> {
            let mut cmd = supervised(process.command(), &log)?;
            if let Some(fd) = process.inherits_fd {
                inherit_fd(&mut cmd, fd);
            }
            Ok(cmd)
        };
        for helper in &plan.helpers {
            let mut child = spawn(helper)?.spawn().map_err(|e| EngineError::io(format!("starting {}", helper.name), e))?;
            let ready = match &helper.ready_socket {
                Some(socket) => wait_for_socket(socket, &mut child, helper.name),
                None => Ok(()),
            };
            machine.adopt(child, helper.name);
            ready?;
        }
        drop(net_passt);

        let mut qemu = spawn(&plan.qemu)?;
        qemu.stdout(Stdio::piped());
        tracing::debug!("qemu: {:?}", qemu);
        let mut child = qemu.spawn().map_err(|e| EngineError::io(format!("starting {}", self.qemu.display()), e))?;
        drop(net_qemu);
        let mut stdout = child.stdout.take().expect("piped stdout");
        machine.qemu_exit = exit_fd(&child);
        machine.adopt(child, "qemu");
        thread::Builder::new()
            .name("console".into())
            .spawn(move || {
                copy_console(&mut stdout, &mut console);
            })
            .map_err(|e| EngineError::io("console thread", e))?;
        // QEMU is up when its QMP socket answers; a bad option makes it exit first.
        let deadline = Instant::now() + SOCKET_WAIT;
        loop {
            if let Some(reason) = machine.wait(Some(Duration::ZERO))? {
                // QEMU's own complaint, not the helpers' chatter that shares the log.
                let log = fs::read(&log_path).unwrap_or_default();
                let this_boot = String::from_utf8_lossy(log.get(log_start..).unwrap_or_default());
                let said: Vec<&str> = this_boot.lines().filter(|l| l.starts_with("qemu")).collect();
                let said = said[said.len().saturating_sub(3)..].join("; ");
                return Err(EngineError::Boot(format!("QEMU stopped at once ({reason}): {said}")));
            }
            if plan.sockets.qmp.exists() && qmp::Qmp::connect(&plan.sockets.qmp).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err(EngineError::Boot("QEMU did not open its QMP socket within 10 s".into()));
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(Box::new(machine))
    }
}

/// vhost-device-vsock's socket for guest connections to host port `port` (its hybrid-vsock convention).
fn host_port_socket(vsock_uds: &Path, port: u32) -> PathBuf {
    let mut name = vsock_uds.as_os_str().to_owned();
    name.push(format!("_{port}"));
    PathBuf::from(name)
}

/// A host port the guest may connect to, and whether `guest_connections` has taken it.
struct HostPort {
    listener: Option<UnixListener>,
    path: PathBuf,
    taken: bool,
}

struct QemuMachine {
    /// Listening sockets for guest-initiated connections, by host port; shut down with the machine so that
    /// their accept threads end.
    host_ports: Mutex<HashMap<u32, HostPort>>,
    /// QEMU last; helpers before it.
    children: Mutex<Vec<(String, Child)>>,
    vsock_uds: PathBuf,
    qmp_path: PathBuf,
    forced: Mutex<bool>,
    /// Set once the guest driver has started the vsock device; connecting before that can kill
    /// vhost-device-vsock 0.3.0's vring worker (a host event before the vrings exist), after which the
    /// device never answers again.
    vsock_started: std::sync::atomic::AtomicBool,
    /// Since when connections have been taken but not answered, and by what (None once anything answers).
    unanswered_since: Mutex<Option<(Instant, &'static str)>>,
    /// Readable once QEMU has exited: `wait` sleeps on it instead of polling.
    qemu_exit: Option<std::os::fd::OwnedFd>,
    /// Set once `kill_all` has ended and reaped every process.
    ended: AtomicBool,
}

impl QemuMachine {
    fn adopt(&mut self, child: Child, name: &str) {
        self.children.get_mut().expect("not poisoned").push((name.to_string(), child));
    }

    /// Whether the guest has started the vsock device (QEMU's `x-query-virtio-status`). A QEMU without that
    /// command is taken to have started it. A QEMU that does not answer is stuck (it blocks on a frozen
    /// vhost-user backend, for one).
    fn guest_started_vsock(&self, port: u32) -> Result<bool, EngineError> {
        use std::sync::atomic::Ordering;
        if self.vsock_started.load(Ordering::Relaxed) {
            return Ok(true);
        }
        let path = LaunchPlan::vsock_device_path();
        let query = qmp::Qmp::connect(&self.qmp_path)
            .and_then(|mut q| q.execute_with("x-query-virtio-status", serde_json::json!({ "path": path })));
        let started = match query {
            Ok(status) => status.get("started").and_then(|s| s.as_bool()).unwrap_or(true),
            Err(e) if qmp::QmpError::of(&e).is_some_and(|q| q.class == "CommandNotFound") => true,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(EngineError::Unresponsive { port, what: "QEMU's monitor (QMP)" });
            }
            Err(_) => false,
        };
        if started {
            self.vsock_started.store(true, Ordering::Relaxed);
        }
        Ok(started)
    }

    /// One connection through vhost-device-vsock's unix socket (`CONNECT <port>` handshake).
    fn connect_once(&self, port: u32) -> Result<UnixStream, EngineError> {
        let fail = |reason: String| EngineError::Connect { port, reason };
        if !self.guest_started_vsock(port)? {
            return Err(fail("the guest has not started its vsock device yet".into()));
        }
        let mut stream = UnixStream::connect(&self.vsock_uds).map_err(|e| fail(e.to_string()))?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| fail(e.to_string()))?;
        stream.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(|e| fail(e.to_string()))?;
        // Read the answer byte by byte: whatever follows the newline belongs to the guest's stream.
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while answer.len() < 64 {
            match stream.read(&mut byte) {
                Ok(0) => return Err(fail("nothing listens there yet".into())),
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) => answer.push(byte[0]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(EngineError::Unresponsive { port, what: "vhost-device-vsock" });
                }
                Err(e) => return Err(fail(e.to_string())),
            }
        }
        let answer = String::from_utf8_lossy(&answer);
        if !answer.starts_with("OK ") {
            return Err(fail(format!("vhost-device-vsock answered '{answer}'")));
        }
        stream.set_read_timeout(None).map_err(|e| fail(e.to_string()))?;
        Ok(stream)
    }

    fn qmp(&self, command: &str) -> Result<(), EngineError> {
        let mut qmp = qmp::Qmp::connect(&self.qmp_path).map_err(|_| EngineError::NotRunning)?;
        qmp.execute(command).map(|_| ()).map_err(|e| EngineError::io(format!("QMP {command}"), e))
    }

    /// Ends the accept threads of the host ports: shutting a listening socket down wakes a blocked accept.
    fn close_host_ports(&self) {
        let mut ports = self.host_ports.lock().unwrap_or_else(|e| e.into_inner());
        for port in ports.values_mut() {
            if let Some(listener) = port.listener.take() {
                let _ = nix::sys::socket::shutdown(listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
            }
            let _ = fs::remove_file(&port.path);
        }
    }

    /// Ends every process of this VM, once: QEMU, each helper and whatever a helper started itself (the Rust
    /// virtiofsd's sandboxed worker, which holds the lock on `<socket>.pid`), and waits until none is left, so
    /// that the next VM's helpers find their sockets and lock files free.
    fn kill_all(children: &mut [(String, Child)], ended: &AtomicBool) {
        if ended.swap(true, Ordering::SeqCst) {
            return;
        }
        for (name, child) in children.iter_mut() {
            // A helper's group is its own (process_group(0)) and its leader is not reaped before the wait
            // below, so the group id cannot name anyone else. QEMU starts nothing (and may be reaped already).
            if name != "qemu" {
                let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            }
            let _ = child.kill();
        }
        for (_, child) in children.iter_mut() {
            let _ = child.wait();
        }
        let deadline = Instant::now() + HELPERS_GONE_WAIT;
        for (name, child) in children.iter().filter(|(name, _)| name != "qemu") {
            while group_alive(child.id()) {
                if Instant::now() > deadline {
                    tracing::warn!("a process of {name}'s group (pgid {}) outlived SIGKILL for {HELPERS_GONE_WAIT:?}", child.id());
                    return;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Machine for QemuMachine {
    fn connect(&self, port: u32) -> Result<UnixStream, EngineError> {
        let result = self.connect_once(port);
        let mut since = self.unanswered_since.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Err(EngineError::Unresponsive { what, .. }) => {
                since.get_or_insert((Instant::now(), what));
            }
            _ => *since = None,
        }
        result
    }

    fn guest_connections(&self, port: u32) -> Option<Receiver<UnixStream>> {
        let listener = {
            let mut ports = self.host_ports.lock().unwrap_or_else(|e| e.into_inner());
            let port = ports.get_mut(&port).filter(|p| !p.taken)?;
            port.taken = true;
            // The original stays here, to be shut down with the machine.
            port.listener.as_ref()?.try_clone().ok()?
        };
        let (tx, rx) = mpsc::channel();
        let spawned = thread::Builder::new().name(format!("host-port-{port}")).spawn(move || {
            for stream in listener.incoming() {
                // An error: shut down with the machine. A failed send: nobody takes connections any more.
                let Ok(stream) = stream else { break };
                if tx.send(stream).is_err() {
                    break;
                }
            }
        });
        spawned.ok().map(|_| rx)
    }

    fn unrecoverable(&self) -> Option<String> {
        let since = *self.unanswered_since.lock().unwrap_or_else(|e| e.into_inner());
        since
            .filter(|(at, _)| at.elapsed() >= VSOCK_STUCK_AFTER)
            .map(|(at, what)| format!("{what} has not answered for {} s", at.elapsed().as_secs()))
    }

    fn request_stop(&self) -> Result<(), EngineError> {
        self.qmp("system_powerdown")
    }

    fn force_stop(&self) -> Result<(), EngineError> {
        *self.forced.lock().expect("not poisoned") = true;
        let mut children = self.children.lock().expect("not poisoned");
        if let Some((_, qemu)) = children.last_mut() {
            let _ = qemu.kill();
        }
        Ok(())
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<Option<StopReason>, EngineError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            {
                let mut children = self.children.lock().expect("not poisoned");
                let exited = match children.last_mut() {
                    None => Some(None),
                    Some((_, qemu)) => qemu.try_wait().map_err(|e| EngineError::io("waiting for QEMU", e))?.map(Some),
                };
                if let Some(status) = exited {
                    // QEMU is gone: its helpers have nothing left to serve.
                    Self::kill_all(&mut children, &self.ended);
                    self.close_host_ports();
                    let forced = *self.forced.lock().expect("not poisoned");
                    return Ok(Some(match status {
                        _ if forced => StopReason::Forced,
                        Some(s) if s.success() => StopReason::GuestShutdown,
                        // `-action panic=exit-failure`: the status QEMU ends with when the guest panics.
                        Some(s) if s.code() == Some(1) => StopReason::Error(format!(
                            "QEMU exited with {s}: the guest kernel panicked, or QEMU failed (see console.log and run/helpers.log)"
                        )),
                        Some(s) => StopReason::Error(format!("QEMU exited with {s}")),
                        None => StopReason::Error("no QEMU process".into()),
                    }));
                }
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) {
                return Ok(None);
            }
            match &self.qemu_exit {
                Some(fd) => sleep_until_exit(fd, left),
                None => thread::sleep(Duration::from_millis(25)),
            }
        }
    }
}

impl Drop for QemuMachine {
    fn drop(&mut self) {
        Self::kill_all(self.children.get_mut().expect("not poisoned"), &self.ended);
        self.close_host_ports();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DiskSpec, NetworkSpec, ShareSpec};

    #[test]
    #[cfg(target_os = "linux")]
    fn ending_a_vm_ends_what_its_helpers_started_too() {
        // A helper that starts a worker of its own which would outlive it (as the Rust virtiofsd's sandboxed
        // worker can, holding the lock the next VM's virtiofsd needs).
        let dir = tempfile::tempdir().unwrap();
        let log = File::create(dir.path().join("helpers.log")).unwrap();
        let worker_pid = dir.path().join("worker.pid");
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!("sleep 1000 & echo $! > {}; wait", worker_pid.display()));
        let helper = supervised(cmd, &log).unwrap().spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let worker: i32 = loop {
            if let Some(pid) = fs::read_to_string(&worker_pid).ok().and_then(|s| s.trim().parse().ok()) {
                break pid;
            }
            assert!(Instant::now() < deadline, "the helper never started its worker");
            thread::sleep(Duration::from_millis(10));
        };
        let pgid = helper.id();
        let mut children = vec![("virtiofsd".to_string(), helper)];
        let ended = AtomicBool::new(false);
        QemuMachine::kill_all(&mut children, &ended);
        let state = fs::read_to_string(format!("/proc/{worker}/stat")).ok();
        let state = state.as_deref().and_then(|s| s.rsplit_once(')')).and_then(|(_, rest)| rest.split_whitespace().next());
        assert!(matches!(state, None | Some("Z")), "the helper's worker still runs ({state:?})");
        assert!(!group_alive(pgid));
        // A second call (Drop after wait) signals nobody: the group id may belong to someone else by now.
        QemuMachine::kill_all(&mut children, &ended);
    }

    fn fake_program(dir: &Path, name: &str, help: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        fs::write(&path, format!("#!/bin/sh\ncat <<'END'\n{help}\nEND\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn the_console_is_drained_when_it_cannot_be_written() {
        struct Full(usize);
        impl Write for Full {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0 += 1;
                if self.0 > 1 { Err(std::io::Error::other("No space left on device")) } else { Ok(buf.len()) }
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut guest = std::io::Cursor::new(vec![b'x'; 100_000]);
        copy_console(&mut guest, &mut Full(0));
        assert_eq!(guest.position(), 100_000, "QEMU's output was drained to the end");
    }

    #[test]
    fn a_read_only_share_is_refused_with_a_virtiofsd_that_cannot_enforce_it() {
        let dir = tempfile::tempdir().unwrap();
        let c = fake_program(dir.path(), "c-virtiofsd", "usage: virtiofsd [options]\n-o source=PATH");
        let rust = fake_program(dir.path(), "virtiofsd", "--shared-dir <SHARED_DIR>\n--readonly");
        assert!(!virtiofsd_enforces_read_only(&c).unwrap());
        assert!(virtiofsd_enforces_read_only(&rust).unwrap());
        let engine = |virtiofsd: PathBuf| QemuEngine {
            arch: Arch::host(),
            qemu: "/bin/false".into(),
            virtiofsd_is_rust: virtiofsd_enforces_read_only(&virtiofsd).unwrap(),
            virtiofsd,
            vhost_vsock: "/bin/false".into(),
            passt: "/bin/false".into(),
        };
        let mut spec = VmSpec {
            cpus: 1,
            memory_mib: 256,
            kernel: "/k".into(),
            initrd: "/i".into(),
            kernel_cmdline: vec![],
            disk: DiskSpec { path: "/d".into(), read_only: false },
            shares: vec![ShareSpec { tag: "nix-store".into(), host_path: "/nix/store".into(), read_only: true }],
            network: NetworkSpec { mac: "02:00:00:00:00:01".into() },
            rosetta: RosettaMode::Off,
            host_ports: vec![],
            runtime_dir: dir.path().join("run"),
            machine_id_file: dir.path().join("mid"),
        };
        let err = engine(c.clone()).check(&spec).unwrap_err();
        assert!(matches!(&err, EngineError::ReadOnlyNotEnforced { tag, .. } if tag == "nix-store"), "{err}");
        assert!(err.to_string().contains("cargo install virtiofsd"), "{err}");
        let booted = engine(c.clone()).boot(&spec, Box::new(std::io::sink()));
        assert!(matches!(booted, Err(EngineError::ReadOnlyNotEnforced { .. })), "boot refuses it too");
        assert!(!spec.runtime_dir.exists(), "refused before anything was started");
        engine(rust).check(&spec).unwrap();
        spec.shares[0].read_only = false;
        engine(c).check(&spec).unwrap();
    }
}

#[cfg(test)]
mod plan_tests {
    use super::*;
    use crate::spec::{DiskSpec, NetworkSpec, ShareSpec};

    #[test]
    fn the_launch_plan_starts_each_helper_before_qemu_and_hands_each_its_own_network_end() {
        let engine = QemuEngine {
            arch: Arch::X86_64,
            qemu: "/q".into(),
            virtiofsd: "/v".into(),
            virtiofsd_is_rust: true,
            vhost_vsock: "/hv".into(),
            passt: "/p".into(),
        };
        let spec = VmSpec {
            cpus: 2,
            memory_mib: 1024,
            kernel: "/k".into(),
            initrd: "/i".into(),
            kernel_cmdline: vec![],
            disk: DiskSpec { path: "/s/disk.img".into(), read_only: false },
            shares: vec![
                ShareSpec { tag: "dvn-config".into(), host_path: "/s/guest-config".into(), read_only: true },
                ShareSpec { tag: "nix-store".into(), host_path: "/nix/store".into(), read_only: true },
            ],
            network: NetworkSpec { mac: "02:00:00:00:00:01".into() },
            rosetta: RosettaMode::Off,
            host_ports: vec![],
            runtime_dir: "/s/run".into(),
            machine_id_file: "/s/mid".into(),
        };
        let plan = engine.launch_plan(&spec, Accel::Tcg, NetFds { qemu: 7, passt: 8 });
        let names: Vec<_> = plan.helpers.iter().map(|p| p.name).collect();
        assert_eq!(names, ["virtiofsd", "virtiofsd", "vhost-device-vsock", "passt"]);
        assert!(plan.helpers[..2].iter().all(|p| p.args.contains(&"--readonly".to_string())), "read-only shares on the host side");
        assert_eq!(plan.helpers[3].inherits_fd, Some(8));
        assert!(plan.helpers[3].args.ends_with(&["--fd".to_string(), "8".to_string()]));
        assert_eq!(plan.qemu.inherits_fd, Some(7));
        assert!(plan.qemu.args.iter().any(|a| a.ends_with("addr.type=fd,addr.str=7")));
        assert_eq!(plan.qemu.ready_socket.as_deref(), Some(Path::new("/s/run/qmp.sock")));
        assert_eq!(plan.vsock_socket(), Path::new("/s/run/vsock.sock"));
        let json = serde_json::to_value(&plan).unwrap();
        assert_eq!(json["helpers"][0]["readySocket"], "/s/run/fs0.sock");
    }
}
