//! The task that drives one upgraded WebSocket: reads into a per-thread scratch buffer (an idle
//! socket holds no buffer), decodes, answers pings, writes queued frames with vectored writes,
//! and runs the closing handshake and the timeouts.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::AsyncWrite;
use tokio::net::{TcpStream, UnixStream};
use tokio::time::{sleep_until, Instant, Sleep};

use crate::config::QUEUED_FRAME_COST;
use crate::event::{Event, Events};
use crate::frame::Payload;
use crate::frame::{self, close_code, Incoming, MessageDecoder};
use crate::meter::Unit;
use crate::socket::{CloseRequest, SocketShared};

/// How long a started closing handshake (or a final flush) may take before the TCP connection
/// is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to keep reading (and discarding) after our FIN, so the peer gets our Close frame
/// instead of a reset.
const LINGER: Duration = Duration::from_secs(2);
const SCRATCH_SIZE: usize = 64 * 1024;
/// Reads per readiness before the task yields to the others.
const READS_PER_WAKE: usize = 4;
const MAX_IOV: usize = 64;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_SIZE].into_boxed_slice());
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// We sent Close and wait for the peer's.
    CloseSent,
    /// The outcome is known; write what is queued, then end.
    Finishing,
}

/// The close event to report, once known.
struct Outcome {
    code: u16,
    reason: String,
    was_clean: bool,
}

/// What a connection task reads and writes: a TCP socket, or (for TLS) our end of a socket pair
/// whose other end a task pumps through the TLS session. Readiness-based, so no buffer is held
/// between reads, and a descriptor, so the application thread may write to it directly.
pub(crate) trait Stream: AsRawFd + AsyncWrite + Unpin + Send + 'static {
    fn poll_read_ready(&self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>>;
    fn poll_write_ready(&self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>>;
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
}

macro_rules! stream_impl {
    ($type:ty) => {
        impl Stream for $type {
            fn poll_read_ready(&self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
                <$type>::poll_read_ready(self, cx)
            }
            fn poll_write_ready(&self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
                <$type>::poll_write_ready(self, cx)
            }
            fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
                <$type>::try_read(self, buf)
            }
            fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                <$type>::try_write_vectored(self, bufs)
            }
        }
    };
}

stream_impl!(TcpStream);
stream_impl!(UnixStream);

struct Connection<S> {
    stream: S,
    socket: Arc<SocketShared>,
    /// The queue to the application (and the registry of open sockets).
    queue: Arc<Events>,
    decoder: MessageDecoder,
    out: VecDeque<Bytes>,
    /// The front of `out` is the rest of a frame partly written already.
    front_partial: bool,
    phase: Phase,
    /// When the current phase must end (close handshake), or a held-back close must be carried
    /// out anyway — `None` while open.
    phase_deadline: Option<Instant>,
    /// The timer of the current deadline, boxed and made only when there is one: an idle
    /// socket without timeouts keeps no timer.
    timer: Option<Pin<Box<Sleep>>>,
    last_frame: Instant,
    /// A keepalive Ping went out (at `last_frame` + the interval) and waits for an answer: any
    /// byte. A flag, not a time, keeps the task small.
    ping_sent: bool,
    outcome: Option<Outcome>,
    /// Events gathered from one read, pushed to the application under one lock.
    events: Vec<Event>,
    /// The batch number of the last messages pushed, and what those messages (since the last
    /// batch the application finished) hold: past the incoming high-water mark reading stops
    /// until the application has handled them.
    pushed_batch: u64,
    unhandled: usize,
    /// A close that waits until the application has handled the messages before it, so that
    /// its replies go out first.
    held: Option<Box<HeldClose>>,
}

impl<S> Drop for Connection<S> {
    fn drop(&mut self) {
        // Before the stream's descriptor is closed (fields drop after this), also when the task
        // is dropped unfinished (the server stopped): the application thread must never write
        // to the number once another socket may have it.
        self.socket.set_fd(None);
    }
}

