//! The contract between the fake VM (`usbroute::backend::fake`) and QEMU: the same cases,
//! through the `VmBackend` trait, against the fake and against a real
//! `qemu-system-x86_64` through `backend::qemu`, so the fake the engine's tests run on
//! cannot drift from what QEMU does. This host has no USB devices, and neither has the
//! fake's host here: by port and by id an attach is accepted but not attached, by address
//! it is refused.
//!
//! A case is one async function taking a [`Peer`]; `contract!` runs each against both.

use crate::qemu_support;

use qemu_support::{host_device, QemuGuard};
use std::sync::Arc;
use usbroute::backend::fake::FakeHost;
use usbroute::backend::qemu::{QemuBackend, QemuOptions};
use usbroute::backend::{AttachKey, AttachMode, BackendError, HostMatch, VmBackend, VmUsbDevice};
use usbroute::inventory::{Device, HexId};

/// Which VM a case runs against.
#[derive(Clone, Copy)]
enum Peer {
    Fake,
    Qemu,
}

/// A usb-host device the VM has before we connect (`-device usb-host,...` for QEMU).
struct Before {
    id: &'static str,
    vendor: u16,
    product: u16,
}

/// A started VM; what keeps it running is dropped with it.
struct Vm {
    backend: Arc<dyn VmBackend>,
    _qemu: Option<QemuGuard>,
}

impl Peer {
    async fn start(self, before: &[Before]) -> Vm {
        match self {
            Peer::Fake => {
                let vm = FakeHost::new().start("vm");
                for b in before {
                    let matcher = HostMatch::Id {
                        vendor_id: HexId(b.vendor),
                        product_id: HexId(b.product),
                    };
                    vm.insert(b.id, matcher);
                }
                Vm {
                    backend: vm,
                    _qemu: None,
                }
            }
            Peer::Qemu => {
                let devices: Vec<String> = before
                    .iter()
                    .map(|b| {
                        format!(
                            "usb-host,id={},bus=xhci.0,vendorid={:#06x},productid={:#06x}",
                            b.id, b.vendor, b.product
                        )
                    })
                    .collect();
                let mut args = vec!["-device", "qemu-xhci,id=xhci"];
                for d in &devices {
                    args.extend(["-device", d.as_str()]);
                }
                let qemu = QemuGuard::q35(&args);
                let backend = QemuBackend::connect(qemu.socket(), QemuOptions::default())
                    .await
                    .expect("connect to QEMU");
                Vm {
                    backend: Arc::new(backend),
                    _qemu: Some(qemu),
                }
            }
        }
    }
}

fn mouse() -> Device {
    host_device("1-3", 7, 0x046d, 0xc016, 12.0)
}

const MOUSE_BY_ID: &str = "usbroute-id-046d-c016";

const MOUSE_KIND: AttachKey = AttachKey::Id {
    vendor_id: HexId(0x046d),
    product_id: HexId(0xc016),
};

fn mouse_by_id() -> VmUsbDevice {
    VmUsbDevice {
        id: MOUSE_BY_ID.into(),
        attached: false,
        key: Some(MOUSE_KIND),
        matcher: HostMatch::Id {
            vendor_id: HexId(0x046d),
            product_id: HexId(0xc016),
        },
    }
}

async fn list(vm: &Vm) -> Vec<VmUsbDevice> {
    vm.backend.list().await.expect("list")
}

