//! A minimal QMP client: capabilities negotiation and synchronous commands.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

/// An error QEMU answered with; `class` is QMP's error class (e.g. `CommandNotFound`).
#[derive(Debug, thiserror::Error)]
#[error("QMP {command}: {reply}")]
pub struct QmpError {
    pub command: String,
    pub class: String,
    reply: String,
}

impl QmpError {
    /// The QMP error inside an I/O error from `execute`, if that is what it was.
    pub fn of(error: &std::io::Error) -> Option<&QmpError> {
        error.get_ref().and_then(|inner| inner.downcast_ref::<QmpError>())
    }
}

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path) -> std::io::Result<Self> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let writer = stream.try_clone()?;
        let mut qmp = Qmp { reader: BufReader::new(stream), writer };
        let mut greeting = String::new();
        qmp.reader.read_line(&mut greeting)?;
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    /// Runs a command and returns its `return` value; events that arrive meanwhile are skipped.
    pub fn execute(&mut self, command: &str) -> std::io::Result<Value> {
        self.execute_with(command, Value::Null)
    }

    pub fn execute_with(&mut self, command: &str, arguments: Value) -> std::io::Result<Value> {
        let request =
            if arguments.is_null() { json!({ "execute": command }) } else { json!({ "execute": command, "arguments": arguments }) };
        let mut line = serde_json::to_vec(&request).expect("json");
        line.push(b'\n');
        self.writer.write_all(&line)?;
        loop {
            let mut reply = String::new();
            if self.reader.read_line(&mut reply)? == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "QMP closed"));
            }
            let value: Value = serde_json::from_str(&reply).map_err(std::io::Error::other)?;
            if let Some(result) = value.get("return") {
                return Ok(result.clone());
            }
            if let Some(error) = value.get("error") {
                let class = error.get("class").and_then(Value::as_str).unwrap_or_default().to_string();
                return Err(std::io::Error::other(QmpError { command: command.to_string(), class, reply: error.to_string() }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn qmp_errors_keep_their_class() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            let mut reader = BufReader::new(stream);
            writer.write_all(b"{\"QMP\":{}}\n").unwrap();
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            writer.write_all(b"{\"return\":{}}\n").unwrap();
            line.clear();
            reader.read_line(&mut line).unwrap();
            writer
                .write_all(
                    b"{\"error\":{\"class\":\"CommandNotFound\",\"desc\":\"The command x-query-virtio-status has not been found\"}}\n",
                )
                .unwrap();
        });
        let err = Qmp::connect(&path).unwrap().execute("x-query-virtio-status").unwrap_err();
        assert_eq!(QmpError::of(&err).map(|q| q.class.as_str()), Some("CommandNotFound"));
        assert!(QmpError::of(&std::io::Error::other("CommandNotFound")).is_none(), "text alone is not a QMP error");
        server.join().unwrap();
    }
}
