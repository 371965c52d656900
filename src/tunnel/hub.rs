//! The hub's demultiplexer: one UDP port for every link of every peer.
//!
//! Each site link runs its own WireGuard handshake with the site's static key, so the hub
//! holds one [`LinkTunnel`] per (peer, site link). Datagrams are routed without any socket
//! state:
//!
//! * data, handshake responses and cookie replies name *our* receiver index; the session is
//!   `receiver_idx >> 8` (boringtun puts a session counter in the low byte);
//! * a handshake initiation names only the sender's index: the peer is found by decrypting its
//!   static key (`parse_handshake_anon`), then the session by (peer, `sender_idx >> 8`); an
//!   unknown pair gets a new session with a fresh index.
//!
//! A session says which site link it carries only inside the tunnel: it is *bound* to
//! (peer, [`LinkId`]) by the first authenticated [`wire::Control::Hello`] on it. Until then
//! everything but the hello is dropped and counted. Every authenticated datagram moves the
//! session's endpoint to the datagram's source, so a link whose address or NAT mapping changes
//! is followed without restart; replays and forgeries never move it.
//!
//! Memory is bounded: at most [`MAX_UNBOUND_PER_PEER`] sessions per peer wait for a hello
//! (the least recently heard is evicted), one bound session per (peer, link), and idle
//! sessions are removed by [`HubSessions::update_timers`].

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use rand::Rng as _;

use super::{
    datagram_type, msg_type, receiver_index, HandshakeLimiter, LinkTunnel, Received, Reject,
    TunnelCounters, TunnelKeys, MIN_BUF,
};
use crate::bond::wire;
use crate::bond::LinkId;

/// Most sessions of one peer that may wait for their hello at once.
pub const MAX_UNBOUND_PER_PEER: usize = 16;
/// A session that has not sent its hello within this time is removed.
pub const UNBOUND_TIMEOUT: Duration = Duration::from_secs(30);
/// A bound session silent for this long is removed (longer than WireGuard's 180 s key
/// lifetime plus retries, so only a link that is really gone goes).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(240);
/// How long the WireGuard state of a removed session is kept. A new initiation for the same
/// site link reuses it, so boringtun's timestamp check refuses a replayed initiation older than
/// the last one (a fresh `Tunn` would accept any captured initiation).
pub const RETIRED_KEEP: Duration = Duration::from_secs(600);
/// Most removed sessions kept for that.
const MAX_RETIRED: usize = 1024;
/// An unbound session younger than this is never evicted to make room for a new one, so
/// replayed initiations cannot push out a link that is still sending its hello.
const UNBOUND_GRACE: Duration = Duration::from_secs(5);

/// Index of a peer in the list given to [`HubSessions::new`].
pub type PeerIndex = usize;

/// Something the driver acts on (add or remove a link in the peer's bond, log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HubEvent {
    /// A session now carries `link` of `peer` (first hello, or a new session replaced an
    /// old one for the same link).
    Bound {
        /// The peer.
        peer: PeerIndex,
        /// The peer's link.
        link: LinkId,
        /// The hello that bound it.
        hello: wire::Hello,
        /// Where the link's datagrams come from.
        endpoint: SocketAddr,
    },
    /// The session of `link` was removed (idle or expired); the link is gone.
    Unbound {
        /// The peer.
        peer: PeerIndex,
        /// The peer's link.
        link: LinkId,
    },
    /// A bound link's source address or port changed.
    Roamed {
        /// The peer.
        peer: PeerIndex,
        /// The peer's link.
        link: LinkId,
        /// The new source.
        endpoint: SocketAddr,
    },
}

/// A plaintext for the bond of `peer`, received on `link`; the whole plaintext is the first
/// `len` bytes of the output buffer.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inbound {
    /// The peer.
    pub peer: PeerIndex,
    /// The link it came on.
    pub link: LinkId,
    /// Plaintext length.
    pub len: usize,
}

/// Datagrams the hub dropped, by reason (summed over all sessions, past and present).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HubCounters {
    /// Not a WireGuard message, or a plaintext that is not ours.
    pub malformed: u64,
    /// Failed authentication (bad MAC, bad tag).
    pub unauthenticated: u64,
    /// Replayed data or handshake.
    pub replayed: u64,
    /// A handshake from a static key that is not a configured peer.
    pub unknown_peer: u64,
    /// Addressed to a session index we do not have.
    pub no_session: u64,
    /// Authenticated, but on a session no hello has bound to a link yet.
    pub unbound: u64,
    /// Handshakes answered with a cookie because of load.
    pub rate_limited: u64,
    /// Sessions created by handshakes.
    pub sessions_created: u64,
    /// Sessions removed (idle, expired, evicted, replaced).
    pub sessions_removed: u64,
}

