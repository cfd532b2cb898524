//! What uevents leave for the daemon loop to do, coalesced between two turns of the loop:
//! the USB devices to read again, whether only a full scan will do, and whether the
//! engine must hear of it. A uevent costs the reading of its one device
//! ([`crate::inventory::patch`]), not a scan of all of sysfs; a full scan stays for the
//! start, a resync (events lost), a bus coming or going, and a patch that cannot be made.

use super::event_loop::Daemon;
use crate::events::{Trigger, UEvent, UeventAction};
use crate::inventory::{self, PortPath, UsbObject};
use std::collections::BTreeSet;
use std::sync::Mutex;
use tokio::sync::Notify;

/// Distinct devices waiting to be read again, at most; past it a full scan is due (a
/// storm over that many devices costs about a scan anyway, and the set stays bounded).
const MAX_PENDING: usize = 256;

/// Warnings remembered so that each is logged once; past this many, new ones are logged
/// each time they are seen rather than remembered.
const MAX_REMEMBERED_WARNINGS: usize = 512;

/// What one uevent asks of the inventory. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Ask {
    /// Nothing the inventory shows.
    Nothing,
    /// Read this device again. `engine`: hand the picture to the engine afterwards (a
    /// device ready, gone or changed: [`UEvent::trigger`]); the other events only keep
    /// the picture true (a device's `add`, which races with usbfs and waits for its
    /// `bind`; its interfaces; a network interface or disk below it).
    Device { port: PortPath, engine: bool },
    /// Only a full scan reads it: a bus came or went, a device moved.
    Scan,
}

/// What `ev` asks of the inventory.
pub(super) fn ask(ev: &UEvent) -> Ask {
    let engine = ev.trigger() != Trigger::Ignore;
    let usb = matches!(ev.devtype.as_deref(), Some("usb_device" | "usb_interface"));
    let object = match ev.subsystem.as_deref() {
        Some("usb") if usb => inventory::usb_object(&ev.devpath),
        // A device's host network interfaces and disks are part of its listing.
        Some("net" | "block")
            if matches!(
                ev.action,
                UeventAction::Add | UeventAction::Remove | UeventAction::Move
            ) =>
        {
            // `usbN` alone is a root hub by name, but this is a network interface.
            inventory::usb_object(&ev.devpath).filter(|o| matches!(o, UsbObject::Device(_)))
        }
        _ => None,
    };
    match object {
        Some(UsbObject::Device(_)) if ev.is_usb_device() && ev.action == UeventAction::Move => {
            Ask::Scan
        }
        Some(UsbObject::Device(port)) => Ask::Device { port, engine },
        Some(UsbObject::Bus(_)) => Ask::Scan,
        // The engine must hear of a device event, even one whose path is not understood.
        None if engine => Ask::Scan,
        None => Ask::Nothing,
    }
}

/// The work waiting for the loop.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Pending {
    /// Why a full scan is due, if one is.
    pub(super) scan: Option<&'static str>,
    /// The devices to read again.
    pub(super) devices: BTreeSet<PortPath>,
    /// Whether the engine must be handed the picture afterwards.
    pub(super) engine: bool,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.scan.is_none() && self.devices.is_empty()
    }
}

/// Pending work shared by the uevent listener (which adds) and the loop (which takes).
/// Marking, not queueing: a storm coalesces into one turn, and since a device is read as
/// it is when the turn comes, no decision is lost however many events arrive.
#[derive(Debug, Default)]
pub(super) struct Changes {
    pending: Mutex<Pending>,
    notify: Notify,
}

impl Changes {
    /// Add what `ev` asks; `false` when it asks nothing.
    pub(super) fn note(&self, ev: &UEvent) -> bool {
        let ask = ask(ev);
        if ask == Ask::Nothing {
            return false;
        }
        {
            let mut p = self.lock();
            match ask {
                Ask::Nothing => {}
                Ask::Scan => p.scan = Some("uevent"),
                Ask::Device { port, engine } => {
                    p.devices.insert(port);
                    p.engine |= engine;
                    if p.devices.len() > MAX_PENDING {
                        p.scan = Some("a storm of uevents");
                    }
                }
            }
        }
        self.notify.notify_one();
        true
    }

    /// Events may have been lost: only a full scan is sure to see everything.
    pub(super) fn resync(&self) {
        self.lock().scan = Some("uevents may be lost");
        self.notify.notify_one();
    }

