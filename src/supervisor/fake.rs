//! A fake engine for the supervisor's lifecycle tests: VMs that boot, fail, hang, die and ignore poweroff on
//! command, with a fake agent and a fake sshd over socketpairs. Everything happens in milliseconds.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::agent::protocol::{self, GuestStatus, Hello, Reply, Request, TimeSet};
use crate::engine::{Engine, EngineError, Machine, StopReason};
use crate::spec::{VSOCK_PORT_AGENT, VSOCK_PORT_SSH, VmSpec};

/// How long a `Ready` guest takes to answer after the engine started it.
pub const READY_AFTER: Duration = Duration::from_millis(30);

/// What the next booted VM does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Agent and sshd answer after READY_AFTER.
    Ready,
    /// The engine cannot start it.
    FailToStart,
    /// It runs, but nothing in it ever answers.
    Hang,
    /// It stops by itself during boot.
    DieDuringBoot,
    /// Nothing answers, and the engine says it never will (the stuck vsock device).
    Unrecoverable,
}

/// How the guest takes a poweroff (agent or power button).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poweroff {
    Prompt,
    After(Duration),
    Ignored,
}

#[derive(Debug)]
struct Guest {
    stopped: Option<StopReason>,
    builds: u32,
    silent: bool,
    hostile: bool,
    /// Status requests the agent answered.
    status_asks: u32,
}

pub struct FakeMachine {
    plan: Plan,
    poweroff: Poweroff,
    started: Instant,
    guest: Mutex<Guest>,
    changed: Condvar,
}

impl FakeMachine {
    fn guest(&self) -> std::sync::MutexGuard<'_, Guest> {
        self.guest.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stop(&self, reason: StopReason) {
        let mut guest = self.guest();
        if guest.stopped.is_none() {
            guest.stopped = Some(reason);
        }
        self.changed.notify_all();
    }

    fn stop_later(self: &Arc<Self>, after: Duration, reason: StopReason) {
        let me = self.clone();
        thread::spawn(move || {
            thread::sleep(after);
            me.stop(reason);
        });
    }

    fn power_off(self: &Arc<Self>) {
        match self.poweroff {
            Poweroff::Prompt => self.stop_later(Duration::from_millis(5), StopReason::GuestShutdown),
            Poweroff::After(delay) => self.stop_later(delay, StopReason::GuestShutdown),
            Poweroff::Ignored => {}
        }
    }

    /// The guest dies (kernel panic, hypervisor error).
    pub fn crash(&self) {
        self.stop(StopReason::Error("the fake hypervisor died".into()));
    }

    pub fn set_builds(&self, builds: u32) {
        self.guest().builds = builds;
    }

    pub fn set_silent(&self, silent: bool) {
        self.guest().silent = silent;
    }

    /// The agent sends values no real guest sends.
    pub fn set_hostile(&self, hostile: bool) {
        self.guest().hostile = hostile;
    }

    pub fn status_asks(&self) -> u32 {
        self.guest().status_asks
    }

    pub fn stopped(&self) -> Option<StopReason> {
        self.guest().stopped.clone()
    }

    fn answers(&self) -> bool {
        self.plan == Plan::Ready && self.started.elapsed() >= READY_AFTER
    }

    fn serve_agent(self: Arc<Self>, stream: UnixStream) {
        let mut writer = stream.try_clone().unwrap();
        let mut line = String::new();
        if BufReader::new(stream).read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let reply = match protocol::decode_request(line.trim_end()) {
            Ok(Request::Hello) => Reply::Hello(Hello { agent_version: "fake".into(), hostname: "fake".into() }),
            Ok(Request::Status) => {
                let mut guest = self.guest();
                guest.status_asks += 1;
                let now = super::clock::now_unix_ms();
                Reply::Status(if guest.hostile {
                    GuestStatus {
                        uptime_seconds: 1.0,
                        guest_ip: Some("10.0.2.15\n\u{1b}[31mlast error: forged".into()),
                        disk_free_bytes: u64::MAX,
                        disk_total_bytes: u64::MAX,
                        builds_in_flight: u32::MAX,
                        unix_ms: i64::MIN,
                    }
                } else {
                    GuestStatus {
                        uptime_seconds: 1.0,
                        guest_ip: Some("10.0.2.15".into()),
                        disk_free_bytes: 1 << 30,
                        disk_total_bytes: 2 << 30,
                        builds_in_flight: guest.builds,
                        unix_ms: now,
                    }
                })
            }
            Ok(Request::SetTime { .. }) => Reply::TimeSet(TimeSet { offset_ms: 0 }),
            Ok(Request::Poweroff) => {
                if self.poweroff == Poweroff::Ignored {
                    // Say nothing, keep the connection open until the VM is gone.
                    let mut guest = self.guest();
                    while guest.stopped.is_none() {
                        guest = self.changed.wait(guest).unwrap_or_else(|e| e.into_inner());
                    }
                    return;
                }
                self.power_off();
                Reply::Empty {}
            }
            Err(e) => {
                let _ = protocol::write_message(&mut writer, &protocol::error_response(e.to_string()));
                return;
            }
        };
        let _ = protocol::write_message(&mut writer, &protocol::ok_response(&reply));
    }

