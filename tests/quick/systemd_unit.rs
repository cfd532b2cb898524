//! The systemd unit in contrib/ is checked by systemd's own tools: `systemd-analyze verify`
//! accepts it, and `systemd-analyze security` rates its sandbox no worse than 3.4 (its
//! rating before issue 11 added the state directory, caps and the IP allow list).

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
fn unit_sandbox_exposure_is_no_worse_than_3_4() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_under_test(dir.path());

    let out = systemd_analyze(&["security", "--offline=yes", "--threshold=34"], &unit);

    // --threshold=34 makes the command fail when the exposure is above 3.4.
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The unit's `[Service]` lines, without comments.
fn service_lines() -> Vec<String> {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/usbroute.service"
    ))
    .unwrap();
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

#[test]
fn unit_keeps_state_out_of_the_runtime_directory_and_caps_files_memory_and_addresses() {
    let lines = service_lines();

    for wanted in [
        "StateDirectory=usbroute",
        "LimitNOFILE=4096",
        "IPAddressDeny=any",
        "IPAddressAllow=localhost",
    ] {
        assert!(lines.iter().any(|l| l == wanted), "no {wanted} in the unit");
    }
    assert!(
        lines.iter().any(|l| l.starts_with("MemoryMax=")),
        "no MemoryMax= in the unit"
    );
}

#[test]
fn vfio_pci_which_the_unit_cannot_load_is_loaded_at_boot_by_the_shipped_modules_load_file() {
    let lines = service_lines();
    let modules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/modules-load.d/usbroute.conf"
    ))
    .unwrap();

    assert!(lines.iter().any(|l| l == "ProtectKernelModules=yes"));
    assert!(modules.lines().any(|l| l.trim() == "vfio-pci"), "{modules}");
}
