//! The config file (TOML; its keys are a stable interface, documented in docs/config.md).
//!
//! Loading is all-or-nothing: [`Config::parse`] returns a whole valid config or every
//! problem found, each at `file:line:column` with the fix. A daemon reloading a bad file
//! keeps the config it has (it only swaps on `Ok`), so bad input never loses state.

use super::rules::{Rule, RuleAction};
use crate::backend::AttachMode;
use crate::inventory::PciAddress;
use crate::routing::RoutingConfig;
use crate::selector::Selector;
use crate::toggle::ToggleConfig;
use crate::vfio::ControllerRule;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Where the control socket lives unless `control_socket` says otherwise.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/usbroute/control.sock";

/// The target name that means "stays on the host" in a rule's `vm`.
pub const HOST: &str = "host";

/// A whole, validated config.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it came from (for messages); `None` for the built-in empty policy.
    pub origin: Option<PathBuf>,
    /// The daemon's control socket.
    pub control_socket: PathBuf,
    /// The group that owns the control socket (members may use it), `None`: root only.
    pub control_group: Option<String>,
    /// The VMs, in file order.
    pub vms: Vec<VmConfig>,
    /// The rules, in file order.
    pub rules: Vec<Rule>,
    /// Whole controllers given to VMs (`[[controller]]`).
    pub controllers: Vec<ControllerRule>,
    /// `[routing]`: Intel PCH port routing.
    pub routing: RoutingConfig,
    /// `[toggle]`: the toggle service.
    pub toggle: ToggleConfig,
}

/// One `[[vm]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Its name, used in rules, commands and logs.
    pub name: String,
    /// Its QMP socket.
    pub qmp: PathBuf,
    /// The toggle serial link's address for this VM (carried for the toggle service).
    pub serial: Option<String>,
    /// Routing profile names this VM may switch to (carried for the toggle service).
    #[serde(default)]
    pub profiles: Vec<String>,
    /// The user this VM's QEMU runs as (name or uid): the one peer besides root allowed
    /// on a unix-socket `serial`.
    #[serde(default)]
    pub qemu_user: Option<String>,
    /// The secret the guest sends first on a TCP `serial` link (its own, not [toggle]'s).
    #[serde(default)]
    pub serial_secret: Option<String>,
}

impl VmConfig {
    /// Which hypervisor runs this VM and how to reach it.
    pub fn target(&self) -> crate::backend::VmTarget {
        crate::backend::VmTarget::Qemu {
            qmp: self.qmp.clone(),
        }
    }
}

/// A problem a section's owner found, at a key: a path of table keys, where an element
/// of an array of tables (`[[vm]]`) is named by its `name` (`["vm", "win11", "serial"]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyProblem {
    /// Where.
    pub key: Vec<String>,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Everything wrong with a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read the config file; check the path (--config FILE) and that this user may read it", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is not a valid config; every problem is listed.
    #[error("{}", Problems(problems))]
    Invalid {
        /// Each problem with its place.
        problems: Vec<Problem>,
    },
}

/// One problem in a config file, at a place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file (or `<config>` for text without a file).
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

struct Problems<'a>(&'a [Problem]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.0.iter().map(Problem::to_string).collect();
        f.write_str(&lines.join("\n"))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    control_socket: Option<PathBuf>,
    control_group: Option<Spanned<String>>,
    #[serde(default)]
    vm: Vec<Spanned<VmConfig>>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
    #[serde(default)]
    controller: Vec<Spanned<ControllerRule>>,
    #[serde(default)]
    routing: RoutingConfig,
    #[serde(default)]
    toggle: ToggleConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    vm: Option<Spanned<String>>,
    #[serde(rename = "match")]
    selector: Spanned<String>,
    by: Option<Spanned<AttachMode>>,
    forbid: Option<Spanned<bool>>,
    force: Option<Spanned<bool>>,
    priority: Option<Spanned<i64>>,
}

