//! One running Xen domain as a [`VmBackend`]. Listing and judging read xenstore (one
//! transaction) and the host's sysfs; an attach writes our mark beside the chosen port,
//! runs `xl usbdev-attach` to that controller and port, and confirms the port node holds
//! the device's busid; a detach runs `xl usbdev-detach` for our port, or, when the device
//! is gone (xl cannot detach it), empties the port node itself, then removes the mark.
//!
//! The mark is written before xl runs: a daemon killed between the two leaves a mark
//! beside an empty port (removed as a leftover), never a port of ours without a mark
//! (which would be taken for the user's and left alone for good).

use super::client::{Xenstore, XsError};
use super::decide::free_port;
use super::usb_list::{HostAddr, UsbCtrl};
use super::xenstore::{
    self, judge, mark_path, port_path, Clearing, DomainPorts, Mark, PortReport, PortVerdict,
};
use super::xl::{attach_args, detach_args, Xl};
use super::{store, BY_ADDRESS_ONLY};
use crate::backend::qemu::ids;
use crate::backend::{
    AttachKey, AttachMode, BackendError, BoxFuture, HostMatch, VmBackend, VmUsbDevice,
};
use crate::inventory::{Device, PortPath};
use crate::sysfs::SysfsRoot;
use std::collections::BTreeMap;

/// How often emptying a stale port is retried when xenstored says another writer raced.
const CLEAR_ATTEMPTS: usize = 3;

/// A domain's ports judged, and what they were judged from.
struct Judged {
    ctrls: Vec<UsbCtrl>,
    ports: DomainPorts,
    reports: Vec<PortReport>,
    /// The address of the device at each busid on the host.
    host: BTreeMap<PortPath, u16>,
}

/// A running Xen domain.
pub struct XenVm {
    vm: String,
    domain: String,
    domid: u32,
    xs: Xenstore,
    xl: Xl,
    root: SysfsRoot,
    /// One attach or detach at a time: two attaches must not choose the same free port.
    busy: tokio::sync::Mutex<()>,
}

impl XenVm {
    /// Domain `domain` (id `domid`) of VM `vm`, over `xs`, attaching with `xl`; the host's
    /// devices are read under `root`.
    pub fn new(vm: &str, domain: &str, domid: u32, xs: Xenstore, xl: Xl, root: SysfsRoot) -> Self {
        XenVm {
            vm: vm.into(),
            domain: domain.into(),
            domid,
            xs,
            xl,
            root,
            busy: tokio::sync::Mutex::new(()),
        }
    }

    /// The domain's id.
    pub fn domid(&self) -> u32 {
        self.domid
    }

    fn refused(&self, reason: String) -> BackendError {
        BackendError::Refused {
            vm: self.vm.clone(),
            reason,
        }
    }

    /// xenstored refusing is a refusal; anything else leaves the connection in doubt.
    fn xs_failed(&self, e: XsError) -> BackendError {
        match e {
            XsError::Refused { .. } | XsError::Wire(_) => {
                self.refused(crate::error_chain::one_line(&e))
            }
            e => BackendError::Unreachable {
                vm: self.vm.clone(),
                source: Box::new(e),
            },
        }
    }

    /// Every port judged against the host's devices now.
    async fn judged(&self) -> Result<Judged, BackendError> {
        let (ctrls, ports) = store::snapshot(&self.xs, self.domid)
            .await
            .map_err(|e| self.xs_failed(e))?;
        let host = xenstore::addresses(&crate::inventory::scan(&self.root));
        let reports = judge(&ports, &host);
        Ok(Judged {
            ctrls,
            ports,
            reports,
            host,
        })
    }

    async fn listing(&self) -> Result<Vec<VmUsbDevice>, BackendError> {
        let judged = self.judged().await?;
        Ok(xenstore::listing(&judged.reports, &judged.host))
    }

    async fn xl(&self, args: Vec<String>) -> Result<(), BackendError> {
        self.xl
            .run(&args)
            .await
            .map_err(|e| self.refused(crate::error_chain::one_line(&e)))
    }

    /// Empty one port of ours and remove its mark: `xl usbdev-detach` while a device is at
    /// its busid, else a write of `""` (xl answers "Unknown device" for a device gone).
    async fn release(
        &self,
        report: &PortReport,
        mark: &Mark,
        clearing: Clearing,
    ) -> Result<(), BackendError> {
        let (ctrl, port) = (report.ctrl, report.port);
        match clearing {
            Clearing::Detach => self.xl(detach_args(self.domid, ctrl, port)).await?,
            Clearing::WriteEmpty => self.write_empty(ctrl, port, &mark.busid).await?,
        }
        let now = self
            .xs
            .read(0, &port_path(self.domid, ctrl, port))
            .await
            .map_err(|e| self.xs_failed(e))?;
        if now.as_deref().is_some_and(|v| !v.is_empty()) {
            return Err(self.refused(format!(
                "port {ctrl}.{port} of Xen domain {} still holds {} after it was released",
                self.domain,
                now.unwrap_or_default()
            )));
        }
        self.xs
            .rm(0, &mark_path(self.domid, ctrl, port))
            .await
            .map_err(|e| self.xs_failed(e))
    }

