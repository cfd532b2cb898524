//! The toggle line protocol: pure parsing and reply formatting.
//!
//! One command per line (LF, CRLF also fine), ASCII, at most [`MAX_LINE`] bytes:
//!
//! | line | does |
//! |---|---|
//! | `toggle` | flip between the two profiles of `[routing] toggle` |
//! | `host` / `guest` | the profile of that name, else the first / second `toggle` profile |
//! | `NAME` | apply profile NAME |
//! | `status` | report the active profile |
//! | `auth SECRET` | unlock a listener that has a secret |
//!
//! Replies are one line: `ok PROFILE 0xMASK` or `err REASON`. Keywords are
//! case-insensitive (PowerShell users type `Toggle`); profile names are exact.

use std::fmt;

/// Longest accepted line, without its newline.
pub const MAX_LINE: usize = 128;

/// Longest profile name.
pub const MAX_PROFILE_NAME: usize = 64;

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Flip between the two toggle profiles.
    Toggle,
    /// The host profile.
    Host,
    /// The guest profile.
    Guest,
    /// Report the active profile.
    Status,
    /// Apply a named profile.
    Profile(String),
    /// Present the shared secret.
    Auth(String),
}

/// Why a line is not a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Longer than [`MAX_LINE`].
    #[error("line too long (at most {MAX_LINE} bytes)")]
    TooLong,
    /// Not printable ASCII.
    #[error("not a text command (printable ASCII only)")]
    NotText,
    /// A word that cannot be a profile name.
    #[error("`{0}` is not a command or a profile name (letters, digits, - _ .)")]
    BadName(String),
    /// `auth` without a secret, or other malformed arguments.
    #[error("usage: {0}")]
    Usage(&'static str),
}

/// Parse one line (without or with its `\n` / `\r\n`). `Ok(None)` for a blank line,
/// which clients send as keep-alives and is simply ignored.
pub fn parse_line(line: &[u8]) -> Result<Option<Request>, ParseError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > MAX_LINE {
        return Err(ParseError::TooLong);
    }
    if !line
        .iter()
        .all(|b| b.is_ascii_graphic() || *b == b' ' || *b == b'\t')
    {
        return Err(ParseError::NotText);
    }
    let text = std::str::from_utf8(line).map_err(|_| ParseError::NotText)?;
    let mut words = text.split_ascii_whitespace();
    let Some(first) = words.next() else {
        return Ok(None);
    };
    let rest: Vec<&str> = words.collect();
    let keyword = first.to_ascii_lowercase();
    let no_args = |r: Request, usage| {
        if rest.is_empty() {
            Ok(Some(r))
        } else {
            Err(ParseError::Usage(usage))
        }
    };
    match keyword.as_str() {
        "toggle" => no_args(Request::Toggle, "toggle"),
        "host" => no_args(Request::Host, "host"),
        "guest" => no_args(Request::Guest, "guest"),
        "status" => no_args(Request::Status, "status"),
        "auth" => match rest.as_slice() {
            [secret] => Ok(Some(Request::Auth((*secret).to_string()))),
            _ => Err(ParseError::Usage("auth SECRET")),
        },
        _ if rest.is_empty() && is_profile_name(first) => {
            Ok(Some(Request::Profile(first.to_string())))
        }
        _ if rest.is_empty() => Err(ParseError::BadName(first.to_string())),
        _ => Err(ParseError::Usage(
            "toggle | host | guest | status | PROFILE",
        )),
    }
}

/// Letters, digits, `-`, `_`, `.`; at most [`MAX_PROFILE_NAME`] bytes.
pub fn is_profile_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_PROFILE_NAME
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// One reply line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `ok PROFILE 0xMASK` (`-` when the routing matches no profile).
    Ok {
        /// The active profile.
        profile: Option<String>,
        /// XUSB2PR.
        mask: u16,
    },
    /// `ok auth`.
    Authenticated,
    /// `err REASON`.
    Err(String),
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Ok { profile, mask } => {
                write!(f, "ok {} 0x{mask:04x}", profile.as_deref().unwrap_or("-"))
            }
            Reply::Authenticated => f.write_str("ok auth"),
            // A reason is one line whatever it contains.
            Reply::Err(reason) => write!(f, "err {}", reason.replace(['\r', '\n'], " ")),
        }
    }
}

impl Reply {
    /// Parse a reply line (for the `usbroute toggle` client).
    pub fn parse(line: &str) -> Option<Reply> {
        let line = line.trim_end_matches(['\r', '\n']);
        if let Some(reason) = line.strip_prefix("err ") {
            return Some(Reply::Err(reason.to_string()));
        }
        let rest = line.strip_prefix("ok ")?;
        if rest == "auth" {
            return Some(Reply::Authenticated);
        }
        let (profile, mask) = rest.split_once(' ')?;
        let mask = u16::from_str_radix(mask.strip_prefix("0x")?, 16).ok()?;
        Some(Reply::Ok {
            profile: (profile != "-").then(|| profile.to_string()),
            mask,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_and_case_of_keywords_are_accepted() {
        assert_eq!(parse_line(b"Toggle\r\n"), Ok(Some(Request::Toggle)));
        assert_eq!(parse_line(b"  status \n"), Ok(Some(Request::Status)));
    }

    #[test]
    fn profile_names_keep_their_case() {
        assert_eq!(
            parse_line(b"Gaming\n"),
            Ok(Some(Request::Profile("Gaming".into())))
        );
    }

    #[test]
    fn blank_line_is_ignored() {
        assert_eq!(parse_line(b"\r\n"), Ok(None));
    }

    #[test]
    fn binary_is_not_text() {
        assert_eq!(parse_line(b"tog\x00gle\n"), Err(ParseError::NotText));
        assert_eq!(parse_line("héllo".as_bytes()), Err(ParseError::NotText));
    }

    #[test]
    fn overlong_line_is_refused() {
        assert_eq!(parse_line(&[b'a'; MAX_LINE + 1]), Err(ParseError::TooLong));
    }

    #[test]
    fn extra_words_are_a_usage_error() {
        assert_eq!(
            parse_line(b"toggle now\n"),
            Err(ParseError::Usage("toggle"))
        );
        assert_eq!(parse_line(b"auth\n"), Err(ParseError::Usage("auth SECRET")));
    }

    #[test]
    fn reply_round_trips() {
        let replies = [
            Reply::Ok {
                profile: Some("guest".into()),
                mask: 0x3fc3,
            },
            Reply::Ok {
                profile: None,
                mask: 0,
            },
            Reply::Authenticated,
            Reply::Err("no profile `x`".into()),
        ];
        for r in replies {
            assert_eq!(Reply::parse(&r.to_string()), Some(r));
        }
    }
}
