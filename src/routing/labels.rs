//! The `ports map` wizard's pure core, and the writer of `[routing.labels]`.
//!
//! The wizard rescans the inventory every few hundred milliseconds and compares: a
//! device that was not there before, on a port of the chipset, lit that port up.
//! Labels are written into the config file in place (comments and order kept), one at
//! a time, so stopping the wizard loses nothing and running it again resumes.

use super::detect::Detected;
use super::ports::port_bit_of;
use super::profile::EhciPort;
use crate::inventory::Snapshot;
use std::collections::BTreeSet;
use std::path::Path;

/// A device that appeared on a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortHit {
    /// XUSB2PR bit.
    pub bit: u8,
    /// The port as `ehciN:P`.
    pub port: EhciPort,
    /// The device, as `3-1.2 046d:c016 Logitech Optical Mouse`.
    pub device: String,
}

/// Ports on which a device appeared between two scans (one hit per port, in bit order).
/// A device is new if its port path and address were not in `before`: a re-plug into
/// the same port gets a new address, so it counts.
pub fn arrivals(before: &Snapshot, after: &Snapshot, detected: &Detected) -> Vec<PortHit> {
    let known: BTreeSet<_> = before
        .devices
        .iter()
        .map(|d| (d.port.clone(), d.address))
        .collect();
    let mut seen = BTreeSet::new();
    let mut hits: Vec<PortHit> = after
        .devices
        .iter()
        .filter(|d| !known.contains(&(d.port.clone(), d.address)))
        .filter_map(|d| {
            let bit = port_bit_of(d, after, detected)?;
            let port = EhciPort::of_bit(detected.chipset, bit)?;
            seen.insert(bit).then(|| PortHit {
                bit,
                port,
                device: format!("{} {}", d.port, d.label()),
            })
        })
        .collect();
    hits.sort_by_key(|h| h.bit);
    hits
}

/// Why a label or the config file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    /// A label that would be confused with something else.
    #[error("Label `{0}` is not usable: use letters, digits, spaces, `-` or `_`, and not the shape ehciN:P")]
    BadLabel(String),
    /// The config file is not TOML.
    #[error("{path} is not valid TOML; fix it before labelling ports")]
    Parse {
        /// The file.
        path: String,
        /// The parser's complaint.
        #[source]
        source: toml_edit::TomlError,
    },
    /// `[routing]` or `[routing.labels]` is not a table.
    #[error("{0}: `routing` / `routing.labels` must be tables")]
    NotATable(String),
    /// Reading or writing the file failed.
    #[error("Cannot {action} {path}")]
    Io {
        /// `read` or `write`.
        action: &'static str,
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Check a label typed by the user.
pub fn valid_label(label: &str) -> bool {
    let l = label.trim();
    !l.is_empty()
        && l.len() <= 64
        && l == label
        && EhciPort::parse(l).is_none()
        && l.chars()
            .all(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_' | '.'))
}

/// `text` with `label = "port"` in `[routing.labels]`; any other label of the same port
/// is dropped (a port has one name). Everything else in the file is kept as it was.
pub fn set_label(
    text: &str,
    origin: &str,
    label: &str,
    port: EhciPort,
) -> Result<String, LabelError> {
    if !valid_label(label) {
        return Err(LabelError::BadLabel(label.to_string()));
    }
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|source| LabelError::Parse {
        path: origin.to_string(),
        source,
    })?;
    let not_table = || LabelError::NotATable(origin.to_string());
    let routing = doc
        .entry("routing")
        .or_insert_with(|| {
            let mut t = toml_edit::Table::new();
            t.set_implicit(true);
            toml_edit::Item::Table(t)
        })
        .as_table_mut()
        .ok_or_else(not_table)?;
    let labels = routing
        .entry("labels")
        .or_insert_with(|| toml_edit::Item::Table(toml_edit::Table::new()))
        .as_table_like_mut()
        .ok_or_else(not_table)?;
    let spec = port.to_string();
    let stale: Vec<String> = labels
        .iter()
        .filter(|(k, v)| *k != label && v.as_str() == Some(spec.as_str()))
        .map(|(k, _)| k.to_string())
        .collect();
    for k in stale {
        labels.remove(&k);
    }
    labels.insert(label, toml_edit::value(spec));
    Ok(doc.to_string())
}

/// Write one label into the config file at `path` (created if missing), atomically.
pub fn write_label(path: &Path, label: &str, port: EhciPort) -> Result<(), LabelError> {
    let shown = path.display().to_string();
    let io = |action, source| LabelError::Io {
        action,
        path: shown.clone(),
        source,
    };
    let (text, permissions) = match std::fs::read_to_string(path) {
        Ok(t) => (t, std::fs::metadata(path).ok().map(|m| m.permissions())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (String::new(), None),
        Err(e) => return Err(io("read", e)),
    };
    let updated = set_label(&text, &shown, label, port)?;
    let tmp = path.with_extension("toml.usbroute-tmp");
    std::fs::write(&tmp, updated).map_err(|e| io("write", e))?;
    if let Some(p) = permissions {
        std::fs::set_permissions(&tmp, p).map_err(|e| io("write", e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| io("write", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORT: EhciPort = EhciPort { ehci: 2, port: 3 };

    #[test]
    fn set_label_keeps_comments_and_other_sections() {
        let text = "# my config\n[[vm]]\nname = \"win\" # the VM\n\n[routing]\ntoggle = [\"host\", \"guest\"]\n";

        let out = set_label(text, "c.toml", "front left", PORT).unwrap();

        assert!(out.starts_with("# my config\n[[vm]]\nname = \"win\" # the VM\n"));
        assert!(out.contains("toggle = [\"host\", \"guest\"]"));
        assert!(out.contains("[routing.labels]\n\"front left\" = \"ehci2:3\""));
    }

    #[test]
    fn set_label_renames_a_port_that_already_had_a_label() {
        let text = "[routing.labels]\nold = \"ehci2:3\"\nother = \"ehci1:1\"\n";

        let out = set_label(text, "c.toml", "new", PORT).unwrap();

        assert_eq!(
            out,
            "[routing.labels]\nother = \"ehci1:1\"\nnew = \"ehci2:3\"\n"
        );
    }

    #[test]
    fn set_label_on_an_empty_file_creates_the_table() {
        let out = set_label("", "c.toml", "rear", PORT).unwrap();

        assert_eq!(out, "[routing.labels]\nrear = \"ehci2:3\"\n");
    }

    #[test]
    fn label_shaped_like_a_port_is_refused() {
        assert!(matches!(
            set_label("", "c.toml", "ehci1:2", PORT),
            Err(LabelError::BadLabel(_))
        ));
    }
}
