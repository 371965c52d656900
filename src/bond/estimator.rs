//! Per-link measurement: RTT from probes, loss and delivery rate from receiver feedback,
//! liveness, and the pacing rate derived from them.
//!
//! Capacity is found the way BBR finds it: the delivery rate the receiver reports is fed to a
//! max filter over the last [`RATE_WINDOW`]; the link is paced at that estimate times a gain
//! that starts high (startup), then cycles gently above and below 1 so that spare capacity is
//! found and the modem's queue is drained again.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::LinkState;

/// How long delivery-rate samples count for the capacity estimate: a link that slows down is
/// noticed within this time.
pub const RATE_WINDOW: Duration = Duration::from_millis(750);
/// Queueing delay (beyond jitter) that only a link slowing down builds: probing above the
/// estimate for one round adds a quarter of a round.
const LONG_QUEUE: Duration = Duration::from_millis(20);
/// Window over which loss is measured.
pub const LOSS_WINDOW: Duration = Duration::from_secs(1);
/// Rate assumed before any measurement.
pub const INITIAL_RATE_BPS: u64 = 8_000_000;
/// Lowest rate a link is ever paced at, so that a link can always show it got faster.
pub const MIN_RATE_BPS: u64 = 500_000;
/// Loss above which a link counts as degraded.
pub const DEGRADED_LOSS: f64 = 0.10;
/// Replies in a row needed before a link that was down is used again.
const RECOVERY_REPLIES: u32 = 3;

/// Gain cycle once the capacity is known: probe above, drain below, cruise.
const CYCLE_GAINS: [f64; 8] = [1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
const STARTUP_GAIN: f64 = 2.0;
/// Queueing delay beyond the link's jitter that counts as a standing queue.
const STANDING_QUEUE: Duration = Duration::from_millis(5);
/// Queueing delay beyond the link's jitter that still counts as drained.
const DRAINED_QUEUE: Duration = Duration::from_millis(2);

/// What held a delivery-rate sample below the link's capacity, if anything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Held {
    /// Our queue for the link ran empty: too little traffic.
    app: bool,
    /// We paced below the estimate to drain a probe's queue.
    drain: bool,
}

