//! `PendingReply`: the answer to one HTTP request, given once (a response, or 101 and a socket).

use bytes::Bytes;
use parking_lot::Mutex;
use pyo3::prelude::*;
use sockworker_core::{CoreError, Reply};

use crate::errors::Result;
use crate::meter::Slot;
use crate::socket::{SocketHandle, SocketLimits};

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

    fn take(&self) -> Result<Reply> {
        Ok(self.reply.lock().take().ok_or(CoreError::AlreadyAnswered)?)
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

    /// Raises `InvalidArgument` (and answers nothing) for a header hyper could not send.
    fn respond(&self, status: u16, headers: Vec<(String, Vec<u8>)>, body: Vec<u8>) -> Result<()> {
        let headers = header_list(headers);
        sockworker_core::server::check_headers(&headers)?;
        sockworker_core::gate::answer(self.take()?.respond(status, headers, Bytes::from(body)));
        Ok(())
    }

    /// Answers 101; the socket is held to `limits` (a namespace's) instead of the app's.
    #[pyo3(signature = (headers, slot=None, limits=None))]
    fn accept_websocket(
        &self,
        headers: Vec<(String, Vec<u8>)>,
        slot: Option<&Slot>,
        limits: Option<&SocketLimits>,
    ) -> Result<SocketHandle> {
        let slot = slot.map(|slot| slot.inner.clone());
        let headers = header_list(headers);
        sockworker_core::server::check_headers(&headers)?;
        let limits = limits.map(|limits| limits.inner.clone());
        match self.take()?.accept_websocket_with(headers, slot, limits) {
            Ok((socket, answering)) => {
                sockworker_core::gate::answer(answering);
                Ok(SocketHandle { socket })
            }
            Err((reply, error)) => {
                *self.reply.lock() = Some(reply);
                Err(error.into())
            }
        }
    }
}
