//! How the engine carries out [`GroupStep`]s: the small [`ControllerHost`] trait (blocking
//! host work, which the coordinator runs in `spawn_blocking`, one batch at a time), its
//! implementation over [`crate::vfio`]'s plans and [`PciHost`] ([`VfioControllers`]), and
//! [`carry_out`], which alone decides between doing a step and, in a dry run, describing it.

use super::controllers::GroupStep;
use crate::error_chain::one_line;
use crate::sysfs::SysfsRoot;
use crate::vfio::{self, BindOptions, ControllerRule, LiveHost, PciHost, RuleOutcome};

/// What the engine needs from the host to move a rule's IOMMU group. Each call blocks
/// (sysfs writes, the wait for `/dev/vfio/N`) and answers with a full sentence for the log
/// and `status`; none forces a group the host seems to need. The engine holds one as
/// [`SharedControllerHost`], to run it on a blocking thread.
pub trait ControllerHost {
    /// Move the rule's group to vfio-pci.
    fn bind(&self, rule: &ControllerRule) -> RuleOutcome;
    /// Give the rule's group back to the host's drivers.
    fn restore(&self, rule: &ControllerRule) -> RuleOutcome;
    /// Say what [`bind`](Self::bind) would write where, and write nothing.
    fn describe_bind(&self, rule: &ControllerRule) -> RuleOutcome;
    /// Say what [`restore`](Self::restore) would write where, and write nothing.
    fn describe_restore(&self, rule: &ControllerRule) -> RuleOutcome;
}

/// A [`ControllerHost`] the engine can hand to a blocking thread.
pub type SharedControllerHost = std::sync::Arc<dyn ControllerHost + Send + Sync>;

/// Which way a rule's group moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// To vfio-pci, for the rule's VM.
    Bind,
    /// Back to the host's drivers.
    Restore,
    /// Its rule is gone but its VM still runs: it stays on vfio-pci for now.
    Kept,
}

/// One rule's bind, restore or keep, done or (dry run) described.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupOutcome {
    /// Bind, restore or keep.
    pub direction: Direction,
    /// How it went; `message` is a full sentence for the log and `status`.
    pub outcome: RuleOutcome,
}

/// Carry out `steps` in order through `host`; with `dry_run`, describe each instead (the
/// engine's dry run is the only one). A keep touches nothing either way. Blocking.
pub fn carry_out(
    host: &dyn ControllerHost,
    steps: &[GroupStep],
    dry_run: bool,
) -> Vec<GroupOutcome> {
    steps
        .iter()
        .map(|step| match step {
            GroupStep::Bind(rule) => GroupOutcome {
                direction: Direction::Bind,
                outcome: match dry_run {
                    true => host.describe_bind(rule),
                    false => host.bind(rule),
                },
            },
            GroupStep::Restore(rule) => GroupOutcome {
                direction: Direction::Restore,
                outcome: match dry_run {
                    true => host.describe_restore(rule),
                    false => host.restore(rule),
                },
            },
            GroupStep::Keep {
                rule,
                vm_configured,
            } => GroupOutcome {
                direction: Direction::Kept,
                outcome: kept(rule, *vm_configured),
            },
        })
        .collect()
}

/// The outcome of a [`GroupStep::Keep`]: until when the group stays.
fn kept(rule: &ControllerRule, vm_configured: bool) -> RuleOutcome {
    let vm = &rule.vm;
    let when = if vm_configured {
        format!("it goes back to the host when {vm} stops")
    } else {
        format!(
            "{vm} is no longer in the config, so usbroute cannot see it stop: run \
             `usbroute controller restore {}` once it has",
            rule.pci
        )
    };
    RuleOutcome::new(
        rule,
        None,
        true,
        format!("its rule is gone, but VM {vm} is running with it: it stays on vfio-pci; {when}"),
    )
}

/// The real host: `crate::vfio`'s bind and restore (with their records and roll-back)
/// through a [`PciHost`], never forced.
pub struct VfioControllers<H> {
    root: SysfsRoot,
    host: H,
    opts: BindOptions,
}

impl VfioControllers<LiveHost> {
    /// The live host under `root`, with the default bind options.
    pub fn live(root: SysfsRoot) -> Self {
        let host = LiveHost::new(root.clone());
        Self::new(root, host, BindOptions::default())
    }
}

