//! An append-only log file that follows rotation: when newsyslog (or logrotate) renames it, the next write
//! goes to a new file at the same path. No signal is needed and no line is written to a file being rotated away
//! for longer than one write.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub struct ReopeningFile {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    path: PathBuf,
    file: File,
    identity: (u64, u64),
}

/// Never through a link at the path: a log in the state directory must not become a write to another file.
fn open_append(path: &Path) -> io::Result<(File, (u64, u64))> {
    let file = crate::instance::open_append_nofollow(path)?;
    let meta = file.metadata()?;
    Ok((file, (meta.dev(), meta.ino())))
}

impl ReopeningFile {
    pub fn open(path: impl Into<PathBuf>) -> io::Result<Self> {
        let path = path.into();
        let (file, identity) = open_append(&path)?;
        Ok(ReopeningFile { inner: Arc::new(Mutex::new(Inner { path, file, identity })) })
    }
}

impl Inner {
    /// Reopens when the path no longer names the open file (renamed or deleted by rotation).
    fn follow_rotation(&mut self) -> io::Result<()> {
        let current = std::fs::metadata(&self.path).map(|m| (m.dev(), m.ino())).ok();
        if current != Some(self.identity) {
            let (file, identity) = open_append(&self.path)?;
            self.file = file;
            self.identity = identity;
        }
        Ok(())
    }
}

impl Write for ReopeningFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.follow_rotation()?;
        inner.file.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).file.flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for ReopeningFile {
    type Writer = ReopeningFile;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_rename_and_delete_without_losing_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.log");
        let mut log = ReopeningFile::open(&path).unwrap();
        writeln!(log, "one").unwrap();
        std::fs::rename(&path, dir.path().join("daemon.log.0")).unwrap();
        writeln!(log, "two").unwrap();
        std::fs::remove_file(&path).unwrap();
        writeln!(log, "three").unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("daemon.log.0")).unwrap(), "one\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\n");
        // "two" went to the file that replaced the renamed one, and that file was deleted by the test itself.
        let mut clone = log.clone();
        writeln!(clone, "four").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\nfour\n");
    }

    #[test]
    fn a_planted_link_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let (path, victim) = (dir.path().join("console.log"), dir.path().join("victim"));
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        assert!(ReopeningFile::open(&path).is_err());
        let mut log = ReopeningFile::open(dir.path().join("other.log")).unwrap();
        std::fs::rename(&path, dir.path().join("other.log")).unwrap();
        assert!(writeln!(log, "x").is_err(), "a link swapped in by rotation is not followed either");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    }
}
