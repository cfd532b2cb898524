//! A toggle service on loopback over a Lynx Point fixture, and a line client for it.

use super::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use usbroute::routing::config_space::SysfsConfigSpace;
use usbroute::routing::control::ProfileRouter;
use usbroute::routing::detect::detect;
use usbroute::routing::router::Router;
use usbroute::routing::RoutingConfig;
use usbroute::toggle::dispatch::Access;
use usbroute::toggle::server::{Limits, ToggleService};

pub const HOST: u16 = 0x3fff;
pub const GUEST: u16 = 0x3ffc;

pub fn config() -> RoutingConfig {
    host_guest_desk_profiles()
}

pub struct Bed {
    pub pch: Pch,
    pub service: ToggleService,
    pub router: Arc<Mutex<ProfileRouter<SysfsConfigSpace>>>,
}

pub fn bed() -> Bed {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
    let detected = detect(&pch.root(), None).unwrap();
    let router = Arc::new(Mutex::new(ProfileRouter::new(
        Router::open(&pch.root(), detected),
        config(),
    )));
    let service = ToggleService::new(router.clone());
    Bed {
        pch,
        service,
        router,
    }
}

pub fn no_limits() -> Limits {
    Limits {
        idle_timeout: None,
        rate_per_second: 0,
        max_connections: 8,
        ..Limits::default()
    }
}

/// Serve `access` on a fresh loopback port; its address.
pub async fn listen(bed: &Bed, access: Access, limits: Limits) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(bed.service.clone().serve(listener, access, limits));
    addr
}

/// A line client over TCP or a unix socket.
pub struct Client {
    pub reader: BufReader<Box<dyn AsyncRead + Unpin + Send>>,
    pub writer: Box<dyn AsyncWrite + Unpin + Send>,
}

impl Client {
    pub async fn connect(addr: &str) -> Self {
        let (r, w) = TcpStream::connect(addr).await.unwrap().into_split();
        Self {
            reader: BufReader::new(Box::new(r)),
            writer: Box::new(w),
        }
    }

    pub async fn connect_unix(path: &std::path::Path) -> Self {
        let (r, w) = tokio::net::UnixStream::connect(path)
            .await
            .unwrap()
            .into_split();
        Self {
            reader: BufReader::new(Box::new(r)),
            writer: Box::new(w),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    pub async fn line(&mut self) -> String {
        let mut s = String::new();
        tokio::time::timeout(Duration::from_secs(5), self.reader.read_line(&mut s))
            .await
            .expect("a reply within 5 s")
            .unwrap();
        s.trim_end().to_string()
    }

    pub async fn ask(&mut self, line: &str) -> String {
        self.send(format!("{line}\n").as_bytes()).await;
        self.line().await
    }
}

pub async fn eventually_mask(pch: &Pch, want: u16) -> u16 {
    for _ in 0..500 {
        if pch.xusb2pr() == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pch.xusb2pr()
}

/// Read replies until the server closes the connection (or `within` passes).
pub async fn replies_until_closed(c: &mut Client, within: Duration) -> (Vec<String>, bool) {
    let deadline = tokio::time::Instant::now() + within;
    let mut lines = Vec::new();
    loop {
        let mut s = String::new();
        match tokio::time::timeout_at(deadline, c.reader.read_line(&mut s)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (lines, true),
            Ok(Ok(_)) => lines.push(s.trim_end().to_string()),
            Err(_) => return (lines, false),
        }
    }
}

/// The single reply a connection gets before the server closes it (asserted).
pub async fn the_one_reply_before_closing(c: &mut Client) -> String {
    let (replies, closed) = replies_until_closed(c, Duration::from_secs(10)).await;
    assert!(closed, "the connection stayed open after {replies:?}");
    assert_eq!(replies.len(), 1, "{replies:?}");
    replies.into_iter().next().unwrap_or_default()
}

/// A listener's access with the secret `s3cret`.
pub fn with_secret(origin: &str, allowed: Option<&[&str]>) -> Access {
    Access {
        origin: origin.into(),
        allowed: allowed.map(|a| a.iter().map(|p| p.to_string()).collect()),
        secret: Some("s3cret".into()),
    }
}
