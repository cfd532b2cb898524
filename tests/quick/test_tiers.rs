//! The quick tier stays quick: plain `cargo test` runs as any user without QEMU, so every
//! test module that starts a real QEMU or needs root must be in a real-tier binary (a
//! `[[test]]` entry in Cargo.toml with `required-features = ["real-tests"]`, run by
//! `scripts/test`). The test binaries are folders (`tests/quick/`, `tests/real_*/`) whose
//! `main.rs` names one module per former test file. See docs/architecture.md, "Tests".

use std::collections::BTreeSet;
use std::path::Path;

/// What marks a test module as needing the real tier: the real-QEMU helpers, a QEMU
/// started directly, or a check for root.
const REAL_TIER_MARKERS: [&str; 3] = ["qemu_support", "qemu-system", "is_root()"];

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

/// One test binary: its name and the text of each of its source files (`main.rs` and the
/// modules it names, or the one `tests/NAME.rs`), by file name.
struct Binary {
    name: String,
    modules: Vec<(String, String)>,
}

/// The modules `main_rs` declares with a plain `mod NAME;` (the helpers come in with a
/// `#[path]` and are shared, so they are not its own).
fn declared_modules(main_rs: &str) -> BTreeSet<String> {
    let mut declared = BTreeSet::new();
    let mut after_path = false;
    for line in main_rs.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("mod ").and_then(|l| l.strip_suffix(';')) {
            if !after_path {
                declared.insert(name.to_string());
            }
        }
        after_path = line.starts_with("#[path");
    }
    declared
}

/// Every test binary cargo builds from tests/.
fn binaries() -> Vec<Binary> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(manifest_dir().join("tests")).expect("tests/") {
        let path = entry.expect("tests/ entry").path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let read = |p: &Path| std::fs::read_to_string(p).expect("test source");
        if path.extension().is_some_and(|e| e == "rs") {
            let modules = vec![(format!("{name}.rs"), read(&path))];
            found.push(Binary { name, modules });
        } else if path.join("main.rs").is_file() {
            let main_rs = read(&path.join("main.rs"));
            let mut modules: Vec<(String, String)> = declared_modules(&main_rs)
                .into_iter()
                .map(|m| (format!("{m}.rs"), read(&path.join(format!("{m}.rs")))))
                .collect();
            modules.push(("main.rs".to_string(), main_rs));
            found.push(Binary { name, modules });
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

#[test]
fn every_test_module_that_starts_qemu_or_needs_root_is_in_a_real_tier_binary() {
    let real = real_tier();

    let misplaced: Vec<String> = binaries()
        .into_iter()
        .filter(|b| !real.contains(&b.name))
        .flat_map(|b| b.modules.into_iter().map(move |m| (b.name.clone(), m)))
        // This file names the markers itself.
        .filter(|(_, (file, _))| file != "test_tiers.rs")
        .filter(|(_, (_, text))| REAL_TIER_MARKERS.iter().any(|m| text.contains(m)))
        .map(|(binary, (file, _))| format!("{binary}: {file}"))
        .collect();

    assert!(
        misplaced.is_empty(),
        "these test modules start QEMU or need root, so plain `cargo test` (the quick tier, \
         any user, no QEMU) would fail on them: {misplaced:?}; move each into a real-tier \
         binary (tests/real_*/, listed in its main.rs), or give its binary a [[test]] entry \
         with required-features = [\"real-tests\"] in Cargo.toml"
    );
}

#[test]
fn every_real_tier_entry_names_an_existing_test_binary() {
    let names: BTreeSet<String> = binaries().into_iter().map(|b| b.name).collect();

    let missing: Vec<String> = real_tier().difference(&names).cloned().collect();

    assert!(
        missing.is_empty(),
        "Cargo.toml puts {missing:?} in the real tier, but tests/ has no such file or folder \
         with a main.rs; remove the [[test]] entry or fix its name"
    );
}

#[test]
fn every_file_in_a_test_binary_folder_is_one_of_its_modules() {
    let mut forgotten = Vec::new();
    for binary in binaries() {
        let folder = manifest_dir().join("tests").join(&binary.name);
        if !folder.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(&folder).expect("test binary folder") {
            let file = entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned();
            let listed = binary.modules.iter().any(|(m, _)| *m == file);
            if file.ends_with(".rs") && !listed {
                forgotten.push(format!("tests/{}/{file}", binary.name));
            }
        }
    }

    assert!(
        forgotten.is_empty(),
        "{forgotten:?} are never compiled, so their tests never run; add `mod NAME;` for each \
         to its folder's main.rs"
    );
}

/// The words of the non-comment lines of `scripts/test` that run `cargo test`.
fn scripts_test_cargo_test_lines() -> Vec<Vec<String>> {
    let script =
        std::fs::read_to_string(manifest_dir().join("scripts/test")).expect("scripts/test");
    // From `cargo test` on: it may run under `timeout`, `if !`, ...; `; then` ends it.
    script
        .lines()
        .map(str::trim_start)
        .filter(|line| !line.starts_with('#') && !line.starts_with("echo"))
        .filter_map(|line| line.find("cargo test").map(|at| &line[at..]))
        .map(|command| command.split(';').next().unwrap_or(command))
        .map(|command| command.split_whitespace().map(str::to_string).collect())
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
