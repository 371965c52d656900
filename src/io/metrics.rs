//! Prometheus metrics: per-link and per-peer counters and gauges, served over HTTP.
//!
//! The daemon hands over a [`MetricsSnapshot`] (plain data copied from
//! [`Bond::link_stats`](crate::bond::Bond::link_stats) and [`Bond::stats`](crate::bond::Bond::stats));
//! [`render`] turns it into the OpenMetrics text format and [`MetricsServer`] answers
//! `GET /metrics` with it. Every metric name, its labels and its unit are listed in
//! `docs/operations.md`.
//!
//! How the daemon uses it, when `metrics_listen` is set:
//! ```no_run
//! # use std::sync::{Arc, Mutex};
//! # use wgbond::io::metrics::{MetricsServer, MetricsSnapshot};
//! # async fn daemon(addr: std::net::SocketAddr) -> std::io::Result<()> {
//! // Bind before READY=1, so a busy port fails `up` with a clear error.
//! let server = MetricsServer::bind(addr).await?;
//! // The event loop refreshes this about once a second (and `show` can read it too).
//! let latest = Arc::new(Mutex::new(MetricsSnapshot::default()));
//! let source = Arc::clone(&latest);
//! tokio::spawn(server.serve(move || source.lock().map(|s| s.clone()).unwrap_or_default()));
//! # Ok(())
//! # }
//! ```

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::bond::{BondStats, LinkState, LinkStats};

/// `Content-Type` of [`render`]'s output (what prometheus-client encodes).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Longest request head accepted (request line and headers); longer ones get 431.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// A connection is closed after this long, whatever it did.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 16;
/// `wgbond_link_state`'s `state` label values, in the order of [`LinkState`].
pub const LINK_STATES: [&str; 4] = ["probing", "up", "degraded", "down"];

/// Everything one scrape shows, for one interface.
#[derive(Clone, Debug, Default)]
pub struct MetricsSnapshot {
    /// The interface (TUN device) name.
    pub interface: String,
    /// Its peers.
    pub peers: Vec<PeerMetrics>,
    /// Interface-wide drop counters by reason (`no_route`, `udp_send`, `unauthenticated`, ...):
    /// packets dropped outside any one peer's bond.
    pub drops: Vec<(String, u64)>,
}

/// One peer's counters.
#[derive(Clone, Debug, Default)]
pub struct PeerMetrics {
    /// The configured peer name, if any (used as the `peer` label instead of the key).
    pub name: Option<String>,
    /// The peer's public key, base64.
    pub public_key: String,
    /// The bond's counters for this peer.
    pub bond: BondStats,
    /// Inner packets dropped because their source is outside the peer's `allowed_ips`.
    pub rx_not_allowed: u64,
    /// The peer's links.
    pub links: Vec<LinkMetrics>,
}

/// One link's counters.
#[derive(Clone, Debug, Default)]
pub struct LinkMetrics {
    /// The bond's counters for the link (`stats.name` is the `link` label).
    pub stats: LinkStats,
    /// Time since the link's WireGuard session last completed a handshake.
    pub since_handshake: Option<Duration>,
}

impl PeerMetrics {
    /// The `peer` label: the configured name, else the public key.
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.public_key)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    interface: String,
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LinkLabels {
    interface: String,
    peer: String,
    link: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LinkStateLabels {
    interface: String,
    peer: String,
    link: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    interface: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

type Counters<L> = Family<L, Counter>;
/// Name, help text and value of a per-peer counter.
type PeerCounter = (&'static str, &'static str, fn(&PeerMetrics) -> u64);
type Gauges<L> = Family<L, Gauge<f64, std::sync::atomic::AtomicU64>>;

/// Escapes a label value for the text format. prometheus-client 0.22 writes label values
/// verbatim, and link names on a hub come from the peer.
fn label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Registers a family and returns it, so families are declared in the order they print.
fn family<M: Default + Clone + prometheus_client::registry::Metric>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
) -> M {
    let metric = M::default();
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, metric.clone()),
        None => registry.register(name, help, metric.clone()),
    }
    metric
}

/// The OpenMetrics text for `snapshot` (see [`CONTENT_TYPE`]).
pub fn render(snapshot: &MetricsSnapshot) -> String {
    render_at(snapshot, SystemTime::now())
}

