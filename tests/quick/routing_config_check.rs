//! Config mistakes in [routing], [toggle] and the VMs' serial links, caught before any
//! hardware is touched.

use std::collections::BTreeSet;
use usbroute::backend::VmTarget;
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

fn link(vm: &str, listen: &str, profiles: &[&str], secret: Option<&str>) -> VmLink {
    VmLink {
        vm: vm.into(),
        listen: listen.into(),
        profiles: profiles.iter().map(|p| p.to_string()).collect(),
        qemu_user: None,
        secret: secret.map(str::to_string),
    }
}

fn messages(problems: Vec<usbroute::config::KeyProblem>) -> Vec<String> {
    problems.into_iter().map(|p| p.message).collect()
}

#[test]
fn toggle_mistakes_are_each_reported() {
    let toggle = ToggleConfig {
        listen: Some("0.0.0.0:4510".into()),
        ..ToggleConfig::default()
    };
    let vms = [
        link(
            "win11",
            "/run/usbroute/win11.serial",
            &["guest", "gaming"],
            None,
        ),
        link("linux", "/run/usbroute/win11.serial", &[], None),
        link("tcp", "127.0.0.1:4511", &[], None),
    ];
    let profiles: BTreeSet<String> = ["host".to_string(), "guest".to_string()].into();

    let problems = messages(toggle::check_config(&toggle, &vms, &profiles));

    assert_eq!(problems.len(), 4, "{problems:#?}");
    assert!(problems[0]
        .starts_with("[toggle] listen = \"0.0.0.0:4510\" is a TCP listener without a secret"));
    assert!(
        problems[1]
            .starts_with("VM `tcp` serial = \"127.0.0.1:4511\" is a TCP listener without a secret"),
        "{}",
        problems[1]
    );
    assert_eq!(
        problems[2],
        "VM `linux` serial and VM `win11` serial both listen on /run/usbroute/win11.serial"
    );
    assert_eq!(
        problems[3],
        "VM `win11` may select profile `gaming`, which has no [routing.profile.gaming]"
    );
}

#[test]
fn a_vm_cannot_share_the_host_listeners_secret() {
    let toggle = ToggleConfig {
        listen: Some("127.0.0.1:4510".into()),
        secret: Some("same".into()),
        ..ToggleConfig::default()
    };
    let vms = [link("win11", "127.0.0.1:4511", &[], Some("same"))];

    let problems = messages(toggle::check_config(&toggle, &vms, &BTreeSet::new()));

    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(problems[0].contains("the guest would learn the host's secret"));
}

#[test]
fn a_secret_that_cannot_fit_in_an_auth_line_is_reported() {
    let toggle = ToggleConfig {
        secret: Some("correct horse battery staple".into()),
        ..ToggleConfig::default()
    };

    let problems = messages(toggle::check_config(&toggle, &[], &BTreeSet::new()));

    assert_eq!(
        problems,
        vec!["[toggle] secret must be 1 to 123 printable ASCII characters without spaces"]
    );
}

#[test]
fn a_whole_config_is_checked_and_its_vm_links_derived() {
    let config = usbroute::config::Config {
        vms: vec![
            usbroute::config::VmConfig {
                name: "win11".into(),
                target: VmTarget::Qemu {
                    qmp: "/run/win11.qmp".into(),
                },
                serial: Some("/run/usbroute/win11.serial".into()),
                profiles: vec!["guest".into(), "gaming".into()],
                qemu_user: Some("libvirt-qemu".into()),
                serial_secret: None,
            },
            usbroute::config::VmConfig {
                name: "plain".into(),
                target: VmTarget::Qemu {
                    qmp: "/run/plain.qmp".into(),
                },
                serial: None,
                profiles: vec![],
                qemu_user: None,
                serial_secret: None,
            },
        ],
        routing: toml::from_str(
            r#"
            toggle = ["host", "guest"]
            [profile.host]
            mask = "0x3fff"
            [profile.guest]
            mask = "0x3ffc"
            "#,
        )
        .unwrap(),
        ..Default::default()
    };

    let links = usbroute::config::vm_links(&config);
    let problems = usbroute::config::check_routing_config(&config);

    assert_eq!(
        links,
        vec![VmLink {
            qemu_user: Some("libvirt-qemu".into()),
            ..link(
                "win11",
                "/run/usbroute/win11.serial",
                &["guest", "gaming"],
                None
            )
        }]
    );
    assert_eq!(
        problems,
        vec!["VM `win11` may select profile `gaming`, which has no [routing.profile.gaming]"]
    );
}
