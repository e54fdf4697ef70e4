//! The state of one WebSocket shared between the application (which queues frames and close
//! requests without blocking) and the connection task (which writes them).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes};
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::config::{Limits, QUEUED_FRAME_COST};
use crate::deflate::Deflate;
use crate::error::CoreError;
use crate::frame::Payload;
use crate::frame::{self, close_code};
use crate::meter::{Slot, Unit};
use crate::object::{SocketMeta, MAX_ATTACHMENT_BYTES};
use crate::protocol::CloseRequest;
use crate::stats::Traffic;

/// What became of a frame given to [`SocketShared::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    Queued = 0,
    /// The socket is closing or closed; the frame was dropped.
    Dropped = 1,
    /// The queue was past `max_buffered_bytes` when the frame came: everything unsent (but a
    /// frame partly written) was dropped and the socket is being closed with 1008.
    Overflow = 2,
}

impl SendOutcome {
    #[must_use]
    pub fn is_queued(self) -> bool {
        self == Self::Queued
    }
}

/// Frames on their way to the kernel, in order.
#[derive(Debug, Default)]
pub(crate) struct WriteQueue {
    pub(crate) frames: VecDeque<Bytes>,
    /// The first frame was partly written: it must be finished, never dropped, or the stream
    /// would be corrupt.
    pub(crate) front_partial: bool,
}

