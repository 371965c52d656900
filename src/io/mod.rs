//! The tokio IO layer: TUN device, one UDP socket per link, kernel network configuration,
//! control socket.

pub mod netcfg;
