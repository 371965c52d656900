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

pub mod estimator;
pub mod reorder;
pub mod scheduler;
pub mod sim;
pub mod wire;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use estimator::{LinkEstimator, RxLinkMeter};
use reorder::ReorderBuffer;
use scheduler::{Candidate, PacketKind};
use wire::{Control, Message};

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
    /// One-way-delay variation the peer measured on our packets.
    pub jitter: Option<Duration>,
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
    /// Packets lost on this link that were sent again after the peer's NACK.
    pub retransmits: u64,
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
    /// Longest time a packet waited in the reorder buffer.
    pub reorder_max_wait_seen: Duration,
    /// Data goes with the compact trailer: the peer said it reads it (false: an older peer,
    /// or none heard yet).
    pub compact_trailers: bool,
}

/// How often the receiver reports what it got.
pub const FEEDBACK_INTERVAL: Duration = Duration::from_millis(20);
/// Pacing may fall this far behind the clock before credit is lost, so that a driver woken
/// with millisecond timers can still send at full rate.
const PACING_BURST: Duration = Duration::from_millis(2);
/// `auto` leaves out 1/this of a longer link's extra one-way delay when it picks a bulk
/// packet's link. The longer link then takes packets a little before the
/// shorter one's queue alone would send them there; they arrive up to that share of the
/// difference after their neighbours on the shorter link and wait that long at the receiver,
/// but the longer link stays busy through a window-limited sender's short pauses (BBR's drain
/// phase, the gap after a burst) instead of idling until the shorter link's queue is full
/// again. Counting all of it left the lab's 20 Mbit/s hetero link 8 % idle under a BBR
/// download. Copies, repairs and latency-critical packets count all of it.
const BULK_DISCOUNT_SHARE: u32 = 5;
/// The most that discount leaves out: a satellite's fifth (60 ms) would hold every packet
/// behind one of its own that long at the receiver, and at a cold start, while the estimates
/// are low and our queues look long, put bulk on it early.
const BULK_DISCOUNT_MAX: Duration = Duration::from_millis(10);
/// Hello resend interval until acknowledged, and refresh interval after.
const HELLO_RETRY: Duration = Duration::from_secs(1);
const HELLO_REFRESH: Duration = Duration::from_secs(10);
/// Most latency-critical packets waiting on one link (they are small; this is a backstop).
const MAX_URGENT: usize = 256;
/// Most control messages waiting on one link.
const MAX_CONTROL: usize = 64;
/// A link whose queue is longer than this has more traffic than its pacing rate.
const BACKLOG: Duration = Duration::from_millis(5);
/// Lowest adaptive reorder timeout.
const MIN_REORDER_WAIT: Duration = Duration::from_millis(5);
/// Added to what a late packet needed when the reorder timeout learns from it.
const LATE_MARGIN: Duration = Duration::from_millis(2);
/// Bytes WireGuard, UDP and IP add to every datagram, for pacing on the wire.
pub const TUNNEL_OVERHEAD: usize = 32 + 8 + 20;
/// Links with data within this time count for the reorder timeout.
const RECENT_DATA: Duration = Duration::from_secs(1);
/// A link that carried no ordered data for this long is announced to the peer when it starts
/// again (half of [`RECENT_DATA`], so the peer never forgets it while it is in use).
const ORDERED_NOTICE: Duration = Duration::from_millis(500);
/// Most spare packet buffers kept for reuse.
const POOL_MAX: usize = 1024;
/// Most sent packets kept per link for NACKs (about 3 MB: a hub keeps this per site link).
const MAX_SENT_KEPT: usize = 2048;
/// After this receiver asked for a lost packet, for this long the reorder timeout leaves time
/// for the answer (a round trip on the fastest link).
const NACK_RECENT: Duration = Duration::from_secs(2);
/// Loss rate of a link above which NACKs go on it twice.
const NACK_TWICE_LOSS: f64 = 0.01;
/// Repairs go as a copy on, and the reorder timeout waits for, the second-fastest link if its
/// RTT is at most this much longer than the fastest link's: the one-way bound for copies
/// ([`scheduler::COPY_MAX_EXTRA_DELAY`]), both ways.
const SECOND_CHANCE_MAX: Duration = scheduler::COPY_MAX_EXTRA_DELAY.saturating_mul(2);
/// What this side decodes beyond format 1, sent behind every hello and hello ack.
const FEATURES: Control = Control::Features {
    bits: wire::FEATURE_COMPACT_TRAILER,
};
/// A link that loses packets and whose queue ran dry tells the peer its last link sequence
/// number this long after its last data packet, unless more data follows: TCP refills a queue
/// within a millisecond or two while it has a window open, and a notice per pause is enough.
const TAIL_DELAY: Duration = Duration::from_millis(2);

/// Share of a link's estimated rate that copies of latency-critical packets may take while
/// its bulk queue is backed up: a ping stream's or a voice call's copies fit in it (a
/// 50-packet-a-second voice call is under 0.5 % of 20 Mbit/s), a stream of small packets as
/// frequent as a transfer's ACKs (QUIC's, say) does not, and its copies would take their room
/// from bulk traffic.
const COPY_SHARE: f64 = 0.02;
/// Most credit a link saves up for such copies: `COPY_SHARE` of this long.
const COPY_CREDIT_SPAN: Duration = Duration::from_millis(100);
/// But at least this many bytes, so that a slow link can still copy a full-size packet.
const COPY_CREDIT_MIN: f64 = 3000.0;

/// Room for copies of latency-critical packets on a link whose bulk queue is backed up: a
/// token bucket filled at [`COPY_SHARE`] of the link's estimated rate.
#[derive(Default)]
struct CopyCredit {
    bytes: f64,
    at: Option<Instant>,
}

impl CopyCredit {
    /// Takes `bytes` of credit if there is that much; false: no copy.
    fn take(&mut self, bytes: usize, rate_bps: u64, now: Instant) -> bool {
        let per_s = rate_bps as f64 / 8.0 * COPY_SHARE;
        let cap = (per_s * COPY_CREDIT_SPAN.as_secs_f64()).max(COPY_CREDIT_MIN);
        // A fresh bucket starts full.
        self.bytes = match self.at {
            Some(t) => self.bytes + per_s * now.saturating_duration_since(t).as_secs_f64(),
            None => cap,
        }
        .min(cap);
        self.at = Some(now);
        if self.bytes >= bytes as f64 {
            self.bytes -= bytes as f64;
            true
        } else {
            false
        }
    }
}

struct Queued {
    seq: u64,
    flags: u8,
    data: Vec<u8>,
}

/// A packet sent on a link, kept for a possible NACK.
struct SentRecord {
    link_seq: u32,
    seq: u64,
    at: Instant,
    data: Vec<u8>,
    /// A copy of it went right behind it on the same link (a lossy link with room to spare).
    copy_next: bool,
}

struct Link {
    id: LinkId,
    config: LinkConfig,
    est: LinkEstimator,
    rx: RxLinkMeter,
    queue: VecDeque<Queued>,
    queued_bytes: usize,
    /// Latency-critical packets: sent before the bulk queue.
    urgent: VecDeque<Queued>,
    /// Wire bytes in `urgent` (inner + tunnel overhead), kept so its delay costs O(1).
    urgent_wire_bytes: usize,
    /// Packets sent again (NACKed, or from a link that died): after `urgent`, before `queue`.
    resend: VecDeque<Queued>,
    /// Wire bytes in `resend`.
    resend_wire_bytes: usize,
    /// Ordered packets sent recently, oldest first, kept to be sent again if the peer reports
    /// them lost (a NACK); an empty `data` marks one already sent again.
    sent: VecDeque<SentRecord>,
    control: VecDeque<Vec<u8>>,
    next_send: Instant,
    link_seq: u32,
    /// The link sequence number of the first data packet sent with full numbers since the
    /// peer (re)started: once its feedback shows that packet (or a later one) arrived, the
    /// peer has the high bits that compact trailers leave out, and they may be used here.
    full_from: Option<u32>,
    /// Compact trailers may be used on this link (see `full_from`).
    compact_ok: bool,
    probe_seq: u32,
    next_probe: Instant,
    hello_acked: bool,
    next_hello: Instant,
    app_limited: bool,
    /// Last time an ordered packet (one the peer's reorder buffer may wait for) was queued
    /// here: the peer is told when this link starts carrying ordered data after a quiet spell.
    tx_ordered_at: Option<Instant>,
    /// When a data packet last left on this link.
    last_data_sent: Option<Instant>,
    /// An ordered packet kept for a NACK left since the last tail notice.
    tail_pending: bool,
    /// When to tell the peer this link's last link sequence number (its queue ran dry).
    tail_at: Option<Instant>,
    /// Room for copies of latency-critical packets while the bulk queue is backed up.
    copy_credit: CopyCredit,
    stats: LinkStats,
}

