//! Service-manager notifications (`sd_notify(3)`): readiness, status, watchdog, reload, stop.
//!
//! Every function is a no-op when the daemon was not started by systemd with `Type=notify`
//! (no `NOTIFY_SOCKET`), so the daemon calls them unconditionally. The environment is read
//! once, at the first call; hooks and other children should not inherit it
//! ([`CHILD_ENV_REMOVE`]).
//!
//! Where the daemon calls them:
//! ```no_run
//! use wgbond::io::systemd;
//! # fn interface_up_and_links_probing() {}
//! interface_up_and_links_probing();
//! # let snapshot = wgbond::io::metrics::MetricsSnapshot::default();
//! systemd::notify_ready(&systemd::status_summary(&snapshot)); // "site: 0/3 links up (...)"
//! // In the event loop, on every turn (it sends at most once per watchdog_interval()):
//! let mut watchdog = systemd::Watchdog::from_env();
//! watchdog.kick(std::time::Instant::now());
//! // ... and wake no later than watchdog.deadline().
//! // SIGHUP: reload, then READY=1 again with the new summary.
//! systemd::notify_reloading();
//! systemd::notify_ready(&systemd::status_summary(&snapshot));
//! // SIGTERM: before tearing down.
//! systemd::notify_stopping();
//! ```
//!
//! Written here rather than with the `sd-notify` crate because that crate reads the environment
//! on every call and can only forget it by `env::remove_var`, which races with other threads in
//! a multi-threaded runtime; it cannot reach abstract-namespace sockets (`@name`); and it opens a
//! socket per message. [`Notifier`] takes its address explicitly, so it is tested without
//! touching the process environment.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::io::metrics::{state_label, LinkMetrics, MetricsSnapshot};

/// Environment variables that describe our own service-manager connection; a child process
/// (a hook) must not inherit them, or it could speak for the daemon.
pub const CHILD_ENV_REMOVE: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// The notifier for `NOTIFY_SOCKET`, or `None` when it is unset or unusable (then a
    /// warning is logged: systemd would wait for READY=1 in vain).
    pub fn from_env() -> Option<Self> {
        let value = std::env::var_os("NOTIFY_SOCKET")?;
        let value = value.to_string_lossy();
        match Self::new(&value) {
            Ok(notifier) => Some(notifier),
            Err(e) => {
                tracing::warn!("NOTIFY_SOCKET={value} is unusable, systemd is not notified: {e}");
                None
            }
        }
    }

    /// A notifier sending to `address`: a socket path, or `@name` for an abstract socket.
    pub fn new(address: &str) -> io::Result<Self> {
        let addr = parse_address(address)?;
        let socket = UnixDatagram::unbound()?;
        // Never stall the data path on a busy service manager; a lost keep-alive is resent.
        socket.set_nonblocking(true)?;
        Ok(Self { socket, addr })
    }

    /// Sends one datagram of `KEY=VALUE` lines.
    pub fn send(&self, state: &str) -> io::Result<()> {
        let sent = self.socket.send_to_addr(state.as_bytes(), &self.addr)?;
        if sent == state.len() {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::WriteZero, "short datagram"))
        }
    }
}

fn parse_address(address: &str) -> io::Result<SocketAddr> {
    if let Some(name) = address.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt as _;
        SocketAddr::from_abstract_name(name.as_bytes())
    } else if address.starts_with('/') {
        SocketAddr::from_pathname(address)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "expected an absolute path or @name",
        ))
    }
}

/// `READY=1` with a status line, as a datagram.
pub fn ready_message(status: &str) -> String {
    format!("READY=1\nSTATUS={}", one_line(status))
}

/// `STATUS=` as a datagram.
pub fn status_message(status: &str) -> String {
    format!("STATUS={}", one_line(status))
}

