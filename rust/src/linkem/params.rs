//! Link parameters: what one direction of an emulated link does to frames.
//!
//! [`Params`] is plain data with [`Params::validate`]; [`Params::parse`] reads
//! the compact form used by the CLI and the Python lab:
//!
//! ```text
//! delay=40ms,jitter=2ms,loss=1%,rate=100mbit,queue=1bdp,ge=p:0.01/r:0.3/h:0.5,dup=0.1%,reorder=on
//! ```
//!
//! [`parse_duplex`] reads the same form for both directions at once; a key
//! prefixed with `ab.` or `ba.` applies to that direction only
//! (`delay=10ms,ab.rate=10mbit,ba.rate=100mbit`).

use std::fmt;
use std::time::Duration;

/// An invalid parameter or an unreadable parameter string.
///
/// The message names the field and the offending value, for example
/// `loss must be in [0, 1], got 1.5`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError(pub String);

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParamError {}

fn err<T>(msg: String) -> Result<T, ParamError> {
    Err(ParamError(msg))
}

/// Gilbert-Elliott two-state loss model.
///
/// The chain moves Good -> Bad with probability `p` and Bad -> Good with
/// probability `r`, once per frame. As in Gilbert's and Elliott's papers,
/// `h` is the probability that a frame *survives* in the Bad state and `k`
/// the probability that it survives in the Good state. The mean burst length
/// is `1 / r` frames and the stationary loss rate is
/// `p/(p+r) * (1-h) + r/(p+r) * (1-k)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GilbertElliott {
    /// Good -> Bad transition probability per frame.
    pub p: f64,
    /// Bad -> Good transition probability per frame.
    pub r: f64,
    /// Probability that a frame is delivered while in the Bad state.
    pub h: f64,
    /// Probability that a frame is delivered while in the Good state.
    pub k: f64,
}

impl GilbertElliott {
    /// The long-run fraction of frames this model drops.
    pub fn stationary_loss(&self) -> f64 {
        if self.p + self.r == 0.0 {
            return 1.0 - self.k;
        }
        let bad = self.p / (self.p + self.r);
        bad * (1.0 - self.h) + (1.0 - bad) * (1.0 - self.k)
    }
}

/// Size limit of the drop-tail queue in front of the rate limiter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum QueueLimit {
    /// At most this many bytes wait for serialization.
    Bytes(u64),
    /// A multiple of the bandwidth-delay product `rate * 2 * delay`
    /// (the round trip assumes the other direction has the same delay).
    Bdp(f64),
}

/// The impairments applied to one direction of a link.
///
/// The default is a perfect link: no delay, no loss, no rate limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Fixed one-way delay added to every frame.
    pub delay: Duration,
    /// Each frame's delay varies uniformly in `[delay - jitter, delay + jitter]`
    /// (clamped at zero).
    pub jitter: Duration,
    /// Independent (Bernoulli) loss probability per frame, in `[0, 1]`.
    pub loss: f64,
    /// Bursty loss, applied in addition to `loss`.
    pub ge: Option<GilbertElliott>,
    /// Probability that a frame is sent twice, in `[0, 1]`.
    pub dup: f64,
    /// Rate limit in bits per second of Ethernet frame bytes; `None` = unlimited.
    pub rate_bps: Option<u64>,
    /// Drop-tail queue limit; only meaningful with a rate limit.
    pub queue: QueueLimit,
    /// Whether jitter may reorder frames. Off: a frame never leaves before
    /// the frame ahead of it.
    pub reorder: bool,
    /// Seed of the pseudo-random generator; equal seeds give equal decisions
    /// for equal frame sequences.
    pub seed: u64,
}

/// The smallest queue a `bdp` limit resolves to, so that short or fast links
/// still hold a few full-size frames.
pub const MIN_QUEUE_BYTES: u64 = 16 * 1514;

impl Default for Params {
    fn default() -> Self {
        Params {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            ge: None,
            dup: 0.0,
            rate_bps: None,
            queue: QueueLimit::Bdp(1.0),
            reorder: false,
            seed: 1,
        }
    }
}

fn check_prob(name: &str, v: f64) -> Result<(), ParamError> {
    if !(0.0..=1.0).contains(&v) {
        return err(format!("{name} must be in [0, 1], got {v}"));
    }
    Ok(())
}

