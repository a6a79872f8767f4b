//! Virtualization.framework engine (macOS on Apple silicon).
//!
//! Layout:
//! - `rules`, `machine_id`, `plumbing`: plain logic (validation, command line, Rosetta decisions, identifier
//!   persistence, stop state, console copier, descriptor handling). Compiled and unit-tested everywhere.
//! - `config`, `delegate`, `machine` (macOS only): the Objective-C calls. They translate a [`VmSpec`] into a
//!   `VZVirtualMachineConfiguration` and drive the `VZVirtualMachine` on one private serial dispatch queue;
//!   nothing else.
//!
//! [`VmSpec`]: crate::spec::VmSpec

pub mod machine_id;
pub mod plumbing;
pub mod rules;

#[cfg(target_os = "macos")]
mod config;
#[cfg(target_os = "macos")]
mod delegate;
#[cfg(target_os = "macos")]
mod machine;

#[cfg(target_os = "macos")]
pub use machine::{MacRosettaProbe, VzEngine, install_rosetta, resource_limits};
