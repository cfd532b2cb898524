//! The libvirt backend's pure half (issue 15): the `<hostdev>` XML usbroute attaches, its
//! user aliases (an [`AttachKey`] spelled the way libvirt accepts, and read back), and the
//! live domain XML (`virsh dumpxml`) read into a listing. No I/O and no driver yet: the
//! live backend (connection, events, attach and detach by alias) is built on these, and
//! registers in `backend::drivers` only then, since a backend that cannot act must not be
//! registered.
//!
//! libvirt names a host USB device by bus and device number or by vendor and product id;
//! it has no host-port form (QEMU's `hostport`), so a libvirt VM attaches by address or id
//! only ([`MODES`]): a rule asking for `by = "port"` keeps its device home with a reason.

pub mod alias;
pub mod domain_xml;
pub mod driver;
pub mod hostdev;
mod link;
mod presence;
pub mod rpc;
pub mod vm;

pub use driver::{driver, LibvirtDriver};

use crate::backend::AttachMode;

/// The attach modes libvirt can carry out: bus+device (`<address bus= device=>`) and
/// vendor+product (`<vendor id=>`, `<product id=>`). Not [`AttachMode::Port`]: libvirt's
/// `<hostdev>` has no way to name a host port. The live driver reports these.
pub const MODES: [AttachMode; 2] = [AttachMode::Address, AttachMode::Id];
