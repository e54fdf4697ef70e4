//! The metrics listener (`--metrics-port`): Prometheus text on `/metrics` and, with the
//! dashboard on, its page at `/_sockworker` and the JSON it polls at `/_sockworker/stats`.
//!
//! It runs on a thread of its own (a small tokio runtime), so a scrape never waits behind the
//! application thread, a busy handler, or the I/O threads: everything it reports is read from
//! atomics and from maps behind short locks (the meter's slots, the open sockets, the live
//! objects) that no handler holds while it runs.
//!
//! Only the clients of `MetricsConfig::allow` (`--metrics-allow`; by default loopback only)
//! may use it: a connection from another address is answered 403 as soon as it is accepted,
//! before any of its request is read, and counted in `sockworker_metrics_refused_total`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

pub use crate::config::{allowed, loopback, Cidr, MetricsConfig, DEFAULT_TOP_ACCOUNTS};
use crate::event::Events;
use crate::gate::OutputGate;
use crate::memory;
use crate::meter::{Label, Unit, Usage};
use crate::object::ObjectRegistry;
use crate::stats::Histogram;

/// The label the accounts past the top ones share.
pub const OTHER_ACCOUNT: &str = "_other";

/// What the listener reads: the server's parts.
pub struct Sources {
    pub events: Arc<Events>,
    pub objects: Arc<ObjectRegistry>,
    pub gate: Option<Arc<OutputGate>>,
}

struct Metrics {
    config: MetricsConfig,
    sources: Sources,
    /// Connections refused for their address.
    refused: AtomicU64,
}

/// The running listener; dropping it stops its thread.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `config.addr` (here, so that a port in use is an error of the server's start) and
    /// serves it on a thread of its own.
    ///
    /// # Errors
    /// When the address cannot be bound, or the thread cannot start.
    pub fn start(config: MetricsConfig, sources: Sources) -> std::io::Result<Self> {
        let addr = config.addr;
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|e| std::io::Error::new(e.kind(), format!("metrics listener on {addr}: {e}")))?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (stop, stopped) = oneshot::channel();
        let metrics = Arc::new(Metrics { config, sources, refused: AtomicU64::new(0) });
        let thread = std::thread::Builder::new().name("sockworker-metrics".into()).spawn(move || {
            runtime.block_on(serve(listener, metrics, stopped));
        })?;
        Ok(Self { addr: local, stop: Some(stop), thread: Some(thread) })
    }

    /// The bound address (the real port when 0 was asked for).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(listener: std::net::TcpListener, metrics: Arc<Metrics>, mut stopped: oneshot::Receiver<()>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            log::error!("the metrics listener cannot serve: {error}");
            return;
        }
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) if !allowed(&metrics.config.allow, peer.ip()) => {
                    metrics.refused.fetch_add(1, Ordering::Relaxed);
                    log::debug!("metrics listener: refused {peer} (not in --metrics-allow)");
                    crate::runtime::spawn(refuse(stream));
                }
                Ok((stream, _)) => {
                    let metrics = metrics.clone();
                    crate::runtime::spawn(async move {
                        let service = service_fn(move |request| {
                            let metrics = metrics.clone();
                            async move { Ok::<_, Infallible>(metrics.answer(&request)) }
                        });
                        let _ = http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(std::time::Duration::from_secs(10))
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                Err(error) => {
                    log::warn!("metrics listener: accept failed: {error}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = &mut stopped => return,
        }
    }
}

/// The body of the answer to a client outside the allow-list, whatever it asks.
const REFUSED: &str = "Forbidden: this address may not use the metrics listener (--metrics-allow).\n";

/// Answers 403 without reading the request; then discards (unparsed, a little at most, for a
/// few seconds at most) what the client sent until it closes, so that closing does not reset
/// the connection under the answer.
async fn refuse(mut stream: tokio::net::TcpStream) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        let answer = format!(
            "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\
             cache-control: no-store\r\nconnection: close\r\n\r\n{REFUSED}",
            REFUSED.len()
        );
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        let mut discarded = 0;
        while discarded < 16 * 1024 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => discarded += n,
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    response
        .headers_mut()
        .insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static("no-store"));
    response
}

/// The dashboard's page: one file, its script and style inline.
const DASHBOARD: &str = include_str!("dashboard.html");

/// One row of the dashboard or of the per-account metrics.
#[derive(Default, Clone)]
struct Row {
    usage: Usage,
    sockets: u64,
}

impl Row {
    fn unit(&self, unit: Unit) -> u64 {
        self.usage[unit as usize]
    }
}

