//! The control socket: how `wgbond show` and `wgbond down` talk to a running daemon.
//!
//! One Unix stream socket per interface, `/run/wgbond/NAME.sock` (directory 0700, socket 0600:
//! root only; `WGBOND_RUN_DIR` overrides the directory, for tests). The protocol is one JSON
//! object per line (described in `docs/control-socket.md`):
//!
//! ```text
//! -> {"cmd":"show"}          <- {"ok":true,"status":{...InterfaceStatus...}}
//! -> {"cmd":"down"}          <- {"ok":true}   then the daemon tears down and exits; the
//!                                             connection closes when it has exited
//! ```
//!
//! A failed request answers `{"ok":false,"error":"..."}`.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default directory of control sockets.
pub const RUN_DIR: &str = "/run/wgbond";
/// Longest request line the daemon reads.
pub const MAX_REQUEST: usize = 4096;

/// The directory holding control sockets (`WGBOND_RUN_DIR` or [`RUN_DIR`]).
pub fn run_dir() -> PathBuf {
    std::env::var_os("WGBOND_RUN_DIR")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(RUN_DIR), PathBuf::from)
}

/// The control socket of interface `name`.
pub fn socket_path(name: &str) -> PathBuf {
    run_dir().join(format!("{name}.sock"))
}

/// The log file a background daemon writes (stdout and stderr).
pub fn log_path(name: &str) -> PathBuf {
    run_dir().join(format!("{name}.log"))
}

/// A request to the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Report the interface's status.
    Show,
    /// Tear down and exit.
    Down,
}

/// The daemon's answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The status, for `show`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<InterfaceStatus>,
}

/// What `show` reports for one interface (`wgbond show --json` prints a list of these).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    /// Interface (TUN device) name.
    pub name: String,
    /// `site` or `hub`.
    pub role: String,
    /// Our public key (base64).
    pub public_key: String,
    /// The hub's UDP port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<u16>,
    /// Scheduling mode: auto, stripe, duplicate or failover.
    pub mode: String,
    /// Daemon process id.
    pub pid: u32,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// Interface-wide drop counters.
    pub drops: InterfaceDrops,
    /// One entry per configured peer.
    pub peers: Vec<PeerStatus>,
}

/// Packets the daemon dropped outside any one peer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceDrops {
    /// Packets from TUN whose destination is in no peer's allowed IPs.
    pub tx_no_route: u64,
    /// Inner packets the TUN device would not take (queue full).
    pub tun_write: u64,
    /// Datagrams the UDP socket would not send (buffer full, network unreachable).
    pub udp_send: u64,
    /// Site: packets for a link whose WireGuard session is not (yet) established.
    #[serde(default)]
    pub no_session_tx: u64,
    /// Received datagrams that were not WireGuard messages.
    pub malformed: u64,
    /// Received datagrams that failed authentication.
    pub unauthenticated: u64,
    /// Replayed datagrams.
    pub replayed: u64,
    /// Hub: handshakes from keys that are not configured peers.
    pub unknown_peer: u64,
    /// Hub: datagrams for session indexes we do not have.
    pub no_session: u64,
    /// Hub: authenticated datagrams on sessions no link hello has bound yet.
    pub unbound: u64,
    /// Handshakes answered with a cookie because of load.
    pub rate_limited: u64,
}

/// One peer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The peer's public key (base64).
    pub public_key: String,
    /// Its name from the config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Site: the configured endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Allowed IPs.
    pub allowed_ips: Vec<String>,
    /// Seconds since the most recent handshake on any of its links.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_handshake_secs: Option<u64>,
    /// Plaintext bytes sent over all links.
    pub tx_bytes: u64,
    /// Plaintext bytes received over all links.
    pub rx_bytes: u64,
    /// Received inner packets dropped because their source is outside the allowed IPs.
    pub rx_source_drops: u64,
    /// The bond's counters.
    pub bond: BondStatus,
    /// The links, site numbering.
    pub links: Vec<LinkStatus>,
}

