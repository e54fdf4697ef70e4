//! `Metered`: the coroutine of an async event, each resumption (*step*) measured with the
//! thread's CPU clock and held to the event's CPU limit (SPEC §3). One call from asyncio's task
//! per step: the step begins, the coroutine runs, the step ends, in here. `sockworker.cpu` makes
//! them for the tasks an event creates.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use pyo3::intern;
use pyo3::prelude::*;
use sockworker_core::meter::{thread_cpu_ns, BatchClock};
use sockworker_core::watchdog::Watch;
use sockworker_core::{Slot as CoreSlot, Unit};

use crate::convert::STEP;
use crate::errors::cpu_limit_exceeded;

/// What the application thread is running, for CPU accounting and the watchdog.
pub struct Dispatch {
    pub clock: BatchClock,
    /// The async step running now: its slot, the CPU clock at its start, its event number.
    pub step: Option<(Arc<CoreSlot>, u64, u64)>,
}

/// The application thread's clock of batches and steps, and its watchdog's view of them.
#[derive(Clone)]
pub struct Steps {
    pub dispatch: Arc<Mutex<Dispatch>>,
    pub watch: Arc<Watch>,
}

impl Steps {
    /// A step of an event of `slot` begins, with `budget_ns` of CPU left. False, and nothing
    /// measured, inside another step or a batch (their clock is running already).
    fn begin(&self, slot: &Arc<CoreSlot>, budget_ns: u64) -> bool {
        let mut dispatch = self.dispatch.lock();
        if dispatch.step.is_some() || dispatch.clock.in_batch() {
            return false;
        }
        let cpu = thread_cpu_ns();
        self.watch.set_kind(STEP);
        let progress = self.watch.enter(budget_ns, slot.wall_limit_ns(), Some(cpu));
        dispatch.step = Some((slot.clone(), cpu, progress));
        true
    }

    /// Ends the step: charges its CPU to its slot. Returns (CPU ns used, whether the watchdog
    /// interrupted it).
    fn end(&self) -> (u64, bool) {
        let mut dispatch = self.dispatch.lock();
        let Some((slot, started, progress)) = dispatch.step.take() else {
            return (0, false);
        };
        let now = thread_cpu_ns();
        // What the thread used until now is accounted for: batches are charged from here.
        dispatch.clock.rebase(now);
        drop(dispatch);
        let used = now.saturating_sub(started);
        slot.add(Unit::CpuNs, used);
        self.watch.leave();
        (used, self.watch.was_interrupted(progress))
    }
}

/// A coroutine whose steps are charged to a slot and held to its per-event CPU limit, across
/// steps. Past the limit the watchdog raises `CpuLimitExceeded` inside the step; if the
/// coroutine swallows it, it is thrown in again at each later resumption until it ends.
#[pyclass(frozen, module = "sockworker._native")]
pub struct Metered {
    coro: Py<PyAny>,
    slot: Arc<CoreSlot>,
    steps: Steps,
    /// CPU nanoseconds used by the steps so far.
    used: AtomicU64,
    /// Over the limit: every later step begins with `CpuLimitExceeded` thrown in.
    over: AtomicBool,
}

impl Metered {
    pub fn new(coro: Py<PyAny>, slot: Arc<CoreSlot>, steps: Steps) -> Self {
        Self { coro, slot, steps, used: AtomicU64::new(0), over: AtomicBool::new(false) }
    }

    fn step(&self, resume: impl FnOnce() -> PyResult<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        let limit = self.slot.cpu_limit_ns();
        let used = self.used.load(Ordering::Relaxed);
        let measured = self.steps.begin(&self.slot, limit.saturating_sub(used));
        let result = resume();
        if measured {
            let (step, interrupted) = self.steps.end();
            let total = used.saturating_add(step);
            self.used.store(total, Ordering::Relaxed);
            if interrupted || total > limit {
                self.over.store(true, Ordering::Relaxed);
            }
        }
        result
    }
}

#[pymethods]
impl Metered {
    fn send(&self, py: Python<'_>, value: Py<PyAny>) -> PyResult<Py<PyAny>> {
        let coro = self.coro.bind(py);
        if self.over.load(Ordering::Relaxed) {
            let error = cpu_limit_exceeded(py).call0()?;
            return self.step(|| Ok(coro.call_method1(intern!(py, "throw"), (error,))?.unbind()));
        }
        self.step(|| Ok(coro.call_method1(intern!(py, "send"), (value,))?.unbind()))
    }

    #[pyo3(signature = (typ, val=None, tb=None))]
    fn throw(
        &self,
        py: Python<'_>,
        typ: Py<PyAny>,
        val: Option<Py<PyAny>>,
        tb: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let coro = self.coro.bind(py);
        let throw = intern!(py, "throw");
        self.step(|| {
            Ok(match (val, tb) {
                (None, None) => coro.call_method1(throw, (typ,))?,
                (val, tb) => coro.call_method1(throw, (typ, val, tb))?,
            }
            .unbind())
        })
    }

    fn close(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(self.coro.bind(py).call_method0(intern!(py, "close"))?.unbind())
    }

    fn __await__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.send(py, py.None())
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let coro = self.coro.bind(py).repr().map_or_else(|_| "?".into(), |r| r.to_string());
        format!("<Metered {coro}>")
    }
}
