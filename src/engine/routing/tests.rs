//! The routing reconciler on plain data and on the fake beside the trait.

use super::fake::{FakeRouting, KERNEL_DEFAULT};
use super::worker::{self, RoutingInput};
use super::*;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

const GUEST: u16 = 0x3ffc;

fn intent(profile: &str, xusb2pr: u16) -> RoutingIntent {
    RoutingIntent {
        profile: profile.into(),
        xusb2pr,
        usb3_pssen: 0x3c,
        kernel_default: false,
        pinned_from: None,
    }
}

fn reading(xusb2pr: u16, usb3_pssen: u32, intent: Option<RoutingIntent>) -> RoutingReading {
    RoutingReading {
        xusb2pr,
        usb3_pssen,
        intent,
        power_control: Some("on".into()),
        in_force: None,
    }
}

fn ok(profile: &str, xusb2pr: u16) -> RoutingAnswer {
    RoutingAnswer::Ok {
        profile: Some(profile.into()),
        xusb2pr,
    }
}

fn ask(ask: RoutingAsk) -> RoutingRequest {
    RoutingRequest {
        ask,
        origin: "test".into(),
        allowed: None,
    }
}

#[test]
fn without_an_intent_the_reconciler_holds_whatever_the_register_says() {
    assert_eq!(decide(&reading(0x1234, 0, None)), RoutingStep::Hold);
}

#[test]
fn a_register_holding_the_intent_needs_no_write() {
    let step = decide(&reading(GUEST, 0x3c, Some(intent("guest", GUEST))));

    assert_eq!(step, RoutingStep::Hold);
}

#[test]
fn a_kernel_rewrite_on_resume_is_put_back_to_the_intent() {
    let step = decide(&reading(KERNEL_DEFAULT, 0x3f, Some(intent("guest", GUEST))));

    assert_eq!(
        step,
        RoutingStep::Restore(Restored {
            profile: "guest".into(),
            found: KERNEL_DEFAULT,
            restored: GUEST,
        })
    );
}

#[test]
fn superspeed_lanes_switched_back_on_alone_are_put_back_too() {
    let step = decide(&reading(GUEST, 0x3f, Some(intent("guest", GUEST))));

    assert!(matches!(step, RoutingStep::Restore(_)), "{step:?}");
}

#[test]
fn a_pin_someone_set_back_to_auto_is_pinned_again() {
    let pinned = RoutingIntent {
        pinned_from: Some("auto".into()),
        ..intent("guest", GUEST)
    };
    let mut now = reading(GUEST, 0x3c, Some(pinned));
    now.power_control = Some("auto".into());

    let step = decide(&now);

    assert_eq!(
        step,
        RoutingStep::Power {
            profile: "guest".into(),
            power: PowerStep::Pin,
        }
    );
}

#[test]
fn a_switch_to_the_default_cut_short_before_unpinning_gives_power_control_back() {
    let default = RoutingIntent {
        kernel_default: true,
        pinned_from: Some("auto".into()),
        ..intent("host", KERNEL_DEFAULT)
    };

    let step = decide(&reading(KERNEL_DEFAULT, 0x3c, Some(default)));

    assert_eq!(
        step,
        RoutingStep::Power {
            profile: "host".into(),
            power: PowerStep::Unpin { to: "auto".into() },
        }
    );
}

#[test]
fn a_named_profile_is_applied_and_answered_with_its_mask() {
    let mut fake = FakeRouting::host_guest();

    let answer = answer(&mut fake, &ask(RoutingAsk::Profile("guest".into())), false);

    assert_eq!(answer, ok("guest", GUEST));
    assert_eq!(fake.state().xusb2pr, GUEST);
}

#[test]
fn toggle_flips_from_the_first_profile_in_force_to_the_second_and_back() {
    let mut fake = FakeRouting::host_guest();

    let first = answer(&mut fake, &ask(RoutingAsk::Toggle), false);
    let second = answer(&mut fake, &ask(RoutingAsk::Toggle), false);

    let profile = |a: &RoutingAnswer| match a {
        RoutingAnswer::Ok { profile, .. } => profile.clone(),
        RoutingAnswer::Err(e) => panic!("{e}"),
    };
    assert_eq!(profile(&first).as_deref(), Some("guest"));
    assert_eq!(profile(&second).as_deref(), Some("host"));
    assert_eq!(fake.state().writes, 2);
}

#[test]
fn a_dry_run_switch_writes_nothing_and_answers_with_the_mask_it_would_write() {
    let mut fake = FakeRouting::host_guest();

    let answer = answer(&mut fake, &ask(RoutingAsk::Guest), true);

    assert_eq!(answer, ok("guest", GUEST));
    assert_eq!(fake.state().writes, 0);
    assert_eq!(fake.state().xusb2pr, KERNEL_DEFAULT);
}