impl WriteQueue {
    pub(crate) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

/// Most frames given to one vectored write.
const MAX_IOV: usize = 64;

struct Outbox {
    /// The application's frames, not yet taken by the connection task (nor written directly).
    queue: WriteQueue,
    close: Option<CloseRequest>,
    /// Set once a close is queued or the connection ended: later sends are dropped.
    closing: bool,
    /// The connection's descriptor while its task runs (-1 otherwise), for direct writes.
    fd: RawFd,
    /// The connection task has nothing of its own to write: the application thread may write
    /// queued frames to `fd` itself (under this lock) without breaking the order of frames.
    task_idle: bool,
    /// The number of the application thread's batch that queued the last frame (0: none), and
    /// how many frames that batch queued here.
    batch: u32,
    batch_frames: u32,
}

impl Default for Outbox {
    fn default() -> Self {
        Self {
            queue: WriteQueue::default(),
            close: None,
            closing: false,
            fd: -1,
            task_idle: false,
            batch: 0,
            batch_frames: 0,
        }
    }
}

/// With I/O threads, a batch flushes directly only when it touched at most this many sockets;
/// past it the connection tasks write (on the I/O threads, in parallel with the application
/// thread). In single-thread mode there is no other thread to write in parallel: the batch
/// always writes directly.
pub(crate) const DIRECT_FLUSH_MAX_SOCKETS: usize = 64;

/// Writes a batch makes before its end, at a socket's 1st, 2nd, 4th, 8th... frame of the batch.
/// Held to the end, a batch's replies reach a pipelining client all at once: it sends its next
/// messages only then, and the two sides take turns being idle (one connection with 16 messages
/// in flight ran at half the speed it runs when every reply is written at once). Written one
/// by one, a busy server would pay a write per message. Early writes at doubling counts start
/// the client's next messages after the first reply and cost a socket log2(its frames) writes;
/// the budget keeps a batch that touches many sockets (a busy server) to its one write each.
const EARLY_WRITES_PER_BATCH: u32 = 16;

fn now_seconds() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The sockets a batch touched, and how many it may write itself.
struct Batch {
    touched: Vec<Arc<SocketShared>>,
    direct_max: usize,
    /// Its number on this thread, never 0 (an outbox remembers the batch of its last frame).
    number: u32,
    /// How many more early writes it may make ([`EARLY_WRITES_PER_BATCH`]).
    early_left: u32,
}

thread_local! {
    /// Sockets that got frames during the application's current batch of events, or `None`
    /// outside a batch (then every first frame wakes its connection task at once).
    static BATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
    /// The number of this thread's last batch.
    static BATCHES: Cell<u32> = const { Cell::new(0) };
}

/// Starts deferring wake-ups on this thread: frames queued until [`end_batch`] are written by
/// this thread when at most `direct_max` sockets were touched, saving a wake-up of a connection
/// task per message.
pub(crate) fn begin_batch(direct_max: usize) {
    BATCH.with(|batch| {
        let mut batch = batch.borrow_mut();
        if batch.is_none() {
            let number = BATCHES.get().wrapping_add(1).max(1);
            BATCHES.set(number);
            *batch =
                Some(Batch { touched: Vec::new(), direct_max, number, early_left: EARLY_WRITES_PER_BATCH });
        }
    });
}

/// Ends the batch: writes the frames of the sockets it touched, or wakes their tasks.
pub(crate) fn end_batch() {
    let Some(Batch { touched, direct_max, .. }) = BATCH.with(|batch| batch.borrow_mut().take()) else {
        return;
    };
    let direct = touched.len() <= direct_max;
    for socket in touched {
        // The task is woken also after a complete direct write when someone waits for the
        // queue to drain: the task is what reports it.
        if !(direct && socket.write_directly()) || socket.want_drain.load(Ordering::Acquire) {
            socket.wake.notify_one();
        }
    }
}

/// Inside a batch of this thread: notes that `socket` (whose outbox is locked) got a frame, to
/// be written or woken at the end of the batch, and writes it early at its 1st, 2nd, 4th...
/// frame of the batch (see [`EARLY_WRITES_PER_BATCH`]). False outside a batch.
fn defer(socket: &Arc<SocketShared>, outbox: &mut Outbox) -> bool {
    BATCH.with(|batch| {
        let mut batch = batch.borrow_mut();
        let Some(batch) = batch.as_mut() else { return false };
        if outbox.batch != batch.number {
            (outbox.batch, outbox.batch_frames) = (batch.number, 0);
            batch.touched.push(socket.clone());
        }
        outbox.batch_frames += 1;
        if outbox.batch_frames.is_power_of_two()
            && batch.early_left > 0
            && batch.touched.len() <= batch.direct_max
        {
            batch.early_left -= 1;
            socket.write_locked(outbox);
        }
        true
    })
}

pub struct SocketShared {
    id: u64,
    outbox: Mutex<Outbox>,
    /// Wakes the connection task: frames queued on an empty outbox, a close, resume reading.
    pub(crate) wake: Notify,
    /// Bytes of frames queued and not yet written to the kernel.
    buffered: AtomicUsize,
    /// Frames queued and not yet wholly written (each costs [`QUEUED_FRAME_COST`] in memory).
    frames: AtomicUsize,
    paused: AtomicBool,
    want_drain: AtomicBool,
    /// The task is on the event queue's list of sockets waiting for a batch to be handled.
    waiting_app: AtomicBool,
    /// The limits of whoever accepted the socket (the app, or a Durable Object namespace).
    limits: Arc<Limits>,
    /// Tags, attachment, object: boxed, and absent for a socket that never needed them.
    meta: Mutex<Option<Box<SocketMeta>>>,
    /// Who is billed for this socket's messages and bytes; set once, before the upgrade.
    slot: OnceLock<Arc<Slot>>,
    /// An outgoing socket (we are the client): frames we send are masked.
    client: bool,
    /// permessage-deflate, when the handshake negotiated it.
    deflate: Option<Deflate>,
    /// Its own counts of messages and bytes, with the access log on.
    traffic: Option<Box<Traffic>>,
}

impl std::fmt::Debug for SocketShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketShared").field("id", &self.id).finish_non_exhaustive()
    }
}

impl SocketShared {
    #[must_use]
    pub fn new(id: u64, limits: Arc<Limits>) -> Self {
        Self {
            id,
            outbox: Mutex::new(Outbox::default()),
            wake: Notify::new(),
            buffered: AtomicUsize::new(0),
            frames: AtomicUsize::new(0),
            paused: AtomicBool::new(false),
            want_drain: AtomicBool::new(false),
            waiting_app: AtomicBool::new(false),
            limits,
            meta: Mutex::new(None),
            slot: OnceLock::new(),
            client: false,
            deflate: None,
            traffic: None,
        }
    }

    /// The same socket, counting its own traffic (for the access log).
    #[must_use]
    pub fn with_traffic(self) -> Self {
        Self { traffic: Some(Box::default()), ..self }
    }

