//! The machine of phases: one loop takes every event, one transition function applies it, and every change
//! of phase is checked against one table (`valid_transition`).
//!
//! ```text
//!               BootRequested (on demand)         SshReady
//!   Waiting ───────────────────────────▶ Booting ─────────▶ Running
//!     ▲  ▲  ◀── boot failed (back-off) ──  │                  │  │
//!     │  │                                 │ stop, signal,    │  │ idle, stop, signal
//!     │  │                                 │ deadline,        │  │
//!     │  │   VM exited (on demand)         │ unrecoverable    │  │ VM exited: on demand → Waiting,
//!     │  └─────────────────────────────────┼──────────────────┘  │ else → Exiting
//!     │                                    ▼                     ▼
//!     │ ◀── VM gone, then = Wait ───── Stopping {then} ◀─────────┘
//!     │                                    │  └── VM gone, then = Boot | Retry ──▶ Booting
//!     │ stop, signal                       │ VM gone, then = Exit | Fail (not on demand)
//!     ▼                                    ▼
//!   Exiting ◀──────────────────────────────┘
//! ```
//!
//! While stopping, `then` says what follows, and later events change it rather than being lost: a `stop` or a
//! signal during an idle stop makes it Exit (a second one forces the VM off), a connection makes it Boot.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use super::console::ConsoleSink;
use super::host_store;
use super::monitor::{self, Cancel, GuestReport, Probe};
use super::{BootError, Options, Shared, SupervisorError, error_chain};
use crate::control::{ControlReply, VmState};
use crate::engine::{Engine, Machine, StopReason};
use crate::instance::{EffectiveConfig, Layout, write_atomic};
use crate::launch;
use crate::progress::Progress;
use crate::spec::VmSpec;
use crate::store_filter::{FilterConfig, FilterContext};

/// Everything the loop reacts to. Events from a VM carry its generation, so news from a VM that is gone is
/// recognised and ignored.
pub(crate) enum Event {
    /// A connection waits for a VM.
    BootRequested,
    /// The last connection closed: the idle deadline moved.
    ConnectionsIdle,
    Stop {
        force: bool,
        reply: Sender<ControlReply>,
    },
    ShiftClock {
        seconds: i64,
        reply: Sender<ControlReply>,
    },
    Signal,
    VmExited {
        generation: u64,
        reason: StopReason,
    },
    Boot {
        generation: u64,
        probe: Probe,
    },
    Guest {
        generation: u64,
        report: GuestReport,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    Waiting,
    Booting,
    Running,
    Stopping,
    Exiting,
}

/// The one table of allowed phase changes.
pub fn valid_transition(from: Label, to: Label) -> bool {
    use Label::*;
    matches!(
        (from, to),
        (Waiting, Booting | Exiting)
            | (Booting, Running | Stopping | Waiting | Exiting)
            | (Running, Stopping | Waiting | Exiting)
            | (Stopping, Waiting | Booting | Exiting)
    ) || (from == to && from != Exiting)
}

/// A VM the supervisor started: its machine and generation. A waiter thread turns its end into an event.
struct Vm {
    machine: Arc<dyn Machine>,
    generation: u64,
}

struct Booting {
    vm: Vm,
    attempt: u32,
    /// When this boot sequence (all its attempts) started.
    since: Instant,
    deadline: Instant,
    agent_ready: bool,
    progress: Progress,
    _probe: Cancel,
}

struct Running {
    vm: Vm,
    agent_silent_since: Option<Instant>,
    silence_reported: bool,
    _monitor: Cancel,
}

/// What follows once a stopping VM is gone.
enum Then {
    /// Keep listening (on demand).
    Wait,
    /// A connection came during the stop: boot again.
    Boot,
    /// The engine said the VM cannot recover: the next attempt of the same boot.
    Retry {
        attempt: u32,
        since: Instant,
        progress: Progress,
    },
    /// The boot failed (not ready in time, or unrecoverable too often).
    Fail {
        error: BootError,
        progress: Progress,
    },
    Exit,
}

struct Stopping {
    vm: Vm,
    deadline: Instant,
    forced: bool,
    then: Then,
}

enum Phase {
    Waiting,
    Booting(Booting),
    Running(Running),
    Stopping(Stopping),
    Exiting(Result<(), SupervisorError>),
}

impl Phase {
    fn label(&self) -> Label {
        match self {
            Phase::Waiting => Label::Waiting,
            Phase::Booting(_) => Label::Booting,
            Phase::Running(_) => Label::Running,
            Phase::Stopping(_) => Label::Stopping,
            Phase::Exiting(_) => Label::Exiting,
        }
    }

