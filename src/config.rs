//! The TOML config file, parsed and validated into a [`Config`].
//!
//! One file describes one tunnel. A file with `[[link]]` sections is a *site* (it owns WAN links
//! and dials exactly one peer, the hub); a file without links is a *hub* (it listens on one UDP
//! port and learns its peers' links). Every problem in a file is reported at once, each as
//! `FILE:LINE:COL: message` naming the fix; see `docs/configuration.md` for every key.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::bond;

/// Most `[[link]]` sections a site may have (link ids travel in one byte; 16 keeps tables small).
pub const MAX_LINKS: usize = 16;
/// Longest link name, bytes.
pub const MAX_LINK_NAME: usize = 32;
/// Longest interface name, bytes (the kernel's `IFNAMSIZ - 1`).
pub const MAX_IFNAME: usize = 15;
/// Default inner MTU: 1500 minus IPv6 + UDP + WireGuard overhead (80) minus our 20-byte trailer.
pub const DEFAULT_MTU: u16 = 1400;

/// A validated tunnel config.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The file it was read from (as given).
    pub path: PathBuf,
    /// Interface name: `interface.name`, else the file stem.
    pub name: String,
    /// The `[interface]` section.
    pub interface: InterfaceConfig,
    /// The `[bond]` section (defaults when absent).
    pub bond: BondSection,
    /// The `[[peer]]` sections, in file order.
    pub peers: Vec<PeerConfig>,
    /// The `[[link]]` sections, in file order (index = link id). Empty on a hub.
    pub links: Vec<LinkConfig>,
}

/// The `[interface]` section.
#[derive(Clone, PartialEq)]
pub struct InterfaceConfig {
    /// Our static private key (from `private_key` or `private_key_file`).
    pub private_key: [u8; 32],
    /// Addresses put on the TUN device.
    pub addresses: Vec<ipnet::IpNet>,
    /// UDP port: on a hub, the one port all links of all peers reach; on a site, the local
    /// port of every link socket (default: chosen by the kernel).
    pub listen_port: Option<u16>,
    /// TUN MTU (default [`DEFAULT_MTU`]).
    pub mtu: u16,
    /// Where routes for the peers' `allowed_ips` go.
    pub table: RouteTable,
    /// Firewall mark of the links' own UDP packets (default: chosen at `up` when needed).
    pub fwmark: Option<u32>,
    /// DNS servers set through resolvconf while up.
    pub dns: Vec<IpAddr>,
    /// Shell commands run before the interface is created (`%i` = interface name).
    pub pre_up: Vec<String>,
    /// Shell commands run after the interface is up.
    pub post_up: Vec<String>,
    /// Shell commands run before the interface is removed.
    pub pre_down: Vec<String>,
    /// Shell commands run after the interface is removed.
    pub post_down: Vec<String>,
    /// Address of the Prometheus metrics endpoint (off when absent).
    pub metrics_listen: Option<SocketAddr>,
}

// Hand-written so the private key never reaches a log line through `{:?}`.
impl fmt::Debug for InterfaceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InterfaceConfig")
            .field("private_key", &"(hidden)")
            .field("addresses", &self.addresses)
            .field("listen_port", &self.listen_port)
            .field("mtu", &self.mtu)
            .field("table", &self.table)
            .field("fwmark", &self.fwmark)
            .field("dns", &self.dns)
            .field("pre_up", &self.pre_up)
            .field("post_up", &self.post_up)
            .field("pre_down", &self.pre_down)
            .field("post_down", &self.post_down)
            .field("metrics_listen", &self.metrics_listen)
            .finish()
    }
}

/// `interface.table`: which routing table gets the peers' `allowed_ips` routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RouteTable {
    /// Like wg-quick: the main table, or a dedicated table + fwmark rule for default routes.
    #[default]
    Auto,
    /// Add no routes.
    Off,
    /// This table number.
    Id(u32),
}

/// The `[bond]` section.
#[derive(Clone, Debug, PartialEq)]
pub struct BondSection {
    /// Scheduling mode (default auto).
    pub mode: bond::Mode,
    /// Probe interval on a quiet link (default 100 ms).
    pub probe_interval: Duration,
    /// Upper bound of the adaptive reorder wait (default 400 ms).
    pub reorder_max_wait: Duration,
    /// Longest a packet may wait in a link's send queue (default 60 ms).
    pub max_queue_delay: Duration,
}

impl Default for BondSection {
    fn default() -> Self {
        let core = bond::BondConfig::default();
        Self {
            mode: core.mode,
            probe_interval: core.probe_interval,
            reorder_max_wait: core.reorder_max_wait,
            max_queue_delay: core.max_queue_delay,
        }
    }
}

