//! The host side of host-store queries: a READ-ONLY filter of the Nix worker protocol between a guest's
//! nix-daemon (its `local-overlay://` store's lower store is `unix://` to us, over vsock) and the host's
//! nix-daemon. The guest is hostile (root in the guest runs arbitrary build code); the host daemon is trusted but
//! its replies are still bounded.
//!
//! Per guest connection, [`serve`] opens its own connection to the host daemon, negotiates one protocol version
//! V = min(guest, host, 1.38) for both sides (so every request and reply is encoded the same way on both), and
//! then answers only the read-only queries a `local-overlay://` lower store and a Nix client make
//! (LocalOverlayStore in Nix 2.34's local-overlay-store.cc calls isValidPath, queryPathInfo, queryValidPaths,
//! queryPathFromHashPart, queryReferrers, queryValidDerivers and queryRealisation on its lower store;
//! RemoteStore sends SetOptions on every new connection). Every other operation is refused with an error and
//! the connection closed (its payload may be unbounded). See /work/notes/filter-readme.md for the op table.
//!
//! Rules on what is reported valid:
//! - A path is reported valid only if it is valid upstream, present under `host_store_dir`, and no name in the
//!   tree of any path of its closure carries `~nix~case~hack~` (a store on a case-insensitive APFS volume):
//!   the guest then uploads it as a NAR instead of reading mangled names from the share. The rule covers the
//!   closure because the guest's LocalOverlayStore registers a lower path with its references, and Nix refuses
//!   to register a path whose reference is not valid.
//! - Every path is made a temporary root on our upstream connection *before* it is queried, so the host's GC
//!   cannot delete it between the answer and the guest's use. Limit: temp roots live as long as the upstream
//!   connection, i.e. as long as the guest keeps this connection open (the guest's nix-daemon keeps a pool).
//!
//! Why hand-written and not a crate: `nix-daemon` 0.1.1 (crates.io) is tokio-based and fixes protocol 1.35
//! (MIN_PROTO = MAX_PROTO = 1.35, Nix 2.15+), so it cannot talk to Debian's Nix 2.8 (1.34); `nix-remote` 0.1.1
//! is a serde codec of all ops for one protocol version plus a forwarding proxy (and pulls in clap and
//! anyhow): per-version encodings and per-field bounds against a hostile peer would still be ours to add. The
//! filter needs a small, strictly bounded, synchronous subset with its own policy at every step, which is
//! less code than adapting either (the crate is thread-based; no tokio).

mod path;
mod proto;
mod wire;

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use path::{CleanCache, Tree};
use proto::{LogMsg, NixError, op};
use wire::{Conn, MAX_SET, MAX_STRING};

pub use path::{CASE_HACK, STORE_DIR};
pub use proto::{MAX_VERSION, MIN_VERSION};
pub use wire::Side;

/// The most paths one closure check visits before giving up (the path then counts as not clean).
const MAX_CLOSURE: usize = 100_000;
/// The most paths rooted on one connection; beyond that, new paths are not reported valid (they are uploaded).
const MAX_ROOTED: usize = 500_000;
/// Temp roots are pipelined upstream in batches of this many (small enough that replies never fill a socket
/// buffer while we are still writing requests).
const ROOT_BATCH: usize = 256;
/// The most settings one SetOptions may carry.
const MAX_OVERRIDES: usize = 4096;

pub struct FilterConfig {
    /// The host nix-daemon socket.
    pub upstream_socket: PathBuf,
    /// The real directory of the host store on disk (e.g. /nix/store), walked for case-hacked names.
    pub host_store_dir: PathBuf,
    /// Concurrent guest connections; more are closed at once.
    pub max_connections: usize,
}

impl FilterConfig {
    pub const DEFAULT_MAX_CONNECTIONS: usize = 32;

