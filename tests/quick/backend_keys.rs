//! What the engine knows our devices by: the attach mode's key ([`AttachKey`]), never a
//! hypervisor's device id. (QEMU's ids are `qemu_ids`; an engine run on a backend with
//! names of its own is in `policy_runtime`.)

use crate::policy_support;

use policy_support::device;
use usbroute::backend::{AttachKey, AttachMode, HostMatch, VmUsbDevice};
use usbroute::engine::{reconcile, Action, Actual, VmView};
use usbroute::policy::{Decision, Desired, Placement, Reason};

#[test]
fn each_attach_mode_is_named_as_the_config_spells_it() {
    let modes = [AttachMode::Address, AttachMode::Port, AttachMode::Id];

    let names = modes.map(AttachMode::name);

    assert_eq!(names, ["address", "port", "id"]);
    for (mode, name) in modes.iter().zip(names) {
        assert_eq!(serde_json::to_value(mode).unwrap(), name);
    }
}

const MOUSE: AttachKey = AttachKey::Address { bus: 1, address: 5 };

/// VM `a` lists one usb-host device named `id`, attached, with `key` as its backend read it.
fn vm_a_lists(id: &str, key: Option<AttachKey>) -> Actual {
    let listed = VmUsbDevice {
        id: id.into(),
        attached: true,
        key,
        matcher: HostMatch::Address { bus: 1, address: 5 },
    };
    let view = VmView {
        devices: vec![listed],
        reachable: true,
    };
    Actual::from([("a".to_string(), view)])
}

/// The plan: the mouse at 1-1 (address 5) to VM `a` by address, or on the host.
fn mouse_to(vm: Option<&str>) -> Desired {
    let placement = match vm {
        Some(vm) => Placement::Vm {
            vm: vm.into(),
            mode: AttachMode::Address,
        },
        None => Placement::Host,
    };
    let decision = Decision {
        placement,
        reason: Reason::NoRule,
    };
    Desired {
        devices: [("1-1".parse().unwrap(), decision)].into(),
    }
}

#[test]
fn a_device_listed_without_a_key_is_the_users_whatever_its_id_says() {
    let mouse = [device("1-1", 5)];
    let looks_ours = vm_a_lists("usbroute-addr-1-5", None);

    let on_host = reconcile(&mouse_to(None), &looks_ours, &mouse);
    let to_a = reconcile(&mouse_to(Some("a")), &looks_ours, &mouse);

    assert_eq!(on_host, vec![]);
    assert_eq!(
        to_a,
        vec![Action::Attach {
            vm: "a".into(),
            device: Box::new(mouse[0].clone()),
            mode: AttachMode::Address,
            key: MOUSE,
        }]
    );
}

#[test]
fn a_device_listed_with_a_key_is_ours_whatever_the_backend_calls_it() {
    let mouse = [device("1-1", 5)];
    let aliased = vm_a_lists("ua-0", Some(MOUSE));

    let on_host = reconcile(&mouse_to(None), &aliased, &mouse);
    let to_a = reconcile(&mouse_to(Some("a")), &aliased, &mouse);

    assert_eq!(
        on_host,
        vec![Action::Detach {
            vm: "a".into(),
            key: MOUSE,
        }]
    );
    assert_eq!(to_a, vec![]);
}
