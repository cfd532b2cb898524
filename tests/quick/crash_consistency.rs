//! Crash consistency (issue 11): a real child process is killed with SIGKILL at every
//! step of `controller bind`, `controller restore` and a port-routing switch, then the
//! host is "restarted" (systemd empties /run/usbroute, the daemon re-applies its rule or
//! its routing watch runs, the user restores) and must converge: every group member back
//! on its driver or all on vfio-pci with a record; the routing registers and the xHCI's
//! `power/control` as the record says.
//!
//! The child is this test binary, run again on one test with `USBROUTE_CRASH_CHILD` set;
//! it works on the parent's temp tree through the fixtures' stand-ins for the kernel
//! (tests/vfio_support, tests/routing_support) and kills itself just before its Nth host
//! access (read or write). The hook lives here, in the test: the product has none.

use crate::routing_support;
use crate::vfio_support;

use nix::sys::signal::{raise, Signal};
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use usbroute::inventory::PciAddress;
use usbroute::routing::config_space::{ConfigSpace, SysfsConfigSpace};
use usbroute::routing::control::ProfileRouter;
use usbroute::routing::detect::detect;
use usbroute::routing::router::Router;
use usbroute::routing::{ProfileConfig, RoutingConfig};
use usbroute::sysfs::SysfsRoot;
use usbroute::vfio::{self, BindOptions, PciHost};
use vfio_support::{FixtureDriverCore, Tree};

const CHILD: &str = "USBROUTE_CRASH_CHILD";
const EHCI: &str = "00:1d.7";

/// What a child is asked to do: `case`, dying at host access `at`, on the tree at `dir`.
struct ChildJob {
    case: String,
    at: usize,
    dir: PathBuf,
}

fn child_job() -> Option<ChildJob> {
    let spec = std::env::var(CHILD).ok()?;
    let mut parts = spec.splitn(3, ' ');
    Some(ChildJob {
        case: parts.next()?.to_string(),
        at: parts.next()?.parse().ok()?,
        dir: PathBuf::from(parts.next()?),
    })
}

/// Counts host accesses and SIGKILLs the process at the chosen one.
struct Dies {
    at: usize,
    seen: AtomicUsize,
}

impl Dies {
    fn new(at: usize) -> Self {
        Self {
            at,
            seen: AtomicUsize::new(0),
        }
    }

    fn tick(&self) {
        if self.seen.fetch_add(1, Ordering::SeqCst) + 1 == self.at {
            raise(Signal::SIGKILL).expect("SIGKILL myself");
        }
    }
}

/// The fixture's PCI driver core, dying at the chosen access.
struct DyingCore {
    core: FixtureDriverCore,
    dies: Dies,
}

impl PciHost for DyingCore {
    fn write_attr(&self, path: &Path, value: &[u8]) -> io::Result<()> {
        self.dies.tick();
        self.core.write_attr(path, value)
    }
    fn read_attr(&self, path: &Path) -> Option<String> {
        self.dies.tick();
        self.core.read_attr(path)
    }
    fn driver_of(&self, pci: &PciAddress) -> Option<String> {
        self.dies.tick();
        self.core.driver_of(pci)
    }
    fn exists(&self, path: &Path) -> bool {
        self.dies.tick();
        self.core.exists(path)
    }
    fn load_module(&self, module: &str) -> io::Result<()> {
        self.dies.tick();
        self.core.load_module(module)
    }
}

/// Config space dying at the chosen access.
struct DyingSpace {
    inner: SysfsConfigSpace,
    dies: Dies,
}

impl ConfigSpace for DyingSpace {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.dies.tick();
        self.inner.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.dies.tick();
        self.inner.write_at(offset, bytes)
    }
}

/// The kernel's driver core on the q35 tree at `dir`, knowing each USB function's boot
/// driver even while it is on vfio-pci (as the kernel's id tables do).
fn q35_core(dir: &Path) -> FixtureDriverCore {
    FixtureDriverCore::at(dir)
        .default_driver("00:1d.0", "uhci_hcd")
        .default_driver("00:1d.1", "uhci_hcd")
        .default_driver("00:1d.2", "uhci_hcd")
        .default_driver(EHCI, "ehci-pci")
}

fn quick() -> BindOptions {
    BindOptions {
        force: false,
        wait: Duration::from_secs(2),
        settle: Duration::from_millis(200),
    }
}

