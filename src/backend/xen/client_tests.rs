//! The client against [`FakeXenstored`] (see there for what it is for). The answers the
//! happy-path tests script are the shapes `xs_wire.h` and `xs.c` give, until the Xen test
//! bed records the real ones.

use super::*;
use crate::backend::xen::fake_xenstored::{FakeXenstored, Script};
use crate::backend::xen::wire::encode;

async fn connect(
    fake: &FakeXenstored,
    timeout: Duration,
) -> (Xenstore, mpsc::Receiver<WatchEvent>) {
    Xenstore::connect(&fake.socket, timeout).await.unwrap()
}

fn reply(to: &Header, kind: Kind, payload: &[u8]) -> Vec<u8> {
    encode(kind, to.req_id, to.tx_id, payload).unwrap()
}

/// Answers reads of `/local/domain/3/name` with `lab`, everything else `ENOENT`.
fn one_name() -> Script {
    Box::new(|h, p| {
        Some(match (h.kind, p) {
            (Kind::Read, b"/local/domain/3/name\0") => reply(h, Kind::Read, b"lab"),
            _ => reply(h, Kind::Error, b"ENOENT\0"),
        })
    })
}

#[tokio::test]
async fn a_read_returns_the_value_and_a_missing_node_is_none() {
    let fake = FakeXenstored::start(one_name());
    let (xs, _events) = connect(&fake, DEFAULT_TIMEOUT).await;

    let name = xs.read(0, "/local/domain/3/name").await.unwrap();
    let missing = xs.read(0, "/local/domain/4/name").await.unwrap();

    assert_eq!(name.as_deref(), Some("lab"));
    assert_eq!(missing, None);
}

#[tokio::test]
async fn an_error_reply_names_the_request_and_the_errno() {
    let fake = FakeXenstored::start(Box::new(|h, _| Some(reply(h, Kind::Error, b"EACCES\0"))));
    let (xs, _events) = connect(&fake, DEFAULT_TIMEOUT).await;

    let err = xs
        .write(0, "/local/domain/0/backend/qusb/3/0/port/1", "")
        .await
        .unwrap_err();

    assert!(err.is("EACCES"), "{err}");
    assert_eq!(
        err.to_string(),
        "xenstored refused to write /local/domain/0/backend/qusb/3/0/port/1: EACCES"
    );
}

#[tokio::test]
async fn a_watch_event_between_a_request_and_its_reply_reaches_the_events_and_the_reply_the_caller()
{
    let fake = FakeXenstored::start(Box::new(|h, p| {
        let mut out = reply(h, Kind::WatchEvent, b"@releaseDomain\0t\0");
        out.extend(match h.kind {
            Kind::Watch => reply(h, Kind::Watch, b"OK\0"),
            _ => reply(h, Kind::Directory, p),
        });
        Some(out)
    }));
    let (xs, mut events) = connect(&fake, DEFAULT_TIMEOUT).await;

    xs.watch("@releaseDomain", "t").await.unwrap();
    let event = events.recv().await.unwrap();

    assert_eq!(event.path, "@releaseDomain");
    assert_eq!(event.token, "t");
}

#[tokio::test]
async fn a_directory_lists_the_children() {
    let fake = FakeXenstored::start(Box::new(|h, _| {
        Some(reply(h, Kind::Directory, b"0\x003\x00"))
    }));
    let (xs, _events) = connect(&fake, DEFAULT_TIMEOUT).await;

    let children = xs.directory(0, "/local/domain").await.unwrap();

    assert_eq!(children, ["0", "3"]);
}

#[tokio::test]
async fn a_transaction_id_is_read_and_eagain_at_its_end_says_retry() {
    let fake = FakeXenstored::start(Box::new(|h, _| {
        Some(match h.kind {
            Kind::TransactionStart => reply(h, Kind::TransactionStart, b"17\0"),
            _ if h.tx_id == 17 => reply(h, Kind::Error, b"EAGAIN\0"),
            _ => reply(h, Kind::Error, b"EINVAL\0"),
        })
    }));
    let (xs, _events) = connect(&fake, DEFAULT_TIMEOUT).await;

    let tx = xs.transaction_start().await.unwrap();
    let committed = xs.transaction_end(tx, true).await.unwrap();

    assert_eq!(tx, 17);
    assert!(!committed);
}

