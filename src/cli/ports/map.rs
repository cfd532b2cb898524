//! `usbroute ports map`: the labelling wizard.
//!
//! Rescans the inventory every 250 ms (cheap, and robust against missed uevents); a
//! device that was not there before lights its port up. Each label is written to the
//! config file the moment it is typed, so Ctrl-C loses nothing and running the wizard
//! again carries on with the ports still unnamed.

use super::{shown, Global};
use crate::inventory::scan;
use crate::routing::detect::{detect, Detected};
use crate::routing::labels::{arrivals, valid_label, write_label};
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
    let mut labels = routing.labels.clone();
    let chipset = detected.chipset;
    println!("Port map for {chipset} at {}.", detected.xhci);
    println!(
        "Plug a device (a flash drive is easiest) into each physical port in turn. usbroute shows\n\
         which port lit up and asks for a name such as `front left`. Names are saved to {} at once:\n\
         stop any time with `q` or Ctrl-C and run `usbroute ports map` again to carry on.",
        shown(config)
    );
    let on_ehci = (0..chipset.high_speed_ports())
        .filter(|b| Route::of_bit(regs.xusb2pr, *b) == Route::Ehci)
        .count();
    println!(
        "Routing now: {on_ehci} port(s) on EHCI, the rest on xHCI; either works, the port is found by its bit."
    );
    let lines = stdin_lines();
    let mut before = scan(&root);
    loop {
        print_remaining(&detected, &labels);
        println!("Waiting for a device to be plugged in (q + Enter to stop)...");
        let hit = loop {
            match lines.recv_timeout(POLL) {
                Ok(line) if line.trim().eq_ignore_ascii_case("q") => return Ok(finish(&labels)),
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(finish(&labels)),
                Err(RecvTimeoutError::Timeout) => {}
            }
            let after = scan(&root);
            let hits = arrivals(&before, &after, &detected);
            before = after;
            if let Some(hit) = hits.into_iter().next() {
                break hit;
            }
        };
        let current = label_of(&labels, chipset, hit.bit);
        let ehci = detected
            .ehci_pci(hit.port.ehci)
            .map(|p| format!(" on EHCI {p}"))
            .unwrap_or_default();
        println!(
            "\nPort {} lit up (bit {}{ehci}): {}{}",
            hit.port,
            hit.bit,
            hit.device,
            current
                .as_deref()
                .map(|c| format!(" — now labelled \"{c}\""))
                .unwrap_or_default()
        );
        if let Some(label) = ask_label(&lines)? {
            write_label(config, &label, hit.port)
                .with_context(|| format!("Cannot save the label for {}", hit.port))?;
            labels.retain(|_, spec| EhciPort::parse(spec) != Some(hit.port));
            labels.insert(label.clone(), hit.port.to_string());
            println!(
                "Saved: \"{label}\" = \"{}\". Unplug it and try the next port.",
                hit.port
            );
        }
    }
}

/// Ask until a valid label, Enter (skip) or `q`/EOF (stop: `Err` would lose nothing,
/// but stopping is not an error).
fn ask_label(lines: &Receiver<String>) -> anyhow::Result<Option<String>> {
    loop {
        print!("Name for this port (Enter to skip): ");
        std::io::stdout().flush()?;
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
        println!("`{label}` will not do: letters, digits, spaces, - _ . (at most 64), and not like ehci1:2.");
    }
}

fn print_remaining(detected: &Detected, labels: &BTreeMap<String, String>) {
    let chipset = detected.chipset;
    let unnamed: Vec<String> = (0..chipset.high_speed_ports())
        .filter(|b| label_of(labels, chipset, *b).is_none())
        .filter_map(|b| EhciPort::of_bit(chipset, b).map(|p| p.to_string()))
        .collect();
    if unnamed.is_empty() {
        println!("Every port has a name; plug into one to rename it.");
    } else {
        println!("Ports without a name yet: {}", unnamed.join(", "));
    }
}

fn finish(labels: &BTreeMap<String, String>) -> ExitCode {
    println!(
        "\nStopped. {} port(s) have names; `usbroute ports` shows them.",
        labels.len()
    );
    ExitCode::SUCCESS
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
