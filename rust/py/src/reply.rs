//! `PendingReply`: the answer to one HTTP request, given once (a response, or 101 and a socket).

use bytes::Bytes;
use parking_lot::Mutex;
use pyo3::prelude::*;
use sockworker_core::{Answering, BodyWriter, CoreError, Reply, RequestBody, Written};

use crate::errors::Result;
use crate::meter::Slot;
use crate::socket::{SocketHandle, SocketLimits};

/// A request's way back to its connection. Answer it once.
#[pyclass(frozen, module = "sockworker._native")]
pub struct PendingReply {
    reply: Mutex<Option<Reply>>,
    /// The 101 made by `accept_websocket`, until `open` sends it.
    opening: Mutex<Option<Answering>>,
    websocket: bool,
}

impl PendingReply {
    pub fn new(reply: Reply) -> Self {
        Self { websocket: reply.is_websocket(), reply: Mutex::new(Some(reply)), opening: Mutex::new(None) }
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

    /// Answers with a head whose body follows through the `ResponseStream` returned (chunked
    /// unless the headers have a Content-Length). The output gate may hold the head; chunks
    /// written meanwhile wait behind it.
    fn respond_stream(&self, status: u16, headers: Vec<(String, Vec<u8>)>) -> Result<ResponseStream> {
        let headers = header_list(headers);
        sockworker_core::server::check_headers(&headers)?;
        let (writer, answering) = self.take()?.respond_stream(status, headers);
        sockworker_core::gate::answer(answering);
        Ok(ResponseStream { writer: Mutex::new(Some(writer)) })
    }

    /// Makes the socket of a 101 answer, held to `limits` (a namespace's) instead of the app's;
    /// the 101 goes out with `open()`, once the socket is bound and owned, so that nothing the
    /// client sends with its handshake finds it half made (an auto-response not yet in force).
    /// Dropped without `open()`, the client gets a 500 and the socket ends unopened.
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
                *self.opening.lock() = Some(answering);
                Ok(SocketHandle { socket })
            }
            Err((reply, error)) => {
                *self.reply.lock() = Some(reply);
                Err(error.into())
            }
        }
    }

    /// Sends the 101 made by `accept_websocket` (now, or when the output gate releases it).
    fn open(&self) -> Result<()> {
        let answering = self.opening.lock().take().ok_or(CoreError::AlreadyAnswered)?;
        sockworker_core::gate::answer(answering);
        Ok(())
    }
}

/// `ResponseStream.write` answers: queued, room for more.
pub const STREAM_ROOM: u8 = 0;
/// Queued; wait for a BODY event (open) before writing more.
pub const STREAM_FULL: u8 = 1;
/// Dropped: the client is gone (a BODY event, not open, follows unless already sent).
pub const STREAM_GONE: u8 = 2;

/// The application's end of a streamed response body. Dropped (or `finish(False)`) before
/// `finish(True)`, the connection is closed and the client sees the body cut short.
#[pyclass(frozen, module = "sockworker._native")]
pub struct ResponseStream {
    writer: Mutex<Option<BodyWriter>>,
}

#[pymethods]
impl ResponseStream {
    /// The number BODY events name the stream by (0 once finished).
    #[getter]
    fn id(&self) -> u64 {
        self.writer.lock().as_ref().map_or(0, BodyWriter::id)
    }

    /// Queues a chunk: `STREAM_ROOM`, `STREAM_FULL` or `STREAM_GONE`.
    fn write(&self, chunk: Vec<u8>) -> u8 {
        match self.writer.lock().as_ref().map(|writer| writer.write(Bytes::from(chunk))) {
            Some(Written::Room) => STREAM_ROOM,
            Some(Written::Full) => STREAM_FULL,
            Some(Written::Gone) | None => STREAM_GONE,
        }
    }

    /// Ends the body: completely (`ok`), or cut short. Later calls do nothing.
    fn finish(&self, ok: bool) {
        if let Some(writer) = self.writer.lock().take() {
            writer.finish(ok);
        }
    }
}

/// A request body read on demand (`App(stream_request_bodies=True)`): `read()` asks for the
/// next piece, a REQUEST_BODY event brings it. Dropped, the rest of the body is not read.
#[pyclass(frozen, module = "sockworker._native")]
pub struct RequestFeed {
    pub body: RequestBody,
}

#[pymethods]
impl RequestFeed {
    /// The number REQUEST_BODY events name the body by.
    #[getter]
    fn id(&self) -> u64 {
        self.body.id()
    }

    /// Asks for the next piece of the body.
    fn read(&self) {
        self.body.read();
    }
}
