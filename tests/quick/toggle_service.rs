//! The toggle service over real loopback sockets, switching a real router on a PCH
//! config-space fixture.

use crate::routing_support;

use routing_support::toggle_bed::*;
use routing_support::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use usbroute::engine::coordinator::{self as engine, EngineOptions, Input};
use usbroute::engine::routing::worker::RoutingInput;
use usbroute::routing::control::ProfileRouter;
use usbroute::routing::RoutingConfig;
use usbroute::toggle::dispatch::{Access, Session};
use usbroute::toggle::server::{bind, check_listen_address, Limits, ToggleError, ToggleService};
use usbroute::toggle::{start, ToggleConfig, VmLink};

#[tokio::test]
async fn every_command_gets_its_reply_and_switches_the_register() {
    let bed = bed();
    let addr = listen(&bed, Access::unrestricted("test"), no_limits()).await;
    let mut c = Client::connect(&addr).await;

    let replies = [
        c.ask("status").await,
        c.ask("guest").await,
        c.ask("host").await,
        c.ask("toggle").await,
        c.ask("toggle").await,
        c.ask("desk").await,
        c.ask("Status").await,
        c.ask("auth anything").await,
    ];

    assert_eq!(
        replies,
        [
            "ok host 0x3fff",
            "ok guest 0x3ffc",
            "ok host 0x3fff",
            "ok guest 0x3ffc",
            "ok host 0x3fff",
            "ok desk 0x3f0f",
            "ok desk 0x3f0f",
            "ok auth",
        ]
    );
    assert_eq!(bed.pch.xusb2pr(), 0x3f0f);
}

#[tokio::test]
async fn bad_input_gets_err_closes_the_connection_and_leaves_the_routing_alone() {
    let bed = bed();
    let addr = listen(&bed, Access::unrestricted("test"), no_limits()).await;
    Client::connect(&addr).await.ask("guest").await;
    let before = bed.pch.config(XHCI);
    let long = "host".repeat(1000);
    let inputs: [&[u8]; 5] = [
        long.as_bytes(),
        b"ho\x00st\xff",
        b"toggle please",
        b"host; rm -rf /",
        b"POST / HTTP/1.1\r",
    ];

    let mut replies = Vec::new();
    for input in inputs {
        let mut c = Client::connect(&addr).await;
        c.send(&[input, b"\nguest\n"].concat()).await;
        replies.push(the_one_reply_before_closing(&mut c).await);
    }
    let mut c = Client::connect(&addr).await;
    let unknown = c.ask("gaming").await;
    let after = c.ask("status").await;

    let firsts: Vec<&str> = replies.iter().map(String::as_str).collect();
    assert!(firsts[0].starts_with("err line too long"), "{firsts:?}");
    assert_eq!(
        firsts[1],
        "err not a text command (printable ASCII only); closing"
    );
    assert_eq!(firsts[2], "err usage: toggle; closing");
    assert!(
        firsts[3].starts_with("err usage") && firsts[4].starts_with("err usage"),
        "{firsts:?}"
    );
    assert_eq!(
        unknown,
        "err no profile `gaming` (configured: desk, guest, host)"
    );
    assert_eq!(after, "ok guest 0x3ffc");
    assert_eq!(bed.pch.config(XHCI), before);
}

#[tokio::test]
async fn a_long_line_split_over_many_writes_is_refused_once_and_closes() {
    let bed = bed();
    let addr = listen(&bed, Access::unrestricted("test"), no_limits()).await;
    let mut c = Client::connect(&addr).await;

    for _ in 0..50 {
        c.send(b"guestguestguest").await;
    }
    let _ = c.writer.write_all(b"\nguest\n").await;
    let reply = the_one_reply_before_closing(&mut c).await;

    assert!(reply.starts_with("err line too long"), "{reply}");
    assert_eq!(bed.pch.xusb2pr(), HOST);
}

#[tokio::test]
async fn a_vm_link_may_only_select_its_own_profiles() {
    let bed = bed();
    let access = Access {
        origin: "VM win11".into(),
        allowed: Some(["host".to_string(), "guest".to_string()].into()),
        secret: None,
    };
    let addr = listen(&bed, access, no_limits()).await;
    let mut c = Client::connect(&addr).await;

    let desk = c.ask("desk").await;
    let guest = c.ask("guest").await;

    assert_eq!(
        desk,
        "err profile `desk` is not allowed for VM win11 (allowed: guest, host)"
    );
    assert_eq!(guest, "ok guest 0x3ffc");
    assert_eq!(bed.pch.xusb2pr(), GUEST);
}

#[tokio::test]
async fn a_thousand_pipelined_toggles_end_where_they_started() {
    let bed = bed();
    let addr = listen(&bed, Access::unrestricted("test"), no_limits()).await;
    let mut c = Client::connect(&addr).await;

    c.send("toggle\n".repeat(1000).as_bytes()).await;
    let mut replies = Vec::new();
    for _ in 0..1000 {
        replies.push(c.line().await);
    }

    assert!(
        replies.iter().all(|r| r.starts_with("ok ")),
        "{:?}",
        replies.iter().find(|r| !r.starts_with("ok "))
    );
    assert_eq!(replies[998], "ok guest 0x3ffc");
    assert_eq!(replies[999], "ok host 0x3fff");
    assert_eq!(bed.pch.xusb2pr(), HOST);
}

