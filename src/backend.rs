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

/// Every device id usbroute gives a VM starts with this; ids without it are the user's.
pub const DEVICE_ID_PREFIX: &str = "usbroute-";

impl HostMatch {
    /// What a VM device attached `mode`-wise to `device` matches on; `None` when the
    /// device lacks what that mode needs (its address or ids could not be read).
    pub fn for_device(mode: AttachMode, device: &Device) -> Option<HostMatch> {
        Some(match mode {
            AttachMode::Address => HostMatch::Address {
                bus: device.bus,
                address: device.address?,
            },
            AttachMode::Port => HostMatch::Port {
                bus: device.port.bus,
                port: device.port.chain(),
            },
            AttachMode::Id => HostMatch::Id {
                vendor_id: device.vendor_id?,
                product_id: device.product_id?,
            },
        })
    }

    /// The mode this match stands for (`None` for [`HostMatch::Other`]).
    pub fn mode(&self) -> Option<AttachMode> {
        match self {
            HostMatch::Address { .. } => Some(AttachMode::Address),
            HostMatch::Port { .. } => Some(AttachMode::Port),
            HostMatch::Id { .. } => Some(AttachMode::Id),
            HostMatch::Other {} => None,
        }
    }

    /// The deterministic device id usbroute gives a VM device with this match:
    /// `usbroute-addr-3-5` (bus 3, address 5), `usbroute-port-1-3.4.2` (the kernel's name of
    /// the port), `usbroute-id-046d-c016`. Valid as a QEMU id (a letter first, then letters,
    /// digits, `-`, `.`); [`HostMatch::from_device_id`] reads it back. `None` for `Other`.
    pub fn device_id(&self) -> Option<String> {
        Some(match self {
            HostMatch::Address { bus, address } => {
                format!("{DEVICE_ID_PREFIX}addr-{bus}-{address}")
            }
            HostMatch::Port { bus, port } => format!("{DEVICE_ID_PREFIX}port-{bus}-{port}"),
            HostMatch::Id {
                vendor_id,
                product_id,
            } => format!("{DEVICE_ID_PREFIX}id-{vendor_id}-{product_id}"),
            HostMatch::Other {} => return None,
        })
    }

    /// The match an id made by [`HostMatch::device_id`] stands for; `None` for any other id
    /// (the user's own devices).
    pub fn from_device_id(id: &str) -> Option<HostMatch> {
        let rest = id.strip_prefix(DEVICE_ID_PREFIX)?;
        let (kind, value) = rest.split_once('-')?;
        let parsed = match kind {
            "addr" => {
                let (bus, address) = value.split_once('-')?;
                HostMatch::Address {
                    bus: canonical_decimal(bus)?,
                    address: canonical_decimal(address)?,
                }
            }
            "port" => {
                let port: crate::inventory::PortPath = value.parse().ok()?;
                HostMatch::Port {
                    bus: port.bus,
                    port: port.chain(),
                }
            }
            "id" => {
                let (vendor, product) = value.split_once('-')?;
                HostMatch::Id {
                    vendor_id: canonical_hex(vendor)?,
                    product_id: canonical_hex(product)?,
                }
            }
            _ => return None,
        };
        // Only the exact spelling we produce counts as ours (`usbroute-addr-03-5` is not).
        (parsed.device_id().as_deref() == Some(id)).then_some(parsed)
    }
}

fn canonical_decimal<T: std::str::FromStr>(s: &str) -> Option<T> {
    s.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| s.parse().ok())?
}

fn canonical_hex(s: &str) -> Option<HexId> {
    (s.len() == 4 && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| s.parse().ok())?
}

/// The device id usbroute gives `device` attached `mode`-wise (see
/// [`HostMatch::device_id`]). The same device and mode give the same id on every run, so
/// a restarted daemon finds what it attached before. `None` when the device lacks what the
/// mode needs (an unreadable address or ids).
pub fn device_id(mode: AttachMode, device: &Device) -> Option<String> {
    HostMatch::for_device(mode, device)?.device_id()
}

/// The inverse of [`device_id`]: what an id of ours matches on, `None` for ids that are
/// not ours.
pub fn parse_device_id(id: &str) -> Option<HostMatch> {
    HostMatch::from_device_id(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_of_each_match_reads_back() {
        let matches = [
            HostMatch::Address {
                bus: 3,
                address: 17,
            },
            HostMatch::Port {
                bus: 1,
                port: "3.4.2".into(),
            },
            HostMatch::Id {
                vendor_id: HexId(0x046d),
                product_id: HexId(0xc016),
            },
        ];

        let ids: Vec<String> = matches.iter().map(|m| m.device_id().unwrap()).collect();

        assert_eq!(
            ids,
            [
                "usbroute-addr-3-17",
                "usbroute-port-1-3.4.2",
                "usbroute-id-046d-c016"
            ]
        );
        let back: Vec<HostMatch> = ids.iter().map(|i| parse_device_id(i).unwrap()).collect();
        assert_eq!(back, matches);
    }

    #[test]
    fn parse_device_id_of_user_ids_is_none() {
        let ids = [
            "hostdev0",
            "usbroute-",
            "usbroute-addr-03-5",
            "usbroute-id-46d-c016",
            "usbroute-port-1-0",
            "usbroute-other-1",
        ];

        let parsed: Vec<Option<HostMatch>> = ids.iter().map(|i| parse_device_id(i)).collect();

        assert!(parsed.iter().all(Option::is_none), "{parsed:?}");
    }
}
