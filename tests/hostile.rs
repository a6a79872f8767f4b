//! The guest is hostile: guest root (and the unprivileged `builder`) try to reach the host, and every attempt
//! must be refused or harmless. The test guest's probe (`testing/guest/files/usr/bin/dvn-hostile-probe`) does
//! the trying; root logs in through the test guest's own hook (`dvn_test_root_ssh=1` on the kernel command
//! line, passed through `--system`'s kernel-params), which the product's guest does not have.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

use common::{Instance, root_hook_system, snapshot, ssh_as, try_ssh_as};

/// The probe's verdicts: name -> (got its way, detail).
fn probe(vm: &Instance, user: &str, args: &str) -> BTreeMap<String, (bool, String)> {
    let out = ssh_as(vm, user, &format!("/usr/bin/dvn-hostile-probe {args}"));
    out.lines()
        .filter_map(|l| l.strip_prefix("PROBE "))
        .map(|l| {
            let mut parts = l.splitn(3, ' ');
            let name = parts.next().unwrap_or_default().to_string();
            let done = parts.next() == Some("done");
            (name, (done, parts.next().unwrap_or_default().to_string()))
        })
        .collect()
}

fn assert_all_refused(verdicts: &BTreeMap<String, (bool, String)>, names: &[&str], who: &str) {
    assert!(!verdicts.is_empty(), "{who}: the probe reported nothing");
    for name in names {
        let (done, detail) = verdicts.get(*name).unwrap_or_else(|| panic!("{who}: no verdict for {name}: {verdicts:?}"));
        assert!(!done, "{who}: {name} succeeded: {detail}");
    }
}

/// A tiny HTTP server that answers `tag`, counting connections.
fn serve(listener: TcpListener, tag: &'static str) -> Arc<AtomicUsize> {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf);
            let _ = write!(stream, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{tag}", tag.len());
        }
    });
    hits
}

/// This machine's address on its default route, if it has one (no packet is sent).
fn host_outbound_ipv4() -> Option<Ipv4Addr> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").or_else(|_| socket.connect("10.0.0.1:9")).ok()?;
    match socket.local_addr().ok()?.ip() {
        std::net::IpAddr::V4(ip) if !ip.is_loopback() && !ip.is_unspecified() => Some(ip),
        _ => None,
    }
}

