//! The queues from the I/O threads to the one application thread, and their wake-up (the bottom
//! layer: it knows nothing of what they carry). An eventfd is written only when a queue goes
//! from empty to non-empty: one wake-up per batch. In single-thread mode the application
//! thread's reactor polls the queue itself and is woken through a waker instead (no eventfd
//! write or read per batch; see `reactor`). Batches are numbered, so a producer can tell
//! when the application has handled what it pushed (to hold back reading, or a Close, until
//! then) without a look-up per message.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::task::Waker;
use std::time::Duration;

use parking_lot::Mutex;

use crate::stats::monotonic_ns;

/// An eventfd the application thread polls (`loop.add_reader`): readable once woken, until
/// consumed. Queues write it only when they go from empty to non-empty. Once a reactor polls
/// it ([`Self::register`]), wake-ups go to the reactor's waker and the eventfd is left alone:
/// its number only names the queue to the event loop.
pub struct Wakeup {
    fd: OwnedFd,
    waker: OnceLock<Mutex<Option<Waker>>>,
}

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
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd) }, waker: OnceLock::new() })
    }

    #[must_use]
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// From now on, wake-ups wake `waker` (the reactor that polls this queue) instead of
    /// writing the eventfd. Call it before checking whether anything is queued.
    pub fn register(&self, waker: &Waker) {
        let mut slot = self.waker.get_or_init(|| Mutex::new(None)).lock();
        if !slot.as_ref().is_some_and(|current| current.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    pub fn wake(&self) {
        if let Some(slot) = self.waker.get() {
            if let Some(waker) = &*slot.lock() {
                waker.wake_by_ref();
            }
            return;
        }
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
        if self.waker.get().is_some() {
            return; // never written
        }
        let mut counter = 0u64;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN (nothing to consume) is fine.
        unsafe {
            libc::read(self.fd(), std::ptr::from_mut(&mut counter).cast(), 8);
        }
    }
}

/// A queue of `T` from any thread to the one application thread, with its wake-up and the
/// numbers of its batches.
pub struct EventQueue<T> {
    events: Mutex<Vec<T>>,
    wakeup: Wakeup,
    /// Batches taken by `drain` so far (written under the `events` lock).
    drains: AtomicU64,
    /// Batches the application has finished handling (`mark_processed`).
    processed: AtomicU64,
    /// When the queue last went from empty to non-empty (`stats::monotonic_ns`), for the lag
    /// of the application thread: written once per batch, under the `events` lock.
    first_queued_ns: AtomicU64,
}

impl<T> EventQueue<T> {
    /// # Errors
    /// When the eventfd cannot be created.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            events: Mutex::new(Vec::new()),
            wakeup: Wakeup::new()?,
            drains: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            first_queued_ns: AtomicU64::new(0),
        })
    }

    /// The descriptor that becomes readable when events are waiting.
    #[must_use]
    pub fn fd(&self) -> RawFd {
        self.wakeup.fd()
    }

    /// For a reactor polling the queue: true if events wait, else `waker` is woken when the
    /// queue goes from empty to non-empty (see [`Wakeup::register`]).
    pub fn poll_ready(&self, waker: &Waker) -> bool {
        self.wakeup.register(waker);
        !self.events.lock().is_empty()
    }

    pub fn push(&self, event: T) {
        let was_empty = {
            let mut events = self.events.lock();
            let was_empty = events.is_empty();
            if was_empty {
                self.first_queued_ns.store(monotonic_ns(), Ordering::Relaxed);
            }
            events.push(event);
            was_empty
        };
        if was_empty {
            self.wakeup.wake();
        }
    }

    /// Pushes several events under one lock and at most one wake-up. Returns the number of the
    /// batch they will be handled in (see [`Self::is_processed`]).
    pub fn push_all(&self, batch: &mut Vec<T>) -> u64 {
        let (was_empty, number) = {
            let mut events = self.events.lock();
            let number = self.drains.load(Ordering::Relaxed) + 1;
            if batch.is_empty() {
                return number;
            }
            let was_empty = events.is_empty();
            if was_empty {
                self.first_queued_ns.store(monotonic_ns(), Ordering::Relaxed);
                std::mem::swap(&mut *events, batch);
            } else {
                events.append(batch);
            }
            (was_empty, number)
        };
        if was_empty {
            self.wakeup.wake();
        }
        number
    }

    /// The application has finished handling batch `number`.
    #[must_use]
    pub fn is_processed(&self, number: u64) -> bool {
        self.processed.load(Ordering::Acquire) >= number
    }

    /// The number of the last batch `drain` gave out.
    #[must_use]
    pub fn last_drained(&self) -> u64 {
        self.drains.load(Ordering::Acquire)
    }

    /// The application has handled every batch up to `number`.
    pub fn mark_processed(&self, number: u64) {
        self.processed.fetch_max(number, Ordering::AcqRel);
    }

    /// Takes every waiting event. The wake-up is consumed first, so an event pushed after the
    /// swap always writes the eventfd again and is never left without a wake-up.
    pub fn drain(&self) -> Vec<T> {
        self.drain_timed().0
    }

    /// [`Self::drain`], and how long ago the first of the events was queued (`None` when there
    /// were none).
    pub fn drain_timed(&self) -> (Vec<T>, Option<Duration>) {
        self.wakeup.consume();
        let mut events = self.events.lock();
        self.drains.fetch_add(1, Ordering::AcqRel);
        let taken = std::mem::take(&mut *events);
        // (Read under the lock: a push after it starts a new batch with a new time.)
        let queued = self.first_queued_ns.load(Ordering::Relaxed);
        drop(events);
        let lag = (!taken.is_empty()).then(|| Duration::from_nanos(monotonic_ns().saturating_sub(queued)));
        (taken, lag)
    }

    /// Events waiting now.
    #[must_use]
    pub fn len(&self) -> usize {
        self.events.lock().len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        let q = EventQueue::<u32>::new().unwrap();
        assert!(!readable(q.fd()));
        q.push(1);
        q.push(2);
        assert!(readable(q.fd()));
        assert_eq!(q.drain().len(), 2);
        assert!(!readable(q.fd()));
        let mut batch = vec![3, 4];
        q.push_all(&mut batch);
        assert!(batch.is_empty());
        assert!(readable(q.fd()));
        assert_eq!(q.drain().len(), 2);
        assert!(q.drain().is_empty());
    }

    #[test]
    fn batches_are_numbered_and_processed_in_order() {
        let q = EventQueue::<u32>::new().unwrap();
        let number = q.push_all(&mut vec![1]);
        assert!(!q.is_processed(number));
        let _ = q.drain();
        assert!(!q.is_processed(number), "drained is not handled yet");
        q.mark_processed(q.last_drained());
        assert!(q.is_processed(number));
        assert_eq!(q.push_all(&mut vec![2]), number + 1);
    }
}
