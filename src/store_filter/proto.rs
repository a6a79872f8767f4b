//! Constants and messages of the Nix worker protocol that the filter speaks, checked against Nix 2.8.0 and 2.34.8
//! (src/libstore/worker-protocol.hh, worker-protocol-connection.cc, daemon.cc, libutil/serialise.cc).

use super::FilterError;
use super::wire::{Conn, MAX_STRING};

pub const WORKER_MAGIC_1: u64 = 0x6e69_7863;
pub const WORKER_MAGIC_2: u64 = 0x6478_696f;

pub const STDERR_NEXT: u64 = 0x6f6c_6d67;
pub const STDERR_READ: u64 = 0x6461_7461;
pub const STDERR_WRITE: u64 = 0x6461_7416;
pub const STDERR_LAST: u64 = 0x616c_7473;
pub const STDERR_ERROR: u64 = 0x6378_7470;
pub const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
pub const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
pub const STDERR_RESULT: u64 = 0x5253_4c54;

/// Protocol 1.34 (Nix 2.8, the oldest host Nix supported) ..= 1.38 (Nix 2.34, the guest).
pub const MIN_VERSION: u64 = 0x122;
pub const MAX_VERSION: u64 = 0x126;

pub const fn minor(v: u64) -> u64 {
    v & 0xff
}

/// The operations the filter knows by name (for messages); numbers from worker-protocol.hh.
pub mod op {
    pub const IS_VALID_PATH: u64 = 1;
    pub const QUERY_REFERRERS: u64 = 6;
    pub const ADD_TEMP_ROOT: u64 = 11;
    pub const SET_OPTIONS: u64 = 19;
    pub const QUERY_PATH_INFO: u64 = 26;
    pub const QUERY_PATH_FROM_HASH_PART: u64 = 29;
    pub const QUERY_VALID_PATHS: u64 = 31;
    pub const QUERY_VALID_DERIVERS: u64 = 33;
    pub const QUERY_MISSING: u64 = 40;
    pub const QUERY_REALISATION: u64 = 43;
}

pub fn op_name(op: u64) -> &'static str {
    match op {
        1 => "IsValidPath",
        3 => "HasSubstitutes",
        4 => "QueryPathHash",
        5 => "QueryReferences",
        6 => "QueryReferrers",
        7 => "AddToStore",
        8 => "AddTextToStore",
        9 => "BuildPaths",
        10 => "EnsurePath",
        11 => "AddTempRoot",
        12 => "AddIndirectRoot",
        13 => "SyncWithGC",
        14 => "FindRoots",
        16 => "ExportPath",
        18 => "QueryDeriver",
        19 => "SetOptions",
        20 => "CollectGarbage",
        21 => "QuerySubstitutablePathInfo",
        22 => "QueryDerivationOutputs",
        23 => "QueryAllValidPaths",
        24 => "QueryFailedPaths",
        25 => "ClearFailedPaths",
        26 => "QueryPathInfo",
        27 => "ImportPaths",
        28 => "QueryDerivationOutputNames",
        29 => "QueryPathFromHashPart",
        30 => "QuerySubstitutablePathInfos",
        31 => "QueryValidPaths",
        32 => "QuerySubstitutablePaths",
        33 => "QueryValidDerivers",
        34 => "OptimiseStore",
        35 => "VerifyStore",
        36 => "BuildDerivation",
        37 => "AddSignatures",
        38 => "NarFromPath",
        39 => "AddToStoreNar",
        40 => "QueryMissing",
        41 => "QueryDerivationOutputMap",
        42 => "RegisterDrvOutput",
        43 => "QueryRealisation",
        44 => "AddMultipleToStore",
        45 => "AddBuildLog",
        46 => "BuildPathsWithResults",
        47 => "AddPermRoot",
        _ => "unknown",
    }
}

/// An error as Nix sends it with STDERR_ERROR since protocol 1.26 (`operator<<(Sink &, const Error &)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixError {
    pub level: u64,
    pub msg: Vec<u8>,
    pub traces: Vec<Vec<u8>>,
}

impl NixError {
    pub fn new(msg: String) -> Self {
        NixError { level: 0, msg: msg.into_bytes(), traces: Vec::new() }
    }

    pub fn message(&self) -> String {
        String::from_utf8_lossy(&self.msg).into_owned()
    }

    fn read(c: &mut Conn) -> Result<Self, FilterError> {
        let side = c.side();
        if c.read_bytes(16)? != b"Error" {
            return Err(FilterError::Malformed { side, what: "an error that is not of type Error" });
        }
        let level = c.read_u64()?;
        c.read_bytes(MAX_STRING)?; // the removed error name
        let msg = c.read_bytes(MAX_STRING)?;
        if c.read_u64()? != 0 {
            return Err(FilterError::Malformed { side, what: "an error with a position" });
        }
        let n = c.read_count(MAX_FIELDS)?;
        let mut traces = Vec::new();
        for _ in 0..n {
            if c.read_u64()? != 0 {
                return Err(FilterError::Malformed { side, what: "an error trace with a position" });
            }
            traces.push(c.read_bytes(MAX_STRING)?);
        }
        Ok(NixError { level, msg, traces })
    }

