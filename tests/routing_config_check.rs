//! Config mistakes in [routing], [toggle] and the VMs' serial links, caught before any
//! hardware is touched.

use std::collections::BTreeSet;
use usbroute::routing::control::check_config;
use usbroute::routing::RoutingConfig;
use usbroute::toggle::{self, ToggleConfig, VmLink};

#[test]
fn a_sound_routing_section_has_no_problems() {
    let config: RoutingConfig = toml::from_str(
        r#"
        toggle = ["host", "guest"]
        [labels]
        "front-left" = "ehci2:3"
        [profile.host]
        mask = "0x3fff"
        [profile.guest]
        ehci = ["ehci1:1", "front-left"]
        "#,
    )
    .unwrap();

    assert_eq!(check_config(&config), Vec::<String>::new());
}

#[test]
fn routing_mistakes_are_each_reported() {
    let config: RoutingConfig = toml::from_str(
        r#"
        toggle = ["host", "gust"]
        [labels]
        desk = "port 3"
        [profile.host]
        mask = "0xfffff"
        [profile.guest]
        mask = "0x3ffc"
        ehci = ["rear"]
        "#,
    )
    .unwrap();

    let problems = check_config(&config);

    assert_eq!(
        problems,
        vec![
            "[routing] toggle names profile `gust`, which has no [routing.profile.gust]",
            "[routing.labels] `desk` = `port 3`: expected a port like ehci2:3",
            "[routing.profile.guest] has both `mask` and `ehci`; keep one",
            "[routing.profile.guest] `rear` is neither a port like ehci1:3 nor a label in [routing.labels]",
            "[routing.profile.host] mask `0xfffff` is not a 16-bit number such as 0x3fff",
        ]
    );
}

#[test]
fn toggle_mistakes_are_each_reported() {
    let toggle = ToggleConfig {
        listen: Some("0.0.0.0:4510".into()),
        ..ToggleConfig::default()
    };
    let vms = [
        VmLink {
            vm: "win11".into(),
            listen: "127.0.0.1:4511".into(),
            profiles: vec!["guest".into(), "gaming".into()],
        },
        VmLink {
            vm: "linux".into(),
            listen: "127.0.0.1:4511".into(),
            profiles: vec![],
        },
    ];
    let profiles: BTreeSet<String> = ["host".to_string(), "guest".to_string()].into();

    let problems = toggle::check_config(&toggle, &vms, &profiles);

    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(problems[0].starts_with("[toggle] listen: Refusing to listen on 0.0.0.0:4510"));
    assert_eq!(
        problems[1],
        "VM `win11` may select profile `gaming`, which has no [routing.profile.gaming]"
    );
    assert_eq!(
        problems[2],
        "VM `linux` serial and VM `win11` serial both listen on 127.0.0.1:4511"
    );
}

#[test]
fn a_secret_that_cannot_fit_in_an_auth_line_is_reported() {
    let toggle = ToggleConfig {
        secret: Some("correct horse battery staple".into()),
        ..ToggleConfig::default()
    };

    let problems = toggle::check_config(&toggle, &[], &BTreeSet::new());

    assert_eq!(
        problems,
        vec!["[toggle] secret must be 1 to 123 printable ASCII characters without spaces"]
    );
}

#[test]
fn a_whole_config_is_checked_and_its_vm_links_derived() {
    let config = usbroute::policy::Config::parse(
        r#"
        [[vm]]
        name = "win11"
        qmp = "/run/win11.qmp"
        serial = "127.0.0.1:4511"
        profiles = ["guest", "gaming"]

        [[vm]]
        name = "plain"
        qmp = "/run/plain.qmp"

        [routing]
        toggle = ["host", "guest"]
        [routing.profile.host]
        mask = "0x3fff"
        [routing.profile.guest]
        mask = "0x3ffc"
        "#,
        None,
    )
    .unwrap();

    let links = usbroute::toggle::runtime::vm_links(&config);
    let problems = usbroute::toggle::runtime::check_routing_config(&config);

    assert_eq!(
        links,
        vec![VmLink {
            vm: "win11".into(),
            listen: "127.0.0.1:4511".into(),
            profiles: vec!["guest".into(), "gaming".into()],
        }]
    );
    assert_eq!(
        problems,
        vec!["VM `win11` may select profile `gaming`, which has no [routing.profile.gaming]"]
    );
}
