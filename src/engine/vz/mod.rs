//! Virtualization.framework engine (macOS on Apple silicon).
//!
//! `rules`, `machine_id`, `plumbing`: plain logic, compiled and unit-tested everywhere.
//! The macOS layer (placeholder in this commit) only translates a VmSpec into framework calls.

pub mod machine_id;
pub mod plumbing;
pub mod rules;

#[cfg(target_os = "macos")]
#[derive(Default)]
pub struct VzEngine;
#[cfg(target_os = "macos")]
impl VzEngine {
    pub fn new() -> Self { VzEngine }
}
#[cfg(target_os = "macos")]
impl super::Engine for VzEngine {
    fn kind(&self) -> super::EngineKind { super::EngineKind::Vz }
    fn boot(&self, _spec: &crate::spec::VmSpec, _console: Box<dyn std::io::Write + Send>) -> Result<Box<dyn super::Machine>, super::EngineError> {
        Err(super::EngineError::Boot("not implemented".into()))
    }
}
