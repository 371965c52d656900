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

mod control_server;
mod reload;
mod sockets;
mod status;

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use tokio::net::{UdpSocket, UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use super::allowed_ips::{packet_destination, packet_source, AllowedIps};
use super::control::{self, InterfaceDrops, Reply, Request};
use super::dns;
use super::hooks::{self, HookStage};
use super::metrics::{MetricsServer, MetricsSnapshot};
use super::netcfg::{self, AppliedNet, NetPlan, RouteTableSetting, WanBind, WanLinkPlan};
use super::systemd;
use crate::bond::{self, Bond, Event, LinkId, LinkState};
use crate::config::{Config, LinkBind, PeerConfig, Role, RouteTable};
use crate::keys;
use crate::tunnel::hub::{HubEvent, HubSessions};
use crate::tunnel::{LinkTunnel, Received, MAX_BUF, TIMER_TICK};
use control_server::{bind_control, prepare_run_dir, serve_control};
use sockets::{open_sockets, poll_recv_any, resolve_endpoints, send_udp, try_recv};
use status::state_name;

/// Packets read per wake-up before the bonds are drained (amortises the drain).
const BATCH: usize = 64;
/// Rest after a failed accept on the control socket.
const ACCEPT_PAUSE: Duration = Duration::from_millis(250);
/// How often the site re-reads its WANs' gateways even without a netlink notification (a
/// safety net; WAN changes are normally seen at once through [`netcfg::WanWatcher`]).
const LINK_REFRESH: Duration = Duration::from_secs(60);
/// Quiet time after a burst of WAN notifications before the links are refreshed.
const WAN_SETTLE: Duration = Duration::from_millis(300);
/// UDP socket buffer size asked for (the kernel caps it at net.core.*mem_max).
const SOCKET_BUFFER: usize = 4 << 20;
/// How often the metrics snapshot (and systemd's status line) is refreshed.
const METRICS_REFRESH: Duration = Duration::from_secs(1);

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
        let mut daemon = match Daemon::start(config).await {
            Ok(d) => d,
            Err(e) => {
                // `systemctl status` (and `up` waiting on our notifications) shows the reason.
                systemd::notify_status(&e);
                return Err(e);
            }
        };
        daemon.refresh_metrics(Instant::now());
        systemd::notify_ready(&daemon.status_line());
        info!(interface = %daemon.config.name, "up");
        // A bug that panics in the loop must not leave routes and rules behind.
        let ran = match std::panic::AssertUnwindSafe(daemon.run(&mut signals))
            .catch_unwind()
            .await
        {
            Ok(r) => r,
            Err(_) => Err("internal error (panic) in the event loop".to_owned()),
        };
        systemd::notify_stopping();
        let down = daemon.shutdown().await;
        ran.and(down)
    })
}

/// SIGTERM, SIGINT and SIGHUP streams.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    /// `systemctl reload`: re-read the config.
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, String> {
        let sig = |kind| signal(kind).map_err(|e| format!("cannot catch signals: {e}"));
        Ok(Self {
            term: sig(SignalKind::terminate())?,
            int: sig(SignalKind::interrupt())?,
            hup: sig(SignalKind::hangup())?,
        })
    }
}

/// One site link: its session and its socket.
struct SiteLink {
    /// Its id in the bond and on the wire; kept across reloads (a new link gets a new id).
    id: LinkId,
    /// The link's section of the config it runs with (compared at a reload).
    config: crate::config::LinkConfig,
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
    /// Removed by a reload (hub): its index stays taken, it is no longer shown or routed to.
    removed: bool,
}

/// A control request and where its answer goes.
struct ControlMsg {
    request: Request,
    reply: oneshot::Sender<Reply>,
}

