//! Kernel uevents from netlink, checked to come from the kernel.
//!
//! [`uevent`] parses a datagram into a typed [`UEvent`] (pure); [`netlink`] owns the
//! socket. The daemon acts on a USB device's `bind` (ready) and `remove` (gone) and
//! rescans sysfs on [`Received::Resync`], so no event is silently lost. [`feed`] says
//! which uevents the daemon hears: the kernel's, or (benches and tests on a recorded
//! host) datagrams in the kernel's format on a Unix socket of the daemon's own uid.

pub mod feed;
pub mod netlink;
pub mod uevent;

pub use feed::{UeventFeed, UeventListener, UeventSource};
pub use netlink::{classify, EventsError, Received, UeventSocket, DEFAULT_RECEIVE_BUFFER};
pub use uevent::{ParseError, Trigger, UEvent, UeventAction};
