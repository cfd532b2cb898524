//! Control socket: line-delimited JSON requests from the CLI to `usbroute serve`.
//!
//! [`protocol`] is the pure request/reply data (documented in docs/daemon.md), [`server`]
//! the tokio listener that checks every peer with SO_PEERCRED, [`client`] the CLI's side.
//! [`event_loop`] is `usbroute serve`: the edges around [`crate::engine::coordinator`] (uevents,
//! VM presence, config, control requests, signals, systemd); [`presence`] runs one task
//! per VM that notices it come and go; [`mounts`] finds host disks in use;
//! [`controllers`] binds and restores the `[[controller]]` rules' groups; `routing_hooks`
//! runs port routing (the toggle service) when the config has routing profiles.

pub mod client;
mod control;
pub mod controllers;
pub mod event_loop;
pub mod mounts;
mod narrate;
pub mod presence;
pub mod protocol;
mod routing_hooks;
pub mod server;
pub mod socket;

pub use client::{request, resolve_socket, ClientError, DEFAULT_CONTROL_SOCKET};
pub use event_loop::{run, DaemonError, DaemonOptions};
pub use protocol::{ErrorKind, Reply, Request};
pub use routing_hooks::RoutingStartError;
pub use server::{
    authorize, ControlGroup, ControlHandler, ControlLimits, ControlServer, Peer, ServiceError,
};
pub use socket::{prepare_socket_path, restrict_socket};

use serde::Deserialize;
use std::path::PathBuf;

/// The control-socket part of the config file (`control_socket`, `control_group`), read on
/// its own so the CLI can find the socket without understanding the rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ControlSettings {
    /// Where the socket is (default [`DEFAULT_CONTROL_SOCKET`]).
    pub control_socket: Option<PathBuf>,
    /// The group whose members may use it besides root.
    pub control_group: Option<String>,
}

impl ControlSettings {
    /// Read the two keys from a config file's text; every other key is ignored here.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The socket path, the default when unset.
    pub fn socket(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_settings_ignore_rules_and_default_the_socket() {
        let text = "control_group = \"usbroute\"\n[[vm]]\nname = \"a\"\nqmp = \"/run/a.qmp\"\n";

        let s = ControlSettings::from_toml(text).unwrap();

        assert_eq!(s.control_group.as_deref(), Some("usbroute"));
        assert_eq!(s.socket(), PathBuf::from("/run/usbroute/control.sock"));
    }
}
