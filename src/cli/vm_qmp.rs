//! `usbroute vm qmp`: one raw QMP command on a VM's monitor, through usbroute's own QMP
//! client, for scripts and debugging (what people otherwise do with `socat` and a fixed
//! read window).
//!
//! The exchange ends when the reply carrying our command's `id` arrives, or when the
//! deadline passes, and then says what it waited for. With `--wait`, a socket that does
//! not exist yet or refuses connections is retried until the deadline, so "QEMU is ready"
//! means "QEMU answered a command", not "its socket exists".

use crate::backend::qemu::qmp::{Qmp, QmpError};
use anyhow::{bail, Context};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

/// How often a `--wait` retries a socket that is missing or refuses.
const RETRY_EVERY: Duration = Duration::from_millis(50);

/// Send `command` with `arguments` (a JSON object, or none) and return QEMU's `return`.
/// `deadline` covers connecting, the greeting, capabilities negotiation and the reply.
pub async fn run_command(
    socket: &Path,
    command: &str,
    arguments: Option<Value>,
    deadline: Duration,
    wait: bool,
) -> anyhow::Result<Value> {
    let started = Instant::now();
    let qmp = loop {
        let left = deadline.saturating_sub(started.elapsed());
        match Qmp::connect_with_timeout(socket, left.max(Duration::from_millis(1))).await {
            Ok(qmp) => break qmp,
            Err(QmpError::Connect { .. }) if wait && started.elapsed() < deadline => {
                tokio::time::sleep(RETRY_EVERY).await;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "no QMP session on {} within {:.1} s",
                        socket.display(),
                        deadline.as_secs_f64()
                    )
                })
            }
        }
    };
    let left = deadline.saturating_sub(started.elapsed());
    if left.is_zero() {
        bail!(
            "QMP on {} negotiated but no time was left for `{command}` (deadline {:.1} s)",
            socket.display(),
            deadline.as_secs_f64()
        );
    }
    qmp.with_timeout(left)
        .execute(command, arguments)
        .await
        .with_context(|| format!("VM {}", socket.display()))
}

/// Parse `--arguments`: a JSON object (QMP's `arguments` must be one).
pub fn parse_arguments(text: Option<&str>) -> anyhow::Result<Option<Value>> {
    let Some(text) = text else { return Ok(None) };
    let value: Value = serde_json::from_str(text)
        .with_context(|| format!("the QMP arguments are not JSON: {text}"))?;
    if !value.is_object() {
        bail!("the QMP arguments must be a JSON object like '{{\"path\": \"/machine\"}}', not {value}");
    }
    Ok(Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_arguments_takes_an_object() {
        let args = parse_arguments(Some(r#"{"path": "/machine"}"#)).unwrap();

        assert_eq!(args, Some(serde_json::json!({"path": "/machine"})));
    }

    #[test]
    fn parse_arguments_refuses_a_non_object_and_says_what_it_wants() {
        let err = parse_arguments(Some("[1]")).unwrap_err();

        assert!(
            format!("{err:#}").contains("must be a JSON object"),
            "{err:#}"
        );
    }

    #[test]
    fn run_command_on_a_missing_socket_with_wait_retries_until_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("absent.qmp");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let started = Instant::now();

        let err = runtime
            .block_on(run_command(
                &socket,
                "query-status",
                None,
                Duration::from_millis(300),
                true,
            ))
            .unwrap_err();

        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(format!("{err:#}").contains("within 0.3 s"), "{err:#}");
    }
}