fn add(into: &mut Usage, usage: &Usage) {
    for (sum, value) in into.iter_mut().zip(usage) {
        *sum += value;
    }
}

impl Metrics {
    fn answer<B>(&self, request: &Request<B>) -> Response<Full<Bytes>> {
        if request.method() != hyper::Method::GET && request.method() != hyper::Method::HEAD {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                "Method Not Allowed\n",
            );
        }
        match request.uri().path() {
            "/metrics" => {
                reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", self.prometheus())
            }
            "/_sockworker" | "/_sockworker/" if self.config.dashboard => {
                reply(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD)
            }
            "/_sockworker/stats" if self.config.dashboard => {
                reply(StatusCode::OK, "application/json", self.stats_json())
            }
            _ => reply(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "Not Found\n"),
        }
    }

    fn billable(&self, usage: &Usage) -> f64 {
        let ratio =
            if self.config.messages_per_request > 0.0 { self.config.messages_per_request } else { 1.0 };
        usage[Unit::Requests as usize] as f64
            + usage[Unit::Connections as usize] as f64
            + usage[Unit::MessagesIn as usize] as f64 / ratio
    }

    /// Open sockets per label, and (open, hibernated, closing) counts.
    fn sockets(&self) -> (HashMap<Label, u64>, [u64; 3]) {
        let mut by_label: HashMap<Label, u64> = HashMap::new();
        let mut states = [0u64; 3];
        for socket in self.sources.events.registry.all() {
            if socket.is_client() {
                continue;
            }
            if let Some(slot) = socket.slot() {
                *by_label.entry(slot.label.clone()).or_default() += 1;
            }
            let hibernated = socket
                .meta_if_any()
                .and_then(|meta| meta.object.clone())
                .is_some_and(|object| !object.is_resident());
            let state = if socket.is_closing() {
                2
            } else if hibernated {
                1
            } else {
                0
            };
            states[state] += 1;
        }
        (by_label, states)
    }

    /// The accounts, the top ones (by billable requests, then name) first, each with its open
    /// sockets.
    fn accounts(&self, sockets: &HashMap<Label, u64>) -> Vec<(String, Row)> {
        let mut rows: HashMap<String, Row> = self
            .config
            .meter
            .accounts()
            .into_iter()
            .map(|(account, usage)| (account, Row { usage, sockets: 0 }))
            .collect();
        for (label, count) in sockets {
            rows.entry(label.account.clone()).or_default().sockets += count;
        }
        let mut rows: Vec<(String, Row)> = rows.into_iter().collect();
        rows.sort_by(|(a, ra), (b, rb)| {
            self.billable(&rb.usage).total_cmp(&self.billable(&ra.usage)).then_with(|| a.cmp(b))
        });
        rows
    }

    /// The accounts with labels of their own, then `_other` (the sum of the rest) if any.
    fn capped_accounts(&self, sockets: &HashMap<Label, u64>) -> Vec<(String, Row)> {
        let mut rows = self.accounts(sockets);
        if rows.len() > self.config.top_accounts {
            let rest = rows.split_off(self.config.top_accounts);
            let mut other = Row::default();
            for (_, row) in rest {
                add(&mut other.usage, &row.usage);
                other.sockets += row.sockets;
            }
            rows.push((OTHER_ACCOUNT.to_owned(), other));
        }
        rows
    }

    fn prometheus(&self) -> String {
        let mut out = String::with_capacity(8192);
        let events = &self.sources.events;
        let (by_label, states) = self.sockets();
        let gauge = |out: &mut String, name: &str, help: &str, value: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        };
        let counter = |out: &mut String, name: &str, help: &str, value: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        };
        let _ = writeln!(
            out,
            "# HELP sockworker_sockets Accepted WebSockets open now, by state (hibernated: of an object \
             with no instance; closing: a Close was sent or the connection ended).\n# TYPE sockworker_sockets gauge"
        );
        for (state, value) in ["open", "hibernated", "closing"].iter().zip(states) {
            let _ = writeln!(out, "sockworker_sockets{{state=\"{state}\"}} {value}");
        }
        let objects = self.sources.objects.all();
        let resident = objects.iter().filter(|object| object.is_resident()).count();
        let _ = writeln!(
            out,
            "# HELP sockworker_objects Durable Objects with state in the core, by state (resident: an \
             instance runs; hibernated: only their sockets remain).\n# TYPE sockworker_objects gauge\n\
             sockworker_objects{{state=\"resident\"}} {resident}\nsockworker_objects{{state=\"hibernated\"}} {}",
            objects.len() - resident
        );
        drop(objects);
        gauge(
            &mut out,
            "sockworker_event_queue_depth",
            "Events waiting for the application thread.",
            events.depth() as f64,
        );
        let stats = &events.stats;
        histogram(
            &mut out,
            "sockworker_batch_size",
            "Events per batch taken by the application thread.",
            &stats.batch_sizes,
        );
        histogram(
            &mut out,
            "sockworker_loop_lag_seconds",
            "From the first event of a batch being queued to the application thread taking the batch.",
            &stats.loop_lag,
        );
        let relaxed = Ordering::Relaxed;
        counter(
            &mut out,
            "sockworker_metrics_refused_total",
            "Connections to the metrics listener refused (403) for an address outside --metrics-allow.",
            self.refused.load(relaxed) as f64,
        );
        counter(
            &mut out,
            "sockworker_cpu_limit_kills_total",
            "Events interrupted for passing Limits.cpu_ms.",
            stats.cpu_kills.load(relaxed) as f64,
        );
        counter(
            &mut out,
            "sockworker_wall_limit_kills_total",
            "Events interrupted for passing Limits.wall_ms.",
            stats.wall_kills.load(relaxed) as f64,
        );
        let totals = self.config.meter.totals();
        for (unit, name, help) in TOTALS {
            let value = match unit {
                // (Nanoseconds to milliseconds; microseconds to seconds.)
                Unit::CpuNs | Unit::DurationUs => totals[unit as usize] as f64 / 1e6,
                _ => totals[unit as usize] as f64,
            };
            counter(&mut out, name, help, value);
        }
        counter(
            &mut out,
            "sockworker_billable_requests_total",
            "Requests as billed: requests, connections, and incoming messages at Pricing.messages_per_request.",
            self.billable(&totals),
        );
        let accounts = self.capped_accounts(&by_label);
        for (name, help, value) in ACCOUNT_METRICS {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (account, row) in &accounts {
                let value = match value {
                    AccountValue::Unit(Unit::CpuNs) => row.unit(Unit::CpuNs) as f64 / 1e6,
                    AccountValue::Unit(unit) => row.unit(unit) as f64,
                    AccountValue::Billable => self.billable(&row.usage),
                };
                let _ = writeln!(out, "{name}{{account=\"{}\"}} {value}", escape_label(account));
            }
        }
        let _ = writeln!(out, "# HELP sockworker_account_sockets Accepted WebSockets open now per account.\n# TYPE sockworker_account_sockets gauge");
        for (account, row) in &accounts {
            let _ = writeln!(
                out,
                "sockworker_account_sockets{{account=\"{}\"}} {}",
                escape_label(account),
                row.sockets
            );
        }
        if let Some(gate) = &self.sources.gate {
            let g = &gate.stats;
            counter(
                &mut out,
                "sockworker_storage_commits_total",
                "Object databases committed.",
                g.commits.load(relaxed) as f64,
            );
            counter(
                &mut out,
                "sockworker_storage_commit_points_total",
                "Commit points that committed writes.",
                g.commit_points.load(relaxed) as f64,
            );
            counter(
                &mut out,
                "sockworker_storage_failed_commits_total",
                "Commits that failed.",
                g.failed.load(relaxed) as f64,
            );
            counter(
                &mut out,
                "sockworker_storage_fsyncs_total",
                "Write-ahead logs synced to disk.",
                g.syncs.load(relaxed) as f64,
            );
            histogram(
                &mut out,
                "sockworker_storage_commit_seconds",
                "How long each object's COMMIT took.",
                &stats.commit_seconds,
            );
            histogram(
                &mut out,
                "sockworker_storage_sync_seconds",
                "How long each round of the committer took to make commits durable (the output gate waits for it).",
                &stats.sync_seconds,
            );
        }
        if let Some(gate) = &self.sources.gate {
            let storage = gate.storage();
            gauge(
                &mut out,
                "sockworker_storage_bytes",
                "Bytes in the data directory (counted at most 10 s ago, on a thread of its own).",
                storage.bytes() as f64,
            );
            gauge(
                &mut out,
                "sockworker_storage_open_databases",
                "Object databases open now.",
                storage.open_count() as f64,
            );
            gauge(
                &mut out,
                "sockworker_alarms_armed",
                "Alarms waiting to fire.",
                gate.alarms().armed() as f64,
            );
        }
        let memory = memory::stats();
        gauge(
            &mut out,
            "sockworker_memory_allocated_bytes",
            "Bytes held by the core's allocations (jemalloc).",
            memory.allocated as f64,
        );
        gauge(
            &mut out,
            "sockworker_memory_resident_bytes",
            "Bytes the core's allocator keeps resident.",
            memory.resident as f64,
        );
        gauge(
            &mut out,
            "sockworker_memory_active_bytes",
            "Bytes in the allocator's pages that hold allocations.",
            memory.active as f64,
        );
        gauge(
            &mut out,
            "sockworker_memory_metadata_bytes",
            "Bytes of the allocator's own bookkeeping.",
            memory.metadata as f64,
        );
        gauge(
            &mut out,
            "sockworker_memory_mapped_bytes",
            "Bytes of address space the allocator has mapped.",
            memory.mapped as f64,
        );
        out
    }

    fn stats_json(&self) -> String {
        let (by_label, states) = self.sockets();
        let mut out = String::with_capacity(4096);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let _ = write!(
            out,
            "{{\"time\":{now:.3},\"sockets\":{{\"open\":{},\"hibernated\":{},\"closing\":{}}},\"queue\":{},\"totals\":{{",
            states[0],
            states[1],
            states[2],
            self.sources.events.depth()
        );
        let totals = Row { usage: self.config.meter.totals(), sockets: states.iter().sum() };
        self.json_row(&mut out, &totals);
        out.push_str("},\"accounts\":[");
        for (index, (account, row)) in self.capped_accounts(&by_label).iter().enumerate() {
            if index > 0 {
                out.push(',');
            }
            let _ = write!(out, "{{\"account\":{},", json_string(account));
            self.json_row(&mut out, row);
            out.push('}');
        }
        out.push_str("],\"objects\":[");
        let mut objects: Vec<_> = self
            .config
            .meter
            .slots()
            .into_iter()
            .filter(|(slot, _)| slot.label.object_id.is_some())
            .map(|(slot, usage)| {
                let sockets = by_label.get(&slot.label).copied().unwrap_or(0);
                (slot.label.clone(), Row { usage, sockets })
            })
            .collect();
        objects.sort_by(|(a, ra), (b, rb)| {
            self.billable(&rb.usage)
                .total_cmp(&self.billable(&ra.usage))
                .then_with(|| a.object_id.cmp(&b.object_id))
        });
        // (The page shows the busiest ones; a count of the rest would not fit it anyway.)
        objects.truncate(MAX_DASHBOARD_OBJECTS);
        for (index, (label, row)) in objects.iter().enumerate() {
            if index > 0 {
                out.push(',');
            }
            let _ = write!(
                out,
                "{{\"account\":{},\"namespace\":{},\"object\":{},",
                json_string(&label.account),
                json_string(label.namespace.as_deref().unwrap_or("")),
                json_string(label.object_id.as_deref().unwrap_or(""))
            );
            self.json_row(&mut out, row);
            out.push('}');
        }
        out.push_str("]}");
        out
    }

    fn json_row(&self, out: &mut String, row: &Row) {
        let _ = write!(
            out,
            "\"sockets\":{},\"requests\":{},\"connections\":{},\"messages_in\":{},\"messages_out\":{},\
             \"bytes_in\":{},\"bytes_out\":{},\"cpu_ms\":{:.3},\"billable\":{:.3}",
            row.sockets,
            row.unit(Unit::Requests),
            row.unit(Unit::Connections),
            row.unit(Unit::MessagesIn),
            row.unit(Unit::MessagesOut),
            row.unit(Unit::BytesIn),
            row.unit(Unit::BytesOut),
            row.unit(Unit::CpuNs) as f64 / 1e6,
            self.billable(&row.usage)
        );
    }
}

