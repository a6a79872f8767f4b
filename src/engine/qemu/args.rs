//! The QEMU command line for a VmSpec: pure, so it is unit-tested without QEMU.

use std::path::{Path, PathBuf};

use crate::spec::VmSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    pub fn host() -> Self {
        if cfg!(target_arch = "aarch64") { Arch::Aarch64 } else { Arch::X86_64 }
    }
    pub fn qemu_binary(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86_64",
            Arch::Aarch64 => "qemu-system-aarch64",
        }
    }
}

/// Unix sockets the helpers serve and QEMU connects to, all inside the spec's runtime dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sockets {
    pub qmp: PathBuf,
    pub vhost_vsock: PathBuf,
    /// Host side of vhost-device-vsock's hybrid vsock (`CONNECT <port>`).
    pub vsock_uds: PathBuf,
    /// One per share, in the order of `spec.shares`.
    pub shares: Vec<PathBuf>,
}

/// A value inside a QEMU `key=value,...` option: a comma is doubled, else `dir,x` would end the value at `dir`.
pub fn qemu_value(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

impl Sockets {
    pub fn in_dir(dir: &Path, share_count: usize) -> Self {
        Sockets {
            qmp: dir.join("qmp.sock"),
            vhost_vsock: dir.join("vhost-vsock.sock"),
            vsock_uds: dir.join("vsock.sock"),
            shares: (0..share_count).map(|i| dir.join(format!("fs{i}.sock"))).collect(),
        }
    }
}

/// QOM id of the vsock device, for asking QEMU whether the guest started it.
pub const VSOCK_DEVICE_ID: &str = "vsock0";

/// `net_fd`: QEMU's end of a connected socket pair whose other end passt serves.
pub fn qemu_args(spec: &VmSpec, arch: Arch, accel: Accel, sockets: &Sockets, net_fd: i32) -> Vec<String> {
    let mem = format!("{}M", spec.memory_mib);
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-serial", "none", "-monitor", "none"]);
    // A guest reboot ends the VM: the supervisor decides what happens next. A kernel panic ends it too, at
    // once and with a failure status (the guest's pvpanic driver tells QEMU); a guest without that driver
    // reboots a second after a panic (`panic=1` below), which also ends the VM instead of hanging it.
    push(&["-no-reboot", "-device", "pvpanic-pci", "-action", "panic=exit-failure"]);
    match (arch, accel) {
        (Arch::X86_64, Accel::Kvm) => push(&["-machine", "q35", "-accel", "kvm", "-cpu", "host"]),
        (Arch::X86_64, Accel::Tcg) => push(&["-machine", "q35", "-accel", "tcg,tb-size=64", "-cpu", "max"]),
        (Arch::Aarch64, Accel::Kvm) => push(&["-machine", "virt", "-accel", "kvm", "-cpu", "host"]),
        // Plain `max` is ~3x slower to boot under TCG (pointer authentication emulation).
        (Arch::Aarch64, Accel::Tcg) => push(&["-machine", "virt", "-accel", "tcg,tb-size=64", "-cpu", "max,pauth-impdef=on"]),
    }
    let cpus = spec.cpus.to_string();
    push(&["-smp", &cpus, "-m", &mem]);
    // vhost-user devices (virtiofs, vsock) need guest RAM the helpers can map.
    let backend = format!("memory-backend-memfd,id=mem,size={mem},share=on");
    push(&["-object", &backend, "-numa", "node,memdev=mem"]);
    let kernel = spec.kernel.display().to_string();
    let initrd = spec.initrd.display().to_string();
    // Ours first: a `panic=` of the system's own kernel-params comes later and wins.
    let mut cmdline = vec!["panic=1".to_string()];
    cmdline.extend(spec.kernel_cmdline.iter().cloned());
    cmdline.push("console=hvc0".into());
    let cmdline = cmdline.join(" ");
    push(&["-kernel", &kernel, "-initrd", &initrd, "-append", &cmdline]);
    // writeback honours the guest's flushes (virtio-blk advertises a write cache), so ext4 and the Nix
    // database stay consistent across a host crash; unsafe or writethrough would trade safety or speed.
    let drive = format!(
        "file={},format=raw,if=none,id=disk0,cache=writeback,discard=unmap{}",
        qemu_value(&spec.disk.path),
        if spec.disk.read_only { ",readonly=on" } else { "" }
    );
    push(&["-drive", &drive, "-device", "virtio-blk-pci,drive=disk0"]);
    let nic = format!("virtio-net-pci,netdev=net0,mac={}", spec.network.mac);
    // passt's user-mode network (no path to the host's loopback), not QEMU's own, whose gateway is the host.
    let netdev = format!("stream,id=net0,server=off,addr.type=fd,addr.str={net_fd}");
    push(&["-netdev", &netdev, "-device", &nic]);
    for (i, (share, socket)) in spec.shares.iter().zip(&sockets.shares).enumerate() {
        let chardev = format!("socket,id=fs{i},path={}", qemu_value(socket));
        let device = format!("vhost-user-fs-pci,chardev=fs{i},tag={}", share.tag);
        push(&["-chardev", &chardev, "-device", &device]);
    }
    let vsock = format!("socket,id=vsock0,path={}", qemu_value(&sockets.vhost_vsock));
    push(&["-chardev", &vsock, "-device", &format!("vhost-user-vsock-pci,chardev=vsock0,id={VSOCK_DEVICE_ID}")]);
    // The console goes to QEMU's stdout, which the engine copies into console.log.
    push(&["-device", "virtio-serial-pci", "-chardev", "stdio,id=con0,signal=off", "-device", "virtconsole,chardev=con0"]);
    push(&["-device", "virtio-rng-pci", "-device", "virtio-balloon-pci"]);
    let qmp = format!("unix:{},server=on,wait=off", qemu_value(&sockets.qmp));
    push(&["-qmp", &qmp]);
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::*;

    fn spec() -> VmSpec {
        VmSpec {
            cpus: 2,
            memory_mib: 1024,
            kernel: "/k".into(),
            initrd: "/i".into(),
            kernel_cmdline: vec!["init=/sys/init".into(), "loglevel=4".into()],
            disk: DiskSpec { path: "/s/disk.img".into(), read_only: false },
            shares: vec![
                ShareSpec { tag: TAG_CONFIG.into(), host_path: "/s/guest-config".into(), read_only: true },
                ShareSpec { tag: TAG_NIX_STORE.into(), host_path: "/nix/store".into(), read_only: true },
            ],
            network: NetworkSpec { mac: "02:00:00:00:00:01".into() },
            rosetta: RosettaMode::Off,
            host_ports: vec![],
            runtime_dir: "/s/run".into(),
            machine_id_file: "/s/machine-identifier".into(),
        }
    }

    fn value_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].as_str()).collect()
    }

    #[test]
    fn command_line_has_every_device_of_the_model() {
        let s = spec();
        let args = qemu_args(&s, Arch::X86_64, Accel::Tcg, &Sockets::in_dir(Path::new("/s/run"), 2), 7);
        assert_eq!(value_after(&args, "-append"), ["panic=1 init=/sys/init loglevel=4 console=hvc0"]);
        assert_eq!(value_after(&args, "-action"), ["panic=exit-failure"], "a kernel panic ends QEMU with a failure");
        assert_eq!(value_after(&args, "-accel"), ["tcg,tb-size=64"]);
        assert_eq!(value_after(&args, "-smp"), ["2"]);
        assert_eq!(value_after(&args, "-m"), ["1024M"]);
        assert!(value_after(&args, "-object")[0].contains("size=1024M,share=on"));
        assert!(value_after(&args, "-drive")[0].starts_with("file=/s/disk.img,format=raw"));
        assert!(value_after(&args, "-drive")[0].contains("cache=writeback"));
        let devices = value_after(&args, "-device");
        assert!(devices.contains(&"vhost-user-fs-pci,chardev=fs0,tag=dvn-config"));
        assert!(devices.contains(&"vhost-user-fs-pci,chardev=fs1,tag=nix-store"));
        assert!(devices.contains(&"vhost-user-vsock-pci,chardev=vsock0,id=vsock0"));
        assert!(devices.contains(&"virtio-net-pci,netdev=net0,mac=02:00:00:00:00:01"));
        assert!(devices.contains(&"virtconsole,chardev=con0"));
        assert!(devices.contains(&"pvpanic-pci"));
        assert_eq!(value_after(&args, "-qmp"), ["unix:/s/run/qmp.sock,server=on,wait=off"]);
    }

    #[test]
    fn commas_in_paths_are_escaped_and_the_network_is_passt() {
        let mut s = spec();
        s.disk.path = "/st,x/disk.img".into();
        let args = qemu_args(&s, Arch::X86_64, Accel::Tcg, &Sockets::in_dir(Path::new("/st,x/run"), 2), 7);
        assert!(value_after(&args, "-drive")[0].starts_with("file=/st,,x/disk.img,format=raw"), "{args:?}");
        assert!(value_after(&args, "-chardev").iter().all(|c| !c.contains("path=") || c.contains("/st,,x/run/")), "{args:?}");
        assert_eq!(value_after(&args, "-qmp"), ["unix:/st,,x/run/qmp.sock,server=on,wait=off"]);
        assert_eq!(value_after(&args, "-netdev"), ["stream,id=net0,server=off,addr.type=fd,addr.str=7"]);
        assert!(!args.iter().any(|a| a.starts_with("user,")), "QEMU's user network maps its gateway to the host's loopback");
    }

    #[test]
    fn kvm_uses_the_host_cpu() {
        let args = qemu_args(&spec(), Arch::X86_64, Accel::Kvm, &Sockets::in_dir(Path::new("/r"), 2), 7);
        assert_eq!(value_after(&args, "-accel"), ["kvm"]);
        assert_eq!(value_after(&args, "-cpu"), ["host"]);
        let arm = qemu_args(&spec(), Arch::Aarch64, Accel::Tcg, &Sockets::in_dir(Path::new("/r"), 2), 7);
        assert_eq!(value_after(&arm, "-machine"), ["virt"]);
    }

    #[test]
    fn no_share_means_no_fs_device() {
        let mut s = spec();
        s.shares.truncate(1);
        let args = qemu_args(&s, Arch::X86_64, Accel::Tcg, &Sockets::in_dir(Path::new("/r"), 1), 7);
        assert!(!args.iter().any(|a| a.contains("tag=nix-store")));
    }
}
