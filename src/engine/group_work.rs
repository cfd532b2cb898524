//! The coordinator's side of controller groups: batches of [`GroupStep`]s queued and run
//! one at a time in `spawn_blocking` (a bind blocks on sysfs and on `/dev/vfio/N`), and the
//! last outcome of each rule's group, for the published status.

use super::controller_host::{carry_out, Direction, GroupOutcome, SharedControllerHost};
use super::controllers::GroupStep;
use crate::inventory::PciAddress;
use crate::vfio::RuleOutcome;
use std::collections::{BTreeMap, VecDeque};
use tokio::sync::mpsc;

/// Runs group steps off the engine's loop, one batch at a time.
pub(super) struct GroupWork {
    host: Option<SharedControllerHost>,
    queue: VecDeque<Vec<GroupStep>>,
    running: bool,
    done_tx: mpsc::UnboundedSender<Vec<GroupOutcome>>,
    done_rx: mpsc::UnboundedReceiver<Vec<GroupOutcome>>,
    /// The last bind, restore or keep of each rule's group (a group given back drops out).
    outcomes: BTreeMap<PciAddress, RuleOutcome>,
    /// How many batches have finished.
    finished: u64,
}

impl GroupWork {
    /// Without a host, steps are dropped: that engine manages no controllers.
    pub(super) fn new(host: Option<SharedControllerHost>) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Self {
            host,
            queue: VecDeque::new(),
            running: false,
            done_tx,
            done_rx,
            outcomes: BTreeMap::new(),
            finished: 0,
        }
    }

    /// Queue a batch, and start it if nothing runs.
    pub(super) fn push(&mut self, steps: Vec<GroupStep>, dry_run: bool) {
        if steps.is_empty() || self.host.is_none() {
            return;
        }
        self.queue.push_back(steps);
        self.start_next(dry_run);
    }

    fn start_next(&mut self, dry_run: bool) {
        let Some(host) = self.host.clone() else {
            return;
        };
        if self.running {
            return;
        }
        let Some(batch) = self.queue.pop_front() else {
            return;
        };
        self.running = true;
        let done = self.done_tx.clone();
        tokio::spawn(async move {
            let outcomes =
                tokio::task::spawn_blocking(move || carry_out(&*host, &batch, dry_run)).await;
            match outcomes {
                Ok(outcomes) => {
                    let _ = done.send(outcomes);
                }
                Err(e) => {
                    tracing::error!("controller rules: the bind task failed: {e}");
                    let _ = done.send(Vec::new());
                }
            }
        });
    }

    /// The next finished batch.
    pub(super) async fn finished_batch(&mut self) -> Option<Vec<GroupOutcome>> {
        self.done_rx.recv().await
    }

    /// Log each outcome, keep it for the status, and start the next batch.
    pub(super) fn record(&mut self, outcomes: Vec<GroupOutcome>, dry_run: bool) {
        for GroupOutcome { direction, outcome } in outcomes {
            let what = match direction {
                Direction::Bind => "controller rule",
                Direction::Restore | Direction::Kept => "controller rule removed",
            };
            if outcome.ok {
                tracing::info!(controller = %outcome.pci, vm = %outcome.vm, "{what}: {}", outcome.message);
            } else {
                tracing::error!(controller = %outcome.pci, vm = %outcome.vm, "{what}: {}", outcome.message);
            }
            if direction == Direction::Restore && outcome.ok && !dry_run {
                self.outcomes.remove(&outcome.pci);
            } else {
                self.outcomes.insert(outcome.pci, outcome);
            }
        }
        self.running = false;
        self.finished += 1;
        self.start_next(dry_run);
    }

    /// Each group's last outcome, by address.
    pub(super) fn outcomes(&self) -> Vec<RuleOutcome> {
        self.outcomes.values().cloned().collect()
    }

    /// How many batches have finished (the daemon rescans sysfs after each).
    pub(super) fn finished(&self) -> u64 {
        self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::super::controller_host::ControllerHost;
    use super::super::controllers::ControllerConfig;
    use super::super::coordinator::{spawn_with_controllers, EngineOptions, Input, Status};
    use crate::vfio::{ControllerRule, RuleOutcome};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// Answers every call with its name, and remembers the calls.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Recorder {
        fn answer(&self, call: &str, rule: &ControllerRule) -> RuleOutcome {
            let message = format!("{call} {}", rule.pci);
            self.0.lock().unwrap().push(message.clone());
            RuleOutcome {
                pci: rule.pci,
                vm: rule.vm.clone(),
                group: None,
                ok: true,
                message,
            }
        }
    }

    impl ControllerHost for Recorder {
        fn bind(&self, rule: &ControllerRule) -> RuleOutcome {
            self.answer("bind", rule)
        }
        fn restore(&self, rule: &ControllerRule) -> RuleOutcome {
            self.answer("restore", rule)
        }
        fn describe_bind(&self, rule: &ControllerRule) -> RuleOutcome {
            self.answer("describe bind", rule)
        }
        fn describe_restore(&self, rule: &ControllerRule) -> RuleOutcome {
            self.answer("describe restore", rule)
        }
    }

    fn rules(pcis: &[&str]) -> ControllerConfig {
        let rules: Vec<ControllerRule> = pcis
            .iter()
            .map(|pci| ControllerRule {
                pci: pci.parse().unwrap(),
                vm: "win11".into(),
            })
            .collect();
        ControllerConfig {
            functions: rules.clone(),
            rules,
            vms: ["win11".to_string()].into(),
        }
    }

    /// Send each config in turn, each once the engine has finished the work of the one
    /// before; return the calls made and the status after the last.
    async fn run(dry_run: bool, configs: Vec<ControllerConfig>) -> (Vec<String>, Status) {
        let host = Arc::new(Recorder::default());
        let options = EngineOptions {
            dry_run,
            ..EngineOptions::default()
        };
        let (engine, _task) = spawn_with_controllers(options, host.clone());
        let mut status = engine.status();
        for (done, config) in (1..).zip(configs) {
            engine.send(Input::Controllers(config));
            tokio::time::timeout(Duration::from_secs(10), async {
                while status.borrow_and_update().controller_batches < done {
                    status.changed().await.unwrap();
                }
            })
            .await
            .expect("the engine finished the batch");
        }
        let calls = host.0.lock().unwrap().clone();
        let last = status.borrow().clone();
        (calls, last)
    }

    #[tokio::test]
    async fn the_engine_binds_and_restores_through_its_host_and_publishes_each_outcome() {
        let (calls, status) = run(false, vec![rules(&["00:1d.7"]), rules(&["00:14.0"])]).await;

        assert_eq!(
            calls,
            [
                "bind 0000:00:1d.7",
                "restore 0000:00:1d.7",
                "bind 0000:00:14.0"
            ]
        );
        let shown: Vec<&str> = status
            .controllers
            .iter()
            .map(|o| o.message.as_str())
            .collect();
        assert_eq!(shown, ["bind 0000:00:14.0"]);
    }

    #[tokio::test]
    async fn in_a_dry_run_the_engine_only_asks_for_descriptions_and_keeps_them_in_status() {
        let (calls, status) = run(true, vec![rules(&["00:1d.7"]), rules(&["00:14.0"])]).await;

        assert_eq!(
            calls,
            [
                "describe bind 0000:00:1d.7",
                "describe restore 0000:00:1d.7",
                "describe bind 0000:00:14.0"
            ]
        );
        assert_eq!(status.controllers.len(), 2, "{:?}", status.controllers);
    }
}
