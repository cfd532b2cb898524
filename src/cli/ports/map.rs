//! `usbroute ports map`: the labelling wizard.
//!
//! Rescans the inventory every 250 ms (cheap, and robust against missed uevents); a
//! device that was not there before lights its port up. Each label is written to the
//! config file the moment it is typed, so Ctrl-C loses nothing and running the wizard
//! again carries on with the ports still unnamed.

use super::{shown, Global};
use crate::inventory::{scan, Snapshot};
use crate::routing::detect::{detect, Detected, Registers};
use crate::routing::labels::{arrivals, valid_label, write_label, PortHit};
use crate::routing::profile::{label_of, EhciPort, Route};
use crate::routing::router::Router;
use crate::routing::RoutingConfig;
use anyhow::Context;
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::Duration;

const POLL: Duration = Duration::from_millis(250);

pub(super) fn run(g: &Global, config: &Path, routing: &RoutingConfig) -> anyhow::Result<ExitCode> {
    let root = g.root();
    let detected = detect(&root, routing.controller)?;
    let regs = Router::open(&root, detected.clone()).registers()?;
    let wizard = Wizard {
        detected,
        config,
        labels: routing.labels.clone(),
        poll: POLL,
    };
    wizard.run(
        &regs,
        &stdin_lines(),
        || scan(&root),
        &mut std::io::stdout(),
    )?;
    Ok(ExitCode::SUCCESS)
}

/// The wizard's state; I/O comes in as arguments so tests can drive it.
struct Wizard<'a> {
    detected: Detected,
    config: &'a Path,
    labels: BTreeMap<String, String>,
    poll: Duration,
}

impl Wizard<'_> {
    /// Until `q` or the end of input: wait for a plug, ask for a name, save it.
    fn run(
        mut self,
        regs: &Registers,
        lines: &Receiver<String>,
        mut scan: impl FnMut() -> Snapshot,
        out: &mut impl Write,
    ) -> anyhow::Result<()> {
        let chipset = self.detected.chipset;
        writeln!(out, "Port map for {chipset} at {}.", self.detected.xhci)?;
        writeln!(
            out,
            "Plug a device (a flash drive is easiest) into each physical port in turn. usbroute shows\n\
             which port lit up and asks for a name such as `front left`. Names are saved to {} at once:\n\
             stop any time with `q` or Ctrl-C and run `usbroute ports map` again to carry on.",
            shown(self.config)
        )?;
        let on_ehci = (0..chipset.high_speed_ports())
            .filter(|b| Route::of_bit(regs.xusb2pr, *b) == Route::Ehci)
            .count();
        writeln!(
            out,
            "Routing now: {on_ehci} port(s) on EHCI, the rest on xHCI; either works."
        )?;
        let mut before = scan();
        loop {
            self.print_remaining(out)?;
            writeln!(
                out,
                "Waiting for a device to be plugged in (q + Enter to stop)..."
            )?;
            let hit = loop {
                match lines.recv_timeout(self.poll) {
                    Ok(line) if line.trim().eq_ignore_ascii_case("q") => return self.finish(out),
                    Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return self.finish(out),
                }
                let after = scan();
                let hits = arrivals(&before, &after, &self.detected);
                before = after;
                if let Some(hit) = hits.into_iter().next() {
                    break hit;
                }
            };
            self.announce(&hit, out)?;
            let Some(label) = ask_label(lines, out)? else {
                continue;
            };
            write_label(self.config, &label, hit.port)
                .with_context(|| format!("Cannot save the label for {}", hit.port))?;
            self.labels
                .retain(|_, spec| EhciPort::parse(spec) != Some(hit.port));
            self.labels.insert(label.clone(), hit.port.to_string());
            writeln!(
                out,
                "Saved: \"{label}\" = \"{}\". Unplug it and try the next port.",
                hit.port
            )?;
        }
    }

    fn announce(&self, hit: &PortHit, out: &mut impl Write) -> anyhow::Result<()> {
        let current = label_of(&self.labels, self.detected.chipset, hit.bit)
            .map(|c| format!(" (now labelled \"{c}\")"))
            .unwrap_or_default();
        let ehci = self
            .detected
            .ehci_pci(hit.port.ehci)
            .map(|p| format!(" on EHCI {p}"))
            .unwrap_or_default();
        writeln!(
            out,
            "\nPort {} lit up (bit {}{ehci}): {}{current}",
            hit.port, hit.bit, hit.device
        )?;
        Ok(())
    }

    fn print_remaining(&self, out: &mut impl Write) -> anyhow::Result<()> {
        let chipset = self.detected.chipset;
        let unnamed: Vec<String> = (0..chipset.high_speed_ports())
            .filter(|b| label_of(&self.labels, chipset, *b).is_none())
            .filter_map(|b| EhciPort::of_bit(chipset, b).map(|p| p.to_string()))
            .collect();
        if unnamed.is_empty() {
            writeln!(out, "Every port has a name; plug into one to rename it.")?;
        } else {
            writeln!(out, "Ports without a name yet: {}", unnamed.join(", "))?;
        }
        Ok(())
    }

    fn finish(&self, out: &mut impl Write) -> anyhow::Result<()> {
        writeln!(
            out,
            "\nStopped. {} port(s) have names; `usbroute ports` shows them.",
            self.labels.len()
        )?;
        Ok(())
    }
}

