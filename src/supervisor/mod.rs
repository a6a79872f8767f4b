//! The supervisor owns one VM's lifecycle as one state machine (see `phase.rs`): the loopback ssh proxy,
//! booting (at once or on the first connection), readiness, the guest clock, idle stop, signals and the
//! control socket.
//!
//! One loop on the calling thread takes every event and applies one transition function; it owns the VM
//! (QEMU's helpers are tied to the thread that spawns them). Everything else is a small room of its own that
//! only posts events or reads the published view: the proxy (`proxy.rs`), the guest monitor and boot probe
//! (`monitor.rs`), the control socket (`control_socket.rs`), signals, and the VM's exit, which a waiter
//! thread turns into an event. Idle tracking (`idle.rs`) and clock policy (`clock.rs`) are pure functions;
//! the console sink (`console.rs`) caps `console.log`.

pub mod clock;
pub mod console;
mod control_socket;
mod host_store;
pub mod idle;
mod monitor;
mod phase;
mod proxy;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::io;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

pub use clock::now_unix_ms;

use crate::control::VmState;
use crate::engine::{Engine, EngineError, Machine, StopReason};
use crate::instance::{EffectiveConfig, InstanceError, Layout};
use crate::relay::Counters;
use crate::spec::VmSpec;
use idle::Activity;
use phase::{Core, Event};

#[derive(Debug, Clone)]
pub struct Options {
    pub verbose: bool,
    /// Longest wait for the guest to become ready (agent + sshd) after the hypervisor started.
    pub boot_timeout: Duration,
    /// Longest wait for a clean guest shutdown before it is forced.
    pub stop_timeout: Duration,
    /// Longest wait for a VM to go after it was forced off.
    pub force_timeout: Duration,
    /// VMs booted in a row when the engine reports one unrecoverable during boot.
    pub boot_attempts: u32,
    /// How often the guest monitor wakes (a local clock check); `agent_asks` says when it asks the agent for
    /// status (builds, disk, clock).
    pub status_interval: Duration,
    pub agent_asks: clock::AskPolicy,
    /// A running guest whose agent is silent this long is reported in `status` (lastError) and the log.
    pub agent_silence_reported_after: Duration,
    /// Proxied connections at once; more are closed at once.
    pub max_connections: u32,
    /// Connections held while the VM boots; more are closed at once.
    pub max_held_connections: u32,
    /// After a failed on-demand boot, connections are closed for this long, doubling per failure up to
    /// `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Overrides the configured idle timeout (tests use milliseconds).
    pub idle_timeout: Option<Duration>,
    /// console.log rotates to console.log.1 at this size.
    pub console_limit: u64,
    /// Install the SIGINT/SIGTERM/SIGHUP handler (unit tests post the event themselves).
    pub handle_signals: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            verbose: false,
            boot_timeout: Duration::from_secs(300),
            stop_timeout: Duration::from_secs(60),
            force_timeout: Duration::from_secs(10),
            boot_attempts: 3,
            status_interval: Duration::from_secs(2),
            agent_asks: clock::AskPolicy::default(),
            agent_silence_reported_after: Duration::from_secs(30),
            max_connections: 128,
            max_held_connections: 64,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            idle_timeout: None,
            console_limit: console::CONSOLE_LIMIT,
            handle_signals: true,
        }
    }
}

