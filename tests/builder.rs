//! End to end: on-demand start, idle stop that knows about builds, the guest clock, live status.

mod common;

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use common::{BOOT_TIMEOUT, Instance};

#[test]
fn on_demand_cold_connections_succeed_the_first_time_and_idle_stop_keeps_listening() {
    let mut vm = Instance::new();
    vm.spawn_start(&["--on-demand", "--idle-timeout", "3s"]);
    let waiting = vm.wait_state("waiting", Duration::from_secs(30));
    assert_eq!(waiting["bootCount"], 0);
    assert_eq!(waiting["running"], true, "the supervisor runs while the VM is down");
    let port = waiting["sshPort"].as_u64().unwrap();
    for round in 1..=3u64 {
        let started = Instant::now();
        // The very first connection must work: no retry here.
        assert_eq!(vm.ssh_ok("echo cold").trim(), "cold", "round {round}");
        eprintln!("round {round}: cold connection -> command done in {:.1} s", started.elapsed().as_secs_f64());
        let status = vm.status();
        assert_eq!(status["bootCount"], round);
        assert_eq!(status["sshPort"], port, "the listener stays the same");
        let stopped = vm.wait_state("waiting", Duration::from_secs(60));
        assert_eq!(stopped["bootCount"], round);
    }
    assert!(vm.log().contains("idle for 3s: stopping the VM"), "{}", vm.log());
    assert_eq!(vm.stop(&[]), 0);
    vm.assert_nothing_left();
}

#[test]
fn four_concurrent_first_connections_boot_one_vm() {
    let mut vm = Instance::new();
    vm.spawn_start(&["--on-demand"]);
    vm.wait_state("waiting", Duration::from_secs(30));
    let clients: Vec<_> = (0..4)
        .map(|n| {
            let mut cmd = vm.cmd(&["ssh", "-o", "ConnectTimeout=180", "--", &format!("echo client-{n}")]);
            thread::spawn(move || cmd.output().unwrap())
        })
        .collect();
    for (n, client) in clients.into_iter().enumerate() {
        let out = client.join().unwrap();
        assert!(out.status.success(), "client {n}: {}\n{}", String::from_utf8_lossy(&out.stderr), vm.log());
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("client-{n}"));
    }
    assert_eq!(vm.status()["bootCount"], 1, "one VM for all four");
    assert_eq!(vm.stop(&[]), 0);
}

#[test]
fn a_command_longer_than_the_idle_timeout_is_not_cut_off_and_plain_start_exits_0_when_idle() {
    let mut vm = Instance::new();
    vm.start_ready(&["--idle-timeout", "3s"]);
    let started = Instant::now();
    assert_eq!(vm.ssh_ok("sleep 8; echo survived").trim(), "survived");
    assert!(started.elapsed() >= Duration::from_secs(8));
    // Now idle: a plain `start` shuts the guest down and exits 0 (launchd's KeepAlive leaves it be).
    assert_eq!(vm.wait_supervisor_exit(Duration::from_secs(60)), 0);
    assert!(vm.log().contains("the guest shut down"), "{}", vm.log());
    vm.assert_nothing_left();
}

#[test]
fn a_build_in_flight_keeps_the_vm_up_without_any_connection() {
    let mut vm = Instance::new();
    vm.start_ready(&["--idle-timeout", "3s"]);
    // A stand-in nix-daemon and one worker child, detached from the ssh session: what the agent counts.
    vm.ssh_ok(
        "printf '#!/bin/sh\\nif [ \"$1\" = worker ]; then sleep \"$2\"; else /tmp/nix-daemon worker \"$1\"; fi\\n' > /tmp/nix-daemon; \
         chmod +x /tmp/nix-daemon; (setsid /tmp/nix-daemon 12 </dev/null >/dev/null 2>&1 &); echo started",
    );
    let build_started = Instant::now();
    let deadline = build_started + Duration::from_secs(10);
    let mut saw_build = false;
    while Instant::now() < deadline {
        let status = vm.status();
        assert_eq!(status["state"], "running", "stopped while a build ran: {status}");
        saw_build |= status["buildsInFlight"].as_u64().unwrap_or(0) >= 1;
        thread::sleep(Duration::from_millis(500));
    }
    assert!(saw_build, "the agent never reported the build");
    assert_eq!(vm.wait_supervisor_exit(Duration::from_secs(60)), 0);
    assert!(build_started.elapsed() >= Duration::from_secs(12), "stopped before the build ended");
}

