//! The single-thread mode (`io_threads = 0`): the application thread drives the server's sockets
//! itself, from its event loop. A [`Reactor`] is a current-thread tokio runtime together with the
//! descriptors the event loop watches; [`Reactor::select`], called as the loop's selector, runs
//! the runtime (sockets, timers and those descriptors, all in tokio's one epoll) until one of
//! them is ready or an event queue has events, and returns what is ready. One `epoll_wait` per
//! loop iteration, no second thread and no hand-off between threads.
//!
//! The event loop expects level-triggered readiness (a descriptor it did not drain is reported
//! again); tokio's is edge-triggered. So a descriptor reported ready has its readiness cleared
//! and is checked again with one `poll(2)` at the next `select`: reported again if still ready,
//! and left to the next edge if not. Event queues are not descriptors at all here: the reactor
//! polls them and they wake it through a waker (no eventfd write and read per batch); their
//! eventfd's number only names them to the event loop.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::runtime::{Handle, Runtime};

use crate::bridge::EventQueue;

/// As `selectors.EVENT_READ` and `selectors.EVENT_WRITE`.
pub const READABLE: u8 = 1;
pub const WRITABLE: u8 = 2;
/// Added to [`READABLE`] when the ready descriptor names a [`Source`] (an event queue), not a
/// descriptor of the loop's own: the loop may run its reader at once (see `sockworker._loop`).
pub const SOURCE: u8 = 4;

/// Something the reactor reports as a readable descriptor although it is not one.
pub trait Source: Send + Sync {
    /// True if ready now; else `waker` is woken once it is.
    fn poll_ready(&self, waker: &Waker) -> bool;
}

impl<T: Send> Source for EventQueue<T> {
    fn poll_ready(&self, waker: &Waker) -> bool {
        EventQueue::poll_ready(self, waker)
    }
}

/// A descriptor owned by the event loop: registering it must not close it.
struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

struct Watched {
    /// What the event loop wants to hear of ([`READABLE`], [`WRITABLE`]).
    events: u8,
    /// Its registration with the runtime; `None` for a [`Source`]'s descriptor.
    io: Option<AsyncFd<Fd>>,
}

struct State {
    runtime: Runtime,
    watched: HashMap<RawFd, Watched>,
    /// Reported ready by the last `select` (their readiness cleared): checked again at the next.
    reported: Vec<RawFd>,
    /// The last `select` returned without running the runtime (something was ready at once):
    /// the next one runs it first, so that sockets are never starved.
    starved: bool,
    /// What was ready, reused from one `select` to the next.
    ready: Vec<(RawFd, u8)>,
}

/// The application thread's reactor (see the module's documentation).
pub struct Reactor {
    state: Mutex<State>,
    sources: Mutex<Vec<(RawFd, Arc<dyn Source>)>>,
    /// The server using the runtime stopped while a `select` ran: its tasks go before the next.
    reset_pending: AtomicBool,
}

fn build() -> io::Result<Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

fn register(runtime: &Runtime, fd: RawFd) -> io::Result<AsyncFd<Fd>> {
    let _entered = runtime.enter();
    // Both interests, whatever the loop asked for: changing what it watches then costs no
    // system call (an unwanted edge is ignored).
    // SAFETY: the event loop keeps `fd` open while it is watched: it stops watching a
    // descriptor before it closes it (as it must with any epoll selector, which would otherwise
    // deregister whatever reuses the number, as this would).
    unsafe { AsyncFd::register_with_interest(Fd(fd), Interest::READABLE | Interest::WRITABLE) }
        .map_err(io::Error::from)
}

fn in_use() -> io::Error {
    io::Error::other("the reactor is selecting on another thread")
}

