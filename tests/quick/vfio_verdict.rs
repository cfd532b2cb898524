//! The verdict on sysfs-shaped temp trees: groups, bridges, and what the host needs.

use crate::vfio_support;

use usbroute::vfio::{self, HostUse, VerdictStatus};
use vfio_support::{pci, Tree};

const KEYBOARD: (&str, &str, &str) = ("03", "01", "01");
const MOUSE: (&str, &str, &str) = ("03", "01", "02");

#[test]
fn xhci_alone_in_its_group_can_go_on_its_own() {
    let tree = Tree::q35_usb();

    let v = vfio::assess(&tree.root(), &pci("00:01.0")).expect("assess");

    assert_eq!(
        (v.status, v.can_pass, v.needs_force, v.iommu_group),
        (VerdictStatus::Alone, true, false, Some(3))
    );
    assert_eq!(
        v.summary,
        "can go to a VM on its own (alone in IOMMU group 3)"
    );
}

#[test]
fn ehci_names_its_three_uhci_companions_as_going_with_it() {
    let tree = Tree::q35_usb();

    let v = vfio::assess(&tree.root(), &pci("00:1d.7")).expect("assess");

    assert_eq!(v.status, VerdictStatus::WithGroup);
    assert_eq!(
        v.summary,
        "can go to a VM, but only together with 3 other device(s) of IOMMU group 7: \
         0000:00:1d.0 USB controller (UHCI), 0000:00:1d.1 USB controller (UHCI), \
         0000:00:1d.2 USB controller (UHCI)"
    );
}

#[test]
fn verdict_text_explains_what_an_iommu_group_is() {
    let tree = Tree::q35_usb();

    let text = vfio::assess(&tree.root(), &pci("00:1d.7"))
        .expect("assess")
        .to_text();

    assert!(
        text.contains("it can only fence off a whole group, so a VM gets a group or nothing"),
        "{text}"
    );
}

#[test]
fn pci_bridge_in_the_group_stays_and_does_not_count_as_going_with_it() {
    let tree = Tree::q35_usb();
    tree.function("0000:00:1c.0", 0x060400, Some("pcieport"), Some(3));

    let v = vfio::assess(&tree.root(), &pci("00:01.0")).expect("assess");

    assert_eq!(
        (v.status, v.bridges_stay.clone()),
        (VerdictStatus::Alone, vec![pci("00:1c.0")])
    );
}

#[test]
fn sata_member_with_the_mounted_root_makes_the_host_need_the_group() {
    let tree = Tree::q35_usb();
    tree.function("0000:00:1f.2", 0x010601, Some("ahci"), Some(7));
    tree.disk("0000:00:1f.2", "sda", "sda2");
    tree.file("proc/self/mounts", "/dev/sda2 / ext4 rw 0 0\n");

    let v = vfio::assess(&tree.root(), &pci("00:1d.7")).expect("assess");
    let sata = v
        .goes_with
        .iter()
        .find(|m| m.pci == pci("00:1f.2"))
        .expect("member");

    assert_eq!(
        (v.status, v.needs_force),
        (VerdictStatus::HostNeedsIt, true)
    );
    assert_eq!(
        sata.host_uses,
        vec![HostUse::MountedFilesystem {
            block_device: "sda2".into(),
            mount_point: "/".into()
        }]
    );
}

#[test]
fn root_on_device_mapper_is_traced_through_slaves_to_the_disk() {
    let tree = Tree::q35_usb();
    tree.function("0000:00:1f.2", 0x010601, Some("ahci"), Some(7));
    tree.disk("0000:00:1f.2", "sda", "sda3");
    tree.link("dev/mapper/vg-root", "../dm-0");
    tree.file("sys/class/block/dm-0/slaves/sda3/.keep", "");
    tree.file("proc/self/mounts", "/dev/mapper/vg-root / ext4 rw 0 0\n");

    let v = vfio::assess(&tree.root(), &pci("00:1d.7")).expect("assess");

    assert_eq!(v.status, VerdictStatus::HostNeedsIt);
}

