//! `xl usbdev-attach` and `xl usbdev-detach`, run as programs with argument vectors (never
//! a shell). libxl does the real work of an attach (it checks the device is not assigned,
//! unbinds the host drivers, writes the port node, tells QEMU), which no xenstore write can
//! stand in for. xl prints nothing on success; on failure its stderr (bounded) is the
//! reason, passed on whole.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// The `xl` run unless told otherwise (found on `PATH`, as dom0 has it).
pub const DEFAULT_XL: &str = "xl";
/// How long one xl call may take (attach takes ~1 s on a TCG test bed, detach less).
pub const DEFAULT_XL_TIMEOUT: Duration = Duration::from_secs(60);
/// The most of xl's stderr kept for a message.
pub const MAX_STDERR: usize = 4096;

/// How to run xl.
#[derive(Debug, Clone)]
pub struct Xl {
    /// The program.
    pub program: PathBuf,
    /// How long a call may take before it is killed.
    pub timeout: Duration,
}

impl Default for Xl {
    fn default() -> Self {
        Xl {
            program: DEFAULT_XL.into(),
            timeout: DEFAULT_XL_TIMEOUT,
        }
    }
}

/// An xl call that failed.
#[derive(Debug, thiserror::Error)]
pub enum XlError {
    /// It could not be started.
    #[error("cannot run `{}`: is xl (xen-utils) installed in dom0?", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It exited with an error.
    #[error("`xl {args}` failed ({status}): {stderr}")]
    Failed {
        /// Its arguments, for the message.
        args: String,
        /// How it exited.
        status: String,
        /// What it printed on stderr (bounded, trimmed).
        stderr: String,
    },
    /// It ran too long and was killed.
    #[error("`xl {args}` did not finish within {seconds:.0} s and was killed")]
    Timeout {
        /// Its arguments.
        args: String,
        /// How long it had.
        seconds: f64,
    },
}

/// The arguments of attaching host device `bus`:`address` to port `port` of controller
/// `ctrl` of domain `domid`. Decimal: xl reads these with `strtoul(.., 0)`, where a
/// leading zero would mean octal.
pub fn attach_args(domid: u32, bus: u8, address: u16, ctrl: u32, port: u8) -> Vec<String> {
    vec![
        "usbdev-attach".into(),
        domid.to_string(),
        format!("hostbus={bus}"),
        format!("hostaddr={address}"),
        format!("controller={ctrl}"),
        format!("port={port}"),
    ]
}

/// The arguments of detaching port `port` of controller `ctrl` of domain `domid`.
pub fn detach_args(domid: u32, ctrl: u32, port: u8) -> Vec<String> {
    vec![
        "usbdev-detach".into(),
        domid.to_string(),
        ctrl.to_string(),
        port.to_string(),
    ]
}

impl Xl {
    /// Run xl with `args`; `Ok` when it exits 0.
    pub async fn run(&self, args: &[String]) -> Result<(), XlError> {
        let shown = args.join(" ");
        let mut child = tokio::process::Command::new(&self.program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| XlError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        let stderr = child.stderr.take();
        let finished = async {
            let mut kept = Vec::new();
            if let Some(mut stderr) = stderr {
                // Read to the end (xl must not block on a full pipe), keep the first part.
                let mut chunk = [0u8; 1024];
                while let Ok(n @ 1..) = stderr.read(&mut chunk).await {
                    let room = MAX_STDERR.saturating_sub(kept.len());
                    kept.extend_from_slice(&chunk[..n.min(room)]);
                }
            }
            (child.wait().await, kept)
        };
        let (status, stderr) =
            tokio::time::timeout(self.timeout, finished)
                .await
                .map_err(|_| XlError::Timeout {
                    args: shown.clone(),
                    seconds: self.timeout.as_secs_f64(),
                })?;
        let status = status.map_err(|source| XlError::Spawn {
            program: self.program.clone(),
            source,
        })?;
        if status.success() {
            return Ok(());
        }
        Err(XlError::Failed {
            args: shown,
            status: status.to_string(),
            stderr: String::from_utf8_lossy(&stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_names_domain_device_controller_and_port_in_decimal() {
        assert_eq!(
            attach_args(3, 1, 10, 0, 8).join(" "),
            "usbdev-attach 3 hostbus=1 hostaddr=10 controller=0 port=8"
        );
        assert_eq!(detach_args(3, 0, 8).join(" "), "usbdev-detach 3 0 8");
    }

    /// A real program (`sh -c`, its script fixed here, never built from device strings)
    /// stands in for xl's exit status and stderr.
    fn sh(script: &str) -> (Xl, Vec<String>) {
        let xl = Xl {
            program: "sh".into(),
            timeout: Duration::from_secs(30),
        };
        (xl, vec!["-c".into(), script.into()])
    }

    #[tokio::test]
    async fn a_failure_carries_xls_stderr() {
        let (xl, args) = sh("echo 'Unknown device at controller 0 port 1.' >&2; exit 1");

        let err = xl.run(&args).await.unwrap_err();

        assert!(
            err.to_string()
                .ends_with("exit status: 1): Unknown device at controller 0 port 1."),
            "{err}"
        );
    }

    #[tokio::test]
    async fn stderr_is_kept_to_its_bound_and_the_rest_drained() {
        let (xl, args) = sh("head -c 1000000 /dev/zero | tr '\\0' x >&2; exit 2");

        let Err(XlError::Failed { stderr, .. }) = xl.run(&args).await else {
            panic!("xl should have failed");
        };

        assert_eq!(stderr.len(), MAX_STDERR);
    }

    #[tokio::test]
    async fn a_missing_xl_says_so() {
        let xl = Xl {
            program: "/nonexistent/xl".into(),
            timeout: Duration::from_secs(5),
        };

        let err = xl.run(&detach_args(1, 0, 1)).await.unwrap_err();

        assert!(matches!(err, XlError::Spawn { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_hung_xl_is_killed_at_its_timeout() {
        let (mut xl, args) = sh("exec sleep 30");
        xl.timeout = Duration::from_millis(300);

        let err = xl.run(&args).await.unwrap_err();

        assert!(matches!(err, XlError::Timeout { .. }), "{err}");
    }
}
