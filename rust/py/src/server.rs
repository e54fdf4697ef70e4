//! `Server`: start and stop the core, take event batches, account for their CPU.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use pyo3::prelude::*;
use sockworker_core::cluster::{Cluster, ClusterConfig, Owner};
use sockworker_core::gate::OutputGate;
use sockworker_core::meter::{thread_cpu_clock, thread_cpu_ns, BatchClock};
use sockworker_core::metrics::{Cidr, MetricsConfig, DEFAULT_TOP_ACCOUNTS};
use sockworker_core::stats::CoreStats;
use sockworker_core::watchdog::{
    current_thread_ident, tick_for, BlockedHook, Overrun, Watch, Watchdog, WatchdogHooks,
};
use sockworker_core::{ConnectRequest, CoreError, Durability, FetchRequest, ServerConfig, StorageConfig};

use crate::convert::{events_to_vec, EventSlot};
use crate::errors::{cpu_limit_exceeded, wall_limit_exceeded, Result};
use crate::meter::{Meter, Slot};
use crate::object::ObjectState;
use crate::reactor::Reactor;
use crate::socket::{SocketHandle, SocketLimits};
use crate::step::{Dispatch, Metered, Steps};
use crate::storage::Store;

#[pyclass(frozen, module = "sockworker._native")]
pub struct Server {
    inner: Mutex<Option<sockworker_core::Server>>,
    fd: i32,
    address: SocketAddr,
    /// Where the metrics listener listens, if there is one.
    metrics_address: Option<SocketAddr>,
    dispatch: Arc<Mutex<Dispatch>>,
    watch: Arc<Watch>,
    watchdog: Mutex<Option<Watchdog>>,
    /// CPU accounting and limits are on.
    metering: bool,
    /// The application thread's ident.
    ident: u64,
}

/// Starts the watchdog of the calling thread (the application thread): an event over its CPU
/// (or wall-clock) budget gets `CpuLimitExceeded` (`WallLimitExceeded`) raised in it, at the
/// next bytecode the thread runs; one that holds the thread for `blocked_after` is reported
/// to `on_blocked(kind, seconds)`, called on the watchdog thread with the GIL held.
fn start_watchdog(
    watch: &Arc<Watch>,
    smallest_limit: Duration,
    blocked_after: Option<Duration>,
    on_blocked: Option<Py<PyAny>>,
    stats: Arc<CoreStats>,
) -> std::io::Result<Watchdog> {
    let ident = current_thread_ident() as std::ffi::c_long;
    let seen = watch.clone();
    let interrupt = Box::new(move |progress, overrun| {
        Python::attach(|py| {
            // Under the GIL the application thread stands still: the event is still the same.
            if !seen.is_running(progress) {
                return;
            }
            let (class, kills) = match overrun {
                Overrun::Cpu => (cpu_limit_exceeded(py), &stats.cpu_kills),
                Overrun::Wall => (wall_limit_exceeded(py), &stats.wall_kills),
            };
            kills.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // SAFETY: the GIL is held; the class is a live exception type.
            unsafe { pyo3::ffi::PyThreadState_SetAsyncExc(ident, class.as_ptr()) };
            // Only a CPU overrun is thrown in again at later steps of an async event.
            if overrun == Overrun::Cpu {
                seen.mark_interrupted(progress);
            }
        });
    });
    let blocked = match (blocked_after, on_blocked) {
        (Some(after), Some(hook)) => {
            let seen = watch.clone();
            let report: BlockedHook = Box::new(move |progress, held| {
                Python::attach(|py| {
                    if !seen.is_running(progress) {
                        return;
                    }
                    if let Err(error) = hook.call1(py, (seen.kind(), held.as_secs_f64())) {
                        error.print(py);
                    }
                });
            });
            Some((after, report))
        }
        _ => None,
    };
    let tick = tick_for(blocked_after.map_or(smallest_limit, |after| after.min(smallest_limit)));
    Watchdog::start(watch.clone(), thread_cpu_clock(), tick, WatchdogHooks { interrupt, blocked })
}

