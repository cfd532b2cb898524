//! Property-based fuzzing of the toggle line protocol (runs with every `cargo test`;
//! the libFuzzer target in fuzz/ goes deeper on demand).

use crate::routing_support;

use proptest::prelude::*;
use routing_support::*;
use usbroute::routing::control::ProfileRouter;
use usbroute::routing::detect::detect;
use usbroute::routing::router::Router;
use usbroute::toggle::dispatch::{handle_line, Access, Session};
use usbroute::toggle::protocol::{
    is_profile_name, parse_line, ParseError, Reply, Request, MAX_LINE,
};

fn router(pch: &Pch) -> ProfileRouter<usbroute::routing::config_space::SysfsConfigSpace> {
    let c = host_guest_desk_profiles();
    ProfileRouter::new(
        Router::open(&pch.root(), detect(&pch.root(), None).unwrap()),
        c,
    )
}

/// Lines that look almost right: keywords, profile names, junk, spacing, CR/LF, NUL.
fn near_miss() -> impl Strategy<Value = Vec<u8>> {
    let word = prop_oneof![
        Just("toggle".to_string()),
        Just("guest".to_string()),
        Just("host".to_string()),
        Just("status".to_string()),
        Just("auth".to_string()),
        Just("desk".to_string()),
        "[a-zA-Z0-9_.-]{1,70}",
        "[ -~]{0,20}",
    ];
    (
        prop::collection::vec(word, 0..4),
        prop::collection::vec(
            prop_oneof![Just(" "), Just("\t"), Just("\r"), Just("\0"), Just("\n")],
            0..3,
        ),
    )
        .prop_map(|(words, seps)| {
            let mut s = words.join(" ");
            for sep in seps {
                s.push_str(sep);
            }
            s.into_bytes()
        })
}

proptest! {
    #[test]
    fn parser_never_panics_and_keeps_its_promises(line in prop::collection::vec(any::<u8>(), 0..400)) {
        match parse_line(&line) {
            Ok(Some(Request::Profile(name))) => prop_assert!(is_profile_name(&name)),
            Ok(_) => prop_assert!(line.len() <= MAX_LINE + 2),
            Err(ParseError::TooLong) => prop_assert!(line.len() > MAX_LINE),
            Err(e) => prop_assert!(!Reply::Err(e.to_string()).to_string().contains('\n')),
        }
    }

    #[test]
    fn near_misses_parse_without_panicking(line in near_miss()) {
        let _ = parse_line(&line);
    }

    #[test]
    fn input_answered_with_err_never_changes_the_routing(line in prop_oneof![near_miss(), prop::collection::vec(any::<u8>(), 0..200)]) {
        let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
        let mut r = router(&pch);
        let before = pch.config(XHCI);

        let reply = handle_line(&mut r, &Access::unrestricted("test"), &mut Session::default(), &line);

        let changed = pch.config(XHCI) != before;
        prop_assert!(!changed || matches!(reply, Some(Reply::Ok { .. })), "{line:?} -> {reply:?} changed the routing");
    }

    #[test]
    fn a_vm_limited_to_the_active_profile_can_change_nothing(line in prop_oneof![near_miss(), prop::collection::vec(any::<u8>(), 0..200)]) {
        let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
        let mut r = router(&pch);
        let before = pch.config(XHCI);
        let vm = Access {
            origin: "VM test".into(),
            allowed: Some(["host".to_string()].into()),
            secret: None,
        };

        let reply = handle_line(&mut r, &vm, &mut Session::default(), &line);

        prop_assert_eq!(pch.config(XHCI), before, "{:?} -> {:?}", line, reply);
    }
}
