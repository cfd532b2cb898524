//! Runs scenarios on one booted guest, prints a line per result, timings, and a total.

use crate::bed::Bed;
use crate::machine::MachineConfig;
use crate::scenarios::Scenario;
use std::time::{Duration, Instant};

/// Longest any one scenario may run, cleanup included.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(300);

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
    boot: Option<Duration>,
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
        match self.boot {
            Some(b) => println!("  {:<24} {:>7.1} s", "boot", b.as_secs_f64()),
            None => println!("  {:<24} {:>9}", "boot", "failed"),
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

/// Boot once and run `scenarios` in order. A guest that dies ends the run: the
/// remaining scenarios are reported as not run (failed), with the console log shown.
pub async fn run(cfg: &MachineConfig, accel_reason: String, scenarios: &[Scenario]) -> Report {
    let mut report = Report {
        boot: None,
        accel_reason,
        results: Vec::new(),
    };
    println!("== booting the guest ({:?})", cfg.accel);
    let mut bed = match Bed::boot(cfg).await {
        Ok(bed) => bed,
        Err(e) => {
            println!("FAIL boot: {e:#}");
            for s in scenarios {
                report.results.push((
                    s.name,
                    Outcome::NotRun("the guest did not boot".into()),
                    Duration::ZERO,
                ));
            }
            return report;
        }
    };
    report.boot = Some(bed.boot_time);
    println!("   booted in {:.1} s", bed.boot_time.as_secs_f64());
    for s in scenarios {
        if let Some(why) = bed.broken() {
            println!("NOT RUN {}: {why}", s.name);
            report
                .results
                .push((s.name, Outcome::NotRun(why), Duration::ZERO));
            continue;
        }
        println!("== {}: {}", s.name, s.about);
        let started = Instant::now();
        let result = match tokio::time::timeout(SCENARIO_TIMEOUT, (s.run)(&mut bed)).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!(
                "did not finish within {SCENARIO_TIMEOUT:?}"
            )),
        };
        // The guest's view right at the failure, before cleanup adds its own noise.
        let dmesg = match (&result, bed.broken()) {
            (Err(_), None) => bed.guest("dmesg | tail -n 25").await.ok().map(|o| o.stdout),
            _ => None,
        };
        // Put the bed back to bare controllers for the next scenario.
        let cleanup = bed.reset().await;
        let time = started.elapsed();
        let outcome = match (result, cleanup) {
            (Ok(()), Ok(())) => Outcome::Passed,
            (Err(e), _) => Outcome::Failed(format!("{e:#}")),
            (Ok(()), Err(e)) => {
                Outcome::Failed(format!("cleanup after the scenario failed: {e:#}"))
            }
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
        report.results.push((s.name, outcome, time));
        if let Some(why) = bed.broken() {
            println!(
                "the guest is unusable ({why}); ending the run\n{}",
                bed.failure_log()
            );
        }
    }
    bed.shutdown().await;
    report
}
