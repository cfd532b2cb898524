//! Verdicts, bind and restore on the recording of the real test-bed guest
//! (tests/fixtures/guest-xhci-ehci: kernel 6.12, q35 + intel-iommu; xHCI 00:03.0 alone in
//! group 3, EHCI 00:1d.7 with UHCI companions 1d.0-1d.2 in group 4; keyboards on the
//! xHCI (1-1, 1-2.3.1) and on the third UHCI (6-1)).

use crate::vfio_support;

use std::path::Path;
use std::time::Duration;
use usbroute::vfio::{self, BindOptions, BindRecord, HostUse, VerdictStatus, VfioError};
use vfio_support::{pci, state, w, FixtureDriverCore, Tree};

fn guest() -> Tree {
    Tree::from_recording(Path::new("tests/fixtures/guest-xhci-ehci")).with_vfio()
}

fn quick() -> BindOptions {
    BindOptions {
        force: false,
        wait: Duration::from_millis(200),
        settle: Duration::ZERO,
    }
}

#[test]
fn recorded_xhci_is_alone_and_its_keyboards_are_not_the_hosts_only_ones() {
    let tree = guest();

    let v = vfio::assess(&tree.root(), &pci("00:03.0")).expect("assess");

    assert_eq!(
        (v.status, v.iommu_group, v.host_uses.clone()),
        (VerdictStatus::Alone, Some(3), vec![])
    );
}

#[test]
fn recorded_xhci_without_the_uhci_keyboard_holds_the_only_keyboards() {
    let tree = guest();
    std::fs::remove_file(tree.path("sys/bus/usb/devices/6-1:1.0")).expect("unlink");
    std::fs::remove_dir_all(tree.path("sys/devices/pci0000:00/0000:00:1d.2/usb6/6-1")).expect("rm");

    let v = vfio::assess(&tree.root(), &pci("00:03.0")).expect("assess");

    assert_eq!(
        v.host_uses,
        vec![HostUse::OnlyKeyboard {
            keyboards: vec!["1-1".into(), "1-2.3.1".into()]
        }]
    );
}

#[test]
fn recorded_ehci_goes_with_its_three_uhci_companions_in_group_4() {
    let tree = guest();

    let v = vfio::assess(&tree.root(), &pci("00:1d.7")).expect("assess");

    assert_eq!(
        (
            v.status,
            v.goes_with
                .iter()
                .map(|m| m.pci.to_string())
                .collect::<Vec<_>>()
        ),
        (
            VerdictStatus::WithGroup,
            vec![
                "0000:00:1d.0".to_string(),
                "0000:00:1d.1".to_string(),
                "0000:00:1d.2".to_string()
            ]
        )
    );
}

#[test]
fn recorded_xhci_bind_writes_override_unbind_probe_and_restore_undoes_them() {
    let tree = guest();
    let first = state(&tree);
    let host = FixtureDriverCore::new(&tree);

    vfio::bind(&tree.root(), &host, &pci("00:03.0"), &quick()).expect("bind");
    vfio::restore(&tree.root(), &host, &pci("00:03.0"), &quick()).expect("restore");

    assert_eq!(
        host.writes(),
        vec![
            w(
                "/sys/bus/pci/devices/0000:00:03.0/driver_override",
                "vfio-pci"
            ),
            w("/sys/bus/pci/drivers/xhci_hcd/unbind", "0000:00:03.0"),
            w("/sys/bus/pci/drivers_probe", "0000:00:03.0"),
            w("/sys/bus/pci/drivers/vfio-pci/unbind", "0000:00:03.0"),
            w("/sys/bus/pci/devices/0000:00:03.0/driver_override", "\n"),
            w("/sys/bus/pci/drivers_probe", "0000:00:03.0"),
        ]
    );
    assert_eq!(state(&tree), first);
}

#[test]
fn recorded_ehci_group_bind_and_restore_twice_ends_where_it_started() {
    let tree = guest();
    let first = state(&tree);
    let host = FixtureDriverCore::new(&tree);

    for _ in 0..2 {
        vfio::bind(&tree.root(), &host, &pci("00:1d.7"), &quick()).expect("bind");
        vfio::restore(&tree.root(), &host, &pci("00:1d.7"), &quick()).expect("restore");
    }

    assert_eq!(state(&tree), first);
    assert_eq!(host.writes().len(), 2 * (12 + 12));
}

#[test]
fn recorded_ehci_group_bind_failing_at_any_write_rolls_back() {
    let writes_in_a_bind = 12;
    let failures: Vec<String> = (1..=writes_in_a_bind)
        .filter_map(|n| {
            let tree = guest();
            let first = state(&tree);
            let host = FixtureDriverCore::new(&tree).failing_write(n);
            let result = vfio::bind(&tree.root(), &host, &pci("00:1d.7"), &quick());
            let ok = matches!(result, Err(VfioError::BindFailed { .. }))
                && state(&tree) == first
                && BindRecord::load(&tree.root(), 4).ok().flatten().is_none();
            (!ok).then(|| format!("write {n}: {result:?}"))
        })
        .collect();

    assert_eq!(failures, Vec::<String>::new());
}

#[test]
fn recorded_guest_without_iommu_says_the_iommu_is_off_and_how_to_turn_it_on() {
    let tree = Tree::from_recording(Path::new("tests/fixtures/guest-no-iommu"));

    let v = vfio::assess(&tree.root(), &pci("00:03.0")).expect("assess");

    assert_eq!(
        (v.status, v.summary.as_str()),
        (
            VerdictStatus::NoIommu,
            "cannot go to a VM: the IOMMU is off"
        )
    );
    // The test tree says the CPU is Intel (the recording has no /proc/cpuinfo).
    assert!(
        v.details[1].contains("enable VT-d") && v.details[1].contains("add intel_iommu=on"),
        "{:?}",
        v.details
    );
}

#[test]
fn recorded_rich_guest_ehci_dry_run_plans_four_members_and_the_dev_node() {
    let tree = Tree::from_recording(Path::new("tests/fixtures/guest-rich")).with_vfio();
    let host = FixtureDriverCore::new(&tree);

    let plan = vfio::plan_bind(&tree.root(), &host, &pci("00:1d.7"), &quick()).expect("plan");

    assert_eq!(
        plan.steps
            .iter()
            .map(ToString::to_string)
            .filter(|s| s.starts_with("write"))
            .count(),
        12
    );
    assert_eq!(
        plan.steps.last().map(ToString::to_string).as_deref(),
        Some("wait up to 0.2 s for /dev/vfio/4 to appear")
    );
    assert_eq!(host.writes(), vec![]);
}
