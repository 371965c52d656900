//! `systemctl reload` (SIGHUP): re-read the config file and apply what changed without taking
//! the tunnel down.
//!
//! Everything that can be checked is checked before the first change: the file is valid, it
//! changes nothing that needs a restart (the `[interface]` keys the TUN device, its routes and
//! the sessions depend on), and the new links' endpoints resolve. A refused reload changes
//! nothing. Links whose bind, gateway or endpoint changed are removed and added again (a new
//! socket, table and link id); a link that cannot be added (its WAN is missing) is logged and
//! left out, and the next reload tries again.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Instant;

use ipnet::IpNet;
use tracing::{error, info, warn};

use super::sockets::{link_socket, resolve_link_endpoint, tunnel_keys, unused_index};

/// Longest a reload waits for one new link's endpoint to resolve.
const RELOAD_DNS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
use super::{wan_link_plan, Daemon, Ends, Peer, SiteLink};
use crate::bond::{Bond, LinkId, Mode};
use crate::config::{Config, LinkBind, LinkConfig, PeerConfig, Role};
use crate::io::systemd;
use crate::tunnel::LinkTunnel;

/// What a reload changes, worked out before anything is touched.
#[derive(Debug, Default, PartialEq)]
pub(super) struct ReloadPlan {
    /// Site links to remove, by name (also those re-added with a new bind or endpoint).
    pub remove_links: Vec<String>,
    /// Site links to add, in file order.
    pub add_links: Vec<LinkConfig>,
    /// Site links whose bond settings (priority, rate cap) change.
    pub update_links: Vec<LinkConfig>,
    /// The new mode, if it changed.
    pub mode: Option<Mode>,
    /// Probe interval, reorder wait or queue delay changed.
    pub timing: bool,
    /// Hub peers to forget, by public key (also those re-added with a new preshared key).
    pub remove_peers: Vec<[u8; 32]>,
    /// Hub peers to accept.
    pub add_peers: Vec<PeerConfig>,
    /// Peers kept whose allowed IPs or name change.
    pub update_peers: Vec<PeerConfig>,
    /// The union of the peers' allowed IPs changed (routes).
    pub allowed_ips: bool,
    /// `dns` changed.
    pub dns: bool,
}

impl ReloadPlan {
    /// One line per change, for the log.
    fn describe(&self, new: &Config) -> Vec<String> {
        let mut out = Vec::new();
        for name in &self.remove_links {
            if !self.add_links.iter().any(|l| &l.name == name) {
                out.push(format!("link `{name}` removed"));
            }
        }
        for l in &self.add_links {
            if self.remove_links.contains(&l.name) {
                out.push(format!(
                    "link `{}` re-created (bind or endpoint changed)",
                    l.name
                ));
            }
        }
        for l in &self.update_links {
            out.push(format!("link `{}` settings changed", l.name));
        }
        if self.mode.is_some() {
            out.push(format!("mode {}", super::status::mode_name(new.bond.mode)));
        }
        if self.timing {
            out.push("bond timing changed".into());
        }
        if !self.remove_peers.is_empty() || !self.add_peers.is_empty() {
            out.push(format!(
                "{} peer(s) removed, {} added",
                self.remove_peers.len(),
                self.add_peers.len()
            ));
        }
        if !self.update_peers.is_empty() {
            out.push(format!("{} peer(s) changed", self.update_peers.len()));
        }
        if self.dns {
            out.push("dns changed".into());
        }
        out
    }
}

/// The union of every peer's allowed IPs, normalised.
fn all_allowed(config: &Config) -> BTreeSet<IpNet> {
    config
        .peers
        .iter()
        .flat_map(|p| p.allowed_ips.iter().map(|n| n.trunc()))
        .collect()
}

