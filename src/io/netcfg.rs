//! Kernel network configuration for `wgbond up` / `down`, done over rtnetlink.
//!
//! [`apply`] configures the TUN device (MTU, addresses, up), routes the peers' allowed IPs into
//! it, and gives every WAN link its own routing table selected by a firewall mark (and, for
//! `bind_address` links, by source address), so that the links' own encrypted UDP leaves through
//! their WAN even when the whole site is routed into the tunnel. The design (tables, marks, rule
//! priorities, how to inspect them with `ip rule`) is described in `docs/routing.md`.
//!
//! Every object `apply` adds is recorded in an undo journal. [`AppliedNet::teardown`] removes
//! them in reverse order; a failed `apply` rolls back what it did before returning the error.
//! Objects that existed before `apply` are never touched. Everything that can be checked without
//! changing the system (interfaces exist, tables and marks are free, no rule would duplicate an
//! existing one, no route would clash) is checked before the first change.
//!
//! How the daemon uses it (after creating the TUN device, before deleting it):
//! ```no_run
//! # use wgbond::io::netcfg::{apply, NetPlan, NetcfgError};
//! # async fn daemon(plan: NetPlan) -> Result<(), NetcfgError> {
//! let mut net = apply(&plan).await?;
//! for warning in net.warnings() {
//!     tracing::warn!("{warning}");
//! }
//! // SO_MARK for each link's UDP socket, in link order.
//! let marks: Vec<u32> = net.links().iter().map(|l| l.mark).collect();
//! let mut watcher = net.wan_watcher()?;
//! // In the daemon's event loop: re-resolve gateways after WAN changes.
//! if watcher.changed(std::time::Duration::from_millis(300)).await {
//!     for result in net.refresh_links().await {
//!         if let Err(e) = result {
//!             tracing::warn!("{e}");
//!         }
//!     }
//! }
//! net.teardown().await?;
//! # let _ = marks;
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use futures::{StreamExt, TryStreamExt};
use ipnet::IpNet;
use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlag, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlag, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlag, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, IpVersion};
use tokio::task::JoinHandle;

/// Priority of the per-link rules (`fwmark M lookup T`, `from ADDR lookup T`): before the
/// tunnel's rules, so a link's packets never consult the tunnel table.
pub const RULE_PRIORITY_LINK: u32 = 31100;
/// Priority of `lookup main suppress_prefixlength 0` (full tunnel only): routes more specific
/// than a default route (LAN, connected WAN subnets) still win over the tunnel.
pub const RULE_PRIORITY_SUPPRESS: u32 = 31200;
/// Priority of `not fwmark X lookup T` (full tunnel only): everything else goes to the tunnel
/// table.
pub const RULE_PRIORITY_TUNNEL: u32 = 31201;
/// First routing table (and mark) number `table = auto` considers, as wg-quick does.
pub const FIRST_TABLE: u32 = 51820;
/// Route and rule protocol number stamped on every object wgbond adds (`proto 87` in `ip`
/// output), so that leftovers are recognisable.
pub const ROUTE_PROTOCOL: u8 = 87;

/// How many candidate base table numbers `table = auto` tries before giving up.
const TABLE_SEARCH_LIMIT: u32 = 4096;
/// Metric of the per-link `unreachable default` fallback: the last resort in the link table,
/// so a link whose WAN route vanished fails instead of falling through into the tunnel.
const FALLBACK_METRIC: u32 = u32::MAX;
/// The kernel's main and local routing tables.
const TABLE_MAIN: u32 = 254;
const TABLE_LOCAL: u32 = 255;
/// Metric the kernel gives a route added without one.
const DEFAULT_METRIC_V4: u32 = 0;
const DEFAULT_METRIC_V6: u32 = 1024;

/// Which routing table receives the routes for the peers' allowed IPs (wg-quick's `Table`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteTableSetting {
    /// Main table; a default route (`/0`) goes to a dedicated table selected by fwmark rules.
    Auto,
    /// No routes for allowed IPs (the per-link tables are still installed).
    Off,
    /// All allowed-IP routes go to this table; no rules are added for it.
    Id(u32),
}

/// How a WAN link's socket is tied to its WAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WanBind {
    /// `bind_interface`: SO_BINDTODEVICE to this interface.
    Interface(String),
    /// `bind_address`: bound to this local address.
    Address(IpAddr),
}

/// One WAN link of a site, as the network configuration needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WanLinkPlan {
    /// The link's name from the config (used in error messages).
    pub name: String,
    /// Interface or address the link's socket is bound to.
    pub bind: WanBind,
    /// Gateway override; otherwise found from the WAN's default route.
    pub gateway: Option<IpAddr>,
}

/// Everything `up` needs to configure in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetPlan {
    /// Name of the TUN device (already created by the caller).
    pub tun_name: String,
    /// Addresses to put on the TUN device.
    pub addresses: Vec<IpNet>,
    /// MTU of the TUN device.
    pub mtu: u32,
    /// The allowed IPs of all peers: routed into the TUN device.
    pub allowed_ips: Vec<IpNet>,
    /// Where the allowed-IP routes go.
    pub table: RouteTableSetting,
    /// Mark that bypasses the tunnel (`not fwmark X`); default: the tunnel table number.
    pub fwmark: Option<u32>,
    /// The site's WAN links, in config order (link index = position).
    pub links: Vec<WanLinkPlan>,
}

/// How a link's table reaches the outside for one address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nexthop {
    /// `default via GATEWAY dev WAN onlink`.
    Via(IpAddr),
    /// `default dev WAN scope link` (point-to-point WANs, or no gateway known).
    OnLink,
}

impl fmt::Display for Nexthop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Via(gw) => write!(f, "via {gw}"),
            Self::OnLink => f.write_str("on-link"),
        }
    }
}

/// The routing set up for one WAN link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRouting {
    /// The link's name from the config.
    pub name: String,
    /// Firewall mark the daemon must set (SO_MARK) on this link's UDP socket.
    pub mark: u32,
    /// The link's routing table.
    pub table: u32,
    /// The WAN interface the link leaves through.
    pub interface: String,
    /// IPv4 route of the link table; `None`: no IPv4 route (the table answers unreachable).
    pub v4: Option<Nexthop>,
    /// IPv6 route of the link table; `None`: no IPv6 route (the table answers unreachable).
    pub v6: Option<Nexthop>,
}

/// Why configuring or deconfiguring the network failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetcfgError {
    /// The plan cannot be applied to this system; nothing was changed.
    Invalid(String),
    /// A step failed; what had been done before it was rolled back (`rollback` lists undo
    /// steps that failed too, normally empty).
    Step {
        /// What was being done, e.g. "add route 0.0.0.0/0 dev wgb0 table 51820".
        step: String,
        /// The kernel's answer.
        cause: String,
        /// Undo steps that failed during the rollback.
        rollback: Vec<String>,
    },
    /// Some objects could not be removed (each entry: step and cause).
    Teardown(Vec<String>),
}

impl fmt::Display for NetcfgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid(msg) => f.write_str(msg),
            Self::Step {
                step,
                cause,
                rollback,
            } => {
                write!(f, "{step}: {cause}")?;
                if !rollback.is_empty() {
                    write!(f, "; rollback incomplete: {}", rollback.join("; "))?;
                }
                Ok(())
            }
            Self::Teardown(failures) => {
                write!(f, "teardown incomplete: {}", failures.join("; "))
            }
        }
    }
}

impl std::error::Error for NetcfgError {}

/// Deletes every rule and route stamped with [`ROUTE_PROTOCOL`]: what a wgbond that did not
/// shut down cleanly (killed, crashed, stopped by the watchdog) left behind. Call only when no
/// other wgbond runs in this network namespace. Returns how many rules and routes went.
pub async fn remove_leftovers() -> Result<(usize, usize), NetcfgError> {
    let (connection, handle, _) = rtnetlink::new_connection()
        .map_err(|e| NetcfgError::Invalid(format!("cannot open a netlink socket: {e}")))?;
    let connection = tokio::spawn(connection);
    let result = sweep(&handle).await;
    connection.abort();
    result.map_err(|e| NetcfgError::Invalid(format!("cannot remove leftovers: {e}")))
}

async fn sweep(handle: &Handle) -> Result<(usize, usize), String> {
    let err = |what: &str, e: rtnetlink::Error| format!("{what}: {}", NlError::from(e).text);
    let (mut rules, mut routes) = (0, 0);
    for version in [IpVersion::V4, IpVersion::V6] {
        let found: Vec<RuleMessage> = handle
            .rule()
            .get(version.clone())
            .execute()
            .try_collect()
            .await
            .map_err(|e| err("list rules", e))?;
        for msg in found {
            let ours = msg
                .attributes
                .iter()
                .any(|a| matches!(a, RuleAttribute::Protocol(p) if u8::from(*p) == ROUTE_PROTOCOL));
            if ours {
                undo_step(handle, &Action::AddRule(msg))
                    .await
                    .map_err(|e| format!("delete rule: {}", e.text))?;
                rules += 1;
            }
        }
        let found: Vec<RouteMessage> = handle
            .route()
            .get(version)
            .execute()
            .try_collect()
            .await
            .map_err(|e| err("list routes", e))?;
        for msg in found {
            if msg.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL) {
                undo_step(handle, &Action::AddRoute(msg))
                    .await
                    .map_err(|e| format!("delete route: {}", e.text))?;
                routes += 1;
            }
        }
    }
    Ok((rules, routes))
}

/// Configures the kernel for `plan`. On error nothing is left changed.
///
/// Runs inside a tokio runtime (it spawns its netlink connection task). Let it finish: a
/// future dropped halfway leaves what it had done so far in place.
pub async fn apply(plan: &NetPlan) -> Result<AppliedNet, NetcfgError> {
    apply_inner(plan, None).await
}

/// Like [`apply`], but step number `fail_at` (0-based, in journal order) fails as if the kernel
/// had refused it. For tests of the rollback.
#[doc(hidden)]
pub async fn apply_with_injected_failure(
    plan: &NetPlan,
    fail_at: usize,
) -> Result<AppliedNet, NetcfgError> {
    apply_inner(plan, Some(fail_at)).await
}