/// Counters of a peer's bond.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BondStatus {
    /// Inner packets accepted from TUN.
    pub sent_packets: u64,
    /// Inner packets dropped before sending (no link up, queues full).
    pub send_drops: u64,
    /// Inner packets delivered to TUN.
    pub delivered_packets: u64,
    /// Duplicate copies dropped by the receiver.
    pub rx_duplicates: u64,
    /// Gaps skipped after the reorder timeout.
    pub reorder_skips: u64,
    /// Packets that arrived after their gap had been skipped.
    pub reorder_late: u64,
    /// Plaintexts the bond could not decode.
    pub malformed: u64,
    /// Current adaptive reorder timeout, milliseconds.
    pub reorder_timeout_ms: f64,
    /// Longest time a packet waited in the reorder buffer, milliseconds.
    #[serde(default)]
    pub reorder_max_wait_ms: f64,
    /// Data goes with the 12-byte trailer (false: the peer has not said it reads it, as an
    /// older wgbond does not).
    #[serde(default)]
    pub compact_trailers: bool,
}

/// One link of a peer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// Link number (the site's numbering, config order).
    pub id: u8,
    /// Link name.
    pub name: String,
    /// probing, up, degraded or down.
    pub state: String,
    /// Remote address: the hub on a site, the link's current source on a hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Site: what the socket is bound to (interface or address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
    /// Smoothed RTT, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// Minimum RTT, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_rtt_ms: Option<f64>,
    /// RTT variation (jitter), milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter_ms: Option<f64>,
    /// Loss rate, 0..1.
    pub loss: f64,
    /// Estimated capacity, bit/s.
    pub rate_bps: u64,
    /// Pacing rate, bit/s.
    pub pacing_rate_bps: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Duplicate copies sent.
    pub tx_duplicates: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets dropped from the link's send queue.
    pub queue_drops: u64,
    /// Packets lost on the link and sent again after the peer's NACK.
    #[serde(default)]
    pub retransmits: u64,
    /// Seconds since the link's last WireGuard handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_handshake_secs: Option<u64>,
    /// WireGuard handshakes completed on this link.
    pub handshakes: u64,
    /// Datagrams rejected on this link (bad, replayed).
    pub rx_rejected: u64,
}

/// Sends one request to the daemon of `name` and reads its reply.
pub fn request(name: &str, req: Request, timeout: Duration) -> Result<Reply, String> {
    let (reply, _) = request_keep(name, req, timeout)?;
    Ok(reply)
}

/// Like [`request`], and returns the connection too (to wait for its end after `down`).
fn request_keep(
    name: &str,
    req: Request,
    timeout: Duration,
) -> Result<(Reply, BufReader<UnixStream>), String> {
    let path = socket_path(name);
    let stream = UnixStream::connect(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            format!(
                "interface `{name}` is not up (no daemon at {})",
                path.display()
            )
        }
        _ => format!("cannot reach the daemon at {}: {e}", path.display()),
    })?;
    let io_err = |e: std::io::Error| format!("control socket {}: {e}", path.display());
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let mut line = serde_json::to_string(&req).map_err(|e| e.to_string())?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io_err)?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader
        .by_ref()
        .take(16 << 20)
        .read_line(&mut answer)
        .map_err(io_err)?;
    if answer.is_empty() {
        return Err(format!(
            "the daemon at {} closed the connection without answering",
            path.display()
        ));
    }
    let reply: Reply = serde_json::from_str(&answer)
        .map_err(|e| format!("bad answer from the daemon at {}: {e}", path.display()))?;
    Ok((reply, reader))
}

/// The status of interface `name`.
pub fn show(name: &str) -> Result<InterfaceStatus, String> {
    let reply = request(name, Request::Show, Duration::from_secs(5))?;
    match (reply.ok, reply.status) {
        (true, Some(s)) => Ok(s),
        _ => Err(reply
            .error
            .unwrap_or_else(|| "no status in the answer".into())),
    }
}

