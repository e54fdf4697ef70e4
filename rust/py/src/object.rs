//! `ObjectState`: a Durable Object's core-side state (hibernatable sockets, auto-responses).

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyAny;
use sockworker_core::gate;
use sockworker_core::ObjectShared;

use crate::errors::Result;
use crate::message::{to_payload, to_python, with_message};
use crate::socket::SocketHandle;

/// What the core keeps of one Durable Object: its hibernatable sockets, its auto-responses and
/// event timeout. Made by `Server.object_state`; the same for an id while any of it is alive.
#[pyclass(frozen, module = "sockworker._native")]
pub struct ObjectState {
    object: Arc<ObjectShared>,
}

impl From<Arc<ObjectShared>> for ObjectState {
    fn from(object: Arc<ObjectShared>) -> Self {
        Self { object }
    }
}

fn handles(sockets: Vec<Arc<sockworker_core::SocketShared>>) -> Vec<SocketHandle> {
    sockets.into_iter().map(|socket| SocketHandle { socket }).collect()
}

#[pymethods]
impl ObjectState {
    #[getter]
    fn key(&self) -> u64 {
        self.object.key()
    }

    /// (namespace, object id).
    #[getter]
    fn name(&self) -> Option<(String, String)> {
        self.object.name().map(|name| (name.namespace.to_string(), name.object_id.to_string()))
    }

    /// The name the id was made from, if known.
    #[getter]
    fn id_name(&self) -> Option<&str> {
        self.object.id_name()
    }

    #[setter]
    fn set_id_name(&self, name: &str) {
        self.object.set_id_name(name);
    }

    /// The application has a host for the object (else it is hibernated): for the metrics.
    #[getter]
    fn resident(&self) -> bool {
        self.object.is_resident()
    }

    #[setter]
    fn set_resident(&self, resident: bool) {
        self.object.set_resident(resident);
    }

    #[getter]
    fn event_timeout_ms(&self) -> Option<u64> {
        self.object.event_timeout_ms()
    }

    #[setter]
    fn set_event_timeout_ms(&self, ms: Option<u64>) {
        self.object.set_event_timeout_ms(ms);
    }

    /// The auto-response pairs, as set.
    fn auto_responses(&self, py: Python<'_>) -> Vec<(Py<PyAny>, Py<PyAny>)> {
        let pairs = self.object.auto_responses();
        pairs
            .iter()
            .map(|(request, response)| (to_python(py, request).unbind(), to_python(py, response).unbind()))
            .collect()
    }

    /// Raises when `more` sockets with these tags could not be accepted.
    fn check_accept(&self, more: usize, tags: Vec<String>) -> Result<()> {
        Ok(self.object.check_accept(more, &tags)?)
    }

    fn adopt(&self, handle: &SocketHandle, tags: Vec<String>) -> Result<()> {
        Ok(self.object.adopt(&handle.socket, tags)?)
    }

    #[pyo3(signature = (tag=None))]
    fn sockets(&self, tag: Option<&str>) -> Vec<SocketHandle> {
        handles(self.object.sockets(tag))
    }

    #[pyo3(signature = (tag=None))]
    fn count(&self, tag: Option<&str>) -> usize {
        self.object.count(tag)
    }

    #[pyo3(signature = (message, tag=None, exclude=None))]
    fn broadcast(
        &self,
        message: &Bound<'_, PyAny>,
        tag: Option<&str>,
        exclude: Option<u64>,
    ) -> PyResult<usize> {
        with_message(message, |text, data| gate::broadcast(&self.object, text, data, tag, exclude))
    }

    fn set_auto_responses(&self, pairs: Vec<(Bound<'_, PyAny>, Bound<'_, PyAny>)>) -> PyResult<()> {
        let pairs = pairs
            .iter()
            .map(|(request, response)| Ok((to_payload(request)?, to_payload(response)?)))
            .collect::<PyResult<Vec<_>>>()?;
        self.object.set_auto_responses(pairs);
        Ok(())
    }
}
