//! The config loader: stable keys, validation errors at file:line:column with the fix.

use std::path::Path;
use usbroute::backend::{AttachMode, VmTarget};
use usbroute::config::{Config, ConfigError};
use usbroute::policy::RuleAction;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Some(Path::new("usbroute.toml")))
}

fn problems(text: &str) -> String {
    parse(text).expect_err("config is rejected").to_string()
}

const TWO_VMS: &str = r#"
[[vm]]
name = "win11"
qmp = "/run/qemu/win11.qmp"

[[vm]]
name = "lab"
qmp = "/run/qemu/lab.qmp"
# A serial link needs [routing] profiles:
# see full_example_loads_every_section.
"#;

#[test]
fn empty_file_is_empty_policy_with_default_socket() {
    let config = parse("").expect("valid");
    assert_eq!(
        (
            config.control_socket.to_str(),
            config.rules.len(),
            config.vms.len()
        ),
        (Some("/run/usbroute/control.sock"), 0, 0)
    );
}

#[test]
fn full_example_loads_every_section() {
    let text = format!(
        r#"control_socket = "/tmp/u.sock"
control_group = "usbroute"
{TWO_VMS}serial = "/run/usbroute/lab.serial"
qemu_user = "65534"
profiles = ["gaming", "office"]

[[rule]]
vm = "win11"
match = "port:1-3.1"
by = "port"
priority = 10

[[rule]]
forbid = true
match = "class:09"

[[rule]]
vm = "host"
match = "id:0bda:*"

[[controller]]
pci = "0000:00:1d.0"
vm = "lab"

[routing]
toggle = ["gaming", "office"]
[routing.profile.gaming]
mask = "0x3fff"
[routing.profile.office]
mask = "0x3ffc"

[toggle]
listen = "127.0.0.1:4555"
secret = "s3cret"
"#
    );
    let config = parse(&text).expect("valid");
    let actions: Vec<&RuleAction> = config.rules.iter().map(|r| &r.action).collect();
    let want_pass = RuleAction::Pass {
        vm: "win11".into(),
        mode: AttachMode::Port,
    };
    assert_eq!(
        actions,
        vec![&want_pass, &RuleAction::Forbid, &RuleAction::Forbid]
    );
    assert_eq!(
        (
            config.control_group.as_deref(),
            config.vms[1].profiles.len(),
            config.controllers.len(),
            config.routing.toggle.len(),
            config.rules[0].priority,
            config.rules[0].line
        ),
        (Some("usbroute"), 2, 1, 2, 10, 17)
    );
}

#[test]
fn by_defaults_to_address() {
    let config = parse(&format!(
        "{TWO_VMS}[[rule]]\nvm = \"lab\"\nmatch = \"1-2\"\n"
    ))
    .expect("valid");
    assert_eq!(
        config.rules[0].action,
        RuleAction::Pass {
            vm: "lab".into(),
            mode: AttachMode::Address
        }
    );
}

#[test]
fn unknown_top_level_key_is_error_with_place() {
    let msg = problems("control_sockt = \"/x\"\n");
    assert!(
        msg.starts_with("usbroute.toml:1:1: unknown field `control_sockt`"),
        "{msg}"
    );
}

#[test]
fn unknown_rule_key_is_error_with_line() {
    let msg = problems(&format!(
        "{TWO_VMS}[[rule]]\nvm = \"lab\"\nmatch = \"1-2\"\nmode = \"port\"\n"
    ));
    assert!(
        msg.contains("usbroute.toml:14:1: unknown field `mode`"),
        "{msg}"
    );
}

#[test]
fn bad_by_value_names_choices() {
    let msg = problems(&format!(
        "{TWO_VMS}[[rule]]\nvm = \"lab\"\nmatch = \"1-2\"\nby = \"serial\"\n"
    ));
    assert!(
        msg.contains(":14:6: unknown variant `serial`, expected one of `address`, `port`, `id`"),
        "{msg}"
    );
}

