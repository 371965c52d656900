//! `configs/wgbond@.service` passes `systemd-analyze verify` and stays hardened.
//!
//! `verify` exits 0 on many mistakes (an unknown `Type=` is only a warning), so these tests
//! also fail on any diagnostic that names the unit. They skip, saying why, only when
//! `systemd-analyze` is not installed (Debian package `systemd`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const UNIT: &str = include_str!("../configs/wgbond@.service");
/// Where the unit expects the binary (`cargo install --path . --root /usr/local`).
const INSTALLED_BINARY: &str = "/usr/local/bin/wgbond";
/// Highest `systemd-analyze security` exposure accepted, in tenths (3.0 = "OK").
const MAX_EXPOSURE_TENTHS: u32 = 30;

fn have_systemd_analyze() -> bool {
    match Command::new("systemd-analyze").arg("--version").output() {
        Ok(out) => out.status.success(),
        Err(_) => {
            eprintln!("SKIP: systemd-analyze not found (install the Debian package `systemd`)");
            false
        }
    }
}

/// Writes `text` as `wgbond@.service` in a fresh directory, with `ExecStart` pointing at the
/// binary cargo just built (verify rejects a command that does not exist).
fn write_unit(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = text.replace(INSTALLED_BINARY, env!("CARGO_BIN_EXE_wgbond"));
    std::fs::write(dir.path().join("wgbond@.service"), text).expect("write unit");
    // An instance of the template is what systemd would load for `wgbond@site`.
    let instance = dir.path().join("wgbond@site.service");
    (dir, instance)
}

fn verify(instance: &Path) -> Output {
    Command::new("systemd-analyze")
        .arg("verify")
        .arg(instance)
        .output()
        .expect("run systemd-analyze verify")
}

/// Diagnostics about our unit (verify may also warn about unrelated system units).
fn unit_diagnostics(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
        .filter(|line| line.contains("wgbond@"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    if !have_systemd_analyze() {
        return;
    }
    let (_dir, instance) = write_unit(UNIT);
    let out = verify(&instance);
    let diagnostics = unit_diagnostics(&out);
    assert!(
        out.status.success() && diagnostics.is_empty(),
        "systemd-analyze verify failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn verify_check_catches_broken_units() {
    if !have_systemd_analyze() {
        return;
    }
    // Each mistake must be caught, by exit status or by a diagnostic naming the unit.
    let broken = [
        UNIT.replace("Type=notify", "Type=notifyy"),
        UNIT.replace("ExecStart=", "ExecStrat="),
        UNIT.replace(INSTALLED_BINARY, "/nonexistent/wgbond"),
        UNIT.replace("WatchdogSec=30", "WatchdogSec=thirty"),
    ];
    for (i, text) in broken.iter().enumerate() {
        assert_ne!(text, UNIT, "mutation {i} did not change the unit");
        // write_unit only repoints the installed path, so the broken path stays broken.
        let (_dir, instance) = write_unit(text);
        let out = verify(&instance);
        assert!(
            !out.status.success() || !unit_diagnostics(&out).is_empty(),
            "mutation {i} was not caught by systemd-analyze verify"
        );
    }
}

#[test]
fn unit_exposure_is_low() {
    if !have_systemd_analyze() {
        return;
    }
    let (_dir, instance) = write_unit(UNIT);
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(format!("--threshold={MAX_EXPOSURE_TENTHS}"))
        .arg(&instance)
        .output()
        .expect("run systemd-analyze security");
    let report = String::from_utf8_lossy(&out.stdout);
    let summary = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or("(no summary line)");
    eprintln!("{summary}");
    assert!(
        out.status.success(),
        "exposure above {MAX_EXPOSURE_TENTHS}/10: {summary}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The settings the daemon relies on (readiness, watchdog, reload, where it finds its binary
/// and config, and the socket directory).
#[test]
fn unit_runs_the_daemon_as_documented() {
    let settings: Vec<&str> = UNIT
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .collect();
    for expected in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30",
        "ExecStart=/usr/local/bin/wgbond up %i --foreground",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "RuntimeDirectory=wgbond",
        "RuntimeDirectoryPreserve=yes",
        "DeviceAllow=/dev/net/tun rw",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        assert!(settings.contains(&expected), "unit lacks `{expected}`");
    }
    let caps = settings
        .iter()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet");
    let mut caps: Vec<&str> = caps.split_whitespace().collect();
    caps.sort_unstable();
    assert_eq!(
        caps,
        ["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW"]
    );
}
