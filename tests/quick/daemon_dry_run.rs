//! `usbroute serve --dry-run` writes nothing under its sysfs root (issue 12): with
//! `[routing.profile.*]` and a `[[controller]]` rule configured, a dry-run daemon that
//! re-checks a routing the kernel rewrote, answers toggles on the control socket and the
//! TCP listener, and reloads a changed config leaves every file of the fixture
//! byte-identical: the xHCI's config space (XUSB2PR, USB3_PSSEN), its `power/control`,
//! every `driver`, `driver_override`, `bind` and `unbind`, and the routing state.
//!
//! The fixture is a q35-shaped sysfs tree (tests/vfio_support) with a Lynx Point xHCI and
//! EHCI added (config-space files as tests/routing_support builds them).

use crate::routing_support;
use crate::serve_support;
use crate::vfio_support;

use serve_support::Serve;
use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vfio_support::Tree;

const XHCI: &str = "0000:00:14.0";

/// The q35 USB tree plus a Lynx Point xHCI (all ports on xHCI, `power/control` auto) and
/// its EHCI, and a routing record saying profile `guest` (0x3ffc) is in force: the
/// register holding 0x3fff is what the kernel leaves after a resume.
fn fixture() -> Tree {
    let tree = Tree::q35_usb().with_vfio();
    let lynx = [
        (
            XHCI,
            0x8c31,
            0x0c0330,
            Some(routing_support::Regs::LYNX_DEFAULT),
        ),
        // EHCI #1 (8c26) by its device id; the address is free in the q35 tree.
        ("0000:00:1a.0", 0x8c26, 0x0c0320, None),
    ];
    for (group, (addr, device, class, regs)) in (20..).zip(lynx) {
        let driver = if class == 0x0c0330 {
            "xhci_hcd"
        } else {
            "ehci-pci"
        };
        tree.function(addr, class, Some(driver), Some(group));
        let bytes = routing_support::config_bytes(0x8086, device, class, regs);
        std::fs::write(tree.path(&format!("{}/config", Tree::dev_dir(addr))), bytes).unwrap();
    }
    tree.file(&format!("{}/power/control", Tree::dev_dir(XHCI)), "auto\n");
    tree.file(
        "var/lib/usbroute/routing.json",
        &serde_json::json!({
            "controller": XHCI,
            "profile": "guest",
            "xusb2pr": 0x3ffc,
            "usb3_pssen": 0x3f,
            "power_control_before": "auto",
        })
        .to_string(),
    );
    tree
}

/// Every file, symlink and directory under `root`: content, link target or `dir`.
fn tree_state(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            let state = if kind.is_symlink() {
                std::fs::read_link(&path)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else if kind.is_dir() {
                todo.push(path.clone());
                b"dir".to_vec()
            } else {
                std::fs::read(&path).unwrap()
            };
            out.insert(path.strip_prefix(root).unwrap().to_path_buf(), state);
        }
    }
    out
}

