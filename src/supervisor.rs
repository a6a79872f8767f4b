//! The supervisor owns one VM's lifecycle: the loopback ssh proxy, booting (at once or on the first
//! connection), readiness, the guest clock, idle stop, signals and the control socket.
//!
//! Threads: the main thread owns the VM (QEMU's helpers are tied to the thread that spawns them); an accept
//! thread and one thread per proxied connection; a control-socket thread; a signal thread. They talk to the
//! main thread over a channel and read shared state under one mutex.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::agent::client as agent;
use crate::control::{self, ControlReply, ControlRequest, DiskBytes, StatusReport, VmState};
use crate::engine::{Engine, Machine, StopReason};
use crate::instance::{EffectiveConfig, Layout, disk, write_atomic};
use crate::launch;
use crate::logfile::ReopeningFile;
use crate::progress::Progress;
use crate::spec::{VSOCK_PORT_SSH, VmSpec};

/// How often the guest agent is asked for status (builds, disk, clock).
const STATUS_INTERVAL: Duration = Duration::from_secs(2);
/// The guest clock is set at least this often, and whenever it is off by more than CLOCK_TOLERANCE_MS.
const TIME_SYNC_INTERVAL: Duration = Duration::from_secs(60);
const CLOCK_TOLERANCE_MS: i64 = 250;
/// A wall-clock jump this much larger than monotonic time means the host slept.
const SLEEP_JUMP: Duration = Duration::from_secs(5);
const TICK: Duration = Duration::from_millis(250);
/// A vsock device that takes connections but answers none for this long is stuck; the VM is booted again.
const VSOCK_STUCK_AFTER: Duration = Duration::from_secs(15);
const BOOT_ATTEMPTS: u32 = 3;
/// A running guest whose agent is silent this long is reported in `status` (lastError) and the log.
const AGENT_SILENCE_REPORTED_AFTER: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Options {
    pub verbose: bool,
    /// Longest wait for the guest to become ready (agent + sshd) after the hypervisor started.
    pub boot_timeout: Duration,
    /// Longest wait for a clean guest shutdown before it is forced.
    pub stop_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options { verbose: false, boot_timeout: Duration::from_secs(300), stop_timeout: Duration::from_secs(60) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("the VM did not boot: {0}")]
    Boot(String),
    #[error("the VM did not boot: {1} stopped answering for {0} s")]
    VsockStuck(u64, String),
    #[error("the VM stopped unexpectedly: {0}")]
    Crashed(String),
    #[error("control socket {path}: {source}")]
    Control { path: String, source: io::Error },
}

enum Event {
    BootRequested,
    Stop { force: bool },
    ShiftClock { seconds: i64, reply: Sender<Result<i64, String>> },
    Signal,
}

struct Live {
    state: VmState,
    machine: Option<Arc<dyn Machine>>,
    connections: u32,
    /// Last moment anything used the VM: a connection opened or closed, or the agent saw a build.
    last_busy: Instant,
    builds_in_flight: u32,
    guest_ip: Option<String>,
    guest_disk_free: Option<u64>,
    clock_offset_ms: Option<i64>,
    vm_started: Option<Instant>,
    boot_count: u32,
    last_boot_seconds: Option<f64>,
    last_error: Option<String>,
    /// Since when the agent has not answered status polls (None while it answers).
    agent_silent_since: Option<Instant>,
    /// Bumped by each finished boot attempt, so waiting connections can tell theirs failed.
    boot_generation: u64,
    exiting: bool,
}

struct Shared {
    live: Mutex<Live>,
    changed: Condvar,
    events: Sender<Event>,
}

impl Shared {
    fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn set_state(&self, state: VmState) {
        self.live().state = state;
        self.changed.notify_all();
    }
}

