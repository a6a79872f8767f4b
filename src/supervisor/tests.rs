//! The whole lifecycle against the fake engine, in milliseconds: the real loop, proxy, monitor and control
//! socket, with a fake VM behind them.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use super::fake::{FakeEngine, Plan, Poweroff, read_banner};
use super::phase::Event;
use super::{Options, Shared, Supervisor, SupervisorError};
use crate::control::{self, ControlRequest, StatusReport, VmState};
use crate::engine::{EngineKind, StopReason};
use crate::instance::{EffectiveConfig, Layout};

const WAIT: Duration = Duration::from_secs(10);

struct Harness {
    _dir: tempfile::TempDir,
    layout: Layout,
    engine: FakeEngine,
    shared: Arc<Shared>,
    port: u16,
    done: std::sync::Mutex<Receiver<Result<(), SupervisorError>>>,
}

fn fast_options() -> Options {
    Options {
        boot_timeout: Duration::from_secs(5),
        stop_timeout: Duration::from_secs(2),
        force_timeout: Duration::from_secs(1),
        status_interval: Duration::from_millis(20),
        agent_silence_reported_after: Duration::from_millis(100),
        backoff_base: Duration::from_millis(300),
        backoff_max: Duration::from_secs(1),
        handle_signals: false,
        ..Options::default()
    }
}

impl Harness {
    fn start(engine: FakeEngine, on_demand: bool, tweak: impl FnOnce(&mut Options)) -> Harness {
        let dir = tempfile::Builder::new().prefix("dvn-sup").tempdir_in("/tmp").unwrap();
        let layout = Layout::new(dir.path());
        layout.create().unwrap();
        let config = EffectiveConfig {
            engine: EngineKind::Qemu,
            cores: 1,
            memory_mib: 512,
            disk_bytes: 1 << 30,
            kernel: dir.path().join("kernel"),
            initrd: dir.path().join("initrd"),
            system: None,
            idle_timeout_seconds: 0,
            rosetta: None,
            share_nix_store: false,
            host_nix_store: dir.path().join("store"),
            host_nix_daemon: None,
            port: 0,
            on_demand,
            ephemeral: false,
            max_jobs: 1,
        };
        let spec = crate::launch::vm_spec(&layout, &config, "02:00:00:00:00:01".into());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut options = fast_options();
        tweak(&mut options);
        let supervisor = Supervisor::new(layout.clone(), config, spec, Box::new(engine.clone()), listener, options).unwrap();
        let (shared, port) = (supervisor.shared(), supervisor.port());
        let (tx, done) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(supervisor.run());
        });
        let h = Harness { _dir: dir, layout, engine, shared, port, done: std::sync::Mutex::new(done) };
        let deadline = Instant::now() + WAIT;
        // The socket file appears at bind, a moment before it listens: wait for an answer.
        while control::request(&h.layout.control_socket(), &ControlRequest::Status, WAIT).is_err() {
            assert!(Instant::now() < deadline, "no control socket");
            thread::sleep(Duration::from_millis(2));
        }
        h
    }

    fn state(&self) -> VmState {
        self.shared.view().state
    }

    fn wait_for(&self, what: &str, mut done: impl FnMut(&Harness) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            assert!(Instant::now() < deadline, "{what}: not reached; status {:?}", self.status());
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn wait_state(&self, state: VmState) {
        self.wait_for(&format!("state {state:?}"), |h| h.state() == state);
    }

    fn status(&self) -> StatusReport {
        control::request(&self.layout.control_socket(), &ControlRequest::Status, WAIT).unwrap().status.unwrap()
    }

    fn stop(&self, force: bool) {
        control::request(&self.layout.control_socket(), &ControlRequest::Stop { force }, WAIT).unwrap();
    }

    fn signal(&self) {
        self.shared.post(Event::Signal);
    }

    fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream
    }

    /// One connection through the proxy: the banner and an echo of what was sent.
    fn ssh(&self) -> std::io::Result<String> {
        let mut stream = self.connect();
        let banner = read_banner(&mut stream)?;
        stream.write_all(b"ping\n")?;
        let echo = read_banner(&mut stream)?;
        assert_eq!(echo, "ping");
        Ok(banner)
    }

    fn finish(&self) -> Result<(), SupervisorError> {
        self.done.lock().unwrap().recv_timeout(WAIT).expect("the supervisor did not exit")
    }

    fn still_running(&self, for_how_long: Duration) -> bool {
        matches!(self.done.lock().unwrap().recv_timeout(for_how_long), Err(mpsc::RecvTimeoutError::Timeout))
    }
}