async fn apply_inner(plan: &NetPlan, fail_at: Option<usize>) -> Result<AppliedNet, NetcfgError> {
    check_plan(plan).map_err(NetcfgError::Invalid)?;
    let (connection, handle, _) = rtnetlink::new_connection()
        .map_err(|e| NetcfgError::Invalid(format!("cannot open a netlink socket: {e}")))?;
    let connection = tokio::spawn(connection);
    let mut applied = AppliedNet {
        handle,
        connection,
        journal: Vec::new(),
        links: Vec::new(),
        link_plans: plan.links.clone(),
        fwmark: None,
        tunnel_table: None,
        warnings: Vec::new(),
        tun_index: 0,
        tun_name: plan.tun_name.clone(),
        table_setting: plan.table,
        addresses: plan.addresses.clone(),
        allowed: plan.allowed_ips.iter().map(|n| n.trunc()).collect(),
        torn_down: false,
    };
    let state = match read_state(&applied.handle).await {
        Ok(state) => state,
        Err(e) => {
            applied.finish();
            return Err(NetcfgError::Invalid(format!(
                "cannot read the network configuration: {e}"
            )));
        }
    };
    let layout = match plan_layout(plan, &state) {
        Ok(layout) => layout,
        Err(e) => {
            applied.finish();
            return Err(NetcfgError::Invalid(e));
        }
    };
    applied.links = layout.links;
    applied.fwmark = layout.fwmark;
    applied.tunnel_table = layout.tunnel_table;
    applied.warnings = layout.warnings;
    applied.tun_index = layout.tun_index;
    match run_steps(&applied.handle, layout.steps, fail_at).await {
        Ok(done) => applied.journal = done,
        Err(e) => {
            applied.finish();
            return Err(e);
        }
    }
    Ok(applied)
}

/// The result of a successful [`apply`]: what the daemon needs to know, and the undo journal.
///
/// Dropping it without [`teardown`](Self::teardown) leaves the configuration in place.
#[derive(Debug)]
pub struct AppliedNet {
    handle: Handle,
    connection: JoinHandle<()>,
    journal: Vec<Step>,
    links: Vec<LinkRouting>,
    link_plans: Vec<WanLinkPlan>,
    fwmark: Option<u32>,
    tunnel_table: Option<u32>,
    warnings: Vec<String>,
    tun_index: u32,
    tun_name: String,
    /// The plan's settings that a reload of the allowed IPs needs.
    table_setting: RouteTableSetting,
    addresses: Vec<IpNet>,
    /// The allowed IPs configured now (normalised), routed or not.
    allowed: BTreeSet<IpNet>,
    torn_down: bool,
}

impl AppliedNet {
    /// A [`WanWatcher`] that ignores the TUN device's own changes. Call inside a tokio runtime.
    pub fn wan_watcher(&self) -> Result<WanWatcher, NetcfgError> {
        let mut watcher = WanWatcher::new()?;
        watcher.ignore_index = Some(self.tun_index);
        Ok(watcher)
    }

    /// Per link (same order as [`NetPlan::links`]): its mark, table and route.
    pub fn links(&self) -> &[LinkRouting] {
        &self.links
    }

    /// The mark that bypasses the tunnel (set it with SO_MARK on sockets that are not link
    /// sockets, e.g. a hub's listen socket in a full tunnel); `None` without tunnel rules.
    pub fn fwmark(&self) -> Option<u32> {
        self.fwmark
    }

    /// The table holding the allowed-IP routes, if not the main table (or none with `Off`).
    pub fn tunnel_table(&self) -> Option<u32> {
        self.tunnel_table
    }

    /// Things that work but deserve the admin's attention (log them at warn level).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// What was added, in order (e.g. "add route 0.0.0.0/0 dev wgb0 table 51820").
    pub fn journal(&self) -> impl Iterator<Item = &str> {
        self.journal.iter().map(|s| s.desc.as_str())
    }

    /// Re-resolves link `index`'s WAN interface and gateway (after a DHCP renew, a modem
    /// reconnect, a WAN that came up later) and replaces the route in its table. If no gateway
    /// can be found any more, the previous one is kept. Returns the link's new routing.
    pub async fn refresh_link(&mut self, index: usize) -> Result<LinkRouting, NetcfgError> {
        let (Some(plan), Some(current)) = (self.link_plans.get(index), self.links.get(index))
        else {
            return Err(NetcfgError::Invalid(format!("no link with index {index}")));
        };
        let (plan, current) = (plan.clone(), current.clone());
        let state = read_state(&self.handle).await.map_err(|e| {
            NetcfgError::Invalid(format!("cannot read the network configuration: {e}"))
        })?;
        let resolved = resolve_link(&plan, &state).map_err(NetcfgError::Invalid)?;
        if !resolved.up {
            // The kernel flushed the WAN's routes; they come back with the next refresh.
            return Ok(current);
        }
        let mut updated = current.clone();
        updated.interface = resolved.ifname.clone();
        for family in link_families(&plan) {
            let previous = match family {
                Family::V4 => current.v4,
                Family::V6 => current.v6,
            };
            let mut wanted = resolved.nexthop(family);
            // A vanished gateway is usually a WAN in the middle of reconnecting: keep the
            // last known one rather than sending on-link.
            if matches!(wanted, None | Some(Nexthop::OnLink))
                && plan.gateway.is_none()
                && matches!(previous, Some(Nexthop::Via(_)))
                && !resolved.has_default_route(family)
            {
                wanted = previous;
            }
            let existing = self.journal.iter().position(|s| {
                s.owner.as_deref() == Some(plan.name.as_str()) && s.gateway == Some(family)
            });
            match wanted {
                Some(nexthop) => {
                    let spec = link_route(current.table, &resolved, family, nexthop);
                    let step = Step {
                        desc: spec.describe(&format!("link `{}`: add", plan.name)),
                        action: Action::AddRoute(spec.message()),
                        owner: Some(plan.name.clone()),
                        gateway: Some(family),
                        allowed: None,
                    };
                    // Unchanged routes are left alone: no churn, no notifications.
                    let present =
                        existing.is_some() && state.routes.iter().any(|r| spec.matches(r));
                    if let (false, Action::AddRoute(msg)) = (present, &step.action) {
                        ack_request(
                            &self.handle,
                            RouteNetlinkMessage::NewRoute(msg.clone()),
                            NLM_F_CREATE | NLM_F_REPLACE,
                        )
                        .await
                        .map_err(|e| NetcfgError::Step {
                            step: step.desc.clone(),
                            cause: e.text,
                            rollback: Vec::new(),
                        })?;
                    }
                    match existing {
                        Some(i) => self.journal[i] = step,
                        None => self.journal.push(step),
                    }
                }
                None => {
                    if let Some(i) = existing {
                        let step = self.journal.remove(i);
                        if let Err(e) = undo_step(&self.handle, &step.action).await {
                            return Err(NetcfgError::Step {
                                step: format!("undo `{}`", step.desc),
                                cause: e.text,
                                rollback: Vec::new(),
                            });
                        }
                    }
                }
            }
            match family {
                Family::V4 => updated.v4 = wanted,
                Family::V6 => updated.v6 = wanted,
            }
        }
        self.links[index] = updated.clone();
        Ok(updated)
    }

    /// [`refresh_link`](Self::refresh_link) for every link; one result per link, in order.
    pub async fn refresh_links(&mut self) -> Vec<Result<LinkRouting, NetcfgError>> {
        let mut results = Vec::with_capacity(self.links.len());
        for index in 0..self.links.len() {
            results.push(self.refresh_link(index).await);
        }
        results
    }

    /// Adds one WAN link to a running configuration (config reload): its own table and mark,
    /// numbered after the free numbers from [`FIRST_TABLE`] on, its routes and rules, all
    /// recorded in the undo journal. On error nothing is left changed. Returns the link's
    /// routing (append it to the caller's list: [`links`](Self::links) gets it at the end) and
    /// warnings worth logging.
    pub async fn add_link(
        &mut self,
        plan: &WanLinkPlan,
    ) -> Result<(LinkRouting, Vec<String>), NetcfgError> {
        self.add_link_inner(plan, None).await
    }

    /// Like [`add_link`](Self::add_link), but its step number `fail_at` fails as if the kernel
    /// had refused it. For tests of the rollback.
    #[doc(hidden)]
    pub async fn add_link_with_injected_failure(
        &mut self,
        plan: &WanLinkPlan,
        fail_at: usize,
    ) -> Result<(LinkRouting, Vec<String>), NetcfgError> {
        self.add_link_inner(plan, Some(fail_at)).await
    }

    async fn add_link_inner(
        &mut self,
        plan: &WanLinkPlan,
        fail_at: Option<usize>,
    ) -> Result<(LinkRouting, Vec<String>), NetcfgError> {
        if self.link_plans.iter().any(|l| l.name == plan.name) {
            return Err(NetcfgError::Invalid(format!(
                "link `{}` is listed twice",
                plan.name
            )));
        }
        let mut all = self.link_plans.clone();
        all.push(plan.clone());
        check_plan(&NetPlan {
            tun_name: "x".into(),
            addresses: Vec::new(),
            mtu: 1280,
            allowed_ips: Vec::new(),
            table: RouteTableSetting::Off,
            fwmark: None,
            links: all,
        })
        .map_err(NetcfgError::Invalid)?;
        let state = read_state(&self.handle).await.map_err(|e| {
            NetcfgError::Invalid(format!("cannot read the network configuration: {e}"))
        })?;
        let res = resolve_link(plan, &state).map_err(NetcfgError::Invalid)?;
        let taken = |n: u32| {
            state.table_used(n)
                || state.mark_used(n)
                || self.fwmark == Some(n)
                || self.tunnel_table == Some(n)
                || self.links.iter().any(|l| l.table == n || l.mark == n)
        };
        let number = (FIRST_TABLE + 1..FIRST_TABLE + TABLE_SEARCH_LIMIT)
            .find(|&n| !taken(n))
            .ok_or_else(|| {
                NetcfgError::Invalid(format!(
                    "no free routing tables in {FIRST_TABLE}..{}",
                    FIRST_TABLE + TABLE_SEARCH_LIMIT
                ))
            })?;
        let layout = link_layout(plan, &res, number);
        if let Some(rule) = layout
            .rules
            .iter()
            .find(|r| state.rules.iter().any(|e| e.same_as(r)))
        {
            return Err(NetcfgError::Invalid(format!(
                "link `{}`: {} rule `{}` already exists",
                plan.name,
                rule.family.label(),
                rule.text()
            )));
        }
        let done = run_steps(&self.handle, layout.steps, fail_at).await?;
        self.journal.extend(done);
        self.links.push(layout.routing.clone());
        self.link_plans.push(plan.clone());
        Ok((layout.routing, layout.warnings))
    }

