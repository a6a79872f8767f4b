//! `doctor`: checks that this machine can run the builder VM, each with a verdict and what to do about it.
//!
//! Everything that decides a verdict is a plain function of data (tested on every platform); gathering the data
//! (sysctl, codesign, lsof, PATH) is kept thin.

use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

/// The port nix-darwin's `nix.linux-builder` forwards to its VM's sshd.
pub const LINUX_BUILDER_PORT: u16 = 31022;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    Ok,
    Warn,
    Fail,
}

impl CheckStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Ok => "ok",
            CheckStatus::Warn => "warn",
            CheckStatus::Fail => "fail",
        }
    }
}

impl std::fmt::Display for CheckStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub status: CheckStatus,
    pub detail: String,
}

impl Check {
    fn new(name: &str, status: CheckStatus, detail: impl Into<String>) -> Self {
        Check { name: name.into(), status, detail: detail.into() }
    }
}

/// The worst status of `checks` (Ok when empty); the CLI can map Fail to a non-zero exit.
pub fn worst(checks: &[Check]) -> CheckStatus {
    checks.iter().map(|c| c.status).max().unwrap_or(CheckStatus::Ok)
}

/// Runs every check for this platform. `port` is the host port the builder's ssh is served on.
pub fn run_checks(port: u16) -> Vec<Check> {
    let mut checks = Vec::new();
    #[cfg(target_os = "macos")]
    {
        checks.push(mac::apple_silicon());
        checks.push(check_macos_version(mac::sysctl_string("kern.osproductversion").as_deref()));
        checks.push(mac::entitlement());
        checks.push(mac::rosetta());
    }
    #[cfg(target_os = "linux")]
    {
        checks.extend(linux::checks());
    }
    checks.push(check_port(port));
    checks
}

// ---------- macOS version ----------

/// `"13.4.1"` -> `(13, 4)`.
pub fn parse_macos_version(s: &str) -> Option<(u32, u32)> {
    let mut parts = s.trim().split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().map(|m| m.parse().ok()).unwrap_or(Some(0))?;
    Some((major, minor))
}

pub fn check_macos_version(version: Option<&str>) -> Check {
    const NAME: &str = "macos-version";
    match version.and_then(|v| parse_macos_version(v).map(|p| (v.trim(), p))) {
        Some((v, (major, _))) if major >= 13 => Check::new(NAME, CheckStatus::Ok, format!("macOS {v}")),
        Some((v, _)) => Check::new(
            NAME,
            CheckStatus::Fail,
            format!("macOS {v}; darwin-vz-nix needs macOS 13 (Ventura) or later for Linux VMs with Rosetta and virtio-fs"),
        ),
        None => Check::new(NAME, CheckStatus::Warn, "could not read the macOS version (sysctl kern.osproductversion)"),
    }
}

// ---------- Apple silicon ----------

/// `arm64_hw`: sysctl hw.optional.arm64 == 1; `translated`: sysctl sysctl.proc_translated == 1.
pub fn check_apple_silicon(arm64_hw: Option<bool>, translated: bool) -> Check {
    const NAME: &str = "apple-silicon";
    match arm64_hw {
        Some(true) if translated => Check::new(
            NAME,
            CheckStatus::Fail,
            "this is an Apple silicon Mac, but darwin-vz-nix runs as an x86_64 binary under Rosetta; install the arm64 (aarch64-darwin) build",
        ),
        Some(true) => Check::new(NAME, CheckStatus::Ok, "Apple silicon"),
        Some(false) => {
            Check::new(NAME, CheckStatus::Fail, "this is an Intel Mac; the builder VM needs Apple silicon (aarch64-linux guests)")
        }
        None => Check::new(NAME, CheckStatus::Warn, "could not tell the CPU type (sysctl hw.optional.arm64)"),
    }
}

// ---------- entitlement ----------

pub const VIRTUALIZATION_ENTITLEMENT: &str = "com.apple.security.virtualization";

