//! The QEMU driver: a VM is up when its QMP socket accepts a connection. Each watched VM
//! has its presence task ([`super::presence`]); one inotify watcher per driver
//! ([`super::socket_watch`]) wakes the task of a VM whose socket appears, and is re-armed
//! whenever the set of sockets changes or a retry is asked for.

use super::connector::{self, VmConnector};
use super::presence::{self, SLOW_RETRY};
use super::socket_watch::{SocketAppeared, SocketWatcher, WatchError};
use crate::backend::driver::Retry;
use crate::backend::{AttachMode, BackendError, PresenceStream, VmDriver, VmTarget};
use crate::sysfs::SysfsRoot;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::mpsc;

/// Drives QEMU VMs over QMP.
pub struct QemuDriver {
    connector: Arc<dyn VmConnector>,
    slow_retry: Duration,
    book: Arc<SocketBook>,
}

/// The QEMU driver; device nodes are opened under `root` (for fd passing).
pub fn driver(root: SysfsRoot) -> Arc<dyn VmDriver> {
    Arc::new(QemuDriver::with_connector(
        connector::qemu(root),
        SLOW_RETRY,
    ))
}

impl QemuDriver {
    /// A driver reaching VMs through `connector`, trying a VM that is down every
    /// `slow_retry` (the backstop for inotify; [`SLOW_RETRY`] in the daemon).
    pub fn with_connector(connector: Arc<dyn VmConnector>, slow_retry: Duration) -> Self {
        QemuDriver {
            connector,
            slow_retry,
            book: Arc::default(),
        }
    }
}

impl VmDriver for QemuDriver {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn modes(&self) -> BTreeSet<AttachMode> {
        [AttachMode::Address, AttachMode::Port, AttachMode::Id].into()
    }

    fn watch(&self, vm: &str, target: &VmTarget) -> Result<PresenceStream, BackendError> {
        let VmTarget::Qemu { qmp } = target else {
            return Err(BackendError::Refused {
                vm: vm.to_string(),
                reason: format!(
                    "the QEMU driver cannot reach {target}; give the VM `qmp = \"...\"`"
                ),
            });
        };
        let (report, events) = mpsc::unbounded_channel();
        let (wake, wakes) = mpsc::unbounded_channel();
        // The watcher wakes the task once its socket is watched: the VM may be running
        // already, and a socket that appears after that try is seen.
        let registration = SocketBook::register(&self.book, vm, qmp, wake);
        let id = registration.id;
        let task = presence::watch_vm(
            vm.to_string(),
            qmp.clone(),
            self.connector.clone(),
            wakes,
            report,
            self.slow_retry,
        );
        tokio::spawn(async move {
            // Leaves the book when the task ends (its stream was dropped).
            let _registration = registration;
            task.await;
        });
        let book = self.book.clone();
        // A retry re-arms the watcher first: a socket that appeared while a watch was
        // lost made no event.
        let retry: Retry = Arc::new(move || book.retry(id));
        Ok(PresenceStream::new(events, retry))
    }
}

/// The sockets of the VMs watched, shared by their presence tasks and the watcher.
#[derive(Default)]
struct SocketBook {
    next_id: AtomicU64,
    sockets: Mutex<BTreeMap<u64, Watched>>,
    /// Tells the watcher task to re-arm; `None` until the first VM is watched.
    rearm: Mutex<Option<mpsc::UnboundedSender<()>>>,
}

struct Watched {
    vm: String,
    qmp: PathBuf,
    wake: mpsc::UnboundedSender<()>,
    /// Wake it once the watcher has re-armed (new, or a retry was asked for).
    wake_when_armed: bool,
}

/// A VM's place in the book, given up when dropped.
struct Registration {
    book: Arc<SocketBook>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.book.lock().remove(&self.id);
        self.book.rearm();
    }
}