impl BondSection {
    /// The core's settings for this section (buffer limits at their defaults).
    pub fn bond_config(&self, sends_hello: bool, bond_id: u64) -> bond::BondConfig {
        bond::BondConfig {
            mode: self.mode,
            probe_interval: self.probe_interval,
            reorder_max_wait: self.reorder_max_wait,
            max_queue_delay: self.max_queue_delay,
            sends_hello,
            bond_id,
            ..bond::BondConfig::default()
        }
    }
}

/// One `[[peer]]` section.
#[derive(Clone, PartialEq)]
pub struct PeerConfig {
    /// The peer's static public key.
    pub public_key: [u8; 32],
    /// Optional preshared key (from `preshared_key` or `preshared_key_file`).
    pub preshared_key: Option<[u8; 32]>,
    /// Inner addresses the peer may use as source, and that are routed to it (normalised:
    /// host bits cleared).
    pub allowed_ips: Vec<ipnet::IpNet>,
    /// `host:port` the site's links send to; resolved at `up`. Required on a site.
    pub endpoint: Option<String>,
    /// Keepalive interval in seconds (`None` = off).
    pub persistent_keepalive: Option<u16>,
    /// A name for logs and `show`.
    pub name: Option<String>,
}

// Hand-written so the preshared key never reaches a log line through `{:?}`.
impl fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerConfig")
            .field("public_key", &crate::keys::encode(&self.public_key))
            .field("preshared_key", &self.preshared_key.map(|_| "(hidden)"))
            .field("allowed_ips", &self.allowed_ips)
            .field("endpoint", &self.endpoint)
            .field("persistent_keepalive", &self.persistent_keepalive)
            .field("name", &self.name)
            .finish()
    }
}

/// One `[[link]]` section (site only).
#[derive(Clone, Debug, PartialEq)]
pub struct LinkConfig {
    /// Link name (1..=32 bytes of `[A-Za-z0-9_.-]`), unique in the file.
    pub name: String,
    /// What the link's UDP socket is bound to.
    pub bind: LinkBind,
    /// Failover order: lower is preferred (default 0; ties: earlier in the file).
    pub priority: u32,
    /// Send-rate cap in Mbit/s (metered links).
    pub max_rate_mbit: Option<f64>,
    /// `host:port` overriding the peer's endpoint for this link.
    pub endpoint: Option<String>,
    /// Next hop on this WAN (default: learned from the WAN's routes at `up`).
    pub gateway: Option<IpAddr>,
}

impl LinkConfig {
    /// The core's settings for this link.
    pub fn bond_link_config(&self) -> bond::LinkConfig {
        bond::LinkConfig {
            name: self.name.clone(),
            priority: self.priority,
            max_rate_bps: self.max_rate_mbit.map(|m| (m * 1_000_000.0) as u64),
        }
    }
}

/// What a link's socket is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkBind {
    /// `bind_interface`: SO_BINDTODEVICE to this WAN device.
    Interface(String),
    /// `bind_address`: bind to this local address.
    Address(IpAddr),
}

/// Whether a config is the dialling end with links or the listening end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Has `[[link]]` sections and exactly one peer with an endpoint.
    Site,
    /// No links; listens on `listen_port`.
    Hub,
}

impl Config {
    /// Site or hub.
    pub fn role(&self) -> Role {
        if self.links.is_empty() {
            Role::Hub
        } else {
            Role::Site
        }
    }

    /// The endpoint a link sends to: its own override, else the (single) peer's endpoint.
    pub fn link_endpoint<'a>(&'a self, link: &'a LinkConfig) -> Option<&'a str> {
        link.endpoint
            .as_deref()
            .or_else(|| self.peers.first().and_then(|p| p.endpoint.as_deref()))
    }
}

/// One problem in a config file, located in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line (0 when the problem is not at a place in the file, e.g. it cannot be read).
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.path.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.path.display(),
                self.line,
                self.column,
                self.message
            )
        }
    }
}

/// Every problem found in a config file, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Reads and validates a config file, and the key files it names.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) => Err(ConfigErrors(vec![ConfigError {
                path: path.to_path_buf(),
                line: 0,
                column: 0,
                message: format!("cannot read the config file: {e}"),
            }])),
        }
    }

    /// Validates config text read from `path` (which locates relative key files and names
    /// the interface); key files it names are read.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
        // Validation lands in the next commit; the types above are stable.
        let _ = text;
        Err(ConfigErrors(vec![ConfigError {
            path: path.to_path_buf(),
            line: 0,
            column: 0,
            message: "config parsing is not implemented yet".into(),
        }]))
    }
}
