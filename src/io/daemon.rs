//! The daemon behind `wgbond up --foreground`: one task owns everything.
//!
//! A single tokio task owns the TUN device, the UDP socket(s), every [`LinkTunnel`] (site) or
//! the [`HubSessions`] (hub), one [`Bond`] per peer and the network configuration. It waits on
//! whichever comes first — a packet from TUN, a datagram on any socket, a control request, a
//! signal, or the earliest timer (the bonds' `poll_timeout` and the WireGuard tick every
//! [`TIMER_TICK`]) — handles it, then drains every bond's transmit/deliver/event queues. No
//! locks, no polling loop.
//!
//! Start-up order (undone in reverse on any failure, so a failed `up` leaves nothing behind):
//! resolve endpoints, `pre_up` hooks, TUN device, [`netcfg::apply`], sockets, control socket,
//! `post_up` hooks, READY. Teardown: `pre_down`, sockets closed, [`netcfg`] teardown, TUN
//! removed, control socket removed, `post_down`.

use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, ReadBuf};
use tokio::net::{UdpSocket, UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use super::allowed_ips::{packet_destination, packet_source, AllowedIps};
use super::control::{
    self, BondStatus, InterfaceDrops, InterfaceStatus, LinkStatus, PeerStatus, Reply, Request,
};
use super::netcfg::{self, AppliedNet, NetPlan, RouteTableSetting, WanBind, WanLinkPlan};
use crate::bond::{self, Bond, Event, LinkId, LinkState};
use crate::config::{Config, LinkBind, PeerConfig, Role, RouteTable};
use crate::keys;
use crate::tunnel::hub::{HubEvent, HubSessions};
use crate::tunnel::{LinkTunnel, Received, TunnelKeys, MAX_BUF, TIMER_TICK};

/// Packets read per wake-up before the bonds are drained (amortises the drain).
const BATCH: usize = 64;
/// How often the site re-reads its WANs' gateways even without a netlink notification (a
/// safety net; WAN changes are normally seen at once through [`netcfg::WanWatcher`]).
const LINK_REFRESH: Duration = Duration::from_secs(60);
/// Quiet time after a burst of WAN notifications before the links are refreshed.
const WAN_SETTLE: Duration = Duration::from_millis(300);
/// UDP socket buffer size asked for (the kernel caps it at net.core.*mem_max).
const SOCKET_BUFFER: usize = 4 << 20;

/// Runs the daemon for `config` until `down`, SIGTERM or SIGINT; tears everything down.
pub fn run_foreground(config: Config) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(async move {
        // Signals are caught from here on: a SIGTERM during start-up is seen by the loop at
        // once and still gets a clean teardown.
        let mut signals = Signals::new()?;
        let mut daemon = Daemon::start(config).await?;
        notify_systemd("READY=1");
        info!(interface = %daemon.config.name, "up");
        // A bug that panics in the loop must not leave routes and rules behind.
        let ran = match std::panic::AssertUnwindSafe(daemon.run(&mut signals))
            .catch_unwind()
            .await
        {
            Ok(r) => r,
            Err(_) => Err("internal error (panic) in the event loop".to_owned()),
        };
        notify_systemd("STOPPING=1");
        let down = daemon.shutdown().await;
        ran.and(down)
    })
}

/// SIGTERM and SIGINT streams.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, String> {
        let sig = |kind| signal(kind).map_err(|e| format!("cannot catch signals: {e}"));
        Ok(Self {
            term: sig(SignalKind::terminate())?,
            int: sig(SignalKind::interrupt())?,
        })
    }
}

/// One site link: its session and its socket.
struct SiteLink {
    name: String,
    bind: String,
    endpoint: SocketAddr,
    socket: UdpSocket,
    tunnel: LinkTunnel,
    /// Set when the link went down: its WAN routing is re-read at the next refresh.
    needs_refresh: bool,
}

/// What differs between the ends.
enum Ends {
    Site {
        links: Vec<SiteLink>,
    },
    Hub {
        socket: UdpSocket,
        port: u16,
        sessions: Box<HubSessions>,
    },
}

/// One configured peer and its bond.
struct Peer {
    config: PeerConfig,
    bond: Bond,
    rx_source_drops: u64,
}

/// A control request and where its answer goes.
struct ControlMsg {
    request: Request,
    reply: oneshot::Sender<Reply>,
}

