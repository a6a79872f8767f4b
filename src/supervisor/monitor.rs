//! Threads that talk to the guest so the loop never does: the VM's waiter (its end becomes an event), the
//! boot probe (agent, then sshd), the guest monitor (status and clock), poweroff, and the clock test hook.
//! Each agent call has its own deadline (agent::client), and each thread only posts events.

use std::io::Read;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use super::clock::{self, AskPolicy, WallMark};
use super::phase::Event;
use super::{Shared, error_chain};
use crate::agent::client as agent;
use crate::control::ControlReply;
use crate::engine::{Machine, StopReason};
use crate::spec::VSOCK_PORT_SSH;

/// How often the boot probe tries the agent and sshd.
const PROBE_INTERVAL: Duration = Duration::from_millis(50);
const BANNER_TIMEOUT: Duration = Duration::from_secs(5);

/// Held by the phase that owns a thread; dropping it (leaving the phase) stops the thread at its next wait.
pub(crate) struct Cancel(#[allow(dead_code)] Sender<()>);

/// The thread's side of a `Cancel`.
struct Cancelled(Receiver<()>);

impl Cancelled {
    /// Waits `pause`; true once the owner let go.
    fn wait(&self, pause: Duration) -> bool {
        matches!(self.0.recv_timeout(pause), Err(RecvTimeoutError::Disconnected) | Ok(()))
    }
}

fn cancel_pair() -> (Cancel, Cancelled) {
    let (tx, rx) = mpsc::channel();
    (Cancel(tx), Cancelled(rx))
}

/// What the boot probe found.
#[derive(Debug)]
pub(crate) enum Probe {
    AgentReady,
    SshReady,
    /// The engine says this VM can never answer (what stopped answering, and for how long).
    Unrecoverable(String),
}

/// A validated status sample, with the clock offset already worked out.
#[derive(Debug, Clone)]
pub(crate) struct GuestSample {
    pub builds_in_flight: u32,
    pub disk_free_bytes: u64,
    pub guest_ip: Option<String>,
    pub offset_ms: i64,
}

#[derive(Debug)]
pub(crate) enum GuestReport {
    Status(GuestSample),
    ClockSet {
        was_off_ms: i64,
    },
    /// The agent did not answer (or answered nonsense): why.
    Silent(String),
}

/// Turns the VM's end into an event.
pub(crate) fn spawn_waiter(machine: Arc<dyn Machine>, generation: u64, shared: Arc<Shared>) -> std::io::Result<()> {
    thread::Builder::new().name("vm-wait".into()).spawn(move || {
        let reason = match machine.wait(None) {
            Ok(Some(reason)) => reason,
            Ok(None) => StopReason::Error("the engine stopped waiting for the VM".into()),
            Err(e) => StopReason::Error(error_chain(&e)),
        };
        drop(machine);
        shared.post(Event::VmExited { generation, reason });
    })?;
    Ok(())
}

/// Tries the agent until it answers, then sshd; asks the engine whether the VM is beyond repair meanwhile.
pub(crate) fn spawn_probe(machine: Arc<dyn Machine>, generation: u64, shared: Arc<Shared>) -> std::io::Result<Cancel> {
    let (cancel, cancelled) = cancel_pair();
    thread::Builder::new().name("boot-probe".into()).spawn(move || {
        let post = |probe| shared.post(Event::Boot { generation, probe });
        let mut agent_ready = false;
        loop {
            if !agent_ready {
                match agent::hello(machine.as_ref()) {
                    Ok(_) => {
                        agent_ready = true;
                        post(Probe::AgentReady);
                    }
                    Err(e) => {
                        tracing::debug!("boot probe: {}", error_chain(&e));
                        if let Some(what) = machine.unrecoverable() {
                            post(Probe::Unrecoverable(what));
                            return;
                        }
                    }
                }
            }
            // sshd usually answers together with the agent: try it at once rather than a poll later.
            if agent_ready && ssh_banner(machine.as_ref()).is_ok() {
                post(Probe::SshReady);
                return;
            }
            if cancelled.wait(PROBE_INTERVAL) {
                return;
            }
        }
    })?;
    Ok(cancel)
}

/// Reads the first bytes of the guest's sshd: proof that a proxied connection will work.
fn ssh_banner(machine: &dyn Machine) -> std::io::Result<()> {
    let stream = machine.connect(VSOCK_PORT_SSH).map_err(std::io::Error::other)?;
    stream.set_read_timeout(Some(BANNER_TIMEOUT))?;
    let mut banner = [0u8; 4];
    // At most 4 reads of BANNER_TIMEOUT each, on the probe thread only.
    (&stream).read_exact(&mut banner)?;
    if &banner == b"SSH-" { Ok(()) } else { Err(std::io::Error::other("not an ssh banner")) }
}

/// Wakes every `interval` and asks the agent for status when `policy` says so (the first round, while the VM
/// is used, after a host clock jump, else rarely), and sets the guest clock when the clock policy says so.
pub(crate) fn spawn_monitor(
    machine: Arc<dyn Machine>,
    generation: u64,
    shared: Arc<Shared>,
    interval: Duration,
    policy: AskPolicy,
) -> std::io::Result<Cancel> {
    let (cancel, cancelled) = cancel_pair();
    thread::Builder::new().name("guest-monitor".into()).spawn(move || {
        let post = |report| shared.post(Event::Guest { generation, report });
        let mut last_sync: Option<Instant> = None;
        let mut last_answer: Option<Instant> = None;
        let mut mark = WallMark::now();
        // A sleep seen at a wake is remembered until the agent has answered after it.
        let mut slept = false;
        loop {
            let now = WallMark::now();
            let jumped = mark.jumped_until(&now);
            slept |= mark.slept_until(&now);
            mark = now;
            let idle_for = shared.view().activity.idle_for(now.mono);
            if policy.should_ask(last_answer.map(|t| t.elapsed()), jumped, idle_for) {
                let before = clock::now_unix_ms();
                match agent::status(machine.as_ref()) {
                    Ok(status) => {
                        last_answer = Some(Instant::now());
                        let offset_ms = clock::offset_ms(status.unix_ms, before, clock::now_unix_ms());
                        post(GuestReport::Status(GuestSample {
                            builds_in_flight: status.builds_in_flight,
                            disk_free_bytes: status.disk_free_bytes,
                            guest_ip: status.guest_ip,
                            offset_ms,
                        }));
                        let since_sync = last_sync.map_or(Duration::MAX, |t| t.elapsed());
                        if clock::needs_sync(offset_ms, since_sync, std::mem::take(&mut slept)) {
                            match agent::set_time(machine.as_ref(), clock::now_unix_ms()) {
                                Ok(set) => {
                                    last_sync = Some(Instant::now());
                                    post(GuestReport::ClockSet { was_off_ms: set.offset_ms });
                                }
                                Err(e) => tracing::warn!("setting the guest clock: {}", error_chain(&e)),
                            }
                        }
                    }
                    // Asked again at the next wake.
                    Err(e) => post(GuestReport::Silent(error_chain(&e))),
                }
            }
            if cancelled.wait(interval) {
                return;
            }
        }
    })?;
    Ok(cancel)
}

/// The agent's poweroff, else the power button. The loop's deadline takes over if neither works.
pub(crate) fn spawn_poweroff(machine: Arc<dyn Machine>) -> std::io::Result<()> {
    thread::Builder::new().name("poweroff".into()).spawn(move || {
        if let Err(e) = agent::poweroff(machine.as_ref()) {
            tracing::warn!("agent poweroff failed ({}); pressing the power button", error_chain(&e));
            if let Err(e) = machine.request_stop() {
                tracing::warn!("pressing the power button: {}", error_chain(&e));
            }
        }
    })?;
    Ok(())
}

/// Test hook: moves the guest clock by `seconds`, answering on `reply`.
pub(crate) fn shift_clock(machine: Arc<dyn Machine>, seconds: i64, reply: Sender<ControlReply>) {
    let spawned = thread::Builder::new().name("shift-clock".into()).spawn({
        let reply = reply.clone();
        move || {
            let target = seconds.checked_mul(1000).and_then(|ms| clock::now_unix_ms().checked_add(ms));
            let answer = match target {
                None => ControlReply::error("the shift is out of range"),
                Some(unix_ms) => match agent::set_time(machine.as_ref(), unix_ms) {
                    Ok(_) => ControlReply::ok(),
                    Err(e) => ControlReply::error(error_chain(&e)),
                },
            };
            let _ = reply.send(answer);
        }
    });
    if let Err(e) = spawned {
        let _ = reply.send(ControlReply::error(format!("cannot start a thread: {e}")));
    }
}