/// The paths whose state differs between two [`tree_state`]s (added and removed too).
fn changed(
    before: &BTreeMap<PathBuf, Vec<u8>>,
    after: &BTreeMap<PathBuf, Vec<u8>>,
) -> Vec<PathBuf> {
    before
        .keys()
        .chain(after.keys())
        .filter(|p| before.get(*p) != after.get(*p))
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// [`routing_support::toggle_daemon_config`] with `desk` at `desk_mask`, a VM, and a
/// `[[controller]]` rule giving it `controller`.
fn config_text(port: u16, controller: &str, desk_mask: &str) -> String {
    format!(
        "[[vm]]\nname = \"win11\"\nqmp = \"/nonexistent/win11.qmp\"\n\n\
         [[controller]]\npci = \"{controller}\"\nvm = \"win11\"\n\n{}",
        routing_support::toggle_daemon_config(port).replace("0x3f0f", desk_mask)
    )
}

/// `usbroute serve --dry-run -v` on a tree, its log lines collected, killed on drop.
struct DryRun {
    serve: Serve,
    dir: tempfile::TempDir,
    port: u16,
}

impl DryRun {
    fn start(tree: &Tree) -> DryRun {
        let dir = tempfile::tempdir().unwrap();
        let port = routing_support::free_port();
        std::fs::write(
            dir.path().join("usbroute.toml"),
            config_text(port, "0000:00:1d.7", "0x3f0f"),
        )
        .unwrap();
        let serve = Serve::at(dir.path().join("control.sock"))
            .args(&["--dry-run", "-v"])
            .config(dir.path().join("usbroute.toml"))
            .sysfs_root(tree.dir.path())
            .log()
            .start();
        let dry_run = DryRun { serve, dir, port };
        dry_run.wait_until("the toggle listener", |s| {
            TcpStream::connect(("127.0.0.1", s.port)).is_ok()
        });
        dry_run
    }

    fn wait_until(&self, what: &str, ok: impl Fn(&DryRun) -> bool) {
        self.serve
            .wait_until(Duration::from_secs(20), what, || ok(self));
    }

    fn logged(&self, text: &str) -> bool {
        self.serve.logged(text)
    }

    fn cli(&self, args: &[&str]) -> String {
        self.serve.cli(args)
    }

    /// The addresses of the controller rules `status` reports an outcome for.
    fn controller_outcomes(&self) -> Vec<String> {
        self.serve.status()["controllers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["pci"].as_str().unwrap().to_string())
            .collect()
    }

    fn routing_request(&self, line: &str) -> String {
        let request = format!("{{\"request\":\"routing\",\"line\":\"{line}\"}}");
        let reply = self.serve.request(&request);
        reply["line"].as_str().unwrap().to_string()
    }

    fn tcp(&self, line: &str) -> String {
        routing_support::tcp_toggle(self.port, line)
    }
}

#[test]
fn a_dry_run_daemon_with_routing_profiles_and_a_controller_rule_writes_nothing() {
    let tree = fixture();
    let before = tree_state(tree.dir.path());

    let serve = DryRun::start(&tree);
    // The re-apply watch has looked at the rewritten register, and the rule was handled.
    serve.wait_until("the watch to see XUSB2PR 0x3fff", |s| {
        s.logged("XUSB2PR was 0x3fff")
    });
    serve.wait_until("the controller rule's outcome", |s| {
        s.controller_outcomes() == ["0000:00:1d.7"]
    });
    let by_control = serve.routing_request("toggle");
    let by_tcp = serve.tcp("desk");
    std::fs::write(
        serve.dir.path().join("usbroute.toml"),
        config_text(serve.port, "0000:00:01.0", "0x0fff"),
    )
    .unwrap();
    serve.cli(&["reload"]);
    serve.wait_until("the new controller rule's outcome", |s| {
        s.controller_outcomes()
            .contains(&"0000:00:01.0".to_string())
    });
    let after_reload = serve.tcp("desk");
    // The daemon logs before it replies, but the log is read from its stderr by a thread
    // of ours that may not have got there yet.
    serve.wait_until("the reload's desk mask logged as a would-be write", |s| {
        s.logged("dry run: would write XUSB2PR 0x0fff")
    });

    assert_eq!(
        changed(&before, &tree_state(tree.dir.path())),
        Vec::<PathBuf>::new()
    );
    for reply in [&by_control, &by_tcp, &after_reload] {
        assert!(reply.starts_with("ok "), "{reply}");
    }
}

#[test]
fn a_dry_run_daemon_shows_in_status_the_routing_it_would_put_back() {
    let tree = fixture();
    let before = tree_state(tree.dir.path());
    let serve = DryRun::start(&tree);

    let routing = |s: &DryRun| {
        let status: serde_json::Value =
            serde_json::from_str(&s.cli(&["status", "--json"])).unwrap();
        status["routing"].clone()
    };
    serve.wait_until("the routing in status", |s| !routing(s)["would"].is_null());
    let routing = routing(&serve);

    assert_eq!(routing["controller"], XHCI);
    assert_eq!(routing["xusb2pr"], 0x3fff);
    assert_eq!(routing["intent"], "guest");
    assert_eq!(
        routing["would"],
        serde_json::json!({"step": "restore", "profile": "guest", "found": 0x3fff, "restored": 0x3ffc})
    );
    assert_eq!(
        changed(&before, &tree_state(tree.dir.path())),
        Vec::<PathBuf>::new()
    );
}