/// Ask until a valid label (`Some`) or Enter / end of input (`None`: skip this port).
fn ask_label(lines: &Receiver<String>, out: &mut impl Write) -> anyhow::Result<Option<String>> {
    loop {
        write!(out, "Name for this port (Enter to skip): ")?;
        out.flush()?;
        let Ok(line) = lines.recv() else {
            return Ok(None);
        };
        let label = line.trim();
        if label.is_empty() {
            return Ok(None);
        }
        if valid_label(label) {
            return Ok(Some(label.to_string()));
        }
        writeln!(
            out,
            "`{label}` will not do: letters, digits, spaces, - _ . (at most 64), and not like ehci1:2."
        )?;
    }
}

/// Stdin lines from a thread, so the wizard can poll the inventory while it waits.
fn stdin_lines() -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{Bus, Device, PciAddress, Speed};
    use crate::routing::chipset::chipset_for_xhci;
    use crate::routing::detect::EhciController;
    use std::sync::mpsc::Sender;

    fn pci(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    fn lynx() -> Detected {
        Detected {
            xhci: pci("0000:00:14.0"),
            chipset: chipset_for_xhci(0x8c31).unwrap(),
            ehci: vec![EhciController {
                pci: pci("0000:00:1d.0"),
                number: 1,
            }],
        }
    }

    fn stick(port: &str, address: u16) -> Device {
        let port: crate::inventory::PortPath = port.parse().unwrap();
        Device {
            address: Some(address),
            product: Some("Stick".into()),
            controller: Some(pci("0000:00:14.0")),
            ..Device::at(port)
        }
    }

    fn snapshot(devices: Vec<Device>) -> Snapshot {
        Snapshot {
            buses: vec![Bus {
                number: 3,
                controller: Some(pci("0000:00:14.0")),
                controller_name: None,
                speed_mbps: Some(Speed(480.0)),
                ports: None,
                version: None,
                twin: None,
                twin_ports: Vec::new(),
            }],
            devices: devices.into(),
            ..Snapshot::default()
        }
    }

    const REGS: Registers = Registers {
        xusb2pr: 0x3fff,
        xusb2prm: 0x3fff,
        usb3_pssen: 0x3f,
        usb3prm: 0x3f,
    };

    /// Scans that follow a script: each entry is a snapshot and what the "user" types
    /// once that snapshot has been seen (as a person types after the prompt).
    fn scripted(
        steps: Vec<(Snapshot, &'static [&'static str])>,
        typing: Sender<String>,
    ) -> impl FnMut() -> Snapshot {
        let mut steps = steps.into_iter();
        let mut last = Snapshot::default();
        move || {
            if let Some((snap, typed)) = steps.next() {
                for line in typed {
                    typing.send(line.to_string()).unwrap();
                }
                last = snap;
            }
            last.clone()
        }
    }

    fn run_wizard(
        config: &Path,
        labels: BTreeMap<String, String>,
        steps: Vec<(Snapshot, &'static [&'static str])>,
    ) -> String {
        let (tx, rx) = channel();
        let wizard = Wizard {
            detected: lynx(),
            config,
            labels,
            poll: Duration::from_millis(1),
        };
        let mut out = Vec::new();
        wizard
            .run(&REGS, &rx, scripted(steps, tx), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_plugged_device_is_announced_and_its_label_saved_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("usbroute.toml");
        std::fs::write(&config, "# mine\n[[vm]]\nname = \"win\"\n").unwrap();

        let out = run_wizard(
            &config,
            BTreeMap::new(),
            vec![
                (snapshot(vec![]), &[]),
                (snapshot(vec![stick("3-5", 4)]), &["front left"]),
                (snapshot(vec![]), &["q"]),
            ],
        );

        assert!(
            out.contains("Port ehci1:5 lit up (bit 4 on EHCI 0000:00:1d.0): 3-5 ????:???? Stick"),
            "{out}"
        );
        assert!(out.contains("Saved: \"front left\" = \"ehci1:5\""), "{out}");
        assert_eq!(
            std::fs::read_to_string(&config).unwrap(),
            "# mine\n[[vm]]\nname = \"win\"\n\n[routing.labels]\n\"front left\" = \"ehci1:5\"\n"
        );
    }

    #[test]
    fn a_second_run_resumes_with_the_ports_still_unnamed() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("usbroute.toml");
        let labels = BTreeMap::from([("front left".to_string(), "ehci1:5".to_string())]);

        let out = run_wizard(&config, labels, vec![(snapshot(vec![]), &["q"])]);

        assert!(
            out.contains("Ports without a name yet: ehci1:1, ehci1:2, ehci1:3, ehci1:4, ehci1:6,"),
            "{out}"
        );
        assert!(out.contains("Stopped. 1 port(s) have names"), "{out}");
    }

    #[test]
    fn a_bad_name_is_asked_again_and_enter_skips() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("usbroute.toml");

        let out = run_wizard(
            &config,
            BTreeMap::new(),
            vec![
                (snapshot(vec![]), &[]),
                (snapshot(vec![stick("3-2", 4)]), &["ehci1:9", ""]),
                (snapshot(vec![stick("3-2", 4)]), &["q"]),
            ],
        );

        assert!(out.contains("`ehci1:9` will not do"), "{out}");
        assert!(!config.exists());
    }
}