#[tokio::test]
async fn a_thousand_and_one_toggles_from_many_clients_end_on_guest() {
    let bed = bed();
    let addr = listen(&bed, Access::unrestricted("test"), no_limits()).await;

    let mut tasks = Vec::new();
    for n in [250, 250, 250, 251] {
        let addr = addr.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&addr).await;
            c.send("toggle\n".repeat(n).as_bytes()).await;
            let mut ok = 0;
            for _ in 0..n {
                ok += c.line().await.starts_with("ok ") as usize;
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }

    assert_eq!(ok, 1001);
    assert_eq!(bed.pch.xusb2pr(), GUEST);
}

#[tokio::test]
async fn the_rate_limit_refuses_a_flood_without_losing_track_of_the_routing() {
    let bed = bed();
    let limits = Limits {
        rate_per_second: 5,
        ..no_limits()
    };
    let addr = listen(&bed, Access::unrestricted("test"), limits).await;
    let mut c = Client::connect(&addr).await;

    c.send("toggle\n".repeat(20).as_bytes()).await;
    let mut replies = Vec::new();
    for _ in 0..20 {
        replies.push(c.line().await);
    }

    let ok = replies.iter().filter(|r| r.starts_with("ok ")).count();
    let limited = replies
        .iter()
        .filter(|r| r.starts_with("err rate limit"))
        .count();
    assert_eq!((ok, limited), (5, 15));
    assert_eq!(bed.pch.xusb2pr(), GUEST);
}

#[tokio::test]
async fn a_netcat_client_that_never_reads_still_toggles() {
    let bed = bed();
    let addr = listen(&bed, Access::unrestricted("test"), no_limits()).await;

    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"toggle\n").await.unwrap();
    drop(s);

    assert_eq!(eventually_mask(&bed.pch, GUEST).await, GUEST);
}

#[tokio::test]
async fn a_command_without_a_final_newline_counts() {
    let bed = bed();
    let addr = listen(&bed, Access::unrestricted("test"), no_limits()).await;

    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"guest").await.unwrap();
    s.shutdown().await.unwrap();

    assert_eq!(eventually_mask(&bed.pch, GUEST).await, GUEST);
}

#[tokio::test]
async fn a_client_that_never_reads_its_replies_is_still_obeyed() {
    let bed = bed();
    let addr = listen(&bed, Access::unrestricted("test"), no_limits()).await;
    let mut mute = TcpStream::connect(&addr).await.unwrap();
    // 100,000 unknown profiles earn ~6 MB of `err no profile ...` replies nobody reads:
    // more than the socket buffers hold (tcp_wmem max 4 MB), so a service that waited
    // on writes would never reach the last line.
    mute.write_all("nosuch\n".repeat(100_000).as_bytes())
        .await
        .unwrap();
    mute.write_all(b"guest\n").await.unwrap();

    let mask = eventually_mask(&bed.pch, GUEST).await;
    let other = Client::connect(&addr).await.ask("status").await;

    assert_eq!(mask, GUEST);
    assert_eq!(other, "ok guest 0x3ffc");
}

#[tokio::test]
async fn a_listener_with_a_secret_wants_auth_first_and_hangs_up_on_guessing() {
    let bed = bed();
    let access = Access {
        origin: "tcp test".into(),
        allowed: None,
        secret: Some("s3cret".into()),
    };
    let addr = listen(&bed, access, no_limits()).await;
    let mut good = Client::connect(&addr).await;
    let mut bad = Client::connect(&addr).await;

    let before_auth = good.ask("guest").await;
    let auth = good.ask("auth s3cret").await;
    let after_auth = good.ask("guest").await;
    let guesses = [
        bad.ask("auth a").await,
        bad.ask("auth b").await,
        bad.ask("auth c").await,
    ];
    let hangup = bad.line().await;
    let eof = bad.line().await;

    assert_eq!(before_auth, "err this listener needs `auth SECRET` first");
    assert_eq!(
        (auth.as_str(), after_auth.as_str()),
        ("ok auth", "ok guest 0x3ffc")
    );
    assert_eq!(
        guesses,
        ["err wrong secret", "err wrong secret", "err wrong secret"]
    );
    assert_eq!(
        (hangup.as_str(), eof.as_str()),
        ("err too many wrong secrets, closing", "")
    );
}

#[tokio::test]
async fn an_idle_client_is_disconnected() {
    let bed = bed();
    let limits = Limits {
        idle_timeout: Some(Duration::from_millis(200)),
        ..no_limits()
    };
    let addr = listen(&bed, Access::unrestricted("test"), limits).await;
    let mut c = Client::connect(&addr).await;

    let bye = c.line().await;
    let eof = c.line().await;

    assert_eq!(
        (bye.as_str(), eof.as_str()),
        ("err idle timeout, closing", "")
    );
}

