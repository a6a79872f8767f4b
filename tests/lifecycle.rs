//! End to end with the real test guest under QEMU: the foundation's lifecycle.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::{BOOT_TIMEOUT, Instance, pid_alive};

#[test]
fn start_ssh_status_stop_leaves_nothing_running() {
    let mut vm = Instance::new();
    let status = vm.start_ready(&[]);
    assert_eq!(status["running"], true);
    let pid = status["pid"].as_u64().expect("pid while running");
    assert!(pid_alive(pid));
    assert_eq!(status["engine"], "qemu");
    assert_eq!(status["stateDirectory"], vm.state().display().to_string());
    assert!(status["sshPort"].as_u64().unwrap() > 0);
    assert_eq!(vm.ssh_ok("echo ok").trim(), "ok");
    // The seed's files are where the seed puts them.
    for file in ["disk.img", "ssh/id_ed25519", "ssh/id_ed25519.pub", "ssh/known_hosts", "vm.pid", "console.log"] {
        assert!(vm.state().join(file).exists(), "{file} missing");
    }
    assert_eq!(fs::read_to_string(vm.state().join("vm.pid")).unwrap().lines().next().unwrap(), pid.to_string());
    // The guest runs as `builder` without root, and never sees the client's private key.
    assert_eq!(vm.ssh_ok("id -un").trim(), "builder");
    // Once the guest copied its keys, the share is gone and builder can read no host key.
    let probe = vm.ssh_ok("ls -A /run/dvn-config; for k in /etc/dropbear/*; do cat $k >/dev/null 2>&1 && echo READABLE $k; done; true");
    assert!(!probe.contains("ssh_host") && !probe.contains("READABLE"), "{probe}");
    assert_eq!(vm.stop(&[]), 0);
    let status = vm.status();
    assert_eq!(status["running"], false);
    assert_eq!(status["state"], "stopped");
    assert!(status.get("pid").is_none());
    assert!(!pid_alive(pid));
    vm.assert_nothing_left();
    assert!(vm.log().contains("the guest shut down"), "clean guest shutdown expected:\n{}", vm.log());
}

#[test]
fn stop_force_pulls_the_plug() {
    let mut vm = Instance::new();
    vm.start_ready(&[]);
    let started = Instant::now();
    assert_eq!(vm.stop(&["--force"]), 0);
    assert!(started.elapsed() < Duration::from_secs(20));
    vm.assert_nothing_left();
    assert!(vm.log().contains("forced off"), "{}", vm.log());
}

#[test]
fn restart_keeps_the_disk_and_appends_the_console_log() {
    let mut vm = Instance::new();
    vm.start_ready(&[]);
    vm.ssh_ok("echo kept > ~/persist.txt && sync");
    assert_eq!(vm.stop(&[]), 0);
    vm.start_ready(&[]);
    assert_eq!(vm.ssh_ok("cat ~/persist.txt").trim(), "kept");
    assert_eq!(vm.stop(&[]), 0);
    let console = fs::read_to_string(vm.state().join("console.log")).unwrap();
    assert!(console.contains("darwin-vz-nix: boot 1 at"), "first boot marker kept");
    assert!(console.matches("===== darwin-vz-nix: boot").count() >= 2, "one marker per boot:\n{console}");
}

#[test]
fn no_share_nix_store_boots() {
    let mut vm = Instance::new();
    vm.start_ready(&["--no-share-nix-store"]);
    let mounts = vm.ssh_ok("cat /proc/mounts");
    assert!(!mounts.contains("nix-store"), "{mounts}");
    assert_eq!(vm.stop(&[]), 0);
}

#[test]
fn shared_store_is_read_only_and_overlaid() {
    // Whether or not this machine has Nix: the harness's empty stand-in store (DVN_HOST_NIX_STORE) is enough
    // to check the mounts, and the test never creates /nix on the host (that hid a machine dependency once).
    let mut vm = Instance::new();
    vm.start_ready(&["--share-nix-store"]);
    let mounts = vm.ssh_ok("cat /proc/mounts");
    assert!(mounts.contains("nix-store /nix/.ro-store virtiofs ro"), "{mounts}");
    assert!(mounts.contains("overlay /nix/store overlay"), "{mounts}");
    assert_eq!(vm.stop(&[]), 0);
}

