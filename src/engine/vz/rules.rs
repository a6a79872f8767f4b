//! Plain rules of the VZ engine: what it accepts and what it tells the user. No Objective-C here, so all of it
//! compiles and is unit-tested on every platform; the macOS layer only feeds it numbers and availability values.

use std::collections::HashSet;
use std::path::Path;

use crate::engine::EngineError;
use crate::spec::{RosettaMode, ShareSpec, TAG_ROSETTA, VmSpec};

/// The console device the VZ engine gives the guest (virtio console, first port).
pub const CONSOLE_ARG: &str = "console=hvc0";

/// arm64 Linux `COMMAND_LINE_SIZE` (bytes, including the terminating NUL).
pub const MAX_CMDLINE_BYTES: usize = 2048;

/// Longest virtio-fs tag the device accepts (the virtio spec's 36-byte tag field).
pub const MAX_TAG_BYTES: usize = 36;

/// Environment variable that opts in to installing Rosetta when the VM needs it and it is missing.
pub const ENV_INSTALL_ROSETTA: &str = "DVN_INSTALL_ROSETTA";

/// The command that installs Rosetta on macOS without a dialog.
pub const ROSETTA_INSTALL_COMMAND: &str = "softwareupdate --install-rosetta --agree-to-license";

/// What Virtualization.framework allows on this Mac, as reported by `VZVirtualMachineConfiguration`'s
/// `minimumAllowed*` / `maximumAllowed*` class methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceLimits {
    pub min_cpus: u64,
    pub max_cpus: u64,
    pub min_memory_bytes: u64,
    pub max_memory_bytes: u64,
}

const MIB: u64 = 1024 * 1024;

/// Checks the VM size against the limits. Never clamps: a value out of range is the user's to change.
pub fn validate_resources(
    cpus: u32,
    memory_mib: u64,
    limits: &ResourceLimits,
) -> Result<(), EngineError> {
    let cpus = u64::from(cpus);
    if cpus < limits.min_cpus || cpus > limits.max_cpus {
        return Err(EngineError::InvalidSpec(format!(
            "{cpus} CPUs requested, but Virtualization.framework allows {} to {} on this Mac; choose a CPU count in that range",
            limits.min_cpus, limits.max_cpus
        )));
    }
    let bytes = memory_mib.checked_mul(MIB).ok_or_else(|| {
        EngineError::InvalidSpec(format!(
            "{memory_mib} MiB of memory is not a representable size"
        ))
    })?;
    if bytes < limits.min_memory_bytes || bytes > limits.max_memory_bytes {
        return Err(EngineError::InvalidSpec(format!(
            "{memory_mib} MiB of memory requested, but Virtualization.framework allows {} to {} MiB on this Mac; \
             choose a memory size in that range",
            limits.min_memory_bytes.div_ceil(MIB),
            limits.max_memory_bytes / MIB
        )));
    }
    Ok(())
}

/// The kernel command line: the spec's arguments in order, then the engine's console.
///
/// Arguments are joined with single spaces, so an argument may not be empty or contain whitespace (the
/// kernel would split it); the whole line must fit the kernel's buffer.
pub fn kernel_command_line(args: &[String]) -> Result<String, EngineError> {
    for arg in args {
        if arg.is_empty() {
            return Err(EngineError::InvalidSpec(
                "the kernel command line has an empty argument".into(),
            ));
        }
        if arg.chars().any(|c| c.is_whitespace() || c == '\0') {
            return Err(EngineError::InvalidSpec(format!(
                "kernel argument {arg:?} contains whitespace; the kernel would split it into several arguments"
            )));
        }
    }
    let mut line = args.join(" ");
    if !line.is_empty() {
        line.push(' ');
    }
    line.push_str(CONSOLE_ARG);
    if line.len() >= MAX_CMDLINE_BYTES {
        return Err(EngineError::InvalidSpec(format!(
            "the kernel command line is {} bytes; Linux on arm64 accepts at most {}",
            line.len(),
            MAX_CMDLINE_BYTES - 1
        )));
    }
    Ok(line)
}

