//! `scripts/testbed shell`: boot the guest and run stdin's lines in it, for poking
//! around while writing a scenario.

use crate::bed::Bed;
use crate::machine::MachineConfig;
use crate::usb::rich_topology;
use anyhow::Result;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Boot (with the rich topology plugged if `rich`), then run each line of stdin in the
/// guest and print its output and exit code, until end of input.
pub async fn run(cfg: &MachineConfig, rich: bool) -> Result<()> {
    let mut bed = Bed::boot(cfg).await?;
    eprintln!("booted in {:.1} s", bed.boot_time.as_secs_f64());
    if rich {
        for dev in rich_topology() {
            let name = bed.plug(&dev).await?;
            eprintln!("plugged {} ({}) as {name}", dev.id, dev.kind.driver());
        }
    }
    eprintln!(
        "guest commands, one per line (outer QMP: {}):",
        cfg.run_dir.join("qmp-shell.sock").display()
    );
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        match bed.guest(&line).await {
            Ok(out) => {
                print!("{}", out.stdout);
                eprint!("{}", out.stderr);
                eprintln!("[rc {}]", out.rc);
            }
            Err(e) => {
                eprintln!("{e:#}\n{}", bed.failure_log());
                break;
            }
        }
    }
    bed.shutdown().await;
    Ok(())
}
