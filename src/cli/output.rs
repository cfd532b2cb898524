//! Printing: JSON, error chains.

use serde::Serialize;

/// Print a value as pretty JSON on stdout.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// The whole error chain on one line: `outer: cause: root cause`, each cause once
/// (the library's one printer, [`crate::error_chain::one_line`]).
pub fn error_chain(err: &anyhow::Error) -> String {
    crate::error_chain::one_line(err.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot reach the daemon at /run/x.sock; is it running?")]
    struct Unreachable {
        source: std::io::Error,
    }

    #[test]
    fn error_chain_prints_a_source_after_the_message_that_leaves_it_out() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = anyhow::Error::new(Unreachable { source: io }).context("usbroute status");

        let line = error_chain(&err);

        assert_eq!(
            line,
            "usbroute status: cannot reach the daemon at /run/x.sock; is it running?: no such file"
        );
    }

    #[test]
    fn error_chain_prints_a_cause_whose_text_the_outer_message_contains() {
        let err = anyhow::anyhow!("permission denied")
            .context("/dev/bus/usb/001/004: permission denied by the udev rule");

        assert_eq!(
            error_chain(&err),
            "/dev/bus/usb/001/004: permission denied by the udev rule: permission denied"
        );
    }

    #[test]
    fn error_chain_prints_each_of_three_distinct_causes_once() {
        let err = anyhow::anyhow!("root cause")
            .context("middle")
            .context("outer");

        assert_eq!(error_chain(&err), "outer: middle: root cause");
    }
}