#[test]
fn usb_stick_with_a_mounted_filesystem_on_the_controller_itself_is_named() {
    let tree = Tree::q35_usb();
    let block = format!(
        "{}/usb3/3-1/3-1:1.0/host2/target2:0:0/2:0:0:0/block/sdb",
        Tree::dev_dir("0000:00:01.0")
    );
    tree.file(&format!("{block}/sdb1/partition"), "1\n");
    tree.file(
        "proc/self/mounts",
        "/dev/sdb1 /media/my\\040stick vfat rw 0 0\n",
    );

    let v = vfio::assess(&tree.root(), &pci("00:01.0")).expect("assess");

    assert_eq!(
        v.host_uses,
        vec![HostUse::MountedFilesystem {
            block_device: "sdb1".into(),
            mount_point: "/media/my stick".into()
        }]
    );
}

#[test]
fn nic_carrying_a_host_route_in_the_group_is_named() {
    let tree = Tree::q35_usb();
    tree.function("0000:00:1f.6", 0x020000, Some("e1000e"), Some(3));
    tree.file(
        &format!("{}/net/enp0s31f6/ifindex", Tree::dev_dir("0000:00:1f.6")),
        "2\n",
    );
    tree.file(
        "proc/net/route",
        "Iface\tDestination\tGateway\nenp0s31f6\t00000000\t0100A8C0\n",
    );

    let v = vfio::assess(&tree.root(), &pci("00:01.0")).expect("assess");

    assert_eq!(
        v.goes_with[0].host_uses,
        vec![HostUse::RoutedNetwork {
            interface: "enp0s31f6".into()
        }]
    );
}

#[test]
fn nic_without_a_route_is_not_needed_by_the_host() {
    let tree = Tree::q35_usb();
    tree.function("0000:00:1f.6", 0x020000, Some("e1000e"), Some(3));
    tree.file(
        &format!("{}/net/enp0s31f6/ifindex", Tree::dev_dir("0000:00:1f.6")),
        "2\n",
    );

    let v = vfio::assess(&tree.root(), &pci("00:01.0")).expect("assess");

    assert_eq!(v.status, VerdictStatus::WithGroup);
}

#[test]
fn boot_vga_console_framebuffer_and_connected_display_are_named() {
    let tree = Tree::q35_usb();
    let gpu = Tree::dev_dir("0000:00:02.0");
    tree.function("0000:00:02.0", 0x030000, Some("i915"), Some(3));
    tree.file(&format!("{gpu}/boot_vga"), "1\n");
    tree.file(&format!("{gpu}/graphics/fb0/dev"), "29:0\n");
    tree.file(
        &format!("{gpu}/drm/card0/card0-HDMI-A-1/status"),
        "connected\n",
    );
    tree.file(
        &format!("{gpu}/drm/card0/card0-DP-1/status"),
        "disconnected\n",
    );

    let v = vfio::assess(&tree.root(), &pci("00:01.0")).expect("assess");

    assert_eq!(
        v.goes_with[0].host_uses,
        vec![
            HostUse::BootDisplay,
            HostUse::ConsoleFramebuffer {
                framebuffer: "fb0".into()
            },
            HostUse::ConnectedDisplay {
                connector: "card0-HDMI-A-1".into()
            },
        ]
    );
}

#[test]
fn controller_with_the_hosts_only_keyboard_needs_force() {
    let tree = Tree::q35_usb();
    tree.usb_device("0000:00:01.0", 3, "3-1", KEYBOARD);
    tree.usb_device("0000:00:1d.0", 1, "1-1", MOUSE);

    let v = vfio::assess(&tree.root(), &pci("00:01.0")).expect("assess");

    assert_eq!(
        v.host_uses,
        vec![HostUse::OnlyKeyboard {
            keyboards: vec!["3-1".into()]
        }]
    );
}

#[test]
fn controller_with_a_keyboard_is_fine_when_another_controller_has_one_too() {
    let tree = Tree::q35_usb();
    tree.usb_device("0000:00:01.0", 3, "3-1", KEYBOARD);
    tree.usb_device("0000:00:1d.0", 1, "1-1", KEYBOARD);

    let v = vfio::assess(&tree.root(), &pci("00:01.0")).expect("assess");

    assert_eq!(v.status, VerdictStatus::Alone);
}

