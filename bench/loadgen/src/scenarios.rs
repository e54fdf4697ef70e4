//! The scenarios. Each opens its connections, then runs for a warm-up and a measured window,
//! and returns the figures as one JSON object.
//!
//! Every message the load generator sends carries, in its first 16 bytes, the time it was sent
//! (nanoseconds since the run's start) and a sequence number, so latency is measured from the
//! echo or the broadcast itself, with no per-message bookkeeping on the client.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, Stream, StreamExt};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::conn::{self, Target, Ws};
use crate::procfs;
use crate::report::{Json, Latencies, Tally, Window};

/// How long a reply may still arrive after the window ends before the connection gives up.
const GRACE: Duration = Duration::from_secs(5);
/// Per-connection time limit for the TCP connect plus the WebSocket handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Bytes at the head of each message: send time and sequence number.
const HEADER: usize = 16;

/// Settings shared by every scenario.
#[derive(Clone, Debug)]
pub struct Params {
    pub target: Target,
    pub connections: usize,
    pub size: usize,
    pub window: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub hold: Duration,
    pub max_messages: u64,
    pub connect_concurrency: usize,
    pub spread_sources: bool,
    /// The server process tree (pid and its descendants) whose CPU and memory are read.
    pub server_pids: Vec<u32>,
}

fn tokio_at(at: Instant) -> tokio::time::Instant {
    tokio::time::Instant::from_std(at)
}

/// A message of `size` bytes (at least the header) stamped with `stamp` and `seq`.
fn message(size: usize, stamp: u64, seq: u64) -> Message {
    let mut buf = vec![b'x'; size.max(HEADER)];
    buf[..8].copy_from_slice(&stamp.to_le_bytes());
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
    Message::Binary(Bytes::from(buf))
}

/// The (stamp, seq) a message carries.
fn header(data: &[u8]) -> Option<(u64, u64)> {
    let stamp = u64::from_le_bytes(data.get(..8)?.try_into().ok()?);
    let seq = u64::from_le_bytes(data.get(8..16)?.try_into().ok()?);
    Some((stamp, seq))
}

/// The next text or binary message; control frames are skipped (tungstenite answers pings).
async fn next_data<S>(s: &mut S) -> Result<Bytes, String>
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    for _ in 0..10_000 {
        match s.next().await {
            Some(Ok(Message::Binary(b))) => return Ok(b),
            Some(Ok(Message::Text(t))) => return Ok(Bytes::copy_from_slice(t.as_bytes())),
            Some(Ok(Message::Close(frame))) => return Err(format!("server closed: {frame:?}")),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("connection ended".to_string()),
        }
    }
    Err("no data message in 10,000 frames".to_string())
}

/// `next_data`, giving up at `deadline`.
async fn next_data_by<S>(s: &mut S, deadline: Instant) -> Result<Bytes, String>
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    match tokio::time::timeout_at(tokio_at(deadline), next_data(s)).await {
        Ok(r) => r,
        Err(_) => Err("timed out waiting for a message".to_string()),
    }
}

/// Close handshake, bounded in time: send Close, read until the server's Close or EOF.
async fn close(mut ws: Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        if ws.close(None).await.is_err() {
            return;
        }
        for _ in 0..100_000 {
            match ws.next().await {
                Some(Ok(_)) => continue,
                _ => break,
            }
        }
    })
    .await;
}

/// Open `n` connections, at most `concurrency` handshakes at a time.
async fn connect_many(
    p: &Params,
    target: &Target,
    n: usize,
    read_buffer: usize,
    lat: &Latencies,
) -> (Vec<Ws>, Tally) {
    let gate = Arc::new(Semaphore::new(p.connect_concurrency.max(1)));
    let config = conn::client_config(read_buffer);
    let handles: Vec<JoinHandle<Result<Ws, String>>> = (0..n)
        .map(|i| {
            let gate = gate.clone();
            let target = target.clone();
            let source = conn::source_addr(i, p.spread_sources);
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.map_err(|e| e.to_string())?;
                conn::connect(&target, source, config, CONNECT_TIMEOUT).await
            })
        })
        .collect();
    let mut conns = Vec::with_capacity(n);
    let mut tally = Tally::new(lat);
    for h in handles {
        match h.await {
            Ok(Ok(ws)) => conns.push(ws),
            Ok(Err(e)) => tally.error(e),
            Err(e) => tally.error(format!("connect task: {e}")),
        }
    }
    (conns, tally)
}

