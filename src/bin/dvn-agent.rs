//! dvn-agent: runs inside the guest VM and answers the host over vsock (see dvn::agent::protocol).

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "darwin-vz-nix guest agent: status, clock and power for the host, over vsock",
    after_help = "Examples:\n  dvn-agent --disk-path /nix/.rw-store\n  dvn-agent host-bridge --port 5000   (stdin/stdout <-> host vsock port 5000)"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// vsock port to answer the host on.
    #[arg(long, default_value_t = dvn::spec::VSOCK_PORT_AGENT)]
    port: u32,
    /// Also accept vsock port 22 and forward it to this TCP address (for an sshd that cannot listen on vsock).
    #[arg(long, value_name = "HOST:PORT")]
    ssh_forward: Option<String>,
    /// File system whose free space is reported (the disk holding the store's upper layer).
    #[arg(long, default_value = "/")]
    disk_path: PathBuf,
    /// Shell command that shuts the guest down cleanly.
    #[arg(long, default_value = "poweroff")]
    poweroff_command: String,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Bridge stdin/stdout to a host vsock port: the guest's end of the read-only host-store queries
    /// (socket-activated per connection by dvn-host-store.socket).
    HostBridge {
        /// Host vsock port.
        #[arg(long, env = "DVN_HOST_STORE_PORT", default_value_t = dvn::spec::VSOCK_PORT_HOST_STORE)]
        port: u32,
    },
}

#[cfg(target_os = "linux")]
fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::HostBridge { port }) = args.command {
        return dvn::agent::guest::host_bridge(port);
    }
    dvn::agent::guest::run(dvn::agent::guest::AgentConfig {
        port: args.port,
        ssh_forward: args.ssh_forward,
        disk_path: args.disk_path,
        poweroff_command: args.poweroff_command,
    })
}

#[cfg(not(target_os = "linux"))]
fn main() {
    let _ = Args::parse();
    eprintln!("dvn-agent runs inside the Linux guest only");
    std::process::exit(2);
}