impl Default for Config {
    /// The empty policy: no VMs, no rules; every device stays on the host.
    fn default() -> Self {
        Config {
            origin: None,
            control_socket: DEFAULT_CONTROL_SOCKET.into(),
            control_group: None,
            vms: vec![],
            rules: vec![],
            controllers: vec![],
            routing: RoutingConfig::default(),
            toggle: ToggleConfig::default(),
        }
    }
}

impl Config {
    /// Read and validate the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        match String::from_utf8(bytes) {
            Ok(text) => Config::parse(&text, Some(path)),
            Err(e) => Err(not_utf8(path, e.as_bytes(), e.utf8_error().valid_up_to())),
        }
    }

    /// Validate `text`; `origin` names the file in messages. Pure.
    pub fn parse(text: &str, origin: Option<&Path>) -> Result<Config, ConfigError> {
        let mut checker = Checker {
            text,
            file: origin.map_or("<config>".into(), |p| p.display().to_string()),
            problems: vec![],
        };
        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                checker.report(span, format!("{} (see docs/config.md)", e.message().trim()));
                return Err(checker.into_error());
            }
        };
        let config = checker.build(raw, origin);
        for problem in crate::toggle::runtime::check_routing_config_at(&config) {
            let span = key_span(text, &problem.key);
            checker.report(span, problem.message);
        }
        match checker.problems.is_empty() {
            true => Ok(config),
            false => Err(checker.into_error()),
        }
    }

    /// The VM named `name`.
    pub fn vm(&self, name: &str) -> Option<&VmConfig> {
        self.vms.iter().find(|v| v.name == name)
    }

    /// The `[[controller]]` assignments in force: those whose VM is running, each rule's own
    /// function only (no sysfs read). The daemon holds each rule's whole IOMMU group instead
    /// ([`crate::vfio::held_functions`]) for the plan's
    /// [`PlanInput::controllers_owned`](super::PlanInput::controllers_owned).
    pub fn controllers_owned(&self, vms_up: &BTreeSet<String>) -> BTreeMap<PciAddress, String> {
        self.controllers
            .iter()
            .filter(|c| vms_up.contains(&c.vm))
            .map(|c| (c.pci, c.vm.clone()))
            .collect()
    }
}

