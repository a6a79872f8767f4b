//! What the host puts in the read-only `dvn-config` share for the guest (the guest contract).
//!
//! Files in the share:
//! - `authorized_keys`: the host client's public key, for the `builder` user.
//! - `ssh_host_ed25519_key`, `ssh_host_ed25519_key.pub`: the guest's ssh host key, generated on the host so the
//!   host can pin it; the guest copies it into place (0600, root) before sshd starts.
//! - `settings.json`: [`GuestSettings`].
//!
//! The client's private key never enters this directory.

use serde::{Deserialize, Serialize};

pub const SETTINGS_VERSION: u32 = 1;
pub const FILE_SETTINGS: &str = "settings.json";
pub const FILE_AUTHORIZED_KEYS: &str = "authorized_keys";
pub const FILE_HOST_KEY: &str = "ssh_host_ed25519_key";
pub const FILE_HOST_KEY_PUB: &str = "ssh_host_ed25519_key.pub";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestSettings {
    pub version: u32,
    /// vCPUs of the VM; nix-daemon's `cores` is derived from it.
    pub cores: u32,
    pub memory_mib: u64,
    /// nix-daemon `max-jobs`.
    pub max_jobs: u32,
    /// Upper layer of /nix/store on tmpfs and the disk reformatted at boot.
    pub ephemeral: bool,
    /// Guest vsock port of the agent.
    pub agent_port: u32,
    /// The host's wall clock when the VM was started (the agent corrects it right after boot).
    pub host_unix_ms: i64,
}
