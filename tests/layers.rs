//! The module layering ARCHITECTURE.md draws: each module of the gateway imports only modules
//! below it, so there is no import circle. Read from the source, so a new `use` that climbs a
//! layer fails here with the file and the edge named.

use std::path::Path;

/// Bottom first: a module may import only modules before it in this list.
const LAYERS: &[&str] = &[
    "clock",
    "ids",
    "heap",
    "cursor",
    "config",
    "protocol",
    "metrics",
    "open_files",
    "auth",
    "http",
    "backplane",
    "connection",
    "registry",
    "inbound",
    "outbound",
    "presence",
    "state",
    "session",
    "api",
    "public",
];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|m| *m == module)
}

/// Every `crate::<name>` in the code of `text` (comments left out).
fn imports(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or_default();
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            found.push(name);
        }
    }
    found
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_imports_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut wrong = Vec::new();
    for path in all {
        let relative = path.strip_prefix(&src).expect("under src");
        let first = relative.components().next().expect("a component");
        let module = first.as_os_str().to_string_lossy();
        let module = module.trim_end_matches(".rs");
        if module == "lib" || module == "main" {
            continue;
        }
        let own = rank(module)
            .unwrap_or_else(|| panic!("src/{module} is not in LAYERS: give it a layer"));
        let text = std::fs::read_to_string(&path).expect("readable");
        for name in imports(&text) {
            if name == module {
                continue;
            }
            match rank(&name) {
                Some(theirs) if theirs < own => {}
                _ => wrong.push(format!("{} imports crate::{name}", relative.display())),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that climb a layer (see LAYERS, and ARCHITECTURE.md's module graph):\n{}",
        wrong.join("\n")
    );
}
