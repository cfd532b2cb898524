//! Engine: diff desired against actual, act through backends, retry with backoff.
//!
//! The pure parts — [`reconcile`] (the diff) and [`RetryBook`] (backoff) — decide; the
//! runtime ([`runtime`]) only carries their decisions to the VMs and their answers back.

mod diff;
mod holdings;
mod retry;
pub mod runtime;

pub use diff::{reconcile, Action, Actual, VmView};
pub use holdings::{Holdings, Outcome};
pub use retry::{BackoffPolicy, Pending, RetryBook};

use crate::inventory::Device;
use crate::policy::Desired;
use std::time::Duration;

/// One round of decisions: the diff, minus actions still waiting out a backoff. Also
/// forgets failures of actions no longer wanted.
pub fn due_actions(
    desired: &Desired,
    actual: &Actual,
    devices: &[Device],
    retries: &mut RetryBook,
    now: Duration,
) -> Vec<Action> {
    let all = reconcile(desired, actual, devices);
    retries.keep_only(&all);
    all.into_iter().filter(|a| retries.ready(a, now)).collect()
}