impl Params {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ParamError> {
        check_prob("loss", self.loss)?;
        check_prob("dup", self.dup)?;
        if let Some(ge) = &self.ge {
            check_prob("ge.p", ge.p)?;
            check_prob("ge.r", ge.r)?;
            check_prob("ge.h", ge.h)?;
            check_prob("ge.k", ge.k)?;
        }
        if self.delay > Duration::from_secs(60) {
            return err(format!("delay must be at most 60s, got {:?}", self.delay));
        }
        if self.jitter > Duration::from_secs(60) {
            return err(format!("jitter must be at most 60s, got {:?}", self.jitter));
        }
        if let Some(r) = self.rate_bps {
            if r < 8_000 {
                return err(format!(
                    "rate must be at least 8kbit (or unlimited), got {r}bit"
                ));
            }
        }
        match self.queue {
            QueueLimit::Bytes(b) if b < 1514 => {
                return err(format!(
                    "queue must hold at least one frame (1514 bytes), got {b}"
                ))
            }
            QueueLimit::Bdp(m) if !(m > 0.0 && m.is_finite()) => {
                return err(format!("queue bdp multiple must be > 0, got {m}"))
            }
            _ => {}
        }
        Ok(())
    }

    /// The queue limit in bytes, or `None` when there is no rate limit
    /// (then nothing ever waits, so nothing can overflow).
    pub fn queue_bytes(&self) -> Option<u64> {
        let rate = self.rate_bps?;
        Some(match self.queue {
            QueueLimit::Bytes(b) => b,
            QueueLimit::Bdp(m) => {
                let rtt = 2.0 * self.delay.as_secs_f64();
                ((rate as f64 / 8.0 * rtt * m) as u64).max(MIN_QUEUE_BYTES)
            }
        })
    }

    /// The long-run fraction of frames lost by `loss` and `ge` together.
    pub fn expected_loss(&self) -> f64 {
        let ge = self.ge.map_or(0.0, |g| g.stationary_loss());
        1.0 - (1.0 - self.loss) * (1.0 - ge)
    }

    /// Parses the compact form (see the module docs), starting from the defaults.
    pub fn parse(s: &str) -> Result<Params, ParamError> {
        let mut p = Params::default();
        p.update(s)?;
        Ok(p)
    }

    /// Applies the keys of a compact string on top of these parameters
    /// (unnamed fields keep their values). On error `self` is unchanged.
    pub fn update(&mut self, s: &str) -> Result<(), ParamError> {
        let mut p = self.clone();
        for (key, value) in pairs(s)? {
            if key.starts_with("ab.") || key.starts_with("ba.") {
                return err(format!(
                    "'{key}': direction prefixes are only allowed for a whole link (parse_duplex)"
                ));
            }
            p.set(key, value)?;
        }
        p.validate()?;
        *self = p;
        Ok(())
    }

    /// Sets one field from its compact `key=value` form, without validating
    /// the whole set.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ParamError> {
        match key {
            "delay" => self.delay = parse_duration(key, value)?,
            "jitter" => self.jitter = parse_duration(key, value)?,
            "loss" => self.loss = parse_fraction(key, value)?,
            "dup" | "duplicate" => self.dup = parse_fraction(key, value)?,
            "rate" => self.rate_bps = parse_rate(value)?,
            "queue" => self.queue = parse_queue(value)?,
            "reorder" => self.reorder = parse_bool(key, value)?,
            "seed" => {
                self.seed = value
                    .parse()
                    .map_err(|_| ParamError(format!("seed must be an integer, got '{value}'")))?
            }
            "ge" => self.ge = parse_ge(value)?,
            _ => {
                return err(format!(
                    "unknown parameter '{key}' (known: delay, jitter, loss, ge, dup, rate, queue, reorder, seed)"
                ))
            }
        }
        Ok(())
    }
}

impl fmt::Display for Params {
    /// The compact form; [`Params::parse`] reads it back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "delay={}us,jitter={}us",
            self.delay.as_micros(),
            self.jitter.as_micros()
        )?;
        write!(f, ",loss={},dup={}", self.loss, self.dup)?;
        match self.rate_bps {
            Some(r) => write!(f, ",rate={r}bit")?,
            None => write!(f, ",rate=unlimited")?,
        }
        match self.queue {
            QueueLimit::Bytes(b) => write!(f, ",queue={b}")?,
            QueueLimit::Bdp(m) => write!(f, ",queue={m}bdp")?,
        }
        if let Some(g) = self.ge {
            write!(f, ",ge=p:{}/r:{}/h:{}/k:{}", g.p, g.r, g.h, g.k)?;
        }
        write!(
            f,
            ",reorder={},seed={}",
            if self.reorder { "on" } else { "off" },
            self.seed
        )
    }
}

