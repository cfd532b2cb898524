//! One QEMU VM's presence: a task that connects to its QMP socket when told to (start,
//! the socket appearing, a reload), reports the VM up with a connected backend, and
//! reports it gone when the connection drops. A socket that exists but refuses is retried
//! with backoff; a VM that is down is tried again every [`SLOW_RETRY`] whatever inotify
//! says, so a missed event (a watch lost with its directory, an inotify queue overflow)
//! delays a VM, never loses it.
//!
//! QEMU serves one client per monitor and queues the next without a word (no greeting)
//! until the one it serves leaves. A connection that stays silent for [`HELD_AFTER`] is
//! reported held ([`PresenceEvent::Held`], once per wait) and keeps its place in that
//! queue: QEMU greets it the moment the other client leaves.

use super::connector::VmConnector;
use crate::backend::PresenceEvent;
use crate::backend::VmConnection;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Connection attempts right after a socket appears: QEMU creates the file at bind(),
/// a moment before listen(), so the first connect can be refused.
const QUICK_ATTEMPTS: u32 = 20;
const QUICK_PAUSE: Duration = Duration::from_millis(25);
/// Retry of a socket that exists but refuses (stale after a crash): 250 ms doubling to
/// 30 s. (A monitor another client holds does not refuse: it queues us, see `wait_held`.)
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(250u64 << failures.saturating_sub(1).min(7)).min(Duration::from_secs(30))
}

/// How often a VM that is down is tried without being woken: the backstop for inotify.
pub const SLOW_RETRY: Duration = Duration::from_secs(30);

/// How long a connection may wait for QEMU's greeting before the VM is reported held by
/// another client (QEMU greets at once when it serves us).
pub const HELD_AFTER: Duration = super::qmp::GREETING_TIMEOUT;

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
        let link = match connect(&name, &qmp, connector.as_ref(), &report).await {
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
    report: &mpsc::UnboundedSender<PresenceEvent>,
) -> Result<VmConnection, String> {
    let mut last = format!("{} does not exist", qmp.display());
    for _ in 0..QUICK_ATTEMPTS {
        if !qmp.exists() {
            break;
        }
        let attempt = connector.connect(name, qmp);
        match wait_held(attempt, report, || held_reason(name, qmp)).await {
            Some(Ok(link)) => return Ok(link),
            Some(Err(e)) => last = crate::error_chain::one_line(&e),
            None => return Err("the daemon stopped watching the VM".into()),
        }
        tokio::time::sleep(QUICK_PAUSE).await;
    }
    Err(last)
}

/// Wait for `attempt`; once it has gone [`HELD_AFTER`] without an answer, report the VM
/// held (the reason from `why`) and wait on, and report the wait over when it ends
/// without a connection. `None` when the report's receiver went away meanwhile.
async fn wait_held<T, E>(
    attempt: impl Future<Output = Result<T, E>>,
    report: &mpsc::UnboundedSender<PresenceEvent>,
    why: impl FnOnce() -> String,
) -> Option<Result<T, E>> {
    tokio::pin!(attempt);
    tokio::select! {
        done = &mut attempt => return Some(done),
        () = tokio::time::sleep(HELD_AFTER) => {}
        () = report.closed() => return None,
    }
    // The daemon logs it, once per wait.
    report.send(PresenceEvent::Held(Some(why()))).ok()?;
    let done = tokio::select! {
        done = attempt => done,
        () = report.closed() => return None,
    };
    if done.is_err() {
        report.send(PresenceEvent::Held(None)).ok()?;
    }
    Some(done)
}

/// What the log and `status` say of a VM whose monitor keeps its connection waiting.
fn held_reason(name: &str, qmp: &Path) -> String {
    format!(
        "QEMU sent no QMP greeting on {socket} within {seconds:.1} s: the monitor {socket} is \
         probably held by another client (QEMU serves one client per monitor and queues the \
         rest), or QEMU is still starting; usbroute keeps its place in the queue and \
         connects when that client leaves. Give usbroute its own monitor: add \
         `-qmp unix:/run/usbroute/{name}.qmp,server=on,wait=off` (`-qmp` may be repeated) \
         and set VM {name}'s `qmp` to it",
        socket = qmp.display(),
        seconds = HELD_AFTER.as_secs_f64(),
    )
}
