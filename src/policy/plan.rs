//! The plan: where each present device belongs (host or a VM) and why. A pure function
//! of its inputs: same inputs, same answer, no I/O, no clock, no hash-map order.
//!
//! Precedence, first that applies decides:
//! 1. a hub stays on the host (devices behind it are decided on their own);
//! 2. a device on a controller given whole to a running VM: device rules do not fire;
//! 3. a forbid rule that matches keeps it on the host, wherever it is in the file: a
//!    forbid is a protection, so it beats every pass rule and a manual attach too;
//! 4. a manual override for this plug (detach: host; attach: that VM);
//! 5. the matching pass rule with the highest `priority`; among equal priorities the
//!    earliest in the file (first match wins, as in USBGuard, udev and firewalls).
//!    Overlapping rules are never an error: `usbroute check` and the daemon warn about
//!    rules for different VMs that might match one device ([`super::overlaps`]); a
//!    rule whose device this plug follows ([`PlanInput::follows`]) counts as matching;
//! 6. no rule: host.
//!
//! A VM target is then checked: a host network interface or a mounted host filesystem on
//! the device keeps it on the host unless `force`; the VM must be running; the device must
//! have the attach mode's key. Finally `by = "id"` takes a whole kind: QEMU may grab any
//! device with that vendor:product, so the first such device (by port) claims the kind and
//! other devices of that kind stay on the host, with a reason that says so.

use super::follow::{Departed, Follow};
use super::rules::{Rule, RuleAction};
use crate::backend::{AttachKey, AttachMode, Capabilities};
use crate::inventory::{Device, HexId, PciAddress, PortPath};
use crate::selector::Term;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Where a device belongs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "on", rename_all = "lowercase")]
pub enum Placement {
    /// The host keeps it.
    Host,
    /// Passed to a VM.
    Vm {
        /// The VM.
        vm: String,
        /// How its usb-host finds the device.
        mode: AttachMode,
    },
}

/// A rule, as named in reasons: its number, line and text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct RuleRef {
    /// Position in the file, from 0.
    pub index: usize,
    /// Line in the file (0: not from a file).
    pub line: usize,
    /// `rule 2 (line 14: match = "port:1-3" → vm = "win11", by = "address")`.
    pub text: String,
}

impl From<&Rule> for RuleRef {
    fn from(rule: &Rule) -> Self {
        RuleRef {
            index: rule.index,
            line: rule.line,
            text: rule.to_string(),
        }
    }
}

