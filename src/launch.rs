//! From a `start` request to what the supervisor runs: validation (before anything is written), the effective
//! configuration, the guest's settings and the VmSpec.

use std::fs;
use std::path::{Path, PathBuf};

use std::os::unix::fs::FileTypeExt;

use crate::cli::{HostNixDaemon, StartArgs};
use crate::engine::EngineKind;
use crate::guest_config::{GuestSettings, SETTINGS_VERSION};
use crate::instance::disk::{self, DiskPlan};
use crate::instance::{EffectiveConfig, InstanceError, Layout};
use crate::spec::{
    DiskSpec, NetworkSpec, RosettaMode, ShareSpec, TAG_CONFIG, TAG_NIX_STORE, VSOCK_PORT_AGENT, VSOCK_PORT_HOST_STORE, VmSpec,
};

/// Bad input: reported with exit code 2, and nothing on disk was touched.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{flag} {}: {problem}", printable_path(.path))]
    BadPath { flag: &'static str, path: PathBuf, problem: String },
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
    #[error("{0}")]
    Unsupported(String),
    #[error(
        "--ephemeral would delete the persistent disk {0} and everything on it; add --discard-disk to do that, \
         or use another --state-dir"
    )]
    WouldDiscardDisk(PathBuf),
}

/// A path as the user can read it back on one line: control characters (a newline in a file name) escaped.
pub fn printable_path(path: &Path) -> String {
    let shown = path.display().to_string();
    if shown.chars().any(char::is_control) { format!("{shown:?}") } else { shown }
}

/// Why a `start` did not get going, with its exit code: bad input (2, nothing was written) or a state
/// directory that could not be read (1, or 2 when it is not a state directory of ours).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Instance(#[from] InstanceError),
}

impl StartError {
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Input(_) => 2,
            StartError::Instance(e) if e.is_bad_input() => 2,
            StartError::Instance(_) => 1,
        }
    }
}

/// The host store shared as `nix-store`.
pub const HOST_NIX_STORE: &str = "/nix/store";
/// The host's Nix daemon socket (multi-user installs on macOS and Linux, nix-darwin).
pub const HOST_NIX_DAEMON: &str = "/nix/var/nix/daemon-socket/socket";

/// Checks a start request without writing anything; returns the effective configuration and the disk plan.
/// `host_store` is the
/// host's Nix store ([`HOST_NIX_STORE`] unless a test points it elsewhere), passed in so that no test depends
/// on what the machine happens to have.
pub fn validate_start(
    args: &StartArgs,
    engine: EngineKind,
    layout: &Layout,
    host_store: &Path,
) -> Result<(EffectiveConfig, DiskPlan), StartError> {
    let check = || -> Result<(), InputError> {
        require_file("--kernel", &args.kernel)?;
        require_file("--initrd", &args.initrd)?;
        if let Some(system) = &args.system
            && !system.join("init").exists()
        {
            return Err(InputError::BadPath {
                flag: "--system",
                path: system.clone(),
                problem: "has no `init`: pass a NixOS system toplevel (the result of building config.system.build.toplevel)".into(),
            });
        }
        if engine == EngineKind::Qemu && args.rosetta_requested() == Some(true) {
            return Err(InputError::Unsupported(
                "--rosetta needs the vz engine on Apple silicon; with --engine qemu use --no-rosetta or leave it out".into(),
            ));
        }
        if cfg!(not(target_os = "macos")) && engine == EngineKind::Vz {
            return Err(InputError::Unsupported("--engine vz needs macOS (Virtualization.framework); use --engine qemu here".into()));
        }
        Ok(())
    };
    check()?;
    let share_nix_store = decide_store_share(args.share_nix_store_requested(), host_store)?;
    // The default socket serves the default store; a store elsewhere (tests) gets queries only when asked.
    let default_socket = (host_store == Path::new(HOST_NIX_STORE)).then_some(Path::new(HOST_NIX_DAEMON));
    let host_nix_daemon = decide_host_nix_daemon(args.host_nix_daemon.as_ref(), share_nix_store, default_socket)?;
    if args.ephemeral && !args.discard_disk && layout.disk().exists() {
        // A disk left by an ephemeral start is scratch; any other holds the store and homes.
        let previous = EffectiveConfig::load(layout)?;
        if !previous.is_some_and(|c| c.ephemeral) {
            return Err(InputError::WouldDiscardDisk(layout.disk()).into());
        }
    }
    let plan = match disk::plan(layout, args.disk_size)? {
        Ok(plan) => plan,
        // An ephemeral start makes a new disk: the old one's size does not matter.
        Err(disk::DiskError::WouldShrink { .. }) if args.ephemeral => DiskPlan::Create(args.disk_size),
        Err(e) => return Err(InputError::from(e).into()),
    };
    let absolute = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let config = EffectiveConfig {
        engine,
        cores: args.cores,
        memory_mib: args.memory,
        disk_bytes: args.disk_size.0,
        kernel: absolute(&args.kernel),
        initrd: absolute(&args.initrd),
        system: args.system.as_deref().map(absolute),
        idle_timeout_seconds: args.idle_timeout.as_secs(),
        rosetta: args.rosetta_requested(),
        share_nix_store,
        host_nix_store: host_store.to_path_buf(),
        host_nix_daemon,
        port: args.port,
        on_demand: args.on_demand,
        ephemeral: args.ephemeral,
        max_jobs: args.max_jobs.unwrap_or(args.cores),
    };
    Ok((config, plan))
}

