//! The queue of events from the I/O threads to the one Python thread, and its wake-up.
//! An eventfd is written only when the queue goes from empty to non-empty: one wake-up per batch.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

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

/// An eventfd the application thread polls (`loop.add_reader`): readable once woken, until
/// consumed. Queues write it only when they go from empty to non-empty.
pub struct Wakeup(OwnedFd);

impl Wakeup {
    /// # Errors
    /// When the eventfd cannot be created.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no memory preconditions; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    #[must_use]
    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    pub fn wake(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64. It can only fail when the counter would
        // overflow, and then the descriptor is readable anyway.
        unsafe {
            libc::write(self.fd(), std::ptr::from_ref(&one).cast(), 8);
        }
    }

    /// Makes the descriptor unreadable until the next `wake`. Consume before taking what is
    /// queued, so that anything queued after the take wakes the reader again.
    pub fn consume(&self) {
        let mut counter = 0u64;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN (nothing to consume) is fine.
        unsafe {
            libc::read(self.fd(), std::ptr::from_mut(&mut counter).cast(), 8);
        }
    }
}

pub struct EventQueue {
    events: Mutex<Vec<Event>>,
    wakeup: Wakeup,
}

impl EventQueue {
    /// # Errors
    /// When the eventfd cannot be created.
    pub fn new() -> io::Result<Self> {
        Ok(Self { events: Mutex::new(Vec::new()), wakeup: Wakeup::new()? })
    }

    /// The descriptor that becomes readable when events are waiting.
    #[must_use]
    pub fn fd(&self) -> RawFd {
        self.wakeup.fd()
    }

    pub fn push(&self, event: Event) {
        let was_empty = {
            let mut events = self.events.lock();
            let was_empty = events.is_empty();
            events.push(event);
            was_empty
        };
        if was_empty {
            self.wakeup.wake();
        }
    }

    /// Pushes several events under one lock and at most one wake-up.
    pub fn push_all(&self, batch: &mut Vec<Event>) {
        if batch.is_empty() {
            return;
        }
        let was_empty = {
            let mut events = self.events.lock();
            let was_empty = events.is_empty();
            if was_empty {
                std::mem::swap(&mut *events, batch);
            } else {
                events.append(batch);
            }
            was_empty
        };
        if was_empty {
            self.wakeup.wake();
        }
    }

    /// Takes every waiting event. The wake-up is consumed first, so an event pushed after the
    /// swap always writes the eventfd again and is never left without a wake-up.
    pub fn drain(&self) -> Vec<Event> {
        self.wakeup.consume();
        std::mem::take(&mut *self.events.lock())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn readable(fd: RawFd) -> bool {
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
}
