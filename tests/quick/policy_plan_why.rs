//! The plan explained and limited: `why` (the deciding rule, the failing terms, what
//! outranked each other rule) and backends that cannot attach by every mode. The world
//! and rule helpers are `policy_plan`'s.

use crate::policy_plan::{forbid, on, p, pass, pass_by, World};
use crate::policy_support::{device, hub, with_id};
use usbroute::backend::{AttachMode, Capabilities};
use usbroute::policy::{why, Override, OverrideAction, Placement, Reason, Rule, RuleMatch, WinsBy};

#[test]
fn why_names_deciding_rule_and_failing_terms() {
    let world = World::new(
        vec![device("1-1", 2)],
        vec![
            pass(0, "port:1-2", "a"),
            pass(1, "id:046d:c016,port:1-1", "b"),
        ],
    );
    let answer = why(&world.input(), &world.devices[0]);
    let verdicts: Vec<RuleMatch> = answer.rules.into_iter().map(|(_, v)| v).collect();
    assert_eq!(
        verdicts,
        vec![
            RuleMatch::NoMatch {
                terms: vec!["port:1-2: port is 1-1".into()]
            },
            RuleMatch::Decided
        ]
    );
}

#[test]
fn why_for_hub_says_hubs_cannot_be_passed() {
    let world = World::new(vec![hub("1-3", 2)], vec![pass(0, "port:1-3", "a")]);
    let answer = why(&world.input(), &world.devices[0]);
    let text = answer.decision.reason.to_string();
    assert!(text.starts_with("hubs cannot be passed"), "{text}");
    assert!(matches!(&answer.rules[0].1, RuleMatch::Outranked { .. }));
}

#[test]
fn why_marks_outranked_lower_priority_rule() {
    let mut high = pass(1, "port:1-1", "b");
    high.priority = 1;
    let world = World::new(
        vec![device("1-1", 2)],
        vec![pass(0, "id:046d:c016", "a"), high],
    );
    let answer = why(&world.input(), &world.devices[0]);
    let kinds: Vec<bool> = answer
        .rules
        .iter()
        .map(|(_, v)| *v == RuleMatch::Decided)
        .collect();
    assert_eq!(kinds, vec![false, true]);
}

/// The outranked rule's verdict says what decided and why it ranks above.
fn outranked_by(rules: Vec<Rule>) -> (String, Option<WinsBy>) {
    let world = World::new(vec![device("1-1", 2)], rules);
    let answer = why(&world.input(), &world.devices[0]);
    let outranked: Vec<(String, Option<WinsBy>)> = answer
        .rules
        .into_iter()
        .filter_map(|(_, v)| match v {
            RuleMatch::Outranked { by, because } => Some((by, because)),
            _ => None,
        })
        .collect();
    assert_eq!(outranked.len(), 1, "{outranked:?}");
    outranked.into_iter().next().unwrap()
}

#[test]
fn why_says_an_earlier_rule_outranks_a_later_one_of_equal_priority() {
    let (by, because) = outranked_by(vec![pass(0, "id:046d:c016", "a"), pass(1, "port:1-1", "b")]);

    assert_eq!(because, Some(WinsBy::FileOrder));
    assert!(by.starts_with("outranked by rule 1 ("), "{by}");
    assert!(
        by.ends_with(", an earlier rule in the file (first match wins)"),
        "{by}"
    );
}

#[test]
fn why_says_a_higher_priority_outranks_an_earlier_rule() {
    let mut high = pass(1, "port:1-1", "b");
    high.priority = 3;
    let (by, because) = outranked_by(vec![pass(0, "id:046d:c016", "a"), high]);

    assert_eq!(because, Some(WinsBy::Priority));
    assert!(by.starts_with("outranked by rule 2 ("), "{by}");
    assert!(by.ends_with(", a higher priority (3 > 0)"), "{by}");
}

#[test]
fn why_says_a_forbid_outranks_every_pass_rule() {
    let mut p = pass(0, "port:1-1", "a");
    p.priority = 9;
    let (by, because) = outranked_by(vec![p, forbid(1, "id:046d:*")]);

    assert_eq!(because, Some(WinsBy::Forbid));
    assert!(by.starts_with("outranked by rule 2 ("), "{by}");
    assert!(
        by.ends_with(", a forbid rule, which wins over every pass rule"),
        "{by}"
    );
}

#[test]
fn why_adds_the_protection_that_kept_the_winners_device_home() {
    let mut world = World::new(
        vec![device("1-1", 2)],
        vec![pass(0, "id:046d:c016", "a"), pass(1, "port:1-1", "b")],
    );
    world.up.remove("a");
    let answer = why(&world.input(), &world.devices[0]);
    let RuleMatch::Outranked { by, .. } = &answer.rules[1].1 else {
        panic!("rule 2 is outranked: {:?}", answer.rules)
    };

    assert!(
        by.contains("(first match wins); VM a is not running"),
        "{by}"
    );
}

/// VM `a`'s backend attaches by address only, as Xen's does.
fn a_by_address_only(world: &mut World) {
    let caps = Capabilities {
        backend: "xen".into(),
        modes: [AttachMode::Address].into(),
        follows_by_address: false,
    };
    world.backends.insert("a".into(), caps);
}