    /// Write `""` to a port node still holding `busid`, in a transaction so a concurrent
    /// attach to that port is not undone.
    async fn write_empty(&self, ctrl: u32, port: u8, busid: &PortPath) -> Result<(), BackendError> {
        let path = port_path(self.domid, ctrl, port);
        for _ in 0..CLEAR_ATTEMPTS {
            let tx = self
                .xs
                .transaction_start()
                .await
                .map_err(|e| self.xs_failed(e))?;
            let wrote = async {
                if self.xs.read(tx, &path).await?.as_deref() != Some(busid.to_string().as_str()) {
                    return Ok(false);
                }
                self.xs.write(tx, &path, "").await?;
                Ok::<_, XsError>(true)
            }
            .await;
            match wrote {
                Ok(true) => {
                    let committed = self.xs.transaction_end(tx, true).await;
                    if committed.map_err(|e| self.xs_failed(e))? {
                        tracing::info!(vm = %self.vm, "emptied port node {path} (its device {busid} was removed while attached)");
                        return Ok(());
                    }
                }
                // Not a transaction left open on the connection (xenstored limits them).
                done => {
                    let _ = self.xs.transaction_end(tx, false).await;
                    return done.map(|_| ()).map_err(|e| self.xs_failed(e));
                }
            }
        }
        Err(self.refused(format!(
            "could not empty port node {path}: xenstore kept changing under it; run `xenstore-write {path} \"\"`"
        )))
    }

    /// Clear every stale port of ours, so that libxl accepts attaches again.
    async fn clear_stale(&self, reports: &[PortReport]) -> Result<bool, BackendError> {
        let mut cleared = false;
        for r in reports {
            if let PortVerdict::StaleOurs { mark, clearing } = &r.verdict {
                self.release(r, mark, *clearing).await?;
                cleared = true;
            }
        }
        Ok(cleared)
    }

    async fn attach_address(&self, device: &Device) -> Result<VmUsbDevice, BackendError> {
        let key = AttachKey::of(AttachMode::Address, device).ok_or_else(|| {
            self.refused(format!(
                "device {} has no device address to attach it by",
                device.port
            ))
        })?;
        let plug = HostAddr {
            bus: device.bus,
            address: device.address.unwrap_or_default(),
        };
        let attached = VmUsbDevice {
            id: ids::device_id(&key),
            attached: true,
            matcher: HostMatch::Address {
                bus: plug.bus,
                address: plug.address,
            },
            key: Some(key.clone()),
        };
        let _busy = self.busy.lock().await;
        let mut judged = self.judged().await?;
        let ours =
            |r: &PortReport| matches!(&r.verdict, PortVerdict::Ours { mark } if mark.key == key);
        // Ours already: an answer lost with a restart, or the engine asking again.
        if judged.reports.iter().any(ours) {
            return Ok(attached);
        }
        if self.clear_stale(&judged.reports).await? {
            judged = self.judged().await?;
        }
        let (ctrl, port) = free_port(&self.domain, self.domid, &judged.ctrls, &judged.reports)
            .map_err(|e| self.refused(e.to_string()))?;
        let mark = Mark {
            key,
            busid: device.port.clone(),
            plug,
        };
        let marked = mark_path(self.domid, ctrl, port);
        self.xs
            .write(0, &marked, &mark.value())
            .await
            .map_err(|e| self.xs_failed(e))?;
        let ran = self
            .xl(attach_args(self.domid, plug.bus, plug.address, ctrl, port))
            .await;
        let holds = self
            .xs
            .read(0, &port_path(self.domid, ctrl, port))
            .await
            .map_err(|e| self.xs_failed(e))?;
        let busid = device.port.to_string();
        if holds.as_deref() == Some(busid.as_str()) {
            return Ok(attached);
        }
        // Not attached: the mark must not stay beside a port that is not ours.
        let _ = self.xs.rm(0, &marked).await;
        ran?;
        Err(self.refused(format!(
            "xl usbdev-attach said nothing went wrong, but port node {} holds {:?}, not {busid}",
            port_path(self.domid, ctrl, port),
            holds.unwrap_or_default()
        )))
    }

    async fn detach_key(&self, key: &AttachKey) -> Result<(), BackendError> {
        let _busy = self.busy.lock().await;
        let Judged { ports, reports, .. } = self.judged().await?;
        for r in &reports {
            let (mark, clearing) = match &r.verdict {
                PortVerdict::Ours { mark } => (mark, Clearing::Detach),
                PortVerdict::StaleOurs { mark, clearing } => (mark, *clearing),
                _ => continue,
            };
            if mark.key != *key {
                continue;
            }
            if let Err(e) = self.release(r, mark, clearing).await {
                // Removed between the look and xl: then the port is emptied by hand.
                let again = self.judged().await?.reports;
                let stale = again.iter().find(|a| a.ctrl == r.ctrl && a.port == r.port);
                match stale.map(|a| &a.verdict) {
                    Some(PortVerdict::StaleOurs {
                        mark,
                        clearing: Clearing::WriteEmpty,
                    }) => self.release(r, mark, Clearing::WriteEmpty).await?,
                    Some(PortVerdict::Free) => {}
                    _ => return Err(e),
                }
            }
        }
        // Marks beside ports that no longer hold what they marked.
        for r in reports.iter().filter(|r| r.leftover_mark) {
            if ports
                .marks
                .get(&(r.ctrl, r.port))
                .is_some_and(|m| m.key == *key)
            {
                let _ = self.xs.rm(0, &mark_path(self.domid, r.ctrl, r.port)).await;
            }
        }
        Ok(())
    }
}

impl VmBackend for XenVm {
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
            if mode != AttachMode::Address {
                return Err(self.refused(format!(
                    "cannot attach by {}: {BY_ADDRESS_ONLY}",
                    mode.name()
                )));
            }
            self.attach_address(device).await
        })
    }

    fn detach<'a>(&'a self, key: &'a AttachKey) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(self.detach_key(key))
    }

    fn device_id(&self, key: &AttachKey) -> String {
        ids::device_id(key)
    }
}
