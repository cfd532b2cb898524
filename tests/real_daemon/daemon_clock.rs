//! The daemon's wall-clock watch (how it notices the host's resume) against the host
//! kernel: setting the wall clock cancels its timerfd, and with no sleep in between the
//! jump is a clock set, not a resume. The clock is set to the time it already shows, so
//! nothing else on the host moves (a few microseconds back). Needs root (CAP_SYS_TIME).
//! The resume itself is the test bed's `suspend` scenario (S3 of the guest).

use nix::time::{clock_gettime, clock_settime, ClockId};
use std::time::Duration;
use usbroute::daemon::clock_watch::{ClockJump, ClockWatch};

/// How long the kernel may take to cancel the timer once the clock is set (it does so
/// at once; this is only the bound of a hang).
const CANCEL_DEADLINE: Duration = Duration::from_secs(10);

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root: setting CLOCK_REALTIME needs CAP_SYS_TIME (run the real tier as root)"
    );
}

fn set_the_wall_clock_to_what_it_shows() {
    let now = clock_gettime(ClockId::CLOCK_REALTIME).expect("reading CLOCK_REALTIME");
    clock_settime(ClockId::CLOCK_REALTIME, now).expect("setting CLOCK_REALTIME");
}

#[tokio::test]
async fn a_wall_clock_set_without_sleep_is_seen_as_a_clock_set() {
    require_root();
    let mut watch = ClockWatch::open().expect("the clock watch opens");

    set_the_wall_clock_to_what_it_shows();
    let jump = tokio::time::timeout(CANCEL_DEADLINE, watch.next()).await;

    let jump = jump.expect("the kernel cancelled the timer").expect("read");
    assert_eq!(jump, ClockJump::ClockSet);
}

#[tokio::test]
async fn the_watch_is_armed_again_after_each_jump() {
    require_root();
    let mut watch = ClockWatch::open().expect("the clock watch opens");

    let mut jumps = Vec::new();
    for _ in 0..2 {
        set_the_wall_clock_to_what_it_shows();
        let jump = tokio::time::timeout(CANCEL_DEADLINE, watch.next()).await;
        jumps.push(jump.expect("the kernel cancelled the timer").expect("read"));
    }

    assert_eq!(jumps, vec![ClockJump::ClockSet, ClockJump::ClockSet]);
}