/// Objects the dashboard's JSON lists at most (the busiest).
const MAX_DASHBOARD_OBJECTS: usize = 200;

const TOTALS: [(Unit, &str, &str); 12] = [
    (Unit::Requests, "sockworker_requests_total", "HTTP requests, RPC calls and alarms handled."),
    (Unit::Connections, "sockworker_ws_connections_total", "WebSocket connections accepted."),
    (Unit::MessagesIn, "sockworker_ws_messages_in_total", "WebSocket messages received and handled."),
    (Unit::MessagesOut, "sockworker_ws_messages_out_total", "WebSocket messages sent."),
    (Unit::AutoResponses, "sockworker_auto_responses_total", "Messages answered by an auto-response pair."),
    (Unit::CpuNs, "sockworker_cpu_ms_total", "CPU milliseconds of handlers."),
    (Unit::BytesIn, "sockworker_bytes_in_total", "WebSocket bytes received."),
    (Unit::BytesOut, "sockworker_bytes_out_total", "WebSocket bytes sent."),
    (
        Unit::DurationUs,
        "sockworker_duration_seconds_total",
        "Seconds of billable Durable Object residency (GB-s: this times Pricing.memory_mb / 1024).",
    ),
    (
        Unit::ProtocolPings,
        "sockworker_protocol_pings_total",
        "Protocol pings answered or sent by the core (free).",
    ),
    (
        Unit::StorageRowsRead,
        "sockworker_storage_rows_read_total",
        "Durable Object storage rows (KV keys) read.",
    ),
    (
        Unit::StorageRowsWritten,
        "sockworker_storage_rows_written_total",
        "Durable Object storage rows (KV keys) written.",
    ),
];

