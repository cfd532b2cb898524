//! The port-routing reconciler: which USB 2.0 ports the xHCI should hold (the profile
//! in force) against what its register holds, and what to write about the difference.
//!
//! Desired is the intent usbroute recorded with its last switch (a toggle from any
//! listener, a control-socket `routing` line, `usbroute ports apply`, or an intent left
//! from before a restart); actual is what XUSB2PR and USB3_PSSEN read. The kernel
//! writes its own default back on every resume of the xHCI, so re-applying after such a
//! rewrite is just this reconcile finding a difference ([`decide`]).
//!
//! The hardware sits behind [`PortRouting`], plain data in and out, implemented over
//! the routing registers in `crate::routing`; the engine never names that module. A
//! request from the toggle protocol (`toggle`, `host`, a profile name) is resolved here
//! too ([`answer`]), so a switch is decided in one place whoever asked. With the engine's
//! `dry_run` nothing is written: the reconciler says what it would write and the reply
//! carries the mask it would have set.
//!
//! [`worker`] runs it inside the engine: requests, the first check and the checks the
//! daemon asks for (a resume, the routed controllers' uevents), one at a time, and the result in the engine's `Status`.

pub mod worker;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use crate::inventory::PciAddress;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// A failure of the routing hardware or its record, with its cause chain.
pub type RoutingFault = Box<dyn std::error::Error + Send + Sync>;

/// The routing usbroute set out to hold: the intent in its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingIntent {
    /// The profile.
    pub profile: String,
    /// XUSB2PR it writes.
    pub xusb2pr: u16,
    /// USB3_PSSEN it writes, only the bits of lanes the chipset has.
    pub usb3_pssen: u32,
    /// `true` when it is the routing the kernel sets itself at boot and resume.
    pub kernel_default: bool,
    /// The xHCI's `power/control` before usbroute pinned it to `on`; `None`: not pinned.
    pub pinned_from: Option<String>,
}

/// What the routing hardware holds now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingReading {
    /// XUSB2PR.
    pub xusb2pr: u16,
    /// USB3_PSSEN, only the bits of lanes the chipset has.
    pub usb3_pssen: u32,
    /// The recorded intent, `None` when usbroute never switched in this boot.
    pub intent: Option<RoutingIntent>,
    /// The xHCI's `power/control` (`None`: no runtime PM file).
    pub power_control: Option<String>,
    /// The profile the register matches: the intent's when it holds, else the first
    /// profile whose routing equals the register.
    pub in_force: Option<String>,
}

/// The configured profiles.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingProfiles {
    /// Every profile name.
    pub names: BTreeSet<String>,
    /// The two profiles `toggle` flips between, when configured.
    pub toggle: Option<(String, String)>,
}

/// What switching to a profile writes (or, in a dry run, would write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingWrite {
    /// The profile.
    pub profile: String,
    /// XUSB2PR before and after.
    pub xusb2pr: (u16, u16),
    /// USB3_PSSEN before and after.
    pub usb3_pssen: (u32, u32),
    /// What happens to the xHCI's `power/control`.
    pub power: PowerStep,
}

/// A change to the xHCI's runtime PM setting that goes with a routing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerStep {
    /// Left as it is.
    Unchanged,
    /// Set to `on`: a runtime suspend would lose the routing on resume.
    Pin,
    /// Given back (the routing is the kernel's default again).
    Unpin {
        /// The value it goes back to.
        to: String,
    },
}

/// What the register held when it was found not to hold the intent, and what was (or,
/// in a dry run, would be) written back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restored {
    /// The intent's profile.
    pub profile: String,
    /// XUSB2PR found (usually XUSB2PRM, the kernel's resume default).
    pub found: u16,
    /// XUSB2PR written back.
    pub restored: u16,
}