/// What woke the loop.
enum Wake {
    Stop(&'static str),
    Tun(io::Result<usize>),
    Net(usize, io::Result<(usize, SocketAddr)>),
    Control(Option<ControlMsg>),
    Accept(io::Result<UnixStream>),
    WanChanged(Option<()>),
    Timer,
}

struct Daemon {
    config: Config,
    started: Instant,
    tun: Option<std::sync::Arc<tun_rs::AsyncDevice>>,
    net: Option<AppliedNet>,
    ends: Ends,
    peers: Vec<Peer>,
    routes: AllowedIps,
    listener: UnixListener,
    socket_path: PathBuf,
    ctl_tx: mpsc::Sender<ControlMsg>,
    ctl_rx: mpsc::Receiver<ControlMsg>,
    drops: InterfaceDrops,
    next_tick: Instant,
    next_refresh: Instant,
    /// Site: one message per settled burst of WAN changes (DHCP renew, modem reconnect).
    wan_changes: Option<mpsc::Receiver<()>>,
    wan_watcher: Option<tokio::task::JoinHandle<()>>,
    rr: usize,
    tun_buf: Vec<u8>,
    net_buf: Vec<u8>,
    out_buf: Vec<u8>,
    plain: Vec<u8>,
}

impl Daemon {
    async fn start(config: Config) -> Result<Self, String> {
        let name = config.name.clone();
        let socket_path = control::socket_path(&name);
        prepare_run_dir(&socket_path)?;
        if std::os::unix::net::UnixStream::connect(&socket_path).is_ok() {
            return Err(format!("`{name}` is already up"));
        }
        // Nothing changes on the system before every name resolves.
        let endpoints = resolve_endpoints(&config).await?;
        run_hooks("pre_up", &config.interface.pre_up, &name)?;

        let tun = tun_rs::DeviceBuilder::new()
            .name(&name)
            .mtu(config.interface.mtu)
            .build_async()
            .map_err(|e| format!("cannot create TUN device `{name}`: {e}"))?;
        let net = match netcfg::apply(&net_plan(&config)).await {
            Ok(net) => net,
            Err(e) => return Err(e.to_string()),
        };
        for w in net.warnings() {
            warn!("{w}");
        }
        let ends = match open_sockets(&config, &net, &endpoints) {
            Ok(ends) => ends,
            Err(e) => {
                undo_net(net).await;
                return Err(e);
            }
        };
        let _ = std::fs::remove_file(&socket_path);
        let listener = match bind_control(&socket_path) {
            Ok(l) => l,
            Err(e) => {
                drop(ends);
                undo_net(net).await;
                return Err(e);
            }
        };

        let now = Instant::now();
        let bond_id = rand::random::<u64>();
        let role = config.role();
        let mut routes = AllowedIps::new();
        let mut peers = Vec::new();
        for (i, p) in config.peers.iter().enumerate() {
            for net in &p.allowed_ips {
                routes.insert(*net, i);
            }
            let bond_config = config.bond.bond_config(role == Role::Site, bond_id);
            let mut bond = Bond::new(bond_config, now);
            if role == Role::Site {
                for (l, link) in config.links.iter().enumerate() {
                    bond.add_link(LinkId(l as u8), link.bond_link_config(), now);
                }
            }
            peers.push(Peer {
                config: p.clone(),
                bond,
                rx_source_drops: 0,
            });
        }
        let (ctl_tx, ctl_rx) = mpsc::channel(16);
        // The watcher runs in its own task: its settle wait must not be cut short by packets.
        let (wan_changes, wan_watcher) = match (&ends, net.wan_watcher()) {
            (Ends::Site { .. }, Ok(mut watcher)) => {
                let (tx, rx) = mpsc::channel(1);
                let task = tokio::spawn(async move {
                    while watcher.changed(WAN_SETTLE).await {
                        // A full channel already holds a pending refresh.
                        let _ = tx.try_send(());
                    }
                });
                (Some(rx), Some(task))
            }
            (Ends::Site { .. }, Err(e)) => {
                warn!(
                    "cannot watch the WANs for changes (refreshing every {} s): {e}",
                    LINK_REFRESH.as_secs()
                );
                (None, None)
            }
            (Ends::Hub { .. }, _) => (None, None),
        };
        let mut daemon = Self {
            config,
            started: now,
            tun: Some(std::sync::Arc::new(tun)),
            net: Some(net),
            ends,
            peers,
            routes,
            listener,
            socket_path,
            ctl_tx,
            ctl_rx,
            drops: InterfaceDrops::default(),
            next_tick: now,
            next_refresh: now + LINK_REFRESH,
            wan_changes,
            wan_watcher,
            rr: 0,
            tun_buf: vec![0; MAX_BUF],
            net_buf: vec![0; MAX_BUF],
            out_buf: vec![0; MAX_BUF],
            plain: Vec::with_capacity(MAX_BUF),
        };
        if let Err(e) = run_hooks("post_up", &daemon.config.interface.post_up, &name) {
            let _ = daemon.shutdown().await;
            return Err(e);
        }
        Ok(daemon)
    }

