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
    /// The directory is not one `init`/`start` made: nothing is created or deleted in it.
    #[error("{path} is not a darwin-vz-nix state directory ({reason}); pass --state-dir with an empty or new directory")]
    NotAStateDir { path: PathBuf, reason: String },
    /// The directory or one of its entries could be changed by someone else, or is a link we did not make.
    #[error("{path} is not safe to use: {reason}")]
    Unsafe { path: PathBuf, reason: String },
}

impl InstanceError {
    /// Whether the error is about what the user pointed us at (exit code 2) rather than a failure (1).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, InstanceError::NotAStateDir { .. } | InstanceError::Unsafe { .. } | InstanceError::NoDefaultStateDir)
    }
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
    /// The read-only `dvn-config` share, rebuilt by every `start` (see `guest_config`).
    pub fn guest_config_dir(&self) -> PathBuf {
        self.root.join("guest-config")
    }
    /// The guest's ssh host key, made and kept on the host (never in the share, which is rebuilt from it).
    pub fn guest_host_key(&self) -> PathBuf {
        self.ssh_dir().join("guest_host_ed25519_key")
    }
    pub fn guest_host_key_pub(&self) -> PathBuf {
        self.ssh_dir().join("guest_host_ed25519_key.pub")
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

    /// The marker that `init`/`start` leave in a state directory; `destroy` deletes nothing without it.
    pub fn marker(&self) -> PathBuf {
        self.root.join(MARKER)
    }

    pub fn exists(&self) -> bool {
        self.root.is_dir()
    }

    /// Creates the state directory (0700: it holds a private key) and its subdirectories, and marks it as ours.
    /// Missing parents get the default mode (a 0700 /var/lib would lock everyone else out). An existing
    /// directory is used only if it is safe (ours, not writable by others) and is a state directory already:
    /// marked, empty, or holding nothing but the names we make (one made before the marker existed).
    pub fn create(&self) -> Result<(), InstanceError> {
        use std::os::unix::fs::DirBuilderExt;
        let root = &self.root;
        if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        match fs::DirBuilder::new().mode(0o700).create(root) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(root)(e)),
        }
        self.check_root()?;
        self.check_is_state_dir()?;
        if !self.is_marked() {
            write_atomic(&self.marker(), MARKER_CONTENTS.as_bytes(), 0o644)?;
        }
        for dir in [self.ssh_dir(), self.guest_config_dir(), self.runtime_dir()] {
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(&dir)(e)),
            }
            let meta = fs::symlink_metadata(&dir).map_err(io_err(&dir))?;
            if !meta.is_dir() {
                return Err(InstanceError::Unsafe {
                    path: dir,
                    reason: "is not a directory (a link or a file where we keep a directory)".into(),
                });
            }
        }
        Ok(())
    }

    /// The state directory itself: a directory that we own and that nobody else can write to.
    pub fn check_root(&self) -> Result<(), InstanceError> {
        use std::os::unix::fs::MetadataExt;
        let root = &self.root;
        let meta = fs::metadata(root).map_err(|e| match e.kind() {
            io::ErrorKind::NotADirectory => {
                InstanceError::NotAStateDir { path: root.clone(), reason: "a parent is not a directory".into() }
            }
            _ => io_err(root)(e),
        })?;
        if !meta.is_dir() {
            return Err(InstanceError::NotAStateDir { path: root.clone(), reason: "it is not a directory".into() });
        }
        let me = nix::unistd::Uid::effective().as_raw();
        if meta.uid() != me {
            return Err(InstanceError::Unsafe {
                path: root.clone(),
                reason: format!("it belongs to uid {}, not to us (uid {me})", meta.uid()),
            });
        }
        if meta.mode() & 0o022 != 0 {
            return Err(InstanceError::Unsafe {
                path: root.clone(),
                reason: format!("others can write to it (mode {:o}); `chmod 700` it", meta.mode() & 0o7777),
            });
        }
        Ok(())
    }

    pub fn is_marked(&self) -> bool {
        fs::symlink_metadata(self.marker()).is_ok_and(|m| m.is_file())
    }

    /// Marked, or (made before the marker existed) empty or holding only names we make.
    fn check_is_state_dir(&self) -> Result<(), InstanceError> {
        if self.is_marked() {
            return Ok(());
        }
        let entries = fs::read_dir(&self.root).map_err(io_err(&self.root))?;
        for entry in entries {
            let name = entry.map_err(io_err(&self.root))?.file_name();
            let name = name.to_string_lossy();
            if !is_our_name(&name) {
                return Err(InstanceError::NotAStateDir {
                    path: self.root.clone(),
                    reason: format!("it is not empty and holds '{name}', which darwin-vz-nix does not make"),
                });
            }
        }
        Ok(())
    }

    /// Whether `destroy` may delete in this directory: marked by `init`/`start`, and never `/` or a home.
    pub fn check_destroyable(&self) -> Result<(), InstanceError> {
        let not_ours = |reason: &str| InstanceError::NotAStateDir { path: self.root.clone(), reason: reason.into() };
        let canonical = fs::canonicalize(&self.root).map_err(io_err(&self.root))?;
        if canonical.parent().is_none() {
            return Err(not_ours("it is the root directory"));
        }
        let homes = [
            std::env::var_os("HOME").map(PathBuf::from),
            nix::unistd::User::from_uid(nix::unistd::Uid::current()).ok().flatten().map(|u| u.dir),
        ];
        if homes.iter().flatten().any(|h| fs::canonicalize(h).is_ok_and(|h| h == canonical)) {
            return Err(not_ours("it is a home directory"));
        }
        self.check_root()?;
        if !self.is_marked() {
            return Err(not_ours(&format!("it has no {MARKER}, which `init` and `start` write")));
        }
        Ok(())
    }
}

