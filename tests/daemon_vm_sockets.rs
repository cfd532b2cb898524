//! VM presence for real: inotify notices a real QEMU's QMP socket appearing, also in a
//! directory that did not exist when the watcher started.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use usbroute::events::{SocketAppeared, SocketWatcher};

/// A QEMU with no machine at all: it only serves QMP. Killed on drop.
struct Qemu(Child);

impl Qemu {
    fn start(qmp: &Path) -> Qemu {
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "none",
                "-nodefaults",
                "-display",
                "none",
                "-qmp",
            ])
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("start qemu-system-x86_64 (apt-get install qemu-system-x86)");
        Qemu(child)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn qemu_socket_appearing_is_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("win11.qmp");
    let mut watcher = SocketWatcher::new([("win11".to_string(), qmp.clone())]).unwrap();

    let _qemu = Qemu::start(&qmp);
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
    let _qemu = Qemu::start(&qmp);
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
