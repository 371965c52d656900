//! A deterministic network simulator for the bond core: two [`Bond`]s (a site and a hub)
//! joined by N simulated links, in virtual time, with a seeded random generator.
//!
//! Each link direction has a one-way delay, jitter (without reordering), random and
//! Gilbert-Elliott burst loss, a rate limit with a bounded queue (tail drop, like a modem's
//! buffer) and outages at given times. A traffic source offers constant-rate packets from
//! the site to the hub; everything delivered is recorded so that tests can check loss,
//! latency, order and reorder waits. Scenario tests live in `tests/sim_scenarios.rs`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{wire, Bond, BondConfig, Event, LinkConfig, LinkId, Mode};

pub mod tcp;
use tcp::{Sack, TcpReceiver, TcpSender};

/// One direction of a simulated link.
#[derive(Clone, Debug)]
pub struct LinkSpec {
    /// Rate limit in bits per second (`None`: unlimited).
    pub rate_bps: Option<u64>,
    /// One-way propagation delay.
    pub delay: Duration,
    /// Maximum extra delay, uniformly distributed (packets never overtake each other).
    pub jitter: Duration,
    /// Random loss probability, 0..1.
    pub loss: f64,
    /// Gilbert-Elliott burst loss: (P(good -> bad), P(bad -> good)); every packet in the bad
    /// state is lost.
    pub burst: Option<(f64, f64)>,
    /// Longest queue before the rate limiter, as drain time.
    pub queue: Duration,
    /// Outages as (start, end) offsets from the start of the simulation.
    pub outages: Vec<(Duration, Duration)>,
    /// Rate changes as (offset from the start, new rate in bits per second).
    pub rate_changes: Vec<(Duration, u64)>,
}

impl LinkSpec {
    /// A link of `rate_mbit` (0 = unlimited) and `delay_ms` one-way delay, no loss, 50 ms queue.
    pub fn new(rate_mbit: f64, delay_ms: u64) -> Self {
        Self {
            rate_bps: (rate_mbit > 0.0).then_some((rate_mbit * 1e6) as u64),
            delay: Duration::from_millis(delay_ms),
            jitter: Duration::ZERO,
            loss: 0.0,
            burst: None,
            queue: Duration::from_millis(50),
            outages: Vec::new(),
            rate_changes: Vec::new(),
        }
    }

    /// The rate becomes `rate_mbit` at `at_s` seconds after the start.
    pub fn rate_change(mut self, at_s: f64, rate_mbit: f64) -> Self {
        self.rate_changes
            .push((Duration::from_secs_f64(at_s), (rate_mbit * 1e6) as u64));
        self
    }

    /// Random loss in percent.
    pub fn loss_pct(mut self, pct: f64) -> Self {
        self.loss = pct / 100.0;
        self
    }

    /// Jitter in milliseconds.
    pub fn jitter_ms(mut self, ms: u64) -> Self {
        self.jitter = Duration::from_millis(ms);
        self
    }

    /// Queue length in milliseconds.
    pub fn queue_ms(mut self, ms: u64) -> Self {
        self.queue = Duration::from_millis(ms);
        self
    }

    /// An outage from `from_s` to `to_s` seconds after the start.
    pub fn outage(mut self, from_s: f64, to_s: f64) -> Self {
        self.outages.push((
            Duration::from_secs_f64(from_s),
            Duration::from_secs_f64(to_s),
        ));
        self
    }

    /// Gilbert-Elliott burst loss.
    pub fn burst(mut self, p_enter: f64, p_leave: f64) -> Self {
        self.burst = Some((p_enter, p_leave));
        self
    }
}

/// Counters of one simulated link direction.
#[derive(Clone, Debug, Default)]
pub struct PipeStats {
    /// Datagrams offered.
    pub offered: u64,
    /// Dropped by random or burst loss.
    pub lost: u64,
    /// Dropped because the queue was full.
    pub queue_drops: u64,
    /// Dropped during an outage.
    pub outage_drops: u64,
}

struct Pipe {
    spec: LinkSpec,
    busy_until: Instant,
    last_arrival: Instant,
    bad: bool,
    stats: PipeStats,
}

impl Pipe {
    fn new(spec: LinkSpec, t0: Instant) -> Self {
        Self {
            spec,
            busy_until: t0,
            last_arrival: t0,
            bad: false,
            stats: PipeStats::default(),
        }
    }

