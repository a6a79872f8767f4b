//! A minimal QMP client: capabilities negotiation and synchronous commands.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

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
                return Err(std::io::Error::other(format!("QMP {command}: {error}")));
            }
        }
    }
}
