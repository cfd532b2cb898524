//! The QMP client against a real `qemu-system-x86_64`.

use crate::qemu_support;

use nix::sys::signal::Signal;
use qemu_support::QemuGuard;
use serde_json::json;
use std::os::fd::AsFd;
use std::time::Duration;
use usbroute::backend::qemu::qmp::{Qmp, QmpError};

#[tokio::test]
async fn connect_reads_greeting_and_enters_command_mode() {
    let qemu = QemuGuard::machine_none();

    let qmp = Qmp::connect(qemu.socket()).await.expect("connect");
    let status = qmp
        .execute("query-status", None)
        .await
        .expect("query-status");

    assert_eq!(status["status"], "prelaunch");
    assert!(qmp.version().expect("version in greeting").0 >= 7);
    assert_eq!(qmp.peer().expect("peer credentials").pid, Some(qemu.pid()));
}

#[tokio::test]
async fn unknown_command_is_refused_with_qemu_class_and_words() {
    let qemu = QemuGuard::machine_none();
    let qmp = Qmp::connect(qemu.socket()).await.expect("connect");

    let err = qmp.execute("no-such-command", None).await.unwrap_err();

    let QmpError::Command { command, class, .. } = &err else {
        panic!("expected a refusal, got {err:?}")
    };
    assert_eq!(command, "no-such-command");
    assert_eq!(class, "CommandNotFound");
    assert!(err.to_string().contains("no-such-command"), "{err}");
}

#[tokio::test]
async fn concurrent_commands_get_their_own_replies() {
    let qemu = QemuGuard::machine_none();
    let qmp = Qmp::connect(qemu.socket()).await.expect("connect");

    let statuses = (0..20).map(|_| qmp.execute("query-status", None));
    let versions = (0..20).map(|_| qmp.execute("query-version", None));
    let (statuses, versions) = tokio::join!(
        futures_util::future::join_all(statuses),
        futures_util::future::join_all(versions)
    );

    assert!(statuses
        .iter()
        .all(|r| r.as_ref().unwrap()["status"] == "prelaunch"));
    assert!(versions
        .iter()
        .all(|r| r.as_ref().unwrap()["qemu"]["major"].is_u64()));
}

#[tokio::test]
async fn events_reach_subscribers() {
    let qemu = QemuGuard::machine_none();
    let qmp = Qmp::connect(qemu.socket()).await.expect("connect");
    let mut events = qmp.events();

    qmp.execute("cont", None).await.expect("cont");
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("an event within 5 s")
        .expect("event stream open");

    assert_eq!(event.name, "RESUME");
    assert_eq!(event.raw["event"], "RESUME");
    assert!(event.timestamp.is_some());
}