async fn join_tallies(handles: Vec<JoinHandle<Tally>>, into: &mut Tally) {
    for h in handles {
        match h.await {
            Ok(t) => into.merge(t),
            Err(e) => into.error(format!("task: {e}")),
        }
    }
}

/// CPU over the window, read at its two edges: the server's, the load generator's, and that of
/// everything else on the machine (which should be about 0 for a clean measurement).
struct Cpu {
    server_us: Option<u64>,
    client_us: u64,
    other_us: Option<u64>,
}

impl Cpu {
    fn unknown() -> Self {
        Self { server_us: None, client_us: 0, other_us: None }
    }

    fn read(pids: &[u32]) -> Self {
        Self {
            server_us: procfs::tree_cpu_us(pids),
            client_us: procfs::self_cpu_us(),
            other_us: procfs::system_busy_us(),
        }
    }

    /// The CPU used between an earlier reading and this one.
    fn since(self, before: &Cpu) -> Cpu {
        let server_us = match (before.server_us, self.server_us) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        let client_us = self.client_us.saturating_sub(before.client_us);
        let other_us = match (before.other_us, self.other_us) {
            (Some(a), Some(b)) => {
                Some(b.saturating_sub(a).saturating_sub(server_us.unwrap_or(0) + client_us))
            }
            _ => None,
        };
        Cpu { server_us, client_us, other_us }
    }
}

async fn cpu_over(w: Window, pids: Vec<u32>) -> Cpu {
    tokio::time::sleep_until(tokio_at(w.start)).await;
    let before = Cpu::read(&pids);
    tokio::time::sleep_until(tokio_at(w.end)).await;
    Cpu::read(&pids).since(&before)
}

/// The fields every scenario reports.
fn common(j: &mut Json, p: &Params, t: &Tally, messages: u64, secs: f64, cpu: &Cpu) {
    let cpu_us = cpu.server_us;
    j.str("url", &p.target.url)
        .int("connections", p.connections as u64)
        .int("size", p.size as u64)
        .int("window", p.window as u64)
        .num("duration_s", secs)
        .int("messages", messages)
        .num("msgs_per_s", messages as f64 / secs)
        .latency("", &t.lat.snapshot())
        .opt_num("server_cpu_ms", cpu_us.map(|c| c as f64 / 1000.0))
        .opt_num("server_cpu_util", cpu_us.map(|c| c as f64 / 1e6 / secs))
        .opt_num(
            "server_cpu_us_per_msg",
            cpu_us.and_then(|c| (messages > 0).then(|| c as f64 / messages as f64)),
        )
        .num("client_cpu_util", cpu.client_us as f64 / 1e6 / secs)
        .opt_num("other_cpu_util", cpu.other_us.map(|c| c as f64 / 1e6 / secs))
        .int("errors", t.errors);
    if let Some(e) = &t.first_error {
        j.str("first_error", e);
    }
}

// ---------------------------------------------------------------------------------------------
// pingpong / large: send one message, await its echo, repeat.

async fn pingpong_conn(mut ws: Ws, size: usize, w: Window, max: u64, lat: Latencies) -> Tally {
    let mut t = Tally::new(&lat);
    for seq in 0..max {
        let sent = Instant::now();
        if sent >= w.end {
            break;
        }
        if let Err(e) = ws.send(message(size, w.stamp(sent), seq)).await {
            t.error(format!("send: {e}"));
            return t;
        }
        match next_data_by(&mut ws, w.end + GRACE).await {
            Ok(data) if data.len() == size.max(HEADER) => t.record(&w, sent, Instant::now()),
            Ok(data) => t.error(format!("echo of {} bytes for {}", data.len(), size.max(HEADER))),
            Err(e) => {
                t.error(e);
                return t;
            }
        }
    }
    close(ws).await;
    t
}