/// [`render`] with the wall clock given, for handshake timestamps.
pub fn render_at(snapshot: &MetricsSnapshot, now: SystemTime) -> String {
    let mut reg = Registry::default();
    let bytes_per_sec = || Some(Unit::Other("bytes_per_second".to_owned()));
    // A gauge rather than an OpenMetrics info metric, which Prometheus 0.0.4 text parsers reject.
    let build: Gauges<BuildLabels> = family(&mut reg, "wgbond_build_info", "wgbond version", None);
    build
        .get_or_create(&BuildLabels {
            version: label(env!("CARGO_PKG_VERSION")),
        })
        .set(1.0);

    let link_tx_bytes: Counters<LinkLabels> = family(
        &mut reg,
        "wgbond_link_tx",
        "Bytes sent on the link (plaintext handed to WireGuard, including duplicates)",
        Some(Unit::Bytes),
    );
    let link_rx_bytes: Counters<LinkLabels> = family(
        &mut reg,
        "wgbond_link_rx",
        "Bytes received on the link (decrypted plaintext)",
        Some(Unit::Bytes),
    );
    let link_tx_packets: Counters<LinkLabels> = family(
        &mut reg,
        "wgbond_link_tx_packets",
        "Data packets sent on the link, including duplicates",
        None,
    );
    let link_rx_packets: Counters<LinkLabels> = family(
        &mut reg,
        "wgbond_link_rx_packets",
        "Data packets received on the link",
        None,
    );
    let link_dups: Counters<LinkLabels> = family(
        &mut reg,
        "wgbond_link_duplicates_sent",
        "Duplicate copies of packets sent on the link",
        None,
    );
    let link_qdrops: Counters<LinkLabels> = family(
        &mut reg,
        "wgbond_link_queue_drops",
        "Packets dropped because the link's send queue was too long",
        None,
    );
    let link_retx: Counters<LinkLabels> = family(
        &mut reg,
        "wgbond_link_retransmits",
        "Packets lost on the link and sent again after the peer's NACK",
        None,
    );
    let link_rtt: Gauges<LinkLabels> = family(
        &mut reg,
        "wgbond_link_rtt",
        "Smoothed round-trip time over the link",
        Some(Unit::Seconds),
    );
    let link_min_rtt: Gauges<LinkLabels> = family(
        &mut reg,
        "wgbond_link_min_rtt",
        "Lowest recent round-trip time over the link",
        Some(Unit::Seconds),
    );
    let link_rttvar: Gauges<LinkLabels> = family(
        &mut reg,
        "wgbond_link_rtt_variation",
        "Mean deviation of the link's round-trip time",
        Some(Unit::Seconds),
    );
    let link_jitter: Gauges<LinkLabels> = family(
        &mut reg,
        "wgbond_link_jitter",
        "One-way delay variation of our packets as the peer measures it",
        Some(Unit::Seconds),
    );
    let link_loss: Gauges<LinkLabels> = family(
        &mut reg,
        "wgbond_link_loss",
        "Fraction of our data lost on the link over the last second or so",
        Some(Unit::Other("ratio".to_owned())),
    );
    let link_est_rate: Gauges<LinkLabels> = family(
        &mut reg,
        "wgbond_link_estimated_rate",
        "Estimated capacity of the link",
        bytes_per_sec(),
    );
    let link_pacing_rate: Gauges<LinkLabels> = family(
        &mut reg,
        "wgbond_link_pacing_rate",
        "Rate the link is paced at",
        bytes_per_sec(),
    );
    let link_state: Gauges<LinkStateLabels> = family(
        &mut reg,
        "wgbond_link_state",
        "1 for the link's current state (probing, up, degraded, down), 0 for the others",
        None,
    );
    let link_handshake: Gauges<LinkLabels> = family(
        &mut reg,
        "wgbond_link_last_handshake_timestamp",
        "Unix time of the link's last completed WireGuard handshake",
        Some(Unit::Seconds),
    );

    let peer_counters: [PeerCounter; 9] = [
        (
            "wgbond_peer_sent_packets",
            "Inner packets accepted from the interface for this peer",
            |p| p.bond.sent_packets,
        ),
        (
            "wgbond_peer_send_drops",
            "Inner packets dropped before sending (no link up, queues full)",
            |p| p.bond.send_drops,
        ),
        (
            "wgbond_peer_delivered_packets",
            "Inner packets delivered to the interface",
            |p| p.bond.delivered_packets,
        ),
        (
            "wgbond_peer_duplicates_dropped",
            "Duplicate packets dropped by the receiver",
            |p| p.bond.rx_duplicates,
        ),
        (
            "wgbond_peer_reorder_waits",
            "Packets that waited in the reorder buffer",
            |p| p.bond.reorder_waits,
        ),
        (
            "wgbond_peer_reorder_skips",
            "Gaps skipped after the reorder timeout",
            |p| p.bond.reorder_skips,
        ),
        (
            "wgbond_peer_reorder_late",
            "Packets delivered late, after their gap had been skipped",
            |p| p.bond.reorder_late,
        ),
        (
            "wgbond_peer_malformed",
            "Decrypted packets the bond could not decode",
            |p| p.bond.malformed,
        ),
        (
            "wgbond_peer_rx_not_allowed_packets",
            "Received inner packets dropped because their source is outside allowed_ips",
            |p| p.rx_not_allowed,
        ),
    ];
    let peer_counter_families: Vec<Counters<PeerLabels>> = peer_counters
        .iter()
        .map(|(name, help, _)| family(&mut reg, name, help, None))
        .collect();
    let peer_reorder_timeout: Gauges<PeerLabels> = family(
        &mut reg,
        "wgbond_peer_reorder_timeout",
        "Current adaptive reorder timeout",
        Some(Unit::Seconds),
    );
    let peer_reorder_max_wait: Gauges<PeerLabels> = family(
        &mut reg,
        "wgbond_peer_reorder_max_wait",
        "Longest time a packet waited in the reorder buffer",
        Some(Unit::Seconds),
    );
    let peer_handshake: Gauges<PeerLabels> = family(
        &mut reg,
        "wgbond_peer_last_handshake_timestamp",
        "Unix time of the peer's most recent handshake on any link",
        Some(Unit::Seconds),
    );

    let unix = |age: Duration| {
        now.checked_sub(age)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(secs)
    };
    let drops: Counters<DropLabels> = family(
        &mut reg,
        "wgbond_interface_dropped_packets",
        "Packets the daemon dropped outside any one peer's bond, by reason",
        None,
    );

    let interface = label(&snapshot.interface);
    for (reason, count) in &snapshot.drops {
        let labels = DropLabels {
            interface: interface.clone(),
            reason: label(reason),
        };
        drops.get_or_create(&labels).inc_by(*count);
    }
    for peer in &snapshot.peers {
        let pl = PeerLabels {
            interface: interface.clone(),
            peer: label(peer.label()),
        };
        for ((_, _, value), fam) in peer_counters.iter().zip(&peer_counter_families) {
            fam.get_or_create(&pl).inc_by(value(peer));
        }
        peer_reorder_timeout
            .get_or_create(&pl)
            .set(secs(peer.bond.reorder_timeout));
        peer_reorder_max_wait
            .get_or_create(&pl)
            .set(secs(peer.bond.reorder_max_wait_seen));
        let newest = peer.links.iter().filter_map(|l| l.since_handshake).min();
        if let Some(t) = newest.and_then(unix) {
            peer_handshake.get_or_create(&pl).set(t);
        }

        for link in &peer.links {
            let s = &link.stats;
            let ll = LinkLabels {
                interface: pl.interface.clone(),
                peer: pl.peer.clone(),
                link: label(&s.name),
            };
            link_tx_bytes.get_or_create(&ll).inc_by(s.tx_bytes);
            link_rx_bytes.get_or_create(&ll).inc_by(s.rx_bytes);
            link_tx_packets.get_or_create(&ll).inc_by(s.tx_packets);
            link_rx_packets.get_or_create(&ll).inc_by(s.rx_packets);
            link_dups.get_or_create(&ll).inc_by(s.tx_duplicates);
            link_qdrops.get_or_create(&ll).inc_by(s.queue_drops);
            link_retx.get_or_create(&ll).inc_by(s.retransmits);
            // A link not yet measured has no sample, rather than a misleading zero.
            for (fam, value) in [
                (&link_rtt, s.srtt),
                (&link_min_rtt, s.min_rtt),
                (&link_rttvar, s.rttvar),
                (&link_jitter, s.jitter),
            ] {
                if let Some(v) = value {
                    fam.get_or_create(&ll).set(secs(v));
                }
            }
            link_loss.get_or_create(&ll).set(s.loss);
            link_est_rate
                .get_or_create(&ll)
                .set(s.est_rate_bps as f64 / 8.0);
            link_pacing_rate
                .get_or_create(&ll)
                .set(s.pacing_rate_bps as f64 / 8.0);
            if let Some(t) = link.since_handshake.and_then(unix) {
                link_handshake.get_or_create(&ll).set(t);
            }
            let current = state_label(s.state);
            for state in LINK_STATES {
                let labels = LinkStateLabels {
                    interface: ll.interface.clone(),
                    peer: ll.peer.clone(),
                    link: ll.link.clone(),
                    state: state.to_owned(),
                };
                let on = if state == current { 1.0 } else { 0.0 };
                link_state.get_or_create(&labels).set(on);
            }
        }
    }

    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &reg).is_err() {
        // Writing to a String cannot fail; keep the scrape well-formed if it ever does.
        out.clear();
        let _ = writeln!(out, "# EOF");
    }
    out
}

