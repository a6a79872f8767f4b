//! Host side of the agent protocol: one short connection per request.
//!
//! The guest is hostile (root in it runs build code), so every call has one deadline for the whole exchange
//! (not per read: a peer trickling a byte at a time cannot hold a caller), the reply is read into a small
//! bounded buffer, and every reply is validated before the host uses it.

use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use super::protocol::{self, GuestStatus, Hello, MAX_TEXT_CHARS, ProtocolError, Request, TimeSet};
use crate::engine::{EngineError, Machine};
use crate::spec::VSOCK_PORT_AGENT;

/// Longest reply line the host reads from the agent; real replies are a few hundred bytes.
pub const MAX_REPLY_BYTES: usize = 4096;
/// More builds than this at once is not a real guest.
pub const MAX_BUILDS: u32 = 4096;
/// Larger disks than this (1 PiB) are not a real guest's.
pub const MAX_DISK_BYTES: u64 = 1 << 50;

pub const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the guest agent is not reachable")]
    Unreachable(#[source] EngineError),
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the guest agent")]
    Protocol(#[source] ProtocolError),
    #[error("the guest agent sent an invalid reply: {0}")]
    Invalid(String),
}

impl From<ProtocolError> for AgentError {
    fn from(e: ProtocolError) -> Self {
        AgentError::Protocol(e)
    }
}

/// Connects to the agent and runs one request; the deadline starts before the connection.
pub fn call<T: DeserializeOwned>(machine: &dyn Machine, request: &Request, timeout: Duration) -> Result<T, AgentError> {
    let deadline = Instant::now() + timeout;
    let stream = machine.connect(VSOCK_PORT_AGENT).map_err(AgentError::Unreachable)?;
    call_on(stream, request, deadline, timeout)
}

/// One request on an open stream, all of it (write, read, parse) done by `deadline`.
pub fn call_on<T: DeserializeOwned>(stream: UnixStream, request: &Request, deadline: Instant, budget: Duration) -> Result<T, AgentError> {
    let mut stream = DeadlineStream { stream, deadline, budget };
    let mut line = serde_json::to_vec(&protocol::encode_request(request)).map_err(ProtocolError::from)?;
    line.push(b'\n');
    stream.write_all(&line).map_err(|e| stream.error(e))?;
    let reply = stream.read_line().map_err(|e| stream.error(e))?;
    let reply = String::from_utf8(reply).map_err(|_| AgentError::Invalid("the reply is not UTF-8".into()))?;
    Ok(protocol::decode_response(&reply)?)
}

/// A stream whose every read and write gets only what is left of one deadline.
struct DeadlineStream {
    stream: UnixStream,
    deadline: Instant,
    budget: Duration,
}

impl DeadlineStream {
    fn remaining(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() { Err(io::ErrorKind::TimedOut.into()) } else { Ok(left) }
    }

    fn error(&self, e: io::Error) -> AgentError {
        match e.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => AgentError::Timeout(self.budget),
            io::ErrorKind::InvalidData => AgentError::Protocol(ProtocolError::LineTooLong),
            io::ErrorKind::UnexpectedEof => AgentError::Protocol(ProtocolError::Closed),
            _ => AgentError::Protocol(ProtocolError::Io(e)),
        }
    }

    fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            self.stream.set_write_timeout(Some(self.remaining()?))?;
            match self.stream.write(buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads up to the first newline; more than MAX_REPLY_BYTES without one is an error.
    fn read_line(&mut self) -> io::Result<Vec<u8>> {
        let mut line = Vec::new();
        let mut buf = [0u8; 512];
        loop {
            self.stream.set_read_timeout(Some(self.remaining()?))?;
            let n = match self.stream.read(&mut buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if let Some(end) = buf[..n].iter().position(|&b| b == b'\n') {
                line.extend_from_slice(&buf[..end]);
                return if line.len() > MAX_REPLY_BYTES { Err(io::ErrorKind::InvalidData.into()) } else { Ok(line) };
            }
            line.extend_from_slice(&buf[..n]);
            if line.len() > MAX_REPLY_BYTES {
                return Err(io::ErrorKind::InvalidData.into());
            }
        }
    }
}

pub fn hello(machine: &dyn Machine) -> Result<Hello, AgentError> {
    let hello: Hello = call(machine, &Request::Hello, HELLO_TIMEOUT)?;
    Ok(Hello { agent_version: protocol::clean_text(&hello.agent_version, 64), hostname: protocol::clean_text(&hello.hostname, 64) })
}

pub fn status(machine: &dyn Machine) -> Result<GuestStatus, AgentError> {
    validate_status(call(machine, &Request::Status, CALL_TIMEOUT)?)
}

pub fn set_time(machine: &dyn Machine, unix_ms: i64) -> Result<TimeSet, AgentError> {
    call(machine, &Request::SetTime { unix_ms }, CALL_TIMEOUT)
}

pub fn poweroff(machine: &dyn Machine) -> Result<(), AgentError> {
    call::<serde_json::Value>(machine, &Request::Poweroff, CALL_TIMEOUT).map(|_| ())
}

/// Refuses a status no real guest sends: the host acts on these numbers (idle stop, `guest-ip`, status).
pub fn validate_status(status: GuestStatus) -> Result<GuestStatus, AgentError> {
    let invalid = |what: String| Err(AgentError::Invalid(protocol::clean_text(&what, MAX_TEXT_CHARS)));
    if status.builds_in_flight > MAX_BUILDS {
        return invalid(format!("{} builds in flight", status.builds_in_flight));
    }
    if status.disk_total_bytes > MAX_DISK_BYTES || status.disk_free_bytes > status.disk_total_bytes {
        return invalid(format!("{} bytes free of {}", status.disk_free_bytes, status.disk_total_bytes));
    }
    if !status.uptime_seconds.is_finite() || status.uptime_seconds < 0.0 {
        return invalid(format!("uptime {}", status.uptime_seconds));
    }
    if let Some(ip) = &status.guest_ip
        && ip.parse::<IpAddr>().is_err()
    {
        return invalid(format!("guest IP {:?}", ip.chars().take(64).collect::<String>()));
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::protocol::{Reply, ok_response};
    use std::io::BufRead;
    use std::thread;

    /// A fake agent on the other end of a socketpair: reads one request line, then runs `answer`.
    fn peer(answer: impl FnOnce(&mut UnixStream) + Send + 'static) -> UnixStream {
        let (host, mut guest) = UnixStream::pair().unwrap();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = io::BufReader::new(guest.try_clone().unwrap()).read_line(&mut line);
            answer(&mut guest);
        });
        host
    }

    fn reply_with(value: serde_json::Value) -> UnixStream {
        peer(move |s| {
            let mut line = serde_json::to_vec(&value).unwrap();
            line.push(b'\n');
            let _ = s.write_all(&line);
        })
    }

    fn status_value(edit: impl FnOnce(&mut GuestStatus)) -> serde_json::Value {
        let mut status = GuestStatus {
            uptime_seconds: 1.0,
            guest_ip: Some("10.0.2.15".into()),
            disk_free_bytes: 1 << 30,
            disk_total_bytes: 2 << 30,
            builds_in_flight: 1,
            unix_ms: 1,
        };
        edit(&mut status);
        serde_json::to_value(ok_response(&Reply::Status(status))).unwrap()
    }

    fn ask_status(stream: UnixStream, timeout: Duration) -> Result<GuestStatus, AgentError> {
        call_on(stream, &Request::Status, Instant::now() + timeout, timeout).and_then(validate_status)
    }

    #[test]
    fn a_sane_status_is_accepted() {
        let status = ask_status(reply_with(status_value(|_| {})), CALL_TIMEOUT).unwrap();
        assert_eq!(status.builds_in_flight, 1);
    }

    #[test]
    fn hostile_values_are_refused() {
        type Edit = Box<dyn FnOnce(&mut GuestStatus)>;
        let cases: [(&str, Edit); 5] = [
            ("builds", Box::new(|s| s.builds_in_flight = u32::MAX)),
            ("16 EiB free", Box::new(|s| s.disk_free_bytes = u64::MAX)),
            ("free above total", Box::new(|s| s.disk_free_bytes = s.disk_total_bytes + 1)),
            ("a multi-line IP", Box::new(|s| s.guest_ip = Some(format!("10.0.2.15\n{}\nx", "y".repeat(2040))))),
            ("an escape in the IP", Box::new(|s| s.guest_ip = Some("\u{1b}[2J".into()))),
        ];
        for (what, edit) in cases {
            let err = ask_status(reply_with(status_value(edit)), CALL_TIMEOUT).unwrap_err();
            assert!(matches!(err, AgentError::Invalid(_)), "{what}: {err:?}");
            assert!(!err.to_string().contains('\n') && !err.to_string().contains('\u{1b}'), "{what}: {err}");
        }
    }

    #[test]
    fn a_trickling_peer_fails_by_the_call_deadline_not_per_read() {
        let stream = peer(|s| {
            for byte in b"{\"v\":1,\"ok\":true" {
                if s.write_all(&[*byte]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(40));
            }
        });
        let started = Instant::now();
        let err = ask_status(stream, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, AgentError::Timeout(_)), "{err:?}");
        assert!(started.elapsed() < Duration::from_millis(600), "took {:?}", started.elapsed());
    }

    #[test]
    fn an_oversized_line_is_refused_without_reading_it_all() {
        let stream = peer(|s| {
            let _ = s.write_all(&vec![b'x'; 1 << 20]);
        });
        let err = ask_status(stream, CALL_TIMEOUT).unwrap_err();
        assert!(matches!(err, AgentError::Protocol(ProtocolError::LineTooLong)), "{err:?}");
    }

    #[test]
    fn no_reply_to_poweroff_ends_at_the_deadline() {
        let stream = peer(|s| {
            thread::sleep(Duration::from_secs(2));
            let _ = s.write_all(b"");
        });
        let started = Instant::now();
        let timeout = Duration::from_millis(200);
        let err = call_on::<serde_json::Value>(stream, &Request::Poweroff, Instant::now() + timeout, timeout).unwrap_err();
        assert!(matches!(err, AgentError::Timeout(_)), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_peer_that_hangs_up_is_closed_not_a_timeout() {
        let err = ask_status(peer(|_| {}), CALL_TIMEOUT).unwrap_err();
        assert!(matches!(err, AgentError::Protocol(ProtocolError::Closed)), "{err:?}");
    }
}