impl Link {
    /// How long a packet queued now waits before it leaves the link's bottleneck: behind our
    /// pacing queue, or behind what the modem still has to send (predicted from the
    /// estimated rate), whichever is longer. The queue drains at the estimated rate on
    /// average: the pacing gain cycles around it, and using the momentary gain would be
    /// wrong for every packet that waits through a phase change. `backlog` is
    /// [`Link::bulk_backlog`] (taken once per packet for both).
    fn queue_delay(&self, backlog: Duration, now: Instant) -> Duration {
        let paced = backlog + self.next_send.saturating_duration_since(now);
        let modem = self.est.modem_queue(now) + backlog;
        paced.max(modem)
    }

    /// Time our bulk queue (and the packets to send again) takes to drain at the estimated
    /// rate: bulk traffic waiting for the link, which a copy sent ahead of it pushes back.
    fn bulk_backlog(&self) -> Duration {
        let bits = (self.queued_bytes + self.queue.len() * TUNNEL_OVERHEAD + self.resend_wire_bytes)
            as u64
            * 8;
        let rate = self.est.est_rate_bps();
        Duration::from_nanos(bits.saturating_mul(1_000_000_000) / rate.max(1))
    }

    /// The same for a latency-critical packet, which overtakes our bulk queue but not the
    /// modem's.
    fn urgent_delay(&self, now: Instant) -> Duration {
        let bits = self.urgent_wire_bytes as u64 * 8;
        let backlog = Duration::from_nanos(
            bits.saturating_mul(1_000_000_000) / self.est.est_rate_bps().max(1),
        );
        self.next_send
            .saturating_duration_since(now)
            .max(self.est.modem_queue(now))
            + backlog
    }
}

/// One end of a bonded connection to one peer. See the module documentation.
pub struct Bond {
    config: BondConfig,
    epoch: Instant,
    links: Vec<Link>,
    next_seq: u64,
    reorder: ReorderBuffer,
    reorder_deadline: Option<Instant>,
    events: VecDeque<Event>,
    stats: BondStats,
    pool: Vec<Vec<u8>>,
    rr: usize,
    next_feedback: Option<Instant>,
    peer_bond_id: Option<u64>,
    cands: Vec<Candidate>,
    /// Added to the reorder timeout while packets keep arriving after their gap was skipped
    /// (the timeout was too short), decaying when they stop.
    reorder_extra: Duration,
    /// The reorder timeout from measured delays alone, before `reorder_extra`.
    reorder_base: Duration,
    late_seen: u64,
    /// Sequence space of latency-critical packets (delivered unordered).
    next_useq: u64,
    unordered_seen: reorder::SeenWindow,
    unordered_dups: u64,
    /// When this receiver last sent a NACK.
    last_nack: Option<Instant>,
    /// The peer said it decodes compact trailers (a `Features` message since its start).
    peer_compact: bool,
    /// Highest ordered and unordered sequence numbers received, which a compact trailer's
    /// low 32 bits are read against.
    rx_seq_high: Option<u64>,
    rx_useq_high: Option<u64>,
}

impl Bond {
    /// A bond with no links yet.
    pub fn new(config: BondConfig, now: Instant) -> Self {
        let mut reorder = ReorderBuffer::new(
            config.reorder_max_packets,
            config.reorder_max_bytes,
            config.reorder_max_wait.min(Duration::from_millis(50)),
        );
        reorder.set_max_wait(config.reorder_max_wait);
        Self {
            config,
            epoch: now,
            links: Vec::new(),
            next_seq: 0,
            reorder,
            reorder_deadline: None,
            events: VecDeque::new(),
            stats: BondStats::default(),
            pool: Vec::new(),
            rr: 0,
            next_feedback: None,
            peer_bond_id: None,
            cands: Vec::new(),
            reorder_extra: Duration::ZERO,
            reorder_base: Duration::ZERO,
            late_seen: 0,
            next_useq: 0,
            unordered_seen: reorder::SeenWindow::new(4096),
            unordered_dups: 0,
            last_nack: None,
            peer_compact: false,
            rx_seq_high: None,
            rx_useq_high: None,
        }
    }

    /// The scheduling mode.
    pub fn mode(&self) -> Mode {
        self.config.mode
    }

    /// Changes the scheduling mode (config reload).
    pub fn set_mode(&mut self, mode: Mode) {
        self.config.mode = mode;
    }

    /// Changes the probe interval, the reorder wait bound and the queue delay budget (config
    /// reload); the buffer limits and the bond id stay.
    pub fn set_timing(
        &mut self,
        probe_interval: Duration,
        reorder_max_wait: Duration,
        max_queue_delay: Duration,
    ) {
        self.config.probe_interval = probe_interval;
        self.config.reorder_max_wait = reorder_max_wait;
        self.reorder.set_max_wait(reorder_max_wait);
        self.config.max_queue_delay = max_queue_delay;
    }

    /// Adds a link (site: from config; hub: when a hello names it). Replaces its settings if
    /// it exists.
    pub fn add_link(&mut self, id: LinkId, config: LinkConfig, now: Instant) {
        if let Some(l) = self.links.iter_mut().find(|l| l.id == id) {
            l.est.set_max_rate(config.max_rate_bps);
            l.stats.name = config.name.clone();
            l.config = config;
            return;
        }
        let est = LinkEstimator::new(now, config.max_rate_bps);
        self.links.push(Link {
            id,
            stats: LinkStats {
                name: config.name.clone(),
                ..LinkStats::default()
            },
            config,
            est,
            rx: RxLinkMeter::default(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            urgent: VecDeque::new(),
            urgent_wire_bytes: 0,
            resend: VecDeque::new(),
            resend_wire_bytes: 0,
            sent: VecDeque::new(),
            control: VecDeque::new(),
            next_send: now,
            link_seq: 0,
            full_from: None,
            compact_ok: false,
            probe_seq: 0,
            next_probe: now,
            hello_acked: false,
            next_hello: now,
            app_limited: true,
            tx_ordered_at: None,
            last_data_sent: None,
            tail_pending: false,
            tail_at: None,
            copy_credit: CopyCredit::default(),
        });
        self.links.sort_by_key(|l| l.id);
    }

    /// Removes a link; packets queued on it are rescheduled on the others.
    pub fn remove_link(&mut self, id: LinkId, now: Instant) {
        let Some(i) = self.links.iter().position(|l| l.id == id) else {
            return;
        };
        let mut link = self.links.remove(i);
        self.reschedule(&mut link.queue, now);
    }

    /// Ids of the current links.
    pub fn link_ids(&self) -> Vec<LinkId> {
        self.links.iter().map(|l| l.id).collect()
    }

    /// Asks for the hello to be sent again on a link (e.g. after a new handshake).
    pub fn rehello(&mut self, id: LinkId, now: Instant) {
        if let Some(l) = self.links.iter_mut().find(|l| l.id == id) {
            l.hello_acked = false;
            l.next_hello = now;
        }
    }

    fn micros(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.epoch).as_micros() as u32
    }

    fn take_buf(&mut self) -> Vec<u8> {
        self.pool.pop().unwrap_or_default()
    }

    fn give_buf(&mut self, buf: Vec<u8>) {
        if self.pool.len() < POOL_MAX {
            self.pool.push(buf);
        }
    }

    /// Builds the scheduler's view of every link.
    fn fill_candidates(&mut self, now: Instant, urgent: bool) {
        self.cands.clear();
        // Expected one-way delay: the link's base delay relative to the fastest link, from the
        // peer's measurements when every link has them (clock offsets cancel in differences),
        // else half the RTT. Queueing is in `queue_delay`.
        let all_owd = self.links.iter().all(|l| l.est.base_owd_us().is_some());
        let base = self
            .links
            .iter()
            .filter_map(|l| l.est.base_owd_us().map(|o| o as u32))
            .reduce(|a, b| if (b.wrapping_sub(a) as i32) < 0 { b } else { a });
        for (index, l) in self.links.iter().enumerate() {
            let base_owd = match (all_owd, l.est.base_owd_us(), base) {
                (true, Some(o), Some(b)) => {
                    Duration::from_micros(u64::from((o as u32).wrapping_sub(b)).min(10_000_000))
                }
                _ => l.est.min_rtt().unwrap_or(Duration::from_millis(100)) / 2,
            };
            // Plus the queue standing at the link's bottleneck, as the peer measures it on our
            // data: a packet sent there arrives that much later than the base delay says. Left
            // out, the scheduler puts too much on the other link, whose packets then wait for
            // this one's at the receiver, and every packet of the stream is late by it (4 ms of
            // 40 with a 15 Mbit/s fast link in the simulator); BBR senders, whose window is
            // twice the lowest RTT's worth, lose a fifth of their rate to those milliseconds.
            // A queue nothing was added to since our last send has drained by at least the time
            // since (else a figure left from a congested spell would keep light traffic off the
            // link for good).
            let idle = l
                .last_data_sent
                .map_or(Duration::MAX, |t| now.saturating_duration_since(t));
            let owd = base_owd + l.est.measured_queue().saturating_sub(idle);
            let bulk_backlog = l.bulk_backlog();
            self.cands.push(Candidate {
                index,
                state: l.est.state(),
                priority: l.config.priority,
                queue_delay: if urgent {
                    l.urgent_delay(now)
                } else {
                    l.queue_delay(bulk_backlog, now)
                },
                owd,
                loss: l.est.loss(),
                repair: l.est.min_rtt().unwrap_or(Duration::from_millis(100)),
                bulk_discount: (base_owd / BULK_DISCOUNT_SHARE).min(BULK_DISCOUNT_MAX),
                bulk_backlog,
            });
        }
    }

