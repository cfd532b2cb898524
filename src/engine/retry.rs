//! Retry bookkeeping: capped exponential backoff per VM and device key, with the last
//! error for `status`. Pure data; the caller passes the time (`now`, any monotonic clock
//! measured from any fixed start), so tests drive it without sleeping.

use super::diff::Action;
use crate::backend::AttachKey;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// How long to wait after failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// Wait after the first failure.
    pub initial: Duration,
    /// Never wait longer than this.
    pub max: Duration,
}

impl Default for BackoffPolicy {
    /// 250 ms, doubling, at most 30 s.
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(30),
        }
    }
}

impl BackoffPolicy {
    /// The wait after `failures` failures in a row (≥ 1).
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.initial.saturating_mul(1u32 << doublings).min(self.max)
    }
}

/// A failed action waiting for its retry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pending {
    /// The VM.
    pub vm: String,
    /// What the usb-host device is (to be) attached for.
    pub key: AttachKey,
    /// The backend's handle for it (QEMU: the device id), for messages.
    pub id: String,
    /// Failures in a row.
    pub failures: u32,
    /// When it may run again (same clock as `now`).
    #[serde(skip)]
    pub retry_at: Duration,
    /// What went wrong last time.
    pub last_error: String,
}

/// Failures per (VM, key).
#[derive(Debug, Clone, Default)]
pub struct RetryBook {
    policy: BackoffPolicy,
    pending: BTreeMap<(String, AttachKey), Pending>,
}

/// Where `action`'s failures are kept.
fn slot(action: &Action) -> (String, AttachKey) {
    (action.vm().to_string(), action.key().clone())
}

impl RetryBook {
    /// An empty book with `policy`.
    pub fn new(policy: BackoffPolicy) -> Self {
        RetryBook {
            policy,
            pending: BTreeMap::new(),
        }
    }

    /// Record that `action` failed with `error` at `now`; `id` is the backend's handle
    /// for its device ([`crate::backend::VmBackend::device_id`]), for messages.
    pub fn failed(&mut self, action: &Action, id: &str, error: String, now: Duration) {
        let slot = slot(action);
        let failures = self.pending.get(&slot).map_or(0, |p| p.failures) + 1;
        let retry_at = now + self.policy.delay(failures);
        let pending = Pending {
            vm: action.vm().to_string(),
            key: action.key().clone(),
            id: id.to_string(),
            failures,
            retry_at,
            last_error: error,
        };
        self.pending.insert(slot, pending);
    }

    /// Record that `action` succeeded: its backoff starts over.
    pub fn succeeded(&mut self, action: &Action) {
        self.pending.remove(&slot(action));
    }

    /// May `action` run at `now`?
    pub fn ready(&self, action: &Action, now: Duration) -> bool {
        self.pending
            .get(&slot(action))
            .map_or(true, |p| p.retry_at <= now)
    }

    /// Forget failures of actions no longer wanted (`current` is this round's diff), so an
    /// old failure does not delay a device that comes back later.
    pub fn keep_only(&mut self, current: &[Action]) {
        self.pending
            .retain(|(vm, key), _| current.iter().any(|a| a.vm() == vm && a.key() == key));
    }

    /// The earliest retry time, to arm a timer.
    pub fn next_retry(&self) -> Option<Duration> {
        self.pending.values().map(|p| p.retry_at).min()
    }

    /// Every pending retry, by VM and key.
    pub fn pending(&self) -> impl Iterator<Item = &Pending> {
        self.pending.values()
    }

    /// The pending retry of one VM's device attached for `key`.
    pub fn get(&self, vm: &str, key: &AttachKey) -> Option<&Pending> {
        self.pending.get(&(vm.to_string(), key.clone()))
    }
}
