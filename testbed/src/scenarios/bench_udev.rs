//! The `bench` scenario's udev_socat method: a udev rule's scripts written the hobbyist
//! way (a shell, the numbers from udev's environment, QMP piped into a fresh socat per
//! event), which `bench.rs` installs for its turn.

use crate::bed::Bed;
use crate::inner::InnerQemu;
use anyhow::Result;

/// The udev rule's scripts, the hobbyist way: a shell, the numbers from udev's
/// environment, QMP piped into a fresh socat per event.
pub(super) async fn write_udev_scripts(bed: &mut Bed, inner: &InnerQemu) -> Result<()> {
    let mut install = String::new();
    for (what, command, args) in UDEV_COMMANDS {
        let body = udev_script(command, args, &inner.qmp);
        install.push_str(&format!(
            "cat > /tmp/bench-{what}.sh <<'EOF'\n{body}EOF\nchmod +x /tmp/bench-{what}.sh\n"
        ));
    }
    bed.guest_ok(&install).await?;
    Ok(())
}

/// Each udev script's name, its QMP command and what fills the command's `%s`s.
const UDEV_COMMANDS: [(&str, &str, &str); 2] = [
    (
        "attach",
        r#"{"execute":"device_add","arguments":{"driver":"usb-host","bus":"xhci.0","hostbus":%s,"hostaddr":%s,"id":"udev-%s-%s"}}"#,
        "$bus $dev $bus $dev",
    ),
    (
        "detach",
        r#"{"execute":"device_del","arguments":{"id":"udev-%s-%s"}}"#,
        "$bus $dev",
    ),
];

/// One udev script: udev runs it with the device's properties as its environment
/// (no PATH of its own), BUSNUM and DEVNUM zero-padded, which JSON does not take.
fn udev_script(command: &str, args: &str, qmp: &str) -> String {
    format!(
        "#!/bin/sh\nPATH=${{PATH:+$PATH:}}/bin:/usr/bin\n\
         bus=$(expr \"$BUSNUM\" + 0); dev=$(expr \"$DEVNUM\" + 0)\n\
         printf '{{\"execute\":\"qmp_capabilities\"}}\\n{command}\\n' {args} | \
         socat -t 2 - UNIX-CONNECT:{qmp} >>/tmp/bench-udev.log 2>&1\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn the_udev_attach_script_sends_qemu_json_with_the_numbers_unpadded() {
        // The real sh runs the script with a stand-in socat that saves what it is fed.
        let dir = std::env::temp_dir().join(format!("bench-udev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fed = dir.join("fed");
        let stub = dir.join("socat");
        std::fs::write(&stub, format!("#!/bin/sh\ncat > {}\n", fed.display())).unwrap();
        std::process::Command::new("chmod")
            .arg("+x")
            .arg(&stub)
            .status()
            .unwrap();
        let (_, command, args) = UDEV_COMMANDS[0];

        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(udev_script(command, args, "/tmp/inner.qmp"))
            .env("PATH", format!("{}:/usr/bin:/bin", dir.display()))
            .env("BUSNUM", "001")
            .env("DEVNUM", "012")
            .status()
            .unwrap();

        assert!(status.success());
        let sent = std::fs::read_to_string(&fed).unwrap();
        let lines: Vec<Value> = sent
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(lines[0]["execute"], "qmp_capabilities");
        let args = &lines[1]["arguments"];
        assert_eq!(
            (&args["hostbus"], &args["hostaddr"], &args["id"]),
            (&json!(1), &json!(12), &json!("udev-1-12"))
        );
    }
}
