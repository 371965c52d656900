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

use toml_edit::{Item, TableLike, Value};

use crate::bond;

/// Most `[[link]]` sections a site may have (link ids travel in one byte; 16 keeps tables small).
pub const MAX_LINKS: usize = 16;
/// Longest link name, bytes.
pub const MAX_LINK_NAME: usize = 32;
/// Longest interface name, bytes (the kernel's `IFNAMSIZ - 1`).
pub const MAX_IFNAME: usize = 15;
/// Default inner MTU: 1500 minus IPv6 + UDP + WireGuard overhead (80) minus our trailer in its
/// longer format (20 bytes; the compact one is 12), so that it fits whichever the peer reads.
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

    /// Validates config text read from `path` (which names the interface and locates
    /// relative key files); key files it names are read.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
        let mut report = Report::new(text, path);
        let config = match toml_edit::ImDocument::parse(text) {
            Ok(doc) => read_document(&doc, &mut report),
            Err(e) => {
                // The TOML parser stops at its first error; that one is reported alone.
                let at = e.span().map(|s| s.start);
                let message = e
                    .message()
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join(", ");
                report.error(at, format!("invalid TOML: {message}"));
                None
            }
        };
        match config {
            Some(config) if report.errors.is_empty() => Ok(config),
            _ => Err(report.finish()),
        }
    }
}

/// Errors collected while reading one file, located by byte offset.
struct Report<'a> {
    text: &'a str,
    path: &'a Path,
    /// (byte offset or `None` for the whole file, message)
    errors: Vec<(Option<usize>, String)>,
}

impl<'a> Report<'a> {
    fn new(text: &'a str, path: &'a Path) -> Self {
        Self {
            text,
            path,
            errors: Vec::new(),
        }
    }

    fn error(&mut self, at: Option<usize>, message: String) {
        self.errors.push((at, message));
    }

    /// 1-based line and character column of a byte offset.
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        // Spans come from the parser and fall on char boundaries; be safe anyway.
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        (line, column)
    }

    fn finish(mut self) -> ConfigErrors {
        // File order; errors without a place first. The sort is stable, so errors at the same
        // place keep the order they were found in.
        self.errors.sort_by_key(|(at, _)| at.map_or(0, |a| a + 1));
        let errors = self
            .errors
            .iter()
            .map(|(at, message)| {
                let (line, column) = at.map_or((1, 1), |a| self.line_col(a));
                ConfigError {
                    path: self.path.to_path_buf(),
                    line,
                    column,
                    message: message.clone(),
                }
            })
            .collect();
        ConfigErrors(errors)
    }
}

/// A table of the file (a `[section]`, one `[[section]]` or an inline table) being read.
struct Section<'d> {
    /// How messages name it: `interface`, `peer`, `link`.
    name: &'static str,
    table: &'d dyn TableLike,
    /// Where its header (or first key) is.
    at: Option<usize>,
    valid: &'static [&'static str],
}

/// One `key = value` of a section.
struct Field<'d> {
    /// `section.key`, for messages.
    name: String,
    item: &'d Item,
    /// Where the value starts.
    at: Option<usize>,
}

impl<'d> Section<'d> {
    fn new(
        name: &'static str,
        item: &'d Item,
        fallback: Option<usize>,
        valid: &'static [&'static str],
    ) -> Option<Self> {
        let (table, span) = match item {
            Item::Table(t) => (t as &dyn TableLike, t.span()),
            Item::Value(Value::InlineTable(t)) => (t as &dyn TableLike, t.span()),
            _ => return None,
        };
        Some(Self {
            name,
            table,
            at: span.map(|s| s.start).or(fallback),
            valid,
        })
    }

    /// Reports keys that are not in `valid`.
    fn check_keys(&self, report: &mut Report<'_>) {
        for (key, _) in self.table.iter() {
            if self.valid.contains(&key) {
                continue;
            }
            let at = self
                .table
                .key(key)
                .and_then(|k| k.span())
                .map(|s| s.start)
                .or(self.at);
            let hint = closest(key, self.valid)
                .map(|k| format!("did you mean `{k}`? "))
                .unwrap_or_default();
            report.error(
                at,
                format!(
                    "unknown key `{key}` in [{}]; {hint}valid keys: {}",
                    self.name,
                    self.valid.join(", ")
                ),
            );
        }
    }

    fn get(&self, key: &str) -> Option<Field<'d>> {
        let (k, item) = self.table.get_key_value(key)?;
        if item.is_none() {
            return None;
        }
        let at = item
            .span()
            .or_else(|| k.span())
            .map(|s| s.start)
            .or(self.at);
        Some(Field {
            name: format!("{}.{}", self.name, key),
            item,
            at,
        })
    }
}

/// The valid key most like `key`, when it is likely a typo. Case, `_` and `-` are ignored, so
/// wg-quick's names (`PrivateKey`, `AllowedIPs`, `ListenPort`) find ours.
fn closest<'v>(key: &str, valid: &[&'v str]) -> Option<&'v str> {
    let fold = |s: &str| -> String {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .map(|c| c.to_ascii_lowercase())
            .collect()
    };
    let key = fold(key);
    valid
        .iter()
        .map(|v| (edit_distance(&key, &fold(v)), *v))
        .filter(|(d, v)| *d <= 2.max(v.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, v)| v)
}

/// Levenshtein distance (the inputs are short key names).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A value with the offset it starts at.
type Located<T> = (T, Option<usize>);

