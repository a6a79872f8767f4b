//! One state directory = one VM instance: where its files are, who owns it (the lock), its keys and disk.

pub mod disk;
pub mod lock;
pub mod process;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::EngineKind;

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("no state directory given and neither $XDG_DATA_HOME nor $HOME is set; pass --state-dir DIR")]
    NoDefaultStateDir,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is corrupt ({reason}); remove it or run `darwin-vz-nix destroy`")]
    Corrupt { path: PathBuf, reason: String },
}

pub fn io_err(path: &Path) -> impl FnOnce(io::Error) -> InstanceError + '_ {
    move |source| InstanceError::Io { path: path.to_path_buf(), source }
}

/// The default state directory: `$XDG_DATA_HOME/darwin-vz-nix`, else `~/.local/share/darwin-vz-nix`.
pub fn default_state_dir() -> Result<PathBuf, InstanceError> {
    state_dir_from(std::env::var_os("XDG_DATA_HOME"), std::env::var_os("HOME"))
}

fn state_dir_from(xdg_data_home: Option<std::ffi::OsString>, home: Option<std::ffi::OsString>) -> Result<PathBuf, InstanceError> {
    if let Some(xdg) = xdg_data_home.filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("darwin-vz-nix"));
    }
    let home = home.filter(|v| !v.is_empty()).ok_or(InstanceError::NoDefaultStateDir)?;
    Ok(PathBuf::from(home).join(".local/share/darwin-vz-nix"))
}

/// Paths inside a state directory. Creating nothing by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Layout { root: root.into() }
    }
    pub fn disk(&self) -> PathBuf {
        self.root.join("disk.img")
    }
    pub fn ssh_dir(&self) -> PathBuf {
        self.root.join("ssh")
    }
    pub fn client_key(&self) -> PathBuf {
        self.ssh_dir().join("id_ed25519")
    }
    pub fn client_key_pub(&self) -> PathBuf {
        self.ssh_dir().join("id_ed25519.pub")
    }
    pub fn known_hosts(&self) -> PathBuf {
        self.ssh_dir().join("known_hosts")
    }
    /// The read-only `dvn-config` share: the guest's host key, authorized_keys, settings.
    pub fn guest_config_dir(&self) -> PathBuf {
        self.root.join("guest-config")
    }
    pub fn guest_host_key(&self) -> PathBuf {
        self.guest_config_dir().join(crate::guest_config::FILE_HOST_KEY)
    }
    pub fn guest_host_key_pub(&self) -> PathBuf {
        self.guest_config_dir().join(crate::guest_config::FILE_HOST_KEY_PUB)
    }
    pub fn guest_ip(&self) -> PathBuf {
        self.root.join("guest-ip")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.root.join("vm.pid")
    }
    pub fn console_log(&self) -> PathBuf {
        self.root.join("console.log")
    }
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("lock")
    }
    /// The effective configuration of the last `start`.
    pub fn config_file(&self) -> PathBuf {
        self.root.join("config.json")
    }
    pub fn control_socket(&self) -> PathBuf {
        self.runtime_dir().join("control.sock")
    }
    /// Engine sockets and other files that only live while the VM runs.
    pub fn runtime_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn mac_file(&self) -> PathBuf {
        self.root.join("mac-address")
    }
    pub fn machine_id_file(&self) -> PathBuf {
        self.root.join("machine-identifier")
    }

    pub fn exists(&self) -> bool {
        self.root.is_dir()
    }

    /// Creates the state directory (0700: it holds a private key).
    pub fn create(&self) -> Result<(), InstanceError> {
        use std::os::unix::fs::DirBuilderExt;
        for dir in [self.root.clone(), self.ssh_dir(), self.guest_config_dir(), self.runtime_dir()] {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(io_err(&dir))?;
        }
        Ok(())
    }
}

/// What `start` ran with, kept in `config.json` for `status`, `ssh` and `doctor`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveConfig {
    pub engine: EngineKind,
    pub cores: u32,
    pub memory_mib: u64,
    pub disk_bytes: u64,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub system: Option<PathBuf>,
    pub idle_timeout_seconds: u64,
    pub rosetta: Option<bool>,
    pub share_nix_store: bool,
    /// The host directory shared as the guest's store (`/nix/store`; tests use an empty directory).
    #[serde(default = "default_host_nix_store")]
    pub host_nix_store: PathBuf,
    pub port: u16,
    pub on_demand: bool,
    pub ephemeral: bool,
    pub max_jobs: u32,
}