/// Parses parameters for both directions of a link (`a -> b`, `b -> a`).
///
/// Unprefixed keys apply to both, `ab.key` / `ba.key` to one direction; later
/// keys win. The `b -> a` direction gets `seed + 1` unless a seed is given for
/// it, so the two directions do not lose the same frames.
pub fn parse_duplex(s: &str) -> Result<(Params, Params), ParamError> {
    let mut ab = Params::default();
    let mut ba = Params::default();
    let mut ba_seed = false;
    for (key, value) in pairs(s)? {
        if let Some(k) = key.strip_prefix("ab.") {
            ab.set(k, value)?;
        } else if let Some(k) = key.strip_prefix("ba.") {
            ba.set(k, value)?;
            ba_seed |= k == "seed";
        } else {
            ab.set(key, value)?;
            ba.set(key, value)?;
        }
    }
    if !ba_seed {
        ba.seed = ab.seed.wrapping_add(1);
    }
    ab.validate()?;
    ba.validate()?;
    Ok((ab, ba))
}

fn pairs(s: &str) -> Result<Vec<(&str, &str)>, ParamError> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        match item.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => out.push((k.trim(), v.trim())),
            _ => return err(format!("expected key=value, got '{item}'")),
        }
    }
    Ok(out)
}

fn split_number(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+' || c == 'e'))
        .unwrap_or(s.len());
    (&s[..end], s[end..].trim())
}

fn number(key: &str, s: &str, whole: &str) -> Result<f64, ParamError> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => err(format!("{key}: cannot read a number from '{whole}'")),
    }
}

/// Reads `40ms`, `1.5ms`, `200us`, `2s`, `500ns`; a unit is required.
pub fn parse_duration(key: &str, s: &str) -> Result<Duration, ParamError> {
    let (n, unit) = split_number(s);
    let v = number(key, n, s)?;
    let scale = match unit.to_ascii_lowercase().as_str() {
        "s" | "sec" => 1e9,
        "ms" => 1e6,
        "us" | "µs" => 1e3,
        "ns" => 1.0,
        "" => return err(format!("{key} needs a unit (ns, us, ms, s), got '{s}'")),
        u => {
            return err(format!(
                "{key}: unknown time unit '{u}' in '{s}' (ns, us, ms, s)"
            ))
        }
    };
    if v < 0.0 {
        return err(format!("{key} must be >= 0, got '{s}'"));
    }
    Ok(Duration::from_nanos((v * scale).round() as u64))
}

/// Reads `1%`, `0.5 %` or a fraction `0.01`.
pub fn parse_fraction(key: &str, s: &str) -> Result<f64, ParamError> {
    let v = match s.strip_suffix('%') {
        Some(p) => number(key, p.trim(), s)? / 100.0,
        None => number(key, s, s)?,
    };
    check_prob(key, v)?;
    Ok(v)
}

/// Reads `100mbit`, `1gbit`, `2.5gbit/s`, `64kbit`, `8000bit`, or
/// `unlimited` / `off` / `0` for no limit.
pub fn parse_rate(s: &str) -> Result<Option<u64>, ParamError> {
    let l = s.to_ascii_lowercase();
    if matches!(l.as_str(), "unlimited" | "off" | "none" | "0") {
        return Ok(None);
    }
    let (n, unit) = split_number(&l);
    let v = number("rate", n, s)?;
    let unit = unit.strip_suffix("/s").unwrap_or(unit);
    let scale = match unit {
        "bit" | "bps" => 1.0,
        "kbit" | "kbps" => 1e3,
        "mbit" | "mbps" => 1e6,
        "gbit" | "gbps" => 1e9,
        "tbit" | "tbps" => 1e12,
        "" => {
            return err(format!(
                "rate needs a unit (bit, kbit, mbit, gbit), got '{s}'"
            ))
        }
        u => {
            return err(format!(
                "rate: unknown unit '{u}' in '{s}' (bit, kbit, mbit, gbit; all in bits per second)"
            ))
        }
    };
    if v <= 0.0 {
        return err(format!("rate must be > 0 (or 'unlimited'), got '{s}'"));
    }
    Ok(Some((v * scale).round() as u64))
}

/// Reads `1bdp`, `0.5bdp`, `64kb`, `100kib`, `1mb`, `30000`.
pub fn parse_queue(s: &str) -> Result<QueueLimit, ParamError> {
    let l = s.to_ascii_lowercase();
    let (n, unit) = split_number(&l);
    let v = number("queue", n, s)?;
    if v <= 0.0 {
        return err(format!("queue must be > 0, got '{s}'"));
    }
    let scale = match unit {
        "bdp" => return Ok(QueueLimit::Bdp(v)),
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1048576.0,
        u => {
            return err(format!(
                "queue: unknown unit '{u}' in '{s}' (b, kb, kib, mb, mib, bdp)"
            ))
        }
    };
    Ok(QueueLimit::Bytes((v * scale).round() as u64))
}

