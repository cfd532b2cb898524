//! One Xen domain's presence, from xenstore watches only (nothing is polled): a task that
//! keeps a connection to xenstored, watches `@introduceDomain` and `@releaseDomain` (a
//! domain created or destroyed anywhere) and, once the domain is found, its qusb backend
//! directory (a controller appearing, connecting, going). After each event it looks
//! again: the domain is up when a domain has the configured name and a qusb controller in
//! state 4 (connected). A domain without one is reported held, with the xl.cfg line that
//! gives it one. xenstored going away is gone, and the task reconnects with backoff, woken
//! early when its socket reappears.

use super::client::{WatchEvent, Xenstore, XsError};
use super::decide::NoPort;
use super::store;
use super::vm::XenVm;
use super::xl::Xl;
use crate::backend::PresenceEvent;
use crate::sysfs::SysfsRoot;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// The token of every watch this task sets (events only say "look again").
const TOKEN: &str = "usbroute";

/// What the task was told to watch.
pub(super) struct Watched {
    /// The VM's name in the config.
    pub(super) vm: String,
    /// The Xen domain's name.
    pub(super) domain: String,
    /// xenstored's socket.
    pub(super) socket: PathBuf,
    /// How long a xenstore request waits.
    pub(super) timeout: Duration,
    /// How xl is run.
    pub(super) xl: Xl,
    /// Where the host's sysfs is.
    pub(super) root: SysfsRoot,
}

/// What a look at xenstore found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// No domain of that name.
    Absent,
    /// The domain runs, with a connected qusb controller.
    Ready(u32),
    /// The domain runs but cannot take devices (no controller, or none connected): why.
    Unusable(u32, String),
}

/// Why following a connection ended.
enum Ended {
    /// The daemon stopped watching this VM.
    Done,
    /// The connection failed: reconnect.
    Lost(String),
}

