//! The QMP client against a scripted FAKE peer, only for what a real QEMU cannot be made
//! to do: send garbage, stop mid-line, invent events, answer with ids nobody asked for.
//! Everything QEMU can do itself is tested against real QEMU in `qemu_qmp.rs`.

use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};
use usbroute::backend::qemu::qmp::{Qmp, QmpError};

/// The fake peer: the far end of an in-memory pipe, driven by each test's script.
mod fake_qmp_peer {
    use super::*;

    pub const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 99}, "package": "fake"}, "capabilities": []}}"#;

    pub struct FakePeer {
        lines: BufReader<tokio::io::ReadHalf<DuplexStream>>,
        write: tokio::io::WriteHalf<DuplexStream>,
    }

    impl FakePeer {
        /// Send raw bytes as they are (no line end added).
        pub async fn send_raw(&mut self, bytes: &str) {
            self.write.write_all(bytes.as_bytes()).await.expect("write");
            self.write.flush().await.expect("flush");
        }

        /// Send one line.
        pub async fn send(&mut self, line: &str) {
            self.send_raw(&format!("{line}\r\n")).await;
        }

        /// Read the next command the client sent.
        pub async fn next_command(&mut self) -> Value {
            let mut line = String::new();
            self.lines.read_line(&mut line).await.expect("read");
            serde_json::from_str(&line).expect("client sends JSON")
        }

        /// Read the next command and answer it with `ret`.
        pub async fn answer(&mut self, ret: Value) -> Value {
            let command = self.next_command().await;
            let reply = json!({"return": ret, "id": command["id"]});
            self.send(&reply.to_string()).await;
            command
        }

        /// Close the pipe.
        pub async fn close(mut self) {
            self.write.shutdown().await.expect("shutdown");
        }
    }

    /// A client and a fake peer that has greeted and accepted `qmp_capabilities`.
    pub async fn connected() -> (Qmp, FakePeer) {
        let (client_end, peer_end) = tokio::io::duplex(1 << 16);
        let (read, write) = tokio::io::split(peer_end);
        let mut peer = FakePeer {
            lines: BufReader::new(read),
            write,
        };
        let client = tokio::spawn(Qmp::from_stream(client_end));
        peer.send(GREETING).await;
        peer.answer(json!({})).await;
        let qmp = client.await.expect("join").expect("handshake");
        (qmp, peer)
    }

    /// A client whose peer sends `greeting` first; returns the handshake's result.
    pub async fn greeted_with(greeting: &str) -> Result<Qmp, QmpError> {
        let (client_end, peer_end) = tokio::io::duplex(1 << 16);
        let (read, write) = tokio::io::split(peer_end);
        let mut peer = FakePeer {
            lines: BufReader::new(read),
            write,
        };
        peer.send(greeting).await;
        let result = Qmp::from_stream(client_end).await;
        drop(peer);
        result
    }
}

use fake_qmp_peer::{connected, FakePeer};

#[tokio::test]
async fn garbage_line_fails_the_waiting_command_naming_what_arrived() {
    let (qmp, mut peer) = connected().await;

    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute("query-status", None).await }
    });
    peer.next_command().await;
    peer.send("this is not json").await;
    let err = call.await.expect("join").unwrap_err();
    let later = qmp.execute("query-name", None).await.unwrap_err();

    assert!(matches!(err, QmpError::Garbage { .. }), "{err:?}");
    assert!(err.to_string().contains("\"this is not json\""), "{err}");
    assert!(err.to_string().contains("`query-status`"), "{err}");
    assert!(later.to_string().contains("this is not json"), "{later}");
}

#[tokio::test]
async fn json_that_is_not_a_qmp_message_is_garbage() {
    let (qmp, mut peer) = connected().await;

    peer.send(r#"{"hello": "world"}"#).await;
    let err = qmp.execute("query-status", None).await.unwrap_err();

    assert!(matches!(err, QmpError::Garbage { .. }), "{err:?}");
    assert!(err.to_string().contains("hello"), "{err}");
}

#[tokio::test]
async fn reply_split_across_writes_is_reassembled() {
    let (qmp, mut peer) = connected().await;

    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute("query-status", None).await }
    });
    let command = peer.next_command().await;
    let reply = json!({"return": {"status": "running"}, "id": command["id"]}).to_string();
    let (head, tail) = reply.split_at(10);
    peer.send_raw(head).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    peer.send(tail).await;
    let result = call.await.expect("join");

    assert_eq!(result.expect("reply")["status"], "running");
}

