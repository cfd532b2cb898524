//! `serve`, `status`, `why`, `reload`, and the daemon path of `attach --vm` / `detach`.

use super::output::print_json;
use super::Global;
use crate::backend::AttachMode;
use crate::daemon::protocol::{Reply, Request, StatusReport, VmDevice, VmStatus, WhyReport};
use crate::daemon::{self, DaemonOptions};
use crate::inventory::text::escaped_lines;
use anyhow::Context;
use std::path::PathBuf;
use std::process::ExitCode;

/// `usbroute serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Log what would be done, do nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Hear uevents as datagrams in the kernel's format on a Unix socket bound at PATH
    /// (senders of the daemon's own uid only) instead of the kernel's netlink socket:
    /// for benches and tests that run the daemon on a recorded host (`--sysfs-root`).
    #[arg(long, value_name = "PATH", hide = true)]
    pub uevent_socket: Option<PathBuf>,
}

/// `usbroute status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `usbroute why SELECTOR`.
#[derive(Debug, clap::Args)]
pub struct WhyArgs {
    /// Which device.
    pub selector: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `usbroute reload`.
#[derive(Debug, clap::Args)]
pub struct ReloadArgs {}

pub(super) fn serve(g: &Global, a: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = g.config_file()?;
    tracing::info!("{}", config.describe());
    let options = DaemonOptions {
        config: config.path().map(PathBuf::from),
        control: g.control.clone(),
        root: g.root(),
        dry_run: a.dry_run,
        drivers: crate::backend::drivers(g.root()),
        uevents: match a.uevent_socket {
            Some(path) => crate::events::UeventFeed::Socket(path),
            None => crate::events::UeventFeed::Kernel,
        },
    };
    // One thread: the daemon waits on sockets almost always, and its work per event is
    // small; worker threads cost their stacks and malloc arenas for the daemon's whole
    // life (blocking work, vfio binds, goes to `spawn_blocking` threads while it lasts).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(daemon::run(options))?;
    Ok(ExitCode::SUCCESS)
}

/// Send one request to the daemon (socket from `--control`, `--config`, or the default).
fn ask(g: &Global, request: &Request) -> anyhow::Result<Reply> {
    let socket = g.control_socket()?;
    Ok(daemon::request(&socket, request)?)
}

/// A `done` reply's message, or the daemon's error as this command's error.
fn done(reply: Reply) -> anyhow::Result<String> {
    match reply {
        // Messages name devices by what they claim to be: escaped like every human output.
        Reply::Done { message } => Ok(escaped_lines(&message)),
        Reply::Error { kind, message } => {
            anyhow::bail!("the daemon refused ({kind:?}): {}", escaped_lines(&message))
        }
        other => anyhow::bail!("unexpected reply from the daemon: {other:?}"),
    }
}

pub(super) fn status(g: &Global, a: StatusArgs) -> anyhow::Result<ExitCode> {
    let report = match ask(g, &Request::Status {})? {
        Reply::Status(r) => r,
        other => return done(other).map(|_| ExitCode::FAILURE),
    };
    if a.json {
        print_json(&report)?;
    } else {
        print!("{}", status_table(&report));
    }
    Ok(ExitCode::SUCCESS)
}

/// The routing line of `status`: the profile in force, and what is out of place.
fn routing_line(r: &crate::engine::routing::RoutingStatus) -> String {
    use crate::engine::routing::RoutingStep;
    let mut line = format!(
        "port routing on {}: profile {} (XUSB2PR 0x{:04x})",
        r.controller,
        r.profile.as_deref().unwrap_or("-"),
        r.xusb2pr
    );
    if let Some(intent) = r.intent.as_ref().filter(|i| r.profile.as_ref() != Some(*i)) {
        line.push_str(&format!(", held to {intent}"));
    }
    match &r.would {
        Some(RoutingStep::Restore(w)) => {
            line.push_str(&format!("; dry run: would put 0x{:04x} back", w.restored))
        }
        Some(RoutingStep::Power { .. }) => {
            line.push_str("; dry run: would set the xHCI's power/control")
        }
        Some(RoutingStep::Hold) | None => {}
    }
    if let Some(e) = &r.error {
        line.push_str(&format!("; FAILED: {e}"));
    }
    line + "\n"
}

/// The human form of `status`.
pub fn status_table(r: &StatusReport) -> String {
    let mut out = String::new();
    let config = r
        .config
        .as_deref()
        .unwrap_or("none (empty policy: everything stays on the host)");
    out.push_str(&format!(
        "config: {config}{}\n",
        if r.dry_run { "  [dry run]" } else { "" }
    ));
    if let Some(e) = &r.sysfs_error {
        out.push_str(&format!(
            "sysfs: {e}; showing the last good picture until a read succeeds\n"
        ));
    }
    for vm in &r.vms {
        let state = match (vm.up, vm.monitor_held) {
            (true, _) => "up",
            (false, true) => {
                "down, its monitor held by another client (the daemon waits its turn; the \
                 log says how to give usbroute a monitor of its own)"
            }
            (false, false) => "down",
        };
        out.push_str(&format!(
            "vm {}: {state} ({}), {} device(s) from usbroute\n",
            vm.name,
            vm.qmp,
            vm.devices.len()
        ));
    }
    for c in &r.controllers {
        let state = if c.ok { "" } else { "FAILED: " };
        out.push_str(&format!(
            "controller {} for vm {}: {state}{}\n",
            c.pci, c.vm, c.message
        ));
    }
    if let Some(routing) = &r.routing {
        out.push_str(&routing_line(routing));
    }
    out.push_str(&format!(
        "{:<12} {:<7} {:<36} {:<10} {:<10} WHY\n",
        "PORT", "ADDR", "DEVICE", "WHERE", "WANTED"
    ));
    for d in &r.devices {
        out.push_str(&format!(
            "{:<12} {:<7} {:<36} {:<10} {:<10} {}\n",
            d.port,
            d.address.as_deref().unwrap_or("-"),
            d.label,
            d.location,
            d.desired,
            d.reason
        ));
        if let Some(o) = &d.manual_override {
            out.push_str(&format!("{:>12} override: {o}\n", ""));
        }
        if let Some(p) = &d.pending {
            out.push_str(&format!(
                "{:>12} pending: {} (failed {} time(s)): {}\n",
                "", p.action, p.attempts, p.last_error
            ));
        }
    }
    escaped_lines(&out)
}

pub(super) fn why(g: &Global, a: WhyArgs) -> anyhow::Result<ExitCode> {
    let report = match ask(
        g,
        &Request::Why {
            selector: a.selector,
        },
    )? {
        Reply::Why(r) => r,
        other => return done(other).map(|_| ExitCode::FAILURE),
    };
    if a.json {
        print_json(&report)?;
    } else {
        print!("{}", why_text(&report));
    }
    Ok(ExitCode::SUCCESS)
}

/// The human form of `why`.
pub fn why_text(r: &WhyReport) -> String {
    let mut out = String::new();
    for d in &r.devices {
        let physical = d
            .physical_port
            .as_ref()
            .map_or(String::new(), |p| format!(" ({p})"));
        out.push_str(&format!(
            "{}{physical} {}: {} — {}\n",
            d.port, d.label, d.target, d.reason
        ));
        for v in &d.rules {
            let mark = match (v.decided, v.matched) {
                (true, _) => "=>",
                (false, true) => " +",
                (false, false) => " -",
            };
            out.push_str(&format!("  {mark} {}: {}\n", v.rule, v.detail));
        }
    }
    escaped_lines(&out)
}

pub(super) fn reload(g: &Global, _a: ReloadArgs) -> anyhow::Result<ExitCode> {
    println!("{}", done(ask(g, &Request::Reload {})?)?);
    Ok(ExitCode::SUCCESS)
}

/// `usbroute attach SELECTOR --vm NAME`: a manual override through the daemon. Returns
/// once the VM confirmed (or the daemon said why not). For `cli/vm.rs`.
pub fn attach_through_daemon(
    g: &Global,
    selector: &str,
    vm: &str,
    by: Option<AttachMode>,
) -> anyhow::Result<ExitCode> {
    let request = Request::Attach {
        selector: selector.to_string(),
        vm: vm.to_string(),
        by,
    };
    println!("{}", done(ask(g, &request)?)?);
    Ok(ExitCode::SUCCESS)
}

/// `usbroute detach SELECTOR` with a daemon: keep the device on the host until unplugged
/// or cleared. For `cli/vm.rs`.
pub fn detach_through_daemon(g: &Global, selector: &str) -> anyhow::Result<ExitCode> {
    let request = Request::Detach {
        selector: selector.to_string(),
    };
    println!("{}", done(ask(g, &request)?)?);
    Ok(ExitCode::SUCCESS)
}

/// Send an override request (`attach`, `detach`) for a `--qmp` command whose monitor the
/// daemon holds; its `done` message, escaped. For `cli/vm.rs`.
pub fn through_daemon(g: &Global, request: &Request) -> anyhow::Result<String> {
    done(ask(g, request)?)
}

/// Drop the manual override of the matching devices. For `cli/vm.rs` (`attach --clear`).
pub fn clear_through_daemon(g: &Global, selector: &str) -> anyhow::Result<ExitCode> {
    let request = Request::Clear {
        selector: selector.to_string(),
    };
    println!("{}", done(ask(g, &request)?)?);
    Ok(ExitCode::SUCCESS)
}

/// The VM name under which a running daemon manages the QMP socket `qmp`, if one does:
/// `--qmp` commands go through the daemon instead of fighting it (which would undo them).
pub fn daemon_managing(g: &Global, qmp: &std::path::Path) -> Option<String> {
    daemon_vm(g, qmp).map(|vm| vm.name)
}

/// The VM a running daemon manages at the QMP socket `qmp`, as its `status` shows it
/// (`up`: the daemon holds that monitor's one connection). `None` without a daemon.
pub fn daemon_vm(g: &Global, qmp: &std::path::Path) -> Option<VmStatus> {
    let socket = g.control_socket().ok()?;
    let Ok(Reply::Status(report)) = daemon::request(&socket, &Request::Status {}) else {
        return None;
    };
    let wanted = std::fs::canonicalize(qmp).unwrap_or_else(|_| qmp.to_path_buf());
    report.vms.into_iter().find(|vm| {
        let path = PathBuf::from(&vm.qmp);
        std::fs::canonicalize(&path).unwrap_or(path) == wanted
    })
}

/// VM `vm`'s usb-host devices, listed by the daemon over its own connection to the VM.
/// For `vm devices` (`cli/vm_devices.rs`).
pub fn vm_devices_through_daemon(g: &Global, vm: &str) -> anyhow::Result<Vec<VmDevice>> {
    let request = Request::VmDevices { vm: vm.to_string() };
    match ask(g, &request)? {
        Reply::VmDevices { devices, .. } => Ok(devices),
        other => done(other).and_then(|m| anyhow::bail!("unexpected reply from the daemon: {m}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::protocol::{DeviceStatus, RuleVerdict, WhyDevice};

    /// What a device can claim, as a daemon of any version may pass it on.
    const HOSTILE: &str = "0627:0001 Mouse\u{1b}[2J\u{7}\rEvil";

    fn controls(text: &str) -> Vec<char> {
        text.chars()
            .filter(|c| c.is_control() && *c != '\n')
            .collect()
    }

    #[test]
    fn status_table_shows_the_routing_and_what_a_dry_run_would_put_back() {
        use crate::engine::routing::{Restored, RoutingStatus, RoutingStep};
        let report = StatusReport {
            routing: Some(RoutingStatus {
                controller: "0000:00:14.0".into(),
                profile: Some("host".into()),
                xusb2pr: 0x3fff,
                intent: Some("guest".into()),
                would: Some(RoutingStep::Restore(Restored {
                    profile: "guest".into(),
                    found: 0x3fff,
                    restored: 0x3ffc,
                })),
                error: None,
            }),
            ..StatusReport::default()
        };

        let table = status_table(&report);

        assert!(
            table.contains("port routing on 0000:00:14.0: profile host (XUSB2PR 0x3fff), held to guest; dry run: would put 0x3ffc back\n"),
            "{table}"
        );
    }

    #[test]
    fn status_table_escapes_device_labels() {
        let report = StatusReport {
            devices: vec![DeviceStatus {
                port: "1-2".into(),
                address: None,
                label: HOSTILE.into(),
                location: "host".into(),
                desired: "host".into(),
                reason: "no rule".into(),
                manual_override: None,
                pending: None,
            }],
            ..StatusReport::default()
        };

        let table = status_table(&report);

        assert_eq!(controls(&table), Vec::<char>::new());
        assert!(table.contains("Mouse\\u{1b}[2J\\u{7}\\u{d}Evil"), "{table}");
    }

    #[test]
    fn why_text_escapes_labels_and_rule_details() {
        let report = WhyReport {
            devices: vec![WhyDevice {
                port: "1-2".into(),
                physical_port: None,
                label: HOSTILE.into(),
                target: "host".into(),
                reason: "no rule".into(),
                rules: vec![RuleVerdict {
                    rule: "rule 1".into(),
                    matched: false,
                    decided: false,
                    detail: "serial `\u{1b}]0;owned\u{7}` is not `A1`".into(),
                }],
                followed: None,
            }],
        };

        assert_eq!(controls(&why_text(&report)), Vec::<char>::new());
    }

    #[test]
    fn why_text_names_the_device_by_its_controller_anchored_place_too() {
        let report = WhyReport {
            devices: vec![WhyDevice {
                port: "1-2".into(),
                physical_port: Some("0000:00:14.0/2".into()),
                label: "0627:0001 Mouse".into(),
                target: "host".into(),
                reason: "no rule".into(),
                rules: vec![],
                followed: None,
            }],
        };

        assert_eq!(
            why_text(&report),
            "1-2 (0000:00:14.0/2) 0627:0001 Mouse: host — no rule\n"
        );
    }

    #[test]
    fn status_table_says_a_vm_down_because_another_client_holds_its_monitor() {
        let report = StatusReport {
            vms: vec![VmStatus {
                name: "win11".into(),
                qmp: "/run/qemu/win11.qmp".into(),
                up: false,
                monitor_held: true,
                devices: vec![],
            }],
            ..StatusReport::default()
        };

        let table = status_table(&report);

        assert!(
            table.starts_with("config: none (empty policy: everything stays on the host)\nvm win11: down, its monitor held by another client (the daemon waits its turn;"),
            "{table}"
        );
    }
}
