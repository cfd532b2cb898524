//! Detection, profile masks and register writes against PCH config-space fixtures.

use crate::routing_support;

use routing_support::*;
use std::collections::BTreeMap;
use usbroute::routing::control::ProfileRouter;
use usbroute::routing::detect::{detect, Registers};
use usbroute::routing::profile::{plan, EhciPort, Route};
use usbroute::routing::router::{PowerChange, Router};
use usbroute::routing::{ProfileConfig, RoutingConfig, RoutingError};

fn ehci_profile(ports: &[&str]) -> ProfileConfig {
    ProfileConfig {
        ehci: ports.iter().map(|s| s.to_string()).collect(),
        ..ProfileConfig::default()
    }
}

fn mask_profile(mask: &str) -> ProfileConfig {
    ProfileConfig {
        mask: Some(mask.into()),
        ..ProfileConfig::default()
    }
}

fn config() -> RoutingConfig {
    let mut c = RoutingConfig {
        toggle: vec!["host".into(), "guest".into()],
        ..RoutingConfig::default()
    };
    c.labels.insert("front-left".into(), "ehci2:3".into());
    c.profile.insert("host".into(), mask_profile("0x3fff"));
    c.profile.insert(
        "guest".into(),
        ehci_profile(&["ehci1:1", "ehci1:2", "front-left"]),
    );
    c.profile.insert("rear".into(), ehci_profile(&["ehci1:7"]));
    c
}

fn router(pch: &Pch) -> ProfileRouter<usbroute::routing::config_space::SysfsConfigSpace> {
    let detected = detect(&pch.root(), None).unwrap();
    ProfileRouter::new(Router::open(&pch.root(), detected), config())
}

#[test]
fn detect_finds_lynx_point_xhci_and_both_ehcis() {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);

    let d = detect(&pch.root(), None).unwrap();

    assert_eq!(d.xhci, pci(XHCI));
    assert_eq!(d.chipset.xhci_device_id, 0x8c31);
    assert_eq!(d.ehci_pci(1), Some(pci(EHCI1)));
    assert_eq!(d.ehci_pci(2), Some(pci(EHCI2)));
}

#[test]
fn detect_finds_wildcat_point() {
    let pch = Pch::wildcat_point(Regs::LYNX_DEFAULT);

    let d = detect(&pch.root(), None).unwrap();

    assert_eq!(d.chipset.name, "9-series Wildcat Point");
    assert_eq!(d.chipset.port_bits(), 0x3fff);
}

#[test]
fn detect_refuses_a_non_intel_xhci_and_names_it() {
    let pch = Pch::empty();
    pch.function(
        "0000:03:00.0",
        0x1033,
        0x0194,
        0x0c0330,
        Some(Regs::LYNX_DEFAULT),
    );

    let err = detect(&pch.root(), None).unwrap_err().to_string();

    assert!(
        err.contains("0000:03:00.0 is not an Intel xHCI (vendor 1033, device 0194"),
        "{err}"
    );
}

#[test]
fn detect_refuses_an_unknown_intel_chipset_naming_its_device_id() {
    let pch = Pch::empty();
    pch.function(XHCI, 0x8086, 0xa12f, 0x0c0330, Some(Regs::LYNX_DEFAULT));

    let err = detect(&pch.root(), Some(pci(XHCI))).unwrap_err();

    assert!(matches!(
        err,
        RoutingError::UnknownChipset { device: 0xa12f, .. }
    ));
    assert!(err.to_string().contains("8086:a12f"), "{err}");
}

#[test]
fn detect_refuses_an_intel_xhci_with_no_ehci_beside_it() {
    let pch = Pch::empty();
    pch.function(XHCI, 0x8086, 0x8c31, 0x0c0330, Some(Regs::LYNX_DEFAULT));

    let err = detect(&pch.root(), None).unwrap_err().to_string();

    assert!(err.contains("no Intel EHCI of that chipset"), "{err}");
}

#[test]
fn detect_with_a_configured_controller_that_is_absent_says_so() {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);

    let err = detect(&pch.root(), Some(pci("0000:00:10.0")))
        .unwrap_err()
        .to_string();

    assert!(err.contains("no PCI function 0000:00:10.0"), "{err}");
}

