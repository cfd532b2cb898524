//! One QEMU VM's presence: a task that connects to its QMP socket when told to (start,
//! the socket appearing, a reload), reports the VM up with a connected backend, and
//! reports it gone when the connection drops. A socket that exists but refuses is retried
//! with backoff; a VM that is down is tried again every [`SLOW_RETRY`] whatever inotify
//! says, so a missed event (a watch lost with its directory, an inotify queue overflow)
//! delays a VM, never loses it.

use super::connector::VmConnector;
use crate::backend::PresenceEvent;
use crate::backend::VmConnection;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Connection attempts right after a socket appears: QEMU creates the file at bind(),
/// a moment before listen(), so the first connect can be refused.
const QUICK_ATTEMPTS: u32 = 20;
const QUICK_PAUSE: Duration = Duration::from_millis(25);
/// Retry of a socket that exists but refuses (stale after a crash, or another client
/// holds QEMU's only monitor connection): 250 ms doubling to 30 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(250u64 << failures.saturating_sub(1).min(7)).min(Duration::from_secs(30))
}

/// How often a VM that is down is tried without being woken: the backstop for inotify.
pub const SLOW_RETRY: Duration = Duration::from_secs(30);

/// Watch one VM until `report`'s receiver is dropped: try its socket on each wake-up
/// (the stream starts with one queued), on the backoff of a socket that refused, and
/// every `slow_retry`; report it up with a connected backend, and gone when that
/// connection drops.
pub(super) async fn watch_vm(
    name: String,
    qmp: PathBuf,
    connector: Arc<dyn VmConnector>,
    mut wakes: mpsc::UnboundedReceiver<()>,
    report: mpsc::UnboundedSender<PresenceEvent>,
    slow_retry: Duration,
) {
    let mut failures = 0u32;
    loop {
        // Wait for a wake-up, for the retry of a socket that exists but refused, or for
        // the slow retry of a VM that is down.
        let retry = if failures > 0 && qmp.exists() {
            backoff(failures).min(slow_retry)
        } else {
            slow_retry
        };
        tokio::select! {
            w = wakes.recv() => match w {
                Some(()) => failures = 0,
                None => return,
            },
            () = tokio::time::sleep(retry) => {}
            // The daemon stopped watching this VM (reload removed it).
            () = report.closed() => return,
        }
        let link = match connect(&name, &qmp, connector.as_ref()).await {
            Ok(link) => link,
            Err(reason) => {
                failures += 1;
                tracing::debug!(vm = %name, socket = %qmp.display(), "VM not reachable: {reason}");
                continue;
            }
        };
        failures = 0;
        tracing::info!(vm = %name, socket = %qmp.display(), "VM up (QMP connected)");
        if report.send(PresenceEvent::Up(link.backend)).is_err() {
            return;
        }
        let mut closed = link.closed;
        loop {
            tokio::select! {
                () = &mut closed => break,
                () = report.closed() => return,
                // Wake-ups while connected are moot.
                w = wakes.recv() => if w.is_none() { return },
            }
        }
        tracing::info!(vm = %name, "VM gone (QMP connection closed)");
        let gone = PresenceEvent::Gone {
            reason: "QMP connection closed".into(),
        };
        if report.send(gone).is_err() {
            return;
        }
    }
}

async fn connect(
    name: &str,
    qmp: &Path,
    connector: &dyn VmConnector,
) -> Result<VmConnection, String> {
    let mut last = format!("{} does not exist", qmp.display());
    for _ in 0..QUICK_ATTEMPTS {
        if !qmp.exists() {
            break;
        }
        match connector.connect(name, qmp).await {
            Ok(link) => return Ok(link),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(QUICK_PAUSE).await;
    }
    Err(last)
}
