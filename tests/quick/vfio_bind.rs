//! `controller bind` / `restore` on sysfs-shaped temp trees: the right bytes to the right
//! files in the right order, the record, and roll-back after a failure at every write.

use crate::vfio_support;

use std::time::Duration;
use usbroute::vfio::{self, BindOptions, BindRecord, VfioError};
use vfio_support::{pci, state, w, FixtureDriverCore, Tree};

fn quick() -> BindOptions {
    BindOptions {
        force: false,
        wait: Duration::from_millis(200),
        settle: Duration::ZERO,
    }
}

const OVERRIDE_1D0: &str = "/sys/bus/pci/devices/0000:00:1d.0/driver_override";
const OVERRIDE_1D1: &str = "/sys/bus/pci/devices/0000:00:1d.1/driver_override";
const OVERRIDE_1D2: &str = "/sys/bus/pci/devices/0000:00:1d.2/driver_override";
const OVERRIDE_1D7: &str = "/sys/bus/pci/devices/0000:00:1d.7/driver_override";
const PROBE: &str = "/sys/bus/pci/drivers_probe";
const UHCI_UNBIND: &str = "/sys/bus/pci/drivers/uhci_hcd/unbind";
const VFIO_UNBIND: &str = "/sys/bus/pci/drivers/vfio-pci/unbind";

#[test]
fn bind_ehci_group_writes_override_unbind_probe_for_each_member_in_address_order() {
    let tree = Tree::q35_usb().with_vfio();
    let host = FixtureDriverCore::new(&tree);

    vfio::bind(&tree.root(), &host, &pci("00:1d.7"), &quick()).expect("bind");

    assert_eq!(
        host.writes(),
        vec![
            w(OVERRIDE_1D0, "vfio-pci"),
            w(UHCI_UNBIND, "0000:00:1d.0"),
            w(PROBE, "0000:00:1d.0"),
            w(OVERRIDE_1D1, "vfio-pci"),
            w(UHCI_UNBIND, "0000:00:1d.1"),
            w(PROBE, "0000:00:1d.1"),
            w(OVERRIDE_1D2, "vfio-pci"),
            w(UHCI_UNBIND, "0000:00:1d.2"),
            w(PROBE, "0000:00:1d.2"),
            w(OVERRIDE_1D7, "vfio-pci"),
            w("/sys/bus/pci/drivers/ehci-pci/unbind", "0000:00:1d.7"),
            w(PROBE, "0000:00:1d.7"),
        ]
    );
}

#[test]
fn bind_leaves_every_member_on_vfio_pci_and_records_its_earlier_driver() {
    let tree = Tree::q35_usb().with_vfio();
    let host = FixtureDriverCore::new(&tree);

    let done = vfio::bind(&tree.root(), &host, &pci("00:1d.0"), &quick()).expect("bind");
    let record = BindRecord::load(&tree.root(), 7)
        .expect("load")
        .expect("record");

    assert_eq!(done.dev_path, std::path::PathBuf::from("/dev/vfio/7"));
    assert!(done
        .members
        .iter()
        .all(|m| m.now.driver.as_deref() == Some("vfio-pci")));
    assert_eq!(
        record
            .members
            .iter()
            .map(|m| (m.pci.to_string(), m.driver.clone().unwrap_or_default()))
            .collect::<Vec<_>>(),
        vec![
            ("0000:00:1d.0".to_string(), "uhci_hcd".to_string()),
            ("0000:00:1d.1".to_string(), "uhci_hcd".to_string()),
            ("0000:00:1d.2".to_string(), "uhci_hcd".to_string()),
            ("0000:00:1d.7".to_string(), "ehci-pci".to_string()),
        ]
    );
}

