//! A model of one TCP connection for the simulator: a CUBIC sender (slow start with
//! HyStart's delay check, SACK-based recovery, a retransmission timeout) and a receiver that
//! acknowledges every segment.
//!
//! It is a model, not Linux: no pacing (the sender sends as the window opens, in bursts like
//! an unpaced Linux sender), no receive window, no PRR (in recovery it sends whenever RFC
//! 6675's pipe is under the window). It keeps the parts that decide how a single download
//! fares through a bond: how fast slow start ramps, when HyStart ends it (a round whose
//! first RTT samples sit 4-16 ms above the lowest RTT seen), how a loss shrinks the window
//! (to 0.7) and how the window grows back (the cubic curve, or Reno's pace when that is
//! faster), and how recovery treats a burst of losses: SACK tells the sender which segments
//! arrived (so they leave the pipe), every hole is sent again in one round trip, and a
//! repair lost too is sent again after a round trip (RACK) rather than after the timeout.
//! Constants follow Linux's `tcp_cubic.c`.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

/// CUBIC's scaling constant (window in segments, time in seconds).
const CUBIC_C: f64 = 0.4;
/// Window kept after a loss.
const BETA: f64 = 0.7;
/// Initial window, segments.
const INITIAL_WINDOW: f64 = 10.0;
/// HyStart checks the delay only from this window on.
const HYSTART_LOW_WINDOW: f64 = 16.0;
/// RTT samples at the start of a round that HyStart takes the minimum of.
const HYSTART_SAMPLES: u32 = 8;
/// Lowest retransmission timeout.
const MIN_RTO: Duration = Duration::from_millis(200);

/// What an ACK says beyond its cumulative number (SACK): the highest segment received, how
/// many above the cumulative number arrived, and the first holes below the highest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sack {
    /// Highest segment received (`None`: none above the cumulative ACK).
    pub highest: Option<u64>,
    /// Segments received above the cumulative ACK.
    pub received_above: u64,
    /// The first missing segments (at most the receiver's limit).
    pub holes: Vec<u64>,
}

/// The sending side of the connection.
#[derive(Debug)]
pub struct TcpSender {
    /// Next new segment number.
    next_seq: u64,
    /// Lowest unacknowledged segment.
    snd_una: u64,
    cwnd: f64,
    ssthresh: f64,
    /// Send time of each segment from `snd_una` on, and whether it was sent again.
    sent: VecDeque<(Instant, bool)>,
    dupacks: u32,
    /// From the last ACK: segments received above `snd_una`, and segments missing below the
    /// highest received that were not sent again (lost, not in flight).
    sacked: u64,
    lost: u64,
    /// In recovery until `snd_una` reaches this.
    recover: Option<u64>,
    /// Segments to send again before new ones.
    rtx: VecDeque<u64>,
    /// Segments sent again in the current recovery.
    resent: BTreeSet<u64>,
    srtt: Option<Duration>,
    rttvar: Duration,
    min_rtt: Option<Duration>,
    rto_at: Option<Instant>,
    /// CUBIC: window before the last loss, start of the current growth epoch, time to
    /// reach `w_max` again, and the window Reno would have now.
    w_max: f64,
    epoch: Option<Instant>,
    origin: f64,
    k: f64,
    w_reno: f64,
    /// HyStart: end of the current round, lowest RTT among its first samples.
    round_end: u64,
    round_min: Option<Duration>,
    round_samples: u32,
    /// Largest window the sender lets out, segments: a receive window, or a BBR sender's
    /// (about twice the bandwidth times the lowest RTT).
    max_window: f64,
    /// What happened, for the tests.
    pub stats: TcpStats,
}

/// Counters of a [`TcpSender`].
#[derive(Clone, Debug, Default)]
pub struct TcpStats {
    /// Segments sent again (fast retransmit, partial ACKs, timeouts).
    pub retransmits: u64,
    /// Window reductions after three duplicate ACKs.
    pub loss_events: u64,
    /// Retransmission timeouts.
    pub timeouts: u64,
    /// When HyStart ended slow start, and the window then.
    pub hystart_exit: Option<(Instant, f64)>,
    /// Largest window reached, segments.
    pub max_cwnd: f64,
}

impl Default for TcpSender {
    fn default() -> Self {
        Self::new()
    }
}

