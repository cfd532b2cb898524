//! Kernel uevents from netlink, checked to come from the kernel.
//!
//! [`uevent`] parses a datagram into a typed [`UEvent`] (pure); [`netlink`] owns the
//! socket. The daemon acts on a USB device's `bind` (ready) and `remove` (gone) and
//! rescans sysfs on [`Received::Resync`], so no event is silently lost.

pub mod netlink;
pub mod uevent;

pub use netlink::{classify, EventsError, Received, UeventSocket, DEFAULT_RECEIVE_BUFFER};
pub use uevent::{ParseError, Trigger, UEvent, UeventAction};
