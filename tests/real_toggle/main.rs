//! Real tier: the toggle service with QEMU serial ports and hostile clients
//! (`--features real-tests`).
//!
//! One binary per tier (or real-tier group) instead of one per file, so the library is
//! linked a few times, not 50: each former `tests/NAME.rs` is a module here, the shared
//! helpers are sibling modules (docs/architecture.md, "Tests").

#[path = "../routing_support/mod.rs"]
mod routing_support;

mod toggle_hostile;
mod toggle_qemu_serial;
