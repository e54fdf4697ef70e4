//! The listening server: accepts TCP, serves HTTP/1.1 with hyper, validates upgrades, hands each
//! request to the application as an event and answers with what the application replies.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming as IncomingBody;
use hyper::header::{HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::{oneshot, Notify};
use tokio::task::AbortHandle;

use crate::alarms::AlarmScheduler;
use crate::client::{self, ConnectRequest};
use crate::config::{Limits, ServerConfig, HANDSHAKE_HEADERS, MAX_HEADERS};
use crate::connection;
use crate::error::CoreError;
use crate::event::{
    Answer, BodyFailed, Event, Events, Feed, FetchError, FetchErrorKind, PendingRequest, Reply, RequestBody,
    StreamBody,
};
use crate::fetch::{self, FetchRequest};
use crate::gate::OutputGate;
use crate::handshake::{self, Upgrade};
use crate::metrics::{MetricsServer, Sources};
use crate::object::ObjectRegistry;
use crate::reactor::Reactor;
use crate::runtime;
use crate::socket::SocketShared;
use crate::storage::Storage;
use crate::tls;

/// State shared by the accept loop, every connection task and the application side.
pub struct ServerCtx {
    /// The app's limits: the server-wide ones, and the per-socket ones of sockets accepted
    /// without limits of their own.
    pub limits: Arc<Limits>,
    pub events: Arc<Events>,
    /// Connections being served as HTTP (plain or TLS), before or without an upgrade.
    http_connections: AtomicUsize,
    /// Connections served as HTTP so far (for [`return_memory`]).
    http_served: AtomicU64,
    allowed_origins: Option<Vec<String>>,
    compression: bool,
    /// Requests with a body are handed over at their head (see `ServerConfig`).
    stream_request_bodies: bool,
    stop_accepting: Notify,
    /// Set when the server speaks TLS (https:// and wss://).
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl ServerCtx {
    fn new(config: &mut ServerConfig) -> std::io::Result<Self> {
        Ok(Self {
            limits: Arc::new(config.limits.clone()),
            events: Arc::new(Events::new()?),
            http_connections: AtomicUsize::new(0),
            http_served: AtomicU64::new(0),
            allowed_origins: config.allowed_origins.take(),
            compression: config.compression,
            stream_request_bodies: config.stream_request_bodies,
            stop_accepting: Notify::new(),
            tls: config.tls.take().map(tokio_rustls::TlsAcceptor::from),
        })
    }

    fn open_sockets(&self) -> usize {
        self.events.registry.open_sockets()
    }

    /// Connections of every kind: HTTP ones and WebSockets (accepted and outgoing). A
    /// connection that is being upgraded may count twice for a moment, never zero times.
    fn connections(&self) -> usize {
        self.http_connections.load(Ordering::Acquire) + self.open_sockets()
    }

    /// An upgrade from a browser page of a site not on the allow-list.
    fn origin_refused(&self, headers: &hyper::HeaderMap) -> bool {
        let (Some(allowed), Some(origin)) = (&self.allowed_origins, headers.get(hyper::header::ORIGIN))
        else {
            return false;
        };
        let origin = origin.to_str().unwrap_or("").trim_end_matches('/');
        !allowed.iter().any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.events.registry.is_shutting_down()
    }
}

/// A response body: whole (every answer but a streamed one), or in chunks as the application
/// writes them.
type Body = Either<Full<Bytes>, StreamBody>;

impl hyper::body::Body for StreamBody {
    type Data = Bytes;
    type Error = BodyFailed;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BodyFailed>>> {
        self.poll_chunk(cx).map(|chunk| chunk.map(|chunk| chunk.map(hyper::body::Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.is_end()
    }
}

fn whole(body: Bytes) -> Body {
    Either::Left(Full::new(body))
}

/// Checks headers the application wants to send: a name that is not a token, or a value with
/// CR, LF or NUL, would make hyper fail the response.
///
/// # Errors
/// `InvalidArgument` naming the first bad header.
pub fn check_headers(headers: &[(String, Bytes)]) -> Result<(), CoreError> {
    let refused = headers.iter().find_map(|(name, value)| {
        if HeaderName::from_bytes(name.as_bytes()).is_err() {
            Some(format!("invalid response header name {name:?}"))
        } else if HeaderValue::from_bytes(value).is_err() {
            Some(format!(
                "invalid value of response header {name:?} (control characters such as CR, LF and NUL \
                 are not allowed)"
            ))
        } else {
            None
        }
    });
    match refused {
        None => Ok(()),
        Some(why) => {
            // Said here too: the application's own log of the exception may be filtered or lost.
            log::error!("invalid response from the application: {why}");
            Err(CoreError::InvalidArgument(why))
        }
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(whole(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

fn with_headers(
    mut response: Response<Body>,
    headers: Vec<(String, Bytes)>,
) -> Result<Response<Body>, String> {
    for (name, value) in headers {
        let header =
            HeaderName::from_bytes(name.as_bytes()).map_err(|e| format!("header name {name:?}: {e}"))?;
        let value = HeaderValue::from_maybe_shared(value).map_err(|e| format!("header {name:?}: {e}"))?;
        response.headers_mut().append(header, value);
    }
    Ok(response)
}

async fn handle(
    ctx: Arc<ServerCtx>,
    counted: Arc<HttpConnection>,
    peer: SocketAddr,
    mut req: Request<IncomingBody>,
) -> Result<Response<Body>, Infallible> {
    let accept = match handshake::classify(req.method(), req.headers()) {
        Upgrade::None => None,
        Upgrade::WebSocket { accept } => Some(accept),
        Upgrade::BadRequest(why) => return Ok(plain(StatusCode::BAD_REQUEST, why)),
        Upgrade::UnsupportedVersion => {
            let mut response = plain(StatusCode::UPGRADE_REQUIRED, "unsupported WebSocket version");
            response
                .headers_mut()
                .insert(hyper::header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            return Ok(response);
        }
    };
    if accept.is_some() && ctx.origin_refused(req.headers()) {
        return Ok(plain(StatusCode::FORBIDDEN, "origin not allowed"));
    }
    // This connection is one of those counted: past the limit only by others.
    if accept.is_some() && (ctx.connections() > ctx.limits.max_connections || ctx.is_shutting_down()) {
        return Ok(plain(StatusCode::SERVICE_UNAVAILABLE, "too many connections"));
    }
    let deflate = match (&accept, ctx.compression) {
        (Some(_), true) => {
            let offers: Vec<&str> = req
                .headers()
                .get_all(hyper::header::SEC_WEBSOCKET_EXTENSIONS)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            crate::deflate::negotiate(&offers.join(","))
        }
        _ => None,
    };
    let on_upgrade = accept.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let streamed = ctx.stream_request_bodies && accept.is_none() && !hyper::body::Body::is_end_stream(&body);
    let (body, feed, body_failed) = if streamed {
        let (request_body, feed) = RequestBody::new();
        let (failed, body_failed) = oneshot::channel();
        runtime::spawn(feed_body(body, feed, ctx.limits.clone(), ctx.events.clone(), failed));
        (Bytes::new(), Some(request_body), Some(body_failed))
    } else {
        match read_body(body, &ctx.limits).await {
            Ok(body) => (body, None, None),
            Err(why) => return Ok(why.response()),
        }
    };
    let headers = parts
        .headers
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), Bytes::copy_from_slice(value.as_bytes())))
        .collect();
    let target = parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_owned(), ToString::to_string);
    let (tx, rx) = oneshot::channel();
    ctx.events.push(Event::Request(PendingRequest {
        method: parts.method.to_string(),
        target,
        headers,
        body,
        peer,
        reply: Reply::new(tx, accept.is_some(), ctx.events.clone(), ctx.limits.clone(), deflate),
        feed,
    }));
    let answer = match body_failed {
        None => rx.await,
        // A streamed body that fails before the application answered is answered by the core.
        // Biased, failure first: the failure is sent before the application hears of it, so an
        // answer the application makes because of it (a RequestBodyError it let through: 500)
        // finds it ready, and must not win the draw an unbiased select would make.
        Some(body_failed) => tokio::select! {
            biased;
            Ok(why) = body_failed => return Ok(why.response()),
            answer = rx => answer,
        },
    };
    let Ok(answer) = answer else {
        return Ok(plain(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error"));
    };
    let response = match answer {
        Answer::Http { status, headers, body } => {
            let mut response = Response::new(whole(body));
            *response.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            with_headers(response, headers)
        }
        Answer::Stream { status, headers, body } => {
            // Without a Content-Length of the application's, hyper sends it chunked (HTTP/1.1).
            let mut response = Response::new(Either::Right(body));
            *response.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            with_headers(response, headers)
        }
        Answer::Upgrade { headers, socket } => {
            let (Some(on_upgrade), Some(accept)) = (on_upgrade, accept) else {
                unreachable!("Reply::accept_websocket refuses plain requests")
            };
            // Counted as a socket from now on (it is registered), before the 101 lets the client
            // open its next connection: never as both.
            counted.release();
            runtime::spawn(upgraded(on_upgrade, socket.open(), ctx.events.clone()));
            let mut response = Response::new(whole(Bytes::new()));
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = response.headers_mut();
            h.insert(hyper::header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(hyper::header::CONNECTION, HeaderValue::from_static("Upgrade"));
            h.insert(
                hyper::header::SEC_WEBSOCKET_ACCEPT,
                HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
            );
            if let Some(deflate) = deflate {
                h.insert(
                    hyper::header::SEC_WEBSOCKET_EXTENSIONS,
                    HeaderValue::from_str(&deflate.response()).expect("ASCII"),
                );
            }
            with_headers(response, headers)
        }
    };
    Ok(response.unwrap_or_else(|e| {
        log::error!("invalid response from the application to {} {}: {e}", parts.method, parts.uri.path());
        plain(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error")
    }))
}

/// Why a request body could not be read.
#[derive(Debug, Clone, Copy)]
enum BodyError {
    TooLarge,
    Unreadable,
    TooSlow,
}

impl BodyError {
    fn response(self) -> Response<Body> {
        match self {
            Self::TooLarge => plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
            Self::Unreadable => plain(StatusCode::BAD_REQUEST, "could not read the request body"),
            Self::TooSlow => {
                let mut response = plain(StatusCode::REQUEST_TIMEOUT, "request body not received in time");
                response.headers_mut().insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
                response
            }
        }
    }

    fn message(self, limits: &Limits) -> String {
        match self {
            Self::TooLarge => {
                format!("the request body is larger than max_body_size ({} bytes)", limits.max_body_size)
            }
            Self::Unreadable => "the request body could not be read (the client went away or sent bad \
                                 chunked encoding)"
                .into(),
            Self::TooSlow => format!(
                "the request body did not arrive within handshake_timeout ({:.1} s)",
                limits.handshake_timeout.as_secs_f64()
            ),
        }
    }
}

fn body_error(error: &(dyn std::error::Error + Send + Sync + 'static)) -> BodyError {
    if error.is::<http_body_util::LengthLimitError>() {
        BodyError::TooLarge
    } else {
        BodyError::Unreadable
    }
}

/// The whole body, bounded in size, and in time as the head is: a client trickling it would
/// otherwise hold the connection (and its buffers) forever.
async fn read_body(body: IncomingBody, limits: &Limits) -> Result<Bytes, BodyError> {
    let collect = Limited::new(body, limits.max_body_size).collect();
    match tokio::time::timeout(limits.handshake_timeout, collect).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) => Err(body_error(&*e)),
        Err(_) => Err(BodyError::TooSlow),
    }
}

/// Reads a streamed request body for the application, a piece each time it asks, until the end,
/// an error, or the application drops its end. The limits are those of a whole body: at most
/// `max_body_size` bytes, and at most `handshake_timeout` spent waiting for the client (time
/// the application takes between two pieces is not the client's). A failure is answered by the
/// core through `failed` while the application has not answered.
async fn feed_body(
    body: IncomingBody,
    feed: Arc<Feed>,
    limits: Arc<Limits>,
    events: Arc<Events>,
    failed: oneshot::Sender<BodyError>,
) {
    let mut body = Limited::new(body, limits.max_body_size);
    let mut budget = limits.handshake_timeout;
    while feed.wanted().await {
        let started = tokio::time::Instant::now();
        let piece = loop {
            let left = budget.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, body.frame()).await {
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => break Ok(Some(data)),
                    _ => {} // (trailers, or an empty frame)
                },
                Ok(None) => break Ok(None),
                Ok(Some(Err(e))) => break Err(body_error(&*e)),
                Err(_) => break Err(BodyError::TooSlow),
            }
        };
        budget = budget.saturating_sub(started.elapsed());
        match piece {
            Ok(data) => {
                let end = data.is_none();
                events.push(Event::RequestBody { feed: feed.id, data: Ok(data) });
                if end {
                    return;
                }
            }
            Err(why) => {
                let _ = failed.send(why);
                events.push(Event::RequestBody { feed: feed.id, data: Err(why.message(&limits)) });
                return;
            }
        }
    }
}

/// The stream a WebSocket task drives, once hyper has handed it over.
enum Upgraded {
    Plain(TcpStream, Bytes),
    /// The TCP socket and its rustls session, driven by the socket's task.
    Tls(tls::TlsStream<rustls::ServerConnection>, Bytes),
    Failed(&'static str),
}

/// Takes the connection from hyper once the 101 is written. A plain function, so that what hyper
/// hands over (a TLS session is over 2 KB) is never a local of the socket's task: the task keeps
/// only the small [`Upgraded`] across its awaits. (Matched in the task's own body, hyper's parts
/// stayed in it for the socket's life: a task of 3,240 bytes, 760 now.)
fn take_stream(upgraded: hyper::Result<hyper::upgrade::Upgraded>) -> Upgraded {
    let Ok(upgraded) = upgraded else { return Upgraded::Failed("upgrade failed") };
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => Upgraded::Plain(parts.io.into_inner(), parts.read_buf),
        Err(upgraded) => match upgraded.downcast::<TokioIo<ServerTls>>() {
            Ok(parts) => {
                let (tcp, session) = parts.io.into_inner().into_inner();
                Upgraded::Tls(tls::TlsStream::new(tcp, session), parts.read_buf)
            }
            Err(_) => Upgraded::Failed("upgrade failed"),
        },
    }
}

/// The task of an accepted WebSocket for its whole life: takes the connection from hyper, and
/// drives it (plain, or through its TLS session).
async fn upgraded(on_upgrade: hyper::upgrade::OnUpgrade, socket: Arc<SocketShared>, queue: Arc<Events>) {
    match take_stream(on_upgrade.await) {
        Upgraded::Plain(tcp, leftover) => connection::run(tcp, leftover, socket, queue).await,
        Upgraded::Tls(stream, leftover) => connection::run(stream, leftover, socket, queue).await,
        Upgraded::Failed(reason) => {
            queue.finish_socket(socket.id(), crate::frame::close_code::ABNORMAL, reason.into(), false);
        }
    }
}

/// A server-side TLS session over TCP.
type ServerTls = tokio_rustls::server::TlsStream<TcpStream>;

/// Runs the TLS handshake (bounded by the handshake timeout), then serves HTTP over it.
async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    counted: Arc<HttpConnection>,
    acceptor: tokio_rustls::TlsAcceptor,
) {
    let timeout = counted.ctx.limits.handshake_timeout;
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(session)) => serve_http(session, peer, counted).await,
        Ok(Err(e)) => log::debug!("TLS handshake with {peer}: {e}"),
        Err(_) => log::debug!("TLS handshake with {peer} timed out"),
    }
}

/// Counts a connection served as HTTP for as long as it is, or until it is upgraded (an upgraded
/// one is then counted as a socket).
struct HttpConnection {
    ctx: Arc<ServerCtx>,
    released: AtomicBool,
}

impl HttpConnection {
    fn new(ctx: &Arc<ServerCtx>) -> Arc<Self> {
        ctx.http_connections.fetch_add(1, Ordering::AcqRel);
        ctx.http_served.fetch_add(1, Ordering::Relaxed);
        Arc::new(Self { ctx: ctx.clone(), released: AtomicBool::new(false) })
    }

    /// No longer counted (once; also when dropped).
    fn release(&self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            self.ctx.http_connections.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for HttpConnection {
    fn drop(&mut self) {
        self.release();
    }
}

async fn serve_http<T>(stream: T, peer: SocketAddr, counted: Arc<HttpConnection>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(stream);
    let timeout = counted.ctx.limits.handshake_timeout;
    let service = service_fn(move |req| handle(counted.ctx.clone(), counted.clone(), peer, req));
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        // The cap is on the client's own headers: those of a handshake come on top.
        .max_headers(MAX_HEADERS + HANDSHAKE_HEADERS)
        .serve_connection(io, service)
        .with_upgrades();
    if let Err(e) = connection.await {
        log::debug!("HTTP connection from {peer}: {e}");
    }
}

/// A connection past `max_connections`: answered 503 at once, without reading its request
/// (which costs nothing lasting), then closed after a short linger so the answer is read
/// instead of lost to a reset.
async fn refuse(mut stream: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const ANSWER: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
        content-length: 20\r\nconnection: close\r\n\r\ntoo many connections";
    if stream.write_all(ANSWER).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// How often the server looks whether memory was freed in bulk; how many sockets, objects or
/// databases must have gone since it last returned memory for it to do so again; and how long a
/// burst may go on before it does so anyway.
const RETURN_MEMORY_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
const RETURN_MEMORY_AFTER: u64 = 1_000;
const RETURN_MEMORY_DURING_BURST: u32 = 5;

/// After a burst (thousands of connections or sockets gone, objects hibernated, databases closed), the
/// allocator keeps the freed memory as its own: the process would stay at its peak.
/// `malloc_trim` returns the free pages, on a blocking thread, once the burst is over (a quiet
/// second), or every few seconds while it lasts.
async fn return_memory(ctx: Arc<ServerCtx>, objects: Arc<ObjectRegistry>, storage: Option<Arc<Storage>>) {
    let churn = || {
        let closed = storage.as_ref().map_or(0, |storage| storage.closed());
        let served = ctx.http_served.load(Ordering::Relaxed);
        ctx.events.registry.registered() + served + objects.forgotten() + closed
    };
    let (mut returned_at, mut previous, mut busy_seconds) = (churn(), churn(), 0);
    loop {
        tokio::time::sleep(RETURN_MEMORY_EVERY).await;
        let now = churn();
        let quiet = now == previous;
        previous = now;
        if now - returned_at < RETURN_MEMORY_AFTER {
            continue;
        }
        busy_seconds += 1;
        if quiet || busy_seconds >= RETURN_MEMORY_DURING_BURST {
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
            let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
            log::debug!("returned the memory freed by {} sockets, objects or databases", now - returned_at);
            (returned_at, busy_seconds) = (now, 0);
        }
    }
}

async fn accept_loop(listener: TcpListener, ctx: Arc<ServerCtx>, link: bool) {
    let never = Notify::new();
    // (The link listener serves plain HTTP, and keeps accepting during a graceful shutdown:
    // other nodes still reach this one's objects until it is gone.)
    let stop = if link { &never } else { &ctx.stop_accepting };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if ctx.connections() >= ctx.limits.max_connections {
                        // A TLS client could not read a plain answer: it is just closed.
                        if ctx.tls.is_none() {
                            runtime::spawn(refuse(stream));
                        }
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let counted = HttpConnection::new(&ctx);
                    match &ctx.tls {
                        Some(acceptor) if !link => {
                            runtime::spawn(serve_tls(stream, peer, counted, acceptor.clone()))
                        }
                        _ => runtime::spawn(serve_http(stream, peer, counted)),
                    };
                }
                Err(e) => {
                    // Out of descriptors or similar: back off instead of spinning.
                    log::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            () = stop.notified() => return,
        }
    }
}

/// Where the server's tasks run.
enum Io {
    /// On I/O threads of its own.
    Threads(Runtime),
    /// On the application thread, in its event loop's reactor (single-thread mode).
    Reactor(Arc<Reactor>, Handle),
}

impl Io {
    fn handle(&self) -> &Handle {
        match self {
            Self::Threads(runtime) => runtime.handle(),
            Self::Reactor(_, handle) => handle,
        }
    }
}

/// A running server. Dropping it stops the I/O threads (or drops its tasks from the reactor).
pub struct Server {
    ctx: Arc<ServerCtx>,
    io: Option<Io>,
    local_addr: SocketAddr,
    objects: Arc<ObjectRegistry>,
    /// With storage: the output gate (which owns the storage and the alarms).
    gate: Option<Arc<OutputGate>>,
    /// The metrics listener, on its own thread (`--metrics-port`).
    metrics: Option<MetricsServer>,
    /// The tasks of the fetches in flight, by token, for [`Self::cancel_fetch`].
    fetches: Arc<Mutex<HashMap<u64, AbortHandle>>>,
}

impl Server {
    /// Binds the address and starts serving on the I/O threads; with `config.storage`, opens the
    /// data directory and arms the alarms found there.
    ///
    /// # Errors
    /// When the address cannot be bound, the runtime cannot start, or the data directory is not
    /// usable.
    pub fn start(config: ServerConfig) -> Result<Self, CoreError> {
        let runtime = runtime::build(config.io_threads)?;
        Self::start_on(config, Io::Threads(runtime))
    }

    /// [`Self::start`] in single-thread mode: the server's tasks run in `reactor`, driven by
    /// the application thread (`config.io_threads` is not used). Its event queue is polled by
    /// the reactor, which reports the queue's descriptor ([`Events::fd`]) readable.
    ///
    /// # Errors
    /// As [`Self::start`], and when the reactor is selecting on another thread.
    pub fn start_in(config: ServerConfig, reactor: Arc<Reactor>) -> Result<Self, CoreError> {
        let handle = reactor.handle()?;
        let server = Self::start_on(config, Io::Reactor(reactor.clone(), handle))?;
        reactor.attach(server.ctx.events.fd(), server.ctx.events.clone());
        Ok(server)
    }

    fn start_on(mut config: ServerConfig, io: Io) -> Result<Self, CoreError> {
        let ctx = Arc::new(ServerCtx::new(&mut config)?);
        let _entered = io.handle().enter();
        let addr = config.addr;
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        if config.reuse_port {
            socket.set_reuseport(true)?;
        }
        socket.bind(addr)?;
        let listener = socket.listen(4096)?;
        let local_addr = listener.local_addr()?;
        let link_listener = match config.link_addr {
            Some(link) => {
                let socket = if link.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
                socket.set_reuseaddr(true)?;
                socket.bind(link)?;
                Some(socket.listen(1024)?)
            }
            None => None,
        };
        let link_addr = link_listener.as_ref().map(TcpListener::local_addr).transpose()?;
        let gate = match &mut config.storage {
            Some(storage) => {
                if let Some(cluster) = &mut storage.cluster {
                    // (Bound first: with port 0, the port is known only now.)
                    let reachable = link_addr.unwrap_or(local_addr);
                    if cluster.advertise.is_empty() {
                        cluster.advertise = reachable.to_string();
                    } else if let Some(host) = cluster.advertise.strip_suffix(":0") {
                        cluster.advertise = format!("{host}:{}", reachable.port());
                    }
                    if cluster.node_id.is_empty() {
                        cluster.node_id = cluster.advertise.clone();
                    }
                }
                let storage = Arc::new(Storage::open(storage)?);
                let alarms = Arc::new(AlarmScheduler::new(ctx.events.clone()));
                runtime::spawn(alarms.clone().run());
                Some(OutputGate::start(storage, alarms, ctx.events.clone())?)
            }
            None => None,
        };
        let objects = Arc::<ObjectRegistry>::default();
        if config.access_log {
            ctx.events.registry.count_traffic();
        }
        let metrics = match config.metrics.take() {
            Some(metrics) => {
                let sources =
                    Sources { events: ctx.events.clone(), objects: objects.clone(), gate: gate.clone() };
                Some(MetricsServer::start(metrics, sources)?)
            }
            None => None,
        };
        runtime::spawn(accept_loop(listener, ctx.clone(), false));
        if let Some(link_listener) = link_listener {
            runtime::spawn(accept_loop(link_listener, ctx.clone(), true));
        }
        let storage = gate.as_ref().map(|gate| gate.storage().clone());
        runtime::spawn(return_memory(ctx.clone(), objects.clone(), storage));
        drop(_entered);
        Ok(Self { ctx, io: Some(io), local_addr, objects, gate, metrics, fetches: Arc::default() })
    }

    /// Begins a batch of the application thread: returns the events queued since the last one
    /// and, until [`Self::end_batch`], defers the wake-ups of the sockets its handlers send on
    /// (see `socket::begin_batch`). Call it on the application thread only.
    #[must_use]
    pub fn begin_batch(&self) -> Vec<Event> {
        let events = self.ctx.events.drain();
        // With I/O threads, a batch that touched many sockets leaves their writes to the
        // connection tasks (in parallel with the application thread); in single-thread mode
        // there is no other thread, and the batch writes them all itself.
        let direct_max =
            if self.is_single_threaded() { usize::MAX } else { crate::socket::DIRECT_FLUSH_MAX_SOCKETS };
        crate::socket::begin_batch(direct_max);
        events
    }

    /// Ends the batch [`Self::begin_batch`] began: a commit point of the output gate for what
    /// its handlers wrote, then the writes of what they sent (held by the gate until durable),
    /// then the connections that waited for the batch (to send a Close after its replies) are
    /// told.
    pub fn end_batch(&self) {
        let events = &self.ctx.events;
        let number = events.last_drained();
        // While the output gate holds what the batch sent, it tells the connections waiting for
        // the batch once it releases it; else they are told below, after the writes.
        let held = self.gate.as_ref().is_some_and(|gate| gate.hold_batch(number));
        if let Some(gate) = &self.gate {
            gate.commit_point();
        }
        crate::socket::end_batch();
        // After the writes: a connection that held its Close back for this batch's replies
        // finds them queued.
        if !held {
            events.batch_done(number);
        }
    }

    /// The server runs in the application thread's reactor (single-thread mode).
    #[must_use]
    pub fn is_single_threaded(&self) -> bool {
        matches!(self.io, Some(Io::Reactor(..)))
    }

    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    #[must_use]
    pub fn events(&self) -> &Events {
        &self.ctx.events
    }

    /// Where the metrics listener listens, when there is one.
    #[must_use]
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::local_addr)
    }

    /// The core's own counters (batches, lag, limit kills, commits).
    #[must_use]
    pub fn stats(&self) -> &Arc<crate::stats::CoreStats> {
        &self.ctx.events.stats
    }

    /// The core state of Durable Objects, by name.
    #[must_use]
    pub fn objects(&self) -> &Arc<ObjectRegistry> {
        &self.objects
    }

    /// The output gate, when the server has storage.
    #[must_use]
    pub fn gate(&self) -> Option<&Arc<OutputGate>> {
        self.gate.as_ref()
    }

    #[must_use]
    pub fn open_sockets(&self) -> usize {
        self.ctx.open_sockets()
    }

    /// Tasks alive on the I/O runtime (one per open socket, plus the accept loop).
    #[must_use]
    pub fn alive_tasks(&self) -> usize {
        self.io.as_ref().map_or(0, |io| io.handle().metrics().num_alive_tasks())
    }

    /// The open socket with this id, if any.
    #[must_use]
    pub fn socket(&self, id: u64) -> Option<Arc<SocketShared>> {
        self.ctx.events.registry.socket(id)
    }

    /// Opens an outgoing WebSocket in the background; an `Event::Connected` with the request's
    /// token reports the outcome (also when the server is shutting down: an error).
    pub fn connect(&self, request: ConnectRequest) {
        if self.ctx.is_shutting_down() {
            let result = Err("the server is shutting down".to_owned());
            self.ctx.events.push(Event::Connected { token: request.token, result });
            return;
        }
        if let Some(io) = &self.io {
            let _guard = io.handle().enter();
            runtime::spawn(client::connect(self.ctx.limits.clone(), self.ctx.events.clone(), request));
        }
    }

    /// Sends an outgoing HTTP request in the background; an `Event::Fetched` with the request's
    /// token reports the outcome (an error if the I/O runtime is gone).
    pub fn fetch(&self, request: FetchRequest) {
        if let Some(io) = &self.io {
            let _guard = io.handle().enter();
            let token = request.token;
            let fetches = self.fetches.clone();
            let events = self.ctx.events.clone();
            // Locked until the handle is in: the task, done first, would not find it to remove.
            let mut running = self.fetches.lock();
            let task = runtime::spawn(async move {
                fetch::fetch(events, request).await;
                fetches.lock().remove(&token);
            });
            running.insert(token, task.abort_handle());
        } else {
            let result =
                Err(FetchError { kind: FetchErrorKind::Connect, message: "the server stopped".to_owned() });
            self.ctx.events.push(Event::Fetched { token: request.token, result });
        }
    }

    /// Drops the fetch of `token` if it is still in flight (its caller gave up): its connection
    /// is closed at once, and no `Event::Fetched` comes for it.
    pub fn cancel_fetch(&self, token: u64) {
        if let Some(task) = self.fetches.lock().remove(&token) {
            task.abort();
        }
    }

    /// Stops accepting, refuses new upgrades, and starts closing every socket with `code` (after
    /// what the output gate holds is released). An `Event::AllClosed` follows once none is left
    /// (at once if there are none).
    pub fn shutdown(&self, code: u16, reason: &str) {
        self.ctx.events.registry.set_shutting_down();
        self.ctx.stop_accepting.notify_one();
        if let Some(gate) = &self.gate {
            gate.commit_point();
            gate.wait_released();
        }
        let sockets = self.ctx.events.registry.all();
        if sockets.is_empty() {
            self.ctx.events.push(Event::AllClosed);
        }
        for socket in sockets {
            socket.close(code, reason);
        }
    }

    /// Commits and releases what is pending, and closes the stores (waits for the disk).
    pub fn finish_storage(&self) {
        if let Some(gate) = &self.gate {
            gate.finish();
            if let Some(cluster) = gate.storage().cluster() {
                cluster.shutdown();
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Stopped between a batch's begin and end: this thread stops deferring wake-ups.
        crate::socket::end_batch();
        // (First: a scrape must not see the storage going.)
        self.metrics.take();
        self.finish_storage();
        match self.io.take() {
            Some(Io::Threads(runtime)) => runtime.shutdown_background(),
            Some(Io::Reactor(reactor, _)) => reactor.release(self.ctx.events.fd()),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::config::Limits;
    use crate::event::Events;
    use crate::socket::SocketShared;

    /// The task of an accepted WebSocket lives as long as the socket: what it holds is most of
    /// what an idle socket costs in the core (docs/topics/design.md, "What a socket costs").
    #[test]
    fn upgraded_task_stays_small() {
        let events = Arc::new(Events::new().expect("an eventfd"));
        let socket = Arc::new(SocketShared::new(1, Arc::new(Limits::default())));
        let on_upgrade = hyper::upgrade::on(hyper::Request::new(()));
        let task = super::upgraded(on_upgrade, socket, events);
        let size = std::mem::size_of_val(&task);
        eprintln!(
            "sizes: upgraded task {size}, SocketShared {}, ObjectShared {}, SocketMeta {}, Event {}, Sleep {}",
            std::mem::size_of::<SocketShared>(),
            std::mem::size_of::<crate::object::ObjectShared>(),
            std::mem::size_of::<crate::object::SocketMeta>(),
            std::mem::size_of::<crate::event::Event>(),
            std::mem::size_of::<tokio::time::Sleep>(),
        );
        assert!(size <= 800, "the task of a WebSocket grew to {size} bytes");
    }
}
