//! The QEMU backend: usb-host devices attached, detached and listed over QMP.
//!
//! Attach names the bus (a controller that fits the device's speed, chosen among the VM's
//! buses listed once per connection and kept current, [`known_buses`]; or a `qemu-xhci`
//! added first), gives the device the id of its [`crate::backend::AttachKey`] ([`ids`]:
//! `usbroute-port-1-3`, read back into the key when listing), for an unprivileged QEMU
//! passes the device as an open file, and sends its commands in one batch (`add.rs`).
//! Detach waits for `DEVICE_DELETED`. List reads QOM, never `info usb`.

mod add;
pub mod connector;
pub mod controllers;
mod detach;
pub mod driver;
pub mod fdpass;
pub mod ids;
pub mod known_buses;
pub mod listing;
mod presence;
pub mod qmp;
pub mod qom;
pub mod socket_watch;
pub mod usb_host;
pub mod vfio_attach;

pub use driver::{driver, QemuDriver};
pub use fdpass::FdPassing;
use fdpass::Pass;
pub use presence::SLOW_RETRY;

use crate::backend::qemu::qmp::{Qmp, QmpError};
use crate::backend::{AttachKey, AttachMode, BackendError, BoxFuture, VmBackend, VmUsbDevice};
use crate::inventory::{Device, Speed};
use crate::sysfs::SysfsRoot;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long `detach` waits for QEMU's `DEVICE_DELETED` unless told otherwise.
pub const DEFAULT_UNPLUG_TIMEOUT: Duration = Duration::from_secs(10);

/// Choices of the QEMU backend.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    /// When to pass the device to QEMU as an open file.
    pub fd_passing: FdPassing,
    /// How long detach waits for `DEVICE_DELETED`.
    pub unplug_timeout: Duration,
    /// Where `/dev/bus/usb` is read (the live host: `/`).
    pub root: SysfsRoot,
    /// How long connecting waits for QEMU's greeting ([`qmp::GREETING_TIMEOUT`]); `None`:
    /// until QEMU greets (the daemon keeps its place in the queue of a held monitor).
    pub greeting_timeout: Option<Duration>,
}

impl Default for QemuOptions {
    fn default() -> Self {
        QemuOptions {
            fd_passing: FdPassing::Auto,
            unplug_timeout: DEFAULT_UNPLUG_TIMEOUT,
            root: SysfsRoot::default(),
            greeting_timeout: Some(qmp::GREETING_TIMEOUT),
        }
    }
}

/// What to attach: the key, the device's speed (to choose a bus) and how to name it.
#[derive(Debug, Clone, PartialEq)]
pub struct AttachRequest {
    /// What the usb-host device matches on (and so its id).
    pub key: AttachKey,
    /// The device's speed, `None` if unknown (then only an xHCI bus fits).
    pub speed: Option<Speed>,
    /// The device as messages name it (`device 1-3 (bus 1 addr 5) 046d:c016 Logitech`).
    pub what: String,
}

/// What an attach did.
#[derive(Debug, Clone, PartialEq)]
pub struct Attached {
    /// The device as the VM has it now.
    pub device: VmUsbDevice,
    /// The VM bus it went on (empty when it was there already).
    pub bus: String,
    /// The id of a `qemu-xhci` added first because no controller fitted.
    pub added_controller: Option<String>,
    /// `true` when the device went to QEMU as an open file (`/dev/fdset/N`).
    pub fd_passed: bool,
    /// `true` when the VM had this device (our id) already; nothing was changed.
    pub already_there: bool,
    /// Things the user should know (an unprivileged QEMU needing device access).
    pub notes: Vec<String>,
}

/// What [`QemuBackend::send_attach`] sent and what QEMU answered.
struct SentAttach {
    bus: String,
    added_controller: Option<String>,
    fdset: Option<u64>,
    outcome: add::Outcome,
}

/// One QEMU VM, reached over its QMP socket.
#[derive(Debug, Clone)]
pub struct QemuBackend {
    name: String,
    qmp: Qmp,
    options: QemuOptions,
    /// The VM's USB controllers as this connection knows them.
    known: Arc<known_buses::KnownBuses>,
    /// How many files this connection has passed (for their fdset ids).
    fdsets: Arc<AtomicU64>,
}

impl QemuBackend {
    /// A backend over an open QMP connection; `name` is how messages name the VM.
    pub fn new(name: impl Into<String>, qmp: Qmp, options: QemuOptions) -> Self {
        QemuBackend {
            name: name.into(),
            qmp,
            options,
            known: Arc::default(),
            fdsets: Arc::default(),
        }
    }

    /// Connect to the QMP socket at `socket`; the VM is named after the socket path.
    pub async fn connect(socket: &Path, options: QemuOptions) -> Result<Self, BackendError> {
        Self::connect_as(&socket.display().to_string(), socket, options).await
    }

