//! Resource-discovery packets for the Python RD thread (the format is
//! [`crate::fillp::discovery`]'s).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::fillp::discovery::{self, Discovery, NONCE_LEN};

fn nonce_of(nonce: &[u8]) -> PyResult<[u8; NONCE_LEN]> {
    nonce
        .try_into()
        .map_err(|_| PyValueError::new_err(format!("a discovery nonce is {NONCE_LEN} bytes")))
}

/// A DISCOVER datagram carrying `nonce` (16 bytes).
#[pyfunction]
pub fn discovery_query<'py>(py: Python<'py>, nonce: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    let mut out = Vec::with_capacity(discovery::QUERY_LEN);
    discovery::emit_query(&nonce_of(nonce)?, &mut out);
    Ok(PyBytes::new(py, &out))
}

/// The `[(protocol, port), ...]` of an OFFER answering our `nonce`;
/// `ValueError` for anything else (malformed, a query, another nonce).
#[pyfunction]
pub fn parse_offer(data: &[u8], nonce: &[u8]) -> PyResult<Vec<(String, u16)>> {
    let ours = nonce_of(nonce)?;
    match discovery::parse(data) {
        Ok(Discovery::Offer { nonce, entries }) if nonce == ours => {
            Ok(entries.into_iter().map(|e| (e.protocol, e.port)).collect())
        }
        Ok(Discovery::Offer { .. }) => Err(PyValueError::new_err("an offer for another query")),
        Ok(Discovery::Query { .. }) => Err(PyValueError::new_err("a query, not an offer")),
        Err(e) => Err(PyValueError::new_err(format!("not an offer: {e}"))),
    }
}
