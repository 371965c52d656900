//! Per-direction link settings and the `key=value` syntax that changes them.

use std::fmt::Write as _;
use std::time::Duration;

/// Which direction(s) of the link a command applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Frames arriving on interface A, leaving on B (site -> internet in the lab).
    Up,
    /// Frames arriving on interface B, leaving on A (internet -> site in the lab).
    Down,
    /// Both directions.
    Both,
}

impl Target {
    /// Parses `up`, `down` or `both`.
    pub fn parse(word: &str) -> Result<Self, String> {
        match word {
            "up" => Ok(Self::Up),
            "down" => Ok(Self::Down),
            "both" => Ok(Self::Both),
            other => Err(format!(
                "unknown direction '{other}' (expected up, down or both)"
            )),
        }
    }

    /// Whether this target includes direction `index` (0 = up, 1 = down).
    pub fn includes(self, index: usize) -> bool {
        matches!(
            (self, index),
            (Self::Both, _) | (Self::Up, 0) | (Self::Down, 1)
        )
    }
}

/// Everything that shapes one direction of the link.
#[derive(Clone, Debug, PartialEq)]
pub struct DirParams {
    /// One-way propagation delay added to every frame.
    pub delay: Duration,
    /// Each frame's delay varies uniformly within `delay ± jitter` (clamped at zero).
    pub jitter: Duration,
    /// Independent random loss probability, 0..=1.
    pub loss: f64,
    /// Gilbert-Elliott: probability per frame of going from the good to the bad state (0 disables).
    pub ge_p: f64,
    /// Gilbert-Elliott: probability per frame of going from the bad back to the good state.
    pub ge_r: f64,
    /// Gilbert-Elliott: loss probability while in the bad state.
    pub ge_bad_loss: f64,
    /// Gilbert-Elliott: loss probability while in the good state.
    pub ge_good_loss: f64,
    /// Bottleneck rate in bit/s; 0 means unlimited.
    pub rate_bps: u64,
    /// Largest backlog (as time to drain at `rate_bps`) before tail drop.
    pub queue: Duration,
    /// Drop every frame, and the frames already in flight when it starts.
    pub outage: bool,
    /// Let jitter reorder frames (otherwise a frame never leaves before the one ahead of it).
    pub reorder: bool,
}

impl Default for DirParams {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            ge_p: 0.0,
            ge_r: 1.0,
            ge_bad_loss: 1.0,
            ge_good_loss: 0.0,
            rate_bps: 0,
            queue: Duration::from_millis(50),
            outage: false,
            reorder: false,
        }
    }
}

/// The setting names `apply` understands, for error messages and `help`.
pub const KEYS: &str = "delay_ms jitter_ms loss_pct rate_mbit queue_ms ge_p_pct ge_r_pct \
                        ge_bad_loss_pct ge_good_loss_pct outage=on|off reorder=on|off";

fn parse_number(key: &str, value: &str) -> Result<f64, String> {
    let number: f64 = value
        .parse()
        .map_err(|_| format!("{key}: '{value}' is not a number"))?;
    if !number.is_finite() || number < 0.0 {
        return Err(format!("{key}: '{value}' must be a finite number >= 0"));
    }
    Ok(number)
}

fn parse_pct(key: &str, value: &str) -> Result<f64, String> {
    let pct = parse_number(key, value)?;
    if pct > 100.0 {
        return Err(format!("{key}: '{value}' must be between 0 and 100"));
    }
    Ok(pct / 100.0)
}

fn parse_ms(key: &str, value: &str) -> Result<Duration, String> {
    let ms = parse_number(key, value)?;
    if ms > 3_600_000.0 {
        return Err(format!("{key}: '{value}' is more than an hour"));
    }
    Ok(Duration::from_secs_f64(ms / 1000.0))
}

fn parse_switch(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "1" | "true" => Ok(true),
        "off" | "0" | "false" => Ok(false),
        _ => Err(format!("{key}: '{value}' must be on or off")),
    }
}