/// `RELOADING=1` with the `MONOTONIC_USEC` that systemd 253+ requires with it.
fn reloading_message() -> String {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always available.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc == 0 {
        let usec = (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000;
        format!("RELOADING=1\nMONOTONIC_USEC={usec}")
    } else {
        "RELOADING=1".to_owned()
    }
}

/// A status is one line: a newline would start another `KEY=VALUE` field.
fn one_line(status: &str) -> String {
    status.replace(['\n', '\r'], " ")
}

/// The keep-alive interval when systemd's watchdog is on for this process: half of
/// `WATCHDOG_USEC`, as `sd_watchdog_enabled(3)` recommends. `pid` is ours.
pub fn watchdog_interval_from(
    usec: Option<&str>,
    watchdog_pid: Option<&str>,
    pid: u32,
) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    // WATCHDOG_PID, when set, names the process the watchdog is meant for.
    if let Some(p) = watchdog_pid {
        if p.trim().parse::<u32>().ok()? != pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}

struct Manager {
    notifier: Option<Notifier>,
    watchdog: Option<Duration>,
}

fn manager() -> &'static Manager {
    static MANAGER: OnceLock<Manager> = OnceLock::new();
    MANAGER.get_or_init(|| {
        let env = |k: &str| std::env::var(k).ok();
        let watchdog = watchdog_interval_from(
            env("WATCHDOG_USEC").as_deref(),
            env("WATCHDOG_PID").as_deref(),
            std::process::id(),
        );
        Manager {
            notifier: Notifier::from_env(),
            watchdog,
        }
    })
}

fn send(state: &str) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Some(n) = &manager().notifier {
        if let Err(e) = n.send(state) {
            // The first line names the notification (READY=1, WATCHDOG=1, ...).
            let what = state.lines().next().unwrap_or_default();
            // Once is enough: after `up` in the background returns, its socket is gone for good.
            if WARNED.swap(true, Ordering::Relaxed) {
                tracing::debug!("cannot notify the service manager ({what}): {e}");
            } else {
                tracing::warn!("cannot notify the service manager ({what}): {e}");
            }
        }
    }
}

/// Tells systemd the service is up (`READY=1`), with a one-line status. Call once the
/// interface exists and the links are probing, and again after each reload.
pub fn notify_ready(status: &str) {
    send(&ready_message(status));
}

/// Updates the one-line status shown by `systemctl status`.
pub fn notify_status(status: &str) {
    send(&status_message(status));
}

/// Watchdog keep-alive (`WATCHDOG=1`). Call every [`watchdog_interval`] from the data path,
/// so a stuck event loop gets the service restarted.
pub fn notify_watchdog() {
    send("WATCHDOG=1");
}

/// How often to call [`notify_watchdog`]; `None` when systemd's watchdog is off.
pub fn watchdog_interval() -> Option<Duration> {
    manager().watchdog
}

/// Tells systemd a reload began (`RELOADING=1`); follow with [`notify_ready`] when done.
pub fn notify_reloading() {
    send(&reloading_message());
}

/// Tells systemd the service is stopping (`STOPPING=1`), before the teardown starts.
pub fn notify_stopping() {
    send("STOPPING=1");
}

/// Sends `WATCHDOG=1` from the daemon's event loop: call [`Watchdog::kick`] on every turn of
/// the loop; it sends at most once per [`watchdog_interval`]. Kept in the data path rather than
/// on a timer task of its own, so a stuck loop stops the keep-alives and systemd restarts us.
#[derive(Debug)]
pub struct Watchdog {
    interval: Option<Duration>,
    last: Option<Instant>,
    notifier: Option<Notifier>,
}

impl Watchdog {
    /// The watchdog systemd configured for this process (a no-op without one).
    pub fn from_env() -> Self {
        Self {
            interval: watchdog_interval(),
            last: None,
            notifier: None,
        }
    }

    /// A watchdog sending to `notifier` every `interval`.
    pub fn with_notifier(notifier: Notifier, interval: Duration) -> Self {
        Self {
            interval: Some(interval),
            last: None,
            notifier: Some(notifier),
        }
    }

    /// The latest time by which the loop must call [`Watchdog::kick`] again; `None` when the
    /// watchdog is off. Arm the loop's timer no later than this.
    pub fn deadline(&self) -> Option<Instant> {
        Some(self.last? + self.interval?)
    }

    /// Sends `WATCHDOG=1` if the interval has passed since the last one; returns whether it did.
    pub fn kick(&mut self, now: Instant) -> bool {
        let Some(interval) = self.interval else {
            return false;
        };
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < interval)
        {
            return false;
        }
        self.last = Some(now);
        match &self.notifier {
            Some(n) => {
                if let Err(e) = n.send("WATCHDOG=1") {
                    tracing::warn!("cannot notify systemd (WATCHDOG=1): {e}");
                }
            }
            None => notify_watchdog(),
        }
        true
    }
}

