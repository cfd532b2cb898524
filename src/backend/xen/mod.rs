//! Xen (xl PVUSB): the **pure half** of a backend. It reads what xl and xenstore say and
//! decides; it does no I/O and is not registered in [`crate::backend::drivers`] (a
//! backend that cannot act must not be). The live half (a `VmDriver` watching
//! `@introduceDomain`/`@releaseDomain`, a `VmBackend` running `xl usbdev-attach`) is not
//! built yet; what it will stand on is here:
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
//! libxl attaches by bus+address only: see [`MODES`] and [`BY_ADDRESS_ONLY`].

pub mod decide;
pub mod usb_list;
pub mod xenstore;

use crate::backend::AttachMode;

/// The attach modes the Xen driver will offer the plan (its `Capabilities`): all three.
/// libxl knows only bus+address, so usbroute carries out `by = "port"` and `by = "id"`
/// itself: each plug that a rule gives the domain is attached by its address, the mark
/// keeps the rule's key, and a re-plug (a new address) finds the old port stale, clears it
/// and attaches the new plug.
pub const MODES: [AttachMode; 3] = [AttachMode::Address, AttachMode::Port, AttachMode::Id];

/// What `why` and `emit` say of a Xen domain's attach mode.
pub const BY_ADDRESS_ONLY: &str = "Xen attaches by bus+address only; usbroute serve \
    follows a port or a kind of device itself, attaching each plug by its address";