pub struct Supervisor {
    layout: Layout,
    config: EffectiveConfig,
    spec: VmSpec,
    engine: Box<dyn Engine>,
    options: Options,
    listener: TcpListener,
    shared: Arc<Shared>,
    events: Receiver<Event>,
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
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            live: Mutex::new(Live {
                state: if config.on_demand { VmState::Waiting } else { VmState::Booting },
                machine: None,
                connections: 0,
                last_busy: Instant::now(),
                builds_in_flight: 0,
                guest_ip: None,
                guest_disk_free: None,
                clock_offset_ms: None,
                vm_started: None,
                boot_count: 0,
                last_boot_seconds: None,
                last_error: None,
                agent_silent_since: None,
                boot_generation: 0,
                exiting: false,
            }),
            changed: Condvar::new(),
            events: tx,
        });
        Ok(Supervisor { layout, config, spec, engine, options, listener, shared, events: rx, port })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs until stopped: Ok for every orderly end (request, signal, idle timeout, guest poweroff); Err for a
    /// boot failure or a crash when not on demand.
    pub fn run(mut self) -> Result<(), SupervisorError> {
        self.spawn_signal_thread();
        self.spawn_control_thread()?;
        self.spawn_accept_thread();
        let result = self.main_loop();
        self.shutdown_threads();
        result
    }

    fn main_loop(&mut self) -> Result<(), SupervisorError> {
        if self.config.on_demand {
            tracing::info!("listening on 127.0.0.1:{}; the VM boots at the first connection", self.port);
        } else if let Err(err) = self.boot() {
            // Interrupted while booting is an orderly stop, not a failure.
            return if self.shared.live().exiting { Ok(()) } else { Err(err) };
        }
        let mut last_status = Instant::now();
        let mut last_sync = Instant::now();
        let mut wall_mark = (SystemTime::now(), Instant::now());
        loop {
            match self.events.recv_timeout(TICK) {
                Ok(Event::BootRequested) => {
                    let state = self.shared.live().state;
                    if state == VmState::Waiting {
                        if let Err(err) = self.boot() {
                            if self.shared.live().exiting {
                                return Ok(());
                            }
                            tracing::error!("{err}");
                            if !self.config.on_demand {
                                return Err(err);
                            }
                        }
                        last_status = Instant::now();
                        last_sync = Instant::now();
                    }
                }
                Ok(Event::Stop { force }) => {
                    self.stop_vm(force);
                    return Ok(());
                }
                Ok(Event::Signal) => {
                    tracing::info!("signal received: shutting the guest down");
                    self.stop_vm(false);
                    return Ok(());
                }
                Ok(Event::ShiftClock { seconds, reply }) => {
                    let result = self.with_machine(|m| {
                        agent::set_time(m, now_unix_ms() + seconds * 1000).map(|t| t.offset_ms).map_err(|e| e.to_string())
                    });
                    let _ = reply.send(result.unwrap_or_else(|| Err("the VM is not running".into())));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }

            let Some(machine) = self.shared.live().machine.clone() else { continue };
            if let Ok(Some(reason)) = machine.wait(Some(Duration::ZERO)) {
                self.vm_gone(&reason);
                if self.config.on_demand {
                    continue;
                }
                return match reason {
                    StopReason::GuestShutdown | StopReason::Forced => Ok(()),
                    StopReason::Error(e) => Err(SupervisorError::Crashed(e)),
                };
            }
            let slept = host_slept(&mut wall_mark);
            if last_status.elapsed() >= STATUS_INTERVAL || slept {
                last_status = Instant::now();
                let must_sync = slept || last_sync.elapsed() >= TIME_SYNC_INTERVAL;
                if self.poll_guest(machine.as_ref(), must_sync) {
                    last_sync = Instant::now();
                }
            }
            if self.idle_expired() {
                tracing::info!("idle for {}: stopping the VM", crate::units::format_duration(self.idle_timeout()));
                self.stop_vm(false);
                if !self.config.on_demand {
                    return Ok(());
                }
                tracing::info!("listening on 127.0.0.1:{}; the VM boots at the next connection", self.port);
            }
        }
    }

    fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.config.idle_timeout_seconds)
    }

    fn idle_expired(&self) -> bool {
        let live = self.shared.live();
        !self.idle_timeout().is_zero()
            && live.state == VmState::Running
            && live.connections == 0
            && live.builds_in_flight == 0
            && live.last_busy.elapsed() >= self.idle_timeout()
    }

    fn with_machine<T>(&self, f: impl FnOnce(&dyn Machine) -> T) -> Option<T> {
        let machine = self.shared.live().machine.clone()?;
        Some(f(machine.as_ref()))
    }

    /// Asks the agent for status; corrects the guest clock when it drifted or `force_sync`. Returns whether the
    /// clock was set.
    fn poll_guest(&self, machine: &dyn Machine, force_sync: bool) -> bool {
        let before = now_unix_ms();
        let status = match agent::status(machine) {
            Ok(status) => status,
            Err(err) => {
                let mut live = self.shared.live();
                let since = *live.agent_silent_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= AGENT_SILENCE_REPORTED_AFTER && live.last_error.is_none() {
                    let message = format!(
                        "the guest agent has not answered for {} s ({err}); `darwin-vz-nix stop` and start again if ssh hangs too",
                        since.elapsed().as_secs()
                    );
                    tracing::warn!("{message}");
                    live.last_error = Some(message);
                }
                return false;
            }
        };
        let host_ms = (before + now_unix_ms()) / 2;
        let offset = status.unix_ms - host_ms;
        {
            let mut live = self.shared.live();
            if live.agent_silent_since.take().is_some_and(|since| since.elapsed() >= AGENT_SILENCE_REPORTED_AFTER) {
                live.last_error = None;
            }
            live.builds_in_flight = status.builds_in_flight;
            if status.builds_in_flight > 0 {
                live.last_busy = Instant::now();
            }
            live.guest_disk_free = Some(status.disk_free_bytes);
            live.clock_offset_ms = Some(offset);
            if live.guest_ip != status.guest_ip {
                live.guest_ip = status.guest_ip.clone();
                if let Some(ip) = &status.guest_ip {
                    let _ = write_atomic(&self.layout.guest_ip(), format!("{ip}\n").as_bytes(), 0o644);
                }
            }
        }
        if force_sync || offset.abs() > CLOCK_TOLERANCE_MS {
            match agent::set_time(machine, now_unix_ms()) {
                Ok(set) => {
                    if set.offset_ms.abs() > CLOCK_TOLERANCE_MS {
                        tracing::info!("guest clock was off by {} ms; corrected", set.offset_ms);
                    }
                    // Measured again at the next poll; until then the guest is as close as one round trip.
                    self.shared.live().clock_offset_ms = Some(0);
                    return true;
                }
                Err(err) => tracing::warn!("setting the guest clock: {err}"),
            }
        }
        false
    }

    fn boot(&mut self) -> Result<(), SupervisorError> {
        let boot_started = Instant::now();
        self.shared.set_state(VmState::Booting);
        let progress = Progress::start("booting the VM");
        let mut attempt = 1;
        let result = loop {
            match self.boot_and_wait(&progress, boot_started) {
                Err(SupervisorError::VsockStuck(seconds, what)) if attempt < BOOT_ATTEMPTS => {
                    tracing::warn!("{what} has not answered for {seconds} s; restarting the VM (attempt {})", attempt + 1);
                    attempt += 1;
                }
                other => break other,
            }
        };
        let mut live = self.shared.live();
        live.boot_generation += 1;
        match &result {
            Ok(machine) => {
                let seconds = boot_started.elapsed().as_secs_f64();
                live.machine = Some(machine.clone());
                live.state = VmState::Running;
                live.vm_started = Some(boot_started);
                live.boot_count += 1;
                live.last_boot_seconds = Some(seconds);
                live.last_busy = Instant::now();
                live.last_error = None;
                progress.finish(&format!("ready in {seconds:.1} s: ssh on 127.0.0.1:{}", self.port));
            }
            Err(err) => {
                live.state = if self.config.on_demand { VmState::Waiting } else { VmState::Stopped };
                live.last_error = Some(err.to_string());
                progress.fail(&err.to_string());
            }
        }
        drop(live);
        self.shared.changed.notify_all();
        let machine = result?;
        // Right after boot: the clock, then everything else the agent knows.
        self.poll_guest(machine.as_ref(), true);
        Ok(())
    }

    fn boot_and_wait(&mut self, progress: &Progress, started: Instant) -> Result<Arc<dyn Machine>, SupervisorError> {
        let boot_error = |e: &dyn std::fmt::Display| SupervisorError::Boot(e.to_string());
        launch::write_guest_settings(&self.layout, &self.config, now_unix_ms()).map_err(|e| boot_error(&e))?;
        let boot_number = self.shared.live().boot_count + 1;
        let console = ConsoleSink::open(&self.layout, self.options.verbose, boot_number).map_err(|e| boot_error(&e))?;
        let machine: Arc<dyn Machine> = Arc::from(self.engine.boot(&self.spec, Box::new(console)).map_err(|e| boot_error(&e))?);
        progress.step("waiting for the guest agent");
        let deadline = started + self.options.boot_timeout;
        let mut agent_ready = false;
        let mut unanswered_since: Option<Instant> = None;
        loop {
            if let Ok(event) = self.events.try_recv() {
                match event {
                    Event::Stop { .. } | Event::Signal => {
                        let _ = machine.force_stop();
                        let _ = machine.wait(Some(Duration::from_secs(10)));
                        self.shared.live().exiting = true;
                        return Err(SupervisorError::Boot("stopped while booting".into()));
                    }
                    Event::ShiftClock { reply, .. } => {
                        let _ = reply.send(Err("the VM is still booting".into()));
                    }
                    Event::BootRequested => {}
                }
            }
            if let Ok(Some(reason)) = machine.wait(Some(Duration::ZERO)) {
                return Err(SupervisorError::Boot(format!(
                    "the VM stopped during boot ({reason}); see {}",
                    self.layout.console_log().display()
                )));
            }
            if Instant::now() > deadline {
                let _ = machine.force_stop();
                let _ = machine.wait(Some(Duration::from_secs(10)));
                return Err(SupervisorError::Boot(format!(
                    "the guest was not ready within {} s; see {}",
                    self.options.boot_timeout.as_secs(),
                    self.layout.console_log().display()
                )));
            }
            if !agent_ready {
                match agent::hello(machine.as_ref()) {
                    Ok(_) => {
                        agent_ready = true;
                        unanswered_since = None;
                        progress.step(&format!("agent ready after {:.1} s, waiting for sshd", started.elapsed().as_secs_f64()));
                    }
                    // vhost-device-vsock 0.3.0 occasionally stops answering while a guest boots (about one boot in
                    // fifty here); such a VM never recovers, a new one does.
                    Err(err) if err.is_device_unresponsive() => {
                        let since = *unanswered_since.get_or_insert_with(Instant::now);
                        tracing::debug!("{err}");
                        if since.elapsed() >= VSOCK_STUCK_AFTER {
                            let _ = machine.force_stop();
                            let _ = machine.wait(Some(Duration::from_secs(10)));
                            return Err(SupervisorError::VsockStuck(since.elapsed().as_secs(), err.unresponsive_part()));
                        }
                    }
                    Err(_) => unanswered_since = None,
                }
            }
            // sshd usually answers together with the agent: try it at once rather than a poll later.
            if agent_ready && ssh_banner(machine.as_ref()).is_ok() {
                return Ok(machine);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Clean shutdown: the agent's poweroff, else the ACPI button; forced after the stop timeout.
    fn stop_vm(&mut self, force: bool) {
        let Some(machine) = self.shared.live().machine.clone() else {
            self.shared.live().exiting = true;
            self.shared.changed.notify_all();
            return;
        };
        self.shared.set_state(VmState::Stopping);
        let reason = if force {
            let _ = machine.force_stop();
            machine.wait(Some(Duration::from_secs(10))).ok().flatten()
        } else {
            if let Err(err) = agent::poweroff(machine.as_ref()) {
                tracing::warn!("agent poweroff failed ({err}); pressing the power button");
                let _ = machine.request_stop();
            }
            let deadline = Instant::now() + self.options.stop_timeout;
            let mut reason = None;
            while reason.is_none() && Instant::now() < deadline {
                // A second Ctrl-C or `stop --force` cuts the wait short.
                if let Ok(Event::Signal | Event::Stop { force: true }) = self.events.try_recv() {
                    tracing::warn!("forcing the VM off");
                    let _ = machine.force_stop();
                }
                reason = machine.wait(Some(TICK)).ok().flatten();
            }
            if reason.is_none() {
                tracing::warn!("the guest did not shut down within {} s; forcing it off", self.options.stop_timeout.as_secs());
                let _ = machine.force_stop();
                reason = machine.wait(Some(Duration::from_secs(10))).ok().flatten();
            }
            reason
        };
        self.vm_gone(&reason.unwrap_or(StopReason::Forced));
    }

    fn vm_gone(&self, reason: &StopReason) {
        match reason {
            StopReason::Error(e) => tracing::error!("the VM stopped: {e}"),
            orderly => tracing::info!("{orderly}"),
        }
        let mut live = self.shared.live();
        live.machine = None;
        live.vm_started = None;
        live.builds_in_flight = 0;
        live.guest_ip = None;
        live.clock_offset_ms = None;
        live.agent_silent_since = None;
        live.state = if self.config.on_demand { VmState::Waiting } else { VmState::Stopped };
        if let StopReason::Error(e) = reason {
            live.last_error = Some(e.clone());
        }
        drop(live);
        let _ = fs::remove_file(self.layout.guest_ip());
        self.shared.changed.notify_all();
    }

    fn spawn_signal_thread(&self) {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let events = self.shared.events.clone();
        match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
            Ok(mut signals) => {
                let _ = thread::Builder::new().name("signals".into()).spawn(move || {
                    for _ in signals.forever() {
                        if events.send(Event::Signal).is_err() {
                            break;
                        }
                    }
                });
            }
            Err(err) => tracing::warn!("cannot handle signals: {err}"),
        }
    }

    fn spawn_control_thread(&self) -> Result<(), SupervisorError> {
        let path = self.layout.control_socket();
        let _ = fs::remove_file(&path);
        let control_err = |source| SupervisorError::Control { path: path.display().to_string(), source };
        let listener = UnixListener::bind(&path).map_err(control_err)?;
        let shared = self.shared.clone();
        let base = StatusBase { layout: self.layout.clone(), config: self.config.clone(), port: self.port };
        let _ = thread::Builder::new().name("control".into()).spawn(move || {
            for stream in listener.incoming().flatten() {
                let (shared, base) = (shared.clone(), base.clone());
                thread::spawn(move || {
                    let _ = control::serve_one(stream, |request| handle_control(&shared, &base, request));
                });
            }
        });
        Ok(())
    }

    fn spawn_accept_thread(&self) {
        let listener = match self.listener.try_clone() {
            Ok(l) => l,
            Err(err) => {
                tracing::error!("cannot use the listener: {err}");
                return;
            }
        };
        let shared = self.shared.clone();
        let _ = thread::Builder::new().name("accept".into()).spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        let shared = shared.clone();
                        let _ = thread::Builder::new().name("proxy".into()).spawn(move || proxy_connection(&shared, stream));
                    }
                    Err(err) => {
                        tracing::warn!("accept: {err}");
                        thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        });
    }

    fn shutdown_threads(&self) {
        let mut live = self.shared.live();
        live.exiting = true;
        live.state = VmState::Stopped;
        drop(live);
        self.shared.changed.notify_all();
        let _ = fs::remove_file(self.layout.control_socket());
    }
}

