//! `controller check|bind|restore|attach|emit`.

use super::output::print_json;
use super::Global;
use crate::inventory::PciAddress;
use crate::vfio::{self, BindOptions, LiveHost, MemberChange, Step};
use anyhow::Context;
use std::process::ExitCode;
use std::time::Duration;

/// `usbroute controller ...`.
#[derive(Debug, clap::Args)]
pub struct ControllerArgs {
    /// What to do with the controller.
    #[command(subcommand)]
    pub command: ControllerCommand,
}

/// `usbroute controller` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ControllerCommand {
    /// Say whether the controller can go to a VM, and what would go with it.
    Check {
        /// PCI address of the controller (`0000:00:14.0` or `00:14.0`).
        pci: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move the controller's whole IOMMU group to vfio-pci (bridges stay).
    Bind {
        /// PCI address of the controller (`0000:00:14.0` or `00:14.0`).
        pci: String,
        /// Print every write, in order, and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Take the group even if the host seems to need a member (mounted disk,
        /// console, routed network, only keyboard).
        #[arg(long)]
        force: bool,
        /// Seconds to wait for /dev/vfio/<group>.
        #[arg(long, default_value_t = 10, value_name = "SECS")]
        timeout: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Give the controller's group back to the drivers it had before `bind`.
    Restore {
        /// PCI address of the controller.
        pci: String,
        /// Print every write, in order, and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Hot-add the controller's group to a running QEMU (binding it to vfio-pci first).
    Attach {
        /// PCI address of the controller.
        pci: String,
        /// The VM's QMP socket (`-qmp unix:PATH,server=on,wait=off`).
        #[arg(long, value_name = "SOCKET")]
        qmp: std::path::PathBuf,
        /// Bind even if the host seems to need a member of the group.
        #[arg(long)]
        force: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print QEMU arguments, libvirt XML and an xl line for the controller's group.
    Emit {
        /// PCI address of the controller.
        pci: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(super) fn controller(g: &Global, a: ControllerArgs) -> anyhow::Result<ExitCode> {
    let root = g.root();
    let host = LiveHost::new(root.clone());
    match a.command {
        ControllerCommand::Check { pci, json } => {
            let verdict = vfio::assess(&root, &parse_pci(&pci)?)?;
            if json {
                print_json(&verdict)?;
            } else {
                print!("{}", verdict.to_text());
            }
            Ok(ExitCode::SUCCESS)
        }
        ControllerCommand::Bind {
            pci,
            dry_run,
            force,
            timeout,
            json,
        } => {
            let pci = parse_pci(&pci)?;
            let opts = BindOptions {
                force,
                wait: Duration::from_secs(timeout),
                ..BindOptions::default()
            };
            let plan = vfio::plan_bind(&root, &host, &pci, &opts)?;
            if dry_run {
                if json {
                    print_json(&plan)?;
                } else {
                    print!("{}", plan.verdict.to_text());
                    print_steps(&plan.steps, "bind");
                }
                return Ok(ExitCode::SUCCESS);
            }
            let done = vfio::execute_bind(&root, &host, &plan, &opts)
                .with_context(|| format!("Cannot give {pci} to vfio-pci"))?;
            if json {
                print_json(&done)?;
            } else if done.already_bound {
                println!(
                    "IOMMU group {} was already on vfio-pci ({}).",
                    done.group,
                    done.dev_path.display()
                );
            } else {
                println!(
                    "IOMMU group {} is on vfio-pci: {}",
                    done.group,
                    done.dev_path.display()
                );
                print_changes(&done.members);
                println!(
                    "Each member's earlier driver is in {}; `usbroute controller restore {pci}` puts them back.",
                    done.record.display()
                );
                println!("For a VM: `usbroute controller emit {pci}`.");
            }
            Ok(ExitCode::SUCCESS)
        }
        ControllerCommand::Restore { pci, dry_run, json } => {
            let pci = parse_pci(&pci)?;
            if dry_run {
                let (group, record, steps) = vfio::plan_restore(&root, &host, &pci)?;
                if json {
                    print_json(&steps)?;
                } else {
                    match record {
                        Some(_) => println!("IOMMU group {}: back to the drivers recorded at bind.", group.number),
                        None => println!(
                            "IOMMU group {}: no bind record, so members on vfio-pci go to the kernel's default driver.",
                            group.number
                        ),
                    }
                    print_steps(&steps, "restore");
                }
                return Ok(ExitCode::SUCCESS);
            }
            let done = vfio::restore(&root, &host, &pci, &BindOptions::default())
                .with_context(|| format!("Cannot give {pci} back to the host"))?;
            if json {
                print_json(&done)?;
            } else {
                println!("IOMMU group {} is back with the host.", done.group);
                print_changes(&done.members);
            }
            Ok(ExitCode::SUCCESS)
        }
        ControllerCommand::Attach {
            pci,
            qmp,
            force,
            json,
        } => attach(&root, &host, &parse_pci(&pci)?, &qmp, force, json),
        ControllerCommand::Emit { pci, json } => {
            let pci = parse_pci(&pci)?;
            let Some(group) = vfio::read_group(&root, &pci)? else {
                let verdict = vfio::assess(&root, &pci)?;
                anyhow::bail!("{pci} {}. {}", verdict.summary, verdict.details.join(" "));
            };
            let emitted = vfio::emit(&pci, &group);
            if json {
                print_json(&emitted)?;
            } else {
                print!("{}", emitted.to_text());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn parse_pci(text: &str) -> anyhow::Result<PciAddress> {
    Ok(text.parse::<PciAddress>()?)
}

fn print_steps(steps: &[Step], what: &str) {
    if steps.is_empty() {
        println!("Nothing to {what}: every member is already where it should be.");
        return;
    }
    println!("--dry-run: would do, in order (nothing was changed):");
    for (i, step) in steps.iter().enumerate() {
        println!("{:>4}. {step}", i + 1);
    }
}

fn print_changes(members: &[MemberChange]) {
    for m in members {
        let name = |d: &Option<String>| d.clone().unwrap_or_else(|| "no driver".to_string());
        if m.before.driver == m.now.driver {
            println!("  {}  {}", m.now.pci, name(&m.now.driver));
        } else {
            println!(
                "  {}  {} (was {})",
                m.now.pci,
                name(&m.now.driver),
                name(&m.before.driver)
            );
        }
    }
}

/// Bind the group if it is not on vfio-pci yet, hot-add it, and give the group back to
/// the host if the VM would not take it (only when this call bound it).
fn attach(
    root: &crate::sysfs::SysfsRoot,
    host: &LiveHost,
    pci: &PciAddress,
    socket: &std::path::Path,
    force: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let verdict = vfio::assess(root, pci)?;
    let Some(group) = vfio::read_group(root, pci)? else {
        anyhow::bail!("{pci} {}. {}", verdict.summary, verdict.details.join(" "));
    };
    let bound_now = !verdict.on_vfio;
    let opts = BindOptions {
        force,
        ..BindOptions::default()
    };
    if bound_now {
        let done = vfio::bind(root, host, pci, &opts)
            .with_context(|| format!("Cannot give {pci} to vfio-pci"))?;
        if !json {
            println!("IOMMU group {} is on vfio-pci now.", done.group);
        }
    }
    let members: Vec<PciAddress> = group.passed_members().map(|m| m.pci).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let qmp = crate::backend::qemu::qmp::Qmp::connect(socket).await?;
        Ok::<_, anyhow::Error>(
            crate::backend::qemu::vfio_attach::attach_group(&qmp, &members).await?,
        )
    });
    let outcome = match result {
        Ok(o) => o,
        Err(e) if bound_now => {
            let back = match vfio::restore(root, host, pci, &opts) {
                Ok(_) => format!("IOMMU group {} is back with the host", group.number),
                Err(r) => format!("giving IOMMU group {} back failed too: {r}", group.number),
            };
            return Err(e.context(format!(
                "Cannot attach {pci} to the VM at {} ({back})",
                socket.display()
            )));
        }
        Err(e) => {
            return Err(e.context(format!(
                "Cannot attach {pci} to the VM at {}",
                socket.display()
            )))
        }
    };
    if json {
        print_json(&outcome)?;
        return Ok(ExitCode::SUCCESS);
    }
    for f in &outcome.added {
        let bus = f.bus.as_deref().unwrap_or("the root bus");
        println!("  {} added as {} on {bus}", f.pci, f.id);
    }
    for p in &outcome.already {
        println!("  {p} was already in the VM");
    }
    println!("To take them back: `device_del` each id in the VM, then `usbroute controller restore {pci}`.");
    Ok(ExitCode::SUCCESS)
}