/// Why a boot failed. The engine's own error stays the source, so the whole chain reaches the user.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("writing the guest settings")]
    Settings(#[source] InstanceError),
    #[error("opening the console log")]
    Console(#[source] io::Error),
    #[error("the hypervisor did not start it")]
    Engine(#[source] EngineError),
    #[error("starting a supervisor thread")]
    Thread(#[source] io::Error),
    #[error("the VM stopped during boot; see {console}")]
    Stopped {
        console: String,
        #[source]
        reason: StopReason,
    },
    #[error("the guest was not ready within {seconds} s; see {console}")]
    NotReady { seconds: u64, console: String },
    #[error("{what}, in each of {attempts} VMs booted")]
    Unrecoverable { what: String, attempts: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("the VM did not boot")]
    Boot(#[source] BootError),
    #[error("the VM stopped unexpectedly")]
    Crashed(#[source] StopReason),
    #[error("control socket {path}")]
    Control {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("starting the {0} thread")]
    Thread(&'static str, #[source] io::Error),
    #[error("internal error: no transition from {from:?} to {to:?}")]
    InvalidTransition { from: phase::Label, to: phase::Label },
}

/// An error with its sources, one line: what `status` shows as lastError and the log prints.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// What the loop publishes for the proxy and the control socket, and what the proxy counts. One mutex, held
/// only for plain field updates (never for I/O).
pub(crate) struct View {
    pub state: VmState,
    /// The running VM; Some only while `state` is Running, so a connection that gets it gets a VM the loop
    /// has not started to stop (the idle decision takes the same lock).
    pub machine: Option<Arc<dyn Machine>>,
    pub activity: Activity,
    /// Connections being relayed, and connections held while the VM boots.
    pub proxied: u32,
    pub held: u32,
    /// Bumped when a boot ends, well or not: a held connection that sees it change without a running VM
    /// knows its boot failed.
    pub boots_ended: u64,
    /// After failed boots: connections are refused until then.
    pub backoff_until: Option<Instant>,
    pub exiting: bool,
    pub guest_ip: Option<String>,
    pub guest_disk_free: Option<u64>,
    pub clock_offset_ms: Option<i64>,
    pub vm_started: Option<Instant>,
    pub boot_count: u32,
    pub last_boot_seconds: Option<f64>,
    pub last_error: Option<String>,
}

pub(crate) struct Shared {
    view: Mutex<View>,
    changed: Condvar,
    events: Sender<Event>,
    /// Bytes relayed by the proxy, client -> guest and guest -> client.
    bytes: Counters,
}

impl Shared {
    pub fn view(&self) -> MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn post(&self, event: Event) {
        // The loop is gone only when the supervisor is done: nobody is left to care.
        let _ = self.events.send(event);
    }
}

pub struct Supervisor {
    core: Core,
    listener: TcpListener,
    shared: Arc<Shared>,
    options: Options,
    layout: Layout,
    config: EffectiveConfig,
    port: u16,
}

impl Supervisor {
    pub fn new(
        layout: Layout,
        config: EffectiveConfig,
        spec: VmSpec,
        engine: Box<dyn Engine>,
        listener: TcpListener,
        options: Options,
    ) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let addr = listener.local_addr()?;
        let port = addr.port();
        let now = Instant::now();
        let shared = Arc::new(Shared {
            view: Mutex::new(View {
                state: if config.on_demand { VmState::Waiting } else { VmState::Booting },
                machine: None,
                activity: Activity::new(now),
                proxied: 0,
                held: 0,
                boots_ended: 0,
                backoff_until: None,
                exiting: false,
                guest_ip: None,
                guest_disk_free: None,
                clock_offset_ms: None,
                vm_started: None,
                boot_count: 0,
                last_boot_seconds: None,
                last_error: None,
            }),
            changed: Condvar::new(),
            events: tx,
            bytes: Counters::default(),
        });
        let core = Core::new(layout.clone(), config.clone(), spec, engine, options.clone(), addr, shared.clone(), rx);
        Ok(Supervisor { core, listener, shared, options, layout, config, port })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A way to post events from outside (unit tests: signals).
    #[cfg(test)]
    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Runs until stopped: Ok for every orderly end (request, signal, idle timeout, guest poweroff); Err for a
    /// boot failure or a crash when not on demand.
    pub fn run(self) -> Result<(), SupervisorError> {
        let Supervisor { core, listener, shared, options, layout, config, port } = self;
        if options.handle_signals {
            spawn_signal_thread(shared.clone());
        }
        let socket = layout.control_socket();
        let _ = std::fs::remove_file(&socket);
        let control_err = |source| SupervisorError::Control { path: socket.display().to_string(), source };
        let control = UnixListener::bind(&socket).map_err(control_err)?;
        let base = control_socket::StatusBase { layout: layout.clone(), config: config.clone(), port };
        control_socket::spawn(control, shared.clone(), base).map_err(|e| SupervisorError::Thread("control", e))?;
        proxy::spawn(listener, shared.clone(), proxy::Limits::from(&options)).map_err(|e| SupervisorError::Thread("accept", e))?;
        let result = core.run();
        {
            let mut view = shared.view();
            view.exiting = true;
            view.state = VmState::Stopped;
            view.machine = None;
        }
        shared.changed.notify_all();
        let _ = std::fs::remove_file(&socket);
        result
    }
}

fn spawn_signal_thread(shared: Arc<Shared>) {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(mut signals) => {
            let spawned = thread::Builder::new().name("signals".into()).spawn(move || {
                for _ in signals.forever() {
                    shared.post(Event::Signal);
                }
            });
            if let Err(err) = spawned {
                tracing::warn!("cannot handle signals: {err}");
            }
        }
        Err(err) => tracing::warn!("cannot handle signals: {err}"),
    }
}
