//! The Nix wire format, bounded: every number is a little-endian u64, a string is its length (u64), its bytes and
//! zero padding to a multiple of 8, a set is its count (u64) and its members. One `Conn` per socket counts the
//! bytes both ways and enforces a per-request byte budget, so a hostile peer cannot make us allocate or read
//! without limit.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;

use super::FilterError;

/// The longest string we accept anywhere (a store path is at most ~260 bytes; a setting value or a log line a
/// little more). Longer is refused before anything is allocated.
pub const MAX_STRING: usize = 64 * 1024;
/// The most members of one set of paths or strings.
pub const MAX_SET: usize = 64 * 1024;
/// The most bytes one request (or one reply) may take in total.
pub const MAX_MESSAGE: u64 = 32 * 1024 * 1024;

/// Which end of the filter a connection is; errors say which side misbehaved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Guest,
    Upstream,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Guest => "guest",
            Side::Upstream => "host nix-daemon",
        })
    }
}

pub struct Conn {
    side: Side,
    r: BufReader<UnixStream>,
    w: BufWriter<UnixStream>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Bytes still allowed for the current message (reset by `start_message`).
    budget: u64,
}

impl Conn {
    pub fn new(side: Side, stream: UnixStream) -> Result<Self, FilterError> {
        let w = stream.try_clone().map_err(|e| FilterError::io(side, e))?;
        Ok(Conn { side, r: BufReader::new(stream), w: BufWriter::new(w), bytes_in: 0, bytes_out: 0, budget: MAX_MESSAGE })
    }

    pub fn side(&self) -> Side {
        self.side
    }

    /// A new request or reply starts: it may take up to `MAX_MESSAGE` bytes.
    pub fn start_message(&mut self) {
        self.budget = MAX_MESSAGE;
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), FilterError> {
        let n = buf.len() as u64;
        if n > self.budget {
            return Err(FilterError::TooLarge { side: self.side, what: "message", len: n, max: MAX_MESSAGE });
        }
        self.r.read_exact(buf).map_err(|e| FilterError::io(self.side, e))?;
        self.budget -= n;
        self.bytes_in += n;
        Ok(())
    }

    /// The next number, or `None` on a clean end of stream before its first byte (the peer closed between
    /// messages).
    pub fn read_u64_or_eof(&mut self) -> Result<Option<u64>, FilterError> {
        let mut b = [0u8; 8];
        let mut got = 0;
        while got < 8 {
            match self.r.read(&mut b[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => {
                    return Err(FilterError::io(self.side, io::Error::from(io::ErrorKind::UnexpectedEof)));
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FilterError::io(self.side, e)),
            }
        }
        self.bytes_in += 8;
        self.budget = self.budget.saturating_sub(8);
        Ok(Some(u64::from_le_bytes(b)))
    }

    pub fn read_u64(&mut self) -> Result<u64, FilterError> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn read_bool(&mut self) -> Result<bool, FilterError> {
        Ok(self.read_u64()? != 0)
    }

    pub fn read_bytes(&mut self, max: usize) -> Result<Vec<u8>, FilterError> {
        let len = self.read_u64()?;
        if len > max as u64 {
            return Err(FilterError::TooLarge { side: self.side, what: "string", len, max: max as u64 });
        }
        let len = len as usize;
        let mut buf = vec![0u8; len];
        self.read_exact(&mut buf)?;
        let pad = (8 - len % 8) % 8;
        let mut zero = [0u8; 8];
        self.read_exact(&mut zero[..pad])?;
        if zero.iter().any(|&b| b != 0) {
            return Err(FilterError::Malformed { side: self.side, what: "non-zero string padding" });
        }
        Ok(buf)
    }

    pub fn read_string(&mut self, max: usize) -> Result<String, FilterError> {
        let b = self.read_bytes(max)?;
        String::from_utf8(b).map_err(|_| FilterError::Malformed { side: self.side, what: "string is not UTF-8" })
    }

    /// A count of set members, bounded.
    pub fn read_count(&mut self, max: usize) -> Result<usize, FilterError> {
        let n = self.read_u64()?;
        if n > max as u64 {
            return Err(FilterError::TooLarge { side: self.side, what: "set", len: n, max: max as u64 });
        }
        Ok(n as usize)
    }

    pub fn read_strings(&mut self, max_count: usize, max_len: usize) -> Result<Vec<String>, FilterError> {
        let n = self.read_count(max_count)?;
        let mut v = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            v.push(self.read_string(max_len)?);
        }
        Ok(v)
    }

    fn write_all(&mut self, b: &[u8]) -> Result<(), FilterError> {
        self.w.write_all(b).map_err(|e| FilterError::io(self.side, e))?;
        self.bytes_out += b.len() as u64;
        Ok(())
    }

    pub fn write_u64(&mut self, n: u64) -> Result<(), FilterError> {
        self.write_all(&n.to_le_bytes())
    }

    pub fn write_bytes(&mut self, s: &[u8]) -> Result<(), FilterError> {
        self.write_u64(s.len() as u64)?;
        self.write_all(s)?;
        let pad = (8 - s.len() % 8) % 8;
        self.write_all(&[0u8; 8][..pad])
    }

    pub fn write_strings<S: AsRef<[u8]>>(&mut self, v: &[S]) -> Result<(), FilterError> {
        self.write_u64(v.len() as u64)?;
        for s in v {
            self.write_bytes(s.as_ref())?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), FilterError> {
        self.w.flush().map_err(|e| FilterError::io(self.side, e))
    }
}