/// Asks the daemon of `name` to tear down, and waits (up to `timeout`) until it has exited.
pub fn down(name: &str, timeout: Duration) -> Result<(), String> {
    let (reply, mut conn) = request_keep(name, Request::Down, timeout)?;
    if !reply.ok {
        return Err(reply.error.unwrap_or_else(|| "the daemon refused".into()));
    }
    // The daemon keeps the connection until it exits: EOF means the teardown is over.
    let mut rest = Vec::new();
    match conn.read_to_end(&mut rest) {
        Ok(_) => Ok(()),
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            Err(format!(
                "`{name}` did not finish going down within {} s",
                timeout.as_secs()
            ))
        }
        // A reset also means the process is gone.
        Err(_) => Ok(()),
    }
}

/// Names of the interfaces with a control socket in the run directory, sorted.
pub fn running_interfaces() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(run_dir()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".sock").map(str::to_owned)
        })
        .collect();
    names.sort();
    names
}

/// `wg show`-style text for one interface.
pub fn format_status(s: &InterfaceStatus) -> String {
    format_status_with_rates(s, &LinkRates::new())
}

/// What each link carried per second between two snapshots, bit/s sent and received, keyed
/// by interface name, peer public key and link id.
pub type LinkRates = std::collections::HashMap<(String, String, u8), (u64, u64)>;

/// The rates of every link found in both `before` and `after`, taken `secs` apart, counted
/// as on the wire like the estimated `rate` (plaintext plus [`crate::bond::TUNNEL_OVERHEAD`]
/// per data packet). A link of a daemon that restarted in between (another pid), or whose
/// counters went backwards, has none.
pub fn link_rates(before: &[InterfaceStatus], after: &[InterfaceStatus], secs: f64) -> LinkRates {
    let mut old = std::collections::HashMap::new();
    for i in before {
        for p in &i.peers {
            for l in &p.links {
                old.insert(
                    (i.name.clone(), i.pid, p.public_key.clone(), l.id),
                    (l.tx_bytes, l.rx_bytes, l.tx_packets, l.rx_packets),
                );
            }
        }
    }
    let mut rates = LinkRates::new();
    if secs.is_nan() || secs <= 0.0 {
        return rates;
    }
    for i in after {
        for p in &i.peers {
            for l in &p.links {
                let Some(&(tx0, rx0, txp0, rxp0)) =
                    old.get(&(i.name.clone(), i.pid, p.public_key.clone(), l.id))
                else {
                    continue;
                };
                let grown = |now: u64, then: u64| now.checked_sub(then);
                if let (Some(tx), Some(rx), Some(txp), Some(rxp)) = (
                    grown(l.tx_bytes, tx0),
                    grown(l.rx_bytes, rx0),
                    grown(l.tx_packets, txp0),
                    grown(l.rx_packets, rxp0),
                ) {
                    let overhead = crate::bond::TUNNEL_OVERHEAD as u64;
                    let bps = |b: u64, n: u64| {
                        (b.saturating_add(n.saturating_mul(overhead)) as f64 * 8.0 / secs) as u64
                    };
                    rates.insert(
                        (i.name.clone(), p.public_key.clone(), l.id),
                        (bps(tx, txp), bps(rx, rxp)),
                    );
                }
            }
        }
    }
    rates
}