    fn in_outage(&self, t0: Instant, at: Instant) -> bool {
        let off = at.saturating_duration_since(t0);
        self.spec.outages.iter().any(|(a, b)| off >= *a && off < *b)
    }

    /// When a datagram of `len` bytes offered now arrives, or `None` if it is dropped.
    fn offer(
        &mut self,
        t0: Instant,
        now: Instant,
        len: usize,
        rng: &mut StdRng,
    ) -> Option<Instant> {
        self.stats.offered += 1;
        if self.in_outage(t0, now) {
            self.stats.outage_drops += 1;
            return None;
        }
        if let Some((enter, leave)) = self.spec.burst {
            self.bad = if self.bad {
                !rng.gen_bool(leave)
            } else {
                rng.gen_bool(enter)
            };
            if self.bad {
                self.stats.lost += 1;
                return None;
            }
        }
        if self.spec.loss > 0.0 && rng.gen_bool(self.spec.loss) {
            self.stats.lost += 1;
            return None;
        }
        let start = self.busy_until.max(now);
        let off = now.saturating_duration_since(t0);
        let rate = self
            .spec
            .rate_changes
            .iter()
            .filter(|(at, _)| *at <= off)
            .max_by_key(|(at, _)| *at)
            .map(|(_, r)| *r)
            .or(self.spec.rate_bps);
        if let Some(rate) = rate {
            if start.saturating_duration_since(now) > self.spec.queue {
                self.stats.queue_drops += 1;
                return None;
            }
            let bits = (len + super::TUNNEL_OVERHEAD) as u64 * 8;
            self.busy_until = start + Duration::from_nanos(bits * 1_000_000_000 / rate);
        } else {
            self.busy_until = start;
        }
        let jitter = if self.spec.jitter.is_zero() {
            Duration::ZERO
        } else {
            self.spec.jitter.mul_f64(rng.gen::<f64>())
        };
        let arrival = (self.busy_until + self.spec.delay + jitter).max(self.last_arrival);
        self.last_arrival = arrival;
        Some(arrival)
    }
}

/// Which end of the simulated connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The site (owns the links, sends hellos, runs the traffic source).
    Site,
    /// The hub.
    Hub,
}

/// One inner packet delivered at the hub.
#[derive(Clone, Copy, Debug)]
pub struct Delivery {
    /// Source packet number.
    pub id: u64,
    /// When the source made it.
    pub created: Instant,
    /// When the first copy reached the hub.
    pub first_arrival: Instant,
    /// When the hub delivered it.
    pub delivered: Instant,
    /// Packet length.
    pub len: usize,
}

struct Flight {
    to: Side,
    link: usize,
    data: Vec<u8>,
}

/// Two bonds joined by simulated links.
pub struct Sim {
    /// Virtual clock.
    pub now: Instant,
    /// Start of the simulation.
    pub t0: Instant,
    /// The site's bond.
    pub site: Bond,
    /// The hub's bond.
    pub hub: Bond,
    rng: StdRng,
    up: Vec<Pipe>,
    down: Vec<Pipe>,
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    flights: HashMap<u64, Flight>,
    flight_seq: u64,
    sources: Vec<Source>,
    next_id: u64,
    /// Creation time and source index of every packet.
    created: Vec<(Instant, usize)>,
    first_arrival: HashMap<u64, Instant>,
    /// Every inner packet delivered at the hub, in delivery order.
    pub deliveries: Vec<Delivery>,
    /// Every event of either bond, with its time.
    pub events: Vec<(Instant, Side, Event)>,
    tcp: Vec<TcpFlow>,
    buf: Vec<u8>,
}

/// A TCP download modelled end to end: the sender at the site, the receiver at the hub,
/// its ACKs back through the hub's bond.
struct TcpFlow {
    sender: TcpSender,
    receiver: TcpReceiver,
    len: usize,
    /// The source index its packets are recorded under.
    source: usize,
}

/// Byte after the packet id that marks a TCP model packet, and what follows it.
const TCP_MARK_AT: usize = ID_AT + 8;
const TCP_DATA: u8 = b'T';
const TCP_ACK: u8 = b'A';
/// Length of an ACK of the TCP model without SACK holes: small, so latency-critical like a
/// real pure ACK.
const TCP_ACK_LEN: usize = 60;
/// Holes an ACK lists at most (8 bytes each after the ACK number).
const TCP_SACK_MAX: usize = 16;