/// Whether `codesign -d --entitlements -` output grants `key`. Understands both the XML plist form and the
/// `[Key] ... [Bool] true` form newer codesign prints.
pub fn entitlement_granted(codesign_output: &str, key: &str) -> bool {
    let Some(at) = codesign_output.find(key) else {
        return false;
    };
    let rest = &codesign_output[at + key.len()..];
    match (rest.find("true"), rest.find("false")) {
        (Some(t), Some(f)) => t < f,
        (Some(_), None) => true,
        _ => false,
    }
}

/// The verdict from running `codesign -d --entitlements - <exe>`: `Ok((exit_ok, stdout+stderr))`, or the error
/// from starting codesign.
pub fn check_entitlement(exe: &Path, codesign: Result<(bool, String), io::Error>) -> Check {
    const NAME: &str = "entitlement";
    let fix = format!("sign it: codesign --force --sign - --entitlements macos/entitlements.plist {}", exe.display());
    match codesign {
        Err(e) => {
            Check::new(NAME, CheckStatus::Warn, format!("could not run codesign ({e}); cannot tell whether {} is signed", exe.display()))
        }
        Ok((_, out)) if out.contains("not signed at all") => {
            Check::new(NAME, CheckStatus::Fail, format!("{} is not signed; {fix}", exe.display()))
        }
        Ok((_, out)) if entitlement_granted(&out, VIRTUALIZATION_ENTITLEMENT) => {
            Check::new(NAME, CheckStatus::Ok, format!("{} carries {VIRTUALIZATION_ENTITLEMENT}", exe.display()))
        }
        Ok((true, _)) => {
            Check::new(NAME, CheckStatus::Fail, format!("{} lacks the {VIRTUALIZATION_ENTITLEMENT} entitlement; {fix}", exe.display()))
        }
        Ok((false, out)) => {
            Check::new(NAME, CheckStatus::Fail, format!("codesign could not read {}'s signature ({}); {fix}", exe.display(), out.trim()))
        }
    }
}

// ---------- Rosetta ----------

pub fn check_rosetta(availability: crate::engine::vz::rules::RosettaAvailability) -> Check {
    use crate::engine::vz::rules::{ENV_INSTALL_ROSETTA, ROSETTA_INSTALL_COMMAND, RosettaAvailability};
    const NAME: &str = "rosetta";
    match availability {
        RosettaAvailability::Installed => Check::new(NAME, CheckStatus::Ok, "Rosetta is installed (x86_64-linux builds available)"),
        RosettaAvailability::NotInstalled => Check::new(
            NAME,
            CheckStatus::Warn,
            format!(
                "Rosetta is not installed, so the VM cannot build x86_64-linux; run `{ROSETTA_INSTALL_COMMAND}` (or start with {ENV_INSTALL_ROSETTA}=1)"
            ),
        ),
        RosettaAvailability::NotSupported => Check::new(
            NAME,
            CheckStatus::Warn,
            "Rosetta for Linux is not supported on this Mac (needs Apple silicon and macOS 13+); only aarch64-linux builds",
        ),
    }
}

// ---------- port ----------

/// A process listening on a port, as lsof reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortHolder {
    pub pid: u32,
    pub command: String,
}

/// Parses `lsof -nP -iTCP:<port> -sTCP:LISTEN -F pc` (lines `p<pid>` then `c<command>`).
pub fn parse_lsof(output: &str) -> Vec<PortHolder> {
    let mut holders: Vec<PortHolder> = Vec::new();
    for line in output.lines() {
        if let Some(pid) = line.strip_prefix('p').and_then(|p| p.trim().parse().ok()) {
            holders.push(PortHolder { pid, command: String::new() });
        } else if let (Some(cmd), Some(last)) = (line.strip_prefix('c'), holders.last_mut()) {
            last.command = cmd.trim().to_string();
        }
    }
    holders.dedup();
    holders
}

