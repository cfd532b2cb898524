//! The QEMU driver's link to a VM: a [`VmConnector`] that opens a QMP connection, wraps
//! it in the QEMU backend, and resolves `closed` when QMP's event stream ends (QEMU exited
//! or closed the monitor). The trait is the seam presence tests fill with fakes.

use super::{QemuBackend, QemuOptions};
use crate::backend::{BackendError, BoxFuture, VmConnection};
use crate::sysfs::SysfsRoot;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::broadcast::error::RecvError;

/// How the QEMU driver reaches a VM over its QMP socket.
pub trait VmConnector: Send + Sync + 'static {
    /// Connect to the VM `name` at its QMP socket `qmp`.
    fn connect<'a>(
        &'a self,
        name: &'a str,
        qmp: &'a Path,
    ) -> BoxFuture<'a, Result<VmConnection, BackendError>>;
}

/// Reaches VMs through QEMU's QMP.
#[derive(Debug, Clone)]
pub struct QemuConnector {
    root: SysfsRoot,
}

/// The QEMU connector; device nodes are opened under `root` (for fd passing).
pub fn qemu(root: SysfsRoot) -> Arc<dyn VmConnector> {
    Arc::new(QemuConnector { root })
}

impl VmConnector for QemuConnector {
    fn connect<'a>(
        &'a self,
        name: &'a str,
        qmp: &'a Path,
    ) -> BoxFuture<'a, Result<VmConnection, BackendError>> {
        Box::pin(async move {
            let options = QemuOptions {
                root: self.root.clone(),
                // A monitor another client holds queues us: keep our place (the presence
                // task reports the wait) and be greeted the moment that client leaves.
                greeting_timeout: None,
                ..QemuOptions::default()
            };
            let backend = QemuBackend::connect_as(name, qmp, options).await?;
            // Its USB buses now, so no attach has to walk QOM for them. A VM that cannot
            // answer this will fail its attaches too; they list again.
            if let Err(e) = backend.learn_buses().await {
                tracing::debug!(
                    vm = name,
                    "listing the USB buses at connect: {}",
                    crate::error_chain::one_line(&e)
                );
            }
            let mut events = backend.qmp().events();
            let closed = Box::pin(async move {
                // Lagging behind is fine here: only the end of the stream matters.
                while !matches!(events.recv().await, Err(RecvError::Closed)) {}
            });
            Ok(VmConnection {
                backend: Arc::new(backend),
                closed,
            })
        })
    }
}
