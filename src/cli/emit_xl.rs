//! `usbroute emit SELECTOR --for xl`: the `usbctrl=` and `usbdev=` lines of an xl.cfg
//! that give a Xen domain the device at creation.
//!
//! xl reads `hostbus=`/`hostaddr=` with `strtoul(.., 0)`: a leading zero means octal (`010`
//! is 8, `08` is 0), so the numbers are written plain decimal, never padded. libxl starts
//! the device model that serves PVUSB only when a domain is created, so the `usbctrl=` line
//! is needed even when usbroute serve does the attaching.

use super::output::print_json;
use super::vm_target::{attach_target, Target};
use crate::backend::qemu::usb_host;
use crate::backend::xen::BY_ADDRESS_ONLY;
use crate::backend::AttachMode;
use crate::inventory::Snapshot;
use crate::selector::Selector;
use anyhow::anyhow;
use serde::Serialize;

/// The controller spec `emit --for xl` gives: QEMU's PVUSB backend, USB 2.0 (PVUSB's
/// highest version; it carries low, full and high speed), libxl's default 8 ports.
pub const USBCTRL: &str = "type=qusb,version=2,ports=8";

/// What `emit --for xl` prints (`--json`: field names are stable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EmittedXl {
    /// `xl`.
    #[serde(rename = "for")]
    pub hypervisor: &'static str,
    /// The attach mode asked for: `address`, `port` or `id` (xl itself knows only address).
    pub by: AttachMode,
    /// The device as messages name it.
    pub what: String,
    /// `false` when the device is not on this host now (by port or id, named exactly).
    pub present: bool,
    /// The device's bus, when present.
    pub hostbus: Option<u8>,
    /// The device's address on it, when present.
    pub hostaddr: Option<u16>,
    /// The controller spec (`type=qusb,version=2,ports=8`).
    pub usbctrl: String,
    /// The device spec (`hostbus=1,hostaddr=5`); `None` when the device is absent.
    pub usbdev: Option<String>,
    /// The xl.cfg lines, in order: `usbctrl=[...]`, then `usbdev=[...]` when present.
    pub xl_cfg: Vec<String>,
    /// Said of the device's speed, when PVUSB cannot match it (a SuperSpeed device).
    pub note: Option<String>,
}

/// The xl.cfg lines for the one device `selector` names, found as `attach` finds it (the
/// same errors for none, several or a hub).
pub(super) fn emit_xl(
    snapshot: &Snapshot,
    selector: &Selector,
    mode: AttachMode,
) -> anyhow::Result<EmittedXl> {
    let (what, plug, speed) = match attach_target(snapshot, selector, mode)? {
        Target::Device(device) => {
            let request = usb_host::request_for(&device, mode).map_err(|e| anyhow!(e))?;
            let plug = device.address.map(|a| (device.bus, a));
            (request.what, plug, device.speed_mbps)
        }
        // Not the request's words: they promise QEMU's rescan, which xl does not have.
        Target::Absent(_) => (format!("`{selector}` (not on this host now)"), None, None),
    };
    let usbdev = plug.map(|(bus, address)| usbdev_spec(bus, address));
    let mut xl_cfg = vec![format!("usbctrl=[\"{USBCTRL}\"]")];
    xl_cfg.extend(usbdev.iter().map(|d| format!("usbdev=[\"{d}\"]")));
    Ok(EmittedXl {
        hypervisor: "xl",
        by: mode,
        what,
        present: plug.is_some(),
        hostbus: plug.map(|p| p.0),
        hostaddr: plug.map(|p| p.1),
        usbctrl: USBCTRL.to_string(),
        usbdev,
        xl_cfg,
        note: speed.filter(|s| s.0 > 480.0).map(|s| {
            format!(
                "the device runs at {} Mb/s; PVUSB is USB 2.0 at most, so it is offered a USB 2 port",
                s.0
            )
        }),
    })
}

