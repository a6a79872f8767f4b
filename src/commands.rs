//! One function per subcommand. Errors carry context; `BadInput` means exit code 2.

use std::fs;
use std::io::{self, IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use dvn::cli::{Cli, Command, DEFAULT_SSH_PORT, DebugCommand, StartArgs, split_ssh_args};
use dvn::control::{self, ControlRequest, StatusReport, VmState};
use dvn::engine::{self, EngineKind};
use dvn::instance::lock::{self, InstanceLock};
use dvn::instance::process::PidRecord;
use dvn::instance::{self, EffectiveConfig, Layout, disk};
use dvn::supervisor::{Options, Supervisor};
use dvn::units;
use dvn::{doctor, guest_config, launch, listener, ssh};

/// Bad usage or bad input: exit code 2, nothing changed on disk.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// Whether an error is about the input (exit code 2): a [`BadInput`], or a state directory that is not one.
pub fn is_bad_input(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<BadInput>().is_some()
            || e.downcast_ref::<instance::InstanceError>().is_some_and(instance::InstanceError::is_bad_input)
            || e.downcast_ref::<launch::StartError>().is_some_and(|e| e.exit_code() == 2)
    })
}

fn bad_input(message: impl Into<String>) -> anyhow::Error {
    BadInput(message.into()).into()
}

/// Sets up logging, to stderr or to a log file.
pub type InitLogging = fn(Option<&Path>) -> io::Result<()>;