impl Report<'_> {
    fn wrong_type(&mut self, field: &Field<'_>, expected: &str) {
        let found = field.item.type_name();
        self.error(
            field.at,
            format!("`{}` must be {expected}, found {found}", field.name),
        );
    }

    fn string(&mut self, field: &Field<'_>) -> Option<Located<String>> {
        match field.item.as_str() {
            Some(s) => Some((s.to_string(), field.at)),
            None => {
                self.wrong_type(field, "a string");
                None
            }
        }
    }

    fn integer(&mut self, field: &Field<'_>, min: i64, max: i64, unit: &str) -> Option<i64> {
        match field.item.as_integer() {
            Some(n) if (min..=max).contains(&n) => Some(n),
            Some(n) => {
                self.error(
                    field.at,
                    format!(
                        "`{}` = {n} is out of range: expected {min} to {max}{unit}",
                        field.name
                    ),
                );
                None
            }
            None => {
                self.wrong_type(field, "an integer");
                None
            }
        }
    }

    /// A string or an array of strings (like wg-quick's comma-separated lists). Every element
    /// that is not a string is reported; the strings are returned with `false` if any was.
    fn strings(&mut self, field: &Field<'_>) -> (Vec<Located<String>>, bool) {
        match field.item {
            Item::Value(Value::String(s)) => (vec![(s.value().clone(), field.at)], true),
            Item::Value(Value::Array(a)) => {
                let mut out = Vec::new();
                let mut ok = true;
                for v in a.iter() {
                    let at = v.span().map(|s| s.start).or(field.at);
                    match v.as_str() {
                        Some(s) => out.push((s.to_string(), at)),
                        None => {
                            self.error(
                                at,
                                format!(
                                    "`{}` must be a list of strings, found {} in the list",
                                    field.name,
                                    v.type_name()
                                ),
                            );
                            ok = false;
                        }
                    }
                }
                (out, ok)
            }
            _ => {
                self.wrong_type(field, "a string or a list of strings");
                (Vec::new(), false)
            }
        }
    }
}

const TOP_KEYS: &[&str] = &["interface", "bond", "peer", "link"];
const INTERFACE_KEYS: &[&str] = &[
    "name",
    "private_key",
    "private_key_file",
    "address",
    "listen_port",
    "mtu",
    "table",
    "fwmark",
    "dns",
    "pre_up",
    "post_up",
    "pre_down",
    "post_down",
    "metrics_listen",
];
const BOND_KEYS: &[&str] = &[
    "mode",
    "probe_interval_ms",
    "reorder_max_ms",
    "max_queue_delay_ms",
];
const PEER_KEYS: &[&str] = &[
    "name",
    "public_key",
    "preshared_key",
    "preshared_key_file",
    "allowed_ips",
    "endpoint",
    "persistent_keepalive",
];
const LINK_KEYS: &[&str] = &[
    "name",
    "bind_interface",
    "bind_address",
    "priority",
    "max_rate_mbit",
    "endpoint",
    "gateway",
];

/// Every key of every section, `section.key`: what `docs/configuration.md` must describe.
pub fn all_keys() -> Vec<String> {
    let sections: [(&str, &[&str]); 4] = [
        ("interface", INTERFACE_KEYS),
        ("bond", BOND_KEYS),
        ("peer", PEER_KEYS),
        ("link", LINK_KEYS),
    ];
    sections
        .iter()
        .flat_map(|(s, keys)| keys.iter().map(move |k| format!("{s}.{k}")))
        .collect()
}

/// What a key must look like, and the command that prints one.
fn key_hint(command: &str) -> String {
    format!("expected a 32-byte key in base64 (44 characters ending in '='), as printed by `wgbond {command}`")
}

