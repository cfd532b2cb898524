//! Rules as the plan uses them: validated, numbered, each with its place in the file.

use crate::backend::AttachMode;
use crate::selector::Selector;
use std::fmt;

/// The target name that means "stays on the host" in a rule's `vm`.
pub const HOST: &str = "host";

/// What a rule does with the devices it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleAction {
    /// Keep them on the host, whatever else matches (`forbid = true` or `vm = "host"`).
    Forbid,
    /// Pass them to a VM, attached by `mode`.
    Pass {
        /// The VM.
        vm: String,
        /// How the VM's usb-host finds the device (`by`).
        mode: AttachMode,
    },
}

impl RuleAction {
    /// The VM a pass rule sends devices to; `None` for a forbid rule.
    pub fn vm(&self) -> Option<&str> {
        match self {
            Self::Forbid => None,
            Self::Pass { vm, .. } => Some(vm),
        }
    }
}

/// One `[[rule]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Position among the rules in the file, from 0.
    pub index: usize,
    /// Line of the rule in the file, from 1 (0 for rules not from a file).
    pub line: usize,
    /// Which devices (`match`).
    pub selector: Selector,
    /// What to do with them.
    pub action: RuleAction,
    /// Higher wins among pass rules (`priority`, default 0). Forbid rules always win.
    pub priority: i64,
    /// Overrides the built-in protections (host netdev, mounted disk); never hubs.
    pub force: bool,
}

impl Rule {
    /// A rule passing `selector` to `vm` by `mode`, for code and tests building rules.
    pub fn pass(index: usize, selector: Selector, vm: &str, mode: AttachMode) -> Rule {
        Rule {
            index,
            line: 0,
            selector,
            action: RuleAction::Pass {
                vm: vm.to_string(),
                mode,
            },
            priority: 0,
            force: false,
        }
    }

    /// A forbid rule for `selector`.
    pub fn forbid(index: usize, selector: Selector) -> Rule {
        Rule {
            index,
            line: 0,
            selector,
            action: RuleAction::Forbid,
            priority: 0,
            force: false,
        }
    }

    /// `vm = "win11", by = "port"` or `forbid`, for messages.
    pub fn describe_target(&self) -> String {
        match &self.action {
            RuleAction::Forbid => "forbid".into(),
            RuleAction::Pass { vm, mode } => {
                let by = mode.name();
                let force = if self.force { ", force" } else { "" };
                format!("vm = \"{vm}\", by = \"{by}\"{force}")
            }
        }
    }
}

impl fmt::Display for Rule {
    /// `rule 2 (line 14: match = "port:1-3" → vm = "win11", by = "address")`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule {}", self.index + 1)?;
        if self.line > 0 {
            write!(f, " (line {}", self.line)?;
        } else {
            f.write_str(" (")?;
        }
        let sep = if self.line > 0 { ": " } else { "" };
        write!(
            f,
            "{sep}match = \"{}\" → {})",
            self.selector,
            self.describe_target()
        )
    }
}

/// Pairs of pass rules that the plan could not choose between: equal priority, selectors
/// that might match one device, and different places to send it. Each pair is
/// `(later, earlier)` in rule order, the later with the first earlier rule it ties with.
/// Nothing may be decided by chance or file order, so the config refuses these.
pub fn ties(rules: &[Rule]) -> Vec<(&Rule, &Rule)> {
    let passes = |r: &Rule| matches!(r.action, RuleAction::Pass { .. });
    rules
        .iter()
        .enumerate()
        .filter_map(|(i, later)| {
            let earlier = rules[..i].iter().find(|e| {
                passes(e)
                    && passes(later)
                    && e.priority == later.priority
                    && (&e.action, e.force) != (&later.action, later.force)
                    && !e.selector.provably_disjoint(&later.selector)
            })?;
            Some((later, earlier))
        })
        .collect()
}
