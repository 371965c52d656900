//! `pre_up`, `post_up`, `pre_down` and `post_down` commands, run as wg-quick runs them.
//!
//! Each command runs with `/bin/sh -c`, with every `%i` replaced by the interface name, in
//! config order. Its stdout and stderr are ours (the journal under systemd); stdin is
//! `/dev/null`. It gets `WGBOND_INTERFACE` and `WGBOND_HOOK` (`pre_up`, ...) in its
//! environment, and not our `NOTIFY_SOCKET`/`WATCHDOG_*`, so it cannot speak for the daemon.
//!
//! - `pre_up`, `post_up`: the first failing command stops the stage and its error fails `up`
//!   (the daemon then undoes what it did, running `pre_down`/`post_down` only if it got that far,
//!   as wg-quick does).
//! - `pre_down`, `post_down`: every command runs even if one fails, so teardown is complete;
//!   the first failure is returned for the daemon to log.
//!
//! Where the daemon calls them (blocking: use [`run_async`] inside the runtime):
//! ```text
//! run(PreUp)  -> create TUN, addresses, routes (netcfg::apply) -> run(PostUp) -> READY=1
//! SIGTERM     -> STOPPING=1 -> run(PreDown) -> netcfg teardown, close TUN -> run(PostDown)
//! ```

use std::fmt;
use std::io;
use std::os::unix::process::ExitStatusExt as _;
use std::process::{Command, ExitStatus, Stdio};

use crate::io::systemd::CHILD_ENV_REMOVE;

/// When a hook runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookStage {
    /// Before the interface is created.
    PreUp,
    /// After the interface is up, addresses and routes are in place.
    PostUp,
    /// Before the interface is taken down.
    PreDown,
    /// After everything `up` added is removed.
    PostDown,
}

impl HookStage {
    /// The config key (`pre_up`, ...), also the value of `WGBOND_HOOK`.
    pub fn key(self) -> &'static str {
        match self {
            Self::PreUp => "pre_up",
            Self::PostUp => "post_up",
            Self::PreDown => "pre_down",
            Self::PostDown => "post_down",
        }
    }

    /// Whether a failure stops the stage (bringing up) or the stage runs on (tearing down).
    pub fn stops_on_failure(self) -> bool {
        matches!(self, Self::PreUp | Self::PostUp)
    }
}

impl fmt::Display for HookStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// How a hook command failed.
#[derive(Debug)]
pub enum HookFailure {
    /// It exited with a non-zero status.
    Exit(i32),
    /// It was killed by a signal.
    Signal(i32),
    /// `/bin/sh` could not be started.
    Spawn(io::Error),
}

/// A hook command that failed.
#[derive(Debug)]
pub struct HookError {
    /// The stage it ran in.
    pub stage: HookStage,
    /// The command as run (after `%i` substitution).
    pub command: String,
    /// What went wrong.
    pub failure: HookFailure,
    /// How many commands of a teardown stage failed in all (1 for bring-up stages).
    pub failed: usize,
}

impl fmt::Display for HookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} hook `{}` ", self.stage, self.command)?;
        match &self.failure {
            HookFailure::Exit(code) => write!(f, "failed with exit status {code}")?,
            HookFailure::Signal(sig) => write!(f, "was killed by signal {sig}")?,
            HookFailure::Spawn(e) => write!(f, "could not be started: {e}")?,
        }
        if self.failed > 1 {
            write!(
                f,
                " (and {} more {} hooks failed)",
                self.failed - 1,
                self.stage
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for HookError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.failure {
            HookFailure::Spawn(e) => Some(e),
            _ => None,
        }
    }
}

/// `command` with every `%i` replaced by `interface`, as wg-quick does (interface names are
/// letters, digits and `_.-=+`, so they need no shell quoting).
pub fn expand(command: &str, interface: &str) -> String {
    command.replace("%i", interface)
}

fn run_one(stage: HookStage, command: &str, interface: &str) -> Result<(), HookFailure> {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .env("WGBOND_INTERFACE", interface)
        .env("WGBOND_HOOK", stage.key());
    for key in CHILD_ENV_REMOVE {
        cmd.env_remove(key);
    }
    let status: ExitStatus = cmd.status().map_err(HookFailure::Spawn)?;
    if status.success() {
        Ok(())
    } else if let Some(code) = status.code() {
        Err(HookFailure::Exit(code))
    } else {
        Err(HookFailure::Signal(status.signal().unwrap_or(0)))
    }
}

