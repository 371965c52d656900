//! `interface.dns`: hands the tunnel's DNS servers to `resolvconf` while it is up, as wg-quick
//! does (`resolvconf -a tun.NAME -m 0 -x` with `nameserver` lines at up, `resolvconf -d
//! tun.NAME -f` at down). Without `resolvconf` the servers are not set, with one warning.

use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::io::systemd::CHILD_ENV_REMOVE;

/// Set once the missing-resolvconf warning was logged.
static WARNED: AtomicBool = AtomicBool::new(false);

/// The `resolvconf` program on `PATH`, if any.
pub fn resolvconf() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("resolvconf"))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What `resolvconf -a` reads on stdin for `servers`.
pub fn resolv_conf_text(servers: &[IpAddr]) -> String {
    servers
        .iter()
        .map(|s| format!("nameserver {s}\n"))
        .collect()
}

/// The record name resolvconf files the servers under (wg-quick's choice).
pub fn record_name(interface: &str) -> String {
    format!("tun.{interface}")
}

/// Gives `servers` to resolvconf for `interface`. `Ok(false)`: resolvconf is not installed
/// (warned about once); nothing was set.
pub fn set(interface: &str, servers: &[IpAddr]) -> Result<bool, String> {
    let Some(program) = resolvconf() else {
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "dns is set but resolvconf is not installed: the DNS servers are not configured"
            );
        }
        return Ok(false);
    };
    let record = record_name(interface);
    let mut child = command(&program)
        .args(["-a", &record, "-m", "0", "-x"])
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(resolv_conf_text(servers).as_bytes())
            .map_err(|e| format!("writing to resolvconf: {e}"))?;
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for resolvconf: {e}"))?;
    if status.success() {
        tracing::info!(servers = ?servers, "DNS servers set through resolvconf");
        Ok(true)
    } else {
        Err(format!(
            "`resolvconf -a {record} -m 0 -x` failed ({status})"
        ))
    }
}

/// Removes what [`set`] gave resolvconf for `interface`.
pub fn unset(interface: &str) -> Result<(), String> {
    let Some(program) = resolvconf() else {
        return Ok(());
    };
    let record = record_name(interface);
    let status = command(&program)
        .args(["-d", &record, "-f"])
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`resolvconf -d {record} -f` failed ({status})"))
    }
}

fn command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for var in CHILD_ENV_REMOVE {
        cmd.env_remove(var);
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameserver_lines_and_record() {
        let servers: Vec<IpAddr> = vec![
            "10.99.0.1".parse().unwrap_or_else(|e| panic!("{e}")),
            "fd99::1".parse().unwrap_or_else(|e| panic!("{e}")),
        ];
        assert_eq!(
            resolv_conf_text(&servers),
            "nameserver 10.99.0.1\nnameserver fd99::1\n"
        );
        assert_eq!(record_name("site"), "tun.site");
    }
}
