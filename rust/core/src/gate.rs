//! The output gate (SPEC §6): storage commits and the release of what the application sent while
//! they were not yet durable. While any write is uncommitted (or committed and not yet synced),
//! every frame, close, broadcast, HTTP answer and awaited result from the application thread is
//! held, in order; once the commit is durable it is released in that order. A failed commit
//! drops its object's held output (its sockets are closed with 1011, its awaited results fail).
//!
//! Commits run on the application thread at commit points (the end of a batch of events, or of
//! a loop iteration that wrote): one `COMMIT` per object that wrote, however many events did.
//! With `Durability::Full` the committer thread then fsyncs each written log once per round (group
//! commit across the commit points that queued up meanwhile) and releases; the application
//! thread never waits for the disk. It also checkpoints long logs and closes hibernated stores.

use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use crate::alarms::{AlarmIndex, AlarmScheduler};
use crate::error::CoreError;
use crate::event::{Answering, Event, Events};
use crate::frame::close_code;
use crate::object::ObjectShared;
use crate::socket::{SendOutcome, SocketShared};
use crate::storage::{Alarm, Durability, ObjectName, Storage, Store};

/// Something the application sent, held until the writes before it are durable.
pub enum Held {
    Frame {
        socket: Arc<SocketShared>,
        frame: Bytes,
    },
    Broadcast {
        owner: u64,
        sockets: Vec<Arc<SocketShared>>,
        frame: Bytes,
    },
    Close {
        socket: Arc<SocketShared>,
        code: u16,
        reason: String,
    },
    Answer(Answering),
    /// A result the application awaits (an RPC's, a Durable Object fetch's), by token.
    Token {
        owner: u64,
        token: u64,
    },
}

/// The writes of one commit point, and what was sent after them.
#[derive(Default)]
struct Epoch {
    /// Logs to fsync, with the object each belongs to (`None`: the alarm index, synced first).
    logs: Vec<(Option<u64>, Arc<File>)>,
    /// Folders and files made with new databases.
    entries: Vec<PathBuf>,
    /// Objects whose commit failed.
    failed: Vec<u64>,
    held: Vec<Held>,
    checkpoints: Vec<Arc<Store>>,
    /// The last batch of events whose output this epoch holds (0: none): once released, the
    /// connections waiting for that batch to be handled may go on (a held Close, reading).
    batch: u64,
}

#[derive(Default)]
struct State {
    /// Stores written since the last commit point.
    dirty: Vec<Arc<Store>>,
    /// What was sent since the last commit point, while holding.
    held: Vec<Held>,
    sealed: VecDeque<Epoch>,
    /// Sealed epochs not yet released (queued, or being synced).
    unreleased: usize,
    /// Stores of hibernated objects, to close once their last commit is done.
    closing: Vec<Arc<Store>>,
    /// The last batch of events whose output `held` holds.
    batch: u64,
    stop: bool,
}

/// Counters for the benchmarks and the metrics.
#[derive(Debug, Default)]
pub struct GateStats {
    /// `COMMIT`s run (one per object per commit point that wrote).
    pub commits: AtomicU64,
    /// Commit points that committed anything.
    pub commit_points: AtomicU64,
    /// `fdatasync`s of logs, and `syncfs`s of the data directory's filesystem (one for a round
    /// that wrote many logs).
    pub syncs: AtomicU64,
    /// Rounds of the committer (each syncs every log written since the round before).
    pub rounds: AtomicU64,
    pub failed: AtomicU64,
}

pub struct OutputGate {
    state: Mutex<State>,
    /// Something is uncommitted or unreleased: sends are held. Set only by the application
    /// thread; cleared under the lock once everything is released.
    holding: AtomicBool,
    work: Condvar,
    /// Signalled when every sealed epoch is released.
    released: Condvar,
    storage: Arc<Storage>,
    alarms: Arc<AlarmScheduler>,
    index: AlarmIndex,
    events: Arc<Events>,
    pub stats: GateStats,
    committer: Mutex<Option<JoinHandle<()>>>,
    /// The data directory, open: `syncfs` of it syncs every log of a round with one call.
    root: File,
    /// For the tests of the gate (`SOCKWORKER_TEST_COMMIT_GATE`): each round waits, before its
    /// fsyncs, until this file exists, so a test can hold commits as long as it likes.
    test_gate: Option<PathBuf>,
}

/// A round that wrote more logs (and new folders) than this syncs the filesystem once instead.
const SYNCFS_ABOVE: usize = 2;

