//! Following a device through re-enumeration (a rule's `follow = "10s"`), as the plan
//! sees it: plain data. The engine notices that a device a `follow` rule gave a VM left,
//! and that a device appeared on the same physical port within the window; it binds that
//! plug to the rule ([`Follow`], keyed by port path like a manual override) and hands the
//! bindings to the plan in [`PlanInput::follows`](super::PlanInput::follows). The plan
//! then counts the followed rule as matching that plug, at the rule's own rank: a forbid
//! rule, or a rule ranked above it, still decides.

use super::rules::{Rule, RuleAction};
use crate::inventory::{Device, HexId, PhysicalPort, PortPath};
use serde::Serialize;
use std::fmt;

/// The device that left, as the engine remembered it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Departed {
    /// Its port path when it left (`1-3.4`).
    pub port: PortPath,
    /// Its controller-anchored place, the one a follower must appear on.
    pub physical_port: PhysicalPort,
    /// Its vendor id.
    pub vendor_id: Option<HexId>,
    /// Its product id.
    pub product_id: Option<HexId>,
    /// When it left, UTC (`2026-12-01T19:55:04Z`), stamped by the engine.
    pub left_at: String,
}

/// One plug bound to a followed rule: the device at a port, for as long as this plug
/// stays (its address), goes where `rule` sends it, as if the rule matched it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Follow {
    /// The device address (devnum) of the plug it was bound to; another plug at the port
    /// is not followed.
    pub address: Option<u16>,
    /// The followed rule's index (its position in the file, from 0).
    pub rule: usize,
    /// The VM the rule gave the device that left: a reload that changed the rule's
    /// target ends the follow.
    pub vm: String,
    /// The device that left.
    pub previous: Departed,
    /// How long after it left this device appeared, in milliseconds.
    pub after_ms: u64,
}

impl Follow {
    /// The rule `device` follows: a binding for this plug on this physical port, to a rule
    /// that still has `follow` and still sends devices to the same VM.
    pub(super) fn rule_for<'r>(&self, rules: &'r [Rule], device: &Device) -> Option<&'r Rule> {
        let same_plug = self.address == device.address
            && device.physical_port.as_ref() == Some(&self.previous.physical_port);
        let rule = rules.iter().find(|r| r.index == self.rule)?;
        let same_target = matches!(&rule.action, RuleAction::Pass { vm, .. } if *vm == self.vm);
        (same_plug && same_target && rule.follow.is_some()).then_some(rule)
    }
}

impl fmt::Display for Departed {
    /// `0000:00:14.0/3 (port 1-3, 0627:0001) at 2026-12-01T19:55:04Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = |h: Option<HexId>| h.map_or("????".to_string(), |h| h.to_string());
        write!(
            f,
            "{} (port {}, {}:{}) at {}",
            self.physical_port,
            self.port,
            id(self.vendor_id),
            id(self.product_id),
            self.left_at
        )
    }
}