/// Checks that `mac` is `xx:xx:xx:xx:xx:xx`, unicast and locally administered (the supervisor generates it).
pub fn validate_mac(mac: &str) -> Result<[u8; 6], EngineError> {
    let bad = || {
        EngineError::InvalidSpec(format!(
            "MAC address {mac:?} is not of the form xx:xx:xx:xx:xx:xx (six hexadecimal bytes)"
        ))
    };
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for byte in &mut out {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if out[0] & 0x01 != 0 {
        return Err(EngineError::InvalidSpec(format!(
            "MAC address {mac} is a multicast address; a NIC needs a unicast one"
        )));
    }
    if out[0] & 0x02 == 0 {
        return Err(EngineError::InvalidSpec(format!(
            "MAC address {mac} is not locally administered (the second-lowest bit of the first byte must be set, e.g. 02:...)"
        )));
    }
    Ok(out)
}

/// Checks the disk image: a regular file whose size VZ accepts (a multiple of 512 bytes, not empty).
pub fn validate_disk(path: &Path) -> Result<(), EngineError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| EngineError::io(format!("disk image {}", path.display()), e))?;
    if !meta.is_file() {
        return Err(EngineError::InvalidSpec(format!(
            "disk image {} is not a regular file",
            path.display()
        )));
    }
    let len = meta.len();
    if len == 0 || len % 512 != 0 {
        return Err(EngineError::InvalidSpec(format!(
            "disk image {} is {len} bytes; Virtualization.framework needs a raw image whose size is a non-zero multiple of 512",
            path.display()
        )));
    }
    Ok(())
}

/// Checks the virtio-fs shares: valid, unique tags (and not the Rosetta tag, which the engine owns when it is
/// enabled), and host paths that are existing directories.
pub fn validate_shares(shares: &[ShareSpec], rosetta: RosettaMode) -> Result<(), EngineError> {
    let mut seen = HashSet::new();
    for share in shares {
        let tag = share.tag.as_str();
        if tag.is_empty() || tag.len() > MAX_TAG_BYTES {
            return Err(EngineError::InvalidSpec(format!(
                "virtio-fs tag {tag:?} must be 1 to {MAX_TAG_BYTES} bytes long"
            )));
        }
        if tag == TAG_ROSETTA && rosetta != RosettaMode::Off {
            return Err(EngineError::InvalidSpec(format!(
                "virtio-fs tag {TAG_ROSETTA:?} is reserved for the Rosetta share"
            )));
        }
        if !seen.insert(tag) {
            return Err(EngineError::InvalidSpec(format!(
                "virtio-fs tag {tag:?} is used by two shares"
            )));
        }
        if !share.host_path.is_dir() {
            return Err(EngineError::InvalidSpec(format!(
                "shared directory {} (tag {tag}) does not exist or is not a directory",
                share.host_path.display()
            )));
        }
    }
    Ok(())
}

/// All plain checks of a spec that do not need the framework.
pub fn validate_spec(spec: &VmSpec) -> Result<String, EngineError> {
    let cmdline = kernel_command_line(&spec.kernel_cmdline)?;
    validate_mac(&spec.network.mac)?;
    for (what, path) in [("kernel", &spec.kernel), ("initrd", &spec.initrd)] {
        if !path.is_file() {
            return Err(EngineError::Missing {
                what: format!("the {what} {}", path.display()),
                hint: "build the guest system first (see the README) or pass the right path".into(),
            });
        }
    }
    validate_disk(&spec.disk.path)?;
    validate_shares(&spec.shares, spec.rosetta)?;
    Ok(cmdline)
}

/// `VZLinuxRosettaAvailability`, as plain data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RosettaAvailability {
    /// Not an Apple silicon Mac, or macOS older than 13.
    NotSupported,
    /// Supported, but Rosetta is not installed.
    NotInstalled,
    Installed,
}

