//! The console sink: appends the guest console to `console.log`, with a marker per boot, following rotation
//! by newsyslog/logrotate, and to stderr with --verbose.
//!
//! The guest writes what it likes to its console, so the file is capped: past `limit` bytes it is renamed to
//! `console.log.1` (replacing the previous one) and a new `console.log` starts with a marker saying so. At
//! most about twice the limit is kept. A write error never stops the sink: the bytes are dropped and it keeps
//! draining, so the guest never blocks on a full console.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::clock::timestamp;
use crate::logfile::ReopeningFile;

/// Default cap of console.log before it rotates to console.log.1.
pub const CONSOLE_LIMIT: u64 = 16 << 20;

pub struct ConsoleSink {
    path: PathBuf,
    log: ReopeningFile,
    /// Bytes in the file at `path` as far as we know (it is checked again before a rotation).
    size: u64,
    limit: u64,
    echo: bool,
    failing: bool,
}

impl ConsoleSink {
    pub fn open(path: &Path, echo: bool, boot_number: u32, limit: u64) -> io::Result<Self> {
        let log = ReopeningFile::open(path)?;
        let size = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let mut sink = ConsoleSink { path: path.to_path_buf(), log, size, limit, echo, failing: false };
        let marker =
            format!("\n===== darwin-vz-nix: boot {boot_number} at {} (pid {}) =====\n", timestamp(SystemTime::now()), std::process::id());
        sink.log.write_all(marker.as_bytes())?;
        sink.size += marker.len() as u64;
        Ok(sink)
    }

    fn rotate_if_full(&mut self) -> io::Result<()> {
        if self.size < self.limit {
            return Ok(());
        }
        // Someone else may have rotated it meanwhile.
        self.size = fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        if self.size < self.limit {
            return Ok(());
        }
        let old = self.path.with_extension("log.1");
        fs::rename(&self.path, &old)?;
        let marker = format!(
            "===== darwin-vz-nix: console.log reached {} bytes at {}; the earlier output is in {} =====\n",
            self.limit,
            timestamp(SystemTime::now()),
            old.display()
        );
        self.log.write_all(marker.as_bytes())?;
        self.size = marker.len() as u64;
        Ok(())
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.rotate_if_full().and_then(|()| self.log.write_all(buf));
        match written {
            Ok(()) => {
                self.size += buf.len() as u64;
                self.failing = false;
            }
            Err(e) if !self.failing => {
                tracing::warn!("console log {}: {e}; dropping console output until it works again", self.path.display());
                self.failing = true;
            }
            Err(_) => {}
        }
        if self.echo {
            let _ = io::stderr().write_all(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.log.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_log_is_capped_and_rotated_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut sink = ConsoleSink::open(&path, false, 1, 1000).unwrap();
        for _ in 0..50 {
            sink.write_all(&[b'x'; 100]).unwrap();
        }
        let current = fs::read_to_string(&path).unwrap();
        let previous = fs::read_to_string(dir.path().join("console.log.1")).unwrap();
        assert!(current.len() <= 1000 + 300, "capped: {} bytes", current.len());
        assert!(previous.len() <= 1000 + 300, "one old file of about the limit: {} bytes", previous.len());
        assert!(current.contains("reached 1000 bytes") || previous.contains("reached 1000 bytes"));
        let files = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 2, "console.log and console.log.1 only");
    }

    #[test]
    fn write_errors_never_stop_the_sink() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut sink = ConsoleSink::open(&path, false, 1, 1000).unwrap();
        // The directory goes away: the file cannot be reopened, yet every write is taken.
        drop(dir);
        for _ in 0..5 {
            assert_eq!(sink.write(b"still draining\n").unwrap(), 15);
        }
    }
}