/// What woke the loop.
enum Wake {
    Stop(&'static str),
    Reload,
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
    /// After a failed accept (out of descriptors), the control socket rests until then
    /// instead of failing again at once in a busy loop.
    accept_pause: Option<Instant>,
    /// Site: one message per settled burst of WAN changes (DHCP renew, modem reconnect).
    wan_changes: Option<mpsc::Receiver<()>>,
    wan_watcher: Option<tokio::task::JoinHandle<()>>,
    rr: usize,
    watchdog: systemd::Watchdog,
    /// What `metrics_listen` serves, refreshed every [`METRICS_REFRESH`].
    metrics: Option<std::sync::Arc<std::sync::Mutex<MetricsSnapshot>>>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
    next_metrics: Instant,
    /// The last status line sent to systemd.
    status_sent: String,
    /// Random per daemon start; new bonds (hub peers added by a reload) get it too.
    bond_id: u64,
    /// Where the search for a new site link's id starts (ids of removed links are not reused
    /// while others are free).
    next_link_id: u8,
    /// Why the last reload was refused or incomplete; shown in systemd's status line.
    reload_note: Option<String>,
    /// `dns` was handed to resolvconf (removed again at teardown).
    dns_set: bool,
    tun_buf: Vec<u8>,
    net_buf: Vec<u8>,
    out_buf: Vec<u8>,
    plain: Vec<u8>,
}

/// An exclusive lock on the run directory's `start.lock`, held by a daemon from its leftover
/// sweep until its control socket is bound.
struct StartLock {
    /// Closing the file releases the lock.
    _file: std::fs::File,
}

impl StartLock {
    /// Waits up to 10 s for the lock; `None` if it cannot be had (then do not sweep).
    async fn acquire(own_socket: &std::path::Path) -> Option<Self> {
        use std::os::fd::AsRawFd as _;
        let path = own_socket.parent()?.join("start.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ok()?;
        for _ in 0..200 {
            // SAFETY: flock on a descriptor we own; no memory is passed.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Some(Self { _file: file });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        warn!(
            "{} is held for 10 s; leftovers of a crash are not swept",
            path.display()
        );
        None
    }
}

/// Removes the rules and routes (protocol 87) a wgbond that was killed or crashed left in this
/// network namespace, so that `up` after a crash works without manual cleanup. Skipped while
/// any other wgbond daemon answers on its control socket: they might be its objects.
async fn remove_leftovers(own_socket: &std::path::Path) {
    let Some(dir) = own_socket.parent() else {
        return;
    };
    let others_alive = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            let path = e.path();
            path != own_socket
                && path.extension().is_some_and(|x| x == "sock")
                && std::os::unix::net::UnixStream::connect(&path).is_ok()
        });
    if others_alive {
        return;
    }
    match netcfg::remove_leftovers().await {
        Ok((0, 0)) => {}
        Ok((rules, routes)) => warn!(
            rules,
            routes,
            "removed rules and routes (proto 87) left by a wgbond that did not shut down cleanly"
        ),
        Err(e) => warn!("{e}"),
    }
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
        hooks::run_async(
            HookStage::PreUp,
            config.interface.pre_up.clone(),
            name.clone(),
        )
        .await
        .map_err(|e| e.to_string())?;