/// True when the wall clock moved more than the monotonic clock since the last call (the host slept).
fn host_slept(mark: &mut (SystemTime, Instant)) -> bool {
    let (wall, mono) = (SystemTime::now(), Instant::now());
    let wall_delta = wall.duration_since(mark.0).unwrap_or_default();
    let mono_delta = mono.duration_since(mark.1);
    *mark = (wall, mono);
    wall_delta > mono_delta + SLEEP_JUMP
}

pub fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Reads the first bytes of the guest's sshd: proof that a proxied connection will work.
fn ssh_banner(machine: &dyn Machine) -> io::Result<()> {
    let mut stream = machine.connect(VSOCK_PORT_SSH).map_err(io::Error::other)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut banner = [0u8; 4];
    stream.read_exact(&mut banner)?;
    if &banner == b"SSH-" { Ok(()) } else { Err(io::Error::other("not an ssh banner")) }
}

/// Holds a connection until the VM runs (booting it on demand), then relays it to the guest's sshd.
fn proxy_connection(shared: &Shared, client: TcpStream) {
    let _ = client.set_nodelay(true);
    {
        let mut live = shared.live();
        live.connections += 1;
        live.last_busy = Instant::now();
    }
    if let Some(machine) = wait_until_running(shared) {
        match connect_ssh(machine.as_ref()) {
            Ok(guest) => {
                let _ = crate::relay::relay(Box::new(client), Box::new(guest));
            }
            Err(err) => tracing::warn!("proxy: {err}"),
        }
    }
    let mut live = shared.live();
    live.connections -= 1;
    live.last_busy = Instant::now();
}