#[test]
fn bad_selector_points_at_match_value() {
    let msg = problems(&format!(
        "{TWO_VMS}[[rule]]\nvm = \"lab\"\nmatch = \"port:1-x\"\n"
    ));
    assert!(
        msg.contains("usbroute.toml:13:9: `match`: bad selector part `port:1-x`"),
        "{msg}"
    );
}

#[test]
fn unknown_vm_in_rule_lists_known_vms() {
    let msg = problems(&format!(
        "{TWO_VMS}[[rule]]\nvm = \"win10\"\nmatch = \"1-2\"\n"
    ));
    assert!(
        msg.contains(
            ":12:6: rule names VM `win10`, which no [[vm]] defines (known VMs: win11, lab)"
        ),
        "{msg}"
    );
}

#[test]
fn rule_without_target_is_error() {
    let msg = problems("[[rule]]\nmatch = \"1-2\"\n");
    assert!(msg.contains("this rule has no target"), "{msg}");
}

#[test]
fn forbid_with_vm_is_error() {
    let msg = problems(&format!(
        "{TWO_VMS}[[rule]]\nforbid = true\nvm = \"lab\"\nmatch = \"1-2\"\n"
    ));
    assert!(
        msg.contains("both `forbid = true` and `vm = \"lab\"`"),
        "{msg}"
    );
}

#[test]
fn priority_on_forbid_rule_is_error() {
    let msg = problems("[[rule]]\nvm = \"host\"\nmatch = \"1-2\"\npriority = 3\n");
    assert!(
        msg.contains(":4:12: `priority` has no effect on a forbid rule"),
        "{msg}"
    );
}

/// Changed with issue 13: overlapping rules used to be refused at load as a tie; first
/// match wins now, and `check` and the daemon warn instead (tests/quick/cli_check.rs).
#[test]
fn equal_priority_overlapping_rules_to_different_vms_load_in_file_order() {
    let text = format!(
        "{TWO_VMS}[[rule]]\nvm = \"lab\"\nmatch = \"port:1-2\"\n\n[[rule]]\nvm = \"win11\"\nmatch = \"id:046d:c016\"\n"
    );

    let config = parse(&text).expect("overlapping rules load");

    let lines: Vec<usize> = config.rules.iter().map(|r| r.line).collect();
    assert_eq!(lines, [11, 15]);
}

#[test]
fn rules_for_one_vm_differing_in_by_load() {
    let text = format!(
        "{TWO_VMS}[[rule]]\nvm = \"lab\"\nmatch = \"id:046d:c016\"\nby = \"id\"\n\n[[rule]]\nvm = \"lab\"\nmatch = \"port:1-2\"\nby = \"port\"\n\n[[rule]]\nvm = \"lab\"\nmatch = \"class:03\"\nforce = true\n"
    );

    let config = parse(&text).expect("rules for one VM load");

    let modes: Vec<Option<AttachMode>> = config
        .rules
        .iter()
        .map(|r| match &r.action {
            RuleAction::Pass { mode, .. } => Some(*mode),
            RuleAction::Forbid => None,
        })
        .collect();
    assert_eq!(
        modes,
        [
            Some(AttachMode::Id),
            Some(AttachMode::Port),
            Some(AttachMode::Address)
        ]
    );
}

#[test]
fn equal_priority_disjoint_rules_load() {
    let text = format!(
        "{TWO_VMS}[[rule]]\nvm = \"lab\"\nmatch = \"port:1-2\"\n[[rule]]\nvm = \"win11\"\nmatch = \"port:1-3\"\n"
    );
    assert!(parse(&text).is_ok());
}

#[test]
fn different_priority_overlapping_rules_load() {
    let text = format!(
        "{TWO_VMS}[[rule]]\nvm = \"lab\"\nmatch = \"port:1-2\"\npriority = 1\n[[rule]]\nvm = \"win11\"\nmatch = \"id:046d:c016\"\n"
    );
    assert!(parse(&text).is_ok());
}

#[test]
fn same_outcome_overlapping_rules_load() {
    let text = format!(
        "{TWO_VMS}[[rule]]\nvm = \"lab\"\nmatch = \"port:1-2\"\n[[rule]]\nvm = \"lab\"\nmatch = \"id:046d:c016\"\n"
    );
    assert!(parse(&text).is_ok());
}