        // Held until our control socket exists: a daemon starting beside us must see us as
        // alive before it sweeps leftovers, or it would take our new rules for them.
        let start_lock = StartLock::acquire(&socket_path).await;
        if start_lock.is_some() {
            remove_leftovers(&socket_path).await;
        }
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
        // tokio's `try_send_to` fails with WouldBlock until the reactor has seen a new socket
        // writable once: without this wait the first handshake initiation is dropped and
        // boringtun tries again only after 5 s.
        if let Ends::Site { links } = &ends {
            for l in links {
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(1), l.socket.writable())
                        .await;
            }
        }
        // Bound before READY, so a busy port fails `up` with a clear error.
        let metrics_server = match config.interface.metrics_listen {
            Some(addr) => match MetricsServer::bind(addr).await {
                Ok(server) => Some(server),
                Err(e) => {
                    drop(ends);
                    undo_net(net).await;
                    return Err(e.to_string());
                }
            },
            None => None,
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
        drop(start_lock);
        let (metrics, metrics_task) = match metrics_server {
            Some(server) => {
                let latest = std::sync::Arc::new(std::sync::Mutex::new(MetricsSnapshot::default()));
                let source = std::sync::Arc::clone(&latest);
                let task = tokio::spawn(
                    server.serve(move || source.lock().map(|s| s.clone()).unwrap_or_default()),
                );
                (Some(latest), Some(task))
            }
            None => (None, None),
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
                removed: false,
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
        let config_links = config.links.len();
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
            accept_pause: None,
            wan_changes,
            wan_watcher,
            rr: 0,
            watchdog: systemd::Watchdog::from_env(),
            metrics,
            metrics_task,
            next_metrics: now,
            status_sent: String::new(),
            bond_id,
            next_link_id: u8::try_from(config_links).unwrap_or(u8::MAX),
            reload_note: None,
            dns_set: false,
            tun_buf: vec![0; MAX_BUF],
            net_buf: vec![0; MAX_BUF],
            out_buf: vec![0; MAX_BUF],
            plain: Vec::with_capacity(MAX_BUF),
        };
        let dns = daemon.config.interface.dns.clone();
        if let Err(e) = daemon.set_dns(&dns).await {
            let _ = daemon.shutdown().await;
            return Err(e);
        }
        let post_up = daemon.config.interface.post_up.clone();
        if let Err(e) = hooks::run_async(HookStage::PostUp, post_up, name.clone()).await {
            let _ = daemon.shutdown().await;
            return Err(e.to_string());
        }
        Ok(daemon)
    }

    /// The event loop; returns on `down` or a signal.
    async fn run(&mut self, signals: &mut Signals) -> Result<(), String> {
        let Some(tun) = self.tun.clone() else {
            return Err("no TUN device".into());
        };
        loop {
            let mut deadline = self.next_deadline();
            if let Some(t) = self.accept_pause {
                deadline = deadline.min(t);
            }
            let accepting = self.accept_pause.is_none_or(|t| Instant::now() >= t);
            let start = self.rr;
            let wake = tokio::select! {
                _ = signals.term.recv() => Wake::Stop("SIGTERM"),
                _ = signals.int.recv() => Wake::Stop("SIGINT"),
                _ = signals.hup.recv() => Wake::Reload,
                m = self.ctl_rx.recv() => Wake::Control(m),
                a = self.listener.accept(), if accepting => Wake::Accept(a.map(|(s, _)| s)),
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
                Wake::Reload => self.reload().await,
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
                    self.accept_pause = None;
                    tokio::spawn(serve_control(stream, self.ctl_tx.clone()));
                }
                Wake::Accept(Err(e)) => {
                    if self.accept_pause.is_none() {
                        warn!(
                            "control socket accept: {e}; retrying every {} ms",
                            ACCEPT_PAUSE.as_millis()
                        );
                    }
                    self.accept_pause = Some(now + ACCEPT_PAUSE);
                }
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
            // In the data path: a stuck loop stops the keep-alives and systemd restarts us.
            self.watchdog.kick(now);
            if now >= self.next_metrics {
                self.next_metrics = now + METRICS_REFRESH;
                self.refresh_metrics(now);
                let line = self.status_line();
                if line != self.status_sent {
                    systemd::notify_status(&line);
                    self.status_sent = line;
                }
            }
            if now >= self.next_refresh {
                self.next_refresh = now + LINK_REFRESH;
                self.refresh_links().await;
            }
        }
    }

    /// Hands `servers` to resolvconf (none: removes what was set). Fails only if resolvconf is
    /// there and fails.
    async fn set_dns(&mut self, servers: &[std::net::IpAddr]) -> Result<(), String> {
        if servers.is_empty() && !self.dns_set {
            return Ok(());
        }
        let set = dns_call(self.config.name.clone(), servers.to_vec()).await?;
        self.dns_set = set;
        Ok(())
    }

    /// Cryptokey routing from the current peers' allowed IPs.
    fn rebuild_routes(&mut self) {
        let mut routes = AllowedIps::new();
        for (i, p) in self.peers.iter().enumerate().filter(|(_, p)| !p.removed) {
            for net in &p.config.allowed_ips {
                routes.insert(*net, i);
            }
        }
        self.routes = routes;
    }

    /// The earliest of the WireGuard tick and every bond's timer.
    fn next_deadline(&self) -> Instant {
        self.peers
            .iter()
            .filter_map(|p| p.bond.poll_timeout())
            .chain(self.watchdog.deadline())
            .fold(
                self.next_tick.min(self.next_refresh).min(self.next_metrics),
                Instant::min,
            )
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
                    if let Some(d) = l.tunnel.retry_stalled_handshake(now, &mut self.out_buf) {
                        debug!(link = %l.name, "handshake unanswered, trying again");
                        send_udp(socket, d, endpoint, drops);
                    }
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
        let dst = packet_destination(packet);
        match dst.and_then(|d| self.routes.lookup(d)) {
            Some(p) => self.peers[p].bond.handle_outbound(packet, now),
            // The kernel's own multicast (IPv6 router solicitations, MLD) on the TUN device is
            // not a routing failure worth counting.
            None if dst.is_some_and(|d| d.is_multicast()) => {}
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
                let link = l.id;
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
                let Some(l) = links.iter_mut().find(|l| l.id == link) else {
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
                    .iter()
                    .find(|l| l.id == id)
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
                        if let Some(l) = links.iter_mut().find(|l| l.id == link) {
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
        for l in links.iter_mut() {
            // Link order in the network configuration follows additions and removals.
            let Some(i) = net.links().iter().position(|r| r.name == l.name) else {
                continue;
            };
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

    /// Removes everything `start` added, newest first. Every step runs even if one fails.
    async fn shutdown(&mut self) -> Result<(), String> {
        let name = self.config.name.clone();
        let mut errors = Vec::new();
        let pre_down = self.config.interface.pre_down.clone();
        if let Err(e) = hooks::run_async(HookStage::PreDown, pre_down, name.clone()).await {
            errors.push(e.to_string());
        }
        if let Some(task) = self.metrics_task.take() {
            task.abort();
        }
        if let Some(task) = self.wan_watcher.take() {
            task.abort();
        }
        if self.dns_set {
            if let Err(e) = dns_call(name.clone(), Vec::new()).await {
                errors.push(e);
            }
            self.dns_set = false;
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
        let post_down = self.config.interface.post_down.clone();
        if let Err(e) = hooks::run_async(HookStage::PostDown, post_down, name.clone()).await {
            errors.push(e.to_string());
        }
        if errors.is_empty() {
            info!(interface = %name, "down");
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

/// [`dns::set`] (servers given) or [`dns::unset`] (none) off the event loop's thread.
/// Returns whether servers are now set.
async fn dns_call(name: String, servers: Vec<std::net::IpAddr>) -> Result<bool, String> {
    tokio::task::spawn_blocking(move || {
        if servers.is_empty() {
            dns::unset(&name).map(|()| false)
        } else {
            dns::set(&name, &servers)
        }
    })
    .await
    .map_err(|e| format!("resolvconf: {e}"))?
}

/// The next message of an optional channel; never ready without one.
async fn recv_or_pending<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
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
        links: config.links.iter().map(wan_link_plan).collect(),
    }
}

/// What the kernel configuration needs from one link.
fn wan_link_plan(l: &crate::config::LinkConfig) -> WanLinkPlan {
    WanLinkPlan {
        name: l.name.clone(),
        bind: match &l.bind {
            LinkBind::Interface(i) => WanBind::Interface(i.clone()),
            LinkBind::Address(a) => WanBind::Address(*a),
        },
        gateway: l.gateway,
    }
}

/// A link's bind as `show` prints it.
fn bind_text(bind: &LinkBind) -> String {
    match bind {
        LinkBind::Interface(i) => i.clone(),
        LinkBind::Address(a) => a.to_string(),
    }
}

async fn undo_net(net: AppliedNet) {
    if let Err(e) = net.teardown().await {
        error!("undoing the network configuration: {e}");
    }
}

fn peer_label(p: &PeerConfig) -> String {
    p.name
        .clone()
        .unwrap_or_else(|| keys::encode(&p.public_key))
}
