//! The pure plan: every precedence step, protections, file order, overrides, controller
//! ownership.

use crate::policy_support;

use policy_support::{device, hub, with_id, XHCI};
use std::collections::{BTreeMap, BTreeSet};
use usbroute::backend::{AttachMode, Capabilities};
use usbroute::inventory::{Device, PciAddress, PortPath};
use usbroute::policy::{
    plan, Follow, Override, OverrideAction, Placement, PlanInput, Reason, Rule,
};

#[derive(Default)]
pub(crate) struct World {
    pub(crate) rules: Vec<Rule>,
    pub(crate) devices: Vec<Device>,
    pub(crate) mounted: BTreeSet<String>,
    pub(crate) up: BTreeSet<String>,
    pub(crate) overrides: BTreeMap<PortPath, Override>,
    pub(crate) follows: BTreeMap<PortPath, Follow>,
    pub(crate) owned: BTreeMap<PciAddress, String>,
    pub(crate) backends: BTreeMap<String, Capabilities>,
}

impl World {
    pub(crate) fn new(devices: Vec<Device>, rules: Vec<Rule>) -> World {
        World {
            devices,
            rules,
            up: ["a", "b"].map(String::from).into(),
            ..World::default()
        }
    }

    pub(crate) fn input(&self) -> PlanInput<'_> {
        PlanInput {
            rules: &self.rules,
            devices: &self.devices,
            mounted_disks: &self.mounted,
            vms_up: &self.up,
            backends: &self.backends,
            overrides: &self.overrides,
            follows: &self.follows,
            controllers_owned: &self.owned,
        }
    }

    pub(crate) fn placement(&self, port: &str) -> Placement {
        plan(&self.input()).devices[&p(port)].placement.clone()
    }

    pub(crate) fn reason(&self, port: &str) -> Reason {
        plan(&self.input()).devices[&p(port)].reason.clone()
    }
}

pub(crate) fn p(s: &str) -> PortPath {
    s.parse().expect("port")
}

pub(crate) fn pass(index: usize, sel: &str, vm: &str) -> Rule {
    Rule::pass(
        index,
        sel.parse().expect("selector"),
        vm,
        AttachMode::Address,
    )
}

pub(crate) fn pass_by(index: usize, sel: &str, vm: &str, mode: AttachMode) -> Rule {
    Rule::pass(index, sel.parse().expect("selector"), vm, mode)
}

pub(crate) fn forbid(index: usize, sel: &str) -> Rule {
    Rule::forbid(index, sel.parse().expect("selector"))
}

pub(crate) fn on(vm: &str) -> Placement {
    Placement::Vm {
        vm: vm.into(),
        mode: AttachMode::Address,
    }
}

fn attach_override(address: u16, vm: &str, force: bool) -> Override {
    Override {
        address: Some(address),
        action: OverrideAction::Attach {
            vm: vm.into(),
            mode: AttachMode::Address,
            force,
        },
    }
}

#[test]
fn no_rule_stays_on_host() {
    let world = World::new(vec![device("1-1", 2)], vec![]);
    assert_eq!(
        (world.placement("1-1"), world.reason("1-1")),
        (Placement::Host, Reason::NoRule)
    );
}

#[test]
fn matching_rule_passes_to_vm() {
    let world = World::new(vec![device("1-1", 2)], vec![pass(0, "port:1-1", "a")]);
    assert_eq!(world.placement("1-1"), on("a"));
}

#[test]
fn higher_priority_wins_regardless_of_order() {
    let mut low = pass(0, "id:046d:c016", "a");
    low.priority = 1;
    let mut high = pass(1, "port:1-1", "b");
    high.priority = 5;
    let world = World::new(vec![device("1-1", 2)], vec![low, high]);
    assert_eq!(world.placement("1-1"), on("b"));
}

#[test]
fn equal_priority_agreeing_rules_name_first_rule() {
    let world = World::new(
        vec![device("1-1", 2)],
        vec![pass(0, "id:046d:c016", "a"), pass(1, "port:1-1", "a")],
    );
    let Reason::Rule { rule, .. } = world.reason("1-1") else {
        panic!("decided by a rule")
    };
    assert_eq!(rule.index, 0);
}

