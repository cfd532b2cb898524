//! `usbroute ports ...` and `usbroute toggle` as a user runs them, on PCH fixtures.

use crate::routing_support;

use assert_cmd::Command;
use predicates::prelude::*;
use routing_support::*;
use std::sync::{Arc, Mutex};
use usbroute::routing::control::ProfileRouter;
use usbroute::routing::detect::detect;
use usbroute::routing::router::Router;
use usbroute::toggle::dispatch::Access;
use usbroute::toggle::server::{Limits, ToggleService};

const CONFIG: &str = r#"# a user's config: comments and other sections must survive
[[vm]]
name = "win11"
qmp = "/run/qemu/win11.qmp"

[routing]
toggle = ["host", "guest"]

[routing.labels]
"front-left" = "ehci2:3"

[routing.profile.host]
mask = "0x3fff"

[routing.profile.guest]
ehci = ["ehci1:1", "ehci1:2", "front-left"]

[routing.profile.wild]
mask = "0x3fff"
"#;

struct Setup {
    pch: Pch,
    config: std::path::PathBuf,
}

fn setup(regs: Regs) -> Setup {
    let pch = Pch::lynx_point(regs);
    let config = pch.path().join("usbroute.toml");
    std::fs::write(&config, CONFIG).unwrap();
    Setup { pch, config }
}

fn usbroute(s: &Setup) -> Command {
    let mut c = Command::cargo_bin("usbroute").unwrap();
    c.arg("--sysfs-root")
        .arg(s.pch.path())
        .arg("--config")
        .arg(&s.config);
    c
}

#[test]
fn ports_lists_every_port_with_route_switchability_and_label() {
    let s = setup(Regs::LYNX_DEFAULT);

    usbroute(&s)
        .arg("ports")
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "8-series Lynx Point (xHCI 8086:8c31) at 0000:00:14.0",
        ))
        .stdout(predicate::str::contains("profile host"))
        .stdout(
            predicate::str::is_match(r"ehci2:3 +0000:00:1a.0 +10  xhci +yes +- +front-left")
                .unwrap(),
        );
}

