//! `usbroute ports` and `usbroute ports map` through the real inventory reader, on the
//! test-bed guest's recording (tests/fixtures/guest-xhci-ehci) edited to look like a
//! Lynx Point PCH: its xHCI 00:03.0 gets an 8086:8c31 config space, its EHCI 00:1d.7 an
//! 8086:8c26 one. (QEMU's EHCI has no rate-matching hub, so only the xHCI's devices map
//! to ports here; the EHCI side is covered in routing_ports.rs.)

use crate::routing_support;

use assert_cmd::Command;
use routing_support::Regs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

const XHCI: &str = "0000:00:03.0";
const EHCI: &str = "0000:00:1d.7";

fn config_space(vendor: u16, device: u16, class: u32, regs: Option<Regs>) -> Vec<u8> {
    let mut b: Vec<u8> = (0..256u32).map(|i| (i as u8) ^ 0xa5).collect();
    b[0..2].copy_from_slice(&vendor.to_le_bytes());
    b[2..4].copy_from_slice(&device.to_le_bytes());
    b[9..12].copy_from_slice(&class.to_le_bytes()[..3]);
    if let Some(r) = regs {
        b[0xd0..0xd2].copy_from_slice(&r.xusb2pr.to_le_bytes());
        b[0xd4..0xd8].copy_from_slice(&r.xusb2prm.to_le_bytes());
        b[0xd8..0xdc].copy_from_slice(&r.usb3_pssen.to_le_bytes());
        b[0xdc..0xe0].copy_from_slice(&r.usb3prm.to_le_bytes());
    }
    b
}

/// A copy of the recording with Intel config spaces; the recording itself is untouched.
fn recorded_lynx_point() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let copy = std::process::Command::new("cp")
        .arg("-a")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/guest-xhci-ehci/."))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(copy.success());
    let pci = |addr: &str| dir.path().join("sys/bus/pci/devices").join(addr);
    let lynx = config_space(0x8086, 0x8c31, 0x0c0330, Some(Regs::LYNX_DEFAULT));
    std::fs::write(pci(XHCI).join("config"), lynx).unwrap();
    std::fs::write(
        pci(EHCI).join("config"),
        config_space(0x8086, 0x8c26, 0x0c0320, None),
    )
    .unwrap();
    dir
}

fn usbroute(root: &Path, config: &Path) -> Command {
    let mut c = Command::cargo_bin("usbroute").unwrap();
    c.arg("--sysfs-root").arg(root).arg("--config").arg(config);
    c
}

#[test]
fn ports_shows_the_recorded_devices_on_their_ports() {
    let root = recorded_lynx_point();
    let config = root.path().join("usbroute.toml");
    std::fs::write(&config, "[routing.labels]\ndesk = \"ehci1:4\"\n").unwrap();

    let out = usbroute(root.path(), &config)
        .args(["ports", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let devices = |i: usize| -> Vec<String> {
        v["ports"][i]["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap().to_string())
            .collect()
    };

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(devices(0), ["1-1 0627:0001 QEMU QEMU USB Keyboard"]);
    assert_eq!(
        devices(1).len(),
        5,
        "the hub at 1-2 and the four devices behind it"
    );
    assert_eq!(
        devices(2),
        ["2-3 46f4:0001 QEMU QEMU USB HARDDRIVE"],
        "SuperSpeed port 3 pairs with ehci1:3"
    );
    assert_eq!(devices(3), ["1-4 0627:0001 QEMU QEMU USB Tablet"]);
    assert_eq!(v["ports"][3]["label"], "desk");
    assert_eq!(v["ports"][3]["ehci_pci"], EHCI);
}

/// Lines of a child's stdout, from a thread.
fn stdout_lines(out: std::process::ChildStdout) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Read lines until one contains `what`; all lines read, for messages.
fn expect(lines: &Receiver<String>, what: &str, seen: &mut Vec<String>) {
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(20)) {
        let found = line.contains(what);
        seen.push(line);
        if found {
            return;
        }
    }
    panic!("no line with `{what}` in:\n{}", seen.join("\n"));
}

#[test]
fn ports_map_sees_a_plug_and_saves_its_label_into_the_config() {
    let root = recorded_lynx_point();
    let config = root.path().join("usbroute.toml");
    std::fs::write(
        &config,
        "# my VMs\n[[vm]]\nname = \"win11\"\nqmp = \"/run/win11.qmp\"\n",
    )
    .unwrap();
    let usb = root.path().join("sys/bus/usb/devices");
    let unplugged: Vec<(PathBuf, PathBuf)> = ["1-4", "1-4:1.0"]
        .iter()
        .map(|n| (usb.join(n), std::fs::read_link(usb.join(n)).unwrap()))
        .collect();
    unplugged
        .iter()
        .for_each(|(link, _)| std::fs::remove_file(link).unwrap());
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("usbroute"))
        .arg("--sysfs-root")
        .arg(root.path())
        .arg("--config")
        .arg(&config)
        .args(["ports", "map"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let lines = stdout_lines(child.stdout.take().unwrap());
    let mut seen = Vec::new();

    expect(&lines, "Waiting for a device", &mut seen);
    unplugged
        .iter()
        .for_each(|(link, target)| std::os::unix::fs::symlink(target, link).unwrap());
    expect(&lines, "lit up", &mut seen);
    stdin.write_all(b"desk left\n").unwrap();
    expect(&lines, "Saved", &mut seen);
    stdin.write_all(b"q\n").unwrap();
    let status = child.wait().unwrap();

    assert!(status.success());
    assert!(
        seen.iter().any(|l| l == "Port ehci1:4 lit up (bit 3 on EHCI 0000:00:1d.7): 1-4 0627:0001 QEMU QEMU USB Tablet"),
        "{seen:#?}"
    );
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "# my VMs\n[[vm]]\nname = \"win11\"\nqmp = \"/run/win11.qmp\"\n\n[routing.labels]\n\"desk left\" = \"ehci1:4\"\n"
    );
}