    /// Routes a new set of allowed IPs (config reload): routes for new prefixes are added
    /// first (rolled back if one fails), then routes for dropped prefixes removed. Adding or
    /// dropping a default route (`/0`) with `table = auto` changes the full-tunnel rules and is
    /// refused (a restart does it); so is a route that clashes with one already there.
    pub async fn set_allowed_ips(&mut self, nets: &[IpNet]) -> Result<(), NetcfgError> {
        let wanted: BTreeSet<IpNet> = nets.iter().map(|n| n.trunc()).collect();
        if self.table_setting == RouteTableSetting::Auto {
            for family in [Family::V4, Family::V6] {
                let zero = family.zero_net();
                if wanted.contains(&zero) != self.allowed.contains(&zero) {
                    return Err(NetcfgError::Invalid(format!(
                        "adding or removing the default route {zero} in allowed_ips needs a restart"
                    )));
                }
            }
        }
        if self.table_setting == RouteTableSetting::Off {
            self.allowed = wanted;
            return Ok(());
        }
        let state = read_state(&self.handle).await.map_err(|e| {
            NetcfgError::Invalid(format!("cannot read the network configuration: {e}"))
        })?;
        let mut steps = Vec::new();
        for net in wanted.difference(&self.allowed) {
            let table = match self.table_setting {
                RouteTableSetting::Id(t) => t,
                _ if net.prefix_len() == 0 => self.tunnel_table.unwrap_or(TABLE_MAIN),
                _ => TABLE_MAIN,
            };
            if table == TABLE_MAIN
                && self
                    .addresses
                    .iter()
                    .any(|a| a.prefix_len() < a.max_prefix_len() && a.trunc().contains(net))
            {
                continue;
            }
            let family = Family::of(net.addr());
            if state.routes.iter().any(|r| {
                r.family == family
                    && r.table == table
                    && r.dst_len == net.prefix_len()
                    && r.dst.unwrap_or(family.zero_net().addr()) == net.addr()
                    && r.metric == family.default_metric()
            }) {
                return Err(NetcfgError::Invalid(format!(
                    "allowed_ips {net}: table {} already has a route to {net}",
                    table_name(table)
                )));
            }
            let spec = RouteSpec {
                dst: *net,
                table,
                dev: Some((self.tun_index, self.tun_name.clone())),
                gateway: None,
                metric: None,
                unreachable: false,
            };
            let mut step = route_step("add", &spec, None, None);
            step.allowed = Some(*net);
            steps.push(step);
        }
        let done = run_steps(&self.handle, steps, None).await?;
        self.journal.extend(done);
        let mut failures = Vec::new();
        for net in self.allowed.difference(&wanted) {
            if let Some(i) = self.journal.iter().position(|s| s.allowed == Some(*net)) {
                let step = self.journal.remove(i);
                if let Err(e) = undo_step(&self.handle, &step.action).await {
                    failures.push(format!("undo `{}`: {}", step.desc, e.text));
                }
            }
        }
        self.allowed = wanted;
        if failures.is_empty() {
            Ok(())
        } else {
            Err(NetcfgError::Teardown(failures))
        }
    }

    /// Removes one link's routes and rules (config reload), newest first, and drops it from
    /// [`links`](Self::links). Every step runs even if one fails; the failures are returned.
    pub async fn remove_link(&mut self, name: &str) -> Result<(), NetcfgError> {
        let Some(index) = self.link_plans.iter().position(|l| l.name == name) else {
            return Err(NetcfgError::Invalid(format!("no link named `{name}`")));
        };
        self.link_plans.remove(index);
        if let Some(i) = self.links.iter().position(|l| l.name == name) {
            self.links.remove(i);
        }
        let (mine, rest): (Vec<Step>, Vec<Step>) = std::mem::take(&mut self.journal)
            .into_iter()
            .partition(|s| s.owner.as_deref() == Some(name));
        self.journal = rest;
        let mut failures = Vec::new();
        for step in mine.into_iter().rev() {
            tracing::debug!(step = %step.desc, "netcfg undo");
            if let Err(e) = undo_step(&self.handle, &step.action).await {
                failures.push(format!("undo `{}`: {}", step.desc, e.text));
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(NetcfgError::Teardown(failures))
        }
    }

    /// Removes everything [`apply`] (and [`refresh_link`](Self::refresh_link)) added, newest
    /// first. Objects already gone (e.g. with the TUN device) are not an error.
    pub async fn teardown(mut self) -> Result<(), NetcfgError> {
        let failures = self.undo_all().await;
        self.finish();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(NetcfgError::Teardown(failures))
        }
    }

    /// Undoes the journal newest first; returns the undo steps that failed.
    async fn undo_all(&mut self) -> Vec<String> {
        let mut failures = Vec::new();
        while let Some(step) = self.journal.pop() {
            tracing::debug!(step = %step.desc, "netcfg undo");
            if let Err(e) = undo_step(&self.handle, &step.action).await {
                failures.push(format!("undo `{}`: {}", step.desc, e.text));
            }
        }
        failures
    }

    fn finish(&mut self) {
        self.torn_down = true;
        self.connection.abort();
    }
}

impl Drop for AppliedNet {
    fn drop(&mut self) {
        if !self.torn_down {
            if !self.journal.is_empty() {
                tracing::debug!(
                    objects = self.journal.len(),
                    "network configuration left in place (no teardown)"
                );
            }
            self.connection.abort();
        }
    }
}

/// Notices kernel changes that can move a WAN's gateway (interfaces going up or down,
/// addresses, routes), so the daemon knows when to call [`AppliedNet::refresh_links`].
/// wgbond's own routes (protocol [`ROUTE_PROTOCOL`]) are ignored, so a refresh does not
/// trigger another one.
#[derive(Debug)]
pub struct WanWatcher {
    messages: futures::channel::mpsc::UnboundedReceiver<(
        NetlinkMessage<RouteNetlinkMessage>,
        netlink_sys::SocketAddr,
    )>,
    connection: JoinHandle<()>,
    /// Interface whose changes do not matter (the TUN device).
    ignore_index: Option<u32>,
}

impl WanWatcher {
    /// Subscribes to link, address and route notifications. Call inside a tokio runtime.
    pub fn new() -> Result<Self, NetcfgError> {
        use netlink_sys::AsyncSocket;
        use rtnetlink::constants::{
            RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE,
            RTMGRP_LINK,
        };
        let err =
            |e: std::io::Error| NetcfgError::Invalid(format!("cannot watch network changes: {e}"));
        let (mut connection, _handle, messages) = rtnetlink::new_connection().map_err(err)?;
        let groups = RTMGRP_LINK
            | RTMGRP_IPV4_IFADDR
            | RTMGRP_IPV6_IFADDR
            | RTMGRP_IPV4_ROUTE
            | RTMGRP_IPV6_ROUTE;
        connection
            .socket_mut()
            .socket_mut()
            .bind(&netlink_sys::SocketAddr::new(0, groups))
            .map_err(err)?;
        Ok(Self {
            messages,
            connection: tokio::spawn(connection),
            ignore_index: None,
        })
    }

    /// Waits for a relevant change, then until `settle` passes without another (a DHCP renew
    /// or a modem reconnect is a burst of changes), at most 10 x `settle` in all. Returns
    /// `false` if the notification socket closed.
    pub async fn changed(&mut self, settle: std::time::Duration) -> bool {
        loop {
            match self.messages.next().await {
                None => return false,
                Some((msg, _)) if is_wan_relevant(&msg.payload, self.ignore_index) => break,
                Some(_) => {}
            }
        }
        let deadline = tokio::time::Instant::now() + settle * 10;
        loop {
            let wait = settle.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            if wait.is_zero() {
                return true;
            }
            match tokio::time::timeout(wait, self.messages.next()).await {
                Err(_) => return true,
                Ok(None) => return false,
                Ok(Some(_)) => {}
            }
        }
    }
}

impl Drop for WanWatcher {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

fn is_wan_relevant(payload: &NetlinkPayload<RouteNetlinkMessage>, ignore: Option<u32>) -> bool {
    match payload {
        NetlinkPayload::InnerMessage(msg) => match msg {
            RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l) => {
                Some(l.header.index) != ignore
            }
            RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a) => {
                Some(a.header.index) != ignore
            }
            RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
                r.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL)
                    && parse_route(r).is_some_and(|r| {
                        r.table != TABLE_LOCAL && (r.oif.is_none() || r.oif != ignore)
                    })
            }
            _ => false,
        },
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Planning: a pure function of the plan and the system's current state.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    fn af(self) -> AddressFamily {
        match self {
            Self::V4 => AddressFamily::Inet,
            Self::V6 => AddressFamily::Inet6,
        }
    }

    fn from_af(af: AddressFamily) -> Option<Self> {
        match af {
            AddressFamily::Inet => Some(Self::V4),
            AddressFamily::Inet6 => Some(Self::V6),
            _ => None,
        }
    }

    fn zero_net(self) -> IpNet {
        match self {
            Self::V4 => IpNet::V4(ipnet::Ipv4Net::default()),
            Self::V6 => IpNet::V6(ipnet::Ipv6Net::default()),
        }
    }

    fn default_metric(self) -> u32 {
        match self {
            Self::V4 => DEFAULT_METRIC_V4,
            Self::V6 => DEFAULT_METRIC_V6,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }
}

