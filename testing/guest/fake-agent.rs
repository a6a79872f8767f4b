//! dvn-fake-agent: a hostile stand-in for the guest agent, for tests/hostile.rs only (the test guest ships it;
//! the product never does). Guest root kills the real agent and runs this on its port: every answer is what a
//! hostile guest could send: huge numbers, ANSI escapes and newlines in text, a 2049-byte multi-line "IP", and
//! after `--trickle-after` seconds answers that trickle out one byte every half second.

#[cfg(target_os = "linux")]
fn main() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::time::{Duration, Instant};

    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| args.windows(2).find(|w| w[0] == flag).map(|w| w[1].clone());
    let port: u32 = value("--port").and_then(|p| p.parse().ok()).unwrap_or(1023);
    let trickle_after = Duration::from_secs(value("--trickle-after").and_then(|p| p.parse().ok()).unwrap_or(u64::MAX / 4));
    let listener = dvn::agent::guest::vsock_listen(port).expect("binding the agent's port");
    eprintln!("dvn-fake-agent: listening on vsock port {port}");
    let started = Instant::now();
    let evil = "\u{1b}[2J\u{1b}[31mPWNED\r\n\u{7}\u{1b}]0;title\u{7}";
    let long_ip = format!("10.0.2.15\n{}", "9".repeat(2039));
    loop {
        let Ok(raw) = nix::sys::socket::accept(listener.as_raw_fd()) else { continue };
        // SAFETY: accept returned a new descriptor that nothing else owns.
        let stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(raw) };
        let (evil, long_ip) = (evil.to_string(), long_ip.clone());
        std::thread::spawn(move || {
            let mut writer = stream.try_clone().expect("clone");
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { return };
                let op = serde_json::from_str::<serde_json::Value>(&line).ok().and_then(|v| v["op"].as_str().map(String::from));
                let mut reply = serde_json::json!({"v": 1, "ok": true});
                let body = match op.as_deref() {
                    Some("hello") => serde_json::json!({"agentVersion": evil, "hostname": evil}),
                    Some("status") => serde_json::json!({
                        "uptimeSeconds": 1e300, "guestIp": long_ip, "diskFreeBytes": u64::MAX,
                        "diskTotalBytes": 1, "buildsInFlight": u32::MAX, "unixMs": i64::MAX,
                    }),
                    Some("set-time") => serde_json::json!({"offsetMs": i64::MIN}),
                    _ => serde_json::json!({}), // poweroff: "ok", and nothing happens
                };
                reply.as_object_mut().unwrap().extend(body.as_object().unwrap().clone());
                let mut bytes = serde_json::to_vec(&reply).unwrap();
                bytes.push(b'\n');
                if started.elapsed() >= trickle_after {
                    for b in bytes {
                        if writer.write_all(&[b]).is_err() {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(500));
                    }
                } else if writer.write_all(&bytes).is_err() {
                    return;
                }
            }
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("dvn-fake-agent runs inside the Linux test guest only");
}
