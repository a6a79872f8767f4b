//! darwin-vz-nix: a native NixOS Linux builder VM.
//!
//! Layout: `cli` parses, `spec` is plain data, `engine` turns a spec into a running VM, `supervisor` owns the
//! lifecycle, `agent` is the host/guest protocol, `instance` is one state directory, `ssh` the keys and argv.

pub mod agent;
pub mod cli;
pub mod control;
pub mod doctor;
pub mod engine;
pub mod guest_config;
pub mod instance;
pub mod launch;
pub mod listener;
pub mod logfile;
pub mod progress;
pub mod relay;
pub mod spec;
pub mod ssh;
pub mod store_filter;
pub mod supervisor;
pub mod units;
