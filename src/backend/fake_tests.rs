//! The fake VM's own behaviour: its faults and its host. What it shares with QEMU is
//! pinned by `tests/real_qemu/backend_contract.rs` against both.

use super::*;
use crate::inventory::HexId;
use std::time::Duration;

fn mouse(port: &str, address: u16) -> Device {
    Device {
        address: Some(address),
        vendor_id: Some(HexId(0x046d)),
        product_id: Some(HexId(0xc016)),
        ..Device::at(port.parse().expect("port"))
    }
}

const MOUSE_BY_ADDRESS: &str = "usbroute-addr-1-5";

fn host_with_mouse() -> (FakeHost, Arc<FakeVm>) {
    let host = FakeHost::new();
    host.plug(mouse("1-1", 5));
    let vm = host.start("a");
    (host, vm)
}

#[tokio::test]
async fn a_refused_attach_changes_nothing_and_says_so() {
    let (_host, vm) = host_with_mouse();
    vm.inject_on(Call::Attach, Fault::Refuse);

    let err = vm.attach(&mouse("1-1", 5), AttachMode::Address).await;

    assert!(matches!(err, Err(BackendError::Refused { .. })), "{err:?}");
    assert_eq!(
        (vm.ids(), vm.calls()),
        (vec![], vec!["attach usbroute-addr-1-5".into()])
    );
}

#[tokio::test]
async fn an_attach_whose_answer_is_lost_was_done_all_the_same() {
    let (_host, vm) = host_with_mouse();
    vm.inject(Fault::LoseAnswer);

    let err = vm.attach(&mouse("1-1", 5), AttachMode::Address).await;

    assert!(matches!(err, Err(BackendError::Timeout { .. })), "{err:?}");
    assert_eq!(vm.ids(), vec![MOUSE_BY_ADDRESS]);
}

#[tokio::test]
async fn a_fault_for_attaches_waits_for_an_attach() {
    let (_host, vm) = host_with_mouse();
    vm.inject_on(Call::Attach, Fault::Refuse);

    let listed = vm.list().await;
    let attached = vm.attach(&mouse("1-1", 5), AttachMode::Address).await;

    assert!(
        listed.is_ok() && attached.is_err(),
        "{listed:?} {attached:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hung_call_never_answers_and_the_next_one_does() {
    let (_host, vm) = host_with_mouse();
    vm.inject(Fault::Hang);

    let hung = tokio::time::timeout(Duration::from_secs(3600), vm.list()).await;
    let next = vm.list().await;

    assert!(hung.is_err(), "the hung list answered");
    assert!(next.is_ok(), "{next:?}");
}

#[tokio::test(start_paused = true)]
async fn a_hanging_vm_answers_once_it_is_let_go() {
    let (_host, vm) = host_with_mouse();
    vm.hang(true);
    let waiting = {
        let vm = Arc::clone(&vm);
        tokio::spawn(async move { vm.list().await })
    };
    tokio::time::sleep(Duration::from_secs(60)).await;
    let answered_while_hanging = waiting.is_finished();

    vm.hang(false);
    let answer = waiting.await.expect("task");

    assert!(!answered_while_hanging);
    assert!(answer.is_ok(), "{answer:?}");
}

#[tokio::test]
async fn a_dropped_connection_closes_and_stays_unreachable_until_reconnected() {
    let (host, vm) = host_with_mouse();
    vm.attach(&mouse("1-1", 5), AttachMode::Address)
        .await
        .expect("attach");
    let connection = vm.connection();
    vm.inject(Fault::DropConnection);

    let dropped = vm.list().await;
    let after = vm.list().await;
    tokio::time::timeout(Duration::from_secs(5), connection.closed)
        .await
        .expect("closed resolves");
    let again = host.connect("a").list().await.expect("list");

    assert!(matches!(dropped, Err(BackendError::Unreachable { .. })));
    assert!(matches!(after, Err(BackendError::Unreachable { .. })));
    assert_eq!(again.len(), 1, "the VM kept its device: {again:?}");
}

#[tokio::test]
async fn a_restarted_vm_has_nothing_and_old_handles_are_unreachable() {
    let (host, vm) = host_with_mouse();
    vm.attach(&mouse("1-1", 5), AttachMode::Address)
        .await
        .expect("attach");

    let new = host.start("a");
    let old = vm.list().await;

    assert!(matches!(old, Err(BackendError::Unreachable { .. })));
    assert_eq!(new.list().await.expect("list"), vec![]);
}

#[tokio::test]
async fn an_address_entry_whose_plug_went_away_is_never_attached_again() {
    let (host, vm) = host_with_mouse();
    vm.attach(&mouse("1-1", 5), AttachMode::Address)
        .await
        .expect("attach");

    host.unplug(&"1-1".parse().expect("port"));
    host.plug(mouse("1-1", 5));

    let listed = vm.list().await.expect("list");
    assert_eq!(
        (listed[0].id.as_str(), listed[0].attached),
        (MOUSE_BY_ADDRESS, false)
    );
}

#[tokio::test]
async fn a_device_attached_to_two_vms_is_recorded_as_a_conflict() {
    let (host, a) = host_with_mouse();
    let b = host.start("b");
    a.attach(&mouse("1-1", 5), AttachMode::Address)
        .await
        .expect("attach to a");

    b.attach(&mouse("1-1", 5), AttachMode::Port)
        .await
        .expect("attach to b");

    assert_eq!(
        host.conflicts(),
        vec!["b: attach of usbroute-port-1-1 while held by [\"a/usbroute-addr-1-5\"]"]
    );
}