/// The verdict for `127.0.0.1:port`: `bind` is the result of trying to bind it; `holders` who lsof says listens.
pub fn port_verdict(port: u16, bind: Result<(), io::ErrorKind>, holders: &[PortHolder]) -> Check {
    const NAME: &str = "port";
    match bind {
        Ok(()) => Check::new(NAME, CheckStatus::Ok, format!("127.0.0.1:{port} is free")),
        Err(io::ErrorKind::AddrInUse) => {
            let who = if holders.is_empty() {
                "another process (could not tell which; try `lsof -nP -iTCP:".to_string() + &port.to_string() + " -sTCP:LISTEN`)"
            } else {
                holders.iter().map(|h| format!("{} (pid {})", h.command, h.pid)).collect::<Vec<_>>().join(", ")
            };
            if holders.iter().any(|h| h.command.starts_with("darwin-vz-nix")) {
                return Check::new(
                    NAME,
                    CheckStatus::Warn,
                    format!("127.0.0.1:{port} is held by {who}: a darwin-vz-nix instance already serves it"),
                );
            }
            let builder_hint = if port == LINUX_BUILDER_PORT || holders.iter().any(|h| h.command.starts_with("qemu-system")) {
                "; this is probably nix-darwin's nix.linux-builder: set `nix.linux-builder.enable = false` (or pick another port)"
            } else {
                "; stop that process or choose another port"
            };
            Check::new(NAME, CheckStatus::Fail, format!("127.0.0.1:{port} is held by {who}{builder_hint}"))
        }
        Err(kind) => Check::new(NAME, CheckStatus::Warn, format!("could not test 127.0.0.1:{port}: {kind}")),
    }
}

pub fn check_port(port: u16) -> Check {
    let bind = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).map(drop).map_err(|e| e.kind());
    let holders = if bind.is_err() {
        Command::new("lsof")
            .args(["-nP", &format!("-iTCP:{port}"), "-sTCP:LISTEN", "-F", "pc"])
            .output()
            .map(|o| parse_lsof(&String::from_utf8_lossy(&o.stdout)))
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    port_verdict(port, bind, &holders)
}

// ---------- programs (Linux) ----------

