//! Selector grammar: every form, the error messages, and matching against devices.

use crate::policy_support;

use policy_support::{device, hub, interface, with_id};
use usbroute::inventory::{Device, PciAddress, PhysicalPort, PortPath};
use usbroute::selector::{Pattern, Selector, Term};

fn parse(s: &str) -> Selector {
    s.parse().expect("selector parses")
}

fn one(s: &str) -> Term {
    let mut sel = parse(s);
    assert_eq!(sel.terms.len(), 1, "{s} has one term");
    sel.terms.remove(0)
}

fn port(s: &str) -> PortPath {
    s.parse().expect("port path")
}

fn error(s: &str) -> String {
    s.parse::<Selector>()
        .expect_err("selector is rejected")
        .to_string()
}

#[test]
fn parse_typed_port() {
    assert_eq!(one("port:1-3.4.2"), Term::Port(port("1-3.4.2")));
}

#[test]
fn parse_controller_anchored_port_long_and_short_pci_forms_alike() {
    let want: PhysicalPort = "0000:00:14.0/3.4.2".parse().expect("physical port");

    assert_eq!(
        one("port:0000:00:14.0/3.4.2"),
        Term::PhysicalPort(want.clone())
    );
    assert_eq!(one("port:00:14.0/3.4.2"), Term::PhysicalPort(want));
    assert_eq!(one("port:00:14.0/3").to_string(), "port:0000:00:14.0/3");
}

#[test]
fn parse_controller_anchored_hub_long_and_short_pci_forms_alike() {
    let want: PhysicalPort = "0000:00:14.0/3".parse().expect("physical port");

    assert_eq!(one("hub:00:14.0/3"), Term::PhysicalHub(want));
    assert_eq!(one("hub:00:14.0/3.1").to_string(), "hub:0000:00:14.0/3.1");
}

#[test]
fn parse_port_on_a_platform_controller() {
    let term = one("port:platform:vhci_hcd.0/1");

    assert_eq!(term.to_string(), "port:platform:vhci_hcd.0/1");
}

#[test]
fn controller_anchored_port_matches_by_place_not_bus_number() {
    let at = |port: &str, physical: &str| Device {
        physical_port: Some(physical.parse().expect("physical port")),
        ..Device::at(port.parse().expect("port path"))
    };
    let sel: Selector = "port:00:14.0/3.4".parse().expect("selector");

    assert!(sel.matches(&at("1-3.4", "0000:00:14.0/3.4")));
    assert!(sel.matches(&at("7-3.4", "0000:00:14.0/3.4")));
    assert!(!sel.matches(&at("1-3.4", "0000:00:1d.0/3.4")));
    assert_eq!(
        sel.explain(&at("1-3.4", "0000:00:14.0/ss3.4"))[0].1,
        "physical port is 0000:00:14.0/ss3.4"
    );
    assert!(!sel.matches(&Device::at("1-3.4".parse().expect("port path"))));
}

#[test]
fn malformed_controller_anchored_port_names_the_form() {
    let e = error("port:0000:00:14.0/3..4");

    assert!(e.contains("not a physical port"), "{e}");
    assert!(e.contains("port:0000:00:14.0/3.4.2"), "{e}");
}

#[test]
fn parse_bare_port() {
    assert_eq!(one("1-3.4.2"), Term::Port(port("1-3.4.2")));
}

#[test]
fn parse_typed_id() {
    let want = Term::Id {
        vendor: Pattern::Exact(0x046d),
        product: Pattern::Exact(0xc016),
    };
    assert_eq!(one("id:046d:c016"), want);
}

#[test]
fn parse_bare_id_uppercase() {
    let want = Term::Id {
        vendor: Pattern::Exact(0x046d),
        product: Pattern::Exact(0xc016),
    };
    assert_eq!(one("046D:C016"), want);
}

#[test]
fn parse_id_wildcard_half() {
    let want = Term::Id {
        vendor: Pattern::Exact(0x046d),
        product: Pattern::Any,
    };
    assert_eq!(one("id:046d:*"), want);
}

#[test]
fn parse_typed_addr_dot_and_colon() {
    let want = Term::Addr { bus: 3, address: 5 };
    assert_eq!((one("addr:3.5"), one("addr:3:5")), (want.clone(), want));
}

#[test]
fn parse_zero_padded_addr_is_decimal() {
    assert_eq!(
        one("addr:003.010"),
        Term::Addr {
            bus: 3,
            address: 10
        }
    );
}

#[test]
fn parse_bare_zero_padded_08_is_decimal() {
    assert_eq!(one("008.009"), Term::Addr { bus: 8, address: 9 });
}

#[test]
fn parse_bare_addr() {
    assert_eq!(one("3.5"), Term::Addr { bus: 3, address: 5 });
}

#[test]
fn parse_serial_with_colons_unquoted() {
    assert_eq!(one("serial:AB:CD:01"), Term::Serial("AB:CD:01".into()));
}

