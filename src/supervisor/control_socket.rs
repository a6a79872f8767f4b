//! The control socket's server: `status` is answered from the published view (so it answers even while the
//! loop waits on the engine); `stop` and the clock hook go to the loop as events, each with its own reply
//! sender.

use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::Shared;
use super::phase::Event;
use crate::control::{self, ControlReply, ControlRequest, DiskBytes, StatusReport, VmState};
use crate::instance::{EffectiveConfig, Layout, disk};

/// How long a control request waits for the loop to take it.
const LOOP_REPLY_TIMEOUT: Duration = Duration::from_secs(4);
const SHIFT_CLOCK_TIMEOUT: Duration = Duration::from_secs(12);

#[derive(Clone)]
pub(crate) struct StatusBase {
    pub layout: Layout,
    pub config: EffectiveConfig,
    pub port: u16,
}

pub(crate) fn spawn(listener: UnixListener, shared: Arc<Shared>, base: StatusBase) -> std::io::Result<()> {
    thread::Builder::new().name("control".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            let (shared, base) = (shared.clone(), base.clone());
            let spawned = thread::Builder::new().name("control-conn".into()).spawn(move || {
                let _ = control::serve_one(stream, |request| handle(&shared, &base, request));
            });
            if let Err(e) = spawned {
                tracing::warn!("control socket: cannot start a thread ({e}); request dropped");
            }
        }
    })?;
    Ok(())
}

fn handle(shared: &Shared, base: &StatusBase, request: ControlRequest) -> ControlReply {
    match request {
        ControlRequest::Status => ControlReply::status(status(shared, base)),
        ControlRequest::Stop { force } => {
            let (reply, answer) = mpsc::channel();
            shared.post(Event::Stop { force, reply });
            // The event is queued either way; a loop busy with the engine answers a little later.
            answer.recv_timeout(LOOP_REPLY_TIMEOUT).unwrap_or_else(|_| ControlReply::ok())
        }
        ControlRequest::ShiftGuestClock { seconds } => {
            let (reply, answer) = mpsc::channel();
            shared.post(Event::ShiftClock { seconds, reply });
            answer.recv_timeout(SHIFT_CLOCK_TIMEOUT).unwrap_or_else(|_| ControlReply::error("no answer from the supervisor"))
        }
    }
}

pub(crate) fn status(shared: &Shared, base: &StatusBase) -> StatusReport {
    let mut report = {
        let view = shared.view();
        let now = Instant::now();
        let idle = if view.state == VmState::Running { view.activity.idle_for(now).map(|d| d.as_secs_f64()) } else { None };
        StatusReport {
            running: true,
            pid: Some(std::process::id()),
            state_directory: base.layout.root.display().to_string(),
            state: view.state,
            engine: Some(base.config.engine.as_str().to_string()),
            uptime_seconds: view.vm_started.map(|t| t.elapsed().as_secs_f64()),
            ssh_port: Some(base.port),
            guest_ip: view.guest_ip.clone(),
            connections: view.activity.connections,
            builds_in_flight: view.activity.builds_in_flight,
            idle_seconds: idle,
            idle_timeout_seconds: base.config.idle_timeout_seconds,
            clock_offset_ms: view.clock_offset_ms,
            disk_bytes: None,
            guest_disk_free_bytes: view.guest_disk_free,
            boot_count: view.boot_count,
            last_boot_seconds: view.last_boot_seconds,
            last_error: view.last_error.clone(),
            bytes_to_guest: shared.bytes.a_to_b.load(Ordering::Relaxed),
            bytes_from_guest: shared.bytes.b_to_a.load(Ordering::Relaxed),
        }
    };
    // File I/O after the lock is released.
    report.disk_bytes = disk::usage(&base.layout).map(|(allocated, size)| DiskBytes { allocated, size });
    report
}
