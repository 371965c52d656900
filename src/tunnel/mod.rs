//! The boringtun adapter: the only module that touches `boringtun`.
//!
//! A [`LinkTunnel`] is one WireGuard session (one `noise::Tunn`): one per link on the site, one
//! per learned (peer, link) session on the hub. It hides boringtun's buffer rules:
//!
//! * `decapsulate` hands back a slice cut to the inner IP header's length, but the bond needs the
//!   whole plaintext (its trailer follows the IP packet). boringtun does not pad, so the whole
//!   plaintext is the first `datagram.len() - 32` bytes of the output buffer; that is what
//!   [`Received::Plaintext`] reports.
//! * After a handshake message is answered, queued packets must be flushed by calling
//!   `decapsulate` with an empty datagram until it returns `Done`.
//! * Output buffers must be at least `input + 32` and 148 bytes, or boringtun panics; here a
//!   short buffer is an error instead.
//! * `update_timers` advances the `Tunn`'s own clock and must run every ≤ 250 ms.
//!
//! [`hub::HubSessions`] demultiplexes the hub's single UDP port over many `LinkTunnel`s.

pub mod hub;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

/// Bytes WireGuard adds to a data plaintext (header 16 + tag 16).
pub const DATA_OVERHEAD: usize = 32;
/// Smallest buffer any call accepts: a handshake initiation is 148 bytes.
pub const MIN_BUF: usize = 148;
/// A buffer size that fits any UDP datagram and any plaintext.
pub const MAX_BUF: usize = 65_536 + DATA_OVERHEAD;
/// Largest local index boringtun accepts: the wire index is `index << 8 | session`.
pub const MAX_INDEX: u32 = (1 << 24) - 1;
/// How often [`LinkTunnel::update_timers`] must be called at least.
pub const TIMER_TICK: Duration = Duration::from_millis(250);
/// First wait before a handshake initiation without answer is sent again, on a link that has
/// no session; doubled after each try. WireGuard itself waits 5 s; a link whose first
/// initiation found the far end not yet listening (both ends started together, the hub
/// rebooting while the site starts) would be unused that long.
pub const FIRST_HANDSHAKE_RETRY: Duration = Duration::from_secs(1);
/// Most random time added to each of those waits, as WireGuard adds to its own (up to a
/// third of a second): sites that lost the hub together must not all knock again in the
/// same instant.
pub const HANDSHAKE_RETRY_JITTER: Duration = Duration::from_millis(333);
/// From this wait on, WireGuard's own 5 s retry timer is left alone.
const FAST_RETRY_LIMIT: Duration = Duration::from_secs(4);
/// Handshake messages per second a shared limiter lets through before asking for cookies.
pub const HANDSHAKES_PER_SEC: u64 = 100;

/// WireGuard message types (first byte of a datagram; the other three are zero).
pub(crate) mod msg_type {
    pub(crate) const HANDSHAKE_INIT: u8 = 1;
    pub(crate) const HANDSHAKE_RESP: u8 = 2;
    pub(crate) const COOKIE_REPLY: u8 = 3;
    pub(crate) const DATA: u8 = 4;
}

/// Why a datagram (or a send) was rejected. Every rejection is also counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// Not a well-formed WireGuard message, or a plaintext that is not an IP packet.
    Malformed,
    /// Failed authentication (bad MAC, bad AEAD tag, wrong key or index).
    Unauthenticated,
    /// A data counter already seen, or a handshake with an old timestamp.
    Replayed,
    /// Data for a session that does not exist (any more).
    NoSession,
    /// Handshake refused because the responder is under load (no valid cookie).
    RateLimited,
    /// The session gave up: no handshake for too long. A new send starts over.
    Expired,
    /// The caller's buffer is too small (a bug in the caller, not the peer).
    BufferTooSmall,
}