fn wait_until_running(shared: &Shared) -> Option<Arc<dyn Machine>> {
    let mut live = shared.live();
    let mut asked_in_generation = None;
    loop {
        if live.exiting {
            return None;
        }
        match live.state {
            VmState::Running => return live.machine.clone(),
            VmState::Waiting => {
                // A boot we asked for already ended without success: give up on this connection.
                if asked_in_generation.is_some_and(|g| g != live.boot_generation) {
                    return None;
                }
                if asked_in_generation.is_none() {
                    asked_in_generation = Some(live.boot_generation);
                    let _ = shared.events.send(Event::BootRequested);
                }
            }
            VmState::Stopped => return None,
            VmState::Booting | VmState::Stopping => {}
        }
        live = shared.changed.wait_timeout(live, Duration::from_secs(1)).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
    }
}

/// sshd may restart inside the guest (e.g. socket activation): retry briefly.
fn connect_ssh(machine: &dyn Machine) -> Result<std::os::unix::net::UnixStream, crate::engine::EngineError> {
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

#[derive(Clone)]
struct StatusBase {
    layout: Layout,
    config: EffectiveConfig,
    port: u16,
}

fn handle_control(shared: &Shared, base: &StatusBase, request: ControlRequest) -> ControlReply {
    match request {
        ControlRequest::Status => ControlReply { ok: true, error: None, status: Some(live_status(shared, base)) },
        ControlRequest::Stop { force } => {
            let _ = shared.events.send(Event::Stop { force });
            ControlReply { ok: true, error: None, status: None }
        }
        ControlRequest::ShiftGuestClock { seconds } => {
            let (tx, rx) = mpsc::channel();
            let _ = shared.events.send(Event::ShiftClock { seconds, reply: tx });
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(_)) => ControlReply { ok: true, error: None, status: None },
                Ok(Err(e)) => ControlReply { ok: false, error: Some(e), status: None },
                Err(_) => ControlReply { ok: false, error: Some("no answer from the supervisor".into()), status: None },
            }
        }
    }
}