#[test]
fn on_demand_boots_at_the_first_connection_and_stops_cleanly() {
    let h = Harness::start(FakeEngine::default(), true, |_| {});
    assert_eq!(h.status().state, VmState::Waiting);
    assert_eq!(h.engine.attempts(), 0, "nothing boots before a connection");
    assert_eq!(h.ssh().unwrap(), "SSH-2.0-fake");
    let status = h.status();
    assert_eq!((status.state, status.boot_count), (VmState::Running, 1));
    assert!(status.bytes_to_guest >= 5 && status.bytes_from_guest >= 19, "{status:?}");
    h.wait_for("first guest status", |h| h.status().guest_ip.is_some() && h.layout.guest_ip().exists());
    assert_eq!(std::fs::read_to_string(h.layout.guest_ip()).unwrap(), "10.0.2.15\n");
    h.stop(false);
    h.finish().unwrap();
    assert_eq!(h.engine.machine(0).stopped(), Some(StopReason::GuestShutdown), "clean: the agent's poweroff");
    assert!(!h.layout.guest_ip().exists(), "no stale guest IP");
}

#[test]
fn concurrent_first_connections_share_one_boot() {
    let h = Arc::new(Harness::start(FakeEngine::default(), true, |_| {}));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let h = h.clone();
            thread::spawn(move || h.ssh().unwrap())
        })
        .collect();
    for client in clients {
        assert_eq!(client.join().unwrap(), "SSH-2.0-fake");
    }
    assert_eq!(h.engine.attempts(), 1, "one VM for all");
    assert_eq!(h.status().boot_count, 1);
    h.stop(false);
    h.finish().unwrap();
}

#[test]
fn an_unrecoverable_vm_during_boot_is_replaced_by_a_new_one() {
    let h = Harness::start(FakeEngine::with_plans(&[Plan::Unrecoverable, Plan::Unrecoverable]), false, |_| {});
    h.wait_state(VmState::Running);
    assert_eq!(h.engine.attempts(), 3, "two stuck VMs, then one that works");
    assert_eq!(h.engine.machine(0).stopped(), Some(StopReason::Forced));
    assert_eq!(h.status().boot_count, 1, "one boot, three VMs");
    assert_eq!(h.ssh().unwrap(), "SSH-2.0-fake");
    h.stop(false);
    h.finish().unwrap();
}

#[test]
fn unrecoverable_every_time_fails_the_boot_after_the_attempts() {
    let h = Harness::start(FakeEngine::with_plans(&[Plan::Unrecoverable; 3]), false, |_| {});
    let err = h.finish().unwrap_err();
    let text = super::error_chain(&err);
    assert!(text.starts_with("the VM did not boot: ") && text.contains("in each of 3 VMs"), "{text}");
    assert_eq!(h.engine.attempts(), 3);
}

/// The regression of issue 10: a `stop` that arrives while an idle stop is under way used to be taken off the
/// channel and thrown away; the supervisor went back to listening and the CLI forced it after 60 s.
#[test]
fn stop_during_an_idle_stop_is_honoured() {
    let engine = FakeEngine::default();
    engine.set_poweroff(Poweroff::After(Duration::from_secs(1)));
    let h = Harness::start(engine, true, |o| o.idle_timeout = Some(Duration::from_millis(50)));
    h.ssh().unwrap();
    h.wait_state(VmState::Stopping);
    h.stop(false);
    assert_eq!(h.state(), VmState::Stopping, "the stop came during the idle stop");
    let result = h.done.lock().unwrap().recv_timeout(Duration::from_secs(3)).expect("the stop was lost: the supervisor kept running");
    result.unwrap();
    assert_eq!(h.engine.machine(0).stopped(), Some(StopReason::GuestShutdown), "still a clean shutdown, not forced");
    assert_eq!(h.engine.attempts(), 1);
}

