//! Intel PCH USB 2.0 port routing (XUSB2PR) between xHCI and EHCI.

use crate::inventory::PciAddress;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
}