#[tokio::test]
async fn half_line_then_close_reports_closed_and_the_partial_data() {
    let (qmp, mut peer) = connected().await;

    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute("query-status", None).await }
    });
    peer.next_command().await;
    peer.send_raw(r#"{"return": {"sta"#).await;
    peer.close().await;
    let err = call.await.expect("join").unwrap_err();

    let QmpError::Closed { command, partial } = &err else {
        panic!("expected Closed, got {err:?}")
    };
    assert_eq!(command.as_deref(), Some("query-status"));
    assert!(partial.as_deref().unwrap_or("").contains("sta"), "{err:?}");
}

#[tokio::test]
async fn hung_reply_times_out_and_a_late_reply_is_dropped() {
    let (qmp, mut peer) = connected().await;

    let impatient = qmp.with_timeout(Duration::from_millis(200));
    let hung = impatient.execute("query-status", None);
    let (err, first) = tokio::join!(hung, peer.next_command());
    peer.send(&json!({"return": {"late": true}, "id": first["id"]}).to_string())
        .await;
    let next = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute("query-name", None).await }
    });
    peer.answer(json!({"name": "fresh"})).await;
    let next = next.await.expect("join");

    assert!(matches!(err, Err(QmpError::Timeout { .. })), "{err:?}");
    assert_eq!(next.expect("next command answered")["name"], "fresh");
}

#[tokio::test]
async fn unknown_event_is_delivered_as_raw_json_and_nothing_breaks() {
    let (qmp, mut peer) = connected().await;
    let mut events = qmp.events();

    peer.send(r#"{"event": "QEMU_42_NEW_THING", "data": {"what": [1, 2]}, "timestamp": {"seconds": -1, "microseconds": -1}}"#)
        .await;
    let event = events.recv().await.expect("event");
    let still = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute("query-status", None).await }
    });
    peer.answer(json!({"status": "running"})).await;

    assert_eq!(event.name, "QEMU_42_NEW_THING");
    assert_eq!(event.data, json!({"what": [1, 2]}));
    assert_eq!(event.timestamp, None);
    assert_eq!(event.raw["timestamp"]["seconds"], -1);
    assert!(still.await.expect("join").is_ok());
}