/// The routing hardware as the engine sees it. Implemented over the xHCI's config space
/// in `crate::routing`; a fake beside the reconciler's tests.
pub trait PortRouting: Send {
    /// The xHCI being routed.
    fn controller(&self) -> PciAddress;
    /// The configured profiles.
    fn profiles(&self) -> RoutingProfiles;
    /// The registers, the record and the profile they match.
    fn read(&self) -> Result<RoutingReading, RoutingFault>;
    /// What applying `profile` would write; writes nothing. Refuses what
    /// [`apply`](Self::apply) would refuse.
    fn preview(&self, profile: &str) -> Result<RoutingWrite, RoutingFault>;
    /// Apply `profile` (with its own `force` only): the record first, then the pin,
    /// then the registers. XUSB2PR afterwards.
    fn apply(&mut self, profile: &str) -> Result<u16, RoutingFault>;
    /// Put the recorded intent back (registers, and the pin that goes with them). Checks
    /// again under the routing lock, since `usbroute ports` may have switched since the
    /// read: `None` when the register held after all.
    fn restore(&mut self) -> Result<Option<Restored>, RoutingFault>;
}

/// What the reconciler does about one reading.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum RoutingStep {
    /// The hardware holds the intent (or there is none): nothing to write.
    Hold,
    /// The register lost the intent (a kernel rewrite on resume, someone's setpci):
    /// write it back.
    Restore(Restored),
    /// The registers hold, but `power/control` does not go with them: pin it (someone
    /// set it back to `auto`) or give it back (a switch to the default was cut short).
    Power {
        /// The intent's profile.
        profile: String,
        /// The fix.
        power: PowerStep,
    },
}

/// Desired (the recorded intent) against actual (the registers): what to write.
pub fn decide(reading: &RoutingReading) -> RoutingStep {
    let Some(intent) = &reading.intent else {
        return RoutingStep::Hold;
    };
    let holds = reading.xusb2pr == intent.xusb2pr && reading.usb3_pssen == intent.usb3_pssen;
    if !holds {
        return RoutingStep::Restore(Restored {
            profile: intent.profile.clone(),
            found: reading.xusb2pr,
            restored: intent.xusb2pr,
        });
    }
    let power = match (&intent.pinned_from, reading.power_control.as_deref()) {
        (Some(was), _) if intent.kernel_default => PowerStep::Unpin { to: was.clone() },
        (Some(_), Some(now)) if now != "on" => PowerStep::Pin,
        _ => return RoutingStep::Hold,
    };
    RoutingStep::Power {
        profile: intent.profile.clone(),
        power,
    }
}

/// What a toggle-protocol request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoutingAsk {
    /// The profile in force and XUSB2PR; changes nothing.
    Status,
    /// Flip between the two `toggle` profiles.
    Toggle,
    /// The profile named `host`, else the first `toggle` profile.
    Host,
    /// The profile named `guest`, else the second `toggle` profile.
    Guest,
    /// The profile of this name.
    Profile(String),
}

/// A request from one listener, with what that listener may select.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingRequest {
    /// What is asked.
    pub ask: RoutingAsk,
    /// Who asks, for messages: `tcp 127.0.0.1:4510`, `VM win11`, `control socket`.
    pub origin: String,
    /// The profiles it may select; `None`: all.
    pub allowed: Option<BTreeSet<String>>,
}

/// The answer to a [`RoutingRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoutingAnswer {
    /// The profile in force (or switched to) and XUSB2PR (in a dry run: the mask the
    /// switch would have written).
    Ok {
        /// The profile; `None` when the register matches none.
        profile: Option<String>,
        /// XUSB2PR.
        xusb2pr: u16,
    },
    /// Refused or failed; nothing changed.
    Err(String),
}