impl TcpSender {
    /// A connection that has just been opened (initial window 10).
    pub fn new() -> Self {
        Self {
            next_seq: 0,
            snd_una: 0,
            cwnd: INITIAL_WINDOW,
            ssthresh: f64::INFINITY,
            sent: VecDeque::new(),
            dupacks: 0,
            sacked: 0,
            lost: 0,
            recover: None,
            rtx: VecDeque::new(),
            resent: BTreeSet::new(),
            srtt: None,
            rttvar: Duration::ZERO,
            min_rtt: None,
            rto_at: None,
            w_max: 0.0,
            epoch: None,
            origin: 0.0,
            k: 0.0,
            w_reno: 0.0,
            round_end: 0,
            round_min: None,
            round_samples: 0,
            max_window: f64::INFINITY,
            stats: TcpStats::default(),
        }
    }

    /// Caps the window at `segments` whatever the congestion window. The congestion window
    /// itself still grows and shrinks as before (`cwnd`, `stats.max_cwnd`): a stand-in for a
    /// BBR sender's window, not a model of it.
    pub fn set_max_window(&mut self, segments: f64) {
        self.max_window = segments;
    }

    /// Congestion window, segments.
    pub fn cwnd(&self) -> f64 {
        self.cwnd
    }

    /// Smoothed RTT.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// The next segment the window lets out now (a repair first), recording it as sent.
    pub fn poll_send(&mut self, now: Instant) -> Option<u64> {
        // In flight: what was sent and neither arrived (SACK) nor is lost (RFC 6675's pipe;
        // a hole sent again is in flight again).
        let in_flight =
            (self.next_seq - self.snd_una).saturating_sub(self.sacked + self.lost) as f64;
        if in_flight >= self.cwnd.min(self.max_window).floor().max(1.0) && self.rtx.is_empty() {
            return None;
        }
        if let Some(seq) = self.rtx.pop_front() {
            // A lost hole sent again is in flight again (a RACK repeat was counted so already).
            if self.resent.insert(seq) {
                self.lost = self.lost.saturating_sub(1);
            }
            if let Some(slot) = self.sent.get_mut((seq - self.snd_una) as usize) {
                *slot = (now, true);
            }
            self.stats.retransmits += 1;
            self.rto_at.get_or_insert(now + self.rto());
            return Some(seq);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.sent.push_back((now, false));
        self.rto_at.get_or_insert(now + self.rto());
        Some(seq)
    }

    /// When the retransmission timer fires, if it runs.
    pub fn timeout(&self) -> Option<Instant> {
        self.rto_at
    }

    fn rto(&self) -> Duration {
        self.srtt
            .map_or(Duration::from_secs(1), |s| s + 4 * self.rttvar)
            .max(MIN_RTO)
    }

    /// The retransmission timer fired: the first unacknowledged segment is sent again and
    /// slow start begins from a window of one; the holes SACK shows are sent again as ACKs
    /// come (those already sent again too: the repair may have been lost).
    pub fn on_timeout(&mut self, now: Instant) {
        if self.rto_at.is_none_or(|t| t > now) {
            return;
        }
        if self.snd_una == self.next_seq {
            self.rto_at = None;
            return;
        }
        self.stats.timeouts += 1;
        self.w_max = self.cwnd;
        self.ssthresh = (self.cwnd * BETA).max(2.0);
        self.cwnd = 1.0;
        self.epoch = None;
        self.dupacks = 0;
        self.recover = Some(self.next_seq);
        self.resent.clear();
        self.rtx.clear();
        self.rtx.push_back(self.snd_una);
        self.rto_at = Some(now + 2 * self.rto());
    }

    /// A cumulative ACK: every segment below `ack` arrived; `sack` says which above it did.
    pub fn on_ack(&mut self, ack: u64, sack: &Sack, now: Instant) {
        // Beyond what was sent, or overtaken by a later ACK (its SACK counts are relative to
        // an older cumulative point): ignored.
        if ack > self.next_seq || ack < self.snd_una {
            return;
        }
        let holes = &sack.holes[..];
        if ack > self.snd_una {
            let newly = ack - self.snd_una;
            if let Some(&(at, again)) = self.sent.get((ack - 1 - self.snd_una) as usize) {
                if !again {
                    self.rtt_sample(now.saturating_duration_since(at), now);
                }
            }
            for _ in 0..newly {
                self.sent.pop_front();
            }
            self.snd_una = ack;
            self.rtx.retain(|&s| s >= ack);
            self.dupacks = 0;
            match self.recover {
                Some(r) if ack >= r => {
                    self.recover = None;
                    self.resent.clear();
                    self.cwnd = self.ssthresh.max(2.0);
                }
                // A partial ACK: the next hole is lost too.
                Some(_) => {
                    if !self.rtx.contains(&ack) && !self.resent.contains(&ack) {
                        self.rtx.push_back(ack);
                    }
                }
                None => self.grow(newly as f64, now),
            }
            if ack >= self.round_end {
                self.round_end = self.next_seq;
                self.round_min = None;
                self.round_samples = 0;
            }
            self.rto_at = (self.snd_una < self.next_seq).then(|| now + self.rto());
        } else if ack == self.snd_una && self.next_seq > self.snd_una {
            self.dupacks += 1;
            if self.dupacks == 3 && self.recover.is_none() {
                self.stats.loss_events += 1;
                // Fast convergence: a window below the last maximum gives way to others.
                self.w_max = if self.cwnd < self.w_max {
                    self.cwnd * (1.0 + BETA) / 2.0
                } else {
                    self.cwnd
                };
                self.cwnd = (self.cwnd * BETA).max(2.0);
                self.ssthresh = self.cwnd;
                self.epoch = None;
                self.recover = Some(self.next_seq);
                self.rtx.push_back(self.snd_una);
            }
        }
        // With SACK, every hole is sent again in the same round trip (once per recovery).
        // A repair still missing a round trip (and a quarter) after it left, while later
        // segments keep arriving, was lost too: it goes again (RACK, RFC 8985), rather than
        // waiting for the retransmission timeout.
        if let Some(r) = self.recover {
            let rack_wait = self.srtt.unwrap_or(MIN_RTO) * 5 / 4;
            // When the newest segment that arrived was sent: a repair sent after it may well
            // still be on its way.
            let newest_arrived = sack
                .highest
                .and_then(|h| h.checked_sub(self.snd_una))
                .and_then(|k| self.sent.get(k as usize))
                .map(|&(at, _)| at);
            for &h in holes {
                if h < self.snd_una || h >= r || self.rtx.contains(&h) {
                    continue;
                }
                if !self.resent.contains(&h) {
                    if h > self.snd_una {
                        self.rtx.push_back(h);
                    }
                } else if let Some(&(at, true)) = self.sent.get((h - self.snd_una) as usize) {
                    if now.saturating_duration_since(at) >= rack_wait
                        && newest_arrived.is_some_and(|n| n > at)
                    {
                        self.rtx.push_back(h);
                    }
                }
            }
        }
        // The pipe: segments above the cumulative ACK that arrived, and the holes below the
        // highest that are lost and not yet sent again.
        // (After the early return and the update above, `ack` is `snd_una`.)
        let una = self.snd_una;
        self.sacked = sack.received_above;
        let missing = sack.highest.map_or(0, |h| {
            (h + 1)
                .saturating_sub(una)
                .saturating_sub(sack.received_above)
        });
        // Holes sent again are in flight, not lost. The ACK lists the first holes only; when
        // it lists them all, count exactly, else every repair below the highest.
        let resent_missing = if holes.len() as u64 == missing {
            holes.iter().filter(|h| self.resent.contains(h)).count() as u64
        } else {
            sack.highest
                .filter(|&h| h >= una)
                .map_or(0, |h| self.resent.range(una..=h).count() as u64)
        };
        self.lost = if self.recover.is_some() {
            missing.saturating_sub(resent_missing)
        } else {
            0
        };
        self.stats.max_cwnd = self.stats.max_cwnd.max(self.cwnd);
    }

    fn rtt_sample(&mut self, rtt: Duration, now: Instant) {
        self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(s) => {
                let diff = s.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((s * 7 + rtt) / 8);
            }
        }
        // HyStart: the first samples of a round show whether a queue has started to build.
        if self.cwnd < self.ssthresh && self.cwnd >= HYSTART_LOW_WINDOW {
            if self.round_samples < HYSTART_SAMPLES {
                self.round_samples += 1;
                self.round_min = Some(self.round_min.map_or(rtt, |m| m.min(rtt)));
            }
            if let (HYSTART_SAMPLES, Some(cur), Some(min)) =
                (self.round_samples, self.round_min, self.min_rtt)
            {
                let thresh = (min / 8).clamp(Duration::from_millis(4), Duration::from_millis(16));
                if cur >= min + thresh {
                    self.ssthresh = self.cwnd;
                    self.stats.hystart_exit.get_or_insert((now, self.cwnd));
                }
            }
        }
    }

