//! QEMU engine (placeholder until implemented).
use super::EngineError;
pub struct QemuEngine;
impl QemuEngine {
    pub fn detect() -> Result<Self, EngineError> { Err(EngineError::Boot("not implemented".into())) }
}
impl super::Engine for QemuEngine {
    fn kind(&self) -> super::EngineKind { super::EngineKind::Qemu }
    fn boot(&self, _spec: &crate::spec::VmSpec, _console: Box<dyn std::io::Write + Send>) -> Result<Box<dyn super::Machine>, EngineError> {
        Err(EngineError::Boot("not implemented".into()))
    }
}