#[test]
fn restore_after_bind_unbinds_vfio_clears_override_and_reprobes_ehci_first() {
    let tree = Tree::q35_usb().with_vfio();
    let host = FixtureDriverCore::new(&tree);
    vfio::bind(&tree.root(), &host, &pci("00:1d.7"), &quick()).expect("bind");
    host.log.borrow_mut().clear();

    vfio::restore(&tree.root(), &host, &pci("00:1d.7"), &quick()).expect("restore");

    assert_eq!(
        host.writes(),
        vec![
            w(VFIO_UNBIND, "0000:00:1d.7"),
            w(OVERRIDE_1D7, "\n"),
            w(PROBE, "0000:00:1d.7"),
            w(VFIO_UNBIND, "0000:00:1d.2"),
            w(OVERRIDE_1D2, "\n"),
            w(PROBE, "0000:00:1d.2"),
            w(VFIO_UNBIND, "0000:00:1d.1"),
            w(OVERRIDE_1D1, "\n"),
            w(PROBE, "0000:00:1d.1"),
            w(VFIO_UNBIND, "0000:00:1d.0"),
            w(OVERRIDE_1D0, "\n"),
            w(PROBE, "0000:00:1d.0"),
        ]
    );
}

#[test]
fn bind_then_restore_twice_returns_the_tree_to_its_first_state_and_drops_the_record() {
    let tree = Tree::q35_usb().with_vfio();
    let host = FixtureDriverCore::new(&tree);
    let first = state(&tree);

    for _ in 0..2 {
        vfio::bind(&tree.root(), &host, &pci("00:1d.7"), &quick()).expect("bind");
        vfio::restore(&tree.root(), &host, &pci("00:1d.7"), &quick()).expect("restore");
    }

    assert_eq!(state(&tree), first);
    assert!(BindRecord::load(&tree.root(), 7).expect("load").is_none());
}

#[test]
fn restore_rebinds_a_non_default_driver_by_name_when_reprobing_picks_another() {
    let tree = Tree::q35_usb().with_vfio();
    tree.driver("pci-stub");
    tree.link(
        &format!("{}/driver", Tree::dev_dir("0000:00:01.0")),
        "../../../bus/pci/drivers/pci-stub",
    );
    let host = FixtureDriverCore::new(&tree);
    vfio::bind(&tree.root(), &host, &pci("00:01.0"), &quick()).expect("bind");
    // The kernel's own choice for this function is xhci_hcd, not pci-stub.
    let host = FixtureDriverCore::new(&tree).default_driver("00:01.0", "xhci_hcd");

    vfio::restore(&tree.root(), &host, &pci("00:01.0"), &quick()).expect("restore");

    assert_eq!(
        host.writes(),
        vec![
            w(VFIO_UNBIND, "0000:00:01.0"),
            w("/sys/bus/pci/devices/0000:00:01.0/driver_override", "\n"),
            w(PROBE, "0000:00:01.0"),
            w("/sys/bus/pci/drivers/xhci_hcd/unbind", "0000:00:01.0"),
            w("/sys/bus/pci/drivers/pci-stub/bind", "0000:00:01.0"),
        ]
    );
}

#[test]
fn bind_failing_at_any_write_rolls_every_member_back_to_its_first_state() {
    let writes_in_a_bind = 12;
    let failures: Vec<String> = (1..=writes_in_a_bind)
        .filter_map(|n| {
            let tree = Tree::q35_usb().with_vfio();
            let first = state(&tree);
            let host = FixtureDriverCore::new(&tree).failing_write(n);
            let result = vfio::bind(&tree.root(), &host, &pci("00:1d.7"), &quick());
            let rolled_back =
                matches!(result, Err(VfioError::BindFailed { .. })) && state(&tree) == first;
            let record_gone = BindRecord::load(&tree.root(), 7).ok().flatten().is_none();
            (!(rolled_back && record_gone))
                .then(|| format!("write {n}: {result:?}, state {:?}", state(&tree)))
        })
        .collect();

    assert_eq!(failures, Vec::<String>::new());
}

#[test]
fn bind_failure_message_names_the_step_and_each_members_state() {
    let tree = Tree::q35_usb().with_vfio();
    let host = FixtureDriverCore::new(&tree).failing_write(5);

    let err = vfio::bind(&tree.root(), &host, &pci("00:1d.7"), &quick()).expect_err("must fail");

    assert_eq!(
        err.to_string(),
        "Binding IOMMU group 7 to vfio-pci failed at \"write \"0000:00:1d.1\" to \
         /sys/bus/pci/drivers/uhci_hcd/unbind  # uhci_hcd lets go of it\": the kernel refused it \
         (Input/output error (os error 5)). Rolled back. Each member now: 0000:00:1d.0 on uhci_hcd \
         (as before), 0000:00:1d.1 on uhci_hcd (as before), 0000:00:1d.2 on uhci_hcd (as before), \
         0000:00:1d.7 on ehci-pci (as before)"
    );
}

