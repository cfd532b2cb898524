//! What a selector means to `attach` and `detach`: the one device to attach (or, by port
//! or id, what QEMU is to wait for), and the VM's device a detach names. Shared with
//! `emit`, which finds a device exactly as `attach` does.

use crate::backend::qemu::ids::{self, usbroute_device_id};
use crate::backend::qemu::{AttachRequest, QemuBackend};
use crate::backend::{AttachKey, AttachMode, VmUsbDevice};
use crate::inventory::{Device, HexId, Snapshot};
use crate::selector::{Pattern, Selector, Term};
use anyhow::bail;

/// What an attach goes for.
#[derive(Debug)]
pub(super) enum Target {
    /// A device on this host.
    Device(Box<Device>),
    /// Nothing on the host now, but the selector pins a port or ids for QEMU to wait for.
    Absent(AttachRequest),
}

/// The one device `selector` names, or (by port or id) what to wait for when it is absent.
pub(super) fn attach_target(
    snapshot: &Snapshot,
    selector: &Selector,
    mode: AttachMode,
) -> anyhow::Result<Target> {
    let found: Vec<&Device> = snapshot
        .devices
        .iter()
        .filter(|d| selector.matches(d))
        .collect();
    match found.as_slice() {
        [one] => Ok(Target::Device(Box::new((*one).clone()))),
        [] => match pinned_key(snapshot, selector, mode) {
            Some(key) => Ok(Target::Absent(AttachRequest {
                key,
                speed: None,
                what: format!(
                    "`{selector}` (not on this host now; QEMU attaches it when it appears)"
                ),
            })),
            None if mode == AttachMode::Address => bail!(
                "{} is not on this host; use --by port (with port:BUS-PORT or \
                 port:CONTROLLER/PORT) or --by id (with id:VVVV:PPPP) to attach it when it \
                 appears, or `usbroute list` to see what is here",
                absent_name(selector)
            ),
            None => bail!(
                "no device on this host matches `{selector}`; to attach one that is not plugged \
                 in yet, name it exactly: --by port needs port:BUS-PORT or \
                 port:CONTROLLER/PORT (a controller on this host), --by id needs \
                 id:VVVV:PPPP (no wildcards)"
            ),
        },
        many => bail!(
            "`{selector}` matches {} devices; attach one at a time, for example by port:\n{}",
            many.len(),
            candidates(many)
        ),
    }
}

/// How an error names what a selector meant: `device at bus 1 addr 2`, else the selector.
fn absent_name(selector: &Selector) -> String {
    match selector.terms.as_slice() {
        [Term::Addr { bus, address }] => format!("device at bus {bus} addr {address}"),
        [Term::Port(port)] => format!("device at port {port}"),
        [Term::PhysicalPort(port)] => format!("device at port {port}"),
        _ => format!("a device matching `{selector}`"),
    }
}

/// The key an absent device would get: the selector's exact port (by port) or exact ids
/// (by id). A controller-anchored port becomes the port of that controller's bus where a
/// device in that socket shows up talking USB 2 (the USB 3 bus for an `ss` name): QEMU
/// matches on a bus number, so one speed; a daemon rule follows both.
fn pinned_key(snapshot: &Snapshot, selector: &Selector, mode: AttachMode) -> Option<AttachKey> {
    selector.terms.iter().find_map(|term| match (mode, term) {
        (AttachMode::Port, Term::Port(port)) => Some(AttachKey::Port(port.clone())),
        (AttachMode::Port, Term::PhysicalPort(socket)) => {
            snapshot.bus_port_of(socket).map(AttachKey::Port)
        }
        (
            AttachMode::Id,
            Term::Id {
                vendor: Pattern::Exact(v),
                product: Pattern::Exact(p),
            },
        ) => Some(AttachKey::Id {
            vendor_id: HexId(*v),
            product_id: HexId(*p),
        }),
        _ => None,
    })
}

