//! The supervisor's control socket (`<state>/run/control.sock`): live status and stop, for the CLI.
//!
//! Newline-delimited JSON, one request and one answer per connection, using the agent protocol's framing.
//! Every message carries `"v"`: a nix-darwin switch replaces the program under a running supervisor, and an
//! old/new pair must say so rather than misread each other.

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::agent::protocol::{self, ProtocolError};

/// Version of the control protocol; bumped on any change either side could misread.
pub const CONTROL_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct RequestEnvelope {
    #[serde(default)]
    v: u32,
    #[serde(flatten)]
    request: ControlRequest,
}

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
    /// Bytes the ssh proxy relayed to and from the guest since the supervisor started.
    #[serde(default)]
    pub bytes_to_guest: u64,
    #[serde(default)]
    pub bytes_from_guest: u64,
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
            bytes_to_guest: 0,
            bytes_from_guest: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlReply {
    /// CONTROL_VERSION of the supervisor (0: a supervisor from before versions).
    #[serde(default)]
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusReport>,
}

impl ControlReply {
    pub fn ok() -> Self {
        ControlReply { v: CONTROL_VERSION, ok: true, error: None, status: None }
    }
    pub fn status(status: StatusReport) -> Self {
        ControlReply { status: Some(status), ..ControlReply::ok() }
    }
    pub fn error(message: impl Into<String>) -> Self {
        ControlReply { ok: false, error: Some(message.into()), ..ControlReply::ok() }
    }
}

/// Sends one request to a running supervisor.
pub fn request(socket: &Path, request: &ControlRequest, timeout: Duration) -> Result<ControlReply, ProtocolError> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut writer = stream.try_clone()?;
    protocol::write_message(&mut writer, &RequestEnvelope { v: CONTROL_VERSION, request: request.clone() })?;
    let line = protocol::read_line(&mut BufReader::new(stream))?;
    // The version first: a reply of another version may not parse as ours at all.
    let value: serde_json::Value = serde_json::from_str(&line)?;
    let theirs = value.get("v").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
    if theirs != CONTROL_VERSION {
        return Err(ProtocolError::ControlVersion { theirs, ours: CONTROL_VERSION });
    }
    let reply: ControlReply = serde_json::from_value(value)?;
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
    let reply = match serde_json::from_str::<serde_json::Value>(&line) {
        Err(e) => ControlReply::error(format!("bad request: {e}")),
        Ok(value) => match value.get("v").and_then(|v| v.as_u64()).unwrap_or(0) as u32 {
            CONTROL_VERSION => match serde_json::from_value::<RequestEnvelope>(value) {
                Ok(envelope) => handle(envelope.request),
                Err(e) => ControlReply::error(format!("bad request: {e}")),
            },
            theirs => ControlReply::error(ProtocolError::ControlVersion { theirs: CONTROL_VERSION, ours: theirs }.to_string()),
        },
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
                ControlReply::error("busy")
            })
            .unwrap();
        });
        let err = request(&path, &ControlRequest::Stop { force: false }, Duration::from_secs(2)).unwrap_err();
        assert!(matches!(err, ProtocolError::Refused(ref m) if m == "busy"), "{err:?}");
        server.join().unwrap();
    }

    /// The program was replaced under a running supervisor: either side of an old/new pair says so.
    #[test]
    fn a_version_mismatch_is_a_clear_error_both_ways() {
        use std::io::{BufRead, Write};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // An old supervisor: answers without a version.
        let old_server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(stream.try_clone().unwrap()).read_line(&mut line).unwrap();
            stream.write_all(b"{\"ok\":true,\"status\":{\"state\":\"what\"}}\n").unwrap();
            listener
        });
        let err = request(&path, &ControlRequest::Status, Duration::from_secs(2)).unwrap_err();
        assert!(matches!(err, ProtocolError::ControlVersion { theirs: 0, ours: CONTROL_VERSION }), "{err:?}");
        assert!(err.to_string().contains("replaced"), "{err}");
        // An old client (no version) talking to this supervisor gets an error that names both versions.
        let listener = old_server.join().unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            serve_one(stream, |_| panic!("an unversioned request must not be handled")).unwrap();
        });
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"{\"op\":\"stop\",\"force\":true}\n").unwrap();
        let mut reply = String::new();
        BufReader::new(client).read_line(&mut reply).unwrap();
        server.join().unwrap();
        let reply: ControlReply = serde_json::from_str(&reply).unwrap();
        assert!(!reply.ok && reply.error.as_deref().unwrap_or_default().contains("protocol 1"), "{reply:?}");
    }
}