fn live_status(shared: &Shared, base: &StatusBase) -> StatusReport {
    let live = shared.live();
    let idle = (live.state == VmState::Running && live.connections == 0 && live.builds_in_flight == 0)
        .then(|| live.last_busy.elapsed().as_secs_f64());
    StatusReport {
        running: true,
        pid: Some(std::process::id()),
        state_directory: base.layout.root.display().to_string(),
        state: live.state,
        engine: Some(base.config.engine.as_str().to_string()),
        uptime_seconds: live.vm_started.map(|t| t.elapsed().as_secs_f64()),
        ssh_port: Some(base.port),
        guest_ip: live.guest_ip.clone(),
        connections: live.connections,
        builds_in_flight: live.builds_in_flight,
        idle_seconds: idle,
        idle_timeout_seconds: base.config.idle_timeout_seconds,
        clock_offset_ms: live.clock_offset_ms,
        disk_bytes: disk::usage(&base.layout).map(|(allocated, size)| DiskBytes { allocated, size }),
        guest_disk_free_bytes: live.guest_disk_free,
        boot_count: live.boot_count,
        last_boot_seconds: live.last_boot_seconds,
        last_error: live.last_error.clone(),
    }
}

/// Appends the guest console to console.log (with a marker per boot, following rotation), and to stderr with
/// --verbose.
struct ConsoleSink {
    log: ReopeningFile,
    echo: bool,
}

impl ConsoleSink {
    fn open(layout: &Layout, echo: bool, boot_number: u32) -> io::Result<Self> {
        let mut log = ReopeningFile::open(layout.console_log())?;
        let stamp = humantime_utc(SystemTime::now());
        writeln!(log, "\n===== darwin-vz-nix: boot {boot_number} at {stamp} (pid {}) =====", std::process::id())?;
        Ok(ConsoleSink { log, echo })
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.log.write_all(buf)?;
        if self.echo {
            let _ = io::stderr().write_all(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.log.flush()
    }
}

/// RFC 3339 UTC timestamp without a date crate.
pub fn humantime_utc(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_rfc3339() {
        assert_eq!(humantime_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(humantime_utc(UNIX_EPOCH + Duration::from_secs(1_764_079_200)), "2025-11-25T14:00:00Z");
        assert_eq!(humantime_utc(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn sleep_jump_detection() {
        let mut mark = (SystemTime::now(), Instant::now());
        assert!(!host_slept(&mut mark));
        mark.0 -= Duration::from_secs(3600);
        assert!(host_slept(&mut mark), "wall clock ran an hour ahead of monotonic time");
        assert!(!host_slept(&mut mark));
    }
}
