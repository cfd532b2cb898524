//! Property tests of the selector grammar: printing round-trips, no input panics.

use proptest::prelude::*;
use usbroute::inventory::{PciAddress, PortPath};
use usbroute::selector::{Pattern, Selector, Term};

fn port_path() -> impl Strategy<Value = PortPath> {
    (1u8..=255, prop::collection::vec(1u8..=255, 1..=7))
        .prop_map(|(bus, ports)| PortPath { bus, ports })
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
        (any::<u16>(), any::<u8>(), 0u8..32, 0u8..8).prop_map(|(domain, bus, device, function)| {
            Term::Controller(PciAddress {
                domain,
                bus,
                device,
                function,
            })
        }),
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
    fn accepted_string_prints_to_fixed_point(s in "(port|hub|id|addr|class|iface|serial)?:?[0-9a-f*:.,-]{1,16}") {
        if let Ok(sel) = s.parse::<Selector>() {
            let reparsed: Selector = sel.to_string().parse().map_err(|e| TestCaseError::fail(format!("{sel}: {e}")))?;
            prop_assert_eq!(reparsed, sel);
        }
    }
}