/// Where Rosetta availability comes from (the framework on macOS; a fake in tests).
pub trait RosettaProbe {
    fn availability(&self) -> RosettaAvailability;
    /// Installs Rosetta (only called when the user opted in). Err carries what to tell the user.
    fn install(&self) -> Result<(), String>;
}

/// What the engine does about the Rosetta share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RosettaPlan {
    /// Attach the `rosetta` share.
    pub share: bool,
    /// Something to tell the user (the VM boots anyway).
    pub warning: Option<String>,
}

/// True when the user opted in to installing Rosetta (`DVN_INSTALL_ROSETTA=1`, `true` or `yes`).
pub fn install_opt_in_from_env() -> bool {
    std::env::var(ENV_INSTALL_ROSETTA)
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
        .unwrap_or(false)
}

/// Maps the requested mode and what the Mac offers to a decision. Never fails for `IfAvailable`.
pub fn plan_rosetta(
    mode: RosettaMode,
    probe: &dyn RosettaProbe,
    install_opt_in: bool,
) -> Result<RosettaPlan, EngineError> {
    if mode == RosettaMode::Off {
        return Ok(RosettaPlan {
            share: false,
            warning: None,
        });
    }
    match probe.availability() {
        RosettaAvailability::Installed => Ok(RosettaPlan {
            share: true,
            warning: None,
        }),
        RosettaAvailability::NotSupported => {
            let why = "Rosetta for Linux is not supported on this Mac (it needs Apple silicon and macOS 13 or later)";
            if mode == RosettaMode::Required {
                Err(EngineError::Missing {
                    what: "Rosetta for Linux".into(),
                    hint: format!(
                        "{why}; start the VM without Rosetta (x86_64-linux builds will not run)"
                    ),
                })
            } else {
                Ok(RosettaPlan {
                    share: false,
                    warning: Some(format!("{why}; booting without the rosetta share")),
                })
            }
        }
        RosettaAvailability::NotInstalled if install_opt_in => match probe.install() {
            Ok(()) if probe.availability() == RosettaAvailability::Installed => Ok(RosettaPlan {
                share: true,
                warning: None,
            }),
            outcome => {
                let detail = match outcome {
                    Err(e) => e,
                    Ok(()) => "the installer finished but Rosetta is still not available".into(),
                };
                let msg = format!(
                    "installing Rosetta failed: {detail}; run `{ROSETTA_INSTALL_COMMAND}` yourself"
                );
                if mode == RosettaMode::Required {
                    Err(EngineError::Missing {
                        what: "Rosetta".into(),
                        hint: msg,
                    })
                } else {
                    Ok(RosettaPlan {
                        share: false,
                        warning: Some(format!("{msg}; booting without the rosetta share")),
                    })
                }
            }
        },
        RosettaAvailability::NotInstalled => {
            let hint = format!(
                "install it with `{ROSETTA_INSTALL_COMMAND}` (or set {ENV_INSTALL_ROSETTA}=1 to let darwin-vz-nix run it)"
            );
            if mode == RosettaMode::Required {
                Err(EngineError::Missing {
                    what: "Rosetta".into(),
                    hint,
                })
            } else {
                Ok(RosettaPlan {
                    share: false,
                    warning: Some(format!(
                        "Rosetta is not installed, so x86_64-linux builds will not run in the VM; {hint}"
                    )),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::path::PathBuf;

    const LIMITS: ResourceLimits = ResourceLimits {
        min_cpus: 1,
        max_cpus: 8,
        min_memory_bytes: 128 * MIB,
        max_memory_bytes: 16384 * MIB,
    };

    fn msg(e: EngineError) -> String {
        e.to_string()
    }

    #[test]
    fn resources_in_range_pass() {
        validate_resources(1, 128, &LIMITS).unwrap();
        validate_resources(8, 16384, &LIMITS).unwrap();
        validate_resources(4, 8192, &LIMITS).unwrap();
    }

    #[test]
    fn too_many_cpus_is_an_error_naming_the_range() {
        let m = msg(validate_resources(9, 4096, &LIMITS).unwrap_err());
        assert!(m.contains("9 CPUs"), "{m}");
        assert!(m.contains("1 to 8"), "{m}");
        let m = msg(validate_resources(0, 4096, &LIMITS).unwrap_err());
        assert!(m.contains("0 CPUs"), "{m}");
    }

    #[test]
    fn memory_out_of_range_is_an_error_in_mib() {
        let m = msg(validate_resources(2, 16385, &LIMITS).unwrap_err());
        assert!(m.contains("16385 MiB"), "{m}");
        assert!(m.contains("128 to 16384 MiB"), "{m}");
        assert!(validate_resources(2, 127, &LIMITS).is_err());
        assert!(validate_resources(2, u64::MAX, &LIMITS).is_err());
    }

    #[test]
    fn cmdline_keeps_order_and_appends_console() {
        let args: Vec<String> = [
            "init=/nix/store/abc-system/init",
            "loglevel=4",
            "root=LABEL=nixos",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            kernel_command_line(&args).unwrap(),
            "init=/nix/store/abc-system/init loglevel=4 root=LABEL=nixos console=hvc0"
        );
        assert_eq!(kernel_command_line(&[]).unwrap(), "console=hvc0");
    }

    #[test]
    fn cmdline_rejects_whitespace_empty_and_overlong() {
        assert!(msg(kernel_command_line(&["a b".into()]).unwrap_err()).contains("whitespace"));
        assert!(msg(kernel_command_line(&["".into()]).unwrap_err()).contains("empty"));
        let long = vec!["x".repeat(MAX_CMDLINE_BYTES)];
        assert!(msg(kernel_command_line(&long).unwrap_err()).contains("at most 2047"));
        // Just fits: arg + " console=hvc0" = 2047 bytes.
        let fits = vec!["x".repeat(MAX_CMDLINE_BYTES - 1 - 1 - CONSOLE_ARG.len())];
        assert_eq!(
            kernel_command_line(&fits).unwrap().len(),
            MAX_CMDLINE_BYTES - 1
        );
    }

    #[test]
    fn mac_validation() {
        assert_eq!(
            validate_mac("02:da:72:56:00:01").unwrap(),
            [0x02, 0xda, 0x72, 0x56, 0x00, 0x01]
        );
        assert!(validate_mac("0A:BC:DE:F0:12:34").is_ok());
        assert!(msg(validate_mac("03:00:00:00:00:01").unwrap_err()).contains("multicast"));
        assert!(
            msg(validate_mac("00:1c:42:00:00:01").unwrap_err()).contains("locally administered")
        );
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "02-00-00-00-00-01",
            "02:00:00:00:00:zz",
            "2:00:00:00:00:01",
        ] {
            assert!(
                msg(validate_mac(bad).unwrap_err()).contains("xx:xx"),
                "{bad}"
            );
        }
    }

    #[test]
    fn disk_size_must_be_a_multiple_of_512() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        let f = std::fs::File::create(&p).unwrap();
        assert!(msg(validate_disk(&p).unwrap_err()).contains("multiple of 512"));
        f.set_len(1000).unwrap();
        assert!(msg(validate_disk(&p).unwrap_err()).contains("1000 bytes"));
        f.set_len(1 << 30).unwrap();
        validate_disk(&p).unwrap();
        assert!(validate_disk(&dir.path().join("missing.img")).is_err());
        assert!(msg(validate_disk(dir.path()).unwrap_err()).contains("not a regular file"));
    }

    fn share(tag: &str, path: PathBuf) -> ShareSpec {
        ShareSpec {
            tag: tag.into(),
            host_path: path,
            read_only: true,
        }
    }

    #[test]
    fn share_validation() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        validate_shares(
            &[
                share("nix-store", d.clone()),
                share("dvn-config", d.clone()),
            ],
            RosettaMode::IfAvailable,
        )
        .unwrap();
        let dup = [share("a", d.clone()), share("a", d.clone())];
        assert!(msg(validate_shares(&dup, RosettaMode::Off).unwrap_err()).contains("two shares"));
        assert!(
            msg(
                validate_shares(&[share("rosetta", d.clone())], RosettaMode::Required).unwrap_err()
            )
            .contains("reserved")
        );
        validate_shares(&[share("rosetta", d.clone())], RosettaMode::Off).unwrap();
        assert!(validate_shares(&[share("", d.clone())], RosettaMode::Off).is_err());
        assert!(validate_shares(&[share(&"t".repeat(37), d.clone())], RosettaMode::Off).is_err());
        assert!(
            msg(validate_shares(&[share("x", d.join("nope"))], RosettaMode::Off).unwrap_err())
                .contains("does not exist")
        );
    }

    struct Fake {
        state: Cell<RosettaAvailability>,
        install_result: Result<(), String>,
        installs: Cell<u32>,
    }

    impl Fake {
        fn new(a: RosettaAvailability) -> Self {
            Fake {
                state: Cell::new(a),
                install_result: Ok(()),
                installs: Cell::new(0),
            }
        }
    }

    impl RosettaProbe for Fake {
        fn availability(&self) -> RosettaAvailability {
            self.state.get()
        }
        fn install(&self) -> Result<(), String> {
            self.installs.set(self.installs.get() + 1);
            if self.install_result.is_ok() {
                self.state.set(RosettaAvailability::Installed);
            }
            self.install_result.clone()
        }
    }

    use RosettaAvailability::*;

    #[test]
    fn rosetta_off_never_probes_or_shares() {
        for a in [NotSupported, NotInstalled, Installed] {
            let p = plan_rosetta(RosettaMode::Off, &Fake::new(a), true).unwrap();
            assert_eq!(
                p,
                RosettaPlan {
                    share: false,
                    warning: None
                }
            );
        }
    }

    #[test]
    fn rosetta_installed_is_shared() {
        for mode in [RosettaMode::IfAvailable, RosettaMode::Required] {
            assert_eq!(
                plan_rosetta(mode, &Fake::new(Installed), false).unwrap(),
                RosettaPlan {
                    share: true,
                    warning: None
                }
            );
        }
    }

    #[test]
    fn rosetta_not_supported() {
        let e =
            msg(plan_rosetta(RosettaMode::Required, &Fake::new(NotSupported), true).unwrap_err());
        assert!(e.contains("Apple silicon"), "{e}");
        let p = plan_rosetta(RosettaMode::IfAvailable, &Fake::new(NotSupported), true).unwrap();
        assert!(!p.share);
        assert!(p.warning.unwrap().contains("booting without"));
    }

    #[test]
    fn rosetta_not_installed_names_the_command() {
        let e =
            msg(plan_rosetta(RosettaMode::Required, &Fake::new(NotInstalled), false).unwrap_err());
        assert!(e.contains(ROSETTA_INSTALL_COMMAND), "{e}");
        assert!(e.contains(ENV_INSTALL_ROSETTA), "{e}");
        let fake = Fake::new(NotInstalled);
        let p = plan_rosetta(RosettaMode::IfAvailable, &fake, false).unwrap();
        assert!(!p.share);
        assert!(p.warning.unwrap().contains(ROSETTA_INSTALL_COMMAND));
        assert_eq!(fake.installs.get(), 0, "never installs without opt-in");
    }

    #[test]
    fn rosetta_opt_in_installs() {
        let fake = Fake::new(NotInstalled);
        assert_eq!(
            plan_rosetta(RosettaMode::Required, &fake, true).unwrap(),
            RosettaPlan {
                share: true,
                warning: None
            }
        );
        assert_eq!(fake.installs.get(), 1);

        let failing = Fake {
            install_result: Err("user cancelled".into()),
            ..Fake::new(NotInstalled)
        };
        let e = msg(plan_rosetta(RosettaMode::Required, &failing, true).unwrap_err());
        assert!(
            e.contains("user cancelled") && e.contains(ROSETTA_INSTALL_COMMAND),
            "{e}"
        );
        let p = plan_rosetta(RosettaMode::IfAvailable, &failing, true).unwrap();
        assert!(!p.share && p.warning.unwrap().contains("user cancelled"));
    }
}