    /// Writes STDERR_ERROR and the error.
    pub fn write(&self, c: &mut Conn) -> Result<(), FilterError> {
        c.write_u64(STDERR_ERROR)?;
        c.write_bytes(b"Error")?;
        c.write_u64(self.level)?;
        c.write_bytes(b"Error")?;
        c.write_bytes(&self.msg)?;
        c.write_u64(0)?;
        c.write_u64(self.traces.len() as u64)?;
        for t in &self.traces {
            c.write_u64(0)?;
            c.write_bytes(t)?;
        }
        Ok(())
    }
}

const MAX_FIELDS: usize = 1024;
/// The most log messages kept (and forwarded) per reply; more are read and dropped.
const MAX_LOG_MESSAGES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Int(u64),
    Str(Vec<u8>),
}

/// A log message the daemon sends before an operation's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogMsg {
    Next(Vec<u8>),
    Start { id: u64, level: u64, kind: u64, text: Vec<u8>, fields: Vec<Field>, parent: u64 },
    Stop(u64),
    Result { id: u64, kind: u64, fields: Vec<Field> },
}

fn read_fields(c: &mut Conn) -> Result<Vec<Field>, FilterError> {
    let n = c.read_count(MAX_FIELDS)?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(match c.read_u64()? {
            0 => Field::Int(c.read_u64()?),
            1 => Field::Str(c.read_bytes(MAX_STRING)?),
            _ => return Err(FilterError::Malformed { side: c.side(), what: "a log field of unknown type" }),
        });
    }
    Ok(v)
}

fn write_fields(c: &mut Conn, fields: &[Field]) -> Result<(), FilterError> {
    c.write_u64(fields.len() as u64)?;
    for f in fields {
        match f {
            Field::Int(n) => {
                c.write_u64(0)?;
                c.write_u64(*n)?;
            }
            Field::Str(s) => {
                c.write_u64(1)?;
                c.write_bytes(s)?;
            }
        }
    }
    Ok(())
}

impl LogMsg {
    pub fn write(&self, c: &mut Conn) -> Result<(), FilterError> {
        match self {
            LogMsg::Next(s) => {
                c.write_u64(STDERR_NEXT)?;
                c.write_bytes(s)
            }
            LogMsg::Start { id, level, kind, text, fields, parent } => {
                c.write_u64(STDERR_START_ACTIVITY)?;
                c.write_u64(*id)?;
                c.write_u64(*level)?;
                c.write_u64(*kind)?;
                c.write_bytes(text)?;
                write_fields(c, fields)?;
                c.write_u64(*parent)
            }
            LogMsg::Stop(id) => {
                c.write_u64(STDERR_STOP_ACTIVITY)?;
                c.write_u64(*id)
            }
            LogMsg::Result { id, kind, fields } => {
                c.write_u64(STDERR_RESULT)?;
                c.write_u64(*id)?;
                c.write_u64(*kind)?;
                write_fields(c, fields)
            }
        }
    }
}

/// Reads the daemon's messages up to STDERR_LAST (`Ok(Ok(logs))`) or STDERR_ERROR (`Ok(Err(error))`). A daemon
/// asking for data (STDERR_READ) or sending some (STDERR_WRITE) has no place in a read-only query.
pub fn read_stderr(c: &mut Conn) -> Result<Result<Vec<LogMsg>, NixError>, FilterError> {
    let mut logs = Vec::new();
    loop {
        let msg = match c.read_u64()? {
            STDERR_LAST => return Ok(Ok(logs)),
            STDERR_ERROR => return Ok(Err(NixError::read(c)?)),
            STDERR_NEXT => LogMsg::Next(c.read_bytes(MAX_STRING)?),
            STDERR_START_ACTIVITY => LogMsg::Start {
                id: c.read_u64()?,
                level: c.read_u64()?,
                kind: c.read_u64()?,
                text: c.read_bytes(MAX_STRING)?,
                fields: read_fields(c)?,
                parent: c.read_u64()?,
            },
            STDERR_STOP_ACTIVITY => LogMsg::Stop(c.read_u64()?),
            STDERR_RESULT => LogMsg::Result { id: c.read_u64()?, kind: c.read_u64()?, fields: read_fields(c)? },
            STDERR_READ | STDERR_WRITE => {
                return Err(FilterError::Malformed { side: c.side(), what: "a data transfer in a read-only query" });
            }
            _ => return Err(FilterError::Malformed { side: c.side(), what: "an unknown log message type" }),
        };
        if logs.len() < MAX_LOG_MESSAGES {
            logs.push(msg);
        }
    }
}