#[test]
fn forbid_beats_higher_priority_pass() {
    let mut p = pass(0, "port:1-1", "a");
    p.priority = 100;
    let world = World::new(vec![device("1-1", 2)], vec![p, forbid(1, "class:03")]);
    assert_eq!(
        (
            world.placement("1-1"),
            matches!(world.reason("1-1"), Reason::Forbidden { .. })
        ),
        (Placement::Host, true)
    );
}

#[test]
fn hub_is_never_passed_even_with_force() {
    let mut r = pass(0, "port:1-3", "a");
    r.force = true;
    let world = World::new(vec![hub("1-3", 2)], vec![r]);
    assert_eq!(
        (world.placement("1-3"), world.reason("1-3")),
        (Placement::Host, Reason::Hub { subtree: None })
    );
}

#[test]
fn device_behind_hub_is_passed() {
    let world = World::new(
        vec![hub("1-3", 2), device("1-3.2", 3)],
        vec![pass(0, "hub:1-3", "a")],
    );
    assert_eq!(
        (world.placement("1-3"), world.placement("1-3.2")),
        (Placement::Host, on("a"))
    );
}

/// Two levels of hubs behind 1-3 with a device at each, and a hub elsewhere.
fn hub_chain(rules: Vec<Rule>) -> World {
    World::new(
        vec![
            hub("1-3", 2),
            device("1-3.1", 3),
            hub("1-3.4", 4),
            device("1-3.4.2", 5),
            hub("1-2", 6),
        ],
        rules,
    )
}

#[test]
fn every_device_behind_a_hub_rule_goes_at_any_depth_and_no_hub_does() {
    let world = hub_chain(vec![pass(0, "hub:1-3", "a")]);

    let placed: Vec<(String, Placement)> = plan(&world.input())
        .devices
        .into_iter()
        .map(|(port, d)| (port.to_string(), d.placement))
        .collect();

    assert_eq!(
        placed,
        [
            ("1-2".to_string(), Placement::Host),
            ("1-3".to_string(), Placement::Host),
            ("1-3.1".to_string(), on("a")),
            ("1-3.4".to_string(), Placement::Host),
            ("1-3.4.2".to_string(), on("a")),
        ]
    );
}

#[test]
fn a_hub_a_hub_rule_names_or_covers_stays_home_naming_the_rule_and_its_vm() {
    let mut forbid_first = forbid(0, "port:1-1");
    forbid_first.line = 3;
    let world = hub_chain(vec![
        forbid_first,
        pass(1, "port:1-3.1", "b"),
        pass(2, "hub:1-3", "a"),
    ]);

    let reasons: Vec<Reason> = ["1-3", "1-3.4"].map(|p| world.reason(p)).into();

    for reason in &reasons {
        let Reason::Hub { subtree: Some(s) } = reason else {
            panic!("a hub the rule covers: {reason:?}")
        };
        assert_eq!((s.rule.index, s.vm.as_str()), (2, "a"));
    }
    let text = reasons[1].to_string();
    assert!(
        text.starts_with("hubs cannot be passed to a VM, so this hub stays on the host; rule 3 ("),
        "{text}"
    );
    assert!(
        text.ends_with(" gives the devices behind it to VM a"),
        "{text}"
    );
    assert_eq!(world.reason("1-2"), Reason::Hub { subtree: None });
}

#[test]
fn a_device_a_hub_rule_gives_away_is_said_to_be_behind_that_hub() {
    let world = hub_chain(vec![pass(0, "hub:1-3", "a")]);

    let reason = world.reason("1-3.4.2");

    let Reason::Rule { behind_hub, .. } = &reason else {
        panic!("decided by the hub rule: {reason:?}")
    };
    assert_eq!(behind_hub, &Some(p("1-3")));
    assert!(
        reason
            .to_string()
            .ends_with(": the device is behind hub 1-3"),
        "{reason}"
    );
}