/// A duration in seconds from Python, `None` when it is 0 (off).
fn optional_seconds(value: f64, name: &str) -> Result<Option<Duration>, CoreError> {
    Ok(if value > 0.0 { Some(seconds(value, name)?) } else { None })
}

impl Server {
    /// The output gate of the running server, if it has storage.
    fn gate(&self) -> Option<Arc<OutputGate>> {
        self.inner.lock().as_ref()?.gate().cloned()
    }

    /// The cluster, in cluster mode.
    fn cluster(&self) -> Option<Arc<Cluster>> {
        self.gate()?.storage().cluster().cloned()
    }
}

/// What `cluster_route` answers: (this node's epoch, or the owner node and its address).
type Route = (Option<i64>, Option<String>, Option<String>);

fn route_tuple(owner: Owner) -> Route {
    match owner {
        Owner::Here { epoch } => (Some(epoch), None, None),
        Owner::There { node, advertise } => (None, Some(node), advertise),
    }
}

fn seconds(value: f64, name: &str) -> Result<Duration, CoreError> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| CoreError::InvalidArgument(format!("{name} must be a number of seconds >= 0")))
}

#[pymethods]
impl Server {
    #[new]
    #[pyo3(signature = (host, port, *, limits, io_threads, metering=true, certfile=None, keyfile=None, smallest_cpu_limit=30.0, allowed_origins=None, log_blocked_after=1.0, on_blocked=None, compression=false, data_dir=None, durability="full", reactor=None, cluster=None, reuse_port=false, link_port=None, metrics=None, meter=None, access_log=false, stream_request_bodies=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        host: &str,
        port: u16,
        limits: &SocketLimits,
        io_threads: usize,
        metering: bool,
        certfile: Option<std::path::PathBuf>,
        keyfile: Option<std::path::PathBuf>,
        smallest_cpu_limit: f64,
        allowed_origins: Option<Vec<String>>,
        log_blocked_after: f64,
        on_blocked: Option<Py<PyAny>>,
        compression: bool,
        data_dir: Option<std::path::PathBuf>,
        durability: &str,
        reactor: Option<&Reactor>,
        cluster: Option<(String, String, String, f64, f64)>,
        reuse_port: bool,
        link_port: Option<u16>,
        metrics: Option<(String, u16, bool, usize, f64, Vec<String>)>,
        meter: Option<&Meter>,
        access_log: bool,
        stream_request_bodies: bool,
    ) -> Result<Self> {
        let meter = meter.map(|meter| meter.inner.clone());
        let reactor = reactor.map(|reactor| reactor.inner.clone());
        let socket_limits = limits.inner.clone();
        let build = || -> Result<sockworker_core::Server, CoreError> {
            let addr = (host, port)
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| CoreError::InvalidArgument(format!("cannot resolve host {host:?}")))?;
            let limits = (*socket_limits).clone();
            let tls = match (&certfile, &keyfile) {
                (Some(cert), Some(key)) => Some(sockworker_core::tls::server_config(cert, key)?),
                (None, None) => None,
                _ => {
                    return Err(CoreError::InvalidArgument("certfile and keyfile go together".into()));
                }
            };
            let durability = match durability {
                "full" => Durability::Full,
                "normal" => Durability::Normal,
                other => {
                    return Err(CoreError::InvalidArgument(format!(
                        "durability is \"full\" or \"normal\", not {other:?}"
                    )));
                }
            };
            let cluster = match cluster {
                Some((dsn, node_id, advertise, lease, renew)) => Some(ClusterConfig {
                    dsn,
                    node_id,
                    advertise,
                    lease: seconds(lease, "lease")?,
                    renew: seconds(renew, "lease renewal interval")?,
                }),
                None => None,
            };
            if cluster.is_some() && data_dir.is_none() {
                return Err(CoreError::InvalidArgument(
                    "cluster mode needs storage (a data directory)".into(),
                ));
            }
            let storage = data_dir.map(|data_dir| StorageConfig { data_dir, durability, cluster });
            let link_addr = link_port.map(|port| std::net::SocketAddr::new(addr.ip(), port));
            let metrics = match metrics {
                Some((host, port, dashboard, top_accounts, messages_per_request, allow)) => {
                    let addr = (host.as_str(), port).to_socket_addrs()?.next().ok_or_else(|| {
                        CoreError::InvalidArgument(format!("cannot resolve the metrics host {host:?}"))
                    })?;
                    let meter = meter.clone().ok_or_else(|| {
                        CoreError::InvalidArgument("the metrics listener needs the app's meter".into())
                    })?;
                    let top_accounts = if top_accounts == 0 { DEFAULT_TOP_ACCOUNTS } else { top_accounts };
                    let allow = allow
                        .iter()
                        .map(|cidr| {
                            Cidr::parse(cidr)
                                .map_err(|e| CoreError::InvalidArgument(format!("metrics allow-list: {e}")))
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    Some(MetricsConfig { addr, dashboard, top_accounts, messages_per_request, meter, allow })
                }
                None => None,
            };
            let config = ServerConfig {
                addr,
                io_threads,
                limits,
                tls,
                storage,
                allowed_origins,
                compression,
                reuse_port,
                link_addr,
                metrics,
                access_log,
                stream_request_bodies,
            };
            match reactor {
                Some(reactor) => sockworker_core::Server::start_in(config, reactor),
                None => sockworker_core::Server::start(config),
            }
        };
        let server = py.detach(build)?;
        let watch = Arc::new(Watch::default());
        let smallest = seconds(smallest_cpu_limit, "smallest_cpu_limit")?;
        let blocked_after = optional_seconds(log_blocked_after, "log_blocked_after")?;
        let watchdog = if metering {
            let dog = start_watchdog(&watch, smallest, blocked_after, on_blocked, server.stats().clone());
            Some(dog?)
        } else {
            None
        };
        // This thread's sends go through the server's output gate from now on.
        sockworker_core::gate::install(server.gate().cloned());
        Ok(Self {
            fd: server.events().fd(),
            address: server.local_addr(),
            metrics_address: server.metrics_addr(),
            inner: Mutex::new(Some(server)),
            dispatch: Arc::new(Mutex::new(Dispatch { clock: BatchClock::new(thread_cpu_ns()), step: None })),
            watch,
            watchdog: Mutex::new(watchdog),
            metering,
            ident: current_thread_ident(),
        })
    }

    /// The bound (host, port); the port is the real one when 0 was asked for.
    #[getter]
    fn address(&self) -> (String, u16) {
        (self.address.ip().to_string(), self.address.port())
    }

    /// The metrics listener's bound (host, port), if there is one.
    #[getter]
    fn metrics_address(&self) -> Option<(String, u16)> {
        self.metrics_address.map(|addr| (addr.ip().to_string(), addr.port()))
    }

    /// The server's sockets are driven by the application thread's reactor.
    #[getter]
    fn single_threaded(&self) -> bool {
        self.inner.lock().as_ref().is_some_and(sockworker_core::Server::is_single_threaded)
    }

    /// The descriptor that becomes readable when events wait (for `loop.add_reader`).
    fn fileno(&self) -> i32 {
        self.fd
    }

    /// Every waiting event, as tuples (see the module `convert`), in arrival order. Iterating
    /// the batch tells the meter and the watchdog which event runs.
    fn drain(&self, py: Python<'_>) -> Batch {
        let guard = self.inner.lock();
        let events = guard.as_ref().map(sockworker_core::Server::begin_batch).unwrap_or_default();
        let dispatch = if self.metering {
            let mut state = self.dispatch.lock();
            state.clock.begin();
            Some(self.dispatch.clone())
        } else {
            None
        };
        drop(guard);
        let events = events_to_vec(py, events);
        Batch { events: events.into_iter(), dispatch, watch: self.watch.clone() }
    }

    /// The Python thread ident of the thread that made the server (the application thread),
    /// for the report of a blocked loop.
    #[getter]
    fn thread_ident(&self) -> u64 {
        self.ident
    }

    /// Ends the batch `drain` began: charges its CPU time, commits what its handlers wrote (a
    /// commit point of the output gate), and writes what they sent (from this thread when few
    /// sockets were touched, else through their I/O tasks). Call it after every `drain`.
    fn flush(&self) {
        let mut dispatch = self.dispatch.lock();
        if dispatch.clock.in_batch() {
            dispatch.clock.end(thread_cpu_ns);
        }
        drop(dispatch);
        self.watch.leave();
        if let Some(server) = &*self.inner.lock() {
            server.end_batch();
        }
    }

    /// A commit point outside a batch (after a loop iteration whose tasks wrote).
    fn commit(&self) {
        if let Some(gate) = self.gate() {
            gate.commit_point();
        }
    }

    /// The open store of an object (opened now if it is not); `owner` is the key of its core
    /// state, whose sockets a failed commit closes.
    fn open_store(&self, namespace: &str, object_id: &str, owner: u64) -> Result<Store> {
        let gate = self
            .gate()
            .ok_or_else(|| CoreError::Storage("this server has no storage (no data directory)".into()))?;
        let store = gate.storage().store(namespace, object_id, owner)?;
        Ok(Store::new(store, gate))
    }

    /// Cluster mode: who serves an object now. `(epoch, None, None)` when this node holds its
    /// lease (taken now if it was free), `(None, node, address)` when another node does; `None`
    /// outside cluster mode. Asks PostgreSQL only when this node's lease is not known valid.
    fn cluster_route(&self, py: Python<'_>, namespace: &str, object_id: &str) -> Result<Option<Route>> {
        let Some(cluster) = self.cluster() else { return Ok(None) };
        let name = sockworker_core::storage::ObjectName::new(namespace, object_id);
        let owner = py.detach(|| cluster.route(&name))?;
        Ok(Some(route_tuple(owner)))
    }

    /// Cluster mode: `cluster_route` when the core knows the answer without asking PostgreSQL;
    /// None when it would have to ask (or not in cluster mode).
    fn cluster_known_route(&self, namespace: &str, object_id: &str) -> Option<Route> {
        let name = sockworker_core::storage::ObjectName::new(namespace, object_id);
        self.cluster()?.known_route(&name).map(route_tuple)
    }

    /// Cluster mode: a forward to the owner failed; the next route asks PostgreSQL again.
    fn cluster_forget(&self, namespace: &str, object_id: &str) {
        if let Some(cluster) = self.cluster() {
            cluster.forget_owner(&sockworker_core::storage::ObjectName::new(namespace, object_id));
        }
    }

    /// Cluster mode: the object left this node; its lease is given up with the next round.
    fn cluster_release(&self, namespace: &str, object_id: &str) {
        if let Some(cluster) = self.cluster() {
            cluster.release(&sockworker_core::storage::ObjectName::new(namespace, object_id));
        }
    }

    /// Cluster mode: the other nodes seen alive by the last lease round, (node id, address).
    fn cluster_peers(&self) -> Vec<(String, String)> {
        self.cluster().map_or_else(Vec::new, |cluster| cluster.peers())
    }

    /// Cluster mode: the objects whose lease this node lost since the last call.
    fn cluster_lost(&self) -> Vec<(String, String)> {
        self.cluster().map_or_else(Vec::new, |cluster| {
            cluster.take_lost().into_iter().map(|n| (n.namespace.into(), n.object_id.into())).collect()
        })
    }

    /// Cluster mode: (node id, address, leases held, statements, renewal rounds, leases taken,
    /// leases lost, fenced commits, commits); `None` outside cluster mode.
    #[allow(clippy::type_complexity)]
    fn cluster_stats(&self) -> Option<(String, String, usize, u64, u64, u64, u64, u64, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        let cluster = self.cluster()?;
        let stats = &cluster.stats;
        Some((
            cluster.config().node_id.clone(),
            cluster.config().advertise.clone(),
            cluster.held_count(),
            stats.statements.load(Relaxed),
            stats.renew_rounds.load(Relaxed),
            stats.acquired.load(Relaxed),
            stats.lost.load(Relaxed),
            stats.fenced.load(Relaxed),
            stats.commits.load(Relaxed),
        ))
    }

    /// The core state of an object: the same one for an id while any of it is alive.
    fn object_state(&self, namespace: &str, object_id: &str, max_sockets: usize) -> PyResult<ObjectState> {
        let inner = self.inner.lock();
        let server =
            inner.as_ref().ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("the server stopped"))?;
        let name = sockworker_core::storage::ObjectName::new(namespace, object_id);
        Ok(ObjectState::from(server.objects().get_or_make(name, max_sockets)))
    }

    /// Objects whose core state is alive (they have sockets, or a host in Python).
    #[getter]
    fn live_objects(&self) -> usize {
        self.inner.lock().as_ref().map_or(0, |server| server.objects().len())
    }

    /// A token to await before using a result of object `owner` (an RPC's): None when nothing is
    /// held, else an RELEASED event with the token follows once what came before is durable.
    fn hold_token(&self, owner: u64, token: u64) -> Option<u64> {
        sockworker_core::gate::token(owner, token)
    }

    /// Arms an object's alarm in the scheduler only (a retry, or a re-check): it is not stored.
    #[pyo3(signature = (namespace, object_id, at, retry, id_name=None))]
    fn arm_alarm(&self, namespace: &str, object_id: &str, at: f64, retry: u32, id_name: Option<&str>) {
        if let Some(gate) = self.gate() {
            let name = Arc::new(sockworker_core::storage::ObjectName::new(namespace, object_id));
            gate.alarms().set(&name, at, retry, id_name);
        }
    }

    /// Bytes in the data directory (counted at most 10 s ago; 0 without storage).
    #[getter]
    fn storage_bytes(&self) -> u64 {
        self.gate().map_or(0, |gate| gate.storage().bytes())
    }

    /// (commit points, commits, log fsyncs, committer rounds, failed commits, open stores,
    /// armed alarms): for the benchmarks and tests.
    fn storage_stats(&self) -> (u64, u64, u64, u64, u64, usize, usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(gate) = self.gate() else { return (0, 0, 0, 0, 0, 0, 0) };
        let stats = &gate.stats;
        (
            stats.commit_points.load(Relaxed),
            stats.commits.load(Relaxed),
            stats.syncs.load(Relaxed),
            stats.rounds.load(Relaxed),
            stats.failed.load(Relaxed),
            gate.storage().open_count(),
            gate.alarms().armed(),
        )
    }

    /// The slot billed for the code running now (an event of the batch, or an async step).
    fn current_slot(&self) -> Option<Slot> {
        let dispatch = self.dispatch.lock();
        let slot = match &dispatch.step {
            Some((slot, _, _)) => Some(slot),
            None if dispatch.clock.in_batch() => dispatch.clock.current(),
            None => None,
        };
        slot.map(|slot| Slot { inner: slot.clone() })
    }

    /// Bills the running event of the batch to `slot` (a request, once its account is known).
    fn relabel(&self, slot: &Slot) {
        let mut dispatch = self.dispatch.lock();
        if dispatch.clock.in_batch() {
            dispatch.clock.relabel(&slot.inner);
            self.watch.set_budget(slot.inner.cpu_limit_ns(), slot.inner.wall_limit_ns());
        }
    }

    /// `coro`, each of its steps measured and charged to `slot` (see `Metered`).
    fn metered(&self, coro: Py<PyAny>, slot: &Slot) -> Metered {
        let steps = Steps { dispatch: self.dispatch.clone(), watch: self.watch.clone() };
        Metered::new(coro, slot.inner.clone(), steps)
    }

    /// The open socket with this id (used to wake the object of a hibernated socket).
    fn socket(&self, id: u64) -> Option<SocketHandle> {
        self.inner.lock().as_ref()?.socket(id).map(|socket| SocketHandle { socket })
    }

    #[getter]
    fn open_sockets(&self) -> usize {
        self.inner.lock().as_ref().map_or(0, sockworker_core::Server::open_sockets)
    }

    /// Opens an outgoing WebSocket; a CONNECTED event with `token` reports the outcome.
    #[pyo3(signature = (url, protocols, headers, slot, token, ca_file=None))]
    fn connect(
        &self,
        url: String,
        protocols: Vec<String>,
        headers: Vec<(String, String)>,
        slot: Option<&Slot>,
        token: u64,
        ca_file: Option<String>,
    ) {
        let slot = slot.map(|s| s.inner.clone());
        let request = ConnectRequest { url, protocols, headers, slot, ca_file, token };
        if let Some(server) = &*self.inner.lock() {
            server.connect(request);
        }
    }

    /// Sends an outgoing HTTP request; a FETCHED event with `token` reports the outcome.
    /// `max_redirects` None: redirects are not followed. Times in seconds.
    #[pyo3(signature = (url, method, headers, body, token, timeout, connect_timeout, max_response_size, max_redirects, ca_file=None))]
    #[allow(clippy::too_many_arguments)]
    fn fetch(
        &self,
        url: String,
        method: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        token: u64,
        timeout: f64,
        connect_timeout: f64,
        max_response_size: usize,
        max_redirects: Option<u32>,
        ca_file: Option<String>,
    ) -> PyResult<()> {
        let seconds = |value: f64, name: &str| {
            Duration::try_from_secs_f64(value).map_err(|_| {
                pyo3::exceptions::PyValueError::new_err(format!(
                    "{name} is a number of seconds >= 0, not {value}"
                ))
            })
        };
        let request = FetchRequest {
            url,
            method,
            headers,
            body: body.into(),
            ca_file,
            timeout: seconds(timeout, "timeout")?,
            connect_timeout: seconds(connect_timeout, "connect_timeout")?,
            max_response_size,
            max_redirects,
            token,
        };
        if let Some(server) = &*self.inner.lock() {
            server.fetch(request);
        }
        Ok(())
    }

    /// Drops the fetch of `token` if it is still in flight (no FETCHED event comes for it).
    fn cancel_fetch(&self, token: u64) {
        if let Some(server) = &*self.inner.lock() {
            server.cancel_fetch(token);
        }
    }

    /// Stops accepting and closes every socket with `code` (after what the output gate holds
    /// is released); an ALL_CLOSED event follows.
    fn shutdown(&self, py: Python<'_>, code: u16, reason: &str) {
        if let Some(server) = &*self.inner.lock() {
            py.detach(|| server.shutdown(code, reason));
        }
    }

    /// Commits and releases what storage holds, closes the stores, then stops the I/O threads
    /// and the watchdog. Open connections are dropped.
    fn stop(&self, py: Python<'_>) {
        sockworker_core::gate::install(None);
        let server = self.inner.lock().take();
        let watchdog = self.watchdog.lock().take();
        py.detach(move || {
            drop(watchdog);
            drop(server);
        });
    }
}