#[test]
fn an_unknown_profile_is_refused_with_the_configured_names_and_writes_nothing() {
    let mut fake = FakeRouting::host_guest();

    let answer = answer(&mut fake, &ask(RoutingAsk::Profile("gaming".into())), false);

    assert_eq!(
        answer,
        RoutingAnswer::Err("no profile `gaming` (configured: guest, host)".into())
    );
    assert_eq!(fake.state().writes, 0);
}

#[test]
fn a_listener_may_not_select_a_profile_outside_its_allowed_set() {
    let mut fake = FakeRouting::host_guest();
    let vm = RoutingRequest {
        ask: RoutingAsk::Toggle,
        origin: "VM win11".into(),
        allowed: Some(["host".to_string()].into()),
    };

    let answer = answer(&mut fake, &vm, false);

    assert_eq!(
        answer,
        RoutingAnswer::Err("profile `guest` is not allowed for VM win11 (allowed: host)".into())
    );
    assert_eq!(fake.state().writes, 0);
}

#[test]
fn status_answers_the_profile_in_force_and_changes_nothing() {
    let mut fake = FakeRouting::host_guest();
    fake.state().xusb2pr = GUEST;

    let answer = answer(&mut fake, &ask(RoutingAsk::Status), false);

    assert_eq!(answer, ok("guest", GUEST));
    assert_eq!(fake.state().writes, 0);
}

/// The worker on `fake` (it checks once at start, then when asked); its published statuses.
fn start(
    fake: &FakeRouting,
    dry_run: bool,
) -> (
    mpsc::UnboundedSender<RoutingInput>,
    mpsc::UnboundedReceiver<RoutingStatus>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let inputs = worker::spawn(Box::new(fake.clone()), dry_run, move |s| {
        let _ = tx.send(s);
    });
    (inputs, rx)
}

/// The first published status that satisfies `ok`, within 10 s.
async fn status_where(
    statuses: &mut mpsc::UnboundedReceiver<RoutingStatus>,
    ok: impl Fn(&RoutingStatus) -> bool,
) -> RoutingStatus {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let s = statuses.recv().await.expect("the worker runs");
            if ok(&s) {
                return s;
            }
        }
    })
    .await
    .expect("a status like that within 10 s")
}

async fn request(inputs: &mpsc::UnboundedSender<RoutingInput>, a: RoutingAsk) -> RoutingAnswer {
    let (reply, answer) = oneshot::channel();
    let request = ask(a);
    inputs
        .send(RoutingInput::Request { request, reply })
        .unwrap_or_else(|_| panic!("the worker runs"));
    answer.await.expect("an answer")
}

#[tokio::test]
async fn the_worker_puts_the_intent_back_after_a_kernel_rewrite() {
    let fake = FakeRouting::host_guest();
    let (inputs, mut statuses) = start(&fake, false);
    request(&inputs, RoutingAsk::Guest).await;

    fake.kernel_rewrite();
    inputs
        .send(RoutingInput::Check {
            why: "a uevent".into(),
        })
        .unwrap_or_else(|_| panic!("the worker runs"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fake.state().writes < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = status_where(&mut statuses, |s| s.intent.is_some()).await;

    assert_eq!(status.profile.as_deref(), Some("guest"));
    assert_eq!(fake.state().xusb2pr, GUEST);
    assert_eq!(fake.state().writes, 2, "the switch, then one write back");
}

#[tokio::test]
async fn a_dry_run_worker_publishes_what_it_would_put_back_and_writes_nothing() {
    let fake = FakeRouting::host_guest();
    fake.state().intent = Some(RoutingIntent {
        usb3_pssen: 0,
        ..intent("guest", GUEST)
    });
    let (_inputs, mut statuses) = start(&fake, true);

    let status = status_where(&mut statuses, |s| s.would.is_some()).await;

    assert_eq!(
        status.would,
        Some(RoutingStep::Restore(Restored {
            profile: "guest".into(),
            found: KERNEL_DEFAULT,
            restored: GUEST,
        }))
    );
    assert_eq!(fake.state().writes, 0);
    assert_eq!(fake.state().xusb2pr, KERNEL_DEFAULT);
}

#[tokio::test]
async fn a_register_that_cannot_be_read_is_an_error_in_the_status() {
    let fake = FakeRouting::host_guest();
    fake.state().broken = Some("config space gone".into());
    let (_inputs, mut statuses) = start(&fake, false);

    let status = status_where(&mut statuses, |s| s.error.is_some()).await;

    assert_eq!(status.error.as_deref(), Some("config space gone"));
    assert_eq!(fake.state().writes, 0);
}
