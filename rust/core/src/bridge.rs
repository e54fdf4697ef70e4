//! The queue of events from the I/O threads to the one Python thread, and its wake-up.
//! An eventfd is written only when the queue goes from empty to non-empty: one wake-up per batch.
//! Batches are numbered, so a connection can tell when the application has handled what it
//! pushed (to hold back reading, or its Close, until then) without a look-up per message.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::server::PendingRequest;

/// A WebSocket message as the application sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// Valid UTF-8, checked by the core.
    Text(Bytes),
    Binary(Bytes),
}

/// Everything the core tells the application.
#[derive(Debug)]
pub enum Event {
    /// An HTTP request (possibly a WebSocket upgrade) waiting for its answer.
    Request(PendingRequest),
    Message {
        socket: u64,
        data: Payload,
        /// The address of the socket's meter slot (0: none): tells runs of events of one slot
        /// apart without touching the slot's reference count on the I/O thread.
        slot: usize,
    },
    /// The socket is closed; always the last event of a socket, sent exactly once.
    Close {
        socket: u64,
        code: u16,
        reason: String,
        was_clean: bool,
        /// The socket itself when it belonged to a Durable Object.
        object_socket: Option<std::sync::Arc<crate::socket::SocketShared>>,
        slot: Option<std::sync::Arc<crate::meter::Slot>>,
    },
    /// Something went wrong on the socket (a protocol violation, an I/O error); a Close follows.
    Error { socket: u64, message: String, slot: Option<std::sync::Arc<crate::meter::Slot>> },
    /// The send queue fell below the low-water mark after `SocketShared::request_drain`.
    Drained { socket: u64 },
    /// During shutdown, the last socket has closed.
    AllClosed,
    /// The outcome of `Server::connect`: the new outgoing socket and its subprotocol, or why not.
    Connected { token: u64, result: Result<(std::sync::Arc<crate::socket::SocketShared>, String), String> },
}

pub struct EventQueue {
    events: Mutex<Vec<Event>>,
    wakeup: OwnedFd,
    /// Batches taken by `drain` so far (written under the `events` lock).
    drains: AtomicU64,
    /// Batches the application has finished handling (`batch_done`).
    processed: AtomicU64,
    /// Sockets whose task waits for the application to finish a batch.
    waiting: Mutex<Vec<Arc<crate::socket::SocketShared>>>,
}

impl EventQueue {
    /// # Errors
    /// When the eventfd cannot be created.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no memory preconditions; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let wakeup = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            events: Mutex::new(Vec::new()),
            wakeup,
            drains: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            waiting: Mutex::new(Vec::new()),
        })
    }

    /// The descriptor that becomes readable when events are waiting.
    #[must_use]
    pub fn fd(&self) -> RawFd {
        self.wakeup.as_raw_fd()
    }

    pub fn push(&self, event: Event) {
        let was_empty = {
            let mut events = self.events.lock();
            let was_empty = events.is_empty();
            events.push(event);
            was_empty
        };
        if was_empty {
            self.wake();
        }
    }

    /// Pushes several events under one lock and at most one wake-up. Returns the number of the
    /// batch they will be handled in (see [`Self::is_processed`]).
    pub fn push_all(&self, batch: &mut Vec<Event>) -> u64 {
        let (was_empty, number) = {
            let mut events = self.events.lock();
            let number = self.drains.load(Ordering::Relaxed) + 1;
            if batch.is_empty() {
                return number;
            }
            let was_empty = events.is_empty();
            if was_empty {
                std::mem::swap(&mut *events, batch);
            } else {
                events.append(batch);
            }
            (was_empty, number)
        };
        if was_empty {
            self.wake();
        }
        number
    }

    /// The application has finished handling batch `number`.
    #[must_use]
    pub fn is_processed(&self, number: u64) -> bool {
        self.processed.load(Ordering::Acquire) >= number
    }

    /// Like [`Self::is_processed`]; when not, `socket`'s task is woken once it is.
    pub(crate) fn wake_when_processed(&self, number: u64, socket: &Arc<crate::socket::SocketShared>) -> bool {
        let mut waiting = self.waiting.lock();
        // Checked under the lock `batch_done` takes after it counts the batch: no lost wake-up.
        if self.is_processed(number) {
            return true;
        }
        if !socket.set_waiting_app() {
            waiting.push(socket.clone());
        }
        false
    }

    /// Called by the application thread when it has handled the batch `drain` gave it (and
    /// queued what its handlers sent): wakes the sockets that waited for it.
    pub fn batch_done(&self) {
        self.processed.store(self.drains.load(Ordering::Acquire), Ordering::Release);
        let waiting = std::mem::take(&mut *self.waiting.lock());
        for socket in waiting {
            socket.clear_waiting_app();
            socket.wake.notify_one();
        }
    }

    /// Takes every waiting event. The wake-up is consumed first, so an event pushed after the
    /// swap always writes the eventfd again and is never left without a wake-up.
    pub fn drain(&self) -> Vec<Event> {
        let mut counter = 0u64;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN (nothing to consume) is fine.
        unsafe {
            libc::read(self.fd(), std::ptr::from_mut(&mut counter).cast(), 8);
        }
        let mut events = self.events.lock();
        self.drains.fetch_add(1, Ordering::AcqRel);
        std::mem::take(&mut *events)
    }

    fn wake(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64. It can only fail when the counter would
        // overflow, and then the descriptor is readable anyway.
        unsafe {
            libc::write(self.fd(), std::ptr::from_ref(&one).cast(), 8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: RawFd) -> bool {
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&raw mut pfd, 1, 0) == 1 }
    }

    #[test]
    fn one_wakeup_per_batch_and_none_lost() {
        let q = EventQueue::new().unwrap();
        assert!(!readable(q.fd()));
        q.push(Event::Drained { socket: 1 });
        q.push(Event::Drained { socket: 2 });
        assert!(readable(q.fd()));
        assert_eq!(q.drain().len(), 2);
        assert!(!readable(q.fd()));
        let mut batch = vec![Event::Drained { socket: 3 }, Event::AllClosed];
        q.push_all(&mut batch);
        assert!(batch.is_empty());
        assert!(readable(q.fd()));
        assert_eq!(q.drain().len(), 2);
        assert!(q.drain().is_empty());
    }

    #[test]
    fn batches_are_numbered_and_processed_in_order() {
        let q = EventQueue::new().unwrap();
        let number = q.push_all(&mut vec![Event::Drained { socket: 1 }]);
        assert!(!q.is_processed(number));
        let _ = q.drain();
        assert!(!q.is_processed(number), "drained is not handled yet");
        q.batch_done();
        assert!(q.is_processed(number));
        assert_eq!(q.push_all(&mut vec![Event::AllClosed]), number + 1);
    }
}
