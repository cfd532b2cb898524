//! Engine: diff desired against actual, act through backends, retry with backoff.
//!
//! The pure parts decide; the coordinator ([`coordinator`]) only carries their decisions
//! to the VMs and the host and their answers back:
//! - [`reconcile`]`(desired, actual, devices) -> Vec<Action>`: the diff (see its module
//!   for the guarantees: nothing right is touched, nothing attached twice, detach before
//!   attach, foreign usb-host devices left alone);
//! - [`Holdings`]: what each VM holds — its last answered list plus attaches in flight or
//!   of unknown outcome — turned into the diff's [`Actual`];
//! - [`Follows`]: devices that left under a rule's `follow`, and the plugs that follow
//!   them (bindings the plan reads; expired departures dropped on the next change, no timer);
//! - [`RetryBook`]: capped exponential backoff per (VM, attach key) with the last error;
//! - [`due_actions`]: one round = diff minus what is still backing off;
//! - [`routing`]: the port-routing reconciler (the profile in force against XUSB2PR),
//!   behind the small [`routing::PortRouting`] trait;
//! - [`Groups`]: the controller-group reconciler, `[[controller]]` rules' IOMMU groups on vfio-pci
//!   (bind, restore, or keep while the VM runs), carried out through a [`ControllerHost`];
//!   [`owned_by_running`] is the one answer to "which PCI functions do running VMs own";
//! - queries on the published [`Status`](coordinator::Status) (who holds a device, whether
//!   an override has settled, a rule's attach mode) in `status.rs`.
//!
//! A daemon loop that does its own I/O drives them like this:
//!
//! ```
//! use std::collections::{BTreeMap, BTreeSet};
//! use std::time::Duration;
//! use usbroute::config::Config;
//! use usbroute::engine::{
//!     due_actions, owned_by_running, Action, BackoffPolicy, Holdings, Outcome, RetryBook,
//! };
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
//! // The daemon passes each rule's whole IOMMU group (`vfio::held_by_rules`).
//! let owned = owned_by_running(&config.controllers, &up);
//! let desired = plan(&PlanInput {
//!     rules: &config.rules,
//!     devices: &devices,
//!     mounted_disks: &mounted,
//!     vms_up: &up,
//!     backends: &Default::default(),
//!     overrides: &overrides,
//!     follows: &Default::default(), // Follows::bindings()
//!     controllers_owned: &owned,
//! });
//! let mut holdings = Holdings::default();
//! holdings.listed("win", vec![/* backend.list().await? */]);
//! let mut retries = RetryBook::new(BackoffPolicy::default());
//! let now = Duration::ZERO; // any monotonic clock
//! for action in due_actions(&desired, &holdings.actual(&up), &devices, &mut retries, now) {
//!     let id = "the backend's name for it"; // backend.device_id(action.key())
//!     holdings.acted(&action, id, Outcome::Unknown); // in flight: counts as held
//!     // ... run it through the VM's backend, then:
//!     retries.succeeded(&action); // or retries.failed(&action, id, error, now)
//!     // ... and list the VM again: holdings.listed(vm, list)
//! }
//! ```

pub mod controller_host;
pub mod controllers;
pub mod coordinator;
mod diff;
mod follow;
mod group_work;
mod handle;
mod holdings;
mod retry;
pub mod routing;
mod status;
mod unknown;
mod vm_worker;

pub use controller_host::{
    carry_out, ControllerHost, Direction, GroupOutcome, SharedControllerHost, VfioControllers,
};
pub use controllers::{owned_by_running, ControllerConfig, GroupStep, Groups};
pub use diff::{reconcile, renewals, Action, Actual, VmView};
pub use follow::{DeviceChange, Follows, Moment};
pub use holdings::{Holdings, Outcome};
pub use retry::{BackoffPolicy, Pending, RetryBook};
pub use status::{DeviceState, Settled};

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