/// One mutating step and how to describe it.
#[derive(Debug, Clone)]
struct Step {
    desc: String,
    action: Action,
    /// The link (by name) whose table or rule this is, so it can be removed on its own.
    owner: Option<String>,
    /// Set on a link table's gateway route, so refresh can replace it.
    gateway: Option<Family>,
    /// Set on an allowed-IP route, so a reload can remove it on its own.
    allowed: Option<IpNet>,
}

#[derive(Debug, Clone)]
enum Action {
    SetMtu { index: u32, mtu: u32, old: u32 },
    AddAddress { index: u32, net: IpNet },
    SetUp { index: u32 },
    AddRoute(RouteMessage),
    AddRule(RuleMessage),
}

#[derive(Debug)]
struct Layout {
    tun_index: u32,
    steps: Vec<Step>,
    links: Vec<LinkRouting>,
    fwmark: Option<u32>,
    tunnel_table: Option<u32>,
    warnings: Vec<String>,
}

/// Checks the plan on its own, before looking at the system.
fn check_plan(plan: &NetPlan) -> Result<(), String> {
    if plan.tun_name.is_empty() || plan.tun_name.len() > 15 {
        return Err(format!(
            "interface name `{}` must be 1 to 15 characters",
            plan.tun_name
        ));
    }
    let min_mtu = if plan.addresses.iter().any(|a| matches!(a, IpNet::V6(_))) {
        1280
    } else {
        576
    };
    if plan.mtu < min_mtu || plan.mtu > 65535 {
        return Err(format!(
            "MTU {} is out of range ({min_mtu}..=65535)",
            plan.mtu
        ));
    }
    if let RouteTableSetting::Id(t) = plan.table {
        if t == 0 || t == TABLE_LOCAL {
            return Err(format!(
                "table {t} cannot hold the tunnel's routes (0 is unspecified, 255 is the kernel's local table)"
            ));
        }
    }
    let mut names = BTreeSet::new();
    for link in &plan.links {
        if !names.insert(link.name.as_str()) {
            return Err(format!("link `{}` is listed twice", link.name));
        }
        if let (WanBind::Address(addr), Some(gw)) = (&link.bind, link.gateway) {
            if Family::of(*addr) != Family::of(gw) {
                return Err(format!(
                    "link `{}`: gateway {gw} and bind_address {addr} are of different address families",
                    link.name
                ));
            }
        }
    }
    Ok(())
}

/// A link's WAN interface and its nexthops, as found in the system.
#[derive(Debug)]
struct ResolvedLink {
    ifindex: u32,
    ifname: String,
    up: bool,
    v4: Option<Nexthop>,
    v6: Option<Nexthop>,
    v4_default: bool,
    v6_default: bool,
}