#[tokio::test]
async fn events_between_command_and_reply_do_not_confuse_matching() {
    let (qmp, mut peer) = connected().await;

    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute("query-status", None).await }
    });
    let command = peer.next_command().await;
    peer.send(r#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}"#)
        .await;
    peer.send(r#"{"return": {"wrong": true}, "id": 999999}"#)
        .await;
    peer.send(&json!({"return": {"right": true}, "id": command["id"]}).to_string())
        .await;

    assert_eq!(call.await.expect("join").expect("reply")["right"], true);
}

#[tokio::test]
async fn greeting_that_is_not_qmp_is_refused_naming_it() {
    let err = fake_qmp_peer::greeted_with("QEMU 10.0.2 monitor - type 'help' for more information")
        .await
        .unwrap_err();

    assert!(matches!(err, QmpError::Greeting { .. }), "{err:?}");
    assert!(err.to_string().contains("monitor - type 'help'"), "{err}");
}

#[tokio::test]
async fn fd_passing_over_a_plain_stream_is_refused() {
    let (qmp, _peer) = connected().await;
    let file = tempfile::tempfile().expect("temp file");

    let err = qmp
        .execute_with_fd(
            "getfd",
            Some(json!({"fdname": "x"})),
            std::os::fd::AsFd::as_fd(&file),
        )
        .await
        .unwrap_err();

    assert!(
        matches!(err, QmpError::FdPassingUnsupported { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn overlong_event_closes_the_connection_before_it_is_buffered_naming_the_cap() {
    let (qmp, mut peer) = connected().await;
    // A valid event, 16 times the cap: read whole and parsed, it would take gigabytes.
    let padding = "x".repeat(16 * usbroute::backend::qemu::qmp::MAX_LINE);
    let event = format!(r#"{{"event": "HUGE", "data": {{"pad": "{padding}"}}}}"#);
    let flood = tokio::spawn(async move {
        peer.send(&event).await;
    });

    let err = qmp.execute("query-status", None).await.unwrap_err();

    assert!(matches!(err, QmpError::TooLong { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&format!(
            "longer than {} bytes",
            usbroute::backend::qemu::qmp::MAX_LINE
        )),
        "{err}"
    );
    assert!(err.is_connection_lost());
    // The client stopped reading: the fake peer's write of the rest cannot finish.
    assert!(!flood.is_finished());
    flood.abort();
}

/// Answer the two `qom-list`s of a listing with `count` children of `child_type` (then
/// none), and return how the listing ended: it must end without a read per child, which
/// the fake peer never answers.
async fn listing_over<T: Send + 'static>(
    mut peer: FakePeer,
    listing: tokio::task::JoinHandle<Result<T, QmpError>>,
    count: usize,
    child_type: &str,
) -> Result<T, QmpError> {
    let children: Vec<Value> = (0..count)
        .map(|i| json!({"name": format!("d{i}"), "type": format!("child<{child_type}>")}))
        .collect();
    peer.answer(json!(children)).await;
    peer.answer(json!([])).await;
    tokio::time::timeout(Duration::from_secs(5), listing)
        .await
        .expect("the listing ends without reading each child")
        .expect("join")
}

#[tokio::test]
async fn listing_of_more_usb_hosts_than_the_cap_sends_no_property_reads() {
    let (qmp, peer) = connected().await;
    let listing =
        tokio::spawn(async move { usbroute::backend::qemu::listing::usb_hosts(&qmp).await });

    let ended = listing_over(
        peer,
        listing,
        usbroute::backend::qemu::listing::MAX_USB_HOSTS + 1,
        "usb-host",
    )
    .await;

    let err = ended.unwrap_err();
    assert!(
        matches!(err, QmpError::TooMany { count: 257, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn vfio_root_port_search_over_more_devices_than_the_cap_sends_no_property_reads() {
    let (qmp, peer) = connected().await;
    let search = tokio::spawn(async move {
        usbroute::backend::qemu::vfio_attach::free_pcie_root_ports(&qmp).await
    });

    let ended = listing_over(
        peer,
        search,
        usbroute::backend::qemu::vfio_attach::MAX_PERIPHERALS + 1,
        "pcie-root-port",
    )
    .await;

    let err = ended.unwrap_err();
    assert!(
        matches!(err, QmpError::TooMany { count: 1025, .. }),
        "{err:?}"
    );
}

/// A FAKE for a held monitor (QEMU does the same for a second client; this one costs no
/// QEMU and, on paused time, no wait): a socket that takes the connection and never greets.
#[tokio::test(start_paused = true)]
async fn a_socket_that_never_greets_is_reported_held_after_the_default_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("held.qmp");
    // Listening but never accepting: connect(2) succeeds, nothing is ever said.
    let _listener = tokio::net::UnixListener::bind(&path).unwrap();

    let err = Qmp::connect(&path).await.unwrap_err();

    let text = err.to_string();
    assert!(err.is_monitor_held(), "{err:?}");
    assert!(
        text.starts_with(&format!(
            "QEMU sent no QMP greeting on {} within 5.0 s: the monitor {} is probably held by \
             another client (QEMU serves one client per monitor",
            path.display(),
            path.display()
        )),
        "{text}"
    );
    assert!(
        text.ends_with(
            "give usbroute its own monitor: add \
             `-qmp unix:/run/usbroute/NAME.qmp,server=on,wait=off` (`-qmp` may be repeated)"
        ),
        "{text}"
    );
}
