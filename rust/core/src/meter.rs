//! The meter (SPEC §4): every billable unit, counted where it happens, per (account, namespace,
//! object id). A [`Slot`] is one such key; sockets hold theirs, so the I/O threads count
//! messages, auto-responses and bytes without a lookup. [`Meter::drain`] moves what was counted
//! since the last drain into records with one atomic swap per counter, so the records partition
//! the totals exactly: every increment lands in exactly one drain.
//!
//! CPU time of the application thread is measured per batch of events ([`BatchClock`]) and split
//! over the runs of consecutive events of the same slot by their share of the batch's wall time.
//! Events of one slot in a row (every socket of a Worker, say) cost nothing per event. Reading
//! the thread's CPU clock is a system call (about 0.8 µs on a virtual machine, as much as a
//! whole short batch), so a short batch is charged its wall time, read from the vDSO clock: the
//! thread runs from start to end of it. A batch longer than [`SHORT_BATCH`] (the only kind a
//! preemption can hide in) reads the CPU clock and is charged at most the CPU the thread used
//! since the last reading, less what was charged since.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

/// The units of SPEC §4, as indexes into a slot's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Unit {
    Requests,
    Connections,
    MessagesIn,
    MessagesOut,
    AutoResponses,
    CpuNs,
    /// Microseconds resident and not idle-hibernatable (times the memory allotment = GB-s).
    DurationUs,
    BytesIn,
    BytesOut,
    /// Protocol pings the core answered or sent (keepalive): counted, free, never seen by Python.
    ProtocolPings,
    /// Durable Object storage (SPEC §6): a KV key or an SQL row read, or written.
    StorageRowsRead,
    StorageRowsWritten,
    /// Outgoing HTTP requests (`sw.fetch`), one per call: counted, not billed.
    Subrequests,
}

pub const UNITS: usize = 13;

impl Unit {
    /// Every unit, in the order of a [`Usage`].
    pub const ALL: [Unit; UNITS] = [
        Unit::Requests,
        Unit::Connections,
        Unit::MessagesIn,
        Unit::MessagesOut,
        Unit::AutoResponses,
        Unit::CpuNs,
        Unit::DurationUs,
        Unit::BytesIn,
        Unit::BytesOut,
        Unit::ProtocolPings,
        Unit::StorageRowsRead,
        Unit::StorageRowsWritten,
        Unit::Subrequests,
    ];

    /// The unit's name: what the bindings call it (`UNIT_` and the name in capitals).
    pub const fn name(self) -> &'static str {
        match self {
            Unit::Requests => "requests",
            Unit::Connections => "connections",
            Unit::MessagesIn => "messages_in",
            Unit::MessagesOut => "messages_out",
            Unit::AutoResponses => "auto_responses",
            Unit::CpuNs => "cpu_ns",
            Unit::DurationUs => "duration_us",
            Unit::BytesIn => "bytes_in",
            Unit::BytesOut => "bytes_out",
            Unit::ProtocolPings => "protocol_pings",
            Unit::StorageRowsRead => "storage_rows_read",
            Unit::StorageRowsWritten => "storage_rows_written",
            Unit::Subrequests => "subrequests",
        }
    }
}

/// One value per [`Unit`].
pub type Usage = [u64; UNITS];

/// Counters on a cache line of their own, so the I/O threads and the application thread do
/// not write to the same line.
#[repr(align(64))]
#[derive(Default)]
struct Counters([AtomicU64; UNITS]);

impl Counters {
    fn take(&self, into: &mut Usage) {
        for (sum, counter) in into.iter_mut().zip(&self.0) {
            *sum += counter.swap(0, Ordering::AcqRel);
        }
    }

    fn peek(&self, into: &mut Usage) {
        for (sum, counter) in into.iter_mut().zip(&self.0) {
            *sum += counter.load(Ordering::Acquire);
        }
    }
}

/// Who is billed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Label {
    pub account: String,
    /// `None` for the Worker itself.
    pub namespace: Option<String>,
    /// `None` for the Worker itself.
    pub object_id: Option<String>,
}