impl ResolvedLink {
    fn nexthop(&self, family: Family) -> Option<Nexthop> {
        match family {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
    }

    fn has_default_route(&self, family: Family) -> bool {
        match family {
            Family::V4 => self.v4_default,
            Family::V6 => self.v6_default,
        }
    }
}

/// The address families a link's socket can use.
fn link_families(link: &WanLinkPlan) -> Vec<Family> {
    match &link.bind {
        WanBind::Interface(_) => vec![Family::V4, Family::V6],
        WanBind::Address(addr) => vec![Family::of(*addr)],
    }
}

fn resolve_link(link: &WanLinkPlan, state: &SystemState) -> Result<ResolvedLink, String> {
    let ifinfo = match &link.bind {
        WanBind::Interface(name) => state
            .links
            .iter()
            .find(|l| &l.name == name)
            .ok_or_else(|| format!("link `{}`: interface {name} does not exist", link.name))?,
        WanBind::Address(addr) => {
            let owner = state
                .addrs
                .iter()
                .find(|a| a.addr == *addr)
                .ok_or_else(|| {
                    format!(
                        "link `{}`: no interface has the address {addr} (bind_address)",
                        link.name
                    )
                })?;
            state
                .links
                .iter()
                .find(|l| l.index == owner.index)
                .ok_or_else(|| {
                    format!(
                        "link `{}`: the interface owning {addr} disappeared",
                        link.name
                    )
                })?
        }
    };
    let found = |family: Family| -> Option<Option<IpAddr>> {
        if let Some(gw) = link.gateway.filter(|gw| Family::of(*gw) == family) {
            return Some(Some(gw));
        }
        find_default_gateway(state, ifinfo.index, family)
    };
    let v4_found = found(Family::V4);
    let v6_found = found(Family::V6);
    let to_nexthop =
        |f: Option<Option<IpAddr>>| f.map(|gw| gw.map_or(Nexthop::OnLink, Nexthop::Via));
    Ok(ResolvedLink {
        ifindex: ifinfo.index,
        ifname: ifinfo.name.clone(),
        up: ifinfo.up,
        // IPv4 without a known gateway goes on-link (point-to-point WANs); IPv6 without a
        // default route is not routed at all.
        v4: Some(to_nexthop(v4_found).unwrap_or(Nexthop::OnLink)),
        v6: to_nexthop(v6_found),
        v4_default: v4_found.is_some(),
        v6_default: v6_found.is_some(),
    })
}

/// The best default route through `ifindex` (main table first, then other tables, lowest
/// metric): `Some(Some(gw))`, `Some(None)` for a gateway-less (point-to-point) default route,
/// `None` if there is none. Ignores wgbond's own routes.
fn find_default_gateway(
    state: &SystemState,
    ifindex: u32,
    family: Family,
) -> Option<Option<IpAddr>> {
    let mut best: Option<((bool, u32), Option<IpAddr>)> = None;
    for route in &state.routes {
        if route.family != family
            || route.dst_len != 0
            || route.kind != RouteType::Unicast
            || route.protocol == RouteProtocol::Other(ROUTE_PROTOCOL)
            || route.table == TABLE_LOCAL
        {
            continue;
        }
        let rank = (route.table != TABLE_MAIN, route.metric);
        let mut consider = |gw: Option<IpAddr>| {
            if best.as_ref().is_none_or(|(r, _)| rank < *r) {
                best = Some((rank, gw));
            }
        };
        if route.oif == Some(ifindex) {
            consider(route.gateway);
        }
        for (oif, gw) in &route.multipath {
            if *oif == ifindex {
                consider(*gw);
            }
        }
    }
    best.map(|(_, gw)| gw)
}

/// Reads the effective rp_filter of an interface (max of `all` and the interface).
fn rp_filter(ifname: &str) -> Option<u8> {
    let read = |name: &str| -> Option<u8> {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{name}/rp_filter"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some(read("all")?.max(read(ifname)?))
}

fn plan_layout(plan: &NetPlan, state: &SystemState) -> Result<Layout, String> {
    let tun = state
        .links
        .iter()
        .find(|l| l.name == plan.tun_name)
        .ok_or_else(|| format!("interface {} does not exist", plan.tun_name))?;

    let resolved = plan
        .links
        .iter()
        .map(|link| resolve_link(link, state))
        .collect::<Result<Vec<_>, _>>()?;

    // Allowed IPs, normalised and deduplicated; which families get a full tunnel.
    let allowed: BTreeSet<IpNet> = plan.allowed_ips.iter().map(|n| n.trunc()).collect();
    let full_tunnel: Vec<Family> = [Family::V4, Family::V6]
        .into_iter()
        .filter(|f| allowed.contains(&f.zero_net()))
        .collect();
    let auto_full = plan.table == RouteTableSetting::Auto && !full_tunnel.is_empty();
    let id_table = match plan.table {
        RouteTableSetting::Id(t) => Some(t),
        _ => None,
    };
    let fwmark = plan.fwmark.filter(|m| *m != 0);

    // Tables and marks: base = tunnel table, base + 1 + i = link i's table and mark.
    let needed = u32::try_from(plan.links.len())
        .map_err(|_| "too many links".to_owned())?
        .saturating_add(1);
    let base = (FIRST_TABLE..FIRST_TABLE + TABLE_SEARCH_LIMIT)
        .find(|&base| {
            (base..base + needed).all(|t| {
                !state.table_used(t)
                    && Some(t) != id_table
                    && (t == base || (!state.mark_used(t) && Some(t) != fwmark))
            }) && (!auto_full || fwmark.is_some() || !state.mark_used(base))
        })
        .ok_or_else(|| {
            format!(
                "no free routing tables in {FIRST_TABLE}..{}",
                FIRST_TABLE + TABLE_SEARCH_LIMIT
            )
        })?;

    let mut steps = Vec::new();
    let mut warnings = Vec::new();
    let mut planned_rules: Vec<RuleSpec> = Vec::new();

    // The TUN device itself.
    if tun.mtu != plan.mtu {
        steps.push(Step {
            desc: format!("set MTU of {} to {}", tun.name, plan.mtu),
            action: Action::SetMtu {
                index: tun.index,
                mtu: plan.mtu,
                old: tun.mtu,
            },
            owner: None,
            gateway: None,
            allowed: None,
        });
    }
    for net in &plan.addresses {
        let exists = state
            .addrs
            .iter()
            .any(|a| a.index == tun.index && a.addr == net.addr() && a.prefix == net.prefix_len());
        if exists {
            continue;
        }
        if let Some(other) = state
            .addrs
            .iter()
            .find(|a| a.addr == net.addr() && a.index != tun.index)
        {
            let owner = state.link_name(other.index);
            return Err(format!(
                "address {} is already assigned to {owner}",
                net.addr()
            ));
        }
        steps.push(Step {
            desc: format!("add address {net} to {}", tun.name),
            action: Action::AddAddress {
                index: tun.index,
                net: *net,
            },
            owner: None,
            gateway: None,
            allowed: None,
        });
    }
    if !tun.up {
        steps.push(Step {
            desc: format!("bring {} up", tun.name),
            action: Action::SetUp { index: tun.index },
            owner: None,
            gateway: None,
            allowed: None,
        });
    }

    // Per-link tables and rules, before any tunnel route can capture the links' packets.
    let mut links = Vec::new();
    for (i, (link, res)) in plan.links.iter().zip(&resolved).enumerate() {
        let offset = u32::try_from(i).map_err(|_| "too many links".to_owned())? + 1;
        let number = base + offset;
        let layout = link_layout(link, res, number);
        steps.extend(layout.steps);
        planned_rules.extend(layout.rules);
        warnings.extend(layout.warnings);
        links.push(layout.routing);
    }

    // Allowed-IP routes into the TUN device.
    let tunnel_table = match plan.table {
        RouteTableSetting::Off => None,
        RouteTableSetting::Id(t) => Some(t),
        RouteTableSetting::Auto if auto_full => Some(base),
        RouteTableSetting::Auto => None,
    };
    if plan.table != RouteTableSetting::Off {
        for net in &allowed {
            let table = match plan.table {
                RouteTableSetting::Id(t) => t,
                _ if net.prefix_len() == 0 => base,
                _ => TABLE_MAIN,
            };
            // The kernel already routes an address's own prefix into the TUN device.
            if table == TABLE_MAIN
                && plan
                    .addresses
                    .iter()
                    .any(|a| a.prefix_len() < a.max_prefix_len() && a.trunc().contains(net))
            {
                continue;
            }
            let spec = RouteSpec {
                dst: *net,
                table,
                dev: Some((tun.index, tun.name.clone())),
                gateway: None,
                metric: None,
                unreachable: false,
            };
            if table == TABLE_MAIN || Some(table) == id_table {
                let family = Family::of(net.addr());
                if let Some(clash) = state.routes.iter().find(|r| {
                    r.family == family
                        && r.table == table
                        && r.dst_len == net.prefix_len()
                        && r.dst.unwrap_or(family.zero_net().addr()) == net.addr()
                        && r.metric == family.default_metric()
                }) {
                    let via = clash
                        .oif
                        .map(|i| format!(" dev {}", state.link_name(i)))
                        .unwrap_or_default();
                    return Err(format!(
                        "allowed_ips {net}: table {} already has a route to {net}{via}",
                        table_name(table)
                    ));
                }
            }
            let mut step = route_step("add", &spec, None, None);
            step.allowed = Some(*net);
            steps.push(step);
        }
    }

    // Full tunnel (wg-quick style): more specific main routes first, then everything not
    // carrying the bypass mark into the tunnel table.
    let mut bypass_mark = None;
    if auto_full {
        let mark = fwmark.unwrap_or(base);
        bypass_mark = Some(mark);
        for &family in &full_tunnel {
            let suppress = RuleSpec {
                family,
                priority: RULE_PRIORITY_SUPPRESS,
                table: TABLE_MAIN,
                fwmark: None,
                invert: false,
                src: None,
                suppress_prefixlen: Some(0),
            };
            let tunnel = RuleSpec {
                family,
                priority: RULE_PRIORITY_TUNNEL,
                table: base,
                fwmark: Some(mark),
                invert: true,
                src: None,
                suppress_prefixlen: None,
            };
            steps.push(rule_step("add", &suppress));
            steps.push(rule_step("add", &tunnel));
            planned_rules.push(suppress);
            planned_rules.push(tunnel);
        }
        if plan.links.is_empty() {
            warnings.push(format!(
                "full tunnel without links: sockets that must bypass the tunnel need mark {mark:#x}"
            ));
        }
    }

    // An identical rule already present means a second full tunnel or a leftover: refuse
    // rather than share (the other owner's teardown would remove it under us).
    for rule in &planned_rules {
        if let Some(existing) = state.rules.iter().find(|r| r.same_as(rule)) {
            let leftover = if existing.protocol == Some(ROUTE_PROTOCOL) {
                " (another wgbond full tunnel is up, or one did not shut down cleanly)"
            } else {
                ""
            };
            return Err(format!(
                "{} rule `{}` already exists{leftover}; if it is a leftover, remove it with `ip{} rule del {}`",
                rule.family.label(),
                rule.text(),
                if rule.family == Family::V6 { " -6" } else { "" },
                rule.text()
            ));
        }
    }
    Ok(Layout {
        tun_index: tun.index,
        steps,
        links,
        fwmark: bypass_mark,
        tunnel_table,
        warnings,
    })
}

/// What one link adds: its table's routes and its rules.
struct LinkLayout {
    steps: Vec<Step>,
    routing: LinkRouting,
    rules: Vec<RuleSpec>,
    warnings: Vec<String>,
}

/// The steps for one link whose table and mark are both `number`.
fn link_layout(link: &WanLinkPlan, res: &ResolvedLink, number: u32) -> LinkLayout {
    let (table, mark) = (number, number);
    let prefix = format!("link `{}`: add", link.name);
    let owner = Some(link.name.clone());
    let mut steps = Vec::new();
    let mut rules = Vec::new();
    let mut warnings = Vec::new();
    let mut routing = LinkRouting {
        name: link.name.clone(),
        mark,
        table,
        interface: res.ifname.clone(),
        v4: None,
        v6: None,
    };
    if !res.up {
        warnings.push(format!(
            "link `{}`: {} is down; its route is added when it comes up (refresh)",
            link.name, res.ifname
        ));
    }
    for family in link_families(link) {
        let fallback = RouteSpec {
            dst: family.zero_net(),
            table,
            dev: None,
            gateway: None,
            metric: Some(FALLBACK_METRIC),
            unreachable: true,
        };
        steps.push(route_step(&prefix, &fallback, owner.clone(), None));
        if let Some(nexthop) = res.nexthop(family).filter(|_| res.up) {
            let spec = link_route(table, res, family, nexthop);
            steps.push(route_step(&prefix, &spec, owner.clone(), Some(family)));
            match family {
                Family::V4 => routing.v4 = Some(nexthop),
                Family::V6 => routing.v6 = Some(nexthop),
            }
        }
    }
    for family in link_families(link) {
        rules.push(RuleSpec {
            family,
            priority: RULE_PRIORITY_LINK,
            table,
            fwmark: Some(mark),
            invert: false,
            src: None,
            suppress_prefixlen: None,
        });
    }
    if let WanBind::Address(addr) = link.bind {
        rules.push(RuleSpec {
            family: Family::of(addr),
            priority: RULE_PRIORITY_LINK,
            table,
            fwmark: None,
            invert: false,
            src: Some(IpNet::from(addr)),
            suppress_prefixlen: None,
        });
    }
    for rule in &rules {
        let mut step = rule_step(&prefix, rule);
        step.owner = owner.clone();
        steps.push(step);
    }
    if matches!(rp_filter(&res.ifname), Some(1)) {
        warnings.push(format!(
            "link `{}`: strict reverse-path filtering (rp_filter=1) on {} may drop the \
             link's replies; set net.ipv4.conf.{}.rp_filter=2",
            link.name, res.ifname, res.ifname
        ));
    }
    LinkLayout {
        steps,
        routing,
        rules,
        warnings,
    }
}

/// The route of link table `table` for one family.
fn link_route(table: u32, res: &ResolvedLink, family: Family, nexthop: Nexthop) -> RouteSpec {
    RouteSpec {
        dst: family.zero_net(),
        table,
        dev: Some((res.ifindex, res.ifname.clone())),
        gateway: match nexthop {
            Nexthop::Via(gw) => Some(gw),
            Nexthop::OnLink => None,
        },
        metric: None,
        unreachable: false,
    }
}

fn route_step(
    prefix: &str,
    spec: &RouteSpec,
    owner: Option<String>,
    gateway: Option<Family>,
) -> Step {
    Step {
        desc: spec.describe(prefix),
        action: Action::AddRoute(spec.message()),
        owner,
        gateway,
        allowed: None,
    }
}

fn rule_step(prefix: &str, spec: &RuleSpec) -> Step {
    Step {
        desc: format!("{prefix} {} rule `{}`", spec.family.label(), spec.text()),
        action: Action::AddRule(spec.message()),
        owner: None,
        gateway: None,
        allowed: None,
    }
}

fn table_name(table: u32) -> String {
    match table {
        TABLE_MAIN => "main".to_owned(),
        TABLE_LOCAL => "local".to_owned(),
        t => t.to_string(),
    }
}

/// A route wgbond adds.
#[derive(Debug, Clone)]
struct RouteSpec {
    dst: IpNet,
    table: u32,
    dev: Option<(u32, String)>,
    gateway: Option<IpAddr>,
    metric: Option<u32>,
    unreachable: bool,
}

impl RouteSpec {
    fn family(&self) -> Family {
        Family::of(self.dst.addr())
    }

    /// Whether `route` (from a dump) is this route.
    fn matches(&self, route: &RouteInfo) -> bool {
        let family = self.family();
        route.family == family
            && route.table == self.table
            && route.dst_len == self.dst.prefix_len()
            && route.dst.unwrap_or(family.zero_net().addr()) == self.dst.addr()
            && route.kind
                == if self.unreachable {
                    RouteType::Unreachable
                } else {
                    RouteType::Unicast
                }
            && route.oif == self.dev.as_ref().map(|(i, _)| *i)
            && route.gateway == self.gateway
            && route.metric == self.metric.unwrap_or(family.default_metric())
            && route.protocol == RouteProtocol::Other(ROUTE_PROTOCOL)
    }

    fn describe(&self, prefix: &str) -> String {
        let mut s = format!("{prefix} route ");
        if self.unreachable {
            s.push_str("unreachable ");
        }
        s.push_str(&self.dst.to_string());
        if let Some(gw) = self.gateway {
            s.push_str(&format!(" via {gw}"));
        }
        if let Some((_, name)) = &self.dev {
            s.push_str(&format!(" dev {name}"));
        }
        if let Some(metric) = self.metric {
            s.push_str(&format!(" metric {metric}"));
        }
        if self.table != TABLE_MAIN {
            s.push_str(&format!(" table {}", self.table));
        }
        s
    }

    fn message(&self) -> RouteMessage {
        let family = self.family();
        let mut msg = RouteMessage::default();
        msg.header.address_family = family.af();
        msg.header.destination_prefix_length = self.dst.prefix_len();
        msg.header.table = u8::try_from(self.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
        msg.header.protocol = RouteProtocol::Other(ROUTE_PROTOCOL);
        msg.header.kind = if self.unreachable {
            RouteType::Unreachable
        } else {
            RouteType::Unicast
        };
        // Like `ip route`: a device route without gateway is link scope (IPv4 only).
        msg.header.scope = if family == Family::V4 && self.gateway.is_none() && !self.unreachable {
            RouteScope::Link
        } else {
            RouteScope::Universe
        };
        msg.attributes.push(RouteAttribute::Table(self.table));
        if self.dst.prefix_len() > 0 {
            msg.attributes
                .push(RouteAttribute::Destination(route_address(self.dst.addr())));
        }
        if let Some((index, _)) = &self.dev {
            msg.attributes.push(RouteAttribute::Oif(*index));
        }
        if let Some(gw) = self.gateway {
            msg.attributes
                .push(RouteAttribute::Gateway(route_address(gw)));
            // The gateway is on the WAN by definition; onlink skips the kernel's reachability
            // lookup, which would otherwise run through our own rules.
            msg.header.flags.push(RouteFlag::Onlink);
        }
        if let Some(metric) = self.metric {
            msg.attributes.push(RouteAttribute::Priority(metric));
        }
        msg
    }
}

fn route_address(addr: IpAddr) -> RouteAddress {
    match addr {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

/// A policy routing rule wgbond adds (always `lookup TABLE`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct RuleSpec {
    family: Family,
    priority: u32,
    table: u32,
    fwmark: Option<u32>,
    invert: bool,
    src: Option<IpNet>,
    suppress_prefixlen: Option<u32>,
}

impl RuleSpec {
    /// In `ip rule add` syntax.
    fn text(&self) -> String {
        let mut s = format!("priority {} ", self.priority);
        if self.invert {
            s.push_str("not ");
        }
        match self.src {
            Some(src) => s.push_str(&format!("from {src} ")),
            None => s.push_str("from all "),
        }
        if let Some(mark) = self.fwmark {
            s.push_str(&format!("fwmark {mark:#x} "));
        }
        s.push_str(&format!("lookup {}", table_name(self.table)));
        if let Some(n) = self.suppress_prefixlen {
            s.push_str(&format!(" suppress_prefixlength {n}"));
        }
        s
    }

    fn message(&self) -> RuleMessage {
        let mut msg = RuleMessage::default();
        msg.header.family = self.family.af();
        msg.header.table = u8::try_from(self.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
        msg.header.action = RuleAction::ToTable;
        if self.invert {
            msg.header.flags.push(RuleFlag::Invert);
        }
        msg.attributes.push(RuleAttribute::Priority(self.priority));
        msg.attributes.push(RuleAttribute::Table(self.table));
        msg.attributes
            .push(RuleAttribute::Protocol(RouteProtocol::Other(
                ROUTE_PROTOCOL,
            )));
        if let Some(mark) = self.fwmark {
            msg.attributes.push(RuleAttribute::FwMark(mark));
        }
        if let Some(src) = self.src {
            msg.header.src_len = src.prefix_len();
            msg.attributes.push(RuleAttribute::Source(src.addr()));
        }
        if let Some(n) = self.suppress_prefixlen {
            msg.attributes.push(RuleAttribute::SuppressPrefixLen(n));
        }
        msg
    }
}

// ---------------------------------------------------------------------------------------------
// The system's current state, as far as planning needs it.

#[derive(Debug, Clone)]
struct LinkInfo {
    index: u32,
    name: String,
    mtu: u32,
    up: bool,
}

#[derive(Debug, Clone)]
struct AddrInfo {
    index: u32,
    addr: IpAddr,
    prefix: u8,
}

#[derive(Debug, Clone)]
struct RouteInfo {
    family: Family,
    table: u32,
    dst: Option<IpAddr>,
    dst_len: u8,
    oif: Option<u32>,
    gateway: Option<IpAddr>,
    metric: u32,
    kind: RouteType,
    protocol: RouteProtocol,
    multipath: Vec<(u32, Option<IpAddr>)>,
}

#[derive(Debug, Clone)]
struct RuleInfo {
    family: Family,
    priority: u32,
    table: u32,
    action: RuleAction,
    fwmark: Option<(u32, u32)>,
    invert: bool,
    src: Option<IpNet>,
    suppress_prefixlen: Option<u32>,
    protocol: Option<u8>,
    /// Has selectors wgbond never sets (iif, dst, tos, ...): never identical to ours.
    other: bool,
}

impl RuleInfo {
    fn same_as(&self, spec: &RuleSpec) -> bool {
        !self.other
            && self.action == RuleAction::ToTable
            && self.family == spec.family
            && self.priority == spec.priority
            && self.table == spec.table
            && self.fwmark == spec.fwmark.map(|m| (m, u32::MAX))
            && self.invert == spec.invert
            && self.src == spec.src
            && self.suppress_prefixlen == spec.suppress_prefixlen
    }
}

#[derive(Debug, Default)]
struct SystemState {
    links: Vec<LinkInfo>,
    addrs: Vec<AddrInfo>,
    routes: Vec<RouteInfo>,
    rules: Vec<RuleInfo>,
}

impl SystemState {
    fn table_used(&self, table: u32) -> bool {
        self.routes.iter().any(|r| r.table == table) || self.rules.iter().any(|r| r.table == table)
    }

    /// Whether some rule matches packets carrying `mark` (an inverted rule only for its own
    /// mark, since wgbond's link rules come first anyway).
    fn mark_used(&self, mark: u32) -> bool {
        self.rules.iter().any(|r| match r.fwmark {
            Some((m, mask)) if mask != 0 => (mark & mask) == m,
            _ => false,
        })
    }

    fn link_name(&self, index: u32) -> String {
        self.links
            .iter()
            .find(|l| l.index == index)
            .map_or_else(|| format!("interface #{index}"), |l| l.name.clone())
    }
}

fn ip_from_route_address(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

fn parse_link(msg: &LinkMessage) -> Option<LinkInfo> {
    let mut name = None;
    let mut mtu = 0;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Mtu(m) => mtu = *m,
            _ => {}
        }
    }
    Some(LinkInfo {
        index: msg.header.index,
        name: name?,
        mtu,
        up: msg.header.flags.contains(&LinkFlag::Up),
    })
}

fn parse_addr(msg: &AddressMessage) -> Option<AddrInfo> {
    let mut local = None;
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(a) => local = Some(*a),
            AddressAttribute::Address(a) => address = Some(*a),
            _ => {}
        }
    }
    Some(AddrInfo {
        index: msg.header.index,
        // IFA_LOCAL is our own address (IFA_ADDRESS is the peer on point-to-point links).
        addr: local.or(address)?,
        prefix: msg.header.prefix_len,
    })
}

fn parse_route(msg: &RouteMessage) -> Option<RouteInfo> {
    let mut route = RouteInfo {
        family: Family::from_af(msg.header.address_family)?,
        table: u32::from(msg.header.table),
        dst: None,
        dst_len: msg.header.destination_prefix_length,
        oif: None,
        gateway: None,
        metric: 0,
        kind: msg.header.kind,
        protocol: msg.header.protocol,
        multipath: Vec::new(),
    };
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => route.table = *t,
            RouteAttribute::Destination(a) => route.dst = ip_from_route_address(a),
            RouteAttribute::Oif(i) => route.oif = Some(*i),
            RouteAttribute::Gateway(a) => route.gateway = ip_from_route_address(a),
            RouteAttribute::Priority(p) => route.metric = *p,
            RouteAttribute::MultiPath(hops) => {
                route.multipath = hops
                    .iter()
                    .map(|hop| {
                        let gw = hop.attributes.iter().find_map(|a| match a {
                            RouteAttribute::Gateway(a) => ip_from_route_address(a),
                            _ => None,
                        });
                        (hop.interface_index, gw)
                    })
                    .collect();
            }
            _ => {}
        }
    }
    Some(route)
}

