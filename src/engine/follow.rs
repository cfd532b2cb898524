//! Following a device through re-enumeration: the engine's half of a rule's `follow`.
//!
//! When a device that a `follow` rule gave a VM leaves, the engine remembers its
//! departure (physical port, VM, rule, when, old ids and port path). When a device
//! appears on the same physical port before the rule's window ends, the engine binds
//! that plug to the rule ([`Follow`], by address): the follow then lasts until that plug
//! leaves, however long. The plan decides with the bindings as plain data
//! ([`PlanInput::follows`](crate::policy::PlanInput::follows)).
//!
//! No timer: expired departures are dropped on the next change of the devices, so a
//! daemon with nothing happening stays silent. Time comes in as parameters (the engine's
//! monotonic clock and a wall-clock stamp for `why`), so tests need no sleep.

use crate::inventory::{record::utc_text, Device, PortPath};
use crate::policy::{Departed, Desired, Follow, Placement, Reason, Rule};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

/// At most this many departures are remembered (a hub unplugged with many devices behind
/// it, each with a `follow` rule); beyond it the oldest are forgotten first.
const MAX_DEPARTURES: usize = 64;

/// The departures waiting for a follower and the plugs bound to followed rules.
#[derive(Debug, Default)]
pub struct Follows {
    departures: Vec<Departure>,
    bindings: BTreeMap<PortPath, Follow>,
}

/// A device that left while a `follow` rule gave it to a VM.
#[derive(Debug, Clone)]
struct Departure {
    /// When it left, on the engine's clock.
    left: Duration,
    /// When its window ends, on the engine's clock.
    until: Duration,
    rule: usize,
    vm: String,
    previous: Departed,
}

/// One change of the devices present, with what the plan had decided before it.
pub struct DeviceChange<'a> {
    /// The devices before.
    pub before: &'a [Device],
    /// The devices now.
    pub after: &'a [Device],
    /// The plan for `before`: which devices a `follow` rule had given a VM.
    pub decided: &'a Desired,
    /// The rules in force.
    pub rules: &'a [Rule],
}

/// When a change happened: the engine's monotonic clock (for windows) and the wall clock
/// (a stamp `why` shows).
#[derive(Debug, Clone, Copy)]
pub struct Moment {
    /// Monotonic time since any fixed origin (the engine's start).
    pub now: Duration,
    /// The wall clock at `now`.
    pub wall: SystemTime,
}

impl Moment {
    /// `now` on the engine's clock, stamped with the wall clock as it reads now.
    pub fn wall_now(now: Duration) -> Moment {
        Moment {
            now,
            wall: SystemTime::now(),
        }
    }
}

impl Follows {
    /// The plugs bound to followed rules, by port path (for the plan).
    pub fn bindings(&self) -> &BTreeMap<PortPath, Follow> {
        &self.bindings
    }

    /// The devices changed: end the bindings of plugs that left, remember the departures
    /// a `follow` rule may follow, and bind the devices that appeared on a remembered
    /// physical port in time.
    pub fn devices_changed(&mut self, change: &DeviceChange<'_>, at: Moment) {
        self.departures.retain(|d| at.now <= d.until);
        let plug = |d: &Device| (d.port.clone(), d.address);
        let before: BTreeSet<_> = change.before.iter().map(plug).collect();
        let after: BTreeSet<_> = change.after.iter().map(plug).collect();
        self.bindings
            .retain(|port, f| after.contains(&(port.clone(), f.address)));
        for gone in change.before.iter().filter(|d| !after.contains(&plug(d))) {
            if let Some(departure) = departure(gone, change, at) {
                let place = &departure.previous.physical_port;
                self.departures
                    .retain(|d| d.previous.physical_port != *place);
                self.departures.push(departure);
            }
        }
        let excess = self.departures.len().saturating_sub(MAX_DEPARTURES);
        self.departures.drain(..excess);
        for new in change.after.iter().filter(|d| !before.contains(&plug(d))) {
            let Some(place) = &new.physical_port else {
                continue;
            };
            let Some(i) = self
                .departures
                .iter()
                .position(|d| d.previous.physical_port == *place)
            else {
                continue;
            };
            let d = self.departures.remove(i);
            let after_ms = at.now.saturating_sub(d.left).as_millis();
            let follow = Follow {
                address: new.address,
                rule: d.rule,
                vm: d.vm,
                previous: d.previous,
                after_ms: u64::try_from(after_ms).unwrap_or(u64::MAX),
            };
            self.bindings.insert(new.port.clone(), follow);
        }
    }
}

/// What to remember of `gone`, if a rule with `follow` had given it to a VM.
fn departure(gone: &Device, change: &DeviceChange<'_>, at: Moment) -> Option<Departure> {
    let decision = change.decided.devices.get(&gone.port)?;
    let Placement::Vm { vm, .. } = &decision.placement else {
        return None;
    };
    let rule = match &decision.reason {
        Reason::Rule { rule, .. } | Reason::Followed { rule, .. } => rule.index,
        _ => return None,
    };
    let window = change.rules.iter().find(|r| r.index == rule)?.follow?;
    Some(Departure {
        left: at.now,
        until: at.now + window,
        rule,
        vm: vm.clone(),
        previous: Departed {
            port: gone.port.clone(),
            physical_port: gone.physical_port.clone()?,
            vendor_id: gone.vendor_id,
            product_id: gone.product_id,
            left_at: utc_text(at.wall),
        },
    })
}