    /// What `status` shows: a VM replaced after an unrecoverable boot is still "booting".
    fn state(&self) -> VmState {
        match self {
            Phase::Waiting => VmState::Waiting,
            Phase::Booting(_) | Phase::Stopping(Stopping { then: Then::Retry { .. }, .. }) => VmState::Booting,
            Phase::Running(_) => VmState::Running,
            Phase::Stopping(_) => VmState::Stopping,
            Phase::Exiting(_) => VmState::Stopped,
        }
    }

    fn generation(&self) -> Option<u64> {
        match self {
            Phase::Booting(b) => Some(b.vm.generation),
            Phase::Running(r) => Some(r.vm.generation),
            Phase::Stopping(s) => Some(s.vm.generation),
            Phase::Waiting | Phase::Exiting(_) => None,
        }
    }
}

pub(crate) struct Core {
    layout: Layout,
    config: EffectiveConfig,
    spec: VmSpec,
    engine: Box<dyn Engine>,
    options: Options,
    /// The proxy's listening address, for messages.
    addr: SocketAddr,
    idle_timeout: Duration,
    shared: Arc<Shared>,
    events: Receiver<Event>,
    phase: Phase,
    generation: u64,
    /// Failed boot sequences in a row (for the back-off).
    failures: u32,
    /// The filter that serves the guest's read-only store queries, when they are on.
    host_store: Option<Arc<FilterContext>>,
}

impl Core {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        layout: Layout,
        config: EffectiveConfig,
        spec: VmSpec,
        engine: Box<dyn Engine>,
        options: Options,
        addr: SocketAddr,
        shared: Arc<Shared>,
        events: Receiver<Event>,
    ) -> Self {
        let idle_timeout = options.idle_timeout.unwrap_or(Duration::from_secs(config.idle_timeout_seconds));
        let host_store = config
            .host_nix_daemon
            .as_ref()
            .map(|socket| Arc::new(FilterContext::new(FilterConfig::new(socket.clone(), config.host_nix_store.clone()))));
        Core {
            host_store,
            layout,
            config,
            spec,
            engine,
            options,
            addr,
            idle_timeout,
            shared,
            events,
            phase: Phase::Waiting,
            generation: 0,
            failures: 0,
        }
    }

