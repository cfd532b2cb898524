//! Which config file a command reads: one default path and one resolver, used by every
//! command (`serve`, `check`, `ports`, `toggle`, and the daemon's clients finding its
//! control socket).
//!
//! `--config FILE` (or `USBROUTE_CONFIG`) names a file that must exist; without it the
//! default [`DEFAULT_CONFIG`] is used when it exists, else no file (the daemon runs the
//! empty policy). The default is looked up under `--sysfs-root`, like every other host
//! path usbroute reads or keeps (the routing state under /var/lib/usbroute too): on a
//! real host the root is `/`, and a test or a recording brings its own `/etc`.

use super::Global;
use std::path::{Path, PathBuf};

/// Where the config is read from when neither `--config` nor `USBROUTE_CONFIG` is given.
pub const DEFAULT_CONFIG: &str = "/etc/usbroute/usbroute.toml";

/// The config file a command uses, and how it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigFile {
    /// Named by `--config` or `USBROUTE_CONFIG`.
    Given(PathBuf),
    /// [`DEFAULT_CONFIG`] (under the sysfs root), which exists.
    Default(PathBuf),
    /// Nothing given and no default file: the empty policy.
    None {
        /// Where the default was looked for.
        looked_at: PathBuf,
    },
}

/// `--config` names a file that is not there.
#[derive(Debug, thiserror::Error)]
#[error("config file {} (from --config or USBROUTE_CONFIG) does not exist; give an existing file, or leave both out to use {DEFAULT_CONFIG}", path.display())]
pub struct MissingConfig {
    /// The file named.
    pub path: PathBuf,
}

impl ConfigFile {
    /// `--config FILE`, else the default file under `root` if it exists.
    pub fn resolve(
        given: Option<&Path>,
        root: &crate::sysfs::SysfsRoot,
    ) -> Result<Self, MissingConfig> {
        if let Some(path) = given {
            // Only a file that is plainly not there is refused here; unreadable ones are
            // left to the loader, which says why.
            if let Err(e) = std::fs::metadata(path) {
                if e.kind() == std::io::ErrorKind::NotFound {
                    return Err(MissingConfig {
                        path: path.to_path_buf(),
                    });
                }
            }
            return Ok(Self::Given(path.to_path_buf()));
        }
        let default = root.path(DEFAULT_CONFIG);
        Ok(if default.exists() {
            Self::Default(default)
        } else {
            Self::None { looked_at: default }
        })
    }

    /// The file, when there is one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::Given(p) | Self::Default(p) => Some(p),
            Self::None { .. } => None,
        }
    }

    /// Where a command that writes the config (`ports map`) writes: the file in use, else
    /// the default path.
    pub fn path_to_write(&self) -> &Path {
        match self {
            Self::Given(p) | Self::Default(p) => p,
            Self::None { looked_at } => looked_at,
        }
    }

    /// For the daemon's first log line: which file, and why that one.
    pub fn describe(&self) -> String {
        match self {
            Self::Given(p) => format!("config {} (given)", p.display()),
            Self::Default(p) => format!("config {} (the default)", p.display()),
            Self::None { looked_at } => format!(
                "no config file (no --config, and {} does not exist): the empty policy",
                looked_at.display()
            ),
        }
    }
}

impl Global {
    /// The config file this command uses (see [`ConfigFile::resolve`]).
    pub fn config_file(&self) -> Result<ConfigFile, MissingConfig> {
        ConfigFile::resolve(self.config.as_deref(), &self.root())
    }

    /// The daemon's control socket: `--control`, else the config file's
    /// `control_socket`, else the default socket.
    pub fn control_socket(&self) -> anyhow::Result<PathBuf> {
        let config = self.config_file()?;
        Ok(crate::daemon::resolve_socket(
            self.control.as_deref(),
            config.path(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sysfs::SysfsRoot;

    fn root_with_default(content: Option<&str>) -> (tempfile::TempDir, SysfsRoot) {
        let dir = tempfile::tempdir().unwrap();
        if let Some(text) = content {
            let path = dir.path().join("etc/usbroute/usbroute.toml");
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let root = SysfsRoot::new(dir.path());
        (dir, root)
    }

    #[test]
    fn the_default_file_under_the_root_is_used_when_nothing_is_given() {
        let (dir, root) = root_with_default(Some(""));

        let file = ConfigFile::resolve(None, &root).unwrap();

        assert_eq!(
            file,
            ConfigFile::Default(dir.path().join("etc/usbroute/usbroute.toml"))
        );
    }

    #[test]
    fn no_file_and_no_default_is_the_empty_policy() {
        let (_dir, root) = root_with_default(None);

        let file = ConfigFile::resolve(None, &root).unwrap();

        assert_eq!(file.path(), None);
        assert!(
            file.describe().contains("the empty policy"),
            "{}",
            file.describe()
        );
    }

    #[test]
    fn a_given_file_wins_over_the_default() {
        let (dir, root) = root_with_default(Some(""));
        let mine = dir.path().join("mine.toml");
        std::fs::write(&mine, "").unwrap();

        let file = ConfigFile::resolve(Some(&mine), &root).unwrap();

        assert_eq!(file, ConfigFile::Given(mine));
    }

    #[test]
    fn a_given_file_that_does_not_exist_is_an_error_naming_it() {
        let (dir, root) = root_with_default(Some(""));
        let missing = dir.path().join("typo.toml");

        let err = ConfigFile::resolve(Some(&missing), &root).unwrap_err();

        assert!(err.to_string().contains("typo.toml"), "{err}");
    }
}