/// Reads the whole document; `None` when a required part is missing or invalid (the reason
/// is in `report`).
fn read_document(doc: &toml_edit::ImDocument<&str>, report: &mut Report<'_>) -> Option<Config> {
    let root = doc.as_table();
    for (key, _) in root.iter() {
        if !TOP_KEYS.contains(&key) {
            // A `[header]` is located at its `[`, a `key = ..` at its key.
            let header = root
                .get(key)
                .and_then(Item::as_table)
                .and_then(|t| t.span());
            let at = header
                .or_else(|| root.key(key).and_then(|k| k.span()))
                .map(|s| s.start);
            let hint = closest(key, TOP_KEYS)
                .map(|k| format!("did you mean `{k}`? "))
                .unwrap_or_default();
            report.error(
                at,
                format!(
                    "unknown section `{key}`; {hint}valid sections: [interface], [bond], [[peer]], [[link]]"
                ),
            );
        }
    }
    let key_at = |key: &str| root.key(key).and_then(|k| k.span()).map(|s| s.start);
    let base_dir = report
        .path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();

    let interface = match root.get("interface") {
        None => {
            report.error(
                None,
                "missing [interface] section: add one with at least `private_key` or `private_key_file`".into(),
            );
            None
        }
        Some(item) => match Section::new("interface", item, key_at("interface"), INTERFACE_KEYS) {
            Some(section) => read_interface(&section, &base_dir, report),
            None => {
                report.error(
                    key_at("interface"),
                    format!(
                        "`interface` must be a table ([interface]), found {}",
                        item.type_name()
                    ),
                );
                None
            }
        },
    };

    let bond = match root.get("bond") {
        None => Some(BondSection::default()),
        Some(item) => match Section::new("bond", item, key_at("bond"), BOND_KEYS) {
            Some(section) => read_bond(&section, report),
            None => {
                report.error(
                    key_at("bond"),
                    format!(
                        "`bond` must be a table ([bond]), found {}",
                        item.type_name()
                    ),
                );
                None
            }
        },
    };

    let peer_sections = sections(root, "peer", PEER_KEYS, report);
    let link_sections = sections(root, "link", LINK_KEYS, report);

    // One entry per section, `None` where the section had errors (already reported).
    let peers: Vec<Option<PeerConfig>> = peer_sections
        .iter()
        .map(|section| read_peer(section, &base_dir, report))
        .collect();
    let links: Vec<Option<LinkConfig>> = link_sections
        .iter()
        .map(|section| read_link(section, report))
        .collect();

    // Whole-file rules.
    let is_site = root.contains_key("link");
    if peer_sections.is_empty() && root.get("peer").is_none() {
        let what = if is_site {
            "a site needs exactly one [[peer]] section: the hub, with `public_key` and `endpoint`"
        } else {
            "missing [[peer]] section: a hub needs one per site, with `public_key` and `allowed_ips`"
        };
        report.error(None, what.into());
    }
    if is_site {
        if peer_sections.len() > 1 {
            report.error(
                peer_sections[1].at,
                format!(
                    "a site (a file with [[link]] sections) has exactly one [[peer]], the hub; found {}",
                    peer_sections.len()
                ),
            );
        }
        if link_sections.len() > MAX_LINKS {
            report.error(
                link_sections[MAX_LINKS].at,
                format!(
                    "too many links: {} [[link]] sections, at most {MAX_LINKS}",
                    link_sections.len()
                ),
            );
        }
        // A link needs somewhere to send: its own endpoint or the peer's.
        let peer_endpoint = peer_sections
            .first()
            .is_some_and(|p| p.table.contains_key("endpoint"));
        if peer_sections.len() == 1 && !peer_endpoint {
            for section in &link_sections {
                if !section.table.contains_key("endpoint") {
                    let name = section
                        .table
                        .get("name")
                        .and_then(Item::as_str)
                        .map(|n| format!("link `{n}`"))
                        .unwrap_or_else(|| "this link".into());
                    report.error(
                        section.at,
                        format!(
                            "{name} has nowhere to send: set `endpoint = \"host:port\"` in the [[peer]] section (or in this [[link]])"
                        ),
                    );
                }
            }
        }
        // Names are compared as written, so a link with other errors still gets this one.
        let mut seen: Vec<(&str, Option<usize>)> = Vec::new();
        for section in &link_sections {
            let Some(name) = section.table.get("name").and_then(Item::as_str) else {
                continue;
            };
            let at = link_name_at(section);
            if let Some((_, first)) = seen.iter().find(|(n, _)| *n == name) {
                let first_line = first.map_or(0, |a| report.line_col(a).0);
                report.error(
                    at,
                    format!(
                        "duplicate link name `{name}` (first used on line {first_line}); give every [[link]] its own name"
                    ),
                );
            } else {
                seen.push((name, at));
            }
        }
    } else if let Some(section) = &interface_section(root, key_at("interface")) {
        if !section.table.contains_key("listen_port") {
            report.error(
                section.at,
                "a hub (a file without [[link]] sections) needs `listen_port`: the UDP port every site link sends to".into(),
            );
        }
    }

    // Peers must be distinct, and not ourselves. Keys are compared as written, so a peer
    // with other errors is still checked.
    let written_keys: Vec<Option<[u8; 32]>> = peer_sections
        .iter()
        .map(|section| {
            let text = section.table.get("public_key").and_then(Item::as_str)?;
            crate::keys::decode(text).ok()
        })
        .collect();
    let own_public = interface
        .as_ref()
        .map(|iface| crate::keys::public_from_private(&iface.private_key));
    for (i, key) in written_keys.iter().enumerate() {
        let Some(key) = key else { continue };
        let at = peer_sections[i].get("public_key").and_then(|f| f.at);
        if Some(*key) == own_public {
            report.error(
                at,
                "this is the public key of this interface's own private key; use the other end's public key (`wgbond pubkey < its key file`)".into(),
            );
        }
        if let Some(j) = written_keys[..i]
            .iter()
            .position(|k| k.as_ref() == Some(key))
        {
            let first_line = peer_sections[j].at.map_or(0, |a| report.line_col(a).0);
            report.error(
                at,
                format!("two [[peer]] sections have the same public key (the other is on line {first_line})"),
            );
        }
    }
    let peers: Option<Vec<PeerConfig>> = peers.into_iter().collect();
    let links: Option<Vec<LinkConfig>> = links.into_iter().collect();
    if let Some(peers) = &peers {
        check_allowed_ips_unique(&peer_sections, peers, report);
    }

    let name = interface_name(root, key_at("interface"), report);
    Some(Config {
        path: report.path.to_path_buf(),
        name: name?,
        interface: interface?,
        bond: bond?,
        peers: peers?,
        links: links?,
    })
}

fn interface_section<'d>(root: &'d toml_edit::Table, at: Option<usize>) -> Option<Section<'d>> {
    Section::new("interface", root.get("interface")?, at, INTERFACE_KEYS)
}

fn link_name_at(section: &Section<'_>) -> Option<usize> {
    section.get("name").and_then(|f| f.at).or(section.at)
}

/// The `[[name]]` sections (or `name = [{..}, ..]`), each checked for unknown keys.
fn sections<'d>(
    root: &'d toml_edit::Table,
    name: &'static str,
    valid: &'static [&'static str],
    report: &mut Report<'_>,
) -> Vec<Section<'d>> {
    let key_at = root.key(name).and_then(|k| k.span()).map(|s| s.start);
    let mut out = Vec::new();
    match root.get(name) {
        None => {}
        Some(Item::ArrayOfTables(array)) => {
            for table in array.iter() {
                out.push(Section {
                    name,
                    table,
                    at: table.span().map(|s| s.start).or(key_at),
                    valid,
                });
            }
        }
        Some(Item::Value(Value::Array(array))) => {
            for value in array.iter() {
                match value {
                    Value::InlineTable(table) => out.push(Section {
                        name,
                        table,
                        at: table.span().map(|s| s.start).or(key_at),
                        valid,
                    }),
                    other => report.error(
                        other.span().map(|s| s.start).or(key_at),
                        format!(
                            "`{name}` must be a list of tables ([[{name}]]), found {} in the list",
                            other.type_name()
                        ),
                    ),
                }
            }
        }
        Some(other) => report.error(
            other.span().map(|s| s.start).or(key_at),
            format!(
                "`{name}` must be written as [[{name}]] sections (a list of tables), found {}",
                other.type_name()
            ),
        ),
    }
    for section in &out {
        section.check_keys(report);
    }
    out
}

/// `interface.name`, else the file stem; checked against the kernel's rules.
fn interface_name(
    root: &toml_edit::Table,
    interface_at: Option<usize>,
    report: &mut Report<'_>,
) -> Option<String> {
    let section = interface_section(root, interface_at);
    let field = section.as_ref().and_then(|s| s.get("name"));
    let (name, at, from_file) = match &field {
        Some(field) => {
            let (name, at) = report.string(field)?;
            (name, at, false)
        }
        None => {
            let stem = report
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned());
            (
                stem.unwrap_or_default(),
                section.as_ref().and_then(|s| s.at).or(interface_at),
                true,
            )
        }
    };
    let problem = if name.is_empty() {
        Some("is empty".to_string())
    } else if name.len() > MAX_IFNAME {
        Some(format!(
            "is {} bytes long; the kernel allows at most {MAX_IFNAME}",
            name.len()
        ))
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_.-=+".contains(&b))
        || name == "."
        || name == ".."
    {
        Some("may only hold letters, digits and `_.-=+` (like wg-quick's names)".to_string())
    } else {
        None
    };
    match problem {
        None => Some(name),
        Some(problem) => {
            let fix = if from_file {
                "; rename the file or set `name` in [interface]"
            } else {
                ""
            };
            let source = if from_file {
                " (taken from the file name)"
            } else {
                ""
            };
            report.error(
                at,
                format!("interface name `{name}`{source} {problem}{fix}"),
            );
            None
        }
    }
}

