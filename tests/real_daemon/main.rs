//! Real tier: `usbroute serve` with real QEMUs, clients as other users and the host
//! kernel's uevents (`--features real-tests`, root).
//!
//! One binary per tier (or real-tier group) instead of one per file, so the library is
//! linked a few times, not 50: each former `tests/NAME.rs` is a module here, the shared
//! helpers are sibling modules (docs/architecture.md, "Tests").

#[path = "../qemu_support/mod.rs"]
mod qemu_support;
#[path = "../routing_support/mod.rs"]
mod routing_support;
#[path = "../serve_support/mod.rs"]
mod serve_support;
#[path = "../vfio_support/mod.rs"]
mod vfio_support;

mod daemon_clock;
mod daemon_control;
mod daemon_controllers;
mod daemon_idle;
mod daemon_monitor;
mod daemon_qemu;
mod daemon_qemu_cli;
mod daemon_uevents;
mod daemon_vm_sockets;