    fn serve_ssh(stream: UnixStream) {
        let mut writer = stream.try_clone().unwrap();
        if writer.write_all(b"SSH-2.0-fake\r\n").is_err() {
            return;
        }
        let mut reader = stream;
        let _ = io::copy(&mut reader, &mut writer);
    }
}

/// The engine's handle on a fake VM; the test keeps another through `FakeEngine::machine`.
struct Handle(Arc<FakeMachine>);

impl Machine for Handle {
    fn guest_connections(&self, _port: u32) -> Option<std::sync::mpsc::Receiver<UnixStream>> {
        None
    }

    fn connect(&self, port: u32) -> Result<UnixStream, EngineError> {
        let m = &self.0;
        let refuse = |reason: &str| Err(EngineError::Connect { port, reason: reason.into() });
        if m.stopped().is_some() {
            return Err(EngineError::NotRunning);
        }
        if m.plan == Plan::Unrecoverable {
            return Err(EngineError::Unresponsive { port, what: "the fake vsock device" });
        }
        if !m.answers() {
            return refuse("nothing listens there yet");
        }
        let (host, guest) = UnixStream::pair().map_err(|e| EngineError::io("socketpair", e))?;
        match port {
            VSOCK_PORT_AGENT if m.guest().silent => return refuse("the agent is silent"),
            VSOCK_PORT_AGENT => {
                let m = m.clone();
                thread::spawn(move || m.serve_agent(guest));
            }
            VSOCK_PORT_SSH => {
                thread::spawn(move || FakeMachine::serve_ssh(guest));
            }
            _ => return refuse("no such port"),
        }
        Ok(host)
    }

    fn request_stop(&self) -> Result<(), EngineError> {
        self.0.power_off();
        Ok(())
    }

    fn force_stop(&self) -> Result<(), EngineError> {
        self.0.stop(StopReason::Forced);
        Ok(())
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<Option<StopReason>, EngineError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut guest = self.0.guest();
        loop {
            if let Some(reason) = &guest.stopped {
                return Ok(Some(reason.clone()));
            }
            guest = match deadline {
                None => self.0.changed.wait(guest).unwrap_or_else(|e| e.into_inner()),
                Some(d) if Instant::now() >= d => return Ok(None),
                Some(d) => self.0.changed.wait_timeout(guest, d - Instant::now()).unwrap_or_else(|e| e.into_inner()).0,
            };
        }
    }

    fn unrecoverable(&self) -> Option<String> {
        (self.0.plan == Plan::Unrecoverable).then(|| "the fake vsock device has not answered for 15 s".to_string())
    }
}

#[derive(Default)]
struct Inner {
    plans: Mutex<VecDeque<Plan>>,
    poweroff: Mutex<Option<Poweroff>>,
    machines: Mutex<Vec<Arc<FakeMachine>>>,
    attempts: Mutex<u32>,
    builds_at_boot: Mutex<u32>,
}

#[derive(Clone, Default)]
pub struct FakeEngine {
    inner: Arc<Inner>,
}

impl FakeEngine {
    /// Plans for the next boots, in order; after them every VM is `Ready`.
    pub fn with_plans(plans: &[Plan]) -> Self {
        let engine = FakeEngine::default();
        engine.inner.plans.lock().unwrap().extend(plans);
        engine
    }

    pub fn set_poweroff(&self, poweroff: Poweroff) {
        *self.inner.poweroff.lock().unwrap() = Some(poweroff);
    }

    /// Builds the guests report from their start.
    pub fn set_builds_at_boot(&self, builds: u32) {
        *self.inner.builds_at_boot.lock().unwrap() = builds;
    }

    /// Calls of `boot`, failed ones included.
    pub fn attempts(&self) -> u32 {
        *self.inner.attempts.lock().unwrap()
    }

    /// The n-th VM that started (0-based).
    pub fn machine(&self, n: usize) -> Arc<FakeMachine> {
        self.inner.machines.lock().unwrap()[n].clone()
    }

    pub fn started(&self) -> usize {
        self.inner.machines.lock().unwrap().len()
    }
}

impl Engine for FakeEngine {
    fn boot(&self, _spec: &VmSpec, mut console: Box<dyn Write + Send>) -> Result<Box<dyn Machine>, EngineError> {
        *self.inner.attempts.lock().unwrap() += 1;
        let plan = self.inner.plans.lock().unwrap().pop_front().unwrap_or(Plan::Ready);
        if plan == Plan::FailToStart {
            return Err(EngineError::Boot("the fake hypervisor refused".into()));
        }
        let _ = console.write_all(b"fake console: booting\n");
        let machine = Arc::new(FakeMachine {
            plan,
            poweroff: self.inner.poweroff.lock().unwrap().unwrap_or(Poweroff::Prompt),
            started: Instant::now(),
            guest: Mutex::new(Guest {
                stopped: None,
                builds: *self.inner.builds_at_boot.lock().unwrap(),
                silent: false,
                hostile: false,
                status_asks: 0,
            }),
            changed: Condvar::new(),
        });
        if plan == Plan::DieDuringBoot {
            machine.stop_later(Duration::from_millis(20), StopReason::Error("kernel panic".into()));
        }
        self.inner.machines.lock().unwrap().push(machine.clone());
        Ok(Box::new(Handle(machine)))
    }
}

/// Reads the proxied banner line, or the error that the proxy closed the connection.
pub fn read_banner(stream: &mut impl Read) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_string())
}
