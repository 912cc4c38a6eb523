//! The FillP stack, seen from Python.

use std::net::IpAddr;
use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::error::to_py;
use super::socket::{counters_dict, socket_on, CoreSocket};
use crate::fillp::wire::MIN_MTU;
use crate::stack::fillp::{parse_rate_mode, FillpOptions, FillpStack, UDP_PAYLOAD_MAX};
use crate::stack::Stack;

/// A FillP (reliable UDP) stack instance with its driver thread.
#[pyclass(name = "FillpStack", module = "dmm._core", frozen)]
pub struct PyFillpStack {
    inner: Arc<FillpStack>,
}

#[pymethods]
impl PyFillpStack {
    /// `rate_control`: "bbr", "fillp" or "fixed"; `bind_address`: the local
    /// IP of the instance's UDP sockets; `fixed_rate`: the "fixed" mode's
    /// rate in bytes/s (`None`: the core's default); `mtu`: the datagram
    /// size (UDP payload bytes) of every connection (`None`: sized from the
    /// route to each peer).
    #[new]
    #[pyo3(signature = (name, rate_control = "bbr", bind_address = "0.0.0.0", fixed_rate = None, mtu = None))]
    fn new(
        name: &str,
        rate_control: &str,
        bind_address: &str,
        fixed_rate: Option<u64>,
        mtu: Option<u32>,
    ) -> PyResult<Self> {
        let mode = parse_rate_mode(rate_control).ok_or_else(|| {
            PyValueError::new_err(format!(
                "rate_control must be 'bbr', 'fillp' or 'fixed', got {rate_control:?}"
            ))
        })?;
        let bind_ip: IpAddr = bind_address.parse().map_err(|_| {
            PyValueError::new_err(format!(
                "bind_address is not an IP address: {bind_address:?}"
            ))
        })?;
        let mut opts = FillpOptions {
            bind_ip,
            ..FillpOptions::default()
        };
        opts.connection.mode = mode;
        if let Some(rate) = fixed_rate {
            if rate == 0 {
                return Err(PyValueError::new_err(
                    "fixed_rate must be positive (bytes/s)",
                ));
            }
            opts.connection.fixed_rate = rate;
        }
        if let Some(mtu) = mtu {
            let range = u32::from(MIN_MTU)..=UDP_PAYLOAD_MAX as u32;
            if !range.contains(&mtu) {
                return Err(PyValueError::new_err(format!(
                    "mtu must be from {} to {} bytes, got {mtu}",
                    range.start(),
                    range.end()
                )));
            }
            opts.connection.mtu = mtu as u16;
            opts.path_mtu = false;
        }
        Ok(PyFillpStack {
            inner: Arc::new(FillpStack::new(name, opts).map_err(to_py)?),
        })
    }

    #[getter]
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    /// A new socket on this instance.
    fn socket(&self, family_: i32, kind: &str) -> PyResult<CoreSocket> {
        socket_on(self.inner.as_ref(), family_, kind)
    }

    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        counters_dict(py, self.inner.counters())
    }
}
