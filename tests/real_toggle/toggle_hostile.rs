//! Hostile clients of the toggle service (issue 11): a web page's cross-origin POST,
//! guessing the secret over many connections, idle strangers holding every slot, and
//! other users on a VM's unix serial socket. Each reproduces an attack that worked
//! before, over real sockets and a PCH config-space fixture.

use crate::routing_support;

use routing_support::toggle_bed::*;
use tokio::net::TcpStream;
use usbroute::toggle::dispatch::Access;
use usbroute::toggle::server::Limits;

#[tokio::test]
async fn a_browser_post_whose_body_holds_a_valid_line_changes_nothing() {
    let bed = bed();
    let addr = listen(&bed, Access::unrestricted("test"), no_limits()).await;
    let mut c = Client::connect(&addr).await;
    // What `fetch("http://127.0.0.1:4510/", {method: "POST", mode: "no-cors", body})`
    // sends from any web page: headers first, the attacker's body after a blank line.
    let post = format!(
        "POST / HTTP/1.1\r\nHost: {addr}\r\nOrigin: https://evil.example\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n\r\nguest\n"
    );

    c.send(post.as_bytes()).await;
    let reply = the_one_reply_before_closing(&mut c).await;

    assert!(reply.starts_with("err usage"), "{reply}");
    assert_eq!(bed.pch.xusb2pr(), HOST);
}

#[tokio::test]
async fn guessing_the_secret_over_many_connections_is_throttled_for_all_of_them() {
    let bed = bed();
    let access = with_secret("tcp test", None);
    let addr = listen(&bed, access, no_limits()).await;
    // Two guesses a connection stays under the per-connection hang-up; twenty
    // connections make forty guesses.
    for n in 0..20 {
        let mut guesser = Client::connect(&addr).await;
        guesser
            .send(format!("auth guess{n}a\nauth guess{n}b\n").as_bytes())
            .await;
        guesser.line().await;
        guesser.line().await;
    }

    let mut right = Client::connect(&addr).await;
    let answer = right.ask("auth s3cret").await;

    assert!(
        answer.starts_with("err too many wrong secrets"),
        "a right guess after 40 wrong ones is still told whether it is right: {answer}"
    );
    assert_eq!(bed.pch.xusb2pr(), HOST);
}

#[tokio::test]
async fn thirty_two_idle_strangers_do_not_lock_out_a_client_with_the_secret() {
    let bed = bed();
    let access = with_secret("VM win11", Some(&["guest"]));
    let limits = Limits {
        idle_timeout: None,
        ..Limits::default()
    };
    let addr = listen(&bed, access, limits).await;
    let mut strangers = Vec::new();
    for _ in 0..limits.max_connections {
        strangers.push(TcpStream::connect(&addr).await.unwrap());
    }

    let mut qemu = Client::connect(&addr).await;
    let auth = qemu.ask("auth s3cret").await;
    let guest = qemu.ask("guest").await;

    assert_eq!(
        (auth.as_str(), guest.as_str()),
        ("ok auth", "ok guest 0x3ffc")
    );
    assert_eq!(bed.pch.xusb2pr(), GUEST);
}

const NOBODY: u32 = 65534;

/// A directory other users can traverse, for a VM's serial socket.
fn socket_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Serve one VM's unix serial link at `socket`, allowed `guest` only.
async fn serve_unix_link(
    bed: &Bed,
    socket: &std::path::Path,
    qemu_user: Option<&str>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let vms = [usbroute::toggle::VmLink {
        vm: "win11".into(),
        listen: socket.display().to_string(),
        profiles: vec!["guest".into()],
        qemu_user: qemu_user.map(str::to_string),
        secret: None,
    }];
    usbroute::toggle::start(bed.service.clone(), &Default::default(), &vms)
        .await
        .unwrap()
}

/// Start socat as `nobody` on `socket`, sending `input`; its output when it ends.
fn socat_as_nobody(
    socket: &std::path::Path,
    input: &[u8],
) -> tokio::task::JoinHandle<std::process::Output> {
    use std::io::Write;
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root: run the test as root (it starts clients as `nobody`)"
    );
    let mut child = std::process::Command::new("/usr/bin/setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "/usr/bin/socat",
            "-t",
            "5",
            "-",
            &format!("UNIX-CONNECT:{}", socket.display()),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start socat under setpriv: apt-get install socat util-linux");
    // A refused socat may exit before reading its input: a broken pipe here is its
    // refusal, which the caller judges from socat's output and status.
    let _ = child.stdin.take().unwrap().write_all(input);
    tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_users_on_a_vms_serial_socket_are_refused_and_hold_no_slot() {
    use std::os::unix::fs::PermissionsExt;
    let bed = bed();
    let dir = socket_dir();
    let socket = dir.path().join("win11.serial");
    let tasks = serve_unix_link(&bed, &socket, None).await;
    // A careless admin made the socket world-writable: SO_PEERCRED still stops them.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let strangers: Vec<_> = (0..40).map(|_| socat_as_nobody(&socket, b"")).collect();
    let mut refusals = Vec::new();
    for s in strangers {
        refusals.push(String::from_utf8_lossy(&s.await.unwrap().stdout).into_owned());
    }

    let mut qemu = Client::connect_unix(&socket).await;
    let reply = qemu.ask("guest").await;

    assert!(
        refusals
            .iter()
            .all(|r| r.starts_with("err uid 65534 is not root")),
        "{refusals:?}"
    );
    assert_eq!(reply, "ok guest 0x3ffc");
    tasks.iter().for_each(|t| t.abort());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vms_qemu_user_is_served_on_its_serial_socket() {
    let bed = bed();
    let dir = socket_dir();
    let socket = dir.path().join("win11.serial");
    let tasks = serve_unix_link(&bed, &socket, Some("nobody")).await;

    let out = socat_as_nobody(&socket, b"guest\n").await.unwrap();

    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok guest 0x3ffc\n");
    assert_eq!(bed.pch.xusb2pr(), GUEST);
    tasks.iter().for_each(|t| t.abort());
}
