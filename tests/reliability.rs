//! Reliability under faults, end to end with the real test guest: the supervisor killed at random points,
//! racing starts, a corrupted state directory, a VM that dies underneath, a full guest disk, and connections
//! that arrive while an idle stop is under way.
//!
//! The random kill points come from a seed printed at the start (set DVN_SEED to replay a run).

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{BOOT_TIMEOUT, Instance, pid_alive};

/// A small deterministic generator (xorshift64*): the same seed gives the same kill points.
struct Rng(u64);

impl Rng {
    fn from_env() -> Self {
        let seed = std::env::var("DVN_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64 | 1);
        eprintln!("reliability: DVN_SEED={seed}");
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn millis(&mut self, max: u64) -> Duration {
        Duration::from_millis(self.next() % (max + 1))
    }
}

fn sigkill(vm: &mut Instance) {
    let mut child = vm.supervisor.take().expect("a supervisor runs");
    let _ = child.kill();
    let _ = child.wait();
}

/// The host's own check of the guest's ext4 image (read-only, forced): 0 means clean.
fn host_fsck(vm: &Instance) {
    let out = Command::new("e2fsck").args(["-f", "-n"]).arg(vm.state().join("disk.img")).output().expect("e2fsck runs");
    assert_eq!(
        out.status.code(),
        Some(0),
        "e2fsck found problems:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sigkill_at_random_points_loses_no_synced_data_and_leaves_no_helper() {
    let mut rng = Rng::from_env();
    let mut vm = Instance::new();
    let mut written = Vec::new();
    for trial in 0..12u32 {
        let phase = ["boot", "run", "shutdown"][trial as usize % 3];
        match phase {
            "boot" => {
                vm.spawn_start(&[]);
                thread::sleep(rng.millis(3000));
            }
            "run" => {
                vm.start_ready(&[]);
                let token = format!("trial-{trial}-{}", rng.next());
                vm.ssh_ok(&format!("echo {token} > ~/synced-{trial} && sync"));
                written.push((trial, token));
                thread::sleep(rng.millis(1000));
            }
            _ => {
                vm.start_ready(&[]);
                let stop = vm.cmd(&["stop"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
                thread::sleep(rng.millis(400));
                reap_later(stop);
            }
        }
        eprintln!("trial {trial}: SIGKILL during {phase}");
        sigkill(&mut vm);
        vm.assert_nothing_left();
        assert_eq!(vm.status()["running"], false, "trial {trial}: a killed supervisor is not reported running");
    }
    vm.start_ready(&[]);
    for (trial, token) in &written {
        assert_eq!(vm.ssh_ok(&format!("cat ~/synced-{trial}")).trim(), token, "data synced before the kill in trial {trial}");
    }
    assert_eq!(vm.stop(&[]), 0);
    vm.assert_nothing_left();
    host_fsck(&vm);
}

/// Waits for a helper command in the background so that it leaves no zombie.
fn reap_later(mut child: Child) {
    thread::spawn(move || child.wait());
}

#[test]
fn eight_concurrent_starts_make_exactly_one_vm() {
    let vm = Instance::new();
    let _vm_lock = common::machine_lock("vm");
    let (kernel, initrd) = common::guest();
    let args = [
        "start",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cores",
        "2",
        "--memory",
        "1024",
        "--disk-size",
        "2G",
        "--port",
        "0",
    ];
    let mut children: Vec<Child> = (0..8).map(|_| vm.cmd(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()).collect();
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut refused = Vec::new();
    while refused.len() < 7 {
        assert!(Instant::now() < deadline, "only {} of 7 extra starts ended", refused.len());
        let mut i = 0;
        while i < children.len() {
            if children[i].try_wait().unwrap().is_some() {
                refused.push(children.remove(i).wait_with_output().unwrap());
            } else {
                i += 1;
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
    for out in &refused {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "a racing start must fail: {stderr}");
        assert!(stderr.contains("already runs the VM"), "{stderr}");
    }
    let mut winner = children.pop().expect("one start still runs");
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while vm.status()["state"] != "running" {
        assert!(Instant::now() < deadline, "the remaining start never became ready");
        assert!(winner.try_wait().unwrap().is_none(), "the remaining start exited");
        thread::sleep(Duration::from_millis(200));
    }
    let qemus = vm.processes().iter().filter(|p| p.contains("qemu-system")).count();
    assert_eq!(qemus, 1, "exactly one VM: {:#?}", vm.processes());
    assert_eq!(vm.ssh_ok("echo one").trim(), "one");
    assert!(vm.run(&["stop"]).status.success());
    assert_eq!(winner.wait().unwrap().code(), Some(0));
    vm.assert_nothing_left();
}

/// Corrupted state files: a clear error or a safe recovery; never a signal to an unrelated process, never a
/// deleted or truncated disk.
#[test]
fn a_corrupted_state_directory_is_recovered_or_refused_safely() {
    let mut vm = Instance::new();
    assert!(vm.run(&["init"]).status.success());
    let state = vm.state().to_path_buf();

    // vm.pid: garbage, then the pid of an unrelated live process (with and without a start time).
    let mut bystander = Command::new("sleep").arg("600").spawn().unwrap();
    for pid_text in ["garbage\n\u{1}\n".to_string(), format!("{}\n", bystander.id()), format!("{}\n12345\n", bystander.id())] {
        fs::write(state.join("vm.pid"), &pid_text).unwrap();
        let status = vm.status();
        assert_eq!(status["running"], false, "{pid_text:?}: {status}");
        for stop in [&["stop"][..], &["stop", "--force"][..]] {
            let out = vm.run(stop);
            assert!(out.status.code().is_some_and(|c| c <= 1), "{pid_text:?} {stop:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(pid_alive(u64::from(bystander.id())), "{pid_text:?}: an unrelated process was signalled");
    }
    let _ = bystander.kill();
    let _ = bystander.wait();

    // A truncated config.json, an empty known_hosts and a private key of the wrong mode: `start` repairs or
    // refuses by name; whatever it does, ssh with the pinned key works after it starts.
    fs::write(state.join("config.json"), "{\"engine\":\"qe").unwrap();
    let out = vm.run(&["status"]);
    assert!(
        out.status.success() || String::from_utf8_lossy(&out.stderr).contains("config.json"),
        "a truncated config.json: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::write(state.join("ssh/known_hosts"), "").unwrap();
    fs::set_permissions(state.join("ssh/id_ed25519"), fs::Permissions::from_mode(0o644)).unwrap();
    vm.spawn_start(&[]);
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        if let Some(child) = vm.supervisor.as_mut()
            && let Some(code) = child.try_wait().unwrap()
        {
            let log = vm.log();
            assert!(
                !code.success() && (log.contains("known_hosts") || log.contains("id_ed25519")),
                "start ended ({code}) without naming the bad file:\n{log}"
            );
            vm.supervisor = None;
            break;
        }
        // Until `start` has rewritten config.json, `status` may refuse the corrupt one (by name).
        let status = vm.run(&["status", "--json"]);
        if status.status.success() && serde_json::from_slice::<serde_json::Value>(&status.stdout).unwrap()["state"] == "running" {
            assert_eq!(vm.ssh_ok("echo repaired").trim(), "repaired");
            let mode = fs::metadata(state.join("ssh/id_ed25519")).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "the private key is private again");
            assert_eq!(vm.stop(&[]), 0);
            break;
        }
        assert!(Instant::now() < deadline, "neither ready nor refused:\n{}", vm.log());
        thread::sleep(Duration::from_millis(200));
    }

    // disk.img as a directory, then as a symlink: refused, and neither the directory nor the target touched.
    let disk = state.join("disk.img");
    let _ = fs::remove_file(&disk);
    fs::create_dir(&disk).unwrap();
    fs::write(disk.join("precious"), "keep me").unwrap();
    let refused = start_once(&vm);
    assert_ne!(refused.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("disk.img"), "{}", String::from_utf8_lossy(&refused.stderr));
    assert_eq!(fs::read_to_string(disk.join("precious")).unwrap(), "keep me");
    fs::remove_dir_all(&disk).unwrap();

    let outside = tempfile::NamedTempFile::new().unwrap();
    fs::write(outside.path(), vec![7u8; 4096]).unwrap();
    std::os::unix::fs::symlink(outside.path(), &disk).unwrap();
    let refused = start_once(&vm);
    assert_ne!(refused.status.code(), Some(0), "a symlinked disk must not be used");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("disk.img"), "{}", String::from_utf8_lossy(&refused.stderr));
    assert_eq!(fs::read(outside.path()).unwrap(), vec![7u8; 4096], "the link's target was changed");
    vm.assert_nothing_left();
}

/// A `start` that is expected to end by itself (refused before booting).
fn start_once(vm: &Instance) -> std::process::Output {
    let (kernel, initrd) = common::guest();
    vm.run(&["start", "--kernel", kernel.to_str().unwrap(), "--initrd", initrd.to_str().unwrap(), "--disk-size", "2G", "--port", "0"])
}

fn kill_qemu(vm: &Instance) {
    let pid = vm.helper_pid("qemu-system").expect("QEMU runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
}

#[test]
fn a_vm_that_dies_underneath_is_noticed_and_the_next_start_works() {
    // Plain start: the supervisor reports it and exits non-zero; nothing is left.
    let mut vm = Instance::new();
    vm.start_ready(&[]);
    kill_qemu(&vm);
    let code = vm.wait_supervisor_exit(Duration::from_secs(60));
    assert_ne!(code, 0, "a VM that died is a failure:\n{}", vm.log());
    vm.assert_nothing_left();
    assert_eq!(vm.status()["running"], false);
    vm.start_ready(&[]);
    assert_eq!(vm.ssh_ok("echo again").trim(), "again");
    assert_eq!(vm.stop(&[]), 0);

    // On demand: the supervisor reports it in status, waits, and the next connection boots a new VM.
    vm.spawn_start(&["--on-demand"]);
    vm.wait_state("waiting", Duration::from_secs(30));
    assert_eq!(vm.ssh_ok("echo first").trim(), "first");
    kill_qemu(&vm);
    let waiting = vm.wait_state("waiting", Duration::from_secs(60));
    assert!(waiting["lastError"].is_string(), "the crash is reported: {waiting}");
    assert_eq!(vm.ssh_ok("echo second").trim(), "second");
    assert_eq!(vm.status()["bootCount"], 2);
    assert_eq!(vm.stop(&[]), 0);
    vm.assert_nothing_left();
}

/// Guest root panics the kernel (sysrq); the ssh session that did it dies with the guest.
fn panic_the_guest(vm: &Instance) -> Instant {
    let at = Instant::now();
    let _ = common::try_ssh_as(vm, "root", "sync; echo c > /proc/sysrq-trigger");
    at
}

/// What the supervisor may take to notice: QEMU exits at the panic (pvpanic), not at a later timeout.
const PANIC_NOTICED_WITHIN: Duration = Duration::from_secs(20);

#[test]
fn a_guest_kernel_panic_is_noticed_at_once_and_the_next_start_works() {
    let mut vm = Instance::new();
    let system = common::root_hook_system(&vm);
    let system = ["--system", system.to_str().unwrap()];
    // Plain start: the supervisor exits non-zero and says why; nothing is left; the next start works.
    vm.start_ready(&system);
    assert_eq!(common::ssh_as(&vm, "root", "id -u").trim(), "0");
    let at = panic_the_guest(&vm);
    let code = vm.wait_supervisor_exit(PANIC_NOTICED_WITHIN + Duration::from_secs(10));
    let noticed = at.elapsed();
    assert_ne!(code, 0, "a panicked guest is a failure:\n{}", vm.log());
    assert!(noticed < PANIC_NOTICED_WITHIN, "noticed after {noticed:?}");
    assert!(vm.log().contains("kernel panic"), "the log says what happened:\n{}", vm.log());
    vm.assert_nothing_left();
    assert_eq!(vm.status()["running"], false);
    eprintln!("plain start: the panic ended the supervisor after {:.1} s (exit {code})", noticed.as_secs_f64());
    vm.start_ready(&system);
    assert_eq!(vm.ssh_ok("echo again").trim(), "again");
    assert_eq!(vm.stop(&[]), 0);

    // On demand: status reports it, the supervisor waits, and the next connection boots a new VM.
    vm.spawn_start(&["--on-demand", system[0], system[1]]);
    vm.wait_state("waiting", Duration::from_secs(30));
    assert_eq!(vm.ssh_ok("echo first").trim(), "first");
    let at = panic_the_guest(&vm);
    let waiting = vm.wait_state("waiting", PANIC_NOTICED_WITHIN);
    eprintln!("on demand: back to waiting {:.1} s after the panic", at.elapsed().as_secs_f64());
    let error = waiting["lastError"].as_str().unwrap_or_default();
    assert!(error.contains("kernel panic"), "status reports the panic: {waiting}");
    assert_eq!(vm.ssh_ok("echo second").trim(), "second");
    assert_eq!(vm.status()["bootCount"], 2);
    assert_eq!(vm.stop(&[]), 0);
    vm.assert_nothing_left();
}

#[test]
fn a_full_guest_disk_keeps_the_guest_up_and_harms_nothing_on_the_host() {
    use std::os::unix::fs::MetadataExt;
    let mut vm = Instance::new();
    vm.start_ready(&["--disk-size", "1G"]);
    let fill = vm.ssh("dd if=/dev/zero of=$HOME/fill bs=1M 2>&1; sync");
    let text = String::from_utf8_lossy(&fill.stdout);
    assert!(text.contains("No space left"), "the disk never filled: {text}");
    assert_eq!(vm.ssh_ok("echo alive").trim(), "alive", "the guest stays up with a full disk");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let free = vm.status()["guestDiskFreeBytes"].as_u64();
        if free.is_some_and(|f| f < 100 << 20) {
            break;
        }
        assert!(Instant::now() < deadline, "status does not show the full disk: {}", vm.status());
        thread::sleep(Duration::from_millis(500));
    }
    let meta = fs::metadata(vm.state().join("disk.img")).unwrap();
    assert_eq!(meta.len(), 1 << 30, "the image never grows past its size");
    assert!(meta.blocks() * 512 <= (1 << 30) + (1 << 20), "allocated {} bytes", meta.blocks() * 512);
    vm.ssh_ok("rm ~/fill && sync");
    assert_eq!(vm.stop(&[]), 0);
    host_fsck(&vm);
}

/// Connections that land around the idle timeout (some while the idle stop is under way) are all served.
#[test]
fn connections_during_an_idle_stop_are_served_not_dropped() {
    let mut rng = Rng::from_env();
    let mut vm = Instance::new();
    vm.spawn_start(&["--on-demand", "--idle-timeout", "2s"]);
    vm.wait_state("waiting", Duration::from_secs(30));
    for round in 0..6 {
        assert_eq!(vm.ssh_ok("echo up").trim(), "up", "round {round}");
        // The idle stop begins 2 s after the connection closed (checked about once a second).
        thread::sleep(Duration::from_millis(1500) + rng.millis(2000));
        let state = vm.status()["state"].clone();
        let out = vm.ssh("echo served");
        assert!(
            out.status.success(),
            "round {round} (state {state} when connecting): {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            vm.log()
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "served");
    }
    assert_eq!(vm.stop(&[]), 0);
    vm.assert_nothing_left();
}
