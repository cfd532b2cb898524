//! Any group shape: bind then restore ends where it started, and a bind failing at any
//! write rolls every member back.

use crate::vfio_support;

use proptest::prelude::*;
use std::time::Duration;
use usbroute::vfio::{self, BindOptions};
use vfio_support::{pci, state, FixtureDriverCore, Tree};

fn quick() -> BindOptions {
    BindOptions {
        force: true,
        wait: Duration::from_millis(50),
        settle: Duration::ZERO,
    }
}

/// One function of a group: (slot, function, class, driver or unbound).
fn function() -> impl Strategy<Value = (u8, u8, u32, Option<&'static str>)> {
    (
        1u8..4,
        0u8..8,
        prop::sample::select(vec![0x0c0300u32, 0x0c0320, 0x0c0330, 0x060400, 0x040300]),
        prop::option::of(prop::sample::select(vec![
            "uhci_hcd",
            "ehci-pci",
            "xhci_hcd",
            "snd_hda_intel",
        ])),
    )
}

/// The tree, and a non-bridge function of the group to name (each group has one: the
/// first function is never a bridge).
fn tree_of(functions: &[(u8, u8, u32, Option<&'static str>)]) -> (Tree, String) {
    let tree = Tree::new().with_vfio();
    let mut first = String::new();
    for (i, (slot, func, class, driver)) in functions.iter().enumerate() {
        let addr = format!("0000:00:{:02x}.{func}", slot + 8 * u8::from(i == 0));
        let class = if i == 0 { &0x0c0330 } else { class };
        let driver = if *class == 0x060400 {
            Some("pcieport")
        } else {
            *driver
        };
        tree.function(&addr, *class, driver, Some(5));
        if i == 0 {
            first = addr;
        }
    }
    (tree, first)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn bind_then_restore_of_any_group_ends_where_it_started(functions in prop::collection::vec(function(), 1..6)) {
        let (tree, controller) = tree_of(&functions);
        let first = state(&tree);
        let host = FixtureDriverCore::new(&tree);

        vfio::bind(&tree.root(), &host, &pci(&controller), &quick()).expect("bind");
        vfio::restore(&tree.root(), &host, &pci(&controller), &quick()).expect("restore");

        prop_assert_eq!(state(&tree), first);
    }

    #[test]
    fn bind_of_any_group_failing_at_any_write_rolls_back(
        functions in prop::collection::vec(function(), 1..6),
        pick in 0usize..64,
    ) {
        let writes_in_bind = {
            let (tree, controller) = tree_of(&functions);
            let host = FixtureDriverCore::new(&tree);
            vfio::bind(&tree.root(), &host, &pci(&controller), &quick()).expect("bind");
            host.writes().len()
        };
        let (tree, controller) = tree_of(&functions);
        let first = state(&tree);
        let host = FixtureDriverCore::new(&tree).failing_write(pick % writes_in_bind + 1);

        let result = vfio::bind(&tree.root(), &host, &pci(&controller), &quick());

        prop_assert!(result.is_err());
        prop_assert_eq!(state(&tree), first);
    }
}
