//! The kernel's uevent message, parsed. Pure: bytes in, a typed [`UEvent`] or a reason out.
//!
//! Wire format (lib/kobject_uevent.c): `ACTION@DEVPATH\0KEY=VALUE\0KEY=VALUE\0...`, at most
//! `UEVENT_BUFFER_SIZE` (2048) bytes of environment. udevd's re-broadcasts on group 2 start
//! with `libudev\0` instead; we never accept those (they are not the kernel's word).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// What happened to a kernel object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UeventAction {
    /// The object appeared (a USB device is not usable yet: wait for `bind`).
    Add,
    /// The object is gone.
    Remove,
    /// A driver bound to the object: for a `usb_device`, it is ready to be used.
    Bind,
    /// A driver let go of the object.
    Unbind,
    /// Some attribute changed.
    Change,
    /// The object moved (renamed) in the hierarchy.
    Move,
    /// The object came back online.
    Online,
    /// The object went offline.
    Offline,
    /// An action this code does not know (newer kernels may add some); kept, never fatal.
    Other(String),
}

impl UeventAction {
    fn parse(s: &str) -> UeventAction {
        match s {
            "add" => UeventAction::Add,
            "remove" => UeventAction::Remove,
            "bind" => UeventAction::Bind,
            "unbind" => UeventAction::Unbind,
            "change" => UeventAction::Change,
            "move" => UeventAction::Move,
            "online" => UeventAction::Online,
            "offline" => UeventAction::Offline,
            other => UeventAction::Other(other.to_string()),
        }
    }

    /// The kernel's word for it.
    pub fn as_str(&self) -> &str {
        match self {
            UeventAction::Add => "add",
            UeventAction::Remove => "remove",
            UeventAction::Bind => "bind",
            UeventAction::Unbind => "unbind",
            UeventAction::Change => "change",
            UeventAction::Move => "move",
            UeventAction::Online => "online",
            UeventAction::Offline => "offline",
            UeventAction::Other(s) => s,
        }
    }
}

impl fmt::Display for UeventAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One kernel uevent, with the fields usbroute reads typed and every key kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UEvent {
    /// What happened.
    pub action: UeventAction,
    /// The object's path under /sys, as the kernel names it (`/devices/pci0000:00/.../1-3`).
    pub devpath: String,
    /// `SUBSYSTEM` (`usb`, `net`, `mem`...), if given.
    pub subsystem: Option<String>,
    /// `DEVTYPE` (`usb_device`, `usb_interface`), if given.
    pub devtype: Option<String>,
    /// `BUSNUM`, decimal (the kernel zero-pads it: `001`), if given and valid.
    pub busnum: Option<u8>,
    /// `DEVNUM`, decimal (zero-padded: `006`), if given and valid.
    pub devnum: Option<u16>,
    /// `PRODUCT` (`46d/c016/340`: vendor/product/bcdDevice in hex without padding), if given.
    pub product: Option<String>,
    /// `SEQNUM`, the kernel's event counter, if given and valid.
    pub seqnum: Option<u64>,
    /// Every `KEY=VALUE` pair, including the ones above.
    pub env: BTreeMap<String, String>,
}

/// Why a message is not a kernel uevent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Empty datagram.
    #[error("empty message")]
    Empty,
    /// udevd's re-broadcast (`libudev` header): not the kernel's own message.
    #[error("a udevd (libudev) message, not a kernel uevent")]
    Libudev,
    /// The first field is not `ACTION@DEVPATH`.
    #[error("header `{0}` is not ACTION@DEVPATH")]
    BadHeader(String),
    /// Not UTF-8 where the format needs text.
    #[error("header is not UTF-8")]
    NotUtf8,
    /// `ACTION=` or `DEVPATH=` in the body disagrees with the header.
    #[error("body says {key}={body} but the header says {header}")]
    Inconsistent {
        /// Which key.
        key: &'static str,
        /// Its value in the body.
        body: String,
        /// Its value in the header.
        header: String,
    },
}