#[test]
fn second_start_fails_fast_while_the_first_runs() {
    let mut vm = Instance::new();
    vm.start_ready(&[]);
    let (kernel, initrd) = common::guest();
    let started = Instant::now();
    let out =
        vm.run(&["start", "--kernel", kernel.to_str().unwrap(), "--initrd", initrd.to_str().unwrap(), "--disk-size", "2G", "--port", "0"]);
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already runs the VM") && stderr.contains("darwin-vz-nix stop"), "{stderr}");
    assert_eq!(vm.ssh_ok("echo still").trim(), "still", "the first VM is untouched");
    assert_eq!(vm.stop(&[]), 0);
}

#[test]
fn interrupt_shuts_down_cleanly_and_kill_leaves_no_helpers() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let mut vm = Instance::new();
    let status = vm.start_ready(&[]);
    let pid = Pid::from_raw(status["pid"].as_u64().unwrap() as i32);
    kill(pid, Signal::SIGINT).unwrap();
    assert_eq!(vm.wait_supervisor_exit(Duration::from_secs(60)), 0);
    assert!(vm.log().contains("the guest shut down"), "{}", vm.log());
    vm.assert_nothing_left();

    let status = vm.start_ready(&[]);
    let pid = Pid::from_raw(status["pid"].as_u64().unwrap() as i32);
    assert!(vm.processes().len() >= 4, "qemu, virtiofsd x2, vhost-device-vsock expected: {:#?}", vm.processes());
    kill(pid, Signal::SIGKILL).unwrap();
    vm.wait_supervisor_exit(Duration::from_secs(10));
    vm.assert_nothing_left();
    // The lock died with the process: status knows it is not running, and a new start works.
    assert_eq!(vm.status()["running"], false);
    vm.start_ready(&[]);
    assert_eq!(vm.ssh_ok("echo back").trim(), "back");
    assert_eq!(vm.stop(&[]), 0);
}

#[test]
fn disk_grows_and_never_shrinks() {
    let mut vm = Instance::new();
    vm.start_ready(&["--disk-size", "2G"]);
    let before: u64 = vm.ssh_ok("df -k /data | tail -1 | awk '{print $2}'").trim().parse().unwrap();
    assert_eq!(vm.stop(&[]), 0);
    vm.start_ready(&["--disk-size", "3G"]);
    let after: u64 = vm.ssh_ok("df -k /data | tail -1 | awk '{print $2}'").trim().parse().unwrap();
    assert!(after > before + 900_000, "file system grew from {before} KiB to {after} KiB");
    assert_eq!(vm.status()["diskBytes"]["size"], 3u64 << 30);
    assert_eq!(vm.stop(&[]), 0);
}

#[test]
fn destroy_and_start_again_keeps_ssh_working() {
    let mut vm = Instance::new();
    vm.start_ready(&[]);
    assert_eq!(vm.stop(&[]), 0);
    let old_known = fs::read_to_string(vm.state().join("ssh/known_hosts")).unwrap();
    assert!(vm.run(&["destroy", "--yes", "--keys"]).status.success());
    vm.start_ready(&[]);
    let new_known = fs::read_to_string(vm.state().join("ssh/known_hosts")).unwrap();
    assert_ne!(old_known, new_known, "new keys were made");
    let out = vm.ssh("echo fresh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("IDENTIFICATION HAS CHANGED"), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "fresh", "{stderr}");
    assert_eq!(vm.stop(&[]), 0);
}

#[test]
fn a_wrong_host_key_is_refused() {
    let mut vm = Instance::new();
    vm.start_ready(&[]);
    // Pin some other key: ssh must refuse rather than trust on first use.
    let other = "darwin-vz-nix ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGdlcm1hbnktaXMtbm90LXRoZS1ndWVzdHMta2V5\n";
    let known = vm.state().join("ssh/known_hosts");
    let original = fs::read_to_string(&known).unwrap();
    fs::write(&known, other).unwrap();
    let out = vm.ssh("echo should-not-run");
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("should-not-run"));
    fs::write(&known, original).unwrap();
    assert_eq!(vm.ssh_ok("echo pinned").trim(), "pinned");
    assert_eq!(vm.stop(&[]), 0);
}