/// Length of the fake IPv4/UDP header in front of the packet id.
const ID_AT: usize = 28;
/// Where a pure ACK carries its id: 20 bytes into its TCP header's 40 (the options).
const TCP_ID_AT: usize = 40;

impl Sim {
    /// A site and a hub in `mode`, one link per spec (same in both directions).
    pub fn new(mode: Mode, links: &[LinkSpec], seed: u64) -> Self {
        Self::with_directions(mode, links, links, seed)
    }

    /// Like [`Sim::new`] with different specs for site-to-hub (`up`) and hub-to-site (`down`).
    pub fn with_directions(mode: Mode, up: &[LinkSpec], down: &[LinkSpec], seed: u64) -> Self {
        let t0 = Instant::now();
        let site_cfg = BondConfig {
            mode,
            sends_hello: true,
            bond_id: seed ^ 0x5175,
            ..BondConfig::default()
        };
        let hub_cfg = BondConfig {
            mode,
            ..BondConfig::default()
        };
        let mut site = Bond::new(site_cfg, t0);
        let mut hub = Bond::new(hub_cfg, t0);
        for i in 0..up.len() {
            let cfg = LinkConfig {
                name: format!("link{i}"),
                priority: i as u32,
                max_rate_bps: None,
            };
            site.add_link(LinkId(i as u8), cfg.clone(), t0);
            hub.add_link(LinkId(i as u8), cfg, t0);
        }
        Self {
            now: t0,
            t0,
            site,
            hub,
            rng: StdRng::seed_from_u64(seed),
            up: up.iter().cloned().map(|s| Pipe::new(s, t0)).collect(),
            down: down.iter().cloned().map(|s| Pipe::new(s, t0)).collect(),
            heap: BinaryHeap::new(),
            flights: HashMap::new(),
            flight_seq: 0,
            sources: Vec::new(),
            next_id: 0,
            created: Vec::new(),
            first_arrival: HashMap::new(),
            deliveries: Vec::new(),
            events: Vec::new(),
            tcp: Vec::new(),
            buf: Vec::new(),
        }
    }

    /// Opens a TCP connection (the [`tcp`] model: CUBIC with HyStart) from the site to the hub
    /// that sends `len`-byte segments for as long as the simulation runs; returns the flow's
    /// index. Its segments are also recorded as the packets of a source (see
    /// [`Sim::tcp_source`]), its ACKs travel back through the hub's bond.
    pub fn start_tcp(&mut self, len: usize) -> usize {
        let source = self.add_source(0, len.max(TCP_ACK_LEN + 1), Traffic::Bulk);
        self.sources[source].next_emit = None;
        self.tcp.push(TcpFlow {
            sender: TcpSender::new(),
            receiver: TcpReceiver::default(),
            len: len.max(TCP_ACK_LEN + 1),
            source,
        });
        self.tcp.len() - 1
    }

    /// Caps TCP flow `flow`'s window at `segments` (see [`TcpSender::set_max_window`]).
    pub fn cap_tcp_window(&mut self, flow: usize, segments: f64) {
        self.tcp[flow].sender.set_max_window(segments);
    }

    /// The sender of TCP flow `flow`.
    pub fn tcp_sender(&self, flow: usize) -> &TcpSender {
        &self.tcp[flow].sender
    }

    /// The source index under which TCP flow `flow`'s segments are recorded.
    pub fn tcp_source(&self, flow: usize) -> usize {
        self.tcp[flow].source
    }

    /// What TCP flow `flow` delivered in order at the hub in `[from_s, to_s)`, as the links
    /// carry it (segment, compact bond trailer and WireGuard/UDP/IP overhead), bits per second: to
    /// compare with the sum of the links' rates.
    pub fn tcp_link_rate_bps(&self, flow: usize, from_s: f64, to_s: f64) -> u64 {
        let f = &self.tcp[flow];
        let at = |s: f64| f.receiver.in_order_at(self.t0 + Duration::from_secs_f64(s));
        let segments = at(to_s) - at(from_s);
        let wire = (f.len + wire::COMPACT_TRAILER_LEN + super::TUNNEL_OVERHEAD) as u64;
        (segments as f64 * wire as f64 * 8.0 / (to_s - from_s)) as u64
    }

