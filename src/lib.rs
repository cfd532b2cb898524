//! usbroute: give virtual machines the USB hardware they should have.
//!
//! Data flows one way (see docs/architecture.md):
//! sysfs → [`inventory`] → [`policy`] (pure; its rules come from [`config`]) → [`engine`] → [`backend`] (one folder per
//! hypervisor: [`backend::qemu`] today).
//! Everything that touches the host goes through [`sysfs::SysfsRoot`] or a small trait,
//! so the same code runs on the real `/sys`, on a recorded fixture and inside the test guest.

pub mod backend;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod error_chain;
pub mod events;
#[doc(hidden)]
pub mod fuzzing;
pub mod hostblock;
pub mod inventory;
#[cfg(test)]
mod layering;
pub mod policy;
pub mod routing;
pub mod selector;
pub mod state;
pub mod sysfs;
pub mod toggle;
pub mod unix_socket;
pub mod vfio;
