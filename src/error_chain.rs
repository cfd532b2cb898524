//! The one printer of an error chain.
//!
//! A message says what failed and what to do; its cause is its `source()`, never quoted
//! in the message. This walks the chain once, so every cause appears exactly once.

use std::error::Error;

/// The whole chain on one line: `outer: cause: root cause`.
///
/// Every cause is printed, even one whose text happens to appear inside an outer
/// message: messages do not quote their source, so nothing is a repeat.
pub fn one_line(err: &(dyn Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        line.push_str(": ");
        line.push_str(&c.to_string());
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::path::PathBuf;

    /// The message leaves its cause to the chain, and the chain prints it once.
    fn assert_cause_printed_once(err: &(dyn Error + 'static)) {
        let cause = err.source().expect("the error chains a cause").to_string();

        let message = err.to_string();
        let line = one_line(err);

        assert!(
            !message.contains(&cause),
            "`{message}` quotes its source `{cause}`"
        );
        assert_eq!(line.matches(&cause).count(), 1, "{line}");
        assert_eq!(line, format!("{message}: {cause}"));
    }

    fn enoent() -> io::Error {
        io::Error::new(io::ErrorKind::NotFound, "no such file")
    }

    #[test]
    fn config_read_error_leaves_the_io_error_to_the_chain() {
        let err = crate::config::ConfigError::Read {
            path: PathBuf::from("/etc/usbroute/usbroute.toml"),
            source: enoent(),
        };
        assert_cause_printed_once(&err);
    }

    #[test]
    fn socket_watch_error_leaves_the_inotify_error_to_the_chain() {
        assert_cause_printed_once(&crate::backend::qemu::socket_watch::WatchError::Inotify(
            enoent(),
        ));
    }

    #[test]
    fn routing_start_error_leaves_the_routing_error_to_the_chain() {
        let cause = crate::routing::RoutingError::NoController("no xHCI".into());
        assert_cause_printed_once(&crate::daemon::RoutingStartError::Routing(cause));
    }

    #[test]
    fn routing_start_error_leaves_the_listener_error_to_the_chain() {
        let cause = crate::toggle::server::ToggleError::BadAddress("nowhere".into());
        assert_cause_printed_once(&crate::daemon::RoutingStartError::Listen(cause));
    }

    #[test]
    fn client_connect_error_leaves_the_io_error_to_the_chain() {
        let err = crate::daemon::ClientError::Connect {
            path: PathBuf::from("/run/usbroute.sock"),
            source: enoent(),
        };
        assert_cause_printed_once(&err);
    }

    #[test]
    fn client_io_error_leaves_the_io_error_to_the_chain() {
        let err = crate::daemon::ClientError::Io {
            path: PathBuf::from("/run/usbroute.sock"),
            source: io::Error::new(io::ErrorKind::TimedOut, "timed out"),
        };
        assert_cause_printed_once(&err);
    }

    fn bad_json() -> serde_json::Error {
        serde_json::from_str::<serde_json::Value>("{").unwrap_err()
    }

    #[test]
    fn client_bad_reply_leaves_the_json_error_to_the_chain() {
        let err = crate::daemon::ClientError::BadReply {
            path: PathBuf::from("/run/usbroute.sock"),
            source: bad_json(),
        };
        assert_cause_printed_once(&err);
    }

    #[test]
    fn client_config_errors_leave_their_cause_to_the_chain() {
        let path = PathBuf::from("/etc/usbroute/usbroute.toml");
        let read = crate::daemon::ClientError::ConfigRead {
            path: path.clone(),
            source: enoent(),
        };
        assert_cause_printed_once(&read);
        let source = crate::daemon::ControlSettings::from_toml("control_socket = 3").unwrap_err();
        assert_cause_printed_once(&crate::daemon::ClientError::ConfigInvalid { path, source });
    }

    #[test]
    fn damaged_bind_record_leaves_the_json_error_to_the_chain() {
        let err = crate::vfio::VfioError::BadRecord {
            path: PathBuf::from("/var/lib/usbroute/vfio/7.json"),
            source: bad_json(),
        };
        assert_cause_printed_once(&err);
    }

    #[test]
    fn qmp_connect_error_leaves_the_os_error_to_the_chain_and_says_when_nothing_listens() {
        let err = crate::backend::qemu::qmp::QmpError::Connect {
            path: PathBuf::from("/run/vm.qmp"),
            source: std::sync::Arc::new(enoent()),
        };
        assert_cause_printed_once(&err);
        assert!(err.is_socket_missing());
    }

    #[test]
    fn an_unreachable_vm_keeps_the_connection_error_whole_in_the_chain() {
        let qmp = crate::backend::qemu::qmp::QmpError::Connect {
            path: PathBuf::from("/run/vm.qmp"),
            source: std::sync::Arc::new(enoent()),
        };
        let err = crate::backend::BackendError::Unreachable {
            vm: "win11".into(),
            source: Box::new(qmp),
        };
        let line = one_line(&err);
        let qmp = err
            .source()
            .expect("the QMP error is the source")
            .to_string();
        assert_eq!(
            line,
            format!("VM win11: not reachable: {qmp}: no such file")
        );
        assert!(!err.to_string().contains(&qmp), "{err}");
    }
}