#[test]
fn a_guest_clock_an_hour_behind_is_corrected() {
    let mut vm = Instance::new();
    vm.start_ready(&[]);
    let out = vm.run(&["debug", "shift-guest-clock", "--", "-3600"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let guest: i64 = vm.ssh_ok("date +%s").trim().parse().unwrap();
        let host = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        if (guest - host).abs() <= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "guest clock still off by {} s", guest - host);
        thread::sleep(Duration::from_millis(500));
    }
    assert!(vm.log().contains("guest clock was off by -3"), "the correction is logged: {}", vm.log());
    let offset = vm.status()["clockOffsetMs"].as_i64().expect("clockOffsetMs");
    assert!(offset.abs() < 1000, "offset {offset} ms");
    assert_eq!(vm.stop(&[]), 0);
}

#[test]
fn status_follows_the_lifecycle() {
    let mut vm = Instance::new();
    vm.spawn_start(&["--on-demand", "--idle-timeout", "1h"]);
    let waiting = vm.wait_state("waiting", Duration::from_secs(30));
    assert_eq!(waiting["idleTimeoutSeconds"], 3600);
    assert_eq!(waiting["connections"], 0);
    assert!(waiting["uptimeSeconds"].is_null());
    // Hold one connection open while the VM boots and runs.
    let mut holder = vm.cmd(&["ssh", "-o", "ConnectTimeout=180", "--", "sleep 6"]).spawn().unwrap();
    let booting_or_running = vm.wait_state_in(&["booting", "running"], Duration::from_secs(30));
    assert_eq!(booting_or_running["connections"], 1);
    let running = vm.wait_state("running", BOOT_TIMEOUT);
    assert_eq!(running["bootCount"], 1);
    assert!(running["lastBootSeconds"].as_f64().unwrap() > 0.0);
    assert!(running["uptimeSeconds"].as_f64().is_some());
    assert!(running["idleSeconds"].is_null(), "not idle with a connection open");
    thread::sleep(Duration::from_secs(3));
    let later = vm.status();
    assert_eq!(later["guestIp"], "10.0.2.15");
    assert!(later["guestDiskFreeBytes"].as_u64().unwrap() > 0);
    assert!(later["clockOffsetMs"].as_i64().is_some());
    assert_eq!(later["diskBytes"]["size"], 2u64 << 30);
    assert!(later["diskBytes"]["allocated"].as_u64().unwrap() > 0);
    assert!(later["uptimeSeconds"].as_f64() > running["uptimeSeconds"].as_f64());
    assert!(holder.wait().unwrap().success());
    thread::sleep(Duration::from_millis(1500));
    let idle = vm.status();
    assert_eq!(idle["connections"], 0);
    // The proxy counts what it relayed (the ssh session above, both ways).
    assert!(idle["bytesToGuest"].as_u64().unwrap() > 1000, "{idle}");
    assert!(idle["bytesFromGuest"].as_u64().unwrap() > 1000, "{idle}");
    assert!(idle["idleSeconds"].as_f64().unwrap() >= 0.5, "{idle}");
    assert_eq!(fs::read_to_string(vm.state().join("guest-ip")).unwrap().trim(), "10.0.2.15");
    let human = String::from_utf8_lossy(&vm.run(&["status"]).stdout).into_owned();
    assert!(human.contains("running") && human.contains("127.0.0.1:"), "{human}");
    assert_eq!(vm.stop(&[]), 0);
    assert_eq!(vm.status()["state"], "stopped");
    assert!(!vm.state().join("guest-ip").exists(), "no stale guest IP");
}

#[test]
fn a_listener_inherited_from_systemd_boots_on_the_first_connection() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let mut vm = Instance::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fd = listener.as_raw_fd();
    let (kernel, initrd) = common::guest();
    let _vm_lock = common::machine_lock("vm");
    let log = fs::File::create(vm.log_path()).unwrap();
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.args(["-c", "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$@\"", "sh"])
        .arg(common::bin())
        .arg("--state-dir")
        .arg(vm.state())
        .args(["start", "--on-demand", "--cores", "2", "--memory", "1024", "--disk-size", "2G", "--port", "1"])
        .args(["--kernel", kernel.to_str().unwrap(), "--initrd", initrd.to_str().unwrap()])
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // SAFETY: dup2 in the child before exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself keeps close-on-exec, so clear it explicitly.
            if libc::dup2(fd, 3) < 0 || libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    vm.supervisor = Some(cmd.spawn().unwrap());
    drop(listener);
    let waiting = vm.wait_state("waiting", Duration::from_secs(30));
    assert_eq!(waiting["sshPort"], port, "the inherited socket is used, not --port");
    assert!(vm.log().contains("(Systemd)"), "{}", vm.log());
    assert_eq!(vm.ssh_ok("echo activated").trim(), "activated");
    assert_eq!(vm.stop(&[]), 0);
}