/// Why a device is where the plan puts it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    /// No rule matched.
    NoRule,
    /// A pass rule decided.
    Rule {
        /// That rule.
        rule: RuleRef,
        /// The hub of the rule's `hub:` term that the device is behind, if the rule has
        /// one: the device goes with the hub's subtree.
        #[serde(skip_serializing_if = "Option::is_none")]
        behind_hub: Option<PortPath>,
        /// The rule asks for a mode the VM's backend lacks, and the backend follows it by
        /// address instead ([`Capabilities::follows_by_address`]).
        #[serde(skip_serializing_if = "Option::is_none")]
        by_address: Option<ByAddress>,
    },
    /// A forbid rule matched.
    Forbidden {
        /// That rule.
        rule: RuleRef,
    },
    /// Hubs are never passed.
    Hub {
        /// The pass rule whose `hub:` term names this hub or a hub above it: it gives the
        /// devices behind this hub to a VM, while the hub stays on the host.
        #[serde(skip_serializing_if = "Option::is_none")]
        subtree: Option<SubtreeRule>,
    },
    /// The device is on a controller given whole to a running VM.
    ControllerOwned {
        /// The controller.
        controller: PciAddress,
        /// The VM that has it.
        vm: String,
    },
    /// The user detached it by hand.
    ManualDetach,
    /// The user attached it by hand.
    ManualAttach,
    /// It carries host network interfaces and the deciding rule has no `force`.
    HostNetdev {
        /// The interfaces.
        netdevs: Vec<String>,
        /// What wanted it in a VM (`None`: a manual attach).
        wanted_by: Option<RuleRef>,
    },
    /// It holds a mounted host filesystem and the deciding rule has no `force`.
    MountedDisk {
        /// Its mounted block devices.
        disks: Vec<String>,
        /// What wanted it in a VM (`None`: a manual attach).
        wanted_by: Option<RuleRef>,
    },
    /// The VM's backend cannot attach by the mode asked for (libvirt has no by-port) and does
    /// not follow it by address itself.
    ModeUnsupported {
        /// The VM.
        vm: String,
        /// Its backend (`xen`).
        backend: String,
        /// The mode asked for.
        mode: AttachMode,
        /// The modes it can attach by.
        supported: Vec<AttachMode>,
        /// What wanted it in a VM (`None`: a manual attach).
        wanted_by: Option<RuleRef>,
    },
    /// The target VM is not running; the device goes there when it is.
    VmDown {
        /// The VM.
        vm: String,
        /// What wants it there (`None`: a manual attach).
        wanted_by: Option<RuleRef>,
    },
    /// The device lacks what the attach mode needs (address or ids unreadable).
    NotAttachable {
        /// The mode.
        mode: AttachMode,
        /// What wanted it in a VM (`None`: a manual attach).
        wanted_by: Option<RuleRef>,
    },
    /// A `follow` rule decided for this device although its selector does not match it:
    /// the device it gave a VM left this physical port, and this one appeared there
    /// within the rule's window (a re-enumeration, say into a bootloader).
    Followed {
        /// The followed rule.
        rule: RuleRef,
        /// The device that left.
        previous: Departed,
        /// How long after it left this device appeared, in milliseconds.
        after_ms: u64,
    },
    /// Another device of the same kind is attached by id, which may grab any of them.
    KindClaimed {
        /// The device that claimed the kind.
        claimed_by: PortPath,
        /// The VM it goes to.
        vm: String,
        /// What wanted this device in a VM (`None`: a manual attach).
        wanted_by: Option<RuleRef>,
    },
}

/// A rule by port or id carried out by address: the backend attaches by address only, and
/// usbroute follows the port or kind itself, attaching each plug it matches by its address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ByAddress {
    /// The backend (`xen`).
    pub backend: String,
    /// The mode the rule asked for.
    pub asked: AttachMode,
}

/// A `hub:` rule as seen from a hub it covers: the devices behind go to `vm`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct SubtreeRule {
    /// The rule.
    pub rule: RuleRef,
    /// Its VM.
    pub vm: String,
}

/// Where one device belongs, and why.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Decision {
    /// Host or VM.
    #[serde(flatten)]
    pub placement: Placement,
    /// Why.
    #[serde(flatten)]
    pub reason: Reason,
}

/// The plan's answer for every present device, keyed by port path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Desired {
    /// One decision per device present.
    pub devices: BTreeMap<PortPath, Decision>,
}

/// A manual command that the plan respects for one plug of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Override {
    /// The device address (devnum) of the plug it was given for: after a re-plug the
    /// address differs and the override no longer applies (the caller may drop it).
    pub address: Option<u16>,
    /// What the user asked.
    pub action: OverrideAction,
}

/// What a manual command asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum OverrideAction {
    /// Put it on this VM.
    Attach {
        /// The VM.
        vm: String,
        /// How.
        mode: AttachMode,
        /// Override the host netdev / mounted disk protections.
        force: bool,
    },
    /// Keep it on the host.
    Detach,
}

/// Everything the plan looks at. All plain data: the caller gathers it.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// The rules, in file order.
    pub rules: &'a [Rule],
    /// Devices present now (from the inventory snapshot).
    pub devices: &'a [Device],
    /// Whole-disk block device names (`sda`) with a host filesystem mounted on them or on
    /// one of their partitions (names as in [`Device::block_devices`]).
    pub mounted_disks: &'a BTreeSet<String>,
    /// VMs running now (their QMP socket answers).
    pub vms_up: &'a BTreeSet<String>,
    /// What each VM's backend can attach by; a VM absent is asked for any mode.
    pub backends: &'a BTreeMap<String, Capabilities>,
    /// Manual overrides by port path.
    pub overrides: &'a BTreeMap<PortPath, Override>,
    /// Plugs following a device that left (a rule's `follow`), by port path; the engine
    /// keeps them (see [`Follow`]).
    pub follows: &'a BTreeMap<PortPath, Follow>,
    /// PCI functions given whole to a VM that is running, with that VM: every function of
    /// the IOMMU group of each `[[controller]]` whose VM runs, since the whole group goes
    /// to the VM. The engine computes it (`engine::owned_by_running` over
    /// `vfio::held_by_rules`).
    pub controllers_owned: &'a BTreeMap<PciAddress, String>,
}