    fn grow(&mut self, acked: f64, now: Instant) {
        if self.cwnd < self.ssthresh {
            self.cwnd += acked;
            return;
        }
        let min_rtt = self.min_rtt.unwrap_or(Duration::from_millis(100));
        let epoch = *self.epoch.get_or_insert_with(|| {
            if self.cwnd < self.w_max {
                self.k = ((self.w_max - self.cwnd) / CUBIC_C).cbrt();
                self.origin = self.w_max;
            } else {
                self.k = 0.0;
                self.origin = self.cwnd;
            }
            self.w_reno = self.cwnd;
            now
        });
        let t = (now.saturating_duration_since(epoch) + min_rtt).as_secs_f64();
        let mut target = self.origin + CUBIC_C * (t - self.k).powi(3);
        // Where Reno would be: CUBIC never grows slower than that.
        self.w_reno += 3.0 * (1.0 - BETA) / (1.0 + BETA) * acked / self.cwnd;
        target = target.max(self.w_reno);
        // At most half a segment per ACK (1.5 times per round trip), as Linux.
        let mut step = if target > self.cwnd {
            ((target - self.cwnd) / self.cwnd).min(0.5)
        } else {
            0.01 / self.cwnd
        };
        // Before the first loss the capacity is unknown: at least 5 % per round trip, as
        // Linux grows after HyStart ended slow start.
        if self.w_max == 0.0 {
            step = step.max(0.05);
        }
        self.cwnd += step * acked;
    }
}

