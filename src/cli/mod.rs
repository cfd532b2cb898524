//! The command line: turns arguments into library calls and results into tables or JSON.
//!
//! One file per command group; each defines its own clap `Args` and a `run` function, so
//! adding a flag never touches another group's file.

mod check;
mod config_file;
mod controller;
pub mod daemon;
mod emit;
mod emit_libvirt;
mod emit_xl;
mod inventory;
mod misc;
pub mod output;
mod ports;
mod vm;
mod vm_devices;
mod vm_qmp;
mod vm_target;

use crate::sysfs::SysfsRoot;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

pub use config_file::{ConfigFile, DEFAULT_CONFIG};

/// Default path of the daemon's control socket.
pub use crate::daemon::DEFAULT_CONTROL_SOCKET;

/// Give virtual machines the USB hardware they should have.
#[derive(Debug, Parser)]
#[command(name = "usbroute", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Options every command shares.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command shares.
#[derive(Debug, Clone, clap::Args)]
pub struct Global {
    /// Read sysfs, procfs and /dev under DIR instead of / (a recording from `record-sysfs`).
    #[arg(
        long,
        global = true,
        env = "USBROUTE_SYSFS_ROOT",
        value_name = "DIR",
        default_value = "/"
    )]
    pub sysfs_root: PathBuf,
    /// The daemon's control socket (default: from --config, else /run/usbroute/control.sock).
    #[arg(long, global = true, value_name = "SOCKET")]
    pub control: Option<PathBuf>,
    /// The config file (default: /etc/usbroute/usbroute.toml when it exists); every command
    /// that reads the config, or finds the daemon's control socket through it, uses it.
    #[arg(long, global = true, env = "USBROUTE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Less log output: `serve` logs what it sees and decides by default, `-q` only
    /// warnings, `-qq` only errors; other commands log warnings, `-q` only errors.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "verbose")]
    pub quiet: u8,
}

impl Global {
    /// The sysfs root to read under.
    pub fn root(&self) -> SysfsRoot {
        SysfsRoot::new(self.sysfs_root.clone())
    }
}

/// Every command.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show controllers, buses, hubs and devices as a tree.
    List(inventory::ListArgs),
    /// Show every field of the devices a selector matches.
    Show(inventory::ShowArgs),
    /// USB controllers, their IOMMU groups, and whether each can go to a VM.
    Controllers(inventory::ControllersArgs),
    /// Copy what usbroute reads from sysfs into DIR, for bug reports and tests.
    RecordSysfs(inventory::RecordArgs),
    /// Attach a device to a VM (directly over QMP, or through the daemon).
    Attach(vm::AttachArgs),
    /// Detach a device from a VM.
    Detach(vm::DetachArgs),
    /// Look at a VM directly over QMP.
    Vm(vm_devices::VmArgs),
    /// Print what gives a VM the device at start-up (QEMU `-device usb-host,...`), as
    /// `attach` and the daemon would attach it.
    Emit(emit::EmitArgs),
    /// Run the policy daemon.
    Serve(daemon::ServeArgs),
    /// Validate the config file and print its rules in the order they win, its VMs,
    /// controller rules and routing profiles, and warnings (like `nginx -t`).
    Check(check::CheckArgs),
    /// Where each device is, and why (asks the daemon).
    Status(daemon::StatusArgs),
    /// Which rule decides a device, and why the others do not.
    Why(daemon::WhyArgs),
    /// Make the daemon re-read its config.
    Reload(daemon::ReloadArgs),
    /// Whole-controller passthrough: bind to vfio-pci, restore, hand to a VM.
    Controller(controller::ControllerArgs),
    /// Intel PCH USB 2.0 port routing between xHCI and EHCI.
    Ports(ports::PortsArgs),
    /// Switch the routing profile (for a host hotkey).
    Toggle(ports::ToggleArgs),
    /// Print shell completions.
    Completions(misc::CompletionsArgs),
    /// Print the man page (roff).
    Man(misc::ManArgs),
}

/// Parse the process arguments, run, and turn the result into an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        die_quietly_on_closed_pipe();
    }
    let narrates = matches!(cli.command, Command::Serve(_));
    init_logging(log_level(cli.global.verbose, cli.global.quiet, narrates));
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("usbroute: {}", output::error_chain(&err));
            ExitCode::FAILURE
        }
    }
}

