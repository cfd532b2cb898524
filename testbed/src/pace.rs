//! How fast this guest runs, and what every wait may take because of it.
//!
//! A deadline written into a scenario is the time the step needs under KVM on an idle
//! machine of our kind. Right after boot the bed times a fixed busybox loop in the guest
//! once; every deadline is then scaled by the accelerator and by how much slower than the
//! reference machine this guest ran the loop. A slow machine (a loaded CI host, the bed
//! pinned to one core) gets longer deadlines and stays green; a hang is still caught,
//! only later. Deadlines never shrink below the reference, so a fast machine proves no
//! less.
//!
//! Every wait is also recorded ([`WaitLog`]), so a run can show which conditions took
//! longer than usual before one of them turns into a failure.

use crate::accel::Accel;
use std::time::Duration;

/// The calibration loop: pure shell arithmetic, no I/O, so it measures the vCPU.
pub const CALIBRATION_SCRIPT: &str = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo $i";

/// What [`CALIBRATION_SCRIPT`] took under TCG on an idle 2-core machine of our kind
/// (guest time, the agent's round trip taken off).
const TCG_REFERENCE: Duration = Duration::from_millis(400);

/// How much longer than under KVM a step may take under TCG on the reference machine.
const TCG_SLOWNESS: f64 = 4.0;

/// Never scale by more than this: past it a "slow" guest is a hung one.
const MAX_FACTOR: f64 = 8.0;

/// The guest's measured speed and what it does to deadlines.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    accel: Accel,
    /// Measured loop time over the reference (1.0 = as fast as the reference machine).
    ratio: f64,
}

impl Pace {
    /// Before calibration: the accelerator alone decides.
    pub fn uncalibrated(accel: Accel) -> Pace {
        Pace { accel, ratio: 1.0 }
    }

    /// From the calibration loop's guest time.
    pub fn measured(accel: Accel, loop_time: Duration) -> Pace {
        let ratio = loop_time.as_secs_f64() / TCG_REFERENCE.as_secs_f64();
        Pace { accel, ratio }
    }

    /// The factor every KVM-base deadline is multiplied by.
    pub fn factor(&self) -> f64 {
        let (slowness, floor) = match self.accel {
            Accel::Tcg => (TCG_SLOWNESS, 1.0),
            // Under KVM the loop runs far faster than the TCG reference; the KVM base
            // deadline is the floor.
            Accel::Kvm => (TCG_SLOWNESS, 1.0 / TCG_SLOWNESS),
        };
        (slowness * self.ratio.max(floor)).min(slowness * MAX_FACTOR)
    }

    /// `kvm_base` (what the step needs under KVM on an idle reference machine) scaled for
    /// this guest.
    pub fn deadline(&self, kvm_base: Duration) -> Duration {
        kvm_base.mul_f64(self.factor())
    }

    /// One line for the report.
    pub fn describe(&self) -> String {
        format!(
            "guest speed: the calibration loop ran at {:.2}x the reference time ({} ms \
             under TCG); deadlines are {:.1}x their KVM base",
            self.ratio,
            TCG_REFERENCE.as_millis(),
            self.factor()
        )
    }
}

/// One condition waited for.
#[derive(Debug, Clone)]
pub struct Wait {
    /// What was waited for, as the failure message would say it.
    pub what: String,
    /// How long it took (or how long until the deadline, when it failed).
    pub took: Duration,
    /// The deadline it had.
    pub deadline: Duration,
}

/// The waits of one scenario, in order.
#[derive(Debug, Default)]
pub struct WaitLog {
    waits: Vec<Wait>,
}

impl WaitLog {
    /// Record one wait.
    pub fn record(&mut self, what: &str, took: Duration, deadline: Duration) {
        self.waits.push(Wait {
            what: what.to_string(),
            took,
            deadline,
        });
    }

    /// Hand over what was recorded and start afresh (one log per scenario).
    pub fn take(&mut self) -> Vec<Wait> {
        std::mem::take(&mut self.waits)
    }
}

