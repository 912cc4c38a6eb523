//! The `fillp` kind: its config fields, read into [`FillpOptions`].

use std::io;
use std::net::IpAddr;
use std::sync::Arc;

use super::{parse_rate_mode, FillpOptions, FillpStack, UDP_PAYLOAD_MAX};
use crate::fillp::RateMode;
use crate::stack::options::{OptionError, Options, Value};
use crate::stack::registry::{Kind, StackConfig};
use crate::stack::Stack;

/// The `fillp` kind: `rate_control`, `address`, `fixed_rate`,
/// `datagram_size`, `max_connections`, `client_port`, `resumption`.
pub static KIND: Kind = Kind {
    name: "fillp",
    summary: "FillP-style reliable byte streams over UDP, one driver thread",
    fields: &[
        "rate_control",
        "address",
        "fixed_rate",
        "datagram_size",
        "max_connections",
        "client_port",
        "resumption",
    ],
    parse: parse_config,
};

/// Bounds of `fixed_rate`, bits/s: above the core's floor of 4 packets per
/// 100 ms, below what one connection could be paced at.
const MIN_RATE: u64 = 500_000;
const MAX_RATE: u64 = 100_000_000_000;

/// Smallest `datagram_size` a config may give.
const MIN_DATAGRAM: i64 = 512;

#[derive(Debug)]
struct FillpConfig {
    opts: FillpOptions,
    rate_control: &'static str,
    /// `fixed_rate` in bits/s as configured (`None`: the core's default).
    fixed_rate: Option<u64>,
}

fn parse_config(o: &Options) -> Result<Box<dyn StackConfig>, OptionError> {
    let rate_control = o.choice("rate_control", &["bbr", "fillp", "fixed"])?;
    let bind_ip: IpAddr = o.ip("address", "0.0.0.0", "an IP address to bind to")?;
    let fixed_rate = match o.raw("fixed_rate") {
        None => None,
        Some(v) if rate_control != "fixed" => {
            let _ = v;
            return Err(OptionError::new(
                "fixed_rate",
                format!(
                    "applies only with rate_control = \"fixed\" (this stack has '{rate_control}')"
                ),
            ));
        }
        Some(v) => Some(parse_rate(v)?),
    };
    let datagram_size = match o.raw("datagram_size") {
        None => None,
        Some(Value::Str(s)) if s == "auto" => None,
        Some(Value::Int(n)) if (MIN_DATAGRAM..=UDP_PAYLOAD_MAX as i64).contains(n) => {
            Some(*n as u16)
        }
        Some(v) => {
            return Err(OptionError::new(
                "datagram_size",
                format!("expected \"auto\" or bytes of UDP payload from 512 to 65507, got {v}"),
            ))
        }
    };
    let max_connections = o.int(
        "max_connections",
        4096,
        1..=1_000_000,
        "a number of connections from 1 to 1000000",
    )? as usize;
    let client_port = o.choice("client_port", &["per-connection", "shared"])?;
    let resumption = o.boolean("resumption", true)?;
    let mut opts = FillpOptions {
        bind_ip,
        max_connections,
        shared_client_port: client_port == "shared",
        resumption,
        ..FillpOptions::default()
    };
    opts.connection.mode = parse_rate_mode(rate_control).unwrap_or(RateMode::Bbr);
    if let Some(bits) = fixed_rate {
        // The configuration counts bits/s; the core, bytes/s.
        opts.connection.fixed_rate = bits / 8;
    }
    if let Some(size) = datagram_size {
        opts.connection.mtu = size;
        opts.path_mtu = false;
    }
    Ok(Box::new(FillpConfig {
        opts,
        rate_control,
        fixed_rate,
    }))
}

/// A rate in bits/s from `"100mbit"`, `"2.5gbit"`, `"800kbit"` or an integer.
fn parse_rate(v: &Value) -> Result<u64, OptionError> {
    let bad = |v: &Value| {
        OptionError::new(
            "fixed_rate",
            format!("expected a rate such as \"100mbit\", \"2.5gbit\" or \"800kbit\", or an integer of bits/s, got {v}"),
        )
    };
    let bits = match v {
        Value::Int(n) if *n >= 0 => *n as u64,
        Value::Str(s) => {
            let t = s.trim().to_ascii_lowercase();
            let (num, unit) = ["kbit", "mbit", "gbit"]
                .iter()
                .zip([1e3, 1e6, 1e9])
                .find_map(|(u, m)| t.strip_suffix(u).map(|n| (n.trim_end(), m)))
                .ok_or_else(|| bad(v))?;
            let plain = !num.is_empty()
                && num.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                && num.bytes().filter(|b| *b == b'.').count() <= 1
                && !num.starts_with('.')
                && !num.ends_with('.');
            let x: f64 = num.parse().ok().filter(|_| plain).ok_or_else(|| bad(v))?;
            (x * unit).round() as u64
        }
        _ => return Err(bad(v)),
    };
    if !(MIN_RATE..=MAX_RATE).contains(&bits) {
        return Err(OptionError::new(
            "fixed_rate",
            format!("expected from 500 kbit/s to 100 gbit/s, got {v}"),
        ));
    }
    Ok(bits)
}

