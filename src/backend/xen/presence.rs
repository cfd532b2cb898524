//! One Xen domain's presence, from xenstore watches only (nothing is polled): a task that
//! keeps a connection to xenstored, watches `@introduceDomain` and `@releaseDomain` (a
//! domain created or destroyed anywhere) and, once the domain is found, its qusb backend
//! directory (a controller appearing, connecting, going). After each event it looks
//! again: the domain is up when a domain has the configured name and a qusb controller in
//! state 4 (connected). A domain without one is reported held, with the xl.cfg line that
//! gives it one. xenstored going away is gone, and the task reconnects with backoff, woken
//! early when its socket reappears.

use super::client::{pick_socket, WatchEvent, Xenstore, XsError};
use super::decide::NoPort;
use super::store;
use super::vm::XenVm;
use super::xl::Xl;
use crate::backend::reconnect::{self, backoff};
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
    /// Where xenstored's socket may be.
    pub(super) sockets: Vec<PathBuf>,
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

impl Seen {
    fn domid(&self) -> Option<u32> {
        match self {
            Seen::Absent => None,
            Seen::Ready(d) | Seen::Unusable(d, _) => Some(*d),
        }
    }
}

/// What the task has reported: the domain id it said up, the reason it said held.
#[derive(Debug, Default)]
struct State {
    up: Option<u32>,
    held: Option<String>,
}

/// One thing to report.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Up(u32),
    Gone(String),
    Held(Option<String>),
}

impl State {
    /// What to report after a look found `seen`, and the state after it.
    fn step(&mut self, seen: Seen, domain: &str) -> Vec<Step> {
        let mut steps = Vec::new();
        if let (Seen::Ready(d), Some(up)) = (&seen, self.up) {
            if *d == up {
                return steps;
            }
        }
        if self.up.take().is_some() {
            steps.push(Step::Gone(match &seen {
                Seen::Ready(_) => "the domain was destroyed and created again".into(),
                Seen::Absent => format!("Xen domain {domain} is no longer running"),
                Seen::Unusable(_, why) => why.clone(),
            }));
        }
        match seen {
            Seen::Ready(d) => {
                self.held = None;
                self.up = Some(d);
                steps.push(Step::Up(d));
            }
            Seen::Unusable(_, why) if self.held.as_ref() != Some(&why) => {
                self.held = Some(why.clone());
                steps.push(Step::Held(Some(why)));
            }
            Seen::Absent if self.held.take().is_some() => steps.push(Step::Held(None)),
            _ => {}
        }
        steps
    }

    /// The connection is gone: the domain with it, if it was up.
    fn lose(&mut self, reason: &str) -> Vec<Step> {
        self.held = None;
        self.up
            .take()
            .map(|_| Step::Gone(reason.into()))
            .into_iter()
            .collect()
    }
}

impl Step {
    /// The event to send; an up domain gets its backend on connection `xs`.
    fn event(self, watched: &Watched, xs: &Xenstore) -> PresenceEvent {
        match self {
            Step::Up(domid) => {
                tracing::info!(vm = %watched.vm, "VM up (Xen domain {} is domain {domid}, its USB controller connected)", watched.domain);
                let vm = XenVm::new(
                    &watched.vm,
                    &watched.domain,
                    domid,
                    xs.clone(),
                    watched.xl.clone(),
                    watched.root.clone(),
                );
                PresenceEvent::Up(Arc::new(vm))
            }
            Step::Gone(reason) => {
                tracing::info!(vm = %watched.vm, "VM gone ({reason})");
                PresenceEvent::Gone { reason }
            }
            Step::Held(why) => PresenceEvent::Held(why),
        }
    }
}

