//! What the daemon says at the default verbosity: that it is ready and with what, what
//! it sees, and every device whose decision changed (a plug, an unplug, a rule that now
//! matches). A newcomer running `usbroute serve` can tell it works and what it would do
//! without `-v`; `-q` keeps only warnings.

use crate::config::Config;
use crate::inventory::{PortPath, Snapshot};
use crate::policy::{Decision, Desired};
use std::collections::BTreeMap;
use std::path::Path;

/// The "ready" line: where to reach the daemon and which policy it runs.
pub(super) fn ready(socket: &Path, config: &Config, dry_run: bool) {
    let policy = match &config.origin {
        Some(path) => format!(
            "config {} ({} VMs, {} rules, {} controller rules)",
            path.display(),
            config.vms.len(),
            config.rules.len(),
            config.controllers.len()
        ),
        None => "no config file: the empty policy, every device stays on the host \
                 (give --config FILE, see docs/config.md)"
            .to_string(),
    };
    let dry = if dry_run {
        "; dry run: nothing is changed"
    } else {
        ""
    };
    tracing::info!(
        "usbroute daemon ready; control socket {}; {policy}{dry}",
        socket.display()
    );
}

/// One warning per pair of pass rules for different VMs that can match one device,
/// naming both lines and which wins: said once per load (at start and on each reload),
/// not per device, since first match wins and the file may mean it.
pub(super) fn overlaps(config: &Config) {
    let file = config
        .origin
        .as_ref()
        .map_or("<config>".to_string(), |p| p.display().to_string());
    for overlap in crate::policy::overlaps(&config.rules) {
        tracing::warn!("{file}:{}: {overlap}", overlap.loser.line);
    }
}

/// One line on what the daemon sees at start (or after a resync).
pub(super) fn sees(snapshot: &Snapshot, why: &str) {
    if snapshot.controllers.is_empty() && snapshot.devices.is_empty() {
        tracing::info!(
            "sees no USB ({why}): no USB controller and no USB device under sysfs; \
             devices plugged later are handled as they come"
        );
        return;
    }
    let hubs = snapshot.devices.iter().filter(|d| d.hub).count();
    tracing::info!(
        "sees {} USB controllers, {} buses, {} devices ({hubs} of them hubs) ({why})",
        snapshot.controllers.len(),
        snapshot.buses.len(),
        snapshot.devices.len(),
    );
}

/// Remembers the last decision logged for each device, so each change is said once:
/// by a hash of it, not a copy (a copy of every decision was a tenth of the daemon's heap
/// at 512 devices; two different decisions hashing alike would leave one change unsaid).
#[derive(Debug, Default)]
pub(super) struct DecisionLog {
    last: BTreeMap<PortPath, u64>,
}

/// A decision's fingerprint for [`DecisionLog`].
fn fingerprint(decision: &Decision) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    decision.hash(&mut hasher);
    hasher.finish()
}

impl DecisionLog {
    /// Log every device whose decision is new or changed, and every device gone; how many
    /// lines that was. Called on every engine status change: it touches only what changed.
    pub(super) fn update(&mut self, desired: &Desired, snapshot: &Snapshot) -> usize {
        let mut said = 0;
        for (port, decision) in &desired.devices {
            let print = fingerprint(decision);
            if self.last.get(port) == Some(&print) {
                continue;
            }
            // `label` escapes what the device claims about itself.
            let label = snapshot
                .device_at(port)
                .map(|d| d.label())
                .unwrap_or_default();
            tracing::info!(
                "device {port} {label}: {} ({})",
                placement_words(decision),
                crate::inventory::text::escaped(&decision.reason.to_string())
            );
            self.last.insert(port.clone(), print);
            said += 1;
        }
        self.last.retain(|port, _| {
            let present = desired.devices.contains_key(port);
            if !present {
                tracing::info!("device {port} is gone");
                said += 1;
            }
            present
        });
        said
    }
}

fn placement_words(decision: &Decision) -> String {
    match &decision.placement {
        crate::policy::Placement::Host => "stays on the host".to_string(),
        vm => format!("goes to VM {vm}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Placement, Reason};

    fn desired(decisions: &[(&str, Reason)]) -> Desired {
        Desired {
            devices: decisions
                .iter()
                .map(|(port, reason)| {
                    let decision = Decision {
                        placement: Placement::Host,
                        reason: reason.clone(),
                    };
                    (port.parse().expect("port"), decision)
                })
                .collect(),
        }
    }

    #[test]
    fn each_new_changed_or_gone_decision_is_said_once() {
        let mut log = DecisionLog::default();
        let host = Snapshot::default();
        let first = desired(&[("1-1", Reason::NoRule), ("1-2", Reason::NoRule)]);
        let changed = desired(&[("1-1", Reason::NoRule), ("1-2", Reason::ManualDetach)]);
        let gone = desired(&[("1-2", Reason::ManualDetach)]);

        let said = [
            log.update(&first, &host),
            log.update(&first, &host),
            log.update(&changed, &host),
            log.update(&gone, &host),
            log.update(&gone, &host),
        ];

        assert_eq!(said, [2, 0, 1, 1, 0]);
    }
}
