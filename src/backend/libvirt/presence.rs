//! One libvirt domain's presence: a task that, whenever its URI's connection is up,
//! asks whether the domain runs, reports it up with a backend, and then follows the
//! lifecycle events libvirt sends for it: stopped, crashed or undefined is gone, started
//! is up again (a domain restarted gets its devices back). A closed connection is gone
//! too, and the task waits for the next one. Events only; nothing is polled.

use super::link::{Link, Session};
use super::rpc::{Domain, DomainEvent, Lifecycle};
use super::vm::LibvirtVm;
use crate::backend::PresenceEvent;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc};

/// What the task was told to watch.
pub(super) struct Watched {
    /// The VM's name in the config.
    pub(super) vm: String,
    /// The libvirt domain's name.
    pub(super) domain: String,
    /// How long a detach waits for libvirt's device-removed event.
    pub(super) removal_timeout: Duration,
}

/// Why a wait ended.
enum Woken {
    /// Look again: the domain may have started (an event for it, a retry, events lost).
    Recheck,
    /// The domain stopped.
    Stopped(String),
    /// The connection closed or changed: wait for the next session.
    SessionChanged,
    /// The daemon stopped watching this VM.
    Done,
}

/// Watch `watched` over `link` until `report`'s receiver is dropped.
pub(super) async fn watch_domain(
    watched: Watched,
    link: Arc<Link>,
    mut wakes: mpsc::UnboundedReceiver<()>,
    report: mpsc::UnboundedSender<PresenceEvent>,
) {
    let mut sessions = link.session.clone();
    let mut said_missing = false;
    let mut failures = 0u32;
    loop {
        let Some(session) = next_session(&mut sessions, &report).await else {
            return;
        };
        // Subscribed before asking, so an event between the answer and the wait is kept.
        let mut events = session.events.subscribe();
        let domain = match running_domain(&session, &watched.domain).await {
            Ok(Running::Yes(domain)) => domain,
            Ok(missing_or_off) => {
                failures = 0;
                if let Running::Undefined = missing_or_off {
                    if !said_missing {
                        tracing::warn!(vm = %watched.vm, uri = %link.uri.text, "libvirt has no domain `{}` (`virsh list --all` lists the defined ones); waiting for it to be defined and started", watched.domain);
                        said_missing = true;
                    }
                } else {
                    said_missing = false;
                }
                match wait(
                    &watched,
                    None,
                    &mut events,
                    &mut sessions,
                    &mut wakes,
                    &report,
                )
                .await
                {
                    Woken::Done => return,
                    Woken::Recheck | Woken::SessionChanged | Woken::Stopped(_) => continue,
                }
            }
            Err(reason) => {
                failures += 1;
                let pause = error_backoff(failures);
                tracing::warn!(vm = %watched.vm, "cannot tell whether libvirt domain `{}` runs: {reason}; asking again in {:.1} s", watched.domain, pause.as_secs_f64());
                // A connection that answers with errors sends no event about it: ask
                // again after a pause (only while it fails), or sooner if something happens.
                tokio::select! {
                    woken = wait(&watched, None, &mut events, &mut sessions, &mut wakes, &report) => {
                        if let Woken::Done = woken {
                            return;
                        }
                    }
                    () = tokio::time::sleep(pause) => {}
                }
                continue;
            }
        };
        said_missing = false;
        failures = 0;
        tracing::info!(vm = %watched.vm, uri = %link.uri.text, "VM up (libvirt domain `{}` running)", watched.domain);
        let backend = LibvirtVm::new(&watched, domain.clone(), session.clone());
        if report.send(PresenceEvent::Up(Arc::new(backend))).is_err() {
            return;
        }
        let reason = loop {
            match wait(
                &watched,
                Some(&domain),
                &mut events,
                &mut sessions,
                &mut wakes,
                &report,
            )
            .await
            {
                Woken::Done => return,
                Woken::Stopped(reason) => break reason,
                Woken::SessionChanged => break "the libvirt connection closed".to_string(),
                // Events were lost while up: it may have stopped and started again.
                Woken::Recheck => match running_domain(&session, &watched.domain).await {
                    Ok(Running::Yes(now)) if now.id == domain.id => continue,
                    Ok(Running::Yes(_)) => break "the domain was restarted".to_string(),
                    Ok(_) => break "the domain is no longer running".to_string(),
                    Err(e) => break e,
                },
            }
        };
        tracing::info!(vm = %watched.vm, "VM gone ({reason})");
        if report.send(PresenceEvent::Gone { reason }).is_err() {
            return;
        }
    }
}

/// The pause before asking again after `failures` failed questions in a row: 500 ms
/// doubling to 30 s.
fn error_backoff(failures: u32) -> Duration {
    Duration::from_millis(500u64 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(30))
}

