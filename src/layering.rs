//! The layering rule, checked on the source: the pure core (`policy`, `engine`) imports
//! nothing from the edges, and no backend imports the daemon (docs/architecture.md). A
//! test here fails with every offending `crate::` path and its file and line.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `src/<dir>`, sorted.
fn sources(dir: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(dir)];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).expect("source folder") {
            let path = entry.expect("source entry").path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The sub-folders of `src/backend/`: one per hypervisor (`backend::qemu`).
fn backend_folders() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/backend");
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .expect("src/backend")
        .map(|e| e.expect("backend entry").path())
        .filter(|p| p.is_dir())
        .map(|p| format!("backend::{}", p.file_name().unwrap().to_string_lossy()))
        .collect();
    out.sort();
    out
}

/// The full paths a `use` tree names: `a::{b, c::{d}}` is `a::b` and `a::c::d`.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        return vec![tree.to_string()];
    };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let mut items = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items
        .into_iter()
        .filter(|item| !item.trim().is_empty())
        .flat_map(expand)
        .map(|path| format!("{prefix}{path}"))
        .collect()
}

/// The `crate::` tree that starts at `text` (just past `crate::`): a path, or a braced
/// group with what is inside it.
fn tree_at(text: &str) -> &str {
    let mut depth = 0;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 1 => return &text[..=i],
            '}' => depth -= 1,
            c if depth == 0 && !(c.is_alphanumeric() || c == '_' || c == ':') => return &text[..i],
            _ => {}
        }
    }
    text
}

/// Each `crate::` path in `text` (comments left out) that starts with one of
/// `forbidden` (module paths like `toggle` or `backend::qemu`), as `LINE: PATH`.
fn forbidden_paths(text: &str, forbidden: &[String]) -> Vec<String> {
    let code: String = text
        .lines()
        .map(|line| line.find("//").map_or(line, |i| &line[..i]))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let line = code[..at].matches('\n').count() + 1;
        for path in expand(tree_at(&code[at + "crate::".len()..])) {
            let path: String = path.split_whitespace().collect();
            let bad = forbidden
                .iter()
                .any(|f| path == *f || path.starts_with(&format!("{f}::")));
            if bad {
                out.push(format!("{line}: crate::{path}"));
            }
        }
    }
    out
}

/// Every forbidden import under `src/<dir>`, as `src/FILE:LINE: crate::PATH`.
fn offenders(dir: &str, forbidden: &[String]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    sources(dir)
        .into_iter()
        .flat_map(|file| {
            let text = std::fs::read_to_string(&file).expect("source file");
            let name = file
                .strip_prefix(root)
                .unwrap_or(&file)
                .display()
                .to_string();
            forbidden_paths(&text, forbidden)
                .into_iter()
                .map(move |hit| format!("{name}:{hit}"))
        })
        .collect()
}

fn owned(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

#[test]
fn policy_imports_nothing_from_the_config_the_edges_or_a_backend_folder() {
    let mut forbidden = owned(&["toggle", "routing", "vfio", "daemon", "cli", "config"]);
    forbidden.extend(backend_folders());

    let found = offenders("policy", &forbidden);

    assert!(
        found.is_empty(),
        "src/policy is the pure core: it may use selector, inventory and the backend traits, \
         never these:\n{}",
        found.join("\n")
    );
}

#[test]
fn engine_imports_nothing_from_the_daemon_cli_routing_toggle_or_a_backend_folder() {
    let mut forbidden = owned(&["daemon", "cli", "routing", "toggle"]);
    forbidden.extend(backend_folders());

    let found = offenders("engine", &forbidden);

    assert!(
        found.is_empty(),
        "src/engine decides; the edges call it, never the other way:\n{}",
        found.join("\n")
    );
}

#[test]
fn nothing_under_backend_imports_the_daemon() {
    let found = offenders("backend", &owned(&["daemon"]));

    assert!(
        found.is_empty(),
        "a backend is driven by the daemon and must not reach back into it:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_capabilities_the_daemon_runs_do_not_import_the_daemon_or_the_cli() {
    let found: Vec<String> = ["toggle", "routing", "vfio", "events", "inventory"]
        .iter()
        .flat_map(|dir| offenders(dir, &owned(&["daemon", "cli"])))
        .collect();

    assert!(
        found.is_empty(),
        "the daemon and the CLI drive these capabilities, which must not reach back into \
         them (shared plumbing such as unix_socket lives at the top):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_layering_check_sees_paths_groups_and_nested_groups_and_skips_comments() {
    let text = "use crate::selector::Selector;\n\
                use crate::{inventory, toggle::VmLink};\n\
                // crate::toggle in a comment is no import\n\
                use crate::{\n    backend::{qemu::QemuBackend, AttachMode},\n};\n\
                let x = crate::config::Config::default();\n";
    let forbidden = owned(&["toggle", "config", "backend::qemu"]);

    let found = forbidden_paths(text, &forbidden);

    assert_eq!(
        found,
        [
            "2: crate::toggle::VmLink",
            "4: crate::backend::qemu::QemuBackend",
            "7: crate::config::Config::default",
        ]
    );
}