fn parse_bool(key: &str, s: &str) -> Result<bool, ParamError> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => err(format!("{key} must be on or off, got '{s}'")),
    }
}

/// Reads `p:0.01/r:0.3/h:0.5/k:1` (percentages allowed), or `off`.
fn parse_ge(s: &str) -> Result<Option<GilbertElliott>, ParamError> {
    if matches!(s.to_ascii_lowercase().as_str(), "off" | "none") {
        return Ok(None);
    }
    let mut g = GilbertElliott {
        p: f64::NAN,
        r: f64::NAN,
        h: 0.0,
        k: 1.0,
    };
    for part in s.split('/') {
        let (k, v) = part
            .split_once(':')
            .ok_or_else(|| ParamError(format!("ge: expected name:value, got '{part}' in '{s}'")))?;
        let name = format!("ge.{}", k.trim());
        let v = parse_fraction(&name, v.trim())?;
        match k.trim() {
            "p" => g.p = v,
            "r" => g.r = v,
            "h" => g.h = v,
            "k" => g.k = v,
            other => return err(format!("ge: unknown field '{other}' (p, r, h, k)")),
        }
    }
    if g.p.is_nan() || g.r.is_nan() {
        return err(format!("ge needs at least p and r, got '{s}'"));
    }
    Ok(Some(g))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_example() {
        let p = Params::parse(
            "delay=40ms,jitter=2ms,loss=1%,rate=100mbit,queue=1bdp,ge=p:0.01/r:0.3/h:0.5,dup=0.1%,reorder=on",
        )
        .unwrap();
        assert_eq!(p.delay, Duration::from_millis(40));
        assert_eq!(p.jitter, Duration::from_millis(2));
        assert!((p.loss - 0.01).abs() < 1e-12);
        assert_eq!(p.rate_bps, Some(100_000_000));
        assert_eq!(p.queue, QueueLimit::Bdp(1.0));
        let ge = p.ge.unwrap();
        assert_eq!((ge.p, ge.r, ge.h, ge.k), (0.01, 0.3, 0.5, 1.0));
        assert!((p.dup - 0.001).abs() < 1e-12);
        assert!(p.reorder);
        // 100 Mbit/s * 80 ms = 1 MB.
        assert_eq!(p.queue_bytes(), Some(1_000_000));
    }

    #[test]
    fn display_round_trips() {
        let p =
            Params::parse("delay=1.5ms,loss=0.25,rate=1gbit,queue=64kib,ge=p:1%/r:30%").unwrap();
        assert_eq!(Params::parse(&p.to_string()).unwrap(), p);
    }

    #[test]
    fn clear_errors() {
        let e = |s: &str| Params::parse(s).unwrap_err().0;
        assert_eq!(e("loss=1.5"), "loss must be in [0, 1], got 1.5");
        assert_eq!(e("loss=150%"), "loss must be in [0, 1], got 1.5");
        assert_eq!(
            e("delay=40"),
            "delay needs a unit (ns, us, ms, s), got '40'"
        );
        assert!(e("rate=10mb").contains("unknown unit 'mb'"));
        assert!(e("speed=1").starts_with("unknown parameter 'speed'"));
        assert!(e("delay").starts_with("expected key=value"));
        assert!(e("ge=p:0.1").contains("needs at least p and r"));
        assert!(e("reorder=maybe").contains("on or off"));
        assert!(e("ab.delay=1ms").contains("direction prefixes"));
    }

    #[test]
    fn update_keeps_unnamed_fields() {
        let mut p = Params::parse("delay=10ms,loss=1%").unwrap();
        p.update("loss=0").unwrap();
        assert_eq!((p.delay, p.loss), (Duration::from_millis(10), 0.0));
        assert!(p.update("loss=3").is_err());
        assert_eq!(p.loss, 0.0);
    }

    #[test]
    fn duplex_prefixes() {
        let (ab, ba) = parse_duplex("delay=10ms,ab.rate=10mbit,ba.rate=100mbit,seed=7").unwrap();
        assert_eq!(ab.delay, ba.delay);
        assert_eq!(ab.rate_bps, Some(10_000_000));
        assert_eq!(ba.rate_bps, Some(100_000_000));
        assert_eq!((ab.seed, ba.seed), (7, 8));
        assert!(parse_duplex("ba.loss=2").is_err());
    }

    #[test]
    fn ge_stationary_loss() {
        let g = GilbertElliott {
            p: 0.01,
            r: 0.3,
            h: 0.5,
            k: 1.0,
        };
        let want = 0.01 / 0.31 * 0.5;
        assert!((g.stationary_loss() - want).abs() < 1e-12);
    }
}