impl UEvent {
    /// Parse one netlink datagram. Never panics, whatever the bytes.
    pub fn parse(bytes: &[u8]) -> Result<UEvent, ParseError> {
        let mut fields = bytes.split(|b| *b == 0).filter(|f| !f.is_empty());
        let header = fields.next().ok_or(ParseError::Empty)?;
        if header == b"libudev" {
            return Err(ParseError::Libudev);
        }
        let header = std::str::from_utf8(header).map_err(|_| ParseError::NotUtf8)?;
        let (action, devpath) = header
            .split_once('@')
            .filter(|(a, p)| !a.is_empty() && p.starts_with('/'))
            .ok_or_else(|| ParseError::BadHeader(truncate(header)))?;
        // Values are kernel-made text; a stray non-UTF-8 byte in one value (a device's
        // name string) must not lose the whole event, so decode lossily.
        let env: BTreeMap<String, String> = fields
            .filter_map(|f| {
                let text = String::from_utf8_lossy(f);
                let (k, v) = text.split_once('=')?;
                Some((k.to_string(), v.to_string()))
            })
            .collect();
        for (key, header_value) in [("ACTION", action), ("DEVPATH", devpath)] {
            if let Some(body) = env.get(key).filter(|b| b.as_str() != header_value) {
                return Err(ParseError::Inconsistent {
                    key,
                    body: truncate(body),
                    header: truncate(header_value),
                });
            }
        }
        let text = |k: &str| env.get(k).cloned();
        Ok(UEvent {
            action: UeventAction::parse(action),
            devpath: devpath.to_string(),
            subsystem: text("SUBSYSTEM"),
            devtype: text("DEVTYPE"),
            busnum: env.get("BUSNUM").and_then(|v| decimal(v)),
            devnum: env.get("DEVNUM").and_then(|v| decimal(v)),
            product: text("PRODUCT"),
            seqnum: env.get("SEQNUM").and_then(|v| decimal(v)),
            env,
        })
    }

    /// The kernel name of the object (last devpath component: `1-3.4`, `null`).
    pub fn kernel_name(&self) -> &str {
        self.devpath.rsplit('/').next().unwrap_or(&self.devpath)
    }

    /// `true` for a whole USB device (not one of its interfaces).
    pub fn is_usb_device(&self) -> bool {
        self.subsystem.as_deref() == Some("usb") && self.devtype.as_deref() == Some("usb_device")
    }

    /// What the daemon should do about this event.
    pub fn trigger(&self) -> Trigger {
        if !self.is_usb_device() {
            return Trigger::Ignore;
        }
        match self.action {
            // `add` races: usbfs may not be ready; the kernel says `bind` when it is.
            UeventAction::Bind => Trigger::DeviceReady,
            UeventAction::Remove => Trigger::DeviceGone,
            // A changed configuration or a driver leaving may change what a rule sees.
            UeventAction::Change | UeventAction::Unbind | UeventAction::Move => Trigger::Rescan,
            _ => Trigger::Ignore,
        }
    }
}

/// What a uevent asks of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A USB device is ready (its `bind`): read it again and reconcile, it may go to a VM.
    DeviceReady,
    /// A USB device was removed: drop it (and what is behind it), detach it from its VM.
    DeviceGone,
    /// Something about a USB device changed: read it again and reconcile.
    Rescan,
    /// Not about a USB device, or not yet actionable (`add`).
    Ignore,
}