thread_local! {
    /// The gate of the server whose application runs on this thread.
    static CURRENT: RefCell<Option<Arc<OutputGate>>> = const { RefCell::new(None) };
}

/// Makes `gate` the one this thread's sends go through (`None`: none; sends go straight out).
pub fn install(gate: Option<Arc<OutputGate>>) {
    CURRENT.with(|current| *current.borrow_mut() = gate);
}

/// Runs `f` with this thread's gate if it is holding; `None` when sends may go straight out.
fn while_holding<T>(f: impl FnOnce(&OutputGate) -> Option<T>) -> Option<T> {
    CURRENT.with(|current| {
        let current = current.borrow();
        let gate = current.as_ref()?;
        if gate.holding.load(Ordering::Acquire) {
            f(gate)
        } else {
            None
        }
    })
}

/// Sends a message on `socket`, or holds it.
pub fn send(socket: &Arc<SocketShared>, text: bool, data: &[u8]) -> SendOutcome {
    let held = while_holding(|gate| {
        if !socket.is_open() {
            return Some(SendOutcome::Dropped);
        }
        let frame = socket.encode(text, data);
        Some(match gate.hold(Held::Frame { socket: socket.clone(), frame }) {
            Ok(()) => SendOutcome::Queued,
            Err(Held::Frame { frame, .. }) => socket.send_frame(frame),
            Err(_) => unreachable!("hold gives back what it was given"),
        })
    });
    held.unwrap_or_else(|| socket.send(text, data))
}

/// Starts closing `socket` after what was sent before, or holds the close. False when it was
/// closing already.
pub fn close(socket: &Arc<SocketShared>, code: u16, reason: &str) -> bool {
    let held = while_holding(|gate| {
        if !socket.is_open() {
            return Some(false);
        }
        let close = Held::Close { socket: socket.clone(), code, reason: reason.to_owned() };
        Some(gate.hold(close).is_ok() || socket.close(code, reason))
    });
    held.unwrap_or_else(|| socket.close(code, reason))
}

/// Sends `data` to the matching sockets of `object`, or holds it; returns how many.
pub fn broadcast(
    object: &ObjectShared,
    text: bool,
    data: &[u8],
    tag: Option<&str>,
    exclude: Option<u64>,
) -> usize {
    let held = while_holding(|gate| {
        let sockets = object.matching(tag, exclude);
        let count = sockets.len();
        let frame = crate::frame::encode_message(text, data);
        if let Err(item) = gate.hold(Held::Broadcast { owner: object.key(), sockets, frame }) {
            release_one(item, &[], &gate.events);
        }
        Some(count)
    });
    held.unwrap_or_else(|| object.broadcast(text, data, tag, exclude))
}

/// Sends an HTTP answer (or a 101), or holds it.
pub fn answer(answering: Answering) {
    let rest = CURRENT.with(|current| match current.borrow().as_ref() {
        Some(gate) if gate.holding.load(Ordering::Acquire) => gate.hold(Held::Answer(answering)).err(),
        _ => Some(Held::Answer(answering)),
    });
    if let Some(Held::Answer(answering)) = rest {
        answering.send();
    }
}

/// A token the application awaits until what came before it is durable; `None` when nothing
/// is held (the result may be used at once).
#[must_use]
pub fn token(owner: u64, token: u64) -> Option<u64> {
    while_holding(|gate| gate.hold(Held::Token { owner, token }).ok().map(|()| token))
}

/// Carries out one held item (`failed`: objects whose commit failed). Returns true for a close
/// that started (what `SocketShared::close` returns).
fn release_one(item: Held, failed: &[u64], events: &Events) -> bool {
    let owner_failed = |socket: &SocketShared| socket.owner().is_some_and(|owner| failed.contains(&owner));
    match item {
        Held::Frame { socket, frame } => {
            if owner_failed(&socket) {
                socket.close(close_code::INTERNAL_ERROR, "storage commit failed");
            } else {
                socket.send_frame(frame);
            }
        }
        Held::Broadcast { owner, sockets, frame } => {
            let failed = failed.contains(&owner);
            for socket in sockets {
                if failed {
                    socket.close(close_code::INTERNAL_ERROR, "storage commit failed");
                } else {
                    socket.send_frame(frame.clone());
                }
            }
        }
        Held::Close { socket, code, reason } => return socket.close(code, &reason),
        Held::Answer(answering) => answering.send(),
        Held::Token { owner, token } => events.push(Event::Released { token, ok: !failed.contains(&owner) }),
    }
    false
}