/// One batch of events; iterate it once, then call `Server.flush`.
#[pyclass(module = "sockworker._native")]
pub struct Batch {
    events: std::vec::IntoIter<(Py<PyAny>, EventSlot, u8)>,
    /// The accounting state (None: metering is off).
    dispatch: Option<Arc<Mutex<Dispatch>>>,
    watch: Arc<Watch>,
}

#[pymethods]
impl Batch {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self) -> Option<Py<PyAny>> {
        let (event, billed, kind) = self.events.next()?;
        if let Some(dispatch) = &self.dispatch {
            self.watch.set_kind(kind);
            let slot = match billed {
                // Same slot: the run goes on; only the watchdog hears of a new event.
                EventSlot::Same => {
                    self.watch.next_event();
                    return Some(event);
                }
                EventSlot::Unbilled => None,
                EventSlot::Slot(slot) => Some(slot),
            };
            if dispatch.lock().clock.enter(slot.as_ref()) {
                let budget = slot.as_ref().map_or(u64::MAX, |slot| slot.cpu_limit_ns());
                let wall = slot.as_ref().map_or(u64::MAX, |slot| slot.wall_limit_ns());
                self.watch.enter(budget, wall, None);
            } else {
                self.watch.next_event();
            }
        }
        Some(event)
    }

    fn __len__(&self) -> usize {
        self.events.len()
    }
}
