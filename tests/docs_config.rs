//! `docs/configuration.md` is the reference for every config key: these tests keep it true.
//!
//! - every key the parser knows has a `### \`section.key\`` heading, and every heading is a key;
//! - every key's `- Example: \`...\`` line, put into a valid site, passes `check`;
//! - every complete ```toml example passes `check`, unless a ```text block follows it, in
//!   which case `check` must print exactly that text;
//! - every key appears in a config under `configs/` or `tests/configs/`, each of which passes.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_wgbond");
const SITE_PRIVATE: &str = "CHeGN8rpPEXqFrWgiwybzCGhnNqvYo8171cyQAqjnlY=";
const PSK: &str = "UQoHg7sUeqZZ29PgTFAhqoLmszO+JmEkTEhrKvRFG3g=";

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn docs() -> String {
    std::fs::read_to_string(manifest_dir().join("docs/configuration.md")).expect("read docs")
}

/// A temp directory holding the key files the examples name, mode 600.
fn key_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, key) in [
        ("office.key", SITE_PRIVATE),
        ("hub.key", "cH4YT0px7jx4PGvAAtb2QB8gW99aaT6B45a/ZQ5VyUs="),
        ("hub.psk", PSK),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("{key}\n")).expect("write key");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    dir
}

/// `wgbond check NAME` run inside `dir`: (exit code, stderr).
fn check_in(dir: &Path, name: &str, text: &str) -> (i32, String) {
    std::fs::write(dir.join(name), text).expect("write config");
    let out = Command::new(BIN)
        .args(["check", name])
        .current_dir(dir)
        .output()
        .expect("run wgbond");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// (section.key, example line) for every documented key, in document order.
fn documented() -> Vec<(String, Option<String>)> {
    let mut out: Vec<(String, Option<String>)> = Vec::new();
    for line in docs().lines() {
        if let Some(rest) = line.strip_prefix("### `") {
            let key = rest.trim_end_matches('`').to_string();
            out.push((key, None));
        } else if let Some(rest) = line.strip_prefix("- Example: `") {
            let example = rest.strip_suffix('`').expect("example ends with `");
            let last = out.last_mut().expect("example under a key heading");
            assert!(last.1.is_none(), "two examples for {}", last.0);
            last.1 = Some(example.to_string());
        }
    }
    out
}

#[test]
fn every_key_is_documented_and_every_heading_is_a_key() {
    let documented: BTreeSet<String> = documented().into_iter().map(|(k, _)| k).collect();
    let known: BTreeSet<String> = wgbond::config::all_keys().into_iter().collect();
    let missing: Vec<_> = known.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&known).collect();
    assert!(missing.is_empty(), "keys not documented: {missing:?}");
    assert!(
        extra.is_empty(),
        "documented keys the parser does not know: {extra:?}"
    );
}

/// A valid site as (section header, lines); examples are put into it.
fn base_site() -> Vec<(&'static str, Vec<String>)> {
    let lines = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        (
            "[interface]",
            lines(&[
                &format!("private_key = \"{SITE_PRIVATE}\""),
                "address = \"10.99.0.2/24\"",
            ]),
        ),
        ("[bond]", Vec::new()),
        (
            "[[peer]]",
            lines(&[
                "public_key = \"weJrjrGjRxiAxqLortWGvcfnhlCZJlybUYHAxbATFng=\"",
                "allowed_ips = \"0.0.0.0/0\"",
                "endpoint = \"hub.example.net:51820\"",
            ]),
        ),
        (
            "[[link]]",
            lines(&["name = \"cable\"", "bind_interface = \"eth1\""]),
        ),
    ]
}

/// Keys that exclude another key of the same section.
fn excludes(key: &str) -> Option<&'static str> {
    match key {
        "private_key_file" => Some("private_key"),
        "bind_address" => Some("bind_interface"),
        _ => None,
    }
}