fn read_interface(
    section: &Section<'_>,
    base_dir: &Path,
    report: &mut Report<'_>,
) -> Option<InterfaceConfig> {
    section.check_keys(report);
    let mut ok = true;

    let private_key = read_key_pair(
        section,
        "private_key",
        "private_key_file",
        true,
        base_dir,
        report,
    );
    let private_key = match private_key {
        Some(Some(k)) => Some(k),
        _ => None,
    };

    let mut addresses = Vec::new();
    if let Some(field) = section.get("address") {
        let (list, all_strings) = report.strings(&field);
        ok &= all_strings;
        for (text, at) in list {
            match parse_net(&text) {
                Ok(net) => addresses.push(net),
                Err(()) => {
                    report.error(
                        at,
                        format!("`interface.address`: `{text}` is not an address with a prefix length, like \"10.99.0.2/24\" or \"fd99::2/64\""),
                    );
                    ok = false;
                }
            }
        }
    }

    let listen_port = match section.get("listen_port") {
        None => None,
        Some(field) => match report.integer(&field, 1, 65535, "") {
            Some(p) => u16::try_from(p).ok(),
            None => {
                ok = false;
                None
            }
        },
    };

    let mtu = match section.get("mtu") {
        None => DEFAULT_MTU,
        Some(field) => match report.integer(&field, 576, 65435, " bytes") {
            Some(m) => {
                let m = u16::try_from(m).unwrap_or(DEFAULT_MTU);
                if m < 1280 && addresses.iter().any(|a| matches!(a, ipnet::IpNet::V6(_))) {
                    report.error(
                        field.at,
                        format!("`interface.mtu` = {m} is below 1280, the least IPv6 allows, and the interface has an IPv6 address"),
                    );
                    ok = false;
                }
                m
            }
            None => {
                ok = false;
                DEFAULT_MTU
            }
        },
    };

    let table = match section.get("table") {
        None => RouteTable::Auto,
        Some(field) => match read_table(&field, report) {
            Some(t) => t,
            None => {
                ok = false;
                RouteTable::Auto
            }
        },
    };

    let fwmark = match section.get("fwmark") {
        None => None,
        Some(field) => match read_fwmark(&field, report) {
            Some(m) => m,
            None => {
                ok = false;
                None
            }
        },
    };

    let mut dns = Vec::new();
    if let Some(field) = section.get("dns") {
        let (list, all_strings) = report.strings(&field);
        ok &= all_strings;
        for (text, at) in list {
            match text.trim().parse::<IpAddr>() {
                Ok(ip) => dns.push(ip),
                Err(_) => {
                    report.error(
                        at,
                        format!("`interface.dns`: `{text}` is not an IP address, like \"10.99.0.1\" or \"2001:db8::53\""),
                    );
                    ok = false;
                }
            }
        }
    }

    let mut hooks: [Vec<String>; 4] = Default::default();
    for (slot, key) in hooks
        .iter_mut()
        .zip(["pre_up", "post_up", "pre_down", "post_down"])
    {
        if let Some(field) = section.get(key) {
            let (list, all_strings) = report.strings(&field);
            ok &= all_strings;
            for (cmd, at) in list {
                if cmd.trim().is_empty() {
                    report.error(at, format!("`interface.{key}`: empty command; remove it"));
                    ok = false;
                } else {
                    slot.push(cmd);
                }
            }
        }
    }
    let [pre_up, post_up, pre_down, post_down] = hooks;

    let metrics_listen = match section.get("metrics_listen") {
        None => None,
        Some(field) => match report.string(&field) {
            Some((text, at)) => match text.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    report.error(
                        at,
                        format!("`interface.metrics_listen`: `{text}` is not an address:port, like \"127.0.0.1:9586\" or \"[::1]:9586\""),
                    );
                    ok = false;
                    None
                }
            },
            None => {
                ok = false;
                None
            }
        },
    };

    if !ok {
        return None;
    }
    Some(InterfaceConfig {
        private_key: private_key?,
        addresses,
        listen_port,
        mtu,
        table,
        fwmark,
        dns,
        pre_up,
        post_up,
        pre_down,
        post_down,
        metrics_listen,
    })
}

/// An address with an optional prefix length (`10.0.0.1` means `/32`, like wg-quick).
fn parse_net(text: &str) -> Result<ipnet::IpNet, ()> {
    let text = text.trim();
    if let Ok(net) = text.parse::<ipnet::IpNet>() {
        return Ok(net);
    }
    match text.parse::<IpAddr>() {
        Ok(ip) => Ok(ipnet::IpNet::from(ip)),
        Err(_) => Err(()),
    }
}

fn read_table(field: &Field<'_>, report: &mut Report<'_>) -> Option<RouteTable> {
    const HINT: &str = "expected \"auto\", \"off\", \"main\" or a table number 1 to 4294967295";
    if let Some(n) = field.item.as_integer() {
        return match u32::try_from(n) {
            Ok(n) if n > 0 => Some(RouteTable::Id(n)),
            _ => {
                report.error(field.at, format!("`interface.table` = {n}: {HINT}"));
                None
            }
        };
    }
    let Some(text) = field.item.as_str() else {
        report.wrong_type(field, "a string or an integer");
        return None;
    };
    match text {
        "auto" => Some(RouteTable::Auto),
        "off" => Some(RouteTable::Off),
        "main" => Some(RouteTable::Id(254)),
        _ => match text.parse::<u32>() {
            Ok(n) if n > 0 => Some(RouteTable::Id(n)),
            _ => {
                report.error(field.at, format!("`interface.table` = \"{text}\": {HINT}"));
                None
            }
        },
    }
}

