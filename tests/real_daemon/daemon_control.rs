//! The control socket for real: file mode and group, SO_PEERCRED checks against client
//! processes running as other users (`socat` started with another uid), line limits.
//! Needs root (to start clients as `nobody`) and socat.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use usbroute::backend::BoxFuture;
use usbroute::daemon::{
    ControlGroup, ControlHandler, ControlLimits, ControlServer, Peer, Reply, Request,
};

const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;

/// Answers every request with `done` naming the request and the peer's uid.
struct Echo;

impl ControlHandler for Echo {
    fn handle<'a>(&'a self, request: Request, peer: &'a Peer) -> BoxFuture<'a, Reply> {
        Box::pin(async move { Reply::done(format!("{request:?} from uid {}", peer.uid)) })
    }
}

fn require_root_and_socat() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root: run the test as root (it starts clients as `nobody`)"
    );
    assert!(
        Path::new("/usr/bin/socat").exists() && Path::new("/usr/bin/setpriv").exists(),
        "needs socat and setpriv: apt-get install socat util-linux"
    );
}

/// A temp dir other users can traverse, and the socket path inside it.
fn socket_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("control.sock");
    (dir, path)
}

/// Start the server on a runtime in the background; returns the runtime to keep it alive.
fn start(path: &Path, group: Option<ControlGroup>) -> tokio::runtime::Runtime {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt
        .block_on(async { ControlServer::bind(path, group) })
        .unwrap();
    rt.spawn(server.serve(Arc::new(Echo)));
    rt
}

/// socat on `path` as uid/gid with `groups` (a setpriv option such as `--clear-groups`:
/// root's group 0 would open a 0660 socket), waiting `wait` s for replies after its input.
fn socat_command(uid: u32, gid: u32, groups: &str, wait: &str, path: &Path) -> Command {
    let mut command = Command::new("/usr/bin/setpriv");
    command
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            groups,
            "/usr/bin/socat",
            "-t",
            wait,
            "-",
            &format!("UNIX-CONNECT:{}", path.display()),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Send `input` with socat running as uid/gid (no supplementary groups); returns (stdout, stderr, success).
fn socat_as(uid: u32, gid: u32, path: &Path, input: &[u8]) -> (String, String, bool) {
    let mut child = socat_command(uid, gid, "--clear-groups", "5", path)
        .spawn()
        .expect("start socat");
    // A refused socat may exit before reading its input: a broken pipe here is its
    // refusal, which the caller judges from socat's output and status.
    let _ = child.stdin.take().unwrap().write_all(input);
    let out = child.wait_with_output().unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

#[test]
fn socket_is_created_0660_with_the_control_group() {
    require_root_and_socat();
    let (_dir, path) = socket_dir();
    let users = ControlGroup::lookup("users").expect("group `users` exists on Debian");

    let _rt = start(&path, Some(users));

    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!((meta.uid(), meta.gid()), (0, 100));
}

#[test]
fn root_peer_gets_its_reply() {
    require_root_and_socat();
    let (_dir, path) = socket_dir();
    let _rt = start(&path, None);

    let (out, _, ok) = socat_as(0, 0, &path, b"{\"request\":\"status\"}\n");

    assert!(ok);
    assert_eq!(
        out,
        "{\"reply\":\"done\",\"message\":\"Status from uid 0\"}\n"
    );
}

#[test]
fn stranger_cannot_open_the_0660_socket() {
    require_root_and_socat();
    let (_dir, path) = socket_dir();
    let _rt = start(&path, None);

    let (out, err, ok) = socat_as(NOBODY, NOGROUP, &path, b"{\"request\":\"status\"}\n");

    assert!(!ok && out.is_empty(), "out: {out}");
    assert!(err.contains("Permission denied"), "stderr: {err}");
}

#[test]
fn stranger_past_the_file_mode_is_refused_by_peer_credentials() {
    require_root_and_socat();
    let (_dir, path) = socket_dir();
    let _rt = start(&path, None);
    // A careless admin made the socket world-writable: SO_PEERCRED still stops the peer.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();

    let (out, _, _) = socat_as(NOBODY, NOGROUP, &path, b"{\"request\":\"reload\"}\n");

    assert_eq!(
        out,
        "{\"reply\":\"error\",\"kind\":\"permission_denied\",\"message\":\"uid 65534 (nobody) is not root, and no control_group is set in the config: run as root, or set control_group\"}\n"
    );
}

#[test]
fn control_group_member_is_served() {
    require_root_and_socat();
    let (_dir, path) = socket_dir();
    let users = ControlGroup::lookup("users").unwrap();
    let _rt = start(&path, Some(users.clone()));

    let (out, _, ok) = socat_as(
        NOBODY,
        users.gid,
        &path,
        b"{\"request\":\"why\",\"selector\":\"1-3\"}\n",
    );

    assert!(ok);
    assert_eq!(
        out,
        "{\"reply\":\"done\",\"message\":\"Why { selector: \\\"1-3\\\" } from uid 65534\"}\n"
    );
}

#[test]
fn over_long_request_line_is_refused_and_closed() {
    require_root_and_socat();
    let (_dir, path) = socket_dir();
    let _rt = start(&path, None);
    let long = vec![b'x'; 100 * 1024];

    let (out, _, _) = socat_as(0, 0, &path, &long);

    assert!(out.starts_with("{\"reply\":\"error\",\"kind\":\"bad_request\",\"message\":\"request line longer than 65536 bytes"), "{out}");
}

#[test]
fn garbage_request_gets_bad_request_and_the_connection_stays_usable() {
    require_root_and_socat();
    let (_dir, path) = socket_dir();
    let _rt = start(&path, None);

    let (out, _, _) = socat_as(0, 0, &path, b"not json\n{\"request\":\"reload\"}\n");

    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].contains("\"kind\":\"bad_request\""),
        "{}",
        lines[0]
    );
    assert_eq!(
        lines[1],
        "{\"reply\":\"done\",\"message\":\"Reload from uid 0\"}"
    );
}

