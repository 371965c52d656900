//! The thread that moves frames for one direction: receive, shape, release on time.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::packet_socket::{PacketSocket, Received};
use crate::params::DirParams;
use crate::shaper::{DropReason, Shaper};

/// Receive buffer: larger than any frame we accept, so an oversized one is seen as truncated.
const RECV_BUFFER_BYTES: usize = 65_536;
/// Frames received per wake-up before releasing due frames, so a flood cannot delay releases.
const RECV_BATCH: usize = 256;
/// How often the kernel's drop counter of the receive socket is read.
const DROP_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// Spare frame buffers kept for reuse.
const POOL_LIMIT: usize = 4096;

/// Counters of one direction, readable from the control thread while frames move.
#[derive(Default)]
pub struct DirStats {
    /// Frames received on the ingress interface.
    pub rx_packets: AtomicU64,
    /// Bytes received on the ingress interface.
    pub rx_bytes: AtomicU64,
    /// Frames sent out of the egress interface.
    pub passed_packets: AtomicU64,
    /// Bytes sent out of the egress interface.
    pub passed_bytes: AtomicU64,
    /// Frames dropped by random or burst loss.
    pub drop_loss: AtomicU64,
    /// Frames tail-dropped by the rate limiter's queue.
    pub drop_queue: AtomicU64,
    /// Frames dropped by an outage.
    pub drop_outage: AtomicU64,
    /// Frames too large to receive whole (offloads left on).
    pub drop_oversize: AtomicU64,
    /// Frames the egress send refused.
    pub send_errors: AtomicU64,
    /// Frames the kernel dropped before we read them (our receive buffer was full).
    pub kernel_drops: AtomicU64,
    /// Frames currently held in the queue or in flight.
    pub held: AtomicU64,
}