#[test]
fn a_connection_during_an_idle_stop_is_served_by_a_new_boot() {
    let engine = FakeEngine::default();
    engine.set_poweroff(Poweroff::After(Duration::from_millis(200)));
    let h = Harness::start(engine, true, |o| o.idle_timeout = Some(Duration::from_millis(50)));
    h.ssh().unwrap();
    h.wait_state(VmState::Stopping);
    assert_eq!(h.ssh().unwrap(), "SSH-2.0-fake", "held through the stop, then served");
    assert_eq!(h.engine.attempts(), 2);
    assert_eq!(h.engine.machine(0).stopped(), Some(StopReason::GuestShutdown));
    assert_eq!(h.status().boot_count, 2);
    h.stop(false);
    h.finish().unwrap();
}

#[test]
fn idle_stop_keeps_listening_on_demand_and_exits_otherwise() {
    let h = Harness::start(FakeEngine::default(), true, |o| o.idle_timeout = Some(Duration::from_millis(50)));
    for round in 1..=2 {
        h.ssh().unwrap();
        h.wait_state(VmState::Waiting);
        assert_eq!(h.status().boot_count, round);
    }
    h.stop(false);
    h.finish().unwrap();

    let h = Harness::start(FakeEngine::default(), false, |o| o.idle_timeout = Some(Duration::from_millis(50)));
    h.finish().unwrap();
    assert_eq!(h.engine.machine(0).stopped(), Some(StopReason::GuestShutdown));
}

#[test]
fn a_build_in_flight_keeps_the_vm_up() {
    let engine = FakeEngine::default();
    engine.set_builds_at_boot(1);
    let h = Harness::start(engine, false, |o| o.idle_timeout = Some(Duration::from_millis(50)));
    h.wait_state(VmState::Running);
    h.wait_for("the build seen", |h| h.status().builds_in_flight == 1);
    assert!(h.still_running(Duration::from_millis(200)), "stopped during a build");
    h.engine.machine(0).set_builds(0);
    h.finish().unwrap();
}

#[test]
fn a_signal_during_boot_stops_cleanly() {
    let h = Harness::start(FakeEngine::with_plans(&[Plan::Hang]), false, |_| {});
    h.wait_state(VmState::Booting);
    h.wait_for("the VM started", |h| h.engine.started() == 1);
    h.signal();
    h.finish().unwrap();
    assert_eq!(h.engine.machine(0).stopped(), Some(StopReason::Forced), "nothing ran yet: no clean shutdown to wait for");
}

#[test]
fn a_second_signal_forces_a_guest_that_ignores_poweroff() {
    let engine = FakeEngine::default();
    engine.set_poweroff(Poweroff::Ignored);
    let h = Harness::start(engine, false, |o| o.stop_timeout = Duration::from_secs(30));
    h.wait_state(VmState::Running);
    h.signal();
    h.wait_state(VmState::Stopping);
    assert!(h.still_running(Duration::from_millis(100)));
    h.signal();
    h.finish().unwrap();
    assert_eq!(h.engine.machine(0).stopped(), Some(StopReason::Forced));
}

#[test]
fn stop_force_during_a_stop_pulls_the_plug_and_the_deadline_does_too() {
    let engine = FakeEngine::default();
    engine.set_poweroff(Poweroff::Ignored);
    let h = Harness::start(engine.clone(), false, |o| o.stop_timeout = Duration::from_secs(30));
    h.wait_state(VmState::Running);
    h.stop(false);
    h.wait_state(VmState::Stopping);
    h.stop(true);
    h.finish().unwrap();
    assert_eq!(h.engine.machine(0).stopped(), Some(StopReason::Forced));

    // No reply to poweroff and no power button: the stop deadline forces it.
    let h = Harness::start(engine, false, |o| o.stop_timeout = Duration::from_millis(200));
    h.wait_state(VmState::Running);
    let started = Instant::now();
    h.stop(false);
    h.finish().unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    assert_eq!(h.engine.machine(1).stopped(), Some(StopReason::Forced));
}