/// The receiving side: acknowledges every segment with the next one it needs.
#[derive(Debug, Default)]
pub struct TcpReceiver {
    rcv_next: u64,
    out_of_order: BTreeSet<u64>,
    /// (time, segments in order so far) each time the in-order point moved.
    pub progress: Vec<(Instant, u64)>,
}

impl TcpReceiver {
    /// A segment arrived; returns the ACK to send.
    pub fn on_segment(&mut self, seq: u64, now: Instant) -> u64 {
        if seq == self.rcv_next {
            self.rcv_next += 1;
            while self.out_of_order.remove(&self.rcv_next) {
                self.rcv_next += 1;
            }
            self.progress.push((now, self.rcv_next));
        } else if seq > self.rcv_next {
            self.out_of_order.insert(seq);
        }
        self.rcv_next
    }

    /// What the next ACK tells beyond its cumulative number, with at most `max` holes.
    pub fn sack(&self, max: usize) -> Sack {
        Sack {
            highest: self.out_of_order.last().copied(),
            received_above: self.out_of_order.len() as u64,
            holes: self.holes(max),
        }
    }

    /// Up to `max` segments missing between the in-order point and the highest received
    /// (what SACK blocks tell the sender).
    pub fn holes(&self, max: usize) -> Vec<u64> {
        let mut out = Vec::new();
        let mut want = self.rcv_next;
        for &s in &self.out_of_order {
            while want < s && out.len() < max {
                out.push(want);
                want += 1;
            }
            want = s + 1;
            if out.len() >= max {
                break;
            }
        }
        out
    }