/// What to do once the application has handled the messages received before it.
enum HeldClose {
    /// Fail the connection with this code (a protocol violation found after valid messages).
    Fail(u16, &'static str),
    /// Answer the peer's Close (with this status).
    Echo(Option<(u16, String)>),
}

/// Runs the socket until it is closed, then reports its Close event exactly once.
pub(crate) async fn run<S: Stream>(
    stream: S,
    leftover: Bytes,
    socket: Arc<SocketShared>,
    queue: Arc<Events>,
) {
    let max_message_size = socket.limits().max_message_size;
    let mut conn = Connection {
        stream,
        decoder: match (socket.is_client(), socket.deflate().is_some()) {
            (true, _) => MessageDecoder::for_client(max_message_size),
            (false, false) => MessageDecoder::new(max_message_size),
            (false, true) => MessageDecoder::new(max_message_size).with_inflate(),
        },
        socket,
        queue,
        out: VecDeque::new(),
        front_partial: false,
        phase: Phase::Open,
        phase_deadline: None,
        timer: None,
        last_frame: Instant::now(),
        ping_sent: false,
        outcome: None,
        events: Vec::new(),
        pushed_batch: 0,
        unhandled: 0,
        held: None,
    };
    if !leftover.is_empty() {
        conn.on_bytes(&leftover);
        conn.publish();
    }
    // Even empty, `leftover` may share hyper's whole read buffer: let it go before idling.
    drop(leftover);
    conn.socket.set_fd(Some(conn.stream.as_raw_fd()));
    conn.drive().await;
    conn.socket.mark_closing();
    conn.socket.set_fd(None);
    let outcome = conn.outcome.take().unwrap_or(Outcome {
        code: close_code::ABNORMAL,
        reason: "connection lost".into(),
        was_clean: false,
    });
    conn.queue.finish_socket(conn.socket.id(), outcome.code, outcome.reason, outcome.was_clean);
    conn.linger().await;
}

impl<S: Stream> Connection<S> {
    async fn drive(&mut self) {
        // Readiness is polled (`poll_*_ready`) rather than awaited (`readable()`): polling takes
        // over the stream's single waker slot, which still holds hyper's waker from the
        // handshake and would otherwise keep hyper's finished task (~900 bytes) alive for the
        // life of the socket. It is also smaller than a readiness future.
        loop {
            if let Some(request) = self.socket.take_queued(&mut self.out, &mut self.front_partial) {
                self.begin_close(request);
            }
            // After the replies the application queued, so they go out before the Close.
            if self.held.is_some() && self.app_caught_up() {
                self.release_held();
            }
            let had_output = !self.out.is_empty();
            if self.write_queued().is_err() {
                return;
            }
            if had_output && self.out.is_empty() && self.phase == Phase::Open {
                self.socket.set_task_idle();
            }
            if self.socket.take_drained() {
                self.queue.push(Event::Drained { socket: self.socket.id() });
            }
            if self.phase == Phase::Finishing && self.out.is_empty() {
                return;
            }
            // Backpressure pauses reading while open (the pull API, or too many messages
            // waiting for the application); a closing socket reads on to find the peer's Close.
            let reading = match self.phase {
                Phase::Open => !self.socket.is_paused() && self.held.is_none() && !self.incoming_full(),
                Phase::CloseSent => true,
                Phase::Finishing => false,
            };
            let writing = !self.out.is_empty();
            self.arm_timer();
            tokio::select! {
                biased;
                () = self.socket.wake.notified() => {}
                ready = poll_fn(|cx| self.stream.poll_write_ready(cx)), if writing => {
                    if ready.is_err() { return; }
                }
                ready = poll_fn(|cx| self.stream.poll_read_ready(cx)), if reading => {
                    if ready.is_err() || self.read_ready().is_err() {
                        return;
                    }
                    self.publish();
                }
                () = poll_fn(|cx| self.timer.as_mut().map_or(Poll::Pending, |t| t.as_mut().poll(cx))), if self.timer.is_some() => {
                    if self.on_deadline() {
                        return;
                    }
                }
            }
        }
    }

    /// The application has handled every message pushed so far; when not, the task is woken
    /// once it has.
    fn app_caught_up(&self) -> bool {
        self.unhandled == 0 || self.queue.wake_when_processed(self.pushed_batch, &self.socket)
    }

    /// Too much of this socket's input waits for the application: stop reading until it is
    /// handled (the queue to the application thread is bounded per socket).
    fn incoming_full(&mut self) -> bool {
        if self.unhandled < self.socket.limits().incoming_high_water() {
            return false;
        }
        if self.app_caught_up() {
            self.unhandled = 0;
            return false;
        }
        true
    }