/// What `destroy` deletes: only names we make, and each only if it is of the type we make (a link, or a
/// directory where we keep a file, is left alone and reported). Returns the paths left alone.
impl Layout {
    pub fn destroy_files(&self, keys: bool) -> Result<Vec<PathBuf>, InstanceError> {
        let mut doomed = vec![
            (self.disk(), false),
            (self.console_log(), false),
            (self.guest_ip(), false),
            (self.pid_file(), false),
            (self.config_file(), false),
            (self.machine_id_file(), false),
            (self.mac_file(), false),
            (self.runtime_dir(), true),
        ];
        if keys {
            doomed.extend([(self.ssh_dir(), true), (self.guest_config_dir(), true)]);
        }
        let mut left = Vec::new();
        for (path, is_dir) in doomed {
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() == is_dir && (is_dir || meta.is_file()) => remove_path(&path)?,
                Ok(_) => left.push(path),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Ok(left)
    }
}

/// Marks a state directory; `destroy` refuses a directory without it.
pub const MARKER: &str = ".darwin-vz-nix-state";
const MARKER_CONTENTS: &str = "darwin-vz-nix state directory\nversion 1\n";

/// The names darwin-vz-nix makes in a state directory (rotated logs and temporary files included).
fn is_our_name(name: &str) -> bool {
    const EXACT: [&str; 16] = [
        MARKER,
        "disk.img",
        "ssh",
        "guest-config",
        "guest-ip",
        "vm.pid",
        "console.log",
        "lock",
        "config.json",
        "run",
        "mac-address",
        "machine-identifier",
        "daemon.log",
        "launchd.log",
        "vm.tmp",
        "config.tmp",
    ];
    EXACT.contains(&name)
        || ["console.log.", "daemon.log.", "launchd.log.", ".dvn-", "guest-config."].iter().any(|p| name.starts_with(p))
        || name.ends_with(".tmp")
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
    /// The host Nix daemon socket the guest's store queries go to (read-only, filtered); None: queries off
    /// (inputs in the host store are uploaded like any other).
    #[serde(default)]
    pub host_nix_daemon: Option<PathBuf>,
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

/// Writes a file by rename in its own directory, so readers never see half of it. The temporary file has a
/// fresh name (created exclusively: a link planted in the directory is never followed) and gets its final mode
/// before it appears; the rename replaces whatever `path` was (a planted link included) without following it;
/// the file and then the directory are synced.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), InstanceError> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let write = || -> io::Result<()> {
        let mut tmp = tempfile::Builder::new().prefix(".dvn-").suffix(".tmp").tempfile_in(dir)?;
        tmp.as_file().set_permissions(fs::Permissions::from_mode(mode))?;
        tmp.write_all(contents)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        fs::File::open(dir)?.sync_all()
    };
    write().map_err(io_err(path))
}

/// Opens a file for appending without following a link at its path (console.log, logs): created 0644 if new.
pub fn open_append_nofollow(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new().create(true).append(true).mode(0o644).custom_flags(libc::O_NOFOLLOW).open(path)
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
    fn root_and_unmarked_directories_are_not_destroyable() {
        assert!(matches!(Layout::new("/").check_destroyable(), Err(InstanceError::NotAStateDir { .. })));
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().join("s"));
        fs::create_dir(&layout.root).unwrap();
        assert!(matches!(layout.check_destroyable(), Err(InstanceError::NotAStateDir { .. })), "unmarked");
        layout.create().unwrap();
        layout.check_destroyable().unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&layout.root, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(layout.check_destroyable(), Err(InstanceError::Unsafe { .. })));
        assert!(matches!(layout.create(), Err(InstanceError::Unsafe { .. })), "a mode-777 state directory is refused");
    }

    #[test]
    fn missing_parents_keep_the_default_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().join("var/lib/dvn"));
        layout.create().unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&layout.root), 0o700);
        assert_ne!(mode(&dir.path().join("var/lib")), 0o700, "a parent made 0700 locks others out");
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