#[test]
fn bind_when_vfio_pci_refuses_a_member_rolls_back_and_says_so() {
    let tree = Tree::q35_usb().with_vfio();
    let first = state(&tree);
    let host = FixtureDriverCore::new(&tree).vfio_refuses("00:1d.2");

    let err = vfio::bind(&tree.root(), &host, &pci("00:1d.7"), &quick()).expect_err("must fail");

    assert!(
        err.to_string()
            .contains("0000:00:1d.2 is on no driver instead of vfio-pci"),
        "{err}"
    );
    assert_eq!(state(&tree), first);
}

#[test]
fn bind_when_dev_vfio_never_appears_rolls_back_after_the_timeout() {
    let tree = Tree::q35_usb().with_vfio();
    let first = state(&tree);
    let host = FixtureDriverCore::new(&tree).without_dev_nodes();

    let err = vfio::bind(&tree.root(), &host, &pci("00:01.0"), &quick()).expect_err("must fail");

    assert!(
        err.to_string()
            .contains("/dev/vfio/3 did not appear within 0.2 s"),
        "{err}"
    );
    assert_eq!(state(&tree), first);
}

#[test]
fn bind_loads_vfio_pci_first_when_its_driver_directory_is_missing() {
    let tree = Tree::q35_usb();
    let host = FixtureDriverCore::new(&tree);

    vfio::bind(&tree.root(), &host, &pci("00:01.0"), &quick()).expect("bind");

    assert_eq!(
        host.writes(),
        vec![
            w("modprobe", "vfio-pci"),
            w(
                "/sys/bus/pci/devices/0000:00:01.0/driver_override",
                "vfio-pci"
            ),
            w("/sys/bus/pci/drivers/xhci_hcd/unbind", "0000:00:01.0"),
            w(PROBE, "0000:00:01.0"),
        ]
    );
}

#[test]
fn bind_refuses_a_group_holding_the_mounted_root_filesystem_without_force() {
    let tree = Tree::q35_usb().with_vfio();
    tree.function("0000:00:1f.2", 0x010601, Some("ahci"), Some(7));
    tree.disk("0000:00:1f.2", "sda", "sda2");
    tree.file("proc/self/mounts", "/dev/sda2 / ext4 rw,relatime 0 0\n");
    let first = state(&tree);
    let host = FixtureDriverCore::new(&tree);

    let err = vfio::bind(&tree.root(), &host, &pci("00:1d.7"), &quick()).expect_err("must refuse");

    assert!(
        err.to_string().contains(
            "0000:00:1f.2 (in the same group) holds the host's mounted filesystem / (sda2)"
        ),
        "{err}"
    );
    assert_eq!((host.writes(), state(&tree)), (vec![], first));
}

#[test]
fn bind_with_force_takes_a_group_the_host_seems_to_need() {
    let tree = Tree::q35_usb().with_vfio();
    tree.function("0000:00:1f.2", 0x010601, Some("ahci"), Some(7));
    tree.disk("0000:00:1f.2", "sda", "sda2");
    tree.file("proc/self/mounts", "/dev/sda2 /data ext4 rw 0 0\n");
    let host = FixtureDriverCore::new(&tree);
    let opts = BindOptions {
        force: true,
        ..quick()
    };

    let done = vfio::bind(&tree.root(), &host, &pci("00:1d.7"), &opts).expect("bind");

    assert_eq!(done.members.len(), 5);
}

#[test]
fn bind_skips_pci_bridges_of_the_group() {
    let tree = Tree::q35_usb().with_vfio();
    tree.function("0000:00:1c.0", 0x060400, Some("pcieport"), Some(3));
    let host = FixtureDriverCore::new(&tree);

    vfio::bind(&tree.root(), &host, &pci("00:01.0"), &quick()).expect("bind");

    assert!(host
        .writes()
        .iter()
        .all(|w| !w.value.contains("1c.0") && !w.path.contains("1c.0")));
}

