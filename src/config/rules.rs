//! `[[rule]]`: the keys as written, made into [`policy::Rule`](crate::policy::Rule)s. What
//! a rule means (its action, its rank, which rules overlap) is the policy's; this file
//! places each problem at its key.

use super::problems::Report;
use crate::backend::AttachMode;
use crate::policy::{parse_window, Rule, RuleAction, HOST};
use crate::selector::Selector;
use serde::Deserialize;
use std::ops::Range;
use toml::Spanned;

/// A `[[rule]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    vm: Option<Spanned<String>>,
    #[serde(rename = "match")]
    selector: Spanned<String>,
    by: Option<Spanned<AttachMode>>,
    forbid: Option<Spanned<bool>>,
    force: Option<Spanned<bool>>,
    priority: Option<Spanned<i64>>,
    follow: Option<Spanned<String>>,
}

/// The rules, in file order; `vms` are the `[[vm]]` names a rule may send devices to.
pub(super) fn check(report: &mut Report, raw: Vec<Spanned<RawRule>>, vms: &[String]) -> Vec<Rule> {
    // Overlapping rules are not a problem: first match wins (`policy::overlaps` names
    // them for `check` and the daemon's log).
    raw.into_iter()
        .enumerate()
        .filter_map(|(index, r)| check_rule(report, index, r, vms))
        .collect()
}

fn check_rule(
    report: &mut Report,
    index: usize,
    raw: Spanned<RawRule>,
    vms: &[String],
) -> Option<Rule> {
    let rule_span = raw.span();
    let line = report.line(rule_span.start);
    let raw = raw.into_inner();
    let selector_span = raw.selector.span();
    let selector = match raw.selector.get_ref().parse::<Selector>() {
        Ok(s) => Some(s),
        Err(e) => {
            report.at(selector_span, format!("`match`: {e}"));
            None
        }
    };
    let forbid = raw.forbid.as_ref().is_some_and(|f| *f.get_ref());
    let target = raw.vm.as_ref().map(|v| v.get_ref().as_str());
    let vm_span = || raw.vm.as_ref().map_or(rule_span.clone(), Spanned::span);
    let action = match (forbid, target) {
        (true, None | Some(HOST)) | (false, Some(HOST)) => Some(RuleAction::Forbid),
        (true, Some(vm)) => {
            report.at(vm_span(), format!("this rule says both `forbid = true` and `vm = \"{vm}\"`; a forbid rule keeps the device on the host: drop one of the two"));
            None
        }
        (false, None) => {
            report.at(rule_span.clone(), "this rule has no target: add `vm = \"NAME\"` (a [[vm]] name), `vm = \"host\"` or `forbid = true`".into());
            None
        }
        (false, Some(vm)) if !vms.iter().any(|v| v == vm) => {
            let hint = if vms.is_empty() {
                "no [[vm]] is defined; add one".to_string()
            } else {
                format!("known VMs: {}", vms.join(", "))
            };
            report.at(vm_span(), format!("rule names VM `{vm}`, which no [[vm]] defines ({hint}); or use `vm = \"host\"`"));
            None
        }
        (false, Some(vm)) => Some(RuleAction::Pass {
            vm: vm.to_string(),
            mode: raw.by.as_ref().map(|b| *b.get_ref()).unwrap_or_default(),
        }),
    };
    if matches!(action, Some(RuleAction::Forbid)) {
        no_effect_on_forbid(
            report,
            "by",
            raw.by.as_ref().map(Spanned::span),
            "a forbid rule attaches nothing",
        );
        no_effect_on_forbid(
            report,
            "force",
            raw.force.as_ref().map(Spanned::span),
            "force only overrides built-in protections for rules that pass a device to a VM",
        );
        no_effect_on_forbid(
            report,
            "priority",
            raw.priority.as_ref().map(Spanned::span),
            "a forbid rule always wins over every other rule",
        );
        no_effect_on_forbid(
            report,
            "follow",
            raw.follow.as_ref().map(Spanned::span),
            "a forbid rule gives no device to a VM, so there is nothing to follow",
        );
    }
    let follow = match raw.follow {
        Some(w) if !matches!(action, Some(RuleAction::Forbid)) => match parse_window(w.get_ref()) {
            Ok(window) => Some(window),
            Err(e) => {
                report.at(w.span(), format!("`follow`: {e}"));
                return None;
            }
        },
        _ => None,
    };
    Some(Rule {
        index,
        line,
        selector: selector?,
        action: action?,
        priority: raw.priority.map_or(0, Spanned::into_inner),
        force: raw.force.is_some_and(Spanned::into_inner),
        follow,
    })
}

fn no_effect_on_forbid(report: &mut Report, key: &str, span: Option<Range<usize>>, why: &str) {
    if let Some(span) = span {
        report.at(
            span,
            format!("`{key}` has no effect on a forbid rule ({why}); remove it"),
        );
    }
}
