//! `qemu:///system` and friends, read into the sockets to try. libvirt's client picks the
//! socket in `src/remote/remote_sockets.c` (`remoteGetUNIXSocket`, mode auto): the modular
//! daemon's `virtqemud-sock` when that file exists, else the monolithic `libvirt-sock`
//! (Debian's packages ship only `libvirtd`, so both occur). For `/session` the sockets are
//! in `$XDG_RUNTIME_DIR/libvirt/` (`remoteGetUNIXSocketHelper`, `virGetUserRuntimeDirectory`).

use super::{LibvirtUri, RpcError};
use std::path::{Path, PathBuf};

/// What [`LibvirtUri::parse`] accepts, for the refusal messages.
const SUPPORTED: &str = "qemu:///system, qemu+unix:///system, qemu:///session, \
                         each with an optional ?socket=/path";

/// Where the system daemons put their sockets (`LOCALSTATEDIR/run/libvirt`).
const SYSTEM_DIR: &str = "/run/libvirt";

impl LibvirtUri {
    pub(super) fn parse_in(uri: &str, runtime_dir: Option<&Path>) -> Result<LibvirtUri, RpcError> {
        let refuse = |why: String| RpcError::UnsupportedUri {
            uri: uri.to_owned(),
            why,
        };
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| refuse("it has no scheme (qemu://)".into()))?;
        match scheme {
            "qemu" | "qemu+unix" => {}
            s if s.starts_with("qemu+") => {
                return Err(refuse(format!(
                    "transport `{}` is remote; usbroute talks to the local daemon over its unix socket only",
                    &s[5..]
                )))
            }
            s => return Err(refuse(format!("driver `{s}` is not QEMU; usbroute drives QEMU domains"))),
        }
        let (authority_path, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match authority_path.find('/') {
            Some(i) => authority_path.split_at(i),
            None => (authority_path, ""),
        };
        if !authority.is_empty() {
            return Err(refuse(format!(
                "it names host `{authority}`; only the local daemon is supported (write qemu:///system)"
            )));
        }
        let dir = match path {
            "/system" => PathBuf::from(SYSTEM_DIR),
            "/session" => runtime_dir.map(|d| d.join("libvirt")).ok_or_else(|| {
                refuse(
                    "qemu:///session needs $XDG_RUNTIME_DIR to find the session daemon's socket"
                        .into(),
                )
            })?,
            p => {
                return Err(refuse(format!(
                    "path `{p}` is neither /system nor /session"
                )))
            }
        };
        let mut sockets = vec![dir.join("virtqemud-sock"), dir.join("libvirt-sock")];
        for param in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
        {
            match param.split_once('=') {
                Some(("socket", value)) => {
                    let value = percent_decoded(value)
                        .ok_or_else(|| refuse(format!("socket `{value}` has a bad %-escape")))?;
                    if !value.starts_with('/') {
                        return Err(refuse(format!("socket `{value}` is not an absolute path")));
                    }
                    sockets = vec![PathBuf::from(value)];
                }
                _ => {
                    return Err(refuse(format!(
                        "parameter `{param}` is not supported (only socket=/path)"
                    )))
                }
            }
        }
        Ok(LibvirtUri {
            text: uri.to_owned(),
            sockets,
            open_name: format!("qemu://{path}"),
        })
    }
}

/// `%2F` and friends decoded, as libvirt decodes its URI's query values; `None` for a
/// broken escape or bytes that are not UTF-8.
fn percent_decoded(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = char::from(bytes.next()?).to_digit(16)?;
            let lo = char::from(bytes.next()?).to_digit(16)?;
            out.push(u8::try_from(hi * 16 + lo).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// For messages: every supported form.
pub(super) fn supported() -> &'static str {
    SUPPORTED
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(uri: &str) -> Result<LibvirtUri, RpcError> {
        LibvirtUri::parse_in(uri, Some(Path::new("/run/user/1000")))
    }

    #[test]
    fn system_tries_the_modular_daemon_then_the_monolithic_one() {
        let u = parse("qemu:///system").unwrap();
        assert_eq!(
            u.sockets,
            [
                PathBuf::from("/run/libvirt/virtqemud-sock"),
                PathBuf::from("/run/libvirt/libvirt-sock")
            ]
        );
        assert_eq!(u.open_name, "qemu:///system");
    }

    #[test]
    fn unix_transport_and_a_socket_parameter_name_one_socket_and_open_plain_system() {
        let u = parse("qemu+unix:///system?socket=/tmp/my%20sock").unwrap();
        assert_eq!(u.sockets, [PathBuf::from("/tmp/my sock")]);
        assert_eq!(u.open_name, "qemu:///system");
        assert_eq!(u.text, "qemu+unix:///system?socket=/tmp/my%20sock");
    }

    #[test]
    fn session_is_under_the_runtime_dir() {
        let u = parse("qemu:///session").unwrap();
        assert_eq!(
            u.sockets[0],
            PathBuf::from("/run/user/1000/libvirt/virtqemud-sock")
        );
        assert_eq!(u.open_name, "qemu:///session");
    }

    #[test]
    fn a_host_is_refused_naming_it() {
        let err = parse("qemu://otherhost/system").unwrap_err().to_string();
        assert!(err.contains("qemu://otherhost/system"), "{err}");
        assert!(err.contains("otherhost"), "{err}");
        assert!(err.contains("qemu:///system"), "{err}");
    }

    #[test]
    fn remote_transports_other_drivers_and_parameters_are_refused() {
        for uri in [
            "qemu+ssh://h/system",
            "qemu+tls:///system",
            "xen:///system",
            "lxc:///",
            "qemu:///embed?root=/x",
            "qemu:///system?mode=direct",
            "qemu:///system?socket=relative",
            "qemu:///system?socket=%zz",
            "qemu:system",
        ] {
            assert!(
                matches!(parse(uri), Err(RpcError::UnsupportedUri { .. })),
                "{uri}"
            );
        }
    }
}