/// `Some(None)` means off.
fn read_fwmark(field: &Field<'_>, report: &mut Report<'_>) -> Option<Option<u32>> {
    const HINT: &str = "expected a 32-bit number (like 51820 or \"0xca6c\"), or \"off\"";
    let value = if let Some(n) = field.item.as_integer() {
        u32::try_from(n).ok()
    } else if let Some(text) = field.item.as_str() {
        let text = text.trim();
        if text == "off" {
            Some(0)
        } else if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
            u32::from_str_radix(hex, 16).ok()
        } else {
            text.parse::<u32>().ok()
        }
    } else {
        report.wrong_type(field, "an integer or a string");
        return None;
    };
    match value {
        Some(0) => Some(None),
        Some(m) => Some(Some(m)),
        None => {
            report.error(field.at, format!("`interface.fwmark`: {HINT}"));
            None
        }
    }
}

fn read_bond(section: &Section<'_>, report: &mut Report<'_>) -> Option<BondSection> {
    section.check_keys(report);
    let mut bond = BondSection::default();
    let mut ok = true;
    if let Some(field) = section.get("mode") {
        match report.string(&field) {
            Some((text, at)) => match text.as_str() {
                "auto" => bond.mode = bond::Mode::Auto,
                "stripe" => bond.mode = bond::Mode::Stripe,
                "duplicate" => bond.mode = bond::Mode::Duplicate,
                "failover" => bond.mode = bond::Mode::Failover,
                other => {
                    report.error(
                        at,
                        format!("`bond.mode` = \"{other}\" is not a mode: expected \"auto\", \"stripe\", \"duplicate\" or \"failover\""),
                    );
                    ok = false;
                }
            },
            None => ok = false,
        }
    }
    let millis = [
        ("probe_interval_ms", 10, 10_000),
        ("reorder_max_ms", 1, 10_000),
        ("max_queue_delay_ms", 1, 10_000),
    ];
    for (key, min, max) in millis {
        let Some(field) = section.get(key) else {
            continue;
        };
        match report.integer(&field, min, max, " ms") {
            Some(ms) => {
                let d = Duration::from_millis(ms.unsigned_abs());
                match key {
                    "probe_interval_ms" => bond.probe_interval = d,
                    "reorder_max_ms" => bond.reorder_max_wait = d,
                    _ => bond.max_queue_delay = d,
                }
            }
            None => ok = false,
        }
    }
    ok.then_some(bond)
}

fn read_peer(
    section: &Section<'_>,
    base_dir: &Path,
    report: &mut Report<'_>,
) -> Option<PeerConfig> {
    let mut ok = true;

    let name = match section.get("name") {
        None => None,
        Some(field) => match report.string(&field) {
            Some((name, at)) => {
                if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
                    report.error(
                        at,
                        "`peer.name` must be 1 to 64 bytes without control characters".into(),
                    );
                    ok = false;
                }
                Some(name)
            }
            None => {
                ok = false;
                None
            }
        },
    };

    let public_key = match section.get("public_key") {
        None => {
            report.error(
                section.at,
                "[[peer]] needs `public_key`: the other end's public key, as printed by `wgbond pubkey`".into(),
            );
            None
        }
        Some(field) => match report.string(&field) {
            Some((text, at)) => match crate::keys::decode(&text) {
                Ok(k) => Some(k),
                Err(e) => {
                    let _ = e;
                    report.error(
                        at,
                        format!(
                            "`peer.public_key` is not a valid key: {}",
                            key_hint("pubkey")
                        ),
                    );
                    None
                }
            },
            None => None,
        },
    };

    let preshared_key = read_key_pair(
        section,
        "preshared_key",
        "preshared_key_file",
        false,
        base_dir,
        report,
    );
    let preshared_key = match preshared_key {
        Some(k) => k,
        None => {
            ok = false;
            None
        }
    };

    let mut allowed_ips = Vec::new();
    if let Some(field) = section.get("allowed_ips") {
        let (list, all_strings) = report.strings(&field);
        ok &= all_strings;
        for (text, at) in list {
            match parse_net(&text) {
                // wg accepts host bits and masks them; so do we.
                Ok(net) => allowed_ips.push(net.trunc()),
                Err(()) => {
                    report.error(
                        at,
                        format!("`peer.allowed_ips`: `{text}` is not a network, like \"10.99.0.0/24\", \"0.0.0.0/0\" or \"fd99::/64\""),
                    );
                    ok = false;
                }
            }
        }
    }

    let endpoint = match section.get("endpoint") {
        None => None,
        Some(field) => match read_endpoint(&field, report) {
            Some(e) => Some(e),
            None => {
                ok = false;
                None
            }
        },
    };

    let persistent_keepalive = match section.get("persistent_keepalive") {
        None => None,
        Some(field) if field.item.as_str() == Some("off") => None,
        Some(field) => match report.integer(&field, 0, 65535, " seconds (0 or \"off\" = off)") {
            Some(0) => None,
            Some(s) => u16::try_from(s).ok(),
            None => {
                ok = false;
                None
            }
        },
    };

    if !ok {
        return None;
    }
    Some(PeerConfig {
        public_key: public_key?,
        preshared_key,
        allowed_ips,
        endpoint,
        persistent_keepalive,
        name,
    })
}

/// `host:port`; the host is a DNS name, an IPv4 address or a bracketed IPv6 address.
fn read_endpoint(field: &Field<'_>, report: &mut Report<'_>) -> Option<String> {
    let (text, at) = report.string(field)?;
    let text = text.trim().to_string();
    let valid = match text.rsplit_once(':') {
        Some((host, port)) => {
            let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0);
            let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'))
            {
                v6.parse::<std::net::Ipv6Addr>().is_ok()
            } else {
                !host.is_empty()
                    && host.len() <= 253
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
            };
            port_ok && host_ok
        }
        None => false,
    };
    if valid {
        Some(text)
    } else {
        report.error(
            at,
            format!("`{}`: `{text}` is not host:port, like \"hub.example.net:51820\", \"203.0.113.1:51820\" or \"[2001:db8::1]:51820\"", field.name),
        );
        None
    }
}