    /// Sends what the TCP flows' windows let out now.
    fn pump_tcp(&mut self) {
        let now = self.now;
        for f in 0..self.tcp.len() {
            if self.tcp[f].sender.timeout().is_some_and(|t| t <= now) {
                self.tcp[f].sender.on_timeout(now);
            }
            while let Some(seq) = self.tcp[f].sender.poll_send(now) {
                let (len, source) = (self.tcp[f].len, self.tcp[f].source);
                let id = self.new_id(source);
                let p = tcp_packet(len, id, TCP_DATA, f, seq);
                self.site.handle_outbound(&p, now);
            }
        }
    }

    /// Starts a constant-rate source of `len`-byte bulk UDP packets at `rate_mbit` from the
    /// site; returns its index.
    pub fn start_source(&mut self, rate_mbit: f64, len: usize) -> usize {
        self.add_source((rate_mbit * 1e6) as u64, len.max(ID_AT + 8), Traffic::Bulk)
    }

    /// Starts a ping stream (84-byte ICMP echo requests) of `pps` packets per second.
    pub fn start_ping(&mut self, pps: u64) -> usize {
        self.add_source(pps * 84 * 8, 84, Traffic::Ping)
    }

    /// Starts a stream of `pps` pure TCP ACKs a second (60 bytes: no payload, the packet id
    /// in the TCP options), like the ACKs of a transfer the other way.
    pub fn start_pure_acks(&mut self, pps: u64) -> usize {
        let len = TCP_ID_AT + 20;
        self.add_source(pps * len as u64 * 8, len, Traffic::PureAck)
    }

    fn add_source(&mut self, rate_bps: u64, len: usize, kind: Traffic) -> usize {
        self.sources.push(Source {
            rate_bps,
            len,
            kind,
            next_emit: Some(self.now),
        });
        self.sources.len() - 1
    }

    /// Changes the rate of source `index`.
    pub fn set_source_rate(&mut self, index: usize, rate_mbit: f64) {
        if let Some(src) = self.sources.get_mut(index) {
            src.rate_bps = (rate_mbit * 1e6) as u64;
        }
    }

    /// Stops every source.
    pub fn stop_source(&mut self) {
        for src in &mut self.sources {
            src.next_emit = None;
        }
    }

    /// Packets the source made so far.
    pub fn created(&self) -> u64 {
        self.next_id
    }

    /// Which source made packet `id`.
    pub fn source_of(&self, id: u64) -> Option<usize> {
        self.created.get(id as usize).map(|(_, s)| *s)
    }

    /// When packet `id` was created.
    pub fn created_at(&self, id: u64) -> Option<Instant> {
        self.created.get(id as usize).map(|(t, _)| *t)
    }