#[test]
fn vm_named_host_is_error() {
    let msg = problems("[[vm]]\nname = \"host\"\nqmp = \"/q\"\n");
    assert!(msg.contains("a VM cannot be called `host`"), "{msg}");
}

#[test]
fn duplicate_vm_and_socket_are_errors() {
    let msg = problems("[[vm]]\nname = \"a\"\nqmp = \"/q\"\n[[vm]]\nname = \"a\"\nqmp = \"/q\"\n");
    assert!(
        msg.contains("VM `a` is defined twice (first on line 1)")
            && msg.contains("QMP socket /q is used by two VMs"),
        "{msg}"
    );
}

#[test]
fn controller_for_unknown_vm_is_error() {
    let msg = problems("[[controller]]\npci = \"0000:00:14.0\"\nvm = \"x\"\n");
    assert!(
        msg.contains("controller 0000:00:14.0 is given to VM `x`, which no [[vm]] defines"),
        "{msg}"
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let msg =
        problems("[[rule]]\nvm = \"a\"\nmatch = \"bad\"\n[[rule]]\nvm = \"b\"\nmatch = \"1-2\"\n");
    assert_eq!(
        msg.lines()
            .filter(|l| l.starts_with("usbroute.toml:"))
            .count(),
        3,
        "{msg}"
    );
}

#[test]
fn syntax_error_has_place() {
    let msg = problems("[[vm]\nname = 1\n");
    assert!(msg.starts_with("usbroute.toml:1:"), "{msg}");
}

#[test]
fn load_missing_file_names_it() {
    let err = Config::load(Path::new("/nonexistent/usbroute.toml")).expect_err("missing");
    assert!(err
        .to_string()
        .starts_with("/nonexistent/usbroute.toml: cannot read the config file"));
}

#[test]
fn controller_rules_own_their_functions_only_for_running_vms() {
    let config = parse(&format!(
        "{TWO_VMS}[[controller]]\npci = \"0000:00:1d.0\"\nvm = \"lab\"\n"
    ))
    .expect("valid");
    let running = std::collections::BTreeSet::from(["lab".to_string()]);
    let stopped = std::collections::BTreeSet::new();
    let owned = |up| usbroute::engine::owned_by_running(&config.controllers, up).len();
    assert_eq!((owned(&running), owned(&stopped)), (1, 0));
}

#[test]
fn a_toggle_listener_without_a_secret_is_refused_at_its_key_with_the_fix() {
    let err = problems("[toggle]\n\nlisten = \"127.0.0.1:4510\"\n");

    assert!(
        err.starts_with("usbroute.toml:3:1: [toggle] listen"),
        "{err}"
    );
    assert!(err.contains("secret"), "{err}");
}

#[test]
fn a_routing_mistake_is_reported_at_its_file_line_and_column() {
    let err = problems(
        "[routing]\ntoggle = [\"host\", \"gust\"]\n[routing.profile.host]\nmask = \"0x3fff\"\n\n[routing.profile.guest]\nmask = \"0xfffff\"\n",
    );

    assert_eq!(
        err,
        "usbroute.toml:2:1: [routing] toggle names profile `gust`, which has no [routing.profile.gust]\n\
         usbroute.toml:7:1: [routing.profile.guest] mask `0xfffff` is not a 16-bit number such as 0x3fff"
    );
}

#[test]
fn a_config_file_that_is_not_utf8_is_refused_naming_the_file_line_and_byte() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("usbroute.toml");
    std::fs::write(&path, b"[[vm]]\nname = \"w\xffn\"\n").unwrap();

    let err = Config::load(&path).expect_err("not UTF-8").to_string();

    assert!(err.starts_with(&format!("{}:2:", path.display())), "{err}");
    assert!(err.contains("byte 16") && err.contains("UTF-8"), "{err}");
}

// Each section is checked by its owner; its problems land at their own place.