/// `host` is the kernel default; `guest` moves two SuperSpeed-capable ports to EHCI, so
/// XUSB2PR and USB3_PSSEN are both written.
fn profiles() -> RoutingConfig {
    let mut c = RoutingConfig::default();
    let mask = ProfileConfig {
        mask: Some("0x3fff".into()),
        ..ProfileConfig::default()
    };
    let ehci = ProfileConfig {
        ehci: vec!["ehci1:1".into(), "ehci1:2".into()],
        ..ProfileConfig::default()
    };
    c.profile.insert("host".into(), mask);
    c.profile.insert("guest".into(), ehci);
    c
}

fn profile_router<C: ConfigSpace>(
    root: &SysfsRoot,
    space: impl FnOnce(PciAddress) -> C,
) -> ProfileRouter<C> {
    let detected = detect(root, None).expect("detect");
    let path = root.path(format!("/sys/bus/pci/devices/{}/config", detected.xhci));
    let space = space(detected.xhci);
    ProfileRouter::new(Router::with_space(root, detected, path, space), profiles())
}

/// The child's side: do the job; returning means it finished before access `at`.
fn run_job(job: &ChildJob) {
    let root = SysfsRoot::new(&job.dir);
    let core = || DyingCore {
        core: q35_core(&job.dir),
        dies: Dies::new(job.at),
    };
    let ehci = vfio_support::pci(EHCI);
    match job.case.as_str() {
        "bind" => drop(vfio::bind(&root, &core(), &ehci, &quick())),
        "restore" => drop(vfio::restore(&root, &core(), &ehci, &quick())),
        profile => {
            let dying = |xhci| DyingSpace {
                inner: SysfsConfigSpace::new(&root, xhci),
                dies: Dies::new(job.at),
            };
            drop(profile_router(&root, dying).apply(profile, false));
        }
    }
}

/// Run `test` again as a child doing `case` on `dir`, dying at access `at`. `true` when
/// it was killed, `false` when it finished first (there is no access `at`).
fn child(test: &str, case: &str, at: usize, dir: &Path) -> bool {
    // libtest names a test by its path in the test binary, without the crate.
    let in_binary = module_path!().split_once("::").map(|(_, m)| m);
    let test = in_binary.map_or(test.to_string(), |m| format!("{m}::{test}"));
    let status = Command::new(std::env::current_exe().expect("test binary"))
        .args([test.as_str(), "--exact", "--test-threads=1", "--quiet"])
        .env(CHILD, format!("{case} {at} {}", dir.display()))
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("spawn the child");
    match status.status.signal() {
        Some(9) => true,
        None if status.status.success() => false,
        _ => panic!(
            "child {case} at {at}: {:?}\n{}",
            status.status,
            String::from_utf8_lossy(&status.stdout)
        ),
    }
}

/// What systemd does to the runtime directory when the daemon dies.
fn restart(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir.join("run/usbroute"));
}

/// Kill `case` at every access in turn on a fresh tree from `setup`, restart, `check`.
fn kill_at_every_step<T>(
    test: &str,
    case: &str,
    setup: impl Fn() -> T,
    dir: impl Fn(&T) -> &Path,
    check: impl Fn(&T, &str),
) {
    if let Some(job) = child_job() {
        return run_job(&job);
    }
    let mut kills = 0;
    let started = std::time::Instant::now();
    for at in 1.. {
        let world = setup();
        if !child(test, case, at, dir(&world)) {
            break;
        }
        kills += 1;
        restart(dir(&world));
        check(&world, &format!("{case} killed at access {at}"));
    }
    assert!(kills >= 4, "{case} made only {kills} host accesses");
    eprintln!(
        "{case}: killed at each of {kills} accesses in {:?}",
        started.elapsed()
    );
}

fn ehci_record(tree: &Tree) -> PathBuf {
    tree.path("var/lib/usbroute/vfio/7.json")
}

