//! The top-level keys of the control socket: `control_socket` and `control_group`.

use serde::Deserialize;
use std::path::PathBuf;

/// Where the control socket lives unless `control_socket` says otherwise.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/usbroute/control.sock";

/// The control-socket part of the config file (`control_socket`, `control_group`), read on
/// its own so the CLI can find the daemon's socket without understanding the rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ControlSettings {
    /// Where the socket is (default [`DEFAULT_CONTROL_SOCKET`]).
    pub control_socket: Option<PathBuf>,
    /// The group whose members may use it besides root.
    pub control_group: Option<String>,
}

impl ControlSettings {
    /// Read the two keys from a config file's text; every other key is ignored here.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The socket path, the default when unset.
    pub fn socket(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_settings_ignore_rules_and_default_the_socket() {
        let text = "control_group = \"usbroute\"\n[[vm]]\nname = \"a\"\nqmp = \"/run/a.qmp\"\n";

        let s = ControlSettings::from_toml(text).unwrap();

        assert_eq!(s.control_group.as_deref(), Some("usbroute"));
        assert_eq!(s.socket(), PathBuf::from("/run/usbroute/control.sock"));
    }
}
