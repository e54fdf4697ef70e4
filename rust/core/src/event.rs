//! What the core tells the application (events, carried by the bridge's queue) and the requests
//! that wait for its answer. [`Events`] is the queue with the socket registry: a socket is
//! registered and its end reported in one place.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};

use crate::bridge::EventQueue;
use crate::config::Limits;
use crate::deflate::Deflate;
use crate::error::CoreError;
use crate::frame::{close_code, Payload};
use crate::meter::{Slot, Unit};
use crate::registry::Registry;
use crate::socket::SocketShared;
use crate::stats::CoreStats;

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
    /// A streamed response body has room for more chunks again (`open`), or its client is gone
    /// and nothing more will be sent (`!open`; the last event of the stream).
    Body { stream: u64, open: bool },
    /// A piece of a request body the application asked for (`RequestBody::read`): `Ok(Some)`
    /// data, `Ok(None)` the end, `Err` why the body cannot be read (the last event of it).
    RequestBody { feed: u64, data: Result<Option<Bytes>, String> },
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
    /// The core's own counters (batches, lag, limit kills, commits), for the metrics.
    pub stats: Arc<CoreStats>,
}

impl Events {
    /// # Errors
    /// When the queue's eventfd cannot be created.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            queue: EventQueue::new()?,
            registry: Registry::default(),
            waiting: Mutex::new(Vec::new()),
            stats: Arc::default(),
        })
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

    /// Takes every waiting event (a batch), counting its size and how late it is taken.
    pub fn drain(&self) -> Vec<Event> {
        let (events, lag) = self.queue.drain_timed();
        if let Some(lag) = lag {
            self.stats.batch_sizes.observe(events.len() as f64);
            self.stats.loop_lag.observe_duration(lag);
        }
        events
    }

    /// Events waiting for the application thread now.
    #[must_use]
    pub fn depth(&self) -> usize {
        self.queue.len()
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
    /// Set when the request was handed over at its head (`stream_request_bodies`): `body` is
    /// empty, and the body is read on demand through this.
    pub feed: Option<RequestBody>,
}

/// What the application answers.
#[derive(Debug)]
pub enum Answer {
    Http {
        status: u16,
        headers: Vec<(String, Bytes)>,
        body: Bytes,
    },
    Upgrade {
        headers: Vec<(String, Bytes)>,
        socket: Opening,
    },
    /// A head whose body follows in chunks, as the application produces them.
    Stream {
        status: u16,
        headers: Vec<(String, Bytes)>,
        body: StreamBody,
    },
}

/// A socket made for a 101 and not yet handed to its connection. Dropped before that (the
/// client went away after the application answered and before the 101 went out: hyper drops
/// the request with the answer in it), the socket is ended unopened, 1006, so that the
/// application's WebSocket does not stay open with no connection behind it.
pub struct Opening {
    socket: Option<Arc<SocketShared>>,
    events: Arc<Events>,
}

impl Opening {
    /// The 101 is being written: the socket is the connection's from now on, and counted (billed)
    /// as a connection.
    #[must_use]
    pub fn open(mut self) -> Arc<SocketShared> {
        let socket = self.socket.take().expect("an Opening is opened or ended once");
        if let Some(slot) = socket.slot() {
            slot.add(Unit::Connections, 1);
        }
        socket
    }

    fn end(mut self, code: u16, reason: &str) {
        if let Some(socket) = self.socket.take() {
            self.events.finish_socket(socket.id(), code, reason.into(), false);
        }
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        if let Some(socket) = self.socket.take() {
            self.events.finish_socket(socket.id(), close_code::ABNORMAL, "connection lost".into(), false);
        }
    }
}

