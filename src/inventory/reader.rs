//! Reading sysfs under a root: attributes, links and directory listings, each failure
//! turned into a warning, and (when recording) a log of every path touched so
//! `record-sysfs` copies exactly what was read and nothing else.

use crate::sysfs::{SysfsRoot, MAX_ATTRIBUTE};
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

/// How a logged path was used, which decides how a recording reproduces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Access {
    /// An attribute read as a file.
    File,
    /// A link read (or resolved) itself: reproduced as the same symlink.
    Link,
    /// A directory listed, or one whose presence is the information (`net/usb0`).
    Dir,
}

/// One pass over sysfs: reads with warnings, and an optional access log.
pub(crate) struct Reader<'a> {
    root: &'a SysfsRoot,
    log: Option<Vec<(PathBuf, Access)>>,
    warnings: Vec<String>,
    /// The first read that makes the whole picture untrustworthy (see [`ScanFailed`]).
    failure: Option<ScanFailed>,
}

/// A read failed in a way that makes the picture incomplete as a whole, not one field of
/// one device: a top-level listing that could not be read (EIO, EMFILE), or any read that
/// ran out of file descriptors or memory. An empty `/sys/bus/usb/devices` is a valid
/// picture (no USB); an unreadable one is not, and acting on it would take every device
/// away from every VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read {path}: {reason}; the USB picture would be incomplete")]
pub struct ScanFailed {
    /// The host path that failed.
    pub path: PathBuf,
    /// The operating system's words.
    pub reason: String,
}

impl<'a> Reader<'a> {
    /// A reader that does not log (the normal scan).
    pub(crate) fn new(root: &'a SysfsRoot) -> Self {
        Self {
            root,
            log: None,
            warnings: Vec::new(),
            failure: None,
        }
    }

    /// A reader that logs every path it touches (for `record-sysfs`).
    pub(crate) fn logging(root: &'a SysfsRoot) -> Self {
        Self {
            log: Some(Vec::new()),
            ..Self::new(root)
        }
    }

    /// The warnings so far, and the access log (empty unless logging).
    pub(crate) fn finish(self) -> (Vec<String>, Vec<(PathBuf, Access)>) {
        (self.warnings, self.log.unwrap_or_default())
    }

    /// The first failure that makes this pass's picture incomplete, if any.
    pub(crate) fn failure(&self) -> Option<&ScanFailed> {
        self.failure.as_ref()
    }

    /// Remember `e` on `path` as the pass's failure when it says the host, not the one
    /// object, is in trouble (out of fds or memory), or when `always` (a top-level read).
    fn note_failure(&mut self, path: &Path, e: &io::Error, always: bool) {
        if self.failure.is_none() && (always || is_resource_exhaustion(e)) {
            self.failure = Some(ScanFailed {
                path: path.to_path_buf(),
                reason: e.to_string(),
            });
        }
    }

    /// Add one warning line.
    pub(crate) fn warn(&mut self, line: String) {
        self.warnings.push(line);
    }

    /// Note that `host` was used, for the recording.
    pub(crate) fn mark(&mut self, host: &Path, access: Access) {
        if let Some(log) = &mut self.log {
            log.push((host.to_path_buf(), access));
        }
    }

    /// The names in a directory, sorted; `None` if it does not exist. Other errors warn.
    pub(crate) fn list(&mut self, dir: &Path) -> Option<Vec<String>> {
        self.list_or_fail(dir, false)
    }

    /// [`Reader::list`] of a directory the whole picture rests on (`/sys/bus/usb/devices`):
    /// absent is an empty picture, but any other failure, even part-way through the
    /// listing, fails the pass.
    pub(crate) fn list_top(&mut self, dir: &Path) -> Option<Vec<String>> {
        self.list_or_fail(dir, true)
    }