#[test]
fn registers_are_read_from_the_config_file() {
    let pch = Pch::lynx_point(Regs {
        xusb2pr: 0x1234,
        xusb2prm: 0x3ffe,
        usb3_pssen: 0x0f,
        usb3prm: 0x3f,
    });

    let regs = router(&pch).router().registers().unwrap();

    assert_eq!(
        regs,
        Registers {
            xusb2pr: 0x1234,
            xusb2prm: 0x3ffe,
            usb3_pssen: 0x0f,
            usb3prm: 0x3f
        }
    );
}

#[test]
fn a_config_file_cut_at_64_bytes_asks_for_root() {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
    let full = pch.config(XHCI);
    std::fs::write(pch.config_path(XHCI), &full[..64]).unwrap();

    let err = router(&pch).router().registers().unwrap_err();

    assert!(matches!(err, RoutingError::NotRoot { .. }), "{err}");
}

#[test]
fn ehci_profile_clears_the_bits_of_named_ports_and_labels() {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);

    let p = router(&pch).plan("guest").unwrap();

    // ehci1:1 = bit 0, ehci1:2 = bit 1, front-left = ehci2:3 = bit 10.
    assert_eq!(p.xusb2pr, 0x3fff & !0b11 & !(1 << 10));
    let moved: Vec<(String, Route)> = p.moves.iter().map(|m| (m.port.to_string(), m.to)).collect();
    assert_eq!(
        moved,
        vec![
            ("ehci1:1".into(), Route::Ehci),
            ("ehci1:2".into(), Route::Ehci),
            ("ehci2:3".into(), Route::Ehci)
        ]
    );
    assert_eq!(p.moves[2].label.as_deref(), Some("front-left"));
}

#[test]
fn ehci_profile_leaves_ports_the_firmware_does_not_let_switch_on_ehci() {
    let regs = Regs {
        xusb2pr: 0x00ff,
        xusb2prm: 0x00ff,
        ..Regs::LYNX_DEFAULT
    };
    let pch = Pch::lynx_point(regs);

    let p = router(&pch).plan("guest").unwrap();

    assert_eq!(p.xusb2pr, 0x00fc);
    assert_eq!(p.forbidden, 0);
    assert!(p
        .warnings
        .iter()
        .any(|w| w.contains("ehci2:3 (`front-left`) cannot be switched")));
}

#[test]
fn raw_mask_with_bits_xusb2prm_forbids_needs_force() {
    let pch = Pch::lynx_point(Regs {
        xusb2pr: 0x00ff,
        xusb2prm: 0x00ff,
        ..Regs::LYNX_DEFAULT
    });
    let mut r = router(&pch);
    let before = pch.config(XHCI);

    let err = r.apply("host", false).unwrap_err();

    assert!(matches!(err, RoutingError::Forbidden { .. }));
    assert!(err.to_string().contains("ehci2:1, ehci2:2"), "{err}");
    assert_eq!(pch.config(XHCI), before);
}

#[test]
fn raw_mask_with_forbidden_bits_is_written_with_force() {
    let pch = Pch::lynx_point(Regs {
        xusb2pr: 0x00ff,
        xusb2prm: 0x00ff,
        ..Regs::LYNX_DEFAULT
    });
    let mut r = router(&pch);

    let (plan, _) = r.apply("host", true).unwrap();

    assert_eq!(plan.forbidden, 0x3f00);
    assert_eq!(pch.xusb2pr(), 0x3fff);
}

#[test]
fn mask_beyond_the_chipsets_ports_is_refused() {
    let regs = Registers {
        xusb2pr: 0xff,
        xusb2prm: 0xff,
        usb3_pssen: 0xf,
        usb3prm: 0xf,
    };
    let lp = usbroute::routing::chipset::chipset_for_xhci(0x9cb1).unwrap();

    let err = plan("host", &mask_profile("0x3fff"), &BTreeMap::new(), lp, &regs).unwrap_err();

    assert!(err.to_string().contains("beyond the 8 ports"), "{err}");
}

