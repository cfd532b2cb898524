//! One running libvirt domain as a [`VmBackend`]: attach a live `<hostdev>` under our
//! alias (libvirt opens `/dev/bus/usb/BBB/DDD` itself and hands QEMU the fd), detach by
//! that alias and wait for libvirt's device-removed event, list from the live domain XML.
//! The domain's QMP monitor is libvirt's and is never touched.

use super::hostdev::{self, Form};
use super::link::Session;
use super::presence::Watched;
use super::rpc::{Domain, DomainEvent, RpcError};
use super::{alias, domain_xml};
use crate::backend::{AttachKey, AttachMode, BackendError, BoxFuture, VmBackend, VmUsbDevice};
use crate::inventory::Device;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

/// How long a detach waits for libvirt's device-removed event unless told otherwise.
pub const DEFAULT_REMOVAL_TIMEOUT: Duration = Duration::from_secs(10);

/// A running libvirt domain, reached over its URI's shared connection.
pub struct LibvirtVm {
    vm: String,
    domain: Domain,
    session: Session,
    removal_timeout: Duration,
}

impl LibvirtVm {
    pub(super) fn new(watched: &Watched, domain: Domain, session: Session) -> Self {
        LibvirtVm {
            vm: watched.vm.clone(),
            domain,
            session,
            removal_timeout: watched.removal_timeout,
        }
    }

    /// A libvirt error is a refusal (nothing was done); a lost connection or a timeout
    /// leaves it unknown whether the request was carried out.
    fn failed(&self, what: &str, e: RpcError) -> BackendError {
        if is_refusal(&e) {
            BackendError::Refused {
                vm: self.vm.clone(),
                reason: format!(
                    "libvirt refused to {what} on domain `{}`: {}",
                    self.domain.name,
                    crate::error_chain::one_line(&e)
                ),
            }
        } else {
            BackendError::Unreachable {
                vm: self.vm.clone(),
                source: Box::new(e),
            }
        }
    }

    async fn listing(&self) -> Result<Vec<VmUsbDevice>, BackendError> {
        let xml = self
            .session
            .conn
            .domain_xml(&self.domain)
            .await
            .map_err(|e| self.failed("describe the domain", e))?;
        let hostdevs = domain_xml::usb_hostdevs(&xml).map_err(|e| BackendError::Refused {
            vm: self.vm.clone(),
            reason: crate::error_chain::one_line(&e),
        })?;
        Ok(hostdevs.iter().map(|h| h.to_vm_device()).collect())
    }

    async fn has(&self, key: &AttachKey) -> Option<VmUsbDevice> {
        let devices = self.listing().await.ok()?;
        devices.into_iter().find(|d| d.key.as_ref() == Some(key))
    }

    async fn attach_key(&self, key: AttachKey) -> Result<VmUsbDevice, BackendError> {
        let xml = hostdev::hostdev_xml(&key, Form::Live).map_err(|e| BackendError::Refused {
            vm: self.vm.clone(),
            reason: e.to_string(),
        })?;
        match self
            .session
            .conn
            .attach_device_live(&self.domain, &xml)
            .await
        {
            Ok(()) => Ok(VmUsbDevice {
                id: self.device_id(&key),
                attached: true,
                matcher: key.host_match(),
                key: Some(key),
            }),
            // Ours already (an answer lost with a restart): libvirt refuses a second
            // device under one alias, and the one there is what was asked for.
            Err(e) => match self.has(&key).await {
                Some(there) => Ok(there),
                None => Err(self.failed("attach the USB device", e)),
            },
        }
    }

    async fn detach_key(&self, key: &AttachKey) -> Result<(), BackendError> {
        let alias = self.device_id(key);
        // Subscribed before asking: libvirt may say the device is gone before it answers.
        let mut events = self.session.events.subscribe();
        if let Err(e) = self
            .session
            .conn
            .detach_device_alias_live(&self.domain, &alias)
            .await
        {
            return match self.has(key).await {
                // Not there (removed meanwhile, or never attached): done.
                None if is_refusal(&e) => Ok(()),
                _ => Err(self.failed("detach the USB device", e)),
            };
        }
        let removed = tokio::time::timeout(self.removal_timeout, async {
            loop {
                match events.recv().await {
                    Ok(DomainEvent::DeviceRemoved { domain, alias: a })
                        if domain.name == self.domain.name && a == alias =>
                    {
                        return Ok(true);
                    }
                    Ok(DomainEvent::DeviceRemovalFailed { domain, alias: a })
                        if domain.name == self.domain.name && a == alias =>
                    {
                        return Err(BackendError::Refused {
                            vm: self.vm.clone(),
                            reason: format!(
                                "libvirt says the guest of domain `{}` did not release {alias}",
                                self.domain.name
                            ),
                        });
                    }
                    Ok(_) => {}
                    // Events missed or the connection gone: the XML says the rest.
                    Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => return Ok(false),
                }
            }
        })
        .await;
        match removed {
            Ok(Err(refused)) => Err(refused),
            // libvirt's event is its word that the device is gone: no XML to read.
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) | Err(_) => match self.listing().await? {
                devices if devices.iter().any(|d| d.key.as_ref() == Some(key)) => {
                    Err(BackendError::Timeout {
                        vm: self.vm.clone(),
                        what: format!("the removal of {alias} (libvirt's device-removed event)"),
                        seconds: self.removal_timeout.as_secs_f64(),
                    })
                }
                _ => Ok(()),
            },
        }
    }
}

/// Did libvirt answer with an error (the request was not carried out)? Any other error
/// (timeout, connection lost) leaves it unknown whether libvirt acted.
fn is_refusal(e: &RpcError) -> bool {
    matches!(e, RpcError::Libvirt { .. })
}

impl VmBackend for LibvirtVm {
    fn name(&self) -> &str {
        &self.vm
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<VmUsbDevice>, BackendError>> {
        Box::pin(self.listing())
    }

    fn attach<'a>(
        &'a self,
        device: &'a Device,
        mode: AttachMode,
    ) -> BoxFuture<'a, Result<VmUsbDevice, BackendError>> {
        Box::pin(async move {
            let key = AttachKey::of(mode, device).ok_or_else(|| BackendError::Refused {
                vm: self.vm.clone(),
                reason: format!(
                    "device {} has no {} to attach it by",
                    device.port,
                    match mode {
                        AttachMode::Address => "device address",
                        AttachMode::Id => "vendor and product id",
                        AttachMode::Port => "port",
                    }
                ),
            })?;
            self.attach_key(key).await
        })
    }

    fn detach<'a>(&'a self, key: &'a AttachKey) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(self.detach_key(key))
    }

    fn device_id(&self, key: &AttachKey) -> String {
        alias::alias_of(key).unwrap_or_default()
    }
}