/// The profile `ask` selects now; `Ok(None)` for [`RoutingAsk::Status`]. `in_force`
/// reads the hardware, and only `toggle` needs it.
fn resolve(
    profiles: &RoutingProfiles,
    ask: &RoutingAsk,
    in_force: impl FnOnce() -> Result<Option<String>, String>,
) -> Result<Option<String>, String> {
    let pair = || {
        profiles
            .toggle
            .clone()
            .ok_or_else(|| "no `toggle = [A, B]` in [routing]".to_string())
    };
    // `host`/`guest` name profiles when such profiles exist (the seed author's setup),
    // otherwise the first/second toggle profile.
    let named_or = |name: &str, pick: fn((String, String)) -> String| {
        if profiles.names.contains(name) {
            Ok(name.to_string())
        } else {
            pair().map(pick)
        }
    };
    match ask {
        RoutingAsk::Status => Ok(None),
        RoutingAsk::Host => named_or("host", |p| p.0).map(Some),
        RoutingAsk::Guest => named_or("guest", |p| p.1).map(Some),
        RoutingAsk::Toggle => {
            let (a, b) = pair()?;
            Ok(Some(if in_force()?.as_deref() == Some(a.as_str()) {
                b
            } else {
                a
            }))
        }
        RoutingAsk::Profile(name) if profiles.names.contains(name) => Ok(Some(name.clone())),
        RoutingAsk::Profile(name) => Err(format!(
            "no profile `{name}` (configured: {})",
            profiles
                .names
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Decide and carry out one request: resolve the profile, check the listener may
/// select it, then switch (with `dry_run`: log what would be written, write nothing).
/// Resolving and switching happen under the caller's one borrow of `routing`, so two
/// `toggle`s never both see the same profile in force.
pub fn answer(
    routing: &mut dyn PortRouting,
    request: &RoutingRequest,
    dry_run: bool,
) -> RoutingAnswer {
    let read = |r: &dyn PortRouting| r.read().map_err(|e| e.to_string());
    let profiles = routing.profiles();
    let target = match resolve(&profiles, &request.ask, || {
        read(routing).map(|r| r.in_force)
    }) {
        Ok(Some(target)) => target,
        Ok(None) => {
            return match read(routing) {
                Ok(r) => RoutingAnswer::Ok {
                    profile: r.in_force,
                    xusb2pr: r.xusb2pr,
                },
                Err(e) => RoutingAnswer::Err(e),
            }
        }
        Err(e) => return RoutingAnswer::Err(e),
    };
    if let Some(allowed) = &request.allowed {
        if !allowed.contains(&target) {
            return RoutingAnswer::Err(format!(
                "profile `{target}` is not allowed for {} (allowed: {})",
                request.origin,
                allowed.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    let switched = if dry_run {
        routing.preview(&target).map(|w| {
            log_would_write(routing.controller(), &w);
            w.xusb2pr.1
        })
    } else {
        routing.apply(&target)
    };
    match switched {
        Ok(xusb2pr) => RoutingAnswer::Ok {
            profile: Some(target),
            xusb2pr,
        },
        Err(e) => RoutingAnswer::Err(e.to_string()),
    }
}

/// The dry run's account of a switch it did not make.
fn log_would_write(controller: PciAddress, w: &RoutingWrite) {
    let power = match &w.power {
        PowerStep::Pin => ", and set power/control to on".to_string(),
        PowerStep::Unpin { to } => format!(", and set power/control back to {to}"),
        PowerStep::Unchanged => String::new(),
    };
    tracing::info!(
        profile = %w.profile,
        controller = %controller,
        "dry run: would write XUSB2PR 0x{:04x} (now 0x{:04x}) and USB3_PSSEN 0x{:08x} (now 0x{:08x}){power}; nothing is written",
        w.xusb2pr.1,
        w.xusb2pr.0,
        w.usb3_pssen.1,
        w.usb3_pssen.0,
    );
}

/// Port routing in the engine's `Status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingStatus {
    /// The xHCI being routed.
    pub controller: String,
    /// The profile the register matches (`None`: none does).
    pub profile: Option<String>,
    /// XUSB2PR as last read.
    pub xusb2pr: u16,
    /// The profile usbroute holds the routing to (its record), if any.
    pub intent: Option<String>,
    /// In a dry run: what the reconciler would write now and does not.
    pub would: Option<RoutingStep>,
    /// Why the last check or switch failed, when it did.
    pub error: Option<String>,
}
