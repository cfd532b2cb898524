//! A real QEMU guest selects a profile over its serial port: the VM link as users set it
//! up (`-chardev socket,path=SOCKET,reconnect-ms=1000 -device isa-serial`; the daemon
//! listens on the unix socket and checks QEMU's uid with SO_PEERCRED).
//!
//! The "guest" is a 64 KiB firmware image of a few hand-assembled real-mode
//! instructions that write a line to COM1 (I/O port 0x3f8) again and again, so no guest
//! kernel is needed and the test runs in a second or two under TCG.

use crate::routing_support;

use routing_support::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use usbroute::engine::routing::{RoutingAnswer, RoutingRequest};
use usbroute::routing::config_space::SysfsConfigSpace;
use usbroute::routing::control::ProfileRouter;
use usbroute::routing::detect::detect;
use usbroute::routing::router::Router;
use usbroute::routing::RoutingConfig;
use usbroute::toggle::dispatch::{Answering, RoutingControl};
use usbroute::toggle::server::ToggleService;
use usbroute::toggle::{start, ToggleConfig, VmLink};

const QEMU: &str = "qemu-system-x86_64";

/// A firmware image that writes `line` to COM1 forever, pausing between writes.
fn serial_writer_bios(line: &str) -> Vec<u8> {
    #[rustfmt::skip]
    let code: [u8; 32] = [
        0x0e,             // 0000 push cs
        0x1f,             // 0001 pop ds            (DS = F000: the message is in this image)
        0xba, 0xf8, 0x03, // 0002 mov dx, 0x3f8     (COM1 data register)
        0xbe, 0x20, 0x00, // 0005 mov si, 0x0020    (the message)
        0xac,             // 0008 lodsb
        0x84, 0xc0,       // 0009 test al, al
        0x74, 0x03,       // 000b jz 0x0010
        0xee,             // 000d out dx, al
        0xeb, 0xf8,       // 000e jmp 0x0008
        0xbb, 0x00, 0x02, // 0010 mov bx, 0x0200    (pause: 512 x 65535 loops)
        0xb9, 0xff, 0xff, // 0013 mov cx, 0xffff
        0xe2, 0xfe,       // 0016 loop 0x0016
        0x4b,             // 0018 dec bx
        0x75, 0xf8,       // 0019 jnz 0x0013
        0xeb, 0xe8,       // 001b jmp 0x0005
        0x90, 0x90, 0x90, // 001d
    ];
    let mut image = vec![0xf4u8; 65536]; // hlt everywhere else
    image[..code.len()].copy_from_slice(&code);
    let msg = format!("{line}\n\0");
    image[0x20..0x20 + msg.len()].copy_from_slice(msg.as_bytes());
    // The reset vector (F000:FFF0, the image's last 16 bytes): jmp 0x0000.
    image[0xfff0..0xfff3].copy_from_slice(&[0xe9, 0x0d, 0x00]);
    image
}

/// A QEMU started by this test; killed and reaped on drop.
struct Guest(Child);

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_guest(dir: &std::path::Path, line: &str, socket: &Path) -> Guest {
    let bios = dir.join(format!("writer-{line}.bin"));
    std::fs::write(&bios, serial_writer_bios(line)).unwrap();
    let chardev = format!(
        "socket,id=toggle,path={},reconnect-ms=1000",
        socket.display()
    );
    let child = Command::new(QEMU)
        .args(["-machine", "pc", "-accel", "tcg", "-m", "16", "-nodefaults", "-display", "none"])
        .arg("-bios")
        .arg(&bios)
        .args(["-chardev", &chardev, "-device", "isa-serial,chardev=toggle"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {QEMU}: {e}; install it: apt-get install -t bookworm-backports qemu-system-x86")
        });
    Guest(child)
}

fn routing() -> RoutingConfig {
    host_guest_desk_profiles()
}

/// The routing as the toggle service reaches it, keeping every answer it gave, so a test
/// can wait for a request to have been decided instead of waiting a while.
struct Answers {
    routing: Mutex<ProfileRouter<SysfsConfigSpace>>,
    given: Mutex<Vec<RoutingAnswer>>,
}

