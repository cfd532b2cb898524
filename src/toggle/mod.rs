//! The toggle service: a line protocol that switches routing profiles.
//!
//! - [`protocol`]: pure line parser and reply format;
//! - [`dispatch`]: auth and per-listener access rules; requests go on to the engine's
//!   routing reconciler through the [`dispatch::RoutingControl`] trait (which decides
//!   and switches, see `crate::engine::routing`);
//! - [`server`]: tokio listeners (TCP where configured, per-VM serial links) and the
//!   control-socket hook;
//! - `limits`: rates, the shared budget of wrong secrets, evictable slots;
//! - [`start`]: every listener the config asks for (the VMs' links from
//!   `crate::config::vm_links`).

pub mod dispatch;
mod limits;
pub(crate) mod lines;
pub mod protocol;
pub mod server;

use crate::config::KeyProblem;
use serde::{Deserialize, Serialize};
use server::{bind, bind_unix, Limits, Listener, SerialPeers, ToggleError, ToggleService};
use std::time::Duration;

/// Config `[toggle]` (stable interface).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToggleConfig {
    /// TCP line service address; no TCP listener without it. Needs `secret`.
    pub listen: Option<String>,
    /// Shared secret every client of the TCP listener sends first (`auth SECRET`).
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
    /// Where the service listens and QEMU connects: a unix socket path (`/run/...`,
    /// the default kind) or `IP:PORT` (TCP, needs `secret`).
    pub listen: String,
    /// Profiles this VM may select; empty = none at all except `status`.
    pub profiles: Vec<String>,
    /// The user QEMU runs as (name or uid), allowed on the unix socket besides root.
    pub qemu_user: Option<String>,
    /// The secret a TCP link's guest sends first (`serial_secret`).
    pub secret: Option<String>,
}

impl VmLink {
    /// A unix socket path rather than a TCP address.
    pub fn is_unix(&self) -> bool {
        self.listen.starts_with('/')
    }
}

/// Bind every listener the config asks for and serve them in the background.
/// Binding happens before this returns, so a bad address fails `serve` at start-up.
pub async fn start(
    service: ToggleService,
    config: &ToggleConfig,
    vms: &[VmLink],
) -> Result<Vec<tokio::task::JoinHandle<()>>, ToggleError> {
    let mut tasks = Vec::new();
    if let Some(listen) = &config.listen {
        let secret = config.secret.as_deref();
        let listener = bind(listen, secret, "[toggle] listen").await?;
        let access = dispatch::Access {
            origin: format!("tcp {listen}"),
            allowed: None,
            secret: secret.map(str::to_string),
        };
        tasks.push(tokio::spawn(service.clone().serve(
            listener,
            access,
            config.tcp_limits(),
        )));
    }
    for vm in vms {
        let origin = format!("VM {}", vm.vm);
        let (listener, limits): (Listener, _) = if vm.is_unix() {
            let peers = SerialPeers::new(&vm.vm, vm.qemu_user.as_deref())?;
            let path = std::path::PathBuf::from(&vm.listen);
            let listener = bind_unix(&path, &peers)?;
            let unix = Listener::Unix {
                listener,
                path,
                peers,
            };
            (unix, config.serial_limits())
        } else {
            let tcp = bind(&vm.listen, vm.secret.as_deref(), &origin).await?;
            (tcp.into(), config.serial_limits())
        };
        let access = dispatch::Access {
            origin,
            allowed: Some(vm.profiles.iter().cloned().collect()),
            secret: (!vm.is_unix()).then(|| vm.secret.clone()).flatten(),
        };
        tasks.push(tokio::spawn(
            service.clone().serve(listener, access, limits),
        ));
    }
    Ok(tasks)
}