#[tokio::test]
async fn qemu_killed_mid_command_fails_the_command_clearly() {
    let qemu = QemuGuard::machine_none();
    let qmp = Qmp::connect(qemu.socket()).await.expect("connect");
    // A stopped process cannot answer, so the command is surely in flight when it dies.
    qemu.signal(Signal::SIGSTOP);

    let pending = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute("query-status", None).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    qemu.signal(Signal::SIGKILL);
    let err = pending.await.expect("join").unwrap_err();

    assert!(matches!(err, QmpError::Closed { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("QEMU closed the QMP socket while `query-status` was waiting"),
        "{err}"
    );
}

#[tokio::test]
async fn commands_after_qemu_exit_fail_at_once_and_events_end() {
    let mut qemu = QemuGuard::machine_none();
    let qmp = Qmp::connect(qemu.socket()).await.expect("connect");
    let mut events = qmp.events();

    qemu.kill();
    let ended = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
    let err = qmp.execute("query-status", None).await.unwrap_err();

    assert!(matches!(
        ended,
        Ok(Err(tokio::sync::broadcast::error::RecvError::Closed))
    ));
    assert!(
        err.to_string().contains("QEMU closed the QMP socket"),
        "{err}"
    );
}

#[tokio::test]
async fn hung_qemu_times_out_and_the_connection_recovers() {
    let qemu = QemuGuard::machine_none();
    let qmp = Qmp::connect(qemu.socket()).await.expect("connect");
    qemu.signal(Signal::SIGSTOP);

    let err = qmp
        .with_timeout(Duration::from_millis(300))
        .execute("query-status", None)
        .await
        .unwrap_err();
    qemu.signal(Signal::SIGCONT);
    let after = qmp.execute("query-name", None).await;

    assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("within 0.3 s"), "{err}");
    assert!(after.expect("answer after the hang").is_object());
}

#[tokio::test]
async fn getfd_receives_a_descriptor_passed_with_scm_rights() {
    let qemu = QemuGuard::machine_none();
    let qmp = Qmp::connect(qemu.socket()).await.expect("connect");
    let file = tempfile::tempfile().expect("temp file");

    let passed = qmp
        .execute_with_fd("getfd", Some(json!({"fdname": "probe"})), file.as_fd())
        .await;
    let closed = qmp
        .execute("closefd", Some(json!({"fdname": "probe"})))
        .await;

    assert_eq!(passed.expect("getfd"), json!({}));
    assert_eq!(closed.expect("closefd of the passed fd"), json!({}));
}

#[tokio::test]
async fn getfd_without_a_descriptor_is_refused_by_qemu() {
    let qemu = QemuGuard::machine_none();
    let qmp = Qmp::connect(qemu.socket()).await.expect("connect");

    let err = qmp
        .execute("getfd", Some(json!({"fdname": "probe"})))
        .await
        .unwrap_err();

    assert!(matches!(err, QmpError::Command { .. }), "{err:?}");
}

#[tokio::test]
async fn add_fd_puts_the_descriptor_in_an_fdset() {
    let qemu = QemuGuard::machine_none();
    let qmp = Qmp::connect(qemu.socket()).await.expect("connect");
    let file = tempfile::tempfile().expect("temp file");

    let added = qmp
        .execute_with_fd("add-fd", None, file.as_fd())
        .await
        .expect("add-fd");
    let fdsets = qmp
        .execute("query-fdsets", None)
        .await
        .expect("query-fdsets");

    let set = added["fdset-id"].as_u64().expect("fdset-id");
    assert_eq!(fdsets[0]["fdset-id"].as_u64(), Some(set));
}

#[tokio::test]
async fn connect_to_missing_socket_names_path_and_fix() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("nope.sock");

    let err = Qmp::connect(&path).await.unwrap_err();

    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("server=on,wait=off"), "{text}");
}

#[tokio::test]
async fn second_client_on_a_busy_socket_is_told_why_nothing_answers() {
    let qemu = QemuGuard::machine_none();
    let _first = Qmp::connect(qemu.socket()).await.expect("connect");

    let err = Qmp::connect_with_timeout(qemu.socket(), Duration::from_millis(500))
        .await
        .unwrap_err();

    assert!(matches!(err, QmpError::NoGreeting { .. }), "{err:?}");
    assert!(err.to_string().contains("another client"), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("the monitor {} is", qemu.socket().display())),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("add `-qmp unix:/run/usbroute/NAME.qmp,server=on,wait=off`"),
        "{err}"
    );
}

/// What the daemon relies on to connect the moment another client leaves: QEMU keeps a
/// second client's connection queued, silent, and greets it when the first leaves.
#[tokio::test]
async fn a_queued_client_is_greeted_when_the_one_served_leaves() {
    let qemu = QemuGuard::machine_none();
    let first = Qmp::connect(qemu.socket()).await.expect("connect");
    let second = tokio::spawn({
        let socket = qemu.socket().to_path_buf();
        async move { Qmp::connect_with(&socket, None, Duration::from_secs(10)).await }
    });
    // Still queued while the first is served: QEMU says nothing to it.
    let queued = first.execute("query-status", None).await;
    let waiting = !second.is_finished();

    drop(first);
    let second = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("greeted within 10 s of the first client leaving")
        .expect("join")
        .expect("the queued client is served");

    assert!(queued.is_ok() && waiting);
    assert_eq!(
        second
            .execute("query-status", None)
            .await
            .expect("query-status")["status"],
        "prelaunch"
    );
}