impl Held {
    fn or(self, other: Held) -> Held {
        Held {
            app: self.app || other.app,
            drain: self.drain || other.drain,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Startup,
    Drain,
    Cycle(usize),
}

/// What the sender knows about one of its links.
#[derive(Debug)]
pub struct LinkEstimator {
    state: LinkState,
    srtt: Option<Duration>,
    rttvar: Duration,
    latest_rtt: Duration,
    min_rtt: Option<(Duration, Instant)>,
    /// Last time the peer proved that our packets on this link arrive (probe reply or feedback
    /// acknowledging new data).
    last_ack: Option<Instant>,
    /// Oldest probe sent since the last ack.
    unanswered_since: Option<Instant>,
    recovery_replies: u32,
    /// (time, sent, lost) per feedback interval.
    loss_samples: VecDeque<(Instant, u64, u64)>,
    loss: f64,
    /// (time, bits per second) delivery-rate samples.
    rate_samples: VecDeque<(Instant, u64)>,
    est_rate_bps: u64,
    max_rate_bps: Option<u64>,
    phase: Phase,
    phase_start: Instant,
    startup_best: u64,
    startup_rounds_flat: u32,
    /// The estimate when the current probe phase began.
    probe_base: u64,
    /// Last feedback entry processed: (receiver time, highest link seq, packets, bytes).
    last_feedback: Option<(u32, u32, u32, u64)>,
    /// Last delivery-rate sample taken while we kept the link busy.
    last_full_sample: Option<Instant>,
    /// The estimate was measured while a queue built at the bottleneck (the link full), so it
    /// is the link's capacity, not only what the traffic so far needed.
    capacity_found: bool,
    /// Last delivery-rate sample, busy or not, of at least half the estimate.
    last_busy_sample: Option<Instant>,
    /// The current probe cycle began when load returned after a quiet spell: a probe that
    /// finds more means the link changed while quiet, and start-up finds how much.
    probing_after_quiet: bool,
    /// Start of the current delivery-rate sample: (receiver time, bytes, what held it back).
    rate_base: Option<(u32, u64, Held)>,
    /// Relative one-way delay and jitter the peer measured for this link, microseconds.
    owd_us: Option<i32>,
    min_owd_us: Option<i32>,
    jitter_us: u32,
    /// When the link's bottleneck (the modem) would have sent everything we gave it, if it
    /// runs at the estimated rate: our prediction of its queue.
    modem_busy_until: Instant,
    /// When the last phase that paced below the estimate to drain a probe's queue ended.
    drain_end: Option<Instant>,
}

impl LinkEstimator {
    /// A new link, probing, with an optional configured rate cap.
    pub fn new(now: Instant, max_rate_bps: Option<u64>) -> Self {
        let start = max_rate_bps.map_or(INITIAL_RATE_BPS, |m| m.min(INITIAL_RATE_BPS));
        Self {
            state: LinkState::Probing,
            srtt: None,
            rttvar: Duration::ZERO,
            latest_rtt: Duration::ZERO,
            min_rtt: None,
            last_ack: None,
            unanswered_since: None,
            recovery_replies: 0,
            loss_samples: VecDeque::new(),
            loss: 0.0,
            rate_samples: VecDeque::new(),
            est_rate_bps: start,
            max_rate_bps,
            phase: Phase::Startup,
            phase_start: now,
            startup_best: 0,
            startup_rounds_flat: 0,
            probe_base: 0,
            last_feedback: None,
            rate_base: None,
            last_full_sample: None,
            capacity_found: false,
            last_busy_sample: None,
            probing_after_quiet: false,
            owd_us: None,
            min_owd_us: None,
            jitter_us: 0,
            modem_busy_until: now,
            drain_end: None,
        }
    }

    /// Current state.
    pub fn state(&self) -> LinkState {
        self.state
    }

    /// True if the scheduler may put data on this link.
    pub fn usable(&self) -> bool {
        matches!(self.state, LinkState::Up | LinkState::Degraded)
    }

    /// Smoothed RTT.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// RTT mean deviation.
    pub fn rttvar(&self) -> Duration {
        self.rttvar
    }

    /// Lowest recent RTT.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt.map(|(d, _)| d)
    }

    /// Loss rate of our data on this link over the last [`LOSS_WINDOW`].
    pub fn loss(&self) -> f64 {
        self.loss
    }

    /// Estimated capacity in bits per second.
    pub fn est_rate_bps(&self) -> u64 {
        self.est_rate_bps
    }

    /// One-way delay reported by the peer (relative: compare links, not absolute), and jitter.
    pub fn owd_us(&self) -> Option<(i32, u32)> {
        self.owd_us.map(|o| (o, self.jitter_us))
    }

    /// Lowest one-way delay reported by the peer (relative, wrapping; compare links only).
    pub fn base_owd_us(&self) -> Option<i32> {
        self.min_owd_us
    }

    /// Predicted queueing delay at the link's bottleneck for a packet sent now.
    pub fn modem_queue(&self, now: Instant) -> Duration {
        self.modem_busy_until.saturating_duration_since(now)
    }

    /// Accounts a datagram of `wire_bytes` sent now in the predicted bottleneck queue.
    pub fn on_sent(&mut self, wire_bytes: usize, now: Instant) {
        // In startup the capacity is unknown and deliberately exceeded: assume no queue.
        let rate = if self.phase == Phase::Startup {
            self.pacing_rate_bps()
        } else {
            self.est_rate_bps
        }
        .max(MIN_RATE_BPS);
        let tx = Duration::from_nanos(wire_bytes as u64 * 8 * 1_000_000_000 / rate);
        self.modem_busy_until = self.modem_busy_until.max(now) + tx;
    }

    /// Changes the send-rate cap (config reload).
    pub fn set_max_rate(&mut self, max_rate_bps: Option<u64>) {
        // A raised or lifted cap may have been what held the estimate: not the capacity.
        if max_rate_bps.is_none_or(|new| self.max_rate_bps.is_some_and(|old| new > old)) {
            self.capacity_found = false;
        }
        self.max_rate_bps = max_rate_bps;
    }

    /// Rate to pace this link at, bits per second.
    pub fn pacing_rate_bps(&self) -> u64 {
        let gain = match self.phase {
            Phase::Startup => STARTUP_GAIN,
            Phase::Drain => 0.75,
            // A long queue at the bottleneck: the link slowed down (its modem's buffer, sized
            // for the old rate, is now far longer): drain it, and do not probe on top.
            Phase::Cycle(_) if self.long_queue() => 0.75,
            // Cruising while a short queue stands: the estimate is a little high; drain at a
            // tenth of the rate instead of keeping it standing.
            Phase::Cycle(i) if CYCLE_GAINS[i] == 1.0 && self.standing_queue() => 0.9,
            Phase::Cycle(i) => CYCLE_GAINS[i],
        };
        let rate = (self.est_rate_bps as f64 * gain) as u64;
        let rate = rate.max(MIN_RATE_BPS);
        match self.max_rate_bps {
            Some(m) => rate.min(m),
            None => rate,
        }
    }

    /// Time after which the link counts as dead without an ack: about 3 RTT + 100 ms, less a
    /// margin for the reply that was already on its way when the link died.
    pub fn dead_timeout(&self) -> Duration {
        let srtt = self.srtt.unwrap_or(Duration::from_millis(100));
        (2 * srtt + 4 * self.rttvar + Duration::from_millis(90))
            .min(3 * srtt + Duration::from_millis(90))
    }

    /// How often to probe a quiet link: at least three probes per dead timeout.
    pub fn probe_interval(&self, configured: Duration) -> Duration {
        if self.state == LinkState::Down {
            return configured;
        }
        configured
            .min(self.dead_timeout() / 4)
            .max(Duration::from_millis(10))
    }

    /// A probe is overdue: its reply should have come by now. Probe fast until it does.
    pub fn overdue(&self, now: Instant) -> bool {
        match (self.unanswered_since, self.srtt) {
            (Some(since), Some(srtt)) => {
                now.saturating_duration_since(since)
                    > srtt + 4 * self.rttvar + Duration::from_millis(10)
            }
            (Some(since), None) => now.saturating_duration_since(since) > Duration::from_secs(1),
            _ => false,
        }
    }

    /// Interval between probes while one is overdue.
    pub fn fast_probe_interval(&self) -> Duration {
        (self.srtt.unwrap_or(Duration::from_millis(40)) / 4).max(Duration::from_millis(10))
    }

    /// When the link will be declared down if nothing is heard.
    pub fn dead_deadline(&self) -> Option<Instant> {
        // A link that never answered is still probing: it cannot die yet.
        if matches!(self.state, LinkState::Down) || self.srtt.is_none() {
            return None;
        }
        let since = self.unanswered_since?;
        Some(self.last_ack.unwrap_or(since) + self.dead_timeout())
    }

    /// Traffic is waiting for this link. If the link has not been kept busy for a while, its
    /// estimate may be only what light traffic needed: find the capacity again as at start-up
    /// (doubling per round) instead of creeping up by the cruise cycle's 25% per eight rounds;
    /// or, if the estimate is a capacity measured with the link full and the link was quiet
    /// since, probe above it first.
    pub fn on_backlog(&mut self, now: Instant) {
        if self.phase == Phase::Startup || self.state == LinkState::Down {
            return;
        }
        let stale = self
            .last_full_sample
            .is_none_or(|t| now.saturating_duration_since(t) > Duration::from_secs(1));
        if stale {
            let quiet = self
                .last_busy_sample
                .is_none_or(|t| now.saturating_duration_since(t) > Duration::from_secs(1));
            // A link kept busy, though not full, by a window-limited sender restarts as before:
            // probing there measured worse in the simulator (a CUBIC download through 5 % loss
            // on the fast link, 59.5 -> 57.1 Mbit/s).
            if self.capacity_found && quiet {
                // The estimate is the capacity measured when the link was last full: doubling
                // past it again would overfill the modem's buffer for a round trip (drops
                // the receiver must wait out). Probe above it instead; if the probe finds 3 %
                // more, the link got faster while quiet and start-up follows.
                self.phase = Phase::Cycle(0);
                self.phase_start = now;
                self.probe_base = self.est_rate_bps;
                self.probing_after_quiet = true;
            } else {
                self.restart(now);
            }
            // Counts as busy from here: no second restart before the first sample.
            self.last_full_sample = Some(now);
        }
    }

    /// Finds the capacity again as at start-up. Samples from here on are startup's, not held
    /// back by an earlier drain.
    fn restart(&mut self, now: Instant) {
        self.capacity_found = false;
        self.probing_after_quiet = false;
        self.phase = Phase::Startup;
        self.phase_start = now;
        self.startup_best = 0;
        self.startup_rounds_flat = 0;
        self.drain_end = None;
    }

    /// We sent a probe.
    pub fn on_probe_sent(&mut self, now: Instant) {
        self.unanswered_since.get_or_insert(now);
    }

    /// A probe reply measured `rtt`.
    pub fn on_rtt_sample(&mut self, rtt: Duration, now: Instant) {
        self.latest_rtt = rtt;
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let diff = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
        // Windowed min: a sample older than 10 s is replaced by the current one, so a route
        // change to a longer path is eventually accepted.
        match self.min_rtt {
            Some((m, at))
                if m <= rtt && now.saturating_duration_since(at) < Duration::from_secs(10) => {}
            _ => self.min_rtt = Some((rtt, now)),
        }
        self.on_ack(now);
    }

    /// The peer proved it receives our packets on this link.
    pub fn on_ack(&mut self, now: Instant) {
        self.last_ack = Some(now);
        self.unanswered_since = None;
        match self.state {
            LinkState::Down => {
                self.recovery_replies += 1;
                if self.recovery_replies >= RECOVERY_REPLIES {
                    self.recovery_replies = 0;
                    self.state = LinkState::Up;
                    // Rediscover capacity: the link may have come back different.
                    self.restart(now);
                }
            }
            LinkState::Probing => {
                if self.srtt.is_some() {
                    self.state = LinkState::Up;
                }
            }
            LinkState::Up | LinkState::Degraded => {}
        }
    }

    /// Re-evaluates liveness and health; returns the new state if it changed.
    pub fn update_state(&mut self, now: Instant) -> Option<LinkState> {
        let before = self.state;
        if let Some(deadline) = self.dead_deadline() {
            if now >= deadline && self.srtt.is_some() {
                self.state = LinkState::Down;
                self.recovery_replies = 0;
            }
        }
        if matches!(self.state, LinkState::Up | LinkState::Degraded) {
            self.state = if self.loss > DEGRADED_LOSS || self.overdue(now) {
                LinkState::Degraded
            } else {
                LinkState::Up
            };
        }
        (self.state != before).then_some(self.state)
    }

    /// Processes the peer's feedback about this link. `app_limited` says our queue for the
    /// link ran empty recently, so a low delivery rate says nothing about capacity.
    pub fn on_feedback(
        &mut self,
        entry: &super::wire::FeedbackEntry,
        recv_time_us: u32,
        now: Instant,
        app_limited: bool,
    ) {
        let prev = self.last_feedback;
        if let Some((t, ..)) = prev {
            // Stale (the same feedback arrives on several links): ignore.
            if (recv_time_us.wrapping_sub(t) as i32) <= 0 {
                return;
            }
        }
        self.last_feedback = Some((
            recv_time_us,
            entry.highest_link_seq,
            entry.packets,
            entry.bytes,
        ));
        self.owd_us = Some(entry.owd_us);
        self.min_owd_us = Some(entry.min_owd_us);
        self.jitter_us = entry.jitter_us;
        let Some((t0, hi0, pk0, by0)) = prev else {
            return;
        };
        let sent = u64::from(entry.highest_link_seq.wrapping_sub(hi0));
        let got = u64::from(entry.packets.wrapping_sub(pk0));
        if sent > 0 && sent < 1 << 30 {
            self.on_ack(now);
            self.loss_samples
                .push_back((now, sent, sent.saturating_sub(got)));
        }
        while self
            .loss_samples
            .front()
            .is_some_and(|(at, ..)| now.saturating_duration_since(*at) > LOSS_WINDOW)
        {
            self.loss_samples.pop_front();
        }
        let (s, l) = self
            .loss_samples
            .iter()
            .fold((0u64, 0u64), |(s, l), (_, si, li)| (s + si, l + li));
        // Too few packets say little; keep the old figure until there are some.
        if s >= 20 {
            self.loss = l as f64 / s as f64;
        }
        let _ = (t0, by0);
        let held = Held {
            app: app_limited,
            drain: self.drain_recent(now),
        };
        // Delivery rate over at least one round: shorter samples are noisy, and a noisy
        // high sample in the max filter would pace above capacity and build a queue.
        let (bt, bb, bheld) = *self
            .rate_base
            .get_or_insert((recv_time_us, entry.bytes, held));
        let dt_us = u64::from(recv_time_us.wrapping_sub(bt));
        let bytes = entry.bytes.wrapping_sub(bb);
        if dt_us >= 10_000_000 || bytes >= 1 << 40 {
            self.rate_base = Some((recv_time_us, entry.bytes, held));
        } else if dt_us as u128 >= self.sample_interval().as_micros() {
            let rate = bytes * 8 * 1_000_000 / dt_us.max(1);
            self.rate_base = Some((recv_time_us, entry.bytes, Held::default()));
            self.on_rate_sample(rate, now, bheld.or(held));
        } else {
            self.rate_base = Some((bt, bb, bheld.or(held)));
        }
    }

    /// The link was paced below its estimate to drain (not because it slowed down) within
    /// the time its packets take to show in feedback.
    fn drain_recent(&self, now: Instant) -> bool {
        if self.draining() {
            return true;
        }
        // Feedback reports our sends a round trip and up to a feedback interval late.
        let lag = self.srtt.unwrap_or(Duration::from_millis(100)) + 2 * super::FEEDBACK_INTERVAL;
        self.drain_end
            .is_some_and(|t| now.saturating_duration_since(t) < lag)
    }

    /// Pacing below the estimate to take out a probe's queue (not a slowed link's).
    fn draining(&self) -> bool {
        match self.phase {
            Phase::Drain => true,
            Phase::Cycle(i) => CYCLE_GAINS[i] < 1.0 && !self.long_queue(),
            Phase::Startup => false,
        }
    }

    fn sample_interval(&self) -> Duration {
        self.round().max(Duration::from_millis(40))
    }

    /// Queueing delay at the link's bottleneck beyond its jitter, as the peer last measured it
    /// on our data (zero before any). The cruise phase lets up to [`STANDING_QUEUE`] stand,
    /// and a slightly high estimate builds one; the prediction from our own sends misses it.
    pub fn measured_queue(&self) -> Duration {
        self.owd_queue_excess().unwrap_or(Duration::ZERO)
    }

    /// The peer-measured queue beyond the link's jitter, if the peer has reported any.
    fn owd_queue_excess(&self) -> Option<Duration> {
        Some(self.owd_queue()?.saturating_sub(self.jitter_allowance()))
    }

    /// Queueing delay on the link as the peer's one-way-delay measurements show it (smoothed
    /// delay over the recent minimum), if the peer has reported any. Reported every feedback
    /// interval and smoothed over every packet, so it is both faster and steadier than the
    /// RTT probes.
    fn owd_queue(&self) -> Option<Duration> {
        let (o, m) = (self.owd_us?, self.min_owd_us?);
        Some(Duration::from_micros(u64::from(
            o.wrapping_sub(m).max(0) as u32
        )))
    }

    /// Delay variation that is the link's own (radio, scheduling), not a queue we built: the
    /// smoothed delay of a jittery link sits that far above its minimum even when idle.
    fn jitter_allowance(&self) -> Duration {
        2 * Duration::from_micros(u64::from(self.jitter_us))
    }

    /// Queueing delay beyond the link's jitter.
    fn queue_excess(&self) -> Duration {
        self.owd_queue_excess().unwrap_or_else(|| {
            self.min_rtt()
                .map_or(Duration::ZERO, |m| self.latest_rtt.saturating_sub(m))
        })
    }

    /// The queue is longer than our probing ever builds: the link has slowed down.
    fn long_queue(&self) -> bool {
        self.queue_excess() > LONG_QUEUE
    }

    /// The link's bottleneck holds a standing queue: more delay than its jitter explains.
    fn standing_queue(&self) -> bool {
        match self.owd_queue() {
            Some(q) => q > STANDING_QUEUE + self.jitter_allowance(),
            None => self
                .min_rtt()
                .is_some_and(|m| self.latest_rtt > m + (2 * self.rttvar).max(STANDING_QUEUE)),
        }
    }

    /// The bottleneck queue is (nearly) empty.
    fn queue_drained(&self) -> bool {
        match self.owd_queue() {
            Some(q) => q <= DRAINED_QUEUE + self.jitter_allowance(),
            None => self
                .min_rtt()
                .is_none_or(|m| self.latest_rtt <= m + (m / 8).max(DRAINED_QUEUE)),
        }
    }

    fn on_rate_sample(&mut self, rate: u64, now: Instant, held: Held) {
        if rate.saturating_mul(2) >= self.est_rate_bps {
            self.last_busy_sample = Some(now);
        }
        if !held.app {
            self.last_full_sample = Some(now);
            if !held.drain && self.standing_queue() {
                self.capacity_found = true;
            }
        }
        // What arrived while we paced below the estimate to drain shows our pacing, not the
        // link (a backlog waited in our queue): kept only if above the estimate, as an
        // app-limited sample. Taken as capacity, it pulled the estimate of a 20 Mbit/s link
        // carrying 16 Mbit/s down to 0.75 of it, below the load, and the probes (app-limited
        // at that load) never pushed it back up.
        let app_limited = held.app || held.drain;
        if !app_limited && self.long_queue() && rate < self.est_rate_bps {
            // With a long queue at the bottleneck it is busy all the time: what it delivered
            // is its capacity now. Follow a slower link at once rather than after the window.
            self.rate_samples.clear();
        }
        if !app_limited || rate > self.est_rate_bps {
            self.rate_samples.push_back((now, rate));
        }
        while self
            .rate_samples
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > RATE_WINDOW)
        {
            self.rate_samples.pop_front();
        }
        if let Some(max) = self.rate_samples.iter().map(|(_, r)| *r).max() {
            self.est_rate_bps = max.max(MIN_RATE_BPS);
        }
        self.advance_phase(now);
    }

