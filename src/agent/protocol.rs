//! Host <-> guest agent protocol, spoken on guest vsock port `spec::VSOCK_PORT_AGENT`.
//!
//! Newline-delimited JSON. Every message carries `"v"`, the protocol version. The host sends one request per
//! line and reads one response line per request, e.g.
//!
//! ```text
//! -> {"v":1,"op":"status"}
//! <- {"v":1,"ok":true,"uptimeSeconds":12.5,"guestIp":"10.0.2.15","diskFreeBytes":1000,...}
//! -> {"v":1,"op":"set-time","unixMs":1764079200000}
//! <- {"v":1,"ok":true,"offsetMs":-3600000}
//! ```
//!
//! A peer that receives a higher version than it knows answers with `ok: false` and its own version.

use std::io::{self, BufRead, Write};

use serde::{Deserialize, Serialize};

pub const PROTOCOL_VERSION: u32 = 1;
/// Longest line either side accepts; a longer one is a protocol error, not an allocation.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", rename_all_fields = "camelCase")]
pub enum Request {
    /// Readiness probe; answered as soon as the agent runs.
    Hello,
    Status,
    /// Set the guest's wall clock; the answer carries the offset the guest had (guest - host).
    SetTime {
        unix_ms: i64,
    },
    /// Clean shutdown of the guest (sync, stop services, power off).
    Poweroff,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    pub agent_version: String,
    pub hostname: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestStatus {
    pub uptime_seconds: f64,
    pub guest_ip: Option<String>,
    pub disk_free_bytes: u64,
    pub disk_total_bytes: u64,
    /// Nix builds running now: nix-daemon workers plus processes of build users.
    pub builds_in_flight: u32,
    /// The guest's wall clock when it answered.
    pub unix_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimeSet {
    pub offset_ms: i64,
}

/// The body of a successful response; which variant depends on the request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    Status(GuestStatus),
    TimeSet(TimeSet),
    Hello(Hello),
    Empty {},
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestEnvelope {
    pub v: u32,
    #[serde(flatten)]
    pub request: Request,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(flatten)]
    pub reply: Option<serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection closed by peer")]
    Closed,
    #[error("line longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong,
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("peer speaks protocol version {0}, this side speaks {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("agent refused the request: {0}")]
    Refused(String),
    #[error(
        "the running supervisor speaks control protocol {theirs}, this darwin-vz-nix speaks {ours} (the program was \
         replaced while the supervisor ran): stop it and start it again"
    )]
    ControlVersion { theirs: u32, ours: u32 },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads one line (without the newline). Bounded by MAX_LINE_BYTES.
pub fn read_line(reader: &mut impl BufRead) -> Result<String, ProtocolError> {
    let mut buf = Vec::new();
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return if buf.is_empty() { Err(ProtocolError::Closed) } else { Ok(String::from_utf8_lossy(&buf).into()) };
        }
        match available.iter().position(|&b| b == b'\n') {
            Some(i) => {
                buf.extend_from_slice(&available[..i]);
                reader.consume(i + 1);
                break;
            }
            None => {
                let n = available.len();
                buf.extend_from_slice(available);
                reader.consume(n);
            }
        }
        if buf.len() > MAX_LINE_BYTES {
            return Err(ProtocolError::LineTooLong);
        }
    }
    if buf.len() > MAX_LINE_BYTES {
        return Err(ProtocolError::LineTooLong);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Longest text from the other side that is kept (error messages, host names); the rest is cut.
pub const MAX_TEXT_CHARS: usize = 200;

/// Text from an untrusted peer, made safe to log and show: control characters (terminal escapes, newlines
/// that would forge log lines) become spaces, and it is cut to `max` characters.
pub fn clean_text(text: &str, max: usize) -> String {
    let mut out: String = text.chars().take(max).map(|c| if c.is_control() { ' ' } else { c }).collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

pub fn write_message(writer: &mut impl Write, message: &impl Serialize) -> Result<(), ProtocolError> {
    let mut line = serde_json::to_vec(message)?;
    line.push(b'\n');
    writer.write_all(&line)?;
    writer.flush()?;
    Ok(())
}

pub fn encode_request(request: &Request) -> RequestEnvelope {
    RequestEnvelope { v: PROTOCOL_VERSION, request: request.clone() }
}

/// Parses a request line on the guest side. A newer version is refused with a clear error.
pub fn decode_request(line: &str) -> Result<Request, ProtocolError> {
    let value: serde_json::Value = serde_json::from_str(line)?;
    let v = value.get("v").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
    if v != PROTOCOL_VERSION {
        return Err(ProtocolError::Version(v));
    }
    let envelope: RequestEnvelope = serde_json::from_value(value)?;
    Ok(envelope.request)
}

pub fn ok_response(reply: &Reply) -> ResponseEnvelope {
    let value = serde_json::to_value(reply).unwrap_or(serde_json::Value::Null);
    ResponseEnvelope { v: PROTOCOL_VERSION, ok: true, error: None, reply: Some(value) }
}

pub fn error_response(message: impl Into<String>) -> ResponseEnvelope {
    ResponseEnvelope { v: PROTOCOL_VERSION, ok: false, error: Some(message.into()), reply: None }
}

/// Parses a response line on the host side into the reply type the request expects.
pub fn decode_response<T: for<'de> Deserialize<'de>>(line: &str) -> Result<T, ProtocolError> {
    let value: serde_json::Value = serde_json::from_str(line)?;
    let v = value.get("v").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
    if v != PROTOCOL_VERSION {
        return Err(ProtocolError::Version(v));
    }
    if value.get("ok").and_then(|ok| ok.as_bool()) != Some(true) {
        let error = value.get("error").and_then(|e| e.as_str()).unwrap_or("no reason given");
        return Err(ProtocolError::Refused(clean_text(error, MAX_TEXT_CHARS)));
    }
    Ok(serde_json::from_value(value)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn requests_round_trip_with_version() {
        for request in [Request::Hello, Request::Status, Request::SetTime { unix_ms: 42 }, Request::Poweroff] {
            let line = serde_json::to_string(&encode_request(&request)).unwrap();
            assert!(line.contains("\"v\":1"), "{line}");
            assert_eq!(decode_request(&line).unwrap(), request);
        }
        assert_eq!(
            serde_json::to_string(&encode_request(&Request::SetTime { unix_ms: 7 })).unwrap(),
            r#"{"v":1,"op":"set-time","unixMs":7}"#
        );
    }

    #[test]
    fn newer_version_is_refused() {
        assert!(matches!(decode_request(r#"{"v":2,"op":"status"}"#), Err(ProtocolError::Version(2))));
        assert!(matches!(decode_request(r#"{"op":"status"}"#), Err(ProtocolError::Version(0))));
    }

    #[test]
    fn unknown_op_is_malformed() {
        assert!(matches!(decode_request(r#"{"v":1,"op":"format-disk"}"#), Err(ProtocolError::Malformed(_))));
    }

    #[test]
    fn status_response_round_trips() {
        let status = GuestStatus { uptime_seconds: 1.5, guest_ip: Some("10.0.2.15".into()), builds_in_flight: 2, ..Default::default() };
        let line = serde_json::to_string(&ok_response(&Reply::Status(status.clone()))).unwrap();
        assert!(line.contains("\"buildsInFlight\":2"), "{line}");
        assert_eq!(decode_response::<GuestStatus>(&line).unwrap(), status);
    }

    #[test]
    fn error_response_is_refused() {
        let line = serde_json::to_string(&error_response("no")).unwrap();
        match decode_response::<GuestStatus>(&line) {
            Err(ProtocolError::Refused(msg)) => assert_eq!(msg, "no"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refusals_from_the_peer_are_cleaned() {
        let line = serde_json::to_string(&error_response("\u{1b}[31mboom\nlast error: forged")).unwrap();
        match decode_response::<GuestStatus>(&line) {
            Err(ProtocolError::Refused(msg)) => assert_eq!(msg, " [31mboom last error: forged"),
            other => panic!("{other:?}"),
        }
        assert_eq!(clean_text(&"x".repeat(300), 4), "xxxx…");
    }

    #[test]
    fn line_reader_is_bounded_and_splits() {
        let mut input = Cursor::new(b"one\ntwo\n".to_vec());
        assert_eq!(read_line(&mut input).unwrap(), "one");
        assert_eq!(read_line(&mut input).unwrap(), "two");
        assert!(matches!(read_line(&mut input), Err(ProtocolError::Closed)));
        let mut long = Cursor::new(vec![b'x'; MAX_LINE_BYTES + 10]);
        assert!(matches!(read_line(&mut long), Err(ProtocolError::LineTooLong)));
    }
}