/// The first `name` found in the directories of `path_var` (a `PATH` value) that is an executable file.
pub fn find_in_path(name: &str, path_var: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    std::env::split_paths(path_var?).map(|d| d.join(name)).find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// The verdict for a required program: `found` is where it is, if anywhere.
pub fn program_verdict(name: &str, found: Option<&Path>, required: bool, hint: &str) -> Check {
    match found {
        Some(p) => Check::new(name, CheckStatus::Ok, p.display().to_string()),
        None => Check::new(name, if required { CheckStatus::Fail } else { CheckStatus::Warn }, format!("{name} was not found; {hint}")),
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use super::*;
    use crate::engine::qemu as engine_qemu;

    pub(super) fn checks() -> Vec<Check> {
        let path = std::env::var_os("PATH");
        let path = path.as_deref();
        let host_qemu = if cfg!(target_arch = "aarch64") { "qemu-system-aarch64" } else { "qemu-system-x86_64" };
        let mut out = Vec::new();
        for qemu in ["qemu-system-aarch64", "qemu-system-x86_64"] {
            let required = qemu == host_qemu;
            let hint = if required {
                "install QEMU (e.g. `nix profile install nixpkgs#qemu` or your distribution's qemu-system package)"
            } else {
                "only needed for guests of the other architecture"
            };
            // The host's QEMU is looked up exactly as the engine does (DVN_QEMU, PATH, ~/.cargo/bin).
            let found = if required { engine_qemu::locate_qemu() } else { find_in_path(qemu, path) };
            out.push(program_verdict(qemu, found.as_deref(), required, hint));
        }
        let virtiofsd = engine_qemu::locate_virtiofsd();
        let read_only = virtiofsd.as_deref().map(|v| engine_qemu::virtiofsd_enforces_read_only(v).unwrap_or(false));
        out.push(virtiofsd_verdict(virtiofsd.as_deref(), read_only));
        out.push(program_verdict(
            "passt",
            engine_qemu::locate_passt().as_deref(),
            true,
            "install passt (nixpkgs#passt, Debian: apt-get install passt): the guest's network without the host's loopback",
        ));
        out.push(program_verdict(
            "vhost-device-vsock",
            engine_qemu::locate_vhost_vsock().as_deref(),
            true,
            "install vhost-device-vsock (nixpkgs#vhost-device-vsock, or `cargo install vhost-device-vsock`)",
        ));
        let mut kvm =
            kvm_verdict(Path::new("/dev/kvm").exists(), std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok());
        // An openable /dev/kvm is not enough (nested KVM can fail): ask the engine's own probe.
        if kvm.status == CheckStatus::Ok
            && let Ok(engine) = crate::engine::qemu::QemuEngine::detect()
            && let (crate::engine::qemu::Accel::Tcg, why) = engine.choose_accel()
        {
            kvm = Check::new("kvm", CheckStatus::Warn, format!("{why}: QEMU emulates the CPU (slow, but it works)"));
        }
        out.push(kvm);
        out
    }
}

/// virtiofsd must enforce read-only shares itself: with one that cannot (QEMU's C virtiofsd) the engine refuses
/// to boot, since guest root could remount the store share read-write and change the host's /nix/store.
pub fn virtiofsd_verdict(found: Option<&Path>, enforces_read_only: Option<bool>) -> Check {
    let hint = "install the Rust virtiofsd (nixpkgs#virtiofsd, Debian 13's virtiofsd, or `cargo install virtiofsd`) or set DVN_VIRTIOFSD";
    match (found, enforces_read_only) {
        (None, _) => Check::new("virtiofsd", CheckStatus::Fail, format!("virtiofsd was not found; {hint}")),
        (Some(p), Some(true)) => Check::new("virtiofsd", CheckStatus::Ok, format!("{} (enforces read-only shares)", p.display())),
        (Some(p), _) => Check::new(
            "virtiofsd",
            CheckStatus::Fail,
            format!("{} cannot make shares read-only (QEMU's C virtiofsd), so the VM will not boot with it; {hint}", p.display()),
        ),
    }
}

/// /dev/kvm: absent -> the VM runs emulated (very slow); present but not writable -> group membership needed.
pub fn kvm_verdict(exists: bool, accessible: bool) -> Check {
    match (exists, accessible) {
        (true, true) => Check::new("kvm", CheckStatus::Ok, "/dev/kvm is usable"),
        (true, false) => Check::new(
            "kvm",
            CheckStatus::Warn,
            "/dev/kvm exists but this user cannot open it; add the user to the `kvm` group and log in again",
        ),
        (false, _) => Check::new("kvm", CheckStatus::Warn, "/dev/kvm is missing; QEMU would have to emulate the CPU (very slow)"),
    }
}

#[cfg(target_os = "macos")]
mod mac {
    use super::*;
    use crate::engine::vz::rules::RosettaProbe;
    use std::ffi::CString;

    pub(super) fn sysctl_string(name: &str) -> Option<String> {
        let cname = CString::new(name).ok()?;
        let mut len: libc::size_t = 0;
        // SAFETY: size query with a null buffer.
        if unsafe { libc::sysctlbyname(cname.as_ptr(), std::ptr::null_mut(), &mut len, std::ptr::null_mut(), 0) } != 0 {
            return None;
        }
        let mut buf = vec![0u8; len];
        // SAFETY: `buf` has `len` bytes.
        if unsafe { libc::sysctlbyname(cname.as_ptr(), buf.as_mut_ptr().cast(), &mut len, std::ptr::null_mut(), 0) } != 0 {
            return None;
        }
        buf.truncate(len);
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8(buf[..end].to_vec()).ok()
    }

    fn sysctl_i32(name: &str) -> Option<i32> {
        let cname = CString::new(name).ok()?;
        let mut value: i32 = 0;
        let mut len: libc::size_t = std::mem::size_of::<i32>();
        // SAFETY: `value` is an i32 and `len` its size.
        let rc = unsafe { libc::sysctlbyname(cname.as_ptr(), (&mut value as *mut i32).cast(), &mut len, std::ptr::null_mut(), 0) };
        (rc == 0).then_some(value)
    }

    pub(super) fn apple_silicon() -> Check {
        // hw.optional.arm64 is missing on Intel Macs, which also means "not Apple silicon".
        let arm64 = Some(sysctl_i32("hw.optional.arm64") == Some(1));
        check_apple_silicon(arm64, sysctl_i32("sysctl.proc_translated") == Some(1))
    }

    pub(super) fn entitlement() -> Check {
        let exe = match std::env::current_exe() {
            Ok(p) => p,
            Err(e) => {
                return Check::new("entitlement", CheckStatus::Warn, format!("cannot locate this binary: {e}"));
            }
        };
        let out = Command::new("/usr/bin/codesign").args(["-d", "--entitlements", "-"]).arg(&exe).output().map(|o| {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            (o.status.success(), text)
        });
        check_entitlement(&exe, out)
    }

    pub(super) fn rosetta() -> Check {
        check_rosetta(crate::engine::vz::MacRosettaProbe.availability())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::vz::rules::{ROSETTA_INSTALL_COMMAND, RosettaAvailability};

    #[test]
    fn macos_versions() {
        assert_eq!(parse_macos_version("13.4.1"), Some((13, 4)));
        assert_eq!(parse_macos_version("26"), Some((26, 0)));
        assert_eq!(parse_macos_version("x"), None);
        assert_eq!(check_macos_version(Some("14.5\n")).status, CheckStatus::Ok);
        assert_eq!(check_macos_version(Some("13.0")).status, CheckStatus::Ok);
        let old = check_macos_version(Some("12.7.6"));
        assert_eq!(old.status, CheckStatus::Fail);
        assert!(old.detail.contains("macOS 13"));
        assert_eq!(check_macos_version(None).status, CheckStatus::Warn);
    }

    #[test]
    fn apple_silicon_verdicts() {
        assert_eq!(check_apple_silicon(Some(true), false).status, CheckStatus::Ok);
        assert!(check_apple_silicon(Some(true), true).detail.contains("under Rosetta"));
        assert_eq!(check_apple_silicon(Some(false), false).status, CheckStatus::Fail);
        assert_eq!(check_apple_silicon(None, false).status, CheckStatus::Warn);
    }

    const XML: &str = r#"Executable=/usr/local/bin/darwin-vz-nix
<?xml version="1.0" encoding="UTF-8"?><!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd"><plist version="1.0"><dict><key>com.apple.security.virtualization</key><true/></dict></plist>"#;
    const DICT: &str = "Executable=/x\n[Dict]\n\t[Key] com.apple.security.virtualization\n\t[Value]\n\t\t[Bool] true\n";

    #[test]
    fn entitlement_parsing() {
        assert!(entitlement_granted(XML, VIRTUALIZATION_ENTITLEMENT));
        assert!(entitlement_granted(DICT, VIRTUALIZATION_ENTITLEMENT));
        assert!(!entitlement_granted(&DICT.replace("true", "false"), VIRTUALIZATION_ENTITLEMENT));
        assert!(!entitlement_granted(&XML.replace("<true/>", "<false/>"), VIRTUALIZATION_ENTITLEMENT));
        // Another key true, ours false.
        let mixed = "<key>com.apple.security.virtualization</key><false/><key>com.apple.vm.networking</key><true/>";
        assert!(!entitlement_granted(mixed, VIRTUALIZATION_ENTITLEMENT));
        assert!(!entitlement_granted("Executable=/x\n", VIRTUALIZATION_ENTITLEMENT));
    }

    #[test]
    fn entitlement_verdicts() {
        let exe = Path::new("/usr/local/bin/darwin-vz-nix");
        assert_eq!(check_entitlement(exe, Ok((true, XML.into()))).status, CheckStatus::Ok);
        let unsigned = check_entitlement(exe, Ok((false, "/x: code object is not signed at all\n".into())));
        assert_eq!(unsigned.status, CheckStatus::Fail);
        assert!(unsigned.detail.contains("codesign --force --sign - --entitlements macos/entitlements.plist"));
        let lacking = check_entitlement(exe, Ok((true, "Executable=/x\n".into())));
        assert!(lacking.status == CheckStatus::Fail && lacking.detail.contains("lacks"));
        let missing = check_entitlement(exe, Err(io::Error::from(io::ErrorKind::NotFound)));
        assert_eq!(missing.status, CheckStatus::Warn);
    }

    #[test]
    fn rosetta_verdicts() {
        assert_eq!(check_rosetta(RosettaAvailability::Installed).status, CheckStatus::Ok);
        let ni = check_rosetta(RosettaAvailability::NotInstalled);
        assert!(ni.status == CheckStatus::Warn && ni.detail.contains(ROSETTA_INSTALL_COMMAND));
        assert_eq!(check_rosetta(RosettaAvailability::NotSupported).status, CheckStatus::Warn);
    }

    #[test]
    fn lsof_parsing() {
        let out = "p812\ncqemu-system-aarch64\nf12\np900\ncsshd\n";
        assert_eq!(
            parse_lsof(out),
            vec![PortHolder { pid: 812, command: "qemu-system-aarch64".into() }, PortHolder { pid: 900, command: "sshd".into() }]
        );
        assert!(parse_lsof("").is_empty());
    }

    #[test]
    fn port_verdicts() {
        assert_eq!(port_verdict(31022, Ok(()), &[]).status, CheckStatus::Ok);
        let qemu = [PortHolder { pid: 812, command: "qemu-system-aarch64".into() }];
        let c = port_verdict(31022, Err(io::ErrorKind::AddrInUse), &qemu);
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.detail.contains("qemu-system-aarch64 (pid 812)") && c.detail.contains("nix.linux-builder"), "{}", c.detail);
        let unknown = port_verdict(2222, Err(io::ErrorKind::AddrInUse), &[]);
        assert!(unknown.detail.contains("could not tell which") && !unknown.detail.contains("linux-builder"));
        let ours = [PortHolder { pid: 5, command: "darwin-vz-nix".into() }];
        assert_eq!(port_verdict(2222, Err(io::ErrorKind::AddrInUse), &ours).status, CheckStatus::Warn);
        assert_eq!(port_verdict(2222, Err(io::ErrorKind::PermissionDenied), &[]).status, CheckStatus::Warn);
    }

    #[test]
    fn real_port_check_sees_a_listener() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        assert_ne!(check_port(port).status, CheckStatus::Ok);
        drop(l);
        assert_eq!(check_port(port).status, CheckStatus::Ok);
    }

    #[test]
    fn a_virtiofsd_without_read_only_fails() {
        let p = Path::new("/usr/lib/qemu/virtiofsd");
        assert_eq!(virtiofsd_verdict(Some(p), Some(true)).status, CheckStatus::Ok);
        let c = virtiofsd_verdict(Some(p), Some(false));
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.detail.contains("read-only"), "{}", c.detail);
        assert_eq!(virtiofsd_verdict(None, None).status, CheckStatus::Fail);
    }

    #[test]
    fn path_lookup_and_program_verdicts() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("vhost-device-vsock");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        let plain = dir.path().join("virtiofsd");
        std::fs::write(&plain, "").unwrap(); // not executable
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::join_paths([Path::new("/nonexistent"), dir.path()]).unwrap();
        assert_eq!(find_in_path("vhost-device-vsock", Some(&path)), Some(exe.clone()));
        assert_eq!(find_in_path("virtiofsd", Some(&path)), None);
        assert_eq!(find_in_path("x", None), None);
        assert_eq!(program_verdict("v", Some(&exe), true, "h").status, CheckStatus::Ok);
        assert_eq!(program_verdict("v", None, true, "h").status, CheckStatus::Fail);
        assert_eq!(program_verdict("v", None, false, "h").status, CheckStatus::Warn);
    }

    #[test]
    fn kvm_and_worst() {
        assert_eq!(kvm_verdict(true, true).status, CheckStatus::Ok);
        assert!(kvm_verdict(true, false).detail.contains("kvm"));
        assert_eq!(kvm_verdict(false, false).status, CheckStatus::Warn);
        assert_eq!(worst(&[]), CheckStatus::Ok);
        let cs = [kvm_verdict(true, true), kvm_verdict(false, false)];
        assert_eq!(worst(&cs), CheckStatus::Warn);
    }

    #[test]
    fn run_checks_includes_the_port() {
        let checks = run_checks(0);
        assert!(checks.iter().any(|c| c.name == "port"));
    }
}