/// Which host daemon socket the guest's store queries go to, if any. They need the shared store (the guest
/// reads the files through it); an explicit socket must be one; the default is used only when it is there.
fn decide_host_nix_daemon(
    requested: Option<&HostNixDaemon>,
    share_nix_store: bool,
    default_socket: Option<&Path>,
) -> Result<Option<PathBuf>, InputError> {
    let is_socket = |p: &Path| fs::metadata(p).is_ok_and(|m| m.file_type().is_socket());
    match requested {
        Some(HostNixDaemon::Off) => Ok(None),
        Some(HostNixDaemon::Socket(path)) if !share_nix_store => Err(InputError::BadPath {
            flag: "--host-nix-daemon",
            path: path.clone(),
            problem: "needs the host store shared with the guest; drop --no-share-nix-store, or use --host-nix-daemon none".into(),
        }),
        Some(HostNixDaemon::Socket(path)) if !path.is_absolute() || !is_socket(path) => Err(InputError::BadPath {
            flag: "--host-nix-daemon",
            path: path.clone(),
            problem: "is not the socket of a running Nix daemon (an absolute path, e.g. /nix/var/nix/daemon-socket/socket); \
                      start the daemon, or use --host-nix-daemon none"
                .into(),
        }),
        Some(HostNixDaemon::Socket(path)) => Ok(Some(path.clone())),
        None => Ok(default_socket.filter(|s| share_nix_store && is_socket(s)).map(Path::to_path_buf)),
    }
}

/// Whether to share the host store: asked for explicitly, it must exist; by default, only when it does.
fn decide_store_share(requested: Option<bool>, host_store: &Path) -> Result<bool, InputError> {
    match requested {
        Some(true) if !host_store.is_dir() => Err(InputError::BadPath {
            flag: "--share-nix-store",
            path: host_store.to_path_buf(),
            problem: "does not exist on this host (is Nix installed?); use --no-share-nix-store".into(),
        }),
        Some(share) => Ok(share),
        None => {
            let exists = host_store.is_dir();
            if !exists {
                tracing::warn!("{} does not exist on this host: the guest boots without the nix-store share", host_store.display());
            }
            Ok(exists)
        }
    }
}

fn require_file(flag: &'static str, path: &Path) -> Result<(), InputError> {
    match fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(InputError::BadPath { flag, path: path.into(), problem: "is not a file".into() }),
        Err(e) => Err(InputError::BadPath { flag, path: path.into(), problem: e.to_string() }),
    }
}

/// The guest's kernel command line: a NixOS system's own `kernel-params` and its `init`; nothing hard-coded
/// that the guest should decide. The engine adds its console.
pub fn kernel_cmdline(system: Option<&Path>) -> Vec<String> {
    let Some(system) = system else { return Vec::new() };
    let mut params: Vec<String> = fs::read_to_string(system.join("kernel-params"))
        .unwrap_or_default()
        .split_whitespace()
        .filter(|p| !p.starts_with("console="))
        .map(String::from)
        .collect();
    params.push(format!("init={}", system.join("init").display()));
    params
}