fn candidates(devices: &[&Device]) -> String {
    devices
        .iter()
        .map(|d| format!("  port:{}  {}", d.port, QemuBackend::describe(d)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The VM device id `target` means: an id the VM has, else the usbroute device of the
/// host device(s) a selector names.
pub(super) fn detach_target(
    listed: &[VmUsbDevice],
    target: &str,
    scan: impl FnOnce() -> Snapshot,
) -> Result<String, String> {
    if listed.iter().any(|d| d.id == target) {
        return Ok(target.to_string());
    }
    let selector: Selector = target.parse().map_err(|e| {
        format!("`{target}` is neither a device id of this VM nor a selector ({e}); `usbroute vm devices --qmp SOCKET` lists the ids")
    })?;
    let snapshot = scan();
    let mut wanted: Vec<String> = Vec::new();
    for device in snapshot.devices.iter().filter(|d| selector.matches(d)) {
        for mode in [AttachMode::Address, AttachMode::Port, AttachMode::Id] {
            wanted.extend(usbroute_device_id(mode, device));
        }
    }
    for mode in [AttachMode::Port, AttachMode::Id] {
        wanted.extend(pinned_key(&snapshot, &selector, mode).map(|k| ids::device_id(&k)));
    }
    let hits: Vec<&VmUsbDevice> = listed.iter().filter(|d| wanted.contains(&d.id)).collect();
    match hits.as_slice() {
        [one] => Ok(one.id.clone()),
        [] => Err(format!(
            "has no device usbroute attached for `{selector}`; `usbroute vm devices --qmp SOCKET` lists what it has (detach by id)"
        )),
        many => Err(format!(
            "`{selector}` means {} of its devices; detach one by id: {}",
            many.len(),
            many.iter().map(|d| d.id.as_str()).collect::<Vec<_>>().join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::HostMatch;
    use crate::inventory::{PortPath, Speed};

    fn device(port: &str, address: u16, vendor: u16, product: u16) -> Device {
        let port: PortPath = port.parse().unwrap();
        Device {
            address: Some(address),
            vendor_id: Some(HexId(vendor)),
            product_id: Some(HexId(product)),
            speed_mbps: Some(Speed(12.0)),
            ..Device::at(port)
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            devices: std::sync::Arc::new(vec![
                device("1-3", 5, 0x046d, 0xc016),
                device("1-4", 6, 0x046d, 0xc016),
                device("2-1", 2, 0x0781, 0x5581),
            ]),
            ..Snapshot::default()
        }
    }

    fn vm_device(id: &str) -> VmUsbDevice {
        VmUsbDevice {
            id: id.into(),
            attached: true,
            key: ids::key_of(id),
            matcher: HostMatch::Other {},
        }
    }

    #[test]
    fn attach_target_with_two_matches_lists_both_candidates() {
        let selector: Selector = "id:046d:c016".parse().unwrap();

        let err = attach_target(&snapshot(), &selector, AttachMode::Id).unwrap_err();

        let text = err.to_string();
        assert!(text.contains("matches 2 devices"), "{text}");
        assert!(text.contains("port:1-3 "), "{text}");
        assert!(text.contains("port:1-4 "), "{text}");
    }

    #[test]
    fn attach_target_absent_address_says_use_port_or_id() {
        let selector: Selector = "addr:1.2".parse().unwrap();

        let err = attach_target(&snapshot(), &selector, AttachMode::Address).unwrap_err();

        assert!(
            err.to_string()
                .starts_with("device at bus 1 addr 2 is not on this host; use --by port"),
            "{err}"
        );
    }

    #[test]
    fn attach_target_absent_exact_port_waits_for_it() {
        let selector: Selector = "port:3-2.1".parse().unwrap();

        let target = attach_target(&snapshot(), &selector, AttachMode::Port).unwrap();

        let Target::Absent(request) = target else {
            panic!("expected an absent target")
        };
        assert_eq!(request.key, AttachKey::Port("3-2.1".parse().unwrap()));
        assert_eq!(request.speed, None);
    }

    #[test]
    fn attach_target_absent_wildcard_id_is_refused() {
        let selector: Selector = "id:1234:*".parse().unwrap();

        let err = attach_target(&snapshot(), &selector, AttachMode::Id).unwrap_err();

        assert!(err.to_string().contains("no wildcards"), "{err}");
    }

    #[test]
    fn detach_target_by_selector_finds_our_device_of_any_mode() {
        let listed = [vm_device("hostdev0"), vm_device("usbroute-port-2-1")];

        let id = detach_target(&listed, "id:0781:5581", snapshot);

        assert_eq!(id.as_deref(), Ok("usbroute-port-2-1"));
    }

    #[test]
    fn detach_target_ambiguous_selector_lists_the_ids() {
        let listed = [
            vm_device("usbroute-addr-1-5"),
            vm_device("usbroute-addr-1-6"),
        ];

        let err = detach_target(&listed, "id:046d:c016", snapshot).unwrap_err();

        assert!(
            err.contains("usbroute-addr-1-5, usbroute-addr-1-6"),
            "{err}"
        );
    }

    #[test]
    fn detach_target_exact_id_wins_over_selector_reading() {
        let listed = [vm_device("usbroute-id-046d-c016")];

        let id = detach_target(&listed, "usbroute-id-046d-c016", Snapshot::default);

        assert_eq!(id.as_deref(), Ok("usbroute-id-046d-c016"));
    }
}
