//! `usbroute serve` applies `[[controller]]` rules (issue 6, persistence like driverctl):
//! at start, on reload for added rules, giving back removed ones; never forced; `--dry-run`
//! writes nothing; each outcome is in `status`. The sysfs is a temp-dir tree shaped like
//! the kernel's (see tests/vfio_support), so no real controller is touched. And while a
//! controller's VM runs (a real QEMU), device rules for devices on its IOMMU group do
//! not fire (issue 6, EVE's parentassigngrp). A rule removed while its VM runs keeps
//! the controller on vfio-pci until the VM stops (issue 11).

use crate::qemu_support;
use crate::serve_support;
use crate::vfio_support;

use std::time::Duration;
use usbroute::vfio::{self, BindOptions};
use vfio_support::{pci, state, FixtureDriverCore, Tree};

/// `usbroute serve` on `tree` with `config`, killed on drop.
struct Serve {
    daemon: serve_support::Serve,
    dir: tempfile::TempDir,
}

impl Serve {
    fn start(tree: &Tree, config: &str, extra: &[&str]) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("usbroute.toml"), config).unwrap();
        let daemon = serve_support::Serve::at(dir.path().join("control.sock"))
            .args(&["-v"])
            .args(extra)
            .config(dir.path().join("usbroute.toml"))
            .sysfs_root(tree.dir.path())
            .start();
        Serve { daemon, dir }
    }

    fn wait_until(&self, what: &str, ok: impl Fn(&Serve) -> bool) {
        self.daemon
            .wait_until(Duration::from_secs(10), what, || ok(self));
    }

    fn cli(&self, args: &[&str]) -> String {
        self.daemon.cli(args)
    }

    /// `status --json`'s `controllers`, as (pci, vm, ok, message).
    fn controllers(&self) -> Vec<(String, String, bool, String)> {
        self.daemon.status()["controllers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["pci"].as_str().unwrap().to_string(),
                    c["vm"].as_str().unwrap().to_string(),
                    c["ok"].as_bool().unwrap(),
                    c["message"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    fn write_config(&self, config: &str) {
        std::fs::write(self.dir.path().join("usbroute.toml"), config).unwrap();
    }
}

fn config(controllers: &[(&str, &str)]) -> String {
    let mut text = String::from(
        "[[vm]]\nname = \"win11\"\nqmp = \"/nonexistent/win11.qmp\"\n\n\
         [[vm]]\nname = \"lab\"\nqmp = \"/nonexistent/lab.qmp\"\n",
    );
    for (pci, vm) in controllers {
        text.push_str(&format!(
            "\n[[controller]]\npci = \"{pci}\"\nvm = \"{vm}\"\n"
        ));
    }
    text
}

#[test]
fn dry_run_at_start_says_what_it_would_bind_and_writes_nothing() {
    let tree = Tree::q35_usb().with_vfio();
    let before = state(&tree);

    let serve = Serve::start(&tree, &config(&[("0000:00:1d.7", "win11")]), &["--dry-run"]);
    serve.wait_until("the controller rule's outcome", |s| {
        !s.controllers().is_empty()
    });

    let controllers = serve.controllers();
    assert_eq!(controllers.len(), 1);
    assert_eq!(
        (
            controllers[0].0.as_str(),
            controllers[0].1.as_str(),
            controllers[0].2
        ),
        ("0000:00:1d.7", "win11", true)
    );
    assert!(
        controllers[0]
            .3
            .starts_with("dry run: would move IOMMU group 7 to vfio-pci for VM win11: "),
        "{}",
        controllers[0].3
    );
    assert_eq!(state(&tree), before);
}

#[test]
fn a_group_the_host_needs_is_not_taken_and_status_says_why() {
    let tree = Tree::q35_usb().with_vfio();
    tree.usb_device("0000:00:01.0", 3, "3-1", ("03", "01", "01"));
    let before = state(&tree);

    let serve = Serve::start(&tree, &config(&[("0000:00:01.0", "lab")]), &[]);
    serve.wait_until("the controller rule's outcome", |s| {
        !s.controllers().is_empty()
    });

    let controllers = serve.controllers();
    let text = serve.cli(&["status"]);
    assert!(!controllers[0].2, "{controllers:?}");
    assert!(
        controllers[0]
            .3
            .starts_with("Refusing to take IOMMU group 3 from the host"),
        "{controllers:?}"
    );
    assert!(
        text.contains("controller 0000:00:01.0 for vm lab: FAILED: Refusing"),
        "{text}"
    );
    assert_eq!(state(&tree), before);
}

#[test]
fn reload_binds_an_added_rule_and_gives_back_a_removed_one() {
    let tree = Tree::q35_usb().with_vfio();
    let serve = Serve::start(&tree, &config(&[("0000:00:1d.7", "win11")]), &["--dry-run"]);
    serve.wait_until("the first rule's outcome", |s| s.controllers().len() == 1);

    serve.write_config(&config(&[("0000:00:01.0", "lab")]));
    serve.cli(&["reload"]);
    serve.wait_until("both outcomes", |s| s.controllers().len() == 2);

    let messages: Vec<(String, String)> = serve
        .controllers()
        .into_iter()
        .map(|(pci, _, _, message)| (pci, message))
        .collect();
    assert!(
        messages[0]
            .1
            .starts_with("dry run: would move IOMMU group 3 to vfio-pci for VM lab"),
        "{messages:?}"
    );
    assert_eq!(messages[0].0, "0000:00:01.0");
    assert_eq!(messages[1].0, "0000:00:1d.7");
    assert!(
        messages[1]
            .1
            .starts_with("dry run: would give IOMMU group 7 back to the host"),
        "{messages:?}"
    );
}

#[test]
fn device_rule_for_a_device_on_a_uhci_companion_does_not_fire_while_the_ehci_vm_runs() {
    // The recorded guest: 6-1 is a device on the UHCI 0000:00:1d.2, which shares IOMMU
    // group 7 with the EHCI 0000:00:1d.7.
    let tree = Tree::from_recording(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/guest-xhci-ehci"
    )));
    let qmp_dir = tempfile::tempdir().unwrap();
    let qmp = qmp_dir.path().join("guest.qmp");
    let _qemu = qemu_support::QemuAt::spawn(&[&qmp], &["-machine", "q35", "-m", "64"]);
    let config = format!(
        "[[vm]]\nname = \"guest\"\nqmp = \"{}\"\n\n\
         [[controller]]\npci = \"0000:00:1d.7\"\nvm = \"guest\"\n\n\
         [[rule]]\nvm = \"guest\"\nmatch = \"port:6-1\"\nby = \"port\"\n",
        qmp.display()
    );
    // A dry run leaves the group on its USB drivers; the plan (what `why` shows) is the same.
    let serve = Serve::start(&tree, &config, &["--dry-run"]);
    serve.wait_until("the VM up", |s| {
        s.cli(&["status", "--json"]).contains("\"up\": true")
    });

    let why = serve.cli(&["why", "port:6-1"]);

    assert!(
        why.contains(
            "its controller 0000:00:1d.2 is given whole (with its IOMMU group) to running VM guest"
        ),
        "{why}"
    );
}