#[test]
fn controller_bind_killed_at_any_step_converges_after_a_restart() {
    let test = "controller_bind_killed_at_any_step_converges_after_a_restart";
    let setup = || {
        let tree = Tree::q35_usb().with_vfio();
        let first = vfio_support::state(&tree);
        (tree, first)
    };
    kill_at_every_step(
        test,
        "bind",
        setup,
        |(t, _)| t.dir.path(),
        |(tree, first), what| {
            let core = q35_core(tree.dir.path());
            let ehci = vfio_support::pci(EHCI);

            // The restarted daemon applies its [[controller]] rule again...
            vfio::bind(&tree.root(), &core, &ehci, &quick()).expect(what);
            let bound = vfio_support::state(tree);
            // ...and the rule is removed later.
            vfio::restore(&tree.root(), &core, &ehci, &quick()).expect(what);

            let group_7: Vec<_> = bound
                .iter()
                .filter(|(pci, _, _)| pci.starts_with("0000:00:1d."))
                .collect();
            assert!(
                group_7.len() == 4
                    && group_7
                        .iter()
                        .all(|(_, d, _)| d.as_deref() == Some("vfio-pci")),
                "{what}: {bound:?}"
            );
            assert_eq!(&vfio_support::state(tree), first, "{what}");
            assert!(!ehci_record(tree).exists(), "{what}");
        },
    );
}

#[test]
fn controller_restore_killed_at_any_step_converges_after_a_restart() {
    let test = "controller_restore_killed_at_any_step_converges_after_a_restart";
    let setup = || {
        let tree = Tree::q35_usb().with_vfio();
        let first = vfio_support::state(&tree);
        let core = FixtureDriverCore::new(&tree);
        vfio::bind(&tree.root(), &core, &vfio_support::pci(EHCI), &quick()).expect("bind");
        (tree, first)
    };
    kill_at_every_step(
        test,
        "restore",
        setup,
        |(t, _)| t.dir.path(),
        |(tree, first), what| {
            let core = q35_core(tree.dir.path());

            vfio::restore(&tree.root(), &core, &vfio_support::pci(EHCI), &quick()).expect(what);

            assert_eq!(&vfio_support::state(tree), first, "{what}");
            assert!(!ehci_record(tree).exists(), "{what}");
        },
    );
}

/// After the restarted daemon's reconcile: registers as the record says (or as at first
/// without one), power/control pinned exactly while a non-default routing is recorded;
/// and the way home still works.
fn routing_converges(pch: &routing_support::Pch, first: (u16, u32), what: &str) {
    let root = pch.root();
    let mut r = profile_router(&root, |xhci| SysfsConfigSpace::new(&root, xhci));
    r.reconcile().expect(what);
    let record = r.router().active().expect(what);
    let registers = (pch.xusb2pr(), pch.usb3_pssen());
    let power = pch.read_power_control();
    match &record {
        None => assert_eq!((registers, power.as_str()), (first, "auto"), "{what}"),
        Some(rec) => {
            let default = (rec.xusb2pr, rec.usb3_pssen) == first;
            assert_eq!(registers, (rec.xusb2pr, rec.usb3_pssen), "{what}: {rec:?}");
            assert_eq!(
                power,
                if default { "auto" } else { "on" },
                "{what}: {rec:?}"
            );
            assert_eq!(
                rec.power_control_before.is_some(),
                !default,
                "{what}: {rec:?}"
            );
        }
    }
    r.apply("host", false).expect(what);
    assert_eq!(
        ((pch.xusb2pr(), pch.usb3_pssen()), pch.read_power_control()),
        (first, "auto".to_string()),
        "{what}: home"
    );
}

fn lynx_point(profiles_first: &[&str]) -> (routing_support::Pch, (u16, u32)) {
    let pch = routing_support::Pch::lynx_point(routing_support::Regs::LYNX_DEFAULT);
    let first = (pch.xusb2pr(), pch.usb3_pssen());
    let root = pch.root();
    for p in profiles_first {
        profile_router(&root, |xhci| SysfsConfigSpace::new(&root, xhci))
            .apply(p, false)
            .expect("setup");
    }
    (pch, first)
}

#[test]
fn routing_switch_killed_at_any_step_converges_after_a_restart() {
    let test = "routing_switch_killed_at_any_step_converges_after_a_restart";
    kill_at_every_step(
        test,
        "guest",
        || lynx_point(&[]),
        |(p, _)| p.path(),
        |(pch, first), what| {
            routing_converges(pch, *first, what);
        },
    );
}

#[test]
fn routing_switch_back_to_the_default_killed_at_any_step_converges_after_a_restart() {
    let test = "routing_switch_back_to_the_default_killed_at_any_step_converges_after_a_restart";
    let setup = || lynx_point(&["guest"]);
    kill_at_every_step(
        test,
        "host",
        setup,
        |(p, _)| p.path(),
        |(pch, first), what| {
            routing_converges(pch, *first, what);
        },
    );
}