/// VM `a`'s backend attaches by address only and follows ports and kinds itself, plug by
/// plug, as Xen's does.
fn a_following_by_address(world: &mut World) {
    let caps = Capabilities {
        backend: "xen".into(),
        modes: [AttachMode::Address].into(),
        follows_by_address: true,
    };
    world.backends.insert("a".into(), caps);
}

#[test]
fn a_rule_by_port_for_a_backend_that_follows_by_address_places_the_plug_by_address_and_says_so() {
    let rule = pass_by(0, "port:1-1", "a", AttachMode::Port);
    let mut world = World::new(vec![device("1-1", 2)], vec![rule]);
    a_following_by_address(&mut world);

    let reason = world.reason("1-1");

    assert_eq!(
        world.placement("1-1"),
        Placement::Vm {
            vm: "a".into(),
            mode: AttachMode::Address
        }
    );
    assert!(
        reason.to_string().ends_with(
            "; the VM's backend (xen) attaches by bus+address only, so usbroute follows the port itself and attaches each plug by its address"
        ),
        "{reason}"
    );
}

#[test]
fn a_rule_by_id_for_a_backend_that_follows_by_address_places_every_device_of_the_kind() {
    let rule = pass_by(0, "id:046d:c016", "a", AttachMode::Id);
    let devices = vec![
        with_id(device("1-1", 2), 0x046d, 0xc016),
        with_id(device("1-2", 3), 0x046d, 0xc016),
    ];
    let mut world = World::new(devices, vec![rule]);
    a_following_by_address(&mut world);

    let placements = [world.placement("1-1"), world.placement("1-2")];

    let by_address = Placement::Vm {
        vm: "a".into(),
        mode: AttachMode::Address,
    };
    assert_eq!(placements, [by_address.clone(), by_address]);
    assert!(world
        .reason("1-2")
        .to_string()
        .contains("follows the kind of device itself"));
}

#[test]
fn a_rule_by_port_for_a_backend_without_port_keeps_the_device_home_and_says_why() {
    let rule = pass_by(0, "port:1-1", "a", AttachMode::Port);
    let mut world = World::new(vec![device("1-1", 2)], vec![rule]);
    a_by_address_only(&mut world);

    let reason = world.reason("1-1");

    assert_eq!(world.placement("1-1"), Placement::Host);
    assert!(
        matches!(&reason, Reason::ModeUnsupported { vm, backend, mode: AttachMode::Port, supported, wanted_by: Some(_) }
        if vm == "a" && backend == "xen" && supported == &[AttachMode::Address])
    );
    assert!(
        reason.to_string().starts_with(
            "VM a's backend (xen) cannot attach by port; use `by = \"address\"` (rule 1"
        ),
        "{reason}"
    );
}

#[test]
fn a_rule_by_address_for_a_backend_limited_to_address_is_passed() {
    let mut world = World::new(vec![device("1-1", 2)], vec![pass(0, "port:1-1", "a")]);
    a_by_address_only(&mut world);

    assert_eq!(world.placement("1-1"), on("a"));
}

#[test]
fn a_stopped_vm_whose_backend_lacks_the_mode_says_the_mode_not_the_wait() {
    let rule = pass_by(0, "id:046d:c016", "a", AttachMode::Id);
    let mut world = World::new(vec![with_id(device("1-1", 2), 0x046d, 0xc016)], vec![rule]);
    a_by_address_only(&mut world);
    world.up.remove("a");

    let reason = world.reason("1-1");

    assert!(
        matches!(
            reason,
            Reason::ModeUnsupported {
                mode: AttachMode::Id,
                ..
            }
        ),
        "{reason:?}"
    );
}

#[test]
fn a_manual_attach_by_a_mode_the_backend_lacks_stays_home_and_names_the_manual_attach() {
    let mut world = World::new(vec![device("1-1", 2)], vec![]);
    a_by_address_only(&mut world);
    let manual = Override {
        address: Some(2),
        action: OverrideAction::Attach {
            vm: "a".into(),
            mode: AttachMode::Port,
            force: false,
        },
    };
    world.overrides.insert(p("1-1"), manual);

    let reason = world.reason("1-1");

    assert!(matches!(
        &reason,
        Reason::ModeUnsupported {
            wanted_by: None,
            ..
        }
    ));
    assert!(
        reason
            .to_string()
            .ends_with("(a manual attach wants it in a VM)"),
        "{reason}"
    );
}

#[test]
fn why_names_the_rule_a_backend_cannot_carry_out_as_the_deciding_one() {
    let rule = pass_by(0, "port:1-1", "a", AttachMode::Port);
    let mut world = World::new(vec![device("1-1", 2)], vec![rule]);
    a_by_address_only(&mut world);

    let answer = why(&world.input(), &world.devices[0]);

    assert_eq!(answer.rules[0].1, RuleMatch::Decided);
    assert!(matches!(
        answer.decision.reason,
        Reason::ModeUnsupported { .. }
    ));
}
