//! The CPU-limit watchdog (SPEC §3): a thread that watches the application thread's CPU clock
//! and calls `interrupt` when the event running there has used more than its budget, also in a
//! loop that never yields (the bindings raise `CpuLimitExceeded` in the thread).
//!
//! The application thread only stores a few atomics per event ([`Watch::enter`]); it never
//! reads its CPU clock per event. The watchdog reads that clock once per tick while an event
//! runs, so a limit is enforced within a tick or two of being passed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::meter::cpu_clock_ns;

/// How often the watchdog looks, at most and at least: [`tick_for`] picks between them.
pub const MIN_TICK: Duration = Duration::from_millis(5);
pub const MAX_TICK: Duration = Duration::from_millis(100);

/// The tick for the smallest CPU limit in force: a tenth of it, within [`MIN_TICK`] and
/// [`MAX_TICK`] (the watchdog wakes this often, so a 30 s default costs 10 wake-ups a second).
#[must_use]
pub fn tick_for(smallest_limit: Duration) -> Duration {
    (smallest_limit / 10).clamp(MIN_TICK, MAX_TICK)
}

/// What the application thread is running, written by it alone.
#[derive(Debug)]
pub struct Watch {
    /// Bumped when an event (or an async step of one) begins.
    progress: AtomicU64,
    busy: AtomicBool,
    /// CPU the running event may use from its start (`u64::MAX`: no limit).
    budget_ns: AtomicU64,
    /// The CPU clock at the start of event number `base_progress`, when known.
    base_cpu: AtomicU64,
    base_progress: AtomicU64,
    /// The last event interrupted (0: none).
    interrupted: AtomicU64,
}

impl Default for Watch {
    fn default() -> Self {
        Self {
            progress: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            budget_ns: AtomicU64::new(u64::MAX),
            base_cpu: AtomicU64::new(0),
            base_progress: AtomicU64::new(0),
            interrupted: AtomicU64::new(0),
        }
    }
}

impl Watch {
    /// An event begins with `budget_ns` of CPU; `started_cpu` is the thread's CPU clock now if
    /// the caller read it anyway. Returns the event's number.
    pub fn enter(&self, budget_ns: u64, started_cpu: Option<u64>) -> u64 {
        let progress = self.progress.load(Ordering::Relaxed) + 1;
        self.budget_ns.store(budget_ns, Ordering::Relaxed);
        if let Some(cpu) = started_cpu {
            self.base_cpu.store(cpu, Ordering::Relaxed);
            self.base_progress.store(progress, Ordering::Relaxed);
        }
        self.progress.store(progress, Ordering::Release);
        self.busy.store(true, Ordering::Release);
        progress
    }

    /// The next event of the same run (same budget) begins.
    pub fn next_event(&self) {
        self.progress.store(self.progress.load(Ordering::Relaxed) + 1, Ordering::Release);
    }

    /// Sets the budget of the running event (its slot is known only now).
    pub fn set_budget(&self, budget_ns: u64) {
        self.budget_ns.store(budget_ns, Ordering::Relaxed);
    }

    /// No event runs.
    pub fn leave(&self) {
        self.busy.store(false, Ordering::Release);
    }

    /// Event number `progress` is still running (checked by `interrupt` before it acts).
    #[must_use]
    pub fn is_running(&self, progress: u64) -> bool {
        self.busy.load(Ordering::Acquire) && self.progress.load(Ordering::Acquire) == progress
    }

    pub fn mark_interrupted(&self, progress: u64) {
        self.interrupted.store(progress, Ordering::Release);
    }

    /// Event number `progress` was interrupted.
    #[must_use]
    pub fn was_interrupted(&self, progress: u64) -> bool {
        progress != 0 && self.interrupted.load(Ordering::Acquire) == progress
    }
}

/// The calling thread's pthread id (what CPython calls its thread ident).
#[must_use]
pub fn current_thread_ident() -> u64 {
    // SAFETY: pthread_self cannot fail.
    unsafe { libc::pthread_self() as u64 }
}

/// The watchdog thread; it stops when dropped.
pub struct Watchdog {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Watches the thread whose CPU clock is `clock`; calls `interrupt(progress)` (from the
    /// watchdog thread, every tick while it stays over) for an event over its budget.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn start(
        watch: Arc<Watch>,
        clock: libc::clockid_t,
        tick: Duration,
        interrupt: impl Fn(u64) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new().name("sockworker-watchdog".into()).spawn(move || {
            // (event number, CPU clock when it was first seen running)
            let mut seen: Option<(u64, u64)> = None;
            loop {
                match stopped.recv_timeout(tick) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                if !watch.busy.load(Ordering::Acquire) {
                    seen = None;
                    continue;
                }
                let progress = watch.progress.load(Ordering::Acquire);
                let budget = watch.budget_ns.load(Ordering::Relaxed);
                let cpu = cpu_clock_ns(clock);
                let base = match seen {
                    Some((event, base)) if event == progress => base,
                    _ => {
                        let base = if watch.base_progress.load(Ordering::Relaxed) == progress {
                            watch.base_cpu.load(Ordering::Relaxed)
                        } else {
                            cpu
                        };
                        seen = Some((progress, base));
                        base
                    }
                };
                if cpu.saturating_sub(base) > budget && watch.is_running(progress) {
                    interrupt(progress);
                }
            }
        })?;
        Ok(Self { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::thread_cpu_clock;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn interrupts_a_busy_event_over_budget_and_not_an_idle_one() {
        let watch = Arc::new(Watch::default());
        let fired = Arc::new(AtomicUsize::new(0));
        let (hits, w) = (fired.clone(), watch.clone());
        let _dog = Watchdog::start(watch.clone(), thread_cpu_clock(), MIN_TICK, move |progress| {
            hits.fetch_add(1, Ordering::SeqCst);
            w.mark_interrupted(progress);
        })
        .unwrap();
        let event = watch.enter(20_000_000, None);
        // Spin until the watchdog acts: the interrupt is the event awaited.
        let mut spins = 0u64;
        while !watch.was_interrupted(event) {
            spins = spins.wrapping_add(1);
            std::hint::black_box(spins);
        }
        watch.leave();
        assert!(fired.load(Ordering::SeqCst) >= 1);
        // A leisurely event (waiting, not burning CPU) is never interrupted.
        let calm = watch.enter(20_000_000, Some(crate::meter::thread_cpu_ns()));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!watch.was_interrupted(calm));
        watch.leave();
    }
}