    /// Connect to VM `name`'s QMP socket at `socket`.
    pub async fn connect_as(
        name: &str,
        socket: &Path,
        options: QemuOptions,
    ) -> Result<Self, BackendError> {
        let greeting = options.greeting_timeout;
        let qmp = Qmp::connect_with(socket, greeting, qmp::DEFAULT_TIMEOUT)
            .await
            .map_err(|e| BackendError::Unreachable {
                vm: name.to_string(),
                source: Box::new(e),
            })?;
        Ok(Self::new(name, qmp, options))
    }

    /// The QMP connection.
    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// How messages name `device`: `device 1-3 (bus 1 addr 5) 046d:c016 Logitech Mouse`.
    pub fn describe(device: &Device) -> String {
        let address = device
            .address
            .map_or_else(|| "addr unknown".to_string(), |a| format!("addr {a}"));
        format!(
            "device {} (bus {} {address}) {}",
            device.port,
            device.bus,
            device.label()
        )
    }

    /// Every usb-host device of the VM, with `attached` read from QEMU.
    pub async fn list_devices(&self) -> Result<Vec<VmUsbDevice>, BackendError> {
        listing::usb_hosts(&self.qmp)
            .await
            .map_err(|e| self.qmp_error(e))
    }

    /// Attach `device` matching by `mode`; refuses hubs and devices lacking what the mode
    /// needs.
    pub async fn attach_device(
        &self,
        device: &Device,
        mode: AttachMode,
    ) -> Result<Attached, BackendError> {
        let request = usb_host::request_for(device, mode).map_err(|reason| self.refused(reason))?;
        self.attach_request(request).await
    }

    /// Attach what `request` describes. Leaves no usb-host device and no passed file behind
    /// when it fails (a `qemu-xhci` added for it stays: see [`Attached::added_controller`]).
    ///
    /// One round trip to QEMU when the VM's buses are known ([`QemuBackend::learn_buses`]):
    /// `add-fd`, `device_add`, `remove-fd` by address with a passed file, `device_add`
    /// alone by address without, `device_add` and a read of `attached` by port or id (the
    /// engine's attach, [`VmBackend::attach`], leaves the read out)
    /// (`add.rs`). Whether the VM had the device already is asked only when QEMU refuses.
    pub async fn attach_request(&self, request: AttachRequest) -> Result<Attached, BackendError> {
        self.attach_reading(request, true).await
    }

    /// [`QemuBackend::attach_request`], reading `attached` back by port or id only when
    /// `read_attached`. The engine needs QEMU to hold the place, not the read, which is one
    /// more command on QEMU's queue (0.1 to 0.4 ms in the daemon bench); unread, the device
    /// returned says `attached: false` and the next list reads it.
    async fn attach_reading(
        &self,
        request: AttachRequest,
        read_attached: bool,
    ) -> Result<Attached, BackendError> {
        let AttachRequest { key, speed, what } = request;
        let (mode, id) = (key.mode(), ids::device_id(&key));
        let peer = self.qmp.peer();
        let mut pass_fd = fdpass::decide(self.options.fd_passing, mode, peer)
            .map_err(|reason| self.refused(format!("{what}: {reason}")))?;
        if pass_fd == Pass::IfItOpens && !self.qmp.can_pass_fds().await {
            pass_fd = Pass::No; // QMP over a serial line or TCP: no SCM_RIGHTS
        }
        let notes: Vec<String> = fdpass::unprivileged_note(mode, peer).into_iter().collect();

        // Look at the host before touching the VM: an absent device then changes nothing
        // (not even a controller added for it, which on q35 the guest would have to release).
        let file = match &key {
            AttachKey::Address { bus, address } => {
                match self.check_node(&what, *bus, *address, pass_fd) {
                    Ok(file) => file,
                    Err(e) => return self.already_there(&id, notes).await?.ok_or(e),
                }
            }
            _ => None,
        };

        let confirm = read_attached && mode != AttachMode::Address;
        let SentAttach {
            bus,
            added_controller,
            fdset,
            outcome,
        } = self
            .send_attach(&key, speed, &what, file.as_ref(), confirm)
            .await?;
        if let Err(e) = outcome.added() {
            if let Some(there) = self.already_there(&id, notes).await? {
                return Ok(there);
            }
            let mut err = self.attach_error(e, &what, &key, fdset.is_some());
            if let (Some(id), BackendError::Refused { reason, .. }) = (&added_controller, &mut err)
            {
                reason.push_str(&format!(
                    " (the qemu-xhci `{id}` added for it stays, for the next attach)"
                ));
            }
            return Err(err);
        }
        let attached = match outcome.attached {
            // By address (or passed file) QEMU opened and attached it inside device_add.
            None => mode == AttachMode::Address,
            Some(read) => read
                .map_err(|e| self.qmp_error(e))?
                .as_bool()
                .unwrap_or(false),
        };
        let device = VmUsbDevice {
            id,
            attached,
            matcher: listing::match_of_key(&key),
            key: Some(key),
        };
        Ok(Attached {
            device,
            bus,
            added_controller,
            fd_passed: fdset.is_some(),
            already_there: false,
            notes,
        })
    }