#[test]
fn a_guest_that_dies_while_running() {
    // Not on demand: the supervisor reports the crash.
    let h = Harness::start(FakeEngine::default(), false, |_| {});
    h.wait_state(VmState::Running);
    h.engine.machine(0).crash();
    let err = h.finish().unwrap_err();
    assert!(matches!(err, SupervisorError::Crashed(StopReason::Error(_))), "{err:?}");

    // On demand: back to listening, the crash in status, and the next connection boots a new VM.
    let h = Harness::start(FakeEngine::default(), true, |_| {});
    h.ssh().unwrap();
    h.engine.machine(0).crash();
    h.wait_state(VmState::Waiting);
    assert!(h.status().last_error.unwrap().contains("the fake hypervisor died"));
    assert_eq!(h.ssh().unwrap(), "SSH-2.0-fake");
    assert_eq!(h.engine.attempts(), 2);
    h.stop(false);
    h.finish().unwrap();
}

#[test]
fn a_vm_that_dies_during_boot_is_a_boot_error_with_its_reason() {
    let h = Harness::start(FakeEngine::with_plans(&[Plan::DieDuringBoot]), false, |_| {});
    let err = h.finish().unwrap_err();
    assert!(matches!(err, SupervisorError::Boot(super::BootError::Stopped { .. })), "{err:?}");
    assert!(super::error_chain(&err).contains("kernel panic"), "{}", super::error_chain(&err));
}

#[test]
fn an_agent_that_goes_silent_is_reported_and_cleared() {
    let h = Harness::start(FakeEngine::default(), false, |_| {});
    h.wait_state(VmState::Running);
    h.engine.machine(0).set_silent(true);
    h.wait_for("silence reported", |h| h.status().last_error.is_some_and(|e| e.contains("has not answered")));
    assert_eq!(h.state(), VmState::Running, "reported, not acted on");
    h.engine.machine(0).set_silent(false);
    h.wait_for("report cleared", |h| h.status().last_error.is_none());
    h.stop(false);
    h.finish().unwrap();
}

#[test]
fn a_hostile_agent_cannot_keep_the_vm_up_or_forge_status() {
    let engine = FakeEngine::default();
    let h = Harness::start(engine, false, |o| {
        o.idle_timeout = Some(Duration::from_secs(1));
        o.agent_silence_reported_after = Duration::ZERO;
    });
    h.wait_state(VmState::Running);
    h.engine.machine(0).set_hostile(true);
    h.wait_for("hostile reply refused", |h| h.status().last_error.is_some_and(|e| e.contains("invalid reply")));
    let status = h.status();
    assert_eq!(status.builds_in_flight, 0, "4294967295 builds refused");
    assert_ne!(status.guest_disk_free_bytes, Some(u64::MAX));
    let shown = status.last_error.unwrap();
    assert!(!shown.contains('\n') && !shown.contains('\u{1b}'), "{shown:?}");
    h.finish().unwrap();
    assert_eq!(std::fs::read_to_string(h.layout.guest_ip()).ok(), None);
}

#[test]
fn a_failed_boot_closes_its_connections_and_backs_off() {
    let h = Harness::start(FakeEngine::with_plans(&[Plan::FailToStart]), true, |o| o.backoff_base = Duration::from_secs(1));
    let clients: Vec<_> = (0..4).map(|_| h.connect()).collect();
    for mut client in clients {
        assert!(read_banner(&mut client).is_err(), "closed, not queued for retries");
    }
    h.wait_state(VmState::Waiting);
    assert_eq!(h.engine.attempts(), 1, "one boot for all four");
    let status = h.status();
    let error = status.last_error.unwrap();
    assert!(error.starts_with("the VM did not boot: ") && error.contains("the fake hypervisor refused"), "{error}");
    // Within the back-off: refused at once, nothing booted.
    let mut early = h.connect();
    assert!(read_banner(&mut early).is_err());
    assert_eq!(h.engine.attempts(), 1);
    // After it: the next connection boots again, and works.
    thread::sleep(Duration::from_millis(1100));
    assert_eq!(h.ssh().unwrap(), "SSH-2.0-fake");
    assert_eq!(h.engine.attempts(), 2);
    h.stop(false);
    h.finish().unwrap();
}