/// The waits that took longer than the median wait of their scenario, slowest first:
/// where the time went, and how close each came to its deadline.
pub fn above_median(waits: &[Wait]) -> Vec<&Wait> {
    let mut times: Vec<Duration> = waits.iter().map(|w| w.took).collect();
    times.sort();
    let Some(median) = times.get(times.len() / 2).copied() else {
        return Vec::new();
    };
    let mut slow: Vec<&Wait> = waits.iter().filter(|w| w.took > median).collect();
    slow.sort_by_key(|w| std::cmp::Reverse(w.took));
    slow
}

/// "p50 X s, p99 Y s" (nearest rank: with 20 samples p99 is the slowest).
pub fn percentiles(samples: &mut [Duration]) -> String {
    if samples.is_empty() {
        return "no samples".into();
    }
    samples.sort();
    let rank = |q: f64| nearest_rank(samples, q).as_secs_f64();
    format!("p50 {:.2} s, p99 {:.2} s", rank(0.50), rank(0.99))
}

/// The `q` quantile (0.5 for p50) of `sorted` by nearest rank (p99 of 20 samples is the
/// slowest); zero for no samples.
pub fn nearest_rank(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// The `N` /proc/uptime stamps a timed chain script printed for plug `plug` (one guest
/// script per plug prints them on one line), or an error quoting what it printed.
pub fn stamps<const N: usize>(plug: usize, printed: &str) -> anyhow::Result<[f64; N]> {
    let read: Result<Vec<f64>, _> = printed.split_whitespace().map(str::parse).collect();
    read.ok()
        .and_then(|v| <[f64; N]>::try_from(v).ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "plug {plug}: the chain printed '{}', not {N} stamps",
                printed.trim()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(ms: u64) -> Wait {
        Wait {
            what: format!("{ms}"),
            took: Duration::from_millis(ms),
            deadline: Duration::from_secs(10),
        }
    }

    #[test]
    fn a_guest_twice_as_slow_as_the_reference_gets_twice_the_tcg_deadline() {
        let pace = Pace::measured(Accel::Tcg, TCG_REFERENCE * 2);

        assert_eq!(
            pace.deadline(Duration::from_secs(10)),
            Duration::from_secs(80)
        );
    }

    #[test]
    fn a_guest_faster_than_the_reference_keeps_the_reference_deadline() {
        let pace = Pace::measured(Accel::Tcg, TCG_REFERENCE / 3);

        assert_eq!(
            pace.deadline(Duration::from_secs(10)),
            Duration::from_secs(40)
        );
    }

    #[test]
    fn a_fast_kvm_guest_gets_the_kvm_base_deadline() {
        let pace = Pace::measured(Accel::Kvm, TCG_REFERENCE / 50);

        assert_eq!(
            pace.deadline(Duration::from_secs(10)),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn scaling_is_capped_so_a_hang_is_still_caught() {
        let pace = Pace::measured(Accel::Tcg, TCG_REFERENCE * 1000);

        assert_eq!(
            pace.deadline(Duration::from_secs(1)),
            Duration::from_secs(32)
        );
    }

    #[test]
    fn percentiles_are_nearest_rank_so_p99_of_twenty_is_the_slowest() {
        let mut samples: Vec<Duration> = (1..=20).rev().map(Duration::from_secs).collect();

        assert_eq!(percentiles(&mut samples), "p50 10.00 s, p99 20.00 s");
    }

    #[test]
    fn a_chain_prints_as_many_stamps_as_asked_or_is_refused_quoting_it() {
        assert_eq!(stamps::<2>(1, "12.5 13.25\n").unwrap(), [12.5, 13.25]);
        let err = stamps::<3>(7, "12.5 13.25").unwrap_err().to_string();
        assert!(
            err.contains("plug 7") && err.contains("'12.5 13.25'"),
            "{err}"
        );
    }

    #[test]
    fn above_median_lists_the_slow_waits_slowest_first() {
        let waits = [wait(10), wait(300), wait(20), wait(30), wait(200)];

        let slow: Vec<&str> = above_median(&waits)
            .iter()
            .map(|w| w.what.as_str())
            .collect();

        assert_eq!(slow, ["300", "200"]);
    }
}