    /// Its own counts of messages and bytes, when the access log is on.
    #[must_use]
    pub fn traffic(&self) -> Option<&Traffic> {
        self.traffic.as_deref()
    }

    /// The socket is closing (a Close was queued or the connection ended).
    #[must_use]
    pub fn is_closing(&self) -> bool {
        self.outbox.lock().closing
    }

    /// The same socket with permessage-deflate (as negotiated in its handshake).
    #[must_use]
    pub fn with_deflate(self, deflate: Option<Deflate>) -> Self {
        Self { deflate, ..self }
    }

    /// What the handshake negotiated for compression, if anything.
    #[must_use]
    pub fn deflate(&self) -> Option<Deflate> {
        self.deflate
    }

    /// An outgoing socket: we are the client.
    #[must_use]
    pub fn new_client(id: u64, limits: Arc<Limits>) -> Self {
        Self { client: true, ..Self::new(id, limits) }
    }

    #[must_use]
    pub fn is_client(&self) -> bool {
        self.client
    }

    /// The limits this socket is held to.
    #[must_use]
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// What the queued frames hold in memory: their bytes and [`QUEUED_FRAME_COST`] each.
    #[must_use]
    pub fn queued_cost(&self) -> usize {
        self.buffered.load(Ordering::Acquire) + self.frames.load(Ordering::Acquire) * QUEUED_FRAME_COST
    }

    /// Bills this socket's traffic to `slot` from now on (once; later calls are ignored).
    pub fn set_slot(&self, slot: Arc<Slot>) {
        let _ = self.slot.set(slot);
    }

    /// The slot billed for this socket, if any.
    #[must_use]
    pub fn slot(&self) -> Option<&Arc<Slot>> {
        self.slot.get()
    }

    #[must_use]
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Queues one message; never blocks on I/O.
    pub fn send(self: &Arc<Self>, text: bool, data: &[u8]) -> SendOutcome {
        self.send_frame(self.encode(text, data))
    }

    /// One message as this socket sends it (compressed if it was negotiated and worth it,
    /// masked when we are the client).
    #[must_use]
    pub fn encode(&self, text: bool, data: &[u8]) -> Bytes {
        let encoded = match self.deflate {
            Some(deflate) if deflate.compresses(data.len()) => frame::encode_compressed(text, data),
            _ => frame::encode_message(text, data),
        };
        if self.client {
            frame::mask(&encoded)
        } else {
            encoded
        }
    }

    /// The key of the Durable Object this socket belongs to (accepted by it, hibernatable or
    /// not, or opened by it), whose failed commit closes it.
    #[must_use]
    pub fn owner(&self) -> Option<u64> {
        self.meta_if_any().and_then(|meta| meta.owner)
    }

    /// Queues an encoded frame (one encoding may be queued on many sockets).
    pub fn send_frame(self: &Arc<Self>, frame: Bytes) -> SendOutcome {
        let len = frame.len();
        let mut outbox = self.outbox.lock();
        if outbox.closing {
            return SendOutcome::Dropped;
        }
        // The slow-consumer rule: what was already queued when this frame came is held to the
        // limit, so one large message on a short queue goes out, and a pile-up does not.
        if self.queued_cost() > self.limits.max_buffered_bytes {
            self.discard_unsent(&mut outbox.queue);
            outbox.closing = true;
            outbox.close = Some(CloseRequest {
                code: close_code::POLICY_VIOLATION,
                reason: "send buffer limit exceeded".into(),
                discard_unsent: true,
            });
            drop(outbox);
            self.wake.notify_one();
            return SendOutcome::Overflow;
        }
        self.buffered.fetch_add(len, Ordering::AcqRel);
        self.frames.fetch_add(1, Ordering::AcqRel);
        let was_empty = outbox.queue.is_empty();
        outbox.queue.frames.push_back(frame);
        let wake = !defer(self, &mut outbox) && was_empty;
        drop(outbox);
        if let Some(slot) = self.slot.get() {
            slot.add(Unit::MessagesOut, 1);
        }
        if let Some(traffic) = &self.traffic {
            Traffic::add(&traffic.messages_out, 1);
        }
        // The task takes the whole outbox at once, so only the first frame needs a wake-up.
        if wake {
            self.wake.notify_one();
        }
        SendOutcome::Queued
    }

