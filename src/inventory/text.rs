//! Strings a device chooses for itself (`product`, `manufacturer`, `serial`) and other
//! text read from outside, made safe to keep and to show. A device may claim any bytes:
//! ESC sequences that clear or retitle a terminal, BEL, CR that overprints a line,
//! bidirectional overrides that reorder what a reader sees.

use std::borrow::Cow;
use std::fmt::Write;

/// The most characters of a device string kept when it is read. A USB string
/// descriptor holds at most 126 UTF-16 units, so a real device never reaches it; a
/// crafted recording or a fake device cannot make the daemon carry more.
pub const MAX_KEPT: usize = 256;

/// The most characters of a device string a human output shows.
pub const MAX_SHOWN: usize = 128;

/// What a cut string ends with.
const CUT: char = '…';

/// `s` cut to at most `max` characters, the last of them `…` when anything was cut.
pub fn capped(s: &str, max: usize) -> Cow<'_, str> {
    match s.char_indices().nth(max) {
        None => Cow::Borrowed(s),
        Some(_) => {
            let keep = s
                .char_indices()
                .nth(max.saturating_sub(1))
                .map_or(s.len(), |(i, _)| i);
            Cow::Owned(format!("{}{CUT}", &s[..keep]))
        }
    }
}

/// `s` as a terminal may show it: [`escaped`], cut to [`MAX_SHOWN`] characters. For
/// the strings a device chose (`product`, `manufacturer`, `serial`).
pub fn printable(s: &str) -> Cow<'_, str> {
    match capped(s, MAX_SHOWN) {
        Cow::Borrowed(s) => escaped(s),
        Cow::Owned(s) => Cow::Owned(escaped(&s).into_owned()),
    }
}

/// `s` with control characters (C0, DEL, C1) and invisible or reordering format
/// characters (bidi overrides and isolates, zero-width marks, BOM, line separators)
/// written as escapes such as `\u{1b}`. Text without them comes back borrowed.
pub fn escaped(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) {
            let _ = write!(out, "{}", c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Every line of a human output [`escaped`], its line ends kept: the last guard for
/// text assembled from many sources (driver names, paths, names in a recording).
pub fn escaped_lines(text: &str) -> String {
    text.split('\n').map(escaped).collect::<Vec<_>>().join("\n")
}

/// Characters that change how the rest of a terminal line looks, or that a reader
/// cannot see.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2069}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_terminal_controls_and_bidi_overrides() {
        let hostile = "Mouse\u{1b}[2J\u{7}\rEvil\u{202e}gpj.exe\u{9b}";

        let shown = printable(hostile);

        assert_eq!(
            shown,
            "Mouse\\u{1b}[2J\\u{7}\\u{d}Evil\\u{202e}gpj.exe\\u{9b}"
        );
    }

    #[test]
    fn printable_leaves_ordinary_text_alone() {
        let name = "Logitech Ünifying Receiver 日本";

        assert!(matches!(printable(name), Cow::Borrowed(n) if n == name));
    }

    #[test]
    fn capped_cuts_on_a_character_boundary_and_marks_the_cut() {
        let long = "é".repeat(300);

        let shown = capped(&long, MAX_SHOWN);

        assert_eq!(shown.chars().count(), MAX_SHOWN);
        assert!(shown.ends_with('…'));
        assert_eq!(capped("short", MAX_SHOWN), "short");
        assert_eq!(capped(&"x".repeat(MAX_SHOWN), MAX_SHOWN).len(), MAX_SHOWN);
    }
}
