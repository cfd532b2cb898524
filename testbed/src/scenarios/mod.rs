//! The scenarios: independent, named checks run against a booted guest.
//!
//! Adding one: write `scenarios/<name>.rs` with
//! `pub async fn run(bed: &mut Bed) -> anyhow::Result<()>` and add one
//! `scenario!(...)` line to [`all`]. The runner unplugs what a scenario plugged and
//! kills inner QEMUs afterwards, so each starts from the bare controllers.

use crate::bed::Bed;
use std::future::Future;
use std::pin::Pin;

pub mod bench;
mod bench_storm;
mod bench_udev;
mod daemon;
mod follow;
mod hotplug;
mod hub_subtree;
mod inner_qemu;
pub(crate) mod inventory;
mod libvirt;
mod libvirt_serve;
mod port_routing;
mod qemu_attach;
mod qemu_by_port;
mod qemu_fd_passing;
mod record_sysfs;
mod suspend;
mod twins;
mod vfio_ehci;
mod vfio_rollback;
mod vfio_support;
mod vfio_xhci;
mod xen_manual;
mod xen_serve;

/// A scenario's body.
pub type RunFn = for<'a> fn(&'a mut Bed) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + 'a>>;

/// One named check.
pub struct Scenario {
    /// Its name on the command line and in the report.
    pub name: &'static str,
    /// One line on what it proves.
    pub about: &'static str,
    /// The check.
    pub run: RunFn,
    /// Why the guest is rebooted after this scenario even when it restores cleanly:
    /// what it did leaves state the reset cannot see or undo.
    pub reboot_after: Option<&'static str>,
    /// Its own time limit (KVM base) when the runner's default is too short for it.
    pub timeout: Option<std::time::Duration>,
}

impl Scenario {
    /// Whether it runs on the Xen machine (dom0 + a PV domU) rather than the plain guest:
    /// every scenario named `xen-*` does, and those share one boot, after the others.
    pub fn needs_xen(&self) -> bool {
        self.name.starts_with("xen-")
    }
}

/// `scenario!("name", module, "what it proves")`.
macro_rules! scenario {
    ($name:literal, $module:ident, $about:literal) => {
        Scenario {
            name: $name,
            about: $about,
            run: |bed| Box::pin($module::run(bed)),
            reboot_after: None,
            timeout: None,
        }
    };
    ($name:literal, $module:ident, $about:literal, reboot_after: $why:literal) => {
        Scenario {
            reboot_after: Some($why),
            ..scenario!($name, $module, $about)
        }
    };
    ($name:literal, $module:ident, $about:literal, timeout_secs: $secs:literal) => {
        Scenario {
            timeout: Some(std::time::Duration::from_secs($secs)),
            ..scenario!($name, $module, $about)
        }
    };
}

/// Every scenario, in run order. One line each (kept so by `rustfmt::skip`).
#[rustfmt::skip]
pub fn all() -> Vec<Scenario> {
    vec![
        scenario!("hotplug", hotplug, "plug/unplug on xHCI, EHCI and UHCI reaches the guest kernel"),
        scenario!("inner-qemu", inner_qemu, "an inner QEMU runs in the guest (root and unprivileged) and takes a device with usb-host"),
        scenario!("daemon", daemon, "`usbroute serve` attaches on bind by address, detaches on remove, re-attaches on re-plug, survives SIGKILL"),
        scenario!("hub-subtree", hub_subtree, "a `hub:` rule gives the inner QEMU every device behind a two-level hub chain, now and later, never a hub; `why` says so"),
        scenario!("suspend", suspend, "S3 of the guest and system_wakeup: `usbroute serve` notices the resume and every device (by address, port, id) is held by the inner QEMU again", reboot_after: "a guest that slept in S3 while its inner QEMU held a USB disk fails READ CAPACITY (DID_ERROR) on every USB disk plugged later, on every controller, until it reboots (docs/testbed.md)"),
        scenario!("follow", follow, "a device re-enumerating with other ids on the same port within a rule's follow window goes to the same VM, `why` says what it followed; after the window it stays home"),
        scenario!("qemu-attach", qemu_attach, "`usbroute attach` by address gives a guest device to an inner QEMU (attached: true); detach gives it back"),
        scenario!("qemu-by-port", qemu_by_port, "`usbroute attach --by port` of an empty port: the inner QEMU takes the device on plug and re-plug, lets go on unplug"),
        scenario!("qemu-fd-passing", qemu_fd_passing, "an inner QEMU running as nobody gets a device through usbroute's fd passing"),
        scenario!("libvirt", libvirt, "a real libvirtd in the guest: `virsh attach-device --live` of a hand-written hostdev gives a guest device to a TCG domain (live XML, QEMU attached), detach by alias; a restart closes clients; the manual plug -> attached baseline; then usbroute serve manages the domain: plug, unplug, re-plug, domain restart, plugged while down, SIGKILL restart without duplicate, the user's hostdev left alone, libvirtd restart, and usbroute's plug -> attached beside the baseline"),
        scenario!("inventory", inventory, "`usbroute list --json` in the guest matches what QMP plugged"),
        scenario!("vfio-ehci", vfio_ehci, "the EHCI+UHCI IOMMU group goes to vfio-pci and back twice; devices re-enumerate"),
        scenario!("vfio-xhci", vfio_xhci, "the xHCI on vfio-pci runs in an inner QEMU, at start and by `controller attach`"),
        scenario!("vfio-rollback", vfio_rollback, "a bind failing after every member moved rolls back; the only keyboard is refused"),
        scenario!("port-routing", port_routing, "usbroute reads the guest xHCI's routing registers through live sysfs as dd does, refuses the non-Intel xHCI, changes no byte"),
        scenario!("twins", twins, "a USB 3 storage device and a USB 2 keyboard plugged in turn into one xHCI socket both go to the VM of one `port:CONTROLLER/N` rule"),
        scenario!("bench", bench, "plug -> attached on the real kernel: usbroute serve beside the minimal attacher (the floor), QEMU's own rescan and a udev rule with socat, in rounds, p50/p99 and target/bench/testbed.json; then a storm of 16 devices plugged and unplugged as fast as QMP allows, every device where the rules say", timeout_secs: 600),
        scenario!("record-sysfs", record_sysfs, "a recording made in the guest lists the same, in the guest and on the host"),
        scenario!("xen-manual", xen_manual, "real Xen PVUSB by hand: xl usbdev-attach gives a dom0 keyboard to a PV domU and detach takes it back; a surprise removal leaves the port holding the busid; the manual plug -> visible in the domU floor"),
        scenario!("xen-serve", xen_serve, "usbroute serve in dom0 gives the PV domU its keyboard through the Xen backend: plug, unplug (port freed), re-plug, domain destroyed and created, plugged while it is down, SIGKILL restart without duplicate and with a stale port cleared, the user's xl device left alone, a hub refused with why; usbroute's plug -> visible in the domU beside the floor; then emit --for xl lines accepted by xl create"),
    ]
}