/// The counters of one label.
pub struct Slot {
    pub label: Label,
    /// Written by the I/O threads.
    io: Counters,
    /// Written by the application thread.
    app: Counters,
    /// CPU one event of this slot may use (`u64::MAX`: no limit).
    cpu_limit_ns: AtomicU64,
    /// Wall time one event of this slot may hold the application thread (`u64::MAX`: no limit).
    wall_limit_ns: AtomicU64,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("label", &self.label).finish_non_exhaustive()
    }
}

impl Slot {
    fn new(label: Label) -> Self {
        Self {
            label,
            io: Counters::default(),
            app: Counters::default(),
            cpu_limit_ns: AtomicU64::new(u64::MAX),
            wall_limit_ns: AtomicU64::new(u64::MAX),
        }
    }

    pub fn set_wall_limit_ns(&self, limit: u64) {
        self.wall_limit_ns.store(limit, Ordering::Relaxed);
    }

    #[must_use]
    pub fn wall_limit_ns(&self) -> u64 {
        self.wall_limit_ns.load(Ordering::Relaxed)
    }

    pub fn set_cpu_limit_ns(&self, limit: u64) {
        self.cpu_limit_ns.store(limit, Ordering::Relaxed);
    }

    #[must_use]
    pub fn cpu_limit_ns(&self) -> u64 {
        self.cpu_limit_ns.load(Ordering::Relaxed)
    }