/// Run one parsed command.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let g = &cli.global;
    match cli.command {
        Command::List(a) => inventory::list(g, a),
        Command::Show(a) => inventory::show(g, a),
        Command::Controllers(a) => inventory::controllers(g, a),
        Command::RecordSysfs(a) => inventory::record(g, a),
        Command::Attach(a) => vm::attach(g, a),
        Command::Detach(a) => vm::detach(g, a),
        Command::Vm(a) => vm_devices::vm(g, a),
        Command::Emit(a) => emit::emit(g, a),
        Command::Serve(a) => daemon::serve(g, a),
        Command::Check(a) => check::check(g, a),
        Command::Status(a) => daemon::status(g, a),
        Command::Why(a) => daemon::why(g, a),
        Command::Reload(a) => daemon::reload(g, a),
        Command::Controller(a) => controller::controller(g, a),
        Command::Ports(a) => ports::ports(g, a),
        Command::Toggle(a) => ports::toggle(g, a),
        Command::Completions(a) => misc::completions(a),
        Command::Man(a) => misc::man(a),
    }
}

/// Give SIGPIPE back its default action, so `usbroute ports | head` ends quietly when
/// `head` has read enough, like every other Unix tool. The Rust runtime ignores SIGPIPE,
/// which turns the closed pipe into an EPIPE that `println!` reports with a panic.
/// Not for `serve`: the daemon keeps ignoring it, so a client or VM link that vanished
/// mid-reply is an error on that one connection, not the end of the daemon.
#[allow(unsafe_code)]
fn die_quietly_on_closed_pipe() {
    // SAFETY: called once at the start of `main`, before any thread is spawned (the tokio
    // runtime starts later, and only for commands that need it); setting a signal's
    // disposition to SIG_DFL installs no handler, so no async-signal-safety rules apply.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The default log level: the daemon (`narrates`) speaks at info, so it says it is
/// ready, what it sees and each decision; other commands only warn.
fn log_level(verbose: u8, quiet: u8, narrates: bool) -> &'static str {
    const LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];
    let base: i32 = if narrates { 2 } else { 1 };
    let level = (base + i32::from(verbose) - i32::from(quiet)).clamp(0, 4);
    LEVELS[level as usize]
}

/// Log to stderr; colours only on a terminal, so journald and pipes get plain text; the
/// module a line comes from only when debugging.
///
/// `RUST_LOG` takes targets and levels (`usbroute=debug,info`); one that does not read as
/// such is ignored for `level`. (Not tracing's `EnvFilter`: its span and field filters
/// bring a regex engine, about 160 KB of code a resident daemon would map for nothing.)
fn init_logging(level: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref(), level);
    // The builder's own filter lets INFO and above through: `filter` decides instead.
    let _ = tracing_subscriber::fmt()
        .with_max_level(LevelFilter::TRACE)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(matches!(level, "debug" | "trace"))
        .finish()
        .with(filter)
        .try_init();
}

/// What is logged: `rust_log` (`RUST_LOG`) when it reads as targets and levels, else
/// `level` (said on stderr: span and field filters, `[...]` and `{...}`, would otherwise
/// read as odd target names and silence everything).
fn log_filter(rust_log: Option<&str>, level: &str) -> tracing_subscriber::filter::Targets {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    let plain = |v: &&str| {
        v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_:=,.-".contains(c))
    };
    if let Some(odd) = rust_log.filter(|v| !plain(v)) {
        eprintln!(
            "usbroute: RUST_LOG={odd:?} is not targets and levels (`usbroute=debug,info`); \
             logging at {level}"
        );
    }
    rust_log
        .filter(plain)
        .and_then(|v| v.parse().ok())
        .or_else(|| level.parse().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::WARN))
}

#[cfg(test)]
mod log_level_tests {
    use super::{log_filter, log_level};
    use tracing::Level;

    #[test]
    fn rust_log_names_targets_and_levels_and_one_it_cannot_read_leaves_the_level() {
        let daemon = "usbroute::daemon::event_loop";
        let by_target = log_filter(Some("usbroute=debug,warn"), "info");
        let unreadable = log_filter(Some("usbroute[span{x}]=trace"), "info");
        let unset = log_filter(None, "error");

        assert!(by_target.would_enable(daemon, &Level::DEBUG));
        assert!(!by_target.would_enable(daemon, &Level::TRACE));
        assert!(!by_target.would_enable("tokio::runtime", &Level::INFO));
        assert!(unreadable.would_enable(daemon, &Level::INFO));
        assert!(!unreadable.would_enable(daemon, &Level::DEBUG));
        assert!(!unset.would_enable(daemon, &Level::WARN));
    }

    #[test]
    fn serve_speaks_at_info_by_default_and_q_quiets_it() {
        assert_eq!(
            [
                log_level(0, 0, true),
                log_level(0, 1, true),
                log_level(0, 2, true)
            ],
            ["info", "warn", "error"]
        );
    }

    #[test]
    fn other_commands_only_warn_by_default() {
        assert_eq!(
            [
                log_level(0, 0, false),
                log_level(1, 0, false),
                log_level(0, 1, false)
            ],
            ["warn", "info", "error"]
        );
    }
}