#[test]
fn every_documented_example_passes_check() {
    let dir = key_dir();
    for (key, example) in documented() {
        let example = example.unwrap_or_else(|| panic!("{key} has no `- Example:` line"));
        let (section, name) = key.split_once('.').expect("section.key");
        let (assigned, _) = example.split_once(" = ").expect("example is `key = value`");
        assert_eq!(assigned, name, "the example of {key} sets another key");
        let header = match section {
            "interface" => "[interface]",
            "bond" => "[bond]",
            "peer" => "[[peer]]",
            _ => "[[link]]",
        };
        let mut text = String::new();
        for (h, lines) in base_site() {
            text.push_str(h);
            text.push('\n');
            for line in lines {
                let line_key = line.split(" = ").next().unwrap_or_default();
                let replaced = line_key == name || Some(line_key) == excludes(name);
                if !(h == header && replaced) {
                    text.push_str(&line);
                    text.push('\n');
                }
            }
            if h == header {
                text.push_str(&example);
                text.push('\n');
            }
        }
        let (code, stderr) = check_in(dir.path(), "example.toml", &text);
        assert_eq!(code, 0, "example of {key} fails check:\n{text}\n{stderr}");
    }
}

/// The fenced blocks of the docs: (language, text).
fn fenced_blocks() -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in docs().lines() {
        match (&mut current, line.strip_prefix("```")) {
            (None, Some(lang)) => current = Some((lang.to_string(), String::new())),
            (Some(_), Some(_)) => blocks.extend(current.take()),
            (Some((_, text)), None) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(current.is_none(), "unterminated code block");
    blocks
}

#[test]
fn complete_examples_pass_and_error_samples_match() {
    let dir = key_dir();
    let blocks = fenced_blocks();
    let mut complete = 0;
    let mut samples = 0;
    for (i, (lang, text)) in blocks.iter().enumerate() {
        if lang != "toml" || !text.contains("[interface]") {
            continue;
        }
        let (code, stderr) = check_in(dir.path(), "office.toml", text);
        match blocks.get(i + 1) {
            Some((next_lang, expected)) if next_lang == "text" => {
                assert_eq!(code, 1, "broken example passes check:\n{text}");
                assert_eq!(&stderr, expected, "check output differs from the docs");
                samples += 1;
            }
            _ => {
                assert_eq!(code, 0, "example fails check:\n{text}\n{stderr}");
                complete += 1;
            }
        }
    }
    assert!(
        complete >= 2 && samples >= 1,
        "{complete} examples, {samples} samples"
    );
}

fn config_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in ["configs", "tests/configs"] {
        for entry in std::fs::read_dir(manifest_dir().join(dir)).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                files.push(path);
            }
        }
    }
    files
}

/// Every `section.key` set in a config text.
fn keys_in(text: &str) -> BTreeSet<String> {
    let doc: toml_edit::ImDocument<&str> = toml_edit::ImDocument::parse(text).expect("toml");
    let mut keys = BTreeSet::new();
    for (section, item) in doc.as_table().iter() {
        let tables: Vec<&dyn toml_edit::TableLike> = match item {
            toml_edit::Item::ArrayOfTables(a) => a.iter().map(|t| t as _).collect(),
            other => other.as_table_like().into_iter().collect(),
        };
        for table in tables {
            for (key, _) in table.iter() {
                keys.insert(format!("{section}.{key}"));
            }
        }
    }
    keys
}

#[test]
fn every_key_is_used_by_a_config_that_passes_check() {
    let dir = key_dir();
    let mut used = BTreeSet::new();
    for path in config_files() {
        let text = std::fs::read_to_string(&path).expect("read config");
        used.extend(keys_in(&text));
        let name = path.file_name().and_then(|n| n.to_str()).expect("name");
        let (code, stderr) = check_in(dir.path(), name, &text);
        assert_eq!(code, 0, "{}: {stderr}", path.display());
    }
    let unused: Vec<String> = wgbond::config::all_keys()
        .into_iter()
        .filter(|k| !used.contains(k))
        .collect();
    assert!(
        unused.is_empty(),
        "keys no config under configs/ or tests/configs/ sets: {unused:?}"
    );
}
