//! The `follow` key of a `[[rule]]`: a bounded window, off by default, pass rules only,
//! every problem at its file:line:column.

use std::path::Path;
use std::time::Duration;
use usbroute::config::Config;
use usbroute::policy::{parse_window, window_text, BadWindow};

const VM: &str = "[[vm]]\nname = \"lab\"\nqmp = \"/run/qemu/lab.qmp\"\n";

/// A config with one rule to `lab` whose 4th line is `extra`, loaded or refused.
fn load(extra: &str) -> Result<Config, String> {
    let text = format!("{VM}[[rule]]\nvm = \"lab\"\nmatch = \"1-2\"\n{extra}\n");
    Config::parse(&text, Some(Path::new("usbroute.toml"))).map_err(|e| e.to_string())
}

#[test]
fn follow_is_off_unless_asked_for() {
    let config = load("").expect("valid");

    assert_eq!(config.rules[0].follow, None);
}

#[test]
fn follow_windows_in_ms_s_and_m_load() {
    let windows: Vec<Option<Duration>> = ["500ms", "10s", "2m", "600s"]
        .iter()
        .map(|w| load(&format!("follow = \"{w}\"")).expect("valid").rules[0].follow)
        .collect();

    let expected = [500, 10_000, 120_000, 600_000].map(|ms| Some(Duration::from_millis(ms)));
    assert_eq!(windows, expected);
}

#[test]
fn a_zero_window_is_refused_at_its_value() {
    let msg = load("follow = \"0s\"").expect_err("refused");

    assert!(
        msg.contains("usbroute.toml:7:10: `follow`: a window of 0 follows nothing: leave `follow` out to turn it off"),
        "{msg}"
    );
}

#[test]
fn a_window_over_ten_minutes_is_refused_at_its_value() {
    let msg = load("follow = \"11m\"").expect_err("refused");

    assert!(
        msg.contains("usbroute.toml:7:10: `follow`: `11m` is longer than the 10 minutes allowed"),
        "{msg}"
    );
}

#[test]
fn a_window_without_a_known_unit_is_refused_with_the_spelling() {
    let msgs: Vec<String> = ["10", "10h", "ten s", "1.5s", "-1s", ""]
        .iter()
        .map(|w| load(&format!("follow = \"{w}\"")).expect_err("refused"))
        .collect();

    for (w, msg) in ["10", "10h", "ten s", "1.5s", "-1s", ""].iter().zip(&msgs) {
        assert!(
            msg.contains(&format!("usbroute.toml:7:10: `follow`: `{w}` is not a duration: write a whole number and a unit, `500ms`, `10s` or `2m`")),
            "{msg}"
        );
    }
}

#[test]
fn a_window_that_is_not_a_string_is_refused_at_its_place() {
    let msg = load("follow = 10").expect_err("refused");

    assert!(
        msg.contains("usbroute.toml:7:10: invalid type: integer `10`, expected a string"),
        "{msg}"
    );
}

#[test]
fn follow_on_a_forbid_rule_is_refused_at_its_key() {
    let text = "[[rule]]\nforbid = true\nmatch = \"1-2\"\nfollow = \"10s\"\n";

    let msg = Config::parse(text, Some(Path::new("usbroute.toml")))
        .expect_err("refused")
        .to_string();

    assert!(
        msg.contains("usbroute.toml:4:10: `follow` has no effect on a forbid rule (a forbid rule gives no device to a VM, so there is nothing to follow); remove it"),
        "{msg}"
    );
}

#[test]
fn windows_are_bounded_and_written_back_as_the_config_spells_them() {
    let too_long = ["601s", "10m1s", "99999999ms", "36000000000s"].map(parse_window);
    let written =
        ["500ms", "10s", "2m", "90s", "1500ms"].map(|w| window_text(parse_window(w).expect(w)));

    assert!(
        too_long[0] == Err(BadWindow::TooLong("601s".into())),
        "{too_long:?}"
    );
    assert!(
        matches!(too_long[1], Err(BadWindow::Syntax(_))),
        "{too_long:?}"
    );
    assert!(
        matches!(too_long[2], Err(BadWindow::TooLong(_))),
        "{too_long:?}"
    );
    assert!(
        matches!(too_long[3], Err(BadWindow::TooLong(_))),
        "{too_long:?}"
    );
    assert_eq!(
        written,
        ["500ms", "10s", "2m", "90s", "1500ms"].map(String::from)
    );
}

#[test]
fn a_rule_with_follow_says_so_where_it_is_named() {
    let config = load("follow = \"10s\"").expect("valid");

    assert_eq!(
        config.rules[0].to_string(),
        "rule 1 (line 4: match = \"port:1-2\" → vm = \"lab\", by = \"address\", follow = \"10s\")"
    );
}