fn dir_listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn a_hostile_guest_cannot_write_the_shares_plant_links_or_reach_host_loopback() {
    let mut vm = Instance::new();
    // Something in the host store share, to see that it stays as it was.
    fs::write(vm.host_store.path().join("hello"), "host").unwrap();
    let system = root_hook_system(&vm);
    vm.start_ready(&["--system", system.to_str().unwrap()]);
    let store_before = snapshot(vm.host_store.path());
    let config_before = snapshot(&vm.state().join("guest-config"));
    let victim = vm.dir.path().join("victim");
    fs::write(&victim, "precious").unwrap();

    // Root is root (the hook works), builder is not.
    assert_eq!(ssh_as(&vm, "root", "id -u").trim(), "0");
    assert_eq!(ssh_as(&vm, "builder", "id -u").trim(), "1000");

    // 1. The store share: guest root remounts read-write, mounts afresh read-write, writes.
    for user in ["root", "builder"] {
        let verdicts = probe(&vm, user, "store");
        assert_all_refused(&verdicts, &["store-write-fresh", "store-mkdir"], user);
        if let Some((done, detail)) = verdicts.get("store-write") {
            assert!(!done, "{user}: wrote through the remounted store share: {detail}");
        }
    }
    assert_eq!(snapshot(vm.host_store.path()), store_before, "the guest changed the host's store");

    // 2. The config share: root mounts it read-write and plants links at the names the host writes.
    let target = victim.display().to_string();
    for user in ["root", "builder"] {
        let verdicts = probe(&vm, user, &format!("config {target}"));
        let names: Vec<&str> =
            verdicts.keys().filter(|k| k.starts_with("config-") && *k != "config-mount-rw").map(String::as_str).collect();
        assert!(names.len() >= 7, "{user}: {verdicts:?}");
        assert_all_refused(&verdicts, &names, user);
    }
    assert_eq!(snapshot(&vm.state().join("guest-config")), config_before, "the guest changed the config share");
    assert_eq!(
        dir_listing(&vm.state().join("guest-config")),
        ["authorized_keys", "settings.json", "ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]
    );

    // 3. The host's loopback: a server on host 127.0.0.1 must be out of reach from any guest address; the
    // outside is still routed (a server on this machine's own non-loopback address is reached).
    let loopback = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = loopback.local_addr().unwrap().port();
    let loopback_hits = serve(loopback, "HOST-LOOPBACK");
    let outside = host_outbound_ipv4().and_then(|ip| TcpListener::bind((ip, port)).ok().map(|l| (ip, l)));
    let mut addresses = vec!["10.0.2.2".to_string(), "10.0.2.3".into(), "127.0.0.1".into(), "10.0.2.15".into()];
    let outside_hits = outside.map(|(ip, listener)| {
        addresses.push(ip.to_string());
        (ip, serve(listener, "OUTSIDE"))
    });
    for user in ["builder", "root"] {
        let verdicts = probe(&vm, user, &format!("net {port} {}", addresses.join(" ")));
        for (name, (_, detail)) in &verdicts {
            assert!(!detail.contains("HOST-LOOPBACK"), "{user}: {name} reached the host's loopback: {detail}");
        }
        if let Some((ip, _)) = &outside_hits {
            // Shown only as a note: passt 2023-03 (Debian 12) does not connect the guest to this machine's
            // own address, which is the only non-loopback destination a test here can serve.
            let (done, detail) = &verdicts[&format!("net-{ip}")];
            eprintln!("NOTE: {user} -> {ip} (this machine's own address): {}", if *done { detail.as_str() } else { "not reached" });
        }
        let route = probe(&vm, user, "route");
        assert!(route["route-default"].0, "{user}: no default route: {route:?}");
    }
    assert_eq!(loopback_hits.load(Ordering::SeqCst), 0, "a guest connection reached the server on host 127.0.0.1");
    if let Some((ip, hits)) = &outside_hits {
        eprintln!("NOTE: the server on {ip} saw {} guest connection(s)", hits.load(Ordering::SeqCst));
    }
    // The outside is routed: where this machine can resolve a name through a non-loopback resolver, the guest
    // resolves it too, through that resolver named explicitly and through what DHCP gave it.
    let resolver = fs::read_to_string("/etc/resolv.conf").ok().and_then(|text| {
        text.lines()
            .filter_map(|l| l.strip_prefix("nameserver"))
            .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
            .find(|ip| !ip.is_loopback())
    });
    let name = "deb.debian.org";
    let host_resolves = std::net::ToSocketAddrs::to_socket_addrs(&(name, 80)).is_ok_and(|mut a| a.next().is_some());
    match resolver.filter(|_| host_resolves) {
        Some(resolver) => {
            let verdicts = probe(&vm, "builder", &format!("dns {name} {resolver} default"));
            for server in [resolver.to_string(), "default".into()] {
                let (done, detail) = &verdicts[&format!("dns-{server}")];
                assert!(*done, "the guest cannot resolve {name} through {server}: {detail}");
            }
        }
        None => eprintln!("NOTE: this machine resolves no names through a non-loopback resolver: outside routing not shown"),
    }

    // 4. The agent's port: builder cannot bind it; root can (after killing the real agent).
    let builder = probe(&vm, "builder", "vsock-bind");
    let (done, detail) = &builder["vsock-bind-1023"];
    assert!(!*done && detail.contains("EACCES"), "builder bound the agent's port or failed otherwise: {detail}");
    // Killing the agent also ends its ssh forwarder (this session): run detached, read the verdict later.
    ssh_as(&vm, "root", "setsid /usr/bin/dvn-hostile-probe vsock-bind kill-agent >/tmp/vsock-bind.out 2>&1 </dev/null &");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let root = loop {
        thread::sleep(std::time::Duration::from_secs(2));
        // While the real agent is down, so is ssh (it forwards vsock port 22).
        let (_, out, _) = try_ssh_as(&vm, "root", "cat /tmp/vsock-bind.out 2>/dev/null");
        if out.contains("PROBE vsock-bind-1023") || std::time::Instant::now() > deadline {
            break out;
        }
    };
    assert!(root.contains("PROBE vsock-bind-1023 done"), "guest root could not bind the agent's port: {root}");

    // Nothing planted survives a restart, and the host never wrote through a link.
    assert_eq!(vm.stop(&[]), 0);
    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
    assert!(dvn::guest_config::holds_only_our_files(&vm.state().join("guest-config")));
}

/// No control character (ANSI escape, newline, bell) anywhere in a JSON value's strings.
fn assert_no_control_chars(value: &serde_json::Value, path: &str) {
    match value {
        serde_json::Value::String(s) => assert!(!s.chars().any(char::is_control), "{path} carries control characters: {s:?}"),
        serde_json::Value::Array(items) => items.iter().enumerate().for_each(|(i, v)| assert_no_control_chars(v, &format!("{path}[{i}]"))),
        serde_json::Value::Object(map) => map.iter().for_each(|(k, v)| assert_no_control_chars(v, &format!("{path}.{k}"))),
        _ => {}
    }
}

#[test]
fn a_fake_agent_with_hostile_replies_leaves_status_sane_and_stop_bounded() {
    let mut vm = Instance::new();
    let system = root_hook_system(&vm);
    vm.start_ready(&["--system", system.to_str().unwrap()]);
    // Guest root replaces the agent: hostile answers at once, trickling ones after 20 s. This also ends the
    // agent's ssh forwarder, so from here on the host only has the agent's port.
    let (_, has_fake, _) = try_ssh_as(&vm, "root", "command -v dvn-fake-agent");
    assert!(has_fake.contains("dvn-fake-agent"), "the test guest has no dvn-fake-agent (DVN_AGENT without cargo?)");
    ssh_as(
        &vm,
        "root",
        "setsid sh -c 'kill $(pidof dvn-agent); usleep 100000; exec dvn-fake-agent --trickle-after 20' \
         >/tmp/fake-agent.log 2>&1 </dev/null &",
    );
    let guest_ip_file = vm.state().join("guest-ip");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        let asked = std::time::Instant::now();
        let status = vm.status();
        assert!(asked.elapsed() < std::time::Duration::from_secs(6), "status took {:?}", asked.elapsed());
        assert_no_control_chars(&status, "status");
        if let Some(ip) = status["guestIp"].as_str() {
            assert!(ip.parse::<std::net::IpAddr>().is_ok(), "guestIp is not an IP: {ip:?}");
        }
        let builds = status["buildsInFlight"].as_u64().unwrap_or(0);
        assert!(builds < 1 << 20, "buildsInFlight taken as is: {builds}");
        if let Ok(text) = fs::read_to_string(&guest_ip_file) {
            assert!(text.trim().parse::<std::net::IpAddr>().is_ok(), "guest-ip holds {text:?}");
        }
        thread::sleep(std::time::Duration::from_secs(1));
    }
    // The fake says "ok" to poweroff and does nothing, slowly: stop must still end in bounded time.
    let asked = std::time::Instant::now();
    let out = vm.run(&["stop", "--timeout", "10"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    vm.wait_supervisor_exit(std::time::Duration::from_secs(30));
    assert!(asked.elapsed() < std::time::Duration::from_secs(45), "stop took {:?}", asked.elapsed());
}
