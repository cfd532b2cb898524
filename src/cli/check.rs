//! `usbroute check`: validate the config file like `nginx -t`, and print what it means:
//! the rules in the order they win, the VMs, the controller rules, the routing profiles,
//! and warnings. Exit 0 when valid (warnings allowed), 1 with every error at
//! `file:line:column` when not. The validation is [`Config::load`]'s, nothing more; the
//! warnings only point at consequences of rules that are valid.

use super::output::print_json;
use super::{ConfigFile, Global};
use crate::backend::{AttachMode, Drivers, VmTarget};
use crate::config::{Config, ConfigError, Problem, VmConfig};
use crate::inventory::Snapshot;
use crate::policy::{Rule, RuleAction};
use crate::routing::RoutingConfig;
use crate::selector::Term;
use serde::Serialize;
use std::process::ExitCode;

/// `usbroute check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// What `check` found (the `--json` shape).
#[derive(Debug, Serialize)]
struct Report {
    /// The file checked; `null` when there is none (the empty policy).
    file: Option<String>,
    /// No errors.
    valid: bool,
    /// Each error at its place (only when not valid).
    errors: Vec<ErrorAt>,
    /// Valid but worth a look.
    warnings: Vec<String>,
    vms: Vec<VmLine>,
    /// In the order they win: forbid rules, then pass rules by priority, then file order.
    rules: Vec<RuleLine>,
    controllers: Vec<ControllerLine>,
    routing: RoutingConfig,
}

#[derive(Debug, Serialize)]
struct ErrorAt {
    file: String,
    line: usize,
    column: usize,
    message: String,
}

#[derive(Debug, Serialize)]
struct VmLine {
    name: String,
    /// `qemu`, `xen` or `libvirt`: the `[[vm]]` key that names it.
    backend: &'static str,
    /// The QMP socket of a QEMU VM.
    qmp: Option<String>,
    /// The domain of a Xen or libvirt VM.
    domain: Option<String>,
    /// The libvirt connection, when given.
    uri: Option<String>,
    serial: Option<String>,
    profiles: Vec<String>,
}

impl VmLine {
    fn new(vm: &VmConfig) -> Self {
        let (domain, uri) = match &vm.target {
            VmTarget::Qemu { .. } => (None, None),
            VmTarget::Xen { domain } => (Some(domain.clone()), None),
            VmTarget::Libvirt { domain, uri } => (Some(domain.clone()), uri.clone()),
        };
        VmLine {
            name: vm.name.clone(),
            backend: vm.target.kind(),
            qmp: vm.qmp().map(|p| p.display().to_string()),
            domain,
            uri,
            serial: vm.serial.clone(),
            profiles: vm.profiles.clone(),
        }
    }

    /// `win11 (qmp /run/qemu/win11.qmp)`, `dom1 (xen domain dom1)`.
    fn describe(&self) -> String {
        let target = match (&self.qmp, &self.domain, &self.uri) {
            (Some(qmp), _, _) => format!("qmp {qmp}"),
            (None, Some(domain), Some(uri)) => format!("{} domain {domain} at {uri}", self.backend),
            (None, Some(domain), None) => format!("{} domain {domain}", self.backend),
            (None, None, _) => self.backend.to_string(),
        };
        format!("{} ({target})", self.name)
    }
}

#[derive(Debug, Serialize)]
struct RuleLine {
    /// `file:line`.
    at: String,
    /// The line alone.
    line: usize,
    /// Its number among the `[[rule]]`s of the file, from 1.
    rule: usize,
    #[serde(rename = "match")]
    selector: String,
    /// `forbid` or `pass`.
    action: &'static str,
    vm: Option<String>,
    by: Option<crate::backend::AttachMode>,
    priority: i64,
    force: bool,
    /// The `follow` window (`10s`), only on a rule that has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    follow: Option<String>,
}

#[derive(Debug, Serialize)]
struct ControllerLine {
    pci: String,
    vm: String,
}

