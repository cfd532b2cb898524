//! Rules as the plan uses them: validated, numbered, each with its place in the file.

use crate::backend::AttachMode;
use crate::selector::Selector;
use std::fmt;
use std::time::Duration;

/// The target name that means "stays on the host" in a rule's `vm`.
pub const HOST: &str = "host";

/// What a rule does with the devices it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleAction {
    /// Keep them on the host, whatever else matches (`forbid = true` or `vm = "host"`).
    Forbid,
    /// Pass them to a VM, attached by `mode`.
    Pass {
        /// The VM.
        vm: String,
        /// How the VM's usb-host finds the device (`by`).
        mode: AttachMode,
    },
}

impl RuleAction {
    /// The VM a pass rule sends devices to; `None` for a forbid rule.
    pub fn vm(&self) -> Option<&str> {
        match self {
            Self::Forbid => None,
            Self::Pass { vm, .. } => Some(vm),
        }
    }
}

/// One `[[rule]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Position among the rules in the file, from 0.
    pub index: usize,
    /// Line of the rule in the file, from 1 (0 for rules not from a file).
    pub line: usize,
    /// Which devices (`match`).
    pub selector: Selector,
    /// What to do with them.
    pub action: RuleAction,
    /// Higher wins among pass rules (`priority`, default 0). Forbid rules always win.
    pub priority: i64,
    /// Overrides the built-in protections (host netdev, mounted disk); never hubs.
    pub force: bool,
    /// `follow = "10s"`: a device this rule gave a VM that leaves, and a device that
    /// appears on the same physical port within this window, goes to the same VM even
    /// with other ids (a bootloader re-enumeration). `None`: off. Pass rules only.
    pub follow: Option<Duration>,
}

impl Rule {
    /// A rule passing `selector` to `vm` by `mode`, for code and tests building rules.
    pub fn pass(index: usize, selector: Selector, vm: &str, mode: AttachMode) -> Rule {
        Rule {
            index,
            line: 0,
            selector,
            action: RuleAction::Pass {
                vm: vm.to_string(),
                mode,
            },
            priority: 0,
            force: false,
            follow: None,
        }
    }

    /// A forbid rule for `selector`.
    pub fn forbid(index: usize, selector: Selector) -> Rule {
        Rule {
            index,
            line: 0,
            selector,
            action: RuleAction::Forbid,
            priority: 0,
            force: false,
            follow: None,
        }
    }

    /// `vm = "win11", by = "port"` or `forbid`, for messages.
    pub fn describe_target(&self) -> String {
        match &self.action {
            RuleAction::Forbid => "forbid".into(),
            RuleAction::Pass { vm, mode } => {
                let by = mode.name();
                let force = if self.force { ", force" } else { "" };
                let follow = self.follow.map_or(String::new(), |w| {
                    format!(", follow = \"{}\"", window_text(w))
                });
                format!("vm = \"{vm}\", by = \"{by}\"{force}{follow}")
            }
        }
    }
}

impl fmt::Display for Rule {
    /// `rule 2 (line 14: match = "port:1-3" → vm = "win11", by = "address")`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule {}", self.index + 1)?;
        if self.line > 0 {
            write!(f, " (line {}", self.line)?;
        } else {
            f.write_str(" (")?;
        }
        let sep = if self.line > 0 { ": " } else { "" };
        write!(
            f,
            "{sep}match = \"{}\" → {})",
            self.selector,
            self.describe_target()
        )
    }
}

/// Why one rule wins over another for a device both match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WinsBy {
    /// It is a forbid rule, and forbid rules win over every pass rule wherever they are.
    Forbid,
    /// Its `priority` is higher.
    Priority,
    /// Equal priority (or both forbid): it comes earlier in the file. First match wins.
    FileOrder,
}

impl Rule {
    /// Where this rule stands in the precedence, lowest first: every forbid rule (in
    /// file order), then pass rules by `priority` (highest first), equal priorities in
    /// file order. The plan lets the first matching rule of this order decide.
    pub fn rank(&self) -> (bool, std::cmp::Reverse<i64>, usize) {
        match self.action {
            RuleAction::Forbid => (false, std::cmp::Reverse(0), self.index),
            RuleAction::Pass { .. } => (true, std::cmp::Reverse(self.priority), self.index),
        }
    }

    /// Whether this rule wins over `other` for a device both match, and why; `None` when
    /// `other` wins (or it is the same rule).
    pub fn beats(&self, other: &Rule) -> Option<WinsBy> {
        if self.rank() >= other.rank() {
            return None;
        }
        Some(match (&self.action, &other.action) {
            (RuleAction::Forbid, RuleAction::Pass { .. }) => WinsBy::Forbid,
            _ if self.priority != other.priority => WinsBy::Priority,
            _ => WinsBy::FileOrder,
        })
    }
}

