use super::*;

/// Recorded on the Xen test bed (../shared/notes/xen.md): port 1 of domain 1's qusb
/// controller 0 holding `1-1` after `xl usbdev-attach domu hostbus=1 hostaddr=2`, the other
/// ports empty; the controller's other nodes are as libxl writes them (not recorded), there
/// to be skipped.
fn recorded_attached() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "/local/domain/0/backend/qusb/1/0/frontend",
            "/local/domain/1/device/vusb/0",
        ),
        ("/local/domain/0/backend/qusb/1/0/frontend-id", "1"),
        ("/local/domain/0/backend/qusb/1/0/online", "1"),
        ("/local/domain/0/backend/qusb/1/0/state", "4"),
        ("/local/domain/0/backend/qusb/1/0/type", "qusb"),
        ("/local/domain/0/backend/qusb/1/0/usb-ver", "2"),
        ("/local/domain/0/backend/qusb/1/0/num-ports", "8"),
        ("/local/domain/0/backend/qusb/1/0/port/1", "1-1"),
        ("/local/domain/0/backend/qusb/1/0/port/2", ""),
        ("/local/domain/0/backend/qusb/1/0/port/3", ""),
    ]
}

fn host(devices: &[(&str, u16)]) -> BTreeMap<PortPath, u16> {
    devices
        .iter()
        .map(|(b, a)| (b.parse().unwrap(), *a))
        .collect()
}

fn our_mark() -> Mark {
    Mark {
        key: AttachKey::Address { bus: 1, address: 2 },
        busid: "1-1".parse().unwrap(),
        plug: HostAddr { bus: 1, address: 2 },
    }
}

fn with_mark(mut nodes: Vec<(&'static str, &'static str)>) -> Vec<(&'static str, &'static str)> {
    nodes.push((
        "/local/domain/0/backend/qusb/1/0/usbroute/1",
        "usbroute-addr-1-2 1-1 1:2",
    ));
    nodes
}

fn verdicts(nodes: &[(&str, &str)], devices: &[(&str, u16)]) -> Vec<(u8, PortVerdict, bool)> {
    judge(&domain_ports(1, nodes.iter().copied()), &host(devices))
        .into_iter()
        .map(|r| (r.port, r.verdict, r.leftover_mark))
        .collect()
}

#[test]
fn recording_of_an_attached_port_reads_its_busid_and_skips_the_other_nodes() {
    let read = domain_ports(1, recorded_attached());

    assert_eq!(read.ports.len(), 3);
    assert_eq!(
        read.ports[&(0, 1)],
        PortValue::Busid("1-1".parse().unwrap())
    );
    assert_eq!(read.ports[&(0, 2)], PortValue::Empty);
    assert!(read.marks.is_empty());
}

#[test]
fn recording_of_a_port_attached_by_hand_is_not_ours_and_present() {
    let v = verdicts(&recorded_attached(), &[("1-1", 2)]);

    assert_eq!(
        v[0],
        (
            1,
            PortVerdict::NotOurs {
                value: PortValue::Busid("1-1".parse().unwrap()),
                present: true
            },
            false
        )
    );
    assert_eq!(v[1], (2, PortVerdict::Free, false));
}

#[test]
fn our_mark_with_the_same_plug_on_the_host_is_ours() {
    let v = verdicts(&with_mark(recorded_attached()), &[("1-1", 2)]);

    assert_eq!(v[0], (1, PortVerdict::Ours { mark: our_mark() }, false));
}

#[test]
fn recording_after_surprise_removal_our_port_is_stale_and_emptied_by_a_write() {
    // The note: the device vanished, port/1 keeps `1-1`, xl says "Unknown device".
    let v = verdicts(&with_mark(recorded_attached()), &[]);

    assert_eq!(
        v[0],
        (
            1,
            PortVerdict::StaleOurs {
                mark: our_mark(),
                clearing: Clearing::WriteEmpty
            },
            false
        )
    );
}

#[test]
fn a_replug_at_the_same_busid_makes_our_port_stale_and_cleared_by_xl_detach() {
    let v = verdicts(&with_mark(recorded_attached()), &[("1-1", 9)]);

    assert_eq!(
        v[0],
        (
            1,
            PortVerdict::StaleOurs {
                mark: our_mark(),
                clearing: Clearing::Detach
            },
            false
        )
    );
}