pub fn run(cli: Cli, init_logging: InitLogging) -> Result<ExitCode> {
    let log_file = match &cli.command {
        Command::Start(args) => args.log_file.clone(),
        _ => None,
    };
    if log_file.is_none() {
        init_logging(None)?;
    }
    let state_dir = match cli.state_dir.clone() {
        Some(dir) => dir,
        None => instance::default_state_dir()?,
    };
    let layout = Layout::new(absolute(&state_dir));
    if fs::metadata(&layout.root).is_ok_and(|m| !m.is_dir()) {
        return Err(bad_input(format!("--state-dir {}: is not a directory", layout.root.display())));
    }
    let engine = cli.engine.unwrap_or_else(EngineKind::platform_default);
    match cli.command {
        Command::Start(args) => start(&layout, engine, &args, init_logging),
        Command::Init => init(&layout),
        Command::Ssh { ssh_options, command } => {
            let (options, remote) = split_ssh_args(&ssh_options, &command);
            ssh_into(&layout, &options, &remote)
        }
        Command::Stop { force, timeout } => stop(&layout, force, Duration::from_secs(timeout)),
        Command::Status { json } => status(&layout, json),
        Command::Destroy { yes, keys } => destroy(&layout, yes, keys),
        Command::Logs { follow, lines } => logs(&layout, follow, lines),
        Command::Doctor { port } => doctor_cmd(&layout, port),
        Command::Debug(DebugCommand::ShiftGuestClock { seconds }) => {
            control::request(&layout.control_socket(), &ControlRequest::ShiftGuestClock { seconds }, Duration::from_secs(15))
                .context("shifting the guest clock")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Debug(DebugCommand::VmCommand { qemu_fd, passt_fd }) => print_vm_command(&layout, qemu_fd, passt_fd),
    }
}

/// The qemu engine's launch plan for the last `start` of this state directory, as JSON.
fn print_vm_command(layout: &Layout, qemu_fd: i32, passt_fd: i32) -> Result<ExitCode> {
    let Some(config) = EffectiveConfig::load(layout)? else {
        return Err(bad_input(format!("{} has no config.json: run `darwin-vz-nix start` there once", layout.root.display())));
    };
    let mac = fs::read_to_string(layout.mac_file()).with_context(|| format!("reading {}", layout.mac_file().display()))?;
    let spec = launch::vm_spec(layout, &config, mac.trim().to_string());
    let engine = engine::qemu::QemuEngine::detect().context("the hypervisor is not usable")?;
    let (accel, _) = engine.choose_accel();
    let plan = engine.launch_plan(&spec, accel, engine::qemu::NetFds { qemu: qemu_fd, passt: passt_fd });
    let json = serde_json::json!({
        "accel": format!("{accel:?}").to_lowercase(),
        "helpers": plan.helpers,
        "qemu": plan.qemu,
        "vsockSocket": plan.vsock_socket(),
        "qmpSocket": plan.qmp_socket(),
        "vsockDevicePath": engine::qemu::LaunchPlan::vsock_device_path(),
    });
    println!("{}", serde_json::to_string_pretty(&json).expect("json"));
    Ok(ExitCode::SUCCESS)
}

fn absolute(path: &Path) -> std::path::PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn start(layout: &Layout, engine_kind: EngineKind, args: &StartArgs, init_logging: InitLogging) -> Result<ExitCode> {
    // Everything that can be wrong with the input is found before the first write (the log file included).
    let (config, _) = launch::validate_start(args, engine_kind, layout, &args.host_nix_store)?;
    // A taken port is bad input too, so the listener is opened before the first write and handed on. A
    // supervisor already running here holds the port itself: the lock below says so better.
    let listener = if lock::is_held(layout) { None } else { Some(open_listener(config.port)?) };
    if let Some(path) = &args.log_file {
        init_logging(Some(path))?;
    }
    let engine = engine::for_kind(engine_kind).context("the hypervisor is not usable")?;
    // The background copy carries DVN_DETACHED, so it never detaches again (whatever flag spelling was used).
    if args.detach && std::env::var_os(DETACHED_ENV).is_none() {
        // The background copy binds the port itself; this one only checked it.
        drop(listener);
        return start_detached(layout, args);
    }

    layout.create()?;
    let _lock = InstanceLock::acquire(layout)?;
    let keys = ssh::ensure_keys(layout)?;
    let registration = launch::nix_registration(&config, Path::new("nix-store")).unwrap_or_else(|err| {
        tracing::warn!("cannot register the guest system's store paths ({err}); the guest will not garbage-collect its store");
        None
    });
    let settings = launch::guest_settings(&config, now_unix_ms());
    guest_config::publish(
        layout,
        &guest_config::GuestFiles { settings: &settings, keys: &keys, nix_registration: registration.as_deref() },
    )?;
    if config.ephemeral {
        // A fresh sparse disk each start; the guest formats it.
        disk::remove(layout)?;
        disk::apply(layout, disk::DiskPlan::Create(args.disk_size))?;
    } else {
        // Decided again under the lock: another start may have changed the disk since validation.
        let plan = disk::plan(layout, args.disk_size)?.map_err(|e| bad_input(e.to_string()))?;
        if let disk::DiskPlan::Grow { from, to } = plan {
            tracing::info!("growing the disk from {from} to {to}; the guest grows its file system at boot");
        }
        disk::apply(layout, plan)?;
    }
    config.save(layout)?;
    let mac = instance::ensure_mac_address(layout)?;
    let (listener, origin) = match listener {
        Some(opened) => opened,
        None => listener::open(config.port)?,
    };
    let spec = launch::vm_spec(layout, &config, mac);
    engine.check(&spec).context("the hypervisor cannot run this VM safely")?;
    PidRecord::for_self().write(layout)?;
    let options = Options { verbose: args.verbose, ..Options::default() };
    let supervisor = Supervisor::new(layout.clone(), config, spec, engine, listener, options)?;
    tracing::info!(
        "darwin-vz-nix {} (pid {}), state {}, ssh proxy on 127.0.0.1:{} ({origin:?})",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        layout.root.display(),
        supervisor.port()
    );
    let result = supervisor.run();
    let _ = fs::remove_file(layout.pid_file());
    result?;
    Ok(ExitCode::SUCCESS)
}

const DETACHED_ENV: &str = "DVN_DETACHED";

/// The proxy's listener; a port someone else holds is bad input (exit 2).
fn open_listener(port: u16) -> Result<(std::net::TcpListener, listener::Origin)> {
    listener::open(port).map_err(|e| match e {
        listener::ListenError::InUse { .. } => bad_input(e.to_string()),
        other => other.into(),
    })
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Runs the same `start` in the background (own session, log to a file) and waits until it is ready.
fn start_detached(layout: &Layout, args: &StartArgs) -> Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    if lock::is_held(layout) {
        bail!("darwin-vz-nix already runs the VM in {}; stop it with `darwin-vz-nix stop`", layout.root.display());
    }
    layout.create()?;
    let log = args.log_file.clone().unwrap_or_else(|| layout.root.join("daemon.log"));
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).filter(|a| a != "--detach" && a != "-d").collect();
    if args.log_file.is_none() {
        argv.extend(["--log-file".into(), log.clone().into_os_string()]);
    }
    let mut child = std::process::Command::new(std::env::current_exe().context("finding this program")?);
    child
        .args(&argv)
        .env(DETACHED_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe; it detaches the supervisor from this terminal's session.
    unsafe {
        child.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(io::Error::from));
    }
    let mut child = child.spawn().context("starting the background supervisor")?;
    let want = if args.on_demand { VmState::Waiting } else { VmState::Running };
    let progress = dvn::progress::Progress::start("starting in the background");
    let deadline = Instant::now() + Options::default().boot_timeout + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            progress.fail(&format!("the supervisor exited ({status})"));
            let tail = fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = tail.lines().collect();
            bail!("darwin-vz-nix did not start; the end of {}:\n{}", log.display(), lines[lines.len().saturating_sub(5)..].join("\n"));
        }
        if let Some(status) = live_status(layout).filter(|s| s.state == want) {
            let port = status.ssh_port.map(|p| format!(", ssh on 127.0.0.1:{p}")).unwrap_or_default();
            progress.finish(&format!("running in the background (pid {}{port}); log: {}", child.id(), log.display()));
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() > deadline {
            bail!("darwin-vz-nix (pid {}) is not ready yet; see {} and `darwin-vz-nix status`", child.id(), log.display());
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn init(layout: &Layout) -> Result<ExitCode> {
    layout.create()?;
    // Under the lock, so a concurrent start never pins one host key while the guest gets another. A running
    // supervisor made the keys already: nothing to do then.
    let _lock = match InstanceLock::acquire(layout) {
        Ok(lock) => lock,
        Err(lock::LockError::Busy { .. }) => return Ok(ExitCode::SUCCESS),
        Err(e) => return Err(e.into()),
    };
    ssh::ensure_keys(layout)?;
    Ok(ExitCode::SUCCESS)
}

/// The live status from the supervisor, or None when none runs.
fn live_status(layout: &Layout) -> Option<StatusReport> {
    if !lock::is_held(layout) {
        return None;
    }
    control::request(&layout.control_socket(), &ControlRequest::Status, Duration::from_secs(5)).ok()?.status
}

fn ssh_into(layout: &Layout, options: &[String], remote: &[String]) -> Result<ExitCode> {
    if !layout.client_key().exists() {
        bail!("no ssh key in {}: start the VM first (`darwin-vz-nix start ...`) or run `darwin-vz-nix init`", layout.root.display());
    }
    let port = match live_status(layout) {
        Some(status) => status.ssh_port.unwrap_or(DEFAULT_SSH_PORT),
        None => match EffectiveConfig::load(layout)? {
            // launchd or systemd may own the port and start us on the first connection.
            Some(config) if config.port != 0 => config.port,
            _ => bail!("the VM is not running; start it with `darwin-vz-nix start --kernel ... --initrd ...`"),
        },
    };
    let args = ssh::ssh_args(layout, port, options, remote);
    let err = exec("ssh", &args);
    Err(err).context("running ssh (is OpenSSH installed?)")
}

fn exec(program: &str, args: &[String]) -> io::Error {
    use std::os::unix::process::CommandExt;
    std::process::Command::new(program).args(args).exec()
}

fn stop(layout: &Layout, force: bool, timeout: Duration) -> Result<ExitCode> {
    if !lock::is_held(layout) {
        println!("darwin-vz-nix is not running (state {})", layout.root.display());
        return Ok(ExitCode::SUCCESS);
    }
    let progress = dvn::progress::Progress::start(if force { "forcing the VM off" } else { "shutting the guest down" });
    let asked = control::request(&layout.control_socket(), &ControlRequest::Stop { force }, Duration::from_secs(5));
    if let Err(err) = &asked {
        tracing::warn!("the supervisor does not answer on its control socket ({err}); signalling it");
        signal_supervisor(layout, force)?;
    }
    if wait_released(layout, timeout) {
        progress.finish("stopped");
        return Ok(ExitCode::SUCCESS);
    }
    if !force {
        progress.step(&format!("no clean shutdown within {} s: forcing it", timeout.as_secs()));
        if control::request(&layout.control_socket(), &ControlRequest::Stop { force: true }, Duration::from_secs(5)).is_err() {
            signal_supervisor(layout, true)?;
        }
        if wait_released(layout, Duration::from_secs(15)) {
            progress.finish("stopped (forced)");
            return Ok(ExitCode::SUCCESS);
        }
    }
    signal_supervisor(layout, true)?;
    if wait_released(layout, Duration::from_secs(5)) {
        progress.finish("stopped (killed)");
        return Ok(ExitCode::SUCCESS);
    }
    progress.fail("still running");
    bail!("darwin-vz-nix in {} did not stop; see {}", layout.root.display(), layout.console_log().display())
}

/// Signals the supervisor, only if the pid file provably names it (pid and start time).
fn signal_supervisor(layout: &Layout, kill: bool) -> Result<()> {
    use nix::sys::signal::{Signal, kill as send};
    let record = PidRecord::read(layout)
        .filter(PidRecord::is_live)
        .context("the lock is held but vm.pid does not name a live darwin-vz-nix; not signalling anything")?;
    let signal = if kill { Signal::SIGKILL } else { Signal::SIGTERM };
    send(nix::unistd::Pid::from_raw(record.pid as i32), signal).with_context(|| format!("sending {signal} to pid {}", record.pid))?;
    Ok(())
}

fn wait_released(layout: &Layout, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !lock::is_held(layout) {
            return true;
        }
        thread::sleep(Duration::from_millis(100));
    }
    !lock::is_held(layout)
}

fn stopped_status(layout: &Layout) -> Result<StatusReport> {
    let config = EffectiveConfig::load(layout)?;
    Ok(StatusReport {
        engine: config.as_ref().map(|c| c.engine.as_str().to_string()),
        idle_timeout_seconds: config.as_ref().map_or(0, |c| c.idle_timeout_seconds),
        disk_bytes: disk::usage(layout).map(|(allocated, size)| control::DiskBytes { allocated, size }),
        ..StatusReport::stopped(layout.root.display().to_string())
    })
}

fn status(layout: &Layout, json: bool) -> Result<ExitCode> {
    let report = match live_status(layout) {
        Some(report) => report,
        None if lock::is_held(layout) => {
            // Running but not answering: say what we know rather than guess.
            let mut report = stopped_status(layout)?;
            report.running = true;
            report.pid = PidRecord::read(layout).filter(PidRecord::is_live).map(|r| r.pid);
            report.last_error = Some("the supervisor does not answer on its control socket".into());
            report
        }
        None => stopped_status(layout)?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", human_status(&report));
    }
    Ok(ExitCode::SUCCESS)
}

fn human_status(r: &StatusReport) -> String {
    let mut out = String::new();
    let state = serde_json::to_value(r.state).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
    match r.pid {
        Some(pid) => out += &format!("darwin-vz-nix: {state} (pid {pid}, engine {})\n", r.engine.as_deref().unwrap_or("?")),
        None => out += "darwin-vz-nix: stopped\n",
    }
    if let Some(port) = r.ssh_port {
        out += &format!("  ssh:        127.0.0.1:{port}  (darwin-vz-nix ssh)\n");
    }
    if let Some(up) = r.uptime_seconds {
        out += &format!("  uptime:     {}\n", units::human_duration(up));
    }
    if let Some(ip) = &r.guest_ip {
        out += &format!("  guest IP:   {ip}\n");
    }
    if r.running {
        let idle = match (r.idle_seconds, r.idle_timeout_seconds) {
            (Some(idle), 0) => format!("; idle {}", units::human_duration(idle)),
            (Some(idle), t) => format!("; idle {} of {}", units::human_duration(idle), units::human_duration(t as f64)),
            (None, _) => String::new(),
        };
        out += &format!("  activity:   {} connection(s), {} build(s){idle}\n", r.connections, r.builds_in_flight);
    }
    if let Some(offset) = r.clock_offset_ms {
        out += &format!("  clock:      guest off by {offset} ms\n");
    }
    if let Some(d) = r.disk_bytes {
        let free = r.guest_disk_free_bytes.map(|f| format!(", {} free in the guest", units::human_bytes(f))).unwrap_or_default();
        out +=
            &format!("  disk:       {} of {} allocated on the host{free}\n", units::human_bytes(d.allocated), units::human_bytes(d.size));
    }
    if r.boot_count > 0 {
        let last = r.last_boot_seconds.map(|s| format!(", last took {s:.1} s")).unwrap_or_default();
        out += &format!("  boots:      {}{last}\n", r.boot_count);
    }
    if let Some(err) = &r.last_error {
        out += &format!("  last error: {err}\n");
    }
    out += &format!("  state dir:  {}\n", r.state_directory);
    out
}

fn destroy(layout: &Layout, yes: bool, keys: bool) -> Result<ExitCode> {
    if !layout.exists() {
        println!("nothing to destroy: {} does not exist", layout.root.display());
        return Ok(ExitCode::SUCCESS);
    }
    // Only in a directory that init/start marked, never `/` or a home: `--state-dir ~ destroy` deletes nothing.
    layout.check_destroyable()?;
    if lock::is_held(layout) {
        bail!("the VM in {} is running; stop it first with `darwin-vz-nix stop`", layout.root.display());
    }
    if !yes {
        if !io::stdin().is_terminal() {
            return Err(bad_input("destroy deletes the VM's disk: pass --yes to confirm (no terminal to ask on)"));
        }
        eprint!("Delete the disk{} of the VM in {}? [y/N] ", if keys { " and ssh keys" } else { "" }, layout.root.display());
        let mut answer = String::new();
        io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("nothing deleted");
            return Ok(ExitCode::from(1));
        }
    }
    let _lock = InstanceLock::acquire(layout)?;
    for path in layout.destroy_files(keys)? {
        tracing::warn!("left {} alone: darwin-vz-nix did not make it (a link, or not of the type it makes)", path.display());
    }
    println!("destroyed the VM in {}{}", layout.root.display(), if keys { " (keys too)" } else { "; ssh keys kept" });
    Ok(ExitCode::SUCCESS)
}