fn default_host_nix_store() -> PathBuf {
    PathBuf::from(crate::launch::HOST_NIX_STORE)
}

impl EffectiveConfig {
    pub fn load(layout: &Layout) -> Result<Option<Self>, InstanceError> {
        let path = layout.config_file();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| InstanceError::Corrupt { path, reason: e.to_string() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(InstanceError::Io { path, source: e }),
        }
    }

    pub fn save(&self, layout: &Layout) -> Result<(), InstanceError> {
        let json = serde_json::to_vec_pretty(self).expect("config serializes");
        write_atomic(&layout.config_file(), &json, 0o644)
    }
}

/// Deletes a file or a directory tree; one that is already gone is fine.
pub fn remove_path(path: &Path) -> Result<(), InstanceError> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

/// Writes a file by rename, so readers never see half of it.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), InstanceError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let write = || -> io::Result<()> {
        let mut file = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(io_err(path))
}

/// Reads the instance's MAC address, making a new random locally administered one the first time.
pub fn ensure_mac_address(layout: &Layout) -> Result<String, InstanceError> {
    let path = layout.mac_file();
    if let Ok(text) = fs::read_to_string(&path) {
        let mac = text.trim().to_string();
        if is_local_unicast_mac(&mac) {
            return Ok(mac);
        }
        return Err(InstanceError::Corrupt { path, reason: format!("'{mac}' is not a locally administered MAC") });
    }
    let mut bytes = [0u8; 6];
    getrandom(&mut bytes);
    let mac = format_local_mac(bytes);
    write_atomic(&path, format!("{mac}\n").as_bytes(), 0o644)?;
    Ok(mac)
}

fn getrandom(buf: &mut [u8]) {
    use rand_core::RngCore;
    rand_core::OsRng.fill_bytes(buf);
}

/// Sets the locally administered bit and clears the multicast bit of the first octet.
pub fn format_local_mac(mut bytes: [u8; 6]) -> String {
    bytes[0] = (bytes[0] | 0x02) & 0xfe;
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

pub fn is_local_unicast_mac(mac: &str) -> bool {
    let parts: Vec<_> = mac.split(':').collect();
    parts.len() == 6
        && parts.iter().all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok())
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 0x02 != 0 && b & 0x01 == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_local_unicast_stable_and_distinct() {
        assert_eq!(format_local_mac([0xff; 6]), "fe:ff:ff:ff:ff:ff");
        assert_eq!(format_local_mac([0; 6]), "02:00:00:00:00:00");
        assert!(is_local_unicast_mac("02:da:72:56:00:01"));
        assert!(!is_local_unicast_mac("00:11:22:33:44:55"), "globally administered");
        assert!(!is_local_unicast_mac("03:11:22:33:44:55"), "multicast");
        assert!(!is_local_unicast_mac("02:11:22:33:44"));
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (la, lb) = (Layout::new(a.path()), Layout::new(b.path()));
        let mac_a = ensure_mac_address(&la).unwrap();
        assert!(is_local_unicast_mac(&mac_a));
        assert_eq!(ensure_mac_address(&la).unwrap(), mac_a, "kept across boots");
        assert_ne!(ensure_mac_address(&lb).unwrap(), mac_a, "two instances never share one");
        fs::write(la.mac_file(), "nonsense").unwrap();
        assert!(matches!(ensure_mac_address(&la), Err(InstanceError::Corrupt { .. })));
    }

    #[test]
    fn default_state_dir_follows_xdg() {
        // The environment is passed in: the test neither reads nor changes the process's own.
        let some = |s: &str| Some(std::ffi::OsString::from(s));
        assert_eq!(state_dir_from(some("/x"), some("/h")).unwrap(), Path::new("/x/darwin-vz-nix"));
        assert_eq!(state_dir_from(some(""), some("/h")).unwrap(), Path::new("/h/.local/share/darwin-vz-nix"));
        assert_eq!(state_dir_from(None, some("/h")).unwrap(), Path::new("/h/.local/share/darwin-vz-nix"));
        assert!(matches!(state_dir_from(None, some("")), Err(InstanceError::NoDefaultStateDir)));
        assert!(matches!(state_dir_from(None, None), Err(InstanceError::NoDefaultStateDir)));
    }
}
