//! VM presence: one task per VM that connects to its QMP socket when told to (start, the
//! socket appearing), reports the VM up with a connected backend, and reports it gone
//! when the connection drops. A socket that exists but refuses is retried with backoff.

use crate::backend::{BackendError, BoxFuture, VmBackend};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// A live connection to a VM.
pub struct VmLink {
    /// The backend on that connection.
    pub backend: Arc<dyn VmBackend>,
    /// Resolves when the connection drops (the VM stopped or closed its socket).
    pub closed: BoxFuture<'static, ()>,
}

/// How the daemon reaches a VM (QEMU over QMP today).
pub trait VmConnector: Send + Sync + 'static {
    /// Connect to the VM `name` at its QMP socket `qmp`.
    fn connect<'a>(
        &'a self,
        name: &'a str,
        qmp: &'a Path,
    ) -> BoxFuture<'a, Result<VmLink, BackendError>>;
}

/// A VM came or went.
pub enum Presence {
    /// Its QMP socket accepted a connection.
    Up {
        /// VM name.
        vm: String,
        /// The connected backend.
        backend: Arc<dyn VmBackend>,
    },
    /// The connection dropped: QEMU exited or closed its monitor.
    Gone {
        /// VM name.
        vm: String,
        /// Why, for the log.
        reason: String,
    },
}

/// Connection attempts right after a socket appears: QEMU creates the file at bind(),
/// a moment before listen(), so the first connect can be refused.
const QUICK_ATTEMPTS: u32 = 20;
const QUICK_PAUSE: Duration = Duration::from_millis(25);
/// Retry of a socket that exists but refuses (stale after a crash, or another client
/// holds QEMU's only monitor connection): 250 ms doubling to 30 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(250u64 << failures.saturating_sub(1).min(7)).min(Duration::from_secs(30))
}

/// Start the presence task of VM `name`. Send `()` on the returned channel to make it try
/// now (its socket appeared); drop the sender to stop it.
pub fn spawn(
    name: String,
    qmp: PathBuf,
    connector: Arc<dyn VmConnector>,
    report: mpsc::UnboundedSender<Presence>,
) -> mpsc::UnboundedSender<()> {
    let (wake, wakes) = mpsc::unbounded_channel();
    let _ = wake.send(());
    tokio::spawn(watch_vm(name, qmp, connector, wakes, report));
    wake
}

async fn watch_vm(
    name: String,
    qmp: PathBuf,
    connector: Arc<dyn VmConnector>,
    mut wakes: mpsc::UnboundedReceiver<()>,
    report: mpsc::UnboundedSender<Presence>,
) {
    let mut failures = 0u32;
    loop {
        // Wait for a wake-up, or for the retry of a socket that exists but refused.
        let retry = (failures > 0 && qmp.exists()).then(|| backoff(failures));
        tokio::select! {
            w = wakes.recv() => match w {
                Some(()) => failures = 0,
                None => return,
            },
            () = sleep_opt(retry) => {}
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
        if report
            .send(Presence::Up {
                vm: name.clone(),
                backend: link.backend,
            })
            .is_err()
        {
            return;
        }
        tokio::select! {
            () = link.closed => {}
            // The daemon stopped watching this VM (reload removed it).
            _ = closed_channel(&mut wakes) => return,
        }
        tracing::info!(vm = %name, "VM gone (QMP connection closed)");
        let gone = Presence::Gone {
            vm: name.clone(),
            reason: "QMP connection closed".into(),
        };
        if report.send(gone).is_err() {
            return;
        }
    }
}

/// Resolves when the wake channel's sender is dropped; wake-ups while connected are moot.
async fn closed_channel(wakes: &mut mpsc::UnboundedReceiver<()>) {
    while wakes.recv().await.is_some() {}
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

async fn connect(name: &str, qmp: &Path, connector: &dyn VmConnector) -> Result<VmLink, String> {
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