#[test]
fn hub_reasons_add_json_fields_and_keep_the_old_ones() {
    let world = hub_chain(vec![pass(0, "hub:1-3", "a")]);
    let desired = plan(&world.input());
    let json = |port: &str| serde_json::to_value(&desired.devices[&p(port)]).expect("json");

    assert_eq!(
        json("1-2"),
        serde_json::json!({"on": "host", "reason": "hub"})
    );
    assert_eq!(
        (
            json("1-3")["reason"].clone(),
            json("1-3")["subtree"]["vm"].clone(),
            json("1-3")["subtree"]["rule"]["index"].clone()
        ),
        (
            serde_json::json!("hub"),
            serde_json::json!("a"),
            serde_json::json!(0)
        )
    );
    assert_eq!(
        (
            json("1-3.1")["reason"].clone(),
            json("1-3.1")["behind_hub"].clone()
        ),
        (serde_json::json!("rule"), serde_json::json!("1-3"))
    );
}

#[test]
fn usb_nic_with_host_netdev_stays_on_host() {
    let mut nic = device("1-1", 2);
    nic.netdevs = vec!["enx001122".into()];
    let world = World::new(vec![nic], vec![pass(0, "port:1-1", "a")]);
    assert!(matches!(
        world.reason("1-1"),
        Reason::HostNetdev {
            wanted_by: Some(_),
            ..
        }
    ));
}

#[test]
fn usb_nic_with_force_is_passed() {
    let mut nic = device("1-1", 2);
    nic.netdevs = vec!["enx001122".into()];
    let mut r = pass(0, "port:1-1", "a");
    r.force = true;
    let world = World::new(vec![nic], vec![r]);
    assert_eq!(world.placement("1-1"), on("a"));
}

#[test]
fn disk_with_mounted_filesystem_stays_on_host() {
    let mut disk = device("1-1", 2);
    disk.block_devices = vec!["sdb".into()];
    let mut world = World::new(vec![disk], vec![pass(0, "port:1-1", "a")]);
    world.mounted.insert("sdb".into());
    assert_eq!(
        world.reason("1-1").to_string().split(';').next(),
        Some("a host filesystem is mounted from sdb")
    );
}

#[test]
fn disk_without_mount_is_passed() {
    let mut disk = device("1-1", 2);
    disk.block_devices = vec!["sdb".into()];
    let mut world = World::new(vec![disk], vec![pass(0, "port:1-1", "a")]);
    world.mounted.insert("sda".into());
    assert_eq!(world.placement("1-1"), on("a"));
}

#[test]
fn vm_down_keeps_device_on_host_with_reason() {
    let mut world = World::new(vec![device("1-1", 2)], vec![pass(0, "port:1-1", "a")]);
    world.up.remove("a");
    assert!(matches!(world.reason("1-1"), Reason::VmDown { vm, .. } if vm == "a"));
}

#[test]
fn vm_down_does_not_fall_through_to_lower_rule() {
    let mut high = pass(0, "port:1-1", "a");
    high.priority = 2;
    let mut world = World::new(
        vec![device("1-1", 2)],
        vec![high, pass(1, "id:046d:c016", "b")],
    );
    world.up.remove("a");
    assert_eq!(world.placement("1-1"), Placement::Host);
}

#[test]
fn controller_owned_by_running_vm_silences_device_rules() {
    let mut world = World::new(vec![device("1-1", 2)], vec![pass(0, "port:1-1", "a")]);
    world.owned.insert(XHCI.parse().expect("pci"), "b".into());
    assert!(matches!(world.reason("1-1"), Reason::ControllerOwned { vm, .. } if vm == "b"));
}

#[test]
fn controller_ownership_beats_manual_attach() {
    let mut world = World::new(vec![device("1-1", 2)], vec![]);
    world.owned.insert(XHCI.parse().expect("pci"), "b".into());
    world
        .overrides
        .insert(p("1-1"), attach_override(2, "a", true));
    assert_eq!(world.placement("1-1"), Placement::Host);
}

#[test]
fn manual_attach_beats_rules() {
    let mut world = World::new(vec![device("1-1", 2)], vec![pass(0, "port:1-1", "a")]);
    world
        .overrides
        .insert(p("1-1"), attach_override(2, "b", false));
    assert_eq!(
        (world.placement("1-1"), world.reason("1-1")),
        (on("b"), Reason::ManualAttach)
    );
}

