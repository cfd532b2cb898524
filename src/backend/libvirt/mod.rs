//! The libvirt backend: libvirt domains driven over libvirt's own remote protocol
//! ([`rpc`], a native client: no libvirt C library, so a host without libvirt builds and
//! runs usbroute). The [`driver()`] shares one connection per URI among the domains there
//! (`link`), follows each domain by lifecycle events (`presence`), and hands the engine a
//! [`vm::LibvirtVm`] per running domain: a live `<hostdev>` ([`hostdev`]) under our user
//! alias ([`alias`]), detached by that alias, listed from the live domain XML
//! ([`domain_xml`]). The domain's QMP monitor is libvirt's and is never touched.
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
