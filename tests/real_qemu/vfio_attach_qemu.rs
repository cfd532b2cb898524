//! `controller attach`'s QMP side against a real `qemu-system-x86_64`. The host has no
//! device bound to vfio-pci, so QEMU's refusal of a host function that does not exist is
//! the real error path; a successful hot-add of a real vfio device runs in the test bed.

use crate::qemu_support;

use qemu_support::QemuGuard;
use usbroute::backend::qemu::qmp::Qmp;
use usbroute::backend::qemu::vfio_attach::{self, AttachFailed};
use usbroute::inventory::PciAddress;
use usbroute::vfio::{AttachError, RootPort};

/// A function no host has (PCI domain ffff).
fn absent() -> PciAddress {
    "ffff:ff:1f.7".parse().expect("address")
}

#[tokio::test]
async fn free_root_ports_are_the_empty_named_and_anonymous_ones() {
    let qemu = QemuGuard::q35(&[
        "-device",
        "pcie-root-port,id=rp1,chassis=1",
        "-device",
        "pcie-root-port,id=rp2,chassis=2",
        "-device",
        "qemu-xhci,id=xhci,bus=rp2",
        "-device",
        "pcie-root-port,chassis=3",
    ]);
    let qmp = Qmp::connect(qemu.socket()).await.expect("connect");

    let free = vfio_attach::free_pcie_root_ports(&qmp)
        .await
        .expect("ports");

    assert_eq!(
        free.iter()
            .map(|p| p.bus.as_str())
            .filter(|b| *b == "rp1" || *b == "rp2")
            .collect::<Vec<_>>(),
        vec!["rp1"]
    );
    assert_eq!(free.len(), 2, "{free:?}");
}

#[tokio::test]
async fn attach_on_q35_without_a_free_root_port_says_how_to_start_qemu() {
    let qemu = QemuGuard::q35(&[]);
    let qmp = Qmp::connect(qemu.socket()).await.expect("connect");

    let err = vfio_attach::attach_group(&qmp, &[absent()])
        .await
        .expect_err("no port");

    assert!(
        matches!(
            &err,
            AttachFailed::Plan(AttachError::NoFreeRootPort {
                needed: 1,
                free: 0,
                ..
            })
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("-device pcie-root-port,id=rp1,chassis=1"),
        "{err}"
    );
}

#[tokio::test]
async fn attach_of_a_function_qemu_cannot_open_reports_qemus_words_and_leaves_nothing() {
    let qemu = QemuGuard::q35(&["-device", "pcie-root-port,id=rp1,chassis=1"]);
    let qmp = Qmp::connect(qemu.socket()).await.expect("connect");

    let err = vfio_attach::attach_group(&qmp, &[absent()])
        .await
        .expect_err("refused");
    let free_after: Vec<RootPort> = vfio_attach::free_pcie_root_ports(&qmp)
        .await
        .expect("ports");

    let line = usbroute::error_chain::one_line(&err);
    assert!(line.contains("QEMU did not take ffff:ff:1f.7"), "{line}");
    assert!(line.contains("no such host device"), "{line}");
    assert!(line.contains("nothing was added to the VM"), "{line}");
    assert!(
        !err.to_string().contains("no such host device"),
        "QEMU's words belong to the source, not the message: {err}"
    );
    assert_eq!(free_after.len(), 1);
}

#[tokio::test]
async fn attach_on_i440fx_adds_to_the_root_bus_and_reports_qemus_refusal() {
    let qemu = QemuGuard::start(&["-machine", "pc", "-m", "64"]);
    let qmp = Qmp::connect(qemu.socket()).await.expect("connect");

    let err = vfio_attach::attach_group(&qmp, &[absent()])
        .await
        .expect_err("refused");

    let line = usbroute::error_chain::one_line(&err);
    assert!(line.contains("no such host device"), "{line}");
}

#[tokio::test]
async fn attach_skips_a_function_the_vm_already_has_under_usbroutes_id() {
    let id = format!("id={}", usbroute::vfio::qemu_id(&absent()));
    let qemu = QemuGuard::q35(&["-device", &format!("pci-testdev,{id}")]);
    let qmp = Qmp::connect(qemu.socket()).await.expect("connect");

    let done = vfio_attach::attach_group(&qmp, &[absent()])
        .await
        .expect("nothing to add");

    assert_eq!((done.added.len(), done.already), (0, vec![absent()]));
}
