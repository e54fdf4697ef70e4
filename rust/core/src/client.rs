//! Outgoing WebSockets (SPEC §2.3): connect, run the client side of the opening handshake, then
//! drive the socket with the same connection task as an accepted one (frames we send masked,
//! frames we receive unmasked). The socket is registered like any other: its events reach the
//! application through the same queue, and it lives until closed, not until a request ends.

use std::sync::Arc;

use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Limits;
use crate::connection;
use crate::event::{Event, Events};
use crate::meter::Slot;
use crate::tls;

/// The response head may not be longer than this.
const MAX_HEAD: usize = 16 * 1024;

/// What to connect to.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    pub url: String,
    pub protocols: Vec<String>,
    pub headers: Vec<(String, String)>,
    pub slot: Option<Arc<Slot>>,
    /// For `wss://`: trust only the CA certificates in this PEM file (default: the system's).
    pub ca_file: Option<String>,
    /// Handed back in the [`Event::Connected`] that reports the outcome.
    pub token: u64,
}

/// The parts of a `ws://` or `wss://` URL.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) tls: bool,
    pub(crate) host: String,
    pub(crate) port: u16,
    /// Path and query, at least "/".
    pub(crate) resource: String,
    /// The Host header value.
    pub(crate) authority: String,
}

fn parse_url(url: &str) -> Result<Target, String> {
    parse_target(url, "ws", "wss")
}

/// Parses a URL of scheme `plain` or `secure` (TLS); a fragment is left out.
pub(crate) fn parse_target(url: &str, plain: &str, secure: &str) -> Result<Target, String> {
    let url = url.split_once('#').map_or(url, |(before, _)| before);
    let scheme = |name: &str| {
        url.get(..name.len() + 3)
            .filter(|head| {
                head.as_bytes()[..name.len()].eq_ignore_ascii_case(name.as_bytes()) && head.ends_with("://")
            })
            .map(|head| &url[head.len()..])
    };
    let (tls, rest) = if let Some(rest) = scheme(plain) {
        (false, rest)
    } else if let Some(rest) = scheme(secure) {
        (true, rest)
    } else {
        return Err(format!("{url:?} is not a {plain}:// or {secure}:// URL"));
    };
    let (authority, resource) = match rest.find(['/', '?']) {
        Some(at) if rest.as_bytes()[at] == b'/' => (&rest[..at], rest[at..].to_owned()),
        Some(at) => (&rest[..at], format!("/{}", &rest[at..])),
        None => (rest, "/".to_owned()),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("{url:?} has no host (or has credentials, which are not supported)"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| format!("bad IPv6 host in {url:?}"))?;
        (host.to_owned(), after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (authority.to_owned(), None),
        }
    };
    let port = match port {
        None if tls => 443,
        None => 80,
        Some(port) => port.parse().map_err(|_| format!("bad port in {url:?}"))?,
    };
    Ok(Target { tls, host, port, resource, authority: authority.to_owned() })
}

/// An open connection, after the opening handshake.
enum Opened {
    Plain(TcpStream),
    /// The TCP socket and its rustls session, driven by the socket's task.
    Tls(tls::TlsStream<rustls::ClientConnection>),
}

/// Connects, upgrades, and starts the connection task; the outcome is reported as an
/// [`Event::Connected`]. Runs on the I/O runtime.
pub(crate) async fn connect(limits: Arc<Limits>, queue: Arc<Events>, request: ConnectRequest) {
    let timeout = limits.handshake_timeout;
    let token = request.token;
    match tokio::time::timeout(timeout, open(&request)).await {
        Err(_) => queue.push(Event::Connected {
            token,
            result: Err(format!("connecting to {} timed out after {timeout:?}", request.url)),
        }),
        Ok(Err(message)) => queue.push(Event::Connected { token, result: Err(message) }),
        Ok(Ok((opened, leftover, protocol))) => {
            let socket = queue.registry.register(limits, None, true);
            if queue.registry.is_shutting_down() {
                socket.close(crate::frame::close_code::GOING_AWAY, "server shutting down");
            }
            if let Some(slot) = request.slot {
                socket.set_slot(slot);
            }
            queue.push(Event::Connected { token, result: Ok((socket.clone(), protocol)) });
            match opened {
                Opened::Plain(stream) => connection::run(stream, leftover, socket, queue).await,
                Opened::Tls(stream) => connection::run(stream, leftover, socket, queue).await,
            }
        }
    }
}

/// The client configuration with the system's roots, loaded once.
fn system_roots() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG.get_or_init(|| tls::client_config(None).map_err(|e| e.to_string())).clone()
}

/// The client configuration trusting the CA certificates of `ca_file`, or the system's.
pub(crate) fn tls_config(ca_file: Option<&str>) -> Result<Arc<rustls::ClientConfig>, String> {
    match ca_file {
        Some(path) => tls::client_config(Some(std::path::Path::new(path))).map_err(|e| e.to_string()),
        None => system_roots(),
    }
}

