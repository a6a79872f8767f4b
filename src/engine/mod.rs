//! The engine interface: a VmSpec in, a running Machine out.
//!
//! Two implementations: `qemu` (Linux, and anywhere qemu-system exists) and `vz` (macOS,
//! Virtualization.framework). The supervisor only ever talks to these traits.

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use crate::spec::VmSpec;

pub mod qemu;
/// Virtualization.framework; its plain logic compiles everywhere, its Objective-C parts only on macOS.
pub mod vz;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{what} was not found: {hint}")]
    Missing { what: String, hint: String },
    #[error("invalid VM configuration: {0}")]
    InvalidSpec(String),
    /// A read-only share would in truth be writable by the guest.
    #[error(
        "{virtiofsd} cannot make the '{tag}' share read-only (QEMU's C virtiofsd has no read-only mode), and the guest must not be able to write to it: {hint}"
    )]
    ReadOnlyNotEnforced { virtiofsd: std::path::PathBuf, tag: String, hint: String },
    #[error("the VM could not be started: {0}")]
    Boot(String),
    #[error("guest vsock port {port} is not accepting connections: {reason}")]
    Connect { port: u32, reason: String },
    /// Something on the way to the guest took the request but never answered: not "nobody listens" (which
    /// is immediate), but a device or hypervisor that stopped working.
    #[error("{what} did not answer (connecting to guest vsock port {port})")]
    Unresponsive { port: u32, what: &'static str },
    #[error("the VM is not running")]
    NotRunning,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl EngineError {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        EngineError::Io { context: context.into(), source }
    }
}

/// Which hypervisor to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// Apple Virtualization.framework (macOS on Apple silicon).
    Vz,
    /// QEMU with virtiofsd and vhost-device-vsock (Linux).
    Qemu,
}

impl EngineKind {
    pub fn platform_default() -> Self {
        if cfg!(target_os = "macos") { EngineKind::Vz } else { EngineKind::Qemu }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Vz => "vz",
            EngineKind::Qemu => "qemu",
        }
    }
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StopReason {
    /// The guest powered itself off.
    #[error("the guest shut down")]
    GuestShutdown,
    /// We stopped it (force stop).
    #[error("the VM was forced off")]
    Forced,
    /// The hypervisor reported an error or died.
    #[error("{0}")]
    Error(String),
}

pub trait Engine: Send + Sync {
    /// Whether this engine can run `spec` as described (read-only shares really read-only, ...), checked
    /// before anything is started; `boot` checks it again.
    fn check(&self, _spec: &VmSpec) -> Result<(), EngineError> {
        Ok(())
    }

    /// Boots the VM described by `spec`. Returns once the hypervisor runs the guest (not once the guest is ready).
    /// Console bytes from the guest are written to `console`.
    fn boot(&self, spec: &VmSpec, console: Box<dyn io::Write + Send>) -> Result<Box<dyn Machine>, EngineError>;
}

pub trait Machine: Send + Sync {
    /// Opens a stream to a vsock port in the guest.
    fn connect(&self, port: u32) -> Result<UnixStream, EngineError>;
    /// Asks the guest to power off (ACPI power button or its VZ equivalent). Returns at once.
    fn request_stop(&self) -> Result<(), EngineError>;
    /// Stops the VM at once, like pulling the plug.
    fn force_stop(&self) -> Result<(), EngineError>;
    /// Waits until the VM has stopped, at most `timeout` (None = forever). Ok(None) on timeout.
    fn wait(&self, timeout: Option<Duration>) -> Result<Option<StopReason>, EngineError>;
    /// The connections the guest opens to host vsock port `port` (one of `VmSpec::host_ports`), in arrival
    /// order; the channel ends when the VM is gone. Each port can be taken once; None for a port not in the
    /// spec or already taken.
    fn guest_connections(&self, port: u32) -> Option<Receiver<UnixStream>>;
    /// Set once the engine knows this VM can never answer again (a device on the way to the guest stopped
    /// working): says what stopped answering and for how long. The supervisor then boots a new VM. Engines
    /// without such a failure mode keep the default.
    fn unrecoverable(&self) -> Option<String> {
        None
    }
}

/// Picks the engine implementation for `kind` on this platform.
pub fn for_kind(kind: EngineKind) -> Result<Box<dyn Engine>, EngineError> {
    match kind {
        EngineKind::Qemu => Ok(Box::new(qemu::QemuEngine::detect()?)),
        #[cfg(target_os = "macos")]
        EngineKind::Vz => Ok(Box::new(vz::VzEngine::new())),
        #[cfg(not(target_os = "macos"))]
        EngineKind::Vz => Err(EngineError::Missing {
            what: "the vz engine (Virtualization.framework)".into(),
            hint: "it exists only on macOS; use --engine qemu on this system".into(),
        }),
    }
}
