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

/// The words of the non-comment lines of `scripts/test` that run `cargo test`.
fn scripts_test_cargo_test_lines() -> Vec<Vec<String>> {
    let script =
        std::fs::read_to_string(manifest_dir().join("scripts/test")).expect("scripts/test");
    script
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("cargo test"))
        .map(|line| line.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// The features a `cargo test` command line turns on.
fn features_of(words: &[String]) -> BTreeSet<String> {
    let mut features = BTreeSet::new();
    for (i, word) in words.iter().enumerate() {
        let list = match word.strip_prefix("--features=") {
            Some(list) => Some(list),
            None if word == "--features" || word == "-F" => words.get(i + 1).map(String::as_str),
            None => None,
        };
        features.extend(
            list.into_iter()
                .flat_map(|l| l.split(','))
                .map(str::to_string),
        );
    }
    features
}

/// The line every `cargo test` prints says where the full suite is: `scripts/test` runs
/// `cargo test` over every target with the features every real-tier entry requires, so
/// nothing the quick tier leaves out is left out of the full suite too.
#[test]
fn the_full_suite_with_qemu_and_root_is_scripts_test() {
    let lines = scripts_test_cargo_test_lines();
    let full = lines.iter().find(|words| {
        let narrowed = [
            "--test",
            "--lib",
            "--bins",
            "--bin",
            "--no-run",
            "--exclude",
        ];
        words.iter().any(|w| w == "--all-targets")
            && !words.iter().any(|w| narrowed.contains(&w.as_str()))
    });
    let Some(full) = full else {
        panic!(
            "scripts/test must run `cargo test --workspace --all-targets --features real-tests`; \
             its cargo test lines are {lines:?}"
        );
    };
    let enabled = features_of(full);
    let text = std::fs::read_to_string(manifest_dir().join("Cargo.toml")).expect("Cargo.toml");
    let manifest: toml::Value = text.parse().expect("Cargo.toml is TOML");
    let entries = manifest
        .get("test")
        .and_then(|t| t.as_array())
        .into_iter()
        .flatten();

    let unreachable: Vec<String> = entries
        .filter(|t| {
            let required = t.get("required-features").and_then(|f| f.as_array());
            required
                .into_iter()
                .flatten()
                .any(|f| !enabled.contains(f.as_str().expect("a feature name")))
        })
        .map(|t| t["name"].as_str().expect("[[test]] name").to_string())
        .collect();
    let readme = std::fs::read_to_string(manifest_dir().join("README.md")).expect("README.md");

    assert!(
        full.iter().any(|w| w == "--workspace"),
        "scripts/test's `cargo test` must cover the workspace (the testbed crate too): {full:?}"
    );
    assert!(
        unreachable.is_empty(),
        "scripts/test runs `cargo test` with features {enabled:?}, so it never runs {unreachable:?}; \
         add their required features to its --features"
    );
    assert!(
        readme.contains("scripts/test") && readme.contains("the_full_suite_with_qemu_and_root_is_scripts_test"),
        "README.md's test section must say that `scripts/test` is the full suite, as this test's name does"
    );
}