    /// The event loop; returns on `down` or a signal.
    async fn run(&mut self, signals: &mut Signals) -> Result<(), String> {
        let Some(tun) = self.tun.clone() else {
            return Err("no TUN device".into());
        };
        loop {
            let deadline = self.next_deadline();
            let start = self.rr;
            let wake = tokio::select! {
                _ = signals.term.recv() => Wake::Stop("SIGTERM"),
                _ = signals.int.recv() => Wake::Stop("SIGINT"),
                m = self.ctl_rx.recv() => Wake::Control(m),
                a = self.listener.accept() => Wake::Accept(a.map(|(s, _)| s)),
                r = tun.recv(&mut self.tun_buf) => Wake::Tun(r),
                (i, r) = poll_fn(|cx| poll_recv_any(&self.ends, cx, &mut self.net_buf, start)) => {
                    Wake::Net(i, r)
                }
                c = recv_or_pending(&mut self.wan_changes) => Wake::WanChanged(c),
                _ = tokio::time::sleep_until(deadline.into()) => Wake::Timer,
            };
            let now = Instant::now();
            match wake {
                Wake::Stop(why) => {
                    info!("{why}: going down");
                    return Ok(());
                }
                Wake::Tun(Ok(n)) => {
                    self.on_tun_packet(n, now);
                    for _ in 1..BATCH {
                        match tun.try_recv(&mut self.tun_buf) {
                            Ok(n) => self.on_tun_packet(n, now),
                            Err(_) => break,
                        }
                    }
                }
                Wake::Tun(Err(e)) => {
                    error!("reading the TUN device: {e}");
                    return Err(format!("TUN device failed: {e}"));
                }
                Wake::Net(i, Ok((n, from))) => {
                    self.rr = i + 1;
                    self.on_datagram(i, n, from, now);
                    for _ in 1..BATCH {
                        match try_recv(&self.ends, i, &mut self.net_buf) {
                            Some((n, from)) => self.on_datagram(i, n, from, now),
                            None => break,
                        }
                    }
                }
                Wake::Net(i, Err(e)) => {
                    self.rr = i + 1;
                    debug!(socket = i, "receive error: {e}");
                }
                Wake::Control(Some(msg)) => {
                    let down = msg.request == Request::Down;
                    let reply = match msg.request {
                        Request::Show => Reply {
                            ok: true,
                            error: None,
                            status: Some(self.status(now)),
                        },
                        Request::Down => Reply {
                            ok: true,
                            ..Reply::default()
                        },
                    };
                    let _ = msg.reply.send(reply);
                    if down {
                        info!("down requested on the control socket");
                        return Ok(());
                    }
                }
                Wake::Control(None) => {}
                Wake::Accept(Ok(stream)) => {
                    tokio::spawn(serve_control(stream, self.ctl_tx.clone()));
                }
                Wake::Accept(Err(e)) => warn!("control socket accept: {e}"),
                Wake::WanChanged(Some(())) => {
                    debug!("WAN configuration changed");
                    self.next_refresh = now;
                }
                Wake::WanChanged(None) => {
                    warn!(
                        "the WAN watcher stopped; refreshing every {} s",
                        LINK_REFRESH.as_secs()
                    );
                    self.wan_changes = None;
                }
                Wake::Timer => {}
            }
            self.run_timers(now);
            self.drain(now);
            if now >= self.next_refresh {
                self.next_refresh = now + LINK_REFRESH;
                self.refresh_links().await;
            }
        }
    }

    /// The earliest of the WireGuard tick and every bond's timer.
    fn next_deadline(&self) -> Instant {
        self.peers
            .iter()
            .filter_map(|p| p.bond.poll_timeout())
            .fold(self.next_tick.min(self.next_refresh), Instant::min)
    }

    fn run_timers(&mut self, now: Instant) {
        for p in &mut self.peers {
            if p.bond.poll_timeout().is_some_and(|t| t <= now) {
                p.bond.handle_timeout(now);
            }
        }
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + TIMER_TICK;
        let drops = &mut self.drops;
        match &mut self.ends {
            Ends::Site { links } => {
                for l in links.iter_mut() {
                    let (socket, endpoint) = (&l.socket, l.endpoint);
                    l.tunnel.update_timers(&mut self.out_buf, &mut |d| {
                        send_udp(socket, d, endpoint, drops);
                    });
                }
            }
            Ends::Hub {
                socket, sessions, ..
            } => {
                sessions.update_timers(now, &mut self.out_buf, &mut |to, d| {
                    send_udp(socket, d, to, drops);
                });
            }
        }
        self.hub_events(now);
    }

    /// A packet from TUN: to the bond of the peer whose allowed IPs hold its destination.
    fn on_tun_packet(&mut self, n: usize, now: Instant) {
        let packet = &self.tun_buf[..n];
        match packet_destination(packet).and_then(|d| self.routes.lookup(d)) {
            Some(p) => self.peers[p].bond.handle_outbound(packet, now),
            None => self.drops.tx_no_route += 1,
        }
    }

    /// A datagram from socket `i`.
    fn on_datagram(&mut self, i: usize, n: usize, from: SocketAddr, now: Instant) {
        let datagram = &self.net_buf[..n];
        let drops = &mut self.drops;
        match &mut self.ends {
            Ends::Site { links } => {
                let Some(l) = links.get_mut(i) else { return };
                let (socket, endpoint) = (&l.socket, l.endpoint);
                let result = l
                    .tunnel
                    .decapsulate(None, datagram, &mut self.out_buf, &mut |d| {
                        send_udp(socket, d, endpoint, drops);
                    });
                let link = LinkId(i as u8);
                match result {
                    Ok(Received::Plaintext(len)) => {
                        let _ = self.peers[0]
                            .bond
                            .handle_inbound(link, &self.out_buf[..len], now);
                    }
                    Ok(Received::Handshake) => {
                        // A new WireGuard session may be a new hub session: name the link
                        // again so the hub can bind it.
                        self.peers[0].bond.rehello(link, now);
                    }
                    Ok(_) => {}
                    Err(e) => debug!(link = %l.name, %from, "rejected datagram: {e}"),
                }
            }
            Ends::Hub {
                socket, sessions, ..
            } => {
                let inbound = sessions.handle_datagram(
                    from,
                    datagram,
                    now,
                    &mut self.out_buf,
                    &mut |to, d| {
                        send_udp(socket, d, to, drops);
                    },
                );
                // Links named by a hello are added before their traffic reaches the bond.
                self.hub_events(now);
                if let Some(inb) = inbound {
                    if let Some(p) = self.peers.get_mut(inb.peer) {
                        let _ = p
                            .bond
                            .handle_inbound(inb.link, &self.out_buf[..inb.len], now);
                    }
                }
            }
        }
    }

