//! The QMP conversation of `controller attach`: ask QEMU what it is and which root ports
//! are empty, add the group's functions, and take back what was added if one fails.

use crate::backend::qemu::qmp::{Qmp, QmpError};
use crate::inventory::PciAddress;
use crate::vfio::{free_root_ports, plan_attach, qemu_id, AttachError, Machine, RootPort};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// What `attach_group` did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttachOutcome {
    /// The VM's machine.
    pub machine: Machine,
    /// Functions added now: host address, QEMU id, bus.
    pub added: Vec<AttachedFunction>,
    /// Functions the VM already had (by usbroute's id for them).
    pub already: Vec<PciAddress>,
}

/// One function in the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttachedFunction {
    /// The host function.
    pub pci: PciAddress,
    /// Its QEMU device id.
    pub id: String,
    /// The bus it went on (`None`: the root bus).
    pub bus: Option<String>,
}

/// Why an attach failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachFailed {
    /// The VM cannot take the group as it is.
    #[error(transparent)]
    Plan(#[from] AttachError),
    /// Asking QEMU failed.
    #[error("Cannot ask the VM about its PCI buses")]
    Query(#[source] QmpError),
    /// A `device_add` was refused; the ones before it were taken back.
    #[error("QEMU did not take {pci} ({undone})")]
    DeviceAdd {
        /// The function refused.
        pci: PciAddress,
        /// What was taken back.
        undone: String,
        /// QEMU's refusal.
        #[source]
        source: QmpError,
    },
}

/// Hot-add `members` (a whole IOMMU group, already on vfio-pci on the host) to the VM
/// behind `qmp`. Functions the VM already has (by their usbroute id) are skipped.
pub async fn attach_group(
    qmp: &Qmp,
    members: &[PciAddress],
) -> Result<AttachOutcome, AttachFailed> {
    let machine_type = qmp
        .execute(
            "qom-get",
            Some(json!({"path": "/machine", "property": "type"})),
        )
        .await
        .map_err(AttachFailed::Query)?;
    let machine = Machine::from_qom_type(machine_type.as_str().unwrap_or_default());
    let devices = peripherals(qmp).await.map_err(AttachFailed::Query)?;
    let existing: BTreeSet<&str> = devices.iter().map(|d| d.name.as_str()).collect();
    let (already, missing): (Vec<PciAddress>, Vec<PciAddress>) = members
        .iter()
        .partition(|p| existing.contains(qemu_id(p).as_str()));
    let free = if machine == Machine::Q35 {
        let (ports, occupied) = root_ports(qmp, &devices)
            .await
            .map_err(AttachFailed::Query)?;
        free_root_ports(&ports, &occupied)
    } else {
        Vec::new()
    };
    let adds = plan_attach(&missing, &machine, &free)?;
    let mut added: Vec<AttachedFunction> = Vec::new();
    for add in adds {
        if let Err(source) = qmp.execute("device_add", Some(add.arguments.clone())).await {
            let undone = take_back(qmp, &added).await;
            return Err(AttachFailed::DeviceAdd {
                pci: add.pci,
                undone,
                source,
            });
        }
        added.push(AttachedFunction {
            pci: add.pci,
            id: add.id,
            bus: add.arguments["bus"].as_str().map(str::to_string),
        });
    }
    Ok(AttachOutcome {
        machine,
        added,
        already,
    })
}

/// `device_del` what was added, newest first; says what happened in one sentence.
async fn take_back(qmp: &Qmp, added: &[AttachedFunction]) -> String {
    if added.is_empty() {
        return "nothing was added to the VM".to_string();
    }
    let mut failed = Vec::new();
    for f in added.iter().rev() {
        if let Err(e) = qmp.execute("device_del", Some(json!({"id": f.id}))).await {
            failed.push(format!("{} ({})", f.id, crate::error_chain::one_line(&e)));
        }
    }
    let ids: Vec<&str> = added.iter().map(|f| f.id.as_str()).collect();
    if failed.is_empty() {
        format!(
            "asked the VM to remove what was added before it: {}",
            ids.join(", ")
        )
    } else {
        format!(
            "removing what was added before it failed for: {}",
            failed.join(", ")
        )
    }
}

/// The VM's empty `pcie-root-port`s (no device names their bus as its `parent_bus`).
pub async fn free_pcie_root_ports(qmp: &Qmp) -> Result<Vec<RootPort>, QmpError> {
    free_ports_among(qmp, &peripherals(qmp).await?).await
}

async fn free_ports_among(qmp: &Qmp, devices: &[Peripheral]) -> Result<Vec<RootPort>, QmpError> {
    let (ports, occupied) = root_ports(qmp, devices).await?;
    Ok(free_root_ports(&ports, &occupied))
}

/// The most user-created devices one listing reads. Each costs a `qom-get` (and a
/// `qom-list` for a root port), so without a cap a peer answering `qom-list` with a
/// million children would make one attach send millions of commands; real VMs have
/// a few dozen.
pub const MAX_PERIPHERALS: usize = 1024;

/// A user-created device of the VM.
struct Peripheral {
    name: String,
    path: String,
    type_name: String,
}

/// Every device under `/machine/peripheral` (named) and `/machine/peripheral-anon`.
async fn peripherals(qmp: &Qmp) -> Result<Vec<Peripheral>, QmpError> {
    let mut found = Vec::new();
    for container in ["/machine/peripheral", "/machine/peripheral-anon"] {
        found.extend(
            children(qmp, container)
                .await?
                .into_iter()
                .map(|(name, type_name)| Peripheral {
                    path: format!("{container}/{name}"),
                    name,
                    type_name,
                }),
        );
    }
    if found.len() > MAX_PERIPHERALS {
        return Err(QmpError::TooMany {
            what: "user-created devices".into(),
            count: found.len(),
            limit: MAX_PERIPHERALS,
        });
    }
    Ok(found)
}

/// `(name, T)` of each `child<T>` property of the object at `path`.
async fn children(qmp: &Qmp, path: &str) -> Result<Vec<(String, String)>, QmpError> {
    let list = qmp.execute("qom-list", Some(json!({"path": path}))).await?;
    Ok(list
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|p| {
            let name = p.get("name")?.as_str()?;
            let t = p
                .get("type")?
                .as_str()?
                .strip_prefix("child<")?
                .strip_suffix('>')?;
            Some((name.to_string(), t.to_string()))
        })
        .collect())
}

/// The VM's root ports with the bus behind each, and the QOM paths of every bus some
/// device sits on.
async fn root_ports(
    qmp: &Qmp,
    devices: &[Peripheral],
) -> Result<(Vec<RootPort>, BTreeSet<String>), QmpError> {
    let mut ports = Vec::new();
    let mut occupied = BTreeSet::new();
    for d in devices {
        if d.type_name == "pcie-root-port" {
            // The port's bus is its child of type PCIE (named after the port's id).
            let bus = children(qmp, &d.path)
                .await?
                .into_iter()
                .find(|(_, t)| t == "PCIE");
            if let Some((bus, _)) = bus {
                ports.push(RootPort {
                    bus_path: format!("{}/{bus}", d.path),
                    bus,
                });
            }
        }
        let parent = qmp
            .execute(
                "qom-get",
                Some(json!({"path": d.path, "property": "parent_bus"})),
            )
            .await;
        if let Ok(Value::String(p)) = parent {
            occupied.insert(p);
        }
    }
    Ok((ports, occupied))
}
