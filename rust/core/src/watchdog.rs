//! The watchdog of the application thread (SPEC §3): a thread that watches that thread's CPU
//! clock and calls `interrupt` when the event running there has used more than its budget, also
//! in a loop that never yields (the bindings raise `CpuLimitExceeded` in the thread). It also
//! sees wall time pass while one event holds the thread (a blocking call: `time.sleep`, a
//! synchronous HTTP client), which stalls every socket of the server: past a threshold it
//! reports the event once (the bindings log its kind, object and Python stack), and past an
//! opt-in wall-clock budget it interrupts it like a CPU overrun.
//!
//! The application thread only stores a few atomics per event ([`Watch::enter`]); it never
//! reads its CPU clock per event. The watchdog reads that clock once per tick while an event
//! runs, so a limit is enforced within a tick or two of being passed.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
    /// Wall time the running event may hold the thread (`u64::MAX`: no limit).
    wall_budget_ns: AtomicU64,
    /// What kind of event runs (the bindings' event kind codes), for the report of a block.
    kind: AtomicU8,
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
            wall_budget_ns: AtomicU64::new(u64::MAX),
            kind: AtomicU8::new(0),
            base_cpu: AtomicU64::new(0),
            base_progress: AtomicU64::new(0),
            interrupted: AtomicU64::new(0),
        }
    }
}

impl Watch {
    /// An event begins with `budget_ns` of CPU and `wall_budget_ns` of wall time; `started_cpu`
    /// is the thread's CPU clock now if the caller read it anyway. Returns the event's number.
    pub fn enter(&self, budget_ns: u64, wall_budget_ns: u64, started_cpu: Option<u64>) -> u64 {
        let progress = self.progress.load(Ordering::Relaxed) + 1;
        self.budget_ns.store(budget_ns, Ordering::Relaxed);
        self.wall_budget_ns.store(wall_budget_ns, Ordering::Relaxed);
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

    /// Sets the budgets of the running event (its slot is known only now).
    pub fn set_budget(&self, budget_ns: u64, wall_budget_ns: u64) {
        self.budget_ns.store(budget_ns, Ordering::Relaxed);
        self.wall_budget_ns.store(wall_budget_ns, Ordering::Relaxed);
    }

    /// Says what kind of event runs (reported if it blocks).
    pub fn set_kind(&self, kind: u8) {
        self.kind.store(kind, Ordering::Relaxed);
    }

    #[must_use]
    pub fn kind(&self) -> u8 {
        self.kind.load(Ordering::Relaxed)
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

/// Which budget an event went past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overrun {
    Cpu,
    Wall,
}

/// Reports an event that holds the thread: `(event number, how long so far)`.
pub type BlockedHook = Box<dyn Fn(u64, Duration) + Send>;

/// What the watchdog calls, from its own thread.
pub struct WatchdogHooks {
    /// An event went past a budget: `(event number, which)`. Called every tick while it stays
    /// over its CPU budget, once for the wall budget.
    pub interrupt: Box<dyn Fn(u64, Overrun) + Send>,
    /// An event has held the thread for `threshold` of wall time: `(event number, how long)`,
    /// once per event.
    pub blocked: Option<(Duration, BlockedHook)>,
}

/// The event the watchdog saw running at its last tick.
struct Seen {
    event: u64,
    /// Its CPU clock base.
    cpu: u64,
    /// When it was first seen (it began at most a tick before).
    since: Instant,
    reported: bool,
    wall_interrupted: bool,
}

/// The watchdog thread; it stops when dropped.
pub struct Watchdog {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Watches the thread whose CPU clock is `clock` (see [`WatchdogHooks`]).
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn start(
        watch: Arc<Watch>,
        clock: libc::clockid_t,
        tick: Duration,
        hooks: WatchdogHooks,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new().name("sockworker-watchdog".into()).spawn(move || {
            let mut seen: Option<Seen> = None;
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
                let now = Instant::now();
                let current = match &mut seen {
                    Some(current) if current.event == progress => current,
                    _ => {
                        let base = if watch.base_progress.load(Ordering::Relaxed) == progress {
                            watch.base_cpu.load(Ordering::Relaxed)
                        } else {
                            cpu
                        };
                        let first = Seen {
                            event: progress,
                            cpu: base,
                            since: now,
                            reported: false,
                            wall_interrupted: false,
                        };
                        seen.insert(first)
                    }
                };
                if cpu.saturating_sub(current.cpu) > budget && watch.is_running(progress) {
                    (hooks.interrupt)(progress, Overrun::Cpu);
                }
                let held = now.duration_since(current.since);
                let wall_budget = watch.wall_budget_ns.load(Ordering::Relaxed);
                if !current.wall_interrupted
                    && u64::try_from(held.as_nanos()).unwrap_or(u64::MAX) > wall_budget
                    && watch.is_running(progress)
                {
                    current.wall_interrupted = true;
                    (hooks.interrupt)(progress, Overrun::Wall);
                }
                if let Some((threshold, report)) = &hooks.blocked {
                    if !current.reported && held >= *threshold && watch.is_running(progress) {
                        current.reported = true;
                        report(progress, held);
                    }
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
        let hooks = WatchdogHooks {
            interrupt: Box::new(move |progress, overrun| {
                assert_eq!(overrun, Overrun::Cpu);
                hits.fetch_add(1, Ordering::SeqCst);
                w.mark_interrupted(progress);
            }),
            blocked: None,
        };
        let _dog = Watchdog::start(watch.clone(), thread_cpu_clock(), MIN_TICK, hooks).unwrap();
        let event = watch.enter(20_000_000, u64::MAX, None);
        // Spin until the watchdog acts: the interrupt is the event awaited.
        let mut spins = 0u64;
        while !watch.was_interrupted(event) {
            spins = spins.wrapping_add(1);
            std::hint::black_box(spins);
        }
        watch.leave();
        assert!(fired.load(Ordering::SeqCst) >= 1);
        // A leisurely event (waiting, not burning CPU) is never interrupted.
        let calm = watch.enter(20_000_000, u64::MAX, Some(crate::meter::thread_cpu_ns()));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!watch.was_interrupted(calm));
        watch.leave();
    }

    #[test]
    fn reports_an_event_that_holds_the_thread_once_and_interrupts_past_the_wall_budget() {
        let watch = Arc::new(Watch::default());
        let (reports, walls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (r, w) = (reports.clone(), walls.clone());
        let hooks = WatchdogHooks {
            interrupt: Box::new(move |_, overrun| {
                assert_eq!(overrun, Overrun::Wall);
                w.fetch_add(1, Ordering::SeqCst);
            }),
            blocked: Some((
                Duration::from_millis(20),
                Box::new(move |_, _| {
                    r.fetch_add(1, Ordering::SeqCst);
                }),
            )),
        };
        let _dog = Watchdog::start(watch.clone(), thread_cpu_clock(), MIN_TICK, hooks).unwrap();
        // Sleeping (no CPU) inside an event: reported once, interrupted once.
        watch.enter(u64::MAX, 40_000_000, None);
        while walls.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(MIN_TICK);
        }
        std::thread::sleep(MIN_TICK * 4);
        watch.leave();
        assert_eq!((reports.load(Ordering::SeqCst), walls.load(Ordering::SeqCst)), (1, 1));
    }
}
