//! VM presence for real: inotify notices a real QEMU's QMP socket appearing, also in a
//! directory that did not exist when the watcher started.

use std::time::Duration;
use usbroute::backend::qemu::socket_watch::{SocketAppeared, SocketWatcher};

use crate::qemu_support;
use qemu_support::QemuAt;

#[tokio::test]
async fn qemu_socket_appearing_is_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("win11.qmp");
    let mut watcher = SocketWatcher::new([("win11".to_string(), qmp.clone())]).unwrap();

    let _qemu = QemuAt::spawn(&[&qmp], &["-machine", "none"]);
    let seen = tokio::time::timeout(Duration::from_secs(10), watcher.next()).await;

    let appeared = seen.expect("noticed within 10 s").unwrap();
    assert_eq!(
        appeared,
        SocketAppeared {
            vm: "win11".into(),
            path: qmp
        }
    );
}

#[tokio::test]
async fn socket_in_a_directory_created_later_is_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("run/qemu/vm1.qmp");
    let mut watcher = SocketWatcher::new([("vm1".to_string(), qmp.clone())]).unwrap();

    std::fs::create_dir_all(qmp.parent().unwrap()).unwrap();
    let _qemu = QemuAt::spawn(&[&qmp], &["-machine", "none"]);
    let seen = tokio::time::timeout(Duration::from_secs(10), watcher.next()).await;

    let appeared = seen.expect("noticed within 10 s").unwrap();
    assert_eq!(appeared.vm, "vm1");
}

#[tokio::test]
async fn other_files_in_the_directory_are_not_reported() {
    let dir = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("a.qmp");
    let mut watcher = SocketWatcher::new([("a".to_string(), qmp.clone())]).unwrap();

    std::fs::write(dir.path().join("a.log"), b"x").unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(&qmp).unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(5), watcher.next()).await;

    assert_eq!(seen.expect("noticed").unwrap().path, qmp);
}

#[tokio::test]
async fn socket_directory_removed_and_created_again_is_watched_again() {
    let dir = tempfile::tempdir().unwrap();
    // A per-VM `RuntimeDirectory=`: it goes when the VM stops and comes back with it.
    let runtime_dir = dir.path().join("vm1");
    let qmp = runtime_dir.join("qmp.sock");
    std::fs::create_dir(&runtime_dir).unwrap();
    let mut watcher = SocketWatcher::new([("vm1".to_string(), qmp.clone())]).unwrap();
    let first = QemuAt::spawn(&[&qmp], &["-machine", "none"]);
    let seen = tokio::time::timeout(Duration::from_secs(10), watcher.next()).await;
    assert_eq!(seen.expect("first socket noticed").unwrap().vm, "vm1");

    first.kill();
    std::fs::remove_dir_all(&runtime_dir).unwrap();
    std::fs::create_dir(&runtime_dir).unwrap();
    let _second = QemuAt::spawn(&[&qmp], &["-machine", "none"]);
    let seen = tokio::time::timeout(Duration::from_secs(10), watcher.next()).await;

    let appeared = seen
        .expect("noticed within 10 s in the new directory")
        .unwrap();
    assert_eq!(appeared.path, qmp);
}

#[tokio::test]
async fn socket_directory_removed_with_its_parent_is_followed_back_down() {
    let dir = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("run/qemu/vm1/qmp.sock");
    std::fs::create_dir_all(qmp.parent().unwrap()).unwrap();
    let mut watcher = SocketWatcher::new([("vm1".to_string(), qmp.clone())]).unwrap();
    let next = tokio::spawn(async move { watcher.next().await });

    std::fs::remove_dir_all(dir.path().join("run")).unwrap();
    // Lets the watcher fall back to the ancestor before the directories come back, one
    // by one, so it must walk down again; the other order must work too (it does: the
    // test above), so nothing here depends on this pause.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for level in ["run", "run/qemu", "run/qemu/vm1"] {
        std::fs::create_dir(dir.path().join(level)).unwrap();
        tokio::task::yield_now().await;
    }
    let _listener = std::os::unix::net::UnixListener::bind(&qmp).unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), next).await;

    assert_eq!(
        seen.expect("noticed within 10 s").unwrap().unwrap().path,
        qmp
    );
}
