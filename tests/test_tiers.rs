//! The quick tier stays quick: plain `cargo test` runs as any user without QEMU, so every
//! test file that starts a real QEMU or needs root must be in the real tier (a `[[test]]`
//! entry in Cargo.toml with `required-features = ["real-tests"]`, run by `scripts/test`).
//! See docs/architecture.md, "Tests".

use std::collections::BTreeSet;
use std::path::Path;

/// What marks a test file as needing the real tier: the real-QEMU helpers, a QEMU started
/// directly, or a check for root.
const REAL_TIER_MARKERS: [&str; 3] = ["mod qemu_support", "qemu-system", "is_root()"];

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The `[[test]]` targets Cargo.toml puts behind the `real-tests` feature.
fn real_tier() -> BTreeSet<String> {
    let text = std::fs::read_to_string(manifest_dir().join("Cargo.toml")).expect("Cargo.toml");
    let manifest: toml::Value = text.parse().expect("Cargo.toml is TOML");
    let tests = manifest.get("test").and_then(|t| t.as_array());
    tests
        .into_iter()
        .flatten()
        .filter(|t| {
            t.get("required-features")
                .and_then(|f| f.as_array())
                .is_some_and(|f| f.iter().any(|f| f.as_str() == Some("real-tests")))
        })
        .map(|t| t["name"].as_str().expect("[[test]] name").to_string())
        .collect()
}

/// Every `tests/NAME.rs`, by NAME, with its text.
fn test_files() -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(manifest_dir().join("tests"))
        .expect("tests/")
        .map(|entry| entry.expect("tests/ entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "rs"))
        .map(|path| {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&path).expect("test file"))
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_test_file_that_starts_qemu_or_needs_root_is_in_the_real_tier() {
    let real = real_tier();

    let unlisted: Vec<String> = test_files()
        .into_iter()
        // This file names the markers itself.
        .filter(|(name, _)| name != "test_tiers")
        .filter(|(_, text)| REAL_TIER_MARKERS.iter().any(|m| text.contains(m)))
        .map(|(name, _)| name)
        .filter(|name| !real.contains(name))
        .collect();

    assert!(
        unlisted.is_empty(),
        "these test files start QEMU or need root, so plain `cargo test` (the quick tier, any \
         user, no QEMU) would fail on them: {unlisted:?}; add a [[test]] entry with \
         required-features = [\"real-tests\"] to Cargo.toml for each"
    );
}

#[test]
fn every_real_tier_entry_names_an_existing_test_file() {
    let names: BTreeSet<String> = test_files().into_iter().map(|(name, _)| name).collect();

    let missing: Vec<String> = real_tier().difference(&names).cloned().collect();

    assert!(
        missing.is_empty(),
        "Cargo.toml puts {missing:?} in the real tier, but tests/ has no such file; remove \
         the [[test]] entry or fix its name"
    );
}
