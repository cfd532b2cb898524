//! Intel PCH USB 2.0 port routing (XUSB2PR) between xHCI and EHCI.
//!
//! On Intel 7/8/9-series and X99 chipsets every USB 2.0 port can be switched at run
//! time between the xHCI and the EHCI controllers. With the EHCIs given to a VM,
//! flipping a port moves a physical port between host and VM without re-plugging.
//!
//! - [`chipset`]: which chipsets, how many ports, which bit is which EHCI port;
//! - [`config_space`]: positioned reads/writes of the xHCI's sysfs `config` file;
//! - [`detect`]: find the switchable xHCI and its EHCIs under a [`SysfsRoot`];
//! - [`profile`]: pure: a profile from the config → the register values and the moves;
//! - [`router`]: apply a plan (only 0xD0, and 0xD8 when needed), pin runtime PM,
//!   remember the active profile, re-apply it when the kernel rewrote the register;
//! - [`control`]: profiles by name (apply, toggle, which is active): the one type that
//!   owns the router, opened the same way by `usbroute ports` and `usbroute serve`;
//! - [`port_routing`]: that type as the engine's `PortRouting`, so in the daemon the
//!   engine's routing reconciler decides every write;
//! - [`ports`]: one row per port, joined with the inventory;
//! - [`labels`]: the `ports map` wizard's pure core and the label writer.
//!
//! [`SysfsRoot`]: crate::sysfs::SysfsRoot

pub mod chipset;
pub mod config_space;
pub mod control;
pub mod detect;
pub mod labels;
pub mod port_routing;
pub mod ports;
pub mod profile;
pub mod router;

use crate::inventory::PciAddress;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Config `[routing]` (stable interface).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// The xHCI whose XUSB2PR is switched; auto-detected when there is one.
    pub controller: Option<PciAddress>,
    /// The two profiles `toggle` flips between.
    #[serde(default)]
    pub toggle: Vec<String>,
    /// Port labels (`"front-left" = "ehci2:3"`), written by `ports map`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Named profiles.
    #[serde(default)]
    pub profile: BTreeMap<String, ProfileConfig>,
}

/// One `[routing.profile.NAME]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// Raw XUSB2PR value (bit set = port on xHCI), `"0x3fff"`.
    pub mask: Option<String>,
    /// Ports routed to EHCI (labels or `ehciN:P`); every other switchable port goes to xHCI.
    #[serde(default)]
    pub ehci: Vec<String>,
    /// Apply even bits the firmware's XUSB2PRM does not allow (what `--force` does on
    /// the command line; the toggle service never forces a profile without this).
    #[serde(default)]
    pub force: bool,
}

/// Everything that can go wrong while routing ports.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// Reading or writing a host file failed.
    #[error("Cannot {action} {path}")]
    Io {
        /// What was being done (`read`, `write`).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Config space past byte 64 is root-only in sysfs.
    #[error("{path} shows only its first 64 bytes to this user; the routing registers at 0xD0-0xDF need root (run with sudo)")]
    NotRoot {
        /// The `config` file.
        path: PathBuf,
    },
    /// No xHCI with switchable ports was found.
    #[error("No switchable Intel xHCI found: {0}")]
    NoController(String),
    /// The named controller is not an Intel xHCI.
    #[error("{pci} is not an Intel xHCI (vendor {vendor:04x}, device {device:04x}, class {class:06x}): only Intel 7/8/9-series and X99 PCHs can route ports")]
    NotIntelXhci {
        /// The controller.
        pci: PciAddress,
        /// Its vendor id.
        vendor: u16,
        /// Its device id.
        device: u16,
        /// Its class code.
        class: u32,
    },
    /// An Intel xHCI whose chipset is not known to have switchable ports.
    #[error("{pci} is an Intel xHCI 8086:{device:04x}, a chipset usbroute does not know to have switchable ports (known: 1e31, 8c31, 9c31, 8cb1, 9cb1, 8d31); 100-series and later have no EHCI to switch to")]
    UnknownChipset {
        /// The controller.
        pci: PciAddress,
        /// Its device id.
        device: u16,
    },
    /// Several switchable controllers: the user must choose.
    #[error("Several switchable xHCIs ({0}): set `controller` in [routing]")]
    Ambiguous(String),
    /// A profile name that is not in the config.
    #[error("No routing profile `{name}` (configured: {known})")]
    UnknownProfile {
        /// The name asked for.
        name: String,
        /// The configured names, comma separated.
        known: String,
    },
    /// A profile that is malformed.
    #[error("Routing profile `{profile}`: {reason}")]
    BadProfile {
        /// The profile.
        profile: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A plan wants bits XUSB2PRM forbids and `--force` was not given.
    #[error("Routing profile `{profile}` switches port(s) {ports} that the firmware does not allow (XUSB2PRM 0x{prm:04x}); pass --force (or set `force = true` in the profile) if you are sure")]
    Forbidden {
        /// The profile.
        profile: String,
        /// The ports, `ehci1:3, ehci2:1`.
        ports: String,
        /// XUSB2PRM.
        prm: u16,
    },
    /// The register did not hold the written value.
    #[error("Wrote XUSB2PR 0x{wrote:04x} to {pci} but read back 0x{read:04x}: the firmware may have locked routing (XHCC1.ACCTRL)")]
    ReadBack {
        /// The xHCI.
        pci: PciAddress,
        /// What was written.
        wrote: u16,
        /// What was read.
        read: u16,
    },
    /// The `toggle` list is not two profiles.
    #[error("`toggle` in [routing] must name two profiles (it has {0}); or name them: `usbroute ports toggle A B`")]
    ToggleNeedsTwo(usize),
}

impl RoutingError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
