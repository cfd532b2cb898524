//! usbroute's real-kernel test bed: a guest with emulated USB controllers under KVM or
//! TCG, hotplug driven from the outer QEMU's QMP, a command agent in the guest, and
//! named scenarios. See docs/testbed.md.

pub mod accel;
pub mod agent;
pub mod bed;
pub mod inner;
pub mod libvirt;
pub mod machine;
pub mod pace;
pub mod record;
pub mod restore;
pub mod runner;
pub mod scenarios;
pub mod shell;
pub mod usb;
pub mod xen;