    /// Choose the bus and send the attach's batch. A `device_add` refused because its bus
    /// is gone is sent once more on a fresh listing: QEMU sends `DEVICE_DELETED` when a
    /// removed controller is finalized, which can come well after its removal (seen on
    /// QEMU 10.0: a `qemu-xhci` unplugged from a powered-off PCIe slot of a paused VM
    /// left QOM at once, its event did not come).
    async fn send_attach(
        &self,
        key: &AttachKey,
        speed: Option<Speed>,
        what: &str,
        file: Option<&std::fs::File>,
        confirm: bool,
    ) -> Result<SentAttach, BackendError> {
        let id = ids::device_id(key);
        let mut listed_again = false;
        loop {
            let (bus, added_controller) = self.bus_for(speed, what).await?;
            let fdset = file.map(|_| add::fdset_id(self.fdsets.fetch_add(1, Ordering::Relaxed)));
            let arguments = usb_host::device_add_arguments(key, &bus);
            let commands = add::commands(arguments, &id, fdset, confirm);
            let results = self
                .qmp
                .execute_batch(commands, file.map(|f| f.as_fd()))
                .await;
            let outcome = add::Outcome::from_results(results, fdset.is_some(), confirm);
            let bus_gone = matches!(
                outcome.added(),
                Err(QmpError::Command { desc, .. }) if desc.contains(&format!("'{bus}'"))
            );
            if bus_gone {
                self.known.forget();
                if !listed_again {
                    listed_again = true;
                    continue;
                }
            }
            return Ok(SentAttach {
                bus,
                added_controller,
                fdset,
                outcome,
            });
        }
    }

    /// The VM's USB buses as listed now; later attaches choose among them without asking
    /// QEMU (kept current from its events: [`known_buses`]). The daemon calls this at
    /// connect; otherwise the first attach does.
    pub async fn learn_buses(&self) -> Result<Vec<controllers::VmUsbBus>, BackendError> {
        self.known
            .learn(&self.qmp)
            .await
            .map_err(|e| self.qmp_error(e))
    }

    /// The VM's USB buses as this connection knows them, `None` before they are listed
    /// (or after they were forgotten).
    pub fn known_buses(&self) -> Option<Vec<controllers::VmUsbBus>> {
        self.known.buses()
    }

    /// What to answer when the VM turns out to have our device `id` already.
    async fn already_there(
        &self,
        id: &str,
        notes: Vec<String>,
    ) -> Result<Option<Attached>, BackendError> {
        Ok(self.existing(id).await?.map(|device| Attached {
            device,
            bus: String::new(),
            added_controller: None,
            fd_passed: false,
            already_there: true,
            notes,
        }))
    }

    /// The device with id `id`, if the VM has it (one `qom-list`, no reads of the others).
    async fn existing(&self, id: &str) -> Result<Option<VmUsbDevice>, BackendError> {
        let ids = qom::children(&self.qmp, "/machine/peripheral")
            .await
            .map_err(|e| self.qmp_error(e))?;
        let Some(child) = ids.into_iter().find(|c| c.name == id) else {
            return Ok(None);
        };
        listing::read_one(&self.qmp, child.name, child.path)
            .await
            .map(Some)
            .map_err(|e| self.qmp_error(e))
    }

    /// The bus for a device of `speed`, from the known buses; when none fits, the VM is
    /// listed again (a controller added through another monitor sends no event), and a
    /// `qemu-xhci` is added only when still none fits.
    async fn bus_for(
        &self,
        speed: Option<Speed>,
        what: &str,
    ) -> Result<(String, Option<String>), BackendError> {
        let known = self.known.buses();
        if let Some(bus) = known
            .as_deref()
            .and_then(|b| controllers::choose_bus(b, speed))
        {
            return Ok((bus.name.clone(), None));
        }
        let buses = self.learn_buses().await?;
        if let Some(bus) = controllers::choose_bus(&buses, speed) {
            return Ok((bus.name.clone(), None));
        }
        tracing::info!(vm = %self.name, "no USB controller fits {what}; adding a qemu-xhci");
        match controllers::add_xhci(&self.qmp).await {
            Ok(controller) => {
                let bus = controller.buses[0].clone();
                self.known.added(controller);
                Ok((bus, Some(controllers::ADDED_CONTROLLER_ID.to_string())))
            }
            Err(controllers::AddControllerError::Qmp(e)) => Err(self.qmp_error(e)),
            Err(controllers::AddControllerError::NoSlot { tried }) => Err(self.refused(format!(
                "no USB controller fits {what} ({}), and a qemu-xhci could not be added: {}; \
                 start the VM with `-device qemu-xhci,id=xhci` (or give it a free \
                 pcie-root-port)",
                describe_buses(&buses),
                tried.join("; ")
            ))),
        }
    }