/// A one-line status for `systemctl status`, from the metrics snapshot: per peer, how many
/// links are up and which are not; kept short for a hub with many peers.
pub fn status_summary(snapshot: &MetricsSnapshot) -> String {
    let state_of = |l: &LinkMetrics| state_label(l.stats.state);
    let links: Vec<&LinkMetrics> = snapshot.peers.iter().flat_map(|p| &p.links).collect();
    let up = links.iter().filter(|l| state_of(l) == "up").count();
    match snapshot.peers.as_slice() {
        [] => format!("{}: no peers", snapshot.interface),
        [peer] => {
            let mut line = format!("{}: {up}/{} links up", snapshot.interface, links.len());
            let others: Vec<String> = peer
                .links
                .iter()
                .filter(|l| state_of(l) != "up")
                .map(|l| format!("{} {}", l.stats.name, state_of(l)))
                .collect();
            if !others.is_empty() {
                line.push_str(&format!(" ({})", others.join(", ")));
            }
            line
        }
        peers => {
            let connected = peers
                .iter()
                .filter(|p| p.links.iter().any(|l| state_of(l) == "up"))
                .count();
            format!(
                "{}: {connected}/{} peers connected, {up}/{} links up",
                snapshot.interface,
                peers.len(),
                links.len()
            )
        }
    }
}

/// Why a daemon started by [`spawn_until_ready`] did not become ready.
#[derive(Debug)]
pub enum ReadyError {
    /// The notification socket or the process could not be set up.
    Io(io::Error),
    /// The daemon exited first; `status` is its last `STATUS=` (its reason), if it sent one.
    Exited {
        /// How it exited.
        exit: std::process::ExitStatus,
        /// Its last `STATUS=` line.
        status: Option<String>,
    },
    /// It sent no `READY=1` in time and was killed.
    Timeout {
        /// How long we waited.
        waited: Duration,
        /// Its last `STATUS=` line.
        status: Option<String>,
    },
}

impl std::fmt::Display for ReadyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "cannot start the daemon: {e}"),
            Self::Exited {
                status: Some(s), ..
            } => f.write_str(s),
            Self::Exited { exit, status: None } => write!(f, "the daemon exited ({exit})"),
            Self::Timeout { waited, status } => {
                write!(f, "the daemon was not ready after {} s", waited.as_secs())?;
                match status {
                    Some(s) => write!(f, " (last status: {s})"),
                    None => Ok(()),
                }
            }
        }
    }
}

impl std::error::Error for ReadyError {}

