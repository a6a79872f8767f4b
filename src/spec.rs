//! VmSpec: the plain description of one VM that every engine consumes.
//!
//! The supervisor builds it from the instance's effective configuration; an engine only translates it
//! into a running VM. Nothing here knows about QEMU or Virtualization.framework.

use std::path::PathBuf;

/// virtio-fs tag of the host's /nix/store (read-only).
pub const TAG_NIX_STORE: &str = "nix-store";
/// virtio-fs tag of the small read-only directory with the guest's keys and settings.
pub const TAG_CONFIG: &str = "dvn-config";
/// virtio-fs tag of the Rosetta runtime (macOS only, optional in the guest).
pub const TAG_ROSETTA: &str = "rosetta";

/// Guest vsock port of sshd (or of the agent's forwarder to sshd).
pub const VSOCK_PORT_SSH: u32 = 22;
/// Guest vsock port of the guest agent: privileged (< 1024), so only guest root can bind it, not a build
/// that outlives the agent.
pub const VSOCK_PORT_AGENT: u32 = 1023;
/// Host vsock port the guest connects to for read-only queries of the host's Nix store (the guest's
/// `local-overlay://` lower store). The only host port a guest may open; see `crate::store_filter`.
pub const VSOCK_PORT_HOST_STORE: u32 = 5000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub cpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Everything the guest needs on its command line except the console, which is the engine's to choose.
    pub kernel_cmdline: Vec<String>,
    pub disk: DiskSpec,
    pub shares: Vec<ShareSpec>,
    pub network: NetworkSpec,
    /// Rosetta share for x86_64 binaries (only the VZ engine can provide it).
    pub rosetta: RosettaMode,
    /// Host vsock ports the guest may connect to (see [`crate::engine::Machine::guest_connections`]). A guest
    /// connection to any other host port is refused.
    pub host_ports: Vec<u32>,
    /// Where engine-private sockets and helper files live (inside the state directory).
    pub runtime_dir: PathBuf,
    /// Files the engine persists across boots (VZ machine identifier); inside the state directory.
    pub machine_id_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Sparse raw image; its size is a multiple of 512.
    pub path: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSpec {
    pub tag: String,
    pub host_path: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    /// Locally administered unicast MAC, stable per instance, e.g. "02:xx:xx:xx:xx:xx".
    pub mac: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RosettaMode {
    Off,
    /// Share Rosetta when it is available; boot without it otherwise.
    IfAvailable,
    /// The user asked for it explicitly: fail when it is unavailable.
    Required,
}