/// [`format_status`] with what each link carries now (`show --watch`): a `now:` line per
/// link and per peer (the sum of its links) where `rates` has one.
pub fn format_status_with_rates(s: &InterfaceStatus, rates: &LinkRates) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(o, "interface: {}", s.name);
    let _ = writeln!(o, "  public key: {}", s.public_key);
    let _ = writeln!(o, "  role: {}", s.role);
    if let Some(p) = s.listen_port {
        let _ = writeln!(o, "  listening port: {p}");
    }
    let _ = writeln!(o, "  mode: {}", s.mode);
    let d = &s.drops;
    let drops = [
        ("no route", d.tx_no_route),
        ("tun full", d.tun_write),
        ("udp send", d.udp_send),
        ("link without session", d.no_session_tx),
        ("malformed", d.malformed),
        ("unauthenticated", d.unauthenticated),
        ("replayed", d.replayed),
        ("unknown peer", d.unknown_peer),
        ("no session", d.no_session),
        ("unbound", d.unbound),
        ("rate limited", d.rate_limited),
    ];
    let nonzero: Vec<String> = drops
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(what, n)| format!("{n} {what}"))
        .collect();
    if !nonzero.is_empty() {
        let _ = writeln!(o, "  dropped: {}", nonzero.join(", "));
    }
    for p in &s.peers {
        let _ = writeln!(o);
        match &p.name {
            Some(n) => {
                let _ = writeln!(o, "peer: {} ({n})", p.public_key);
            }
            None => {
                let _ = writeln!(o, "peer: {}", p.public_key);
            }
        }
        if let Some(e) = &p.endpoint {
            let _ = writeln!(o, "  endpoint: {e}");
        }
        let _ = writeln!(o, "  allowed ips: {}", p.allowed_ips.join(", "));
        if let Some(h) = p.latest_handshake_secs {
            let _ = writeln!(o, "  latest handshake: {}", ago(h));
        }
        let _ = writeln!(
            o,
            "  transfer: {} received, {} sent",
            bytes(p.rx_bytes),
            bytes(p.tx_bytes)
        );
        let b = &p.bond;
        let _ = writeln!(
            o,
            "  bond: {} packets sent, {} delivered, {} duplicates dropped, {} gaps skipped, reorder wait {:.1} ms (longest {:.1} ms)",
            b.sent_packets,
            b.delivered_packets,
            b.rx_duplicates,
            b.reorder_skips,
            b.reorder_timeout_ms,
            b.reorder_max_wait_ms
        );
        if !b.compact_trailers && b.delivered_packets > 0 {
            // Only worth a line when it costs: the peer is of an earlier version.
            let _ = writeln!(
                o,
                "  wire: 20-byte trailers (the peer has not said it reads 12-byte ones: an older wgbond does not)"
            );
        }
        if p.rx_source_drops > 0 || b.send_drops > 0 || b.malformed > 0 {
            let _ = writeln!(
                o,
                "  dropped: {} outside allowed ips, {} unsendable, {} malformed",
                p.rx_source_drops, b.send_drops, b.malformed
            );
        }
        let rate_of = |l: &LinkStatus| rates.get(&(s.name.clone(), p.public_key.clone(), l.id));
        let now: Vec<(u64, u64)> = p.links.iter().filter_map(|l| rate_of(l).copied()).collect();
        if !now.is_empty() {
            let _ = writeln!(
                o,
                "  now: {} sent, {} received over all links",
                rate(now.iter().map(|r| r.0).sum()),
                rate(now.iter().map(|r| r.1).sum())
            );
        }
        // Each link's share of the packets sent, so that striping is visible at a glance.
        let total_tx: u64 = p.links.iter().map(|l| l.tx_packets).sum();
        for l in &p.links {
            let _ = writeln!(o, "  link {} [{}]: {}", l.name, l.id, l.state);
            if let Some(&(tx, rx)) = rate_of(l) {
                let _ = writeln!(o, "    now: {} sent, {} received", rate(tx), rate(rx));
            }
            if let Some(e) = &l.endpoint {
                match &l.bind {
                    Some(b) => {
                        let _ = writeln!(o, "    endpoint: {e} via {b}");
                    }
                    None => {
                        let _ = writeln!(o, "    endpoint: {e}");
                    }
                }
            }
            match (l.rtt_ms, l.min_rtt_ms, l.jitter_ms) {
                (Some(r), m, j) => {
                    let _ = writeln!(
                        o,
                        "    rtt: {r:.1} ms (min {:.1}, jitter {:.1}), loss {:.1}%, rate {} (pacing {})",
                        m.unwrap_or(r),
                        j.unwrap_or(0.0),
                        l.loss * 100.0,
                        rate(l.rate_bps),
                        rate(l.pacing_rate_bps)
                    );
                }
                (None, ..) => {
                    let _ = writeln!(o, "    rtt: -, loss {:.1}%", l.loss * 100.0);
                }
            }
            let _ = writeln!(
                o,
                "    transfer: {} received, {} sent ({:.0}% of packets, {} duplicates, {} lost and resent)",
                bytes(l.rx_bytes),
                bytes(l.tx_bytes),
                l.tx_packets as f64 * 100.0 / total_tx.max(1) as f64,
                l.tx_duplicates,
                l.retransmits
            );
            if let Some(h) = l.latest_handshake_secs {
                let _ = writeln!(o, "    latest handshake: {}", ago(h));
            }
            if l.queue_drops > 0 || l.rx_rejected > 0 {
                let _ = writeln!(
                    o,
                    "    dropped: {} queue, {} rejected",
                    l.queue_drops, l.rx_rejected
                );
            }
        }
    }
    o
}

