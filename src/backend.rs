//! The VM backend trait: what the engine needs from a hypervisor (QEMU today; Xen and
//! libvirt later beside it). Small on purpose: list, attach, detach.

use crate::inventory::{Device, HexId};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;

/// A boxed future, so backends can be used as `dyn VmBackend`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How a usb-host device in the VM finds its host device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// `hostbus`+`hostaddr`: exact and immediate; one plug of one device.
    #[default]
    Address,
    /// `hostbus`+`hostport`: follows the physical port across re-plug (QEMU rescans).
    Port,
    /// `vendorid`+`productid`: any device of that kind (QEMU rescans).
    Id,
}

/// What a usb-host device in a VM matches on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HostMatch {
    /// By bus and device address.
    Address {
        /// Host bus.
        bus: u8,
        /// Host device address.
        address: u16,
    },
    /// By bus and port chain within the bus (`3.4.2`).
    Port {
        /// Host bus.
        bus: u8,
        /// Port chain within the bus.
        port: String,
    },
    /// By vendor and product id.
    Id {
        /// Vendor id.
        vendor_id: HexId,
        /// Product id.
        product_id: HexId,
    },
    /// Something else (a `hostdevice` path, or properties we do not model).
    Other {},
}

/// One usb-host device a VM has, as read back from the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmUsbDevice {
    /// The hypervisor's device id (QEMU `id`).
    pub id: String,
    /// `true` when the host device is really connected to the guest now.
    pub attached: bool,
    /// `true` when usbroute created it (its id says so).
    pub ours: bool,
    /// What it matches on.
    #[serde(flatten)]
    pub matcher: HostMatch,
}

/// Something a backend could not do; always names the VM.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The VM cannot be reached (socket gone, connection refused, closed mid-command).
    #[error("VM {vm}: not reachable: {reason}")]
    Unreachable {
        /// VM name.
        vm: String,
        /// What happened.
        reason: String,
    },
    /// The hypervisor refused the request.
    #[error("VM {vm}: {reason}")]
    Refused {
        /// VM name.
        vm: String,
        /// The hypervisor's words, and what to do.
        reason: String,
    },
    /// No answer in time.
    #[error("VM {vm}: no answer to {what} within {seconds:.1} s")]
    Timeout {
        /// VM name.
        vm: String,
        /// The request.
        what: String,
        /// How long we waited.
        seconds: f64,
    },
}

/// What the engine needs from a hypervisor.
pub trait VmBackend: Send + Sync {
    /// The VM's name, for messages.
    fn name(&self) -> &str;
    /// Every usb-host device the VM has now, with `attached` read from the VM.
    fn list(&self) -> BoxFuture<'_, Result<Vec<VmUsbDevice>, BackendError>>;
    /// Attach `device` matching by `mode`; returns only after the VM confirmed it.
    fn attach<'a>(
        &'a self,
        device: &'a Device,
        mode: AttachMode,
    ) -> BoxFuture<'a, Result<VmUsbDevice, BackendError>>;
    /// Detach by device id; returns only after the VM confirmed removal.
    fn detach<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), BackendError>>;
}
