//! One direction of an emulated link, without IO: frames go in with their arrival time and come
//! out at their release time. Time is always passed in, so tests run in virtual time.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::params::DirParams;

/// Most frames one direction holds at once, whatever the settings: bounds memory when the rate is
/// unlimited and the delay long.
pub const MAX_HELD_FRAMES: usize = 100_000;

/// Why a frame was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Random or Gilbert-Elliott loss.
    Loss,
    /// The rate limiter's queue was full (or the hard frame limit was reached).
    Queue,
    /// The link is in an outage.
    Outage,
}

struct Held<T> {
    release_at: Instant,
    seq: u64,
    frame: T,
}

impl<T> PartialEq for Held<T> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl<T> Eq for Held<T> {}
impl<T> PartialOrd for Held<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Held<T> {
    // Reversed so that BinaryHeap (a max-heap) pops the earliest release first; seq keeps
    // frames with equal release times in arrival order.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.release_at, other.seq).cmp(&(self.release_at, self.seq))
    }
}

/// One direction of a link: loss, rate limit with a bounded queue, delay and jitter.
pub struct Shaper<T> {
    params: DirParams,
    rng: StdRng,
    ge_bad: bool,
    /// When the emulated bottleneck finishes sending everything accepted so far.
    link_free_at: Option<Instant>,
    /// Latest release time handed out, to keep FIFO order when reordering is off.
    last_release: Option<Instant>,
    seq: u64,
    held: BinaryHeap<Held<T>>,
}

