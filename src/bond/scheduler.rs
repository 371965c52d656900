//! Which link(s) carry a packet.
//!
//! The scheduler sees each link as a candidate with an expected arrival time for the next
//! packet: the time it waits in our pacing queue plus the link's one-way delay. `stripe`
//! picks the earliest arrival (so a slow, long link is used only when the fast ones are
//! backed up); `duplicate` every usable link; `failover` the preferred usable link; `auto`
//! stripes bulk traffic and duplicates latency-critical packets on the two best links.

use std::time::Duration;

use super::{LinkState, Mode};

/// A link as the scheduler sees it for one packet.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    /// Index into the bond's link table.
    pub index: usize,
    /// Link state.
    pub state: LinkState,
    /// Failover priority (lower preferred).
    pub priority: u32,
    /// Time the packet would wait in our queue for this link.
    pub queue_delay: Duration,
    /// One-way delay of the link relative to the fastest link.
    pub owd: Duration,
    /// Measured loss rate.
    pub loss: f64,
    /// How long after its expected arrival a packet lost on this link comes again by a NACK
    /// repair: about the link's round trip.
    pub repair: Duration,
    /// The part of the link's extra one-way delay that `auto` leaves out when it picks the
    /// link for a bulk packet (see [`Candidate::bulk_arrival`]).
    pub bulk_discount: Duration,
    /// Time the bulk traffic queued for this link takes to drain: a copy sent ahead of it
    /// pushes it back (no room to spare).
    pub bulk_backlog: Duration,
}

impl Candidate {
    /// When the packet is expected to arrive, relative to the fastest idle link.
    pub fn arrival(&self) -> Duration {
        self.queue_delay + self.owd
    }

    /// The arrival `auto` compares for a bulk packet's link: a longer link counts only part of
    /// its extra delay, so that it takes packets a little before the shorter link's queue alone
    /// would send them there and stays busy through a window-limited sender's pauses.
    pub fn bulk_arrival(&self) -> Duration {
        self.arrival().saturating_sub(self.bulk_discount)
    }

    /// Up and not lossy: a packet sent on it alone very likely arrives.
    pub fn healthy(&self) -> bool {
        self.state == LinkState::Up && self.loss <= LOSSY
    }
}

/// Loss rate above which `auto` also sends a copy on another link.
pub const LOSSY: f64 = 0.03;
/// A link whose queue is this short has room for copies: its `queue_delay` for copies of a
/// lossy link's bulk packets, its `bulk_backlog` for copies of latency-critical ones.
pub const SPARE: Duration = Duration::from_millis(2);
/// A copy of ordered data is worth sending, and waiting for, only on a link at most this much
/// longer in one-way delay than the fastest: a satellite's copy would come too late to fill a
/// gap (TCP would have sent the packet again), and waiting for it would hold every gap.
pub const COPY_MAX_EXTRA_DELAY: Duration = Duration::from_millis(50);

/// The scheduling decision: up to [`MAX_TARGETS`] link indexes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Targets {
    idx: [usize; MAX_TARGETS],
    len: usize,
}

/// Most copies of one packet.
pub const MAX_TARGETS: usize = 16;

impl Targets {
    fn push(&mut self, i: usize) {
        if self.len < MAX_TARGETS && !self.as_slice().contains(&i) {
            self.idx[self.len] = i;
            self.len += 1;
        }
    }

    /// A second copy on a link already chosen (sent right behind the first).
    fn push_again(&mut self, i: usize) {
        if self.len < MAX_TARGETS {
            self.idx[self.len] = i;
            self.len += 1;
        }
    }

    /// The chosen link indexes (a link twice: two copies on it).
    pub fn as_slice(&self) -> &[usize] {
        &self.idx[..self.len]
    }

    /// Drops every copy but the first.
    pub fn keep_first(&mut self) {
        self.len = self.len.min(1);
    }

    /// More than one copy.
    pub fn is_duplicate(&self) -> bool {
        self.len > 1
    }
}