pub async fn pingpong(p: &Params) -> Json {
    let lat = Latencies::new();
    let (conns, mut tally) =
        connect_many(p, &p.target, p.connections, conn::read_buffer_for(p.size, p.window), &lat).await;
    let w = Window::new(p.warmup, p.duration);
    let handles: Vec<_> = conns
        .into_iter()
        .map(|ws| tokio::spawn(pingpong_conn(ws, p.size, w, p.max_messages, lat.clone())))
        .collect();
    let cpu = cpu_over(w, p.server_pids.clone()).await;
    join_tallies(handles, &mut tally).await;
    let mut j = Json::default();
    common(&mut j, p, &tally, tally.messages, w.seconds(), &cpu);
    j
}

// ---------------------------------------------------------------------------------------------
// pipeline: up to W messages in flight per connection; a writer and a reader task per connection.

/// Above this many bytes in flight per connection, a writer and a reader task share the socket, so
/// that neither side can block the other on full socket buffers; below it, one task is cheaper.
const SINGLE_TASK_MAX_IN_FLIGHT: usize = 256 << 10;

async fn pipeline_conn(ws: Ws, size: usize, window: usize, w: Window, max: u64, lat: Latencies) -> Tally {
    let t = Tally::new(&lat);
    if window * size.max(HEADER) <= SINGLE_TASK_MAX_IN_FLIGHT {
        pipeline_conn_single(ws, size, window, w, max, t).await
    } else {
        pipeline_conn_split(ws, size, window, w, max, t).await
    }
}

/// One task: top the window up with one write, await one echo, take every echo already there.
async fn pipeline_conn_single(
    mut ws: Ws,
    size: usize,
    window: usize,
    w: Window,
    max: u64,
    mut t: Tally,
) -> Tally {
    let mut in_flight = 0usize;
    let mut seq = 0u64;
    let record = |t: &mut Tally, data: Bytes| match header(&data) {
        Some((stamp, _)) => t.record(&w, w.instant(stamp), Instant::now()),
        None => t.error(format!("echo of {} bytes", data.len())),
    };
    for _ in 0..max {
        let now = Instant::now();
        if now >= w.end {
            break;
        }
        if in_flight < window && seq < max {
            while in_flight < window && seq < max {
                if let Err(e) = ws.feed(message(size, w.stamp(now), seq)).await {
                    t.error(format!("send: {e}"));
                    return t;
                }
                in_flight += 1;
                seq += 1;
            }
            if let Err(e) = ws.flush().await {
                t.error(format!("flush: {e}"));
                return t;
            }
        }
        if in_flight == 0 {
            break;
        }
        match next_data_by(&mut ws, w.end + GRACE).await {
            Ok(data) => {
                record(&mut t, data);
                in_flight -= 1;
            }
            Err(e) => {
                t.error(e);
                return t;
            }
        }
        // Whatever else has already arrived, without waiting.
        while in_flight > 0 {
            match ws.next().now_or_never() {
                Some(Some(Ok(Message::Binary(data)))) => {
                    record(&mut t, data);
                    in_flight -= 1;
                }
                Some(Some(Ok(Message::Text(text)))) => {
                    record(&mut t, Bytes::copy_from_slice(text.as_bytes()));
                    in_flight -= 1;
                }
                Some(Some(Ok(Message::Close(frame)))) => {
                    t.error(format!("server closed: {frame:?}"));
                    return t;
                }
                Some(Some(Ok(_))) => {}
                Some(Some(Err(e))) => {
                    t.error(e.to_string());
                    return t;
                }
                Some(None) => {
                    t.error("connection ended".to_string());
                    return t;
                }
                None => break,
            }
        }
    }
    close(ws).await;
    t
}