    /// Counts from an I/O thread.
    pub fn add_io(&self, unit: Unit, n: u64) {
        if n != 0 {
            self.io.0[unit as usize].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts from the application thread.
    pub fn add(&self, unit: Unit, n: u64) {
        if n != 0 {
            self.app.0[unit as usize].fetch_add(n, Ordering::Relaxed);
        }
    }

    fn take(&self) -> Usage {
        let mut usage = [0; UNITS];
        self.io.take(&mut usage);
        self.app.take(&mut usage);
        usage
    }

    /// What was counted since the last drain.
    #[must_use]
    pub fn pending(&self) -> Usage {
        let mut usage = [0; UNITS];
        self.io.peek(&mut usage);
        self.app.peek(&mut usage);
        usage
    }
}

fn add_usage(into: &mut Usage, usage: &Usage) {
    for (sum, value) in into.iter_mut().zip(usage) {
        *sum += value;
    }
}

#[derive(Default)]
struct Registry {
    /// Every slot held now (or not yet drained), with what it drained so far.
    slots: HashMap<Label, (Arc<Slot>, Usage)>,
    /// Everything drained so far.
    drained: Usage,
    /// Everything drained so far, per account (for the metrics: the slots go, the accounts
    /// stay).
    accounts: HashMap<String, Usage>,
}

/// Every slot of one server.
#[derive(Default)]
pub struct Meter {
    registry: Mutex<Registry>,
}

impl Meter {
    /// The slot of `label`, made on first use.
    pub fn slot(&self, label: Label) -> Arc<Slot> {
        let mut registry = self.registry.lock();
        if let Some((slot, _)) = registry.slots.get(&label) {
            return slot.clone();
        }
        let slot = Arc::new(Slot::new(label.clone()));
        registry.slots.insert(label, (slot.clone(), [0; UNITS]));
        slot
    }

    /// What each slot counted since the last drain (slots with nothing are left out). A slot
    /// nobody holds any more is forgotten once drained.
    pub fn drain(&self) -> Vec<(Label, Usage)> {
        let mut guard = self.registry.lock();
        let registry = &mut *guard;
        let mut records = Vec::new();
        let mut total = [0; UNITS];
        let accounts = &mut registry.accounts;
        registry.slots.retain(|label, (slot, drained)| {
            let usage = slot.take();
            if usage.iter().any(|&n| n != 0) {
                add_usage(&mut total, &usage);
                add_usage(drained, &usage);
                match accounts.get_mut(&label.account) {
                    Some(sum) => add_usage(sum, &usage),
                    None => {
                        accounts.insert(label.account.clone(), usage);
                    }
                }
                records.push((label.clone(), usage));
            }
            Arc::strong_count(slot) > 1
        });
        // A burst of distinct ids (one slot each, about 200 B) would leave the table at its
        // peak size for good: 6 MiB after 30,000 objects within one flush interval.
        crate::memory::shrink_sparse(&mut registry.slots, 1024);
        add_usage(&mut registry.drained, &total);
        records
    }

    /// Everything counted since the start: drained or not.
    pub fn totals(&self) -> Usage {
        let registry = self.registry.lock();
        let mut total = registry.drained;
        for (slot, _) in registry.slots.values() {
            add_usage(&mut total, &slot.pending());
        }
        total
    }

    /// Everything counted since the start per account, drained or not.
    pub fn accounts(&self) -> HashMap<String, Usage> {
        let registry = self.registry.lock();
        let mut accounts = registry.accounts.clone();
        for (label, (slot, _)) in &registry.slots {
            let pending = slot.pending();
            match accounts.get_mut(&label.account) {
                Some(sum) => add_usage(sum, &pending),
                None => {
                    accounts.insert(label.account.clone(), pending);
                }
            }
        }
        accounts
    }

    /// Every slot known now, and what it counted since it was made (drained or not).
    pub fn slots(&self) -> Vec<(Arc<Slot>, Usage)> {
        let registry = self.registry.lock();
        registry
            .slots
            .values()
            .map(|(slot, drained)| {
                let mut usage = *drained;
                add_usage(&mut usage, &slot.pending());
                (slot.clone(), usage)
            })
            .collect()
    }
}

/// The CPU time this thread has used, in nanoseconds.
#[must_use]
pub fn thread_cpu_ns() -> u64 {
    cpu_clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// The CPU clock of another thread of this process (see [`thread_cpu_clock`]).
#[must_use]
pub fn cpu_clock_ns(clock: libc::clockid_t) -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid timespec; an invalid clock leaves it zeroed and returns -1.
    unsafe { libc::clock_gettime(clock, &raw mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

/// The CPU clock id of the calling thread, readable from any thread of the process.
#[must_use]
pub fn thread_cpu_clock() -> libc::clockid_t {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: pthread_self is the calling thread, alive for the call; `clock` is valid.
    unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &raw mut clock) };
    clock
}

/// A batch shorter than this (wall time) is charged its wall time without reading the CPU clock.
pub const SHORT_BATCH: std::time::Duration = std::time::Duration::from_micros(100);

/// Splits one batch's CPU time over its runs of events of the same slot.
#[derive(Default)]
pub struct BatchClock {
    started: Option<Instant>,
    /// (slot, wall nanoseconds) of the closed runs.
    runs: Vec<(Option<Arc<Slot>>, u64)>,
    current: Option<Arc<Slot>>,
    current_since: Option<Instant>,
    /// The thread's CPU clock at the last reading, and what was charged since.
    baseline_cpu: u64,
    charged_since: u64,
}

impl BatchClock {
    /// A clock whose thread's CPU clock reads `cpu_ns` now.
    #[must_use]
    pub fn new(cpu_ns: u64) -> Self {
        Self { baseline_cpu: cpu_ns, ..Self::default() }
    }

    /// The thread's CPU clock was read (`cpu_ns`) and what it used until then is accounted for
    /// (an async step was just measured with it).
    pub fn rebase(&mut self, cpu_ns: u64) {
        self.baseline_cpu = cpu_ns;
        self.charged_since = 0;
    }

    /// A batch has begun and not ended.
    #[must_use]
    pub fn in_batch(&self) -> bool {
        self.started.is_some()
    }

    /// Starts a batch.
    pub fn begin(&mut self) {
        self.started = Some(Instant::now());
        self.runs.clear();
        self.current = None;
        self.current_since = None;
    }

    /// The event about to run is `slot`'s: a new run starts (and true is returned) if it is not
    /// the current run's slot.
    pub fn enter(&mut self, slot: Option<&Arc<Slot>>) -> bool {
        let same = match (slot, &self.current) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => self.current_since.is_some(),
            _ => false,
        };
        if same {
            return false;
        }
        let now = Instant::now();
        self.close_run(now);
        self.current = slot.cloned();
        self.current_since = Some(now);
        true
    }

    /// Bills the current run to `slot` instead (a request learns its account in its handler).
    pub fn relabel(&mut self, slot: &Arc<Slot>) {
        self.current = Some(slot.clone());
    }

    /// The slot of the event running now, if it has one.
    #[must_use]
    pub fn current(&self) -> Option<&Arc<Slot>> {
        self.current.as_ref()
    }

    fn close_run(&mut self, now: Instant) {
        if let Some(since) = self.current_since.take() {
            self.runs.push((self.current.take(), nanos(now.duration_since(since))));
        }
    }

    /// Ends the batch: charges each run's slot its share of the batch's CPU by wall time
    /// (`read_cpu` reads the thread's CPU clock; it is called only for a long batch). Runs of
    /// no slot (our own bookkeeping, a request before its account is known) are billed to
    /// nobody. Returns the CPU charged to the batch.
    pub fn end(&mut self, read_cpu: impl FnOnce() -> u64) -> u64 {
        let now = Instant::now();
        self.close_run(now);
        let wall = self.started.take().map_or(0, |started| nanos(now.duration_since(started)));
        let used = if wall < nanos(SHORT_BATCH) {
            // Charged before the next reading of the CPU clock: the next long batch's bound
            // leaves it out.
            self.charged_since += wall;
            wall
        } else {
            let cpu = read_cpu();
            let budget = cpu.saturating_sub(self.baseline_cpu).saturating_sub(self.charged_since);
            self.rebase(cpu);
            wall.min(budget)
        };
        let runs_wall: u64 = self.runs.iter().map(|(_, wall)| wall).sum();
        if runs_wall > 0 {
            for (slot, run_wall) in &self.runs {
                if let Some(slot) = slot {
                    let share = u128::from(used) * u128::from(*run_wall) / u128::from(runs_wall.max(wall));
                    slot.add(Unit::CpuNs, u64::try_from(share).unwrap_or(u64::MAX));
                }
            }
        }
        self.runs.clear();
        self.current = None;
        used
    }
}

fn nanos(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_once_in_the_order_of_a_usage() {
        for (index, unit) in Unit::ALL.into_iter().enumerate() {
            assert_eq!(unit as usize, index, "{}", unit.name());
        }
    }

    fn label(account: &str) -> Label {
        Label { account: account.into(), namespace: None, object_id: None }
    }

    #[test]
    fn a_burst_of_slots_leaves_no_table_behind() {
        let meter = Meter::default();
        let kept = meter.slot(label("kept"));
        for i in 0..10_000 {
            let slot = meter.slot(Label { object_id: Some(i.to_string()), ..label("a") });
            slot.add(Unit::Requests, 1);
        }
        assert!(meter.registry.lock().slots.capacity() >= 10_000);
        assert_eq!(meter.drain().len(), 10_000);
        let registry = meter.registry.lock();
        assert_eq!(registry.slots.len(), 1, "only the slot held is kept");
        assert!(registry.slots.capacity() < 1024, "{} buckets kept", registry.slots.capacity());
        drop(kept);
    }

    #[test]
    fn drains_partition_the_totals() {
        let meter = Meter::default();
        let a = meter.slot(label("a"));
        assert!(Arc::ptr_eq(&a, &meter.slot(label("a"))));
        a.add_io(Unit::MessagesIn, 3);
        a.add(Unit::MessagesOut, 2);
        let first = meter.drain();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].1[Unit::MessagesIn as usize], 3);
        a.add_io(Unit::MessagesIn, 4);
        let totals = meter.totals();
        assert_eq!(totals[Unit::MessagesIn as usize], 7);
        assert_eq!(totals[Unit::MessagesOut as usize], 2);
        let second = meter.drain();
        assert_eq!(second[0].1[Unit::MessagesIn as usize], 4);
        assert!(meter.drain().is_empty());
        assert_eq!(meter.totals(), totals);
    }