fn parse_rule(msg: &RuleMessage) -> Option<RuleInfo> {
    let mut rule = RuleInfo {
        family: Family::from_af(msg.header.family)?,
        priority: 0,
        table: u32::from(msg.header.table),
        action: msg.header.action,
        fwmark: None,
        invert: msg.header.flags.contains(&RuleFlag::Invert),
        src: None,
        suppress_prefixlen: None,
        protocol: None,
        other: msg.header.tos != 0 || msg.header.dst_len != 0,
    };
    let mut mark = None;
    let mut mask = None;
    for attr in &msg.attributes {
        match attr {
            RuleAttribute::Priority(p) => rule.priority = *p,
            RuleAttribute::Table(t) => rule.table = *t,
            RuleAttribute::FwMark(m) => mark = Some(*m),
            RuleAttribute::FwMask(m) => mask = Some(*m),
            RuleAttribute::Source(a) => {
                rule.src = IpNet::new(*a, msg.header.src_len).ok();
            }
            // The kernel reports "unset" as -1.
            RuleAttribute::SuppressPrefixLen(n) if *n != u32::MAX => {
                rule.suppress_prefixlen = Some(*n);
            }
            RuleAttribute::SuppressPrefixLen(_) => {}
            RuleAttribute::SuppressIfGroup(g) if *g == u32::MAX => {}
            RuleAttribute::Protocol(p) => rule.protocol = Some(u8::from(*p)),
            _ => rule.other = true,
        }
    }
    if mark.is_some() || mask.is_some() {
        rule.fwmark = Some((mark.unwrap_or(0), mask.unwrap_or(u32::MAX)));
    }
    Some(rule)
}

async fn read_state(handle: &Handle) -> Result<SystemState, String> {
    let err = |what: &str, e: rtnetlink::Error| format!("{what}: {}", NlError::from(e).text);
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| err("list interfaces", e))?;
    let addrs: Vec<AddressMessage> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| err("list addresses", e))?;
    let mut routes = Vec::new();
    let mut rules = Vec::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let r: Vec<RouteMessage> = handle
            .route()
            .get(version.clone())
            .execute()
            .try_collect()
            .await
            .map_err(|e| err("list routes", e))?;
        routes.extend(r.iter().filter_map(parse_route));
        let r: Vec<RuleMessage> = handle
            .rule()
            .get(version)
            .execute()
            .try_collect()
            .await
            .map_err(|e| err("list rules", e))?;
        rules.extend(r.iter().filter_map(parse_rule));
    }
    Ok(SystemState {
        links: links.iter().filter_map(parse_link).collect(),
        addrs: addrs.iter().filter_map(parse_addr).collect(),
        routes,
        rules,
    })
}

