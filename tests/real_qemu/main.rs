//! Real tier: a real `qemu-system-x86_64` through QMP, the QEMU backend and the CLI, and
//! the fake VM's contract against it (`--features real-tests`).
//!
//! One binary per tier (or real-tier group) instead of one per file, so the library is
//! linked a few times, not 50: each former `tests/NAME.rs` is a module here, the shared
//! helpers are sibling modules (docs/architecture.md, "Tests").

#[path = "../qemu_support/mod.rs"]
mod qemu_support;

mod backend_contract;
mod qemu_backend;
mod qemu_cli;
mod qemu_qmp;
mod qemu_round_trips;
mod vfio_attach_qemu;
