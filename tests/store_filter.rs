//! The host-store filter against the REAL host Nix (Debian's nix-bin: a `nix-daemon` on a chroot store in a
//! temporary directory, never /nix), driven by the host's `nix` and `nix-store` clients through the filter.
//! Skipped, with a message, only when `nix-daemon` is not on PATH (scripts/test installs it).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use dvn::store_filter::{FilterConfig, FilterContext, serve};

struct Host {
    dir: tempfile::TempDir,
    daemon: Child,
    ctx: Arc<FilterContext>,
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
}

impl Host {
    fn start() -> Option<Host> {
        if !on_path("nix-daemon") {
            eprintln!("SKIPPED: nix-daemon is not on PATH (scripts/lib/deps.sh ensure_host_nix installs nix-bin)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let daemon = Command::new("nix-daemon")
            .args(["--store", dir.path().join("root").to_str().unwrap()])
            .env("NIX_DAEMON_SOCKET_PATH", dir.path().join("daemon.sock"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !dir.path().join("daemon.sock").exists() {
            assert!(Instant::now() < deadline, "nix-daemon did not create its socket");
            thread::sleep(Duration::from_millis(20));
        }
        let ctx = Arc::new(FilterContext::new(FilterConfig::new(dir.path().join("daemon.sock"), dir.path().join("root/nix/store"))));
        let listener = UnixListener::bind(dir.path().join("filter.sock")).unwrap();
        let c = ctx.clone();
        thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let c = c.clone();
                thread::spawn(move || serve(s, &c));
            }
        });
        Some(Host { dir, daemon, ctx })
    }

    fn daemon_uri(&self) -> String {
        format!("unix://{}", self.dir.path().join("daemon.sock").display())
    }

    fn filter_uri(&self) -> String {
        format!("unix://{}", self.dir.path().join("filter.sock").display())
    }

    fn store_dir(&self) -> PathBuf {
        self.dir.path().join("root/nix/store")
    }

    /// Runs a Nix client with its caches and config in the temporary directory.
    fn run(&self, prog: &str, args: &[&str]) -> Output {
        Command::new(prog)
            .args(args)
            .env("HOME", self.dir.path())
            .env("XDG_CACHE_HOME", self.dir.path().join("cache"))
            .env("NIX_CONFIG", "experimental-features = nix-command")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Adds a file or directory to the host store directly (not through the filter).
    fn add(&self, path: &Path) -> String {
        let out = self.run("nix-store", &["--store", &self.daemon_uri(), "--add", path.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    fn listing(&self) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(self.store_dir()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    fn gc(&self) {
        let out = self.run("nix-store", &["--store", &self.daemon_uri(), "--gc"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn host_nix_clients_query_through_the_filter() {
    let Some(h) = Host::start() else { return };
    let f = h.dir.path().join("hello.txt");
    std::fs::write(&f, "hello").unwrap();
    let p = h.add(&f);

    let ping = h.run("nix", &["store", "ping", "--store", &h.filter_uri()]);
    assert!(ping.status.success(), "{}", text(&ping.stderr));

    let direct = h.run("nix", &["path-info", "--json", "--store", &h.daemon_uri(), &p]);
    let filtered = h.run("nix", &["path-info", "--json", "--store", &h.filter_uri(), &p]);
    assert!(filtered.status.success(), "{}", text(&filtered.stderr));
    assert_eq!(text(&filtered.stdout), text(&direct.stdout), "the same path info through the filter");

    let absent = format!("{}/{}-absent", "/nix/store", "0".repeat(32));
    let out = h.run("nix", &["path-info", "--store", &h.filter_uri(), &absent]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("is not valid"), "{}", text(&out.stderr));
    let stats = h.ctx.stats();
    assert!(stats.ops_passed >= 3 && stats.ops_refused == 0, "{stats:?}");
}

#[test]
fn writes_and_gc_through_the_filter_are_refused_and_change_nothing() {
    let Some(h) = Host::start() else { return };
    let f = h.dir.path().join("kept.txt");
    std::fs::write(&f, "kept").unwrap();
    let kept = h.add(&f);
    let before = h.listing();

    let g = h.dir.path().join("new.txt");
    std::fs::write(&g, "new").unwrap();
    let out = h.run("nix-store", &["--store", &h.filter_uri(), "--add", g.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("refused operation AddToStore (7) from the guest: the host store is read-only"),
        "{}",
        text(&out.stderr)
    );
    for args in [vec!["--gc"], vec!["--delete", kept.as_str()]] {
        let out = h.run("nix-store", &[&["--store", &h.filter_uri()], &args[..]].concat());
        assert!(!out.status.success());
        assert!(text(&out.stderr).contains("refused operation CollectGarbage (20)"), "{}", text(&out.stderr));
    }
    let out = h.run("nix", &["store", "optimise", "--store", &h.filter_uri()]);
    assert!(text(&out.stderr).contains("refused operation OptimiseStore"), "{}", text(&out.stderr));
    assert_eq!(h.listing(), before, "the host store is unchanged");
    assert!(h.ctx.stats().ops_refused >= 4);
}

/// A minimal client: handshake at protocol 1.34, then IsValidPath. Keeps the connection for the caller.
fn query_and_hold(filter_sock: &Path, p: &str) -> (UnixStream, bool) {
    fn num(s: &mut UnixStream) -> u64 {
        let mut b = [0u8; 8];
        s.read_exact(&mut b).unwrap();
        u64::from_le_bytes(b)
    }
    fn put(s: &mut UnixStream, n: u64) {
        s.write_all(&n.to_le_bytes()).unwrap();
    }
    fn string(s: &mut UnixStream) {
        let n = num(s) as usize;
        let mut b = vec![0u8; n.div_ceil(8) * 8];
        s.read_exact(&mut b).unwrap();
    }
    let mut s = UnixStream::connect(filter_sock).unwrap();
    put(&mut s, 0x6e69_7863);
    assert_eq!(num(&mut s), 0x6478_696f);
    num(&mut s);
    for n in [0x122, 0, 0] {
        put(&mut s, n);
    }
    string(&mut s); // the host's Nix version
    assert_eq!(num(&mut s), 0x616c_7473);
    put(&mut s, 1);
    put(&mut s, p.len() as u64);
    let mut b = p.as_bytes().to_vec();
    b.resize(p.len().div_ceil(8) * 8, 0);
    s.write_all(&b).unwrap();
    assert_eq!(num(&mut s), 0x616c_7473);
    let valid = num(&mut s) != 0;
    (s, valid)
}

#[test]
fn a_path_reported_to_a_live_connection_survives_host_gc() {
    let Some(h) = Host::start() else { return };
    let f = h.dir.path().join("rooted.txt");
    std::fs::write(&f, "rooted").unwrap();
    let p = h.add(&f);
    let on_disk = h.store_dir().join(Path::new(&p).file_name().unwrap());

    let (conn, valid) = query_and_hold(&h.dir.path().join("filter.sock"), &p);
    assert!(valid);
    h.gc();
    assert!(on_disk.exists(), "the host's GC kept a path the filter reported valid");

    // Without the connection, nothing holds it: GC deletes it (so the check above can fail).
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(20);
    while on_disk.exists() {
        assert!(Instant::now() < deadline, "the path outlived the connection's temp root");
        thread::sleep(Duration::from_millis(200));
        h.gc();
    }
}

#[test]
fn a_case_hacked_path_is_not_valid_through_the_filter() {
    let Some(h) = Host::start() else { return };
    let d = h.dir.path().join("headers");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("README"), "a").unwrap();
    std::fs::write(d.join("README~nix~case~hack~1"), "b").unwrap();
    let p = h.add(&d);
    assert!(h.store_dir().join(Path::new(&p).file_name().unwrap()).join("README~nix~case~hack~1").exists());

    let direct = h.run("nix", &["path-info", "--store", &h.daemon_uri(), &p]);
    assert!(direct.status.success());
    let out = h.run("nix", &["path-info", "--store", &h.filter_uri(), &p]);
    assert!(!out.status.success(), "a case-hacked path must not be valid to the guest");
    assert!(text(&out.stderr).contains("is not valid"), "{}", text(&out.stderr));
}

/// The builder guest's root file system (its initramfs, DVN_TEST_BUILDER_INITRD, with Nix 2.34) unpacked into
/// a directory, to run its Nix with `chroot` (and /proc mounted in a private mount namespace). None, with a
/// message, without the image or without root.
struct GuestRoot(PathBuf);

impl GuestRoot {
    fn unpack(into: PathBuf) -> Option<GuestRoot> {
        let Some(initrd) = std::env::var_os("DVN_TEST_BUILDER_INITRD") else {
            eprintln!("SKIPPED: DVN_TEST_BUILDER_INITRD is not set (scripts/test builds the builder guest and sets it)");
            return None;
        };
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: chroot needs root");
            return None;
        }
        std::fs::create_dir(&into).unwrap();
        let unpack =
            Command::new("cpio").args(["-id", "--quiet"]).current_dir(&into).stdin(std::fs::File::open(&initrd).unwrap()).status().unwrap();
        assert!(unpack.success());
        std::fs::create_dir_all(into.join("run/dvn")).unwrap();
        Some(GuestRoot(into))
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount -t proc proc "$0/proc" && exec chroot "$0" "$@""#)
            .arg(&self.0)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", "/tmp")
            .env("NIX_CONFIG", "experimental-features = nix-command local-overlay-store");
        c
    }

    /// Runs the guest's Nix: (success, stdout, stderr).
    fn nix(&self, args: &[&str]) -> (bool, String, String) {
        let out = self.command(args).stdin(Stdio::null()).output().unwrap();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    }

    /// Serves a filter on `<root>/<sock>` (a path inside the chroot).
    fn serve_filter(&self, sock: &str, ctx: Arc<FilterContext>) {
        let listener = UnixListener::bind(self.0.join(sock)).unwrap();
        thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let c = ctx.clone();
                thread::spawn(move || serve(s, &c));
            }
        });
    }
}

/// The guest's own Nix (2.34, protocol 1.38) against the host's 2.8 (1.34) through the filter, without a VM:
/// both as a plain client and as the lower store of a `local-overlay://` store, which is what the guest's
/// nix-daemon runs.
#[test]
fn the_guest_nix_2_34_queries_the_host_2_8_through_the_filter() {
    let Some(h) = Host::start() else { return };
    let Some(g) = GuestRoot::unpack(h.dir.path().join("guest")) else { return };
    g.serve_filter("run/dvn/host-store.sock", h.ctx.clone());

    let f = h.dir.path().join("input.txt");
    std::fs::write(&f, "a build input").unwrap();
    let p = h.add(&f);
    let (ok, version, _) = g.nix(&["nix", "--version"]);
    assert!(ok && version.contains("2.34"), "{version}");

    let lower = "unix:///run/dvn/host-store.sock";
    let (ok, out, err) = g.nix(&["nix", "path-info", "--json", "--store", lower, &p]);
    assert!(ok, "{err}");
    assert!(out.contains("\"narSize\""), "{out}");
    let (ok, out, err) = g.nix(&["nix", "store", "info", "--store", lower]);
    assert!(ok, "{err}");
    assert!(format!("{out}{err}").contains("Version: 2.8.0"), "the host's version is reported: {out}{err}");
    let (ok, _, err) = g.nix(&["nix-store", "--store", lower, "--add", "/etc/hostname"]);
    assert!(!ok && err.contains("refused operation"), "{err}");

    // The local-overlay store the guest's daemon runs, with the filter as its lower store: the path is valid
    // in it (registered in the upper database from the lower store's answers).
    std::fs::create_dir_all(g.0.join("tmp/upper")).unwrap();
    let overlay = format!("local-overlay://?lower-store={lower}&upper-layer=/tmp/upper&check-mount=false");
    let (ok, out, err) = g.nix(&["nix", "path-info", "--store", &overlay, &p]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), p);
}

/// Protocol 1.38 end to end with real Nix on both sides: the guest image's Nix 2.34 as the host daemon too (a
/// host with a new Nix), so the feature-set exchange and the trusted flag go through the filter.
#[test]
fn nix_2_34_on_both_sides_negotiates_1_38_through_the_filter() {
    let dir = tempfile::tempdir().unwrap();
    let Some(g) = GuestRoot::unpack(dir.path().join("guest")) else { return };
    let mut daemon = g
        .command(&["nix-daemon", "--store", "/tmp/host"])
        .env("NIX_DAEMON_SOCKET_PATH", "/run/dvn/daemon.sock")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _kill = Kill(&mut daemon);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !g.0.join("run/dvn/daemon.sock").exists() {
        assert!(Instant::now() < deadline, "the 2.34 nix-daemon did not create its socket");
        thread::sleep(Duration::from_millis(20));
    }
    let ctx = Arc::new(FilterContext::new(FilterConfig::new(g.0.join("run/dvn/daemon.sock"), g.0.join("tmp/host/nix/store"))));
    g.serve_filter("run/dvn/filter.sock", ctx.clone());
    let (ok, p, err) = g.nix(&["nix-store", "--store", "unix:///run/dvn/daemon.sock", "--add", "/etc/hostname"]);
    assert!(ok, "{err}");
    let p = p.trim();

    let filter = "unix:///run/dvn/filter.sock";
    let (ok, out, err) = g.nix(&["nix", "store", "info", "--store", filter]);
    assert!(ok, "{err}");
    let info = format!("{out}{err}");
    assert!(info.contains("Version: 2.34") && info.contains("Trusted: 0"), "{info}");
    let (ok, out, err) = g.nix(&["nix", "path-info", "--store", filter, p]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), p);
    let (ok, _, err) = g.nix(&["nix-store", "--store", filter, "--add", "/etc/os-release"]);
    assert!(!ok && err.contains("refused operation AddToStore"), "{err}");
    assert!(ctx.stats().ops_passed >= 2);
}