#[test]
fn manual_detach_beats_rules() {
    let mut world = World::new(vec![device("1-1", 2)], vec![pass(0, "port:1-1", "a")]);
    world.overrides.insert(
        p("1-1"),
        Override {
            address: Some(2),
            action: OverrideAction::Detach,
        },
    );
    assert_eq!(world.reason("1-1"), Reason::ManualDetach);
}

#[test]
fn manual_attach_does_not_beat_forbid() {
    let mut world = World::new(vec![device("1-1", 2)], vec![forbid(0, "port:1-1")]);
    world
        .overrides
        .insert(p("1-1"), attach_override(2, "a", true));
    assert_eq!(world.placement("1-1"), Placement::Host);
}

#[test]
fn manual_attach_respects_netdev_protection_without_force() {
    let mut nic = device("1-1", 2);
    nic.netdevs = vec!["usb0".into()];
    let mut world = World::new(vec![nic], vec![]);
    world
        .overrides
        .insert(p("1-1"), attach_override(2, "a", false));
    assert!(matches!(
        world.reason("1-1"),
        Reason::HostNetdev {
            wanted_by: None,
            ..
        }
    ));
}

#[test]
fn override_for_previous_plug_is_ignored_after_replug() {
    let mut world = World::new(vec![device("1-1", 9)], vec![]);
    world
        .overrides
        .insert(p("1-1"), attach_override(2, "a", false));
    assert_eq!(world.reason("1-1"), Reason::NoRule);
}

#[test]
fn by_address_needs_readable_address() {
    let mut d = device("1-1", 2);
    d.address = None;
    let world = World::new(vec![d], vec![pass(0, "port:1-1", "a")]);
    assert!(matches!(
        world.reason("1-1"),
        Reason::NotAttachable {
            mode: AttachMode::Address,
            ..
        }
    ));
}

#[test]
fn by_id_claims_kind_for_first_device_by_port() {
    let world = World::new(
        vec![device("1-1", 2), device("1-2", 3)],
        vec![pass_by(0, "id:046d:c016", "a", AttachMode::Id)],
    );
    let id_on_a = Placement::Vm {
        vm: "a".into(),
        mode: AttachMode::Id,
    };
    assert_eq!(
        (
            world.placement("1-1"),
            matches!(world.reason("1-2"), Reason::KindClaimed { vm, .. } if vm == "a")
        ),
        (id_on_a, true)
    );
}

#[test]
fn by_id_claim_blocks_same_kind_by_port_elsewhere() {
    let mut by_port = pass_by(1, "port:1-1", "b", AttachMode::Port);
    by_port.priority = 1;
    let world = World::new(
        vec![device("1-1", 2), device("1-2", 3)],
        vec![pass_by(0, "port:1-2", "a", AttachMode::Id), by_port],
    );
    assert_eq!(world.placement("1-1"), Placement::Host);
}

#[test]
fn by_id_does_not_claim_other_kinds() {
    let world = World::new(
        vec![device("1-1", 2), with_id(device("1-2", 3), 0x1234, 0x5678)],
        vec![
            pass_by(0, "port:1-1", "a", AttachMode::Id),
            pass(1, "port:1-2", "b"),
        ],
    );
    assert_eq!(world.placement("1-2"), on("b"));
}

#[test]
fn plan_is_independent_of_device_order() {
    let devices = vec![
        device("1-1", 2),
        device("1-2", 3),
        hub("2-1", 2),
        device("2-1.4", 5),
    ];
    let rules = vec![
        pass_by(0, "id:046d:c016", "a", AttachMode::Id),
        pass(1, "hub:2-1", "b"),
    ];
    let forward = World::new(devices.clone(), rules.clone());
    let backward = World::new(devices.into_iter().rev().collect(), rules);
    assert_eq!(plan(&forward.input()), plan(&backward.input()));
}

#[test]
fn decision_serialises_placement_and_reason_flat() {
    let world = World::new(vec![device("1-1", 2)], vec![]);
    let json = serde_json::to_string(&plan(&world.input()).devices[&p("1-1")]).expect("json");
    assert_eq!(json, r#"{"on":"host","reason":"no_rule"}"#);
}