/// Compares the running config with the new one. `Err`: what changed that needs a restart.
pub(super) fn plan_reload(old: &Config, new: &Config) -> Result<ReloadPlan, Vec<String>> {
    let mut refused = Vec::new();
    let mut restart = |what: &str, changed: bool| {
        if changed {
            refused.push(what.to_owned());
        }
    };
    let (a, b) = (&old.interface, &new.interface);
    restart("the interface name", old.name != new.name);
    restart(
        "the role (links added to a hub or all links removed from a site)",
        old.role() != new.role(),
    );
    restart("private_key", a.private_key != b.private_key);
    restart("address", a.addresses != b.addresses);
    restart("listen_port", a.listen_port != b.listen_port);
    restart("mtu", a.mtu != b.mtu);
    restart("table", a.table != b.table);
    restart("fwmark", a.fwmark != b.fwmark);
    restart("metrics_listen", a.metrics_listen != b.metrics_listen);

    let mut plan = ReloadPlan::default();
    let session_keys = |p: &PeerConfig| (p.preshared_key, p.persistent_keepalive);
    match (old.role(), new.role()) {
        (Role::Site, Role::Site) => {
            if let (Some(o), Some(n)) = (old.peers.first(), new.peers.first()) {
                restart(
                    "the peer's public_key, preshared_key or persistent_keepalive",
                    o.public_key != n.public_key || session_keys(o) != session_keys(n),
                );
                if o != n {
                    plan.update_peers.push(n.clone());
                }
            }
        }
        (Role::Hub, Role::Hub) => {
            for o in &old.peers {
                match new.peers.iter().find(|n| n.public_key == o.public_key) {
                    None => plan.remove_peers.push(o.public_key),
                    // New session keys: the peer's sessions start again.
                    Some(n) if session_keys(o) != session_keys(n) => {
                        plan.remove_peers.push(o.public_key);
                        plan.add_peers.push(n.clone());
                    }
                    Some(n) if n != o => plan.update_peers.push(n.clone()),
                    Some(_) => {}
                }
            }
            for n in &new.peers {
                if !old.peers.iter().any(|o| o.public_key == n.public_key) {
                    plan.add_peers.push(n.clone());
                }
            }
        }
        _ => {}
    }
    // With `table = auto` a default route brings the full-tunnel rules: set up at start only.
    let (old_nets, new_nets) = (all_allowed(old), all_allowed(new));
    let defaults = |nets: &BTreeSet<IpNet>| {
        nets.iter()
            .filter(|n| n.prefix_len() == 0)
            .copied()
            .collect::<Vec<_>>()
    };
    if b.table == crate::config::RouteTable::Auto && defaults(&old_nets) != defaults(&new_nets) {
        refused.push("a default route (0.0.0.0/0, ::/0) in allowed_ips".to_owned());
    }
    if !refused.is_empty() {
        return Err(refused);
    }
    plan.allowed_ips = old_nets != new_nets;

    for o in &old.links {
        match new.links.iter().find(|n| n.name == o.name) {
            None => plan.remove_links.push(o.name.clone()),
            Some(n)
                if n.bind != o.bind
                    || n.gateway != o.gateway
                    || old.link_endpoint(o) != new.link_endpoint(n) =>
            {
                plan.remove_links.push(o.name.clone());
            }
            Some(n) if n != o => plan.update_links.push(n.clone()),
            Some(_) => {}
        }
    }
    for n in &new.links {
        let kept =
            old.links.iter().any(|o| o.name == n.name) && !plan.remove_links.contains(&n.name);
        if !kept {
            plan.add_links.push(n.clone());
        }
    }
    if old.bond.mode != new.bond.mode {
        plan.mode = Some(new.bond.mode);
    }
    plan.timing = old.bond.probe_interval != new.bond.probe_interval
        || old.bond.reorder_max_wait != new.bond.reorder_max_wait
        || old.bond.max_queue_delay != new.bond.max_queue_delay;
    plan.dns = a.dns != b.dns;
    Ok(plan)
}

impl Daemon {
    /// The address a running link already sends to, if a new link names the same endpoint
    /// (and the family fits its bind address).
    fn known_endpoint(&self, new: &Config, link: &LinkConfig) -> Option<SocketAddr> {
        let text = new.link_endpoint(link)?;
        let Ends::Site { links } = &self.ends else {
            return None;
        };
        links
            .iter()
            .filter(|l| self.config.link_endpoint(&l.config) == Some(text))
            .map(|l| l.endpoint)
            .find(|a| match &link.bind {
                LinkBind::Address(b) => b.is_ipv4() == a.is_ipv4(),
                LinkBind::Interface(_) => true,
            })
    }