impl<H: PciHost> VfioControllers<H> {
    /// Bind and restore under `root` through `host`; `opts.force` is ignored (a rule never
    /// forces).
    pub fn new(root: SysfsRoot, host: H, opts: BindOptions) -> Self {
        let opts = BindOptions {
            force: false,
            ..opts
        };
        Self { root, host, opts }
    }
}

impl<H: PciHost> ControllerHost for VfioControllers<H> {
    fn bind(&self, rule: &ControllerRule) -> RuleOutcome {
        let report = vfio::apply_controller_rules(
            &self.root,
            &self.host,
            std::slice::from_ref(rule),
            &self.opts,
        );
        first(report.outcomes, rule)
    }

    fn restore(&self, rule: &ControllerRule) -> RuleOutcome {
        let report = vfio::restore_controller_rules(
            &self.root,
            &self.host,
            std::slice::from_ref(rule),
            &self.opts,
        );
        first(report.outcomes, rule)
    }

    fn describe_bind(&self, rule: &ControllerRule) -> RuleOutcome {
        match vfio::plan_bind(&self.root, &self.host, &rule.pci, &self.opts) {
            Ok(plan) => RuleOutcome::new(
                rule,
                Some(plan.group.number),
                true,
                format!(
                    "dry run: would move IOMMU group {} to vfio-pci for VM {}: {}",
                    plan.group.number,
                    rule.vm,
                    steps_text(&plan.steps)
                ),
            ),
            Err(e) => would_fail(rule, &e),
        }
    }

    fn describe_restore(&self, rule: &ControllerRule) -> RuleOutcome {
        match vfio::plan_restore(&self.root, &self.host, &rule.pci) {
            Ok((group, _, steps)) => RuleOutcome::new(
                rule,
                Some(group.number),
                true,
                format!(
                    "dry run: would give IOMMU group {} back to the host: {}",
                    group.number,
                    steps_text(&steps)
                ),
            ),
            Err(e) => would_fail(rule, &e),
        }
    }
}

/// The one outcome of a one-rule report.
fn first(outcomes: Vec<RuleOutcome>, rule: &ControllerRule) -> RuleOutcome {
    outcomes.into_iter().next().unwrap_or_else(|| {
        RuleOutcome::new(rule, None, false, "no outcome was reported".to_string())
    })
}

fn steps_text(steps: &[vfio::Step]) -> String {
    match steps {
        [] => "nothing to do".into(),
        steps => steps
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// What a dry run says of a rule whose plan cannot be made.
fn would_fail(rule: &ControllerRule, e: &vfio::VfioError) -> RuleOutcome {
    RuleOutcome::new(
        rule,
        None,
        false,
        format!("dry run: would fail: {}", one_line(e)),
    )
}

#[cfg(test)]
mod tests {
    use super::super::controllers::tests::rule;
    use super::*;

    /// A host that must not be asked: keeps never touch it.
    struct Untouchable;

    impl ControllerHost for Untouchable {
        fn bind(&self, _: &ControllerRule) -> RuleOutcome {
            unreachable!("a keep binds nothing")
        }
        fn restore(&self, _: &ControllerRule) -> RuleOutcome {
            unreachable!("a keep restores nothing")
        }
        fn describe_bind(&self, _: &ControllerRule) -> RuleOutcome {
            unreachable!("a keep binds nothing")
        }
        fn describe_restore(&self, _: &ControllerRule) -> RuleOutcome {
            unreachable!("a keep restores nothing")
        }
    }

    #[test]
    fn a_keep_says_until_when_the_group_stays_and_touches_nothing() {
        let steps = [
            GroupStep::Keep {
                rule: rule("00:1d.7", "win11"),
                vm_configured: true,
            },
            GroupStep::Keep {
                rule: rule("21:00.3", "gone"),
                vm_configured: false,
            },
        ];

        let outcomes = carry_out(&Untouchable, &steps, false);

        let messages: Vec<&str> = outcomes
            .iter()
            .map(|o| o.outcome.message.as_str())
            .collect();
        assert_eq!(
            messages,
            [
                "its rule is gone, but VM win11 is running with it: it stays on vfio-pci; it goes back to the host when win11 stops",
                "its rule is gone, but VM gone is running with it: it stays on vfio-pci; gone is no longer in the config, so usbroute cannot see it stop: run `usbroute controller restore 0000:21:00.3` once it has",
            ]
        );
        assert!(outcomes
            .iter()
            .all(|o| o.direction == Direction::Kept && o.outcome.ok));
    }
}