#[derive(Clone, Copy)]
enum AccountValue {
    Unit(Unit),
    Billable,
}

const ACCOUNT_METRICS: [(&str, &str, AccountValue); 6] = [
    (
        "sockworker_account_requests_total",
        "HTTP requests (and RPC calls, alarms) per account.",
        AccountValue::Unit(Unit::Requests),
    ),
    (
        "sockworker_account_connections_total",
        "WebSocket connections accepted per account.",
        AccountValue::Unit(Unit::Connections),
    ),
    (
        "sockworker_account_messages_in_total",
        "WebSocket messages received per account.",
        AccountValue::Unit(Unit::MessagesIn),
    ),
    (
        "sockworker_account_messages_out_total",
        "WebSocket messages sent per account.",
        AccountValue::Unit(Unit::MessagesOut),
    ),
    (
        "sockworker_account_cpu_ms_total",
        "CPU milliseconds of handlers per account.",
        AccountValue::Unit(Unit::CpuNs),
    ),
    ("sockworker_account_billable_requests_total", "Billable requests per account.", AccountValue::Billable),
];

fn histogram(out: &mut String, name: &str, help: &str, histogram: &Histogram) {
    let (buckets, count, sum) = histogram.snapshot();
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (bound, cumulative) in buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}");
}