#[test]
fn openssh_reaches_the_guest_through_the_loopback_port_directly() {
    let mut vm = Instance::new();
    vm.start_ready(&[]);
    let port = vm.port().to_string();
    let key = vm.state().join("ssh/id_ed25519");
    let known = vm.state().join("ssh/known_hosts");
    let out = std::process::Command::new("ssh")
        .args([
            "-i",
            key.to_str().unwrap(),
            "-p",
            &port,
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "HostKeyAlias=darwin-vz-nix",
            "-o",
            "BatchMode=yes",
        ])
        .arg(format!("-oUserKnownHostsFile={}", known.display()))
        .args(["builder@127.0.0.1", "uname", "-s"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "Linux", "{}", String::from_utf8_lossy(&out.stderr));
    let _ = BOOT_TIMEOUT;
    assert_eq!(vm.stop(&[]), 0);
}

#[test]
fn interrupt_during_boot_is_an_orderly_stop() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let mut vm = Instance::new();
    vm.spawn_start(&[]);
    let booting = vm.wait_state_in(&["booting"], Duration::from_secs(30));
    kill(Pid::from_raw(booting["pid"].as_u64().unwrap() as i32), Signal::SIGINT).unwrap();
    assert_eq!(vm.wait_supervisor_exit(Duration::from_secs(30)), 0, "{}", vm.log());
    vm.assert_nothing_left();
    assert_eq!(vm.status()["state"], "stopped");
}

#[test]
fn logs_follow_rotation_without_losing_lines() {
    let mut vm = Instance::new();
    let log = vm.state().join("daemon.log");
    vm.start_ready(&["--log-file", log.to_str().unwrap()]);
    assert!(fs::read_to_string(&log).unwrap().contains("ready in"), "the supervisor logs to --log-file");
    // sshd can answer before the guest's "ready" line reaches the console (seen under load): wait for it, so
    // the line is known to be in the file that is about to be rotated.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !fs::read_to_string(vm.state().join("console.log")).unwrap_or_default().contains("dvn-guest: ready") {
        assert!(Instant::now() < deadline, "no ready line on the console:\n{}", vm.console_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    // What newsyslog does: rename, no signal.
    fs::rename(&log, vm.state().join("daemon.log.0")).unwrap();
    fs::rename(vm.state().join("console.log"), vm.state().join("console.log.0")).unwrap();
    assert_eq!(vm.stop(&[]), 0);
    let after = fs::read_to_string(&log).expect("a new daemon.log after rotation");
    assert!(after.contains("the guest shut down"), "{after}");
    let console = fs::read_to_string(vm.state().join("console.log")).expect("a new console.log after rotation");
    assert!(console.contains("dvn-guest: poweroff"), "{console}");
    assert!(fs::read_to_string(vm.state().join("console.log.0")).unwrap().contains("dvn-guest: ready"));
    let out = vm.run(&["logs", "-n", "1"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}

#[test]
fn detach_returns_once_ready_and_reports_a_failed_start() {
    let vm = Instance::new();
    let _vm_lock = common::machine_lock("vm");
    let (kernel, initrd) = common::guest();
    let base = ["--cores", "2", "--memory", "1024", "--disk-size", "2G", "--port", "0"];
    let mut args = vec!["start", "--detach", "--kernel", kernel.to_str().unwrap(), "--initrd", initrd.to_str().unwrap()];
    args.extend(base);
    let out = vm.run(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(vm.status()["state"], "running", "ready when --detach returns");
    assert_eq!(vm.ssh_ok("echo detached").trim(), "detached");
    assert!(fs::read_to_string(vm.state().join("daemon.log")).unwrap().contains("ready in"));
    assert!(vm.run(&["stop"]).status.success());
    assert_eq!(vm.status()["state"], "stopped");
    vm.assert_nothing_left();

    let mut bad = vec!["start", "--detach", "--kernel", "/etc/hostname", "--initrd", initrd.to_str().unwrap()];
    bad.extend(base);
    let out = vm.run(&bad);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("did not start") && stderr.contains("QEMU"), "{stderr}");
    vm.assert_nothing_left();
}