fn refused_text(result: Result<impl std::fmt::Debug, BackendError>) -> String {
    match result {
        Err(e @ BackendError::Refused { .. }) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn attach_by_port_is_ours_and_listed_not_attached(peer: Peer) {
    let vm = peer.start(&[]).await;

    let attached = vm.backend.attach(&mouse(), AttachMode::Port).await;

    let expected = VmUsbDevice {
        id: "usbroute-port-1-3".into(),
        attached: false,
        key: Some(AttachKey::Port("1-3".parse().unwrap())),
        matcher: HostMatch::Port {
            bus: 1,
            port: "3".into(),
        },
    };
    assert_eq!(attached.expect("attach"), expected);
    assert_eq!(list(&vm).await, vec![expected]);
}

async fn attach_by_id_is_ours_and_listed_not_attached(peer: Peer) {
    let vm = peer.start(&[]).await;

    let attached = vm.backend.attach(&mouse(), AttachMode::Id).await;

    assert_eq!(attached.expect("attach"), mouse_by_id());
    assert_eq!(list(&vm).await, vec![mouse_by_id()]);
}

async fn attach_by_address_of_an_absent_device_is_refused_and_leaves_nothing(peer: Peer) {
    let vm = peer.start(&[]).await;

    let text = refused_text(vm.backend.attach(&mouse(), AttachMode::Address).await);

    assert!(text.contains("device 1-3 (bus 1"), "{text}");
    assert_eq!(list(&vm).await, vec![]);
}

/// A VM that had the mouse attached by id.
async fn with_the_mouse_by_id(peer: Peer) -> Vm {
    let vm = peer.start(&[]).await;
    let attached = vm.backend.attach(&mouse(), AttachMode::Id).await;
    attached.expect("attach");
    vm
}

async fn detach_removes_the_device(peer: Peer) {
    let vm = with_the_mouse_by_id(peer).await;

    vm.backend.detach(&MOUSE_KIND).await.expect("detach");

    assert_eq!(list(&vm).await, vec![]);
}

async fn detach_of_a_missing_id_is_refused_naming_it(peer: Peer) {
    let vm = peer.start(&[]).await;
    let missing = AttachKey::Id {
        vendor_id: HexId(0xdead),
        product_id: HexId(0xbeef),
    };

    let text = refused_text(vm.backend.detach(&missing).await);

    assert!(
        text.contains("has no device `usbroute-id-dead-beef`"),
        "{text}"
    );
}

async fn attach_of_an_attached_device_changes_nothing(peer: Peer) {
    let vm = peer.start(&[]).await;
    let first = vm.backend.attach(&mouse(), AttachMode::Id).await;

    let second = vm.backend.attach(&mouse(), AttachMode::Id).await;

    assert_eq!(first.expect("attach"), mouse_by_id());
    assert_eq!(second.expect("attach again"), mouse_by_id());
    assert_eq!(list(&vm).await, vec![mouse_by_id()]);
}

async fn a_device_of_ours_from_before_is_listed_and_kept(peer: Peer) {
    let before = Before {
        id: MOUSE_BY_ID,
        vendor: 0x046d,
        product: 0xc016,
    };
    let vm = peer.start(&[before]).await;
    let listed = list(&vm).await;

    let attached = vm.backend.attach(&mouse(), AttachMode::Id).await;

    assert_eq!(listed, vec![mouse_by_id()]);
    assert_eq!(attached.expect("attach"), mouse_by_id());
    assert_eq!(list(&vm).await, vec![mouse_by_id()]);
}

async fn a_device_added_by_hand_is_listed_not_ours(peer: Peer) {
    let before = Before {
        id: "hostdev0",
        vendor: 0x1234,
        product: 0x5678,
    };
    let vm = peer.start(&[before]).await;

    let listed = list(&vm).await;

    let by_hand = VmUsbDevice {
        id: "hostdev0".into(),
        attached: false,
        key: None,
        matcher: HostMatch::Id {
            vendor_id: HexId(0x1234),
            product_id: HexId(0x5678),
        },
    };
    assert_eq!(listed, vec![by_hand]);
}

async fn a_device_of_ours_is_listed_under_the_name_device_id_gives(peer: Peer) {
    let vm = with_the_mouse_by_id(peer).await;

    let listed = list(&vm).await;

    let names: Vec<&str> = listed.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(names, vec![vm.backend.device_id(&MOUSE_KIND)]);
}

async fn a_hub_is_refused_and_leaves_nothing(peer: Peer) {
    let vm = peer.start(&[]).await;
    let mut hub = host_device("1-3", 2, 0x05e3, 0x0610, 480.0);
    hub.hub = true;

    let text = refused_text(vm.backend.attach(&hub, AttachMode::Port).await);

    assert!(text.contains("is a hub: QEMU cannot pass a hub"), "{text}");
    assert_eq!(list(&vm).await, vec![]);
}

/// Each case as a test against the fake (`fake::CASE`) and against QEMU (`qemu::CASE`).
macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod fake {
            $(#[tokio::test]
            async fn $case() {
                super::$case(super::Peer::Fake).await
            })*
        }
        mod qemu {
            $(#[tokio::test]
            async fn $case() {
                super::$case(super::Peer::Qemu).await
            })*
        }
    };
}

contract!(
    attach_by_port_is_ours_and_listed_not_attached,
    attach_by_id_is_ours_and_listed_not_attached,
    attach_by_address_of_an_absent_device_is_refused_and_leaves_nothing,
    detach_removes_the_device,
    detach_of_a_missing_id_is_refused_naming_it,
    attach_of_an_attached_device_changes_nothing,
    a_device_of_ours_from_before_is_listed_and_kept,
    a_device_added_by_hand_is_listed_not_ours,
    a_device_of_ours_is_listed_under_the_name_device_id_gives,
    a_hub_is_refused_and_leaves_nothing,
);