    /// Handles SIGHUP: re-reads the config file and applies the differences, or refuses and
    /// keeps running as before. Tells systemd (RELOADING=1 ... READY=1 with a status).
    pub(super) async fn reload(&mut self) {
        systemd::notify_reloading();
        let path = self.config.path.clone();
        info!(config = %path.display(), "reload requested");
        let new = match Config::load(&path) {
            Ok(c) => c,
            Err(errors) => {
                for e in &errors.0 {
                    error!("{e}");
                }
                self.refuse_reload(&format!(
                    "{} error(s) in {}",
                    errors.0.len(),
                    path.display()
                ));
                return;
            }
        };
        let plan = match plan_reload(&self.config, &new) {
            Ok(plan) => plan,
            Err(changed) => {
                for what in &changed {
                    error!(
                        "reload refused: {what} changed; that needs a restart (systemctl restart)"
                    );
                }
                self.refuse_reload(&format!("{} changed, needs a restart", changed.join(", ")));
                return;
            }
        };
        // Every new endpoint resolves before anything changes. The loop waits meanwhile (no
        // packets move), so an endpoint a running link already uses is taken from it rather
        // than asked of DNS again (which, in a full tunnel, may itself need the tunnel), and a
        // lookup gets a few seconds at most.
        let mut endpoints = Vec::new();
        for link in &plan.add_links {
            if let Some(known) = self.known_endpoint(&new, link) {
                endpoints.push(known);
                continue;
            }
            let lookup =
                tokio::time::timeout(RELOAD_DNS_TIMEOUT, resolve_link_endpoint(&new, link));
            let resolved = match lookup.await {
                Ok(r) => r,
                Err(_) => Err(format!(
                    "link `{}`: resolving its endpoint took over {} s",
                    link.name,
                    RELOAD_DNS_TIMEOUT.as_secs()
                )),
            };
            match resolved {
                Ok(a) => endpoints.push(a),
                Err(e) => {
                    error!("{e}");
                    self.refuse_reload(&e);
                    return;
                }
            }
        }
        let now = Instant::now();
        let changes = plan.describe(&new);
        let mut failures = Vec::new();

        for name in &plan.remove_links {
            if let Err(e) = self.remove_site_link(name, now).await {
                error!("{e}");
                failures.push(e);
            }
        }
        for l in &plan.update_links {
            if let Ends::Site { links } = &mut self.ends {
                if let Some(sl) = links.iter_mut().find(|sl| sl.name == l.name) {
                    for p in &mut self.peers {
                        p.bond.add_link(sl.id, l.bond_link_config(), now);
                    }
                    sl.config = l.clone();
                }
            }
        }
        for (l, endpoint) in plan.add_links.iter().zip(endpoints) {
            match self.add_site_link(&new, l, endpoint, now).await {
                Ok(()) => {
                    if !plan.remove_links.contains(&l.name) {
                        info!(link = %l.name, %endpoint, "link added");
                    }
                }
                Err(e) => {
                    error!("{e}");
                    failures.push(e);
                }
            }
        }

        for p in &mut self.peers {
            if let Some(mode) = plan.mode {
                p.bond.set_mode(mode);
            }
            if plan.timing {
                p.bond.set_timing(
                    new.bond.probe_interval,
                    new.bond.reorder_max_wait,
                    new.bond.max_queue_delay,
                );
            }
        }
        if let Ends::Hub { sessions, .. } = &mut self.ends {
            for key in &plan.remove_peers {
                if let Some(i) = self
                    .peers
                    .iter()
                    .position(|p| !p.removed && &p.config.public_key == key)
                {
                    sessions.remove_peer(i);
                    let p = &mut self.peers[i];
                    p.removed = true;
                    for id in p.bond.link_ids() {
                        p.bond.remove_link(id, now);
                    }
                }
            }
            for n in &plan.add_peers {
                let index = sessions.add_peer(tunnel_keys(&new, n));
                debug_assert_eq!(index, self.peers.len());
                self.peers.push(Peer {
                    config: n.clone(),
                    bond: Bond::new(new.bond.bond_config(false, self.bond_id), now),
                    rx_source_drops: 0,
                    removed: false,
                });
            }
        }
        let previous = self.config.peers.clone();
        for n in &plan.update_peers {
            if let Some(p) = self
                .peers
                .iter_mut()
                .find(|p| !p.removed && p.config.public_key == n.public_key)
            {
                p.config = n.clone();
            }
        }
        if plan.allowed_ips {
            let nets: Vec<IpNet> = all_allowed(&new).into_iter().collect();
            if let Some(net) = self.net.as_mut() {
                if let Err(e) = net.set_allowed_ips(&nets).await {
                    let e = format!("routing the new allowed_ips: {e}");
                    error!("{e}");
                    failures.push(e);
                    // The routes stayed as they were: so do the peers' allowed IPs, and the
                    // next reload tries again.
                    for p in self.peers.iter_mut().filter(|p| !p.removed) {
                        if let Some(o) = previous
                            .iter()
                            .find(|o| o.public_key == p.config.public_key)
                        {
                            p.config.allowed_ips = o.allowed_ips.clone();
                        }
                    }
                }
            }
        }
        self.rebuild_routes();
        let mut dns_failed = false;
        if plan.dns {
            if let Err(e) = self.set_dns(&new.interface.dns).await {
                error!("{e}");
                failures.push(e);
                dns_failed = true;
            }
        }

        // What now runs: the new file, less what could not be applied (tried again at the
        // next reload).
        let mut running = new;
        if dns_failed {
            running.interface.dns = self.config.interface.dns.clone();
        }
        if let Ends::Site { links } = &self.ends {
            running.links = links.iter().map(|l| l.config.clone()).collect();
        }
        running.peers = self
            .peers
            .iter()
            .filter(|p| !p.removed)
            .map(|p| p.config.clone())
            .collect();
        self.config = running;

        if failures.is_empty() {
            self.reload_note = None;
            if changes.is_empty() {
                info!("reloaded: nothing changed");
            } else {
                info!("reloaded: {}", changes.join(", "));
            }
        } else {
            self.reload_note = Some(format!("reload incomplete: {}", failures.join("; ")));
            warn!("reload incomplete: {}", failures.join("; "));
        }
        let line = self.status_line();
        systemd::notify_ready(&line);
        self.status_sent = line;
    }