fn state_rank(s: LinkState) -> u8 {
    match s {
        LinkState::Up => 0,
        LinkState::Degraded => 1,
        LinkState::Probing => 2,
        LinkState::Down => 3,
    }
}

/// What a packet is, as far as the scheduler cares (see [`classify`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketKind {
    /// Bulk traffic: striped over the links.
    Bulk,
    /// A TCP segment without payload or flags beyond ACK (a pure ACK): latency-critical, but
    /// as frequent as the data it acknowledges and cumulative (the next one covers a lost
    /// one), so `auto` copies it only onto a link with room to spare.
    PureAck,
    /// Small UDP (voice, games, QUIC's ACKs) and DSCP EF/AF4x: latency-critical, but possibly
    /// a busy stream, so `auto`'s copies onto a link whose bulk traffic waits take at most a
    /// small share of it (the bond's copy credit).
    Realtime,
    /// TCP SYN, FIN and RST, DNS, pings, repairs: rare, and each one matters; `auto` always
    /// sends them on the two links where they arrive first.
    Critical,
}

/// Chooses the links for one packet of `kind`; `cands` holds every link (any state).
pub fn choose(mode: Mode, cands: &[Candidate], kind: PacketKind) -> Targets {
    let critical = kind != PacketKind::Bulk;
    let mut t = Targets::default();
    // Only the healthiest class of link is eligible: usable links, else links still probing
    // (start-up), else anything (every link looks down: try them all rather than go silent).
    let Some(best_rank) = cands.iter().map(|c| state_rank(c.state).min(2)).min() else {
        return t;
    };
    let eligible = |c: &&Candidate| {
        let r = state_rank(c.state);
        if best_rank < 2 {
            r < 2
        } else {
            r.min(2) == best_rank
        }
    };
    match mode {
        Mode::Duplicate => {
            for c in cands.iter().filter(eligible) {
                t.push(c.index);
            }
        }
        Mode::Failover => {
            if let Some(c) = cands
                .iter()
                .filter(eligible)
                .min_by_key(|c| (state_rank(c.state), c.priority, c.index))
            {
                t.push(c.index);
            }
        }
        Mode::Stripe => {
            if let Some(c) = earliest(cands.iter().filter(eligible), None, Candidate::arrival) {
                t.push(c.index);
            }
        }
        Mode::Auto => {
            let key = if critical {
                Candidate::arrival
            } else {
                Candidate::bulk_arrival
            };
            let Some(first) = earliest(cands.iter().filter(eligible), None, key) else {
                return t;
            };
            t.push(first.index);
            // The second link (a critical packet's copy, a lossy link's copy) by true arrival.
            let second = earliest(
                cands.iter().filter(eligible),
                Some(first.index),
                Candidate::arrival,
            );
            if critical {
                // A pure ACK's copy only where bulk traffic leaves room: under a transfer the
                // other way, an ACK stream is a few percent of it, and on a full second link
                // its copies took that much from the bulk traffic there (both directions
                // loaded at once), for ACKs whose loss the next ACK covers anyway. Not while
                // the first link is failing or lossy: then the copy is what gets through. (A
                // lost ACK that nothing follows, such as the handshake's last, costs a resend
                // timeout; it needs a loss on the first link and a full second one.)
                if let Some(second) = second.filter(|s| {
                    kind != PacketKind::PureAck || s.bulk_backlog <= SPARE || !first.healthy()
                }) {
                    t.push(second.index);
                }
                return t;
            }
            // A lossy link's packet gets a copy while the bond has room to spare (a copy must
            // not eat the capacity bulk traffic needs): a repair costs the packets behind the
            // lost one a round trip of waiting, which TCP's slow start takes for congestion
            // and leaves early (lab: CUBIC left it at 28 packets instead of 150). On the other
            // link if the copy arrives there before a repair could (a copy that comes after
            // the repair fills no gap sooner: lab, 5 % loss on a 10 ms link copied to a 35 ms
            // one, 8 Mbit/s of the 20 went to copies), else right behind the original on the
            // same link (random losses rarely take both).
            if first.loss > LOSSY && first.queue_delay <= SPARE {
                match second {
                    Some(second)
                        if second.queue_delay <= SPARE
                            && second.arrival() < first.arrival() + first.repair
                            && second.owd.saturating_sub(first.owd) <= COPY_MAX_EXTRA_DELAY =>
                    {
                        t.push(second.index);
                    }
                    _ => t.push_again(first.index),
                }
            }
        }
    }
    t
}