    #[test]
    fn unheld_slots_are_forgotten_after_their_last_drain() {
        let meter = Meter::default();
        meter.slot(label("gone")).add(Unit::Requests, 1);
        assert_eq!(meter.drain().len(), 1);
        let again = meter.slot(label("gone"));
        assert_eq!(again.pending(), [0; UNITS]);
        assert_eq!(meter.totals()[Unit::Requests as usize], 1);
        assert_eq!(meter.accounts()["gone"][Unit::Requests as usize], 1);
    }

    #[test]
    fn slots_and_accounts_keep_what_was_drained() {
        let meter = Meter::default();
        let a = meter.slot(label("a"));
        a.add(Unit::MessagesIn, 2);
        let _ = meter.drain();
        a.add(Unit::MessagesIn, 3);
        meter.slot(label("b")).add(Unit::MessagesIn, 1);
        let accounts = meter.accounts();
        assert_eq!(accounts["a"][Unit::MessagesIn as usize], 5);
        assert_eq!(accounts["b"][Unit::MessagesIn as usize], 1);
        let slots = meter.slots();
        let of_a = slots.iter().find(|(slot, _)| slot.label.account == "a").expect("a's slot");
        assert_eq!(of_a.1[Unit::MessagesIn as usize], 5);
    }

    #[test]
    fn batch_cpu_is_split_by_wall_time() {
        let meter = Meter::default();
        let (a, b) = (meter.slot(label("a")), meter.slot(label("b")));
        let mut clock = BatchClock::new(0);
        clock.begin();
        assert!(clock.enter(Some(&a)));
        assert!(!clock.enter(Some(&a)));
        std::thread::sleep(std::time::Duration::from_millis(30));
        clock.enter(Some(&b));
        std::thread::sleep(std::time::Duration::from_millis(10));
        // A long batch reads the CPU clock: it used 1 ms of CPU (it slept the rest).
        assert_eq!(clock.end(|| 1_000_000), 1_000_000);
        let (ca, cb) = (a.pending()[Unit::CpuNs as usize], b.pending()[Unit::CpuNs as usize]);
        assert!(ca + cb <= 1_000_000 && ca + cb > 990_000, "charged {}", ca + cb);
        assert!(ca > 2 * cb, "a ran about three times as long as b: {ca} vs {cb}");
    }