impl OutputGate {
    /// The gate of a server with storage, and its committer thread; the alarm index is read and
    /// every alarm in it armed (those already due fire at once).
    ///
    /// # Errors
    /// When the alarm index cannot be opened or read, or the thread cannot start.
    pub fn start(
        storage: Arc<Storage>,
        alarms: Arc<AlarmScheduler>,
        events: Arc<Events>,
    ) -> Result<Arc<Self>, CoreError> {
        let index = AlarmIndex::open(storage.root())?;
        if let Some(cluster) = storage.cluster() {
            // The alarms are in PostgreSQL: the cluster's rounds arm those this node should fire.
            let scheduler = alarms.clone();
            cluster.set_alarms(Arc::new(move |name, at, id_name| scheduler.set(name, at, 0, id_name)));
        } else {
            for (name, at, id_name) in index.all()? {
                alarms.set(&Arc::new(name), at, 0, id_name.as_deref());
            }
        }
        let test_gate = std::env::var_os("SOCKWORKER_TEST_COMMIT_GATE").map(PathBuf::from);
        let root = File::open(storage.root())?;
        let gate = Arc::new(Self {
            state: Mutex::new(State::default()),
            holding: AtomicBool::new(false),
            work: Condvar::new(),
            released: Condvar::new(),
            storage,
            alarms,
            index,
            events,
            stats: GateStats::default(),
            committer: Mutex::new(None),
            root,
            test_gate,
        });
        let worker = gate.clone();
        let handle =
            std::thread::Builder::new().name("sockworker-commit".into()).spawn(move || worker.run())?;
        *gate.committer.lock() = Some(handle);
        Ok(gate)
    }

    #[must_use]
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    #[must_use]
    pub fn alarms(&self) -> &Arc<AlarmScheduler> {
        &self.alarms
    }

    /// Output is being held now.
    #[must_use]
    pub fn is_holding(&self) -> bool {
        self.holding.load(Ordering::Acquire)
    }

    /// `store` has writes that the next commit point commits.
    pub fn mark_dirty(&self, store: &Arc<Store>) {
        if store.in_epoch.swap(true, Ordering::AcqRel) {
            return;
        }
        self.state.lock().dirty.push(store.clone());
        self.holding.store(true, Ordering::Release);
    }

    /// The application has handled batch `number`. While the gate holds output, the
    /// connections waiting for that batch to be handled (`Events::batch_done`) are told once the
    /// gate releases what it sent, and this returns true; else the caller tells them.
    pub fn hold_batch(&self, number: u64) -> bool {
        let mut state = self.state.lock();
        if state.held.is_empty() && state.unreleased == 0 && state.dirty.is_empty() {
            return false;
        }
        state.batch = state.batch.max(number);
        true
    }

    /// Holds `item`, or gives it back when nothing is pending any more (send it now).
    fn hold(&self, item: Held) -> Result<(), Held> {
        let mut state = self.state.lock();
        if state.dirty.is_empty() && state.unreleased == 0 {
            // (Held items were released with the last epoch: nothing to keep order with.)
            return Err(item);
        }
        state.held.push(item);
        Ok(())
    }

    /// Closes `store` (its object hibernated) once what it wrote is committed, on the committer
    /// thread; opening it again first calls the close off.
    pub fn close_store(&self, store: &Arc<Store>) {
        store.close_requested.store(true, Ordering::Release);
        let mut state = self.state.lock();
        state.closing.push(store.clone());
        self.work.notify_one();
    }