/// A label value of the text format: backslash, double quote and newline escaped.
fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn json_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '<' => out.push_str("\\u003c"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::{allowed, loopback, Cidr};

    fn ip(text: &str) -> std::net::IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn loopback_is_allowed_by_default_and_nothing_else() {
        let allow = loopback();
        for peer in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"] {
            assert!(allowed(&allow, ip(peer)), "{peer}");
        }
        for peer in ["10.0.0.1", "192.168.1.1", "::2", "fe80::1", "::ffff:10.0.0.1", "0.0.0.0", "::"] {
            assert!(!allowed(&allow, ip(peer)), "{peer}");
        }
    }

    #[test]
    fn networks_match_their_addresses() {
        let ten = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(ten.contains(ip("10.255.0.1")));
        assert!(!ten.contains(ip("11.0.0.1")));
        assert!(!ten.contains(ip("127.0.0.1")));
        // An IPv4-mapped IPv6 peer (a client of a socket bound to ::) matches IPv4 rules.
        assert!(ten.contains(ip("::ffff:10.1.2.3")));
        assert!(!ten.contains(ip("::ffff:11.1.2.3")));
        // ... and an IPv4-mapped rule is its IPv4 one.
        assert_eq!(Cidr::parse("::ffff:10.0.0.0/104").unwrap(), ten);
        let everyone = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(everyone.contains(ip("203.0.113.9")));
        assert!(everyone.contains(ip("::ffff:203.0.113.9")));
        assert!(!everyone.contains(ip("2001:db8::1")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("2001:db8::1")));
        let net6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(net6.contains(ip("2001:db8:ffff::1")));
        assert!(!net6.contains(ip("2001:db9::1")));
        assert!(!net6.contains(ip("10.0.0.1")));
        // An address alone is all its bits; host bits past the prefix are cleared.
        let one = Cidr::parse("192.0.2.7").unwrap();
        assert!(one.contains(ip("192.0.2.7")) && !one.contains(ip("192.0.2.8")));
        assert_eq!(Cidr::parse("10.1.2.3/8").unwrap(), ten);
        assert_eq!(ten.to_string(), "10.0.0.0/8");
        assert!(Cidr::parse("::1/128").unwrap().contains(ip("::1")));
    }

    #[test]
    fn malformed_networks_are_refused() {
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "nope",
            "10.0.0.0/8/8",
            "ten/8",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn label_values_and_json_strings_are_escaped() {
        assert_eq!(super::escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(super::json_string("x\"<\u{1}"), "\"x\\\"\\u003c\\u0001\"");
    }
}
