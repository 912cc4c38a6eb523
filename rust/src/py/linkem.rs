//! Python binding of the link emulator: `dmm._core.Linkem`. Only glue: the
//! parameters travel as the compact string form, stats as dicts.

use crate::linkem::{parse_duplex, DirStats, Direction, Linkem, LinkemConfig, ParamError, Params};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::io;
use std::time::Duration;

/// I/O errors go through the crate's one mapping (`OSError(errno, msg)`,
/// `ValueError` for invalid input).
fn io_err(e: io::Error) -> PyErr {
    super::error::to_py(e)
}

fn param_err(e: ParamError) -> PyErr {
    PyValueError::new_err(e.0)
}

fn directions(direction: &str) -> PyResult<&'static [Direction]> {
    match direction {
        "ab" => Ok(&[Direction::AtoB]),
        "ba" => Ok(&[Direction::BtoA]),
        "both" => Ok(&[Direction::AtoB, Direction::BtoA]),
        _ => Err(PyValueError::new_err(format!(
            "direction must be 'ab', 'ba' or 'both', got '{direction}'"
        ))),
    }
}

fn dir_stats<'py>(py: Python<'py>, s: &DirStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("frames_in", s.frames_in)?;
    d.set_item("bytes_in", s.bytes_in)?;
    d.set_item("frames_out", s.frames_out)?;
    d.set_item("bytes_out", s.bytes_out)?;
    d.set_item("dropped_loss", s.dropped_loss)?;
    d.set_item("dropped_queue", s.dropped_queue)?;
    d.set_item("dropped_overflow", s.dropped_overflow)?;
    d.set_item("duplicated", s.duplicated)?;
    d.set_item("rx_errors", s.rx_errors)?;
    d.set_item("tx_errors", s.tx_errors)?;
    d.set_item("late_p50_us", s.late_p50_us)?;
    d.set_item("late_p99_us", s.late_p99_us)?;
    d.set_item("late_max_us", s.late_max_us)?;
    d.set_item("late_mean_us", s.late_mean_us)?;
    Ok(d)
}

/// A running link emulator between two TAP devices (see `Linkem.start`).
#[pyclass(name = "Linkem", module = "dmm._core")]
pub struct PyLinkem {
    inner: Option<Linkem>,
}

impl PyLinkem {
    fn link(&self) -> PyResult<&Linkem> {
        self.inner
            .as_ref()
            .ok_or_else(|| PyRuntimeError::new_err("Linkem is stopped"))
    }
}

#[pymethods]
impl PyLinkem {
    /// Creates TAP devices `dev_a` and `dev_b`, moves them into `netns_a` /
    /// `netns_b` (names from `ip netns`; None = stay here), brings them up
    /// and starts relaying. `params` is the compact form for both directions
    /// (`ab.`/`ba.` prefixes for one), e.g. "delay=40ms,loss=1%,rate=100mbit".
    /// `spin_us`: busy-poll this long before each release; `realtime`:
    /// SCHED_FIFO priority of the relay threads (0 = normal scheduling);
    /// `device`: "tap" (two TAP devices) or "veth" (veth pairs whose other
    /// ends, named `<dev>r`, stay here and are read with AF_PACKET).
    #[staticmethod]
    #[pyo3(signature = (dev_a, dev_b, *, netns_a=None, netns_b=None, params="", mtu=1500, txqueuelen=1000, spin_us=80, realtime=0, device="tap"))]
    #[allow(clippy::too_many_arguments)]
    fn start(
        py: Python<'_>,
        dev_a: &str,
        dev_b: &str,
        netns_a: Option<String>,
        netns_b: Option<String>,
        params: &str,
        mtu: u32,
        txqueuelen: u32,
        spin_us: u64,
        realtime: u8,
        device: &str,
    ) -> PyResult<PyLinkem> {
        let (ab, ba) = parse_duplex(params).map_err(param_err)?;
        let mut cfg = LinkemConfig::new(dev_a, dev_b);
        cfg.netns_a = netns_a;
        cfg.netns_b = netns_b;
        cfg.params_ab = ab;
        cfg.params_ba = ba;
        cfg.mtu = mtu;
        cfg.txqueuelen = txqueuelen;
        cfg.spin = Duration::from_micros(spin_us);
        cfg.realtime_priority = realtime;
        cfg.device = device.parse().map_err(PyValueError::new_err)?;
        let link = py.detach(|| Linkem::start(cfg)).map_err(io_err)?;
        Ok(PyLinkem { inner: Some(link) })
    }

    /// Parses and validates a parameter string without starting anything;
    /// returns the normalized (a->b, b->a) forms. Raises ValueError.
    #[staticmethod]
    fn parse_params(params: &str) -> PyResult<(String, String)> {
        let (ab, ba) = parse_duplex(params).map_err(param_err)?;
        Ok((ab.to_string(), ba.to_string()))
    }

    /// Changes the parameters of `direction` ('ab', 'ba' or 'both') while
    /// running. By default the keys in `params` (compact form) are applied
    /// on top of the current values; with `replace=True` unnamed fields go
    /// back to their defaults. Raises ValueError and then changes nothing.
    #[pyo3(signature = (direction, params, *, replace=false))]
    fn set_params(&self, direction: &str, params: &str, replace: bool) -> PyResult<()> {
        let link = self.link()?;
        let mut new = Vec::new();
        for &d in directions(direction)? {
            let mut p = if replace {
                Params::default()
            } else {
                link.params(d)
            };
            p.update(params).map_err(param_err)?;
            new.push((d, p));
        }
        for (d, p) in new {
            link.set_params(d, p).map_err(param_err)?;
        }
        Ok(())
    }

    /// The parameters of one direction ('ab' or 'ba'), in the compact form.
    fn params(&self, direction: &str) -> PyResult<String> {
        let link = self.link()?;
        match directions(direction)? {
            [d] => Ok(link.params(*d).to_string()),
            _ => Err(PyValueError::new_err("params() takes 'ab' or 'ba'")),
        }
    }

    /// Counters per direction: {"ab": {...}, "ba": {...}}.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.link()?.stats();
        let d = PyDict::new(py);
        d.set_item("ab", dir_stats(py, &s.ab)?)?;
        d.set_item("ba", dir_stats(py, &s.ba)?)?;
        Ok(d)
    }

    /// Sets all counters and the lateness histograms to zero.
    fn reset_stats(&self) -> PyResult<()> {
        self.link()?.reset_stats();
        Ok(())
    }

    /// The two device names (dev_a, dev_b).
    fn devices(&self) -> PyResult<(String, String)> {
        let (a, b) = self.link()?.devices();
        Ok((a.to_string(), b.to_string()))
    }

    /// Whether the relay is running.
    #[getter]
    fn running(&self) -> bool {
        self.inner.as_ref().is_some_and(|l| l.is_running())
    }

    /// Stops relaying and removes both devices. Idempotent.
    fn stop(&mut self, py: Python<'_>) {
        if let Some(mut link) = self.inner.take() {
            py.detach(move || link.stop());
        }
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&mut self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) {
        self.stop(py);
    }

    fn __repr__(&self) -> String {
        match &self.inner {
            Some(l) => format!("<Linkem {} <-> {}>", l.devices().0, l.devices().1),
            None => "<Linkem stopped>".to_string(),
        }
    }
}

/// Registers the emulator's classes in a module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyLinkem>()
}