/// A session as `show` sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    /// Our local index.
    pub index: u32,
    /// The peer.
    pub peer: PeerIndex,
    /// The link it carries, once bound.
    pub link: Option<LinkId>,
    /// Where its datagrams come from (and ours go).
    pub endpoint: SocketAddr,
    /// Time since its last handshake.
    pub since_handshake: Option<Duration>,
    /// Its counters.
    pub counters: TunnelCounters,
}

struct Session {
    tunnel: LinkTunnel,
    peer: PeerIndex,
    /// The sender's index without its session byte: identifies the site link's `Tunn`.
    remote: u32,
    endpoint: SocketAddr,
    link: Option<LinkId>,
    last_rx: Instant,
}

/// What `remove_session_quiet` needs of a session once its tunnel is retired.
struct RemovedSession {
    peer: PeerIndex,
    remote: u32,
    link: Option<LinkId>,
}

/// A removed session's WireGuard state, kept for replay protection.
struct Retired {
    tunnel: LinkTunnel,
    index: u32,
    at: Instant,
}

/// All WireGuard sessions behind the hub's one UDP port.
pub struct HubSessions {
    secret: StaticSecret,
    public: PublicKey,
    limiter: HandshakeLimiter,
    peers: Vec<TunnelKeys>,
    peer_by_key: HashMap<[u8; 32], PeerIndex>,
    sessions: HashMap<u32, Session>,
    by_remote: HashMap<(PeerIndex, u32), u32>,
    bound: HashMap<(PeerIndex, LinkId), u32>,
    retired: HashMap<(PeerIndex, u32), Retired>,
    counters: HubCounters,
    events: VecDeque<HubEvent>,
}