impl Reject {
    fn from_wg(e: &WireGuardError) -> Self {
        use WireGuardError as E;
        match e {
            E::InvalidMac | E::InvalidAeadTag | E::WrongKey | E::WrongIndex => {
                Self::Unauthenticated
            }
            E::DuplicateCounter | E::InvalidCounter | E::WrongTai64nTimestamp => Self::Replayed,
            E::NoCurrentSession => Self::NoSession,
            E::UnderLoad => Self::RateLimited,
            E::ConnectionExpired => Self::Expired,
            E::DestinationBufferTooSmall => Self::BufferTooSmall,
            E::IncorrectPacketLength
            | E::UnexpectedPacket
            | E::WrongPacketType
            | E::InvalidTai64nTimestamp
            | E::InvalidPacket
            | E::LockFailed => Self::Malformed,
        }
    }
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Malformed => "malformed datagram",
            Self::Unauthenticated => "authentication failed",
            Self::Replayed => "replayed datagram",
            Self::NoSession => "no session for this datagram",
            Self::RateLimited => "handshake rate-limited",
            Self::Expired => "session expired",
            Self::BufferTooSmall => "buffer too small",
        })
    }
}

impl std::error::Error for Reject {}

/// What an authenticated datagram was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// A handshake message, answered (replies went to `send`).
    Handshake,
    /// A cookie reply (we are asked to retry with a cookie). Not proof of the peer's identity.
    Cookie,
    /// We are under load and answered with a cookie instead of a handshake response. The
    /// datagram is not authenticated: do not learn its source address.
    CookieSent,
    /// An empty data message (WireGuard keepalive).
    Keepalive,
    /// A data message; the whole decrypted plaintext is the first `len` bytes of the output
    /// buffer (trailer included, not boringtun's cut slice).
    Plaintext(usize),
}

impl Received {
    /// True if the datagram proved it came from the peer (its source address may be learned).
    pub fn is_authenticated(self) -> bool {
        !matches!(self, Self::CookieSent)
    }
}

/// Counters of one session, for `show`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelCounters {
    /// Authenticated datagrams received.
    pub rx_datagrams: u64,
    /// Datagrams rejected as malformed or for no session.
    pub rx_bad: u64,
    /// Datagrams that failed authentication (bad MAC or AEAD tag, wrong key or index).
    pub rx_unauthenticated: u64,
    /// Datagrams rejected by the replay window (or old handshake timestamps).
    pub rx_replayed: u64,
    /// Handshakes refused under load.
    pub rx_rate_limited: u64,
    /// Datagrams handed to the network.
    pub tx_datagrams: u64,
    /// Plaintexts queued inside boringtun until a handshake completes.
    pub tx_queued: u64,
    /// Handshakes completed (as initiator or responder).
    pub handshakes: u64,
}

/// Keys of one WireGuard session.
#[derive(Clone)]
pub struct TunnelKeys {
    /// Our static private key.
    pub private_key: [u8; 32],
    /// The peer's static public key.
    pub peer_public_key: [u8; 32],
    /// Optional preshared key.
    pub preshared_key: Option<[u8; 32]>,
    /// Persistent keepalive interval in seconds.
    pub persistent_keepalive: Option<u16>,
}

impl std::fmt::Debug for TunnelKeys {
    // Never print the private or preshared key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelKeys")
            .field(
                "peer_public_key",
                &crate::keys::encode(&self.peer_public_key),
            )
            .field("persistent_keepalive", &self.persistent_keepalive)
            .finish_non_exhaustive()
    }
}

/// A handshake rate limiter shared by every session behind one UDP port (the hub).
///
/// It checks MAC1 and, above [`HANDSHAKES_PER_SEC`], demands a cookie (MAC2) before any
/// expensive Diffie-Hellman work. [`HandshakeLimiter::tick`] must run about once a second.
#[derive(Clone)]
pub struct HandshakeLimiter {
    inner: Arc<RateLimiter>,
}

impl HandshakeLimiter {
    /// A limiter for the responder whose static public key is `our_public`.
    pub fn new(our_public: &[u8; 32]) -> Self {
        // Each handshake passes the limiter twice (once in the hub demux, once inside the
        // session's `Tunn`), so the raw limit is doubled.
        let limiter = RateLimiter::new(&PublicKey::from(*our_public), 2 * HANDSHAKES_PER_SEC);
        Self {
            inner: Arc::new(limiter),
        }
    }

    /// Resets the per-second count when a second has passed.
    pub fn tick(&self) {
        self.inner.reset_count();
    }
}

