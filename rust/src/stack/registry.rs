//! The stack kinds this build knows, by the name a config file uses.
//!
//! A kind is one [`Kind`] value: its name, the fields a `[[stack]]` table of
//! that kind may have, and a parser that turns those fields into a
//! [`StackConfig`], which opens instances. Adding a kind is one module under
//! `rust/src/stack/` that defines its `Kind`, and one line in [`KINDS`];
//! the Python facade, the config loader and `dmm stacks` find it here.
//!
//! Parsing and opening are apart so that a config file is checked whole
//! (every field of every stack) before any instance starts a thread or
//! creates a device.

use std::fmt;
use std::io;
use std::sync::Arc;

use super::options::{OptionError, Options, Value};
use super::Stack;

/// A parsed, valid set of options for one kind: what opens instances.
pub trait StackConfig: Send + Sync + fmt::Debug {
    /// The kind's name.
    fn kind(&self) -> &'static str;

    /// Every field of the kind with the value in force (defaults filled in,
    /// [`Value::None`] for an optional field left out), in the units the
    /// config file uses: what `dmm stacks` and the Python `StackSpec` show.
    fn values(&self) -> Vec<(&'static str, Value)>;

    /// Opens an instance named `name` (starts its threads, opens its
    /// devices). Errors are the system's, with what was being done.
    fn open(&self, name: &str) -> io::Result<Arc<dyn Stack>>;
}

/// One stack kind.
pub struct Kind {
    /// The `kind = "..."` name.
    pub name: &'static str,
    /// One line for `dmm stacks --kinds` and the docs.
    pub summary: &'static str,
    /// The fields a table of this kind may have besides `name` and `kind`.
    pub fields: &'static [&'static str],
    /// Reads and checks the fields (only those in `fields` are passed).
    pub parse: fn(&Options) -> Result<Box<dyn StackConfig>, OptionError>,
}

impl fmt::Debug for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kind").field("name", &self.name).finish()
    }
}

/// Every kind of this build, in the order error messages list them.
pub static KINDS: &[&Kind] = &[
    &super::kernel::KIND,
    &super::smol::KIND,
    &super::fillp::KIND,
    &super::memory::KIND,
];

/// The kind named `name`.
pub fn find(name: &str) -> Option<&'static Kind> {
    KINDS.iter().copied().find(|k| k.name == name)
}

/// Parses `options` for the kind named `kind`. A field the kind does not
/// take is an error naming it, and so is an unknown kind (field `kind`).
pub fn parse(kind: &str, options: &Options) -> Result<Box<dyn StackConfig>, OptionError> {
    let Some(k) = find(kind) else {
        let names: Vec<&str> = KINDS.iter().map(|k| k.name).collect();
        return Err(OptionError::new(
            "kind",
            format!("expected one of {}, got '{kind}'", names.join(", ")),
        ));
    };
    if let Some(field) = options.fields().find(|f| !k.fields.contains(f)) {
        return Err(OptionError::new(
            field,
            format!(
                "does not apply to a {} stack (it takes: {})",
                k.name,
                k.fields.join(", ")
            ),
        ));
    }
    (k.parse)(options)
}

/// Parses and opens in one step, for Rust callers (tests, benches).
pub fn open(kind: &str, name: &str, options: &Options) -> io::Result<Arc<dyn Stack>> {
    parse(kind, options)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?
        .open(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_have_unique_names_and_parse_their_defaults() {
        for (i, k) in KINDS.iter().enumerate() {
            assert!(KINDS[..i].iter().all(|o| o.name != k.name), "{}", k.name);
            // smoltcp needs a device and an address; the others have
            // defaults for every field.
            if k.name != "smoltcp" {
                let cfg = parse(k.name, &Options::default()).unwrap();
                assert_eq!(cfg.kind(), k.name);
                let names: Vec<&str> = cfg.values().iter().map(|(n, _)| *n).collect();
                assert_eq!(
                    names, k.fields,
                    "{}: values() must list every field",
                    k.name
                );
            }
        }
    }

    #[test]
    fn unknown_kinds_and_foreign_fields_are_refused() {
        let e = parse("warp", &Options::default()).unwrap_err();
        assert_eq!(e.field, "kind");
        assert!(
            e.message
                .starts_with("expected one of kernel, smoltcp, fillp"),
            "{e}"
        );
        let opts = Options::default().with("mtu", Value::Int(1500));
        let e = parse("kernel", &opts).unwrap_err();
        assert_eq!(e.field, "mtu");
        assert!(
            e.message.contains("does not apply to a kernel stack"),
            "{e}"
        );
    }
}
