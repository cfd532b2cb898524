//! The test bed's command line: boots a guest with emulated USB controllers under
//! KVM or TCG, drives hotplug from the outer QMP, and runs scenarios in the guest.
//! Normally started by `scripts/testbed`, which prepares the kernel, initramfs and share.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use usbroute_testbed::{accel, machine, record, runner, scenarios, shell};

/// Real-kernel test bed for usbroute.
#[derive(Debug, Parser)]
struct Args {
    /// Guest kernel.
    #[arg(long, global = true, default_value = "target/testbed/vmlinuz")]
    kernel: PathBuf,
    /// Guest initramfs (uncompressed cpio).
    #[arg(long, global = true, default_value = "target/testbed/initramfs.cpio")]
    initrd: PathBuf,
    /// Host directory shared with the guest as /host (holds the usbroute binary).
    #[arg(long, global = true, default_value = "target/testbed/share")]
    share: PathBuf,
    /// Sockets, logs and the KVM verdict cache.
    #[arg(long, global = true, default_value = "target/testbed/run")]
    run_dir: PathBuf,
    /// Xen (uncompressed multiboot ELF) for the `xen-*` scenarios' machine.
    #[arg(long, global = true, requires = "xen_dom0_initrd")]
    xen_hypervisor: Option<PathBuf>,
    /// dom0's initramfs for the Xen machine (testbed/xen/prepare, usbroute appended).
    #[arg(long, global = true, requires = "xen_hypervisor")]
    xen_dom0_initrd: Option<PathBuf>,
    /// Force an accelerator instead of probing KVM.
    #[arg(long, global = true, value_parser = ["kvm", "tcg"])]
    accel: Option<String>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run scenarios (all, or those named).
    Run {
        /// Scenario names; all when none; `xen` is every `xen-*` scenario.
        names: Vec<String>,
    },
    /// Run the `bench` scenario in full (50 plugs per method, a 30 s storm); a plain
    /// run has the short one.
    Bench,
    /// List scenario names.
    List,
    /// Boot with the rich topology and write usbroute record-sysfs recordings
    /// (with and without an IOMMU) under DIR.
    Record {
        /// Fixture directory (tests/fixtures).
        dir: PathBuf,
    },
    /// Boot and run stdin's lines in the guest (QMP socket in the run dir).
    Shell {
        /// Plug the rich topology first.
        #[arg(long)]
        rich: bool,
    },
    /// Boot with the rich topology and copy the guest's raw sysfs into DIR.
    DumpRaw {
        /// Output directory.
        dir: PathBuf,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match real_main().await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("usbroute-testbed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn real_main() -> Result<ExitCode> {
    let args = Args::parse();
    let started = Instant::now();
    let all = scenarios::all();
    let command = args.command.unwrap_or(Cmd::Run { names: Vec::new() });
    if let Cmd::List = command {
        for s in &all {
            println!("{:<16} {}", s.name, s.about);
        }
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::create_dir_all(&args.run_dir)?;
    let verdict = match args.accel.as_deref() {
        Some("kvm") => accel::Verdict {
            accel: accel::Accel::Kvm,
            reason: "KVM (forced by --accel)".into(),
        },
        Some(_) => accel::Verdict {
            accel: accel::Accel::Tcg,
            reason: "TCG (forced by --accel)".into(),
        },
        None => accel::choose(&args.kernel, &args.run_dir.join("kvm-verdict")).await?,
    };
    println!("== accelerator: {}", verdict.reason);
    let cfg = machine::MachineConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        share: args.share,
        run_dir: args.run_dir,
        accel: verdict.accel,
        iommu: true,
        xen: None,
    };
    // The Xen machine boots the same kernel as dom0, always under TCG (see machine.rs),
    // with its own sockets and logs.
    let xen_cfg = match (args.xen_hypervisor, args.xen_dom0_initrd) {
        (Some(hypervisor), Some(dom0_initrd)) => Some(machine::MachineConfig {
            run_dir: cfg.run_dir.join("xen"),
            accel: accel::Accel::Tcg,
            iommu: false,
            xen: Some(machine::XenBoot {
                hypervisor,
                dom0_initrd,
            }),
            ..cfg.clone()
        }),
        _ => None,
    };
    let command = match command {
        Cmd::Bench => {
            scenarios::bench::run_full();
            Cmd::Run {
                names: vec!["bench".into()],
            }
        }
        other => other,
    };
    match command {
        Cmd::List | Cmd::Bench => unreachable!("handled above"),
        Cmd::Run { names } => {
            let names: Vec<String> = names
                .into_iter()
                .flat_map(|n| {
                    if n == "xen" {
                        all.iter()
                            .filter(|s| s.needs_xen())
                            .map(|s| s.name.to_string())
                            .collect()
                    } else {
                        vec![n]
                    }
                })
                .collect();
            let unknown: Vec<&String> = names
                .iter()
                .filter(|n| !all.iter().any(|s| s.name == **n))
                .collect();
            if !unknown.is_empty() {
                let known: Vec<&str> = all.iter().map(|s| s.name).collect();
                bail!(
                    "no scenario named {unknown:?}; there are: {}",
                    known.join(", ")
                );
            }
            let selected: Vec<_> = all
                .into_iter()
                .filter(|s| names.is_empty() || names.iter().any(|n| n == s.name))
                .collect();
            let report = runner::run(&cfg, xen_cfg.as_ref(), verdict.reason, &selected).await;
            report.print(started.elapsed());
            Ok(if report.failed() == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Record { dir } => {
            record::record_fixtures(&cfg, &dir).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Shell { rich } => {
            shell::run(&cfg, rich).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::DumpRaw { dir } => {
            record::dump_raw(&cfg, &dir).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