/// One WireGuard session over one link.
pub struct LinkTunnel {
    tunn: Tunn,
    index: u32,
    peer_public_key: [u8; 32],
    counters: TunnelCounters,
    /// When our last handshake initiation left, while there is no session.
    init_sent_at: Option<Instant>,
    /// Wait before [`LinkTunnel::retry_stalled_handshake`] sends the next one, and the
    /// random time added to it.
    init_retry: Duration,
    init_jitter: Duration,
}

impl std::fmt::Debug for LinkTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkTunnel")
            .field("index", &self.index)
            .field("peer", &crate::keys::encode(&self.peer_public_key))
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl LinkTunnel {
    /// A session with local index `index` (≤ [`MAX_INDEX`]; our receiver index on the wire is
    /// `index << 8 | n`). Sessions behind one UDP port share `limiter`; a session with its own
    /// socket passes `None` and gets a private limiter.
    pub fn new(
        keys: &TunnelKeys,
        index: u32,
        limiter: Option<&HandshakeLimiter>,
    ) -> Result<Self, String> {
        if index > MAX_INDEX {
            return Err(format!("session index {index} is not below 2^24"));
        }
        let tunn = Tunn::new(
            StaticSecret::from(keys.private_key),
            PublicKey::from(keys.peer_public_key),
            keys.preshared_key,
            keys.persistent_keepalive,
            index,
            limiter.map(|l| Arc::clone(&l.inner)),
        );
        Ok(Self {
            tunn,
            index,
            peer_public_key: keys.peer_public_key,
            counters: TunnelCounters::default(),
            init_sent_at: None,
            init_retry: FIRST_HANDSHAKE_RETRY,
            init_jitter: retry_jitter(),
        })
    }

    /// Our local index (data addressed to us carries `index << 8 | n` as receiver index).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The peer's static public key.
    pub fn peer_public_key(&self) -> &[u8; 32] {
        &self.peer_public_key
    }

    /// Counters since creation.
    pub fn counters(&self) -> TunnelCounters {
        self.counters
    }

    /// True once a session key exists (data is sent at once, not queued).
    pub fn is_established(&self) -> bool {
        self.tunn.time_since_last_handshake().is_some()
    }

    /// True once boringtun gave up on this session (no handshake for 90 s, or keys older than
    /// 9 minutes). A new [`LinkTunnel::encapsulate`] starts a fresh handshake.
    pub fn is_expired(&self) -> bool {
        self.tunn.is_expired()
    }

    /// Time since the current session's handshake completed.
    pub fn time_since_handshake(&self) -> Option<Duration> {
        self.tunn.time_since_last_handshake()
    }

    /// Encrypts one plaintext into `out`. Returns the datagram to send, or `None` when the
    /// plaintext was queued until a handshake completes (and a handshake is already in
    /// flight). Without a session the returned datagram is a handshake initiation and the
    /// plaintext waits in boringtun's queue (at most 256 packets); it is sent when the
    /// handshake response arrives.
    pub fn encapsulate<'a>(
        &mut self,
        plaintext: &[u8],
        out: &'a mut [u8],
    ) -> Result<Option<&'a [u8]>, Reject> {
        if out.len() < (plaintext.len() + DATA_OVERHEAD).max(MIN_BUF) {
            return Err(Reject::BufferTooSmall);
        }
        match self.tunn.encapsulate(plaintext, out) {
            TunnResult::WriteToNetwork(datagram) => {
                if datagram.first() == Some(&msg_type::HANDSHAKE_INIT) {
                    self.counters.tx_queued += 1;
                    self.init_sent_at = Some(Instant::now());
                }
                self.counters.tx_datagrams += 1;
                Ok(Some(datagram))
            }
            TunnResult::Done => {
                self.counters.tx_queued += 1;
                Ok(None)
            }
            TunnResult::Err(e) => Err(Reject::from_wg(&e)),
            // encapsulate never writes to the tunnel.
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                Err(Reject::Malformed)
            }
        }
    }

    /// A handshake initiation if there is no session and no handshake in flight; `None`
    /// otherwise. Lets a caller drop plaintexts while a link has no session instead of
    /// queueing them in boringtun, where they would leave late, all at once.
    pub fn start_handshake<'a>(&mut self, out: &'a mut [u8]) -> Option<&'a [u8]> {
        if self.is_established() || out.len() < MIN_BUF {
            return None;
        }
        match self.tunn.format_handshake_initiation(out, false) {
            TunnResult::WriteToNetwork(d) => {
                self.counters.tx_datagrams += 1;
                self.init_sent_at = Some(Instant::now());
                Some(d)
            }
            _ => None,
        }
    }

    /// A fresh handshake initiation when there is no session and the last one has had no
    /// answer for [`FIRST_HANDSHAKE_RETRY`] (then 2 s, 4 s; after that WireGuard's own 5 s
    /// timer in [`LinkTunnel::update_timers`] retries). Call every [`TIMER_TICK`].
    pub fn retry_stalled_handshake<'a>(
        &mut self,
        now: Instant,
        out: &'a mut [u8],
    ) -> Option<&'a [u8]> {
        if self.is_established() {
            self.init_retry = FIRST_HANDSHAKE_RETRY;
            self.init_sent_at = None;
            return None;
        }
        let sent = self.init_sent_at?;
        if self.init_retry > FAST_RETRY_LIMIT
            || now.saturating_duration_since(sent) < self.init_retry + self.init_jitter
        {
            return None;
        }
        self.init_retry *= 2;
        self.init_jitter = retry_jitter();
        let init = self.retry_handshake(out);
        if init.is_some() {
            // The next wait counts from this retry, on the caller's clock.
            self.init_sent_at = Some(now);
        }
        init
    }

    /// A fresh handshake initiation if no session exists, for a link whose path just came
    /// back (WAN up, route restored): boringtun would otherwise wait out its 5 s retry timer.
    pub fn retry_handshake<'a>(&mut self, out: &'a mut [u8]) -> Option<&'a [u8]> {
        if self.is_established() || out.len() < MIN_BUF {
            return None;
        }
        match self.tunn.format_handshake_initiation(out, true) {
            TunnResult::WriteToNetwork(d) => {
                self.counters.tx_datagrams += 1;
                self.init_sent_at = Some(Instant::now());
                Some(d)
            }
            _ => None,
        }
    }

    /// Handles one received datagram. Replies (handshake responses, keepalives, queued
    /// packets flushed after a handshake, cookie replies) are passed to `send` in order; they
    /// are written in `out` too, so `out` holds the plaintext only if the result is
    /// [`Received::Plaintext`]. `from` is the datagram's source address, used by the rate
    /// limiter's cookies (pass it on a shared port).
    pub fn decapsulate(
        &mut self,
        from: Option<IpAddr>,
        datagram: &[u8],
        out: &mut [u8],
        send: &mut dyn FnMut(&[u8]),
    ) -> Result<Received, Reject> {
        let Some(&kind) = datagram.first() else {
            // boringtun reads an empty datagram as "flush the queue".
            return Err(self.count_reject(Reject::Malformed));
        };
        if out.len() < datagram.len().max(MIN_BUF) {
            return Err(Reject::BufferTooSmall);
        }
        let received = match self.tunn.decapsulate(from, datagram, out) {
            TunnResult::Done => match kind {
                msg_type::COOKIE_REPLY => Received::Cookie,
                _ => Received::Keepalive,
            },
            TunnResult::Err(e) => return Err(self.count_reject(Reject::from_wg(&e))),
            TunnResult::WriteToNetwork(reply) => {
                let cookie_sent = reply.first() == Some(&msg_type::COOKIE_REPLY);
                self.counters.tx_datagrams += 1;
                send(reply);
                if cookie_sent {
                    self.counters.rx_rate_limited += 1;
                    return Ok(Received::CookieSent);
                }
                Received::Handshake
            }
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                // boringtun's slice is cut to the IP length; the trailer follows it in `out`.
                Received::Plaintext(datagram.len() - DATA_OVERHEAD)
            }
        };
        self.counters.rx_datagrams += 1;
        if received == Received::Handshake {
            if matches!(kind, msg_type::HANDSHAKE_INIT | msg_type::HANDSHAKE_RESP) {
                self.counters.handshakes += 1;
            }
            self.flush(out, send);
        }
        Ok(received)
    }

    /// Sends what boringtun queued while waiting for a handshake. The queue holds at most 256
    /// packets; the bound guards against a library change looping forever.
    fn flush(&mut self, out: &mut [u8], send: &mut dyn FnMut(&[u8])) {
        for _ in 0..1024 {
            match self.tunn.decapsulate(None, &[], out) {
                TunnResult::WriteToNetwork(datagram) => {
                    self.counters.tx_datagrams += 1;
                    send(datagram);
                }
                _ => break,
            }
        }
    }

    /// Runs WireGuard's timers (handshake retries, rekeying, keepalives); call at least every
    /// [`TIMER_TICK`]. Anything to send goes to `send`.
    pub fn update_timers(&mut self, out: &mut [u8], send: &mut dyn FnMut(&[u8])) {
        if out.len() < MIN_BUF {
            return;
        }
        // Errors here are only "expired", which `is_expired` reports.
        if let TunnResult::WriteToNetwork(datagram) = self.tunn.update_timers(out) {
            self.counters.tx_datagrams += 1;
            if datagram.first() == Some(&msg_type::HANDSHAKE_INIT) {
                self.init_sent_at = Some(Instant::now());
            }
            send(datagram);
        }
    }

    fn count_reject(&mut self, r: Reject) -> Reject {
        match r {
            Reject::Replayed => self.counters.rx_replayed += 1,
            Reject::RateLimited => self.counters.rx_rate_limited += 1,
            Reject::Unauthenticated => self.counters.rx_unauthenticated += 1,
            Reject::BufferTooSmall | Reject::Expired => {}
            _ => self.counters.rx_bad += 1,
        }
        r
    }
}

