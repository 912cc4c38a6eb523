//! The `smoltcp` kind: its config fields, read into [`SmolOptions`].

use std::io;
use std::net::IpAddr;
use std::sync::Arc;

use super::{parse_mac, IpCidr, SmolOptions, SmolStack, MAX_BUFFER};
use crate::stack::options::{OptionError, Options, Value};
use crate::stack::registry::{Kind, StackConfig};
use crate::stack::Stack;
use crate::sys::context::{errno, hint};

/// The `smoltcp` kind: `device`, `address`, and optionally `gateway`,
/// `mtu`, `mac`, `buffer_size`, `offload`.
pub static KIND: Kind = Kind {
    name: "smoltcp",
    summary: "user-space TCP/IP (smoltcp) over a TAP device (or \"loopback\": its own addresses only), one driver thread",
    fields: &["device", "address", "gateway", "mtu", "mac", "buffer_size", "offload"],
    parse: parse_config,
};

/// Smallest `buffer_size` a config may give (smaller buffers work, but
/// starve TCP).
const CONFIG_MIN_BUFFER: i64 = 4096;

#[derive(Debug)]
struct SmolConfig {
    opts: SmolOptions,
    /// The fields as written (addresses with their prefixes).
    addresses: Vec<String>,
    gateways: Vec<String>,
    mac: String,
}

