//! Options of a stack instance, as a configuration file gives them.
//!
//! The config loader (Python's `dmm.config`, or a Rust caller) hands each
//! `[[stack]]` table's fields to the kind's parser as [`Options`]: untyped
//! [`Value`]s by field name. The parser reads them with the typed getters
//! here, which fail with an [`OptionError`] naming the field, so every kind
//! validates its own options in one place and every error reads the same
//! way (`field: expected ..., got ...`). Fields a kind does not declare
//! are refused before its parser runs ([`super::registry::parse`]), so a
//! typo is an error, not a silent default.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;

/// One option value, as TOML has it.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A list of strings.
    List(Vec<String>),
    /// No value: a default applies (what [`StackConfig::values`] reports for
    /// an optional field left out).
    ///
    /// [`StackConfig::values`]: super::registry::StackConfig::values
    None,
}

impl fmt::Display for Value {
    /// The value as a config file writes it (strings quoted, as in Python's
    /// `repr`, so messages read the same whichever side produced them).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Str(s) => write!(f, "'{s}'"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Bool(b) => f.write_str(if *b { "True" } else { "False" }),
            Value::List(items) => {
                f.write_str("[")?;
                for (i, s) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "'{s}'")?;
                }
                f.write_str("]")
            }
            Value::None => f.write_str("None"),
        }
    }
}

/// A bad option: which field, and what was expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionError {
    /// The field's name (`"mtu"`), without the table it is in.
    pub field: String,
    /// What is wrong, as a sentence fragment (`expected ..., got ...`).
    pub message: String,
}

impl OptionError {
    /// An error for `field`.
    pub fn new(field: &str, message: impl Into<String>) -> OptionError {
        OptionError {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for OptionError {}

/// The fields of one `[[stack]]` table (besides `name` and `kind`), read
/// once each by the kind's parser.
#[derive(Clone, Debug, Default)]
pub struct Options {
    values: BTreeMap<String, Value>,
}

impl Options {
    /// Options from `(field, value)` pairs.
    pub fn new<I, K>(pairs: I) -> Options
    where
        I: IntoIterator<Item = (K, Value)>,
        K: Into<String>,
    {
        Options {
            values: pairs.into_iter().map(|(k, v)| (k.into(), v)).collect(),
        }
    }

    /// Adds or replaces a field (builder style, for Rust callers).
    pub fn with(mut self, field: &str, value: Value) -> Options {
        self.values.insert(field.to_string(), value);
        self
    }

    /// The fields given, in name order.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }

    /// The raw value of `field` (`None` when absent or [`Value::None`]).
    pub fn raw(&self, field: &str) -> Option<&Value> {
        self.values.get(field).filter(|v| **v != Value::None)
    }

    /// A string field, `default` when absent.
    pub fn string(&self, field: &str, default: &str) -> Result<String, OptionError> {
        match self.raw(field) {
            None => Ok(default.to_string()),
            Some(Value::Str(s)) => Ok(s.clone()),
            Some(v) => Err(OptionError::new(
                field,
                format!("expected a string, got {v}"),
            )),
        }
    }

    /// A string field that must be one of `choices` (the first is the
    /// default). The error lists them as `'a' or 'b'` / `one of a, b, c`.
    pub fn choice(
        &self,
        field: &str,
        choices: &[&'static str],
    ) -> Result<&'static str, OptionError> {
        let got = match self.raw(field) {
            None => return Ok(choices[0]),
            Some(v) => v,
        };
        if let Value::Str(s) = got {
            if let Some(c) = choices.iter().find(|c| **c == s.as_str()) {
                return Ok(c);
            }
        }
        let expected = match choices {
            [a, b] => format!("'{a}' or '{b}'"),
            _ => format!("one of {}", choices.join(", ")),
        };
        Err(OptionError::new(
            field,
            format!("expected {expected}, got {got}"),
        ))
    }

    /// An integer field within `range`, `default` when absent; `what`
    /// describes the expectation in the error.
    pub fn int(
        &self,
        field: &str,
        default: i64,
        range: RangeInclusive<i64>,
        what: &str,
    ) -> Result<i64, OptionError> {
        match self.raw(field) {
            None => Ok(default),
            Some(Value::Int(i)) if range.contains(i) => Ok(*i),
            Some(v) => Err(OptionError::new(field, format!("expected {what}, got {v}"))),
        }
    }

    /// A boolean field, `default` when absent.
    pub fn boolean(&self, field: &str, default: bool) -> Result<bool, OptionError> {
        match self.raw(field) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(OptionError::new(
                field,
                format!("expected true or false, got {v}"),
            )),
        }
    }

    /// An IP address field, `default` when absent.
    pub fn ip(&self, field: &str, default: &str, what: &str) -> Result<IpAddr, OptionError> {
        let bad =
            |v: &dyn fmt::Display| OptionError::new(field, format!("expected {what}, got {v}"));
        match self.raw(field) {
            None => default.parse().map_err(|_| bad(&default)),
            Some(Value::Str(s)) => s.parse().map_err(|_| bad(&Value::Str(s.clone()))),
            Some(v) => Err(bad(v)),
        }
    }

    /// A field that is one string or a list of strings (`[]` when absent).
    pub fn strings(&self, field: &str, what: &str) -> Result<Vec<String>, OptionError> {
        match self.raw(field) {
            None => Ok(Vec::new()),
            Some(Value::Str(s)) => Ok(vec![s.clone()]),
            Some(Value::List(items)) => Ok(items.clone()),
            Some(v) => Err(OptionError::new(field, format!("expected {what}, got {v}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_getters_name_the_field_and_the_value() {
        let o = Options::new([
            ("mtu", Value::Int(70000)),
            ("io", Value::Str("fast".into())),
            ("flag", Value::Bool(true)),
        ]);
        let e = o.int("mtu", 1500, 1280..=65521, "an integer").unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("mtu", "expected an integer, got 70000")
        );
        let e = o.choice("io", &["syscall", "uring"]).unwrap_err();
        assert_eq!(e.message, "expected 'syscall' or 'uring', got 'fast'");
        // A bool is not an integer, though Python's bool subclasses int.
        assert!(o.int("flag", 0, 0..=1, "0 or 1").is_err());
        assert_eq!(o.choice("protocol", &["tcp", "mptcp"]), Ok("tcp"));
    }

    #[test]
    fn none_is_absent() {
        let o = Options::new([("mtu", Value::None)]);
        assert_eq!(o.int("mtu", 1500, 0..=9000, "x"), Ok(1500));
        assert_eq!(o.fields().collect::<Vec<_>>(), ["mtu"]);
    }
}