    /// Takes one inner IP packet from TUN and queues it on the link(s) the scheduler picks.
    pub fn handle_outbound(&mut self, packet: &[u8], now: Instant) {
        if wire::ip_packet_len(packet) != Ok(packet.len()) {
            self.stats.malformed += 1;
            return;
        }
        self.stats.sent_packets += 1;
        // Latency-critical packets skip the bulk queues in every mode but `stripe` (kept as
        // plain earliest-arrival striping): a ping or a TCP ACK must not wait behind a
        // download, nor be dropped with it when the only link left is full.
        let kind = scheduler::classify(packet);
        if self.config.mode != Mode::Stripe && kind != PacketKind::Bulk {
            if self.enqueue_urgent(packet, kind, now) {
                self.next_useq += 1;
            }
            return;
        }
        // A packet dropped here takes no sequence number, so the receiver sees no gap.
        if self.enqueue(self.next_seq, packet, None, now) {
            self.next_seq += 1;
        }
    }

    /// Link `i` takes a latency-critical packet now (the candidates filled for one).
    fn urgent_room(&self, i: usize) -> bool {
        self.cands[i].queue_delay <= self.config.max_queue_delay
            && self.links[i].urgent.len() < MAX_URGENT
    }

    /// Queues a latency-critical packet ahead of bulk traffic and outside the ordered stream
    /// (the receiver delivers it at once): in `auto` on the two links where it arrives first,
    /// otherwise on the links the mode picks.
    fn enqueue_urgent(&mut self, packet: &[u8], kind: PacketKind, now: Instant) -> bool {
        self.fill_candidates(now, true);
        let mut targets = scheduler::choose(self.config.mode, &self.cands, kind);
        // In `auto`, a real-time packet's copy onto a link whose bulk queue is backed up takes
        // its room from bulk traffic: only within that link's copy credit, and only while the
        // first link is healthy and takes the packet (else the copy is what gets through).
        // Decided before anything is queued: a packet flagged as a copy is given up when its
        // link dies ("the other copy is on its way").
        if let (Mode::Auto, PacketKind::Realtime, &[first, second, ..]) =
            (self.config.mode, kind, targets.as_slice())
        {
            if self.cands[second].bulk_backlog > scheduler::SPARE
                && self.cands[first].healthy()
                && self.urgent_room(first)
            {
                let rate = self.links[second].est.est_rate_bps();
                let wire_bytes = packet.len() + TUNNEL_OVERHEAD;
                if !self.links[second].copy_credit.take(wire_bytes, rate, now) {
                    targets.keep_first();
                }
            }
        }
        let mut flags = wire::FLAG_UNORDERED;
        if targets.is_duplicate() {
            flags |= wire::FLAG_DUPLICATE;
        }
        let mut sent = false;
        for &i in targets.as_slice() {
            if !self.urgent_room(i) {
                self.links[i].stats.queue_drops += 1;
                continue;
            }
            let mut data = self.take_buf();
            data.clear();
            data.extend_from_slice(packet);
            let link = &mut self.links[i];
            if targets.is_duplicate() {
                link.stats.tx_duplicates += 1;
            }
            link.urgent_wire_bytes += data.len() + TUNNEL_OVERHEAD;
            link.urgent.push_back(Queued {
                seq: self.next_useq,
                flags,
                data,
            });
            sent = true;
        }
        if !sent {
            self.stats.send_drops += 1;
        }
        sent
    }

    /// Schedules one packet; `data` is a buffer holding it already (rescheduling). False if
    /// no link took it.
    fn enqueue(&mut self, seq: u64, packet: &[u8], data: Option<Vec<u8>>, now: Instant) -> bool {
        self.fill_candidates(now, false);
        let targets = scheduler::choose(self.config.mode, &self.cands, PacketKind::Bulk);
        let mut data = data;
        let mut sent = false;
        let budget = self.config.max_queue_delay;
        for (k, &i) in targets.as_slice().iter().enumerate() {
            // In `auto`, the first copy of a lossy link's packet stays unflagged: kept, it is
            // repaired like any other if it is lost and its copy does not come (the copy may
            // be dropped in the other link's queue, or late).
            let flags = if targets.is_duplicate() && (k > 0 || self.config.mode != Mode::Auto) {
                wire::FLAG_DUPLICATE
            } else {
                0
            };
            if self.cands[i].queue_delay > budget {
                self.links[i].stats.queue_drops += 1;
                continue;
            }
            let mut buf = match data.take() {
                Some(b) => b,
                None => {
                    let mut b = self.take_buf();
                    b.clear();
                    b.extend_from_slice(packet);
                    b
                }
            };
            if buf.len() != packet.len() {
                buf.clear();
                buf.extend_from_slice(packet);
            }
            let link = &mut self.links[i];
            if self.cands[i].queue_delay > BACKLOG {
                link.est.on_backlog(now);
            }
            link.queued_bytes += buf.len();
            if flags != 0 {
                link.stats.tx_duplicates += 1;
            }
            link.queue.push_back(Queued {
                seq,
                flags,
                data: buf,
            });
            sent = true;
            // In `auto` a copy goes only on a link close in delay to the first (see the
            // scheduler), one the receiver should wait for; `duplicate` copies everything, a
            // satellite's copies too, and those must not stretch the receiver's timeout.
            if flags == 0 || self.config.mode == Mode::Auto {
                self.note_ordered(i, now);
            }
        }
        if let Some(b) = data {
            self.give_buf(b);
        }
        if !sent {
            self.stats.send_drops += 1;
        }
        sent
    }

    /// Puts the packets of a queue that can no longer send (link down or removed) on other
    /// links, in their original order.
    fn reschedule(&mut self, queue: &mut VecDeque<Queued>, now: Instant) {
        while let Some(q) = queue.pop_front() {
            if q.flags & wire::FLAG_DUPLICATE != 0 {
                // Other copies are on their way.
                self.give_buf(q.data);
                continue;
            }
            let copy = q.data.clone();
            let _ = self.enqueue(q.seq, &copy, Some(q.data), now);
        }
    }

    /// Records that ordered data (the receiver's reorder buffer may wait for it) was queued on
    /// link `i`; after a quiet spell, the peer is told.
    fn note_ordered(&mut self, i: usize, now: Instant) {
        let link = &mut self.links[i];
        let quiet = link
            .tx_ordered_at
            .is_none_or(|at| now.saturating_duration_since(at) >= ORDERED_NOTICE);
        link.tx_ordered_at = Some(now);
        if quiet {
            self.announce_ordered(i);
        }
    }

    /// Tells the peer, on every other usable link, that link `i` now carries ordered data.
    /// On a link slower than the others the first ordered packets arrive after later ones;
    /// the peer's reorder timeout, set from the links that carried ordered data recently,
    /// would give them up as lost (TCP then halves its window for nothing).
    fn announce_ordered(&mut self, i: usize) {
        let msg = Control::OrderedOn {
            link_id: self.links[i].id.0,
        };
        for j in 0..self.links.len() {
            if j != i && self.links[j].est.usable() {
                self.push_control(j, &msg);
            }
        }
    }

    fn link_index(&self, id: LinkId) -> Option<usize> {
        self.links.iter().position(|l| l.id == id)
    }

    fn push_control(&mut self, index: usize, msg: &Control) {
        if self.links[index].control.len() >= MAX_CONTROL {
            // The driver drains every turn; a backlog this long means a flood of probes.
            return;
        }
        let mut buf = self.take_buf();
        wire::encode_control(msg, &mut buf);
        self.links[index].control.push_back(buf);
    }