pub fn vm_spec(layout: &Layout, config: &EffectiveConfig, mac: String) -> VmSpec {
    let mut shares = vec![ShareSpec { tag: TAG_CONFIG.into(), host_path: layout.guest_config_dir(), read_only: true }];
    if config.share_nix_store {
        shares.push(ShareSpec { tag: TAG_NIX_STORE.into(), host_path: config.host_nix_store.clone(), read_only: true });
    }
    VmSpec {
        cpus: config.cores,
        memory_mib: config.memory_mib,
        kernel: config.kernel.clone(),
        initrd: config.initrd.clone(),
        kernel_cmdline: kernel_cmdline(config.system.as_deref()),
        disk: DiskSpec { path: layout.disk(), read_only: false },
        shares,
        network: NetworkSpec { mac },
        rosetta: match config.rosetta {
            Some(true) => RosettaMode::Required,
            Some(false) => RosettaMode::Off,
            None => RosettaMode::IfAvailable,
        },
        host_ports: config.host_nix_daemon.iter().map(|_| VSOCK_PORT_HOST_STORE).collect(),
        runtime_dir: layout.runtime_dir(),
        machine_id_file: layout.machine_id_file(),
    }
}

/// The guest's settings for a boot at `host_unix_ms`.
pub fn guest_settings(config: &EffectiveConfig, host_unix_ms: i64) -> GuestSettings {
    GuestSettings {
        version: SETTINGS_VERSION,
        cores: config.cores,
        memory_mib: config.memory_mib,
        max_jobs: config.max_jobs,
        ephemeral: config.ephemeral,
        agent_port: VSOCK_PORT_AGENT,
        host_store_port: config.host_nix_daemon.as_ref().map(|_| VSOCK_PORT_HOST_STORE),
        host_unix_ms,
    }
}

/// Rewrites `settings.json` in the `dvn-config` share, just before each boot.
pub fn write_guest_settings(layout: &Layout, config: &EffectiveConfig, host_unix_ms: i64) -> Result<(), InstanceError> {
    crate::guest_config::write_settings(layout, &guest_settings(config, host_unix_ms))
}

