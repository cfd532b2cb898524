//! An idle `usbroute serve` makes no system call: four real QEMUs connected, rules in
//! force and port routing on (a Lynx Point config-space fixture with its toggle
//! listener), then `strace -c` on every thread of the daemon for 10 s counts nothing.
//! A timer that polls (a tick, a re-list, a register watch) shows up here.
//!
//! The daemon listens to every kernel uevent, and other tests of this binary make some
//! (they write `add` into sysfs): a window in which the kernel sent one is not idle, so
//! it is measured again, a few times at most.

use crate::qemu_support::QemuAt;
use crate::routing_support::{free_port, toggle_daemon_config, Pch, Regs};
use crate::serve_support::Serve;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use usbroute::events::{Received, UeventSocket};

const VMS: [&str; 4] = ["desk", "games", "work", "build"];
/// What issue 14 asks: no system call in 10 s.
const WINDOW: Duration = Duration::from_secs(10);
const ATTEMPTS: usize = 4;

#[test]
fn an_idle_daemon_with_four_vms_rules_and_routing_makes_no_system_call() {
    need_strace();
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
    let dir = pch.path();
    let mut config = toggle_daemon_config(free_port());
    let mut qemus = vec![];
    for (i, vm) in VMS.iter().enumerate() {
        let qmp = dir.join(format!("{vm}.qmp"));
        qemus.push(QemuAt::spawn(
            &[&qmp],
            &["-machine", "pc", "-m", "32", "-device", "qemu-xhci"],
        ));
        let _ = write!(
            config,
            "\n[[vm]]\nname = \"{vm}\"\nqmp = \"{}\"\n\n[[rule]]\nvm = \"{vm}\"\nmatch = \"id:046d:c0{i}{i}\"\nby = \"id\"\n",
            qmp.display()
        );
    }
    let config_path = dir.join("usbroute.toml");
    std::fs::write(&config_path, config).unwrap();
    let serve = Serve::at(dir.join("control.sock"))
        .config(&config_path)
        .sysfs_root(dir)
        .log()
        .start();
    serve.wait_until(
        Duration::from_secs(30),
        "four VMs up, the engine at rest and the routing read",
        || {
            let status = serve.status();
            let vms = status["vms"].as_array().cloned().unwrap_or_default();
            vms.len() == VMS.len()
                && vms.iter().all(|v| v["up"] == true)
                && status["at_rest"] == true
                && !status["routing"].is_null()
        },
    );

    let uevents = count_uevents();
    let pid = serve.child.id();
    let own = tempfile::tempdir().unwrap();
    let mut windows = vec![];
    for _ in 0..ATTEMPTS {
        let before = uevents.load(Ordering::SeqCst);
        let calls = strace_window(pid, own.path());
        // A uevent may reach the daemon just before the window and be handled in it.
        std::thread::sleep(Duration::from_millis(200));
        let kernel_spoke = uevents.load(Ordering::SeqCst) != before;
        match calls {
            None => return,
            Some(_) if kernel_spoke => windows.push("the kernel sent uevents".to_string()),
            Some(table) => panic!(
                "the idle daemon made system calls in {WINDOW:?} (strace -c):\n{table}\nlog:\n{}",
                serve.log()
            ),
        }
    }
    panic!("no quiet {WINDOW:?} window to measure in {ATTEMPTS} tries: {windows:?}");
}

/// `strace -c -f` on `pid` for [`WINDOW`]: its table when it counted any call. `dir`
/// is the test's own: in the VMs' socket directory the daemon would see the file come.
fn strace_window(pid: u32, dir: &Path) -> Option<String> {
    let out = dir.join("strace.out");
    let status = Command::new("timeout")
        .args([
            "-s",
            "INT",
            &WINDOW.as_secs().to_string(),
            "strace",
            "-c",
            "-f",
            "-o",
        ])
        .arg(&out)
        .args(["-p", &pid.to_string()])
        .status()
        .expect("run timeout strace");
    // `timeout` says 124 when it stopped strace, which is the plan.
    assert!(
        matches!(status.code(), Some(124) | Some(0)),
        "strace -p {pid} failed: {status}"
    );
    let table = std::fs::read_to_string(&out).unwrap_or_default();
    table.contains("total").then_some(table)
}

/// Counts every kernel uevent from now on (a thread of its own, for the test's life).
fn count_uevents() -> Arc<AtomicU64> {
    let count = Arc::new(AtomicU64::new(0));
    let counter = count.clone();
    let (ready, listening) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut socket = UeventSocket::open().expect("open a uevent socket (needs root)");
            let _ = ready.send(());
            loop {
                if let Received::Event(_) | Received::Resync { .. } = socket.recv().await {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
    });
    listening.recv().expect("the uevent counter listens");
    count
}

fn need_strace() {
    let found = Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "this test needs strace: apt-get install strace (scripts/setup installs it)"
    );
}
