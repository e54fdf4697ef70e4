//! The queue from the I/O threads to the one application thread, and its wake-up (the bottom
//! layer: it knows nothing of what it carries).
//! An eventfd is written only when the queue goes from empty to non-empty: one wake-up per batch.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use parking_lot::Mutex;

/// A queue of `T` from any thread to the one application thread, with its wake-up descriptor.
pub struct EventQueue<T> {
    events: Mutex<Vec<T>>,
    wakeup: OwnedFd,
}

impl<T> EventQueue<T> {
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
        Ok(Self { events: Mutex::new(Vec::new()), wakeup })
    }

    /// The descriptor that becomes readable when events are waiting.
    #[must_use]
    pub fn fd(&self) -> RawFd {
        self.wakeup.as_raw_fd()
    }

    pub fn push(&self, event: T) {
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

    /// Pushes several events under one lock and at most one wake-up.
    pub fn push_all(&self, batch: &mut Vec<T>) {
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
            self.wake();
        }
    }

    /// Takes every waiting event. The wake-up is consumed first, so an event pushed after the
    /// swap always writes the eventfd again and is never left without a wake-up.
    pub fn drain(&self) -> Vec<T> {
        let mut counter = 0u64;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN (nothing to consume) is fine.
        unsafe {
            libc::read(self.fd(), std::ptr::from_mut(&mut counter).cast(), 8);
        }
        std::mem::take(&mut *self.events.lock())
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
}
