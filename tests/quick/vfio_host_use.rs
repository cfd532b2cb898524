//! What the host needs, for the roots that hide it (issue 11): a ZFS root pool, a NIC
//! in a bridge or bond, /proc files that cannot be read. And what `controller bind`
//! then refuses: a group the host needs, a target that is not a USB controller.

use crate::vfio_support;

use usbroute::vfio::{self, BindOptions, ControllerRule, HostUse, VerdictStatus, VfioError};
use vfio_support::{pci, FixtureDriverCore, Tree};

fn quick() -> BindOptions {
    BindOptions {
        force: false,
        wait: std::time::Duration::from_secs(2),
        settle: std::time::Duration::from_millis(200),
    }
}

/// The q35 USB group 7 plus a SATA controller whose `sda2` holds the root of ZFS pool
/// `rpool` (as the kernel and udev show it: an anonymous `0:N` mount and a `zfs_member`).
fn with_zfs_root(tree: &Tree) {
    tree.function("0000:00:1f.2", 0x010601, Some("ahci"), Some(7));
    tree.disk("0000:00:1f.2", "sda", "sda2");
    tree.link("sys/dev/block/8:2", "../../class/block/sda2");
    tree.file(
        "run/udev/data/b8:2",
        "E:ID_FS_TYPE=zfs_member\nE:ID_FS_LABEL=rpool\nE:ID_FS_USAGE=filesystem\n",
    );
    tree.file(
        "proc/self/mountinfo",
        "1 0 0:21 / / rw,relatime shared:1 - zfs rpool/ROOT/debian rw,xattr,posixacl\n",
    );
}

/// An e1000e in group 7 whose `enp0s31f6` is enslaved to `bond0`, itself in bridge `br0`,
/// which carries the default route.
fn with_bridged_nic(tree: &Tree) {
    tree.function("0000:00:1f.6", 0x020000, Some("e1000e"), Some(7));
    let nic = format!("{}/net/enp0s31f6", Tree::dev_dir("0000:00:1f.6"));
    tree.file(&format!("{nic}/ifindex"), "2\n");
    tree.link(
        "sys/class/net/enp0s31f6",
        "../../devices/pci0000:00/0000:00:1f.6/net/enp0s31f6",
    );
    tree.link(&format!("{nic}/master"), "../../../virtual/net/bond0");
    tree.link(&format!("{nic}/upper_bond0"), "../../../virtual/net/bond0");
    tree.file("sys/devices/virtual/net/bond0/ifindex", "5\n");
    tree.link("sys/class/net/bond0", "../../devices/virtual/net/bond0");
    tree.link("sys/devices/virtual/net/bond0/master", "../br0");
    tree.file("sys/devices/virtual/net/br0/ifindex", "6\n");
    tree.file(
        "proc/net/route",
        "Iface\tDestination\tGateway\tFlags\nbr0\t00000000\t0100A8C0\t0003\n",
    );
}

fn uses_of(v: &vfio::PassthroughVerdict, addr: &str) -> Vec<HostUse> {
    v.goes_with
        .iter()
        .find(|m| m.pci == pci(addr))
        .expect("member")
        .host_uses
        .clone()
}

#[test]
fn sata_member_holding_a_zfs_root_pool_makes_the_host_need_the_group() {
    let tree = Tree::q35_usb();
    with_zfs_root(&tree);

    let v = vfio::assess(&tree.root(), &pci("00:1d.7")).expect("assess");

    assert_eq!(v.status, VerdictStatus::HostNeedsIt);
    assert_eq!(
        uses_of(&v, "00:1f.2"),
        [HostUse::MountedFilesystem {
            block_device: "sda2".into(),
            mount_point: "/".into()
        }]
    );
}

#[test]
fn nic_enslaved_to_a_bond_in_a_bridge_that_carries_the_route_makes_the_host_need_the_group() {
    let tree = Tree::q35_usb();
    with_bridged_nic(&tree);

    let v = vfio::assess(&tree.root(), &pci("00:1d.7")).expect("assess");

    assert_eq!(v.status, VerdictStatus::HostNeedsIt);
    assert_eq!(
        uses_of(&v, "00:1f.6"),
        [HostUse::EnslavedNetwork {
            interface: "enp0s31f6".into(),
            master: "br0".into()
        }]
    );
}