    /// The work pending, once there is some. Cancel-safe: work is taken only in the poll
    /// that returns it.
    pub(super) async fn next(&self) -> Pending {
        loop {
            let taken = std::mem::take(&mut *self.lock());
            if !taken.is_empty() {
                return taken;
            }
            self.notify.notified().await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A panic while holding it leaves plain data behind: still usable.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Daemon {
    /// Bring the picture up to date with what the uevents asked, and hand it to the
    /// engine when one of them was a device ready, gone or changed.
    pub(super) fn on_changes(&mut self, pending: Pending) {
        if let Some(why) = pending.scan {
            return self.rescan(why);
        }
        if self.scan_failure.is_some() {
            // The picture is an old one: only a full scan makes it current again.
            return self.rescan("uevent");
        }
        match inventory::patch(&self.options.root, &mut self.snapshot, &pending.devices) {
            Ok(patched) => {
                tracing::debug!(
                    devices = pending.devices.len(),
                    changed = patched.changed,
                    "re-read the devices of the uevents"
                );
                self.note_warnings(patched.warnings);
                if pending.engine {
                    // The plan reads mounted disks only through a device's disks.
                    let disks = self
                        .snapshot
                        .devices
                        .iter()
                        .any(|d| !d.block_devices.is_empty());
                    self.tell_engine(disks);
                }
            }
            Err(why) => {
                tracing::debug!(
                    "{}; scanning sysfs in full",
                    crate::error_chain::one_line(&why)
                );
                self.rescan("uevent");
            }
        }
    }

    /// Log each warning not seen before, once.
    fn note_warnings(&mut self, warnings: Vec<String>) {
        for w in warnings {
            if self.snapshot.warnings.contains(&w) {
                continue;
            }
            tracing::warn!("sysfs: {w}");
            if self.snapshot.warnings.len() < MAX_REMEMBERED_WARNINGS {
                self.snapshot.warnings.push(w);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(action: &str, devpath: &str, subsystem: &str, devtype: Option<&str>) -> UEvent {
        let mut text = format!("{action}@{devpath}\0SUBSYSTEM={subsystem}\0");
        if let Some(t) = devtype {
            text.push_str(&format!("DEVTYPE={t}\0"));
        }
        UEvent::parse(text.as_bytes()).expect("a well-formed uevent")
    }

    const DEV: &str = "/devices/pci0000:00/0000:00:14.0/usb1/1-3";

    fn device(engine: bool) -> Ask {
        Ask::Device {
            port: "1-3".parse().unwrap(),
            engine,
        }
    }

    #[test]
    fn a_device_ready_gone_or_changed_is_read_again_and_told_to_the_engine() {
        for action in ["bind", "remove", "change", "unbind"] {
            let ev = event(action, DEV, "usb", Some("usb_device"));

            assert_eq!(ask(&ev), device(true), "{action}");
        }
    }

    #[test]
    fn a_device_added_its_interfaces_and_its_disks_are_read_again_for_the_picture_only() {
        let cases = [
            event("add", DEV, "usb", Some("usb_device")),
            event(
                "bind",
                &format!("{DEV}/1-3:1.0"),
                "usb",
                Some("usb_interface"),
            ),
            event(
                "unbind",
                &format!("{DEV}/1-3:1.0"),
                "usb",
                Some("usb_interface"),
            ),
            event("add", &format!("{DEV}/1-3:1.0/net/usb0"), "net", None),
            event(
                "add",
                &format!("{DEV}/1-3:1.0/host6/target6:0:0/6:0:0:0/block/sdb"),
                "block",
                Some("disk"),
            ),
        ];

        for ev in cases {
            assert_eq!(ask(&ev), device(false), "{} {}", ev.action, ev.devpath);
        }
    }

    #[test]
    fn a_bus_coming_or_a_device_moving_takes_a_full_scan() {
        let root_hub = event(
            "add",
            "/devices/pci0000:00/0000:00:14.0/usb1",
            "usb",
            Some("usb_device"),
        );
        let moved = event("move", DEV, "usb", Some("usb_device"));

        assert_eq!(ask(&root_hub), Ask::Scan);
        assert_eq!(ask(&moved), Ask::Scan);
    }

    #[test]
    fn what_the_inventory_does_not_show_asks_nothing() {
        let cases = [
            event("add", "/devices/virtual/mem/null", "mem", None),
            event(
                "add",
                &format!("{DEV}/1-3:1.0/0003:046D:C016.0001/input/input5"),
                "input",
                None,
            ),
            event("bind", "/devices/pci0000:00/0000:00:14.0", "pci", None),
            event(
                "add",
                "/devices/pci0000:00/0000:00:1f.6/net/usb1",
                "net",
                None,
            ),
            event(
                "change",
                &format!("{DEV}/1-3:1.0/host6/target6:0:0/6:0:0:0/block/sdb"),
                "block",
                Some("disk"),
            ),
        ];

        for ev in cases {
            assert_eq!(ask(&ev), Ask::Nothing, "{} {}", ev.action, ev.devpath);
        }
    }

    #[tokio::test]
    async fn a_storm_of_events_coalesces_into_one_turn_per_device() {
        let changes = Changes::default();
        for action in ["add", "bind", "change", "bind"] {
            changes.note(&event(action, DEV, "usb", Some("usb_device")));
        }
        changes.note(&event(
            "add",
            &format!("{DEV}.2"),
            "usb",
            Some("usb_device"),
        ));

        let pending = changes.next().await;

        let ports: Vec<String> = pending.devices.iter().map(ToString::to_string).collect();
        assert_eq!(
            (ports, pending.engine, pending.scan),
            (vec!["1-3".to_string(), "1-3.2".to_string()], true, None)
        );
    }

    #[tokio::test]
    async fn a_resync_asks_for_a_full_scan() {
        let changes = Changes::default();
        changes.note(&event("bind", DEV, "usb", Some("usb_device")));
        changes.resync();

        let pending = changes.next().await;

        assert_eq!(pending.scan, Some("uevents may be lost"));
    }
}
