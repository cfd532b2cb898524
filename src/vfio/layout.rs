//! Where a group's functions go in the guest: one PCIe root port per host slot, so the
//! functions of one slot (an EHCI at function 7 and its UHCI companions at 0-2) stay one
//! multi-function device in the guest, as the guest's EHCI driver expects.

use crate::inventory::PciAddress;
use serde::Serialize;

/// One function placed in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GuestSlot {
    /// The host function.
    pub host: PciAddress,
    /// Its function number behind the guest root port (`addr=0.F`).
    pub guest_function: u8,
    /// `multifunction=on`: function 0 of a slot that has more.
    pub multifunction: bool,
}

/// The functions that share one guest root port, in the order to add them: higher
/// functions first and function 0 last, because hot-adding function 0 is what makes the
/// guest look at the slot.
pub type PortLayout = Vec<GuestSlot>;

/// Place `members` (sorted or not) on as few root ports as keep host slots together.
/// A slot whose function 0 is not passed cannot be a guest multi-function device, so
/// each of its functions gets a port of its own as function 0.
pub fn guest_layout(members: &[PciAddress]) -> Vec<PortLayout> {
    let mut sorted = members.to_vec();
    sorted.sort();
    sorted.dedup();
    let mut slots: Vec<Vec<PciAddress>> = Vec::new();
    for pci in sorted {
        match slots.last_mut() {
            Some(slot) if slot[0].same_slot(&pci) => slot.push(pci),
            _ => slots.push(vec![pci]),
        }
    }
    let mut ports = Vec::new();
    for slot in slots {
        let has_function_0 = slot.iter().any(|p| p.function == 0);
        if has_function_0 && slot.len() > 1 {
            let mut port: PortLayout = slot
                .iter()
                .map(|p| GuestSlot {
                    host: *p,
                    guest_function: p.function,
                    multifunction: p.function == 0,
                })
                .collect();
            port.sort_by_key(|p| std::cmp::Reverse(p.guest_function));
            ports.push(port);
        } else {
            ports.extend(slot.into_iter().map(|p| {
                vec![GuestSlot {
                    host: p,
                    guest_function: 0,
                    multifunction: false,
                }]
            }));
        }
    }
    ports
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pci(s: &str) -> PciAddress {
        s.parse().expect("address")
    }

    #[test]
    fn guest_layout_keeps_ehci_and_companions_on_one_port_function_0_last() {
        let ports = guest_layout(&[
            pci("00:1d.0"),
            pci("00:1d.1"),
            pci("00:1d.2"),
            pci("00:1d.7"),
        ]);

        let order: Vec<Vec<(String, u8, bool)>> = ports
            .iter()
            .map(|p| {
                p.iter()
                    .map(|f| (f.host.to_string(), f.guest_function, f.multifunction))
                    .collect()
            })
            .collect();
        assert_eq!(
            order,
            vec![vec![
                ("0000:00:1d.7".to_string(), 7, false),
                ("0000:00:1d.2".to_string(), 2, false),
                ("0000:00:1d.1".to_string(), 1, false),
                ("0000:00:1d.0".to_string(), 0, true),
            ]]
        );
    }

    #[test]
    fn guest_layout_gives_functions_of_a_slot_without_function_0_a_port_each() {
        let ports = guest_layout(&[pci("00:1a.7"), pci("00:1a.2"), pci("01:00.0")]);

        assert_eq!(
            ports
                .iter()
                .map(|p| (p[0].host.to_string(), p[0].guest_function))
                .collect::<Vec<_>>(),
            vec![
                ("0000:00:1a.2".to_string(), 0),
                ("0000:00:1a.7".to_string(), 0),
                ("0000:01:00.0".to_string(), 0)
            ]
        );
    }
}