#[test]
fn a_listener_inherited_on_every_interface_is_refused() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let vm = Instance::new();
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let fd = listener.as_raw_fd();
    let (kernel, initrd) = common::guest();
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.args(["-c", "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$@\"", "sh"])
        .arg(common::bin())
        .arg("--state-dir")
        .arg(vm.state())
        .args(["start", "--on-demand", "--cores", "2", "--memory", "1024", "--disk-size", "2G", "--no-share-nix-store"])
        .args(["--kernel", kernel.to_str().unwrap(), "--initrd", initrd.to_str().unwrap()]);
    // SAFETY: dup2 in the child before exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 || libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("0.0.0.0") && stderr.contains("not on the loopback interface"), "{stderr}");
    vm.assert_nothing_left();
}

#[test]
fn a_failed_on_demand_boot_is_reported_and_the_next_connection_tries_again() {
    let mut vm = Instance::new();
    // Outside the state directory: start refuses a directory holding files it does not make.
    let bogus = vm.host_store.path().join("not-a-kernel");
    fs::write(&bogus, b"this is not a kernel").unwrap();
    let (_, initrd) = common::guest();
    let _vm_lock = common::machine_lock("vm");
    let log = fs::File::create(vm.log_path()).unwrap();
    let child = vm
        .cmd(&["start", "--on-demand", "--cores", "2", "--memory", "1024", "--disk-size", "2G", "--port", "0"])
        .args(["--kernel", bogus.to_str().unwrap(), "--initrd", initrd.to_str().unwrap()])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    vm.supervisor = Some(child);
    vm.wait_state("waiting", Duration::from_secs(30));
    for attempt in 1..=2 {
        let out = vm.ssh("true");
        assert!(!out.status.success(), "attempt {attempt}: a VM without a kernel cannot answer");
        let status = vm.wait_state("waiting", Duration::from_secs(30));
        let error = status["lastError"].as_str().unwrap_or_default().to_string();
        assert!(error.contains("did not boot") || error.contains("QEMU"), "attempt {attempt}: {status}");
        assert_eq!(status["running"], true, "the supervisor keeps listening");
    }
    assert_eq!(vm.stop(&[]), 0);
    vm.assert_nothing_left();
}

#[test]
fn a_stuck_vsock_device_during_boot_is_recovered_by_a_new_vm() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let mut vm = Instance::new();
    vm.spawn_start(&[]);
    // Freeze the first vsock backend as soon as it exists: it then takes connections and answers none,
    // which is how vhost-device-vsock fails when it hangs.
    let deadline = Instant::now() + Duration::from_secs(30);
    let frozen = loop {
        // Once QEMU runs the guest (the supervisor waits for the agent), not while QEMU sets the device up.
        let qemu_up = vm.log().contains("waiting for the guest agent");
        if let Some(pid) = vm.helper_pid("vhost-device-vsock").filter(|_| qemu_up) {
            kill(Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
            break pid;
        }
        assert!(Instant::now() < deadline, "no vhost-device-vsock appeared");
        thread::sleep(Duration::from_millis(10));
    };
    let status = vm.wait_state("running", BOOT_TIMEOUT);
    assert_eq!(status["bootCount"], 1);
    assert!(vm.log().contains("restarting the VM (attempt 2)"), "{}", vm.log());
    assert!(!vm.processes().iter().any(|p| p.starts_with(&format!("{frozen}:"))), "the stuck backend was killed");
    assert_eq!(vm.ssh_ok("echo recovered").trim(), "recovered");
    assert_eq!(vm.stop(&[]), 0);
    vm.assert_nothing_left();
}

#[test]
fn a_silent_agent_is_reported_in_status_and_cleared_when_it_answers_again() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let mut vm = Instance::new();
    vm.start_ready(&[]);
    let backend = Pid::from_raw(vm.helper_pid("vhost-device-vsock").expect("vsock backend"));
    kill(backend, Signal::SIGSTOP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status = vm.status();
        if status["lastError"].as_str().is_some_and(|e| e.contains("has not answered")) {
            assert_eq!(status["state"], "running");
            break;
        }
        assert!(Instant::now() < deadline, "silence never reported: {status}");
        thread::sleep(Duration::from_millis(500));
    }
    kill(backend, Signal::SIGCONT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !vm.status()["lastError"].is_null() {
        assert!(Instant::now() < deadline, "the report was not cleared: {}", vm.status());
        thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(vm.ssh_ok("echo back").trim(), "back");
    assert_eq!(vm.stop(&[]), 0);
}