/// Decide where every device belongs.
pub fn plan(input: &PlanInput<'_>) -> Desired {
    let mut devices: BTreeMap<PortPath, Decision> = input
        .devices
        .iter()
        .map(|d| (d.port.clone(), decide(input, d)))
        .collect();
    settle_id_claims(input.devices, &mut devices);
    Desired { devices }
}

fn host(reason: Reason) -> Decision {
    Decision {
        placement: Placement::Host,
        reason,
    }
}

/// Steps 1–6 and the target checks for one device.
pub(super) fn decide(input: &PlanInput<'_>, device: &Device) -> Decision {
    if device.hub {
        return host(Reason::Hub {
            subtree: subtree_rule(input.rules, device),
        });
    }
    let owner = device
        .controller
        .and_then(|pci| input.controllers_owned.get(&pci).map(|vm| (pci, vm)));
    if let Some((controller, vm)) = owner {
        return host(Reason::ControllerOwned {
            controller,
            vm: vm.clone(),
        });
    }
    let mut matching: Vec<&Rule> = input
        .rules
        .iter()
        .filter(|r| r.selector.matches(device))
        .collect();
    // The followed rule joins the matching ones at its own rank: precedence decides.
    let follow = input.follows.get(&device.port);
    let followed = follow.and_then(|f| Some((f.rule_for(input.rules, device)?, f)));
    let followed = followed.filter(|(rule, _)| !matching.iter().any(|m| m.index == rule.index));
    if let Some((rule, _)) = followed {
        matching.push(rule);
    }
    let first = matching.iter().copied().min_by_key(|r| r.rank());
    if let Some(rule) = first.filter(|r| r.action == RuleAction::Forbid) {
        return host(Reason::Forbidden {
            rule: RuleRef::from(rule),
        });
    }
    let manual = input
        .overrides
        .get(&device.port)
        .filter(|o| o.address == device.address);
    let (vm, mode, force, deciding) = match manual.map(|o| &o.action) {
        Some(OverrideAction::Detach) => return host(Reason::ManualDetach),
        Some(OverrideAction::Attach { vm, mode, force }) => (vm, *mode, *force, None),
        // No forbid matched, so the first in rank is the highest priority, earliest pass rule.
        None => match first {
            Some(
                rule @ Rule {
                    action: RuleAction::Pass { vm, mode },
                    ..
                },
            ) => (vm, *mode, rule.force, Some(rule)),
            _ => return host(Reason::NoRule),
        },
    };
    let wanted_by = deciding.map(RuleRef::from);
    let mounted: Vec<String> = device
        .block_devices
        .iter()
        .filter(|b| input.mounted_disks.contains(*b))
        .cloned()
        .collect();
    if !force && !device.netdevs.is_empty() {
        return host(Reason::HostNetdev {
            netdevs: device.netdevs.clone(),
            wanted_by,
        });
    }
    if !force && !mounted.is_empty() {
        return host(Reason::MountedDisk {
            disks: mounted,
            wanted_by,
        });
    }
    // Before "not running": a down VM that cannot take the device should not promise it.
    let mut by_address = None;
    if let Some(caps) = input.backends.get(vm).filter(|c| !c.supports(mode)) {
        if !(caps.follows_by_address && caps.supports(AttachMode::Address)) {
            return host(Reason::ModeUnsupported {
                vm: vm.clone(),
                backend: caps.backend.clone(),
                mode,
                supported: caps.modes.iter().copied().collect(),
                wanted_by,
            });
        }
        by_address = Some(ByAddress {
            backend: caps.backend.clone(),
            asked: mode,
        });
    }
    let mode = if by_address.is_some() {
        AttachMode::Address
    } else {
        mode
    };
    if !input.vms_up.contains(vm) {
        return host(Reason::VmDown {
            vm: vm.clone(),
            wanted_by,
        });
    }
    if AttachKey::of(mode, device).is_none() {
        return host(Reason::NotAttachable { mode, wanted_by });
    }
    let reason = match (wanted_by, deciding, followed) {
        (Some(rule), Some(deciding), Some((by, f))) if by.index == deciding.index => {
            Reason::Followed {
                rule,
                previous: f.previous.clone(),
                after_ms: f.after_ms,
            }
        }
        (Some(rule), Some(deciding), _) => Reason::Rule {
            rule,
            behind_hub: hub_above(deciding, device),
            by_address,
        },
        _ => Reason::ManualAttach,
    };
    Decision {
        placement: Placement::Vm {
            vm: vm.clone(),
            mode,
        },
        reason,
    }
}