// ---------------------------------------------------------------------------------------------
// Doing and undoing steps.

/// A failed netlink request: the errno (if the kernel answered) and a readable text.
#[derive(Debug)]
struct NlError {
    errno: Option<i32>,
    text: String,
}

impl From<rtnetlink::Error> for NlError {
    fn from(e: rtnetlink::Error) -> Self {
        match e {
            rtnetlink::Error::NetlinkError(msg) => match msg.code {
                Some(code) => errno_error(-code.get()),
                None => Self {
                    errno: None,
                    text: "unexpected acknowledgement".to_owned(),
                },
            },
            other => Self {
                errno: None,
                text: other.to_string(),
            },
        }
    }
}

fn errno_error(errno: i32) -> NlError {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    // "File exists (os error 17)" -> "File exists"
    let text = text
        .split(" (os error")
        .next()
        .map_or_else(|| text.clone(), str::to_owned);
    NlError {
        errno: Some(errno),
        text,
    }
}

/// Sends one request and waits for the kernel's acknowledgement.
async fn ack_request(handle: &Handle, msg: RouteNetlinkMessage, flags: u16) -> Result<(), NlError> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    let mut handle = handle.clone();
    let mut responses = handle.request(req).map_err(NlError::from)?;
    while let Some(response) = responses.next().await {
        if let NetlinkPayload::Error(e) = response.payload {
            if let Some(code) = e.code {
                return Err(errno_error(-code.get()));
            }
        }
    }
    Ok(())
}

fn link_message(index: u32) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg
}

fn address_message(index: u32, net: &IpNet) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.index = index;
    msg.header.prefix_len = net.prefix_len();
    msg.header.family = Family::of(net.addr()).af();
    msg.attributes.push(AddressAttribute::Local(net.addr()));
    msg.attributes.push(AddressAttribute::Address(net.addr()));
    msg
}

async fn do_step(handle: &Handle, action: &Action) -> Result<(), NlError> {
    match action {
        Action::SetMtu { index, mtu, .. } => {
            let mut msg = link_message(*index);
            msg.attributes.push(LinkAttribute::Mtu(*mtu));
            ack_request(handle, RouteNetlinkMessage::SetLink(msg), 0).await
        }
        Action::AddAddress { index, net } => {
            let msg = address_message(*index, net);
            ack_request(
                handle,
                RouteNetlinkMessage::NewAddress(msg),
                NLM_F_CREATE | NLM_F_EXCL,
            )
            .await
        }
        Action::SetUp { index } => {
            let mut msg = link_message(*index);
            msg.header.flags.push(LinkFlag::Up);
            msg.header.change_mask.push(LinkFlag::Up);
            ack_request(handle, RouteNetlinkMessage::SetLink(msg), 0).await
        }
        Action::AddRoute(msg) => {
            ack_request(
                handle,
                RouteNetlinkMessage::NewRoute(msg.clone()),
                NLM_F_CREATE | NLM_F_EXCL,
            )
            .await
        }
        Action::AddRule(msg) => {
            ack_request(
                handle,
                RouteNetlinkMessage::NewRule(msg.clone()),
                NLM_F_CREATE | NLM_F_EXCL,
            )
            .await
        }
    }
}

/// Undoes one step; an object that is already gone counts as undone.
/// Undoes `done` in reverse after a failed step; returns the undo steps that failed.
/// Does `steps` in order and returns them, done. On a failure, undoes the ones done (newest
/// first) and reports the failed step, why, and what could not be undone. Step `fail_at`
/// (0-based) fails as if the kernel had refused it (tests of the rollback).
async fn run_steps(
    handle: &Handle,
    steps: Vec<Step>,
    fail_at: Option<usize>,
) -> Result<Vec<Step>, NetcfgError> {
    let mut done: Vec<Step> = Vec::new();
    for (index, step) in steps.into_iter().enumerate() {
        tracing::debug!(step = %step.desc, "netcfg");
        let result = if fail_at == Some(index) {
            Err(NlError {
                errno: None,
                text: "injected failure".to_owned(),
            })
        } else {
            do_step(handle, &step.action).await
        };
        if let Err(e) = result {
            let rollback = roll_back(handle, &mut done).await;
            return Err(NetcfgError::Step {
                step: step.desc,
                cause: e.text,
                rollback,
            });
        }
        done.push(step);
    }
    Ok(done)
}

async fn roll_back(handle: &Handle, done: &mut Vec<Step>) -> Vec<String> {
    let mut failed = Vec::new();
    while let Some(undo) = done.pop() {
        if let Err(u) = undo_step(handle, &undo.action).await {
            failed.push(format!("undo `{}`: {}", undo.desc, u.text));
        }
    }
    failed
}