/// Watch `watched` until `report`'s receiver is dropped; `wakes` asks to look now.
pub(super) async fn watch_domain(
    watched: Watched,
    mut wakes: mpsc::UnboundedReceiver<()>,
    report: mpsc::UnboundedSender<PresenceEvent>,
) {
    let mut failures = 0u32;
    let mut said: Option<String> = None;
    loop {
        let connected = tokio::select! {
            c = Xenstore::connect(&watched.socket, watched.timeout) => c,
            () = report.closed() => return,
        };
        match connected {
            Ok((xs, events)) => {
                failures = 0;
                said = None;
                match follow(&watched, &xs, events, &mut wakes, &report).await {
                    Ended::Done => return,
                    Ended::Lost(why) => {
                        tracing::warn!(vm = %watched.vm, "xenstore connection lost: {why}; reconnecting")
                    }
                }
            }
            Err(e) => {
                failures += 1;
                let text = crate::error_chain::one_line(&e);
                if said.as_deref() != Some(text.as_str()) {
                    tracing::warn!(vm = %watched.vm, "{text}; retrying");
                    said = Some(text);
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff(failures.max(1))) => {}
            () = socket_appears(&watched.socket) => {}
            w = wakes.recv() => if w.is_none() { return },
            () = report.closed() => return,
        }
    }
}

/// Follow the domain over one connection until it fails or the daemon stops watching.
async fn follow(
    watched: &Watched,
    xs: &Xenstore,
    mut events: mpsc::Receiver<WatchEvent>,
    wakes: &mut mpsc::UnboundedReceiver<()>,
    report: &mpsc::UnboundedSender<PresenceEvent>,
) -> Ended {
    let lost = |e: XsError| Ended::Lost(crate::error_chain::one_line(&e));
    for special in ["@introduceDomain", "@releaseDomain"] {
        if let Err(e) = xs.watch(special, TOKEN).await {
            return lost(e);
        }
    }
    let mut up: Option<u32> = None;
    let mut held: Option<String> = None;
    let mut dir_watched: Option<u32> = None;
    let gone = |up: &mut Option<u32>, reason: String| {
        if up.take().is_some() {
            tracing::info!(vm = %watched.vm, "VM gone ({reason})");
            return report.send(PresenceEvent::Gone { reason }).is_ok();
        }
        true
    };
    loop {
        let seen = match look(xs, &watched.domain).await {
            Ok(seen) => seen,
            Err(e) => {
                gone(&mut up, "the xenstore connection failed".into());
                return lost(e);
            }
        };
        // Follow the found domain's controllers; a watch fires once when it is set.
        let domid = match &seen {
            Seen::Absent => None,
            Seen::Ready(d) | Seen::Unusable(d, _) => Some(*d),
        };
        if dir_watched != domid {
            if let Some(old) = dir_watched.take() {
                if let Err(e) = xs.unwatch(&store::qusb_dir(old), TOKEN).await {
                    gone(&mut up, "the xenstore connection failed".into());
                    return lost(e);
                }
            }
            if let Some(new) = domid {
                if let Err(e) = xs.watch(&store::qusb_dir(new), TOKEN).await {
                    gone(&mut up, "the xenstore connection failed".into());
                    return lost(e);
                }
                dir_watched = Some(new);
            }
        }
        let still = match &seen {
            Seen::Ready(d) => up == Some(*d),
            _ => false,
        };
        if !still {
            let reason = match (&seen, up) {
                (Seen::Ready(_), Some(_)) => "the domain was destroyed and created again".into(),
                (Seen::Absent, _) => format!("Xen domain {} is no longer running", watched.domain),
                (Seen::Unusable(_, why), _) => why.clone(),
                (Seen::Ready(_), None) => String::new(),
            };
            if !gone(&mut up, reason) {
                return Ended::Done;
            }
        }
        let sent = match seen {
            Seen::Ready(domid) if !still => {
                held = None;
                up = Some(domid);
                tracing::info!(vm = %watched.vm, "VM up (Xen domain {} is domain {domid}, its USB controller connected)", watched.domain);
                let vm = XenVm::new(
                    &watched.vm,
                    &watched.domain,
                    domid,
                    xs.clone(),
                    watched.xl.clone(),
                    watched.root.clone(),
                );
                report.send(PresenceEvent::Up(Arc::new(vm))).is_ok()
            }
            Seen::Unusable(_, why) if held.as_ref() != Some(&why) => {
                held = Some(why.clone());
                report.send(PresenceEvent::Held(Some(why))).is_ok()
            }
            Seen::Absent if held.take().is_some() => report.send(PresenceEvent::Held(None)).is_ok(),
            _ => true,
        };
        if !sent {
            return Ended::Done;
        }
        tokio::select! {
            event = events.recv() => if event.is_none() {
                gone(&mut up, "the xenstore connection closed".into());
                return Ended::Lost("xenstored closed the connection".into());
            },
            w = wakes.recv() => if w.is_none() { return Ended::Done },
            () = xs.closed() => {
                gone(&mut up, "the xenstore connection closed".into());
                return Ended::Lost("xenstored closed the connection".into());
            }
            () = report.closed() => return Ended::Done,
        }
    }
}

/// Whether the domain runs and can take devices.
async fn look(xs: &Xenstore, domain: &str) -> Result<Seen, XsError> {
    let Some(domid) = store::domain_id(xs, domain).await? else {
        return Ok(Seen::Absent);
    };
    let ctrls = store::controllers(xs, 0, domid).await?;
    if ctrls.iter().any(|c| c.is_connected()) {
        return Ok(Seen::Ready(domid));
    }
    let why = match ctrls.first() {
        None => NoPort::NoController {
            domain: domain.into(),
        },
        Some(c) => NoPort::NotConnected {
            domain: domain.into(),
            ctrl: c.devid,
            state: c.state,
        },
    };
    Ok(Seen::Unusable(domid, why.to_string()))
}

/// The wait after `failures` failed connects in a row: 100 ms doubling to 30 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64 << failures.saturating_sub(1).min(9)).min(Duration::from_secs(30))
}

/// Resolves when xenstored's socket is created; never when it cannot be watched.
async fn socket_appears(socket: &std::path::Path) {
    use crate::backend::qemu::socket_watch::SocketWatcher;
    match SocketWatcher::new([("xenstored".to_string(), socket.to_path_buf())]) {
        Ok(mut watcher) => {
            if watcher.next().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        Err(_) => std::future::pending().await,
    }
}
