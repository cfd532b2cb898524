//! One task per VM: connects to it, carries out its actions one by one, reads back what it
//! has, and notices the connection dropping. A hung VM stalls only its own task.

use super::actions::Action;
use crate::backend::{BackendError, BoxFuture, VmBackend, VmUsbDevice};
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

/// What the daemon loop tells a VM task.
#[derive(Debug)]
pub enum ToVm {
    /// Its socket appeared (or the daemon started): try to connect now.
    TryConnect,
    /// Carry these out in order, then report what the VM has.
    Apply(Vec<Action>),
}

/// What a VM task tells the daemon loop.
#[derive(Debug)]
pub enum FromVm {
    /// Connected, and this is what it has.
    Up {
        /// VM name.
        vm: String,
        /// Its usb-host devices.
        devices: Vec<VmUsbDevice>,
    },
    /// Not reachable (never was, or the connection dropped).
    Down {
        /// VM name.
        vm: String,
        /// Why.
        reason: String,
    },
    /// One action's outcome.
    Done {
        /// VM name.
        vm: String,
        /// The action (boxed: it may carry a whole device).
        action: Box<Action>,
        /// `Err` carries the backend's words.
        result: Result<(), String>,
    },
    /// After an `Apply`: what the VM has now (`None` if listing failed).
    Listed {
        /// VM name.
        vm: String,
        /// Its usb-host devices, `None` when they could not be read.
        devices: Option<Vec<VmUsbDevice>>,
    },
}

/// Connection attempts right after a socket appears: QEMU creates the file at bind(),
/// a moment before listen(), so the first connect can be refused.
const CONNECT_ATTEMPTS: u32 = 20;
const CONNECT_PAUSE: Duration = Duration::from_millis(25);

/// Start the task of VM `name`; returns where to send it commands.
pub fn spawn(
    name: String,
    qmp: PathBuf,
    connector: Arc<dyn VmConnector>,
    report: mpsc::UnboundedSender<FromVm>,
) -> mpsc::UnboundedSender<ToVm> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run(name, qmp, connector, rx, report));
    tx
}

async fn run(
    name: String,
    qmp: PathBuf,
    connector: Arc<dyn VmConnector>,
    mut commands: mpsc::UnboundedReceiver<ToVm>,
    report: mpsc::UnboundedSender<FromVm>,
) {
    loop {
        // Disconnected: wait for a reason to try.
        match commands.recv().await {
            None => return,
            Some(ToVm::Apply(_)) => continue,
            Some(ToVm::TryConnect) => {}
        }
        let link = match connect(&name, &qmp, connector.as_ref()).await {
            Ok(link) => link,
            Err(reason) => {
                let _ = report.send(FromVm::Down {
                    vm: name.clone(),
                    reason,
                });
                continue;
            }
        };
        let VmLink { backend, closed } = link;
        match backend.list().await {
            Ok(devices) => {
                tracing::info!(vm = %name, socket = %qmp.display(), devices = devices.len(), "VM up");
                let _ = report.send(FromVm::Up {
                    vm: name.clone(),
                    devices,
                });
            }
            Err(e) => {
                let _ = report.send(FromVm::Down {
                    vm: name.clone(),
                    reason: e.to_string(),
                });
                continue;
            }
        }
        let reason = serve_connected(&name, backend.as_ref(), closed, &mut commands, &report).await;
        let Some(reason) = reason else { return };
        tracing::info!(vm = %name, "VM down: {reason}");
        let _ = report.send(FromVm::Down {
            vm: name.clone(),
            reason,
        });
    }
}

/// Work while connected; returns why the connection ended, `None` when the daemon stopped.
async fn serve_connected(
    name: &str,
    backend: &dyn VmBackend,
    mut closed: BoxFuture<'static, ()>,
    commands: &mut mpsc::UnboundedReceiver<ToVm>,
    report: &mpsc::UnboundedSender<FromVm>,
) -> Option<String> {
    loop {
        let command = tokio::select! {
            _ = &mut closed => return Some("QMP connection closed".into()),
            c = commands.recv() => c?,
        };
        let ToVm::Apply(actions) = command else {
            continue;
        };
        let mut lost = None;
        for action in actions {
            let result = perform(name, backend, &action).await;
            if let Err(BackendError::Unreachable { reason, .. }) = &result {
                lost = Some(reason.clone());
            }
            let result = result.map_err(|e| e.to_string());
            let _ = report.send(FromVm::Done {
                vm: name.to_string(),
                action: Box::new(action),
                result,
            });
            if lost.is_some() {
                break;
            }
        }
        let devices = backend.list().await.ok();
        let _ = report.send(FromVm::Listed {
            vm: name.to_string(),
            devices,
        });
        if let Some(reason) = lost {
            return Some(reason);
        }
    }
}

async fn perform(name: &str, backend: &dyn VmBackend, action: &Action) -> Result<(), BackendError> {
    match action {
        Action::Attach { device, mode } => {
            tracing::info!(vm = %name, device = %device.port, "attaching {} by {mode:?}", device.label());
            backend.attach(device, *mode).await.map(|held| {
                tracing::info!(vm = %name, device = %device.port, id = %held.id, "attached (confirmed by the VM)");
            })
        }
        Action::Detach { id, reason } => {
            tracing::info!(vm = %name, device = %id, "detaching: {reason}");
            backend.detach(id).await.map(|()| {
                tracing::info!(vm = %name, device = %id, "detached (confirmed by the VM)");
            })
        }
    }
}

async fn connect(name: &str, qmp: &Path, connector: &dyn VmConnector) -> Result<VmLink, String> {
    let mut last = String::new();
    for _ in 0..CONNECT_ATTEMPTS {
        match connector.connect(name, qmp).await {
            Ok(link) => return Ok(link),
            Err(e) => last = e.to_string(),
        }
        if !qmp.exists() {
            break;
        }
        tokio::time::sleep(CONNECT_PAUSE).await;
    }
    Err(last)
}