impl SocketBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Watched>> {
        // A panic elsewhere cannot leave the map half-written: keep using it.
        self.sockets.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(
        book: &Arc<SocketBook>,
        vm: &str,
        qmp: &std::path::Path,
        wake: mpsc::UnboundedSender<()>,
    ) -> Registration {
        let id = book.next_id.fetch_add(1, Ordering::Relaxed);
        let watched = Watched {
            vm: vm.to_string(),
            qmp: qmp.to_path_buf(),
            wake,
            wake_when_armed: true,
        };
        book.lock().insert(id, watched);
        let mut rearm = book.rearm.lock().unwrap_or_else(|e| e.into_inner());
        if rearm.is_none() {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(watch_sockets(Arc::downgrade(book), rx));
            *rearm = Some(tx);
        }
        drop(rearm);
        book.rearm();
        Registration {
            book: book.clone(),
            id,
        }
    }

    /// Ask the watcher to watch the sockets in the book as they are now.
    fn rearm(&self) {
        let rearm = self.rearm.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = rearm.as_ref() {
            let _ = tx.send(());
        }
    }

    /// Try VM `id` now, after re-arming the watcher.
    fn retry(&self, id: u64) {
        if let Some(w) = self.lock().get_mut(&id) {
            w.wake_when_armed = true;
        }
        self.rearm();
    }

    /// The watcher has armed on the sockets as they were: wake those waiting for it.
    fn armed(&self) {
        for w in self.lock().values_mut().filter(|w| w.wake_when_armed) {
            w.wake_when_armed = false;
            let _ = w.wake.send(());
        }
    }

    fn sockets(&self) -> Vec<(String, PathBuf)> {
        self.lock()
            .values()
            .map(|w| (w.vm.clone(), w.qmp.clone()))
            .collect()
    }

    fn appeared(&self, seen: &SocketAppeared) {
        for w in self.lock().values().filter(|w| w.qmp == seen.path) {
            tracing::info!(vm = %w.vm, socket = %w.qmp.display(), "QMP socket appeared");
            let _ = w.wake.send(());
        }
    }
}

/// The driver's one inotify watcher: re-armed on request (requests that pile up are one),
/// it wakes the VM whose socket appeared, and after each arming the VMs waiting for it.
/// Ends with the book.
async fn watch_sockets(book: Weak<SocketBook>, mut rearm: mpsc::UnboundedReceiver<()>) {
    let mut watcher: Option<SocketWatcher> = None;
    loop {
        tokio::select! {
            asked = rearm.recv() => {
                if asked.is_none() {
                    return;
                }
                while rearm.try_recv().is_ok() {}
                let Some(book) = book.upgrade() else {
                    return;
                };
                watcher = arm(book.sockets());
                // Also when arming failed: the slow retry is then all there is.
                book.armed();
            }
            seen = next_appeared(&mut watcher) => match seen {
                Ok(seen) => match book.upgrade() {
                    Some(book) => book.appeared(&seen),
                    None => return,
                },
                Err(e) => {
                    tracing::error!(
                        "VM sockets will only be retried on a timer: {}",
                        crate::error_chain::one_line(&e)
                    );
                    watcher = None;
                }
            },
        }
    }
}

fn arm(sockets: Vec<(String, PathBuf)>) -> Option<SocketWatcher> {
    if sockets.is_empty() {
        return None;
    }
    match SocketWatcher::new(sockets) {
        Ok(watcher) => Some(watcher),
        Err(e) => {
            tracing::error!(
                "VM sockets will only be retried on a timer: {}",
                crate::error_chain::one_line(&e)
            );
            None
        }
    }
}

