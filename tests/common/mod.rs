//! Helpers for end-to-end tests: a state directory, the real CLI, the real test guest under QEMU.
//!
//! VM tests take a machine-wide lock so that only one guest boots at a time (TCG on 2 cores), whatever the
//! test runner's parallelism.

#![allow(dead_code)]

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_darwin-vz-nix"))
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The small test guest: DVN_TEST_KERNEL/DVN_TEST_INITRD, else built once by testing/guest/build.
pub fn guest() -> &'static (PathBuf, PathBuf) {
    static GUEST: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    GUEST.get_or_init(|| kernel_and_initrd("DVN_TEST", "testing/guest/build", "target/test-guest"))
}

/// The builder guest (systemd + Nix, testing/guest/builder): DVN_TEST_BUILDER_KERNEL/DVN_TEST_BUILDER_INITRD,
/// else built once by testing/guest/builder/build.
pub fn builder_guest() -> &'static (PathBuf, PathBuf) {
    static GUEST: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    GUEST.get_or_init(|| kernel_and_initrd("DVN_TEST_BUILDER", "testing/guest/builder/build", "target/builder-guest"))
}

/// A guest's kernel and initrd: `<env>_KERNEL`/`<env>_INITRD` when both are set, else built by `script` into `out`
/// (under a machine-wide lock, so concurrent test processes build it once).
fn kernel_and_initrd(env: &str, script: &str, out: &str) -> (PathBuf, PathBuf) {
    if let (Ok(k), Ok(i)) = (std::env::var(format!("{env}_KERNEL")), std::env::var(format!("{env}_INITRD"))) {
        return (k.into(), i.into());
    }
    let out = repo_root().join(out);
    let _build_lock = machine_lock("guest-build");
    let status = Command::new(repo_root().join(script)).arg(&out).status().unwrap_or_else(|e| panic!("running {script}: {e}"));
    assert!(status.success(), "{script} failed");
    (out.join("kernel"), out.join("initrd"))
}

/// An exclusive lock shared by every test process on this machine.
pub fn machine_lock(name: &str) -> File {
    let path = std::env::temp_dir().join(format!("dvn-test-{name}.lock"));
    let file = File::options().create(true).truncate(false).write(true).open(&path).unwrap();
    file.lock().unwrap();
    file
}

pub struct Instance {
    pub dir: tempfile::TempDir,
    /// An empty stand-in for the host's /nix/store (DVN_HOST_NIX_STORE), so that no test depends on whether
    /// this machine has Nix.
    pub host_store: tempfile::TempDir,
    pub supervisor: Option<Child>,
    /// Shared as the host store instead of `host_store` when set (remote build tests share the real /nix/store).
    pub shared_store: Option<PathBuf>,
    _vm_lock: Option<File>,
}