#[test]
fn a_mark_on_a_port_someone_else_took_is_left_over_and_the_port_not_ours() {
    let mut nodes = recorded_attached();
    nodes[7].1 = "3-1";

    let v = verdicts(&with_mark(nodes), &[("3-1", 4)]);

    assert!(
        matches!(v[0], (1, PortVerdict::NotOurs { present: true, .. }, true)),
        "{v:?}"
    );
}

#[test]
fn a_mark_on_an_empty_port_is_left_over_and_the_port_free() {
    let mut nodes = recorded_attached();
    nodes[7].1 = "";

    let v = verdicts(&with_mark(nodes), &[]);

    assert_eq!(v[0], (1, PortVerdict::Free, true));
}

#[test]
fn other_domains_backends_and_odd_paths_are_skipped() {
    let nodes = [
        ("/local/domain/0/backend/qusb/12/0/port/1", "1-1"),
        ("/local/domain/0/backend/vbd/1/0/port/1", "1-1"),
        ("/local/domain/0/backend/qusb/1/00/port/1", "1-1"),
        ("/local/domain/0/backend/qusb/1/0/port/256", "1-1"),
        ("/local/domain/0/backend/qusb/1/0/port/1/x", "1-1"),
    ];

    assert_eq!(domain_ports(1, nodes), DomainPorts::default());
}

#[test]
fn a_value_that_is_no_busid_is_never_free_nor_ours() {
    let nodes = [
        ("/local/domain/0/backend/qusb/1/0/port/1", "garbage"),
        (
            "/local/domain/0/backend/qusb/1/0/usbroute/1",
            "usbroute-addr-1-2 1-1 1:2",
        ),
    ];

    let v = verdicts(&nodes, &[]);

    assert_eq!(
        v[0],
        (
            1,
            PortVerdict::NotOurs {
                value: PortValue::Unreadable("garbage".into()),
                present: false
            },
            true
        )
    );
}

#[test]
fn a_mark_reads_back_only_in_the_spelling_it_is_written() {
    assert_eq!(Mark::parse(&our_mark().value()), Some(our_mark()));
    for odd in [
        "usbroute-addr-1-2 1-1 1:02",
        "usbroute-addr-1-2  1-1 1:2",
        "usbroute-addr-1-2 1-1",
        "x 1-1 1:2",
        "usbroute-addr-1-2 1-1 1:99999999",
    ] {
        assert_eq!(Mark::parse(odd), None, "{odd}");
    }
}

#[test]
fn the_listing_names_ours_by_key_and_theirs_by_controller_and_port() {
    let mut nodes = with_mark(recorded_attached());
    nodes.push(("/local/domain/0/backend/qusb/1/0/port/2", "3-1"));
    let host = host(&[("1-1", 2), ("3-1", 4)]);

    let listed = listing(&judge(&domain_ports(1, nodes), &host), &host);

    let shown: Vec<(&str, bool, bool)> = listed
        .iter()
        .map(|d| (d.id.as_str(), d.attached, d.is_ours()))
        .collect();
    assert_eq!(
        shown,
        [("usbroute-addr-1-2", true, true), ("xen-0-2", true, false)]
    );
    assert_eq!(listed[1].matcher, HostMatch::Address { bus: 3, address: 4 });
}

#[test]
fn a_stale_port_of_ours_is_listed_as_not_attached() {
    let host = host(&[]);

    let listed = listing(
        &judge(&domain_ports(1, with_mark(recorded_attached())), &host),
        &host,
    );

    assert_eq!((listed[0].attached, listed[0].is_ours()), (false, true));
}

#[test]
fn the_paths_written_are_the_ones_read() {
    let nodes = [
        (port_path(5, 2, 3), "1-4"),
        (mark_path(5, 2, 3), "usbroute-addr-1-7 1-4 1:7"),
    ];

    let read = domain_ports(5, nodes.iter().map(|(p, v)| (p.as_str(), *v)));

    assert_eq!(read.ports.keys().collect::<Vec<_>>(), [&(2, 3)]);
    assert_eq!(read.marks.keys().collect::<Vec<_>>(), [&(2, 3)]);
}