/// The hub of `rule`'s `hub:` terms that `device` is behind (a hub named by its socket,
/// `hub:0000:00:14.0/3`, as the kernel names it on the device's bus: the same hops).
fn hub_above(rule: &Rule, device: &Device) -> Option<PortPath> {
    let port = &device.port;
    let physical = device.physical_port.as_ref();
    rule.selector.terms.iter().find_map(|t| match t {
        Term::Hub(hub) if port.is_behind(hub) => Some(hub.clone()),
        Term::PhysicalHub(hub) if physical.is_some_and(|p| p.is_behind(hub)) => Some(PortPath {
            bus: port.bus,
            ports: port.ports.get(..hub.ports.len())?.to_vec(),
        }),
        _ => None,
    })
}

/// The pass rule, first in rank, with a `hub:` term that names `hub` or a hub above it:
/// the rule that gives the devices behind `hub` to its VM.
fn subtree_rule(rules: &[Rule], hub: &Device) -> Option<SubtreeRule> {
    let socket = hub.physical_port.as_ref();
    let covers = |r: &&Rule| {
        r.selector.terms.iter().any(|t| match t {
            Term::Hub(above) => *above == hub.port || hub.port.is_behind(above),
            Term::PhysicalHub(above) => socket.is_some_and(|s| s == above || s.is_behind(above)),
            _ => false,
        })
    };
    let rule = rules
        .iter()
        .filter(covers)
        .filter(|r| r.action.vm().is_some())
        .min_by_key(|r| r.rank())?;
    Some(SubtreeRule {
        rule: RuleRef::from(rule),
        vm: rule.action.vm()?.to_string(),
    })
}

/// A kind attached by id belongs to its first device (by port); every other device of
/// that kind bound for a VM stays on the host.
fn settle_id_claims(devices: &[Device], decisions: &mut BTreeMap<PortPath, Decision>) {
    let kind = |d: &Device| Some((d.vendor_id?, d.product_id?));
    let by_port: BTreeMap<&PortPath, &Device> = devices.iter().map(|d| (&d.port, d)).collect();
    let mut claims: BTreeMap<(HexId, HexId), (PortPath, String)> = BTreeMap::new();
    for (port, decision) in decisions.iter() {
        if let Placement::Vm {
            vm,
            mode: AttachMode::Id,
        } = &decision.placement
        {
            let k = by_port.get(port).and_then(|d| kind(d));
            if let Some(k) = k {
                claims
                    .entry(k)
                    .or_insert_with(|| (port.clone(), vm.clone()));
            }
        }
    }
    for (port, decision) in decisions.iter_mut() {
        let claim = by_port
            .get(port)
            .and_then(|d| kind(d))
            .and_then(|k| claims.get(&k))
            .filter(|(claimer, _)| claimer != port);
        if let (Some((claimer, vm)), Placement::Vm { .. }) = (claim, &decision.placement) {
            let wanted_by = match &decision.reason {
                Reason::Rule { rule, .. } | Reason::Followed { rule, .. } => Some(rule.clone()),
                _ => None,
            };
            *decision = host(Reason::KindClaimed {
                claimed_by: claimer.clone(),
                vm: vm.clone(),
                wanted_by,
            });
        }
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placement::Host => f.write_str("host"),
            Placement::Vm { vm, .. } => f.write_str(vm),
        }
    }
}