impl Instance {
    /// A fresh state directory (short path: unix socket paths are limited to ~100 bytes).
    pub fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("dvn").tempdir_in("/tmp").unwrap();
        let host_store = tempfile::Builder::new().prefix("dvn-store").tempdir_in("/tmp").unwrap();
        Instance { dir, host_store, supervisor: None, shared_store: None, _vm_lock: None }
    }

    pub fn state(&self) -> &Path {
        self.dir.path()
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin());
        cmd.arg("--state-dir")
            .arg(self.state())
            .args(args)
            .env("DVN_LOG", "info")
            .env("DVN_HOST_NIX_STORE", self.shared_store.as_deref().unwrap_or(self.host_store.path()))
            .stdin(Stdio::null());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// `start` with the test guest and small resources, in the background; output goes to `supervisor.log`.
    pub fn spawn_start(&mut self, extra: &[&str]) {
        self.spawn_start_guest(guest(), extra);
    }

    /// `spawn_start` with another guest image (kernel, initrd).
    pub fn spawn_start_guest(&mut self, (kernel, initrd): &(PathBuf, PathBuf), extra: &[&str]) {
        if self._vm_lock.is_none() {
            self._vm_lock = Some(machine_lock("vm"));
        }
        let log = File::options().create(true).append(true).open(self.log_path()).unwrap();
        let mut args: Vec<String> =
            vec!["start".into(), "--kernel".into(), kernel.display().to_string(), "--initrd".into(), initrd.display().to_string()];
        for (flag, default) in [("--cores", "2"), ("--memory", "1024"), ("--disk-size", "2G"), ("--port", "0")] {
            if !extra.contains(&flag) {
                args.push(flag.into());
                args.push(default.into());
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = self.cmd(&refs).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap();
        self.supervisor = Some(child);
    }

    pub fn log_path(&self) -> PathBuf {
        std::env::temp_dir().join(format!("{}.supervisor.log", self.state().file_name().unwrap().to_string_lossy()))
    }

    pub fn console_tail(&self) -> String {
        let console = fs::read_to_string(self.state().join("console.log")).unwrap_or_default();
        let lines: Vec<&str> = console.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn status(&self) -> Value {
        let out = self.run(&["status", "--json"]);
        assert!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("status is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// Waits until `status --json` has `state == want`.
    pub fn wait_state(&mut self, want: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            if status["state"] == want {
                return status;
            }
            if let Some(child) = self.supervisor.as_mut()
                && let Ok(Some(code)) = child.try_wait()
            {
                panic!("supervisor exited ({code}) while waiting for '{want}'; log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "state '{want}' not reached in {timeout:?}; last status {status}; log:\n{}\nconsole:\n{}",
                self.log(),
                self.console_tail()
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until the state is any of `wanted`.
    pub fn wait_state_in(&mut self, wanted: &[&str], timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            if wanted.iter().any(|w| status["state"] == *w) {
                return status;
            }
            assert!(Instant::now() < deadline, "none of {wanted:?} reached in {timeout:?}; last status {status}");
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn start_ready(&mut self, extra: &[&str]) -> Value {
        self.spawn_start(extra);
        self.wait_state("running", BOOT_TIMEOUT)
    }

    pub fn ssh(&self, command: &str) -> Output {
        self.cmd(&["ssh", "-o", "ConnectTimeout=120", "--", command]).output().unwrap()
    }

    pub fn ssh_ok(&self, command: &str) -> String {
        let out = self.ssh(command);
        assert!(
            out.status.success(),
            "ssh {command:?} failed ({}): {}\nsupervisor log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn port(&self) -> u16 {
        self.status()["sshPort"].as_u64().expect("sshPort") as u16
    }

    /// Stops through the CLI and waits for the supervisor to exit; returns its exit code.
    pub fn stop(&mut self, extra: &[&str]) -> i32 {
        let mut args = vec!["stop"];
        args.extend_from_slice(extra);
        let out = self.run(&args);
        assert!(out.status.success(), "stop failed: {}", String::from_utf8_lossy(&out.stderr));
        self.wait_supervisor_exit(Duration::from_secs(30))
    }

    pub fn wait_supervisor_exit(&mut self, timeout: Duration) -> i32 {
        let mut child = self.supervisor.take().expect("a supervisor was started");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "supervisor still running after {timeout:?}; log:\n{}", self.log());
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Processes whose command line mentions this state directory (QEMU, virtiofsd, vhost-device-vsock, us).
    pub fn processes(&self) -> Vec<String> {
        processes_mentioning(&self.state().display().to_string())
    }

    /// The pid of this VM's helper whose command line names `program`, if it runs.
    pub fn helper_pid(&self, program: &str) -> Option<i32> {
        let line = self.processes().into_iter().find(|p| p.contains(program))?;
        line.split(':').next()?.parse().ok()
    }

    pub fn assert_nothing_left(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = self.processes();
            if left.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "processes left behind: {left:#?}");
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Instance {
    /// After a failed test: the ends of the supervisor log, the helpers' log and the console in the test's
    /// output, and whole copies under target/tmp/failed-vm-tests/ (the state directory is deleted with the test).
    fn keep_logs(&self) {
        let name = self.state().file_name().unwrap().to_string_lossy().into_owned();
        let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("failed-vm-tests").join(&name);
        let _ = fs::create_dir_all(&keep);
        let logs = [
            ("supervisor.log", self.log_path()),
            ("helpers.log", self.state().join("run/helpers.log")),
            ("console.log", self.state().join("console.log")),
        ];
        for (label, path) in logs {
            let Ok(text) = fs::read(&path) else { continue };
            let _ = fs::write(keep.join(label), &text);
            let text = String::from_utf8_lossy(&text);
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- {label} (last 40 lines of {}) ---", path.display());
            eprintln!("{}", lines[lines.len().saturating_sub(40)..].join("\n"));
        }
        eprintln!("--- whole logs kept in {} ---", keep.display());
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if thread::panicking() {
            self.keep_logs();
        }
        if let Some(mut child) = self.supervisor.take() {
            let _ = self.run(&["stop", "--force"]);
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_file(self.log_path());
    }
}

pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) || name == me {
            continue;
        }
        let Ok(raw) = fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(needle) && !cmdline.contains(" status ") {
            found.push(format!("{name}: {cmdline}"));
        }
    }
    found
}

pub fn pid_alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists() && !fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

/// Every file under `dir` with its bytes and mode, to prove a command changed nothing.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>, u32, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(&d).unwrap().flatten().map(|e| e.path()).collect();
        entries.sort();
        for path in entries {
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                out.push((path.clone(), Vec::new(), meta.mode(), 0));
                stack.push(path);
            } else {
                let bytes = if meta.len() < 1 << 20 { fs::read(&path).unwrap_or_default() } else { Vec::new() };
                out.push((path, bytes, meta.mode(), meta.len()));
            }
        }
    }
    out
}

/// A fake `--system` whose kernel-params turn on the test guest's root login (`dvn_test_root_ssh=1`, a hook of
/// the test guest only).
pub fn root_hook_system(vm: &Instance) -> PathBuf {
    let system = vm.host_store.path().join("hostile-system");
    fs::create_dir_all(&system).unwrap();
    fs::write(system.join("init"), "").unwrap();
    fs::write(system.join("kernel-params"), "dvn_test_root_ssh=1\n").unwrap();
    system
}

/// Runs a command in the guest as `user` (builder or root) with the instance's pinned key.
pub fn ssh_as(vm: &Instance, user: &str, command: &str) -> String {
    let (ok, stdout, stderr) = try_ssh_as(vm, user, command);
    assert!(stdout.contains("PROBE") || ok, "ssh as {user}: {command}: {stderr}");
    stdout
}

/// (exit status success, stdout, stderr)
pub fn try_ssh_as(vm: &Instance, user: &str, command: &str) -> (bool, String, String) {
    let port = vm.port().to_string();
    let out = std::process::Command::new("ssh")
        .arg("-i")
        .arg(vm.state().join("ssh/id_ed25519"))
        .args(["-p", &port, "-o", "StrictHostKeyChecking=yes", "-o", "HostKeyAlias=darwin-vz-nix", "-o", "BatchMode=yes"])
        .args(["-o", "ConnectTimeout=120", "-o", "LogLevel=ERROR"])
        .arg(format!("-oUserKnownHostsFile={}", vm.state().join("ssh/known_hosts").display()))
        .arg(format!("{user}@127.0.0.1"))
        .arg(command)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}
