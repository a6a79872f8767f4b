//! Real Nix remote builds through the builder guest (testing/guest/builder: systemd, Nix 2.34), with the host's
//! Nix as the client: `--max-jobs 0 --builders 'ssh-ng://builder@127.0.0.1 ...'` through our loopback port, the
//! guest's host key pinned (HostKeyAlias + StrictHostKeyChecking), the real /nix/store shared as the lower layer.
//!
//! Needs a host Nix (`nix-build`; scripts/test installs Debian's nix-bin) and root (Nix without a daemon).
//! Derivations are plain `builtins.derivation`s whose builder is the guest sandbox's /bin/sh (a static busybox):
//! no nixpkgs.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{BOOT_TIMEOUT, Instance, builder_guest};

/// The guest's max-jobs in these tests (`start --max-jobs`), which the builders line carries as the nix-darwin
/// module does: each ssh-ng connection is its own nix-daemon worker in the guest, so the guest's own `max-jobs`
/// does not bound builds arriving on several connections; the host's per-machine limit does.
const MAX_JOBS: usize = 2;

/// A fresh word per test run: the derivations are new, so nothing is already in the host store.
fn nonce() -> String {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    format!("{}-{}", t.as_millis(), std::process::id())
}

fn builder_vm(extra: &[&str]) -> Instance {
    let mut vm = Instance::new();
    vm.shared_store = Some(PathBuf::from("/nix/store"));
    let max_jobs = MAX_JOBS.to_string();
    let mut args = vec!["--memory", "2048", "--disk-size", "4G", "--max-jobs", &max_jobs];
    args.extend_from_slice(extra);
    vm.spawn_start_guest(builder_guest(), &args);
    vm
}

/// Writes the Nix expression to a temporary file and runs `nix-build` on it with the builder only.
struct Client<'a> {
    vm: &'a Instance,
    dir: tempfile::TempDir,
}

impl<'a> Client<'a> {
    fn new(vm: &'a Instance) -> Self {
        Client { vm, dir: tempfile::tempdir().unwrap() }
    }

    fn build(&self, expr: &str, extra: &[&str]) -> Output {
        let file = self.dir.path().join("default.nix");
        fs::write(&file, expr).unwrap();
        let state = self.vm.state();
        let port = self.vm.port();
        let ssh_opts = format!(
            "-p {port} -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={} \
             -o GlobalKnownHostsFile=/dev/null -o HostKeyAlias=darwin-vz-nix -o ConnectTimeout=180",
            state.join("ssh/known_hosts").display()
        );
        let builders = format!("ssh-ng://builder@127.0.0.1 x86_64-linux {} {MAX_JOBS} 1", state.join("ssh/id_ed25519").display());
        Command::new("nix-build")
            .arg(&file)
            .args(["--no-out-link", "--max-jobs", "0", "--builders", &builders])
            .args(extra)
            .env("NIX_SSHOPTS", ssh_opts)
            // Root without a daemon: no build users needed on the host (it builds nothing), no binary cache.
            .env("NIX_CONFIG", "substituters =\nbuild-users-group =\n")
            .env_remove("NIX_REMOTE")
            .stdin(Stdio::null())
            .output()
            .expect("running nix-build (scripts/test installs the host's Nix: Debian's nix-bin)")
    }

    fn build_ok(&self, expr: &str) -> Vec<PathBuf> {
        let out = self.build(expr, &[]);
        assert!(
            out.status.success(),
            "nix-build failed ({}):\n{}\nsupervisor log:\n{}\nconsole:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.vm.log(),
            self.vm.console_tail()
        );
        String::from_utf8_lossy(&out.stdout).lines().map(PathBuf::from).collect()
    }
}

/// A derivation built by the guest sandbox's /bin/sh; `script` writes $out.
fn drv(name: &str, script: &str) -> String {
    format!(
        r#"(derivation {{ name = "{name}"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" {script:?} ]; }})"#,
        script = script
    )
}