async fn next_appeared(watcher: &mut Option<SocketWatcher>) -> Result<SocketAppeared, WatchError> {
    match watcher {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fake::FakeHost;
    use crate::backend::{BoxFuture, PresenceEvent, VmConnection};
    use std::path::Path;
    use std::sync::atomic::AtomicU32;

    /// Every connection succeeds; with `drop_at_once` it drops at once: a VM whose
    /// monitor goes away while its socket stays (and no inotify event says it is back).
    struct Connects {
        calls: AtomicU32,
        drop_at_once: bool,
    }

    impl Connects {
        fn new(drop_at_once: bool) -> Arc<Self> {
            Arc::new(Connects {
                calls: AtomicU32::new(0),
                drop_at_once,
            })
        }
    }

    impl VmConnector for Connects {
        fn connect<'a>(
            &'a self,
            _: &'a str,
            _: &'a Path,
        ) -> BoxFuture<'a, Result<VmConnection, BackendError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let closed: BoxFuture<'static, ()> = if self.drop_at_once {
                Box::pin(async {})
            } else {
                Box::pin(std::future::pending())
            };
            Box::pin(async { Ok(fake_connection(closed)) })
        }
    }

    /// A connection to a fake VM that ends when `closed` does.
    fn fake_connection(closed: BoxFuture<'static, ()>) -> VmConnection {
        VmConnection {
            backend: FakeHost::new().start("vm"),
            closed,
        }
    }

    /// A fake for a monitor another client holds (QEMU takes the connection and says
    /// nothing until that client leaves): every connection waits until [`Self::leave`].
    #[derive(Default)]
    struct HeldMonitor {
        calls: AtomicU32,
        left: tokio::sync::Notify,
    }

    impl HeldMonitor {
        /// The other client leaves: QEMU greets the connection waiting in its queue.
        fn leave(&self) {
            self.left.notify_one();
        }
    }

    impl VmConnector for HeldMonitor {
        fn connect<'a>(
            &'a self,
            _: &'a str,
            _: &'a Path,
        ) -> BoxFuture<'a, Result<VmConnection, BackendError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async {
                self.left.notified().await;
                Ok(fake_connection(Box::pin(std::future::pending())))
            })
        }
    }

    /// A slow retry that never comes within a test.
    const HOUR: Duration = Duration::from_secs(3600);

    fn qemu_target(qmp: &Path) -> VmTarget {
        VmTarget::Qemu {
            qmp: qmp.to_path_buf(),
        }
    }

    /// A driver over `connector` watching VM `vm` at a socket file that exists.
    fn watching(
        connector: Arc<Connects>,
        slow_retry: Duration,
    ) -> (tempfile::NamedTempFile, QemuDriver, PresenceStream) {
        let socket = tempfile::NamedTempFile::new().unwrap();
        let driver = QemuDriver::with_connector(connector, slow_retry);
        let stream = driver.watch("vm", &qemu_target(socket.path())).unwrap();
        (socket, driver, stream)
    }

    /// The VM came up and went (a connector that drops at once).
    async fn up_then_gone(stream: &mut PresenceStream) {
        assert!(matches!(stream.next().await, Some(PresenceEvent::Up(_))));
        let gone = stream.next().await;
        assert!(matches!(gone, Some(PresenceEvent::Gone { .. })));
    }

    /// Wait (up to 10 s) until `done` holds, checking every few milliseconds.
    async fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    // Paused time: the 50 ms slow retry passes at once, and cannot flake.
    #[tokio::test(start_paused = true)]
    async fn a_vm_gone_without_a_wake_up_is_tried_again_on_the_slow_retry() {
        let connector = Connects::new(true);
        let (_socket, _driver, mut stream) = watching(connector.clone(), Duration::from_millis(50));

        let mut ups = 0;
        let seen = tokio::time::timeout(Duration::from_secs(10), async {
            while ups < 2 {
                if let Some(PresenceEvent::Up(_)) = stream.next().await {
                    ups += 1;
                }
            }
        })
        .await;

        assert!(seen.is_ok(), "the VM was not tried again after it went");
        assert!(connector.calls.load(Ordering::SeqCst) >= 2);
    }

    // Paused time: the 5 s until a silent connection counts as held pass at once.
    #[tokio::test(start_paused = true)]
    async fn a_held_monitor_is_reported_once_and_the_vm_comes_up_when_the_other_client_leaves() {
        let connector = Arc::new(HeldMonitor::default());
        let socket = tempfile::NamedTempFile::new().unwrap();
        let driver = QemuDriver::with_connector(connector.clone(), HOUR);
        let mut stream = driver.watch("win11", &qemu_target(socket.path())).unwrap();

        let held = tokio::time::timeout(Duration::from_secs(60), stream.next()).await;
        connector.leave();
        let up = tokio::time::timeout(Duration::from_secs(60), stream.next()).await;

        let Ok(Some(PresenceEvent::Held(Some(reason)))) = held else {
            panic!("the VM was not reported held")
        };
        assert!(
            reason.contains("probably held by another client"),
            "{reason}"
        );
        assert!(
            reason.contains("`-qmp unix:/run/usbroute/win11.qmp,server=on,wait=off`"),
            "{reason}"
        );
        assert!(matches!(up, Ok(Some(PresenceEvent::Up(_)))));
        // It kept its place in QEMU's queue: one connection, no retries meanwhile.
        assert_eq!(connector.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_socket_appearing_wakes_its_vm_long_before_the_slow_retry() {
        let dir = tempfile::tempdir().unwrap();
        let qmp = dir.path().join("vm.qmp");
        std::fs::write(&qmp, b"").unwrap();
        let driver = QemuDriver::with_connector(Connects::new(true), HOUR);
        let mut stream = driver.watch("vm", &qemu_target(&qmp)).unwrap();
        // Up once the watcher armed, then gone at once: from here only a wake-up (the
        // socket appearing) or the slow retry an hour away tries the VM again.
        up_then_gone(&mut stream).await;

        std::fs::remove_file(&qmp).unwrap();
        std::fs::write(&qmp, b"").unwrap();
        let event = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;

        let event = event.expect("the VM was not tried when its socket appeared");
        assert!(matches!(event, Some(PresenceEvent::Up(_))));
    }

    #[tokio::test]
    async fn a_vm_whose_connection_drops_is_reported_gone_with_the_reason() {
        let (_socket, _driver, mut stream) = watching(Connects::new(true), HOUR);

        let up = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
        let gone = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;

        assert!(matches!(up.unwrap(), Some(PresenceEvent::Up(_))));
        match gone.unwrap() {
            Some(PresenceEvent::Gone { reason }) => assert_eq!(reason, "QMP connection closed"),
            _ => panic!("expected the VM gone"),
        }
    }

    #[tokio::test]
    async fn dropping_a_stream_stops_watching_its_vm() {
        let dir = tempfile::tempdir().unwrap();
        let driver = QemuDriver::with_connector(Connects::new(false), HOUR);
        let kept = driver
            .watch("a", &qemu_target(&dir.path().join("a.qmp")))
            .unwrap();
        let dropped = driver
            .watch("b", &qemu_target(&dir.path().join("b.qmp")))
            .unwrap();
        assert_eq!(driver.book.lock().len(), 2);

        drop(dropped);

        wait_until("b left the book", || driver.book.lock().len() == 1).await;
        let left: Vec<String> = driver
            .book
            .sockets()
            .into_iter()
            .map(|(vm, _)| vm)
            .collect();
        assert_eq!(left, ["a"]);
        drop(kept);
    }

    #[tokio::test]
    async fn a_retry_tries_a_down_vm_at_once() {
        let connector = Connects::new(true);
        let (_socket, _driver, mut stream) = watching(connector.clone(), HOUR);
        up_then_gone(&mut stream).await;

        (stream.retrier())();
        let again = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;

        assert!(matches!(
            again.expect("tried again"),
            Some(PresenceEvent::Up(_))
        ));
        assert_eq!(connector.calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_xen_target_is_not_the_qemu_drivers() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _in_runtime = rt.enter();
        let driver = QemuDriver::with_connector(Connects::new(false), SLOW_RETRY);
        let xen = VmTarget::Xen { domain: "d".into() };

        let refused = driver.watch("d", &xen).err().map(|e| e.to_string());

        assert_eq!(
            refused.as_deref(),
            Some("VM d: the QEMU driver cannot reach xen domain d; give the VM `qmp = \"...\"`")
        );
    }
}