/// Starts `command` as a detached daemon (its own session) with `NOTIFY_SOCKET` pointing at a
/// socket of ours, and returns once it sends `READY=1`: what `wgbond up` without `--foreground`
/// needs, using the same notifications the daemon sends to systemd. A daemon that fails should
/// send its one-line reason as `STATUS=` before exiting; it becomes the error. On timeout the
/// daemon is killed. The socket lives in a fresh mode-700 directory, so only root can fake it.
pub fn spawn_until_ready(
    command: &mut std::process::Command,
    timeout: Duration,
) -> Result<std::process::Child, ReadyError> {
    use std::os::unix::fs::DirBuilderExt as _;
    use std::os::unix::process::CommandExt as _;

    let dir = std::env::temp_dir().join(format!(
        "wgbond-ready-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(ReadyError::Io)?;
    let result = (|| {
        let path = dir.join("notify");
        let socket = UnixDatagram::bind(&path)?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        command.env("NOTIFY_SOCKET", &path);
        for key in &CHILD_ENV_REMOVE[1..] {
            command.env_remove(key);
        }
        // SAFETY: setsid is async-signal-safe and touches no memory of ours.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn()?;
        Ok((socket, child))
    })();
    let outcome = match result {
        Ok((socket, child)) => wait_ready(&socket, child, timeout),
        Err(e) => Err(ReadyError::Io(e)),
    };
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

fn wait_ready(
    socket: &UnixDatagram,
    mut child: std::process::Child,
    timeout: Duration,
) -> Result<std::process::Child, ReadyError> {
    let start = Instant::now();
    let mut status: Option<String> = None;
    let mut buf = [0u8; 4096];
    loop {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                let mut ready = false;
                for line in text.lines() {
                    if line == "READY=1" {
                        ready = true;
                    } else if let Some(s) = line.strip_prefix("STATUS=") {
                        status = Some(s.to_owned());
                    }
                }
                if ready {
                    return Ok(child);
                }
                continue; // drain before looking at the process
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ReadyError::Io(e));
            }
        }
        match child.try_wait() {
            Ok(Some(exit)) => {
                // A last datagram may have been sent just before exiting.
                while let Ok(n) = socket.recv(&mut buf) {
                    for line in String::from_utf8_lossy(&buf[..n]).lines() {
                        if let Some(s) = line.strip_prefix("STATUS=") {
                            status = Some(s.to_owned());
                        }
                    }
                }
                return Err(ReadyError::Exited { exit, status });
            }
            Ok(None) => {}
            Err(e) => return Err(ReadyError::Io(e)),
        }
        if start.elapsed() >= timeout {
            // SIGTERM first so the daemon undoes what it configured; SIGKILL only if it hangs.
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill(2) with a PID we own and a valid signal number.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let grace = Instant::now();
            while grace.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            return Err(ReadyError::Timeout {
                waited: timeout,
                status,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> (tempfile::TempDir, UnixDatagram, String) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let path = path.to_str().expect("utf-8 path").to_owned();
        (dir, sock, path)
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn exact_datagrams_arrive() {
        let (_dir, sock, path) = listener();
        let n = Notifier::new(&path).expect("notifier");
        n.send(&ready_message("wg0: 2 links\nSTATUS=evil"))
            .expect("send");
        assert_eq!(recv(&sock), "READY=1\nSTATUS=wg0: 2 links STATUS=evil");
        n.send(&status_message("wg0: cable up")).expect("send");
        assert_eq!(recv(&sock), "STATUS=wg0: cable up");
        n.send("WATCHDOG=1").expect("send");
        assert_eq!(recv(&sock), "WATCHDOG=1");
        let reload = reloading_message();
        n.send(&reload).expect("send");
        let got = recv(&sock);
        let usec = got
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .expect("RELOADING with MONOTONIC_USEC");
        assert!(usec.parse::<u64>().expect("number") > 0);
    }

    #[test]
    fn abstract_socket_addresses_work() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("wgbond-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let sock = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        sock.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let n = Notifier::new(&format!("@{name}")).expect("notifier");
        n.send("STOPPING=1").expect("send");
        assert_eq!(recv(&sock), "STOPPING=1");
    }

    #[test]
    fn bad_addresses_are_rejected_and_gone_listener_is_an_error() {
        assert!(Notifier::new("relative/path").is_err());
        let (dir, sock, path) = listener();
        let n = Notifier::new(&path).expect("notifier");
        drop(sock);
        drop(dir);
        assert!(n.send("WATCHDOG=1").is_err());
    }

    #[test]
    fn watchdog_interval_is_half_and_checks_pid() {
        let half = Some(Duration::from_secs(15));
        assert_eq!(watchdog_interval_from(Some("30000000"), None, 7), half);
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("7"), 7), half);
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval_from(None, Some("7"), 7), None);
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("x"), 7), None);
    }

    #[test]
    fn watchdog_kicks_once_per_interval() {
        let (_dir, sock, path) = listener();
        let n = Notifier::new(&path).expect("notifier");
        let mut w = Watchdog::with_notifier(n, Duration::from_secs(15));
        let t0 = Instant::now();
        assert_eq!(w.deadline(), None);
        assert!(w.kick(t0));
        assert_eq!(recv(&sock), "WATCHDOG=1");
        assert_eq!(w.deadline(), Some(t0 + Duration::from_secs(15)));
        assert!(!w.kick(t0 + Duration::from_secs(14)));
        assert!(w.kick(t0 + Duration::from_secs(15)));
        assert_eq!(recv(&sock), "WATCHDOG=1");
        sock.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 16];
        assert!(sock.recv(&mut buf).is_err(), "exactly two keep-alives");
    }

    #[test]
    fn status_summary_lines() {
        use crate::bond::{LinkState, LinkStats};
        use crate::io::metrics::PeerMetrics;
        let link = |name: &str, state| LinkMetrics {
            stats: LinkStats {
                name: name.to_owned(),
                state,
                ..LinkStats::default()
            },
            since_handshake: None,
        };
        let peer = |links| PeerMetrics {
            links,
            ..PeerMetrics::default()
        };
        let mut snap = MetricsSnapshot {
            interface: "site".to_owned(),
            peers: vec![],
            drops: Vec::new(),
        };
        assert_eq!(status_summary(&snap), "site: no peers");
        snap.peers.push(peer(vec![
            link("cable", Some(LinkState::Up)),
            link("lte", Some(LinkState::Degraded)),
            link("sat", None),
        ]));
        assert_eq!(
            status_summary(&snap),
            "site: 1/3 links up (lte degraded, sat probing)"
        );
        snap.peers
            .push(peer(vec![link("a", Some(LinkState::Down))]));
        assert_eq!(
            status_summary(&snap),
            "site: 1/2 peers connected, 1/4 links up"
        );
    }
}