#[test]
fn bind_without_iommu_group_changes_nothing_and_says_how_to_enable_it() {
    let tree = Tree::new().with_vfio();
    tree.function("0000:00:14.0", 0x0c0330, Some("xhci_hcd"), None);
    let host = FixtureDriverCore::new(&tree);

    let err = vfio::bind(&tree.root(), &host, &pci("00:14.0"), &quick()).expect_err("no group");

    assert!(err.to_string().contains("intel_iommu=on"), "{err}");
    assert_eq!(host.writes(), vec![]);
}

#[test]
fn restore_without_record_gives_vfio_members_their_default_driver() {
    let tree = Tree::q35_usb().with_vfio();
    tree.link(
        &format!("{}/driver", Tree::dev_dir("0000:00:01.0")),
        "../../../bus/pci/drivers/vfio-pci",
    );
    tree.file(
        &format!("{}/driver_override", Tree::dev_dir("0000:00:01.0")),
        "vfio-pci\n",
    );
    let host = FixtureDriverCore::new(&tree);

    let done = vfio::restore(&tree.root(), &host, &pci("00:01.0"), &quick()).expect("restore");

    assert_eq!(
        host.writes(),
        vec![
            w(VFIO_UNBIND, "0000:00:01.0"),
            w("/sys/bus/pci/devices/0000:00:01.0/driver_override", "\n"),
            w(PROBE, "0000:00:01.0"),
        ]
    );
    assert!(!done.had_record);
}

#[test]
fn bind_after_a_crash_half_way_keeps_the_first_records_drivers() {
    let tree = Tree::q35_usb().with_vfio();
    let host = FixtureDriverCore::new(&tree);
    let opts = quick();
    // A crash after the first member: its record exists and it sits on vfio-pci.
    let plan = vfio::plan_bind(&tree.root(), &host, &pci("00:1d.7"), &opts).expect("plan");
    plan.record.save(&tree.root()).expect("save");
    tree.link(
        &format!("{}/driver", Tree::dev_dir("0000:00:1d.0")),
        "../../../bus/pci/drivers/vfio-pci",
    );

    vfio::bind(&tree.root(), &host, &pci("00:1d.7"), &opts).expect("bind");
    let record = BindRecord::load(&tree.root(), 7)
        .expect("load")
        .expect("record");

    assert_eq!(record.members[0].driver.as_deref(), Some("uhci_hcd"));
}

#[test]
fn bind_of_a_group_bound_by_hand_writes_no_record_so_restore_uses_default_drivers() {
    let tree = Tree::q35_usb().with_vfio();
    tree.link(
        &format!("{}/driver", Tree::dev_dir("0000:00:01.0")),
        "../../../bus/pci/drivers/vfio-pci",
    );
    tree.file("dev/vfio/3", "");
    let host = FixtureDriverCore::new(&tree);

    let done = vfio::bind(&tree.root(), &host, &pci("00:01.0"), &quick()).expect("bind");

    assert!(done.already_bound);
    assert!(BindRecord::load(&tree.root(), 3).expect("load").is_none());
}

#[test]
fn restore_when_the_earlier_driver_is_gone_says_so_and_keeps_the_record() {
    let tree = Tree::q35_usb().with_vfio();
    let host = FixtureDriverCore::new(&tree);
    vfio::bind(&tree.root(), &host, &pci("00:01.0"), &quick()).expect("bind");
    std::fs::remove_dir_all(tree.path("sys/bus/pci/drivers/xhci_hcd")).expect("rmmod");

    let err = vfio::restore(&tree.root(), &host, &pci("00:01.0"), &quick()).expect_err("no driver");

    assert!(
        err.to_string().contains("is the xhci_hcd module loaded?")
            && err
                .to_string()
                .contains("0000:00:01.0 on no driver (was xhci_hcd)"),
        "{err}"
    );
    assert!(BindRecord::load(&tree.root(), 3).expect("load").is_some());
}

#[test]
fn bind_of_a_bridge_alone_in_its_group_says_there_is_nothing_to_pass() {
    let tree = Tree::q35_usb().with_vfio();
    tree.function("0000:00:1c.0", 0x060400, Some("pcieport"), Some(11));
    let host = FixtureDriverCore::new(&tree);

    let err = vfio::bind(&tree.root(), &host, &pci("00:1c.0"), &quick()).expect_err("bridge");

    assert!(
        matches!(err, VfioError::OnlyBridges { group: 11, .. }),
        "{err}"
    );
    assert_eq!(host.writes(), vec![]);
}
