//! Control socket: line-delimited JSON requests from the CLI to `usbroute serve`.
//!
//! [`protocol`] is the pure request/reply data (documented in docs/daemon.md), [`server`]
//! the tokio listener that checks every peer with SO_PEERCRED, [`client`] the CLI's side.
//! [`event_loop`] is `usbroute serve`: the edges around [`crate::engine::coordinator`] (uevents,
//! VM presence from each backend's driver, config, control requests, signals, systemd);
//! `vms` watches each VM through its driver and forwards its presence; [`mounts`] finds
//! host disks in use; `routing_hooks` runs port routing (the toggle service) when the
//! config has routing profiles. The `[[controller]]` rules are the engine's
//! ([`crate::engine::controllers`]): the daemon only hands them over.

mod changes;
pub mod client;
pub mod clock_watch;
mod control;
pub mod event_loop;
mod memory;
pub mod mounts;
mod narrate;
pub mod protocol;
mod routing_hooks;
pub mod server;
mod vms;

pub use crate::config::ControlSettings;
pub use client::{request, resolve_socket, ClientError, DEFAULT_CONTROL_SOCKET};
pub use event_loop::{run, DaemonError, DaemonOptions};
pub use protocol::{ErrorKind, Reply, Request};
pub use routing_hooks::RoutingStartError;
pub use server::{
    authorize, ControlGroup, ControlHandler, ControlLimits, ControlServer, Peer, ServiceError,
};
