//! The VM backend traits: what the engine needs from a hypervisor. Small on purpose:
//! list, attach, detach ([`VmBackend`]), and a driver that says what it can attach by and
//! reports a VM's presence ([`driver::VmDriver`]). One sub-folder per hypervisor
//! ([`qemu`] today; Xen and libvirt later beside it): a new hypervisor is a new folder
//! here plus one line of registration in [`driver::drivers`].

pub mod driver;
pub mod qemu;

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
    /// Detach by device id; returns only after the VM confirmed removal.
    fn detach<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), BackendError>>;
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

/// What one usb-host device of ours is keyed on: the attach mode and its key. Its id is
/// derived from this alone, so a restarted daemon recomputes the same id, and the inverse
/// ([`AttachKey::from_id`]) lets a listing tell our devices from the user's.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AttachKey {
    /// `usbroute-addr-B-D`: one plug of one device.
    Address {
        /// Host bus.
        bus: u8,
        /// Host device address.
        address: u16,
    },
    /// `usbroute-port-1-3.4.2`: a physical port.
    Port(PortPath),
    /// `usbroute-id-vvvv-pppp`: a kind of device.
    Id {
        /// Vendor id.
        vendor_id: HexId,
        /// Product id.
        product_id: HexId,
    },
}

/// Every id usbroute gives a device starts with this (QEMU ids must start with a letter).
pub const OUR_ID_PREFIX: &str = "usbroute-";

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

    /// The device id: `usbroute-addr-1-5`, `usbroute-port-1-3.4.2`, `usbroute-id-046d-c016`
    /// (a letter first, then only `[A-Za-z0-9._-]`, as QEMU requires).
    pub fn to_id(&self) -> String {
        match self {
            AttachKey::Address { bus, address } => format!("{OUR_ID_PREFIX}addr-{bus}-{address}"),
            AttachKey::Port(port) => format!("{OUR_ID_PREFIX}port-{port}"),
            AttachKey::Id {
                vendor_id,
                product_id,
            } => format!("{OUR_ID_PREFIX}id-{vendor_id}-{product_id}"),
        }
    }

    /// The key an id of ours stands for; `None` for anyone else's id.
    pub fn from_id(id: &str) -> Option<AttachKey> {
        let rest = id.strip_prefix(OUR_ID_PREFIX)?;
        let (kind, key) = rest.split_once('-')?;
        let canonical = |k: AttachKey| (k.to_id() == id).then_some(k);
        match kind {
            "addr" => {
                let (bus, address) = key.split_once('-')?;
                canonical(AttachKey::Address {
                    bus: bus.parse().ok()?,
                    address: address.parse().ok()?,
                })
            }
            "port" => canonical(AttachKey::Port(key.parse().ok()?)),
            "id" => {
                let (v, p) = key.split_once('-')?;
                canonical(AttachKey::Id {
                    vendor_id: v.parse().ok()?,
                    product_id: p.parse().ok()?,
                })
            }
            _ => None,
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

/// The id usbroute gives `device` attached by `mode` (see [`AttachKey::to_id`]).
pub fn usbroute_device_id(mode: AttachMode, device: &Device) -> Option<String> {
    AttachKey::of(mode, device).map(|k| k.to_id())
}