#[test]
fn profile_with_both_mask_and_ehci_is_refused() {
    let regs = Registers {
        xusb2pr: 0x3fff,
        xusb2prm: 0x3fff,
        usb3_pssen: 0x3f,
        usb3prm: 0x3f,
    };
    let lynx = usbroute::routing::chipset::chipset_for_xhci(0x8c31).unwrap();
    let profile = ProfileConfig {
        mask: Some("0x3fff".into()),
        ehci: vec!["ehci1:1".into()],
        force: false,
    };

    let err = plan("x", &profile, &BTreeMap::new(), lynx, &regs).unwrap_err();

    assert!(err.to_string().contains("both `mask` and `ehci`"), "{err}");
}

#[test]
fn unknown_label_is_refused_with_a_hint() {
    let regs = Registers {
        xusb2pr: 0x3fff,
        xusb2prm: 0x3fff,
        usb3_pssen: 0x3f,
        usb3prm: 0x3f,
    };
    let lynx = usbroute::routing::chipset::chipset_for_xhci(0x8c31).unwrap();

    let err = plan("x", &ehci_profile(&["desk"]), &BTreeMap::new(), lynx, &regs).unwrap_err();

    assert!(
        err.to_string().contains("`desk` is neither a label"),
        "{err}"
    );
}

#[test]
fn port_that_the_chipset_lacks_is_refused() {
    let regs = Registers {
        xusb2pr: 0xff,
        xusb2prm: 0xff,
        usb3_pssen: 0xf,
        usb3prm: 0xf,
    };
    let lp = usbroute::routing::chipset::chipset_for_xhci(0x9c31).unwrap();

    let err = plan(
        "x",
        &ehci_profile(&["ehci2:1"]),
        &BTreeMap::new(),
        lp,
        &regs,
    )
    .unwrap_err();

    assert!(err.to_string().contains("has no port ehci2:1"), "{err}");
}

#[test]
fn routing_a_superspeed_port_to_ehci_clears_its_pssen_bit_with_a_warning() {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);

    let p = router(&pch).plan("guest").unwrap();

    // ehci1:1 and ehci1:2 (bits 0, 1) share connectors with SuperSpeed ports 1 and 2.
    assert_eq!(p.usb3_pssen, 0x3c);
    assert_eq!(
        p.warnings
            .iter()
            .filter(|w| w.contains("SuperSpeed lane"))
            .count(),
        2
    );
}

#[test]
fn routing_a_usb2_only_port_to_ehci_leaves_pssen_alone() {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);

    let p = router(&pch).plan("rear").unwrap();

    assert_eq!(p.usb3_pssen, 0x3f);
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

#[test]
fn applying_a_usb2_only_profile_writes_only_the_two_bytes_at_0xd0() {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
    let xhci_before = pch.config(XHCI);
    let ehci_before = (pch.config(EHCI1), pch.config(EHCI2));

    router(&pch).apply("rear", false).unwrap();

    // ehci1:7 = bit 6: 0x3fff -> 0x3fbf changes the low byte only.
    assert_eq!(changed_offsets(&xhci_before, &pch.config(XHCI)), vec![0xd0]);
    assert_eq!(pch.xusb2pr(), 0x3fbf);
    assert_eq!((pch.config(EHCI1), pch.config(EHCI2)), ehci_before);
}

#[test]
fn applying_a_superspeed_port_profile_writes_only_0xd0_and_0xd8() {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
    let before = pch.config(XHCI);

    router(&pch).apply("guest", false).unwrap();

    let changed = changed_offsets(&before, &pch.config(XHCI));
    assert!(
        changed
            .iter()
            .all(|o| (0xd0..0xd2).contains(o) || (0xd8..0xdc).contains(o)),
        "{changed:x?}"
    );
    assert_eq!(pch.xusb2pr(), 0x3bfc);
    assert_eq!(pch.usb3_pssen(), 0x3c);
}

#[test]
fn applying_host_after_guest_restores_the_file_byte_for_byte() {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
    let before = pch.config(XHCI);
    let mut r = router(&pch);

    r.apply("guest", false).unwrap();
    r.apply("host", false).unwrap();

    assert_eq!(pch.config(XHCI), before);
}

#[test]
fn non_default_routing_pins_runtime_pm_and_default_restores_it() {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
    let mut r = router(&pch);

    let (_, guest) = r.apply("guest", false).unwrap();
    let pinned = pch.read_power_control();
    let (_, host) = r.apply("host", false).unwrap();

    assert_eq!(
        (guest.power, pinned.as_str()),
        (PowerChange::PinnedOn, "on")
    );
    assert_eq!(
        (host.power, pch.read_power_control().as_str()),
        (PowerChange::Restored, "auto")
    );
}

