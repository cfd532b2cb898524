//! VM presence: one task per VM that connects to its QMP socket when told to (start, the
//! socket appearing), reports the VM up with a connected backend, and reports it gone
//! when the connection drops. A socket that exists but refuses is retried with backoff;
//! a VM that is down is tried again every [`SLOW_RETRY`] whatever inotify says, so a
//! missed event (a watch lost with its directory, an inotify queue overflow) delays a
//! VM, never loses it.

use crate::backend::{VmBackend, VmConnection, VmConnector};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

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

/// How often a VM that is down is tried without being woken: the backstop for inotify.
pub const SLOW_RETRY: Duration = Duration::from_secs(30);

/// Start the presence task of VM `name`. Send `()` on the returned channel to make it try
/// now (its socket appeared); drop the sender to stop it.
pub fn spawn(
    name: String,
    qmp: PathBuf,
    connector: Arc<dyn VmConnector>,
    report: mpsc::UnboundedSender<Presence>,
) -> mpsc::UnboundedSender<()> {
    spawn_with_retry(name, qmp, connector, report, SLOW_RETRY)
}

/// [`spawn`] with another period than [`SLOW_RETRY`] for trying a VM that is down.
pub fn spawn_with_retry(
    name: String,
    qmp: PathBuf,
    connector: Arc<dyn VmConnector>,
    report: mpsc::UnboundedSender<Presence>,
    slow_retry: Duration,
) -> mpsc::UnboundedSender<()> {
    let (wake, wakes) = mpsc::unbounded_channel();
    let _ = wake.send(());
    tokio::spawn(watch_vm(name, qmp, connector, wakes, report, slow_retry));
    wake
}

async fn watch_vm(
    name: String,
    qmp: PathBuf,
    connector: Arc<dyn VmConnector>,
    mut wakes: mpsc::UnboundedReceiver<()>,
    report: mpsc::UnboundedSender<Presence>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{AttachMode, BackendError, BoxFuture, VmUsbDevice};
    use crate::inventory::Device;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A VM backend that holds nothing; only its presence matters here.
    struct Idle;

    impl VmBackend for Idle {
        fn name(&self) -> &str {
            "vm"
        }
        fn list(&self) -> BoxFuture<'_, Result<Vec<VmUsbDevice>, BackendError>> {
            Box::pin(async { Ok(vec![]) })
        }
        fn attach<'a>(
            &'a self,
            _: &'a Device,
            _: AttachMode,
        ) -> BoxFuture<'a, Result<VmUsbDevice, BackendError>> {
            Box::pin(async { unreachable!("presence never attaches") })
        }
        fn detach<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
            Box::pin(async { unreachable!("presence never detaches") })
        }
    }

    /// Every connection succeeds and drops at once: a VM whose monitor goes away while
    /// its socket stays (and no inotify event says it is back).
    struct DropsAtOnce(AtomicU32);

    impl VmConnector for DropsAtOnce {
        fn connect<'a>(
            &'a self,
            _: &'a str,
            _: &'a Path,
        ) -> BoxFuture<'a, Result<VmConnection, BackendError>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async {
                Ok(VmConnection {
                    backend: Arc::new(Idle),
                    closed: Box::pin(async {}),
                })
            })
        }
    }

    // Paused time: the 50 ms slow retry passes at once, and cannot flake.
    #[tokio::test(start_paused = true)]
    async fn a_vm_gone_without_a_wake_up_is_tried_again_on_the_slow_retry() {
        let socket = tempfile::NamedTempFile::new().unwrap();
        let connector = Arc::new(DropsAtOnce(AtomicU32::new(0)));
        let (report, mut reports) = mpsc::unbounded_channel();
        let _wake = spawn_with_retry(
            "vm".into(),
            socket.path().to_path_buf(),
            connector.clone(),
            report,
            Duration::from_millis(50),
        );

        let mut ups = 0;
        let seen = tokio::time::timeout(Duration::from_secs(10), async {
            while ups < 2 {
                if let Some(Presence::Up { .. }) = reports.recv().await {
                    ups += 1;
                }
            }
        })
        .await;

        assert!(seen.is_ok(), "the VM was not tried again after it went");
        assert!(connector.0.load(Ordering::SeqCst) >= 2);
    }
}
