//! Bind records outlive the daemon (issue 11): they live in the state directory, not in
//! the runtime directory systemd empties on every stop, and a restore is judged by the
//! drivers read back, never by the record alone.

mod vfio_support;

use std::cell::Cell;
use std::io;
use std::path::Path;
use usbroute::inventory::PciAddress;
use usbroute::vfio::{self, BindOptions, PciHost};
use vfio_support::{pci, FixtureDriverCore, Tree};

fn quick() -> BindOptions {
    BindOptions {
        force: false,
        wait: std::time::Duration::from_secs(2),
        settle: std::time::Duration::from_millis(200),
    }
}

/// The kernel's driver core that "dies" (panics, unwinding out of bind with no roll-back,
/// as a SIGKILL would leave it) just before its Nth write.
struct DiesAtWrite<'a> {
    core: &'a FixtureDriverCore,
    at: usize,
    writes: Cell<usize>,
}

impl PciHost for DiesAtWrite<'_> {
    fn write_attr(&self, path: &Path, value: &[u8]) -> io::Result<()> {
        self.writes.set(self.writes.get() + 1);
        if self.writes.get() == self.at {
            panic!("killed before write {}", self.at);
        }
        self.core.write_attr(path, value)
    }
    fn read_attr(&self, path: &Path) -> Option<String> {
        self.core.read_attr(path)
    }
    fn driver_of(&self, pci: &PciAddress) -> Option<String> {
        self.core.driver_of(pci)
    }
    fn exists(&self, path: &Path) -> bool {
        self.core.exists(path)
    }
    fn load_module(&self, module: &str) -> io::Result<()> {
        self.core.load_module(module)
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
fn killed_mid_bind_then_restarted_with_an_emptied_runtime_directory_restore_returns_every_member() {
    // Writes of the EHCI group's bind: 4 members x (override, unbind, probe).
    for at in 2..=12 {
        let tree = Tree::q35_usb().with_vfio();
        let first = vfio_support::state(&tree);
        let core = FixtureDriverCore::new(&tree);
        let dying = DiesAtWrite {
            core: &core,
            at,
            writes: Cell::new(0),
        };
        let killed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            vfio::bind(&tree.root(), &dying, &pci("00:1d.7"), &quick())
        }));
        assert!(killed.is_err(), "bind did not reach write {at}");
        // systemd empties RuntimeDirectory= when the daemon stops.
        let _ = std::fs::remove_dir_all(tree.path("run/usbroute"));

        // The restarted daemon applies its [[controller]] rule again, later it is removed.
        vfio::bind(&tree.root(), &core, &pci("00:1d.7"), &quick()).expect("bind again");
        let restored = vfio::restore(&tree.root(), &core, &pci("00:1d.7"), &quick());

        assert!(restored.is_ok(), "killed at write {at}: {restored:?}");
        assert_eq!(vfio_support::state(&tree), first, "killed at write {at}");
    }
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