impl DirStats {
    /// Renders the counters as `prefix.key=value` words.
    pub fn describe(&self, prefix: &str) -> String {
        let fields = [
            ("rx_packets", &self.rx_packets),
            ("rx_bytes", &self.rx_bytes),
            ("passed_packets", &self.passed_packets),
            ("passed_bytes", &self.passed_bytes),
            ("drop_loss", &self.drop_loss),
            ("drop_queue", &self.drop_queue),
            ("drop_outage", &self.drop_outage),
            ("drop_oversize", &self.drop_oversize),
            ("send_errors", &self.send_errors),
            ("kernel_drops", &self.kernel_drops),
            ("held", &self.held),
        ];
        fields
            .iter()
            .map(|(name, value)| format!("{prefix}.{name}={}", value.load(Ordering::Relaxed)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Sets every counter except `held` back to zero.
    pub fn reset(&self) {
        for counter in [
            &self.rx_packets,
            &self.rx_bytes,
            &self.passed_packets,
            &self.passed_bytes,
            &self.drop_loss,
            &self.drop_queue,
            &self.drop_outage,
            &self.drop_oversize,
            &self.send_errors,
            &self.kernel_drops,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }
}

/// An eventfd used to wake a direction thread out of its poll.
pub struct Waker {
    fd: OwnedFd,
}

impl Waker {
    /// Creates a non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain eventfd(2) call.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a freshly created, owned descriptor.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        })
    }

    /// Makes the thread's next (or current) poll return.
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64; a full counter (EAGAIN) still means "woken".
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn drain(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64; EAGAIN just means nothing was pending.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
    }
}

/// What the control thread shares with one direction thread.
pub struct DirShared {
    /// "up" or "down".
    pub name: &'static str,
    /// Settings; the thread copies them when `generation` changes.
    pub params: Mutex<DirParams>,
    /// Bumped after every change of `params`.
    pub generation: AtomicU64,
    /// Counters.
    pub stats: DirStats,
    /// Wakes the thread so that a change (an outage flush) takes effect at once.
    pub waker: Waker,
}

impl DirShared {
    /// Shared state for a direction starting with `params`.
    pub fn new(name: &'static str, params: DirParams) -> io::Result<Self> {
        Ok(Self {
            name,
            params: Mutex::new(params),
            generation: AtomicU64::new(0),
            stats: DirStats::default(),
            waker: Waker::new()?,
        })
    }
}

fn wait(rx: &PacketSocket, waker: &Waker, timeout: Option<Duration>) -> io::Result<()> {
    let mut fds = [
        libc::pollfd {
            fd: rx.raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: waker.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(3600) as libc::time_t,
        tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: fds is a valid array of 2 pollfds; ts_ptr is null or points at a live timespec.
    let ret = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, ts_ptr, std::ptr::null()) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    if fds[1].revents & libc::POLLIN != 0 {
        waker.drain();
    }
    if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
        return Err(io::Error::other("ingress socket reports an error"));
    }
    Ok(())
}

/// Real-time priority asked for with `--realtime`: above ordinary processes, low among RT ones.
const REALTIME_PRIORITY: libc::c_int = 10;

/// Puts the calling thread in SCHED_FIFO, so that busy neighbours (builds, iperf3) do not delay
/// frame releases; the thread sleeps between frames, so it cannot starve the machine.
fn make_realtime(name: &str) {
    let param = libc::sched_param {
        sched_priority: REALTIME_PRIORITY,
    };
    // SAFETY: pthread_self() is the calling thread; param is a valid sched_param.
    let ret =
        unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
    if ret != 0 {
        eprintln!(
            "linkemu: {name}: no real-time priority ({}); release times may slip under load",
            io::Error::from_raw_os_error(ret)
        );
    }
}

/// Moves frames from `rx` to `tx` through a shaper until `stop` is set.
pub fn run(
    shared: &DirShared,
    rx: &PacketSocket,
    tx: &PacketSocket,
    seed: u64,
    realtime: bool,
    stop: &AtomicBool,
) -> io::Result<()> {
    // Release times are microseconds apart at 100 Mbit/s: ask for 1 us timer slack instead of
    // the default 50 us. Failure only costs precision.
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong, 0, 0, 0) };
    if realtime {
        make_realtime(shared.name);
    }
    let stats = &shared.stats;
    let initial = shared
        .params
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let mut shaper: Shaper<Vec<u8>> = Shaper::new(initial, seed);
    let mut generation = shared.generation.load(Ordering::Acquire);
    let mut buf = vec![0u8; RECV_BUFFER_BYTES];
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut next_drop_check = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let current = shared.generation.load(Ordering::Acquire);
        if current != generation {
            generation = current;
            let params = shared
                .params
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let flushed = shaper.set_params(params);
            stats
                .drop_outage
                .fetch_add(flushed as u64, Ordering::Relaxed);
        }
        for _ in 0..RECV_BATCH {
            let received = match rx.recv(&mut buf) {
                Ok(received) => received,
                // The interface went down (e.g. `ip link set down` to emulate a dead modem):
                // nothing to read, and it may come back.
                Err(err) if err.raw_os_error() == Some(libc::ENETDOWN) => break,
                Err(err) => return Err(err),
            };
            match received {
                Received::Frame(len) => {
                    stats.rx_packets.fetch_add(1, Ordering::Relaxed);
                    stats.rx_bytes.fetch_add(len as u64, Ordering::Relaxed);
                    let mut frame = pool.pop().unwrap_or_default();
                    frame.clear();
                    frame.extend_from_slice(&buf[..len]);
                    let counter = match shaper.push(Instant::now(), len, frame) {
                        Ok(()) => continue,
                        Err(DropReason::Loss) => &stats.drop_loss,
                        Err(DropReason::Queue) => &stats.drop_queue,
                        Err(DropReason::Outage) => &stats.drop_outage,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Received::Truncated => {
                    stats.rx_packets.fetch_add(1, Ordering::Relaxed);
                    stats.drop_oversize.fetch_add(1, Ordering::Relaxed);
                }
                Received::Outgoing => {}
                Received::Empty => break,
            }
        }
        let now = Instant::now();
        while let Some(frame) = shaper.pop_due(now) {
            match tx.send(&frame) {
                Ok(()) => {
                    stats.passed_packets.fetch_add(1, Ordering::Relaxed);
                    stats
                        .passed_bytes
                        .fetch_add(frame.len() as u64, Ordering::Relaxed);
                }
                Err(_) => {
                    stats.send_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            if pool.len() < POOL_LIMIT {
                pool.push(frame);
            }
        }
        stats.held.store(shaper.held() as u64, Ordering::Relaxed);
        // The kernel resets its counter on each read; a syscall per wake-up would cost more
        // than the counter is worth, so read it every 100 ms.
        if now >= next_drop_check {
            next_drop_check = now + DROP_CHECK_INTERVAL;
            let kernel_drops = rx.take_kernel_drops();
            stats
                .kernel_drops
                .fetch_add(kernel_drops, Ordering::Relaxed);
        }
        let timeout = shaper
            .next_release()
            .map(|at| at.saturating_duration_since(Instant::now()));
        if timeout == Some(Duration::ZERO) {
            continue;
        }
        wait(rx, &shared.waker, timeout)?;
    }
    Ok(())
}
