//! The toggle service: a line protocol that switches routing profiles.

use serde::{Deserialize, Serialize};

/// Config `[toggle]` (stable interface).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToggleConfig {
    /// TCP line service address; non-loopback needs `secret`.
    pub listen: Option<String>,
    /// Shared secret required from clients of a non-loopback listener.
    pub secret: Option<String>,
}
