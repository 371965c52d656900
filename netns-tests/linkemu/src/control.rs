//! The control protocol: one command per line on a unix socket, one reply line each.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::direction::DirShared;
use crate::params::{apply_set, DirParams, Target};

/// Longest command line accepted; anything longer is a client bug.
const MAX_LINE_BYTES: u64 = 4096;

/// Help text returned by `help`, one line.
const HELP: &str =
    "commands: set up|down|both KEY=VALUE... | outage on|off [up|down|both] | show | \
                    stats [reset] | quit";

/// CPU time used by this process so far: (user, system).
pub fn cpu_times() -> (Duration, Duration) {
    // SAFETY: rusage is plain data; getrusage fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    (tv(usage.ru_utime), tv(usage.ru_stime))
}

/// The running emulator as the control socket sees it.
pub struct Emulator {
    /// Up (index 0) and down (index 1).
    pub dirs: [Arc<DirShared>; 2],
    /// When the emulator started, for wall time and CPU share.
    pub started: Instant,
}

impl Emulator {
    fn lock_params(&self) -> [MutexGuard<'_, DirParams>; 2] {
        // Always locked in the same order (up, then down), so two clients cannot deadlock.
        let up = self.dirs[0]
            .params
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let down = self.dirs[1]
            .params
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        [up, down]
    }

    /// Applies a `set`-style word list (`DIR key=value...`) to both directions, all or nothing.
    pub fn set(&self, words: &[&str]) -> Result<(), String> {
        let mut guards = self.lock_params();
        let mut updated = [guards[0].clone(), guards[1].clone()];
        apply_set(&mut updated, words)?;
        for ((guard, new), dir) in guards.iter_mut().zip(updated).zip(&self.dirs) {
            if **guard != new {
                **guard = new;
                dir.generation.fetch_add(1, Ordering::Release);
                dir.waker.wake();
            }
        }
        Ok(())
    }

    /// CPU use summary: `cpu_user_s=.. cpu_sys_s=.. wall_s=.. cpu_pct=..`.
    pub fn cpu_report(&self) -> String {
        let (user, sys) = cpu_times();
        let wall = self.started.elapsed().as_secs_f64();
        let pct = if wall > 0.0 {
            (user + sys).as_secs_f64() / wall * 100.0
        } else {
            0.0
        };
        format!(
            "cpu_user_s={:.3} cpu_sys_s={:.3} wall_s={wall:.3} cpu_pct={pct:.1}",
            user.as_secs_f64(),
            sys.as_secs_f64()
        )
    }

    /// Counters of both directions plus CPU use, one line.
    pub fn stats(&self) -> String {
        format!(
            "{} {} {}",
            self.dirs[0].stats.describe("up"),
            self.dirs[1].stats.describe("down"),
            self.cpu_report()
        )
    }

    /// Runs one command line; returns the reply and whether the emulator should exit.
    pub fn execute(&self, line: &str) -> (String, bool) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match words.as_slice() {
            [] => Err("empty command".to_string()),
            ["help"] => Ok(HELP.to_string()),
            ["set", rest @ ..] => self.set(rest).map(|()| "ok".to_string()),
            ["outage", state, rest @ ..] => {
                let target = match rest {
                    [] => Ok("both"),
                    [dir] => Target::parse(dir).map(|_| *dir),
                    _ => Err("usage: outage on|off [up|down|both]".to_string()),
                };
                target.and_then(|dir| {
                    let setting = format!("outage={state}");
                    self.set(&[dir, &setting]).map(|()| "ok".to_string())
                })
            }
            ["show"] => {
                let guards = self.lock_params();
                Ok(format!(
                    "{} {}",
                    guards[0].describe("up"),
                    guards[1].describe("down")
                ))
            }
            ["stats"] => Ok(self.stats()),
            ["stats", "reset"] => {
                for dir in &self.dirs {
                    dir.stats.reset();
                }
                Ok("ok".to_string())
            }
            ["quit"] => return ("ok".to_string(), true),
            [other, ..] => Err(format!("unknown command '{other}'; {HELP}")),
        };
        match reply {
            Ok(text) => (text, false),
            Err(err) => (format!("error: {err}"), false),
        }
    }
}

fn serve_client(emulator: &Emulator, stream: UnixStream, quit: &Sender<String>) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let n = (&mut reader).take(MAX_LINE_BYTES).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        let (reply, exit) = emulator.execute(line.trim());
        writeln!(writer, "{reply}")?;
        if exit {
            // The receiver only goes away when main is already exiting.
            let _ = quit.send("quit command".to_string());
            return Ok(());
        }
    }
}

/// Accepts control clients forever, one thread each (clients are few and short-lived).
pub fn serve(listener: UnixListener, emulator: Arc<Emulator>, quit: Sender<String>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let emulator = Arc::clone(&emulator);
        let quit = quit.clone();
        thread::spawn(move || {
            // A client that hangs up mid-reply is its own problem.
            let _ = serve_client(&emulator, stream, &quit);
        });
    }
}

/// Sends one command to a running emulator and returns its reply line.
pub fn request(socket: &std::path::Path, command: &str) -> io::Result<String> {
    let mut stream = UnixStream::connect(socket).map_err(|err| {
        io::Error::new(
            err.kind(),
            format!("cannot reach emulator at {}: {err}", socket.display()),
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    writeln!(stream, "{command}")?;
    let mut reply = String::new();
    BufReader::new(stream).take(1 << 20).read_line(&mut reply)?;
    Ok(reply.trim_end().to_string())
}
