//! `list`, `show`, `controllers`, `record-sysfs`.
//!
//! Warnings about unreadable attributes go to stderr, one line each, in every mode:
//! stdout carries only the tree or the JSON, so `--json` output always parses.

use super::output::print_json;
use super::Global;
use crate::inventory::{self, render, Snapshot};
use crate::selector::Selector;
use crate::sysfs::SysfsRoot;
use anyhow::Context;
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit code of `show` when the selector does not parse (1 is "nothing matched").
const EXIT_BAD_SELECTOR: u8 = 2;

/// `usbroute list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Print `{"controllers": [...], "buses": [...], "devices": [...]}` instead of a tree.
    #[arg(long)]
    pub json: bool,
}

/// `usbroute show SELECTOR`.
#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// Which devices: port:1-3.4.2, port:0000:00:14.0/3.4.2, id:046d:c016, addr:3.5, serial:ABC, class:03,
    /// iface:03:01:*, controller:0000:00:14.0, hub:1-3, hub:0000:00:14.0/3 (`,` for AND).
    pub selector: String,
    /// Print a JSON array of device objects.
    #[arg(long)]
    pub json: bool,
}

/// `usbroute controllers`.
#[derive(Debug, clap::Args)]
pub struct ControllersArgs {
    /// Print a JSON array of controller objects, each with its `verdict`.
    #[arg(long)]
    pub json: bool,
}

/// `usbroute record-sysfs DIR`.
#[derive(Debug, clap::Args)]
pub struct RecordArgs {
    /// Where to write the recording (created; must be empty if it exists).
    pub dir: PathBuf,
}

pub(super) fn list(g: &Global, a: ListArgs) -> anyhow::Result<ExitCode> {
    let (root, snapshot) = scan(g)?;
    if a.json {
        print_json(&render::Listing::from(&snapshot))?;
    } else if render::is_empty(&snapshot) {
        println!("{}", no_usb_message(&root));
    } else {
        print!("{}", render::tree(&snapshot));
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn show(g: &Global, a: ShowArgs) -> anyhow::Result<ExitCode> {
    let selector: Selector = match a.selector.parse() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("usbroute: {e}");
            return Ok(ExitCode::from(EXIT_BAD_SELECTOR));
        }
    };
    let (_, snapshot) = scan(g)?;
    let matched: Vec<_> = snapshot
        .devices
        .iter()
        .filter(|d| selector.matches(d))
        .collect();
    if a.json {
        print_json(&matched)?;
    } else {
        let blocks: Vec<String> = matched
            .iter()
            .map(|d| render::device_details(d, &snapshot))
            .collect();
        print!("{}", blocks.join("\n"));
    }
    if matched.is_empty() {
        eprintln!(
            "usbroute: no device matches `{}` ({} devices present; `usbroute list` shows them)",
            a.selector,
            snapshot.devices.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn controllers(g: &Global, a: ControllersArgs) -> anyhow::Result<ExitCode> {
    let (root, snapshot) = scan(g)?;
    // One verdict per controller: JSON shows it twice shaped, text as a block and a line.
    let entries = crate::vfio::controller_entries(&root, &snapshot);
    if a.json {
        print_json(&entries)?;
    } else if snapshot.controllers.is_empty() {
        println!(
            "No USB host controllers on PCI under {}.",
            root.path("/sys/bus/pci/devices").display()
        );
    } else {
        let verdicts = entries.iter().map(|e| (e.controller, &e.verdict));
        print!("{}", render::controllers_text(verdicts));
        print!("{}", crate::vfio::passthrough_text(&entries));
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn record(g: &Global, a: RecordArgs) -> anyhow::Result<ExitCode> {
    let root = existing_root(g)?;
    let summary = inventory::record::record(&root, &a.dir).with_context(|| {
        format!(
            "recording {} into {}",
            root.dir().display(),
            a.dir.display()
        )
    })?;
    for line in &summary.skipped {
        eprintln!("usbroute: warning: not recorded (unreadable): {line}");
    }
    println!(
        "Recorded {} attributes and {} links from {} (kernel {}) into {}.\nReplay: usbroute --sysfs-root {} list",
        summary.files,
        summary.links,
        root.dir().display(),
        summary.kernel.as_deref().unwrap_or("unknown"),
        a.dir.display(),
        a.dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Scan under the global root, printing the snapshot's warnings to stderr. A scan that
/// could not read the picture as a whole fails: showing it would say "no USB" when the
/// truth is "could not look".
fn scan(g: &Global) -> anyhow::Result<(SysfsRoot, Snapshot)> {
    let root = existing_root(g)?;
    let snapshot = inventory::try_scan(&root)?;
    for w in &snapshot.warnings {
        eprintln!("usbroute: warning: {w}");
    }
    Ok((root, snapshot))
}

/// The root, refused if it is not a directory (a typo would otherwise read as "no USB").
fn existing_root(g: &Global) -> anyhow::Result<SysfsRoot> {
    let root = g.root();
    anyhow::ensure!(
        root.dir().is_dir(),
        "--sysfs-root {}: no such directory (give the directory `record-sysfs` wrote)",
        root.dir().display()
    );
    Ok(root)
}

fn no_usb_message(root: &SysfsRoot) -> String {
    format!(
        "No USB: no USB host controller on PCI and no USB bus under {}.",
        root.path("/sys/bus/usb/devices").display()
    )
}
