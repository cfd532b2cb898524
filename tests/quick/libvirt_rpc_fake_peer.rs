//! The native libvirt client against a scripted FAKE daemon (a unix listener in the test),
//! only for what a real libvirt cannot be made to do: send garbage, announce a packet over
//! the size limit, never answer, close mid-call, answer out of order, send an event we
//! did not ask for. Everything a real daemon does is exercised by
//! `examples/libvirt_probe.rs` against libvirt itself.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use usbroute::backend::libvirt::rpc::packet::{self, Header, Kind, Packet, Status};
use usbroute::backend::libvirt::rpc::procedures as p;
use usbroute::backend::libvirt::rpc::xdr::Encoder;
use usbroute::backend::libvirt::rpc::{
    Connection, Domain, DomainEvent, LibvirtUri, RpcError, VIR_ERR_NO_DOMAIN,
};

/// The deadline of every call in these tests: long enough for a loaded machine, short
/// enough that the hung-reply test ends quickly.
const CALL_TIMEOUT: Duration = Duration::from_millis(500);
/// The most any wait of the test itself may take.
const TEST_DEADLINE: Duration = Duration::from_secs(10);

/// The fake daemon's end of one connection.
struct FakeDaemon {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl FakeDaemon {
    /// The next call the client sent.
    async fn next_call(&mut self) -> Packet {
        loop {
            if let Some(p) =
                packet::take_packet(&mut self.buf).expect("the client frames its calls")
            {
                assert_eq!(p.header.kind, Kind::Call);
                return p;
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await.expect("read");
            assert!(n > 0, "the client closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn send(
        &mut self,
        procedure: i32,
        kind: Kind,
        serial: u32,
        status: Status,
        payload: &[u8],
    ) {
        let header = Header {
            program: packet::REMOTE_PROGRAM,
            version: packet::REMOTE_VERSION,
            procedure,
            kind,
            serial,
            status,
        };
        self.send_raw(&packet::encode(header, payload)).await;
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Answer `call` with OK and `payload`.
    async fn reply(&mut self, call: &Packet, payload: &[u8]) {
        let h = call.header;
        self.send(h.procedure, Kind::Reply, h.serial, Status::Ok, payload)
            .await;
    }

    /// Answer the handshake: AUTH_LIST (none), CONNECT_OPEN, three event registrations.
    async fn handshake(&mut self) {
        let auth = self.next_call().await;
        assert_eq!(auth.header.procedure, p::AUTH_LIST);
        self.reply(&auth, &[0, 0, 0, 1, 0, 0, 0, 0]).await;
        let open = self.next_call().await;
        assert_eq!(open.header.procedure, p::CONNECT_OPEN);
        self.reply(&open, &[]).await;
        for id in 1..=3 {
            let register = self.next_call().await;
            assert_eq!(
                register.header.procedure,
                p::CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY
            );
            self.reply(&register, &id_payload(id)).await;
        }
    }
}

fn id_payload(id: i32) -> Vec<u8> {
    let mut e = Encoder::new();
    e.i32(id);
    e.into_bytes()
}

fn vm() -> Domain {
    Domain {
        name: "vm1".into(),
        uuid: [9; 16],
        id: 4,
    }
}

/// A fake daemon on a socket in a fresh directory, and the URI naming it. The daemon
/// task runs `script` on the first connection, after the handshake.
fn with_fake<F, Fut>(script: F) -> (tempfile::TempDir, LibvirtUri)
where
    F: FnOnce(FakeDaemon) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    serve_fake(true, script)
}

/// [`with_fake`], with or without answering the handshake first.
fn serve_fake<F, Fut>(handshake: bool, script: F) -> (tempfile::TempDir, LibvirtUri)
where
    F: FnOnce(FakeDaemon) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fake-libvirt-sock");
    let listener = UnixListener::bind(&path).expect("bind");
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let mut fake = FakeDaemon {
            stream,
            buf: Vec::new(),
        };
        if handshake {
            fake.handshake().await;
        }
        script(fake).await;
    });
    (dir, uri_for(&path))
}

fn uri_for(socket: &std::path::Path) -> LibvirtUri {
    LibvirtUri::parse(&format!("qemu:///system?socket={}", socket.display())).expect("uri")
}

async fn open(
    uri: &LibvirtUri,
) -> (
    Connection,
    tokio::sync::mpsc::UnboundedReceiver<DomainEvent>,
) {
    tokio::time::timeout(
        TEST_DEADLINE,
        Connection::open_with_timeout(uri, CALL_TIMEOUT),
    )
    .await
    .expect("open in time")
    .expect("open")
}

fn lost_reason(e: RpcError) -> String {
    match e {
        RpcError::ConnectionLost { reason, .. } => reason,
        other => panic!("expected ConnectionLost, got {other:?}"),
    }
}

#[tokio::test]
async fn garbage_on_the_socket_ends_the_connection_and_fails_the_waiting_call() {
    let (_dir, uri) = with_fake(|mut fake| async move {
        fake.next_call().await;
        // A length word that is fine, then a header of another program.
        fake.send_raw(&[0, 0, 0, 28, 0xde, 0xad, 0xbe, 0xef]).await;
        fake.send_raw(&[0; 20]).await;
        tokio::time::sleep(TEST_DEADLINE).await;
    });
    let (conn, _events) = open(&uri).await;
    let err = conn.is_running(&vm()).await.unwrap_err();
    assert!(lost_reason(err).contains("0xdeadbeef"));
    tokio::time::timeout(TEST_DEADLINE, conn.closed())
        .await
        .expect("closed resolves");
}

#[tokio::test]
async fn a_length_over_the_maximum_is_refused_before_reading_the_body() {
    let (_dir, uri) = with_fake(|mut fake| async move {
        fake.next_call().await;
        // 64 MiB announced; nothing follows, so a client that waited for it would hang.
        fake.send_raw(&0x0400_0000u32.to_be_bytes()).await;
        tokio::time::sleep(TEST_DEADLINE).await;
    });
    let (conn, _events) = open(&uri).await;
    let err = conn.domain_xml(&vm()).await.unwrap_err();
    assert!(lost_reason(err).contains("over libvirt's maximum"));
}

#[tokio::test]
async fn a_hung_reply_times_out_naming_the_call_and_the_socket() {
    let (_dir, uri) = with_fake(|mut fake| async move {
        fake.next_call().await;
        tokio::time::sleep(TEST_DEADLINE).await;
    });
    let (conn, _events) = open(&uri).await;
    let err = conn
        .attach_device_live(&vm(), "<hostdev/>")
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Timeout { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("DOMAIN_ATTACH_DEVICE_FLAGS"), "{text}");
    assert!(text.contains("fake-libvirt-sock"), "{text}");
}

#[tokio::test]
async fn a_connection_closed_mid_call_fails_the_call_and_resolves_closed() {
    let (_dir, uri) = with_fake(|mut fake| async move {
        fake.next_call().await;
        drop(fake);
    });
    let (conn, _events) = open(&uri).await;
    let err = conn.lookup_domain("vm1").await.unwrap_err();
    assert!(lost_reason(err).contains("closed"));
    tokio::time::timeout(TEST_DEADLINE, conn.closed())
        .await
        .expect("closed resolves");
    let after = conn.is_running(&vm()).await.unwrap_err();
    assert!(
        matches!(after, RpcError::ConnectionLost { .. }),
        "{after:?}"
    );
}

#[tokio::test]
async fn replies_out_of_order_reach_their_own_callers() {
    let (_dir, uri) = with_fake(|mut fake| async move {
        let first = fake.next_call().await;
        let second = fake.next_call().await;
        let state = |s: i32| {
            let mut e = Encoder::new();
            e.i32(s).i32(0);
            e.into_bytes()
        };
        // The second call (shut off) is answered first.
        let (running, shutoff) = if first.header.procedure == p::DOMAIN_GET_STATE
            && second.header.procedure == p::DOMAIN_GET_STATE
        {
            (state(1), state(5))
        } else {
            panic!("two GET_STATE calls expected");
        };
        fake.reply(&second, &shutoff).await;
        fake.reply(&first, &running).await;
        tokio::time::sleep(TEST_DEADLINE).await;
    });
    let (conn, _events) = open(&uri).await;
    let a = Domain {
        name: "a".into(),
        ..vm()
    };
    let b = Domain {
        name: "b".into(),
        ..vm()
    };
    // `join!` polls `a` first, so its call is written first.
    let (ra, rb) = tokio::join!(conn.is_running(&a), conn.is_running(&b));
    assert!(ra.expect("a"), "the first call got the first answer");
    assert!(!rb.expect("b"), "the second call got the second answer");
}

#[tokio::test]
async fn an_unknown_event_is_dropped_and_a_known_one_forwarded() {
    let (_dir, uri) = with_fake(|mut fake| async move {
        fake.send(319, Kind::Message, 0, Status::Ok, &[0, 0, 0, 1])
            .await;
        let mut e = Encoder::new();
        e.i32(2)
            .string("vm1")
            .fixed_opaque(&[9; 16])
            .i32(4)
            .string("ua-x");
        fake.send(
            p::DOMAIN_EVENT_CALLBACK_DEVICE_REMOVED,
            Kind::Message,
            0,
            Status::Ok,
            &e.into_bytes(),
        )
        .await;
        tokio::time::sleep(TEST_DEADLINE).await;
    });
    let (_conn, mut events) = open(&uri).await;
    let event = tokio::time::timeout(TEST_DEADLINE, events.recv())
        .await
        .expect("an event in time");
    assert_eq!(
        event,
        Some(DomainEvent::DeviceRemoved {
            domain: vm(),
            alias: "ua-x".into()
        })
    );
}

#[tokio::test]
async fn a_no_domain_error_is_none_and_its_message_is_escaped() {
    let (_dir, uri) = with_fake(|mut fake| async move {
        for _ in 0..2 {
            let call = fake.next_call().await;
            let mut e = Encoder::new();
            e.i32(VIR_ERR_NO_DOMAIN)
                .i32(10)
                .opt_string(Some("no domain \u{1b}[2J here"));
            e.i32(2)
                .bool(false)
                .opt_string(None)
                .opt_string(None)
                .opt_string(None);
            e.i32(0).i32(0).bool(false);
            let h = call.header;
            fake.send(
                h.procedure,
                Kind::Reply,
                h.serial,
                Status::Error,
                &e.into_bytes(),
            )
            .await;
        }
        tokio::time::sleep(TEST_DEADLINE).await;
    });
    let (conn, _events) = open(&uri).await;
    assert_eq!(conn.lookup_domain("gone").await.expect("lookup"), None);
    let err = conn.domain_xml(&vm()).await.unwrap_err();
    assert_eq!(err.libvirt_code(), Some(VIR_ERR_NO_DOMAIN));
    let text = err.to_string();
    assert!(!text.contains('\u{1b}'), "{text}");
    assert!(text.contains("\\u{1b}"), "{text}");
}

#[tokio::test]
async fn a_missing_socket_names_it_and_how_to_start_the_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uri = uri_for(&dir.path().join("no-sock"));
    let err = Connection::open(&uri).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, RpcError::SocketMissing { .. }), "{err:?}");
    assert!(
        text.contains("no-sock") && text.contains("systemctl start virtqemud.socket"),
        "{text}"
    );
}

#[tokio::test]
async fn polkit_only_auth_is_refused_saying_what_to_do() {
    let (_dir, uri) = serve_fake(false, |mut fake| async move {
        let auth = fake.next_call().await;
        fake.reply(&auth, &[0, 0, 0, 1, 0, 0, 0, 2]).await;
        tokio::time::sleep(TEST_DEADLINE).await;
    });
    let err = Connection::open(&uri).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, RpcError::UnsupportedAuth { .. }), "{err:?}");
    assert!(
        text.contains("polkit") && text.contains("auth_unix_rw"),
        "{text}"
    );
}