impl StackConfig for FillpConfig {
    fn kind(&self) -> &'static str {
        KIND.name
    }

    fn values(&self) -> Vec<(&'static str, Value)> {
        let size = if self.opts.path_mtu {
            Value::None
        } else {
            Value::Int(i64::from(self.opts.connection.mtu))
        };
        vec![
            ("rate_control", Value::Str(self.rate_control.into())),
            ("address", Value::Str(self.opts.bind_ip.to_string())),
            (
                "fixed_rate",
                self.fixed_rate
                    .map_or(Value::None, |b| Value::Int(b as i64)),
            ),
            ("datagram_size", size),
            (
                "max_connections",
                Value::Int(self.opts.max_connections as i64),
            ),
            (
                "client_port",
                Value::Str(
                    if self.opts.shared_client_port {
                        "shared"
                    } else {
                        "per-connection"
                    }
                    .into(),
                ),
            ),
            ("resumption", Value::Bool(self.opts.resumption)),
        ]
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn Stack>> {
        Ok(Arc::new(FillpStack::new(name, self.opts.clone())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, Value)]) -> Result<Box<dyn StackConfig>, OptionError> {
        parse_config(&Options::new(pairs.iter().cloned()))
    }

    fn fixed(rate: Value) -> Result<Box<dyn StackConfig>, OptionError> {
        parse(&[
            ("rate_control", Value::Str("fixed".into())),
            ("fixed_rate", rate),
        ])
    }

    #[test]
    fn rates_in_bits_per_second() {
        for (text, bits) in [
            ("100mbit", 100_000_000),
            ("2.5gbit", 2_500_000_000),
            ("800kbit", 800_000),
            ("10 MBIT", 10_000_000),
        ] {
            let cfg = fixed(Value::Str(text.into())).unwrap();
            assert_eq!(cfg.values()[2], ("fixed_rate", Value::Int(bits)), "{text}");
        }
        assert_eq!(
            fixed(Value::Int(40_000_000)).unwrap().values()[2].1,
            Value::Int(40_000_000)
        );
    }

    #[test]
    fn bad_rates_say_what_is_expected() {
        for (v, words) in [
            (Value::Str("100mb".into()), "\"100mbit\""),
            (Value::Str("-3mbit".into()), "expected a rate"),
            (Value::Int(100), "500 kbit/s"),
            (Value::Str("200gbit".into()), "100 gbit/s"),
            (Value::Bool(true), "expected a rate"),
        ] {
            let e = fixed(v.clone()).unwrap_err();
            assert!(
                e.field == "fixed_rate" && e.message.contains(words),
                "{v:?}: {e}"
            );
        }
        let e = parse(&[("fixed_rate", Value::Str("100mbit".into()))]).unwrap_err();
        assert!(
            e.message
                .contains("applies only with rate_control = \"fixed\""),
            "{e}"
        );
    }

    #[test]
    fn datagram_size_auto_or_bytes() {
        let cfg = parse(&[("datagram_size", Value::Int(9000))]).unwrap();
        assert_eq!(cfg.values()[3].1, Value::Int(9000));
        let cfg = parse(&[("datagram_size", Value::Str("auto".into()))]).unwrap();
        assert_eq!(cfg.values()[3].1, Value::None);
        assert!(parse(&[("datagram_size", Value::Int(100))]).is_err());
        assert!(parse(&[("address", Value::Str("nowhere".into()))]).is_err());
    }

    #[test]
    fn client_port_shared_or_per_connection() {
        let cfg = parse(&[]).unwrap();
        assert_eq!(cfg.values()[5].1, Value::Str("per-connection".into()));
        let cfg = parse(&[("client_port", Value::Str("shared".into()))]).unwrap();
        assert_eq!(cfg.values()[5].1, Value::Str("shared".into()));
        let e = parse(&[("client_port", Value::Str("each".into()))]).unwrap_err();
        assert_eq!(e.field, "client_port");
    }

    #[test]
    fn resumption_on_unless_turned_off() {
        assert_eq!(parse(&[]).unwrap().values()[6].1, Value::Bool(true));
        let cfg = parse(&[("resumption", Value::Bool(false))]).unwrap();
        assert_eq!(cfg.values()[6], ("resumption", Value::Bool(false)));
        let e = parse(&[("resumption", Value::Str("yes".into()))]).unwrap_err();
        assert_eq!(e.field, "resumption");
    }
}
