//! `spawn_until_ready`: `wgbond up` in the background waits for the daemon's READY=1 and reports
//! its STATUS= reason when it fails. The "daemon" is this test binary run again with a role.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wgbond::io::systemd::{self, ReadyError};

const ROLE: &str = "WGBOND_TEST_DAEMON_ROLE";

/// Not a test on its own: what the re-executed binary does, by role.
#[test]
fn daemon_role() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    match role.as_str() {
        "ready" => {
            systemd::notify_status("starting");
            std::thread::sleep(Duration::from_millis(100));
            systemd::notify_ready("site: 0/2 links up (cable probing, lte probing)");
            // Stay up until the test kills us, at most 30 s.
            std::thread::sleep(Duration::from_secs(30));
        }
        "fail" => {
            systemd::notify_status("link `lte`: interface wwan0 does not exist");
            std::process::exit(1);
        }
        "exit" => std::process::exit(3),
        _ => std::thread::sleep(Duration::from_secs(30)), // silent: never ready
    }
}

fn daemon(role: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args(["daemon_role", "--exact", "--test-threads=1"])
        .env(ROLE, role)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

#[test]
fn returns_once_ready_with_the_daemon_detached() {
    let start = Instant::now();
    let mut child = systemd::spawn_until_ready(&mut daemon("ready"), Duration::from_secs(20))
        .expect("daemon becomes ready");
    assert!(
        start.elapsed() >= Duration::from_millis(100),
        "not before READY=1"
    );
    assert!(
        child.try_wait().expect("wait").is_none(),
        "daemon still runs"
    );
    let pid = child.id() as libc::pid_t;
    // SAFETY: getsid only reads the process table.
    let session = unsafe { libc::getsid(pid) };
    assert_eq!(session, pid, "daemon leads its own session");
    child.kill().expect("kill");
    child.wait().expect("reap");
}

#[test]
fn failure_reason_comes_from_status() {
    let err = systemd::spawn_until_ready(&mut daemon("fail"), Duration::from_secs(20))
        .expect_err("daemon fails");
    assert!(matches!(err, ReadyError::Exited { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "link `lte`: interface wwan0 does not exist"
    );
}

#[test]
fn exit_without_reason_shows_the_exit_status() {
    let err = systemd::spawn_until_ready(&mut daemon("exit"), Duration::from_secs(20))
        .expect_err("daemon exits");
    assert_eq!(err.to_string(), "the daemon exited (exit status: 3)");
}

#[test]
fn silent_daemon_times_out_and_is_killed() {
    let start = Instant::now();
    let err = systemd::spawn_until_ready(&mut daemon("silent"), Duration::from_millis(500))
        .expect_err("no READY=1");
    assert!(matches!(err, ReadyError::Timeout { .. }), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn missing_program_is_an_io_error() {
    let err = systemd::spawn_until_ready(
        &mut Command::new("/nonexistent/wgbond"),
        Duration::from_secs(1),
    )
    .expect_err("no such program");
    assert!(matches!(err, ReadyError::Io(_)), "{err:?}");
}