#[tokio::test]
async fn a_header_announcing_a_huge_payload_closes_the_connection_without_reading_it() {
    let fake = FakeXenstored::start(Box::new(|h, _| {
        let mut garbage = reply(h, Kind::Read, b"");
        garbage[12..16].copy_from_slice(&u32::MAX.to_ne_bytes());
        Some(garbage)
    }));
    let (xs, _events) = connect(&fake, DEFAULT_TIMEOUT).await;

    let err = xs.read(0, "/local/domain/3/name").await.unwrap_err();
    xs.closed().await;

    assert!(matches!(err, XsError::Closed), "{err}");
    assert!(matches!(xs.read(0, "/x").await, Err(XsError::Closed)));
}

#[tokio::test]
async fn a_reply_that_never_comes_times_out_and_ends_the_connection() {
    let fake = FakeXenstored::start(Box::new(|_, _| Some(Vec::new())));
    let (xs, _events) = connect(&fake, Duration::from_millis(200)).await;

    let err = xs.read(0, "/local/domain/3/name").await.unwrap_err();

    assert!(matches!(err, XsError::Timeout { .. }), "{err}");
    assert!(matches!(xs.read(0, "/x").await, Err(XsError::Closed)));
}

#[tokio::test]
async fn a_close_in_the_middle_of_a_call_fails_it_as_closed() {
    let fake = FakeXenstored::start(Box::new(|_, _| None));
    let (xs, _events) = connect(&fake, DEFAULT_TIMEOUT).await;

    let err = xs.read(0, "/local/domain/3/name").await.unwrap_err();

    assert!(matches!(err, XsError::Closed), "{err}");
}

#[tokio::test]
async fn a_reply_to_another_request_ends_the_connection() {
    let fake = FakeXenstored::start(Box::new(|h, _| {
        Some(encode(Kind::Read, h.req_id + 1, 0, b"x").unwrap())
    }));
    let (xs, _events) = connect(&fake, DEFAULT_TIMEOUT).await;

    let err = xs.read(0, "/a").await.unwrap_err();

    assert!(matches!(err, XsError::Closed), "{err}");
}

#[tokio::test]
async fn nothing_is_sent_for_a_relative_path() {
    let fake = FakeXenstored::start(one_name());
    let (xs, _events) = connect(&fake, DEFAULT_TIMEOUT).await;

    let err = xs.read(0, "local/domain").await.unwrap_err();

    assert!(matches!(err, XsError::Wire(WireError::BadPath(_))), "{err}");
}

#[tokio::test]
async fn a_missing_socket_says_where_it_looked() {
    let err = Xenstore::connect(Path::new("/nonexistent/xenstored/socket"), DEFAULT_TIMEOUT)
        .await
        .err()
        .unwrap();

    assert!(
        err.to_string().contains("/nonexistent/xenstored/socket"),
        "{err}"
    );
}

#[tokio::test]
async fn the_late_reply_to_a_call_given_up_is_skipped_and_the_next_call_gets_its_own() {
    let first_seen = Arc::new(tokio::sync::Notify::new());
    let seen = first_seen.clone();
    let fake = FakeXenstored::start(Box::new(move |h, _| {
        if h.req_id == 1 {
            seen.notify_one();
            return Some(Vec::new());
        }
        let mut out = encode(Kind::Read, 1, 0, b"late").unwrap();
        out.extend(reply(h, Kind::Read, b"lab"));
        Some(out)
    }));
    let (xs, _events) = connect(&fake, DEFAULT_TIMEOUT).await;
    tokio::select! {
        _ = xs.read(0, "/local/domain/3/name") => panic!("the first call was never answered"),
        () = first_seen.notified() => {}
    }

    let name = xs.read(0, "/local/domain/3/name").await.unwrap();

    assert_eq!(name.as_deref(), Some("lab"));
}

#[test]
fn the_first_existing_socket_is_picked_else_the_first_named() {
    let dir = tempfile::tempdir().unwrap();
    let there = dir.path().join("there");
    std::fs::write(&there, "").unwrap();
    let missing = dir.path().join("missing");

    assert_eq!(pick_socket(&[missing.clone(), there.clone()]), there);
    assert_eq!(pick_socket(std::slice::from_ref(&missing)), missing);
}