/// Two pass rules for different VMs whose selectors might match one device (they are
/// not provably disjoint): such a device goes to `winner`'s VM. Not an error (first
/// match wins), but worth a warning, since the file may not mean it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overlap<'a> {
    /// The rule that decides for a device both match.
    pub winner: &'a Rule,
    /// The rule that does nothing for such a device.
    pub loser: &'a Rule,
    /// Why the winner wins: [`WinsBy::Priority`] or [`WinsBy::FileOrder`].
    pub by: WinsBy,
}

impl fmt::Display for Overlap<'_> {
    /// `the rules on line 11 (vm = "lab", ...) and line 15 (vm = "win11", ...) can match
    /// the same device; line 11 wins: it comes earlier in the file (both have priority 0)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (first, second) = if self.winner.index < self.loser.index {
            (self.winner, self.loser)
        } else {
            (self.loser, self.winner)
        };
        write!(
            f,
            "{} ({}) and {} ({}) can match the same device and send it to different VMs; {} wins: ",
            place(first),
            first.describe_target(),
            place(second),
            second.describe_target(),
            place(self.winner),
        )?;
        match self.by {
            WinsBy::Priority => write!(
                f,
                "its priority is higher ({} > {})",
                self.winner.priority, self.loser.priority
            ),
            _ => write!(
                f,
                "it comes earlier in the file (both have priority {}); if that is not meant, give the other a higher `priority = N` or make the `match` selectors exclusive",
                self.winner.priority
            ),
        }
    }
}

/// `the rule on line 11`, or `rule 2` for a rule not from a file.
fn place(rule: &Rule) -> String {
    if rule.line > 0 {
        format!("the rule on line {}", rule.line)
    } else {
        format!("rule {}", rule.index + 1)
    }
}

/// Every pair of pass rules that send a device both might match to different VMs, in
/// file order of the later rule, each with who wins and why. Rules for the same VM that
/// differ only in `by` or `force` are not listed: the device goes to that VM either way.
pub fn overlaps(rules: &[Rule]) -> Vec<Overlap<'_>> {
    let mut out = Vec::new();
    for (i, later) in rules.iter().enumerate() {
        for earlier in &rules[..i] {
            let (Some(a), Some(b)) = (earlier.action.vm(), later.action.vm()) else {
                continue;
            };
            if a == b || earlier.selector.provably_disjoint(&later.selector) {
                continue;
            }
            let overlap = match (earlier.beats(later), later.beats(earlier)) {
                (Some(by), _) => Overlap {
                    winner: earlier,
                    loser: later,
                    by,
                },
                (None, Some(by)) => Overlap {
                    winner: later,
                    loser: earlier,
                    by,
                },
                (None, None) => continue,
            };
            out.push(overlap);
        }
    }
    out
}

/// The longest `follow` window: a re-enumeration takes seconds; a device that comes back
/// after minutes is a new plug, not the same device.
pub const MAX_FOLLOW: Duration = Duration::from_secs(600);

/// Why a `follow` window was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadWindow {
    /// Not a number and a unit.
    #[error("`{0}` is not a duration: write a whole number and a unit, `500ms`, `10s` or `2m`")]
    Syntax(String),
    /// Zero follows nothing.
    #[error("a window of 0 follows nothing: leave `follow` out to turn it off")]
    Zero,
    /// Longer than [`MAX_FOLLOW`].
    #[error("`{0}` is longer than the 10 minutes allowed: a device back after that long is a new plug, not a re-enumeration")]
    TooLong(String),
}

/// A `follow` window: a whole number with `ms`, `s` or `m`, above 0 and at most
/// [`MAX_FOLLOW`].
pub fn parse_window(text: &str) -> Result<Duration, BadWindow> {
    let syntax = || BadWindow::Syntax(text.to_string());
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    // At most 7 digits: enough for 10 minutes in ms, and no overflow below.
    let n: u64 = match number.len() {
        1..=7 => number.parse().map_err(|_| syntax())?,
        _ if number.is_empty() => return Err(syntax()),
        _ => return Err(BadWindow::TooLong(text.to_string())),
    };
    let window = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => return Err(syntax()),
    };
    match window {
        Duration::ZERO => Err(BadWindow::Zero),
        w if w > MAX_FOLLOW => Err(BadWindow::TooLong(text.to_string())),
        w => Ok(w),
    }
}

/// A window as the config writes it: `10s`, `500ms`, `2m`.
pub fn window_text(window: Duration) -> String {
    let ms = window.as_millis();
    match ms {
        _ if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        _ if ms % 1000 == 0 => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}
