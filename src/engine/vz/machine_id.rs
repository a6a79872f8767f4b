//! Persistence of the VM's machine identifier (`VZGenericMachineIdentifier.dataRepresentation`).
//!
//! The framework's bytes are opaque; this module only stores them. Keeping the same identifier across boots keeps
//! the guest's view of "this machine" stable.

use std::fs;
use std::io::Write;
use std::path::Path;

use crate::engine::EngineError;

/// Where the identifier came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Read from the file.
    Existing,
    /// The file did not exist; a new identifier was written.
    Created,
    /// The file held bytes the framework rejected; a new identifier replaced them.
    Replaced,
}

/// Reads the identifier at `path`, or creates one with `create` and writes it (atomically: temp file + rename).
/// `is_valid` decides whether stored bytes are still usable (on macOS: `initWithDataRepresentation` returns non-nil).
pub fn load_or_create(
    path: &Path,
    create: impl FnOnce() -> Vec<u8>,
    is_valid: impl Fn(&[u8]) -> bool,
) -> Result<(Vec<u8>, Origin), EngineError> {
    let origin = match fs::read(path) {
        Ok(bytes) if !bytes.is_empty() && is_valid(&bytes) => return Ok((bytes, Origin::Existing)),
        Ok(_) => Origin::Replaced,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Origin::Created,
        Err(e) => {
            return Err(EngineError::io(
                format!("reading the machine identifier {}", path.display()),
                e,
            ));
        }
    };
    let bytes = create();
    write_atomically(path, &bytes).map_err(|e| {
        EngineError::io(
            format!("writing the machine identifier {}", path.display()),
            e,
        )
    })?;
    Ok((bytes, origin))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/machine-id");
        let (a, o) = load_or_create(&p, || vec![1, 2, 3], |_| true).unwrap();
        assert_eq!((a.as_slice(), o), (&[1u8, 2, 3][..], Origin::Created));
        let (b, o) = load_or_create(&p, || panic!("must not create again"), |_| true).unwrap();
        assert_eq!((b, o), (a, Origin::Existing));
        assert!(!dir.path().join("sub/machine-id.tmp").exists());
    }

    #[test]
    fn replaces_invalid_or_empty_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("machine-id");
        fs::write(&p, b"garbage").unwrap();
        let (b, o) = load_or_create(&p, || vec![9; 4], |bytes| bytes != b"garbage").unwrap();
        assert_eq!((b, o), (vec![9; 4], Origin::Replaced));
        assert_eq!(fs::read(&p).unwrap(), vec![9; 4]);
        fs::write(&p, b"").unwrap();
        assert_eq!(
            load_or_create(&p, || vec![7], |_| true).unwrap().1,
            Origin::Replaced
        );
    }

    #[test]
    fn unreadable_path_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading fails with something other than NotFound.
        let e = load_or_create(dir.path(), || vec![1], |_| true).unwrap_err();
        assert!(e.to_string().contains("machine identifier"), "{e}");
    }
}
