//! The read-only `dvn-config` share (the guest contract): the only module that writes into it.
//!
//! Files in the share:
//! - `authorized_keys`: the host client's public key, for the `builder` user.
//! - `ssh_host_ed25519_key`, `ssh_host_ed25519_key.pub`: the guest's ssh host key, generated and kept on the
//!   host (in `ssh/`) so the host can pin it; the guest copies it into place (0600, root) before sshd starts.
//! - `settings.json`: [`GuestSettings`].
//! - `nix-registration`: the Nix database entries of the guest system's closure (only with `--system`).
//!
//! The client's private key never enters this directory. The guest is hostile, and the directory may have been
//! written by an older version whose share was writable: [`publish`] makes a new directory with exactly these
//! files and swaps it in, so nothing planted (a link, an extra file) survives a `start`, and every later write
//! is an atomic write that replaces rather than follows whatever sits at the name.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::instance::{InstanceError, Layout, io_err, remove_path, write_atomic};

pub const SETTINGS_VERSION: u32 = 1;
pub const FILE_SETTINGS: &str = "settings.json";
pub const FILE_AUTHORIZED_KEYS: &str = "authorized_keys";
pub const FILE_HOST_KEY: &str = "ssh_host_ed25519_key";
pub const FILE_HOST_KEY_PUB: &str = "ssh_host_ed25519_key.pub";
pub const FILE_NIX_REGISTRATION: &str = "nix-registration";

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
    /// Host vsock port of the read-only store queries (the guest's `local-overlay://` lower store); absent
    /// when they are off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_store_port: Option<u32>,
    /// The host's wall clock when the VM was started (the agent corrects it right after boot).
    pub host_unix_ms: i64,
}

/// Everything the share holds.
#[derive(Debug, Clone)]
pub struct GuestFiles<'a> {
    pub settings: &'a GuestSettings,
    pub keys: &'a crate::ssh::GuestKeys,
    pub nix_registration: Option<&'a [u8]>,
}

/// Rebuilds the share: a new private directory with exactly the share's files, swapped in for the old one,
/// which is deleted without following any link in it. Called with the instance lock held, before any boot.
pub fn publish(layout: &Layout, files: &GuestFiles) -> Result<(), InstanceError> {
    let root = &layout.root;
    let staging = tempfile::Builder::new().prefix("guest-config.").tempdir_in(root).map_err(io_err(root))?;
    let dir = staging.path();
    write_atomic(&dir.join(FILE_AUTHORIZED_KEYS), format!("{}\n", files.keys.client_public.trim()).as_bytes(), 0o644)?;
    write_atomic(&dir.join(FILE_HOST_KEY), &files.keys.host_private, 0o600)?;
    write_atomic(&dir.join(FILE_HOST_KEY_PUB), format!("{}\n", files.keys.host_public.trim()).as_bytes(), 0o644)?;
    write_atomic(&dir.join(FILE_SETTINGS), &settings_json(files.settings), 0o644)?;
    if let Some(registration) = files.nix_registration {
        write_atomic(&dir.join(FILE_NIX_REGISTRATION), registration, 0o644)?;
    }
    let target = layout.guest_config_dir();
    // The old directory (or whatever stands at its name) moves aside under a fresh name, then goes.
    let old = root.join(format!("{}.old", staging.path().file_name().unwrap_or_default().to_string_lossy()));
    let had_old = match fs::rename(&target, &old) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(io_err(&target)(e)),
    };
    let staged = staging.keep();
    fs::rename(&staged, &target).map_err(io_err(&target))?;
    fs::File::open(root).and_then(|d| d.sync_all()).map_err(io_err(root))?;
    if had_old {
        remove_path(&old)?;
    }
    Ok(())
}

/// Rewrites `settings.json` in the share (before each boot: the host's clock).
pub fn write_settings(layout: &Layout, settings: &GuestSettings) -> Result<(), InstanceError> {
    write_atomic(&layout.guest_config_dir().join(FILE_SETTINGS), &settings_json(settings), 0o644)
}

pub(crate) fn settings_json(settings: &GuestSettings) -> Vec<u8> {
    serde_json::to_vec_pretty(settings).expect("settings serialize")
}

/// Whether `dir` holds only what [`publish`] writes, each a plain file: for tests and `doctor`.
pub fn holds_only_our_files(dir: &Path) -> bool {
    let ours = [FILE_SETTINGS, FILE_AUTHORIZED_KEYS, FILE_HOST_KEY, FILE_HOST_KEY_PUB, FILE_NIX_REGISTRATION];
    fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().all(|e| ours.contains(&&*e.file_name().to_string_lossy()) && e.file_type().is_ok_and(|t| t.is_file()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn settings() -> GuestSettings {
        GuestSettings {
            version: 1,
            cores: 2,
            memory_mib: 1024,
            max_jobs: 2,
            ephemeral: false,
            agent_port: 1023,
            host_store_port: None,
            host_unix_ms: 5,
        }
    }

    #[test]
    fn nothing_planted_in_the_share_survives_and_no_link_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().join("state"));
        layout.create().unwrap();
        let keys = crate::ssh::ensure_keys(&layout).unwrap();
        // What a guest with a writable share (or a bad state directory) could leave: links at the names the
        // host writes, at the old temporary names, and an extra file.
        let victim = dir.path().join("host-file");
        fs::write(&victim, "precious").unwrap();
        let share = layout.guest_config_dir();
        for name in [FILE_SETTINGS, FILE_AUTHORIZED_KEYS, "settings.tmp", "authorized_keys.tmp", "ssh_host_ed25519_key.tmp"] {
            symlink(&victim, share.join(name)).unwrap();
        }
        fs::write(share.join("planted"), "x").unwrap();
        let settings = settings();
        publish(&layout, &GuestFiles { settings: &settings, keys: &keys, nix_registration: Some(b"db") }).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious", "the host wrote through a planted link");
        assert!(holds_only_our_files(&share), "{:?}", fs::read_dir(&share).unwrap().collect::<Vec<_>>());
        assert_eq!(fs::read_to_string(share.join(FILE_NIX_REGISTRATION)).unwrap(), "db");
        let key_mode = fs::metadata(share.join(FILE_HOST_KEY)).unwrap().permissions().mode() & 0o777;
        assert_eq!(key_mode, 0o600);
        assert_eq!(fs::read(share.join(FILE_HOST_KEY)).unwrap(), keys.host_private);
        let read: GuestSettings = serde_json::from_slice(&fs::read(share.join(FILE_SETTINGS)).unwrap()).unwrap();
        assert_eq!(read, settings);
        // Later writes replace a planted link instead of writing through it.
        symlink(&victim, share.join("x")).unwrap();
        fs::remove_file(share.join(FILE_SETTINGS)).unwrap();
        symlink(&victim, share.join(FILE_SETTINGS)).unwrap();
        write_settings(&layout, &settings).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert!(fs::symlink_metadata(share.join(FILE_SETTINGS)).unwrap().is_file());
        // Without a registration the file is gone; the share itself may have been replaced by a link.
        fs::remove_dir_all(&share).unwrap();
        symlink(dir.path(), &share).unwrap();
        publish(&layout, &GuestFiles { settings: &settings, keys: &keys, nix_registration: None }).unwrap();
        assert!(fs::symlink_metadata(&share).unwrap().is_dir());
        assert!(!share.join(FILE_NIX_REGISTRATION).exists());
        assert!(victim.exists(), "the link was removed, not what it pointed at");
        let leftovers: Vec<_> = fs::read_dir(&layout.root)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("guest-config."))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
