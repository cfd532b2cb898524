//! `usbroute emit SELECTOR --for libvirt`: the `<hostdev>` XML of an attach, for a
//! domain's configuration (`virsh attach-device DOMAIN FILE --config`, or pasted into
//! `<devices>`). The same element, under the same `ua-` alias, that the libvirt backend
//! attaches live (`backend::libvirt::hostdev`), with `startupPolicy='optional'` so the
//! domain starts without the device when it is absent. libvirt has no host-port form, so
//! `--by port` is refused, naming what to use instead.

use super::output::print_json;
use super::vm_target::{attach_target, Target};
use crate::backend::libvirt::alias;
use crate::backend::libvirt::hostdev::{hostdev_xml, Form, HostdevError};
use crate::backend::qemu::usb_host;
use crate::backend::AttachMode;
use crate::inventory::Snapshot;
use crate::selector::Selector;
use anyhow::anyhow;
use serde::Serialize;

/// What `emit --for libvirt` prints (`--json`: field names are stable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EmittedHostdev {
    /// `libvirt`.
    #[serde(rename = "for")]
    pub hypervisor: &'static str,
    /// The attach mode: `address` or `id`.
    pub by: AttachMode,
    /// The hostdev's user alias; the one the libvirt backend gives it.
    pub alias: String,
    /// The device as messages name it.
    pub what: String,
    /// `false` when the device is not on this host now (by id, named exactly).
    pub present: bool,
    /// The `<hostdev>` element, as `virsh attach-device` reads it.
    pub xml: String,
}

/// Prints the `<hostdev>` for the one device `selector` names, attached by `mode`.
pub(super) fn emit(
    snapshot: &Snapshot,
    selector: &Selector,
    mode: AttachMode,
    json: bool,
) -> anyhow::Result<()> {
    let emitted = emit_libvirt(snapshot, selector, mode)?;
    if json {
        print_json(&emitted)?;
    } else {
        print!("{}", emitted.to_text());
    }
    Ok(())
}

/// The `<hostdev>` for the one device `selector` names. Finds it as `attach` does (same
/// errors for none or several, a hub refused) and keys it as the backends do.
fn emit_libvirt(
    snapshot: &Snapshot,
    selector: &Selector,
    mode: AttachMode,
) -> anyhow::Result<EmittedHostdev> {
    // Before looking for the device: by port nothing can be written, present or not.
    if mode == AttachMode::Port {
        return Err(HostdevError::NoHostPort.into());
    }
    let (request, present) = match attach_target(snapshot, selector, mode)? {
        Target::Device(device) => (
            usb_host::request_for(&device, mode).map_err(|e| anyhow!(e))?,
            true,
        ),
        Target::Absent(mut request) => {
            request.what = format!("`{selector}` (not on this host now)");
            (request, false)
        }
    };
    let xml = hostdev_xml(&request.key, Form::Config)?;
    let alias = alias::alias_of(&request.key).ok_or(HostdevError::NoHostPort)?;
    Ok(EmittedHostdev {
        hypervisor: "libvirt",
        by: mode,
        alias,
        what: request.what,
        present,
        xml,
    })
}

impl EmittedHostdev {
    /// The XML behind one XML comment saying what it is and how to use it: a file
    /// `virsh attach-device` reads as it is. (A comment cannot hold `--`, so it names
    /// virsh's options without their dashes.)
    pub fn to_text(&self) -> String {
        let how = match self.by {
            AttachMode::Id => {
                "By id: any device of this kind; libvirt looks it up when the domain starts\n     \
                 (or at attach-device) and refuses when several are plugged in."
            }
            _ => {
                "By address: exactly this plug (a re-plug gets a new device number, which\n     \
                 libvirt does not follow)."
            }
        };
        format!(
            "<!-- libvirt: {}\n     {how}\n     \
             Alias `{}`, the one usbroute's libvirt backend gives it, so it finds it\n     \
             there as its own. startupPolicy='optional': the domain starts without it.\n     \
             Save it to a file for `virsh attach-device DOMAIN FILE` with its config\n     \
             option (and the live one to attach it now too), or put the <hostdev> in the\n     \
             domain's <devices>. -->\n{}",
            comment_safe(&self.what),
            self.alias,
            self.xml
        )
    }
}

/// `text` as it may stand inside an XML comment, which must not hold `--` (nor end in
/// `-`): a device's product string may say anything.
fn comment_safe(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '-' && out.ends_with('-') {
            out.push(' ');
        }
        out.push(c);
    }
    if out.ends_with('-') {
        out.push(' ');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::emit::recorded_guest;

    /// On the recorded guest: 1-2.1 is a mouse at bus 1 address 5, 0627:0001; 1-2 a hub.
    fn emitted(selector: &str, mode: AttachMode) -> anyhow::Result<EmittedHostdev> {
        emit_libvirt(&recorded_guest(), &selector.parse().unwrap(), mode)
    }

    #[test]
    fn emit_by_address_is_an_optional_hostdev_naming_bus_and_device() {
        let e = emitted("port:1-2.1", AttachMode::Address).unwrap();

        assert_eq!(
            e.xml,
            "<hostdev mode='subsystem' type='usb'>\n  <source startupPolicy='optional'>\n    \
             <address bus='1' device='5'/>\n  </source>\n  \
             <alias name='ua-usbroute-addr-1-5'/>\n</hostdev>\n"
        );
    }

    #[test]
    fn emit_by_port_is_refused_naming_address_and_id_instead() {
        let err = emitted("port:1-2.1", AttachMode::Port).unwrap_err();

        assert!(
            err.to_string()
                .starts_with("libvirt cannot match a host port")
                && err.to_string().contains("--by id"),
            "{err}"
        );
    }

    #[test]
    fn emit_by_id_for_an_absent_device_says_so_without_promising_a_rescan() {
        let e = emitted("id:046d:c016", AttachMode::Id).unwrap();

        assert_eq!(
            (e.present, e.alias.as_str(), e.what.as_str()),
            (
                false,
                "ua-usbroute-id-046d-c016",
                "`id:046d:c016` (not on this host now)"
            )
        );
    }

    #[test]
    fn emit_for_a_hub_refuses_as_attach_does() {
        let err = emitted("port:1-2", AttachMode::Address).unwrap_err();

        assert!(err.to_string().contains("is a hub"), "{err}");
    }

    #[test]
    fn the_text_is_one_comment_then_the_xml() {
        let e = emitted("port:1-2.1", AttachMode::Address).unwrap();

        let text = e.to_text();

        let (comment, xml) = text.split_once(" -->\n").unwrap();
        assert!(comment.starts_with("<!-- libvirt: ") && !comment[4..].contains("--"));
        assert_eq!(xml, e.xml);
    }

    #[test]
    fn a_device_string_cannot_end_the_comment_early() {
        assert_eq!(comment_safe("a-->b--"), "a- ->b- - ");
    }
}
