//! What the core tells the application (events, carried by the bridge's queue) and the requests
//! that wait for its answer. [`Events`] is the queue with the socket registry: a socket is
//! registered and its end reported in one place.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::bridge::EventQueue;
use crate::config::Limits;
use crate::deflate::Deflate;
use crate::error::CoreError;
use crate::frame::{close_code, Payload};
use crate::meter::{Slot, Unit};
use crate::registry::Registry;
use crate::socket::SocketShared;

/// Everything the core tells the application.
#[derive(Debug)]
pub enum Event {
    /// An HTTP request (possibly a WebSocket upgrade) waiting for its answer.
    Request(PendingRequest),
    Message {
        socket: u64,
        data: Payload,
        /// The socket's meter slot: what the application thread bills the message's handler
        /// to, carried here so that no map of sockets is looked up per message.
        slot: Option<Arc<Slot>>,
    },
    /// The socket is closed; always the last event of a socket, sent exactly once.
    Close {
        socket: u64,
        code: u16,
        reason: String,
        was_clean: bool,
        /// The socket itself when it belonged to a Durable Object.
        object_socket: Option<Arc<SocketShared>>,
        slot: Option<Arc<Slot>>,
    },
    /// Something went wrong on the socket (a protocol violation, an I/O error); a Close follows.
    Error { socket: u64, message: String, slot: Option<Arc<Slot>> },
    /// The send queue fell below the low-water mark after `SocketShared::request_drain`.
    Drained { socket: u64 },
    /// During shutdown, the last socket has closed.
    AllClosed,
    /// The outcome of `Server::connect`: the new outgoing socket and its subprotocol, or why not.
    Connected { token: u64, result: Result<(Arc<SocketShared>, String), String> },
    /// The outcome of `Server::fetch`: the whole response, or why there is none.
    Fetched { token: u64, result: Result<FetchResponse, FetchError> },
    /// An object's alarm is due (`retry`: how many times it failed before; `id_name`: the name
    /// its id was made from, if known).
    Alarm { namespace: String, object_id: String, id_name: Option<String>, retry: u32 },
    /// The output gate released (`ok`) or dropped (a failed commit) what waited on `token`.
    Released { token: u64, ok: bool },
    /// A storage commit of the object with this key failed; its held output was dropped.
    CommitFailed { owner: u64, message: String },
}

/// The response of `Server::fetch`, read whole.
#[derive(Debug)]
pub struct FetchResponse {
    pub status: u16,
    /// Lowercase names, raw values (the values of one name together, in the order received).
    pub headers: Vec<(String, Bytes)>,
    pub body: Bytes,
    /// The URL of the response: the last one after redirects.
    pub url: String,
    pub redirected: bool,
}

/// Why a fetch failed: `kind` says what to raise (see [`FetchError::kind`]).
#[derive(Debug)]
pub struct FetchError {
    pub kind: FetchErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchErrorKind {
    /// A bad URL, method or header; nothing was sent.
    Invalid,
    /// Refused, unknown host, TLS failure, a connection closed before the whole response.
    Connect,
    /// The total or the connect timeout passed.
    Timeout,
    /// The response body is longer than `max_response_size`.
    TooLarge,
    /// More redirects than `max_redirects`.
    TooManyRedirects,
}

impl FetchErrorKind {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            FetchErrorKind::Invalid => "invalid",
            FetchErrorKind::Connect => "connect",
            FetchErrorKind::Timeout => "timeout",
            FetchErrorKind::TooLarge => "too_large",
            FetchErrorKind::TooManyRedirects => "redirects",
        }
    }
}

/// The event queue and the registry of the sockets whose events it carries.
pub struct Events {
    queue: EventQueue<Event>,
    pub registry: Registry,
    /// Sockets whose task waits for the application to finish a batch.
    waiting: Mutex<Vec<Arc<SocketShared>>>,
}

impl Events {
    /// # Errors
    /// When the queue's eventfd cannot be created.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self { queue: EventQueue::new()?, registry: Registry::default(), waiting: Mutex::new(Vec::new()) })
    }

    /// The application has finished handling batch `number` (see [`EventQueue::push_all`]).
    #[must_use]
    pub fn is_processed(&self, number: u64) -> bool {
        self.queue.is_processed(number)
    }

    /// Like [`Self::is_processed`]; when not, `socket`'s task is woken once it is.
    pub(crate) fn wake_when_processed(&self, number: u64, socket: &Arc<SocketShared>) -> bool {
        let mut waiting = self.waiting.lock();
        // Checked under the lock `batch_done` takes after it counts the batch: no lost wake-up.
        if self.queue.is_processed(number) {
            return true;
        }
        if !socket.set_waiting_app() {
            waiting.push(socket.clone());
        }
        false
    }

    /// The number of the batch `drain` gave out last.
    #[must_use]
    pub fn last_drained(&self) -> u64 {
        self.queue.last_drained()
    }

    /// The application has handled the batches up to `number` and what their handlers sent is
    /// queued on the sockets (by the application thread, or the output gate once it released
    /// it): wakes the sockets that waited for it.
    pub fn batch_done(&self, number: u64) {
        self.queue.mark_processed(number);
        let waiting = std::mem::take(&mut *self.waiting.lock());
        for socket in waiting {
            socket.clear_waiting_app();
            socket.wake.notify_one();
        }
    }

    #[must_use]
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.queue.fd()
    }

    pub fn push(&self, event: Event) {
        self.queue.push(event);
    }

    /// Returns the number of the batch they will be handled in.
    pub fn push_all(&self, batch: &mut Vec<Event>) -> u64 {
        self.queue.push_all(batch)
    }

    pub fn drain(&self) -> Vec<Event> {
        self.queue.drain()
    }

    /// Forgets a socket and reports its Close event (the last event of a socket).
    pub fn finish_socket(&self, id: u64, code: u16, reason: String, was_clean: bool) {
        let (socket, remaining) = self.registry.remove(id);
        let slot = socket.as_ref().and_then(|socket| socket.slot().cloned());
        // A socket of an object travels with its Close event: the application may have no
        // object of its own for it (hibernated) and needs its tags and attachment.
        let socket = socket.filter(|socket| {
            let object = socket.meta_if_any().and_then(|meta| meta.object.clone());
            object.inspect(|object| object.forget(id)).is_some()
        });
        self.push(Event::Close { socket: id, code, reason, was_clean, object_socket: socket, slot });
        if remaining == 0 && self.registry.is_shutting_down() {
            self.push(Event::AllClosed);
        }
    }
}

