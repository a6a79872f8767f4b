//! The guest agent: one protocol, used by the host client and by the agent inside the guest.

pub mod client;
#[cfg(target_os = "linux")]
pub mod guest;
pub mod protocol;
