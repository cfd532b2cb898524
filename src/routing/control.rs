//! Profiles by name on a [`Router`]: the one type that owns the router. `usbroute
//! ports` and `usbroute serve` both get theirs from [`ProfileRouter::open`]; in the
//! daemon it is the engine's [`PortRouting`](crate::engine::routing::PortRouting)
//! (`routing/port_routing.rs`), so the engine's reconciler decides every switch.

use super::config_space::{ConfigSpace, SysfsConfigSpace};
use super::detect::{detect, Detected};
use super::profile::{plan, Plan};
use super::router::{Applied, Reapplied, Router};
use super::{RoutingConfig, RoutingError};
use crate::config::KeyProblem;
use crate::sysfs::SysfsRoot;

/// A router plus the `[routing]` config: apply, toggle and recognise profiles by name.
pub struct ProfileRouter<C: ConfigSpace> {
    router: Router<C>,
    config: RoutingConfig,
}

impl ProfileRouter<SysfsConfigSpace> {
    /// Find the xHCI `[routing] controller` names (or the one switchable xHCI) and route
    /// it with `config`'s profiles, through its sysfs `config` file.
    pub fn open(root: &SysfsRoot, config: &RoutingConfig) -> Result<Self, RoutingError> {
        let detected = detect(root, config.controller)?;
        Ok(Self::open_detected(root, detected, config.clone()))
    }

    /// [`open`](Self::open) on an xHCI found before (a reload keeps the controller
    /// found at start and takes the new profiles).
    pub fn open_detected(root: &SysfsRoot, detected: Detected, config: RoutingConfig) -> Self {
        Self::new(Router::open(root, detected), config)
    }
}

impl<C: ConfigSpace> ProfileRouter<C> {
    /// Combine a router with the profiles it may apply.
    pub fn new(router: Router<C>, config: RoutingConfig) -> Self {
        Self { router, config }
    }

    /// The underlying router.
    pub fn router(&self) -> &Router<C> {
        &self.router
    }

    /// The config.
    pub fn config(&self) -> &RoutingConfig {
        &self.config
    }

    /// Replace the config (after a reload); the registers are left as they are.
    pub fn set_config(&mut self, config: RoutingConfig) {
        self.config = config;
    }

    fn unknown(&self, name: &str) -> RoutingError {
        let known = self.config.profile.keys().cloned().collect::<Vec<_>>();
        RoutingError::UnknownProfile {
            name: name.to_string(),
            known: if known.is_empty() {
                "none; add [routing.profile.NAME] sections".into()
            } else {
                known.join(", ")
            },
        }
    }

    /// What applying profile `name` would do now.
    pub fn plan(&self, name: &str) -> Result<Plan, RoutingError> {
        let profile = self
            .config
            .profile
            .get(name)
            .ok_or_else(|| self.unknown(name))?;
        let regs = self.router.registers()?;
        plan(
            name,
            profile,
            &self.config.labels,
            self.router.detected().chipset,
            &regs,
        )
    }

    /// Apply profile `name`. `force` adds to the profile's own `force`.
    pub fn apply(&mut self, name: &str, force: bool) -> Result<(Plan, Applied), RoutingError> {
        let plan = self.plan(name)?;
        let force = self.forced(name, force);
        let applied = self.router.apply(&plan, force)?;
        Ok((plan, applied))
    }

    /// What [`apply`](Self::apply) would do; writes nothing.
    pub fn preview(&self, name: &str, force: bool) -> Result<(Plan, Applied), RoutingError> {
        let plan = self.plan(name)?;
        let applied = self.router.preview(&plan, self.forced(name, force))?;
        Ok((plan, applied))
    }

    fn forced(&self, name: &str, force: bool) -> bool {
        force || self.config.profile.get(name).is_some_and(|p| p.force)
    }

    /// The profile in force: the one usbroute last applied if the register still holds
    /// it, else the first profile whose routing equals the register, else `None`.
    pub fn active_profile(&self) -> Result<Option<String>, RoutingError> {
        let regs = self.router.registers()?;
        if let Some(active) = self.router.active()? {
            if active.xusb2pr == regs.xusb2pr && self.config.profile.contains_key(&active.profile) {
                return Ok(Some(active.profile));
            }
        }
        Ok(self
            .config
            .profile
            .keys()
            .find(|name| self.plan(name).is_ok_and(|p| p.xusb2pr == regs.xusb2pr))
            .cloned())
    }

