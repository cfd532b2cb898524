//! Noticing that the host resumed from suspend, without a timer ticking while idle.
//!
//! A `timerfd` on `CLOCK_REALTIME`, armed with `TFD_TIMER_ABSTIME |
//! TFD_TIMER_CANCEL_ON_SET` for a moment decades away, never fires; the kernel cancels it
//! (its read fails with `ECANCELED`) whenever the wall clock jumps against the monotonic
//! one. Resume is such a jump: `timekeeping_resume` injects the time asleep and calls
//! `timerfd_resume`, "as resume is equivalent to clock_was_set()" (kernel/time/
//! timekeeping.c, Linux 5.14 and later). So is `date -s` or an NTP step; the two are told
//! apart by `CLOCK_BOOTTIME − CLOCK_MONOTONIC`, the time spent asleep since boot, which
//! only a resume makes grow ([`classify`], pure).
//!
//! logind's `PrepareForSleep` signal would say the same over D-Bus, but it needs logind
//! (absent on minimal hosts, containers and the test bed's guest) and a D-Bus client:
//! the kernel's own event needs neither. docs/daemon.md, "Suspend and resume".

use super::event_loop::Daemon;
use crate::engine::coordinator::Input as EngineInput;
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{
    ClockId as TimerClock, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags,
};
use nix::time::{clock_gettime, ClockId};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

/// A growth of the time asleep below this is the jitter of reading two clocks one after
/// the other, not a sleep (a suspend and resume takes far longer than this).
const MIN_SLEEP: Duration = Duration::from_millis(50);

/// How far ahead the never-firing timer is armed.
const FAR_AHEAD: Duration = Duration::from_secs(60 * 60 * 24 * 365 * 50);

/// What made the wall clock jump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockJump {
    /// The host was asleep (suspend to RAM or idle) for this long and woke up.
    Resumed {
        /// How long it slept.
        asleep: Duration,
    },
    /// The wall clock was set (by hand, NTP, RTC sync) without a sleep.
    ClockSet,
}

/// Tell a resume from a clock set by the time asleep since boot
/// (`CLOCK_BOOTTIME − CLOCK_MONOTONIC`) read before and after the jump.
pub fn classify(asleep_before: Duration, asleep_after: Duration) -> ClockJump {
    match asleep_after.checked_sub(asleep_before) {
        Some(asleep) if asleep >= MIN_SLEEP => ClockJump::Resumed { asleep },
        _ => ClockJump::ClockSet,
    }
}