/// Decimal with leading zeros (the kernel pads BUSNUM/DEVNUM to 3 digits); never octal.
fn decimal<T: std::str::FromStr>(s: &str) -> Option<T> {
    (!s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BIND: &[u8] = b"bind@/devices/pci0000:00/0000:00:14.0/usb1/1-3\0ACTION=bind\0DEVPATH=/devices/pci0000:00/0000:00:14.0/usb1/1-3\0SUBSYSTEM=usb\0DEVNAME=bus/usb/001/006\0DEVTYPE=usb_device\0DRIVER=usb\0PRODUCT=46d/c016/340\0TYPE=0/0/0\0BUSNUM=001\0DEVNUM=006\0SEQNUM=4242\0MAJOR=189\0MINOR=5\0";

    #[test]
    fn parse_usb_bind_types_every_field() {
        let ev = UEvent::parse(BIND).unwrap();

        assert_eq!(ev.action, UeventAction::Bind);
        assert_eq!(ev.devpath, "/devices/pci0000:00/0000:00:14.0/usb1/1-3");
        assert_eq!(ev.kernel_name(), "1-3");
        assert_eq!(ev.subsystem.as_deref(), Some("usb"));
        assert_eq!(ev.devtype.as_deref(), Some("usb_device"));
        assert_eq!(ev.product.as_deref(), Some("46d/c016/340"));
        assert_eq!(
            (ev.busnum, ev.devnum, ev.seqnum),
            (Some(1), Some(6), Some(4242))
        );
        assert_eq!(ev.env.get("MAJOR").map(String::as_str), Some("189"));
    }

    #[test]
    fn parse_zero_padded_devnum_is_decimal_not_octal() {
        let ev = UEvent::parse(b"bind@/devices/x/1-1\0DEVNUM=010\0BUSNUM=009\0").unwrap();

        assert_eq!((ev.busnum, ev.devnum), (Some(9), Some(10)));
    }

    #[test]
    fn usb_device_bind_is_ready_and_add_is_not() {
        let bind = UEvent::parse(BIND).unwrap();
        let add = UEvent::parse(&BIND.to_vec().replace_action(b"add")).unwrap();

        assert_eq!(bind.trigger(), Trigger::DeviceReady);
        assert_eq!(add.trigger(), Trigger::Ignore);
    }

    #[test]
    fn usb_device_remove_is_gone() {
        let ev = UEvent::parse(b"remove@/devices/x/usb1/1-3\0SUBSYSTEM=usb\0DEVTYPE=usb_device\0")
            .unwrap();

        assert_eq!(ev.trigger(), Trigger::DeviceGone);
    }

    #[test]
    fn usb_interface_bind_is_ignored() {
        let ev = UEvent::parse(
            b"bind@/devices/x/usb1/1-3/1-3:1.0\0SUBSYSTEM=usb\0DEVTYPE=usb_interface\0",
        )
        .unwrap();

        assert_eq!(ev.trigger(), Trigger::Ignore);
    }

    #[test]
    fn libudev_message_is_refused() {
        let err = UEvent::parse(b"libudev\0\xfe\xed\xca\xfe rest").unwrap_err();

        assert_eq!(err, ParseError::Libudev);
    }

    #[test]
    fn header_without_at_is_refused() {
        let err = UEvent::parse(b"ACTION=add\0DEVPATH=/x\0").unwrap_err();

        assert!(matches!(err, ParseError::BadHeader(_)));
    }

    #[test]
    fn body_action_disagreeing_with_header_is_refused() {
        let err = UEvent::parse(b"add@/devices/x\0ACTION=remove\0").unwrap_err();

        assert!(matches!(
            err,
            ParseError::Inconsistent { key: "ACTION", .. }
        ));
    }

    #[test]
    fn unknown_action_is_kept() {
        let ev = UEvent::parse(b"frobnicate@/devices/x\0").unwrap();

        assert_eq!(ev.action, UeventAction::Other("frobnicate".into()));
    }

    #[test]
    fn non_utf8_value_is_kept_lossily() {
        let ev = UEvent::parse(b"change@/devices/x\0NAME=a\xffb\0SUBSYSTEM=usb\0").unwrap();

        assert_eq!(ev.subsystem.as_deref(), Some("usb"));
        assert_eq!(ev.env["NAME"], "a\u{fffd}b");
    }

    trait ReplaceAction {
        fn replace_action(self, action: &[u8]) -> Vec<u8>;
    }
    impl ReplaceAction for Vec<u8> {
        fn replace_action(self, action: &[u8]) -> Vec<u8> {
            let text = String::from_utf8(self).unwrap();
            let a = String::from_utf8(action.to_vec()).unwrap();
            text.replace("bind@", &format!("{a}@"))
                .replace("ACTION=bind", &format!("ACTION={a}"))
                .into_bytes()
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = UEvent::parse(&bytes);
        }

        #[test]
        fn parse_never_panics_on_near_valid_messages(
            action in "[a-z@=]{0,8}",
            path in "/?[a-z0-9:./@=-]{0,40}",
            keys in proptest::collection::vec(("[A-Z@=]{0,8}", "[ -~]{0,12}"), 0..12),
        ) {
            let mut msg = format!("{action}@{path}\0").into_bytes();
            for (k, v) in &keys {
                msg.extend_from_slice(format!("{k}={v}\0").as_bytes());
            }
            let _ = UEvent::parse(&msg);
        }

        #[test]
        fn parse_round_trips_well_formed_events(
            action in "(add|remove|bind|unbind|change)",
            path in "/devices/[a-z0-9:.-]{1,30}",
            busnum in 1u8..=255,
            devnum in 1u16..=999,
        ) {
            let msg = format!(
                "{action}@{path}\0ACTION={action}\0DEVPATH={path}\0SUBSYSTEM=usb\0DEVTYPE=usb_device\0BUSNUM={busnum:03}\0DEVNUM={devnum:03}\0"
            );

            let ev = UEvent::parse(msg.as_bytes()).unwrap();

            prop_assert_eq!(ev.action.as_str(), action.as_str());
            prop_assert_eq!(ev.devpath, path);
            prop_assert_eq!((ev.busnum, ev.devnum), (Some(busnum), Some(devnum)));
        }
    }
}