impl std::fmt::Debug for Opening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opening").field("socket", &self.socket.as_ref().map(|s| s.id())).finish()
    }
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
        Answering { tx: self.tx, answer: Answer::Http { status, headers, body } }
    }

    /// The head of an HTTP answer whose body the application writes in chunks through the
    /// [`BodyWriter`] (chunked unless `headers` has a Content-Length). The head goes out when
    /// the answer is sent (now, or once the output gate releases it); chunks written before
    /// wait behind it.
    #[must_use]
    pub fn respond_stream(self, status: u16, headers: Vec<(String, Bytes)>) -> (BodyWriter, Answering) {
        let stream = Arc::new(BodyStream {
            id: NEXT_STREAM.fetch_add(1, Ordering::Relaxed),
            events: self.events.clone(),
            state: Mutex::new(StreamState::default()),
        });
        let body = StreamBody { stream: stream.clone() };
        let answer = Answer::Stream { status, headers, body };
        (BodyWriter { stream }, Answering { tx: self.tx, answer })
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
        let opening = Opening { socket: Some(socket.clone()), events: self.events.clone() };
        let answer = Answer::Upgrade { headers, socket: opening };
        Ok((socket, Answering { tx: self.tx, answer }))
    }
}

/// An answer made and not yet sent: the output gate may hold it until a commit is durable.
pub struct Answering {
    tx: oneshot::Sender<Answer>,
    answer: Answer,
}

impl Answering {
    /// Sends the answer. A client gone before it (or before the 101 is written) drops it, and a
    /// socket made for a 101 with it: that socket never opened (nor is it billed).
    pub fn send(self) {
        let _ = self.tx.send(self.answer);
    }

    /// Drops the answer: the client gets a 500, and a socket made for a 101 is ended unopened.
    pub fn abandon(self) {
        if let Answer::Upgrade { socket, .. } = self.answer {
            socket.end(close_code::INTERNAL_ERROR, "the answer was dropped");
        }
    }
}

/// Bytes of a streamed body queued in the core past which the application is asked to wait
/// (the next chunk is pulled once the connection has taken some): a slow client holds at most
/// this much (plus one chunk) per response.
pub const STREAM_HIGH_WATER: usize = 64 * 1024;

static NEXT_STREAM: AtomicU64 = AtomicU64::new(1);

/// The chunks of one streamed response body, between the application (its [`BodyWriter`]) and
/// the connection (its [`StreamBody`]).
struct BodyStream {
    id: u64,
    events: Arc<Events>,
    state: Mutex<StreamState>,
}

#[derive(Default)]
struct StreamState {
    chunks: VecDeque<Bytes>,
    queued: usize,
    /// Set once the writer has ended the body: completely (`Some(true)`) or failed.
    end: Option<bool>,
    /// The connection's task, waiting for a chunk.
    waker: Option<Waker>,
    /// The writer was told the queue is full: an `Event::Body` follows when it has room.
    want_room: bool,
    /// The connection dropped the body (sent, refused, or the client went away).
    gone: bool,
    /// The body failed and the connection was given a turn to flush what came before.
    flushed: bool,
}

/// What [`BodyWriter::write`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Queued; there is room for more.
    Room,
    /// Queued; wait for an `Event::Body` before writing more.
    Full,
    /// Dropped: the client is gone (an `Event::Body` that says so follows, if not already sent).
    Gone,
}

/// The application's end of a streamed body. Dropped before [`Self::finish`], the body fails
/// (the connection is closed: the client sees it truncated).
pub struct BodyWriter {
    stream: Arc<BodyStream>,
}

impl BodyWriter {
    /// The stream's number, as `Event::Body` names it.
    #[must_use]
    pub fn id(&self) -> u64 {
        self.stream.id
    }

    /// Queues a chunk (an empty one is not sent: it would end a chunked body).
    pub fn write(&self, chunk: Bytes) -> Written {
        let mut state = self.stream.state.lock();
        if state.gone {
            return Written::Gone;
        }
        if state.end.is_some() {
            return Written::Gone;
        }
        if !chunk.is_empty() {
            state.queued += chunk.len();
            state.chunks.push_back(chunk);
            if let Some(waker) = state.waker.take() {
                waker.wake();
            }
        }
        if state.queued >= STREAM_HIGH_WATER {
            state.want_room = true;
            Written::Full
        } else {
            Written::Room
        }
    }