/// The clock watch could not be set up or read.
#[derive(Debug, thiserror::Error)]
pub enum ClockWatchError {
    /// timerfd_create, timerfd_settime or reading a clock failed (a seccomp filter
    /// without `@timer`, an old kernel).
    #[error("cannot watch the wall clock with a timerfd (the host's resume will go unnoticed; allow the @timer system calls)")]
    Timer(#[source] nix::Error),
    /// Waiting on the timerfd failed.
    #[error("waiting on the wall-clock timerfd failed")]
    Wait(#[source] std::io::Error),
}

/// The timerfd, as the raw fd tokio's reactor watches.
struct Timer(TimerFd);

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Hand the timerfd to tokio's reactor.
#[allow(unsafe_code)]
fn register(timer: Timer) -> Result<AsyncFd<Timer>, ClockWatchError> {
    // SAFETY: `Timer` owns its `TimerFd` (an `OwnedFd` inside), which stays open and
    // returns the same number from `as_raw_fd` for as long as it lives; the `AsyncFd`
    // owns the `Timer`.
    unsafe { AsyncFd::register(timer) }.map_err(|e| ClockWatchError::Wait(e.into()))
}

/// A wall-clock watch: [`ClockWatch::next`] returns at each jump of the wall clock.
pub struct ClockWatch {
    timer: AsyncFd<Timer>,
    /// The time asleep since boot when the timer was last armed.
    asleep: Duration,
}

impl ClockWatch {
    /// Create the timerfd and arm it.
    pub fn open() -> Result<ClockWatch, ClockWatchError> {
        let timer = TimerFd::new(
            TimerClock::CLOCK_REALTIME,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(ClockWatchError::Timer)?;
        let timer = register(Timer(timer))?;
        let mut watch = ClockWatch {
            timer,
            asleep: Duration::ZERO,
        };
        watch.asleep = watch.arm()?;
        Ok(watch)
    }

    /// Arm the timer far ahead, cancelled on a clock set; then read the time asleep
    /// since boot. Read after arming, so a resume is never lost between the two: one
    /// before the arming shows in this reading, one after it cancels the timer.
    fn arm(&mut self) -> Result<Duration, ClockWatchError> {
        let now = clock_gettime(ClockId::CLOCK_REALTIME).map_err(ClockWatchError::Timer)?;
        let at = now + TimeSpec::from_duration(FAR_AHEAD);
        self.timer
            .get_ref()
            .0
            .set(
                Expiration::OneShot(at),
                TimerSetTimeFlags::TFD_TIMER_ABSTIME | TimerSetTimeFlags::TFD_TIMER_CANCEL_ON_SET,
            )
            .map_err(ClockWatchError::Timer)?;
        asleep_since_boot()
    }

    /// Wait for the next jump of the wall clock, say what it was, and re-arm.
    pub async fn next(&mut self) -> Result<ClockJump, ClockWatchError> {
        loop {
            let mut ready = self.timer.readable().await.map_err(ClockWatchError::Wait)?;
            let mut buf = [0u8; 8];
            match nix::unistd::read(self.timer.as_raw_fd(), &mut buf) {
                // Cancelled by a jump, or (the clock set past it) expired: either way the
                // wall clock moved.
                Err(nix::Error::ECANCELED) | Ok(_) => {}
                Err(nix::Error::EAGAIN) => {
                    ready.clear_ready();
                    continue;
                }
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(ClockWatchError::Wait(e.into())),
            }
            let after = asleep_since_boot()?;
            let jump = classify(self.asleep, after);
            self.asleep = self.arm()?;
            // A resume between reading `after` and re-arming cancelled no timer: it shows
            // only in the time asleep, so count it now.
            let jump = match (jump, classify(after, self.asleep)) {
                (ClockJump::ClockSet, late @ ClockJump::Resumed { .. }) => late,
                _ => jump,
            };
            return Ok(jump);
        }
    }
}

/// `CLOCK_BOOTTIME − CLOCK_MONOTONIC`: how long the host has been asleep since boot.
fn asleep_since_boot() -> Result<Duration, ClockWatchError> {
    let mono = clock_gettime(ClockId::CLOCK_MONOTONIC).map_err(ClockWatchError::Timer)?;
    let boot = clock_gettime(ClockId::CLOCK_BOOTTIME).map_err(ClockWatchError::Timer)?;
    let asleep = boot - mono;
    Ok(Duration::new(
        asleep.tv_sec().max(0) as u64,
        asleep.tv_nsec().max(0) as u32,
    ))
}

/// Watch the wall clock in a task: each jump arrives on the channel. When the watch
/// cannot be set up (or fails later) it says so once, and the channel stays silent: the
/// daemon runs on without noticing resumes.
pub(super) fn spawn() -> mpsc::UnboundedReceiver<ClockJump> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let failed = match ClockWatch::open() {
            Ok(mut watch) => loop {
                match watch.next().await {
                    Ok(jump) => {
                        if tx.send(jump).is_err() {
                            return;
                        }
                    }
                    Err(e) => break e,
                }
            },
            Err(e) => e,
        };
        tracing::warn!("{}", crate::error_chain::one_line(&failed));
        // Keep the sender: a closed channel would end the loop's branch, not wait.
        tx.closed().await;
    });
    rx
}

impl Daemon {
    /// The wall clock jumped. After a resume every device was reset by the kernel and
    /// its interfaces handed back to the host's drivers: rescan, list every VM again and
    /// attach every device anew, and have port routing checked. A clock set alone
    /// changes nothing USB: it is only noted.
    pub(super) fn on_clock_jump(&mut self, jump: ClockJump) {
        match jump {
            ClockJump::Resumed { asleep } => {
                tracing::info!(
                    "host resumed after {:.1} s asleep: resyncing",
                    asleep.as_secs_f64()
                );
                self.rescan("resume");
                self.engine.send(EngineInput::Resumed);
                self.routing.check("after the host resumed");
            }
            ClockJump::ClockSet => {
                tracing::debug!("the wall clock was set (no sleep): nothing to resync");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_asleep_that_grew_by_seconds_is_a_resume_of_that_long() {
        let before = Duration::from_secs(3);
        let after = Duration::from_millis(26_500);

        let jump = classify(before, after);

        assert_eq!(
            jump,
            ClockJump::Resumed {
                asleep: Duration::from_millis(23_500)
            }
        );
    }

    #[test]
    fn time_asleep_unchanged_is_a_clock_set() {
        let before = Duration::from_secs(3);

        let jump = classify(before, before);

        assert_eq!(jump, ClockJump::ClockSet);
    }

    #[test]
    fn time_asleep_grown_by_read_jitter_only_is_a_clock_set() {
        let before = Duration::from_secs(3);
        let after = before + MIN_SLEEP - Duration::from_micros(1);

        let jump = classify(before, after);

        assert_eq!(jump, ClockJump::ClockSet);
    }

    #[test]
    fn time_asleep_that_shrank_is_a_clock_set_not_a_panic() {
        // Two clocks read one after the other: the later read may come out a hair lower.
        let jump = classify(Duration::from_secs(3), Duration::from_secs(2));

        assert_eq!(jump, ClockJump::ClockSet);
    }

    #[test]
    fn the_time_asleep_since_boot_reads_on_this_kernel() {
        let asleep = asleep_since_boot();

        assert!(asleep.is_ok(), "{asleep:?}");
    }
}