fn parse_config(o: &Options) -> Result<Box<dyn StackConfig>, OptionError> {
    let device = match o.raw("device") {
        Some(Value::Str(s)) => Some(s.strip_prefix("tap:").unwrap_or(s).to_string()),
        _ => None,
    }
    .filter(|d| {
        (1..=15).contains(&d.len())
            && d.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    });
    let Some(device) = device else {
        let got = o.raw("device").cloned().unwrap_or(Value::None);
        return Err(OptionError::new(
            "device",
            format!(
                "expected a TAP device name such as \"tap:dmm0\" (at most 15 characters) or \"loopback\", got {got}"
            ),
        ));
    };
    let cidr_example = "an address with prefix length such as \"10.77.0.2/24\"";
    let addresses = o.strings("address", &format!("{cidr_example}, or a list of them"))?;
    if addresses.is_empty() {
        return Err(OptionError::new(
            "address",
            format!("expected {cidr_example}, or a list of them, got None"),
        ));
    }
    let cidrs = addresses
        .iter()
        .map(|a| {
            parse_cidr(a).ok_or_else(|| {
                OptionError::new("address", format!("expected {cidr_example}, got '{a}'"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let gateways = o.strings("gateway", "a gateway address, or one per family")?;
    let gw_error = || {
        OptionError::new(
            "gateway",
            format!(
                "expected at most one gateway address per family the instance has an address in, got {}",
                Value::List(gateways.clone())
            ),
        )
    };
    let gws = gateways
        .iter()
        .map(|g| g.parse::<IpAddr>().map_err(|_| gw_error()))
        .collect::<Result<Vec<_>, _>>()?;
    let mtu = o.int(
        "mtu",
        1500,
        1280..=65521,
        "an integer from 1280 (IPv6 needs it) to 65521 (the TAP maximum)",
    )?;
    let mac = o.string("mac", "")?;
    let mac_bytes = if mac.is_empty() {
        None
    } else {
        Some(parse_mac(&mac).ok_or_else(|| {
            OptionError::new(
                "mac",
                format!("expected a MAC address like \"02:00:00:00:00:01\", got '{mac}'"),
            )
        })?)
    };
    let buffer = o.int(
        "buffer_size",
        super::DEFAULT_BUFFER as i64,
        CONFIG_MIN_BUFFER..=MAX_BUFFER as i64,
        "bytes from 4096 to 1 GiB",
    )? as usize;
    let offload = o.boolean("offload", true)?;
    let opts = SmolOptions {
        gateways: gws,
        offload,
        mtu: mtu as u32,
        mac: mac_bytes,
        rx_buffer: buffer,
        tx_buffer: buffer,
        ..SmolOptions::new(device, cidrs)
    };
    // What the types cannot say (unicast, one gateway per family, ...).
    opts.check()
        .map_err(|e| if e.field == "gateway" { gw_error() } else { e })?;
    Ok(Box::new(SmolConfig {
        opts,
        addresses,
        gateways,
        mac,
    }))
}

/// Parses `"10.77.0.2/24"` or `"fd00:77::2/64"`.
fn parse_cidr(s: &str) -> Option<IpCidr> {
    let (ip, len) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then(|| IpCidr::new(ip.into(), len))
}

impl StackConfig for SmolConfig {
    fn kind(&self) -> &'static str {
        KIND.name
    }

    fn values(&self) -> Vec<(&'static str, Value)> {
        vec![
            ("device", Value::Str(self.opts.device.clone())),
            ("address", Value::List(self.addresses.clone())),
            ("gateway", Value::List(self.gateways.clone())),
            ("mtu", Value::Int(i64::from(self.opts.mtu))),
            ("mac", Value::Str(self.mac.clone())),
            ("buffer_size", Value::Int(self.opts.rx_buffer as i64)),
            ("offload", Value::Bool(self.opts.offload)),
        ]
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn Stack>> {
        let stack = SmolStack::new(name, self.opts.clone()).map_err(|e| {
            if matches!(errno(&e), Some(libc::EPERM | libc::EACCES)) {
                // Say what is missing, not only that something was refused.
                hint(
                    e,
                    "creating or attaching a TAP device needs CAP_NET_ADMIN, usually root",
                )
            } else {
                e
            }
        })?;
        Ok(Arc::new(stack))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, Value)]) -> Result<Box<dyn StackConfig>, OptionError> {
        parse_config(&Options::new(pairs.iter().cloned()))
    }

    fn s(v: &str) -> Value {
        Value::Str(v.into())
    }

    #[test]
    fn fields_parse_to_options() {
        let cfg = parse(&[
            ("device", s("tap:dmm9")),
            (
                "address",
                Value::List(vec!["10.7.0.2/24".into(), "fd00::2/64".into()]),
            ),
            ("gateway", s("10.7.0.1")),
            ("mtu", Value::Int(9000)),
        ])
        .unwrap();
        let v = cfg.values();
        assert_eq!(v[0], ("device", s("dmm9")));
        assert_eq!(v[2], ("gateway", Value::List(vec!["10.7.0.1".into()])));
        assert_eq!(v[3], ("mtu", Value::Int(9000)));
        assert_eq!(v[6], ("offload", Value::Bool(true)));
        let off = parse(&[
            ("device", s("dmm9")),
            ("address", s("10.7.0.2/24")),
            ("offload", Value::Bool(false)),
        ])
        .unwrap();
        assert_eq!(off.values()[6], ("offload", Value::Bool(false)));
    }

    #[test]
    fn bad_fields_are_named() {
        let dev = ("device", s("d0"));
        type Case<'a> = (Vec<(&'a str, Value)>, &'a str, &'a str);
        let cases: Vec<Case> = vec![
            (
                vec![("address", s("10.7.0.2/24"))],
                "device",
                "TAP device name",
            ),
            (
                vec![
                    ("device", s("this-name-is-too-long")),
                    ("address", s("10.7.0.2/24")),
                ],
                "device",
                "at most 15",
            ),
            (vec![dev.clone()], "address", "prefix length"),
            (
                vec![dev.clone(), ("address", s("10.7.0.2"))],
                "address",
                "prefix length",
            ),
            (
                vec![
                    dev.clone(),
                    ("address", s("10.7.0.2/24")),
                    ("gateway", s("fd00::1")),
                ],
                "gateway",
                "per family",
            ),
            (
                vec![
                    dev.clone(),
                    ("address", s("10.7.0.2/24")),
                    ("mtu", Value::Int(70000)),
                ],
                "mtu",
                "1280",
            ),
            (
                vec![dev.clone(), ("address", s("10.7.0.2/24")), ("mac", s("zz"))],
                "mac",
                "MAC",
            ),
            (
                vec![
                    dev.clone(),
                    ("address", s("10.7.0.2/24")),
                    ("offload", s("yes")),
                ],
                "offload",
                "true or false",
            ),
            (
                vec![dev.clone(), ("address", s("224.0.0.1/4"))],
                "address",
                "unicast",
            ),
        ];
        for (pairs, field, words) in cases {
            let e = parse(&pairs).unwrap_err();
            assert_eq!(e.field, field, "{pairs:?}: {e}");
            assert!(e.message.contains(words), "{pairs:?}: {e}");
        }
    }
}
