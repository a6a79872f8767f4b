//! CLI behaviour that needs no VM: help, version, exit codes, and bad input leaving the state untouched.

mod common;

use std::fs;

use common::{Instance, snapshot};

#[test]
fn help_and_version() {
    let i = Instance::new();
    let help = i.run(&["--help"]);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for word in ["start", "ssh", "stop", "status", "destroy", "logs", "doctor", "Examples:", "Exit codes"] {
        assert!(text.contains(word), "help lacks {word}: {text}");
    }
    let version = i.run(&["--version"]);
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
    let start_help = String::from_utf8_lossy(&i.run(&["start", "--help"]).stdout).into_owned();
    for flag in [
        "--cores",
        "--memory",
        "--disk-size",
        "--kernel",
        "--initrd",
        "--system",
        "--idle-timeout",
        "--no-rosetta",
        "--no-share-nix-store",
        "--port",
        "--on-demand",
        "--verbose",
    ] {
        assert!(start_help.contains(flag), "start --help lacks {flag}");
    }
}

#[test]
fn status_of_a_missing_state_dir_is_stopped_and_creates_nothing() {
    let i = Instance::new();
    let state = i.state().join("never-made");
    let out = common::Instance::new().cmd(&["status", "--json"]).arg("--state-dir").arg(&state).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["running"], false);
    assert_eq!(json["state"], "stopped");
    assert!(json.get("pid").is_none());
    assert!(!state.exists(), "status must not create the state directory");
    let out = common::Instance::new().cmd(&["stop"]).arg("--state-dir").arg(&state).output().unwrap();
    assert!(out.status.success(), "stopping a stopped VM is not an error");
    assert!(!state.exists());
}

#[test]
fn bad_input_exits_2_and_changes_nothing() {
    let i = Instance::new();
    let dir = tempfile::tempdir().unwrap();
    let (kernel, initrd) = (dir.path().join("kernel"), dir.path().join("initrd"));
    fs::write(&kernel, "k").unwrap();
    fs::write(&initrd, "i").unwrap();
    // An existing instance with a 2G disk and keys, as after a first start.
    assert!(i.run(&["init"]).status.success());
    fs::File::create(i.state().join("disk.img")).unwrap().set_len(2 << 30).unwrap();
    let before = snapshot(i.state());
    let (k, r) = (kernel.to_str().unwrap(), initrd.to_str().unwrap());
    let log = i.state().join("daemon.log");
    // A port someone else listens on, on the proxy's own address.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap().port().to_string();
    let cases: Vec<Vec<&str>> = vec![
        vec!["start", "--kernel", k, "--initrd", r, "--cores", "0"],
        vec!["start", "--kernel", k, "--initrd", r, "--memory", "-1"],
        vec!["start", "--kernel", k, "--initrd", r, "--memory", "12"],
        vec!["start", "--kernel", k, "--initrd", r, "--disk-size", "100GB"],
        vec!["start", "--kernel", k, "--initrd", r, "--disk-size", "0"],
        vec!["start", "--kernel", k, "--initrd", r, "--disk-size", "-5G"],
        vec!["start", "--kernel", k, "--initrd", r, "--disk-size", "99999999999T"],
        vec!["start", "--kernel", k, "--initrd", r, "--disk-size", "1G"],
        vec!["start", "--kernel", k, "--initrd", r, "--idle-timeout", "soon"],
        vec!["start", "--kernel", k, "--initrd", r, "--port", "65536"],
        vec!["start", "--kernel", "/nonexistent/kernel", "--initrd", r],
        vec!["start", "--kernel", k, "--initrd", dir.path().to_str().unwrap()],
        vec!["start", "--kernel", k, "--initrd", r, "--system", "/nonexistent"],
        vec!["start", "--kernel", k, "--initrd", r, "--rosetta", "--engine", "qemu"],
        vec!["start", "--kernel", k, "--initrd", r, "--engine", "vz"],
        vec!["start", "--initrd", r],
        vec!["stop", "--timeout", "x"],
        vec!["stop", "--timeout", "18446744073709551615"],
        vec!["start", "--kernel", k, "--initrd", r, "--ephemeral"],
        vec!["start", "--kernel", k, "--initrd", r, "--discard-disk"],
        vec!["start", "--kernel", "/nonexistent/kernel", "--initrd", r, "--log-file", log.to_str().unwrap()],
        vec!["destroy"],
        vec!["frobnicate"],
        vec!["start", "--kernel", "/nonexistent/a kernel with spaces", "--initrd", r],
        vec!["start", "--kernel", "/nonexistent/new\nline", "--initrd", r],
        vec!["start", "--kernel", k, "--initrd", r, "--cores", "257"],
        vec!["start", "--kernel", k, "--initrd", r, "--memory", "1048577"],
        vec!["start", "--kernel", k, "--initrd", r, "--max-jobs", "0"],
        vec!["start", "--kernel", k, "--initrd", r, "--idle-timeout", "-1"],
        vec!["start", "--kernel", k, "--initrd", r, "--idle-timeout", "5x"],
        vec!["start", "--kernel", k, "--initrd", r, "--port", "-1"],
        vec!["start", "--kernel", k, "--initrd", r, "--engine", "hyperv"],
        vec!["logs", "-n", "many"],
        vec!["status", "--frob"],
        vec!["start", "--kernel", k, "--initrd", r, "--port", &taken],
        vec!["start", "--kernel", k, "--initrd", r, "--port", &taken, "--on-demand"],
        vec!["start", "--kernel", k, "--initrd", r, "--port", &taken, "--detach"],
    ];
    for args in cases {
        let out = i.run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} should exit 2; stderr: {stderr}");
        assert!(!stderr.trim().is_empty(), "{args:?} printed no reason");
        assert!(stderr.lines().filter(|l| l.contains("error")).count() <= 1, "{args:?}: one message, not a cascade: {stderr}");
        assert_eq!(snapshot(i.state()), before, "{args:?} changed the state directory");
    }
    // Environment variables and a path that is not UTF-8 go through the same checks.
    let env_cases: [(&str, &str, Vec<&str>); 3] = [
        ("DVN_ENGINE", "hyperv", vec!["status"]),
        ("DVN_HOST_NIX_STORE", "/nonexistent/store", vec!["start", "--kernel", k, "--initrd", r, "--share-nix-store"]),
        ("DVN_LOG", "info", vec!["start", "--kernel", k, "--initrd", r, "--cores", "x"]),
    ];
    for (name, value, args) in env_cases {
        let out = i.cmd(&args).env(name, value).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}={value} {args:?}: {stderr}");
        assert_eq!(snapshot(i.state()), before, "{name}={value} {args:?} changed the state directory");
    }
    {
        use std::os::unix::ffi::OsStrExt;
        let not_utf8 = std::ffi::OsStr::from_bytes(b"/nonexistent/\xff\xfekernel");
        let out = i.cmd(&["start", "--initrd", r]).arg("--kernel").arg(not_utf8).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "a non-UTF-8 path: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(snapshot(i.state()), before);
    }
    // A state directory that is a regular file: one message, exit 2, for any command.
    let file = dir.path().join("a-file");
    fs::write(&file, "x").unwrap();
    for args in [vec!["start", "--kernel", k, "--initrd", r], vec!["status"], vec!["init"], vec!["destroy", "--yes"]] {
        let out = i.cmd(&args).arg("--state-dir").arg(&file).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} with a file as state dir: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert_eq!(fs::read_to_string(&file).unwrap(), "x");
    }
    // A taken port on a state directory that does not exist yet: it is not made.
    let fresh = dir.path().join("fresh");
    let out = i.cmd(&["start", "--kernel", k, "--initrd", r, "--port", &taken]).arg("--state-dir").arg(&fresh).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("already in use") && stderr.lines().count() == 1, "{stderr}");
    assert!(!fresh.exists(), "a start refused for its port made {}", fresh.display());
    drop(holder);
    let shrink = String::from_utf8_lossy(&i.run(&["start", "--kernel", k, "--initrd", r, "--disk-size", "1G"]).stderr).into_owned();
    assert!(shrink.contains("smaller than the existing disk") && shrink.contains("2G"), "{shrink}");
}

