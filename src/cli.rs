//! The `wgbond` command line: argument parsing and the subcommands that need no daemon
//! (`up`, `down` and `show` are in [`crate::io::launch`]).
//!
//! Exit codes: 0 on success, 1 on failure with a one-line reason on stderr (`-v` adds detail).

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, Role};
use crate::keys;

/// Where `up NAME` and `down NAME` look for `NAME.toml`.
pub const CONFIG_DIR: &str = "/etc/wgbond";

/// Multi-path bonding VPN: one WireGuard tunnel over several WAN links.
#[derive(Debug, Parser)]
#[command(name = "wgbond", version, about, long_about = None)]
pub struct Cli {
    /// More detail on stderr (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a new private key (base64), like `wg genkey`.
    Genkey,
    /// Read a private key on stdin, print its public key, like `wg pubkey`.
    Pubkey,
    /// Print a new preshared key, like `wg genpsk`.
    Genpsk,
    /// Validate a config file; print every problem as FILE:LINE:COL: message.
    Check {
        /// A config file, or the name of one in /etc/wgbond.
        config: String,
    },
    /// Bring a tunnel up (CONFIG is a file, or NAME for /etc/wgbond/NAME.toml).
    Up {
        /// A config file, or the name of one in /etc/wgbond.
        config: String,
        /// Stay in the foreground (for systemd) instead of returning once the interface is up.
        #[arg(long)]
        foreground: bool,
    },
    /// Bring a tunnel down and remove everything `up` added.
    Down {
        /// A config file, or the name of one in /etc/wgbond.
        config: String,
    },
    /// Show interfaces, peers and links: state, RTT, loss, rate, bytes.
    Show {
        /// Only this interface.
        name: Option<String>,
        /// Machine-readable output.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Show again every SECONDS (default 1), with what each link carries now, until
        /// interrupted.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "1",
              value_parser = parse_watch_interval)]
        watch: Option<f64>,
    },
}

/// `--watch SECONDS`: a number of seconds from 0.1 to 3600.
fn parse_watch_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "`{s}` is not an interval: give seconds from 0.1 to 3600, e.g. `--watch 2` (an interface name goes before it: `show site --watch`)"
        )),
    }
}

/// `CONFIG|NAME` to a path: a bare name (no `/`, no `.toml`) means `/etc/wgbond/NAME.toml`.
pub fn resolve_config(arg: &str) -> PathBuf {
    if arg.contains('/') || arg.ends_with(".toml") {
        PathBuf::from(arg)
    } else {
        Path::new(CONFIG_DIR).join(format!("{arg}.toml"))
    }
}

/// Runs a parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    let verbose = cli.verbose;
    let result = match cli.command {
        Command::Genkey => print_key(&keys::generate_private()),
        Command::Genpsk => print_key(&keys::generate_psk()),
        Command::Pubkey => pubkey(),
        Command::Check { config } => return check(&resolve_config(&config), verbose),
        Command::Up { config, foreground } => {
            crate::io::launch::up(&resolve_config(&config), foreground, verbose)
        }
        Command::Down { config } => crate::io::launch::down(&config),
        Command::Show { name, json, watch } => match watch {
            Some(secs) => crate::io::launch::watch(name.as_deref(), secs),
            None => crate::io::launch::show(name.as_deref(), json),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("wgbond: {reason}");
            ExitCode::FAILURE
        }
    }
}

fn print_key(key: &[u8; 32]) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", keys::encode(key))
        .and_then(|()| out.flush())
        .map_err(|e| format!("cannot write the key: {e}"))
}

fn pubkey() -> Result<(), String> {
    let mut text = String::new();
    // A key is 44 characters; a little slack allows for whitespace, and the limit keeps a
    // wrong pipe (a big file) from being read whole.
    std::io::stdin()
        .take(1024)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read a private key from stdin: {e}"))?;
    let private = keys::decode(&text).map_err(|e| {
        format!("expected a private key in base64 on stdin, as printed by `wgbond genkey` ({e})")
    })?;
    print_key(&keys::public_from_private(&private))
}

fn check(path: &Path, verbose: u8) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            if let Some(w) = crate::config::exposed_key_warning(path) {
                eprintln!("warning: {w}");
            }
            if verbose > 0 {
                let role = match config.role() {
                    Role::Site => "site",
                    Role::Hub => "hub",
                };
                let links = config.links.len();
                let peers = config.peers.len();
                eprintln!(
                    "ok: {} ({role} `{}`, {links} link{}, {peers} peer{})",
                    path.display(),
                    config.name,
                    if links == 1 { "" } else { "s" },
                    if peers == 1 { "" } else { "s" },
                );
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_to_etc_wgbond_and_paths_stay() {
        assert_eq!(
            resolve_config("office"),
            Path::new("/etc/wgbond/office.toml")
        );
        assert_eq!(resolve_config("office.toml"), Path::new("office.toml"));
        assert_eq!(resolve_config("./office"), Path::new("./office"));
        assert_eq!(resolve_config("/srv/a.toml"), Path::new("/srv/a.toml"));
    }

    #[test]
    fn command_line_parses() {
        let cli = Cli::try_parse_from(["wgbond", "up", "office", "--foreground", "-vv"])
            .expect("valid command line");
        assert_eq!(cli.verbose, 2);
        assert!(
            matches!(cli.command, Command::Up { ref config, foreground: true } if config == "office")
        );
        let cli = Cli::try_parse_from(["wgbond", "show", "--json"]).expect("valid");
        assert!(matches!(
            cli.command,
            Command::Show {
                name: None,
                json: true,
                watch: None
            }
        ));
        let cli = Cli::try_parse_from(["wgbond", "show", "--watch"]).expect("valid");
        assert!(matches!(cli.command, Command::Show { watch: Some(w), .. } if w == 1.0));
        let cli = Cli::try_parse_from(["wgbond", "show", "site", "--watch", "0.5"]).expect("valid");
        assert!(
            matches!(cli.command, Command::Show { ref name, watch: Some(w), .. } if w == 0.5 && name.as_deref() == Some("site"))
        );
        for bad in [
            &["show", "--watch", "0"][..],
            &["show", "--watch", "x"],
            &["show", "--watch", "--json"],
        ] {
            let args = std::iter::once("wgbond").chain(bad.iter().copied());
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
        assert!(
            Cli::try_parse_from(["wgbond", "check"]).is_err(),
            "check needs a file"
        );
    }
}
