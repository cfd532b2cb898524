//! `[[controller]]` as a section of the config file: what can be seen wrong without
//! hardware. The config loader places each problem at its rule.

use super::ControllerRule;
use crate::config::KeyProblem;
use std::collections::BTreeMap;

/// Problems in the `[[controller]]` rules, each at its rule (`["controller", "#N"]`, N
/// from 1): a VM that no `[[vm]]` defines (`vms` are the names), a controller given away
/// twice. Each rule comes with its line in the file, to name the first of two.
pub fn check_controller_rules(
    rules: &[(usize, ControllerRule)],
    vms: &[String],
) -> Vec<KeyProblem> {
    let mut problems = Vec::new();
    let mut seen = BTreeMap::new();
    for (n, (line, rule)) in (1..).zip(rules) {
        let key = ["controller".to_string(), format!("#{n}")];
        if !vms.contains(&rule.vm) {
            problems.push(KeyProblem {
                key: key.to_vec(),
                message: format!(
                    "controller {} is given to VM `{}`, which no [[vm]] defines (known VMs: {})",
                    rule.pci,
                    rule.vm,
                    vms.join(", ")
                ),
            });
        }
        if let Some(first) = seen.insert(rule.pci, line) {
            problems.push(KeyProblem {
                key: key.to_vec(),
                message: format!(
                    "controller {} is given away twice (first on line {first}); a controller can belong to one VM",
                    rule.pci
                ),
            });
        }
    }
    problems
}
