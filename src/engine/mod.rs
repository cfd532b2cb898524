//! Engine: diff desired against actual, act through backends, retry with backoff.
//!
//! The pure parts decide; the runtime ([`runtime`]) only carries their decisions to the
//! VMs and their answers back:
//! - [`reconcile`]`(desired, actual, devices) -> Vec<Action>`: the diff (see its module
//!   for the guarantees: nothing right is touched, nothing attached twice, detach before
//!   attach, foreign usb-host devices left alone);
//! - [`Holdings`]: what each VM holds — its last answered list plus attaches in flight or
//!   of unknown outcome — turned into the diff's [`Actual`];
//! - [`RetryBook`]: capped exponential backoff per (VM, device id) with the last error;
//! - [`due_actions`]: one round = diff minus what is still backing off;
//! - [`routing`]: the port-routing reconciler (the profile in force against XUSB2PR),
//!   behind the small [`routing::PortRouting`] trait.
//!
//! A daemon loop that does its own I/O drives them like this:
//!
//! ```
//! use std::collections::{BTreeMap, BTreeSet};
//! use std::time::Duration;
//! use usbroute::engine::{due_actions, Action, BackoffPolicy, Holdings, Outcome, RetryBook};
//! use usbroute::config::Config;
//! use usbroute::policy::{plan, PlanInput};
//!
//! let config = Config::parse(
//!     "[[vm]]\nname = \"win\"\nqmp = \"/run/win.qmp\"\n\
//!      [[rule]]\nvm = \"win\"\nmatch = \"port:1-2\"\n",
//!     None,
//! )
//! .expect("valid config");
//! let devices = vec![/* inventory::scan(&root).devices */];
//! let up = BTreeSet::from(["win".to_string()]);
//! let (mounted, overrides) = (BTreeSet::new(), BTreeMap::new());
//! let owned = config.controllers_owned(&up);
//! let desired = plan(&PlanInput {
//!     rules: &config.rules,
//!     devices: &devices,
//!     mounted_disks: &mounted,
//!     vms_up: &up,
//!     overrides: &overrides,
//!     controllers_owned: &owned,
//! });
//! let mut holdings = Holdings::default();
//! holdings.listed("win", vec![/* backend.list().await? */]);
//! let mut retries = RetryBook::new(BackoffPolicy::default());
//! let now = Duration::ZERO; // any monotonic clock
//! for action in due_actions(&desired, &holdings.actual(&up), &devices, &mut retries, now) {
//!     holdings.acted(&action, Outcome::Unknown); // in flight: counts as held
//!     // ... run it through the VM's backend, then:
//!     retries.succeeded(&action); // or retries.failed(&action, error, now)
//!     // ... and list the VM again: holdings.listed(vm, list)
//! }
//! ```

pub mod coordinator;
mod diff;
mod holdings;
mod retry;
pub mod routing;
mod unknown;

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