    /// Seconds since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.t0
    }

    /// Counters of the site-to-hub direction of link `i`.
    pub fn up_stats(&self, i: usize) -> &PipeStats {
        &self.up[i].stats
    }

    fn make_packet(&mut self, index: usize) {
        let (len, kind) = (self.sources[index].len, self.sources[index].kind);
        let id = self.new_id(index);
        let proto = match kind {
            Traffic::Bulk => 17,
            Traffic::Ping => 1,
            Traffic::PureAck => 6,
        };
        let p = ip_packet(len, proto, 5000, id);
        self.site.handle_outbound(&p, self.now);
    }

    /// Numbers a new packet, recorded as made now by `source`.
    fn new_id(&mut self, source: usize) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.created.push((self.now, source));
        id
    }

    fn next_time(&self) -> Option<Instant> {
        [
            self.heap.peek().map(|Reverse((t, _))| *t),
            self.site.poll_timeout(),
            self.hub.poll_timeout(),
            self.sources.iter().filter_map(|s| s.next_emit).min(),
            self.tcp.iter().filter_map(|f| f.sender.timeout()).min(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs the simulation until `secs` seconds after its start.
    pub fn run_until(&mut self, secs: f64) {
        let end = self.t0 + Duration::from_secs_f64(secs);
        // Bounded: a stuck timer (a bug) ends the run with a panic instead of a hang.
        let mut stuck = 0u32;
        while let Some(t) = self.next_time() {
            if t > end {
                break;
            }
            if t <= self.now {
                stuck += 1;
                assert!(
                    stuck < 1_000_000,
                    "simulation does not advance at {:?}",
                    self.elapsed()
                );
            } else {
                stuck = 0;
                self.now = t;
            }
            self.step();
        }
        self.now = self.now.max(end);
    }

    fn step(&mut self) {
        let now = self.now;
        while let Some(Reverse((t, key))) = self.heap.peek().copied() {
            if t > now {
                break;
            }
            self.heap.pop();
            if let Some(f) = self.flights.remove(&key) {
                self.arrive(f);
            }
        }
        for i in 0..self.sources.len() {
            if let Some(t) = self.sources[i].next_emit.filter(|t| *t <= now) {
                self.make_packet(i);
                let src = &mut self.sources[i];
                let gap = src.len as u64 * 8 * 1_000_000_000 / src.rate_bps.max(1);
                src.next_emit = Some(t + Duration::from_nanos(gap));
            }
        }
        if self.site.poll_timeout().is_some_and(|t| t <= now) {
            self.site.handle_timeout(now);
        }
        if self.hub.poll_timeout().is_some_and(|t| t <= now) {
            self.hub.handle_timeout(now);
        }
        self.pump_tcp();
        self.drain();
        if !self.tcp.is_empty() {
            // ACKs delivered just now open windows: send at once, as a TCP stack would.
            self.pump_tcp();
            self.drain();
        }
    }

    fn arrive(&mut self, f: Flight) {
        let now = self.now;
        match f.to {
            Side::Hub => {
                if let Ok(wire::Message::Data { packet, .. }) = wire::decode(&f.data) {
                    if let Some(id) = packet_id(packet) {
                        self.first_arrival.entry(id).or_insert(now);
                    }
                }
                let _ = self.hub.handle_inbound(LinkId(f.link as u8), &f.data, now);
            }
            Side::Site => {
                let _ = self.site.handle_inbound(LinkId(f.link as u8), &f.data, now);
            }
        }
    }

    fn drain(&mut self) {
        let now = self.now;
        for side in [Side::Site, Side::Hub] {
            loop {
                let mut buf = std::mem::take(&mut self.buf);
                let bond = match side {
                    Side::Site => &mut self.site,
                    Side::Hub => &mut self.hub,
                };
                let Some(t) = bond.poll_transmit(now, &mut buf) else {
                    self.buf = buf;
                    break;
                };
                let link = usize::from(t.link.0);
                let (pipes, to) = match side {
                    Side::Site => (&mut self.up, Side::Hub),
                    Side::Hub => (&mut self.down, Side::Site),
                };
                if let Some(pipe) = pipes.get_mut(link) {
                    if let Some(at) = pipe.offer(self.t0, now, buf.len(), &mut self.rng) {
                        // A packet in flight when an outage starts is lost too.
                        if !pipe.in_outage(self.t0, at) {
                            self.flight_seq += 1;
                            self.flights.insert(
                                self.flight_seq,
                                Flight {
                                    to,
                                    link,
                                    data: buf.clone(),
                                },
                            );
                            self.heap.push(Reverse((at, self.flight_seq)));
                        }
                    }
                }
                self.buf = buf;
            }
        }
        let mut buf = std::mem::take(&mut self.buf);
        let mut acks = Vec::new();
        while self.hub.poll_deliver(&mut buf) {
            if let Some((flow, seq)) = tcp_fields(&buf, TCP_DATA) {
                if let Some(f) = self.tcp.get_mut(flow) {
                    let ack = f.receiver.on_segment(seq, now);
                    acks.push((flow, ack, f.receiver.sack(TCP_SACK_MAX)));
                }
            }
            if let Some(id) = packet_id(&buf) {
                let created = self.created_at(id).unwrap_or(now);
                self.deliveries.push(Delivery {
                    id,
                    created,
                    first_arrival: self.first_arrival.remove(&id).unwrap_or(now),
                    delivered: now,
                    len: buf.len(),
                });
            }
        }
        while self.site.poll_deliver(&mut buf) {
            if let Some((flow, ack)) = tcp_fields(&buf, TCP_ACK) {
                // After the ACK number: the highest segment received (u64::MAX: none), how
                // many above the ACK arrived, then the holes.
                let words: Vec<u64> = buf
                    .get(TCP_MARK_AT + 10..)
                    .unwrap_or(&[])
                    .chunks_exact(8)
                    .filter_map(|c| c.try_into().ok().map(u64::from_be_bytes))
                    .collect();
                let sack = match words.as_slice() {
                    [highest, received_above, holes @ ..] => Sack {
                        highest: (*highest != u64::MAX).then_some(*highest),
                        received_above: *received_above,
                        holes: holes.to_vec(),
                    },
                    _ => Sack::default(),
                };
                if let Some(f) = self.tcp.get_mut(flow) {
                    f.sender.on_ack(ack, &sack, now);
                }
            }
        }
        self.buf = buf;
        for (flow, ack, sack) in acks {
            let id = self.new_id(usize::MAX);
            let words: Vec<u64> = [sack.highest.unwrap_or(u64::MAX), sack.received_above]
                .into_iter()
                .chain(sack.holes.iter().copied())
                .collect();
            let mut p = tcp_packet(TCP_ACK_LEN + 8 * words.len(), id, TCP_ACK, flow, ack);
            for (k, w) in words.iter().enumerate() {
                let at = TCP_MARK_AT + 10 + 8 * k;
                p[at..at + 8].copy_from_slice(&w.to_be_bytes());
            }
            self.hub.handle_outbound(&p, now);
        }
        while let Some(e) = self.site.poll_event() {
            self.events.push((now, Side::Site, e));
        }
        while let Some(e) = self.hub.poll_event() {
            self.events.push((now, Side::Hub, e));
        }
    }

    /// A summary of what was delivered of the packets created in `[from_s, to_s)`.
    pub fn report(&self, from_s: f64, to_s: f64) -> Report {
        self.report_for(None, from_s, to_s)
    }

    /// [`Sim::report`] for the packets of one source.
    pub fn report_source(&self, index: usize, from_s: f64, to_s: f64) -> Report {
        self.report_for(Some(index), from_s, to_s)
    }

    fn report_for(&self, source: Option<usize>, from_s: f64, to_s: f64) -> Report {
        let from = self.t0 + Duration::from_secs_f64(from_s);
        let to = self.t0 + Duration::from_secs_f64(to_s);
        let mut r = Report::default();
        let wanted = |id: u64| {
            let (c, src) = self.created[id as usize];
            c >= from && c < to && source.is_none_or(|s| s == src)
        };
        let ids: Vec<u64> = (0..self.next_id).filter(|&i| wanted(i)).collect();
        r.created = ids.len() as u64;
        let mut seen = vec![0u32; self.next_id as usize];
        let mut last: Option<u64> = None;
        let mut latencies = Vec::new();
        for d in &self.deliveries {
            seen[d.id as usize] += 1;
            let in_window = wanted(d.id);
            if in_window {
                if last.is_some_and(|l| d.id < l) {
                    r.out_of_order += 1;
                }
                last = Some(last.map_or(d.id, |l| l.max(d.id)));
            }
            if in_window {
                latencies.push(d.delivered - d.created);
                r.max_reorder_wait = r.max_reorder_wait.max(d.delivered - d.first_arrival);
                r.bytes += d.len as u64;
            }
        }
        for &i in &ids {
            match seen[i as usize] {
                0 => r.lost += 1,
                1 => {}
                n => r.duplicated += u64::from(n - 1),
            }
        }
        r.delivered = r.created - r.lost;
        latencies.sort();
        let pct = |p: f64| {
            latencies
                .get(((latencies.len() as f64 - 1.0) * p) as usize)
                .copied()
                .unwrap_or_default()
        };
        r.latency_p50 = pct(0.5);
        r.latency_p99 = pct(0.99);
        r.latency_max = latencies.last().copied().unwrap_or_default();
        r.goodput_bps = (r.bytes as f64 * 8.0 / (to_s - from_s)) as u64;
        let wire = r.bytes
            + latencies.len() as u64 * (wire::COMPACT_TRAILER_LEN + super::TUNNEL_OVERHEAD) as u64;
        r.link_rate_bps = (wire as f64 * 8.0 / (to_s - from_s)) as u64;
        r
    }
}

/// What a source sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    /// UDP packets of the source's size (not latency-critical unless small).
    Bulk,
    /// ICMP echo requests (latency-critical).
    Ping,
    /// Pure TCP ACKs (latency-critical, copied only where there is room).
    PureAck,
}

struct Source {
    rate_bps: u64,
    len: usize,
    kind: Traffic,
    next_emit: Option<Instant>,
}

/// An IPv4 packet of `len` bytes from 10.0.0.1 to 10.0.0.2 with protocol `proto`, a UDP
/// header from port `sport` to `sport + 1` (ICMP carries the same bytes; TCP, proto 6, a
/// pure ACK's header with the id in its options) and the packet id.
fn ip_packet(len: usize, proto: u8, sport: u16, id: u64) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&[10, 0, 0, 1]);
    p[16..20].copy_from_slice(&[10, 0, 0, 2]);
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&(sport + 1).to_be_bytes());
    if proto == 6 {
        // A pure ACK: a 40-byte TCP header (flags ACK), the id in its options.
        p[32] = (40 / 4) << 4;
        p[33] = 0x10;
    } else {
        p[24..26].copy_from_slice(&((len - 20) as u16).to_be_bytes());
    }
    let at = id_at(&p);
    p[at..at + 8].copy_from_slice(&id.to_be_bytes());
    p
}