/// Report `steps`; `false` once the daemon stopped listening.
fn send_all(
    watched: &Watched,
    xs: &Xenstore,
    report: &mpsc::UnboundedSender<PresenceEvent>,
    steps: Vec<Step>,
) -> bool {
    steps
        .into_iter()
        .all(|s| report.send(s.event(watched, xs)).is_ok())
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
        let socket = pick_socket(&watched.sockets);
        let connected = tokio::select! {
            c = Xenstore::connect(&socket, watched.timeout) => c,
            () = report.closed() => return,
        };
        match connected {
            Ok((xs, events)) => {
                let mut looked = false;
                let ended = follow(&watched, &xs, events, &mut wakes, &report, &mut looked).await;
                let Ended::Lost(why) = ended else { return };
                // A connection that never got as far as one look (xenstored refusing a
                // read) backs off like a failed connect, instead of retrying at once.
                if looked {
                    failures = 0;
                    said = None;
                }
                failures += 1;
                let text = format!("xenstore connection lost: {why}; reconnecting");
                if said.as_deref() != Some(text.as_str()) {
                    tracing::warn!(vm = %watched.vm, "{text}");
                    said = Some(text);
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
            () = reconnect::socket_appears(watched.sockets.iter().map(|s| ("xenstored".to_string(), s.clone()))) => {}
            w = wakes.recv() => if w.is_none() { return },
            () = report.closed() => return,
        }
    }
}

/// Follow the domain over one connection until it fails or the daemon stops watching;
/// `looked` is set once a look succeeded.
async fn follow(
    watched: &Watched,
    xs: &Xenstore,
    mut events: mpsc::Receiver<WatchEvent>,
    wakes: &mut mpsc::UnboundedReceiver<()>,
    report: &mpsc::UnboundedSender<PresenceEvent>,
    looked: &mut bool,
) -> Ended {
    let lost = |e: XsError| Ended::Lost(crate::error_chain::one_line(&e));
    for special in ["@introduceDomain", "@releaseDomain"] {
        if let Err(e) = xs.watch(special, TOKEN).await {
            return lost(e);
        }
    }
    let mut state = State::default();
    let mut dir_watched: Option<u32> = None;
    loop {
        let looked_now = async {
            let seen = look(xs, &watched.domain, state.up).await?;
            // Follow the found domain's controllers; a watch fires once when it is set.
            if dir_watched != seen.domid() {
                if let Some(old) = dir_watched.take() {
                    xs.unwatch(&store::qusb_dir(old), TOKEN).await?;
                }
                if let Some(new) = seen.domid() {
                    xs.watch(&store::qusb_dir(new), TOKEN).await?;
                    dir_watched = Some(new);
                }
            }
            Ok::<_, XsError>(seen)
        };
        let seen = match looked_now.await {
            Ok(seen) => {
                *looked = true;
                seen
            }
            Err(e) => {
                let steps = state.lose("the xenstore connection failed");
                let _ = send_all(watched, xs, report, steps);
                return lost(e);
            }
        };
        let steps = state.step(seen, &watched.domain);
        if !send_all(watched, xs, report, steps) {
            return Ended::Done;
        }
        let closed = tokio::select! {
            event = events.recv() => event.is_none(),
            w = wakes.recv() => if w.is_none() { return Ended::Done } else { false },
            () = xs.closed() => true,
            () = report.closed() => return Ended::Done,
        };
        if closed {
            let _ = send_all(
                watched,
                xs,
                report,
                state.lose("the xenstore connection closed"),
            );
            return Ended::Lost("xenstored closed the connection".into());
        }
    }
}

/// Whether the domain runs and can take devices.
async fn look(xs: &Xenstore, domain: &str, hint: Option<u32>) -> Result<Seen, XsError> {
    let Some(domid) = store::domain_id(xs, domain, hint).await? else {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn after(seen: &[Seen]) -> (State, Vec<Step>) {
        let mut state = State::default();
        let mut steps = Vec::new();
        for s in seen {
            steps = state.step(s.clone(), "lab");
        }
        (state, steps)
    }

    fn unusable(domid: u32) -> Seen {
        Seen::Unusable(domid, "no qusb controller".into())
    }

    #[test]
    fn a_domain_with_a_connected_controller_comes_up_once() {
        assert_eq!(after(&[Seen::Absent, Seen::Ready(3)]).1, [Step::Up(3)]);
        assert!(after(&[Seen::Ready(3), Seen::Ready(3)]).1.is_empty());
    }

    #[test]
    fn a_domain_created_again_under_a_new_id_is_gone_then_up() {
        let (_, steps) = after(&[Seen::Ready(3), Seen::Ready(5)]);

        assert_eq!(
            steps,
            [
                Step::Gone("the domain was destroyed and created again".into()),
                Step::Up(5)
            ]
        );
    }

    #[test]
    fn a_destroyed_domain_is_gone_and_names_itself() {
        let (state, steps) = after(&[Seen::Ready(3), Seen::Absent]);

        assert_eq!(
            steps,
            [Step::Gone("Xen domain lab is no longer running".into())]
        );
        assert_eq!(state.up, None);
    }

    #[test]
    fn a_domain_without_a_usable_controller_is_held_once_with_the_reason() {
        assert_eq!(
            after(&[Seen::Absent, unusable(3)]).1,
            [Step::Held(Some("no qusb controller".into()))]
        );
        assert!(after(&[unusable(3), unusable(3)]).1.is_empty());
    }

    #[test]
    fn a_held_domain_whose_controller_connects_comes_up_and_one_destroyed_stops_being_held() {
        assert_eq!(after(&[unusable(3), Seen::Ready(3)]).1, [Step::Up(3)]);
        assert_eq!(after(&[unusable(3), Seen::Absent]).1, [Step::Held(None)]);
    }

    #[test]
    fn an_up_domain_whose_controller_goes_is_gone_and_held() {
        let (_, steps) = after(&[Seen::Ready(3), unusable(3)]);

        assert_eq!(
            steps,
            [
                Step::Gone("no qusb controller".into()),
                Step::Held(Some("no qusb controller".into()))
            ]
        );
    }

    #[test]
    fn a_lost_connection_is_gone_only_for_a_domain_that_was_up() {
        let (mut up, _) = after(&[Seen::Ready(3)]);
        let (mut down, _) = after(&[Seen::Absent]);

        assert_eq!(up.lose("closed"), [Step::Gone("closed".into())]);
        assert!(down.lose("closed").is_empty());
    }
}
