//! The guest's read-only window on the host's Nix store: every connection the guest opens to host vsock port
//! [`VSOCK_PORT_HOST_STORE`] is served by the worker-protocol filter ([`crate::store_filter`]) on a thread of
//! its own, until the VM is gone.

use std::io;
use std::sync::Arc;
use std::thread;

use super::error_chain;
use crate::engine::Machine;
use crate::spec::VSOCK_PORT_HOST_STORE;
use crate::store_filter::{self, FilterContext};

/// Serves the guest's store queries of one VM: returns at once; the threads end with the VM (its engine
/// closes the channel of connections) or with each connection.
pub(crate) fn spawn(machine: &dyn Machine, filter: Arc<FilterContext>) -> io::Result<()> {
    let Some(connections) = machine.guest_connections(VSOCK_PORT_HOST_STORE) else {
        tracing::warn!("the engine offers no host port {VSOCK_PORT_HOST_STORE}: store inputs will be uploaded");
        return Ok(());
    };
    thread::Builder::new().name("host-store".into()).spawn(move || {
        for guest in connections {
            let filter = filter.clone();
            let served = thread::Builder::new().name("host-store-conn".into()).spawn(move || match store_filter::serve(guest, &filter) {
                Ok(summary) => tracing::debug!("host store queries: connection ended: {summary:?}"),
                Err(e) => tracing::warn!("host store queries: {}", error_chain(&e)),
            });
            if let Err(e) = served {
                tracing::warn!("host store queries: no thread for a connection: {e}");
            }
        }
    })?;
    Ok(())
}