    fn round(&self) -> Duration {
        self.min_rtt()
            .unwrap_or(Duration::from_millis(50))
            .max(Duration::from_millis(20))
    }

    fn advance_phase(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.phase_start);
        let was_draining = self.draining();
        self.step_phase(now, elapsed);
        if was_draining && !self.draining() {
            self.drain_end = Some(now);
        }
    }

    fn step_phase(&mut self, now: Instant, elapsed: Duration) {
        match self.phase {
            Phase::Startup => {
                // A queue is building: the capacity has been found.
                if !self.queue_drained() && self.est_rate_bps > INITIAL_RATE_BPS {
                    self.capacity_found = true;
                    self.phase = Phase::Drain;
                    self.phase_start = now;
                    return;
                }
                // Rate samples lag a round trip and a feedback interval behind the pacing
                // rate: judge growth over rounds that long.
                if elapsed < self.round() + self.sample_interval() {
                    return;
                }
                self.phase_start = now;
                if self.est_rate_bps as f64 >= self.startup_best as f64 * 1.25 {
                    self.startup_best = self.est_rate_bps;
                    self.startup_rounds_flat = 0;
                } else {
                    self.startup_rounds_flat += 1;
                    if self.startup_rounds_flat >= 3 {
                        self.phase = Phase::Drain;
                    }
                }
                if self.max_rate_bps.is_some_and(|m| self.est_rate_bps >= m) {
                    self.phase = Phase::Cycle(2);
                }
            }
            Phase::Drain => {
                if self.queue_drained() || elapsed >= 5 * self.round() {
                    self.phase = Phase::Cycle(2);
                    self.phase_start = now;
                }
            }
            Phase::Cycle(i) => {
                // Every phase lasts one round. The pace-below phase takes out what the probe
                // before it put in (a quarter of a round's worth each way): longer, it would
                // leave the link idle below a backlog, and near the sum of the links' rates a
                // tenth of a round per cycle is more than the headroom (UDP at 90% of the sum
                // lost 1% in our queues when it lasted until the peer saw the queue drained).
                // A queue that stands anyway is drained by the cruise's 0.9.
                let done = elapsed >= self.round();
                if done {
                    let mut next = (i + 1) % CYCLE_GAINS.len();
                    // The probe after a quiet spell, judged once, when its samples are in
                    // (three rounds on): the estimate is the old capacity, its samples long
                    // gone, so a rise beyond their noise means the link got faster while
                    // quiet. Double per round from here, not 25 % per probe.
                    if i == 2 && self.probing_after_quiet {
                        self.probing_after_quiet = false;
                        if self.est_rate_bps as f64 >= self.probe_base as f64 * 1.03 {
                            self.restart(now);
                            return;
                        }
                    }
                    // The last probe found more (the link got faster, or a backlog met spare
                    // capacity): probe again as soon as its samples show it, instead of
                    // cruising out the cycle first, so
                    // that a link that speeds up from 15 to 60 Mbit/s is followed within
                    // about ten rounds rather than a second.
                    if i >= 2 && self.est_rate_bps as f64 >= self.probe_base as f64 * 1.1 {
                        next = 0;
                    }
                    if next == 0 {
                        self.probe_base = self.est_rate_bps;
                    }
                    self.phase = Phase::Cycle(next);
                    self.phase_start = now;
                }
            }
        }
    }
}

