//! The daemon's UDP sockets: opening them (bound, marked), reading from any of them, sending
//! without waiting.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::task::{Context, Poll};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::ReadBuf;
use tokio::net::UdpSocket;
use tracing::debug;

use super::{Ends, SiteLink, SOCKET_BUFFER};
use crate::bond::LinkId;
use crate::config::{Config, LinkBind, LinkConfig, PeerConfig, Role};
use crate::io::control::InterfaceDrops;
use crate::io::netcfg::AppliedNet;
use crate::tunnel::hub::HubSessions;
use crate::tunnel::{LinkTunnel, TunnelKeys};

/// Polls every socket for a datagram, starting at `start` so no socket starves the others.
pub(super) fn poll_recv_any(
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
pub(super) fn try_recv(ends: &Ends, i: usize, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
    let socket = match ends {
        Ends::Site { links } => &links.get(i)?.socket,
        Ends::Hub { socket, .. } => socket,
    };
    socket.try_recv_from(buf).ok()
}

/// Sends without waiting; a full buffer or an unreachable network drops the datagram (as a
/// router would) and counts it.
pub(super) fn send_udp(
    socket: &UdpSocket,
    datagram: &[u8],
    to: SocketAddr,
    drops: &mut InterfaceDrops,
) {
    if let Err(e) = socket.try_send_to(datagram, to) {
        drops.udp_send += 1;
        if e.kind() != io::ErrorKind::WouldBlock {
            debug!(%to, "send: {e}");
        }
    }
}

/// Resolves each site link's endpoint (a family matching its bind address), before anything
/// is changed. Hub: nothing to resolve.
pub(super) async fn resolve_endpoints(config: &Config) -> Result<Vec<SocketAddr>, String> {
    let mut out = Vec::new();
    for link in &config.links {
        out.push(resolve_link_endpoint(config, link).await?);
    }
    Ok(out)
}

/// Resolves one site link's endpoint (a family matching its bind address).
pub(super) async fn resolve_link_endpoint(
    config: &Config,
    link: &LinkConfig,
) -> Result<SocketAddr, String> {
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
    pick.copied().ok_or_else(|| {
        format!(
            "link `{}`: endpoint `{text}` has no address of the bind address's family",
            link.name
        )
    })
}

/// The keys of the session(s) with peer `p`.
pub(super) fn tunnel_keys(config: &Config, p: &PeerConfig) -> TunnelKeys {
    TunnelKeys {
        private_key: config.interface.private_key,
        peer_public_key: p.public_key,
        preshared_key: p.preshared_key,
        persistent_keepalive: p.persistent_keepalive,
    }
}

/// Opens the site's link sockets (bound, marked) or the hub's listening socket.
pub(super) fn open_sockets(
    config: &Config,
    net: &AppliedNet,
    endpoints: &[SocketAddr],
) -> Result<Ends, String> {
    let keys_for = |p: &PeerConfig| tunnel_keys(config, p);
    match config.role() {
        Role::Site => {
            let Some(peer) = config.peers.first() else {
                return Err("a site needs a peer".into());
            };
            let keys = keys_for(peer);
            let mut links = Vec::new();
            for (i, (link, &endpoint)) in config.links.iter().zip(endpoints).enumerate() {
                let mark = net.links().get(i).map(|r| r.mark);
                let port = config.interface.listen_port.unwrap_or(0);
                let socket = link_socket(&link.bind, endpoint, mark, port).map_err(|e| {
                    format!("link `{}`: cannot open its UDP socket: {e}", link.name)
                })?;
                let index = unused_index(&links);
                let tunnel = LinkTunnel::new(&keys, index, None)?;
                links.push(SiteLink {
                    id: LinkId(i as u8),
                    config: link.clone(),
                    name: link.name.clone(),
                    bind: super::bind_text(&link.bind),
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

/// A random session index no link uses: the hub tells our links apart by them.
pub(super) fn unused_index(links: &[SiteLink]) -> u32 {
    loop {
        let i = rand::random::<u32>() & crate::tunnel::MAX_INDEX;
        if !links.iter().any(|l| l.tunnel.index() == i) {
            break i;
        }
    }
}

pub(super) fn tune(socket: &Socket, mark: Option<u32>) -> io::Result<()> {
    if let Some(m) = mark {
        socket.set_mark(m)?;
    }
    // Bigger buffers absorb bursts; failure only costs throughput.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.set_nonblocking(true)
}

/// A site link's socket: bound to its WAN device or address and to `port` (0: the kernel picks
/// one), marked for its routing table, not connected (a connected socket keeps its source
/// address across a DHCP renew). Links can share one port: each socket is bound to its own
/// device or address, and the kernel only refuses the same port on the same one.
pub(super) fn link_socket(
    bind: &LinkBind,
    endpoint: SocketAddr,
    mark: Option<u32>,
    port: u16,
) -> io::Result<UdpSocket> {
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
            SocketAddr::new(any, port)
        }
        LinkBind::Address(a) => {
            if a.is_ipv4() != endpoint.is_ipv4() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("bind address {a} and endpoint {endpoint} are of different families"),
                ));
            }
            SocketAddr::new(*a, port)
        }
    };
    socket.bind(&local.into())?;
    UdpSocket::from_std(socket.into())
}

/// The hub's socket: dual-stack `[::]:port`, or `0.0.0.0:port` where IPv6 is off.
pub(super) fn hub_socket(port: u16, mark: Option<u32>) -> io::Result<UdpSocket> {
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
