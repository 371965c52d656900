//! The tokio IO layer: TUN device, one UDP socket per link, kernel network configuration,
//! control socket.

pub mod allowed_ips;
pub mod control;
pub mod daemon;
pub mod hooks;
pub mod launch;
pub mod metrics;
pub mod netcfg;
pub mod systemd;
