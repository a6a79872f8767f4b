//! Command-line definitions only: no behaviour lives here.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::engine::EngineKind;
use crate::units::{ByteSize, parse_idle_timeout};

/// Default loopback port of the ssh proxy. nix-darwin's `nix.linux-builder` and nixpkgs' linux-builder-vz use
/// 31022; a different default lets either coexist while migrating.
pub const DEFAULT_SSH_PORT: u16 = 31122;

const AFTER_HELP: &str = "\
Examples:
  darwin-vz-nix start --kernel ./result/Image --initrd ./result-initrd/initrd --system ./result-system
  darwin-vz-nix ssh -- uname -a
  darwin-vz-nix status --json
  darwin-vz-nix stop

State lives in --state-dir (default $XDG_DATA_HOME/darwin-vz-nix, else ~/.local/share/darwin-vz-nix).
Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad input (nothing is changed on disk).";

#[derive(Debug, Parser)]
#[command(name = "darwin-vz-nix", version, about = "A fast, native NixOS Linux builder VM", after_help = AFTER_HELP)]
pub struct Cli {
    /// Directory holding the VM's disk, keys, logs and runtime files.
    #[arg(long, global = true, env = "DVN_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Hypervisor to use [default: vz on macOS, qemu elsewhere].
    #[arg(long, global = true, env = "DVN_ENGINE", value_enum)]
    pub engine: Option<EngineKind>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot the VM and supervise it (ssh proxy, idle stop, clock sync): in the foreground, or with --detach.
    #[command(
        after_help = "Examples:\n  darwin-vz-nix start --kernel K --initrd I --cores 8 --memory 16384 --disk-size 200G\n  darwin-vz-nix start --kernel K --initrd I --on-demand --idle-timeout 15m --port 31122\n  darwin-vz-nix start --kernel K --initrd I --detach && darwin-vz-nix ssh -- uname -a"
    )]
    Start(StartArgs),
    /// Create the state directory, ssh keys and pinned known_hosts (idempotent; used by the nix-darwin module).
    Init,
    /// Open an ssh session in the guest as `builder`. Options before `--` go to ssh, words after it are the
    /// remote command.
    #[command(
        after_help = "Examples:\n  darwin-vz-nix ssh\n  darwin-vz-nix ssh -- nix-store --version\n  darwin-vz-nix ssh -v -- uname -a"
    )]
    Ssh {
        /// Options passed to ssh (e.g. -v, -L 8080:localhost:80).
        #[arg(allow_hyphen_values = true, value_name = "SSH-OPTION")]
        ssh_options: Vec<String>,
        /// The remote command, after `--`.
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Stop the VM: a clean guest shutdown, forced after a timeout.
    Stop {
        /// Pull the plug without a guest shutdown.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for a clean shutdown before forcing it.
        #[arg(long, default_value_t = 60, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
        timeout: u64,
    },
    /// Show whether the VM runs, and what it is doing.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Delete the VM's disk and runtime files (keys are kept unless --keys).
    Destroy {
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        /// Also delete the ssh keys (the next start makes and pins new ones).
        #[arg(long)]
        keys: bool,
    },
    /// Show the VM's console log.
    Logs {
        /// Keep printing new output.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Print only the last N lines.
        #[arg(long, short = 'n', value_name = "N")]
        lines: Option<usize>,
    },
    /// Check that this machine can run the builder.
    Doctor {
        /// Port to check [default: the configured one, else 31122].
        #[arg(long)]
        port: Option<u16>,
    },
    /// Hidden test and debugging hooks.
    #[command(hide = true, subcommand)]
    Debug(DebugCommand),
}

/// Splits `ssh` arguments at the first `--`: ssh options before it, the remote command after it.
/// (clap keeps a `--` that follows options inside the option list; a leading one it consumes itself.)
pub fn split_ssh_args(ssh_options: &[String], command: &[String]) -> (Vec<String>, Vec<String>) {
    match ssh_options.iter().position(|a| a == "--") {
        Some(i) => {
            let mut remote = ssh_options[i + 1..].to_vec();
            remote.extend_from_slice(command);
            (ssh_options[..i].to_vec(), remote)
        }
        None => (ssh_options.to_vec(), command.to_vec()),
    }
}