#[test]
fn a_vm_problem_is_reported_at_its_vm_entry() {
    let err =
        problems("[[vm]]\nname = \"a\"\nqmp = \"/q\"\n\n  [[vm]]\nname = \"a\"\nqmp = \"/r\"\n");

    assert_eq!(
        err,
        "usbroute.toml:5:3: VM `a` is defined twice (first on line 1); remove one or rename it"
    );
}

#[test]
fn a_rule_problem_is_reported_at_its_key() {
    let err = problems(&format!(
        "{TWO_VMS}[[rule]]\nmatch = \"1-2\"\nvm = \"lab\"\nforbid = true\n"
    ));

    assert_eq!(
        err,
        "usbroute.toml:13:6: this rule says both `forbid = true` and `vm = \"lab\"`; a forbid rule keeps the device on the host: drop one of the two"
    );
}

#[test]
fn a_controller_problem_is_reported_at_its_controller_entry() {
    let err = problems(&format!(
        "{TWO_VMS}[[controller]]\npci = \"0000:00:14.0\"\nvm = \"lab\"\n\n[[controller]]\npci = \"0000:00:14.0\"\nvm = \"win11\"\n"
    ));

    assert_eq!(
        err,
        "usbroute.toml:15:1: controller 0000:00:14.0 is given away twice (first on line 11); a controller can belong to one VM"
    );
}

#[test]
fn a_top_level_problem_is_reported_at_its_key() {
    let err = problems("\ncontrol_group = \" \"\n");

    assert!(
        err.starts_with("usbroute.toml:2:17: control_group is empty"),
        "{err}"
    );
}

#[test]
fn a_serial_link_problem_is_reported_at_its_vm_key() {
    let err = problems(
        "[[vm]]\nname = \"lab\"\nqmp = \"/q\"\nserial = \"/run/lab.serial\"\nprofiles = [\"gaming\"]\n\n[routing.profile.office]\nmask = \"0x3fff\"\n",
    );

    assert_eq!(
        err,
        "usbroute.toml:5:1: VM `lab` may select profile `gaming`, which has no [routing.profile.gaming]"
    );
}

#[test]
fn problems_in_every_section_are_each_at_their_own_place() {
    let text = "control_group = \"\"\n\
                [[vm]]\nname = \"a\"\nxen = \"a\"\nqmp = \"/q\"\n\
                [[rule]]\nvm = \"b\"\nmatch = \"1-2\"\n\
                [[controller]]\npci = \"0000:00:14.0\"\nvm = \"c\"\n\
                [routing]\ntoggle = [\"x\"]\n\
                [toggle]\nlisten = \"127.0.0.1:1\"\n";

    let err = problems(text);

    let places: Vec<&str> = err.lines().map(|l| l.split(": ").next().unwrap()).collect();
    assert_eq!(
        places,
        [
            "usbroute.toml:2:1",  // [[vm]]: two backends
            "usbroute.toml:7:6",  // [[rule]]: unknown VM
            "usbroute.toml:9:1",  // [[controller]]: unknown VM
            "usbroute.toml:1:17", // control_group
            "usbroute.toml:13:1", // [routing] toggle needs two
            "usbroute.toml:13:1", // [routing] toggle names no profile
            "usbroute.toml:15:1", // [toggle] listen without a secret
        ],
        "{err}"
    );
}

// `[[vm]]` names its backend: `qmp` (QEMU), `xen` or `libvirt` (with `uri`).

fn one_vm(keys: &str) -> Result<Config, ConfigError> {
    parse(&format!("[[vm]]\nname = \"v\"\n{keys}"))
}

#[test]
fn qmp_names_a_qemu_vm_as_before() {
    let config = one_vm("qmp = \"/run/qemu/v.qmp\"\n").expect("valid");

    assert_eq!(
        config.vms[0].target(),
        VmTarget::Qemu {
            qmp: "/run/qemu/v.qmp".into()
        }
    );
    assert_eq!(config.vms[0].qmp(), Some(Path::new("/run/qemu/v.qmp")));
}

