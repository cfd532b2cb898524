//! The quick tier in one test binary: pure, fixture and model tests that run as any
//! user without QEMU (`cargo test`).
//!
//! One binary per tier (or real-tier group) instead of one per file, so the library is
//! linked a few times, not 50: each former `tests/NAME.rs` is a module here, the shared
//! helpers are sibling modules (docs/architecture.md, "Tests").

#[path = "../policy_support/mod.rs"]
mod policy_support;
#[path = "../routing_support/mod.rs"]
mod routing_support;
#[path = "../serve_support/mod.rs"]
mod serve_support;
#[path = "../vfio_support/mod.rs"]
mod vfio_support;

mod backend_keys;
mod cli_check;
mod cli_emit_libvirt;
mod cli_emit_xl;
mod cli_pipe;
mod crash_consistency;
mod daemon_dry_run;
mod daemon_serve;
mod daemon_uevent_socket;
mod fuzz_seeds;
mod guest_recordings;
mod inventory_cli;
mod inventory_cli_edges;
mod inventory_fixture;
mod inventory_patch;
mod inventory_props;
mod inventory_twins;
mod libvirt_rpc_fake_peer;
mod policy_config;
mod policy_diff;
mod policy_docs;
mod policy_event_order;
mod policy_follow;
mod policy_follow_config;
mod policy_follow_runtime;
mod policy_model;
mod policy_overlaps;
mod policy_plan;
mod policy_plan_props;
mod policy_plan_why;
mod policy_runtime;
mod policy_runtime_model;
mod policy_runtime_places;
mod qemu_ids;
mod qemu_qmp_fake_peer;
mod routing_cli;
mod routing_config_check;
mod routing_daemon;
mod routing_ports;
mod routing_recorded;
mod routing_registers;
mod selector_parse;
mod selector_props;
mod selector_renumbered;
mod systemd_unit;
mod test_tiers;
mod toggle_fuzz;
mod toggle_service;
mod vfio_bind;
mod vfio_cli;
mod vfio_fixture;
mod vfio_host_use;
mod vfio_props;
mod vfio_rules;
mod vfio_state;
mod vfio_verdict;
mod xen_recordings;
