//! The supervisor's control socket (`<state>/run/control.sock`): live status and stop, for the CLI.
//!
//! Newline-delimited JSON, one request and one answer per connection, using the agent protocol's framing.

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::agent::protocol::{self, ProtocolError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum ControlRequest {
    Status,
    Stop {
        force: bool,
    },
    /// Test hook: move the guest's clock by this many seconds.
    ShiftGuestClock {
        seconds: i64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// No supervisor runs.
    Stopped,
    /// On demand: listening, VM down.
    Waiting,
    Booting,
    Running,
    Stopping,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskBytes {
    pub allocated: u64,
    pub size: u64,
}

/// What `status --json` prints. The seed's keys (`running`, `pid` only when running, `stateDirectory`) come first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// The supervisor process is alive (its VM may be down while it waits on demand: see `state`).
    pub running: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    pub state_directory: String,
    pub state: VmState,
    pub engine: Option<String>,
    pub uptime_seconds: Option<f64>,
    pub ssh_port: Option<u16>,
    pub guest_ip: Option<String>,
    pub connections: u32,
    pub builds_in_flight: u32,
    pub idle_seconds: Option<f64>,
    pub idle_timeout_seconds: u64,
    pub clock_offset_ms: Option<i64>,
    pub disk_bytes: Option<DiskBytes>,
    pub guest_disk_free_bytes: Option<u64>,
    pub boot_count: u32,
    pub last_boot_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl StatusReport {
    /// What is known of an instance whose supervisor does not run.
    pub fn stopped(state_directory: String) -> Self {
        StatusReport {
            running: false,
            pid: None,
            state_directory,
            state: VmState::Stopped,
            engine: None,
            uptime_seconds: None,
            ssh_port: None,
            guest_ip: None,
            connections: 0,
            builds_in_flight: 0,
            idle_seconds: None,
            idle_timeout_seconds: 0,
            clock_offset_ms: None,
            disk_bytes: None,
            guest_disk_free_bytes: None,
            boot_count: 0,
            last_boot_seconds: None,
            last_error: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusReport>,
}

/// Sends one request to a running supervisor.
pub fn request(socket: &Path, request: &ControlRequest, timeout: Duration) -> Result<ControlReply, ProtocolError> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut writer = stream.try_clone()?;
    protocol::write_message(&mut writer, request)?;
    let line = protocol::read_line(&mut BufReader::new(stream))?;
    let reply: ControlReply = serde_json::from_str(&line)?;
    if !reply.ok {
        return Err(ProtocolError::Refused(reply.error.unwrap_or_default()));
    }
    Ok(reply)
}

/// Reads one request from a control connection and answers it with `handle`.
pub fn serve_one(stream: UnixStream, handle: impl FnOnce(ControlRequest) -> ControlReply) -> Result<(), ProtocolError> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut writer = stream.try_clone()?;
    let line = protocol::read_line(&mut BufReader::new(stream))?;
    let reply = match serde_json::from_str::<ControlRequest>(&line) {
        Ok(request) => handle(request),
        Err(e) => ControlReply { ok: false, error: Some(format!("bad request: {e}")), status: None },
    };
    protocol::write_message(&mut writer, &reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_json_keeps_the_seed_keys() {
        let report = StatusReport::stopped("/s".into());
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["running"], false);
        assert!(json.get("pid").is_none(), "pid only when running");
        assert_eq!(json["stateDirectory"], "/s");
        assert_eq!(json["state"], "stopped");
        let running = StatusReport { running: true, pid: Some(7), state: VmState::Running, ..report };
        let json = serde_json::to_value(&running).unwrap();
        assert_eq!(json["pid"], 7);
        assert_eq!(json["state"], "running");
    }

    #[test]
    fn requests_have_stable_names() {
        assert_eq!(serde_json::to_string(&ControlRequest::Stop { force: true }).unwrap(), r#"{"op":"stop","force":true}"#);
        assert_eq!(serde_json::to_string(&ControlRequest::Status).unwrap(), r#"{"op":"status"}"#);
    }

    #[test]
    fn round_trip_over_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            serve_one(stream, |req| {
                assert_eq!(req, ControlRequest::Stop { force: false });
                ControlReply { ok: false, error: Some("busy".into()), status: None }
            })
            .unwrap();
        });
        let err = request(&path, &ControlRequest::Stop { force: false }, Duration::from_secs(2)).unwrap_err();
        assert!(matches!(err, ProtocolError::Refused(ref m) if m == "busy"), "{err:?}");
        server.join().unwrap();
    }
}
