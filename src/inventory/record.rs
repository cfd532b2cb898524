//! `record-sysfs`: copy exactly what the readers read into a directory that replays as
//! the same snapshot with `--sysfs-root DIR`. Attributes become files, links become the
//! same relative symlinks (their target directories created), listed directories are
//! created. Nothing is written outside DIR; a non-empty DIR is refused.
//!
//! Run as root into a directory a user can change, the copy could be steered: a symlink
//! swapped in during the run would have root write through it. So DIR must be a real
//! directory (not a symlink) owned by the running user, and neither it nor any directory
//! above it may be writable by anyone else (a sticky one like /tmp is fine: others cannot
//! rename what is not theirs). Then nobody else can change any path the copy writes to;
//! files are opened with `O_NOFOLLOW` besides.

use super::reader::{normalize, Access, Reader};
use super::{scan, scan_with, Snapshot};
use crate::sysfs::SysfsRoot;
use serde::Serialize;
use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

/// The metadata file written beside `sys/` in a recording.
pub const METADATA_FILE: &str = "usbroute-recording.toml";

/// The kernel release, read (and so recorded) like everything else.
const OSRELEASE: &str = "/proc/sys/kernel/osrelease";

/// Symlinks followed within one path before giving up (the kernel's own limit is 40).
const MAX_LINK_DEPTH: usize = 40;

/// Why a recording failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The destination has files in it: recording there could mix or overwrite data.
    #[error("{0} is not empty: record into a new or empty directory")]
    NotEmpty(PathBuf),
    /// The destination exists but is a file.
    #[error("{0} is not a directory: record into a new or empty directory")]
    NotADirectory(PathBuf),
    /// Someone else could change the destination during the run (see the module doc).
    #[error(
        "{path} {why}: someone else could swap a symlink into the recording while it is \
         written; record into a new directory under one only you (or root) can write to, \
         such as /root or /var/tmp/NEW"
    )]
    Unsafe {
        /// The directory at fault (the destination or one above it).
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// Writing into the destination failed.
    #[error("cannot write {path}")]
    Write {
        /// What could not be written.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The copy does not replay as the original: a bug in the recorder.
    #[error("the recording in {0} does not replay as the live system (please report this with the recording attached)")]
    ReplayDiffers(PathBuf),
}

/// What a recording holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Attribute files copied.
    pub files: usize,
    /// Symlinks reproduced.
    pub links: usize,
    /// Paths that were read but could not be copied (unreadable), one line each.
    pub skipped: Vec<String>,
    /// Kernel release of the recorded system, if readable.
    pub kernel: Option<String>,
}

#[derive(Serialize)]
struct Metadata<'a> {
    usbroute_version: &'a str,
    kernel: Option<&'a str>,
    recorded_at: String,
    source_root: String,
}

/// Record what [`scan`] reads under `source` into `dest` (created if missing), then
/// check that `dest` replays as the same snapshot.
pub fn record(source: &SysfsRoot, dest: &Path) -> Result<Summary, RecordError> {
    check_destination(dest)?;
    let mut reader = Reader::logging(source);
    let snapshot = scan_with(&mut reader);
    let kernel = reader.raw(Path::new(OSRELEASE)).ok().flatten();
    let (_, log) = reader.finish();

    let mut copier = Copier {
        source,
        dest,
        files: 0,
        links: 0,
        skipped: Vec::new(),
    };
    let unique: BTreeSet<(PathBuf, Access)> = log.into_iter().collect();
    for (path, access) in &unique {
        if let Err(e) = copier.copy(path, *access) {
            match e {
                CopyError::Source(e) if e.kind() == io::ErrorKind::NotFound => {}
                CopyError::Source(e) => copier.skipped.push(format!("{}: {e}", path.display())),
                CopyError::Dest(path, source) => return Err(RecordError::Write { path, source }),
            }
        }
    }

    let metadata = Metadata {
        usbroute_version: env!("CARGO_PKG_VERSION"),
        kernel: kernel.as_deref(),
        recorded_at: utc_now(),
        source_root: source.dir().display().to_string(),
    };
    let text = format!(
        "# Recorded by `usbroute record-sysfs`; replay with `usbroute --sysfs-root DIR list`.\n{}",
        toml::to_string(&metadata).unwrap_or_default()
    );
    let meta_path = dest.join(METADATA_FILE);
    write_no_follow(&meta_path, text.as_bytes()).map_err(|source| RecordError::Write {
        path: meta_path,
        source,
    })?;

    if !same_hardware(&snapshot, &scan(&SysfsRoot::new(dest))) {
        return Err(RecordError::ReplayDiffers(dest.to_path_buf()));
    }
    Ok(Summary {
        files: copier.files,
        links: copier.links,
        skipped: copier.skipped,
        kernel,
    })
}

fn check_destination(dest: &Path) -> Result<(), RecordError> {
    let link = std::fs::symlink_metadata(dest).is_ok_and(|m| m.file_type().is_symlink());
    if link {
        return Err(RecordError::Unsafe {
            path: dest.to_path_buf(),
            why: "is a symlink".into(),
        });
    }
    if dest.exists() && !dest.is_dir() {
        return Err(RecordError::NotADirectory(dest.to_path_buf()));
    }
    // Whose it is comes first: someone else's directory is refused whatever is in it.
    if dest.exists() {
        check_nobody_else_can_change(dest)?;
        return check_empty_or_create(dest);
    }
    check_empty_or_create(dest)?;
    check_nobody_else_can_change(dest)
}

