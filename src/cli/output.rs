//! Printing: JSON, error chains.

use serde::Serialize;

/// Print a value as pretty JSON on stdout.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// The whole error chain on one line: `outer: cause: root cause`, each cause once.
///
/// Some messages quote their source to put the fix after it ("cannot reach the daemon
/// at S: No such file or directory; is `usbroute serve` running?"); a cause the line
/// already holds is not printed again.
pub fn error_chain(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot reach the daemon at /run/x.sock: {source}; is it running?")]
    struct Quoting {
        source: std::io::Error,
    }

    #[test]
    fn error_chain_prints_a_quoted_source_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = anyhow::Error::new(Quoting { source: io }).context("usbroute status");

        let line = error_chain(&err);

        assert_eq!(
            line,
            "usbroute status: cannot reach the daemon at /run/x.sock: no such file; is it running?"
        );
    }

    #[test]
    fn error_chain_joins_distinct_causes() {
        let err = anyhow::anyhow!("root cause")
            .context("middle")
            .context("outer");

        assert_eq!(error_chain(&err), "outer: middle: root cause");
    }
}
