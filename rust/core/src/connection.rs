//! The task that drives one upgraded WebSocket, the I/O around its [`Protocol`]: reads into a
//! per-thread scratch buffer (an idle socket holds no buffer) and feeds the protocol, writes what
//! it queues and what the application queued with vectored writes, waits for its deadline, and
//! pushes the events to the application.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Sleep};

use crate::config::{Limits, QUEUED_FRAME_COST};
use crate::event::{Event, Events};
use crate::frame::Payload;
use crate::meter::{Slot, Unit};
use crate::protocol::{Link, Phase, Protocol};
use crate::socket::{SocketShared, WriteQueue};
use crate::stats::Traffic;

/// How long to keep reading (and discarding) after our FIN, so the peer gets our Close frame
/// instead of a reset.
const LINGER: Duration = Duration::from_secs(2);
const SCRATCH_SIZE: usize = 64 * 1024;
/// Reads per readiness before the task yields to the others.
const READS_PER_WAKE: usize = 4;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_SIZE].into_boxed_slice());
}

/// What a connection task reads and writes: a TCP socket, or a TLS session over one
/// ([`crate::tls::TlsStream`]). Readiness-based, so no buffer is held between reads.
pub(crate) trait Stream: Unpin + Send + 'static {
    fn poll_read_ready(&self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>>;
    fn poll_write_ready(&self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>>;
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// The descriptor the application thread may write encoded frames to itself while the task
    /// is idle, or `None` when what goes on the wire is not the frames themselves (TLS).
    fn direct_fd(&self) -> Option<RawFd>;
    /// Bytes of the stream's own wait for the kernel (TLS records), written by [`Self::flush`].
    fn has_pending_output(&self) -> bool;
    /// Writes what the stream holds of its own until it is empty or the kernel takes no more;
    /// true if some is left (as [`Self::has_pending_output`] would say next).
    fn flush(&self) -> io::Result<bool>;
    /// Ends our direction of the stream (for TLS, after a close_notify).
    fn poll_shutdown(&mut self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>>;
}

/// One `read` from a readiness-based socket; a short read forgets its readiness at once, as
/// tokio's own `poll_read` does, not after one more read that would only say EAGAIN (one system
/// call per message saved). So `WouldBlock` is returned only when the kernel said EAGAIN or
/// tokio's readiness was cleared: the caller may then wait for readiness without hanging.
pub(crate) fn read_draining(tcp: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let len = buf.len();
    let mut short = 0;
    let read = tcp.try_io(tokio::io::Interest::READABLE, || {
        // SAFETY: reads at most `len` bytes into the live buffer `buf`.
        let n = unsafe { libc::read(tcp.as_raw_fd(), buf.as_mut_ptr().cast(), len) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        if n > 0 && n < len {
            short = n;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match read {
        Err(e) if short > 0 && e.kind() == io::ErrorKind::WouldBlock => Ok(short),
        read => read,
    }
}

impl Stream for TcpStream {
    fn poll_read_ready(&self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
    fn poll_write_ready(&self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_write_ready(self, cx)
    }
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        read_draining(self, buf)
    }
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        TcpStream::try_write_vectored(self, bufs)
    }
    fn direct_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
    fn has_pending_output(&self) -> bool {
        false
    }
    fn flush(&self) -> io::Result<bool> {
        Ok(false)
    }
    fn poll_shutdown(&mut self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(self), cx)
    }
}

struct Connection<S> {
    stream: S,
    protocol: Protocol,
    link: SocketLink,
    /// The timer of the protocol's deadline, boxed and made only when there is one: an idle
    /// socket without timeouts keeps no timer.
    timer: Option<Pin<Box<Sleep>>>,
}

/// What the protocol drives: the socket (its write queue, counters and object) and the
/// application's event queue.
struct SocketLink {
    socket: Arc<SocketShared>,
    /// The queue to the application (and the registry of open sockets).
    queue: Arc<Events>,
    out: WriteQueue,
    /// Events gathered from one read, pushed to the application under one lock.
    events: Vec<Event>,
    /// The batch number of the last messages pushed, and what those messages (since the last
    /// batch the application finished) hold: past the incoming high-water mark reading stops
    /// until the application has handled them.
    pushed_batch: u64,
    unhandled: usize,
}

impl<S> Drop for Connection<S> {
    fn drop(&mut self) {
        // Before the stream's descriptor is closed (fields drop after this), also when the task
        // is dropped unfinished (the server stopped): the application thread must never write
        // to the number once another socket may have it.
        self.link.socket.set_fd(None);
    }
}

/// Runs the socket until it is closed, then reports its Close event exactly once.
pub(crate) async fn run<S: Stream>(
    stream: S,
    leftover: Bytes,
    socket: Arc<SocketShared>,
    queue: Arc<Events>,
) {
    let now = Instant::now();
    let protocol =
        Protocol::new(socket.is_client(), socket.limits().max_message_size, socket.deflate().is_some(), now);
    let link = SocketLink {
        socket,
        queue,
        out: WriteQueue::default(),
        events: Vec::new(),
        pushed_batch: 0,
        unhandled: 0,
    };
    let mut conn = Connection { stream, protocol, link, timer: None };
    if !leftover.is_empty() {
        conn.protocol.receive_data(&leftover, now, &mut conn.link);
        conn.link.publish();
    }
    // Even empty, `leftover` may share hyper's whole read buffer: let it go before idling.
    drop(leftover);
    conn.link.socket.set_fd(conn.stream.direct_fd());
    conn.drive().await;
    conn.link.socket.mark_closing();
    conn.link.socket.set_fd(None);
    let outcome = conn.protocol.take_outcome();
    conn.link.queue.finish_socket(conn.link.socket.id(), outcome.code, outcome.reason, outcome.was_clean);
    conn.linger().await;
}

impl<S: Stream> Connection<S> {
    async fn drive(&mut self) {
        // Readiness is polled (`poll_*_ready`) rather than awaited (`readable()`): polling takes
        // over the stream's single waker slot, which still holds hyper's waker from the
        // handshake and would otherwise keep hyper's finished task (~900 bytes) alive for the
        // life of the socket. It is also smaller than a readiness future.
        loop {
            let link = &mut self.link;
            if let Some(request) = link.socket.take_queued(&mut link.out) {
                self.protocol.close(request, Instant::now(), link);
            }
            // After the replies the application queued, so they go out before the Close.
            if self.protocol.is_holding() && link.app_caught_up() {
                self.protocol.release_held(Instant::now(), link);
            }
            let stream = &self.stream;
            let had_output = !link.out.is_empty() || stream.has_pending_output();
            let written = link
                .socket
                .write_queue(&mut link.out, Slot::add_io, |slices| stream.try_write_vectored(slices))
                .and_then(|()| stream.flush());
            // A TLS session may hold records of its own (the end of a write, an answer to the
            // peer's KeyUpdate): the task is not done writing until they are out too.
            let Ok(pending) = written else { return };
            let all_written = link.out.is_empty() && !pending;
            let phase = self.protocol.phase();
            if had_output && all_written && phase == Phase::Open {
                link.socket.set_task_idle();
            }
            if link.socket.take_drained() {
                link.queue.push(Event::Drained { socket: link.socket.id() });
            }
            if phase == Phase::Finishing && all_written {
                return;
            }
            // Backpressure pauses reading while open (the pull API, or too many messages
            // waiting for the application); a closing socket reads on to find the peer's Close.
            let reading = match phase {
                Phase::Open => {
                    !link.socket.is_paused() && !self.protocol.is_holding() && !link.incoming_full()
                }
                Phase::CloseSent => true,
                Phase::Finishing => false,
            };
            let writing = !all_written;
            self.arm_timer();
            tokio::select! {
                biased;
                () = self.link.socket.wake.notified() => {}
                ready = poll_fn(|cx| self.stream.poll_write_ready(cx)), if writing => {
                    if ready.is_err() { return; }
                }
                ready = poll_fn(|cx| self.stream.poll_read_ready(cx)), if reading => {
                    if ready.is_err() || self.read_ready().is_err() {
                        return;
                    }
                    self.link.publish();
                }
                () = poll_fn(|cx| self.timer.as_mut().map_or(Poll::Pending, |t| t.as_mut().poll(cx))), if self.timer.is_some() => {
                    if self.protocol.on_deadline(Instant::now(), &mut self.link) {
                        return;
                    }
                }
            }
        }
    }

    /// Points the timer at the protocol's deadline, making or dropping it as needed. A later
    /// deadline leaves the timer as it is (it fires early and is re-armed then), so a socket
    /// that keeps receiving does not reset a timer per read.
    fn arm_timer(&mut self) {
        let deadline = self.protocol.deadline(self.link.socket.limits()).map(tokio::time::Instant::from_std);
        match (deadline, self.timer.as_mut()) {
            (Some(at), Some(timer)) => {
                if at < timer.deadline() || timer.is_elapsed() {
                    timer.as_mut().reset(at);
                }
            }
            (Some(at), None) => self.timer = Some(Box::pin(sleep_until(at))),
            (None, _) => self.timer = None,
        }
    }

    /// Reads what the kernel has, without holding a buffer of the socket's own between reads.
    fn read_ready(&mut self) -> io::Result<()> {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            for _ in 0..READS_PER_WAKE {
                match self.stream.try_read(&mut scratch) {
                    Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Ok(n) => {
                        if let Some(slot) = self.link.socket.slot() {
                            slot.add_io(Unit::BytesIn, n as u64);
                        }
                        if let Some(traffic) = self.link.socket.traffic() {
                            Traffic::add(&traffic.bytes_in, n as u64);
                        }
                        self.protocol.receive_data(&scratch[..n], Instant::now(), &mut self.link);
                        if n < scratch.len()
                            || self.protocol.phase() == Phase::Finishing
                            || self.protocol.is_holding()
                        {
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

    /// Half-closes and reads until the peer closes too (bounded), so our last frames are
    /// not lost to a reset caused by unread input.
    async fn linger(&mut self) {
        let until = tokio::time::Instant::now() + LINGER;
        // Bounded: a TLS shutdown writes a close_notify, which a peer that reads nothing would
        // hold up for ever.
        let shutdown = poll_fn(|cx| self.stream.poll_shutdown(cx));
        if tokio::time::timeout_at(until, shutdown).await.is_err() {
            return;
        }
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

impl SocketLink {
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
}

impl Link for SocketLink {
    fn limits(&self) -> &Limits {
        self.socket.limits()
    }

    fn send(&mut self, frame: Bytes) {
        self.socket.push_own(&mut self.out, frame);
    }

    fn discard_unsent(&mut self) {
        self.socket.discard_unsent(&mut self.out);
    }

    fn queued_cost(&self) -> usize {
        self.socket.queued_cost()
    }

    fn closing(&mut self) {
        self.socket.mark_closing();
    }

    fn message(&mut self, data: Payload) {
        let slot = self.socket.slot().cloned();
        self.events.push(Event::Message { socket: self.socket.id(), data, slot });
    }

    fn error(&mut self, reason: &'static str) {
        let slot = self.socket.slot().cloned();
        self.events.push(Event::Error { socket: self.socket.id(), message: reason.into(), slot });
    }

    /// Messages gathered in this read, or pushed in a batch the application has not finished.
    fn app_behind(&self) -> bool {
        self.events.iter().any(|e| matches!(e, Event::Message { .. }))
            || (self.unhandled > 0 && !self.queue.is_processed(self.pushed_batch))
    }

    fn auto_response(&mut self, message: &Payload) -> Option<Bytes> {
        self.socket.auto_response(message)
    }

    fn count(&mut self, unit: Unit) {
        if let Some(slot) = self.socket.slot() {
            slot.add_io(unit, 1);
        }
        if let (Some(traffic), Unit::MessagesIn | Unit::AutoResponses) = (self.socket.traffic(), unit) {
            Traffic::add(&traffic.messages_in, 1);
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
    /// 656 with keepalive, incremental UTF-8 checks and the bound on unhandled input, 640 with
    /// the protocol apart and its outcome boxed).
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
            assert!(size <= 640, "the connection task grew to {size} bytes");
        });
    }
}
