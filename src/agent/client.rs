//! Host side of the agent protocol: one short connection per request, bounded by a timeout.

use std::io::BufReader;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::protocol::{self, GuestStatus, Hello, ProtocolError, Request, TimeSet};
use crate::engine::{EngineError, Machine};
use crate::spec::VSOCK_PORT_AGENT;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the guest agent is not reachable: {0}")]
    Unreachable(#[from] EngineError),
    #[error("the guest agent: {0}")]
    Protocol(#[from] ProtocolError),
}

impl AgentError {
    /// The vsock device itself stopped answering (as opposed to the agent not listening yet).
    pub fn is_device_unresponsive(&self) -> bool {
        matches!(self, AgentError::Unreachable(EngineError::Unresponsive { .. }))
    }

    /// What stopped answering, for messages.
    pub fn unresponsive_part(&self) -> String {
        match self {
            AgentError::Unreachable(EngineError::Unresponsive { what, .. }) => what.to_string(),
            other => other.to_string(),
        }
    }
}

pub fn call<T: DeserializeOwned>(machine: &dyn Machine, request: &Request, timeout: Duration) -> Result<T, AgentError> {
    let stream = machine.connect(VSOCK_PORT_AGENT)?;
    stream.set_read_timeout(Some(timeout)).map_err(ProtocolError::Io)?;
    stream.set_write_timeout(Some(timeout)).map_err(ProtocolError::Io)?;
    let mut writer = stream.try_clone().map_err(ProtocolError::Io)?;
    protocol::write_message(&mut writer, &protocol::encode_request(request))?;
    let line = protocol::read_line(&mut BufReader::new(stream))?;
    Ok(protocol::decode_response(&line)?)
}

pub fn hello(machine: &dyn Machine) -> Result<Hello, AgentError> {
    call(machine, &Request::Hello, Duration::from_secs(2))
}

pub fn status(machine: &dyn Machine) -> Result<GuestStatus, AgentError> {
    call(machine, &Request::Status, Duration::from_secs(5))
}

pub fn set_time(machine: &dyn Machine, unix_ms: i64) -> Result<TimeSet, AgentError> {
    call(machine, &Request::SetTime { unix_ms }, Duration::from_secs(5))
}

pub fn poweroff(machine: &dyn Machine) -> Result<(), AgentError> {
    call::<serde_json::Value>(machine, &Request::Poweroff, Duration::from_secs(5)).map(|_| ())
}