    pub fn new(upstream_socket: PathBuf, host_store_dir: PathBuf) -> Self {
        FilterConfig { upstream_socket, host_store_dir, max_connections: Self::DEFAULT_MAX_CONNECTIONS }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("I/O with the {side}: {source}")]
    Io {
        side: Side,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to the host nix-daemon at {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the {side} sent the magic number {magic:#x} instead of the Nix worker protocol's")]
    BadMagic { side: Side, magic: u64 },
    #[error("the {side} speaks Nix worker protocol {}.{} (supported: 1.34 to 1.38)", version >> 8, version & 0xff)]
    UnsupportedVersion { side: Side, version: u64 },
    #[error("the {side} sent a {what} of {len} (at most {max})")]
    TooLarge { side: Side, what: &'static str, len: u64, max: u64 },
    #[error("the {side} sent {what}")]
    Malformed { side: Side, what: &'static str },
    #[error("the guest sent an invalid store path {0:?}")]
    BadStorePath(String),
    #[error("the guest sent an invalid hash part {0:?}")]
    BadHashPart(String),
    #[error("the guest sent an invalid derivation output id {0:?}")]
    BadDrvOutput(String),
    #[error("refused operation {name} ({op}) from the guest: the host store is read-only to the guest")]
    Refused { op: u64, name: &'static str },
    #[error("too many guest connections (at most {0})")]
    TooManyConnections(usize),
}

impl FilterError {
    fn io(side: Side, source: io::Error) -> Self {
        FilterError::Io { side, source }
    }

    /// A request the filter refuses (counted as refused), as opposed to an I/O or upstream failure.
    pub fn is_guest_fault(&self) -> bool {
        matches!(
            self,
            FilterError::Refused { .. }
                | FilterError::BadStorePath(_)
                | FilterError::BadHashPart(_)
                | FilterError::BadDrvOutput(_)
                | FilterError::TooLarge { side: Side::Guest, .. }
                | FilterError::Malformed { side: Side::Guest, .. }
                | FilterError::BadMagic { side: Side::Guest, .. }
                | FilterError::UnsupportedVersion { side: Side::Guest, .. }
        )
    }
}

/// Totals over all connections of a context.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FilterStats {
    pub ops_passed: u64,
    pub ops_refused: u64,
    /// Guest connections accepted (including those closed for being over the limit).
    pub connections: u64,
    pub bytes_from_guest: u64,
    pub bytes_to_guest: u64,
}

/// What one guest connection did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionSummary {
    /// The negotiated protocol version (0 if the handshake did not complete).
    pub version: u64,
    pub ops_passed: u64,
    pub ops_refused: u64,
    pub bytes_from_guest: u64,
    pub bytes_to_guest: u64,
}

pub struct FilterContext {
    config: FilterConfig,
    clean: CleanCache,
    active: AtomicUsize,
    connections: AtomicU64,
    ops_passed: AtomicU64,
    ops_refused: AtomicU64,
    bytes_from_guest: AtomicU64,
    bytes_to_guest: AtomicU64,
}

impl FilterContext {
    pub fn new(config: FilterConfig) -> Self {
        FilterContext {
            config,
            clean: CleanCache::default(),
            active: AtomicUsize::new(0),
            connections: AtomicU64::new(0),
            ops_passed: AtomicU64::new(0),
            ops_refused: AtomicU64::new(0),
            bytes_from_guest: AtomicU64::new(0),
            bytes_to_guest: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> &FilterConfig {
        &self.config
    }

    pub fn stats(&self) -> FilterStats {
        FilterStats {
            ops_passed: self.ops_passed.load(Ordering::Relaxed),
            ops_refused: self.ops_refused.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            bytes_from_guest: self.bytes_from_guest.load(Ordering::Relaxed),
            bytes_to_guest: self.bytes_to_guest.load(Ordering::Relaxed),
        }
    }
}

struct ActiveGuard<'a>(&'a AtomicUsize);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves one guest connection to its end. Never panics on guest input; every error is typed.
pub fn serve(guest: UnixStream, ctx: &FilterContext) -> Result<ConnectionSummary, FilterError> {
    ctx.connections.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard(&ctx.active);
    if ctx.active.fetch_add(1, Ordering::SeqCst) >= ctx.config.max_connections {
        return Err(FilterError::TooManyConnections(ctx.config.max_connections));
    }
    let mut guest = Conn::new(Side::Guest, guest)?;
    let (result, summary) = match handshake(ctx, &mut guest) {
        Ok((up, version)) => {
            let summary = ConnectionSummary { version, ..ConnectionSummary::default() };
            let mut s = Session { ctx, guest, up, rooted: HashSet::new(), summary };
            let result = s.run();
            guest = s.guest;
            (result, s.summary)
        }
        Err(e) => (Err(e), ConnectionSummary::default()),
    };
    let summary = ConnectionSummary { bytes_from_guest: guest.bytes_in, bytes_to_guest: guest.bytes_out, ..summary };
    ctx.bytes_from_guest.fetch_add(guest.bytes_in, Ordering::Relaxed);
    ctx.bytes_to_guest.fetch_add(guest.bytes_out, Ordering::Relaxed);
    tracing::debug!(?summary, error = ?result.as_ref().err(), "host-store connection ended");
    result.map(|()| summary)
}

/// Accepts the guest's greeting, connects upstream, and negotiates one version for both sides. Returns the
/// upstream connection, ready for requests, and the version.
fn handshake(ctx: &FilterContext, guest: &mut Conn) -> Result<(Conn, u64), FilterError> {
    let magic = guest.read_u64()?;
    if magic != proto::WORKER_MAGIC_1 {
        return Err(FilterError::BadMagic { side: Side::Guest, magic });
    }
    // Upstream first: its version bounds what we offer the guest.
    let path = &ctx.config.upstream_socket;
    let stream = UnixStream::connect(path).map_err(|source| FilterError::Connect { path: path.clone(), source })?;
    let mut up = Conn::new(Side::Upstream, stream)?;
    up.write_u64(proto::WORKER_MAGIC_1)?;
    up.flush()?;
    let magic = up.read_u64()?;
    if magic != proto::WORKER_MAGIC_2 {
        return Err(FilterError::BadMagic { side: Side::Upstream, magic });
    }
    let up_version = check_major(Side::Upstream, up.read_u64()?)?;
    let offered = up_version.min(MAX_VERSION);
    guest.write_u64(proto::WORKER_MAGIC_2)?;
    guest.write_u64(offered)?;
    guest.flush()?;
    let guest_version = check_major(Side::Guest, guest.read_u64()?)?;
    let v = guest_version.min(offered);
    if v < MIN_VERSION {
        let side = if guest_version < offered { Side::Guest } else { Side::Upstream };
        return Err(FilterError::UnsupportedVersion { side, version: v });
    }
    up.write_u64(v)?;
    if v >= 0x126 {
        // Feature sets: the guest's first, then ours (none); upstream: ours (none), then the daemon's.
        guest.read_strings(MAX_OVERRIDES, MAX_STRING)?;
        guest.write_strings::<&[u8]>(&[])?;
        guest.flush()?;
        up.write_strings::<&[u8]>(&[])?;
        up.flush()?;
        up.read_strings(MAX_OVERRIDES, MAX_STRING)?;
    }
    // Post-handshake (v >= 1.34 > 1.14 > 1.11): the obsolete CPU affinity and reserveSpace.
    up.write_u64(0)?;
    up.write_u64(0)?;
    up.flush()?;
    if guest.read_bool()? {
        guest.read_u64()?;
    }
    guest.read_u64()?;
    let nix_version = up.read_bytes(1024)?; // v >= 1.33
    if v >= 0x123 {
        match up.read_u64()? {
            0..=2 => {}
            _ => return Err(FilterError::Malformed { side: Side::Upstream, what: "a bad trusted flag" }),
        }
    }
    let startup = proto::read_stderr(&mut up)?;
    guest.write_bytes(&nix_version)?;
    if v >= 0x123 {
        guest.write_u64(2)?; // the guest is not trusted
    }
    match startup {
        Ok(_) => guest.write_u64(proto::STDERR_LAST)?,
        Err(e) => e.write(guest)?,
    }
    guest.flush()?;
    tracing::debug!(version = format!("1.{}", proto::minor(v)), "host-store handshake done");
    Ok((up, v))
}

/// Information about one valid path, as the daemon sends it (protocol >= 1.16).
struct PathInfo {
    deriver: Vec<u8>,
    nar_hash: Vec<u8>,
    references: Vec<String>,
    registration_time: u64,
    nar_size: u64,
    ultimate: u64,
    sigs: Vec<Vec<u8>>,
    ca: Vec<u8>,
}

/// An upstream answer: the daemon's error is passed to the guest as the op's error.
type Upstream<T> = Result<T, NixError>;

struct Session<'a> {
    ctx: &'a FilterContext,
    guest: Conn,
    up: Conn,
    /// Paths already made temp roots on the upstream connection.
    rooted: HashSet<String>,
    summary: ConnectionSummary,
}

impl Session<'_> {
    fn run(&mut self) -> Result<(), FilterError> {
        loop {
            self.guest.start_message();
            let Some(op) = self.guest.read_u64_or_eof()? else { return Ok(()) };
            tracing::debug!(op, name = proto::op_name(op), "host-store op from the guest");
            match self.handle(op) {
                Ok(()) => {
                    self.summary.ops_passed += 1;
                    self.ctx.ops_passed.fetch_add(1, Ordering::Relaxed);
                    self.guest.flush()?;
                }
                Err(e) => {
                    if e.is_guest_fault() {
                        self.summary.ops_refused += 1;
                        self.ctx.ops_refused.fetch_add(1, Ordering::Relaxed);
                    }
                    // Tell the guest why (best effort), then close: the rest of its request is unread, or the
                    // upstream connection is in an unknown state.
                    let msg = format!("darwin-vz-nix: {e}");
                    tracing::debug!(op, "{msg}");
                    let _ = NixError::new(msg).write(&mut self.guest).and_then(|()| self.guest.flush());
                    return Err(e);
                }
            }
        }
    }

    // --- guest requests -----------------------------------------------------------------------------------

    fn handle(&mut self, op: u64) -> Result<(), FilterError> {
        match op {
            op::SET_OPTIONS => {
                // Parsed to its end and answered here: the guest's settings never reach the host daemon.
                for _ in 0..12 {
                    self.guest.read_u64()?;
                }
                let n = self.guest.read_count(MAX_OVERRIDES)?;
                for _ in 0..2 * n {
                    self.guest.read_bytes(MAX_STRING)?;
                }
                self.guest.write_u64(proto::STDERR_LAST)
            }
            op::IS_VALID_PATH => {
                let p = self.read_guest_path()?;
                let r = self.visible(vec![p], true)?;
                self.reply(r, |g, v| g.write_u64(u64::from(!v.is_empty())))
            }
            op::QUERY_VALID_PATHS => {
                let paths = self.read_guest_paths()?;
                // Substitution would write to the host store: the flag (>= 1.27) is read and ignored.
                self.guest.read_u64()?;
                let r = self.visible(paths, true)?;
                self.reply(r, |g, v| g.write_strings(&v))
            }
            op::QUERY_PATH_INFO => {
                let p = self.read_guest_path()?;
                if let Err(e) = self.root(std::slice::from_ref(&p))? {
                    tracing::debug!(error = %e.message(), "temp root refused upstream");
                }
                if !self.rooted.contains(&p) {
                    // Not rooted, so not reported: the guest uploads it if it needs it.
                    return self.reply(Ok(()), |g, ()| g.write_u64(0));
                }
                let info = match self.up_path_info(&p, true)? {
                    Ok(Some(info)) if self.closure_clean(&p, Some(info.references.clone()))? => Some(info),
                    Ok(_) => None,
                    Err(e) => return self.reply(Err(e), |_, ()| Ok(())),
                };
                self.reply(Ok(info), |g, info| match info {
                    None => g.write_u64(0),
                    Some(i) => {
                        g.write_u64(1)?;
                        write_path_info(g, &i)
                    }
                })
            }
            op::QUERY_PATH_FROM_HASH_PART => {
                let hash = self.guest.read_string(MAX_STRING)?;
                if !path::is_hash_part(&hash) {
                    return Err(FilterError::BadHashPart(truncate(&hash)));
                }
                let up = &mut self.up;
                up.start_message();
                up.write_u64(op)?;
                up.write_bytes(hash.as_bytes())?;
                let r = self.finish_upstream(true)?;
                let r = match r {
                    Ok(()) => {
                        let p = self.up.read_string(MAX_STRING)?;
                        if path::is_store_path(&p) { self.visible(vec![p], false)? } else { Ok(Vec::new()) }
                    }
                    Err(e) => Err(e),
                };
                self.reply(r, |g, v| g.write_bytes(v.first().map_or(&b""[..], |p| p.as_bytes())))
            }
            op::QUERY_REFERRERS | op::QUERY_VALID_DERIVERS => {
                let p = self.read_guest_path()?;
                let up = &mut self.up;
                up.start_message();
                up.write_u64(op)?;
                up.write_bytes(p.as_bytes())?;
                let r = match self.finish_upstream(true)? {
                    Ok(()) => {
                        let paths = self.read_upstream_paths()?;
                        self.visible(paths, false)?
                    }
                    Err(e) => Err(e),
                };
                self.reply(r, |g, v| g.write_strings(&v))
            }
            op::QUERY_REALISATION => {
                let id = self.guest.read_string(1024)?;
                if !is_drv_output(&id) {
                    return Err(FilterError::BadDrvOutput(truncate(&id)));
                }
                let up = &mut self.up;
                up.start_message();
                up.write_u64(op)?;
                up.write_bytes(id.as_bytes())?;
                let r = match self.finish_upstream(true)? {
                    // >= 1.31: a set of at most one realisation, as JSON; passed on as is.
                    Ok(()) => Ok(self.up.read_strings(16, MAX_STRING)?),
                    Err(e) => Err(e),
                };
                self.reply(r, |g, v| g.write_strings(&v))
            }
            op::QUERY_MISSING => {
                // Answered here (the host daemon would evaluate derivations and ask its substituters): nothing
                // will be built or substituted through us; a visible path is present, anything else unknown.
                let n = self.guest.read_count(MAX_SET)?;
                let mut opaque = Vec::new();
                let mut unknown = Vec::new();
                for _ in 0..n {
                    let d = self.guest.read_string(MAX_STRING)?;
                    // `<path>` or `<drv path>!<outputs>` (`^` in newer renderings).
                    let (p, built) = match d.split_once(['!', '^']) {
                        Some((p, _)) => (p.to_owned(), true),
                        None => (d, false),
                    };
                    if !path::is_store_path(&p) {
                        return Err(FilterError::BadStorePath(truncate(&p)));
                    }
                    if built { unknown.push(p) } else { opaque.push(p) }
                }
                let present: HashSet<String> = match self.visible(opaque.clone(), false)? {
                    Ok(v) => v.into_iter().collect(),
                    Err(_) => HashSet::new(),
                };
                unknown.extend(opaque.into_iter().filter(|p| !present.contains(p)));
                self.reply(Ok(unknown), |g, unknown| {
                    g.write_u64(0)?; // will build
                    g.write_u64(0)?; // will substitute
                    g.write_strings(&unknown)?;
                    g.write_u64(0)?; // download size
                    g.write_u64(0) // NAR size
                })
            }
            op::ADD_TEMP_ROOT => {
                let p = self.read_guest_path()?;
                let r = self.root(&[p])?;
                self.reply(r, |g, ()| g.write_u64(1))
            }
            _ => Err(FilterError::Refused { op, name: proto::op_name(op) }),
        }
    }

    /// Ends a guest op: STDERR_LAST and the reply, or the daemon's error.
    fn reply<T>(&mut self, r: Upstream<T>, write: impl FnOnce(&mut Conn, T) -> Result<(), FilterError>) -> Result<(), FilterError> {
        match r {
            Ok(t) => {
                self.guest.write_u64(proto::STDERR_LAST)?;
                write(&mut self.guest, t)
            }
            Err(e) => e.write(&mut self.guest),
        }
    }

    fn read_guest_path(&mut self) -> Result<String, FilterError> {
        let p = self.guest.read_string(MAX_STRING)?;
        if !path::is_store_path(&p) {
            return Err(FilterError::BadStorePath(truncate(&p)));
        }
        Ok(p)
    }

    fn read_guest_paths(&mut self) -> Result<Vec<String>, FilterError> {
        let n = self.guest.read_count(MAX_SET)?;
        let mut v = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            v.push(self.read_guest_path()?);
        }
        Ok(v)
    }

    // --- upstream -----------------------------------------------------------------------------------------

    /// Flushes the request and reads the daemon's messages; with `forward`, its log messages go to the guest
    /// (they belong to the guest's op).
    fn finish_upstream(&mut self, forward: bool) -> Result<Upstream<()>, FilterError> {
        let up = &mut self.up;
        up.flush()?;
        up.start_message();
        match proto::read_stderr(up)? {
            Ok(logs) => {
                if forward {
                    for m in &logs {
                        LogMsg::write(m, &mut self.guest)?;
                    }
                }
                Ok(Ok(()))
            }
            Err(e) => Ok(Err(e)),
        }
    }

    /// A set of paths from the daemon; any that is not a valid store path is dropped (never reported).
    fn read_upstream_paths(&mut self) -> Result<Vec<String>, FilterError> {
        let v = self.up.read_strings(MAX_SET, MAX_STRING)?;
        Ok(v.into_iter().filter(|p| path::is_store_path(p)).collect())
    }

    /// Makes `paths` temp roots upstream (each once per connection), pipelined in batches. Only paths present in
    /// the host store directory are rooted, and at most `MAX_ROOTED` per connection, so a guest cannot grow the
    /// host daemon's temp-roots file without bound; a path not rooted is never reported valid.
    fn root(&mut self, paths: &[String]) -> Result<Upstream<()>, FilterError> {
        let store_dir = &self.ctx.config.host_store_dir;
        let mut todo: Vec<&String> = Vec::new();
        for p in paths {
            let on_disk = path::base_name(p).is_some_and(|b| store_dir.join(b).symlink_metadata().is_ok());
            if on_disk && !self.rooted.contains(p) && self.rooted.len() + todo.len() < MAX_ROOTED {
                todo.push(p);
            }
        }
        todo.sort_unstable();
        todo.dedup();
        for batch in todo.chunks(ROOT_BATCH) {
            let up = &mut self.up;
            for p in batch {
                up.write_u64(op::ADD_TEMP_ROOT)?;
                up.write_bytes(p.as_bytes())?;
            }
            let mut failed = None;
            for _ in batch {
                match self.finish_upstream(false)? {
                    Ok(()) => {
                        self.up.read_u64()?;
                    }
                    Err(e) => failed = Some(e),
                }
            }
            if let Some(e) = failed {
                return Ok(Err(e));
            }
            self.rooted.extend(batch.iter().map(|p| (*p).clone()));
        }
        Ok(Ok(()))
    }

    /// Of `candidates`, those the guest may see: rooted first, then valid upstream, then clean closures.
    /// `forward` passes the validity query's log messages to the guest.
    fn visible(&mut self, candidates: Vec<String>, forward: bool) -> Result<Upstream<Vec<String>>, FilterError> {
        if candidates.is_empty() {
            return Ok(Ok(candidates));
        }
        if let Err(e) = self.root(&candidates)? {
            tracing::debug!(error = %e.message(), "temp roots refused upstream: nothing reported valid");
            return Ok(Ok(Vec::new()));
        }
        let candidates: Vec<String> = candidates.into_iter().filter(|p| self.rooted.contains(p)).collect();
        if candidates.is_empty() {
            return Ok(Ok(candidates));
        }
        let up = &mut self.up;
        up.start_message();
        up.write_u64(op::QUERY_VALID_PATHS)?;
        up.write_strings(&candidates)?;
        up.write_u64(0)?; // no substitution
        if let Err(e) = self.finish_upstream(forward)? {
            return Ok(Err(e));
        }
        let valid = self.read_upstream_paths()?;
        let asked: HashSet<&String> = candidates.iter().collect();
        let mut out = Vec::with_capacity(valid.len());
        for p in valid {
            if asked.contains(&p) && self.closure_clean(&p, None)? {
                out.push(p);
            }
        }
        Ok(Ok(out))
    }

    fn up_path_info(&mut self, p: &str, forward: bool) -> Result<Upstream<Option<PathInfo>>, FilterError> {
        let up = &mut self.up;
        up.start_message();
        up.write_u64(op::QUERY_PATH_INFO)?;
        up.write_bytes(p.as_bytes())?;
        if let Err(e) = self.finish_upstream(forward)? {
            return Ok(Err(e));
        }
        let up = &mut self.up;
        if !up.read_bool()? {
            return Ok(Ok(None));
        }
        let deriver = up.read_bytes(MAX_STRING)?;
        let nar_hash = up.read_bytes(1024)?;
        let refs = up.read_strings(MAX_SET, MAX_STRING)?;
        let registration_time = up.read_u64()?;
        let nar_size = up.read_u64()?;
        let ultimate = up.read_u64()?;
        let sigs = up.read_strings(1024, MAX_STRING)?.into_iter().map(String::into_bytes).collect();
        let ca = up.read_bytes(MAX_STRING)?;
        if !refs.iter().all(|r| path::is_store_path(r)) {
            tracing::debug!(path = p, "upstream path info has an invalid reference: not reported");
            return Ok(Ok(None));
        }
        let deriver = if deriver.is_empty() || std::str::from_utf8(&deriver).is_ok_and(path::is_store_path) { deriver } else { Vec::new() };
        Ok(Ok(Some(PathInfo { deriver, nar_hash, references: refs, registration_time, nar_size, ultimate, sigs, ca })))
    }

    /// Whether no path in `p`'s closure has a case-hacked name (or is missing on disk, or too large to walk).
    /// `p` is rooted and valid upstream, so its closure is protected from the host's GC too.
    fn closure_clean(&mut self, p: &str, refs_of_p: Option<Vec<String>>) -> Result<bool, FilterError> {
        let store_dir = self.ctx.config.host_store_dir.clone();
        let mut seen: HashSet<String> = HashSet::new();
        let mut stack = vec![(p.to_owned(), refs_of_p)];
        while let Some((q, known_refs)) = stack.pop() {
            let Some(base) = path::base_name(&q) else { return Ok(false) };
            if self.ctx.clean.contains(base) || !seen.insert(q.clone()) {
                continue;
            }
            if seen.len() > MAX_CLOSURE {
                return Ok(false);
            }
            let tree = path::walk(&store_dir, base);
            if tree != Tree::Clean {
                tracing::debug!(path = %q, ?tree, "not reported valid to the guest");
                return Ok(false);
            }
            let refs = match known_refs {
                Some(r) => r,
                None => match self.up_path_info(&q, false)? {
                    Ok(Some(info)) => info.references,
                    _ => return Ok(false),
                },
            };
            stack.extend(refs.into_iter().filter(|r| *r != q).map(|r| (r, None)));
        }
        self.ctx.clean.insert_all(seen.iter().filter_map(|q| path::base_name(q)).map(str::to_owned));
        Ok(true)
    }
}

fn write_path_info(g: &mut Conn, i: &PathInfo) -> Result<(), FilterError> {
    g.write_bytes(&i.deriver)?;
    g.write_bytes(&i.nar_hash)?;
    g.write_strings(&i.references)?;
    g.write_u64(i.registration_time)?;
    g.write_u64(i.nar_size)?;
    g.write_u64(i.ultimate)?;
    g.write_strings(&i.sigs)?;
    g.write_bytes(&i.ca)
}

fn check_major(side: Side, version: u64) -> Result<u64, FilterError> {
    if version >> 8 != 1 {
        return Err(FilterError::UnsupportedVersion { side, version });
    }
    Ok(version)
}

/// `<hash algo>:<hash>!<output name>`, as DrvOutput::parse accepts (bounded, printable, no `/`).
fn is_drv_output(s: &str) -> bool {
    let Some((hash, name)) = s.split_once('!') else { return false };
    hash.len() <= 256 && hash.bytes().all(|c| c.is_ascii_alphanumeric() || b":-+/=".contains(&c)) && path::is_valid_name(name)
}

fn truncate(s: &str) -> String {
    s.chars().take(300).collect()
}