fn forget(paths: &[PathBuf]) {
    // Keep the host store tidy; failures (a path still referenced) are harmless.
    let _ = Command::new("nix-store").arg("--delete").args(paths).env("NIX_CONFIG", "build-users-group =\n").output();
}

/// Several [start, end] intervals (guest uptime): the most that overlap at once.
fn max_overlap(intervals: &[(f64, f64)]) -> usize {
    intervals.iter().map(|&(s, _)| intervals.iter().filter(|&&(s2, e2)| s2 <= s && s < e2).count()).max().unwrap_or(0)
}

fn assert_in_host_store(path: &Path) {
    assert!(path.starts_with("/nix/store"), "{path:?}");
    let verify = Command::new("nix-store").args(["--query", "--hash"]).arg(path).output().unwrap();
    assert!(verify.status.success(), "{path:?} is not valid in the host store: {}", String::from_utf8_lossy(&verify.stderr));
}

#[test]
fn remote_builds_one_several_a_chain_and_a_failure_through_the_builder_guest() {
    let mut vm = builder_vm(&["--idle-timeout", "0"]);
    let ready = vm.wait_state("running", BOOT_TIMEOUT);
    eprintln!("builder guest ready in {:.1} s", ready["lastBootSeconds"].as_f64().unwrap_or(0.0));
    let client = Client::new(&vm);
    let n = nonce();

    // One derivation: built in the guest's sandbox, its output copied back into the host store.
    let started = Instant::now();
    let one = client.build_ok(&drv(&format!("dvn-one-{n}"), "echo built-in-the-sandbox-of $(uname -n) > $out"));
    eprintln!("one derivation: {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(one.len(), 1);
    assert_in_host_store(&one[0]);
    // The sandbox's host name is Nix's `localhost`: it really ran in the guest's build sandbox.
    assert_eq!(fs::read_to_string(&one[0]).unwrap().trim(), "built-in-the-sandbox-of localhost");
    // The agent answers: the guest's address from its DHCP lease.
    let status = vm.status();
    assert!(status["guestIp"].as_str().is_some_and(|ip| !ip.is_empty()), "no guest IP in {status}");

    // Several at once: 4 derivations of 10 s each (an ssh connection takes ~3 s under TCG), the machine's max-jobs
    // (2) honoured, and more than one at a time.
    let started = Instant::now();
    let list: Vec<String> = (0..4)
        .map(|i| drv(&format!("dvn-par-{n}-{i}"), "read s _ < /proc/uptime; sleep 10; read e _ < /proc/uptime; echo $s $e > $out"))
        .collect();
    let several_expr = format!("[ {} ]", list.join(" "));
    // Meanwhile the agent reports them (the count the idle stop relies on).
    let (several, most_in_flight) = std::thread::scope(|scope| {
        let build = scope.spawn(|| client.build_ok(&several_expr));
        let mut most = 0;
        while !build.is_finished() {
            most = most.max(vm.status()["buildsInFlight"].as_u64().unwrap_or(0));
            std::thread::sleep(Duration::from_millis(300));
        }
        (build.join().unwrap(), most)
    });
    eprintln!("4 derivations: {:.1} s; the agent saw up to {most_in_flight} builds in flight", started.elapsed().as_secs_f64());
    assert!(most_in_flight >= 1, "the agent never reported a build in flight");
    let intervals: Vec<(f64, f64)> = several
        .iter()
        .map(|p| {
            let text = fs::read_to_string(p).unwrap();
            let mut it = text.split_whitespace().map(|x| x.parse::<f64>().unwrap());
            (it.next().unwrap(), it.next().unwrap())
        })
        .collect();
    let overlap = max_overlap(&intervals);
    eprintln!("build intervals (guest uptime): {intervals:?}; at most {overlap} at once");
    assert!(overlap <= MAX_JOBS, "more than max-jobs ({MAX_JOBS}) builds at once: {intervals:?}");
    assert!(overlap >= 2, "the builds never ran in parallel: {intervals:?}");

    // A chain: b reads a's output, so a is built (or already there) before b, both in the guest.
    let a = drv(&format!("dvn-chain-a-{n}"), "echo a > $out");
    let b = format!(
        r#"let a = {a}; in derivation {{ name = "dvn-chain-b-{n}"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "read x < ${{a}}; echo $x-then-b > $out" ]; }}"#
    );
    let chain = client.build_ok(&b);
    assert_eq!(fs::read_to_string(&chain[0]).unwrap().trim(), "a-then-b");

    // A lock the host holds on an output's lock file (the host building the same path) does not block the guest:
    // the guest sees the file through the overlay's lower layer, but Nix opens it read-write, which copies it up,
    // so the guest locks its own copy (issue 12, item 6). The build runs in the guest itself, not through the host.
    let locked = drv(&format!("dvn-host-locked-{n}"), "echo built-despite-the-host-lock > $out");
    let eval = Command::new("nix-instantiate")
        .args(["--eval", "-E", &format!("{locked}.outPath")])
        .env("NIX_CONFIG", "build-users-group =\n")
        .output()
        .unwrap();
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    let out_path = String::from_utf8_lossy(&eval.stdout).trim().trim_matches('"').to_string();
    let lock_file = format!("{out_path}.lock");
    // --no-fork: the lock is held by the process we kill at the end, and no stray child keeps our output open.
    let mut holder =
        Command::new("flock").args(["--no-fork", &lock_file, "sleep", "600"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !Path::new(&lock_file).exists() {
        assert!(Instant::now() < deadline, "flock never created {lock_file}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = Instant::now();
    let built = vm.ssh_ok(&format!("timeout 300 nix-build --no-out-link -E '{locked}' && cat {out_path}"));
    eprintln!("guest build under a host-held lock: {:.1} s", started.elapsed().as_secs_f64());
    assert!(built.contains("built-despite-the-host-lock"), "{built}");
    assert!(holder.try_wait().unwrap().is_none(), "the host's lock holder is still there");
    assert_eq!(fs::metadata(&lock_file).unwrap().len(), 0, "the host's lock file is untouched");
    let _ = holder.kill();
    let _ = holder.wait();
    let _ = fs::remove_file(&lock_file);

    // A failing build: non-zero status, its log on the host, and the VM stays healthy.
    let out = client.build(&drv(&format!("dvn-fail-{n}"), "echo dvn-this-build-fails-on-purpose >&2; exit 3"), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a failing build succeeded: {stderr}");
    assert!(stderr.contains("dvn-this-build-fails-on-purpose"), "the build log did not reach the host:\n{stderr}");
    let status = vm.status();
    assert_eq!(status["state"], "running", "{status}");
    let after = client.build_ok(&drv(&format!("dvn-after-failure-{n}"), "echo still-fine > $out"));
    assert_eq!(fs::read_to_string(&after[0]).unwrap().trim(), "still-fine");

    let mut all = [one, several, chain, after].concat();
    all.sort();
    forget(&all);
    assert_eq!(vm.stop(&[]), 0);
    vm.assert_nothing_left();
}

#[test]
fn on_demand_the_first_build_boots_the_builder_and_succeeds() {
    let mut vm = builder_vm(&["--on-demand", "--idle-timeout", "0"]);
    let waiting = vm.wait_state("waiting", Duration::from_secs(60));
    assert_eq!(waiting["bootCount"], 0, "the VM is down when the build is asked for");
    let client = Client::new(&vm);
    let started = Instant::now();
    // No retry: the first connection must wait for the boot and then build.
    let built = client.build_ok(&drv(&format!("dvn-on-demand-{}", nonce()), "echo cold > $out"));
    eprintln!("cold build (boot included): {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(fs::read_to_string(&built[0]).unwrap().trim(), "cold");
    assert_eq!(vm.status()["bootCount"], 1);
    forget(&built);
    assert_eq!(vm.stop(&[]), 0);
    vm.assert_nothing_left();
}

/// The host's Nix daemon on a socket of the test's own (Debian's nix-bin 2.8, the real /nix/store), the upstream
/// of the host-store filter. Killed on drop.
struct HostDaemon {
    child: std::process::Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl HostDaemon {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("daemon.sock");
        let child = Command::new("nix-daemon")
            .env("NIX_DAEMON_SOCKET_PATH", &socket)
            .env("NIX_CONFIG", "build-users-group =\nsubstituters =\n")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("running nix-daemon (scripts/test installs the host's Nix: Debian's nix-bin)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "nix-daemon never made {socket:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        HostDaemon { child, socket, _dir: dir }
    }
}

impl Drop for HostDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a host Nix command as root without a daemon; its stdout, trimmed.
fn host_nix(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .env("NIX_CONFIG", "build-users-group =\nexperimental-features = nix-command\n")
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A directory of `size` random bytes in `file` added to the host store (after the VM booted: the guest must see
/// a live view, not a snapshot).
fn add_random_input(dir: &Path, name: &str, file: &str, size: usize) -> PathBuf {
    let src = dir.join(name);
    fs::create_dir_all(&src).unwrap();
    let mut bytes = vec![0u8; size];
    let mut x: u64 = 0x9e3779b97f4a7c15 ^ size as u64 ^ (std::process::id() as u64) << 20 ^ nonce().len() as u64;
    for chunk in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    bytes[..8].copy_from_slice(&SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos().to_le_bytes()[..8]);
    fs::write(src.join(file), bytes).unwrap();
    PathBuf::from(host_nix(&["nix-store", "--add", src.to_str().unwrap()]))
}

fn bytes_to_guest(vm: &Instance) -> u64 {
    vm.status()["bytesToGuest"].as_u64().expect("bytesToGuest in status --json")
}

#[test]
fn inputs_in_the_host_store_never_cross_the_wire_and_the_guest_cannot_write_the_host_store() {
    let daemon = HostDaemon::start();
    let socket = daemon.socket.to_str().unwrap().to_string();
    let mut vm = builder_vm(&["--idle-timeout", "0", "--host-nix-daemon", &socket]);
    vm.wait_state("running", BOOT_TIMEOUT);
    let client = Client::new(&vm);
    let n = nonce();
    let inputs = tempfile::tempdir().unwrap();

    // A large input, added to the host store after the boot: read by the build from the shared lower layer,
    // known to the guest's Nix through the filter; the ssh connection carries the derivation, not the input.
    const BIG: usize = 32 << 20;
    let big = add_random_input(inputs.path(), &format!("dvn-big-{n}"), "data", BIG);
    let before = bytes_to_guest(&vm);
    let started = Instant::now();
    let read_big = format!(
        r#"derivation {{ name = "dvn-reads-big-{n}"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "wc -c < ${{builtins.storePath {big:?}}}/data > $out" ]; }}"#
    );
    let built = client.build_ok(&read_big);
    let sent = bytes_to_guest(&vm) - before;
    eprintln!("{BIG}-byte input in the host store: {sent} bytes to the guest, {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(fs::read_to_string(&built[0]).unwrap().trim(), BIG.to_string());
    assert!(sent < (BIG / 100) as u64, "the input crossed the wire: {sent} bytes sent for a {BIG}-byte input");

    // A path whose files carry Nix's case-hack names (what a store on a case-insensitive APFS volume holds) is
    // never served from the shared files: the filter calls it not valid, so it is uploaded as a NAR.
    const HACKED: usize = 4 << 20;
    let hacked = add_random_input(inputs.path(), &format!("dvn-casehack-{n}"), "README~nix~case~hack~1", HACKED);
    let before = bytes_to_guest(&vm);
    let read_hacked = format!(
        r#"derivation {{ name = "dvn-reads-casehack-{n}"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "ls ${{builtins.storePath {hacked:?}}} > $out" ]; }}"#
    );
    let listed = client.build_ok(&read_hacked);
    let sent = bytes_to_guest(&vm) - before;
    eprintln!("{HACKED}-byte case-hacked input: {sent} bytes to the guest");
    assert!(sent >= HACKED as u64, "a case-hacked path was served from the shared files ({sent} bytes sent)");
    assert_eq!(fs::read_to_string(&listed[0]).unwrap().trim(), "README~nix~case~hack~1");

    // A guest build that uses a host path makes it a temporary root on the host for as long as it runs: the
    // host's GC cannot delete it underneath. The guest builds by itself (no host client holding roots).
    let held = add_random_input(inputs.path(), &format!("dvn-held-{n}"), "data", 1 << 20);
    let slow = format!(
        r#"derivation {{ name = "dvn-holds-{n}"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "sleep 25; wc -c < ${{builtins.storePath {held:?}}}/data > $out" ]; }}"#
    );
    std::thread::scope(|scope| {
        let guest_build = scope.spawn(|| vm.ssh(&format!("timeout 300 nix-build --no-out-link -E '{slow}'")));
        std::thread::sleep(Duration::from_secs(12));
        let delete = Command::new("nix-store").arg("--delete").arg(&held).env("NIX_CONFIG", "build-users-group =\n").output().unwrap();
        let said = String::from_utf8_lossy(&delete.stderr);
        eprintln!("host GC of a path a guest build uses: {} ({})", delete.status, said.trim());
        assert!(!delete.status.success() && held.exists(), "the host deleted a path a running guest build uses: {said}");
        assert!(said.contains("alive"), "refused for another reason than a root: {said}");
        let out = guest_build.join().unwrap();
        assert!(out.status.success(), "the guest build failed: {}", String::from_utf8_lossy(&out.stderr));
    });

    // A write through the same channel is refused and the host store is unchanged: the host's Nix client speaks to
    // the VM's own listener for host port 5000 (where vhost-device-vsock delivers the guest's connections), so the
    // write takes the path of a guest connection from that socket on.
    let file = inputs.path().join("planted");
    fs::write(&file, format!("planted-by-the-guest-{n}")).unwrap();
    let planned = host_nix(&["nix", "store", "add-file", "--dry-run", file.to_str().unwrap()]);
    let channel = format!("unix://{}", vm.state().join("run/vsock.sock_5000").display());
    for write in [vec!["nix-store", "--store", &channel, "--add", file.to_str().unwrap()], vec!["nix-store", "--store", &channel, "--gc"]] {
        let attempt = Command::new(write[0]).args(&write[1..]).env("NIX_CONFIG", "build-users-group =\n").output().unwrap();
        let said = String::from_utf8_lossy(&attempt.stderr);
        eprintln!("{}: {} ({})", write[3], attempt.status, said.trim());
        assert!(!attempt.status.success(), "{write:?} through the host-store channel succeeded");
        assert!(said.contains("refused"), "no refusal from the filter: {said}");
    }
    assert!(!Path::new(&planned).exists(), "{planned} appeared in the host store");
    assert!(big.exists() && hacked.exists(), "the host store lost paths");

    // Guest GC frees only the upper layer: outputs the host also has (copied back) are deleted from the upper
    // layer behind the overlay, the remount hook runs, and no whiteout hides a host path.
    // (Whiteouts of `<path>.lock` files remain: they hide the host's lock files, not store paths, and the guest
    // makes its own lock files anyway.)
    let gc = vm.ssh_ok("nix-store --gc 2>&1 | tail -2; find /data/nix/upper -maxdepth 1 -type c");
    eprintln!("guest GC: {gc}");
    let hiding: Vec<&str> = gc.lines().filter(|l| l.starts_with("/data/nix/upper/") && !l.ends_with(".lock")).collect();
    assert!(hiding.is_empty(), "guest GC left whiteouts over host paths in the upper layer: {hiding:?}");
    let visible = vm.ssh_ok(&format!("cat {}; ls {}", built[0].display(), big.display()));
    assert!(visible.contains(&BIG.to_string()) && visible.contains("data"), "host paths hidden after guest GC: {visible}");

    let mut all = [built, listed].concat();
    all.extend([big, hacked, held]);
    forget(&all);
    assert_eq!(vm.stop(&[]), 0);
    vm.assert_nothing_left();
    drop(daemon);
}
