//! The pure decisions of an attach: which port of which controller a device goes to, or
//! why none can take it (no controller, one not connected, all taken, a stale port of
//! someone else's blocking every attach), each said with its fix.

use super::usb_list::UsbCtrl;
use super::xenstore::{port_path, PortReport, PortValue, PortVerdict, Slot, QUSB};

/// Why no port can take a device now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoPort {
    /// No `qusb` controller: the domain was created without `usbctrl=`.
    #[error("Xen domain {domain} has no qusb USB controller; libxl starts the device model that serves PVUSB only when a domain is created, so add usbctrl=[\"type=qusb,version=2,ports=8\"] to its xl.cfg and create it again (`usbroute emit SELECTOR --for xl` prints the lines)")]
    NoController {
        /// The domain.
        domain: String,
    },
    /// Controllers exist, none connected.
    #[error("Xen domain {domain}: USB controller {ctrl} is in xenbus state {state}, not connected (4); its backend is not up: is the domain's device model qemu-system-xen with PVUSB (`xl usb-list {domain}`, /var/log/xen/qemu-dm-{domain}.log)?")]
    NotConnected {
        /// The domain.
        domain: String,
        /// The first qusb controller.
        ctrl: u32,
        /// Its state.
        state: u32,
    },
    /// Every port taken.
    #[error("Xen domain {domain}: all {ports} ports of its qusb controllers are taken; detach a device, or add a controller with `xl usbctrl-attach {domain} type=qusb version=2 ports=8`")]
    Full {
        /// The domain.
        domain: String,
        /// How many ports there are.
        ports: usize,
    },
    /// A stale port usbroute does not own: libxl refuses every attach on the host while it
    /// is there, and usbroute leaves other people's ports alone.
    #[error("Xen domain {domain}: port node {path} holds {value}, a device no longer on this host that usbroute did not attach; libxl refuses every usbdev-attach until it is emptied: run `xenstore-write {path} \"\"`")]
    Blocked {
        /// The domain.
        domain: String,
        /// The port node.
        path: String,
        /// What it holds.
        value: String,
    },
}

/// The port a device is attached to in domain `domain` (id `domid`): the first free port
/// of a connected qusb controller, in controller then port order. `controllers` is `xl
/// usb-list`, `reports` the ports as xenstore has them ([`super::xenstore::judge`]; our
/// stale ports are cleared before this is asked, and are not free until then).
pub fn free_port(
    domain: &str,
    domid: u32,
    controllers: &[UsbCtrl],
    reports: &[PortReport],
) -> Result<Slot, NoPort> {
    if let Some(blocker) = reports.iter().find_map(|r| match &r.verdict {
        PortVerdict::NotOurs {
            value: PortValue::Busid(busid),
            present: false,
        } => Some((port_path(domid, r.ctrl, r.port), busid.to_string())),
        _ => None,
    }) {
        return Err(NoPort::Blocked {
            domain: domain.into(),
            path: blocker.0,
            value: blocker.1,
        });
    }
    let qusb: Vec<&UsbCtrl> = controllers.iter().filter(|c| c.kind == QUSB).collect();
    let usable: Vec<u32> = qusb
        .iter()
        .filter(|c| c.is_connected())
        .map(|c| c.devid)
        .collect();
    match (qusb.first(), usable.is_empty()) {
        (None, _) => {
            return Err(NoPort::NoController {
                domain: domain.into(),
            })
        }
        (Some(c), true) => {
            return Err(NoPort::NotConnected {
                domain: domain.into(),
                ctrl: c.devid,
                state: c.state,
            })
        }
        _ => {}
    }
    let ports = reports.iter().filter(|r| usable.contains(&r.ctrl));
    let mut counted = 0;
    for r in ports {
        counted += 1;
        if r.verdict == PortVerdict::Free {
            return Ok((r.ctrl, r.port));
        }
    }
    Err(NoPort::Full {
        domain: domain.into(),
        ports: counted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::xen::usb_list::parse_usb_list;
    use crate::backend::xen::xenstore::{domain_ports, judge, port_path};
    use std::collections::BTreeMap;

    const ONE_QUSB: &str = "Devid Type BE state usb-ver ports\n0 qusb 0 4 2 2\n";

    fn reports(nodes: &[(String, &str)], host: &[(&str, u16)]) -> Vec<PortReport> {
        let ports = domain_ports(7, nodes.iter().map(|(p, v)| (p.as_str(), *v)));
        let host: BTreeMap<_, _> = host.iter().map(|(b, a)| (b.parse().unwrap(), *a)).collect();
        judge(&ports, &host)
    }

    fn decide(
        usb_list: &str,
        nodes: &[(String, &str)],
        host: &[(&str, u16)],
    ) -> Result<Slot, NoPort> {
        free_port(
            "lab",
            7,
            &parse_usb_list(usb_list).unwrap(),
            &reports(nodes, host),
        )
    }

    #[test]
    fn the_first_empty_port_is_chosen() {
        let nodes = [(port_path(7, 0, 1), "1-1"), (port_path(7, 0, 2), "")];

        assert_eq!(decide(ONE_QUSB, &nodes, &[("1-1", 2)]), Ok((0, 2)));
    }

    #[test]
    fn a_port_usb_list_shows_empty_but_xenstore_holds_is_not_free() {
        // After a surprise removal usb-list prints `Port 1:` empty; xenstore keeps `1-1`.
        let nodes = [(port_path(7, 0, 1), "1-1"), (port_path(7, 0, 2), "2-1")];

        let err = decide(ONE_QUSB, &nodes, &[("2-1", 3)]).unwrap_err();

        assert!(matches!(err, NoPort::Blocked { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("xenstore-write /local/domain/0/backend/qusb/7/0/port/1 \"\""),
            "{err}"
        );
    }

    #[test]
    fn a_domain_without_a_controller_is_told_the_xl_cfg_line() {
        let err = decide("", &[], &[]).unwrap_err();

        assert!(
            err.to_string()
                .contains("usbctrl=[\"type=qusb,version=2,ports=8\"]"),
            "{err}"
        );
    }

    #[test]
    fn a_controller_in_state_1_is_not_used() {
        let nodes = [(port_path(7, 0, 1), "")];

        let err = decide("0 qusb 0 1 2 2\n", &nodes, &[]).unwrap_err();

        assert_eq!(
            err,
            NoPort::NotConnected {
                domain: "lab".into(),
                ctrl: 0,
                state: 1
            }
        );
    }

    #[test]
    fn a_pv_controller_is_never_chosen() {
        let nodes = [(port_path(7, 0, 1), "1-1"), (port_path(7, 1, 1), "")];

        let found = decide("0 qusb 0 4 2 1\n1 pv 0 4 2 1\n", &nodes, &[("1-1", 2)]);

        assert_eq!(
            found,
            Err(NoPort::Full {
                domain: "lab".into(),
                ports: 1
            })
        );
    }

    #[test]
    fn the_second_controller_takes_the_device_when_the_first_is_full() {
        let nodes = [(port_path(7, 0, 1), "1-1"), (port_path(7, 1, 1), "")];

        let found = decide("0 qusb 0 4 2 1\n1 qusb 0 4 2 1\n", &nodes, &[("1-1", 2)]);

        assert_eq!(found, Ok((1, 1)));
    }
}