#[derive(Debug, Subcommand)]
pub enum DebugCommand {
    /// Shift the guest's clock by this many seconds (through the agent), to test clock correction.
    ShiftGuestClock {
        #[arg(allow_hyphen_values = true)]
        seconds: i64,
    },
    /// Print, as JSON, every process the qemu engine would start for this state directory's last `start`
    /// (scripts/bench boots the same command lines by hand as its baseline). Starts nothing.
    VmCommand {
        /// The fd number under which QEMU inherits its end of the network socket pair.
        #[arg(long, default_value_t = 3)]
        qemu_fd: i32,
        /// The fd number under which passt inherits the other end.
        #[arg(long, default_value_t = 4)]
        passt_fd: i32,
    },
}

#[derive(Debug, Clone, Args)]
pub struct StartArgs {
    /// CPU cores.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub cores: u32,
    /// Memory in MiB.
    #[arg(long, default_value_t = 8192, value_name = "MB", value_parser = clap::value_parser!(u64).range(256..=1_048_576))]
    pub memory: u64,
    /// Disk size (K, M, G, T are powers of 1024). A larger size grows an existing disk; smaller is refused.
    #[arg(long, default_value = "100G", value_name = "SIZE")]
    pub disk_size: ByteSize,
    /// Guest kernel image.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Guest initrd.
    #[arg(long, value_name = "PATH")]
    pub initrd: PathBuf,
    /// NixOS system toplevel: adds `init=<system>/init` and the system's own kernel-params.
    #[arg(long, value_name = "PATH")]
    pub system: Option<PathBuf>,
    /// Stop the VM after this long without connections or builds: minutes, or 90s / 15m / 2h. 0 = never.
    #[arg(long, default_value = "0", value_name = "DURATION", value_parser = parse_idle_timeout)]
    pub idle_timeout: Duration,
    /// Share Rosetta for x86_64-linux builds (macOS only; an explicit --rosetta fails where it is unavailable).
    #[arg(long, overrides_with = "no_rosetta")]
    pub rosetta: bool,
    /// Do not share Rosetta.
    #[arg(long, overrides_with = "rosetta")]
    pub no_rosetta: bool,
    /// Share the host's /nix/store read-only with the guest [default: when the host has one].
    #[arg(long, overrides_with = "no_share_nix_store")]
    pub share_nix_store: bool,
    /// Do not share the host's /nix/store.
    #[arg(long, overrides_with = "share_nix_store")]
    pub no_share_nix_store: bool,
    /// The host's Nix store to share; only tests point it elsewhere (an empty directory).
    #[arg(long, hide = true, env = "DVN_HOST_NIX_STORE", default_value = crate::launch::HOST_NIX_STORE, value_name = "PATH")]
    pub host_nix_store: PathBuf,
    /// The host's Nix daemon socket, through which the guest learns (read-only) which store paths the host
    /// already has, so that they are not uploaded again; `none` turns that off [default:
    /// /nix/var/nix/daemon-socket/socket when it exists and the store is shared].
    #[arg(long, env = "DVN_HOST_NIX_DAEMON", value_name = "SOCKET|none", value_parser = parse_host_nix_daemon)]
    pub host_nix_daemon: Option<HostNixDaemon>,
    /// Loopback port of the ssh proxy; 0 picks a free one (see `status`).
    #[arg(long, default_value_t = DEFAULT_SSH_PORT)]
    pub port: u16,
    /// Listen without booting; boot at the first connection (and again after an idle stop).
    #[arg(long)]
    pub on_demand: bool,
    /// Start from a blank disk and a tmpfs store layer at every boot. Refused when a persistent disk exists,
    /// unless --discard-disk is given too.
    #[arg(long)]
    pub ephemeral: bool,
    /// With --ephemeral: delete the existing persistent disk (and everything on it).
    #[arg(long, requires = "ephemeral")]
    pub discard_disk: bool,
    /// nix-daemon max-jobs in the guest [default: cores].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_jobs: Option<u32>,
    /// Copy the VM's console output to stderr.
    #[arg(long, short = 'v')]
    pub verbose: bool,
    /// Write the supervisor's log to this file instead of stderr; it follows rotation (newsyslog, logrotate).
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
    /// Run the supervisor in the background and return once the VM is ready (or listening, with --on-demand).
    /// Its log goes to <state>/daemon.log unless --log-file is given.
    #[arg(long, short = 'd')]
    pub detach: bool,
}

/// `--host-nix-daemon`: a socket path, or `none`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostNixDaemon {
    Off,
    Socket(PathBuf),
}

fn parse_host_nix_daemon(value: &str) -> Result<HostNixDaemon, String> {
    match value {
        "" => Err("give a socket path, or `none`".into()),
        "none" => Ok(HostNixDaemon::Off),
        path => Ok(HostNixDaemon::Socket(PathBuf::from(path))),
    }
}