    /// Applies the hub's session events to the peers' bonds.
    fn hub_events(&mut self, now: Instant) {
        let Ends::Hub { sessions, .. } = &mut self.ends else {
            return;
        };
        while let Some(ev) = sessions.poll_event() {
            match ev {
                HubEvent::Bound {
                    peer,
                    link,
                    hello,
                    endpoint,
                } => {
                    let Some(p) = self.peers.get_mut(peer) else {
                        continue;
                    };
                    info!(
                        peer = %peer_label(&p.config),
                        link = %hello.name,
                        id = link.0,
                        endpoint = %endpoint,
                        "link joined"
                    );
                    p.bond.add_link(
                        link,
                        bond::LinkConfig {
                            name: hello.name.clone(),
                            ..bond::LinkConfig::default()
                        },
                        now,
                    );
                }
                HubEvent::Unbound { peer, link } => {
                    if let Some(p) = self.peers.get_mut(peer) {
                        info!(peer = %peer_label(&p.config), id = link.0, "link gone (idle)");
                        p.bond.remove_link(link, now);
                    }
                }
                HubEvent::Roamed {
                    peer,
                    link,
                    endpoint,
                } => {
                    if let Some(p) = self.peers.get(peer) {
                        info!(peer = %peer_label(&p.config), id = link.0, endpoint = %endpoint, "link moved");
                    }
                }
            }
        }
    }

    /// Sends what the bonds want sent, writes what they deliver, logs their events.
    fn drain(&mut self, now: Instant) {
        for p in 0..self.peers.len() {
            while let Some(t) = self.peers[p].bond.poll_transmit(now, &mut self.plain) {
                self.transmit(p, t.link);
            }
            while self.peers[p].bond.poll_deliver(&mut self.plain) {
                self.deliver(p);
            }
            while let Some(ev) = self.peers[p].bond.poll_event() {
                self.on_bond_event(p, ev);
            }
        }
    }

    /// Encrypts `self.plain` for `peer` on `link` and sends it.
    fn transmit(&mut self, peer: usize, link: LinkId) {
        let drops = &mut self.drops;
        match &mut self.ends {
            Ends::Site { links } => {
                let Some(l) = links.get_mut(usize::from(link.0)) else {
                    return;
                };
                if !l.tunnel.is_established() {
                    // No session: start one, drop the packet. Queued inside boringtun it would
                    // leave seconds late and spoil the link's RTT samples; the bond sees the
                    // loss, and repeats its hello once the handshake completes.
                    if let Some(d) = l.tunnel.start_handshake(&mut self.out_buf) {
                        send_udp(&l.socket, d, l.endpoint, drops);
                    }
                    drops.no_session_tx += 1;
                    return;
                }
                match l.tunnel.encapsulate(&self.plain, &mut self.out_buf) {
                    Ok(Some(d)) => send_udp(&l.socket, d, l.endpoint, drops),
                    Ok(None) => {}
                    Err(e) => debug!(link = %l.name, "cannot encapsulate: {e}"),
                }
            }
            Ends::Hub {
                socket, sessions, ..
            } => match sessions.encapsulate(peer, link, &self.plain, &mut self.out_buf) {
                Ok(Some((to, d))) => send_udp(socket, d, to, drops),
                Ok(None) => {}
                Err(e) => debug!(peer, link = link.0, "cannot encapsulate: {e}"),
            },
        }
    }

    /// Writes the inner packet in `self.plain`, delivered by `peer`'s bond, to TUN, if its
    /// source belongs to that peer.
    fn deliver(&mut self, peer: usize) {
        let packet = &self.plain[..];
        let owner = packet_source(packet).and_then(|s| self.routes.lookup(s));
        if owner != Some(peer) {
            self.peers[peer].rx_source_drops += 1;
            return;
        }
        if let Some(tun) = &self.tun {
            if tun.try_send(packet).is_err() {
                self.drops.tun_write += 1;
            }
        }
    }

    fn on_bond_event(&mut self, peer: usize, ev: Event) {
        let label = peer_label(&self.peers[peer].config);
        let link_name = |id: LinkId| -> String {
            match &self.ends {
                Ends::Site { links } => links
                    .get(usize::from(id.0))
                    .map_or_else(|| id.0.to_string(), |l| l.name.clone()),
                Ends::Hub { .. } => id.0.to_string(),
            }
        };
        match ev {
            Event::LinkState { link, state } => {
                let name = link_name(link);
                match state {
                    LinkState::Down => warn!(peer = %label, link = %name, "link down"),
                    _ => {
                        info!(peer = %label, link = %name, state = state_name(Some(state)), "link state")
                    }
                }
                if state == LinkState::Down {
                    if let Ends::Site { links } = &mut self.ends {
                        if let Some(l) = links.get_mut(usize::from(link.0)) {
                            l.needs_refresh = true;
                            // Re-read its WAN routing soon, not in 10 s.
                            self.next_refresh = self
                                .next_refresh
                                .min(Instant::now() + Duration::from_secs(1));
                        }
                    }
                }
            }
            Event::Hello { link, hello } => {
                debug!(peer = %label, id = link.0, name = %hello.name, "hello");
            }
            Event::HelloAcked { link } => {
                info!(peer = %label, link = %link_name(link), "link registered with the hub");
            }
        }
    }

