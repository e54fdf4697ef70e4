//! `Reactor`: the core's reactor as the selector of the application thread's asyncio loop
//! (single-thread mode). `sockworker._loop` wraps it in a `selectors.BaseSelector`.

use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;

use crate::errors::Result;

// The reactor's own errors are the operating system's (`PermissionError` for a regular file, as
// `EpollSelector` raises): pyo3 maps an `io::Error` to the matching `OSError` subclass.
#[pyclass(frozen, module = "sockworker._native")]
pub struct Reactor {
    pub(crate) inner: Arc<sockworker_core::reactor::Reactor>,
}

#[pymethods]
impl Reactor {
    #[new]
    fn new() -> Result<Self> {
        let inner = sockworker_core::reactor::Reactor::new()?;
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Watches `fd` for `events` (`selectors.EVENT_READ | EVENT_WRITE`; 0 stops watching it).
    fn watch(&self, py: Python<'_>, fd: i32, events: u8) -> PyResult<()> {
        let _ = py;
        self.inner.watch(fd, events).map_err(PyErr::from)
    }

    /// Runs the server's sockets and timers, without the GIL, until a watched descriptor or the
    /// event queue is ready or `timeout` seconds pass (None: no limit); returns the ready
    /// descriptors as (fd, events); `events` has 4 added for an event queue's descriptor.
    #[pyo3(signature = (timeout=None))]
    fn select(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Vec<(i32, u8)>> {
        // As selectors: a negative timeout is no wait; a huge one is no limit.
        let timeout = timeout.and_then(|seconds| Duration::try_from_secs_f64(seconds.max(0.0)).ok());
        let inner = &self.inner;
        py.detach(|| inner.select(timeout)).map_err(PyErr::from)
    }

    /// Drops every task and forgets every descriptor.
    fn close(&self, py: Python<'_>) {
        let inner = &self.inner;
        py.detach(|| inner.close());
    }
}
