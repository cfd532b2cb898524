//! `[[vm]]`: a VM's name, the backend that runs it (`qmp`, `xen` or `libvirt`), and what
//! the toggle service needs to know about it.

use super::problems::Report;
use crate::backend::VmTarget;
use crate::policy::HOST;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use toml::Spanned;

/// One `[[vm]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Its name, used in rules, commands and logs.
    pub name: String,
    /// Which hypervisor runs it and how to reach it (`qmp`, `xen` or `libvirt`).
    pub target: VmTarget,
    /// The toggle serial link's address for this VM (carried for the toggle service).
    pub serial: Option<String>,
    /// Routing profile names this VM may switch to (carried for the toggle service).
    pub profiles: Vec<String>,
    /// The user this VM's QEMU runs as (name or uid): the one peer besides root allowed
    /// on a unix-socket `serial`.
    pub qemu_user: Option<String>,
    /// The secret the guest sends first on a TCP `serial` link (its own, not `[toggle]`'s).
    pub serial_secret: Option<String>,
}

impl VmConfig {
    /// Which hypervisor runs this VM and how to reach it.
    pub fn target(&self) -> VmTarget {
        self.target.clone()
    }

    /// The QMP socket of a QEMU VM; `None` for a VM another backend runs.
    pub fn qmp(&self) -> Option<&Path> {
        match &self.target {
            VmTarget::Qemu { qmp } => Some(qmp),
            VmTarget::Xen { .. } | VmTarget::Libvirt { .. } => None,
        }
    }

    /// Why the daemon will not manage this VM: this build has no backend for it, or its
    /// backend cannot reach it as written (a libvirt URI of another host or driver). A
    /// warning, not an error: the rest of the config still works.
    pub fn without_backend(&self) -> Option<String> {
        if !self.target.is_built() {
            return Some(crate::backend::driver::not_built(&self.name, &self.target));
        }
        let VmTarget::Libvirt { uri: Some(uri), .. } = &self.target else {
            return None;
        };
        let refused = crate::backend::libvirt::rpc::LibvirtUri::check_form(uri).err()?;
        Some(format!(
            "{}: the daemon will not manage VM {}",
            crate::error_chain::one_line(&refused),
            self.name
        ))
    }
}

/// A `[[vm]]` as written; [`check`] makes it a [`VmConfig`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVm {
    name: String,
    qmp: Option<PathBuf>,
    xen: Option<String>,
    libvirt: Option<String>,
    uri: Option<Spanned<String>>,
    serial: Option<String>,
    #[serde(default)]
    profiles: Vec<String>,
    #[serde(default)]
    qemu_user: Option<String>,
    #[serde(default)]
    serial_secret: Option<String>,
}

/// The VMs, in file order, and the name of every `[[vm]]` (also of those with problems, so
/// a rule naming one is not reported too); each problem (a bad or repeated name, no
/// backend or two, two VMs on one QMP socket) at its `[[vm]]`.
pub(super) fn check(report: &mut Report, raw: Vec<Spanned<RawVm>>) -> (Vec<VmConfig>, Vec<String>) {
    let mut seen_names: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen_targets: HashMap<VmTarget, usize> = HashMap::new();
    let mut vms = Vec::new();
    let mut names = Vec::new();
    for vm in raw {
        let span = vm.span();
        let vm = vm.into_inner();
        let line = report.line(span.start);
        let good_name = !vm.name.is_empty()
            && vm
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !good_name {
            report.at(span.clone(), format!("VM name `{}` must be letters, digits, `.`, `_` or `-` (it appears in commands and logs)", vm.name));
        } else if vm.name == HOST {
            report.at(span.clone(), "a VM cannot be called `host`: in rules `vm = \"host\"` means the device stays on the host; rename the VM".into());
        } else if let Some(first) = seen_names.insert(vm.name.clone(), line) {
            report.at(
                span.clone(),
                format!(
                    "VM `{}` is defined twice (first on line {first}); remove one or rename it",
                    vm.name
                ),
            );
        }
        names.push(vm.name.clone());
        let Some(target) = backend_of(report, &vm, span.clone()) else {
            continue;
        };
        if let Some(first) = seen_targets.insert(target.clone(), line) {
            report.at(
                span,
                format!(
                    "{} is used by two VMs (first on line {first}); each VM needs its own",
                    describe(&target)
                ),
            );
        }
        vms.push(VmConfig {
            name: vm.name,
            target,
            serial: vm.serial,
            profiles: vm.profiles,
            qemu_user: vm.qemu_user,
            serial_secret: vm.serial_secret,
        });
    }
    (vms, names)
}

/// The one backend a `[[vm]]` names.
fn backend_of(report: &mut Report, vm: &RawVm, span: std::ops::Range<usize>) -> Option<VmTarget> {
    let mut named = Vec::new();
    if let Some(qmp) = &vm.qmp {
        named.push(VmTarget::Qemu { qmp: qmp.clone() });
    }
    if let Some(domain) = &vm.xen {
        named.push(VmTarget::Xen {
            domain: domain.clone(),
        });
    }
    if let Some(domain) = &vm.libvirt {
        named.push(VmTarget::Libvirt {
            domain: domain.clone(),
            uri: vm.uri.as_ref().map(|u| u.get_ref().clone()),
        });
    }
    if let (Some(uri), None) = (&vm.uri, &vm.libvirt) {
        report.at(
            uri.span(),
            format!(
                "VM `{}`: `uri` is the libvirt connection and goes with `libvirt = \"DOMAIN\"`; add that or remove `uri`",
                vm.name
            ),
        );
    }
    match named.len() {
        1 => named.pop(),
        n => {
            let said = if n == 0 {
                "names none"
            } else {
                "names more than one"
            };
            report.at(span, format!("VM `{}` {said}: name one of qmp, xen, libvirt (`qmp = \"/run/qemu/NAME.qmp\"` for QEMU, `xen = \"DOMAIN\"`, or `libvirt = \"DOMAIN\"` with an optional `uri`)", vm.name));
            None
        }
    }
}

/// How a target is named in messages: `QMP socket /run/a.qmp`, `xen domain a`.
fn describe(target: &VmTarget) -> String {
    match target {
        VmTarget::Qemu { qmp } => format!("QMP socket {}", qmp.display()),
        VmTarget::Xen { domain } => format!("xen domain {domain}"),
        VmTarget::Libvirt { domain, uri } => match uri {
            Some(uri) => format!("libvirt domain {domain} at {uri}"),
            None => format!("libvirt domain {domain}"),
        },
    }
}