    /// Re-reads the WAN gateways of the site's links (after a WAN change notification, when a
    /// link went down, and every [`LINK_REFRESH`]).
    async fn refresh_links(&mut self) {
        let (Ends::Site { links }, Some(net)) = (&mut self.ends, self.net.as_mut()) else {
            return;
        };
        for (i, l) in links.iter_mut().enumerate() {
            let before = net.links().get(i).cloned();
            match net.refresh_link(i).await {
                Ok(now) => {
                    if before.as_ref() != Some(&now) {
                        info!(link = %l.name, v4 = ?now.v4, v6 = ?now.v6, "link routing updated");
                        // The path may be back: handshake now rather than after the retry timer.
                        if let Some(d) = l.tunnel.retry_handshake(&mut self.out_buf) {
                            send_udp(&l.socket, d, l.endpoint, &mut self.drops);
                        }
                    }
                }
                Err(e) => {
                    if l.needs_refresh {
                        warn!(link = %l.name, "cannot refresh the link's routing: {e}");
                    }
                }
            }
            l.needs_refresh = false;
        }
    }

    /// The `show` answer.
    fn status(&self, now: Instant) -> InterfaceStatus {
        let public = keys::public_from_private(&self.config.interface.private_key);
        let mut drops = self.drops.clone();
        let (role, listen_port) = match &self.ends {
            Ends::Site { links } => {
                for l in links {
                    let c = l.tunnel.counters();
                    drops.malformed += c.rx_bad;
                    drops.unauthenticated += c.rx_unauthenticated;
                    drops.replayed += c.rx_replayed;
                    drops.rate_limited += c.rx_rate_limited;
                }
                ("site", None)
            }
            Ends::Hub { sessions, port, .. } => {
                let c = sessions.counters();
                drops.malformed += c.malformed;
                drops.unauthenticated += c.unauthenticated;
                drops.replayed += c.replayed;
                drops.unknown_peer += c.unknown_peer;
                drops.no_session += c.no_session;
                drops.unbound += c.unbound;
                drops.rate_limited += c.rate_limited;
                ("hub", Some(*port))
            }
        };
        let hub_sessions = match &self.ends {
            Ends::Hub { sessions, .. } => sessions.sessions(),
            Ends::Site { .. } => Vec::new(),
        };
        let peers = self
            .peers
            .iter()
            .enumerate()
            .map(|(pi, p)| {
                let links: Vec<LinkStatus> = p
                    .bond
                    .link_stats()
                    .into_iter()
                    .map(|(id, s)| {
                        let mut ls = link_status(id, &s);
                        match &self.ends {
                            Ends::Site { links } => {
                                if let Some(l) = links.get(usize::from(id.0)) {
                                    ls.endpoint = Some(l.endpoint.to_string());
                                    ls.bind = Some(l.bind.clone());
                                    ls.latest_handshake_secs =
                                        l.tunnel.time_since_handshake().map(|d| d.as_secs());
                                    let c = l.tunnel.counters();
                                    ls.handshakes = c.handshakes;
                                    ls.rx_rejected =
                                        c.rx_bad + c.rx_unauthenticated + c.rx_replayed;
                                }
                            }
                            Ends::Hub { .. } => {
                                if let Some(si) = hub_sessions
                                    .iter()
                                    .find(|si| si.peer == pi && si.link == Some(id))
                                {
                                    ls.endpoint = Some(canonical(si.endpoint).to_string());
                                    ls.latest_handshake_secs =
                                        si.since_handshake.map(|d| d.as_secs());
                                    ls.handshakes = si.counters.handshakes;
                                    ls.rx_rejected = si.counters.rx_bad
                                        + si.counters.rx_unauthenticated
                                        + si.counters.rx_replayed;
                                }
                            }
                        }
                        ls
                    })
                    .collect();
                let b = p.bond.stats();
                PeerStatus {
                    public_key: keys::encode(&p.config.public_key),
                    name: p.config.name.clone(),
                    endpoint: p.config.endpoint.clone(),
                    allowed_ips: p.config.allowed_ips.iter().map(|n| n.to_string()).collect(),
                    latest_handshake_secs: links
                        .iter()
                        .filter_map(|l| l.latest_handshake_secs)
                        .min(),
                    tx_bytes: links.iter().map(|l| l.tx_bytes).sum(),
                    rx_bytes: links.iter().map(|l| l.rx_bytes).sum(),
                    rx_source_drops: p.rx_source_drops,
                    bond: BondStatus {
                        sent_packets: b.sent_packets,
                        send_drops: b.send_drops,
                        delivered_packets: b.delivered_packets,
                        rx_duplicates: b.rx_duplicates,
                        reorder_skips: b.reorder_skips,
                        reorder_late: b.reorder_late,
                        malformed: b.malformed,
                        reorder_timeout_ms: ms(b.reorder_timeout),
                    },
                    links,
                }
            })
            .collect();
        InterfaceStatus {
            name: self.config.name.clone(),
            role: role.into(),
            public_key: keys::encode(&public),
            listen_port,
            mode: mode_name(self.config.bond.mode).into(),
            pid: std::process::id(),
            uptime_secs: now.saturating_duration_since(self.started).as_secs(),
            drops,
            peers,
        }
    }