#[tokio::test]
async fn binding_a_tcp_listener_without_a_secret_is_refused_on_loopback_too() {
    let loopback = bind("127.0.0.1:0", None, "test").await.unwrap_err();
    let any = bind("0.0.0.0:0", None, "test").await.unwrap_err();

    assert!(matches!(loopback, ToggleError::NoSecret(_)));
    assert!(matches!(any, ToggleError::NoSecret(_)));
    assert!(loopback.to_string().contains("Set `secret"), "{loopback}");
}

#[tokio::test]
async fn binding_a_non_loopback_address_with_a_secret_works() {
    let listener = bind("0.0.0.0:0", Some("s3cret"), "test").await;

    assert!(listener.is_ok());
}

#[test]
fn names_are_not_addresses() {
    assert!(check_listen_address("[::1]:4510", true).is_ok());
    assert!(matches!(
        check_listen_address("localhost:4510", true),
        Err(ToggleError::BadAddress(_))
    ));
}

#[tokio::test]
async fn start_serves_tcp_and_each_vm_link_with_its_own_profiles() {
    let bed = bed();
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string()
    };
    let (tcp, serial) = (free(), free());
    let config = ToggleConfig {
        listen: Some(tcp.clone()),
        secret: Some("host-secret".into()),
        ..ToggleConfig::default()
    };
    let vms = [VmLink {
        vm: "win11".into(),
        listen: serial.clone(),
        profiles: vec!["guest".into()],
        qemu_user: None,
        secret: Some("vm-secret".into()),
    }];
    let tasks = start(bed.service.clone(), &config, &vms).await.unwrap();

    let mut vm = Client::connect(&serial).await;
    let from_vm = [
        vm.ask("auth vm-secret").await,
        vm.ask("host").await,
        vm.ask("guest").await,
    ];
    let mut host = Client::connect(&tcp).await;
    let from_host = [host.ask("auth host-secret").await, host.ask("desk").await];

    assert_eq!(
        from_vm,
        [
            "ok auth",
            "err profile `host` is not allowed for VM win11 (allowed: guest)",
            "ok guest 0x3ffc"
        ]
    );
    assert_eq!(from_host, ["ok auth", "ok desk 0x3f0f"]);
    tasks.iter().for_each(|t| t.abort());
}

#[tokio::test]
async fn the_control_socket_hook_handles_a_line_directly() {
    let bed = bed();
    let mut session = Session::default();

    let reply = bed
        .service
        .handle_line(
            &Access::unrestricted("control socket"),
            &mut session,
            b"guest\n",
        )
        .await;

    assert_eq!(
        reply.map(|r| r.to_string()).as_deref(),
        Some("ok guest 0x3ffc")
    );
    assert_eq!(
        bed.router
            .lock()
            .unwrap()
            .active_profile()
            .unwrap()
            .as_deref(),
        Some("guest")
    );
}

fn routing_config() -> RoutingConfig {
    config()
}

/// The engine with its routing reconciler on `pch`, and a toggle service whose requests
/// go to it, as in `usbroute serve`.
fn engine_routing(pch: &Pch) -> (engine::EngineHandle, ToggleService) {
    let (handle, _task) = engine::spawn(EngineOptions::default());
    let router = ProfileRouter::open(&pch.root(), &routing_config()).unwrap();
    handle.send(Input::Routing(RoutingInput::Use(Box::new(router))));
    let service = ToggleService::new(Arc::new(handle.clone()));
    (handle, service)
}

#[tokio::test]
async fn the_engine_puts_the_routing_back_after_a_resume() {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
    let (engine, service) = engine_routing(&pch);
    let access = Access::unrestricted("control socket");
    let reply = service
        .handle_line(&access, &mut Session::default(), b"guest")
        .await
        .map(|r| r.to_string());
    pch.kernel_resume_rewrite();
    // What the daemon's clock watch sends when it sees the host resume.
    engine.send(Input::Routing(RoutingInput::Check {
        why: "after the host resumed".into(),
    }));

    let mask = eventually_mask(&pch, GUEST).await;

    assert_eq!(reply.as_deref(), Some("ok guest 0x3ffc"));
    assert_eq!(mask, GUEST);
}

#[tokio::test]
async fn the_engine_publishes_the_routing_in_its_status() {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
    let (engine, service) = engine_routing(&pch);
    let access = Access::unrestricted("control socket");
    service
        .handle_line(&access, &mut Session::default(), b"guest")
        .await;
    let mut status = engine.status();

    let routing = tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s.routing.as_ref().is_some_and(|r| r.intent.is_some())),
    )
    .await
    .expect("the routing in the status within 10 s")
    .unwrap()
    .routing
    .clone()
    .unwrap();

    assert_eq!(routing.controller, XHCI);
    assert_eq!(routing.profile.as_deref(), Some("guest"));
    assert_eq!(routing.intent.as_deref(), Some("guest"));
    assert_eq!(routing.xusb2pr, GUEST);
}
