//! A small asynchronous QMP client: one connection to one QEMU monitor
//! socket; commands are sent one at a time and answered in order,
//! asynchronous events in between are skipped.

use std::{path::Path, time::Duration};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{
        UnixStream,
        unix::{OwnedReadHalf, OwnedWriteHalf},
    },
};

/// How long one QMP command (or connecting and the greeting) may take.
pub(crate) const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest QMP line accepted: `query-rx-filter` alone is about 25 kB
/// (a full VLAN table).
const MAX_LINE: u64 = 4 << 20;

/// What went wrong talking to QEMU.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached or used.
    #[error("qmp i/o: {0}")]
    Io(String),
    /// QEMU closed the connection (as it does after `quit`).
    #[error("qmp connection closed by QEMU")]
    Closed,
    /// QEMU sent something that is not QMP.
    #[error("qmp protocol: {0}")]
    Protocol(String),
    /// QEMU refused the command.
    #[error("qemu refused {command}: {class}: {desc}")]
    Command {
        /// The command sent.
        command: String,
        /// QEMU's error class (`GenericError`...).
        class: String,
        /// QEMU's message.
        desc: String,
    },
    /// No answer within the time allowed.
    #[error("qmp: no answer to {0} within {QMP_TIMEOUT:?}")]
    TimedOut(String),
}

/// One QMP session, in command mode.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode
    /// (`qmp_capabilities`).
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = tokio::time::timeout(QMP_TIMEOUT, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::TimedOut("connect".into()))?
            .map_err(|e| QmpError::Io(format!("{}: {e}", path.display())))?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
            next_id: 1,
        };
        let greeting = tokio::time::timeout(QMP_TIMEOUT, qmp.read())
            .await
            .map_err(|_| QmpError::TimedOut("the greeting".into()))??;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected the QMP greeting, got {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Sends `command` with `arguments`; returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        tokio::time::timeout(QMP_TIMEOUT, self.execute_inner(command, arguments))
            .await
            .map_err(|_| QmpError::TimedOut(command.to_owned()))?
    }

    async fn execute_inner(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                    QmpError::Closed
                }
                _ => QmpError::Io(e.to_string()),
            })?;
        loop {
            let v = self.read().await?;
            if v.get("event").is_some() {
                continue;
            }
            match v.get("id").and_then(Value::as_u64) {
                Some(i) if i == id => {}
                // The late answer to a command whose caller stopped
                // waiting (its time-out, or a migration's deadline that
                // cut a `query-migrate` off mid-way): QEMU answers every
                // command, in order, so it comes before this one's.
                Some(i) if i < id => {
                    tracing::debug!(id = i, "qmp: skipped the answer to an abandoned command");
                    continue;
                }
                _ => {
                    return Err(QmpError::Protocol(format!(
                        "answer to another command: {v}"
                    )));
                }
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            return Err(QmpError::Protocol(format!("neither return nor error: {v}")));
        }
    }

    /// Reads one JSON line.
    async fn read(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_line(&mut line)
            .await
            .map_err(|e| QmpError::Io(e.to_string()))?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if !line.ends_with('\n') {
            return Err(QmpError::Protocol(format!(
                "a line longer than {MAX_LINE} bytes"
            )));
        }
        serde_json::from_str(&line).map_err(|e| QmpError::Protocol(format!("{e}: {line}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::{io::AsyncBufReadExt, net::UnixListener};

    /// A fake QEMU monitor: greets, then answers each command from
    /// `answers` (by command name), with an event first; `slow-status`
    /// is answered half a second late.
    async fn fake(path: std::path::PathBuf, answers: Vec<(&'static str, Value)>) {
        let listener = UnixListener::bind(&path).unwrap();
        let (s, _) = listener.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
            .await
            .unwrap();
        let mut line = String::new();
        while r.read_line(&mut line).await.unwrap() > 0 {
            let v: Value = serde_json::from_str(&line).unwrap();
            line.clear();
            let cmd = v["execute"].as_str().unwrap().to_owned();
            let id = v["id"].clone();
            if cmd == "slow-status" {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            w.write_all(b"{\"event\": \"STOP\", \"timestamp\": {}}\r\n")
                .await
                .unwrap();
            let reply = match answers.iter().find(|(c, _)| *c == cmd) {
                Some((_, a)) => {
                    let mut a = a.clone();
                    a["id"] = id;
                    a
                }
                None if cmd == "qmp_capabilities" => json!({"return": {}, "id": id}),
                None => {
                    json!({"error": {"class": "CommandNotFound", "desc": "nope"}, "id": id})
                }
            };
            w.write_all(format!("{reply}\r\n").as_bytes())
                .await
                .unwrap();
            if cmd == "quit" {
                return;
            }
        }
    }

    #[tokio::test]
    async fn commands_events_errors_and_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.qmp");
        let server = tokio::spawn(fake(
            path.clone(),
            vec![
                (
                    "query-status",
                    json!({"return": {"status": "running", "running": true}}),
                ),
                ("slow-status", json!({"return": {"status": "paused"}})),
                ("quit", json!({"return": {}})),
            ],
        ));
        // Let the listener bind.
        for _ in 0..100 {
            if path.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut q = Qmp::connect(&path).await.unwrap();
        let s = q.execute("query-status", None).await.unwrap();
        assert_eq!(s["status"], "running");
        let e = q.execute("frobnicate", None).await.unwrap_err();
        assert!(
            matches!(&e, QmpError::Command { class, .. } if class == "CommandNotFound"),
            "{e}"
        );
        // A command given up on before its answer came: the next one
        // reads past that answer to its own.
        let slow =
            tokio::time::timeout(Duration::from_millis(50), q.execute("slow-status", None)).await;
        assert!(slow.is_err(), "the fake holds its answer back");
        let s = q.execute("query-status", None).await.unwrap();
        assert_eq!(s["status"], "running");
        q.execute("quit", None).await.unwrap();
        server.await.unwrap();
        let e = q.execute("query-status", None).await.unwrap_err();
        assert!(
            matches!(e, QmpError::Closed | QmpError::Io(_)),
            "after quit: {e}"
        );
    }
}
