//! Runs scenarios on a booted guest, putting the machine back between them; prints a line
//! per result, the slow waits, timings, and a total.

use crate::bed::Bed;
use crate::machine::MachineConfig;
use crate::pace::{above_median, Wait};
use crate::scenarios::Scenario;
use std::time::{Duration, Instant};

/// Longest any one scenario may run (KVM base, scaled by the guest's pace).
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(75);
/// The same on the Xen machine, where every step is an `xl` or `xenstore-*` process in a
/// PV dom0 (a third of a second each under TCG) and the domU's frontend is slow to react.
const XEN_SCENARIO_TIMEOUT: Duration = Duration::from_secs(150);

/// How one scenario ended.
#[derive(Debug)]
enum Outcome {
    Passed,
    Failed(String),
    /// Never started (the guest died or did not boot): counted as failed.
    NotRun(String),
}

/// What a run produced.
pub struct Report {
    /// Each machine's boot (and the Xen machine's domU creation), by label.
    boots: Vec<(&'static str, Option<Duration>)>,
    accel_reason: String,
    results: Vec<(&'static str, Outcome, Duration)>,
}

impl Report {
    /// Passed count.
    pub fn passed(&self) -> usize {
        self.results
            .iter()
            .filter(|r| matches!(r.1, Outcome::Passed))
            .count()
    }

    /// Failed (or not run) count.
    pub fn failed(&self) -> usize {
        self.results.len() - self.passed()
    }

    /// Timings table; the last line is `N passed, N failed`.
    pub fn print(&self, total: Duration) {
        println!("== timings ({})", self.accel_reason);
        for (label, took) in &self.boots {
            match took {
                Some(b) => println!("  {:<24} {:>7.1} s", label, b.as_secs_f64()),
                None => println!("  {:<24} {:>9}", label, "failed"),
            }
        }
        for (name, outcome, time) in &self.results {
            let verdict = match outcome {
                Outcome::Passed => "passed",
                Outcome::Failed(_) => "FAILED",
                Outcome::NotRun(_) => "NOT RUN (failed)",
            };
            println!("  {:<24} {:>7.1} s  {verdict}", name, time.as_secs_f64());
        }
        println!("  {:<24} {:>7.1} s", "total", total.as_secs_f64());
        println!("{} passed, {} failed", self.passed(), self.failed());
    }
}

/// Run `scenarios`: those for the plain guest on `plain`, then the `xen-*` ones on `xen`
/// (each machine booted once, and only when one of its scenarios is selected).
pub async fn run(
    plain: &MachineConfig,
    xen: Option<&MachineConfig>,
    accel_reason: String,
    scenarios: &[Scenario],
) -> Report {
    let mut report = Report {
        boots: Vec::new(),
        accel_reason,
        results: Vec::new(),
    };
    let (on_xen, on_plain): (Vec<&Scenario>, Vec<&Scenario>) =
        scenarios.iter().partition(|s| s.needs_xen());
    if !on_plain.is_empty() {
        run_on(plain, "boot", &on_plain, &mut report).await;
    }
    if !on_xen.is_empty() {
        match xen {
            Some(cfg) => run_on(cfg, "Xen + dom0 boot", &on_xen, &mut report).await,
            None => {
                for s in on_xen {
                    let why = "no Xen machine was prepared (scripts/testbed xen prepares it)";
                    println!("NOT RUN {}: {why}", s.name);
                    report
                        .results
                        .push((s.name, Outcome::NotRun(why.into()), Duration::ZERO));
                }
            }
        }
    }
    report
}

/// Boot `cfg` once and run `scenarios` in order. Between scenarios the machine is put
/// back and verified ([`Bed::reset`]); when that fails (or the guest died), the guest is
/// booted again, so the next scenario starts from a clean machine and the failure stays
/// with the scenario that caused it. Only a guest that cannot be booted again ends the
/// group: its remaining scenarios are reported as not run (failed).
async fn run_on(
    cfg: &MachineConfig,
    label: &'static str,
    scenarios: &[&Scenario],
    report: &mut Report,
) {
    println!(
        "== booting the {} ({:?})",
        if cfg.xen.is_some() {
            "Xen machine"
        } else {
            "guest"
        },
        cfg.accel
    );
    let mut bed = match Bed::boot(cfg).await {
        Ok(bed) => Some(bed),
        Err(e) => {
            println!("FAIL {label}: {e:#}");
            report.boots.push((label, None));
            None
        }
    };
    if let Some(bed) = &bed {
        report.boots.push((label, Some(bed.boot_time)));
        println!(
            "   booted in {:.1} s; {}",
            bed.boot_time.as_secs_f64(),
            bed.pace().describe()
        );
        if let Some(domu) = bed.domu_time {
            report.boots.push(("domU create", Some(domu)));
            println!(
                "   domU created and reporting in {:.1} s",
                domu.as_secs_f64()
            );
        }
    }
    for s in scenarios {
        let Some(live) = bed.as_mut() else {
            println!("NOT RUN {}: the guest could not be booted", s.name);
            report.results.push((
                s.name,
                Outcome::NotRun("the guest could not be booted".into()),
                Duration::ZERO,
            ));
            continue;
        };
        let (outcome, time, unrestored) = run_one(live, s).await;
        report.results.push((s.name, outcome, time));
        let Some(why) = unrestored.or(s.reboot_after.map(String::from)) else {
            continue;
        };
        if let Err(e) = reboot(live, &why).await {
            println!("the guest could not be booted again: {e:#}");
            if let Some(dead) = bed.take() {
                dead.shutdown().await;
            }
        }
    }
    if let Some(bed) = bed {
        bed.shutdown().await;
    }
}

/// Run one scenario and put the machine back; how it went, how long it took, and why the
/// machine is not back to bare controllers if it is not (then it needs a reboot).
async fn run_one(bed: &mut Bed, s: &Scenario) -> (Outcome, Duration, Option<String>) {
    println!("== {}: {}", s.name, s.about);
    let started = Instant::now();
    let limit = bed.scaled(s.timeout.unwrap_or(if s.needs_xen() {
        XEN_SCENARIO_TIMEOUT
    } else {
        SCENARIO_TIMEOUT
    }));
    let result = match tokio::time::timeout(limit, (s.run)(bed)).await {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!("did not finish within {limit:.0?}")),
    };
    // The guest's view right at the failure, before cleanup adds its own noise.
    let dmesg = match (&result, bed.broken()) {
        (Err(_), None) => bed.guest("dmesg | tail -n 25").await.ok().map(|o| o.stdout),
        _ => None,
    };
    let cleanup = bed.reset().await;
    let time = started.elapsed();
    let unrestored = match (&cleanup, bed.broken()) {
        (_, Some(why)) => Some(format!("the guest is unusable ({why})")),
        (Err(e), None) => Some(format!("the machine could not be restored ({e:#})")),
        (Ok(_), None) => None,
    };
    let outcome = match (result, cleanup) {
        (Ok(()), Ok(undone)) if undone.is_empty() => Outcome::Passed,
        (Ok(()), Ok(undone)) => Outcome::Failed(format!(
            "it left the machine changed (restored for the next scenario): {}",
            undone.join("; ")
        )),
        (Err(e), _) => Outcome::Failed(format!("{e:#}")),
        (Ok(()), Err(e)) => Outcome::Failed(format!("cleanup after the scenario failed: {e:#}")),
    };
    match &outcome {
        Outcome::Passed => println!("PASS {} ({:.1} s)", s.name, time.as_secs_f64()),
        Outcome::Failed(why) | Outcome::NotRun(why) => {
            println!("FAIL {} ({:.1} s): {why}", s.name, time.as_secs_f64());
            if let Some(dmesg) = &dmesg {
                println!(
                    "--- guest dmesg at the failure, last 25 lines ---\n{}",
                    dmesg.trim_end()
                );
            }
        }
    }
    print_slow_waits(&bed.take_waits());
    (outcome, time, unrestored)
}

/// Boot the guest again after a scenario left it unusable or not restorable.
async fn reboot(bed: &mut Bed, why: &str) -> anyhow::Result<()> {
    println!(
        "{why}; rebooting the guest so the next scenario starts clean\n{}",
        bed.failure_log()
    );
    let started = Instant::now();
    bed.reboot().await?;
    let _ = bed.take_waits();
    println!("   rebooted in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The waits of a scenario that took longer than its median wait: a slow step shows
/// here, with how much of its deadline it used, before it turns into a failure.
fn print_slow_waits(waits: &[Wait]) {
    for w in above_median(waits) {
        let used = w.took.as_secs_f64() / w.deadline.as_secs_f64().max(f64::EPSILON);
        println!(
            "   wait {:>6.2} s of {:>5.0} s ({:>3.0}%){}: {}",
            w.took.as_secs_f64(),
            w.deadline.as_secs_f64(),
            used * 100.0,
            if used > 0.5 { " SLOW" } else { "" },
            w.what
        );
    }
}