impl<T> Shaper<T> {
    /// A shaper with the given settings and a seeded random generator (same seed, same drops).
    pub fn new(params: DirParams, seed: u64) -> Self {
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
            ge_bad: false,
            link_free_at: None,
            last_release: None,
            seq: 0,
            held: BinaryHeap::new(),
        }
    }

    /// Current settings.
    #[cfg(test)]
    pub fn params(&self) -> &DirParams {
        &self.params
    }

    /// Replaces the settings; when an outage starts, the frames in flight are lost and their
    /// count is returned.
    pub fn set_params(&mut self, params: DirParams) -> usize {
        let flushed = if params.outage && !self.params.outage {
            let count = self.held.len();
            self.held.clear();
            self.link_free_at = None;
            count
        } else {
            0
        };
        if params.ge_p == 0.0 {
            self.ge_bad = false;
        }
        self.params = params;
        flushed
    }

    fn lost(&mut self) -> bool {
        let p = &self.params;
        if p.ge_p > 0.0 {
            let flip = if self.ge_bad { p.ge_r } else { p.ge_p };
            if self.rng.gen_bool(flip) {
                self.ge_bad = !self.ge_bad;
            }
            let ge_loss = if self.ge_bad {
                p.ge_bad_loss
            } else {
                p.ge_good_loss
            };
            if self.rng.gen_bool(ge_loss) {
                return true;
            }
        }
        p.loss > 0.0 && self.rng.gen_bool(p.loss)
    }

    fn jitter(&mut self) -> Duration {
        let p = &self.params;
        if p.jitter.is_zero() {
            return p.delay;
        }
        let jitter = p.jitter.as_secs_f64();
        let offset = self.rng.gen_range(-jitter..=jitter);
        Duration::from_secs_f64((p.delay.as_secs_f64() + offset).max(0.0))
    }

    /// Takes a frame of `len` bytes arriving at `now`; returns why it was dropped, if it was.
    pub fn push(&mut self, now: Instant, len: usize, frame: T) -> Result<(), DropReason> {
        if self.params.outage {
            return Err(DropReason::Outage);
        }
        if self.lost() {
            return Err(DropReason::Loss);
        }
        if self.held.len() >= MAX_HELD_FRAMES {
            return Err(DropReason::Queue);
        }
        let departs = if self.params.rate_bps > 0 {
            let start = self.link_free_at.map_or(now, |free| free.max(now));
            // Tail drop when the backlog already ahead of this frame takes longer than the
            // queue to drain, like a modem buffer of queue_ms at the line rate.
            if start - now > self.params.queue {
                return Err(DropReason::Queue);
            }
            let bits = len as u128 * 8;
            let nanos = bits * 1_000_000_000 / u128::from(self.params.rate_bps);
            let done = start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
            self.link_free_at = Some(done);
            done
        } else {
            now
        };
        let mut release_at = departs + self.jitter();
        if !self.params.reorder {
            if let Some(last) = self.last_release {
                release_at = release_at.max(last);
            }
        }
        self.last_release = Some(self.last_release.map_or(release_at, |l| l.max(release_at)));
        self.seq += 1;
        self.held.push(Held {
            release_at,
            seq: self.seq,
            frame,
        });
        Ok(())
    }

    /// When the next held frame is due, if any.
    pub fn next_release(&self) -> Option<Instant> {
        self.held.peek().map(|h| h.release_at)
    }

    /// Removes and returns the next frame whose release time is at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<T> {
        if self.held.peek()?.release_at <= now {
            self.held.pop().map(|h| h.frame)
        } else {
            None
        }
    }

    /// Frames currently held (queued or in flight).
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(settings: &[&str]) -> DirParams {
        let mut p = DirParams::default();
        for s in settings {
            p.apply(s).unwrap();
        }
        p
    }

    /// Pushes `count` frames of `len` bytes every `gap`, drains at each step, returns
    /// (id, arrival, release) for delivered frames and the drop count.
    fn run(
        shaper: &mut Shaper<usize>,
        count: usize,
        len: usize,
        gap: Duration,
    ) -> (Vec<(usize, Duration, Duration)>, usize) {
        let base = Instant::now();
        let mut arrivals = Vec::new();
        let mut out = Vec::new();
        let mut drops = 0;
        let step = Duration::from_micros(10);
        let mut now = base;
        let mut next_id = 0;
        let end = base + gap * count as u32 + Duration::from_secs(20);
        while now < end {
            while next_id < count && base + gap * next_id as u32 <= now {
                arrivals.push(now - base);
                if shaper.push(now, len, next_id).is_err() {
                    drops += 1;
                }
                next_id += 1;
            }
            while let Some(id) = shaper.pop_due(now) {
                out.push((id, arrivals[id], now - base));
            }
            if next_id == count && shaper.held() == 0 {
                break;
            }
            now += step;
        }
        (out, drops)
    }

    #[test]
    fn delay_is_applied_exactly() {
        let mut s = Shaper::new(params(&["delay_ms=10"]), 1);
        let (out, drops) = run(&mut s, 100, 100, Duration::from_millis(1));
        assert_eq!(drops, 0);
        assert_eq!(out.len(), 100);
        for (_, arrival, release) in out {
            let d = release - arrival;
            assert!(
                d >= Duration::from_millis(10) && d < Duration::from_micros(10_020),
                "{d:?}"
            );
        }
    }

    #[test]
    fn rate_limit_paces_frames_and_queue_tail_drops() {
        // 1500-byte frames at 12 Mbit/s take 1 ms each; offer one every 0.5 ms (2x overload).
        let mut s = Shaper::new(params(&["rate_mbit=12", "queue_ms=20"]), 1);
        let (out, drops) = run(&mut s, 400, 1500, Duration::from_micros(500));
        // Offered 200 ms of arrivals; the link drains 1 frame/ms, so about 200 + 20 (queue)
        // frames get through and the rest are tail-dropped.
        assert!((215..=225).contains(&out.len()), "delivered {}", out.len());
        assert_eq!(out.len() + drops, 400);
        for pair in out.windows(2) {
            let gap = pair[1].2 - pair[0].2;
            assert!(gap >= Duration::from_micros(990), "gap {gap:?}");
        }
        let worst = out.iter().map(|(_, a, r)| *r - *a).max().unwrap();
        assert!(
            worst <= Duration::from_millis(22),
            "queueing delay {worst:?}"
        );
    }

    #[test]
    fn jitter_without_reorder_keeps_order_and_bounds() {
        let mut s = Shaper::new(params(&["delay_ms=30", "jitter_ms=5"]), 7);
        let (out, _) = run(&mut s, 500, 100, Duration::from_millis(2));
        let ids: Vec<usize> = out.iter().map(|o| o.0).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "reordered");
        let delays: Vec<Duration> = out.iter().map(|(_, a, r)| *r - *a).collect();
        assert!(delays.iter().all(|d| *d >= Duration::from_millis(25)));
        assert!(delays.iter().all(|d| *d <= Duration::from_micros(35_020)));
        let min = delays.iter().min().unwrap();
        let max = delays.iter().max().unwrap();
        assert!(*max - *min > Duration::from_millis(5), "no jitter seen");
    }

    #[test]
    fn jitter_with_reorder_reorders() {
        let mut s = Shaper::new(params(&["delay_ms=30", "jitter_ms=5", "reorder=on"]), 7);
        let (out, _) = run(&mut s, 500, 100, Duration::from_millis(1));
        let ids: Vec<usize> = out.iter().map(|o| o.0).collect();
        assert!(ids.windows(2).any(|w| w[0] > w[1]), "never reordered");
    }

    #[test]
    fn random_loss_matches_rate_and_is_seeded() {
        let mut a = Shaper::new(params(&["loss_pct=10"]), 42);
        let (out_a, drops) = run(&mut a, 20_000, 100, Duration::from_micros(100));
        assert!((1800..2200).contains(&drops), "drops {drops}");
        let mut b = Shaper::new(params(&["loss_pct=10"]), 42);
        let (out_b, _) = run(&mut b, 20_000, 100, Duration::from_micros(100));
        let ids = |o: &Vec<(usize, Duration, Duration)>| o.iter().map(|x| x.0).collect::<Vec<_>>();
        assert_eq!(ids(&out_a), ids(&out_b));
    }

    #[test]
    fn gilbert_elliott_loss_comes_in_bursts() {
        // Mean bad sojourn 1/r = 5 frames, all lost; stationary loss p/(p+r) = 1/(1+25) ~ 3.8%.
        let mut s = Shaper::new(params(&["ge_p_pct=1", "ge_r_pct=25"]), 3);
        let count = 50_000;
        let (out, drops) = run(&mut s, count, 100, Duration::from_micros(20));
        assert!((1300..2600).contains(&drops), "drops {drops}");
        let mut delivered = vec![false; count];
        for (id, _, _) in &out {
            delivered[*id] = true;
        }
        let mut bursts = 0;
        let mut in_burst = false;
        for d in delivered {
            if !d && !in_burst {
                bursts += 1;
            }
            in_burst = !d;
        }
        let mean_burst = drops as f64 / bursts as f64;
        assert!(mean_burst > 3.0, "mean burst {mean_burst}");
    }

    #[test]
    fn outage_drops_new_and_in_flight_frames() {
        let base = Instant::now();
        let mut s = Shaper::new(params(&["delay_ms=50"]), 1);
        for i in 0..10 {
            s.push(base, 100, i).unwrap();
        }
        let mut p = s.params().clone();
        p.outage = true;
        assert_eq!(s.set_params(p.clone()), 10);
        assert_eq!(s.push(base, 100, 11), Err(DropReason::Outage));
        assert_eq!(s.pop_due(base + Duration::from_secs(1)), None);
        p.outage = false;
        assert_eq!(s.set_params(p), 0);
        s.push(base, 100, 12).unwrap();
        assert_eq!(s.pop_due(base + Duration::from_millis(50)), Some(12));
    }
}