/// A writer and a reader task, for large windows of large messages.
async fn pipeline_conn_split(ws: Ws, size: usize, window: usize, w: Window, max: u64, t: Tally) -> Tally {
    let lat = t.lat.clone();
    let (mut sink, mut stream) = ws.split();
    let credit = Arc::new(Semaphore::new(window.max(1)));
    let reader_credit = credit.clone();
    let reader = tokio::spawn(async move {
        let mut t = t;
        for _ in 0..max {
            match next_data_by(&mut stream, w.end + GRACE).await {
                Ok(data) => {
                    let done = Instant::now();
                    match header(&data) {
                        Some((stamp, _)) => t.record(&w, w.instant(stamp), done),
                        None => t.error(format!("echo of {} bytes", data.len())),
                    }
                    reader_credit.add_permits(1);
                    if done >= w.end {
                        break;
                    }
                }
                Err(e) => {
                    t.error(e);
                    break;
                }
            }
        }
        (t, stream)
    });
    let mut seq = 0u64;
    let mut write_error = None;
    'outer: while seq < max && Instant::now() < w.end {
        match tokio::time::timeout_at(tokio_at(w.end), credit.acquire()).await {
            Ok(Ok(permit)) => permit.forget(),
            _ => break,
        }
        // Send everything the window allows in one write.
        let mut batch = 0;
        loop {
            if let Err(e) = sink.feed(message(size, w.stamp(Instant::now()), seq)).await {
                write_error = Some(format!("send: {e}"));
                break 'outer;
            }
            seq += 1;
            batch += 1;
            if batch >= window || seq >= max {
                break;
            }
            match credit.try_acquire() {
                Ok(permit) => permit.forget(),
                Err(_) => break,
            }
        }
        if let Err(e) = sink.flush().await {
            write_error = Some(format!("flush: {e}"));
            break;
        }
    }
    let (mut t, stream) = match reader.await {
        Ok(r) => r,
        Err(e) => {
            let mut t = Tally::new(&lat);
            t.error(format!("reader task: {e}"));
            return t;
        }
    };
    if let Some(e) = write_error {
        t.error(e);
    }
    if let Ok(ws) = sink.reunite(stream) {
        close(ws).await;
    }
    t
}

pub async fn pipeline(p: &Params) -> Json {
    let lat = Latencies::new();
    let (conns, mut tally) =
        connect_many(p, &p.target, p.connections, conn::read_buffer_for(p.size, p.window), &lat).await;
    let w = Window::new(p.warmup, p.duration);
    let handles: Vec<_> = conns
        .into_iter()
        .map(|ws| tokio::spawn(pipeline_conn(ws, p.size, p.window, w, p.max_messages, lat.clone())))
        .collect();
    let cpu = cpu_over(w, p.server_pids.clone()).await;
    join_tallies(handles, &mut tally).await;
    let mut j = Json::default();
    common(&mut j, p, &tally, tally.messages, w.seconds(), &cpu);
    j
}

// ---------------------------------------------------------------------------------------------
// handshake: each of C workers opens a connection, echoes one message, closes, repeats.

async fn handshake_worker(p: Params, worker: usize, w: Window, lat: Latencies) -> Tally {
    let mut t = Tally::new(&lat);
    let config = conn::client_config(conn::read_buffer_for(p.size, 1));
    for k in 0..p.max_messages {
        let sent = Instant::now();
        if sent >= w.end || t.errors >= 100 {
            break;
        }
        let index = worker + k as usize * p.connections;
        let source = conn::source_addr(index, p.spread_sources);
        let mut ws = match conn::connect(&p.target, source, config, CONNECT_TIMEOUT).await {
            Ok(ws) => ws,
            Err(e) => {
                t.error(e);
                continue;
            }
        };
        if let Err(e) = ws.send(message(p.size, w.stamp(sent), k)).await {
            t.error(format!("send: {e}"));
            continue;
        }
        if let Err(e) = next_data_by(&mut ws, w.end + GRACE).await {
            t.error(e);
            continue;
        }
        close(ws).await;
        t.record(&w, sent, Instant::now());
    }
    t
}

pub async fn handshake(p: &Params) -> Json {
    let w = Window::new(p.warmup, p.duration);
    let lat = Latencies::new();
    let handles: Vec<_> = (0..p.connections.max(1))
        .map(|i| tokio::spawn(handshake_worker(p.clone(), i, w, lat.clone())))
        .collect();
    let cpu = cpu_over(w, p.server_pids.clone()).await;
    let mut tally = Tally::new(&lat);
    join_tallies(handles, &mut tally).await;
    let mut j = Json::default();
    common(&mut j, p, &tally, tally.messages, w.seconds(), &cpu);
    j
}

// ---------------------------------------------------------------------------------------------
// idle: open N connections (one echo each, to know the server has set each one up), hold them,
// and read the server's RSS and the kernel's socket memory before and after.

