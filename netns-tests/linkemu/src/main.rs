//! linkemu: a userspace link emulator for wgbond's network-namespace lab.
//!
//! It bridges two interfaces with AF_PACKET raw sockets (no kernel bridge) and, per direction,
//! applies delay, jitter, random and Gilbert-Elliott loss, a rate limit with a bounded queue,
//! and outages. One thread per direction sleeps in ppoll until a frame arrives or the next
//! held frame is due, so it never spins. Settings change at run time through a unix socket.
//!
//! Layout: `params` (settings and their syntax), `shaper` (one direction, no IO, virtual-time
//! tests), `packet_socket` (AF_PACKET), `direction` (the per-direction thread), `control`
//! (the command protocol and socket).

mod control;
mod direction;
mod packet_socket;
mod params;
mod shaper;

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Instant;

use clap::{Parser, Subcommand};

use crate::control::Emulator;
use crate::direction::DirShared;
use crate::packet_socket::PacketSocket;
use crate::params::{apply_set, DirParams};

/// Userspace link emulator: delay, jitter, loss, burst loss, rate with a bounded queue, outage.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Bridge two interfaces and shape both directions ("up" is A -> B, "down" is B -> A).
    Run {
        /// Interface A (the site side in the lab).
        #[arg(long)]
        a: String,
        /// Interface B (the internet side in the lab).
        #[arg(long)]
        b: String,
        /// Unix socket to accept control commands on.
        #[arg(long)]
        control: PathBuf,
        /// Seed for loss and jitter; the same seed gives the same decisions for the same frames.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Initial settings, as for the `set` command: "up|down|both key=value ...". Repeatable.
        #[arg(long = "set", value_name = "DIR KEY=VALUE...")]
        settings: Vec<String>,
        /// Write our PID here once ready to forward frames.
        #[arg(long)]
        pid_file: Option<PathBuf>,
        /// Run the forwarding threads at real-time priority (SCHED_FIFO), so other load on the
        /// machine does not add delay.
        #[arg(long)]
        realtime: bool,
    },
    /// Send one command to a running emulator and print its reply.
    Ctl {
        /// The emulator's control socket.
        socket: PathBuf,
        /// The command, e.g. `set up delay_ms=10 rate_mbit=50`, `outage on`, `stats`.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        words: Vec<String>,
    },
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t; blocking (not ignoring) lets sigwait collect them.
    unsafe {
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

fn bind_control(path: &Path) -> Result<UnixListener, String> {
    // A socket file left by a killed emulator would make bind fail; replace only sockets.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        } else {
            return Err(format!(
                "{} exists and is not a socket; not replacing it",
                path.display()
            ));
        }
    }
    UnixListener::bind(path).map_err(|err| format!("control socket {}: {err}", path.display()))
}

/// What `linkemu run` was asked to do.
struct RunOptions<'a> {
    a: &'a str,
    b: &'a str,
    control_path: &'a Path,
    seed: u64,
    settings: &'a [String],
    pid_file: Option<&'a Path>,
    realtime: bool,
}

fn run(options: &RunOptions<'_>) -> Result<(), String> {
    let RunOptions {
        a,
        b,
        control_path,
        seed,
        settings,
        pid_file,
        realtime,
    } = *options;
    let mut initial = [DirParams::default(), DirParams::default()];
    for setting in settings {
        let words: Vec<&str> = setting.split_whitespace().collect();
        apply_set(&mut initial, &words).map_err(|err| format!("--set '{setting}': {err}"))?;
    }
    let open =
        |name: &str, receive: bool| PacketSocket::open(name, receive).map_err(|e| e.to_string());
    let sockets = [
        (open(a, true)?, open(b, false)?),
        (open(b, true)?, open(a, false)?),
    ];
    let [up_params, down_params] = initial;
    let dirs = [
        Arc::new(DirShared::new("up", up_params).map_err(|e| e.to_string())?),
        Arc::new(DirShared::new("down", down_params).map_err(|e| e.to_string())?),
    ];
    let emulator = Arc::new(Emulator {
        dirs: dirs.clone(),
        started: Instant::now(),
    });

    // Blocked before any thread starts, so every thread inherits the mask and only the
    // signal thread's sigwait receives them.
    let signals = block_signals();
    let listener = bind_control(control_path)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (exit_tx, exit_rx) = mpsc::channel::<String>();

    let mut workers = Vec::new();
    for (index, ((rx, tx), dir)) in sockets.into_iter().zip(dirs.iter().cloned()).enumerate() {
        let stop = Arc::clone(&stop);
        let exit_tx = exit_tx.clone();
        let dir_seed = seed.wrapping_mul(2).wrapping_add(index as u64);
        workers.push(thread::spawn(move || {
            if let Err(err) = direction::run(&dir, &rx, &tx, dir_seed, realtime, &stop) {
                let _ = exit_tx.send(format!("{} direction failed: {err}", dir.name));
            }
        }));
    }
    {
        let emulator = Arc::clone(&emulator);
        let exit_tx = exit_tx.clone();
        thread::spawn(move || control::serve(listener, emulator, exit_tx));
    }
    {
        let exit_tx = exit_tx.clone();
        thread::spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: signals is a valid set; sig is a valid out pointer.
            unsafe { libc::sigwait(&signals, &mut sig) };
            let _ = exit_tx.send(format!("signal {sig}"));
        });
    }
    if let Some(path) = pid_file {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .map_err(|err| format!("pid file {}: {err}", path.display()))?;
    }
    eprintln!(
        "linkemu: bridging {a} <-> {b}, control {}",
        control_path.display()
    );

    let reason = exit_rx
        .recv()
        .unwrap_or_else(|_| "all senders gone".to_string());
    stop.store(true, Ordering::Relaxed);
    for dir in &dirs {
        dir.waker.wake();
    }
    for worker in workers {
        let _ = worker.join();
    }
    let _ = std::fs::remove_file(control_path);
    if let Some(path) = pid_file {
        let _ = std::fs::remove_file(path);
    }
    eprintln!("linkemu: exiting ({reason}): {}", emulator.stats());
    if reason.contains("failed") {
        Err(reason)
    } else {
        Ok(())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            a,
            b,
            control,
            seed,
            settings,
            pid_file,
            realtime,
        } => run(&RunOptions {
            a: &a,
            b: &b,
            control_path: &control,
            seed,
            settings: &settings,
            pid_file: pid_file.as_deref(),
            realtime,
        }),
        Command::Ctl { socket, words } => match control::request(&socket, &words.join(" ")) {
            Ok(reply) => {
                println!("{reply}");
                if reply.starts_with("error") {
                    return ExitCode::FAILURE;
                }
                Ok(())
            }
            Err(err) => Err(err.to_string()),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("linkemu: {err}");
            ExitCode::FAILURE
        }
    }
}