/// The `state` label of a link state; a link not yet probed counts as probing.
pub fn state_label(state: Option<LinkState>) -> &'static str {
    match state {
        None | Some(LinkState::Probing) => LINK_STATES[0],
        Some(LinkState::Up) => LINK_STATES[1],
        Some(LinkState::Degraded) => LINK_STATES[2],
        Some(LinkState::Down) => LINK_STATES[3],
    }
}

/// A bound metrics listener; [`MetricsServer::serve`] answers scrapes on it.
#[derive(Debug)]
pub struct MetricsServer {
    listener: TcpListener,
}

impl MetricsServer {
    /// Binds `addr` (port 0 picks a free port, see [`MetricsServer::local_addr`]).
    pub async fn bind(addr: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("metrics_listen {addr}: cannot listen: {e}"),
            )
        })?;
        Ok(Self { listener })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Answers `GET /metrics` with `render(&snapshot())` until the task is dropped. Never
    /// returns: accept errors (out of file descriptors) are logged and retried.
    pub async fn serve<F>(self, snapshot: F)
    where
        F: Fn() -> MetricsSnapshot + Send + Sync + 'static,
    {
        let snapshot = Arc::new(snapshot);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                return; // the semaphore is never closed
            };
            let (stream, peer) = match self.listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!("metrics: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let snapshot = Arc::clone(&snapshot);
            tokio::spawn(async move {
                let served =
                    tokio::time::timeout(CONNECTION_TIMEOUT, handle(stream, &*snapshot)).await;
                match served {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!("metrics: {peer}: {e}"),
                    Err(_) => tracing::debug!("metrics: {peer}: timed out"),
                }
                drop(permit);
            });
        }
    }
}