    /// Ends the body: completely (`ok`), or failed (the connection is closed after what was
    /// queued, without the final chunk). Later calls change nothing.
    pub fn finish(&self, ok: bool) {
        let mut state = self.stream.state.lock();
        if state.end.is_none() {
            state.end = Some(ok);
            if let Some(waker) = state.waker.take() {
                waker.wake();
            }
        }
    }
}

impl Drop for BodyWriter {
    fn drop(&mut self) {
        self.finish(false);
    }
}

impl std::fmt::Debug for BodyWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyWriter").field("id", &self.stream.id).finish_non_exhaustive()
    }
}

/// The connection's end of a streamed body. Dropped before the body ended (the client went away,
/// or the answer was never sent), the application is told with `Event::Body { open: false }`.
pub struct StreamBody {
    stream: Arc<BodyStream>,
}

/// Why a streamed body failed: the application's iterator raised (its traceback is logged by
/// the application).
#[derive(Debug)]
pub struct BodyFailed;

impl std::fmt::Display for BodyFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the application failed while streaming the response body")
    }
}

impl std::error::Error for BodyFailed {}

impl StreamBody {
    /// The next chunk: `Some(Ok)`, `None` at the end, `Some(Err)` when the body failed.
    pub fn poll_chunk(&self, cx: &Context<'_>) -> Poll<Option<Result<Bytes, BodyFailed>>> {
        let mut state = self.stream.state.lock();
        if let Some(chunk) = state.chunks.pop_front() {
            state.queued -= chunk.len();
            if state.want_room && state.queued < STREAM_HIGH_WATER {
                state.want_room = false;
                drop(state);
                self.stream.events.push(Event::Body { stream: self.stream.id, open: true });
            }
            return Poll::Ready(Some(Ok(chunk)));
        }
        match state.end {
            Some(true) => Poll::Ready(None),
            // hyper drops its write buffer when a body fails: a turn (Pending, woken at once)
            // lets it flush the head and the chunks before, so the client sees the cut.
            Some(false) if !state.flushed => {
                state.flushed = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Some(false) => Poll::Ready(Some(Err(BodyFailed))),
            None => {
                if !state.waker.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
                    state.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }

    /// The body is complete (nothing queued, and the writer ended it).
    #[must_use]
    pub fn is_end(&self) -> bool {
        let state = self.stream.state.lock();
        state.chunks.is_empty() && state.end == Some(true)
    }
}

impl Drop for StreamBody {
    fn drop(&mut self) {
        let mut state = self.stream.state.lock();
        state.gone = true;
        state.chunks.clear();
        let ended = state.end.is_some();
        drop(state);
        if !ended {
            self.stream.events.push(Event::Body { stream: self.stream.id, open: false });
        }
    }
}

impl std::fmt::Debug for StreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamBody").field("id", &self.stream.id).finish_non_exhaustive()
    }
}

/// A request body read on demand: the application asks for a piece (`read`), the connection's
/// task reads it from the client and answers with an `Event::RequestBody`. Dropped, the rest of
/// the body is not read.
pub struct RequestBody {
    feed: Arc<Feed>,
}

/// What the application's [`RequestBody`] and the connection's reader share.
pub struct Feed {
    pub id: u64,
    /// Pieces asked for and not yet read.
    wanted: AtomicU64,
    /// The application dropped its end.
    closed: std::sync::atomic::AtomicBool,
    wake: Notify,
}

impl RequestBody {
    /// A body fed through a new [`Feed`] (the reader's end).
    #[must_use]
    pub fn new() -> (Self, Arc<Feed>) {
        let feed = Arc::new(Feed {
            id: NEXT_STREAM.fetch_add(1, Ordering::Relaxed),
            wanted: AtomicU64::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
            wake: Notify::new(),
        });
        (Self { feed: feed.clone() }, feed)
    }

