//! Virtualization.framework engine (placeholder; macOS parts to come).
#[cfg(target_os = "macos")]
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
