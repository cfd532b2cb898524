//! Policy: the rules and the pure `plan` that decides where each device belongs, with a
//! reason. No I/O, and nothing from the edges: the config file that holds the rules is
//! read and checked by [`crate::config`], which builds [`Rule`]s for this module.

mod follow;
mod plan;
mod rules;
mod why;

pub use follow::{Departed, Follow};
pub use plan::*;
pub use rules::{
    overlaps, parse_window, window_text, BadWindow, Overlap, Rule, RuleAction, WinsBy, HOST,
    MAX_FOLLOW,
};
pub use why::{why, RuleMatch, Why};