#[test]
fn power_control_already_on_is_left_on() {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
    pch.power_control("on");
    let mut r = router(&pch);

    r.apply("guest", false).unwrap();
    let (_, host) = r.apply("host", false).unwrap();

    assert_eq!(
        (host.power, pch.read_power_control().as_str()),
        (PowerChange::Unchanged, "on")
    );
}

#[test]
fn reconcile_puts_back_a_routing_the_kernel_overwrote_on_resume() {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
    let mut r = router(&pch);
    r.apply("guest", false).unwrap();
    let applied = pch.config(XHCI);
    pch.kernel_resume_rewrite();

    let reapplied = r.reconcile().unwrap().unwrap();

    assert_eq!(
        (
            reapplied.profile.as_str(),
            reapplied.found,
            reapplied.restored
        ),
        ("guest", 0x3fff, 0x3bfc)
    );
    assert_eq!(pch.config(XHCI), applied);
}

#[test]
fn reconcile_repins_runtime_pm_someone_set_back_to_auto() {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
    let mut r = router(&pch);
    r.apply("guest", false).unwrap();
    pch.power_control("auto");
    pch.kernel_resume_rewrite();

    r.reconcile().unwrap();

    assert_eq!(pch.read_power_control(), "on");
}

#[test]
fn reconcile_does_nothing_while_the_routing_holds() {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
    let mut r = router(&pch);
    r.apply("guest", false).unwrap();
    let before = pch.config(XHCI);

    let outcome = r.reconcile().unwrap();

    assert_eq!(outcome, None);
    assert_eq!(pch.config(XHCI), before);
}

#[test]
fn active_profile_and_toggle_target_follow_the_register() {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
    let mut r = router(&pch);

    let at_start = (r.active_profile().unwrap(), r.toggle_target(None).unwrap());
    r.apply("guest", false).unwrap();
    let after_guest = (r.active_profile().unwrap(), r.toggle_target(None).unwrap());

    assert_eq!(at_start, (Some("host".to_string()), "guest".to_string()));
    assert_eq!(after_guest, (Some("guest".to_string()), "host".to_string()));
}

#[test]
fn wildcat_point_lp_guest_profile_maps_its_single_ehci() {
    let pch = Pch::wildcat_point_lp(Regs {
        xusb2pr: 0xff,
        xusb2prm: 0xff,
        usb3_pssen: 0xf,
        usb3prm: 0xf,
    });
    let detected = detect(&pch.root(), None).unwrap();
    let mut cfg = RoutingConfig::default();
    cfg.profile
        .insert("guest".into(), ehci_profile(&["ehci1:4", "ehci1:8"]));
    let mut r = ProfileRouter::new(Router::open(&pch.root(), detected), cfg);

    r.apply("guest", false).unwrap();

    assert_eq!(pch.xusb2pr(), 0x77);
    assert_eq!(pch.usb3_pssen(), 0x7);
}

#[test]
fn ehci_port_names_parse_and_map_to_bits() {
    let lynx = usbroute::routing::chipset::chipset_for_xhci(0x8c31).unwrap();

    let parsed = ["ehci1:1", "ehci2:6", "ehci2:7", "ehci3:1", "front"]
        .map(|s| EhciPort::parse(s).and_then(|p| p.bit(lynx)));

    assert_eq!(parsed, [Some(0), Some(13), None, None, None]);
}

#[test]
fn the_daemons_reapply_never_undoes_a_concurrent_apply() {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
    let mut cli = router(&pch);
    let mut daemon = router(&pch);
    let done = std::sync::atomic::AtomicBool::new(false);

    let spurious = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut spurious = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                spurious += daemon.reconcile().unwrap().is_some() as u32;
                std::thread::yield_now();
            }
            spurious
        });
        for i in 0..100 {
            cli.apply(if i % 2 == 0 { "guest" } else { "host" }, false)
                .unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        watcher.join().unwrap()
    });

    assert_eq!(
        spurious, 0,
        "the re-apply saw a half-done apply and rewrote the register"
    );
    assert_eq!(pch.xusb2pr(), 0x3fff);
}