impl DirParams {
    /// Applies one `key=value` setting; on error `self` is unchanged.
    pub fn apply(&mut self, setting: &str) -> Result<(), String> {
        let Some((key, value)) = setting.split_once('=') else {
            return Err(format!("'{setting}' is not key=value (known keys: {KEYS})"));
        };
        match key {
            "delay_ms" => self.delay = parse_ms(key, value)?,
            "jitter_ms" => self.jitter = parse_ms(key, value)?,
            "queue_ms" => self.queue = parse_ms(key, value)?,
            "loss_pct" => self.loss = parse_pct(key, value)?,
            "ge_p_pct" => self.ge_p = parse_pct(key, value)?,
            "ge_r_pct" => self.ge_r = parse_pct(key, value)?,
            "ge_bad_loss_pct" => self.ge_bad_loss = parse_pct(key, value)?,
            "ge_good_loss_pct" => self.ge_good_loss = parse_pct(key, value)?,
            "rate_mbit" => {
                let mbit = parse_number(key, value)?;
                if mbit > 1_000_000.0 {
                    return Err(format!("{key}: '{value}' is more than 1 Tbit/s"));
                }
                // Rounded to whole bit/s: finer precision means nothing at frame granularity.
                self.rate_bps = (mbit * 1e6).round() as u64;
            }
            "outage" => self.outage = parse_switch(key, value)?,
            "reorder" => self.reorder = parse_switch(key, value)?,
            _ => return Err(format!("unknown setting '{key}' (known keys: {KEYS})")),
        }
        Ok(())
    }

    /// Renders the settings as `prefix.key=value` words, the same keys `apply` takes.
    pub fn describe(&self, prefix: &str) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let on = |b: bool| if b { "on" } else { "off" };
        let mut out = String::new();
        let _ = write!(
            out,
            "{prefix}.delay_ms={} {prefix}.jitter_ms={} {prefix}.loss_pct={} {prefix}.rate_mbit={} \
             {prefix}.queue_ms={} {prefix}.ge_p_pct={} {prefix}.ge_r_pct={} \
             {prefix}.ge_bad_loss_pct={} {prefix}.ge_good_loss_pct={} {prefix}.outage={} \
             {prefix}.reorder={}",
            ms(self.delay),
            ms(self.jitter),
            self.loss * 100.0,
            self.rate_bps as f64 / 1e6,
            ms(self.queue),
            self.ge_p * 100.0,
            self.ge_r * 100.0,
            self.ge_bad_loss * 100.0,
            self.ge_good_loss * 100.0,
            on(self.outage),
            on(self.reorder),
        );
        out
    }
}

/// Applies a whole `set` command (`DIR key=value...`) to the two directions, all or nothing.
pub fn apply_set(dirs: &mut [DirParams; 2], words: &[&str]) -> Result<(), String> {
    let Some((first, settings)) = words.split_first() else {
        return Err("set needs a direction (up, down, both) and key=value settings".into());
    };
    let target = Target::parse(first)?;
    if settings.is_empty() {
        return Err(format!(
            "set {first}: no key=value settings given (known keys: {KEYS})"
        ));
    }
    let mut updated = dirs.clone();
    for (index, dir) in updated.iter_mut().enumerate() {
        if target.includes(index) {
            for setting in settings {
                dir.apply(setting)?;
            }
        }
    }
    *dirs = updated;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_applies_to_chosen_direction_only() {
        let mut dirs = [DirParams::default(), DirParams::default()];
        apply_set(
            &mut dirs,
            &["down", "delay_ms=12.5", "rate_mbit=20", "loss_pct=1"],
        )
        .unwrap();
        assert_eq!(dirs[0], DirParams::default());
        assert_eq!(dirs[1].delay, Duration::from_micros(12_500));
        assert_eq!(dirs[1].rate_bps, 20_000_000);
        assert!((dirs[1].loss - 0.01).abs() < 1e-12);
    }

    #[test]
    fn bad_setting_leaves_everything_unchanged() {
        let mut dirs = [DirParams::default(), DirParams::default()];
        let err = apply_set(&mut dirs, &["both", "delay_ms=5", "loss_pct=150"]).unwrap_err();
        assert!(err.contains("loss_pct"), "{err}");
        assert_eq!(dirs[0], DirParams::default());
        assert_eq!(dirs[1], DirParams::default());
        let err = apply_set(&mut dirs, &["both", "bogus=1"]).unwrap_err();
        assert!(err.contains("unknown setting 'bogus'"), "{err}");
        assert!(apply_set(&mut dirs, &["sideways", "delay_ms=1"]).is_err());
        assert!(apply_set(&mut dirs, &["up", "delay_ms=-1"]).is_err());
        assert!(apply_set(&mut dirs, &["up", "delay_ms=NaN"]).is_err());
        assert!(apply_set(&mut dirs, &["up"]).is_err());
    }

    #[test]
    fn describe_round_trips_through_apply() {
        let mut dirs = [DirParams::default(), DirParams::default()];
        apply_set(
            &mut dirs,
            &[
                "up",
                "delay_ms=8",
                "jitter_ms=5",
                "ge_p_pct=2",
                "outage=on",
                "reorder=on",
            ],
        )
        .unwrap();
        let text = dirs[0].describe("up");
        let mut parsed = DirParams::default();
        for word in text.split_whitespace() {
            let setting = word.strip_prefix("up.").unwrap();
            parsed.apply(setting).unwrap();
        }
        assert_eq!(parsed, dirs[0]);
    }
}