fn earliest<'a>(
    cands: impl Iterator<Item = &'a Candidate>,
    except: Option<usize>,
    arrival: fn(&Candidate) -> Duration,
) -> Option<&'a Candidate> {
    cands
        .filter(|c| Some(c.index) != except)
        .min_by_key(|c| (arrival(c), c.index))
}

/// Sorts an inner IP packet into bulk and the kinds of latency-critical traffic (see
/// [`PacketKind`]): packets whose delay or loss hurts far more than their size costs are TCP
/// SYN, FIN, RST and pure ACKs, DNS, small UDP (voice, games), small ICMP, DSCP EF and AF4x. A packet it cannot read (truncated, an IPv4 fragment after the first, an
/// IPv6 extension header) is bulk, unless its DSCP marks it.
pub fn classify(packet: &[u8]) -> PacketKind {
    use PacketKind::{Bulk, Critical, PureAck, Realtime};
    let Some(&first) = packet.first() else {
        return Bulk;
    };
    let (proto, dscp, l4) = match first >> 4 {
        4 if packet.len() >= 20 => {
            let ihl = usize::from(first & 0x0f) * 4;
            // The transport header is only in the first fragment.
            let later_fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff != 0;
            let l4 = match packet.get(ihl..) {
                Some(l4) if ihl >= 20 && !later_fragment => l4,
                _ => &[],
            };
            (packet[9], packet[1] >> 2, l4)
        }
        6 if packet.len() >= 40 => (
            packet[6],
            ((packet[0] & 0x0f) << 2) | (packet[1] >> 6),
            &packet[40..],
        ),
        _ => return Bulk,
    };
    let marked = dscp == 46 || matches!(dscp, 34 | 36 | 38);
    let realtime_if = |c: bool| if c || marked { Realtime } else { Bulk };
    match proto {
        6 if l4.len() >= 20 => {
            let flags = l4[13];
            let data_off = usize::from(l4[12] >> 4) * 4;
            if flags & 0x07 != 0 {
                // SYN, FIN or RST.
                Critical
            } else if l4.len() <= data_off && !marked {
                PureAck
            } else {
                realtime_if(false)
            }
        }
        17 if l4.len() >= 8 => {
            let sport = u16::from_be_bytes([l4[0], l4[1]]);
            let dport = u16::from_be_bytes([l4[2], l4[3]]);
            if sport == 53 || dport == 53 {
                Critical
            } else {
                realtime_if(l4.len() <= 300)
            }
        }
        // ICMP and ICMPv6: pings are how users judge a link (large ICMP is bulk).
        1 | 58 if packet.len() <= 300 => Critical,
        _ => realtime_if(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(index: usize, state: LinkState, q_ms: u64, owd_ms: u64) -> Candidate {
        Candidate {
            index,
            state,
            priority: index as u32,
            queue_delay: Duration::from_millis(q_ms),
            owd: Duration::from_millis(owd_ms),
            loss: 0.0,
            repair: Duration::from_millis(30),
            bulk_discount: Duration::from_millis(owd_ms) / 5,
            bulk_backlog: Duration::from_millis(q_ms),
        }
    }

    #[test]
    fn auto_bulk_takes_the_longer_link_a_little_early() {
        // Fast: 22 ms of queue; slow: idle, 25 ms longer. True arrivals 22 and 25 ms; bulk
        // leaves a fifth of the 25 out.
        let c = [cand(0, LinkState::Up, 22, 0), cand(1, LinkState::Up, 0, 25)];
        assert_eq!(choose(Mode::Auto, &c, PacketKind::Bulk).as_slice(), &[1]);
        assert_eq!(
            choose(Mode::Auto, &c, PacketKind::Critical).as_slice(),
            &[0, 1]
        );
        assert_eq!(choose(Mode::Stripe, &c, PacketKind::Bulk).as_slice(), &[0]);
        // A shorter queue than four fifths of the difference: the fast link still.
        let c = [cand(0, LinkState::Up, 19, 0), cand(1, LinkState::Up, 0, 25)];
        assert_eq!(choose(Mode::Auto, &c, PacketKind::Bulk).as_slice(), &[0]);
    }

    #[test]
    fn stripe_prefers_earliest_arrival() {
        let c = [cand(0, LinkState::Up, 10, 0), cand(1, LinkState::Up, 0, 25)];
        assert_eq!(choose(Mode::Stripe, &c, PacketKind::Bulk).as_slice(), &[0]);
        let c = [cand(0, LinkState::Up, 30, 0), cand(1, LinkState::Up, 0, 25)];
        assert_eq!(choose(Mode::Stripe, &c, PacketKind::Bulk).as_slice(), &[1]);
    }

    #[test]
    fn duplicate_uses_every_usable_link_and_failover_the_preferred() {
        let c = [
            cand(0, LinkState::Down, 0, 0),
            cand(1, LinkState::Up, 0, 5),
            cand(2, LinkState::Degraded, 0, 9),
        ];
        assert_eq!(
            choose(Mode::Duplicate, &c, PacketKind::Bulk).as_slice(),
            &[1, 2]
        );
        assert_eq!(
            choose(Mode::Failover, &c, PacketKind::Bulk).as_slice(),
            &[1]
        );
        let c = [
            cand(0, LinkState::Down, 0, 0),
            cand(1, LinkState::Probing, 0, 0),
        ];
        assert_eq!(
            choose(Mode::Failover, &c, PacketKind::Bulk).as_slice(),
            &[1]
        );
        let c = [
            cand(0, LinkState::Down, 0, 0),
            cand(1, LinkState::Down, 0, 0),
        ];
        assert_eq!(
            choose(Mode::Duplicate, &c, PacketKind::Bulk).as_slice(),
            &[0, 1]
        );
    }

    #[test]
    fn auto_duplicates_critical_and_lossy() {
        let mut c = [cand(0, LinkState::Up, 0, 0), cand(1, LinkState::Up, 0, 20)];
        assert_eq!(choose(Mode::Auto, &c, PacketKind::Bulk).as_slice(), &[0]);
        assert_eq!(
            choose(Mode::Auto, &c, PacketKind::Critical).as_slice(),
            &[0, 1]
        );
        c[0].loss = 0.1;
        assert_eq!(choose(Mode::Auto, &c, PacketKind::Bulk).as_slice(), &[0, 1]);
        // A copy on the other link that would arrive after a repair of the original is not
        // worth its room: the copy goes right behind the original on the same link.
        c[0].repair = Duration::from_millis(15);
        assert_eq!(choose(Mode::Auto, &c, PacketKind::Bulk).as_slice(), &[0, 0]);
        // Likewise when the other link has no room.
        c[0].repair = Duration::from_millis(30);
        c[1].queue_delay = Duration::from_millis(5);
        assert_eq!(choose(Mode::Auto, &c, PacketKind::Bulk).as_slice(), &[0, 0]);
        // No copy at all while the first link is backed up: bulk traffic needs the room.
        c[0].queue_delay = Duration::from_millis(5);
        assert_eq!(choose(Mode::Auto, &c, PacketKind::Bulk).as_slice(), &[0]);
        assert_eq!(
            choose(Mode::Auto, &c, PacketKind::Critical).as_slice(),
            &[0, 1]
        );
    }

    #[test]
    fn auto_copies_a_pure_ack_only_onto_a_link_with_room() {
        // Urgent candidates: the queue a critical packet waits in is short on both links, the
        // slow link's bulk queue is long (a transfer the other way fills it).
        let mut c = [cand(0, LinkState::Up, 0, 0), cand(1, LinkState::Up, 0, 25)];
        assert_eq!(
            choose(Mode::Auto, &c, PacketKind::PureAck).as_slice(),
            &[0, 1]
        );
        c[1].bulk_backlog = Duration::from_millis(15);
        assert_eq!(choose(Mode::Auto, &c, PacketKind::PureAck).as_slice(), &[0]);
        // A ping or a SYN is copied all the same, and `duplicate` copies everything.
        assert_eq!(
            choose(Mode::Auto, &c, PacketKind::Critical).as_slice(),
            &[0, 1]
        );
        assert_eq!(
            choose(Mode::Duplicate, &c, PacketKind::PureAck).as_slice(),
            &[0, 1]
        );
        // A failing or lossy first link: the copy is what gets through.
        c[0].state = LinkState::Degraded;
        assert_eq!(
            choose(Mode::Auto, &c, PacketKind::PureAck).as_slice(),
            &[0, 1]
        );
        c[0].state = LinkState::Up;
        c[0].loss = 0.05;
        assert_eq!(
            choose(Mode::Auto, &c, PacketKind::PureAck).as_slice(),
            &[0, 1]
        );
        c[0].loss = 0.0;
        // The first link is the one where the ACK arrives first, room or not.
        c[0].bulk_backlog = Duration::from_millis(40);
        c[0].queue_delay = Duration::from_millis(30);
        assert_eq!(choose(Mode::Auto, &c, PacketKind::PureAck).as_slice(), &[1]);
    }

    fn is_critical_packet(packet: &[u8]) -> bool {
        classify(packet) != PacketKind::Bulk
    }

    #[test]
    fn classifies_critical_packets() {
        let mut syn = vec![0u8; 40];
        syn[0] = 0x45;
        syn[9] = 6;
        syn[32] = 0x50;
        syn[33] = 0x02;
        assert!(is_critical_packet(&syn));
        let mut bulk = syn.clone();
        bulk[33] = 0x10;
        bulk.resize(1400, 0);
        assert!(!is_critical_packet(&bulk));
        let mut ack = syn.clone();
        ack[33] = 0x10;
        assert!(is_critical_packet(&ack));
        assert_eq!(classify(&ack), PacketKind::PureAck);
        assert_eq!(classify(&syn), PacketKind::Critical);
        let mut fin_ack = ack.clone();
        fin_ack[33] = 0x11;
        assert_eq!(classify(&fin_ack), PacketKind::Critical);
        assert_eq!(classify(&bulk), PacketKind::Bulk);
        let mut ef_ack = ack.clone();
        ef_ack[1] = 46 << 2;
        assert_eq!(classify(&ef_ack), PacketKind::Realtime);
        let mut voice = vec![0u8; 200];
        voice[0] = 0x45;
        voice[9] = 17;
        assert_eq!(classify(&voice), PacketKind::Realtime);
        let mut ping = vec![0u8; 84];
        ping[0] = 0x45;
        ping[9] = 1;
        assert_eq!(classify(&ping), PacketKind::Critical);
        // A later fragment of a TCP segment: no TCP header to read.
        let mut frag = ack.clone();
        frag[6] = 0x00;
        frag[7] = 0xb9;
        assert_eq!(classify(&frag), PacketKind::Bulk);
        // An IHL below 5 is not a header to read either.
        let mut bad_ihl = ack.clone();
        bad_ihl[0] = 0x42;
        assert_eq!(classify(&bad_ihl), PacketKind::Bulk);
        let mut ef = bulk.clone();
        ef[1] = 46 << 2;
        assert!(is_critical_packet(&ef));
        let mut dns = vec![0u8; 600];
        dns[0] = 0x45;
        dns[9] = 17;
        dns[23] = 53;
        assert!(is_critical_packet(&dns));
        assert_eq!(classify(&ef), PacketKind::Realtime);
        assert_eq!(classify(&dns), PacketKind::Critical);
        assert!(!is_critical_packet(&[0x45]));
        assert!(!is_critical_packet(&[]));
    }
}