/// An idle connection, when its handshake started, and when its one echo came back.
type Opened = Result<(Ws, Instant, Instant), String>;

pub async fn idle(p: &Params) -> Json {
    let nofile = procfs::raise_nofile_limit(p.connections as u64 + 1024);
    let rss0 = procfs::tree_rss_kib(&p.server_pids);
    let sock0 = procfs::sockstat();
    let slab0 = procfs::slab_kib();
    let before = Cpu::read(&p.server_pids);
    let opened_at = Instant::now();
    // Every connect counts: the window spans the whole opening phase.
    let w = Window { t0: opened_at, start: opened_at, end: opened_at + Duration::from_secs(86_400) };
    let gate = Arc::new(Semaphore::new(p.connect_concurrency.max(1)));
    let config = conn::client_config(conn::read_buffer_for(p.size, 1));
    let handles: Vec<JoinHandle<Opened>> = (0..p.connections)
        .map(|i| {
            let gate = gate.clone();
            let target = p.target.clone();
            let source = conn::source_addr(i, p.spread_sources);
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.map_err(|e| e.to_string())?;
                let started = Instant::now();
                let mut ws = conn::connect(&target, source, config, CONNECT_TIMEOUT).await?;
                ws.send(message(64, 0, i as u64)).await.map_err(|e| format!("send: {e}"))?;
                next_data_by(&mut ws, Instant::now() + CONNECT_TIMEOUT).await?;
                Ok((ws, started, Instant::now()))
            })
        })
        .collect();
    let mut conns = Vec::with_capacity(p.connections);
    let mut tally = Tally::new(&Latencies::new());
    for h in handles {
        match h.await {
            Ok(Ok((ws, started, done))) => {
                tally.record(&w, started, done);
                conns.push(ws);
            }
            Ok(Err(e)) => tally.error(e),
            Err(e) => tally.error(format!("connect task: {e}")),
        }
    }
    let open_secs = opened_at.elapsed().as_secs_f64();
    // Client and other CPU over the opening phase; the server's until after the hold.
    let mut cpu = Cpu::read(&p.server_pids).since(&before);
    let opened = conns.len() as u64;
    // The sockets now sit idle; let the server settle before reading its memory.
    tokio::time::sleep(p.hold).await;
    let rss1 = procfs::tree_rss_kib(&p.server_pids);
    let sock1 = procfs::sockstat();
    let slab1 = procfs::slab_kib();
    cpu.server_us = Cpu::read(&p.server_pids).since(&before).server_us;
    let closers: Vec<_> = conns.into_iter().map(|ws| tokio::spawn(close(ws))).collect();
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        for c in closers {
            let _ = c.await;
        }
    })
    .await;

    let page = procfs::page_size();
    let per_conn = |before: u64, after: u64, unit: u64| {
        (opened > 0).then(|| (after as f64 - before as f64) * unit as f64 / opened as f64)
    };
    let mut j = Json::default();
    common(&mut j, p, &tally, opened, open_secs, &cpu);
    j.int("opened", opened)
        .int("nofile_limit", nofile)
        .num("hold_s", p.hold.as_secs_f64())
        .opt_num("rss_before_kib", rss0.map(|v| v as f64))
        .opt_num("rss_after_kib", rss1.map(|v| v as f64))
        .opt_num(
            "rss_per_conn_bytes",
            match (rss0, rss1) {
                (Some(a), Some(b)) => per_conn(a, b, 1024),
                _ => None,
            },
        )
        .int("tcp_inuse_before", sock0.tcp_inuse)
        .int("tcp_inuse_after", sock1.tcp_inuse)
        .int("tcp_mem_before_bytes", sock0.tcp_mem_pages * page)
        .int("tcp_mem_after_bytes", sock1.tcp_mem_pages * page)
        .opt_num("kernel_mem_per_conn_bytes", per_conn(sock0.tcp_mem_pages, sock1.tcp_mem_pages, page))
        .opt_num(
            "kernel_slab_per_conn_bytes",
            match (slab0, slab1) {
                (Some(a), Some(b)) => per_conn(a, b, 1024),
                _ => None,
            },
        );
    j
}