    pub fn run(mut self) -> Result<(), SupervisorError> {
        if self.config.on_demand {
            tracing::info!("listening on {}; the VM boots at the first connection", self.addr);
        } else {
            let next = self.boot(1, Instant::now(), Progress::start("booting the VM"));
            self.enter(Label::Waiting, next);
        }
        loop {
            if let Phase::Exiting(_) = self.phase {
                break;
            }
            let event = match self.next_deadline() {
                None => self.events.recv().ok(),
                Some(deadline) => match self.events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(event) => Some(event),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => Some(Event::Signal),
                },
            };
            self.step(event);
        }
        match std::mem::replace(&mut self.phase, Phase::Waiting) {
            Phase::Exiting(result) => result,
            _ => unreachable!("the loop ends only in Exiting"),
        }
    }

    /// The one transition function: the current phase and an event (None: a deadline passed) give the next
    /// phase, which `enter` checks and publishes.
    fn step(&mut self, event: Option<Event>) {
        let phase = std::mem::replace(&mut self.phase, Phase::Waiting);
        let from = phase.label();
        let next = match event {
            None => self.on_deadline(phase),
            Some(event) => self.on_event(phase, event),
        };
        self.enter(from, next);
    }

    fn enter(&mut self, from: Label, next: Phase) {
        let to = next.label();
        self.phase = if valid_transition(from, to) {
            next
        } else {
            debug_assert!(false, "no transition from {from:?} to {to:?}");
            tracing::error!("internal error: no transition from {from:?} to {to:?}");
            Phase::Exiting(Err(SupervisorError::InvalidTransition { from, to }))
        };
        self.publish();
    }

    /// Makes the phase visible to the proxy and the control socket.
    fn publish(&self) {
        let mut view = self.shared.view();
        view.state = self.phase.state();
        view.machine = match &self.phase {
            Phase::Running(r) => Some(r.vm.machine.clone()),
            _ => None,
        };
        view.exiting = matches!(self.phase, Phase::Exiting(_));
        drop(view);
        self.shared.changed.notify_all();
    }

    fn next_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Booting(b) => Some(b.deadline),
            Phase::Stopping(s) => Some(s.deadline),
            Phase::Running(_) => self.shared.view().activity.deadline(self.idle_timeout),
            Phase::Waiting | Phase::Exiting(_) => None,
        }
    }

    fn on_deadline(&mut self, phase: Phase) -> Phase {
        let now = Instant::now();
        match phase {
            Phase::Booting(b) if now >= b.deadline => {
                let error = BootError::NotReady {
                    seconds: self.options.boot_timeout.as_secs(),
                    console: self.layout.console_log().display().to_string(),
                };
                self.stop(b.vm, Then::Fail { error, progress: b.progress }, true)
            }
            Phase::Running(r) => {
                if !self.begin_idle_stop(now) {
                    return Phase::Running(r);
                }
                tracing::info!("idle for {}: stopping the VM", crate::units::format_duration(self.idle_timeout));
                let then = if self.config.on_demand { Then::Wait } else { Then::Exit };
                self.stop(r.vm, then, false)
            }
            Phase::Stopping(mut s) if now >= s.deadline => {
                if !s.forced {
                    tracing::warn!("the guest did not shut down within {} s; forcing it off", self.options.stop_timeout.as_secs());
                    self.force(&mut s);
                    return Phase::Stopping(s);
                }
                tracing::error!(
                    "the VM did not stop within {} s of being forced off; letting go of it",
                    self.options.force_timeout.as_secs()
                );
                self.vm_gone(&StopReason::Forced);
                self.after_stop(s.then)
            }
            other => other,
        }
    }

    /// The idle decision and the move to Stopping in one step, under the lock the proxy takes to get the
    /// machine: a connection either got the VM before (and so it is not idle), or sees it stopping and waits
    /// for the next boot.
    fn begin_idle_stop(&self, now: Instant) -> bool {
        let mut view = self.shared.view();
        if !view.activity.expired(self.idle_timeout, now) {
            return false;
        }
        view.state = VmState::Stopping;
        view.machine = None;
        true
    }

    fn on_event(&mut self, phase: Phase, event: Event) -> Phase {
        match event {
            Event::Stop { force, reply } => {
                let _ = reply.send(ControlReply::ok());
                self.on_stop(phase, force, false)
            }
            Event::Signal => self.on_stop(phase, false, true),
            Event::BootRequested => match phase {
                Phase::Waiting => self.boot_on_demand(),
                Phase::Stopping(mut s) => {
                    if matches!(s.then, Then::Wait) {
                        s.then = Then::Boot;
                    }
                    Phase::Stopping(s)
                }
                other => other,
            },
            Event::ConnectionsIdle => phase,
            Event::ShiftClock { seconds, reply } => {
                match &phase {
                    Phase::Running(r) => monitor::shift_clock(r.vm.machine.clone(), seconds, reply),
                    _ => {
                        let _ = reply.send(ControlReply::error("the VM is not running"));
                    }
                }
                phase
            }
            Event::VmExited { generation, reason } if phase.generation() == Some(generation) => self.on_vm_exited(phase, reason),
            Event::Boot { generation, probe } if phase.generation() == Some(generation) => match phase {
                Phase::Booting(b) => self.on_probe(b, probe),
                other => other,
            },
            Event::Guest { generation, report } if phase.generation() == Some(generation) => match phase {
                Phase::Running(r) => Phase::Running(self.on_guest(r, report)),
                other => other,
            },
            // News from a VM that is gone.
            Event::VmExited { .. } | Event::Boot { .. } | Event::Guest { .. } => phase,
        }
    }

    /// `stop` (force or not) and signals, in every phase. Nothing is dropped: during a stop they change what
    /// follows it, and a second one (or `stop --force`) pulls the plug.
    fn on_stop(&mut self, phase: Phase, force: bool, signal: bool) -> Phase {
        match phase {
            Phase::Waiting => Phase::Exiting(Ok(())),
            Phase::Booting(b) => {
                // Nothing ran in the guest yet: no clean shutdown to wait for.
                tracing::info!("{} during boot: stopping the VM", if signal { "signal received" } else { "stop requested" });
                b.progress.fail("interrupted");
                self.stop(b.vm, Then::Exit, true)
            }
            Phase::Running(r) => {
                if signal {
                    tracing::info!("signal received: shutting the guest down");
                }
                self.stop(r.vm, Then::Exit, force)
            }
            Phase::Stopping(mut s) => {
                let again = matches!(s.then, Then::Exit);
                if let Then::Retry { progress, .. } | Then::Fail { progress, .. } = std::mem::replace(&mut s.then, Then::Exit) {
                    progress.fail("interrupted");
                }
                if (force || (signal && again)) && !s.forced {
                    self.force(&mut s);
                } else if !again {
                    tracing::info!("stop requested while the VM stops: the supervisor exits once it is down");
                }
                Phase::Stopping(s)
            }
            exiting @ Phase::Exiting(_) => exiting,
        }
    }

    fn on_vm_exited(&mut self, phase: Phase, reason: StopReason) -> Phase {
        match phase {
            Phase::Booting(b) => {
                self.vm_gone(&reason);
                let error = BootError::Stopped { console: self.layout.console_log().display().to_string(), reason };
                self.boot_failed(error, b.progress)
            }
            Phase::Running(_) => {
                self.vm_gone(&reason);
                if self.config.on_demand {
                    tracing::info!("listening on {}; the VM boots at the next connection", self.addr);
                    Phase::Waiting
                } else {
                    match reason {
                        StopReason::Error(_) => Phase::Exiting(Err(SupervisorError::Crashed(reason))),
                        StopReason::GuestShutdown | StopReason::Forced => Phase::Exiting(Ok(())),
                    }
                }
            }
            Phase::Stopping(s) => {
                self.vm_gone(&reason);
                self.after_stop(s.then)
            }
            other => other,
        }
    }

    fn after_stop(&mut self, then: Then) -> Phase {
        match then {
            Then::Wait if self.config.on_demand => {
                tracing::info!("listening on {}; the VM boots at the next connection", self.addr);
                Phase::Waiting
            }
            Then::Wait | Then::Exit => Phase::Exiting(Ok(())),
            Then::Boot => self.boot(1, Instant::now(), Progress::start("booting the VM")),
            Then::Retry { attempt, since, progress } => self.boot(attempt, since, progress),
            Then::Fail { error, progress } => self.boot_failed(error, progress),
        }
    }

    fn on_probe(&mut self, mut b: Booting, probe: Probe) -> Phase {
        match probe {
            Probe::AgentReady => {
                b.agent_ready = true;
                b.progress.step(&format!("agent ready after {:.1} s, waiting for sshd", b.since.elapsed().as_secs_f64()));
                Phase::Booting(b)
            }
            Probe::SshReady => self.booted(b),
            Probe::Unrecoverable(what) if b.attempt < self.options.boot_attempts => {
                tracing::warn!("{what}; restarting the VM (attempt {})", b.attempt + 1);
                let then = Then::Retry { attempt: b.attempt + 1, since: b.since, progress: b.progress };
                self.stop(b.vm, then, true)
            }
            Probe::Unrecoverable(what) => {
                let error = BootError::Unrecoverable { what, attempts: b.attempt };
                self.stop(b.vm, Then::Fail { error, progress: b.progress }, true)
            }
        }
    }

    fn booted(&mut self, b: Booting) -> Phase {
        let seconds = b.since.elapsed().as_secs_f64();
        {
            let mut view = self.shared.view();
            view.vm_started = Some(b.since);
            view.boot_count += 1;
            view.last_boot_seconds = Some(seconds);
            view.activity.last_busy = Instant::now();
            view.last_error = None;
            view.backoff_until = None;
            // In one step with the end of the boot: a held connection that sees the boot ended sees the VM.
            view.boots_ended += 1;
            view.state = VmState::Running;
            view.machine = Some(b.vm.machine.clone());
        }
        self.failures = 0;
        b.progress.finish(&format!("ready in {seconds:.1} s: ssh on {}", self.addr));
        let monitor = monitor::spawn_monitor(
            b.vm.machine.clone(),
            b.vm.generation,
            self.shared.clone(),
            self.options.status_interval,
            self.options.agent_asks,
        );
        match monitor {
            Ok(cancel) => Phase::Running(Running { vm: b.vm, agent_silent_since: None, silence_reported: false, _monitor: cancel }),
            Err(e) => {
                tracing::error!("cannot watch the guest ({e}); stopping it");
                self.stop(b.vm, Then::Exit, false)
            }
        }
    }

    fn on_guest(&mut self, mut r: Running, report: GuestReport) -> Running {
        match report {
            GuestReport::Status(sample) => {
                let was_reported = std::mem::take(&mut r.silence_reported);
                r.agent_silent_since = None;
                let ip_changed = {
                    let mut view = self.shared.view();
                    if was_reported {
                        view.last_error = None;
                    }
                    view.activity.builds_in_flight = sample.builds_in_flight;
                    if sample.builds_in_flight > 0 {
                        view.activity.last_busy = Instant::now();
                    }
                    view.guest_disk_free = Some(sample.disk_free_bytes);
                    view.clock_offset_ms = Some(sample.offset_ms);
                    let changed = view.guest_ip != sample.guest_ip;
                    view.guest_ip = sample.guest_ip.clone();
                    changed
                };
                // File I/O after the lock is released.
                if ip_changed && let Some(ip) = &sample.guest_ip {
                    let _ = write_atomic(&self.layout.guest_ip(), format!("{ip}\n").as_bytes(), 0o644);
                }
            }
            GuestReport::ClockSet { was_off_ms } => {
                if was_off_ms.unsigned_abs() > super::clock::TOLERANCE_MS as u64 {
                    tracing::info!("guest clock was off by {was_off_ms} ms; corrected");
                }
                // Measured again at the next poll; until then the guest is as close as one round trip.
                self.shared.view().clock_offset_ms = Some(0);
            }
            GuestReport::Silent(error) => {
                let since = *r.agent_silent_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.options.agent_silence_reported_after && !r.silence_reported {
                    let message = format!(
                        "the guest agent has not answered for {} s ({error}); `darwin-vz-nix stop` and start again if ssh hangs too",
                        since.elapsed().as_secs()
                    );
                    tracing::warn!("{message}");
                    r.silence_reported = true;
                    self.shared.view().last_error = Some(message);
                }
            }
        }
        r
    }

    fn boot_on_demand(&mut self) -> Phase {
        let backoff = self.shared.view().backoff_until;
        if backoff.is_some_and(|until| Instant::now() < until) {
            // Connections are refused until then; this request came before the refusal could be seen.
            return Phase::Waiting;
        }
        self.boot(1, Instant::now(), Progress::start("booting the VM"))
    }

    /// Starts one boot attempt. The engine call is the one bounded blocking call on the loop: the VM's helper
    /// processes are tied to this thread.
    fn boot(&mut self, attempt: u32, since: Instant, progress: Progress) -> Phase {
        self.generation += 1;
        let generation = self.generation;
        if let Err(e) = launch::write_guest_settings(&self.layout, &self.config, super::now_unix_ms()) {
            return self.boot_failed(BootError::Settings(e), progress);
        }
        let boot_number = self.shared.view().boot_count + 1;
        let console = match ConsoleSink::open(&self.layout.console_log(), self.options.verbose, boot_number, self.options.console_limit) {
            Ok(console) => console,
            Err(e) => return self.boot_failed(BootError::Console(e), progress),
        };
        // Show "booting" while the engine works.
        self.shared.view().state = VmState::Booting;
        let machine: Arc<dyn Machine> = match self.engine.boot(&self.spec, Box::new(console)) {
            Ok(machine) => Arc::from(machine),
            Err(e) => return self.boot_failed(BootError::Engine(e), progress),
        };
        let vm = Vm { machine, generation };
        if let Some(filter) = &self.host_store
            && let Err(e) = host_store::spawn(&*vm.machine, filter.clone())
        {
            // Builds still work: their inputs are uploaded instead.
            tracing::warn!("cannot serve the guest's host-store queries: {e}");
        }
        let probe = monitor::spawn_waiter(vm.machine.clone(), generation, self.shared.clone())
            .and_then(|()| monitor::spawn_probe(vm.machine.clone(), generation, self.shared.clone()));
        let probe = match probe {
            Ok(cancel) => cancel,
            Err(e) => {
                let _ = vm.machine.force_stop();
                let _ = vm.machine.wait(Some(self.options.force_timeout));
                return self.boot_failed(BootError::Thread(e), progress);
            }
        };
        progress.step("waiting for the guest agent");
        let deadline = since + self.options.boot_timeout;
        Phase::Booting(Booting { vm, attempt, since, deadline, agent_ready: false, progress, _probe: probe })
    }

    /// A boot sequence failed: reported once; on demand the supervisor keeps listening (connections held for
    /// this boot are closed and new ones refused for a back-off that doubles per failure), else it exits.
    fn boot_failed(&mut self, error: BootError, progress: Progress) -> Phase {
        let error = SupervisorError::Boot(error);
        let message = error_chain(&error);
        progress.fail(&message);
        let mut view = self.shared.view();
        view.last_error = Some(message);
        view.boots_ended += 1;
        if !self.config.on_demand {
            return Phase::Exiting(Err(error));
        }
        self.failures = self.failures.saturating_add(1);
        let backoff = self.options.backoff_base.saturating_mul(1 << (self.failures - 1).min(16)).min(self.options.backoff_max);
        view.backoff_until = Some(Instant::now() + backoff);
        drop(view);
        tracing::info!("connections are refused for {} s, then the next one boots again", backoff.as_secs_f64());
        Phase::Waiting
    }

    /// Starts stopping `vm`: forced at once, or the agent's poweroff (else the power button) with a deadline.
    fn stop(&mut self, vm: Vm, then: Then, force: bool) -> Phase {
        let mut s = Stopping { vm, deadline: Instant::now() + self.options.stop_timeout, forced: false, then };
        if force {
            self.force(&mut s);
        } else if let Err(e) = monitor::spawn_poweroff(s.vm.machine.clone()) {
            tracing::warn!("cannot ask the guest to power off ({e}); forcing it off");
            self.force(&mut s);
        }
        Phase::Stopping(s)
    }

    fn force(&self, s: &mut Stopping) {
        tracing::warn!("forcing the VM off");
        if let Err(e) = s.vm.machine.force_stop() {
            tracing::error!("forcing the VM off: {}", error_chain(&e));
        }
        s.forced = true;
        s.deadline = Instant::now() + self.options.force_timeout;
    }

    fn vm_gone(&self, reason: &StopReason) {
        match reason {
            StopReason::Error(e) => tracing::error!("the VM stopped: {e}"),
            orderly => tracing::info!("{orderly}"),
        }
        {
            let mut view = self.shared.view();
            view.machine = None;
            view.vm_started = None;
            view.activity.builds_in_flight = 0;
            view.guest_ip = None;
            view.guest_disk_free = None;
            view.clock_offset_ms = None;
            if let StopReason::Error(e) = reason {
                view.last_error = Some(format!("the VM stopped unexpectedly: {e}"));
            }
        }
        let _ = std::fs::remove_file(self.layout.guest_ip());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transition_table() {
        use Label::*;
        let all = [Waiting, Booting, Running, Stopping, Exiting];
        let allowed: Vec<(Label, Label)> =
            all.iter().flat_map(|&a| all.iter().map(move |&b| (a, b))).filter(|&(a, b)| a != b && valid_transition(a, b)).collect();
        assert_eq!(
            allowed,
            [
                (Waiting, Booting),
                (Waiting, Exiting),
                (Booting, Waiting),
                (Booting, Running),
                (Booting, Stopping),
                (Booting, Exiting),
                (Running, Waiting),
                (Running, Stopping),
                (Running, Exiting),
                (Stopping, Waiting),
                (Stopping, Booting),
                (Stopping, Exiting),
            ]
        );
        assert!(!valid_transition(Exiting, Exiting), "nothing follows Exiting");
        assert!(!valid_transition(Waiting, Running), "never running without a boot");
        assert!(!valid_transition(Running, Booting), "a running VM is stopped before another boots");
    }
}
