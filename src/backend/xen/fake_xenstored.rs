//! `FakeXenstored`, a named fake: a Unix listener speaking xenstored's wire protocol as a
//! test scripts it, for what a real xenstored does not do on demand: garbage, a reply that
//! never comes, a close in the middle of a call, closing every connection. (A real
//! xenstored cannot run without a hypervisor: it opens the event channel device at start.)

use super::wire::{Header, HEADER_LEN};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

/// What the fake does with one request: its header and payload in, bytes out (`None`:
/// hang up).
pub(crate) type Script = Box<dyn Fn(&Header, &[u8]) -> Option<Vec<u8>> + Send + Sync>;

/// A fake xenstored serving every connection by one script.
pub(crate) struct FakeXenstored {
    _dir: tempfile::TempDir,
    /// Its socket.
    pub(crate) socket: PathBuf,
    connections: Arc<AtomicUsize>,
}

impl FakeXenstored {
    /// Listen on a fresh socket; needs a tokio runtime.
    pub(crate) fn start(script: Script) -> FakeXenstored {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("socket");
        let listener = UnixListener::bind(&socket).unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        let script = Arc::new(script);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let script = script.clone();
                tokio::spawn(async move {
                    loop {
                        let mut head = [0u8; HEADER_LEN];
                        if stream.read_exact(&mut head).await.is_err() {
                            return;
                        }
                        let header = Header::parse(&head).unwrap();
                        let mut payload = vec![0; header.len as usize];
                        stream.read_exact(&mut payload).await.unwrap();
                        match script(&header, &payload) {
                            Some(bytes) => stream.write_all(&bytes).await.unwrap(),
                            None => return,
                        }
                    }
                });
            }
        });
        FakeXenstored {
            _dir: dir,
            socket,
            connections,
        }
    }

    /// How many connections it has accepted.
    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}