#[test]
fn removing_a_rule_while_its_vm_runs_keeps_the_controller_until_the_vm_stops() {
    let tree = Tree::q35_usb().with_vfio();
    // Bound by the rule earlier: every member on vfio-pci, its record, /dev/vfio/7.
    let settle = BindOptions {
        settle: Duration::from_millis(200),
        ..BindOptions::default()
    };
    vfio::bind(
        &tree.root(),
        &FixtureDriverCore::new(&tree),
        &pci("00:1d.7"),
        &settle,
    )
    .unwrap();
    let qmp_dir = tempfile::tempdir().unwrap();
    let qmp = qmp_dir.path().join("guest.qmp");
    let qemu = qemu_support::QemuAt::spawn(&[&qmp], &["-machine", "none"]);
    let vm = format!("[[vm]]\nname = \"guest\"\nqmp = \"{}\"\n", qmp.display());
    let rule = "\n[[controller]]\npci = \"0000:00:1d.7\"\nvm = \"guest\"\n";
    let serve = Serve::start(&tree, &format!("{vm}{rule}"), &[]);
    serve.wait_until("the VM up and its rule applied", |s| {
        s.cli(&["status", "--json"]).contains("\"up\": true") && s.controllers().len() == 1
    });
    let applied = serve.controllers()[0].3.clone();
    let unbind = "sys/bus/pci/drivers/vfio-pci/unbind";
    let unbind_before = tree.read(unbind);

    serve.write_config(&vm);
    serve.cli(&["reload"]);
    serve.wait_until("the removed rule's outcome", |s| {
        s.controllers()[0].3 != applied
    });
    let kept = serve.controllers();
    let unbind_while_running = tree.read(unbind);
    qemu.kill();
    serve.wait_until("the give-back once the VM stopped", |_| {
        tree.read(unbind) != unbind_before
    });

    assert_eq!(
        kept[0].3,
        "its rule is gone, but VM guest is running with it: it stays on vfio-pci; \
         it goes back to the host when guest stops"
    );
    assert_eq!(unbind_while_running, unbind_before);
}