/// A longer silence between two data packets is a pause, not the link's pace.
const ARRIVAL_PAUSE: Duration = Duration::from_millis(100);
/// Bounds of how long after its last packet a link counts as still delivering.
const ACTIVE_MIN: Duration = Duration::from_millis(2);
const ACTIVE_MAX: Duration = Duration::from_millis(20);

/// What the receiver measures about data arriving on one link, reported back as feedback.
#[derive(Debug, Default)]
pub struct RxLinkMeter {
    /// Highest link sequence number seen.
    pub highest_link_seq: u32,
    /// Highest bond sequence number of an ordered packet seen on this link (repairs, which
    /// come with their old numbers, do not lower it): a loss the link shows lies above it.
    pub last_seq: Option<u64>,
    /// Packets received, cumulative.
    pub packets: u32,
    /// Bytes received, cumulative.
    pub bytes: u64,
    /// Smoothed one-way delay (wrapping microseconds: receiver clock minus sender clock) and
    /// its mean deviation.
    owd: Option<(u32, u64)>,
    min_owd: Option<(u32, Instant)>,
    /// Lowest recent one-way delay of probes: the link's delay before it carries data.
    probe_min_owd: Option<(u32, Instant)>,
    /// New data since the last feedback.
    pub dirty: bool,
    /// Last time data arrived on this link.
    pub last_data: Option<Instant>,
    /// Last time an ordered data packet (one that can fill a gap: not unordered, not sent
    /// again after its link died) arrived, and the smoothed time between such packets
    /// arriving back to back (pauses left out).
    last_ordered_data: Option<Instant>,
    arrival_gap: Duration,
    /// Last time ordered single-copy data (or the sender's notice that such data comes)
    /// arrived on this link. Copies of latency-critical packets do not count: they are
    /// delivered at once, and a long link carrying them must not stretch the reorder timeout.
    pub last_ordered: Option<Instant>,
    /// Last time a copy of ordered data (`duplicate` mode, a repair, a lossy link's bulk)
    /// arrived: it counts for the reorder timeout only on a link not far slower than the
    /// fastest, as a satellite's copies would hold every gap 300 ms.
    pub last_copy: Option<Instant>,
}

