//! Removing a device from a QEMU: `device_del`, then QEMU's word that it is gone.

use super::qmp::QmpError;
use super::QemuBackend;
use crate::backend::BackendError;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

impl QemuBackend {
    /// Remove the device with QEMU id (or QOM path) `id`, and wait until QEMU says it is
    /// gone. Any device, the user's too (`usbroute vm detach`); the engine detaches ours
    /// by key ([`VmBackend::detach`]).
    pub async fn detach_id(&self, id: &str) -> Result<(), BackendError> {
        // Subscribe before asking, so the event cannot slip past between the two.
        let mut events = self.qmp.events();
        if let Err(e) = self
            .qmp
            .execute("device_del", Some(json!({ "id": id })))
            .await
        {
            return Err(match e {
                QmpError::Command { class, .. } if class == "DeviceNotFound" => self.refused(
                    format!("has no device `{id}`; `usbroute vm devices --qmp SOCKET` lists them"),
                ),
                e => self.qmp_error(e),
            });
        }
        let timeout = self.options.unplug_timeout;
        let wait = async {
            loop {
                match events.recv().await {
                    Ok(event) if event_names(&event.data, id) => match event.name.as_str() {
                        "DEVICE_DELETED" => return Ok(()),
                        "DEVICE_UNPLUG_GUEST_ERROR" => {
                            return Err(self.refused(format!(
                                "the guest refused to release device `{id}`; try again, or \
                                 stop the guest's use of it first"
                            )))
                        }
                        _ => {}
                    },
                    Ok(_) => {}
                    // Fell behind: ask QEMU directly whether the device is still there.
                    Err(RecvError::Lagged(_)) => {
                        if !self.list_devices().await?.iter().any(|d| d.id == id) {
                            return Ok(());
                        }
                    }
                    Err(RecvError::Closed) => {
                        return Err(self.qmp_error(QmpError::Closed {
                            command: Some(format!("device_del {id} (waiting for DEVICE_DELETED)")),
                            partial: None,
                        }))
                    }
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or_else(|_| {
                Err(BackendError::Timeout {
                    vm: self.name.clone(),
                    what: format!("removal of device `{id}` (DEVICE_DELETED)"),
                    seconds: timeout.as_secs_f64(),
                })
            })
    }
}

/// Does an event's data name device `id` (by id, or by QOM path for devices without one)?
fn event_names(data: &Value, id: &str) -> bool {
    let device = data.get("device").and_then(Value::as_str);
    let path = data.get("path").and_then(Value::as_str);
    device == Some(id) || path == Some(id) || path == Some(&format!("/machine/peripheral/{id}"))
}
