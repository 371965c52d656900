//! What the daemon reports: `show`, the metrics snapshot, systemd's status line.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{Daemon, Ends};
use crate::bond::{self, LinkId, LinkState};
use crate::io::control::{BondStatus, InterfaceStatus, LinkStatus, PeerStatus};
use crate::io::metrics::{LinkMetrics, MetricsSnapshot, PeerMetrics};
use crate::io::systemd;
use crate::keys;

impl Daemon {
    /// Copies the counters into the snapshot `metrics_listen` serves.
    pub(super) fn refresh_metrics(&mut self, now: Instant) {
        let Some(shared) = &self.metrics else {
            return;
        };
        let snapshot = self.metrics_snapshot(now);
        if let Ok(mut slot) = shared.lock() {
            *slot = snapshot;
        }
    }

    /// The one-line summary for `systemctl status`.
    pub(super) fn status_line(&self) -> String {
        let summary = systemd::status_summary(&self.metrics_snapshot(Instant::now()));
        match &self.reload_note {
            Some(note) => format!("{note}; {summary}"),
            None => summary,
        }
    }

    pub(super) fn metrics_snapshot(&self, now: Instant) -> MetricsSnapshot {
        let status = self.status(now);
        let d = &status.drops;
        let drops = [
            ("no_route", d.tx_no_route),
            ("tun_write", d.tun_write),
            ("udp_send", d.udp_send),
            ("no_session", d.no_session_tx + d.no_session),
            ("malformed", d.malformed),
            ("unauthenticated", d.unauthenticated),
            ("replayed", d.replayed),
            ("unknown_peer", d.unknown_peer),
            ("unbound", d.unbound),
            ("rate_limited", d.rate_limited),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), *v))
        .collect();
        let peers = self
            .peers
            .iter()
            .filter(|p| !p.removed)
            .zip(&status.peers)
            .map(|(p, ps)| PeerMetrics {
                name: p.config.name.clone(),
                public_key: ps.public_key.clone(),
                bond: p.bond.stats(),
                rx_not_allowed: p.rx_source_drops,
                links: p
                    .bond
                    .link_stats()
                    .into_iter()
                    .map(|(id, stats)| LinkMetrics {
                        since_handshake: ps
                            .links
                            .iter()
                            .find(|l| l.id == id.0)
                            .and_then(|l| l.latest_handshake_secs)
                            .map(Duration::from_secs),
                        stats,
                    })
                    .collect(),
            })
            .collect();
        MetricsSnapshot {
            interface: self.config.name.clone(),
            peers,
            drops,
        }
    }

    /// The `show` answer.
    pub(super) fn status(&self, now: Instant) -> InterfaceStatus {
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
            .filter(|(_, p)| !p.removed)
            .map(|(pi, p)| {
                let links: Vec<LinkStatus> = p
                    .bond
                    .link_stats()
                    .into_iter()
                    .map(|(id, s)| {
                        let mut ls = link_status(id, &s);
                        match &self.ends {
                            Ends::Site { links } => {
                                if let Some(l) = links.iter().find(|l| l.id == id) {
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
                        reorder_max_wait_ms: ms(b.reorder_max_wait_seen),
                        compact_trailers: b.compact_trailers,
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
}

pub(super) fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(super) fn mode_name(m: bond::Mode) -> &'static str {
    match m {
        bond::Mode::Auto => "auto",
        bond::Mode::Stripe => "stripe",
        bond::Mode::Duplicate => "duplicate",
        bond::Mode::Failover => "failover",
    }
}

pub(super) fn state_name(s: Option<LinkState>) -> &'static str {
    match s {
        None | Some(LinkState::Probing) => "probing",
        Some(LinkState::Up) => "up",
        Some(LinkState::Degraded) => "degraded",
        Some(LinkState::Down) => "down",
    }
}

pub(super) fn link_status(id: LinkId, s: &bond::LinkStats) -> LinkStatus {
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
        retransmits: s.retransmits,
        ..LinkStatus::default()
    }
}