impl RxLinkMeter {
    /// Records one data packet; `owd_us` is our clock minus the sender's, microseconds,
    /// wrapping (only differences between samples and links mean anything).
    pub fn on_data(&mut self, link_seq: u32, len: usize, owd_us: u32, now: Instant) {
        if self.packets == 0 || (link_seq.wrapping_sub(self.highest_link_seq) as i32) > 0 {
            self.highest_link_seq = link_seq;
        }
        self.packets = self.packets.wrapping_add(1);
        // Counted as on the wire, so that rates compare with what the link carries.
        self.bytes = self
            .bytes
            .wrapping_add((len + super::TUNNEL_OVERHEAD) as u64);
        self.dirty = true;
        self.last_data = Some(now);
        // Smoothed OWD (gain 1/8) and mean deviation (gain 1/16, as RTP's jitter).
        self.owd = Some(match self.owd {
            None => (owd_us, 0),
            Some((s, j)) => {
                let diff = i64::from(owd_us.wrapping_sub(s) as i32);
                let j = (j * 15 + diff.unsigned_abs()) / 16;
                (s.wrapping_add((diff / 8) as i32 as u32), j)
            }
        });
        keep_recent_min(&mut self.min_owd, owd_us, now);
    }

    /// Records the sender's notice that `link_seq` was the last data packet it sent (those
    /// not seen up to it were lost, and asked for).
    pub fn on_tail(&mut self, link_seq: u32) {
        if self.packets > 0 && (link_seq.wrapping_sub(self.highest_link_seq) as i32) > 0 {
            self.highest_link_seq = link_seq;
            self.dirty = true;
        }
    }