    fn list_or_fail(&mut self, dir: &Path, top: bool) -> Option<Vec<String>> {
        self.mark(dir, Access::Dir);
        let listed = std::fs::read_dir(self.root.path(dir)).and_then(|entries| {
            let mut names = entries
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<io::Result<Vec<String>>>()?;
            names.sort_unstable();
            Ok(names)
        });
        match listed {
            Ok(names) => Some(names),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                self.note_failure(dir, &e, top);
                self.warn(format!("cannot list {}: {e}", dir.display()));
                None
            }
        }
    }

    /// The raw value of an attribute: `Ok(None)` when absent.
    pub(crate) fn raw(&mut self, path: &Path) -> io::Result<Option<String>> {
        self.mark(path, Access::File);
        let read = read_attribute(&self.root.path(path));
        if let Err(e) = &read {
            self.note_failure(path, e, false);
        }
        read
    }

    /// The attributes of one sysfs object (`dir`), warnings naming it `who`.
    pub(crate) fn attrs<'r>(&'r mut self, who: &'r str, dir: &'r Path) -> Attrs<'r, 'a> {
        Attrs { r: self, who, dir }
    }

    /// Read and parse attribute `name` of `dir` for the thing called `who`.
    ///
    /// Missing: `None`, with a warning only if `required`. Unreadable or unparsable:
    /// `None` and a warning naming `who`, the attribute and what was wrong.
    pub(crate) fn parse<T>(
        &mut self,
        who: &str,
        dir: &Path,
        name: &str,
        required: bool,
        what: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Option<T> {
        let path = dir.join(name);
        match self.raw(&path) {
            Ok(Some(value)) => {
                let parsed = parse(&value);
                if parsed.is_none() {
                    self.warn(format!(
                        "{who}: `{name}` is `{}`, not {what} ({})",
                        super::text::capped(&value, super::text::MAX_SHOWN).escape_debug(),
                        path.display()
                    ));
                }
                parsed
            }
            Ok(None) => {
                if required {
                    self.warn(format!("{who}: `{name}` is missing ({})", path.display()));
                }
                None
            }
            Err(e) => {
                self.warn(format!(
                    "{who}: cannot read `{name}`: {e} ({})",
                    path.display()
                ));
                None
            }
        }
    }

    /// An optional text attribute (`serial`, `product`): absent is normal, empty is none;
    /// cut to [`super::text::MAX_KEPT`] characters (the device chose it).
    pub(crate) fn text(&mut self, who: &str, dir: &Path, name: &str) -> Option<String> {
        self.parse(who, dir, name, false, "text", |v| {
            Some(super::text::capped(v.trim(), super::text::MAX_KEPT).into_owned())
        })
        .filter(|v| !v.is_empty())
    }

    /// The last component of a link's target (`driver` → `xhci_hcd`), `None` if no link.
    pub(crate) fn link_name(&mut self, path: &Path) -> Option<String> {
        self.mark(path, Access::Link);
        self.root.link_name(path)
    }

    /// Where the link `path` points (resolved lexically, like [`Reader::resolve`]), `None`
    /// when there is no such link.
    pub(crate) fn follow(&mut self, path: &Path) -> Option<PathBuf> {
        self.mark(path, Access::Link);
        let target = std::fs::read_link(self.root.path(path)).ok()?;
        Some(normalize(
            &path.parent().unwrap_or(Path::new("/")).join(target),
        ))
    }

    /// Where a sysfs entry really lives: follows one relative link lexically (sysfs links
    /// point from real directories, so `..` is safe), or returns the path if not a link.
    pub(crate) fn resolve(&mut self, path: &Path) -> PathBuf {
        self.mark(path, Access::Link);
        match std::fs::read_link(self.root.path(path)) {
            Ok(target) => normalize(&path.parent().unwrap_or(Path::new("/")).join(target)),
            Err(_) => path.to_path_buf(),
        }
    }
}

/// The attributes of one sysfs object, read through its [`Reader`].
pub(crate) struct Attrs<'r, 'a> {
    r: &'r mut Reader<'a>,
    who: &'r str,
    dir: &'r Path,
}

impl Attrs<'_, '_> {
    /// An attribute every such object has: missing is worth a warning.
    pub(crate) fn required<T>(
        &mut self,
        name: &str,
        what: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Option<T> {
        self.r.parse(self.who, self.dir, name, true, what, parse)
    }

    /// An attribute some objects lack (older kernels, optional strings).
    pub(crate) fn optional<T>(
        &mut self,
        name: &str,
        what: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Option<T> {
        self.r.parse(self.who, self.dir, name, false, what, parse)
    }

    /// An optional text attribute (`serial`, `product`): absent is normal, empty is none.
    pub(crate) fn text(&mut self, name: &str) -> Option<String> {
        self.r.text(self.who, self.dir, name)
    }

    /// The target name of link `name` (`driver` → `usbhid`), `None` if there is none.
    pub(crate) fn link(&mut self, name: &str) -> Option<String> {
        self.r.link_name(&self.dir.join(name))
    }
}

/// Read a sysfs attribute like [`SysfsRoot::read_attr`] (trailing newline and NULs
/// trimmed, lossy UTF-8, `Ok(None)` if absent, at most [`MAX_ATTRIBUTE`] bytes) in four
/// system calls: open, read, read (end), close. `std::fs::read` adds a `statx` for a size
/// hint that sysfs answers with 4096 for every attribute anyway; on a scan that reads ~15
/// attributes per device, that is a fifth of the system calls. A longer file (not a sysfs
/// attribute: a crafted recording) is cut at the page: nothing from outside makes a read
/// allocate without bound.
fn read_attribute(path: &Path) -> io::Result<Option<String>> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut page = [0u8; MAX_ATTRIBUTE];
    let mut len = 0;
    while len < page.len() {
        match file.read(&mut page[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(
        String::from_utf8_lossy(&page[..len])
            .trim_end_matches(['\n', '\0'])
            .to_string(),
    ))
}

/// Out of file descriptors or memory: every later read would fail the same way, so the
/// fields it blanks say nothing about the device.
fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
    ) || e.kind() == io::ErrorKind::OutOfMemory
}

/// Resolve `.` and `..` without touching the file system (`..` at `/` stays at `/`).
pub(crate) fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_resolves_parent_components_lexically() {
        let p = Path::new("/sys/bus/usb/devices/../../../devices/pci0000:00/x");
        assert_eq!(normalize(p), PathBuf::from("/sys/devices/pci0000:00/x"));
    }

    #[test]
    fn running_out_of_descriptors_or_memory_fails_the_pass_but_eio_on_one_file_does_not() {
        let kinds = [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOMEM,
            libc::EIO,
            libc::ENODEV,
        ]
        .map(|errno| is_resource_exhaustion(&io::Error::from_raw_os_error(errno)));

        assert_eq!(kinds, [true, true, true, false, false]);
    }

    #[test]
    fn parse_of_malformed_attribute_warns_with_device_and_attribute() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sys/d")).unwrap();
        std::fs::write(dir.path().join("sys/d/speed"), "fast\n").unwrap();
        let root = SysfsRoot::new(dir.path());
        let mut r = Reader::new(&root);

        let v = r.parse(
            "usb 1-3",
            Path::new("/sys/d"),
            "speed",
            true,
            "a speed",
            |v| v.parse::<f64>().ok(),
        );

        assert_eq!(v, None);
        let (warnings, _) = r.finish();
        assert_eq!(
            warnings,
            vec!["usb 1-3: `speed` is `fast`, not a speed (/sys/d/speed)".to_string()]
        );
    }
}
