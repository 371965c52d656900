//! The examples in `docs/operations.md` work: the systemd drop-in passes `systemd-analyze
//! verify` with the unit, the Prometheus config and alert rules pass `promtool`, and the metric
//! tables list exactly the metrics `render` produces. Tool-based checks skip, saying why, when
//! the tool is not installed (Debian packages `systemd`, `prometheus`).

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use wgbond::bond::{LinkState, LinkStats};
use wgbond::io::metrics::{render, LinkMetrics, MetricsSnapshot, PeerMetrics};

const DOC: &str = include_str!("../docs/operations.md");
const UNIT: &str = include_str!("../configs/wgbond@.service");

/// The fenced blocks of `lang` in the doc, in order.
fn blocks(lang: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in DOC.lines() {
        let fence = line.trim_start();
        match &mut current {
            None if fence == format!("```{lang}") => current = Some(String::new()),
            Some(text) if fence == "```" => {
                out.push(std::mem::take(text));
                current = None;
            }
            Some(text) => {
                text.push_str(line);
                text.push('\n');
            }
            None => {}
        }
    }
    out
}

fn tool(name: &str, package: &str) -> bool {
    let ok = Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP: {name} not found (Debian package `{package}`)");
    }
    ok
}

fn assert_success(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn systemd_drop_in_example_verifies() {
    let ini = blocks("ini");
    assert_eq!(ini.len(), 1, "one drop-in example");
    if !tool("systemd-analyze", "systemd") {
        return;
    }
    let bin = env!("CARGO_BIN_EXE_wgbond");
    let dir = tempfile::tempdir().expect("temp dir");
    let unit = UNIT.replace("/usr/local/bin/wgbond", bin);
    std::fs::write(dir.path().join("wgbond@.service"), unit).expect("write unit");
    let drop_in = dir.path().join("wgbond@.service.d");
    std::fs::create_dir(&drop_in).expect("drop-in dir");
    // The example's binary path is only an example; verify needs one that exists.
    let conf = ini[0].replace("/root/.cargo/bin/wgbond", bin);
    std::fs::write(drop_in.join("override.conf"), conf).expect("write drop-in");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("wgbond@site.service"))
        .output()
        .expect("run systemd-analyze");
    assert_success(&out, "systemd-analyze verify with the drop-in");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("wgbond@"),
        "diagnostics about the unit:\n{stderr}"
    );
}

#[test]
fn prometheus_examples_pass_promtool() {
    let yaml = blocks("yaml");
    assert_eq!(yaml.len(), 2, "a scrape config and alert rules");
    if !tool("promtool", "prometheus") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("prometheus.yml");
    let rules = dir.path().join("rules.yml");
    std::fs::write(&config, &yaml[0]).expect("write config");
    std::fs::write(&rules, &yaml[1]).expect("write rules");
    let out = Command::new("promtool")
        .args(["check", "config", "--syntax-only"])
        .arg(&config)
        .output()
        .expect("run promtool");
    assert_success(&out, "promtool check config");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("run promtool");
    assert_success(&out, "promtool check rules");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("4 rules found"), "{report}");
}

#[test]
fn metric_tables_match_the_exposition() {
    let link = LinkMetrics {
        stats: LinkStats {
            name: "cable".to_owned(),
            state: Some(LinkState::Up),
            srtt: Some(Duration::from_millis(10)),
            min_rtt: Some(Duration::from_millis(9)),
            rttvar: Some(Duration::from_millis(1)),
            jitter: Some(Duration::from_millis(1)),
            ..LinkStats::default()
        },
        since_handshake: Some(Duration::from_secs(1)),
    };
    let snapshot = MetricsSnapshot {
        interface: "site".to_owned(),
        peers: vec![PeerMetrics {
            name: Some("hub".to_owned()),
            links: vec![link],
            ..PeerMetrics::default()
        }],
        drops: vec![("udp_send".to_owned(), 0)],
    };
    let text = render(&snapshot);
    let exported: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    // Table rows start with "| `wgbond_..."; the build info is in prose.
    let mut documented: BTreeSet<String> = DOC
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|name| name.starts_with("wgbond_"))
        .map(str::to_owned)
        .collect();
    assert!(DOC.contains("`wgbond_build_info{version=\"…\"} 1`"));
    documented.insert("wgbond_build_info".to_owned());
    assert_eq!(
        documented, exported,
        "docs/operations.md tables vs render()"
    );
}
