//! The fuzz targets' committed seed corpora, replayed under `cargo test` through the same
//! entry points the libFuzzer targets call (src/fuzzing.rs): every recorded QMP session,
//! uevent, config, mountinfo... keeps passing every target's checks without the fuzz
//! build. A crash the fuzzer finds is fixed with its input added to the seeds, so it
//! stays a regression test here too. docs/fuzzing.md.

use std::path::{Path, PathBuf};
use usbroute::fuzzing::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn seeds_of(target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join("seeds").join(target);
    let mut seeds: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a readable seeds directory").path())
        .collect();
    seeds.sort();
    seeds
}

#[test]
fn every_seed_passes_its_target() {
    for (target, run) in TARGETS {
        for seed in seeds_of(target) {
            let data = std::fs::read(&seed).expect("a readable seed");
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target} fails on {}", seed.display());
        }
    }
}

#[test]
fn every_target_has_seeds() {
    for (target, _) in TARGETS {
        assert!(
            seeds_of(target).len() >= 3,
            "fuzz/seeds/{target} needs seeds"
        );
    }
}

#[test]
fn every_fuzz_target_file_has_an_entry_point_and_back() {
    let mut files: Vec<String> = std::fs::read_dir(fuzz_dir().join("fuzz_targets"))
        .expect("fuzz/fuzz_targets")
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    files.sort();
    let mut expected: Vec<String> = TARGETS.iter().map(|(t, _)| format!("{t}.rs")).collect();
    expected.sort();

    assert_eq!(files, expected);
}

#[test]
fn seed_corpora_stay_small() {
    let total: u64 = TARGETS
        .iter()
        .flat_map(|(target, _)| seeds_of(target))
        .map(|seed| std::fs::metadata(seed).expect("a seed").len())
        .sum();

    assert!(
        total <= 400 * 1024,
        "{total} bytes of seeds: minimise them (docs/fuzzing.md)"
    );
}