    /// Starts the closing handshake; later sends are dropped. Returns false if already closing.
    pub fn close(&self, code: u16, reason: &str) -> bool {
        let mut outbox = self.outbox.lock();
        if outbox.closing {
            return false;
        }
        outbox.closing = true;
        outbox.close = Some(CloseRequest { code, reason: reason.to_owned(), discard_unsent: false });
        drop(outbox);
        self.wake.notify_one();
        true
    }

    /// Moves the queued frames to the connection's write queue; returns a close request if any.
    pub(crate) fn take_queued(&self, out: &mut WriteQueue) -> Option<CloseRequest> {
        let mut outbox = self.outbox.lock();
        if out.is_empty() && outbox.queue.front_partial {
            out.front_partial = true;
        }
        outbox.queue.front_partial = false;
        if out.is_empty() {
            // The outbox's allocation moves over, so an idle socket keeps no empty queue with
            // capacity on either side.
            std::mem::swap(&mut out.frames, &mut outbox.queue.frames);
        } else {
            out.frames.extend(outbox.queue.frames.drain(..));
        }
        outbox.task_idle = out.is_empty();
        outbox.close.take()
    }

    /// [`Self::take_queued`] for the benchmarks, which run outside the crate.
    #[doc(hidden)]
    pub fn take_queued_for_bench(&self, out: &mut VecDeque<Bytes>) -> Option<CloseRequest> {
        let mut queue = WriteQueue { frames: std::mem::take(out), front_partial: false };
        let close = self.take_queued(&mut queue);
        *out = queue.frames;
        close
    }

    /// Queues a frame of the connection task's own (a pong, a close) on its write queue: no
    /// direct writes until the task has written it.
    pub(crate) fn push_own(&self, queue: &mut WriteQueue, frame: Bytes) {
        if queue.is_empty() {
            self.set_task_busy();
        }
        self.add_frame(frame.len());
        queue.frames.push_back(frame);
    }

    /// Drops the frames of `queue` that have not started going out (a partly written one
    /// stays).
    pub(crate) fn discard_unsent(&self, queue: &mut WriteQueue) {
        let keep = usize::from(queue.front_partial).min(queue.frames.len());
        let mut frames = 0;
        let bytes: usize = queue
            .frames
            .drain(keep..)
            .map(|f| {
                frames += 1;
                f.len()
            })
            .sum();
        self.sub_buffered(bytes);
        self.sub_frames(frames);
    }

