//! `Server` and `PendingReply`: start and stop the core, take event batches, answer requests.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::PyList;
use sockworker_core::{CoreError, Limits, Reply, ServerConfig};

use crate::convert::events_to_list;
use crate::errors::to_pyerr;
use crate::socket::SocketHandle;

#[pyclass(frozen, module = "sockworker._native")]
pub struct Server {
    inner: Mutex<Option<sockworker_core::Server>>,
    fd: i32,
    address: SocketAddr,
}

fn seconds(value: f64, name: &str) -> Result<Duration, CoreError> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| CoreError::InvalidArgument(format!("{name} must be a number of seconds >= 0")))
}

#[pymethods]
impl Server {
    #[new]
    #[pyo3(signature = (host, port, *, io_threads, max_message_size, max_buffered_bytes, handshake_timeout, idle_timeout, max_connections, max_body_size))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        host: &str,
        port: u16,
        io_threads: usize,
        max_message_size: usize,
        max_buffered_bytes: usize,
        handshake_timeout: f64,
        idle_timeout: f64,
        max_connections: usize,
        max_body_size: usize,
    ) -> PyResult<Self> {
        let build = || -> Result<sockworker_core::Server, CoreError> {
            let addr = (host, port)
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| CoreError::InvalidArgument(format!("cannot resolve host {host:?}")))?;
            let limits = Limits {
                max_message_size,
                max_buffered_bytes,
                handshake_timeout: seconds(handshake_timeout, "handshake_timeout")?,
                idle_timeout: if idle_timeout > 0.0 {
                    Some(seconds(idle_timeout, "idle_timeout")?)
                } else {
                    None
                },
                max_connections,
                max_body_size,
            };
            sockworker_core::Server::start(ServerConfig { addr, io_threads, limits })
        };
        let server = py.detach(build).map_err(|e| to_pyerr(py, e))?;
        Ok(Self { fd: server.events().fd(), address: server.local_addr(), inner: Mutex::new(Some(server)) })
    }

    /// The bound (host, port); the port is the real one when 0 was asked for.
    #[getter]
    fn address(&self) -> (String, u16) {
        (self.address.ip().to_string(), self.address.port())
    }

    /// The descriptor that becomes readable when events wait (for `loop.add_reader`).
    fn fileno(&self) -> i32 {
        self.fd
    }

    /// Every waiting event, as tuples (see the module `convert`), in arrival order.
    fn drain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let events = match &*self.inner.lock() {
            Some(server) => server.events().drain(),
            None => Vec::new(),
        };
        sockworker_core::socket::begin_batch();
        events_to_list(py, events)
    }

    /// Ends the batch `drain` began: writes what the handlers sent (from this thread when few
    /// sockets were touched, else through their I/O tasks). Call it after every `drain`.
    fn flush(&self) {
        sockworker_core::socket::end_batch();
    }

    /// The open socket with this id (used to wake the object of a hibernated socket).
    fn socket(&self, id: u64) -> Option<SocketHandle> {
        self.inner.lock().as_ref()?.socket(id).map(|socket| SocketHandle { socket })
    }

    #[getter]
    fn open_sockets(&self) -> usize {
        self.inner.lock().as_ref().map_or(0, sockworker_core::Server::open_sockets)
    }

    /// Stops accepting and closes every socket with `code`; an ALL_CLOSED event follows.
    fn shutdown(&self, code: u16, reason: &str) {
        if let Some(server) = &*self.inner.lock() {
            server.shutdown(code, reason);
        }
    }

    /// Stops the I/O threads. Open connections are dropped.
    fn stop(&self, py: Python<'_>) {
        let server = self.inner.lock().take();
        py.detach(move || drop(server));
    }
}

/// A request's way back to its connection. Answer it once.
#[pyclass(frozen, module = "sockworker._native")]
pub struct PendingReply {
    reply: Mutex<Option<Reply>>,
    websocket: bool,
}

impl PendingReply {
    pub fn new(reply: Reply) -> Self {
        Self { websocket: reply.is_websocket(), reply: Mutex::new(Some(reply)) }
    }

    fn take(&self, py: Python<'_>) -> PyResult<Reply> {
        self.reply.lock().take().ok_or_else(|| to_pyerr(py, CoreError::AlreadyAnswered))
    }
}

fn header_list(headers: Vec<(String, Vec<u8>)>) -> Vec<(String, Bytes)> {
    headers.into_iter().map(|(name, value)| (name, Bytes::from(value))).collect()
}

#[pymethods]
impl PendingReply {
    /// The request is a valid WebSocket upgrade (status 101 with a WebSocket may answer it).
    #[getter]
    fn is_websocket(&self) -> bool {
        self.websocket
    }

    fn respond(
        &self,
        py: Python<'_>,
        status: u16,
        headers: Vec<(String, Vec<u8>)>,
        body: Vec<u8>,
    ) -> PyResult<()> {
        self.take(py)?.respond(status, header_list(headers), Bytes::from(body));
        Ok(())
    }

    fn accept_websocket(&self, py: Python<'_>, headers: Vec<(String, Vec<u8>)>) -> PyResult<SocketHandle> {
        match self.take(py)?.accept_websocket(header_list(headers)) {
            Ok(socket) => Ok(SocketHandle { socket }),
            Err((reply, error)) => {
                *self.reply.lock() = Some(reply);
                Err(to_pyerr(py, error))
            }
        }
    }
}
