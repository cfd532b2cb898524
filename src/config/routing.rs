//! `[routing]` and `[toggle]`, with the VMs' `serial` links: each section is checked by
//! its owner (`routing::control::check_config_at`, `toggle::check_config`); this file
//! hands each owner its part and adds what only the whole file shows.

use super::{Config, KeyProblem};
use crate::toggle::VmLink;

/// The serial links of the config's VMs (those with `serial = ...`).
pub fn vm_links(config: &Config) -> Vec<VmLink> {
    config
        .vms
        .iter()
        .filter_map(|vm| {
            Some(VmLink {
                vm: vm.name.clone(),
                listen: vm.serial.clone()?,
                profiles: vm.profiles.clone(),
                qemu_user: vm.qemu_user.clone(),
                secret: vm.serial_secret.clone(),
            })
        })
        .collect()
}

/// Everything wrong with `[routing]`, `[toggle]` and the VMs' `serial`/`profiles` that
/// can be seen without hardware, one message each. The loader reports these at their
/// place; this is for configs built without a file.
pub fn check_routing_config(config: &Config) -> Vec<String> {
    check_routing_config_at(config)
        .into_iter()
        .map(|p| p.message)
        .collect()
}

/// [`check_routing_config`], each problem at its key.
pub fn check_routing_config_at(config: &Config) -> Vec<KeyProblem> {
    let mut problems = crate::routing::control::check_config_at(&config.routing);
    let profiles = config.routing.profile.keys().cloned().collect();
    let links = vm_links(config);
    if let (Some(first), true) = (links.first(), config.routing.profile.is_empty()) {
        problems.push(KeyProblem::at(
            &["vm", &first.vm, "serial"],
            "VMs have `serial` links but [routing] has no profiles to switch".into(),
        ));
    }
    problems.extend(crate::toggle::check_config(
        &config.toggle,
        &links,
        &profiles,
    ));
    problems
}