    /// For an attach by address: is the device node there, and (when passing it) open it.
    fn check_node(
        &self,
        what: &str,
        bus: u8,
        address: u16,
        pass_fd: Pass,
    ) -> Result<Option<std::fs::File>, BackendError> {
        let node = fdpass::device_node(&self.options.root, bus, address);
        let open = || fdpass::open_device_node(&self.options.root, bus, address).map(Some);
        let exists = || std::fs::metadata(&node).map(|_| None);
        let opened = match pass_fd {
            Pass::No => exists(),
            Pass::Yes => open(),
            Pass::IfItOpens => match open() {
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => exists(),
                other => other,
            },
        };
        opened.map_err(|e| {
            let fix = match e.kind() {
                std::io::ErrorKind::NotFound => {
                    return self.refused(format!(
                        "{what} is not on this host (no {}); use --by port or --by id to \
                         attach it when it appears",
                        node.display()
                    ))
                }
                std::io::ErrorKind::PermissionDenied => {
                    "run usbroute as root, or use --fd-passing never if QEMU may open it itself"
                }
                _ => "check the device node",
            };
            self.refused(format!(
                "{what}: cannot open {} to pass it to QEMU: {e}; {fix}",
                node.display()
            ))
        })
    }

    fn attach_error(
        &self,
        e: QmpError,
        what: &str,
        key: &AttachKey,
        fd_passed: bool,
    ) -> BackendError {
        let QmpError::Command { desc, .. } = &e else {
            return self.qmp_error(e);
        };
        let hint = if desc.contains("failed to find host usb device") {
            "the device is not on this host; use --by port or --by id to attach it when it appears"
                .to_string()
        } else if desc.contains("failed to open host usb device") && fd_passed {
            "QEMU could not use the passed file as a USB device (is it really a \
             /dev/bus/usb node?)"
                .to_string()
        } else if desc.contains("failed to open host usb device") {
            match key {
                AttachKey::Address { bus, address } => format!(
                    "QEMU could not open /dev/bus/usb/{bus:03}/{address:03} (permissions? the \
                     device in use?); --fd-passing always lets usbroute open it for QEMU"
                ),
                _ => "QEMU could not open the device (permissions? in use?)".to_string(),
            }
        } else {
            "see QEMU's words".to_string()
        };
        self.refused(format!(
            "cannot attach {what}: QEMU said \"{desc}\"; {hint}"
        ))
    }

    pub(super) fn refused(&self, reason: String) -> BackendError {
        BackendError::Refused {
            vm: self.name.clone(),
            reason,
        }
    }

    pub(super) fn qmp_error(&self, e: QmpError) -> BackendError {
        match e {
            QmpError::Timeout { command, seconds } => BackendError::Timeout {
                vm: self.name.clone(),
                what: format!("`{command}`"),
                seconds,
            },
            QmpError::Command { .. } => self.refused(e.to_string()),
            other => BackendError::Unreachable {
                vm: self.name.clone(),
                source: Box::new(other),
            },
        }
    }
}

fn describe_buses(buses: &[controllers::VmUsbBus]) -> String {
    if buses.is_empty() {
        return "the VM has no USB controller".to_string();
    }
    let names: Vec<String> = buses
        .iter()
        .map(|b| format!("{} on {}", b.name, b.controller_type))
        .collect();
    format!("the VM has {}", names.join(", "))
}

impl VmBackend for QemuBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<VmUsbDevice>, BackendError>> {
        Box::pin(self.list_devices())
    }

    fn attach<'a>(
        &'a self,
        device: &'a Device,
        mode: AttachMode,
    ) -> BoxFuture<'a, Result<VmUsbDevice, BackendError>> {
        Box::pin(async move {
            let request =
                usb_host::request_for(device, mode).map_err(|reason| self.refused(reason))?;
            Ok(self.attach_reading(request, false).await?.device)
        })
    }

    fn detach<'a>(&'a self, key: &'a AttachKey) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move { self.detach_id(&ids::device_id(key)).await })
    }

    fn device_id(&self, key: &AttachKey) -> String {
        ids::device_id(key)
    }
}