/// Reads a key given inline (`key`) or in a file (`file_key`). `required` keys must have
/// exactly one of the two. `None`: an error was reported; `Some(None)`: neither given.
fn read_key_pair(
    section: &Section<'_>,
    key: &str,
    file_key: &str,
    required: bool,
    base_dir: &Path,
    report: &mut Report<'_>,
) -> Option<Option<[u8; 32]>> {
    let inline = section.get(key);
    let file = section.get(file_key);
    let s = section.name;
    let command = if required { "genkey" } else { "genpsk" };
    match (inline, file) {
        (Some(_), Some(file)) => {
            report.error(
                file.at,
                format!("`{s}.{key}` and `{s}.{file_key}` are both set; keep one"),
            );
            None
        }
        (None, None) if required => {
            report.error(
                section.at,
                format!("[{s}] needs `{key}` or `{file_key}` (create a key with `wgbond genkey`)"),
            );
            None
        }
        (None, None) => Some(None),
        (Some(field), None) => {
            let (text, at) = report.string(&field)?;
            match crate::keys::decode(&text) {
                Ok(k) => Some(Some(k)),
                Err(e) => {
                    // Never echo the text: it may be a secret with a typo.
                    let _ = e;
                    report.error(
                        at,
                        format!("`{s}.{key}` is not a valid key: {}", key_hint(command)),
                    );
                    None
                }
            }
        }
        (None, Some(field)) => {
            let (text, at) = report.string(&field)?;
            let path = base_dir.join(&text);
            match read_key_file(&path, command) {
                Ok(k) => Some(Some(k)),
                Err(e) => {
                    report.error(at, format!("`{s}.{file_key}`: {e}"));
                    None
                }
            }
        }
    }
}

/// A warning when the config file holds a key inline (`private_key`, a `preshared_key`) and
/// other users may read it: anyone who can read the file can impersonate the tunnel. Like
/// wg-quick, this warns rather than refuses (key files are refused: see [`read_key_file`]).
pub fn exposed_key_warning(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    if mode & 0o077 == 0 {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let doc: toml::Table = text.parse().ok()?;
    let inline_private = doc
        .get("interface")
        .and_then(|i| i.get("private_key"))
        .is_some();
    let inline_psk = doc
        .get("peer")
        .and_then(|p| p.as_array())
        .is_some_and(|peers| peers.iter().any(|p| p.get("preshared_key").is_some()));
    if !(inline_private || inline_psk) {
        return None;
    }
    let shown = path.display();
    Some(format!(
        "{shown} holds a key inline and other users can read it (mode {mode:04o}); run `chmod 600 {shown}`, or move the key to `private_key_file`"
    ))
}

/// Reads a key file holding one base64 key (like `wg genkey > file`); refuses a file others
/// can read.
///
/// `command` names the `wgbond` subcommand that prints such a key (`genkey`, `genpsk`), for
/// the error message.
pub fn read_key_file(path: &Path, command: &str) -> Result<[u8; 32], String> {
    use std::io::Read as _;
    use std::os::unix::fs::PermissionsExt as _;
    let shown = path.display();
    let file = std::fs::File::open(path).map_err(|e| {
        format!("cannot open key file {shown}: {e}; create it with `(umask 077; wgbond genkey > {shown})`")
    })?;
    // Check the opened file, not the path, so a swapped file cannot slip through.
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot stat key file {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("key file {shown} is not a regular file"));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "key file {shown} can be read by other users (mode {mode:04o}); run `chmod 600 {shown}`"
        ));
    }
    let mut text = String::new();
    // A key file is 45 bytes; reading a little more detects garbage without slurping a huge file.
    file.take(4096)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read key file {shown}: {e}"))?;
    crate::keys::decode(&text).map_err(|_| {
        format!(
            "key file {shown} does not hold a key: {}",
            key_hint(command)
        )
    })
}

fn read_link(section: &Section<'_>, report: &mut Report<'_>) -> Option<LinkConfig> {
    let mut ok = true;

    let name = match section.get("name") {
        None => {
            report.error(
                section.at,
                "[[link]] needs `name`, like \"cable\" or \"lte\" (shown in `wgbond show`)".into(),
            );
            None
        }
        Some(field) => match report.string(&field) {
            Some((name, at)) => {
                if name.is_empty()
                    || name.len() > MAX_LINK_NAME
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
                {
                    report.error(
                        at,
                        format!("`link.name` = \"{name}\": a link name is 1 to {MAX_LINK_NAME} letters, digits, `_`, `.` or `-`"),
                    );
                    None
                } else {
                    Some(name)
                }
            }
            None => None,
        },
    };

    let bind = match (section.get("bind_interface"), section.get("bind_address")) {
        (Some(_), Some(address)) => {
            report.error(
                address.at,
                "`link.bind_interface` and `link.bind_address` are both set; keep one".into(),
            );
            None
        }
        (None, None) => {
            report.error(
                section.at,
                "[[link]] needs `bind_interface` (the WAN device, like \"eth1\") or `bind_address` (a local address on that WAN)".into(),
            );
            None
        }
        (Some(field), None) => match report.string(&field) {
            Some((dev, at)) => {
                if dev.is_empty()
                    || dev.len() > MAX_IFNAME
                    || dev
                        .bytes()
                        .any(|b| b == b'/' || b.is_ascii_whitespace() || b == b':')
                {
                    report.error(
                        at,
                        format!("`link.bind_interface` = \"{dev}\" is not a device name (1 to {MAX_IFNAME} bytes, no `/`, `:` or spaces)"),
                    );
                    None
                } else {
                    Some(LinkBind::Interface(dev))
                }
            }
            None => None,
        },
        (None, Some(field)) => match report.string(&field) {
            Some((text, at)) => match text.trim().parse::<IpAddr>() {
                Ok(ip) => Some(LinkBind::Address(ip)),
                Err(_) => {
                    report.error(
                        at,
                        format!("`link.bind_address`: `{text}` is not an IP address, like \"198.51.100.2\""),
                    );
                    None
                }
            },
            None => None,
        },
    };

    let priority = match section.get("priority") {
        None => 0,
        Some(field) => match report.integer(&field, 0, i64::from(u32::MAX), "") {
            Some(p) => u32::try_from(p).unwrap_or(0),
            None => {
                ok = false;
                0
            }
        },
    };

    let max_rate_mbit = match section.get("max_rate_mbit") {
        None => None,
        Some(field) => {
            let value = field
                .item
                .as_float()
                .or_else(|| field.item.as_integer().map(|i| i as f64));
            match value {
                Some(v) if v > 0.0 && v <= 1_000_000.0 => Some(v),
                Some(v) => {
                    report.error(
                        field.at,
                        format!("`link.max_rate_mbit` = {v}: expected a rate above 0 and at most 1000000 Mbit/s (remove the key for no cap)"),
                    );
                    ok = false;
                    None
                }
                None => {
                    report.wrong_type(&field, "a number (Mbit/s)");
                    ok = false;
                    None
                }
            }
        }
    };

    let endpoint = match section.get("endpoint") {
        None => None,
        Some(field) => match read_endpoint(&field, report) {
            Some(e) => Some(e),
            None => {
                ok = false;
                None
            }
        },
    };

    let gateway = match section.get("gateway") {
        None => None,
        Some(field) => {
            match report.string(&field) {
                Some((text, at)) => match text.trim().parse::<IpAddr>() {
                    Ok(ip) => Some(ip),
                    Err(_) => {
                        report.error(
                        at,
                        format!("`link.gateway`: `{text}` is not an IP address, like \"192.168.1.1\""),
                    );
                        ok = false;
                        None
                    }
                },
                None => {
                    ok = false;
                    None
                }
            }
        }
    };

    if !ok {
        return None;
    }
    Some(LinkConfig {
        name: name?,
        bind: bind?,
        priority,
        max_rate_mbit,
        endpoint,
        gateway,
    })
}