/// "1 minute, 5 seconds ago", like `wg show`.
fn ago(secs: u64) -> String {
    if secs == 0 {
        return "Now".into();
    }
    let parts = [
        (secs / 86_400, "day"),
        (secs / 3600 % 24, "hour"),
        (secs / 60 % 60, "minute"),
        (secs % 60, "second"),
    ];
    let words: Vec<String> = parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n} {unit}{}", if *n == 1 { "" } else { "s" }))
        .collect();
    format!("{} ago", words.join(", "))
}

/// Bytes with a binary unit, like `wg show`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// A rate in bit/s with a decimal unit.
fn rate(bps: u64) -> String {
    if bps >= 1_000_000 {
        format!("{:.1} Mbit/s", bps as f64 / 1e6)
    } else {
        format!("{:.0} kbit/s", bps as f64 / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format() {
        assert_eq!(
            serde_json::to_string(&Request::Show).unwrap(),
            r#"{"cmd":"show"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"down"}"#).unwrap(),
            Request::Down
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
        let r = Reply {
            ok: false,
            error: Some("x".into()),
            status: None,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"ok":false,"error":"x"}"#
        );
    }

    #[test]
    fn status_round_trips_and_formats() {
        let s = InterfaceStatus {
            name: "site".into(),
            role: "site".into(),
            public_key: "PUB".into(),
            mode: "auto".into(),
            peers: vec![PeerStatus {
                public_key: "HUB".into(),
                endpoint: Some("hub:51820".into()),
                allowed_ips: vec!["0.0.0.0/0".into()],
                latest_handshake_secs: Some(65),
                tx_bytes: 3 << 20,
                links: vec![LinkStatus {
                    id: 1,
                    name: "lte".into(),
                    state: "up".into(),
                    endpoint: Some("192.0.2.1:51820".into()),
                    bind: Some("wwan0".into()),
                    rtt_ms: Some(42.5),
                    rate_bps: 20_000_000,
                    ..LinkStatus::default()
                }],
                ..PeerStatus::default()
            }],
            ..InterfaceStatus::default()
        };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<InterfaceStatus>(&json).unwrap(), s);
        let text = format_status(&s);
        assert!(text.contains("peer: HUB"), "{text}");
        assert!(
            text.contains("latest handshake: 1 minute, 5 seconds ago"),
            "{text}"
        );
        assert!(
            text.contains("transfer: 0 B received, 3.00 MiB sent"),
            "{text}"
        );
        assert!(text.contains("link lte [1]: up"), "{text}");
        assert!(
            text.contains("endpoint: 192.0.2.1:51820 via wwan0"),
            "{text}"
        );
        assert!(text.contains("rtt: 42.5 ms"), "{text}");
        assert!(text.contains("rate 20.0 Mbit/s (pacing "), "{text}");
        assert!(text.contains("% of packets, "), "{text}");
        assert!(text.contains("(longest "), "{text}");
        assert!(!text.contains("now:"), "{text}");
        // Nothing delivered yet: no word on the trailer. Traffic from an older peer: a line.
        assert!(!text.contains("wire:"), "{text}");
        let mut old_peer = s.clone();
        old_peer.peers[0].bond.delivered_packets = 10;
        assert!(
            format_status(&old_peer).contains("  wire: 20-byte trailers (the peer has not said"),
            "{text}"
        );
        old_peer.peers[0].bond.compact_trailers = true;
        assert!(!format_status(&old_peer).contains("wire:"));
    }

    #[test]
    fn rates_come_from_two_snapshots_and_show_per_link_and_peer() {
        let snapshot = |tx: u64, rx: u64| InterfaceStatus {
            name: "site".into(),
            peers: vec![PeerStatus {
                public_key: "HUB".into(),
                links: vec![
                    LinkStatus {
                        id: 0,
                        name: "cable".into(),
                        state: "up".into(),
                        tx_bytes: tx,
                        rx_bytes: rx,
                        ..LinkStatus::default()
                    },
                    LinkStatus {
                        id: 1,
                        name: "lte".into(),
                        tx_bytes: tx / 2,
                        rx_bytes: rx,
                        ..LinkStatus::default()
                    },
                ],
                ..PeerStatus::default()
            }],
            ..InterfaceStatus::default()
        };
        let before = snapshot(1_000_000, 5_000_000);
        let after = snapshot(3_000_000, 5_125_000);
        // Two seconds apart: 2 MB more sent on cable is 8 Mbit/s, 1 MB on lte 4 Mbit/s.
        let rates = link_rates(
            std::slice::from_ref(&before),
            std::slice::from_ref(&after),
            2.0,
        );
        let key = |id| ("site".to_string(), "HUB".to_string(), id);
        assert_eq!(rates.get(&key(0)), Some(&(8_000_000, 500_000)));
        assert_eq!(rates.get(&key(1)), Some(&(4_000_000, 500_000)));
        let text = format_status_with_rates(&after, &rates);
        assert!(
            text.contains("now: 12.0 Mbit/s sent, 1.0 Mbit/s received over all links"),
            "{text}"
        );
        assert!(
            text.contains("link cable [0]: up\n    now: 8.0 Mbit/s sent, 500 kbit/s received"),
            "{text}"
        );
        // Counters that went backwards, or another daemon (pid) with counters that have
        // already passed the old ones, give no rate, nor does a link the first snapshot did
        // not have.
        let rates = link_rates(
            std::slice::from_ref(&after),
            std::slice::from_ref(&before),
            2.0,
        );
        assert!(rates.is_empty(), "{rates:?}");
        let restarted = InterfaceStatus {
            pid: 4242,
            ..after.clone()
        };
        assert!(link_rates(std::slice::from_ref(&before), &[restarted], 2.0).is_empty());
        assert!(link_rates(&[], std::slice::from_ref(&before), 2.0).is_empty());
        // Each data packet counts its 60 bytes of WireGuard/UDP/IP as well, as `rate` does:
        // 1000 packets of 1000 bytes in a second are 8.48 Mbit/s on the wire.
        let mut a = before.clone();
        let mut b = before;
        a.peers[0].links[0].tx_packets = 5;
        b.peers[0].links[0].tx_packets = 1005;
        b.peers[0].links[0].tx_bytes += 1_000_000;
        let rates = link_rates(&[a], &[b], 1.0);
        assert_eq!(rates.get(&key(0)).map(|r| r.0), Some(8_480_000));
    }
}