    /// Keeps the running config; systemd's status line says why until the next good reload.
    fn refuse_reload(&mut self, why: &str) {
        warn!("reload refused ({why}); running with the previous config");
        self.reload_note = Some(format!("reload refused ({why}); previous config kept"));
        let line = self.status_line();
        systemd::notify_ready(&line);
        self.status_sent = line;
    }

    /// Closes a site link: out of the bond (its queue moves to the other links), socket
    /// closed, its routing removed.
    async fn remove_site_link(&mut self, name: &str, now: Instant) -> Result<(), String> {
        let Ends::Site { links } = &mut self.ends else {
            return Ok(());
        };
        let Some(i) = links.iter().position(|l| l.name == name) else {
            return Ok(());
        };
        let link = links.remove(i);
        for p in &mut self.peers {
            p.bond.remove_link(link.id, now);
        }
        // The socket closes before its routing goes.
        drop(link);
        info!(link = %name, "link removed");
        match self.net.as_mut() {
            Some(net) => net
                .remove_link(name)
                .await
                .map_err(|e| format!("link `{name}`: removing its routing: {e}")),
            None => Ok(()),
        }
    }

    /// Opens a new site link: routing table and rules, socket, WireGuard session, bond link.
    /// On error nothing of it is left.
    async fn add_site_link(
        &mut self,
        config: &Config,
        link: &LinkConfig,
        endpoint: SocketAddr,
        now: Instant,
    ) -> Result<(), String> {
        let Some(peer) = config.peers.first() else {
            return Err("a site needs a peer".into());
        };
        let keys = tunnel_keys(config, peer);
        let id = self.unused_link_id()?;
        let Some(net) = self.net.as_mut() else {
            return Err("no network configuration".into());
        };
        let (routing, warnings) = net
            .add_link(&wan_link_plan(link))
            .await
            .map_err(|e| format!("link `{}`: {e}", link.name))?;
        for w in warnings {
            warn!("{w}");
        }
        let port = self.config.interface.listen_port.unwrap_or(0);
        let opened = link_socket(&link.bind, endpoint, Some(routing.mark), port)
            .map_err(|e| format!("link `{}`: cannot open its UDP socket: {e}", link.name))
            .and_then(|socket| {
                let Ends::Site { links } = &self.ends else {
                    return Err("not a site".to_owned());
                };
                let tunnel = LinkTunnel::new(&keys, unused_index(links), None)?;
                Ok((socket, tunnel))
            });
        let (socket, tunnel) = match opened {
            Ok(v) => v,
            Err(e) => {
                if let Err(u) = net.remove_link(&link.name).await {
                    error!("link `{}`: undoing its routing: {u}", link.name);
                }
                return Err(e);
            }
        };
        // tokio's `try_send_to` fails with WouldBlock until the reactor has seen the new
        // socket writable once: without this the first handshake would be dropped and retried
        // only after boringtun's 5 s timer.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), socket.writable()).await;
        let Ends::Site { links } = &mut self.ends else {
            return Err("not a site".into());
        };
        links.push(SiteLink {
            id,
            config: link.clone(),
            name: link.name.clone(),
            bind: super::bind_text(&link.bind),
            endpoint,
            socket,
            tunnel,
            needs_refresh: false,
        });
        for p in &mut self.peers {
            p.bond.add_link(id, link.bond_link_config(), now);
        }
        Ok(())
    }