impl std::fmt::Debug for HubSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubSessions")
            .field("peers", &self.peers.len())
            .field("sessions", &self.sessions.len())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl HubSessions {
    /// A hub with our `private_key` and the given peers (their `private_key` field must be
    /// ours too; only `peer_public_key`, `preshared_key` and `persistent_keepalive` differ).
    pub fn new(private_key: &[u8; 32], peers: Vec<TunnelKeys>) -> Self {
        let secret = StaticSecret::from(*private_key);
        let public = PublicKey::from(&secret);
        let peer_by_key = peers
            .iter()
            .enumerate()
            .map(|(i, k)| (k.peer_public_key, i))
            .collect();
        Self {
            limiter: HandshakeLimiter::new(public.as_bytes()),
            secret,
            public,
            peers,
            peer_by_key,
            sessions: HashMap::new(),
            by_remote: HashMap::new(),
            bound: HashMap::new(),
            retired: HashMap::new(),
            counters: HubCounters::default(),
            events: VecDeque::new(),
        }
    }

    /// Drop counters.
    pub fn counters(&self) -> HubCounters {
        self.counters
    }

    /// The next event, if any. New events appear after [`HubSessions::handle_datagram`] and
    /// [`HubSessions::update_timers`].
    pub fn poll_event(&mut self) -> Option<HubEvent> {
        self.events.pop_front()
    }

    /// Every session, for `show`.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let mut v: Vec<SessionInfo> = self
            .sessions
            .iter()
            .map(|(&index, s)| SessionInfo {
                index,
                peer: s.peer,
                link: s.link,
                endpoint: s.endpoint,
                since_handshake: s.tunnel.time_since_handshake(),
                counters: s.tunnel.counters(),
            })
            .collect();
        v.sort_by_key(|s| (s.peer, s.link, s.index));
        v
    }

    /// The endpoint of the session bound to (`peer`, `link`).
    pub fn endpoint(&self, peer: PeerIndex, link: LinkId) -> Option<SocketAddr> {
        let index = self.bound.get(&(peer, link))?;
        self.sessions.get(index).map(|s| s.endpoint)
    }

    /// Handles one datagram that arrived on the hub port from `from`. Replies go to `send`
    /// (always addressed to `from`). Returns a plaintext for a peer's bond, in `out`.
    pub fn handle_datagram(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        out: &mut [u8],
        send: &mut dyn FnMut(SocketAddr, &[u8]),
    ) -> Option<Inbound> {
        if out.len() < datagram.len().max(MIN_BUF) {
            // The driver sizes its buffer for any datagram; this is a bug, not an attack.
            self.counters.malformed += 1;
            return None;
        }
        let index = match datagram_type(datagram) {
            Some(msg_type::HANDSHAKE_INIT) => {
                self.session_for_initiation(from, datagram, out, send)?
            }
            Some(_) => match receiver_index(datagram) {
                Some(r) => r >> 8,
                None => {
                    self.counters.malformed += 1;
                    return None;
                }
            },
            None => {
                self.counters.malformed += 1;
                return None;
            }
        };
        let Some(session) = self.sessions.get_mut(&index) else {
            self.counters.no_session += 1;
            return None;
        };
        let result = session
            .tunnel
            .decapsulate(Some(from.ip()), datagram, out, &mut |d| send(from, d));
        let received = match result {
            Ok(r) => r,
            Err(e) => {
                self.count_reject(e);
                return None;
            }
        };
        if !received.is_authenticated() {
            self.counters.rate_limited += 1;
            return None;
        }
        session.last_rx = now;
        if session.endpoint != from {
            session.endpoint = from;
            if let Some(link) = session.link {
                self.events.push_back(HubEvent::Roamed {
                    peer: session.peer,
                    link,
                    endpoint: from,
                });
            }
        }
        let Received::Plaintext(len) = received else {
            return None;
        };
        let (peer, current) = (session.peer, session.link);
        let hello = match wire::decode(&out[..len]) {
            Ok(wire::Message::Control(wire::Control::Hello(h))) => Some(h),
            // Anything else (even undecodable) on a bound session is the bond's to judge.
            _ => None,
        };
        let link = match (hello, current) {
            (Some(h), current) => {
                let link = LinkId(h.link_id);
                if current != Some(link) {
                    self.bind(index, peer, link, h, from);
                }
                link
            }
            (None, Some(link)) => link,
            (None, None) => {
                self.counters.unbound += 1;
                return None;
            }
        };
        Some(Inbound { peer, link, len })
    }

    /// Authenticates a handshake initiation's sender and finds (or creates) its session.
    fn session_for_initiation(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
        send: &mut dyn FnMut(SocketAddr, &[u8]),
    ) -> Option<u32> {
        // MAC1 and load check before the Diffie-Hellman in parse_handshake_anon.
        let half = match self
            .limiter
            .inner
            .verify_packet(Some(from.ip()), datagram, out)
        {
            Ok(Packet::HandshakeInit(p)) => parse_handshake_anon(&self.secret, &self.public, &p),
            Ok(_) => {
                self.counters.malformed += 1;
                return None;
            }
            Err(TunnResult::WriteToNetwork(cookie)) => {
                send(from, cookie);
                self.counters.rate_limited += 1;
                return None;
            }
            Err(TunnResult::Err(e)) => {
                self.count_reject(Reject::from_wg(&e));
                return None;
            }
            Err(_) => {
                self.counters.malformed += 1;
                return None;
            }
        };
        let half = match half {
            Ok(h) => h,
            Err(e) => {
                self.count_reject(Reject::from_wg(&e));
                return None;
            }
        };
        let Some(&peer) = self.peer_by_key.get(&half.peer_static_public) else {
            self.counters.unknown_peer += 1;
            return None;
        };
        let remote = half.peer_index >> 8;
        if let Some(&index) = self.by_remote.get(&(peer, remote)) {
            return Some(index);
        }
        if let Some(r) = self.retired.remove(&(peer, remote)) {
            if r.at.elapsed() < RETIRED_KEEP && !self.sessions.contains_key(&r.index) {
                // Same site link as a removed session: its `Tunn` remembers the last
                // initiation's timestamp, so a replay is refused and a real one accepted.
                self.sessions.insert(
                    r.index,
                    Session {
                        tunnel: r.tunnel,
                        peer,
                        remote,
                        endpoint: from,
                        link: None,
                        last_rx: Instant::now(),
                    },
                );
                self.by_remote.insert((peer, remote), r.index);
                return Some(r.index);
            }
        }
        self.create_session(peer, remote, from)
    }

    fn create_session(&mut self, peer: PeerIndex, remote: u32, from: SocketAddr) -> Option<u32> {
        let waiting: Vec<(u32, Instant)> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.peer == peer && s.link.is_none())
            .map(|(&i, s)| (i, s.last_rx))
            .collect();
        if waiting.len() >= MAX_UNBOUND_PER_PEER {
            match waiting.iter().min_by_key(|(_, t)| *t) {
                Some(&(oldest, t)) if t.elapsed() >= UNBOUND_GRACE => self.remove_session(oldest),
                _ => {
                    // Every waiting session is young: refuse rather than evict one.
                    self.counters.rate_limited += 1;
                    return None;
                }
            }
        }
        let mut rng = rand::thread_rng();
        let index = loop {
            // 2^24 indexes and a few hundred sessions at most: a free one is found at once.
            let i = rng.gen_range(1..=super::MAX_INDEX);
            if !self.sessions.contains_key(&i) && !self.retired.values().any(|r| r.index == i) {
                break i;
            }
        };
        let tunnel = LinkTunnel::new(&self.peers[peer], index, Some(&self.limiter)).ok()?;
        self.sessions.insert(
            index,
            Session {
                tunnel,
                peer,
                remote,
                endpoint: from,
                link: None,
                last_rx: Instant::now(),
            },
        );
        self.by_remote.insert((peer, remote), index);
        self.counters.sessions_created += 1;
        Some(index)
    }

    /// Binds session `index` to (`peer`, `link`), replacing any older session of that link.
    fn bind(
        &mut self,
        index: u32,
        peer: PeerIndex,
        link: LinkId,
        hello: wire::Hello,
        endpoint: SocketAddr,
    ) {
        if let Some(old) = self.bound.insert((peer, link), index) {
            if old != index {
                // The site link made a new session (site restart): the old one is dead.
                self.remove_session_quiet(old);
            }
        }
        if let Some(s) = self.sessions.get_mut(&index) {
            if let Some(previous) = s.link.replace(link) {
                // The same session now names another link: free the old name.
                if previous != link && self.bound.get(&(peer, previous)) == Some(&index) {
                    self.bound.remove(&(peer, previous));
                    self.events.push_back(HubEvent::Unbound {
                        peer,
                        link: previous,
                    });
                }
            }
        }
        self.events.push_back(HubEvent::Bound {
            peer,
            link,
            hello,
            endpoint,
        });
    }

    /// Accepts a new peer (config reload); returns its index, the next after every earlier
    /// one (indexes of removed peers are not reused).
    pub fn add_peer(&mut self, keys: TunnelKeys) -> PeerIndex {
        let index = self.peers.len();
        self.peer_by_key.insert(keys.peer_public_key, index);
        self.peers.push(keys);
        index
    }

    /// Forgets a peer (config reload): its sessions end at once (no events), and its key is
    /// no longer accepted. Its index stays taken.
    pub fn remove_peer(&mut self, peer: PeerIndex) {
        if let Some(key) = self.peers.get(peer).map(|k| k.peer_public_key) {
            if self.peer_by_key.get(&key) == Some(&peer) {
                self.peer_by_key.remove(&key);
            }
        }
        let gone: Vec<u32> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.peer == peer)
            .map(|(&i, _)| i)
            .collect();
        for index in gone {
            self.remove_session_quiet(index);
        }
    }

    /// Removes a session; reports its link as gone if it was bound.
    fn remove_session(&mut self, index: u32) {
        if let Some((peer, Some(link))) = self.remove_session_quiet(index) {
            self.events.push_back(HubEvent::Unbound { peer, link });
        }
    }

    fn remove_session_quiet(&mut self, index: u32) -> Option<(PeerIndex, Option<LinkId>)> {
        let s = self.sessions.remove(&index)?;
        self.counters.sessions_removed += 1;
        self.retired.retain(|_, r| r.at.elapsed() < RETIRED_KEEP);
        if self.retired.len() >= MAX_RETIRED {
            if let Some(oldest) = self
                .retired
                .iter()
                .min_by_key(|(_, r)| r.at)
                .map(|(k, _)| *k)
            {
                self.retired.remove(&oldest);
            }
        }
        let (peer, remote, link) = (s.peer, s.remote, s.link);
        self.retired.insert(
            (peer, remote),
            Retired {
                tunnel: s.tunnel,
                index,
                at: Instant::now(),
            },
        );
        let s = RemovedSession { peer, remote, link };
        if self.by_remote.get(&(s.peer, s.remote)) == Some(&index) {
            self.by_remote.remove(&(s.peer, s.remote));
        }
        if let Some(link) = s.link {
            if self.bound.get(&(s.peer, link)) == Some(&index) {
                self.bound.remove(&(s.peer, link));
                return Some((s.peer, Some(link)));
            }
        }
        Some((s.peer, None))
    }

    /// Encrypts a plaintext from `peer`'s bond for `link`. Returns where to send the datagram
    /// and the datagram, or `None` if it was queued until a handshake completes. Fails with
    /// [`Reject::NoSession`] if no session carries that link.
    pub fn encapsulate<'a>(
        &mut self,
        peer: PeerIndex,
        link: LinkId,
        plaintext: &[u8],
        out: &'a mut [u8],
    ) -> Result<Option<(SocketAddr, &'a [u8])>, Reject> {
        let index = *self.bound.get(&(peer, link)).ok_or(Reject::NoSession)?;
        let session = self.sessions.get_mut(&index).ok_or(Reject::NoSession)?;
        let endpoint = session.endpoint;
        Ok(session
            .tunnel
            .encapsulate(plaintext, out)?
            .map(|d| (endpoint, d)))
    }

    /// Runs every session's WireGuard timers (call at least every [`super::TIMER_TICK`]) and
    /// removes idle, expired and never-bound sessions.
    pub fn update_timers(
        &mut self,
        now: Instant,
        out: &mut [u8],
        send: &mut dyn FnMut(SocketAddr, &[u8]),
    ) {
        self.limiter.tick();
        let mut dead = Vec::new();
        for (&index, s) in &mut self.sessions {
            let idle = now.saturating_duration_since(s.last_rx);
            let timeout = if s.link.is_some() {
                IDLE_TIMEOUT
            } else {
                UNBOUND_TIMEOUT
            };
            if idle > timeout || s.tunnel.is_expired() {
                dead.push(index);
                continue;
            }
            let endpoint = s.endpoint;
            s.tunnel.update_timers(out, &mut |d| send(endpoint, d));
        }
        for index in dead {
            self.remove_session(index);
        }
    }

    fn count_reject(&mut self, r: Reject) {
        let c = &mut self.counters;
        match r {
            Reject::Malformed | Reject::BufferTooSmall | Reject::Expired => c.malformed += 1,
            Reject::Unauthenticated => c.unauthenticated += 1,
            Reject::Replayed => c.replayed += 1,
            Reject::NoSession => c.no_session += 1,
            Reject::RateLimited => c.rate_limited += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{data_plaintext, random_key};
    use super::super::{public_key, MAX_BUF};
    use super::*;
    use rand::RngCore;

    struct Site {
        links: Vec<LinkTunnel>,
        addrs: Vec<SocketAddr>,
    }

    fn keys(private: [u8; 32], peer_private: &[u8; 32]) -> TunnelKeys {
        TunnelKeys {
            private_key: private,
            peer_public_key: public_key(peer_private),
            preshared_key: None,
            persistent_keepalive: None,
        }
    }

    fn hello(link_id: u8) -> Vec<u8> {
        let mut out = Vec::new();
        wire::encode_control(
            &wire::Control::Hello(wire::Hello {
                link_id,
                bond_id: 5,
                name: format!("wan{link_id}"),
            }),
            &mut out,
        );
        out
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A hub with `n` peers; returns it, the hub key and the peers' keys.
    fn hub(n: usize) -> (HubSessions, [u8; 32], Vec<[u8; 32]>) {
        let hub_key = random_key();
        let site_keys: Vec<[u8; 32]> = (0..n).map(|_| random_key()).collect();
        let peers = site_keys.iter().map(|k| keys(hub_key, k)).collect();
        (HubSessions::new(&hub_key, peers), hub_key, site_keys)
    }

    fn site(site_key: [u8; 32], hub_key: &[u8; 32], indexes: &[u32], addrs: &[&str]) -> Site {
        Site {
            links: indexes
                .iter()
                .map(|&i| LinkTunnel::new(&keys(site_key, hub_key), i, None).unwrap())
                .collect(),
            addrs: addrs.iter().map(|a| addr(a)).collect(),
        }
    }

    /// Sends datagrams from site link `l` to the hub until both sides are quiet; returns the
    /// plaintexts the hub produced.
    fn exchange(
        hub: &mut HubSessions,
        site: &mut Site,
        l: usize,
        mut to_hub: Vec<Vec<u8>>,
    ) -> Vec<(Inbound, Vec<u8>)> {
        let mut out = vec![0u8; MAX_BUF];
        let mut got = Vec::new();
        for _ in 0..10 {
            if to_hub.is_empty() {
                break;
            }
            let mut to_site = Vec::new();
            for d in to_hub.drain(..) {
                let from = site.addrs[l];
                if let Some(inb) =
                    hub.handle_datagram(from, &d, Instant::now(), &mut out, &mut |to, r| {
                        assert_eq!(to, from, "replies go to the sender");
                        to_site.push(r.to_vec());
                    })
                {
                    got.push((inb, out[..inb.len].to_vec()));
                }
            }
            for d in to_site {
                site.links[l]
                    .decapsulate(None, &d, &mut out, &mut |r| to_hub.push(r.to_vec()))
                    .unwrap();
            }
        }
        got
    }

    fn connect(hub: &mut HubSessions, site: &mut Site, l: usize) -> Vec<(Inbound, Vec<u8>)> {
        let mut out = vec![0u8; MAX_BUF];
        let h = hello(l as u8);
        let init = site.links[l]
            .encapsulate(&h, &mut out)
            .unwrap()
            .unwrap()
            .to_vec();
        exchange(hub, site, l, vec![init])
    }

    fn send_data(
        hub: &mut HubSessions,
        site: &mut Site,
        l: usize,
        p: &[u8],
    ) -> Vec<(Inbound, Vec<u8>)> {
        let mut out = vec![0u8; MAX_BUF];
        let d = site.links[l]
            .encapsulate(p, &mut out)
            .unwrap()
            .unwrap()
            .to_vec();
        exchange(hub, site, l, vec![d])
    }

    #[test]
    fn peers_added_and_removed_at_run_time() {
        let (mut hub, hub_key, site_keys) = hub(1);
        let new_key = random_key();
        // Unknown until added.
        let mut s = site(new_key, &hub_key, &[20], &["192.0.2.9:1000"]);
        assert!(connect(&mut hub, &mut s, 0).is_empty());
        assert_eq!(hub.counters().unknown_peer, 1);
        assert_eq!(hub.add_peer(keys(hub_key, &new_key)), 1);
        let mut s = site(new_key, &hub_key, &[21], &["192.0.2.9:1001"]);
        let got = connect(&mut hub, &mut s, 0);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.peer, 1);
        assert_eq!(hub.sessions().len(), 1);
        // The first peer is not disturbed by the second one's removal.
        let mut first = site(site_keys[0], &hub_key, &[22], &["198.51.100.1:5"]);
        assert_eq!(connect(&mut hub, &mut first, 0).len(), 1);
        hub.remove_peer(1);
        assert_eq!(hub.sessions().len(), 1, "only peer 0's session is left");
        assert!(hub.sessions().iter().all(|si| si.peer == 0));
        assert!(send_data(&mut hub, &mut s, 0, &data_plaintext(100, 1)).is_empty());
        assert_eq!(
            send_data(&mut hub, &mut first, 0, &data_plaintext(100, 1)).len(),
            1
        );
        // A removed peer's handshakes are refused again.
        let mut again = site(new_key, &hub_key, &[23], &["192.0.2.9:1002"]);
        assert!(connect(&mut hub, &mut again, 0).is_empty());
        assert_eq!(hub.counters().unknown_peer, 2);
    }

    #[test]
    fn two_site_links_bind_and_carry_data() {
        let (mut hub, hub_key, site_keys) = hub(2);
        let mut s = site(
            site_keys[1],
            &hub_key,
            &[10, 11],
            &["192.0.2.1:1000", "198.51.100.7:2000"],
        );
        for l in 0..2 {
            let got = connect(&mut hub, &mut s, l);
            assert_eq!(got.len(), 1, "the queued hello arrives");
            assert_eq!(
                got[0].0,
                Inbound {
                    peer: 1,
                    link: LinkId(l as u8),
                    len: hello(l as u8).len()
                }
            );
            match hub.poll_event() {
                Some(HubEvent::Bound {
                    peer: 1,
                    link,
                    endpoint,
                    hello,
                }) => {
                    assert_eq!(link, LinkId(l as u8));
                    assert_eq!(endpoint, s.addrs[l]);
                    assert_eq!(hello.name, format!("wan{l}"));
                }
                other => panic!("expected Bound, got {other:?}"),
            }
        }
        assert_eq!(hub.sessions().len(), 2);
        for l in 0..2 {
            let p = data_plaintext(500, l as u64);
            let got = send_data(&mut hub, &mut s, l, &p);
            assert_eq!(
                got,
                vec![(
                    Inbound {
                        peer: 1,
                        link: LinkId(l as u8),
                        len: p.len()
                    },
                    p
                )]
            );
        }
        // Hub to site, per link, to the learned endpoint.
        let mut out = vec![0u8; MAX_BUF];
        for l in 0..2 {
            let p = data_plaintext(64, 9);
            let (to, d) = hub
                .encapsulate(1, LinkId(l as u8), &p, &mut out)
                .unwrap()
                .unwrap();
            assert_eq!(to, s.addrs[l]);
            let d = d.to_vec();
            let r = s.links[l]
                .decapsulate(None, &d, &mut out, &mut |_| {})
                .unwrap();
            assert_eq!(r, Received::Plaintext(p.len()));
            assert_eq!(out[..p.len()], p[..]);
        }
        assert_eq!(
            hub.encapsulate(0, LinkId(0), &[0x45; 20], &mut out),
            Err(Reject::NoSession)
        );
        assert_eq!(hub.counters().sessions_created, 2);
    }

    #[test]
    fn data_before_hello_is_dropped_and_counted() {
        let (mut hub, hub_key, site_keys) = hub(1);
        let mut s = site(site_keys[0], &hub_key, &[10], &["192.0.2.1:1000"]);
        let mut out = vec![0u8; MAX_BUF];
        let p = data_plaintext(100, 1);
        let init = s.links[0]
            .encapsulate(&p, &mut out)
            .unwrap()
            .unwrap()
            .to_vec();
        let got = exchange(&mut hub, &mut s, 0, vec![init]);
        assert!(got.is_empty());
        assert_eq!(hub.counters().unbound, 1);
        assert_eq!(hub.poll_event(), None);
        // A hello then binds it and data passes.
        let got = send_data(&mut hub, &mut s, 0, &hello(0));
        assert_eq!(got.len(), 1);
        assert!(matches!(hub.poll_event(), Some(HubEvent::Bound { .. })));
        assert_eq!(send_data(&mut hub, &mut s, 0, &p).len(), 1);
    }

    #[test]
    fn address_change_is_relearned_and_replays_do_not_move_it() {
        let (mut hub, hub_key, site_keys) = hub(1);
        let mut s = site(site_keys[0], &hub_key, &[10], &["192.0.2.1:1000"]);
        connect(&mut hub, &mut s, 0);
        while hub.poll_event().is_some() {}
        let mut out = vec![0u8; MAX_BUF];
        let p = data_plaintext(100, 1);
        let captured = s.links[0]
            .encapsulate(&p, &mut out)
            .unwrap()
            .unwrap()
            .to_vec();
        assert_eq!(
            exchange(&mut hub, &mut s, 0, vec![captured.clone()]).len(),
            1
        );

        // DHCP renew: same session, new address.
        s.addrs[0] = addr("203.0.113.9:4444");
        assert_eq!(send_data(&mut hub, &mut s, 0, &p).len(), 1);
        assert_eq!(hub.endpoint(0, LinkId(0)), Some(s.addrs[0]));
        assert_eq!(
            hub.poll_event(),
            Some(HubEvent::Roamed {
                peer: 0,
                link: LinkId(0),
                endpoint: s.addrs[0]
            })
        );
        // A replay from an attacker's address is rejected, and the endpoint stays.
        let attacker = addr("100.64.0.66:666");
        let r = hub.handle_datagram(
            attacker,
            &captured,
            Instant::now(),
            &mut out,
            &mut |_, _| panic!("no reply to a replay"),
        );
        assert_eq!(r, None);
        assert_eq!(hub.counters().replayed, 1);
        assert_eq!(hub.endpoint(0, LinkId(0)), Some(s.addrs[0]));
        // A new handshake (rekey) from yet another address reuses the session.
        s.addrs[0] = addr("203.0.113.10:5555");
        let init = {
            let t = &mut s.links[0];
            let mut o = vec![0u8; MAX_BUF];
            // Force a fresh initiation as a rekey would.
            match t.tunn.format_handshake_initiation(&mut o, true) {
                TunnResult::WriteToNetwork(d) => d.to_vec(),
                other => panic!("{other:?}"),
            }
        };
        exchange(&mut hub, &mut s, 0, vec![init]);
        assert_eq!(hub.sessions().len(), 1);
        assert_eq!(hub.endpoint(0, LinkId(0)), Some(s.addrs[0]));
        assert_eq!(send_data(&mut hub, &mut s, 0, &p).len(), 1);
    }

    #[test]
    fn site_restart_replaces_the_links_session() {
        let (mut hub, hub_key, site_keys) = hub(1);
        let mut s = site(site_keys[0], &hub_key, &[10], &["192.0.2.1:1000"]);
        connect(&mut hub, &mut s, 0);
        let mut s2 = site(site_keys[0], &hub_key, &[77], &["192.0.2.1:1001"]);
        connect(&mut hub, &mut s2, 0);
        assert_eq!(hub.sessions().len(), 1, "the old session of link 0 is gone");
        assert_eq!(hub.endpoint(0, LinkId(0)), Some(s2.addrs[0]));
        // The old session's data now finds no session.
        let mut out = vec![0u8; MAX_BUF];
        let d = s.links[0]
            .encapsulate(&data_plaintext(50, 1), &mut out)
            .unwrap()
            .unwrap()
            .to_vec();
        assert!(hub
            .handle_datagram(s.addrs[0], &d, Instant::now(), &mut out, &mut |_, _| {})
            .is_none());
        assert_eq!(hub.counters().no_session, 1);
    }

    #[test]
    fn unknown_peer_is_dropped_and_counted() {
        let (mut hub, hub_key, _) = hub(1);
        let mut stranger = site(random_key(), &hub_key, &[10], &["192.0.2.99:1"]);
        let got = connect(&mut hub, &mut stranger, 0);
        assert!(got.is_empty());
        assert_eq!(hub.counters().unknown_peer, 1);
        assert!(hub.sessions().is_empty());
        // A handshake for another hub (wrong MAC1) is unauthenticated.
        let mut lost = site(random_key(), &random_key(), &[10], &["192.0.2.99:1"]);
        connect(&mut hub, &mut lost, 0);
        assert_eq!(hub.counters().unauthenticated, 1);
    }

    #[test]
    fn two_sites_share_the_hub() {
        let (mut hub, hub_key, site_keys) = hub(2);
        let mut a = site(site_keys[0], &hub_key, &[10], &["192.0.2.1:1000"]);
        // Same index on both sites: the peer tells them apart.
        let mut b = site(site_keys[1], &hub_key, &[10], &["192.0.2.2:1000"]);
        connect(&mut hub, &mut a, 0);
        connect(&mut hub, &mut b, 0);
        let p = data_plaintext(100, 1);
        assert_eq!(send_data(&mut hub, &mut a, 0, &p)[0].0.peer, 0);
        assert_eq!(send_data(&mut hub, &mut b, 0, &p)[0].0.peer, 1);
    }

    #[test]
    fn a_replayed_initiation_of_a_removed_session_is_refused() {
        let (mut hub, hub_key, site_keys) = hub(1);
        let mut s = site(site_keys[0], &hub_key, &[30], &["192.0.2.1:1000"]);
        let mut out = vec![0u8; MAX_BUF];
        let init = s.links[0]
            .encapsulate(&hello(0), &mut out)
            .unwrap()
            .unwrap()
            .to_vec();
        assert_eq!(exchange(&mut hub, &mut s, 0, vec![init.clone()]).len(), 1);
        // The session goes idle and is removed.
        let later = Instant::now() + IDLE_TIMEOUT + Duration::from_secs(1);
        hub.update_timers(later, &mut out, &mut |_, _| {});
        assert!(hub.sessions().is_empty());
        // Someone who captured the initiation replays it: no answer.
        let mut answered = 0;
        hub.handle_datagram(s.addrs[0], &init, Instant::now(), &mut out, &mut |_, _| {
            answered += 1;
        });
        assert_eq!(answered, 0, "a replayed initiation must not be answered");
        // The real site link handshakes again (a newer timestamp) and is accepted.
        std::thread::sleep(Duration::from_millis(20));
        let fresh = match s.links[0].tunn.format_handshake_initiation(&mut out, true) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("{other:?}"),
        };
        exchange(&mut hub, &mut s, 0, vec![fresh]);
        assert_eq!(send_data(&mut hub, &mut s, 0, &hello(0)).len(), 1);
    }

    #[test]
    fn unbound_sessions_are_bounded_and_expire() {
        let (mut hub, hub_key, site_keys) = hub(1);
        let mut out = vec![0u8; MAX_BUF];
        for i in 0..(MAX_UNBOUND_PER_PEER as u32 + 5) {
            let mut s = site(site_keys[0], &hub_key, &[100 + i], &["192.0.2.1:1000"]);
            // Handshake only: a keepalive, no hello.
            let init = match s.links[0].tunn.format_handshake_initiation(&mut out, false) {
                TunnResult::WriteToNetwork(d) => d.to_vec(),
                other => panic!("{other:?}"),
            };
            exchange(&mut hub, &mut s, 0, vec![init]);
        }
        assert_eq!(hub.sessions().len(), MAX_UNBOUND_PER_PEER);
        let later = Instant::now() + UNBOUND_TIMEOUT + Duration::from_secs(1);
        hub.update_timers(later, &mut out, &mut |_, _| {});
        assert!(hub.sessions().is_empty());
    }

    #[test]
    fn idle_bound_session_is_removed_with_an_event() {
        let (mut hub, hub_key, site_keys) = hub(1);
        let mut s = site(site_keys[0], &hub_key, &[10], &["192.0.2.1:1000"]);
        connect(&mut hub, &mut s, 0);
        while hub.poll_event().is_some() {}
        let mut out = vec![0u8; MAX_BUF];
        hub.update_timers(Instant::now(), &mut out, &mut |_, _| {});
        assert_eq!(hub.sessions().len(), 1);
        let later = Instant::now() + IDLE_TIMEOUT + Duration::from_secs(1);
        hub.update_timers(later, &mut out, &mut |_, _| {});
        assert_eq!(
            hub.poll_event(),
            Some(HubEvent::Unbound {
                peer: 0,
                link: LinkId(0)
            })
        );
        assert!(hub.sessions().is_empty());
    }

    #[test]
    fn random_datagrams_never_panic_and_leave_sessions_working() {
        let (mut hub, hub_key, site_keys) = hub(2);
        let mut s = site(
            site_keys[0],
            &hub_key,
            &[10, 11],
            &["192.0.2.1:1000", "192.0.2.2:1000"],
        );
        connect(&mut hub, &mut s, 0);
        connect(&mut hub, &mut s, 1);
        let indexes: Vec<u32> = hub.sessions().iter().map(|i| i.index).collect();
        let mut rng = rand::thread_rng();
        let mut out = vec![0u8; MAX_BUF];
        let mut replies = 0;
        let attacker = addr("100.64.0.66:666");
        for n in 0..10_000u32 {
            let len = match n % 4 {
                0 => 148,
                1 => 92,
                2 => 64,
                _ => (rng.next_u32() % 1600) as usize,
            };
            let mut g = vec![0u8; len];
            rng.fill_bytes(&mut g);
            if len >= 12 && n % 3 != 0 {
                g[0] = (n % 4 + 1) as u8;
                g[1..4].fill(0);
                // Aim at real sessions half the time.
                let idx = indexes[(n as usize) % indexes.len()] << 8;
                let at = if g[0] == 2 { 8 } else { 4 };
                if n % 2 == 0 {
                    g[at..at + 4].copy_from_slice(&idx.to_le_bytes());
                }
            }
            let r = hub.handle_datagram(attacker, &g, Instant::now(), &mut out, &mut |_, _| {
                replies += 1
            });
            assert_eq!(r, None);
        }
        assert_eq!(replies, 0, "garbage is never answered");
        let c = hub.counters();
        assert_eq!(
            c.malformed + c.unauthenticated + c.replayed + c.no_session + c.unknown_peer,
            10_000
        );
        for (_, e) in [
            (0, hub.endpoint(0, LinkId(0))),
            (1, hub.endpoint(0, LinkId(1))),
        ] {
            assert_ne!(e, Some(attacker));
        }
        let p = data_plaintext(300, 1);
        assert_eq!(send_data(&mut hub, &mut s, 0, &p).len(), 1);
        assert_eq!(send_data(&mut hub, &mut s, 1, &p).len(), 1);
    }
}