    /// The two profiles `toggle` flips between: `pair`, else `[routing] toggle`.
    pub fn toggle_pair(
        &self,
        pair: Option<(&str, &str)>,
    ) -> Result<(String, String), RoutingError> {
        match pair {
            Some((a, b)) => Ok((a.to_string(), b.to_string())),
            None => match self.config.toggle.as_slice() {
                [a, b] => Ok((a.clone(), b.clone())),
                other => Err(RoutingError::ToggleNeedsTwo(other.len())),
            },
        }
    }

    /// The profile `toggle` goes to now: the second of the pair when the first is in
    /// force, otherwise the first.
    pub fn toggle_target(&self, pair: Option<(&str, &str)>) -> Result<String, RoutingError> {
        let (a, b) = self.toggle_pair(pair)?;
        let active = self.active_profile()?;
        Ok(if active.as_deref() == Some(a.as_str()) {
            b
        } else {
            a
        })
    }

    /// Put the active routing back if the kernel rewrote it (see [`Router::reconcile`]).
    pub fn reconcile(&mut self) -> Result<Option<Reapplied>, RoutingError> {
        self.router.reconcile()
    }

    /// XUSB2PR now.
    pub fn mask(&self) -> Result<u16, RoutingError> {
        Ok(self.router.registers()?.xusb2pr)
    }
}

/// Problems in `[routing]` that need no hardware to see, one message each (for the
/// config loader, so a typo fails at load time, not at the first hotkey): `toggle`
/// naming two existing profiles, masks that parse, not both `mask` and `ehci`, labels
/// and `ehci` entries shaped like ports or naming a label.
pub fn check_config(config: &RoutingConfig) -> Vec<String> {
    check_config_at(config)
        .into_iter()
        .map(|p| p.message)
        .collect()
}

/// [`check_config`], each problem at its key (for `file:line:column`).
pub fn check_config_at(config: &RoutingConfig) -> Vec<KeyProblem> {
    use super::profile::{parse_mask, EhciPort};
    let mut problems = Vec::new();
    let mut at = |key: &[&str], message: String| {
        problems.push(KeyProblem {
            key: key.iter().map(|k| k.to_string()).collect(),
            message,
        })
    };
    if !config.toggle.is_empty() && config.toggle.len() != 2 {
        at(
            &["routing", "toggle"],
            format!(
                "[routing] toggle must name two profiles, it has {}",
                config.toggle.len()
            ),
        );
    }
    for name in &config.toggle {
        if !config.profile.contains_key(name) {
            at(
                &["routing", "toggle"],
                format!(
                    "[routing] toggle names profile `{name}`, which has no [routing.profile.{name}]"
                ),
            );
        }
    }
    for (label, spec) in &config.labels {
        if EhciPort::parse(spec).is_none() {
            at(
                &["routing", "labels", label],
                format!("[routing.labels] `{label}` = `{spec}`: expected a port like ehci2:3"),
            );
        }
    }
    for (name, p) in &config.profile {
        let key = |k: &'static str| ["routing", "profile", name.as_str(), k];
        if p.mask.is_some() && !p.ehci.is_empty() {
            at(
                &key("ehci"),
                format!("[routing.profile.{name}] has both `mask` and `ehci`; keep one"),
            );
        }
        if let Some(mask) = &p.mask {
            if parse_mask(mask).is_none() {
                at(
                    &key("mask"),
                    format!(
                        "[routing.profile.{name}] mask `{mask}` is not a 16-bit number such as 0x3fff"
                    ),
                );
            }
        }
        for spec in &p.ehci {
            if EhciPort::parse(spec).is_none() && !config.labels.contains_key(spec) {
                at(
                    &key("ehci"),
                    format!(
                        "[routing.profile.{name}] `{spec}` is neither a port like ehci1:3 nor a label in [routing.labels]"
                    ),
                );
            }
        }
    }
    problems
}