    /// A link id for a new link: one never used by this daemon while there are any, so the
    /// hub does not mix a new link with the one it still remembers under the old id.
    fn unused_link_id(&mut self) -> Result<LinkId, String> {
        let Ends::Site { links } = &self.ends else {
            return Err("not a site".into());
        };
        let in_use = |id: u8| links.iter().any(|l| l.id.0 == id);
        let id = (self.next_link_id..=u8::MAX)
            .chain(0..self.next_link_id)
            .find(|&id| !in_use(id))
            .ok_or_else(|| "no free link id (256 links)".to_owned())?;
        self.next_link_id = id.saturating_add(1);
        Ok(LinkId(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const KEY_A: &str = "WEkHbMYhPd2NMNSCeEqDispn1QWRi4okxREEVFgy2FI=";
    const KEY_B: &str = "UEP6ZztuU+UrT1a1qVV5eRa2YH3c7VB0tHQBAq1tsRw=";
    const KEY_C: &str = "gzR5hRx2PQIgG9wSDigrOsfrSTxZZ8msGXv4RSKKJ08=";

    fn site(links: &str, mode: &str, allowed: &str) -> Config {
        let text = format!(
            r#"
[interface]
private_key = "{KEY_A}"
address = ["10.99.0.2/24"]
[bond]
mode = "{mode}"
[[peer]]
public_key = "{KEY_B}"
allowed_ips = [{allowed}]
endpoint = "203.0.113.1:51820"
{links}
"#
        );
        Config::parse(&text, Path::new("/etc/wgbond/site.toml"))
            .unwrap_or_else(|e| panic!("bad test config: {e}"))
    }

    fn link(name: &str, dev: &str, extra: &str) -> String {
        format!("[[link]]\nname = \"{name}\"\nbind_interface = \"{dev}\"\n{extra}\n")
    }

    #[test]
    fn links_added_removed_and_changed() {
        let old = site(
            &[
                link("a", "eth1", ""),
                link("b", "eth2", ""),
                link("c", "eth3", ""),
            ]
            .concat(),
            "auto",
            "\"10.99.0.1/32\"",
        );
        let new = site(
            &[
                link("a", "eth1", "priority = 5"),
                link("c", "eth9", ""),
                link("d", "eth4", "max_rate_mbit = 10.0"),
            ]
            .concat(),
            "failover",
            "\"10.99.0.1/32\"",
        );
        let plan = plan_reload(&old, &new).unwrap_or_else(|e| panic!("refused: {e:?}"));
        assert_eq!(plan.remove_links, ["b", "c"]);
        let added: Vec<&str> = plan.add_links.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(added, ["c", "d"]);
        assert_eq!(plan.update_links.len(), 1);
        assert_eq!(plan.update_links[0].priority, 5);
        assert_eq!(plan.mode, Some(Mode::Failover));
        assert!(!plan.allowed_ips);
        assert!(!plan.timing);
        // The same file again changes nothing.
        assert_eq!(plan_reload(&new, &new), Ok(ReloadPlan::default()));
    }

    #[test]
    fn endpoint_change_recreates_links_without_their_own() {
        let old = site(
            &[
                link("a", "eth1", ""),
                link("b", "eth2", "endpoint = \"192.0.2.9:1\""),
            ]
            .concat(),
            "auto",
            "\"10.99.0.1/32\"",
        );
        let mut new = old.clone();
        new.peers[0].endpoint = Some("203.0.113.2:51820".into());
        let plan = plan_reload(&old, &new).unwrap_or_else(|e| panic!("refused: {e:?}"));
        assert_eq!(plan.remove_links, ["a"]);
        assert_eq!(plan.add_links.len(), 1);
        assert_eq!(plan.update_peers.len(), 1);
    }

    #[test]
    fn interface_and_session_key_changes_are_refused() {
        let old = site(&link("a", "eth1", ""), "auto", "\"10.99.0.1/32\"");
        let mut new = old.clone();
        new.interface.mtu = 1300;
        new.interface.listen_port = Some(5000);
        new.peers[0].persistent_keepalive = Some(25);
        let refused = plan_reload(&old, &new).err().unwrap_or_default();
        assert_eq!(
            refused,
            [
                "listen_port",
                "mtu",
                "the peer's public_key, preshared_key or persistent_keepalive"
            ]
        );
        let mut new = old.clone();
        new.interface.private_key = [7; 32];
        new.interface.addresses.clear();
        assert_eq!(
            plan_reload(&old, &new).err().unwrap_or_default(),
            ["private_key", "address"]
        );
    }

    #[test]
    fn allowed_ips_and_hub_peers() {
        let old = site(&link("a", "eth1", ""), "auto", "\"10.99.0.1/32\"");
        let new = site(
            &link("a", "eth1", ""),
            "auto",
            "\"10.99.0.1/32\", \"10.7.0.0/16\"",
        );
        let plan = plan_reload(&old, &new).unwrap_or_else(|e| panic!("refused: {e:?}"));
        assert!(plan.allowed_ips);
        assert_eq!(plan.update_peers.len(), 1);
        let full = site(&link("a", "eth1", ""), "auto", "\"0.0.0.0/0\"");
        assert_eq!(
            plan_reload(&old, &full).err().unwrap_or_default(),
            ["a default route (0.0.0.0/0, ::/0) in allowed_ips"]
        );

        let hub = |peers: &[(&str, &str)]| {
            let mut text = format!(
                "[interface]\nprivate_key = \"{KEY_A}\"\naddress = [\"10.99.0.1/24\"]\nlisten_port = 51820\n"
            );
            for (key, ip) in peers {
                text.push_str(&format!(
                    "[[peer]]\npublic_key = \"{key}\"\nallowed_ips = [\"{ip}\"]\n"
                ));
            }
            Config::parse(&text, Path::new("hub.toml"))
                .unwrap_or_else(|e| panic!("bad test config: {e}"))
        };
        let old = hub(&[(KEY_B, "10.99.0.2/32")]);
        let new = hub(&[(KEY_C, "10.99.0.3/32"), (KEY_B, "10.99.0.2/32")]);
        let plan = plan_reload(&old, &new).unwrap_or_else(|e| panic!("refused: {e:?}"));
        assert!(plan.remove_peers.is_empty());
        assert_eq!(plan.add_peers.len(), 1);
        assert!(plan.allowed_ips);
        let plan = plan_reload(&new, &old).unwrap_or_else(|e| panic!("refused: {e:?}"));
        assert_eq!(plan.remove_peers.len(), 1);
        assert!(plan.add_peers.is_empty());
    }
}
