//! The `wgbond::io::systemd` functions read the environment the way systemd sets it, and
//! hooks do not inherit it.
//!
//! One test in its own binary: it sets `NOTIFY_SOCKET`/`WATCHDOG_*` before the first call, and
//! nothing else in this process reads the environment concurrently.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use wgbond::io::hooks::{self, HookStage};
use wgbond::io::systemd;

fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a datagram within 2 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn notifications_reach_notify_socket_from_env() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    std::env::set_var("NOTIFY_SOCKET", &path);
    std::env::set_var("WATCHDOG_USEC", "30000000");
    std::env::set_var("WATCHDOG_PID", std::process::id().to_string());

    assert_eq!(systemd::watchdog_interval(), Some(Duration::from_secs(15)));
    systemd::notify_ready("wg0: 2 links probing");
    assert_eq!(recv(&sock), "READY=1\nSTATUS=wg0: 2 links probing");
    systemd::notify_watchdog();
    assert_eq!(recv(&sock), "WATCHDOG=1");
    // The event-loop helper: one keep-alive per interval however often the loop turns.
    let mut watchdog = systemd::Watchdog::from_env();
    let now = std::time::Instant::now();
    assert!(watchdog.kick(now));
    assert_eq!(recv(&sock), "WATCHDOG=1");
    assert!(!watchdog.kick(now + Duration::from_secs(1)));
    assert_eq!(watchdog.deadline(), Some(now + Duration::from_secs(15)));
    systemd::notify_status("wg0: cable up, lte down");
    assert_eq!(recv(&sock), "STATUS=wg0: cable up, lte down");
    systemd::notify_reloading();
    assert!(recv(&sock).starts_with("RELOADING=1\nMONOTONIC_USEC="));
    systemd::notify_stopping();
    assert_eq!(recv(&sock), "STOPPING=1");

    // A hook cannot speak for the daemon: it does not inherit the socket or the watchdog.
    let seen = dir.path().join("hook-env");
    let hook = format!(
        "echo \"${{NOTIFY_SOCKET:-none}} ${{WATCHDOG_USEC:-none}} ${{WATCHDOG_PID:-none}}\" > {}",
        seen.display()
    );
    hooks::run(HookStage::PostUp, &[hook], "wgb0").expect("hook runs");
    let seen = std::fs::read_to_string(&seen).expect("hook wrote its environment");
    assert_eq!(seen, "none none none\n");

    // Nothing else was sent.
    sock.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 64];
    assert!(sock.recv(&mut buf).is_err());
}
