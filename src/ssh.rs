//! SSH: the client key, the guest's host key (made on the host and pinned), and the ssh command line.

use std::fs;
use std::path::{Path, PathBuf};

use ssh_key::{Algorithm, LineEnding, PrivateKey};

use crate::instance::{InstanceError, Layout, io_err, write_atomic};

/// The name the guest is known by in known_hosts and ssh_config, whatever port it is reached on.
pub const HOST_ALIAS: &str = "darwin-vz-nix";
pub const GUEST_USER: &str = "builder";

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("generating an ssh key: {0}")]
    Generate(ssh_key::Error),
    #[error("{path} is not a valid OpenSSH key ({source}); delete it and run `darwin-vz-nix init` to make a new one")]
    BadKey {
        path: PathBuf,
        #[source]
        source: ssh_key::Error,
    },
    #[error(transparent)]
    Instance(#[from] InstanceError),
}

/// What the guest gets of the keys (through the `dvn-config` share): never the client's private key.
#[derive(Debug, Clone)]
pub struct GuestKeys {
    /// The client's public key line, for the guest's authorized_keys.
    pub client_public: String,
    /// The guest's host key (OpenSSH private key) and its public line.
    pub host_private: Vec<u8>,
    pub host_public: String,
}

/// Makes whatever keys are missing and (re)writes known_hosts from the guest's host key. Idempotent.
pub fn ensure_keys(layout: &Layout) -> Result<GuestKeys, SshError> {
    let client_public = ensure_key_pair(&layout.client_key(), &layout.client_key_pub(), "darwin-vz-nix client")?;
    let host_public = ensure_key_pair(&layout.guest_host_key(), &layout.guest_host_key_pub(), "darwin-vz-nix guest")?;
    write_atomic(&layout.known_hosts(), known_hosts_line(&host_public).as_bytes(), 0o644)?;
    let host_key = layout.guest_host_key();
    let host_private = fs::read(&host_key).map_err(io_err(&host_key))?;
    Ok(GuestKeys { client_public, host_private, host_public })
}

/// The known_hosts entry that pins the guest under HOST_ALIAS.
pub fn known_hosts_line(host_public_key: &str) -> String {
    let mut fields = host_public_key.split_whitespace();
    let (algorithm, key) = (fields.next().unwrap_or(""), fields.next().unwrap_or(""));
    format!("{HOST_ALIAS} {algorithm} {key}\n")
}

/// Returns the public key line; generates the pair (private 0600) if the private key is missing.
fn ensure_key_pair(private: &Path, public: &Path, comment: &str) -> Result<String, SshError> {
    if private.exists() {
        let key = PrivateKey::read_openssh_file(private).map_err(|source| SshError::BadKey { path: private.into(), source })?;
        let line = key.public_key().to_openssh().map_err(|source| SshError::BadKey { path: private.into(), source })?;
        restrict_permissions(private)?;
        if fs::read_to_string(public).map(|p| p.trim() != line.trim()).unwrap_or(true) {
            write_atomic(public, format!("{line}\n").as_bytes(), 0o644)?;
        }
        return Ok(line);
    }
    let mut key = PrivateKey::random(&mut rand_core::OsRng, Algorithm::Ed25519).map_err(SshError::Generate)?;
    key.set_comment(comment);
    let pem = key.to_openssh(LineEnding::LF).map_err(SshError::Generate)?;
    write_atomic(private, pem.as_bytes(), 0o600)?;
    let line = key.public_key().to_openssh().map_err(SshError::Generate)?;
    write_atomic(public, format!("{line}\n").as_bytes(), 0o644)?;
    Ok(line)
}

fn restrict_permissions(path: &Path) -> Result<(), InstanceError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path).map_err(io_err(path))?;
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_err(path))?;
    }
    Ok(())
}