    /// Takes one decrypted plaintext (the whole of it) that arrived on `link`. A plaintext
    /// that does not decode is counted and dropped.
    pub fn handle_inbound(
        &mut self,
        link: LinkId,
        plaintext: &[u8],
        now: Instant,
    ) -> Result<(), wire::DecodeError> {
        let msg = match wire::decode(plaintext) {
            Ok(m) => m,
            Err(e) => {
                self.stats.malformed += 1;
                return Err(e);
            }
        };
        let Some(i) = self.link_index(link) else {
            // The driver adds links before passing their traffic; anything else is dropped.
            self.stats.malformed += 1;
            return Ok(());
        };
        {
            let l = &mut self.links[i];
            l.stats.rx_packets += 1;
            l.stats.rx_bytes += plaintext.len() as u64;
        }
        match msg {
            Message::Data {
                packet,
                mut trailer,
            } => {
                if !self.extend_seqs(i, &mut trailer) {
                    self.stats.malformed += 1;
                    return Ok(());
                }
                // A link carries its ordered packets in sequence order, repairs (sent ahead,
                // with their old numbers) aside: a loss it shows lies between the highest one
                // seen on it and this one, if this one is higher.
                let ordered = trailer.flags & (wire::FLAG_UNORDERED | wire::FLAG_RESENT) == 0;
                let last = self.links[i].rx.last_seq;
                let hi = if ordered && last.is_none_or(|l| trailer.seq > l) {
                    trailer.seq
                } else {
                    u64::MAX
                };
                self.nack_gap(i, trailer.link_seq, hi, now);
                if ordered {
                    self.links[i].rx.last_seq =
                        Some(last.map_or(trailer.seq, |l| l.max(trailer.seq)));
                    self.links[i].rx.on_ordered(now);
                }
                let owd = self.micros(now).wrapping_sub(trailer.send_time_us);
                self.links[i]
                    .rx
                    .on_data(trailer.link_seq, plaintext.len(), owd, now);
                self.next_feedback.get_or_insert(now + FEEDBACK_INTERVAL);
                if trailer.flags & wire::FLAG_UNORDERED == 0 {
                    if trailer.flags & wire::FLAG_DUPLICATE == 0 {
                        self.links[i].rx.last_ordered = Some(now);
                    } else {
                        self.links[i].rx.last_copy = Some(now);
                    }
                }
                if trailer.flags & wire::FLAG_UNORDERED != 0 {
                    if self.unordered_seen.first_time(trailer.seq) {
                        self.reorder.deliver_now(packet);
                    } else {
                        self.unordered_dups += 1;
                    }
                    return Ok(());
                }
                self.reorder.insert(trailer.seq, packet, now);
                let late = self.reorder.stats().late;
                if late > self.late_seen
                    && (trailer.flags & wire::FLAG_RESENT != 0 || self.reorder.late_was_repair())
                {
                    // Expected late: sent again after its link died, or a repair whose NACK or
                    // first copy was lost (or went by a slow link): its lateness says nothing
                    // of the links' delays, and a satellite-sized wait learned from it held
                    // every later gap (simulator: 260 ms after one such repair).
                    self.late_seen = late;
                } else if late > self.late_seen {
                    // A packet came after its gap was given up: wait longer from now on, twice
                    // what it needed at once. Late packets come in runs while a queue builds
                    // faster than the sender sees (a link's start-up, a link slowing down), and
                    // lateness grows along the run: growing by half per late packet let four
                    // of a run of four through, twice lets two (simulator, hetero cold CUBIC).
                    // (Unbounded growth reached the 400 ms cap after one burst of a dozen late
                    // packets, and every loss then stalled that long.)
                    self.late_seen = late;
                    let need =
                        (self.reorder.late_need() + LATE_MARGIN).saturating_sub(self.reorder_base);
                    self.reorder_extra = (2 * need)
                        .max(self.reorder_extra)
                        .min(self.config.reorder_max_wait);
                    self.update_reorder_timeout(now);
                }
                self.reorder_deadline = self.reorder.deadline();
            }
            Message::Control(c) => self.handle_control(i, c, now),
        }
        Ok(())
    }

    /// A link delivers in order: a jump in its sequence numbers means the packets between were
    /// lost. Ask the sender for them at once, on this link and on the fastest other one, and
    /// hold the gaps they may fill (bond sequence numbers after the link's last ordered packet
    /// and before `hi`) until the repair can come.
    fn nack_gap(&mut self, i: usize, link_seq: u32, hi: u64, now: Instant) {
        let rx = &self.links[i].rx;
        // A link numbers its packets from 0: the first one to arrive numbered a little above
        // that says the ones before it were lost.
        let (first, missing) = if rx.packets == 0 {
            (0, link_seq)
        } else {
            let gap = link_seq.wrapping_sub(rx.highest_link_seq);
            (rx.highest_link_seq.wrapping_add(1), gap.wrapping_sub(1))
        };
        if !(1..=u32::from(wire::MAX_NACK_RUN)).contains(&missing) {
            return;
        }
        let nack = Control::Nack(wire::Nack {
            link_id: self.links[i].id.0,
            first_link_seq: first,
            count: missing as u16,
        });
        let other = (0..self.links.len())
            .filter(|&j| j != i && self.links[j].est.usable())
            .min_by_key(|&j| self.links[j].est.srtt().unwrap_or(Duration::MAX));
        // A NACK lost on a lossy link leaves only the copy on the other (often slower) link,
        // and a repair that then meets one more loss comes after the reorder timeout: on a
        // link that loses packets, the NACK goes twice (a NACK is 12 bytes, once per loss).
        for j in std::iter::once(i).chain(other) {
            self.push_control(j, &nack);
            if self.links[j].est.loss() > NACK_TWICE_LOSS {
                self.push_control(j, &nack);
            }
        }
        if let Some(w) = self.repair_wait(now) {
            let lo = self.links[i].rx.last_seq.unwrap_or(0);
            let w = w.min(self.config.reorder_max_wait);
            self.reorder.hold(lo, hi, now + w);
        }
        let first_in_a_while = self
            .last_nack
            .is_none_or(|at| now.saturating_duration_since(at) >= NACK_RECENT);
        self.last_nack = Some(now);
        if first_in_a_while {
            // Wait for this repair too, not only for the ones after the next timeout update.
            self.update_reorder_timeout(now);
        }
    }

    /// Sends again, ahead of bulk traffic and on the link where they arrive first, the packets
    /// a NACK reports lost (those still kept and not sent again already).
    fn resend(&mut self, n: wire::Nack, now: Instant) {
        let Some(j) = self.link_index(LinkId(n.link_id)) else {
            return;
        };
        let mut found = Vec::new();
        let count = u32::from(n.count.min(wire::MAX_NACK_RUN));
        for k in 0..count {
            let ls = n.first_link_seq.wrapping_add(k);
            let sent = &mut self.links[j].sent;
            let at = sent.partition_point(|r| (r.link_seq.wrapping_sub(ls) as i32) < 0);
            if let Some(r) = sent.get_mut(at) {
                // Its copy right behind it was not reported missing: it arrived.
                let copy_arrived = r.copy_next && k + 1 >= count;
                if r.link_seq == ls && !r.data.is_empty() && !copy_arrived {
                    found.push((r.seq, std::mem::take(&mut r.data)));
                }
            }
        }
        if found.is_empty() {
            return;
        }
        self.links[j].stats.retransmits += found.len() as u64;
        self.send_again(found, now, true);
    }

    /// Queues packets sent before (lost, or on a link that died) on the usable link where they
    /// arrive first, behind latency-critical packets and ahead of bulk traffic, with their
    /// original sequence numbers. `repair`: packets a NACK asked for also go, as a copy, on
    /// the link where they arrive second. A lost repair is a loss TCP sees (CUBIC halves its
    /// window), and the link that lost the original may well lose the repair too; repairs are
    /// as few as the losses, so the copy costs little.
    fn send_again(&mut self, packets: Vec<(u64, Vec<u8>)>, now: Instant, repair: bool) {
        if packets.is_empty() {
            return;
        }
        self.fill_candidates(now, true);
        // Copies in `auto` only: `failover` keeps a standby link idle, `stripe` is plain
        // striping, `duplicate` copies everything already.
        let (mode, kind) = if repair && self.config.mode == Mode::Auto {
            (Mode::Auto, PacketKind::Critical)
        } else {
            (Mode::Stripe, PacketKind::Bulk)
        };
        let targets = scheduler::choose(mode, &self.cands, kind);
        let srtt = |i: usize| self.links[i].est.srtt();
        // Not on a link so slow (a satellite) that TCP would have sent it again by then.
        let copy_to = match targets.as_slice() {
            &[a, b, ..] => match (srtt(a), srtt(b)) {
                (Some(ra), Some(rb)) if rb <= ra + SECOND_CHANCE_MAX => Some(b),
                _ => None,
            },
            _ => None,
        };
        // The copies wait ahead of the second link's bulk traffic: at most what it sends in
        // `max_queue_delay` (at least 16 kB) of them.
        let copy_budget = copy_to.map_or(0, |c| {
            (((self.links[c].est.est_rate_bps() / 8) as u128
                * self.config.max_queue_delay.as_micros()
                / 1_000_000) as usize)
                .max(16_000)
        });
        let Some(&t) = targets.as_slice().first() else {
            for (_, b) in packets {
                self.give_buf(b);
            }
            return;
        };
        // At most what the link sends in twice `max_queue_delay` (at least 96 kB: a lightly
        // used link's estimate is low), the newest first: after a link died, the oldest of
        // its packets are the ones the receiver has given up on already, and pings queued
        // behind must not wait long.
        let link = &self.links[t];
        let budget =
            ((link.est.est_rate_bps() / 8) as u128 * 2 * self.config.max_queue_delay.as_micros()
                / 1_000_000)
                .max(96_000);
        let room = MAX_URGENT.saturating_sub(link.resend.len());
        let mut used = 0u128;
        let mut keep = 0;
        for (_, data) in packets.iter().rev() {
            used += (data.len() + TUNNEL_OVERHEAD) as u128;
            if keep >= room || (keep > 0 && used > budget) {
                break;
            }
            keep += 1;
        }
        let skip = packets.len() - keep;
        let mut packets = packets.into_iter();
        for (_, b) in packets.by_ref().take(skip) {
            self.give_buf(b);
        }
        self.note_ordered(t, now);
        if let Some(c) = copy_to {
            self.note_ordered(c, now);
        }
        for (seq, data) in packets {
            if let Some(c) = copy_to {
                if self.links[c].resend.len() < MAX_URGENT
                    && self.links[c].resend_wire_bytes + data.len() + TUNNEL_OVERHEAD <= copy_budget
                {
                    let mut copy = self.take_buf();
                    copy.clear();
                    copy.extend_from_slice(&data);
                    let second = &mut self.links[c];
                    second.stats.tx_duplicates += 1;
                    second.resend_wire_bytes += copy.len() + TUNNEL_OVERHEAD;
                    second.resend.push_back(Queued {
                        seq,
                        flags: wire::FLAG_DUPLICATE,
                        data: copy,
                    });
                }
            }
            // The first copy stays without the duplicate flag: kept, it can be repaired again.
            let link = &mut self.links[t];
            link.resend_wire_bytes += data.len() + TUNNEL_OVERHEAD;
            link.resend.push_back(Queued {
                seq,
                flags: if repair { 0 } else { wire::FLAG_RESENT },
                data,
            });
        }
    }

