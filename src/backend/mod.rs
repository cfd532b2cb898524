//! The VM backend traits: what the engine needs from a hypervisor. Small on purpose:
//! list, attach, detach ([`VmBackend`]), and a driver that says what it can attach by and
//! reports a VM's presence ([`driver::VmDriver`]). One sub-folder per hypervisor
//! ([`qemu`], [`libvirt`], [`xen`]): a new hypervisor is a new folder here plus one line of registration in
//! [`driver::drivers`].

pub mod driver;
pub mod libvirt;
pub mod qemu;
pub mod reconnect;
pub mod xen;

/// The fake VM the tests above the backends run on (see the module); not a backend.
#[doc(hidden)]
pub mod fake;
pub use driver::{drivers, Capabilities, Drivers, PresenceEvent, PresenceStream, VmDriver};

use crate::inventory::{Device, HexId, PortPath};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A boxed future, so backends can be used as `dyn VmBackend`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How a usb-host device in the VM finds its host device.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
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

impl AttachMode {
    /// Its name in the config and on the command line (`by = "port"`).
    pub fn name(self) -> &'static str {
        match self {
            AttachMode::Address => "address",
            AttachMode::Port => "port",
            AttachMode::Id => "id",
        }
    }
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmUsbDevice {
    /// The hypervisor's own handle for it (QEMU: its device `id`), for display and for
    /// the user's own devices; the engine goes by [`Self::key`].
    pub id: String,
    /// `true` when the host device is really connected to the guest now.
    pub attached: bool,
    /// What usbroute attached it for, when it is one of ours; `None`: the user's own
    /// device, which usbroute leaves alone. The backend reads it back from its own handle
    /// (QEMU: from the id, see `qemu::ids`), so a restarted daemon knows its devices.
    pub key: Option<AttachKey>,
    /// What it matches on.
    pub matcher: HostMatch,
}

impl VmUsbDevice {
    /// Is it one of ours (attached by usbroute)?
    pub fn is_ours(&self) -> bool {
        self.key.is_some()
    }
}

/// The JSON form `vm devices --json` prints: `id`, `attached`, `ours` and the match
/// fields (a contract; the key itself is the id's business).
impl Serialize for VmUsbDevice {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Shown<'a> {
            id: &'a str,
            attached: bool,
            ours: bool,
            #[serde(flatten)]
            matcher: &'a HostMatch,
        }
        Shown {
            id: &self.id,
            attached: self.attached,
            ours: self.is_ours(),
            matcher: &self.matcher,
        }
        .serialize(serializer)
    }
}

/// Something a backend could not do; always names the VM.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The VM cannot be reached (socket gone, connection refused, closed mid-command).
    #[error("VM {vm}: not reachable")]
    Unreachable {
        /// VM name.
        vm: String,
        /// What happened: the hypervisor connection's own error (QEMU: a `QmpError`),
        /// kept whole so its chain is printed once.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
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
    /// Detach our device attached for `key`; returns only after the VM confirmed removal.
    /// (The user's own devices are no business of the engine's.)
    fn detach<'a>(&'a self, key: &'a AttachKey) -> BoxFuture<'a, Result<(), BackendError>>;
    /// The backend's own handle for our device attached for `key` (QEMU: its device id),
    /// as its listing reports it in [`VmUsbDevice::id`]; for status and logs.
    fn device_id(&self, key: &AttachKey) -> String;
}

/// Which hypervisor runs a VM and how to reach it: what a `[[vm]]` entry names. The
/// engine and the plan never look inside; the daemon hands it to the matching driver.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum VmTarget {
    /// A QEMU reached over its QMP socket (`qmp = "..."`).
    Qemu {
        /// The QMP socket.
        qmp: std::path::PathBuf,
    },
    /// A Xen domain (`xen = "domain"`), driven through `xl`.
    Xen {
        /// The domain's name.
        domain: String,
    },
    /// A libvirt domain (`libvirt = "domain"`, with `uri`).
    Libvirt {
        /// The domain's name.
        domain: String,
        /// The connection URI (`qemu:///system` when absent).
        uri: Option<String>,
    },
}

