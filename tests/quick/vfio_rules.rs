//! `[[controller]]` rules as the engine applies them at start and restores them.

use crate::policy_support;
use crate::vfio_support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use usbroute::backend::AttachMode;
use usbroute::engine::{
    carry_out, owned_by_running, Direction, GroupOutcome, Groups, VfioControllers,
};
use usbroute::policy::{plan, Placement, PlanInput, Reason, Rule};
use usbroute::vfio::{self, BindOptions, ControllerRule};
use vfio_support::{pci, state, FixtureDriverCore, Tree};

fn quick() -> BindOptions {
    BindOptions {
        force: true,
        wait: Duration::from_millis(200),
        settle: Duration::ZERO,
    }
}

fn rule(addr: &str, vm: &str) -> ControllerRule {
    ControllerRule {
        pci: pci(addr),
        vm: vm.to_string(),
    }
}

#[test]
fn controller_rule_reads_from_toml_with_a_short_or_long_address() {
    #[derive(serde::Deserialize)]
    struct Config {
        controller: Vec<ControllerRule>,
    }

    let config: Config = toml::from_str(
        "[[controller]]\npci = \"0000:00:1d.7\"\nvm = \"win11\"\n[[controller]]\npci = \"00:01.0\"\nvm = \"dev\"\n",
    )
    .expect("toml");

    assert_eq!(
        config.controller,
        vec![rule("00:1d.7", "win11"), rule("00:01.0", "dev")]
    );
}

#[test]
fn apply_binds_each_rule_and_never_forces_a_group_the_host_needs() {
    let tree = Tree::q35_usb().with_vfio();
    tree.usb_device("0000:00:01.0", 3, "3-1", ("03", "01", "01"));
    let host = FixtureDriverCore::new(&tree);

    let report = vfio::apply_controller_rules(
        &tree.root(),
        &host,
        &[rule("00:1d.7", "win11"), rule("00:01.0", "dev")],
        &quick(),
    );

    assert_eq!(
        report.outcomes.iter().map(|o| (o.ok, o.message.clone())).collect::<Vec<_>>(),
        vec![
            (true, "IOMMU group 7 is on vfio-pci (4 function(s)), ready for VM win11".to_string()),
            (
                false,
                "Refusing to take IOMMU group 3 from the host: the controller itself has the host's \
                 only keyboard (USB 3-1); the host would be left without one. If you are sure, pass \
                 --force (`usbroute controller restore` gives it back)"
                    .to_string()
            ),
        ]
    );
}

#[test]
fn apply_twice_reports_the_group_as_already_bound_and_writes_nothing_more() {
    let tree = Tree::q35_usb().with_vfio();
    let host = FixtureDriverCore::new(&tree);
    let rules = [rule("00:1d.7", "win11")];
    vfio::apply_controller_rules(&tree.root(), &host, &rules, &quick());
    let writes = host.writes().len();

    let report = vfio::apply_controller_rules(&tree.root(), &host, &rules, &quick());

    assert_eq!(
        report.outcomes[0].message,
        "IOMMU group 7 was already on vfio-pci"
    );
    assert_eq!(host.writes().len(), writes);
}

#[test]
fn restore_rules_give_every_group_back() {
    let tree = Tree::q35_usb().with_vfio();
    let first = state(&tree);
    let host = FixtureDriverCore::new(&tree);
    let rules = [rule("00:1d.7", "win11"), rule("00:01.0", "dev")];
    vfio::apply_controller_rules(&tree.root(), &host, &rules, &quick());

    let report = vfio::restore_controller_rules(&tree.root(), &host, &rules, &quick());

    assert!(report.all_ok(), "{report:?}");
    assert_eq!(state(&tree), first);
}

#[test]
fn owned_by_running_covers_the_whole_group_of_a_running_vms_controller_only() {
    let tree = Tree::q35_usb();
    let rules = [rule("00:1d.7", "win11"), rule("00:01.0", "stopped-vm")];

    let running = BTreeSet::from(["win11".to_string()]);

    let held = owned_by_running(&vfio::held_by_rules(&tree.root(), &rules), &running);

    assert_eq!(
        held.into_iter()
            .map(|(p, vm)| (p.to_string(), vm))
            .collect::<Vec<_>>(),
        vec![
            ("0000:00:1d.0".to_string(), "win11".to_string()),
            ("0000:00:1d.1".to_string(), "win11".to_string()),
            ("0000:00:1d.2".to_string(), "win11".to_string()),
            ("0000:00:1d.7".to_string(), "win11".to_string()),
        ]
    );
}

#[test]
fn held_by_rules_expands_each_rule_to_its_group_whether_its_vm_runs_or_not() {
    let tree = Tree::q35_usb();

    let held = vfio::held_by_rules(&tree.root(), &[rule("00:1d.7", "win11")]);

    assert_eq!(
        held,
        vec![
            rule("00:1d.0", "win11"),
            rule("00:1d.1", "win11"),
            rule("00:1d.2", "win11"),
            rule("00:1d.7", "win11"),
        ]
    );
}

/// The plan over the functions an EHCI rule holds: a device on a UHCI companion of the
/// EHCI stays out of the device rules while the EHCI's VM runs, and goes back to them when
/// it stops.
fn placement_of_uhci_device(running: &[&str]) -> (Placement, Reason) {
    let tree = Tree::q35_usb();
    let mut device = policy_support::device("1-1", 2);
    device.controller = Some(pci("00:1d.0"));
    let rules = [Rule::pass(
        0,
        "port:1-1".parse().expect("selector"),
        "linux",
        AttachMode::Port,
    )];
    let up: BTreeSet<String> = running.iter().map(|s| s.to_string()).collect();
    let owned = owned_by_running(
        &vfio::held_by_rules(&tree.root(), &[rule("00:1d.7", "win11")]),
        &up,
    );
    let desired = plan(&PlanInput {
        rules: &rules,
        devices: std::slice::from_ref(&device),
        mounted_disks: &BTreeSet::new(),
        vms_up: &up,
        backends: &Default::default(),
        overrides: &BTreeMap::new(),
        follows: &BTreeMap::new(),
        controllers_owned: &owned,
    });
    let decision = desired.devices[&device.port].clone();
    (decision.placement, decision.reason)
}