/// The Nix database entries of the guest system's closure, for the share's `nix-registration` (`nix-store
/// --load-db` at boot), so the guest's nix-daemon treats those lower-layer paths as valid and its garbage
/// collector never deletes what it runs from. Only the closure of `--system`: it is a GC root on the host (the
/// launchd job names it), whereas any other host path could be collected by the host while the guest believes
/// it valid. None without a system or without the store share.
pub fn nix_registration(config: &EffectiveConfig, nix_store: &Path) -> Result<Option<Vec<u8>>, String> {
    let Some(system) = config.system.as_ref().filter(|_| config.share_nix_store) else { return Ok(None) };
    let run = |args: &[&std::ffi::OsStr]| -> Result<Vec<u8>, String> {
        let out = std::process::Command::new(nix_store).args(args).output().map_err(|e| format!("running {}: {e}", nix_store.display()))?;
        if !out.status.success() {
            return Err(format!("{} {:?} failed: {}", nix_store.display(), args, String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(out.stdout)
    };
    let closure = run(&["--query".as_ref(), "--requisites".as_ref(), system.as_os_str()])?;
    let paths: Vec<std::ffi::OsString> = String::from_utf8_lossy(&closure).lines().map(Into::into).collect();
    let mut args: Vec<&std::ffi::OsStr> = vec!["--dump-db".as_ref()];
    args.extend(paths.iter().map(|p| p.as_os_str()));
    run(&args).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn start_args(extra: &[&str], kernel: &Path, initrd: &Path) -> StartArgs {
        let mut argv = vec![
            "darwin-vz-nix".to_string(),
            "start".into(),
            "--kernel".into(),
            kernel.display().to_string(),
            "--initrd".into(),
            initrd.display().to_string(),
        ];
        argv.extend(extra.iter().map(|s| s.to_string()));
        match crate::cli::Cli::try_parse_from(argv).unwrap().command {
            crate::cli::Command::Start(s) => s,
            _ => unreachable!(),
        }
    }

    #[test]
    fn cmdline_comes_from_the_system() {
        assert!(kernel_cmdline(None).is_empty());
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("kernel-params"), "loglevel=4 console=ttyS0 net.ifnames=0\n").unwrap();
        let params = kernel_cmdline(Some(dir.path()));
        assert_eq!(params, ["loglevel=4".to_string(), "net.ifnames=0".into(), format!("init={}/init", dir.path().display())]);
    }

    #[test]
    fn validation_catches_bad_paths_and_engine_mismatches() {
        let dir = tempfile::tempdir().unwrap();
        let (k, i) = (dir.path().join("kernel"), dir.path().join("initrd"));
        fs::write(&k, "k").unwrap();
        fs::write(&i, "i").unwrap();
        let layout = Layout::new(dir.path().join("state"));
        let no_store = dir.path().join("no-store");
        let (config, plan) = validate_start(&start_args(&[], &k, &i), EngineKind::Qemu, &layout, &no_store).unwrap();
        assert_eq!(plan, DiskPlan::Create(crate::units::ByteSize(100 << 30)));
        assert_eq!(config.max_jobs, 4);
        assert!(!layout.exists(), "validation writes nothing");
        let missing = start_args(&[], &dir.path().join("nope"), &i);
        let err = validate_start(&missing, EngineKind::Qemu, &layout, &no_store).unwrap_err().to_string();
        assert!(err.starts_with("--kernel ") && err.contains("nope"), "{err}");
        let err = validate_start(&start_args(&["--rosetta"], &k, &i), EngineKind::Qemu, &layout, &no_store).unwrap_err().to_string();
        assert!(err.contains("--rosetta needs the vz engine"), "{err}");
        let err = validate_start(&start_args(&["--system", "/"], &k, &i), EngineKind::Qemu, &layout, &no_store).unwrap_err().to_string();
        assert!(err.contains("toplevel"), "{err}");
    }

    #[test]
    fn nix_registration_covers_the_system_closure() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.create().unwrap();
        let fake = dir.path().join("nix-store");
        fs::write(&fake, "#!/bin/sh\ncase \"$1\" in --query) echo /nix/store/aaa-sys; echo /nix/store/bbb-glibc;; --dump-db) shift; echo \"db $*\";; esac\n").unwrap();
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
        let (k, i) = (dir.path().join("kernel"), dir.path().join("initrd"));
        fs::write(&k, "k").unwrap();
        fs::write(&i, "i").unwrap();
        let system = dir.path().join("system");
        fs::create_dir(&system).unwrap();
        fs::write(system.join("init"), "").unwrap();
        let args = start_args(&["--system", system.to_str().unwrap()], &k, &i);
        let host_store = dir.path().join("store");
        fs::create_dir(&host_store).unwrap();
        let (config, _) = validate_start(&args, EngineKind::Qemu, &layout, &host_store).unwrap();
        assert!(config.share_nix_store, "a host with a store shares it by default");
        let registration = nix_registration(&config, &fake).unwrap().unwrap();
        assert_eq!(String::from_utf8(registration).unwrap(), "db /nix/store/aaa-sys /nix/store/bbb-glibc\n");
        let no_share = EffectiveConfig { share_nix_store: false, ..config.clone() };
        assert_eq!(nix_registration(&no_share, &fake).unwrap(), None, "no registration without the store share");
        let err = nix_registration(&config, Path::new("/nonexistent/nix-store")).unwrap_err();
        assert!(err.contains("/nonexistent/nix-store"), "{err}");
    }

    #[test]
    fn store_share_needs_a_host_store_only_when_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-store");
        assert!(!decide_store_share(None, &missing).unwrap(), "default: skipped without a host store");
        assert!(decide_store_share(None, dir.path()).unwrap());
        let err = decide_store_share(Some(true), &missing).unwrap_err().to_string();
        assert!(err.starts_with("--share-nix-store ") && err.contains("--no-share-nix-store"), "{err}");
        assert!(!decide_store_share(Some(false), dir.path()).unwrap());
    }

    #[test]
    fn spec_shares_follow_the_flags() {
        let dir = tempfile::tempdir().unwrap();
        let (k, i) = (dir.path().join("kernel"), dir.path().join("initrd"));
        fs::write(&k, "k").unwrap();
        fs::write(&i, "i").unwrap();
        let layout = Layout::new(dir.path());
        let (store, no_store) = (dir.path().join("store"), dir.path().join("no-store"));
        fs::create_dir(&store).unwrap();
        let tags = |args: &[&str], host_store: &Path| {
            let (config, _) = validate_start(&start_args(args, &k, &i), EngineKind::Qemu, &layout, host_store).unwrap();
            let spec = vm_spec(&layout, &config, "02:00:00:00:00:01".into());
            assert!(spec.shares.iter().all(|s| s.read_only));
            (spec.shares.iter().map(|s| s.tag.clone()).collect::<Vec<_>>(), spec.rosetta)
        };
        assert_eq!(tags(&["--no-share-nix-store", "--no-rosetta"], &store), (vec!["dvn-config".into()], RosettaMode::Off));
        assert_eq!(tags(&[], &store), (vec!["dvn-config".into(), "nix-store".into()], RosettaMode::IfAvailable));
        assert_eq!(tags(&[], &no_store), (vec!["dvn-config".into()], RosettaMode::IfAvailable), "no host store: not shared");
        let err = validate_start(&start_args(&["--share-nix-store"], &k, &i), EngineKind::Qemu, &layout, &no_store).unwrap_err();
        assert!(err.to_string().contains("--no-share-nix-store"), "{err}");
    }

    #[test]
    fn host_store_queries_go_to_a_daemon_socket_only_when_the_store_is_shared() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("daemon.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let file = dir.path().join("not-a-socket");
        fs::write(&file, "").unwrap();
        let missing = dir.path().join("missing");
        let explicit = |p: &Path| HostNixDaemon::Socket(p.to_path_buf());

        // The default: the daemon's socket when it is there and the store is shared; silently off otherwise.
        assert_eq!(decide_host_nix_daemon(None, true, Some(&socket)).unwrap(), Some(socket.clone()));
        assert_eq!(decide_host_nix_daemon(None, true, Some(&missing)).unwrap(), None);
        assert_eq!(decide_host_nix_daemon(None, true, None).unwrap(), None, "a store other than /nix/store");
        assert_eq!(decide_host_nix_daemon(None, false, Some(&socket)).unwrap(), None);
        assert_eq!(decide_host_nix_daemon(Some(&HostNixDaemon::Off), true, Some(&socket)).unwrap(), None);
        // Explicit: it must be a socket, and the store must be shared.
        assert_eq!(decide_host_nix_daemon(Some(&explicit(&socket)), true, None).unwrap(), Some(socket.clone()));
        for bad in [&file, &missing, Path::new("relative.sock")] {
            let err = decide_host_nix_daemon(Some(&explicit(bad)), true, Some(&socket)).unwrap_err();
            assert!(matches!(err, InputError::BadPath { flag: "--host-nix-daemon", .. }), "{bad:?}: {err}");
        }
        let err = decide_host_nix_daemon(Some(&explicit(&socket)), false, Some(&socket)).unwrap_err();
        assert!(err.to_string().contains("needs the host store shared"), "{err}");
    }

    #[test]
    fn host_store_queries_open_the_host_port_and_tell_the_guest() {
        let dir = tempfile::tempdir().unwrap();
        let (kernel, initrd) = (dir.path().join("k"), dir.path().join("i"));
        fs::write(&kernel, "").unwrap();
        fs::write(&initrd, "").unwrap();
        let store = dir.path().join("store");
        fs::create_dir(&store).unwrap();
        let socket = dir.path().join("daemon.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let layout = Layout::new(dir.path().join("state"));
        let args = start_args(&["--host-nix-daemon", socket.to_str().unwrap()], &kernel, &initrd);
        let (config, _) = validate_start(&args, EngineKind::Qemu, &layout, &store).unwrap();
        assert_eq!(config.host_nix_daemon.as_deref(), Some(socket.as_path()));
        assert_eq!(vm_spec(&layout, &config, "02:00:00:00:00:01".into()).host_ports, [VSOCK_PORT_HOST_STORE]);
        assert_eq!(guest_settings(&config, 0).host_store_port, Some(VSOCK_PORT_HOST_STORE));

        let off = start_args(&["--host-nix-daemon", "none"], &kernel, &initrd);
        let (config, _) = validate_start(&off, EngineKind::Qemu, &layout, &store).unwrap();
        assert_eq!(config.host_nix_daemon, None);
        assert!(vm_spec(&layout, &config, "02:00:00:00:00:01".into()).host_ports.is_empty(), "no host port for the guest");
        assert_eq!(guest_settings(&config, 0).host_store_port, None);
        assert!(!String::from_utf8(crate::guest_config::settings_json(&guest_settings(&config, 0))).unwrap().contains("hostStorePort"));
    }
}