async fn undo_step(handle: &Handle, action: &Action) -> Result<(), NlError> {
    let result = match action {
        Action::SetMtu { index, old, .. } => {
            let mut msg = link_message(*index);
            msg.attributes.push(LinkAttribute::Mtu(*old));
            ack_request(handle, RouteNetlinkMessage::SetLink(msg), 0).await
        }
        Action::AddAddress { index, net } => {
            let msg = address_message(*index, net);
            ack_request(handle, RouteNetlinkMessage::DelAddress(msg), 0).await
        }
        Action::SetUp { index } => {
            let mut msg = link_message(*index);
            msg.header.change_mask.push(LinkFlag::Up);
            ack_request(handle, RouteNetlinkMessage::SetLink(msg), 0).await
        }
        Action::AddRoute(msg) => {
            ack_request(handle, RouteNetlinkMessage::DelRoute(msg.clone()), 0).await
        }
        Action::AddRule(msg) => {
            ack_request(handle, RouteNetlinkMessage::DelRule(msg.clone()), 0).await
        }
    };
    match result {
        Err(NlError {
            errno: Some(libc::ENOENT | libc::ESRCH | libc::ENODEV | libc::EADDRNOTAVAIL),
            ..
        }) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, up: bool) -> LinkInfo {
        LinkInfo {
            index,
            name: name.to_owned(),
            mtu: 1500,
            up,
        }
    }

    fn default_route(
        family: Family,
        table: u32,
        oif: u32,
        gw: Option<&str>,
        metric: u32,
    ) -> RouteInfo {
        RouteInfo {
            family,
            table,
            dst: None,
            dst_len: 0,
            oif: Some(oif),
            gateway: gw.map(|g| g.parse().unwrap_or_else(|e| panic!("{g}: {e}"))),
            metric,
            kind: RouteType::Unicast,
            protocol: RouteProtocol::Static,
            multipath: Vec::new(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    /// tun = 1, wan0 = 2 (default via 192.0.2.1 metric 100), wan1 = 3 (no routes, up).
    fn state() -> SystemState {
        SystemState {
            links: vec![
                link(1, "wgb0", false),
                link(2, "wan0", true),
                link(3, "wan1", true),
            ],
            addrs: vec![AddrInfo {
                index: 3,
                addr: ip("198.51.100.2"),
                prefix: 24,
            }],
            routes: vec![default_route(
                Family::V4,
                TABLE_MAIN,
                2,
                Some("192.0.2.1"),
                100,
            )],
            rules: Vec::new(),
        }
    }

    fn plan(allowed: &[&str], table: RouteTableSetting) -> NetPlan {
        NetPlan {
            tun_name: "wgb0".to_owned(),
            addresses: vec![net("10.99.0.2/24")],
            mtu: 1400,
            allowed_ips: allowed.iter().map(|s| net(s)).collect(),
            table,
            fwmark: None,
            links: vec![
                WanLinkPlan {
                    name: "cable".to_owned(),
                    bind: WanBind::Interface("wan0".to_owned()),
                    gateway: None,
                },
                WanLinkPlan {
                    name: "lte".to_owned(),
                    bind: WanBind::Address(ip("198.51.100.2")),
                    gateway: None,
                },
            ],
        }
    }

    fn descs(layout: &Layout) -> Vec<&str> {
        layout.steps.iter().map(|s| s.desc.as_str()).collect()
    }

    #[test]
    fn zero_nets_are_default_routes() {
        assert_eq!(Family::V4.zero_net(), net("0.0.0.0/0"));
        assert_eq!(Family::V6.zero_net(), net("::/0"));
    }

    #[test]
    fn gateway_prefers_main_then_lowest_metric_and_reads_multipath() {
        let mut s = state();
        s.routes.push(default_route(
            Family::V4,
            TABLE_MAIN,
            2,
            Some("192.0.2.9"),
            50,
        ));
        s.routes
            .push(default_route(Family::V4, 100, 2, Some("192.0.2.7"), 0));
        assert_eq!(
            find_default_gateway(&s, 2, Family::V4),
            Some(Some(ip("192.0.2.9")))
        );
        // Only in another table (a multi-WAN box with its own policy routing).
        s.routes
            .push(default_route(Family::V4, 101, 3, Some("198.51.100.1"), 0));
        assert_eq!(
            find_default_gateway(&s, 3, Family::V4),
            Some(Some(ip("198.51.100.1")))
        );
        // A multipath default route through several WANs.
        let mut multi = default_route(Family::V6, TABLE_MAIN, 0, None, 1024);
        multi.oif = None;
        multi.multipath = vec![(2, Some(ip("fe80::1"))), (3, Some(ip("fe80::2")))];
        s.routes.push(multi);
        assert_eq!(
            find_default_gateway(&s, 3, Family::V6),
            Some(Some(ip("fe80::2")))
        );
        // Point-to-point WAN: default route without gateway.
        s.routes
            .push(default_route(Family::V4, TABLE_MAIN, 4, None, 0));
        assert_eq!(find_default_gateway(&s, 4, Family::V4), Some(None));
        assert_eq!(find_default_gateway(&s, 5, Family::V4), None);
        // wgbond's own routes never count.
        let mut ours = default_route(Family::V4, TABLE_MAIN, 5, Some("203.0.113.1"), 0);
        ours.protocol = RouteProtocol::Other(ROUTE_PROTOCOL);
        s.routes.push(ours);
        assert_eq!(find_default_gateway(&s, 5, Family::V4), None);
    }

    #[test]
    fn links_resolve_gateways_and_fall_back_to_on_link() {
        let p = plan(&[], RouteTableSetting::Auto);
        let s = state();
        let cable = resolve_link(&p.links[0], &s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cable.v4, Some(Nexthop::Via(ip("192.0.2.1"))));
        assert_eq!(cable.v6, None);
        let lte = resolve_link(&p.links[1], &s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (lte.ifname.as_str(), lte.v4),
            ("wan1", Some(Nexthop::OnLink))
        );
        let mut configured = p.links[1].clone();
        configured.gateway = Some(ip("198.51.100.254"));
        let lte = resolve_link(&configured, &s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(lte.v4, Some(Nexthop::Via(ip("198.51.100.254"))));
        let mut missing = p.links[1].clone();
        missing.bind = WanBind::Address(ip("203.0.113.5"));
        assert_eq!(
            resolve_link(&missing, &s).err().as_deref(),
            Some("link `lte`: no interface has the address 203.0.113.5 (bind_address)")
        );
    }

    #[test]
    fn full_tunnel_plan_orders_link_routing_before_tunnel_rules() {
        let layout = plan_layout(
            &plan(&["0.0.0.0/0", "10.1.0.0/16"], RouteTableSetting::Auto),
            &state(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let d = descs(&layout);
        let first_tunnel_rule = d
            .iter()
            .position(|s| s.contains("31200"))
            .unwrap_or(usize::MAX);
        let last_link_rule = d
            .iter()
            .rposition(|s| s.contains("priority 31100"))
            .unwrap_or(0);
        assert!(last_link_rule < first_tunnel_rule, "{d:#?}");
        assert!(
            d.contains(&"add route 0.0.0.0/0 dev wgb0 table 51820"),
            "{d:#?}"
        );
        // Not a /0: into the main table, as wg-quick does.
        assert!(d.contains(&"add route 10.1.0.0/16 dev wgb0"), "{d:#?}");
        assert!(
            d.contains(
                &"link `lte`: add IPv4 rule `priority 31100 from 198.51.100.2/32 lookup 51822`"
            ),
            "{d:#?}"
        );
        assert!(
            d.contains(&"add IPv4 rule `priority 31201 not from all fwmark 0xca6c lookup 51820`"),
            "{d:#?}"
        );
        // No IPv6 /0, so no IPv6 tunnel rules.
        assert!(
            !d.iter().any(|s| s.contains("IPv6 rule `priority 312")),
            "{d:#?}"
        );
        assert_eq!(layout.fwmark, Some(FIRST_TABLE));
        assert_eq!(layout.links[1].mark, FIRST_TABLE + 2);
    }

    #[test]
    fn table_id_and_off_add_no_tunnel_rules() {
        let layout = plan_layout(&plan(&["0.0.0.0/0"], RouteTableSetting::Id(200)), &state())
            .unwrap_or_else(|e| panic!("{e}"));
        let d = descs(&layout);
        assert!(
            d.contains(&"add route 0.0.0.0/0 dev wgb0 table 200"),
            "{d:#?}"
        );
        assert!(!d.iter().any(|s| s.contains("3120")), "{d:#?}");
        assert_eq!((layout.fwmark, layout.tunnel_table), (None, Some(200)));

        let layout = plan_layout(&plan(&["0.0.0.0/0"], RouteTableSetting::Off), &state())
            .unwrap_or_else(|e| panic!("{e}"));
        let d = descs(&layout);
        assert!(!d.iter().any(|s| s.contains("dev wgb0")), "{d:#?}");
        // The links still get their tables.
        assert!(
            d.iter()
                .any(|s| s.contains("via 192.0.2.1 dev wan0 table 51821")),
            "{d:#?}"
        );
    }

    #[test]
    fn used_tables_and_marks_are_skipped() {
        let mut s = state();
        s.routes
            .push(default_route(Family::V6, FIRST_TABLE, 2, None, 0));
        s.rules.push(RuleInfo {
            family: Family::V4,
            priority: 100,
            table: 300,
            action: RuleAction::ToTable,
            fwmark: Some((FIRST_TABLE + 3, u32::MAX)),
            invert: false,
            src: None,
            suppress_prefixlen: None,
            protocol: None,
            other: false,
        });
        let layout = plan_layout(&plan(&["0.0.0.0/0"], RouteTableSetting::Auto), &s)
            .unwrap_or_else(|e| panic!("{e}"));
        // 51820 has a route, 51823 is a foreign mark: the first free triple is 51824..=51826.
        assert_eq!(layout.tunnel_table, Some(FIRST_TABLE + 4));
        assert_eq!(layout.links[0].table, FIRST_TABLE + 5);
    }

    #[test]
    fn clashing_main_route_and_duplicate_rule_are_refused() {
        let mut s = state();
        let mut clash = default_route(Family::V4, TABLE_MAIN, 2, Some("192.0.2.1"), 0);
        clash.dst = Some(ip("10.1.0.0"));
        clash.dst_len = 16;
        s.routes.push(clash);
        assert_eq!(
            plan_layout(&plan(&["10.1.0.0/16"], RouteTableSetting::Auto), &s)
                .err()
                .as_deref(),
            Some("allowed_ips 10.1.0.0/16: table main already has a route to 10.1.0.0/16 dev wan0")
        );

        let mut s = state();
        s.rules.push(RuleInfo {
            family: Family::V4,
            priority: RULE_PRIORITY_SUPPRESS,
            table: TABLE_MAIN,
            action: RuleAction::ToTable,
            fwmark: None,
            invert: false,
            src: None,
            suppress_prefixlen: Some(0),
            protocol: Some(ROUTE_PROTOCOL),
            other: false,
        });
        let err = plan_layout(&plan(&["0.0.0.0/0"], RouteTableSetting::Auto), &s)
            .err()
            .unwrap_or_default();
        assert!(err.contains("did not shut down cleanly"), "{err}");
        assert!(
            err.contains("ip rule del priority 31200 from all lookup main suppress_prefixlength 0"),
            "{err}"
        );
    }

    #[test]
    fn own_prefix_is_not_routed_twice_and_address_conflicts_are_refused() {
        let layout = plan_layout(
            &plan(&["10.99.0.0/24", "10.99.0.7/32"], RouteTableSetting::Auto),
            &state(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !descs(&layout).iter().any(|s| s.contains("route 10.99")),
            "{:#?}",
            descs(&layout)
        );

        let mut s = state();
        s.addrs.push(AddrInfo {
            index: 2,
            addr: ip("10.99.0.2"),
            prefix: 24,
        });
        assert_eq!(
            plan_layout(&plan(&[], RouteTableSetting::Auto), &s)
                .err()
                .as_deref(),
            Some("address 10.99.0.2 is already assigned to wan0")
        );
    }

    #[test]
    fn down_wan_gets_only_its_fallback_and_a_warning() {
        let mut s = state();
        s.links[1].up = false;
        let layout =
            plan_layout(&plan(&[], RouteTableSetting::Auto), &s).unwrap_or_else(|e| panic!("{e}"));
        let d = descs(&layout);
        assert!(
            d.contains(
                &"link `cable`: add route unreachable 0.0.0.0/0 metric 4294967295 table 51821"
            ),
            "{d:#?}"
        );
        assert!(!d.iter().any(|s| s.contains("dev wan0 table")), "{d:#?}");
        assert!(
            layout.warnings.iter().any(|w| w.contains("wan0 is down")),
            "{:?}",
            layout.warnings
        );
        assert_eq!(layout.links[0].v4, None);
    }

    #[test]
    fn kernel_rule_dump_is_normalised() {
        let mut msg = RuleMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.table = TABLE_MAIN as u8;
        msg.header.action = RuleAction::ToTable;
        msg.attributes = vec![
            RuleAttribute::Priority(RULE_PRIORITY_SUPPRESS),
            RuleAttribute::SuppressPrefixLen(0),
            RuleAttribute::SuppressIfGroup(u32::MAX),
            RuleAttribute::Protocol(RouteProtocol::Other(ROUTE_PROTOCOL)),
        ];
        let rule = parse_rule(&msg).unwrap_or_else(|| panic!("unparsed"));
        let spec = RuleSpec {
            family: Family::V4,
            priority: RULE_PRIORITY_SUPPRESS,
            table: TABLE_MAIN,
            fwmark: None,
            invert: false,
            src: None,
            suppress_prefixlen: Some(0),
        };
        assert!(rule.same_as(&spec));
        msg.attributes
            .push(RuleAttribute::Iifname("eth0".to_owned()));
        let rule = parse_rule(&msg).unwrap_or_else(|| panic!("unparsed"));
        assert!(
            !rule.same_as(&spec),
            "a rule with an iif selector is a different rule"
        );
        msg.attributes[1] = RuleAttribute::SuppressPrefixLen(u32::MAX);
        assert_eq!(parse_rule(&msg).and_then(|r| r.suppress_prefixlen), None);
    }

    #[test]
    fn bad_plans_are_refused_before_touching_the_system() {
        let mut p = plan(&[], RouteTableSetting::Auto);
        p.mtu = 1200;
        p.addresses.push(net("fd99::2/64"));
        assert_eq!(
            check_plan(&p).err().as_deref(),
            Some("MTU 1200 is out of range (1280..=65535)")
        );
        let mut p = plan(&[], RouteTableSetting::Id(255));
        assert!(check_plan(&p).is_err());
        p.table = RouteTableSetting::Auto;
        p.links[1].gateway = Some(ip("fe80::1"));
        assert!(check_plan(&p)
            .err()
            .unwrap_or_default()
            .contains("different address families"));
        p.links[1] = p.links[0].clone();
        assert_eq!(
            check_plan(&p).err().as_deref(),
            Some("link `cable` is listed twice")
        );
    }
}
