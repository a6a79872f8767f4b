//! The supervisor's pid file, with the process start time, so a reused pid is never taken for ours.

use std::fs;

use super::{InstanceError, Layout, write_atomic};

/// `vm.pid` holds the pid on its first line (as the original did) and the process start time on the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PidRecord {
    pub pid: u32,
    pub start_time: Option<u64>,
}

impl PidRecord {
    pub fn for_self() -> Self {
        let pid = std::process::id();
        PidRecord { pid, start_time: process_start_time(pid) }
    }

    pub fn write(&self, layout: &Layout) -> Result<(), InstanceError> {
        let text = match self.start_time {
            Some(t) => format!("{}\n{t}\n", self.pid),
            None => format!("{}\n", self.pid),
        };
        write_atomic(&layout.pid_file(), text.as_bytes(), 0o644)
    }

    pub fn read(layout: &Layout) -> Option<Self> {
        let text = fs::read_to_string(layout.pid_file()).ok()?;
        let mut lines = text.lines();
        let pid = lines.next()?.trim().parse().ok()?;
        let start_time = lines.next().and_then(|l| l.trim().parse().ok());
        Some(PidRecord { pid, start_time })
    }

    /// True only if this pid is alive and started when the record says: never an unrelated process.
    pub fn is_live(&self) -> bool {
        match (self.start_time, process_start_time(self.pid)) {
            (Some(recorded), Some(now)) => recorded == now,
            _ => false,
        }
    }
}

/// The process start time in clock ticks since boot (Linux) or microseconds since the epoch (macOS).
#[cfg(target_os = "linux")]
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Fields after comm start at field 3 (state); starttime is field 22.
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(target_os = "macos")]
pub fn process_start_time(pid: u32) -> Option<u64> {
    let mut info: libc::proc_bsdinfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::proc_bsdinfo>() as libc::c_int;
    // SAFETY: `info` is a properly sized, writable proc_bsdinfo.
    let n =
        unsafe { libc::proc_pidinfo(pid as libc::c_int, libc::PROC_PIDTBSDINFO, 0, (&mut info as *mut libc::proc_bsdinfo).cast(), size) };
    (n == size).then(|| info.pbi_start_tvsec * 1_000_000 + info.pbi_start_tvusec)
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
pub fn process_start_time(_pid: u32) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_record_is_live_and_a_reused_pid_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let me = PidRecord::for_self();
        me.write(&layout).unwrap();
        let read = PidRecord::read(&layout).unwrap();
        assert_eq!(read, me);
        assert!(read.is_live());
        let reused = PidRecord { start_time: me.start_time.map(|t| t + 1), ..me };
        assert!(!reused.is_live(), "same pid, other start time: another process");
        let legacy = PidRecord { start_time: None, ..me };
        assert!(!legacy.is_live(), "no start time: cannot prove it is ours");
        assert!(!PidRecord { pid: u32::MAX - 1, start_time: Some(1) }.is_live());
    }
}