    fn handle_control(&mut self, i: usize, c: Control, now: Instant) {
        let link_id = self.links[i].id;
        match c {
            Control::Probe(p) => {
                let owd = self.micros(now).wrapping_sub(p.send_time_us);
                self.links[i].rx.on_probe(owd, now);
                let reply = Control::ProbeReply(wire::ProbeReply {
                    link_id: p.link_id,
                    probe_seq: p.probe_seq,
                    echo_time_us: p.send_time_us,
                    hold_us: 0,
                });
                self.push_control(i, &reply);
            }
            Control::ProbeReply(r) => {
                let rtt_us = self
                    .micros(now)
                    .wrapping_sub(r.echo_time_us)
                    .wrapping_sub(r.hold_us);
                // A reply from the far past or future (corrupt or replayed) is no sample.
                if rtt_us < 60_000_000 {
                    let l = &mut self.links[i];
                    l.est
                        .on_rtt_sample(Duration::from_micros(u64::from(rtt_us)), now);
                    if let Some(state) = l.est.update_state(now) {
                        self.events.push_back(Event::LinkState {
                            link: link_id,
                            state,
                        });
                    }
                }
            }
            Control::Feedback(fb) => {
                for e in &fb.entries {
                    let Some(j) = self.link_index(LinkId(e.link_id)) else {
                        continue;
                    };
                    let l = &mut self.links[j];
                    if l.full_from.is_some_and(|f| {
                        (e.highest_link_seq.wrapping_sub(f) as i32) >= 0 && e.packets > 0
                    }) {
                        l.compact_ok = true;
                    }
                    let app_limited = l.app_limited;
                    l.est.on_feedback(e, fb.recv_time_us, now, app_limited);
                    l.app_limited = l.queue.is_empty();
                }
            }
            Control::Nack(n) => self.resend(n, now),
            Control::Features { bits } => {
                self.peer_compact = bits & wire::FEATURE_COMPACT_TRAILER != 0;
            }
            Control::OrderedOn { link_id } => {
                if let Some(j) = self.link_index(LinkId(link_id)) {
                    self.links[j].rx.last_ordered = Some(now);
                    self.update_reorder_timeout(now);
                }
            }
            Control::Tail { link_id, link_seq } => {
                // About the link it came on (it follows that link's data), whose packets
                // after the highest one seen, up to this one, were lost. (Before any packet
                // on the link, the first data packet shows the gap before it.)
                let rx = &self.links[i].rx;
                if link_id == self.links[i].id.0
                    && rx.packets > 0
                    && (link_seq.wrapping_sub(rx.highest_link_seq) as i32) > 0
                {
                    self.nack_gap(i, link_seq.wrapping_add(1), u64::MAX, now);
                    self.links[i].rx.on_tail(link_seq);
                }
            }
            Control::Hello(h) => {
                self.learn_peer_bond_id(h.bond_id, now);
                self.links[i].stats.name.clone_from(&h.name);
                self.links[i].config.name.clone_from(&h.name);
                let ack = Control::HelloAck {
                    link_id: h.link_id,
                    bond_id: h.bond_id,
                    acker_bond_id: self.config.bond_id,
                };
                self.push_control(i, &ack);
                self.push_control(i, &FEATURES);
                self.events.push_back(Event::Hello {
                    link: link_id,
                    hello: h,
                });
            }
            Control::HelloAck {
                bond_id,
                acker_bond_id,
                ..
            } => {
                if bond_id != self.config.bond_id {
                    return;
                }
                self.learn_peer_bond_id(acker_bond_id, now);
                if !self.links[i].hello_acked {
                    self.links[i].hello_acked = true;
                    self.links[i].next_hello = now + HELLO_REFRESH;
                    self.events.push_back(Event::HelloAcked { link: link_id });
                }
            }
        }
    }

    /// Gives a compact trailer's sequence numbers their high bits back: the nearest number to
    /// the highest received so far (per link for `link_seq`), which every trailer, compact or
    /// full, keeps up to date. Packets are never that far apart: a reorder window holds
    /// thousands. False if the link has no full number yet to read a compact one against (the
    /// peer sends full ones until our feedback shows one arrived, so this happens only around a
    /// restart): the packet is dropped rather than numbered wrongly.
    fn extend_seqs(&mut self, i: usize, t: &mut wire::Trailer) -> bool {
        let high = if t.flags & wire::FLAG_UNORDERED != 0 {
            &mut self.rx_useq_high
        } else {
            &mut self.rx_seq_high
        };
        if t.compact {
            let rx = &self.links[i].rx;
            if rx.last_data.is_none() {
                return false;
            }
            let hi = rx.highest_link_seq;
            let d = (t.link_seq as u16).wrapping_sub(hi as u16) as i16;
            t.link_seq = hi.wrapping_add(d as i32 as u32);
            // Without a reference yet, the number is taken as it is: a sender numbers from 0,
            // and a full trailer later corrects the reference (the highest wins).
            if let Some(h) = *high {
                let d = (t.seq as u32).wrapping_sub(h as u32) as i32;
                t.seq = h.saturating_add_signed(i64::from(d));
            }
        }
        *high = Some(high.map_or(t.seq, |h| h.max(t.seq)));
        true
    }

    /// Notes the peer's bond id (from a hello or a hello ack). A different one than before
    /// means the peer restarted and numbers its packets from scratch: forget what we received,
    /// and what we measured of each link: a restarted site may number its links differently
    /// (link 0 was the satellite, now it is the cable), and a stale 600 ms RTT or rate would
    /// steer traffic wrongly for seconds.
    fn learn_peer_bond_id(&mut self, id: u64, now: Instant) {
        if self.peer_bond_id.is_some_and(|b| b != id) {
            self.reorder.reset();
            self.unordered_seen.reset();
            self.reorder_extra = Duration::ZERO;
            self.late_seen = self.reorder.stats().late;
            // Its features come again behind the hello or ack that told us (it may be an
            // older version now).
            self.peer_compact = false;
            self.rx_seq_high = None;
            self.rx_useq_high = None;
            for l in &mut self.links {
                l.rx.reset();
                l.est = LinkEstimator::new(now, l.config.max_rate_bps);
                l.app_limited = true;
                // The new process has no high bits to read compact numbers against.
                l.compact_ok = false;
                l.full_from = None;
            }
        }
        self.peer_bond_id = Some(id);
    }