fn logs(layout: &Layout, follow: bool, lines: Option<usize>) -> Result<ExitCode> {
    let path = layout.console_log();
    let mut file = match fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !follow => {
            eprintln!("no console log yet ({})", path.display());
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    // Streamed, and `-n` reads back from the end: a console log of any size costs a buffer, not its size.
    let len = file.metadata()?.len();
    let start = match lines {
        Some(n) => tail_start(&mut file, len, n)?,
        None => 0,
    };
    let mut out = io::stdout().lock();
    file.seek(SeekFrom::Start(start))?;
    io::copy(&mut (&mut file).take(len - start), &mut out)?;
    out.flush()?;
    if !follow {
        return Ok(ExitCode::SUCCESS);
    }
    let mut position = len;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        use std::os::unix::fs::MetadataExt;
        let at_path = fs::metadata(&path).ok();
        let open = file.metadata()?;
        let rotated = at_path.as_ref().is_some_and(|m| m.ino() != open.ino() || m.dev() != open.dev());
        if rotated || at_path.as_ref().is_some_and(|m| m.len() < position) {
            // Rotated, recreated or truncated: finish the old file, then follow the new one from its beginning.
            if rotated {
                file.seek(SeekFrom::Start(position))?;
                io::copy(&mut file, &mut out)?;
            }
            file = fs::File::open(&path)?;
            position = 0;
        }
        file.seek(SeekFrom::Start(position))?;
        let n = file.read(&mut buf)?;
        if n == 0 {
            thread::sleep(Duration::from_millis(200));
            continue;
        }
        position += n as u64;
        out.write_all(&buf[..n])?;
        out.flush()?;
    }
}