#[test]
fn second_server_on_a_live_socket_is_refused() {
    require_root_and_socat();
    let (_dir, path) = socket_dir();
    let _rt = start(&path, None);

    let err = ControlServer::bind(&path, None).unwrap_err();

    assert!(
        err.to_string()
            .contains("another usbroute daemon is already listening"),
        "{err}"
    );
}

#[test]
fn one_peer_holding_many_idle_connections_is_capped_and_others_still_get_in() {
    require_root_and_socat();
    let (_dir, path) = socket_dir();
    let users = ControlGroup::lookup("users").unwrap();
    let _rt = start(&path, Some(users.clone()));
    // One peer opens connections and never sends a byte (the daemon's fd table filled
    // up at ~1,100 of these before there were caps).
    let mut idle = Vec::new();
    for _ in 0..ControlLimits::default().per_peer + 10 {
        let s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        idle.push(s);
    }

    let (out, _, ok) = socat_as(NOBODY, users.gid, &path, b"{\"request\":\"status\"}\n");
    let mut refused = String::new();
    std::io::Read::read_to_string(idle.last_mut().unwrap(), &mut refused).unwrap();

    assert!(ok);
    assert_eq!(
        out,
        "{\"reply\":\"done\",\"message\":\"Status from uid 65534\"}\n"
    );
    assert!(refused.contains("too many connections"), "{refused}");
}

/// Records the uid of every peer whose request reached it.
struct Recorder(std::sync::Mutex<Vec<u32>>);

impl ControlHandler for Recorder {
    fn handle<'a>(&'a self, _request: Request, peer: &'a Peer) -> BoxFuture<'a, Reply> {
        self.0.lock().unwrap().push(peer.uid);
        Box::pin(async { Reply::done("recorded") })
    }
}

#[test]
fn a_group_member_is_judged_by_its_groups_at_connect_time_not_by_its_pid_later() {
    require_root_and_socat();
    let (_dir, path) = socket_dir();
    let group = ControlGroup {
        name: "usbroute-test".into(),
        gid: 4242,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt
        .block_on(async { ControlServer::bind(&path, Some(group)) })
        .unwrap();
    // A member (by a supplementary group only) connects, sends and exits before the
    // daemon gets to accept: its pid is gone (or reused) by the time it is checked.
    let status = socat_command(NOBODY, NOGROUP, "--groups=4242", "0", &path)
        .spawn()
        .and_then(|mut child| {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(b"{\"request\":\"status\"}\n")?;
            child.wait()
        })
        .unwrap();
    let recorder = Arc::new(Recorder(std::sync::Mutex::new(vec![])));

    rt.spawn(server.serve(recorder.clone()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while recorder.0.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    assert!(status.success());
    assert_eq!(*recorder.0.lock().unwrap(), vec![NOBODY]);
}

#[test]
fn idle_and_half_sent_requests_are_closed_after_their_timeouts() {
    require_root_and_socat();
    let (_dir, path) = socket_dir();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let limits = ControlLimits {
        idle_timeout: std::time::Duration::from_millis(300),
        request_timeout: std::time::Duration::from_millis(300),
        ..ControlLimits::default()
    };
    let server = rt
        .block_on(async { ControlServer::bind(&path, None) })
        .unwrap()
        .with_limits(limits);
    rt.spawn(server.serve(Arc::new(Echo)));
    let connect = || {
        let s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        s
    };
    let mut idle = connect();
    let mut half = connect();
    half.write_all(b"{\"request\":\"sta").unwrap();

    let mut idle_out = String::new();
    let mut half_out = String::new();
    std::io::Read::read_to_string(&mut idle, &mut idle_out).unwrap();
    std::io::Read::read_to_string(&mut half, &mut half_out).unwrap();

    assert!(idle_out.contains("no request for a while"), "{idle_out}");
    assert!(
        half_out.contains("request line not finished in time"),
        "{half_out}"
    );
}
