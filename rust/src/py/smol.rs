//! The smoltcp stack, seen from Python.

use std::net::IpAddr;
use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::error::to_py;
use super::socket::{counters_dict, socket_on, CoreSocket};
use crate::stack::smol::{parse_mac, IpCidr, SmolOptions, SmolStack};
use crate::stack::Stack;

/// A smoltcp TCP/IP instance over a TAP device, with its driver thread.
#[pyclass(name = "SmolStack", module = "dmm._core", frozen)]
pub struct PySmolStack {
    inner: Arc<SmolStack>,
}

/// Parses `"10.77.0.2/24"` or `"fd00:77::2/64"`.
fn parse_cidr(s: &str) -> PyResult<IpCidr> {
    let bad = || {
        PyValueError::new_err(format!(
            "address must be an IP address with a prefix length, like \"10.77.0.2/24\" or \"fd00:77::2/64\", got {s:?}"
        ))
    };
    let (ip, len) = s.split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(bad());
    }
    Ok(IpCidr::new(ip.into(), len))
}

#[pymethods]
impl PySmolStack {
    /// `device`: TAP device name (created if absent); `addresses`: list of
    /// "ip/prefix" strings; `gateways`: list of IPs (one per family); `mtu`:
    /// IP MTU of the device; `mac`: "aa:bb:cc:dd:ee:ff" (default: derived
    /// from `name`); `buffer_size`: TCP buffer per direction and connection.
    #[new]
    #[allow(clippy::too_many_arguments)] // the Python signature, one argument each
    #[pyo3(signature = (name, device, addresses, gateways = Vec::new(), mtu = 1500, mac = None, buffer_size = 262144))]
    fn new(
        py: Python<'_>,
        name: &str,
        device: &str,
        addresses: Vec<String>,
        gateways: Vec<String>,
        mtu: u32,
        mac: Option<&str>,
        buffer_size: usize,
    ) -> PyResult<Self> {
        let addresses = addresses
            .iter()
            .map(|a| parse_cidr(a))
            .collect::<PyResult<Vec<_>>>()?;
        let gateways = gateways
            .iter()
            .map(|g| {
                g.parse::<IpAddr>().map_err(|_| {
                    PyValueError::new_err(format!("gateway is not an IP address: {g:?}"))
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        let mac = mac
            .map(|m| {
                parse_mac(m).ok_or_else(|| {
                    PyValueError::new_err(format!(
                        "mac must look like \"02:00:00:00:00:01\", got {m:?}"
                    ))
                })
            })
            .transpose()?;
        let opts = SmolOptions {
            gateways,
            mtu,
            mac,
            rx_buffer: buffer_size,
            tx_buffer: buffer_size,
            ..SmolOptions::new(device, addresses)
        };
        let name = name.to_owned();
        let stack = py
            .detach(move || SmolStack::new(name, opts))
            .map_err(to_py)?;
        Ok(PySmolStack {
            inner: Arc::new(stack),
        })
    }

    #[getter]
    fn name(&self) -> &str {
        self.inner.name()
    }

    /// The TAP device's name.
    #[getter]
    fn device(&self) -> &str {
        self.inner.device()
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

    /// Reopens (re-creates) the device after the instance went down.
    fn restart(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.restart()).map_err(to_py)
    }

    /// Stops the driver thread and closes the device; sockets then fail
    /// with ENETDOWN.
    fn stop(&self, py: Python<'_>) {
        py.detach(|| self.inner.stop());
    }
}
