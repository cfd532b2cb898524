//! `ports ...` and `toggle`.
//!
//! The config comes from the one loader, [`Config::load`]; only `ports map` writes to
//! the file, and then only `[routing.labels]`, in place.

mod map;

use super::output::print_json;
use super::Global;
use crate::config::check_routing_config;
use crate::config::Config;
use crate::inventory::PciAddress;
use crate::routing::chipset::chipset_for_xhci;
use crate::routing::config_space::ConfigSpace;
use crate::routing::config_space::SysfsConfigSpace;
use crate::routing::control::ProfileRouter;
use crate::routing::detect::{xhci_functions, PciIdentity, Registers};
use crate::routing::ports::{rows, PortRow};
use crate::routing::profile::{Plan, Route};
use crate::routing::router::{Applied, PowerChange};
use crate::toggle::protocol::Reply;
use anyhow::Context;
use serde::Serialize;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// `usbroute ports`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PortsArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// What to do; without one, list the ports.
    #[command(subcommand)]
    pub command: Option<PortsCommand>,
}

/// `usbroute ports SUBCOMMAND`.
#[derive(Debug, clap::Subcommand)]
pub enum PortsCommand {
    /// Label the physical ports: plug a device into each in turn, name what lights up.
    Map,
    /// Show what a profile does: its mask and which ports move.
    Show {
        /// Profile name.
        profile: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Apply a profile.
    Apply {
        /// Profile name.
        profile: String,
        /// Also switch ports the firmware's XUSB2PRM does not allow.
        #[arg(long)]
        force: bool,
    },
    /// Flip between two profiles (default: `toggle` in [routing]).
    Toggle {
        /// The first profile (with B: flip between A and B).
        #[arg(requires = "b")]
        a: Option<String>,
        /// The second profile.
        b: Option<String>,
        /// Also switch ports the firmware's XUSB2PRM does not allow.
        #[arg(long)]
        force: bool,
    },
    /// Put the active profile back if the kernel rewrote the register (after resume).
    Check,
    /// Read the routing registers of xHCIs, even unknown ones (read-only; for bug reports).
    Registers {
        /// The xHCI (default: every xHCI).
        pci: Option<PciAddress>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `usbroute toggle [PROFILE]`.
#[derive(Debug, clap::Args)]
pub struct ToggleArgs {
    /// Profile to apply; without it, flip between the two `toggle` profiles.
    pub profile: Option<String>,
    /// Talk to this TCP toggle listener only (with `auth` and the [toggle] secret).
    /// Without it: the daemon's control socket, else the TCP listener when [toggle] has
    /// `listen`.
    #[arg(long, value_name = "IP:PORT")]
    pub address: Option<String>,
}

/// The config, or the empty one when there is no `--config` and no default file.
/// Problems in [routing] / [toggle] that the loader leaves to their owners fail here too.
fn read_view(g: &Global) -> anyhow::Result<Config> {
    let file = g.config_file()?;
    let path = file.path_to_write();
    let config = match file.path() {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let problems = check_routing_config(&config);
    anyhow::ensure!(
        problems.is_empty(),
        "{}: {}",
        path.display(),
        problems.join("; ")
    );
    Ok(config)
}

/// The same router `usbroute serve` opens ([`ProfileRouter::open`]).
fn open_router(g: &Global, view: &Config) -> anyhow::Result<ProfileRouter<SysfsConfigSpace>> {
    Ok(ProfileRouter::open(&g.root(), &view.routing)?)
}

pub(super) fn ports(g: &Global, a: PortsArgs) -> anyhow::Result<ExitCode> {
    let view = read_view(g)?;
    match a.command {
        None => list(g, &view, a.json),
        Some(PortsCommand::Map) => map::run(g, g.config_file()?.path_to_write(), &view.routing),
        Some(PortsCommand::Show { profile, json }) => show(g, &view, &profile, json),
        Some(PortsCommand::Apply { profile, force }) => {
            let mut router = open_router(g, &view)?;
            apply(&mut router, &profile, force)
        }
        Some(PortsCommand::Toggle { a, b, force }) => {
            let mut router = open_router(g, &view)?;
            let pair = a.as_deref().zip(b.as_deref());
            let target = router.toggle_target(pair)?;
            apply(&mut router, &target, force)
        }
        Some(PortsCommand::Registers { pci, json }) => registers(g, pci, json),
        Some(PortsCommand::Check) => {
            let mut router = open_router(g, &view)?;
            match router.reconcile()? {
                None => println!("routing is as usbroute left it (or usbroute never changed it)"),
                Some(r) => println!(
                    "the register held 0x{:04x}; put profile `{}` (0x{:04x}) back",
                    r.found, r.profile, r.restored
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[derive(Serialize)]
struct PortsJson<'a> {
    controller: String,
    chipset: &'static str,
    registers: Registers,
    active_profile: Option<String>,
    ports: &'a [PortRow],
}

fn list(g: &Global, view: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let router = open_router(g, view)?;
    let regs = router.router().registers()?;
    let snapshot = crate::inventory::scan(&g.root());
    let detected = router.router().detected();
    let table = rows(detected, &regs, &view.routing.labels, &snapshot);
    let active = router.active_profile()?;
    if json {
        print_json(&PortsJson {
            controller: detected.xhci.to_string(),
            chipset: detected.chipset.name,
            registers: regs,
            active_profile: active,
            ports: &table,
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} at {}: XUSB2PR 0x{:04x} (firmware allows 0x{:04x}), USB3_PSSEN 0x{:02x}, profile {}",
        detected.chipset,
        detected.xhci,
        regs.xusb2pr,
        regs.xusb2prm,
        regs.usb3_pssen,
        active.as_deref().unwrap_or("(none matches)")
    );
    println!(
        "{:<8} {:<12} {:>3}  {:<6} {:<10} {:<3}  {:<14} DEVICES",
        "PORT", "EHCI", "BIT", "ROUTED", "SWITCHABLE", "SS", "LABEL"
    );
    for r in &table {
        let ss = match r.superspeed {
            Some(true) => "on",
            Some(false) => "off",
            None => "-",
        };
        println!(
            "{:<8} {:<12} {:>3}  {:<6} {:<10} {:<3}  {:<14} {}",
            r.port.to_string(),
            r.ehci_pci
                .map(|p| p.to_string())
                .unwrap_or_else(|| "absent".into()),
            r.bit,
            r.routed_to.to_string(),
            if r.switchable { "yes" } else { "no" },
            ss,
            r.label.as_deref().unwrap_or("-"),
            r.devices.join("; ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct RegistersJson {
    pci: PciAddress,
    vendor: String,
    device: String,
    chipset: Option<&'static str>,
    registers: Registers,
}

fn registers(g: &Global, only: Option<PciAddress>, json: bool) -> anyhow::Result<ExitCode> {
    let root = g.root();
    let found: Vec<_> = match only {
        Some(pci) => {
            let space = SysfsConfigSpace::new(&root, pci);
            let id = PciIdentity::read(&space)
                .with_context(|| format!("Cannot read {}", space.path().display()))?;
            anyhow::ensure!(
                id.class == 0x0c0330,
                "{pci} is not an xHCI (class {:06x}); the routing registers live in the xHCI",
                id.class
            );
            vec![(pci, id)]
        }
        None => xhci_functions(&root)?,
    };
    anyhow::ensure!(
        !found.is_empty(),
        "There is no xHCI (PCI class 0c0330) here"
    );
    let mut out = Vec::new();
    for (pci, id) in found {
        let space = SysfsConfigSpace::new(&root, pci);
        let regs = Registers::read(&space as &dyn ConfigSpace, space.path())?;
        let chipset = (id.vendor == 0x8086)
            .then(|| chipset_for_xhci(id.device))
            .flatten()
            .map(|c| c.name);
        out.push(RegistersJson {
            pci,
            vendor: format!("{:04x}", id.vendor),
            device: format!("{:04x}", id.device),
            chipset,
            registers: regs,
        });
    }
    if json {
        print_json(&out)?;
        return Ok(ExitCode::SUCCESS);
    }
    for r in &out {
        println!(
            "{} {}:{} ({}): XUSB2PR 0x{:04x} XUSB2PRM 0x{:04x} USB3_PSSEN 0x{:08x} USB3PRM 0x{:08x}",
            r.pci,
            r.vendor,
            r.device,
            r.chipset.unwrap_or("no switchable ports known"),
            r.registers.xusb2pr,
            r.registers.xusb2prm,
            r.registers.usb3_pssen,
            r.registers.usb3prm
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn show(g: &Global, view: &Config, profile: &str, json: bool) -> anyhow::Result<ExitCode> {
    let router = open_router(g, view)?;
    let plan = router.plan(profile)?;
    if json {
        print_json(&plan)?;
        return Ok(ExitCode::SUCCESS);
    }
    let regs = router.router().registers()?;
    print_plan(&plan, &regs);
    Ok(ExitCode::SUCCESS)
}

fn print_plan(plan: &Plan, regs: &Registers) {
    println!(
        "profile {}: XUSB2PR 0x{:04x} -> 0x{:04x}, USB3_PSSEN 0x{:02x} -> 0x{:02x}",
        plan.profile, regs.xusb2pr, plan.xusb2pr, regs.usb3_pssen, plan.usb3_pssen
    );
    if plan.moves.is_empty() {
        println!("  no port moves: this routing is already in force");
    }
    for m in &plan.moves {
        let label = m
            .label
            .as_deref()
            .map(|l| format!(" \"{l}\""))
            .unwrap_or_default();
        let from = match m.to {
            Route::Xhci => "ehci",
            Route::Ehci => "xhci",
        };
        println!("  {}{label} (bit {}): {from} -> {}", m.port, m.bit, m.to);
    }
    for w in &plan.warnings {
        println!("  warning: {w}");
    }
}

fn apply(
    router: &mut ProfileRouter<SysfsConfigSpace>,
    profile: &str,
    force: bool,
) -> anyhow::Result<ExitCode> {
    let (plan, applied) = router.apply(profile, force)?;
    for w in &plan.warnings {
        eprintln!("usbroute: warning: {w}");
    }
    report_applied(&plan, &applied);
    Ok(ExitCode::SUCCESS)
}

fn report_applied(plan: &Plan, applied: &Applied) {
    println!(
        "{}: XUSB2PR 0x{:04x} -> 0x{:04x}, {} port(s) moved",
        plan.profile,
        applied.before.xusb2pr,
        applied.after.xusb2pr,
        plan.moves.len()
    );
    match applied.power {
        PowerChange::PinnedOn => println!(
            "the xHCI's runtime PM is pinned `on` while this routing is in force (the kernel resets the routing when the xHCI resumes)"
        ),
        PowerChange::Restored => println!("the xHCI's runtime PM setting is restored"),
        PowerChange::Unchanged => {}
    }
}

pub(super) fn toggle(g: &Global, a: ToggleArgs) -> anyhow::Result<ExitCode> {
    let view = read_view(g)?;
    let command = a.profile.unwrap_or_else(|| "toggle".to_string());
    let socket = g
        .control
        .clone()
        .unwrap_or_else(|| view.control_socket.clone());
    let from_socket = match &a.address {
        Some(_) => Err("--address given".to_string()),
        None => ask_control_socket(&socket, &command)?,
    };
    let tcp = a.address.or(view.toggle.listen.clone());
    let (address, reply) = match (from_socket, tcp) {
        (Ok(reply), _) => (socket.display().to_string(), reply),
        (Err(_), Some(address)) => {
            let reply = ask_service(&address, view.toggle.secret.as_deref(), &command)?;
            (address, reply)
        }
        (Err(why), None) => anyhow::bail!(
            "Cannot reach the daemon through its control socket {} ({why}): start `usbroute serve` with routing profiles, and run this as root or as a member of its control_group; or configure a TCP listener (`listen` and `secret` in [toggle])",
            socket.display()
        ),
    };
    match reply {
        Reply::Ok { profile, mask } => {
            println!(
                "{} (XUSB2PR 0x{mask:04x})",
                profile.as_deref().unwrap_or("-")
            );
            Ok(ExitCode::SUCCESS)
        }
        Reply::Err(reason) => {
            anyhow::bail!("The toggle service at {address} refused `{command}`: {reason}")
        }
        Reply::Authenticated => {
            anyhow::bail!("The toggle service at {address} answered out of turn")
        }
    }
}

/// The toggle line through the daemon's control socket; `Err(why)` inside when no daemon
/// listens there or it does not let this user in (a TCP listener may be tried next).
fn ask_control_socket(socket: &Path, command: &str) -> anyhow::Result<Result<Reply, String>> {
    use crate::daemon::{ClientError, ErrorKind, Reply as ControlReply, Request};
    let request = Request::Routing {
        line: command.to_string(),
    };
    match crate::daemon::request(socket, &request) {
        Err(ClientError::Connect { source, .. }) => {
            tracing::info!(socket = %socket.display(), "control socket not reachable ({source})");
            Ok(Err(format!("not reachable: {source}")))
        }
        Ok(ControlReply::Error {
            kind: ErrorKind::PermissionDenied,
            message,
        }) => {
            tracing::info!(socket = %socket.display(), "control socket refused this user ({message})");
            Ok(Err(message))
        }
        Ok(ControlReply::Routing { line }) => Reply::parse(&line)
            .map(Ok)
            .with_context(|| format!("The daemon at {} replied `{line}`", socket.display())),
        Ok(ControlReply::Error { message, .. }) => {
            anyhow::bail!("The daemon at {} refused `{command}`: {message}", socket.display())
        }
        Ok(other) => anyhow::bail!(
            "The daemon at {} answered `{command}` with {other:?}; are the daemon and CLI the same version?",
            socket.display()
        ),
        Err(e) => Err(e.into()),
    }
}

/// One request to the toggle service's TCP listener; `auth` first when a secret is
/// configured (the listener wants it on every address).
fn ask_service(address: &str, secret: Option<&str>, command: &str) -> anyhow::Result<Reply> {
    let addr: SocketAddr = address
        .parse()
        .with_context(|| format!("`{address}` is not IP:PORT"))?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).with_context(|| {
        format!("Cannot reach the toggle service at {addr}: is `usbroute serve` running with routing profiles and this `listen` in [toggle]? (`usbroute ports toggle` switches without the daemon)")
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut exchange = |line: &str| -> anyhow::Result<Reply> {
        writer.write_all(format!("{line}\n").as_bytes())?;
        let mut reply = String::new();
        reader
            .read_line(&mut reply)
            .with_context(|| format!("No reply from the toggle service at {addr}"))?;
        Reply::parse(&reply).with_context(|| {
            format!(
                "The toggle service at {addr} replied `{}`",
                reply.trim_end()
            )
        })
    };
    if let Some(secret) = secret {
        if let Reply::Err(e) = exchange(&format!("auth {secret}"))? {
            anyhow::bail!("The toggle service at {addr} refused the secret: {e}");
        }
    }
    exchange(command)
}

/// The config file, for messages.
fn shown(path: &Path) -> String {
    path.display().to_string()
}
