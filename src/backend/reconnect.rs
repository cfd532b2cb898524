//! What every driver that keeps a connection to a hypervisor daemon (libvirtd, xenstored)
//! does between attempts: back off from 100 ms to 30 s, and wake early when the daemon's
//! socket is created (inotify, the QEMU driver's watcher).

use super::qemu::socket_watch::SocketWatcher;
use std::path::PathBuf;
use std::time::Duration;

/// The wait after `failures` failed connects in a row: 100 ms doubling to 30 s.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64 << failures.saturating_sub(1).min(9)).min(Duration::from_secs(30))
}

/// Resolves when one of `sockets` (a name for the log, the path) is created; never when
/// they cannot be watched (the backoff is then all there is).
pub async fn socket_appears(sockets: impl IntoIterator<Item = (String, PathBuf)>) {
    match SocketWatcher::new(sockets) {
        Ok(mut watcher) => {
            if watcher.next().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        Err(_) => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_at_100_ms_and_stops_at_30_s() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(9), Duration::from_millis(25_600));
        assert_eq!(backoff(10), Duration::from_secs(30));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(30));
    }
}