/// The ssh argv (without the program name) that reaches the guest through the loopback proxy with the pinned key.
pub fn ssh_args(layout: &Layout, port: u16, user_options: &[String], remote_command: &[String]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "-i".into(),
        layout.client_key().display().to_string(),
        "-p".into(),
        port.to_string(),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
        "-o".into(),
        format!("UserKnownHostsFile={}", layout.known_hosts().display()),
        "-o".into(),
        "GlobalKnownHostsFile=/dev/null".into(),
        "-o".into(),
        format!("HostKeyAlias={HOST_ALIAS}"),
        "-o".into(),
        "LogLevel=ERROR".into(),
    ];
    args.extend(user_options.iter().cloned());
    args.push(format!("{GUEST_USER}@127.0.0.1"));
    if !remote_command.is_empty() {
        args.push("--".into());
        args.extend(remote_command.iter().cloned());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_made_once_private_0600_and_host_key_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.create().unwrap();
        ensure_keys(&layout).unwrap();
        let client = fs::read(layout.client_key()).unwrap();
        for private in [layout.client_key(), layout.guest_host_key()] {
            assert_eq!(fs::metadata(&private).unwrap().permissions().mode() & 0o777, 0o600, "{private:?}");
        }
        let host_pub = fs::read_to_string(layout.guest_host_key_pub()).unwrap();
        assert!(host_pub.starts_with("ssh-ed25519 "));
        let known = fs::read_to_string(layout.known_hosts()).unwrap();
        assert_eq!(known, known_hosts_line(&host_pub));
        assert!(known.starts_with("darwin-vz-nix ssh-ed25519 "));
        let keys = ensure_keys(&layout).unwrap();
        assert_eq!(keys.client_public.trim(), fs::read_to_string(layout.client_key_pub()).unwrap().trim());
        assert_eq!(keys.host_public.trim(), host_pub.trim());
        // What goes to the guest holds no line of the client key's secret body.
        let client_text = String::from_utf8(client.clone()).unwrap();
        let secret_line = client_text.lines().nth(3).unwrap();
        assert!(!String::from_utf8_lossy(&keys.host_private).contains(secret_line));
        // Idempotent: a second run changes no key and repairs loose permissions.
        fs::set_permissions(layout.client_key(), fs::Permissions::from_mode(0o644)).unwrap();
        ensure_keys(&layout).unwrap();
        assert_eq!(fs::read(layout.client_key()).unwrap(), client);
        assert_eq!(fs::metadata(layout.client_key()).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_to_string(layout.known_hosts()).unwrap(), known);
    }

    #[test]
    fn a_new_host_key_rewrites_known_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.create().unwrap();
        ensure_keys(&layout).unwrap();
        let before = fs::read_to_string(layout.known_hosts()).unwrap();
        fs::remove_file(layout.guest_host_key()).unwrap();
        ensure_keys(&layout).unwrap();
        let after = fs::read_to_string(layout.known_hosts()).unwrap();
        assert_ne!(before, after);
        assert_eq!(after, known_hosts_line(&fs::read_to_string(layout.guest_host_key_pub()).unwrap()));
    }

    #[test]
    fn corrupt_key_gets_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.create().unwrap();
        fs::write(layout.client_key(), "garbage").unwrap();
        let err = ensure_keys(&layout).unwrap_err().to_string();
        assert!(err.contains("darwin-vz-nix init"), "{err}");
    }

    #[test]
    fn ssh_args_pin_the_key_and_split_command() {
        let layout = Layout::new("/s");
        let args = ssh_args(&layout, 31122, &["-v".into()], &["echo".into(), "ok".into()]);
        let joined = args.join(" ");
        assert!(joined.contains("StrictHostKeyChecking=yes"));
        assert!(joined.contains("UserKnownHostsFile=/s/ssh/known_hosts"));
        assert!(joined.contains("HostKeyAlias=darwin-vz-nix"));
        assert!(joined.ends_with("-v builder@127.0.0.1 -- echo ok"), "{joined}");
        assert!(!joined.contains("accept-new"));
    }
}