/// Problems in `[toggle]` and the VMs' serial links that need no hardware to see: TCP
/// listeners without a secret, bad addresses, two links on one address, a VM allowed a
/// profile that does not exist. One each, at its key, for the config loader.
pub fn check_config(
    toggle: &ToggleConfig,
    vms: &[VmLink],
    profiles: &std::collections::BTreeSet<String>,
) -> Vec<KeyProblem> {
    let mut problems = Vec::new();
    let at = |key: &[&str], message: String| KeyProblem {
        key: key.iter().map(|k| k.to_string()).collect(),
        message,
    };
    let mut check_secret = |key: &[&str], owner: &str, secret: &Option<String>| {
        // It travels as `auth SECRET` within one protocol line.
        let bad = secret.as_ref().is_some_and(|s| {
            s.is_empty()
                || s.len() > protocol::MAX_LINE - 5
                || !s.bytes().all(|b| b.is_ascii_graphic())
        });
        if bad {
            problems.push(at(
                key,
                format!(
                    "{owner} must be 1 to {} printable ASCII characters without spaces",
                    protocol::MAX_LINE - 5
                ),
            ));
        }
    };
    check_secret(&["toggle", "secret"], "[toggle] secret", &toggle.secret);
    for vm in vms {
        check_secret(
            &["vm", &vm.vm, "serial_secret"],
            &format!("VM `{}` serial_secret", vm.vm),
            &vm.secret,
        );
    }
    let mut check = |addr: &str, key: &[&str], owner: &str, secret: &Option<String>, fix: &str| {
        if let Err(e) = server::check_listen_address(addr, secret.is_some()) {
            let message = match e {
                ToggleError::NoSecret(_) => format!("{owner} = \"{addr}\" is a TCP listener without a secret: any local user, web page or guest on user-mode networking could switch your USB ports. {fix}"),
                e => format!("{owner}: {e}"),
            };
            problems.push(at(key, message));
        }
    };
    // Every listener: (address, key, who), to find two on one address afterwards.
    let mut listeners: Vec<(&str, Vec<&str>, String)> = Vec::new();
    if let Some(listen) = &toggle.listen {
        let fix = "Set `secret = \"...\"` in [toggle] (clients send `auth SECRET` first; `usbroute toggle` does), or remove `listen`: the hotkey `usbroute toggle` uses the control socket";
        check(
            listen,
            &["toggle", "listen"],
            "[toggle] listen",
            &toggle.secret,
            fix,
        );
        listeners.push((listen, vec!["toggle", "listen"], "[toggle] listen".into()));
    }
    for vm in vms {
        let owner = format!("VM `{}` serial", vm.vm);
        if !vm.is_unix() {
            let fix = "Use a unix socket path instead (`serial = \"/run/usbroute/VM.serial\"`, QEMU: -chardev socket,path=...), or set `serial_secret` for this VM (a secret of its own: the guest learns it)";
            check(
                &vm.listen,
                &["vm", &vm.vm, "serial"],
                &owner,
                &vm.secret,
                fix,
            );
        }
        listeners.push((&vm.listen, vec!["vm", &vm.vm, "serial"], owner));
    }
    let mut seen = std::collections::BTreeMap::new();
    for (addr, key, owner) in &listeners {
        if let Some(other) = seen.insert(*addr, owner) {
            problems.push(at(
                key,
                format!("{owner} and {other} both listen on {addr}"),
            ));
        }
    }
    for vm in vms {
        if !vm.is_unix() && vm.secret.is_some() && vm.secret == toggle.secret {
            problems.push(at(&["vm", &vm.vm, "serial_secret"], format!("VM `{}` serial_secret is the [toggle] secret: the guest would learn the host's secret; give the VM one of its own", vm.vm)));
        }
        if !vm.is_unix() && vm.qemu_user.is_some() {
            problems.push(at(&["vm", &vm.vm, "qemu_user"], format!("VM `{}` qemu_user applies to a unix socket `serial` only; TCP links are checked by `serial_secret`", vm.vm)));
        }
        for p in &vm.profiles {
            if !profiles.contains(p) {
                problems.push(at(
                    &["vm", &vm.vm, "profiles"],
                    format!(
                        "VM `{}` may select profile `{p}`, which has no [routing.profile.{p}]",
                        vm.vm
                    ),
                ));
            }
        }
    }
    problems
}