impl Reactor {
    /// # Errors
    /// When the runtime cannot be built.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            state: Mutex::new(State {
                runtime: build()?,
                watched: HashMap::new(),
                reported: Vec::new(),
                starved: false,
                ready: Vec::new(),
            }),
            sources: Mutex::new(Vec::new()),
            reset_pending: AtomicBool::new(false),
        })
    }

    /// The runtime's handle, for a server to spawn its tasks on.
    ///
    /// # Errors
    /// When called during a `select` (from another thread).
    pub fn handle(&self) -> io::Result<Handle> {
        let state = self.state.try_lock().ok_or_else(in_use)?;
        Ok(state.runtime.handle().clone())
    }

    /// Reports `fd` readable while `source` is ready (once the loop registers `fd`).
    pub fn attach(&self, fd: RawFd, source: Arc<dyn Source>) {
        self.sources.lock().push((fd, source));
        if let Some(mut state) = self.state.try_lock() {
            if let Some(watched) = state.watched.get_mut(&fd) {
                watched.io = None;
            }
        }
    }

    /// Forgets the source of `fd`, and the tasks of the server that used the runtime: they are
    /// dropped (their sockets closed) now, or before the next `select` if one runs now.
    pub fn release(&self, fd: RawFd) {
        self.sources.lock().retain(|(source_fd, _)| *source_fd != fd);
        self.reset_pending.store(true, Ordering::Release);
        if let Some(mut state) = self.state.try_lock() {
            self.reset(&mut state);
        }
    }

    /// A fresh runtime in place of the old one (whose tasks are dropped), with the loop's
    /// descriptors registered in it.
    fn reset(&self, state: &mut State) {
        if !self.reset_pending.swap(false, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = build() else {
            log::error!("could not build a new runtime; the stopped server's sockets stay open");
            return;
        };
        for watched in state.watched.values_mut() {
            // Deregistered while the old runtime is still alive, then registered anew.
            drop(watched.io.take());
        }
        std::mem::replace(&mut state.runtime, runtime).shutdown_background();
        state.reported.clear();
        for (fd, watched) in &mut state.watched {
            if !self.is_source(*fd) {
                watched.io = register(&state.runtime, *fd).ok();
            }
        }
    }

    fn is_source(&self, fd: RawFd) -> bool {
        self.sources.lock().iter().any(|(source_fd, _)| *source_fd == fd)
    }

    /// The loop watches `fd` for `events` from now on (or no longer, with 0).
    ///
    /// # Errors
    /// What registering it with epoll says (`EPERM` for a regular file, as `EpollSelector`),
    /// or when called during a `select` from another thread.
    pub fn watch(&self, fd: RawFd, events: u8) -> io::Result<()> {
        let mut state = self.state.try_lock().ok_or_else(in_use)?;
        if events == 0 {
            state.watched.remove(&fd);
            state.reported.retain(|reported| *reported != fd);
            return Ok(());
        }
        if let Some(watched) = state.watched.get_mut(&fd) {
            watched.events = events;
            return Ok(());
        }
        let io = if self.is_source(fd) { None } else { Some(register(&state.runtime, fd)?) };
        state.watched.insert(fd, Watched { events, io });
        Ok(())
    }

    /// Runs the runtime until a watched descriptor or a source is ready, or `timeout` passes
    /// (`None`: no limit; zero: run what is ready, without waiting). Returns the descriptors
    /// ready, each with what it is ready for.
    ///
    /// # Errors
    /// When called during a `select` from another thread.
    pub fn select(&self, timeout: Option<Duration>) -> io::Result<Vec<(RawFd, u8)>> {
        let mut guard = self.state.try_lock().ok_or_else(in_use)?;
        let state = &mut *guard;
        self.reset(state);
        let mut ready = std::mem::take(&mut state.ready);
        ready.clear();
        still_ready(&state.reported, &state.watched, &mut ready);
        let timeout = if ready.is_empty() { timeout } else { Some(Duration::ZERO) };
        let sources = self.sources.lock().clone();
        let watched = &state.watched;
        let mut must_turn = state.starved || timeout == Some(Duration::ZERO);
        let mut polls = 0u32;
        let deadline = timeout.map(|timeout| tokio::time::Instant::now() + timeout);
        state.runtime.block_on(async {
            let mut sleep = None;
            poll_fn(|cx| {
                polls += 1;
                if must_turn {
                    // Once round the scheduler first: its tasks run and epoll is asked
                    // (without waiting) before anything is reported.
                    must_turn = false;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                for (fd, source) in &sources {
                    let wanted = watched.get(fd).is_some_and(|w| w.events & READABLE != 0);
                    if wanted && !ready.iter().any(|(r, _)| r == fd) && source.poll_ready(cx.waker()) {
                        ready.push((*fd, READABLE | SOURCE));
                    }
                }
                for (fd, watched) in watched {
                    let Some(io) = &watched.io else { continue };
                    let mut mask = 0;
                    if watched.events & READABLE != 0 {
                        if let Poll::Ready(result) = io.poll_read_ready(cx) {
                            if let Ok(mut ready) = result {
                                ready.clear_ready();
                            }
                            mask |= READABLE;
                        }
                    }
                    if watched.events & WRITABLE != 0 {
                        if let Poll::Ready(result) = io.poll_write_ready(cx) {
                            if let Ok(mut ready) = result {
                                ready.clear_ready();
                            }
                            mask |= WRITABLE;
                        }
                    }
                    if mask != 0 {
                        merge(&mut ready, *fd, mask);
                    }
                }
                if !ready.is_empty() {
                    return Poll::Ready(());
                }
                let Some(deadline) = deadline else { return Poll::Pending };
                if deadline <= tokio::time::Instant::now() {
                    return Poll::Ready(());
                }
                let sleep = sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                sleep.as_mut().poll(cx)
            })
            .await;
        });
        state.starved = polls == 1;
        state.reported.clear();
        state.reported.extend(
            ready.iter().filter(|(fd, _)| watched.get(fd).is_some_and(|w| w.io.is_some())).map(|r| r.0),
        );
        let result = ready.clone();
        state.ready = ready;
        Ok(result)
    }

    /// Drops the runtime (and every task on it) and forgets every descriptor.
    pub fn close(&self) {
        let mut state = self.state.lock();
        state.watched.clear();
        state.reported.clear();
        self.sources.lock().clear();
        if let Ok(runtime) = build() {
            std::mem::replace(&mut state.runtime, runtime).shutdown_background();
        }
    }
}

fn merge(ready: &mut Vec<(RawFd, u8)>, fd: RawFd, mask: u8) {
    match ready.iter_mut().find(|(r, _)| *r == fd) {
        Some((_, m)) => *m |= mask,
        None => ready.push((fd, mask)),
    }
}

/// Of the descriptors reported last time, those still ready (one `poll(2)`, no waiting).
fn still_ready(reported: &[RawFd], watched: &HashMap<RawFd, Watched>, ready: &mut Vec<(RawFd, u8)>) {
    let mut fds: Vec<libc::pollfd> = reported
        .iter()
        .filter_map(|fd| {
            let events = watched.get(fd)?.events;
            let mut wanted = 0;
            if events & READABLE != 0 {
                wanted |= libc::POLLIN;
            }
            if events & WRITABLE != 0 {
                wanted |= libc::POLLOUT;
            }
            Some(libc::pollfd { fd: *fd, events: wanted, revents: 0 })
        })
        .collect();
    if fds.is_empty() {
        return;
    }
    let count = libc::nfds_t::try_from(fds.len()).unwrap_or(libc::nfds_t::MAX);
    // SAFETY: `fds` is a live array of `count` pollfd; a zero timeout never blocks.
    if unsafe { libc::poll(fds.as_mut_ptr(), count, 0) } <= 0 {
        return;
    }
    let events_of = |fd: RawFd| watched.get(&fd).map_or(0, |w| w.events);
    for pfd in fds {
        let failed = pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0;
        let mut mask = 0;
        if pfd.revents & libc::POLLIN != 0 || failed {
            mask |= READABLE;
        }
        if pfd.revents & libc::POLLOUT != 0 || failed {
            mask |= WRITABLE;
        }
        mask &= events_of(pfd.fd);
        if mask != 0 {
            merge(ready, pfd.fd, mask);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe() -> (RawFd, RawFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) }, 0);
        (fds[0], fds[1])
    }

    fn write(fd: RawFd, data: &[u8]) {
        // SAFETY: writes from a live slice.
        assert_eq!(unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) }, data.len() as isize);
    }

    fn read_one(fd: RawFd) {
        let mut byte = 0u8;
        // SAFETY: reads one byte into a live u8.
        assert_eq!(unsafe { libc::read(fd, std::ptr::from_mut(&mut byte).cast(), 1) }, 1);
    }

    #[test]
    fn level_triggered_as_the_event_loop_expects() {
        let reactor = Reactor::new().unwrap();
        let (r, w) = pipe();
        reactor.watch(r, READABLE).unwrap();
        assert!(reactor.select(Some(Duration::ZERO)).unwrap().is_empty());
        write(w, b"ab");
        assert_eq!(reactor.select(Some(Duration::from_secs(5))).unwrap(), vec![(r, READABLE)]);
        // Not drained: reported again, though no new edge came.
        read_one(r);
        assert_eq!(reactor.select(Some(Duration::from_secs(5))).unwrap(), vec![(r, READABLE)]);
        read_one(r);
        assert!(reactor.select(Some(Duration::from_millis(20))).unwrap().is_empty(), "drained");
        write(w, b"c");
        assert_eq!(reactor.select(None).unwrap(), vec![(r, READABLE)], "the next edge");
        reactor.watch(r, 0).unwrap();
        assert!(reactor.select(Some(Duration::ZERO)).unwrap().is_empty(), "unwatched");
        // SAFETY: closes the pipe made above.
        unsafe {
            libc::close(r);
            libc::close(w);
        }
    }

    #[test]
    fn a_queue_is_reported_by_its_number_and_woken_from_any_thread() {
        let reactor = Reactor::new().unwrap();
        let queue = Arc::new(EventQueue::<u32>::new().unwrap());
        let fd = queue.fd();
        reactor.attach(fd, queue.clone());
        reactor.watch(fd, READABLE).unwrap();
        assert!(reactor.select(Some(Duration::ZERO)).unwrap().is_empty());
        let pusher = {
            let queue = queue.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                queue.push(7);
            })
        };
        assert_eq!(reactor.select(Some(Duration::from_secs(5))).unwrap(), vec![(fd, READABLE | SOURCE)]);
        pusher.join().unwrap();
        assert_eq!(queue.drain(), vec![7]);
        assert!(!crate::bridge::tests::readable(fd), "the eventfd is not written once polled");
        assert!(reactor.select(Some(Duration::ZERO)).unwrap().is_empty());
    }

    #[test]
    fn tasks_run_inside_select_and_are_dropped_on_release() {
        let reactor = Reactor::new().unwrap();
        let handle = reactor.handle().unwrap();
        let queue = Arc::new(EventQueue::<u32>::new().unwrap());
        reactor.attach(queue.fd(), queue.clone());
        reactor.watch(queue.fd(), READABLE).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        {
            let _entered = handle.enter();
            let queue = queue.clone();
            crate::runtime::spawn(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                queue.push(1);
                let _keep = tx;
                std::future::pending::<()>().await;
            });
        }
        assert_eq!(reactor.select(None).unwrap(), vec![(queue.fd(), READABLE | SOURCE)]);
        assert!(rx.try_recv().is_err(), "the task is alive");
        reactor.release(queue.fd());
        assert!(matches!(rx.try_recv(), Err(std::sync::mpsc::TryRecvError::Disconnected)), "dropped");
    }
}