impl StartArgs {
    pub fn rosetta_requested(&self) -> Option<bool> {
        match (self.rosetta, self.no_rosetta) {
            (true, _) => Some(true),
            (false, true) => Some(false),
            (false, false) => None,
        }
    }

    pub fn share_nix_store_requested(&self) -> Option<bool> {
        match (self.share_nix_store, self.no_share_nix_store) {
            (true, _) => Some(true),
            (false, true) => Some(false),
            (false, false) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("darwin-vz-nix").chain(args.iter().copied()))
    }

    fn start(args: &[&str]) -> StartArgs {
        let mut full = vec!["start", "--kernel", "k", "--initrd", "i"];
        full.extend_from_slice(args);
        match parse(&full).unwrap().command {
            Command::Start(s) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn start_defaults_match_the_seed() {
        let s = start(&[]);
        assert_eq!((s.cores, s.memory, s.disk_size.0), (4, 8192, 100 << 30));
        assert_eq!(s.idle_timeout, Duration::ZERO);
        assert_eq!(s.rosetta_requested(), None);
        assert_eq!(s.share_nix_store_requested(), None);
        assert_eq!(s.port, DEFAULT_SSH_PORT);
        assert!(!s.on_demand && !s.ephemeral && !s.verbose);
    }

    #[test]
    fn flags_and_their_negations() {
        assert_eq!(start(&["--no-rosetta"]).rosetta_requested(), Some(false));
        assert_eq!(start(&["--rosetta"]).rosetta_requested(), Some(true));
        assert_eq!(start(&["--no-rosetta", "--rosetta"]).rosetta_requested(), Some(true));
        assert_eq!(start(&["--rosetta", "--no-rosetta"]).rosetta_requested(), Some(false), "the last one wins");
        assert_eq!(start(&["--no-share-nix-store"]).share_nix_store_requested(), Some(false));
        assert_eq!(start(&["--no-share-nix-store", "--share-nix-store"]).share_nix_store_requested(), Some(true));
        assert_eq!(start(&["--share-nix-store", "--no-share-nix-store"]).share_nix_store_requested(), Some(false));
        assert_eq!(start(&["--idle-timeout", "15m"]).idle_timeout, Duration::from_secs(900));
        assert_eq!(start(&["--idle-timeout", "3"]).idle_timeout, Duration::from_secs(180));
        assert_eq!(start(&["--disk-size", "20GiB"]).disk_size.0, 20 << 30);
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for bad in [
            &["start", "--kernel", "k"][..],
            &["start", "--kernel", "k", "--initrd", "i", "--cores", "0"],
            &["start", "--kernel", "k", "--initrd", "i", "--memory", "-5"],
            &["start", "--kernel", "k", "--initrd", "i", "--disk-size", "100GB"],
            &["start", "--kernel", "k", "--initrd", "i", "--disk-size", "0"],
            &["start", "--kernel", "k", "--initrd", "i", "--idle-timeout", "5d"],
            &["start", "--kernel", "k", "--initrd", "i", "--port", "70000"],
            &["--engine", "hyperv", "status"],
            &["frobnicate"],
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad:?}: {err}");
        }
    }

    #[test]
    fn ssh_splits_options_from_the_remote_command() {
        match parse(&["ssh", "-v", "-o", "ConnectTimeout=5", "--", "echo", "-n", "ok"]).unwrap().command {
            Command::Ssh { ssh_options, command } => {
                let (ssh_options, command) = split_ssh_args(&ssh_options, &command);
                assert_eq!(ssh_options, ["-v", "-o", "ConnectTimeout=5"]);
                assert_eq!(command, ["echo", "-n", "ok"]);
            }
            other => panic!("{other:?}"),
        }
        match parse(&["ssh", "--", "uname"]).unwrap().command {
            Command::Ssh { ssh_options, command } => {
                let (ssh_options, command) = split_ssh_args(&ssh_options, &command);
                assert!(ssh_options.is_empty());
                assert_eq!(command, ["uname"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn global_options_go_anywhere() {
        let cli = parse(&["status", "--state-dir", "/tmp/x", "--engine", "qemu", "--json"]).unwrap();
        assert_eq!(cli.state_dir.as_deref(), Some(std::path::Path::new("/tmp/x")));
        assert_eq!(cli.engine, Some(EngineKind::Qemu));
    }
}