pub(super) fn check(g: &Global, a: CheckArgs) -> anyhow::Result<ExitCode> {
    let file = g.config_file()?;
    let report = match file.path() {
        None => valid_report(&file, &Config::default(), &Snapshot::default()),
        Some(path) => match Config::load(path) {
            // The host's inventory only turns bus-numbered ports into their stable form.
            Ok(config) => valid_report(&file, &config, &crate::inventory::scan(&g.root())),
            Err(ConfigError::Invalid { problems }) => invalid_report(&file, problems),
            Err(e) => return Err(e.into()),
        },
    };
    if a.json {
        print_json(&report)?;
    } else if report.valid {
        print!("{}", text(&file, &report));
    } else {
        for e in &report.errors {
            eprintln!("{}:{}:{}: {}", e.file, e.line, e.column, e.message);
        }
        let n = report.errors.len();
        let s = if n == 1 { "" } else { "s" };
        eprintln!("{n} error{s}: the config is not valid");
    }
    Ok(if report.valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn invalid_report(file: &ConfigFile, problems: Vec<Problem>) -> Report {
    Report {
        file: file.path().map(|p| p.display().to_string()),
        valid: false,
        errors: problems
            .into_iter()
            .map(|p| ErrorAt {
                file: p.file,
                line: p.line,
                column: p.column,
                message: p.message,
            })
            .collect(),
        warnings: vec![],
        vms: vec![],
        rules: vec![],
        controllers: vec![],
        routing: RoutingConfig::default(),
    }
}

fn valid_report(file: &ConfigFile, config: &Config, host: &Snapshot) -> Report {
    let name = file.path().map(|p| p.display().to_string());
    let at = |line: usize| format!("{}:{line}", name.as_deref().unwrap_or("<config>"));
    let ordered = precedence(&config.rules);
    let drivers = crate::backend::drivers(crate::sysfs::SysfsRoot::default());
    let mut warnings = warnings(config, &ordered, &at);
    warnings.extend(backend_warnings(config, &drivers, &at));
    warnings.extend(bus_numbered_warnings(config, host, &at));
    warnings.extend(usb3_side_warnings(config, host, &at));
    Report {
        warnings,
        rules: ordered.iter().map(|r| rule_line(r, at(r.line))).collect(),
        vms: config.vms.iter().map(VmLine::new).collect(),
        controllers: config
            .controllers
            .iter()
            .map(|c| ControllerLine {
                pci: c.pci.to_string(),
                vm: c.vm.clone(),
            })
            .collect(),
        routing: config.routing.clone(),
        file: name,
        valid: true,
        errors: vec![],
    }
}

/// The rules in the order the plan lets them win ([`Rule::rank`]): every forbid rule
/// first, then pass rules by `priority` (highest first), equal priorities in file order.
fn precedence(rules: &[Rule]) -> Vec<&Rule> {
    let mut ordered: Vec<&Rule> = rules.iter().collect();
    ordered.sort_by_key(|r| r.rank());
    ordered
}

/// Consequences of a valid config that may not be meant: a VM whose backend this build
/// lacks, a VM nothing is given to, a pass rule that a forbid rule can override for some
/// device both match, and two pass rules for different VMs that can match one device
/// (each at the losing rule's line, naming the winner and why it wins).
fn warnings(config: &Config, ordered: &[&Rule], at: &dyn Fn(usize) -> String) -> Vec<String> {
    let mut out: Vec<String> = config
        .vms
        .iter()
        .filter_map(VmConfig::without_backend)
        .collect();
    for vm in &config.vms {
        let used = config
            .rules
            .iter()
            .any(|r| r.action.vm() == Some(vm.name.as_str()))
            || config.controllers.iter().any(|c| c.vm == vm.name);
        if !used {
            out.push(format!(
                "VM `{}` has no rule and no [[controller]]: usbroute gives it nothing (manual `usbroute attach --vm {}` still works)",
                vm.name, vm.name
            ));
        }
    }
    for (i, later) in ordered.iter().enumerate() {
        if later.action.vm().is_none() {
            continue;
        }
        let winner = ordered[..i].iter().find(|e| {
            e.action == RuleAction::Forbid && !e.selector.provably_disjoint(&later.selector)
        });
        if let Some(winner) = winner {
            out.push(format!(
                "{}: this rule ({}) can match devices that the rule at {} ({}) takes first; for those it does nothing",
                at(later.line),
                later.describe_target(),
                at(winner.line),
                winner.describe_target()
            ));
        }
    }
    out.extend(
        crate::policy::overlaps(&config.rules)
            .into_iter()
            .map(|o| format!("{}: {o}", at(o.loser.line))),
    );
    out
}

/// Rules a VM's backend cannot carry out: a pass rule asking for a mode the backend
/// lacks (the plan keeps those devices on the host). A VM whose kind has no driver in
/// this build is warned about by [`warnings`].
fn backend_warnings(
    config: &Config,
    drivers: &Drivers,
    at: &dyn Fn(usize) -> String,
) -> Vec<String> {
    let mut out = Vec::new();
    for vm in &config.vms {
        let Some(caps) = drivers.for_target(&vm.target).map(|d| d.capabilities()) else {
            continue;
        };
        for rule in &config.rules {
            let RuleAction::Pass { vm: to, mode } = &rule.action else {
                continue;
            };
            let followed = caps.follows_by_address && caps.supports(AttachMode::Address);
            if *to == vm.name && !caps.supports(*mode) && !followed {
                let instead: Vec<String> = caps
                    .modes
                    .iter()
                    .map(|m| format!("`by = \"{}\"`", m.name()))
                    .collect();
                out.push(format!(
                    "{}: VM `{}`'s backend ({}) cannot attach by {}, so this rule keeps its devices on the host; use {}",
                    at(rule.line),
                    vm.name,
                    caps.backend,
                    mode.name(),
                    instead.join(" or ")
                ));
            }
        }
    }
    out
}

/// One warning per selector term `warn` has something to say about, at its rule's line.
fn term_warnings(
    config: &Config,
    at: &dyn Fn(usize) -> String,
    warn: impl Fn(&Term) -> Option<String>,
) -> Vec<String> {
    config
        .rules
        .iter()
        .flat_map(|rule| {
            let warn = &warn;
            rule.selector
                .terms
                .iter()
                .filter_map(move |term| warn(term).map(|w| format!("{}: {w}", at(rule.line))))
        })
        .collect()
}

/// Rules that name a port or a hub by its bus number (`port:1-3`, `hub:1-3`): the kernel
/// numbers buses in probe order, so the number can change at the next boot or kernel
/// update and the rule then means another socket. Each gets the stable form when this
/// host has that bus.
fn bus_numbered_warnings(
    config: &Config,
    host: &Snapshot,
    at: &dyn Fn(usize) -> String,
) -> Vec<String> {
    term_warnings(config, at, |term| {
        let (kind, port) = match term {
            Term::Port(port) => ("port", port),
            Term::Hub(port) => ("hub", port),
            _ => return None,
        };
        let instead = match host.physical_port_of(port) {
            Some(stable) => format!("write `{kind}:{stable}`, the same port named by its controller"),
            None => format!(
                "bus {} is not on this host now; find the port's stable name (such as 0000:00:14.0/3.4) in the second column of `usbroute list`",
                port.bus
            ),
        };
        Some(format!(
            "`{term}` names the port by its bus number, which can change at the next boot or kernel update; {instead}"
        ))
    })
}

/// Rules that name a socket by its USB 3 side (`port:0000:00:14.0/ss1`) where this host's
/// kernel links that port to a USB 2 twin: usbroute names every device in such a socket by
/// the USB 2 side, so the rule matches nothing. Each gets the socket's name.
fn usb3_side_warnings(
    config: &Config,
    host: &Snapshot,
    at: &dyn Fn(usize) -> String,
) -> Vec<String> {
    term_warnings(config, at, |term| {
        let (Term::PhysicalPort(port) | Term::PhysicalHub(port)) = term else {
            return None;
        };
        let twin = host
            .buses
            .iter()
            .filter(|b| b.is_superspeed() && b.controller_name.as_ref() == Some(&port.controller))
            .find_map(|b| b.twin_of(port.ports[0]))
            .filter(|_| port.superspeed)?;
        let kind = if matches!(term, Term::PhysicalHub(_)) {
            "hub"
        } else {
            "port"
        };
        let socket = crate::inventory::PhysicalPort {
            superspeed: false,
            ports: std::iter::once(twin)
                .chain(port.ports[1..].iter().copied())
                .collect(),
            ..port.clone()
        };
        let below = if port.ports.len() > 1 {
            " (the hub ports below may be numbered differently on the USB 2 side: see `usbroute list`)"
        } else {
            ""
        };
        Some(format!(
            "`{term}` names the USB 3 side of a socket that has USB 2 wires too; usbroute names every device there by the USB 2 side, so this matches nothing: write `{kind}:{socket}`{below}"
        ))
    })
}

fn rule_line(r: &Rule, at: String) -> RuleLine {
    let (action, vm, by) = match &r.action {
        RuleAction::Forbid => ("forbid", None, None),
        RuleAction::Pass { vm, mode } => ("pass", Some(vm.clone()), Some(*mode)),
    };
    RuleLine {
        at,
        line: r.line,
        rule: r.index + 1,
        selector: r.selector.to_string(),
        action,
        vm,
        by,
        priority: r.priority,
        force: r.force,
        follow: r.follow.map(crate::policy::window_text),
    }
}

/// The human form: what the file holds, in sections.
fn text(file: &ConfigFile, r: &Report) -> String {
    let mut out = format!("{}: valid\n", file.describe());
    let mut section = |title: &str, lines: Vec<String>| {
        if !lines.is_empty() {
            out.push_str(&format!("\n{title}:\n"));
            for l in lines {
                out.push_str(&format!("  {l}\n"));
            }
        }
    };
    section("VMs", r.vms.iter().map(VmLine::describe).collect());
    section(
        "rules, in the order they win",
        r.rules
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let target = match (&l.vm, l.by) {
                    (Some(vm), Some(by)) => format!("vm {vm}, by {}", by.name()),
                    _ => "forbid (stays on the host)".into(),
                };
                let force = if l.force { ", force" } else { "" };
                format!(
                    "{}. {} -> {target}, priority {}{force}  ({})",
                    i + 1,
                    l.selector,
                    l.priority,
                    l.at
                )
            })
            .collect(),
    );
    section(
        "controllers",
        r.controllers
            .iter()
            .map(|c| format!("{} -> vm {}", c.pci, c.vm))
            .collect(),
    );
    section(
        "routing profiles",
        r.routing
            .profile
            .iter()
            .map(|(name, p)| match &p.mask {
                Some(mask) => format!("{name}: mask {mask}"),
                None => format!("{name}: to EHCI {}", p.ehci.join(", ")),
            })
            .chain(
                (!r.routing.toggle.is_empty())
                    .then(|| format!("toggle: {}", r.routing.toggle.join(" <-> "))),
            )
            .collect(),
    );
    section("warnings", r.warnings.clone());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::driver::fake::FakeDriver;
    use std::sync::Arc;

    const CONFIG: &str = "[[vm]]\nname = \"a\"\nqmp = \"/run/a.qmp\"\n\n[[rule]]\nmatch = \"port:1-1\"\nvm = \"a\"\nby = \"port\"\n\n[[rule]]\nmatch = \"port:1-2\"\nvm = \"a\"\n";

    fn at(line: usize) -> String {
        format!("usbroute.toml:{line}")
    }

    #[test]
    fn a_rule_asking_a_backend_for_a_mode_it_lacks_is_warned_about_at_its_line() {
        let config = Config::parse(CONFIG, None).unwrap();
        let drivers = Drivers::new(vec![Arc::new(FakeDriver::address_only())]);

        let warnings = backend_warnings(&config, &drivers, &at);

        assert_eq!(
            warnings,
            ["usbroute.toml:5: VM `a`'s backend (qemu) cannot attach by port, so this rule keeps its devices on the host; use `by = \"address\"`"]
        );
    }

    #[test]
    fn a_bus_numbered_port_is_warned_about_with_its_stable_form_when_the_bus_is_here() {
        let config = Config::parse(CONFIG, None).unwrap();
        let host = Snapshot {
            buses: vec![crate::inventory::Bus {
                number: 1,
                controller: None,
                controller_name: Some("0000:00:14.0".parse().unwrap()),
                speed_mbps: None,
                ports: None,
                version: Some("2.00".into()),
                twin: None,
                twin_ports: Vec::new(),
            }],
            ..Snapshot::default()
        };

        let warnings = bus_numbered_warnings(&config, &host, &at);

        assert_eq!(warnings.len(), 2);
        assert!(
            warnings[0].starts_with("usbroute.toml:5: `port:1-1` names the port by its bus number")
                && warnings[0].ends_with(
                    "write `port:0000:00:14.0/1`, the same port named by its controller"
                ),
            "{}",
            warnings[0]
        );
        assert!(
            warnings[1].contains("write `port:0000:00:14.0/2`"),
            "{}",
            warnings[1]
        );
    }

    #[test]
    fn a_bus_numbered_port_on_a_bus_not_here_points_at_usbroute_list() {
        let config = Config::parse(CONFIG, None).unwrap();

        let warnings = bus_numbered_warnings(&config, &Snapshot::default(), &at);

        assert!(
            warnings[0].ends_with("bus 1 is not on this host now; find the port's stable name (such as 0000:00:14.0/3.4) in the second column of `usbroute list`"),
            "{}",
            warnings[0]
        );
    }

    #[test]
    fn this_builds_qemu_driver_warns_about_nothing() {
        let config = Config::parse(CONFIG, None).unwrap();
        let drivers = crate::backend::drivers(crate::sysfs::SysfsRoot::default());

        assert!(backend_warnings(&config, &drivers, &at).is_empty());
    }
}
