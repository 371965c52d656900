//! `wgbond up`, `down` and `show`: starting the daemon, and talking to it.
//!
//! `up` without `--foreground` starts `wgbond up --foreground` as a detached child (own
//! session, stdin from /dev/null, stdout and stderr to `/run/wgbond/NAME.log`) and returns
//! only when that child's control socket answers `show` — the interface is up and routed — or
//! fails with the child's own error when it exits first.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::control::{self, InterfaceStatus};
use super::{daemon, systemd};
use crate::cli::resolve_config;
use crate::config::Config;

/// Longest time `up` waits for the daemon to be ready (name resolution and netlink work).
const UP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest time `down` waits for the daemon to finish its teardown.
const DOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// `wgbond up CONFIG [--foreground]`.
pub fn up(path: &Path, foreground: bool, verbose: u8) -> Result<(), String> {
    let config = Config::load(path).map_err(|e| e.to_string().trim_end().to_owned())?;
    if let Some(w) = crate::config::exposed_key_warning(path) {
        eprintln!("warning: {w}");
    }
    if control::request(&config.name, control::Request::Show, Duration::from_secs(2)).is_ok() {
        return Err(format!("`{}` is already up", config.name));
    }
    if foreground {
        init_logging(verbose);
        return daemon::run_foreground(config);
    }
    spawn_and_wait(path, &config.name, verbose)
}

/// Starts the daemon in the background and waits until it answers or dies.
fn spawn_and_wait(path: &Path, name: &str, verbose: u8) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt as _;

    let exe = std::env::current_exe().map_err(|e| format!("cannot find our own binary: {e}"))?;
    // Absolute, but not through symlinks: the interface is named after this file's stem, as
    // in the foreground.
    let path =
        std::path::absolute(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let dir = control::run_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let log_path = control::log_path(name);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&log_path)
        .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .map_err(|e| format!("cannot use {}: {e}", log_path.display()))?;
    let mut cmd = Command::new(exe);
    if verbose > 0 {
        cmd.arg(format!("-{}", "v".repeat(usize::from(verbose))));
    }
    cmd.arg("up")
        .arg(&path)
        .arg("--foreground")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    // The daemon tells us READY=1 (or its reason as STATUS=) the way it tells systemd.
    match systemd::spawn_until_ready(&mut cmd, UP_TIMEOUT) {
        Ok(_child) => Ok(()),
        Err(systemd::ReadyError::Exited {
            status: Some(reason),
            ..
        }) => Err(reason),
        Err(systemd::ReadyError::Exited { status: None, exit }) => Err(child_error(&log_path)
            .unwrap_or_else(|| format!("the daemon exited ({exit}); see {}", log_path.display()))),
        Err(e) => Err(format!("`{name}`: {e}")),
    }
}

/// The failed daemon's reason: the last `wgbond: ...` line it printed.
fn child_error(log_path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log_path).ok()?;
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("wgbond: "))
        .map(str::to_owned)
}

/// `wgbond down CONFIG|NAME`.
pub fn down(arg: &str) -> Result<(), String> {
    control::down(&interface_name(arg)?, DOWN_TIMEOUT)
}

/// The interface name for `CONFIG|NAME`: a config's name; a bare NAME whose file does not
/// exist is taken as the interface name itself (so `down` works after the file is gone).
fn interface_name(arg: &str) -> Result<String, String> {
    let path = resolve_config(arg);
    let is_path = arg.contains('/') || arg.ends_with(".toml");
    match Config::load(&path) {
        Ok(c) => Ok(c.name),
        Err(_) if !is_path && !path.exists() => Ok(arg.to_owned()),
        Err(e) => {
            // A config edited (and broken) while the tunnel runs must not keep `down` from
            // stopping it: fall back to the file's stem if a tunnel of that name is running.
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            if !stem.is_empty() && control::socket_path(stem).exists() {
                Ok(stem.to_owned())
            } else {
                Err(e.to_string().trim_end().to_owned())
            }
        }
    }
}

/// `wgbond show [NAME] [--json]`.
pub fn show(name: Option<&str>, json: bool) -> Result<(), String> {
    let statuses = statuses(name)?;
    if json {
        let text = serde_json::to_string_pretty(&statuses).map_err(|e| e.to_string())?;
        println!("{text}");
    } else {
        let text: Vec<String> = statuses.iter().map(control::format_status).collect();
        print!("{}", text.join("\n"));
    }
    Ok(())
}

/// The status of interface `name`, or of every running one.
fn statuses(name: Option<&str>) -> Result<Vec<InterfaceStatus>, String> {
    Ok(match name {
        Some(n) => vec![control::show(n)?],
        // Sockets of daemons that died without cleaning up are skipped.
        None => control::running_interfaces()
            .iter()
            .filter_map(|n| control::show(n).ok())
            .collect(),
    })
}

/// `wgbond show [NAME] --watch SECONDS`: the status again every `secs`, with what each link
/// carried per second since the last one, until interrupted. On a terminal each status
/// replaces the last; piped, they follow one another after a blank line (a log).
pub fn watch(name: Option<&str>, secs: f64) -> Result<(), String> {
    use std::io::{IsTerminal as _, Write as _};
    let tty = std::io::stdout().is_terminal();
    let mut last: Option<(std::time::Instant, Vec<InterfaceStatus>)> = None;
    loop {
        // A daemon that is restarting or down is reported, and watched for again.
        let (statuses, missing) = match statuses(name) {
            Ok(s) => (s, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        let now = std::time::Instant::now();
        let rates = last
            .as_ref()
            .map_or_else(control::LinkRates::new, |(at, before)| {
                control::link_rates(before, &statuses, now.duration_since(*at).as_secs_f64())
            });
        let mut text = String::new();
        if tty {
            // Cursor home, clear the screen.
            text.push_str("\x1b[H\x1b[2J");
        } else if last.is_some() {
            text.push('\n');
        }
        text.push_str(&format!(
            "{} UTC, every {secs} s (Ctrl-C to stop){}\n\n",
            utc_time_of_day(std::time::SystemTime::now()),
            if last.is_none() {
                "; rates from the next one on"
            } else {
                ""
            }
        ));
        match missing {
            Some(e) => text.push_str(&format!("{e}\n")),
            None if statuses.is_empty() => text.push_str("no wgbond interface is up\n"),
            None => {}
        }
        let parts: Vec<String> = statuses
            .iter()
            .map(|s| control::format_status_with_rates(s, &rates))
            .collect();
        text.push_str(&parts.join("\n"));
        let mut out = std::io::stdout().lock();
        // A closed pipe (`| head`) ends the watch.
        if out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            return Ok(());
        }
        drop(out);
        last = Some((now, statuses));
        std::thread::sleep(Duration::from_secs_f64(secs));
    }
}

/// "14:03:07" of a wall-clock time, in UTC (the header of each status `--watch` prints).
fn utc_time_of_day(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        % 86_400;
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// Logs to stderr: journald adds its own timestamps, so they are left out under systemd.
fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    // netlink-packet-route warns on every dump about kernel attributes newer than itself;
    // boringtun warns every 5 s about each dead link (the link state already says it).
    let level = match verbose {
        0 => "info,netlink_packet_route=error,boringtun=error",
        1 => "debug,netlink_packet_route=error",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let _ = if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_headers_show_the_utc_time_of_day() {
        let t =
            std::time::UNIX_EPOCH + Duration::from_secs(20_000 * 86_400 + 14 * 3600 + 3 * 60 + 7);
        assert_eq!(utc_time_of_day(t), "14:03:07");
    }
}