    /// The number `Event::RequestBody` names the body by.
    #[must_use]
    pub fn id(&self) -> u64 {
        self.feed.id
    }

    /// Asks for the next piece (an `Event::RequestBody` answers).
    pub fn read(&self) {
        self.feed.wanted.fetch_add(1, Ordering::AcqRel);
        self.feed.wake.notify_one();
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        self.feed.closed.store(true, Ordering::Release);
        self.feed.wake.notify_one();
    }
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody").field("id", &self.feed.id).finish_non_exhaustive()
    }
}

impl Feed {
    /// Waits until a piece is asked for (true) or the application dropped its end (false).
    pub async fn wanted(&self) -> bool {
        loop {
            if self.closed.load(Ordering::Acquire) {
                return false;
            }
            let wanted = self.wanted.load(Ordering::Acquire);
            if wanted > 0 {
                self.wanted.fetch_sub(1, Ordering::AcqRel);
                return true;
            }
            // (A read between the check and here left a permit: no lost wake-up.)
            self.wake.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};

    use bytes::Bytes;
    use tokio::sync::oneshot;

    use super::{Answer, Event, Events, Reply, Written, STREAM_HIGH_WATER};
    use crate::config::Limits;

    fn streamed() -> (Arc<Events>, super::BodyWriter, super::StreamBody) {
        let events = Arc::new(Events::new().expect("an eventfd"));
        let (tx, mut rx) = oneshot::channel();
        let reply = Reply::new(tx, false, events.clone(), Arc::new(Limits::default()), None);
        let (writer, answering) = reply.respond_stream(200, Vec::new());
        answering.send();
        let Ok(Answer::Stream { body, .. }) = rx.try_recv() else { panic!("a streamed answer") };
        (events, writer, body)
    }

    fn body_events(events: &Events) -> Vec<bool> {
        events
            .drain()
            .into_iter()
            .filter_map(|e| if let Event::Body { open, .. } = e { Some(open) } else { None })
            .collect()
    }

    #[test]
    fn a_full_stream_asks_to_wait_and_says_when_it_has_room() {
        let (events, writer, body) = streamed();
        let cx = Context::from_waker(Waker::noop());
        let half = Bytes::from(vec![b'x'; STREAM_HIGH_WATER / 2]);
        assert_eq!(writer.write(half.clone()), Written::Room);
        assert_eq!(writer.write(half.clone()), Written::Full);
        assert!(body_events(&events).is_empty());
        assert!(matches!(body.poll_chunk(&cx), Poll::Ready(Some(Ok(chunk))) if chunk.len() == half.len()));
        assert_eq!(body_events(&events), vec![true], "room again: one event");
        assert!(matches!(body.poll_chunk(&cx), Poll::Ready(Some(Ok(_)))));
        assert!(body.poll_chunk(&cx).is_pending());
        writer.finish(true);
        assert!(matches!(body.poll_chunk(&cx), Poll::Ready(None)));
        drop(body);
        assert!(body_events(&events).is_empty(), "ended: no departure to report");
    }

    #[test]
    fn a_failed_stream_flushes_once_then_fails_and_a_dropped_one_is_reported() {
        let (_events, writer, body) = streamed();
        let cx = Context::from_waker(Waker::noop());
        drop(writer); // unfinished: failed
        assert!(body.poll_chunk(&cx).is_pending(), "a turn to flush first");
        assert!(matches!(body.poll_chunk(&cx), Poll::Ready(Some(Err(_)))));

        let (events, writer, body) = streamed();
        drop(body); // the client went away
        assert_eq!(body_events(&events), vec![false]);
        assert_eq!(writer.write(Bytes::from_static(b"late")), Written::Gone);
    }
}
