//! One connection to a libvirt daemon, shared by every VM at that URI: opened when the
//! first VM there is watched, reopened after the daemon restarts, closed when the last
//! VM is no longer watched. The events the daemon sends for every domain are handed to
//! the VMs' presence tasks and backends through a broadcast channel per connection.
//!
//! Reconnecting is woken by the daemon's socket reappearing (inotify, the QEMU driver's
//! watcher) and backed off from 100 ms to 30 s otherwise; nothing runs on a timer while
//! the connection is up.

use super::rpc::{Connection, DomainEvent, LibvirtUri};
use crate::backend::reconnect::{self, backoff};
use std::sync::Arc;
use tokio::sync::{broadcast, watch, Notify};

/// Events buffered per subscriber; one that falls further behind re-reads the state.
const EVENT_BUFFER: usize = 256;

/// One open connection and its events.
#[derive(Clone)]
pub(super) struct Session {
    /// The connection.
    pub(super) conn: Connection,
    /// Every domain event of this connection, for whoever subscribes.
    pub(super) events: broadcast::Sender<DomainEvent>,
}

/// What a VM holds of its URI's connection: the session while there is one, and a way
/// to ask for a reconnect now. The link stops once the last holder is dropped.
pub(super) struct Link {
    /// The URI, as the config says it.
    pub(super) uri: LibvirtUri,
    /// The current session; `None` while disconnected.
    pub(super) session: watch::Receiver<Option<Session>>,
    retry: Arc<Notify>,
}

impl Link {
    /// Open a link to `uri`, connecting in the background. Needs a tokio runtime.
    pub(super) fn open(uri: LibvirtUri) -> Arc<Link> {
        let (publish, session) = watch::channel(None);
        let retry = Arc::new(Notify::new());
        tokio::spawn(keep_connected(uri.clone(), publish, retry.clone()));
        Arc::new(Link {
            uri,
            session,
            retry,
        })
    }

    /// Try to connect now if disconnected (a reload: the daemon may be back).
    pub(super) fn retry(&self) {
        self.retry.notify_one();
    }
}

/// Keep a connection to `uri` open and published until every receiver is gone.
async fn keep_connected(
    uri: LibvirtUri,
    publish: watch::Sender<Option<Session>>,
    retry: Arc<Notify>,
) {
    let mut failures = 0u32;
    let mut said: Option<String> = None;
    loop {
        let opened = tokio::select! {
            opened = Connection::open(&uri) => opened,
            () = publish.closed() => return,
        };
        match opened {
            Ok((conn, mut incoming)) => {
                failures = 0;
                said = None;
                tracing::info!(uri = %uri.text, socket = %conn.socket().display(), "libvirt connected");
                let (events, _) = broadcast::channel(EVENT_BUFFER);
                publish.send_replace(Some(Session {
                    conn: conn.clone(),
                    events: events.clone(),
                }));
                loop {
                    tokio::select! {
                        event = incoming.recv() => match event {
                            // No subscriber is fine: no VM of this URI is up or waiting.
                            Some(event) => { let _ = events.send(event); }
                            None => break,
                        },
                        () = conn.closed() => break,
                        () = publish.closed() => return,
                    }
                }
                publish.send_replace(None);
                tracing::warn!(uri = %uri.text, "libvirt connection closed (its daemon stopped or restarted); reconnecting");
            }
            Err(e) => {
                failures += 1;
                let text = crate::error_chain::one_line(&e);
                // Said once per distinct failure: a daemon that stays down is not news.
                if said.as_deref() != Some(text.as_str()) {
                    tracing::warn!(uri = %uri.text, "cannot connect to libvirt: {text}; retrying");
                    said = Some(text);
                }
            }
        }
        let pause = backoff(failures.max(1));
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = socket_appears(&uri) => {}
            () = retry.notified() => {}
            () = publish.closed() => return,
        }
    }
}

/// Resolves when one of `uri`'s sockets is created (the daemon started).
async fn socket_appears(uri: &LibvirtUri) {
    let sockets = uri
        .sockets
        .iter()
        .map(|path| (uri.text.clone(), path.clone()));
    reconnect::socket_appears(sockets).await
}
