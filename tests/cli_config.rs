//! `wgbond check`, `genkey`, `pubkey` and `genpsk` through the built binary.
//!
//! Each broken config asserts the exact `FILE:LINE:COL` of its error and a fragment of the
//! message, so a regression in either the location or the advice shows up.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_wgbond");
const SITE_PRIVATE: &str = "CHeGN8rpPEXqFrWgiwybzCGhnNqvYo8171cyQAqjnlY=";
const SITE_PUBLIC: &str = "J4+4JzA9sY1giYZfMkvpLsJ84gaiTYGPtwfmITYvgRU=";
const HUB_PUBLIC: &str = "weJrjrGjRxiAxqLortWGvcfnhlCZJlybUYHAxbATFng=";

/// Runs the binary with `args` and `stdin`; returns (exit code, stdout, stderr).
fn run(args: &[&str], stdin: &[u8]) -> (i32, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wgbond");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait wgbond");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A config file in its own directory (removed on drop).
struct Case {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl Case {
    fn new(name: &str, text: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write config");
        // As an admin keeps a config with an inline key (see the test of the warning).
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        Self { dir, path }
    }

    /// Writes a file next to the config with the given mode.
    fn file(&self, name: &str, text: &str, mode: u32) {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write file");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// `wgbond check`: exit code and stderr lines.
    fn check(&self) -> (i32, Vec<String>) {
        let path = self.path.to_str().expect("utf-8 path");
        let (code, stdout, stderr) = run(&["check", path], b"");
        assert_eq!(stdout, "", "check prints nothing on stdout");
        (code, stderr.lines().map(str::to_string).collect())
    }

    /// Asserts `check` fails with exactly `expected` errors: (line, column, message fragment).
    fn expect_errors(&self, expected: &[(usize, usize, &str)]) {
        let (code, lines) = self.check();
        assert_eq!(code, 1, "check must fail; stderr: {lines:#?}");
        assert_eq!(
            lines.len(),
            expected.len(),
            "wrong number of errors: {lines:#?}"
        );
        let path = self.path.display().to_string();
        for ((line, col, fragment), got) in expected.iter().zip(&lines) {
            let prefix = format!("{path}:{line}:{col}: ");
            assert!(
                got.starts_with(&prefix),
                "expected an error at {line}:{col}, got: {got}"
            );
            assert!(got.contains(fragment), "expected `{fragment}` in: {got}");
        }
    }

    fn expect_ok(&self) {
        let (code, lines) = self.check();
        assert_eq!(code, 0, "check must pass: {lines:#?}");
        assert!(
            lines.is_empty(),
            "check prints nothing when valid: {lines:#?}"
        );
    }
}

/// A valid site; tests change one thing. Lines are numbered for the expectations below.
fn site() -> String {
    format!(
        r#"[interface]
private_key = "{SITE_PRIVATE}"
address = "10.99.0.2/24"

[[peer]]
public_key = "{HUB_PUBLIC}"
allowed_ips = ["0.0.0.0/0", "::/0"]
endpoint = "hub.example.net:51820"

[[link]]
name = "cable"
bind_interface = "eth1"

[[link]]
name = "lte"
bind_interface = "wwan0"
"#
    )
}

/// Replaces the text of 1-based `line` of `text`.
fn with_line(text: &str, line: usize, new: &str) -> String {
    let mut lines: Vec<&str> = text.lines().collect();
    lines[line - 1] = new;
    lines.join("\n") + "\n"
}

#[test]
fn valid_site_passes_silently_and_reports_with_verbose() {
    let case = Case::new("office.toml", &site());
    case.expect_ok();
    let path = case.path.to_str().expect("utf-8");
    let (code, _, stderr) = run(&["-v", "check", path], b"");
    assert_eq!(code, 0);
    assert!(
        stderr.contains("site `office`, 2 links, 1 peer"),
        "{stderr}"
    );
}

#[test]
fn bad_base64_private_key() {
    let text = with_line(&site(), 2, r#"private_key = "not a key at all""#);
    Case::new("s.toml", &text).expect_errors(&[(
        2,
        15,
        "expected a 32-byte key in base64 (44 characters ending in '='), as printed by `wgbond genkey`",
    )]);
}

#[test]
fn bad_key_never_echoes_the_secret() {
    // One character short of a key: a typo must not put the secret in logs.
    let text = with_line(
        &site(),
        2,
        &format!(r#"private_key = "{}""#, &SITE_PRIVATE[..43]),
    );
    let (_, lines) = Case::new("s.toml", &text).check();
    assert!(!lines.concat().contains(&SITE_PRIVATE[..43]), "{lines:?}");
}

#[test]
fn bad_base64_public_key() {
    let text = with_line(
        &site(),
        6,
        r#"public_key = "weJrjrGjRxiAxqLortWGvcfnhlCZJlybUYHAxbATF@g=""#,
    );
    Case::new("s.toml", &text).expect_errors(&[(6, 14, "as printed by `wgbond pubkey`")]);
}

#[test]
fn bad_cidr_points_at_the_list_element() {
    let text = with_line(&site(), 7, r#"allowed_ips = ["0.0.0.0/0", "10.0.0.0/33"]"#);
    Case::new("s.toml", &text).expect_errors(&[(7, 29, "`10.0.0.0/33` is not a network")]);
}

#[test]
fn bad_interface_address() {
    let text = with_line(&site(), 3, r#"address = ["10.99.0.2/24", "fd99::zz/64"]"#);
    Case::new("s.toml", &text).expect_errors(&[(3, 28, "`fd99::zz/64` is not an address")]);
}

#[test]
fn unknown_key_lists_valid_keys_and_suggests() {
    let text = with_line(&site(), 3, r#"listen_prot = 51820"#);
    Case::new("s.toml", &text).expect_errors(&[(
        3,
        1,
        "unknown key `listen_prot` in [interface]; did you mean `listen_port`? valid keys: name, private_key, private_key_file, address, listen_port, mtu,",
    )]);
}

#[test]
fn unknown_key_in_link() {
    let text = with_line(
        &site(),
        16,
        "bind_interface = \"wwan0\"\ninterface = \"wwan0\"",
    );
    Case::new("s.toml", &text).expect_errors(&[(
        17,
        1,
        "unknown key `interface` in [link]; valid keys: name, bind_interface",
    )]);
}

#[test]
fn unknown_section() {
    let text = site() + "[peers]\nfoo = 1\n";
    Case::new("s.toml", &text).expect_errors(&[(
        17,
        1,
        "unknown section `peers`; did you mean `peer`?",
    )]);
}

#[test]
fn missing_interface_section() {
    let text = site().replacen("[interface]", "[bond]", 1);
    // Now the keys of [interface] sit in [bond]: each is reported, plus the missing section.
    let case = Case::new("s.toml", &text);
    case.expect_errors(&[
        (
            1,
            1,
            "missing [interface] section: add one with at least `private_key`",
        ),
        (2, 1, "unknown key `private_key` in [bond]"),
        (3, 1, "unknown key `address` in [bond]"),
    ]);
}

#[test]
fn missing_peer_section() {
    let text =
        "[interface]\nprivate_key = \"".to_string() + SITE_PRIVATE + "\"\nlisten_port = 51820\n";
    Case::new("hub.toml", &text).expect_errors(&[(1, 1, "missing [[peer]] section")]);
}

#[test]
fn link_without_peer_endpoint() {
    let text = with_line(&site(), 8, "");
    Case::new("s.toml", &text).expect_errors(&[
        (10, 1, "link `cable` has nowhere to send: set `endpoint = \"host:port\"` in the [[peer]] section"),
        (14, 1, "link `lte` has nowhere to send"),
    ]);
}

#[test]
fn link_endpoint_override_is_enough() {
    let text = with_line(&site(), 8, "");
    let text = with_line(
        &text,
        12,
        "bind_interface = \"eth1\"\nendpoint = \"203.0.113.1:51820\"",
    );
    // Line numbers shift by one after the inserted line.
    Case::new("s.toml", &text).expect_errors(&[(15, 1, "link `lte` has nowhere to send")]);
}

#[test]
fn duplicate_link_names() {
    let text = with_line(&site(), 15, r#"name = "cable""#);
    Case::new("s.toml", &text).expect_errors(&[(
        15,
        8,
        "duplicate link name `cable` (first used on line 11)",
    )]);
}

#[test]
fn bad_link_name() {
    let text = with_line(&site(), 15, r#"name = "4G modem""#);
    Case::new("s.toml", &text).expect_errors(&[(15, 8, "a link name is 1 to 32 letters")]);
}

#[test]
fn site_with_two_peers() {
    let text = site()
        + &format!("\n[[peer]]\npublic_key = \"{SITE_PUBLIC}\"\nendpoint = \"b.example.net:1\"\n");
    Case::new("s.toml", &text).expect_errors(&[
        (
            18,
            1,
            "a site (a file with [[link]] sections) has exactly one [[peer]]",
        ),
        (
            19,
            14,
            "this is the public key of this interface's own private key",
        ),
    ]);
}

#[test]
fn hub_without_listen_port() {
    let text = format!(
        "[interface]\nprivate_key = \"{SITE_PRIVATE}\"\n\n[[peer]]\npublic_key = \"{HUB_PUBLIC}\"\n"
    );
    Case::new("hub.toml", &text).expect_errors(&[(
        1,
        1,
        "a hub (a file without [[link]] sections) needs `listen_port`",
    )]);
}

#[test]
fn bind_interface_and_address_both_or_neither() {
    let text = with_line(
        &site(),
        12,
        "bind_interface = \"eth1\"\nbind_address = \"198.51.100.2\"",
    );
    let text = with_line(&text, 17, "");
    Case::new("s.toml", &text).expect_errors(&[
        (
            13,
            16,
            "`link.bind_interface` and `link.bind_address` are both set; keep one",
        ),
        (
            15,
            1,
            "[[link]] needs `bind_interface` (the WAN device, like \"eth1\") or `bind_address`",
        ),
    ]);
}

#[test]
fn private_key_and_key_file_both_or_neither() {
    let both = with_line(&site(), 3, r#"private_key_file = "site.key""#);
    Case::new("s.toml", &both).expect_errors(&[(
        3,
        20,
        "`interface.private_key` and `interface.private_key_file` are both set",
    )]);
    let neither = with_line(&site(), 2, "");
    Case::new("s.toml", &neither).expect_errors(&[(
        1,
        1,
        "[interface] needs `private_key` or `private_key_file`",
    )]);
}

#[test]
fn unknown_mode() {
    let text = site() + "\n[bond]\nmode = \"fastest\"\n";
    Case::new("s.toml", &text).expect_errors(&[(
        19,
        8,
        "\"fastest\" is not a mode: expected \"auto\", \"stripe\", \"duplicate\" or \"failover\"",
    )]);
}

#[test]
fn wrong_types() {
    let text = with_line(&site(), 3, "mtu = \"1400\"\nlisten_port = 51820.5");
    Case::new("s.toml", &text).expect_errors(&[
        (3, 7, "`interface.mtu` must be an integer, found string"),
        (
            4,
            15,
            "`interface.listen_port` must be an integer, found float",
        ),
    ]);
}

#[test]
fn out_of_range() {
    let text = with_line(&site(), 3, "listen_port = 70000");
    Case::new("s.toml", &text).expect_errors(&[(
        3,
        15,
        "= 70000 is out of range: expected 1 to 65535",
    )]);
}

#[test]
fn bad_endpoint() {
    let text = with_line(&site(), 8, r#"endpoint = "hub.example.net""#);
    Case::new("s.toml", &text).expect_errors(&[(8, 12, "is not host:port")]);
}

#[test]
fn two_errors_at_once_in_file_order() {
    let text = with_line(&site(), 2, r#"private_key = "short""#);
    let text = with_line(&text, 15, r#"name = "cable""#);
    Case::new("s.toml", &text).expect_errors(&[
        (2, 15, "`interface.private_key` is not a valid key"),
        (15, 8, "duplicate link name `cable`"),
    ]);
}

#[test]
fn syntax_error_is_located() {
    let text = with_line(&site(), 7, r#"allowed_ips = ["0.0.0.0/0", "::/0""#);
    let (code, lines) = Case::new("s.toml", &text).check();
    assert_eq!(code, 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("s.toml:8:1: invalid TOML"), "{lines:?}");
}

#[test]
fn interface_name_from_long_file_name() {
    let case = Case::new("a-very-long-name.toml", &site());
    case.expect_errors(&[(1, 1, "interface name `a-very-long-name` (taken from the file name) is 16 bytes long; the kernel allows at most 15; rename the file or set `name`")]);
    let text = with_line(&site(), 1, "[interface]\nname = \"wgb0\"");
    Case::new("a-very-long-name.toml", &text).expect_ok();
}

#[test]
fn key_file_relative_to_config_dir() {
    let text = with_line(&site(), 2, r#"private_key_file = "keys/site.key""#);
    let case = Case::new("s.toml", &text);
    std::fs::create_dir(case.dir.path().join("keys")).expect("mkdir");
    case.file("keys/site.key", &format!("{SITE_PRIVATE}\n"), 0o600);
    case.expect_ok();
}

#[test]
fn inline_key_in_a_readable_config_is_warned_about() {
    let case = Case::new("s.toml", &site());
    std::fs::set_permissions(&case.path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (code, lines) = case.check();
    assert_eq!(code, 0, "a warning, not an error: {lines:#?}");
    let expected = format!(
        "warning: {} holds a key inline and other users can read it (mode 0644); run `chmod 600 {}`",
        case.path.display(),
        case.path.display()
    );
    assert!(
        lines.len() == 1 && lines[0].starts_with(&expected),
        "{lines:#?}"
    );
    // The same file with a key file instead: nothing secret in it, no warning.
    let text = with_line(&site(), 2, r#"private_key_file = "site.key""#);
    let case = Case::new("s.toml", &text);
    case.file("site.key", &format!("{SITE_PRIVATE}\n"), 0o600);
    std::fs::set_permissions(&case.path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    case.expect_ok();
}

#[test]
fn world_readable_key_file() {
    let text = with_line(&site(), 2, r#"private_key_file = "site.key""#);
    let case = Case::new("s.toml", &text);
    case.file("site.key", &format!("{SITE_PRIVATE}\n"), 0o644);
    let key = case.dir.path().join("site.key");
    let fix = format!(
        "can be read by other users (mode 0644); run `chmod 600 {}`",
        key.display()
    );
    case.expect_errors(&[(2, 20, &fix)]);
}

#[test]
fn group_readable_psk_file_and_missing_key_file() {
    let text = with_line(&site(), 2, r#"private_key_file = "missing.key""#);
    let text = with_line(
        &text,
        8,
        "endpoint = \"hub.example.net:51820\"\npreshared_key_file = \"hub.psk\"",
    );
    let case = Case::new("s.toml", &text);
    case.file(
        "hub.psk",
        "UQoHg7sUeqZZ29PgTFAhqoLmszO+JmEkTEhrKvRFG3g=\n",
        0o640,
    );
    case.expect_errors(&[
        (2, 20, "cannot open key file"),
        (9, 22, "(mode 0640); run `chmod 600"),
    ]);
}

#[test]
fn key_file_with_garbage() {
    let text = with_line(&site(), 2, r#"private_key_file = "site.key""#);
    let case = Case::new("s.toml", &text);
    case.file("site.key", "-----BEGIN PRIVATE KEY-----\n", 0o600);
    case.expect_errors(&[(
        2,
        20,
        "does not hold a key: expected a 32-byte key in base64",
    )]);
}

/// Every example config in `configs/` passes `check`.
#[test]
fn example_configs_pass_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("configs/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (code, _, stderr) = run(&["check", path.to_str().expect("utf-8")], b"");
            assert_eq!(code, 0, "{}: {stderr}", path.display());
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "expected configs/site.toml and configs/hub.toml"
    );
}

#[test]
fn genkey_and_genpsk_print_base64_keys() {
    for cmd in ["genkey", "genpsk"] {
        let (code, out, err) = run(&[cmd], b"");
        assert_eq!((code, err.as_str()), (0, ""));
        assert_eq!(out.len(), 45, "{cmd}: 44 characters and a newline: {out:?}");
        assert!(out.ends_with("=\n"));
    }
    // Two runs differ (fresh randomness).
    assert_ne!(run(&["genkey"], b"").1, run(&["genkey"], b"").1);
}

#[test]
fn pubkey_rejects_bad_input_with_one_line() {
    for input in [
        &b""[..],
        b"hello\n",
        b"CHeGN8rpPEXqFrWgiwybzCGhnNqvYo8171cyQAqjnl=\n",
    ] {
        let (code, out, err) = run(&["pubkey"], input);
        assert_eq!(code, 1);
        assert_eq!(out, "");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("wgbond: expected a private key in base64 on stdin"),
            "{err}"
        );
    }
    // Surrounding whitespace is fine, like `wg pubkey`.
    let (code, out, _) = run(&["pubkey"], format!("  {SITE_PRIVATE}\r\n\n").as_bytes());
    assert_eq!((code, out), (0, format!("{SITE_PUBLIC}\n")));
}

/// `wgbond genkey | tee k | wgbond pubkey` equals `wg pubkey < k`. Needs wireguard-tools
/// (`apt-get install wireguard-tools`; CI installs it); skipped with a message without `wg`.
#[test]
fn pubkey_matches_wg() {
    let Ok(probe) = Command::new("wg").arg("--version").output() else {
        eprintln!("SKIPPED pubkey_matches_wg: `wg` not found (apt-get install wireguard-tools)");
        return;
    };
    assert!(probe.status.success());
    for _ in 0..8 {
        let (_, private, _) = run(&["genkey"], b"");
        let (code, ours, _) = run(&["pubkey"], private.as_bytes());
        assert_eq!(code, 0);
        let mut wg = Command::new("wg")
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn wg");
        wg.stdin
            .take()
            .expect("stdin")
            .write_all(private.as_bytes())
            .expect("write");
        let theirs = wg.wait_with_output().expect("wg pubkey");
        assert!(theirs.status.success());
        assert_eq!(ours, String::from_utf8_lossy(&theirs.stdout));
    }
    // And keys from `wg genkey` / `wg genpsk` are accepted by our pubkey and config parser.
    let wg_key = Command::new("wg")
        .arg("genkey")
        .output()
        .expect("wg genkey");
    let (code, _, err) = run(&["pubkey"], &wg_key.stdout);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn daemon_commands_fail_clearly_without_a_daemon() {
    // A private run directory: no daemon of this machine can answer.
    let run_dir = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .env("WGBOND_RUN_DIR", run_dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("run wgbond");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let name = "no-such-tunnel-4711";
    let (code, _, err) = run(&["up", name]);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&format!("{name}.toml")), "{err}");
    for args in [&["down", name][..], &["show", name]] {
        let (code, _, err) = run(args);
        assert_eq!(code, 1, "{args:?}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("is not up"), "{err}");
    }
    // Nothing running: `show` lists nothing, successfully.
    let (code, out, err) = run(&["show"]);
    assert_eq!((code, out.as_str()), (0, ""), "{err}");
    let (code, out, _) = run(&["show", "--json"]);
    assert_eq!((code, out.trim()), (0, "[]"));
}