#[test]
fn parse_quoted_serial_with_comma_and_escapes() {
    let sel = parse(r#"serial:"A,B \"x\" \\",port:1-2"#);
    let want = vec![Term::Serial(r#"A,B "x" \"#.into()), Term::Port(port("1-2"))];
    assert_eq!(sel.terms, want);
}

#[test]
fn parse_class_and_iface() {
    let want_iface = Term::Iface {
        class: Pattern::Exact(3),
        subclass: Pattern::Exact(1),
        protocol: Pattern::Any,
    };
    assert_eq!(
        (one("class:03"), one("iface:03:01:*")),
        (Term::Class(3), want_iface)
    );
}

#[test]
fn parse_iface_short_form_fills_wildcards() {
    let want = Term::Iface {
        class: Pattern::Exact(8),
        subclass: Pattern::Any,
        protocol: Pattern::Any,
    };
    assert_eq!(one("iface:08"), want);
}

#[test]
fn parse_controller_and_hub() {
    let pci: PciAddress = "0000:00:14.0".parse().expect("pci");
    assert_eq!(
        (one("controller:0000:00:14.0"), one("hub:1-3")),
        (Term::Controller(pci), Term::Hub(port("1-3")))
    );
}

#[test]
fn parse_comma_joins_terms_with_spaces_allowed() {
    let sel = parse("id:046d:c016, port:1-3");
    assert_eq!(sel.to_string(), "id:046d:c016,port:1-3");
}

#[test]
fn error_names_bad_part_and_shows_forms() {
    let msg = error("port:1-3,id:zz:1");
    assert!(
        msg.contains("`id:zz:1`") && msg.contains("accepted forms"),
        "{msg}"
    );
}

#[test]
fn error_unknown_kind_names_kind() {
    let msg = error("vendor:046d");
    assert!(msg.contains("`vendor` is not a selector kind"), "{msg}");
}

#[test]
fn error_empty_selector() {
    assert!(error("  ").contains("empty"));
}

#[test]
fn error_trailing_comma() {
    assert!(error("port:1-3,").contains("empty term"));
}

#[test]
fn error_address_out_of_range() {
    assert!(error("addr:3.200").contains("from 1 to 127"));
}

#[test]
fn error_unclosed_quote() {
    assert!(error("serial:\"AB,port:1-2").contains("never closed"));
}

#[test]
fn error_bare_pci_suggests_controller() {
    assert!(error("0000:00:14.0").contains("write controller:0000:00:14.0"));
}

#[test]
fn error_bare_word_suggests_kind() {
    assert!(error("mouse").contains("name the kind"));
}

#[test]
fn match_port_exact_only() {
    let sel = parse("port:1-3");
    assert_eq!(
        (
            sel.matches(&device("1-3", 4)),
            sel.matches(&device("1-3.1", 5))
        ),
        (true, false)
    );
}

#[test]
fn match_hub_is_strictly_behind() {
    let sel = parse("hub:1-3");
    let results = [
        sel.matches(&hub("1-3", 2)),
        sel.matches(&device("1-3.1", 3)),
        sel.matches(&device("1-3.1.4", 4)),
        sel.matches(&device("1-4", 5)),
    ];
    assert_eq!(results, [false, true, true, false]);
}

#[test]
fn match_class_uses_device_or_interface_class() {
    let sel = parse("class:03");
    let mut storage = device("1-2", 3);
    storage.interfaces = vec![interface(0, 8, 6, 0x50)];
    assert_eq!(
        (sel.matches(&device("1-1", 2)), sel.matches(&storage)),
        (true, false)
    );
}

#[test]
fn match_iface_wildcard_protocol() {
    let sel = parse("iface:03:01:*");
    assert!(sel.matches(&device("1-1", 2)));
}

#[test]
fn match_id_wildcard_and_and_terms() {
    let sel = parse("id:046d:*,port:1-1");
    let other_vendor = with_id(device("1-1", 2), 0x1234, 0xc016);
    assert_eq!(
        (
            sel.matches(&device("1-1", 2)),
            sel.matches(&other_vendor),
            sel.matches(&device("1-2", 3))
        ),
        (true, false, false)
    );
}

#[test]
fn match_addr_needs_bus_and_address() {
    let sel = parse("addr:1.7");
    assert_eq!(
        (
            sel.matches(&device("1-1", 7)),
            sel.matches(&device("2-1", 7))
        ),
        (true, false)
    );
}

#[test]
fn match_serial_absent_does_not_match() {
    assert!(!parse("serial:X").matches(&device("1-1", 2)));
}

#[test]
fn match_controller_uses_device_controller() {
    let on = parse("controller:00:14.0");
    let off = parse("controller:00:1d.0");
    let d = device("1-1", 2);
    assert_eq!((on.matches(&d), off.matches(&d)), (true, false));
}

#[test]
fn explain_names_each_failing_term() {
    let sel = parse("port:1-2,id:046d:c016,serial:X");
    let reasons: Vec<String> = sel
        .explain(&device("1-1", 2))
        .into_iter()
        .map(|(term, why)| format!("{term}: {why}"))
        .collect();
    assert_eq!(
        reasons,
        vec!["port:1-2: port is 1-1", "serial:X: device has no serial"]
    );
}