    /// Writes `queue` with vectored writes (`write`: non-blocking) until it is empty or the
    /// kernel takes no more, advancing over a frame partly written; the one write loop of both
    /// writers, the connection task and the application thread's direct flush. The bytes
    /// written are counted with `meter` (`Slot::add_io` on an I/O thread, `Slot::add` on the
    /// application thread).
    ///
    /// # Errors
    /// What `write` returns but `WouldBlock`; `WriteZero` when it takes nothing.
    pub(crate) fn write_queue(
        &self,
        queue: &mut WriteQueue,
        meter: fn(&Slot, Unit, u64),
        mut write: impl FnMut(&[IoSlice<'_>]) -> io::Result<usize>,
    ) -> io::Result<()> {
        while !queue.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let mut count = 0;
            for (slot, frame) in slices.iter_mut().zip(queue.frames.iter()) {
                *slot = IoSlice::new(frame);
                count += 1;
            }
            let mut written = match write(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => written,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            self.sub_buffered(written);
            if let Some(slot) = self.slot.get() {
                meter(slot, Unit::BytesOut, written as u64);
            }
            if let Some(traffic) = &self.traffic {
                Traffic::add(&traffic.bytes_out, written as u64);
            }
            let mut whole = 0;
            while written > 0 {
                let front = queue.frames.front_mut().expect("written bytes come from the queue");
                if written >= front.len() {
                    written -= front.len();
                    queue.frames.pop_front();
                    whole += 1;
                    queue.front_partial = false;
                } else {
                    front.advance(written);
                    queue.front_partial = true;
                    written = 0;
                }
            }
            self.sub_frames(whole);
        }
        if queue.is_empty() {
            // Written out: an idle socket keeps no empty queue with capacity (a jemalloc thread
            // cache makes the next one cheap).
            queue.frames = VecDeque::new();
        }
        Ok(())
    }

    /// The connection task has frames of its own to write (a pong, a close): no direct writes
    /// until it is idle again.
    pub(crate) fn set_task_busy(&self) {
        self.outbox.lock().task_idle = false;
    }

    /// The connection task has written everything it had.
    pub(crate) fn set_task_idle(&self) {
        let mut outbox = self.outbox.lock();
        outbox.task_idle = outbox.queue.is_empty();
    }

    /// Lets the application thread write to `fd` while the task is idle (`None`: never again,
    /// before the descriptor is closed).
    pub(crate) fn set_fd(&self, fd: Option<RawFd>) {
        let mut outbox = self.outbox.lock();
        outbox.fd = fd.unwrap_or(-1);
        outbox.task_idle = fd.is_some() && outbox.queue.is_empty();
    }

    /// Writes the queued frames from this thread when the task is idle. Returns false when the
    /// task must be woken (it is busy, a close is pending, or the kernel did not take it all).
    fn write_directly(&self) -> bool {
        self.write_locked(&mut self.outbox.lock())
    }

    /// [`Self::write_directly`] with the outbox locked.
    fn write_locked(&self, outbox: &mut Outbox) -> bool {
        if !outbox.task_idle || outbox.fd < 0 || outbox.closing || outbox.queue.is_empty() {
            return outbox.queue.is_empty() && outbox.close.is_none();
        }
        let fd = outbox.fd;
        let written = self.write_queue(&mut outbox.queue, Slot::add, |slices| {
            let iov_count = i32::try_from(slices.len()).expect("at most MAX_IOV slices");
            // SAFETY: `fd` is the open descriptor of the connection: it is reset to -1 under
            // the outbox lock (held here) before the task closes it. IoSlice has the layout of
            // iovec. MSG_DONTWAIT makes this never block; MSG_NOSIGNAL turns a dead peer into
            // EPIPE instead of SIGPIPE.
            let written = unsafe {
                let header = libc::msghdr {
                    msg_name: std::ptr::null_mut(),
                    msg_namelen: 0,
                    msg_iov: slices.as_ptr().cast_mut().cast(),
                    msg_iovlen: iov_count as _,
                    msg_control: std::ptr::null_mut(),
                    msg_controllen: 0,
                    msg_flags: 0,
                };
                libc::sendmsg(fd, &raw const header, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            };
            usize::try_from(written).map_err(|_| io::Error::last_os_error())
        });
        // An error: the task finds out and handles it.
        written.is_ok() && outbox.queue.is_empty()
    }

    /// The state that survives hibernation, made on first use.
    pub fn meta(&self) -> parking_lot::MappedMutexGuard<'_, SocketMeta> {
        parking_lot::MutexGuard::map(self.meta.lock(), |meta| &mut **meta.get_or_insert_with(Box::default))
    }

    /// The state that survives hibernation, if any was ever set.
    pub fn meta_if_any(&self) -> Option<parking_lot::MappedMutexGuard<'_, SocketMeta>> {
        parking_lot::MutexGuard::try_map(self.meta.lock(), |meta| meta.as_deref_mut()).ok()
    }

    /// The connection is open and no close has been queued.
    #[must_use]
    pub fn is_open(&self) -> bool {
        !self.outbox.lock().closing
    }

    /// No more frames will be written (the connection is closing or gone).
    pub(crate) fn mark_closing(&self) {
        self.outbox.lock().closing = true;
    }

    /// The connection task queued a frame of its own (`len` bytes).
    pub(crate) fn add_frame(&self, len: usize) {
        self.buffered.fetch_add(len, Ordering::AcqRel);
        self.frames.fetch_add(1, Ordering::AcqRel);
    }

    /// `frames` whole frames were written or dropped.
    pub(crate) fn sub_frames(&self, frames: usize) {
        self.frames.fetch_sub(frames, Ordering::AcqRel);
    }

    pub(crate) fn sub_buffered(&self, len: usize) {
        self.buffered.fetch_sub(len, Ordering::AcqRel);
    }

    /// Marks the task as on the event queue's waiting list; false if it was not already.
    pub(crate) fn set_waiting_app(&self) -> bool {
        self.waiting_app.swap(true, Ordering::AcqRel)
    }

    pub(crate) fn clear_waiting_app(&self) {
        self.waiting_app.store(false, Ordering::Release);
    }

    #[must_use]
    pub fn buffered_amount(&self) -> usize {
        self.buffered.load(Ordering::Acquire)
    }

    /// Stops (or resumes) reading from the peer: backpressure for the pull API.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Release);
        if !paused {
            self.wake.notify_one();
        }
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    #[must_use]
    pub fn high_water(&self) -> usize {
        self.limits.send_high_water()
    }

    /// Asks for an `Event::Drained` once the queue falls to the low-water mark. Returns false
    /// (and asks nothing) when it is already there.
    pub fn request_drain(&self) -> bool {
        self.want_drain.store(true, Ordering::Release);
        if self.buffered_amount() <= self.limits.send_low_water() {
            self.want_drain.store(false, Ordering::Release);
            return false;
        }
        true
    }

    /// True once per request, when the queue has fallen to the low-water mark.
    pub(crate) fn take_drained(&self) -> bool {
        self.buffered_amount() <= self.limits.send_low_water()
            && self.want_drain.swap(false, Ordering::AcqRel)
    }
}

/// The hibernation side of a socket: its tags, attachment and its object's auto-responses.
impl SocketShared {
    /// Answers `message` from its object's auto-response pairs, stamping the socket.
    pub(crate) fn auto_response(&self, message: &Payload) -> Option<Bytes> {
        let mut meta = self.meta_if_any()?;
        let frame = meta.object.as_ref()?.auto_response(message)?;
        meta.auto_response_at = Some(now_seconds());
        Some(frame)
    }

