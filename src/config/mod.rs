//! The config file (TOML; its keys are a stable interface, documented in docs/config.md),
//! composed of sections that their owners check:
//!
//! | section | checked by |
//! |---|---|
//! | `control_socket`, `control_group` | this file (clients read them alone: [`ControlSettings`]) |
//! | `[[vm]]`, with its backend: `qmp`, `xen` or `libvirt` | `vm.rs` ([`VmConfig`]) |
//! | `[[rule]]` | [`policy`](crate::policy) (actions, precedence), placed by `rules.rs` |
//! | `[[controller]]` | [`vfio::check_controller_rules`](crate::vfio::check_controller_rules) |
//! | `[routing]` | [`routing::control::check_config_at`](crate::routing::control::check_config_at) |
//! | `[toggle]` and the VMs' `serial` | [`toggle::check_config`](crate::toggle::check_config), handed its part by `routing.rs` |
//!
//! What every section shares is in `problems.rs`: a problem at `file:line:column`, or at
//! a key for owners that check plain data ([`KeyProblem`]).
//!
//! Loading is all-or-nothing: [`Config::parse`] returns a whole valid config or every
//! problem found, each at `file:line:column` with the fix. A daemon reloading a bad file
//! keeps the config it has (it only swaps on `Ok`), so bad input never loses state.

mod control;
mod problems;
mod routing;
mod rules;
mod vm;

pub use control::{ControlSettings, DEFAULT_CONTROL_SOCKET};
pub use problems::{ConfigError, KeyProblem, Problem};
pub use routing::{check_routing_config, check_routing_config_at, vm_links};
pub use vm::VmConfig;

use crate::policy::Rule;
use crate::routing::RoutingConfig;
use crate::toggle::ToggleConfig;
use crate::vfio::ControllerRule;
use problems::Report;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use toml::Spanned;

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

/// The file as written: each section in its owner's raw form.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    control_socket: Option<PathBuf>,
    control_group: Option<Spanned<String>>,
    #[serde(default)]
    vm: Vec<Spanned<vm::RawVm>>,
    #[serde(default)]
    rule: Vec<Spanned<rules::RawRule>>,
    #[serde(default)]
    controller: Vec<Spanned<ControllerRule>>,
    #[serde(default)]
    routing: RoutingConfig,
    #[serde(default)]
    toggle: ToggleConfig,
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
            Err(e) => Err(problems::not_utf8(
                path,
                e.as_bytes(),
                e.utf8_error().valid_up_to(),
            )),
        }
    }

    /// Validate `text`; `origin` names the file in messages. Pure.
    pub fn parse(text: &str, origin: Option<&Path>) -> Result<Config, ConfigError> {
        let mut report = Report::new(text, origin);
        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                report.at(span, format!("{} (see docs/config.md)", e.message().trim()));
                return Err(report.into_error());
            }
        };
        let (vms, names) = vm::check(&mut report, raw.vm);
        let rules = rules::check(&mut report, raw.rule, &names);
        let controllers: Vec<(usize, ControllerRule)> = raw
            .controller
            .into_iter()
            .map(|c| (report.line(c.span().start), c.into_inner()))
            .collect();
        for problem in crate::vfio::check_controller_rules(&controllers, &names) {
            report.at_key(problem);
        }
        let control_group = raw.control_group.map(|g| {
            let span = g.span();
            let g = g.into_inner();
            if g.trim().is_empty() {
                report.at(span, "control_group is empty: name a group, or leave the key out so only root may use the socket".into());
            }
            g
        });
        let config = Config {
            origin: origin.map(Path::to_path_buf),
            control_socket: raw
                .control_socket
                .unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.into()),
            control_group,
            vms,
            rules,
            controllers: controllers.into_iter().map(|(_, c)| c).collect(),
            routing: raw.routing,
            toggle: raw.toggle,
        };
        for problem in check_routing_config_at(&config) {
            report.at_key(problem);
        }
        report.finish(config)
    }

    /// The VM named `name`.
    pub fn vm(&self, name: &str) -> Option<&VmConfig> {
        self.vms.iter().find(|v| v.name == name)
    }
}