    /// Removes everything `start` added, newest first. Every step runs even if one fails.
    async fn shutdown(&mut self) -> Result<(), String> {
        let name = self.config.name.clone();
        let mut errors = Vec::new();
        if let Err(e) = run_hooks("pre_down", &self.config.interface.pre_down, &name) {
            errors.push(e);
        }
        if let Some(task) = self.wan_watcher.take() {
            task.abort();
        }
        // Close the sockets first: nothing may leave once the link routing is gone.
        self.ends = Ends::Site { links: Vec::new() };
        if let Some(net) = self.net.take() {
            if let Err(e) = net.teardown().await {
                errors.push(e.to_string());
            }
        }
        // Closing the (non-persistent) TUN device removes it.
        self.tun = None;
        let _ = std::fs::remove_file(&self.socket_path);
        if let Err(e) = run_hooks("post_down", &self.config.interface.post_down, &name) {
            errors.push(e);
        }
        if errors.is_empty() {
            info!(interface = %name, "down");
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

/// The next message of an optional channel; never ready without one.
async fn recv_or_pending<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Polls every socket for a datagram, starting at `start` so no socket starves the others.
fn poll_recv_any(
    ends: &Ends,
    cx: &mut Context<'_>,
    buf: &mut [u8],
    start: usize,
) -> Poll<(usize, io::Result<(usize, SocketAddr)>)> {
    let mut poll_one = |i: usize, socket: &UdpSocket| {
        let mut rb = ReadBuf::new(buf);
        match socket.poll_recv_from(cx, &mut rb) {
            Poll::Ready(Ok(from)) => Poll::Ready((i, Ok((rb.filled().len(), from)))),
            Poll::Ready(Err(e)) => Poll::Ready((i, Err(e))),
            Poll::Pending => Poll::Pending,
        }
    };
    match ends {
        Ends::Site { links } => {
            let n = links.len();
            for k in 0..n {
                let i = (start + k) % n;
                if let Poll::Ready(r) = poll_one(i, &links[i].socket) {
                    return Poll::Ready(r);
                }
            }
            Poll::Pending
        }
        Ends::Hub { socket, .. } => poll_one(0, socket),
    }
}

/// One more datagram from socket `i` if one is waiting.
fn try_recv(ends: &Ends, i: usize, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
    let socket = match ends {
        Ends::Site { links } => &links.get(i)?.socket,
        Ends::Hub { socket, .. } => socket,
    };
    socket.try_recv_from(buf).ok()
}

/// Sends without waiting; a full buffer or an unreachable network drops the datagram (as a
/// router would) and counts it.
fn send_udp(socket: &UdpSocket, datagram: &[u8], to: SocketAddr, drops: &mut InterfaceDrops) {
    if let Err(e) = socket.try_send_to(datagram, to) {
        drops.udp_send += 1;
        if e.kind() != io::ErrorKind::WouldBlock {
            debug!(%to, "send: {e}");
        }
    }
}

/// Serves one control connection: one request line, one answer line. After `down` the
/// connection stays open until the process exits, so the client sees EOF only when the
/// teardown is complete.
async fn serve_control(stream: UnixStream, tx: mpsc::Sender<ControlMsg>) {
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read.take(control::MAX_REQUEST as u64));
    let mut line = String::new();
    let read = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
    if !matches!(read, Ok(Ok(n)) if n > 0) {
        return;
    }
    let (reply, down) = match serde_json::from_str::<Request>(line.trim()) {
        Ok(request) => {
            let (reply_tx, reply_rx) = oneshot::channel();
            let msg = ControlMsg {
                request,
                reply: reply_tx,
            };
            let reply = if tx.send(msg).await.is_ok() {
                reply_rx
                    .await
                    .unwrap_or_else(|_| refusal("the daemon is going down"))
            } else {
                refusal("the daemon is going down")
            };
            (reply, request == Request::Down)
        }
        Err(e) => (refusal(&format!("bad request: {e}")), false),
    };
    let Ok(mut text) = serde_json::to_string(&reply) else {
        return;
    };
    text.push('\n');
    if write.write_all(text.as_bytes()).await.is_err() {
        return;
    }
    if down {
        std::future::pending::<()>().await;
    }
}

fn refusal(error: &str) -> Reply {
    Reply {
        ok: false,
        error: Some(error.into()),
        status: None,
    }
}

/// Creates the run directory (root only) and removes a stale socket of a dead daemon.
fn prepare_run_dir(socket_path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let Some(dir) = socket_path.parent() else {
        return Err(format!("bad control socket path {}", socket_path.display()));
    };
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot restrict {}: {e}", dir.display()))?;
    Ok(())
}

fn bind_control(path: &std::path::Path) -> Result<UnixListener, String> {
    use std::os::unix::fs::PermissionsExt as _;
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot create the control socket {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {}: {e}", path.display()))?;
    Ok(listener)
}

/// Resolves each site link's endpoint (a family matching its bind address), before anything
/// is changed. Hub: nothing to resolve.
async fn resolve_endpoints(config: &Config) -> Result<Vec<SocketAddr>, String> {
    let mut out = Vec::new();
    for link in &config.links {
        let Some(text) = config.link_endpoint(link) else {
            return Err(format!("link `{}` has no endpoint", link.name));
        };
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(text)
            .await
            .map_err(|e| {
                format!(
                    "link `{}`: cannot resolve endpoint `{text}`: {e}",
                    link.name
                )
            })?
            .collect();
        let pick = match &link.bind {
            LinkBind::Address(a) => addrs.iter().find(|s| s.is_ipv4() == a.is_ipv4()),
            // Prefer IPv4: WANs (LTE, satellite) more often have it than IPv6.
            LinkBind::Interface(_) => addrs.iter().find(|s| s.is_ipv4()).or(addrs.first()),
        };
        let Some(&addr) = pick else {
            return Err(format!(
                "link `{}`: endpoint `{text}` has no address of the bind address's family",
                link.name
            ));
        };
        out.push(addr);
    }
    Ok(out)
}

/// What the kernel configuration needs from the config.
fn net_plan(config: &Config) -> NetPlan {
    NetPlan {
        tun_name: config.name.clone(),
        addresses: config.interface.addresses.clone(),
        mtu: u32::from(config.interface.mtu),
        allowed_ips: config
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().copied())
            .collect(),
        table: match config.interface.table {
            RouteTable::Auto => RouteTableSetting::Auto,
            RouteTable::Off => RouteTableSetting::Off,
            RouteTable::Id(t) => RouteTableSetting::Id(t),
        },
        fwmark: config.interface.fwmark,
        links: config
            .links
            .iter()
            .map(|l| WanLinkPlan {
                name: l.name.clone(),
                bind: match &l.bind {
                    LinkBind::Interface(i) => WanBind::Interface(i.clone()),
                    LinkBind::Address(a) => WanBind::Address(*a),
                },
                gateway: l.gateway,
            })
            .collect(),
    }
}

/// Opens the site's link sockets (bound, marked) or the hub's listening socket.
fn open_sockets(
    config: &Config,
    net: &AppliedNet,
    endpoints: &[SocketAddr],
) -> Result<Ends, String> {
    let keys_for = |p: &PeerConfig| TunnelKeys {
        private_key: config.interface.private_key,
        peer_public_key: p.public_key,
        preshared_key: p.preshared_key,
        persistent_keepalive: p.persistent_keepalive,
    };
    match config.role() {
        Role::Site => {
            let Some(peer) = config.peers.first() else {
                return Err("a site needs a peer".into());
            };
            let keys = keys_for(peer);
            let mut links = Vec::new();
            for (i, (link, &endpoint)) in config.links.iter().zip(endpoints).enumerate() {
                let mark = net.links().get(i).map(|r| r.mark);
                let socket = link_socket(&link.bind, endpoint, mark).map_err(|e| {
                    format!("link `{}`: cannot open its UDP socket: {e}", link.name)
                })?;
                // Distinct random indexes: the hub tells our links apart by them.
                let index = loop {
                    let i = rand::random::<u32>() & crate::tunnel::MAX_INDEX;
                    if !links.iter().any(|l: &SiteLink| l.tunnel.index() == i) {
                        break i;
                    }
                };
                let tunnel = LinkTunnel::new(&keys, index, None)?;
                links.push(SiteLink {
                    name: link.name.clone(),
                    bind: match &link.bind {
                        LinkBind::Interface(i) => i.clone(),
                        LinkBind::Address(a) => a.to_string(),
                    },
                    endpoint,
                    socket,
                    tunnel,
                    needs_refresh: false,
                });
            }
            Ok(Ends::Site { links })
        }
        Role::Hub => {
            let Some(port) = config.interface.listen_port else {
                return Err("a hub needs listen_port".into());
            };
            let mark = net.fwmark().or(config.interface.fwmark);
            let socket = hub_socket(port, mark)
                .map_err(|e| format!("cannot listen on UDP port {port}: {e}"))?;
            let peers = config.peers.iter().map(keys_for).collect();
            Ok(Ends::Hub {
                socket,
                port,
                sessions: Box::new(HubSessions::new(&config.interface.private_key, peers)),
            })
        }
    }
}

fn tune(socket: &Socket, mark: Option<u32>) -> io::Result<()> {
    if let Some(m) = mark {
        socket.set_mark(m)?;
    }
    // Bigger buffers absorb bursts; failure only costs throughput.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.set_nonblocking(true)
}

/// A site link's socket: bound to its WAN device or address, marked for its routing table,
/// not connected (a connected socket keeps its source address across a DHCP renew).
fn link_socket(bind: &LinkBind, endpoint: SocketAddr, mark: Option<u32>) -> io::Result<UdpSocket> {
    let domain = Domain::for_address(endpoint);
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    tune(&socket, mark)?;
    let local = match bind {
        LinkBind::Interface(dev) => {
            socket.bind_device(Some(dev.as_bytes()))?;
            let any: IpAddr = if endpoint.is_ipv4() {
                Ipv4Addr::UNSPECIFIED.into()
            } else {
                Ipv6Addr::UNSPECIFIED.into()
            };
            SocketAddr::new(any, 0)
        }
        LinkBind::Address(a) => {
            if a.is_ipv4() != endpoint.is_ipv4() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("bind address {a} and endpoint {endpoint} are of different families"),
                ));
            }
            SocketAddr::new(*a, 0)
        }
    };
    socket.bind(&local.into())?;
    UdpSocket::from_std(socket.into())
}

