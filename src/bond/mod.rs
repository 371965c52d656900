//! The sans-IO bonding core.
//!
//! A [`Bond`] is one end of a bonded connection to one peer: it owns the peer's links (their
//! estimators and pacing queues), the scheduler and the receive-side reorder buffer. It does no
//! networking and reads no clock; the driver calls it like this:
//!
//! ```text
//! loop {
//!     on packet from TUN:            bond.handle_outbound(pkt, now)
//!     on plaintext from link L:      bond.handle_inbound(L, plaintext, now)
//!     on timer (bond.poll_timeout()): bond.handle_timeout(now)
//!     then drain:
//!       while let Some(t) = bond.poll_transmit(now, &mut buf) { encrypt buf on link t.link, send }
//!       while let Some(d) = bond.poll_deliver(&mut buf)       { write buf to TUN }
//!       while let Some(e) = bond.poll_event()                 { log / bind sessions }
//! }
//! ```
//!
//! Every `poll_*` result may change after any `handle_*` call, and after time passes.

pub mod wire;

use std::time::{Duration, Instant};

/// A link's number on the side that owns it (the site numbers its links 0..N in config order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId(pub u8);

/// How packets are spread over links.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// Stripe bulk traffic, duplicate what is latency-critical or would cross a lossy link.
    #[default]
    Auto,
    /// Spread packets in proportion to capacity, each on the link where it arrives first.
    Stripe,
    /// Every packet on every healthy link; the first copy wins.
    Duplicate,
    /// The best-priority healthy link carries everything.
    Failover,
}

/// Settings of a bond (one peer).
#[derive(Clone, Debug)]
pub struct BondConfig {
    /// Scheduling mode.
    pub mode: Mode,
    /// Interval between RTT probes on an otherwise quiet link.
    pub probe_interval: Duration,
    /// Upper bound of the adaptive reorder timeout.
    pub reorder_max_wait: Duration,
    /// Most packets the reorder buffer holds.
    pub reorder_max_packets: usize,
    /// Most bytes the reorder buffer holds.
    pub reorder_max_bytes: usize,
    /// Most time a packet may wait in a link's send queue before it is dropped (like a
    /// router's queue; keeps latency under load bounded).
    pub max_queue_delay: Duration,
    /// True on the side that owns the links and sends hellos (the site).
    pub sends_hello: bool,
    /// Random per daemon start, carried in hellos.
    pub bond_id: u64,
}

impl Default for BondConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Auto,
            probe_interval: Duration::from_millis(100),
            reorder_max_wait: Duration::from_millis(400),
            reorder_max_packets: 8192,
            reorder_max_bytes: 8 << 20,
            max_queue_delay: Duration::from_millis(60),
            sends_hello: false,
            bond_id: 0,
        }
    }
}

/// Settings of one link.
#[derive(Clone, Debug, Default)]
pub struct LinkConfig {
    /// Name shown to the admin and sent in hellos.
    pub name: String,
    /// Failover order: lower is preferred.
    pub priority: u32,
    /// Cap on what we send, bits per second (metered links).
    pub max_rate_bps: Option<u64>,
}

/// Health of a link as the estimator sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// No RTT sample yet.
    Probing,
    /// Answering probes, loss low.
    Up,
    /// Answering, but with high loss or late replies.
    Degraded,
    /// Silent for longer than the dead-link timeout.
    Down,
}

/// A datagram for the driver to encrypt and send on `link`; the plaintext is in the caller's
/// buffer passed to [`Bond::poll_transmit`].
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Link to send it on.
    pub link: LinkId,
}

/// Something the driver may want to log or act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A link changed state.
    LinkState {
        /// Which link.
        link: LinkId,
        /// Its new state.
        state: LinkState,
    },
    /// The peer named the link a session belongs to (hub side).
    Hello {
        /// The link the hello arrived on.
        link: LinkId,
        /// The hello.
        hello: wire::Hello,
    },
    /// The peer acknowledged our hello on a link (site side).
    HelloAcked {
        /// Which link.
        link: LinkId,
    },
}

/// Counters of one link, for `show` and metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinkStats {
    /// Link name.
    pub name: String,
    /// Current state (`None` before the first probe).
    pub state: Option<LinkState>,
    /// Smoothed RTT.
    pub srtt: Option<Duration>,
    /// Lowest RTT seen recently.
    pub min_rtt: Option<Duration>,
    /// RTT mean deviation.
    pub rttvar: Option<Duration>,
    /// Loss rate of our data on this link, 0..1, over the last second or so.
    pub loss: f64,
    /// Estimated capacity, bits per second.
    pub est_rate_bps: u64,
    /// Rate the link is paced at, bits per second.
    pub pacing_rate_bps: u64,
    /// Data packets sent (including duplicates).
    pub tx_packets: u64,
    /// Bytes sent (all plaintext we handed to the driver).
    pub tx_bytes: u64,
    /// Duplicate copies sent on this link.
    pub tx_duplicates: u64,
    /// Data packets received.
    pub rx_packets: u64,
    /// Bytes received (all plaintext).
    pub rx_bytes: u64,
    /// Packets dropped because the link's send queue was too long.
    pub queue_drops: u64,
}

/// Counters of the whole bond.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BondStats {
    /// Inner packets accepted from TUN.
    pub sent_packets: u64,
    /// Inner packets dropped before sending (no link up, queues full).
    pub send_drops: u64,
    /// Inner packets delivered to TUN.
    pub delivered_packets: u64,
    /// Duplicates dropped by the receiver.
    pub rx_duplicates: u64,
    /// Gaps skipped after the reorder timeout.
    pub reorder_skips: u64,
    /// Packets delivered late, out of order, after their gap had been skipped.
    pub reorder_late: u64,
    /// Packets that waited in the reorder buffer.
    pub reorder_waits: u64,
    /// Plaintexts rejected by the decoder.
    pub malformed: u64,
    /// Current adaptive reorder timeout.
    pub reorder_timeout: Duration,
}
