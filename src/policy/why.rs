//! `usbroute why`: the plan's decision for one device and every rule's verdict on it
//! (decided, outranked and by what, or which terms did not match).

use super::plan::{decide, plan, Decision, PlanInput, Reason, RuleRef};
use super::rules::{Rule, WinsBy};
use crate::inventory::{Device, PortPath};
use serde::Serialize;

/// How one rule relates to a device's decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum RuleMatch {
    /// This rule decided (the decision's reason may still be a protection that kept
    /// the device on the host).
    Decided,
    /// It matched, but something ranked above it decided.
    Outranked {
        /// What decided instead, and why it ranks above this rule.
        by: String,
        /// Why the deciding rule ranks above this one; `None` when no rule decided (a
        /// hub, a controller given whole, a manual override).
        because: Option<WinsBy>,
    },
    /// It did not match; one entry per failing selector term.
    NoMatch {
        /// `port:1-2: port is 1-1`.
        terms: Vec<String>,
    },
}

/// The answer to `usbroute why`: the decision and every rule's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Why {
    /// The device.
    pub port: PortPath,
    /// What the plan decided.
    pub decision: Decision,
    /// Each rule in file order.
    pub rules: Vec<(RuleRef, RuleMatch)>,
}

/// Explain the decision for `device` (which should be one of `input.devices`).
pub fn why(input: &PlanInput<'_>, device: &Device) -> Why {
    let decision = plan(input)
        .devices
        .remove(&device.port)
        .unwrap_or_else(|| decide(input, device));
    let deciding = deciding_rule(&decision.reason);
    let rules = input
        .rules
        .iter()
        .map(|rule| {
            let failing = rule.selector.explain(device);
            // A followed rule decides a device its selector does not match.
            let followed = matches!(decision.reason, Reason::Followed { .. });
            let decided = deciding == Some(rule.index) && (failing.is_empty() || followed);
            let verdict = if decided {
                RuleMatch::Decided
            } else if !failing.is_empty() {
                RuleMatch::NoMatch {
                    terms: failing
                        .iter()
                        .map(|(t, why)| format!("{t}: {why}"))
                        .collect(),
                }
            } else {
                let winner = deciding.and_then(|i| input.rules.iter().find(|r| r.index == i));
                outranked(&decision.reason, winner, rule)
            };
            (RuleRef::from(rule), verdict)
        })
        .collect();
    Why {
        port: device.port.clone(),
        decision,
        rules,
    }
}

/// The verdict for `rule`, which matched but did not decide: what decided, and by what
/// it ranks above `rule` (a forbid, a higher priority, an earlier place in the file).
fn outranked(reason: &Reason, deciding: Option<&Rule>, rule: &Rule) -> RuleMatch {
    let Some((winner, because)) = deciding.and_then(|d| Some((d, d.beats(rule)?))) else {
        return RuleMatch::Outranked {
            by: reason.to_string(),
            because: None,
        };
    };
    let rank = match because {
        WinsBy::Forbid => "a forbid rule, which wins over every pass rule".to_string(),
        WinsBy::Priority => format!(
            "a higher priority ({} > {})",
            winner.priority, rule.priority
        ),
        WinsBy::FileOrder => "an earlier rule in the file (first match wins)".to_string(),
    };
    let decided = match reason {
        Reason::Rule { .. } | Reason::Forbidden { .. } | Reason::Followed { .. } => String::new(),
        other => format!("; {other}"),
    };
    RuleMatch::Outranked {
        by: format!("outranked by {winner}, {rank}{decided}"),
        because: Some(because),
    }
}

fn deciding_rule(reason: &Reason) -> Option<usize> {
    match reason {
        Reason::Rule { rule, .. } | Reason::Forbidden { rule } | Reason::Followed { rule, .. } => {
            Some(rule.index)
        }
        Reason::HostNetdev { wanted_by, .. }
        | Reason::MountedDisk { wanted_by, .. }
        | Reason::VmDown { wanted_by, .. }
        | Reason::ModeUnsupported { wanted_by, .. }
        | Reason::NotAttachable { wanted_by, .. }
        | Reason::KindClaimed { wanted_by, .. } => wanted_by.as_ref().map(|r| r.index),
        _ => None,
    }
}