/// The hub's socket: dual-stack `[::]:port`, or `0.0.0.0:port` where IPv6 is off.
fn hub_socket(port: u16, mark: Option<u32>) -> io::Result<UdpSocket> {
    let v6 = (|| {
        let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_only_v6(false)?;
        tune(&s, mark)?;
        s.bind(&SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port).into())?;
        Ok::<_, io::Error>(s)
    })();
    let socket = match v6 {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(e),
        Err(_) => {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            tune(&s, mark)?;
            s.bind(&SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port).into())?;
            s
        }
    };
    UdpSocket::from_std(socket.into())
}

async fn undo_net(net: AppliedNet) {
    if let Err(e) = net.teardown().await {
        error!("undoing the network configuration: {e}");
    }
}

/// Runs wg-quick style hooks (`%i` is the interface name) with `sh -c`; the first failure
/// stops the list.
fn run_hooks(stage: &str, commands: &[String], name: &str) -> Result<(), String> {
    for cmd in commands {
        let cmd = cmd.replace("%i", name);
        info!(stage, command = %cmd, "hook");
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .stdin(std::process::Stdio::null())
            .status()
            .map_err(|e| format!("{stage} hook `{cmd}`: cannot run sh: {e}"))?;
        if !status.success() {
            return Err(format!("{stage} hook `{cmd}` failed ({status})"));
        }
    }
    Ok(())
}