#[test]
fn controller_with_a_keyboard_is_fine_when_a_ps2_keyboard_is_bound() {
    let tree = Tree::q35_usb();
    tree.usb_device("0000:00:01.0", 3, "3-1", KEYBOARD);
    tree.file("sys/bus/serio/drivers/atkbd/serio0/.keep", "");

    let v = vfio::assess(&tree.root(), &pci("00:01.0")).expect("assess");

    assert_eq!(v.status, VerdictStatus::Alone);
}

#[test]
fn no_iommu_groups_at_all_says_the_iommu_is_off_and_how_to_turn_it_on_for_amd() {
    let tree = Tree::new();
    tree.function("0000:00:14.0", 0x0c0330, Some("xhci_hcd"), None);
    tree.file("proc/cpuinfo", "vendor_id\t: AuthenticAMD\n");

    let v = vfio::assess(&tree.root(), &pci("00:14.0")).expect("assess");

    assert_eq!((v.status, v.can_pass), (VerdictStatus::NoIommu, false));
    assert_eq!(v.summary, "cannot go to a VM: the IOMMU is off");
    assert!(
        v.details[1].contains("enable AMD-Vi") && v.details[1].contains("amd_iommu=on"),
        "{:?}",
        v.details
    );
}

#[test]
fn device_outside_any_group_while_others_have_groups_is_called_uncovered() {
    let tree = Tree::q35_usb();
    tree.function("0000:00:14.0", 0x0c0330, Some("xhci_hcd"), None);

    let v = vfio::assess(&tree.root(), &pci("00:14.0")).expect("assess");

    assert_eq!(
        v.summary,
        "cannot go to a VM: the IOMMU does not cover it (it is in no IOMMU group)"
    );
}

#[test]
fn assessing_a_missing_device_names_it_and_where_to_look() {
    let tree = Tree::q35_usb();

    let err = vfio::assess(&tree.root(), &pci("00:14.0")).expect_err("missing");

    assert_eq!(
        err.to_string(),
        "There is no PCI device 0000:00:14.0 (no /sys/bus/pci/devices/0000:00:14.0); \
         `usbroute controllers` lists the USB controllers"
    );
}

#[test]
fn group_already_on_vfio_pci_is_reported_ready() {
    let tree = Tree::q35_usb();
    tree.driver("vfio-pci");
    tree.link(
        &format!("{}/driver", Tree::dev_dir("0000:00:01.0")),
        "../../../bus/pci/drivers/vfio-pci",
    );

    let v = vfio::assess(&tree.root(), &pci("00:01.0")).expect("assess");

    assert!(v.on_vfio);
}

#[test]
fn nvme_disk_without_a_block_glue_directory_is_found_by_its_subsystem_link() {
    let tree = Tree::q35_usb();
    let nvme = format!("{}/nvme/nvme0/nvme0n1", Tree::dev_dir("0000:00:1f.4"));
    tree.function("0000:00:1f.4", 0x010802, Some("nvme"), Some(3));
    tree.link(
        &format!("{nvme}/subsystem"),
        "../../../../../../class/block",
    );
    tree.link(
        &format!("{nvme}/nvme0n1p2/subsystem"),
        "../../../../../../../class/block",
    );
    tree.file("proc/self/mounts", "/dev/nvme0n1p2 /home ext4 rw 0 0\n");

    let v = vfio::assess(&tree.root(), &pci("00:01.0")).expect("assess");

    assert_eq!(
        v.goes_with[0].host_uses,
        vec![HostUse::MountedFilesystem {
            block_device: "nvme0n1p2".into(),
            mount_point: "/home".into()
        }]
    );
}

#[test]
fn disk_holding_active_swap_is_named() {
    let tree = Tree::q35_usb();
    tree.function("0000:00:1f.2", 0x010601, Some("ahci"), Some(3));
    tree.disk("0000:00:1f.2", "sda", "sda3");
    tree.file(
        "proc/swaps",
        "Filename\tType\tSize\tUsed\tPriority\n/dev/sda3 partition 1048572 0 -2\n",
    );

    let v = vfio::assess(&tree.root(), &pci("00:01.0")).expect("assess");

    assert_eq!(
        v.goes_with[0].host_uses,
        vec![HostUse::ActiveSwap {
            block_device: "sda3".into()
        }]
    );
}
