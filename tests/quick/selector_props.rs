//! Property tests of the selector grammar: printing round-trips, no input panics.

use proptest::prelude::*;
use usbroute::inventory::{ControllerName, PciAddress, PhysicalPort, PortPath};
use usbroute::selector::{Pattern, Selector, Term};

fn port_path() -> impl Strategy<Value = PortPath> {
    (1u8..=255, prop::collection::vec(1u8..=255, 1..=7))
        .prop_map(|(bus, ports)| PortPath { bus, ports })
}

fn pci_address() -> impl Strategy<Value = PciAddress> {
    (any::<u16>(), any::<u8>(), 0u8..32, 0u8..8).prop_map(|(domain, bus, device, function)| {
        PciAddress {
            domain,
            bus,
            device,
            function,
        }
    })
}

fn physical_port() -> impl Strategy<Value = PhysicalPort> {
    let controller = prop_oneof![
        pci_address().prop_map(ControllerName::Pci),
        "[a-z][a-z0-9_.:-]{0,15}".prop_map(ControllerName::Platform),
    ];
    (
        controller,
        any::<bool>(),
        prop::collection::vec(1u8..=255, 1..=7),
    )
        .prop_map(|(controller, superspeed, ports)| PhysicalPort {
            controller,
            superspeed,
            ports,
        })
}

fn pattern<T: std::fmt::Debug + Clone + 'static>(
    exact: impl Strategy<Value = T> + 'static,
) -> impl Strategy<Value = Pattern<T>> {
    prop_oneof![Just(Pattern::Any), exact.prop_map(Pattern::Exact)]
}

fn term() -> impl Strategy<Value = Term> {
    prop_oneof![
        port_path().prop_map(Term::Port),
        port_path().prop_map(Term::Hub),
        physical_port().prop_map(Term::PhysicalPort),
        physical_port().prop_map(Term::PhysicalHub),
        (pattern(any::<u16>()), pattern(any::<u16>()))
            .prop_map(|(vendor, product)| Term::Id { vendor, product }),
        (1u8..=255, 1u16..=127).prop_map(|(bus, address)| Term::Addr { bus, address }),
        ".+".prop_map(Term::Serial),
        any::<u8>().prop_map(Term::Class),
        (
            pattern(any::<u8>()),
            pattern(any::<u8>()),
            pattern(any::<u8>())
        )
            .prop_map(|(class, subclass, protocol)| Term::Iface {
                class,
                subclass,
                protocol
            }),
        pci_address().prop_map(Term::Controller),
    ]
}

fn selector() -> impl Strategy<Value = Selector> {
    prop::collection::vec(term(), 1..5).prop_map(|terms| Selector { terms })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn printed_selector_parses_to_same_selector(sel in selector()) {
        let printed = sel.to_string();
        let parsed: Selector = printed.parse().map_err(|e| TestCaseError::fail(format!("{printed}: {e}")))?;
        prop_assert_eq!(parsed, sel);
    }

    #[test]
    fn arbitrary_string_never_panics(s in ".*") {
        let _ = s.parse::<Selector>();
    }

    #[test]
    fn grammar_shaped_string_never_panics(s in "[a-z]{0,10}:?[0-9a-fA-F*:.,\"\\\\ -]{0,24}") {
        let _ = s.parse::<Selector>();
    }

    #[test]
    fn accepted_string_prints_to_fixed_point(s in "(port|hub|id|addr|class|iface|serial)?:?(platform:)?[0-9a-f*:./,-]{1,16}") {
        if let Ok(sel) = s.parse::<Selector>() {
            let reparsed: Selector = sel.to_string().parse().map_err(|e| TestCaseError::fail(format!("{sel}: {e}")))?;
            prop_assert_eq!(reparsed, sel);
        }
    }
}

/// A small universe, so that random devices often match random selectors.
fn small_device() -> impl Strategy<Value = usbroute::inventory::Device> {
    (
        prop::sample::select(vec!["1-1", "1-2", "1-2.1", "1-2.1.3", "2-1"]),
        1u16..4,
        prop::sample::select(vec![(0x046d, 0xc016), (0x046d, 0x0001), (0x0781, 0xc016)]),
        prop::option::of(prop::sample::select(vec!["A", "B"])),
        prop::sample::select(vec!["0000:00:14.0", "0000:00:1d.0", "platform:vhci_hcd.0"]),
        0u8..4,
    )
        .prop_map(|(port, address, (v, p), serial, controller, class)| {
            let port: PortPath = port.parse().expect("port");
            let controller: ControllerName = controller.parse().expect("controller");
            let pci = match &controller {
                ControllerName::Pci(pci) => Some(*pci),
                ControllerName::Platform(_) => None,
            };
            let physical_port = PhysicalPort {
                controller,
                superspeed: false,
                ports: port.ports.clone(),
            };
            usbroute::inventory::Device {
                address: Some(address),
                vendor_id: Some(usbroute::inventory::HexId(v)),
                product_id: Some(usbroute::inventory::HexId(p)),
                serial: serial.map(str::to_string),
                class: Some(usbroute::inventory::ClassTriple {
                    class,
                    subclass: 0,
                    protocol: 0,
                }),
                controller: pci,
                physical_port: Some(physical_port),
                ..usbroute::inventory::Device::at(port)
            }
        })
}

fn small_selector() -> impl Strategy<Value = Selector> {
    let term = prop::sample::select(vec![
        "port:1-1",
        "port:1-2",
        "port:1-2.1",
        "port:2-1",
        "hub:1-2",
        "hub:1-2.1",
        "addr:1.1",
        "addr:1.2",
        "addr:2.1",
        "id:046d:*",
        "id:*:c016",
        "id:0781:c016",
        "serial:A",
        "serial:B",
        "class:01",
        "class:02",
        "controller:0000:00:14.0",
        "controller:00:1d.0",
        "port:0000:00:14.0/1",
        "port:00:14.0/2.1",
        "port:0000:00:1d.0/1",
        "port:platform:vhci_hcd.0/1",
        "port:0000:00:14.0/ss1",
        "hub:0000:00:14.0/1",
        "hub:00:14.0/2",
        "hub:0000:00:14.0/2.1",
        "hub:platform:vhci_hcd.0/1",
    ]);
    prop::collection::vec(term, 1..3).prop_map(|terms| terms.join(",").parse().expect("selector"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// The overlap warnings (`policy::overlaps`) trust `provably_disjoint`: it must be sound.
    #[test]
    fn provably_disjoint_selectors_never_match_one_device(
        a in small_selector(),
        b in small_selector(),
        device in small_device(),
    ) {
        prop_assert!(!(a.provably_disjoint(&b) && a.matches(&device) && b.matches(&device)), "{a} / {b} both match {}", device.port);
    }

    /// `explain` (for `why`) and `matches` (for the plan) must agree on every term.
    #[test]
    fn explain_is_empty_exactly_when_selector_matches(sel in small_selector(), device in small_device()) {
        prop_assert_eq!(sel.explain(&device).is_empty(), sel.matches(&device));
        for term in &sel.terms {
            prop_assert_eq!(term.mismatch(&device).is_none(), term.matches(&device), "{}", term);
        }
    }
}
