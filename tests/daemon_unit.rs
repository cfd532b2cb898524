//! The systemd unit in contrib/ is checked by systemd's own tools: `systemd-analyze verify`
//! accepts it, and `systemd-analyze security` rates its sandbox as OK (exposure below 4).

use std::process::Command;

/// The unit with ExecStart pointing at the binary under test (verify wants it to exist).
fn unit_under_test(dir: &std::path::Path) -> std::path::PathBuf {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/usbroute.service"
    ))
    .unwrap();
    let path = dir.join("usbroute.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/usbroute", env!("CARGO_BIN_EXE_usbroute")),
    )
    .unwrap();
    path
}

fn systemd_analyze(args: &[&str], unit: &std::path::Path) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .arg(unit)
        .output()
        .expect("systemd-analyze (apt-get install systemd)")
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_under_test(dir.path());

    let out = systemd_analyze(&["verify"], &unit);

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}

#[test]
fn unit_sandbox_exposure_is_below_four() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_under_test(dir.path());

    let out = systemd_analyze(&["security", "--offline=yes", "--threshold=40"], &unit);

    // --threshold=40 makes the command fail when the exposure is above 4.0.
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
