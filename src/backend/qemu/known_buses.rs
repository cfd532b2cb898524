//! What one connection knows of its VM's USB controllers, so an attach needs no QOM
//! walk: listed once (at connect, or at the first attach), then kept current.
//!
//! Kept current how: QEMU sends `DEVICE_DELETED` to every monitor for every device it
//! removes, a controller too, so a removal is seen whoever asked for it; a `qemu-xhci`
//! this backend adds is put in directly. QEMU has no event for a device added: a
//! controller added through another monitor is found when no known bus fits a device
//! (the backend lists again before adding a controller of its own) or on reconnect. And
//! `DEVICE_DELETED` can be late: QEMU sends it when the device is finalized, not when it
//! leaves QOM (QEMU 10.0, a `qemu-xhci` unplugged from a powered-off PCIe slot of a paused
//! VM). So a `device_add` refused for its bus forgets the list and the attach is sent once
//! more on a fresh one; a subscriber that fell behind QEMU's events forgets it too.

use super::controllers::{self, VmController, VmUsbBus};
use super::qmp::{Qmp, QmpError};
use serde_json::Value;
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::broadcast::error::RecvError;

/// The controllers of one VM as far as this connection knows them.
#[derive(Debug, Default)]
pub struct KnownBuses {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// `None` until listed, and again once the list cannot be trusted.
    controllers: Option<Vec<VmController>>,
    /// Whether a task follows `DEVICE_DELETED` for this list (one per connection).
    following: bool,
}

impl KnownBuses {
    /// The known buses, `None` when they must be listed first.
    pub fn buses(&self) -> Option<Vec<VmUsbBus>> {
        self.lock()
            .controllers
            .as_deref()
            .map(controllers::buses_of)
    }

    /// List the VM's controllers over `qmp` and keep them, following its events from
    /// before the listing on (so a removal during it is not missed).
    pub async fn learn(self: &Arc<Self>, qmp: &Qmp) -> Result<Vec<VmUsbBus>, QmpError> {
        self.follow(qmp);
        let listed = controllers::list_controllers(qmp).await?;
        let buses = controllers::buses_of(&listed);
        self.lock().controllers = Some(listed);
        Ok(buses)
    }

    /// A controller this connection added.
    pub fn added(&self, controller: VmController) {
        if let Some(known) = &mut self.lock().controllers {
            known.retain(|c| c.path != controller.path);
            known.push(controller);
        }
    }

    /// Forget the list: the next attach lists again.
    pub fn forget(&self) {
        self.lock().controllers = None;
    }

    /// Apply one `DEVICE_DELETED`'s data: the controller it names, if known, is gone.
    pub fn deleted(&self, data: &Value) {
        if let Some(known) = &mut self.lock().controllers {
            remove_deleted(known, data);
        }
    }

    fn follow(self: &Arc<Self>, qmp: &Qmp) {
        {
            let mut state = self.lock();
            if state.following {
                return;
            }
            state.following = true;
        }
        let mut events = qmp.events();
        let known: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let event = events.recv().await;
                let Some(known) = known.upgrade() else { return };
                match event {
                    Ok(event) if event.name == "DEVICE_DELETED" => known.deleted(&event.data),
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => known.forget(),
                    Err(RecvError::Closed) => return,
                }
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Drop from `known` the controller a `DEVICE_DELETED` names (by QOM path, or by id for
/// one in `/machine/peripheral`); `true` if one was.
pub fn remove_deleted(known: &mut Vec<VmController>, data: &Value) -> bool {
    let path = data.get("path").and_then(Value::as_str);
    let id = data
        .get("device")
        .and_then(Value::as_str)
        .map(|id| format!("/machine/peripheral/{id}"));
    let before = known.len();
    known.retain(|c| Some(c.path.as_str()) != path && Some(&c.path) != id.as_ref());
    known.len() != before
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::qemu::controllers::VmControllerKind;
    use serde_json::json;

    fn controller(path: &str, bus: &str, kind: VmControllerKind) -> VmController {
        VmController {
            path: path.into(),
            type_name: String::new(),
            kind,
            buses: vec![bus.into()],
            masterbus: None,
        }
    }

    #[test]
    fn device_deleted_of_a_controller_takes_its_buses_away() {
        let mut known = vec![
            controller("/machine/peripheral/xhci", "xhci.0", VmControllerKind::Xhci),
            controller(
                "/machine/peripheral-anon/device[1]",
                "ehci.0",
                VmControllerKind::Ehci,
            ),
        ];

        let by_id = remove_deleted(
            &mut known,
            &json!({"device": "xhci", "path": "/machine/peripheral/xhci"}),
        );
        let by_path = remove_deleted(
            &mut known,
            &json!({"path": "/machine/peripheral-anon/device[1]"}),
        );

        assert!(by_id && by_path);
        assert!(known.is_empty());
    }

    #[test]
    fn device_deleted_of_a_usb_device_keeps_every_controller() {
        let mut known = vec![controller(
            "/machine/peripheral/xhci",
            "xhci.0",
            VmControllerKind::Xhci,
        )];

        let removed = remove_deleted(
            &mut known,
            &json!({"device": "usbroute-port-1-2", "path": "/machine/peripheral/usbroute-port-1-2"}),
        );

        assert!(!removed);
        assert_eq!(known.len(), 1);
    }

    #[test]
    fn a_removed_companion_leaves_its_ehci_without_companions() {
        let mut uhci = controller("/machine/peripheral/uhci", "uhci.0", VmControllerKind::Uhci);
        uhci.masterbus = Some("ehci.0".into());
        let ehci = controller("/machine/peripheral/ehci", "ehci.0", VmControllerKind::Ehci);
        let known = KnownBuses::default();
        known.lock().controllers = Some(vec![ehci, uhci]);
        let before = known.buses().expect("listed");

        known.deleted(&json!({"device": "uhci", "path": "/machine/peripheral/uhci"}));

        assert!(before[0].has_companions);
        let after = known.buses().expect("still listed");
        assert_eq!(after.len(), 1);
        assert!(!after[0].has_companions);
    }

    #[test]
    fn a_forgotten_list_must_be_listed_again() {
        let known = KnownBuses::default();
        known.lock().controllers = Some(Vec::new());

        known.forget();

        assert_eq!(known.buses(), None);
    }
}
