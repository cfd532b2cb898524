//! Unix socket plumbing shared by the daemon's control socket and the VMs' toggle serial
//! sockets: the path made ready (stale socket replaced, a live one refused), the mode
//! and owner set, and the peer's groups as the kernel recorded them at connect time.
//! Each user words the errors for its own socket (`daemon::ServiceError`,
//! `toggle::server::ToggleError`).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A socket path could not be made ready or restricted.
#[derive(Debug, thiserror::Error)]
pub enum SocketPathError {
    /// Something answers on the socket already.
    #[error("{0}: something is already listening there; stop it first, or choose another path")]
    InUse(PathBuf),
    /// Something that is not a socket sits at the path.
    #[error("{0}: exists and is not a socket; remove it or choose another path")]
    NotASocket(PathBuf),
    /// A filesystem call failed.
    #[error("{}: {what}", path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What we tried.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}
/// Make `path` ready for `bind`: its directory created, a stale socket left by a killed
/// daemon removed. A live socket (another daemon answers) or a non-socket is an error.
pub fn prepare_socket_path(path: &Path) -> Result<(), SocketPathError> {
    let io = io_error(path);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io("creating its directory"))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            Err(SocketPathError::NotASocket(path.to_path_buf()))
        }
        Ok(_) if std::os::unix::net::UnixStream::connect(path).is_ok() => {
            Err(SocketPathError::InUse(path.to_path_buf()))
        }
        Ok(_) => std::fs::remove_file(path).map_err(io("removing the stale socket")),
        Err(_) => Ok(()),
    }
}

/// Set a bound socket's mode and, when given, its owner and group.
pub fn restrict_socket(
    path: &Path,
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<(), SocketPathError> {
    let io = io_error(path);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io("setting its mode"))?;
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::chown(path, uid, gid).map_err(io("setting its owner"))?;
    }
    Ok(())
}

fn io_error(
    path: &Path,
) -> impl Fn(&'static str) -> Box<dyn FnOnce(std::io::Error) -> SocketPathError> {
    let path = path.to_path_buf();
    move |what| {
        let path = path.clone();
        Box::new(move |source| SocketPathError::Io { path, what, source })
    }
}

/// Most groups a process can have (NGROUPS_MAX on Linux).
const MAX_GROUPS: usize = 65536;

/// The peer's supplementary groups as the kernel captured them when it connected
/// (SO_PEERGROUPS, Linux 4.13). Unlike /proc/PID/status read after accept, this cannot
/// belong to another process that took over the pid.
#[allow(unsafe_code)]
pub fn peer_groups(socket: BorrowedFd<'_>) -> std::io::Result<Vec<u32>> {
    let size = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * size)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::ERANGE))?;
        // SAFETY: `groups` is a live, writable buffer of exactly `len` bytes, and the
        // kernel writes at most `len` bytes into it and the needed size into `len`.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let len = len as usize;
        if rc == 0 {
            groups.truncate(len / size);
            return Ok(groups);
        }
        let err = std::io::Error::last_os_error();
        let bigger = len / size;
        if err.raw_os_error() == Some(libc::ERANGE) && bigger > groups.len() && bigger <= MAX_GROUPS
        {
            groups.resize(bigger, 0);
            continue;
        }
        return Err(err);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn peer_groups_are_the_connecting_process_groups() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();

        let groups = peer_groups(a.as_fd()).unwrap();

        let mut ours: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .iter()
            .map(|g| g.as_raw())
            .collect();
        let mut got = groups.clone();
        ours.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, ours);
    }
}
