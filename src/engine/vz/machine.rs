//! The running VM: a `VZVirtualMachine` owned by one private serial dispatch queue.
//!
//! Every call into the VM object runs on that queue (`exec_sync` for plain calls, `exec_async` + a channel for
//! calls with completion handlers); the delegate and completion handlers also run there. The Objective-C objects
//! are `!Send`, so they live in [`OnQueue`], which is only opened inside closures running on the queue.

use std::fs::File;
use std::io;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use block2::RcBlock;
use dispatch2::{DispatchQueue, DispatchQueueAttr, DispatchRetained};
use objc2::AnyThread;
use objc2::rc::Retained;
use objc2::runtime::ProtocolObject;
use objc2_foundation::NSError;
use objc2_virtualization::{
    VZLinuxRosettaAvailability, VZLinuxRosettaDirectoryShare, VZVirtioSocketConnection, VZVirtioSocketDevice, VZVirtioSocketListener,
    VZVirtualMachine, VZVirtualMachineConfiguration, VZVirtualMachineState,
};

use super::config::{self, describe};
use super::delegate::{Delegate, PortDelegate};
use super::machine_id::{self, Origin};
use super::plumbing::{self, StopState};
use super::rules::{self, ResourceLimits, RosettaAvailability, RosettaProbe};
use crate::engine::{Engine, EngineError, Machine, StopReason};
use crate::spec::VmSpec;

/// How long `start` may take before we give up (the guest kernel has not run yet at that point).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a vsock connect may take; the framework never calls back if nothing listens on the port.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a forced stop may take.
const FORCE_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// If the machine is dropped while the guest still runs: how long the guest gets to power off before the plug is
/// pulled. Dropping a running machine is a supervisor bug or a panic; this is only the safety net.
const DROP_GRACE: Duration = Duration::from_secs(30);
/// How long to wait for the console copier to drain after the VM is released.
const CONSOLE_DRAIN: Duration = Duration::from_secs(2);

/// A value that may only be used on the VM's queue. Sending it between threads is fine because it is opened
/// (`get`) only inside closures the queue runs, one at a time.
struct OnQueue<T>(T);
// SAFETY: see the type's documentation; every `get` is inside an exec_sync/exec_async closure on the serial queue.
unsafe impl<T> Send for OnQueue<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for OnQueue<T> {}

impl<T> OnQueue<T> {
    /// # Safety
    /// Call only on the VM's queue.
    unsafe fn get(&self) -> &T {
        &self.0
    }
}

struct Vm {
    vm: Retained<VZVirtualMachine>,
    /// VZVirtualMachine holds its delegate weakly: keep it alive as long as the VM.
    _delegate: Retained<Delegate>,
}

/// The limits Virtualization.framework reports on this Mac.
pub fn resource_limits() -> ResourceLimits {
    // SAFETY: class methods without arguments.
    unsafe {
        ResourceLimits {
            min_cpus: VZVirtualMachineConfiguration::minimumAllowedCPUCount() as u64,
            max_cpus: VZVirtualMachineConfiguration::maximumAllowedCPUCount() as u64,
            min_memory_bytes: VZVirtualMachineConfiguration::minimumAllowedMemorySize(),
            max_memory_bytes: VZVirtualMachineConfiguration::maximumAllowedMemorySize(),
        }
    }
}

