//! Notice VMs' QMP sockets appearing, with inotify on their directories.
//!
//! A VM is up when its QMP socket accepts a connection; this watcher only says *when to
//! try*: a socket file was created (or moved) at a VM's path. A directory that does not
//! exist yet (`/run/qemu` before the first VM starts) is handled by watching its nearest
//! existing ancestor and re-arming as directories appear. A watched directory that is
//! removed or moved away (a per-VM `RuntimeDirectory=` goes with its VM) loses its watch
//! (`IN_DELETE_SELF`/`IN_MOVE_SELF`, then `IN_IGNORED`): the watcher then re-arms on the
//! nearest existing ancestor and walks back down as the directories reappear.

use futures_util::StreamExt;
use inotify::{EventMask, EventStream, Inotify, WatchDescriptor, WatchMask};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A VM's QMP socket path was just created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketAppeared {
    /// The VM's name.
    pub vm: String,
    /// Its QMP socket.
    pub path: PathBuf,
}

/// The watcher could not be set up or failed.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// inotify itself failed.
    #[error("cannot watch the VMs' socket directories with inotify; raise fs.inotify.max_user_instances/max_user_watches if they are exhausted")]
    Inotify(#[from] std::io::Error),
}

/// Watches the directories of a set of QMP socket paths.
pub struct SocketWatcher {
    stream: EventStream<Vec<u8>>,
    /// Watched directory of each watch.
    dirs: HashMap<WatchDescriptor, PathBuf>,
    /// VM name of each socket path.
    sockets: Vec<(String, PathBuf)>,
}

impl std::fmt::Debug for SocketWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketWatcher")
            .field("sockets", &self.sockets)
            .finish_non_exhaustive()
    }
}

impl SocketWatcher {
    /// Watch the sockets of these `(vm name, qmp path)` pairs. Needs a tokio runtime.
    pub fn new(sockets: impl IntoIterator<Item = (String, PathBuf)>) -> Result<Self, WatchError> {
        let inotify = Inotify::init()?;
        let stream = inotify.into_event_stream(vec![0u8; 64 * 1024])?;
        let mut watcher = SocketWatcher {
            stream,
            dirs: HashMap::new(),
            sockets: sockets.into_iter().collect(),
        };
        watcher.arm()?;
        Ok(watcher)
    }

    /// Put a watch on each socket's directory, or on its nearest existing ancestor.
    fn arm(&mut self) -> Result<(), WatchError> {
        let mask = WatchMask::CREATE
            | WatchMask::MOVED_TO
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF
            | WatchMask::ONLYDIR;
        let mut watches = self.stream.watches();
        for (_, socket) in &self.sockets {
            let Some(dir) = nearest_existing_dir(socket) else {
                continue;
            };
            // Adding a watch twice on one directory returns the same descriptor.
            let wd = watches.add(&dir, mask)?;
            self.dirs.insert(wd, dir);
        }
        Ok(())
    }

    /// The directory of watch `wd` was removed or moved away: drop that watch (a moved
    /// directory would be watched under its new name) and re-arm on what exists now.
    fn lost(&mut self, wd: WatchDescriptor, mask: EventMask) -> Result<(), WatchError> {
        let Some(dir) = self.dirs.remove(&wd) else {
            return Ok(());
        };
        if mask.contains(EventMask::MOVE_SELF) {
            // Still alive under another name; gone already is fine.
            let _ = self.stream.watches().remove(wd);
        }
        tracing::debug!(dir = %dir.display(), "a watched socket directory went away; watching its nearest existing ancestor");
        self.arm()
    }

    /// A socket that already exists in a directory (re-)armed just now: its creation
    /// may have come before the watch.
    fn existing_below(&self, dir: &Path) -> Option<SocketAppeared> {
        self.sockets
            .iter()
            .find(|(_, s)| s.starts_with(dir) && s.exists())
            .map(|(vm, s)| SocketAppeared {
                vm: vm.clone(),
                path: s.clone(),
            })
    }

    /// Wait until some VM's socket appears. Directories created on the way to a socket are
    /// followed silently; a socket that appeared while its directory was being armed is
    /// reported too.
    pub async fn next(&mut self) -> Result<SocketAppeared, WatchError> {
        loop {
            let event = match self.stream.next().await {
                Some(event) => event?,
                None => {
                    return Err(WatchError::Inotify(std::io::Error::other(
                        "inotify stream ended",
                    )))
                }
            };
            let Some(dir) = self.dirs.get(&event.wd).cloned() else {
                continue;
            };
            let gone = EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED;
            if event.mask.intersects(gone) {
                self.lost(event.wd, event.mask)?;
                // Re-created before the new watch existed: nothing more will be heard.
                if let Some(hit) = self.existing_below(&dir) {
                    return Ok(hit);
                }
                continue;
            }
            let Some(name) = event.name else { continue };
            let created = dir.join(&name);
            if let Some(hit) = self.socket_at(&created) {
                return Ok(hit);
            }
            if self.is_on_the_way(&created) {
                self.arm()?;
                // The socket may have been created before the new watch existed.
                if let Some(hit) = self.existing_below(&created) {
                    return Ok(hit);
                }
            }
        }
    }

    fn socket_at(&self, path: &Path) -> Option<SocketAppeared> {
        self.sockets
            .iter()
            .find(|(_, s)| s == path)
            .map(|(vm, s)| SocketAppeared {
                vm: vm.clone(),
                path: s.clone(),
            })
    }

    fn is_on_the_way(&self, dir: &Path) -> bool {
        self.sockets
            .iter()
            .any(|(_, s)| s.starts_with(dir) && s.as_path() != dir)
    }
}

fn nearest_existing_dir(socket: &Path) -> Option<PathBuf> {
    socket
        .ancestors()
        .skip(1)
        .find(|d| d.is_dir())
        .map(Path::to_path_buf)
}
