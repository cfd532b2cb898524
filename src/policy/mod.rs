//! Policy: rules from the config file and the pure `plan` that decides where each device
//! belongs, with a reason. No I/O here except [`Config::load`] reading its one file.

mod config;
mod plan;
mod rules;

pub use config::{
    Config, ConfigError, KeyProblem, Problem, VmConfig, DEFAULT_CONTROL_SOCKET, HOST,
};
pub use plan::*;
pub use rules::{Rule, RuleAction};