#[test]
fn ports_json_has_one_row_per_port() {
    let s = setup(Regs::LYNX_DEFAULT);

    let out = usbroute(&s).args(["ports", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    assert_eq!(v["ports"].as_array().unwrap().len(), 14);
    assert_eq!(v["ports"][10]["port"], "ehci2:3");
    assert_eq!(v["ports"][10]["label"], "front-left");
    assert_eq!(v["ports"][0]["superspeed"], true);
    assert_eq!(v["ports"][13]["superspeed"], serde_json::Value::Null);
    assert_eq!(v["active_profile"], "host");
}

#[test]
fn ports_show_prints_the_mask_and_the_moves_without_writing() {
    let s = setup(Regs::LYNX_DEFAULT);
    let before = s.pch.config(XHCI);

    usbroute(&s)
        .args(["ports", "show", "guest"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "XUSB2PR 0x3fff -> 0x3bfc, USB3_PSSEN 0x3f -> 0x3c",
        ))
        .stdout(predicate::str::contains(
            "ehci2:3 \"front-left\" (bit 10): xhci -> ehci",
        ))
        .stdout(predicate::str::contains(
            "warning: ehci1:1 goes to EHCI: its SuperSpeed lane",
        ));
    assert_eq!(s.pch.config(XHCI), before);
}

#[test]
fn ports_apply_writes_the_register_and_pins_runtime_pm() {
    let s = setup(Regs::LYNX_DEFAULT);

    usbroute(&s)
        .args(["ports", "apply", "guest"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "guest: XUSB2PR 0x3fff -> 0x3bfc, 3 port(s) moved",
        ))
        .stderr(predicate::str::contains("warning: ehci1:2 goes to EHCI"));
    assert_eq!(
        (s.pch.xusb2pr(), s.pch.read_power_control()),
        (0x3bfc, "on".to_string())
    );
}

#[test]
fn ports_toggle_flips_between_the_configured_pair() {
    let s = setup(Regs::LYNX_DEFAULT);

    usbroute(&s).args(["ports", "toggle"]).assert().success();
    let first = s.pch.xusb2pr();
    usbroute(&s).args(["ports", "toggle"]).assert().success();

    assert_eq!((first, s.pch.xusb2pr()), (0x3bfc, 0x3fff));
}

#[test]
fn ports_apply_of_forbidden_bits_fails_without_force_and_works_with_it() {
    let s = setup(Regs {
        xusb2pr: 0x00ff,
        xusb2prm: 0x00ff,
        ..Regs::LYNX_DEFAULT
    });

    usbroute(&s)
        .args(["ports", "apply", "wild"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("pass --force"));
    let unchanged = s.pch.xusb2pr();
    usbroute(&s)
        .args(["ports", "apply", "wild", "--force"])
        .assert()
        .success();

    assert_eq!((unchanged, s.pch.xusb2pr()), (0x00ff, 0x3fff));
}

#[test]
fn ports_check_puts_back_what_the_kernel_rewrote() {
    let s = setup(Regs::LYNX_DEFAULT);
    usbroute(&s)
        .args(["ports", "apply", "guest"])
        .assert()
        .success();
    s.pch.kernel_resume_rewrite();

    usbroute(&s)
        .args(["ports", "check"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "the register held 0x3fff; put profile `guest` (0x3bfc) back",
        ));
    assert_eq!(s.pch.xusb2pr(), 0x3bfc);
}

#[test]
fn ports_on_a_machine_with_a_non_intel_xhci_explains_why_not() {
    let pch = Pch::empty();
    pch.function("0000:02:00.0", 0x1b21, 0x1142, 0x0c0330, None);

    Command::cargo_bin("usbroute")
        .unwrap()
        .arg("--sysfs-root")
        .arg(pch.path())
        .arg("--config")
        .arg(pch.path().join("missing.toml"))
        .arg("ports")
        .assert()
        .failure()
        .stderr(predicate::str::contains("missing.toml"));
    Command::cargo_bin("usbroute")
        .unwrap()
        .arg("--sysfs-root")
        .arg(pch.path())
        .env("USBROUTE_SYSFS_ROOT", pch.path())
        .arg("ports")
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "0000:02:00.0 is not an Intel xHCI (vendor 1b21, device 1142",
        ));
}

#[test]
fn ports_apply_of_an_unknown_profile_names_the_known_ones() {
    let s = setup(Regs::LYNX_DEFAULT);

    usbroute(&s)
        .args(["ports", "apply", "gaming"])
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "No routing profile `gaming` (configured: guest, host, wild)",
        ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toggle_client_talks_to_a_running_service() {
    let s = setup(Regs::LYNX_DEFAULT);
    let view: toml::Value = toml::from_str(CONFIG).unwrap();
    let routing = view["routing"].clone().try_into().unwrap();
    let detected = detect(&s.pch.root(), None).unwrap();
    let router = ProfileRouter::new(Router::open(&s.pch.root(), detected), routing);
    let service = ToggleService::new(Arc::new(Mutex::new(router)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(service.serve(listener, Access::unrestricted("test"), Limits::default()));

    let run = |args: Vec<String>| {
        let mut cmd = usbroute(&s);
        cmd.args(args);
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
    };
    let toggled = run(vec!["toggle".into(), "--address".into(), addr.clone()])
        .await
        .unwrap();
    let named = run(vec![
        "toggle".into(),
        "host".into(),
        "--address".into(),
        addr.clone(),
    ])
    .await
    .unwrap();
    let refused = run(vec![
        "toggle".into(),
        "nope".into(),
        "--address".into(),
        addr.clone(),
    ])
    .await
    .unwrap();

    assert_eq!(
        String::from_utf8_lossy(&toggled.stdout),
        "guest (XUSB2PR 0x3bfc)\n"
    );
    assert_eq!(
        String::from_utf8_lossy(&named.stdout),
        "host (XUSB2PR 0x3fff)\n"
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("refused `nope`: no profile `nope`"));
}

#[test]
fn toggle_client_without_a_service_says_what_to_run() {
    let s = setup(Regs::LYNX_DEFAULT);
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();

    usbroute(&s)
        .args(["toggle", "--address", &free])
        .assert()
        .failure()
        .stderr(predicate::str::contains("is `usbroute serve` running"));
}

#[test]
fn ports_registers_reads_even_an_unknown_xhci_and_writes_nothing() {
    let pch = Pch::empty();
    pch.function(XHCI, 0x8086, 0xa12f, 0x0c0330, Some(Regs::LYNX_DEFAULT));
    let before = pch.config(XHCI);

    Command::cargo_bin("usbroute")
        .unwrap()
        .arg("--sysfs-root")
        .arg(pch.path())
        .args(["ports", "registers"])
        .assert()
        .success()
        .stdout("0000:00:14.0 8086:a12f (no switchable ports known): XUSB2PR 0x3fff XUSB2PRM 0x3fff USB3_PSSEN 0x0000003f USB3PRM 0x0000003f\n");
    assert_eq!(pch.config(XHCI), before);
}

#[test]
fn ports_registers_refuses_a_function_that_is_not_an_xhci() {
    let s = setup(Regs::LYNX_DEFAULT);

    usbroute(&s)
        .args(["ports", "registers", EHCI1])
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "0000:00:1d.0 is not an xHCI (class 0c0320)",
        ));
}

#[test]
fn ports_refuses_a_config_whose_toggle_names_a_missing_profile() {
    let s = setup(Regs::LYNX_DEFAULT);
    std::fs::write(
        &s.config,
        CONFIG.replace(
            r#"toggle = ["host", "guest"]"#,
            r#"toggle = ["host", "gust"]"#,
        ),
    )
    .unwrap();

    usbroute(&s)
        .args(["ports", "toggle"])
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "[routing] toggle names profile `gust`, which has no [routing.profile.gust]",
        ));
}