fn wanted(f: &mut fmt::Formatter<'_>, wanted_by: &Option<RuleRef>) -> fmt::Result {
    match wanted_by {
        Some(rule) => write!(f, " ({} wants it in a VM)", rule.text),
        None => f.write_str(" (a manual attach wants it in a VM)"),
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NoRule => f.write_str("no rule matches it"),
            Reason::Rule { rule, behind_hub, by_address } => {
                f.write_str(&rule.text)?;
                if let Some(hub) = behind_hub {
                    write!(f, ": the device is behind hub {hub}")?;
                }
                match by_address {
                    Some(ByAddress { backend, asked }) => write!(
                        f,
                        "; the VM's backend ({backend}) attaches by bus+address only, so usbroute follows the {} itself and attaches each plug by its address",
                        if *asked == AttachMode::Id { "kind of device" } else { "port" }
                    ),
                    None => Ok(()),
                }
            }
            Reason::Followed { rule, previous, after_ms } => write!(
                f,
                "{} followed the device it gave the VM, which left {previous}; this one appeared there {}.{:03} s later",
                rule.text, after_ms / 1000, after_ms % 1000
            ),
            Reason::Forbidden { rule } => write!(f, "forbidden by {}", rule.text),
            Reason::Hub { subtree: None } => f.write_str("hubs cannot be passed to a VM (the devices behind a hub can: match them, e.g. hub:1-3)"),
            Reason::Hub { subtree: Some(s) } => write!(f, "hubs cannot be passed to a VM, so this hub stays on the host; {} gives the devices behind it to VM {}", s.rule.text, s.vm),
            Reason::ControllerOwned { controller, vm } => write!(
                f,
                "its controller {controller} is given whole (with its IOMMU group) to running VM {vm}, so device rules do not apply"
            ),
            Reason::ManualDetach => f.write_str("detached by hand (until unplugged or cleared)"),
            Reason::ManualAttach => f.write_str("attached by hand (until unplugged or cleared)"),
            Reason::HostNetdev { netdevs, wanted_by } => {
                write!(f, "it carries host network interface(s) {}; add `force = true` to the rule to pass it anyway", netdevs.join(", "))?;
                wanted(f, wanted_by)
            }
            Reason::MountedDisk { disks, wanted_by } => {
                write!(f, "a host filesystem is mounted from {}; unmount it, or add `force = true` to the rule", disks.join(", "))?;
                wanted(f, wanted_by)
            }
            Reason::VmDown { vm, wanted_by } => {
                write!(f, "VM {vm} is not running; it gets the device when it starts")?;
                wanted(f, wanted_by)
            }
            Reason::ModeUnsupported { vm, backend, mode, supported, wanted_by } => {
                let instead: Vec<String> = supported.iter().map(|m| format!("`by = \"{}\"`", m.name())).collect();
                write!(f, "VM {vm}'s backend ({backend}) cannot attach by {}; use {}", mode.name(), if instead.is_empty() { "another VM".to_string() } else { instead.join(" or ") })?;
                wanted(f, wanted_by)
            }
            Reason::NotAttachable { mode, wanted_by } => {
                write!(f, "the device's {} is unreadable, so it cannot be attached by {}", match mode { AttachMode::Address => "address", AttachMode::Port => "port", AttachMode::Id => "vendor:product id" }, mode.name())?;
                wanted(f, wanted_by)
            }
            Reason::KindClaimed { claimed_by, vm, wanted_by } => {
                write!(f, "device {claimed_by} of the same vendor:product goes to VM {vm} by id, and QEMU may grab any device of that kind; use by = \"port\" or \"address\" to tell them apart")?;
                wanted(f, wanted_by)
            }
        }
    }
}