    #[test]
    fn long_batches_in_a_row_are_each_bounded_by_their_own_cpu() {
        let meter = Meter::default();
        let a = meter.slot(label("a"));
        let mut clock = BatchClock::new(0);
        for (n, cpu) in [(1u64, 5_000_000u64), (2, 10_000_000), (3, 15_000_000)] {
            clock.begin();
            clock.enter(Some(&a));
            std::thread::sleep(std::time::Duration::from_millis(6));
            // Each batch used 5 ms of CPU (the clock reads 5, 10, 15 ms at their ends).
            let used = clock.end(|| cpu);
            assert_eq!(used, 5_000_000, "batch {n}");
        }
    }

    #[test]
    fn a_short_batch_is_charged_its_wall_time_without_reading_the_cpu_clock() {
        let meter = Meter::default();
        let a = meter.slot(label("a"));
        let mut clock = BatchClock::new(0);
        clock.begin();
        clock.enter(Some(&a));
        let used = clock.end(|| panic!("a short batch must not read the CPU clock"));
        assert!(used < nanos(SHORT_BATCH));
        // The run is charged its part of the batch (what came before it was our own work).
        let charged = a.pending()[Unit::CpuNs as usize];
        assert!(charged > 0 && charged <= used, "{charged} of {used}");
    }
}
