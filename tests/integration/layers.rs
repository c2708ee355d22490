//! The layers of docs/design.md, held: each module of `src/` imports only modules below it
//! (outside its tests), and the pure planners reach netlink only for its wire format. And
//! the two backends mirrored: each is one folder of `rules/` and one file of `apply/` that
//! does not reach into the other's, and only the engine picks one.

use std::path::{Path, PathBuf};

/// Each top-level module of `src/` and its layer, lowest first (docs/design.md's drawing).
const LAYERS: &[(&str, u8)] = &[
    ("values", 0),
    ("netlink", 1),
    ("config", 1),
    ("rules", 2),
    ("apply", 3),
    ("caps", 3),
    ("netns", 3),
    ("engine", 4),
    ("validate", 4),
    ("error", 5),
    ("explain", 6),
    ("cni", 6),
    ("logging", 6),
    ("cli", 7),
    ("app", 8),
];

fn layer_of(module: &str) -> u8 {
    LAYERS
        .iter()
        .find(|(name, _)| *name == module)
        .map(|(_, layer)| *layer)
        .unwrap_or_else(|| {
            panic!("src/{module} is in no layer: add it to LAYERS (and docs/design.md)")
        })
}

fn sources(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading src/") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// `crate::a::b` paths in `code`, as (a, b).
fn crate_paths(code: &str) -> Vec<(String, String)> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    code.match_indices("crate::")
        .map(|(at, _)| {
            let rest = &code[at + "crate::".len()..];
            let first = ident(rest);
            let second = rest[first.len()..]
                .strip_prefix("::")
                .map(ident)
                .unwrap_or_default();
            (first, second)
        })
        .filter(|(first, _)| !first.is_empty())
        .collect()
}

#[test]
fn each_module_imports_only_modules_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).expect("under src/");
        let module = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|name| name.trim_end_matches(".rs").to_owned())
            .expect("a module name");
        if ["main", "lib"].contains(&module.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("reading a source file");
        // Tests may reach anywhere (a unit test of `logging` parses real flags).
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (target, below) in crate_paths(code) {
            if target == module {
                continue;
            }
            if layer_of(&target) >= layer_of(&module) {
                wrong.push(format!(
                    "{} imports crate::{target} (not below it)",
                    relative.display()
                ));
            }
            if module == "rules" && target == "netlink" && below != "wire" {
                wrong.push(format!(
                    "{} imports crate::netlink::{below}: the planners are pure, netlink::wire only",
                    relative.display()
                ));
            }
        }
    }
    assert!(files.len() > 20, "read only {} files of src/", files.len());
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

/// Each file of `src/` (relative to it) with its code outside tests.
fn code_by_file() -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files
        .iter()
        .map(|file| {
            let relative = file.strip_prefix(&src).expect("under src/");
            let text = std::fs::read_to_string(file).expect("reading a source file");
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            (relative.display().to_string(), code.to_owned())
        })
        .collect()
}

/// Each backend: where its rules and its apply are, and the paths that name it.
const BACKENDS: &[(&str, &str, &[&str])] = &[
    (
        "rules/iptables/",
        "apply/iptables.rs",
        &["rules::iptables", "apply::iptables"],
    ),
    ("rules/nft/", "apply/nft.rs", &["rules::nft", "apply::nft"]),
];

#[test]
fn each_backend_is_one_folder_and_one_file_that_mirror_each_other() {
    let files = code_by_file();
    let mut wrong = Vec::new();
    for (rules, apply, _) in BACKENDS {
        for part in ["mod.rs", "model.rs", "plan.rs", "render.rs"] {
            if !files.iter().any(|(f, _)| *f == format!("{rules}{part}")) {
                wrong.push(format!("src/{rules} has no {part}"));
            }
        }
        if !files.iter().any(|(f, _)| f == apply) {
            wrong.push(format!("no src/{apply}"));
        }
        let own = |file: &str| file.starts_with(rules) || file == *apply;
        for (file, code) in files.iter().filter(|(f, _)| own(f)) {
            for (other_rules, other_apply, names) in BACKENDS {
                if other_rules == rules {
                    continue;
                }
                for name in names.iter() {
                    if code.contains(&format!("crate::{name}")) {
                        wrong.push(format!(
                            "src/{file} reaches into the other backend ({other_rules}, {other_apply}): crate::{name}"
                        ));
                    }
                }
            }
        }
    }
    // The engine chooses the backend: nothing above apply names a backend's apply.
    for (file, code) in &files {
        if file.starts_with("engine/") || file.starts_with("apply/") {
            continue;
        }
        for (_, apply, _) in BACKENDS {
            let module = apply.trim_end_matches(".rs").replace('/', "::");
            if code.contains(&format!("crate::{module}")) {
                wrong.push(format!(
                    "src/{file} names crate::{module}: only the engine picks a backend"
                ));
            }
        }
    }
    // apply/mod.rs is the traits and the errors: no backend's code.
    let apply_mod = files
        .iter()
        .find(|(f, _)| f == "apply/mod.rs")
        .map(|(_, code)| code.as_str())
        .unwrap_or_default();
    for needle in [
        "pub fn apply",
        "pub fn cleanup",
        "impl Netfilter for",
        "impl Nftables for",
    ] {
        if apply_mod.contains(needle) {
            wrong.push(format!("src/apply/mod.rs holds a backend's `{needle}`"));
        }
    }
    assert!(
        wrong.is_empty(),
        "the backends do not mirror:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_check_sees_an_upward_import() {
    assert_eq!(
        crate_paths("use crate::engine::Engine; x = crate::netlink::wire::Message"),
        [
            ("engine".to_owned(), "Engine".to_owned()),
            ("netlink".to_owned(), "wire".to_owned())
        ]
    );
    assert!(layer_of("engine") > layer_of("rules"));
}
