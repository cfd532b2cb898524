//! File-descriptor passing: usbroute opens `/dev/bus/usb/BBB/DDD` itself and hands the
//! open file to QEMU over the QMP socket (`add-fd`, SCM_RIGHTS), and QEMU opens
//! `hostdevice=/dev/fdset/N` instead of the device node. A QEMU running as an unprivileged
//! user then needs no access to /dev/bus/usb at all.
//!
//! Only for `--by address`: with `--by port` or `--by id` QEMU must reopen the device on
//! every re-plug by itself, so it needs its own access anyway.

use crate::backend::qemu::qmp::PeerCredentials;
use crate::backend::AttachMode;
use crate::sysfs::SysfsRoot;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::path::PathBuf;

/// When to pass the device to QEMU as an open file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[derive(clap::ValueEnum)]
pub enum FdPassing {
    /// By address: always when QEMU does not run as root (seen with SO_PEERCRED on the
    /// QMP socket); when it does, whenever usbroute can open the node (else QEMU opens it).
    /// A passed file needs no lookup: QEMU's own, by bus and address, asks libusb, which
    /// hears of a new device only after udevd has handled it, so a `device_add` sent at
    /// the kernel's `bind` can fail with "failed to find host usb device".
    #[default]
    Auto,
    /// Always (only possible by address).
    Always,
    /// Never: QEMU opens the device node itself.
    Never,
}

/// Whether one attach passes the device as an open file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// No: QEMU opens the node itself.
    No,
    /// Yes: a node usbroute cannot open is an error.
    Yes,
    /// When usbroute can open the node; else QEMU opens it itself (it runs as root).
    IfItOpens,
}

/// Should this attach pass an fd? `Err` says why it cannot when the user insisted.
pub fn decide(
    policy: FdPassing,
    mode: AttachMode,
    qemu: Option<PeerCredentials>,
) -> Result<Pass, String> {
    match (policy, mode) {
        (FdPassing::Never, _) => Ok(Pass::No),
        (FdPassing::Always, AttachMode::Address) => Ok(Pass::Yes),
        (FdPassing::Always, _) => Err(format!(
            "fd passing works only when attaching by address: by {} QEMU reopens the device \
             on every re-plug itself, so it needs access to /dev/bus/usb; use --by address or \
             --fd-passing auto",
            mode_word(mode)
        )),
        (FdPassing::Auto, AttachMode::Address) => match qemu {
            Some(c) if c.uid != 0 => Ok(Pass::Yes),
            _ => Ok(Pass::IfItOpens),
        },
        (FdPassing::Auto, _) => Ok(Pass::No),
    }
}

/// A note for the user when QEMU is unprivileged and must open device nodes itself.
pub fn unprivileged_note(mode: AttachMode, qemu: Option<PeerCredentials>) -> Option<String> {
    let c = qemu.filter(|c| c.uid != 0)?;
    (mode != AttachMode::Address).then(|| {
        format!(
            "QEMU runs as uid {}: attached by {} it opens /dev/bus/usb/... itself whenever \
             the device appears, so that user needs read-write access to the device node \
             (a udev rule, or attach by address to have usbroute pass it an open file)",
            c.uid,
            mode_word(mode)
        )
    })
}

fn mode_word(mode: AttachMode) -> &'static str {
    match mode {
        AttachMode::Address => "address",
        AttachMode::Port => "port",
        AttachMode::Id => "id",
    }
}

/// The device node of bus `bus`, address `address`, under `root`.
pub fn device_node(root: &SysfsRoot, bus: u8, address: u16) -> PathBuf {
    root.path(format!("/dev/bus/usb/{bus:03}/{address:03}"))
}

/// Open the device node read-write, as QEMU would.
pub fn open_device_node(root: &SysfsRoot, bus: u8, address: u16) -> std::io::Result<File> {
    File::options()
        .read(true)
        .write(true)
        .open(device_node(root, bus, address))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32) -> Option<PeerCredentials> {
        Some(PeerCredentials {
            pid: Some(1),
            uid,
            gid: uid,
        })
    }

    #[test]
    fn decide_auto_passes_by_address_only_and_to_a_root_qemu_when_the_node_opens() {
        let by_address = decide(FdPassing::Auto, AttachMode::Address, peer(1000));
        let by_port = decide(FdPassing::Auto, AttachMode::Port, peer(1000));
        let root_qemu = decide(FdPassing::Auto, AttachMode::Address, peer(0));
        let unknown = decide(FdPassing::Auto, AttachMode::Address, None);

        assert_eq!(
            (by_address, by_port, root_qemu, unknown),
            (
                Ok(Pass::Yes),
                Ok(Pass::No),
                Ok(Pass::IfItOpens),
                Ok(Pass::IfItOpens)
            )
        );
    }

    #[test]
    fn decide_always_by_id_is_refused_with_reason() {
        let err = decide(FdPassing::Always, AttachMode::Id, peer(0)).unwrap_err();

        assert!(err.contains("only when attaching by address"), "{err}");
    }

    #[test]
    fn device_node_is_zero_padded_under_the_root() {
        let root = SysfsRoot::new("/tmp/r");

        assert_eq!(
            device_node(&root, 1, 5),
            PathBuf::from("/tmp/r/dev/bus/usb/001/005")
        );
    }
}