/// `text` as `# ` comment lines of at most ~88 columns, broken between words.
fn comment(text: &str) -> String {
    let mut out = String::new();
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.len() + 1 + word.len() > 88 && line.len() > 1 {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
    out
}

/// `hostbus=B,hostaddr=D` in plain decimal: xl would read a leading zero as octal.
pub fn usbdev_spec(bus: u8, address: u16) -> String {
    format!("hostbus={bus},hostaddr={address}")
}

impl EmittedXl {
    /// The lines with comments saying what they do and what to change.
    pub fn to_text(&self) -> String {
        let how =
            match (self.by, self.present) {
                (AttachMode::Address, _) => {
                    "By address: exactly this plug; after a re-plug or a reboot it has another \
                 address."
                        .to_string()
                }
                (by, true) => {
                    format!(
                "By {}: xl cannot; the usbdev line holds only this plug. To follow the {}, \
                 leave usbdev out and give usbroute serve a rule with by = \"{}\".",
                by.name(),
                if by == AttachMode::Port { "port" } else { "kind of device" },
                by.name()
            )
                }
                (by, false) => format!(
                    "Not on this host now, so no usbdev line: give usbroute serve a rule with \
                 by = \"{}\".",
                    by.name()
                ),
            };
        let mut text = format!(
            "xl.cfg: {}. libxl starts the device model that serves PVUSB only when the \
             domain is created, so the usbctrl line must be there from the start. {how} \
             {BY_ADDRESS_ONLY}.",
            self.what
        );
        if let Some(note) = &self.note {
            text.push_str(&format!(" Note: {note}."));
        }
        let mut out = comment(&text);
        for line in &self.xl_cfg {
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    /// Prints it as text or JSON.
    pub(super) fn print(&self, json: bool) -> anyhow::Result<()> {
        if json {
            print_json(self)?;
        } else {
            print!("{}", self.to_text());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sysfs::SysfsRoot;

    /// The recorded test-bed guest (tests/fixtures/README.md): 1-2.1 a mouse at address 5,
    /// 1-2.3.1 a keyboard at address 8, 2-3 a USB 3 disk.
    fn emitted(selector: &str, mode: AttachMode) -> anyhow::Result<EmittedXl> {
        let root = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/guest-xhci-ehci"
        );
        let snapshot = crate::inventory::scan(&SysfsRoot::new(root));
        emit_xl(&snapshot, &selector.parse().unwrap(), mode)
    }

    #[test]
    fn emit_by_address_gives_the_controller_and_the_device_lines() {
        let e = emitted("port:1-2.1", AttachMode::Address).unwrap();

        assert_eq!(
            e.xl_cfg,
            [
                "usbctrl=[\"type=qusb,version=2,ports=8\"]",
                "usbdev=[\"hostbus=1,hostaddr=5\"]"
            ]
        );
    }

    #[test]
    fn numbers_are_plain_decimal_never_zero_padded_because_xl_reads_octal() {
        for (bus, address, spec) in [
            (1, 8, "hostbus=1,hostaddr=8"),
            (1, 10, "hostbus=1,hostaddr=10"),
            (10, 100, "hostbus=10,hostaddr=100"),
        ] {
            assert_eq!(usbdev_spec(bus, address), spec);
        }
    }

    proptest::proptest! {
        #[test]
        fn every_number_written_reads_back_the_same_through_strtoul_base_0(bus in 1u8.., address in 1u16..) {
            let spec = usbdev_spec(bus, address);

            for (value, expected) in spec.split(',').map(|kv| kv.split_once('=').unwrap().1).zip([u32::from(bus), u32::from(address)]) {
                proptest::prop_assert!(!value.starts_with('0'), "{spec}");
                proptest::prop_assert_eq!(value.parse::<u32>().ok(), Some(expected));
            }
        }
    }

    #[test]
    fn emit_by_port_keeps_this_plug_and_points_to_a_rule() {
        let e = emitted("port:1-2.3.1", AttachMode::Port).unwrap();

        assert_eq!(e.usbdev.as_deref(), Some("hostbus=1,hostaddr=8"));
        let prose = e.to_text().replace("\n# ", " ");
        assert!(prose.contains("rule with by = \"port\""), "{prose}");
    }

    #[test]
    fn emit_for_an_absent_port_gives_only_the_controller_line() {
        let e = emitted("port:3-4", AttachMode::Port).unwrap();

        assert_eq!((e.present, e.xl_cfg.len(), e.usbdev), (false, 1, None));
    }

    #[test]
    fn emit_for_a_superspeed_device_says_pvusb_is_usb_2() {
        let e = emitted("port:2-3", AttachMode::Address).unwrap();

        assert!(e.note.unwrap().contains("USB 2.0 at most"));
    }

    #[test]
    fn emit_for_a_hub_refuses_as_attach_does() {
        let err = emitted("port:1-2", AttachMode::Address).unwrap_err();

        assert!(err.to_string().contains("is a hub"), "{err}");
    }
}