/// Runs Apple's installer for Rosetta (`softwareupdate --install-rosetta --agree-to-license`), with the
/// terminal attached so the user sees its progress. For the CLI and for the `DVN_INSTALL_ROSETTA=1` opt-in.
pub fn install_rosetta() -> Result<(), String> {
    let status = Command::new("/usr/sbin/softwareupdate")
        .args(["--install-rosetta", "--agree-to-license"])
        .status()
        .map_err(|e| format!("could not run softwareupdate: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("softwareupdate exited with {status}")) }
}

/// Rosetta availability from the framework.
pub struct MacRosettaProbe;

impl RosettaProbe for MacRosettaProbe {
    fn availability(&self) -> RosettaAvailability {
        // SAFETY: class method without arguments.
        match unsafe { VZLinuxRosettaDirectoryShare::availability() } {
            VZLinuxRosettaAvailability::Installed => RosettaAvailability::Installed,
            VZLinuxRosettaAvailability::NotInstalled => RosettaAvailability::NotInstalled,
            _ => RosettaAvailability::NotSupported,
        }
    }

    fn install(&self) -> Result<(), String> {
        install_rosetta()
    }
}

#[derive(Default)]
pub struct VzEngine;

impl VzEngine {
    pub fn new() -> Self {
        VzEngine
    }
}

impl Engine for VzEngine {
    fn boot(&self, spec: &VmSpec, console: Box<dyn io::Write + Send>) -> Result<Box<dyn Machine>, EngineError> {
        // SAFETY: class method without arguments.
        if !unsafe { VZVirtualMachine::isSupported() } {
            return Err(EngineError::Missing {
                what: "virtualization support".into(),
                hint: "Virtualization.framework reports that this Mac cannot run VMs (inside another VM without \
                       nested virtualization?)"
                    .into(),
            });
        }
        let cmdline = rules::validate_spec(spec)?;
        rules::validate_resources(spec.cpus, spec.memory_mib, &resource_limits())?;
        let rosetta = rules::plan_rosetta(spec.rosetta, &MacRosettaProbe, rules::install_opt_in_from_env())?;
        if let Some(w) = &rosetta.warning {
            tracing::warn!("{w}");
        }
        let (machine_id, origin) =
            machine_id::load_or_create(&spec.machine_id_file, config::new_machine_identifier, config::machine_identifier_is_valid)?;
        if origin == Origin::Replaced {
            tracing::warn!("{} was not a valid machine identifier; wrote a new one", spec.machine_id_file.display());
        }

        let (console_read, console_write) = plumbing::cloexec_pipe().map_err(|e| EngineError::io("console pipe", e))?;
        let configuration = config::build(spec, &cmdline, rosetta.share, &machine_id, console_write)?;
        let (_copier, console_done) =
            plumbing::spawn_copier(File::from(console_read), console).map_err(|e| EngineError::io("console thread", e))?;

        let queue = DispatchQueue::new("org.nixos.darwin-vz-nix.vm", DispatchQueueAttr::SERIAL);
        let stop = Arc::new(StopState::new());

        // Create the VM and its delegate on the queue.
        let configuration = OnQueue(configuration);
        let delegate_stop = stop.clone();
        let mut created: Option<OnQueue<Vm>> = None;
        queue.exec_sync(|| {
            // SAFETY: we are on the queue the VM will be bound to.
            let configuration = unsafe { configuration.get() };
            // SAFETY: the configuration was validated; the queue is serial.
            let vm = unsafe { VZVirtualMachine::initWithConfiguration_queue(VZVirtualMachine::alloc(), configuration, &queue) };
            let delegate = Delegate::new(delegate_stop);
            // SAFETY: on the VM's queue; the delegate is kept alive in `Vm`.
            unsafe { vm.setDelegate(Some(ProtocolObject::from_ref(&*delegate))) };
            created = Some(OnQueue(Vm { vm, _delegate: delegate }));
        });
        let vm = Arc::new(created.expect("exec_sync ran the closure"));
        drop(configuration);

        let machine = VzMachine {
            queue,
            vm: Some(vm),
            stop,
            console_done: Mutex::new(Some(console_done)),
            host_ports: spec.host_ports.clone(),
            listeners: Mutex::new(Vec::new()),
        };
        machine.start()?;
        Ok(Box::new(machine))
    }
}

pub struct VzMachine {
    queue: DispatchRetained<DispatchQueue>,
    /// `Option` only so that `Drop` can hand the last reference to the queue.
    vm: Option<Arc<OnQueue<Vm>>>,
    stop: Arc<StopState>,
    console_done: Mutex<Option<mpsc::Receiver<()>>>,
    /// The host ports the guest may connect to (VmSpec::host_ports).
    host_ports: Vec<u32>,
    /// Listeners set on the socket device, with their delegates (held weakly by the listener).
    listeners: Mutex<Vec<OnQueue<PortListener>>>,
}

struct PortListener {
    port: u32,
    _listener: Retained<VZVirtioSocketListener>,
    delegate: Retained<PortDelegate>,
}

type NsErrorResult = Result<(), String>;

impl VzMachine {
    fn vm(&self) -> &Arc<OnQueue<Vm>> {
        self.vm.as_ref().expect("the VM is present until drop")
    }

    /// Runs `f` with the VM on its queue and returns its result.
    fn on_queue<R: Send>(&self, f: impl FnOnce(&VZVirtualMachine) -> R + Send) -> R {
        let vm = self.vm();
        let mut out = None;
        self.queue.exec_sync(|| {
            // SAFETY: this closure runs on the VM's queue.
            let vm = unsafe { vm.get() };
            out = Some(f(&vm.vm));
        });
        out.expect("exec_sync ran the closure")
    }

    /// Calls an asynchronous VM method on the queue, giving it a completion handler that reports back here.
    fn call_async(
        &self,
        timeout: Duration,
        call: impl FnOnce(&VZVirtualMachine, &block2::DynBlock<dyn Fn(*mut NSError)>) + Send + 'static,
    ) -> Option<NsErrorResult> {
        let (tx, rx) = mpsc::channel::<NsErrorResult>();
        let vm = self.vm().clone();
        self.queue.exec_async(move || {
            let handler = RcBlock::new(move |err: *mut NSError| {
                // SAFETY: the framework passes nil or a valid NSError.
                let result = match unsafe { err.as_ref() } {
                    None => Ok(()),
                    Some(e) => Err(describe(e)),
                };
                let _ = tx.send(result);
            });
            // SAFETY: this closure runs on the VM's queue.
            let vm = unsafe { vm.get() };
            call(&vm.vm, &handler);
        });
        rx.recv_timeout(timeout).ok()
    }

    fn start(&self) -> Result<(), EngineError> {
        // SAFETY (closure): startWithCompletionHandler on the VM's queue.
        match self.call_async(START_TIMEOUT, |vm, done| unsafe { vm.startWithCompletionHandler(done) }) {
            Some(Ok(())) => Ok(()),
            Some(Err(msg)) => Err(EngineError::Boot(if msg.contains("com.apple.security.virtualization") {
                format!("{msg} (sign the binary with macos/entitlements.plist; see macos/README.md)")
            } else {
                msg
            })),
            None => Err(EngineError::Boot(format!("the VM did not start within {} s", START_TIMEOUT.as_secs()))),
        }
    }

    fn state(&self) -> VZVirtualMachineState {
        // SAFETY: runs on the queue.
        self.on_queue(|vm| unsafe { vm.state() })
    }

    fn is_stopped(&self) -> bool {
        self.stop.get().is_some() || matches!(self.state(), VZVirtualMachineState::Stopped | VZVirtualMachineState::Error)
    }
}

impl Machine for VzMachine {
    fn connect(&self, port: u32) -> Result<UnixStream, EngineError> {
        if self.is_stopped() {
            return Err(EngineError::NotRunning);
        }
        let (tx, rx) = mpsc::channel::<Result<UnixStream, String>>();
        let vm = self.vm().clone();
        self.queue.exec_async(move || {
            // SAFETY: this closure runs on the VM's queue.
            let vm = unsafe { vm.get() };
            // SAFETY: on the VM's queue.
            let devices = unsafe { vm.vm.socketDevices() };
            let Some(device) = devices.firstObject().and_then(|d| d.downcast::<VZVirtioSocketDevice>().ok()) else {
                let _ = tx.send(Err("the VM has no virtio socket device".into()));
                return;
            };
            let handler = RcBlock::new(move |conn: *mut VZVirtioSocketConnection, err: *mut NSError| {
                // SAFETY: the framework passes nil or valid objects.
                let result = match (unsafe { conn.as_ref() }, unsafe { err.as_ref() }) {
                    // Duplicate the descriptor now: the connection closes its own when it is released.
                    // SAFETY: `conn` is alive for this call, so its descriptor is open.
                    (Some(conn), None) => unsafe { plumbing::dup_stream(conn.fileDescriptor()) }.map_err(|e| e.to_string()),
                    (_, Some(e)) => Err(describe(e)),
                    (None, None) => Err("the framework returned neither a connection nor an error".into()),
                };
                let _ = tx.send(result);
            });
            // SAFETY: on the VM's queue; the block is copied by the framework.
            unsafe { device.connectToPort_completionHandler(port, &handler) };
        });
        match rx.recv_timeout(CONNECT_TIMEOUT) {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(reason)) => Err(EngineError::Connect { port, reason }),
            Err(RecvTimeoutError::Timeout) => Err(EngineError::Connect {
                port,
                reason: format!("no answer within {} s (is anything listening in the guest?)", CONNECT_TIMEOUT.as_secs()),
            }),
            Err(RecvTimeoutError::Disconnected) => Err(EngineError::Connect { port, reason: "the connection attempt was dropped".into() }),
        }
    }

    fn guest_connections(&self, port: u32) -> Option<mpsc::Receiver<UnixStream>> {
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY (closure): `get` only reads the port, a plain integer.
        if !self.host_ports.contains(&port) || listeners.iter().any(|l| unsafe { l.get() }.port == port) {
            return None;
        }
        let (tx, rx) = mpsc::channel();
        let listener = self.on_queue(move |vm| {
            // SAFETY: on the VM's queue.
            let devices = unsafe { vm.socketDevices() };
            let device = devices.firstObject().and_then(|d| d.downcast::<VZVirtioSocketDevice>().ok())?;
            let delegate = PortDelegate::new(port, tx);
            // SAFETY: on the VM's queue; the delegate is kept alive in `PortListener` (the listener holds it weakly).
            let listener = unsafe { VZVirtioSocketListener::new() };
            unsafe { listener.setDelegate(Some(ProtocolObject::from_ref(&*delegate))) };
            unsafe { device.setSocketListener_forPort(&listener, port) };
            Some(OnQueue(PortListener { port, _listener: listener, delegate }))
        })?;
        listeners.push(listener);
        Some(rx)
    }

    fn request_stop(&self) -> Result<(), EngineError> {
        if self.stop.get().is_some() {
            return Err(EngineError::NotRunning);
        }
        // SAFETY: runs on the queue.
        self.on_queue(|vm| unsafe {
            if !vm.canRequestStop() {
                return Err(format!("the VM cannot be asked to stop in state {:?}", vm.state()));
            }
            vm.requestStopWithError().map_err(|e| describe(&e))
        })
        .map_err(|msg| EngineError::Boot(format!("asking the guest to power off failed: {msg}")))
    }

    fn force_stop(&self) -> Result<(), EngineError> {
        if self.stop.get().is_some() {
            return Ok(());
        }
        // SAFETY: runs on the queue.
        if !self.on_queue(|vm| unsafe { vm.canStop() }) {
            if self.is_stopped() {
                self.stop.set(StopReason::Forced);
                return Ok(());
            }
            return Err(EngineError::Boot(format!("the VM cannot be stopped in state {:?}", self.state())));
        }
        // SAFETY (closure): stopWithCompletionHandler on the VM's queue.
        match self.call_async(FORCE_STOP_TIMEOUT, |vm, done| unsafe { vm.stopWithCompletionHandler(done) }) {
            Some(Ok(())) => {
                // The delegate is not told about stops we request; record it ourselves.
                self.stop.set(StopReason::Forced);
                Ok(())
            }
            Some(Err(msg)) => Err(EngineError::Boot(format!("stopping the VM failed: {msg}"))),
            None => Err(EngineError::Boot(format!("the VM did not stop within {} s", FORCE_STOP_TIMEOUT.as_secs()))),
        }
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<Option<StopReason>, EngineError> {
        Ok(self.stop.wait(timeout))
    }
}

impl Drop for VzMachine {
    fn drop(&mut self) {
        // Safety net: never let the VM object go while the guest may still be writing its disk.
        if !self.is_stopped() {
            tracing::warn!("the VM is still running while the engine lets go of it; asking the guest to power off");
            let _ = self.request_stop();
            if self.stop.wait(Some(DROP_GRACE)).is_none() {
                tracing::warn!("the guest did not power off within {} s; stopping the VM", DROP_GRACE.as_secs());
                let _ = self.force_stop();
            }
        }
        // Close the host ports (ending their receivers' streams) and release the listeners on the queue.
        let listeners = std::mem::take(&mut *self.listeners.lock().unwrap_or_else(|e| e.into_inner()));
        self.queue.exec_sync(move || {
            for listener in listeners {
                // SAFETY: on the VM's queue.
                unsafe { listener.get() }.delegate.close();
            }
        });
        // Release the VM (and with it the console pipe's write end) on its queue, then let the console drain.
        if let Some(vm) = self.vm.take() {
            self.queue.exec_sync(move || drop(vm));
        }
        if let Some(done) = self.console_done.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = done.recv_timeout(CONSOLE_DRAIN);
        }
    }
}