/// `dest` is empty, or did not exist and was created (for the running user alone).
fn check_empty_or_create(dest: &Path) -> Result<(), RecordError> {
    match std::fs::read_dir(dest) {
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(_) => Err(RecordError::NotEmpty(dest.to_path_buf())),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dest)
                .map_err(|source| RecordError::Write {
                    path: dest.to_path_buf(),
                    source,
                })
        }
        Err(source) => Err(RecordError::Write {
            path: dest.to_path_buf(),
            source,
        }),
    }
}

/// `dest` is owned by the running user and writable by nobody else, and every directory
/// above it is owned by root or that user and writable by nobody else unless sticky.
fn check_nobody_else_can_change(dest: &Path) -> Result<(), RecordError> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    let real = std::fs::canonicalize(dest).map_err(|source| RecordError::Write {
        path: dest.to_path_buf(),
        source,
    })?;
    for (i, dir) in real.ancestors().enumerate() {
        let meta = std::fs::symlink_metadata(dir).map_err(|source| RecordError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let unsafe_because = |why: String| {
            Err(RecordError::Unsafe {
                path: dir.to_path_buf(),
                why,
            })
        };
        let owner_ok = meta.uid() == me || (i > 0 && meta.uid() == 0);
        if !owner_ok {
            return unsafe_because(format!("is owned by uid {}, not by uid {me}", meta.uid()));
        }
        let others_write = meta.mode() & 0o022 != 0;
        let sticky = meta.mode() & 0o1000 != 0;
        if others_write && (i == 0 || !sticky) {
            return unsafe_because(format!(
                "is writable by others (mode {:o})",
                meta.mode() & 0o7777
            ));
        }
    }
    Ok(())
}

/// Equal controllers, buses and devices (warnings may differ: an unreadable file in the
/// source is a missing one in the copy).
fn same_hardware(a: &Snapshot, b: &Snapshot) -> bool {
    a.controllers == b.controllers && a.buses == b.buses && a.devices == b.devices
}

enum CopyError {
    Source(io::Error),
    Dest(PathBuf, io::Error),
}

struct Copier<'a> {
    source: &'a SysfsRoot,
    dest: &'a Path,
    files: usize,
    links: usize,
    skipped: Vec<String>,
}

impl Copier<'_> {
    fn copy(&mut self, host: &Path, access: Access) -> Result<(), CopyError> {
        let real = self.walk(host, 0)?;
        let from = self.source.path(&real);
        let to = self.dest_path(&real);
        let meta = std::fs::metadata(&from).map_err(CopyError::Source)?;
        if meta.is_dir() {
            return std::fs::create_dir_all(&to).map_err(|e| CopyError::Dest(to, e));
        }
        if access == Access::File {
            let bytes = read_bounded(&from).map_err(CopyError::Source)?;
            write_no_follow(&to, &bytes).map_err(|e| CopyError::Dest(to, e))?;
            self.files += 1;
        }
        Ok(())
    }

    /// Walk `host` component by component, reproducing every directory and symlink met
    /// on the way in the destination; returns the path with all links resolved.
    fn walk(&mut self, host: &Path, depth: usize) -> Result<PathBuf, CopyError> {
        if depth > MAX_LINK_DEPTH {
            return Err(CopyError::Source(io::Error::other(format!(
                "more than {MAX_LINK_DEPTH} links in {}",
                host.display()
            ))));
        }
        let mut resolved = PathBuf::from("/");
        for name in normalize(host).iter().skip(1) {
            let candidate = resolved.join(name);
            let meta = std::fs::symlink_metadata(self.source.path(&candidate))
                .map_err(CopyError::Source)?;
            if meta.file_type().is_symlink() {
                let target =
                    std::fs::read_link(self.source.path(&candidate)).map_err(CopyError::Source)?;
                self.symlink(&candidate, &target)?;
                resolved = self.walk(&resolved.join(&target), depth + 1)?;
            } else {
                if meta.is_dir() {
                    let to = self.dest_path(&candidate);
                    std::fs::create_dir_all(&to).map_err(|e| CopyError::Dest(to, e))?;
                }
                resolved = candidate;
            }
        }
        Ok(resolved)
    }

    fn symlink(&mut self, host: &Path, target: &Path) -> Result<(), CopyError> {
        let to = self.dest_path(host);
        if std::fs::symlink_metadata(&to).is_ok() {
            return Ok(());
        }
        std::os::unix::fs::symlink(target, &to).map_err(|e| CopyError::Dest(to, e))?;
        self.links += 1;
        Ok(())
    }

    fn dest_path(&self, host: &Path) -> PathBuf {
        self.dest.join(host.strip_prefix("/").unwrap_or(host))
    }
}

/// At most one attribute's worth of `path`, as the readers read it.
fn read_bounded(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(crate::sysfs::MAX_ATTRIBUTE as u64)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Write `bytes` to `path`, never through a symlink at `path`.
fn write_no_follow(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?
        .write_all(bytes)
}

/// Now as `2026-11-21T07:30:00Z`.
fn utc_now() -> String {
    utc_text(std::time::SystemTime::now())
}

/// `at` as `2026-11-21T07:30:00Z` (whole seconds), without a date crate (days-from-civil,
/// inverted); also how the engine stamps when a followed device left.
pub fn utc_text(at: std::time::SystemTime) -> String {
    let secs = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's civil-from-days: days since 1970-01-01 → (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_from_days_knows_a_leap_day() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }
}