#[test]
fn held_connections_are_capped_and_stop_is_prompt_under_load() {
    let h = Harness::start(FakeEngine::with_plans(&[Plan::Hang]), true, |o| {
        o.max_held_connections = 4;
    });
    let held: Vec<_> = (0..4).map(|_| h.connect()).collect();
    h.wait_for("four held", |h| h.shared.view().held == 4);
    let mut extra: Vec<_> = (0..20).map(|_| h.connect()).collect();
    for client in extra.iter_mut() {
        let mut byte = [0u8; 1];
        assert_eq!(client.read(&mut byte).unwrap(), 0, "over the cap: closed at once");
    }
    assert_eq!(h.shared.view().held, 4);
    let started = Instant::now();
    h.stop(false);
    h.finish().unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "stop took {:?}", started.elapsed());
    for mut client in held {
        assert!(read_banner(&mut client).is_err(), "held connections are closed on exit");
    }
}

#[test]
fn relayed_connections_are_capped() {
    let h = Harness::start(FakeEngine::default(), false, |o| o.max_connections = 2);
    h.wait_state(VmState::Running);
    let mut open: Vec<_> = (0..2).map(|_| h.connect()).collect();
    for client in open.iter_mut() {
        assert_eq!(read_banner(client).unwrap(), "SSH-2.0-fake");
    }
    let mut third = h.connect();
    assert!(read_banner(&mut third).is_err(), "a third is refused");
    drop(open);
    h.wait_for("slots free again", |h| h.status().connections == 0);
    assert_eq!(h.ssh().unwrap(), "SSH-2.0-fake");
    h.stop(false);
    h.finish().unwrap();
}

#[test]
fn stop_and_signal_while_waiting_exit_at_once() {
    let h = Harness::start(FakeEngine::default(), true, |_| {});
    h.stop(false);
    h.finish().unwrap();
    let h = Harness::start(FakeEngine::default(), true, |_| {});
    h.signal();
    h.finish().unwrap();
    assert_eq!(h.engine.attempts(), 0);
}

#[test]
fn the_guest_clock_is_set_at_boot_and_shift_is_refused_without_a_vm() {
    let h = Harness::start(FakeEngine::default(), true, |_| {});
    let err = control::request(&h.layout.control_socket(), &ControlRequest::ShiftGuestClock { seconds: 5 }, WAIT).unwrap_err();
    assert!(err.to_string().contains("not running"), "{err}");
    h.ssh().unwrap();
    h.wait_for("clock offset measured", |h| h.status().clock_offset_ms.is_some());
    control::request(&h.layout.control_socket(), &ControlRequest::ShiftGuestClock { seconds: 5 }, WAIT).unwrap();
    h.stop(false);
    h.finish().unwrap();
}

#[test]
fn an_idle_vm_is_not_asked_for_status_at_every_wake_but_a_used_one_is() {
    let h = Harness::start(FakeEngine::default(), false, |o| {
        o.agent_asks = super::clock::AskPolicy { linger: Duration::from_millis(100), quiet: Duration::from_secs(3600) };
    });
    h.wait_state(VmState::Running);
    // Past the linger after boot: the monitor wakes every 20 ms but leaves the agent alone.
    thread::sleep(Duration::from_millis(300));
    let idle_start = h.engine.machine(0).status_asks();
    thread::sleep(Duration::from_millis(500));
    let idle_asks = h.engine.machine(0).status_asks() - idle_start;
    assert_eq!(idle_asks, 0, "asked {idle_asks} times in 25 wakes of an idle VM");
    // A connection open: asked at every wake again.
    let held = h.connect();
    h.wait_for("status asked while used", |h| h.engine.machine(0).status_asks() >= idle_start + 5);
    drop(held);
    h.stop(false);
    h.finish().unwrap();
}
