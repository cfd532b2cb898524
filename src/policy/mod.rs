//! Policy: the rules and the pure `plan` that decides where each device belongs, with a
//! reason. No I/O, and nothing from the edges: the config file that holds the rules is
//! read and checked by [`crate::config`], which builds [`Rule`]s for this module.

mod plan;
mod rules;
mod why;

pub use plan::*;
pub use rules::{overlaps, Overlap, Rule, RuleAction, WinsBy, HOST};
pub use why::{why, RuleMatch, Why};
