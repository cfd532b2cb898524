//! The toggle service: a line protocol that switches routing profiles.
//!
//! - [`protocol`]: pure line parser and reply format;
//! - [`dispatch`]: requests → profile changes, with per-listener access rules, behind
//!   the [`dispatch::RoutingControl`] trait;
//! - [`server`]: tokio listeners (TCP, per-VM serial links) and the control-socket hook;
//! - [`start`]: every listener the config asks for;
//! - [`runtime`]: all of it for `usbroute serve` (router, listeners, control hook, watch).

pub mod dispatch;
pub mod protocol;
pub mod runtime;
pub mod server;

use serde::{Deserialize, Serialize};
use server::{bind, Limits, ToggleError, ToggleService};
use std::time::Duration;

/// Default TCP address of the toggle service (what `usbroute toggle` connects to).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4510";

/// Config `[toggle]` (stable interface).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToggleConfig {
    /// TCP line service address; non-loopback needs `secret`.
    pub listen: Option<String>,
    /// Shared secret required from clients of a non-loopback listener.
    pub secret: Option<String>,
    /// Commands per second one connection may send (default 20; 0 = no limit).
    #[serde(default)]
    pub rate_per_second: Option<u32>,
    /// Seconds a TCP client may stay silent before it is disconnected (default 300).
    /// Serial links of VMs never time out: QEMU holds them for the VM's lifetime.
    #[serde(default)]
    pub idle_timeout_secs: Option<u64>,
}

impl ToggleConfig {
    /// The limits for TCP clients.
    pub fn tcp_limits(&self) -> Limits {
        let d = Limits::default();
        Limits {
            idle_timeout: Some(
                self.idle_timeout_secs
                    .map(Duration::from_secs)
                    .unwrap_or(d.idle_timeout.expect("default has a timeout")),
            ),
            rate_per_second: self.rate_per_second.unwrap_or(d.rate_per_second),
            ..d
        }
    }

    /// The limits for a VM's serial link.
    pub fn serial_limits(&self) -> Limits {
        Limits {
            idle_timeout: None,
            ..self.tcp_limits()
        }
    }
}

/// One VM's serial link (from `[[vm]] serial = ..., profiles = [...]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmLink {
    /// VM name.
    pub vm: String,
    /// Where the service listens and QEMU connects (`127.0.0.1:4511`).
    pub listen: String,
    /// Profiles this VM may select; empty = none at all except `status`.
    pub profiles: Vec<String>,
}

/// Bind every listener the config asks for and serve them in the background.
/// Binding happens before this returns, so a bad address fails `serve` at start-up.
pub async fn start(
    service: ToggleService,
    config: &ToggleConfig,
    vms: &[VmLink],
) -> Result<Vec<tokio::task::JoinHandle<()>>, ToggleError> {
    let mut tasks = Vec::new();
    let secret = config.secret.as_deref();
    let listen = config.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
    let listener = bind(listen, secret, "[toggle] listen").await?;
    let non_loopback = listener
        .local_addr()
        .map(|a| !a.ip().is_loopback())
        .unwrap_or(true);
    let access = dispatch::Access {
        origin: format!("tcp {listen}"),
        allowed: None,
        // Loopback clients are the host's own users; a secret guards only the network.
        secret: non_loopback.then(|| secret.map(str::to_string)).flatten(),
    };
    tasks.push(tokio::spawn(service.clone().serve(
        listener,
        access,
        config.tcp_limits(),
    )));
    for vm in vms {
        let origin = format!("VM {}", vm.vm);
        let listener = bind(&vm.listen, secret, &origin).await?;
        let non_loopback = listener
            .local_addr()
            .map(|a| !a.ip().is_loopback())
            .unwrap_or(true);
        let access = dispatch::Access {
            origin,
            allowed: Some(vm.profiles.iter().cloned().collect()),
            secret: non_loopback.then(|| secret.map(str::to_string)).flatten(),
        };
        tasks.push(tokio::spawn(service.clone().serve(
            listener,
            access,
            config.serial_limits(),
        )));
    }
    Ok(tasks)
}

/// Problems in `[toggle]` and the VMs' serial links that need no hardware to see: bad
/// or non-loopback addresses without a secret, two links on one address, a VM allowed
/// a profile that does not exist. One message each, for the config loader.
pub fn check_config(
    toggle: &ToggleConfig,
    vms: &[VmLink],
    profiles: &std::collections::BTreeSet<String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let secret = toggle.secret.is_some();
    if let Some(s) = &toggle.secret {
        // It travels as `auth SECRET` within one protocol line.
        if s.is_empty()
            || s.len() > protocol::MAX_LINE - 5
            || !s.bytes().all(|b| b.is_ascii_graphic())
        {
            problems.push(format!(
                "[toggle] secret must be 1 to {} printable ASCII characters without spaces",
                protocol::MAX_LINE - 5
            ));
        }
    }
    let listen = toggle.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
    let mut seen = std::collections::BTreeMap::new();
    let mut check = |addr: &str, owner: String, problems: &mut Vec<String>| {
        if let Err(e) = server::check_listen_address(addr, secret) {
            problems.push(format!("{owner}: {e}"));
        }
        if let Some(other) = seen.insert(addr.to_string(), owner.clone()) {
            problems.push(format!("{owner} and {other} both listen on {addr}"));
        }
    };
    check(listen, "[toggle] listen".into(), &mut problems);
    for vm in vms {
        check(&vm.listen, format!("VM `{}` serial", vm.vm), &mut problems);
        for p in &vm.profiles {
            if !profiles.contains(p) {
                problems.push(format!(
                    "VM `{}` may select profile `{p}`, which has no [routing.profile.{p}]",
                    vm.vm
                ));
            }
        }
    }
    problems
}