    /// Records the one-way delay of a probe (same clocks as data). Kept apart from the data's
    /// minimum, which the sender compares with queued data's delay.
    pub fn on_probe(&mut self, owd_us: u32, now: Instant) {
        keep_recent_min(&mut self.probe_min_owd, owd_us, now);
    }

    /// The link's base one-way delay for comparing links (wrapping, relative, microseconds):
    /// from data seen in the last 10 s, else from probes (before any data came, or when the
    /// data's minimum is too old to trust).
    pub fn base_owd(&self, now: Instant) -> Option<u32> {
        let fresh = |m: &(u32, Instant)| now.saturating_duration_since(m.1) < OWD_MIN_WINDOW;
        self.min_owd
            .filter(fresh)
            .or(self.probe_min_owd)
            .or(self.min_owd)
            .map(|(m, _)| m)
    }

    /// How much later than its base delay data arrives on this link now (smoothed): the
    /// queue standing on the way to us.
    pub fn queue(&self, now: Instant) -> Duration {
        match (self.owd, self.base_owd(now)) {
            (Some((o, _)), Some(b)) => {
                Duration::from_micros(u64::from((o.wrapping_sub(b) as i32).max(0) as u32))
            }
            _ => Duration::ZERO,
        }
    }

    /// Smoothed one-way delay (wrapping, relative) and jitter, microseconds.
    pub fn owd(&self) -> Option<(u32, u64)> {
        self.owd
    }

