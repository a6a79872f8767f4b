//! Byte relay between two full-duplex streams (TCP, unix and vsock sockets), used by the host's ssh proxy
//! and by the guest agent's ssh forwarder.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

/// A socket that can be split into a reader and a writer half and half-closed.
pub trait Duplex: Read + Write + Send + 'static {
    fn try_clone_duplex(&self) -> io::Result<Box<dyn Duplex>>;
    fn shutdown_write(&self);
}

macro_rules! impl_duplex {
    ($t:ty) => {
        impl Duplex for $t {
            fn try_clone_duplex(&self) -> io::Result<Box<dyn Duplex>> {
                Ok(Box::new(self.try_clone()?))
            }
            fn shutdown_write(&self) {
                // The peer may be gone already; nothing useful to do about an error here.
                let _ = self.shutdown(Shutdown::Write);
            }
        }
    };
}
impl_duplex!(TcpStream);
impl_duplex!(UnixStream);

/// Copies bytes both ways until both directions reach end of file. Half-closes each side when its source ends,
/// so protocols that rely on EOF (ssh) behave. Returns (a -> b, b -> a) byte counts.
pub fn relay(a: Box<dyn Duplex>, b: Box<dyn Duplex>) -> io::Result<(u64, u64)> {
    relay_counted(a, b, Counters::default())
}

/// Where a relay adds the bytes it moves, as they move (for a live total, e.g. `status`).
#[derive(Clone, Default)]
pub struct Counters {
    pub a_to_b: Arc<AtomicU64>,
    pub b_to_a: Arc<AtomicU64>,
}

/// A reader that adds what it reads to a shared counter.
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// `relay`, adding the bytes of each direction to `counters` as they are copied.
pub fn relay_counted(a: Box<dyn Duplex>, b: Box<dyn Duplex>, counters: Counters) -> io::Result<(u64, u64)> {
    let a_reader = a.try_clone_duplex()?;
    let mut b_writer = b.try_clone_duplex()?;
    let forward_count = counters.a_to_b.clone();
    let forward = thread::Builder::new().name("relay".into()).spawn(move || {
        let mut reader = Counting { inner: a_reader, count: forward_count };
        let copied = io::copy(&mut reader, &mut b_writer).unwrap_or(0);
        b_writer.shutdown_write();
        copied
    })?;
    let (b_reader, mut a_writer) = (b, a);
    let mut reader = Counting { inner: b_reader, count: counters.b_to_a.clone() };
    let backward = io::copy(&mut reader, &mut a_writer).unwrap_or(0);
    a_writer.shutdown_write();
    let forward = forward.join().unwrap_or(0);
    Ok((forward, backward))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relays_both_ways_and_propagates_eof() {
        let (mut client, proxy_a) = UnixStream::pair().unwrap();
        let (proxy_b, mut server) = UnixStream::pair().unwrap();
        let relay = thread::spawn(move || relay(Box::new(proxy_a), Box::new(proxy_b)).unwrap());
        client.write_all(b"ping").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"ping");
        server.write_all(b"pong!").unwrap();
        server.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"pong!");
        assert_eq!(relay.join().unwrap(), (4, 5));
    }

    #[test]
    fn counters_add_up_both_directions() {
        let (mut client, proxy_a) = UnixStream::pair().unwrap();
        let (proxy_b, mut server) = UnixStream::pair().unwrap();
        let counters = Counters::default();
        let (c, totals) = (counters.clone(), counters.clone());
        let relay = thread::spawn(move || relay_counted(Box::new(proxy_a), Box::new(proxy_b), c).unwrap());
        client.write_all(&[7u8; 1000]).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        server.write_all(b"ok").unwrap();
        server.shutdown(Shutdown::Write).unwrap();
        client.read_to_end(&mut got).unwrap();
        assert_eq!(relay.join().unwrap(), (1000, 2));
        assert_eq!(totals.a_to_b.load(Ordering::Relaxed), 1000);
        assert_eq!(totals.b_to_a.load(Ordering::Relaxed), 2);
    }
}