/// Runs the `stage` commands for `interface`, in order, blocking until they finish.
pub fn run(stage: HookStage, commands: &[String], interface: &str) -> Result<(), HookError> {
    let mut first: Option<HookError> = None;
    for command in commands {
        let command = expand(command, interface);
        tracing::info!(hook = stage.key(), interface, "running `{command}`");
        let Err(failure) = run_one(stage, &command, interface) else {
            continue;
        };
        let error = HookError {
            stage,
            command,
            failure,
            failed: 1,
        };
        if stage.stops_on_failure() {
            return Err(error);
        }
        tracing::warn!("{error}");
        match &mut first {
            Some(first) => first.failed += 1,
            None => first = Some(error),
        }
    }
    first.map_or(Ok(()), Err)
}

/// [`run`] on tokio's blocking pool, for use inside the daemon's runtime.
pub async fn run_async(
    stage: HookStage,
    commands: Vec<String>,
    interface: String,
) -> Result<(), HookError> {
    match tokio::task::spawn_blocking(move || run(stage, &commands, &interface)).await {
        Ok(result) => result,
        Err(join) => Err(HookError {
            stage,
            command: String::new(),
            failure: HookFailure::Spawn(io::Error::other(format!("hook task failed: {join}"))),
            failed: 1,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmds(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn read(path: &std::path::Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[test]
    fn commands_run_in_order_with_interface_substituted() {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("out");
        let o = out.display();
        let list = cmds(&[
            &format!("echo first %i >> {o}"),
            &format!("echo \"second %i %i $WGBOND_INTERFACE $WGBOND_HOOK\" >> {o}"),
            // stdin is /dev/null: `cat` must not block on the test's stdin.
            &format!("cat >> {o}"),
        ]);
        run(HookStage::PostUp, &list, "wgb0").expect("hooks succeed");
        assert_eq!(read(&out), "first wgb0\nsecond wgb0 wgb0 wgb0 post_up\n");
    }

    #[test]
    fn failing_up_hook_names_command_and_status_and_stops() {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("out");
        let o = out.display();
        let list = cmds(&[
            &format!("echo one >> {o}"),
            "ip link show %i-missing >/dev/null 2>&1; exit 3",
            &format!("echo never >> {o}"),
        ]);
        let err = run(HookStage::PreUp, &list, "wgb0").expect_err("second hook fails");
        assert_eq!(
            err.to_string(),
            "pre_up hook `ip link show wgb0-missing >/dev/null 2>&1; exit 3` failed with exit status 3"
        );
        assert!(matches!(err.failure, HookFailure::Exit(3)));
        assert_eq!(read(&out), "one\n");
    }

    #[test]
    fn down_hooks_all_run_and_report_the_first_failure() {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("out");
        let o = out.display();
        let list = cmds(&[
            "false",
            &format!("echo still >> {o}"),
            "exit 7",
            &format!("echo end >> {o}"),
        ]);
        let err = run(HookStage::PostDown, &list, "wgb0").expect_err("two hooks fail");
        assert_eq!(
            err.to_string(),
            "post_down hook `false` failed with exit status 1 (and 1 more post_down hooks failed)"
        );
        assert_eq!(read(&out), "still\nend\n");
    }

    #[test]
    fn killed_hook_reports_the_signal() {
        let err = run(HookStage::PostUp, &cmds(&["kill -9 $$"]), "wgb0").expect_err("killed");
        assert!(matches!(err.failure, HookFailure::Signal(9)), "{err:?}");
        assert!(err.to_string().ends_with("was killed by signal 9"), "{err}");
    }

    #[test]
    fn no_hooks_is_fine() {
        assert!(run(HookStage::PreDown, &[], "wgb0").is_ok());
    }

    #[tokio::test]
    async fn async_runs_on_the_blocking_pool() {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("out");
        let list = cmds(&[&format!("echo %i > {}", out.display())]);
        run_async(HookStage::PreUp, list, "wgb1".to_owned())
            .await
            .expect("hook succeeds");
        assert_eq!(read(&out), "wgb1\n");
    }
}