    /// Lowest recent one-way delay (wrapping, relative), microseconds.
    pub fn min_owd(&self) -> Option<u32> {
        self.min_owd.map(|(m, _)| m)
    }

    /// Forgets everything (the peer restarted).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Records the arrival of an ordered data packet (one that can fill a gap).
    pub fn on_ordered(&mut self, now: Instant) {
        if let Some(gap) = self
            .last_ordered_data
            .map(|t| now.saturating_duration_since(t))
        {
            if gap < ARRIVAL_PAUSE {
                self.arrival_gap = (self.arrival_gap * 7 + gap) / 8;
            }
        }
        self.last_ordered_data = Some(now);
    }

    /// While the link is still delivering a stream of ordered data (packets that can fill a
    /// gap; latency-critical copies cannot), until when the next packet of it is due: a few of its usual gaps after the last one, plus twice its delay variation (a
    /// link's packets come in bursts when its delay jitters), 2 to 20 ms.
    pub fn delivering_until(&self, now: Instant) -> Option<Instant> {
        let jitter = Duration::from_micros(self.owd.map_or(0, |(_, j)| j));
        let window = (4 * self.arrival_gap + 2 * jitter).clamp(ACTIVE_MIN, ACTIVE_MAX);
        let until = self.last_ordered_data? + window;
        (until > now).then_some(until)
    }

    /// The feedback entry for this link.
    pub fn entry(&self, link_id: u8) -> super::wire::FeedbackEntry {
        let (owd, jitter) = self.owd.unwrap_or((0, 0));
        super::wire::FeedbackEntry {
            link_id,
            highest_link_seq: self.highest_link_seq,
            packets: self.packets,
            bytes: self.bytes,
            owd_us: owd as i32,
            jitter_us: jitter.min(u64::from(u32::MAX)) as u32,
            min_owd_us: self.min_owd.map_or(0, |(m, _)| m as i32),
        }
    }
}

/// Keeps in `slot` the lowest one-way delay (wrapping) seen in the last 10 s: a sample lower
/// than it, or any sample once it is 10 s old, replaces it.
fn keep_recent_min(slot: &mut Option<(u32, Instant)>, owd_us: u32, now: Instant) {
    match *slot {
        Some((m, at))
            if (owd_us.wrapping_sub(m) as i32) >= 0
                && now.saturating_duration_since(at) < OWD_MIN_WINDOW => {}
        _ => *slot = Some((owd_us, now)),
    }
}