/// Binds `addr` and serves scrapes forever; see [`MetricsServer`] to bind first.
pub async fn serve<F>(addr: SocketAddr, snapshot: F) -> io::Result<()>
where
    F: Fn() -> MetricsSnapshot + Send + Sync + 'static,
{
    MetricsServer::bind(addr).await?.serve(snapshot).await;
    Ok(())
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// `GET /metrics` (or HEAD: headers only).
    Metrics { head: bool },
    /// Any other path.
    NotFound,
    /// `/metrics` with another method.
    MethodNotAllowed,
    /// Not an HTTP request line.
    BadRequest,
}

fn route(head: &[u8]) -> Route {
    let line_end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Route::BadRequest;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return Route::BadRequest;
    }
    let path = target.split('?').next().unwrap_or(target);
    match (method, path) {
        ("GET", "/metrics") => Route::Metrics { head: false },
        ("HEAD", "/metrics") => Route::Metrics { head: true },
        (_, "/metrics") => Route::MethodNotAllowed,
        _ => Route::NotFound,
    }
}

/// Reads one request head and writes one response, then closes (`Connection: close`).
async fn handle<F>(mut stream: TcpStream, snapshot: &F) -> io::Result<()>
where
    F: Fn() -> MetricsSnapshot,
{
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let route = loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(()); // closed before a full request: nothing to answer
        }
        // Search only where the terminator can newly appear.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        if head[from..].windows(4).any(|w| w == b"\r\n\r\n") {
            break route(&head);
        }
        if head.len() > MAX_REQUEST_HEAD {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "",
                b"",
                false,
            )
            .await;
        }
    };
    match route {
        Route::Metrics { head } => {
            let body = render(&snapshot());
            respond(&mut stream, "200 OK", CONTENT_TYPE, body.as_bytes(), head).await
        }
        Route::NotFound => respond(&mut stream, "404 Not Found", "", b"", false).await,
        Route::MethodNotAllowed => {
            respond(&mut stream, "405 Method Not Allowed", "", b"", false).await
        }
        Route::BadRequest => respond(&mut stream, "400 Bad Request", "", b"", false).await,
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> io::Result<()> {
    let content_type = if content_type.is_empty() {
        "text/plain; charset=utf-8"
    } else {
        content_type
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n",
        body.len()
    )
    .into_bytes();
    if status.starts_with("405") {
        response.extend_from_slice(b"Allow: GET, HEAD\r\n");
    }
    response.extend_from_slice(b"\r\n");
    if !head_only {
        response.extend_from_slice(body);
    }
    stream.write_all(&response).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str, state: Option<LinkState>) -> LinkMetrics {
        LinkMetrics {
            stats: LinkStats {
                name: name.to_owned(),
                state,
                srtt: Some(Duration::from_millis(12)),
                min_rtt: Some(Duration::from_millis(10)),
                rttvar: Some(Duration::from_millis(2)),
                jitter: Some(Duration::from_micros(1500)),
                loss: 0.25,
                est_rate_bps: 60_000_000,
                pacing_rate_bps: 54_000_000,
                tx_packets: 1000,
                tx_bytes: 1_234_567,
                tx_duplicates: 17,
                rx_packets: 900,
                rx_bytes: 7_654_321,
                queue_drops: 3,
                retransmits: 4,
            },
            since_handshake: Some(Duration::from_secs(42)),
        }
    }

    fn snapshot() -> MetricsSnapshot {
        MetricsSnapshot {
            interface: "wg-site".to_owned(),
            peers: vec![PeerMetrics {
                name: Some("hub".to_owned()),
                public_key: "AAAA".to_owned(),
                bond: BondStats {
                    sent_packets: 5,
                    send_drops: 6,
                    delivered_packets: 7,
                    rx_duplicates: 8,
                    reorder_skips: 9,
                    reorder_late: 10,
                    reorder_waits: 11,
                    malformed: 12,
                    reorder_timeout: Duration::from_millis(30),
                    reorder_max_wait_seen: Duration::from_millis(45),
                    compact_trailers: true,
                },
                rx_not_allowed: 13,
                links: vec![link("cable", Some(LinkState::Up)), {
                    let mut l = link("lte", None);
                    l.stats.srtt = None;
                    l.since_handshake = Some(Duration::from_secs(2));
                    l
                }],
            }],
            drops: vec![
                ("udp_send".to_owned(), 4),
                ("unauthenticated".to_owned(), 0),
            ],
        }
    }

    /// The value of the one sample with exactly this name and label text.
    fn sample(text: &str, series: &str) -> f64 {
        let found: Vec<f64> = text
            .lines()
            .filter_map(|l| l.strip_prefix(series))
            .filter_map(|rest| rest.strip_prefix(' '))
            .filter_map(|v| v.trim().parse().ok())
            .collect();
        assert_eq!(found.len(), 1, "series {series}: {found:?} in\n{text}");
        found[0]
    }

    #[test]
    fn render_shows_every_counter_with_labels_and_units() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let text = render_at(&snapshot(), now);
        let cable = r#"{interface="wg-site",peer="hub",link="cable"}"#;
        let lte = r#"{interface="wg-site",peer="hub",link="lte"}"#;
        let peer = r#"{interface="wg-site",peer="hub"}"#;
        let s = |name: &str, labels: &str| sample(&text, &format!("{name}{labels}"));
        assert_eq!(s("wgbond_link_tx_bytes_total", cable), 1_234_567.0);
        assert_eq!(s("wgbond_link_rx_bytes_total", cable), 7_654_321.0);
        assert_eq!(s("wgbond_link_tx_packets_total", cable), 1000.0);
        assert_eq!(s("wgbond_link_rx_packets_total", cable), 900.0);
        assert_eq!(s("wgbond_link_duplicates_sent_total", cable), 17.0);
        assert_eq!(s("wgbond_link_queue_drops_total", cable), 3.0);
        assert_eq!(s("wgbond_link_retransmits_total", cable), 4.0);
        assert_eq!(s("wgbond_link_rtt_seconds", cable), 0.012);
        assert_eq!(s("wgbond_link_min_rtt_seconds", cable), 0.01);
        assert_eq!(s("wgbond_link_rtt_variation_seconds", cable), 0.002);
        assert_eq!(s("wgbond_link_jitter_seconds", cable), 0.0015);
        assert_eq!(s("wgbond_link_loss_ratio", cable), 0.25);
        assert_eq!(
            s("wgbond_link_estimated_rate_bytes_per_second", cable),
            7.5e6
        );
        assert_eq!(s("wgbond_link_pacing_rate_bytes_per_second", cable), 6.75e6);
        assert_eq!(
            s("wgbond_link_last_handshake_timestamp_seconds", cable),
            1_700_000_000.0 - 42.0
        );
        // A link without an RTT sample has no RTT series at all.
        assert!(!text.contains(&format!("wgbond_link_rtt_seconds{lte}")));
        // One state series per state, exactly one of them 1.
        for (state, want) in [
            ("probing", 0.0),
            ("up", 1.0),
            ("degraded", 0.0),
            ("down", 0.0),
        ] {
            let labels =
                format!(r#"{{interface="wg-site",peer="hub",link="cable",state="{state}"}}"#);
            assert_eq!(s("wgbond_link_state", &labels), want, "{state}");
        }
        let lte_probing = r#"{interface="wg-site",peer="hub",link="lte",state="probing"}"#;
        assert_eq!(s("wgbond_link_state", lte_probing), 1.0);

        assert_eq!(s("wgbond_peer_sent_packets_total", peer), 5.0);
        assert_eq!(s("wgbond_peer_send_drops_total", peer), 6.0);
        assert_eq!(s("wgbond_peer_delivered_packets_total", peer), 7.0);
        assert_eq!(s("wgbond_peer_duplicates_dropped_total", peer), 8.0);
        assert_eq!(s("wgbond_peer_reorder_skips_total", peer), 9.0);
        assert_eq!(s("wgbond_peer_reorder_late_total", peer), 10.0);
        assert_eq!(s("wgbond_peer_reorder_waits_total", peer), 11.0);
        assert_eq!(s("wgbond_peer_malformed_total", peer), 12.0);
        assert_eq!(s("wgbond_peer_rx_not_allowed_packets_total", peer), 13.0);
        assert_eq!(s("wgbond_peer_reorder_timeout_seconds", peer), 0.03);
        assert_eq!(s("wgbond_peer_reorder_max_wait_seconds", peer), 0.045);
        // The newest handshake of any link (lte: 2 s ago).
        assert_eq!(
            s("wgbond_peer_last_handshake_timestamp_seconds", peer),
            1_700_000_000.0 - 2.0
        );
        assert_eq!(
            s(
                "wgbond_interface_dropped_packets_total",
                r#"{interface="wg-site",reason="udp_send"}"#
            ),
            4.0
        );
        let version = format!(r#"{{version="{}"}}"#, env!("CARGO_PKG_VERSION"));
        assert_eq!(s("wgbond_build_info", &version), 1.0);
        assert!(text.contains("# TYPE wgbond_link_tx_bytes counter\n"));
        assert!(text.contains("# UNIT wgbond_link_rtt_seconds seconds\n"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn peer_without_name_is_labelled_by_key_and_labels_are_escaped() {
        let mut snap = snapshot();
        snap.peers[0].name = None;
        snap.peers[0].public_key = "k+/=".to_owned();
        snap.peers[0].links[0].stats.name = "a\"b\\c\nd".to_owned();
        let text = render(&snap);
        let labels = r#"{interface="wg-site",peer="k+/=",link="a\"b\\c\nd"}"#;
        assert_eq!(
            sample(&text, &format!("wgbond_link_tx_bytes_total{labels}")),
            1_234_567.0
        );
        // No raw newline leaked into a label: every line is a comment or a sample.
        for line in text.lines() {
            assert!(
                line.starts_with('#') || line.starts_with("wgbond_"),
                "{line:?}"
            );
        }
    }

    #[test]
    fn empty_snapshot_renders_help_only() {
        let text = render(&MetricsSnapshot::default());
        assert!(text.contains("# HELP wgbond_link_tx_bytes "));
        assert!(!text.contains("wgbond_link_tx_bytes_total{"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn routes() {
        let r = |s: &str| route(s.as_bytes());
        assert_eq!(
            r("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics { head: false }
        );
        assert_eq!(
            r("GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Route::Metrics { head: false }
        );
        assert_eq!(
            r("HEAD /metrics HTTP/1.1\r\n\r\n"),
            Route::Metrics { head: true }
        );
        assert_eq!(r("POST /metrics HTTP/1.1\r\n\r\n"), Route::MethodNotAllowed);
        assert_eq!(r("GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(r("GET /metricsX HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(r("GET /metrics\r\n\r\n"), Route::BadRequest);
        assert_eq!(r("GET /metrics SPDY/3\r\n\r\n"), Route::BadRequest);
        assert_eq!(r("\u{0}\u{1}\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"GET /\xff HTTP/1.1\r\n\r\n"), Route::BadRequest);
    }
}
