//! dmm core.
pub mod linkem;
pub mod route;

#[cfg(feature = "python")]
mod py_linkem;

/// The compiled module `dmm._core` (glue only; the lead merges it with the
/// rest of the bindings).
#[cfg(feature = "python")]
#[pyo3::pymodule]
fn _core(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
    py_linkem::register(m)
}