#[test]
fn xen_names_a_xen_domain() {
    let config = one_vm("xen = \"dom-v\"\n").expect("valid");

    assert_eq!(
        config.vms[0].target(),
        VmTarget::Xen {
            domain: "dom-v".into()
        }
    );
    assert_eq!(config.vms[0].qmp(), None);
}

#[test]
fn libvirt_names_a_domain_with_an_optional_uri() {
    let plain = one_vm("libvirt = \"v\"\n").expect("valid");
    let remote = one_vm("libvirt = \"v\"\nuri = \"qemu+ssh://box/system\"\n").expect("valid");

    assert_eq!(
        (plain.vms[0].target(), remote.vms[0].target()),
        (
            VmTarget::Libvirt {
                domain: "v".into(),
                uri: None
            },
            VmTarget::Libvirt {
                domain: "v".into(),
                uri: Some("qemu+ssh://box/system".into())
            }
        )
    );
}

#[test]
fn a_vm_without_a_backend_is_refused_at_its_entry() {
    let err = one_vm("serial = \"/run/v.serial\"\n")
        .expect_err("no backend")
        .to_string();

    assert!(
        err.starts_with("usbroute.toml:1:1: VM `v` names none: name one of qmp, xen, libvirt"),
        "{err}"
    );
}

#[test]
fn a_vm_with_two_backends_is_refused_at_its_entry() {
    let err = one_vm("qmp = \"/q\"\nlibvirt = \"v\"\n")
        .expect_err("two backends")
        .to_string();

    assert!(
        err.starts_with(
            "usbroute.toml:1:1: VM `v` names more than one: name one of qmp, xen, libvirt"
        ),
        "{err}"
    );
}

#[test]
fn uri_without_libvirt_is_refused_at_the_uri() {
    let err = one_vm("xen = \"v\"\nuri = \"qemu:///system\"\n")
        .expect_err("uri without libvirt")
        .to_string();

    assert_eq!(
        err,
        "usbroute.toml:4:7: VM `v`: `uri` is the libvirt connection and goes with `libvirt = \"DOMAIN\"`; add that or remove `uri`"
    );
}

#[test]
fn two_vms_on_one_domain_are_refused() {
    let err = problems("[[vm]]\nname = \"a\"\nxen = \"d\"\n[[vm]]\nname = \"b\"\nxen = \"d\"\n");

    assert_eq!(
        err,
        "usbroute.toml:4:1: xen domain d is used by two VMs (first on line 1); each VM needs its own"
    );
}

#[test]
fn a_rule_for_a_vm_with_a_broken_backend_reports_only_the_vm() {
    let err = problems("[[vm]]\nname = \"a\"\n[[rule]]\nvm = \"a\"\nmatch = \"1-2\"\n");

    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("name one of qmp, xen, libvirt"), "{err}");
}

#[test]
fn a_vm_of_every_backend_loads_and_is_managed() {
    for keys in ["xen = \"v\"\n", "qmp = \"/q\"\n", "libvirt = \"v\"\n"] {
        let config = one_vm(keys).expect("valid");

        assert_eq!(config.vms[0].without_backend(), None, "{keys}");
    }
}

#[test]
fn a_libvirt_uri_usbroute_cannot_reach_loads_with_a_warning_naming_what_is_supported() {
    let remote = one_vm("libvirt = \"v\"\nuri = \"qemu+ssh://host/system\"\n").expect("valid");
    let xen = one_vm("libvirt = \"v\"\nuri = \"xen:///system\"\n").expect("valid");
    let local =
        one_vm("libvirt = \"v\"\nuri = \"qemu:///system?socket=/run/libvirt/libvirt-sock\"\n")
            .expect("valid");

    let remote = remote.vms[0].without_backend().expect("a warning");
    let xen = xen.vms[0].without_backend().expect("a warning");
    assert!(remote.contains("qemu+ssh://host/system"), "{remote}");
    assert!(remote.contains("supported: qemu:///system"), "{remote}");
    assert!(
        remote.ends_with("the daemon will not manage VM v"),
        "{remote}"
    );
    assert!(xen.contains("driver `xen` is not QEMU"), "{xen}");
    assert_eq!(local.vms[0].without_backend(), None);
}
