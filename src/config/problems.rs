//! What every section shares: a problem at a place (`file:line:column`), a problem at a
//! key for owners that see plain data, and the report that collects them all at once.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A problem a section's owner found, at a key: a path of table keys. An element of an
/// array of tables is named by its `name` (`["vm", "win11", "serial"]`), or, for arrays
/// whose elements have no name, by its position from 1 (`["controller", "#2"]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyProblem {
    /// Where.
    pub key: Vec<String>,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl KeyProblem {
    /// A problem at `key`, given as string slices.
    pub fn at(key: &[&str], message: String) -> Self {
        Self {
            key: key.iter().map(|k| k.to_string()).collect(),
            message,
        }
    }
}

/// Everything wrong with a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read the config file; check the path (--config FILE) and that this user may read it", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is not a valid config; every problem is listed.
    #[error("{}", Problems(problems))]
    Invalid {
        /// Each problem with its place.
        problems: Vec<Problem>,
    },
}

/// One problem in a config file, at a place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file (or `<config>` for text without a file).
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

struct Problems<'a>(&'a [Problem]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.0.iter().map(Problem::to_string).collect();
        f.write_str(&lines.join("\n"))
    }
}

/// The problems found in one text so far, each placed at its line and column.
pub(super) struct Report<'a> {
    text: &'a str,
    file: String,
    problems: Vec<Problem>,
}

impl<'a> Report<'a> {
    /// An empty report on `text`; `origin` names the file in messages.
    pub(super) fn new(text: &'a str, origin: Option<&Path>) -> Self {
        Self {
            text,
            file: origin.map_or("<config>".into(), |p| p.display().to_string()),
            problems: vec![],
        }
    }

    /// A problem at a byte span of the text (its start is the place).
    pub(super) fn at(&mut self, span: Range<usize>, message: String) {
        let (line, column) = line_column(self.text, span.start);
        self.problems.push(Problem {
            file: self.file.clone(),
            line,
            column,
            message,
        });
    }

    /// A problem an owner found at a key.
    pub(super) fn at_key(&mut self, problem: KeyProblem) {
        let span = key_span(self.text, &problem.key);
        self.at(span, problem.message);
    }

    /// The 1-based line of a byte offset.
    pub(super) fn line(&self, offset: usize) -> usize {
        line_column(self.text, offset).0
    }

    /// `value` when nothing was found, else every problem.
    pub(super) fn finish<T>(self, value: T) -> Result<T, ConfigError> {
        match self.problems.is_empty() {
            true => Ok(value),
            false => Err(self.into_error()),
        }
    }

    /// Every problem found, as the error.
    pub(super) fn into_error(self) -> ConfigError {
        ConfigError::Invalid {
            problems: self.problems,
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// A file that is not UTF-8: where the first bad byte is.
pub(super) fn not_utf8(path: &Path, bytes: &[u8], valid_up_to: usize) -> ConfigError {
    let text = std::str::from_utf8(&bytes[..valid_up_to]).unwrap_or_default();
    let (line, column) = line_column(text, valid_up_to);
    let byte = bytes.get(valid_up_to).copied().unwrap_or_default();
    ConfigError::Invalid {
        problems: vec![Problem {
            file: path.display().to_string(),
            line,
            column,
            message: format!(
                "byte {valid_up_to} (0x{byte:02x}) is not UTF-8 text; save the file as UTF-8"
            ),
        }],
    }
}

/// A step in [`key_span`]'s walk.
enum At<'a> {
    Table(&'a toml_edit::Table),
    Tables(&'a toml_edit::ArrayOfTables),
}

/// The element of an array of tables that a key part names: the one whose `name` is the
/// part, else, for a part `#N`, the N-th (from 1).
fn element<'a>(tables: &'a toml_edit::ArrayOfTables, part: &str) -> Option<&'a toml_edit::Table> {
    let named = tables
        .iter()
        .find(|t| t.get("name").and_then(toml_edit::Item::as_str) == Some(part));
    let position = || {
        let n: usize = part.strip_prefix('#')?.parse().ok()?;
        tables.get(n.checked_sub(1)?)
    };
    named.or_else(position)
}

/// Where `key` is in the file: the deepest part of it that exists (a missing key is
/// reported at its table), else the start of the file.
fn key_span(text: &str, key: &[String]) -> Range<usize> {
    use toml_edit::Item;
    let Ok(doc) = toml_edit::ImDocument::parse(text) else {
        return 0..0;
    };
    let mut found = 0..0;
    let mut at = At::Table(doc.as_table());
    for part in key {
        let (span, next) = match at {
            At::Table(t) => match t.get_key_value(part) {
                Some((k, Item::Table(inner))) => (k.span(), At::Table(inner)),
                Some((k, Item::ArrayOfTables(a))) => (k.span(), At::Tables(a)),
                Some((k, _)) => {
                    found = k.span().unwrap_or(found);
                    break;
                }
                None => break,
            },
            At::Tables(a) => match element(a, part) {
                Some(t) => (t.span(), At::Table(t)),
                None => break,
            },
        };
        found = span.unwrap_or(found);
        at = next;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(text: &str, key: &[&str]) -> (usize, usize) {
        let key: Vec<String> = key.iter().map(|k| k.to_string()).collect();
        line_column(text, key_span(text, &key).start)
    }

    #[test]
    fn a_key_inside_a_named_element_is_found_by_the_elements_name() {
        let text = "[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\nserial = \"/s\"\n";

        assert_eq!(place(text, &["vm", "b", "serial"]), (5, 1));
    }

    #[test]
    fn an_element_without_a_name_is_found_by_its_position_from_one() {
        let text =
            "[[controller]]\npci = \"0000:00:14.0\"\n\n[[controller]]\npci = \"0000:00:1d.0\"\n";

        assert_eq!(place(text, &["controller", "#2"]), (4, 1));
    }

    #[test]
    fn a_missing_key_is_placed_at_the_deepest_part_that_exists() {
        let text = "x = 1\n[toggle]\nlisten = \"a\"\n";

        assert_eq!(place(text, &["toggle", "secret"]), (2, 2));
    }
}
