//! Commands that print into a pipe whose reader is gone (`usbroute ports | head`) end
//! quietly, as Unix tools do, instead of panicking on the broken pipe.

use assert_cmd::cargo::CommandCargoExt;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

#[test]
fn list_into_a_closed_pipe_ends_by_sigpipe_without_a_panic() {
    // The read end is closed before the command starts, so its first write hits EPIPE.
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    drop(read_end);

    let out = Command::cargo_bin("usbroute")
        .unwrap()
        .args(["--sysfs-root", "tests/fixtures/guest-rich", "list"])
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{stderr}");
}