// ---------------------------------------------------------------------------------------------
// broadcast: N subscribers and one publisher on the same path (the room). The publisher keeps
// `window` messages in flight; a message is done when the last subscriber has it. After the
// window, the publisher sends a stop message through the room, and each subscriber closes.

const RING: usize = 4096;
/// The sequence number of the stop message.
const STOP: u64 = u64::MAX - 1;
/// A ring slot no message is using.
const FREE: u64 = u64::MAX;

struct Slot {
    seq: AtomicU64,
    delivered: AtomicU32,
}

struct Room {
    t0: Instant,
    subscribers: u32,
    slots: Vec<Slot>,
    credit: Semaphore,
    window: OnceLock<Window>,
    /// Publish to last delivery, for messages inside the window.
    last: Latencies,
    /// Publish to each delivery; deliveries counted and subscribers' errors.
    tally: Mutex<Tally>,
}

impl Room {
    fn delivered(&self, seq: u64, stamp: u64, done: Instant) {
        let slot = &self.slots[seq as usize % RING];
        if slot.seq.load(Ordering::Acquire) != seq {
            return; // a message given up on
        }
        if slot.delivered.fetch_add(1, Ordering::AcqRel) + 1 == self.subscribers {
            if let Some(w) = self.window.get() {
                self.last.record_in(w, self.t0 + Duration::from_nanos(stamp), done);
            }
            self.credit.add_permits(1);
        }
    }

    fn publish_slot(&self, seq: u64) -> &Slot {
        let slot = &self.slots[seq as usize % RING];
        slot.delivered.store(0, Ordering::Release);
        slot.seq.store(seq, Ordering::Release);
        slot
    }
}

async fn subscriber(mut ws: Ws, room: Arc<Room>, max: u64) {
    // No per-message timer: the stop message ends the loop, and the run aborts a subscriber that
    // has not seen it a few seconds after the window.
    for _ in 0..max {
        let result = next_data(&mut ws).await;
        let done = Instant::now();
        let error = match result {
            Ok(data) => match header(&data) {
                Some((_, STOP)) => break,
                Some((stamp, seq)) => {
                    if let Some(w) = room.window.get() {
                        if let Ok(mut t) = room.tally.lock() {
                            t.record(w, room.t0 + Duration::from_nanos(stamp), done);
                        }
                    }
                    room.delivered(seq, stamp, done);
                    continue;
                }
                None => format!("broadcast of {} bytes", data.len()),
            },
            Err(e) => e,
        };
        if let Ok(mut t) = room.tally.lock() {
            t.error(error);
        }
        return;
    }
    close(ws).await;
}