    pub(crate) fn has_tag(&self, tag: Option<&str>) -> bool {
        tag.is_none_or(|tag| self.meta_if_any().is_some_and(|m| m.tags.iter().any(|t| t == tag)))
    }

    /// Stores the serialized attachment (at most 16 KiB).
    ///
    /// # Errors
    /// `InvalidArgument` past 16 KiB.
    pub fn set_attachment(&self, attachment: Option<Bytes>) -> Result<(), CoreError> {
        if attachment.as_ref().is_some_and(|a| a.len() > MAX_ATTACHMENT_BYTES) {
            return Err(CoreError::InvalidArgument(format!(
                "a serialized attachment is at most {MAX_ATTACHMENT_BYTES} bytes"
            )));
        }
        self.meta().attachment = attachment;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn limits(max_buffered_bytes: usize) -> Arc<Limits> {
        Arc::new(Limits { max_buffered_bytes, ..Limits::default() })
    }

    #[test]
    fn overflow_discards_unsent_and_closes_with_1008() {
        let socket = Arc::new(SocketShared::new(1, limits(200)));
        assert_eq!(socket.send(false, &[0; 40]), SendOutcome::Queued);
        assert_eq!(socket.buffered_amount(), 42);
        assert_eq!(socket.queued_cost(), 42 + QUEUED_FRAME_COST);
        assert_eq!(socket.send(false, &[0; 40]), SendOutcome::Queued);
        assert_eq!(socket.send(false, &[0; 40]), SendOutcome::Overflow);
        assert_eq!((socket.buffered_amount(), socket.queued_cost()), (0, 0));
        assert_eq!(socket.send(false, b"late"), SendOutcome::Dropped);
        let mut out = WriteQueue::default();
        let close = socket.take_queued(&mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!((close.code, close.discard_unsent), (1008, true));
    }

    #[test]
    fn one_message_larger_than_the_limit_goes_out_on_a_short_queue() {
        let socket = Arc::new(SocketShared::new(1, limits(1000)));
        assert_eq!(socket.send(false, &[0; 5000]), SendOutcome::Queued);
        assert_eq!(socket.send(false, b"next"), SendOutcome::Overflow, "but nothing piles up behind it");
    }

    #[test]
    fn small_frames_are_counted_at_what_they_hold() {
        let socket = Arc::new(SocketShared::new(1, limits(64 * 1024)));
        let mut sent = 0;
        while socket.send(false, b"x").is_queued() {
            sent += 1;
        }
        // 3 bytes on the wire each, but ~67 in memory: the limit stops ~1,000, not ~21,000.
        assert!((900..1100).contains(&sent), "{sent} one-byte frames queued");
    }

    #[test]
    fn close_is_taken_once_and_stops_sends() {
        let socket = Arc::new(SocketShared::new(1, limits(1000)));
        assert_eq!(socket.send(true, b"a"), SendOutcome::Queued);
        assert!(socket.close(1000, "bye"));
        assert!(!socket.close(1001, "again"));
        assert_eq!(socket.send(true, b"b"), SendOutcome::Dropped);
        let mut out = WriteQueue::default();
        let close = socket.take_queued(&mut out).unwrap();
        assert_eq!((out.frames.len(), close.code, close.reason.as_str()), (1, 1000, "bye"));
        assert!(socket.take_queued(&mut out).is_none());
    }

    /// Sockets whose other ends are readable here, writable directly as an idle task's would be.
    /// (Each tuple holds our end too, closed when it is dropped.)
    fn connected(count: usize) -> Vec<(Arc<SocketShared>, UnixStream, UnixStream)> {
        (0..count)
            .map(|i| {
                let (ours, theirs) = UnixStream::pair().unwrap();
                theirs.set_nonblocking(true).unwrap();
                let socket = Arc::new(SocketShared::new(i as u64, limits(1 << 20)));
                socket.set_fd(Some(std::os::fd::AsRawFd::as_raw_fd(&ours)));
                (socket, theirs, ours)
            })
            .collect()
    }

    /// How many one-byte text frames (3 bytes each) can be read from `peer` now.
    fn frames_arrived(peer: &mut UnixStream) -> usize {
        let mut buf = [0; 4096];
        match io::Read::read(peer, &mut buf) {
            Ok(n) => n / 3,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn a_batch_writes_a_socket_early_at_its_first_second_fourth_frame() {
        let mut sockets = connected(1);
        let (socket, peer, _) = &mut sockets[0];
        begin_batch(usize::MAX);
        let mut arrived = Vec::new();
        for _ in 0..12 {
            assert_eq!(socket.send(true, b"x"), SendOutcome::Queued);
            arrived.push(frames_arrived(peer));
        }
        end_batch();
        // Written at the 1st, 2nd, 4th and 8th frame, the rest at the end of the batch.
        assert_eq!(arrived, [1, 1, 0, 2, 0, 0, 0, 4, 0, 0, 0, 0]);
        assert_eq!(frames_arrived(peer), 4);
        // A new batch starts counting again.
        begin_batch(usize::MAX);
        assert_eq!(socket.send(true, b"x"), SendOutcome::Queued);
        assert_eq!(frames_arrived(peer), 1);
        end_batch();
    }

    #[test]
    fn a_batch_that_touches_many_sockets_writes_each_once_past_its_budget() {
        let count = EARLY_WRITES_PER_BATCH as usize + 4;
        let mut sockets = connected(count);
        begin_batch(usize::MAX);
        let arrived: Vec<usize> = sockets
            .iter_mut()
            .map(|(socket, peer, _)| {
                assert_eq!(socket.send(true, b"x"), SendOutcome::Queued);
                frames_arrived(peer)
            })
            .collect();
        let early = arrived.iter().filter(|&&n| n == 1).count();
        assert_eq!(early, EARLY_WRITES_PER_BATCH as usize, "{arrived:?}");
        end_batch();
        let late: Vec<usize> = sockets.iter_mut().map(|(_, peer, _)| frames_arrived(peer)).collect();
        assert_eq!(late.iter().sum::<usize>(), 4, "the rest at the end of the batch: {late:?}");
    }

    #[test]
    fn drain_request_fires_only_below_low_water() {
        let socket = SocketShared::new(1, limits(1000));
        assert!(!socket.request_drain(), "an empty queue is already drained");
        socket.add_frame(socket.high_water());
        assert!(socket.request_drain());
        assert!(!socket.take_drained());
        socket.sub_buffered(socket.high_water());
        assert!(socket.take_drained());
        assert!(!socket.take_drained(), "once per request");
    }
}
