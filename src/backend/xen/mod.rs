//! Xen (xl PVUSB). The live half: [`driver::XenDriver`] follows each domain through
//! xenstore watches (`presence`), [`vm::XenVm`] lists from xenstore and attaches and
//! detaches through [`xl`]; [`client`] is a native xenstored client ([`wire`] its
//! protocol), [`store`] what it reads of a domain. Registered in
//! [`crate::backend::drivers`], proven on a real Xen in the test bed (`xen-serve`). The pure
//! half it stands on:
//!
//! - [`usb_list`]: `xl usb-list DOMAIN` read into controllers and ports (bus and device
//!   are printed as zero-padded hex);
//! - [`xenstore`]: the port nodes `/local/domain/0/backend/qusb/<domid>/<ctrl>/port/<n>`
//!   (a busid like `1-1`, or empty), our marks beside them, and each port judged: free,
//!   ours, ours but stale (and how to clear it), or someone else's;
//! - [`decide`]: the port an attach goes to, or why there is none, with the fix.
//!
//! ## Which ports are ours, across a restart
//!
//! No state file: at attach usbroute writes a mark beside the port,
//! `.../qusb/<domid>/<ctrl>/usbroute/<n>` = `KEY BUSID BUS:ADDR`, and reads it back. A
//! port is ours while its busid equals the mark's; the plug is still there while the host
//! has a device at that busid with the mark's address. So after a restart the daemon finds
//! its devices (and those it must not touch) from xenstore and sysfs alone, and a port left
//! stale by a removal during the restart is told apart and cleared: by `xl usbdev-detach`
//! when another device sits at the busid now, else by writing `""` to the node (xl cannot
//! detach what is gone). A mark lives in the controller's backend directory, which libxl
//! removes with the controller or the domain, so it never outlives what it describes. A
//! port with a busid and no mark is the user's, listed as not ours and left alone.
//!
//! ## Attach modes
//!
//! libxl attaches by bus+address only, so the driver offers [`MODES`] = address and says it
//! follows ports and kinds itself: the plan places a rule by port or id by address, plug
//! by plug ([`BY_ADDRESS_ONLY`], what `emit` and a refused attach say).

pub mod client;
pub mod decide;
pub mod driver;
#[cfg(test)]
mod fake_xenstored;
mod presence;
pub mod store;
pub mod usb_list;
pub mod vm;
pub mod wire;
pub mod xenstore;
pub mod xl;

pub use driver::{driver, XenDriver};

use crate::backend::AttachMode;

/// The attach modes the Xen driver gives the plan (its `Capabilities`): address only,
/// the one identity libxl attaches by (`usbdev-attach hostbus= hostaddr=`). A rule with
/// `by = "port"` or `"id"` is honoured by usbroute itself, not by Xen: each plug it matches
/// is attached by its address under its own address key; when it is unplugged, its port
/// goes stale and is cleared ([`xenstore::judge`]), and the next plug is attached by its
/// new address (the driver's `follows_by_address`).
pub const MODES: [AttachMode; 1] = [AttachMode::Address];

/// What `why` and `emit` say of a Xen domain and a rule by port or id.
pub const BY_ADDRESS_ONLY: &str = "Xen attaches by bus+address only; usbroute serve \
    follows a port or a kind of device itself, attaching each plug by its address";