async fn open(request: &ConnectRequest) -> Result<(Opened, Bytes, String), String> {
    let url = &request.url;
    let target = parse_url(url)?;
    let stream = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}"))?;
    let _ = stream.set_nodelay(true);
    if !target.tls {
        let mut stream = stream;
        let (leftover, protocol) = handshake(&mut stream, request, &target).await?;
        return Ok((Opened::Plain(stream), leftover, protocol));
    }
    let config = tls_config(request.ca_file.as_deref())?;
    let name = rustls::pki_types::ServerName::try_from(target.host.clone())
        .map_err(|e| format!("{url}: bad TLS server name: {e}"))?;
    let mut session = tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|e| format!("TLS error connecting to {url}: {e}"))?;
    let (leftover, protocol) = handshake(&mut session, request, &target).await?;
    let (tcp, session) = session.into_inner();
    Ok((Opened::Tls(tls::TlsStream::new(tcp, session)), leftover, protocol))
}

/// The client side of the opening handshake; returns the bytes read past the response head and
/// the subprotocol the server chose.
async fn handshake<S>(
    stream: &mut S,
    request: &ConnectRequest,
    target: &Target,
) -> Result<(Bytes, String), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let url = &request.url;
    let key = tungstenite::handshake::client::generate_key();
    let mut head = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n",
        target.resource, target.authority
    );
    if !request.protocols.is_empty() {
        head += &format!("Sec-WebSocket-Protocol: {}\r\n", request.protocols.join(", "));
    }
    for (name, value) in &request.headers {
        if name.contains(['\r', '\n', ':']) || value.contains(['\r', '\n']) {
            return Err(format!("header {name:?} is not a valid HTTP header"));
        }
        head += &format!("{name}: {value}\r\n");
    }
    head += "\r\n";
    stream.write_all(head.as_bytes()).await.map_err(|e| format!("{url}: {e}"))?;
    stream.flush().await.map_err(|e| format!("{url}: {e}"))?;

    let mut buffer = BytesMut::with_capacity(4096);
    loop {
        if stream.read_buf(&mut buffer).await.map_err(|e| format!("{url}: {e}"))? == 0 {
            return Err(format!("{url}: the server closed the connection during the handshake"));
        }
        if let Some((length, protocol)) = parse_response(url, &buffer, &key, &request.protocols)? {
            let leftover = buffer.split_off(length).freeze();
            return Ok((leftover, protocol));
        }
    }
}

/// Parses the server's answer to our opening handshake from what was read so far: `None` while
/// the head is incomplete, else its length and the subprotocol chosen. Public for the fuzzer.
///
/// # Errors
/// A head that is too long or malformed, or that does not complete the handshake.
#[doc(hidden)]
pub fn parse_response(
    url: &str,
    buffer: &[u8],
    key: &str,
    protocols: &[String],
) -> Result<Option<(usize, String)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buffer) {
        Ok(httparse::Status::Partial) if buffer.len() < MAX_HEAD => Ok(None),
        Ok(httparse::Status::Partial) => Err(format!("{url}: response head too long")),
        Err(e) => Err(format!("{url}: bad HTTP response: {e}")),
        Ok(httparse::Status::Complete(length)) => {
            Ok(Some((length, check_response(url, &response, key, protocols)?)))
        }
    }
}

fn header<'a>(response: &'a httparse::Response<'_, '_>, name: &str) -> Option<&'a str> {
    response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
}

fn check_response(
    url: &str,
    response: &httparse::Response<'_, '_>,
    key: &str,
    protocols: &[String],
) -> Result<String, String> {
    let status = response.code.unwrap_or(0);
    if status != 101 {
        return Err(format!("{url}: the server answered HTTP {status} instead of 101"));
    }
    let token = |name: &str, want: &str| {
        header(response, name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(want)))
    };
    if !token("upgrade", "websocket") || !token("connection", "upgrade") {
        return Err(format!("{url}: the 101 response does not upgrade to websocket"));
    }
    let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
    if header(response, "sec-websocket-accept") != Some(expected.as_str()) {
        return Err(format!("{url}: wrong Sec-WebSocket-Accept in the 101 response"));
    }
    let protocol = header(response, "sec-websocket-protocol").unwrap_or("").trim().to_owned();
    if !protocol.is_empty() && !protocols.contains(&protocol) {
        return Err(format!("{url}: the server chose subprotocol {protocol:?}, which was not offered"));
    }
    Ok(protocol)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ws_urls() {
        let t = parse_url("ws://example.com:8080/a/b?x=1").unwrap();
        assert_eq!(
            t,
            Target {
                tls: false,
                host: "example.com".into(),
                port: 8080,
                resource: "/a/b?x=1".into(),
                authority: "example.com:8080".into()
            }
        );
        let t = parse_url("ws://[::1]?q").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.resource.as_str()), ("::1", 80, "/?q"));
        assert!(parse_url("http://x/").is_err());
        assert!(parse_url("ws:///path").is_err());
        assert!(parse_url("ws://h:99999/").is_err());
        let t = parse_url("wss://h/x").unwrap();
        assert!(t.tls && t.port == 443);
    }
}