    /// Points the timer at the current deadline, making or dropping it as needed. A later
    /// deadline leaves the timer as it is (it fires early and is re-armed then), so a socket
    /// that keeps receiving does not reset a timer per read.
    fn arm_timer(&mut self) {
        match (self.deadline(), self.timer.as_mut()) {
            (Some(at), Some(timer)) => {
                if at < timer.deadline() || timer.is_elapsed() {
                    timer.as_mut().reset(at);
                }
            }
            (Some(at), None) => self.timer = Some(Box::pin(sleep_until(at))),
            (None, _) => self.timer = None,
        }
    }

    fn deadline(&self) -> Option<Instant> {
        if let Some(at) = self.phase_deadline {
            return Some(at);
        }
        let limits = self.socket.limits();
        let idle = limits.idle_timeout.map(|idle| self.last_frame + idle);
        let keepalive = limits.ping_interval.and_then(|interval| {
            let ping_at = self.last_frame + interval;
            if self.ping_sent {
                limits.ping_timeout.map(|timeout| ping_at + timeout)
            } else {
                Some(ping_at)
            }
        });
        match (idle, keepalive) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Returns true when the connection must end now.
    fn on_deadline(&mut self) -> bool {
        let now = Instant::now();
        if let Some(at) = self.phase_deadline {
            if now < at {
                return false;
            }
            if self.held.is_some() {
                // The application did not catch up in time: close without waiting longer.
                self.release_held();
                return false;
            }
            if self.phase == Phase::CloseSent {
                self.outcome = Some(Outcome {
                    code: close_code::ABNORMAL,
                    reason: "closing handshake timed out".into(),
                    was_clean: false,
                });
            }
            return true;
        }
        let limits = self.socket.limits();
        let (idle, ping_interval, ping_timeout) =
            (limits.idle_timeout, limits.ping_interval, limits.ping_timeout);
        if idle.is_some_and(|idle| now >= self.last_frame + idle) {
            self.socket.mark_closing();
            self.begin_close(CloseRequest {
                code: close_code::GOING_AWAY,
                reason: "idle timeout".into(),
                discard_unsent: false,
            });
            return false;
        }
        let Some(interval) = ping_interval else { return false };
        let ping_at = self.last_frame + interval;
        if self.ping_sent {
            if ping_timeout.is_some_and(|timeout| now >= ping_at + timeout) {
                // No byte since the Ping: the peer is gone or stuck. Close 1011; the application
                // hears 1006, as no Close came from the peer.
                self.socket.mark_closing();
                self.queue(frame::encode_close(Some((close_code::INTERNAL_ERROR, "keepalive ping timeout"))));
                self.outcome = Some(Outcome {
                    code: close_code::ABNORMAL,
                    reason: "keepalive ping timeout".into(),
                    was_clean: false,
                });
                self.enter(Phase::Finishing);
            }
        } else if self.phase == Phase::Open && now >= ping_at {
            self.ping_sent = true;
            if let Some(slot) = self.socket.slot() {
                slot.add_io(Unit::ProtocolPings, 1);
            }
            self.queue_own(frame::encode_ping(b"sockworker"));
        }
        false
    }

    /// Reads what the kernel has, without holding a buffer of the socket's own between reads.
    fn read_ready(&mut self) -> io::Result<()> {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            for _ in 0..READS_PER_WAKE {
                match self.stream.try_read(&mut scratch) {
                    Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Ok(n) => {
                        if let Some(slot) = self.socket.slot() {
                            slot.add_io(Unit::BytesIn, n as u64);
                        }
                        // Any byte is a sign of life: it resets the idle and keepalive timers.
                        self.last_frame = Instant::now();
                        self.ping_sent = false;
                        self.on_bytes(&scratch[..n]);
                        if n < scratch.len() || self.phase == Phase::Finishing || self.held.is_some() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
    }

    fn on_bytes(&mut self, data: &[u8]) {
        if self.held.is_some() {
            return;
        }
        // The decoder is lent out for the call so each unit goes straight to `on_incoming`,
        // without collecting them in a vector per read (an empty decoder allocates nothing).
        let mut decoder = std::mem::replace(&mut self.decoder, MessageDecoder::new(0));
        let result = decoder.feed(data, &mut |unit| self.on_incoming(unit));
        self.decoder = decoder;
        if let Err(violation) = result {
            if self.phase == Phase::Open && self.held.is_none() {
                self.events.push(Event::Error {
                    socket: self.socket.id(),
                    message: violation.reason.into(),
                    slot: self.socket.slot().cloned(),
                });
                if self.has_unhandled_messages() {
                    self.hold(HeldClose::Fail(violation.code, violation.reason));
                } else {
                    self.fail(violation.code, violation.reason);
                }
            } else if self.phase != Phase::Open {
                self.phase = Phase::Finishing;
            }
        }
    }

    /// Messages of this socket that the application has not handled yet (gathered in this
    /// read, or pushed in a batch it has not finished).
    fn has_unhandled_messages(&self) -> bool {
        self.events.iter().any(|e| matches!(e, Event::Message { .. }))
            || (self.unhandled > 0 && !self.queue.is_processed(self.pushed_batch))
    }

    /// Holds a close back (and stops reading) until the application has handled what came
    /// before it, bounded by the close timeout.
    fn hold(&mut self, close: HeldClose) {
        self.held = Some(Box::new(close));
        self.phase_deadline = Some(Instant::now() + CLOSE_TIMEOUT);
    }

    fn release_held(&mut self) {
        let Some(held) = self.held.take() else { return };
        self.phase_deadline = None;
        match *held {
            HeldClose::Fail(code, reason) => self.fail(code, reason),
            HeldClose::Echo(status) => self.echo_close(status),
        }
    }

    fn on_incoming(&mut self, unit: Incoming) {
        if self.phase == Phase::Finishing || self.held.is_some() {
            return;
        }
        match unit {
            Incoming::Message(data) => {
                if self.phase == Phase::Open {
                    let answer = self.socket.auto_response(&data);
                    let slot = self.socket.slot();
                    if let Some(slot) = slot {
                        slot.add_io(if answer.is_some() { Unit::AutoResponses } else { Unit::MessagesIn }, 1);
                    }
                    let key = slot.map_or(0, |slot| Arc::as_ptr(slot) as usize);
                    if let Some(answer) = answer {
                        // Answered here: a hibernated object stays asleep.
                        self.queue_own(answer);
                    } else {
                        self.events.push(Event::Message { socket: self.socket.id(), data, slot: key });
                    }
                }
            }
            Incoming::Ping(data) => {
                if let Some(slot) = self.socket.slot() {
                    slot.add_io(Unit::ProtocolPings, 1);
                }
                self.queue_own(frame::encode_pong(&data));
            }
            Incoming::Pong => {}
            Incoming::Close(status) => {
                if self.phase == Phase::Open && self.has_unhandled_messages() {
                    // Replies to the messages before the Close may still come: answer it after.
                    self.hold(HeldClose::Echo(status));
                } else {
                    self.echo_close(status);
                }
            }
        }
    }

    /// Answers the peer's Close (when we had not sent ours) and finishes.
    fn echo_close(&mut self, status: Option<(u16, String)>) {
        if self.phase == Phase::Open {
            self.socket.mark_closing();
            let echo = status.as_ref().map(|(code, reason)| (*code, reason.as_str()));
            self.queue(frame::encode_close(echo));
        }
        let (code, reason) = status.unwrap_or((close_code::NO_STATUS, String::new()));
        self.outcome = Some(Outcome { code, reason, was_clean: true });
        self.enter(Phase::Finishing);
    }

    /// Fails the connection: sends our Close and ends without waiting for the peer's.
    fn fail(&mut self, code: u16, reason: &str) {
        self.socket.mark_closing();
        self.queue(frame::encode_close(Some((code, reason))));
        self.outcome = Some(Outcome { code, reason: reason.into(), was_clean: false });
        self.enter(Phase::Finishing);
    }

    fn begin_close(&mut self, request: CloseRequest) {
        if self.phase != Phase::Open {
            return;
        }
        if request.discard_unsent {
            // The send queue overflowed: the peer does not read, so waiting for its Close is
            // pointless. The frame in flight is finished, then our Close; the application hears
            // the 1008 whether or not the peer ever reads it.
            self.discard_unsent();
            self.held = None;
            self.fail(request.code, &request.reason);
            return;
        }
        self.queue(frame::encode_close(Some((request.code, &request.reason))));
        self.outcome = Some(Outcome { code: request.code, reason: request.reason, was_clean: false });
        self.enter(Phase::CloseSent);
    }

    fn enter(&mut self, phase: Phase) {
        self.phase = phase;
        self.phase_deadline = Some(Instant::now() + CLOSE_TIMEOUT);
    }

    /// Drops queued frames that have not started going out (a partly written one must finish,
    /// or the stream would be corrupt).
    fn discard_unsent(&mut self) {
        let keep = usize::from(self.front_partial);
        let mut frames = 0;
        let dropped: usize = self
            .out
            .drain(keep.min(self.out.len())..)
            .map(|f| {
                frames += 1;
                f.len()
            })
            .sum();
        self.socket.sub_buffered(dropped);
        self.socket.sub_frames(frames);
    }

    /// Queues a frame the core answers on its own (a pong, an auto-response, a keepalive ping)
    /// under the send-queue limit like the application's: a peer that sends pings and never
    /// reads is closed with 1008 instead of growing the queue.
    fn queue_own(&mut self, frame: Bytes) {
        if self.socket.queued_cost() > self.socket.limits().max_buffered_bytes {
            if self.phase == Phase::Open {
                self.socket.mark_closing();
                self.discard_unsent();
                self.fail(close_code::POLICY_VIOLATION, "send buffer limit exceeded");
            }
            return;
        }
        self.queue(frame);
    }

    fn queue(&mut self, frame: Bytes) {
        let frame = if self.socket.is_client() { frame::mask(&frame) } else { frame };
        if self.out.is_empty() {
            self.socket.set_task_busy();
        }
        self.socket.add_frame(frame.len());
        self.out.push_back(frame);
    }

    /// Writes as much of the queue as the kernel takes now.
    fn write_queued(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let mut count = 0;
            for (slot, frame) in slices.iter_mut().zip(self.out.iter()) {
                *slot = IoSlice::new(frame);
                count += 1;
            }
            match self.stream.try_write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(mut written) => {
                    self.socket.sub_buffered(written);
                    if let Some(slot) = self.socket.slot() {
                        slot.add_io(Unit::BytesOut, written as u64);
                    }
                    let mut whole = 0;
                    while written > 0 {
                        let front = self.out.front_mut().expect("written bytes come from the queue");
                        if written >= front.len() {
                            written -= front.len();
                            self.out.pop_front();
                            whole += 1;
                            self.front_partial = false;
                        } else {
                            front.advance(written);
                            self.front_partial = true;
                            written = 0;
                        }
                    }
                    self.socket.sub_frames(whole);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        // All written: an idle socket keeps no empty queue with capacity (a jemalloc thread
        // cache makes the next one cheap).
        self.out = VecDeque::new();
        Ok(())
    }

    fn publish(&mut self) {
        if self.events.is_empty() {
            return;
        }
        let cost: usize = self
            .events
            .iter()
            .map(|event| match event {
                Event::Message { data: Payload::Text(b) | Payload::Binary(b), .. } => {
                    b.len() + QUEUED_FRAME_COST
                }
                _ => 0,
            })
            .sum();
        let batch = self.queue.push_all(&mut self.events);
        // Empty now, but with the capacity of this read's events (or of the queue's vector it
        // was swapped with): an idle socket keeps none (4 events were 768 bytes per socket).
        self.events = Vec::new();
        if cost > 0 {
            if self.queue.is_processed(self.pushed_batch) {
                self.unhandled = 0;
            }
            self.unhandled += cost;
            self.pushed_batch = batch;
        }
    }

    /// Half-closes and reads until the peer closes too (bounded), so our last frames are
    /// not lost to a reset caused by unread input.
    async fn linger(&mut self) {
        use tokio::io::AsyncWriteExt;
        let _ = self.stream.shutdown().await;
        let until = Instant::now() + LINGER;
        loop {
            tokio::select! {
                ready = poll_fn(|cx| self.stream.poll_read_ready(cx)) => {
                    if ready.is_err() { return; }
                    let mut sink = [0u8; 512];
                    match self.stream.try_read(&mut sink) {
                        Ok(0) => return,
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => return,
                    }
                }
                () = sleep_until(until) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use crate::config::Limits;
    use crate::event::{Event, Events};
    use crate::frame::Payload;
    use crate::socket::SocketShared;

    /// What a connection task is given: the limits of its socket, and the queue.
    struct Ctx {
        limits: Arc<Limits>,
        events: Arc<Events>,
    }

    fn test_ctx() -> Ctx {
        Ctx { limits: Arc::new(Limits::default()), events: Arc::new(Events::new().expect("an eventfd")) }
    }

    /// A connected (client, server-side task) pair around `run`.
    async fn pair(ctx: &Arc<Ctx>) -> (TcpStream, Arc<SocketShared>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let socket = Arc::new(SocketShared::new(7, ctx.limits.clone()));
        crate::runtime::spawn(super::run(server, Bytes::new(), socket.clone(), ctx.events.clone()));
        (client, socket)
    }

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 126);
        let mut out = vec![first, 0x80 | payload.len() as u8, 1, 2, 3, 4];
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]));
        out
    }

    /// Waits (bounded) on the eventfd until the application side has received `n` events.
    async fn events(ctx: &Ctx, n: usize) -> Vec<Event> {
        // SAFETY: the eventfd outlives this guard (both live in `ctx`), and nothing else
        // registers it with this runtime.
        let wakeup = unsafe { tokio::io::unix::AsyncFd::register(ctx.events.fd()) }.unwrap();
        let mut got = Vec::new();
        while got.len() < n {
            let mut ready = tokio::time::timeout(Duration::from_secs(5), wakeup.readable())
                .await
                .unwrap_or_else(|_| panic!("only {} of {n} events: {got:?}", got.len()))
                .unwrap();
            ready.clear_ready();
            got.extend(ctx.events.drain());
        }
        got
    }

    async fn read_exact(client: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut buf)).await.unwrap().unwrap();
        buf
    }

    #[tokio::test]
    async fn ping_message_and_peer_close() {
        let ctx = Arc::new(test_ctx());
        let (mut client, socket) = pair(&ctx).await;
        client.write_all(&masked(0x89, b"p")).await.unwrap();
        assert_eq!(read_exact(&mut client, 3).await, [0x8A, 1, b'p'], "pong from the core");
        client.write_all(&masked(0x81, b"hi")).await.unwrap();
        socket.send(true, b"yo");
        assert_eq!(read_exact(&mut client, 4).await, [0x81, 2, b'y', b'o']);
        client.write_all(&masked(0x88, &[0x0F, 0xA1, b'x'])).await.unwrap();
        let got = events(&ctx, 1).await;
        assert!(
            matches!(&got[0], Event::Message { socket: 7, data: Payload::Text(t), .. } if &t[..] == b"hi")
        );
        // The Close is answered once the application has handled the message before it (and
        // could have replied).
        ctx.events.batch_done(ctx.events.last_drained());
        assert_eq!(read_exact(&mut client, 5).await, [0x88, 3, 0x0F, 0xA1, b'x'], "close echoed");
        let got = events(&ctx, 1).await;
        assert!(matches!(&got[0], Event::Close { socket: 7, code: 4001, was_clean: true, .. }));
    }

    #[tokio::test]
    async fn violation_fails_with_its_code() {
        let ctx = Arc::new(test_ctx());
        let (mut client, _socket) = pair(&ctx).await;
        client.write_all(&[0x81, 0x01, b'a']).await.unwrap();
        let head = read_exact(&mut client, 4).await;
        assert_eq!(head[..2], [0x88, 30]);
        assert_eq!(u16::from_be_bytes([head[2], head[3]]), 1002);
        let got = events(&ctx, 2).await;
        assert!(matches!(got[0], Event::Error { socket: 7, .. }));
        assert!(matches!(got[1], Event::Close { code: 1002, was_clean: false, .. }));
    }

    #[tokio::test]
    async fn lost_connection_is_1006() {
        let ctx = Arc::new(test_ctx());
        let (client, _socket) = pair(&ctx).await;
        drop(client);
        let got = events(&ctx, 1).await;
        assert!(matches!(got[0], Event::Close { code: 1006, was_clean: false, .. }));
    }

    /// The task of an idle socket is most of what it costs in the core: keep it small
    /// (920 bytes at first, 608 since readiness is polled and the timer is boxed on demand,
    /// 656 with keepalive, incremental UTF-8 checks and the bound on unhandled input).
    #[test]
    fn idle_task_stays_small() {
        let rt = crate::runtime::build(1).unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let _c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (s, _) = listener.accept().await.unwrap();
            let ctx = std::sync::Arc::new(test_ctx());
            let socket = std::sync::Arc::new(crate::socket::SocketShared::new(1, ctx.limits.clone()));
            let fut = super::run(s, bytes::Bytes::new(), socket, ctx.events.clone());
            let size = std::mem::size_of_val(&fut);
            assert!(size <= 656, "the connection task grew to {size} bytes");
        });
    }
}