    /// A commit point: commits every store written since the last one (a store inside a
    /// `transaction()` block waits for the next), then releases what was held or hands it to the
    /// committer. Runs on the application thread.
    pub fn commit_point(&self) {
        let dirty = {
            let mut state = self.state.lock();
            if state.dirty.is_empty() {
                if state.unreleased == 0 && !state.held.is_empty() {
                    let held = std::mem::take(&mut state.held);
                    release_all(held, &[], &self.events);
                    self.holding.store(false, Ordering::Release);
                    self.release_batch(&mut state.batch);
                }
                return;
            }
            // The epoch counts from now: until it is sealed, the committer must not release what
            // is held (it would overtake these commits).
            state.unreleased += 1;
            std::mem::take(&mut state.dirty)
        };
        let mut epoch = Epoch::default();
        let (kept, committable): (Vec<_>, Vec<_>) = dirty.into_iter().partition(|store| store.in_block());
        // Alarms being set go into the index before their objects commit, so the index always
        // names every object with an alarm.
        let mut upserts: Vec<(Arc<ObjectName>, Alarm)> = Vec::new();
        let mut index_failed: HashSet<*const Store> = HashSet::new();
        for store in &committable {
            if let Ok(Some(Some(alarm))) = store.pending_alarm() {
                upserts.push((store.name().clone(), alarm));
            }
        }
        if self.storage.cluster().is_some() {
            // (The alarm is written with the object's commit, in the same PostgreSQL transaction.)
            upserts.clear();
        }
        if !upserts.is_empty() {
            match self.index.write(&upserts, &[]) {
                Ok(log) => epoch.logs.extend(log.map(|log| (None, log))),
                Err(error) => {
                    log::error!("the alarm index could not be written: {error}");
                    for store in &committable {
                        if upserts.iter().any(|(name, _)| name == store.name()) {
                            index_failed.insert(Arc::as_ptr(store));
                        }
                    }
                }
            }
        }
        let mut deletes = Vec::new();
        for store in committable {
            store.in_epoch.store(false, Ordering::Release);
            let outcome = if index_failed.contains(&Arc::as_ptr(&store)) {
                store.rollback();
                Err(CoreError::Storage("the alarm index could not be written".into()))
            } else {
                let started = std::time::Instant::now();
                let outcome = store.commit();
                self.events.stats.commit_seconds.observe_duration(started.elapsed());
                outcome
            };
            match outcome {
                Ok(committed) => {
                    self.stats.commits.fetch_add(1, Ordering::Relaxed);
                    if self.storage.durability() == Durability::Full {
                        epoch.logs.extend(committed.log.map(|log| (Some(store.owner()), log)));
                        epoch.entries.extend(committed.new_entries);
                    }
                    match committed.alarm {
                        Some(Some(alarm)) => {
                            self.alarms.set(store.name(), alarm.at, 0, alarm.id_name.as_deref());
                        }
                        Some(None) => {
                            self.alarms.cancel(store.name());
                            deletes.push(store.name().clone());
                        }
                        None => {}
                    }
                    if committed.wants_checkpoint {
                        epoch.checkpoints.push(store);
                    }
                }
                Err(error) => {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    log::error!("storage commit of {} failed: {error}", store.path().display());
                    epoch.failed.push(store.owner());
                    self.events
                        .push(Event::CommitFailed { owner: store.owner(), message: error.to_string() });
                }
            }
        }
        if !deletes.is_empty() && self.storage.cluster().is_none() {
            if let Err(error) = self.index.write(&[], &deletes) {
                // Harmless: a stale entry is found out when it fires.
                log::warn!("the alarm index could not drop deleted alarms: {error}");
            }
        }
        self.stats.commit_points.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock();
        if kept.is_empty() {
            epoch.held = std::mem::take(&mut state.held);
            epoch.batch = std::mem::take(&mut state.batch);
        } else {
            // A transaction() block is still open (across an await): what was sent may show its
            // writes, which could still be undone. It waits for the commit point after the block.
            state.dirty.extend(kept);
        }
        let synced = epoch.logs.is_empty() && epoch.entries.is_empty() && epoch.checkpoints.is_empty();
        if synced && state.unreleased == 1 {
            // Nothing to wait for: release here, in order, before this batch's writes go out
            // (under the lock, as the committer does, so that no send can overtake it).
            state.unreleased = 0;
            release_all(epoch.held, &epoch.failed, &self.events);
            self.release_batch(&mut epoch.batch);
            if state.dirty.is_empty() {
                self.holding.store(false, Ordering::Release);
            }
            self.released.notify_all();
            return;
        }
        state.sealed.push_back(epoch);
        self.work.notify_one();
    }

    /// The committer thread: syncs the logs of every sealed epoch once per round, releases the
    /// epochs in order, then checkpoints, and closes the stores of hibernated objects.
    fn run(&self) {
        loop {
            let (round, closing) = {
                let mut state = self.state.lock();
                loop {
                    // A store with uncommitted writes is closed after its commit point.
                    let ready = state.closing.iter().any(|store| !store.in_epoch.load(Ordering::Acquire));
                    if !state.sealed.is_empty() || ready || (state.stop && state.sealed.is_empty()) {
                        break;
                    }
                    self.work.wait(&mut state);
                }
                let round: Vec<Epoch> = state.sealed.drain(..).collect();
                let stopping = state.stop;
                let (waiting, ready): (Vec<_>, Vec<_>) = std::mem::take(&mut state.closing)
                    .into_iter()
                    .partition(|store| store.in_epoch.load(Ordering::Acquire) && !stopping);
                state.closing = waiting;
                if stopping && round.is_empty() && ready.is_empty() {
                    return;
                }
                (round, ready)
            };
            if !round.is_empty() {
                self.sync_and_release(round);
            }
            for store in closing {
                self.storage.close(&store);
            }
        }
    }