/// Tells systemd (Type=notify) about our state, if it is listening.
fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt as _;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let addr = match bytes.strip_prefix(b"@") {
        Some(abstract_name) => std::os::unix::net::SocketAddr::from_abstract_name(abstract_name),
        None => std::os::unix::net::SocketAddr::from_pathname(std::path::Path::new(&path)),
    };
    if let Ok(addr) = addr {
        let _ = sock.send_to_addr(state.as_bytes(), &addr);
    }
}

fn peer_label(p: &PeerConfig) -> String {
    p.name
        .clone()
        .unwrap_or_else(|| keys::encode(&p.public_key))
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mode_name(m: bond::Mode) -> &'static str {
    match m {
        bond::Mode::Auto => "auto",
        bond::Mode::Stripe => "stripe",
        bond::Mode::Duplicate => "duplicate",
        bond::Mode::Failover => "failover",
    }
}

fn state_name(s: Option<LinkState>) -> &'static str {
    match s {
        None | Some(LinkState::Probing) => "probing",
        Some(LinkState::Up) => "up",
        Some(LinkState::Degraded) => "degraded",
        Some(LinkState::Down) => "down",
    }
}

fn link_status(id: LinkId, s: &bond::LinkStats) -> LinkStatus {
    LinkStatus {
        id: id.0,
        name: s.name.clone(),
        state: state_name(s.state).into(),
        rtt_ms: s.srtt.map(ms),
        min_rtt_ms: s.min_rtt.map(ms),
        jitter_ms: s.rttvar.map(ms),
        loss: s.loss,
        rate_bps: s.est_rate_bps,
        pacing_rate_bps: s.pacing_rate_bps,
        tx_packets: s.tx_packets,
        tx_bytes: s.tx_bytes,
        tx_duplicates: s.tx_duplicates,
        rx_packets: s.rx_packets,
        rx_bytes: s.rx_bytes,
        queue_drops: s.queue_drops,
        ..LinkStatus::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn client(stream: UnixStream, line: &str) -> (String, tokio::io::BufReader<UnixStream>) {
        let mut reader = tokio::io::BufReader::new(stream);
        reader.get_mut().write_all(line.as_bytes()).await.unwrap();
        let mut answer = String::new();
        reader.read_line(&mut answer).await.unwrap();
        (answer, reader)
    }

    #[tokio::test]
    async fn control_show_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let server = tokio::spawn(serve_control(b, tx));
        let answer = tokio::spawn(client(a, "{\"cmd\":\"show\"}\n"));
        let msg = rx.recv().await.unwrap();
        assert_eq!(msg.request, Request::Show);
        let status = InterfaceStatus {
            name: "t0".into(),
            ..InterfaceStatus::default()
        };
        msg.reply
            .send(Reply {
                ok: true,
                error: None,
                status: Some(status.clone()),
            })
            .unwrap();
        let (line, _) = answer.await.unwrap();
        let reply: Reply = serde_json::from_str(&line).unwrap();
        assert_eq!(reply.status, Some(status));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn control_rejects_bad_requests() {
        let (a, b) = UnixStream::pair().unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let server = tokio::spawn(serve_control(b, tx));
        let (line, _) = client(a, "{\"cmd\":\"reboot\"}\n").await;
        let reply: Reply = serde_json::from_str(&line).unwrap();
        assert!(!reply.ok);
        assert!(reply.error.unwrap().starts_with("bad request"));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn down_holds_the_connection_until_the_daemon_is_gone() {
        let (a, b) = UnixStream::pair().unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let server = tokio::spawn(serve_control(b, tx));
        let answer = tokio::spawn(client(a, "{\"cmd\":\"down\"}\n"));
        let msg = rx.recv().await.unwrap();
        assert_eq!(msg.request, Request::Down);
        msg.reply
            .send(Reply {
                ok: true,
                ..Reply::default()
            })
            .unwrap();
        let (line, mut reader) = answer.await.unwrap();
        assert!(serde_json::from_str::<Reply>(&line).unwrap().ok);
        // Still open while the "teardown" runs...
        let mut rest = Vec::new();
        let pending =
            tokio::time::timeout(Duration::from_millis(100), reader.read_to_end(&mut rest)).await;
        assert!(
            pending.is_err(),
            "connection closed before the daemon exited"
        );
        // ...and EOF once the daemon (here: the serving task) is gone.
        server.abort();
        let eof = tokio::time::timeout(Duration::from_secs(2), reader.read_to_end(&mut rest)).await;
        assert!(matches!(eof, Ok(Ok(0))));
    }

    #[tokio::test]
    async fn a_daemon_going_down_refuses_requests() {
        let (a, b) = UnixStream::pair().unwrap();
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let server = tokio::spawn(serve_control(b, tx));
        let (line, _) = client(a, "{\"cmd\":\"show\"}\n").await;
        let reply: Reply = serde_json::from_str(&line).unwrap();
        assert_eq!(reply.error.as_deref(), Some("the daemon is going down"));
        server.await.unwrap();
    }
}
