//! Messages between Python and the core: `str` is a text message, `bytes` (or bytes-like) a
//! binary one. The bottom of the bindings: it names nothing else of them.

use bytes::Bytes;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use sockworker_core::Payload;

/// Calls `f` with a message from Python (`str`: text, else bytes-like: binary) as (text, bytes),
/// without copying `str` or `bytes`: the one copy is the frame the core encodes from them.
pub fn with_message<R>(data: &Bound<'_, PyAny>, f: impl FnOnce(bool, &[u8]) -> R) -> PyResult<R> {
    if let Ok(text) = data.cast::<PyString>() {
        return Ok(f(true, text.to_str()?.as_bytes()));
    }
    if let Ok(bytes) = data.cast::<PyBytes>() {
        return Ok(f(false, bytes.as_bytes()));
    }
    let bytes: Vec<u8> = data.extract().map_err(|_| {
        pyo3::exceptions::PyTypeError::new_err(format!(
            "a WebSocket message is str or bytes, not {}",
            data.get_type().name().map_or_else(|_| "?".into(), |n| n.to_string())
        ))
    })?;
    Ok(f(false, &bytes))
}

/// A message from Python as the core keeps it (copied: for what outlives the call).
pub fn to_payload(data: &Bound<'_, PyAny>) -> PyResult<Payload> {
    with_message(data, |text, bytes| {
        let bytes = Bytes::copy_from_slice(bytes);
        if text {
            Payload::Text(bytes)
        } else {
            Payload::Binary(bytes)
        }
    })
}

/// A message as Python sees it: `str` for text, `bytes` for binary.
pub fn to_python<'py>(py: Python<'py>, data: &Payload) -> Bound<'py, PyAny> {
    match data {
        // SAFETY: a text payload is UTF-8 by construction: the core's decoder validated what it
        // received, and `to_payload` made the others from a `str`.
        Payload::Text(bytes) => PyString::new(py, unsafe { std::str::from_utf8_unchecked(bytes) }).into_any(),
        Payload::Binary(bytes) => PyBytes::new(py, bytes).into_any(),
    }
}