    fn sync_and_release(&self, mut round: Vec<Epoch>) {
        if let Some(gate) = &self.test_gate {
            while !gate.exists() && !self.state.lock().stop {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.stats.rounds.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        // Each log once, the index's first, however many epochs wrote it.
        let mut seen = HashSet::new();
        let logs = round.iter().flat_map(|epoch| epoch.logs.iter());
        let (index_logs, object_logs): (Vec<_>, Vec<_>) = logs.partition(|(owner, _)| owner.is_none());
        let logs: Vec<_> = index_logs
            .into_iter()
            .chain(object_logs)
            .filter(|(_, log)| seen.insert(Arc::as_ptr(log)))
            .collect();
        let entries: Vec<&PathBuf> = round.iter().flat_map(|epoch| epoch.entries.iter()).collect();
        let mut sync_failed = Vec::new();
        if logs.len() + entries.len() > SYNCFS_ABOVE {
            // One journal commit for all of them: 64 logs take 2-3 ms this way, against 3 ms
            // each one by one (measured on this project's VM).
            self.stats.syncs.fetch_add(1, Ordering::Relaxed);
            // SAFETY: syncfs on an open descriptor; it touches no memory of ours.
            if unsafe { libc::syncfs(self.root.as_raw_fd()) } != 0 {
                log::error!("syncfs of the data directory failed: {}", std::io::Error::last_os_error());
                sync_failed.extend(logs.iter().map(|(owner, _)| *owner));
            }
        } else {
            for (owner, log) in &logs {
                self.stats.syncs.fetch_add(1, Ordering::Relaxed);
                if let Err(error) = log.sync_data() {
                    log::error!("fsync of a storage log failed: {error}");
                    sync_failed.push(*owner);
                }
            }
            for entry in entries {
                if let Err(error) = File::open(entry).and_then(|entry| entry.sync_all()) {
                    log::warn!("fsync of {}: {error}", entry.display());
                }
            }
        }
        self.events.stats.sync_seconds.observe_duration(started.elapsed());
        let index_failed = sync_failed.contains(&None);
        for epoch in &mut round {
            let failed_here: Vec<u64> = epoch
                .logs
                .iter()
                .filter_map(|(owner, _)| *owner)
                .filter(|owner| index_failed || sync_failed.contains(&Some(*owner)))
                .collect();
            for owner in failed_here {
                if !epoch.failed.contains(&owner) {
                    epoch.failed.push(owner);
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    let message = "the storage log could not be synced to disk".to_owned();
                    self.events.push(Event::CommitFailed { owner, message });
                }
            }
            release_all(std::mem::take(&mut epoch.held), &epoch.failed, &self.events);
            self.release_batch(&mut epoch.batch);
        }
        let released = round.len();
        // What was sent after the last sealed epoch goes out too, if nothing is pending: under
        // the lock, so that no send can overtake it.
        {
            let mut state = self.state.lock();
            state.unreleased -= released;
            if state.unreleased == 0 && state.dirty.is_empty() {
                let held = std::mem::take(&mut state.held);
                release_all(held, &[], &self.events);
                self.holding.store(false, Ordering::Release);
                self.release_batch(&mut state.batch);
            }
            if state.unreleased == 0 {
                self.released.notify_all();
            }
        }
        for store in round.iter().flat_map(|epoch| epoch.checkpoints.iter()) {
            store.checkpoint();
        }
    }

    /// What a batch sent is released: the connections waiting for it go on.
    fn release_batch(&self, batch: &mut u64) {
        let number = std::mem::take(batch);
        if number != 0 {
            self.events.batch_done(number);
        }
    }

    /// Waits until every sealed epoch is released (shutdown: before the sockets are closed).
    pub fn wait_released(&self) {
        let mut state = self.state.lock();
        while state.unreleased > 0 {
            self.released.wait(&mut state);
        }
    }

    /// Commits what is pending and waits until the committer has released and closed everything
    /// (graceful shutdown), then stops it.
    pub fn finish(&self) {
        self.commit_point();
        self.state.lock().stop = true;
        self.work.notify_one();
        if let Some(handle) = self.committer.lock().take() {
            let _ = handle.join();
        }
    }
}

fn release_all(held: Vec<Held>, failed: &[u64], events: &Events) {
    for item in held {
        release_one(item, failed, events);
    }
}

impl Drop for OutputGate {
    fn drop(&mut self) {
        self.state.lock().stop = true;
        self.work.notify_one();
    }
}
