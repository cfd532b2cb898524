//! `usbroute controller ...` end to end on sysfs-shaped temp trees.

use crate::vfio_support;

use assert_cmd::Command;
use vfio_support::{state, Tree};

fn usbroute(tree: &Tree) -> Command {
    let mut cmd = Command::cargo_bin("usbroute").expect("binary");
    cmd.arg("--sysfs-root")
        .arg(tree.dir.path())
        .env_remove("USBROUTE_SYSFS_ROOT");
    cmd
}

#[test]
fn bind_dry_run_prints_the_verdict_and_every_write_in_order_and_changes_nothing() {
    let tree = Tree::q35_usb().with_vfio();
    let first = state(&tree);

    let out = usbroute(&tree)
        .args(["controller", "bind", "00:01.0", "--dry-run"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();

    assert_eq!(
        String::from_utf8_lossy(&out),
        "0000:00:01.0: can go to a VM on its own (alone in IOMMU group 3)
    IOMMU group 3: the IOMMU is the hardware that keeps a VM's devices from reaching the host's memory; it can only fence off a whole group, so a VM gets a group or nothing.
    0000:00:01.0 is alone in group 3: nothing else leaves the host with it.
--dry-run: would do, in order (nothing was changed):
   1. save each member's current driver to /var/lib/usbroute/vfio/3.json  # for `controller restore`
   2. write \"vfio-pci\" to /sys/bus/pci/devices/0000:00:01.0/driver_override  # from now on only vfio-pci may take 0000:00:01.0
   3. write \"0000:00:01.0\" to /sys/bus/pci/drivers/xhci_hcd/unbind  # xhci_hcd lets go of it
   4. write \"0000:00:01.0\" to /sys/bus/pci/drivers_probe  # vfio-pci takes it
   5. check that 0000:00:01.0 is now bound to vfio-pci
   6. wait up to 10 s for /dev/vfio/3 to appear
"
    );
    assert_eq!(state(&tree), first);
    assert!(!tree.path("var/lib/usbroute/vfio/3.json").exists());
}

#[test]
fn bind_on_a_tree_where_no_driver_reacts_fails_at_the_check_and_puts_the_override_back() {
    let tree = Tree::q35_usb().with_vfio();

    let assert = usbroute(&tree)
        .args(["controller", "bind", "00:01.0"])
        .assert()
        .failure();
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();

    assert!(
        stderr.contains("failed at \"check that 0000:00:01.0 is now bound to vfio-pci\"")
            && stderr.contains("0000:00:01.0 on xhci_hcd (as before)"),
        "{stderr}"
    );
    assert_eq!(
        tree.read(&format!(
            "{}/driver_override",
            Tree::dev_dir("0000:00:01.0")
        )),
        "\n"
    );
    assert!(!tree.path("var/lib/usbroute/vfio/3.json").exists());
}

#[test]
fn bind_of_a_group_the_host_needs_exits_non_zero_and_says_why_and_what_to_do() {
    let tree = Tree::q35_usb().with_vfio();
    tree.usb_device("0000:00:01.0", 3, "3-1", ("03", "01", "01"));

    let assert = usbroute(&tree)
        .args(["controller", "bind", "00:01.0", "--dry-run"])
        .assert()
        .failure();

    assert_eq!(
        String::from_utf8_lossy(&assert.get_output().stderr),
        "usbroute: Refusing to take IOMMU group 3 from the host: the controller itself has the \
         host's only keyboard (USB 3-1); the host would be left without one. If you are sure, pass \
         --force (`usbroute controller restore` gives it back)\n"
    );
}

#[test]
fn emit_prints_qemu_libvirt_and_xl_for_every_member_of_the_group() {
    let tree = Tree::q35_usb();

    let out = usbroute(&tree)
        .args(["controller", "emit", "00:1d.7", "--json"])
        .assert()
        .success();
    let json: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).expect("json");

    assert_eq!(
        json["qemu_args"],
        serde_json::json!([
            "-device",
            "pcie-root-port,id=usbroute-rp0,chassis=200",
            "-device",
            "vfio-pci,host=0000:00:1d.7,id=vfio-0000-00-1d.7,bus=usbroute-rp0,addr=0.7",
            "-device",
            "vfio-pci,host=0000:00:1d.2,id=vfio-0000-00-1d.2,bus=usbroute-rp0,addr=0.2",
            "-device",
            "vfio-pci,host=0000:00:1d.1,id=vfio-0000-00-1d.1,bus=usbroute-rp0,addr=0.1",
            "-device",
            "vfio-pci,host=0000:00:1d.0,id=vfio-0000-00-1d.0,bus=usbroute-rp0,addr=0.0,multifunction=on",
        ])
    );
    assert_eq!(
        json["xl"],
        "pci=['0000:00:1d.0', '0000:00:1d.1', '0000:00:1d.2', '0000:00:1d.7']"
    );
    assert!(json["libvirt_xml"]
        .as_str()
        .expect("xml")
        .contains("<address domain='0x0000' bus='0x00' slot='0x1d' function='0x7'/>"));
}

#[test]
fn check_json_carries_status_group_and_members() {
    let tree = Tree::q35_usb();

    let out = usbroute(&tree)
        .args(["controller", "check", "0000:00:1d.0", "--json"])
        .assert()
        .success();
    let json: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).expect("json");

    assert_eq!(
        (
            json["status"].as_str(),
            json["iommu_group"].as_u64(),
            json["goes_with"].as_array().map(Vec::len)
        ),
        (Some("with-group"), Some(7), Some(3))
    );
}

#[test]
fn bad_pci_address_is_named_with_the_expected_form() {
    let tree = Tree::q35_usb();

    let assert = usbroute(&tree)
        .args(["controller", "check", "00:1g.0"])
        .assert()
        .failure();

    assert!(String::from_utf8_lossy(&assert.get_output().stderr).contains(
        "`00:1g.0` is not a PCI address (expected DDDD:BB:SS.F such as 0000:00:14.0, or BB:SS.F)"
    ));
}