#[test]
fn init_is_idempotent_and_keys_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let i = Instance::new();
    assert!(i.run(&["init"]).status.success());
    // The lock file names its last holder (init takes the lock too); everything else stays as it was.
    let without_lock = |i: &Instance| snapshot(i.state()).into_iter().filter(|e| !e.0.ends_with("lock")).collect::<Vec<_>>();
    let first = without_lock(&i);
    assert!(i.run(&["init"]).status.success());
    assert!(without_lock(&i) == first, "a second init changed the state directory");
    let mode = fs::metadata(i.state().join("ssh/id_ed25519")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let keygen = std::process::Command::new("ssh-keygen").arg("-y").arg("-f").arg(i.state().join("ssh/id_ed25519")).output();
    if let Ok(out) = keygen {
        assert!(out.status.success(), "ssh-keygen cannot read our key: {}", String::from_utf8_lossy(&out.stderr));
    }
    let known = fs::read_to_string(i.state().join("ssh/known_hosts")).unwrap();
    assert!(known.starts_with("darwin-vz-nix ssh-ed25519 "), "{known}");
}

#[test]
fn ssh_without_a_vm_says_what_to_do() {
    let i = Instance::new();
    let out = i.run(&["ssh", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("start"));
}

#[test]
fn destroy_refuses_without_yes_and_deletes_with_it() {
    let i = Instance::new();
    assert!(i.run(&["init"]).status.success());
    fs::write(i.state().join("disk.img"), "x").unwrap();
    assert_eq!(i.run(&["destroy"]).status.code(), Some(2));
    assert!(i.state().join("disk.img").exists());
    assert!(i.run(&["destroy", "--yes"]).status.success());
    assert!(!i.state().join("disk.img").exists());
    assert!(i.state().join("ssh/id_ed25519").exists(), "keys are kept by default");
    assert!(i.run(&["destroy", "--yes", "--keys"]).status.success());
    assert!(!i.state().join("ssh/id_ed25519").exists());
}

#[test]
fn logs_prints_tails_and_follows() {
    use std::io::{BufRead, BufReader, Write};
    let i = Instance::new();
    let console = i.state().join("console.log");
    fs::write(&console, "one\ntwo\nthree\n").unwrap();
    let all = i.run(&["logs"]);
    assert_eq!(String::from_utf8_lossy(&all.stdout), "one\ntwo\nthree\n");
    let last = i.run(&["logs", "-n", "2"]);
    assert_eq!(String::from_utf8_lossy(&last.stdout), "two\nthree\n");
    let mut follow = i.cmd(&["logs", "--follow", "-n", "1"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(follow.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "three");
    fs::OpenOptions::new().append(true).open(&console).unwrap().write_all(b"four\n").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "four", "new output is followed");
    // Rotation: a new file at the same path is followed from its start.
    fs::OpenOptions::new().append(true).open(&console).unwrap().write_all(b"late\n").unwrap();
    fs::rename(&console, i.state().join("console.log.0")).unwrap();
    fs::write(&console, "five\n").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "late", "what reached the old file before the switch is kept");
    assert_eq!(lines.next().unwrap().unwrap(), "five");
    follow.kill().unwrap();
    follow.wait().unwrap();
}

#[test]
fn destroy_deletes_only_in_a_marked_state_directory_and_only_what_it_made() {
    // A directory that looks like a home with files of our names: never a state directory of ours.
    let home = tempfile::tempdir().unwrap();
    for dir in ["run", "ssh", "guest-config"] {
        fs::create_dir(home.path().join(dir)).unwrap();
        fs::write(home.path().join(dir).join("keep"), "mine").unwrap();
    }
    for file in ["config.json", "console.log", "disk.img", "notes.txt"] {
        fs::write(home.path().join(file), "mine").unwrap();
    }
    let before = snapshot(home.path());
    let i = Instance::new();
    let run = |dir: &std::path::Path, env_home: &std::path::Path| {
        i.cmd(&["destroy", "--yes", "--keys"]).arg("--state-dir").arg(dir).env("HOME", env_home).output().unwrap()
    };
    let out = run(home.path(), i.state());
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a darwin-vz-nix state directory"));
    assert_eq!(snapshot(home.path()), before, "destroy deleted in a directory it did not make");
    // Even a marked home is refused.
    fs::write(home.path().join(".darwin-vz-nix-state"), "").unwrap();
    let before = snapshot(home.path());
    assert_eq!(run(home.path(), home.path()).status.code(), Some(2));
    assert_eq!(snapshot(home.path()), before);
    // `init` refuses to adopt a directory with files it does not make, and changes nothing there.
    let foreign = tempfile::tempdir().unwrap();
    fs::write(foreign.path().join("notes.txt"), "mine").unwrap();
    let before = snapshot(foreign.path());
    let out = i.cmd(&["init"]).arg("--state-dir").arg(foreign.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(snapshot(foreign.path()), before);
    // In a real state directory: what is not of the type we made (a link, a directory) is left alone.
    assert!(i.run(&["init"]).status.success());
    let victim = home.path().join("notes.txt");
    std::os::unix::fs::symlink(&victim, i.state().join("disk.img")).unwrap();
    fs::create_dir(i.state().join("console.log")).unwrap();
    fs::write(i.state().join("config.json"), "{}").unwrap();
    let out = i.run(&["destroy", "--yes", "--keys"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read_to_string(&victim).unwrap(), "mine");
    assert!(fs::symlink_metadata(i.state().join("disk.img")).is_ok(), "the link itself is not ours to delete");
    assert!(i.state().join("console.log").is_dir());
    assert!(!i.state().join("config.json").exists());
    assert!(!i.state().join("ssh").exists());
}

#[test]
#[allow(clippy::zombie_processes)] // reaped by wait4, which also gives its peak memory
fn logs_tail_of_a_huge_console_log_reads_from_the_end() {
    let i = Instance::new();
    let console = i.state().join("console.log");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(fs::File::create(&console).unwrap());
        let line = [b'x'; 1023];
        for _ in 0..(192 << 10) {
            f.write_all(&line).unwrap();
            f.write_all(b"\n").unwrap();
        }
        f.write_all(b"the end\n").unwrap();
    }
    let mut child = i.cmd(&["logs", "-n", "1"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    // The child's peak memory, from wait4 (the whole 192 MiB file was read into memory before). It starts at
    // the test process's own size (fork), hence the loose bound.
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pid of our own child and writable out-parameters.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    assert_eq!(out, "the end\n");
    let max_rss_kib = usage.ru_maxrss;
    assert!(max_rss_kib < 96 * 1024, "logs -n 1 used {max_rss_kib} KiB on a 192 MiB log");
}