/// The current session, waiting for one while disconnected; `None` when the daemon
/// stopped watching or the link ended.
async fn next_session(
    sessions: &mut tokio::sync::watch::Receiver<Option<Session>>,
    report: &mpsc::UnboundedSender<PresenceEvent>,
) -> Option<Session> {
    loop {
        if let Some(session) = sessions.borrow_and_update().clone() {
            return Some(session);
        }
        tokio::select! {
            changed = sessions.changed() => changed.ok()?,
            () = report.closed() => return None,
        }
    }
}

/// Whether a domain runs, as libvirt says.
enum Running {
    Yes(Domain),
    /// Defined, not running.
    No,
    /// No domain of that name.
    Undefined,
}

async fn running_domain(session: &Session, name: &str) -> Result<Running, String> {
    let one_line = |e| crate::error_chain::one_line(&e);
    let Some(domain) = session.conn.lookup_domain(name).await.map_err(one_line)? else {
        return Ok(Running::Undefined);
    };
    Ok(
        match session.conn.is_running(&domain).await.map_err(one_line)? {
            true => Running::Yes(domain),
            false => Running::No,
        },
    )
}

/// Wait for what matters to a domain that is `up` (`Some`: its running instance) or
/// not: its lifecycle events, the session changing, a retry, the daemon leaving.
async fn wait(
    watched: &Watched,
    up: Option<&Domain>,
    events: &mut broadcast::Receiver<DomainEvent>,
    sessions: &mut tokio::sync::watch::Receiver<Option<Session>>,
    wakes: &mut mpsc::UnboundedReceiver<()>,
    report: &mpsc::UnboundedSender<PresenceEvent>,
) -> Woken {
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(DomainEvent::Lifecycle { domain, event, .. }) if domain.name == watched.domain => {
                    if let Some(woken) = lifecycle(up, event) {
                        return woken;
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => return Woken::Recheck,
                // The session's sender went with its connection.
                Err(RecvError::Closed) => return Woken::SessionChanged,
            },
            changed = sessions.changed() => return match changed {
                Ok(()) => Woken::SessionChanged,
                Err(_) => Woken::Done,
            },
            w = wakes.recv() => match w {
                // A retry while up is moot.
                Some(()) if up.is_some() => {}
                Some(()) => return Woken::Recheck,
                None => return Woken::Done,
            },
            () = report.closed() => return Woken::Done,
        }
    }
}

/// What a lifecycle event of the watched domain means while it is `up` or not.
fn lifecycle(up: Option<&Domain>, event: Lifecycle) -> Option<Woken> {
    match (up, event) {
        (Some(_), Lifecycle::Stopped) => Some(Woken::Stopped("the domain stopped".into())),
        (Some(_), Lifecycle::Crashed) => Some(Woken::Stopped("the domain crashed".into())),
        (Some(_), Lifecycle::Undefined) => Some(Woken::Stopped("the domain was undefined".into())),
        // A start we did not see the stop of.
        (Some(_), Lifecycle::Started) => Some(Woken::Recheck),
        (Some(_), _) => None,
        (None, Lifecycle::Started | Lifecycle::Resumed | Lifecycle::Defined) => {
            Some(Woken::Recheck)
        }
        (None, _) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain() -> Domain {
        Domain {
            name: "win11".into(),
            uuid: [0; 16],
            id: 3,
        }
    }

    #[test]
    fn a_failing_question_is_asked_again_after_500_ms_doubling_to_30_s() {
        assert_eq!(error_backoff(1), Duration::from_millis(500));
        assert_eq!(error_backoff(2), Duration::from_secs(1));
        assert_eq!(error_backoff(7), Duration::from_secs(30));
        assert_eq!(error_backoff(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn a_running_domain_is_gone_when_it_stops_crashes_or_is_undefined_and_nothing_else() {
        let up = domain();
        for event in [Lifecycle::Stopped, Lifecycle::Crashed, Lifecycle::Undefined] {
            assert!(
                matches!(lifecycle(Some(&up), event), Some(Woken::Stopped(_))),
                "{event:?}"
            );
        }
        for event in [
            Lifecycle::Suspended,
            Lifecycle::Resumed,
            Lifecycle::Shutdown,
            Lifecycle::PmSuspended,
            Lifecycle::Defined,
            Lifecycle::Other(42),
        ] {
            assert!(lifecycle(Some(&up), event).is_none(), "{event:?}");
        }
    }

    #[test]
    fn a_domain_that_is_down_is_looked_at_again_when_it_starts_or_is_defined() {
        for event in [Lifecycle::Started, Lifecycle::Resumed, Lifecycle::Defined] {
            assert!(
                matches!(lifecycle(None, event), Some(Woken::Recheck)),
                "{event:?}"
            );
        }
        for event in [
            Lifecycle::Stopped,
            Lifecycle::Crashed,
            Lifecycle::Undefined,
            Lifecycle::Shutdown,
        ] {
            assert!(lifecycle(None, event).is_none(), "{event:?}");
        }
    }
}
