//! Bind records outlive the daemon (issue 11): they live in the state directory, not in
//! the runtime directory systemd empties on every stop, and a restore is judged by the
//! drivers read back, never by the record alone. (A bind killed half-way, with the
//! runtime directory emptied before the restart, is in tests/crash_consistency.rs.)

use crate::vfio_support;

use usbroute::vfio::{self, BindOptions};
use vfio_support::{pci, FixtureDriverCore, Tree};

fn quick() -> BindOptions {
    BindOptions {
        force: false,
        wait: std::time::Duration::from_secs(2),
        settle: std::time::Duration::from_millis(200),
    }
}

#[test]
fn bind_keeps_its_record_in_the_state_directory() {
    let tree = Tree::q35_usb().with_vfio();
    let host = FixtureDriverCore::new(&tree);

    vfio::bind(&tree.root(), &host, &pci("00:1d.7"), &quick()).expect("bind");

    assert!(tree.path("var/lib/usbroute/vfio/7.json").is_file());
    assert!(!tree.path("run/usbroute/vfio/7.json").exists());
}

#[test]
fn restore_fails_when_a_member_stays_on_vfio_pci_though_every_write_was_accepted() {
    let tree = Tree::q35_usb().with_vfio();
    // A function no driver had before the bind: the record says "no driver".
    tree.function("0000:00:1d.3", 0x0c0300, None, Some(7));
    let host = FixtureDriverCore::new(&tree);
    vfio::bind(&tree.root(), &host, &pci("00:1d.7"), &quick()).expect("bind");
    let stuck = FixtureDriverCore::new(&tree).vfio_holds_on();

    let restored = vfio::restore(&tree.root(), &stuck, &pci("00:1d.7"), &quick());

    let message = restored.expect_err("restore must fail").to_string();
    assert!(
        message.contains("0000:00:1d.3 is still on vfio-pci"),
        "{message}"
    );
    assert!(tree.path("var/lib/usbroute/vfio/7.json").is_file());
}