    /// Runs timers: probes, hellos, feedback, liveness, reorder timeouts.
    pub fn handle_timeout(&mut self, now: Instant) {
        for i in 0..self.links.len() {
            let id = self.links[i].id;
            if let Some(state) = self.links[i].est.update_state(now) {
                self.events.push_back(Event::LinkState { link: id, state });
                if state == LinkState::Down && self.links.len() > 1 {
                    // What the link was given within its dead timeout (and one RTT before, in
                    // flight when it died) may have died with it: send it again at once on the
                    // others, ahead of bulk (the receiver drops what it already has); then
                    // what still waited in its queue.
                    let l = &mut self.links[i];
                    let lost_window = l.est.dead_timeout() + l.est.srtt().unwrap_or(Duration::ZERO);
                    let since = now.checked_sub(lost_window);
                    let mut again: Vec<(u64, Vec<u8>)> = l
                        .sent
                        .drain(..)
                        .filter(|r| !r.data.is_empty() && since.is_none_or(|t| r.at >= t))
                        .map(|r| (r.seq, r.data))
                        .collect();
                    again.extend(l.resend.drain(..).map(|q| (q.seq, q.data)));
                    l.resend_wire_bytes = 0;
                    l.stats.retransmits += again.len() as u64;
                    let mut q = std::mem::take(&mut l.queue);
                    l.queued_bytes = 0;
                    self.send_again(again, now, false);
                    self.reschedule(&mut q, now);
                }
            }
            if self.links[i].tail_at.is_some_and(|t| now >= t) {
                let l = &mut self.links[i];
                l.tail_at = None;
                l.tail_pending = false;
                let tail = Control::Tail {
                    link_id: id.0,
                    link_seq: l.link_seq.wrapping_sub(1),
                };
                self.push_control(i, &tail);
            }
            if now >= self.links[i].next_probe {
                let l = &mut self.links[i];
                l.probe_seq = l.probe_seq.wrapping_add(1);
                let probe = Control::Probe(wire::Probe {
                    link_id: id.0,
                    probe_seq: l.probe_seq,
                    send_time_us: now.saturating_duration_since(self.epoch).as_micros() as u32,
                });
                l.est.on_probe_sent(now);
                let interval = if l.est.overdue(now) {
                    l.est.fast_probe_interval()
                } else {
                    l.est.probe_interval(self.config.probe_interval)
                };
                l.next_probe = now + interval;
                self.push_control(i, &probe);
            }
            if self.config.sends_hello && now >= self.links[i].next_hello {
                let l = &mut self.links[i];
                l.next_hello = now
                    + if l.hello_acked {
                        HELLO_REFRESH
                    } else {
                        HELLO_RETRY
                    };
                let hello = Control::Hello(wire::Hello {
                    link_id: id.0,
                    bond_id: self.config.bond_id,
                    name: l.config.name.clone(),
                });
                self.push_control(i, &hello);
                self.push_control(i, &FEATURES);
            }
        }
        if self.next_feedback.is_some_and(|t| now >= t) {
            self.next_feedback = None;
            self.send_feedback(now);
            // Learned lateness fades over seconds (half-life about 3.5 s at one feedback per
            // 20 ms): losses that need a second repair come seconds apart.
            self.reorder_extra = self.reorder_extra * 255 / 256;
            self.update_reorder_timeout(now);
        }
        self.hold_gap_in_flight(now);
        self.reorder.handle_timeout(now);
        self.reorder_deadline = self.reorder.deadline();
    }

    /// A gap whose wait ran out is not given up while a link that may still bring it keeps
    /// delivering: one that carried ordered data recently and whose packets so far are all
    /// numbered below the gap (a link carries its ordered packets in order, so the missing
    /// one may be in its queue). The timeout rests on base delays; a queue that builds faster
    /// than the sender learns of it (a link's start-up overshoot, a link slowing down) makes
    /// that link's packets later than it, and they came late, out of order, after their gap
    /// was skipped. The gap waits while the link keeps delivering, and is decided once the
    /// link passes it (then a loss on it shows as a gap in its numbers and is asked for) or
    /// falls silent, within the longest wait.
    fn hold_gap_in_flight(&mut self, now: Instant) {
        if self.reorder.deadline().is_none_or(|d| d > now) {
            return;
        }
        let Some(gap) = self.reorder.first_gap().filter(|&g| g > 0) else {
            return;
        };
        let recent =
            |t: Option<Instant>| t.is_some_and(|t| now.saturating_duration_since(t) < RECENT_DATA);
        let until = self
            .links
            .iter()
            .filter(|l| recent(l.rx.last_ordered) && l.rx.last_seq.is_some_and(|s| s < gap))
            .filter_map(|l| l.rx.delivering_until(now))
            .max();
        if let Some(until) = until {
            self.reorder.hold_in_flight(gap, until);
        }
    }

    fn send_feedback(&mut self, now: Instant) {
        let fb = Control::Feedback(wire::Feedback {
            recv_time_us: self.micros(now),
            entries: self
                .links
                .iter()
                .filter(|l| l.rx.packets > 0)
                .take(wire::MAX_FEEDBACK_ENTRIES)
                .map(|l| l.rx.entry(l.id.0))
                .collect(),
        });
        let mut buf = self.take_buf();
        wire::encode_control(&fb, &mut buf);
        // On every link that carried data since the last report, so that the report survives
        // any one link dying.
        for l in &mut self.links {
            if l.rx.dirty {
                l.rx.dirty = false;
                l.control.push_back(buf.clone());
            }
        }
        self.give_buf(buf);
    }

    /// Sets the reorder timeout from the spread of one-way delays and the jitter of the links
    /// that carried data recently.
    fn update_reorder_timeout(&mut self, now: Instant) {
        let recent =
            |t: Option<Instant>| t.is_some_and(|t| now.saturating_duration_since(t) < RECENT_DATA);
        let mut base: Option<u32> = None;
        let mut spread: i64 = 0;
        let mut jitter: u64 = 0;
        // Base delays (recent minimum) set the spread: queueing is the sender's to predict.
        // (base delay, jitter, carried only copies)
        let owds: Vec<(u32, u64, bool)> = self
            .links
            .iter()
            .filter(|l| recent(l.rx.last_ordered) || recent(l.rx.last_copy))
            .filter_map(|l| {
                let o = l.rx.base_owd(now)?;
                Some((o, l.rx.owd().map_or(0, |o| o.1), !recent(l.rx.last_ordered)))
            })
            .collect();
        for &(o, _, _) in &owds {
            match base {
                None => base = Some(o),
                Some(b) if (o.wrapping_sub(b) as i32) < 0 => base = Some(o),
                _ => {}
            }
        }
        if let Some(b) = base {
            for &(o, j, copies_only) in &owds {
                let d = i64::from(o.wrapping_sub(b) as i32);
                if copies_only && d > scheduler::COPY_MAX_EXTRA_DELAY.as_micros() as i64 {
                    continue;
                }
                jitter = jitter.max(j);
                spread = spread.max(d);
            }
        }
        self.reorder_base = Duration::from_micros(spread as u64 + 4 * jitter) + MIN_REORDER_WAIT;
        let mut t = self.reorder_base + self.reorder_extra;
        // While links lose packets, a gap is worth waiting a round trip for: the NACK's
        // answer on the fastest link.
        if self
            .last_nack
            .is_some_and(|at| now.saturating_duration_since(at) < NACK_RECENT)
        {
            if let Some(w) = self.repair_wait(now) {
                t = t.max(w);
            }
        }
        self.reorder
            .set_timeout(t.min(self.config.reorder_max_wait));
    }

    /// How long a repair takes to come after the receiver asks for it: as a retransmission
    /// timer would wait, a round trip plus four deviations. NACKs and repairs also go by the
    /// second-fastest link, so a repair that meets one more loss (likely on a link losing 5 %)
    /// takes half a round trip on each, unless that link is so slow (a satellite) that TCP
    /// would have sent it again by then. The repair also waits behind the queue standing on
    /// its way to us, which the smoothed RTT of the occasional probe follows only slowly.
    fn repair_wait(&self, now: Instant) -> Option<Duration> {
        let (mut first, mut second): (Option<(Duration, Duration)>, Option<_>) = (None, None);
        for l in self.links.iter().filter(|l| l.est.usable()) {
            let Some(r) = l.est.srtt() else {
                continue;
            };
            let r = r + l.rx.queue(now);
            let v = l.est.rttvar();
            if first.is_none_or(|(f, _)| r < f) {
                second = first;
                first = Some((r, v));
            } else if second.is_none_or(|(s, _)| r < s) {
                second = Some((r, v));
            }
        }
        let rto = match (first, second) {
            (Some((r1, v1)), Some((r2, v2))) if r2 <= r1 + SECOND_CHANCE_MAX => {
                (r1 + r2) / 2 + 4 * v1.max(v2)
            }
            (Some((r1, v1)), _) => r1 + 4 * v1,
            (None, _) => return None,
        };
        Some(rto + MIN_REORDER_WAIT)
    }

