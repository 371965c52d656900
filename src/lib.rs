//! wgbond: a multi-path bonding VPN.
//!
//! Several WAN links are joined into one tunnel: every link carries its own userspace
//! WireGuard session (boringtun), and a bonding core decides per packet which link(s) carry it,
//! from measured latency, loss and capacity. The receiver drops duplicates, restores order with
//! an adaptive timeout and writes one stream to a TUN device.
//!
//! # Layout
//! - [`bond`]: the sans-IO core (wire format, link estimator, scheduler, reorder buffer). No
//!   sockets, no clock: packets and `now` in, datagrams and wake-up times out.
//! - `config`: the TOML config file, validated, with `FILE:LINE:COL` errors.
//! - `keys`: `genkey`/`pubkey`/`genpsk`, byte-compatible with `wg`.
//! - `tunnel`: the only module that touches boringtun (one `Tunn` per link).
//! - `io`: the thin tokio driver (TUN, one UDP socket per link, routes, control socket).
//!
//! # Data path
//! ```text
//!  TUN --> Bond::handle_outbound --> scheduler --> per-link pacing queue
//!      --> Bond::poll_transmit --> Tunn::encapsulate --> link UDP socket --> WAN
//!  WAN --> link UDP socket --> Tunn::decapsulate --> Bond::handle_inbound
//!      --> dedup + reorder buffer --> Bond::poll_deliver --> TUN
//! ```
#![warn(missing_docs)]

pub mod bond;
pub mod cli;
pub mod config;
pub mod io;
pub mod keys;
pub mod tunnel;
