//! The framework's delegates: the VZVirtualMachineDelegate turns stop callbacks into the engine's
//! [`StopState`]; the VZVirtioSocketListenerDelegate hands guest-initiated connections to a channel. Their
//! methods run on the VM's dispatch queue.

use std::os::unix::net::UnixStream;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use objc2::rc::Retained;
use objc2::runtime::Bool;
use objc2::{AnyThread, DefinedClass, define_class, msg_send};
use objc2_foundation::{NSError, NSObject, NSObjectProtocol};
use objc2_virtualization::{
    VZVirtioSocketConnection, VZVirtioSocketDevice, VZVirtioSocketListener, VZVirtioSocketListenerDelegate, VZVirtualMachine,
    VZVirtualMachineDelegate,
};

use super::config::describe;
use super::plumbing::{self, StopState};
use crate::engine::StopReason;

pub(super) struct Ivars {
    stop: Arc<StopState>,
}

define_class!(
    // SAFETY: NSObject has no subclassing requirements and `Delegate` does not implement Drop.
    #[unsafe(super(NSObject))]
    #[name = "DarwinVzNixVmDelegate"]
    #[ivars = Ivars]
    pub(super) struct Delegate;

    unsafe impl NSObjectProtocol for Delegate {}

    unsafe impl VZVirtualMachineDelegate for Delegate {
        #[unsafe(method(guestDidStopVirtualMachine:))]
        fn guest_did_stop(&self, _vm: &VZVirtualMachine) {
            tracing::info!("the guest powered off");
            self.ivars().stop.set(StopReason::GuestShutdown);
        }

        #[unsafe(method(virtualMachine:didStopWithError:))]
        fn did_stop_with_error(&self, _vm: &VZVirtualMachine, error: &NSError) {
            let msg = describe(error);
            tracing::error!("the VM stopped with an error: {msg}");
            self.ivars().stop.set(StopReason::Error(msg));
        }
    }
);

impl Delegate {
    pub(super) fn new(stop: Arc<StopState>) -> Retained<Self> {
        let this = Self::alloc().set_ivars(Ivars { stop });
        // SAFETY: NSObject's designated initializer.
        unsafe { msg_send![super(this), init] }
    }
}

pub(super) struct PortIvars {
    port: u32,
    /// Taken (dropped) when the machine goes, which ends the receiver's stream of connections.
    connections: Mutex<Option<Sender<UnixStream>>>,
}

define_class!(
    // SAFETY: NSObject has no subclassing requirements and `PortDelegate` does not implement Drop.
    #[unsafe(super(NSObject))]
    #[name = "DarwinVzNixPortDelegate"]
    #[ivars = PortIvars]
    pub(super) struct PortDelegate;

    unsafe impl NSObjectProtocol for PortDelegate {}

    unsafe impl VZVirtioSocketListenerDelegate for PortDelegate {
        #[unsafe(method(listener:shouldAcceptNewConnection:fromSocketDevice:))]
        fn should_accept(
            &self,
            _listener: &VZVirtioSocketListener,
            connection: &VZVirtioSocketConnection,
            _device: &VZVirtioSocketDevice,
        ) -> Bool {
            Bool::new(self.accept(connection))
        }
    }
);

impl PortDelegate {
    /// Whether the connection was handed on.
    fn accept(&self, connection: &VZVirtioSocketConnection) -> bool {
        let ivars = self.ivars();
        let sender = ivars.connections.lock().unwrap_or_else(|e| e.into_inner());
        let Some(sender) = sender.as_ref() else { return false };
        // Our own descriptor: the connection object closes its one when it is released.
        // SAFETY: `connection` is alive for this call, so its descriptor is open.
        match unsafe { plumbing::dup_stream(connection.fileDescriptor()) } {
            Ok(stream) => sender.send(stream).is_ok(),
            Err(e) => {
                tracing::warn!("guest connection to host port {}: {e}", ivars.port);
                false
            }
        }
    }

    pub(super) fn new(port: u32, connections: Sender<UnixStream>) -> Retained<Self> {
        let this = Self::alloc().set_ivars(PortIvars { port, connections: Mutex::new(Some(connections)) });
        // SAFETY: NSObject's designated initializer.
        unsafe { msg_send![super(this), init] }
    }

    /// Refuses further connections and ends the receiver's stream.
    pub(super) fn close(&self) {
        self.ivars().connections.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}
