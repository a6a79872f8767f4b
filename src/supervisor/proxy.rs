//! The loopback ssh proxy: accepts connections, holds them while the VM boots (asking the loop for a boot;
//! all held connections share it), then relays them to the guest's sshd over vsock.
//!
//! Bounded: at most `max_connections` relayed and `max_held_connections` held at once; more are closed at
//! once, as are connections during the back-off after a failed boot. The bytes relayed are counted.

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::phase::Event;
use super::{Options, Shared, error_chain};
use crate::control::VmState;
use crate::engine::{EngineError, Machine};
use crate::spec::VSOCK_PORT_SSH;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_connections: u32,
    pub max_held: u32,
}

impl From<&Options> for Limits {
    fn from(o: &Options) -> Self {
        Limits { max_connections: o.max_connections, max_held: o.max_held_connections }
    }
}

/// What to do with a new connection, decided under the view's lock.
enum Admit {
    Relay(Arc<dyn Machine>),
    /// Held until the VM runs; the number of boots ended when it came.
    Hold(u64),
    Refuse(&'static str),
}

pub(crate) fn spawn(listener: TcpListener, shared: Arc<Shared>, limits: Limits) -> std::io::Result<()> {
    thread::Builder::new().name("accept".into()).spawn(move || accept_loop(listener, shared, limits))?;
    Ok(())
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, limits: Limits) {
    let mut last_refusal_logged: Option<Instant> = None;
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!("accept: {err}");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let admitted = admit(&shared, limits);
        let held = matches!(admitted, Admit::Hold(_));
        let spawned = match admitted {
            Admit::Refuse(why) => {
                // One line per second at most: a flood must not flood the log too.
                if last_refusal_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!("connection refused: {why}");
                    last_refusal_logged = Some(Instant::now());
                }
                drop(stream);
                if shared.view().exiting {
                    return;
                }
                continue;
            }
            Admit::Relay(machine) => {
                let shared2 = shared.clone();
                thread::Builder::new().name("proxy".into()).spawn(move || {
                    relay(&shared2, stream, machine.as_ref());
                    release(&shared2, false);
                })
            }
            Admit::Hold(epoch) => {
                let shared2 = shared.clone();
                thread::Builder::new().name("proxy-held".into()).spawn(move || {
                    shared2.post(Event::BootRequested);
                    match wait_until_running(&shared2, epoch) {
                        Some(machine) => {
                            relay(&shared2, stream, machine.as_ref());
                            release(&shared2, false);
                        }
                        None => release(&shared2, true),
                    }
                })
            }
        };
        if let Err(e) = spawned {
            tracing::warn!("connection refused: cannot start a thread ({e})");
            release(&shared, held);
        }
    }
}

fn admit(shared: &Shared, limits: Limits) -> Admit {
    let mut view = shared.view();
    if view.exiting {
        return Admit::Refuse("the supervisor is shutting down");
    }
    if let (VmState::Running, Some(machine)) = (view.state, view.machine.clone()) {
        if view.proxied >= limits.max_connections {
            return Admit::Refuse("too many connections");
        }
        view.proxied += 1;
        view.activity.connections += 1;
        view.activity.last_busy = Instant::now();
        return Admit::Relay(machine);
    }
    if view.held >= limits.max_held {
        return Admit::Refuse("too many connections waiting for the VM to boot");
    }
    if view.state == VmState::Waiting && view.backoff_until.is_some_and(|until| Instant::now() < until) {
        return Admit::Refuse("the last boot failed; see `darwin-vz-nix status`");
    }
    view.held += 1;
    view.activity.connections += 1;
    view.activity.last_busy = Instant::now();
    Admit::Hold(view.boots_ended)
}

/// Gives back a connection's count; the last one tells the loop that the idle clock started.
fn release(shared: &Shared, held: bool) {
    let idle = {
        let mut view = shared.view();
        if held {
            view.held = view.held.saturating_sub(1);
        } else {
            view.proxied = view.proxied.saturating_sub(1);
        }
        view.activity.connections = view.activity.connections.saturating_sub(1);
        view.activity.last_busy = Instant::now();
        view.activity.connections == 0
    };
    if idle {
        shared.post(Event::ConnectionsIdle);
    }
}

/// Waits for a running VM. None if the boot this connection waited for failed or the supervisor exits. On
/// success the connection counts as relayed rather than held.
fn wait_until_running(shared: &Shared, epoch: u64) -> Option<Arc<dyn Machine>> {
    let mut view = shared.view();
    loop {
        if view.exiting {
            return None;
        }
        if let (VmState::Running, Some(machine)) = (view.state, view.machine.clone()) {
            view.held -= 1;
            view.proxied += 1;
            return Some(machine);
        }
        if view.boots_ended != epoch {
            // A boot ended and no VM runs: it failed.
            return None;
        }
        if view.state == VmState::Waiting {
            // The loop merges these; asking again covers a request that raced with the end of a stop.
            shared.post(Event::BootRequested);
        }
        view = shared.changed.wait_timeout(view, Duration::from_secs(1)).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
    }
}

fn relay(shared: &Shared, client: TcpStream, machine: &dyn Machine) {
    let _ = client.set_nodelay(true);
    match connect_ssh(machine) {
        Ok(guest) => {
            // Per connection in the log (debug), the running totals in `status`.
            match crate::relay::relay_counted(Box::new(client), Box::new(guest), shared.bytes.clone()) {
                Ok((to_guest, from_guest)) => {
                    tracing::debug!("proxy: connection closed; {to_guest} bytes to the guest, {from_guest} from it")
                }
                Err(err) => tracing::warn!("proxy: {err}"),
            }
        }
        Err(err) => tracing::warn!("proxy: {}", error_chain(&err)),
    }
}

/// sshd may restart inside the guest (e.g. socket activation): retry briefly.
fn connect_ssh(machine: &dyn Machine) -> Result<UnixStream, EngineError> {
    let mut attempt = 0;
    loop {
        match machine.connect(VSOCK_PORT_SSH) {
            Ok(stream) => return Ok(stream),
            Err(err) if attempt >= 20 => return Err(err),
            Err(_) => {
                attempt += 1;
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