/// Where the last `n` lines of the first `len` bytes of `file` begin (a final newline ends the last line).
fn tail_start(file: &mut (impl Read + Seek), len: u64, n: usize) -> io::Result<u64> {
    if n == 0 {
        return Ok(len);
    }
    let mut buf = vec![0u8; 64 * 1024];
    let (mut pos, mut seen) = (len, 0);
    while pos > 0 {
        let chunk = buf.len().min(pos as usize);
        pos -= chunk as u64;
        file.seek(SeekFrom::Start(pos))?;
        file.read_exact(&mut buf[..chunk])?;
        for i in (0..chunk).rev() {
            let at = pos + i as u64;
            if buf[i] == b'\n' && at + 1 != len {
                seen += 1;
                if seen == n {
                    return Ok(at + 1);
                }
            }
        }
    }
    Ok(0)
}

fn doctor_cmd(layout: &Layout, port: Option<u16>) -> Result<ExitCode> {
    let configured = EffectiveConfig::load(layout).ok().flatten().map(|c| c.port).filter(|p| *p != 0);
    let port = port.or(configured).unwrap_or(DEFAULT_SSH_PORT);
    let mut checks = doctor::run_checks(port);
    // Our own running supervisor holds the port legitimately.
    if lock::is_held(layout) {
        for check in checks.iter_mut().filter(|c| c.name.contains("port")) {
            if check.status == doctor::CheckStatus::Fail {
                check.status = doctor::CheckStatus::Ok;
                check.detail = format!("held by this darwin-vz-nix ({})", layout.root.display());
            }
        }
    }
    for check in &checks {
        println!("{:<4} {:<18} {}", check.status.as_str(), check.name, check.detail);
    }
    Ok(if doctor::worst(&checks) == doctor::CheckStatus::Fail { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_start_counts_lines_from_the_end() {
        let at = |text: &str, n: usize| {
            let mut cursor = io::Cursor::new(text.as_bytes().to_vec());
            let start = tail_start(&mut cursor, text.len() as u64, n).unwrap() as usize;
            text[start..].to_string()
        };
        assert_eq!(at("one\ntwo\nthree\n", 2), "two\nthree\n");
        assert_eq!(at("one\ntwo\nthree\n", 1), "three\n");
        assert_eq!(at("one\ntwo\nthree\n", 9), "one\ntwo\nthree\n");
        assert_eq!(at("one\ntwo\nthree\n", 0), "");
        assert_eq!(at("a\nb", 1), "b");
        assert_eq!(at("", 3), "");
        let long = format!("{}\nlast\n", "x".repeat(200_000));
        assert_eq!(at(&long, 1), "last\n");
        assert_eq!(at(&long, 2), long);
    }
}