#[test]
fn device_on_a_uhci_companion_is_held_while_the_ehci_rule_vm_runs() {
    let (placement, reason) = placement_of_uhci_device(&["win11", "linux"]);

    assert_eq!(placement, Placement::Host);
    assert_eq!(
        reason.to_string(),
        "its controller 0000:00:1d.0 is given whole (with its IOMMU group) to running VM win11, \
         so device rules do not apply"
    );
}

#[test]
fn device_on_a_uhci_companion_goes_back_to_the_device_rules_when_the_vm_stops() {
    let (placement, _) = placement_of_uhci_device(&["linux"]);

    assert!(
        matches!(&placement, Placement::Vm { vm, .. } if vm == "linux"),
        "{placement:?}"
    );
}

fn driver_of(tree: &Tree, f: &str) -> Option<String> {
    state(tree)
        .into_iter()
        .find(|(name, _, _)| name == f)
        .and_then(|(_, driver, _)| driver)
}

/// What the engine does about a change of rules from `old` to `new` (no VM running):
/// its reconciler decides, the vfio host carries out (or, `dry_run`, describes).
fn engine_carries_out(
    tree: &Tree,
    host: &FixtureDriverCore,
    old: &[ControllerRule],
    new: &[ControllerRule],
    opts: BindOptions,
    dry_run: bool,
) -> Vec<GroupOutcome> {
    let vms: BTreeSet<String> = old.iter().chain(new).map(|r| r.vm.clone()).collect();
    let mut groups = Groups::default();
    groups.next(old, &BTreeSet::new(), &vms);
    let steps = groups.next(new, &BTreeSet::new(), &vms);
    carry_out(
        &VfioControllers::new(tree.root(), host, opts),
        &steps,
        dry_run,
    )
}

#[test]
fn engine_carry_out_binds_added_rules_and_restores_removed_ones() {
    let tree = Tree::q35_usb().with_vfio();
    let host = FixtureDriverCore::new(&tree);
    let first = state(&tree);
    let old = [rule("00:1d.7", "win11")];
    let new = [rule("00:01.0", "lab")];
    engine_carries_out(&tree, &host, &[], &old, quick(), false);
    let ehci_bound = driver_of(&tree, "0000:00:1d.0");

    let steps = engine_carries_out(&tree, &host, &old, &new, quick(), false);

    assert_eq!(ehci_bound.as_deref(), Some("vfio-pci"));
    assert_eq!(
        steps
            .iter()
            .map(|s| (s.direction, s.outcome.pci.to_string(), s.outcome.ok))
            .collect::<Vec<_>>(),
        vec![
            (Direction::Restore, "0000:00:1d.7".to_string(), true),
            (Direction::Bind, "0000:00:01.0".to_string(), true),
        ]
    );
    assert_eq!(
        driver_of(&tree, "0000:00:1d.0").as_deref(),
        Some("uhci_hcd")
    );
    assert_eq!(
        driver_of(&tree, "0000:00:01.0").as_deref(),
        Some("vfio-pci")
    );
    assert_ne!(state(&tree), first);
}

#[test]
fn engine_carry_out_never_forces_a_group_the_host_needs() {
    let tree = Tree::q35_usb().with_vfio();
    tree.usb_device("0000:00:01.0", 3, "3-1", ("03", "01", "01"));
    let host = FixtureDriverCore::new(&tree);
    let forced = BindOptions {
        force: true,
        ..quick()
    };

    let steps = engine_carries_out(&tree, &host, &[], &[rule("00:01.0", "lab")], forced, false);

    assert!(!steps[0].outcome.ok, "{:?}", steps[0].outcome);
    assert!(host.writes().is_empty(), "{:?}", host.writes());
}

#[test]
fn engine_carry_out_dry_run_says_what_it_would_write_and_writes_nothing() {
    let tree = Tree::q35_usb().with_vfio();
    let host = FixtureDriverCore::new(&tree);

    let steps = engine_carries_out(
        &tree,
        &host,
        &[],
        &[rule("00:1d.7", "win11")],
        quick(),
        true,
    );

    let message = &steps[0].outcome.message;
    assert!(
        message.starts_with("dry run: would move IOMMU group 7 to vfio-pci for VM win11: "),
        "{message}"
    );
    assert!(
        message.contains("0000:00:1d.0/driver_override"),
        "{message}"
    );
    assert!(host.writes().is_empty(), "{:?}", host.writes());
}

#[test]
fn engine_carry_out_dry_run_of_a_removed_rule_says_what_it_would_give_back() {
    let tree = Tree::q35_usb().with_vfio();
    let host = FixtureDriverCore::new(&tree);
    let old = [rule("00:1d.7", "win11")];
    engine_carries_out(&tree, &host, &[], &old, quick(), false);
    let writes = host.writes().len();

    let steps = engine_carries_out(&tree, &host, &old, &[], quick(), true);

    assert_eq!(steps[0].direction, Direction::Restore);
    let message = &steps[0].outcome.message;
    assert!(
        message.starts_with("dry run: would give IOMMU group 7 back to the host: "),
        "{message}"
    );
    assert_eq!(host.writes().len(), writes);
}