    /// Segments received in order by `at`.
    pub fn in_order_at(&self, at: Instant) -> u64 {
        let i = self.progress.partition_point(|(t, _)| *t <= at);
        i.checked_sub(1).map_or(0, |i| self.progress[i].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lossless pipe of `rtt` with unlimited rate: slow start doubles the window per
    /// round trip.
    #[test]
    fn slow_start_doubles_per_round_trip() {
        let t0 = Instant::now();
        let mut s = TcpSender::new();
        let mut r = TcpReceiver::default();
        let rtt = Duration::from_millis(20);
        for round in 0..4u32 {
            let now = t0 + rtt * round;
            let mut sent = Vec::new();
            while let Some(seq) = s.poll_send(now) {
                sent.push(seq);
            }
            assert_eq!(
                sent.len() as f64,
                10.0 * 2f64.powi(round as i32),
                "round {round}"
            );
            for seq in sent {
                let ack = r.on_segment(seq, now + rtt / 2);
                s.on_ack(ack, &Sack::default(), now + rtt);
            }
        }
    }

    #[test]
    fn three_duplicate_acks_resend_the_hole_and_shrink_the_window() {
        let t0 = Instant::now();
        let mut s = TcpSender::new();
        let mut r = TcpReceiver::default();
        let mut sent = Vec::new();
        while let Some(seq) = s.poll_send(t0) {
            sent.push(seq);
        }
        let later = t0 + Duration::from_millis(20);
        for seq in sent.into_iter().filter(|&q| q != 2) {
            let ack = r.on_segment(seq, later);
            s.on_ack(ack, &r.sack(16), later);
        }
        assert_eq!(s.stats.loss_events, 1);
        // Slow start grew the window by the two segments ACKed before the hole: 12 x 0.7.
        assert!((s.cwnd() - 8.4).abs() < 1e-9, "cwnd {}", s.cwnd());
        // The hole goes first, then new data as the inflated window allows.
        assert_eq!(s.poll_send(later), Some(2));
        let ack = r.on_segment(2, later + Duration::from_millis(10));
        assert_eq!(ack, 10);
        s.on_ack(ack, &Sack::default(), later + Duration::from_millis(20));
        assert_eq!(s.stats.loss_events, 1);
        assert_eq!(r.in_order_at(later + Duration::from_millis(10)), 10);
    }

    /// Segment 2 is lost and so is its repair: while later segments keep arriving, the
    /// repair goes again a round trip and a quarter after it left (RACK), long before the
    /// 200 ms timeout; SACKed segments leave the pipe, so new data flows meanwhile.
    #[test]
    fn a_lost_repair_is_sent_again_after_a_round_trip_not_a_timeout() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let mut s = TcpSender::new();
        let mut r = TcpReceiver::default();
        let mut deliver = |s: &mut TcpSender, seqs: &[u64], at: Instant| {
            for &q in seqs {
                let ack = r.on_segment(q, at);
                s.on_ack(ack, &r.sack(16), at);
            }
        };
        let first: Vec<u64> = std::iter::from_fn(|| s.poll_send(ms(0))).collect();
        assert_eq!(first.len(), 10);
        // RTT 20 ms; 2 is lost.
        deliver(&mut s, &[0, 1, 3, 4, 5, 6, 7, 8, 9], ms(20));
        assert_eq!(s.stats.loss_events, 1);
        let burst: Vec<u64> = std::iter::from_fn(|| s.poll_send(ms(20))).collect();
        assert_eq!(burst.first(), Some(&2), "the hole goes first: {burst:?}");
        assert!(burst.len() > 1, "SACKed segments left the pipe: {burst:?}");
        // The repair is lost too; the new segments arrive 20 ms later.
        let new: Vec<u64> = burst[1..].to_vec();
        deliver(&mut s, &new, ms(40));
        assert_eq!(s.stats.retransmits, 1);
        // A round trip and a quarter after the repair: 2 goes again.
        let more: Vec<u64> = std::iter::from_fn(|| s.poll_send(ms(40))).collect();
        deliver(&mut s, &more, ms(46));
        let again: Vec<u64> = std::iter::from_fn(|| s.poll_send(ms(46))).collect();
        assert_eq!(again.first(), Some(&2), "{again:?}");
        assert_eq!(s.stats.retransmits, 2);
        assert_eq!(s.stats.timeouts, 0);
    }

    /// ACKs cross the bond as latency-critical packets, on two links: an old one can come
    /// after newer ones. Its SACK counts belong to an older cumulative point; taken as
    /// current they would empty the pipe and let a window's worth more out at once.
    #[test]
    fn an_ack_overtaken_by_a_later_one_is_ignored() {
        let t0 = Instant::now();
        let at = t0 + Duration::from_millis(20);
        let mut s = TcpSender::new();
        let mut r = TcpReceiver::default();
        while s.poll_send(t0).is_some() {}
        // 1 is lost: 0 and 2-9 arrive; the last of those ACKs (cumulative 1, eight above)
        // is the one that will come late.
        let mut stale = None;
        for q in [0, 2, 3, 4, 5, 6, 7, 8, 9] {
            let ack = r.on_segment(q, at);
            stale = Some((ack, r.sack(16)));
            s.on_ack(ack, &r.sack(16), at);
        }
        let (old_ack, old_sack) = stale.expect("acks");
        assert_eq!((old_ack, old_sack.received_above), (1, 8));
        // The repair arrives, recovery ends; the window fills with new segments.
        assert_eq!(s.poll_send(at), Some(1));
        let later = at + Duration::from_millis(20);
        let ack = r.on_segment(1, later);
        s.on_ack(ack, &r.sack(16), later);
        let sent = std::iter::from_fn(|| s.poll_send(later)).count();
        assert!(sent > 0);
        s.on_ack(old_ack, &old_sack, later);
        assert_eq!(s.poll_send(later), None, "the old ACK opened the window");
    }

    #[test]
    fn a_silent_path_times_out_to_a_window_of_one() {
        let t0 = Instant::now();
        let mut s = TcpSender::new();
        while s.poll_send(t0).is_some() {}
        let t = s.timeout().expect("timer runs");
        s.on_timeout(t);
        assert_eq!(s.stats.timeouts, 1);
        assert_eq!(s.cwnd(), 1.0);
        assert_eq!(s.poll_send(t), Some(0));
    }
}