struct Checker<'a> {
    text: &'a str,
    file: String,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn report(&mut self, span: Range<usize>, message: String) {
        let (line, column) = line_column(self.text, span.start);
        self.problems.push(Problem {
            file: self.file.clone(),
            line,
            column,
            message,
        });
    }

    fn into_error(self) -> ConfigError {
        ConfigError::Invalid {
            problems: self.problems,
        }
    }

    fn build(&mut self, raw: RawConfig, origin: Option<&Path>) -> Config {
        let vms = self.check_vms(raw.vm);
        let names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
        let known = names.join(", ");
        let rules: Vec<Rule> = raw
            .rule
            .into_iter()
            .enumerate()
            .filter_map(|(index, r)| self.check_rule(index, r, &names, &known))
            .collect();
        self.check_ties(&rules);
        let controllers = self.check_controllers(raw.controller, &names, &known);
        let control_group = raw.control_group.map(|g| {
            let span = g.span();
            let g = g.into_inner();
            if g.trim().is_empty() {
                self.report(span, "control_group is empty: name a group, or leave the key out so only root may use the socket".into());
            }
            g
        });
        Config {
            origin: origin.map(Path::to_path_buf),
            control_socket: raw
                .control_socket
                .unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.into()),
            control_group,
            vms,
            rules,
            controllers,
            routing: raw.routing,
            toggle: raw.toggle,
        }
    }

    fn check_vms(&mut self, raw: Vec<Spanned<VmConfig>>) -> Vec<VmConfig> {
        let mut seen_names: BTreeMap<String, usize> = BTreeMap::new();
        let mut seen_sockets: BTreeMap<PathBuf, usize> = BTreeMap::new();
        let mut vms = Vec::new();
        for vm in raw {
            let span = vm.span();
            let vm = vm.into_inner();
            let line = line_column(self.text, span.start).0;
            let good_name = !vm.name.is_empty()
                && vm
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !good_name {
                self.report(span.clone(), format!("VM name `{}` must be letters, digits, `.`, `_` or `-` (it appears in commands and logs)", vm.name));
            } else if vm.name == HOST {
                self.report(span.clone(), "a VM cannot be called `host`: in rules `vm = \"host\"` means the device stays on the host; rename the VM".into());
            } else if let Some(first) = seen_names.insert(vm.name.clone(), line) {
                self.report(
                    span.clone(),
                    format!(
                        "VM `{}` is defined twice (first on line {first}); remove one or rename it",
                        vm.name
                    ),
                );
            }
            if let Some(first) = seen_sockets.insert(vm.qmp.clone(), line) {
                self.report(span, format!("QMP socket {} is used by two VMs (first on line {first}); each VM needs its own", vm.qmp.display()));
            }
            vms.push(vm);
        }
        vms
    }

    fn check_rule(
        &mut self,
        index: usize,
        raw: Spanned<RawRule>,
        vms: &[&str],
        known: &str,
    ) -> Option<Rule> {
        let rule_span = raw.span();
        let line = line_column(self.text, rule_span.start).0;
        let raw = raw.into_inner();
        let selector_span = raw.selector.span();
        let selector = match raw.selector.get_ref().parse::<Selector>() {
            Ok(s) => Some(s),
            Err(e) => {
                self.report(selector_span, format!("`match`: {e}"));
                None
            }
        };
        let forbid = raw.forbid.as_ref().is_some_and(|f| *f.get_ref());
        let target = raw.vm.as_ref().map(|v| v.get_ref().as_str());
        let action = match (forbid, target) {
            (true, None | Some(HOST)) | (false, Some(HOST)) => Some(RuleAction::Forbid),
            (true, Some(vm)) => {
                let span = raw.vm.as_ref().map_or(rule_span.clone(), Spanned::span);
                self.report(span, format!("this rule says both `forbid = true` and `vm = \"{vm}\"`; a forbid rule keeps the device on the host: drop one of the two"));
                None
            }
            (false, None) => {
                self.report(rule_span.clone(), "this rule has no target: add `vm = \"NAME\"` (a [[vm]] name), `vm = \"host\"` or `forbid = true`".into());
                None
            }
            (false, Some(vm)) if !vms.contains(&vm) => {
                let span = raw.vm.as_ref().map_or(rule_span.clone(), Spanned::span);
                let hint = if known.is_empty() {
                    "no [[vm]] is defined; add one".to_string()
                } else {
                    format!("known VMs: {known}")
                };
                self.report(span, format!("rule names VM `{vm}`, which no [[vm]] defines ({hint}); or use `vm = \"host\"`"));
                None
            }
            (false, Some(vm)) => Some(RuleAction::Pass {
                vm: vm.to_string(),
                mode: raw.by.as_ref().map(|b| *b.get_ref()).unwrap_or_default(),
            }),
        };
        if matches!(action, Some(RuleAction::Forbid)) {
            self.reject_on_forbid(
                "by",
                raw.by.as_ref().map(Spanned::span),
                "a forbid rule attaches nothing",
            );
            self.reject_on_forbid(
                "force",
                raw.force.as_ref().map(Spanned::span),
                "force only overrides built-in protections for rules that pass a device to a VM",
            );
            self.reject_on_forbid(
                "priority",
                raw.priority.as_ref().map(Spanned::span),
                "a forbid rule always wins over every other rule",
            );
        }
        Some(Rule {
            index,
            line,
            selector: selector?,
            action: action?,
            priority: raw.priority.map_or(0, Spanned::into_inner),
            force: raw.force.is_some_and(Spanned::into_inner),
        })
    }

    fn reject_on_forbid(&mut self, key: &str, span: Option<Range<usize>>, why: &str) {
        if let Some(span) = span {
            self.report(
                span,
                format!("`{key}` has no effect on a forbid rule ({why}); remove it"),
            );
        }
    }

    /// Two pass rules of equal priority that might match one device and send it to
    /// different places are an error: nothing may be decided by chance or file order.
    fn check_ties(&mut self, rules: &[Rule]) {
        for (i, later) in rules.iter().enumerate() {
            let earlier = rules[..i].iter().find(|e| {
                matches!(e.action, RuleAction::Pass { .. })
                    && matches!(later.action, RuleAction::Pass { .. })
                    && e.priority == later.priority
                    && (&e.action, e.force) != (&later.action, later.force)
                    && !e.selector.provably_disjoint(&later.selector)
            });
            if let Some(earlier) = earlier {
                let offset = line_offset(self.text, later.line);
                self.report(offset..offset, format!(
                    "this rule ({}) and the rule on line {} ({}) can match the same device and both have priority {}, but they send it to different places; give the one that should win a higher `priority = N`, or make the `match` selectors exclusive",
                    later.describe_target(), earlier.line, earlier.describe_target(), later.priority
                ));
            }
        }
    }

    fn check_controllers(
        &mut self,
        raw: Vec<Spanned<ControllerRule>>,
        vms: &[&str],
        known: &str,
    ) -> Vec<ControllerRule> {
        let mut seen = BTreeMap::new();
        let mut out = Vec::new();
        for c in raw {
            let span = c.span();
            let c = c.into_inner();
            let line = line_column(self.text, span.start).0;
            if !vms.contains(&c.vm.as_str()) {
                self.report(span.clone(), format!("controller {} is given to VM `{}`, which no [[vm]] defines (known VMs: {known})", c.pci, c.vm));
            }
            if let Some(first) = seen.insert(c.pci, line) {
                self.report(span, format!("controller {} is given away twice (first on line {first}); a controller can belong to one VM", c.pci));
            }
            out.push(c);
        }
        out
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Byte offset of the start of a 1-based line.
fn line_offset(text: &str, line: usize) -> usize {
    text.split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum()
}

/// A file that is not UTF-8: where the first bad byte is.
fn not_utf8(path: &Path, bytes: &[u8], valid_up_to: usize) -> ConfigError {
    let text = std::str::from_utf8(&bytes[..valid_up_to]).unwrap_or_default();
    let (line, column) = line_column(text, valid_up_to);
    let byte = bytes.get(valid_up_to).copied().unwrap_or_default();
    ConfigError::Invalid {
        problems: vec![Problem {
            file: path.display().to_string(),
            line,
            column,
            message: format!(
                "byte {valid_up_to} (0x{byte:02x}) is not UTF-8 text; save the file as UTF-8"
            ),
        }],
    }
}

/// A step in [`key_span`]'s walk.
enum At<'a> {
    Table(&'a toml_edit::Table),
    Tables(&'a toml_edit::ArrayOfTables),
}

/// Where `key` is in the file: the deepest part of it that exists (a missing key is
/// reported at its table), else the start of the file.
fn key_span(text: &str, key: &[String]) -> Range<usize> {
    use toml_edit::Item;
    let Ok(doc) = toml_edit::ImDocument::parse(text) else {
        return 0..0;
    };
    let mut found = 0..0;
    let mut at = At::Table(doc.as_table());
    for part in key {
        let (span, next) = match at {
            At::Table(t) => match t.get_key_value(part) {
                Some((k, Item::Table(inner))) => (k.span(), At::Table(inner)),
                Some((k, Item::ArrayOfTables(a))) => (k.span(), At::Tables(a)),
                Some((k, _)) => {
                    found = k.span().unwrap_or(found);
                    break;
                }
                None => break,
            },
            // `[[vm]]` elements are named by their `name`.
            At::Tables(a) => match a
                .iter()
                .find(|t| t.get("name").and_then(Item::as_str) == Some(part.as_str()))
            {
                Some(t) => (t.span(), At::Table(t)),
                None => break,
            },
        };
        found = span.unwrap_or(found);
        at = next;
    }
    found
}