/// Where a packet of the simulator carries its id: after the UDP header, or in the TCP
/// options of a pure ACK (clear of the TCP header's flags).
fn id_at(packet: &[u8]) -> usize {
    if packet.get(9) == Some(&6) {
        TCP_ID_AT
    } else {
        ID_AT
    }
}

/// UDP source port of the TCP model's packets.
const TCP_PORT: u16 = 6000;

/// A packet of the TCP model: a UDP header (the bond needs none of TCP's), the packet id,
/// a mark (data or ACK), the flow and the segment number (or the ACK's).
fn tcp_packet(len: usize, id: u64, mark: u8, flow: usize, seq: u64) -> Vec<u8> {
    let mut p = ip_packet(len, 17, TCP_PORT, id);
    p[TCP_MARK_AT] = mark;
    p[TCP_MARK_AT + 1] = flow as u8;
    p[TCP_MARK_AT + 2..TCP_MARK_AT + 10].copy_from_slice(&seq.to_be_bytes());
    p
}

/// The flow and segment (or ACK) number of a TCP model packet with `mark`.
fn tcp_fields(packet: &[u8], mark: u8) -> Option<(usize, u64)> {
    if packet.get(TCP_MARK_AT) != Some(&mark) || packet.get(20..22) != Some(&TCP_PORT.to_be_bytes())
    {
        return None;
    }
    let b = packet.get(TCP_MARK_AT + 2..TCP_MARK_AT + 10)?;
    Some((
        usize::from(packet[TCP_MARK_AT + 1]),
        u64::from_be_bytes(b.try_into().ok()?),
    ))
}

