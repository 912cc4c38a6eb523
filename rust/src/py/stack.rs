//! Stack kinds and instances, seen from Python: one class for every kind.
//!
//! `parse_stack(kind, options)` checks a `[[stack]]` table's fields with the
//! kind's own parser (the registry's) and returns a `StackConfig`;
//! `Stack(name, config)` opens an instance from it. Nothing here knows a
//! particular kind.

use std::net::IpAddr;
use std::sync::Arc;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use super::error::to_py;
use super::route::parse_kind;
use super::socket::{counters_dict, family, CoreSocket};
use crate::stack::options::{Options, Value};
use crate::stack::registry::{self, StackConfig};
use crate::stack::{Placement, Stack};

pyo3::create_exception!(
    _core,
    OptionError,
    PyValueError,
    "A stack option is wrong: `field` names it, `message` says why."
);

/// The stack kinds of this build: `[(name, summary, fields), ...]`.
#[pyfunction]
pub fn stack_kinds() -> Vec<(&'static str, &'static str, Vec<&'static str>)> {
    registry::KINDS
        .iter()
        .map(|k| (k.name, k.summary, k.fields.to_vec()))
        .collect()
}

/// A TOML value from Python (bool before int: Python's bool is an int).
fn value(obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    if obj.is_none() {
        Ok(Value::None)
    } else if obj.is_instance_of::<PyBool>() {
        Ok(Value::Bool(obj.extract()?))
    } else if obj.is_instance_of::<PyInt>() {
        // An integer beyond i64 is out of every range a kind accepts.
        Ok(obj
            .extract::<i64>()
            .map_or(Value::Int(i64::MAX), Value::Int))
    } else if obj.is_instance_of::<PyFloat>() {
        Ok(Value::Float(obj.extract()?))
    } else if obj.is_instance_of::<PyString>() {
        Ok(Value::Str(obj.extract()?))
    } else if let Ok(list) = obj.cast::<PyList>() {
        let items: PyResult<Vec<String>> = list.iter().map(|i| i.extract::<String>()).collect();
        // A list of anything but strings reads as its repr, and fails the
        // kind's check with that text.
        Ok(items.map_or_else(
            |_| Value::Str(obj.repr().map_or_else(|_| String::new(), |r| r.to_string())),
            Value::List,
        ))
    } else {
        Ok(Value::Str(obj.str()?.to_string()))
    }
}

fn to_object<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Str(s) => PyString::new(py, s).into_any(),
        Value::Int(i) => i.into_pyobject(py)?.into_any(),
        Value::Float(x) => PyFloat::new(py, *x).into_any(),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::List(items) => PyTuple::new(py, items)?.into_any(),
        Value::None => py.None().into_bound(py),
    })
}

/// The options of one stack, checked by its kind.
#[pyclass(name = "StackConfig", module = "dmm._core", frozen)]
pub struct PyStackConfig {
    inner: Arc<dyn StackConfig>,
}

#[pymethods]
impl PyStackConfig {
    /// The kind's name.
    #[getter]
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    /// Every field with the value in force, as a dict (lists as tuples).
    fn values<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.inner.values() {
            d.set_item(k, to_object(py, &v)?)?;
        }
        Ok(d)
    }
}

/// Checks `options` (a dict of a `[[stack]]` table's fields, without name
/// and kind) for `kind`. Raises `OptionError` naming the field at fault.
#[pyfunction]
pub fn parse_stack(
    py: Python<'_>,
    kind: &str,
    options: &Bound<'_, PyDict>,
) -> PyResult<PyStackConfig> {
    let mut pairs = Vec::with_capacity(options.len());
    for (k, v) in options.iter() {
        pairs.push((k.extract::<String>()?, value(&v)?));
    }
    match registry::parse(kind, &Options::new(pairs)) {
        Ok(cfg) => Ok(PyStackConfig {
            inner: Arc::from(cfg),
        }),
        Err(e) => {
            let err = OptionError::new_err(e.to_string());
            let obj = err.value(py);
            obj.setattr("field", e.field)?;
            obj.setattr("message", e.message)?;
            Err(err)
        }
    }
}

/// One stack instance of any kind.
#[pyclass(name = "Stack", module = "dmm._core", frozen)]
pub struct PyStack {
    inner: Arc<dyn Stack>,
}

#[pymethods]
impl PyStack {
    /// Opens an instance named `name` from a checked `config`.
    #[new]
    fn new(py: Python<'_>, name: &str, config: &PyStackConfig) -> PyResult<Self> {
        let cfg = Arc::clone(&config.inner);
        let name = name.to_owned();
        let inner = py.detach(move || cfg.open(&name)).map_err(to_py)?;
        Ok(PyStack { inner })
    }

    #[getter]
    fn name(&self) -> &str {
        self.inner.name()
    }

    #[getter]
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    /// The protocol its connections speak on the wire ("tcp", "fillp", ...).
    #[getter]
    fn protocol(&self) -> &'static str {
        self.inner.protocol()
    }

    /// `("kernel", stream_protocol, adopt)`: the socket keeps its kernel fd
    /// (reopened with `stream_protocol` if a stream of another protocol;
    /// with `adopt`, data goes through `adopt()`'s core socket); or
    /// `("core", 0, False)`: the socket moves into a core socket.
    #[getter]
    fn placement(&self) -> (&'static str, i32, bool) {
        match self.inner.placement() {
            Placement::KernelFd {
                stream_protocol,
                adopt,
            } => ("kernel", stream_protocol, adopt),
            Placement::Core => ("core", 0, false),
        }
    }

    /// Facts fixed at open (the kernel's `io` after any fallback, a device).
    fn attributes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.inner.attributes() {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// `None` if the instance can carry a socket of `family` and `kind`
    /// ("stream" or "dgram"), else why not.
    fn carries(&self, family_: i32, kind: &str) -> PyResult<Option<String>> {
        Ok(self
            .inner
            .carries(family(family_)?, parse_kind(kind)?)
            .err())
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    /// A new socket on this instance.
    fn socket(&self, family_: i32, kind: &str) -> PyResult<CoreSocket> {
        let sock = self
            .inner
            .socket(family(family_)?, parse_kind(kind)?)
            .map_err(to_py)?;
        Ok(CoreSocket::new(sock, self.inner.name().to_string()))
    }

    /// A core socket over a kernel fd that Python owns (closing it leaves
    /// the fd open); `EOPNOTSUPP` where the placement has no `adopt`.
    fn adopt(&self, fd: i32, family_: i32, kind: &str) -> PyResult<CoreSocket> {
        let sock = self
            .inner
            .adopt(fd, family(family_)?, parse_kind(kind)?)
            .map_err(to_py)?;
        Ok(CoreSocket::new(sock, self.inner.name().to_string()))
    }

    /// Where a core socket binds when the application bound `host`.
    fn bind_address(&self, family_: i32, host: &str) -> PyResult<String> {
        let ip: IpAddr = host
            .split('%')
            .next()
            .unwrap_or_default()
            .parse()
            .map_err(|_| {
                PyTypeError::new_err(format!("a numeric IP address is required, got {host:?}"))
            })?;
        Ok(self.inner.bind_address(family(family_)?, ip).to_string())
    }

    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        counters_dict(py, self.inner.counters())
    }

    /// Brings an instance that went down back up (`EOPNOTSUPP` if it cannot).
    fn restart(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.restart()).map_err(to_py)
    }

    /// Takes the instance down; its sockets then fail with `ENETDOWN`.
    fn stop(&self, py: Python<'_>) {
        py.detach(|| self.inner.stop());
    }
}