/// How long a minimum one-way delay is kept (a path whose delay grew is believed after this).
const OWD_MIN_WINDOW: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtt_smoothing_and_state() {
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(t0, None);
        assert_eq!(e.state(), LinkState::Probing);
        e.on_probe_sent(t0);
        e.on_rtt_sample(Duration::from_millis(20), t0 + Duration::from_millis(20));
        assert_eq!(e.state(), LinkState::Up);
        for i in 0..50 {
            e.on_rtt_sample(
                Duration::from_millis(30),
                t0 + Duration::from_millis(40 + i),
            );
        }
        let srtt = e.srtt().unwrap();
        assert!(srtt > Duration::from_millis(29) && srtt <= Duration::from_millis(30));
        assert_eq!(e.min_rtt(), Some(Duration::from_millis(20)));
    }

    #[test]
    fn silent_link_goes_down_and_recovers_after_replies() {
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(t0, None);
        e.on_probe_sent(t0);
        e.on_rtt_sample(Duration::from_millis(20), t0);
        let t1 = t0 + Duration::from_millis(10);
        e.on_probe_sent(t1);
        let deadline = e.dead_deadline().unwrap();
        assert!(deadline <= t1 + Duration::from_millis(160));
        assert_eq!(
            e.update_state(deadline - Duration::from_millis(1)),
            Some(LinkState::Degraded)
        );
        assert_eq!(e.update_state(deadline), Some(LinkState::Down));
        for i in 0..3 {
            assert_eq!(e.state(), LinkState::Down);
            e.on_rtt_sample(
                Duration::from_millis(20),
                deadline + Duration::from_millis(i),
            );
        }
        assert_eq!(e.state(), LinkState::Up);
    }

    /// A link as the peer reports it: one feedback entry per 20 ms, no loss, no queue.
    struct FakePeer {
        t: Instant,
        recv_us: u32,
        bytes: u64,
        seq: u32,
    }

    impl FakePeer {
        /// For `steps` feedback intervals, the link delivers `rate(e)` bits per second;
        /// `limited(e)` says our queue for it ran empty. Returns the lowest estimate seen.
        fn deliver(
            &mut self,
            e: &mut LinkEstimator,
            steps: u32,
            rate: impl Fn(&LinkEstimator) -> u64,
            limited: impl Fn(&LinkEstimator) -> bool,
        ) -> u64 {
            let mut lowest = u64::MAX;
            for _ in 0..steps {
                let (r, app) = (rate(e), limited(e));
                self.t += Duration::from_millis(20);
                self.recv_us = self.recv_us.wrapping_add(20_000);
                self.bytes += r / 8 / 50;
                self.seq = self.seq.wrapping_add(10);
                let entry = crate::bond::wire::FeedbackEntry {
                    link_id: 0,
                    highest_link_seq: self.seq,
                    packets: self.seq,
                    bytes: self.bytes,
                    owd_us: 0,
                    jitter_us: 0,
                    min_owd_us: 0,
                };
                e.on_rtt_sample(Duration::from_millis(70), self.t);
                e.on_feedback(&entry, self.recv_us, self.t, app);
                lowest = lowest.min(e.est_rate_bps());
            }
            lowest
        }
    }

    #[test]
    fn draining_below_a_light_load_does_not_pull_the_estimate_under_it() {
        // A 20 Mbit/s, 70 ms link (LTE after the cable died) carrying 16 Mbit/s. At that load
        // the probes find our queue empty (app-limited: they say nothing), but while the
        // drain paces at 0.75 of the estimate a backlog forms and the link delivers only what
        // we pace. Those samples are ours, not the link's: counted as capacity, they pulled
        // the estimate under the load, and our queue for the link overflowed.
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(t0, None);
        e.on_probe_sent(t0);
        let mut peer = FakePeer {
            t: t0,
            recv_us: 0,
            bytes: 0,
            seq: 0,
        };
        // Full load first: the estimate finds the link's 20 Mbit/s.
        let full = |e: &LinkEstimator| e.pacing_rate_bps().min(20_000_000);
        peer.deliver(&mut e, 150, full, |_| false);
        assert!(e.est_rate_bps() >= 19_000_000, "{}", e.est_rate_bps());
        // Then 16 Mbit/s: paced below it (the drain), the link delivers the pacing rate with
        // a backlog in our queue; else the load, our queue running empty.
        let light = |e: &LinkEstimator| e.pacing_rate_bps().min(16_000_000);
        let backlog = |e: &LinkEstimator| e.pacing_rate_bps() < 16_000_000;
        let lowest = peer.deliver(&mut e, 250, light, |e| !backlog(e));
        assert!(lowest >= 16_000_000, "the estimate fell to {lowest}");
    }

    #[test]
    fn rx_meter_tracks_highest_seq_with_wrap() {
        let now = Instant::now();
        let mut m = RxLinkMeter::default();
        m.on_data(u32::MAX - 1, 100, 5, now);
        m.on_data(u32::MAX, 100, 5, now);
        m.on_data(0, 100, 5, now);
        m.on_data(u32::MAX, 100, 5, now); // late, not higher
        assert_eq!(m.highest_link_seq, 0);
        assert_eq!(m.packets, 4);
    }
}