fn packet_id(packet: &[u8]) -> Option<u64> {
    let at = id_at(packet);
    let b = packet.get(at..at + 8)?;
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

/// What the hub got of the packets created in a time window.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Packets created in the window.
    pub created: u64,
    /// Of those, delivered at least once.
    pub delivered: u64,
    /// Of those, never delivered.
    pub lost: u64,
    /// Extra copies delivered (must be 0).
    pub duplicated: u64,
    /// Deliveries of a window's packet after one with a higher id.
    pub out_of_order: u64,
    /// Bytes delivered of the window's packets.
    pub bytes: u64,
    /// Delivered bits per second of inner packets over the window.
    pub goodput_bps: u64,
    /// The same deliveries counted as the links carry them (inner packet, bond trailer and
    /// WireGuard/UDP/IP overhead), to compare with the links' rates.
    pub link_rate_bps: u64,
    /// Median one-way latency source to hub delivery.
    pub latency_p50: Duration,
    /// 99th percentile latency.
    pub latency_p99: Duration,
    /// Highest latency.
    pub latency_max: Duration,
    /// Longest time a packet waited at the hub between its first arrival and delivery.
    pub max_reorder_wait: Duration,
}

impl Report {
    /// Fraction lost.
    pub fn loss(&self) -> f64 {
        if self.created == 0 {
            0.0
        } else {
            self.lost as f64 / self.created as f64
        }
    }
}