pub async fn broadcast(p: &Params) -> Json {
    let n = p.connections.max(1);
    let deliveries = Latencies::new();
    let (subs, mut tally) =
        connect_many(p, &p.target, n, conn::read_buffer_for(p.size, p.window), &deliveries).await;
    let (publisher, pub_tally) =
        connect_many(p, &p.target, 1, conn::read_buffer_for(p.size, p.window), &deliveries).await;
    tally.merge(pub_tally);
    let (Some(publisher), false) = (publisher.into_iter().next(), subs.is_empty()) else {
        let mut j = Json::default();
        common(&mut j, p, &tally, 0, p.duration.as_secs_f64(), &Cpu::unknown());
        return j;
    };
    let room = Arc::new(Room {
        t0: Instant::now(),
        subscribers: subs.len() as u32,
        slots: (0..RING).map(|_| Slot { seq: AtomicU64::new(FREE), delivered: AtomicU32::new(0) }).collect(),
        // Credit is added when a message has reached every subscriber.
        credit: Semaphore::new(0),
        window: OnceLock::new(),
        last: Latencies::new(),
        tally: Mutex::new(Tally::new(&deliveries)),
    });
    let handles: Vec<_> =
        subs.into_iter().map(|ws| tokio::spawn(subscriber(ws, room.clone(), p.max_messages))).collect();

    let (mut sink, mut stream) = publisher.split();
    // Whatever the server sends the publisher (some servers include the sender) is drained.
    let drain = tokio::spawn(async move {
        for _ in 0..u64::MAX {
            match stream.next().await {
                Some(Ok(_)) => {}
                _ => break,
            }
        }
    });
    let mut seq = 0u64;
    let mut lost = 0u64;
    let mut published = 0u64;
    let mut send_error = None;
    // Setup: a subscriber's handshake may complete before the server has put it in the room, so
    // probe until one message reaches every subscriber (each probe waits at most 200 ms).
    let mut ready = false;
    for _ in 0..100 {
        let slot = room.publish_slot(seq);
        if let Err(e) = sink.send(message(p.size, room.t0.elapsed().as_nanos() as u64, seq)).await {
            send_error = Some(format!("send: {e}"));
            break;
        }
        seq += 1;
        match tokio::time::timeout(Duration::from_millis(200), room.credit.acquire()).await {
            Ok(Ok(permit)) => {
                permit.forget();
                ready = true;
                break;
            }
            _ => {
                lost += 1;
                slot.seq.store(FREE, Ordering::Release);
            }
        }
    }
    room.credit.add_permits(p.window.max(1));
    let setup_lost = lost;
    let w = Window::after(room.t0, p.warmup, p.duration);
    let _ = room.window.set(w);
    let cpu = tokio::spawn(cpu_over(w, p.server_pids.clone()));
    while ready && send_error.is_none() && seq < p.max_messages.min(STOP) {
        let now = Instant::now();
        if now >= w.end {
            break;
        }
        let give_up = (now + Duration::from_secs(5)).min(w.end);
        match tokio::time::timeout_at(tokio_at(give_up), room.credit.acquire()).await {
            Ok(Ok(permit)) => permit.forget(),
            Ok(Err(_)) => break,
            Err(_) => {
                if Instant::now() < w.end {
                    // No message completed for 5 s: count one as lost and go on.
                    lost += 1;
                    room.credit.add_permits(1);
                }
                continue;
            }
        }
        room.publish_slot(seq);
        let sent = Instant::now();
        if let Err(e) = sink.send(message(p.size, w.stamp(sent), seq)).await {
            send_error = Some(format!("send: {e}"));
            break;
        }
        if sent >= w.start {
            published += 1;
        }
        seq += 1;
    }
    let cpu = cpu.await.unwrap_or_else(|_| Cpu::unknown());
    let _ = sink.send(message(p.size, w.stamp(Instant::now()), STOP)).await;
    let stop_by = tokio_at(Instant::now() + Duration::from_secs(5));
    for h in handles {
        let abort = h.abort_handle();
        if tokio::time::timeout_at(stop_by, h).await.is_err() {
            abort.abort();
        }
    }
    // Close the publisher: the drain task ends with the server's Close.
    let _ = sink.send(Message::Close(None)).await;
    let drain_abort = drain.abort_handle();
    if tokio::time::timeout(Duration::from_secs(2), drain).await.is_err() {
        drain_abort.abort();
    }
    if let Ok(mut t) = room.tally.lock() {
        tally.merge(std::mem::replace(&mut *t, Tally::new(&deliveries)));
    }
    if let Some(e) = send_error {
        tally.error(e);
    }
    if !ready {
        tally.error("no probe reached every subscriber within 20 s".to_string());
    }
    let secs = w.seconds();
    let delivered = tally.messages;
    let mut j = Json::default();
    // The headline latency is publish to last delivery; per delivery follows.
    let mut last = Tally::new(&room.last);
    last.messages = tally.messages;
    last.errors = tally.errors;
    last.first_error = tally.first_error.take();
    common(&mut j, p, &last, delivered, secs, &cpu);
    j.int("subscribers", n as u64)
        .int("published", published)
        .num("publishes_per_s", published as f64 / secs)
        .int("setup_probes_lost", setup_lost)
        .int("lost", lost - setup_lost)
        .latency("delivery_", &deliveries.snapshot());
    j
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_carries_stamp_and_seq() {
        let Message::Binary(b) = message(64, 123, 7) else { panic!("binary expected") };
        assert_eq!(b.len(), 64);
        assert_eq!(header(&b), Some((123, 7)));
        let Message::Binary(b) = message(1, 5, 6) else { panic!("binary expected") };
        assert_eq!(b.len(), HEADER);
        assert_eq!(header(&b[..10]), None);
    }
}