impl crate::reactor::Source for Events {
    fn poll_ready(&self, waker: &std::task::Waker) -> bool {
        self.queue.poll_ready(waker)
    }
}

/// An HTTP request waiting for the application's answer.
#[derive(Debug)]
pub struct PendingRequest {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    pub headers: Vec<(String, Bytes)>,
    pub body: Bytes,
    pub peer: SocketAddr,
    pub reply: Reply,
}

/// What the application answers.
#[derive(Debug)]
pub enum Answer {
    Http { status: u16, headers: Vec<(String, Bytes)>, body: Bytes },
    Upgrade { headers: Vec<(String, Bytes)>, socket: Arc<SocketShared> },
}

/// The way back to the connection that made a request. Dropping it unanswered gives a 500.
pub struct Reply {
    tx: oneshot::Sender<Answer>,
    websocket: bool,
    events: Arc<Events>,
    /// The app's limits, for a socket accepted without limits of its own.
    limits: Arc<Limits>,
    /// permessage-deflate as negotiated from the client's offer (with compression on).
    deflate: Option<Deflate>,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply").field("websocket", &self.websocket).finish_non_exhaustive()
    }
}

impl Reply {
    pub(crate) fn new(
        tx: oneshot::Sender<Answer>,
        websocket: bool,
        events: Arc<Events>,
        limits: Arc<Limits>,
        deflate: Option<Deflate>,
    ) -> Self {
        Self { tx, websocket, events, limits, deflate }
    }

    /// The request is a valid WebSocket upgrade.
    #[must_use]
    pub fn is_websocket(&self) -> bool {
        self.websocket
    }

    /// The HTTP answer, ready to go (now, or when the output gate releases it).
    #[must_use]
    pub fn respond(self, status: u16, headers: Vec<(String, Bytes)>, body: Bytes) -> Answering {
        Answering { tx: self.tx, answer: Answer::Http { status, headers, body }, events: self.events }
    }

    /// Makes the socket the connection will become, and the 101 answer that opens it; `slot` is
    /// billed the connection (when the 101 goes out) and then the socket's traffic.
    ///
    /// # Errors
    /// `NotAnUpgrade` (with the reply given back) when the request is not a WebSocket upgrade.
    pub fn accept_websocket(
        self,
        headers: Vec<(String, Bytes)>,
        slot: Option<Arc<Slot>>,
    ) -> Result<(Arc<SocketShared>, Answering), (Self, CoreError)> {
        self.accept_websocket_with(headers, slot, None)
    }

    /// [`Self::accept_websocket`] for a socket held to `limits` (a Durable Object namespace's)
    /// instead of the app's.
    ///
    /// # Errors
    /// As [`Self::accept_websocket`].
    pub fn accept_websocket_with(
        self,
        headers: Vec<(String, Bytes)>,
        slot: Option<Arc<Slot>>,
        limits: Option<Arc<Limits>>,
    ) -> Result<(Arc<SocketShared>, Answering), (Self, CoreError)> {
        if !self.websocket {
            return Err((self, CoreError::NotAnUpgrade));
        }
        let limits = limits.unwrap_or_else(|| self.limits.clone());
        let socket = self.events.registry.register(limits, self.deflate, false);
        if let Some(slot) = slot {
            socket.set_slot(slot);
        }
        if self.events.registry.is_shutting_down() {
            socket.close(close_code::GOING_AWAY, "server shutting down");
        }
        let answer = Answer::Upgrade { headers, socket: socket.clone() };
        Ok((socket, Answering { tx: self.tx, answer, events: self.events }))
    }
}

/// An answer made and not yet sent: the output gate may hold it until a commit is durable.
pub struct Answering {
    tx: oneshot::Sender<Answer>,
    answer: Answer,
    events: Arc<Events>,
}

impl Answering {
    pub fn send(self) {
        let upgraded = match &self.answer {
            Answer::Upgrade { socket, .. } => Some(socket.clone()),
            Answer::Http { .. } => None,
        };
        let sent = self.tx.send(self.answer).is_ok();
        if let Some(socket) = upgraded {
            if sent {
                if let Some(slot) = socket.slot() {
                    slot.add(Unit::Connections, 1);
                }
            } else {
                // The client went away before the answer: the socket never opened (nor is billed).
                self.events.finish_socket(socket.id(), close_code::ABNORMAL, "connection lost".into(), false);
            }
        }
    }

    /// Drops the answer: the client gets a 500, and a socket made for a 101 is ended unopened.
    pub fn abandon(self) {
        if let Answer::Upgrade { socket, .. } = self.answer {
            self.events.finish_socket(
                socket.id(),
                close_code::INTERNAL_ERROR,
                "the answer was dropped".into(),
                false,
            );
        }
    }
}