#[test]
fn an_unreadable_mount_table_counts_as_the_host_needing_a_member_with_disks() {
    let tree = Tree::q35_usb();
    tree.function("0000:00:1f.2", 0x010601, Some("ahci"), Some(7));
    tree.disk("0000:00:1f.2", "sda", "sda2");
    std::fs::remove_file(tree.path("proc/self/mounts")).expect("rm");
    // A directory where the file should be: reading it fails (EISDIR), even as root.
    std::fs::create_dir_all(tree.path("proc/self/mounts")).expect("mkdir");

    let v = vfio::assess(&tree.root(), &pci("00:1d.7")).expect("assess");

    assert_eq!(v.status, VerdictStatus::HostNeedsIt);
    assert!(
        matches!(uses_of(&v, "00:1f.2").as_slice(), [HostUse::Unknown { what }] if what.contains("/proc/self/mounts")),
        "{:?}",
        uses_of(&v, "00:1f.2")
    );
}

#[test]
fn an_unreadable_route_table_counts_as_the_host_needing_a_nic_member() {
    let tree = Tree::q35_usb();
    tree.function("0000:00:1f.6", 0x020000, Some("e1000e"), Some(7));
    tree.file(
        &format!("{}/net/enp0s31f6/ifindex", Tree::dev_dir("0000:00:1f.6")),
        "2\n",
    );
    std::fs::remove_file(tree.path("proc/net/route")).expect("rm");
    std::fs::create_dir_all(tree.path("proc/net/route")).expect("mkdir");

    let v = vfio::assess(&tree.root(), &pci("00:1d.7")).expect("assess");

    assert_eq!(v.status, VerdictStatus::HostNeedsIt);
}

#[test]
fn unreadable_proc_files_leave_a_group_of_only_usb_controllers_alone() {
    let tree = Tree::q35_usb();
    std::fs::remove_file(tree.path("proc/net/route")).expect("rm");
    std::fs::create_dir_all(tree.path("proc/net/route")).expect("mkdir");

    let v = vfio::assess(&tree.root(), &pci("00:1d.7")).expect("assess");

    assert_eq!(v.status, VerdictStatus::WithGroup);
}

#[test]
fn bind_and_controller_rules_never_unbind_ahci_or_e1000e_the_host_needs() {
    let tree = Tree::q35_usb().with_vfio();
    with_zfs_root(&tree);
    with_bridged_nic(&tree);
    let before = vfio_support::state(&tree);
    let host = FixtureDriverCore::new(&tree);

    let bound = vfio::bind(&tree.root(), &host, &pci("00:1d.7"), &quick());
    let rules = vfio::apply_controller_rules(
        &tree.root(),
        &host,
        &[ControllerRule {
            pci: pci("00:1d.7"),
            vm: "win11".into(),
        }],
        &quick(),
    );

    assert!(
        matches!(bound, Err(VfioError::HostNeedsGroup { .. })),
        "{bound:?}"
    );
    assert!(!rules.all_ok(), "{rules:?}");
    assert_eq!(host.writes(), []);
    assert_eq!(vfio_support::state(&tree), before);
}

#[test]
fn bind_refuses_a_function_that_is_not_a_usb_controller_unless_forced() {
    let tree = Tree::q35_usb().with_vfio();
    tree.function("0000:00:1f.2", 0x010601, Some("ahci"), Some(9));
    let host = FixtureDriverCore::new(&tree);

    let refused = vfio::bind(&tree.root(), &host, &pci("00:1f.2"), &quick());
    let writes_when_refused = host.writes().len();
    let forced = vfio::bind(
        &tree.root(),
        &host,
        &pci("00:1f.2"),
        &BindOptions {
            force: true,
            ..quick()
        },
    );

    let message = refused.expect_err("refused").to_string();
    assert!(
        message.contains("0000:00:1f.2 is a SATA controller, not a USB controller"),
        "{message}"
    );
    assert!(message.contains("--force"), "{message}");
    assert_eq!(writes_when_refused, 0);
    assert!(forced.is_ok(), "{forced:?}");
}
