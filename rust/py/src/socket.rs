//! `SocketHandle`: what the Python `WebSocket` holds of a core socket. Every method queues and
//! returns; none waits on I/O.

use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use sockworker_core::gate;
use sockworker_core::{CoreError, Limits, SocketShared};

use crate::errors::Result;
use crate::message::with_message;
use crate::object::ObjectState;

#[pyclass(frozen, module = "sockworker._native")]
pub struct SocketHandle {
    pub(crate) socket: Arc<SocketShared>,
}

#[pymethods]
impl SocketHandle {
    #[getter]
    fn id(&self) -> u64 {
        self.socket.id()
    }

    /// (messages in, messages out, bytes in, bytes out, seconds open) with the access log on,
    /// else None.
    fn traffic(&self) -> Option<(u64, u64, u64, u64, f64)> {
        self.socket.traffic().map(sockworker_core::stats::Traffic::snapshot)
    }

    /// Queues a text (str) or binary (bytes-like) message. Returns `SEND_QUEUED` (0, false),
    /// `SEND_DROPPED` when the socket is closing, `SEND_OVERFLOW` when the queue overflowed (the
    /// core closes it with 1008).
    fn send(&self, data: &Bound<'_, PyAny>) -> PyResult<u8> {
        let outcome = with_message(data, |text, bytes| gate::send(&self.socket, text, bytes))?;
        Ok(outcome as u8)
    }

    /// Starts the closing handshake (after what the output gate holds); false if it had
    /// started already.
    fn close(&self, code: u16, reason: &str) -> bool {
        gate::close(&self.socket, code, reason)
    }

    #[getter]
    fn buffered_amount(&self) -> usize {
        self.socket.buffered_amount()
    }

    #[getter]
    fn high_water(&self) -> usize {
        self.socket.high_water()
    }

    fn set_paused(&self, paused: bool) {
        self.socket.set_paused(paused);
    }

    /// The key of the Durable Object that accepted this socket as hibernatable, if any.
    #[getter]
    fn object_key(&self) -> Option<u64> {
        self.socket.meta_if_any()?.object.as_ref().map(|object| object.key())
    }

    /// The core state of the Durable Object that accepted this socket as hibernatable.
    #[getter]
    fn object(&self) -> Option<ObjectState> {
        let object = self.socket.meta_if_any()?.object.clone()?;
        Some(ObjectState::from(object))
    }

    /// Makes the object with key `owner` the socket's owner: its failed commit closes the socket.
    fn set_owner(&self, owner: u64) {
        self.socket.meta().owner = Some(owner);
    }

    #[getter]
    fn tags(&self) -> Vec<String> {
        self.socket.meta_if_any().map(|meta| meta.tags.clone()).unwrap_or_default()
    }

    #[getter]
    fn url(&self) -> String {
        self.socket.meta_if_any().map(|meta| meta.url.clone()).unwrap_or_default()
    }

    /// The `Sec-WebSocket-Extensions` the handshake answered ("" for none).
    #[getter]
    fn extensions(&self) -> String {
        self.socket.deflate().map(|deflate| deflate.response()).unwrap_or_default()
    }

    #[getter]
    fn protocol(&self) -> String {
        self.socket.meta_if_any().map(|meta| meta.protocol.clone()).unwrap_or_default()
    }

    /// Records what the application sees of the handshake, so it survives hibernation.
    fn set_origin(&self, url: String, protocol: String) {
        let mut meta = self.socket.meta();
        meta.url = url;
        meta.protocol = protocol;
    }

    #[getter]
    fn attachment<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        let meta = self.socket.meta_if_any()?;
        meta.attachment.as_ref().map(|bytes| PyBytes::new(py, bytes))
    }

    fn set_attachment(&self, attachment: Option<Vec<u8>>) -> Result<()> {
        Ok(self.socket.set_attachment(attachment.map(bytes::Bytes::from))?)
    }

    /// Seconds since the epoch of the last auto-response the core sent on this socket.
    #[getter]
    fn auto_response_timestamp(&self) -> Option<f64> {
        self.socket.meta_if_any()?.auto_response_at
    }

    /// Asks for a DRAINED event; false when the queue is already low (no event will come).
    fn request_drain(&self) -> bool {
        self.socket.request_drain()
    }
}

/// The limits of the app or of one Durable Object namespace, as the core holds them: made once
/// and shared by every socket accepted under them (the server-wide fields are read from the
/// app's).
#[pyclass(frozen, module = "sockworker._native")]
pub struct SocketLimits {
    pub(crate) inner: Arc<Limits>,
}

/// The core's defaults, by the name of the Python `Limits` field (durations in seconds; 0.0 is
/// off for `idle_timeout`, None for the pings).
pub fn limit_defaults(py: Python<'_>) -> PyResult<Bound<'_, pyo3::types::PyDict>> {
    let defaults = Limits::default();
    let seconds = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    let dict = pyo3::types::PyDict::new(py);
    dict.set_item("max_message_size", defaults.max_message_size)?;
    dict.set_item("max_buffered_bytes", defaults.max_buffered_bytes)?;
    dict.set_item("handshake_timeout", defaults.handshake_timeout.as_secs_f64())?;
    dict.set_item("idle_timeout", seconds(defaults.idle_timeout).unwrap_or(0.0))?;
    dict.set_item("max_connections", defaults.max_connections)?;
    dict.set_item("max_body_size", defaults.max_body_size)?;
    dict.set_item("ping_interval", seconds(defaults.ping_interval))?;
    dict.set_item("ping_timeout", seconds(defaults.ping_timeout))?;
    Ok(dict)
}

fn duration(value: f64, name: &str) -> Result<Option<Duration>, CoreError> {
    if value <= 0.0 {
        return Ok(None);
    }
    Duration::try_from_secs_f64(value)
        .map(Some)
        .map_err(|_| CoreError::InvalidArgument(format!("{name} must be a number of seconds >= 0")))
}

#[pymethods]
impl SocketLimits {
    /// Durations in seconds; 0 turns a timeout off.
    #[new]
    #[pyo3(signature = (*, max_message_size, max_buffered_bytes, idle_timeout, ping_interval, ping_timeout, handshake_timeout, max_connections, max_body_size))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        max_message_size: usize,
        max_buffered_bytes: usize,
        idle_timeout: f64,
        ping_interval: f64,
        ping_timeout: f64,
        handshake_timeout: f64,
        max_connections: usize,
        max_body_size: usize,
    ) -> Result<Self> {
        let build = || -> Result<Limits, CoreError> {
            Ok(Limits {
                max_message_size,
                max_buffered_bytes,
                idle_timeout: duration(idle_timeout, "idle_timeout")?,
                ping_interval: duration(ping_interval, "ping_interval")?,
                ping_timeout: duration(ping_timeout, "ping_timeout")?,
                handshake_timeout: duration(handshake_timeout, "handshake_timeout")?
                    .ok_or_else(|| CoreError::InvalidArgument("handshake_timeout must be > 0".into()))?,
                max_connections,
                max_body_size,
            })
        };
        Ok(Self { inner: Arc::new(build()?) })
    }
}
