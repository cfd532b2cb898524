//! A minimal QMP client for the outer QEMU, private to the test bed.
//!
//! Stop-gap until `usbroute::qmp` lands on main; it has the same shape (`connect`,
//! `execute`, `events`) so the swap is mechanical.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc};

/// How long one command may take before the outer QEMU counts as hung.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected, capability-negotiated QMP session.
pub struct Qmp {
    writer: OwnedWriteHalf,
    replies: mpsc::UnboundedReceiver<Value>,
    events: broadcast::Sender<Value>,
}

impl Qmp {
    /// Connect to a QMP socket and leave capability negotiation mode.
    pub async fn connect(path: &Path) -> Result<Qmp> {
        let stream = UnixStream::connect(path)
            .await
            .with_context(|| format!("connecting to QMP socket {}", path.display()))?;
        let (read, writer) = stream.into_split();
        let (reply_tx, replies) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(256);
        let event_tx = events.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if msg.get("event").is_some() {
                    let _ = event_tx.send(msg);
                } else if msg.get("QMP").is_none() && reply_tx.send(msg).is_err() {
                    break;
                }
            }
        });
        let mut qmp = Qmp {
            writer,
            replies,
            events,
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Run one command; its `return` value, or its `error` as an error.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut request = json!({ "execute": command });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .with_context(|| format!("sending QMP {command}"))?;
        let reply = tokio::time::timeout(REPLY_TIMEOUT, self.replies.recv())
            .await
            .map_err(|_| anyhow!("QMP {command}: no reply in {REPLY_TIMEOUT:?}"))?
            .ok_or_else(|| anyhow!("QMP {command}: the outer QEMU closed its socket"))?;
        if let Some(err) = reply.get("error") {
            bail!(
                "QMP {command} failed: {} ({})",
                err["desc"].as_str().unwrap_or("?"),
                err["class"].as_str().unwrap_or("?")
            );
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Every event from now on.
    pub fn events(&self) -> broadcast::Receiver<Value> {
        self.events.subscribe()
    }
}