impl RoutingControl for Answers {
    fn ask(&self, request: RoutingRequest) -> Answering<'_> {
        Box::pin(async move {
            let answer = self.routing.ask(request).await;
            self.given.lock().unwrap().push(answer.clone());
            answer
        })
    }
}

impl Answers {
    /// The first answer to a whole `line`, once there is one (`None` after 30 s). The
    /// guest writes its line again and again without waiting for the UART, and bytes it
    /// writes before QEMU's chardev has connected are lost, so the first line the service
    /// reads may be the tail of one (`esk` for `desk`): answers to such tails are skipped.
    async fn first_to(&self, line: &str) -> Option<RoutingAnswer> {
        let cut = |answer: &RoutingAnswer| {
            (1..line.len()).any(|i| {
                let tail = &line[i..];
                matches!(answer, RoutingAnswer::Err(why) if why.contains(&format!("`{tail}`")))
            })
        };
        for _ in 0..300 {
            let given = self.given.lock().unwrap().clone();
            if let Some(answer) = given.into_iter().find(|a| !cut(a)) {
                return Some(answer);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }
}

async fn serve_vm_link(
    pch: &Pch,
    socket: &Path,
    allowed: &[&str],
) -> Vec<tokio::task::JoinHandle<()>> {
    serve_vm_link_answering(pch, socket, allowed).await.0
}

async fn serve_vm_link_answering(
    pch: &Pch,
    socket: &Path,
    allowed: &[&str],
) -> (Vec<tokio::task::JoinHandle<()>>, Arc<Answers>) {
    let detected = detect(&pch.root(), None).unwrap();
    let router = ProfileRouter::new(Router::open(&pch.root(), detected), routing());
    let answers = Arc::new(Answers {
        routing: Mutex::new(router),
        given: Mutex::new(Vec::new()),
    });
    let service = ToggleService::new(answers.clone());
    let vms = [VmLink {
        vm: "test-vm".into(),
        listen: socket.display().to_string(),
        profiles: allowed.iter().map(|s| s.to_string()).collect(),
        qemu_user: None,
        secret: None,
    }];
    let tasks = start(service, &ToggleConfig::default(), &vms)
        .await
        .unwrap();
    (tasks, answers)
}

async fn wait_for_mask(pch: &Pch, want: u16, within: Duration) -> u16 {
    let deadline = tokio::time::Instant::now() + within;
    while pch.xusb2pr() != want && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pch.xusb2pr()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_writing_guest_to_com1_switches_the_routing() {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
    let socket = socket_in(&pch);
    let tasks = serve_vm_link(&pch, &socket, &["host", "guest"]).await;

    let _guest = start_guest(pch.path(), "guest", &socket);
    let mask = wait_for_mask(&pch, 0x3ffc, Duration::from_secs(30)).await;

    assert_eq!(
        mask, 0x3ffc,
        "the guest's `guest` line never arrived over the serial link"
    );
    tasks.iter().for_each(|t| t.abort());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_started_before_the_daemon_connects_once_it_listens() {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
    let socket = socket_in(&pch);
    let _guest = start_guest(pch.path(), "guest", &socket);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let tasks = serve_vm_link(&pch, &socket, &["guest"]).await;
    let mask = wait_for_mask(&pch, 0x3ffc, Duration::from_secs(30)).await;

    assert_eq!(
        mask, 0x3ffc,
        "QEMU did not reconnect (reconnect-ms=1000) to the late listener"
    );
    tasks.iter().for_each(|t| t.abort());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_asking_for_a_profile_its_vm_may_not_select_changes_nothing() {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
    let before = pch.config(XHCI);
    let socket = socket_in(&pch);
    let (tasks, answers) = serve_vm_link_answering(&pch, &socket, &["host", "guest"]).await;

    let _desk = start_guest(pch.path(), "desk", &socket);
    let answer = answers.first_to("desk").await;

    match answer {
        Some(RoutingAnswer::Err(why)) => assert!(why.contains("not allowed"), "{why}"),
        other => panic!("the guest's `desk` line was not refused: {other:?}"),
    }
    assert_eq!(pch.config(XHCI), before);
    tasks.iter().for_each(|t| t.abort());
}

fn socket_in(pch: &Pch) -> PathBuf {
    pch.path().join("test-vm.serial")
}