impl VmTarget {
    /// The kind of hypervisor (`qemu`, `xen`, `libvirt`): the name of the driver that
    /// serves it (see [`driver::Drivers::for_target`]).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Qemu { .. } => "qemu",
            Self::Xen { .. } => "xen",
            Self::Libvirt { .. } => "libvirt",
        }
    }

    /// This build has a driver for it (the daemon manages the VM); a config may name
    /// the others already, and `usbroute check` warns about them. Asks the registry,
    /// [`driver::drivers`].
    pub fn is_built(&self) -> bool {
        driver::drivers(crate::sysfs::SysfsRoot::default())
            .for_target(self)
            .is_some()
    }
}

impl std::fmt::Display for VmTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmTarget::Qemu { qmp } => write!(f, "{}", qmp.display()),
            VmTarget::Xen { domain } => write!(f, "xen domain {domain}"),
            VmTarget::Libvirt { domain, uri } => write!(
                f,
                "libvirt domain {domain} at {}",
                uri.as_deref().unwrap_or("qemu:///system")
            ),
        }
    }
}

/// A live connection to a VM, as a driver holds it.
pub struct VmConnection {
    /// The backend on that connection.
    pub backend: Arc<dyn VmBackend>,
    /// Resolves when the connection drops (the VM stopped or closed its socket).
    pub closed: BoxFuture<'static, ()>,
}

/// What one usb-host device of ours is keyed on: the attach mode and its key. The engine
/// knows our devices by this alone; each backend maps it to its own handle and back
/// (QEMU: a device id, `backend::qemu::ids`), so a restarted daemon recognises its
/// devices from a listing.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachKey {
    /// One plug of one device: bus and device address.
    Address {
        /// Host bus.
        bus: u8,
        /// Host device address.
        address: u16,
    },
    /// A physical port.
    Port(PortPath),
    /// A kind of device: vendor and product id.
    Id {
        /// Vendor id.
        vendor_id: HexId,
        /// Product id.
        product_id: HexId,
    },
}

impl AttachKey {
    /// The key of `device` under `mode`; `None` when the device lacks it (unknown address
    /// or ids): such a device cannot be attached that way.
    pub fn of(mode: AttachMode, device: &Device) -> Option<AttachKey> {
        match mode {
            AttachMode::Address => device.address.map(|address| AttachKey::Address {
                bus: device.bus,
                address,
            }),
            AttachMode::Port => Some(AttachKey::Port(device.port.clone())),
            AttachMode::Id => Some(AttachKey::Id {
                vendor_id: device.vendor_id?,
                product_id: device.product_id?,
            }),
        }
    }

    /// The attach mode this key belongs to.
    pub fn mode(&self) -> AttachMode {
        match self {
            AttachKey::Address { .. } => AttachMode::Address,
            AttachKey::Port(_) => AttachMode::Port,
            AttachKey::Id { .. } => AttachMode::Id,
        }
    }

    /// What a usb-host device made for this key matches on (as a listing reads it back).
    pub fn host_match(&self) -> HostMatch {
        match self {
            AttachKey::Address { bus, address } => HostMatch::Address {
                bus: *bus,
                address: *address,
            },
            AttachKey::Port(port) => HostMatch::Port {
                bus: port.bus,
                port: port.chain(),
            },
            AttachKey::Id {
                vendor_id,
                product_id,
            } => HostMatch::Id {
                vendor_id: *vendor_id,
                product_id: *product_id,
            },
        }
    }

    /// Could a usb-host device with this key be holding `device`? (A kind key may hold any
    /// device of that kind.)
    pub fn refers_to(&self, device: &Device) -> bool {
        match self {
            AttachKey::Address { bus, address } => {
                device.bus == *bus && device.address == Some(*address)
            }
            AttachKey::Port(port) => device.port == *port,
            AttachKey::Id {
                vendor_id,
                product_id,
            } => device.vendor_id == Some(*vendor_id) && device.product_id == Some(*product_id),
        }
    }
}