/// Two peers routing the same network would make cryptokey routing ambiguous.
fn check_allowed_ips_unique(
    sections: &[Section<'_>],
    peers: &[PeerConfig],
    report: &mut Report<'_>,
) {
    let mut seen: Vec<(ipnet::IpNet, usize)> = Vec::new();
    for (i, peer) in peers.iter().enumerate() {
        for net in &peer.allowed_ips {
            if let Some((_, j)) = seen.iter().find(|(n, j)| n == net && *j != i) {
                let other_line = sections[*j].at.map_or(0, |a| report.line_col(a).0);
                report.error(
                    sections[i].get("allowed_ips").and_then(|f| f.at),
                    format!("`peer.allowed_ips`: {net} is also routed to the peer on line {other_line}; each network belongs to one peer"),
                );
            } else {
                seen.push((*net, i));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIVATE: &str = "CHeGN8rpPEXqFrWgiwybzCGhnNqvYo8171cyQAqjnlY=";
    const HUB_PUBLIC: &str = "weJrjrGjRxiAxqLortWGvcfnhlCZJlybUYHAxbATFng=";
    const OTHER_PUBLIC: &str = "Bysg2iciL3R1Kx9cWTbnJt9elE6te7yHVij4ZKY3xTs=";

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(text, Path::new("/etc/wgbond/wgb0.toml"))
    }

    fn minimal_site() -> String {
        format!(
            "[interface]\nprivate_key = \"{PRIVATE}\"\n\n[[peer]]\npublic_key = \"{HUB_PUBLIC}\"\n\
             endpoint = \"hub.example.net:51820\"\n\n[[link]]\nname = \"cable\"\nbind_interface = \"eth1\"\n"
        )
    }

    #[test]
    fn defaults_of_a_minimal_site() {
        let c = parse(&minimal_site()).expect("valid");
        assert_eq!(c.name, "wgb0");
        assert_eq!(c.role(), Role::Site);
        assert_eq!(c.interface.mtu, DEFAULT_MTU);
        assert_eq!(c.interface.table, RouteTable::Auto);
        assert_eq!(c.interface.listen_port, None);
        assert_eq!(c.interface.fwmark, None);
        assert!(c.interface.addresses.is_empty() && c.interface.dns.is_empty());
        assert!(c.interface.pre_up.is_empty() && c.interface.post_down.is_empty());
        assert_eq!(c.interface.metrics_listen, None);
        assert_eq!(c.bond, BondSection::default());
        assert_eq!(c.bond.mode, bond::Mode::Auto);
        assert_eq!(c.bond.probe_interval, Duration::from_millis(100));
        let peer = &c.peers[0];
        assert_eq!(peer.persistent_keepalive, None);
        assert_eq!(peer.preshared_key, None);
        assert!(peer.allowed_ips.is_empty());
        let link = &c.links[0];
        assert_eq!(link.bind, LinkBind::Interface("eth1".into()));
        assert_eq!(
            (link.priority, link.max_rate_mbit, link.gateway),
            (0, None, None)
        );
        assert_eq!(c.link_endpoint(link), Some("hub.example.net:51820"));
        assert_eq!(
            crate::keys::encode(&c.interface.private_key),
            PRIVATE,
            "the key is decoded, not re-derived"
        );
    }

    #[test]
    fn values_are_read_and_normalised() {
        let text = format!(
            r#"[interface]
name = "bond0"
private_key = "{PRIVATE}"
address = "10.99.0.2"
listen_port = 40000
mtu = 1280
table = "main"
fwmark = "0xca6c"
dns = "10.99.0.1"
pre_up = "echo %i"
post_up = ["a", "b"]
metrics_listen = "[::1]:9586"

[bond]
mode = "failover"
probe_interval_ms = 50
reorder_max_ms = 200
max_queue_delay_ms = 30

[[peer]]
name = "hub"
public_key = "{HUB_PUBLIC}"
preshared_key = "{OTHER_PUBLIC}"
allowed_ips = ["10.1.2.3/8", "fd00::1/64", "192.0.2.1"]
endpoint = "[2001:db8::1]:51820"
persistent_keepalive = 0

[[link]]
name = "sat"
bind_address = "198.51.100.2"
priority = 2
max_rate_mbit = 12.5
endpoint = "203.0.113.9:51820"
gateway = "198.51.100.1"
"#
        );
        let c = parse(&text).expect("valid");
        assert_eq!(c.name, "bond0");
        let i = &c.interface;
        assert_eq!(
            i.addresses,
            vec!["10.99.0.2/32".parse::<ipnet::IpNet>().unwrap()]
        );
        assert_eq!((i.listen_port, i.mtu), (Some(40000), 1280));
        assert_eq!(i.table, RouteTable::Id(254));
        assert_eq!(i.fwmark, Some(0xca6c));
        assert_eq!(i.dns, vec!["10.99.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(i.pre_up, vec!["echo %i".to_string()]);
        assert_eq!(i.post_up, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(i.metrics_listen, Some("[::1]:9586".parse().unwrap()));
        assert_eq!(c.bond.mode, bond::Mode::Failover);
        assert_eq!(c.bond.probe_interval, Duration::from_millis(50));
        assert_eq!(c.bond.reorder_max_wait, Duration::from_millis(200));
        assert_eq!(c.bond.max_queue_delay, Duration::from_millis(30));
        let p = &c.peers[0];
        assert_eq!(p.name.as_deref(), Some("hub"));
        assert!(p.preshared_key.is_some());
        // Host bits are cleared, like `wg`; a bare address is a host route.
        let nets: Vec<String> = p.allowed_ips.iter().map(ToString::to_string).collect();
        assert_eq!(nets, ["10.0.0.0/8", "fd00::/64", "192.0.2.1/32"]);
        assert_eq!(p.persistent_keepalive, None, "0 means off");
        let l = &c.links[0];
        assert_eq!(l.bind, LinkBind::Address("198.51.100.2".parse().unwrap()));
        assert_eq!(l.priority, 2);
        assert_eq!(l.max_rate_mbit, Some(12.5));
        assert_eq!(l.bond_link_config().max_rate_bps, Some(12_500_000));
        assert_eq!(c.link_endpoint(l), Some("203.0.113.9:51820"));
        assert_eq!(l.gateway, Some("198.51.100.1".parse().unwrap()));
        let core = c.bond.bond_config(true, 7);
        assert_eq!(
            (core.mode, core.sends_hello, core.bond_id),
            (bond::Mode::Failover, true, 7)
        );
    }

    #[test]
    fn inline_tables_work_like_sections() {
        let text = format!(
            "interface = {{ private_key = \"{PRIVATE}\", listen_port = 51820 }}\n\
             peer = [{{ public_key = \"{HUB_PUBLIC}\", allowed_ips = [\"10.99.0.2/32\"] }}]\n"
        );
        let c = parse(&text).expect("valid");
        assert_eq!(c.role(), Role::Hub);
        assert_eq!(c.peers.len(), 1);
    }

    #[test]
    fn hub_rejects_the_same_network_on_two_peers() {
        let text = format!(
            "[interface]\nprivate_key = \"{PRIVATE}\"\nlisten_port = 51820\n\n\
             [[peer]]\npublic_key = \"{HUB_PUBLIC}\"\nallowed_ips = [\"10.99.0.2/32\"]\n\n\
             [[peer]]\npublic_key = \"{OTHER_PUBLIC}\"\nallowed_ips = [\"10.99.0.2/32\"]\n"
        );
        let errors = parse(&text).expect_err("ambiguous routing");
        assert_eq!(errors.0.len(), 1, "{errors}");
        assert_eq!((errors.0[0].line, errors.0[0].column), (11, 15));
        assert!(errors.0[0]
            .message
            .contains("also routed to the peer on line 5"));
    }

    #[test]
    fn too_many_links() {
        let mut text = minimal_site();
        for i in 0..MAX_LINKS {
            text.push_str(&format!(
                "\n[[link]]\nname = \"l{i}\"\nbind_interface = \"eth{i}\"\n"
            ));
        }
        let errors = parse(&text).expect_err("17 links");
        assert_eq!(errors.0.len(), 1, "{errors}");
        assert!(errors.0[0]
            .message
            .contains("too many links: 17 [[link]] sections, at most 16"));
    }

    #[test]
    fn ipv6_address_needs_mtu_1280() {
        let text = minimal_site().replace(
            "[interface]\n",
            "[interface]\naddress = [\"fd99::2/64\"]\nmtu = 1200\n",
        );
        let errors = parse(&text).expect_err("mtu");
        assert!(errors.to_string().contains("below 1280"), "{errors}");
    }

    #[test]
    fn line_and_column_count_characters_not_bytes() {
        // The multi-byte `ü` before the error must count as one column.
        let text = minimal_site().replace(
            "[interface]\n",
            "[interface]\npost_up = [\"echo für\", 5]\n",
        );
        let errors = parse(&text).expect_err("post_up");
        assert_eq!(errors.0.len(), 1, "{errors}");
        assert_eq!((errors.0[0].line, errors.0[0].column), (2, 24), "{errors}");
    }

    #[test]
    fn debug_output_hides_secrets() {
        let text = minimal_site().replace(
            "endpoint =",
            &format!("preshared_key = \"{OTHER_PUBLIC}\"\nendpoint ="),
        );
        let c = parse(&text).expect("valid");
        let debug = format!("{c:?}");
        assert!(!debug.contains(PRIVATE), "{debug}");
        assert!(!debug.contains(OTHER_PUBLIC), "{debug}");
        assert!(debug.contains(HUB_PUBLIC), "public keys may show");
    }

    #[test]
    fn wg_quick_names_suggest_ours() {
        assert_eq!(closest("PrivateKey", INTERFACE_KEYS), Some("private_key"));
        assert_eq!(closest("AllowedIPs", PEER_KEYS), Some("allowed_ips"));
        assert_eq!(closest("ListenPort", INTERFACE_KEYS), Some("listen_port"));
        assert_eq!(closest("PostUp", INTERFACE_KEYS), Some("post_up"));
        assert_eq!(closest("Peer", TOP_KEYS), Some("peer"));
        assert_eq!(closest("listen_prot", INTERFACE_KEYS), Some("listen_port"));
        assert_eq!(closest("colour", INTERFACE_KEYS), None);
    }

    #[test]
    fn every_key_is_listed_once() {
        let keys = all_keys();
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), keys.len());
        assert!(keys.contains(&"interface.private_key_file".to_string()));
        assert!(keys.contains(&"link.gateway".to_string()));
    }
}