    /// The next datagram to send: its plaintext is written to `buf`. Control messages go at
    /// once; data leaves each link at that link's pacing rate.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        let n = self.links.len();
        for k in 0..n {
            let i = (self.rr + k) % n;
            if let Some(mut c) = self.links[i].control.pop_front() {
                std::mem::swap(buf, &mut c);
                self.give_buf(c);
                let l = &mut self.links[i];
                l.stats.tx_bytes += buf.len() as u64;
                self.rr = (i + 1) % n;
                return Some(Transmit { link: l.id });
            }
        }
        let send_time_us = self.micros(now);
        let peer_compact = self.peer_compact;
        for k in 0..n {
            let i = (self.rr + k) % n;
            let l = &mut self.links[i];
            if l.next_send > now {
                continue;
            }
            let q = if let Some(q) = l.urgent.pop_front() {
                l.urgent_wire_bytes -= q.data.len() + TUNNEL_OVERHEAD;
                q
            } else if let Some(q) = l.resend.pop_front() {
                l.resend_wire_bytes -= q.data.len() + TUNNEL_OVERHEAD;
                q
            } else {
                let Some(q) = l.queue.pop_front() else {
                    continue;
                };
                l.queued_bytes -= q.data.len();
                q
            };
            if l.queue.is_empty() {
                l.app_limited = true;
            }
            let trailer = wire::Trailer {
                seq: q.seq,
                link_seq: l.link_seq,
                send_time_us,
                link_id: l.id.0,
                flags: q.flags,
                compact: peer_compact && l.compact_ok,
            };
            if !trailer.compact && l.full_from.is_none() {
                l.full_from = Some(l.link_seq);
            }
            l.link_seq = l.link_seq.wrapping_add(1);
            wire::encode_data(&q.data, &trailer, buf);
            l.est.on_sent(buf.len() + TUNNEL_OVERHEAD, now);
            let wire_bits = (buf.len() + TUNNEL_OVERHEAD) as u64 * 8;
            let tx =
                Duration::from_nanos(wire_bits * 1_000_000_000 / l.est.pacing_rate_bps().max(1));
            l.next_send = l
                .next_send
                .max(now - PACING_BURST.min(now.saturating_duration_since(self.epoch)))
                + tx;
            l.stats.tx_packets += 1;
            l.last_data_sent = Some(now);
            // Kept for a NACK (below) on a link that loses packets: if it is the last for a
            // while, the peer learns of its loss only from the tail notice.
            if q.flags & (wire::FLAG_UNORDERED | wire::FLAG_DUPLICATE) == 0 && l.est.loss() > 0.0 {
                l.tail_pending = true;
            }
            l.tail_at = (l.tail_pending
                && l.queue.is_empty()
                && l.urgent.is_empty()
                && l.resend.is_empty())
            .then(|| now + TAIL_DELAY);
            l.stats.tx_bytes += buf.len() as u64;
            let id = l.id;
            self.rr = (i + 1) % n;
            // Kept for a NACK: ordered packets that have no other copy on the way.
            if q.flags & (wire::FLAG_UNORDERED | wire::FLAG_DUPLICATE) == 0 {
                let keep = l
                    .est
                    .srtt()
                    .map_or(Duration::from_millis(500), |r| {
                        2 * r + Duration::from_millis(100)
                    })
                    .min(Duration::from_secs(1));
                l.sent.push_back(SentRecord {
                    link_seq: trailer.link_seq,
                    seq: q.seq,
                    at: now,
                    data: q.data,
                    copy_next: false,
                });
                // Expired buffers go straight back to the pool (a field apart from `links`, so
                // no Vec in between: this runs for every packet).
                while l.sent.len() > MAX_SENT_KEPT
                    || l.sent
                        .front()
                        .is_some_and(|r| now.saturating_duration_since(r.at) > keep)
                {
                    if let Some(r) = l.sent.pop_front() {
                        if self.pool.len() < POOL_MAX {
                            self.pool.push(r.data);
                        }
                    }
                }
            } else {
                if let Some(r) = l
                    .sent
                    .back_mut()
                    .filter(|r| r.seq == q.seq && r.link_seq == trailer.link_seq.wrapping_sub(1))
                {
                    r.copy_next = true;
                }
                self.give_buf(q.data);
            }
            return Some(Transmit { link: id });
        }
        None
    }

    /// Moves the next inner packet for TUN into `buf`; false when there is none.
    pub fn poll_deliver(&mut self, buf: &mut Vec<u8>) -> bool {
        let got = self.reorder.poll_deliver(buf);
        if got {
            self.stats.delivered_packets += 1;
        }
        got
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Bond::handle_timeout`] should be called next (`now` or earlier means at once).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = self.reorder_deadline;
        let mut min = |x: Instant| t = Some(t.map_or(x, |y| y.min(x)));
        if let Some(f) = self.next_feedback {
            min(f);
        }
        for l in &self.links {
            min(l.next_probe);
            if let Some(at) = l.tail_at {
                min(at);
            }
            if let Some(d) = l.est.dead_deadline() {
                min(d);
            }
            if self.config.sends_hello {
                min(l.next_hello);
            }
            if !l.queue.is_empty()
                || !l.urgent.is_empty()
                || !l.resend.is_empty()
                || !l.control.is_empty()
            {
                min(if l.control.is_empty() {
                    l.next_send
                } else {
                    self.epoch
                });
            }
        }
        t
    }

    /// Counters of the bond.
    pub fn stats(&self) -> BondStats {
        let r = self.reorder.stats();
        BondStats {
            rx_duplicates: r.duplicates + r.too_old + self.unordered_dups,
            reorder_skips: r.skipped,
            reorder_late: r.late,
            reorder_waits: r.waited,
            reorder_timeout: self.reorder.timeout(),
            reorder_max_wait_seen: r.max_wait,
            compact_trailers: self.peer_compact,
            ..self.stats.clone()
        }
    }

    /// Counters and estimates of every link.
    pub fn link_stats(&self) -> Vec<(LinkId, LinkStats)> {
        self.links
            .iter()
            .map(|l| {
                let mut s = l.stats.clone();
                s.state = Some(l.est.state());
                s.srtt = l.est.srtt();
                s.min_rtt = l.est.min_rtt();
                s.rttvar = l.est.srtt().map(|_| l.est.rttvar());
                s.loss = l.est.loss();
                s.est_rate_bps = l.est.est_rate_bps();
                s.pacing_rate_bps = l.est.pacing_rate_bps();
                s.jitter = l
                    .est
                    .owd_us()
                    .map(|(_, j)| Duration::from_micros(u64::from(j)));
                (l.id, s)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn copy_credit_is_two_percent_of_the_rate() {
        // 20 Mbit/s: 50 kB/s of credit, at most 5 kB saved up.
        let t0 = Instant::now();
        let mut c = CopyCredit::default();
        let taken = (0..100).filter(|_| c.take(144, 20_000_000, t0)).count();
        assert_eq!(taken, 5_000 / 144);
        assert!(!c.take(144, 20_000_000, t0));
        // A second later: one second's 50 kB, but no more than the 5 kB the bucket holds.
        let t1 = t0 + Duration::from_secs(1);
        let taken = (0..100).filter(|_| c.take(144, 20_000_000, t1)).count();
        assert_eq!(taken, 5_000 / 144);
        // 10 ms later: 500 bytes and the 104 left over, four pings' copies.
        let t2 = t1 + Duration::from_millis(10);
        let taken = (0..100).filter(|_| c.take(144, 20_000_000, t2)).count();
        assert_eq!(taken, 4);
        // A slow link still has room for one full-size packet's copy.
        let mut c = CopyCredit::default();
        assert!(c.take(1_460, 1_000_000, t0));
    }

    fn hub_with_link() -> (Bond, Instant) {
        let now = Instant::now();
        let mut b = Bond::new(BondConfig::default(), now);
        b.add_link(LinkId(0), LinkConfig::default(), now);
        (b, now)
    }

    fn udp_packet(n: u32) -> Vec<u8> {
        let mut p = vec![0u8; 200];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&200u16.to_be_bytes());
        p[9] = 17;
        p[28..32].copy_from_slice(&n.to_be_bytes());
        p
    }

    /// A site and a hub with one link each, hellos exchanged through `carry`.
    fn peers(now: Instant) -> (Bond, Bond) {
        let mk = |site: bool, id: u64| {
            let cfg = BondConfig {
                mode: Mode::Stripe,
                sends_hello: site,
                bond_id: id,
                ..BondConfig::default()
            };
            let mut b = Bond::new(cfg, now);
            b.add_link(LinkId(0), LinkConfig::default(), now);
            b
        };
        (mk(true, 1), mk(false, 2))
    }

    /// Carries, instantly and a few rounds back and forth, what both bonds send, but for the
    /// `Features` messages when `old_site` (a site of the version before them); returns the
    /// lengths of the data plaintexts the hub sent, and how many packets the site delivered.
    fn carry(site: &mut Bond, hub: &mut Bond, now: Instant, old_site: bool) -> (Vec<usize>, usize) {
        let mut buf = Vec::new();
        let mut lens = Vec::new();
        let mut delivered = 0;
        site.handle_timeout(now);
        hub.handle_timeout(now);
        for _ in 0..4 {
            while let Some(tx) = site.poll_transmit(now, &mut buf) {
                let features = matches!(
                    wire::decode(&buf),
                    Ok(Message::Control(Control::Features { .. }))
                );
                if !(old_site && features) {
                    let _ = hub.handle_inbound(tx.link, &buf, now);
                }
            }
            while let Some(tx) = hub.poll_transmit(now, &mut buf) {
                if matches!(wire::decode(&buf), Ok(Message::Data { .. })) {
                    lens.push(buf.len());
                }
                let _ = site.handle_inbound(tx.link, &buf, now);
            }
            while site.poll_deliver(&mut buf) {
                delivered += 1;
            }
        }
        while hub.poll_deliver(&mut buf) {}
        (lens, delivered)
    }

    /// `n` packets from the hub, 1 ms apart after `t0`, each carried at once: what [`carry`]
    /// returns, summed.
    fn send(
        site: &mut Bond,
        hub: &mut Bond,
        t0: Instant,
        n: u32,
        old_site: bool,
    ) -> (Vec<usize>, usize) {
        let mut lens = Vec::new();
        let mut delivered = 0;
        for k in 0..n {
            let now = t0 + Duration::from_millis(u64::from(k) + 1);
            hub.handle_outbound(&udp_packet(k), now);
            let (l, d) = carry(site, hub, now, old_site);
            lens.extend(l);
            delivered += d;
        }
        (lens, delivered)
    }

    #[test]
    fn trailers_are_compact_once_the_peer_says_it_reads_them_and_full_for_an_older_peer() {
        for old_site in [false, true] {
            let t0 = Instant::now();
            let (mut site, mut hub) = peers(t0);
            carry(&mut site, &mut hub, t0, old_site);
            let (lens, delivered) = send(&mut site, &mut hub, t0, 50, old_site);
            let want = 200
                + if old_site {
                    wire::TRAILER_LEN
                } else {
                    wire::COMPACT_TRAILER_LEN
                };
            assert_eq!(delivered, 50, "old site: {old_site}");
            assert_eq!(hub.stats().compact_trailers, !old_site);
            // Full numbers until the site's feedback shows some arrived (every 20 ms), so
            // that it has the high bits compact ones leave out; then compact throughout.
            let full = lens
                .iter()
                .take_while(|&&l| l == 200 + wire::TRAILER_LEN)
                .count();
            assert!(
                lens.len() == 50 && lens[full..].iter().all(|&l| l == want),
                "old site: {old_site}: {lens:?}"
            );
            assert!(
                old_site || (1..=25).contains(&full),
                "{full} full: {lens:?}"
            );
        }
    }

    #[test]
    fn compact_sequence_numbers_carry_on_across_their_wrap() {
        let t0 = Instant::now();
        let (mut site, mut hub) = peers(t0);
        carry(&mut site, &mut hub, t0, false);
        // Far on, as after days of traffic: both numbers wrap within the next 300 packets.
        hub.next_seq = (1 << 32) - 100;
        hub.links[0].link_seq = u32::from(u16::MAX) - 150;
        let delivered = send(&mut site, &mut hub, t0, 300, false).1;
        let rx = &site.links[0].rx;
        assert_eq!(delivered, 300);
        assert_eq!(rx.highest_link_seq, u32::from(u16::MAX) - 150 + 299);
        assert_eq!(site.rx_seq_high, Some((1 << 32) + 199));
        let st = site.stats();
        assert_eq!((st.reorder_skips, st.rx_duplicates), (0, 0), "{st:?}");
        // No NACK: the site saw no gap in the link's numbers.
        assert_eq!(hub.link_stats()[0].1.retransmits, 0);
    }

    #[test]
    fn a_restarted_receiver_gets_full_numbers_before_compact_ones() {
        // The hub has sent for days: its numbers need more bits than a compact trailer has.
        let t0 = Instant::now();
        let (mut site, mut hub) = peers(t0);
        carry(&mut site, &mut hub, t0, false);
        hub.next_seq = (1 << 33) + 5000;
        hub.links[0].link_seq = 1_000_000;
        let lens = send(&mut site, &mut hub, t0, 40, false).0;
        assert_eq!(lens.last(), Some(&(200 + wire::COMPACT_TRAILER_LEN)));
        // The site restarts: a new process, a new bond id, nothing received yet.
        let t1 = t0 + Duration::from_millis(100);
        let (mut site, _) = peers(t1);
        site.config.bond_id = 3;
        carry(&mut site, &mut hub, t1, false);
        let (lens, delivered) = send(&mut site, &mut hub, t1, 300, false);
        assert_eq!(delivered, 300);
        // Full numbers first, compact once the site's feedback showed them arrived.
        assert_eq!(lens.first(), Some(&(200 + wire::TRAILER_LEN)));
        assert_eq!(lens.last(), Some(&(200 + wire::COMPACT_TRAILER_LEN)));
        assert_eq!(site.rx_seq_high, Some((1 << 33) + 5000 + 40 + 299));
        assert_eq!(site.links[0].rx.highest_link_seq, 1_000_000 + 40 + 299);
        assert_eq!(site.stats().malformed, 0);
        assert_eq!(hub.link_stats()[0].1.retransmits, 0);
    }

    #[test]
    fn a_compact_trailer_with_nothing_to_read_it_against_is_dropped() {
        let t0 = Instant::now();
        let (mut site, _) = peers(t0);
        let mut buf = Vec::new();
        let trailer = wire::Trailer {
            seq: 7,
            link_seq: 7,
            send_time_us: 0,
            link_id: 0,
            flags: 0,
            compact: true,
        };
        wire::encode_data(&udp_packet(0), &trailer, &mut buf);
        assert_eq!(site.handle_inbound(LinkId(0), &buf, t0), Ok(()));
        assert_eq!(site.stats().malformed, 1);
        let mut out = Vec::new();
        assert!(!site.poll_deliver(&mut out));
    }

    #[test]
    fn malformed_plaintext_is_counted_not_fatal() {
        let (mut b, now) = hub_with_link();
        assert_eq!(
            b.handle_inbound(LinkId(0), &[0x45, 0, 0], now),
            Err(wire::DecodeError::Truncated)
        );
        assert_eq!(b.stats().malformed, 1);
        // Unknown link: dropped and counted.
        let mut buf = Vec::new();
        wire::encode_control(
            &Control::Probe(wire::Probe {
                link_id: 9,
                probe_seq: 1,
                send_time_us: 0,
            }),
            &mut buf,
        );
        assert_eq!(b.handle_inbound(LinkId(9), &buf, now), Ok(()));
        assert_eq!(b.stats().malformed, 2);
    }

    proptest! {
        /// Whatever an authenticated peer sends (random bytes, or well-formed messages with
        /// random fields), the bond neither panics nor grows without bound.
        #[test]
        fn any_peer_input_is_survived(
            msgs in proptest::collection::vec(
                (any::<u8>(), any::<u64>(), any::<u32>(), any::<u32>(), any::<u8>(),
                 proptest::collection::vec(any::<u8>(), 0..80)), 1..200),
        ) {
            let (mut b, t0) = hub_with_link();
            let mut buf = Vec::new();
            let mut out = Vec::new();
            for (i, (kind, a, c, d, e, raw)) in msgs.into_iter().enumerate() {
                let now = t0 + Duration::from_millis(i as u64);
                match kind % 6 {
                    0 => { let _ = b.handle_inbound(LinkId(e % 2), &raw, now); continue; }
                    1 => {
                        let mut p = vec![0u8; 40];
                        p[0] = 0x45;
                        p[3] = 40;
                        wire::encode_data(&p, &wire::Trailer { seq: a, link_seq: c, send_time_us: d, link_id: e, flags: e & 3, compact: e & 4 != 0 }, &mut buf);
                    }
                    2 => wire::encode_control(&Control::Feedback(wire::Feedback { recv_time_us: c, entries: vec![wire::FeedbackEntry {
                        link_id: e % 2, highest_link_seq: c, packets: d, bytes: a, owd_us: d as i32, jitter_us: c, min_owd_us: c as i32 }] }), &mut buf),
                    3 => wire::encode_control(&Control::ProbeReply(wire::ProbeReply { link_id: e, probe_seq: c, echo_time_us: d, hold_us: c }), &mut buf),
                    4 => wire::encode_control(&Control::Hello(wire::Hello { link_id: e, bond_id: a % 3, name: "x".into() }), &mut buf),
                    _ => wire::encode_control(&Control::Probe(wire::Probe { link_id: e, probe_seq: c, send_time_us: d }), &mut buf),
                }
                let _ = b.handle_inbound(LinkId(0), &buf, now);
                b.handle_timeout(now);
                while b.poll_transmit(now, &mut out).is_some() {}
                while b.poll_deliver(&mut out) {}
                while b.poll_event().is_some() {}
            }
            prop_assert!(b.reorder.held().1 <= BondConfig::default().reorder_max_bytes + 2048);
        }
    }
}
