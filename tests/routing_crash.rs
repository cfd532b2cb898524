//! A routing switch killed at any step converges after a restart (issue 11): the record
//! is written first, as an intent, and the restarted daemon's reconcile finishes the move,
//! so the registers and the xHCI's `power/control` always end up as the record says.

mod routing_support;

use routing_support::*;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use usbroute::routing::config_space::{ConfigSpace, SysfsConfigSpace};
use usbroute::routing::control::ProfileRouter;
use usbroute::routing::detect::detect;
use usbroute::routing::router::Router;
use usbroute::routing::{ProfileConfig, RoutingConfig};

/// `host` is the kernel default; `guest` moves two SuperSpeed-capable ports to EHCI, so
/// both XUSB2PR and USB3_PSSEN are written.
fn profiles() -> RoutingConfig {
    let mut c = RoutingConfig::default();
    c.profile.insert(
        "host".into(),
        ProfileConfig {
            mask: Some("0x3fff".into()),
            ..ProfileConfig::default()
        },
    );
    c.profile.insert(
        "guest".into(),
        ProfileConfig {
            ehci: vec!["ehci1:1".into(), "ehci1:2".into()],
            ..ProfileConfig::default()
        },
    );
    c
}

/// Config space that "dies" (panics: nothing after it runs, as after a SIGKILL) at its
/// Nth access, read or write (the reads separate the steps of an apply: the registers
/// first, the record, the pin, the writes, their read-back, the un-pin); `None` never
/// dies and only counts.
struct DiesAt {
    inner: SysfsConfigSpace,
    at: Option<usize>,
    accesses: Arc<AtomicUsize>,
}

impl DiesAt {
    fn tick(&self) {
        self.accesses.fetch_add(1, Ordering::SeqCst);
        if Some(self.accesses.load(Ordering::SeqCst)) == self.at {
            panic!(
                "killed at config-space access {}",
                self.accesses.load(Ordering::SeqCst)
            );
        }
    }
}

impl ConfigSpace for DiesAt {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.tick();
        self.inner.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.tick();
        self.inner.write_at(offset, bytes)
    }
}

fn router_dying_at(
    pch: &Pch,
    at: Option<usize>,
    accesses: Arc<AtomicUsize>,
) -> ProfileRouter<DiesAt> {
    let detected = detect(&pch.root(), None).unwrap();
    let space = DiesAt {
        inner: SysfsConfigSpace::new(&pch.root(), detected.xhci),
        at,
        accesses,
    };
    let path = pch.config_path(XHCI);
    ProfileRouter::new(
        Router::with_space(&pch.root(), detected, path, space),
        profiles(),
    )
}

fn restarted(pch: &Pch) -> ProfileRouter<SysfsConfigSpace> {
    let detected = detect(&pch.root(), None).unwrap();
    ProfileRouter::new(Router::open(&pch.root(), detected), profiles())
}

/// After a restart's reconcile: the registers hold what the record says (or the first
/// state without a record), and power/control is pinned exactly while a non-default
/// routing is recorded.
fn assert_consistent(pch: &Pch, first: (u16, u32), what: &str) {
    let mut r = restarted(pch);
    r.reconcile().unwrap();
    let record = r.router().active().unwrap();
    let power = pch.read_power_control();
    match record {
        None => {
            assert_eq!(
                (pch.xusb2pr(), pch.usb3_pssen()),
                first,
                "{what}: registers"
            );
            assert_eq!(power, "auto", "{what}: power/control without a record");
        }
        Some(rec) => {
            assert_eq!(
                (pch.xusb2pr(), pch.usb3_pssen()),
                (rec.xusb2pr, rec.usb3_pssen),
                "{what}: registers against {rec:?}"
            );
            let default = rec.xusb2pr == 0x3fff && rec.usb3_pssen == 0x3f;
            let expected = if default { "auto" } else { "on" };
            assert_eq!(power, expected, "{what}: power/control against {rec:?}");
            assert_eq!(
                rec.power_control_before.is_some(),
                !default,
                "{what}: {rec:?}"
            );
        }
    }
    // And the way home still works: back to the default, un-pinned.
    r.apply("host", false).unwrap();
    assert_eq!(
        (pch.xusb2pr(), pch.read_power_control()),
        (0x3fff, "auto".to_string()),
        "{what}: home"
    );
}

/// Apply `profile` on a fresh Lynx Point (after `setup`) and kill it at every config-space
/// access in turn; after each, restart and check.
fn kill_at_every_step(setup: &[&str], profile: &str) {
    let count = |pch: &Pch| {
        let accesses = Arc::new(AtomicUsize::new(0));
        for p in setup {
            router_dying_at(pch, None, Arc::new(AtomicUsize::new(0)))
                .apply(p, false)
                .unwrap();
        }
        (router_dying_at(pch, None, accesses.clone()), accesses)
    };
    let scratch = Pch::lynx_point(Regs::LYNX_DEFAULT);
    let (mut r, accesses) = count(&scratch);
    r.apply(profile, false).unwrap();
    let total = accesses.load(Ordering::SeqCst);
    assert!(total >= 4, "apply {profile} made only {total} accesses");
    for at in 1..=total {
        let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
        let first = (pch.xusb2pr(), pch.usb3_pssen());
        let (_, accesses) = count(&pch);
        let mut r = router_dying_at(&pch, Some(at), accesses);
        let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = r.apply(profile, false);
        }));
        assert!(died.is_err(), "apply {profile} never reached access {at}");

        assert_consistent(
            &pch,
            first,
            &format!("{profile} killed at access {at} of {total}"),
        );
    }
}

#[test]
fn a_switch_to_a_routing_killed_at_any_step_converges_after_a_restart() {
    kill_at_every_step(&[], "guest");
}

#[test]
fn a_switch_back_to_the_default_killed_at_any_step_converges_after_a_restart() {
    kill_at_every_step(&["guest"], "host");
}