/// A random wait of up to [`HANDSHAKE_RETRY_JITTER`].
fn retry_jitter() -> Duration {
    use rand::Rng as _;
    let max = HANDSHAKE_RETRY_JITTER.as_micros() as u64;
    Duration::from_micros(rand::thread_rng().gen_range(0..=max))
}

/// The public key of a private key (for the hub's limiter and demux).
pub fn public_key(private_key: &[u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(*private_key)).to_bytes()
}

/// The message type of a WireGuard datagram, if it has a valid header (type 1-4 and three
/// zero bytes).
pub(crate) fn datagram_type(datagram: &[u8]) -> Option<u8> {
    match datagram {
        [t @ 1..=4, 0, 0, 0, ..] => Some(*t),
        _ => None,
    }
}

/// The receiver index field of a datagram addressed to an existing session (types 2-4).
pub(crate) fn receiver_index(datagram: &[u8]) -> Option<u32> {
    let field = match datagram_type(datagram)? {
        msg_type::HANDSHAKE_RESP => datagram.get(8..12)?,
        msg_type::COOKIE_REPLY | msg_type::DATA => datagram.get(4..8)?,
        _ => return None,
    };
    let mut b = [0u8; 4];
    b.copy_from_slice(field);
    Some(u32::from_le_bytes(b))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bond::wire;
    use rand::RngCore;

    pub(crate) fn random_key() -> [u8; 32] {
        let mut k = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut k);
        k
    }

    fn pair() -> (LinkTunnel, LinkTunnel) {
        let (a, b) = (random_key(), random_key());
        let ka = TunnelKeys {
            private_key: a,
            peer_public_key: public_key(&b),
            preshared_key: None,
            persistent_keepalive: None,
        };
        let kb = TunnelKeys {
            private_key: b,
            peer_public_key: public_key(&a),
            preshared_key: None,
            persistent_keepalive: None,
        };
        (
            LinkTunnel::new(&ka, 1, None).unwrap(),
            LinkTunnel::new(&kb, 2, None).unwrap(),
        )
    }

    /// Delivers `datagrams` to `to`; returns its replies and the plaintexts it produced.
    fn deliver(to: &mut LinkTunnel, datagrams: Vec<Vec<u8>>) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let mut out = vec![0u8; MAX_BUF];
        let mut replies = Vec::new();
        let mut plain = Vec::new();
        for d in datagrams {
            let r = to
                .decapsulate(None, &d, &mut out, &mut |x| replies.push(x.to_vec()))
                .unwrap();
            if let Received::Plaintext(n) = r {
                plain.push(out[..n].to_vec());
            }
        }
        (replies, plain)
    }

    pub(crate) fn data_plaintext(len: usize, seq: u64) -> Vec<u8> {
        let mut p = vec![0xabu8; len];
        p[0] = 0x45;
        p[1] = 0;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[9] = 17;
        let trailer = wire::Trailer {
            seq,
            link_seq: 9,
            send_time_us: 1234,
            link_id: 1,
            flags: 0,
            compact: false,
        };
        let mut out = Vec::new();
        wire::encode_data(&p, &trailer, &mut out);
        out
    }

    /// Runs a handshake, with `first` queued before it; returns what `b` received.
    fn handshake_with_queued(a: &mut LinkTunnel, b: &mut LinkTunnel, first: &[u8]) -> Vec<Vec<u8>> {
        let mut out = vec![0u8; MAX_BUF];
        let init = a.encapsulate(first, &mut out).unwrap().unwrap().to_vec();
        assert_eq!(init[0], msg_type::HANDSHAKE_INIT);
        assert!(!a.is_established());
        // A second plaintext while the handshake is in flight is queued silently.
        assert_eq!(a.encapsulate(first, &mut out).unwrap(), None);
        let (resp, plain) = deliver(b, vec![init]);
        assert!(plain.is_empty());
        assert_eq!(resp.len(), 1);
        let (to_b, plain) = deliver(a, resp);
        assert!(plain.is_empty());
        assert!(a.is_established());
        // Keepalive first, then the two queued plaintexts.
        assert_eq!(to_b.len(), 3, "keepalive + 2 queued");
        let (_, plain) = deliver(b, to_b);
        assert!(b.is_established());
        assert_eq!(a.counters().handshakes, 1);
        assert_eq!(b.counters().handshakes, 1);
        plain
    }

    #[test]
    fn handshake_then_data_with_trailer_intact() {
        let (mut a, mut b) = pair();
        let first = data_plaintext(100, 1);
        let plain = handshake_with_queued(&mut a, &mut b, &first);
        assert_eq!(plain, vec![first.clone(), first.clone()]);

        let mut out = vec![0u8; MAX_BUF];
        for (len, seq) in [(20, 2), (1400, 3), (60, 4)] {
            let p = data_plaintext(len, seq);
            let d = a.encapsulate(&p, &mut out).unwrap().unwrap().to_vec();
            assert_eq!(d.len(), p.len() + DATA_OVERHEAD);
            let (replies, plain) = deliver(&mut b, vec![d]);
            assert!(replies.is_empty());
            assert_eq!(plain, vec![p.clone()]);
            match wire::decode(&plain[0]) {
                Ok(wire::Message::Data { trailer, .. }) => assert_eq!(trailer.seq, seq),
                other => panic!("trailer lost: {other:?}"),
            }
        }
        // And the other direction (responder to initiator).
        let p = data_plaintext(300, 5);
        let d = b.encapsulate(&p, &mut out).unwrap().unwrap().to_vec();
        assert_eq!(deliver(&mut a, vec![d]).1, vec![p]);
        assert_eq!(b.counters().rx_bad, 0);
    }

    #[test]
    fn control_plaintext_round_trips() {
        let (mut a, mut b) = pair();
        let mut hello = Vec::new();
        wire::encode_control(
            &wire::Control::Hello(wire::Hello {
                link_id: 3,
                bond_id: 77,
                name: "lte".into(),
            }),
            &mut hello,
        );
        let plain = handshake_with_queued(&mut a, &mut b, &hello);
        assert_eq!(plain[0], hello);
    }

    #[test]
    fn garbage_truncated_and_replayed_are_rejected_and_counted() {
        let (mut a, mut b) = pair();
        handshake_with_queued(&mut a, &mut b, &data_plaintext(40, 1));
        let mut out = vec![0u8; MAX_BUF];
        let d = a
            .encapsulate(&data_plaintext(200, 2), &mut out)
            .unwrap()
            .unwrap()
            .to_vec();
        let mut sink = |_: &[u8]| panic!("nothing may be sent for a bad datagram");

        // Valid once.
        assert!(matches!(
            b.decapsulate(None, &d, &mut out, &mut sink),
            Ok(Received::Plaintext(_))
        ));
        // Replay.
        assert_eq!(
            b.decapsulate(None, &d, &mut out, &mut sink),
            Err(Reject::Replayed)
        );
        assert_eq!(b.counters().rx_replayed, 1);
        // Every truncation: malformed, or (its counter was seen) caught by the replay check
        // before any decryption.
        let rejected = |c: TunnelCounters| c.rx_bad + c.rx_replayed + c.rx_unauthenticated;
        let before = rejected(b.counters());
        for cut in 1..d.len() {
            assert!(b.decapsulate(None, &d[..cut], &mut out, &mut sink).is_err());
        }
        assert_eq!(rejected(b.counters()) - before, d.len() as u64 - 1);
        // A flipped bit in a fresh datagram's ciphertext; the genuine one still passes after.
        let fresh = a
            .encapsulate(&data_plaintext(200, 3), &mut out)
            .unwrap()
            .unwrap()
            .to_vec();
        let mut flipped = fresh.clone();
        let n = flipped.len();
        flipped[n - 20] ^= 1;
        assert_eq!(
            b.decapsulate(None, &flipped, &mut out, &mut sink),
            Err(Reject::Unauthenticated)
        );
        assert_eq!(b.counters().rx_unauthenticated, 1);
        assert!(matches!(
            b.decapsulate(None, &fresh, &mut out, &mut sink),
            Ok(Received::Plaintext(_))
        ));
        // Empty and garbage.
        assert_eq!(
            b.decapsulate(None, &[], &mut out, &mut sink),
            Err(Reject::Malformed)
        );
        let mut rng = rand::thread_rng();
        for _ in 0..2000 {
            let len = (rng.next_u32() % 300) as usize;
            let mut g = vec![0u8; len];
            rng.fill_bytes(&mut g);
            if len >= 4 && rng.next_u32() % 2 == 0 {
                g[0] = (rng.next_u32() % 4 + 1) as u8;
                g[1..4].fill(0);
            }
            let _ = b.decapsulate(None, &g, &mut out, &mut |_| {});
        }
        // The session still works.
        let p = data_plaintext(80, 3);
        let d = a.encapsulate(&p, &mut out).unwrap().unwrap().to_vec();
        assert_eq!(deliver(&mut b, vec![d]).1, vec![p]);
    }

    #[test]
    fn non_ip_plaintext_is_rejected() {
        let (mut a, mut b) = pair();
        handshake_with_queued(&mut a, &mut b, &data_plaintext(40, 1));
        let mut out = vec![0u8; MAX_BUF];
        let d = a
            .encapsulate(&[0u8; 64], &mut out)
            .unwrap()
            .unwrap()
            .to_vec();
        assert_eq!(
            b.decapsulate(None, &d, &mut out, &mut |_| {}),
            Err(Reject::Malformed)
        );
        assert_eq!(b.counters().rx_bad, 1);
    }

    #[test]
    fn short_buffers_are_errors_not_panics() {
        let (mut a, _) = pair();
        let mut small = vec![0u8; 100];
        assert_eq!(
            a.encapsulate(&[0x45; 40], &mut small),
            Err(Reject::BufferTooSmall)
        );
        let mut out = vec![0u8; 200];
        assert_eq!(
            a.encapsulate(&[0x45; 400], &mut out),
            Err(Reject::BufferTooSmall)
        );
        assert_eq!(
            a.decapsulate(None, &[4u8; 300], &mut out, &mut |_| {}),
            Err(Reject::BufferTooSmall)
        );
    }

    #[test]
    fn retry_handshake_only_without_a_session() {
        let (mut a, mut b) = pair();
        let mut out = vec![0u8; MAX_BUF];
        // The first initiation is "lost"; the retry completes the handshake at once.
        let _lost = a.encapsulate(&data_plaintext(60, 1), &mut out).unwrap();
        let init = a.retry_handshake(&mut out).unwrap().to_vec();
        assert_eq!(init[0], msg_type::HANDSHAKE_INIT);
        let (resp, _) = deliver(&mut b, vec![init]);
        let (to_b, _) = deliver(&mut a, resp);
        assert!(a.is_established());
        // Keepalive and the queued plaintext.
        assert_eq!(deliver(&mut b, to_b).1, vec![data_plaintext(60, 1)]);
        assert!(a.retry_handshake(&mut out).is_none());
    }

    #[test]
    fn a_lost_first_initiation_is_retried_after_one_then_two_then_four_seconds() {
        let (mut a, mut b) = pair();
        let mut out = vec![0u8; MAX_BUF];
        // The first initiation leaves at about t0 (real time); each retry counts from the
        // time it was made: 1 s, then 2 s, then 4 s later, plus up to a third of a second.
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let _lost = a.start_handshake(&mut out).unwrap().to_vec();
        let mut last = Vec::new();
        for (not_yet, due) in [(900, 1400), (3300, 3800), (7700, 8200)] {
            assert!(a.retry_stalled_handshake(at(not_yet), &mut out).is_none());
            let init = a.retry_stalled_handshake(at(due), &mut out);
            last = init.expect("a retry").to_vec();
            assert_eq!(last[0], msg_type::HANDSHAKE_INIT);
        }
        // Then WireGuard's own 5 s timer takes over.
        assert!(a.retry_stalled_handshake(at(600_000), &mut out).is_none());
        // The last retry completes the handshake; a later loss starts again at 1 s.
        let (resp, _) = deliver(&mut b, vec![last]);
        deliver(&mut a, resp);
        assert!(a.is_established());
        assert!(a.retry_stalled_handshake(at(700_000), &mut out).is_none());
        assert_eq!(a.init_retry, FIRST_HANDSHAKE_RETRY);
    }

    #[test]
    fn tunnels_that_lost_their_peer_together_retry_at_different_times() {
        // Eight links (or sites) whose first initiations all went unanswered at t0: each
        // retries between 1 s and 1 s + 333 ms later, not all in the same 10 ms.
        let t0 = Instant::now();
        let mut out = vec![0u8; MAX_BUF];
        let mut firsts = std::collections::BTreeSet::new();
        for _ in 0..8 {
            let (mut a, _b) = pair();
            a.start_handshake(&mut out).expect("initiation");
            a.init_sent_at = Some(t0);
            let first = (0..=40u64)
                .map(|k| 990 + 10 * k)
                .find(|&ms| {
                    a.retry_stalled_handshake(t0 + Duration::from_millis(ms), &mut out)
                        .is_some()
                })
                .expect("a retry within 1.4 s");
            assert!((1000..=1340).contains(&first), "{first} ms");
            firsts.insert(first);
        }
        assert!(firsts.len() >= 2, "all retried at {firsts:?} ms");
    }

    #[test]
    fn start_handshake_once_until_established() {
        let (mut a, mut b) = pair();
        let mut out = vec![0u8; MAX_BUF];
        let init = a.start_handshake(&mut out).unwrap().to_vec();
        assert!(a.start_handshake(&mut out).is_none(), "one in flight");
        let (resp, _) = deliver(&mut b, vec![init]);
        let (to_b, _) = deliver(&mut a, resp);
        assert_eq!(to_b.len(), 1, "only the keepalive: nothing was queued");
        assert!(a.is_established());
        assert!(a.start_handshake(&mut out).is_none());
    }

    #[test]
    fn index_must_fit_24_bits() {
        let keys = TunnelKeys {
            private_key: random_key(),
            peer_public_key: public_key(&random_key()),
            preshared_key: None,
            persistent_keepalive: None,
        };
        assert!(LinkTunnel::new(&keys, MAX_INDEX, None).is_ok());
        assert!(LinkTunnel::new(&keys, MAX_INDEX + 1, None).is_err());
    }

    #[test]
    fn header_helpers() {
        assert_eq!(datagram_type(&[4, 0, 0, 0, 9]), Some(4));
        assert_eq!(datagram_type(&[4, 0, 1, 0, 9]), None);
        assert_eq!(datagram_type(&[5, 0, 0, 0]), None);
        assert_eq!(datagram_type(&[1, 0]), None);
        let mut d = vec![4, 0, 0, 0];
        d.extend_from_slice(&0x0102_0304u32.to_le_bytes());
        assert_eq!(receiver_index(&d), Some(0x0102_0304));
        assert_eq!(receiver_index(&d[..6]), None);
        let mut r = vec![2, 0, 0, 0, 9, 9, 9, 9];
        r.extend_from_slice(&7u32.to_le_bytes());
        assert_eq!(receiver_index(&r), Some(7));
        assert_eq!(receiver_index(&[1, 0, 0, 0, 1, 2, 3, 4]), None);
    }
}
