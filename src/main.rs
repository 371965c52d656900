//! The `wgbond` command.
use clap::Parser as _;

fn main() -> std::process::ExitCode {
    wgbond::cli::run(wgbond::cli::Cli::parse())
}
