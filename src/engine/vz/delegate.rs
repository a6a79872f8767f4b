//! The VZVirtualMachineDelegate: turns the framework's stop callbacks into the engine's [`StopState`].
//! Its methods run on the VM's dispatch queue.

use std::sync::Arc;

use objc2::rc::Retained;
use objc2::{AnyThread, DefinedClass, define_class, msg_send};
use objc2_foundation::{NSError, NSObject, NSObjectProtocol};
use objc2_virtualization::{VZVirtualMachine, VZVirtualMachineDelegate};

use super::config::describe;
use super::plumbing::StopState;
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
